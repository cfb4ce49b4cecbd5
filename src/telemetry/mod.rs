//! Production telemetry: Prometheus metrics, readiness, the admin listener, and the per-call
//! span and metrics layer.
//!
//! - [`call`]: the tower layer around the pipeline that times, counts and logs every call, and
//!   the small hooks other stages use (authorization decision, upstream latency).
//! - [`readiness`]: the background prober behind `/readyz` and `grpc.health.v1.Health/Check`.
//! - [`admin`]: the plain-HTTP admin listener (`/metrics`, `/healthz`, `/readyz`).
//!
//! Metrics are per proxy instance ([`Telemetry`]), encoded at scrape time by one collector, so
//! the hot path only touches atomics: a call looks up its pre-built series (namespace × method)
//! once and bumps counters; label values are `&'static str` resolved ahead of time.

pub mod admin;
pub mod call;
pub mod histogram;
pub mod readiness;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::crypto::CryptoMetrics;
use crate::schema::{MethodInfo, Scope};
pub use call::{HealthLayer, TelemetryLayer, UpstreamTimerLayer};
pub use histogram::Histogram;
pub use readiness::{CheckResult, ReadinessReport};

/// Namespace label of cluster-scoped calls. Temporal namespace names cannot start with `_`, so
/// neither this nor [`OTHER_NAMESPACE`] can collide with a real namespace.
pub static CLUSTER_NAMESPACE: &str = "_cluster";
/// Namespace label of calls for namespaces the config does not list (bounded cardinality).
pub static OTHER_NAMESPACE: &str = "_other";

/// gRPC status codes 0..=16 by name, as labels.
const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

pub fn code_name(code: usize) -> &'static str {
    CODE_NAMES.get(code).copied().unwrap_or("UNKNOWN")
}

/// Interns a label value for the life of the process. Only config-bounded names (namespaces,
/// upstreams, keys) are interned, so the leak is bounded by what configs ever named.
pub fn intern(value: &str) -> &'static str {
    static INTERNED: LazyLock<Mutex<HashSet<&'static str>>> = LazyLock::new(Mutex::default);
    let mut set = INTERNED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(existing) = set.get(value) {
        return existing;
    }
    let leaked: &'static str = Box::leak(value.to_owned().into_boxed_str());
    set.insert(leaked);
    leaked
}

/// The metrics of one (namespace, method) pair. Created on a pair's first call, then shared.
#[derive(Debug)]
pub struct CallSeries {
    pub namespace: &'static str,
    pub method: &'static MethodInfo,
    codes: [AtomicU64; 17],
    /// Authorization decisions: [allowed, denied].
    authz: [AtomicU64; 2],
    duration: Histogram,
    upstream: Histogram,
    received_bytes: AtomicU64,
    sent_bytes: AtomicU64,
}

impl CallSeries {
    fn new(namespace: &'static str, method: &'static MethodInfo) -> CallSeries {
        CallSeries {
            namespace,
            method,
            codes: Default::default(),
            authz: Default::default(),
            duration: Histogram::new(&histogram::CALL_BUCKETS),
            upstream: Histogram::new(&histogram::CALL_BUCKETS),
            received_bytes: AtomicU64::new(0),
            sent_bytes: AtomicU64::new(0),
        }
    }

    fn service_label(&self) -> &'static str {
        let service = self.method.service.as_str();
        service.rsplit('.').next().unwrap_or(service)
    }
}

/// A series key hashed by pointer: namespace labels are interned and methods live in the static
/// schema, so pointer identity is string identity, and hashing costs two multiplications.
#[derive(Clone, Copy)]
struct SeriesKey {
    namespace: &'static str,
    method: &'static MethodInfo,
}

impl PartialEq for SeriesKey {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self.namespace, other.namespace) && std::ptr::eq(self.method, other.method)
    }
}
impl Eq for SeriesKey {}
impl Hash for SeriesKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_usize(self.namespace.as_ptr() as usize);
        state.write_usize(self.method as *const MethodInfo as usize);
    }
}

/// FxHash's mixing step: plenty for two pointers, far cheaper than SipHash.
#[derive(Default)]
struct PointerHasher(u64);
impl Hasher for PointerHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u64(&mut self, value: u64) {
        self.0 = (self.0.rotate_left(5) ^ value).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_usize(&mut self, value: usize) {
        self.write_u64(value as u64);
    }
}

type SeriesMap = HashMap<SeriesKey, Arc<CallSeries>, BuildHasherDefault<PointerHasher>>;

