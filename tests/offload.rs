//! Payload services against real parts: large payloads offloaded to an S3 API (`moto_server`),
//! resolved back for workers, the CLI and the codec server; the object store failing and losing
//! objects; compression of large JSON payloads. The Temporal dev server's database and the bucket
//! are searched for what they hold.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::moto::Moto;
use common::*;
use portcullis::codec::{CodecConfig, CodecOptions};
use portcullis::config::Config;
use portcullis::crypto::{CompressionConfig, StaticCredentials};
use portcullis::offload::{NamespaceOffload, OffloadConfig};
use portcullis::server::StartOptions;
use prost::Message;
use temporalio_protos::protos::temporal::api::common::v1::{
    Payload, Payloads, WorkflowExecution, WorkflowType,
};
use temporalio_protos::protos::temporal::api::history::v1::history_event::Attributes;
use temporalio_protos::protos::temporal::api::taskqueue::v1::TaskQueue;

const BUCKET: &str = "portcullis-offload-test";
const TEN_MB: usize = 10 * 1000 * 1000;

fn store_config(moto: &Moto, timeout: Duration) -> OffloadConfig {
    let mut config = OffloadConfig::new(BUCKET);
    config.endpoint = Some(format!("http://127.0.0.1:{}", moto.port));
    config.force_path_style = true;
    config.timeout = timeout;
    config.credentials = Some(StaticCredentials {
        access_key_id: "testing".into(),
        secret_access_key: "testing".into(),
        session_token: None,
    });
    config
}

async fn s3(moto: &Moto) -> aws_sdk_s3::Client {
    portcullis::offload::store::sdk_client(&store_config(moto, Duration::from_secs(30))).await
}

async fn create_bucket(moto: &Moto) -> aws_sdk_s3::Client {
    let client = s3(moto).await;
    client
        .create_bucket()
        .bucket(BUCKET)
        .send()
        .await
        .unwrap_or_else(|e| panic!("CreateBucket: {e:?}\n{}", moto.log_text()));
    client
}

/// Every object in the bucket: key → bytes.
async fn objects(client: &aws_sdk_s3::Client) -> HashMap<String, Vec<u8>> {
    let listed = client
        .list_objects_v2()
        .bucket(BUCKET)
        .send()
        .await
        .expect("ListObjectsV2");
    let mut out = HashMap::new();
    for object in listed.contents() {
        let key = object.key().expect("key").to_string();
        let body = client
            .get_object()
            .bucket(BUCKET)
            .key(&key)
            .send()
            .await
            .expect("GetObject")
            .body
            .collect()
            .await
            .expect("body")
            .into_bytes()
            .to_vec();
        out.insert(key, body);
    }
    out
}

/// The proxy's config for payloads of up to 32 MiB from clients, namespace `default` offloading
/// payloads of 256 KiB and more.
fn offload_config(pki: &Pki, upstream: &str, store: OffloadConfig) -> Config {
    let mut config = proxy_config(pki, upstream, &["default", "json"]);
    config.limits.max_request_bytes = 32 << 20;
    config.limits.max_connection_buffered_bytes = 80 << 20;
    // Room for answers that expand to tens of megabytes (fetched objects and the answer).
    config.limits.crypto_budget_bytes = 256 << 20;
    config.offload = Some(store);
    config.namespaces[0].offload = Some(NamespaceOffload::default());
    config
}

