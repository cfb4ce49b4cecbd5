//! Finds and rewrites every namespace *name* in a message at the wire level, guided by the
//! descriptors, for namespace translation (a namespace that clients call `payments` and the
//! upstream knows as `payments.a1b2c`).
//!
//! Which fields hold a namespace name is decided once from the descriptor pool
//! ([`NamespaceFieldIndex`]): every `string` field named `namespace`, plus the few that carry a
//! name under another field name (`NamespaceInfo.name`, `parent_workflow_namespace`,
//! `workflow_namespace`, `deleted_namespace`; the list is reviewed by a test). `namespace_id`
//! fields are server-assigned ids, not names, and are left alone.
//!
//! Like the payload walker, the rewriter descends only into fields that can reach such a field
//! (so payload-heavy subtrees of a history page are skipped), resolves `google.protobuf.Any`
//! by its `type_url` (error details, `MultiOperationExecutionFailure`), walks the serialized
//! history inside `raw_history` and refuses a non-PROTO3 one, and copies every other byte
//! verbatim: unknown fields and field order survive. Nothing is allocated when no name
//! changes. The request inside a system Nexus envelope (see [`super::system_nexus`]) names the
//! namespace it acts in and the server reads it: it is translated like a nested request (an
//! input that is not a readable envelope is left alone; the payload walker decides about it).

use std::collections::HashMap;
use std::fmt;

use prost_reflect::{DescriptorPool, FieldDescriptor, Kind, MessageDescriptor};

use super::system_nexus::{self as system, NexusFields, SYSTEM_OPERATIONS};
use super::walker::{
    replace_len_value, resize_len_prefix, value_offset, Edit, RewritePlan, WalkError,
    DEFAULT_MAX_DEPTH,
};
use super::wire::{self, Field, WireError, WireType};
use crate::schema::Schema;

const ANY: &str = "google.protobuf.Any";
const DATA_BLOB: &str = "temporal.api.common.v1.DataBlob";
const HISTORY: &str = "temporal.api.history.v1.History";
const ENCODING_TYPE: &str = "temporal.api.enums.v1.EncodingType";
const ENCODING_TYPE_PROTO3: &str = "ENCODING_TYPE_PROTO3";
/// The only DataBlob field in the API; its data is a serialized History (see the walker).
const RAW_HISTORY_FIELD: &str =
    "temporal.api.workflowservice.v1.GetWorkflowExecutionHistoryResponse.raw_history";

/// String fields that hold a namespace name although they are not called `namespace`.
const NAME_FIELDS: &[&str] = &[
    "temporal.api.namespace.v1.NamespaceInfo.name",
    "temporal.api.history.v1.WorkflowExecutionStartedEventAttributes.parent_workflow_namespace",
    "temporal.api.workflowservice.v1.PollActivityTaskQueueResponse.workflow_namespace",
    "temporal.api.operatorservice.v1.DeleteNamespaceResponse.deleted_namespace",
];

