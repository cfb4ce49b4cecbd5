//! Arbitrary bytes through the reader of the namespaces a request acts on (commands aimed at
//! another namespace, nested requests of ExecuteMultiOperation), checked against a typed
//! decode and against the namespaces the payload walker assigns payloads to.
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../common/command_targets_input.rs");

fuzz_target!(|data: &[u8]| {
    if let Some(outcome) = one_targets_input(data) {
        assert!(outcome.typed_agrees, "typed decode disagrees: {outcome:?}");
        assert!(
            outcome.scopes_covered,
            "walker scope not a target: {outcome:?}"
        );
    }
});
