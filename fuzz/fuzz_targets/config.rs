//! Arbitrary bytes through the parser described in `fuzz/common/config_input.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../common/config_input.rs");

fuzz_target!(|data: &[u8]| {
    let _ = one_config_input(data);
});
