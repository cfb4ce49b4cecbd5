//! Data keys per namespace: which key seals now, when it rotates, and the cache of unwrapped keys
//! for opening.
//!
//! The payload walker rewrites protobuf synchronously, so all async key work happens before the
//! walk: sealing fetches one [`SealingKey`] per call; opening first collects [`EnvelopeRef`]s,
//! resolves them into [`OpeningKeys`], then opens in a second pass.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use moka::future::Cache;

use super::envelope::{
    self, data_key_id, EnvelopeRef, Nonces, Opener, SealedParts, SealedView, Sealer,
};
use super::error::{CryptoError, OpenFailure};
use super::gcm::DataKey;
use super::metrics::CryptoMetrics;
use super::provider::{KeyProvider, ProviderError};

/// NIST SP 800-38D's bound for random 96-bit nonces: at most 2^32 encryptions per key. A handle
/// refuses to seal past it whatever the policy; rotation normally happens long before.
pub const NONCE_SAFETY_LIMIT: u64 = 1 << 32;
/// The largest `max_seals` a policy may set, leaving handles taken just before rotation room.
pub const MAX_SEALS_LIMIT: u64 = 1 << 31;

/// When data keys rotate, and how unwrapped keys are cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataKeyPolicy {
    /// A namespace's sealing key is replaced once it is this old.
    pub max_age: Duration,
    /// ... or once it has sealed this many payloads. With random nonces the chance of a repeat
    /// after n seals is about n²/2^97: 2^24 seals keep it below 2^-49.
    pub max_seals: u64,
    /// How long an unwrapped key stays cached for opening after it was fetched.
    pub cache_ttl: Duration,
    /// How many unwrapped keys the cache holds at most.
    pub cache_capacity: u64,
}

impl Default for DataKeyPolicy {
    fn default() -> Self {
        DataKeyPolicy {
            max_age: Duration::from_secs(3600),
            max_seals: 1 << 24,
            cache_ttl: Duration::from_secs(3600),
            cache_capacity: 10_000,
        }
    }
}

impl DataKeyPolicy {
    pub fn validate(&self) -> Result<(), CryptoError> {
        if self.max_age.is_zero() {
            return Err(CryptoError::InvalidPolicy("max_age must be positive"));
        }
        if self.max_seals == 0 || self.max_seals > MAX_SEALS_LIMIT {
            return Err(CryptoError::InvalidPolicy(
                "max_seals must be between 1 and 2^31",
            ));
        }
        if self.cache_ttl.is_zero() || self.cache_capacity == 0 {
            return Err(CryptoError::InvalidPolicy(
                "cache_ttl and cache_capacity must be positive",
            ));
        }
        Ok(())
    }
}

/// The time source for key ages; tests substitute one they can advance.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Instant;
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// Per process: the current data key of each namespace, and unwrapped keys for opening.
pub struct DataKeyManager {
    provider: Arc<dyn KeyProvider>,
    policy: DataKeyPolicy,
    clock: Arc<dyn Clock>,
    /// One entry per namespace ever sealed for; namespaces are bounded by the proxy's config.
    namespaces: RwLock<HashMap<String, Arc<NamespaceKeys>>>,
    unwrapped: Cache<CacheKey, Arc<DataKey>>,
    metrics: Arc<CryptoMetrics>,
}

#[derive(Default)]
struct NamespaceKeys {
    current: RwLock<Option<Arc<ActiveKey>>>,
    /// Held while a new key is fetched: concurrent callers wait for that one provider call.
    /// Holds the last failed attempt (its number in `attempts_done`, and why): callers that
    /// waited while it ran share its failure instead of each paying the provider's timeout in
    /// turn (during a KMS outage, a queue of N callers would otherwise wait N timeouts).
    rotation: tokio::sync::Mutex<Option<(u64, CryptoError)>>,
    /// Provider attempts finished (written under `rotation`).
    attempts_done: AtomicU64,
}

