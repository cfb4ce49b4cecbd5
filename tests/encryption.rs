//! Nothing readable reaches the upstream: every kind of payload is sealed on the way in and opened
//! on the way out, proven against the Temporal server's own database.

mod common;

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use common::*;

/// How often `needle` occurs in the dev server's database files (the file and any journal).
fn occurrences(db: &Path, needle: &str) -> usize {
    let dir = db.parent().expect("db dir");
    let stem = db
        .file_name()
        .expect("db name")
        .to_string_lossy()
        .into_owned();
    let mut count = 0;
    for entry in std::fs::read_dir(dir).expect("read db dir") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !name.starts_with(&stem) {
            continue;
        }
        // A journal can vanish between listing and reading.
        if let Ok(bytes) = std::fs::read(&path) {
            count += bytes
                .windows(needle.len())
                .filter(|w| *w == needle.as_bytes())
                .count();
        }
    }
    count
}

fn kinds(result: &serde_json::Value, key: &str) -> Vec<String> {
    result[key]
        .as_array()
        .unwrap_or_else(|| panic!("markers.py output lacks {key}: {result}"))
        .iter()
        .map(|k| k.as_str().expect("kind").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_payload_reaches_the_server_in_plaintext() {
    let server = DevServer::start(&[]).await;
    let db = server.dir.path().join("temporal.db");
    let pki = Pki::new();
    let proxy = start_proxy(proxy_config(&pki, &server.address(), &["default"])).await;
    let address = proxy.local_addr().expect("tcp");

    // Through the proxy: every value round-trips, and no marker is stored.
    let sealed_marker = format!("sealed{}", std::process::id());
    let mut args = client_args(address, &pki, &pki.client);
    args.extend(["--marker".into(), sealed_marker.clone()]);
    let through = run_python("markers.py", &args).await;
    let stored = kinds(&through, "stored_kinds");
    assert!(
        stored.len() >= 15,
        "too few payload kinds exercised: {stored:?}"
    );
    for kind in &stored {
        let needle = format!("{sealed_marker}-{kind}");
        assert_eq!(
            occurrences(&db, &needle),
            0,
            "{kind} reached the server in plaintext"
        );
    }
    // The whole marker must not appear anywhere except in search attributes, which the server
    // must be able to index.
    for kind in kinds(&through, "plaintext_kinds") {
        assert!(
            occurrences(&db, &format!("{sealed_marker}-{kind}")) > 0,
            "{kind} should stay plaintext (the server indexes it)"
        );
    }

    // Directly against the server, the same scenario stores every kind in plaintext: the check
    // above can fail.
    let plain_marker = format!("plain{}", std::process::id());
    let direct = run_python(
        "markers.py",
        &[
            "--address".into(),
            server.address(),
            "--marker".into(),
            plain_marker.clone(),
        ],
    )
    .await;
    for kind in kinds(&direct, "stored_kinds") {
        assert!(
            occurrences(&db, &format!("{plain_marker}-{kind}")) > 0,
            "direct run did not store {kind}: the check cannot prove anything for it"
        );
    }

    // Search attributes set through the proxy stay queryable through it.
    let query = format!("CustomKeywordField = \"{sealed_marker}-search-attr\"");
    let (ok, out, err) = temporal_cli(
        address,
        &pki,
        &pki.client,
        &["workflow", "list", "--query", &query, "-o", "json"],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("workflowId") || out.contains("execution"),
        "search attribute query found nothing: {out}"
    );

    // The CLI through the proxy sees plaintext; directly, the server holds binary/encrypted.
    let workflow_id = through["workflow_ids"][0]
        .as_str()
        .expect("workflow id")
        .to_string();
    let (ok, shown, err) = temporal_cli(
        address,
        &pki,
        &pki.client,
        &[
            "workflow",
            "show",
            "--workflow-id",
            &workflow_id,
            "-o",
            "json",
        ],
    );
    assert!(ok, "{err}");
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    assert!(
        !shown.contains(&b64("binary/encrypted")),
        "the proxy handed back sealed payloads: {shown}"
    );
    let output = std::process::Command::new(temporal_binary())
        .args([
            "workflow",
            "show",
            "--workflow-id",
            &workflow_id,
            "-o",
            "json",
            "--address",
            &server.address(),
        ])
        .output()
        .expect("temporal");
    let direct_show = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    assert!(
        direct_show.contains(&b64("binary/encrypted")),
        "the server does not hold binary/encrypted payloads"
    );
    assert!(
        !direct_show.contains(&sealed_marker),
        "plaintext visible directly"
    );
    proxy.shutdown().await;
}
