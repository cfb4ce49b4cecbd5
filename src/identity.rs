//! Verified identity in Temporal's history: the `identity` a request carries (who started,
//! signalled, terminated, completed a task, …) is whatever the client chose to send. This
//! module stamps the caller's verified identity into it, at the wire level, driven by the
//! descriptors: no per-method list to maintain.
//!
//! Which fields carry the caller's identity is decided once from the descriptor pool
//! ([`IdentityFieldIndex`]): every `string` field named exactly `identity`, in any message a
//! request reaches, except
//! - inside `temporal.api.failure.v1` (an `ActivityFailureInfo.identity` in a failure a
//!   workflow reports names the worker that ran the activity, recorded by the server),
//! - behind a `google.protobuf.Any` (a workflow task's protocol messages echo the update
//!   request they accept, with the *updater's* identity),
//! - fields with other names (`manager_identity` names the identity to make manager; it is a
//!   value, not the caller).
//!
//! A test lists the fields this selects, for review. Every occurrence is rewritten; a message
//! that is present but carries no identity gets one (the server records an empty identity
//! otherwise). Absent nested messages are not created. Every other byte is copied verbatim.

use std::collections::HashMap;

use prost_reflect::{DescriptorPool, FieldDescriptor, Kind, MessageDescriptor};
use serde::{Deserialize, Serialize};

use crate::payload::walker::{
    delta_of, replace_len_value, resize_len_prefix, value_offset, Edit, Replacement, RewritePlan,
    DEFAULT_MAX_DEPTH,
};
use crate::payload::wire::{self, Field, WireError, WireType};
use crate::schema::Schema;

/// What a namespace does with the `identity` a client sends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdentityMode {
    /// Forward it as the client sent it.
    Keep,
    /// Replace it with the verified identity (`spiffe://…`, `cn:…`, `jwt:…`, `anonymous`).
    Replace,
    /// `client-identity (via portcullis: VERIFIED)`.
    #[default]
    Append,
}

impl IdentityMode {
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityMode::Keep => "keep",
            IdentityMode::Replace => "replace",
            IdentityMode::Append => "append",
        }
    }
}

/// Temporal's frontend refuses an identity longer than `limit.maxIDLength` (1000 bytes by
/// default, also on Temporal Cloud): stamped identities stay within it.
pub const MAX_IDENTITY_BYTES: usize = 1000;

/// What `append` puts between the client's identity and the verified one.
pub const APPEND_PREFIX: &str = " (via portcullis: ";

/// The identity to send for a client's `client` under `mode`, within
/// [`MAX_IDENTITY_BYTES`]. `None`: keep the client's.
pub fn stamped(mode: IdentityMode, client: &str, verified: &str) -> Option<String> {
    match mode {
        IdentityMode::Keep => None,
        IdentityMode::Replace => Some(cut(verified, MAX_IDENTITY_BYTES).to_string()),
        IdentityMode::Append => {
            let suffix_len = APPEND_PREFIX.len() + verified.len() + 1;
            if suffix_len >= MAX_IDENTITY_BYTES {
                // A verified name this long is cut, but never the client's at its expense.
                let mut out = String::with_capacity(MAX_IDENTITY_BYTES);
                out.push_str(APPEND_PREFIX.trim_start());
                out.push_str(cut(verified, MAX_IDENTITY_BYTES - out.len() - 1));
                out.push(')');
                return Some(out);
            }
            let budget = MAX_IDENTITY_BYTES - suffix_len;
            let mut out = String::with_capacity(client.len().min(budget) + suffix_len);
            if client.len() > budget {
                // Cut, and say so: `…` is 3 bytes.
                out.push_str(cut(client, budget.saturating_sub(3)));
                out.push('…');
            } else {
                out.push_str(client);
            }
            if out.is_empty() {
                out.push_str(APPEND_PREFIX.trim_start());
            } else {
                out.push_str(APPEND_PREFIX);
            }
            out.push_str(verified);
            out.push(')');
            Some(out)
        }
    }
}

/// The longest prefix of `text` of at most `max` bytes that ends at a character boundary.
fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while end > 0 && !text.is_char_boundary(end) {
        end -= 1;
    }
    text.get(..end).unwrap_or_default()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Identity,
    Message(u32),
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
    reaches: bool,
    /// The number of its own `identity` field, if it has one.
    identity: Option<u32>,
    /// Sorted by number.
    fields: Box<[FieldRule]>,
}

