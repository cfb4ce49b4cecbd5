#!/usr/bin/env python3
"""Writes the seed corpus of the grpc_walker fuzz target (fuzz/corpus/grpc_walker/).

Run from the repo root with the project's venv (temporalio installed) after a `cargo build`:
    .venv/bin/python fuzz/gen_seeds.py
Each seed is [encoding byte][method selector byte][gRPC-framed request], see
fuzz/common/grpc_walker_input.rs. Files named `valid-<Method>-<encoding>` are real requests
that tests/fuzz_corpus.rs expects to rewrite successfully (and round-trip exactly).
"""
import glob, gzip, os, struct, sys

from google.protobuf import any_pb2, descriptor_pb2
from temporalio.api.command.v1 import message_pb2 as command
from temporalio.api.common.v1 import message_pb2 as common
from temporalio.api.enums.v1 import command_type_pb2
from temporalio.api.failure.v1 import message_pb2 as failure
from temporalio.api.protocol.v1 import message_pb2 as protocol
from temporalio.api.taskqueue.v1 import message_pb2 as taskqueue
from temporalio.api.update.v1 import message_pb2 as update
from temporalio.api.workflowservice.v1 import request_response_pb2 as ws
from temporalio.api.errordetails.v1 import message_pb2 as errordetails

FORWARDED = [
    "temporal.api.workflowservice.v1.WorkflowService",
    "temporal.api.operatorservice.v1.OperatorService",
    "grpc.health.v1.Health",
]
WS = "temporal.api.workflowservice.v1.WorkflowService"


def method_paths():
    # The same descriptor set the crate embeds (build.rs copies it into OUT_DIR).
    path = max(glob.glob("target/debug/build/portcullis-*/out/temporal_descriptors.bin"),
               key=os.path.getmtime)
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(open(path, "rb").read())
    paths = []
    for fd in fds.file:
        for s in fd.service:
            full = f"{fd.package}.{s.name}"
            if full in FORWARDED:
                paths += [f"/{full}/{m.name}" for m in s.method]
    return sorted(paths)


PATHS = method_paths()


def selector(method):
    return PATHS.index(f"/{WS}/{method}")


def frame(msg: bytes, gz: bool) -> bytes:
    if gz:
        data = gzip.compress(msg)
        return b"\x01" + struct.pack(">I", len(data)) + data
    return b"\x00" + struct.pack(">I", len(msg)) + msg


def payload(text: str, encoding=b"json/plain") -> common.Payload:
    return common.Payload(metadata={"encoding": encoding}, data=text.encode())


def payloads(*texts) -> common.Payloads:
    return common.Payloads(payloads=[payload(t) for t in texts])


def app_failure(msg, cause=None):
    f = failure.Failure(
        message=msg,
        stack_trace=f"at {msg}\n  at main",
        application_failure_info=failure.ApplicationFailureInfo(
            type="MyError", details=payloads('{"why":"' + msg + '"}')),
    )
    if cause is not None:
        f.cause.CopyFrom(cause)
    return f


def start_workflow():
    return ws.StartWorkflowExecutionRequest(
        namespace="ns1",
        workflow_id="wf-1",
        workflow_type=common.WorkflowType(name="MyWorkflow"),
        task_queue=taskqueue.TaskQueue(name="tq"),
        input=payloads('"secret input"', '{"n":1}'),
        identity="seed",
        request_id="req-1",
        memo=common.Memo(fields={"note": payload('"memo secret"')}),
        header=common.Header(fields={"auth": payload('"header secret"')}),
        search_attributes=common.SearchAttributes(
            indexed_fields={"CustomKeywordField": payload('"kw"')}),
    )


def workflow_task_completed():
    upd = update.Response(
        meta=update.Meta(update_id="u1", identity="seed"),
        outcome=update.Outcome(success=payloads('"update result"')),
    )
    body = any_pb2.Any()
    body.Pack(upd)
    sched = command.Command(
        command_type=command_type_pb2.COMMAND_TYPE_SCHEDULE_ACTIVITY_TASK,
        schedule_activity_task_command_attributes=command.ScheduleActivityTaskCommandAttributes(
            activity_id="a1", activity_type=common.ActivityType(name="act"),
            task_queue=taskqueue.TaskQueue(name="tq"), input=payloads('"activity input"'),
            header=common.Header(fields={"h": payload('"h"')})),
    )
    complete = command.Command(
        command_type=command_type_pb2.COMMAND_TYPE_COMPLETE_WORKFLOW_EXECUTION,
        complete_workflow_execution_command_attributes=command.CompleteWorkflowExecutionCommandAttributes(
            result=payloads('"workflow result"')),
    )
    fail = command.Command(
        command_type=command_type_pb2.COMMAND_TYPE_FAIL_WORKFLOW_EXECUTION,
        fail_workflow_execution_command_attributes=command.FailWorkflowExecutionCommandAttributes(
            failure=app_failure("wf failed", app_failure("root cause"))),
    )
    marker = command.Command(
        command_type=command_type_pb2.COMMAND_TYPE_RECORD_MARKER,
        record_marker_command_attributes=command.RecordMarkerCommandAttributes(
            marker_name="m", details={"d": payloads('"marker"')}),
    )
    # A signal-with-start through the system Nexus endpoint: an envelope the server reads,
    # whose inner payloads are sealed.
    sws = ws.SignalWithStartWorkflowExecutionRequest(
        namespace="ns1", workflow_id="target", workflow_type=common.WorkflowType(name="T"),
        task_queue=taskqueue.TaskQueue(name="tq"), input=payloads('"sws input"'),
        signal_name="poke", signal_input=payloads('"sws signal"'),
        memo=common.Memo(fields={"m": payload('"sws memo"')}))
    system = command.Command(
        command_type=command_type_pb2.COMMAND_TYPE_SCHEDULE_NEXUS_OPERATION,
        schedule_nexus_operation_command_attributes=command.ScheduleNexusOperationCommandAttributes(
            endpoint="__temporal_system", service="temporal.api.workflowservice.v1.WorkflowService",
            operation="SignalWithStartWorkflowExecution", input=system_envelope(sws)))
    # Memo upserts, with a nil value (deletes the key).
    memo = command.Command(
        command_type=command_type_pb2.COMMAND_TYPE_MODIFY_WORKFLOW_PROPERTIES,
        modify_workflow_properties_command_attributes=command.ModifyWorkflowPropertiesCommandAttributes(
            upserted_memo=common.Memo(fields={
                "gone": common.Payload(metadata={"encoding": b"binary/null"}),
                "kept": payload('"kept"')})))
    return ws.RespondWorkflowTaskCompletedRequest(
        namespace="ns1",
        task_token=b"token",
        identity="seed",
        commands=[sched, marker, complete, fail, system, memo],
        messages=[protocol.Message(id="m1", protocol_instance_id="u1",
                                   event_id=5, body=body)],
    )


