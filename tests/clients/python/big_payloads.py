#!/usr/bin/env python3
"""A workflow whose input, activity result and signal are each SIZE bytes of JSON text.

Usage: big_payloads.py --marker M [--size BYTES] [--kind random|json] [--expect-too-large]
                       [connection flags]

The three payloads are strings that start with "<marker>-<what>:" followed by seeded
pseudo-random base64 (--kind random, incompressible) or a list of realistic order records
(--kind json, compressible). The workflow returns the SHA-256 of each one it saw; the script
checks them against its own.

With --expect-too-large, starting the workflow must fail (the server's size limit): the script
prints ok=true with the error when it does, ok=false when the start succeeds.

Prints one JSON line: {"ok": bool, "workflow_id": ..., "run_id": ..., "hashes": {...}, ...}
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import random
import traceback
import uuid
from datetime import timedelta

from temporalio import activity, workflow

with workflow.unsafe.imports_passed_through():
    import common


def make_payload(marker: str, what: str, size: int, kind: str) -> str:
    """Deterministic: the activity and the checking script build the same text."""
    rng = random.Random(f"{marker}/{what}")
    head = f"{marker}-{what}:"
    if kind == "random":
        raw = rng.randbytes(size * 3 // 4 + 4)
        return (head + base64.b64encode(raw).decode())[:size]
    records = []
    length = len(head)
    i = 0
    while length < size:
        record = json.dumps({
            "order_id": f"ord-{rng.randrange(10**9):09d}",
            "customer": {"id": rng.randrange(10**6), "tier": rng.choice(["gold", "silver", "bronze"])},
            "items": [{"sku": f"SKU-{rng.randrange(5000):04d}", "qty": rng.randrange(1, 9),
                       "price_cents": rng.randrange(100, 50000)} for _ in range(rng.randrange(1, 4))],
            "status": rng.choice(["placed", "paid", "shipped", "delivered"]),
            "note": f"record {i}",
        })
        records.append(record)
        length += len(record) + 1
        i += 1
    return head + "[" + ",".join(records) + "]"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@activity.defn
async def produce(marker: str, size: int, kind: str) -> str:
    return make_payload(marker, "result", size, kind)


@workflow.defn
class BigPayloads:
    def __init__(self) -> None:
        self.signal = None

    @workflow.run
    async def run(self, data: str, marker: str, size: int, kind: str) -> dict:
        result = await workflow.execute_activity(
            produce, args=[marker, size, kind], start_to_close_timeout=timedelta(seconds=120)
        )
        await workflow.wait_condition(lambda: self.signal is not None)
        return {"input": sha(data), "result": sha(result), "signal": sha(self.signal)}

    @workflow.signal
    def big(self, data: str) -> None:
        self.signal = data


async def main() -> None:
    parser = common.add_connection_args(argparse.ArgumentParser())
    parser.add_argument("--marker", required=True)
    parser.add_argument("--size", type=int, default=10 * 1000 * 1000)
    parser.add_argument("--kind", choices=("random", "json"), default="random")
    parser.add_argument("--expect-too-large", action="store_true")
    args = parser.parse_args()
    from temporalio.worker import Worker

    client = await common.connect(args)
    data = make_payload(args.marker, "input", args.size, args.kind)
    signal = make_payload(args.marker, "signal", args.size, args.kind)
    expected = {
        "input": sha(data),
        "result": sha(make_payload(args.marker, "result", args.size, args.kind)),
        "signal": sha(signal),
    }
    # Not the marker: workflow ids are stored in plaintext, payloads are what is searched for.
    workflow_id = f"big-{uuid.uuid4().hex}"
    task_queue = f"big-{uuid.uuid4().hex[:8]}"
    if args.expect_too_large:
        try:
            await client.start_workflow(
                BigPayloads.run, args=[data, args.marker, args.size, args.kind],
                id=workflow_id, task_queue=task_queue,
            )
        except Exception as e:  # the server's (or the SDK's) size limit
            common.finish(True, {"refused": True, "error": f"{type(e).__name__}: {e}"[:500]})
        common.finish(False, {"refused": False, "workflow_id": workflow_id})

    async with Worker(
        client,
        task_queue=task_queue,
        workflows=[BigPayloads],
        activities=[produce],
        # The SDK checks payload sizes against the server's limits itself; through the proxy,
        # payloads above them are offloaded, so the check is turned off.
        disable_payload_error_limit=True,
    ):
        handle = await client.start_workflow(
            BigPayloads.run, args=[data, args.marker, args.size, args.kind],
            id=workflow_id, task_queue=task_queue,
            execution_timeout=timedelta(minutes=5),
        )
        await handle.signal(BigPayloads.big, signal)
        hashes = await handle.result()
    common.finish(hashes == expected, {
        "workflow_id": workflow_id,
        "run_id": handle.result_run_id,
        "hashes": hashes,
        "expected": expected,
        "size": len(data),
    })


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except Exception:
        traceback.print_exc()
        common.finish(False, {"error": traceback.format_exc()[-2000:]})
