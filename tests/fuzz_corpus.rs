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
        // Built from the API's own types: the unknown-field check knows every field.
        assert_eq!(out.known, Ok(()), "{name}");
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

// ---------------------------------------------------------------------------------------------
// Hostile input beyond the request path: bearer tokens and JWKS, the codec server's requests,
// what an upstream sends back (envelopes, sealed texts, error metadata), config and policy
// files. Each corpus replays without a panic and with the target's own checks; the seeds made
// from real material (`valid-*`) are regenerated with PORTCULLIS_WRITE_FUZZ_SEEDS=1.

#[allow(dead_code)]
mod bearer {
    include!("../fuzz/common/bearer_input.rs");
}
#[allow(dead_code)]
mod codec {
    include!("../fuzz/common/codec_input.rs");
}
#[allow(dead_code)]
mod envelope {
    include!("../fuzz/common/envelope_input.rs");
}
#[allow(dead_code)]
mod metadata {
    include!("../fuzz/common/metadata_input.rs");
}
#[allow(dead_code)]
mod config {
    include!("../fuzz/common/config_input.rs");
}

fn corpus(target: &str, min: usize) -> Vec<PathBuf> {
    let files = files_in(&format!("fuzz/corpus/{target}"));
    assert!(
        files.len() >= min,
        "{target}: seed corpus missing ({} files)",
        files.len()
    );
    files
}

fn name_of(file: &Path) -> String {
    file.file_name().unwrap().to_string_lossy().into_owned()
}

/// Writes `seeds` into the corpus of `target` when asked to (PORTCULLIS_WRITE_FUZZ_SEEDS=1).
fn maybe_write_seeds(target: &str, seeds: &[(String, Vec<u8>)]) {
    if std::env::var_os("PORTCULLIS_WRITE_FUZZ_SEEDS").is_none() {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("fuzz/corpus/{target}"));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, data) in seeds {
        std::fs::write(dir.join(name), data).unwrap();
    }
}

#[test]
fn bearer_corpus_replays_and_only_real_tokens_verify() {
    // Real material: tokens signed by the fixture key (valid, expired, wrong audience), its JWKS.
    let fixture = bearer::bearer_fixture();
    let now = portcullis::authz::bearer::now_seconds() as i64;
    let claims = |sub: &str, aud: &str, exp: i64| {
        serde_json::json!({
            "iss": bearer::ISSUER, "aud": aud, "sub": sub, "exp": exp, "iat": now,
            "permissions": ["ns1:read", "temporal-system:admin", "weird"],
        })
    };
    // Valid for a century: a replay long after today still verifies.
    let valid = fixture
        .key
        .sign(&claims("alice", bearer::AUDIENCE, now + 100 * 365 * 86400))
        .unwrap();
    let expired = fixture
        .key
        .sign(&claims("alice", bearer::AUDIENCE, now - 3600))
        .unwrap();
    let other_audience = fixture
        .key
        .sign(&claims("alice", "someone-else", now + 3600))
        .unwrap();
    let seed = |mode: u8, bytes: &[u8]| [&[mode][..], bytes].concat();
    let generated = vec![
        ("valid-token".to_string(), seed(0, valid.as_bytes())),
        ("token-expired".into(), seed(0, expired.as_bytes())),
        ("token-audience".into(), seed(0, other_audience.as_bytes())),
        (
            "valid-jwks".into(),
            seed(1, fixture.key.jwks().to_string().as_bytes()),
        ),
        (
            "permissions".into(),
            seed(
                2,
                br#"["ns1:read","ns2:WRITE","temporal-system:admin","a:b:c",7,null]"#,
            ),
        ),
    ];
    maybe_write_seeds("bearer", &generated);
    let out = bearer::one_bearer_input(&generated[0].1).unwrap();
    assert_eq!(out.verified, Some(Ok("jwt:alice".to_string())));
    for (name, data) in &generated[1..3] {
        let out = bearer::one_bearer_input(data).unwrap();
        assert!(matches!(out.verified, Some(Err(_))), "{name}: {out:?}");
    }

    for file in corpus("bearer", 5) {
        let name = name_of(&file);
        let data = std::fs::read(&file).unwrap();
        let out = std::panic::catch_unwind(|| bearer::one_bearer_input(&data))
            .unwrap_or_else(|_| panic!("{name} panicked"));
        let Some(out) = out else { continue };
        match (&out.verified, name.as_str()) {
            (Some(Ok(identity)), "valid-token") => assert_eq!(identity, "jwt:alice"),
            // Nothing else verifies: the fuzzer cannot forge the fixture key's signature.
            (Some(Ok(identity)), _) => panic!("{name} verified as {identity}"),
            (_, "valid-token") => panic!("the valid token did not verify: {out:?}"),
            _ => {}
        }
        if name == "valid-jwks" {
            assert_eq!(out.jwks_keys, Some(Ok(1)), "{name}");
        }
    }
}

