//! Upstream Temporal frontends: one [`UpstreamGroup`] per `[upstreams.NAME]` block (one
//! [`Upstream`] endpoint, or one per namespace for a `{namespace}` template), their credentials,
//! the namespace [`Router`], and [`Upstreams`], which swaps routers when the config changes.

pub mod client;
pub mod credentials;
pub mod resolve;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use http::uri::Authority;

pub use client::{BodyError, Upstream, UpstreamBody, UpstreamResponse};
pub use credentials::{ApiKey, CertCell, ClientCredential, CredentialError};

use crate::config::{
    split_host_port, template_safe, Config, CredentialsConfig, Limits, ListNamespacesMode,
    UpstreamConfig, NAMESPACE_PLACEHOLDER,
};
use crate::error::ProxyError;
use crate::tls::{self, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {name}: {source}")]
    Tls { name: String, source: TlsError },
    #[error("upstream {name}: invalid address {address:?}")]
    Address { name: String, address: String },
    #[error("upstream {name}: {source}")]
    Credentials {
        name: String,
        source: CredentialError,
    },
    #[error("{0}")]
    Routing(String),
}

/// The most endpoints one template creates (one per namespace seen); beyond it, calls to new
/// namespaces are refused rather than growing without bound.
const MAX_TEMPLATE_INSTANCES: usize = 4096;

/// The credentials of one upstream block, shared by all its endpoints. Dropping them stops
/// their renewal and file watching.
#[derive(Default)]
struct Credentials {
    cert: Option<Arc<CertCell>>,
    api_key: Option<Arc<ApiKey>>,
    _tasks: Vec<credentials::AbortOnDrop>,
    _watchers: Vec<crate::reload::Reloader>,
}

impl Credentials {
    fn start(name: &str, config: &UpstreamConfig) -> Result<Credentials, UpstreamError> {
        let error = |source: CredentialError| UpstreamError::Credentials {
            name: name.to_string(),
            source,
        };
        let mut out = Credentials::default();
        if let Some(files) = config.certificate_files() {
            let (cell, tasks, watcher) =
                credentials::CertFiles::start(name, &files).map_err(error)?;
            out.cert = Some(cell);
            out._tasks = tasks;
            out._watchers.push(watcher);
        }
        match &config.credentials {
            Some(CredentialsConfig::Issued(issued)) => {
                let (cell, tasks) = credentials::CertIssuer::start(name, issued).map_err(error)?;
                out.cert = Some(cell);
                out._tasks = tasks;
            }
            Some(CredentialsConfig::ApiKey(key)) => {
                let (key, watcher) = ApiKey::start(name, key).map_err(error)?;
                out.api_key = Some(key);
                out._watchers.extend(watcher);
            }
            Some(CredentialsConfig::Files(_)) | None => {}
        }
        Ok(out)
    }
}

/// One `[upstreams.NAME]` block: its credentials and its endpoint(s). Kept across config
/// reloads while its settings stay the same, so its connections and certificates survive.
pub struct UpstreamGroup {
    name: String,
    config: UpstreamConfig,
    limits: Limits,
    /// The proxy's serving threads (one connection pool each).
    serving_threads: usize,
    tls: Option<Arc<rustls::ClientConfig>>,
    credentials: Credentials,
    /// The endpoint, for a plain block; endpoints by namespace, for a template.
    fixed: Option<Arc<Upstream>>,
    instances: Mutex<HashMap<String, Arc<Upstream>>>,
}

impl std::fmt::Debug for UpstreamGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamGroup")
            .field("name", &self.name)
            .field("address", &self.config.address)
            .finish()
    }
}

