//! Which fields of which messages can reach a `temporal.api.common.v1.Payload`, computed once
//! from the descriptor pool.
//!
//! A field is listed when its message type transitively contains a Payload through any chain of
//! message fields (singular, repeated, map values, oneof members), a `google.protobuf.Any`
//! (resolved at walk time from its `type_url`), or a `temporal.api.common.v1.DataBlob`
//! (serialized history; see [`BlobRule`]). Cycles (`Failure.cause`, nested history) are handled
//! by computing reachability as a fixpoint over the whole pool.
//!
//! Exclusions: fields the Temporal server must read in plaintext are never listed, so the walker
//! neither seals nor opens them (see [`Exclusion`] and [`PayloadIndex::exclusions`]):
//! - every field whose type is `temporal.api.common.v1.SearchAttributes`, and that message's own
//!   `indexed_fields`: the visibility store indexes and filters on these values;
//! - `group_values` of every `*.AggregationGroup` (the `Count*Response`s of WorkflowService):
//!   the server computes them from search-attribute values for `GROUP BY` queries;
//! - `details` of `temporal.api.compute.v1.ComputeProvider` and `ComputeScaler` (worker
//!   deployment compute config): the proto says server-implemented providers and scalers read
//!   them, encoded with the SDK's default converter.

use std::collections::HashMap;

use prost_reflect::{DescriptorPool, FieldDescriptor, Kind, MessageDescriptor};

use crate::payload::system_nexus::{NexusFields, NEXUS_OPERATION_MESSAGES, SYSTEM_OPERATIONS};
use crate::schema::Schema;

pub(crate) const PAYLOAD: &str = "temporal.api.common.v1.Payload";
pub(crate) const ANY: &str = "google.protobuf.Any";
pub(crate) const FAILURE: &str = "temporal.api.failure.v1.Failure";
const DATA_BLOB: &str = "temporal.api.common.v1.DataBlob";
const HISTORY: &str = "temporal.api.history.v1.History";
const SEARCH_ATTRIBUTES: &str = "temporal.api.common.v1.SearchAttributes";
const ENCODING_TYPE: &str = "temporal.api.enums.v1.EncodingType";
const ENCODING_TYPE_PROTO3: &str = "ENCODING_TYPE_PROTO3";

/// Fields whose payloads belong to a fixed scope rather than to a namespace: Nexus endpoint
/// descriptions (cluster-wide resources, managed by cluster admins) are sealed under the key
/// of the cluster scope [`NEXUS_ENDPOINT_SCOPE`] (see the proxy's encryption stage). The walker
/// reports the scope as the payload's namespace ([`super::PayloadContext::namespace`]).
pub const FIXED_SCOPE_FIELDS: &[(&str, &str)] = &[(
    "temporal.api.nexus.v1.EndpointSpec.description",
    NEXUS_ENDPOINT_SCOPE,
)];

/// Scopes that are not namespaces start with this: no namespace name can (Temporal's names and
/// the proxy's configured ones are refused with it), so their keys never seal a namespace's
/// payloads.
pub const RESERVED_SCOPE_PREFIX: &str = "portcullis:";

/// The scope of Nexus endpoint descriptions.
pub const NEXUS_ENDPOINT_SCOPE: &str = "portcullis:nexus-endpoints";

/// The map entry whose values are memo values (see [`super::PayloadContext::is_memo_value`]).
const MEMO_ENTRY: &str = "temporal.api.common.v1.Memo.FieldsEntry";

/// Messages that carry user data in fields the walker cannot seal, and why. A request that
/// holds one with any content is refused ([`super::WalkError::Unsupported`]): fail closed.
pub const REFUSED_MESSAGES: &[(&str, &str)] = &[(
    "temporal.api.nexus.v1.Failure",
    "a legacy Nexus failure (temporal.api.nexus.v1.Failure, deprecated) carries its message, \
     stack trace, metadata and JSON details as plain fields that the server reads; portcullis \
     cannot seal them. Send a temporal.api.failure.v1.Failure (the `failure` field) instead, as \
     current SDKs do",
)];

/// String fields that carry user data in plain text next to the payloads: a query handler's
/// exception message, which SDKs copy into `error_message` besides the (sealed) `failure`.
/// The walker hands them to [`super::PayloadVisitor::text`]; the proxy seals them under
/// `encode_failure_attributes`.
pub const USER_TEXT_FIELDS: &[&str] = &[
    "temporal.api.workflowservice.v1.RespondQueryTaskCompletedRequest.error_message",
    "temporal.api.query.v1.WorkflowQueryResult.error_message",
];

