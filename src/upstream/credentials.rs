//! Client credentials towards an upstream: the current client certificate (published atomically,
//! rotated by its source) and the rustls resolver that presents it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;

#[derive(Debug, Clone, thiserror::Error)]
pub enum CredentialError {
    #[error("{0}")]
    Invalid(String),
    #[error("no client certificate is available ({0})")]
    Missing(String),
    #[error("the client certificate (serial {serial}) expired {ago}s ago{}", last_error.as_ref().map(|e| format!("; renewal keeps failing: {e}")).unwrap_or_default())]
    Expired {
        serial: String,
        ago: u64,
        last_error: Option<String>,
    },
}

/// One client certificate with its key, ready for rustls, and what the pool needs to know about
/// it.
#[derive(Debug)]
pub struct ClientCredential {
    pub certified: Arc<CertifiedKey>,
    /// Upper-case hex, as nginx's `$ssl_client_serial` and OpenSSL print it.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// When its lifetime started: when it was issued (`notBefore` is often backdated for clock
    /// skew) or, for certificates from elsewhere, `notBefore`.
    pub lifetime_start: SystemTime,
    /// When connections made with this certificate stop taking new calls: a margin before
    /// `not_after` (a tenth of the lifetime, at most a minute).
    pub retire_at: SystemTime,
}

impl ClientCredential {
    /// Parses a PEM certificate chain and key, and checks that they belong together.
    /// `issued_at` is when the certificate's lifetime started for retirement purposes (its
    /// `notBefore` is often backdated for clock skew).
    pub fn from_pem(
        cert_pem: &[u8],
        key_pem: &[u8],
        issued_at: Option<SystemTime>,
    ) -> Result<ClientCredential, CredentialError> {
        let invalid = |what: &str, e: &dyn std::fmt::Display| {
            CredentialError::Invalid(format!("{what}: {e}"))
        };
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("certificate is not valid PEM", &e))?;
        let leaf = chain
            .first()
            .ok_or_else(|| CredentialError::Invalid("no certificate in the PEM data".into()))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| invalid("private key is not valid PEM", &e))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
            .map_err(|e| invalid("certificate does not parse", &e))?;
        let validity = parsed.validity();
        let to_system = |t: x509_parser::time::ASN1Time| {
            let secs = t.timestamp();
            if secs >= 0 {
                SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
            } else {
                SystemTime::UNIX_EPOCH
            }
        };
        let not_before = to_system(validity.not_before);
        let not_after = to_system(validity.not_after);
        let serial = parsed
            .tbs_certificate
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<String>();
        let serial = serial
            .strip_prefix("00")
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .unwrap_or(serial);
        let certified = CertifiedKey::from_der(chain, key, &crate::tls::provider())
            .map_err(|e| invalid("certificate and key do not form a pair", &e))?;
        let start = issued_at.unwrap_or(not_before).max(not_before);
        let lifetime = not_after.duration_since(start).unwrap_or_default();
        let margin = (lifetime / 10).min(Duration::from_secs(60));
        Ok(ClientCredential {
            certified: Arc::new(certified),
            serial,
            not_before,
            not_after,
            lifetime_start: start,
            retire_at: not_after - margin,
        })
    }

    /// From `lifetime_start` to `not_after`.
    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.lifetime_start)
            .unwrap_or_default()
    }

    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }

    /// Seconds until `not_after` (negative once expired).
    pub fn seconds_until_expiry(&self, now: SystemTime) -> f64 {
        match self.not_after.duration_since(now) {
            Ok(left) => left.as_secs_f64(),
            Err(past) => -past.duration().as_secs_f64(),
        }
    }
}

/// The current client certificate of one upstream, replaced atomically by its source. Every
/// replacement bumps the generation, which tells the connection pool to move new calls to
/// connections made with the new certificate.
#[derive(Debug, Default)]
pub struct CertCell {
    current: RwLock<Option<Arc<ClientCredential>>>,
    generation: AtomicU64,
    /// Why the last renewal or reload failed, while it keeps failing.
    last_error: RwLock<Option<String>>,
}

