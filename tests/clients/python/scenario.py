#!/usr/bin/env python3
"""End-to-end Temporal scenario through a given address (e.g. the portcullis proxy).

Runs an in-process worker and a client against --address and exercises:
activities (incl. retries), a child workflow, a query, an update, a signal,
the workflow result, describe and history fetch (payloads decoded from history).

Usage:
  scenario.py --address HOST:PORT [--namespace NS] [--task-queue TQ]
              [--workflow-id ID] [--name NAME] [--timeout SECONDS]
              [--ca CA.pem [--cert CLIENT.pem --key CLIENT.key]] [--server-name NAME]
              [--grpc-compression gzip|none]

Prints one JSON line: {"ok": bool, "checks": {name: bool}, "result": {...}, ...}
Exit code 0 only if every check passed.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
import traceback
import uuid
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

with workflow.unsafe.imports_passed_through():
    import common

FLAKY_FAILURES = 2  # flaky() fails on attempts 1..FLAKY_FAILURES, succeeds afterwards
CHILD_INPUT = 21


# --------------------------------------------------------------------------- activities
@activity.defn
async def greet(name: str) -> str:
    return f"Hello, {name}!"


@activity.defn
async def flaky() -> int:
    attempt = activity.info().attempt
    if attempt <= FLAKY_FAILURES:
        # BENIGN: expected failure, so the worker does not log a traceback for it.
        raise ApplicationError(
            f"flaky: deliberate failure on attempt {attempt}",
            category=ApplicationErrorCategory.BENIGN,
        )
    return attempt


# --------------------------------------------------------------------------- workflows
@workflow.defn
class ChildWorkflow:
    @workflow.run
    async def run(self, x: int) -> int:
        return x * 2


@workflow.defn
class ScenarioWorkflow:
    def __init__(self) -> None:
        self._status = "started"
        self._suffix = ""
        self._finish: str | None = None

    @workflow.run
    async def run(self, name: str) -> dict:
        greeting = await workflow.execute_activity(
            greet, name, start_to_close_timeout=timedelta(seconds=10)
        )
        self._status = "greeted"
        child = await workflow.execute_child_workflow(
            ChildWorkflow.run,
            CHILD_INPUT,
            id=f"{workflow.info().workflow_id}-child",
            execution_timeout=timedelta(seconds=30),
        )
        self._status = "child-done"
        flaky_attempts = await workflow.execute_activity(
            flaky,
            start_to_close_timeout=timedelta(seconds=10),
            retry_policy=RetryPolicy(
                initial_interval=timedelta(milliseconds=100),
                backoff_coefficient=1.0,
                maximum_interval=timedelta(milliseconds=100),
                maximum_attempts=FLAKY_FAILURES + 3,
            ),
        )
        self._status = "waiting-for-signal"
        await workflow.wait_condition(lambda: self._finish is not None)
        self._status = "finished"
        return {
            "greeting": greeting,
            "child": child,
            "flaky_attempts": flaky_attempts,
            "signal": self._finish,
            "suffix": self._suffix,
        }

    @workflow.signal
    def finish(self, value: str) -> None:
        self._finish = value

    @workflow.query
    def status(self) -> str:
        return self._status

    @workflow.update
    def set_suffix(self, s: str) -> str:
        previous = self._suffix
        self._suffix = s
        return previous


# --------------------------------------------------------------------------- client side
def _payload_values(payloads) -> list:
    from temporalio.converter import DataConverter

    try:
        return DataConverter.default.payload_converter.from_payloads(list(payloads))
    except Exception as e:  # pragma: no cover - reported as a failed check
        return [f"<undecodable: {e!r}>"]


async def run_scenario(args: argparse.Namespace, checks: dict, info: dict) -> None:
    from temporalio.client import Client, WorkflowExecutionStatus
    from temporalio.worker import Worker

    client: Client = await common.connect(args)
    checks["connected"] = True
    name = args.name
    wf_id = args.workflow_id
    signal_value = f"done-{uuid.uuid4().hex[:8]}"

    async with Worker(
        client,
        task_queue=args.task_queue,
        workflows=[ScenarioWorkflow, ChildWorkflow],
        activities=[greet, flaky],
    ):
        handle = await client.start_workflow(
            ScenarioWorkflow.run,
            name,
            id=wf_id,
            task_queue=args.task_queue,
            execution_timeout=timedelta(seconds=args.timeout),
        )
        info["run_id"] = handle.result_run_id
        checks["started"] = bool(handle.result_run_id)

        # Query until the workflow is parked on the signal.
        status = None
        deadline = time.monotonic() + args.timeout / 2
        while time.monotonic() < deadline:
            status = await handle.query(ScenarioWorkflow.status)
            if status == "waiting-for-signal":
                break
            await asyncio.sleep(0.2)
        info["query_status"] = status
        checks["query_status"] = status == "waiting-for-signal"

        # Two updates: each returns the previous suffix.
        prev1 = await handle.execute_update(ScenarioWorkflow.set_suffix, "!")
        prev2 = await handle.execute_update(ScenarioWorkflow.set_suffix, "?")
        info["update_results"] = [prev1, prev2]
        checks["update_first"] = prev1 == ""
        checks["update_second"] = prev2 == "!"

        await handle.signal(ScenarioWorkflow.finish, signal_value)
        result = await handle.result()
        info["result"] = result

        checks["result_greeting"] = result.get("greeting") == f"Hello, {name}!"
        checks["result_child"] = result.get("child") == CHILD_INPUT * 2
        checks["result_flaky_attempts"] = result.get("flaky_attempts") == FLAKY_FAILURES + 1
        checks["result_signal"] = result.get("signal") == signal_value
        checks["result_suffix"] = result.get("suffix") == "?"

        desc = await handle.describe()
        checks["describe_completed"] = desc.status == WorkflowExecutionStatus.COMPLETED

        # Payloads read back from history must decode to the original values.
        history = await handle.fetch_history()
        started_input, activity_results = None, []
        for ev in history.events:
            if ev.HasField("workflow_execution_started_event_attributes"):
                started_input = _payload_values(
                    ev.workflow_execution_started_event_attributes.input.payloads
                )
            elif ev.HasField("activity_task_completed_event_attributes"):
                activity_results.extend(
                    _payload_values(ev.activity_task_completed_event_attributes.result.payloads)
                )
        info["history_events"] = len(history.events)
        checks["history_input"] = started_input == [name]
        checks["history_activity_result"] = f"Hello, {name}!" in activity_results

        child_result = await client.get_workflow_handle(f"{wf_id}-child").result()
        checks["child_result_direct"] = child_result == CHILD_INPUT * 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_connection_args(parser)
    parser.add_argument("--task-queue", default=None, help="task queue (default: unique)")
    parser.add_argument("--workflow-id", default=None, help="workflow id (default: unique)")
    parser.add_argument("--name", default="Portcullis", help="name passed to the workflow")
    parser.add_argument("--timeout", type=float, default=60.0, help="overall time bound (s)")
    args = parser.parse_args()
    suffix = uuid.uuid4().hex[:12]
    args.task_queue = args.task_queue or f"scenario-tq-{suffix}"
    args.workflow_id = args.workflow_id or f"scenario-wf-{suffix}"

    checks: dict = {}
    info: dict = {}
    started = time.monotonic()
    error = None
    try:
        asyncio.run(asyncio.wait_for(run_scenario(args, checks, info), args.timeout))
    except BaseException as e:  # noqa: BLE001 - report everything as failure
        if isinstance(e, asyncio.TimeoutError):
            error = f"timed out after {args.timeout}s"
        else:
            error = f"{type(e).__name__}: {e}"
        traceback.print_exc(file=sys.stderr)

    ok = error is None and bool(checks) and all(checks.values())
    payload = {
        "checks": checks,
        "result": info.pop("result", None),
        "workflow_id": args.workflow_id,
        "task_queue": args.task_queue,
        "elapsed_s": round(time.monotonic() - started, 3),
        **info,
    }
    if error is not None:
        payload["error"] = error
    common.finish(ok, payload)


if __name__ == "__main__":
    main()
