//! The `pkcs11` key provider against real PKCS#11 tokens (SoftHSM, in temp dirs), through the
//! proxy with the real Temporal dev server and the Python SDK.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::softhsm::Token;
use common::*;
use portcullis::config::Config;
use portcullis::crypto::config::KeyConfig;
use portcullis::crypto::pkcs11::{Pkcs11Error, Pkcs11Provider, WrapMechanism};
use portcullis::crypto::{CryptoError, DataKeyManager, DataKeyPolicy, KeyProvider, ProviderError};
use prost::Message;
use temporalio_protos::temporal::api::common::v1::Payload;

const KEK1: &str = "pkcs11:object=kek;id=%00%00%00%01";
const KEK2: &str = "pkcs11:object=kek;id=%00%00%00%02";

fn payload(text: &str) -> Vec<u8> {
    Payload {
        metadata: HashMap::from([("encoding".to_owned(), b"json/plain".to_vec())]),
        data: format!("{text:?}").into_bytes(),
        ..Default::default()
    }
    .encode_to_vec()
}

/// A proxy config whose default key is `hsm` on `token` (keys labelled "kek").
fn hsm_config(pki: &Pki, upstream: &str, token: &Token) -> Config {
    let mut config = proxy_config(pki, upstream, &["default"]);
    config
        .encryption
        .keys
        .insert("hsm".into(), KeyConfig::Pkcs11(token.config("kek")));
    config.encryption.default_key = Some("hsm".into());
    config
}

fn write_config(token: &Token, config: &Config) -> String {
    let path = token.dir.path().join("portcullis.toml");
    std::fs::write(&path, config.to_toml()).expect("write config");
    path.display().to_string()
}

/// `portcullis keys pkcs11-create`; returns the key id it printed.
fn create_key(token: &Token, config_path: &str) -> String {
    let out = token.portcullis(&["keys", "pkcs11-create", "--config", config_path]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pkcs11-create: {out:?}");
    stdout
        .trim()
        .rsplit(' ')
        .next()
        .expect("a key id")
        .to_string()
}

/// `portcullis keys pkcs11-list`: (label, id hex, extractable, sensitive, primary) per key.
fn list_keys(token: &Token, config_path: &str) -> Vec<(String, String, String, String, bool)> {
    let out = token.portcullis(&["keys", "pkcs11-list", "--config", config_path]);
    assert!(out.status.success(), "pkcs11-list: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            (
                cols[0].to_string(),
                cols[1].to_string(),
                cols[5].to_string(),
                cols[4].to_string(),
                line.ends_with("(primary: seals)"),
            )
        })
        .collect()
}