/// Whether `field` holds a namespace name.
fn is_name_field(field: &FieldDescriptor) -> bool {
    matches!(field.kind(), Kind::String)
        && !field.is_map()
        && (field.name() == "namespace" || NAME_FIELDS.contains(&field.full_name()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MessageKind {
    Plain,
    Any,
    DataBlob,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// The field is a namespace name.
    Name,
    Message(u32),
    /// `raw_history`: walk `data` as a History when PROTO3.
    RawHistory,
}

#[derive(Debug)]
struct FieldRule {
    number: u32,
    name: Box<str>,
    target: Target,
}

#[derive(Debug)]
struct Plan {
    name: Box<str>,
    kind: MessageKind,
    reaches: bool,
    /// Sorted by number.
    fields: Box<[FieldRule]>,
    /// For a message that starts a Nexus operation: its endpoint, service, operation and input.
    nexus: Option<NexusFields>,
}

impl Plan {
    fn field(&self, number: u32) -> Option<&FieldRule> {
        self.fields
            .binary_search_by_key(&number, |f| f.number)
            .ok()
            .and_then(|i| self.fields.get(i))
    }
}

/// For every message of a descriptor pool, the fields that are, or can reach, a namespace name.
#[derive(Debug)]
pub struct NamespaceFieldIndex {
    plans: Vec<Plan>,
    by_name: HashMap<Box<str>, u32>,
    history: Option<u32>,
    proto3_encoding: Option<i32>,
    /// The request type of each of `SYSTEM_OPERATIONS`.
    system_requests: Vec<Option<u32>>,
}

impl NamespaceFieldIndex {
    /// The index of the API schema in force.
    pub fn global() -> &'static NamespaceFieldIndex {
        Schema::global().namespace_fields()
    }

    pub fn new(pool: &DescriptorPool) -> NamespaceFieldIndex {
        let messages: Vec<MessageDescriptor> = pool.all_messages().collect();
        let by_name: HashMap<Box<str>, u32> = messages
            .iter()
            .enumerate()
            .filter_map(|(i, m)| Some((m.full_name().into(), u32::try_from(i).ok()?)))
            .collect();
        let kinds: Vec<MessageKind> = messages
            .iter()
            .map(|m| match m.full_name() {
                ANY => MessageKind::Any,
                DATA_BLOB => MessageKind::DataBlob,
                _ => MessageKind::Plain,
            })
            .collect();
        // Direct name fields, and message-typed edges.
        let nexus: Vec<Option<NexusFields>> = messages.iter().map(NexusFields::of).collect();
        let mut reaches: Vec<bool> = messages
            .iter()
            .zip(&kinds)
            .zip(&nexus)
            .map(|((m, k), n)| {
                *k != MessageKind::Plain || n.is_some() || m.fields().any(|f| is_name_field(&f))
            })
            .collect();
        let edges: Vec<Vec<(FieldDescriptor, u32)>> = messages
            .iter()
            .map(|m| {
                m.fields()
                    .filter_map(|f| match f.kind() {
                        Kind::Message(target) => {
                            let id = by_name.get(target.full_name()).copied()?;
                            Some((f, id))
                        }
                        _ => None,
                    })
                    .collect()
            })
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
            .zip(&kinds)
            .zip(edges)
            .zip(nexus)
            .enumerate()
            .map(|(i, (((message, kind), edges), nexus))| {
                let reach = reaches.get(i).copied().unwrap_or(false);
                let mut fields: Vec<FieldRule> = Vec::new();
                if reach && *kind == MessageKind::Plain {
                    fields.extend(message.fields().filter(is_name_field).map(|f| FieldRule {
                        number: f.number(),
                        name: f.name().into(),
                        target: Target::Name,
                    }));
                    fields.extend(
                        edges
                            .into_iter()
                            .filter(|(_, t)| reaches.get(*t as usize).copied().unwrap_or(false))
                            .map(|(f, t)| FieldRule {
                                number: f.number(),
                                name: f.name().into(),
                                target: if f.full_name() == RAW_HISTORY_FIELD {
                                    Target::RawHistory
                                } else {
                                    Target::Message(t)
                                },
                            }),
                    );
                }
                fields.sort_by_key(|f| f.number);
                Plan {
                    name: message.full_name().into(),
                    kind: *kind,
                    reaches: reach,
                    fields: fields.into_boxed_slice(),
                    nexus,
                }
            })
            .collect();
        let history = pool
            .get_message_by_name(HISTORY)
            .and_then(|m| by_name.get(m.full_name()).copied());
        let proto3_encoding = pool
            .get_enum_by_name(ENCODING_TYPE)
            .and_then(|e| e.get_value_by_name(ENCODING_TYPE_PROTO3))
            .map(|v| v.number());
        let system_requests = SYSTEM_OPERATIONS
            .iter()
            .map(|o| by_name.get(o.request).copied())
            .collect();
        NamespaceFieldIndex {
            plans,
            by_name,
            history,
            proto3_encoding,
            system_requests,
        }
    }

    fn id(&self, full_name: &str) -> Option<u32> {
        self.by_name.get(full_name).copied()
    }

    fn plan(&self, id: u32) -> Option<&Plan> {
        self.plans.get(id as usize)
    }

    /// Whether the named message can contain a namespace name (`None`: not in the pool).
    pub fn reaches(&self, full_name: &str) -> Option<bool> {
        self.id(full_name)
            .and_then(|id| self.plan(id))
            .map(|p| p.reaches)
    }

    /// Full names of every field that holds a namespace name, sorted (for review).
    pub fn name_fields(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .plans
            .iter()
            .flat_map(|p| {
                p.fields
                    .iter()
                    .filter(|f| f.target == Target::Name)
                    .map(move |f| format!("{}.{}", p.name, f.name))
            })
            .collect();
        out.sort();
        out
    }
}

/// Why a message's namespace names could not be rewritten.
#[derive(Debug, thiserror::Error)]
pub enum NameRewriteError {
    #[error("malformed protobuf at {path}: {source}")]
    Malformed {
        path: String,
        #[source]
        source: WireError,
    },
    #[error("messages nested deeper than {limit} levels at {path}")]
    TooDeep { path: String, limit: usize },
    #[error("cannot translate namespace names at {path}: {reason}")]
    Unsupported { path: String, reason: String },
    #[error("message type {0} is not in the namespace field index")]
    UnknownMessage(String),
    /// The mapping refused a name (e.g. a client naming an upstream name).
    #[error("{0}")]
    Refused(String),
    #[error("namespace rewriter invariant violated: {0}")]
    Internal(String),
}

impl From<WalkError> for NameRewriteError {
    fn from(e: WalkError) -> Self {
        NameRewriteError::Internal(e.to_string())
    }
}

/// Decides the new name for each namespace name found: `Ok(None)` keeps it, `Err` (a reason)
/// fails the rewrite.
pub type NameMapping<'a> = dyn FnMut(&str) -> Result<Option<String>, String> + 'a;

/// Rewrites every namespace name in `input` (a serialized `full_name`) through `map`.
/// `None`: nothing changed (forward the original bytes).
pub fn rewrite_namespaces(
    index: &NamespaceFieldIndex,
    full_name: &str,
    input: &[u8],
    map: &mut NameMapping<'_>,
) -> Result<Option<Vec<u8>>, NameRewriteError> {
    let id = index
        .id(full_name)
        .ok_or_else(|| NameRewriteError::UnknownMessage(full_name.to_string()))?;
    let Some(plan) = index.plan(id).filter(|p| p.reaches) else {
        return Ok(None);
    };
    let mut walk = Walk {
        index,
        map,
        root: &plan.name,
        edits: Vec::new(),
    };
    let delta = walk.message(id, 0, input, 0, None)?;
    if walk.edits.is_empty() {
        return Ok(None);
    }
    let plan = RewritePlan::from_edits(walk.edits, input.len(), delta)?;
    let mut no_writer = NoWriter;
    Ok(Some(plan.apply(input, &mut no_writer)?))
}

/// The rewriter never defers anything.
struct NoWriter;

impl super::walker::PayloadVisitor for NoWriter {
    fn payload(
        &mut self,
        _: &super::walker::PayloadContext<'_>,
        _: &[u8],
    ) -> Result<Option<Vec<u8>>, WalkError> {
        Ok(None)
    }
}

/// A step of the path to the current position, on the stack.
struct Node<'a> {
    parent: Option<&'a Node<'a>>,
    name: &'a str,
}

struct PathDisplay<'a> {
    root: &'a str,
    node: Option<&'a Node<'a>>,
}

