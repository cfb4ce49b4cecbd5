#!/usr/bin/env python3
"""Puts a marker string into every kind of Temporal payload and checks each round-trips.

For every payload kind K (see KINDS) the exact string f"{M}-{K}" travels through
that kind of payload only. Wherever a value has to come back to the client
inside another payload (e.g. an activity result reported in the workflow
result), it travels REVERSED, so a grep for "M-K" in the server's database
only hits the payload kind K itself. The client reverses it and compares it
exactly, which proves the value was decoded correctly (e.g. through the proxy).

Usage:
  markers.py --address HOST:PORT --marker M [--namespace NS] [--task-queue TQ]
             [--timeout SECONDS]
             [--ca CA.pem [--cert CLIENT.pem --key CLIENT.key]] [--server-name NAME]
             [--grpc-compression gzip|none]

Workflow IDs, the task queue and the schedule ID never contain M (they are
plaintext by design). The schedule is created paused and deliberately left in
place so that its stored action input can be inspected.

Prints one JSON line: {"ok": bool, "checks": {name: bool}, "kinds": [...],
"stored_kinds": [...], "plaintext_kinds": [...], "unstored_kinds": [...],
"workflow_ids": [...], "schedule_id": ..., ...}. Exit code 0 only if every
check passed.
"""
from __future__ import annotations

import argparse
import asyncio
import contextvars
import sys
import time
import traceback
import uuid
from datetime import timedelta
from typing import Any, Optional

from temporalio import activity, workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    ApplicationErrorCategory,
    TimeoutError as TemporalTimeoutError,
    TimeoutType,
)
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
    StartActivityInput,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
    WorkflowOutboundInterceptor,
)

with workflow.unsafe.imports_passed_through():
    import common

# Every payload kind exercised; the marker for kind K is f"{M}-{K}".
KINDS = [
    "wf-input", "wf-result",
    "act-input", "act-result", "heartbeat",
    "signal", "query-arg", "query-result", "update-arg", "update-result", "update-rejection",
    "memo", "search-attr",
    "child-input", "child-result",
    "can-input",
    "failure-msg", "failure-details",
    "header",
    "schedule-input",
    "local-act-result",
    "wf-failure-msg",
]
# Never persisted by the server (queries are answered live by the worker; a rejected update
# leaves no trace in history).
UNSTORED_KINDS = ["query-arg", "query-result", "update-rejection"]
# Stored in plaintext by design: the server must index search attributes.
PLAINTEXT_KINDS = ["search-attr"]
# Expected in the server's database when run directly (verified with grep against
# a dev server's SQLite file): everything else.
STORED_KINDS = [k for k in KINDS if k not in UNSTORED_KINDS and k not in PLAINTEXT_KINDS]

HEADER_KEY = "portcullis-marker"
SEARCH_ATTR = "CustomKeywordField"
HEARTBEAT_TIMEOUT = timedelta(seconds=1)


def rev(s: Any) -> str:
    return str(s)[::-1]


def strip_suffix(s: str, kind: str) -> Optional[str]:
    """Returns M if s == f"{M}-{kind}", else None."""
    suffix = f"-{kind}"
    return s[: -len(suffix)] if isinstance(s, str) and s.endswith(suffix) else None


# --------------------------------------------------------------------------- header interceptors
# The workflow adds a header payload f"{M}-header" when scheduling header_probe;
# the activity-side interceptor decodes it and hands it to the activity.
_HEADER_SEEN: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "portcullis_marker_header", default=None
)


class _HeaderWorkflowOutbound(WorkflowOutboundInterceptor):
    def start_activity(self, input: StartActivityInput):
        if input.activity == "header_probe" and input.args:
            payload = workflow.payload_converter().to_payloads([f"{input.args[0]}-header"])[0]
            input.headers = {**input.headers, HEADER_KEY: payload}
        return super().start_activity(input)


class _HeaderWorkflowInbound(WorkflowInboundInterceptor):
    def init(self, outbound: WorkflowOutboundInterceptor) -> None:
        super().init(_HeaderWorkflowOutbound(outbound))