impl UpstreamGroup {
    pub fn new(
        name: &str,
        config: &UpstreamConfig,
        limits: &Limits,
        serving_threads: usize,
    ) -> Result<UpstreamGroup, UpstreamError> {
        let credentials = Credentials::start(name, config)?;
        let tls = match &config.tls {
            None => None,
            Some(t) => Some(Arc::new(
                tls::upstream_client_config(
                    t.ca.as_deref(),
                    t.system_roots,
                    credentials.cert.is_some(),
                )
                .map_err(|source| UpstreamError::Tls {
                    name: name.to_string(),
                    source,
                })?,
            )),
        };
        let mut group = UpstreamGroup {
            name: name.to_string(),
            config: config.clone(),
            limits: limits.clone(),
            serving_threads,
            tls,
            credentials,
            fixed: None,
            instances: Mutex::default(),
        };
        if !config.is_template() {
            group.fixed = Some(Arc::new(group.endpoint(None)?));
        }
        Ok(group)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn is_template(&self) -> bool {
        self.fixed.is_none()
    }

    /// The endpoint serving `namespace` (for a template, created on first use).
    pub fn for_namespace(&self, namespace: &str) -> Result<Arc<Upstream>, ProxyError> {
        if let Some(fixed) = &self.fixed {
            return Ok(fixed.clone());
        }
        let mut instances = match self.instances.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(upstream) = instances.get(namespace) {
            return Ok(upstream.clone());
        }
        let refuse = |reason: String| ProxyError::UpstreamUnavailable {
            upstream: self.name.clone(),
            address: self.config.address.clone(),
            reason,
        };
        if !template_safe(namespace) {
            return Err(refuse(format!(
                "namespace {namespace:?} cannot fill the address template"
            )));
        }
        if instances.len() >= MAX_TEMPLATE_INSTANCES {
            return Err(refuse(format!(
                "the template already serves {MAX_TEMPLATE_INSTANCES} namespaces"
            )));
        }
        let upstream = Arc::new(
            self.endpoint(Some(namespace))
                .map_err(|e| refuse(e.to_string()))?,
        );
        instances.insert(namespace.to_string(), upstream.clone());
        Ok(upstream)
    }

    /// Builds the endpoint for the block (filling in `namespace` for a template).
    fn endpoint(&self, namespace: Option<&str>) -> Result<Upstream, UpstreamError> {
        let fill = |text: &str| match namespace {
            Some(ns) => text.replace(NAMESPACE_PLACEHOLDER, ns),
            None => text.to_string(),
        };
        let address = fill(&self.config.address);
        let display_name = match namespace {
            Some(ns) => format!("{}[{ns}]", self.name),
            None => self.name.clone(),
        };
        let bad_address = || UpstreamError::Address {
            name: display_name.clone(),
            address: address.clone(),
        };
        let (host, port) = split_host_port(&address).ok_or_else(bad_address)?;
        let authority: Authority = address.parse().map_err(|_| bad_address())?;
        let tls = match (&self.config.tls, &self.tls) {
            (Some(tls_config), Some(config)) => {
                let server_name = tls_config
                    .server_name
                    .as_deref()
                    .map(fill)
                    .unwrap_or_else(|| host.to_string());
                let server_name = rustls::pki_types::ServerName::try_from(server_name.clone())
                    .map_err(|_| UpstreamError::Tls {
                        name: display_name.clone(),
                        source: TlsError::ServerName(server_name),
                    })?;
                Some(client::TlsSettings {
                    config: config.clone(),
                    server_name,
                    client_cert: self.credentials.cert.clone(),
                })
            }
            _ => None,
        };
        Ok(Upstream::new(
            display_name,
            address.clone(),
            authority,
            client::ConnectSettings {
                host: host.to_string(),
                port,
                tls,
                connect_timeout: Duration::from_secs(self.limits.upstream_connect_timeout_seconds),
                connections: self.config.connections,
                serving_threads: self.serving_threads,
                max_age: (self.config.max_connection_age_seconds > 0)
                    .then(|| Duration::from_secs(self.config.max_connection_age_seconds)),
            },
            self.credentials.api_key.clone(),
        ))
    }

    /// An endpoint that stands for the block in probes: the block's own, or for a template the
    /// one of `sample_namespace` (None: no namespace to fill in yet).
    fn representative(&self, sample_namespace: Option<&str>) -> Option<Arc<Upstream>> {
        match &self.fixed {
            Some(fixed) => Some(fixed.clone()),
            None => sample_namespace.and_then(|ns| self.for_namespace(ns).ok()),
        }
    }

    /// Open connections over all its endpoints.
    pub fn open_connections(&self) -> usize {
        match &self.fixed {
            Some(fixed) => fixed.open_connections(),
            None => match self.instances.lock() {
                Ok(guard) => guard.values().map(|u| u.open_connections()).sum(),
                Err(poisoned) => poisoned
                    .into_inner()
                    .values()
                    .map(|u| u.open_connections())
                    .sum(),
            },
        }
    }

    /// Its endpoints (one, or a template's instances so far).
    fn endpoints(&self) -> Vec<Arc<Upstream>> {
        match &self.fixed {
            Some(fixed) => vec![fixed.clone()],
            None => match self.instances.lock() {
                Ok(guard) => guard.values().cloned().collect(),
                Err(poisoned) => poisoned.into_inner().values().cloned().collect(),
            },
        }
    }

    /// The block's current client certificate (expired or not).
    pub fn client_certificate(&self) -> Option<Arc<ClientCredential>> {
        self.credentials.cert.as_ref().and_then(|c| c.peek())
    }

    /// Seconds until the block's client certificate expires (negative once it has); None when
    /// it presents no certificate.
    pub fn seconds_until_expiry(&self) -> Option<f64> {
        self.credentials
            .cert
            .as_ref()
            .and_then(|c| c.seconds_until_expiry())
    }

    /// Whether a new config block can keep this group (and its connections and certificates).
    fn reusable_for(&self, config: &UpstreamConfig, limits: &Limits) -> bool {
        &self.config == config
            && self.limits.upstream_connect_timeout_seconds
                == limits.upstream_connect_timeout_seconds
    }
}

/// A namespace's own API key (`[[namespaces]] api_key`), watched while the router uses it.
struct NamespaceApiKey {
    config: crate::config::ApiKeyCredentials,
    key: Arc<ApiKey>,
    _watcher: Option<crate::reload::Reloader>,
}

impl std::fmt::Debug for NamespaceApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NamespaceApiKey")
    }
}