/// Validity of a certificate, in Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertValidity {
    pub not_before: i64,
    pub not_after: i64,
}

impl CertValidity {
    /// Of the first certificate (the leaf) of a DER chain.
    pub fn of_der(der: &[u8]) -> Option<CertValidity> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        Some(CertValidity {
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
        })
    }

    pub fn seconds_to_expiry(&self, now: i64) -> i64 {
        self.not_after - now
    }

    pub fn is_valid_at(&self, now: i64) -> bool {
        self.not_before <= now && now < self.not_after
    }
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

type CertificateSource = Arc<dyn Fn() -> Option<CertValidity> + Send + Sync>;
type GaugeSource = Arc<dyn Fn() -> usize + Send + Sync>;

/// The client-facing edge's counters and gauges, registered by the server: refused calls and
/// connections, connections closed by the proxy, buffered request bytes, the audit queue.
#[derive(Clone)]
pub struct EdgeSources {
    pub stats: Arc<crate::proxy::limits::EdgeStats>,
    /// Request bytes held by all calls now (the process-wide budget in use).
    pub buffered_bytes: GaugeSource,
    /// Client connections holding a slot under `max_connections` (handshakes included).
    pub open_slots: GaugeSource,
    pub audit: Arc<crate::authz::AuditStats>,
}
type ConnectionSource = Arc<dyn Fn() -> u64 + Send + Sync>;
type PoolSource = Arc<dyn Fn() -> crate::upstream::PoolStats + Send + Sync>;

/// Counters of one key provider (one `[encryption.keys.NAME]`), kept by [`TimedProvider`].
///
/// [`TimedProvider`]: crate::crypto::timed::TimedProvider
#[derive(Debug)]
pub struct ProviderStats {
    pub generate: Histogram,
    pub unwrap: Histogram,
    pub generate_errors: AtomicU64,
    pub unwrap_errors: AtomicU64,
}

impl Default for ProviderStats {
    fn default() -> Self {
        ProviderStats {
            generate: Histogram::new(&histogram::PROVIDER_BUCKETS),
            unwrap: Histogram::new(&histogram::PROVIDER_BUCKETS),
            generate_errors: AtomicU64::new(0),
            unwrap_errors: AtomicU64::new(0),
        }
    }
}

/// Counters of the object store that large payloads are offloaded to (`[offload]`), kept by
/// [`crate::offload::ObjectStore`].
#[derive(Debug)]
pub struct OffloadStats {
    pub objects_written: AtomicU64,
    pub bytes_written: AtomicU64,
    pub write_errors: AtomicU64,
    /// Objects read from the store (cache hits not included).
    pub objects_read: AtomicU64,
    pub bytes_read: AtomicU64,
    /// Reads that failed: unavailable, missing, wrong digest or size.
    pub read_errors: AtomicU64,
    /// Objects that were missing or did not match their digest (DATA_LOSS).
    pub objects_lost: AtomicU64,
    pub cache_hits: AtomicU64,
    /// Payloads compressed before sealing.
    pub payloads_compressed: AtomicU64,
    pub write_duration: Histogram,
    pub read_duration: Histogram,
}

impl Default for OffloadStats {
    fn default() -> Self {
        OffloadStats {
            objects_written: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            objects_read: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            read_errors: AtomicU64::new(0),
            objects_lost: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            payloads_compressed: AtomicU64::new(0),
            write_duration: Histogram::new(&histogram::PROVIDER_BUCKETS),
            read_duration: Histogram::new(&histogram::PROVIDER_BUCKETS),
        }
    }
}

/// One configured key as metrics see it.
#[derive(Clone)]
pub struct KeyStats {
    pub name: String,
    pub crypto: Arc<CryptoMetrics>,
    pub provider: Arc<ProviderStats>,
}

