#!/usr/bin/env python3
"""Runs every newer SDK feature once and reports what it saw, for a run through the proxy to be
compared with the same run straight at the server.

Features: Nexus endpoint management (the SDK's test environment helper and the raw
OperatorService: create, get, list, update with a description, delete), Nexus operations from a
workflow (sync with a payload, workflow-run, a handler failure, a cancelled workflow-run
operation), a workflow that signal-with-starts another workflow (the system Nexus endpoint
`__temporal_system`), a memo upserted and then deleted (a nil value), update-with-start,
standalone activities (start, describe, pause, unpause, update options, result, cancel, list,
count, async completion by id), standalone Nexus operations, schedules (create, describe,
update, pause, unpause, trigger, list, delete), a batch operation (signal), the activity
operations on a workflow's activity (pause, update options, unpause, reset), task queue
configuration, worker deployments (a versioned worker, set current version, version metadata,
describe and list) and the deprecated build-id APIs.

For every kind K that carries user data, the exact string f"{M}-{K}" travels in that kind of
payload only (values that come back inside another payload travel reversed), so a grep of the
server's database for "M-K" finds that payload kind only. STORED_KINDS are those the server
persists (checked against a direct run).

Usage:
  sdk_surface.py --address HOST:PORT --marker M [--namespace NS] [--only SECTION,...]
                 [--ca ... --cert ... --key ...]

Prints one JSON line: {"ok": bool, "results": {...}, "errors": {...}, "stored_kinds": [...],
"endpoint_id": ..., ...}. `results` holds only values that must be the same however the run
reached the server (no ids, no times), so the caller compares two runs' `results` for equality.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
import traceback
import uuid
from datetime import timedelta
from typing import Any, Optional

import nexusrpc
import nexusrpc.handler
from temporalio import activity, workflow
from temporalio.common import VersioningBehavior

with workflow.unsafe.imports_passed_through():
    import common
    from temporalio import nexus as tnexus

STORED_KINDS = [
    "endpoint-desc",
    "nexus-sync-input",
    "nexus-sync-result",
    "nexus-wf-input",
    "nexus-wf-result",
    "nexus-failure-msg",
    "sws-input",
    "sws-signal",
    "memo-keep",
    "memo-drop",
    "memo-added",
    "uws-input",
    "uws-arg",
    "uws-result",
    "sa-input",
    "sa-result",
    "sno-input",
    "sno-result",
    "sched-input",
    "batch-signal",
    "deploy-meta",
]


def rev(s: Any) -> str:
    return str(s)[::-1]


def strip(s: Any, kind: str) -> Optional[str]:
    suffix = f"-{kind}"
    return s[: -len(suffix)] if isinstance(s, str) and s.endswith(suffix) else None


# ----------------------------------------------------------------------------- Nexus service
@nexusrpc.service
class MarkerService:
    echo: nexusrpc.Operation[str, str]
    run_workflow: nexusrpc.Operation[str, str]
    fail: nexusrpc.Operation[str, str]
    wait_forever: nexusrpc.Operation[str, str]


@workflow.defn
class NexusHandlerWorkflow:
    @workflow.run
    async def run(self, arg: str) -> str:
        m = strip(arg, "nexus-wf-input")
        return f"{m}-nexus-wf-result" if m is not None else "bad:" + rev(arg)


@workflow.defn
class WaitForeverWorkflow:
    @workflow.run
    async def run(self, arg: str) -> str:
        await workflow.wait_condition(lambda: False)
        return arg


@nexusrpc.handler.service_handler(service=MarkerService)
class MarkerServiceHandler:
    @nexusrpc.handler.sync_operation
    async def echo(self, ctx: nexusrpc.handler.StartOperationContext, arg: str) -> str:
        # "M-K-input" -> "M-K-result" (K: nexus-sync from a workflow, sno standalone).
        stem = strip(arg, "input")
        return f"{stem}-result" if stem is not None else "bad:" + rev(arg)

    @tnexus.workflow_run_operation
    async def run_workflow(
        self, ctx: tnexus.WorkflowRunOperationContext, arg: str
    ) -> tnexus.WorkflowHandle[str]:
        return await ctx.start_workflow(
            NexusHandlerWorkflow.run, arg, id=f"nexus-handler-{uuid.uuid4().hex[:10]}"
        )

    @nexusrpc.handler.sync_operation
    async def fail(self, ctx: nexusrpc.handler.StartOperationContext, arg: str) -> str:
        from temporalio.exceptions import ApplicationError

        raise ApplicationError(f"{arg}-nexus-failure-msg", non_retryable=True)

    @tnexus.workflow_run_operation
    async def wait_forever(
        self, ctx: tnexus.WorkflowRunOperationContext, arg: str
    ) -> tnexus.WorkflowHandle[str]:
        return await ctx.start_workflow(
            WaitForeverWorkflow.run, arg, id=f"nexus-wait-{uuid.uuid4().hex[:10]}"
        )


@workflow.defn
class NexusCallerWorkflow:
    """Calls each operation; returns what it saw (reversed where a marker comes back)."""

    @workflow.run
    async def run(self, endpoint: str, m: str) -> dict:
        client = workflow.create_nexus_client(service=MarkerService, endpoint=endpoint)
        seen: dict = {}
        seen["sync"] = rev(
            await client.execute_operation(MarkerService.echo, f"{m}-nexus-sync-input")
        )
        seen["workflow"] = rev(
            await client.execute_operation(MarkerService.run_workflow, f"{m}-nexus-wf-input")
        )
        try:
            await client.execute_operation(MarkerService.fail, m)
            seen["failure"] = "did not fail"
        except Exception as e:  # noqa: BLE001 - report the chain of types and messages
            chain = []
            cause: Optional[BaseException] = e
            while cause is not None and len(chain) < 5:
                chain.append([type(cause).__name__, rev(getattr(cause, "message", str(cause)))])
                cause = cause.__cause__
            seen["failure"] = chain
        handle = await client.start_operation(MarkerService.wait_forever, "waiting")
        handle.cancel()
        try:
            await handle
            seen["cancel"] = "not cancelled"
        except Exception as e:  # noqa: BLE001
            seen["cancel"] = [type(e).__name__, type(e.__cause__).__name__]
        return seen


# ----------------------------------------------------------------------------- system Nexus
@workflow.defn
class SwsTargetWorkflow:
    def __init__(self) -> None:
        self._signal: Optional[str] = None

    @workflow.run
    async def run(self, arg: str) -> str:
        await workflow.wait_condition(lambda: self._signal is not None)
        return rev(arg) + "|" + rev(self._signal)

    @workflow.signal
    def poke(self, value: str) -> None:
        self._signal = value


@workflow.defn
class SwsStarterWorkflow:
    @workflow.run
    async def run(self, target_id: str, m: str) -> str:
        handle = await workflow.signal_with_start_workflow(
            SwsTargetWorkflow.run,
            f"{m}-sws-input",
            id=target_id,
            task_queue=workflow.info().task_queue,
            signal=SwsTargetWorkflow.poke,
            signal_args=f"{m}-sws-signal",
        )
        return "started" if handle.run_id else "no run id"


# ----------------------------------------------------------------------------- memo
@workflow.defn
class MemoWorkflow:
    def __init__(self) -> None:
        self._go = False

    @workflow.run
    async def run(self, m: str) -> list:
        workflow.upsert_memo({"drop": None, "added": f"{m}-memo-added"})
        await workflow.wait_condition(lambda: self._go)
        return sorted(workflow.memo().keys())

    @workflow.signal
    def go(self) -> None:
        self._go = True


# ----------------------------------------------------------------------------- update-with-start
@workflow.defn
class UwsWorkflow:
    def __init__(self) -> None:
        self._arg: Optional[str] = None

    @workflow.run
    async def run(self, arg: str) -> str:
        await workflow.wait_condition(lambda: self._arg is not None)
        return rev(arg)

    @workflow.update
    def set_arg(self, arg: str) -> str:
        self._arg = arg
        m = strip(arg, "uws-arg")
        return f"{m}-uws-result" if m is not None else "bad:" + rev(arg)


# ----------------------------------------------------------------------------- activities
@activity.defn
async def sa_echo(arg: str) -> str:
    m = strip(arg, "sa-input")
    return f"{m}-sa-result" if m is not None else "bad:" + rev(arg)


_release = asyncio.Event()


@activity.defn
async def held_activity(arg: str) -> str:
    """Heartbeats until the client releases it (pause, unpause, update options and reset run
    on it meanwhile)."""
    while not _release.is_set():
        activity.heartbeat()
        await asyncio.sleep(0.2)
    return arg


@activity.defn
async def async_completed() -> str:
    activity.raise_complete_async()


@workflow.defn
class HeldActivityWorkflow:
    @workflow.run
    async def run(self) -> str:
        return await workflow.execute_activity(
            held_activity,
            "released",
            activity_id="held",
            start_to_close_timeout=timedelta(seconds=60),
            heartbeat_timeout=timedelta(seconds=10),
        )


@workflow.defn
class BatchTargetWorkflow:
    def __init__(self) -> None:
        self._signals: list = []

    @workflow.run
    async def run(self) -> str:
        await workflow.wait_condition(lambda: len(self._signals) > 0)
        return rev(self._signals[0])

    @workflow.signal
    def batch(self, value: str) -> None:
        self._signals.append(value)


@workflow.defn(versioning_behavior=VersioningBehavior.PINNED)
class VersionedWorkflow:
    @workflow.run
    async def run(self) -> str:
        return "versioned"


# ----------------------------------------------------------------------------- helpers
def code_of(e: BaseException) -> str:
    from temporalio.service import RPCError

    if isinstance(e, RPCError):
        return f"rpc:{e.status.name}"
    return type(e).__name__


async def step(results: dict, errors: dict, name: str, coro) -> Any:
    """Runs one step; records its value, or its error (as a comparable code) and details."""
    try:
        value = await coro
        results[name] = value
        return value
    except Exception as e:  # noqa: BLE001 - every error is a result to compare
        results[name] = {"error": code_of(e)}
        errors[name] = f"{type(e).__name__}: {e}"
        traceback.print_exc(file=sys.stderr)
        return None


async def eventually(fn, timeout: float = 20.0, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    while True:
        value = await fn()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(interval)


# ----------------------------------------------------------------------------- the run
async def run(args: argparse.Namespace, results: dict, errors: dict, info: dict) -> None:
    from google.protobuf import duration_pb2
    from temporalio.api.batch.v1 import BatchOperationSignal
    from temporalio.api.common.v1 import Payload, Payloads, WorkflowExecution
    from temporalio.api.deployment.v1 import WorkerDeploymentVersion as DeploymentVersionProto
    from temporalio.api.enums.v1 import TaskQueueType
    from temporalio.api.nexus.v1 import EndpointSpec, EndpointTarget
    from temporalio.api.operatorservice.v1 import (
        DeleteNexusEndpointRequest,
        GetNexusEndpointRequest,
        ListNexusEndpointsRequest,
        UpdateNexusEndpointRequest,
    )
    from temporalio.api.taskqueue.v1 import TaskQueue
    from temporalio.api.workflowservice.v1 import (
        DescribeBatchOperationRequest,
        DescribeWorkerDeploymentRequest,
        DescribeWorkerDeploymentVersionRequest,
        ListBatchOperationsRequest,
        ListWorkerDeploymentsRequest,
        PauseActivityRequest,
        ResetActivityRequest,
        SetWorkerDeploymentCurrentVersionRequest,
        StartBatchOperationRequest,
        UnpauseActivityRequest,
        UpdateActivityOptionsRequest,
        UpdateTaskQueueConfigRequest,
        UpdateWorkerDeploymentVersionMetadataRequest,
    )
    from temporalio.api.activity.v1 import ActivityOptions
    from temporalio.client import (
        ActivityOptionsKeys,
        Schedule,
        ScheduleActionStartWorkflow,
        ScheduleIntervalSpec,
        ScheduleSpec,
        ScheduleState,
        ScheduleUpdate,
        WithStartWorkflowOperation,
    )
    from temporalio.common import WorkerDeploymentVersion, WorkflowIDConflictPolicy
    from temporalio.testing import WorkflowEnvironment
    from temporalio.worker import Worker, WorkerDeploymentConfig
    from google.protobuf import field_mask_pb2

    M = args.marker
    mk = lambda kind: f"{M}-{kind}"  # noqa: E731
    json_payload = lambda text: Payload(  # noqa: E731
        metadata={"encoding": b"json/plain"}, data=f'"{text}"'.encode()
    )
    client = await common.connect(args)
    ns = args.namespace
    suffix = uuid.uuid4().hex[:10]
    tq = f"surface-{suffix}"
    dc = client.data_converter.payload_converter

    sections = set(args.only.split(",")) if args.only else None
    want = lambda name: sections is None or name in sections  # noqa: E731

    # --- Nexus endpoint management: the SDK's helper, then the raw OperatorService.
    endpoint_name = f"surface-{suffix}"
    endpoint = None
    if want("endpoints"):
        env = WorkflowEnvironment.from_client(client)
        endpoint = await env.create_nexus_endpoint(endpoint_name, tq)
        info["endpoint_id"] = endpoint.id
        results["endpoint.created"] = [endpoint.spec.name == endpoint_name, endpoint.spec.HasField("description")]
        spec = EndpointSpec()
        spec.CopyFrom(endpoint.spec)
        spec.description.CopyFrom(json_payload(mk("endpoint-desc")))
        updated = await client.operator_service.update_nexus_endpoint(
            UpdateNexusEndpointRequest(id=endpoint.id, version=endpoint.version, spec=spec)
        )
        got = await client.operator_service.get_nexus_endpoint(GetNexusEndpointRequest(id=endpoint.id))
        results["endpoint.get"] = [
            updated.endpoint.spec.description.data.decode(),
            dict(got.endpoint.spec.description.metadata).get("encoding", b"").decode(),
            got.endpoint.spec.description.data.decode(),
            got.endpoint.spec.target.worker.task_queue == tq,
        ]
        listed = await client.operator_service.list_nexus_endpoints(
            ListNexusEndpointsRequest(name=endpoint_name)
        )
        results["endpoint.list"] = [
            (e.spec.name == endpoint_name, e.spec.description.data.decode()) for e in listed.endpoints
        ]
        temp = await env.create_nexus_endpoint(f"surface-temp-{suffix}", tq)
        await env.delete_nexus_endpoint(temp)
        gone = await client.operator_service.list_nexus_endpoints(
            ListNexusEndpointsRequest(name=f"surface-temp-{suffix}")
        )
        results["endpoint.deleted"] = len(gone.endpoints)

    deployment = f"surface-deploy-{suffix}"
    version = WorkerDeploymentVersion(deployment_name=deployment, build_id="build-1")
    workers = contextlib.AsyncExitStack()
    await workers.enter_async_context(Worker(
        client,
        task_queue=tq,
        workflows=[
            NexusHandlerWorkflow,
            WaitForeverWorkflow,
            NexusCallerWorkflow,
            SwsTargetWorkflow,
            SwsStarterWorkflow,
            MemoWorkflow,
            UwsWorkflow,
            HeldActivityWorkflow,
            BatchTargetWorkflow,
        ],
        activities=[sa_echo, held_activity, async_completed],
        nexus_service_handlers=[MarkerServiceHandler()],
    ))
    if want("deploy"):
        await workers.enter_async_context(Worker(
            client,
            task_queue=f"{tq}-versioned",
            workflows=[VersionedWorkflow],
            deployment_config=WorkerDeploymentConfig(
                version=version, use_worker_versioning=True
            ),
        ))
    async with workers:
        # --- Nexus operations from a workflow.
        if want("nexus"):
            await step(
                results,
                errors,
                "nexus.operations",
                client.execute_workflow(
                    NexusCallerWorkflow.run,
                    args=[endpoint_name, M],
                    id=f"nexus-caller-{suffix}",
                    task_queue=tq,
                    execution_timeout=timedelta(seconds=60),
                ),
            )

        # --- Signal-with-start from a workflow (the system Nexus endpoint).
        if want("sws"):
            target = f"sws-target-{suffix}"
            await step(
                results,
                errors,
                "sws.starter",
                client.execute_workflow(
                    SwsStarterWorkflow.run,
                    args=[target, M],
                    id=f"sws-starter-{suffix}",
                    task_queue=tq,
                    execution_timeout=timedelta(seconds=30),
                ),
            )
            await step(
                results,
                errors,
                "sws.target",
                client.get_workflow_handle(target).result(),
            )

        # --- Memo: upsert, then delete a key with a nil value.
        if want("memo"):
            memo_handle = await client.start_workflow(
                MemoWorkflow.run,
                M,
                id=f"memo-{suffix}",
                task_queue=tq,
                memo={"keep": mk("memo-keep"), "drop": mk("memo-drop")},
            )
            info["memo_workflow_id"] = memo_handle.id

            async def memo_keys():
                described = await memo_handle.describe()
                memo = await described.memo()
                return sorted(memo.keys()) if "drop" not in memo else None

            results["memo.described"] = await eventually(memo_keys)
            described = await memo_handle.describe()
            results["memo.values"] = {k: rev(v) for k, v in (await described.memo()).items()}
            await memo_handle.signal(MemoWorkflow.go)
            results["memo.in_workflow"] = await memo_handle.result()

        # --- Update-with-start.
        if want("uws"):
            start_op = WithStartWorkflowOperation(
                UwsWorkflow.run,
                mk("uws-input"),
                id=f"uws-{suffix}",
                task_queue=tq,
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            )
            await step(
                results,
                errors,
                "uws.update",
                client.execute_update_with_start_workflow(
                    UwsWorkflow.set_arg, mk("uws-arg"), start_workflow_operation=start_op
                ),
            )
            uws_handle = await start_op.workflow_handle()
            results["uws.result"] = rev(await uws_handle.result())

        # --- Standalone activities.
        if want("sa"):
            await step(
                results,
                errors,
                "sa.execute",
                client.execute_activity(
                    sa_echo,
                    mk("sa-input"),
                    id=f"sa-{suffix}",
                    task_queue=tq,
                    start_to_close_timeout=timedelta(seconds=20),
                ),
            )
            sa2 = await client.start_activity(
                held_activity,
                "held-standalone",
                id=f"sa-held-{suffix}",
                task_queue=tq,
                start_to_close_timeout=timedelta(seconds=60),
                heartbeat_timeout=timedelta(seconds=10),
            )

            async def sa_describe():
                d = await sa2.describe()
                return [d.status.name, d.activity_type]

            await step(results, errors, "sa.describe", sa_describe())
            await step(results, errors, "sa.pause", sa2.pause(reason="test"))
            await step(results, errors, "sa.unpause", sa2.unpause())
            await step(
                results,
                errors,
                "sa.update_options",
                _unit(
                    sa2.update_options(
                        [ActivityOptionsKeys.start_to_close_timeout.value_set(timedelta(seconds=90))]
                    )
                ),
            )
            await step(results, errors, "sa.cancel", sa2.cancel(reason="test"))
            sa3 = await client.start_activity(
                async_completed,
                id=f"sa-async-{suffix}",
                task_queue=tq,
                start_to_close_timeout=timedelta(seconds=60),
            )

            async def sa3_started():
                d = await sa3.describe()
                return d.attempt >= 1 and d.run_state is not None and d.run_state.name == "STARTED"

            await eventually(sa3_started)
            async_handle = client.get_async_activity_handle(activity_id=f"sa-async-{suffix}")
            await step(results, errors, "sa.heartbeat_by_id", async_handle.heartbeat("beat"))
            await step(results, errors, "sa.complete_by_id", async_handle.complete("done"))
            await step(results, errors, "sa.async_result", sa3.result())
            sa4 = await client.start_activity(
                held_activity,
                "terminated",
                id=f"sa-term-{suffix}",
                task_queue=tq,
                start_to_close_timeout=timedelta(seconds=60),
            )
            await step(results, errors, "sa.terminate", sa4.terminate(reason="test"))

            async def sa_list():
                return [
                    a.activity_id async for a in client.list_activities(f"ActivityId = 'sa-{suffix}'")
                ]

            results["sa.list"] = len(await eventually(sa_list))
            await step(
                results,
                errors,
                "sa.count",
                _count(client.count_activities(f"ActivityId = 'sa-{suffix}'")),
            )

        # --- Standalone Nexus operations.
        if want("sno"):
            nexus_client = client.create_nexus_client(endpoint=endpoint_name, service=MarkerService)
            sno = await step(
                results,
                errors,
                "sno.execute",
                nexus_client.execute_operation(
                    MarkerService.echo,
                    mk("sno-input"),
                    id=f"sno-{suffix}",
                    schedule_to_close_timeout=timedelta(seconds=30),
                ),
            )
            if isinstance(sno, str):
                results["sno.execute"] = rev(sno)
            await step(
                results,
                errors,
                "sno.count",
                _count(client.count_nexus_operations(f"OperationId = 'sno-{suffix}'")),
            )

        # --- Schedules.
        if want("sched"):
            sched_id = f"sched-{suffix}"
            sched = await client.create_schedule(
                sched_id,
                Schedule(
                    action=ScheduleActionStartWorkflow(
                        BatchTargetWorkflow.run,
                        id=f"sched-wf-{suffix}",
                        task_queue=tq,
                        memo={"input": mk("sched-input")},
                    ),
                    spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=timedelta(days=1))]),
                    state=ScheduleState(paused=True, note="surface"),
                ),
            )
            d = await sched.describe()
            action = d.schedule.action
            memo_value = (
                (action.memo or {}).get("input")
                if isinstance(action, ScheduleActionStartWorkflow)
                else None
            )
            if isinstance(memo_value, Payload):
                memo_value = dc.from_payloads([memo_value])[0]
            results["sched.describe"] = [rev(memo_value), d.schedule.state.paused]

            def updater(input):
                input.description.schedule.state.note = "updated"
                return ScheduleUpdate(schedule=input.description.schedule)

            await step(results, errors, "sched.update", sched.update(updater))
            await step(results, errors, "sched.unpause", sched.unpause())
            await step(results, errors, "sched.pause", sched.pause())
            await step(results, errors, "sched.trigger", sched.trigger())

            async def sched_listed():
                return [s.id async for s in await client.list_schedules() if s.id == sched_id]

            results["sched.list"] = len(await eventually(sched_listed))

            # The schedule applies pause and unpause asynchronously: a describe right after
            # them may still show the unpause (seen once in a direct run). Wait for the last.
            async def sched_paused_again():
                d = await sched.describe()
                state = [d.schedule.state.note, d.schedule.state.paused]
                return state if state[1] else None

            results["sched.after"] = await eventually(sched_paused_again)
            await step(results, errors, "sched.delete", sched.delete())

        # --- Batch operation: a signal to a workflow.
        if want("batch"):
            batch_target = await client.start_workflow(
                BatchTargetWorkflow.run, id=f"batch-target-{suffix}", task_queue=tq
            )
            job = f"batch-{suffix}"
            await step(
                results,
                errors,
                "batch.start",
                _unit(
                    client.workflow_service.start_batch_operation(
                        StartBatchOperationRequest(
                            namespace=ns,
                            job_id=job,
                            reason="surface",
                            executions=[WorkflowExecution(workflow_id=f"batch-target-{suffix}")],
                            signal_operation=BatchOperationSignal(
                                signal="batch",
                                input=Payloads(payloads=[json_payload(mk("batch-signal"))]),
                                identity="surface",
                            ),
                        )
                    )
                ),
            )
            results["batch.target"] = rev(
                await asyncio.wait_for(batch_target.result(), timeout=30)
            )

            async def batch_described():
                d = await client.workflow_service.describe_batch_operation(
                    DescribeBatchOperationRequest(namespace=ns, job_id=job)
                )
                return d.state if d.state != 1 else None  # not RUNNING

            results["batch.state"] = await eventually(batch_described)
            # Listed from visibility, which is eventually consistent: ask until it shows the job.
            async def batch_listed():
                listed = await client.workflow_service.list_batch_operations(
                    ListBatchOperationsRequest(namespace=ns)
                )
                return any(o.job_id == job for o in listed.operation_info)

            results["batch.listed"] = await eventually(batch_listed)

        # --- Activity operations on a workflow's activity.
        if want("activity"):
            held = await client.start_workflow(
                HeldActivityWorkflow.run, id=f"held-{suffix}", task_queue=tq
            )

            async def held_running():
                d = await held.describe()
                return [a for a in d.raw_description.pending_activities if a.activity_id == "held"]

            await eventually(held_running)
            execution = WorkflowExecution(workflow_id=f"held-{suffix}")
            await step(
                results,
                errors,
                "activity.pause",
                _unit(
                    client.workflow_service.pause_activity(
                        PauseActivityRequest(namespace=ns, execution=execution, id="held", identity="surface")
                    )
                ),
            )
            await step(
                results,
                errors,
                "activity.update_options",
                _unit(
                    client.workflow_service.update_activity_options(
                        UpdateActivityOptionsRequest(
                            namespace=ns,
                            execution=execution,
                            id="held",
                            activity_options=ActivityOptions(
                                start_to_close_timeout=duration_pb2.Duration(seconds=120)
                            ),
                            update_mask=field_mask_pb2.FieldMask(paths=["start_to_close_timeout"]),
                            identity="surface",
                        )
                    )
                ),
            )
            await step(
                results,
                errors,
                "activity.unpause",
                _unit(
                    client.workflow_service.unpause_activity(
                        UnpauseActivityRequest(namespace=ns, execution=execution, id="held", identity="surface")
                    )
                ),
            )
            await step(
                results,
                errors,
                "activity.reset",
                _unit(
                    client.workflow_service.reset_activity(
                        ResetActivityRequest(namespace=ns, execution=execution, id="held", identity="surface")
                    )
                ),
            )
            _release.set()
            results["activity.result"] = await asyncio.wait_for(held.result(), timeout=40)

        # --- Task queue configuration.
        if want("taskqueue"):
            await step(
                results,
                errors,
                "taskqueue.config",
                _unit(
                    client.workflow_service.update_task_queue_config(
                        UpdateTaskQueueConfigRequest(
                            namespace=ns,
                            identity="surface",
                            task_queue=tq,
                            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
                            update_queue_rate_limit=UpdateTaskQueueConfigRequest.RateLimitUpdate(
                                reason="surface"
                            ),
                        )
                    )
                ),
            )

        # --- Worker deployments (the versioned worker registered the version).
        if want("deploy"):
            async def version_known():
                try:
                    d = await client.workflow_service.describe_worker_deployment(
                        DescribeWorkerDeploymentRequest(namespace=ns, deployment_name=deployment)
                    )
                    return len(d.worker_deployment_info.version_summaries) > 0
                except Exception:  # noqa: BLE001 - not there yet
                    return False

            results["deploy.registered"] = await eventually(version_known, timeout=30)
            dv = DeploymentVersionProto(deployment_name=deployment, build_id="build-1")
            await step(
                results,
                errors,
                "deploy.set_current",
                _unit(
                    client.workflow_service.set_worker_deployment_current_version(
                        SetWorkerDeploymentCurrentVersionRequest(
                            namespace=ns,
                            deployment_name=deployment,
                            build_id="build-1",
                            identity="surface",
                        )
                    )
                ),
            )
            await step(
                results,
                errors,
                "deploy.metadata",
                _unit(
                    client.workflow_service.update_worker_deployment_version_metadata(
                        UpdateWorkerDeploymentVersionMetadataRequest(
                            namespace=ns,
                            deployment_version=dv,
                            upsert_entries={"note": json_payload(mk("deploy-meta"))},
                            identity="surface",
                        )
                    )
                ),
            )

            async def described_version():
                d = await client.workflow_service.describe_worker_deployment_version(
                    DescribeWorkerDeploymentVersionRequest(namespace=ns, deployment_version=dv)
                )
                entries = d.worker_deployment_version_info.metadata.entries
                return {k: rev(v.data.decode()) for k, v in entries.items()}

            await step(results, errors, "deploy.describe_version", described_version())
            # The list comes from visibility, which is eventually consistent: ask until it
            # shows the deployment.
            async def deployment_listed():
                deployments = await client.workflow_service.list_worker_deployments(
                    ListWorkerDeploymentsRequest(namespace=ns)
                )
                return any(d.name == deployment for d in deployments.worker_deployments)

            results["deploy.listed"] = await eventually(deployment_listed)
            results["deploy.run"] = await client.execute_workflow(
                VersionedWorkflow.run, id=f"versioned-{suffix}", task_queue=f"{tq}-versioned"
            )

        # --- Deprecated build-id compatibility APIs: whatever the server says.
        if want("buildid"):
            await step(
                results,
                errors,
                "buildid.get",
                _unit(client.get_worker_build_id_compatibility(tq)),
            )
            await step(
                results,
                errors,
                "buildid.reachability",
                _unit(client.get_worker_task_reachability(["build-1"], [tq])),
            )

    if args.delete_endpoint and endpoint is not None:
        got = await client.operator_service.get_nexus_endpoint(
            GetNexusEndpointRequest(id=endpoint.id)
        )
        await client.operator_service.delete_nexus_endpoint(
            DeleteNexusEndpointRequest(id=endpoint.id, version=got.endpoint.version)
        )


async def _unit(coro) -> str:
    await coro
    return "ok"


async def _count(coro) -> int:
    counted = await coro
    return getattr(counted, "count", counted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_connection_args(parser)
    parser.add_argument("--marker", required=True)
    parser.add_argument("--timeout", type=float, default=150.0)
    parser.add_argument("--delete-endpoint", action="store_true")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated sections to run (endpoints, nexus, sws, memo, uws, sa, sno, "
        "sched, batch, activity, taskqueue, deploy, buildid); default all",
    )
    args = parser.parse_args()
    results: dict = {}
    errors: dict = {}
    info: dict = {}
    started = time.monotonic()
    error = None
    try:
        asyncio.run(asyncio.wait_for(run(args, results, errors, info), args.timeout))
    except BaseException as e:  # noqa: BLE001
        error = f"{type(e).__name__}: {e}"
        traceback.print_exc(file=sys.stderr)
    common.finish(
        error is None,
        {
            "results": results,
            "errors": errors,
            "stored_kinds": STORED_KINDS,
            "marker": args.marker,
            "elapsed_s": round(time.monotonic() - started, 3),
            **info,
            **({"error": error} if error else {}),
        },
    )


if __name__ == "__main__":
    main()