/// Where a call goes: the endpoint, and the API key it carries there (the namespace's own,
/// else the upstream's; `None`: the caller's `authorization` header passes, see
/// [`Upstream::send`]).
#[derive(Debug, Clone)]
pub struct Route {
    pub upstream: Arc<Upstream>,
    pub api_key: Option<Arc<ApiKey>>,
}

/// Maps namespaces (and cluster-scoped calls) to upstreams. Immutable: a config change builds a
/// new one.
#[derive(Debug)]
pub struct Router {
    groups: BTreeMap<String, Arc<UpstreamGroup>>,
    /// Client-facing name → (group, the name its upstream knows it by, which fills templates).
    namespaces: HashMap<String, (Arc<UpstreamGroup>, String)>,
    /// Namespaces with an API key of their own.
    keys: HashMap<String, Arc<NamespaceApiKey>>,
    system: (Arc<UpstreamGroup>, Option<String>),
    /// The key cluster-scoped calls carry: the system upstream's own, else the key of the first
    /// (by name) namespace it serves that has one.
    system_key: Option<Arc<ApiKey>>,
    default: Option<Arc<UpstreamGroup>>,
    /// The configured namespaces, sorted, and whether the proxy answers `ListNamespaces` from
    /// them (see [`Router::lists_namespaces_itself`]).
    configured: Vec<String>,
    lists_itself: bool,
}