/// Everything one running proxy measures. Cheap to share; all recording is atomic.
pub struct Telemetry {
    namespaces: RwLock<HashSet<&'static str>>,
    series: RwLock<SeriesMap>,
    in_flight: AtomicI64,
    connections_open: AtomicI64,
    connections_total: AtomicU64,
    handshake_failures: AtomicU64,
    upstream_failures: RwLock<BTreeMap<&'static str, u64>>,
    certificates: RwLock<BTreeMap<String, CertificateSource>>,
    upstream_connections: RwLock<BTreeMap<String, ConnectionSource>>,
    upstream_pools: RwLock<BTreeMap<String, PoolSource>>,
    keys: RwLock<Vec<KeyStats>>,
    offload: RwLock<Option<Arc<OffloadStats>>>,
    upstream_targets: RwLock<Vec<(String, String)>>,
    /// Labels of `portcullis_schema_info`: which API schema is in force.
    schema: RwLock<Vec<(&'static str, String)>>,
    readiness: RwLock<Option<Arc<ReadinessReport>>>,
    draining: AtomicBool,
    edge: RwLock<Option<EdgeSources>>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}
fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            namespaces: RwLock::default(),
            series: RwLock::default(),
            in_flight: AtomicI64::new(0),
            connections_open: AtomicI64::new(0),
            connections_total: AtomicU64::new(0),
            handshake_failures: AtomicU64::new(0),
            upstream_failures: RwLock::default(),
            certificates: RwLock::default(),
            upstream_connections: RwLock::default(),
            upstream_pools: RwLock::default(),
            keys: RwLock::default(),
            offload: RwLock::default(),
            upstream_targets: RwLock::default(),
            schema: RwLock::default(),
            readiness: RwLock::default(),
            draining: AtomicBool::new(false),
            edge: RwLock::default(),
        }
    }
}

impl Telemetry {
    pub fn new() -> Arc<Telemetry> {
        Arc::new(Telemetry::default())
    }

    /// The namespaces that get their own label; any other is [`OTHER_NAMESPACE`]. Call again
    /// when the served namespaces change (runtime reload).
    pub fn set_namespaces<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        let set = names.into_iter().map(intern).collect();
        *write(&self.namespaces) = set;
    }

    /// The bounded label for a request's namespace.
    pub fn namespace_label(&self, method: &MethodInfo, namespace: Option<&str>) -> &'static str {
        if method.scope == Scope::Cluster {
            return CLUSTER_NAMESPACE;
        }
        match namespace {
            Some(ns) => read(&self.namespaces)
                .get(ns)
                .copied()
                .unwrap_or(OTHER_NAMESPACE),
            None => OTHER_NAMESPACE,
        }
    }

    /// The series of (namespace label, method), created on first use. `namespace` must come
    /// from [`Telemetry::namespace_label`]: series are keyed by the label's address.
    pub(crate) fn series(
        &self,
        namespace: &'static str,
        method: &'static MethodInfo,
    ) -> Arc<CallSeries> {
        let key = SeriesKey { namespace, method };
        if let Some(series) = read(&self.series).get(&key) {
            return Arc::clone(series);
        }
        Arc::clone(
            write(&self.series)
                .entry(key)
                .or_insert_with(|| Arc::new(CallSeries::new(namespace, method))),
        )
    }

    pub fn connection_opened(&self) {
        self.connections_open.fetch_add(1, Ordering::Relaxed);
        self.connections_total.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_closed(&self) {
        self.connections_open.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn handshake_failed(&self) {
        self.handshake_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn upstream_failed(&self, upstream: &str) {
        let label = intern(upstream);
        *write(&self.upstream_failures).entry(label).or_default() += 1;
    }

    /// Registers a certificate whose validity is read at every scrape and readiness check
    /// (`certificate` label: e.g. `listener`, `upstream/NAME`). The hook for any module that
    /// holds rotating certificates: give it a closure over its current certificate.
    pub fn watch_certificate(
        &self,
        name: impl Into<String>,
        source: impl Fn() -> Option<CertValidity> + Send + Sync + 'static,
    ) {
        write(&self.certificates).insert(name.into(), Arc::new(source));
    }

    /// Records a certificate's validity once (for certificates that only change on reload).
    pub fn set_certificate(&self, name: impl Into<String>, validity: CertValidity) {
        self.watch_certificate(name, move || Some(validity));
    }

    pub fn forget_certificate(&self, name: &str) {
        write(&self.certificates).remove(name);
    }

    /// The registered certificates and their current validity.
    pub fn certificates(&self) -> Vec<(String, Option<CertValidity>)> {
        read(&self.certificates)
            .iter()
            .map(|(name, source)| (name.clone(), source()))
            .collect()
    }

    /// Registers a reader of an upstream's open connections, read at every scrape (gauge
    /// `portcullis_upstream_connections{upstream}`): the hook for the upstream pool.
    pub fn watch_upstream_connections(
        &self,
        upstream: impl Into<String>,
        source: impl Fn() -> u64 + Send + Sync + 'static,
    ) {
        write(&self.upstream_connections).insert(upstream.into(), Arc::new(source));
    }

    /// Registers a reader of an upstream's pools (resolved addresses, connection ages), read at
    /// every scrape.
    pub fn watch_upstream_pool(
        &self,
        upstream: impl Into<String>,
        source: impl Fn() -> crate::upstream::PoolStats + Send + Sync + 'static,
    ) {
        write(&self.upstream_pools).insert(upstream.into(), Arc::new(source));
    }

    /// Registers the edge's counters (the server does, once).
    pub fn set_edge(&self, sources: EdgeSources) {
        *write(&self.edge) = Some(sources);
    }

    pub fn set_keys(&self, keys: Vec<KeyStats>) {
        *write(&self.keys) = keys;
    }

    /// Registers the object store's counters (`[offload]`).
    pub fn set_offload(&self, stats: Arc<OffloadStats>) {
        *write(&self.offload) = Some(stats);
    }

    /// Upstreams the readiness prober checks: (name, HOST:PORT). Call again after a reload.
    /// Which API schema is in force (`source`, `sha256`, `methods`, `added_methods`,
    /// `added_payload_fields`), for `portcullis_schema_info`.
    pub fn set_schema(&self, labels: Vec<(&'static str, String)>) {
        *write(&self.schema) = labels;
    }

    pub fn set_upstreams(&self, upstreams: Vec<(String, String)>) {
        *write(&self.upstream_targets) = upstreams;
    }

    pub fn upstreams(&self) -> Vec<(String, String)> {
        read(&self.upstream_targets).clone()
    }

    pub fn set_readiness(&self, report: ReadinessReport) {
        *write(&self.readiness) = Some(Arc::new(report));
    }

    pub fn readiness(&self) -> Option<Arc<ReadinessReport>> {
        read(&self.readiness).clone()
    }

    /// Ready: a probe round has run, every check passed, and the proxy is not shutting down.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.readiness().is_some_and(|r| r.ready())
    }

    /// Marks the proxy as shutting down: readiness fails from now on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// A registry that encodes this proxy's metrics (and the process-wide reload counters).
    pub fn registry(self: &Arc<Self>) -> Registry {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(TelemetryCollector(Arc::clone(self))));
        registry
    }

    /// The OpenMetrics text exposition.
    pub fn encode(self: &Arc<Self>) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry());
        out
    }
}

