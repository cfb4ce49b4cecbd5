//! The codec server against a real Temporal dev server: the `temporal` CLI shows plaintext with
//! `--codec-endpoint`/`--codec-auth` and `binary/encrypted` without; readers decode but do not
//! encode; strangers do neither; CORS, limits and malformed input; client certificates over
//! HTTPS; and the real Web UI in headless Chromium, out of the box with `portcullis dev`.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::browser::{artifact, open_page, PageRequest};
use common::codec_http::{Answer, Http};
use common::jwt::Issuer;
use common::*;
use portcullis::codec::{CodecConfig, CodecOptions, CodecTls};
use serde_json::{json, Value};

const POLICY: &str = r#"
audit_log = "AUDIT"
identity = ["spiffe", "cn"]

[system]
admins = ["cn:test-client"]

[[namespaces]]
name = "alpha"
readers = ["cn:reader-a"]
writers = ["cn:writer-a"]
"#;

const UI_ORIGIN_ALLOWED: &str = "http://ui.allowed.test";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// One JSON payload as the SDKs write it.
fn json_payload(value: &str) -> Value {
    json!({"metadata": {"encoding": b64(b"json/plain")}, "data": b64(format!("\"{value}\"").as_bytes())})
}

fn data_of(payload: &Value) -> String {
    let data = payload["data"].as_str().unwrap_or_default();
    String::from_utf8_lossy(
        &base64::engine::general_purpose::STANDARD
            .decode(data)
            .expect("base64"),
    )
    .into_owned()
}

fn encoding_of(payload: &Value) -> String {
    let encoding = payload["metadata"]["encoding"].as_str().unwrap_or_default();
    String::from_utf8_lossy(
        &base64::engine::general_purpose::STANDARD
            .decode(encoding)
            .expect("base64"),
    )
    .into_owned()
}

