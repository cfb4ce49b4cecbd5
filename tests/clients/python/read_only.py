#!/usr/bin/env python3
"""Checks a read-only caller: describes --workflow-id, then tries to start a workflow.

Usage: read_only.py --address HOST:PORT --workflow-id ID [connection flags, e.g. --api-key]

Prints one JSON line: {"ok": bool, "described": bool, "start_refused": "<status name>" | null}
ok is true when the describe succeeded and the start was refused.
"""
from __future__ import annotations

import argparse
import asyncio
import traceback
import uuid

import common


async def run(args: argparse.Namespace) -> dict:
    from temporalio.service import RPCError

    client = await common.connect(args)
    out: dict = {"described": False, "start_refused": None}
    description = await client.get_workflow_handle(args.workflow_id).describe()
    out["described"] = description.id == args.workflow_id
    try:
        await client.start_workflow(
            "NotAllowed", id=f"read-only-{uuid.uuid4()}", task_queue="nowhere"
        )
    except RPCError as e:
        out["start_refused"] = e.status.name
        out["message"] = e.message
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_connection_args(parser)
    parser.add_argument("--workflow-id", dest="workflow_id", required=True)
    args = parser.parse_args()
    try:
        out = asyncio.run(run(args))
    except Exception:  # noqa: BLE001 - report any failure as JSON
        common.finish(False, {"error": traceback.format_exc()})
        return
    common.finish(bool(out["described"] and out["start_refused"]), out)


if __name__ == "__main__":
    main()
