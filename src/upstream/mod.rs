//! Upstream Temporal frontends: one [`Upstream`] (with its own HTTP/2 connections) each, and
//! the namespace router.

pub mod client;
pub mod credentials;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;

pub use client::{BodyError, Upstream, UpstreamBody, UpstreamResponse};
pub use credentials::{CertCell, ClientCredential, CredentialError};

use crate::config::{split_host_port, Config, Limits, UpstreamConfig};
use crate::error::ProxyError;
use crate::tls::{self, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {name}: {source}")]
    Tls { name: String, source: TlsError },
    #[error("upstream {name}: invalid address {address:?}")]
    Address { name: String, address: String },
    #[error("upstream {name}: {reason}")]
    Credentials { name: String, reason: String },
}

/// Builds the upstream for one `[upstreams.NAME]` block.
pub fn build_upstream(
    name: &str,
    config: &UpstreamConfig,
    limits: &Limits,
) -> Result<Upstream, UpstreamError> {
    let bad_address = || UpstreamError::Address {
        name: name.to_string(),
        address: config.address.clone(),
    };
    let (host, port) = split_host_port(&config.address).ok_or_else(bad_address)?;
    let authority: Authority = config.address.parse().map_err(|_| bad_address())?;
    let tls_error = |source: TlsError| UpstreamError::Tls {
        name: name.to_string(),
        source,
    };
    let tls = match &config.tls {
        None => None,
        Some(tls_config) => {
            let client_cert = match (&tls_config.cert, &tls_config.key) {
                (Some(cert), Some(key)) => {
                    let read = |path: &std::path::Path| {
                        std::fs::read(path).map_err(|e| UpstreamError::Credentials {
                            name: name.to_string(),
                            reason: format!("cannot read {}: {e}", path.display()),
                        })
                    };
                    let credential = ClientCredential::from_pem(&read(cert)?, &read(key)?, None)
                        .map_err(|e| UpstreamError::Credentials {
                            name: name.to_string(),
                            reason: format!("client certificate {}: {e}", cert.display()),
                        })?;
                    let cell = CertCell::default();
                    cell.install(credential);
                    Some(Arc::new(cell))
                }
                _ => None,
            };
            let server_name = tls_config
                .server_name
                .clone()
                .unwrap_or_else(|| host.to_string());
            let server_name = rustls::pki_types::ServerName::try_from(server_name.clone())
                .map_err(|_| tls_error(TlsError::ServerName(server_name)))?;
            let config = tls::upstream_client_config(&tls_config.ca, client_cert.is_some())
                .map_err(tls_error)?;
            Some(client::TlsSettings {
                config: Arc::new(config),
                server_name,
                client_cert,
            })
        }
    };
    Ok(Upstream::new(
        name.to_string(),
        config.address.clone(),
        authority,
        client::ConnectSettings {
            host: host.to_string(),
            port,
            tls,
            connect_timeout: Duration::from_secs(limits.upstream_connect_timeout_seconds),
            connections: 1,
        },
    ))
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
                Arc::new(build_upstream(name, upstream, &config.limits)?),
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
