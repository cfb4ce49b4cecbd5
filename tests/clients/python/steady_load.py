#!/usr/bin/env python3
"""Continuous Temporal load for a while: a worker, and starters that run a workflow with an
activity, a signal and a query, one after another. Client calls are not retried by the SDK
(RetryConfig max_retries=0), so every failed call surfaces; warnings the SDK logs (e.g. a
worker's failed poll) are counted too.

Usage:
  steady_load.py --address HOST:PORT [--namespace NS] [--seconds N] [--starters N]
                 [--task-queue TQ] [--ca CA.pem [--cert C.pem --key K.pem]] [--server-name NAME]

Prints one JSON line: {"ok": failures == 0 and warnings == 0, "completed": N, "failures": N,
"warnings": N, "errors": [first few]}.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
import traceback
import uuid
from datetime import timedelta

from temporalio import activity, workflow

with workflow.unsafe.imports_passed_through():
    import common


@activity.defn
async def shout(text: str) -> str:
    return text.upper()


@workflow.defn
class SteadyWorkflow:
    def __init__(self) -> None:
        self.suffix = ""

    @workflow.run
    async def run(self, text: str) -> str:
        await workflow.wait_condition(lambda: self.suffix != "")
        loud = await workflow.execute_activity(
            shout, text, start_to_close_timeout=timedelta(seconds=30)
        )
        return loud + self.suffix

    @workflow.signal
    def finish(self, suffix: str) -> None:
        self.suffix = suffix

    @workflow.query
    def current(self) -> str:
        return self.suffix


class Counter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()}"[:300])


async def run(args: argparse.Namespace) -> dict:
    from temporalio.service import RetryConfig
    from temporalio.worker import Worker

    warnings = Counter()
    logging.getLogger().addHandler(warnings)
    client = await common.connect(args, retry_config=RetryConfig(max_retries=0))
    completed = 0
    failures = 0
    errors: list[str] = []
    deadline = time.monotonic() + args.seconds

    async def starter(index: int) -> None:
        nonlocal completed, failures
        while time.monotonic() < deadline:
            text = f"call-{index}-{uuid.uuid4().hex[:8]}"
            try:
                handle = await client.start_workflow(
                    SteadyWorkflow.run,
                    text,
                    id=f"steady-{text}",
                    task_queue=args.task_queue,
                )
                assert await handle.query(SteadyWorkflow.current) == ""
                await handle.signal(SteadyWorkflow.finish, "!")
                result = await handle.result()
                if result != text.upper() + "!":
                    raise AssertionError(f"unexpected result {result!r}")
                completed += 1
            except Exception as e:  # noqa: BLE001
                failures += 1
                if len(errors) < 5:
                    errors.append(f"{type(e).__name__}: {e}")

    async with Worker(
        client,
        task_queue=args.task_queue,
        workflows=[SteadyWorkflow],
        activities=[shout],
    ):
        await asyncio.gather(*(starter(i) for i in range(args.starters)))
    return {
        "completed": completed,
        "failures": failures,
        "warnings": len(warnings.records),
        "errors": errors + warnings.records[:5],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_connection_args(parser)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--starters", type=int, default=3)
    parser.add_argument("--task-queue", default=f"steady-{uuid.uuid4().hex[:8]}")
    args = parser.parse_args()
    try:
        result = asyncio.run(run(args))
    except BaseException as e:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        common.finish(False, {"error": f"{type(e).__name__}: {e}"})
    ok = result["failures"] == 0 and result["warnings"] == 0 and result["completed"] > 0
    common.finish(ok, result)


if __name__ == "__main__":
    main()