impl CertCell {
    pub fn install(&self, credential: ClientCredential) {
        let credential = Arc::new(credential);
        match self.current.write() {
            Ok(mut guard) => *guard = Some(credential),
            Err(poisoned) => *poisoned.into_inner() = Some(credential),
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.set_error(None);
    }

    pub fn set_error(&self, error: Option<String>) {
        match self.last_error.write() {
            Ok(mut guard) => *guard = error,
            Err(poisoned) => *poisoned.into_inner() = error,
        }
    }

    pub fn last_error(&self) -> Option<String> {
        match self.last_error.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The installed certificate, expired or not.
    pub fn peek(&self) -> Option<Arc<ClientCredential>> {
        match self.current.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The certificate to present on a new connection: never one that has expired.
    pub fn current(&self) -> Result<Arc<ClientCredential>, CredentialError> {
        let now = SystemTime::now();
        match self.peek() {
            None => Err(CredentialError::Missing(
                self.last_error()
                    .unwrap_or_else(|| "none was loaded".into()),
            )),
            Some(c) if c.is_expired(now) => Err(CredentialError::Expired {
                serial: c.serial.clone(),
                ago: now
                    .duration_since(c.not_after)
                    .unwrap_or_default()
                    .as_secs(),
                last_error: self.last_error(),
            }),
            Some(c) => Ok(c),
        }
    }

    /// Seconds until the current certificate expires (negative once it has); None without one.
    pub fn seconds_until_expiry(&self) -> Option<f64> {
        self.peek()
            .map(|c| c.seconds_until_expiry(SystemTime::now()))
    }
}

/// Presents one certificate, chosen when the connection was made, so the pool knows exactly
/// which certificate each connection carries. Refuses to present it once it has expired.
#[derive(Debug)]
pub struct FixedClientCert(pub Arc<ClientCredential>);

impl ResolvesClientCert for FixedClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        (!self.0.is_expired(SystemTime::now())).then(|| self.0.certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Aborts a background task when dropped (a credential source that is replaced at run time
/// takes its renewal task with it).
#[derive(Debug)]
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Below this fraction of its lifetime left, a certificate that has not been replaced is
/// warned about (issued certificates are renewed at ~70 %, so this means renewal is failing).
const WARN_REMAINING_FRACTION: f64 = 0.2;

/// Logs a warning, once per check, while the certificate is close to expiry and nothing
/// replaced it, and an error once it has expired.
fn check_expiry(upstream: &str, cell: &CertCell) {
    let Some(current) = cell.peek() else { return };
    let now = SystemTime::now();
    let left = current.seconds_until_expiry(now);
    let lifetime = current.lifetime().as_secs_f64();
    let last_error = cell
        .last_error()
        .unwrap_or_else(|| "nothing replaced it".into());
    if left <= 0.0 {
        tracing::error!(upstream, serial = %current.serial, expired_seconds_ago = -left, error = %last_error, "upstream client certificate has EXPIRED: new connections fail with UNAVAILABLE until it is replaced");
    } else if left < lifetime * WARN_REMAINING_FRACTION {
        tracing::warn!(upstream, serial = %current.serial, expires_in_seconds = left, error = %last_error, "upstream client certificate expires soon and has not been renewed");
    }
}

/// Runs [`check_expiry`] a few times per lifetime (at most once a minute, at least every 250 ms).
fn spawn_expiry_watch(upstream: String, cell: Arc<CertCell>) -> AbortOnDrop {
    AbortOnDrop(tokio::spawn(async move {
        loop {
            let period = cell
                .peek()
                .map(|c| c.lifetime() / 20)
                .unwrap_or(Duration::from_secs(60))
                .clamp(Duration::from_millis(250), Duration::from_secs(60));
            tokio::time::sleep(period).await;
            check_expiry(&upstream, &cell);
        }
    }))
}

fn rotation_log(
    upstream: &str,
    previous: Option<&Arc<ClientCredential>>,
    new: &ClientCredential,
    how: &str,
) {
    let not_after = time::OffsetDateTime::from(new.not_after)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    tracing::info!(
        upstream,
        serial = %new.serial,
        previous_serial = previous.map(|p| p.serial.as_str()).unwrap_or(""),
        not_after = %not_after,
        expires_in_seconds = new.seconds_until_expiry(SystemTime::now()).round(),
        "upstream client certificate {how}"
    );
}

/// Mints client certificates from an issuing CA (rcgen), a fresh key pair each time, and
/// renews them at about `renew_at` of their lifetime.
pub struct CertIssuer {
    upstream: String,
    ca: crate::tls::pki::CertAuthority,
    ca_not_after: SystemTime,
    config: crate::config::IssuedCredentials,
    cell: Arc<CertCell>,
}

impl CertIssuer {
    /// Loads the CA and issues the first certificate; then renews in the background until the
    /// returned guards are dropped.
    pub fn start(
        upstream: &str,
        config: &crate::config::IssuedCredentials,
    ) -> Result<(Arc<CertCell>, Vec<AbortOnDrop>), CredentialError> {
        let invalid = |m: String| CredentialError::Invalid(m);
        let ca_pem = std::fs::read_to_string(&config.ca_cert)
            .map_err(|e| invalid(format!("cannot read {}: {e}", config.ca_cert.display())))?;
        let ca_key = read_private(&config.ca_key)?;
        let ca = crate::tls::pki::CertAuthority::from_pem(&ca_pem, &ca_key).map_err(|e| {
            invalid(format!(
                "issuing CA {} / {}: {e}",
                config.ca_cert.display(),
                config.ca_key.display()
            ))
        })?;
        let ca_not_after = CertificateDer::pem_slice_iter(ca_pem.as_bytes())
            .next()
            .and_then(|c| c.ok())
            .and_then(|der| {
                x509_parser::parse_x509_certificate(der.as_ref())
                    .ok()
                    .map(|(_, c)| c.validity().not_after.timestamp())
            })
            .filter(|secs| *secs > 0)
            .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs()))
            .ok_or_else(|| {
                invalid(format!(
                    "issuing CA {} does not parse",
                    config.ca_cert.display()
                ))
            })?;
        let cell = Arc::new(CertCell::default());
        let issuer = Arc::new(CertIssuer {
            upstream: upstream.to_string(),
            ca,
            ca_not_after,
            config: config.clone(),
            cell: cell.clone(),
        });
        let first = issuer.issue()?;
        rotation_log(upstream, None, &first, "issued");
        cell.install(first);
        let renewer = AbortOnDrop(tokio::spawn(renew_loop(issuer)));
        let watch = spawn_expiry_watch(upstream.to_string(), cell.clone());
        Ok((cell, vec![renewer, watch]))
    }

    fn lifetime(&self) -> Duration {
        Duration::from_secs(self.config.lifetime_seconds)
    }

    /// A new certificate valid from now (backdated a minute for clock skew) for the lifetime,
    /// never past the issuing CA's own expiry.
    fn issue(&self) -> Result<ClientCredential, CredentialError> {
        use crate::tls::pki::{LeafSpec, Usage};
        let now = SystemTime::now();
        let not_after = (now + self.lifetime()).min(self.ca_not_after);
        if not_after <= now + Duration::from_secs(1) {
            return Err(CredentialError::Invalid(format!(
                "the issuing CA {} has expired",
                self.config.ca_cert.display()
            )));
        }
        let mut spec = LeafSpec::new(&self.config.common_name, Usage::Client, self.lifetime());
        spec.not_after = time::OffsetDateTime::from(not_after);
        spec.dns_names = self.config.dns_names.clone();
        spec.uris = self.config.uris.clone();
        let issued = self
            .ca
            .issue(&spec)
            .map_err(|e| CredentialError::Invalid(format!("cannot issue a certificate: {e}")))?;
        ClientCredential::from_pem(
            issued.cert_pem.as_bytes(),
            issued.key_pem.as_bytes(),
            Some(now),
        )
    }

    /// When the current certificate should be replaced: at `renew_at` ± 5 % of its lifetime.
    fn renewal_due(&self, current: &ClientCredential) -> SystemTime {
        let lifetime = current.lifetime().as_secs_f64();
        let jitter = (random_unit() - 0.5) * 0.1;
        let fraction = (self.config.renew_at + jitter).clamp(0.05, 0.95);
        current.lifetime_start + Duration::from_secs_f64(lifetime * fraction)
    }
}

/// Renews on schedule; after a failure, retries with backoff (1 s doubling, at most a tenth of
/// the lifetime and a minute), warning while the current certificate runs out.
async fn renew_loop(issuer: Arc<CertIssuer>) {
    let mut failures: u32 = 0;
    loop {
        let wait = match (issuer.cell.peek(), failures) {
            (Some(current), 0) => issuer
                .renewal_due(&current)
                .duration_since(SystemTime::now())
                .unwrap_or_default(),
            _ => {
                let cap = (issuer.lifetime() / 10)
                    .clamp(Duration::from_millis(200), Duration::from_secs(60));
                (Duration::from_secs(1) * 2u32.saturating_pow(failures.saturating_sub(1).min(6)))
                    .min(cap)
            }
        };
        tokio::time::sleep(wait).await;
        let issuer_for_task = issuer.clone();
        // Key generation and signing are CPU work: off the async workers.
        let result = tokio::task::spawn_blocking(move || issuer_for_task.issue())
            .await
            .unwrap_or_else(|e| {
                Err(CredentialError::Invalid(format!(
                    "issuing task failed: {e}"
                )))
            });
        match result {
            Ok(credential) => {
                rotation_log(
                    &issuer.upstream,
                    issuer.cell.peek().as_ref(),
                    &credential,
                    "rotated",
                );
                issuer.cell.install(credential);
                failures = 0;
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                issuer.cell.set_error(Some(e.to_string()));
                let left = issuer.cell.seconds_until_expiry().unwrap_or(0.0);
                tracing::warn!(upstream = %issuer.upstream, error = %e, expires_in_seconds = left.round(), attempt = failures, "upstream client certificate renewal failed; will retry");
                check_expiry(&issuer.upstream, &issuer.cell);
            }
        }
    }
}

/// A uniformly random number in [0, 1).
fn random_unit() -> f64 {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 4];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(bytes)) / (f64::from(u32::MAX) + 1.0)
}

/// Reads a private key file, refusing (on unix) one that group or others may read.
fn read_private(path: &std::path::Path) -> Result<String, CredentialError> {
    use std::io::Read as _;
    let error = |e: std::io::Error| {
        CredentialError::Invalid(format!("cannot read {}: {e}", path.display()))
    };
    let mut file = std::fs::File::open(path).map_err(error)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = file.metadata().map_err(error)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(CredentialError::Invalid(format!(
                "{} is readable by group or others (mode {:04o}); chmod 600 it",
                path.display(),
                mode & 0o7777
            )));
        }
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(error)?;
    Ok(text)
}