class _HeaderActivityInbound(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        payload = input.headers.get(HEADER_KEY) if input.headers else None
        if payload is not None:
            from temporalio.converter import DataConverter

            _HEADER_SEEN.set(DataConverter.default.payload_converter.from_payloads([payload])[0])
        return await super().execute_activity(input)


class HeaderInterceptor(Interceptor):
    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _HeaderActivityInbound(next)

    def workflow_interceptor_class(self, input: WorkflowInterceptorClassInput):
        return _HeaderWorkflowInbound


# --------------------------------------------------------------------------- activities
@activity.defn
async def act_echo(arg: str) -> str:
    m = strip_suffix(arg, "act-input")
    return f"{m}-act-result" if m is not None else "bad-act-input:" + rev(arg)


@activity.defn
async def heartbeat_probe(m: str) -> None:
    """Attempt 1 heartbeats the marker and fails (retryable). Attempt 2 checks the
    details came back, then never heartbeats so the server times it out
    (HEARTBEAT): the final timeout failure carries the details into history."""
    info = activity.info()
    expected = f"{m}-heartbeat"
    if info.attempt == 1:
        activity.heartbeat(expected)
        await asyncio.sleep(0.3)  # let the heartbeat reach the server
        raise ApplicationError(
            "deliberate first-attempt failure",
            category=ApplicationErrorCategory.BENIGN,
        )
    details = list(info.heartbeat_details)
    if details != [expected]:
        raise ApplicationError(
            "heartbeat details mismatch: " + rev(details), non_retryable=True
        )
    # Leave without completing (async completion that never comes): no late
    # completion for the worker to report, and the server times it out.
    activity.raise_complete_async()


@activity.defn
async def fail_probe(m: str) -> None:
    # BENIGN: expected, so the worker does not log it (with the marker) to stderr.
    raise ApplicationError(
        f"{m}-failure-msg", f"{m}-failure-details",
        non_retryable=True, category=ApplicationErrorCategory.BENIGN,
    )


@activity.defn
async def local_probe(m: str) -> str:
    return f"{m}-local-act-result"


@activity.defn
async def header_probe(m: str) -> str:
    seen = _HEADER_SEEN.get()
    return rev(seen) if seen is not None else "no-header"


# --------------------------------------------------------------------------- workflows
@workflow.defn
class MarkersChildWorkflow:
    @workflow.run
    async def run(self, arg: str) -> str:
        m = strip_suffix(arg, "child-input")
        return f"{m}-child-result" if m is not None else "bad-child-input:" + rev(arg)


@workflow.defn
class MarkersFailWorkflow:
    @workflow.run
    async def run(self, m: str) -> None:
        raise ApplicationError(
            f"{m}-wf-failure-msg", non_retryable=True, category=ApplicationErrorCategory.BENIGN
        )


@workflow.defn
class MarkersWorkflow:
    """Run 1 (input f"{M}-wf-input") continues as new with (rev(input), f"{M}-can-input").
    Run 2 does everything else and returns {"marker": f"{M}-wf-result", "seen": {kind: rev(value)}}."""

    def __init__(self) -> None:
        self._m: Optional[str] = None
        self._status = "starting"
        self._signal: Optional[str] = None
        self._update_arg: Optional[str] = None

    @workflow.run
    async def run(self, first: str, can: Optional[str] = None) -> dict:
        if can is None:
            m = strip_suffix(first, "wf-input")
            workflow.continue_as_new(args=[rev(first), f"{m}-can-input"])
        m = strip_suffix(can, "can-input")
        self._m = m
        seen: dict = {"wf-input": first, "can-input": rev(can)}
        self._status = "running"

        act_timeout = timedelta(seconds=10)
        act_result, heartbeat, failure, local_result, header, child_result = (
            await asyncio.gather(
                workflow.execute_activity(
                    act_echo, f"{m}-act-input", start_to_close_timeout=act_timeout
                ),
                self._heartbeat(m),
                self._failure(m),
                workflow.execute_local_activity(
                    local_probe, m, start_to_close_timeout=act_timeout
                ),
                workflow.execute_activity(
                    header_probe, m, start_to_close_timeout=act_timeout
                ),
                workflow.execute_child_workflow(
                    MarkersChildWorkflow.run,
                    f"{m}-child-input",
                    id=f"{workflow.info().workflow_id}-child",
                    execution_timeout=timedelta(seconds=60),
                ),
            )
        )
        seen["act-result"] = rev(act_result)
        seen["heartbeat"] = heartbeat
        seen["failure-msg"], seen["failure-details"] = failure
        seen["local-act-result"] = rev(local_result)
        seen["header"] = header  # already reversed by the activity
        seen["child-result"] = rev(child_result)

        self._status = "waiting"
        await workflow.wait_condition(
            lambda: self._signal is not None and self._update_arg is not None
        )
        seen["signal"] = rev(self._signal)
        seen["update-arg"] = rev(self._update_arg)
        self._status = "done"
        return {"marker": f"{m}-wf-result", "seen": seen}

    async def _heartbeat(self, m: str) -> str:
        try:
            await workflow.execute_activity(
                heartbeat_probe,
                m,
                start_to_close_timeout=timedelta(seconds=20),
                heartbeat_timeout=HEARTBEAT_TIMEOUT,
                retry_policy=RetryPolicy(
                    initial_interval=timedelta(milliseconds=100), maximum_attempts=2
                ),
            )
        except ActivityError as e:
            c = e.cause
            if isinstance(c, TemporalTimeoutError) and c.type == TimeoutType.HEARTBEAT:
                details = list(c.last_heartbeat_details)
                if len(details) == 1:
                    return rev(details[0])
                return "bad-heartbeat-details:" + rev(details)
            return f"unexpected-heartbeat-failure:{type(c).__name__}:" + rev(getattr(c, "message", c))
        return "heartbeat-activity-did-not-time-out"

    async def _failure(self, m: str) -> list:
        try:
            await workflow.execute_activity(
                fail_probe, m, start_to_close_timeout=timedelta(seconds=10)
            )
        except ActivityError as e:
            c = e.cause
            if isinstance(c, ApplicationError):
                return [rev(c.message), rev(c.details[0] if len(c.details) == 1 else list(c.details))]
            return ["unexpected-failure:" + type(c).__name__, ""]
        return ["fail-probe-did-not-fail", ""]

    @workflow.signal
    def marker_signal(self, arg: str) -> None:
        self._signal = arg

    @workflow.query
    def status(self) -> str:
        return self._status

    @workflow.query
    def echo(self, arg: str) -> str:
        if self._m is not None and arg == f"{self._m}-query-arg":
            return f"{self._m}-query-result"
        return "bad-query-arg:" + rev(arg)

    @workflow.update
    def marker_update(self, arg: str) -> str:
        self._update_arg = arg
        if self._m is not None and arg == f"{self._m}-update-arg":
            return f"{self._m}-update-result"
        return "bad-update-arg:" + rev(arg)

    @workflow.update
    def rejectable_update(self, arg: str) -> str:
        return "accepted"

    @rejectable_update.validator
    def reject(self, arg: str) -> None:
        # The marker travels only in the rejection (the argument carries it reversed).
        raise ApplicationError(rev(arg))


# --------------------------------------------------------------------------- client side
async def ensure_search_attribute(client, namespace: str) -> bool:
    """Registers the Keyword search attribute SEARCH_ATTR if the namespace lacks it
    (recent dev servers have no CustomKeywordField by default; starting the server
    with `--search-attribute CustomKeywordField=Keyword` avoids this step, which
    needs the OperatorService). Returns True if it had to register it."""
    from temporalio.api.enums.v1 import IndexedValueType
    from temporalio.api.operatorservice.v1 import (
        AddSearchAttributesRequest,
        ListSearchAttributesRequest,
    )

    listed = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=namespace)
    )
    if SEARCH_ATTR in listed.custom_attributes or SEARCH_ATTR in listed.system_attributes:
        return False
    await client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace=namespace,
            search_attributes={SEARCH_ATTR: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD},
        )
    )
    return True


