//! Which headers cross the proxy, and the `grpc-timeout` format.

use std::time::Duration;

use http::{header, HeaderMap, HeaderName, HeaderValue};

use crate::error::ProxyError;

pub const GRPC_TIMEOUT: &str = "grpc-timeout";
pub const GRPC_ENCODING: &str = "grpc-encoding";
pub const GRPC_ACCEPT_ENCODING: &str = "grpc-accept-encoding";
pub const TEMPORAL_NAMESPACE: &str = "temporal-namespace";
/// The caller's verified identity, set by the proxy (see `proxy::identity`); never taken from
/// a caller.
pub const IDENTITY_HEADER: &str = "portcullis-identity";

/// The names above as header names, for inserting on every call: built (and checked) at
/// compile time, and cloned without allocating (a name built from a `&str` at run time is
/// copied to the heap, and copied again when its map is cloned).
pub static GRPC_TIMEOUT_NAME: HeaderName = HeaderName::from_static(GRPC_TIMEOUT);
pub static GRPC_ENCODING_NAME: HeaderName = HeaderName::from_static(GRPC_ENCODING);
pub static GRPC_ACCEPT_ENCODING_NAME: HeaderName = HeaderName::from_static(GRPC_ACCEPT_ENCODING);
pub static TEMPORAL_NAMESPACE_NAME: HeaderName = HeaderName::from_static(TEMPORAL_NAMESPACE);
pub static IDENTITY_HEADER_NAME: HeaderName = HeaderName::from_static(IDENTITY_HEADER);

/// Headers that describe one hop, or that the proxy recomputes for the next hop.
fn is_hop_header(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
            | "te"
            | GRPC_ENCODING
            | GRPC_ACCEPT_ENCODING
            | GRPC_TIMEOUT
    )
}

/// The caller's headers that go upstream. Identity headers the server might trust
/// (`temporal-principal-*`) are never accepted from a caller.
pub fn request_headers_for_upstream(incoming: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(incoming.len() + 4);
    for (name, value) in incoming {
        if is_hop_header(name)
            || name.as_str().starts_with("temporal-principal-")
            || name.as_str() == IDENTITY_HEADER
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// The upstream's response headers that go back to the caller.
pub fn response_headers_for_caller(upstream: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(upstream.len() + 2);
    for (name, value) in upstream {
        if is_hop_header(name) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// Whether the caller accepts gzip-compressed responses.
pub fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(GRPC_ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|e| e.trim() == "gzip")
}

pub fn is_grpc_content_type(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v == "application/grpc"
                || v.starts_with("application/grpc+")
                || v.starts_with("application/grpc;")
        })
}

/// Parses `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_timeout(value: &HeaderValue) -> Result<Duration, ProxyError> {
    let invalid =
        || ProxyError::InvalidTimeout(String::from_utf8_lossy(value.as_bytes()).into_owned());
    let text = value.to_str().map_err(|_| invalid())?;
    if text.len() < 2 || text.len() > 9 {
        return Err(invalid());
    }
    let (digits, unit) = text.split_at(text.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    let amount: u64 = digits.parse().map_err(|_| invalid())?;
    Ok(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return Err(invalid()),
    })
}

/// Formats a remaining time for the next hop, in the finest unit that fits 8 digits.
pub fn format_timeout(remaining: Duration) -> HeaderValue {
    use std::io::Write as _;
    const MAX: u128 = 99_999_999;
    let nanos = remaining.as_nanos();
    let (amount, unit) = if nanos <= MAX {
        (nanos, 'n')
    } else if remaining.as_micros() <= MAX {
        (remaining.as_micros(), 'u')
    } else if remaining.as_millis() <= MAX {
        (remaining.as_millis(), 'm')
    } else if u128::from(remaining.as_secs()) <= MAX {
        (u128::from(remaining.as_secs()), 'S')
    } else {
        (u128::from(remaining.as_secs() / 3600).min(MAX), 'H')
    };
    // Written on the stack (this runs for every call with a deadline); at most 8 digits and a
    // unit, and digits and an ASCII unit are always a valid header value.
    let mut text = [0u8; 16];
    let mut cursor = std::io::Cursor::new(&mut text[..]);
    let written = write!(cursor, "{amount}{unit}").map(|()| cursor.position() as usize);
    written
        .ok()
        .and_then(|n| HeaderValue::from_bytes(&text[..n]).ok())
        .unwrap_or_else(|| HeaderValue::from_static("99999999H"))
}

/// Decodes a `grpc-message` value (percent-encoded UTF-8, as gRPC sends it).
pub fn percent_decode(value: &[u8]) -> String {
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while let Some(&b) = value.get(i) {
        let hex = |at: usize| value.get(at).and_then(|c| char::from(*c).to_digit(16));
        match (b, hex(i + 1), hex(i + 2)) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Encodes text for `grpc-message`: everything outside printable ASCII, and `%`, as `%XX`.
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_parse_and_format() {
        let parse = |s: &str| parse_timeout(&HeaderValue::from_str(s).unwrap());
        assert_eq!(parse("70S").unwrap(), Duration::from_secs(70));
        assert_eq!(parse("1500m").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse("2H").unwrap(), Duration::from_secs(7200));
        assert_eq!(
            parse("99999999n").unwrap(),
            Duration::from_nanos(99_999_999)
        );
        for bad in ["", "S", "10", "10x", "-1S", "123456789S", "1.5S"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        for d in [
            Duration::from_millis(3),
            Duration::from_secs(70),
            Duration::from_secs(10_000_000),
        ] {
            let back = parse_timeout(&format_timeout(d)).unwrap();
            assert!(
                back <= d && d - back < Duration::from_secs(1),
                "{d:?} -> {back:?}"
            );
        }
        for (d, text) in [
            (Duration::ZERO, "0n"),
            (Duration::from_nanos(99_999_999), "99999999n"),
            (Duration::from_millis(3), "3000000n"),
            (Duration::from_millis(100), "100000u"),
            (Duration::from_secs(70), "70000000u"),
            (Duration::from_secs(1000), "1000000m"),
            (Duration::from_secs(10_000_000), "10000000S"),
            (Duration::from_secs(100_000_000), "27777H"),
            (Duration::MAX, "99999999H"),
        ] {
            assert_eq!(format_timeout(d), text, "{d:?}");
        }
    }

    #[test]
    fn principal_and_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert("client-name", HeaderValue::from_static("temporal-python"));
        h.insert("temporal-principal-id", HeaderValue::from_static("admin"));
        h.insert("connection", HeaderValue::from_static("close"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("grpc-timeout", HeaderValue::from_static("1S"));
        h.insert("authorization", HeaderValue::from_static("Bearer x"));
        let out = request_headers_for_upstream(&h);
        assert!(out.contains_key("client-name"));
        assert!(out.contains_key("authorization"));
        assert!(!out.contains_key("temporal-principal-id"));
        assert!(!out.contains_key("connection"));
        assert!(!out.contains_key("grpc-timeout"));
    }

    #[test]
    fn gzip_acceptance() {
        let mut h = HeaderMap::new();
        h.insert(
            GRPC_ACCEPT_ENCODING,
            HeaderValue::from_static("identity, deflate,gzip"),
        );
        assert!(accepts_gzip(&h));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }
}
