//! Bearer-token (JWT) authentication against a real Temporal dev server, with the `temporal` CLI
//! (`--api-key`) and the Python SDK (`api_key=`), for callers without a client certificate.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use common::jwt::{forged_token, Issuer, JwksServer, AUDIENCE};
use common::*;
use prost::Message;

const POLICY: &str = r#"
audit_log = "AUDIT"
identity = ["spiffe", "cn"]

[system]
admins = ["cn:root"]

# Policies apply to token identities too: bob reads alpha without any permission claim.
[[namespaces]]
name = "alpha"
readers = ["jwt:bob"]
"#;

/// Runs the CLI without a client certificate, optionally with `--api-key`.
fn cli(address: SocketAddr, pki: &Pki, token: Option<&str>, args: &[&str]) -> (bool, String) {
    let mut command = std::process::Command::new(temporal_binary());
    command
        .args(args)
        .args(["--address", &address.to_string()])
        .args(["--tls-ca-path", &pki.ca_path.display().to_string()])
        .args(["--tls-server-name", "localhost"])
        .stdin(Stdio::null());
    if let Some(token) = token {
        command.args(["--api-key", token]);
    }
    let output = command.output().expect("run temporal CLI");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

fn assert_unauthenticated((ok, text): (bool, String), what: &str) {
    assert!(!ok, "{what} should have been refused: {text}");
    assert!(
        text.contains("Unauthenticated") || text.contains("unauthenticated"),
        "{what}: expected UNAUTHENTICATED: {text}"
    );
}

fn describe(workflow_id: &str) -> Vec<String> {
    [
        "workflow",
        "describe",
        "--namespace",
        "alpha",
        "--workflow-id",
        workflow_id,
    ]
    .map(String::from)
    .to_vec()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_authenticate_callers_without_certificates() {
    let server = DevServer::start(&["alpha"]).await;
    let pki = Pki::new();
    let issuer = Issuer::new(&pki);
    // The JWKS comes from an HTTPS URL here (the file is covered by the other test).
    let jwks = JwksServer::start(&pki, issuer.key.jwks()).await;
    let audit = pki.dir.path().join("audit.jsonl");
    let mut config = proxy_config_with_authz(
        &pki,
        &server.address(),
        &["alpha"],
        &POLICY.replace("AUDIT", &audit.display().to_string()),
    );
    config.bearer = Some(
        toml::from_str(&format!(
            "issuer = \"{}\"\naudience = [\"other\", \"{AUDIENCE}\"]\njwks_url = \"{}\"\njwks_ca = \"{}\"\n",
            common::jwt::ISSUER,
            jwks.url(),
            pki.ca_path.display()
        ))
        .expect("bearer"),
    );
    let proxy = start_proxy(config).await;
    let address = proxy.local_addr().expect("tcp");
    assert!(jwks.fetches.load(std::sync::atomic::Ordering::SeqCst) >= 1);

    let writer = issuer.token("carol@example.com", &["alpha:write"]);
    let reader = issuer.token("dave@example.com", &["alpha:read"]);

    // A writer token runs a whole workflow with the Python SDK (worker and client, api_key=).
    let mut args = vec![
        "--address".to_string(),
        address.to_string(),
        "--ca".into(),
        pki.ca_path.display().to_string(),
        "--server-name".into(),
        "localhost".into(),
        "--namespace".into(),
        "alpha".into(),
        "--api-key".into(),
        writer.clone(),
    ];
    let result = run_python("scenario.py", &args).await;
    let workflow_id = result["workflow_id"].as_str().expect("id").to_string();

    // The CLI with --api-key: the writer starts, the reader describes but cannot start.
    let start = |id: &str| {
        [
            "workflow",
            "start",
            "--namespace",
            "alpha",
            "--type",
            "Idle",
            "--task-queue",
            "none",
            "--workflow-id",
            id,
        ]
        .map(String::from)
        .to_vec()
    };
    let (ok, text) = cli(address, &pki, Some(&writer), &strs(&start("w-1")));
    assert!(ok, "writer start: {text}");
    let (ok, text) = cli(address, &pki, Some(&reader), &strs(&describe(&workflow_id)));
    assert!(ok && text.contains("COMPLETED"), "reader describe: {text}");
    let (ok, text) = cli(address, &pki, Some(&reader), &strs(&start("r-1")));
    assert!(
        !ok && text.contains("dave@example.com") && text.contains("writer"),
        "reader start must be PERMISSION_DENIED naming the identity and role: {text}"
    );
    // Policies apply to token identities: bob holds no permission claim but the policy's reader.
    let bob = issuer.token("bob", &[]);
    let (ok, text) = cli(address, &pki, Some(&bob), &strs(&describe(&workflow_id)));
    assert!(ok, "bob via policy: {text}");
    // A token whose subject is spelled like a certificate's name is `jwt:root`, not the
    // certificate identity `cn:root` that administers the cluster: it inherits nothing.
    let root_token = issuer.token("root", &[]);
    let (ok, text) = cli(
        address,
        &pki,
        Some(&root_token),
        &["operator", "cluster", "list"],
    );
    assert!(
        !ok && text.contains("jwt:root") && text.contains("admin"),
        "a token subject must not inherit a certificate's grants: {text}"
    );
    // A system admin claim reaches OperatorService cluster methods.
    let admin = issuer.token("ops", &["temporal-system:admin"]);
    let (ok, text) = cli(
        address,
        &pki,
        Some(&admin),
        &["operator", "cluster", "list"],
    );
    assert!(ok, "system admin token: {text}");
    // Python with a read-only token can describe but not start.
    args.pop();
    args.push(reader.clone());
    args.extend(["--workflow-id".into(), workflow_id.clone()]);
    let read_only = run_python("read_only.py", &args).await;
    assert_eq!(read_only["described"], true, "{read_only}");
    assert_eq!(
        read_only["start_refused"], "PERMISSION_DENIED",
        "{read_only}"
    );

    // Expired, wrong audience, wrong signature, garbage, none: UNAUTHENTICATED.
    let expired = issuer.token_with("carol@example.com", &["alpha:write"], AUDIENCE, -3600);
    let wrong_audience =
        issuer.token_with("carol@example.com", &["alpha:write"], "other-app", 3600);
    let forged = forged_token("carol@example.com", &["alpha:write"]);
    for (what, token) in [
        ("expired", Some(expired.as_str())),
        ("wrong audience", Some(wrong_audience.as_str())),
        ("wrong signature", Some(forged.as_str())),
        ("garbage", Some("not-a-jwt")),
        ("no token and no certificate", None),
    ] {
        assert_unauthenticated(
            cli(address, &pki, token, &strs(&describe(&workflow_id))),
            what,
        );
    }

    // Certificates still work on the same listener.
    let (ok, out, err) = temporal_cli(
        address,
        &pki,
        &pki.client_cert("root"),
        &strs(&describe(&workflow_id)),
    );
    assert!(ok, "certificate caller: {out}{err}");

    // Audit lines name the token's identity and how it authenticated.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let audit = std::fs::read_to_string(&audit).expect("audit");
    let events: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert!(events
        .iter()
        .any(|e| e["identity"] == "jwt:carol@example.com"
            && e["credential"] == "bearer"
            && e["decision"] == "allow"));
    assert!(events
        .iter()
        .any(|e| e["identity"] == "jwt:dave@example.com"
            && e["credential"] == "bearer"
            && e["decision"] == "deny"));
    assert!(events
        .iter()
        .any(|e| e["identity"] == "cn:root" && e["credential"] == "certificate"));
    // So are the calls refused at their headers, with why and what was presented.
    let refused = |reason: &str, credential: &str| {
        events.iter().any(|e| {
            e["event"] == "authentication_failed"
                && e["reason"] == reason
                && e["credential"] == credential
                && e["method"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("/temporal.api.workflowservice.v1."))
                && e["peer"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("127.0.0.1:"))
        })
    };
    assert!(refused("invalid_token", "bearer"), "{audit}");
    assert!(refused("no_credential", "none"), "{audit}");
    assert!(events.iter().any(|e| e["event"] == "authentication_failed"
        && e["detail"]
            .as_str()
            .is_some_and(|d| d == "token has expired")));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_not_forwarded_and_certificates_stay_required_without_bearer() {
    let upstream = FakeUpstream::start().await;
    let pki = Pki::new();
    let issuer = Issuer::new(&pki);
    let mut config = proxy_config(&pki, &upstream.address.to_string(), &["default"]);
    let mut bearer = issuer.bearer_config();
    // No clock-skew allowance: a call ends at the token's exp exactly.
    bearer.leeway_seconds = 0;
    config.bearer = Some(bearer);
    let proxy = start_proxy(config).await;
    let address = proxy.local_addr().expect("tcp");
    let token = issuer.token("test-client", &["default:write"]);
    let raw = RawClient::new(address, &pki, &pki.client);
    let body = grpc_frame(
        &wf::DescribeNamespaceRequest {
            namespace: "default".into(),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    const DESCRIBE: &str = "/temporal.api.workflowservice.v1.WorkflowService/DescribeNamespace";
    let bearer = format!("Bearer {token}");
    let answer = raw
        .call(
            DESCRIBE,
            &[("authorization", bearer.as_str())],
            body.clone(),
        )
        .await;
    assert_eq!(answer.grpc_status(), Some(0), "{}", answer.grpc_message());
    let seen = upstream.seen.lock().expect("lock").clone();
    assert!(!seen.is_empty());
    for headers in &seen {
        assert!(
            headers.get("authorization").is_none(),
            "the caller's token reached the upstream: {headers:?}"
        );
    }
    // A bad token is refused even with a good certificate: no silent fallback.
    let answer = raw
        .call(DESCRIBE, &[("authorization", "Bearer nope")], body.clone())
        .await;
    assert_eq!(
        answer.grpc_status(),
        Some(tonic::Code::Unauthenticated as i32)
    );
    let answer = raw
        .call(DESCRIBE, &[("authorization", "Basic dXNlcjpwYXNz")], body)
        .await;
    assert_eq!(
        answer.grpc_status(),
        Some(tonic::Code::Unauthenticated as i32)
    );
    // Nothing runs past the token's expiry: a poll held upstream ends with UNAUTHENTICATED at
    // exp, and its upstream call is cancelled.
    let short = format!(
        "Bearer {}",
        issuer.token_with("test-client", &["default:write"], AUDIENCE, 2)
    );
    let poll = wf::PollWorkflowTaskQueueRequest {
        namespace: "default".into(),
        task_queue: Some(
            temporalio_protos::protos::temporal::api::taskqueue::v1::TaskQueue {
                name: "exp".into(),
                ..Default::default()
            },
        ),
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let answer = raw
        .call(
            "/temporal.api.workflowservice.v1.WorkflowService/PollWorkflowTaskQueue",
            &[("authorization", short.as_str())],
            grpc_frame(&poll.encode_to_vec()),
        )
        .await;
    let took = started.elapsed();
    assert_eq!(
        answer.grpc_status(),
        Some(tonic::Code::Unauthenticated as i32),
        "{}",
        answer.grpc_message()
    );
    assert!(
        answer.grpc_message().contains("expired during the call"),
        "{}",
        answer.grpc_message()
    );
    assert!(took < Duration::from_secs(4), "cut after {took:?}");
    assert_eq!(upstream.held.load(std::sync::atomic::Ordering::SeqCst), 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while upstream.cancelled.load(std::sync::atomic::Ordering::SeqCst) < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the upstream poll outlived the token"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // With bearer on, the handshake accepts a caller without a certificate ...
    assert!(tls_probe(address, &pki, None).await.is_ok());
    proxy.shutdown().await;

    // ... and without it the handshake still refuses one.
    let proxy = start_proxy(proxy_config(
        &pki,
        &upstream.address.to_string(),
        &["default"],
    ))
    .await;
    let address = proxy.local_addr().expect("tcp");
    let refusal = tls_probe(address, &pki, None)
        .await
        .expect_err("no client certificate without [bearer]");
    assert!(refusal.contains("CertificateRequired"), "{refusal}");
    proxy.shutdown().await;
}
