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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
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
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_bytes: default_max_request(),
            max_response_bytes: default_max_response(),
            shutdown_grace_seconds: default_grace(),
            handshake_timeout_seconds: default_handshake(),
            upstream_connect_timeout_seconds: default_connect(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `HOST:PORT` of the Temporal frontend (or of the TLS terminator in front of it).
    pub address: String,
    /// TLS to the upstream; without it the upstream is spoken to in plaintext HTTP/2.
    #[serde(default)]
    pub tls: Option<UpstreamTls>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// CA bundle (PEM) that the upstream's certificate must chain to.
    pub ca: PathBuf,
    /// Name to verify the upstream's certificate against (default: the host of `address`).
    #[serde(default)]
    pub server_name: Option<String>,
    /// Client certificate (PEM) presented to the upstream.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Key (PEM) of the client certificate.
    #[serde(default)]
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Routing {
    /// Upstream for cluster-scoped methods (GetSystemInfo, ListNamespaces, health, …).
    pub system_upstream: String,
    /// Upstream for namespaces not listed under `[[namespaces]]`. Without it they are refused.
    #[serde(default)]
    pub default_upstream: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
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
            split_host_port(&upstream.address).ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "upstreams.{name}.address {:?} is not HOST:PORT",
                    upstream.address
                ))
            })?;
            if let Some(tls) = &upstream.tls {
                if tls.cert.is_some() != tls.key.is_some() {
                    return invalid(format!(
                        "upstreams.{name}.tls: cert and key must be given together"
                    ));
                }
            }
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
        if let Some(default) = &self.routing.default_upstream {
            known(default, "routing.default_upstream")?;
        }
        let mut seen = HashSet::new();
        for ns in &self.namespaces {
            if ns.name.is_empty() {
                return invalid("a [[namespaces]] entry has an empty name".into());
            }
            if !seen.insert(ns.name.as_str()) {
                return invalid(format!("namespace {:?} is listed twice", ns.name));
            }
            known(&ns.upstream, &format!("namespace {:?}", ns.name))?;
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
            for ns in &self.namespaces {
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
        }
        if self.authorization.identity.is_empty() {
            return invalid("authorization.identity must name at least one source".into());
        }
        if self.limits.max_request_bytes == 0 || self.limits.max_response_bytes == 0 {
            return invalid("limits must be positive".into());
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
        for upstream in self.upstreams.values_mut() {
            if let Some(tls) = &mut upstream.tls {
                fix(&mut tls.ca);
                if let Some(p) = &mut tls.cert {
                    fix(p);
                }
                if let Some(p) = &mut tls.key {
                    fix(p);
                }
            }
        }
    }
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
        system.admins = ["ops"]
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
        let without = MINIMAL.replace("[authorization]\n        system.admins = [\"ops\"]", "");
        let err = Config::from_toml(&without).unwrap_err().to_string();
        assert!(err.contains("authorization"), "{err}");
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
