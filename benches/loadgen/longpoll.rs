//! `--long-polls N`: what held long polls cost the proxy, measured on the real binary as its own
//! process (`portcullis serve`), as a worker fleet would hold them. And `--soak SECS`: the
//! realistic mix plus held long polls against the dev server for a long time, watching the
//! proxy's memory for growth.
//!
//! Memory is read from `/proc/PID/status` (VmRSS, RssAnon, RssFile, VmHWM) and CPU from
//! `/proc/PID/stat` (user + system ticks of all its threads).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use http::Uri;
use prost::Message;
use serde_json::json;
use tokio::runtime::Handle;
use tokio::task::JoinSet;

use http_body_util::Full;
use hyper::client::conn::http2::SendRequest;

use super::{
    h2_connect, load_average, round, unary, Args, Client, Endpoint, FakeUpstream, Kind, Mix, Pki,
    Requests, Rng, NAMESPACE, SERVICE,
};
use temporalio_protos::temporal::api::command::v1 as command;
use temporalio_protos::temporal::api::common::v1 as common;
use temporalio_protos::temporal::api::enums::v1 as enums;
use temporalio_protos::temporal::api::taskqueue::v1 as taskqueue;
use temporalio_protos::temporal::api::workflowservice::v1 as ws;

/// Memory of a process, from `/proc/PID/status`, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    pub rss: u64,
    pub anon: u64,
    pub file: u64,
    pub hwm: u64,
}

impl Memory {
    pub fn of(pid: u32) -> Memory {
        let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Memory {
            rss: field("VmRSS:"),
            anon: field("RssAnon:"),
            file: field("RssFile:"),
            hwm: field("VmHWM:"),
        }
    }

