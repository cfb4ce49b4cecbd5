#!/usr/bin/env python3
"""Long-running Temporal worker hosting GreetingWorkflow (used with the TS client).

Usage:
  worker.py --address HOST:PORT --task-queue TQ [--namespace NS] [--seconds N]
            [--ca CA.pem [--cert CLIENT.pem --key CLIENT.key]] [--server-name NAME]
            [--grpc-compression gzip|none]

Prints {"ready": true, ...} (one JSON line, flushed) once the worker runs, then
serves for --seconds (default 60) or until SIGTERM/SIGINT, prints
{"ok": true, "stopped": REASON} and exits 0. On error prints {"ok": false,
"error": ...} and exits 1.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import traceback
from datetime import timedelta

from temporalio import activity, workflow

with workflow.unsafe.imports_passed_through():
    import common


@activity.defn
async def greet(name: str) -> str:
    return f"Hello, {name}!"


@workflow.defn
class GreetingWorkflow:
    @workflow.run
    async def run(self, name: str) -> str:
        return await workflow.execute_activity(
            greet, name, start_to_close_timeout=timedelta(seconds=10)
        )


async def serve(args: argparse.Namespace) -> str:
    from temporalio.worker import Worker

    client = await common.connect(args)
    stop = asyncio.Event()
    reason = {"value": "timeout"}
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        def _on_signal(s=sig) -> None:
            reason["value"] = signal.Signals(s).name
            stop.set()
        loop.add_signal_handler(sig, _on_signal)

    async with Worker(
        client,
        task_queue=args.task_queue,
        workflows=[GreetingWorkflow],
        activities=[greet],
    ):
        print(json.dumps({"ready": True, "task_queue": args.task_queue}), flush=True)
        try:
            await asyncio.wait_for(stop.wait(), args.seconds)
        except asyncio.TimeoutError:
            pass
    return reason["value"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_connection_args(parser)
    parser.add_argument("--task-queue", required=True, help="task queue to poll")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to serve")
    args = parser.parse_args()
    try:
        reason = asyncio.run(serve(args))
    except BaseException as e:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        common.finish(False, {"error": f"{type(e).__name__}: {e}"})
    common.finish(True, {"stopped": reason})


if __name__ == "__main__":
    main()
