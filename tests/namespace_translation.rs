//! Namespace translation end to end: the dev server holds `payments-up`; the proxy exposes it as
//! `payments`. The Python SDK and the `temporal` CLI use only `payments` and never see the
//! upstream name; querying the server directly shows the data landed in `payments-up`, and the
//! codec server decodes it there for a CLI that knows only the upstream name.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};

use common::jwt::Issuer;
use common::*;
use portcullis::codec::CodecConfig;
use portcullis::config::Config;
use serde_json::Value;

const CLIENT_NAME: &str = "payments";
const UPSTREAM_NAME: &str = "payments-up";

/// The standard test config plus `[[namespaces]]` entries with an `upstream_namespace`.
fn translating_config(pki: &Pki, upstream: &str, entries: &[(&str, &str)]) -> Config {
    let config = proxy_config(pki, upstream, &["default"]);
    let mut doc: toml::Table = toml::from_str(&config.to_toml()).expect("config toml");
    let namespaces = doc
        .entry("namespaces")
        .or_insert_with(|| toml::Value::Array(Vec::new()));
    let toml::Value::Array(namespaces) = namespaces else {
        panic!("namespaces is an array")
    };
    for (name, upstream_name) in entries {
        let mut entry = toml::Table::new();
        entry.insert("name".into(), (*name).into());
        entry.insert("upstream".into(), "temporal".into());
        entry.insert("upstream_namespace".into(), (*upstream_name).into());
        namespaces.push(toml::Value::Table(entry));
    }
    Config::from_toml(&toml::to_string(&doc).expect("toml")).expect("translating config")
}