    fn json(&self) -> serde_json::Value {
        json!({"rss_kib": self.rss, "anon_kib": self.anon, "file_kib": self.file, "hwm_kib": self.hwm})
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// CPU seconds used so far by a process (all its threads).
fn process_cpu_seconds(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| super::ticks_from_stat(&s))
        .map_or(0.0, |(_, ticks)| ticks as f64 * 0.01)
}

/// `portcullis serve` as its own process, with the realistic config of the benchmarks: TLS
/// requiring client certificates, authorization with a file audit log, encryption with a local
/// keyring, one upstream, an admin listener. Stopped (SIGTERM, then SIGKILL) when dropped.
pub struct ProxyProcess {
    child: std::process::Child,
    pub pid: u32,
    pub addr: std::net::SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ProxyProcess {
    pub async fn start(
        binary: &Path,
        pki: &Pki,
        upstream: std::net::SocketAddr,
    ) -> anyhow::Result<ProxyProcess> {
        if !binary.is_file() {
            bail!(
                "the proxy binary {} does not exist: build it (`cargo build --release`) or pass --proxy-binary",
                binary.display()
            );
        }
        let dir = tempfile::tempdir()?;
        let root = dir.path();
        let port = portcullis::dev::free_port()?;
        let admin = portcullis::dev::free_port()?;
        let keyring = root.join("keys").join("keyring.toml");
        std::fs::create_dir_all(root.join("keys"))?;
        std::fs::create_dir_all(root.join("audit"))?;
        portcullis::crypto::Keyring::init(&keyring).context("cannot create the keyring")?;
        let config = format!(
            r#"
[listener]
address = "127.0.0.1:{port}"

[listener.tls]
cert = "{cert}"
key = "{key}"
client_ca = "{ca}"
require_client_cert = true

[limits]
shutdown_grace_seconds = 2

[admin]
listen = "127.0.0.1:{admin}"

[upstreams.upstream]
address = "{upstream}"

[routing]
system_upstream = "upstream"
default_upstream = "upstream"

[authorization]
identity = ["spiffe", "dns", "email", "cn"]
audit_log = "{audit}"

[authorization.system]
readers = ["cn:loadgen-client"]

[[authorization.namespaces]]
name = "{NAMESPACE}"
writers = ["cn:loadgen-client"]

[encryption]
default_key = "main"

[encryption.keys.main]
provider = "local"
keyring = "{keyring}"
"#,
            cert = pki.server_cert.display(),
            key = pki.server_key.display(),
            ca = pki.ca.display(),
            audit = root.join("audit").join("audit.jsonl").display(),
            keyring = keyring.display(),
        );
        // LOADGEN_PROXY_EXTRA_CONFIG: TOML appended to the config (e.g. a `[schema]` section).
        let config = config + &std::env::var("LOADGEN_PROXY_EXTRA_CONFIG").unwrap_or_default();
        let config_path = root.join("portcullis.toml");
        std::fs::write(&config_path, config)?;
        let log = root.join("portcullis.log");
        // LOADGEN_PROXY_WRAPPER (e.g. `heaptrack -o FILE`): run the proxy under a profiler.
        let wrapper = std::env::var("LOADGEN_PROXY_WRAPPER").unwrap_or_default();
        let mut words = wrapper.split_whitespace();
        let mut command = match words.next() {
            Some(program) => {
                let mut command = std::process::Command::new(program);
                command.args(words).arg(binary);
                command
            }
            None => std::process::Command::new(binary),
        };
        let child = command
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env("PORTCULLIS_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(root.join("stderr.log"))?)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let mut pid = child.id();
        if !wrapper.is_empty() {
            // The proxy is a descendant of the wrapper.
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let found = super::descendants(child.id()).into_iter().find(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/comm"))
                        .is_ok_and(|c| c.starts_with("portcullis"))
                });
                if let Some(found) = found {
                    pid = found;
                    break;
                }
                if Instant::now() > deadline {
                    bail!("no portcullis process under the wrapper {wrapper:?}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let mut proxy = ProxyProcess {
            child,
            pid,
            addr: ([127, 0, 0, 1], port).into(),
            log: root.join("stderr.log"),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = proxy.child.try_wait()? {
                bail!(
                    "the proxy exited ({status}) at start; its log:\n{}",
                    proxy.log_text()
                );
            }
            if tokio::net::TcpStream::connect(proxy.addr).await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the proxy did not listen within 30 s; its log:\n{}",
                    proxy.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(proxy)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn memory(&self) -> Memory {
        Memory::of(self.pid)
    }

    pub fn cpu_seconds(&self) -> f64 {
        process_cpu_seconds(self.pid)
    }

    /// Still the same process, running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if super::terminate(&mut self.child, Duration::from_secs(10)) {
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The proxy binary next to this bench binary (`target/release/deps/loadgen-…` →
/// `target/release/portcullis`).
pub fn default_proxy_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            exe.parent()
                .and_then(Path::parent)
                .map(|dir| dir.join("portcullis"))
        })
        .unwrap_or_else(|| PathBuf::from("target/release/portcullis"))
}

fn poll_request(queue: &str) -> Bytes {
    Bytes::from(
        ws::PollWorkflowTaskQueueRequest {
            namespace: NAMESPACE.into(),
            task_queue: Some(taskqueue::TaskQueue {
                name: queue.into(),
                kind: enums::TaskQueueKind::Normal as i32,
                ..Default::default()
            }),
            identity: "portcullis-loadgen-poller".into(),
            ..Default::default()
        }
        .encode_to_vec(),
    )
}

fn method_uri(endpoint: &Endpoint, method: &str) -> anyhow::Result<Uri> {
    Ok(format!(
        "https://localhost:{}{SERVICE}{method}",
        endpoint.addr.port()
    )
    .parse()?)
}

/// What one phase of the long-poll run measured.
struct Phase {
    name: String,
    memory: Memory,
    /// CPU ms per second of the proxy over the phase's window, if measured.
    cpu_ms_per_s: Option<f64>,
    polls: usize,
}

/// Held polls and their outcomes.
#[derive(Default)]
struct PollCounters {
    sent: AtomicUsize,
    ok: AtomicUsize,
    failed: AtomicUsize,
    tasks: AtomicUsize,
}

/// `--long-polls N`: holds N PollWorkflowTaskQueue calls through the proxy process over
/// `--poll-connections` connections, `--rounds` times, and reports the proxy's memory idle,
/// with the polls held, and after they were answered, plus its CPU per held poll.
pub async fn run_long_polls(
    args: &Args,
    pki: &Pki,
    client_tls: &Arc<rustls::ClientConfig>,
    fake_rt: &Handle,
    dev_binary: Option<&Path>,
) -> anyhow::Result<()> {
    let polls = args.long_polls;
    let connections = args
        .poll_connections
        .unwrap_or_else(|| polls.div_ceil(500).max(1));
    let binary = args
        .proxy_binary
        .clone()
        .unwrap_or_else(default_proxy_binary);
    let load_start = load_average();
    // The upstream: the fake (answers when told, or at the caller's deadline) or a dev server
    // (answers at the deadline).
    let fake;
    let dev;
    let dev_dir = tempfile::tempdir()?;
    let upstream = match dev_binary {
        None => {
            fake = Some(FakeUpstream::start(fake_rt, None)?);
            dev = None;
            fake.as_ref()
                .map(|f| f.addr)
                .unwrap_or(([127, 0, 0, 1], 0).into())
        }
        Some(binary) => {
            fake = None;
            let server = start_dev_server(binary, dev_dir.path()).await?;
            let address = server.address;
            dev = Some(server);
            address
        }
    };
    let target = if dev.is_some() { "dev" } else { "fake" };
    let outcome = async {
        let proxy = ProxyProcess::start(&binary, pki, upstream).await?;
        let endpoint = Endpoint {
            addr: proxy.addr,
            tls: Some(client_tls.clone()),
        };
        eprintln!(
            "loadgen: long polls: {polls} over {connections} connections through {} (pid {}), target {target}, {} round(s), held {:.0} s each",
            binary.display(),
            proxy.pid,
            args.rounds,
            args.poll_hold.as_secs_f64()
        );
        let mut phases = Vec::new();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (idle_cpu, _) = cpu_rate(&proxy, Duration::from_secs(5)).await;
        phases.push(Phase {
            name: "idle (no client connection)".into(),
            memory: proxy.memory(),
            cpu_ms_per_s: Some(idle_cpu),
            polls: 0,
        });
        let client = Client::connect(&endpoint, connections).await?;
        // One call per connection first, so every connection (and the upstream's) is set up.
        for i in 0..connections {
            let mut sender = client.sender(i);
            let uri = &client.uris[Kind::GetSystemInfo.index()];
            Client::call(
                &mut sender,
                uri,
                Kind::GetSystemInfo,
                &ws::GetSystemInfoRequest::default().encode_to_vec(),
            )
            .await
            .map_err(|e| anyhow!("GetSystemInfo through the proxy failed: {e}"))?;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        phases.push(Phase {
            name: format!("{connections} connections open, no call"),
            memory: proxy.memory(),
            cpu_ms_per_s: None,
            polls: 0,
        });
        let uri = method_uri(&endpoint, "PollWorkflowTaskQueue")?;
        let counters = Arc::new(PollCounters::default());
        let mut held_cpu = Vec::new();
        for round in 1..=args.rounds {
            let timeout = format!(
                "{}S",
                match &fake {
                    // The fake is released first; the deadline is a backstop.
                    Some(_) => args.poll_hold.as_secs() + 30,
                    None => args.poll_hold.as_secs().max(5),
                }
            );
            let started = Instant::now();
            let mut tasks = JoinSet::new();
            let message = poll_request("loadgen-longpoll");
            let interval = Duration::from_secs_f64(1.0 / args.poll_ramp.max(1) as f64);
            let mut next = tokio::time::Instant::now();
            for i in 0..polls {
                let mut sender = client.sender(i);
                let (uri, message, timeout, counters) =
                    (uri.clone(), message.clone(), timeout.clone(), counters.clone());
                tasks.spawn(async move {
                    counters.sent.fetch_add(1, Ordering::Relaxed);
                    match unary(&mut sender, &uri, Some(NAMESPACE), &timeout, &message).await {
                        Ok(message) => match ws::PollWorkflowTaskQueueResponse::decode(message) {
                            Ok(_) => {
                                counters.ok.fetch_add(1, Ordering::Relaxed);
                                Ok(())
                            }
                            Err(e) => Err(format!("bad PollWorkflowTaskQueueResponse: {e}")),
                        },
                        Err(e) => Err(e),
                    }
                    .inspect_err(|_| {
                        counters.failed.fetch_add(1, Ordering::Relaxed);
                    })
                });
                next += interval;
                tokio::time::sleep_until(next).await;
            }
            // Held: the fake says so; the dev server gives no sign, so wait a little.
            match &fake {
                Some(fake) => {
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while fake.gate.held() < polls {
                        if Instant::now() > deadline {
                            bail!(
                                "round {round}: only {} of {polls} polls reached the fake upstream",
                                fake.gate.held()
                            );
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                None => tokio::time::sleep(Duration::from_secs(2)).await,
            }
            let opened = started.elapsed();
            // The window: what remains of the hold (at least a few seconds).
            let window = args
                .poll_hold
                .saturating_sub(opened)
                .saturating_sub(Duration::from_secs(3))
                .max(Duration::from_secs(3));
            let (cpu, _) = cpu_rate(&proxy, window).await;
            held_cpu.push(cpu);
            phases.push(Phase {
                name: format!("round {round}: {polls} polls held"),
                memory: proxy.memory(),
                cpu_ms_per_s: Some(cpu),
                polls,
            });
            if let Some(fake) = &fake {
                fake.gate.release_all();
            }
            let mut errors = Vec::new();
            while let Some(result) = tasks.join_next().await {
                if let Err(e) = result.map_err(|e| e.to_string()).and_then(|r| r) {
                    if errors.len() < 5 {
                        errors.push(e);
                    }
                }
            }
            for e in &errors {
                eprintln!("loadgen: round {round}: poll failed: {e}");
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            phases.push(Phase {
                name: format!("round {round}: answered, connections open"),
                memory: proxy.memory(),
                cpu_ms_per_s: None,
                polls: 0,
            });
        }
        drop(client);
        tokio::time::sleep(Duration::from_secs(2)).await;
        phases.push(Phase {
            name: "connections closed".into(),
            memory: proxy.memory(),
            cpu_ms_per_s: None,
            polls: 0,
        });
        let mut proxy = proxy;
        let alive = proxy.alive();
        report_long_polls(
            args,
            target,
            &binary,
            connections,
            &phases,
            idle_cpu,
            &held_cpu,
            &counters,
            alive,
            &load_start,
        );
        anyhow::Ok(())
    }
    .await;
    if let Some(server) = dev {
        server.stop().await;
    }
    drop(fake);
    outcome
}

/// The proxy's CPU in ms per second over `window`.
async fn cpu_rate(proxy: &ProxyProcess, window: Duration) -> (f64, f64) {
    let before = proxy.cpu_seconds();
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let used = proxy.cpu_seconds() - before;
    let seconds = started.elapsed().as_secs_f64();
    (used * 1000.0 / seconds, seconds)
}

#[allow(clippy::too_many_arguments)]
fn report_long_polls(
    args: &Args,
    target: &str,
    binary: &Path,
    connections: usize,
    phases: &[Phase],
    idle_cpu: f64,
    held_cpu: &[f64],
    counters: &PollCounters,
    alive: bool,
    load_start: &str,
) {
    let polls = args.long_polls;
    println!();
    println!(
        "long polls: {polls} PollWorkflowTaskQueue over {connections} connections, target {target}, proxy {} (own process)",
        binary.display()
    );
    println!(
        "{:<42} {:>10} {:>10} {:>10} {:>10} {:>12}",
        "phase", "VmRSS MiB", "anon MiB", "file MiB", "VmHWM MiB", "CPU ms/s"
    );
    for p in phases {
        println!(
            "{:<42} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>12}",
            p.name,
            mib(p.memory.rss),
            mib(p.memory.anon),
            mib(p.memory.file),
            mib(p.memory.hwm),
            p.cpu_ms_per_s
                .map_or_else(String::new, |c| format!("{c:.2}"))
        );
    }
    let connected = phases.get(1).map_or(0, |p| p.memory.rss);
    for p in phases.iter().filter(|p| p.polls > 0) {
        let per_poll = (p.memory.rss as f64 - connected as f64) * 1024.0 / p.polls as f64;
        println!(
            "{}: {:.2} KiB of RSS per held poll (over the connected state)",
            p.name,
            per_poll / 1024.0
        );
    }
    for (i, cpu) in held_cpu.iter().enumerate() {
        let per_poll = (cpu - idle_cpu).max(0.0) * 1000.0 / polls.max(1) as f64;
        println!(
            "round {}: proxy CPU {cpu:.2} ms/s with the polls held (idle {idle_cpu:.2}): {per_poll:.3} µs per held poll per second",
            i + 1
        );
    }
    let sent = counters.sent.load(Ordering::Relaxed);
    let ok = counters.ok.load(Ordering::Relaxed);
    let failed = counters.failed.load(Ordering::Relaxed);
    println!(
        "polls: {sent} sent, {ok} answered OK, {failed} failed; proxy process {}",
        if alive {
            "still running (no restart)"
        } else {
            "NOT running"
        }
    );
    println!(
        "load average (1/5/15 min) at start: {load_start}; at end: {}",
        load_average()
    );
    for p in phases {
        println!(
            "RESULT {}",
            json!({
                "kind": "long-polls",
                "target": target,
                "polls": polls,
                "connections": connections,
                "phase": p.name,
                "memory": p.memory.json(),
                "cpu_ms_per_s": p.cpu_ms_per_s.map(|c| round(c, 3)),
            })
        );
    }
    println!(
        "RESULT {}",
        json!({
            "kind": "long-polls-summary",
            "target": target,
            "polls": polls,
            "connections": connections,
            "idle_rss_kib": phases.first().map(|p| p.memory.rss),
            "held_rss_kib": phases.iter().filter(|p| p.polls > 0).map(|p| p.memory.rss).collect::<Vec<_>>(),
            "cpu_us_per_held_poll_per_s": held_cpu.iter().map(|c| round((c - idle_cpu).max(0.0) * 1000.0 / polls.max(1) as f64, 4)).collect::<Vec<_>>(),
            "sent": sent, "ok": ok, "failed": failed, "proxy_alive": alive,
        })
    );
}

/// A dev server for long polls and the soak: rate limits lifted, and the per-namespace cap on
/// concurrent long polls (about 1,200 by default) raised.
async fn start_dev_server(
    binary: &Path,
    dir: &Path,
) -> anyhow::Result<portcullis::dev::TemporalDevServer> {
    let port = portcullis::dev::free_port()?;
    let log = dir.join("temporal.log");
    let extra: Vec<String> = [
        "frontend.rps=1000000",
        "frontend.namespaceRPS=1000000",
        "frontend.globalNamespaceRPS=1000000",
        "frontend.namespaceCount=100000",
        "frontend.globalNamespaceCount=100000",
    ]
    .iter()
    .flat_map(|v| ["--dynamic-config-value".to_string(), v.to_string()])
    .collect();
    eprintln!(
        "loadgen: starting the Temporal dev server ({}) on port {port}",
        binary.display()
    );
    let server = portcullis::dev::TemporalDevServer::start(
        binary,
        Some(port),
        &dir.join("temporal.db"),
        &[],
        &extra,
        &log,
    )
    .await?;
    let direct = Endpoint {
        addr: server.address,
        tls: None,
    };
    super::wait_until_ready(&direct).await?;
    Ok(server)
}

// ---------------------------------------------------------------------------------------------
// Soak

/// Client connections that are opened again when the proxy closes them, as SDK clients do: the
/// proxy sends GOAWAY at `max_connection_age_seconds` (300 s by default), lets the calls in
/// flight finish, and new calls must go on a new connection.
struct Connections {
    endpoint: Endpoint,
    /// Each slot: its generation (bumped at each reconnect) and its connection.
    slots: Vec<tokio::sync::Mutex<(u64, SendRequest<Full<Bytes>>)>>,
    /// Calls that failed at the connection level and went again on a new connection.
    retried: AtomicU64,
}

impl Connections {
    async fn open(endpoint: &Endpoint, count: usize) -> anyhow::Result<Arc<Connections>> {
        let mut slots = Vec::new();
        for _ in 0..count.max(1) {
            slots.push(tokio::sync::Mutex::new((0, h2_connect(endpoint).await?)));
        }
        Ok(Arc::new(Connections {
            endpoint: endpoint.clone(),
            slots,
            retried: AtomicU64::new(0),
        }))
    }

    async fn get(&self, index: usize) -> (u64, SendRequest<Full<Bytes>>) {
        let slot = self.slots[index % self.slots.len()].lock().await;
        (slot.0, slot.1.clone())
    }

    /// A new connection in the slot, unless another task already replaced the one of
    /// `generation`.
    async fn renew(
        &self,
        index: usize,
        generation: u64,
    ) -> Result<(u64, SendRequest<Full<Bytes>>), String> {
        let mut slot = self.slots[index % self.slots.len()].lock().await;
        if slot.0 == generation {
            let sender = h2_connect(&self.endpoint)
                .await
                .map_err(|e| format!("cannot reconnect: {e:#}"))?;
            *slot = (generation + 1, sender);
        }
        Ok((slot.0, slot.1.clone()))
    }

    /// Sends `call` on `current` (the slot's connection and its generation); when the
    /// connection failed rather than the call, renews it and sends once more, as gRPC clients
    /// do after a GOAWAY.
    async fn send<T, F, Fut>(
        &self,
        index: usize,
        current: &mut (u64, SendRequest<Full<Bytes>>),
        mut call: F,
    ) -> Result<T, String>
    where
        F: FnMut(SendRequest<Full<Bytes>>) -> Fut,
        Fut: std::future::Future<Output = Result<T, String>>,
    {
        match call(current.1.clone()).await {
            Err(e) if connection_failure(&e) => {
                *current = self.renew(index, current.0).await?;
                self.retried.fetch_add(1, Ordering::Relaxed);
                call(current.1.clone()).await
            }
            other => other,
        }
    }
}

/// A failure of the connection rather than of the call (hyper's wording): after the proxy's
/// GOAWAY the call was not taken, and a gRPC client sends it again on a new connection.
fn connection_failure(error: &str) -> bool {
    error.starts_with("connection not ready") || error.starts_with("request failed")
}

/// `--soak SECS` (dev target): the proxy as its own process in front of a dev server; the
/// closed-loop mix at `--concurrency` plus `--long-polls` pollers that keep a poll held at all
/// times on the task queue the started workflows use, completing every workflow task they get.
/// The proxy's RSS is sampled every 10 s; the run reports the series, its trend, the errors and
/// whether the proxy process is still the same one.
pub async fn run_soak(
    args: &Args,
    pki: &Pki,
    client_tls: &Arc<rustls::ClientConfig>,
    dev_binary: &Path,
) -> anyhow::Result<()> {
    let soak = args.soak.unwrap_or_default();
    let binary = args
        .proxy_binary
        .clone()
        .unwrap_or_else(default_proxy_binary);
    let load_start = load_average();
    let dir = tempfile::tempdir()?;
    let server = start_dev_server(dev_binary, dir.path()).await?;
    let outcome = async {
        let mut proxy = ProxyProcess::start(&binary, pki, server.address).await?;
        let endpoint = Endpoint {
            addr: proxy.addr,
            tls: Some(client_tls.clone()),
        };
        let pollers = args.long_polls;
        let poll_connections = args
            .poll_connections
            .unwrap_or_else(|| pollers.div_ceil(500).max(1));
        eprintln!(
            "loadgen: soak for {soak:?}: mix {} at concurrency {}, {pollers} long pollers over {poll_connections} connections, proxy {} (pid {})",
            args.mix.text,
            args.concurrency,
            binary.display(),
            proxy.pid
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        let idle = proxy.memory();
        let requests = Arc::new(Requests::new(args.payload_bytes));
        let until = Instant::now() + soak;
        let calls = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let first_errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let note = {
            let (errors, first_errors) = (errors.clone(), first_errors.clone());
            move |what: String| {
                errors.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut first) = first_errors.lock() {
                    if first.len() < 10 {
                        first.push(what);
                    }
                }
            }
        };
        let mut tasks = JoinSet::new();
        // The mix: closed loop, like `measure`.
        let client = Client::connect(&endpoint, args.connections).await?;
        let mix_connections = Connections::open(&endpoint, args.connections).await?;
        let label = "soak";
        if args.mix.contains(Kind::Signal) {
            let mut sender = client.sender(0);
            for task in 0..args.concurrency {
                let id = requests.signal_workflow_id(label, task);
                // Signal targets run on a task queue nobody polls: they stay open.
                let message = start_on_queue(&requests, id, "loadgen-signal-targets");
                let uri = &client.uris[Kind::StartWorkflow.index()];
                Client::call(&mut sender, uri, Kind::StartWorkflow, &message)
                    .await
                    .map_err(|e| anyhow!("cannot start the workflows to signal: {e}"))?;
            }
        }
        for task in 0..args.concurrency {
            let connections = mix_connections.clone();
            let uris = client.uris.clone();
            let mix: Mix = args.mix.clone();
            let requests = requests.clone();
            let (calls, note) = (calls.clone(), note.clone());
            tasks.spawn(async move {
                let mut rng = Rng::new(task as u64 + 7);
                let mut seq = 0u64;
                let mut current = connections.get(task).await;
                while Instant::now() < until {
                    let kind = mix.pick(&mut rng);
                    let message = requests.build(kind, label, task, seq);
                    seq += 1;
                    let (uri, message) = (&uris[kind.index()], &message);
                    let result = connections
                        .send(task, &mut current, |mut sender| async move {
                            tokio::time::timeout(
                                Duration::from_secs(30),
                                Client::call(&mut sender, uri, kind, message),
                            )
                            .await
                            .unwrap_or_else(|_| Err("no answer within 30 s".into()))
                        })
                        .await;
                    calls.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = result {
                        note(format!("{}: {e}", kind.method()));
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            });
        }
        // The pollers: each keeps one poll held, and completes the workflow tasks it gets.
        let poll_client = Connections::open(&endpoint, poll_connections).await?;
        let poll_uri = method_uri(&endpoint, "PollWorkflowTaskQueue")?;
        let respond_uri = method_uri(&endpoint, "RespondWorkflowTaskCompleted")?;
        let polls = Arc::new(PollCounters::default());
        for i in 0..pollers {
            let connections = poll_client.clone();
            let (poll_uri, respond_uri) = (poll_uri.clone(), respond_uri.clone());
            let (polls, note, calls) = (polls.clone(), note.clone(), calls.clone());
            tasks.spawn(async move {
                // Ramp up (about 500 new polls per second: the dev server rate-limits new calls
                // per namespace).
                tokio::time::sleep(Duration::from_millis(2 * i as u64)).await;
                let message = poll_request("loadgen");
                let mut current = connections.get(i).await;
                while Instant::now() < until {
                    // Each poll is held up to 30 s by the server (then answered empty).
                    let left = until.saturating_duration_since(Instant::now());
                    let timeout = format!("{}S", left.as_secs().clamp(5, 30));
                    polls.sent.fetch_add(1, Ordering::Relaxed);
                    let (uri, timeout, poll) = (&poll_uri, &timeout, &message);
                    let answer = connections
                        .send(i, &mut current, |mut sender| async move {
                            unary(&mut sender, uri, Some(NAMESPACE), timeout, poll).await
                        })
                        .await;
                    let answer = answer.and_then(|m| {
                            ws::PollWorkflowTaskQueueResponse::decode(m)
                                .map_err(|e| format!("bad PollWorkflowTaskQueueResponse: {e}"))
                        });
                    calls.fetch_add(1, Ordering::Relaxed);
                    match answer {
                        Ok(task) if task.task_token.is_empty() => {
                            polls.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(task) => {
                            polls.ok.fetch_add(1, Ordering::Relaxed);
                            polls.tasks.fetch_add(1, Ordering::Relaxed);
                            let respond = complete_workflow_task(task.task_token);
                            calls.fetch_add(1, Ordering::Relaxed);
                            let (uri, respond) = (&respond_uri, &respond);
                            let result = connections
                                .send(i, &mut current, |mut sender| async move {
                                    unary(&mut sender, uri, Some(NAMESPACE), "10S", respond).await
                                })
                                .await;
                            if let Err(e) = result {
                                note(format!("RespondWorkflowTaskCompleted: {e}"));
                            }
                        }
                        Err(e) => {
                            polls.failed.fetch_add(1, Ordering::Relaxed);
                            note(format!("PollWorkflowTaskQueue: {e}"));
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
            });
        }
        // Sample the proxy's memory every 10 s.
        let mut samples: Vec<(f64, Memory)> = Vec::new();
        let started = Instant::now();
        let mut restarted = false;
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_secs(10).min(until.saturating_duration_since(Instant::now()).max(Duration::from_millis(10)))).await;
            let memory = proxy.memory();
            let t = started.elapsed().as_secs_f64();
            if !proxy.alive() {
                restarted = true;
                break;
            }
            eprintln!(
                "loadgen: soak t={t:>6.0}s  VmRSS {:.1} MiB  anon {:.1} MiB  calls {}  errors {}  polls held now ~{}",
                mib(memory.rss),
                mib(memory.anon),
                calls.load(Ordering::Relaxed),
                errors.load(Ordering::Relaxed),
                polls.sent.load(Ordering::Relaxed)
                    - polls.ok.load(Ordering::Relaxed)
                    - polls.failed.load(Ordering::Relaxed)
            );
            samples.push((t, memory));
        }
        while tasks.join_next().await.is_some() {}
        let alive = proxy.alive() && !restarted;
        let end = proxy.memory();
        report_soak(
            args,
            soak,
            idle,
            &samples,
            end,
            calls.load(Ordering::Relaxed),
            errors.load(Ordering::Relaxed),
            mix_connections.retried.load(Ordering::Relaxed)
                + poll_client.retried.load(Ordering::Relaxed),
            &polls,
            &first_errors.lock().map(|v| v.clone()).unwrap_or_default(),
            alive,
            &load_start,
        );
        anyhow::Ok(())
    }
    .await;
    server.stop().await;
    outcome
}

fn start_on_queue(requests: &Requests, workflow_id: String, queue: &str) -> Bytes {
    let mut request =
        ws::StartWorkflowExecutionRequest::decode(requests.start(workflow_id)).unwrap_or_default();
    if let Some(task_queue) = request.task_queue.as_mut() {
        task_queue.name = queue.into();
    }
    Bytes::from(request.encode_to_vec())
}

/// Completes a workflow task with a result (sealed by the proxy on the way).
fn complete_workflow_task(task_token: Vec<u8>) -> Bytes {
    let result = common::Payloads {
        payloads: vec![common::Payload {
            metadata: [("encoding".to_string(), b"json/plain".to_vec())].into(),
            data: br#""done by portcullis-loadgen""#.to_vec(),
            ..Default::default()
        }],
    };
    Bytes::from(
        ws::RespondWorkflowTaskCompletedRequest {
            task_token,
            namespace: NAMESPACE.into(),
            identity: "portcullis-loadgen-poller".into(),
            commands: vec![command::Command {
                command_type: enums::CommandType::CompleteWorkflowExecution as i32,
                attributes: Some(
                    command::command::Attributes::CompleteWorkflowExecutionCommandAttributes(
                        command::CompleteWorkflowExecutionCommandAttributes {
                            result: Some(result),
                        },
                    ),
                ),
                ..Default::default()
            }],
            ..Default::default()
        }
        .encode_to_vec(),
    )
}

/// Least-squares slope of y over x.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let cov: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let var: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if var == 0.0 {
        0.0
    } else {
        cov / var
    }
}

#[allow(clippy::too_many_arguments)]
fn report_soak(
    args: &Args,
    soak: Duration,
    idle: Memory,
    samples: &[(f64, Memory)],
    end: Memory,
    calls: u64,
    errors: u64,
    retried: u64,
    polls: &PollCounters,
    first_errors: &[String],
    alive: bool,
    load_start: &str,
) {
    println!();
    println!(
        "soak: {:.0} s against the dev server; mix {} at concurrency {}; {} long pollers",
        soak.as_secs_f64(),
        args.mix.text,
        args.concurrency,
        args.long_polls
    );
    println!(
        "{:>8} {:>10} {:>10} {:>10}",
        "t s", "VmRSS MiB", "anon MiB", "VmHWM MiB"
    );
    for (t, m) in samples {
        println!(
            "{t:>8.0} {:>10.1} {:>10.1} {:>10.1}",
            mib(m.rss),
            mib(m.anon),
            mib(m.hwm)
        );
    }
    // The trend over the second half (after warm-up: caches, pools, the allocator's arenas).
    let half: Vec<(f64, f64)> = samples
        .iter()
        .filter(|(t, _)| *t >= soak.as_secs_f64() / 2.0)
        .map(|(t, m)| (*t / 60.0, m.rss as f64 / 1024.0))
        .collect();
    let trend = slope(&half);
    let (min, max) = half.iter().fold((f64::MAX, f64::MIN), |(lo, hi), (_, v)| {
        (lo.min(*v), hi.max(*v))
    });
    println!(
        "idle {:.1} MiB; second half: {:.1}–{:.1} MiB, trend {trend:+.3} MiB/min; at the end {:.1} MiB (peak {:.1} MiB)",
        mib(idle.rss),
        if half.is_empty() { 0.0 } else { min },
        if half.is_empty() { 0.0 } else { max },
        mib(end.rss),
        mib(end.hwm)
    );
    let tasks = polls.tasks.load(Ordering::Relaxed);
    println!(
        "calls {calls} (polls {} sent, {} answered, {} failed; {tasks} workflow tasks completed); errors {errors}; {retried} calls sent again on a new connection after the proxy closed theirs (GOAWAY at its max connection age); proxy {}",
        polls.sent.load(Ordering::Relaxed),
        polls.ok.load(Ordering::Relaxed),
        polls.failed.load(Ordering::Relaxed),
        if alive { "the same process throughout (no restart)" } else { "NOT running at the end" }
    );
    for e in first_errors {
        println!("  error: {e}");
    }
    println!(
        "load average (1/5/15 min) at start: {load_start}; at end: {}",
        load_average()
    );
    println!(
        "RESULT {}",
        json!({
            "kind": "soak",
            "seconds": soak.as_secs(),
            "mix": args.mix.text,
            "concurrency": args.concurrency,
            "long_polls": args.long_polls,
            "idle": idle.json(),
            "end": end.json(),
            "rss_mib_second_half": {"min": round(min, 2), "max": round(max, 2), "trend_mib_per_min": round(trend, 4)},
            "samples": samples.iter().map(|(t, m)| json!([round(*t, 0), m.rss])).collect::<Vec<_>>(),
            "calls": calls,
            "errors": errors,
            "retried_on_new_connection": retried,
            "workflow_tasks_completed": tasks,
            "proxy_alive": alive,
        })
    );
}