const RAW_HISTORY_FIELDS: &[&str] =
    &["temporal.api.workflowservice.v1.GetWorkflowExecutionHistoryResponse.raw_history"];

/// Dense identifier of a message type inside one [`PayloadIndex`].
pub(crate) type MessageId = u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MessageKind {
    /// An ordinary message: walk the listed fields.
    Plain,
    /// `temporal.api.common.v1.Payload`: handed to the visitor whole.
    Payload,
    /// `google.protobuf.Any`: `value` is walked as the message its `type_url` names.
    Any,
    /// `temporal.api.failure.v1.Failure`: walked like `Plain`, plus the failure-attribute modes.
    Failure,
    /// `temporal.api.common.v1.DataBlob`: only walkable where the field says what it holds.
    DataBlob,
    /// A message that carries user data the walker cannot seal ([`REFUSED_MESSAGES`]): one
    /// with content fails the walk, for this reason.
    Refused(&'static str),
}

/// What a DataBlob-typed field holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobRule {
    /// `data` is a serialized `History` when `encoding_type` is PROTO3; other encodings are refused.
    History,
    /// Unknown contents: a blob with data is refused (`WalkError::Unsupported`), fail closed.
    Refuse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FieldTarget {
    Message(MessageId),
    Blob(BlobRule),
    /// A string of [`USER_TEXT_FIELDS`].
    Text,
    /// Chosen at walk time, never in a plan: the `input` of a Nexus operation addressed to the
    /// system endpoint, an envelope of the request of `SYSTEM_OPERATIONS[i]` (see
    /// [`crate::payload::system_nexus`]).
    SystemEnvelope(usize),
}

#[derive(Debug)]
pub(crate) struct FieldPlan {
    pub(crate) number: u32,
    /// Short field name, for paths.
    pub(crate) name: Box<str>,
    pub(crate) target: FieldTarget,
    /// Full name of the field's message type.
    pub(crate) type_name: Box<str>,
    /// The fixed scope its payloads belong to ([`FIXED_SCOPE_FIELDS`]).
    pub(crate) scope: Option<&'static str>,
    /// The value of a memo entry (a Payload).
    pub(crate) memo_value: bool,
}

#[derive(Debug)]
pub(crate) struct MessagePlan {
    pub(crate) name: Box<str>,
    pub(crate) kind: MessageKind,
    pub(crate) reaches: bool,
    /// Fields that can reach a payload, sorted by number.
    pub(crate) fields: Box<[FieldPlan]>,
    /// By field number: 1 + the position in `fields`, or 0. Empty when the largest listed
    /// number is above [`DENSE_LIMIT`] (then `fields` is searched). The walker asks this for
    /// every field of every message it descends into, so it is a plain index, not a search.
    slots: Box<[u16]>,
    /// For messages that start a Nexus operation: the fields naming its endpoint, service and
    /// operation, and its input.
    pub(crate) nexus: Option<NexusFields>,
    /// Every payload below this message belongs to this fixed scope (none reaches a payload
    /// any other way).
    pub(crate) fixed_scope: Option<&'static str>,
    /// Its `namespace` string field, for a message that reaches payloads and names the
    /// namespace they belong to (a command or event aimed at another namespace, a nested
    /// request): see [`PayloadIndex::namespace_scopes`].
    pub(crate) namespace_field: Option<u32>,
}

/// Field numbers up to this get a direct lookup slot.
const DENSE_LIMIT: u32 = 512;

fn slots_for(fields: &[FieldPlan]) -> Box<[u16]> {
    let Some(max) = fields.iter().map(|f| f.number).max() else {
        return Box::new([]);
    };
    if max > DENSE_LIMIT || fields.len() >= usize::from(u16::MAX) {
        return Box::new([]);
    }
    let mut slots = vec![0u16; max as usize + 1];
    for (i, f) in fields.iter().enumerate() {
        if let (Some(slot), Ok(i)) = (slots.get_mut(f.number as usize), u16::try_from(i + 1)) {
            *slot = i;
        }
    }
    slots.into_boxed_slice()
}

impl MessagePlan {
    #[inline]
    pub(crate) fn field(&self, number: u32) -> Option<&FieldPlan> {
        if self.slots.is_empty() {
            return self
                .fields
                .binary_search_by_key(&number, |f| f.number)
                .ok()
                .and_then(|i| self.fields.get(i));
        }
        let slot = *self.slots.get(number as usize)?;
        self.fields.get(usize::from(slot.checked_sub(1)?))
    }
}

/// Field numbers of `temporal.api.failure.v1.Failure` used by the failure-attribute modes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FailureFields {
    pub(crate) message: u32,
    pub(crate) stack_trace: u32,
    pub(crate) encoded_attributes: u32,
}

