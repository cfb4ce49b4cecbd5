#!/usr/bin/env python3
"""Writes the seed corpus of the command_targets fuzz target (fuzz/corpus/command_targets/).

Run from the repo root with the project's venv after `bash scripts/setup.sh`:
    .venv/bin/python fuzz/gen_target_seeds.py
It writes constructed seeds (`cross-*`, `multi-*`, `edge-*`) and captures real SDK traffic:
a dev server, the recording relay of fuzz/capture (built here) in front of it, and
fuzz/seed_traffic.py through the relay; every RespondWorkflowTaskCompleted and
ExecuteMultiOperation request it sends becomes a `real-*` seed. Each seed is
[selector byte][serialized request], see fuzz/common/command_targets_input.rs.
"""
import glob, hashlib, os, socket, subprocess, sys, tempfile, time

from temporalio.api.command.v1 import message_pb2 as command
from temporalio.api.common.v1 import message_pb2 as common
from temporalio.api.enums.v1 import command_type_pb2 as ct
from temporalio.api.taskqueue.v1 import message_pb2 as taskqueue
from temporalio.api.workflowservice.v1 import request_response_pb2 as ws

OUT = "fuzz/corpus/command_targets"
COMPLETED, MULTI = 0, 1


def payloads(text):
    return common.Payloads(payloads=[common.Payload(metadata={"encoding": b"json/plain"},
                                                    data=f'"{text}"'.encode())])


def child(ns, wid="child"):
    return command.Command(
        command_type=ct.COMMAND_TYPE_START_CHILD_WORKFLOW_EXECUTION,
        start_child_workflow_execution_command_attributes=command.StartChildWorkflowExecutionCommandAttributes(
            namespace=ns, workflow_id=wid, workflow_type=common.WorkflowType(name="Child"),
            task_queue=taskqueue.TaskQueue(name="beta-q"), input=payloads("child input"),
            header=common.Header(fields={"h": payloads("hdr").payloads[0]}),
            memo=common.Memo(fields={"m": payloads("memo").payloads[0]})))


def signal(ns):
    return command.Command(
        command_type=ct.COMMAND_TYPE_SIGNAL_EXTERNAL_WORKFLOW_EXECUTION,
        signal_external_workflow_execution_command_attributes=command.SignalExternalWorkflowExecutionCommandAttributes(
            namespace=ns, execution=common.WorkflowExecution(workflow_id="target"),
            signal_name="poke", input=payloads("signal input")))


def cancel(ns):
    return command.Command(
        command_type=ct.COMMAND_TYPE_REQUEST_CANCEL_EXTERNAL_WORKFLOW_EXECUTION,
        request_cancel_external_workflow_execution_command_attributes=command.RequestCancelExternalWorkflowExecutionCommandAttributes(
            namespace=ns, workflow_id="target"))


def activity():
    return command.Command(
        command_type=ct.COMMAND_TYPE_SCHEDULE_ACTIVITY_TASK,
        schedule_activity_task_command_attributes=command.ScheduleActivityTaskCommandAttributes(
            activity_id="a", activity_type=common.ActivityType(name="act"), input=payloads("act")))


def system_signal_with_start(ns, marked=True):
    request = ws.SignalWithStartWorkflowExecutionRequest(
        namespace=ns, workflow_id="target", workflow_type=common.WorkflowType(name="T"),
        input=payloads("sws"), signal_name="poke", signal_input=payloads("signal"))
    metadata = {"encoding": b"binary/protobuf", "messageType": request.DESCRIPTOR.full_name.encode()}
    if marked:
        metadata["__temporal_system_payload"] = b"true"
    return command.Command(
        command_type=ct.COMMAND_TYPE_SCHEDULE_NEXUS_OPERATION,
        schedule_nexus_operation_command_attributes=command.ScheduleNexusOperationCommandAttributes(
            endpoint="__temporal_system", service="temporal.api.workflowservice.v1.WorkflowService",
            operation="SignalWithStartWorkflowExecution",
            input=common.Payload(metadata=metadata, data=request.SerializeToString())))


def completed(*commands):
    return ws.RespondWorkflowTaskCompletedRequest(
        namespace="alpha", task_token=b"token", identity="seed", commands=list(commands))