/// The CLI straight at the dev server (plaintext), as an operator of the upstream would use it.
fn direct_cli(server: &DevServer, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(temporal_binary())
        .args(args)
        .args(["--address", &server.address()])
        .stdin(Stdio::null())
        .output()
        .expect("run temporal CLI");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn proxied_cli(address: SocketAddr, pki: &Pki, args: &[&str]) -> (bool, String, String) {
    temporal_cli(address, pki, &pki.client, args)
}

fn ok(what: &str, (ok, out, err): (bool, String, String)) -> String {
    assert!(ok, "{what} failed:\n{out}\n{err}");
    out
}

/// Every string value anywhere in a JSON document.
fn strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|v| strings(v, out)),
        Value::Object(map) => map.values().for_each(|v| strings(v, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_see_only_the_client_name_and_data_lands_upstream() {
    let server = DevServer::start_with(
        &[UPSTREAM_NAME],
        &[
            "--dynamic-config-value",
            "history.enableSignalWithStartFromWorkflow=true",
        ],
    )
    .await;
    let pki = Pki::new();
    let issuer = Issuer::new(&pki);
    let mut config = translating_config(
        &pki,
        &server.address(),
        &[(CLIENT_NAME, UPSTREAM_NAME), ("ghost", "ghost-up")],
    );
    config.bearer = Some(issuer.bearer_config());
    config.codec = Some(CodecConfig::loopback("127.0.0.1:0", Vec::new()));
    let proxy = start_proxy(config).await;
    let address = proxy.local_addr().expect("tcp");
    let codec = format!("http://{}", proxy.codec_addr().expect("codec listening"));

    // The Python SDK: worker and client in `payments` (activity, child workflow, signal, query,
    // updates, history read back).
    let marker = format!("translated-{}", std::process::id());
    let mut args = client_args(address, &pki, &pki.client);
    args.extend([
        "--namespace".into(),
        CLIENT_NAME.into(),
        "--name".into(),
        marker.clone(),
    ]);
    let result = run_python("scenario.py", &args).await;
    assert!(
        result["checks"]
            .as_object()
            .expect("checks")
            .values()
            .all(|v| v == true),
        "{result}"
    );
    let workflow_id = result["workflow_id"]
        .as_str()
        .expect("workflow id")
        .to_string();
    let child_id = format!("{workflow_id}-child");

    // A workflow's signal-with-start of another (the system Nexus endpoint): the request in its
    // envelope names `payments`, which the upstream knows as `payments-up`, and a memo key
    // deleted with a nil value.
    let mut args = client_args(address, &pki, &pki.client);
    args.extend([
        "--namespace".into(),
        CLIENT_NAME.into(),
        "--marker".into(),
        format!("{marker}-surface"),
        "--only".into(),
        "sws,memo".into(),
    ]);
    let surface = run_python("sdk_surface.py", &args).await;
    let reversed: String = format!("{marker}-surface").chars().rev().collect();
    assert_eq!(
        surface["results"]["sws.target"],
        format!("tupni-sws-{reversed}|langis-sws-{reversed}"),
        "{surface}"
    );
    assert_eq!(
        surface["results"]["memo.described"],
        serde_json::json!(["added", "keep"]),
        "{surface}"
    );

    // Through the proxy, the CLI sees `payments` only.
    let through = |args: &[&str]| {
        ok(
            &format!("proxied {args:?}"),
            proxied_cli(address, &pki, args),
        )
    };
    let describe = through(&[
        "workflow",
        "describe",
        "-n",
        CLIENT_NAME,
        "-w",
        &workflow_id,
        "-o",
        "json",
    ]);
    assert!(
        describe.contains("COMPLETED") || describe.contains("Completed"),
        "{describe}"
    );
    let child_history = through(&[
        "workflow",
        "show",
        "-n",
        CLIENT_NAME,
        "-w",
        &child_id,
        "-o",
        "json",
    ]);
    let parent_history = through(&[
        "workflow",
        "show",
        "-n",
        CLIENT_NAME,
        "-w",
        &workflow_id,
        "-o",
        "json",
    ]);
    let namespace = through(&[
        "operator",
        "namespace",
        "describe",
        "-n",
        CLIENT_NAME,
        "-o",
        "json",
    ]);
    let list = through(&["operator", "namespace", "list", "-o", "json"]);
    for (what, text) in [
        ("describe", &describe),
        ("child show", &child_history),
        ("parent show", &parent_history),
        ("namespace describe", &namespace),
        ("namespace list", &list),
    ] {
        assert!(
            !text.contains(UPSTREAM_NAME),
            "{what} shows the upstream name:\n{text}"
        );
    }
    // The names that are there are the client's: the namespace's own, the child's parent
    // namespace, the parent's child-workflow events.
    let json: Value = serde_json::from_str(&namespace).expect("namespace json");
    assert_eq!(json["namespaceInfo"]["name"], CLIENT_NAME, "{namespace}");
    let mut values = Vec::new();
    strings(
        &serde_json::from_str(&child_history).expect("child history json"),
        &mut values,
    );
    assert!(
        values.iter().any(|v| v == CLIENT_NAME),
        "parent namespace in {child_history}"
    );
    let mut values = Vec::new();
    strings(
        &serde_json::from_str(&parent_history).expect("history json"),
        &mut values,
    );
    assert!(
        values.iter().any(|v| v == CLIENT_NAME),
        "child namespace in {parent_history}"
    );
    assert!(list.contains(&format!("\"{CLIENT_NAME}\"")), "{list}");

    // The upstream name is no client-facing name: refused, even for an admin.
    let (refused, out, err) = proxied_cli(
        address,
        &pki,
        &[
            "workflow",
            "describe",
            "-n",
            UPSTREAM_NAME,
            "-w",
            &workflow_id,
        ],
    );
    assert!(
        !refused,
        "the upstream name must not work through the proxy:\n{out}"
    );
    assert!(err.contains("not served by this proxy"), "{err}");

    // Errors name the client's namespace: `ghost` is translated to `ghost-up`, which the
    // server does not have.
    let (found, out, err) = proxied_cli(
        address,
        &pki,
        &["operator", "namespace", "describe", "-n", "ghost"],
    );
    assert!(!found, "{out}");
    assert!(err.contains("ghost") && !err.contains("ghost-up"), "{err}");

    // Directly at the server: everything is in `payments-up`, nothing in `payments`.
    let direct = |args: &[&str]| ok(&format!("direct {args:?}"), direct_cli(&server, args));
    let upstream_describe = direct(&[
        "workflow",
        "describe",
        "-n",
        UPSTREAM_NAME,
        "-w",
        &workflow_id,
        "-o",
        "json",
    ]);
    assert!(
        upstream_describe.contains(&workflow_id),
        "{upstream_describe}"
    );
    let upstream_child = direct(&[
        "workflow",
        "show",
        "-n",
        UPSTREAM_NAME,
        "-w",
        &child_id,
        "-o",
        "json",
    ]);
    let mut values = Vec::new();
    strings(
        &serde_json::from_str(&upstream_child).expect("json"),
        &mut values,
    );
    assert!(
        values.iter().any(|v| v == UPSTREAM_NAME) && !values.iter().any(|v| v == CLIENT_NAME),
        "the server stores the upstream name: {upstream_child}"
    );
    let (exists, _, _) = direct_cli(
        &server,
        &["operator", "namespace", "describe", "-n", CLIENT_NAME],
    );
    assert!(!exists, "the server has no namespace {CLIENT_NAME}");
    // And the payloads there are sealed ...
    let upstream_history = direct(&["workflow", "show", "-n", UPSTREAM_NAME, "-w", &workflow_id]);
    assert!(
        upstream_history.contains("binary/encrypted") && !upstream_history.contains(&marker),
        "payloads are sealed at the server: {upstream_history}"
    );
    // ... and the codec server opens them for a CLI that knows only the upstream name (the
    // token's permission names the client-facing namespace, whose policies and keys apply).
    let reader = format!("Bearer {}", issuer.token("reader", &["payments:read"]));
    let decoded = direct(&[
        "workflow",
        "show",
        "-n",
        UPSTREAM_NAME,
        "-w",
        &workflow_id,
        "--codec-endpoint",
        &codec,
        "--codec-auth",
        &reader,
    ]);
    assert!(
        decoded.contains(&format!("Hello, {marker}!")) && !decoded.contains("binary/encrypted"),
        "decoded through the codec server: {decoded}"
    );
    proxy.shutdown().await;

    // Sealed payloads are bound to the client-facing name: exposing the same upstream
    // namespace under another name (same keys) cannot open them.
    let renamed = translating_config(&pki, &server.address(), &[("billing", UPSTREAM_NAME)]);
    let proxy = start_proxy(renamed).await;
    let address = proxy.local_addr().expect("tcp");
    let (opened, out, err) = proxied_cli(
        address,
        &pki,
        &[
            "workflow",
            "show",
            "-n",
            "billing",
            "-w",
            &workflow_id,
            "-o",
            "json",
        ],
    );
    assert!(
        !opened,
        "payloads sealed for `payments` opened as `billing`:\n{out}"
    );
    assert!(
        err.contains("DataLoss") || err.contains("cannot open"),
        "{err}"
    );
    proxy.shutdown().await;
}

/// Cross-namespace commands under translation: the proxy authorizes, routes and seals them by
/// client-facing names (a child started in `beta` lands in `beta-up` upstream, sealed for
/// `beta`, and opens there), and a command that names a namespace by its upstream name is
/// refused, as any use of an upstream name is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_namespace_commands_use_client_facing_names() {
    use common::tasks::*;
    use tonic::Code;

    let server = DevServer::start_with(
        &["alpha-up", "beta-up"],
        &[
            "--dynamic-config-value",
            "system.enableCrossNamespaceCommands=true",
        ],
    )
    .await;
    let pki = Pki::new();
    let config = translating_config(
        &pki,
        &server.address(),
        &[("alpha", "alpha-up"), ("beta", "beta-up")],
    );
    let proxy = start_proxy(config).await;
    let address = proxy.local_addr().expect("tcp");
    // The test client administers the whole cluster: only names can stop it here.
    let mut client = workflow_client(address, &pki, &pki.client).await;
    let mut direct = server.direct_client().await;
    let marker = format!("translated-child-{}", std::process::id());

    start(&mut client, "alpha", "parent", "alpha-q").await;
    let task = poll(&mut client, "alpha", "alpha-q").await;
    let status = client
        .respond_workflow_task_completed(completion(
            &task.task_token,
            "alpha",
            vec![start_child("beta-up", "child", "beta-q", &marker)],
        ))
        .await
        .expect_err("an upstream name is not a namespace clients may use");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains("beta-up"), "{status:?}");

    client
        .respond_workflow_task_completed(completion(
            &task.task_token,
            "alpha",
            vec![start_child("beta", "child", "beta-q", &marker)],
        ))
        .await
        .expect("a child in beta");
    // Upstream, the child lives in beta-up, its input sealed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let stored = loop {
        if let Ok(events) = history(&mut direct, "beta-up", "child").await {
            break started_input(&events).expect("input");
        }
        assert!(std::time::Instant::now() < deadline, "no child in beta-up");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(stored.payloads[0].metadata["encoding"], b"binary/encrypted");
    // Through the proxy, a worker in beta sees it: it was sealed for "beta", the name every
    // key, policy and envelope of that namespace uses.
    let child_task = poll(&mut client, "beta", "beta-q").await;
    let events = child_task.history.unwrap_or_default().events;
    assert_eq!(started_input(&events), json(&marker));
    proxy.shutdown().await;
}