/// A field deliberately left out of the index, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exclusion {
    /// Full name of the field, e.g. `temporal.api.workflow.v1.WorkflowExecutionInfo.search_attributes`.
    pub field: String,
    pub reason: &'static str,
}

/// One field that can reach a payload, as reported by [`PayloadIndex::payload_fields`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadField<'a> {
    pub number: u32,
    pub name: &'a str,
    /// Full name of the field's message type.
    pub type_name: &'a str,
    /// Set for `DataBlob` fields.
    pub blob: Option<BlobRule>,
    /// A string of [`USER_TEXT_FIELDS`] (not a message).
    pub text: bool,
}

/// For every message type of a descriptor pool, the fields that can reach a Payload.
#[derive(Debug)]
pub struct PayloadIndex {
    pub(crate) plans: Vec<MessagePlan>,
    by_name: HashMap<Box<str>, MessageId>,
    /// `temporal.api.common.v1.Payload`.
    pub(crate) payload: Option<MessageId>,
    /// The request type of each of `SYSTEM_OPERATIONS`, in order.
    pub(crate) system_requests: Vec<Option<MessageId>>,
    pub(crate) failure: Option<FailureFields>,
    pub(crate) history: Option<MessageId>,
    /// Numeric value of `ENCODING_TYPE_PROTO3`.
    pub(crate) proto3_encoding: Option<i32>,
    exclusions: Vec<Exclusion>,
}

const SEARCH_ATTRIBUTES_REASON: &str =
    "search attributes are indexed and filtered by the server's visibility store";
const AGGREGATION_REASON: &str =
    "visibility aggregation values are search-attribute values grouped by the server";
const COMPUTE_REASON: &str =
    "worker compute provider and scaler configuration is read by the server's worker controller";

/// Payload fields, by full name, that the server interprets.
const SERVER_READ_FIELDS: &[(&str, &str)] = &[
    (
        "temporal.api.compute.v1.ComputeProvider.details",
        COMPUTE_REASON,
    ),
    (
        "temporal.api.compute.v1.ComputeScaler.details",
        COMPUTE_REASON,
    ),
];

/// Whether the server must read this field in plaintext (see the module comment).
fn exclusion(message: &MessageDescriptor, field: &FieldDescriptor) -> Option<&'static str> {
    if message.full_name() == SEARCH_ATTRIBUTES && field.name() == "indexed_fields" {
        return Some(SEARCH_ATTRIBUTES_REASON);
    }
    if let Kind::Message(target) = field.kind() {
        if target.full_name() == SEARCH_ATTRIBUTES {
            return Some(SEARCH_ATTRIBUTES_REASON);
        }
    }
    if message.name() == "AggregationGroup" && field.name() == "group_values" {
        return Some(AGGREGATION_REASON);
    }
    SERVER_READ_FIELDS
        .iter()
        .find(|(name, _)| *name == field.full_name())
        .map(|(_, reason)| *reason)
}

/// Marks every message that reaches a `true` of `reaches` through fields `follow` accepts.
fn fixpoint(
    mut reaches: Vec<bool>,
    edges: &[Vec<(FieldDescriptor, MessageId)>],
    follow: impl Fn(&FieldDescriptor) -> bool,
) -> Vec<bool> {
    loop {
        let mut changed = false;
        for (i, fields) in edges.iter().enumerate() {
            if reaches.get(i).copied().unwrap_or(true) {
                continue;
            }
            let hit = fields
                .iter()
                .any(|(f, t)| follow(f) && reaches.get(*t as usize).copied().unwrap_or(false));
            if hit {
                if let Some(r) = reaches.get_mut(i) {
                    *r = true;
                    changed = true;
                }
            }
        }
        if !changed {
            return reaches;
        }
    }
}