impl Router {
    /// Builds a router for `config`, taking unchanged groups from `previous`.
    fn build(config: &Config, previous: Option<&Router>) -> Result<Router, UpstreamError> {
        let mut groups = BTreeMap::new();
        for (name, upstream) in &config.upstreams {
            let kept = previous
                .and_then(|p| p.groups.get(name))
                .filter(|g| g.reusable_for(upstream, &config.limits))
                .cloned();
            let group = match kept {
                Some(group) => group,
                None => Arc::new(UpstreamGroup::new(
                    name,
                    upstream,
                    &config.limits,
                    config.listener.serving_threads(),
                )?),
            };
            groups.insert(name.clone(), group);
        }
        // Config validation guarantees every reference resolves.
        let lookup = |name: &str| {
            groups
                .get(name)
                .cloned()
                .ok_or_else(|| UpstreamError::Routing(format!("undefined upstream {name:?}")))
        };
        let mut namespaces = HashMap::new();
        let mut keys = HashMap::new();
        for ns in &config.namespaces {
            let upstream_name = ns.upstream_namespace.clone().unwrap_or(ns.name.clone());
            namespaces.insert(ns.name.clone(), (lookup(&ns.upstream)?, upstream_name));
            let Some(key_config) = &ns.api_key else {
                continue;
            };
            let kept = previous
                .and_then(|p| p.keys.get(&ns.name))
                .filter(|k| k.config == *key_config)
                .cloned();
            let key = match kept {
                Some(key) => key,
                None => {
                    let label = format!("{}[{}]", ns.upstream, ns.name);
                    let (key, watcher) = ApiKey::start(&label, key_config).map_err(|source| {
                        UpstreamError::Credentials {
                            name: label.clone(),
                            source,
                        }
                    })?;
                    Arc::new(NamespaceApiKey {
                        config: key_config.clone(),
                        key,
                        _watcher: watcher,
                    })
                }
            };
            keys.insert(ns.name.clone(), key);
        }
        let system = lookup(&config.routing.system_upstream)?;
        let mut configured: Vec<String> =
            config.namespaces.iter().map(|n| n.name.clone()).collect();
        configured.sort();
        let system_key = system.credentials.api_key.clone().or_else(|| {
            configured
                .iter()
                .filter(|ns| {
                    namespaces
                        .get(*ns)
                        .is_some_and(|(g, _)| g.name() == system.name())
                })
                .find_map(|ns| keys.get(ns).map(|k| k.key.clone()))
        });
        let default = config
            .routing
            .default_upstream
            .as_deref()
            .map(lookup)
            .transpose()?;
        let lists_itself = match config.routing.list_namespaces {
            ListNamespacesMode::Upstream => false,
            ListNamespacesMode::Configured => true,
            // One cluster behind one endpoint answers for every namespace; namespaces on other
            // upstreams, or endpoints per namespace (a namespace endpoint refuses to list), need
            // the proxy's own answer.
            ListNamespacesMode::Auto => {
                system.is_template()
                    || namespaces.values().any(|(g, _)| g.name() != system.name())
                    || default.as_ref().is_some_and(|d| d.name() != system.name())
            }
        };
        Ok(Router {
            system: (system, config.routing.system_namespace.clone()),
            system_key,
            default,
            namespaces,
            keys,
            groups,
            configured,
            lists_itself,
        })
    }

    /// Where a namespace's calls go, with the API key they carry.
    pub fn route(&self, namespace: &str) -> Result<Route, ProxyError> {
        let upstream = self.for_namespace(namespace)?;
        let api_key = match self.keys.get(namespace) {
            Some(own) => Some(own.key.clone()),
            None => upstream.api_key().cloned(),
        };
        Ok(Route { upstream, api_key })
    }

    /// Where cluster-scoped calls go, with the API key they carry.
    pub fn system_route(&self) -> Result<Route, ProxyError> {
        Ok(Route {
            upstream: self.system()?,
            api_key: self.system_key.clone(),
        })
    }

    /// Whether the proxy answers `ListNamespaces` itself from the configured namespaces
    /// (`routing.list_namespaces`).
    pub fn lists_namespaces_itself(&self) -> bool {
        self.lists_itself
    }

    /// The configured (client-facing) namespaces, sorted.
    pub fn configured_namespaces(&self) -> &[String] {
        &self.configured
    }

    pub fn from_config(config: &Config) -> Result<Router, UpstreamError> {
        Router::build(config, None)
    }

    /// The endpoint for a client-facing namespace. A template is filled with the name the
    /// upstream knows the namespace by (`upstream_namespace`, when it is translated).
    pub fn for_namespace(&self, namespace: &str) -> Result<Arc<Upstream>, ProxyError> {
        match self.namespaces.get(namespace) {
            Some((group, upstream_name)) => group.for_namespace(upstream_name),
            None => self
                .default
                .as_ref()
                .ok_or_else(|| ProxyError::UnknownNamespace(namespace.to_string()))?
                .for_namespace(namespace),
        }
    }

    /// A namespace to fill the block's template with for probes: the system namespace, or
    /// the first namespace routed to it.
    fn sample_namespace(&self, group: &str) -> Option<&str> {
        if self.system.0.name() == group {
            if let Some(ns) = &self.system.1 {
                return Some(ns);
            }
        }
        let mut routed: Vec<&String> = self
            .namespaces
            .values()
            .filter(|(g, _)| g.name() == group)
            .map(|(_, name)| name)
            .collect();
        routed.sort();
        routed.first().map(|s| s.as_str())
    }

    pub fn system(&self) -> Result<Arc<Upstream>, ProxyError> {
        let (group, namespace) = &self.system;
        group.for_namespace(namespace.as_deref().unwrap_or(""))
    }

