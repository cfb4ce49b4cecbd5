#!/usr/bin/env python3
"""Temporal load that keeps going while things fail around it (tests/chaos.rs): a worker, and
starters that run a workflow with an activity, a signal and a query, one after another, with a
marker in every input. The starters' calls are not retried by the SDK (RetryConfig
max_retries=0), so every failed call is seen and recorded with its gRPC status (the worker
retries as usual); a result that differs from what the
workflow must return is recorded as "WRONG" (never acceptable).

Usage:
  chaos_load.py --address HOST:PORT --marker TEXT --events FILE --stop-file FILE
                [--namespace NS] [--starters N] [--seconds MAX] [--ca/--cert/--key ...]

Runs until the stop file exists (or MAX seconds), then writes every call as a JSON line
{"t": unix time, "op": start|query|signal|result, "outcome": "OK"|STATUS|"HUNG"|"WRONG"|...}
(every call has a deadline; HUNG: it had not ended 15 s past it).
to the events file and prints one JSON line with counts per outcome.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import traceback
import uuid
from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    import common

# The same workflow and activity as the steady load (an activity, a signal, a query).
from steady_load import SteadyWorkflow as ChaosWorkflow
from steady_load import shout


def outcome_of(e: BaseException) -> str:
    from temporalio.client import RPCError as ClientRPCError  # noqa: F401
    from temporalio.service import RPCError

    if isinstance(e, RPCError):
        # The SDK's own HTTP/2 connection failing (no status from the proxy) is told apart.
        if e.status.name == "INTERNAL" and str(e).startswith("h2 protocol error"):
            return "TRANSPORT"
        # The SDK's own client-side deadline (tonic's "Timeout expired", reported CANCELLED).
        if e.status.name == "CANCELLED" and "Timeout expired" in str(e):
            return "DEADLINE_EXCEEDED"
        return e.status.name
    cause = e.__cause__
    if isinstance(cause, RPCError):
        return cause.status.name
    return type(e).__name__


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_gauges(metrics_url: str) -> str:
    """The worker's free task slots and pollers, from the SDK's own Prometheus metrics."""
    import urllib.request

    try:
        text = urllib.request.urlopen(metrics_url, timeout=2).read().decode()
    except Exception as e:  # noqa: BLE001
        return f"metrics unavailable: {e}"
    wanted = ("temporal_worker_task_slots_available", "temporal_num_pollers")
    return "; ".join(
        line.split("{", 1)[0] + "{" + line.split('worker_type="', 1)[-1].split('"', 1)[0] + "} "
        + line.rsplit(" ", 1)[-1]
        for line in text.splitlines()
        if line.startswith(wanted) and "worker_type=" in line
    )


def thread_times() -> dict[str, tuple[str, int]]:
    """CPU ticks (user + system) and name of each thread of this process."""
    times = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        times[tid] = (name, int(fields[11]) + int(fields[12]))
    return times


def dump_threads(out) -> None:
    """Which threads burn CPU while nothing completes (5 s apart), and where each waits in the
    kernel (wchan, syscall): where the SDK's core runtime is stuck. With CHAOS_GDB=1 also every
    thread's native stack, from a gdb left running on its own (it can take minutes)."""
    import subprocess

    before = thread_times()
    time.sleep(5)
    after = thread_times()
    for tid, (name, ticks) in sorted(after.items()):
        spent = ticks - before.get(tid, (name, ticks))[1]
        where = []
        for item in ("wchan", "syscall"):
            try:
                with open(f"/proc/self/task/{tid}/{item}") as f:
                    where.append(f"{item}={f.read().strip()}")
            except OSError:
                pass
        print(f"chaos_load: thread {tid} {name}: {spent} ticks in 5 s; {' '.join(where)}", file=out)
    out.flush()
    if os.environ.get("CHAOS_GDB") == "1":
        subprocess.Popen(
            ["gdb", "-p", str(os.getpid()), "-batch", "-ex", "thread apply all bt 25"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


async def run(args: argparse.Namespace) -> dict:
    from temporalio.runtime import (
        LoggingConfig,
        PrometheusConfig,
        Runtime,
        TelemetryConfig,
        TelemetryFilter,
    )
    from temporalio.service import RetryConfig
    from temporalio.worker import Worker

    # What the SDK's core says when things fail (warnings to stderr), and the worker's task
    # slots over time: to tell a worker that stops polling from calls that fail.
    metrics_url = f"http://127.0.0.1:{free_port()}/metrics"
    runtime = Runtime(
        telemetry=TelemetryConfig(
            logging=LoggingConfig(filter=TelemetryFilter(core_level="WARN", other_level="ERROR")),
            metrics=PrometheusConfig(bind_address=metrics_url.split("/")[2]),
        )
    )
    # The starters see every failure (no retries); the worker retries as SDK workers do.
    client = await common.connect(args, retry_config=RetryConfig(max_retries=0), runtime=runtime)
    worker_client = await common.connect(args, runtime=runtime)
    events: list[dict] = []
    samples: list[str] = []
    started = time.monotonic()

    def stopping() -> bool:
        return os.path.exists(args.stop_file) or time.monotonic() - started > args.seconds

    async def call(op: str, coro, timeout: float):
        # Every call carries a deadline (rpc_timeout) the proxy must honour; this bound, 15 s
        # past it, only catches a call that never ends ("HUNG"), without waiting for it (a
        # cancelled SDK call may not end either).
        task = asyncio.ensure_future(coro)
        done, _ = await asyncio.wait({task}, timeout=timeout + 15)
        if not done:
            task.cancel()
            events.append({"t": time.time(), "op": op, "outcome": "HUNG"})
            if len(samples) < 20:
                samples.append(f"{op}: HUNG past {timeout + 15} s")
            return False, None
        try:
            value = task.result()
            events.append({"t": time.time(), "op": op, "outcome": "OK"})
            return True, value
        except Exception as e:  # noqa: BLE001
            outcome = outcome_of(e)
            events.append({"t": time.time(), "op": op, "outcome": outcome})
            if len(samples) < 20:
                samples.append(f"{op}: {outcome}: {type(e).__name__}: {e}"[:300])
            return False, None

    async def starter(index: int) -> None:
        while not stopping():
            run = f"{index}-{uuid.uuid4().hex[:8]}"
            # The marker goes in the input only: workflow ids are operational fields the server
            # must read (they are never sealed).
            text = f"{args.marker}-{run}"
            ok, handle = await call(
                "start",
                client.start_workflow(
                    ChaosWorkflow.run,
                    text,
                    id=f"chaos-{run}",
                    task_queue=args.task_queue,
                    rpc_timeout=timedelta(seconds=10),
                ),
                10,
            )
            if not ok:
                await asyncio.sleep(0.2)
                continue
            ok, value = await call(
                "query", handle.query(ChaosWorkflow.current, rpc_timeout=timedelta(seconds=10)), 10
            )
            if ok and value not in ("", "!"):
                events.append({"t": time.time(), "op": "query", "outcome": "WRONG"})
            # The signal must land for the workflow to finish: try until it does.
            while not stopping():
                ok, _ = await call(
                    "signal",
                    handle.signal(ChaosWorkflow.finish, "!", rpc_timeout=timedelta(seconds=10)),
                    10,
                )
                if ok:
                    break
                await asyncio.sleep(0.2)
            else:
                break
            while not stopping():
                ok, value = await call("result", handle.result(rpc_timeout=timedelta(seconds=20)), 20)
                if ok:
                    if value != text.upper() + "!":
                        events.append({"t": time.time(), "op": "result", "outcome": "WRONG"})
                        if len(samples) < 20:
                            samples.append(f"result: WRONG: {value!r}"[:300])
                    break
                await asyncio.sleep(0.2)

    # Diagnostics go to CHAOS_SDK_DIAG (a file that survives a test that gives up on this
    # script) or to stderr.
    diag_path = os.environ.get("CHAOS_SDK_DIAG")
    diag = open(diag_path, "a") if diag_path else sys.stderr

    async def watch() -> None:
        # Every 15 s: the worker's gauges and the count of completed workflows, to stderr; when
        # none completed for 60 s, every task's stack once (where the starters wait).
        completed_at, completed, dumped = time.monotonic(), 0, False
        while not stopping():
            await asyncio.sleep(15)
            done = sum(1 for e in events if e["op"] == "result" and e["outcome"] == "OK")
            if done != completed:
                completed_at, completed = time.monotonic(), done
            gauges = await asyncio.to_thread(worker_gauges, metrics_url)
            print(
                f"chaos_load t={time.monotonic() - started:.0f}s completed={done} {gauges}",
                file=diag,
                flush=True,
            )
            if time.monotonic() - completed_at > 60 and not dumped:
                dumped = True
                print("chaos_load: no workflow completed for 60 s; tasks:", file=diag)
                for task in asyncio.all_tasks():
                    task.print_stack(limit=8, file=diag)
                diag.flush()
                await asyncio.to_thread(dump_threads, diag)

    async with Worker(
        worker_client,
        task_queue=args.task_queue,
        workflows=[ChaosWorkflow],
        activities=[shout],
    ):
        watcher = asyncio.ensure_future(watch())
        await asyncio.gather(*(starter(i) for i in range(args.starters)))
        watcher.cancel()
    with open(args.events, "w") as out:
        for event in events:
            out.write(json.dumps(event) + "\n")
    counts: dict[str, int] = {}
    for event in events:
        key = f"{event['op']}:{event['outcome']}"
        counts[key] = counts.get(key, 0) + 1
    return {"events": len(events), "counts": counts, "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_connection_args(parser)
    parser.add_argument("--marker", required=True)
    parser.add_argument("--events", required=True)
    parser.add_argument("--stop-file", required=True)
    parser.add_argument("--seconds", type=float, default=3600.0)
    parser.add_argument("--starters", type=int, default=3)
    parser.add_argument("--task-queue", default=f"chaos-{uuid.uuid4().hex[:8]}")
    args = parser.parse_args()
    try:
        result = asyncio.run(run(args))
    except BaseException as e:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        common.finish(False, {"error": f"{type(e).__name__}: {e}"})
    common.finish(result["events"] > 0, result)


if __name__ == "__main__":
    main()
