//! Reads the namespaces a request acts on besides its own, at the wire level.
//!
//! Two kinds of message inside a request name a namespace of their own (a reviewed list,
//! [`ACTIONS`]; a test lists every `namespace` field reachable from a request so a new one is
//! noticed):
//! - the commands of `RespondWorkflowTaskCompletedRequest` that start a child workflow, signal
//!   or cancel a workflow: their (deprecated, still honoured) `namespace` field sends the
//!   command to another namespace when the server runs with
//!   `system.enableCrossNamespaceCommands`. Empty means the request's own namespace.
//! - the nested requests of `ExecuteMultiOperationRequest`: the server (1.32) refuses one that
//!   names another namespace than the outer request, and one that names none ("Namespace  is
//!   not found."). The proxy refuses both before anything else looks at them.
//!
//! - a Nexus operation addressed to the system endpoint (`__temporal_system`): the server runs
//!   it, and the request inside its input envelope (a `SignalWithStartWorkflowExecutionRequest`)
//!   names the namespace it acts in ([`SYSTEM_NEXUS_ACTIONS`]). Server 1.32 refuses one that
//!   names another namespace than the workflow's ("does not match namespace in context"); the
//!   proxy still treats it as a command aimed there (authorized and sealed for it), so a server
//!   that allows it gets the right keys. Empty means the request's own namespace. Read at any
//!   depth, the root included (`StartNexusOperationExecutionRequest`). An input at the system
//!   endpoint that is not a readable envelope of a known operation is refused here already.
//!
//! Other `namespace` fields inside requests are references, not actions: `common.v1.Link`s
//! (which event caused this call), `ChildWorkflowExecutionFailureInfo` (which child failed),
//! and the Nexus endpoint target of the cluster-admin `CreateNexusEndpoint`.
//!
//! Like the payload walker, the reader is guided by an index computed once from the
//! descriptors: it descends only into fields that can reach an action message (so for most
//! methods it reads nothing at all), and copies nothing.

use std::collections::HashMap;

use prost_reflect::{DescriptorPool, Kind, MessageDescriptor};

use super::system_nexus::{self as system, NexusFields, SystemNexusError, SYSTEM_OPERATIONS};
use super::walker::{PayloadIndex, DEFAULT_MAX_DEPTH};
use super::wire::{self, WireError, WireType};
use crate::schema::Schema;

/// What the namespace an action names must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetRule {
    /// The action runs in the namespace it names (empty: the request's own).
    Target,
    /// A nested request: it must name the request's own namespace.
    SameAsRequest,
}

/// A message that acts on a namespace it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActionKind {
    /// Full name of the message.
    pub message: &'static str,
    /// The command or operation it stands for, as audit lines and errors name it.
    pub command: &'static str,
    pub rule: TargetRule,
}

/// Every message that acts on a namespace of its own (see the module comment).
pub const ACTIONS: &[ActionKind] = &[
    ActionKind {
        message: "temporal.api.command.v1.StartChildWorkflowExecutionCommandAttributes",
        command: "StartChildWorkflowExecution",
        rule: TargetRule::Target,
    },
    ActionKind {
        message: "temporal.api.command.v1.SignalExternalWorkflowExecutionCommandAttributes",
        command: "SignalExternalWorkflowExecution",
        rule: TargetRule::Target,
    },
    ActionKind {
        message: "temporal.api.command.v1.RequestCancelExternalWorkflowExecutionCommandAttributes",
        command: "RequestCancelExternalWorkflowExecution",
        rule: TargetRule::Target,
    },
    ActionKind {
        message: "temporal.api.workflowservice.v1.StartWorkflowExecutionRequest",
        command: "StartWorkflow",
        rule: TargetRule::SameAsRequest,
    },
    ActionKind {
        message: "temporal.api.workflowservice.v1.UpdateWorkflowExecutionRequest",
        command: "UpdateWorkflow",
        rule: TargetRule::SameAsRequest,
    },
];