impl fmt::Display for PathDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn write(f: &mut fmt::Formatter<'_>, node: &Node<'_>) -> fmt::Result {
            if let Some(parent) = node.parent {
                write(f, parent)?;
            }
            write!(f, ".{}", node.name)
        }
        f.write_str(self.root)?;
        match self.node {
            Some(node) => write(f, node),
            None => Ok(()),
        }
    }
}

struct Walk<'a, 'm> {
    index: &'a NamespaceFieldIndex,
    map: &'a mut NameMapping<'m>,
    root: &'a str,
    edits: Vec<Edit>,
}

impl Walk<'_, '_> {
    fn path(&self, node: Option<&Node<'_>>) -> String {
        PathDisplay {
            root: self.root,
            node,
        }
        .to_string()
    }

    fn malformed(&self, node: Option<&Node<'_>>, source: WireError) -> NameRewriteError {
        NameRewriteError::Malformed {
            path: self.path(node),
            source,
        }
    }

    /// Walks a value of message `id` at `input[base..]`; returns how much it grew.
    fn message(
        &mut self,
        id: u32,
        base: usize,
        buf: &[u8],
        depth: usize,
        node: Option<&Node<'_>>,
    ) -> Result<isize, NameRewriteError> {
        if depth > DEFAULT_MAX_DEPTH {
            return Err(NameRewriteError::TooDeep {
                path: self.path(node),
                limit: DEFAULT_MAX_DEPTH,
            });
        }
        let index = self.index;
        let plan = index
            .plan(id)
            .ok_or_else(|| NameRewriteError::Internal("message id out of range".into()))?;
        match plan.kind {
            MessageKind::Any => return self.any(base, buf, depth, node),
            // A DataBlob reached other than through raw_history has no known contents; the
            // schema has none (the payload walker's review test), so there is nothing to do.
            MessageKind::DataBlob => return Ok(0),
            MessageKind::Plain => {}
        }
        // A Nexus operation at the system endpoint: its input's request names a namespace.
        let system_input = match plan.nexus {
            Some(fields) => match system::system_operation(fields, buf) {
                Ok(Some(operation)) => SYSTEM_OPERATIONS
                    .iter()
                    .position(|o| o == operation)
                    .map(|i| (fields.input, i)),
                _ => None,
            },
            None => None,
        };
        let mut delta = 0;
        for field in wire::fields(buf) {
            let field = field.map_err(|e| self.malformed(node, e))?;
            if let Some((input, operation)) = system_input {
                if field.number == input && field.wire_type == WireType::Len {
                    let child = Node {
                        parent: node,
                        name: "input",
                    };
                    delta += self.descend(base, &field, depth, |walk, at, value, depth| {
                        walk.system_envelope(operation, at, value, depth, Some(&child))
                    })?;
                    continue;
                }
            }
            let Some(rule) = plan.field(field.number) else {
                continue;
            };
            let child = Node {
                parent: node,
                name: &rule.name,
            };
            if field.wire_type != WireType::Len {
                return Err(self.malformed(
                    Some(&child),
                    WireError::UnexpectedWireType {
                        field: field.number,
                    },
                ));
            }
            delta += match rule.target {
                Target::Name => self.name(base, &field)?,
                Target::Message(target) => {
                    self.descend(base, &field, depth, |walk, at, value, depth| {
                        walk.message(target, at, value, depth, Some(&child))
                    })?
                }
                Target::RawHistory => {
                    self.descend(base, &field, depth, |walk, at, value, depth| {
                        walk.raw_history(at, value, depth, Some(&child))
                    })?
                }
            };
        }
        Ok(delta)
    }

    /// A namespace name: replaced when the mapping says so.
    fn name(&mut self, base: usize, field: &Field<'_>) -> Result<isize, NameRewriteError> {
        // A name that is not UTF-8 matches no configured name: left as it is.
        let Ok(name) = std::str::from_utf8(field.value) else {
            return Ok(0);
        };
        let Some(new) = (self.map)(name).map_err(NameRewriteError::Refused)? else {
            return Ok(0);
        };
        if new.as_bytes() == field.value {
            return Ok(0);
        }
        Ok(replace_len_value(
            &mut self.edits,
            base,
            field,
            new.into_bytes(),
        ))
    }

    /// Walks the content of a length-delimited field with `walk`, and rewrites its length
    /// prefix if the content changed size.
    fn descend(
        &mut self,
        base: usize,
        field: &Field<'_>,
        depth: usize,
        walk: impl FnOnce(&mut Self, usize, &[u8], usize) -> Result<isize, NameRewriteError>,
    ) -> Result<isize, NameRewriteError> {
        let value_at = base + value_offset(field);
        let mark = self.edits.len();
        let delta = walk(self, value_at, field.value, depth + 1)?;
        resize_len_prefix(&mut self.edits, mark, base, field, delta)
            .ok_or_else(|| NameRewriteError::Internal("negative length".into()))
    }

