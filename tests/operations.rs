//! Production operations against real components: `/metrics` after real SDK traffic (and the
//! Grafana dashboard's queries against that scrape), `/readyz` and `grpc.health.v1.Health/Check`
//! following the upstream and the key provider, and client-facing certificate and CA rotation
//! while an SDK worker stays connected.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::ops::*;
use common::*;
use portcullis::tls::pki::{CertAuthority, LeafSpec, Usage};

const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

/// Health/Check through the proxy: Some(1) SERVING, Some(2) NOT_SERVING; None for a non-OK status.
async fn health(address: std::net::SocketAddr, pki: &Pki, service: &str) -> (i32, Option<u8>) {
    let raw = RawClient::new(address, pki, &pki.client);
    let mut request = vec![0x0a, service.len() as u8];
    request.extend_from_slice(service.as_bytes());
    let response = raw.call(HEALTH_CHECK, &[], grpc_frame(&request)).await;
    let status = response.grpc_status().expect("grpc-status");
    let serving = (status == 0).then(|| {
        assert_eq!(response.body.len(), 7, "{:?}", response.body);
        assert_eq!(response.body[5], 0x08);
        response.body[6]
    });
    (status, serving)
}

fn describe(namespace: &str) -> wf::DescribeNamespaceRequest {
    wf::DescribeNamespaceRequest {
        namespace: namespace.into(),
        ..Default::default()
    }
}

