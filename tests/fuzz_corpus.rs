//! Replays the fuzz corpora (fuzz/corpus/TARGET) through the same code paths as the fuzz
//! targets, without the fuzzing toolchain: nothing may panic, and the seed requests must
//! rewrite (and round-trip). A crash input a campaign finds (fuzz/artifacts/TARGET, not kept in
//! git) is fixed and then copied into the corpus as `regression-*`, so it is replayed here.

// `one_input`, `sorted_methods`, `SUFFIX`: shared with fuzz/fuzz_targets/grpc_walker.rs.
include!("../fuzz/common/grpc_walker_input.rs");

use std::path::{Path, PathBuf};

fn files_in(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    files.sort();
    files
}

fn replay(files: &[PathBuf]) {
    for file in files {
        let data = std::fs::read(file).unwrap();
        let result = std::panic::catch_unwind(|| one_input(&data));
        assert!(result.is_ok(), "{} panicked", file.display());
        if let Ok(Some(outcome)) = result {
            assert!(
                outcome.deferred_agrees,
                "{}: deferred writes differ",
                file.display()
            );
            assert!(
                outcome.translation_round_trips,
                "{}: namespace translation does not round-trip",
                file.display()
            );
        }
    }
}

#[test]
fn corpus_replays_without_panic() {
    let files = files_in("fuzz/corpus/grpc_walker");
    assert!(
        files.len() >= 10,
        "seed corpus missing: {} files",
        files.len()
    );
    replay(&files);
}

/// `valid-<Method>-<encoding>` seeds are real requests: they select the method they are named
/// after, decode as one frame, carry namespace "ns1", rewrite without error, and the response
/// pass undoes the request pass byte for byte (Failure message/stack trace included).
#[test]
fn valid_seeds_rewrite_and_round_trip() {
    let methods = sorted_methods();
    let mut checked = 0;
    for file in files_in("fuzz/corpus/grpc_walker") {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("valid-") else {
            continue;
        };
        let (method, _encoding) = rest.rsplit_once('-').unwrap();
        let data = std::fs::read(&file).unwrap();
        let selected = methods[usize::from(data[1]) % methods.len()];
        assert_eq!(
            selected.name, method,
            "{name}: selector byte picks another method"
        );

        let out = one_input(&data).unwrap();
        assert!(out.framed, "{name}: not decoded as one gRPC frame");
        assert_eq!(out.namespace, Ok(Some("ns1".to_string())), "{name}");
        let encoded = out
            .encoded
            .unwrap_or_else(|e| panic!("{name}: encode pass: {e}"));
        let decoded = out
            .decoded
            .unwrap_or_else(|e| panic!("{name}: decode pass: {e}"));
        if method == "DescribeNamespace" {
            assert!(encoded.is_none() && out.payloads_seen == 0, "{name}");
        } else {
            let encoded = encoded.unwrap_or_else(|| panic!("{name}: no payload rewritten"));
            assert!(out.payloads_seen > 0, "{name}");
            assert_ne!(encoded, out.message, "{name}");
            if method == "RespondActivityTaskFailed" {
                assert_failures_encoded(&encoded);
            }
            if method == "RespondWorkflowTaskCompleted" || method == "StartNexusOperationExecution"
            {
                assert_system_envelope_walked_inside(method, &encoded);
            }
            let restored = decoded.unwrap_or_else(|| panic!("{name}: decode pass changed nothing"));
            assert_eq!(
                restored, out.message,
                "{name}: Encode then Decode did not round-trip"
            );
        }
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} valid seeds");
}

/// The seed holding a `google.rpc.Status` with a QueryFailedFailure detail rewrites its failure.
#[test]
fn status_details_seed_rewrites() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus/grpc_walker/status-QueryFailedFailure");
    let out = one_input(&std::fs::read(file).unwrap()).unwrap();
    let restored = out.status_details.expect("status details rewrite");
    assert_eq!(restored.as_deref(), Some(out.message.as_slice()));
}

/// FailureMode::Encode moved every message and stack trace of the Failure chain into
/// (visited) encoded_attributes.
fn assert_failures_encoded(encoded: &[u8]) {
    use portcullis::payload::walker::ENCODED_FAILURE_MESSAGE;
    use prost::Message as _;
    use temporalio_protos::protos::temporal::api::workflowservice::v1::RespondActivityTaskFailedRequest;
    let request = RespondActivityTaskFailedRequest::decode(encoded).unwrap();
    let mut failure = request.failure;
    let mut depth = 0;
    while let Some(f) = failure {
        assert_eq!(f.message, ENCODED_FAILURE_MESSAGE);
        assert!(f.stack_trace.is_empty());
        let attrs = f.encoded_attributes.expect("encoded_attributes");
        assert!(
            attrs.metadata.contains_key("fz"),
            "encoded attributes not visited"
        );
        failure = f.cause.map(|c| *c);
        depth += 1;
    }
    assert_eq!(depth, 3);
}

