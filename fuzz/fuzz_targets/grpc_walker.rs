//! Arbitrary bytes through the proxy's request input path: gRPC framing (identity/gzip),
//! namespace extraction, the payload walker in both failure modes (eager and deferred writes),
//! status details, and namespace translation both ways.
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../common/grpc_walker_input.rs");

fuzz_target!(|data: &[u8]| {
    if let Some(outcome) = one_input(data) {
        assert!(outcome.deferred_agrees, "deferred writes differ: {outcome:?}");
        assert!(outcome.translation_round_trips, "translation: {outcome:?}");
    }
});