impl PayloadIndex {
    /// The index of the API schema in force.
    pub fn global() -> &'static PayloadIndex {
        Schema::global().payload_index()
    }

    pub fn new(pool: &DescriptorPool) -> PayloadIndex {
        let messages: Vec<MessageDescriptor> = pool.all_messages().collect();
        let by_name: HashMap<Box<str>, MessageId> = messages
            .iter()
            .enumerate()
            .filter_map(|(i, m)| Some((m.full_name().into(), MessageId::try_from(i).ok()?)))
            .collect();
        let id_of = |m: &MessageDescriptor| by_name.get(m.full_name()).copied();

        let kinds: Vec<MessageKind> = messages
            .iter()
            .map(|m| match m.full_name() {
                PAYLOAD => MessageKind::Payload,
                ANY => MessageKind::Any,
                FAILURE => MessageKind::Failure,
                DATA_BLOB => MessageKind::DataBlob,
                name => match REFUSED_MESSAGES.iter().find(|(m, _)| *m == name) {
                    Some((_, reason)) => MessageKind::Refused(reason),
                    None => MessageKind::Plain,
                },
            })
            .collect();

        // Edges: (message, field, target) for every message-typed field not excluded.
        let mut exclusions = Vec::new();
        let mut edges: Vec<Vec<(FieldDescriptor, MessageId)>> = Vec::with_capacity(messages.len());
        for message in &messages {
            let mut out = Vec::new();
            for field in message.fields() {
                let Kind::Message(target) = field.kind() else {
                    continue;
                };
                if let Some(reason) = exclusion(message, &field) {
                    exclusions.push(Exclusion {
                        field: field.full_name().to_string(),
                        reason,
                    });
                    continue;
                }
                if let Some(id) = id_of(&target) {
                    out.push((field, id));
                }
            }
            edges.push(out);
        }

        let texts: Vec<Vec<FieldDescriptor>> = messages
            .iter()
            .map(|m| {
                m.fields()
                    .filter(|f| {
                        matches!(f.kind(), Kind::String)
                            && !f.is_list()
                            && USER_TEXT_FIELDS.contains(&f.full_name())
                    })
                    .collect()
            })
            .collect();

        // Reachability: a fixpoint, so cycles need no special care.
        let base: Vec<bool> = kinds
            .iter()
            .zip(&texts)
            .map(|(k, texts)| {
                matches!(
                    k,
                    MessageKind::Payload
                        | MessageKind::Any
                        | MessageKind::DataBlob
                        | MessageKind::Refused(_)
                ) || !texts.is_empty()
            })
            .collect();
        let reaches = fixpoint(base.clone(), &edges, |_| true);
        // The same, without passing a fixed-scope field: a message that reaches payloads only
        // through those holds only payloads of that scope.
        let scope_of = |field: &FieldDescriptor| {
            FIXED_SCOPE_FIELDS
                .iter()
                .find(|(f, _)| *f == field.full_name())
                .map(|(_, s)| *s)
        };
        let unscoped = fixpoint(base, &edges, |f| scope_of(f).is_none());
        let mut scopes: Vec<&'static str> = FIXED_SCOPE_FIELDS.iter().map(|(_, s)| *s).collect();
        scopes.dedup();
        let reaches_scope: Vec<(&'static str, Vec<bool>)> = scopes
            .into_iter()
            .map(|scope| {
                let holders: Vec<bool> = edges
                    .iter()
                    .map(|fields| {
                        fields.iter().any(|(f, t)| {
                            scope_of(f) == Some(scope)
                                && reaches.get(*t as usize).copied().unwrap_or(false)
                        })
                    })
                    .collect();
                (scope, fixpoint(holders, &edges, |_| true))
            })
            .collect();
        let fixed_scope_of = |i: usize| -> Option<&'static str> {
            if !reaches.get(i).copied().unwrap_or(false) || unscoped.get(i).copied().unwrap_or(true)
            {
                return None;
            }
            let mut found = reaches_scope
                .iter()
                .filter(|(_, r)| r.get(i).copied().unwrap_or(false))
                .map(|(s, _)| *s);
            match (found.next(), found.next()) {
                (Some(scope), None) => Some(scope),
                _ => None,
            }
        };
        let system_requests: Vec<Option<MessageId>> = SYSTEM_OPERATIONS
            .iter()
            .map(|o| by_name.get(o.request).copied())
            .collect();

        let plans = messages
            .iter()
            .zip(kinds)
            .zip(edges)
            .zip(texts)
            .enumerate()
            .map(|(i, (((message, kind), edges), texts))| {
                let reach = reaches.get(i).copied().unwrap_or(false);
                let walks_fields = !matches!(kind, MessageKind::Payload | MessageKind::Refused(_));
                let mut fields: Vec<FieldPlan> = if reach && walks_fields {
                    edges
                        .into_iter()
                        .filter(|(_, t)| reaches.get(*t as usize).copied().unwrap_or(false))
                        .map(|(field, target)| {
                            let type_name = match field.kind() {
                                Kind::Message(m) => m.full_name().into(),
                                _ => Box::from(""),
                            };
                            let is_blob = &*type_name == DATA_BLOB;
                            FieldPlan {
                                scope: scope_of(&field),
                                memo_value: message.full_name() == MEMO_ENTRY
                                    && field.name() == "value",
                                number: field.number(),
                                name: field.name().into(),
                                target: if !is_blob {
                                    FieldTarget::Message(target)
                                } else if RAW_HISTORY_FIELDS.contains(&field.full_name()) {
                                    FieldTarget::Blob(BlobRule::History)
                                } else {
                                    FieldTarget::Blob(BlobRule::Refuse)
                                },
                                type_name,
                            }
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                fields.extend(texts.into_iter().map(|f| FieldPlan {
                    number: f.number(),
                    name: f.name().into(),
                    target: FieldTarget::Text,
                    type_name: Box::from("string"),
                    scope: None,
                    memo_value: false,
                }));
                fields.sort_by_key(|f| f.number);
                let number = |name: &str| message.get_field_by_name(name).map(|f| f.number());
                let nexus = NEXUS_OPERATION_MESSAGES
                    .contains(&message.full_name())
                    .then(|| {
                        Some(NexusFields {
                            endpoint: number("endpoint")?,
                            service: number("service")?,
                            operation: number("operation")?,
                            input: number("input")?,
                        })
                    })
                    .flatten();
                let namespace_field = message
                    .get_field_by_name("namespace")
                    .filter(|f| {
                        reach
                            && kind == MessageKind::Plain
                            && matches!(f.kind(), Kind::String)
                            && !f.is_list()
                    })
                    .map(|f| f.number());
                MessagePlan {
                    nexus,
                    fixed_scope: fixed_scope_of(i),
                    namespace_field,
                    name: message.full_name().into(),
                    kind,
                    reaches: reach,
                    slots: slots_for(&fields),
                    fields: fields.into_boxed_slice(),
                }
            })
            .collect();

        let failure = pool.get_message_by_name(FAILURE).and_then(|m| {
            Some(FailureFields {
                message: m.get_field_by_name("message")?.number(),
                stack_trace: m.get_field_by_name("stack_trace")?.number(),
                encoded_attributes: m.get_field_by_name("encoded_attributes")?.number(),
            })
        });
        let history = pool
            .get_message_by_name(HISTORY)
            .and_then(|m| id_of(&m))
            .filter(|id| reaches.get(*id as usize).copied().unwrap_or(false));
        let proto3_encoding = pool
            .get_enum_by_name(ENCODING_TYPE)
            .and_then(|e| e.get_value_by_name(ENCODING_TYPE_PROTO3))
            .map(|v| v.number());
        exclusions.sort_by(|a, b| a.field.cmp(&b.field));

        let payload = by_name.get(PAYLOAD).copied();
        PayloadIndex {
            plans,
            by_name,
            payload,
            system_requests,
            failure,
            history,
            proto3_encoding,
            exclusions,
        }
    }

    pub(crate) fn id(&self, full_name: &str) -> Option<MessageId> {
        self.by_name.get(full_name).copied()
    }

    pub(crate) fn plan(&self, id: MessageId) -> Option<&MessagePlan> {
        self.plans.get(id as usize)
    }

    /// Whether the named message can contain a Payload (`None`: not in the pool).
    pub fn reaches(&self, full_name: &str) -> Option<bool> {
        self.id(full_name)
            .and_then(|id| self.plan(id))
            .map(|p| p.reaches)
    }

    /// The fields of the named message that can reach a Payload, by field number.
    /// `None` when the message is not in the pool.
    pub fn payload_fields(&self, full_name: &str) -> Option<Vec<PayloadField<'_>>> {
        let plan = self.plan(self.id(full_name)?)?;
        Some(
            plan.fields
                .iter()
                .map(|f| PayloadField {
                    number: f.number,
                    name: &f.name,
                    type_name: &f.type_name,
                    blob: match f.target {
                        FieldTarget::Blob(rule) => Some(rule),
                        _ => None,
                    },
                    text: f.target == FieldTarget::Text,
                })
                .collect(),
        )
    }

    /// The fixed scope every payload of the named message belongs to, when it holds payloads
    /// only below fields of [`FIXED_SCOPE_FIELDS`] (of one scope). `None` otherwise.
    pub fn fixed_scope(&self, full_name: &str) -> Option<&'static str> {
        self.id(full_name)
            .and_then(|id| self.plan(id))
            .and_then(|p| p.fixed_scope)
    }

    /// Every field left out because the server must read it, sorted by name.
    pub fn exclusions(&self) -> &[Exclusion] {
        &self.exclusions
    }

    /// Messages whose `namespace` field says which namespace the payloads below them belong
    /// to, when they are not the root of the walk (the root's namespace is the call's): the
    /// walker tells visitors ([`super::PayloadContext::namespace`]), so sealing and opening
    /// use that namespace's data key.
    pub fn namespace_scopes(&self) -> impl Iterator<Item = &str> {
        self.plans
            .iter()
            .filter(|p| p.namespace_field.is_some())
            .map(|p| &*p.name)
    }

    /// Names of every message type that can reach a Payload.
    pub fn reaching_messages(&self) -> impl Iterator<Item = &str> {
        self.plans.iter().filter(|p| p.reaches).map(|p| &*p.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(fields: &[PayloadField<'_>]) -> Vec<(u32, String)> {
        fields
            .iter()
            .map(|f| (f.number, f.name.to_string()))
            .collect()
    }

    #[test]
    fn basic_reachability() {
        let index = PayloadIndex::global();
        assert_eq!(index.reaches(PAYLOAD), Some(true));
        assert_eq!(index.reaches("temporal.api.common.v1.Payloads"), Some(true));
        assert_eq!(index.reaches(SEARCH_ATTRIBUTES), Some(false));
        assert_eq!(
            index.reaches("temporal.api.common.v1.WorkflowType"),
            Some(false)
        );
        assert_eq!(index.reaches("no.such.Message"), None);
        // Failure reaches payloads through encoded_attributes and details, and is recursive.
        let failure = index.payload_fields(FAILURE).unwrap_or_default();
        assert!(failure.iter().any(|f| f.name == "cause"));
        assert!(failure.iter().any(|f| f.name == "encoded_attributes"));
        assert!(index.failure.is_some());
        assert_eq!(index.proto3_encoding, Some(1));
        assert!(index.history.is_some());
    }

    #[test]
    fn start_workflow_fields_skip_search_attributes() {
        let fields = PayloadIndex::global()
            .payload_fields("temporal.api.workflowservice.v1.StartWorkflowExecutionRequest")
            .unwrap_or_default();
        let names = names(&fields);
        for expected in ["input", "memo", "header", "user_metadata"] {
            assert!(
                names.iter().any(|(_, n)| n == expected),
                "{expected} in {names:?}"
            );
        }
        assert!(!names.iter().any(|(_, n)| n == "search_attributes"));
    }

    #[test]
    fn maps_and_any_are_followed() {
        let index = PayloadIndex::global();
        // map<string, Payload> fields: Memo.fields and Header.fields go through map entries.
        let memo = index
            .payload_fields("temporal.api.common.v1.Memo")
            .unwrap_or_default();
        assert_eq!(memo.len(), 1);
        assert!(memo[0].type_name.ends_with("FieldsEntry"));
        let entry = index.payload_fields(memo[0].type_name).unwrap_or_default();
        assert_eq!(names(&entry), vec![(2, "value".to_string())]);
        let message = index
            .payload_fields("temporal.api.protocol.v1.Message")
            .unwrap_or_default();
        assert_eq!(names(&message), vec![(5, "body".to_string())]);
        let status = index
            .payload_fields("google.rpc.Status")
            .unwrap_or_default();
        assert_eq!(names(&status), vec![(3, "details".to_string())]);
    }

    /// Every exclusion, reviewed. A new field that the server reads in plaintext must be added
    /// on purpose; a new search-attribute field shows up here and fails until reviewed.
    #[test]
    fn exclusions_are_the_reviewed_list() {
        let index = PayloadIndex::global();
        let aggregation: Vec<&str> = index
            .exclusions()
            .iter()
            .filter(|e| e.reason == AGGREGATION_REASON)
            .map(|e| e.field.as_str())
            .collect();
        assert_eq!(
            aggregation,
            vec![
                "temporal.api.workflowservice.v1.CountActivityExecutionsResponse.AggregationGroup.group_values",
                "temporal.api.workflowservice.v1.CountNexusOperationExecutionsResponse.AggregationGroup.group_values",
                "temporal.api.workflowservice.v1.CountSchedulesResponse.AggregationGroup.group_values",
                "temporal.api.workflowservice.v1.CountWorkflowExecutionsResponse.AggregationGroup.group_values",
            ]
        );
        let compute: Vec<&str> = index
            .exclusions()
            .iter()
            .filter(|e| e.reason == COMPUTE_REASON)
            .map(|e| e.field.as_str())
            .collect();
        assert_eq!(
            compute,
            vec![
                "temporal.api.compute.v1.ComputeProvider.details",
                "temporal.api.compute.v1.ComputeScaler.details",
            ]
        );
        assert_eq!(
            index
                .payload_fields("temporal.api.compute.v1.ComputeProvider")
                .map(|f| f.len()),
            Some(0)
        );
        let search: Vec<&str> = index
            .exclusions()
            .iter()
            .filter(|e| e.reason == SEARCH_ATTRIBUTES_REASON)
            .map(|e| e.field.as_str())
            .collect();
        assert!(search.contains(&"temporal.api.common.v1.SearchAttributes.indexed_fields"));
        assert!(search.contains(
            &"temporal.api.workflowservice.v1.StartWorkflowExecutionRequest.search_attributes"
        ));
        assert!(
            search.iter().all(|f| f.ends_with("search_attributes")
                || f.ends_with("indexed_fields")
                || f.ends_with("search_attribute")),
            "{search:?}"
        );
    }

    /// The direct lookup answers exactly what a search of the sorted field list answers, for
    /// every message and every field number around the listed ones.
    #[test]
    fn field_lookup_agrees_with_search() {
        let index = PayloadIndex::global();
        let mut dense = 0;
        for plan in &index.plans {
            let max = plan.fields.iter().map(|f| f.number).max().unwrap_or(0);
            dense += usize::from(!plan.slots.is_empty());
            for number in (0..=max + 2).chain([DENSE_LIMIT + 1, 536_870_911]) {
                let searched = plan
                    .fields
                    .binary_search_by_key(&number, |f| f.number)
                    .ok()
                    .map(|i| plan.fields[i].number);
                assert_eq!(
                    plan.field(number).map(|f| f.number),
                    searched,
                    "{} field {number}",
                    plan.name
                );
            }
        }
        assert!(dense > 100, "only {dense} messages have a direct lookup");
    }

    /// A message whose field numbers are too large for a table is searched.
    #[test]
    fn sparse_numbers_fall_back_to_search() {
        let fields: Vec<FieldPlan> = [3, 70_000]
            .into_iter()
            .map(|number| FieldPlan {
                number,
                name: "f".into(),
                target: FieldTarget::Blob(BlobRule::Refuse),
                type_name: "t".into(),
                scope: None,
                memo_value: false,
            })
            .collect();
        let plan = MessagePlan {
            name: "m".into(),
            kind: MessageKind::Plain,
            reaches: true,
            slots: slots_for(&fields),
            fields: fields.into_boxed_slice(),
            nexus: None,
            fixed_scope: None,
            namespace_field: None,
        };
        assert!(plan.slots.is_empty());
        assert_eq!(plan.field(70_000).map(|f| f.number), Some(70_000));
        assert_eq!(plan.field(3).map(|f| f.number), Some(3));
        assert!(plan.field(4).is_none());
    }

    /// DataBlob fields in the whole pool, and what the walker does with each.
    #[test]
    fn data_blob_fields_are_reviewed() {
        let index = PayloadIndex::global();
        let mut blobs = Vec::new();
        for plan in &index.plans {
            for f in plan.fields.iter() {
                if let FieldTarget::Blob(rule) = f.target {
                    blobs.push((format!("{}.{}", plan.name, f.name), rule));
                }
            }
        }
        assert_eq!(
            blobs,
            vec![(RAW_HISTORY_FIELDS[0].to_string(), BlobRule::History)]
        );
    }

    /// Messages below the root that say which namespace their payloads belong to, reviewed:
    /// commands and history events aimed at another namespace, requests nested in
    /// ExecuteMultiOperation. (Every request with payloads has a `namespace` too; as the root
    /// of a walk it is the call's own.)
    #[test]
    fn namespace_scopes_are_reviewed() {
        let schema = Schema::global();
        let requests: std::collections::HashSet<&str> =
            schema.methods().map(|m| m.input.full_name()).collect();
        let mut nested: Vec<&str> = PayloadIndex::global()
            .namespace_scopes()
            .filter(|m| !requests.contains(m))
            // A descriptor set given at run time may hold the Cloud API's messages; never walked.
            .filter(|m| m.starts_with("temporal.api.") && !m.starts_with("temporal.api.cloud."))
            .collect();
        nested.sort_unstable();
        assert_eq!(
            nested,
            [
                "temporal.api.command.v1.SignalExternalWorkflowExecutionCommandAttributes",
                "temporal.api.command.v1.StartChildWorkflowExecutionCommandAttributes",
                "temporal.api.history.v1.ChildWorkflowExecutionCanceledEventAttributes",
                "temporal.api.history.v1.ChildWorkflowExecutionCompletedEventAttributes",
                "temporal.api.history.v1.ChildWorkflowExecutionFailedEventAttributes",
                "temporal.api.history.v1.ChildWorkflowExecutionStartedEventAttributes",
                "temporal.api.history.v1.SignalExternalWorkflowExecutionInitiatedEventAttributes",
                "temporal.api.history.v1.StartChildWorkflowExecutionInitiatedEventAttributes",
            ]
        );
    }

    /// Every message of the schema that starts a Nexus operation (an `endpoint` string and an
    /// `input` Payload) is listed, and resolves; every system operation's request resolves.
    #[test]
    fn nexus_operation_messages_are_reviewed() {
        let pool = Schema::global().descriptors().unwrap();
        let mut found: Vec<&str> = Vec::new();
        let messages: Vec<MessageDescriptor> = pool.all_messages().collect();
        for m in &messages {
            let endpoint = m
                .get_field_by_name("endpoint")
                .is_some_and(|f| matches!(f.kind(), Kind::String));
            let input = m
                .get_field_by_name("input")
                .is_some_and(|f| matches!(f.kind(), Kind::Message(t) if t.full_name() == PAYLOAD));
            if endpoint && input && !m.full_name().starts_with("coresdk.") {
                found.push(m.full_name());
            }
        }
        found.sort_unstable();
        let mut listed = NEXUS_OPERATION_MESSAGES.to_vec();
        listed.sort_unstable();
        assert_eq!(found, listed);
        let index = PayloadIndex::global();
        for name in NEXUS_OPERATION_MESSAGES {
            let plan = index.plan(index.id(name).unwrap()).unwrap();
            assert!(plan.nexus.is_some(), "{name}");
        }
        assert!(index.system_requests.iter().all(Option::is_some));
        assert_eq!(index.system_requests.len(), SYSTEM_OPERATIONS.len());
    }

    /// Nexus endpoint descriptions belong to the cluster scope, and the OperatorService endpoint
    /// messages hold no other payload; messages that hold other payloads have no fixed scope.
    #[test]
    fn endpoint_descriptions_have_a_fixed_scope() {
        let index = PayloadIndex::global();
        assert!(NEXUS_ENDPOINT_SCOPE.starts_with(RESERVED_SCOPE_PREFIX));
        for message in [
            "temporal.api.nexus.v1.EndpointSpec",
            "temporal.api.nexus.v1.Endpoint",
            "temporal.api.operatorservice.v1.CreateNexusEndpointRequest",
            "temporal.api.operatorservice.v1.CreateNexusEndpointResponse",
            "temporal.api.operatorservice.v1.UpdateNexusEndpointRequest",
            "temporal.api.operatorservice.v1.UpdateNexusEndpointResponse",
            "temporal.api.operatorservice.v1.GetNexusEndpointResponse",
            "temporal.api.operatorservice.v1.ListNexusEndpointsResponse",
        ] {
            assert_eq!(
                index.fixed_scope(message),
                Some(NEXUS_ENDPOINT_SCOPE),
                "{message}"
            );
        }
        for message in [
            PAYLOAD,
            "temporal.api.workflowservice.v1.StartWorkflowExecutionRequest",
            "temporal.api.workflowservice.v1.GetWorkflowExecutionHistoryResponse",
            "temporal.api.operatorservice.v1.GetNexusEndpointRequest",
        ] {
            assert_eq!(index.fixed_scope(message), None, "{message}");
        }
        let spec = index
            .plan(index.id("temporal.api.nexus.v1.EndpointSpec").unwrap())
            .unwrap();
        let description = spec
            .fields
            .iter()
            .find(|f| &*f.name == "description")
            .unwrap();
        assert_eq!(description.scope, Some(NEXUS_ENDPOINT_SCOPE));
        // Memo values are flagged, and only they.
        let flagged: Vec<String> = index
            .plans
            .iter()
            .flat_map(|p| {
                p.fields
                    .iter()
                    .filter(|f| f.memo_value)
                    .map(move |f| format!("{}.{}", p.name, f.name))
            })
            .collect();
        assert_eq!(flagged, [format!("{MEMO_ENTRY}.value")]);
    }

    /// Every text field resolves to a string field of the schema.
    #[test]
    fn user_text_fields_resolve() {
        let index = PayloadIndex::global();
        let mut found = Vec::new();
        for plan in &index.plans {
            for f in plan.fields.iter().filter(|f| f.target == FieldTarget::Text) {
                found.push(format!("{}.{}", plan.name, f.name));
            }
        }
        found.sort();
        let mut expected: Vec<String> = USER_TEXT_FIELDS.iter().map(|f| f.to_string()).collect();
        expected.sort();
        assert_eq!(found, expected);
        assert!(index
            .payload_fields("temporal.api.query.v1.WorkflowQueryResult")
            .unwrap_or_default()
            .iter()
            .any(|f| f.text && f.name == "error_message"));
    }
}