struct ActiveKey {
    namespace: String,
    sealer: Sealer,
    created: Instant,
    uses: AtomicU64,
}

/// The unwrapped-key cache is keyed by everything the key is bound to, so a key unwrapped for
/// one namespace is never served to another.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    namespace: String,
    kek_id: String,
    wrapped: Vec<u8>,
}

impl fmt::Debug for DataKeyManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataKeyManager")
            .field("policy", &self.policy)
            .field("cached_keys", &self.unwrapped.entry_count())
            .field("metrics", &self.metrics.snapshot())
            .finish_non_exhaustive()
    }
}

impl DataKeyManager {
    pub fn new(provider: Arc<dyn KeyProvider>, policy: DataKeyPolicy) -> Result<Self, CryptoError> {
        policy.validate()?;
        let unwrapped = Cache::builder()
            .max_capacity(policy.cache_capacity)
            .time_to_live(policy.cache_ttl)
            .build();
        Ok(DataKeyManager {
            provider,
            policy,
            clock: Arc::new(SystemClock),
            namespaces: RwLock::default(),
            unwrapped,
            metrics: Arc::default(),
        })
    }

    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    pub fn policy(&self) -> &DataKeyPolicy {
        &self.policy
    }

    pub fn metrics(&self) -> &Arc<CryptoMetrics> {
        &self.metrics
    }

    /// Drops every namespace's current sealing key, so the next seal gets a new data key from
    /// the provider (after its key-encryption key rotated). Keys already issued keep opening.
    pub fn retire_sealing_keys(&self) {
        let namespaces = self
            .namespaces
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        for slot in namespaces.values() {
            *slot.current.write().unwrap_or_else(PoisonError::into_inner) = None;
        }
    }

    /// See [`envelope::envelope_info`].
    pub fn envelope_info(payload: &[u8]) -> Option<EnvelopeRef> {
        envelope::envelope_info(payload)
    }