/// A client certificate and key written by something else (cert-manager, a Vault agent, a
/// SPIFFE helper), reloaded when either file changes. A pair that does not parse, does not
/// match, or has already expired is rejected and the last good one stays.
pub struct CertFiles {
    upstream: String,
    files: crate::config::FileCredentials,
    cell: Arc<CertCell>,
}

impl CertFiles {
    pub fn start(
        upstream: &str,
        files: &crate::config::FileCredentials,
    ) -> Result<(Arc<CertCell>, Vec<AbortOnDrop>, crate::reload::Reloader), CredentialError> {
        let source = Arc::new(CertFiles {
            upstream: upstream.to_string(),
            files: files.clone(),
            cell: Arc::new(CertCell::default()),
        });
        source.load()?;
        let cell = source.cell.clone();
        let watch = spawn_expiry_watch(upstream.to_string(), cell.clone());
        let paths = vec![files.cert.clone(), files.key.clone()];
        let reloader = crate::reload::watch("upstream client certificate", paths, move || {
            source.load().map(|_| ()).map_err(|e| {
                source.cell.set_error(Some(e.to_string()));
                format!("upstream {}: {e}", source.upstream)
            })
        });
        Ok((cell, vec![watch], reloader))
    }

    /// Installs the files' pair if it is valid and new. Returns whether it changed.
    fn load(&self) -> Result<bool, CredentialError> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|e| {
                CredentialError::Invalid(format!("cannot read {}: {e}", path.display()))
            })
        };
        let cert = read(&self.files.cert)?;
        let key = read(&self.files.key)?;
        let credential = ClientCredential::from_pem(&cert, &key, None).map_err(|e| {
            CredentialError::Invalid(format!(
                "{} / {}: {e}",
                self.files.cert.display(),
                self.files.key.display()
            ))
        })?;
        if credential.is_expired(SystemTime::now()) {
            return Err(CredentialError::Invalid(format!(
                "{} has expired",
                self.files.cert.display()
            )));
        }
        let previous = self.cell.peek();
        if previous.as_ref().is_some_and(|p| {
            p.serial == credential.serial && p.certified.cert == credential.certified.cert
        }) {
            return Ok(false);
        }
        rotation_log(
            &self.upstream,
            previous.as_ref(),
            &credential,
            if previous.is_some() {
                "reloaded"
            } else {
                "loaded"
            },
        );
        self.cell.install(credential);
        Ok(true)
    }
}

