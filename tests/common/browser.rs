//! Headless Chromium (Debian's, at /usr/bin/chromium) driven by playwright-core from
//! tests/clients/ts: open a Web UI page, wait for text, keep a screenshot under
//! target/test-artifacts/.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use super::{repo_root, run_with_timeout};

pub const CHROMIUM: &str = "/usr/bin/chromium";

/// Where screenshots are kept after the test run.
pub fn artifact(name: &str) -> PathBuf {
    let dir = repo_root().join("target/test-artifacts");
    std::fs::create_dir_all(&dir).expect("create target/test-artifacts");
    dir.join(name)
}

pub struct PageRequest<'a> {
    pub url: &'a str,
    /// Wait until this text is on the page (found = whether it appeared).
    pub expect: Option<&'a str>,
    /// Wait until this text is on the page before judging.
    pub wait_for: Option<&'a str>,
    /// Then click the first element showing exactly this text (navigating inside the app).
    pub click: Option<&'a str>,
    /// Record responses whose URL starts with this (the codec server).
    pub codec: Option<&'a str>,
    /// Sent with every request the page makes (e.g. a bearer token).
    pub authorization: Option<&'a str>,
    pub screenshot: Option<PathBuf>,
    pub timeout: Duration,
}

/// Opens the page; returns the script's JSON (`found`, `codec`: [{url, method, status}], `text`).
pub async fn open_page(request: &PageRequest<'_>) -> Value {
    assert!(
        std::path::Path::new(CHROMIUM).is_file(),
        "Chromium is missing at {CHROMIUM}: run `bash scripts/setup.sh` (APT_PACKAGES has chromium)"
    );
    let script = repo_root().join("tests/clients/ts/ui_page.mjs");
    assert!(
        repo_root()
            .join("tests/clients/ts/node_modules/playwright-core")
            .is_dir(),
        "playwright-core is missing: run `bash scripts/setup.sh`"
    );
    let mut command = tokio::process::Command::new("node");
    command
        .arg(&script)
        .args(["--url", request.url])
        .args(["--timeout", &request.timeout.as_millis().to_string()])
        .args(["--chromium", CHROMIUM]);
    for (flag, value) in [
        ("--expect", request.expect),
        ("--wait-for", request.wait_for),
        ("--click", request.click),
        ("--codec", request.codec),
        ("--authorization", request.authorization),
    ] {
        if let Some(value) = value {
            command.args([flag, value]);
        }
    }
    if let Some(path) = &request.screenshot {
        command.arg("--screenshot").arg(path);
    }
    let output = run_with_timeout(command, request.timeout * 3 + Duration::from_secs(30)).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .unwrap_or_else(|| {
            panic!("ui_page.mjs printed no JSON.\nstdout:\n{stdout}\nstderr:\n{stderr}")
        })
}
