//! The system Nexus endpoint `__temporal_system`: Nexus operations the Temporal server runs
//! itself (a workflow's signal-with-start of another workflow, in SDKs that have it).
//!
//! The server must read the operation's input, so SDKs do not encode it like a user payload:
//! the input is an *envelope*, a Payload with metadata `encoding: binary/protobuf`,
//! `messageType: <the operation's request type>` and `__temporal_system_payload: true`, whose
//! `data` is the serialized request (`SignalWithStartWorkflowExecutionRequest`). Codecs leave the
//! envelope alone and encode only the payloads inside it (temporalio/api-go `proxy` visitor,
//! the SDKs' payload visitors; checked against the Python SDK 1.35 and server 1.32).
//!
//! portcullis does the same: where a message that starts a Nexus operation
//! ([`NEXUS_OPERATION_MESSAGES`]) names the system endpoint, its `input` must be such an envelope
//! of an operation listed in [`SYSTEM_OPERATIONS`]; the walker descends into its `data` as the
//! operation's request type (the type the server will decode, not the one the client claims,
//! which must agree) and seals the payloads inside, under the namespace the inner request names
//! (see `targets`). Anything else at the system endpoint is refused: an operation portcullis does
//! not know, an input that is not such an envelope, metadata it does not know.
//!
//! The server answers with a `binary/protobuf` record of the response type
//! (`SignalWithStartWorkflowExecutionResponse`: run id, started, a link; no payloads), in the
//! operation's completion. It holds no user data; `encrypted_only` namespaces accept it.

use super::wire::{self, Field, WireError, WireType};

/// The reserved name of the system Nexus endpoint, served by the Temporal server itself.
pub const SYSTEM_NEXUS_ENDPOINT: &str = "__temporal_system";
/// Metadata marking a system envelope, and its value.
pub const SYSTEM_PAYLOAD_KEY: &[u8] = b"__temporal_system_payload";
pub const SYSTEM_PAYLOAD_VALUE: &[u8] = b"true";
/// The TypeScript SDK adds the serialization context (namespace, workflow id) as JSON.
const SYSTEM_CONTEXT_KEY: &[u8] = b"__temporal_system_context";
const ENCODING_KEY: &[u8] = b"encoding";
const MESSAGE_TYPE_KEY: &[u8] = b"messageType";
pub const BINARY_PROTOBUF: &[u8] = b"binary/protobuf";

// temporal.api.common.v1.Payload: metadata = 1 (map<string, bytes>), data = 2.
const PAYLOAD_METADATA: u32 = 1;
pub(crate) const PAYLOAD_DATA: u32 = 2;

/// An operation of the system endpoint that portcullis knows how to seal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SystemOperation {
    pub service: &'static str,
    pub operation: &'static str,
    /// Full name of the input's message type (the envelope's `messageType`).
    pub request: &'static str,
    /// Full name of the result's message type.
    pub response: &'static str,
}

/// Every system operation portcullis seals (a reviewed list: a new one is refused until added).
pub const SYSTEM_OPERATIONS: &[SystemOperation] = &[SystemOperation {
    service: "temporal.api.workflowservice.v1.WorkflowService",
    operation: "SignalWithStartWorkflowExecution",
    request: "temporal.api.workflowservice.v1.SignalWithStartWorkflowExecutionRequest",
    response: "temporal.api.workflowservice.v1.SignalWithStartWorkflowExecutionResponse",
}];

/// Messages that start a Nexus operation: they name its endpoint, service and operation next
/// to its `input` Payload. (A test checks every message of the schema with an `endpoint` and an
/// `input` is listed.)
pub const NEXUS_OPERATION_MESSAGES: &[&str] = &[
    "temporal.api.command.v1.ScheduleNexusOperationCommandAttributes",
    "temporal.api.history.v1.NexusOperationScheduledEventAttributes",
    "temporal.api.workflowservice.v1.StartNexusOperationExecutionRequest",
];

