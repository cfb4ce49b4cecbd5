//! One upstream endpoint and its HTTP/2 connections, managed here rather than by a generic
//! pooled client.
//!
//! Each call clones an [`h2::client::SendRequest`] of a live connection, opens a stream on it
//! and awaits the answer in the caller's own task: no dispatch channel, no task spawned per call
//! (hyper's client spawns one or two per request), no pool checkout. A driver task per
//! connection does the I/O and the keep-alive pings.
//!
//! The pool decides which connection a new call uses:
//! - connections whose client certificate has been replaced (a new *generation*) take no new
//!   calls once a connection with the current certificate is up; until then they keep serving,
//!   so a rotation never makes a call wait for a handshake;
//! - no connection takes new calls after its certificate's retirement time (shortly before it
//!   expires), and no connection is made with a certificate known to have expired;
//! - a retired connection is only dropped from the pool: its in-flight calls (long polls
//!   included) finish on it, and h2 closes it once the last one is done.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Method, Request, Uri, Version};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::credentials::{ApiKey, CertCell, ClientCredential, CredentialError, FixedClientCert};
use super::resolve;
use crate::error::ProxyError;
use crate::grpc::h2_settings::{CONNECTION_WINDOW, MAX_FRAME, STREAM_WINDOW};

/// Keep-alive pings detect dead peers; there is deliberately no idle timeout (long polls sit
/// quietly for ~70 s).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// After a failed connection attempt, background connects wait this long before trying again.
const CONNECT_BACKOFF: Duration = Duration::from_secs(1);
/// Connections opened beyond `connections` when every connection is at the upstream's
/// SETTINGS_MAX_CONCURRENT_STREAMS (nginx allows 128 by default; a busy worker fleet's long
/// polls fill that), so new calls do not queue behind long polls.
const MAX_OVERFLOW_CONNECTIONS: usize = 8;

/// How to reach the endpoint.
pub struct ConnectSettings {
    pub host: String,
    pub port: u16,
    pub tls: Option<TlsSettings>,
    pub connect_timeout: Duration,
    /// Connections kept open (calls are spread over them); at least 1.
    pub connections: usize,
    /// The proxy's serving threads: each gets its own connections.
    pub serving_threads: usize,
    /// Connections take no new calls after this long (a little earlier for some, so they do
    /// not all reconnect at once); the next connection resolves the host again.
    pub max_age: Option<Duration>,
}

pub struct TlsSettings {
    /// Roots, ALPN and resumption set; the client certificate is added per connection.
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
    /// The client certificate, if the upstream wants one.
    pub client_cert: Option<Arc<CertCell>>,
}

/// One upstream endpoint with its connections.
pub struct Upstream {
    pub name: String,
    pub address: String,
    settings: ConnectSettings,
    scheme: Scheme,
    authority: Authority,
    /// Connections per serving thread (see [`Upstream::shard`]).
    shards: Box<[Shard]>,
    next_id: AtomicU64,
    /// Replaces the caller's `authorization` header.
    api_key: Option<Arc<ApiKey>>,
    /// Where the host resolved to at the last connection attempt.
    resolved: Mutex<Vec<SocketAddr>>,
    /// Rotates the first address tried over the resolved ones.
    next_address: AtomicUsize,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("address", &self.address)
            .finish()
    }
}

/// One serving thread's connections: a call uses connections driven on its own thread, so
/// neither the request nor the answer has to wake another thread.
#[derive(Default)]
struct Shard {
    pool: Mutex<Pool>,
    /// Held while connecting: one connection attempt at a time.
    connecting: tokio::sync::Mutex<()>,
}

impl Shard {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        match self.pool.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

#[derive(Default)]
struct Pool {
    connections: Vec<Arc<Connection>>,
    round_robin: usize,
    /// A background connect is under way.
    warming: bool,
    /// The last failed attempt: when it ended and why.
    last_failure: Option<(Instant, String)>,
}

struct Connection {
    id: u64,
    send: h2::client::SendRequest<Bytes>,
    /// The address it is connected to, and since when.
    address: SocketAddr,
    born: Instant,
    /// The certificate generation it was made with (0 without a client certificate).
    generation: u64,
    /// Takes no new calls from then on (the certificate is about to expire).
    retire_at: Option<SystemTime>,
    serial: Option<String>,
    /// Set when the connection ended or failed a call.
    broken: Arc<AtomicBool>,
    /// Calls under way on it (from opening the stream until the answer is read).
    active: Arc<AtomicUsize>,
}

impl Connection {
    fn usable(&self, now: SystemTime) -> bool {
        !self.broken.load(Ordering::Acquire) && self.retire_at.is_none_or(|at| now < at)
    }

