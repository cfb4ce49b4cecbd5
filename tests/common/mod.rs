//! Shared harness for integration tests: real Temporal dev servers, PKI, the proxy, real clients.
//! Every process started here is killed when its handle drops (also when a test panics).
#![allow(dead_code)]

pub mod browser;
pub mod codec_http;
pub mod jwt;
pub mod leak;
pub mod moto;
pub mod nginx;
pub mod ops;
pub mod softhsm;
pub mod tap;
pub mod tasks;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use portcullis::config::Config;
use portcullis::dev::TemporalDevServer;
use portcullis::server::RunningProxy;
use portcullis::tls::pki::{CertAuthority, IssuedCert, LeafSpec, Usage};
use serde_json::Value;
use tempfile::TempDir;

pub use temporalio_protos::protos::temporal::api::workflowservice::v1 as wf;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `portcullis dev --dir DIR ARGS…` and waits for its endpoints.json (written once it
/// serves). Its output goes to DIR/dev-output.log; when it exits or is not up within 120 s the
/// panic quotes that log and the dev server's.
pub async fn start_portcullis_dev(dir: &Path, args: &[&str]) -> (tokio::process::Child, Value) {
    let endpoints = dir.join("endpoints.json");
    let _ = std::fs::remove_file(&endpoints);
    let output_path = dir.join("dev-output.log");
    let output = std::fs::File::create(&output_path).expect("create dev-output.log");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("dev")
        .args(args)
        .arg("--dir")
        .arg(dir)
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .stdout(output.try_clone().expect("clone"))
        .stderr(output)
        .kill_on_drop(true)
        .spawn()
        .expect("start portcullis dev");
    let started = std::time::Instant::now();
    while !endpoints.exists() {
        let exited = child.try_wait().expect("try_wait");
        if exited.is_some() || started.elapsed() > Duration::from_secs(120) {
            let tail = |path: &Path| portcullis::dev::log_tail(path, 20);
            panic!(
                "portcullis dev wrote no endpoints.json ({} after {:?}); its output ends:\n{}\n\
                 the dev server's log ends:\n{}",
                exited.map_or("still running".to_string(), |s| format!("exited {s}")),
                started.elapsed(),
                tail(&output_path),
                tail(&dir.join("temporal-server.log")),
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = std::fs::read_to_string(&endpoints).expect("read endpoints.json");
    (
        child,
        serde_json::from_str(&text).expect("endpoints.json is JSON"),
    )
}

/// The real `temporal` CLI from the project's venv. Missing means the setup was skipped: fail loudly.
pub fn temporal_binary() -> PathBuf {
    let path = repo_root().join(".venv/bin/temporal");
    assert!(
        path.is_file(),
        "the Temporal CLI is missing at {}: run `bash scripts/setup.sh` first",
        path.display()
    );
    path
}

pub fn python() -> PathBuf {
    let path = repo_root().join(".venv/bin/python");
    assert!(
        path.is_file(),
        "the project venv is missing: run `bash scripts/setup.sh` first"
    );
    path
}

pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            std::env::var("PORTCULLIS_LOG").unwrap_or_else(|_| "warn".into()),
        ))
        .with_test_writer()
        .try_init();
}

/// A CA, a server certificate for localhost/127.0.0.1 and a client certificate, in a temp dir.
pub struct Pki {
    pub dir: TempDir,
    pub ca: CertAuthority,
    pub ca_path: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client: ClientCert,
}

#[derive(Clone, Debug)]
pub struct ClientCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = CertAuthority::generate("test CA", Duration::from_secs(3600)).expect("CA");
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, &ca.cert_pem).expect("write CA");
        let mut spec = LeafSpec::new("localhost", Usage::Server, Duration::from_secs(3600));
        spec.dns_names.push("localhost".into());
        spec.ip_addresses.push("127.0.0.1".parse().expect("ip"));
        let server = ca.issue(&spec).expect("server cert");
        let (server_cert, server_key) = write_pair(dir.path(), "server", &server);
        let mut pki = Pki {
            client: ClientCert {
                cert: PathBuf::new(),
                key: PathBuf::new(),
            },
            dir,
            ca,
            ca_path,
            server_cert,
            server_key,
        };
        pki.client = pki.client_cert("test-client");
        pki
    }

    pub fn client_cert(&self, name: &str) -> ClientCert {
        self.client_cert_with(LeafSpec::new(
            name,
            Usage::Client,
            Duration::from_secs(3600),
        ))
    }

    pub fn client_cert_with(&self, spec: LeafSpec) -> ClientCert {
        let issued = self.ca.issue(&spec).expect("client cert");
        let (cert, key) = write_pair(self.dir.path(), &spec.common_name, &issued);
        ClientCert { cert, key }
    }

    pub fn ca_pem(&self) -> String {
        self.ca.cert_pem.clone()
    }
}

