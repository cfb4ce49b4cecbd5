//! The 5-byte length-prefixed message framing and per-message compression.

use std::io::Read;

use bytes::{BufMut, Bytes, BytesMut};
use flate2::{read::GzDecoder, write::GzEncoder, Compression};

use crate::error::ProxyError;

pub const HEADER_LEN: usize = 5;

/// Message compression named by `grpc-encoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    #[default]
    Identity,
    Gzip,
}

impl Encoding {
    pub fn from_header(value: Option<&http::HeaderValue>) -> Result<Encoding, ProxyError> {
        match value.map(|v| v.to_str().unwrap_or("<non-ascii>")) {
            None | Some("identity") => Ok(Encoding::Identity),
            Some("gzip") => Ok(Encoding::Gzip),
            Some(other) => Err(ProxyError::UnsupportedEncoding(other.to_string())),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Encoding::Identity => "identity",
            Encoding::Gzip => "gzip",
        }
    }
}

/// Which side of the call a message comes from; it decides the error raised for bad framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Request,
    Response,
}

/// Decodes the body of a unary message: at most one frame, decompressed, within `limit` bytes.
/// Returns `None` for an empty body (a response that carries only a status).
pub fn decode_unary(
    body: &Bytes,
    encoding: Encoding,
    limit: usize,
    direction: Direction,
) -> Result<Option<Bytes>, FrameError> {
    if body.is_empty() {
        return Ok(None);
    }
    if body.len() < HEADER_LEN {
        return Err(FrameError::Malformed("truncated message header"));
    }
    let flag = body[0];
    let declared = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if declared > limit {
        return Err(FrameError::TooLarge {
            size: declared,
            limit,
        });
    }
    let end = HEADER_LEN + declared;
    match body.len().cmp(&end) {
        std::cmp::Ordering::Less => {
            return Err(FrameError::Malformed(
                "message shorter than its length prefix",
            ))
        }
        std::cmp::Ordering::Greater => {
            return Err(FrameError::Malformed(match direction {
                Direction::Request => "more than one message for a unary method",
                Direction::Response => "more than one message in a unary response",
            }))
        }
        std::cmp::Ordering::Equal => {}
    }
    let payload = body.slice(HEADER_LEN..end);
    match (flag, encoding) {
        (0, _) => Ok(Some(payload)),
        (1, Encoding::Gzip) => gunzip(&payload, limit).map(Some),
        (1, Encoding::Identity) => Err(FrameError::Malformed(
            "compressed flag set without a grpc-encoding",
        )),
        _ => Err(FrameError::Malformed("invalid compressed flag")),
    }
}

fn gunzip(data: &[u8], limit: usize) -> Result<Bytes, FrameError> {
    let mut out = Vec::with_capacity(data.len().saturating_mul(4).min(limit));
    // Read one byte past the limit so an oversized (or bomb) message is detected, not truncated.
    let read = GzDecoder::new(data)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|_| FrameError::Malformed("invalid gzip data"))?;
    if read > limit {
        return Err(FrameError::TooLarge { size: read, limit });
    }
    Ok(Bytes::from(out))
}

/// Frames one message, compressing it with `encoding`.
pub fn encode(message: &[u8], encoding: Encoding) -> Bytes {
    let (flag, data): (u8, std::borrow::Cow<[u8]>) = match encoding {
        Encoding::Identity => (0, message.into()),
        Encoding::Gzip => {
            let mut gz = GzEncoder::new(
                Vec::with_capacity(message.len() / 2 + 64),
                Compression::fast(),
            );
            // Writing into a Vec cannot fail.
            let compressed = std::io::Write::write_all(&mut gz, message)
                .and_then(|_| gz.finish())
                .unwrap_or_default();
            (1, compressed.into())
        }
    };
    let mut out = BytesMut::with_capacity(HEADER_LEN + data.len());
    out.put_u8(flag);
    out.put_u32(data.len() as u32);
    out.put_slice(&data);
    out.freeze()
}

#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    Malformed(&'static str),
    TooLarge { size: usize, limit: usize },
}

impl FrameError {
    pub fn into_request_error(self) -> ProxyError {
        match self {
            FrameError::Malformed(reason) => ProxyError::MalformedFrame(reason),
            FrameError::TooLarge { size, limit } => ProxyError::MessageTooLarge {
                what: "request",
                size: format!("{size} bytes"),
                limit,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_round_trip() {
        let framed = encode(b"hello", Encoding::Identity);
        assert_eq!(&framed[..5], &[0, 0, 0, 0, 5]);
        let got = decode_unary(&framed, Encoding::Identity, 100, Direction::Request).unwrap();
        assert_eq!(got.as_deref(), Some(&b"hello"[..]));
    }

    #[test]
    fn gzip_round_trip() {
        let message = vec![7u8; 10_000];
        let framed = encode(&message, Encoding::Gzip);
        assert_eq!(framed[0], 1);
        assert!(framed.len() < 1000);
        let got = decode_unary(&framed, Encoding::Gzip, 20_000, Direction::Request).unwrap();
        assert_eq!(got.unwrap(), message);
    }

    #[test]
    fn gzip_bomb_is_too_large() {
        let framed = encode(&vec![0u8; 1 << 20], Encoding::Gzip);
        let err = decode_unary(&framed, Encoding::Gzip, 1000, Direction::Request).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { limit: 1000, .. }));
    }

    #[test]
    fn malformed_frames_are_rejected() {
        let cases: &[&[u8]] = &[
            &[0, 0, 0],
            &[0, 0, 0, 0, 9, 1, 2],
            &[0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1],
            &[2, 0, 0, 0, 1, 1],
            &[1, 0, 0, 0, 1, 1],
        ];
        for case in cases {
            let body = Bytes::copy_from_slice(case);
            let err = decode_unary(&body, Encoding::Identity, 100, Direction::Request).unwrap_err();
            assert!(matches!(err, FrameError::Malformed(_)), "{case:?}: {err:?}");
        }
        let garbage_gzip = Bytes::from_static(&[1, 0, 0, 0, 3, 1, 2, 3]);
        assert!(decode_unary(&garbage_gzip, Encoding::Gzip, 100, Direction::Request).is_err());
    }

    #[test]
    fn declared_length_over_limit_is_too_large() {
        let body = Bytes::from_static(&[0, 0, 0, 1, 0]);
        let err = decode_unary(&body, Encoding::Identity, 100, Direction::Request).unwrap_err();
        assert_eq!(
            err,
            FrameError::TooLarge {
                size: 256,
                limit: 100
            }
        );
    }

    #[test]
    fn empty_body_has_no_message() {
        assert_eq!(
            decode_unary(&Bytes::new(), Encoding::Identity, 1, Direction::Response).unwrap(),
            None
        );
    }
}
