#!/usr/bin/env python3
"""A query handler that raises: what the caller sees, through the proxy and straight at the server.

Usage: query_failure.py --address PROXY --direct SERVER --marker M [connection flags]

A worker connected to --address runs QueryFails, whose query `boom` raises
ApplicationError("query handler failed: <marker>"). The workflow is queried twice while the
worker runs: through --address (the proxy) and straight at --direct (the dev server, plaintext,
no proxy), each with the SDK's client and with a raw QueryWorkflow call (to see the error's
message and its google.rpc.Status details, as gRPC carried them).

Prints one JSON line: {"ok": bool, "expected": TEXT,
  "proxy": {"message": ..., "raw_message": ..., "raw_status_b64": ...},
  "direct": {...the same...}}
ok is true when both queries failed as query failures.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import traceback
import uuid

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    import common


@workflow.defn
class QueryFails:
    def __init__(self) -> None:
        self.marker = ""
        self.done = False

    @workflow.run
    async def run(self, marker: str) -> str:
        self.marker = marker
        await workflow.wait_condition(lambda: self.done)
        return "done"

    @workflow.query
    def boom(self) -> str:
        raise ApplicationError(f"query handler failed: {self.marker}")

    @workflow.signal
    def finish(self) -> None:
        self.done = True


async def query_both_ways(client, workflow_id: str) -> dict:
    """The SDK's query (its exception text) and a raw QueryWorkflow (message and details)."""
    from temporalio.api.query.v1 import WorkflowQuery
    from temporalio.api.workflowservice.v1 import QueryWorkflowRequest
    from temporalio.api.common.v1 import WorkflowExecution
    from temporalio.client import WorkflowQueryFailedError
    from temporalio.service import RPCError

    out: dict = {}
    try:
        await client.get_workflow_handle(workflow_id).query(QueryFails.boom)
        out["message"] = None
    except WorkflowQueryFailedError as e:
        out["message"] = str(e)
    request = QueryWorkflowRequest(
        namespace=client.namespace,
        execution=WorkflowExecution(workflow_id=workflow_id),
        query=WorkflowQuery(query_type="boom"),
    )
    try:
        await client.workflow_service.query_workflow(request, retry=False)
        out["raw_message"] = None
    except RPCError as e:
        out["raw_status"] = e.status.name
        out["raw_message"] = e.message
        out["raw_status_b64"] = base64.b64encode(e.raw_grpc_status).decode()
    return out


async def run(args: argparse.Namespace) -> dict:
    from temporalio.client import Client
    from temporalio.worker import Worker

    client = await common.connect(args)
    direct = await Client.connect(args.direct, namespace=args.namespace)
    task_queue = f"query-failure-{uuid.uuid4()}"
    workflow_id = f"query-failure-{uuid.uuid4()}"
    out: dict = {"expected": f"query handler failed: {args.marker}"}
    async with Worker(client, task_queue=task_queue, workflows=[QueryFails]):
        handle = await client.start_workflow(
            QueryFails.run, args.marker, id=workflow_id, task_queue=task_queue
        )
        out["proxy"] = await query_both_ways(client, workflow_id)
        out["direct"] = await query_both_ways(direct, workflow_id)
        await handle.signal(QueryFails.finish)
        await handle.result()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_connection_args(parser)
    parser.add_argument("--direct", required=True, help="the dev server, HOST:PORT")
    parser.add_argument("--marker", required=True)
    args = parser.parse_args()
    try:
        out = asyncio.run(run(args))
    except Exception:  # noqa: BLE001 - report any failure as JSON
        common.finish(False, {"error": traceback.format_exc()})
        return
    failed = all(out[way].get("raw_message") is not None for way in ("proxy", "direct"))
    common.finish(failed, out)


if __name__ == "__main__":
    main()
