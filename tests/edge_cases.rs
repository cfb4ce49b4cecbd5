//! What happens at the edges: handshakes that must fail, malformed input, limits, namespaces,
//! deadlines, header rules, and an upstream that goes away and comes back.

mod common;

use std::time::{Duration, Instant};

use common::*;
use portcullis::tls::pki::{CertAuthority, LeafSpec, Usage};
use prost::Message;
use tonic::Code;

fn describe_namespace(namespace: &str) -> Vec<u8> {
    wf::DescribeNamespaceRequest {
        namespace: namespace.into(),
        ..Default::default()
    }
    .encode_to_vec()
}

const DESCRIBE: &str = "/temporal.api.workflowservice.v1.WorkflowService/DescribeNamespace";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_refuses_missing_foreign_and_expired_client_certificates() {
    let server = DevServer::start(&[]).await;
    let pki = Pki::new();
    let proxy = start_proxy(proxy_config(&pki, &server.address(), &["default"])).await;
    let address = proxy.local_addr().expect("tcp");

    // The valid certificate works, so the refusals below are about the certificates.
    let mut good = workflow_client(address, &pki, &pki.client).await;
    good.get_system_info(wf::GetSystemInfoRequest::default())
        .await
        .expect("valid client works");

    assert_eq!(tls_probe(address, &pki, Some(&pki.client)).await, Ok(()));

    let other_ca = CertAuthority::generate("other CA", Duration::from_secs(3600)).expect("ca");
    let foreign = other_ca
        .issue(&LeafSpec::new(
            "intruder",
            Usage::Client,
            Duration::from_secs(3600),
        ))
        .expect("cert");
    let foreign_paths = ClientCert {
        cert: pki.dir.path().join("foreign.pem"),
        key: pki.dir.path().join("foreign-key.pem"),
    };
    std::fs::write(&foreign_paths.cert, foreign.cert_pem).expect("write");
    std::fs::write(&foreign_paths.key, foreign.key_pem).expect("write");

    let mut spec = LeafSpec::new("expired", Usage::Client, Duration::from_secs(3600));
    spec.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(2);
    spec.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let expired = pki.client_cert_with(spec);

    for (what, client, alert) in [
        ("no client certificate", None, "CertificateRequired"),
        (
            "certificate from another CA",
            Some(&foreign_paths),
            "UnknownCA",
        ),
        ("expired certificate", Some(&expired), "CertificateExpired"),
    ] {
        let refusal = tls_probe(address, &pki, client).await.expect_err(what);
        assert!(
            refusal.contains(alert),
            "{what}: expected a {alert} alert, got {refusal}"
        );
        // A real client sees the refusal as a failed call.
        if let Ok(channel) = tls_channel(address, &pki, client).await {
            wf::workflow_service_client::WorkflowServiceClient::new(channel)
                .get_system_info(wf::GetSystemInfoRequest::default())
                .await
                .expect_err(what);
        }
    }

    // The proxy still serves the good client.
    good.get_system_info(wf::GetSystemInfoRequest::default())
        .await
        .expect("still serving");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_gets_a_clear_status_and_the_proxy_keeps_serving() {
    let server = DevServer::start(&[]).await;
    let pki = Pki::new();
    let mut config = proxy_config(&pki, &server.address(), &["default"]);
    config.limits.max_request_bytes = 64 * 1024;
    let proxy = start_proxy(config).await;
    let address = proxy.local_addr().expect("tcp");
    let raw = RawClient::new(address, &pki, &pki.client);

    // (what, path, headers, body, expected code, text the message must contain)
    type Case<'a> = (
        &'a str,
        &'a str,
        Vec<(&'a str, &'a str)>,
        Vec<u8>,
        Code,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "truncated frame header",
            DESCRIBE,
            vec![],
            vec![0, 0, 0],
            Code::InvalidArgument,
            "malformed gRPC framing",
        ),
        (
            "length beyond body",
            DESCRIBE,
            vec![],
            vec![0, 0, 0, 0, 50, 1, 2],
            Code::InvalidArgument,
            "shorter than",
        ),
        (
            "two messages",
            DESCRIBE,
            vec![],
            [grpc_frame(&describe_namespace("default")), grpc_frame(&[])].concat(),
            Code::InvalidArgument,
            "more than one message",
        ),
        (
            "empty body",
            DESCRIBE,
            vec![],
            vec![],
            Code::InvalidArgument,
            "no request message",
        ),
        (
            "bad protobuf",
            DESCRIBE,
            vec![],
            grpc_frame(&[0x0a, 0x40, b'x']),
            Code::InvalidArgument,
            "malformed protobuf",
        ),
        (
            "bad wire type",
            DESCRIBE,
            vec![],
            grpc_frame(&[0x0f, 0x01]),
            Code::InvalidArgument,
            "malformed protobuf",
        ),
        (
            "bad gzip",
            DESCRIBE,
            vec![("grpc-encoding", "gzip")],
            vec![1, 0, 0, 0, 3, 1, 2, 3],
            Code::InvalidArgument,
            "gzip",
        ),
        (
            "unknown compression",
            DESCRIBE,
            vec![("grpc-encoding", "br")],
            grpc_frame(&describe_namespace("default")),
            Code::Unimplemented,
            "grpc-encoding",
        ),
        (
            "oversized",
            DESCRIBE,
            vec![],
            grpc_frame(&vec![0u8; 100 * 1024]),
            Code::ResourceExhausted,
            "exceeds the limit",
        ),
        (
            "unknown method",
            "/temporal.api.workflowservice.v1.WorkflowService/NoSuchMethod",
            vec![],
            grpc_frame(&[]),
            Code::Unimplemented,
            "unknown method",
        ),
        (
            "other service",
            "/some.Other/Method",
            vec![],
            grpc_frame(&[]),
            Code::Unimplemented,
            "unknown method",
        ),
        (
            "streaming health watch",
            "/grpc.health.v1.Health/Watch",
            vec![],
            grpc_frame(&[]),
            Code::Unimplemented,
            "streaming",
        ),
        (
            "bad timeout",
            DESCRIBE,
            vec![("grpc-timeout", "soon")],
            grpc_frame(&describe_namespace("default")),
            Code::InvalidArgument,
            "grpc-timeout",
        ),
        (
            "missing namespace",
            DESCRIBE,
            vec![],
            grpc_frame(&[]),
            Code::InvalidArgument,
            "namespace is required",
        ),
        (
            "header/body mismatch",
            DESCRIBE,
            vec![("temporal-namespace", "other")],
            grpc_frame(&describe_namespace("default")),
            Code::InvalidArgument,
            "does not match",
        ),
        (
            "unknown namespace",
            DESCRIBE,
            vec![],
            grpc_frame(&describe_namespace("nope")),
            Code::NotFound,
            "not served by this proxy",
        ),
    ];
    for (what, path, headers, body, code, text) in cases {
        let response = raw.call(path, &headers, body).await;
        assert_eq!(
            response.grpc_status(),
            Some(code as i32),
            "{what}: {}",
            response.grpc_message()
        );
        assert!(
            response.grpc_message().contains(text),
            "{what}: {:?}",
            response.grpc_message()
        );
        // And the proxy is fine after each one.
        let ok = raw
            .call(DESCRIBE, &[], grpc_frame(&describe_namespace("default")))
            .await;
        assert_eq!(
            ok.grpc_status(),
            Some(0),
            "{what} broke the proxy: {}",
            ok.grpc_message()
        );
    }

    // A gzip-compressed request is decompressed; the response is compressed back.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &describe_namespace("default")).expect("gzip");
    let compressed = gz.finish().expect("gzip");
    let mut body = vec![1u8];
    body.extend_from_slice(&(compressed.len() as u32).to_be_bytes());
    body.extend_from_slice(&compressed);
    let response = raw
        .call(
            DESCRIBE,
            &[("grpc-encoding", "gzip"), ("grpc-accept-encoding", "gzip")],
            body,
        )
        .await;
    assert_eq!(
        response.grpc_status(),
        Some(0),
        "{}",
        response.grpc_message()
    );
    assert_eq!(
        response.headers.get("grpc-encoding").map(|v| v.as_bytes()),
        Some(&b"gzip"[..])
    );
    assert_eq!(response.body[0], 1, "response frame is compressed");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_and_details_from_the_upstream_pass_through() {
    let server = DevServer::start(&[]).await;
    let pki = Pki::new();
    let proxy = start_proxy(proxy_config(&pki, &server.address(), &["default"])).await;
    let address = proxy.local_addr().expect("tcp");
    let mut client = workflow_client(address, &pki, &pki.client).await;

    let status = client
        .describe_workflow_execution(wf::DescribeWorkflowExecutionRequest {
            namespace: "default".into(),
            execution: Some(
                temporalio_protos::protos::temporal::api::common::v1::WorkflowExecution {
                    workflow_id: "does-not-exist".into(),
                    run_id: String::new(),
                },
            ),
        })
        .await
        .expect_err("no such workflow");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(
        status.message().contains("does-not-exist") || status.message().contains("not found"),
        "{status:?}"
    );
    // Temporal attaches a typed failure (NotFoundFailure) in grpc-status-details-bin.
    assert!(
        !status.details().is_empty(),
        "error details were lost: {status:?}"
    );

    // Deadlines: a long poll with a 5 s deadline ends by then, not after the 60 s poll.
    // (Temporal refuses poll deadlines under ~2 s as "too short".)
    let started = Instant::now();
    let mut request = tonic::Request::new(wf::PollActivityTaskQueueRequest {
        namespace: "default".into(),
        task_queue: Some(
            temporalio_protos::protos::temporal::api::taskqueue::v1::TaskQueue {
                name: "deadline-tq".into(),
                ..Default::default()
            },
        ),
        identity: "deadline-test".into(),
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(5));
    let result = client.poll_activity_task_queue(request).await;
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(8),
        "deadline not honoured: {elapsed:?}"
    );
    // Temporal answers an expiring poll with an empty response or DEADLINE_EXCEEDED.
    match result {
        Ok(response) => assert!(response.get_ref().task_token.is_empty()),
        Err(status) => assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}"),
    }

    // A query nobody answers: the server resets the stream (RST_STREAM CANCEL) as the deadline
    // runs out, a moment before the proxy's own timer. The caller hears DEADLINE_EXCEEDED, as
    // gRPC prescribes, never UNAVAILABLE (which clients would retry). A raw client, because
    // tonic would enforce the deadline itself.
    client
        .start_workflow_execution(wf::StartWorkflowExecutionRequest {
            namespace: "default".into(),
            workflow_id: "nobody-answers".into(),
            workflow_type: Some(
                temporalio_protos::protos::temporal::api::common::v1::WorkflowType {
                    name: "Unserved".into(),
                },
            ),
            task_queue: Some(
                temporalio_protos::protos::temporal::api::taskqueue::v1::TaskQueue {
                    name: "no-worker".into(),
                    ..Default::default()
                },
            ),
            request_id: "nobody-answers".into(),
            ..Default::default()
        })
        .await
        .expect("start");
    let raw = RawClient::new(address, &pki, &pki.client);
    let query = wf::QueryWorkflowRequest {
        namespace: "default".into(),
        execution: Some(
            temporalio_protos::protos::temporal::api::common::v1::WorkflowExecution {
                workflow_id: "nobody-answers".into(),
                run_id: String::new(),
            },
        ),
        query: Some(
            temporalio_protos::protos::temporal::api::query::v1::WorkflowQuery {
                query_type: "state".into(),
                ..Default::default()
            },
        ),
        ..Default::default()
    };
    for timeout in ["5S", "3S"] {
        let answer = raw
            .call(
                &format!("{WORKFLOW_SERVICE}/QueryWorkflow"),
                &[("grpc-timeout", timeout)],
                grpc_frame(&query.encode_to_vec()),
            )
            .await;
        assert_eq!(
            answer.grpc_status(),
            Some(Code::DeadlineExceeded as i32),
            "query with {timeout}: {}",
            answer.grpc_message()
        );
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_outage_is_unavailable_and_recovers_without_restart() {
    let server = DevServer::start(&[]).await;
    let pki = Pki::new();
    let proxy = start_proxy(proxy_config(&pki, &server.address(), &["default"])).await;
    let address = proxy.local_addr().expect("tcp");
    let mut client = workflow_client(address, &pki, &pki.client).await;
    let describe = || wf::DescribeNamespaceRequest {
        namespace: "default".into(),
        ..Default::default()
    };
    client.describe_namespace(describe()).await.expect("up");

    let (port, dir) = server.stop().await;
    let status = client
        .describe_namespace(describe())
        .await
        .expect_err("upstream is down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("upstream temporal"),
        "unclear message: {status:?}"
    );
    // Cluster-scoped calls fail the same way, and the proxy itself stays up.
    let status = client
        .get_system_info(wf::GetSystemInfoRequest::default())
        .await
        .expect_err("down");
    assert_eq!(status.code(), Code::Unavailable);

    let _server = DevServer::start_on(port, dir, &[]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match client.describe_namespace(describe()).await {
            Ok(response) => {
                assert_eq!(
                    response
                        .get_ref()
                        .namespace_info
                        .as_ref()
                        .map(|i| i.name.as_str()),
                    Some("default")
                );
                break;
            }
            Err(status) if Instant::now() < deadline => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(status) => panic!("no recovery after the upstream came back: {status:?}"),
        }
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_forwarded_faithfully() {
    let upstream = FakeUpstream::start().await;
    let pki = Pki::new();
    let proxy = start_proxy(proxy_config(
        &pki,
        &upstream.address.to_string(),
        &["default"],
    ))
    .await;
    let raw = RawClient::new(proxy.local_addr().expect("tcp"), &pki, &pki.client);
    let response = raw
        .call(
            DESCRIBE,
            &[
                ("client-name", "temporal-go"),
                ("client-version", "1.30.0"),
                ("supported-server-versions", ">=1.0.0"),
                ("temporal-principal-id", "admin"),
                ("temporal-principal-type", "user"),
                ("portcullis-identity", "spiffe://spoofed/admin"),
                ("grpc-timeout", "20S"),
                ("x-custom", "kept"),
            ],
            grpc_frame(&describe_namespace("default")),
        )
        .await;
    assert_eq!(
        response.grpc_status(),
        Some(0),
        "{}",
        response.grpc_message()
    );
    assert_eq!(
        response.headers.get("x-upstream").map(|v| v.as_bytes()),
        Some(&b"fake"[..])
    );
    let seen = upstream
        .seen
        .lock()
        .expect("lock")
        .pop()
        .expect("a request reached the upstream");
    // Kept, with exactly the values sent (and each once).
    for (kept, value) in [
        ("client-name", "temporal-go"),
        ("client-version", "1.30.0"),
        ("supported-server-versions", ">=1.0.0"),
        ("x-custom", "kept"),
    ] {
        let values: Vec<_> = seen.get_all(kept).iter().collect();
        assert_eq!(values, [value], "{kept}: {seen:?}");
    }
    assert_eq!(
        seen["temporal-namespace"], "default",
        "namespace header set from the body"
    );
    assert!(
        !seen
            .keys()
            .any(|k| k.as_str().starts_with("temporal-principal-")),
        "{seen:?}"
    );
    let timeout =
        portcullis::grpc::headers::parse_timeout(&seen["grpc-timeout"]).expect("timeout forwarded");
    assert!(
        timeout <= Duration::from_secs(20) && timeout > Duration::from_secs(18),
        "{timeout:?}"
    );
    assert_eq!(seen["te"], "trailers");
    // The verified identity replaces whatever the caller claimed.
    let identities: Vec<_> = seen.get_all("portcullis-identity").iter().collect();
    assert_eq!(identities, ["cn:test-client"], "{seen:?}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_time_out_and_connections_beyond_the_limit_are_refused() {
    let upstream = FakeUpstream::start().await;
    let pki = Pki::new();
    let mut config = proxy_config(&pki, &upstream.address.to_string(), &["default"]);
    config.limits.body_timeout_seconds = 1;
    config.limits.max_connections = 3;
    let proxy = start_proxy(config).await;
    let address = proxy.local_addr().expect("tcp");
    let metric = |name: &str| {
        let text = proxy.telemetry().encode();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
    };

    // A slow sender: the headers and the message's prefix, then one byte every 200 ms.
    let mut slow = h2_connect(address, &pki, Some(&pki.client))
        .await
        .expect("connect");
    let framed = bytes::Bytes::from(grpc_frame(&describe_namespace("default")));
    let (response, mut stream) = slow
        .send
        .send_request(grpc_head(DESCRIBE, &[]), false)
        .expect("stream");
    stream.send_data(framed.slice(..6), false).expect("send");
    let trickle = tokio::spawn(async move {
        for i in 6..framed.len() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if stream.send_data(framed.slice(i..i + 1), false).is_err() {
                break;
            }
        }
    });
    let started = Instant::now();
    let (code, message) = h2_grpc_status(response).await.expect("answer");
    let took = started.elapsed();
    assert_eq!(code, Code::DeadlineExceeded as i32, "{message}");
    assert!(
        message.contains("request body did not arrive within 1s"),
        "{message}"
    );
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(3),
        "cut after {took:?}"
    );
    trickle.abort();
    assert_eq!(
        metric("portcullis_refused_requests_total{reason=\"body_timeout\"}"),
        1.0
    );
    // The connection itself is fine: a whole call on it succeeds.
    slow.send = slow.send.clone().ready().await.expect("ready");
    let (response, mut stream) = slow
        .send
        .send_request(grpc_head(DESCRIBE, &[]), false)
        .expect("stream");
    stream
        .send_data(
            bytes::Bytes::from(grpc_frame(&describe_namespace("default"))),
            true,
        )
        .expect("send");
    assert_eq!(h2_grpc_status(response).await.expect("answer").0, 0);

    // Three connections are the limit: the fourth is closed at accept, before any TLS.
    let second = h2_connect(address, &pki, Some(&pki.client))
        .await
        .expect("second");
    let _third = h2_connect(address, &pki, Some(&pki.client))
        .await
        .expect("third");
    let refused = tls_probe(address, &pki, Some(&pki.client)).await;
    assert!(refused.is_err(), "a fourth connection was served");
    assert!(tls_channel(address, &pki, Some(&pki.client)).await.is_err());
    assert!(metric("portcullis_refused_connections_total") >= 2.0);
    assert_eq!(metric("portcullis_connection_slots"), 3.0);
    // When one closes, a normal client gets in again.
    second.closed.abort();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(channel) = tls_channel(address, &pki, Some(&pki.client)).await {
            let mut client = wf::workflow_service_client::WorkflowServiceClient::new(channel);
            if client
                .describe_namespace(wf::DescribeNamespaceRequest {
                    namespace: "default".into(),
                    ..Default::default()
                })
                .await
                .is_ok()
            {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no room after a connection closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proxy.shutdown().await;
}
