//! `temporal.api.common.v1.Payloads` in proto3 JSON (`{"payloads": [{"metadata": {...},
//! "data": "<base64>"}]}`), to and from its protobuf encoding, through the descriptor pool so
//! every Payload field (also `externalPayloads`) survives the trip.

use prost::Message as _;
use prost_reflect::{DeserializeOptions, DynamicMessage, MessageDescriptor, SerializeOptions};

use crate::schema::Schema;

pub const PAYLOADS: &str = "temporal.api.common.v1.Payloads";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JsonError {
    #[error("the body is not a proto3-JSON Payloads object: {0}")]
    Malformed(String),
    #[error("{count} payloads in one request; at most {limit} are accepted")]
    TooMany { count: usize, limit: usize },
    #[error("internal: {0}")]
    Internal(String),
}

fn descriptor() -> Result<MessageDescriptor, JsonError> {
    Schema::global()
        .payloads_json()
        .cloned()
        .ok_or_else(|| JsonError::Internal(format!("{PAYLOADS} is not in the schema")))
}

/// Parses a request body; returns the Payloads' protobuf encoding and how many payloads it holds.
pub fn parse(body: &[u8], max_payloads: usize) -> Result<(Vec<u8>, usize), JsonError> {
    let descriptor = descriptor()?;
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let message = DynamicMessage::deserialize_with_options(
        descriptor,
        &mut deserializer,
        &DeserializeOptions::new(),
    )
    .map_err(|e| JsonError::Malformed(e.to_string()))?;
    deserializer
        .end()
        .map_err(|e| JsonError::Malformed(e.to_string()))?;
    let count = message
        .get_field_by_name("payloads")
        .and_then(|v| v.as_list().map(<[_]>::len))
        .unwrap_or(0);
    if count > max_payloads {
        return Err(JsonError::TooMany {
            count,
            limit: max_payloads,
        });
    }
    Ok((message.encode_to_vec(), count))
}

/// Renders a Payloads protobuf encoding as proto3 JSON.
pub fn render(encoded: &[u8]) -> Result<Vec<u8>, JsonError> {
    let message = DynamicMessage::decode(descriptor()?, encoded)
        .map_err(|e| JsonError::Internal(format!("re-reading payloads: {e}")))?;
    let mut out = Vec::with_capacity(encoded.len() * 4 / 3 + 64);
    let mut serializer = serde_json::Serializer::new(&mut out);
    message
        .serialize_with_options(&mut serializer, &SerializeOptions::new())
        .map_err(|e| JsonError::Internal(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_malformed_input() {
        let body = br#"{"payloads":[{"metadata":{"encoding":"anNvbi9wbGFpbg=="},"data":"ImhpIg=="},{"data":"","externalPayloads":[{"sizeBytes":"12"}]}]}"#;
        let (encoded, count) = parse(body, 10).unwrap();
        assert_eq!(count, 2);
        let json: serde_json::Value = serde_json::from_slice(&render(&encoded).unwrap()).unwrap();
        assert_eq!(json["payloads"][0]["data"], "ImhpIg==");
        assert_eq!(
            json["payloads"][0]["metadata"]["encoding"],
            "anNvbi9wbGFpbg=="
        );
        assert_eq!(
            json["payloads"][1]["externalPayloads"][0]["sizeBytes"],
            "12"
        );
        // Unpadded and URL-safe base64 are proto3 JSON too.
        assert!(parse(br#"{"payloads":[{"data":"ImhpIg"}]}"#, 10).is_ok());
        assert_eq!(parse(br#"{}"#, 10).unwrap().1, 0);
        for bad in [
            &b"not json"[..],
            br#"{"payloads":[{"data":"!!!"}]}"#,
            br#"{"payloads":{"data":"x"}}"#,
            br#"{"payload":[]}"#,
            br#"{"payloads":[]} trailing"#,
            br#"[]"#,
        ] {
            assert!(
                matches!(parse(bad, 10), Err(JsonError::Malformed(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            parse(br#"{"payloads":[{},{},{}]}"#, 2),
            Err(JsonError::TooMany { count: 3, limit: 2 })
        );
    }
}