    /// Below the upstream's limit of concurrent streams.
    fn has_room(&self) -> bool {
        self.active.load(Ordering::Acquire) < self.send.current_max_send_streams()
    }
}

/// Counts a call as active on its connection until dropped.
struct ActiveCall(Arc<AtomicUsize>);

impl ActiveCall {
    fn new(active: &Arc<AtomicUsize>) -> ActiveCall {
        active.fetch_add(1, Ordering::AcqRel);
        ActiveCall(active.clone())
    }
}

impl Drop for ActiveCall {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The head of an upstream answer and its body, still to be read.
pub struct UpstreamResponse {
    pub head: http::response::Parts,
    pub body: UpstreamBody,
}

pub struct UpstreamBody {
    stream: h2::RecvStream,
    _active: ActiveCall,
}

pub use crate::grpc::body::BodyError;

impl UpstreamBody {
    /// Reads the whole body (at most `limit` bytes) and the trailers.
    pub async fn collect(mut self, limit: usize) -> Result<(Bytes, HeaderMap), BodyError> {
        crate::grpc::body::collect_h2(&mut self.stream, limit).await
    }
}

/// Why an attempt failed, and whether the call may go out again on another connection (only
/// when the upstream cannot have processed it).
struct AttemptError {
    reason: String,
    retry: bool,
    /// The connection itself failed: no new calls on it.
    dead: bool,
    /// The upstream reset this stream (RST_STREAM) with this code.
    reset: Option<h2::Reason>,
}

impl Upstream {
    pub fn new(
        name: String,
        address: String,
        authority: Authority,
        settings: ConnectSettings,
        api_key: Option<Arc<ApiKey>>,
    ) -> Upstream {
        let scheme = if settings.tls.is_some() {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        };
        let shards = (0..=settings.serving_threads)
            .map(|_| Shard::default())
            .collect();
        Upstream {
            name,
            address,
            settings,
            scheme,
            authority,
            // Shard 0 for every thread that is not a serving thread (control runtime, probes).
            shards,
            next_id: AtomicU64::new(1),
            api_key,
            resolved: Mutex::default(),
            next_address: AtomicUsize::new(0),
        }
    }

    /// The upstream's own API key (`credentials` type `api-key`).
    pub fn api_key(&self) -> Option<&Arc<ApiKey>> {
        self.api_key.as_ref()
    }

    /// The client certificate's store, if this upstream presents one.
    pub fn client_cert(&self) -> Option<&Arc<CertCell>> {
        self.settings
            .tls
            .as_ref()
            .and_then(|t| t.client_cert.as_ref())
    }

    fn unavailable(&self, reason: String) -> ProxyError {
        ProxyError::UpstreamUnavailable {
            upstream: self.name.clone(),
            address: self.address.clone(),
            reason,
        }
    }

    fn credential_error(&self, error: CredentialError) -> ProxyError {
        ProxyError::UpstreamCredentials {
            upstream: self.name.clone(),
            reason: error.to_string(),
        }
    }

