// One fuzz input through request and response metadata: `grpc-timeout`, `grpc-encoding`,
// `grpc-message` percent-decoding, and `grpc-status-details-bin` (a google.rpc.Status from the
// upstream) through the payload walker and namespace translation, as the proxy handles an
// upstream's error. Shared (via `include!`) by the cargo-fuzz target
// `fuzz/fuzz_targets/metadata.rs` and the replay test `tests/fuzz_corpus.rs`. Nothing here
// may panic, whatever the bytes; refusals are fine.
//
// Input layout:
//   byte 0 (mod 4): 0 = the rest is a grpc-timeout header value; 1 = a grpc-encoding value;
//                   2 = a grpc-message value (percent-encoded); 3 = the base64 of a
//                   grpc-status-details-bin value
//
// Checks reported in the outcome: percent-decoding what percent-encoding made gives the text
// back; translating status details ns1 → ns1.a1b2c and back gives the original bytes.

use base64::Engine as _;
use portcullis::grpc::frame::Encoding;
use portcullis::grpc::headers::{parse_timeout, percent_decode, percent_encode};
use portcullis::payload::namespaces::{rewrite_namespaces, NamespaceFieldIndex};
use portcullis::payload::walker::{rewrite_status_details_with, FailureMode, PayloadIndex, WalkOptions};

#[derive(Debug, Default)]
pub struct MetadataOutcome {
    pub percent_round_trips: bool,
    pub translation_round_trips: bool,
}

pub fn one_metadata_input(data: &[u8]) -> Option<MetadataOutcome> {
    let (&selector, rest) = data.split_first()?;
    let mut outcome = MetadataOutcome {
        percent_round_trips: true,
        translation_round_trips: true,
    };
    match selector % 4 {
        0 => {
            if let Ok(value) = http::HeaderValue::from_bytes(rest) {
                let _ = parse_timeout(&value);
            }
        }
        1 => {
            if let Ok(value) = http::HeaderValue::from_bytes(rest) {
                let _ = Encoding::from_header(Some(&value));
            }
        }
        2 => {
            let decoded = percent_decode(rest);
            outcome.percent_round_trips =
                percent_decode(percent_encode(&decoded).as_bytes()) == decoded;
        }
        _ => {
            let lenient = base64::engine::general_purpose::GeneralPurpose::new(
                &base64::alphabet::STANDARD,
                base64::engine::general_purpose::GeneralPurposeConfig::new()
                    .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
            );
            let Ok(details) = lenient.decode(rest) else {
                return Some(outcome);
            };
            // Opening with a visitor that changes nothing, failure attributes decoded.
            let mut keep = |_: &portcullis::payload::walker::PayloadContext<'_>, _: &[u8]| Ok(None);
            let _ = rewrite_status_details_with(
                PayloadIndex::global(),
                &details,
                &mut keep,
                &WalkOptions::with_failures(FailureMode::Decode),
            );
            let index = NamespaceFieldIndex::global();
            const STATUS: &str = "google.rpc.Status";
            let there = rewrite_namespaces(index, STATUS, &details, &mut |name: &str| {
                Ok((name == "ns1").then(|| "ns1.a1b2c".to_string()))
            });
            if let Ok(Some(there)) = there {
                let back = rewrite_namespaces(index, STATUS, &there, &mut |name: &str| {
                    Ok((name == "ns1.a1b2c").then(|| "ns1".to_string()))
                });
                outcome.translation_round_trips = match back {
                    Ok(Some(back)) => back == details,
                    // Nothing to translate back means the forward pass met a name that was
                    // already "ns1.a1b2c" too: not a round trip to judge.
                    Ok(None) => true,
                    Err(_) => true,
                };
            }
        }
    }
    Some(outcome)
}
