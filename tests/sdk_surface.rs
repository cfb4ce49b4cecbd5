//! Every newer SDK feature through the proxy, against a dev server started with the flags the
//! Python SDK's own tests use: Nexus endpoint management (SDK and CLI), Nexus operations, a
//! workflow's signal-with-start of another workflow (the system Nexus endpoint), a memo key
//! deleted with a nil value, update-with-start, standalone activities and Nexus operations,
//! schedules, batch operations, activity operations, task queue configuration and worker
//! deployments. Each run through the proxy is compared with the same run straight at the
//! server, and the server's database holds no marker of the run through the proxy.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::codec_http::Http;
use common::jwt::Issuer;
use common::*;
use portcullis::codec::CodecConfig;
use serde_json::{json, Value};
use temporalio_protos::protos::temporal::api::operatorservice::v1 as op;

/// The dynamic config the Python SDK's test environment starts its dev server with, plus
/// signal-with-start from workflows (the system Nexus operation, off by default in 1.32).
const SDK_FLAGS: &[&str] = &[
    "frontend.enableUpdateWorkflowExecution=true",
    "frontend.enableUpdateWorkflowExecutionAsyncAccepted=true",
    "frontend.enableExecuteMultiOperation=true",
    "frontend.workerVersioningWorkflowAPIs=true",
    "frontend.workerVersioningDataAPIs=true",
    "system.enableDeploymentVersions=true",
    "frontend.activityAPIsEnabled=true",
    "activity.enableStandalone=true",
    "nexusoperation.enableStandalone=true",
    "history.enableChasm=true",
    "history.enableTransitionHistory=true",
    "history.enableCHASMCallbacks=true",
    "system.enableEagerWorkflowStart=true",
    "system.refreshNexusEndpointsMinWait=\"0s\"",
    "history.enableSignalWithStartFromWorkflow=true",
];

fn dev_server_args() -> Vec<&'static str> {
    SDK_FLAGS
        .iter()
        .flat_map(|flag| ["--dynamic-config-value", flag])
        .collect()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(text: &str) -> String {
    String::from_utf8_lossy(
        &base64::engine::general_purpose::STANDARD
            .decode(text)
            .expect("base64"),
    )
    .into_owned()
}

/// `results` with the run's marker (and its reverse) replaced by `M`, for comparing two runs.
fn normalized(result: &Value) -> Value {
    let marker = result["marker"].as_str().expect("marker");
    let reversed: String = marker.chars().rev().collect();
    let text = result["results"]
        .to_string()
        .replace(marker, "M")
        .replace(&reversed, "M");
    serde_json::from_str(&text).expect("json")
}