/// An API key, sent as `authorization: Bearer KEY` in place of the caller's header.
pub struct ApiKey {
    value: RwLock<http::HeaderValue>,
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl ApiKey {
    /// Reads the key from its file or variable; a file is reloaded when it changes (a bad
    /// replacement is rejected and the last good key stays).
    pub fn start(
        upstream: &str,
        config: &crate::config::ApiKeyCredentials,
    ) -> Result<(Arc<ApiKey>, Option<crate::reload::Reloader>), CredentialError> {
        match (&config.file, &config.env) {
            (Some(path), _) => {
                let key = Arc::new(ApiKey {
                    value: RwLock::new(Self::read_file(path)?),
                });
                let (source, path, upstream) = (key.clone(), path.clone(), upstream.to_string());
                let reloader =
                    crate::reload::watch("upstream API key", vec![path.clone()], move || {
                        let value = Self::read_file(&path)
                            .map_err(|e| format!("upstream {upstream}: {e}"))?;
                        match source.value.write() {
                            Ok(mut guard) => *guard = value,
                            Err(poisoned) => *poisoned.into_inner() = value,
                        }
                        tracing::info!(upstream = %upstream, "upstream API key reloaded");
                        Ok(())
                    });
                Ok((key, Some(reloader)))
            }
            (None, Some(variable)) => {
                let text = std::env::var(variable).map_err(|_| {
                    CredentialError::Missing(format!("environment variable {variable} is not set"))
                })?;
                Ok((
                    Arc::new(ApiKey {
                        value: RwLock::new(Self::header(&text, variable)?),
                    }),
                    None,
                ))
            }
            (None, None) => Err(CredentialError::Missing(
                "no API key file or variable".into(),
            )),
        }
    }

    fn read_file(path: &std::path::Path) -> Result<http::HeaderValue, CredentialError> {
        // Like the `files` key, not mode-checked: mounted secrets are often 0644.
        let text = std::fs::read_to_string(path).map_err(|e| {
            CredentialError::Invalid(format!("cannot read {}: {e}", path.display()))
        })?;
        Self::header(&text, &path.display().to_string())
    }

    fn header(text: &str, origin: &str) -> Result<http::HeaderValue, CredentialError> {
        let key = text.trim();
        if key.is_empty() || key.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(CredentialError::Invalid(format!(
                "the API key in {origin} is empty or not a single token"
            )));
        }
        let mut value = http::HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
            CredentialError::Invalid(format!(
                "the API key in {origin} is not a valid header value"
            ))
        })?;
        value.set_sensitive(true);
        Ok(value)
    }

    /// The `authorization` header value.
    pub fn header_value(&self) -> http::HeaderValue {
        match self.value.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::pki::{CertAuthority, LeafSpec, Usage};

    fn pair(lifetime: Duration) -> (String, String) {
        let ca = CertAuthority::generate("ca", Duration::from_secs(3600)).unwrap();
        let leaf = ca
            .issue(&LeafSpec::new("client", Usage::Client, lifetime))
            .unwrap();
        (leaf.cert_pem, leaf.key_pem)
    }

    #[test]
    fn parses_pair_and_validity() {
        let (cert, key) = pair(Duration::from_secs(600));
        let c = ClientCredential::from_pem(cert.as_bytes(), key.as_bytes(), None).unwrap();
        let left = c.seconds_until_expiry(SystemTime::now());
        assert!((590.0..=601.0).contains(&left), "{left}");
        // Lifetime 660 s (backdated a minute): a margin of 60 s.
        assert_eq!(
            c.not_after.duration_since(c.retire_at).unwrap(),
            Duration::from_secs(60)
        );
        assert!(!c.serial.is_empty());
    }

    #[test]
    fn mismatched_pair_is_rejected() {
        let (cert, _) = pair(Duration::from_secs(600));
        let (_, other_key) = pair(Duration::from_secs(600));
        let err =
            ClientCredential::from_pem(cert.as_bytes(), other_key.as_bytes(), None).unwrap_err();
        assert!(err.to_string().contains("pair"), "{err}");
        let err = ClientCredential::from_pem(b"garbage", b"garbage", None).unwrap_err();
        assert!(matches!(err, CredentialError::Invalid(_)), "{err}");
    }

    #[test]
    fn an_expired_certificate_is_never_presented() {
        let ca = CertAuthority::generate("ca", Duration::from_secs(3600)).unwrap();
        let mut spec = LeafSpec::new("client", Usage::Client, Duration::from_secs(1));
        spec.not_after = spec.not_before + time::Duration::seconds(30);
        let leaf = ca.issue(&spec).unwrap();
        let cell = CertCell::default();
        assert!(matches!(cell.current(), Err(CredentialError::Missing(_))));
        let c = ClientCredential::from_pem(leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes(), None)
            .unwrap();
        cell.install(c);
        assert_eq!(cell.generation(), 1);
        let err = cell.current().unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
        let resolver = FixedClientCert(cell.peek().unwrap());
        assert!(resolver.resolve(&[], &[]).is_none());
        assert!(cell.seconds_until_expiry().unwrap() < 0.0);
    }
}