fn write_pair(dir: &Path, name: &str, issued: &IssuedCert) -> (PathBuf, PathBuf) {
    // A CN may be any text (even a URI): keep it a single file name.
    let name = name.replace(['/', ':'], "_");
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}-key.pem"));
    std::fs::write(&cert, &issued.cert_pem).expect("write cert");
    std::fs::write(&key, &issued.key_pem).expect("write key");
    (cert, key)
}

/// A real Temporal dev server with its own database file.
pub struct DevServer {
    pub server: TemporalDevServer,
    pub dir: TempDir,
    pub port: u16,
}

impl DevServer {
    pub async fn start(namespaces: &[&str]) -> DevServer {
        Self::start_with(namespaces, &[]).await
    }

    /// Starts with extra `temporal server start-dev` arguments.
    pub async fn start_with(namespaces: &[&str], extra: &[&str]) -> DevServer {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::launch(None, dir, namespaces, extra).await
    }

    /// Starts on a given port and directory (to restart a stopped server with the same state).
    pub async fn start_on(port: u16, dir: TempDir, namespaces: &[&str]) -> DevServer {
        Self::launch(Some(port), dir, namespaces, &[]).await
    }

    /// On `port`, or on a free port picked afresh at each start-up attempt.
    async fn launch(
        port: Option<u16>,
        dir: TempDir,
        namespaces: &[&str],
        extra: &[&str],
    ) -> DevServer {
        let namespaces: Vec<String> = namespaces.iter().map(|s| s.to_string()).collect();
        let mut extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        extra.push("--headless".into());
        let log = dir.path().join("server.log");
        // Started again with fresh ports when it exits during start-up (a port taken by another
        // test just then; its own port too unless it must keep `port`); the error says what its
        // log ends with.
        match TemporalDevServer::start(
            &temporal_binary(),
            port,
            &dir.path().join("temporal.db"),
            &namespaces,
            &extra,
            &log,
        )
        .await
        {
            Ok(server) => {
                let port = server.address.port();
                DevServer { server, dir, port }
            }
            Err(e) => panic!("start the Temporal dev server: {e:#}"),
        }
    }

    pub fn address(&self) -> String {
        self.server.address.to_string()
    }

    /// A plaintext client straight to the server, bypassing the proxy (to see what it stores).
    pub async fn direct_client(
        &self,
    ) -> wf::workflow_service_client::WorkflowServiceClient<tonic::transport::Channel> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.address()))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect directly to the dev server");
        wf::workflow_service_client::WorkflowServiceClient::new(channel)
    }

    /// Stops the server but keeps its directory, for a restart.
    pub async fn stop(self) -> (u16, TempDir) {
        self.server.stop().await;
        (self.port, self.dir)
    }
}

/// Proxy config: mTLS listener on a free port, one plaintext upstream for everything.
pub fn proxy_config(pki: &Pki, upstream: &str, namespaces: &[&str]) -> Config {
    let mut text = format!(
        r#"
[listener]
address = "127.0.0.1:0"
[listener.tls]
cert = "{}"
key = "{}"
client_ca = "{}"

[limits]
shutdown_grace_seconds = 5

[upstreams.temporal]
address = "{upstream}"

[routing]
system_upstream = "temporal"
"#,
        pki.server_cert.display(),
        pki.server_key.display(),
        pki.ca_path.display()
    );
    for ns in namespaces {
        text.push_str(&format!(
            "\n[[namespaces]]\nname = \"{ns}\"\nupstream = \"temporal\"\n"
        ));
    }
    // The default test client administers everything; authorization tests bring their own.
    text.push_str("\n[authorization]\naudit_log = \"off\"\nidentity = [\"spiffe\", \"dns\", \"email\", \"cn\"]\nsystem.admins = [\"cn:test-client\"]\n");
    let keyring = pki.dir.path().join("keyring.toml");
    if !keyring.exists() {
        portcullis::crypto::Keyring::init(&keyring).expect("keyring");
    }
    text.push_str(&format!(
        "\n[encryption]\ndefault_key = \"local\"\nkeys.local = {{ provider = \"local\", keyring = \"{}\" }}\n",
        keyring.display()
    ));
    Config::from_toml(&text).expect("test config")
}