async def run_markers(args: argparse.Namespace, checks: dict, info: dict) -> None:
    from temporalio.client import (
        Client,
        Schedule,
        ScheduleActionStartWorkflow,
        ScheduleIntervalSpec,
        ScheduleSpec,
        ScheduleState,
        WorkflowFailureError,
    )
    from temporalio.service import RPCError
    from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes
    from temporalio.worker import Worker

    M = args.marker
    mk = lambda kind: f"{M}-{kind}"  # noqa: E731
    client: Client = await common.connect(args)
    checks["connected"] = True
    suffix = uuid.uuid4().hex[:12]
    wf_id = f"markers-wf-{suffix}"
    fail_id = f"markers-fail-{suffix}"
    sched_id = f"markers-sched-{suffix}"
    info["workflow_ids"] = [wf_id, f"{wf_id}-child", fail_id]
    info["schedule_id"] = sched_id
    tq = args.task_queue
    kw_key = SearchAttributeKey.for_keyword(SEARCH_ATTR)

    async with Worker(
        client,
        task_queue=tq,
        workflows=[MarkersWorkflow, MarkersChildWorkflow, MarkersFailWorkflow],
        activities=[act_echo, heartbeat_probe, fail_probe, local_probe, header_probe],
        interceptors=[HeaderInterceptor()],
    ):
        try:
            info["search_attribute_registered"] = await ensure_search_attribute(client, args.namespace)
        except RPCError as e:  # e.g. OperatorService not reachable; start may still work
            info["search_attribute_registration_error"] = str(e)
        deadline = time.monotonic() + 20
        while True:
            try:
                handle = await client.start_workflow(
                    MarkersWorkflow.run,
                    mk("wf-input"),
                    id=wf_id,
                    task_queue=tq,
                    execution_timeout=timedelta(seconds=args.timeout),
                    memo={"marker": mk("memo")},
                    search_attributes=TypedSearchAttributes(
                        [SearchAttributePair(kw_key, mk("search-attr"))]
                    ),
                )
                break
            except RPCError as e:
                # A freshly registered search attribute needs the namespace cache refreshed.
                if "no mapping defined for search attribute" not in str(e) or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
        first_run = handle.first_execution_run_id

        # The second workflow: fails with the marker as its message.
        fail_handle = await client.start_workflow(
            MarkersFailWorkflow.run, M, id=fail_id, task_queue=tq,
            execution_timeout=timedelta(seconds=args.timeout),
        )

        # Paused schedule, left in place on purpose.
        await client.create_schedule(
            sched_id,
            Schedule(
                action=ScheduleActionStartWorkflow(
                    MarkersChildWorkflow.run,
                    mk("schedule-input"),
                    id=f"markers-sched-wf-{suffix}",
                    task_queue=tq,
                ),
                spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=timedelta(days=1))]),
                state=ScheduleState(paused=True, note="portcullis marker test; paused"),
            ),
        )
        sdesc = await client.get_schedule_handle(sched_id).describe()
        action = sdesc.schedule.action
        sargs = (
            client.data_converter.payload_converter.from_payloads(list(action.args))
            if isinstance(action, ScheduleActionStartWorkflow) else None
        )
        checks["schedule-input"] = sargs == [mk("schedule-input")]
        checks["schedule_paused"] = bool(sdesc.schedule.state.paused)

        try:
            await fail_handle.result()
            checks["wf-failure-msg"] = False
        except WorkflowFailureError as e:
            checks["wf-failure-msg"] = (
                isinstance(e.cause, ApplicationError) and e.cause.message == mk("wf-failure-msg")
            )

        # Wait until run 2 has finished its activities and child.
        status = None
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            status = await handle.query(MarkersWorkflow.status)
            if status == "waiting":
                break
            await asyncio.sleep(0.2)
        info["status_before_signal"] = status
        checks["reached_waiting"] = status == "waiting"

        q = await handle.query(MarkersWorkflow.echo, mk("query-arg"))
        checks["query-arg"] = checks["query-result"] = q == mk("query-result")
        u = await handle.execute_update(MarkersWorkflow.marker_update, mk("update-arg"))
        checks["update-result"] = u == mk("update-result")
        from temporalio.client import WorkflowUpdateFailedError

        try:
            await handle.execute_update(
                MarkersWorkflow.rejectable_update, rev(mk("update-rejection"))
            )
            checks["update-rejection"] = False
        except WorkflowUpdateFailedError as e:
            cause = e.cause
            checks["update-rejection"] = (
                isinstance(cause, ApplicationError) and cause.message == mk("update-rejection")
            )
        await handle.signal(MarkersWorkflow.marker_signal, mk("signal"))
        result = await handle.result()

        seen = result.get("seen", {}) if isinstance(result, dict) else {}
        checks["wf-result"] = isinstance(result, dict) and result.get("marker") == mk("wf-result")
        for kind in (
            "wf-input", "can-input", "act-result", "heartbeat", "failure-msg",
            "failure-details", "local-act-result", "header", "child-result",
            "signal", "update-arg",
        ):
            checks[kind] = rev(seen.get(kind, "")) == mk(kind)
        # The receiver derived its reply from the exact input, so these follow:
        checks["act-input"] = checks["act-result"]
        checks["child-input"] = checks["child-result"]
        bad = {k: rev(v) for k, v in seen.items() if rev(v) != mk(k)}
        if bad:
            info["mismatches"] = bad

        # Memo (set at start on run 1) read back via describe.
        desc = await client.get_workflow_handle(wf_id, run_id=first_run).describe()
        checks["memo"] = (await desc.memo()).get("marker") == mk("memo")
        info["run_ids"] = [first_run, (await handle.describe()).run_id]

        # Search attribute: visible to list (eventually consistent).
        query = f'{SEARCH_ATTR} = "{mk("search-attr")}"'
        found: set = set()
        deadline = time.monotonic() + 10
        while True:
            found = {w.id async for w in client.list_workflows(query)}
            if wf_id in found or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        checks["search-attr"] = wf_id in found
        if desc.typed_search_attributes.get(kw_key) != mk("search-attr"):
            checks["search-attr"] = False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_connection_args(parser)
    parser.add_argument("--marker", required=True, help="unique marker string M")
    parser.add_argument("--task-queue", default=None, help="task queue (default: unique)")
    parser.add_argument("--timeout", type=float, default=90.0, help="overall time bound (s)")
    args = parser.parse_args()
    args.task_queue = args.task_queue or f"markers-tq-{uuid.uuid4().hex[:12]}"
    if args.marker in args.task_queue:
        parser.error("the task queue name must not contain the marker")

    checks: dict = {}
    info: dict = {}
    started = time.monotonic()
    error = None
    try:
        asyncio.run(asyncio.wait_for(run_markers(args, checks, info), args.timeout))
    except BaseException as e:  # noqa: BLE001 - report everything as failure
        error = (
            f"timed out after {args.timeout}s"
            if isinstance(e, asyncio.TimeoutError)
            else f"{type(e).__name__}: {e}"
        )
        traceback.print_exc(file=sys.stderr)

    missing = [k for k in KINDS if k not in checks]
    ok = error is None and not missing and all(checks.values())
    payload = {
        "checks": checks,
        "kinds": KINDS,
        "stored_kinds": STORED_KINDS,
        "plaintext_kinds": PLAINTEXT_KINDS,
        "unstored_kinds": UNSTORED_KINDS,
        "workflow_ids": info.pop("workflow_ids", []),
        "schedule_id": info.pop("schedule_id", None),
        "task_queue": args.task_queue,
        "marker": args.marker,
        "elapsed_s": round(time.monotonic() - started, 3),
        **info,
    }
    if missing:
        payload["unchecked_kinds"] = missing
    if error is not None:
        payload["error"] = error
    common.finish(ok, payload)


if __name__ == "__main__":
    main()
