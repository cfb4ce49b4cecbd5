// One fuzz input through the codec server's request parsing: proto3-JSON Payloads bodies and
// the namespace a request names (path and X-Namespace). Shared (via `include!`) by the
// cargo-fuzz target `fuzz/fuzz_targets/codec.rs` and the replay test `tests/fuzz_corpus.rs`.
// Nothing here may panic, whatever the bytes; refusals are fine.
//
// Input layout:
//   byte 0 (mod 2): 0 = the rest is a request body; 1 = the rest is `PATH\0X-NAMESPACE` (either
//                   part may be missing: no NUL means no header)
//
// Check reported in the outcome: a body that parses renders back to JSON that parses to the
// same Payloads (the JSON the Web UI gets is what it sent, in canonical form).

#[derive(Debug)]
pub struct CodecOutcome {
    pub parsed: Option<Result<usize, String>>,
    pub round_trips: bool,
    pub namespace: Option<Result<Option<String>, String>>,
}

pub fn one_codec_input(data: &[u8]) -> Option<CodecOutcome> {
    let (&selector, rest) = data.split_first()?;
    let mut outcome = CodecOutcome {
        parsed: None,
        round_trips: true,
        namespace: None,
    };
    if selector % 2 == 0 {
        use portcullis::codec::json;
        match json::parse(rest, 1000) {
            Ok((encoded, count)) => {
                outcome.parsed = Some(Ok(count));
                // Compared decoded: map entries may encode in any order.
                use prost::Message as _;
                use temporalio_protos::temporal::api::common::v1::Payloads;
                let decode = |bytes: &[u8]| Payloads::decode(bytes).ok();
                outcome.round_trips = match json::render(&encoded) {
                    Ok(rendered) => json::parse(&rendered, 1000)
                        .map(|(again, _)| decode(&again) == decode(&encoded))
                        .unwrap_or(false),
                    Err(_) => false,
                };
            }
            Err(e) => outcome.parsed = Some(Err(e.to_string())),
        }
    } else {
        let (path, header) = match rest.iter().position(|b| *b == 0) {
            Some(at) => (&rest[..at], Some(&rest[at + 1..])),
            None => (rest, None),
        };
        let path = String::from_utf8_lossy(path);
        let path = (!path.is_empty()).then_some(path.as_ref());
        outcome.namespace = Some(portcullis::fuzzing::codec_namespace(path, header));
    }
    Some(outcome)
}