def system_envelope(request) -> common.Payload:
    return common.Payload(metadata={
        "encoding": b"binary/protobuf",
        "messageType": request.DESCRIPTOR.full_name.encode(),
        "__temporal_system_payload": b"true",
    }, data=request.SerializeToString())


def standalone_system_nexus():
    sws = ws.SignalWithStartWorkflowExecutionRequest(
        namespace="ns1", workflow_id="target", workflow_type=common.WorkflowType(name="T"),
        input=payloads('"standalone sws input"'), signal_name="poke")
    return ws.StartNexusOperationExecutionRequest(
        namespace="ns1", operation_id="op-1", endpoint="__temporal_system",
        service="temporal.api.workflowservice.v1.WorkflowService",
        operation="SignalWithStartWorkflowExecution", input=system_envelope(sws))


def activity_failed():
    return ws.RespondActivityTaskFailedRequest(
        namespace="ns1",
        task_token=b"token",
        identity="seed",
        failure=app_failure("outer", app_failure("middle", app_failure("inner"))),
        last_heartbeat_details=payloads('"heartbeat"'),
    )


def signal_with_start():
    return ws.SignalWithStartWorkflowExecutionRequest(
        namespace="ns1", workflow_id="wf-2",
        workflow_type=common.WorkflowType(name="W"), task_queue=taskqueue.TaskQueue(name="tq"),
        input=payloads('"in"'), signal_name="sig", signal_input=payloads('"signal secret"'),
    )


def query_completed():
    return ws.RespondQueryTaskCompletedRequest(
        namespace="ns1", task_token=b"q1", query_result=payloads('"query result"'),
        failure=app_failure("query failed"),
    )


def status_details():
    # google.rpc.Status { code=3, message, details=[Any(QueryFailedFailure{failure})] }
    qf = errordetails.QueryFailedFailure(failure=app_failure("query blew up"))
    det = any_pb2.Any()
    det.Pack(qf)
    msg = b"\x08\x03" + b"\x12\x04oops"
    d = det.SerializeToString()
    return msg + b"\x1a" + varint(len(d)) + d


def varint(n):
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def main():
    out = "fuzz/corpus/grpc_walker"
    os.makedirs(out, exist_ok=True)
    seeds = {}
    for name, msg in [
        ("StartWorkflowExecution", start_workflow()),
        ("RespondWorkflowTaskCompleted", workflow_task_completed()),
        ("RespondActivityTaskFailed", activity_failed()),
        ("SignalWithStartWorkflowExecution", signal_with_start()),
        ("RespondQueryTaskCompleted", query_completed()),
        ("StartNexusOperationExecution", standalone_system_nexus()),
    ]:
        raw = msg.SerializeToString()
        sel = selector(name)
        seeds[f"valid-{name}-identity"] = bytes([0, sel]) + frame(raw, False)
        seeds[f"valid-{name}-gzip"] = bytes([1, sel]) + frame(raw, True)
    # Edge cases: a method without payloads, unframed raw message, bad framing, status details.
    seeds["valid-DescribeNamespace-identity"] = bytes([0, selector("DescribeNamespace")]) + frame(
        ws.DescribeNamespaceRequest(namespace="ns1").SerializeToString(), False)
    seeds["raw-StartWorkflowExecution"] = bytes([0, selector("StartWorkflowExecution")]) + \
        start_workflow().SerializeToString()
    seeds["edge-empty-body"] = bytes([0, 0])
    seeds["edge-truncated-header"] = bytes([0, 0, 0, 0, 0])
    seeds["edge-gzip-flag-identity"] = bytes([0, selector("StartWorkflowExecution")]) + \
        frame(start_workflow().SerializeToString(), True)
    seeds["status-QueryFailedFailure"] = bytes([0, 0]) + status_details()
    for name, data in seeds.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    print(f"{len(seeds)} seeds, {len(PATHS)} methods", file=sys.stderr)


if __name__ == "__main__":
    main()
