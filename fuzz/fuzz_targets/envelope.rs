//! Arbitrary bytes through the parser described in `fuzz/common/envelope_input.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../common/envelope_input.rs");

fuzz_target!(|data: &[u8]| {
    if let Some(outcome) = one_envelope_input(data) {
        if let (Some(Ok(strict)), Some(lenient)) = (&outcome.strict, &outcome.lenient) {
            assert_eq!(Some(strict), lenient.as_ref().ok(), "lenient opening differs");
        }
    }
});