/// Every payload of a workflow's history, read straight from the server (what it stores).
async fn stored_payloads(server: &DevServer, namespace: &str, workflow_id: &str) -> Vec<Payload> {
    let mut client = server
        .direct_client()
        .await
        .max_decoding_message_size(256 << 20);
    let history = client
        .get_workflow_execution_history(wf::GetWorkflowExecutionHistoryRequest {
            namespace: namespace.into(),
            execution: Some(WorkflowExecution {
                workflow_id: workflow_id.into(),
                run_id: String::new(),
            }),
            ..Default::default()
        })
        .await
        .expect("history straight from the server")
        .into_inner();
    let mut payloads = Vec::new();
    for event in history.history.expect("history").events {
        let found = match event.attributes {
            Some(Attributes::WorkflowExecutionStartedEventAttributes(a)) => a.input,
            Some(Attributes::ActivityTaskCompletedEventAttributes(a)) => a.result,
            Some(Attributes::WorkflowExecutionSignaledEventAttributes(a)) => a.input,
            Some(Attributes::WorkflowExecutionCompletedEventAttributes(a)) => a.result,
            Some(Attributes::ActivityTaskScheduledEventAttributes(a)) => a.input,
            _ => None,
        };
        payloads.extend(found.map(|p| p.payloads).unwrap_or_default());
    }
    payloads
}