    /// Sends one unary gRPC request (the framed message in `body`) and returns the answer's
    /// head; the body is read by the caller. Dropping the returned future or body resets the
    /// stream upstream (RST_STREAM CANCEL), which cancels the call there.
    pub async fn send(
        self: &Arc<Self>,
        path: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<UpstreamResponse, ProxyError> {
        let key = self.api_key.clone();
        self.send_with_key(path, headers, body, key.as_ref()).await
    }

    /// [`Upstream::send`] with the API key to carry (a namespace's own, see
    /// [`super::Router::route`]): it replaces the caller's `authorization` header.
    pub async fn send_with_key(
        self: &Arc<Self>,
        path: &str,
        headers: &HeaderMap,
        body: Bytes,
        api_key: Option<&Arc<ApiKey>>,
    ) -> Result<UpstreamResponse, ProxyError> {
        let path = PathAndQuery::from_maybe_shared(Bytes::copy_from_slice(path.as_bytes()))
            .map_err(|e| self.unavailable(format!("invalid request path: {e}")))?;
        let mut last = String::new();
        // A second attempt only for calls the upstream provably did not process (refused
        // stream, graceful GOAWAY, a connection that died before the request went out).
        for _ in 0..2 {
            // The pool usually has one: opening a connection (TCP, TLS and HTTP/2 handshakes)
            // is a large future, boxed so that it does not inflate every call's future (a held
            // long poll keeps its future for minutes).
            let connection = match self.pick() {
                Some(connection) => connection,
                None => Box::pin(self.connection()).await?,
            };
            // The request is built once the connection can take it (not held across an await:
            // it would take room in the call's future while the call waits for its answer).
            let request = || -> Result<Request<()>, String> {
                let uri = Uri::from_parts({
                    let mut parts = http::uri::Parts::default();
                    parts.scheme = Some(self.scheme.clone());
                    parts.authority = Some(self.authority.clone());
                    parts.path_and_query = Some(path.clone());
                    parts
                })
                .map_err(|e| format!("invalid request URI: {e}"))?;
                let mut request = Request::new(());
                *request.method_mut() = Method::POST;
                *request.uri_mut() = uri;
                *request.version_mut() = Version::HTTP_2;
                *request.headers_mut() = headers.clone();
                if let Some(key) = api_key {
                    request
                        .headers_mut()
                        .insert(http::header::AUTHORIZATION, key.header_value());
                }
                Ok(request)
            };
            match attempt(&connection, request, body.clone()).await {
                Ok(response) => return Ok(response),
                Err(error) => {
                    if error.dead {
                        connection.broken.store(true, Ordering::Release);
                    }
                    tracing::debug!(upstream = %self.name, connection = connection.id, reason = %error.reason, retry = error.retry, "upstream call failed");
                    if let (Some(code), false) = (error.reset, error.retry) {
                        return Err(ProxyError::UpstreamReset {
                            upstream: self.name.clone(),
                            code,
                        });
                    }
                    if !error.retry {
                        return Err(self.unavailable(error.reason));
                    }
                    last = error.reason;
                }
            }
        }
        Err(self.unavailable(last))
    }

    /// A connection for a new call: a usable one from the pool, or a new one.
    async fn connection(self: &Arc<Self>) -> Result<Arc<Connection>, ProxyError> {
        if let Some(connection) = self.pick() {
            return Ok(connection);
        }
        let waiting_since = Instant::now();
        let _guard = self.shard().connecting.lock().await;
        // Someone else may have connected (or failed) while this call waited.
        if let Some(connection) = self.pick() {
            return Ok(connection);
        }
        if let Some((at, reason)) = self.lock_pool().last_failure.clone() {
            if at >= waiting_since {
                return Err(self.unavailable(reason));
            }
        }
        match self.connect().await {
            Ok(connection) => {
                let connection = Arc::new(connection);
                self.add(connection.clone());
                Ok(connection)
            }
            Err(error) => {
                self.lock_pool().last_failure = Some((Instant::now(), error.to_string()));
                Err(error)
            }
        }
    }

    /// The current thread's connections.
    fn shard(&self) -> &Shard {
        let index = match crate::workers::current_shard() {
            Some(worker) if self.shards.len() > 1 => 1 + worker % (self.shards.len() - 1),
            _ => 0,
        };
        &self.shards[index]
    }

    fn lock_pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.shard().lock()
    }

    fn add(&self, connection: Arc<Connection>) {
        let mut pool = self.lock_pool();
        pool.last_failure = None;
        pool.connections.push(connection);
    }