/// The system operation named by `service` and `operation`, if portcullis knows it.
pub fn operation(service: &str, operation: &str) -> Option<&'static SystemOperation> {
    SYSTEM_OPERATIONS
        .iter()
        .find(|o| o.service == service && o.operation == operation)
}

/// Why a system Nexus operation cannot be sealed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SystemNexusError {
    #[error("the system Nexus endpoint {SYSTEM_NEXUS_ENDPOINT} runs {service}/{operation}, which portcullis does not know how to seal (it knows {})", known())]
    UnknownOperation { service: String, operation: String },
    #[error("the input of a system Nexus operation must be a binary/protobuf envelope marked __temporal_system_payload=true (the server reads it; only the payloads inside are sealed): {0}")]
    NotAnEnvelope(String),
    #[error("malformed system Nexus envelope: {0}")]
    Malformed(WireError),
}

fn known() -> String {
    SYSTEM_OPERATIONS
        .iter()
        .map(|o| format!("{}/{}", o.service, o.operation))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The endpoint, service and operation fields of a message of [`NEXUS_OPERATION_MESSAGES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NexusFields {
    pub endpoint: u32,
    pub service: u32,
    pub operation: u32,
    pub input: u32,
}

impl NexusFields {
    /// The fields of `message` when it is one of [`NEXUS_OPERATION_MESSAGES`] (and has them all).
    pub fn of(message: &prost_reflect::MessageDescriptor) -> Option<NexusFields> {
        if !NEXUS_OPERATION_MESSAGES.contains(&message.full_name()) {
            return None;
        }
        let number = |name: &str| message.get_field_by_name(name).map(|f| f.number());
        Some(NexusFields {
            endpoint: number("endpoint")?,
            service: number("service")?,
            operation: number("operation")?,
            input: number("input")?,
        })
    }
}

/// What a Nexus-operation message (by `fields`) asks for: `None` when its endpoint is not the
/// system endpoint, else the system operation, or why it is not one portcullis knows.
pub fn system_operation(
    fields: NexusFields,
    message: &[u8],
) -> Result<Option<&'static SystemOperation>, SystemNexusError> {
    let (mut endpoint, mut service, mut operation_name): (&[u8], &[u8], &[u8]) = (&[], &[], &[]);
    for field in wire::fields(message) {
        let field = field.map_err(SystemNexusError::Malformed)?;
        let slot = if field.number == fields.endpoint {
            &mut endpoint
        } else if field.number == fields.service {
            &mut service
        } else if field.number == fields.operation {
            &mut operation_name
        } else {
            continue;
        };
        if field.wire_type != WireType::Len {
            return Err(SystemNexusError::Malformed(WireError::UnexpectedWireType {
                field: field.number,
            }));
        }
        // The last occurrence counts, as for any scalar.
        *slot = field.value;
    }
    if endpoint != SYSTEM_NEXUS_ENDPOINT.as_bytes() {
        return Ok(None);
    }
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    operation(&text(service), &text(operation_name))
        .map(Some)
        .ok_or_else(|| SystemNexusError::UnknownOperation {
            service: text(service),
            operation: text(operation_name),
        })
}

/// Checks that `payload` (a serialized Payload) is a system envelope of `operation`'s request
/// and returns its `data` fields (normally one; every occurrence, as a decoder would merge
/// them). Only the metadata SDKs write is allowed: it reaches the server in plaintext.
pub fn envelope_data<'a>(
    payload: &'a [u8],
    operation: &SystemOperation,
) -> Result<Vec<Field<'a>>, SystemNexusError> {
    let not = |reason: String| SystemNexusError::NotAnEnvelope(reason);
    let (mut marked, mut encoding, mut message_type) = (false, None, None);
    let mut data = Vec::new();
    for field in wire::fields(payload) {
        let field = field.map_err(SystemNexusError::Malformed)?;
        if field.wire_type != WireType::Len {
            return Err(SystemNexusError::Malformed(WireError::UnexpectedWireType {
                field: field.number,
            }));
        }
        match field.number {
            PAYLOAD_METADATA => {
                let (mut key, mut value): (&[u8], &[u8]) = (&[], &[]);
                for part in wire::fields(field.value) {
                    let part = part.map_err(SystemNexusError::Malformed)?;
                    match part.number {
                        1 => key = part.value,
                        2 => value = part.value,
                        other => return Err(not(format!("metadata entry field {other}"))),
                    }
                }
                match key {
                    SYSTEM_PAYLOAD_KEY => marked = value == SYSTEM_PAYLOAD_VALUE,
                    ENCODING_KEY => encoding = Some(value),
                    MESSAGE_TYPE_KEY => message_type = Some(value),
                    SYSTEM_CONTEXT_KEY => {}
                    other => {
                        return Err(not(format!(
                            "it carries metadata {:?}, which would reach the server in plaintext",
                            String::from_utf8_lossy(other)
                        )))
                    }
                }
            }
            PAYLOAD_DATA => data.push(field),
            other => return Err(not(format!("the Payload has field {other}"))),
        }
    }
    let lossy = |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
    if !marked {
        return Err(not(format!(
            "it is not marked (encoding {:?})",
            lossy(encoding)
        )));
    }
    if encoding != Some(BINARY_PROTOBUF) {
        return Err(not(format!("its encoding is {:?}", lossy(encoding))));
    }
    if message_type != Some(operation.request.as_bytes()) {
        return Err(not(format!(
            "its messageType is {:?}, but {}/{} takes {}",
            lossy(message_type),
            operation.service,
            operation.operation,
            operation.request
        )));
    }
    Ok(data)
}

/// Whether `payload` is the server's answer to a system operation: a `binary/protobuf` record
/// of a listed response type (marked or not; server 1.32 does not mark it), with no metadata
/// besides. Such records hold no user data.
pub fn is_system_response(payload: &[u8]) -> bool {
    let (mut encoding, mut message_type) = (None, None);
    for field in wire::fields(payload) {
        let Ok(field) = field else { return false };
        match (field.number, field.wire_type) {
            (PAYLOAD_METADATA, WireType::Len) => {
                let (mut key, mut value): (&[u8], &[u8]) = (&[], &[]);
                for part in wire::fields(field.value) {
                    let Ok(part) = part else { return false };
                    match part.number {
                        1 => key = part.value,
                        2 => value = part.value,
                        _ => return false,
                    }
                }
                match key {
                    ENCODING_KEY => encoding = Some(value),
                    MESSAGE_TYPE_KEY => message_type = Some(value),
                    SYSTEM_PAYLOAD_KEY if value == SYSTEM_PAYLOAD_VALUE => {}
                    _ => return false,
                }
            }
            (PAYLOAD_DATA, WireType::Len) => {}
            _ => return false,
        }
    }
    encoding == Some(BINARY_PROTOBUF)
        && SYSTEM_OPERATIONS
            .iter()
            .any(|o| message_type == Some(o.response.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SWS: &SystemOperation = &SYSTEM_OPERATIONS[0];

    fn payload(metadata: &[(&[u8], &[u8])], data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for (k, v) in metadata {
            let mut entry = Vec::new();
            wire::put_len_field(&mut entry, 1, k);
            wire::put_len_field(&mut entry, 2, v);
            wire::put_len_field(&mut out, 1, &entry);
        }
        wire::put_len_field(&mut out, 2, data);
        out
    }

    fn envelope() -> Vec<(&'static [u8], &'static [u8])> {
        vec![
            (SYSTEM_PAYLOAD_KEY, SYSTEM_PAYLOAD_VALUE),
            (ENCODING_KEY, BINARY_PROTOBUF),
            (MESSAGE_TYPE_KEY, SWS.request.as_bytes()),
        ]
    }

    #[test]
    fn envelopes_are_recognised_and_everything_else_refused() {
        let ok = payload(&envelope(), b"\x0a\x02ns");
        let data = envelope_data(&ok, SWS).unwrap();
        assert_eq!(data.len(), 1);
        assert_eq!(data[0].value, b"\x0a\x02ns");
        let mut with_context = envelope();
        with_context.push((SYSTEM_CONTEXT_KEY, b"{}"));
        assert!(envelope_data(&payload(&with_context, b""), SWS).is_ok());

        for (name, metadata) in [
            ("unmarked", envelope()[1..].to_vec()),
            (
                "json",
                vec![
                    (SYSTEM_PAYLOAD_KEY, SYSTEM_PAYLOAD_VALUE),
                    (ENCODING_KEY, b"json/protobuf".as_slice()),
                    (MESSAGE_TYPE_KEY, SWS.request.as_bytes()),
                ],
            ),
            (
                "other type",
                vec![
                    (SYSTEM_PAYLOAD_KEY, SYSTEM_PAYLOAD_VALUE),
                    (ENCODING_KEY, BINARY_PROTOBUF),
                    (
                        MESSAGE_TYPE_KEY,
                        b"temporal.api.common.v1.Payloads".as_slice(),
                    ),
                ],
            ),
            ("extra metadata", {
                let mut m = envelope();
                m.push((b"secret", b"x"));
                m
            }),
        ] {
            let err = envelope_data(&payload(&metadata, b""), SWS).unwrap_err();
            assert!(
                matches!(err, SystemNexusError::NotAnEnvelope(_)),
                "{name}: {err}"
            );
        }
        let mut extra_field = payload(&envelope(), b"");
        wire::put_len_field(&mut extra_field, 3, b"x");
        assert!(envelope_data(&extra_field, SWS).is_err());
        assert!(matches!(
            envelope_data(b"\x0a\x09", SWS),
            Err(SystemNexusError::Malformed(_))
        ));
    }

    #[test]
    fn the_endpoint_service_and_operation_pick_the_operation() {
        let fields = NexusFields {
            endpoint: 1,
            service: 2,
            operation: 3,
            input: 4,
        };
        let message = |endpoint: &str, service: &str, operation: &str| {
            let mut m = Vec::new();
            wire::put_len_field(&mut m, 1, endpoint.as_bytes());
            wire::put_len_field(&mut m, 2, service.as_bytes());
            wire::put_len_field(&mut m, 3, operation.as_bytes());
            m
        };
        assert_eq!(
            system_operation(fields, &message("my-endpoint", SWS.service, SWS.operation)),
            Ok(None)
        );
        assert_eq!(
            system_operation(
                fields,
                &message(SYSTEM_NEXUS_ENDPOINT, SWS.service, SWS.operation)
            ),
            Ok(Some(SWS))
        );
        let err = system_operation(
            fields,
            &message(
                SYSTEM_NEXUS_ENDPOINT,
                SWS.service,
                "WaitExternalWorkflowCompletion",
            ),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("WaitExternalWorkflowCompletion"),
            "{err}"
        );
        assert!(err.to_string().contains(SWS.operation), "{err}");
    }

    #[test]
    fn server_responses_are_told_from_user_payloads() {
        let record = payload(
            &[
                (ENCODING_KEY, BINARY_PROTOBUF),
                (MESSAGE_TYPE_KEY, SWS.response.as_bytes()),
            ],
            b"\x0a\x03run",
        );
        assert!(is_system_response(&record));
        let user = payload(
            &[
                (ENCODING_KEY, BINARY_PROTOBUF),
                (MESSAGE_TYPE_KEY, b"my.app.Thing".as_slice()),
            ],
            b"\x0a\x03run",
        );
        assert!(!is_system_response(&user));
        let json = payload(&[(ENCODING_KEY, b"json/plain".as_slice())], b"1");
        assert!(!is_system_response(&json));
    }
}
