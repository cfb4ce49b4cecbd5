//! Readiness: a background prober checks, every interval, that each key provider can wrap and
//! unwrap a data key, that every registered certificate is within its validity period, and that
//! every upstream accepts a connection (and a TLS handshake when it is configured for TLS).
//! `/readyz` and `grpc.health.v1.Health/Check` answer from the last round: a probe never runs
//! per request, so a probe storm cannot reach the key provider or the upstreams.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::join_all;
use tokio::sync::watch;

use super::{unix_now, Telemetry};
use crate::crypto::KeyProvider;
use crate::upstream::Upstreams;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckKind {
    Config,
    Key,
    Certificate,
    Upstream,
}

impl CheckKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            CheckKind::Config => "config",
            CheckKind::Key => "key",
            CheckKind::Certificate => "certificate",
            CheckKind::Upstream => "upstream",
        }
    }
}

#[derive(Debug, Clone)]
pub struct CheckResult {
    pub kind: CheckKind,
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone)]
pub struct ReadinessReport {
    pub checked_at: SystemTime,
    pub checks: Vec<CheckResult>,
}

impl ReadinessReport {
    pub fn ready(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    /// One line per check, for `/readyz` and `portcullis check`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            out.push_str(&format!(
                "{} {} {}: {}\n",
                if c.ok { "ok  " } else { "FAIL" },
                c.kind.as_str(),
                c.name,
                c.detail
            ));
        }
        out
    }
}

/// What the prober checks.
#[derive(Clone)]
pub struct ProbeTargets {
    pub keys: Vec<(String, Arc<dyn KeyProvider>)>,
    /// The upstreams in force: each is probed by connecting exactly as a call would (TLS
    /// with the current client certificate, templates at a routed namespace's endpoint).
    pub upstreams: Arc<Upstreams>,
    pub interval: Duration,
    pub timeout: Duration,
}

/// The namespace probes use for key round trips (its data keys are never used for payloads).
pub const PROBE_NAMESPACE: &str = "portcullis-readiness-probe";

/// A data key round trip: generate, unwrap, compare.
pub async fn probe_key(provider: &dyn KeyProvider, timeout: Duration) -> Result<String, String> {
    let round_trip = async {
        let material = provider
            .generate_data_key(PROBE_NAMESPACE)
            .await
            .map_err(|e| format!("generate: {e}"))?;
        let unwrapped = provider
            .unwrap_data_key(PROBE_NAMESPACE, &material.kek_id, &material.wrapped)
            .await
            .map_err(|e| format!("unwrap: {e}"))?;
        if unwrapped[..] != material.plaintext[..] {
            return Err("unwrapped key differs from the generated one".to_string());
        }
        Ok(format!("wrap and unwrap under {}", material.kek_id))
    };
    tokio::time::timeout(timeout, round_trip)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

/// TCP connect, then a TLS handshake where TLS is configured, with the upstream's current
/// client certificate (so an expired or untrusted certificate shows here too).
pub async fn probe_upstream(
    upstreams: &Upstreams,
    name: &str,
    timeout: Duration,
) -> Result<String, String> {
    upstreams.probe(name, timeout).await
}

/// One probe round.
pub async fn probe_once(telemetry: &Telemetry, targets: &ProbeTargets) -> ReadinessReport {
    let mut checks = vec![CheckResult {
        kind: CheckKind::Config,
        name: "config".into(),
        ok: true,
        detail: "loaded".into(),
    }];
    let keys = join_all(targets.keys.iter().map(|(name, provider)| async move {
        let result = probe_key(provider.as_ref(), targets.timeout).await;
        (name.clone(), result)
    }));
    let upstreams = telemetry.upstreams();
    let upstreams = join_all(upstreams.into_iter().map(|(name, address)| async move {
        let result = probe_upstream(&targets.upstreams, &name, targets.timeout).await;
        (name, address, result)
    }));
    let (keys, upstreams) = tokio::join!(keys, upstreams);
    for (name, result) in keys {
        checks.push(CheckResult {
            kind: CheckKind::Key,
            ok: result.is_ok(),
            detail: result.unwrap_or_else(|e| e),
            name,
        });
    }
    let now = unix_now();
    for (name, validity) in telemetry.certificates() {
        let (ok, detail) = match validity {
            Some(v) if v.is_valid_at(now) => (
                true,
                format!("valid, expires in {} s", v.seconds_to_expiry(now)),
            ),
            Some(v) if now < v.not_before => (false, "not valid yet".to_string()),
            Some(v) => (
                false,
                format!("expired {} s ago", -v.seconds_to_expiry(now)),
            ),
            None => (false, "unreadable".to_string()),
        };
        checks.push(CheckResult {
            kind: CheckKind::Certificate,
            name,
            ok,
            detail,
        });
    }
    for (name, address, result) in upstreams {
        checks.push(CheckResult {
            kind: CheckKind::Upstream,
            ok: result.is_ok(),
            detail: match result {
                Ok(how) => format!("{address}: {how}"),
                Err(e) => format!("{address}: {e}"),
            },
            name,
        });
    }
    ReadinessReport {
        checked_at: SystemTime::now(),
        checks,
    }
}

/// Probes now and then every interval until `shutdown` fires; logs changes of readiness.
pub fn spawn_prober(
    telemetry: Arc<Telemetry>,
    targets: ProbeTargets,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut was_ready = None;
        loop {
            let report = probe_once(&telemetry, &targets).await;
            let ready = report.ready();
            if was_ready != Some(ready) {
                if ready {
                    tracing::info!("ready");
                } else {
                    for check in report.checks.iter().filter(|c| !c.ok) {
                        tracing::warn!(
                            check = check.kind.as_str(),
                            name = %check.name,
                            detail = %check.detail,
                            "not ready"
                        );
                    }
                }
                was_ready = Some(ready);
            }
            telemetry.set_readiness(report);
            tokio::select! {
                _ = tokio::time::sleep(targets.interval) => {}
                _ = shutdown.changed() => return,
            }
        }
    })
}