fn db_bytes(server: &DevServer) -> u64 {
    std::fs::read_dir(server.dir.path())
        .expect("server dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("temporal.db"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

fn big_payloads_args(address: SocketAddr, pki: &Pki, marker: &str, kind: &str) -> Vec<String> {
    let mut args = client_args(address, pki, &pki.client);
    args.extend([
        "--marker".into(),
        marker.into(),
        "--kind".into(),
        kind.into(),
    ]);
    args
}

async fn run_python_long(script: &str, args: &[String]) -> serde_json::Value {
    let mut command = tokio::process::Command::new(python());
    command
        .arg(repo_root().join("tests/clients/python").join(script))
        .args(args);
    let output = run_with_timeout(command, Duration::from_secs(300)).await;
    parse_client_output(script, &output)
}

/// A Python SDK workflow whose input, activity result and signal are 10 MB each runs through
/// the proxy; the server stores only small sealed references, the bucket only sealed objects;
/// the CLI (through the proxy) and the codec server (for the CLI straight at the server) show
/// the original. The same workflow straight at the server fails on its size limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_megabyte_payloads_run_through_the_object_store() {
    let moto = Moto::start().await;
    let s3 = create_bucket(&moto).await;
    let server = DevServer::start(&["json"]).await;
    let pki = Pki::new();
    let mut config = offload_config(
        &pki,
        &server.address(),
        store_config(&moto, Duration::from_secs(30)),
    );
    config.codec = Some(CodecConfig::loopback("127.0.0.1:0", vec![]));
    let proxy = portcullis::server::start_with(
        config,
        StartOptions {
            codec: CodecOptions {
                dev_anonymous_reader: true,
            },
        },
    )
    .await
    .expect("start proxy");
    let address = proxy.local_addr().expect("tcp");
    let codec = format!("http://{}", proxy.codec_addr().expect("codec"));
    let marker = format!("offload{}", std::process::id());

    let before = db_bytes(&server);
    let run = run_python_long(
        "big_payloads.py",
        &big_payloads_args(address, &pki, &marker, "random"),
    )
    .await;
    assert_eq!(run["size"], TEN_MB, "{run}");
    assert_eq!(run["hashes"], run["expected"], "{run}");
    let workflow_id = run["workflow_id"].as_str().expect("id").to_string();

    // The server holds small sealed references: input, activity result, signal.
    let stored = stored_payloads(&server, "default", &workflow_id).await;
    let large: Vec<usize> = stored
        .iter()
        .map(|p| p.encoded_len())
        .filter(|n| *n > 200)
        .collect();
    assert!(stored.len() >= 4, "{} payloads", stored.len());
    for payload in &stored {
        assert_eq!(payload.metadata["encoding"], b"binary/encrypted");
        assert!(
            payload.encoded_len() < 1024,
            "a payload of {} bytes is stored",
            payload.encoded_len()
        );
    }
    assert!(large.len() >= 3, "{large:?}");
    // A WAL checkpoint between the two readings can leave the files smaller than before.
    let grown = db_bytes(&server).saturating_sub(before);
    assert!(
        grown < 8 << 20,
        "the database grew by {grown} bytes for 30 MB of payloads"
    );
    assert_eq!(
        occurrences(&server.dir.path().join("temporal.db"), &marker),
        0
    );

    // The bucket holds the three payloads, sealed, under the namespace's prefix.
    let objects = objects(&s3).await;
    let big: Vec<_> = objects.iter().filter(|(_, b)| b.len() >= TEN_MB).collect();
    assert_eq!(big.len(), 3, "{:?}", objects.keys().collect::<Vec<_>>());
    for (key, bytes) in &big {
        assert!(key.starts_with("portcullis/default/"), "{key}");
        assert!(
            leak::find(bytes, marker.as_bytes()).is_none(),
            "{key} holds the marker"
        );
        assert!(portcullis::crypto::inspect(bytes)
            .expect("sealed")
            .is_some());
        // Content-addressed: the key ends in the object's SHA-256.
        let digest = portcullis::offload::reference::sha256(bytes);
        assert!(key.ends_with(&portcullis::offload::reference::hex(&digest)));
    }
    // The leak detector finds the marker where it is in plaintext (the control).
    let mut plain = vec![0u8; 1000];
    plain.extend_from_slice(format!("{marker}-input:").as_bytes());
    assert!(leak::find(&plain, marker.as_bytes()).is_some());

    // The CLI through the proxy shows the original input and signal.
    let (ok, out, err) = temporal_cli(
        address,
        &pki,
        &pki.client,
        &[
            "workflow",
            "show",
            "--namespace",
            "default",
            "-w",
            &workflow_id,
            "-o",
            "json",
        ],
    );
    assert!(ok, "{err}");
    // `-o json` shows payload data in base64: the leak detector searches every encoding.
    let shows = |text: &str, what: &str| {
        leak::find(text.as_bytes(), format!("{marker}-{what}:").as_bytes()).is_some()
    };
    for what in ["input", "signal", "result"] {
        assert!(shows(&out, what), "{what} not shown through the proxy");
    }

    // Straight at the server, the CLI shows sealed references; with the codec server, the
    // original.
    let show = |codec: Option<&str>| {
        let mut command = std::process::Command::new(temporal_binary());
        command.args([
            "workflow",
            "show",
            "--namespace",
            "default",
            "-w",
            &workflow_id,
            "-o",
            "json",
            "--address",
            &server.address(),
        ]);
        if let Some(codec) = codec {
            command.args(["--codec-endpoint", codec]);
        }
        let output = command.output().expect("temporal workflow show");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let without = show(None);
    assert!(leak::find(without.as_bytes(), marker.as_bytes()).is_none());
    assert!(leak::find(without.as_bytes(), b"binary/encrypted").is_some());
    assert!(without.len() < 100_000, "{} bytes shown", without.len());
    let with = show(Some(&codec));
    for what in ["input", "signal", "result"] {
        assert!(
            shows(&with, what),
            "{what} not resolved by the codec server"
        );
    }
    proxy.shutdown().await;

    // The same workflow straight at the server: refused for its size.
    let mut direct = vec![
        "--address".to_string(),
        server.address(),
        "--marker".into(),
        format!("{marker}direct"),
        "--expect-too-large".into(),
    ];
    direct.extend(["--namespace".into(), "default".into()]);
    let refused = run_python_long("big_payloads.py", &direct).await;
    assert_eq!(refused["refused"], true, "{refused}");
    let error = refused["error"].as_str().unwrap_or_default().to_lowercase();
    assert!(
        error.contains("larger than max") || error.contains("size") || error.contains("exceed"),
        "{refused}"
    );
}

fn start_request(workflow_id: &str, input: &[u8]) -> wf::StartWorkflowExecutionRequest {
    wf::StartWorkflowExecutionRequest {
        namespace: "default".into(),
        workflow_id: workflow_id.into(),
        workflow_type: Some(WorkflowType {
            name: "NoWorker".into(),
        }),
        task_queue: Some(TaskQueue {
            name: "nobody-polls".into(),
            ..Default::default()
        }),
        input: Some(payloads(input)),
        request_id: format!("{workflow_id}-start"),
        ..Default::default()
    }
}

fn payloads(data: &[u8]) -> Payloads {
    Payloads {
        payloads: vec![Payload {
            metadata: [("encoding".to_string(), b"binary/plain".to_vec())].into(),
            data: data.to_vec(),
            ..Default::default()
        }],
    }
}

fn signal_request(workflow_id: &str, input: &[u8], id: &str) -> wf::SignalWorkflowExecutionRequest {
    wf::SignalWorkflowExecutionRequest {
        namespace: "default".into(),
        workflow_execution: Some(WorkflowExecution {
            workflow_id: workflow_id.into(),
            run_id: String::new(),
        }),
        signal_name: "big".into(),
        input: Some(payloads(input)),
        request_id: id.into(),
        ..Default::default()
    }
}

fn history_request(workflow_id: &str) -> wf::GetWorkflowExecutionHistoryRequest {
    wf::GetWorkflowExecutionHistoryRequest {
        namespace: "default".into(),
        execution: Some(WorkflowExecution {
            workflow_id: workflow_id.into(),
            run_id: String::new(),
        }),
        ..Default::default()
    }
}

/// The payloads (data) of the started and signaled events, as the caller of the proxy sees them.
fn event_data(history: &wf::GetWorkflowExecutionHistoryResponse) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for event in history.history.clone().unwrap_or_default().events {
        let input = match event.attributes {
            Some(Attributes::WorkflowExecutionStartedEventAttributes(a)) => a.input,
            Some(Attributes::WorkflowExecutionSignaledEventAttributes(a)) => a.input,
            _ => None,
        };
        out.extend(input.into_iter().flat_map(|p| p.payloads).map(|p| p.data));
    }
    out
}

fn signal(kill: bool, moto: &Moto) {
    let pid = moto.child.id().expect("moto pid");
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("pid");
    let signal = if kill {
        rustix::process::Signal::STOP
    } else {
        rustix::process::Signal::CONT
    };
    rustix::process::kill_process(pid, signal).expect("signal moto_server");
}

/// The object store goes away mid-run: a call that must write fails with UNAVAILABLE and
/// nothing is forwarded (the server's history has no such signal), a call that must read fails
/// with UNAVAILABLE; both work again once the store is back. A deleted object fails reads with
/// DATA_LOSS naming its key, never a wrong or missing payload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_store_outage_fails_closed_and_recovers() {
    let moto = Moto::start().await;
    let s3 = create_bucket(&moto).await;
    let server = DevServer::start(&[]).await;
    let pki = Pki::new();
    let mut store = store_config(&moto, Duration::from_secs(2));
    store.max_attempts = 1;
    // No cache: every read goes to the store.
    store.cache_bytes = 0;
    let config = offload_config(&pki, &server.address(), store);

    // `portcullis check` writes, reads back and removes an object; a bucket that does not
    // exist fails it.
    let path = pki.dir.path().join("offload.toml");
    let check = |config: &Config| {
        std::fs::write(&path, config.to_toml()).expect("write config");
        let path = path.clone();
        async move {
            let report = portcullis::check::run(&path, &Default::default()).await;
            let line = report
                .lines
                .iter()
                .find(|l| l.what == "offload")
                .cloned()
                .unwrap_or_else(|| panic!("no offload line: {}", report.render()));
            (line.severity, line.detail)
        }
    };
    let (severity, detail) = check(&config).await;
    assert_eq!(severity, portcullis::check::Severity::Ok, "{detail}");
    assert!(
        detail.contains("wrote and read back") && detail.contains("(removed)"),
        "{detail}"
    );
    let mut missing = config.clone();
    if let Some(offload) = missing.offload.as_mut() {
        offload.bucket = "no-such-bucket".into();
    }
    let (severity, detail) = check(&missing).await;
    assert_eq!(severity, portcullis::check::Severity::Fail, "{detail}");
    assert!(detail.contains("HeadBucket"), "{detail}");
    assert!(objects(&s3).await.is_empty(), "check left an object behind");

    let proxy = start_proxy(config).await;
    let address = proxy.local_addr().expect("tcp");
    let mut client = workflow_client(address, &pki, &pki.client)
        .await
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let workflow_id = format!("outage-{}", std::process::id());
    let input = vec![b'i'; 1 << 20];
    let first_signal = vec![b's'; 1 << 20];
    client
        .start_workflow_execution(start_request(&workflow_id, &input))
        .await
        .expect("start with the store up");

    signal(true, &moto);
    let refused = client
        .signal_workflow_execution(signal_request(&workflow_id, &first_signal, "s1"))
        .await
        .expect_err("a signal while the store is down");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("cannot write the offloaded payload"),
        "{refused:?}"
    );
    let read = client
        .get_workflow_execution_history(history_request(&workflow_id))
        .await
        .expect_err("history while the store is down");
    assert_eq!(read.code(), tonic::Code::Unavailable, "{read:?}");
    assert!(read.message().contains("portcullis/default/"), "{read:?}");
    // Nothing was forwarded: the server has no signal.
    let stored = stored_payloads(&server, "default", &workflow_id).await;
    assert_eq!(stored.len(), 1, "only the start's input is stored");

    signal(false, &moto);
    client
        .signal_workflow_execution(signal_request(&workflow_id, &first_signal, "s2"))
        .await
        .expect("the signal once the store is back");
    let history = client
        .get_workflow_execution_history(history_request(&workflow_id))
        .await
        .expect("history once the store is back")
        .into_inner();
    assert_eq!(
        event_data(&history),
        vec![input.clone(), first_signal.clone()]
    );

    // The objects (input, signal, and the one the refused signal's write left behind: the store
    // took it after the proxy gave up; nothing refers to it) are deleted: DATA_LOSS naming the
    // key.
    let objects = objects(&s3).await;
    assert!((2..=3).contains(&objects.len()), "{:?}", objects.keys());
    let keys: Vec<String> = objects.keys().cloned().collect();
    for key in &keys {
        s3.delete_object()
            .bucket(BUCKET)
            .key(key)
            .send()
            .await
            .expect("DeleteObject");
    }
    let lost = client
        .get_workflow_execution_history(history_request(&workflow_id))
        .await
        .expect_err("history with the objects gone");
    assert_eq!(lost.code(), tonic::Code::DataLoss, "{lost:?}");
    assert!(
        lost.message().contains("is missing from bucket"),
        "{lost:?}"
    );
    assert!(
        keys.iter().any(|k| lost.message().contains(k.as_str())),
        "{lost:?}"
    );

    // Each object put back under another's key (same size, other bytes): DATA_LOSS too, by
    // the digest.
    for (i, key) in keys.iter().enumerate() {
        let other = &objects[&keys[(i + 1) % keys.len()]];
        assert_eq!(other.len(), objects[key].len());
        s3.put_object()
            .bucket(BUCKET)
            .key(key)
            .body(other.clone().into())
            .send()
            .await
            .expect("PutObject");
    }
    let corrupt = client
        .get_workflow_execution_history(history_request(&workflow_id))
        .await
        .expect_err("history with swapped objects");
    assert_eq!(corrupt.code(), tonic::Code::DataLoss, "{corrupt:?}");
    assert!(
        corrupt.message().contains("does not match its reference"),
        "{corrupt:?}"
    );
    assert!(
        keys.iter().any(|k| corrupt.message().contains(k.as_str())),
        "{corrupt:?}"
    );
    proxy.shutdown().await;
}

