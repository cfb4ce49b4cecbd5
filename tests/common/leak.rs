//! One leak detector for every absence check (logs, the upstream tap, the database, the audit
//! log, metrics): it looks for a secret in every form it could take in text or on the wire,
//! not only as itself. Each use is paired with a deliberate leak it must catch.

use base64::Engine as _;

/// The forms a secret is searched in, and what each is called in a failure message.
pub fn encodings(secret: &[u8]) -> Vec<(String, Vec<u8>)> {
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    let mut forms = vec![("raw".to_string(), secret.to_vec())];
    // Base64 of a longer text holds the secret at one of three alignments. Only the characters
    // that depend on the secret's bits alone are searched for.
    for (name, engine) in [("base64", STANDARD_NO_PAD), ("base64url", URL_SAFE_NO_PAD)] {
        for offset in 0..3usize {
            let mut shifted = vec![0u8; offset];
            shifted.extend_from_slice(secret);
            let encoded = engine.encode(&shifted);
            let start = (offset * 8).div_ceil(6);
            let end = (shifted.len() * 8) / 6;
            if end > start {
                forms.push((
                    format!("{name} (offset {offset})"),
                    encoded.as_bytes()[start..end].to_vec(),
                ));
            }
        }
    }
    let hex_lower: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    forms.push(("hex".into(), hex_lower.clone().into_bytes()));
    forms.push(("HEX".into(), hex_lower.to_uppercase().into_bytes()));
    // Percent-encoding of every byte (grpc-message encodes what is not printable ASCII; a
    // strict encoder encodes everything).
    let percent: String = secret.iter().map(|b| format!("%{b:02X}")).collect();
    forms.push(("percent-encoded".into(), percent.into_bytes()));
    // Rust's Debug of a byte slice or Vec<u8>: `[115, 101, 97]`, also pretty-printed.
    let list = secret
        .iter()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    forms.push(("debug byte list".into(), list.into_bytes()));
    let pretty = secret
        .iter()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(",\n    ");
    forms.push(("pretty debug byte list".into(), pretty.into_bytes()));
    forms
}

/// The first form of `secret` found in `haystack`, by name.
pub fn find(haystack: &[u8], secret: &[u8]) -> Option<String> {
    encodings(secret)
        .into_iter()
        .find(|(_, form)| contains(haystack, form))
        .map(|(name, _)| name)
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty()
        && haystack.len() >= needle.len()
        && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Panics unless the detector finds `secret` planted in each of its encodings inside other
/// text: the check that a later "not found" means something.
pub fn assert_detects(secret: &[u8]) {
    for (name, form) in encodings(secret) {
        for prefix in [&b""[..], b"x", b"xy", b"{\"data\":\""] {
            let mut planted = prefix.to_vec();
            planted.extend_from_slice(&form);
            planted.extend_from_slice(b"\"} and more");
            assert!(
                find(&planted, secret).is_some(),
                "the detector misses a secret in {name} after {prefix:?}"
            );
        }
    }
    // And in real encodings of a longer text it sits inside, at every alignment.
    use base64::engine::general_purpose::{STANDARD, URL_SAFE};
    for offset in 0..3 {
        let mut text = vec![b'a'; offset + 7];
        text.extend_from_slice(secret);
        text.extend_from_slice(b" trailing");
        for engine in [STANDARD, URL_SAFE] {
            let encoded = engine.encode(&text);
            assert!(
                find(encoded.as_bytes(), secret).is_some(),
                "the detector misses a secret in base64 at offset {offset}"
            );
        }
        let hex: String = text.iter().map(|b| format!("{b:02x}")).collect();
        assert!(find(hex.as_bytes(), secret).is_some());
        assert!(find(format!("{text:?}").as_bytes(), secret).is_some());
        assert!(find(format!("{text:#?}").as_bytes(), secret).is_some());
    }
}
