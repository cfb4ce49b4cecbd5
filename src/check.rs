//! `portcullis check --config FILE`: everything a deploy can get wrong, checked before it
//! serves — the config, certificate chains and their expiry, every key (a real seal and open),
//! the policies, and whether each upstream answers (TCP, and the TLS handshake with the
//! configured CA and client certificate). Prints one line per check; any failure is an error.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use crate::config::Config;
use crate::crypto::DataKeyManager;
use crate::proxy::Encryption;
use crate::telemetry::readiness::{probe_upstream, PROBE_NAMESPACE};
use crate::telemetry::unix_now;
use crate::upstream::Upstreams;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Clone)]
pub struct CheckLine {
    pub severity: Severity,
    pub what: String,
    pub detail: String,
}

#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    pub lines: Vec<CheckLine>,
}

impl CheckReport {
    fn push(&mut self, severity: Severity, what: impl Into<String>, detail: impl Into<String>) {
        self.lines.push(CheckLine {
            severity,
            what: what.into(),
            detail: detail.into(),
        });
    }

    pub fn failed(&self) -> usize {
        self.count(Severity::Fail)
    }

    pub fn warnings(&self) -> usize {
        self.count(Severity::Warn)
    }

    fn count(&self, severity: Severity) -> usize {
        self.lines.iter().filter(|l| l.severity == severity).count()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for line in &self.lines {
            let tag = match line.severity {
                Severity::Ok => "ok  ",
                Severity::Warn => "WARN",
                Severity::Fail => "FAIL",
            };
            let _ = writeln!(out, "{tag} {}: {}", line.what, line.detail);
        }
        let _ = writeln!(
            out,
            "{} checks: {} ok, {} warnings, {} failed",
            self.lines.len(),
            self.count(Severity::Ok),
            self.warnings(),
            self.failed()
        );
        out
    }
}

#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// Certificates expiring sooner than this are warned about.
    pub warn_days: u64,
    /// Skip connecting to upstreams (e.g. on a build machine).
    pub offline: bool,
    /// Bound on each network check.
    pub timeout: Duration,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            warn_days: 30,
            offline: false,
            timeout: Duration::from_secs(5),
        }
    }
}

/// Checks the certificates in a PEM file: parse, validity, expiry horizon, and (for a chain)
/// that each certificate is issued by the next.
fn check_pem_certificates(
    report: &mut CheckReport,
    what: &str,
    path: &Path,
    chain: bool,
    options: &CheckOptions,
) {
    let label = format!("{what} {}", path.display());
    let certs = match crate::tls::load_certs(path, "certificate") {
        Ok(certs) => certs,
        Err(e) => return report.push(Severity::Fail, label, e.to_string()),
    };
    let now = unix_now();
    let horizon = i64::try_from(options.warn_days.saturating_mul(86_400)).unwrap_or(i64::MAX);
    let mut parsed = Vec::new();
    for (i, der) in certs.iter().enumerate() {
        match x509_parser::parse_x509_certificate(der.as_ref()) {
            Ok((_, cert)) => parsed.push(cert),
            Err(e) => {
                return report.push(
                    Severity::Fail,
                    label,
                    format!("certificate #{} does not parse: {e}", i + 1),
                )
            }
        }
    }
    let mut worst = (Severity::Ok, String::new());
    let mut summaries = Vec::new();
    for cert in &parsed {
        let not_before = cert.validity().not_before.timestamp();
        let not_after = cert.validity().not_after.timestamp();
        let subject = cert.subject().to_string();
        let left = human(not_after - now);
        let (severity, note) = if now < not_before {
            (Severity::Fail, format!("{subject} is not valid yet"))
        } else if now >= not_after {
            (
                Severity::Fail,
                format!("{subject} EXPIRED {} ago", human(now - not_after)),
            )
        } else if not_after - now < horizon {
            (
                Severity::Warn,
                format!("{subject} expires in {left} (< {} days)", options.warn_days),
            )
        } else {
            (Severity::Ok, String::new())
        };
        summaries.push(format!("{subject} (expires in {left})"));
        if severity_rank(severity) > severity_rank(worst.0) {
            worst = (severity, note);
        }
    }
    if chain {
        for pair in parsed.windows(2) {
            if let [child, parent] = pair {
                if child.issuer() != parent.subject() {
                    let note = format!(
                        "chain out of order: {} is not issued by the next certificate {}",
                        child.subject(),
                        parent.subject()
                    );
                    if severity_rank(Severity::Fail) > severity_rank(worst.0) {
                        worst = (Severity::Fail, note);
                    }
                }
            }
        }
    }
    let detail = match worst {
        (Severity::Ok, _) => summaries.join("; "),
        (_, note) => note,
    };
    report.push(worst.0, label, detail);
}

