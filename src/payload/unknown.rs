//! Finds the first field of a message that the API schema in force does not know.
//!
//! The payload walker copies unknown fields verbatim: that keeps a newer client's fields intact,
//! but a field the schema does not know could hold a payload, which then goes upstream unsealed.
//! A namespace that must never see plaintext checks its requests with this first, and refuses
//! what it cannot vouch for. The walk descends into every message-typed field (map entries
//! included) and into `google.protobuf.Any` values whose type the schema knows; an `Any` of an
//! unknown type counts as unknown. The request inside a system Nexus envelope (see
//! [`super::system_nexus`]) is checked as its type: the walker seals what it finds there too.
//! It reads without allocating (except for the path it reports).

use prost_reflect::{DescriptorPool, Kind};

use super::system_nexus::{self as system, NexusFields};
use super::walker::{PayloadIndex, DEFAULT_MAX_DEPTH};
use super::wire::{self, WireError, WireType};
use crate::schema::Schema;

const ANY: &str = "google.protobuf.Any";

/// Why a message cannot be vouched for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnknownField {
    #[error("field {number} of {path} is not in the API schema in force")]
    Field { path: String, number: u32 },
    #[error("{path} holds a google.protobuf.Any of type {type_url:?}, which the API schema in force does not know")]
    AnyType { path: String, type_url: String },
    #[error("malformed protobuf at {path}: {reason}")]
    Malformed { path: String, reason: String },
    #[error("{path} is nested deeper than {limit} messages")]
    TooDeep { path: String, limit: usize },
}

/// What this check needs of the schema, without the descriptor pool (which is not kept after
/// start-up): every message's fields by number, and the message type of those that hold one.
/// Messages are numbered as the payload index numbers them (both number the pool's messages in
/// order), and found by name through it.
#[derive(Debug)]
pub struct KnownMessages {
    messages: Vec<KnownMessage>,
}

#[derive(Debug)]
struct KnownMessage {
    name: Box<str>,
    /// Sorted by number.
    fields: Box<[KnownField]>,
    /// Set for the Nexus-operation messages, whose system envelope is checked as its type.
    nexus: Option<NexusFields>,
}

#[derive(Debug)]
struct KnownField {
    number: u32,
    name: Box<str>,
    /// The field's message type (map entries included), when it has one.
    message: Option<u32>,
}

impl KnownMessages {
    pub fn new(pool: &DescriptorPool, ids: &PayloadIndex) -> KnownMessages {
        let messages = pool
            .all_messages()
            .map(|m| {
                let mut fields: Vec<KnownField> = m
                    .fields()
                    .map(|f| KnownField {
                        number: f.number(),
                        name: f.name().into(),
                        message: match f.kind() {
                            Kind::Message(child) => ids.id(child.full_name()),
                            _ => None,
                        },
                    })
                    .collect();
                fields.sort_unstable_by_key(|f| f.number);
                KnownMessage {
                    name: m.full_name().into(),
                    fields: fields.into_boxed_slice(),
                    nexus: NexusFields::of(&m),
                }
            })
            .collect();
        KnownMessages { messages }
    }
}

/// The table with the index that finds its messages by name.
#[derive(Clone, Copy)]
struct Lookup<'a> {
    messages: &'a KnownMessages,
    ids: &'a PayloadIndex,
}

impl<'a> Lookup<'a> {
    fn get(self, id: u32) -> Option<&'a KnownMessage> {
        self.messages.messages.get(usize::try_from(id).ok()?)
    }

    fn named(self, full_name: &str) -> Option<&'a KnownMessage> {
        self.get(self.ids.id(full_name)?)
    }
}

impl KnownMessage {
    fn field(&self, number: u32) -> Option<&KnownField> {
        self.fields
            .binary_search_by_key(&number, |f| f.number)
            .ok()
            .map(|i| &self.fields[i])
    }
}

/// Ok when the schema in force knows every field of `message` (a serialized `message_type`);
/// else the first field it does not know.
pub fn ensure_known(message_type: &str, message: &[u8]) -> Result<(), UnknownField> {
    let schema = Schema::global();
    let known = Lookup {
        messages: schema.known_messages(),
        ids: schema.payload_index(),
    };
    let Some(descriptor) = known.named(message_type) else {
        return Err(UnknownField::AnyType {
            path: message_type.to_string(),
            type_url: message_type.to_string(),
        });
    };
    check(known, descriptor, message, 0, &mut || {
        message_type.to_string()
    })
}

