//! Upstream Temporal frontends: one pooled HTTP/2 client each, and the namespace router.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::{split_host_port, Config, Limits, UpstreamConfig};
use crate::error::ProxyError;
use crate::tls::{self, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {name}: {source}")]
    Tls { name: String, source: TlsError },
    #[error("upstream {name}: invalid address {address:?}")]
    Address { name: String, address: String },
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// One upstream endpoint with its connection pool (HTTP/2 multiplexes calls over one connection).
pub struct Upstream {
    pub name: String,
    pub address: String,
    scheme: Scheme,
    authority: Authority,
    client: HttpClient,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("address", &self.address)
            .finish()
    }
}

impl Upstream {
    pub fn new(
        name: &str,
        config: &UpstreamConfig,
        limits: &Limits,
    ) -> Result<Upstream, UpstreamError> {
        let bad_address = || UpstreamError::Address {
            name: name.to_string(),
            address: config.address.clone(),
        };
        let (host, _) = split_host_port(&config.address).ok_or_else(bad_address)?;
        let authority: Authority = config.address.parse().map_err(|_| bad_address())?;

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(
            limits.upstream_connect_timeout_seconds,
        )));
        http.set_keepalive(Some(Duration::from_secs(60)));

        let (scheme, connector) = match &config.tls {
            Some(tls_config) => {
                let client_config = tls::upstream_client_config(tls_config).map_err(|source| {
                    UpstreamError::Tls {
                        name: name.to_string(),
                        source,
                    }
                })?;
                let server_name = tls_config
                    .server_name
                    .clone()
                    .unwrap_or_else(|| host.to_string());
                let server_name = rustls::pki_types::ServerName::try_from(server_name.clone())
                    .map_err(|_| UpstreamError::Tls {
                        name: name.to_string(),
                        source: TlsError::ServerName(server_name),
                    })?;
                let connector = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(client_config)
                    .https_only()
                    .with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(
                        server_name,
                    ))
                    .enable_http2()
                    .wrap_connector(http);
                (Scheme::HTTPS, connector)
            }
            None => {
                // Plaintext HTTP/2 with prior knowledge (h2c), as gRPC speaks it.
                let connector = HttpsConnector::from((http, Arc::new(plain_client_config())));
                (Scheme::HTTP, connector)
            }
        };

        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .http2_only(true)
            // Long polls hold a call for ~70 s: keep connections (and idle pools) alive well past it.
            .pool_idle_timeout(Duration::from_secs(300))
            .http2_keep_alive_interval(Some(Duration::from_secs(30)))
            .http2_keep_alive_timeout(Duration::from_secs(20))
            .http2_keep_alive_while_idle(true)
            .http2_adaptive_window(true)
            .http2_max_frame_size(Some(1 << 20))
            .build(connector);

        Ok(Upstream {
            name: name.to_string(),
            address: config.address.clone(),
            scheme,
            authority,
            client,
        })
    }

    pub fn uri_for(&self, path_and_query: &str) -> Result<Uri, http::Error> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
    }

    pub async fn send(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, ProxyError> {
        self.client
            .request(request)
            .await
            .map_err(|e| ProxyError::UpstreamUnavailable {
                upstream: self.name.clone(),
                address: self.address.clone(),
                reason: describe_client_error(&e),
            })
    }
}

/// The `https_or_http` connector needs a TLS config even when only http:// is used.
fn plain_client_config() -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        })
        // The ring provider supports the default versions; this branch is unreachable in practice.
        .unwrap_or_else(|_| {
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        })
}

/// A readable chain of causes ("connection refused", "tls handshake eof", …).
fn describe_client_error(error: &hyper_util::client::legacy::Error) -> String {
    let mut text = if error.is_connect() {
        "cannot connect".to_string()
    } else {
        "connection failed".to_string()
    };
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Maps namespaces (and cluster-scoped calls) to upstreams.
#[derive(Debug)]
pub struct Router {
    namespaces: HashMap<String, Arc<Upstream>>,
    system: Arc<Upstream>,
    default: Option<Arc<Upstream>>,
}

impl Router {
    pub fn from_config(config: &Config) -> Result<Router, UpstreamError> {
        let mut upstreams = HashMap::new();
        for (name, upstream) in &config.upstreams {
            upstreams.insert(
                name.clone(),
                Arc::new(Upstream::new(name, upstream, &config.limits)?),
            );
        }
        // Config validation guarantees every reference resolves.
        let lookup = |name: &str| {
            upstreams
                .get(name)
                .cloned()
                .ok_or_else(|| UpstreamError::Address {
                    name: name.to_string(),
                    address: "<undefined upstream>".into(),
                })
        };
        let mut namespaces = HashMap::new();
        for ns in &config.namespaces {
            namespaces.insert(ns.name.clone(), lookup(&ns.upstream)?);
        }
        Ok(Router {
            system: lookup(&config.routing.system_upstream)?,
            default: config
                .routing
                .default_upstream
                .as_deref()
                .map(lookup)
                .transpose()?,
            namespaces,
        })
    }

    pub fn for_namespace(&self, namespace: &str) -> Result<&Arc<Upstream>, ProxyError> {
        self.namespaces
            .get(namespace)
            .or(self.default.as_ref())
            .ok_or_else(|| ProxyError::UnknownNamespace(namespace.to_string()))
    }

    pub fn system(&self) -> &Arc<Upstream> {
        &self.system
    }
}
