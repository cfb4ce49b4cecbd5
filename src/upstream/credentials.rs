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
            retire_at: not_after - margin,
        })
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