    /// `google.protobuf.Any`: `value` (2) walked as the message `type_url` (1) names.
    fn any(
        &mut self,
        base: usize,
        buf: &[u8],
        depth: usize,
        node: Option<&Node<'_>>,
    ) -> Result<isize, NameRewriteError> {
        let mut type_url = None;
        for field in wire::fields(buf) {
            let field = field.map_err(|e| self.malformed(node, e))?;
            if field.number == 1 && field.wire_type == WireType::Len {
                type_url = Some(field.value);
            }
        }
        let Some(name) = wire::any_message_name(type_url) else {
            return Ok(0);
        };
        let index = self.index;
        let Some(id) = index.id(name) else {
            return Ok(0);
        };
        let Some(plan) = index.plan(id).filter(|p| p.reaches) else {
            return Ok(0);
        };
        let child = Node {
            parent: node,
            name: &plan.name,
        };
        let mut delta = 0;
        for field in wire::fields(buf) {
            let field = field.map_err(|e| self.malformed(node, e))?;
            if field.number == 2 {
                if field.wire_type != WireType::Len {
                    return Err(
                        self.malformed(Some(&child), WireError::UnexpectedWireType { field: 2 })
                    );
                }
                delta += self.descend(base, &field, depth, |walk, at, value, depth| {
                    walk.message(id, at, value, depth, Some(&child))
                })?;
            }
        }
        Ok(delta)
    }

    /// A system Nexus envelope: its `data` walked as the operation's request. An input that is
    /// not such an envelope is left as it is.
    fn system_envelope(
        &mut self,
        operation: usize,
        base: usize,
        buf: &[u8],
        depth: usize,
        node: Option<&Node<'_>>,
    ) -> Result<isize, NameRewriteError> {
        let index = self.index;
        let resolved = SYSTEM_OPERATIONS
            .get(operation)
            .zip(index.system_requests.get(operation).copied().flatten());
        let Some((operation, request)) = resolved else {
            return Ok(0);
        };
        let Ok(data) = system::envelope_data(buf, operation) else {
            return Ok(0);
        };
        let child = Node {
            parent: node,
            name: "data",
        };
        let mut delta = 0;
        for field in data {
            delta += self.descend(base, &field, depth, |walk, at, value, depth| {
                walk.message(request, at, value, depth, Some(&child))
            })?;
        }
        Ok(delta)
    }

    /// `raw_history`: a DataBlob (encoding_type = 1, data = 2) whose data is a serialized
    /// History when PROTO3; another encoding with data cannot be read, so it is refused.
    fn raw_history(
        &mut self,
        base: usize,
        buf: &[u8],
        depth: usize,
        node: Option<&Node<'_>>,
    ) -> Result<isize, NameRewriteError> {
        let mut encoding = 0u64;
        let mut has_data = false;
        for field in wire::fields(buf) {
            let field = field.map_err(|e| self.malformed(node, e))?;
            match (field.number, field.wire_type) {
                (1, WireType::Varint) => {
                    encoding = wire::read_varint(field.value, &mut 0)
                        .map_err(|e| self.malformed(node, e))?;
                }
                (2, WireType::Len) => has_data |= !field.value.is_empty(),
                (1 | 2, _) => {
                    return Err(self.malformed(
                        node,
                        WireError::UnexpectedWireType {
                            field: field.number,
                        },
                    ))
                }
                _ => {}
            }
        }
        if !has_data {
            return Ok(0);
        }
        let index = self.index;
        let history = match (index.history, index.proto3_encoding) {
            (Some(history), Some(proto3)) if encoding as i64 == i64::from(proto3) => history,
            _ => {
                return Err(NameRewriteError::Unsupported {
                    path: self.path(node),
                    reason: format!(
                        "raw history in encoding {} cannot be read (only ENCODING_TYPE_PROTO3)",
                        encoding as i64
                    ),
                })
            }
        };
        let child = Node {
            parent: node,
            name: "data<History>",
        };
        let mut delta = 0;
        for field in wire::fields(buf) {
            let field = field.map_err(|e| self.malformed(node, e))?;
            if field.number == 2 {
                delta += self.descend(base, &field, depth, |walk, at, value, depth| {
                    walk.message(history, at, value, depth, Some(&child))
                })?;
            }
        }
        Ok(delta)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use prost::Message;
    use temporalio_protos::google::rpc::Status;
    use temporalio_protos::temporal::api::command::v1::{
        command, Command, StartChildWorkflowExecutionCommandAttributes,
    };
    use temporalio_protos::temporal::api::common::v1::{link, DataBlob, Link, Payload, Payloads};
    use temporalio_protos::temporal::api::errordetails::v1::{
        MultiOperationExecutionFailure, NamespaceNotFoundFailure,
    };
    use temporalio_protos::temporal::api::history::v1::{
        history_event::Attributes, History, HistoryEvent,
        StartChildWorkflowExecutionInitiatedEventAttributes,
        WorkflowExecutionStartedEventAttributes,
    };
    use temporalio_protos::temporal::api::namespace::v1::NamespaceInfo;
    use temporalio_protos::temporal::api::workflowservice::v1::{
        execute_multi_operation_request::{operation, Operation},
        DescribeNamespaceResponse, ExecuteMultiOperationRequest,
        GetWorkflowExecutionHistoryResponse, ListNamespacesResponse, PollActivityTaskQueueResponse,
        RespondWorkflowTaskCompletedRequest, StartWorkflowExecutionRequest,
        UpdateWorkflowExecutionRequest,
    };

    use super::*;

    const WS: &str = "temporal.api.workflowservice.v1.";

    fn index() -> &'static NamespaceFieldIndex {
        NamespaceFieldIndex::global()
    }

