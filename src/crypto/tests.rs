//! Tests of the whole module: manager, provider and envelope together.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use proptest::prelude::*;
use prost::Message;
use temporalio_protos::temporal::api::common::v1::payload::ExternalPayloadDetails;
use temporalio_protos::temporal::api::common::v1::Payload;
use zeroize::Zeroizing;

use super::*;

/// The local provider, with a switch to take it down and counters of calls.
struct TestProvider {
    inner: LocalKeyProvider,
    down: AtomicBool,
    generate_calls: AtomicU64,
    unwrap_calls: AtomicU64,
    delay: Duration,
}

impl TestProvider {
    fn new() -> Arc<Self> {
        Self::with_delay(Duration::ZERO)
    }

    fn with_delay(delay: Duration) -> Arc<Self> {
        Arc::new(TestProvider {
            inner: LocalKeyProvider::new(&Keyring::generate()),
            down: AtomicBool::new(false),
            generate_calls: AtomicU64::new(0),
            unwrap_calls: AtomicU64::new(0),
            delay,
        })
    }

    fn generated(&self) -> u64 {
        self.generate_calls.load(Ordering::SeqCst)
    }

    fn unwrapped(&self) -> u64 {
        self.unwrap_calls.load(Ordering::SeqCst)
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
}

#[async_trait]
impl KeyProvider for TestProvider {
    async fn generate_data_key(&self, namespace: &str) -> Result<DataKeyMaterial, ProviderError> {
        self.generate_calls.fetch_add(1, Ordering::SeqCst);
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(ProviderError::Unavailable("test outage".into()));
        }
        self.inner.generate_data_key(namespace).await
    }

    async fn unwrap_data_key(
        &self,
        namespace: &str,
        kek_id: &str,
        wrapped: &[u8],
    ) -> Result<Zeroizing<[u8; 32]>, ProviderError> {
        self.unwrap_calls.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(ProviderError::Unavailable("test outage".into()));
        }
        self.inner.unwrap_data_key(namespace, kek_id, wrapped).await
    }
}

struct ManualClock {
    start: Instant,
    offset: Mutex<Duration>,
}

impl ManualClock {
    fn new() -> Arc<Self> {
        Arc::new(ManualClock {
            start: Instant::now(),
            offset: Mutex::new(Duration::ZERO),
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

fn manager(provider: &Arc<TestProvider>, policy: DataKeyPolicy) -> DataKeyManager {
    DataKeyManager::new(Arc::clone(provider) as Arc<dyn KeyProvider>, policy).unwrap()
}

fn payload(data: &[u8]) -> Vec<u8> {
    let mut payload = Payload::default();
    payload
        .metadata
        .insert("encoding".into(), b"json/plain".to_vec());
    payload.data = data.to_vec();
    payload.encode_to_vec()
}

fn refs(sealed: &[&[u8]]) -> Vec<EnvelopeRef> {
    sealed
        .iter()
        .map(|s| envelope_info(s).expect("sealed by portcullis"))
        .collect()
}

/// One sealing key and the opening keys for it, shared by all proptest cases.
fn fixture() -> &'static (SealingKey, OpeningKeys) {
    static FIXTURE: OnceLock<(SealingKey, OpeningKeys)> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let provider = TestProvider::new();
            let manager = manager(&provider, DataKeyPolicy::default());
            let key = manager.sealing_key("ns").await.unwrap();
            let probe = key.seal(&payload(b"probe")).unwrap();
            let keys = manager.opening_keys("ns", refs(&[&probe])).await.unwrap();
            (key, keys)
        })
    })
}

