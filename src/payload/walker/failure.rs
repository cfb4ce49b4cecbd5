//! [`FailureMode::Encode`] and [`FailureMode::Decode`]: moving a Failure's `message` and
//! `stack_trace` into its `encoded_attributes` Payload and back.
//!
//! The encoded form follows Temporal's SDK convention (failure/v1/message.proto): a `json/plain`
//! Payload holding `{"message": …, "stack_trace": …}`, the message replaced by
//! "Encoded failure" and the stack trace emptied. A metadata marker tells the attributes the
//! proxy encoded from those a client encoded itself, which are never touched on the way back.

use serde::{Deserialize, Serialize};

use super::{
    FailureMode, MessagePlan, Override, OverrideAction, PathNode, Segment, Walk, WalkError,
};
use crate::payload::wire::{self, put_len_field, WireError, WireType};

/// Metadata key and value marking attributes that portcullis encoded.
pub const FAILURE_MARKER_KEY: &str = "portcullis-failure";
pub const FAILURE_MARKER_VALUE: &str = "1";
/// What Temporal SDKs put in `message` when the attributes are encoded.
pub const ENCODED_FAILURE_MESSAGE: &str = "Encoded failure";
const JSON_PLAIN: &str = "json/plain";

// temporal.api.common.v1.Payload: metadata = 1 (map<string, bytes>: key = 1, value = 2), data = 2.
const PAYLOAD_METADATA: u32 = 1;
const PAYLOAD_DATA: u32 = 2;
const ENTRY_KEY: u32 = 1;
const ENTRY_VALUE: u32 = 2;

#[derive(Serialize)]
struct AttributesRef<'a> {
    message: &'a str,
    stack_trace: &'a str,
}

#[derive(Deserialize)]
struct Attributes {
    #[serde(default)]
    message: String,
    #[serde(default)]
    stack_trace: String,
}

/// The serialized Payload holding `message` and `stack_trace`.
pub(crate) fn encode_attributes(
    message: &str,
    stack_trace: &str,
) -> Result<Vec<u8>, serde_json::Error> {
    let data = serde_json::to_vec(&AttributesRef {
        message,
        stack_trace,
    })?;
    let mut payload = Vec::with_capacity(data.len() + 64);
    let mut entry = Vec::with_capacity(32);
    for (key, value) in [
        ("encoding", JSON_PLAIN),
        (FAILURE_MARKER_KEY, FAILURE_MARKER_VALUE),
    ] {
        entry.clear();
        put_len_field(&mut entry, ENTRY_KEY, key.as_bytes());
        put_len_field(&mut entry, ENTRY_VALUE, value.as_bytes());
        put_len_field(&mut payload, PAYLOAD_METADATA, &entry);
    }
    put_len_field(&mut payload, PAYLOAD_DATA, &data);
    Ok(payload)
}

/// The `data` of `payload` if its metadata carries the portcullis marker.
pub(crate) fn marked_data(payload: &[u8]) -> Result<Option<&[u8]>, WireError> {
    let mut marked = false;
    let mut data: &[u8] = &[];
    for field in wire::fields(payload) {
        let field = field?;
        if field.wire_type != WireType::Len {
            continue;
        }
        match field.number {
            PAYLOAD_METADATA => {
                let (mut key, mut value) = (None, None);
                for part in wire::fields(field.value) {
                    let part = part?;
                    match part.number {
                        ENTRY_KEY => key = Some(part.value),
                        ENTRY_VALUE => value = Some(part.value),
                        _ => {}
                    }
                }
                if key == Some(FAILURE_MARKER_KEY.as_bytes()) {
                    marked = value == Some(FAILURE_MARKER_VALUE.as_bytes());
                }
            }
            PAYLOAD_DATA => data = field.value,
            _ => {}
        }
    }
    Ok(marked.then_some(data))
}

fn non_empty(s: String) -> Option<Vec<u8>> {
    (!s.is_empty()).then(|| s.into_bytes())
}

const ENCODED_ATTRIBUTES: &str = "encoded_attributes";

impl<'a> Walk<'a> {
    pub(super) fn walk_failure(
        &mut self,
        plan: &'a MessagePlan,
        base: usize,
        buf: &[u8],
        depth: usize,
        node: Option<&PathNode<'_>>,
    ) -> Result<isize, WalkError> {
        match (self.options.failures, self.index.failure) {
            (FailureMode::Encode, Some(numbers)) => {
                self.encode_failure(plan, numbers, base, buf, depth, node)
            }
            (FailureMode::Decode, Some(numbers)) => {
                self.decode_failure(plan, numbers, base, buf, depth, node)
            }
            _ => self.walk_fields(plan, base, buf, depth, node, &mut []),
        }
    }

