//! The `aws-kms` key provider against a real KMS API: `moto_server` from the project venv, on a
//! free loopback port, killed when its handle drops (also when a test panics).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portcullis::crypto::{
    Clock, CryptoError, DataKeyManager, DataKeyPolicy, KeyProvider, ProviderError,
};
use prost::Message;
use temporalio_protos::temporal::api::common::v1::Payload;
mod common;

use common::moto::*;

fn payload(text: &str) -> Vec<u8> {
    Payload {
        metadata: HashMap::from([("encoding".to_owned(), b"json/plain".to_vec())]),
        data: format!("{text:?}").into_bytes(),
        ..Default::default()
    }
    .encode_to_vec()
}

async fn seal_and_open(manager: &DataKeyManager, namespace: &str, text: &str) -> String {
    let original = payload(text);
    let sealed = manager
        .sealing_key(namespace)
        .await
        .expect("sealing key")
        .seal(&original)
        .expect("seal");
    assert!(!String::from_utf8_lossy(&sealed).contains(text));
    let opened = open(manager, namespace, &sealed).await.expect("open");
    assert_eq!(opened, original);
    String::from_utf8_lossy(&Payload::decode(&opened[..]).expect("payload").data).into_owned()
}

async fn open(
    manager: &DataKeyManager,
    namespace: &str,
    sealed: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let refs = DataKeyManager::envelope_info(sealed).expect("a sealed payload");
    manager.opening_keys(namespace, [refs]).await?.open(sealed)
}

#[tokio::test]
async fn generate_unwrap_round_trip_bound_to_namespace() {
    let moto = Moto::start().await;
    let arn = moto.create_key(Some("alias/portcullis-test")).await;
    let provider = moto.provider("alias/portcullis-test").await;

    let material = provider
        .generate_data_key("orders")
        .await
        .expect("generate");
    // The envelope records the key's ARN, not the alias that may move.
    assert_eq!(material.kek_id, arn);
    assert!(material.kek_id.starts_with("arn:aws:kms:us-east-1:"));
    assert!(!material.wrapped.is_empty());
    assert_ne!(*material.plaintext, [0u8; 32]);
    let other = provider
        .generate_data_key("orders")
        .await
        .expect("generate");
    assert_ne!(other.plaintext, material.plaintext);

    let unwrapped = provider
        .unwrap_data_key("orders", &material.kek_id, &material.wrapped)
        .await
        .expect("unwrap");
    assert_eq!(unwrapped, material.plaintext);

    // KMS enforces the encryption context: another namespace is refused for good.
    let err = provider
        .unwrap_data_key("payments", &material.kek_id, &material.wrapped)
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::CannotUnwrap { .. }), "{err}");
    assert!(!err.is_transient());
    assert!(
        err.to_string().contains("InvalidCiphertextException"),
        "{err}"
    );

    // Tampered or truncated wrapped keys, and a key that does not exist: permanent too.
    let mut tampered = material.wrapped.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    for wrapped in [
        tampered,
        material.wrapped[..material.wrapped.len() / 2].to_vec(),
    ] {
        let err = provider
            .unwrap_data_key("orders", &material.kek_id, &wrapped)
            .await
            .unwrap_err();
        assert!(matches!(err, ProviderError::CannotUnwrap { .. }), "{err}");
    }
    let missing = arn.replace(
        arn.rsplit('/').next().expect("key id"),
        "00000000-0000-0000-0000-000000000000",
    );
    let err = provider
        .unwrap_data_key("orders", &missing, &material.wrapped)
        .await
        .unwrap_err();
    assert_eq!(err, ProviderError::UnknownKek(missing));

    // A provider whose key does not exist cannot generate: permanent.
    let err = moto
        .provider("alias/nope")
        .await
        .generate_data_key("orders")
        .await
        .unwrap_err();
    assert_eq!(err, ProviderError::UnknownKek("alias/nope".into()));
}

#[tokio::test]
async fn data_key_manager_seals_and_opens_with_kms() {
    let moto = Moto::start().await;
    let arn = moto.create_key(None).await;
    let provider: Arc<dyn KeyProvider> = Arc::new(moto.provider(&arn).await);

    let manager = DataKeyManager::new(Arc::clone(&provider), DataKeyPolicy::default()).unwrap();
    assert_eq!(
        seal_and_open(&manager, "orders", "hello kms").await,
        "\"hello kms\""
    );
    let sealed = manager
        .sealing_key("orders")
        .await
        .unwrap()
        .seal(&payload("later"))
        .unwrap();

    // Another process (a cold cache) opens it through KMS Decrypt, in the same namespace only.
    let cold = DataKeyManager::new(provider, DataKeyPolicy::default()).unwrap();
    assert_eq!(
        open(&cold, "orders", &sealed).await.unwrap(),
        payload("later")
    );
    let err = open(&cold, "payments", &sealed).await.unwrap_err();
    assert!(matches!(err, CryptoError::CannotOpen { .. }), "{err}");
    assert!(!err.is_transient());
    // Two Decrypt calls: the error was not cached as a key.
    assert_eq!(cold.metrics().snapshot().provider_calls, 2);
}

struct ManualClock {
    start: Instant,
    offset: Mutex<Duration>,
}

impl ManualClock {
    fn new() -> Arc<Self> {
        Arc::new(ManualClock {
            start: Instant::now(),
            offset: Mutex::default(),
        })
    }

    fn advance(&self, by: Duration) {
        *self.offset.lock().unwrap() += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start + *self.offset.lock().unwrap()
    }
}

#[tokio::test]
async fn kms_outage_fails_closed_then_recovers() {
    let mut moto = Moto::start().await;
    let arn = moto.create_key(None).await;
    let provider = Arc::new(moto.provider(&arn).await);
    let clock = ManualClock::new();
    let policy = DataKeyPolicy {
        max_age: Duration::from_secs(600),
        ..DataKeyPolicy::default()
    };
    let manager = DataKeyManager::new(provider.clone(), policy)
        .unwrap()
        .with_clock(clock.clone());
    seal_and_open(&manager, "cached", "before the outage").await;

    moto.stop().await;

    // A direct call fails as transient, and within the timeout (not after TCP's own timeouts).
    let started = Instant::now();
    let err = provider.generate_data_key("cached").await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(
        started.elapsed() < TIMEOUT + Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    // A namespace without a key fails closed: nothing is sealed without KMS.
    let err = manager.sealing_key("fresh").await.unwrap_err();
    assert!(
        matches!(err, CryptoError::ProviderUnavailable { .. }),
        "{err}"
    );
    assert!(err.is_transient());

    // The cached key keeps sealing and opening until it is due for rotation ...
    seal_and_open(&manager, "cached", "during the outage").await;
    clock.advance(Duration::from_secs(601));
    // ... and then sealing fails closed too.
    let err = manager.sealing_key("cached").await.unwrap_err();
    assert!(
        matches!(err, CryptoError::ProviderUnavailable { .. }),
        "{err}"
    );

    // moto back on the same port (its keys were in memory: the old one is gone).
    let moto = Moto::start_on(moto.port).await;
    let err = provider.generate_data_key("cached").await.unwrap_err();
    assert_eq!(err, ProviderError::UnknownKek(arn), "the old key is gone");
    let arn = moto.create_key(None).await;
    let material = moto
        .provider(&arn)
        .await
        .generate_data_key("cached")
        .await
        .expect("generate after the restart");
    assert_eq!(material.kek_id, arn);
}
