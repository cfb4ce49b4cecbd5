//! Arbitrary bytes through the parser described in `fuzz/common/metadata_input.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../common/metadata_input.rs");

fuzz_target!(|data: &[u8]| {
    if let Some(outcome) = one_metadata_input(data) {
        assert!(outcome.percent_round_trips, "percent-encoding: {outcome:?}");
        assert!(outcome.translation_round_trips, "status details translation: {outcome:?}");
    }
});
