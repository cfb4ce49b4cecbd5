//! Arbitrary bytes through the parser described in `fuzz/common/bearer_input.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../common/bearer_input.rs");

fuzz_target!(|data: &[u8]| {
    if let Some(outcome) = one_bearer_input(data) {
        if let Some(Ok(identity)) = &outcome.verified {
            assert!(identity.starts_with("jwt:"), "{identity}");
        }
    }
});
