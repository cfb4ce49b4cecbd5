//! Arbitrary bytes through the proxy's request input path: gRPC framing (identity/gzip),
//! namespace extraction, the payload walker in both failure modes, and status details.
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../common/grpc_walker_input.rs");

fuzz_target!(|data: &[u8]| {
    let _ = one_input(data);
});