/// The actions run through the system Nexus endpoint: one per entry of `SYSTEM_OPERATIONS`, in
/// the same order (a test checks). `message` is the request inside the envelope.
pub const SYSTEM_NEXUS_ACTIONS: &[ActionKind] = &[ActionKind {
    message: "temporal.api.workflowservice.v1.SignalWithStartWorkflowExecutionRequest",
    command: "SignalWithStartWorkflowExecution",
    rule: TargetRule::Target,
}];

/// One action found in a request, as written (the namespace may be empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action<'a> {
    pub kind: &'static ActionKind,
    pub namespace: &'a str,
    /// Whether the action's message can carry payloads (sealed for the namespace it acts on).
    pub carries_payloads: bool,
}

/// A namespace other than the request's own that a request acts on, and how.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CommandTarget {
    pub command: &'static str,
    pub namespace: String,
    /// The command carries payloads, to be sealed under this namespace's data key.
    pub carries_payloads: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    #[error("malformed protobuf in {message}: {source}")]
    Malformed {
        message: String,
        #[source]
        source: WireError,
    },
    #[error("messages nested deeper than {limit} levels in {message}")]
    TooDeep { message: String, limit: usize },
    #[error("message type {0} is not in the target index")]
    UnknownMessage(String),
    /// A Nexus operation addressed to the system endpoint that portcullis cannot read.
    #[error("{0}")]
    SystemNexus(SystemNexusError),
    /// A nested request names another namespace than the request (or none).
    #[error("{command} names namespace {namespace:?}, but the request is for namespace {expected:?}: nested requests must name the request's namespace")]
    NamespaceMismatch {
        command: &'static str,
        namespace: String,
        expected: String,
    },
}

#[derive(Debug)]
struct Plan {
    name: Box<str>,
    /// Fields that can reach an action, sorted by number: (number, message id).
    fields: Box<[(u32, u32)]>,
    /// Set when the message is an action: its kind and the number of its `namespace` field.
    action: Option<(&'static ActionKind, u32, bool)>,
    /// Set when the message starts a Nexus operation (it may address the system endpoint).
    nexus: Option<NexusFields>,
    reaches: bool,
}

/// For every message of a descriptor pool: whether it is, or can reach, an action message.
#[derive(Debug)]
pub struct TargetIndex {
    plans: Vec<Plan>,
    by_name: HashMap<Box<str>, u32>,
    /// For each of `SYSTEM_OPERATIONS`: the `namespace` field of its request.
    system_namespace_fields: Vec<Option<u32>>,
}

impl TargetIndex {
    /// The index of the API schema in force.
    pub fn global() -> &'static TargetIndex {
        Schema::global().target_index()
    }