    fn encode_failure(
        &mut self,
        plan: &'a MessagePlan,
        numbers: super::index::FailureFields,
        base: usize,
        buf: &[u8],
        depth: usize,
        node: Option<&PathNode<'_>>,
    ) -> Result<isize, WalkError> {
        let (mut message, mut stack_trace, mut has_encoded): (&[u8], &[u8], bool) =
            (&[], &[], false);
        for field in wire::fields(buf) {
            let field = field.map_err(|e| self.malformed(node, e))?;
            let n = field.number;
            if n != numbers.message && n != numbers.stack_trace && n != numbers.encoded_attributes {
                continue;
            }
            if field.wire_type != WireType::Len {
                return Err(self.malformed(node, WireError::UnexpectedWireType { field: n }));
            }
            if n == numbers.message {
                message = field.value;
            } else if n == numbers.stack_trace {
                stack_trace = field.value;
            } else {
                has_encoded = true;
            }
        }
        if has_encoded || (message.is_empty() && stack_trace.is_empty()) {
            return self.walk_fields(plan, base, buf, depth, node, &mut []);
        }
        let message = std::str::from_utf8(message)
            .map_err(|_| self.malformed(node, WireError::InvalidUtf8(numbers.message)))?;
        let stack_trace = std::str::from_utf8(stack_trace)
            .map_err(|_| self.malformed(node, WireError::InvalidUtf8(numbers.stack_trace)))?;
        let mut child = PathNode::child(node, Segment::Field(ENCODED_ATTRIBUTES));
        child.failure_attributes = true;
        let payload =
            encode_attributes(message, stack_trace).map_err(|e| WalkError::FailureAttributes {
                path: self.path(Some(&child)),
                reason: e.to_string(),
            })?;
        let sealed = match self.visit(Some(&child), &payload, true)? {
            Some(sealed) => sealed,
            None => payload,
        };
        let mut overrides = [
            Override {
                number: numbers.message,
                action: OverrideAction::Set(Some(ENCODED_FAILURE_MESSAGE.as_bytes().to_vec())),
            },
            Override {
                number: numbers.stack_trace,
                action: OverrideAction::Set(None),
            },
            Override {
                number: numbers.encoded_attributes,
                action: OverrideAction::Set(Some(sealed)),
            },
        ];
        overrides.sort_by_key(|o| o.number);
        self.walk_fields(plan, base, buf, depth, node, &mut overrides)
    }

    fn decode_failure(
        &mut self,
        plan: &'a MessagePlan,
        numbers: super::index::FailureFields,
        base: usize,
        buf: &[u8],
        depth: usize,
        node: Option<&PathNode<'_>>,
    ) -> Result<isize, WalkError> {
        let mut count = 0usize;
        let mut encoded: &[u8] = &[];
        for field in wire::fields(buf) {
            let field = field.map_err(|e| self.malformed(node, e))?;
            if field.number == numbers.encoded_attributes {
                if field.wire_type != WireType::Len {
                    return Err(self.malformed(
                        node,
                        WireError::UnexpectedWireType {
                            field: field.number,
                        },
                    ));
                }
                count += 1;
                encoded = field.value;
            }
        }
        // Several occurrences would be merged by a decoder; nothing portcullis writes. Walk
        // them as ordinary payloads.
        if count != 1 {
            return self.walk_fields(plan, base, buf, depth, node, &mut []);
        }
        let mut child = PathNode::child(node, Segment::Field(ENCODED_ATTRIBUTES));
        child.failure_attributes = true;
        let opened = self.visit(Some(&child), encoded, false)?;
        let restored = match opened.as_deref() {
            // Only what the visitor opened is trusted: a marker in plaintext from upstream is not.
            Some(opened) => match marked_data(opened)
                .map_err(|e| self.malformed(Some(&child), e))?
            {
                Some(data) => Some(serde_json::from_slice::<Attributes>(data).map_err(|e| {
                    WalkError::FailureAttributes {
                        path: self.path(Some(&child)),
                        reason: e.to_string(),
                    }
                })?),
                None => None,
            },
            None => None,
        };
        match restored {
            Some(attributes) => {
                let mut overrides = [
                    Override {
                        number: numbers.message,
                        action: OverrideAction::Set(non_empty(attributes.message)),
                    },
                    Override {
                        number: numbers.stack_trace,
                        action: OverrideAction::Set(non_empty(attributes.stack_trace)),
                    },
                    Override {
                        number: numbers.encoded_attributes,
                        action: OverrideAction::Set(None),
                    },
                ];
                overrides.sort_by_key(|o| o.number);
                self.walk_fields(plan, base, buf, depth, node, &mut overrides)
            }
            None => {
                let mut overrides = [Override {
                    number: numbers.encoded_attributes,
                    action: OverrideAction::Visited(opened),
                }];
                self.walk_fields(plan, base, buf, depth, node, &mut overrides)
            }
        }
    }
}