    pub fn groups(&self) -> impl Iterator<Item = &Arc<UpstreamGroup>> {
        self.groups.values()
    }
}

/// An upstream's connection pools, for metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolStats {
    /// Addresses its host resolved to at the last connection attempt (each endpoint's).
    pub resolved: Vec<String>,
    /// Connections taking new calls: address and age in seconds.
    pub connections: Vec<(String, f64)>,
}

/// Seconds until an upstream's client certificate expires.
#[derive(Debug, Clone, PartialEq)]
pub struct CertificateExpiry {
    /// The `[upstreams.NAME]` block.
    pub upstream: String,
    /// Negative once expired.
    pub seconds: f64,
}

/// The upstreams in force. A config change (file change or SIGHUP) builds a new [`Router`],
/// keeping the groups whose settings did not change; a config that does not load, or whose
/// upstreams cannot be built, is rejected and the previous routing stays.
pub struct Upstreams {
    router: RwLock<Arc<Router>>,
    config_path: Option<PathBuf>,
}

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstreams")
            .field("router", &self.router())
            .finish()
    }
}

impl Upstreams {
    pub fn from_config(config: &Config) -> Result<Arc<Upstreams>, UpstreamError> {
        Ok(Arc::new(Upstreams {
            router: RwLock::new(Arc::new(Router::from_config(config)?)),
            config_path: config.source.clone(),
        }))
    }