// temporalio-protos asks not to build its messages with struct literals (fields get added).
#[allow(clippy::field_reassign_with_default)]
fn arb_payload() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::hash_map(
            "[a-zA-Z0-9/_-]{0,24}",
            prop::collection::vec(any::<u8>(), 0..48),
            0..6,
        ),
        prop::collection::vec(any::<u8>(), 0..4096),
        prop::collection::vec(any::<i64>(), 0..3),
    )
        .prop_map(|(metadata, data, external)| {
            let mut payload = Payload::default();
            payload.metadata = metadata;
            payload.data = data;
            payload.external_payloads = external
                .into_iter()
                .map(|size_bytes| ExternalPayloadDetails { size_bytes })
                .collect();
            payload.encode_to_vec()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn seal_then_open_is_identity(original in arb_payload()) {
        let (key, keys) = fixture();
        let sealed = key.seal(&original).unwrap();
        prop_assert_eq!(sealed.len(), key.sealed_len(original.len()));
        let info = envelope_info(&sealed).unwrap();
        prop_assert_eq!(info.data_key_id.as_str(), key.data_key_id());
        prop_assert_eq!(keys.open(&sealed).unwrap(), original.clone());
        prop_assert_eq!(keys.open_if_sealed(&sealed).unwrap(), Some(original.clone()));
        // The plaintext is not ours: the walker leaves it alone.
        prop_assert_eq!(keys.open_if_sealed(&original).unwrap(), None);
    }

    #[test]
    fn inspecting_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = inspect(&bytes);
        let (_, keys) = fixture();
        let _ = keys.open_if_sealed(&bytes);
    }
}

#[tokio::test]
async fn sealed_payloads_reveal_nothing_and_open_without_a_provider_call() {
    let provider = TestProvider::new();
    let manager = manager(&provider, DataKeyPolicy::default());
    let original = payload(b"the launch codes");
    let sealed = manager
        .sealing_key("ns")
        .await
        .unwrap()
        .seal(&original)
        .unwrap();
    assert!(!sealed.windows(6).any(|w| w == b"launch"));
    assert!(!sealed.windows(10).any(|w| w == b"json/plain"));

    let keys = manager.opening_keys("ns", refs(&[&sealed])).await.unwrap();
    assert_eq!(keys.open(&sealed).unwrap(), original);
    // The key this process generated was cached: no unwrap needed.
    assert_eq!(provider.unwrapped(), 0);
    let metrics = manager.metrics().snapshot();
    assert_eq!(
        (
            metrics.seals,
            metrics.opens,
            metrics.cache_hits,
            metrics.cache_misses
        ),
        (1, 1, 1, 0)
    );

    // Another replica (empty cache) unwraps through the provider, once per key.
    let replica = self::manager(&provider, DataKeyPolicy::default());
    let keys = replica
        .opening_keys("ns", refs(&[&sealed, &sealed]))
        .await
        .unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys.open(&sealed).unwrap(), original);
    assert_eq!(provider.unwrapped(), 1);
    assert_eq!(replica.metrics().snapshot().cache_misses, 1);
}