def multi(start_ns, update_ns):
    return ws.ExecuteMultiOperationRequest(namespace="alpha", operations=[
        ws.ExecuteMultiOperationRequest.Operation(start_workflow=ws.StartWorkflowExecutionRequest(
            namespace=start_ns, workflow_id="w", input=payloads("start"))),
        ws.ExecuteMultiOperationRequest.Operation(update_workflow=ws.UpdateWorkflowExecutionRequest(
            namespace=update_ns)),
    ])


def constructed():
    seeds = {
        "cross-child-beta": (COMPLETED, completed(child("beta"))),
        "cross-signal-beta": (COMPLETED, completed(signal("beta"))),
        "cross-cancel-beta": (COMPLETED, completed(cancel("beta"))),
        "cross-all-mixed": (COMPLETED, completed(activity(), child("beta"), signal(""), cancel("gamma"),
                                                 signal("alpha"), child("delta", "c2"))),
        "cross-system-nexus-beta": (COMPLETED, completed(system_signal_with_start("beta"))),
        "edge-system-nexus-unmarked": (COMPLETED, completed(system_signal_with_start("beta", False))),
        "multi-same": (MULTI, multi("alpha", "alpha")),
        "multi-empty": (MULTI, multi("", "")),
        "multi-other": (MULTI, multi("alpha", "beta")),
    }
    out = {name: bytes([sel]) + msg.SerializeToString() for name, (sel, msg) in seeds.items()}
    # A Command holding two attribute members (a decoder keeps the last), and the same
    # attributes twice (a decoder merges them): the reader reports every occurrence.
    two = child("beta").SerializeToString() + signal("gamma").SerializeToString()
    out["edge-two-attributes"] = bytes([COMPLETED]) + completed().SerializeToString() + \
        b"\x12" + varint(len(two)) + two
    out["edge-empty"] = bytes([COMPLETED])
    out["edge-truncated"] = bytes([COMPLETED]) + completed(child("beta")).SerializeToString()[:-3]
    return out


def varint(n):
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, limit=30):
    deadline = time.time() + limit
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {port}")


def captured():
    subprocess.run(["cargo", "build", "--release", "--offline", "--manifest-path",
                    "fuzz/capture/Cargo.toml"], check=True)
    tmp = tempfile.mkdtemp()
    server_port, relay_port = free_port(), free_port()
    procs = []
    try:
        procs.append(subprocess.Popen(
            [".venv/bin/temporal", "server", "start-dev", "--headless", "--ip", "127.0.0.1",
             "--port", str(server_port), "--db-filename", os.path.join(tmp, "t.db"),
             "--dynamic-config-value", "frontend.enableExecuteMultiOperation=true",
             "--dynamic-config-value", "frontend.enableUpdateWorkflowExecution=true"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(server_port)
        procs.append(subprocess.Popen(
            ["fuzz/capture/target/release/portcullis-capture", f"127.0.0.1:{relay_port}",
             f"127.0.0.1:{server_port}", os.path.join(tmp, "calls"),
             "RespondWorkflowTaskCompleted,ExecuteMultiOperation"], stdout=subprocess.DEVNULL))
        wait_port(relay_port)
        subprocess.run([".venv/bin/python", "fuzz/seed_traffic.py", "--address",
                        f"127.0.0.1:{relay_port}", "--grpc-compression", "none"],
                       check=True, timeout=120)
    finally:
        for p in procs:
            p.terminate()
            p.wait()
    out = {}
    for path in sorted(glob.glob(os.path.join(tmp, "calls", "*.bin"))):
        name = os.path.basename(path)[:-4]
        sel = MULTI if name.startswith("ExecuteMultiOperation") else COMPLETED
        data = open(path, "rb").read()
        digest = hashlib.sha1(data).hexdigest()[:10]
        out[f"real-{name.rsplit('-', 1)[0]}-{digest}"] = bytes([sel]) + data
    return out


def main():
    os.makedirs(OUT, exist_ok=True)
    seeds = constructed()
    real = captured()
    if not any(n.startswith("real-RespondWorkflowTaskCompleted") for n in real) or \
            not any(n.startswith("real-ExecuteMultiOperation") for n in real):
        sys.exit(f"the capture missed a request type: {sorted(real)}")
    seeds.update(real)
    for old in glob.glob(os.path.join(OUT, "real-*")):
        os.remove(old)
    for name, data in seeds.items():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(data)
    print(f"{len(seeds)} seeds ({len(real)} captured)", file=sys.stderr)


if __name__ == "__main__":
    main()