/// Every `portcullis_*` name in the dashboard's queries.
fn dashboard_metric_names() -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo_root().join("config/grafana-dashboard.json"))
        .expect("config/grafana-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut exprs = Vec::new();
    fn collect(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    if k == "expr" {
                        out.push(v.as_str().expect("expr is a string").to_string());
                    } else {
                        collect(v, out);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| collect(v, out)),
            _ => {}
        }
    }
    collect(&dashboard, &mut exprs);
    assert!(exprs.len() >= 10, "too few queries: {exprs:?}");
    let mut names = BTreeSet::new();
    for expr in &exprs {
        let mut rest = expr.as_str();
        while let Some(at) = rest.find("portcullis_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    assert!(names.len() >= 10, "{names:?}");
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_real_traffic_and_the_dashboard_queries_exist() {
    let server = DevServer::start(&[]).await;
    let pki = Pki::new();
    let mut config = proxy_config(&pki, &server.address(), &["default"]);
    with_admin(&mut config);
    let proxy = start_proxy(config).await;
    let address = proxy.local_addr().expect("tcp");
    let admin = proxy.admin_addr().expect("admin listener");

    assert_eq!(http_get(admin, "/healthz").await.0, 200);
    wait_until(Duration::from_secs(20), "ready", || async move {
        readyz(admin).await.0 == 200
    })
    .await;

    // Real traffic: the Python SDK runs workflows, activities (one fails twice), a child,
    // signals, queries and updates.
    run_python("scenario.py", &client_args(address, &pki, &pki.client)).await;
    // A caller without a role is denied; a namespace the proxy does not serve is NOT_FOUND.
    let stranger = pki.client_cert("stranger");
    let mut client = workflow_client(address, &pki, &stranger).await;
    let denied = client
        .describe_namespace(describe("default"))
        .await
        .expect_err("stranger denied");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let mut client = workflow_client(address, &pki, &pki.client).await;
    let missing = client
        .describe_namespace(describe("not-served-here"))
        .await
        .expect_err("unknown namespace");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    // The proxy answers health checks itself, from its readiness.
    assert_eq!(health(address, &pki, "").await, (0, Some(1)));
    assert_eq!(
        health(
            address,
            &pki,
            "temporal.api.workflowservice.v1.WorkflowService"
        )
        .await,
        (0, Some(1))
    );
    assert_eq!(health(address, &pki, "no.such.Service").await, (5, None));
    // A handshake without a client certificate is refused and counted.
    assert!(tls_probe(address, &pki, None).await.is_err());
    // Counted once the proxy's handshake task ends, which can be just after the client saw
    // the refusal.
    wait_for_metric(
        admin,
        Duration::from_secs(10),
        "the refused handshake counted",
        ("portcullis_tls_handshake_failures_total", &[]),
        |n| n >= 1.0,
    )
    .await;

    let m = scrape(admin).await;
    let calls = |ns: &str, method: &str, code: &str| {
        m.sum(
            "portcullis_calls_total",
            &[("namespace", ns), ("method", method), ("code", code)],
        )
    };
    for method in [
        "StartWorkflowExecution",
        "PollWorkflowTaskQueue",
        "RespondWorkflowTaskCompleted",
        "PollActivityTaskQueue",
        "RespondActivityTaskCompleted",
        "QueryWorkflow",
        "SignalWorkflowExecution",
        "GetWorkflowExecutionHistory",
    ] {
        assert!(
            calls("default", method, "OK") >= 1.0,
            "no OK {method} counted:\n{}",
            m.text
        );
    }
    assert!(calls("default", "RespondActivityTaskFailed", "OK") >= 2.0);
    assert_eq!(
        calls("default", "DescribeNamespace", "PERMISSION_DENIED"),
        1.0
    );
    assert_eq!(calls("_other", "DescribeNamespace", "NOT_FOUND"), 1.0);
    assert_eq!(calls("_cluster", "Check", "OK"), 2.0);
    assert_eq!(calls("_cluster", "Check", "NOT_FOUND"), 1.0);
    // Only configured namespaces get a label.
    for (labels, _) in m.series("portcullis_calls_total") {
        let ns = labels["namespace"].as_str();
        assert!(
            ["default", "_other", "_cluster"].contains(&ns),
            "unbounded label {ns}"
        );
    }
    assert_eq!(
        m.sum(
            "portcullis_authz_decisions_total",
            &[("namespace", "default"), ("decision", "deny")]
        ),
        1.0
    );
    assert!(
        m.sum(
            "portcullis_authz_decisions_total",
            &[("namespace", "default"), ("decision", "allow")]
        ) >= 20.0
    );
    let start = [
        ("namespace", "default"),
        ("method", "StartWorkflowExecution"),
    ];
    assert!(m.sum("portcullis_received_bytes_total", &start) > 0.0);
    assert!(m.sum("portcullis_sent_bytes_total", &start) > 0.0);
    let started = calls("default", "StartWorkflowExecution", "OK");
    assert_eq!(
        m.sum("portcullis_call_duration_seconds_count", &start),
        started
    );
    assert_eq!(
        m.sum("portcullis_upstream_duration_seconds_count", &start),
        started
    );
    assert!(m.sum("portcullis_call_duration_seconds_sum", &start) > 0.0);
    let key = [("key", "local")];
    for name in [
        "portcullis_payloads_sealed_total",
        "portcullis_payloads_opened_total",
        "portcullis_data_key_rotations_total",
        "portcullis_key_provider_calls_total",
    ] {
        assert!(m.sum(name, &key) >= 1.0, "{name} did not move:\n{}", m.text);
    }
    assert!(
        m.sum("portcullis_payloads_sealed_total", &key) >= 10.0,
        "the scenario seals many payloads"
    );
    assert_eq!(m.sum("portcullis_seal_failures_total", &key), 0.0);
    assert_eq!(m.sum("portcullis_open_failures_total", &key), 0.0);
    assert!(
        m.sum(
            "portcullis_key_provider_duration_seconds_count",
            &[("key", "local"), ("operation", "generate")]
        ) >= 1.0
    );
    let expiry = m.sum(
        "portcullis_certificate_expiry_seconds",
        &[("certificate", "listener")],
    );
    assert!(
        (3000.0..=3600.0).contains(&expiry),
        "listener certificate expiry {expiry}"
    );
    assert_eq!(
        m.sum("portcullis_upstream_up", &[("upstream", "temporal")]),
        1.0
    );
    assert_eq!(m.sum("portcullis_ready", &[]), 1.0);
    assert!(m.sum("portcullis_tls_handshake_failures_total", &[]) >= 1.0);
    assert!(m.sum("portcullis_connections_total", &[]) >= 3.0);
    assert!(m.sum("portcullis_open_connections", &[]) >= 1.0);

    // Every metric the Grafana dashboard queries exists in this real scrape.
    let mut known = BTreeSet::new();
    for (family, kind) in m.families() {
        match kind.as_str() {
            "counter" => {
                known.insert(format!("{family}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    known.insert(format!("{family}{suffix}"));
                }
            }
            "info" => {
                known.insert(format!("{family}_info"));
            }
            _ => {
                known.insert(family);
            }
        }
    }
    for (name, _, _) in &m.samples {
        known.insert(name.clone());
    }
    for name in dashboard_metric_names() {
        assert!(
            known.contains(&name),
            "the dashboard queries {name}, which /metrics does not have"
        );
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_upstream() {
    let server = DevServer::start(&[]).await;
    let pki = Pki::new();
    let mut config = proxy_config(&pki, &server.address(), &["default"]);
    with_admin(&mut config);
    let proxy = start_proxy(config).await;
    let address = proxy.local_addr().expect("tcp");
    let admin = proxy.admin_addr().expect("admin");
    wait_until(Duration::from_secs(20), "ready", || async move {
        readyz(admin).await.0 == 200
    })
    .await;
    let (_, body) = readyz(admin).await;
    assert!(body.contains("ok   upstream temporal"), "{body}");
    assert!(body.contains("ok   key local"), "{body}");
    assert!(body.contains("ok   certificate listener"), "{body}");

    let (port, dir) = server.stop().await;
    wait_until(
        Duration::from_secs(15),
        "not ready without upstream",
        || async move {
            let (status, body) = readyz(admin).await;
            status == 503 && body.contains("FAIL upstream temporal")
        },
    )
    .await;
    assert_eq!(health(address, &pki, "").await, (0, Some(2)));
    let m = scrape(admin).await;
    assert_eq!(
        m.sum("portcullis_upstream_up", &[("upstream", "temporal")]),
        0.0
    );
    assert_eq!(m.sum("portcullis_ready", &[]), 0.0);
    // /healthz stays OK: the process is alive, a restart would not help.
    assert_eq!(http_get(admin, "/healthz").await.0, 200);

    let _server = DevServer::start_on(port, dir, &[]).await;
    wait_until(Duration::from_secs(20), "ready again", || async move {
        readyz(admin).await.0 == 200
    })
    .await;
    assert_eq!(health(address, &pki, "").await, (0, Some(1)));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_key_provider() {
    use common::moto::Moto;
    use portcullis::crypto::config::KeyConfig;

    let moto = Moto::start().await;
    let key = moto.create_key(None).await;
    let upstream = FakeUpstream::start().await;
    let pki = Pki::new();
    let mut config = proxy_config(&pki, &upstream.address.to_string(), &["default"]);
    config
        .encryption
        .keys
        .insert("kms".into(), KeyConfig::AwsKms(moto.config(&key)));
    with_admin(&mut config);
    let proxy = start_proxy(config).await;
    let admin = proxy.admin_addr().expect("admin");
    wait_until(Duration::from_secs(30), "ready", || async move {
        readyz(admin).await.0 == 200
    })
    .await;
    assert!(readyz(admin).await.1.contains("ok   key kms"));

    let pid = moto.child.id().expect("moto pid").to_string();
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill");
        assert!(status.success());
    };
    signal("-STOP");
    wait_until(
        Duration::from_secs(20),
        "not ready without KMS",
        || async move {
            let (status, body) = readyz(admin).await;
            status == 503 && body.contains("FAIL key kms")
        },
    )
    .await;
    // The local key is still fine: only the one provider is named.
    assert!(readyz(admin).await.1.contains("ok   key local"));
    // The probe gives up after 2 s; the provider call it started fails (and is counted) only at
    // the provider's own timeout, a few seconds later.
    wait_for_metric(
        admin,
        Duration::from_secs(30),
        "the frozen provider's failure counted",
        (
            "portcullis_key_provider_errors_total",
            &[("key", "kms"), ("operation", "generate")],
        ),
        |n| n >= 1.0,
    )
    .await;
    signal("-CONT");
    wait_until(Duration::from_secs(30), "ready again", || async move {
        readyz(admin).await.0 == 200
    })
    .await;
    proxy.shutdown().await;
}

/// The certificate the proxy presents to a new handshake.
async fn served_certificate(address: std::net::SocketAddr, pki: &Pki) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(&pki.ca_path).expect("ca"))
        .expect("root");
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![CertificateDer::from_pem_file(&pki.client.cert).expect("cert")],
        PrivateKeyDer::from_pem_file(&pki.client.key).expect("key"),
    )
    .expect("client auth");
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("handshake");
    tls.get_ref().1.peer_certificates().expect("peer certs")[0].to_vec()
}

fn pem_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("pem")
        .to_vec()
}

/// Replaces a file the way config managers do: write aside, rename over.
fn replace_file(path: &std::path::Path, contents: &str) {
    let aside = path.with_extension("new");
    std::fs::write(&aside, contents).expect("write");
    std::fs::rename(&aside, path).expect("rename");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_keeps_workers_connected() {
    let server = DevServer::start(&[]).await;
    let pki = Pki::new();
    let mut config = proxy_config(&pki, &server.address(), &["default"]);
    with_admin(&mut config);
    let proxy = start_proxy(config).await;
    let address = proxy.local_addr().expect("tcp");
    let admin = proxy.admin_addr().expect("admin");
    let queue = "rotation-queue";

    // A worker that stays connected through every rotation below.
    let mut worker = tokio::process::Command::new(python());
    worker
        .arg(repo_root().join("tests/clients/python/worker.py"))
        .args(client_args(address, &pki, &pki.client))
        .args(["--task-queue", queue, "--seconds", "120"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true);
    let mut worker = worker.spawn().expect("start worker");
    let stdout = worker.stdout.take().expect("worker stdout");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let ready = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("worker ready in time")
        .expect("worker output");
    assert!(
        ready
            .as_deref()
            .unwrap_or_default()
            .contains("\"ready\": true"),
        "{ready:?}"
    );
    // Keep reading: the SDK core logs its warnings to stdout, and a full pipe would block it.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    // Each run is a new CLI process: a new connection and handshake. The worker runs it.
    let run = |name: &str| {
        let input = format!("\"{name}\"");
        let (ok, out, err) = temporal_cli(
            address,
            &pki,
            &pki.client,
            &[
                "workflow",
                "execute",
                "--type",
                "GreetingWorkflow",
                "--task-queue",
                queue,
                "--input",
                &input,
                "-o",
                "json",
            ],
        );
        assert!(ok, "workflow for {name} failed: {err}");
        assert!(out.contains(&format!("Hello, {name}!")), "{out}");
    };
    run("before");
    let original = served_certificate(address, &pki).await;
    assert_eq!(
        original,
        pem_der(&std::fs::read_to_string(&pki.server_cert).expect("cert"))
    );

    // Rotate: a new certificate (and key) from the same CA, valid twice as long.
    let mut spec = LeafSpec::new("localhost", Usage::Server, Duration::from_secs(7200));
    spec.dns_names.push("localhost".into());
    spec.ip_addresses.push("127.0.0.1".parse().expect("ip"));
    let rotated = pki.ca.issue(&spec).expect("new server cert");
    replace_file(&pki.server_key, &rotated.key_pem);
    replace_file(&pki.server_cert, &rotated.cert_pem);
    let new_der = pem_der(&rotated.cert_pem);
    wait_until(
        Duration::from_secs(15),
        "new handshakes get the new certificate",
        || {
            let new_der = new_der.clone();
            let pki = &pki;
            async move { served_certificate(address, pki).await == new_der }
        },
    )
    .await;
    run("after-rotation");
    let m = scrape(admin).await;
    let expiry = m.sum(
        "portcullis_certificate_expiry_seconds",
        &[("certificate", "listener")],
    );
    assert!(
        expiry > 3700.0,
        "expiry gauge still shows the old certificate: {expiry}"
    );
    assert!(
        m.sum(
            "portcullis_config_reloads_total",
            &[("what", "listener-tls"), ("outcome", "success")]
        ) >= 1.0
    );

    // A broken certificate file is refused; the rotated certificate stays in service.
    let failures_before = m.sum(
        "portcullis_config_reloads_total",
        &[("what", "listener-tls"), ("outcome", "failure")],
    );
    replace_file(&pki.server_cert, "not a certificate");
    wait_for_metric(
        admin,
        Duration::from_secs(15),
        "the broken reload is counted",
        (
            "portcullis_config_reloads_total",
            &[("what", "listener-tls"), ("outcome", "failure")],
        ),
        |n| n > failures_before,
    )
    .await;
    assert_eq!(served_certificate(address, &pki).await, new_der);
    run("after-broken-file");
    replace_file(&pki.server_cert, &rotated.cert_pem);

    // The client CA bundle: a client of a second CA is refused until that CA is added.
    let other_ca = CertAuthority::generate("second CA", Duration::from_secs(3600)).expect("CA");
    let other_client = other_ca
        .issue(&LeafSpec::new(
            "test-client",
            Usage::Client,
            Duration::from_secs(3600),
        ))
        .expect("client of the second CA");
    let other = ClientCert {
        cert: pki.dir.path().join("other-client.pem"),
        key: pki.dir.path().join("other-client-key.pem"),
    };
    std::fs::write(&other.cert, &other_client.cert_pem).expect("write");
    std::fs::write(&other.key, &other_client.key_pem).expect("write");
    assert!(tls_probe(address, &pki, Some(&other)).await.is_err());
    replace_file(
        &pki.ca_path,
        &format!("{}{}", pki.ca_pem(), other_ca.cert_pem),
    );
    wait_until(Duration::from_secs(15), "the second CA is trusted", || {
        let (pki, other) = (&pki, &other);
        async move { tls_probe(address, pki, Some(other)).await.is_ok() }
    })
    .await;
    // The original clients still get in.
    assert!(tls_probe(address, &pki, Some(&pki.client)).await.is_ok());
    run("after-ca-rotation");

    // No call failed while the worker stayed connected through all of it.
    let m = scrape(admin).await;
    let failed: Vec<_> = m
        .series("portcullis_calls_total")
        .into_iter()
        .filter(|(labels, _)| labels["code"] != "OK")
        .collect();
    assert!(
        failed.is_empty(),
        "calls failed during rotation: {failed:?}"
    );
    assert!(
        m.sum(
            "portcullis_calls_total",
            &[("method", "PollWorkflowTaskQueue"), ("code", "OK")]
        ) >= 4.0
    );
    assert!(
        worker.try_wait().expect("worker status").is_none(),
        "the worker died"
    );
    let _ = worker.kill().await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_never_contain_payloads_or_key_material() {
    use base64::Engine as _;

    let server = DevServer::start(&[]).await;
    let pki = Pki::new();
    let port = portcullis::dev::free_port().expect("port");
    let admin_port = portcullis::dev::free_port().expect("port");
    let mut config = proxy_config(&pki, &server.address(), &["default"]);
    config.listener.address = format!("127.0.0.1:{port}");
    let audit = pki.dir.path().join("audit.jsonl");
    config.authorization.audit_log = audit.display().to_string();
    with_admin(&mut config);
    if let Some(admin) = &mut config.admin {
        admin.listen = format!("127.0.0.1:{admin_port}");
    }
    let config_path = pki.dir.path().join("portcullis.toml");
    std::fs::write(&config_path, config.to_toml()).expect("write config");
    // Logs go elsewhere than the watched config directory (see init_logging in main.rs).
    let log_dir = tempfile::tempdir().expect("log dir");
    let stderr_path = log_dir.path().join("proxy.stderr");
    let stdout_path = log_dir.path().join("proxy.stdout");

    let mut proxy = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&config_path)
        .env("PORTCULLIS_LOG", "trace")
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).expect("stdout file"))
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
        .kill_on_drop(true)
        .spawn()
        .expect("start portcullis serve");
    let address: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin_port}").parse().expect("addr");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !try_http_get(admin, "/readyz")
        .await
        .is_ok_and(|(status, _)| status == 200)
    {
        if std::time::Instant::now() > deadline || proxy.try_wait().expect("status").is_some() {
            let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            let tail: Vec<_> = log.lines().rev().take(20).collect();
            panic!(
                "the proxy did not get ready; its last log lines:\n{}",
                tail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Every kind of payload carries the marker, through the proxy, at trace level.
    let marker = format!("logmarker{}", std::process::id());
    let mut args = client_args(address, &pki, &pki.client);
    args.extend(["--marker".into(), marker.clone()]);
    let result = run_python("markers.py", &args).await;
    assert!(
        result["kinds"].as_array().is_some_and(|k| k.len() >= 15),
        "{result}"
    );
    // The metrics output is searched like the logs.
    let metrics_text = scrape(admin).await.text;

    let pid = proxy.id().expect("pid").to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    let exit = tokio::time::timeout(Duration::from_secs(20), proxy.wait())
        .await
        .expect("the proxy exits")
        .expect("wait");
    assert!(exit.success(), "{exit}");

    let mut logs = metrics_text.into_bytes();
    for path in [&stderr_path, &stdout_path, &audit] {
        logs.extend(std::fs::read(path).unwrap_or_default());
        logs.push(b'\n');
    }
    let text = String::from_utf8_lossy(&logs);
    // The logs are real: trace level from every crate, and the per-call span's fields.
    let trace_lines = text
        .lines()
        .filter(|l| l.contains("\"level\":\"TRACE\""))
        .count();
    assert!(trace_lines > 100, "only {trace_lines} trace lines");
    assert!(
        text.lines().any(|l| l.contains("call finished")
            && l.contains("\"method\":\"StartWorkflowExecution\"")
            && l.contains("\"namespace\":\"default\"")
            && l.contains("\"identity\":\"cn:test-client\"")
            && l.contains("\"total_us\"")),
        "no per-call line with method, namespace, identity and duration"
    );
    assert!(text.contains("\"decision\":\"allow\""), "no audit lines");

    // No marker and no key-encryption key, in any encoding: raw, base64 at every alignment,
    // hex, percent-encoded, or printed as a list of byte values. The detector is first shown
    // to catch each of those.
    leak::assert_detects(marker.as_bytes());
    if let Some(form) = leak::find(&logs, marker.as_bytes()) {
        panic!("a payload marker reached the logs ({form})");
    }
    let keyring: toml::Table = toml::from_str(
        &std::fs::read_to_string(pki.dir.path().join("keyring.toml")).expect("keyring"),
    )
    .expect("keyring toml");
    let keys = keyring["keys"].as_array().expect("keys");
    assert!(!keys.is_empty());
    let b64 = base64::engine::general_purpose::STANDARD;
    for key in keys {
        let encoded = key["key_base64"].as_str().expect("key_base64");
        let raw = b64.decode(encoded).expect("base64 key");
        assert_eq!(raw.len(), 32);
        leak::assert_detects(&raw);
        if let Some(form) = leak::find(&logs, &raw) {
            panic!("a key-encryption key reached the logs ({form})");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_client_certificate_expiry_is_exported() {
    let pki = Pki::new();
    let upstream = FakeUpstream::start().await;
    let mut config = proxy_config(&pki, &upstream.address.to_string(), &["default"]);
    let client = pki.client_cert_with(LeafSpec::new(
        "proxy-upstream-identity",
        Usage::Client,
        Duration::from_secs(2 * 3600),
    ));
    config.upstreams.get_mut("temporal").expect("upstream").tls =
        Some(portcullis::config::UpstreamTls {
            ca: Some(pki.ca_path.clone()),
            server_name: Some("localhost".into()),
            cert: Some(client.cert.clone()),
            key: Some(client.key.clone()),
            ..Default::default()
        });
    with_admin(&mut config);
    let proxy = start_proxy(config).await;
    let admin = proxy.admin_addr().expect("admin");
    let m = scrape(admin).await;
    let expiry = m.sum(
        "portcullis_certificate_expiry_seconds",
        &[("certificate", "upstream/temporal")],
    );
    assert!((3600.0..=7200.0).contains(&expiry), "{expiry}\n{}", m.text);
    // The fake upstream speaks plaintext: the TLS handshake probe fails and readiness says so.
    wait_until(
        Duration::from_secs(15),
        "a readiness round",
        || async move {
            let (status, body) = readyz(admin).await;
            status == 503
                && body.contains("ok   certificate upstream/temporal")
                && body.contains("FAIL upstream temporal")
                && body.contains("TLS handshake")
        },
    )
    .await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_logs_name_the_failed_call() {
    let upstream = FakeUpstream::start().await;
    let pki = Pki::new();
    let port = portcullis::dev::free_port().expect("port");
    let mut config = proxy_config(&pki, &upstream.address.to_string(), &["default"]);
    config.listener.address = format!("127.0.0.1:{port}");
    let config_path = pki.dir.path().join("portcullis.toml");
    std::fs::write(&config_path, config.to_toml()).expect("write config");
    let stderr_path = pki.dir.path().join("proxy.stderr");
    let mut proxy = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["serve", "--config"])
        .arg(&config_path)
        .env_remove("PORTCULLIS_LOG")
        .env_remove("PORTCULLIS_LOG_FORMAT")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
        .kill_on_drop(true)
        .spawn()
        .expect("start portcullis serve");
    let address: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    wait_until(Duration::from_secs(30), "listening", || async move {
        tokio::net::TcpStream::connect(address).await.is_ok()
    })
    .await;
    let stranger = pki.client_cert("stranger");
    let mut client = workflow_client(address, &pki, &stranger).await;
    let denied = client
        .describe_namespace(describe("default"))
        .await
        .expect_err("denied");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let mut client = workflow_client(address, &pki, &pki.client).await;
    client
        .describe_namespace(describe("default"))
        .await
        .expect("allowed");
    let pid = proxy.id().expect("pid").to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    tokio::time::timeout(Duration::from_secs(20), proxy.wait())
        .await
        .expect("exits")
        .expect("wait");
    let log = std::fs::read_to_string(&stderr_path).expect("log");
    let failed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("call failed in proxy"))
        .collect();
    assert_eq!(failed.len(), 1, "{log}");
    for field in [
        "method=\"DescribeNamespace\"",
        "namespace=\"default\"",
        "identity=\"cn:stranger\"",
        "code=\"PERMISSION_DENIED\"",
        "total_us=",
        "may not call DescribeNamespace",
    ] {
        let plain = strip_ansi(failed[0]);
        assert!(plain.contains(field), "{field} missing: {plain}");
    }
    // Successful calls are not logged at info.
    assert!(!log.contains("call finished"), "{log}");
}

/// Drops terminal color codes from a text log line.
fn strip_ansi(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn poll_activities(queue: &str) -> tonic::Request<wf::PollActivityTaskQueueRequest> {
    let mut request = tonic::Request::new(wf::PollActivityTaskQueueRequest {
        namespace: "default".into(),
        task_queue: Some(
            temporalio_protos::protos::temporal::api::taskqueue::v1::TaskQueue {
                name: queue.into(),
                ..Default::default()
            },
        ),
        identity: "lifetime-test".into(),
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(60));
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_revoked_client_certificates_lose_their_connections() {
    let server = DevServer::start(&[]).await;
    let pki = Pki::new();
    let crl = pki.dir.path().join("clients.crl.pem");
    std::fs::write(&crl, pki.ca.revocation_list(1, &[]).expect("crl").pem).expect("write");
    let audit = pki.dir.path().join("audit.jsonl");
    let mut config = proxy_config_with_authz(
        &pki,
        &server.address(),
        &["default"],
        &format!(
            "audit_log = \"{}\"\nidentity = [\"cn\"]\nsystem.admins = [\"cn:test-client\", \"cn:victim\", \"cn:short-lived\"]",
            audit.display()
        ),
    );
    config.listener.tls.as_mut().expect("tls").crls = vec![crl.clone()];
    with_admin(&mut config);
    let proxy = start_proxy(config).await;
    let address = proxy.local_addr().expect("tcp");
    let admin = proxy.admin_addr().expect("admin");
    let reloads = |m: &Scrape, outcome: &str| {
        m.sum(
            "portcullis_config_reloads_total",
            &[("what", "listener-tls"), ("outcome", outcome)],
        )
    };

    let victim = pki.client_cert("victim");
    let victim_pem = std::fs::read_to_string(&victim.cert).expect("victim cert");
    // Valid for 12 s from now: the revocation steps below fit in that.
    let short = pki.client_cert_with(LeafSpec::new(
        "short-lived",
        Usage::Client,
        Duration::from_secs(12),
    ));
    let expires = std::time::Instant::now() + Duration::from_secs(12);
    let mut bystander = workflow_client(address, &pki, &pki.client).await;
    let mut victim_client = workflow_client(address, &pki, &victim).await;
    let mut short_client = workflow_client(address, &pki, &short).await;
    for client in [&mut bystander, &mut victim_client, &mut short_client] {
        client
            .get_system_info(wf::GetSystemInfoRequest::default())
            .await
            .expect("every certificate works before");
    }

    // Revoke the victim while a long poll runs on its connection.
    let mut poller = victim_client.clone();
    let poll = tokio::spawn(async move {
        poller
            .poll_activity_task_queue(poll_activities("victim-queue"))
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let successes = reloads(&scrape(admin).await, "success");
    replace_file(
        &crl,
        &pki.ca.revocation_list(2, &[&victim_pem]).expect("crl").pem,
    );
    let status = tokio::time::timeout(Duration::from_secs(15), poll)
        .await
        .expect("the victim's poll was not cut")
        .expect("join")
        .expect_err("cut");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("revoked"), "{status:?}");
    let m = scrape(admin).await;
    assert!(reloads(&m, "success") > successes);
    assert_eq!(
        m.sum(
            "portcullis_closed_connections_total",
            &[("reason", "certificate_revoked")]
        ),
        1.0
    );
    // Its channel cannot reconnect; new handshakes are refused; others are unaffected.
    victim_client
        .get_system_info(wf::GetSystemInfoRequest::default())
        .await
        .expect_err("revoked");
    let refusal = tls_probe(address, &pki, Some(&victim))
        .await
        .expect_err("revoked handshake");
    assert!(refusal.contains("CertificateRevoked"), "{refusal}");
    bystander
        .get_system_info(wf::GetSystemInfoRequest::default())
        .await
        .expect("the bystander's open connection");

    // A malformed CRL is refused: the last good one stays in force.
    let failures = reloads(&scrape(admin).await, "failure");
    replace_file(
        &crl,
        "-----BEGIN X509 CRL-----\nbm90IGEgY3Js\n-----END X509 CRL-----\n",
    );
    wait_until(
        Duration::from_secs(15),
        "the malformed CRL is refused",
        || async move { reloads(&scrape(admin).await, "failure") > failures },
    )
    .await;
    assert!(tls_probe(address, &pki, Some(&victim)).await.is_err());
    assert_eq!(tls_probe(address, &pki, Some(&pki.client)).await, Ok(()));
    assert_eq!(tls_probe(address, &pki, Some(&short)).await, Ok(()));

    // Expiry: a call in flight at the certificate's notAfter is cut, the connection closed,
    // and the certificate cannot come back.
    short_client
        .get_system_info(wf::GetSystemInfoRequest::default())
        .await
        .expect("still valid");
    assert!(
        std::time::Instant::now() < expires,
        "the test ran too slowly"
    );
    let status = tokio::time::timeout(
        Duration::from_secs(20),
        short_client.poll_activity_task_queue(poll_activities("short-queue")),
    )
    .await
    .expect("the poll outlived the certificate")
    .expect_err("cut at expiry");
    let now = std::time::Instant::now();
    assert!(
        now + Duration::from_secs(2) >= expires,
        "cut {:?} before the certificate expired",
        expires - now
    );
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("expired"), "{status:?}");
    short_client
        .get_system_info(wf::GetSystemInfoRequest::default())
        .await
        .expect_err("expired");
    let refusal = tls_probe(address, &pki, Some(&short))
        .await
        .expect_err("expired handshake");
    assert!(refusal.contains("CertificateExpired"), "{refusal}");
    bystander
        .get_system_info(wf::GetSystemInfoRequest::default())
        .await
        .expect("the bystander still");
    let m = scrape(admin).await;
    assert_eq!(
        m.sum(
            "portcullis_closed_connections_total",
            &[("reason", "certificate_expired")]
        ),
        1.0
    );

    // Every one of these is in the audit log.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .expect("audit")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let has = |event: &str, reason: &str, subject: Option<&str>| {
        lines.iter().any(|l| {
            l["event"] == event
                && l["reason"] == reason
                && subject.is_none_or(|s| l["subject"].as_str().is_some_and(|v| v.contains(s)))
        })
    };
    assert!(has(
        "connection_closed",
        "certificate_revoked",
        Some("CN=victim")
    ));
    assert!(has(
        "connection_closed",
        "certificate_expired",
        Some("CN=short-lived")
    ));
    assert!(has("connection_refused", "certificate_revoked", None));
    assert!(has("connection_refused", "certificate_expired", None));
    assert!(lines
        .iter()
        .any(|l| l["event"] == "decision" && l["identity"] == "cn:victim"));
    proxy.shutdown().await;
}