#[tokio::test]
async fn another_namespace_cannot_open() {
    let provider = TestProvider::new();
    let manager = manager(&provider, DataKeyPolicy::default());
    let key = manager.sealing_key("payments").await.unwrap();
    let sealed = key.seal(&payload(b"secret")).unwrap();

    let err = manager
        .opening_keys("marketing", refs(&[&sealed]))
        .await
        .unwrap_err();
    match &err {
        CryptoError::CannotOpen {
            key_id,
            namespace,
            reason: OpenFailure::Unwrap(_),
        } => {
            assert_eq!(key_id, key.data_key_id());
            assert_eq!(namespace, "marketing");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains(key.data_key_id()), "{err}");
    assert!(!err.is_transient());

    // Keys resolved for one namespace do not open another's payloads either.
    let other = manager.sealing_key("marketing").await.unwrap();
    let other_sealed = other.seal(&payload(b"x")).unwrap();
    let keys = manager
        .opening_keys("marketing", refs(&[&other_sealed]))
        .await
        .unwrap();
    assert!(matches!(
        keys.open(&sealed),
        Err(CryptoError::CannotOpen {
            reason: OpenFailure::KeyNotResolved,
            ..
        })
    ));
    assert_eq!(manager.metrics().snapshot().open_failures, 2);
}

#[tokio::test]
async fn flipping_any_byte_fails() {
    let provider = TestProvider::new();
    let manager = manager(&provider, DataKeyPolicy::default());
    let sealed = manager
        .sealing_key("ns")
        .await
        .unwrap()
        .seal(&payload(b"0123456789abcdef"))
        .unwrap();
    let keys = manager.opening_keys("ns", refs(&[&sealed])).await.unwrap();
    assert!(keys.open(&sealed).is_ok());

    for i in 0..sealed.len() {
        for bit in [0x01u8, 0x80] {
            let mut tampered = sealed.clone();
            tampered[i] ^= bit;
            // With the keys of the untouched payload...
            assert!(keys.open(&tampered).is_err(), "byte {i} bit {bit:#x}");
            // ...and with whatever keys the tampered payload asks for.
            if let Ok(Some(r)) = inspect(&tampered) {
                if let Ok(fresh) = manager.opening_keys("ns", [r]).await {
                    assert!(fresh.open(&tampered).is_err(), "byte {i} bit {bit:#x}");
                }
            }
        }
    }
}

#[tokio::test]
async fn rotates_after_max_seals() {
    let provider = TestProvider::new();
    let policy = DataKeyPolicy {
        max_seals: 3,
        ..DataKeyPolicy::default()
    };
    let manager = manager(&provider, policy);
    let first = manager.sealing_key("ns").await.unwrap();
    let mut sealed = Vec::new();
    for i in 0..3u8 {
        let again = manager.sealing_key("ns").await.unwrap();
        assert_eq!(again.data_key_id(), first.data_key_id());
        sealed.push(again.seal(&payload(&[i])).unwrap());
    }
    let second = manager.sealing_key("ns").await.unwrap();
    assert_ne!(second.data_key_id(), first.data_key_id());
    assert_eq!(provider.generated(), 2);
    sealed.push(second.seal(&payload(b"new")).unwrap());

    // Payloads of both keys open together.
    let refs: Vec<_> = sealed.iter().map(|s| envelope_info(s).unwrap()).collect();
    let keys = manager.opening_keys("ns", refs).await.unwrap();
    assert_eq!(keys.len(), 2);
    for s in &sealed {
        keys.open(s).unwrap();
    }
    let metrics = manager.metrics().snapshot();
    assert_eq!(metrics.data_key_rotations, 2);
    assert_eq!(metrics.seals, 4);
    assert_eq!(metrics.provider_calls, 2);
}

#[tokio::test]
async fn rotates_after_max_age() {
    let provider = TestProvider::new();
    let clock = ManualClock::new();
    let policy = DataKeyPolicy {
        max_age: Duration::from_secs(60),
        ..DataKeyPolicy::default()
    };
    let manager = manager(&provider, policy).with_clock(Arc::clone(&clock) as Arc<dyn Clock>);
    let first = manager.sealing_key("ns").await.unwrap();
    clock.advance(Duration::from_secs(59));
    assert_eq!(
        manager.sealing_key("ns").await.unwrap().data_key_id(),
        first.data_key_id()
    );
    clock.advance(Duration::from_secs(1));
    let second = manager.sealing_key("ns").await.unwrap();
    assert_ne!(second.data_key_id(), first.data_key_id());
    assert_eq!(provider.generated(), 2);
    // Namespaces rotate independently.
    let other = manager.sealing_key("other").await.unwrap();
    assert_ne!(other.data_key_id(), second.data_key_id());
    assert_eq!(provider.generated(), 3);
}

/// During an outage, callers queued behind a failing provider call share its failure: 32 of
/// them cost one provider timeout, not 32 in turn. A caller arriving afterwards tries again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_waiting_on_a_failing_provider_call_share_its_failure() {
    let provider = TestProvider::with_delay(Duration::from_millis(200));
    provider.set_down(true);
    let manager = Arc::new(manager(&provider, DataKeyPolicy::default()));
    let barrier = Arc::new(tokio::sync::Barrier::new(32));
    let started = Instant::now();
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let manager = Arc::clone(&manager);
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                barrier.wait().await;
                manager.sealing_key("ns").await.map(|_| ())
            })
        })
        .collect();
    for task in tasks {
        let err = task.await.unwrap().unwrap_err();
        assert!(
            matches!(err, CryptoError::ProviderUnavailable { .. }),
            "{err}"
        );
    }
    // Without sharing: 32 x 200 ms one after another.
    assert!(
        started.elapsed() < Duration::from_millis(2000),
        "{:?}",
        started.elapsed()
    );
    assert!(
        provider.generated() <= 2,
        "{} provider calls",
        provider.generated()
    );
    // The failure is not remembered for later callers: once the provider is back, they seal.
    let calls = provider.generated();
    provider.set_down(false);
    manager.sealing_key("ns").await.unwrap();
    assert_eq!(provider.generated(), calls + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_at_rotation_share_one_provider_call() {
    let provider = TestProvider::with_delay(Duration::from_millis(50));
    let policy = DataKeyPolicy {
        max_seals: 1,
        ..DataKeyPolicy::default()
    };
    let manager = Arc::new(manager(&provider, policy));
    let first = manager.sealing_key("ns").await.unwrap();
    first.seal(&payload(b"x")).unwrap();
    assert_eq!(provider.generated(), 1);

    let barrier = Arc::new(tokio::sync::Barrier::new(32));
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let manager = Arc::clone(&manager);
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                barrier.wait().await;
                manager
                    .sealing_key("ns")
                    .await
                    .map(|k| k.data_key_id().to_owned())
            })
        })
        .collect();
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.unwrap().unwrap());
    }
    assert_eq!(
        provider.generated(),
        2,
        "one provider call for all 32 callers"
    );
    assert!(ids.iter().all(|id| id == &ids[0]));
    assert_ne!(ids[0], first.data_key_id());
}

