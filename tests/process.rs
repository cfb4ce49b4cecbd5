//! The `portcullis` binary as an operator runs it: `serve` with graceful shutdown on SIGTERM,
//! `dev` creating and reusing its setup, and `check`.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use temporalio_protos::protos::temporal::api::taskqueue::v1::TaskQueue;
use tokio::process::{Child, Command};

const BINARY: &str = env!("CARGO_BIN_EXE_portcullis");

fn sigterm(child: &Child) {
    let pid = child.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
}

async fn wait_for_port(address: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(address).await.is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {address}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn poll(queue: &str, timeout: Duration) -> tonic::Request<wf::PollActivityTaskQueueRequest> {
    let mut request = tonic::Request::new(wf::PollActivityTaskQueueRequest {
        namespace: "default".into(),
        task_queue: Some(TaskQueue {
            name: queue.into(),
            ..Default::default()
        }),
        identity: "shutdown-test".into(),
        ..Default::default()
    });
    request.set_timeout(timeout);
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_in_flight_calls_within_the_grace_period() {
    let server = DevServer::start(&[]).await;
    let pki = Pki::new();
    let port = portcullis::dev::free_port().expect("port");
    let admin_port = portcullis::dev::free_port().expect("port");
    let mut config = proxy_config(&pki, &server.address(), &["default"]);
    config.listener.address = format!("127.0.0.1:{port}");
    config.limits.shutdown_grace_seconds = 4;
    common::ops::with_admin(&mut config);
    if let Some(admin) = &mut config.admin {
        admin.listen = format!("127.0.0.1:{admin_port}");
    }
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin_port}").parse().expect("addr");
    let config_path = pki.dir.path().join("portcullis.toml");
    std::fs::write(&config_path, config.to_toml()).expect("write config");

    let mut proxy = Command::new(BINARY)
        .args(["serve", "--config"])
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start portcullis serve");
    let address = format!("127.0.0.1:{port}");
    wait_for_port(&address).await;
    let socket = address.parse().expect("addr");
    let client = workflow_client(socket, &pki, &pki.client).await;

    // A short poll that finishes inside the grace period, and a long one that cannot.
    let mut short_client = client.clone();
    let short = tokio::spawn(async move {
        short_client
            .poll_activity_task_queue(poll("drain-a", Duration::from_secs(3)))
            .await
    });
    let mut long_client = client.clone();
    let long = tokio::spawn(async move {
        long_client
            .poll_activity_task_queue(poll("drain-b", Duration::from_secs(60)))
            .await
    });
    // Load: callers issuing short unary calls back to back on the same channel until they fail.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let mut client = client.clone();
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let (mut ok, mut errors) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let request = wf::DescribeNamespaceRequest {
                    namespace: "default".into(),
                    ..Default::default()
                };
                match client.describe_namespace(request).await {
                    Ok(_) => ok += 1,
                    Err(status) => {
                        errors.push(status);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            (ok, errors)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, _) = common::ops::http_get(admin, "/readyz").await;
    assert_eq!(status, 200, "ready before the signal");

    let signalled = Instant::now();
    sigterm(&proxy);
    // The listener closes promptly (polling, since a loaded machine delays signal handling).
    let closing = Instant::now();
    while tokio::net::TcpStream::connect(&address).await.is_ok() {
        assert!(
            closing.elapsed() < Duration::from_secs(3),
            "still accepting connections 3 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // While draining, the admin listener still answers and says: not ready.
    let (status, body) = common::ops::http_get(admin, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("shutting down"), "{body}");

    let short = short.await.expect("join");
    assert!(
        short.is_ok(),
        "the in-flight call that fits the grace period failed: {short:?}"
    );

    let long = tokio::time::timeout(Duration::from_secs(10), long)
        .await
        .expect("long call hung")
        .expect("join");
    let status = long.expect_err("the call outliving the grace period is cut");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"), "{status:?}");

    // The load saw answers, and after the signal only UNAVAILABLE: nothing else, nothing hung.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut refused = 0;
    for task in load {
        let (ok, errors) = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("a load caller hung")
            .expect("join");
        assert!(ok > 0, "no call succeeded before the signal");
        refused += errors.len();
        for status in errors {
            // A request the client had queued on the connection as it closed was never sent:
            // hyper fails it as "canceled: connection closed" (tonic says CANCELLED). It was
            // not in flight at the proxy; everything that reached the proxy is UNAVAILABLE.
            let never_sent = status.code() == tonic::Code::Cancelled
                && format!("{status:?}").contains("connection closed");
            assert!(
                status.code() == tonic::Code::Unavailable || never_sent,
                "{status:?}"
            );
        }
    }
    assert!(refused > 0, "the load never saw the shutdown");

    let exit = tokio::time::timeout(Duration::from_secs(10), proxy.wait())
        .await
        .expect("the proxy did not exit")
        .expect("wait");
    let took = signalled.elapsed();
    assert!(exit.success(), "exit status {exit}");
    assert!(
        took < Duration::from_secs(7),
        "shutdown took {took:?} with a 4 s grace period"
    );
}

async fn start_dev(dir: &Path) -> (Child, serde_json::Value) {
    start_portcullis_dev(dir, &["--listen", "127.0.0.1:0"]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_creates_its_setup_once_and_the_cli_profile_works() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut dev, endpoints) = start_dev(dir.path()).await;
    for key in [
        "proxy_address",
        "server_name",
        "ca_cert",
        "client_cert",
        "client_key",
        "upstream_address",
        "cli_profile",
    ] {
        assert!(
            endpoints.get(key).is_some_and(|v| !v.is_null()),
            "endpoints.json lacks {key}: {endpoints}"
        );
    }
    for key in ["ca_cert", "client_cert", "client_key", "cli_profile"] {
        assert!(
            Path::new(endpoints[key].as_str().expect("path")).is_file(),
            "{key} does not exist"
        );
    }
    let ca_before = std::fs::read(endpoints["ca_cert"].as_str().expect("path")).expect("ca");

    let cli = |endpoints: &serde_json::Value, args: &[&str]| {
        let output = std::process::Command::new(temporal_binary())
            .args(args)
            .args([
                "--config-file",
                endpoints["cli_profile"].as_str().expect("path"),
                "--profile",
                "portcullis",
            ])
            .output()
            .expect("temporal");
        let text = String::from_utf8_lossy(&output.stdout).to_string()
            + &String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "temporal {args:?} via the dev profile failed: {text}"
        );
        text
    };
    cli(
        &endpoints,
        &[
            "workflow",
            "start",
            "--type",
            "DevWf",
            "--task-queue",
            "dev-tq",
            "--workflow-id",
            "dev-wf",
        ],
    );
    // The read-only identity can look but not start; the stranger can do neither.
    let as_identity = |cert: &str, key: &str, args: &[&str]| {
        let output = std::process::Command::new(temporal_binary())
            .args(args)
            .args([
                "--config-file",
                endpoints["cli_profile"].as_str().expect("path"),
                "--profile",
                "portcullis",
            ])
            .args(["--tls-cert-path", endpoints[cert].as_str().expect("path")])
            .args(["--tls-key-path", endpoints[key].as_str().expect("path")])
            .output()
            .expect("temporal");
        let text = String::from_utf8_lossy(&output.stdout).to_string()
            + &String::from_utf8_lossy(&output.stderr);
        (output.status.success(), text)
    };
    let (ok, text) = as_identity(
        "reader_cert",
        "reader_key",
        &["workflow", "describe", "--workflow-id", "dev-wf"],
    );
    assert!(ok, "{text}");
    // Refused for the right reason: permission, naming the identity and the role it lacks.
    for (cert, key, args, role) in [
        (
            "reader_cert",
            "reader_key",
            ["workflow", "terminate", "--workflow-id", "dev-wf"],
            "writer",
        ),
        (
            "stranger_cert",
            "stranger_key",
            ["workflow", "describe", "--workflow-id", "dev-wf"],
            "reader",
        ),
    ] {
        let (ok, text) = as_identity(cert, key, &args);
        assert!(!ok, "{cert}: {text}");
        assert!(
            text.contains("may not call") && text.contains(role),
            "{cert}: not a permission denial naming {role}: {text}"
        );
    }

    // describe reads the workflow itself (list goes through eventually consistent visibility).
    assert!(cli(
        &endpoints,
        &["workflow", "describe", "--workflow-id", "dev-wf"]
    )
    .contains("DevWf"));

    sigterm(&dev);
    let exit = tokio::time::timeout(Duration::from_secs(20), dev.wait())
        .await
        .expect("dev exits")
        .expect("wait");
    assert!(exit.success(), "{exit}");
    let upstream = endpoints["upstream_address"]
        .as_str()
        .expect("addr")
        .to_string();
    assert!(
        tokio::net::TcpStream::connect(&upstream).await.is_err(),
        "the dev server it started is still running"
    );

    // Second run: same CA and certificates, same data (the workflow is still there).
    let (mut dev, endpoints) = start_dev(dir.path()).await;
    let ca_after = std::fs::read(endpoints["ca_cert"].as_str().expect("path")).expect("ca");
    assert_eq!(ca_before, ca_after, "the development CA was recreated");
    assert!(cli(
        &endpoints,
        &["workflow", "describe", "--workflow-id", "dev-wf"]
    )
    .contains("DevWf"));
    sigterm(&dev);
    let _ = tokio::time::timeout(Duration::from_secs(20), dev.wait()).await;
}

async fn check(path: &Path, extra: &[&str]) -> (bool, String) {
    let output = Command::new(BINARY)
        .args(["check", "--config"])
        .arg(path)
        .args(extra)
        .output()
        .await
        .expect("check");
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

#[tokio::test]
async fn check_reports_certificates_keys_and_upstreams() {
    use portcullis::tls::pki::{LeafSpec, Usage};

    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let upstream_address = upstream.local_addr().expect("addr").to_string();
    let pki = Pki::new();
    let config = proxy_config(&pki, &upstream_address, &["default"]);
    let path = pki.dir.path().join("ok.toml");
    std::fs::write(&path, config.to_toml()).expect("write");

    // The test certificates live an hour: no expiry warnings for this first look.
    let (ok, out) = check(&path, &["--warn-days", "0"]).await;
    assert!(ok, "{out}");
    for line in [
        "ok   config:",
        "ok   server certificate",
        "ok   client CA bundle",
        "ok   listener TLS: certificate and key match",
        "ok   authorization: policies compile",
        "ok   key local: sealed and opened a probe payload",
        "ok   upstream temporal:",
        "ok   pipeline: builds",
        "0 failed",
    ] {
        assert!(out.contains(line), "{line:?} missing:\n{out}");
    }

    // A certificate that expires soon is a warning, not a failure.
    let write_server_cert = |not_before_days: i64, not_after_days: i64| {
        let mut spec = LeafSpec::new("localhost", Usage::Server, Duration::from_secs(3600));
        spec.dns_names.push("localhost".into());
        let now = time::OffsetDateTime::now_utc();
        spec.not_before = now + time::Duration::days(not_before_days);
        spec.not_after = now + time::Duration::days(not_after_days);
        let issued = pki.ca.issue(&spec).expect("issue");
        std::fs::write(&pki.server_cert, &issued.cert_pem).expect("write");
        std::fs::write(&pki.server_key, &issued.key_pem).expect("write");
    };
    write_server_cert(-1, 10);
    let (ok, out) = check(&path, &[]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("WARN server certificate") && out.contains("days (< 30 days)"),
        "{out}"
    );
    let (ok, out) = check(&path, &["--warn-days", "5"]).await;
    assert!(ok && !out.contains("WARN server certificate"), "{out}");

    // An expired certificate fails.
    write_server_cert(-30, -1);
    let (ok, out) = check(&path, &[]).await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("FAIL server certificate") && out.contains("EXPIRED"),
        "{out}"
    );
    write_server_cert(-1, 100);

    // An upstream nobody listens on fails (unless told not to connect).
    drop(upstream);
    let (ok, out) = check(&path, &[]).await;
    assert!(!ok, "{out}");
    assert!(out.contains("FAIL upstream temporal"), "{out}");
    let (ok, out) = check(&path, &["--offline"]).await;
    assert!(ok, "{out}");
    assert!(out.contains("WARN upstream temporal"), "{out}");

    // A keyring that is gone fails the key check.
    let keyring = pki.dir.path().join("keyring.toml");
    let saved = std::fs::read(&keyring).expect("keyring");
    std::fs::remove_file(&keyring).expect("remove");
    let (ok, out) = check(&path, &["--offline"]).await;
    assert!(!ok, "{out}");
    assert!(out.contains("FAIL encryption"), "{out}");
    std::fs::write(&keyring, saved).expect("restore");

    // A file that is not a certificate fails, naming it.
    std::fs::write(&pki.server_cert, "not a certificate").expect("corrupt");
    let (ok, out) = check(&path, &["--offline"]).await;
    assert!(!ok, "{out}");
    assert!(out.contains("FAIL server certificate"), "{out}");
    assert!(out.contains("checks failed"), "{out}");
}

/// `portcullis serve` as its own process, so its memory can be read on its own.
async fn serve_process(config: &portcullis::config::Config, dir: &Path) -> (Child, String) {
    let port = portcullis::dev::free_port().expect("port");
    let mut config = config.clone();
    config.listener.address = format!("127.0.0.1:{port}");
    let config_path = dir.join("portcullis.toml");
    std::fs::write(&config_path, config.to_toml()).expect("write config");
    let proxy = Command::new(BINARY)
        .args(["serve", "--config"])
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start portcullis serve");
    let address = format!("127.0.0.1:{port}");
    wait_for_port(&address).await;
    (proxy, address)
}

/// A QueryWorkflow whose arguments are `count` empty payloads: 2 bytes each on the wire, an
/// envelope of about 150 bytes each once sealed.
fn empty_payload_query(count: usize) -> Vec<u8> {
    use prost::Message;
    use temporalio_protos::protos::temporal::api::common::v1::{
        Payload, Payloads, WorkflowExecution,
    };
    use temporalio_protos::protos::temporal::api::query::v1::WorkflowQuery;
    wf::QueryWorkflowRequest {
        namespace: "default".into(),
        execution: Some(WorkflowExecution {
            workflow_id: "amplify".into(),
            ..Default::default()
        }),
        query: Some(WorkflowQuery {
            query_type: "q".into(),
            query_args: Some(Payloads {
                payloads: vec![Payload::default(); count],
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

fn gzip_frame(message: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(message).expect("gzip");
    let compressed = gz.finish().expect("gzip");
    let mut out = vec![1u8];
    out.extend_from_slice(&(compressed.len() as u32).to_be_bytes());
    out.extend_from_slice(&compressed);
    out
}

/// Issue 12: sealing must not amplify. A reader's QueryWorkflow holding two million empty
/// payloads (4 MB, or 12 KB gzipped) would seal into ~300 MB; the proxy refuses it while it
/// plans, before allocating, and its peak memory barely moves. Twenty at once leave it serving a
/// real workflow load (Python SDK worker and starters) at the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_amplification_is_refused_without_growing_memory() {
    let server = DevServer::start(&[]).await;
    let pki = Pki::new();
    let reader = pki.client_cert("reader");
    let config = proxy_config_with_authz(
        &pki,
        &server.address(),
        &["default"],
        r#"
audit_log = "off"
identity = ["cn"]
system.admins = ["cn:test-client"]
[[namespaces]]
name = "default"
readers = ["cn:reader"]
"#,
    );
    let (proxy, address) = serve_process(&config, pki.dir.path()).await;
    let pid = proxy.id().expect("pid");
    let socket = address.parse().expect("addr");
    let raw = RawClient::new(socket, &pki, &reader);
    let query = format!("{WORKFLOW_SERVICE}/QueryWorkflow");

    // Warm up: a small query seals and reaches the server (which does not know the workflow).
    let small = raw
        .call(&query, &[], grpc_frame(&empty_payload_query(10)))
        .await;
    assert_eq!(small.grpc_status(), Some(5), "{}", small.grpc_message());
    let baseline = proc_kb(pid, "VmHWM");

    let message = empty_payload_query(2_000_000);
    assert!(message.len() < 4 << 20, "within max_request_bytes");
    let gzipped = gzip_frame(&message);
    assert!(gzipped.len() < 64 * 1024, "{} bytes gzipped", gzipped.len());
    for (what, body) in [("plain", grpc_frame(&message)), ("gzip", gzipped.clone())] {
        let headers: &[(&str, &str)] = if what == "gzip" {
            &[("grpc-encoding", "gzip")]
        } else {
            &[]
        };
        let answer = raw.call(&query, headers, body).await;
        assert_eq!(
            answer.grpc_status(),
            Some(8),
            "{what}: {}",
            answer.grpc_message()
        );
        assert!(
            answer.grpc_message().contains("sealed request"),
            "{what}: {}",
            answer.grpc_message()
        );
    }
    let peak = proc_kb(pid, "VmHWM");
    let grown_mib = (peak.saturating_sub(baseline)) as f64 / 1024.0;
    eprintln!("amplification: VmHWM {baseline} KiB before, {peak} KiB after one plain and one gzip call (+{grown_mib:.1} MiB)");
    // The 4 MB request itself is read and decompressed; the ~300 MB of envelopes never exist.
    assert!(grown_mib < 16.0, "peak RSS grew by {grown_mib:.1} MiB");

    // Twenty at once, over and over, while a real workflow load runs through the proxy.
    let args = {
        let mut args = client_args(socket, &pki, &pki.client);
        args.extend([
            "--seconds".into(),
            "8".into(),
            "--starters".into(),
            "2".into(),
        ]);
        args
    };
    let load = tokio::spawn(async move { run_python("steady_load.py", &args).await });
    let started = Instant::now();
    let mut refused = 0;
    while started.elapsed() < Duration::from_secs(6) {
        let mut calls = Vec::new();
        for _ in 0..20 {
            let (raw, query, body) = (
                RawClient::new(socket, &pki, &reader),
                query.clone(),
                gzipped.clone(),
            );
            calls.push(tokio::spawn(async move {
                raw.call(&query, &[("grpc-encoding", "gzip")], body).await
            }));
        }
        for call in calls {
            let answer = call.await.expect("join");
            assert_eq!(answer.grpc_status(), Some(8), "{}", answer.grpc_message());
            refused += 1;
        }
    }
    let load = load.await.expect("join");
    assert_eq!(
        load["ok"], true,
        "the workflow load failed under attack: {load}"
    );
    assert!(load["completed"].as_u64().unwrap_or(0) > 0, "{load}");
    let peak = proc_kb(pid, "VmHWM");
    let grown_mib = (peak.saturating_sub(baseline)) as f64 / 1024.0;
    eprintln!("amplification: {refused} parallel attack calls refused during the load; VmHWM +{grown_mib:.1} MiB in all");
    assert!(grown_mib < 160.0, "peak RSS grew by {grown_mib:.1} MiB");
}

/// StartWorkflowExecution in `default` whose new field 999 (unknown to the built-in schema)
/// holds a payload with `marker`.
fn start_with_future_field(marker: &str) -> Vec<u8> {
    use prost::Message;
    use temporalio_protos::protos::temporal::api::common::v1::{Payload, Payloads, WorkflowType};
    let mut message = wf::StartWorkflowExecutionRequest {
        namespace: "default".into(),
        workflow_id: "future".into(),
        workflow_type: Some(WorkflowType { name: "W".into() }),
        request_id: "future-1".into(),
        ..Default::default()
    }
    .encode_to_vec();
    let future = Payloads {
        payloads: vec![Payload {
            metadata: [("encoding".to_string(), b"json/plain".to_vec())].into(),
            data: format!("\"{marker}\"").into_bytes(),
            ..Default::default()
        }],
    }
    .encode_to_vec();
    portcullis::payload::wire::put_len_field(&mut message, FUTURE_PAYLOAD_FIELD, &future);
    message
}

/// Issue 13: a descriptor set newer than the binary, from the config. It must keep every
/// method and payload field of the built-in one (else refused, by `check` too); its new method
/// is forwarded to the real server with the access level the config gives it, and its new
/// payload field is sealed (with the built-in schema the same bytes pass as an unknown field).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_api_schema_forwards_new_methods_and_seals_new_payload_fields() {
    let pki = Pki::new();
    let dir = pki.dir.path();
    let newer = dir.join("temporal-api.binpb");
    std::fs::write(&newer, newer_api_descriptor_set()).expect("write");
    let older = dir.join("older-api.binpb");
    std::fs::write(&older, descriptor_set_without_start_input()).expect("write");

    let (_, report) = portcullis::api::load(&newer).expect("the newer set loads");
    assert_eq!(report.added_methods, vec![FUTURE_METHOD.to_string()]);
    for field in [
        "temporal.api.workflowservice.v1.StartWorkflowExecutionRequest.future_input",
        "temporal.api.workflowservice.v1.FutureMethodRequest.input",
        "temporal.api.workflowservice.v1.FutureMethodResponse.output",
    ] {
        assert!(
            report.added_payload_fields.iter().any(|f| f == field),
            "{field} not reported: {report:?}"
        );
    }
    let Err(refused) = portcullis::api::load(&older) else {
        panic!("a set that drops a payload field was accepted");
    };
    assert!(
        refused
            .to_string()
            .contains("StartWorkflowExecutionRequest field 5"),
        "{refused}"
    );

    // Against the real server: the new method is forwarded, with its configured level.
    let server = DevServer::start(&[]).await;
    let (reader, writer) = (pki.client_cert("reader"), pki.client_cert("writer"));
    let mut config = proxy_config_with_authz(
        &pki,
        &server.address(),
        &["default"],
        &format!(
            r#"
audit_log = "off"
identity = ["cn"]
system.admins = ["cn:test-client"]
method_access = {{ "{FUTURE_METHOD}" = "write" }}
[[namespaces]]
name = "default"
readers = ["cn:reader"]
writers = ["cn:writer"]
"#
        ),
    );
    config.schema.descriptor_set = Some(newer.clone());
    let config_path = dir.join("newer.toml");
    std::fs::write(&config_path, config.to_toml()).expect("write");
    let (ok, out) = check(&config_path, &["--offline", "--warn-days", "0"]).await;
    assert!(
        ok && out.contains("FutureMethod") && out.contains("future_input"),
        "{out}"
    );
    let mut bad = config.clone();
    bad.schema.descriptor_set = Some(older.clone());
    let bad_path = dir.join("older.toml");
    std::fs::write(&bad_path, bad.to_toml()).expect("write");
    let (ok, out) = check(&bad_path, &["--offline", "--warn-days", "0"]).await;
    assert!(!ok && out.contains("would no longer be sealed"), "{out}");

    let (_proxy, address) = serve_process(&config, dir).await;
    let socket = address.parse().expect("addr");
    let future = {
        use prost::Message;
        wf::QueryWorkflowRequest {
            namespace: "default".into(),
            ..Default::default()
        }
        .encode_to_vec()
    };
    let as_reader = RawClient::new(socket, &pki, &reader)
        .call(FUTURE_METHOD, &[], grpc_frame(&future))
        .await;
    assert_eq!(
        as_reader.grpc_status(),
        Some(7),
        "{}",
        as_reader.grpc_message()
    );
    assert!(
        as_reader.grpc_message().contains("writer"),
        "{}",
        as_reader.grpc_message()
    );
    let as_writer = RawClient::new(socket, &pki, &writer)
        .call(FUTURE_METHOD, &[], grpc_frame(&future))
        .await;
    // The server itself does not know it yet: its own UNIMPLEMENTED, not the proxy's.
    assert_eq!(
        as_writer.grpc_status(),
        Some(12),
        "{}",
        as_writer.grpc_message()
    );
    assert!(
        !as_writer.grpc_message().starts_with("portcullis:"),
        "{}",
        as_writer.grpc_message()
    );
    let unknown = RawClient::new(socket, &pki, &writer)
        .call(
            "/temporal.api.workflowservice.v1.WorkflowService/PastMethod",
            &[],
            grpc_frame(&future),
        )
        .await;
    assert_eq!(unknown.grpc_status(), Some(12));
    assert!(unknown
        .grpc_message()
        .starts_with("portcullis: unknown method"));

    // The new payload field, at a recording upstream: sealed with the newer schema, and
    // (the control) passed through as an unknown field with the built-in one.
    for (schema, sealed) in [(Some(newer), true), (None, false)] {
        let fake = FakeUpstream::start().await;
        let mut config = proxy_config(&pki, &fake.address.to_string(), &["default"]);
        config.schema.descriptor_set = schema;
        let (mut proxy, address) = serve_process(&config, dir).await;
        let marker = "future-field-marker-7c1";
        let answer = RawClient::new(address.parse().expect("addr"), &pki, &pki.client)
            .call(
                &format!("{WORKFLOW_SERVICE}/StartWorkflowExecution"),
                &[],
                grpc_frame(&start_with_future_field(marker)),
            )
            .await;
        assert_eq!(answer.grpc_status(), Some(0), "{}", answer.grpc_message());
        let bodies = fake.bodies.lock().expect("lock").clone();
        let (_, body) = bodies
            .iter()
            .find(|(path, _)| path.ends_with("/StartWorkflowExecution"))
            .expect("the call reached the upstream");
        let plain = body.windows(marker.len()).any(|w| w == marker.as_bytes());
        assert_eq!(
            plain,
            !sealed,
            "schema {schema:?}: marker in plaintext upstream: {plain}",
            schema = sealed
        );
        let _ = proxy.kill().await;
    }
}

/// A field of /proc/PID/status in kB (VmHWM: peak resident set, VmRSS: now).
fn proc_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// A framed StartWorkflowExecutionRequest for namespace `default` of about `len` bytes
/// (shared, not copied per use).
fn declared_body(len: usize) -> bytes::Bytes {
    let message = wf::StartWorkflowExecutionRequest {
        namespace: "default".into(),
        request_id: "r".repeat(len.saturating_sub(64)),
        ..Default::default()
    };
    bytes::Bytes::from(grpc_frame(&prost::Message::encode_to_vec(&message)))
}

/// Opens `streams` calls on one connection, each sending `body`, and returns their statuses
/// (-2: the stream was reset).
async fn flood(
    address: std::net::SocketAddr,
    pki: &Pki,
    client: Option<&ClientCert>,
    streams: usize,
    body: &bytes::Bytes,
) -> (H2Connection, Vec<(i32, String)>) {
    let mut connection = h2_connect(address, pki, client).await.expect("connect");
    let mut answers = Vec::new();
    for _ in 0..streams {
        connection.send = connection.send.clone().ready().await.expect("ready");
        let (response, mut stream) = connection
            .send
            .send_request(
                grpc_head(
                    "/temporal.api.workflowservice.v1.WorkflowService/StartWorkflowExecution",
                    &[],
                ),
                false,
            )
            .expect("open stream");
        // Queued by h2 and sent as the proxy's flow-control windows allow.
        let _ = stream.send_data(body.clone(), true);
        answers.push(async move {
            let _keep = stream;
            h2_grpc_status(response)
                .await
                .unwrap_or_else(|e| (-2, e.to_string()))
        });
    }
    (connection, futures_util::future::join_all(answers).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_cannot_make_the_proxy_buffer_unauthenticated_or_past_its_budgets() {
    use common::jwt::Issuer;
    let upstream = FakeUpstream::start().await;
    let pki = Pki::new();
    let issuer = Issuer::new(&pki);
    let port = portcullis::dev::free_port().expect("port");
    let admin_port = portcullis::dev::free_port().expect("port");
    let mut config = proxy_config(&pki, &upstream.address.to_string(), &["default"]);
    config.listener.address = format!("127.0.0.1:{port}");
    config.bearer = Some(issuer.bearer_config());
    let audit = pki.dir.path().join("audit.jsonl");
    config.authorization.audit_log = audit.display().to_string();
    const MIB: usize = 1024 * 1024;
    config.limits.max_connection_buffered_bytes = 16 * MIB;
    config.limits.max_buffered_bytes = 24 * MIB;
    common::ops::with_admin(&mut config);
    if let Some(admin) = &mut config.admin {
        admin.listen = format!("127.0.0.1:{admin_port}");
    }
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin_port}").parse().expect("addr");
    let config_path = pki.dir.path().join("portcullis.toml");
    std::fs::write(&config_path, config.to_toml()).expect("write config");
    let proxy = Command::new(BINARY)
        .args(["serve", "--config"])
        .arg(&config_path)
        .env("PORTCULLIS_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start portcullis serve");
    let pid = proxy.id().expect("pid");
    let address_text = format!("127.0.0.1:{port}");
    wait_for_port(&address_text).await;
    let address: std::net::SocketAddr = address_text.parse().expect("addr");

    // Warm up with authenticated calls (certificate and token), then take the idle baseline.
    let describe = grpc_frame(&prost::Message::encode_to_vec(
        &wf::DescribeNamespaceRequest {
            namespace: "default".into(),
            ..Default::default()
        },
    ));
    const DESCRIBE: &str = "/temporal.api.workflowservice.v1.WorkflowService/DescribeNamespace";
    let raw = RawClient::new(address, &pki, &pki.client);
    for _ in 0..20 {
        let ok = raw.call(DESCRIBE, &[], describe.clone()).await;
        assert_eq!(ok.grpc_status(), Some(0), "{}", ok.grpc_message());
    }
    let token = format!("Bearer {}", issuer.token("test-client", &["default:read"]));
    let _ = flood(address, &pki, None, 20, &declared_body(1024)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_hwm = proc_kb(pid, "VmHWM");
    let idle_rss = proc_kb(pid, "VmRSS");

    // No certificate, no token: 600 streams each declaring and sending a 4 MiB message (2.4 GB
    // if buffered). Every one is answered UNAUTHENTICATED at its headers.
    let big = declared_body(4 * MIB);
    let started = Instant::now();
    let (mut connection, answers) = flood(address, &pki, None, 600, &big).await;
    let refused_in = started.elapsed();
    assert_eq!(answers.len(), 600);
    for (code, message) in &answers {
        assert_eq!(*code, tonic::Code::Unauthenticated as i32, "{message}");
        assert!(
            message.contains("certificate or a bearer token"),
            "{message}"
        );
    }
    assert!(
        refused_in < Duration::from_secs(10),
        "600 refusals took {refused_in:?}"
    );
    // The same connection still serves a caller that authenticates.
    connection.send = connection.send.clone().ready().await.expect("ready");
    let (response, mut stream) = connection
        .send
        .send_request(
            grpc_head(DESCRIBE, &[("authorization", token.as_str())]),
            false,
        )
        .expect("stream");
    stream
        .send_data(bytes::Bytes::from(describe.clone()), true)
        .expect("send");
    let (code, message) = h2_grpc_status(response).await.expect("answer");
    assert_eq!(code, 0, "{message}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let attacked_hwm = proc_kb(pid, "VmHWM");
    eprintln!(
        "unauthenticated flood: 600 x 4 MiB streams refused in {refused_in:?}; VmHWM idle {idle_hwm} kB (VmRSS {idle_rss} kB), after {attacked_hwm} kB"
    );
    assert!(
        attacked_hwm < idle_hwm + 12 * 1024,
        "the proxy's peak RSS grew from {idle_hwm} kB to {attacked_hwm} kB under an unauthenticated flood"
    );

    // A certificate without any role: its calls are authenticated, so their bodies are read,
    // but within the budgets (16 MiB per connection, 24 MiB in all): two connections of 200
    // streams each sending 4 MiB (1.6 GB if buffered) get RESOURCE_EXHAUSTED beyond them, and
    // the ones that fit are denied by authorization.
    let stranger = pki.client_cert("stranger");
    let before_hwm = proc_kb(pid, "VmHWM");
    let started = Instant::now();
    let ((_a, first), (_b, second)) = tokio::join!(
        flood(address, &pki, Some(&stranger), 200, &big),
        flood(address, &pki, Some(&stranger), 200, &big)
    );
    let took = started.elapsed();
    let mut exhausted = 0;
    let mut denied = 0;
    let mut process_limit = 0;
    for (code, message) in first.iter().chain(second.iter()) {
        match *code {
            c if c == tonic::Code::ResourceExhausted as i32 => {
                assert!(message.contains("buffered request bytes"), "{message}");
                exhausted += 1;
                if message.contains("process limit") {
                    process_limit += 1;
                }
            }
            c if c == tonic::Code::PermissionDenied as i32 => denied += 1,
            _ => panic!("unexpected answer {code}: {message}"),
        }
    }
    let budget_hwm = proc_kb(pid, "VmHWM");
    eprintln!(
        "no-role flood: 400 x 4 MiB streams in {took:?}: {exhausted} RESOURCE_EXHAUSTED ({process_limit} by the process limit), {denied} PERMISSION_DENIED; VmHWM before {before_hwm} kB, after {budget_hwm} kB"
    );
    assert!(exhausted >= 300, "only {exhausted} refused by the budgets");
    assert!(denied >= 1, "no call fit the budget");
    // The budgets (24 MiB), plus what each connection's HTTP/2 window (16 MiB) lets a caller
    // send before the proxy reads and refuses it, plus 16 MiB of slack.
    assert!(
        budget_hwm < before_hwm + (24 + 2 * 16 + 16) * 1024,
        "the proxy's peak RSS grew from {before_hwm} kB to {budget_hwm} kB"
    );

    let m = common::ops::scrape(admin).await;
    assert!(
        m.sum(
            "portcullis_refused_requests_total",
            &[("reason", "unauthenticated")]
        ) >= 600.0
    );
    let budget_refusals = m.sum(
        "portcullis_refused_requests_total",
        &[("reason", "connection_buffer_limit")],
    ) + m.sum(
        "portcullis_refused_requests_total",
        &[("reason", "process_buffer_limit")],
    );
    assert_eq!(budget_refusals, exhausted as f64);
    assert_eq!(m.sum("portcullis_buffered_request_bytes", &[]), 0.0);
    // Authentication failures are audited (best effort: at most half the audit queue).
    let lines = std::fs::read_to_string(&audit).expect("audit");
    let failures = lines
        .lines()
        .filter(|l| l.contains("\"event\":\"authentication_failed\""))
        .count();
    assert!(
        failures >= 600,
        "{failures} authentication failures audited"
    );
    assert!(lines.contains("\"reason\":\"no_credential\",\"peer\":\"127.0.0.1:"));
}

/// A dev server that cannot bind its port is started three times, and the error quotes its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dev_server_that_cannot_start_says_why_after_three_attempts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let log = dir.path().join("server.log");
    let started = Instant::now();
    let error = match portcullis::dev::TemporalDevServer::start(
        &temporal_binary(),
        Some(port),
        &dir.path().join("temporal.db"),
        &[],
        &["--headless".to_string()],
        &log,
    )
    .await
    {
        Ok(_) => panic!("a dev server started on a taken port"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        error.contains("exited") && error.contains("attempt 3"),
        "{error}"
    );
    assert!(error.contains("address already in use"), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    drop(taken);
}
