//! Entry points for the fuzz targets in `fuzz/` and their corpus replays in
//! `tests/fuzz_corpus.rs`: thin wrappers around parsers that are otherwise private. Not an API.

use http::{HeaderMap, HeaderValue};

/// Parses a JWKS document as the bearer-token verifier does; how many keys it would use.
pub fn jwks_keys(text: &[u8]) -> Result<usize, String> {
    crate::authz::bearer::parse_jwks(text).map(|keys| keys.len())
}

/// The codec server's namespace for a request: from its path and its `X-Namespace` header
/// (raw bytes, as a client may send anything). `Ok(None)`: the request names none on purpose.
pub fn codec_namespace(
    from_path: Option<&str>,
    x_namespace: Option<&[u8]>,
) -> Result<Option<String>, String> {
    let mut headers = HeaderMap::new();
    if let Some(value) = x_namespace {
        let value = HeaderValue::from_bytes(value).map_err(|e| e.to_string())?;
        headers.insert("x-namespace", value);
    }
    match crate::codec::handler::namespace_of(from_path, &headers)? {
        crate::codec::handler::Named::Namespace(name) => Ok(Some(name)),
        crate::codec::handler::Named::Empty => Ok(None),
    }
}
