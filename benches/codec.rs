//! Codec server decode cost: end to end over HTTP/1.1 on loopback (one keep-alive connection,
//! and 4 concurrent ones), next to the same work in process (proto3-JSON parse, open, render),
//! for a few batch shapes.
//!
//! `cargo bench --bench codec`

use std::sync::Arc;
use std::time::Instant;

use base64::Engine as _;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use portcullis::codec::{json, CodecOptions};
use portcullis::config::Config;
use portcullis::proxy::Encryption;
use portcullis::server::StartOptions;

const SHAPES: [(&str, usize, usize, usize); 4] = [
    // label, payloads per request, bytes per payload, requests
    ("1 x 100B", 1, 100, 3000),
    ("10 x 1KiB", 10, 1024, 2000),
    ("100 x 1KiB", 100, 1024, 300),
    ("1 x 1MiB", 1, 1024 * 1024, 40),
];

fn config(dir: &std::path::Path) -> Config {
    let keyring = dir.join("keyring.toml");
    portcullis::crypto::Keyring::init(&keyring).expect("keyring");
    Config::from_toml(&format!(
        r#"
[listener]
address = "127.0.0.1:0"
plaintext = true
[upstreams.none]
address = "127.0.0.1:1"
[routing]
system_upstream = "none"
[[namespaces]]
name = "default"
upstream = "none"
[authorization]
audit_log = "off"
[encryption]
default_key = "local"
keys.local = {{ provider = "local", keyring = "{}" }}
[codec]
address = "127.0.0.1:0"
plaintext = true
max_request_bytes = 16777216
"#,
        keyring.display()
    ))
    .expect("config")
}

fn body(count: usize, size: usize) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let data: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
    let payload = serde_json::json!({
        "metadata": {"encoding": b64.encode("json/plain")},
        "data": b64.encode(&data),
    });
    serde_json::json!({"payloads": vec![payload; count]})
        .to_string()
        .into_bytes()
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

async fn decode(client: &HttpClient, url: &str, body: &Bytes) -> usize {
    let request = http::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(body.clone()))
        .expect("request");
    let response = client.request(request).await.expect("call");
    assert_eq!(response.status(), 200);
    response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
        .len()
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

async fn run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path());
    let sealer = Arc::new(
        Encryption::new(
            &config.encryption,
            &[portcullis::proxy::NamespaceKey::new("default", None)],
            false,
        )
        .await
        .expect("encryption"),
    );
    // The anonymous dev reader spares the benchmark a token per request; auth is not measured.
    let proxy = portcullis::server::start_with(
        config,
        StartOptions {
            codec: CodecOptions {
                dev_anonymous_reader: true,
            },
        },
    )
    .await
    .expect("start");
    let url = format!(
        "http://{}/default/decode",
        proxy.codec_addr().expect("codec")
    );
    let client: HttpClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();

    println!(
        "{:<12} {:>8} {:>8} {:>8} {:>11} {:>11} {:>13} {:>9} {:>8} {:>9}",
        "shape",
        "p50 us",
        "p99 us",
        "req/s",
        "req/s (c=4)",
        "MiB/s (c=4)",
        "in-process us",
        "parse us",
        "open us",
        "render us"
    );
    for (label, count, size, requests) in SHAPES {
        // Seal the batch once, as the proxy would have.
        let (plain, _) = json::parse(&body(count, size), usize::MAX).expect("parse");
        let sealed = sealer
            .seal("default", &[], json::PAYLOADS, &Bytes::from(plain))
            .await
            .expect("seal")
            .expect("sealed");
        let request_body = Bytes::from(json::render(&sealed).expect("render"));

        // Warm up (data key into the cache, connection open).
        for _ in 0..5 {
            decode(&client, &url, &request_body).await;
        }
        let mut histogram = Histogram::<u64>::new(3).expect("histogram");
        let started = Instant::now();
        for _ in 0..requests {
            let t = Instant::now();
            decode(&client, &url, &request_body).await;
            histogram
                .record(t.elapsed().as_micros() as u64)
                .expect("record");
        }
        let sequential = requests as f64 / started.elapsed().as_secs_f64();

        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let (client, url, request_body) = (client.clone(), url.clone(), request_body.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..requests / 4 {
                    decode(&client, &url, &request_body).await;
                }
            }));
        }
        for task in tasks {
            task.await.expect("task");
        }
        let elapsed = started.elapsed().as_secs_f64();
        let concurrent = (requests / 4 * 4) as f64 / elapsed;
        let mib = concurrent * (count * size) as f64 / (1024.0 * 1024.0);

        // The same work without HTTP: parse, open, render, each timed.
        let rounds = requests.min(500);
        let (mut parse, mut open, mut render) = Default::default();
        for _ in 0..rounds {
            let t = Instant::now();
            let (encoded, _) = json::parse(&request_body, usize::MAX).expect("parse");
            parse += t.elapsed();
            let t = Instant::now();
            let opened = sealer
                .open("default", json::PAYLOADS, &Bytes::from(encoded))
                .await
                .expect("open")
                .message
                .expect("opened");
            open += t.elapsed();
            let t = Instant::now();
            json::render(&opened).expect("render");
            render += t.elapsed();
        }
        let per = |d: std::time::Duration| (d / rounds as u32).as_micros();

        println!(
            "{:<12} {:>8} {:>8} {:>8.0} {:>11.0} {:>11.1} {:>13} {:>9} {:>8} {:>9}",
            label,
            histogram.value_at_quantile(0.5),
            histogram.value_at_quantile(0.99),
            sequential,
            concurrent,
            mib,
            per(parse + open + render),
            per(parse),
            per(open),
            per(render),
        );
    }
    proxy.shutdown().await;
}
