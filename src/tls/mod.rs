//! rustls configurations: the client-facing server (mTLS) and the upstream clients.

pub mod pki;
pub mod reload;
pub mod revocation;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::ServerTls;
pub use reload::ReloadableServerConfig;
pub use revocation::{ClientCertificate, RevocationSet};

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
    #[error("invalid CRL {path}: {reason}")]
    Crl { path: PathBuf, reason: String },
    #[error("invalid client CA bundle {path}: {reason}")]
    ClientVerifier { path: PathBuf, reason: String },
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
    #[error("no usable system root certificates: {0}")]
    SystemRoots(String),
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
    server_config_and_revocations(tls, require_client_cert, alpn).map(|(config, _)| config)
}

/// The server configuration and the certificates its CRLs revoke. With CRLs configured, only
/// the client's own certificate is checked (its issuer must have a list: a certificate whose
/// revocation status is unknown is refused). Session resumption is off: a resumed session
/// would carry the identity of a certificate that has since expired or been revoked, so every
/// connection verifies its certificate against the CA bundle and CRLs in force.
pub fn server_config_and_revocations(
    tls: &ServerTls,
    require_client_cert: bool,
    alpn: &[&[u8]],
) -> Result<(Arc<ServerConfig>, revocation::RevocationSet), TlsError> {
    let provider = provider();
    let cas = load_certs(&tls.client_ca, "client CA bundle")?;
    let mut roots = RootCertStore::empty();
    for cert in &cas {
        roots.add(cert.clone()).map_err(TlsError::Rustls)?;
    }
    let lists = revocation::load_crls(&tls.crls, &cas)?;
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    let builder = if lists.crls.is_empty() {
        builder
    } else {
        builder
            .with_crls(lists.crls)
            .only_check_end_entity_revocation()
    };
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
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok((Arc::new(config), lists.set))
}

/// TLS towards one upstream: its CA bundle and/or the system's roots, ALPN h2. The client
/// certificate, if any, is set per connection by the upstream pool; with one, session
/// resumption is off, so every connection authenticates with the certificate it was made with
/// (a resumed TLS 1.3 session would carry the identity of the certificate that first opened it,
/// even after that one expired).
pub fn upstream_client_config(
    ca: Option<&Path>,
    system_roots: bool,
    client_cert: bool,
) -> Result<ClientConfig, TlsError> {
    let mut roots = match ca {
        Some(ca) => root_store(ca, "upstream CA bundle")?,
        None => RootCertStore::empty(),
    };
    if system_roots {
        let native = rustls_native_certs::load_native_certs();
        let (added, _ignored) = roots.add_parsable_certificates(native.certs);
        if added == 0 {
            return Err(TlsError::SystemRoots(
                native
                    .errors
                    .first()
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "the system trust store is empty".into()),
            ));
        }
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    if client_cert {
        config.resumption = rustls::client::Resumption::disabled();
    }
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
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