    /// payments ↔ payments.a1b2c
    fn forward(name: &str) -> Result<Option<String>, String> {
        Ok((name == "payments").then(|| "payments.a1b2c".to_string()))
    }

    fn backward(name: &str) -> Result<Option<String>, String> {
        Ok((name == "payments.a1b2c").then(|| "payments".to_string()))
    }

    fn rewrite(
        message: &str,
        input: &[u8],
        map: fn(&str) -> Result<Option<String>, String>,
    ) -> Vec<u8> {
        let mut map = map;
        rewrite_namespaces(index(), &format!("{WS}{message}"), input, &mut map)
            .unwrap()
            .unwrap_or_else(|| input.to_vec())
    }

    fn workflow_link(namespace: &str) -> Link {
        Link {
            variant: Some(link::Variant::WorkflowEvent(link::WorkflowEvent {
                namespace: namespace.into(),
                workflow_id: "w".into(),
                ..Default::default()
            })),
        }
    }

    /// Every field the index treats as a namespace name is a `namespace` string or one of the
    /// reviewed others; ids are never among them; the ones translation depends on are there.
    #[test]
    fn name_fields_are_reviewed() {
        let fields = index().name_fields();
        for f in &fields {
            assert!(
                f.ends_with(".namespace") || NAME_FIELDS.contains(&f.as_str()),
                "unexpected name field {f}"
            );
            assert!(!f.contains("namespace_id"), "{f}");
        }
        for expected in NAME_FIELDS.iter().copied().chain([
            "temporal.api.workflowservice.v1.StartWorkflowExecutionRequest.namespace",
            "temporal.api.workflowservice.v1.RespondWorkflowTaskCompletedRequest.namespace",
            "temporal.api.command.v1.StartChildWorkflowExecutionCommandAttributes.namespace",
            "temporal.api.command.v1.SignalExternalWorkflowExecutionCommandAttributes.namespace",
            "temporal.api.history.v1.StartChildWorkflowExecutionInitiatedEventAttributes.namespace",
            "temporal.api.history.v1.SignalExternalWorkflowExecutionInitiatedEventAttributes.namespace",
            "temporal.api.errordetails.v1.NamespaceNotFoundFailure.namespace",
            "temporal.api.errordetails.v1.NamespaceNotActiveFailure.namespace",
            "temporal.api.common.v1.Link.WorkflowEvent.namespace",
            "temporal.api.nexus.v1.EndpointTarget.Worker.namespace",
            "temporal.api.failure.v1.ChildWorkflowExecutionFailureInfo.namespace",
        ]) {
            assert!(fields.iter().any(|f| f == expected), "{expected} missing");
        }
        // Subtrees that cannot hold a name are not walked.
        assert_eq!(
            index().reaches("temporal.api.common.v1.Payloads"),
            Some(false)
        );
        assert_eq!(
            index().reaches("temporal.api.common.v1.Payload"),
            Some(false)
        );
        assert_eq!(index().reaches("google.rpc.Status"), Some(true));
        assert_eq!(index().reaches("no.such.Message"), None);
    }

    /// A request: the top-level namespace and one in a link change; an unknown field, field
    /// order and a payload stay byte for byte; the way back restores the input exactly.
    #[test]
    fn round_trip_keeps_everything_else_verbatim() {
        let request = StartWorkflowExecutionRequest {
            namespace: "payments".into(),
            workflow_id: "wf".into(),
            input: Some(Payloads {
                payloads: vec![Payload {
                    data: b"payments".to_vec(),
                    ..Default::default()
                }],
            }),
            links: vec![workflow_link("payments"), workflow_link("orders")],
            ..Default::default()
        };
        let mut input = request.encode_to_vec();
        // An unknown field from a newer client, after everything.
        wire::put_len_field(&mut input, 999, b"payments");
        let out = rewrite("StartWorkflowExecutionRequest", &input, forward);
        let decoded = StartWorkflowExecutionRequest::decode(out.as_slice()).unwrap();
        assert_eq!(decoded.namespace, "payments.a1b2c");
        assert_eq!(decoded.links[0], workflow_link("payments.a1b2c"));
        assert_eq!(decoded.links[1], workflow_link("orders"));
        assert_eq!(decoded.input, request.input, "payload data is not a name");
        assert!(
            out.ends_with(&input[input.len() - 11..]),
            "unknown field kept"
        );
        assert_eq!(
            rewrite("StartWorkflowExecutionRequest", &out, backward),
            input
        );
        // Nothing to change: None, no copy.
        let mut keep = |_: &str| Ok(None);
        assert!(rewrite_namespaces(
            index(),
            &format!("{WS}StartWorkflowExecutionRequest"),
            &input,
            &mut keep
        )
        .unwrap()
        .is_none());
    }