    pub fn new(pool: &DescriptorPool, payloads: &PayloadIndex) -> TargetIndex {
        let messages: Vec<MessageDescriptor> = pool.all_messages().collect();
        let by_name: HashMap<Box<str>, u32> = messages
            .iter()
            .enumerate()
            .filter_map(|(i, m)| Some((m.full_name().into(), u32::try_from(i).ok()?)))
            .collect();
        let actions: Vec<Option<(&'static ActionKind, u32, bool)>> = messages
            .iter()
            .map(|m| {
                let kind = ACTIONS.iter().find(|a| a.message == m.full_name())?;
                let field = m
                    .get_field_by_name("namespace")
                    .filter(|f| matches!(f.kind(), Kind::String) && !f.is_list())?;
                let carries = payloads.reaches(m.full_name()).unwrap_or(true);
                Some((kind, field.number(), carries))
            })
            .collect();
        let nexus: Vec<Option<NexusFields>> = messages.iter().map(NexusFields::of).collect();
        let system_namespace_fields = SYSTEM_OPERATIONS
            .iter()
            .map(|o| {
                pool.get_message_by_name(o.request)
                    .and_then(|m| m.get_field_by_name("namespace"))
                    .map(|f| f.number())
            })
            .collect();
        let edges: Vec<Vec<(u32, u32)>> = messages
            .iter()
            .map(|m| {
                m.fields()
                    .filter_map(|f| match f.kind() {
                        Kind::Message(target) => {
                            Some((f.number(), *by_name.get(target.full_name())?))
                        }
                        _ => None,
                    })
                    .collect()
            })
            .collect();
        let mut reaches: Vec<bool> = actions
            .iter()
            .zip(&nexus)
            .map(|(a, n)| a.is_some() || n.is_some())
            .collect();
        loop {
            let mut changed = false;
            for (i, out) in edges.iter().enumerate() {
                if reaches.get(i).copied().unwrap_or(true) {
                    continue;
                }
                if out
                    .iter()
                    .any(|(_, t)| reaches.get(*t as usize).copied().unwrap_or(false))
                {
                    if let Some(r) = reaches.get_mut(i) {
                        *r = true;
                        changed = true;
                    }
                }
            }
            if !changed {
                break;
            }
        }
        let plans = messages
            .iter()
            .zip(actions)
            .zip(nexus)
            .zip(edges)
            .enumerate()
            .map(|(i, (((message, action), nexus), edges))| {
                let reach = reaches.get(i).copied().unwrap_or(false);
                let mut fields: Vec<(u32, u32)> = if reach {
                    edges
                        .into_iter()
                        .filter(|(_, t)| reaches.get(*t as usize).copied().unwrap_or(false))
                        .collect()
                } else {
                    Vec::new()
                };
                fields.sort_unstable();
                Plan {
                    name: message.full_name().into(),
                    fields: fields.into_boxed_slice(),
                    action,
                    nexus,
                    reaches: reach,
                }
            })
            .collect();
        TargetIndex {
            plans,
            by_name,
            system_namespace_fields,
        }
    }

    fn id(&self, full_name: &str) -> Option<u32> {
        self.by_name.get(full_name).copied()
    }

    fn plan(&self, id: u32) -> Option<&Plan> {
        self.plans.get(id as usize)
    }

    /// Whether a request of this type can contain an action (`None`: not in the pool).
    pub fn reaches(&self, full_name: &str) -> Option<bool> {
        self.id(full_name)
            .and_then(|id| self.plan(id))
            .map(|p| p.reaches)
    }

    /// The action messages of the pool, resolved (for review).
    pub fn action_messages(&self) -> Vec<&str> {
        self.plans
            .iter()
            .filter(|p| p.action.is_some())
            .map(|p| &*p.name)
            .collect()
    }
}

/// Every action nested in `input` (a serialized `full_name`), in wire order, as written. The
/// root message itself is never an action: its namespace is the request's own.
pub fn read_actions<'a>(
    index: &TargetIndex,
    full_name: &str,
    input: &'a [u8],
) -> Result<Vec<Action<'a>>, TargetError> {
    let id = index
        .id(full_name)
        .ok_or_else(|| TargetError::UnknownMessage(full_name.to_string()))?;
    let mut out = Vec::new();
    if index.plan(id).is_some_and(|p| p.reaches) {
        read_message(index, id, input, 0, &mut out)?;
    }
    Ok(out)
}