    /// The namespace's current data key, rotated first if it is too old or too used. Concurrent
    /// callers that find it due share one provider call. If the provider is down, the current
    /// key serves until it is due, then this fails: nothing is sealed under an expired key.
    pub async fn sealing_key(&self, namespace: &str) -> Result<SealingKey, CryptoError> {
        let slot = self.namespace_keys(namespace);
        if let Some(key) = self.usable(&slot) {
            return Ok(self.handle(key));
        }
        let done_before = slot.attempts_done.load(Ordering::Acquire);
        let mut last_failure = slot.rotation.lock().await;
        // Whoever held the lock before us may have rotated already ...
        if let Some(key) = self.usable(&slot) {
            return Ok(self.handle(key));
        }
        // ... or failed while we waited: that answer is ours too.
        if let Some((attempt, error)) = last_failure.as_ref() {
            if *attempt > done_before {
                return Err(error.clone());
            }
        }

        self.metrics.provider_calls();
        let generated = self.provider.generate_data_key(namespace).await;
        let attempt = slot.attempts_done.fetch_add(1, Ordering::AcqRel) + 1;
        let material = generated
            .map_err(|e| {
                self.metrics.provider_errors();
                match e {
                    ProviderError::Unavailable(reason) => CryptoError::ProviderUnavailable {
                        namespace: namespace.to_owned(),
                        reason,
                    },
                    other => CryptoError::ProviderRejected {
                        namespace: namespace.to_owned(),
                        reason: other.to_string(),
                    },
                }
            })
            .inspect_err(|e| *last_failure = Some((attempt, e.clone())))?;
        *last_failure = None;
        if material.kek_id.is_empty() || material.wrapped.is_empty() {
            return Err(CryptoError::ProviderRejected {
                namespace: namespace.to_owned(),
                reason: "the provider returned an empty kek_id or wrapped key".into(),
            });
        }
        let data_key = Arc::new(DataKey::new(&material.plaintext));
        let key = Arc::new(ActiveKey {
            namespace: namespace.to_owned(),
            sealer: Sealer::new(
                Arc::clone(&data_key),
                namespace,
                &material.kek_id,
                &material.wrapped,
            ),
            created: self.clock.now(),
            uses: AtomicU64::new(0),
        });
        // What this process seals it often reads back soon: spare those reads an unwrap.
        self.unwrapped
            .insert(
                CacheKey {
                    namespace: namespace.to_owned(),
                    kek_id: material.kek_id.clone(),
                    wrapped: material.wrapped.clone(),
                },
                data_key,
            )
            .await;
        *slot.current.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&key));
        self.metrics.data_key_rotations();
        tracing::debug!(
            namespace,
            kek_id = %material.kek_id,
            data_key_id = %key.sealer.data_key_id,
            "new data key"
        );
        Ok(self.handle(key))
    }

    /// Resolves the data keys of `refs` (cache, else provider; distinct keys concurrently) into
    /// keys that open synchronously. Fails if any key cannot be had: the response that needs it
    /// could not be opened anyway.
    pub async fn opening_keys(
        &self,
        namespace: &str,
        refs: impl IntoIterator<Item = EnvelopeRef>,
    ) -> Result<OpeningKeys, CryptoError> {
        let mut wanted: HashMap<Vec<u8>, EnvelopeRef> = HashMap::new();
        for r in refs {
            if !wanted.contains_key(&r.wrapped_data_key) {
                wanted.insert(r.wrapped_data_key.clone(), r);
            }
        }
        let resolved = futures_util::future::join_all(
            wanted.into_values().map(|r| self.resolve(namespace, r)),
        )
        .await;
        let mut keys = HashMap::with_capacity(resolved.len());
        for result in resolved {
            let (r, data_key) = result.inspect_err(|_| self.metrics.open_failures())?;
            let opener = Opener::new(data_key, namespace, &r.kek_id, &r.wrapped_data_key);
            keys.insert(r.wrapped_data_key, opener);
        }
        Ok(OpeningKeys {
            namespace: namespace.to_owned(),
            keys,
            metrics: Arc::clone(&self.metrics),
        })
    }

    async fn resolve(
        &self,
        namespace: &str,
        r: EnvelopeRef,
    ) -> Result<(EnvelopeRef, Arc<DataKey>), CryptoError> {
        let cache_key = CacheKey {
            namespace: namespace.to_owned(),
            kek_id: r.kek_id.clone(),
            wrapped: r.wrapped_data_key.clone(),
        };
        if let Some(data_key) = self.unwrapped.get(&cache_key).await {
            self.metrics.cache_hits();
            return Ok((r, data_key));
        }
        self.metrics.cache_misses();
        // try_get_with: concurrent misses of one key share one unwrap; errors are not cached.
        let fetched = self
            .unwrapped
            .try_get_with(cache_key, async {
                self.metrics.provider_calls();
                match self
                    .provider
                    .unwrap_data_key(namespace, &r.kek_id, &r.wrapped_data_key)
                    .await
                {
                    Ok(plaintext) => Ok(Arc::new(DataKey::new(&plaintext))),
                    Err(e) => {
                        self.metrics.provider_errors();
                        Err(match e {
                            ProviderError::Unavailable(reason) => {
                                CryptoError::ProviderUnavailable {
                                    namespace: namespace.to_owned(),
                                    reason,
                                }
                            }
                            other => CryptoError::CannotOpen {
                                key_id: data_key_id(&r.wrapped_data_key),
                                namespace: namespace.to_owned(),
                                reason: OpenFailure::Unwrap(other.to_string()),
                            },
                        })
                    }
                }
            })
            .await;
        match fetched {
            Ok(data_key) => Ok((r, data_key)),
            Err(e) => Err(CryptoError::clone(&e)),
        }
    }

    fn namespace_keys(&self, namespace: &str) -> Arc<NamespaceKeys> {
        let existing = self
            .namespaces
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(namespace)
            .cloned();
        existing.unwrap_or_else(|| {
            let mut map = self
                .namespaces
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            Arc::clone(map.entry(namespace.to_owned()).or_default())
        })
    }

    fn usable(&self, slot: &NamespaceKeys) -> Option<Arc<ActiveKey>> {
        let current = slot
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()?;
        let young =
            self.clock.now().saturating_duration_since(current.created) < self.policy.max_age;
        let fresh = current.uses.load(Ordering::Relaxed) < self.policy.max_seals;
        (young && fresh).then_some(current)
    }

    fn handle(&self, key: Arc<ActiveKey>) -> SealingKey {
        SealingKey {
            key,
            metrics: Arc::clone(&self.metrics),
        }
    }
}

