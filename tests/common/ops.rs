//! Helpers for operations tests: the admin listener (plain HTTP GET), a parsed `/metrics`
//! scrape, and waiting for a condition.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use portcullis::config::{AdminConfig, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Turns on the admin listener on a free port with fast readiness probes.
pub fn with_admin(config: &mut Config) {
    config.admin = Some(AdminConfig {
        listen: "127.0.0.1:0".into(),
        probe_interval_seconds: 1,
        probe_timeout_seconds: 2,
    });
}

/// GET over HTTP/1.1; returns (status, body). Panics if nothing answers.
pub async fn http_get(address: SocketAddr, path: &str) -> (u16, String) {
    try_http_get(address, path)
        .await
        .unwrap_or_else(|e| panic!("GET {path} on {address}: {e}"))
}

pub async fn try_http_get(address: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .map_err(|e| e.to_string())?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .await
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("no HTTP answer: {text:?}"))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no status in {head:?}"))?;
        Ok((status, body.to_string()))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| "no answer within 10 s".to_string())?
}

/// One `/metrics` scrape: every sample by name, with its labels.
#[derive(Debug, Clone)]
pub struct Scrape {
    pub text: String,
    pub samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let mut samples = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("sample line");
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let mut map = BTreeMap::new();
            // Label values here never contain `",`.
            for pair in labels.split("\",").filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once("=\"").expect("label");
                map.insert(k.to_string(), v.trim_end_matches('"').to_string());
            }
            samples.push((name.to_string(), map, value));
        }
        Scrape {
            text: text.to_string(),
            samples,
        }
    }

    /// Sum of the samples of `name` whose labels include all of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    /// The samples of `name` (labels, value).
    pub fn series(&self, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        self.samples
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, l, v)| (l.clone(), *v))
            .collect()
    }

    /// Metric family names declared with `# TYPE`.
    pub fn families(&self) -> Vec<(String, String)> {
        self.text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_once(' '))
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect()
    }
}

pub async fn scrape(admin: SocketAddr) -> Scrape {
    let (status, body) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    Scrape::parse(&body)
}

/// Scrapes until the sum of `name` over the series with `labels` passes `done`; panics with
/// `what` after `limit`. For counters the proxy bumps just after the client sees the outcome.
pub async fn wait_for_metric(
    admin: SocketAddr,
    limit: Duration,
    what: &str,
    (name, labels): (&str, &[(&str, &str)]),
    done: impl Fn(f64) -> bool,
) {
    let done = &done;
    wait_until(limit, what, || async move {
        done(scrape(admin).await.sum(name, labels))
    })
    .await;
}

/// Polls `check` until it returns true; panics with `what` after `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn readyz(admin: SocketAddr) -> (u16, String) {
    http_get(admin, "/readyz").await
}
