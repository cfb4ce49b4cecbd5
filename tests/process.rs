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
async fn sigterm_drains_in_flight_calls_within_the_grace_period() {
    let server = DevServer::start(&[]).await;
    let pki = Pki::new();
    let port = portcullis::dev::free_port().expect("port");
    let mut config = proxy_config(&pki, &server.address(), &["default"]);
    config.listener.address = format!("127.0.0.1:{port}");
    config.limits.shutdown_grace_seconds = 4;
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
    tokio::time::sleep(Duration::from_millis(500)).await;

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
    assert!(
        matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
        ),
        "{status:?}"
    );

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

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json")
}

async fn start_dev(dir: &Path) -> (Child, serde_json::Value) {
    let endpoints = dir.join("endpoints.json");
    let _ = std::fs::remove_file(&endpoints);
    let child = Command::new(BINARY)
        .args(["dev", "--listen", "127.0.0.1:0", "--dir"])
        .arg(dir)
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start portcullis dev");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !endpoints.exists() {
        assert!(
            Instant::now() < deadline,
            "portcullis dev wrote no endpoints.json"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (child, read_json(&endpoints))
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
        std::process::Command::new(temporal_binary())
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
            .expect("temporal")
            .status
            .success()
    };
    assert!(as_identity(
        "reader_cert",
        "reader_key",
        &["workflow", "describe", "--workflow-id", "dev-wf"]
    ));
    assert!(!as_identity(
        "reader_cert",
        "reader_key",
        &["workflow", "terminate", "--workflow-id", "dev-wf"]
    ));
    assert!(!as_identity(
        "stranger_cert",
        "stranger_key",
        &["workflow", "describe", "--workflow-id", "dev-wf"]
    ));

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

#[tokio::test]
async fn check_validates_a_config_and_its_certificates() {
    let pki = Pki::new();
    let config = proxy_config(&pki, "127.0.0.1:7233", &["default"]);
    let path = pki.dir.path().join("ok.toml");
    std::fs::write(&path, config.to_toml()).expect("write");
    let output = Command::new(BINARY)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .await
        .expect("check");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    std::fs::write(&pki.server_cert, "not a certificate").expect("corrupt");
    let output = Command::new(BINARY)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .await
        .expect("check");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("server certificate"), "{stderr}");
}