/// A namespace's sealing key for the duration of one call. Cheap to clone; sealing is sync.
#[derive(Clone)]
pub struct SealingKey {
    key: Arc<ActiveKey>,
    metrics: Arc<CryptoMetrics>,
}

impl fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealingKey")
            .field("namespace", &self.key.namespace)
            .field("kek_id", &self.key.sealer.kek_id)
            .field("data_key_id", &self.key.sealer.data_key_id)
            .field("uses", &self.key.uses.load(Ordering::Relaxed))
            .finish()
    }
}

impl SealingKey {
    /// Seals a serialized Payload; returns the serialized sealed Payload. Each call counts
    /// towards the key's rotation.
    pub fn seal(&self, payload: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let sealed = self
            .count_use()
            .and_then(|()| self.key.sealer.seal(payload));
        self.count(&sealed);
        sealed
    }

    /// Like [`SealingKey::seal`], but appends the sealed Payload (exactly
    /// [`SealingKey::sealed_len`] bytes) to `out`, encrypting straight into it, with a nonce
    /// from `nonces`. On error `out` is left as it was.
    pub fn seal_into(
        &self,
        payload: &[u8],
        nonces: &mut Nonces,
        out: &mut Vec<u8>,
    ) -> Result<(), CryptoError> {
        let sealed = self.count_use().and_then(|()| {
            let nonce = nonces.next_nonce()?;
            self.key.sealer.seal_into(payload, &nonce, out)
        });
        self.count(&sealed);
        sealed
    }

    /// Seals `compressed`, the zstd frame of a serialized Payload of `payload_len` bytes
    /// ([`super::compress`]), as a v2 envelope; returns the serialized sealed Payload.
    pub fn seal_compressed(
        &self,
        compressed: &[u8],
        payload_len: usize,
        nonces: &mut Nonces,
    ) -> Result<Vec<u8>, CryptoError> {
        let sealed = self.count_use().and_then(|()| {
            let nonce = nonces.next_nonce()?;
            self.key
                .sealer
                .seal_compressed(compressed, payload_len, &nonce)
        });
        self.count(&sealed);
        sealed
    }

    fn count_use(&self) -> Result<(), CryptoError> {
        let previous_uses = self.key.uses.fetch_add(1, Ordering::Relaxed);
        if previous_uses >= NONCE_SAFETY_LIMIT {
            return Err(CryptoError::SealFailed(
                "data key used past the random-nonce safety bound",
            ));
        }
        Ok(())
    }

    fn count<T>(&self, sealed: &Result<T, CryptoError>) {
        match sealed {
            Ok(_) => self.metrics.seals(),
            Err(_) => self.metrics.seal_failures(),
        }
    }

    /// The size [`SealingKey::seal`] returns for a payload of `payload_len` bytes, so a caller
    /// can check message limits before sealing.
    pub fn sealed_len(&self, payload_len: usize) -> usize {
        self.key.sealer.sealed_len(payload_len)
    }

    pub fn namespace(&self) -> &str {
        &self.key.namespace
    }

    pub fn kek_id(&self) -> &str {
        &self.key.sealer.kek_id
    }

    pub fn data_key_id(&self) -> &str {
        &self.key.sealer.data_key_id
    }
}