    /// Nested request namespaces: ExecuteMultiOperation operations, commands of a workflow
    /// task completion (and its own namespace, field 9).
    #[test]
    #[allow(deprecated)] // the child command's namespace: deprecated, still on the wire
    fn nested_request_names_are_translated() {
        let multi = ExecuteMultiOperationRequest {
            namespace: "payments".into(),
            operations: vec![
                Operation {
                    operation: Some(operation::Operation::StartWorkflow(
                        StartWorkflowExecutionRequest {
                            namespace: "payments".into(),
                            ..Default::default()
                        },
                    )),
                },
                Operation {
                    operation: Some(operation::Operation::UpdateWorkflow(
                        UpdateWorkflowExecutionRequest {
                            namespace: "payments".into(),
                            ..Default::default()
                        },
                    )),
                },
            ],
            ..Default::default()
        };
        let out = rewrite(
            "ExecuteMultiOperationRequest",
            &multi.encode_to_vec(),
            forward,
        );
        let decoded = ExecuteMultiOperationRequest::decode(out.as_slice()).unwrap();
        let mut expected = multi.clone();
        expected.namespace = "payments.a1b2c".into();
        for op in &mut expected.operations {
            match &mut op.operation {
                Some(operation::Operation::StartWorkflow(r)) => {
                    r.namespace = "payments.a1b2c".into()
                }
                Some(operation::Operation::UpdateWorkflow(r)) => {
                    r.namespace = "payments.a1b2c".into()
                }
                None => {}
            }
        }
        assert_eq!(decoded, expected);

        let completed = RespondWorkflowTaskCompletedRequest {
            task_token: b"token".to_vec(),
            namespace: "payments".into(),
            commands: vec![Command {
                attributes: Some(
                    command::Attributes::StartChildWorkflowExecutionCommandAttributes(
                        StartChildWorkflowExecutionCommandAttributes {
                            namespace: "payments".into(),
                            workflow_id: "child".into(),
                            ..Default::default()
                        },
                    ),
                ),
                ..Default::default()
            }],
            ..Default::default()
        };
        let out = rewrite(
            "RespondWorkflowTaskCompletedRequest",
            &completed.encode_to_vec(),
            forward,
        );
        let decoded = RespondWorkflowTaskCompletedRequest::decode(out.as_slice()).unwrap();
        assert_eq!(decoded.namespace, "payments.a1b2c");
        let Some(command::Attributes::StartChildWorkflowExecutionCommandAttributes(child)) =
            &decoded.commands[0].attributes
        else {
            panic!("command kept")
        };
        assert_eq!(child.namespace, "payments.a1b2c");
        assert_eq!(decoded.task_token, b"token");
    }

