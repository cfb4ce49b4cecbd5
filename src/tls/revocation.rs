//! Revocation of client certificates: certificate revocation lists (CRLs) checked at every
//! handshake (by rustls' verifier) and, after a reload, against connections already open (each
//! connection watches the [`RevocationSet`] for its own certificate's issuer and serial).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};

use super::TlsError;

/// Every certificate the configured CRLs revoke, by issuer (DER-encoded name) and serial.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RevocationSet {
    revoked: HashSet<(Vec<u8>, Vec<u8>)>,
}

impl RevocationSet {
    pub fn is_revoked(&self, certificate: &ClientCertificate) -> bool {
        !self.revoked.is_empty()
            && self
                .revoked
                .contains(&(certificate.issuer.clone(), certificate.serial.clone()))
    }

    /// How many certificates are revoked.
    pub fn len(&self) -> usize {
        self.revoked.len()
    }

    pub fn is_empty(&self) -> bool {
        self.revoked.is_empty()
    }
}

/// What the proxy needs to know of a connection's client certificate to end the connection in
/// time and to name it in audit lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertificate {
    pub not_after: SystemTime,
    /// The serial number's DER content bytes.
    pub serial: Vec<u8>,
    /// The issuer's DER-encoded name.
    pub issuer: Vec<u8>,
    pub subject: String,
}

impl ClientCertificate {
    pub fn from_der(der: &[u8]) -> Option<ClientCertificate> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let not_after = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0);
        Some(ClientCertificate {
            not_after: UNIX_EPOCH + Duration::from_secs(not_after),
            serial: cert.raw_serial().to_vec(),
            issuer: cert.issuer().as_raw().to_vec(),
            subject: cert.subject().to_string(),
        })
    }

    /// The serial as lowercase hex (as `openssl x509 -serial` shows it).
    pub fn serial_hex(&self) -> String {
        self.serial.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// CRLs read from files, checked, ready for the handshake verifier and for open connections.
#[derive(Debug, Default)]
pub struct RevocationLists {
    pub crls: Vec<CertificateRevocationListDer<'static>>,
    pub set: RevocationSet,
}

fn crl_error(path: &Path, reason: impl Into<String>) -> TlsError {
    TlsError::Crl {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads every CRL in `paths` (PEM, possibly several per file, or one DER), and checks that
/// each parses and is signed by one of the client CAs: a list that cannot be trusted (or that
/// would make rustls refuse every client of its issuer) is refused here, at load or reload.
pub fn load_crls(
    paths: &[PathBuf],
    client_cas: &[CertificateDer<'static>],
) -> Result<RevocationLists, TlsError> {
    let mut lists = RevocationLists::default();
    let cas: Vec<_> = client_cas
        .iter()
        .filter_map(|der| x509_parser::parse_x509_certificate(der.as_ref()).ok())
        .map(|(_, cert)| cert)
        .collect();
    for path in paths {
        let bytes = std::fs::read(path).map_err(|e| crl_error(path, e.to_string()))?;
        let ders: Vec<CertificateRevocationListDer<'static>> =
            if bytes.windows(11).any(|w| w == b"-----BEGIN ") {
                CertificateRevocationListDer::pem_slice_iter(&bytes)
                    .collect::<Result<_, _>>()
                    .map_err(|e| crl_error(path, format!("not PEM CRLs: {e}")))?
            } else {
                vec![CertificateRevocationListDer::from(bytes)]
            };
        if ders.is_empty() {
            return Err(crl_error(path, "holds no X509 CRL"));
        }
        for der in ders {
            let (_, crl) = x509_parser::parse_x509_crl(der.as_ref())
                .map_err(|e| crl_error(path, format!("not a CRL: {e}")))?;
            let issuer = crl.issuer().as_raw();
            let signer = cas
                .iter()
                .filter(|ca| ca.subject().as_raw() == issuer)
                .find(|ca| crl.verify_signature(ca.public_key()).is_ok())
                .ok_or_else(|| {
                    crl_error(
                        path,
                        format!(
                            "not signed by any CA of the client CA bundle (issuer {})",
                            crl.issuer()
                        ),
                    )
                })?;
            tracing::debug!(path = %path.display(), issuer = %signer.subject(), revoked = crl.iter_revoked_certificates().count(), "CRL loaded");
            for revoked in crl.iter_revoked_certificates() {
                lists
                    .set
                    .revoked
                    .insert((issuer.to_vec(), revoked.raw_serial().to_vec()));
            }
            lists.crls.push(der);
        }
    }
    Ok(lists)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::pki::{CertAuthority, LeafSpec, Usage};

    #[test]
    fn crls_load_as_pem_or_der_and_must_be_signed_by_a_client_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertAuthority::generate("client CA", Duration::from_secs(3600)).unwrap();
        let other = CertAuthority::generate("other CA", Duration::from_secs(3600)).unwrap();
        let leaf = |name: &str| {
            ca.issue(&LeafSpec::new(
                name,
                Usage::Client,
                Duration::from_secs(3600),
            ))
            .unwrap()
        };
        let (revoked, kept, later) = (leaf("revoked"), leaf("kept"), leaf("later"));
        let cas = vec![CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap()];
        let facts = |pem: &str| {
            let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
            ClientCertificate::from_der(der.as_ref()).unwrap()
        };

        let pem_path = dir.path().join("a.crl.pem");
        let der_path = dir.path().join("b.crl");
        let first = ca.revocation_list(1, &[&revoked.cert_pem]).unwrap();
        let second = ca.revocation_list(2, &[&later.cert_pem]).unwrap();
        std::fs::write(&pem_path, &first.pem).unwrap();
        std::fs::write(&der_path, &second.der).unwrap();
        let lists = load_crls(&[pem_path.clone(), der_path.clone()], &cas).unwrap();
        assert_eq!(lists.crls.len(), 2);
        assert_eq!(lists.set.len(), 2);
        assert!(lists.set.is_revoked(&facts(&revoked.cert_pem)));
        assert!(lists.set.is_revoked(&facts(&later.cert_pem)));
        assert!(!lists.set.is_revoked(&facts(&kept.cert_pem)));
        assert!(!facts(&kept.cert_pem).serial_hex().is_empty());

        // Two lists in one PEM file work too.
        std::fs::write(&pem_path, format!("{}{}", first.pem, second.pem)).unwrap();
        assert_eq!(
            load_crls(std::slice::from_ref(&pem_path), &cas)
                .unwrap()
                .set
                .len(),
            2
        );

        // A list from a CA the bundle does not hold, garbage, and an empty PEM are refused.
        let foreign = other.revocation_list(1, &[]).unwrap();
        std::fs::write(&pem_path, &foreign.pem).unwrap();
        let err = load_crls(std::slice::from_ref(&pem_path), &cas)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not signed by any CA"), "{err}");
        std::fs::write(&der_path, b"not a crl").unwrap();
        let err = load_crls(std::slice::from_ref(&der_path), &cas)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a CRL"), "{err}");
        std::fs::write(
            &pem_path,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert!(load_crls(&[pem_path], &cas).is_err());
        assert!(load_crls(&[dir.path().join("missing.crl")], &cas).is_err());
    }
}
