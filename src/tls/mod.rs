//! rustls configurations: the client-facing server (mTLS) and the upstream clients.

pub mod pki;
pub mod reload;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::{ServerTls, UpstreamTls};
pub use reload::ReloadableServerConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {reason}")]
    Read {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{what} {path} holds no PEM certificate")]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("invalid TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("invalid client CA bundle {path}: {reason}")]
    ClientVerifier { path: PathBuf, reason: String },
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
}

/// The crypto provider used everywhere (ring: small build, fast AES-GCM).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn load_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Read {
            what,
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

pub fn load_key(path: &Path, what: &'static str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Read {
        what,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn root_store(path: &Path, what: &'static str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path, what)? {
        roots.add(cert).map_err(TlsError::Rustls)?;
    }
    Ok(roots)
}

/// Client-facing TLS: TLS 1.2+, HTTP/2 via ALPN, client certificates verified against the CA
/// bundle (required unless configured otherwise).
pub fn server_config(tls: &ServerTls) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_with(tls, tls.require_client_cert, &[b"h2"])
}

/// Like [`server_config`], choosing whether the handshake demands a client certificate (with
/// bearer tokens on, callers may come without one and authenticate per call instead) and the
/// ALPN protocols offered.
pub fn server_config_with(
    tls: &ServerTls,
    require_client_cert: bool,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let roots = Arc::new(root_store(&tls.client_ca, "client CA bundle")?);
    let builder = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
    let builder = if require_client_cert {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    let verifier = builder.build().map_err(|e| TlsError::ClientVerifier {
        path: tls.client_ca.clone(),
        reason: e.to_string(),
    })?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            load_certs(&tls.cert, "server certificate")?,
            load_key(&tls.key, "server key")?,
        )?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// TLS towards one upstream: its CA, an optional client certificate. The HTTP/2 connector adds
/// ALPN h2 itself.
pub fn upstream_client_config(tls: &UpstreamTls) -> Result<ClientConfig, TlsError> {
    let roots = root_store(&tls.ca, "upstream CA bundle")?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    // No ALPN here: hyper-rustls sets it (h2) and panics on a config that already has it.
    Ok(match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => builder.with_client_auth_cert(
            load_certs(cert, "upstream client certificate")?,
            load_key(key, "upstream client key")?,
        )?,
        _ => builder.with_no_client_auth(),
    })
}

/// What is known about a caller: its connection, and for one call the bearer token it sent.
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    pub remote: String,
    /// Names from the verified client certificate (empty without one).
    pub names: CertificateNames,
    /// The connection presented a client certificate that verified.
    pub has_certificate: bool,
    /// Set per call by the authentication stage when the call carried a valid bearer token.
    pub token: Option<Arc<crate::authz::BearerIdentity>>,
}

/// The names a verified client certificate carries, by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertificateNames {
    /// URI SANs that are SPIFFE IDs.
    pub spiffe: Vec<String>,
    pub dns: Vec<String>,
    pub email: Vec<String>,
    pub common_name: Option<String>,
}

impl CertificateNames {
    pub fn from_der(der: &[u8]) -> CertificateNames {
        use x509_parser::extensions::GeneralName;
        let mut names = CertificateNames::default();
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
            return names;
        };
        names.common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string);
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(uri) if uri.starts_with("spiffe://") => {
                        names.spiffe.push(uri.to_string())
                    }
                    GeneralName::DNSName(dns) => names.dns.push(dns.to_string()),
                    GeneralName::RFC822Name(email) => names.email.push(email.to_string()),
                    _ => {}
                }
            }
        }
        names
    }
}

impl PeerInfo {
    pub fn from_certificates(remote: String, certs: Option<&[CertificateDer<'_>]>) -> PeerInfo {
        let leaf = certs.and_then(|c| c.first());
        let names = leaf
            .map(|leaf| CertificateNames::from_der(leaf.as_ref()))
            .unwrap_or_default();
        PeerInfo {
            remote,
            names,
            has_certificate: leaf.is_some(),
            token: None,
        }
    }
}