fn read_message<'a>(
    index: &TargetIndex,
    id: u32,
    buf: &'a [u8],
    depth: usize,
    out: &mut Vec<Action<'a>>,
) -> Result<(), TargetError> {
    let plan = index
        .plan(id)
        .ok_or_else(|| TargetError::UnknownMessage(format!("message id {id}")))?;
    if depth > DEFAULT_MAX_DEPTH {
        return Err(TargetError::TooDeep {
            message: plan.name.to_string(),
            limit: DEFAULT_MAX_DEPTH,
        });
    }
    let malformed = |source| TargetError::Malformed {
        message: plan.name.to_string(),
        source,
    };
    if let Some(fields) = plan.nexus {
        read_system_nexus(index, fields, buf, out)?;
    }
    if let (Some((kind, field, carries_payloads)), true) = (plan.action, depth > 0) {
        let namespace = wire::validate_and_find_string(buf, Some(field)).map_err(malformed)?;
        out.push(Action {
            kind,
            namespace: namespace.unwrap_or(""),
            carries_payloads,
        });
        return Ok(());
    }
    for field in wire::fields(buf) {
        let field = field.map_err(malformed)?;
        let Ok(slot) = plan.fields.binary_search_by_key(&field.number, |(n, _)| *n) else {
            continue;
        };
        let Some(&(number, target)) = plan.fields.get(slot) else {
            continue;
        };
        if field.wire_type != WireType::Len {
            return Err(malformed(WireError::UnexpectedWireType { field: number }));
        }
        read_message(index, target, field.value, depth + 1, out)?;
    }
    Ok(())
}

/// A message that starts a Nexus operation: when it addresses the system endpoint, the request
/// inside its input envelope is an action in the namespace it names.
fn read_system_nexus<'a>(
    index: &TargetIndex,
    fields: NexusFields,
    buf: &'a [u8],
    out: &mut Vec<Action<'a>>,
) -> Result<(), TargetError> {
    let Some(operation) =
        system::system_operation(fields, buf).map_err(TargetError::SystemNexus)?
    else {
        return Ok(());
    };
    let position = SYSTEM_OPERATIONS.iter().position(|o| o == operation);
    let kind = position.and_then(|p| SYSTEM_NEXUS_ACTIONS.get(p));
    let namespace_field =
        position.and_then(|p| index.system_namespace_fields.get(p).copied().flatten());
    let (Some(kind), Some(namespace_field)) = (kind, namespace_field) else {
        return Err(TargetError::UnknownMessage(operation.request.to_string()));
    };
    for field in wire::fields(buf) {
        let field = field.map_err(|e| TargetError::SystemNexus(SystemNexusError::Malformed(e)))?;
        if field.number != fields.input {
            continue;
        }
        for data in
            system::envelope_data(field.value, operation).map_err(TargetError::SystemNexus)?
        {
            let namespace = wire::validate_and_find_string(data.value, Some(namespace_field))
                .map_err(|e| TargetError::SystemNexus(SystemNexusError::Malformed(e)))?;
            out.push(Action {
                kind,
                namespace: namespace.unwrap_or(""),
                carries_payloads: true,
            });
        }
    }
    Ok(())
}

