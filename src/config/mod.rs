//! The configuration file (TOML), its validation, and path resolution.
//!
//! Relative paths in a config file are resolved against the file's own directory, so a config
//! and its certificates can move together.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::authz::{AuthorizationConfig, BearerConfig};
use crate::crypto::config::EncryptionConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listener: ListenerConfig,
    #[serde(default)]
    pub limits: Limits,
    /// Upstream Temporal frontends by name.
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    pub routing: Routing,
    #[serde(default, rename = "namespaces")]
    pub namespaces: Vec<NamespaceConfig>,
    /// Who may call what. Required: a proxy never allows by default.
    pub authorization: AuthorizationConfig,
    /// How payloads are sealed. Required: a proxy never forwards plaintext by default.
    pub encryption: EncryptionConfig,
    /// The admin listener (metrics, health, readiness). Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<AdminConfig>,
    /// Bearer-token (JWT) authentication, for callers without a client certificate. Off when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer: Option<BearerConfig>,
    /// The codec server for the Web UI and the CLI. Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codec: Option<crate::codec::CodecConfig>,
    /// Temporal's API schema: the built-in one, or a newer descriptor set.
    #[serde(default)]
    pub schema: crate::schema::SchemaConfig,
    /// The object store large payloads are offloaded to (namespaces with `offload`). Off when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offload: Option<crate::offload::OffloadConfig>,
    /// The file this config was loaded from (for reloads).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// `HOST:PORT`, or `unix:/path/to/socket`.
    pub address: String,
    /// Client-facing TLS. Required unless `plaintext = true`.
    #[serde(default)]
    pub tls: Option<ServerTls>,
    /// Serve without TLS. Allowed only on a loopback address or a Unix socket (sidecar use).
    #[serde(default)]
    pub plaintext: bool,
    /// Threads serving client connections (each connection and its calls stay on one).
    /// Default: one per core.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
}

impl ListenerConfig {
    /// `workers`, or one per core.
    pub fn serving_threads(&self) -> usize {
        self.workers.unwrap_or_else(crate::workers::default_count)
    }
}

/// `[admin]`: a plain-HTTP listener with `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `IP:PORT`, e.g. `127.0.0.1:9090` (a pod IP or `0.0.0.0` for a kubelet's probes).
    pub listen: String,
    /// How often readiness is probed (key round trip, upstream connect, certificates).
    #[serde(default = "default_probe_interval")]
    pub probe_interval_seconds: u64,
    /// Bound on each probe.
    #[serde(default = "default_probe_timeout")]
    pub probe_timeout_seconds: u64,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:9090".into(),
            probe_interval_seconds: default_probe_interval(),
            probe_timeout_seconds: default_probe_timeout(),
        }
    }
}

fn default_probe_interval() -> u64 {
    10
}
fn default_probe_timeout() -> u64 {
    5
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    /// The proxy's certificate chain (PEM).
    pub cert: PathBuf,
    /// The proxy's private key (PEM).
    pub key: PathBuf,
    /// CA bundle (PEM) that client certificates must chain to.
    pub client_ca: PathBuf,
    /// Refuse callers without a client certificate (the default).
    #[serde(default = "yes")]
    pub require_client_cert: bool,
    /// Certificate revocation lists (PEM or DER, one or more per file) for client certificates,
    /// checked at every handshake and reloaded on change: a connection whose certificate a new
    /// list revokes is closed. With lists configured, every client CA must have one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub crls: Vec<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest request message accepted from a caller (after decompression).
    #[serde(default = "default_max_request")]
    pub max_request_bytes: usize,
    /// Largest response message accepted from an upstream (after decompression).
    #[serde(default = "default_max_response")]
    pub max_response_bytes: usize,
    /// How long in-flight calls may run after a shutdown signal.
    #[serde(default = "default_grace")]
    pub shutdown_grace_seconds: u64,
    /// TLS handshakes that take longer are dropped.
    #[serde(default = "default_handshake")]
    pub handshake_timeout_seconds: u64,
    /// Connecting to an upstream that takes longer fails the call with UNAVAILABLE.
    #[serde(default = "default_connect")]
    pub upstream_connect_timeout_seconds: u64,
    /// Payloads one request or response may hold (RESOURCE_EXHAUSTED beyond).
    #[serde(default = "default_max_payloads")]
    pub max_payloads_per_message: usize,
    /// Bytes of large messages (256 KiB and up) being sealed or opened at once, off the
    /// serving threads; more wait for room.
    #[serde(default = "default_crypto_budget")]
    pub crypto_budget_bytes: usize,
    /// How long a large message waits for room in that budget before RESOURCE_EXHAUSTED.
    #[serde(default = "default_crypto_wait")]
    pub crypto_wait_seconds: u64,
    /// Client connections open at once, TLS handshakes included; more are closed at accept.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Calls (HTTP/2 streams) open at once on one client connection.
    #[serde(default = "default_max_streams")]
    pub max_concurrent_streams: u32,
    /// Largest request header block (HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE).
    #[serde(default = "default_max_header_list")]
    pub max_header_list_bytes: u32,
    /// Request bytes (headers, bodies, decompressed messages) one connection's calls may hold
    /// at once; a call that would go past it gets RESOURCE_EXHAUSTED.
    #[serde(default = "default_connection_buffer")]
    pub max_connection_buffered_bytes: usize,
    /// The same, for all connections together.
    #[serde(default = "default_process_buffer")]
    pub max_buffered_bytes: usize,
    /// A request body that has not fully arrived this long after its headers is refused
    /// (DEADLINE_EXCEEDED) and its buffer freed.
    #[serde(default = "default_body_timeout")]
    pub body_timeout_seconds: u64,
    /// A connection this old is sent a GOAWAY (clients reconnect); 0 = no limit.
    #[serde(default = "default_max_connection_age")]
    pub max_connection_age_seconds: u64,
    /// After that GOAWAY, calls in flight (long polls included) get this long to finish before
    /// they end with UNAVAILABLE and the connection closes.
    #[serde(default = "default_max_connection_age_grace")]
    pub max_connection_age_grace_seconds: u64,
    /// Audit lines waiting for the audit sink, in bytes. A call whose decision line does not
    /// fit is refused (UNAVAILABLE): the proxy never runs calls it cannot audit.
    #[serde(default = "default_audit_queue")]
    pub audit_queue_bytes: usize,
    /// An audit write (or failing retries) pending this long means the sink is stuck: calls are
    /// refused until it recovers.
    #[serde(default = "default_audit_stall")]
    pub audit_stall_seconds: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_bytes: default_max_request(),
            max_response_bytes: default_max_response(),
            shutdown_grace_seconds: default_grace(),
            handshake_timeout_seconds: default_handshake(),
            upstream_connect_timeout_seconds: default_connect(),
            max_payloads_per_message: default_max_payloads(),
            crypto_budget_bytes: default_crypto_budget(),
            crypto_wait_seconds: default_crypto_wait(),
            max_connections: default_max_connections(),
            max_concurrent_streams: default_max_streams(),
            max_header_list_bytes: default_max_header_list(),
            max_connection_buffered_bytes: default_connection_buffer(),
            max_buffered_bytes: default_process_buffer(),
            body_timeout_seconds: default_body_timeout(),
            max_connection_age_seconds: default_max_connection_age(),
            max_connection_age_grace_seconds: default_max_connection_age_grace(),
            audit_queue_bytes: default_audit_queue(),
            audit_stall_seconds: default_audit_stall(),
        }
    }
}

