//! The reference that replaces an offloaded payload: a Payload
//! `{encoding: binary/portcullis-offload, portcullis-offload: v1}` whose data is a serialized
//! `portcullis.v1.OffloadReference`. It is sealed like any payload, so upstream sees only an
//! envelope of a few hundred bytes.

use prost::Message as _;

use crate::crypto::proto::OffloadReference;
use crate::payload::wire::{self, WireType};

pub const ENCODING: &[u8] = b"binary/portcullis-offload";
pub const MARKER_KEY: &[u8] = b"portcullis-offload";
pub const MARKER_V1: &[u8] = b"v1";
const VERSION: u32 = 1;
const DIGEST_LEN: usize = 32;

/// A decoded reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    pub bucket: String,
    pub key: String,
    /// The object's size.
    pub size: u64,
    /// SHA-256 of the object.
    pub sha256: [u8; DIGEST_LEN],
    /// The size of the original Payload the object opens to.
    pub payload_size: u64,
}

/// A reference marked as one that is not readable: the call fails (DATA_LOSS).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed offload reference: {0}")]
pub struct MalformedReference(pub &'static str);

impl Reference {
    /// The serialized reference Payload (plaintext; it is sealed before it goes anywhere).
    pub fn to_payload(&self) -> Vec<u8> {
        let data = OffloadReference {
            version: VERSION,
            bucket: self.bucket.clone(),
            key: self.key.clone(),
            size: self.size,
            sha256: self.sha256.to_vec(),
            payload_size: self.payload_size,
        }
        .encode_to_vec();
        let mut out = Vec::with_capacity(data.len() + 80);
        for (key, value) in [(b"encoding".as_slice(), ENCODING), (MARKER_KEY, MARKER_V1)] {
            let mut entry = Vec::with_capacity(key.len() + value.len() + 4);
            wire::put_len_field(&mut entry, 1, key);
            wire::put_len_field(&mut entry, 2, value);
            wire::put_len_field(&mut out, 1, &entry);
        }
        wire::put_len_field(&mut out, 2, &data);
        out
    }

    /// `Ok(None)`: not a reference (no `portcullis-offload` metadata). `Err`: marked as one,
    /// but not readable.
    pub fn from_payload(payload: &[u8]) -> Result<Option<Reference>, MalformedReference> {
        let mut marker = None;
        let mut data: &[u8] = &[];
        for field in wire::fields(payload) {
            let Ok(field) = field else {
                return Ok(None);
            };
            match (field.number, field.wire_type) {
                (1, WireType::Len) => {
                    let (mut key, mut value): (&[u8], &[u8]) = (&[], &[]);
                    for part in wire::fields(field.value).flatten() {
                        match part.number {
                            1 => key = part.value,
                            2 => value = part.value,
                            _ => {}
                        }
                    }
                    if key == MARKER_KEY {
                        marker = Some(value);
                    }
                }
                (2, WireType::Len) => data = field.value,
                _ => {}
            }
        }
        let Some(marker) = marker else {
            return Ok(None);
        };
        if marker != MARKER_V1 {
            return Err(MalformedReference("unsupported portcullis-offload version"));
        }
        let decoded = OffloadReference::decode(data)
            .map_err(|_| MalformedReference("the reference is not valid protobuf"))?;
        if decoded.version != VERSION {
            return Err(MalformedReference("unsupported reference version"));
        }
        let sha256: [u8; DIGEST_LEN] = decoded
            .sha256
            .as_slice()
            .try_into()
            .map_err(|_| MalformedReference("the digest is not 32 bytes"))?;
        if decoded.bucket.is_empty() || decoded.key.is_empty() {
            return Err(MalformedReference("the bucket or key is empty"));
        }
        Ok(Some(Reference {
            bucket: decoded.bucket,
            key: decoded.key,
            size: decoded.size,
            sha256,
            payload_size: decoded.payload_size,
        }))
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    out
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; DIGEST_LEN] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; DIGEST_LEN];
    out.copy_from_slice(digest.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_what_it_cannot_read() {
        let reference = Reference {
            bucket: "b".repeat(3),
            key: "portcullis/ns/abc".into(),
            size: 10,
            sha256: sha256(b"object"),
            payload_size: 9,
        };
        let payload = reference.to_payload();
        assert_eq!(Reference::from_payload(&payload), Ok(Some(reference)));
        // A plain payload is not one.
        let mut plain = Vec::new();
        wire::put_len_field(&mut plain, 2, b"data");
        assert_eq!(Reference::from_payload(&plain), Ok(None));
        // Marked, but the data is not a reference.
        let mut bogus = Vec::new();
        let mut entry = Vec::new();
        wire::put_len_field(&mut entry, 1, MARKER_KEY);
        wire::put_len_field(&mut entry, 2, MARKER_V1);
        wire::put_len_field(&mut bogus, 1, &entry);
        wire::put_len_field(&mut bogus, 2, b"\xff\xff");
        assert!(Reference::from_payload(&bogus).is_err());
    }
}
