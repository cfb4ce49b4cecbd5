//! Arbitrary bytes through the parser described in `fuzz/common/codec_input.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../common/codec_input.rs");

fuzz_target!(|data: &[u8]| {
    if let Some(outcome) = one_codec_input(data) {
        assert!(outcome.round_trips, "JSON does not round-trip: {outcome:?}");
    }
});
