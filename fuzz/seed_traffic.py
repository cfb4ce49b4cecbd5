#!/usr/bin/env python3
"""Real SDK traffic for the command_targets seeds: run by fuzz/gen_target_seeds.py against a
recording relay (fuzz/capture) in front of a dev server. A worker runs a workflow that starts
a child, signals and cancels another workflow (RespondWorkflowTaskCompleted with those
commands); the client runs an update-with-start (ExecuteMultiOperation).

Usage: seed_traffic.py --address RELAY (plaintext, uncompressed)
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import uuid
from datetime import timedelta

from temporalio import workflow

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "clients", "python"))
with workflow.unsafe.imports_passed_through():
    import common


@workflow.defn
class Target:
    def __init__(self) -> None:
        self.pokes = 0

    @workflow.run
    async def run(self) -> int:
        await workflow.wait_condition(lambda: self.pokes > 0)
        return self.pokes

    @workflow.signal
    def poke(self, text: str) -> None:
        self.pokes += 1

    @workflow.update
    def bump(self, text: str) -> str:
        self.pokes += 1
        return f"bumped {text}"


@workflow.defn
class Child:
    @workflow.run
    async def run(self, text: str) -> str:
        return text.upper()


@workflow.defn
class Parent:
    @workflow.run
    async def run(self, target: str) -> str:
        result = await workflow.execute_child_workflow(
            Child.run, "child input", id=f"{workflow.info().workflow_id}-child"
        )
        await workflow.get_external_workflow_handle(target).signal(Target.poke, "signal input")
        await workflow.get_external_workflow_handle(f"{target}-2").cancel()
        return result


async def run(args: argparse.Namespace) -> None:
    from temporalio.client import WithStartWorkflowOperation
    from temporalio.common import WorkflowIDConflictPolicy
    from temporalio.worker import Worker

    client = await common.connect(args)
    queue = f"seed-{uuid.uuid4()}"
    async with Worker(client, task_queue=queue, workflows=[Target, Child, Parent]):
        target = f"target-{uuid.uuid4()}"
        await client.start_workflow(Target.run, id=target, task_queue=queue)
        await client.start_workflow(Target.run, id=f"{target}-2", task_queue=queue)
        await client.execute_workflow(
            Parent.run, target, id=f"parent-{uuid.uuid4()}", task_queue=queue,
            execution_timeout=timedelta(seconds=60),
        )
        start = WithStartWorkflowOperation(
            Target.run, id=f"uws-{uuid.uuid4()}", task_queue=queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )
        await client.execute_update_with_start_workflow(Target.bump, "update input", start_workflow_operation=start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_connection_args(parser)
    args = parser.parse_args()
    try:
        asyncio.run(run(args))
    except Exception as e:  # noqa: BLE001
        common.finish(False, {"error": repr(e)})
    common.finish(True)


if __name__ == "__main__":
    main()