/// The CLI straight at the server (no TLS).
fn cli_direct(server: &DevServer, args: &[&str]) -> (bool, String) {
    let output = std::process::Command::new(temporal_binary())
        .args(args)
        .args(["--address", &server.address()])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("temporal");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

async fn operator_direct(
    server: &DevServer,
) -> op::operator_service_client::OperatorServiceClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.address()))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    op::operator_service_client::OperatorServiceClient::new(channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_newer_sdk_feature_runs_through_the_proxy_as_it_runs_directly() {
    let server = DevServer::start_with(&[], &dev_server_args()).await;
    let db = server.dir.path().join("temporal.db");
    let pki = Pki::new();
    let issuer = Issuer::new(&pki);
    // Every request the proxy sends goes through a recording tap: what is never stored (Nexus
    // inputs and results in flight, failures, query and update traffic) is searched too.
    let tap = tap::UpstreamTap::start(server.address().parse().expect("address")).await;
    let mut config = proxy_config(&pki, &tap.address.to_string(), &["default"]);
    // The strict rule: every payload an answer holds must be sealed by the proxy (nil memo
    // values and the server's system Nexus records aside).
    config.namespaces[0].encrypted_only = Some(true);
    config.bearer = Some(issuer.bearer_config());
    config.codec = Some(CodecConfig::loopback("127.0.0.1:0", vec![]));
    let proxy = start_proxy(config).await;
    let address = proxy.local_addr().expect("tcp");
    let pid = std::process::id();

    // The scenario through the proxy, then straight at the server.
    let sealed_marker = format!("viaproxy{pid}");
    let mut args = client_args(address, &pki, &pki.client);
    args.extend(["--marker".into(), sealed_marker.clone()]);
    let started = std::time::Instant::now();
    let through = run_python("sdk_surface.py", &args).await;
    eprintln!("through the proxy: {:?}", started.elapsed());
    let plain_marker = format!("direct{pid}");
    let direct = run_python(
        "sdk_surface.py",
        &[
            "--address".into(),
            server.address(),
            "--marker".into(),
            plain_marker.clone(),
        ],
    )
    .await;
    assert_eq!(
        normalized(&through),
        normalized(&direct),
        "the run through the proxy differs from the direct run.\nthrough: {through}\ndirect: {direct}"
    );
    let results = &through["results"];
    assert!(
        through["errors"].as_object().is_some_and(|e| e.is_empty()),
        "{through}"
    );
    // Spot checks of what the comparison covers.
    assert_eq!(
        results["memo.described"],
        json!(["added", "keep"]),
        "{results}"
    );
    assert_eq!(results["sws.starter"], "started");
    assert_eq!(results["nexus.operations"]["cancel"][1], "CancelledError");
    assert_eq!(
        results["nexus.operations"]["failure"][2][0], "ApplicationError",
        "{results}"
    );

    // The memo key deleted with a nil value is gone at the server itself (sealed, it would
    // have been stored); the others are there, sealed.
    let memo_id = through["memo_workflow_id"]
        .as_str()
        .expect("memo workflow id");
    let described = server
        .direct_client()
        .await
        .describe_workflow_execution(wf::DescribeWorkflowExecutionRequest {
            namespace: "default".into(),
            execution: Some(
                temporalio_protos::protos::temporal::api::common::v1::WorkflowExecution {
                    workflow_id: memo_id.into(),
                    run_id: String::new(),
                },
            ),
        })
        .await
        .expect("describe directly")
        .into_inner();
    let memo = described
        .workflow_execution_info
        .and_then(|i| i.memo)
        .expect("memo")
        .fields;
    let mut keys: Vec<&String> = memo.keys().collect();
    keys.sort();
    assert_eq!(keys, ["added", "keep"], "read straight from the server");
    assert!(memo
        .values()
        .all(|v| v.metadata.get("encoding").map(Vec::as_slice)
            == Some(b"binary/encrypted".as_slice())));

    // The database: no marker of the run through the proxy, every one of the direct run.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let kinds: Vec<String> = through["stored_kinds"]
        .as_array()
        .expect("kinds")
        .iter()
        .map(|k| k.as_str().expect("kind").to_string())
        .collect();
    assert!(kinds.len() >= 20, "{kinds:?}");
    for kind in &kinds {
        assert_eq!(
            occurrences(&db, &format!("{sealed_marker}-{kind}")),
            0,
            "{kind} reached the server in plaintext"
        );
        assert!(
            occurrences(&db, &format!("{plain_marker}-{kind}")) > 0,
            "the direct run did not store {kind}: the check proves nothing for it"
        );
    }
    assert_eq!(occurrences(&db, &sealed_marker), 0, "some marker leaked");
    // Nor on the wire, in any encoding (the detector is shown to catch each).
    leak::assert_detects(sealed_marker.as_bytes());
    assert!(
        tap.count() > 100,
        "the tap saw only {} requests",
        tap.count()
    );
    if let Some(form) = leak::find(&tap.wire(), sealed_marker.as_bytes()) {
        panic!("a marker went upstream on the wire ({form})");
    }

    // The CLI manages endpoints through the proxy; the description is plaintext to it and
    // sealed at the server.
    let cli = |args: &[&str]| {
        let (ok, out, err) = temporal_cli(address, &pki, &pki.client, args);
        assert!(ok, "temporal {args:?}:\n{out}\n{err}");
        out
    };
    let description = format!("cli{pid}-description **markdown**");
    cli(&[
        "operator",
        "nexus",
        "endpoint",
        "create",
        "--name",
        "cli-endpoint",
        "--target-namespace",
        "default",
        "--target-task-queue",
        "cli-queue",
        "--description",
        &description,
    ]);
    let shown = cli(&[
        "operator",
        "nexus",
        "endpoint",
        "get",
        "--name",
        "cli-endpoint",
    ]);
    assert!(shown.contains(&description), "{shown}");
    let listed = cli(&["operator", "nexus", "endpoint", "list", "-o", "json"]);
    assert!(listed.contains(&description), "{listed}");
    let (ok, at_server) = cli_direct(
        &server,
        &[
            "operator",
            "nexus",
            "endpoint",
            "get",
            "--name",
            "cli-endpoint",
            "-o",
            "json",
        ],
    );
    assert!(ok, "{at_server}");
    assert!(!at_server.contains(&format!("cli{pid}")), "{at_server}");
    assert!(at_server.contains(&b64(b"binary/encrypted")), "{at_server}");
    assert_eq!(occurrences(&db, &format!("cli{pid}")), 0);
    let updated = format!("cli{pid}-updated");
    cli(&[
        "operator",
        "nexus",
        "endpoint",
        "update",
        "--name",
        "cli-endpoint",
        "--description",
        &updated,
    ]);
    let shown = cli(&[
        "operator",
        "nexus",
        "endpoint",
        "get",
        "--name",
        "cli-endpoint",
    ]);
    assert!(shown.contains(&updated), "{shown}");

    // The codec server opens the description read straight from the server: for a cluster
    // reader, whether the request names no namespace (the Web UI's Nexus pages send
    // `undefined`) or a namespace (the CLI sends its own); not for a namespace's reader only.
    let mut operator = operator_direct(&server).await;
    let endpoint = operator
        .list_nexus_endpoints(op::ListNexusEndpointsRequest {
            name: "cli-endpoint".into(),
            ..Default::default()
        })
        .await
        .expect("list directly")
        .into_inner()
        .endpoints
        .pop()
        .expect("the endpoint");
    let sealed = endpoint
        .spec
        .as_ref()
        .and_then(|s| s.description.clone())
        .expect("a description");
    let sealed_json = json!({"payloads": [{
        "metadata": sealed.metadata.iter().map(|(k, v)| (k.clone(), Value::String(b64(v)))).collect::<serde_json::Map<_, _>>(),
        "data": b64(&sealed.data),
    }]});
    let http = Http::plain(proxy.codec_addr().expect("codec"));
    let cluster_reader = format!("Bearer {}", issuer.token("ops", &["temporal-system:read"]));
    let namespace_reader = format!("Bearer {}", issuer.token("dev", &["default:read"]));
    for namespace in ["undefined", "", "default"] {
        let answer = http
            .post(
                "/decode",
                &[
                    ("authorization", &cluster_reader),
                    ("x-namespace", namespace),
                ],
                &sealed_json,
            )
            .await;
        assert_eq!(answer.status, 200, "{namespace:?}: {}", answer.body);
        let data = unb64(
            answer.body["payloads"][0]["data"]
                .as_str()
                .unwrap_or_default(),
        );
        assert_eq!(data, format!("\"{updated}\""), "{namespace:?}");
    }
    for namespace in ["undefined", "default"] {
        let answer = http
            .post(
                "/decode",
                &[
                    ("authorization", &namespace_reader),
                    ("x-namespace", namespace),
                ],
                &sealed_json,
            )
            .await;
        assert_eq!(answer.status, 403, "{namespace:?}: {}", answer.body);
        assert!(!answer.body.to_string().contains(&updated));
    }
    // Encoding for the cluster (the Web UI creating an endpoint with a description) needs a
    // cluster admin, and what it seals opens through the proxy.
    let plain = json!({"payloads": [{"metadata": {"encoding": b64(b"json/plain")}, "data": b64(format!("\"ui{pid}\"").as_bytes())}]});
    let refused = http
        .post(
            "/encode",
            &[
                ("authorization", &cluster_reader),
                ("x-namespace", "undefined"),
            ],
            &plain,
        )
        .await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    let admin = format!(
        "Bearer {}",
        issuer.token("admin", &["temporal-system:admin"])
    );
    let encoded = http
        .post(
            "/encode",
            &[("authorization", &admin), ("x-namespace", "undefined")],
            &plain,
        )
        .await;
    assert_eq!(encoded.status, 200, "{}", encoded.body);
    let payload = &encoded.body["payloads"][0];
    let metadata = payload["metadata"].as_object().expect("metadata");
    let mut spec = endpoint.spec.clone().expect("spec");
    spec.description = Some(
        temporalio_protos::protos::temporal::api::common::v1::Payload {
            metadata: metadata
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        base64::engine::general_purpose::STANDARD
                            .decode(v.as_str().unwrap_or_default())
                            .expect("base64"),
                    )
                })
                .collect(),
            data: base64::engine::general_purpose::STANDARD
                .decode(payload["data"].as_str().unwrap_or_default())
                .expect("base64"),
            ..Default::default()
        },
    );
    operator
        .update_nexus_endpoint(op::UpdateNexusEndpointRequest {
            id: endpoint.id.clone(),
            version: endpoint.version,
            spec: Some(spec),
        })
        .await
        .expect("update directly, as the Web UI's server does");
    let shown = cli(&[
        "operator",
        "nexus",
        "endpoint",
        "get",
        "--name",
        "cli-endpoint",
    ]);
    assert!(shown.contains(&format!("ui{pid}")), "{shown}");
    assert_eq!(occurrences(&db, &format!("ui{pid}")), 0);

    cli(&[
        "operator",
        "nexus",
        "endpoint",
        "delete",
        "--name",
        "cli-endpoint",
    ]);
    let listed = cli(&["operator", "nexus", "endpoint", "list", "-o", "json"]);
    assert!(!listed.contains("cli-endpoint"), "{listed}");
    proxy.shutdown().await;
}