/// Large JSON payloads compress before sealing: the server stores far less than the same
/// workflow stores directly, the results are identical, and envelopes written before
/// compression was turned on keep opening.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_json_payloads_are_compressed_and_older_envelopes_still_open() {
    let server = DevServer::start(&["json"]).await;
    let pki = Pki::new();
    // Under the server's 2 MiB blob limit once JSON-escaped, so the direct run works too.
    let size = "1200000";
    let marker = format!("zjson{}", std::process::id());
    let args = |address: SocketAddr, what: &str| {
        let mut args = big_payloads_args(address, &pki, &format!("{marker}{what}"), "json");
        args.extend([
            "--namespace".into(),
            "json".into(),
            "--size".into(),
            size.into(),
        ]);
        args
    };
    let total = |payloads: &[Payload]| payloads.iter().map(|p| p.encoded_len()).sum::<usize>();

    // Before: sealed without compression (v1 envelopes).
    let mut config = proxy_config(&pki, &server.address(), &["json"]);
    config.limits.max_request_bytes = 32 << 20;
    config.limits.max_connection_buffered_bytes = 80 << 20;
    let proxy = start_proxy(config.clone()).await;
    let old = run_python_long(
        "big_payloads.py",
        &args(proxy.local_addr().expect("tcp"), "old"),
    )
    .await;
    proxy.shutdown().await;
    let old_id = old["workflow_id"].as_str().expect("id").to_string();
    let old_stored = stored_payloads(&server, "json", &old_id).await;
    assert!(old_stored
        .iter()
        .all(|p| p.metadata.get("portcullis-envelope").map(Vec::as_slice) == Some(b"v1")));

    // Directly, for the stored size and the results.
    let mut direct = args(proxy_placeholder(), "direct");
    direct.splice(0..10, ["--address".to_string(), server.address()]);
    let plain = run_python_long("big_payloads.py", &direct).await;
    let plain_id = plain["workflow_id"].as_str().expect("id").to_string();
    let plain_total = total(&stored_payloads(&server, "json", &plain_id).await);

    // With compression.
    config.namespaces[0].compression = Some(CompressionConfig::default());
    let proxy = start_proxy(config).await;
    let address = proxy.local_addr().expect("tcp");
    let compressed = run_python_long("big_payloads.py", &args(address, "new")).await;
    let new_id = compressed["workflow_id"].as_str().expect("id").to_string();
    let stored = stored_payloads(&server, "json", &new_id).await;
    let large: Vec<_> = stored.iter().filter(|p| p.encoded_len() > 10_000).collect();
    assert_eq!(large.len(), 3, "input, result, signal");
    for payload in &large {
        assert_eq!(payload.metadata["portcullis-envelope"], b"v2");
    }
    let compressed_total = total(&stored);
    eprintln!("stored payload bytes: direct {plain_total}, compressed through the proxy {compressed_total}");
    assert!(
        compressed_total * 3 < plain_total,
        "direct {plain_total}, compressed {compressed_total}"
    );
    assert_eq!(
        occurrences(
            &server.dir.path().join("temporal.db"),
            &format!("{marker}new")
        ),
        0
    );
    // Identical results: the workflow saw the same bytes (its hashes are checked by the script
    // against the ones it computed), and so did the direct run.
    assert_eq!(compressed["hashes"], compressed["expected"]);
    assert_eq!(plain["hashes"], plain["expected"]);

    // The workflow sealed before compression was on still opens through this proxy.
    let mut client = workflow_client(address, &pki, &pki.client)
        .await
        .max_decoding_message_size(64 << 20);
    let mut request = history_request(&old_id);
    request.namespace = "json".into();
    let history = client
        .get_workflow_execution_history(request)
        .await
        .expect("the old workflow's history")
        .into_inner();
    let inputs = event_data(&history);
    assert_eq!(inputs.len(), 5, "four arguments and the signal");
    assert!(String::from_utf8_lossy(&inputs[0]).contains(&format!("{marker}old-input:")));
    assert!(inputs[0].len() > 1_200_000, "{}", inputs[0].len());
    proxy.shutdown().await;
}

/// `big_payloads_args` wants an address; the direct run replaces the connection flags.
fn proxy_placeholder() -> SocketAddr {
    "127.0.0.1:9".parse().expect("address")
}