/// Like [`proxy_config`], with the given `[authorization]` section instead.
pub fn proxy_config_with_authz(
    pki: &Pki,
    upstream: &str,
    namespaces: &[&str],
    authorization: &str,
) -> Config {
    let config = proxy_config(pki, upstream, namespaces);
    let section: toml::Table = toml::from_str(authorization).expect("authorization toml");
    let mut doc: toml::Table = toml::from_str(&config.to_toml()).expect("config toml");
    doc.insert("authorization".into(), toml::Value::Table(section));
    Config::from_toml(&toml::to_string(&doc).expect("toml")).expect("config with authorization")
}

pub async fn start_proxy(config: Config) -> RunningProxy {
    init_logging();
    portcullis::server::start(config)
        .await
        .expect("start proxy")
}

/// Connection arguments shared by the Python and TypeScript client scripts.
pub fn client_args(address: SocketAddr, pki: &Pki, client: &ClientCert) -> Vec<String> {
    vec![
        "--address".into(),
        address.to_string(),
        "--ca".into(),
        pki.ca_path.display().to_string(),
        "--cert".into(),
        client.cert.display().to_string(),
        "--key".into(),
        client.key.display().to_string(),
        "--server-name".into(),
        "localhost".into(),
    ]
}

/// Runs a command to completion with a time limit; kills it when the limit passes.
pub async fn run_with_timeout(mut command: tokio::process::Command, limit: Duration) -> Output {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().expect("spawn client");
    tokio::time::timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("client did not finish within {limit:?}"))
        .expect("client output")
}

/// Runs a Python client script and returns its last JSON line; panics with its output on failure.
pub async fn run_python(script: &str, args: &[String]) -> Value {
    let mut command = tokio::process::Command::new(python());
    command
        .arg(repo_root().join("tests/clients/python").join(script))
        .args(args);
    let output = run_with_timeout(command, Duration::from_secs(120)).await;
    parse_client_output(script, &output)
}

pub fn parse_client_output(name: &str, output: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'));
    let value: Value = last
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!("{name} printed no JSON result.\nstdout:\n{stdout}\nstderr:\n{stderr}")
        });
    assert!(
        output.status.success() && value["ok"] == Value::Bool(true),
        "{name} failed ({}).\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    value
}