#[tokio::test]
async fn provider_outage_fails_closed_after_the_current_key_rotates_out() {
    let provider = TestProvider::new();
    let policy = DataKeyPolicy {
        max_seals: 2,
        ..DataKeyPolicy::default()
    };
    let manager = manager(&provider, policy.clone());
    let key = manager.sealing_key("ns").await.unwrap();
    let before = key.seal(&payload(b"before")).unwrap();

    provider.set_down(true);
    // The current key still serves, and cached keys still open.
    let key = manager.sealing_key("ns").await.unwrap();
    let during = key.seal(&payload(b"during")).unwrap();
    let keys = manager
        .opening_keys("ns", refs(&[&before, &during]))
        .await
        .unwrap();
    keys.open(&before).unwrap();
    keys.open(&during).unwrap();

    // Once it is due, no key: the caller gets UNAVAILABLE, never plaintext or an expired key.
    let err = manager.sealing_key("ns").await.unwrap_err();
    assert!(
        matches!(err, CryptoError::ProviderUnavailable { .. }),
        "{err:?}"
    );
    assert!(err.is_transient());
    // A replica without the key cached cannot open either.
    let replica = self::manager(&provider, policy);
    let err = replica
        .opening_keys("ns", refs(&[&before]))
        .await
        .unwrap_err();
    assert!(matches!(err, CryptoError::ProviderUnavailable { .. }));
    let metrics = manager.metrics().snapshot();
    assert_eq!(metrics.provider_errors, 1);

    provider.set_down(false);
    let fresh = manager.sealing_key("ns").await.unwrap();
    assert_ne!(fresh.data_key_id(), key.data_key_id());
    // Errors were not cached: the replica recovers too.
    replica.opening_keys("ns", refs(&[&before])).await.unwrap();
}

#[tokio::test]
async fn a_handle_keeps_sealing_past_max_seals_but_new_callers_rotate() {
    let provider = TestProvider::new();
    let manager = manager(
        &provider,
        DataKeyPolicy {
            max_seals: 1,
            ..DataKeyPolicy::default()
        },
    );
    // One request with several payloads uses one handle throughout.
    let key = manager.sealing_key("ns").await.unwrap();
    for _ in 0..5 {
        key.seal(&payload(b"x")).unwrap();
    }
    assert_ne!(
        manager.sealing_key("ns").await.unwrap().data_key_id(),
        key.data_key_id()
    );
}

#[test]
fn invalid_policies_are_refused() {
    let provider = TestProvider::new();
    for policy in [
        DataKeyPolicy {
            max_seals: 0,
            ..DataKeyPolicy::default()
        },
        DataKeyPolicy {
            max_seals: NONCE_SAFETY_LIMIT,
            ..DataKeyPolicy::default()
        },
        DataKeyPolicy {
            max_age: Duration::ZERO,
            ..DataKeyPolicy::default()
        },
    ] {
        assert!(matches!(
            DataKeyManager::new(provider.clone(), policy),
            Err(CryptoError::InvalidPolicy(_))
        ));
    }
}

#[test]
fn futures_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    let manager = manager(&TestProvider::new(), DataKeyPolicy::default());
    let sealing = manager.sealing_key("ns");
    assert_send(&sealing);
    let opening = manager.opening_keys("ns", Vec::new());
    assert_send(&opening);
}