fn check(
    known: Lookup<'_>,
    descriptor: &KnownMessage,
    buf: &[u8],
    depth: usize,
    path: &mut dyn FnMut() -> String,
) -> Result<(), UnknownField> {
    if depth > DEFAULT_MAX_DEPTH {
        return Err(UnknownField::TooDeep {
            path: path(),
            limit: DEFAULT_MAX_DEPTH,
        });
    }
    let malformed = |path: &mut dyn FnMut() -> String, e: WireError| UnknownField::Malformed {
        path: path(),
        reason: e.to_string(),
    };
    let is_any = &*descriptor.name == ANY;
    let mut any_type: Option<&[u8]> = None;
    let mut any_value: Option<&[u8]> = None;
    for field in wire::fields(buf) {
        let field = field.map_err(|e| malformed(path, e))?;
        let Some(known_field) = descriptor.field(field.number) else {
            return Err(UnknownField::Field {
                path: path(),
                number: field.number,
            });
        };
        if is_any {
            match field.number {
                1 => any_type = Some(field.value),
                2 => any_value = Some(field.value),
                _ => {}
            }
            continue;
        }
        if let Some(id) = known_field.message {
            // A message type missing from the table cannot be vouched for either.
            let child = known.get(id).ok_or_else(|| UnknownField::Field {
                path: path(),
                number: field.number,
            })?;
            if field.wire_type != WireType::Len {
                return Err(malformed(
                    path,
                    WireError::UnexpectedWireType {
                        field: field.number,
                    },
                ));
            }
            let mut child_path = || format!("{}.{}", path(), known_field.name);
            check(known, child, field.value, depth + 1, &mut child_path)?;
        }
    }
    if let Some(fields) = descriptor.nexus {
        check_system_envelope(known, fields, buf, depth, path)?;
    }
    if is_any && any_value.is_some_and(|v| !v.is_empty()) {
        let url = any_type.unwrap_or_default();
        let inner = wire::any_message_name(Some(url)).and_then(|name| known.named(name));
        let Some(inner) = inner else {
            return Err(UnknownField::AnyType {
                path: path(),
                type_url: String::from_utf8_lossy(url).into_owned(),
            });
        };
        let mut inner_path = || format!("{}<{}>", path(), inner.name);
        check(
            known,
            inner,
            any_value.unwrap_or_default(),
            depth + 1,
            &mut inner_path,
        )?;
    }
    Ok(())
}

