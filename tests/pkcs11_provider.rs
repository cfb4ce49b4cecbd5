//! The `pkcs11` key provider against real PKCS#11 tokens (SoftHSM, in temp dirs), through the
//! proxy with the real Temporal dev server and the Python SDK.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::softhsm::Token;
use common::*;
use portcullis::config::Config;
use portcullis::crypto::config::KeyConfig;
use portcullis::crypto::pkcs11::{Pkcs11Config, Pkcs11Error, Pkcs11Provider, WrapMechanism};
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
    let gcm = Pkcs11Provider::new(&token.config("kek")).await.expect("provider");
    let mut kwp_config = token.config("kek");
    kwp_config.mechanism = WrapMechanism::AesKeyWrapPad;
    let kwp = Pkcs11Provider::new(&kwp_config).await.expect("provider");
    let wrapped = kwp.generate_data_key("orders").await.expect("wrap");
    assert_eq!(
        gcm.unwrap_data_key("orders", KEK1, &wrapped.wrapped).await.expect("unwrap"),
        wrapped.plaintext
    );

    // Through the data key manager: concurrent opens of one key share one unwrap, concurrent
    // seals for many namespaces share a pool of two sessions.
    let mut small = token.config("kek");
    small.max_sessions = 2;
    let provider: Arc<dyn KeyProvider> = Arc::new(Pkcs11Provider::new(&small).await.expect("provider"));
    let sealer = DataKeyManager::new(provider.clone(), DataKeyPolicy::default()).expect("manager");
    let sealed = sealer
        .sealing_key("orders")
        .await
        .expect("sealing key")
        .seal(&payload("hello hsm"))
        .expect("seal");
    let cold = Arc::new(DataKeyManager::new(provider.clone(), DataKeyPolicy::default()).expect("manager"));
    let reference = DataKeyManager::envelope_info(&sealed).expect("envelope");
    let opens = (0..16).map(|_| {
        let (cold, reference, sealed) = (cold.clone(), reference.clone(), sealed.clone());
        tokio::spawn(async move { cold.opening_keys("orders", [reference]).await?.open(&sealed) })
    });
    for opened in futures_util::future::join_all(opens).await {
        assert_eq!(opened.expect("task").expect("open"), payload("hello hsm"));
    }
    assert_eq!(cold.metrics().snapshot().provider_calls, 1, "one shared unwrap");
    let err = cold
        .opening_keys("payments", [reference])
        .await
        .expect_err("another namespace");
    assert!(matches!(err, CryptoError::CannotOpen { .. }), "{err}");
    let seals = (0..12).map(|i| {
        let sealer = DataKeyManager::new(provider.clone(), DataKeyPolicy::default()).expect("manager");
        tokio::spawn(async move { sealer.sealing_key(&format!("ns{i}")).await.map(|k| k.kek_id().to_string()) })
    });
    for kek in futures_util::future::join_all(seals).await {
        assert_eq!(kek.expect("task").expect("sealing key"), KEK1);
    }

    // A module that does not load refuses the start, with the path; so does a missing PIN.
    let mut missing = token.config("kek");
    missing.module = "/nonexistent/libpkcs11-missing.so".into();
    let err = Pkcs11Provider::new(&missing).await.expect_err("no module");
    assert!(matches!(err, Pkcs11Error::Module { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/libpkcs11-missing.so"), "{err}");
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