/// Runs the `temporal` CLI through the proxy with TLS flags; returns (success, stdout, stderr).
pub fn temporal_cli(
    address: SocketAddr,
    pki: &Pki,
    client: &ClientCert,
    args: &[&str],
) -> (bool, String, String) {
    let output = Command::new(temporal_binary())
        .args(args)
        .args(["--address", &address.to_string()])
        .args(["--tls-ca-path", &pki.ca_path.display().to_string()])
        .args(["--tls-cert-path", &client.cert.display().to_string()])
        .args(["--tls-key-path", &client.key.display().to_string()])
        .args(["--tls-server-name", "localhost"])
        .stdin(Stdio::null())
        .output()
        .expect("run temporal CLI");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A typed gRPC client (tonic) connected to the proxy with a client certificate.
pub async fn workflow_client(
    address: SocketAddr,
    pki: &Pki,
    client: &ClientCert,
) -> wf::workflow_service_client::WorkflowServiceClient<tonic::transport::Channel> {
    let channel = tls_channel(address, pki, Some(client))
        .await
        .expect("connect to proxy");
    wf::workflow_service_client::WorkflowServiceClient::new(channel)
}

pub async fn tls_channel(
    address: SocketAddr,
    pki: &Pki,
    client: Option<&ClientCert>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pki.ca_pem()))
        .domain_name("localhost");
    if let Some(client) = client {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(&client.cert).expect("read cert"),
            std::fs::read(&client.key).expect("read key"),
        ));
    }
    Endpoint::from_shared(format!("https://{address}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// A raw HTTP/2 client over mTLS, for sending bytes no well-behaved client would send.
pub struct RawClient {
    client: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Full<Bytes>,
    >,
    address: SocketAddr,
}

pub struct RawResponse {
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: HeaderMap,
}

impl RawResponse {
    /// grpc-status from trailers, or from headers for a trailers-only answer.
    pub fn grpc_status(&self) -> Option<i32> {
        self.trailers
            .get("grpc-status")
            .or_else(|| self.headers.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    }

    pub fn grpc_message(&self) -> String {
        self.trailers
            .get("grpc-message")
            .or_else(|| self.headers.get("grpc-message"))
            .map(|v| percent_decode(v.to_str().unwrap_or_default()))
            .unwrap_or_default()
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 3 <= bytes.len() {
            if let Some(b) = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl RawClient {
    pub fn new(address: SocketAddr, pki: &Pki, client: &ClientCert) -> RawClient {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(&pki.ca_path).expect("ca"))
            .expect("add ca");
        let certs = CertificateDer::pem_file_iter(&client.cert)
            .expect("cert")
            .collect::<Result<Vec<_>, _>>()
            .expect("certs");
        let key = PrivateKeyDer::from_pem_file(&client.key).expect("key");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .expect("client auth");
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only()
            .enable_http2()
            .build();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .http2_only(true)
                .build(connector);
        RawClient { client, address }
    }

    pub async fn call(&self, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> RawResponse {
        let mut request = Request::post(format!("https://localhost:{}{path}", self.address.port()))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let request = request.body(Full::new(Bytes::from(body))).expect("request");
        let response = self.client.request(request).await.expect("raw call");
        let (parts, body) = response.into_parts();
        let collected = body.collect().await.expect("body");
        RawResponse {
            headers: parts.headers,
            trailers: collected.trailers().cloned().unwrap_or_default(),
            body: collected.to_bytes(),
        }
    }
}

/// Frames a protobuf message for gRPC (uncompressed).
pub fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8];
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

pub const WORKFLOW_SERVICE: &str = "/temporal.api.workflowservice.v1.WorkflowService";

/// A minimal plaintext HTTP/2 gRPC upstream that records request headers and answers every call
/// with an empty message and `grpc-status: 0`. For focused tests of header handling only.
pub struct FakeUpstream {
    pub address: SocketAddr,
    pub seen: Arc<std::sync::Mutex<Vec<HeaderMap>>>,
    /// Calls to `*/PollWorkflowTaskQueue` are held forever; these count held calls and held
    /// calls whose stream the proxy cancelled.
    pub held: Arc<std::sync::atomic::AtomicUsize>,
    pub cancelled: Arc<std::sync::atomic::AtomicUsize>,
    /// Every request body that arrived (path, framed body), in order.
    pub bodies: Arc<std::sync::Mutex<Vec<(String, Bytes)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeUpstream {
    pub async fn start() -> FakeUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("addr");
        let seen: Arc<std::sync::Mutex<Vec<HeaderMap>>> = Arc::default();
        let held: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let cancelled: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let bodies: Arc<std::sync::Mutex<Vec<(String, Bytes)>>> = Arc::default();
        let (recorder, held_counter, cancel_counter, body_recorder) = (
            seen.clone(),
            held.clone(),
            cancelled.clone(),
            bodies.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (recorder, held, cancelled, bodies) = (
                    recorder.clone(),
                    held_counter.clone(),
                    cancel_counter.clone(),
                    body_recorder.clone(),
                );
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: Request<hyper::body::Incoming>| {
                            let (recorder, held, cancelled, bodies) = (
                                recorder.clone(),
                                held.clone(),
                                cancelled.clone(),
                                bodies.clone(),
                            );
                            async move {
                                recorder
                                    .lock()
                                    .expect("lock")
                                    .push(request.headers().clone());
                                if request.uri().path().ends_with("/PollWorkflowTaskQueue") {
                                    // hyper drops this future when the stream is reset or the
                                    // connection closes: the guard records that.
                                    struct Guard(Arc<std::sync::atomic::AtomicUsize>);
                                    impl Drop for Guard {
                                        fn drop(&mut self) {
                                            self.0
                                                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                        }
                                    }
                                    let _guard = Guard(cancelled);
                                    held.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                    std::future::pending::<()>().await;
                                }
                                let path = request.uri().path().to_string();
                                if let Ok(body) = request.into_body().collect().await {
                                    bodies.lock().expect("lock").push((path, body.to_bytes()));
                                }
                                let mut trailers = HeaderMap::new();
                                trailers.insert("grpc-status", "0".parse().expect("value"));
                                let body = http_body_util::StreamBody::new(
                                    futures_util::stream::iter(vec![
                                        Ok::<_, std::convert::Infallible>(
                                            hyper::body::Frame::data(Bytes::from(grpc_frame(&[]))),
                                        ),
                                        Ok(hyper::body::Frame::trailers(trailers)),
                                    ]),
                                );
                                let response = http::Response::builder()
                                    .header("content-type", "application/grpc")
                                    .header("x-upstream", "fake")
                                    .body(body)
                                    .expect("response");
                                Ok::<_, std::convert::Infallible>(response)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                });
            }
        });
        FakeUpstream {
            address,
            seen,
            held,
            cancelled,
            bodies,
            task,
        }
    }
}

/// A rustls client config trusting the test CA, with the client certificate if any, ALPN h2.
pub fn client_tls_config(pki: &Pki, client: Option<&ClientCert>) -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(&pki.ca_path).expect("ca"))
        .expect("add ca");
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots);
    let mut config = match client {
        Some(c) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(&c.cert)
                    .expect("cert")
                    .collect::<Result<Vec<_>, _>>()
                    .expect("certs"),
                PrivateKeyDer::from_pem_file(&c.key).expect("key"),
            )
            .expect("client auth"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    config
}

/// Completes a TLS handshake with the proxy and reads its first bytes. With TLS 1.3 a refused
/// client certificate shows up as an alert on that first read. Ok means the proxy spoke HTTP/2.
pub async fn tls_probe(
    address: SocketAddr,
    pki: &Pki,
    client: Option<&ClientCert>,
) -> Result<(), String> {
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = client_tls_config(pki, client);
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from("localhost").expect("name");
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut buf))
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| e.to_string())?;
    // The server's first frame is SETTINGS (type 4).
    if buf[3] == 4 {
        Ok(())
    } else {
        Err(format!("unexpected first frame {buf:?}"))
    }
}