fn cli_show(upstream: &str, workflow_id: &str, codec: Option<(&str, &str)>) -> (bool, String) {
    let mut command = std::process::Command::new(temporal_binary());
    command
        .args([
            "workflow",
            "show",
            "--namespace",
            "alpha",
            "--workflow-id",
            workflow_id,
        ])
        .args(["--address", upstream])
        .stdin(Stdio::null());
    if let Some((endpoint, auth)) = codec {
        command.args(["--codec-endpoint", endpoint, "--codec-auth", auth]);
    }
    let output = command.output().expect("temporal workflow show");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

fn audit_events(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_decodes_through_the_codec_server_for_readers_only() {
    let server = DevServer::start(&["alpha"]).await;
    let pki = Pki::new();
    let issuer = Issuer::new(&pki);
    let audit = pki.dir.path().join("audit.jsonl");
    let mut config = proxy_config_with_authz(
        &pki,
        &server.address(),
        &["alpha"],
        &POLICY.replace("AUDIT", &audit.display().to_string()),
    );
    config.bearer = Some(issuer.bearer_config());
    let mut codec = CodecConfig::loopback("127.0.0.1:0", vec![UI_ORIGIN_ALLOWED.into()]);
    codec.max_payloads = 5;
    codec.max_request_bytes = 64 * 1024;
    codec.request_timeout_seconds = 2;
    config.codec = Some(codec);
    let proxy = start_proxy(config).await;
    let address = proxy.local_addr().expect("tcp");
    let codec_addr = proxy.codec_addr().expect("codec listening");
    let endpoint = format!("http://{codec_addr}");

    // A workflow runs through the proxy: the server stores its payloads sealed.
    let marker = format!("codec-marker-{}", std::process::id());
    let mut args = client_args(address, &pki, &pki.client_cert("writer-a"));
    args.extend([
        "--namespace".into(),
        "alpha".into(),
        "--name".into(),
        marker.clone(),
    ]);
    let result = run_python("scenario.py", &args).await;
    let workflow_id = result["workflow_id"].as_str().expect("id").to_string();

    // Directly against the server: encrypted without the codec ...
    let (ok, text) = cli_show(&server.address(), &workflow_id, None);
    assert!(ok, "{text}");
    assert!(
        text.contains("binary/encrypted"),
        "expected sealed payloads: {text}"
    );
    assert!(
        !text.contains(&marker),
        "plaintext without the codec: {text}"
    );
    // ... plaintext input and result with it, for a reader.
    let reader = format!("Bearer {}", issuer.token("reader-token", &["alpha:read"]));
    let (ok, text) = cli_show(&server.address(), &workflow_id, Some((&endpoint, &reader)));
    assert!(ok, "{text}");
    assert!(text.contains(&marker), "input not decoded: {text}");
    assert!(
        text.contains(&format!("Hello, {marker}!")),
        "result not decoded: {text}"
    );
    assert!(!text.contains("binary/encrypted"), "{text}");
    // A token without a role in alpha decodes nothing.
    let stranger = format!("Bearer {}", issuer.token("nobody", &["other:read"]));
    let (_, text) = cli_show(
        &server.address(),
        &workflow_id,
        Some((&endpoint, &stranger)),
    );
    assert!(!text.contains(&marker), "a stranger saw plaintext: {text}");

    // The protocol itself.
    let http = Http::plain(codec_addr);
    let writer = format!("Bearer {}", issuer.token("writer-token", &["alpha:write"]));
    let plain = json!({"payloads": [json_payload("secret-1"), json_payload("secret-2")]});
    // A writer encodes; the result is sealed by this proxy.
    let encoded = http
        .post("/alpha/encode", &[("authorization", &writer)], &plain)
        .await;
    assert_eq!(encoded.status, 200, "{}", encoded.body);
    let sealed = encoded.body.clone();
    assert_eq!(sealed["payloads"].as_array().map(Vec::len), Some(2));
    for p in sealed["payloads"].as_array().expect("payloads") {
        assert_eq!(encoding_of(p), "binary/encrypted");
        assert!(!data_of(p).contains("secret-"));
    }
    // A reader decodes (namespace from X-Namespace), but may not encode.
    let decoded = http
        .post(
            "/decode",
            &[("authorization", &reader), ("x-namespace", "alpha")],
            &sealed,
        )
        .await;
    assert_eq!(decoded.status, 200, "{}", decoded.body);
    assert_eq!(
        decoded.body, plain,
        "decode must restore the payloads exactly"
    );
    let refused = http
        .post("/alpha/encode", &[("authorization", &reader)], &plain)
        .await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert!(refused.body["message"]
        .as_str()
        .unwrap_or_default()
        .contains("writer"));
    // A stranger does neither, and learns nothing.
    for op in ["decode", "encode"] {
        let answer = http
            .post(
                &format!("/alpha/{op}"),
                &[("authorization", &stranger)],
                &sealed,
            )
            .await;
        assert_eq!(answer.status, 403, "{op}: {}", answer.body);
        assert!(!answer.body.to_string().contains("secret-"));
        assert!(answer.body["payloads"].is_null());
    }
    // Certificate identities work the same over HTTPS (below); without any credential: 401.
    let anonymous = http.post("/alpha/decode", &[], &sealed).await;
    assert_eq!(anonymous.status, 401, "{}", anonymous.body);
    assert!(anonymous.headers.contains_key("www-authenticate"));
    assert_eq!(anonymous.body["error"], "unauthenticated");
    let expired = format!(
        "Bearer {}",
        issuer.token_with("reader-token", &["alpha:read"], common::jwt::AUDIENCE, -600)
    );
    assert_eq!(
        http.post("/alpha/decode", &[("authorization", &expired)], &sealed)
            .await
            .status,
        401
    );
    // Payloads this proxy did not seal pass through untouched, next to ones it did.
    let foreign = json!({"metadata": {"encoding": b64(b"binary/encrypted"), "encryption-key-id": b64(b"someone-else")}, "data": b64(b"opaque")});
    let mixed = json!({"payloads": [foreign, sealed["payloads"][0], json_payload("plain-as-is")]});
    let answer = http
        .post("/alpha/decode", &[("authorization", &reader)], &mixed)
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["payloads"][0], mixed["payloads"][0]);
    assert_eq!(answer.body["payloads"][1], plain["payloads"][0]);
    assert_eq!(answer.body["payloads"][2], mixed["payloads"][2]);
    // A payload sealed for alpha does not open as another namespace's.
    let other_ns = http
        .post(
            "/default/decode",
            &[(
                "authorization",
                &format!("Bearer {}", issuer.token("x", &["default:read"])),
            )],
            &sealed,
        )
        .await;
    assert_ne!(other_ns.status, 200, "{}", other_ns.body);
    assert!(!other_ns.body.to_string().contains("secret-"));

    // Malformed input, limits and routing: clear 4xx answers.
    let bad = |body: &'static str| body.as_bytes().to_vec();
    for (body, what) in [
        (bad("not json"), "JSON"),
        (bad(r#"{"payloads":[{"data":"%%%"}]}"#), "base64"),
        (bad(r#"{"payloads":{"data":"x"}}"#), "list"),
    ] {
        let answer = http
            .send(
                "POST",
                "/alpha/decode",
                &[
                    ("authorization", &reader),
                    ("content-type", "application/json"),
                ],
                body,
            )
            .await;
        assert_eq!(answer.status, 400, "{what}: {}", answer.body);
        assert!(
            answer.body["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}"
        );
    }
    let many = json!({"payloads": vec![json_payload("x"); 6]});
    assert_eq!(
        http.post("/alpha/decode", &[("authorization", &reader)], &many)
            .await
            .status,
        413
    );
    let huge = json!({"payloads": [json_payload(&"x".repeat(100_000))]});
    assert_eq!(
        http.post("/alpha/decode", &[("authorization", &reader)], &huge)
            .await
            .status,
        413
    );
    let mismatch = http
        .post(
            "/alpha/decode",
            &[("authorization", &reader), ("x-namespace", "beta")],
            &sealed,
        )
        .await;
    assert_eq!(mismatch.status, 400, "{}", mismatch.body);
    assert_eq!(
        http.post("/decode", &[("authorization", &reader)], &sealed)
            .await
            .status,
        400
    );
    assert_eq!(
        http.post("/a/b/decode", &[("authorization", &reader)], &sealed)
            .await
            .status,
        404
    );
    assert_eq!(
        http.send("GET", "/alpha/decode", &[], vec![]).await.status,
        405
    );
    // The Web UI adds a query string; only the path counts.
    let answer = http
        .post(
            "/decode?preserveStorageRefs=true",
            &[("authorization", &reader), ("x-namespace", "alpha")],
            &sealed,
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);

    // A body that never finishes is cut off at the request timeout (408), and so is a
    // connection that never sends its headers.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut slow = tokio::net::TcpStream::connect(codec_addr)
            .await
            .expect("connect");
        let head = format!(
            "POST /alpha/decode HTTP/1.1\r\nHost: localhost\r\nAuthorization: {reader}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"payloads\":["
        );
        slow.write_all(head.as_bytes()).await.expect("write");
        let started = Instant::now();
        let mut answer = vec![0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut answer))
            .await
            .expect("the codec server must answer a stalled body")
            .expect("read");
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let mut idle = tokio::net::TcpStream::connect(codec_addr)
            .await
            .expect("connect");
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf))
            .await
            .expect("an idle connection must be closed");
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    }

    // CORS: the allowed origin gets a preflight answer with credentials; others are refused.
    let preflight = http
        .send(
            "OPTIONS",
            "/decode",
            &[
                ("origin", UI_ORIGIN_ALLOWED),
                ("access-control-request-method", "POST"),
                (
                    "access-control-request-headers",
                    "authorization,content-type,x-namespace",
                ),
            ],
            vec![],
        )
        .await;
    assert_eq!(preflight.status, 204);
    let header = |a: &Answer, name: &str| {
        a.headers
            .get(name)
            .map(|v| v.to_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    assert_eq!(
        header(&preflight, "access-control-allow-origin"),
        UI_ORIGIN_ALLOWED
    );
    assert_eq!(
        header(&preflight, "access-control-allow-credentials"),
        "true"
    );
    let allowed = header(&preflight, "access-control-allow-headers").to_ascii_lowercase();
    for h in ["authorization", "content-type", "x-namespace"] {
        assert!(allowed.contains(h), "{allowed}");
    }
    let from_ui = http
        .post(
            "/alpha/decode",
            &[("authorization", &reader), ("origin", UI_ORIGIN_ALLOWED)],
            &sealed,
        )
        .await;
    assert_eq!(from_ui.status, 200);
    assert_eq!(
        header(&from_ui, "access-control-allow-origin"),
        UI_ORIGIN_ALLOWED
    );
    let evil = http
        .post(
            "/alpha/decode",
            &[("authorization", &reader), ("origin", "http://evil.test")],
            &sealed,
        )
        .await;
    assert_eq!(evil.status, 403);
    assert!(evil.headers.get("access-control-allow-origin").is_none());
    assert!(!evil.body.to_string().contains("secret-"));

    // Every decode and encode is audited with identity, namespace and count.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events = audit_events(&audit);
    assert!(events.iter().any(|e| e["method"] == "codec/decode"
        && e["identity"] == "jwt:reader-token"
        && e["namespace"] == "alpha"
        && e["decision"] == "allow"
        && e["count"] == 2));
    assert!(events.iter().any(|e| e["method"] == "codec/encode"
        && e["identity"] == "jwt:writer-token"
        && e["count"] == 2));
    assert!(events.iter().any(|e| e["method"] == "codec/encode"
        && e["identity"] == "jwt:reader-token"
        && e["decision"] == "deny"));
    assert!(events.iter().any(|e| e["method"] == "codec/decode"
        && e["identity"] == "jwt:nobody"
        && e["decision"] == "deny"));
    proxy.shutdown().await;

    // Over HTTPS with client certificates: the same identities and policies.
    let mut config = proxy_config_with_authz(
        &pki,
        &server.address(),
        &["alpha"],
        &POLICY.replace("AUDIT", "off"),
    );
    let mut codec = CodecConfig::loopback("127.0.0.1:0", vec![]);
    codec.plaintext = false;
    codec.tls = Some(CodecTls {
        cert: pki.server_cert.clone(),
        key: pki.server_key.clone(),
        client_ca: Some(pki.ca_path.clone()),
    });
    config.codec = Some(codec);
    let proxy = start_proxy(config).await;
    let codec_addr = proxy.codec_addr().expect("codec");
    let reader_https = Http::tls(codec_addr, &pki, Some(&pki.client_cert("reader-a")));
    let answer = reader_https.post("/alpha/decode", &[], &sealed).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body, plain);
    assert_eq!(
        reader_https.post("/alpha/encode", &[], &plain).await.status,
        403
    );
    let stranger_https = Http::tls(codec_addr, &pki, Some(&pki.client_cert("stranger")));
    assert_eq!(
        stranger_https
            .post("/alpha/decode", &[], &sealed)
            .await
            .status,
        403
    );
    assert_eq!(
        stranger_https
            .post("/alpha/encode", &[], &plain)
            .await
            .status,
        403
    );
    let no_cert = Http::tls(codec_addr, &pki, None);
    assert_eq!(
        no_cert.post("/alpha/decode", &[], &sealed).await.status,
        401
    );
    // Bearer tokens are not configured on this proxy: a token is refused, not ignored.
    let with_token = no_cert
        .post("/alpha/decode", &[("authorization", &reader)], &sealed)
        .await;
    assert_eq!(with_token.status, 401, "{}", with_token.body);
    // The codec's JSON went through the schema's small Payloads pool, not the whole one.
    assert!(!portcullis::schema::Schema::global().holds_descriptors());
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_anonymous_reader_cannot_leave_loopback_or_come_from_a_config_file() {
    let pki = Pki::new();
    let mut config = proxy_config(&pki, "127.0.0.1:1", &["default"]);
    let mut codec = CodecConfig::loopback("0.0.0.0:0", vec![]);
    codec.plaintext = false;
    codec.tls = Some(CodecTls {
        cert: pki.server_cert.clone(),
        key: pki.server_key.clone(),
        client_ca: None,
    });
    config.codec = Some(codec);
    let options = portcullis::server::StartOptions {
        codec: CodecOptions {
            dev_anonymous_reader: true,
        },
    };
    let error = match portcullis::server::start_with(config.clone(), options).await {
        Ok(_) => panic!("the dev anonymous reader started on a public address"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains("loopback"), "{error}");
    // TLS on loopback is refused too: it is meant for the plain-HTTP dev listener only.
    let mut loopback_tls = config.clone();
    if let Some(codec) = &mut loopback_tls.codec {
        codec.address = "127.0.0.1:0".into();
    }
    let error = match portcullis::server::start_with(loopback_tls, options).await {
        Ok(_) => panic!("the dev anonymous reader started behind TLS"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains("anonymous"), "{error}");
    // No config key can turn it on.
    let mut text = proxy_config(&pki, "127.0.0.1:1", &["default"]).to_toml();
    text.push_str(
        "\n[codec]\naddress = \"127.0.0.1:0\"\nplaintext = true\ndev_anonymous_reader = true\n",
    );
    let error = portcullis::config::Config::from_toml(&text)
        .unwrap_err()
        .to_string();
    assert!(error.contains("dev_anonymous_reader"), "{error}");
    // Plaintext codec listeners are refused off loopback, like the gRPC listener.
    let mut text = proxy_config(&pki, "127.0.0.1:1", &["default"]).to_toml();
    text.push_str("\n[codec]\naddress = \"0.0.0.0:8089\"\nplaintext = true\n");
    let error = portcullis::config::Config::from_toml(&text)
        .unwrap_err()
        .to_string();
    assert!(error.contains("loopback"), "{error}");
}

/// Runs `portcullis dev` (which starts the dev server with its Web UI pointed at the codec
/// server), runs a workflow through the proxy, and looks at the workflow's page in Chromium.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_ui_shows_decrypted_payloads_out_of_the_box_with_portcullis_dev() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut dev, endpoints) = start_portcullis_dev(
        dir.path(),
        &["--listen", "127.0.0.1:0", "--codec-listen", "127.0.0.1:0"],
    )
    .await;
    let text = |key: &str| {
        endpoints[key]
            .as_str()
            .unwrap_or_else(|| panic!("endpoints.json lacks {key}: {endpoints}"))
            .to_string()
    };
    let (codec_endpoint, codec_auth, ui_url) =
        (text("codec_endpoint"), text("codec_auth"), text("ui_url"));
    assert!(codec_auth.starts_with("Bearer "));

    // A workflow through the proxy with the dev client certificate.
    let marker = format!("ui-marker-{}", std::process::id());
    let args = vec![
        "--address".to_string(),
        text("proxy_address"),
        "--ca".into(),
        text("ca_cert"),
        "--cert".into(),
        text("client_cert"),
        "--key".into(),
        text("client_key"),
        "--server-name".into(),
        "localhost".into(),
        "--name".into(),
        marker.clone(),
    ];
    let result = run_python("scenario.py", &args).await;
    let workflow_id = result["workflow_id"].as_str().expect("id");
    // The endpoints' codec_auth decodes with the CLI straight from the upstream.
    let output = std::process::Command::new(temporal_binary())
        .args([
            "workflow",
            "show",
            "--workflow-id",
            workflow_id,
            "--address",
            &text("upstream_address"),
        ])
        .args([
            "--codec-endpoint",
            &codec_endpoint,
            "--codec-auth",
            &codec_auth,
        ])
        .output()
        .expect("cli");
    let shown = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{shown}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        shown.contains(&marker),
        "codec_auth did not decode: {shown}"
    );

    // The Web UI, as a person opens it: decrypted input on the workflow's page.
    let page_url = format!("{ui_url}/namespaces/default/workflows/{workflow_id}");
    let page = open_page(&PageRequest {
        url: &page_url,
        expect: Some(&marker),
        wait_for: None,
        click: None,
        codec: Some(&codec_endpoint),
        authorization: None,
        screenshot: Some(artifact("codec-web-ui-decrypted.png")),
        timeout: Duration::from_secs(30),
    })
    .await;
    assert_eq!(
        page["found"], true,
        "the Web UI did not show the decrypted input: {page}"
    );
    let codec_calls = page["codec"].as_array().cloned().unwrap_or_default();
    assert!(
        codec_calls
            .iter()
            .any(|c| c["method"] == "POST" && c["status"] == 200),
        "the page did not decode through the codec server: {page}"
    );

    // A Nexus endpoint created through the proxy with a description: its page in the Web UI
    // (which reads the endpoint straight from the server, and asks the codec server with
    // `X-Namespace: undefined`, the page having no namespace) shows the description. The page
    // is reached from the endpoint list, as people do: UI 2.54.1 does not call the codec
    // server when the endpoint's URL is opened directly (its loader runs before the settings
    // naming the codec server are in place), and shows no description then, with or without
    // portcullis.
    let cli_proxy = |args: &[&str]| {
        let output = std::process::Command::new(temporal_binary())
            .args(args)
            .args(["--address", &text("proxy_address")])
            .args(["--tls-ca-path", &text("ca_cert")])
            .args(["--tls-cert-path", &text("client_cert")])
            .args(["--tls-key-path", &text("client_key")])
            .args(["--tls-server-name", "localhost"])
            .output()
            .expect("cli");
        assert!(
            output.status.success(),
            "temporal {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let description = format!("{marker}-endpoint-description");
    cli_proxy(&[
        "operator",
        "nexus",
        "endpoint",
        "create",
        "--name",
        "ui-endpoint",
        "--target-namespace",
        "default",
        "--target-task-queue",
        "ui-queue",
        "--description",
        &description,
    ]);
    let endpoint: Value = serde_json::from_str(&cli_proxy(&[
        "operator",
        "nexus",
        "endpoint",
        "get",
        "--name",
        "ui-endpoint",
        "-o",
        "json",
    ]))
    .expect("endpoint json");
    assert!(endpoint["id"].as_str().is_some(), "{endpoint}");
    let page = open_page(&PageRequest {
        url: &format!("{ui_url}/nexus"),
        expect: Some(&description),
        wait_for: None,
        click: Some("ui-endpoint"),
        codec: Some(&codec_endpoint),
        authorization: None,
        screenshot: Some(artifact("codec-web-ui-nexus-endpoint.png")),
        timeout: Duration::from_secs(30),
    })
    .await;
    assert_eq!(
        page["found"], true,
        "the Web UI did not show the endpoint's description: {page}"
    );
    assert!(
        page["codec"].as_array().is_some_and(|calls| calls
            .iter()
            .any(|c| c["method"] == "POST" && c["status"] == 200)),
        "the description was not decoded by the codec server: {page}"
    );

    // A browser whose token lacks permission in the namespace sees no plaintext.
    let signing_key = portcullis::authz::bearer::DevSigningKey::from_pkcs8(
        "portcullis-dev-1",
        &std::fs::read(dir.path().join("keys/dev-token-key.pk8")).expect("dev key"),
    )
    .expect("load dev key");
    let token = signing_key
        .sign(&json!({
            "iss": portcullis::dev::DEV_TOKEN_ISSUER, "aud": portcullis::dev::DEV_TOKEN_AUDIENCE,
            "sub": "ui-stranger", "exp": portcullis::authz::bearer::now_seconds() + 600,
            "permissions": ["some-other-namespace:read"],
        }))
        .expect("sign");
    let bearer = format!("Bearer {token}");
    let page = open_page(&PageRequest {
        url: &page_url,
        expect: None,
        wait_for: Some("Input"),
        click: None,
        codec: Some(&codec_endpoint),
        authorization: Some(&bearer),
        screenshot: Some(artifact("codec-web-ui-denied.png")),
        timeout: Duration::from_secs(30),
    })
    .await;
    assert_eq!(
        page["waited"], true,
        "the workflow page did not render: {page}"
    );
    // Give the page time to call the codec server and render whatever it got.
    let calls = page["codec"].as_array().cloned().unwrap_or_default();
    assert!(
        calls
            .iter()
            .any(|c| c["method"] == "POST" && c["status"] == 403),
        "the codec server should have refused the token: {page}"
    );
    assert!(
        !page["text"].as_str().unwrap_or_default().contains(&marker),
        "plaintext appeared for a token without permission: {page}"
    );

    let pid = dev.id().expect("running").to_string();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    let _ = tokio::time::timeout(Duration::from_secs(20), dev.wait()).await;
}
