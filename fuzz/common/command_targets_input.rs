// One fuzz input through the reader of the namespaces a request acts on
// (`portcullis::payload::targets`). Shared (via `include!`) by the cargo-fuzz target
// `fuzz/fuzz_targets/command_targets.rs` and the replay test `tests/fuzz_corpus.rs`. Nothing
// here may panic, whatever the bytes; errors are fine.
//
// Input layout:
//   byte 0: bit 0 selects the request type (0 = RespondWorkflowTaskCompletedRequest,
//           1 = ExecuteMultiOperationRequest)
//   rest:   the serialized request (no gRPC framing: the grpc_walker target covers framing)
//
// Two differential checks, reported in the outcome (the fuzz target and the replay test assert
// them):
// - against a typed decode (prost): when prost accepts the bytes, the reader does too (unless
//   it refuses a system Nexus input it cannot read, which the proxy refuses), and every
//   namespace a command, nested request, or request in a system Nexus envelope names in the
//   decoded message is among the actions the reader reports (a server decodes like prost:
//   whatever it would act on, the proxy authorizes);
// - against the payload walker: every namespace the walker says a payload belongs to (the
//   key sealing picks) is a target the reader reports as carrying payloads, so the proxy has
//   fetched that key before the walk.

use portcullis::payload::targets::{
    cross_namespace_targets, read_actions, TargetError, TargetIndex,
};
use portcullis::payload::walker::{
    rewrite_named, PayloadContext, PayloadIndex, WalkError, WalkOptions,
};
use portcullis::payload::wire::validate_and_find_string;
use prost::Message as _;
use temporalio_protos::temporal::api::command::v1::command::Attributes;
use temporalio_protos::temporal::api::workflowservice::v1::execute_multi_operation_request::operation::Operation;
use temporalio_protos::temporal::api::workflowservice::v1::{
    ExecuteMultiOperationRequest, RespondWorkflowTaskCompletedRequest,
    SignalWithStartWorkflowExecutionRequest,
};

pub const COMPLETED: &str = "temporal.api.workflowservice.v1.RespondWorkflowTaskCompletedRequest";
pub const MULTI: &str = "temporal.api.workflowservice.v1.ExecuteMultiOperationRequest";

#[derive(Debug)]
pub struct TargetsOutcome {
    pub message_type: &'static str,
    /// The request's own namespace (empty when absent or unreadable).
    pub own: String,
    /// (command, namespace) of every action, as the reader found them.
    pub actions: Result<Vec<(&'static str, String)>, String>,
    /// The cross-namespace targets (Err: a nested request for another namespace, or above).
    pub targets: Result<Vec<(&'static str, String, bool)>, String>,
    /// What a typed decode sees (None: prost refused the bytes).
    pub typed: Option<Vec<(&'static str, String)>>,
    /// Namespaces the payload walker assigned payloads to (None: the walk failed).
    pub scopes: Option<Vec<String>>,
    pub typed_agrees: bool,
    pub scopes_covered: bool,
}

#[allow(deprecated)] // the commands' namespace fields
fn typed_actions(message_type: &str, bytes: &[u8]) -> Option<Vec<(&'static str, String)>> {
    let mut out = Vec::new();
    if message_type == COMPLETED {
        let request = RespondWorkflowTaskCompletedRequest::decode(bytes).ok()?;
        for command in request.commands {
            match command.attributes {
                Some(Attributes::StartChildWorkflowExecutionCommandAttributes(a)) => {
                    out.push(("StartChildWorkflowExecution", a.namespace))
                }
                Some(Attributes::SignalExternalWorkflowExecutionCommandAttributes(a)) => {
                    out.push(("SignalExternalWorkflowExecution", a.namespace))
                }
                Some(Attributes::RequestCancelExternalWorkflowExecutionCommandAttributes(a)) => {
                    out.push(("RequestCancelExternalWorkflowExecution", a.namespace))
                }
                // The server decodes the system endpoint's input as the operation's request.
                Some(Attributes::ScheduleNexusOperationCommandAttributes(a))
                    if a.endpoint == "__temporal_system"
                        && a.service == "temporal.api.workflowservice.v1.WorkflowService"
                        && a.operation == "SignalWithStartWorkflowExecution" =>
                {
                    if let Some(input) = a.input {
                        if let Ok(r) = SignalWithStartWorkflowExecutionRequest::decode(&*input.data) {
                            out.push(("SignalWithStartWorkflowExecution", r.namespace));
                        }
                    }
                }
                _ => {}
            }
        }
    } else {
        let request = ExecuteMultiOperationRequest::decode(bytes).ok()?;
        for operation in request.operations {
            match operation.operation {
                Some(Operation::StartWorkflow(r)) => out.push(("StartWorkflow", r.namespace)),
                Some(Operation::UpdateWorkflow(r)) => out.push(("UpdateWorkflow", r.namespace)),
                None => {}
            }
        }
    }
    Some(out)
}

pub fn one_targets_input(data: &[u8]) -> Option<TargetsOutcome> {
    let (&selector, message) = data.split_first()?;
    let (message_type, namespace_field) = if selector & 1 == 0 {
        (COMPLETED, 9)
    } else {
        (MULTI, 1)
    };
    let own = validate_and_find_string(message, Some(namespace_field))
        .ok()
        .flatten()
        .unwrap_or_default()
        .to_string();

    let read = read_actions(TargetIndex::global(), message_type, message);
    let actions = read
        .as_ref()
        .map(|a| {
            a.iter()
                .map(|a| (a.kind.command, a.namespace.to_string()))
                .collect::<Vec<_>>()
        })
        .map_err(TargetError::to_string);
    let targets = match &read {
        Ok(a) => cross_namespace_targets(a, &own)
            .map(|t| {
                t.into_iter()
                    .map(|t| (t.command, t.namespace, t.carries_payloads))
                    .collect::<Vec<_>>()
            })
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };

    let typed = typed_actions(message_type, message);
    let typed_agrees = match (&typed, &actions) {
        (None, _) => true,
        // Refused on purpose: an input at the system endpoint the reader cannot vouch for.
        (Some(_), Err(_)) => matches!(read, Err(TargetError::SystemNexus(_))),
        (Some(typed), Ok(read)) => typed.iter().all(|t| read.contains(t)),
    };

    let mut seen: Vec<String> = Vec::new();
    let mut record = |ctx: &PayloadContext<'_>, _: &[u8]| -> Result<Option<Vec<u8>>, WalkError> {
        if let Some(ns) = ctx.namespace() {
            if !seen.iter().any(|s| s == ns) {
                seen.push(ns.to_string());
            }
        }
        Ok(None)
    };
    let walked = rewrite_named(
        PayloadIndex::global(),
        message_type,
        message,
        &mut record,
        &WalkOptions::default(),
    );
    let scopes = walked.is_ok().then_some(seen);
    let scopes_covered = match (&scopes, &targets) {
        (Some(scopes), Ok(targets)) => scopes.iter().filter(|ns| **ns != own).all(|ns| {
            targets
                .iter()
                .any(|(_, namespace, carries)| namespace == ns && *carries)
        }),
        _ => true,
    };

    Some(TargetsOutcome {
        message_type,
        own,
        actions,
        targets,
        typed,
        scopes,
        typed_agrees,
        scopes_covered,
    })
}