/// The system Nexus envelope of the seed stayed as it was (the server reads it), and the
/// payloads of the request inside it were visited.
fn assert_system_envelope_walked_inside(method: &str, encoded: &[u8]) {
    use prost::Message as _;
    use temporalio_protos::protos::temporal::api::command::v1::command::Attributes;
    use temporalio_protos::protos::temporal::api::workflowservice::v1::{
        RespondWorkflowTaskCompletedRequest, SignalWithStartWorkflowExecutionRequest,
        StartNexusOperationExecutionRequest,
    };
    let envelope = if method == "StartNexusOperationExecution" {
        StartNexusOperationExecutionRequest::decode(encoded)
            .unwrap()
            .input
            .unwrap()
    } else {
        RespondWorkflowTaskCompletedRequest::decode(encoded)
            .unwrap()
            .commands
            .into_iter()
            .find_map(|c| match c.attributes {
                Some(Attributes::ScheduleNexusOperationCommandAttributes(a)) => a.input,
                _ => None,
            })
            .expect("the seed schedules a system Nexus operation")
    };
    assert!(
        !envelope.metadata.contains_key("fz"),
        "the envelope was rewritten"
    );
    assert_eq!(envelope.metadata["__temporal_system_payload"], b"true");
    let inner = SignalWithStartWorkflowExecutionRequest::decode(envelope.data.as_slice()).unwrap();
    let input = &inner.input.unwrap().payloads[0];
    assert!(
        input.metadata.contains_key("fz"),
        "the inner input was not visited"
    );
}

/// The `command_targets` target's input path (`fuzz/common/command_targets_input.rs`), in a
/// module of its own: its imports overlap the grpc_walker's.
mod targets {
    include!("../fuzz/common/command_targets_input.rs");
}

fn replay_targets(files: &[PathBuf]) {
    for file in files {
        let data = std::fs::read(file).unwrap();
        let result = std::panic::catch_unwind(|| targets::one_targets_input(&data));
        assert!(result.is_ok(), "{} panicked", file.display());
        if let Ok(Some(outcome)) = result {
            assert!(
                outcome.typed_agrees,
                "{}: the reader misses what a typed decode sees: {outcome:?}",
                file.display()
            );
            assert!(
                outcome.scopes_covered,
                "{}: the walker seals for a namespace that is no target: {outcome:?}",
                file.display()
            );
        }
    }
}

#[test]
fn command_targets_corpus_replays_without_panic() {
    let files = files_in("fuzz/corpus/command_targets");
    assert!(
        files.len() >= 10,
        "seed corpus missing: {} files",
        files.len()
    );
    replay_targets(&files);
}

/// The seeds read as they were written: captured SDK traffic decodes and names no other
/// namespace (an SDK leaves a command's namespace empty or its own); the constructed ones
/// yield their targets, and a nested request for another namespace, or none, is refused.
#[test]
fn command_targets_seeds_read_as_named() {
    let mut real = 0;
    for file in files_in("fuzz/corpus/command_targets") {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let out = targets::one_targets_input(&std::fs::read(&file).unwrap()).unwrap();
        let targets = |out: &targets::TargetsOutcome| -> Vec<(String, String)> {
            out.targets
                .as_ref()
                .unwrap_or_else(|e| panic!("{name}: {e}"))
                .iter()
                .map(|(c, n, _)| (c.to_string(), n.clone()))
                .collect()
        };
        let pair = |c: &str, n: &str| (c.to_string(), n.to_string());
        if name.starts_with("real-") {
            assert!(out.typed.is_some(), "{name}: not a valid request");
            assert!(targets(&out).is_empty(), "{name}: {out:?}");
            real += 1;
        }
        match name.as_str() {
            "cross-child-beta" => {
                assert_eq!(targets(&out), [pair("StartChildWorkflowExecution", "beta")])
            }
            "cross-signal-beta" => assert_eq!(
                targets(&out),
                [pair("SignalExternalWorkflowExecution", "beta")]
            ),
            "cross-cancel-beta" => assert_eq!(
                targets(&out),
                [pair("RequestCancelExternalWorkflowExecution", "beta")]
            ),
            "cross-all-mixed" => assert_eq!(
                targets(&out),
                [
                    pair("StartChildWorkflowExecution", "beta"),
                    pair("RequestCancelExternalWorkflowExecution", "gamma"),
                    pair("StartChildWorkflowExecution", "delta"),
                ]
            ),
            "cross-system-nexus-beta" => assert_eq!(
                targets(&out),
                [pair("SignalWithStartWorkflowExecution", "beta")]
            ),
            // Not an envelope: refused, as the server could read it but the proxy cannot vouch.
            "edge-system-nexus-unmarked" => {
                assert!(out.targets.is_err(), "{name}: {out:?}");
                assert!(out.typed_agrees, "{name}");
            }
            "multi-same" => assert!(targets(&out).is_empty(), "{name}"),
            // The server refuses a nested request without a namespace too.
            "multi-other" | "multi-empty" => assert!(out.targets.is_err(), "{name}: {out:?}"),
            "edge-two-attributes" => assert_eq!(
                targets(&out),
                [
                    pair("StartChildWorkflowExecution", "beta"),
                    pair("SignalExternalWorkflowExecution", "gamma"),
                ]
            ),
            _ => {}
        }
        if name.starts_with("cross-") || name.starts_with("multi-") {
            assert_eq!(out.own, "alpha", "{name}");
            let expected = if name.starts_with("multi-") {
                targets::MULTI
            } else {
                targets::COMPLETED
            };
            assert_eq!(out.message_type, expected, "{name}");
            assert!(out.actions.as_ref().is_ok_and(|a| !a.is_empty()), "{name}");
        }
        if name.starts_with("cross-") && name != "cross-cancel-beta" {
            // A cancel carries no payload; the others are sealed for their target.
            let scopes = out.scopes.as_ref().expect("walked");
            assert!(
                scopes.iter().any(|s| s != "alpha" && !s.is_empty()),
                "{name}: no payload scoped"
            );
        }
    }
    assert!(real >= 3, "only {real} captured seeds");
}