/// Config reloads by what and outcome. Process-wide, like SIGHUP itself.
static RELOADS: LazyLock<Mutex<BTreeMap<(&'static str, &'static str), u64>>> =
    LazyLock::new(Mutex::default);

/// Counts one reload attempt of `what` (called by [`crate::reload`]).
pub fn record_reload(what: &'static str, success: bool) {
    let outcome = if success { "success" } else { "failure" };
    *RELOADS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry((what, outcome))
        .or_default() += 1;
}

#[derive(Debug)]
struct TelemetryCollector(Arc<Telemetry>);

fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: &[(Vec<(&str, &str)>, u64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        if labels.is_empty() {
            family.encode_counter::<NoLabelSet, _, u64>(value, None)?;
        } else {
            family
                .encode_family(labels)?
                .encode_counter::<NoLabelSet, _, u64>(value, None)?;
        }
    }
    Ok(())
}

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: &[(Vec<(&str, &str)>, V)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        if labels.is_empty() {
            family.encode_gauge(value)?;
        } else {
            family.encode_family(labels)?.encode_gauge(value)?;
        }
    }
    Ok(())
}

fn encode_edge(
    encoder: &mut DescriptorEncoder<'_>,
    edge: &EdgeSources,
) -> Result<(), std::fmt::Error> {
    use crate::proxy::limits::{CloseReason, Refusal};
    let refused: Vec<_> = Refusal::ALL
        .iter()
        .map(|why| {
            (
                vec![("reason", why.label())],
                edge.stats.refused_calls(*why),
            )
        })
        .collect();
    counter(
        encoder,
        "portcullis_refused_requests",
        "Calls refused by the edge before the pipeline: unauthenticated (at HEADERS, body unread), buffer limits, body timeout.",
        &refused,
    )?;
    counter(
        encoder,
        "portcullis_refused_connections",
        "Client connections closed at accept because max_connections were open.",
        &[(vec![], edge.stats.refused_connections())],
    )?;
    let closed: Vec<_> = CloseReason::ALL
        .iter()
        .map(|why| {
            (
                vec![("reason", why.label())],
                edge.stats.closed_connections(*why),
            )
        })
        .collect();
    counter(
        encoder,
        "portcullis_closed_connections",
        "Client connections the proxy closed with a GOAWAY: max_age, certificate_expired, certificate_revoked.",
        &closed,
    )?;
    gauge(
        encoder,
        "portcullis_buffered_request_bytes",
        "Request bytes (headers, bodies, decompressed messages) held by calls now, all connections.",
        &[(vec![], (edge.buffered_bytes)() as u64)],
    )?;
    gauge(
        encoder,
        "portcullis_connection_slots",
        "Client connections counted against max_connections now (TLS handshakes included).",
        &[(vec![], (edge.open_slots)() as u64)],
    )?;
    gauge(
        encoder,
        "portcullis_audit_queue_bytes",
        "Audit lines waiting for (or being written to) the audit sink, in bytes.",
        &[(vec![], edge.audit.queued_bytes() as u64)],
    )?;
    counter(
        encoder,
        "portcullis_audit_refused",
        "Calls refused because the audit queue was full or the sink stuck (fail closed).",
        &[(vec![], edge.audit.refused())],
    )?;
    counter(
        encoder,
        "portcullis_audit_dropped",
        "Audit lines about refused connections and authentications dropped because the queue was over half full.",
        &[(vec![], edge.audit.dropped())],
    )?;
    counter(
        encoder,
        "portcullis_audit_write_errors",
        "Writes to the audit sink that failed (the lines are kept and retried).",
        &[(vec![], edge.audit.write_errors())],
    )
}