/// The methods and fields [`newer_api_descriptor_set`] adds to Temporal's API.
pub const FUTURE_METHOD: &str = "/temporal.api.workflowservice.v1.WorkflowService/FutureMethod";
pub const FUTURE_PAYLOAD_FIELD: u32 = 999;

/// The built-in descriptor set as a newer Temporal API might look: a WorkflowService method
/// `FutureMethod` (a namespace and a payload in, a payload out) and a new payload field
/// `StartWorkflowExecutionRequest.future_input` (Payloads, field 999).
pub fn newer_api_descriptor_set() -> Vec<u8> {
    use prost::Message as _;
    use prost_reflect::prost_types::{
        field_descriptor_proto::{Label, Type},
        DescriptorProto, FieldDescriptorProto, FileDescriptorSet, MethodDescriptorProto,
    };
    let mut set = FileDescriptorSet::decode(portcullis::schema::DESCRIPTOR_SET).expect("set");
    let field =
        |name: &str, number: i32, kind: Type, type_name: Option<&str>| FieldDescriptorProto {
            name: Some(name.into()),
            number: Some(number),
            label: Some(Label::Optional as i32),
            r#type: Some(kind as i32),
            type_name: type_name.map(str::to_string),
            json_name: Some(name.into()),
            ..Default::default()
        };
    const PAYLOADS: &str = ".temporal.api.common.v1.Payloads";
    for file in &mut set.file {
        match file.name() {
            "temporal/api/workflowservice/v1/request_response.proto" => {
                file.message_type.push(DescriptorProto {
                    name: Some("FutureMethodRequest".into()),
                    field: vec![
                        field("namespace", 1, Type::String, None),
                        field("input", 2, Type::Message, Some(PAYLOADS)),
                    ],
                    ..Default::default()
                });
                file.message_type.push(DescriptorProto {
                    name: Some("FutureMethodResponse".into()),
                    field: vec![field("output", 1, Type::Message, Some(PAYLOADS))],
                    ..Default::default()
                });
                let start = file
                    .message_type
                    .iter_mut()
                    .find(|m| m.name() == "StartWorkflowExecutionRequest")
                    .expect("StartWorkflowExecutionRequest");
                start.field.push(field(
                    "future_input",
                    FUTURE_PAYLOAD_FIELD as i32,
                    Type::Message,
                    Some(PAYLOADS),
                ));
            }
            "temporal/api/workflowservice/v1/service.proto" => {
                let service = file
                    .service
                    .iter_mut()
                    .find(|s| s.name() == "WorkflowService")
                    .expect("WorkflowService");
                service.method.push(MethodDescriptorProto {
                    name: Some("FutureMethod".into()),
                    input_type: Some(".temporal.api.workflowservice.v1.FutureMethodRequest".into()),
                    output_type: Some(
                        ".temporal.api.workflowservice.v1.FutureMethodResponse".into(),
                    ),
                    ..Default::default()
                });
            }
            _ => {}
        }
    }
    set.encode_to_vec()
}