/// Retries until the provider reaches the token (a token created after the module was
/// initialized in this process shows after the provider re-initializes it).
async fn ready(provider: &Pkcs11Provider) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match provider.generate_data_key("warm-up").await {
            Ok(_) => return,
            Err(e) if Instant::now() < deadline => {
                assert!(e.is_transient(), "{e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the token never became usable: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wraps_inside_the_token_bound_to_the_namespace() {
    let token = Token::new("unit").await;
    let pki = Pki::new();
    let config = hsm_config(&pki, "127.0.0.1:1", &token);
    let config_path = write_config(&token, &config);

    // Tooling: create the key-encryption key; it is sensitive and not extractable.
    assert_eq!(create_key(&token, &config_path), KEK1);
    let keys = list_keys(&token, &config_path);
    assert_eq!(
        keys,
        vec![(
            "kek".to_string(),
            "00000001".to_string(),
            "no".to_string(),
            "yes".to_string(),
            true
        )]
    );

    for mechanism in [WrapMechanism::AesGcm, WrapMechanism::AesKeyWrapPad] {
        let mut p11 = token.config("kek");
        p11.mechanism = mechanism;
        let provider = Pkcs11Provider::new(&p11).await.expect("provider");
        ready(&provider).await;
        let material = provider.generate_data_key("orders").await.expect("wrap");
        assert_eq!(material.kek_id, KEK1);
        let format = match mechanism {
            WrapMechanism::AesGcm => 1,
            WrapMechanism::AesKeyWrapPad => 2,
        };
        assert_eq!(material.wrapped[0], format, "{mechanism:?}");
        assert_ne!(*material.plaintext, [0u8; 32]);
        let again = provider.generate_data_key("orders").await.expect("wrap");
        assert_ne!(again.plaintext, material.plaintext);
        let unwrapped = provider
            .unwrap_data_key("orders", KEK1, &material.wrapped)
            .await
            .expect("unwrap");
        assert_eq!(unwrapped, material.plaintext);

        // Another namespace, a tampered or truncated key: refused for good.
        let mut tampered = material.wrapped.clone();
        *tampered.last_mut().expect("bytes") ^= 1;
        for (namespace, wrapped) in [
            ("payments", material.wrapped.clone()),
            ("orders", tampered),
            ("orders", material.wrapped[..20].to_vec()),
        ] {
            let err = provider
                .unwrap_data_key(namespace, KEK1, &wrapped)
                .await
                .expect_err("must not unwrap");
            assert!(
                matches!(&err, ProviderError::CannotUnwrap { kek_id, .. } if kek_id == KEK1),
                "{mechanism:?} {namespace}: {err}"
            );
        }
        // Keys this provider may not use, or that are not on the token.
        for kek in [
            "pkcs11:object=kek;id=%00%00%00%09",
            "pkcs11:object=other;id=%00%00%00%01",
            "arn:aws:kms:us-east-1:1:key/x",
        ] {
            let err = provider
                .unwrap_data_key("orders", kek, &material.wrapped)
                .await
                .expect_err("unknown key");
            assert_eq!(err, ProviderError::UnknownKek(kek.into()), "{mechanism:?}");
        }
    }

    // Either mechanism opens what the other wrapped (the format is recorded).
    let gcm = Pkcs11Provider::new(&token.config("kek"))
        .await
        .expect("provider");
    let mut kwp_config = token.config("kek");
    kwp_config.mechanism = WrapMechanism::AesKeyWrapPad;
    let kwp = Pkcs11Provider::new(&kwp_config).await.expect("provider");
    let wrapped = kwp.generate_data_key("orders").await.expect("wrap");
    assert_eq!(
        gcm.unwrap_data_key("orders", KEK1, &wrapped.wrapped)
            .await
            .expect("unwrap"),
        wrapped.plaintext
    );

    // Through the data key manager: concurrent opens of one key share one unwrap, concurrent
    // seals for many namespaces share a pool of two sessions.
    let mut small = token.config("kek");
    small.max_sessions = 2;
    let provider: Arc<dyn KeyProvider> =
        Arc::new(Pkcs11Provider::new(&small).await.expect("provider"));
    let sealer = DataKeyManager::new(provider.clone(), DataKeyPolicy::default()).expect("manager");
    let sealed = sealer
        .sealing_key("orders")
        .await
        .expect("sealing key")
        .seal(&payload("hello hsm"))
        .expect("seal");
    let cold =
        Arc::new(DataKeyManager::new(provider.clone(), DataKeyPolicy::default()).expect("manager"));
    let reference = DataKeyManager::envelope_info(&sealed).expect("envelope");
    let opens = (0..16).map(|_| {
        let (cold, reference, sealed) = (cold.clone(), reference.clone(), sealed.clone());
        tokio::spawn(async move {
            cold.opening_keys("orders", [reference])
                .await?
                .open(&sealed)
        })
    });
    for opened in futures_util::future::join_all(opens).await {
        assert_eq!(opened.expect("task").expect("open"), payload("hello hsm"));
    }
    assert_eq!(
        cold.metrics().snapshot().provider_calls,
        1,
        "one shared unwrap"
    );
    let err = cold
        .opening_keys("payments", [reference])
        .await
        .expect_err("another namespace");
    assert!(matches!(err, CryptoError::CannotOpen { .. }), "{err}");
    let seals = (0..12).map(|i| {
        let sealer =
            DataKeyManager::new(provider.clone(), DataKeyPolicy::default()).expect("manager");
        tokio::spawn(async move {
            sealer
                .sealing_key(&format!("ns{i}"))
                .await
                .map(|k| k.kek_id().to_string())
        })
    });
    for kek in futures_util::future::join_all(seals).await {
        assert_eq!(kek.expect("task").expect("sealing key"), KEK1);
    }

    // A module that does not load refuses the start, with the path; so does a missing PIN.
    let mut missing = token.config("kek");
    missing.module = "/nonexistent/libpkcs11-missing.so".into();
    let err = Pkcs11Provider::new(&missing).await.expect_err("no module");
    assert!(matches!(err, Pkcs11Error::Module { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("/nonexistent/libpkcs11-missing.so"),
        "{err}"
    );
    let mut no_pin = token.config("kek");
    no_pin.pin_file = None;
    no_pin.pin_env = Some("PORTCULLIS_TEST_PIN_THAT_IS_NOT_SET".into());
    let err = Pkcs11Provider::new(&no_pin).await.expect_err("no PIN");
    assert!(matches!(err, Pkcs11Error::Pin(_)), "{err}");

    // `portcullis check` wraps and unwraps through the token.
    let out = token.portcullis(&["check", "--offline", "--config", &config_path]);
    let report = String::from_utf8_lossy(&out.stdout);
    let line = report
        .lines()
        .find(|l| l.contains("key hsm"))
        .unwrap_or_else(|| panic!("no key check: {report}"));
    assert!(
        line.contains("wrap and unwrap under") && line.contains(KEK1),
        "{report}"
    );

    // A wrong PIN is refused (in its own process: this one is logged in already), and the
    // refusal is permanent, not an outage.
    std::fs::write(&token.pin_file, "999999\n").expect("pin");
    let out = token.portcullis(&["keys", "pkcs11-list", "--config", &config_path]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("rejected the PIN"), "{stderr}");
}

/// The key-encryption key ids of every sealed payload in a workflow's history, as stored.
async fn stored_keks(server: &DevServer, workflow_id: &str) -> Vec<String> {
    use portcullis::payload::walker::{self, PayloadIndex, WalkOptions};
    let mut client = server.direct_client().await;
    let history = client
        .get_workflow_execution_history(wf::GetWorkflowExecutionHistoryRequest {
            namespace: "default".into(),
            execution: Some(
                temporalio_protos::protos::temporal::api::common::v1::WorkflowExecution {
                    workflow_id: workflow_id.into(),
                    run_id: String::new(),
                },
            ),
            ..Default::default()
        })
        .await
        .expect("history")
        .into_inner()
        .encode_to_vec();
    let mut keks = Vec::new();
    let mut collect = |_: &walker::PayloadContext<'_>, payload: &[u8]| {
        let reference = portcullis::crypto::envelope_info(payload);
        assert!(reference.is_some(), "a stored payload is not sealed");
        if let Some(r) = reference {
            keks.push(r.kek_id);
        }
        Ok(None)
    };
    walker::rewrite_named(
        PayloadIndex::global(),
        "temporal.api.workflowservice.v1.GetWorkflowExecutionHistoryResponse",
        &history,
        &mut collect,
        &WalkOptions::default(),
    )
    .expect("walk history");
    assert!(!keks.is_empty(), "no payloads in {workflow_id}");
    keks
}

fn b64(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// `temporal workflow show` through a proxy: (ok, stdout, stderr).
fn show(address: std::net::SocketAddr, pki: &Pki, workflow_id: &str) -> (bool, String, String) {
    temporal_cli(
        address,
        pki,
        &pki.client,
        &[
            "workflow",
            "show",
            "--workflow-id",
            workflow_id,
            "-o",
            "json",
        ],
    )
}

async fn wait_ready(admin: std::net::SocketAddr) {
    common::ops::wait_until(Duration::from_secs(20), "proxy ready", || async move {
        common::ops::readyz(admin).await.0 == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_workflows_seal_in_the_token_across_replicas_and_rotation() {
    let token = Token::new("replicas").await;
    let server = DevServer::start(&[]).await;
    let db = server.dir.path().join("temporal.db");
    let pki = Pki::new();
    let mut config = hsm_config(&pki, &server.address(), &token);
    common::ops::with_admin(&mut config);
    let config_path = write_config(&token, &config);
    assert_eq!(create_key(&token, &config_path), KEK1);

    let proxy = start_proxy(config.clone()).await;
    let address = proxy.local_addr().expect("tcp");
    let admin = proxy.admin_addr().expect("admin");
    wait_ready(admin).await;

    // A Python SDK workflow (worker and client) through the proxy: sealed under the token key.
    let first = run_python("scenario.py", &client_args(address, &pki, &pki.client)).await;
    let first_id = first["workflow_id"].as_str().expect("id").to_string();
    let keks = stored_keks(&server, &first_id).await;
    assert!(keks.iter().all(|k| k == KEK1), "{keks:?}");

    // Every kind of payload, while the key rotates on the token mid-run: the SDK reads back
    // what was sealed before the rotation after it.
    let marker = format!("hsm{}", std::process::id());
    let mut args = client_args(address, &pki, &pki.client);
    args.extend(["--marker".into(), marker.clone()]);
    let markers = tokio::spawn(async move { run_python("markers.py", &args).await });
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(create_key(&token, &config_path), KEK2);
    let rotated_at = Instant::now();
    let through = markers.await.expect("markers task");
    let stored: Vec<String> = through["stored_kinds"]
        .as_array()
        .expect("stored_kinds")
        .iter()
        .map(|k| k.as_str().expect("kind").to_string())
        .collect();
    assert!(stored.len() >= 15, "too few payload kinds: {stored:?}");
    for kind in &stored {
        assert_eq!(
            occurrences(&db, &format!("{marker}-{kind}")),
            0,
            "{kind} reached the server in plaintext"
        );
    }

    // After the rotation check (1 s here), new payloads are sealed under the new key only.
    let wait = Duration::from_secs(3).saturating_sub(rotated_at.elapsed());
    tokio::time::sleep(wait).await;
    let second = run_python("scenario.py", &client_args(address, &pki, &pki.client)).await;
    let second_id = second["workflow_id"].as_str().expect("id").to_string();
    let keks = stored_keks(&server, &second_id).await;
    assert!(
        keks.iter().all(|k| k == KEK2),
        "sealed after the rotation: {keks:?}"
    );

    // Both keys are on the token, neither extractable; the newer one seals.
    let keys = list_keys(&token, &config_path);
    assert_eq!(keys.len(), 2, "{keys:?}");
    for (label, _, extractable, sensitive, _) in &keys {
        assert_eq!(
            (label.as_str(), extractable.as_str(), sensitive.as_str()),
            ("kek", "no", "yes")
        );
    }
    assert!(keys[1].4 && !keys[0].4, "{keys:?}");

    // A second replica with the same token (cold caches) opens what the first sealed, under
    // either key.
    let mut replica_config = config.clone();
    replica_config.admin = None;
    let replica = start_proxy(replica_config).await;
    let replica_address = replica.local_addr().expect("tcp");
    for id in [&first_id, &second_id] {
        let (ok, shown, err) = show(replica_address, &pki, id);
        assert!(ok, "{err}");
        assert!(!shown.contains(&b64("binary/encrypted")), "{shown}");
        assert!(shown.contains(&b64("\"Portcullis\"")), "{shown}");
    }

    // Metrics as for the other providers.
    let scrape = common::ops::scrape(admin).await;
    assert!(
        scrape.sum("portcullis_key_provider_calls_total", &[("key", "hsm")]) >= 2.0,
        "{}",
        scrape.text
    );
    assert!(
        scrape.sum(
            "portcullis_key_provider_duration_seconds_count",
            &[("key", "hsm")]
        ) >= 2.0,
        "{}",
        scrape.text
    );
    replica.shutdown().await;
    proxy.shutdown().await;
}

fn history_request(workflow_id: &str) -> wf::GetWorkflowExecutionHistoryRequest {
    wf::GetWorkflowExecutionHistoryRequest {
        namespace: "default".into(),
        execution: Some(
            temporalio_protos::protos::temporal::api::common::v1::WorkflowExecution {
                workflow_id: workflow_id.into(),
                run_id: String::new(),
            },
        ),
        ..Default::default()
    }
}

fn start_request(workflow_id: &str, text: &str) -> wf::StartWorkflowExecutionRequest {
    use temporalio_protos::protos::temporal::api::common::v1::{Payload, Payloads, WorkflowType};
    use temporalio_protos::protos::temporal::api::taskqueue::v1::TaskQueue;
    wf::StartWorkflowExecutionRequest {
        namespace: "default".into(),
        workflow_id: workflow_id.into(),
        workflow_type: Some(WorkflowType {
            name: "HsmWorkflow".into(),
        }),
        task_queue: Some(TaskQueue {
            name: "hsm-queue".into(),
            ..Default::default()
        }),
        input: Some(Payloads {
            payloads: vec![Payload {
                metadata: [("encoding".to_string(), b"json/plain".to_vec())].into(),
                data: format!("\"{text}\"").into_bytes(),
                ..Default::default()
            }],
        }),
        request_id: format!("req-{workflow_id}"),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_goes_away_fails_closed_and_recovers_without_restart() {
    let token = Token::new("outage").await;
    let server = DevServer::start(&[]).await;
    let db = server.dir.path().join("temporal.db");
    let pki = Pki::new();
    let mut config = hsm_config(&pki, &server.address(), &token);
    // Every request needs a new data key from the token, so an outage shows at once.
    config.encryption.data_key_max_seals = 1;
    common::ops::with_admin(&mut config);
    let config_path = write_config(&token, &config);
    assert_eq!(create_key(&token, &config_path), KEK1);
    let proxy = start_proxy(config.clone()).await;
    let address = proxy.local_addr().expect("tcp");
    let admin = proxy.admin_addr().expect("admin");
    wait_ready(admin).await;
    // A second replica whose caches stay cold: it must unwrap through the token.
    let mut replica_config = config.clone();
    replica_config.admin = None;
    let replica = start_proxy(replica_config).await;
    let replica_address = replica.local_addr().expect("tcp");

    let mut client = workflow_client(address, &pki, &pki.client).await;
    let tag = std::process::id();
    client
        .start_workflow_execution(start_request("hsm-before", &format!("hsm-before-{tag}")))
        .await
        .expect("start with the token present");

    // The token's files go away.
    token.remove();
    let during = format!("hsm-during-{tag}");
    let started = Instant::now();
    let status = client
        .start_workflow_execution(start_request("hsm-during", &during))
        .await
        .expect_err("no data key without the token");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("key provider"),
        "unclear message: {status:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // Nothing was forwarded: no workflow, no plaintext.
    assert_eq!(occurrences(&db, &during), 0);
    let mut direct = server.direct_client().await;
    let missing = direct
        .describe_workflow_execution(wf::DescribeWorkflowExecutionRequest {
            namespace: "default".into(),
            execution: Some(
                temporalio_protos::protos::temporal::api::common::v1::WorkflowExecution {
                    workflow_id: "hsm-during".into(),
                    run_id: String::new(),
                },
            ),
        })
        .await
        .expect_err("the refused workflow must not exist");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    // Opening needs an unwrap the token cannot give: refused too, not handed back sealed.
    let mut replica_client = workflow_client(replica_address, &pki, &pki.client).await;
    let status = replica_client
        .get_workflow_execution_history(history_request("hsm-before"))
        .await
        .expect_err("opened without the token");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("key provider"), "{status:?}");
    // Readiness says so.
    common::ops::wait_until(
        Duration::from_secs(15),
        "not ready without the token",
        || async move {
            let (status, body) = common::ops::readyz(admin).await;
            status == 503 && body.contains("FAIL key hsm")
        },
    )
    .await;

    // The token comes back: calls succeed again without a restart.
    token.restore();
    let after = format!("hsm-after-{tag}");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match client
            .start_workflow_execution(start_request("hsm-after", &after))
            .await
        {
            Ok(_) => break,
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                assert!(Instant::now() < deadline, "no recovery: {status:?}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
    wait_ready(admin).await;
    let (ok, shown, err) = show(replica_address, &pki, "hsm-before");
    assert!(ok, "{err}");
    assert!(
        shown.contains(&b64(&format!("\"hsm-before-{tag}\""))),
        "{shown}"
    );
    assert_eq!(occurrences(&db, &format!("hsm-before-{tag}")), 0);
    assert_eq!(occurrences(&db, &after), 0);
    replica.shutdown().await;
    proxy.shutdown().await;
}