    /// Chooses a connection: current-generation connections round-robin; older ones only until
    /// a current one is up. Starts a background connect when the pool is short.
    fn pick(self: &Arc<Self>) -> Option<Arc<Connection>> {
        let now = SystemTime::now();
        let generation = self.client_cert().map_or(0, |c| c.generation());
        let mut pool = self.lock_pool();
        pool.connections.retain(|c| c.usable(now));
        let current = pool
            .connections
            .iter()
            .filter(|c| c.generation == generation)
            .count();
        if current > 0 && current < pool.connections.len() {
            // The new certificate is in use: older connections take no new calls. They finish
            // what they carry and then close.
            pool.connections.retain(|c| {
                let keep = c.generation == generation;
                if !keep {
                    tracing::debug!(upstream = %self.name, connection = c.id, serial = c.serial.as_deref().unwrap_or(""), "connection retired after certificate rotation");
                }
                keep
            });
        }
        let wanted = self.settings.connections.max(1);
        let short = current < wanted;
        let backing_off = pool
            .last_failure
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < CONNECT_BACKOFF);
        pool.round_robin = pool.round_robin.wrapping_add(1);
        let turn = pool.round_robin;
        let with_room: Vec<&Arc<Connection>> =
            pool.connections.iter().filter(|c| c.has_room()).collect();
        let chosen = if !with_room.is_empty() {
            Some(with_room[turn % with_room.len()].clone())
        } else if pool.connections.is_empty()
            || (pool.connections.len() < wanted + MAX_OVERFLOW_CONNECTIONS && !backing_off)
        {
            // None, or all full: this call opens another connection.
            None
        } else {
            // All full and no more connections: wait for a stream on one of them.
            Some(pool.connections[turn % pool.connections.len()].clone())
        };
        if chosen.is_some() && short && !pool.warming && !backing_off {
            pool.warming = true;
            drop(pool);
            let upstream = self.clone();
            tokio::spawn(async move { upstream.warm().await });
        }
        chosen
    }

    /// Adds one connection in the background (pool short, or a new certificate to move to).
    async fn warm(self: Arc<Self>) {
        let result = {
            let _guard = self.shard().connecting.lock().await;
            self.connect().await
        };
        let mut pool = self.lock_pool();
        pool.warming = false;
        match result {
            Ok(connection) => {
                pool.last_failure = None;
                pool.connections.push(Arc::new(connection));
            }
            Err(error) => {
                tracing::warn!(upstream = %self.name, error = %error, "background connection attempt failed");
                pool.last_failure = Some((Instant::now(), error.to_string()));
            }
        }
    }

    /// Opens a new connection with the current client certificate.
    async fn connect(self: &Arc<Self>) -> Result<Connection, ProxyError> {
        // The generation first: a rotation in between makes this connection look older than
        // its certificate (replaced early), never newer (kept too long).
        let generation = self.client_cert().map_or(0, |cell| cell.generation());
        let credential: Option<Arc<ClientCredential>> = match self.client_cert() {
            Some(cell) => Some(cell.current().map_err(|e| self.credential_error(e))?),
            None => None,
        };
        let timeout = self.settings.connect_timeout;
        let started = Instant::now();
        let (tcp, address) = tokio::time::timeout(timeout, self.connect_tcp())
            .await
            .map_err(|_| {
                self.unavailable(format!("cannot connect: timed out after {timeout:?}"))
            })??;
        let _ = tcp.set_nodelay(true);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let aged_out = self.settings.max_age.map(|age| {
            // Up to a tenth earlier, by connection, so a pool made at once does not all
            // reconnect at once.
            let spread = age.mul_f64((id % 10) as f64 / 100.0);
            SystemTime::now() + age.saturating_sub(spread)
        });
        let retire_at = match (credential.as_ref().map(|c| c.retire_at), aged_out) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let (send, broken) = match &self.settings.tls {
            None => self.handshake(tcp, id, retire_at).await?,
            Some(tls) => {
                let mut config = (*tls.config).clone();
                if let Some(credential) = &credential {
                    config.client_auth_cert_resolver =
                        Arc::new(FixedClientCert(credential.clone()));
                }
                let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
                let stream =
                    tokio::time::timeout(timeout, connector.connect(tls.server_name.clone(), tcp))
                        .await
                        .map_err(|_| {
                            self.unavailable(format!("TLS handshake timed out after {timeout:?}"))
                        })?
                        .map_err(|e| self.unavailable(format!("TLS handshake failed: {e}")))?;
                match stream.get_ref().1.alpn_protocol() {
                    None | Some(b"h2") => {}
                    Some(other) => {
                        return Err(self.unavailable(format!(
                            "the upstream negotiated {:?} instead of HTTP/2",
                            String::from_utf8_lossy(other)
                        )))
                    }
                }
                self.handshake(stream, id, retire_at).await?
            }
        };
        let serial = credential.as_ref().map(|c| c.serial.clone());
        tracing::debug!(upstream = %self.name, connection = id, %address, serial = serial.as_deref().unwrap_or(""), "connected");
        Ok(Connection {
            id,
            send,
            address,
            born: started,
            generation,
            retire_at,
            serial,
            broken,
            active: Arc::default(),
        })
    }