/// Resolved data keys of one namespace; opening is sync.
pub struct OpeningKeys {
    namespace: String,
    /// By wrapped key: exact, unlike the short data key id.
    keys: HashMap<Vec<u8>, Opener>,
    metrics: Arc<CryptoMetrics>,
}

impl fmt::Debug for OpeningKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpeningKeys")
            .field("namespace", &self.namespace)
            .field("keys", &self.keys.len())
            .finish()
    }
}

impl OpeningKeys {
    /// Opens a sealed payload; returns the original serialized Payload, byte for byte. A payload
    /// not sealed by portcullis is an error here; see [`OpeningKeys::open_if_sealed`].
    pub fn open(&self, payload: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let opened = match envelope::parse(payload) {
            Ok(Some(view)) => self.open_view(&view),
            Ok(None) => Err(CryptoError::MalformedEnvelope(
                "the payload is not sealed by portcullis",
            )),
            Err(e) => Err(e),
        };
        self.count(&opened);
        opened
    }

    /// `Ok(None)` for a payload without the portcullis marker (plaintext, or encrypted by someone
    /// else: passed through as is); otherwise opens it like [`OpeningKeys::open`], so a marked
    /// payload that does not open fails closed.
    pub fn open_if_sealed(&self, payload: &[u8]) -> Result<Option<Vec<u8>>, CryptoError> {
        let opened = match envelope::parse(payload) {
            Ok(Some(view)) => self.open_view(&view),
            Ok(None) => return Ok(None),
            Err(e) => Err(e),
        };
        self.count(&opened);
        opened.map(Some)
    }

    /// Opens a payload sealed by portcullis, appending the original Payload to `out`
    /// (exactly as many bytes as [`crate::crypto::envelope::opened_len`] said), decrypted in
    /// place there. A payload that is not sealed by portcullis is an error, as in
    /// [`OpeningKeys::open`]. On error `out` is left as it was.
    pub fn open_into(&self, payload: &[u8], out: &mut Vec<u8>) -> Result<(), CryptoError> {
        let opened = match envelope::parse(payload) {
            Ok(Some(view)) => match self.keys.get(view.wrapped()) {
                Some(opener) => opener.open_into(&view, &self.namespace, out),
                None => Err(self.not_resolved(&view)),
            },
            Ok(None) => Err(CryptoError::MalformedEnvelope(
                "the payload is not sealed by portcullis",
            )),
            Err(e) => Err(e),
        };
        self.count(&opened);
        opened
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The opener resolved for a wrapped data key, for opening many payloads under it without
    /// a lookup each ([`OpeningKeys::open_parts_into`]).
    pub(crate) fn opener(&self, wrapped: &[u8]) -> Option<&Opener> {
        self.keys.get(wrapped)
    }

    /// [`OpeningKeys::open_into`] for a payload the planning walk parsed already: `opener` is
    /// one of these keys, and the walk checked the payload's key names against the reference
    /// it was resolved for.
    pub(crate) fn open_parts_into(
        &self,
        opener: &Opener,
        payload: &[u8],
        parts: SealedParts,
        out: &mut Vec<u8>,
    ) -> Result<(), CryptoError> {
        let opened = opener.open_parts_into(payload, parts, &self.namespace, out);
        self.count(&opened);
        opened
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn open_view(&self, view: &SealedView<'_>) -> Result<Vec<u8>, CryptoError> {
        match self.keys.get(view.wrapped()) {
            Some(opener) => opener.open(view, &self.namespace),
            None => Err(self.not_resolved(view)),
        }
    }

    fn not_resolved(&self, view: &SealedView<'_>) -> CryptoError {
        CryptoError::CannotOpen {
            key_id: data_key_id(view.wrapped()),
            namespace: self.namespace.clone(),
            reason: OpenFailure::KeyNotResolved,
        }
    }

    fn count<T>(&self, opened: &Result<T, CryptoError>) {
        match opened {
            Ok(_) => self.metrics.opens(),
            Err(_) => self.metrics.open_failures(),
        }
    }
}