impl Limits {
    fn validate(&self) -> Result<(), String> {
        if self.max_request_bytes == 0 || self.max_response_bytes == 0 {
            return Err("limits must be positive".into());
        }
        // A request of the largest size (compressed and decompressed at once) must fit.
        let largest = self
            .max_request_bytes
            .saturating_mul(2)
            .saturating_add(self.max_header_list_bytes as usize)
            .saturating_add(1024);
        if self.max_connection_buffered_bytes < largest {
            return Err(format!(
                "limits.max_connection_buffered_bytes must hold at least one request of max_request_bytes (compressed and decompressed) and its headers: at least {largest}"
            ));
        }
        if self.max_buffered_bytes < self.max_connection_buffered_bytes {
            return Err(
                "limits.max_buffered_bytes must be at least limits.max_connection_buffered_bytes"
                    .into(),
            );
        }
        if self.max_connections == 0 {
            return Err("limits.max_connections must be at least 1".into());
        }
        if self.max_concurrent_streams == 0 {
            return Err("limits.max_concurrent_streams must be at least 1".into());
        }
        if !(4096..=1024 * 1024).contains(&self.max_header_list_bytes) {
            return Err("limits.max_header_list_bytes must be 4096-1048576".into());
        }
        if self.body_timeout_seconds == 0 {
            return Err("limits.body_timeout_seconds must be at least 1".into());
        }
        if self.audit_queue_bytes < 64 * 1024 {
            return Err("limits.audit_queue_bytes must be at least 65536".into());
        }
        if self.audit_stall_seconds == 0 {
            return Err("limits.audit_stall_seconds must be at least 1".into());
        }
        if self.max_payloads_per_message == 0
            || self.crypto_budget_bytes < 1024
            || self.crypto_wait_seconds == 0
        {
            return Err("limits: max_payloads_per_message and crypto_wait_seconds must be positive, crypto_budget_bytes at least 1024".into());
        }
        Ok(())
    }
}

/// The placeholder that makes an upstream a template: one endpoint per namespace.
pub const NAMESPACE_PLACEHOLDER: &str = "{namespace}";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `HOST:PORT` of the Temporal frontend (or of the TLS terminator in front of it). May hold
    /// `{namespace}` (e.g. `{namespace}.a1b2c.tmprl.cloud:7233`): then every namespace routed
    /// here gets its own endpoint and connections.
    pub address: String,
    /// TLS to the upstream; without it the upstream is spoken to in plaintext HTTP/2.
    #[serde(default)]
    pub tls: Option<UpstreamTls>,
    /// How the proxy authenticates to the upstream: a client certificate it issues itself or
    /// reads from files, or an API key.
    #[serde(default)]
    pub credentials: Option<CredentialsConfig>,
    /// HTTP/2 connections kept to the endpoint (calls are spread over them).
    #[serde(default = "default_connections")]
    pub connections: usize,
    /// A connection this old takes no new calls (its calls in flight, long polls included,
    /// finish on it); the next one re-resolves the host. 0 = no limit.
    #[serde(default = "default_upstream_max_age")]
    pub max_connection_age_seconds: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// CA bundle (PEM) that the upstream's certificate must chain to.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Also trust the operating system's root certificates (e.g. for Temporal Cloud).
    #[serde(default)]
    pub system_roots: bool,
    /// Name to verify the upstream's certificate against (default: the host of `address`).
    /// May hold `{namespace}`.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Client certificate (PEM) presented to the upstream: shorthand for
    /// `credentials = { type = "files", cert, key }`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Key (PEM) of the client certificate.
    #[serde(default)]
    pub key: Option<PathBuf>,
}