/// The namespaces other than `own` that the actions of a request run in, each (command,
/// namespace) once, in order of first appearance. A nested request that does not name `own`
/// is an error.
pub fn cross_namespace_targets(
    actions: &[Action<'_>],
    own: &str,
) -> Result<Vec<CommandTarget>, TargetError> {
    let mut targets: Vec<CommandTarget> = Vec::new();
    for action in actions {
        if action.namespace == own {
            continue;
        }
        match action.kind.rule {
            // An empty command namespace is the request's own.
            TargetRule::Target if action.namespace.is_empty() => {}
            TargetRule::SameAsRequest => {
                return Err(TargetError::NamespaceMismatch {
                    command: action.kind.command,
                    namespace: action.namespace.to_string(),
                    expected: own.to_string(),
                })
            }
            TargetRule::Target => {
                let known = targets
                    .iter_mut()
                    .find(|t| t.command == action.kind.command && t.namespace == action.namespace);
                match known {
                    Some(target) => target.carries_payloads |= action.carries_payloads,
                    None => targets.push(CommandTarget {
                        command: action.kind.command,
                        namespace: action.namespace.to_string(),
                        carries_payloads: action.carries_payloads,
                    }),
                }
            }
        }
    }
    Ok(targets)
}

/// [`read_actions`] and [`cross_namespace_targets`] in one.
pub fn read_targets(
    index: &TargetIndex,
    full_name: &str,
    input: &[u8],
    own: &str,
) -> Result<Vec<CommandTarget>, TargetError> {
    cross_namespace_targets(&read_actions(index, full_name, input)?, own)
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use temporalio_protos::temporal::api::command::v1::{
        command, Command, RequestCancelExternalWorkflowExecutionCommandAttributes,
        ScheduleActivityTaskCommandAttributes, SignalExternalWorkflowExecutionCommandAttributes,
        StartChildWorkflowExecutionCommandAttributes,
    };
    use temporalio_protos::temporal::api::workflowservice::v1::{
        execute_multi_operation_request::{operation, Operation},
        ExecuteMultiOperationRequest, RespondWorkflowTaskCompletedRequest,
        StartWorkflowExecutionRequest, UpdateWorkflowExecutionRequest,
    };

    use super::*;
    use crate::payload::namespaces::NamespaceFieldIndex;

    const COMPLETED: &str = "temporal.api.workflowservice.v1.RespondWorkflowTaskCompletedRequest";
    const MULTI: &str = "temporal.api.workflowservice.v1.ExecuteMultiOperationRequest";

    fn index() -> &'static TargetIndex {
        TargetIndex::global()
    }

    #[allow(deprecated)]
    fn child(namespace: &str) -> Command {
        Command {
            attributes: Some(
                command::Attributes::StartChildWorkflowExecutionCommandAttributes(
                    StartChildWorkflowExecutionCommandAttributes {
                        namespace: namespace.into(),
                        workflow_id: "child".into(),
                        ..Default::default()
                    },
                ),
            ),
            ..Default::default()
        }
    }

    #[allow(deprecated)]
    fn signal(namespace: &str) -> Command {
        Command {
            attributes: Some(
                command::Attributes::SignalExternalWorkflowExecutionCommandAttributes(
                    SignalExternalWorkflowExecutionCommandAttributes {
                        namespace: namespace.into(),
                        signal_name: "s".into(),
                        ..Default::default()
                    },
                ),
            ),
            ..Default::default()
        }
    }

    #[allow(deprecated)]
    fn cancel(namespace: &str) -> Command {
        Command {
            attributes: Some(
                command::Attributes::RequestCancelExternalWorkflowExecutionCommandAttributes(
                    RequestCancelExternalWorkflowExecutionCommandAttributes {
                        namespace: namespace.into(),
                        workflow_id: "w".into(),
                        ..Default::default()
                    },
                ),
            ),
            ..Default::default()
        }
    }

    fn completed(commands: Vec<Command>) -> Vec<u8> {
        RespondWorkflowTaskCompletedRequest {
            task_token: b"token".to_vec(),
            namespace: "alpha".into(),
            commands,
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn target(command: &'static str, namespace: &str, carries_payloads: bool) -> CommandTarget {
        CommandTarget {
            command,
            namespace: namespace.into(),
            carries_payloads,
        }
    }

    #[test]
    fn every_action_resolves_and_few_requests_reach_one() {
        let mut resolved = index().action_messages();
        resolved.sort_unstable();
        let mut listed: Vec<&str> = ACTIONS.iter().map(|a| a.message).collect();
        listed.sort_unstable();
        assert_eq!(resolved, listed);
        let mut reaching: Vec<&str> = Schema::global()
            .methods()
            .filter(|m| index().reaches(m.input.full_name()) == Some(true))
            .map(|m| m.name.as_str())
            .collect();
        reaching.sort_unstable();
        // StartWorkflowExecution and UpdateWorkflowExecution are actions only when nested;
        // StartNexusOperationExecution may address the system endpoint.
        assert_eq!(
            reaching,
            [
                "ExecuteMultiOperation",
                "RespondWorkflowTaskCompleted",
                "StartNexusOperationExecution",
                "StartWorkflowExecution",
                "UpdateWorkflowExecution"
            ]
        );
    }

    /// Every `namespace` field reachable from a request is either the request's own, an
    /// action's (above), or a reviewed reference that acts on nothing. A new one fails here
    /// until someone decides which it is.
    #[test]
    fn nested_request_namespace_fields_are_reviewed() {
        const REFERENCES: &[&str] = &[
            "temporal.api.common.v1.Link.Activity.namespace",
            "temporal.api.common.v1.Link.Callback.namespace",
            "temporal.api.common.v1.Link.NexusOperation.namespace",
            "temporal.api.common.v1.Link.Workflow.namespace",
            "temporal.api.common.v1.Link.WorkflowEvent.namespace",
            "temporal.api.failure.v1.ChildWorkflowExecutionFailureInfo.namespace",
            "temporal.api.nexus.v1.EndpointTarget.Worker.namespace",
        ];
        let schema = Schema::global();
        let names = NamespaceFieldIndex::global().name_fields();
        let mut seen = std::collections::BTreeSet::new();
        for method in schema.methods() {
            // Messages reachable from the request, excluding the request itself.
            let mut stack: Vec<MessageDescriptor> = schema
                .message(method.input.full_name())
                .unwrap()
                .fields()
                .filter_map(|f| match f.kind() {
                    Kind::Message(m) => Some(m),
                    _ => None,
                })
                .collect();
            let mut visited = std::collections::HashSet::new();
            while let Some(message) = stack.pop() {
                if !visited.insert(message.full_name().to_string()) {
                    continue;
                }
                for field in message.fields() {
                    let full = field.full_name().to_string();
                    if names.contains(&full) {
                        seen.insert(full);
                    }
                    if let Kind::Message(m) = field.kind() {
                        stack.push(m);
                    }
                }
            }
        }
        for field in &seen {
            let (message, _) = field.rsplit_once('.').unwrap();
            assert!(
                REFERENCES.contains(&field.as_str()) || ACTIONS.iter().any(|a| a.message == message),
                "{field} is a namespace inside a request that is neither an action nor a reviewed reference"
            );
        }
        for expected in REFERENCES {
            assert!(seen.contains(*expected), "{expected} no longer reachable");
        }
    }

    #[test]
    fn commands_yield_their_targets() {
        let message = completed(vec![
            child("beta"),
            signal(""),
            cancel("gamma"),
            child("beta"),
            signal("alpha"),
            Command {
                attributes: Some(command::Attributes::ScheduleActivityTaskCommandAttributes(
                    ScheduleActivityTaskCommandAttributes::default(),
                )),
                ..Default::default()
            },
            signal("beta"),
        ]);
        let actions = read_actions(index(), COMPLETED, &message).unwrap();
        let written: Vec<(&str, &str)> = actions
            .iter()
            .map(|a| (a.kind.command, a.namespace))
            .collect();
        assert_eq!(
            written,
            [
                ("StartChildWorkflowExecution", "beta"),
                ("SignalExternalWorkflowExecution", ""),
                ("RequestCancelExternalWorkflowExecution", "gamma"),
                ("StartChildWorkflowExecution", "beta"),
                ("SignalExternalWorkflowExecution", "alpha"),
                ("SignalExternalWorkflowExecution", "beta"),
            ]
        );
        assert_eq!(
            cross_namespace_targets(&actions, "alpha").unwrap(),
            [
                target("StartChildWorkflowExecution", "beta", true),
                target("RequestCancelExternalWorkflowExecution", "gamma", false),
                target("SignalExternalWorkflowExecution", "beta", true),
            ]
        );
        // Nothing aimed elsewhere: nothing to check.
        let local = completed(vec![child(""), signal("alpha")]);
        assert!(read_targets(index(), COMPLETED, &local, "alpha")
            .unwrap()
            .is_empty());
        // A request that cannot hold an action is not read at all.
        assert!(read_actions(
            index(),
            "temporal.api.workflowservice.v1.SignalWorkflowExecutionRequest",
            b"\xff\xff"
        )
        .unwrap()
        .is_empty());
    }

    /// The wire form counts, not a typed decode: a repeated occurrence of the same attributes
    /// (merged by a decoder) and both members of the oneof are all reported, so a namespace
    /// that a server would see is always among them.
    #[test]
    fn every_occurrence_is_reported() {
        let mut message = completed(vec![child("beta")]);
        // A second Command (field 2) with only signal attributes, then a Command holding
        // both a child (gamma) and a signal (delta) attribute.
        let mut both = Vec::new();
        both.extend_from_slice(&child("gamma").encode_to_vec());
        both.extend_from_slice(&signal("delta").encode_to_vec());
        wire::put_len_field(&mut message, 2, &both);
        let targets = read_targets(index(), COMPLETED, &message, "alpha").unwrap();
        let namespaces: Vec<&str> = targets.iter().map(|t| t.namespace.as_str()).collect();
        assert_eq!(namespaces, ["beta", "gamma", "delta"]);
    }

    #[test]
    fn multi_operation_must_stay_in_its_namespace() {
        let multi = |start: &str, update: &str| {
            ExecuteMultiOperationRequest {
                namespace: "alpha".into(),
                operations: vec![
                    Operation {
                        operation: Some(operation::Operation::StartWorkflow(
                            StartWorkflowExecutionRequest {
                                namespace: start.into(),
                                ..Default::default()
                            },
                        )),
                    },
                    Operation {
                        operation: Some(operation::Operation::UpdateWorkflow(
                            UpdateWorkflowExecutionRequest {
                                namespace: update.into(),
                                ..Default::default()
                            },
                        )),
                    },
                ],
                ..Default::default()
            }
            .encode_to_vec()
        };
        assert!(
            read_targets(index(), MULTI, &multi("alpha", "alpha"), "alpha")
                .unwrap()
                .is_empty()
        );
        // The server refuses an empty one ("Namespace  is not found."); so does the proxy.
        assert!(read_targets(index(), MULTI, &multi("alpha", ""), "alpha").is_err());
        let err = read_targets(index(), MULTI, &multi("alpha", "beta"), "alpha").unwrap_err();
        assert_eq!(
            err,
            TargetError::NamespaceMismatch {
                command: "UpdateWorkflow",
                namespace: "beta".into(),
                expected: "alpha".into()
            }
        );
        // The root is never an action of its own.
        let start = StartWorkflowExecutionRequest {
            namespace: "anything".into(),
            ..Default::default()
        }
        .encode_to_vec();
        assert!(read_actions(
            index(),
            "temporal.api.workflowservice.v1.StartWorkflowExecutionRequest",
            &start
        )
        .unwrap()
        .is_empty());
    }

    /// A Nexus operation at the system endpoint acts in the namespace its envelope's request
    /// names, at any depth (a workflow's command, a standalone operation's request).
    #[test]
    fn system_nexus_operations_are_targets() {
        use temporalio_protos::temporal::api::command::v1::ScheduleNexusOperationCommandAttributes;
        use temporalio_protos::temporal::api::common::v1::Payload;
        use temporalio_protos::temporal::api::workflowservice::v1::{
            SignalWithStartWorkflowExecutionRequest, StartNexusOperationExecutionRequest,
        };
        const SWS: &str = "temporal.api.workflowservice.v1.SignalWithStartWorkflowExecutionRequest";
        let envelope = |namespace: &str, marked: bool| Payload {
            metadata: [
                ("encoding".to_string(), b"binary/protobuf".to_vec()),
                ("messageType".to_string(), SWS.as_bytes().to_vec()),
            ]
            .into_iter()
            .chain(marked.then(|| ("__temporal_system_payload".to_string(), b"true".to_vec())))
            .collect(),
            data: SignalWithStartWorkflowExecutionRequest {
                namespace: namespace.into(),
                workflow_id: "w".into(),
                ..Default::default()
            }
            .encode_to_vec(),
            ..Default::default()
        };
        let schedule = |endpoint: &str, input: Payload| Command {
            attributes: Some(
                command::Attributes::ScheduleNexusOperationCommandAttributes(
                    ScheduleNexusOperationCommandAttributes {
                        endpoint: endpoint.into(),
                        service: "temporal.api.workflowservice.v1.WorkflowService".into(),
                        operation: "SignalWithStartWorkflowExecution".into(),
                        input: Some(input),
                        ..Default::default()
                    },
                ),
            ),
            ..Default::default()
        };
        let message = completed(vec![
            schedule("__temporal_system", envelope("beta", true)),
            schedule("__temporal_system", envelope("", true)),
            schedule("__temporal_system", envelope("alpha", true)),
            // Not the system endpoint: the input is the caller's, nothing to read.
            schedule("my-endpoint", envelope("gamma", true)),
        ]);
        assert_eq!(
            read_targets(index(), COMPLETED, &message, "alpha").unwrap(),
            [target("SignalWithStartWorkflowExecution", "beta", true)]
        );
        let standalone = StartNexusOperationExecutionRequest {
            namespace: "alpha".into(),
            endpoint: "__temporal_system".into(),
            service: "temporal.api.workflowservice.v1.WorkflowService".into(),
            operation: "SignalWithStartWorkflowExecution".into(),
            input: Some(envelope("beta", true)),
            ..Default::default()
        };
        assert_eq!(
            read_targets(
                index(),
                "temporal.api.workflowservice.v1.StartNexusOperationExecutionRequest",
                &standalone.encode_to_vec(),
                "alpha"
            )
            .unwrap(),
            [target("SignalWithStartWorkflowExecution", "beta", true)]
        );
        // What cannot be read is refused here already (also with encryption off).
        let unreadable = completed(vec![schedule("__temporal_system", envelope("beta", false))]);
        assert!(matches!(
            read_targets(index(), COMPLETED, &unreadable, "alpha"),
            Err(TargetError::SystemNexus(_))
        ));
        let mut unknown = schedule("__temporal_system", envelope("beta", true));
        if let Some(command::Attributes::ScheduleNexusOperationCommandAttributes(a)) =
            &mut unknown.attributes
        {
            a.operation = "WaitExternalWorkflowCompletion".into();
        }
        assert!(matches!(
            read_targets(index(), COMPLETED, &completed(vec![unknown]), "alpha"),
            Err(TargetError::SystemNexus(_))
        ));
        assert_eq!(SYSTEM_NEXUS_ACTIONS.len(), SYSTEM_OPERATIONS.len());
        for (action, operation) in SYSTEM_NEXUS_ACTIONS.iter().zip(SYSTEM_OPERATIONS) {
            assert_eq!(action.message, operation.request);
            assert_eq!(action.command, operation.operation);
        }
    }

    #[test]
    fn malformed_input_is_an_error() {
        let mut message = completed(vec![]);
        // commands (2) as a varint.
        message.extend_from_slice(&[0x10, 0x01]);
        assert!(matches!(
            read_actions(index(), COMPLETED, &message),
            Err(TargetError::Malformed { .. })
        ));
        // A child command whose namespace is not UTF-8.
        let mut attributes = Vec::new();
        wire::put_len_field(&mut attributes, 1, &[0xff, 0xfe]);
        let mut command = Vec::new();
        wire::put_len_field(&mut command, 12, &attributes);
        let mut message = completed(vec![]);
        wire::put_len_field(&mut message, 2, &command);
        assert!(matches!(
            read_actions(index(), COMPLETED, &message),
            Err(TargetError::Malformed { .. })
        ));
        assert!(read_actions(index(), COMPLETED, &[0x12, 0x05, 0x62]).is_err());
    }
}