#[test]
fn codec_corpus_replays_and_json_round_trips() {
    let generated = vec![
        (
            "valid-payloads".to_string(),
            [&[0u8][..], br#"{"payloads":[{"metadata":{"encoding":"anNvbi9wbGFpbg=="},"data":"IkhlbGxvIg=="},{"metadata":{"encoding":"YmluYXJ5L251bGw="}}]}"#].concat(),
        ),
        (
            "valid-namespace".into(),
            [&[1u8][..], b"payments\0payments"].concat(),
        ),
        ("namespace-disagrees".into(), [&[1u8][..], b"a\0b"].concat()),
        ("namespace-cluster".into(), [&[1u8][..], b"\0undefined"].concat()),
    ];
    maybe_write_seeds("codec", &generated);
    for file in corpus("codec", 4) {
        let name = name_of(&file);
        let data = std::fs::read(&file).unwrap();
        let out = std::panic::catch_unwind(|| codec::one_codec_input(&data))
            .unwrap_or_else(|_| panic!("{name} panicked"));
        let Some(out) = out else { continue };
        assert!(out.round_trips, "{name}: {out:?}");
        match name.as_str() {
            "valid-payloads" => assert_eq!(out.parsed, Some(Ok(2))),
            "valid-namespace" => assert_eq!(out.namespace, Some(Ok(Some("payments".into())))),
            "namespace-disagrees" => assert!(matches!(out.namespace, Some(Err(_)))),
            _ => {}
        }
    }
}

#[test]
fn envelope_corpus_replays_and_real_envelopes_open() {
    use prost::Message as _;
    use temporalio_protos::protos::temporal::api::common::v1::{Payload, Payloads};
    let fixture = envelope::envelope_fixture();
    let key = fixture
        .runtime
        .block_on(fixture.manager.sealing_key(envelope::NAMESPACE))
        .unwrap();
    let payload = |data: &str| Payload {
        metadata: [("encoding".to_string(), b"json/plain".to_vec())].into(),
        data: data.as_bytes().to_vec(),
        ..Default::default()
    };
    let sealed = |data: &str| {
        Payload::decode(key.seal(&payload(data).encode_to_vec()).unwrap().as_slice()).unwrap()
    };
    let message = Payloads {
        payloads: vec![sealed("seed-one"), payload("plain"), sealed("seed-two")],
    }
    .encode_to_vec();
    let text = format!(
        "query failed: {}",
        portcullis::crypto::message::seal_text(&key, "seed-text").unwrap()
    );
    // The same, with the sealed payloads as sealing wrote them (prost above re-encodes their
    // metadata maps in any order): the second envelope is read by the first one's shape.
    let mut shaped = vec![0u8];
    for bytes in [
        key.seal(&payload("seed-one").encode_to_vec()).unwrap(),
        payload("plain").encode_to_vec(),
        key.seal(&payload("seed-two").encode_to_vec()).unwrap(),
    ] {
        shaped.push(0x0a); // Payloads.payloads (1), length-delimited
        prost::encoding::encode_varint(bytes.len() as u64, &mut shaped);
        shaped.extend_from_slice(&bytes);
    }
    let generated = vec![
        (
            "valid-payloads".to_string(),
            [&[0u8][..], &message].concat(),
        ),
        ("valid-shaped".into(), shaped),
        ("valid-text".into(), [&[1u8][..], text.as_bytes()].concat()),
        (
            "valid-reference".into(),
            [&[2u8][..], &reference_message(&key)].concat(),
        ),
    ];
    maybe_write_seeds("envelope", &generated);
    for (_, data) in &generated {
        let out = envelope::one_envelope_input(data).unwrap();
        assert!(opens_to_seeds(&out), "{out:?}");
    }
    for file in corpus("envelope", 4) {
        let name = name_of(&file);
        let data = std::fs::read(&file).unwrap();
        let out = std::panic::catch_unwind(|| envelope::one_envelope_input(&data))
            .unwrap_or_else(|_| panic!("{name} panicked"));
        let Some(out) = out else { continue };
        if let (Some(Ok(strict)), Some(lenient)) = (&out.strict, &out.lenient) {
            assert_eq!(Some(strict), lenient.as_ref().ok(), "{name}");
        }
        if name.starts_with("valid-") {
            assert!(opens_to_seeds(&out), "{name}: {out:?}");
        }
        if name == "valid-shaped" {
            // The first envelope and the plain payload; not the second envelope.
            assert_eq!(out.strict_parsed, Some(2), "{name}");
        }
    }
}

/// A Payloads message holding a sealed offload reference (to the fixture's fixed object) next
/// to a plain payload, as an upstream sends an offloaded payload back.
fn reference_message(key: &portcullis::crypto::SealingKey) -> Vec<u8> {
    use prost::Message as _;
    use temporalio_protos::protos::temporal::api::common::v1::{Payload, Payloads};
    let object = envelope::fixed_object();
    let reference = portcullis::offload::Reference {
        bucket: "bucket".into(),
        key: "portcullis/ns1/seed".into(),
        size: object.len() as u64,
        sha256: portcullis::offload::reference::sha256(object),
        payload_size: envelope::fixed_payload().len() as u64,
    };
    let sealed = key.seal(&reference.to_payload()).unwrap();
    Payloads {
        payloads: vec![
            Payload::decode(sealed.as_slice()).unwrap(),
            Payload {
                data: b"plain".to_vec(),
                ..Default::default()
            },
        ],
    }
    .encode_to_vec()
}

fn opens_to_seeds(out: &envelope::EnvelopeOutcome) -> bool {
    let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    if let Some(resolved) = &out.resolved {
        return matches!(resolved, Ok((1, message)) if contains(message, b"seed-offloaded"));
    }
    match (&out.strict, &out.text) {
        (Some(Ok(Some(opened))), _) => {
            contains(opened, b"seed-one") && contains(opened, b"seed-two")
        }
        (_, Some(Ok(text))) => text.contains("seed-text"),
        _ => false,
    }
}

#[test]
fn metadata_corpus_replays() {
    use base64::Engine as _;
    let status = {
        use prost::Message as _;
        let failure =
            temporalio_protos::protos::temporal::api::errordetails::v1::NamespaceNotFoundFailure {
                namespace: "ns1".into(),
            };
        let any = prost_wkt_types::Any {
            type_url: "type.googleapis.com/temporal.api.errordetails.v1.NamespaceNotFoundFailure"
                .into(),
            value: failure.encode_to_vec(),
        };
        let mut status = Vec::new();
        portcullis::payload::wire::put_len_field(&mut status, 2, b"Namespace ns1 is not found.");
        portcullis::payload::wire::put_len_field(&mut status, 3, &any.encode_to_vec());
        status
    };
    let generated = vec![
        ("timeout".to_string(), [&[0u8][..], b"1500m"].concat()),
        ("encoding".into(), [&[1u8][..], b"gzip"].concat()),
        (
            "message".into(),
            [&[2u8][..], b"Namespace%20ns1%20%E2%9C%93 is not found."].concat(),
        ),
        (
            "valid-status".into(),
            [
                &[3u8][..],
                base64::engine::general_purpose::STANDARD_NO_PAD
                    .encode(&status)
                    .as_bytes(),
            ]
            .concat(),
        ),
    ];
    maybe_write_seeds("metadata", &generated);
    for file in corpus("metadata", 4) {
        let name = name_of(&file);
        let data = std::fs::read(&file).unwrap();
        let out = std::panic::catch_unwind(|| metadata::one_metadata_input(&data))
            .unwrap_or_else(|_| panic!("{name} panicked"));
        let Some(out) = out else { continue };
        assert!(out.percent_round_trips, "{name}");
        assert!(out.translation_round_trips, "{name}");
    }
}

#[test]
fn config_corpus_replays_and_the_examples_load() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut generated = Vec::new();
    for example in [
        "service.toml",
        "cloud.toml",
        "sidecar.toml",
        "sidecar-unix.toml",
    ] {
        let text = std::fs::read(root.join("config").join(example)).unwrap();
        generated.push((format!("valid-{example}"), [&[0u8][..], &text].concat()));
    }
    generated.push((
        "valid-policy".to_string(),
        [
            &[1u8][..],
            &b"deny = [\"jwt:mallory\"]\n[groups]\nops = [\"spiffe://corp/ops/*\"]\n[system]\nadmins = [\"group:ops\"]\n[[namespaces]]\nname = \"a\"\nreaders = [\"email:x@corp\"]\n"[..],
        ]
        .concat(),
    ));
    maybe_write_seeds("config", &generated);
    for file in corpus("config", 5) {
        let name = name_of(&file);
        let data = std::fs::read(&file).unwrap();
        let out = std::panic::catch_unwind(|| config::one_config_input(&data))
            .unwrap_or_else(|_| panic!("{name} panicked"));
        let Some(out) = out else { continue };
        if name.starts_with("valid-") {
            assert!(out.loaded.is_ok(), "{name}: {:?}", out.loaded);
        }
    }
}