    /// Responses: NamespaceInfo names, ListNamespaces entries, history events, the activity
    /// task's workflow namespace.
    #[test]
    fn response_names_are_translated_back() {
        let describe = |name: &str| DescribeNamespaceResponse {
            namespace_info: Some(NamespaceInfo {
                name: name.into(),
                id: "0b0f-id".into(),
                description: "payments.a1b2c in prose is not a name field".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let out = rewrite(
            "DescribeNamespaceResponse",
            &describe("payments.a1b2c").encode_to_vec(),
            backward,
        );
        assert_eq!(
            DescribeNamespaceResponse::decode(out.as_slice()).unwrap(),
            describe("payments")
        );

        let list = ListNamespacesResponse {
            namespaces: vec![describe("default"), describe("payments.a1b2c")],
            next_page_token: vec![],
        };
        let out = rewrite("ListNamespacesResponse", &list.encode_to_vec(), backward);
        let names: Vec<String> = ListNamespacesResponse::decode(out.as_slice())
            .unwrap()
            .namespaces
            .into_iter()
            .filter_map(|n| n.namespace_info.map(|i| i.name))
            .collect();
        assert_eq!(names, ["default", "payments"]);

        let page = GetWorkflowExecutionHistoryResponse {
            history: Some(History {
                events: vec![
                    HistoryEvent {
                        event_id: 1,
                        attributes: Some(Attributes::WorkflowExecutionStartedEventAttributes(
                            WorkflowExecutionStartedEventAttributes {
                                parent_workflow_namespace: "payments.a1b2c".into(),
                                input: Some(Payloads {
                                    payloads: vec![Payload::default()],
                                }),
                                ..Default::default()
                            },
                        )),
                        ..Default::default()
                    },
                    HistoryEvent {
                        event_id: 2,
                        attributes: Some(
                            Attributes::StartChildWorkflowExecutionInitiatedEventAttributes(
                                StartChildWorkflowExecutionInitiatedEventAttributes {
                                    namespace: "payments.a1b2c".into(),
                                    ..Default::default()
                                },
                            ),
                        ),
                        ..Default::default()
                    },
                ],
            }),
            ..Default::default()
        };
        let out = rewrite(
            "GetWorkflowExecutionHistoryResponse",
            &page.encode_to_vec(),
            backward,
        );
        let events = GetWorkflowExecutionHistoryResponse::decode(out.as_slice())
            .unwrap()
            .history
            .unwrap()
            .events;
        let Some(Attributes::WorkflowExecutionStartedEventAttributes(started)) =
            &events[0].attributes
        else {
            panic!()
        };
        assert_eq!(started.parent_workflow_namespace, "payments");
        let Some(Attributes::StartChildWorkflowExecutionInitiatedEventAttributes(child)) =
            &events[1].attributes
        else {
            panic!()
        };
        assert_eq!(child.namespace, "payments");

        let task = PollActivityTaskQueueResponse {
            workflow_namespace: "payments.a1b2c".into(),
            ..Default::default()
        };
        let out = rewrite(
            "PollActivityTaskQueueResponse",
            &task.encode_to_vec(),
            backward,
        );
        assert_eq!(
            PollActivityTaskQueueResponse::decode(out.as_slice())
                .unwrap()
                .workflow_namespace,
            "payments"
        );
    }

    /// The request inside a system Nexus envelope names a namespace the server reads: it is
    /// translated there and back; the envelope is otherwise left as it is.
    #[test]
    fn system_nexus_envelopes_are_translated_inside() {
        use temporalio_protos::temporal::api::command::v1::ScheduleNexusOperationCommandAttributes;
        use temporalio_protos::temporal::api::history::v1::NexusOperationScheduledEventAttributes;
        use temporalio_protos::temporal::api::workflowservice::v1::SignalWithStartWorkflowExecutionRequest;
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
                input: Some(Payloads::default()),
                ..Default::default()
            }
            .encode_to_vec(),
            ..Default::default()
        };
        let completed = |input: Payload| RespondWorkflowTaskCompletedRequest {
            namespace: "payments".into(),
            commands: vec![Command {
                attributes: Some(
                    command::Attributes::ScheduleNexusOperationCommandAttributes(
                        ScheduleNexusOperationCommandAttributes {
                            endpoint: "__temporal_system".into(),
                            service: "temporal.api.workflowservice.v1.WorkflowService".into(),
                            operation: "SignalWithStartWorkflowExecution".into(),
                            input: Some(input),
                            ..Default::default()
                        },
                    ),
                ),
                ..Default::default()
            }],
            ..Default::default()
        };
        let out = RespondWorkflowTaskCompletedRequest::decode(
            rewrite(
                "RespondWorkflowTaskCompletedRequest",
                &completed(envelope("payments", true)).encode_to_vec(),
                forward,
            )
            .as_slice(),
        )
        .unwrap();
        assert_eq!(out, {
            let mut expected = completed(envelope("payments.a1b2c", true));
            expected.namespace = "payments.a1b2c".into();
            expected
        });
        // Not an envelope: left alone (the payload walker refuses it).
        let plain = completed(envelope("payments", false));
        let out = RespondWorkflowTaskCompletedRequest::decode(
            rewrite(
                "RespondWorkflowTaskCompletedRequest",
                &plain.encode_to_vec(),
                forward,
            )
            .as_slice(),
        )
        .unwrap();
        assert_eq!(out.commands, plain.commands);
        // Back in the scheduled event of a history.
        let page = |namespace: &str| GetWorkflowExecutionHistoryResponse {
            history: Some(History {
                events: vec![HistoryEvent {
                    attributes: Some(Attributes::NexusOperationScheduledEventAttributes(
                        NexusOperationScheduledEventAttributes {
                            endpoint: "__temporal_system".into(),
                            service: "temporal.api.workflowservice.v1.WorkflowService".into(),
                            operation: "SignalWithStartWorkflowExecution".into(),
                            input: Some(envelope(namespace, true)),
                            ..Default::default()
                        },
                    )),
                    ..Default::default()
                }],
            }),
            ..Default::default()
        };
        let back = rewrite(
            "GetWorkflowExecutionHistoryResponse",
            &page("payments.a1b2c").encode_to_vec(),
            backward,
        );
        assert_eq!(
            GetWorkflowExecutionHistoryResponse::decode(back.as_slice()).unwrap(),
            page("payments")
        );
    }

    fn any_of(type_name: &str, value: Vec<u8>) -> prost_wkt_types::Any {
        prost_wkt_types::Any {
            type_url: format!("type.googleapis.com/{type_name}"),
            value,
        }
    }

    /// Error details: NamespaceNotFoundFailure in a Status, and inside the statuses of a
    /// MultiOperationExecutionFailure (Any within Any).
    #[test]
    fn error_details_are_translated() {
        let not_found = NamespaceNotFoundFailure {
            namespace: "payments.a1b2c".into(),
        };
        let nested = MultiOperationExecutionFailure {
            statuses: vec![temporalio_protos::temporal::api::errordetails::v1::multi_operation_execution_failure::OperationStatus {
                code: 5,
                message: "not found".into(),
                details: vec![any_of(
                    "temporal.api.errordetails.v1.NamespaceNotFoundFailure",
                    not_found.encode_to_vec(),
                )],
            }],
        };
        let status = Status {
            code: 5,
            message: "Namespace payments.a1b2c is not found.".into(),
            details: vec![
                any_of(
                    "temporal.api.errordetails.v1.NamespaceNotFoundFailure",
                    not_found.encode_to_vec(),
                ),
                any_of(
                    "temporal.api.errordetails.v1.MultiOperationExecutionFailure",
                    nested.encode_to_vec(),
                ),
                any_of("unknown.Type", b"payments.a1b2c".to_vec()),
            ],
        };
        let mut map = backward;
        let out = rewrite_namespaces(
            index(),
            "google.rpc.Status",
            &status.encode_to_vec(),
            &mut map,
        )
        .unwrap()
        .unwrap();
        let decoded = Status::decode(out.as_slice()).unwrap();
        let first = NamespaceNotFoundFailure::decode(decoded.details[0].value.as_slice()).unwrap();
        assert_eq!(first.namespace, "payments");
        let multi =
            MultiOperationExecutionFailure::decode(decoded.details[1].value.as_slice()).unwrap();
        let inner = NamespaceNotFoundFailure::decode(multi.statuses[0].details[0].value.as_slice())
            .unwrap();
        assert_eq!(inner.namespace, "payments");
        assert_eq!(
            decoded.details[2], status.details[2],
            "unknown types untouched"
        );
        // The message text is not a name field (translate.rs handles it separately).
        assert_eq!(decoded.message, status.message);
    }

    #[test]
    fn raw_history_is_walked_and_other_encodings_refused() {
        let history = History {
            events: vec![HistoryEvent {
                attributes: Some(
                    Attributes::StartChildWorkflowExecutionInitiatedEventAttributes(
                        StartChildWorkflowExecutionInitiatedEventAttributes {
                            namespace: "payments.a1b2c".into(),
                            ..Default::default()
                        },
                    ),
                ),
                ..Default::default()
            }],
        };
        let page = |encoding| GetWorkflowExecutionHistoryResponse {
            raw_history: vec![DataBlob {
                encoding_type: encoding,
                data: history.encode_to_vec(),
            }],
            ..Default::default()
        };
        let out = rewrite(
            "GetWorkflowExecutionHistoryResponse",
            &page(1).encode_to_vec(),
            backward,
        );
        let decoded = GetWorkflowExecutionHistoryResponse::decode(out.as_slice()).unwrap();
        let inner = History::decode(decoded.raw_history[0].data.as_slice()).unwrap();
        let Some(Attributes::StartChildWorkflowExecutionInitiatedEventAttributes(child)) =
            &inner.events[0].attributes
        else {
            panic!()
        };
        assert_eq!(child.namespace, "payments");
        let mut map = backward;
        let err = rewrite_namespaces(
            index(),
            &format!("{WS}GetWorkflowExecutionHistoryResponse"),
            &page(2).encode_to_vec(),
            &mut map,
        )
        .unwrap_err();
        assert!(matches!(err, NameRewriteError::Unsupported { .. }), "{err}");
    }

    #[test]
    fn a_refusal_fails_the_rewrite() {
        let request = StartWorkflowExecutionRequest {
            namespace: "ok".into(),
            links: vec![workflow_link("payments.a1b2c")],
            ..Default::default()
        };
        let mut refuse = |name: &str| {
            if name == "payments.a1b2c" {
                Err(name.to_string())
            } else {
                Ok(None)
            }
        };
        let err = rewrite_namespaces(
            index(),
            &format!("{WS}StartWorkflowExecutionRequest"),
            &request.encode_to_vec(),
            &mut refuse,
        )
        .unwrap_err();
        assert!(
            matches!(err, NameRewriteError::Refused(ref n) if n == "payments.a1b2c"),
            "{err}"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

        /// Names of any length (length prefixes of the name and of every ancestor cross varint
        /// boundaries): the result decodes to the typed transform, and the way back is exact.
        #[test]
        fn any_lengths_round_trip(
            short in "[a-z]{1,4}",
            long in "[a-z.]{100,300}",
            children in prop::collection::vec(any::<bool>(), 1..6),
        ) {
            let name_of = |long_one: bool| if long_one { long.clone() } else { short.clone() };
            let events: Vec<HistoryEvent> = children.iter().enumerate().map(|(i, l)| HistoryEvent {
                event_id: i as i64,
                attributes: Some(Attributes::StartChildWorkflowExecutionInitiatedEventAttributes(
                    StartChildWorkflowExecutionInitiatedEventAttributes {
                        namespace: name_of(*l),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            }).collect();
            let page = GetWorkflowExecutionHistoryResponse {
                history: Some(History { events }),
                next_page_token: b"n".to_vec(),
                ..Default::default()
            };
            let input = page.encode_to_vec();
            let (s, l) = (short.clone(), long.clone());
            // Swap the two names.
            let mut swap = move |name: &str| Ok(if name == s { Some(l.clone()) } else if name == l { Some(s.clone()) } else { None });
            let message = format!("{WS}GetWorkflowExecutionHistoryResponse");
            let out = rewrite_namespaces(index(), &message, &input, &mut swap).unwrap().unwrap_or_else(|| input.clone());
            let decoded = GetWorkflowExecutionHistoryResponse::decode(out.as_slice()).unwrap();
            let names: Vec<String> = decoded.history.unwrap().events.into_iter().filter_map(|e| match e.attributes {
                Some(Attributes::StartChildWorkflowExecutionInitiatedEventAttributes(a)) => Some(a.namespace),
                _ => None,
            }).collect();
            let expected: Vec<String> = children.iter().map(|l| name_of(!*l)).collect();
            prop_assert_eq!(names, expected);
            let back = rewrite_namespaces(index(), &message, &out, &mut swap).unwrap().unwrap_or_else(|| out.clone());
            prop_assert_eq!(back, input);
        }

        /// Arbitrary bytes never panic.
        #[test]
        fn malformed_input_is_an_error_not_a_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            for message in ["StartWorkflowExecutionRequest", "PollWorkflowTaskQueueResponse", "ListNamespacesResponse"] {
                let mut map = forward;
                let _ = rewrite_namespaces(index(), &format!("{WS}{message}"), &bytes, &mut map);
            }
            let mut map = backward;
            let _ = rewrite_namespaces(index(), "google.rpc.Status", &bytes, &mut map);
        }
    }
}