impl Plan {
    fn field(&self, number: u32) -> Option<&FieldRule> {
        self.fields
            .binary_search_by_key(&number, |f| f.number)
            .ok()
            .and_then(|i| self.fields.get(i))
    }
}

/// For every message of a descriptor pool, its caller-identity field and the fields that can
/// reach one.
#[derive(Debug)]
pub struct IdentityFieldIndex {
    plans: Vec<Plan>,
    by_name: HashMap<Box<str>, u32>,
}

const SKIPPED_PACKAGE: &str = "temporal.api.failure.v1.";
const ANY: &str = "google.protobuf.Any";

fn is_identity_field(message: &MessageDescriptor, field: &FieldDescriptor) -> bool {
    field.name() == "identity"
        && matches!(field.kind(), Kind::String)
        && !field.is_list()
        && !field.is_map()
        && !message.full_name().starts_with(SKIPPED_PACKAGE)
}

impl IdentityFieldIndex {
    /// The index of the API schema in force.
    pub fn global() -> &'static IdentityFieldIndex {
        Schema::global().identity_fields()
    }

    pub fn new(pool: &DescriptorPool) -> IdentityFieldIndex {
        let messages: Vec<MessageDescriptor> = pool.all_messages().collect();
        let by_name: HashMap<Box<str>, u32> = messages
            .iter()
            .enumerate()
            .filter_map(|(i, m)| Some((m.full_name().into(), u32::try_from(i).ok()?)))
            .collect();
        let walkable = |m: &MessageDescriptor| {
            m.full_name() != ANY && !m.full_name().starts_with(SKIPPED_PACKAGE)
        };
        let identity: Vec<Option<u32>> = messages
            .iter()
            .map(|m| {
                m.fields()
                    .find(|f| is_identity_field(m, f))
                    .map(|f| f.number())
            })
            .collect();
        let edges: Vec<Vec<(FieldDescriptor, u32)>> = messages
            .iter()
            .map(|m| {
                m.fields()
                    .filter_map(|f| match f.kind() {
                        Kind::Message(target) if walkable(&target) => {
                            Some((f.clone(), by_name.get(target.full_name()).copied()?))
                        }
                        _ => None,
                    })
                    .collect()
            })
            .collect();
        let mut reaches: Vec<bool> = identity.iter().map(Option::is_some).collect();
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
            .zip(edges)
            .enumerate()
            .map(|(i, (message, edges))| {
                let reach = reaches.get(i).copied().unwrap_or(false) && walkable(message);
                let own = identity.get(i).copied().flatten();
                let mut fields: Vec<FieldRule> = Vec::new();
                if reach {
                    if let Some(number) = own {
                        fields.push(FieldRule {
                            number,
                            name: "identity".into(),
                            target: Target::Identity,
                        });
                    }
                    fields.extend(
                        edges
                            .into_iter()
                            .filter(|(_, t)| reaches.get(*t as usize).copied().unwrap_or(false))
                            .map(|(f, t)| FieldRule {
                                number: f.number(),
                                name: f.name().into(),
                                target: Target::Message(t),
                            }),
                    );
                }
                fields.sort_by_key(|f| f.number);
                Plan {
                    name: message.full_name().into(),
                    reaches: reach,
                    identity: own.filter(|_| reach),
                    fields: fields.into_boxed_slice(),
                }
            })
            .collect();
        IdentityFieldIndex { plans, by_name }
    }

    fn id(&self, full_name: &str) -> Option<u32> {
        self.by_name.get(full_name).copied()
    }

    fn plan(&self, id: u32) -> Option<&Plan> {
        self.plans.get(id as usize)
    }

    /// Whether the named message can carry a caller identity (`None`: not in the pool).
    pub fn reaches(&self, full_name: &str) -> Option<bool> {
        self.id(full_name)
            .and_then(|id| self.plan(id))
            .map(|p| p.reaches)
    }

    /// Full names of the identity fields reachable from `root`, sorted (for review).
    pub fn identity_fields_from(&self, root: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut stack: Vec<u32> = self.id(root).into_iter().collect();
        while let Some(id) = stack.pop() {
            if !seen.insert(id) {
                continue;
            }
            let Some(plan) = self.plan(id).filter(|p| p.reaches) else {
                continue;
            };
            for f in plan.fields.iter() {
                match f.target {
                    Target::Identity => out.push(format!("{}.{}", plan.name, f.name)),
                    Target::Message(t) => stack.push(t),
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }
}

/// Why a message's identity fields could not be stamped.
#[derive(Debug, thiserror::Error)]
pub enum StampError {
    #[error("malformed protobuf at {path}: {source}")]
    Malformed {
        path: String,
        #[source]
        source: WireError,
    },
    #[error("messages nested deeper than {limit} levels at {path}")]
    TooDeep { path: String, limit: usize },
    #[error("message type {0} is not in the identity field index")]
    UnknownMessage(String),
    #[error("identity stamping invariant violated: {0}")]
    Internal(String),
}

/// Stamps every caller-identity field of `input` (a serialized `full_name`) with `stamp`
/// (the client's value in, the value to send out). `None`: the message carries no identity
/// (forward the original bytes).
pub fn stamp_identities(
    index: &IdentityFieldIndex,
    full_name: &str,
    input: &[u8],
    stamp: &mut dyn FnMut(&str) -> String,
) -> Result<Option<Vec<u8>>, StampError> {
    let id = index
        .id(full_name)
        .ok_or_else(|| StampError::UnknownMessage(full_name.to_string()))?;
    if !index.plan(id).is_some_and(|p| p.reaches) {
        return Ok(None);
    }
    let mut walk = Walk {
        index,
        stamp,
        root: full_name,
        edits: Vec::new(),
    };
    let delta = walk.message(id, 0, input, 0)?;
    if walk.edits.is_empty() {
        return Ok(None);
    }
    let plan = RewritePlan::from_edits(walk.edits, input.len(), delta)
        .map_err(|e| StampError::Internal(e.to_string()))?;
    let mut no_writer = NoWriter;
    plan.apply(input, &mut no_writer)
        .map(Some)
        .map_err(|e| StampError::Internal(e.to_string()))
}

/// The stamper never defers anything.
struct NoWriter;

impl crate::payload::walker::PayloadVisitor for NoWriter {
    fn payload(
        &mut self,
        _: &crate::payload::walker::PayloadContext<'_>,
        _: &[u8],
    ) -> Result<Option<Vec<u8>>, crate::payload::walker::WalkError> {
        Ok(None)
    }
}

struct Walk<'a> {
    index: &'a IdentityFieldIndex,
    stamp: &'a mut dyn FnMut(&str) -> String,
    root: &'a str,
    edits: Vec<Edit>,
}

impl Walk<'_> {
    fn malformed(&self, plan: &Plan, source: WireError) -> StampError {
        StampError::Malformed {
            path: format!("{} (in {})", plan.name, self.root),
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
    ) -> Result<isize, StampError> {
        let index = self.index;
        let plan = index
            .plan(id)
            .ok_or_else(|| StampError::Internal("message id out of range".into()))?;
        if depth > DEFAULT_MAX_DEPTH {
            return Err(StampError::TooDeep {
                path: format!("{} (in {})", plan.name, self.root),
                limit: DEFAULT_MAX_DEPTH,
            });
        }
        let mut delta = 0;
        let mut stamped_one = false;
        for field in wire::fields(buf) {
            let field = field.map_err(|e| self.malformed(plan, e))?;
            let Some(rule) = plan.field(field.number) else {
                continue;
            };
            if field.wire_type != WireType::Len {
                return Err(self.malformed(
                    plan,
                    WireError::UnexpectedWireType {
                        field: field.number,
                    },
                ));
            }
            delta += match rule.target {
                Target::Identity => {
                    stamped_one = true;
                    self.identity(base, &field)?
                }
                Target::Message(target) => self.descend(base, &field, depth, target)?,
            };
        }
        if let (Some(number), false) = (plan.identity, stamped_one) {
            // Present without an identity: the server would record an empty one.
            let value = (self.stamp)("");
            let mut bytes = Vec::with_capacity(value.len() + 8);
            wire::put_len_field(&mut bytes, number, value.as_bytes());
            delta += delta_of(bytes.len(), 0);
            self.edits.push(Edit {
                start: base + buf.len(),
                end: base + buf.len(),
                with: Replacement::Bytes(bytes),
            });
        }
        Ok(delta)
    }

    /// One occurrence of an identity field: its content replaced.
    fn identity(&mut self, base: usize, field: &Field<'_>) -> Result<isize, StampError> {
        let client = String::from_utf8_lossy(field.value);
        let new = (self.stamp)(&client);
        Ok(replace_len_value(
            &mut self.edits,
            base,
            field,
            new.into_bytes(),
        ))
    }

    /// Walks a nested message and rewrites its length prefix if it changed size.
    fn descend(
        &mut self,
        base: usize,
        field: &Field<'_>,
        depth: usize,
        target: u32,
    ) -> Result<isize, StampError> {
        let value_at = base + value_offset(field);
        let mark = self.edits.len();
        let delta = self.message(target, value_at, field.value, depth + 1)?;
        resize_len_prefix(&mut self.edits, mark, base, field, delta)
            .ok_or_else(|| StampError::Internal("negative length".into()))
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use temporalio_protos::temporal::api::batch::v1::BatchOperationTermination;
    use temporalio_protos::temporal::api::common::v1::{Payload, Payloads};
    use temporalio_protos::temporal::api::failure::v1::{
        failure::FailureInfo, ActivityFailureInfo, Failure,
    };
    use temporalio_protos::temporal::api::update::v1::{Meta, Request};
    use temporalio_protos::temporal::api::workflowservice::v1::{
        execute_multi_operation_request::{operation, Operation},
        start_batch_operation_request, ExecuteMultiOperationRequest, PollWorkflowTaskQueueRequest,
        RespondActivityTaskFailedRequest, SignalWorkflowExecutionRequest,
        StartBatchOperationRequest, StartWorkflowExecutionRequest, UpdateWorkflowExecutionRequest,
    };

    use super::*;

    const WS: &str = "temporal.api.workflowservice.v1.";

    fn stamp(message: &str, input: &[u8], mode: IdentityMode) -> Vec<u8> {
        let mut f = |client: &str| stamped(mode, client, "spiffe://corp/w").unwrap_or_default();
        stamp_identities(
            IdentityFieldIndex::global(),
            &format!("{WS}{message}"),
            input,
            &mut f,
        )
        .unwrap()
        .unwrap_or_else(|| input.to_vec())
    }

    #[test]
    fn formats_stay_within_temporal_limits() {
        assert_eq!(
            stamped(IdentityMode::Append, "123@host", "cn:alice").unwrap(),
            "123@host (via portcullis: cn:alice)"
        );
        assert_eq!(
            stamped(IdentityMode::Append, "", "cn:alice").unwrap(),
            "(via portcullis: cn:alice)"
        );
        assert_eq!(
            stamped(IdentityMode::Replace, "123@host", "cn:alice").unwrap(),
            "cn:alice"
        );
        assert_eq!(stamped(IdentityMode::Keep, "123@host", "cn:alice"), None);
        // A client identity that would push past 1000 bytes is cut (at a character boundary)
        // and marked; the verified part is whole.
        let long = "é".repeat(700);
        let out = stamped(IdentityMode::Append, &long, "spiffe://corp/w").unwrap();
        assert!(out.len() <= MAX_IDENTITY_BYTES, "{}", out.len());
        assert!(
            out.ends_with("… (via portcullis: spiffe://corp/w)"),
            "{out}"
        );
        // An absurdly long verified name is cut too.
        let huge = format!("spiffe://corp/{}", "x".repeat(2000));
        for mode in [IdentityMode::Append, IdentityMode::Replace] {
            let out = stamped(mode, "c", &huge).unwrap();
            assert!(out.len() <= MAX_IDENTITY_BYTES, "{mode:?} {}", out.len());
        }
    }

    /// The fields stamped for a few requests: top level, nested requests, update metadata,
    /// batch operations; never failure infos or protocol message bodies.
    #[test]
    fn identity_fields_are_reviewed() {
        let index = IdentityFieldIndex::global();
        let of = |m: &str| index.identity_fields_from(&format!("{WS}{m}"));
        assert_eq!(
            of("StartWorkflowExecutionRequest"),
            [format!("{WS}StartWorkflowExecutionRequest.identity")]
        );
        assert_eq!(
            of("ExecuteMultiOperationRequest"),
            [
                "temporal.api.update.v1.Meta.identity".to_string(),
                format!("{WS}StartWorkflowExecutionRequest.identity"),
            ]
        );
        let batch = of("StartBatchOperationRequest");
        assert!(batch.contains(&"temporal.api.batch.v1.BatchOperationTermination.identity".into()));
        assert!(
            batch
                .iter()
                .all(|f| f.starts_with("temporal.api.batch.v1.")),
            "{batch:?}"
        );
        // A workflow task completion: its own identity only (commands' failures and the update
        // requests echoed in protocol messages are someone else's).
        assert_eq!(
            of("RespondWorkflowTaskCompletedRequest"),
            [format!("{WS}RespondWorkflowTaskCompletedRequest.identity")]
        );
        assert_eq!(
            of("RespondActivityTaskFailedRequest"),
            [format!("{WS}RespondActivityTaskFailedRequest.identity")]
        );
        assert_eq!(
            of("SetWorkerDeploymentManagerRequest"),
            [format!("{WS}SetWorkerDeploymentManagerRequest.identity")],
            "manager_identity is a value, not the caller"
        );
        assert_eq!(
            index.reaches(&format!("{WS}DescribeNamespaceRequest")),
            Some(false)
        );
        assert_eq!(
            index.reaches(&format!("{WS}ListNamespacesRequest")),
            Some(false)
        );
        // Every identity field any request reaches is named `identity` and is no failure's.
        let pool = Schema::global().descriptors().unwrap();
        for method in pool
            .services()
            .flat_map(|s| s.methods().collect::<Vec<_>>())
        {
            for field in index.identity_fields_from(method.input().full_name()) {
                assert!(field.ends_with(".identity"), "{field}");
                assert!(!field.starts_with(SKIPPED_PACKAGE), "{field}");
            }
        }
    }

    #[test]
    fn every_occurrence_is_stamped_and_everything_else_kept() {
        let request = SignalWorkflowExecutionRequest {
            namespace: "ns".into(),
            signal_name: "go".into(),
            identity: "123@host".into(),
            input: Some(Payloads {
                payloads: vec![Payload {
                    data: b"identity".to_vec(),
                    ..Default::default()
                }],
            }),
            ..Default::default()
        };
        let mut input = request.encode_to_vec();
        // A second identity (last wins in protobuf): stamped too.
        wire::put_len_field(&mut input, 5, b"(via portcullis: spiffe://corp/admin)");
        // An unknown field from a newer client.
        wire::put_len_field(&mut input, 999, b"kept");
        let out = stamp(
            "SignalWorkflowExecutionRequest",
            &input,
            IdentityMode::Append,
        );
        let decoded = SignalWorkflowExecutionRequest::decode(out.as_slice()).unwrap();
        assert_eq!(
            decoded.identity,
            "(via portcullis: spiffe://corp/admin) (via portcullis: spiffe://corp/w)"
        );
        assert_eq!(decoded.input, request.input);
        assert!(
            out.ends_with(&input[input.len() - 7..]),
            "unknown field kept"
        );
        let count = wire::fields(&out)
            .filter(|f| f.as_ref().is_ok_and(|f| f.number == 5))
            .count();
        assert_eq!(count, 2);
        let first = wire::fields(&out)
            .filter_map(Result::ok)
            .find(|f| f.number == 5)
            .unwrap();
        assert_eq!(first.value, b"123@host (via portcullis: spiffe://corp/w)");
        // Keep: nothing to do.
        let mut keep = |c: &str| c.to_string();
        let same = stamp_identities(
            IdentityFieldIndex::global(),
            &format!("{WS}SignalWorkflowExecutionRequest"),
            &request.encode_to_vec(),
            &mut keep,
        )
        .unwrap()
        .unwrap();
        assert_eq!(same, request.encode_to_vec());
    }

    #[test]
    fn a_missing_identity_is_added_to_present_messages_only() {
        let poll = PollWorkflowTaskQueueRequest {
            namespace: "ns".into(),
            ..Default::default()
        };
        let out = stamp(
            "PollWorkflowTaskQueueRequest",
            &poll.encode_to_vec(),
            IdentityMode::Replace,
        );
        assert_eq!(
            PollWorkflowTaskQueueRequest::decode(out.as_slice())
                .unwrap()
                .identity,
            "spiffe://corp/w"
        );
        // Nested: a multi-operation's start and update (its update meta present); a batch
        // operation's termination; an absent update meta is not made up.
        let multi = ExecuteMultiOperationRequest {
            namespace: "ns".into(),
            operations: vec![
                Operation {
                    operation: Some(operation::Operation::StartWorkflow(
                        StartWorkflowExecutionRequest {
                            namespace: "ns".into(),
                            identity: "me".into(),
                            ..Default::default()
                        },
                    )),
                },
                Operation {
                    operation: Some(operation::Operation::UpdateWorkflow(
                        UpdateWorkflowExecutionRequest {
                            namespace: "ns".into(),
                            request: Some(Request {
                                meta: Some(Meta {
                                    update_id: "u".into(),
                                    identity: String::new(),
                                }),
                                ..Default::default()
                            }),
                            ..Default::default()
                        },
                    )),
                },
                Operation {
                    operation: Some(operation::Operation::UpdateWorkflow(
                        UpdateWorkflowExecutionRequest {
                            namespace: "ns".into(),
                            ..Default::default()
                        },
                    )),
                },
            ],
            ..Default::default()
        };
        let out = stamp(
            "ExecuteMultiOperationRequest",
            &multi.encode_to_vec(),
            IdentityMode::Append,
        );
        let decoded = ExecuteMultiOperationRequest::decode(out.as_slice()).unwrap();
        let ops: Vec<_> = decoded
            .operations
            .into_iter()
            .map(|o| o.operation.unwrap())
            .collect();
        match &ops[0] {
            operation::Operation::StartWorkflow(s) => {
                assert_eq!(s.identity, "me (via portcullis: spiffe://corp/w)")
            }
            other => panic!("{other:?}"),
        }
        match &ops[1] {
            operation::Operation::UpdateWorkflow(u) => assert_eq!(
                u.request.as_ref().unwrap().meta.as_ref().unwrap().identity,
                "(via portcullis: spiffe://corp/w)"
            ),
            other => panic!("{other:?}"),
        }
        match &ops[2] {
            operation::Operation::UpdateWorkflow(u) => assert!(u.request.is_none()),
            other => panic!("{other:?}"),
        }
        let batch = StartBatchOperationRequest {
            namespace: "ns".into(),
            operation: Some(
                start_batch_operation_request::Operation::TerminationOperation(
                    BatchOperationTermination {
                        identity: "cli".into(),
                        ..Default::default()
                    },
                ),
            ),
            ..Default::default()
        };
        let out = stamp(
            "StartBatchOperationRequest",
            &batch.encode_to_vec(),
            IdentityMode::Replace,
        );
        match StartBatchOperationRequest::decode(out.as_slice())
            .unwrap()
            .operation
            .unwrap()
        {
            start_batch_operation_request::Operation::TerminationOperation(t) => {
                assert_eq!(t.identity, "spiffe://corp/w")
            }
            other => panic!("{other:?}"),
        }
    }

    /// A failure's ActivityFailureInfo.identity names the worker that ran the activity: kept.
    #[test]
    fn failure_identities_are_not_the_caller() {
        let request = RespondActivityTaskFailedRequest {
            namespace: "ns".into(),
            identity: "w1".into(),
            failure: Some(Failure {
                message: "boom".into(),
                failure_info: Some(FailureInfo::ActivityFailureInfo(ActivityFailureInfo {
                    identity: "someone-else".into(),
                    ..Default::default()
                })),
                ..Default::default()
            }),
            ..Default::default()
        };
        let out = stamp(
            "RespondActivityTaskFailedRequest",
            &request.encode_to_vec(),
            IdentityMode::Replace,
        );
        let decoded = RespondActivityTaskFailedRequest::decode(out.as_slice()).unwrap();
        assert_eq!(decoded.identity, "spiffe://corp/w");
        assert_eq!(decoded.failure, request.failure);
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let mut f = |c: &str| c.to_string();
        for bad in [&[0x2a, 0x09, b'x'][..], &[0xff; 12][..], &[0x2a][..]] {
            assert!(stamp_identities(
                IdentityFieldIndex::global(),
                &format!("{WS}SignalWorkflowExecutionRequest"),
                bad,
                &mut f
            )
            .is_err());
        }
    }
}
