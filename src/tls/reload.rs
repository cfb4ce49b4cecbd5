//! The client-facing TLS configuration behind a swappable handle: certificate, key, client CA
//! bundle and CRLs are re-read on file change or SIGHUP, validated, and published atomically.
//! New handshakes use the new configuration; established connections keep theirs, except that
//! each watches the revocation set and closes when a new CRL revokes its certificate.

use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};

use rustls::ServerConfig;
use tokio::sync::watch;

use super::revocation::RevocationSet;
use super::{load_certs, server_config_and_revocations, TlsError};
use crate::config::ServerTls;
use crate::telemetry::{unix_now, CertValidity};

pub struct ReloadableServerConfig {
    settings: ServerTls,
    /// Whether the handshake demands a client certificate (not when bearer tokens are on).
    require_client_cert: bool,
    current: RwLock<(Arc<ServerConfig>, CertValidity)>,
    /// The certificates the CRLs in force revoke; connections watch it.
    revocations: watch::Sender<Arc<RevocationSet>>,
}

impl std::fmt::Debug for ReloadableServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadableServerConfig")
            .field("cert", &self.settings.cert)
            .field("validity", &self.validity())
            .finish_non_exhaustive()
    }
}

/// Builds a server config and reads its leaf certificate's validity.
fn build(
    settings: &ServerTls,
    require_client_cert: bool,
) -> Result<(Arc<ServerConfig>, CertValidity, RevocationSet), TlsError> {
    let (config, revoked) = server_config_and_revocations(settings, require_client_cert, &[b"h2"])?;
    let chain = load_certs(&settings.cert, "server certificate")?;
    let validity = chain
        .first()
        .and_then(|leaf| CertValidity::of_der(leaf.as_ref()))
        .ok_or_else(|| TlsError::NoCertificate {
            what: "server certificate (unparsable)",
            path: settings.cert.clone(),
        })?;
    Ok((config, validity, revoked))
}

impl ReloadableServerConfig {
    pub fn load(
        settings: &ServerTls,
        require_client_cert: bool,
    ) -> Result<Arc<ReloadableServerConfig>, TlsError> {
        let (config, validity, revoked) = build(settings, require_client_cert)?;
        Ok(Arc::new(ReloadableServerConfig {
            settings: settings.clone(),
            require_client_cert,
            current: RwLock::new((config, validity)),
            revocations: watch::Sender::new(Arc::new(revoked)),
        }))
    }

    /// The configuration for the next handshake.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .clone()
    }

    /// Validity of the certificate currently served.
    pub fn validity(&self) -> CertValidity {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .1
    }

    /// The certificates revoked now, updated on every reload that changes them.
    pub fn revocations(&self) -> watch::Receiver<Arc<RevocationSet>> {
        self.revocations.subscribe()
    }

    /// Re-reads certificate, key, CA bundle and CRLs. Installs them only if they load, the key
    /// matches the certificate, the certificate is valid now and every CRL parses and is signed
    /// by a client CA; otherwise the current ones stay.
    pub fn reload(&self) -> Result<(), String> {
        let (config, validity, revoked) =
            build(&self.settings, self.require_client_cert).map_err(|e| e.to_string())?;
        let now = unix_now();
        if !validity.is_valid_at(now) {
            return Err(format!(
                "{}: the new certificate is not valid now (valid from {} to {}, Unix time)",
                self.settings.cert.display(),
                validity.not_before,
                validity.not_after
            ));
        }
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = (config, validity);
        let count = revoked.len();
        let changed = self.revocations.send_if_modified(|current| {
            let changed = **current != revoked;
            if changed {
                *current = Arc::new(revoked);
            }
            changed
        });
        if changed {
            tracing::info!(
                revoked = count,
                "client certificate revocations reloaded: connections of revoked certificates close"
            );
        }
        tracing::info!(
            cert = %self.settings.cert.display(),
            expires_in_s = validity.seconds_to_expiry(now),
            "client-facing certificate and CA bundle reloaded: new handshakes use them"
        );
        Ok(())
    }

    /// Files whose change triggers a reload.
    pub fn watched_paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![
            self.settings.cert.clone(),
            self.settings.key.clone(),
            self.settings.client_ca.clone(),
        ];
        paths.extend(self.settings.crls.iter().cloned());
        paths
    }

    pub fn spawn_reloader(self: &Arc<Self>) {
        let handle = self.clone();
        crate::reload::spawn_reloader("listener-tls", self.watched_paths(), move || {
            handle.reload()
        });
    }
}