    /// The router in force (cheap: an `Arc` clone).
    pub fn router(&self) -> Arc<Router> {
        match self.router.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Installs the upstreams, routing and namespaces of `config`. Returns a summary of what
    /// changed (empty when nothing did).
    pub fn apply(&self, config: &Config) -> Result<String, UpstreamError> {
        let previous = self.router();
        let router = Router::build(config, Some(&previous))?;
        let summary = describe_changes(&previous, &router);
        match self.router.write() {
            Ok(mut guard) => *guard = Arc::new(router),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(router),
        }
        Ok(summary)
    }

    pub fn config_path(&self) -> Option<&std::path::Path> {
        self.config_path.as_deref()
    }

    /// Seconds until each upstream's client certificate expires, for upstreams that present
    /// one (by `[upstreams.NAME]`).
    pub fn certificate_expiry(&self) -> Vec<CertificateExpiry> {
        self.router()
            .groups()
            .filter_map(|g| {
                g.seconds_until_expiry().map(|seconds| CertificateExpiry {
                    upstream: g.name().to_string(),
                    seconds,
                })
            })
            .collect()
    }

    /// Probes upstream `name` the way a call connects (see [`Upstream::probe`]). A template
    /// is probed at the endpoint of its system namespace or first routed namespace.
    pub async fn probe(&self, name: &str, timeout: Duration) -> Result<String, String> {
        let router = self.router();
        let group = router
            .groups
            .get(name)
            .ok_or_else(|| format!("no upstream {name:?}"))?;
        let endpoint = group
            .representative(router.sample_namespace(name))
            .ok_or_else(|| "a template with no namespace routed to it yet".to_string())?;
        drop(router);
        endpoint.probe(timeout).await
    }

    /// Upstream names and the address that stands for each (templates: filled in as in
    /// [`Upstreams::probe`], or left with the placeholder).
    pub fn addresses(&self) -> Vec<(String, String)> {
        let router = self.router();
        router
            .groups
            .values()
            .map(|g| {
                let address = g
                    .representative(router.sample_namespace(g.name()))
                    .map(|u| u.address.clone())
                    .unwrap_or_else(|| g.config.address.clone());
                (g.name().to_string(), address)
            })
            .collect()
    }

    /// Open connections of upstream `name` (0 when there is no such upstream).
    pub fn open_connections(&self, name: &str) -> usize {
        self.router()
            .groups
            .get(name)
            .map_or(0, |g| g.open_connections())
    }

    /// What the connection pools of upstream `name` look like now (all endpoints of a
    /// template together), for metrics.
    pub fn pool_stats(&self, name: &str) -> PoolStats {
        let Some(group) = self.router().groups.get(name).cloned() else {
            return PoolStats::default();
        };
        let mut stats = PoolStats::default();
        for endpoint in group.endpoints() {
            for address in endpoint.resolved_addresses() {
                stats.resolved.push(address.to_string());
            }
            for (address, age) in endpoint.connection_ages() {
                stats
                    .connections
                    .push((address.to_string(), age.as_secs_f64()));
            }
        }
        stats.resolved.sort();
        stats.resolved.dedup();
        stats
    }

    /// The current client certificate of upstream `name`.
    pub fn client_certificate(&self, name: &str) -> Option<Arc<ClientCredential>> {
        self.router()
            .groups
            .get(name)
            .and_then(|g| g.client_certificate())
    }

    /// Seconds until the client certificate of upstream `name` expires.
    pub fn seconds_until_expiry(&self, name: &str) -> Option<f64> {
        self.router()
            .groups
            .get(name)
            .and_then(|g| g.seconds_until_expiry())
    }
}

fn describe_changes(old: &Router, new: &Router) -> String {
    let mut parts = Vec::new();
    let mut list = |what: &str, names: Vec<&String>| {
        if !names.is_empty() {
            let names: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
            parts.push(format!("{what}: {}", names.join(", ")));
        }
    };
    list(
        "upstreams added",
        new.groups
            .keys()
            .filter(|k| !old.groups.contains_key(*k))
            .collect(),
    );
    list(
        "upstreams changed",
        new.groups
            .iter()
            .filter(|(k, g)| old.groups.get(*k).is_some_and(|o| !Arc::ptr_eq(o, g)))
            .map(|(k, _)| k)
            .collect(),
    );
    list(
        "upstreams removed",
        old.groups
            .keys()
            .filter(|k| !new.groups.contains_key(*k))
            .collect(),
    );
    let mut added: Vec<&String> = new
        .namespaces
        .keys()
        .filter(|k| !old.namespaces.contains_key(*k))
        .collect();
    added.sort();
    list("namespaces added", added);
    let mut moved: Vec<&String> = new
        .namespaces
        .iter()
        .filter(|(k, (g, n))| {
            old.namespaces
                .get(*k)
                .is_some_and(|(o, on)| o.name() != g.name() || on != n)
        })
        .map(|(k, _)| k)
        .collect();
    moved.sort();
    list("namespaces moved", moved);
    let mut removed: Vec<&String> = old
        .namespaces
        .keys()
        .filter(|k| !new.namespaces.contains_key(*k))
        .collect();
    removed.sort();
    list("namespaces removed", removed);
    if old.system.0.name() != new.system.0.name() || old.system.1 != new.system.1 {
        parts.push(format!("system upstream: {}", new.system.0.name()));
    }
    if old.default.as_ref().map(|g| g.name()) != new.default.as_ref().map(|g| g.name()) {
        parts.push(format!(
            "default upstream: {}",
            new.default.as_ref().map_or("none", |g| g.name())
        ));
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::pki::CertAuthority;

    fn config(upstreams: &str, routing: &str) -> Config {
        Config::from_toml(&format!(
            r#"
            [listener]
            address = "127.0.0.1:0"
            plaintext = true
            {upstreams}
            {routing}
            [authorization]
            disabled = true
            [encryption]
            disabled = true
            "#
        ))
        .unwrap()
    }

    #[tokio::test]
    async fn templates_make_one_endpoint_per_namespace() {
        let c = config(
            r#"[upstreams.cloud]
            address = "{namespace}.a1b2c.tmprl.cloud:7233"
            [upstreams.local]
            address = "127.0.0.1:7233""#,
            r#"[routing]
            system_upstream = "local"
            default_upstream = "cloud"
            [[namespaces]]
            name = "orders"
            upstream = "local"
            [[namespaces]]
            name = "billing"
            upstream = "cloud"
            upstream_namespace = "billing-prod""#,
        );
        let router = Router::from_config(&c).unwrap();
        // A translated namespace's endpoint is its upstream name's.
        assert_eq!(
            router.for_namespace("billing").unwrap().address,
            "billing-prod.a1b2c.tmprl.cloud:7233"
        );
        let payments = router.for_namespace("payments").unwrap();
        assert_eq!(payments.address, "payments.a1b2c.tmprl.cloud:7233");
        assert_eq!(payments.name, "cloud[payments]");
        assert!(Arc::ptr_eq(
            &payments,
            &router.for_namespace("payments").unwrap()
        ));
        assert_eq!(
            router.for_namespace("refunds").unwrap().address,
            "refunds.a1b2c.tmprl.cloud:7233"
        );
        assert_eq!(
            router.for_namespace("orders").unwrap().address,
            "127.0.0.1:7233"
        );
        assert_eq!(router.system().unwrap().name, "local");
        let err = router.for_namespace("bad/name").unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    }

    /// ListNamespaces: the system upstream answers while it serves every namespace; namespaces
    /// elsewhere or endpoints per namespace make the proxy answer; the setting overrides.
    #[tokio::test]
    async fn who_lists_namespaces() {
        let two = r#"[upstreams.a]
            address = "127.0.0.1:1"
            [upstreams.b]
            address = "127.0.0.1:2"
            [upstreams.t]
            address = "{namespace}.example.invalid:7233""#;
        let lists = |routing: &str, namespaces: &[(&str, &str)]| {
            let mut text = routing.to_string();
            for (ns, up) in namespaces {
                text.push_str(&format!(
                    "\n[[namespaces]]\nname = \"{ns}\"\nupstream = \"{up}\"\n"
                ));
            }
            Router::from_config(&config(two, &text))
                .unwrap()
                .lists_namespaces_itself()
        };
        let sys_a = "[routing]\nsystem_upstream = \"a\"";
        assert!(!lists(sys_a, &[("x", "a"), ("y", "a")]));
        assert!(lists(sys_a, &[("x", "a"), ("y", "b")]));
        assert!(lists(sys_a, &[("x", "a"), ("y", "t")]));
        assert!(lists(
            "[routing]\nsystem_upstream = \"t\"\nsystem_namespace = \"x\"",
            &[("x", "t")]
        ));
        assert!(lists(
            "[routing]\nsystem_upstream = \"a\"\ndefault_upstream = \"b\"",
            &[]
        ));
        assert!(!lists(
            "[routing]\nsystem_upstream = \"a\"\nlist_namespaces = \"upstream\"",
            &[("y", "b")]
        ));
        assert!(lists(
            "[routing]\nsystem_upstream = \"a\"\nlist_namespaces = \"configured\"",
            &[("x", "a")]
        ));
        let router = Router::from_config(&config(
            two,
            &format!("{sys_a}\n[[namespaces]]\nname = \"z\"\nupstream = \"a\"\n[[namespaces]]\nname = \"m\"\nupstream = \"b\""),
        ))
        .unwrap();
        assert_eq!(router.configured_namespaces(), ["m", "z"]);
    }

    /// A namespace's own API key overrides its upstream's; cluster calls carry the upstream's,
    /// else the first (by name) namespace key on the system upstream.
    #[tokio::test]
    async fn namespace_api_keys_route_with_their_calls() {
        let dir = tempfile::tempdir().unwrap();
        let key = |name: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, format!("{name}\n")).unwrap();
            path.display().to_string()
        };
        let (ka, kb) = (key("key-a"), key("key-b"));
        let c = config(
            r#"[upstreams.regional]
            address = "127.0.0.1:7233""#,
            &format!(
                r#"[routing]
                system_upstream = "regional"
                [[namespaces]]
                name = "b"
                upstream = "regional"
                api_key = {{ file = "{kb}" }}
                [[namespaces]]
                name = "a"
                upstream = "regional"
                api_key = {{ file = "{ka}" }}
                [[namespaces]]
                name = "plain"
                upstream = "regional""#
            ),
        );
        let router = Router::from_config(&c).unwrap();
        let value = |route: Route| {
            route
                .api_key
                .map(|k| k.header_value().to_str().unwrap().to_string())
        };
        assert_eq!(
            value(router.route("a").unwrap()).as_deref(),
            Some("Bearer key-a")
        );
        assert_eq!(
            value(router.route("b").unwrap()).as_deref(),
            Some("Bearer key-b")
        );
        assert_eq!(value(router.route("plain").unwrap()), None);
        assert_eq!(
            value(router.system_route().unwrap()).as_deref(),
            Some("Bearer key-a")
        );
        assert!(Arc::ptr_eq(
            &router.route("a").unwrap().upstream,
            &router.route("b").unwrap().upstream
        ));
        // A key to a plaintext remote endpoint is refused.
        let err = Config::from_toml(
            r#"
            [listener]
            address = "127.0.0.1:0"
            plaintext = true
            [upstreams.u]
            address = "temporal.example.com:7233"
            [routing]
            system_upstream = "u"
            [[namespaces]]
            name = "n"
            upstream = "u"
            api_key = { env = "K" }
            [authorization]
            disabled = true
            [encryption]
            disabled = true
            "#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("sent over TLS only"), "{err}");
    }

    #[tokio::test]
    async fn a_config_change_keeps_unchanged_upstreams() {
        let first = config(
            r#"[upstreams.a]
            address = "127.0.0.1:1"
            [upstreams.b]
            address = "127.0.0.1:2""#,
            r#"[routing]
            system_upstream = "a"
            [[namespaces]]
            name = "x"
            upstream = "a""#,
        );
        let upstreams = Upstreams::from_config(&first).unwrap();
        let a = upstreams.router().for_namespace("x").unwrap();
        assert!(upstreams.router().for_namespace("y").is_err());
        let second = config(
            r#"[upstreams.a]
            address = "127.0.0.1:1"
            [upstreams.b]
            address = "127.0.0.1:3""#,
            r#"[routing]
            system_upstream = "a"
            [[namespaces]]
            name = "x"
            upstream = "a"
            [[namespaces]]
            name = "y"
            upstream = "b""#,
        );
        let summary = upstreams.apply(&second).unwrap();
        assert_eq!(summary, "upstreams changed: b; namespaces added: y");
        let router = upstreams.router();
        assert!(Arc::ptr_eq(&a, &router.for_namespace("x").unwrap()));
        assert_eq!(router.for_namespace("y").unwrap().address, "127.0.0.1:3");
        assert_eq!(upstreams.apply(&second).unwrap(), "");
    }

    fn issuing_ca(dir: &std::path::Path, lifetime: Duration) -> (PathBuf, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let ca = CertAuthority::generate("issuing", lifetime).unwrap();
        let cert = dir.join("ca.pem");
        let key = dir.join("ca-key.pem");
        std::fs::write(&cert, &ca.cert_pem).unwrap();
        std::fs::write(&key, &ca.key_pem).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        (cert, key)
    }

    fn issued(ca: &(PathBuf, PathBuf), lifetime: u64) -> crate::config::IssuedCredentials {
        crate::config::IssuedCredentials {
            ca_cert: ca.0.clone(),
            ca_key: ca.1.clone(),
            lifetime_seconds: lifetime,
            renew_at: 0.7,
            common_name: "proxy".into(),
            dns_names: vec![],
            uris: vec!["spiffe://test/proxy".into()],
        }
    }

    #[tokio::test]
    async fn issued_certificates_renew_with_fresh_keys() {
        let dir = tempfile::tempdir().unwrap();
        let ca = issuing_ca(dir.path(), Duration::from_secs(3600));
        let (cell, _tasks) = credentials::CertIssuer::start("up", &issued(&ca, 2)).unwrap();
        let first = cell.current().unwrap();
        let left = first.seconds_until_expiry(std::time::SystemTime::now());
        assert!(left > 1.0 && left <= 2.0, "{left}");
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(cell.generation() >= 2, "renewed at ~70 % of 2 s");
        let now = cell.current().unwrap();
        assert_ne!(now.serial, first.serial);
        assert_ne!(
            now.certified.key.public_key(),
            first.certified.key.public_key()
        );
    }

    #[tokio::test]
    async fn a_group_readable_ca_key_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ca = issuing_ca(dir.path(), Duration::from_secs(3600));
        std::fs::set_permissions(&ca.1, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = credentials::CertIssuer::start("up", &issued(&ca, 60))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }

    /// The issuing CA runs out: renewal keeps failing, the last certificate expires (it is
    /// never issued past the CA's own expiry) and is then refused with the renewal error.
    #[tokio::test]
    async fn failing_renewal_ends_in_a_clear_expiry() {
        let dir = tempfile::tempdir().unwrap();
        // rcgen backdates the CA a minute; it expires ~3 s from now.
        let ca = issuing_ca(dir.path(), Duration::from_secs(3));
        let (cell, _tasks) = credentials::CertIssuer::start("up", &issued(&ca, 600)).unwrap();
        let first = cell.current().unwrap();
        assert!(first.seconds_until_expiry(std::time::SystemTime::now()) <= 3.0);
        tokio::time::sleep(Duration::from_millis(4000)).await;
        let err = cell.current().unwrap_err().to_string();
        assert!(
            err.contains("expired") && err.contains("renewal keeps failing"),
            "{err}"
        );
    }
}