    /// Resolves the host again and connects to one of its addresses: each new connection
    /// starts at the next address (round-robin), and an address that refuses or does not
    /// answer is skipped for the next.
    async fn connect_tcp(&self) -> Result<(TcpStream, SocketAddr), ProxyError> {
        let addresses = resolve::resolve(&self.settings.host, self.settings.port)
            .await
            .map_err(|e| self.unavailable(format!("cannot resolve {}: {e}", self.settings.host)))?;
        {
            let mut resolved = match self.resolved.lock() {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
            if *resolved != addresses {
                if !resolved.is_empty() {
                    tracing::info!(upstream = %self.name, host = %self.settings.host, from = ?*resolved, to = ?addresses, "upstream host resolves to other addresses");
                }
                resolved.clone_from(&addresses);
            }
        }
        let first = self.next_address.fetch_add(1, Ordering::Relaxed);
        // Each address gets a share of the connect timeout, so one that does not answer leaves
        // time for the others.
        let share = self
            .settings
            .connect_timeout
            .checked_div(addresses.len().max(1) as u32)
            .unwrap_or(self.settings.connect_timeout)
            .max(Duration::from_millis(200));
        let mut failures = Vec::new();
        for i in 0..addresses.len() {
            let Some(address) = addresses.get((first + i) % addresses.len()).copied() else {
                continue;
            };
            match tokio::time::timeout(share, TcpStream::connect(address)).await {
                Ok(Ok(tcp)) => return Ok((tcp, address)),
                Ok(Err(e)) => failures.push(format!("{address}: {e}")),
                Err(_) => failures.push(format!("{address}: timed out after {share:?}")),
            }
        }
        Err(self.unavailable(format!("cannot connect: {}", failures.join("; "))))
    }

    /// The HTTP/2 handshake, and the connection's driver task: it does the I/O and the
    /// keep-alive pings, and at `retire_at` takes the connection out of the pool even when no
    /// call comes along to notice, so that it closes (once its in-flight calls are done)
    /// before its certificate expires.
    async fn handshake<T>(
        self: &Arc<Self>,
        io: T,
        id: u64,
        retire_at: Option<SystemTime>,
    ) -> Result<(h2::client::SendRequest<Bytes>, Arc<AtomicBool>), ProxyError>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (send, mut connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .enable_push(false)
            .handshake::<T, Bytes>(io)
            .await
            .map_err(|e| self.unavailable(format!("HTTP/2 handshake failed: {e}")))?;
        let broken = Arc::new(AtomicBool::new(false));
        let flag = broken.clone();
        let name = self.name.clone();
        let upstream = Arc::downgrade(self);
        let ping_pong = connection.ping_pong();
        tokio::spawn(async move {
            let retire = {
                let flag = flag.clone();
                async move {
                    match retire_at.map(|at| at.duration_since(SystemTime::now())) {
                        Some(left) => tokio::time::sleep(left.unwrap_or_default()).await,
                        None => std::future::pending::<()>().await,
                    }
                    flag.store(true, Ordering::Release);
                    if let Some(upstream) = upstream.upgrade() {
                        upstream.prune();
                    }
                    // Keep driving: in-flight calls finish, then h2 closes the connection.
                    std::future::pending::<()>().await
                }
            };
            let outcome = match ping_pong {
                Some(ping_pong) => tokio::select! {
                    result = &mut connection => result.map_err(|e| e.to_string()),
                    reason = keepalive(ping_pong) => Err(reason),
                    () = retire => Ok(()),
                },
                None => tokio::select! {
                    result = &mut connection => result.map_err(|e| e.to_string()),
                    () = retire => Ok(()),
                },
            };
            flag.store(true, Ordering::Release);
            match outcome {
                Ok(()) => tracing::debug!(upstream = %name, connection = id, "connection closed"),
                Err(e) => {
                    tracing::debug!(upstream = %name, connection = id, error = %e, "connection ended")
                }
            }
        });
        Ok((send, broken))
    }

    /// Connects as a call would (TCP, TLS with the current client certificate, HTTP/2 preface)
    /// and closes again: for readiness probes and `portcullis check`.
    pub async fn probe(self: &Arc<Self>, timeout: Duration) -> Result<String, String> {
        match tokio::time::timeout(timeout, self.connect()).await {
            Ok(Ok(connection)) => Ok(match (&self.settings.tls, &connection.serial) {
                (None, _) => "TCP connect (h2c)".to_string(),
                (Some(_), None) => "TCP connect and TLS handshake".to_string(),
                (Some(_), Some(serial)) => {
                    format!("TCP connect and TLS handshake (client certificate {serial})")
                }
            }),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    }

    /// Connections in the pool (open, or being retired with calls still on them are not
    /// counted).
    pub fn open_connections(&self) -> usize {
        let now = SystemTime::now();
        self.shards
            .iter()
            .map(|shard| {
                shard
                    .lock()
                    .connections
                    .iter()
                    .filter(|c| c.usable(now))
                    .count()
            })
            .sum()
    }

    /// Where the host resolved to at the last connection attempt.
    pub fn resolved_addresses(&self) -> Vec<SocketAddr> {
        match self.resolved.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Connections taking new calls: their address and age.
    pub fn connection_ages(&self) -> Vec<(SocketAddr, Duration)> {
        let now = SystemTime::now();
        self.shards
            .iter()
            .flat_map(|shard| {
                shard
                    .lock()
                    .connections
                    .iter()
                    .filter(|c| c.usable(now))
                    .map(|c| (c.address, c.born.elapsed()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Drops connections that take no new calls from the pool.
    fn prune(&self) {
        let now = SystemTime::now();
        for shard in self.shards.iter() {
            shard.lock().connections.retain(|c| c.usable(now));
        }
    }

    /// Seconds until the client certificate expires (None without one). Negative once expired.
    pub fn seconds_until_expiry(&self) -> Option<f64> {
        self.client_cert().and_then(|c| c.seconds_until_expiry())
    }
}

/// Pings every [`KEEPALIVE_INTERVAL`]; returns (ending the connection) when a pong is late.
async fn keepalive(mut ping_pong: h2::PingPong) -> String {
    loop {
        tokio::time::sleep(KEEPALIVE_INTERVAL).await;
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return format!("keep-alive ping failed: {e}"),
            Err(_) => return format!("no keep-alive answer within {KEEPALIVE_TIMEOUT:?}"),
        }
    }
}

/// One try of a call on one connection.
async fn attempt(
    connection: &Connection,
    request: impl FnOnce() -> Result<Request<()>, String>,
    body: Bytes,
) -> Result<UpstreamResponse, AttemptError> {
    let active = ActiveCall::new(&connection.active);
    let mut send = connection
        .send
        .clone()
        .ready()
        .await
        .map_err(|e| AttemptError::new(&e, false))?;
    let request = request().map_err(|reason| AttemptError {
        reason,
        retry: false,
        dead: false,
        reset: None,
    })?;
    let (response, mut stream) = send
        .send_request(request, false)
        .map_err(|e| AttemptError::new(&e, false))?;
    // h2 buffers what the flow-control window does not take yet. An error here shows up
    // again on the response, with the stream's real fate.
    let _ = stream.send_data(body, true);
    match response.await {
        Ok(response) => {
            let (head, body) = response.into_parts();
            Ok(UpstreamResponse {
                head,
                body: UpstreamBody {
                    stream: body,
                    _active: active,
                },
            })
        }
        Err(e) => Err(AttemptError::new(&e, true)),
    }
}

/// The code of a RST_STREAM the upstream sent for one stream (not a connection failure).
pub fn upstream_reset(error: &h2::Error) -> Option<h2::Reason> {
    if error.is_reset() && error.is_remote() {
        error.reason()
    } else {
        None
    }
}

impl AttemptError {
    fn new(error: &h2::Error, stream_opened: bool) -> AttemptError {
        let dead = error.is_go_away() || error.is_io();
        let retry = if stream_opened {
            // RFC 9113 §8.7: a refused stream was not processed. A graceful GOAWAY fails only
            // the streams above its last-stream-id, which the server did not process either.
            error.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (error.is_go_away()
                    && error.is_remote()
                    && error.reason() == Some(h2::Reason::NO_ERROR))
        } else {
            // The connection was gone before the request went out.
            dead
        };
        AttemptError {
            reason: if stream_opened {
                format!("call interrupted: {error}")
            } else {
                format!("connection lost: {error}")
            },
            retry,
            dead,
            reset: upstream_reset(error),
        }
    }
}