/// "9 days", "5 hours", "42 minutes".
fn human(seconds: i64) -> String {
    match seconds {
        s if s >= 2 * 86_400 => format!("{} days", s / 86_400),
        s if s >= 2 * 3600 => format!("{} hours", s / 3600),
        s => format!("{} minutes", s / 60),
    }
}

fn severity_rank(severity: Severity) -> u8 {
    match severity {
        Severity::Ok => 0,
        Severity::Warn => 1,
        Severity::Fail => 2,
    }
}

/// A serialized `temporal.api.common.v1.Payload` with `data` = the probe text.
fn probe_payload() -> Vec<u8> {
    let data = b"portcullis check probe";
    let mut out = vec![0x12, data.len() as u8];
    out.extend_from_slice(data);
    out
}

/// Seals and opens a probe payload with a key's data key manager.
pub async fn seal_open_probe(manager: &DataKeyManager) -> Result<String, String> {
    let payload = probe_payload();
    let key = manager
        .sealing_key(PROBE_NAMESPACE)
        .await
        .map_err(|e| format!("cannot get a data key: {e}"))?;
    let sealed = key.seal(&payload).map_err(|e| format!("seal: {e}"))?;
    let reference = DataKeyManager::envelope_info(&sealed)
        .ok_or_else(|| "the sealed probe is not an envelope".to_string())?;
    let keys = manager
        .opening_keys(PROBE_NAMESPACE, [reference])
        .await
        .map_err(|e| format!("cannot unwrap the data key: {e}"))?;
    let opened = keys.open(&sealed).map_err(|e| format!("open: {e}"))?;
    if opened != payload {
        return Err("the opened probe differs from what was sealed".into());
    }
    Ok(format!(
        "sealed and opened a probe payload (key-encryption key {})",
        key.kek_id()
    ))
}