fn encode_offload(
    encoder: &mut DescriptorEncoder<'_>,
    stats: &OffloadStats,
) -> Result<(), std::fmt::Error> {
    let load = |v: &AtomicU64| v.load(Ordering::Relaxed);
    let counters: [(&str, &str, &AtomicU64); 9] = [
        (
            "portcullis_offload_objects_written",
            "Payload objects written to the object store.",
            &stats.objects_written,
        ),
        (
            "portcullis_offload_bytes_written",
            "Bytes of payload objects written to the object store.",
            &stats.bytes_written,
        ),
        (
            "portcullis_offload_write_errors",
            "Object writes that failed (the call failed with UNAVAILABLE, nothing forwarded).",
            &stats.write_errors,
        ),
        (
            "portcullis_offload_objects_read",
            "Payload objects read from the object store (cache hits not included).",
            &stats.objects_read,
        ),
        (
            "portcullis_offload_bytes_read",
            "Bytes of payload objects read from the object store.",
            &stats.bytes_read,
        ),
        (
            "portcullis_offload_read_errors",
            "Object reads that failed (unavailable, missing, wrong digest or size).",
            &stats.read_errors,
        ),
        (
            "portcullis_offload_objects_lost",
            "Objects missing or not matching their digest (the call failed with DATA_LOSS).",
            &stats.objects_lost,
        ),
        (
            "portcullis_offload_cache_hits",
            "Object reads answered by the in-memory cache.",
            &stats.cache_hits,
        ),
        (
            "portcullis_payloads_compressed",
            "Payloads compressed before sealing.",
            &stats.payloads_compressed,
        ),
    ];
    for (name, help, value) in counters {
        counter(encoder, name, help, &[(vec![], load(value))])?;
    }
    let mut family = encoder.encode_descriptor(
        "portcullis_offload_duration_seconds",
        "Object store call latency by operation (put, get).",
        None,
        MetricType::Histogram,
    )?;
    for (operation, histogram) in [
        ("put", &stats.write_duration),
        ("get", &stats.read_duration),
    ] {
        histogram.encode(family.encode_family(&[("operation", operation)])?)?;
    }
    Ok(())
}

