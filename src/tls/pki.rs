//! A small certificate authority (rcgen) for development setups and tests.

use std::net::IpAddr;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use time::OffsetDateTime;

pub use rcgen::Error as PkiError;

/// A CA that can issue certificates.
pub struct CertAuthority {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
    pub key_pem: String,
}

/// A PEM certificate and its PEM private key.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A signed certificate revocation list, PEM and DER.
#[derive(Debug, Clone)]
pub struct RevocationList {
    pub pem: String,
    pub der: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
}

/// What to put in a leaf certificate.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    pub common_name: String,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
    pub uris: Vec<String>,
    pub emails: Vec<String>,
    pub usage: Usage,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl LeafSpec {
    /// A leaf valid from a minute ago for `lifetime`.
    pub fn new(common_name: &str, usage: Usage, lifetime: Duration) -> LeafSpec {
        let now = OffsetDateTime::now_utc();
        LeafSpec {
            common_name: common_name.to_string(),
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
            uris: Vec::new(),
            emails: Vec::new(),
            usage,
            not_before: now - time::Duration::minutes(1),
            not_after: now + lifetime,
        }
    }
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "portcullis");
    dn
}

impl CertAuthority {
    /// A new self-signed CA valid for `lifetime`.
    pub fn generate(common_name: &str, lifetime: Duration) -> Result<CertAuthority, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = distinguished_name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + lifetime;
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(CertAuthority {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA loaded from its PEM certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<CertAuthority, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        Ok(CertAuthority {
            issuer: Issuer::from_ca_cert_pem(cert_pem, key)?,
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
        })
    }

    /// Issues a leaf certificate with a fresh key pair.
    pub fn issue(&self, spec: &LeafSpec) -> Result<IssuedCert, PkiError> {
        let mut params = CertificateParams::new(spec.dns_names.clone())?;
        params.distinguished_name = distinguished_name(&spec.common_name);
        params
            .subject_alt_names
            .extend(spec.ip_addresses.iter().map(|ip| SanType::IpAddress(*ip)));
        for uri in &spec.uris {
            params
                .subject_alt_names
                .push(SanType::URI(uri.as_str().try_into()?));
        }
        for email in &spec.emails {
            params
                .subject_alt_names
                .push(SanType::Rfc822Name(email.as_str().try_into()?));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![match spec.usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        params.use_authority_key_identifier_extension = true;
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

impl CertAuthority {
    /// A CRL signed by this CA (number `number`, valid for a day) revoking the given PEM
    /// certificates, which this CA must have issued.
    pub fn revocation_list(
        &self,
        number: u64,
        revoked_pems: &[&str],
    ) -> Result<RevocationList, PkiError> {
        let now = OffsetDateTime::now_utc();
        let mut revoked_certs = Vec::new();
        for pem in revoked_pems {
            use rustls::pki_types::pem::PemObject;
            let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
                .map_err(|_| PkiError::CouldNotParseCertificate)?;
            let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
                .map_err(|_| PkiError::CouldNotParseCertificate)?;
            // DER content bytes: drop a sign byte, the encoder adds it back when needed.
            let raw = cert.raw_serial();
            let start = raw
                .iter()
                .position(|b| *b != 0)
                .unwrap_or(raw.len().saturating_sub(1));
            revoked_certs.push(RevokedCertParams {
                serial_number: SerialNumber::from(raw[start..].to_vec()),
                revocation_time: now - time::Duration::seconds(1),
                reason_code: None,
                invalidity_date: None,
            });
        }
        let params = CertificateRevocationListParams {
            this_update: now - time::Duration::minutes(1),
            next_update: now + time::Duration::days(1),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer)?;
        Ok(RevocationList {
            pem: crl.pem()?,
            der: crl.der().to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_leaf_that_reloaded_ca_can_also_sign() {
        let ca = CertAuthority::generate("test CA", Duration::from_secs(3600)).unwrap();
        let mut spec = LeafSpec::new("svc", Usage::Server, Duration::from_secs(60));
        spec.dns_names.push("localhost".into());
        spec.ip_addresses.push("127.0.0.1".parse().unwrap());
        spec.uris.push("spiffe://example.org/svc".into());
        let leaf = ca.issue(&spec).unwrap();
        assert!(leaf.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let again = CertAuthority::from_pem(&ca.cert_pem, &ca.key_pem).unwrap();
        again
            .issue(&LeafSpec::new(
                "client",
                Usage::Client,
                Duration::from_secs(60),
            ))
            .unwrap();
    }
}
