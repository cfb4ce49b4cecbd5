//! Nothing readable reaches the upstream: every kind of payload is sealed on the way in and opened
//! on the way out, proven against the Temporal server's own database.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::*;

fn kinds(result: &serde_json::Value, key: &str) -> Vec<String> {
    result[key]
        .as_array()
        .unwrap_or_else(|| panic!("markers.py output lacks {key}: {result}"))
        .iter()
        .map(|k| k.as_str().expect("kind").to_string())
        .collect()
}

/// Nothing readable goes upstream on the wire either, including what the server never stores
/// (query arguments, results and failure texts, update arguments): every request the proxy sends
/// is recorded by a tap in front of the real server and searched in every encoding. The same
/// scenarios with encryption off, through the same tap, are caught by the same detector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_readable_goes_upstream_on_the_wire() {
    leak::assert_detects(b"wire-probe-7f3a");
    let server = DevServer::start(&[]).await;
    let pki = Pki::new();
    let target = server.address().parse().expect("server address");
    for encrypted in [true, false] {
        let tap = tap::UpstreamTap::start(target).await;
        let mut config = proxy_config(&pki, &tap.address.to_string(), &["default"]);
        config.encryption.disabled = !encrypted;
        let proxy = start_proxy(config).await;
        let address = proxy.local_addr().expect("tcp");
        let marker = format!(
            "wire{}{}",
            if encrypted { "s" } else { "p" },
            std::process::id()
        );
        let mut args = client_args(address, &pki, &pki.client);
        args.extend(["--marker".into(), marker.clone()]);
        let markers = run_python("markers.py", &args).await;
        let mut failing_query = client_args(address, &pki, &pki.client);
        failing_query.extend([
            "--direct".into(),
            server.address(),
            "--marker".into(),
            format!("{marker}-query-failure"),
        ]);
        let query_failure = run_python("query_failure.py", &failing_query).await;
        assert_eq!(query_failure["ok"], true, "{query_failure}");
        proxy.shutdown().await;

        let wire = tap.wire();
        assert!(
            tap.count() > 20,
            "the tap saw only {} requests",
            tap.count()
        );
        let plaintext = kinds(&markers, "plaintext_kinds");
        let mut secret_kinds: Vec<String> = kinds(&markers, "kinds")
            .into_iter()
            .filter(|k| !plaintext.contains(k))
            .collect();
        secret_kinds.push("query-failure".into());
        assert!(secret_kinds.len() >= 20, "{secret_kinds:?}");
        let mut seen = Vec::new();
        for kind in &secret_kinds {
            let needle = format!("{marker}-{kind}");
            if let Some(form) = leak::find(&wire, needle.as_bytes()) {
                seen.push(format!("{kind} ({form})"));
            }
        }
        if encrypted {
            assert!(seen.is_empty(), "readable upstream on the wire: {seen:?}");
        } else {
            // The control: without encryption the detector sees every kind on the wire.
            assert_eq!(
                seen.len(),
                secret_kinds.len(),
                "the detector missed plaintext kinds: saw {seen:?} of {secret_kinds:?}"
            );
        }
        // Search attributes stay readable by design, through the proxy too.
        for kind in &plaintext {
            assert!(leak::find(&wire, format!("{marker}-{kind}").as_bytes()).is_some());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_payload_reaches_the_server_in_plaintext() {
    let server = DevServer::start(&[]).await;
    let db = server.dir.path().join("temporal.db");
    let pki = Pki::new();
    let proxy = start_proxy(proxy_config(&pki, &server.address(), &["default"])).await;
    let address = proxy.local_addr().expect("tcp");

    // Through the proxy: every value round-trips, and no marker is stored.
    let sealed_marker = format!("sealed{}", std::process::id());
    let mut args = client_args(address, &pki, &pki.client);
    args.extend(["--marker".into(), sealed_marker.clone()]);
    let through = run_python("markers.py", &args).await;
    let stored = kinds(&through, "stored_kinds");
    assert!(
        stored.len() >= 15,
        "too few payload kinds exercised: {stored:?}"
    );
    for kind in &stored {
        let needle = format!("{sealed_marker}-{kind}");
        assert_eq!(
            occurrences(&db, &needle),
            0,
            "{kind} reached the server in plaintext"
        );
    }
    // The whole marker must not appear anywhere except in search attributes, which the server
    // must be able to index.
    for kind in kinds(&through, "plaintext_kinds") {
        assert!(
            occurrences(&db, &format!("{sealed_marker}-{kind}")) > 0,
            "{kind} should stay plaintext (the server indexes it)"
        );
    }

    // Directly against the server, the same scenario stores every kind in plaintext: the check
    // above can fail.
    let plain_marker = format!("plain{}", std::process::id());
    let direct = run_python(
        "markers.py",
        &[
            "--address".into(),
            server.address(),
            "--marker".into(),
            plain_marker.clone(),
        ],
    )
    .await;
    for kind in kinds(&direct, "stored_kinds") {
        assert!(
            occurrences(&db, &format!("{plain_marker}-{kind}")) > 0,
            "direct run did not store {kind}: the check cannot prove anything for it"
        );
    }

    // Search attributes set through the proxy stay queryable through it.
    let query = format!("CustomKeywordField = \"{sealed_marker}-search-attr\"");
    let (ok, out, err) = temporal_cli(
        address,
        &pki,
        &pki.client,
        &["workflow", "list", "--query", &query, "-o", "json"],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("workflowId") || out.contains("execution"),
        "search attribute query found nothing: {out}"
    );

    // The CLI through the proxy sees plaintext; directly, the server holds binary/encrypted.
    let workflow_id = through["workflow_ids"][0]
        .as_str()
        .expect("workflow id")
        .to_string();
    let (ok, shown, err) = temporal_cli(
        address,
        &pki,
        &pki.client,
        &[
            "workflow",
            "show",
            "--workflow-id",
            &workflow_id,
            "-o",
            "json",
        ],
    );
    assert!(ok, "{err}");
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    assert!(
        !shown.contains(&b64("binary/encrypted")),
        "the proxy handed back sealed payloads: {shown}"
    );
    let output = std::process::Command::new(temporal_binary())
        .args([
            "workflow",
            "show",
            "--workflow-id",
            &workflow_id,
            "-o",
            "json",
            "--address",
            &server.address(),
        ])
        .output()
        .expect("temporal");
    let direct_show = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    assert!(
        direct_show.contains(&b64("binary/encrypted")),
        "the server does not hold binary/encrypted payloads"
    );
    assert!(
        !direct_show.contains(&sealed_marker),
        "plaintext visible directly"
    );
    proxy.shutdown().await;
}

/// The (kek id, data key id) of every sealed payload in a workflow's history, read directly
/// from the server (so, as stored).
async fn stored_keys(server: &DevServer, workflow_id: &str) -> Vec<(String, String)> {
    use portcullis::payload::walker::{self, PayloadIndex, WalkOptions};
    use prost::Message;
    let mut client = server.direct_client().await;
    let history = client
        .get_workflow_execution_history(wf::GetWorkflowExecutionHistoryRequest {
            namespace: "default".into(),
            execution: Some(
                temporalio_protos::protos::temporal::api::common::v1::WorkflowExecution {
                    workflow_id: workflow_id.into(),
                    run_id: String::new(),
                },
            ),
            ..Default::default()
        })
        .await
        .expect("history")
        .into_inner()
        .encode_to_vec();
    let mut keys = Vec::new();
    let mut collect = |_: &walker::PayloadContext<'_>, payload: &[u8]| {
        let reference = portcullis::crypto::envelope_info(payload);
        assert!(reference.is_some(), "a stored payload is not sealed");
        if let Some(r) = reference {
            keys.push((r.kek_id, r.data_key_id));
        }
        Ok(None)
    };
    walker::rewrite_named(
        PayloadIndex::global(),
        "temporal.api.workflowservice.v1.GetWorkflowExecutionHistoryResponse",
        &history,
        &mut collect,
        &WalkOptions::default(),
    )
    .expect("walk history");
    assert!(!keys.is_empty(), "no payloads in {workflow_id}");
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_while_workflows_run_and_old_payloads_still_open() {
    let server = DevServer::start(&[]).await;
    let pki = Pki::new();
    let mut config = proxy_config(&pki, &server.address(), &["default"]);
    // Data keys rotate by use: a handful of seals each.
    config.encryption.data_key_max_seals = 3;
    let keyring = pki.dir.path().join("keyring.toml");
    let first_kek = portcullis::crypto::Keyring::load(&keyring)
        .expect("keyring")
        .primary_id()
        .to_string();
    let proxy = start_proxy(config).await;
    let address = proxy.local_addr().expect("tcp");

    let before = run_python("scenario.py", &client_args(address, &pki, &pki.client)).await;
    let before_id = before["workflow_id"].as_str().expect("id").to_string();
    let keys = stored_keys(&server, &before_id).await;
    let data_keys: std::collections::HashSet<_> = keys.iter().map(|(_, d)| d.clone()).collect();
    assert!(
        data_keys.len() >= 2,
        "data keys did not rotate by use: {data_keys:?}"
    );
    assert!(keys.iter().all(|(k, _)| *k == first_kek), "{keys:?}");

    // Rotate the key-encryption key while the proxy runs (as `portcullis keys rotate` does).
    let rotated = portcullis::crypto::Keyring::rotate(&keyring).expect("rotate");
    let second_kek = rotated.primary_id().to_string();
    assert_ne!(first_kek, second_kek);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let after = run_python("scenario.py", &client_args(address, &pki, &pki.client)).await;
    let after_id = after["workflow_id"].as_str().expect("id").to_string();
    let keys = stored_keys(&server, &after_id).await;
    assert!(
        keys.iter().all(|(k, _)| *k == second_kek),
        "payloads sealed after the rotation must use the new key {second_kek}: {keys:?}"
    );

    // Payloads sealed under the old key still open through the proxy.
    let (ok, shown, err) = temporal_cli(
        address,
        &pki,
        &pki.client,
        &[
            "workflow",
            "show",
            "--workflow-id",
            &before_id,
            "-o",
            "json",
        ],
    );
    assert!(ok, "{err}");
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    assert!(
        !shown.contains(&b64("binary/encrypted")),
        "old payloads no longer open: {shown}"
    );
    assert!(
        shown.contains(&b64("\"Portcullis\"")),
        "old workflow input not readable: {shown}"
    );
    proxy.shutdown().await;
}

fn start_request(workflow_id: &str, text: &str) -> wf::StartWorkflowExecutionRequest {
    use temporalio_protos::protos::temporal::api::common::v1::{Payload, Payloads, WorkflowType};
    use temporalio_protos::protos::temporal::api::taskqueue::v1::TaskQueue;
    wf::StartWorkflowExecutionRequest {
        namespace: "default".into(),
        workflow_id: workflow_id.into(),
        workflow_type: Some(WorkflowType {
            name: "KmsWorkflow".into(),
        }),
        task_queue: Some(TaskQueue {
            name: "kms-queue".into(),
            ..Default::default()
        }),
        input: Some(Payloads {
            payloads: vec![Payload {
                metadata: [("encoding".to_string(), b"json/plain".to_vec())].into(),
                data: format!("\"{text}\"").into_bytes(),
                ..Default::default()
            }],
        }),
        request_id: format!("req-{workflow_id}"),
        ..Default::default()
    }
}

fn signal_process(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_provider_outage_fails_closed_and_recovers() {
    use common::moto::Moto;
    use portcullis::crypto::config::KeyConfig;

    let moto = Moto::start().await;
    let key = moto.create_key(None).await;
    let server = DevServer::start(&[]).await;
    let db = server.dir.path().join("temporal.db");
    let pki = Pki::new();
    let mut config = proxy_config(&pki, &server.address(), &["default"]);
    config
        .encryption
        .keys
        .insert("kms".into(), KeyConfig::AwsKms(moto.config(&key)));
    config.encryption.default_key = Some("kms".into());
    // Every request needs a fresh data key from KMS, so an outage shows at once.
    config.encryption.data_key_max_seals = 1;
    let proxy = start_proxy(config).await;
    let address = proxy.local_addr().expect("tcp");
    let mut client = workflow_client(address, &pki, &pki.client).await;
    let tag = std::process::id();

    client
        .start_workflow_execution(start_request("kms-before", &format!("kms-before-{tag}")))
        .await
        .expect("start with KMS up");

    // KMS stops answering (frozen, so its keys survive for the recovery).
    let pid = moto.child.id().expect("moto pid");
    signal_process(pid, "-STOP");
    let during = format!("kms-during-{tag}");
    let status = client
        .start_workflow_execution(start_request("kms-during", &during))
        .await
        .expect_err("no sealing key while KMS is down");
    signal_process(pid, "-CONT");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("key provider"),
        "unclear message: {status:?}"
    );
    // Nothing was forwarded: no workflow, no plaintext.
    assert_eq!(occurrences(&db, &during), 0);
    let mut direct = server.direct_client().await;
    let missing = direct
        .describe_workflow_execution(wf::DescribeWorkflowExecutionRequest {
            namespace: "default".into(),
            execution: Some(
                temporalio_protos::protos::temporal::api::common::v1::WorkflowExecution {
                    workflow_id: "kms-during".into(),
                    run_id: String::new(),
                },
            ),
        })
        .await
        .expect_err("the refused workflow must not exist");
    assert_eq!(missing.code(), tonic::Code::NotFound);

    // KMS is back: calls succeed again without a restart, and earlier payloads open.
    client
        .start_workflow_execution(start_request("kms-after", &format!("kms-after-{tag}")))
        .await
        .expect("start after KMS recovered");
    let (ok, shown, err) = temporal_cli(
        address,
        &pki,
        &pki.client,
        &[
            "workflow",
            "show",
            "--workflow-id",
            "kms-before",
            "-o",
            "json",
        ],
    );
    assert!(ok, "{err}");
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    assert!(
        shown.contains(&b64(&format!("\"kms-before-{tag}\""))),
        "{shown}"
    );
    assert_eq!(occurrences(&db, &format!("kms-before-{tag}")), 0);
    assert_eq!(occurrences(&db, &format!("kms-after-{tag}")), 0);
    proxy.shutdown().await;
}

/// A query handler's exception message travels as a plain string (`error_message`) next to
/// the sealed failure. Through the proxy the caller sees it exactly; the server only ever sees
/// it sealed — unless `encode_failure_attributes` is off (the control: the check can fail).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_handlers_error_message_reaches_the_server_sealed() {
    let server = DevServer::start(&[]).await;
    let pki = Pki::new();
    let b64 = base64::engine::general_purpose::STANDARD;
    for encode in [true, false] {
        let mut config = proxy_config(&pki, &server.address(), &["default"]);
        config.encryption.encode_failure_attributes = encode;
        let proxy = start_proxy(config).await;
        // Long (its sealed form, about 4/3 of it plus the envelope, travels twice in the
        // upstream's trailers), yet short enough to fit the server's 4,000-byte cut whole.
        let marker = format!("qmark-{encode}-{}-{}", std::process::id(), "x".repeat(2000));
        let mut args = client_args(proxy.local_addr().expect("tcp"), &pki, &pki.client);
        args.extend([
            "--direct".into(),
            server.address(),
            "--marker".into(),
            marker.clone(),
        ]);
        let out = run_python("query_failure.py", &args).await;
        let expected = out["expected"].as_str().expect("expected").to_string();
        let text = |way: &str, key: &str| out[way][key].as_str().unwrap_or_default().to_string();
        let status = |way: &str| {
            let raw = b64.decode(text(way, "raw_status_b64")).expect("base64");
            String::from_utf8_lossy(&raw).into_owned()
        };
        // Through the proxy: exactly the handler's message, in grpc-message and in the
        // SDK's exception; the error details (the sealed failure) open too.
        assert_eq!(text("proxy", "raw_status"), "INVALID_ARGUMENT", "{out}");
        assert_eq!(text("proxy", "raw_message"), expected, "{out}");
        assert!(text("proxy", "message").contains(&expected), "{out}");
        assert!(status("proxy").contains(&expected), "{out}");
        // Straight at the server: what it was given.
        let direct_message = text("direct", "raw_message");
        if encode {
            assert!(!direct_message.contains(&marker), "{out}");
            assert!(!text("direct", "message").contains(&marker), "{out}");
            assert!(!status("direct").contains(&marker), "{out}");
            assert!(
                direct_message.contains(portcullis::crypto::message::SEALED_TEXT_PREFIX),
                "{out}"
            );
        } else {
            assert!(direct_message.contains(&marker), "control: {out}");
        }
        proxy.shutdown().await;
    }
}

/// A namespace marked `encrypted_only` refuses payloads the proxy did not seal when they come
/// back from the upstream (here: a workflow started straight at the server with plaintext
/// input), so an upstream cannot feed workers plaintext; a lenient namespace passes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_only_namespace_refuses_plaintext_from_the_upstream() {
    use temporalio_protos::protos::temporal::api::common::v1::{
        Payload, Payloads, WorkflowExecution,
    };
    use temporalio_protos::protos::temporal::api::taskqueue::v1::TaskQueue;

    let holds = |page: &wf::GetWorkflowExecutionHistoryResponse, text: &str| {
        use prost::Message as _;
        let bytes = page.encode_to_vec();
        bytes.windows(text.len()).any(|w| w == text.as_bytes())
    };
    let server = DevServer::start(&["strict", "lenient"]).await;
    let pki = Pki::new();
    let mut config = proxy_config(&pki, &server.address(), &["strict", "lenient"]);
    config.namespaces[0].encrypted_only = Some(true);
    let proxy = start_proxy(config).await;
    let mut client = workflow_client(proxy.local_addr().expect("tcp"), &pki, &pki.client).await;
    let mut direct = server.direct_client().await;
    let marker = format!("injected-{}", std::process::id());
    let start = |namespace: &str, id: &str, input: Option<Payloads>| {
        let mut request = start_request(id, &marker);
        request.namespace = namespace.into();
        request.task_queue = Some(TaskQueue {
            name: format!("{namespace}-q"),
            kind: 1,
            ..Default::default()
        });
        if let Some(input) = input {
            request.input = Some(input);
        }
        request
    };
    let history = |namespace: &str, id: &str| wf::GetWorkflowExecutionHistoryRequest {
        namespace: namespace.into(),
        execution: Some(WorkflowExecution {
            workflow_id: id.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let poll = |namespace: &str| {
        let mut request = tonic::Request::new(wf::PollWorkflowTaskQueueRequest {
            namespace: namespace.into(),
            task_queue: Some(TaskQueue {
                name: format!("{namespace}-q"),
                kind: 1,
                ..Default::default()
            }),
            ..Default::default()
        });
        request.set_timeout(Duration::from_secs(20));
        request
    };
    for namespace in ["strict", "lenient"] {
        direct
            .start_workflow_execution(start(namespace, "injected", None))
            .await
            .expect("start straight at the server");
    }

    // The encrypted-only namespace: the history and the workflow task are refused, naming
    // where the plaintext was (and not what it said).
    let status = client
        .get_workflow_execution_history(history("strict", "injected"))
        .await
        .expect_err("plaintext history");
    assert_eq!(status.code(), tonic::Code::DataLoss, "{status:?}");
    assert!(
        status
            .message()
            .contains("workflow_execution_started_event_attributes.input")
            && status.message().contains("json/plain"),
        "{status:?}"
    );
    assert!(!status.message().contains(&marker), "{status:?}");
    let status = client
        .poll_workflow_task_queue(poll("strict"))
        .await
        .expect_err("plaintext workflow task");
    assert_eq!(status.code(), tonic::Code::DataLoss, "{status:?}");

    // The lenient namespace (the default) passes them through.
    let page = client
        .get_workflow_execution_history(history("lenient", "injected"))
        .await
        .expect("lenient history")
        .into_inner();
    assert!(holds(&page, &marker));
    let task = client
        .poll_workflow_task_queue(poll("lenient"))
        .await
        .expect("lenient workflow task")
        .into_inner();
    assert!(!task.task_token.is_empty());

    // What the proxy sealed opens in the encrypted-only namespace, and so does a nil payload
    // (nothing in it), even when written straight at the server.
    client
        .start_workflow_execution(start("strict", "sealed", None))
        .await
        .expect("start through the proxy");
    let page = client
        .get_workflow_execution_history(history("strict", "sealed"))
        .await
        .expect("sealed history")
        .into_inner();
    assert!(holds(&page, &marker));
    let nil = Payloads {
        payloads: vec![Payload {
            metadata: [("encoding".to_string(), b"binary/null".to_vec())].into(),
            ..Default::default()
        }],
    };
    direct
        .start_workflow_execution(start("strict", "nil", Some(nil)))
        .await
        .expect("start with a nil input");
    client
        .get_workflow_execution_history(history("strict", "nil"))
        .await
        .expect("a nil payload is not plaintext");

    // Requests: a field the API schema does not know could hold a payload the proxy cannot
    // see to seal. The encrypted-only namespace refuses it; the lenient one forwards it as an
    // unknown field (which the server ignores).
    let raw = RawClient::new(proxy.local_addr().expect("tcp"), &pki, &pki.client);
    for (namespace, refused) in [("strict", true), ("lenient", false)] {
        use prost::Message as _;
        let mut message = start(namespace, &format!("unknown-{namespace}"), None).encode_to_vec();
        portcullis::payload::wire::put_len_field(&mut message, 999, marker.as_bytes());
        let answer = raw
            .call(
                &format!("{WORKFLOW_SERVICE}/StartWorkflowExecution"),
                &[],
                grpc_frame(&message),
            )
            .await;
        if refused {
            assert_eq!(answer.grpc_status(), Some(9), "{}", answer.grpc_message());
            assert!(
                answer.grpc_message().contains("field 999")
                    && answer.grpc_message().contains("encrypted_only"),
                "{}",
                answer.grpc_message()
            );
        } else {
            assert_eq!(answer.grpc_status(), Some(0), "{}", answer.grpc_message());
        }
    }
    // Sealing, opening and the unknown-field check ran on the schema's own indexes: the
    // descriptor pool (~5 MiB) was never decoded again.
    assert!(!portcullis::schema::Schema::global().holds_descriptors());
    proxy.shutdown().await;
}