/// Upstream credentials. Client certificates need `[upstreams.NAME.tls]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum CredentialsConfig {
    /// Client certificates minted by the proxy from an issuing CA, renewed before they expire.
    Issued(IssuedCredentials),
    /// A client certificate and key written by something else, reloaded when they change.
    Files(FileCredentials),
    /// An API key sent as `authorization: Bearer KEY`, replacing the caller's header.
    ApiKey(ApiKeyCredentials),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuedCredentials {
    /// The issuing CA's certificate (PEM): the upstream trusts it for client certificates.
    pub ca_cert: PathBuf,
    /// Its private key (PEM); must not be readable by group or others.
    pub ca_key: PathBuf,
    /// How long each certificate lives.
    #[serde(default = "default_cert_lifetime")]
    pub lifetime_seconds: u64,
    /// A certificate is renewed at this fraction of its lifetime (±5 % jitter).
    #[serde(default = "default_renew_at")]
    pub renew_at: f64,
    /// Subject common name of the certificates.
    #[serde(default = "default_common_name")]
    pub common_name: String,
    /// DNS names (SANs).
    #[serde(default)]
    pub dns_names: Vec<String>,
    /// URI SANs, e.g. a SPIFFE ID.
    #[serde(default)]
    pub uris: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCredentials {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyCredentials {
    /// A file holding the key (reloaded when it changes).
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Or an environment variable holding it (read at start and on config reload).
    #[serde(default)]
    pub env: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Routing {
    /// Upstream for cluster-scoped methods (GetSystemInfo, ListNamespaces, health, …).
    pub system_upstream: String,
    /// Upstream for namespaces not listed under `[[namespaces]]`. Without it they are refused.
    #[serde(default)]
    pub default_upstream: Option<String>,
    /// When `system_upstream` is a template: the namespace whose endpoint serves cluster-scoped
    /// calls.
    #[serde(default)]
    pub system_namespace: Option<String>,
    /// Who answers `ListNamespaces`: `auto` (default: the system upstream when every configured
    /// namespace is served by it, else the proxy itself from the configured namespaces),
    /// `upstream` or `configured`.
    #[serde(default)]
    pub list_namespaces: ListNamespacesMode,
}

/// Who answers `ListNamespaces` (see [`Routing::list_namespaces`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ListNamespacesMode {
    #[default]
    Auto,
    /// Forward it to the system upstream (one cluster serves every namespace).
    Upstream,
    /// Answer from the configured namespaces, each described by its own upstream.
    Configured,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    pub name: String,
    pub upstream: String,
    /// The namespace's name at the upstream, when it differs from `name` (the name clients
    /// use): e.g. `payments.a1b2c` on Temporal Cloud. See the README, "Namespace translation".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_namespace: Option<String>,
    /// The key (from `[encryption.keys]`) sealing this namespace's payloads; default:
    /// `encryption.default_key`.
    #[serde(default)]
    pub encryption_key: Option<String>,
    /// Refuse responses of this namespace that hold a payload portcullis did not seal;
    /// default: `[encryption] encrypted_only`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypted_only: Option<bool>,
    /// What happens to the `identity` that requests carry into Temporal's history: `keep`,
    /// `replace` (the verified identity) or `append` (default: `client (via portcullis: ID)`).
    #[serde(default)]
    pub identity: crate::identity::IdentityMode,
    /// An API key for this namespace's calls (`authorization: Bearer KEY`), overriding the
    /// upstream's: for a regional endpoint shared by namespaces that each have their own key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<ApiKeyCredentials>,
    /// Compress payloads (zstd) before sealing them. Off when absent: see the README on
    /// compress-then-encrypt before turning it on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<crate::crypto::CompressionConfig>,
    /// Store large payloads in the `[offload]` object store, with a sealed reference upstream.
    /// Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offload: Option<crate::offload::NamespaceOffload>,
}

fn yes() -> bool {
    true
}
fn default_max_request() -> usize {
    4 * 1024 * 1024
}
fn default_max_response() -> usize {
    128 * 1024 * 1024
}
fn default_grace() -> u64 {
    30
}
fn default_handshake() -> u64 {
    10
}
fn default_connect() -> u64 {
    5
}
fn default_max_payloads() -> usize {
    crate::payload::walker::DEFAULT_MAX_PAYLOADS
}
fn default_crypto_budget() -> usize {
    64 * 1024 * 1024
}
fn default_crypto_wait() -> u64 {
    5
}
fn default_max_connections() -> usize {
    4096
}
fn default_max_streams() -> u32 {
    1000
}
fn default_max_header_list() -> u32 {
    64 * 1024
}
fn default_connection_buffer() -> usize {
    64 * 1024 * 1024
}
fn default_process_buffer() -> usize {
    512 * 1024 * 1024
}
fn default_body_timeout() -> u64 {
    30
}
fn default_max_connection_age() -> u64 {
    300
}
fn default_max_connection_age_grace() -> u64 {
    80
}
fn default_audit_queue() -> usize {
    16 * 1024 * 1024
}
fn default_audit_stall() -> u64 {
    5
}
fn default_connections() -> usize {
    1
}
fn default_upstream_max_age() -> u64 {
    300
}
fn default_cert_lifetime() -> u64 {
    3600
}
fn default_renew_at() -> f64 {
    0.7
}
fn default_common_name() -> String {
    "portcullis".into()
}

/// Where the proxy listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddress {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl ListenAddress {
    pub fn parse(text: &str) -> Result<ListenAddress, ConfigError> {
        if let Some(path) = text.strip_prefix("unix:") {
            return Ok(ListenAddress::Unix(PathBuf::from(path)));
        }
        text.parse().map(ListenAddress::Tcp).map_err(|_| {
            ConfigError::Invalid(format!(
                "listener address {text:?} is neither IP:PORT nor unix:/path"
            ))
        })
    }
}

impl Config {
    /// Reads, parses, resolves relative paths and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Config::from_toml(&text).map_err(|e| match e {
            ConfigError::Invalid(message) => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses and validates config text; paths stay as written.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn to_toml(&self) -> String {
        // Every field is plain data; serialization cannot fail.
        toml::to_string_pretty(self).unwrap_or_default()
    }

    pub fn listen_address(&self) -> Result<ListenAddress, ConfigError> {
        ListenAddress::parse(&self.listener.address)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let address = self.listen_address()?;
        match (&self.listener.tls, self.listener.plaintext) {
            (Some(_), true) => return invalid("listener: set either [listener.tls] or plaintext = true, not both".into()),
            (None, false) => {
                return invalid("listener: [listener.tls] is required (plaintext = true is allowed only on loopback or a Unix socket)".into())
            }
            (None, true) => {
                let local = match &address {
                    ListenAddress::Tcp(addr) => addr.ip().is_loopback(),
                    ListenAddress::Unix(_) => true,
                };
                if !local {
                    return invalid(format!(
                        "listener: plaintext is allowed only on a loopback address or a Unix socket, not {}",
                        self.listener.address
                    ));
                }
            }
            (Some(_), false) => {}
        }
        if self.upstreams.is_empty() {
            return invalid("at least one [upstreams.NAME] is required".into());
        }
        for (name, upstream) in &self.upstreams {
            upstream
                .validate()
                .map_err(|m| ConfigError::Invalid(format!("upstreams.{name}: {m}")))?;
        }
        let known = |name: &str, what: &str| {
            if self.upstreams.contains_key(name) {
                Ok(())
            } else {
                Err(ConfigError::Invalid(format!(
                    "{what} refers to unknown upstream {name:?}"
                )))
            }
        };
        known(&self.routing.system_upstream, "routing.system_upstream")?;
        let system_is_template = self
            .upstreams
            .get(&self.routing.system_upstream)
            .is_some_and(UpstreamConfig::is_template);
        match (&self.routing.system_namespace, system_is_template) {
            (None, true) => return invalid(format!(
                "routing.system_upstream {:?} is a template ({NAMESPACE_PLACEHOLDER}): set routing.system_namespace",
                self.routing.system_upstream
            )),
            (Some(ns), true) if !template_safe(ns) => {
                return invalid(format!("routing.system_namespace {ns:?} cannot fill an address template"))
            }
            (Some(_), false) => {
                return invalid("routing.system_namespace is only for a templated system_upstream".into())
            }
            _ => {}
        }
        if let Some(default) = &self.routing.default_upstream {
            known(default, "routing.default_upstream")?;
        }
        let mut seen = HashSet::new();
        for ns in &self.namespaces {
            if ns.name.is_empty() {
                return invalid("a [[namespaces]] entry has an empty name".into());
            }
            if ns
                .name
                .starts_with(crate::payload::walker::RESERVED_SCOPE_PREFIX)
            {
                return invalid(format!(
                    "namespace {:?}: names starting with {:?} are reserved for portcullis's own key scopes",
                    ns.name,
                    crate::payload::walker::RESERVED_SCOPE_PREFIX
                ));
            }
            if !seen.insert(ns.name.as_str()) {
                return invalid(format!("namespace {:?} is listed twice", ns.name));
            }
            known(&ns.upstream, &format!("namespace {:?}", ns.name))?;
            if let Some(key) = &ns.api_key {
                if key.file.is_some() == key.env.is_some() {
                    return invalid(format!(
                        "namespace {:?}: api_key: set exactly one of file and env",
                        ns.name
                    ));
                }
                let plaintext_remote = self.upstreams.get(&ns.upstream).is_some_and(|u| {
                    u.tls.is_none()
                        && !split_host_port(&u.address.replace(NAMESPACE_PLACEHOLDER, "ns"))
                            .is_some_and(|(host, _)| is_loopback_host(host))
                });
                if plaintext_remote {
                    return invalid(format!(
                        "namespace {:?}: an API key is sent over TLS only (plaintext is allowed to loopback only)",
                        ns.name
                    ));
                }
            }
            let upstream_name = ns.upstream_namespace.as_deref().unwrap_or(&ns.name);
            if self
                .upstreams
                .get(&ns.upstream)
                .is_some_and(UpstreamConfig::is_template)
                && !template_safe(upstream_name)
            {
                return invalid(format!(
                    "namespace {upstream_name:?} cannot fill the address template of upstream {:?}",
                    ns.upstream
                ));
            }
        }
        validate_upstream_namespaces(&self.namespaces)?;
        if !self.encryption.disabled {
            let keys = &self.encryption.keys;
            if keys.is_empty() {
                return invalid("encryption: at least one [encryption.keys.NAME] is required (or disabled = true)".into());
            }
            if let Some(key) = &self.encryption.default_key {
                if !keys.contains_key(key) {
                    return invalid(format!(
                        "encryption.default_key refers to unknown key {key:?}"
                    ));
                }
            }
            if let Some(key) = &self.encryption.cluster_key {
                if !keys.contains_key(key) {
                    return invalid(format!(
                        "encryption.cluster_key refers to unknown key {key:?}"
                    ));
                }
            }
            if let Some(offload) = &self.offload {
                offload.validate().map_err(ConfigError::Invalid)?;
            }
            for ns in &self.namespaces {
                if let Some(compression) = &ns.compression {
                    compression.validate().map_err(|e| {
                        ConfigError::Invalid(format!("namespace {:?}: {e}", ns.name))
                    })?;
                }
                if ns.offload.is_some() && self.offload.is_none() {
                    return invalid(format!(
                        "namespace {:?} offloads payloads: configure the [offload] object store",
                        ns.name
                    ));
                }
                match &ns.encryption_key {
                    Some(key) if !keys.contains_key(key) => {
                        return invalid(format!("namespace {:?} refers to unknown encryption key {key:?}", ns.name))
                    }
                    None if self.encryption.default_key.is_none() => {
                        return invalid(format!(
                            "namespace {:?} names no encryption_key and encryption.default_key is not set",
                            ns.name
                        ))
                    }
                    _ => {}
                }
            }
            if self.routing.default_upstream.is_some() && self.encryption.default_key.is_none() {
                return invalid(
                    "routing.default_upstream serves any namespace: set encryption.default_key"
                        .into(),
                );
            }
            if let Err(e) = self.encryption.policy().validate() {
                return invalid(format!("encryption: {e}"));
            }
            self.encryption
                .validate_keys()
                .map_err(ConfigError::Invalid)?;
        }
        if self.authorization.identity.is_empty() {
            return invalid("authorization.identity must name at least one source".into());
        }
        if !self.authorization.disabled {
            if let Err(e) = self.authorization.validate_inline() {
                return invalid(format!("authorization: {e}"));
            }
        }
        self.limits.validate().map_err(ConfigError::Invalid)?;
        if let Some(workers) = self.listener.workers {
            if !(1..=256).contains(&workers) {
                return invalid(format!("listener.workers must be 1-256, not {workers}"));
            }
        }
        if let Some(admin) = &self.admin {
            if admin.listen.parse::<SocketAddr>().is_err() {
                return invalid(format!("admin.listen {:?} is not IP:PORT", admin.listen));
            }
            if admin.probe_interval_seconds == 0 || admin.probe_timeout_seconds == 0 {
                return invalid(
                    "admin: probe_interval_seconds and probe_timeout_seconds must be positive"
                        .into(),
                );
            }
        }
        if let Some(bearer) = &self.bearer {
            bearer.validate().map_err(ConfigError::Invalid)?;
        }
        if let Some(codec) = &self.codec {
            codec.validate().map_err(ConfigError::Invalid)?;
            if self.encryption.disabled {
                return invalid(
                    "codec: the codec server needs encryption (encryption.disabled is set)".into(),
                );
            }
        }
        Ok(())
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(tls) = &mut self.listener.tls {
            fix(&mut tls.cert);
            fix(&mut tls.key);
            fix(&mut tls.client_ca);
            tls.crls.iter_mut().for_each(fix);
        }
        if let Some(path) = self.listener.address.strip_prefix("unix:") {
            let path = PathBuf::from(path);
            if path.is_relative() {
                self.listener.address = format!("unix:{}", base.join(path).display());
            }
        }
        self.authorization.resolve_paths(base);
        self.encryption.resolve_paths(base);
        if let Some(bearer) = &mut self.bearer {
            bearer.resolve_paths(base);
        }
        if let Some(codec) = &mut self.codec {
            codec.resolve_paths(base);
        }
        if let Some(descriptors) = &mut self.schema.descriptor_set {
            fix(descriptors);
        }
        for ns in &mut self.namespaces {
            if let Some(path) = ns.api_key.as_mut().and_then(|k| k.file.as_mut()) {
                fix(path);
            }
        }
        for upstream in self.upstreams.values_mut() {
            if let Some(tls) = &mut upstream.tls {
                for p in [&mut tls.ca, &mut tls.cert, &mut tls.key]
                    .into_iter()
                    .flatten()
                {
                    fix(p);
                }
            }
            match &mut upstream.credentials {
                Some(CredentialsConfig::Issued(issued)) => {
                    fix(&mut issued.ca_cert);
                    fix(&mut issued.ca_key);
                }
                Some(CredentialsConfig::Files(files)) => {
                    fix(&mut files.cert);
                    fix(&mut files.key);
                }
                Some(CredentialsConfig::ApiKey(key)) => {
                    if let Some(p) = &mut key.file {
                        fix(p);
                    }
                }
                None => {}
            }
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            address: String::new(),
            tls: None,
            credentials: None,
            connections: default_connections(),
            max_connection_age_seconds: default_upstream_max_age(),
        }
    }
}

impl UpstreamConfig {
    /// Whether the address or server name holds `{namespace}`.
    pub fn is_template(&self) -> bool {
        self.address.contains(NAMESPACE_PLACEHOLDER)
            || self
                .tls
                .as_ref()
                .and_then(|t| t.server_name.as_deref())
                .is_some_and(|n| n.contains(NAMESPACE_PLACEHOLDER))
    }

    /// The client certificate's source: `credentials` (issued or files), or the
    /// `tls.cert`/`tls.key` shorthand.
    pub fn certificate_files(&self) -> Option<FileCredentials> {
        match (&self.credentials, &self.tls) {
            (Some(CredentialsConfig::Files(files)), _) => Some(files.clone()),
            (
                None | Some(CredentialsConfig::ApiKey(_)),
                Some(UpstreamTls {
                    cert: Some(cert),
                    key: Some(key),
                    ..
                }),
            ) => Some(FileCredentials {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        }
    }

    fn validate(&self) -> Result<(), String> {
        let address = self.address.replace(NAMESPACE_PLACEHOLDER, "ns");
        let (host, _) = split_host_port(&address)
            .ok_or_else(|| format!("address {:?} is not HOST:PORT", self.address))?;
        if !(1..=16).contains(&self.connections) {
            return Err("connections must be between 1 and 16".into());
        }
        if let Some(tls) = &self.tls {
            if tls.cert.is_some() != tls.key.is_some() {
                return Err("tls: cert and key must be given together".into());
            }
            if tls.ca.is_none() && !tls.system_roots {
                return Err("tls: set ca (a CA bundle) or system_roots = true".into());
            }
            if tls.cert.is_some()
                && matches!(
                    self.credentials,
                    Some(CredentialsConfig::Issued(_) | CredentialsConfig::Files(_))
                )
            {
                return Err(
                    "set either tls.cert/tls.key or a certificate [credentials], not both".into(),
                );
            }
        }
        match &self.credentials {
            Some(CredentialsConfig::Issued(issued)) => {
                if self.tls.is_none() {
                    return Err("issued client certificates need [tls]".into());
                }
                if issued.lifetime_seconds < 2 {
                    return Err("credentials.lifetime_seconds must be at least 2".into());
                }
                if !(0.1..=0.9).contains(&issued.renew_at) {
                    return Err("credentials.renew_at must be between 0.1 and 0.9".into());
                }
                if issued.common_name.is_empty() {
                    return Err("credentials.common_name must not be empty".into());
                }
            }
            Some(CredentialsConfig::Files(_)) if self.tls.is_none() => {
                return Err("client certificate files need [tls]".into());
            }
            Some(CredentialsConfig::ApiKey(key)) => {
                if key.file.is_some() == key.env.is_some() {
                    return Err("credentials: set exactly one of file and env".into());
                }
                if self.tls.is_none() && !is_loopback_host(host) {
                    return Err(
                        "an API key is sent over TLS only (plaintext is allowed to loopback only)"
                            .into(),
                    );
                }
            }
            Some(CredentialsConfig::Files(_)) | None => {}
        }
        Ok(())
    }
}

fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether a namespace name can be put into a host name: letters, digits, `-` and `.`, no
/// empty labels.
pub fn template_safe(namespace: &str) -> bool {
    !namespace.is_empty()
        && namespace.len() <= 200
        && namespace.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// `upstream_namespace`: a usable name, and on each upstream every namespace has one client-facing
/// name (two entries may not reach the same upstream namespace, translated or not).
fn validate_upstream_namespaces(namespaces: &[NamespaceConfig]) -> Result<(), ConfigError> {
    let mut taken: HashSet<(&str, &str)> = HashSet::new();
    for ns in namespaces {
        if let Some(upstream_name) = &ns.upstream_namespace {
            // It travels in the temporal-namespace header: visible ASCII, no spaces.
            if upstream_name.is_empty() || !upstream_name.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ConfigError::Invalid(format!(
                    "namespace {:?}: upstream_namespace {upstream_name:?} must be non-empty visible ASCII",
                    ns.name
                )));
            }
        }
        let effective = ns.upstream_namespace.as_deref().unwrap_or(&ns.name);
        if !taken.insert((ns.upstream.as_str(), effective)) {
            return Err(ConfigError::Invalid(format!(
                "namespace {:?}: upstream {:?} namespace {effective:?} is already served under another name",
                ns.name, ns.upstream
            )));
        }
    }
    Ok(())
}

/// Splits `host:port` (IPv6 hosts in brackets).
pub fn split_host_port(address: &str) -> Option<(&str, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    (!host.is_empty()).then_some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [listener]
        address = "127.0.0.1:7443"
        [listener.tls]
        cert = "server.pem"
        key = "server-key.pem"
        client_ca = "ca.pem"
        [upstreams.local]
        address = "127.0.0.1:7233"
        [routing]
        system_upstream = "local"
        [[namespaces]]
        name = "default"
        upstream = "local"
        [authorization]
        system.admins = ["spiffe://corp/ops"]
        [encryption]
        default_key = "main"
        keys.main = { provider = "local", keyring = "keyring.toml" }
    "#;

    #[test]
    fn minimal_config_loads_with_defaults() {
        let c = Config::from_toml(MINIMAL).unwrap();
        assert_eq!(c.limits.max_request_bytes, 4 * 1024 * 1024);
        assert!(c.listener.tls.as_ref().unwrap().require_client_cert);
        assert_eq!(c.namespaces[0].upstream, "local");
    }

    #[test]
    fn serving_threads_are_bounded() {
        let with = |n: &str| {
            MINIMAL.replace(
                "address = \"127.0.0.1:7443\"",
                &format!("address = \"127.0.0.1:7443\"\n        workers = {n}"),
            )
        };
        assert_eq!(
            Config::from_toml(&with("3")).unwrap().listener.workers,
            Some(3)
        );
        assert_eq!(Config::from_toml(MINIMAL).unwrap().listener.workers, None);
        for bad in ["0", "1000"] {
            let err = Config::from_toml(&with(bad)).unwrap_err().to_string();
            assert!(err.contains("listener.workers must be 1-256"), "{err}");
        }
    }

    #[test]
    fn connection_limits_have_safe_defaults_and_are_validated() {
        let c = Config::from_toml(MINIMAL).unwrap();
        let l = &c.limits;
        assert_eq!(l.max_connections, 4096);
        assert_eq!(l.max_concurrent_streams, 1000);
        assert_eq!(l.max_header_list_bytes, 64 * 1024);
        assert_eq!(l.max_connection_buffered_bytes, 64 * 1024 * 1024);
        assert_eq!(l.max_buffered_bytes, 512 * 1024 * 1024);
        assert_eq!(l.body_timeout_seconds, 30);
        assert_eq!(l.max_connection_age_seconds, 300);
        assert_eq!(l.max_connection_age_grace_seconds, 80);
        assert_eq!(l.audit_queue_bytes, 16 * 1024 * 1024);
        assert_eq!(l.audit_stall_seconds, 5);
        assert!(c.listener.tls.as_ref().unwrap().crls.is_empty());
        let with = |limits: &str| Config::from_toml(&format!("{MINIMAL}\n[limits]\n{limits}\n"));
        let unknown = with("max_connection_age = 0");
        assert!(unknown.unwrap_err().to_string().contains("unknown field"));
        assert_eq!(
            with("max_connection_age_seconds = 0")
                .unwrap()
                .limits
                .max_connection_age_seconds,
            0
        );
        for (limits, expected) in [
            (
                "max_connection_buffered_bytes = 1000000",
                "must hold at least one request",
            ),
            (
                "max_connection_buffered_bytes = 16777216\nmax_buffered_bytes = 8388608",
                "max_buffered_bytes must be at least",
            ),
            ("max_connections = 0", "max_connections"),
            ("max_concurrent_streams = 0", "max_concurrent_streams"),
            ("max_header_list_bytes = 100", "max_header_list_bytes"),
            ("body_timeout_seconds = 0", "body_timeout_seconds"),
            ("audit_queue_bytes = 1000", "audit_queue_bytes"),
            ("audit_stall_seconds = 0", "audit_stall_seconds"),
        ] {
            let err = with(limits).unwrap_err().to_string();
            assert!(err.contains(expected), "{limits}: {err}");
        }
        let crls = Config::from_toml(&MINIMAL.replace(
            "client_ca = \"ca.pem\"",
            "client_ca = \"ca.pem\"\n        crls = [\"a.crl.pem\", \"b.crl\"]",
        ))
        .unwrap();
        assert_eq!(crls.listener.tls.unwrap().crls.len(), 2);
    }

    #[test]
    fn plaintext_only_on_loopback_or_unix() {
        let plain = |addr: &str| {
            MINIMAL
                .replace("127.0.0.1:7443", addr)
                .replace("[listener.tls]\n        cert = \"server.pem\"\n        key = \"server-key.pem\"\n        client_ca = \"ca.pem\"", "plaintext = true")
        };
        assert!(Config::from_toml(&plain("127.0.0.1:7443")).is_ok());
        assert!(Config::from_toml(&plain("unix:/tmp/p.sock")).is_ok());
        let err = Config::from_toml(&plain("0.0.0.0:7443"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("loopback"), "{err}");
        let err = Config::from_toml(
            &MINIMAL.replace("[listener.tls]", "plaintext = true\n[listener.tls]"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("not both"));
    }

    #[test]
    fn unknown_references_and_fields_are_refused() {
        let err =
            Config::from_toml(&MINIMAL.replace("upstream = \"local\"", "upstream = \"nope\""))
                .unwrap_err();
        assert!(
            err.to_string().contains("unknown upstream \"nope\""),
            "{err}"
        );
        let err =
            Config::from_toml(&format!("{MINIMAL}\n[limits]\nmax_request_byte = 1\n")).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn relative_paths_resolve_against_the_config_file() {
        let dir = std::env::temp_dir().join(format!("portcullis-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, MINIMAL).unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.listener.tls.unwrap().cert, dir.join("server.pem"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn authorization_section_is_required() {
        let without = MINIMAL.replace(
            "[authorization]\n        system.admins = [\"spiffe://corp/ops\"]",
            "",
        );
        let err = Config::from_toml(&without).unwrap_err().to_string();
        assert!(err.contains("authorization"), "{err}");
    }

    fn with_upstream(block: &str) -> Result<Config, ConfigError> {
        Config::from_toml(&MINIMAL.replace(
            "[upstreams.local]\n        address = \"127.0.0.1:7233\"",
            block,
        ))
    }

    #[test]
    fn upstream_credentials_parse_and_validate() {
        let text = MINIMAL
            .replace("address = \"127.0.0.1:7233\"", "address = \"{namespace}.a1b2c.tmprl.cloud:7233\"\n        tls = { system_roots = true }\n        credentials = { type = \"issued\", ca_cert = \"ca.pem\", ca_key = \"ca-key.pem\" }")
            .replace("system_upstream = \"local\"", "system_upstream = \"local\"\n        system_namespace = \"default\"");
        let c = Config::from_toml(&text).unwrap();
        let upstream = &c.upstreams["local"];
        assert!(upstream.is_template());
        match &upstream.credentials {
            Some(CredentialsConfig::Issued(i)) => {
                assert_eq!(i.lifetime_seconds, 3600);
                assert_eq!(i.renew_at, 0.7);
            }
            other => panic!("{other:?}"),
        }
        // Serializing (the dev setup and tests do) keeps everything.
        let again = Config::from_toml(&c.to_toml()).unwrap();
        assert_eq!(again.upstreams, c.upstreams);
        assert_eq!(again.routing, c.routing);
        // A templated system upstream needs system_namespace.
        let without = text.replace("\n        system_namespace = \"default\"", "");
        let err = Config::from_toml(&without).unwrap_err().to_string();
        assert!(err.contains("system_namespace"), "{err}");

        let files = with_upstream(
            r#"[upstreams.local]
            address = "temporal:7233"
            tls = { ca = "ca.pem" }
            credentials = { type = "files", cert = "c.pem", key = "k.pem" }"#,
        )
        .unwrap();
        assert!(files.upstreams["local"].certificate_files().is_some());

        let unknown = with_upstream(
            r#"[upstreams.local]
            address = "temporal:7233"
            tls = { ca = "ca.pem" }
            credentials = { type = "files", cert = "c.pem", key = "k.pem", colour = "red" }"#,
        );
        assert!(unknown.is_err());
        let no_tls = with_upstream(
            r#"[upstreams.local]
            address = "temporal:7233"
            credentials = { type = "files", cert = "c.pem", key = "k.pem" }"#,
        )
        .unwrap_err()
        .to_string();
        assert!(no_tls.contains("need [tls]"), "{no_tls}");
        let no_roots = with_upstream(
            r#"[upstreams.local]
            address = "temporal:7233"
            tls = { server_name = "x" }"#,
        )
        .unwrap_err()
        .to_string();
        assert!(no_roots.contains("system_roots"), "{no_roots}");
        // An API key never crosses a network in plaintext.
        let plain_key = with_upstream(
            r#"[upstreams.local]
            address = "temporal.example.com:7233"
            credentials = { type = "api-key", env = "TEMPORAL_API_KEY" }"#,
        )
        .unwrap_err()
        .to_string();
        assert!(plain_key.contains("TLS"), "{plain_key}");
        with_upstream(
            r#"[upstreams.local]
            address = "127.0.0.1:7233"
            credentials = { type = "api-key", env = "TEMPORAL_API_KEY" }"#,
        )
        .unwrap();
        let both = with_upstream(
            r#"[upstreams.local]
            address = "127.0.0.1:7233"
            credentials = { type = "api-key", env = "K", file = "k" }"#,
        );
        assert!(both.is_err());
    }

    #[test]
    fn template_safe_namespaces() {
        assert!(template_safe("payments.a1b2c"));
        assert!(template_safe("orders-2"));
        assert!(!template_safe(""));
        assert!(!template_safe("a..b"));
        assert!(!template_safe("a/b"));
        assert!(!template_safe("a:1"));
    }

    #[test]
    fn upstream_namespaces_are_validated() {
        let with = |entries: &str| {
            Config::from_toml(&MINIMAL.replace(
                "[[namespaces]]\n        name = \"default\"\n        upstream = \"local\"",
                entries,
            ))
        };
        let ok = with(
            r#"[[namespaces]]
            name = "payments"
            upstream = "local"
            upstream_namespace = "payments.a1b2c"
            [[namespaces]]
            name = "orders"
            upstream = "local""#,
        )
        .unwrap();
        assert_eq!(
            ok.namespaces[0].upstream_namespace.as_deref(),
            Some("payments.a1b2c")
        );
        assert_eq!(ok.namespaces[1].upstream_namespace, None);
        // Round trip through TOML keeps it.
        let again = Config::from_toml(&ok.to_toml()).unwrap();
        assert_eq!(
            again.namespaces[0].upstream_namespace.as_deref(),
            Some("payments.a1b2c")
        );
        // Swapping two names on one upstream is fine: each upstream namespace has one name.
        assert!(with(
            r#"[[namespaces]]
            name = "a"
            upstream = "local"
            upstream_namespace = "b"
            [[namespaces]]
            name = "b"
            upstream = "local"
            upstream_namespace = "a""#
        )
        .is_ok());
        for (entries, expected) in [
            // Two client names for one upstream namespace.
            (
                r#"[[namespaces]]
                name = "payments"
                upstream = "local"
                upstream_namespace = "shared"
                [[namespaces]]
                name = "billing"
                upstream = "local"
                upstream_namespace = "shared""#,
                "already served",
            ),
            // A translated name colliding with an untranslated one.
            (
                r#"[[namespaces]]
                name = "payments"
                upstream = "local"
                upstream_namespace = "orders"
                [[namespaces]]
                name = "orders"
                upstream = "local""#,
                "already served",
            ),
            (
                r#"[[namespaces]]
                name = "payments"
                upstream = "local"
                upstream_namespace = """#,
                "non-empty",
            ),
            (
                r#"[[namespaces]]
                name = "payments"
                upstream = "local"
                upstream_namespace = "pay ments""#,
                "visible ASCII",
            ),
        ] {
            let err = with(entries).unwrap_err().to_string();
            assert!(err.contains(expected), "{entries}: {err}");
        }
    }

    #[test]
    fn host_port_split() {
        assert_eq!(split_host_port("a.b:7233"), Some(("a.b", 7233)));
        assert_eq!(split_host_port("[::1]:7233"), Some(("::1", 7233)));
        assert_eq!(split_host_port("nohost"), None);
        assert_eq!(split_host_port(":1"), None);
    }
}
