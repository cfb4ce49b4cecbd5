//! Real clients through the proxy over mTLS against a real Temporal dev server: the Python SDK
//! (worker and client), the `temporal` CLI, and the TypeScript client with a Python worker.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::*;

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_runs_a_complete_workflow_through_the_proxy() {
    let server = DevServer::start(&[]).await;
    let pki = Pki::new();
    let proxy = start_proxy(proxy_config(&pki, &server.address(), &["default"])).await;
    let address = proxy.local_addr().expect("tcp");

    // The SDK's default is gzip; run both encodings so both framing paths are exercised.
    for compression in ["gzip", "none"] {
        let mut args = client_args(address, &pki, &pki.client);
        args.extend(["--grpc-compression".into(), compression.into()]);
        let result = run_python("scenario.py", &args).await;
        let checks = result["checks"].as_object().expect("checks");
        assert!(checks.len() >= 10, "{result}");
        assert!(checks.values().all(|v| v == true), "{result}");
        assert_eq!(result["result"]["greeting"], "Hello, Portcullis!");
        assert_eq!(result["result"]["child"], 42);
        assert_eq!(result["result"]["flaky_attempts"], 3);
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporal_cli_start_list_describe_show_signal_terminate() {
    let server = DevServer::start(&[]).await;
    let pki = Pki::new();
    let proxy = start_proxy(proxy_config(&pki, &server.address(), &["default"])).await;
    let address = proxy.local_addr().expect("tcp");
    let cli = |args: &[&str]| {
        let (ok, out, err) = temporal_cli(address, &pki, &pki.client, args);
        assert!(ok, "temporal {args:?} failed:\n{out}\n{err}");
        out
    };

    let out = cli(&[
        "workflow",
        "start",
        "--type",
        "CliWorkflow",
        "--task-queue",
        "cli-tq",
        "--workflow-id",
        "cli-wf-1",
        "--input",
        "\"cli-input-value\"",
        "-o",
        "json",
    ]);
    assert!(out.contains("cli-wf-1"), "{out}");

    let out = cli(&["workflow", "list", "-o", "json"]);
    assert!(
        out.contains("cli-wf-1") && out.contains("CliWorkflow"),
        "{out}"
    );

    let out = cli(&[
        "workflow",
        "describe",
        "--workflow-id",
        "cli-wf-1",
        "-o",
        "json",
    ]);
    assert!(out.contains("cli-tq"), "{out}");

    cli(&[
        "workflow",
        "signal",
        "--workflow-id",
        "cli-wf-1",
        "--name",
        "poke",
        "--input",
        "\"signal-value\"",
    ]);

    // JSON output carries payload data base64-encoded.
    let out = cli(&[
        "workflow",
        "show",
        "--workflow-id",
        "cli-wf-1",
        "-o",
        "json",
    ]);
    assert!(
        out.contains(&b64("\"cli-input-value\"")),
        "show lacks the input: {out}"
    );
    assert!(
        out.contains(&b64("\"signal-value\"")) && out.contains("poke"),
        "show lacks the signal: {out}"
    );

    cli(&[
        "workflow",
        "terminate",
        "--workflow-id",
        "cli-wf-1",
        "--reason",
        "done",
    ]);
    let out = cli(&[
        "workflow",
        "describe",
        "--workflow-id",
        "cli-wf-1",
        "-o",
        "json",
    ]);
    assert!(
        out.contains("TERMINATED") || out.contains("Terminated"),
        "{out}"
    );

    // Cluster-scoped calls reach the system upstream.
    let out = cli(&[
        "operator",
        "namespace",
        "describe",
        "--namespace",
        "default",
        "-o",
        "json",
    ]);
    assert!(out.contains("\"name\": \"default\""), "{out}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_client_starts_a_workflow_that_a_python_worker_runs() {
    let server = DevServer::start(&[]).await;
    let pki = Pki::new();
    let proxy = start_proxy(proxy_config(&pki, &server.address(), &["default"])).await;
    let address = proxy.local_addr().expect("tcp");
    let task_queue = "ts-queue";

    let mut worker = tokio::process::Command::new(python());
    worker
        .arg(repo_root().join("tests/clients/python/worker.py"))
        .args(client_args(address, &pki, &pki.client))
        .args(["--task-queue", task_queue, "--seconds", "90"])
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

    let ts = repo_root().join("tests/clients/ts");
    assert!(
        ts.join("node_modules").is_dir(),
        "run `bash scripts/setup.sh` first (npm ci)"
    );
    let mut client = tokio::process::Command::new("node");
    client
        .arg(ts.join("start.mjs"))
        .args(client_args(address, &pki, &pki.client))
        .args(["--task-queue", task_queue, "--name", "TypeScript"]);
    let output = run_with_timeout(client, Duration::from_secs(60)).await;
    let result = parse_client_output("start.mjs", &output);
    assert_eq!(result["result"], "Hello, TypeScript!");
    let _ = worker.kill().await;
    proxy.shutdown().await;
}