/// A Nexus operation at the system endpoint: the request inside its input envelope.
fn check_system_envelope(
    known: Lookup<'_>,
    fields: NexusFields,
    buf: &[u8],
    depth: usize,
    path: &mut dyn FnMut() -> String,
) -> Result<(), UnknownField> {
    let malformed = |path: &mut dyn FnMut() -> String, reason: String| UnknownField::Malformed {
        path: path(),
        reason,
    };
    let operation = match system::system_operation(fields, buf) {
        Ok(Some(operation)) => operation,
        Ok(None) => return Ok(()),
        Err(e) => return Err(malformed(path, e.to_string())),
    };
    let Some(request) = known.named(operation.request) else {
        return Err(UnknownField::AnyType {
            path: path(),
            type_url: operation.request.to_string(),
        });
    };
    for field in wire::fields(buf) {
        let field = field.map_err(|e| malformed(path, e.to_string()))?;
        if field.number != fields.input {
            continue;
        }
        let data = system::envelope_data(field.value, operation)
            .map_err(|e| malformed(path, e.to_string()))?;
        for data in data {
            let mut inner_path = || format!("{}.input.data<{}>", path(), request.name);
            check(known, request, data.value, depth + 1, &mut inner_path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use temporalio_protos::temporal::api::common::v1::{Payload, Payloads};
    use temporalio_protos::temporal::api::workflowservice::v1::StartWorkflowExecutionRequest;

    use super::*;

    const START: &str = "temporal.api.workflowservice.v1.StartWorkflowExecutionRequest";

    fn start() -> Vec<u8> {
        StartWorkflowExecutionRequest {
            namespace: "ns".into(),
            input: Some(Payloads {
                payloads: vec![Payload {
                    metadata: [("encoding".to_string(), b"json/plain".to_vec())].into(),
                    data: b"1".to_vec(),
                    ..Default::default()
                }],
            }),
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn known_messages_pass_and_unknown_fields_are_named_wherever_they_hide() {
        assert_eq!(ensure_known(START, &start()), Ok(()));
        // At the top.
        let mut top = start();
        wire::put_len_field(&mut top, 999, b"anything");
        let err = ensure_known(START, &top).unwrap_err();
        assert_eq!(
            err,
            UnknownField::Field {
                path: START.into(),
                number: 999
            }
        );
        // Inside a payload (Payload field 3+ is not in the schema).
        let payload = Payload {
            data: b"x".to_vec(),
            ..Default::default()
        };
        let mut payload = payload.encode_to_vec();
        wire::put_len_field(&mut payload, 77, b"hidden");
        let mut payloads = Vec::new();
        wire::put_len_field(&mut payloads, 1, &payload);
        let mut nested = Vec::new();
        wire::put_len_field(&mut nested, 1, b"ns");
        wire::put_len_field(&mut nested, 5, &payloads);
        let err = ensure_known(START, &nested).unwrap_err();
        assert!(
            matches!(&err, UnknownField::Field { path, number: 77 } if path.ends_with(".input.payloads")),
            "{err}"
        );
        // Malformed input is an error, not a pass.
        assert!(matches!(
            ensure_known(START, &[0x0a, 0x09, b'x']),
            Err(UnknownField::Malformed { .. })
        ));
    }

    /// The request inside a system Nexus envelope is checked too.
    #[test]
    fn system_nexus_envelopes_are_checked_inside() {
        use temporalio_protos::temporal::api::workflowservice::v1::{
            SignalWithStartWorkflowExecutionRequest, StartNexusOperationExecutionRequest,
        };
        const REQUEST: &str = "temporal.api.workflowservice.v1.StartNexusOperationExecutionRequest";
        let request = |inner: Vec<u8>| {
            StartNexusOperationExecutionRequest {
                namespace: "ns".into(),
                endpoint: "__temporal_system".into(),
                service: "temporal.api.workflowservice.v1.WorkflowService".into(),
                operation: "SignalWithStartWorkflowExecution".into(),
                input: Some(Payload {
                    metadata: [
                        ("encoding".to_string(), b"binary/protobuf".to_vec()),
                        (
                            "messageType".to_string(),
                            b"temporal.api.workflowservice.v1.SignalWithStartWorkflowExecutionRequest".to_vec(),
                        ),
                        ("__temporal_system_payload".to_string(), b"true".to_vec()),
                    ]
                    .into(),
                    data: inner,
                    ..Default::default()
                }),
                ..Default::default()
            }
            .encode_to_vec()
        };
        let inner = SignalWithStartWorkflowExecutionRequest {
            namespace: "ns".into(),
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(ensure_known(REQUEST, &request(inner.clone())), Ok(()));
        let mut hidden = inner;
        wire::put_len_field(&mut hidden, 700, b"plaintext");
        let err = ensure_known(REQUEST, &request(hidden)).unwrap_err();
        assert!(
            matches!(&err, UnknownField::Field { number: 700, path } if path.contains(".input.data<")),
            "{err}"
        );
    }

    #[test]
    fn any_values_are_checked_by_their_type() {
        const STATUS: &str = "google.rpc.Status";
        let any = |type_url: &str, value: &[u8]| {
            let mut any = Vec::new();
            wire::put_len_field(&mut any, 1, type_url.as_bytes());
            wire::put_len_field(&mut any, 2, value);
            let mut status = Vec::new();
            wire::put_len_field(&mut status, 3, &any);
            status
        };
        let known = any(&format!("type.googleapis.com/{START}"), &start());
        assert_eq!(ensure_known(STATUS, &known), Ok(()));
        let unknown = any("type.googleapis.com/future.v1.Thing", b"\x0a\x01x");
        assert!(matches!(
            ensure_known(STATUS, &unknown),
            Err(UnknownField::AnyType { .. })
        ));
        let mut bad_inner = start();
        wire::put_len_field(&mut bad_inner, 500, b"");
        let hidden = any(&format!("type.googleapis.com/{START}"), &bad_inner);
        assert!(matches!(
            ensure_known(STATUS, &hidden),
            Err(UnknownField::Field { number: 500, .. })
        ));
    }
}