pub async fn run(path: &Path, options: &CheckOptions) -> CheckReport {
    let mut report = CheckReport::default();
    let config = match Config::load(path) {
        Ok(config) => {
            report.push(
                Severity::Ok,
                "config",
                format!(
                    "{}: {} upstreams, {} namespaces",
                    path.display(),
                    config.upstreams.len(),
                    config.namespaces.len()
                ),
            );
            config
        }
        Err(e) => {
            report.push(Severity::Fail, "config", e.to_string());
            return report;
        }
    };

    // The schema in force for the checks below (and for the pipeline built at the end).
    match crate::api::install(&config.schema, &config.authorization.method_access) {
        Ok(schema) => {
            report.push(Severity::Ok, "schema", schema.summary());
            if !schema.added_methods.is_empty() {
                report.push(
                    Severity::Ok,
                    "schema",
                    format!(
                        "methods beyond the built-in API: {}",
                        schema.added_methods.join(", ")
                    ),
                );
            }
            if !schema.added_payload_fields.is_empty() {
                report.push(
                    Severity::Ok,
                    "schema",
                    format!(
                        "payload fields beyond the built-in API (sealed): {}",
                        schema.added_payload_fields.join(", ")
                    ),
                );
            }
        }
        Err(e) => report.push(Severity::Fail, "schema", e.to_string()),
    }

    match &config.listener.tls {
        Some(tls) => {
            check_pem_certificates(&mut report, "server certificate", &tls.cert, true, options);
            check_pem_certificates(
                &mut report,
                "client CA bundle",
                &tls.client_ca,
                false,
                options,
            );
            match crate::tls::server_config(tls) {
                Ok(_) => report.push(
                    Severity::Ok,
                    "listener TLS",
                    format!(
                        "certificate and key match; client certificates {}",
                        if tls.require_client_cert {
                            "required"
                        } else {
                            "OPTIONAL"
                        }
                    ),
                ),
                Err(e) => report.push(Severity::Fail, "listener TLS", e.to_string()),
            }
        }
        None => report.push(
            Severity::Ok,
            "listener",
            format!(
                "plaintext on {} (loopback or Unix socket only)",
                config.listener.address
            ),
        ),
    }
    if let Some(admin) = &config.admin {
        report.push(
            Severity::Ok,
            "admin",
            format!("/metrics, /healthz, /readyz on {}", admin.listen),
        );
    }

    if config.authorization.disabled {
        report.push(
            Severity::Warn,
            "authorization",
            "DISABLED: every authenticated caller may call every method",
        );
    } else {
        match config.authorization.compile() {
            Ok(_) => report.push(Severity::Ok, "authorization", "policies compile"),
            Err(e) => report.push(Severity::Fail, "authorization", e.to_string()),
        }
    }

    if let Some(bearer) = &config.bearer {
        match crate::authz::BearerVerifier::new(bearer).await {
            Ok(_) => report.push(
                Severity::Ok,
                "bearer",
                format!("issuer {}: settings and JWKS file load", bearer.issuer),
            ),
            Err(e) => report.push(Severity::Fail, "bearer", e.to_string()),
        }
    }
    if let Some(codec) = &config.codec {
        if let Some(tls) = &codec.tls {
            check_pem_certificates(&mut report, "codec certificate", &tls.cert, true, options);
        }
        match crate::codec::check(codec) {
            Ok(()) => report.push(
                Severity::Ok,
                "codec",
                format!("codec server on {}", codec.address),
            ),
            Err(e) => report.push(Severity::Fail, "codec", format!("{e:#}")),
        }
    }

    if config.encryption.disabled {
        report.push(
            Severity::Warn,
            "encryption",
            "DISABLED: payloads reach the upstream as they are",
        );
    } else {
        let namespace_keys = crate::server::namespace_keys(&config);
        match Encryption::new(
            &config.encryption,
            &namespace_keys,
            config.routing.default_upstream.is_some(),
        )
        .await
        {
            Ok(encryption) => {
                for (name, provider, manager) in encryption.key_providers() {
                    // The seal/open probe opens from the cache: wrap and unwrap through the
                    // provider too, so a key that wraps but cannot unwrap shows here.
                    let probe: Result<String, String> =
                        tokio::time::timeout(options.timeout.saturating_mul(2), async {
                            let sealed = seal_open_probe(&manager).await?;
                            let wrapped = crate::telemetry::readiness::probe_key(
                                provider.as_ref(),
                                options.timeout,
                            )
                            .await?;
                            Ok(format!("{sealed}; {wrapped}"))
                        })
                        .await
                        .unwrap_or_else(|_| Err("the key provider did not answer in time".into()));
                    match probe {
                        Ok(detail) => report.push(Severity::Ok, format!("key {name}"), detail),
                        Err(e) => report.push(Severity::Fail, format!("key {name}"), e),
                    }
                }
            }
            Err(e) => report.push(Severity::Fail, "encryption", e.to_string()),
        }
    }
    if let Some(offload) = config.offload.as_ref().filter(|_| options.offline) {
        report.push(
            Severity::Warn,
            "offload",
            format!("bucket {} not checked (offline)", offload.bucket),
        );
    }
    if let Some(offload) = config.offload.as_ref().filter(|_| !options.offline) {
        let checked = match crate::offload::ObjectStore::new(offload).await {
            Ok(store) => store.check().await,
            Err(e) => Err(e),
        };
        match checked {
            Ok(detail) => report.push(Severity::Ok, "offload", detail),
            Err(e) => report.push(Severity::Fail, "offload", e),
        }
    }

    for (name, upstream) in &config.upstreams {
        let label = format!("upstream {name}");
        if let Some(ca) = upstream.tls.as_ref().and_then(|t| t.ca.as_ref()) {
            check_pem_certificates(
                &mut report,
                &format!("{label} CA bundle"),
                ca,
                false,
                options,
            );
        }
        if let Some(files) = upstream.certificate_files() {
            check_pem_certificates(
                &mut report,
                &format!("{label} client certificate"),
                &files.cert,
                true,
                options,
            );
        }
        if let Some(crate::config::CredentialsConfig::Issued(issued)) = &upstream.credentials {
            check_pem_certificates(
                &mut report,
                &format!("{label} issuing CA"),
                &issued.ca_cert,
                false,
                options,
            );
        }
    }
    // Credentials, TLS settings and templates, set up as the proxy would (an `issued` block
    // issues one certificate), then each upstream contacted as a call would connect.
    match Upstreams::from_config(&config) {
        Err(e) => report.push(Severity::Fail, "upstreams", e.to_string()),
        Ok(upstreams) => {
            for (name, address) in upstreams.addresses() {
                let label = format!("upstream {name}");
                if options.offline {
                    report.push(
                        Severity::Warn,
                        label,
                        format!("{address}: not contacted (--offline)"),
                    );
                    continue;
                }
                match probe_upstream(&upstreams, &name, options.timeout).await {
                    Ok(how) => report.push(Severity::Ok, label, format!("{address}: {how}")),
                    Err(e) => report.push(Severity::Fail, label, format!("{address}: {e}")),
                }
            }
        }
    }

    // Whatever else building the pipeline needs (audit log, routing).
    if report.failed() == 0 {
        match crate::server::build_pipeline(&config).await {
            Ok(_) => report.push(Severity::Ok, "pipeline", "builds"),
            Err(e) => report.push(Severity::Fail, "pipeline", format!("{e:#}")),
        }
    }
    report
}