impl Collector for TelemetryCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let t = &self.0;
        let mut series: Vec<Arc<CallSeries>> = read(&t.series).values().cloned().collect();
        series.sort_by(|a, b| {
            (a.namespace, a.method.path.as_str()).cmp(&(b.namespace, b.method.path.as_str()))
        });
        let load = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let base = |s: &CallSeries| {
            vec![
                ("namespace", s.namespace),
                ("service", s.service_label()),
                ("method", s.method.name.as_str()),
            ]
        };

        let mut calls = Vec::new();
        let mut decisions = Vec::new();
        let mut received = Vec::new();
        let mut sent = Vec::new();
        for s in &series {
            for (code, count) in s.codes.iter().enumerate() {
                let count = load(count);
                if count > 0 {
                    let mut labels = base(s);
                    labels.push(("code", code_name(code)));
                    calls.push((labels, count));
                }
            }
            for (i, decision) in ["allow", "deny"].into_iter().enumerate() {
                let count = s.authz.get(i).map(load).unwrap_or_default();
                if count > 0 {
                    let mut labels = base(s);
                    labels.push(("decision", decision));
                    decisions.push((labels, count));
                }
            }
            received.push((base(s), load(&s.received_bytes)));
            sent.push((base(s), load(&s.sent_bytes)));
        }
        counter(
            &mut encoder,
            "portcullis_calls",
            "Calls by namespace, method and gRPC status code (the code the caller got).",
            &calls,
        )?;
        counter(
            &mut encoder,
            "portcullis_authz_decisions",
            "Authorization decisions by namespace, method and decision.",
            &decisions,
        )?;
        counter(
            &mut encoder,
            "portcullis_received_bytes",
            "Request message bytes received from callers (uncompressed, before sealing).",
            &received,
        )?;
        counter(
            &mut encoder,
            "portcullis_sent_bytes",
            "Response message bytes sent to callers (uncompressed, after opening).",
            &sent,
        )?;
        for (name, help, pick) in [
            (
                "portcullis_call_duration_seconds",
                "Time from a call entering the pipeline to its answer, by namespace and method.",
                (|s: &CallSeries| &s.duration) as fn(&CallSeries) -> &Histogram,
            ),
            (
                "portcullis_upstream_duration_seconds",
                "Time spent on the upstream call (connect, send, wait, read), by namespace and method.",
                |s: &CallSeries| &s.upstream,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for s in &series {
                let histogram = pick(s);
                if histogram.count() > 0 {
                    let labels = base(s);
                    histogram.encode(family.encode_family(&labels)?)?;
                }
            }
        }
        gauge(
            &mut encoder,
            "portcullis_in_flight_calls",
            "Calls currently in the pipeline.",
            &[(vec![], t.in_flight.load(Ordering::Relaxed))],
        )?;
        gauge(
            &mut encoder,
            "portcullis_open_connections",
            "Client connections currently open.",
            &[(vec![], t.connections_open.load(Ordering::Relaxed))],
        )?;
        counter(
            &mut encoder,
            "portcullis_connections",
            "Client connections accepted (TLS completed).",
            &[(vec![], t.connections_total.load(Ordering::Relaxed))],
        )?;
        counter(
            &mut encoder,
            "portcullis_tls_handshake_failures",
            "Client TLS handshakes refused or timed out.",
            &[(vec![], t.handshake_failures.load(Ordering::Relaxed))],
        )?;
        if let Some(edge) = read(&t.edge).clone() {
            encode_edge(&mut encoder, &edge)?;
        }
        let failures: Vec<_> = read(&t.upstream_failures)
            .iter()
            .map(|(name, count)| (vec![("upstream", *name)], *count))
            .collect();
        counter(
            &mut encoder,
            "portcullis_upstream_failures",
            "Calls that failed because an upstream was unreachable or the connection broke.",
            &failures,
        )?;

        // Crypto counters, bridged from each key's CryptoMetrics.
        let keys = read(&t.keys).clone();
        let snapshots: Vec<_> = keys
            .iter()
            .map(|k| (k.name.as_str(), k.crypto.snapshot(), &k.provider))
            .collect();
        type Pick = fn(&crate::crypto::CryptoMetricsSnapshot) -> u64;
        let crypto: [(&str, &str, Pick); 8] = [
            ("portcullis_payloads_sealed", "Payloads sealed.", |s| {
                s.seals
            }),
            ("portcullis_payloads_opened", "Payloads opened.", |s| {
                s.opens
            }),
            (
                "portcullis_seal_failures",
                "Payloads that could not be sealed.",
                |s| s.seal_failures,
            ),
            (
                "portcullis_open_failures",
                "Payloads that did not open, and key resolutions that failed before opening.",
                |s| s.open_failures,
            ),
            (
                "portcullis_data_key_rotations",
                "New data keys put in use (a namespace's first one included).",
                |s| s.data_key_rotations,
            ),
            (
                "portcullis_data_key_cache_hits",
                "Data key lookups for opening answered by the unwrapped-key cache.",
                |s| s.cache_hits,
            ),
            (
                "portcullis_data_key_cache_misses",
                "Data key lookups for opening that needed the key provider.",
                |s| s.cache_misses,
            ),
            (
                "portcullis_key_provider_calls",
                "Calls to the key provider made for payloads (readiness probes not included).",
                |s| s.provider_calls,
            ),
        ];
        for (name, help, pick) in crypto {
            let samples: Vec<_> = snapshots
                .iter()
                .map(|(key, snapshot, _)| (vec![("key", *key)], pick(snapshot)))
                .collect();
            counter(&mut encoder, name, help, &samples)?;
        }
        let mut errors = Vec::new();
        for (key, _, provider) in &snapshots {
            for (operation, count) in [
                ("generate", &provider.generate_errors),
                ("unwrap", &provider.unwrap_errors),
            ] {
                errors.push((vec![("key", *key), ("operation", operation)], load(count)));
            }
        }
        counter(
            &mut encoder,
            "portcullis_key_provider_errors",
            "Key provider calls that failed (unavailable, refused, unknown key), probes included.",
            &errors,
        )?;
        {
            let mut family = encoder.encode_descriptor(
                "portcullis_key_provider_duration_seconds",
                "Key provider call latency by key and operation, probes included.",
                None,
                MetricType::Histogram,
            )?;
            for (key, _, provider) in &snapshots {
                for (operation, histogram) in [
                    ("generate", &provider.generate),
                    ("unwrap", &provider.unwrap),
                ] {
                    let labels = [("key", *key), ("operation", operation)];
                    histogram.encode(family.encode_family(&labels)?)?;
                }
            }
        }

        if let Some(stats) = read(&t.offload).clone() {
            encode_offload(&mut encoder, &stats)?;
        }

        let now = unix_now();
        let certificates: Vec<_> = t
            .certificates()
            .into_iter()
            .filter_map(|(name, validity)| Some((name, validity?)))
            .collect();
        let expiry: Vec<_> = certificates
            .iter()
            .map(|(name, v)| {
                (
                    vec![("certificate", name.as_str())],
                    v.seconds_to_expiry(now),
                )
            })
            .collect();
        gauge(
            &mut encoder,
            "portcullis_certificate_expiry_seconds",
            "Seconds until a certificate expires (negative: expired). listener = the client-facing one.",
            &expiry,
        )?;

        let report = t.readiness();
        let ready = i64::from(t.is_ready());
        gauge(
            &mut encoder,
            "portcullis_ready",
            "1 when the last readiness probe passed and the proxy is not shutting down.",
            &[(vec![], ready)],
        )?;
        let mut up = Vec::new();
        let mut checks = Vec::new();
        if let Some(report) = &report {
            for check in &report.checks {
                checks.push((
                    vec![("kind", check.kind.as_str()), ("name", check.name.as_str())],
                    i64::from(check.ok),
                ));
                if check.kind == readiness::CheckKind::Upstream {
                    up.push((vec![("upstream", check.name.as_str())], i64::from(check.ok)));
                }
            }
        }
        let connections: Vec<_> = read(&t.upstream_connections)
            .iter()
            .map(|(name, source)| (name.clone(), source()))
            .collect();
        let connections: Vec<_> = connections
            .iter()
            .map(|(name, count)| (vec![("upstream", name.as_str())], *count))
            .collect();
        gauge(
            &mut encoder,
            "portcullis_upstream_connections",
            "Open connections to each upstream, as its connection pool reports them.",
            &connections,
        )?;
        let pools: Vec<(String, crate::upstream::PoolStats)> = read(&t.upstream_pools)
            .iter()
            .map(|(name, source)| (name.clone(), source()))
            .collect();
        let mut resolved = Vec::new();
        let mut oldest = Vec::new();
        let mut by_address: BTreeMap<(&str, &str), i64> = BTreeMap::new();
        for (name, stats) in &pools {
            for address in &stats.resolved {
                resolved.push((
                    vec![("upstream", name.as_str()), ("address", address.as_str())],
                    1,
                ));
                by_address
                    .entry((name.as_str(), address.as_str()))
                    .or_insert(0);
            }
            let age = stats
                .connections
                .iter()
                .map(|(_, age)| *age)
                .fold(0.0_f64, f64::max);
            oldest.push((vec![("upstream", name.as_str())], age));
            for (address, _) in &stats.connections {
                *by_address
                    .entry((name.as_str(), address.as_str()))
                    .or_insert(0) += 1;
            }
        }
        gauge(
            &mut encoder,
            "portcullis_upstream_resolved_address",
            "Addresses each upstream's host resolved to at its last connection attempt (1 each).",
            &resolved,
        )?;
        let by_address: Vec<_> = by_address
            .iter()
            .map(|((name, address), count)| {
                (vec![("upstream", *name), ("address", *address)], *count)
            })
            .collect();
        gauge(
            &mut encoder,
            "portcullis_upstream_address_connections",
            "Connections taking new calls, by upstream and the address they are connected to.",
            &by_address,
        )?;
        gauge(
            &mut encoder,
            "portcullis_upstream_connection_age_seconds",
            "Age of each upstream's oldest connection taking new calls (0: none).",
            &oldest,
        )?;
        gauge(
            &mut encoder,
            "portcullis_upstream_up",
            "1 when the last probe reached the upstream (TCP connect, TLS handshake when configured).",
            &up,
        )?;
        gauge(
            &mut encoder,
            "portcullis_readiness_check",
            "Result of each readiness check in the last probe round (1 = passed).",
            &checks,
        )?;
        let age = report
            .as_ref()
            .and_then(|r| r.checked_at.elapsed().ok())
            .map(|d| d.as_secs_f64())
            .unwrap_or(-1.0);
        gauge(
            &mut encoder,
            "portcullis_readiness_age_seconds",
            "Age of the last readiness probe round (-1: none yet).",
            &[(vec![], age)],
        )?;

        let reloads: Vec<_> = RELOADS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|((what, outcome), count)| (vec![("what", *what), ("outcome", *outcome)], *count))
            .collect();
        counter(
            &mut encoder,
            "portcullis_config_reloads",
            "Reloads (file change or SIGHUP) by what was reloaded and outcome; failures keep the previous state.",
            &reloads,
        )?;
        let mut info = encoder.encode_descriptor(
            "portcullis_build",
            "Build information.",
            None,
            MetricType::Info,
        )?;
        info.encode_info(&[("version", env!("CARGO_PKG_VERSION"))])?;
        let schema = read(&self.0.schema).clone();
        if !schema.is_empty() {
            let labels: Vec<(&str, &str)> = schema.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let mut info = encoder.encode_descriptor(
                "portcullis_schema",
                "The API schema in force: built in, or a descriptor set from [schema], and what it adds.",
                None,
                MetricType::Info,
            )?;
            info.encode_info(&labels)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::Schema;

    #[test]
    fn labels_are_bounded_and_the_exposition_names_every_family() {
        let telemetry = Telemetry::new();
        telemetry.set_namespaces(["payments"]);
        telemetry.set_schema(vec![
            ("source", "embedded".into()),
            ("methods", "140".into()),
        ]);
        let schema = Schema::global();
        let start = schema
            .method("/temporal.api.workflowservice.v1.WorkflowService/StartWorkflowExecution")
            .expect("method");
        let system = schema
            .method("/temporal.api.workflowservice.v1.WorkflowService/GetSystemInfo")
            .expect("method");
        assert_eq!(
            telemetry.namespace_label(start, Some("payments")),
            "payments"
        );
        assert_eq!(
            telemetry.namespace_label(start, Some("anything-else")),
            OTHER_NAMESPACE
        );
        assert_eq!(telemetry.namespace_label(system, None), CLUSTER_NAMESPACE);
        let series = telemetry.series(telemetry.namespace_label(start, Some("payments")), start);
        assert!(Arc::ptr_eq(
            &series,
            &telemetry.series(telemetry.namespace_label(start, Some("payments")), start)
        ));
        series.codes[0].fetch_add(3, Ordering::Relaxed);
        series.codes[7].fetch_add(1, Ordering::Relaxed);
        series.duration.observe(std::time::Duration::from_millis(2));
        telemetry.set_certificate(
            "listener",
            CertValidity {
                not_before: 0,
                not_after: unix_now() + 100,
            },
        );
        record_reload("test", true);
        telemetry.watch_upstream_connections("primary", || 2);
        let text = telemetry.encode();
        for needle in [
            "portcullis_calls_total{namespace=\"payments\",service=\"WorkflowService\",method=\"StartWorkflowExecution\",code=\"OK\"} 3",
            "code=\"PERMISSION_DENIED\"} 1",
            "portcullis_call_duration_seconds_bucket{le=\"0.0025\",namespace=\"payments\",service=\"WorkflowService\",method=\"StartWorkflowExecution\"} 1",
            "portcullis_call_duration_seconds_bucket{le=\"+Inf\",namespace=\"payments\",service=\"WorkflowService\",method=\"StartWorkflowExecution\"} 1",
            "portcullis_call_duration_seconds_count{",
            "portcullis_certificate_expiry_seconds{certificate=\"listener\"}",
            "portcullis_config_reloads_total{what=\"test\",outcome=\"success\"}",
            "# TYPE portcullis_upstream_duration_seconds histogram",
            "portcullis_ready 0",
            "portcullis_upstream_connections{upstream=\"primary\"} 2",
            "portcullis_build_info{version=",
            "portcullis_schema_info{source=\"embedded\"",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