/// The built-in descriptor set without `StartWorkflowExecutionRequest.input`: an older or
/// altered API under which that payload would pass unsealed.
pub fn descriptor_set_without_start_input() -> Vec<u8> {
    use prost::Message as _;
    use prost_reflect::prost_types::FileDescriptorSet;
    let mut set = FileDescriptorSet::decode(portcullis::schema::DESCRIPTOR_SET).expect("set");
    for file in &mut set.file {
        for message in &mut file.message_type {
            if message.name() == "StartWorkflowExecutionRequest" {
                message.field.retain(|f| f.name() != "input");
            }
        }
    }
    set.encode_to_vec()
}

/// A raw HTTP/2 connection (the h2 crate) over TLS, with or without a client certificate: for
/// tests that need control over streams and DATA frames. `closed` completes when the
/// connection ends (e.g. after the proxy's GOAWAY).
pub struct H2Connection {
    pub send: h2::client::SendRequest<Bytes>,
    pub closed: tokio::task::JoinHandle<Result<(), h2::Error>>,
}

pub async fn h2_connect(
    address: SocketAddr,
    pki: &Pki,
    client: Option<&ClientCert>,
) -> Result<H2Connection, String> {
    use rustls::pki_types::ServerName;
    let config = client_tls_config(pki, client);
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (send, connection) = h2::client::Builder::new()
        // Room for the proxy's own limit (and more) on one connection.
        .initial_max_send_streams(2000)
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(|e| e.to_string())?;
    let closed = tokio::spawn(connection);
    let send = send.ready().await.map_err(|e| e.to_string())?;
    Ok(H2Connection { send, closed })
}

/// A gRPC request head for `path` with extra headers.
pub fn grpc_head(path: &str, headers: &[(&str, &str)]) -> Request<()> {
    let mut request = Request::post(format!("https://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    request.body(()).expect("request")
}

/// The gRPC status and message of an h2 response (trailers-only or with trailers).
pub async fn h2_grpc_status(
    response: h2::client::ResponseFuture,
) -> Result<(i32, String), h2::Error> {
    let response = response.await?;
    let status_of = |h: &HeaderMap| -> Option<(i32, String)> {
        let code = h.get("grpc-status")?.to_str().ok()?.parse().ok()?;
        let message = h
            .get("grpc-message")
            .map(|v| percent_decode(v.to_str().unwrap_or_default()))
            .unwrap_or_default();
        Some((code, message))
    };
    if let Some(status) = status_of(response.headers()) {
        return Ok(status);
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await?.unwrap_or_default();
    Ok(status_of(&trailers).unwrap_or((-1, "no grpc-status".into())))
}

/// How often `needle` occurs in the dev server's database files (the file and any journal), in
/// any of the leak detector's encodings.
pub fn occurrences(db: &Path, needle: &str) -> usize {
    let dir = db.parent().expect("db dir");
    let stem = db
        .file_name()
        .expect("db name")
        .to_string_lossy()
        .into_owned();
    let mut count = 0;
    for entry in std::fs::read_dir(dir).expect("read db dir") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !name.starts_with(&stem) {
            continue;
        }
        // A journal can vanish between listing and reading.
        if let Ok(bytes) = std::fs::read(&path) {
            // In any encoding the leak detector knows (the server may keep JSON or base64).
            for (_, form) in leak::encodings(needle.as_bytes()) {
                count += bytes.windows(form.len()).filter(|w| *w == form).count();
            }
        }
    }
    count
}
