//! Seals every payload of a request before it goes upstream, and opens the payloads this proxy
//! sealed in the response and in its error details. Fails closed: if a payload cannot be sealed,
//! nothing is forwarded.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD_NO_PAD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use tokio::sync::Semaphore;
use tower::{Layer, Service, ServiceExt};

use super::{CallFuture, GrpcRequest, GrpcResponse};
use crate::crypto::aws_kms::AwsKmsProvider;
use crate::crypto::config::{EncryptionConfig, KeyConfig, OpenFailurePolicy};
use crate::crypto::keyring::ReloadingLocalProvider;
use crate::crypto::message::{PlaintextPayload, ScopedKeys};
use crate::crypto::pkcs11::Pkcs11Provider;
use crate::crypto::{message, CryptoError, DataKeyManager, KeyProvider, OpenFailure, OpenOptions};
use crate::error::ProxyError;
use crate::grpc::headers::{percent_decode, percent_encode};
use crate::payload::targets::CommandTarget;
use crate::payload::unknown;
use crate::payload::walker::{
    self, FailureMode, PayloadIndex, WalkError, WalkLimits, NEXUS_ENDPOINT_SCOPE,
    RESERVED_SCOPE_PREFIX,
};
use crate::payload::wire;

mod offload;

const STATUS_DETAILS: &str = "grpc-status-details-bin";
const GRPC_MESSAGE: &str = "grpc-message";

/// Messages at least this large are sealed and opened on a blocking thread: a serving thread
/// runs every call of its connections and must not stall them for milliseconds.
const OFF_THREAD_BYTES: usize = 256 * 1024;

/// What sealing and opening may cost, from the `[limits]` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncryptionLimits {
    /// Payloads in one message (request or response).
    pub max_payloads: usize,
    /// An opened response may not exceed this (the sealed request: `upstream_max_request_bytes`).
    pub max_response_bytes: usize,
    /// Bytes of large messages being sealed or opened off the serving threads at once.
    pub off_thread_budget_bytes: usize,
    /// How long a large message waits for its share of that budget.
    pub off_thread_wait: Duration,
}

impl Default for EncryptionLimits {
    fn default() -> Self {
        EncryptionLimits {
            max_payloads: walker::DEFAULT_MAX_PAYLOADS,
            max_response_bytes: 128 * 1024 * 1024,
            off_thread_budget_bytes: 64 * 1024 * 1024,
            off_thread_wait: Duration::from_secs(5),
        }
    }
}

/// Bounds the memory of large messages sealed or opened on tokio's blocking pool: each takes
/// its size (in KiB) from a semaphore first, so a burst of large calls queues (and after
/// `wait`, fails with RESOURCE_EXHAUSTED) instead of holding ever more buffers and threads.
struct OffThreadBudget {
    kib: Arc<Semaphore>,
    total_kib: u32,
    wait: Duration,
}

impl OffThreadBudget {
    fn new(bytes: usize, wait: Duration) -> OffThreadBudget {
        let total_kib = u32::try_from(bytes / 1024).unwrap_or(u32::MAX).max(1);
        OffThreadBudget {
            kib: Arc::new(Semaphore::new(total_kib as usize)),
            total_kib,
            wait,
        }
    }

    /// Runs `work` here when `size` is small, else on the blocking pool within the budget. A
    /// message larger than the whole budget runs alone.
    async fn run<T: Send + 'static>(
        &self,
        size: usize,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ProxyError> {
        if size < OFF_THREAD_BYTES {
            return Ok(work());
        }
        let wanted = u32::try_from(size.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .min(self.total_kib);
        let permit =
            match tokio::time::timeout(self.wait, self.kib.clone().acquire_many_owned(wanted))
                .await
            {
                Ok(Ok(permit)) => permit,
                // The semaphore is never closed; a timeout means the budget stayed taken.
                Ok(Err(_)) | Err(_) => {
                    return Err(ProxyError::Overloaded(format!(
                        "no room within {:?} to seal or open a message of {size} bytes (budget {} KiB for large messages)",
                        self.wait, self.total_kib
                    )))
                }
            };
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work()
        })
        .await
        .map_err(|e| ProxyError::Encryption(format!("the sealing task failed: {e}")))
    }
}

/// Data key managers per namespace, and how to seal.
pub struct Encryption {
    index: &'static PayloadIndex,
    /// Namespace → manager and response rule; replaced when the config's namespaces change at
    /// run time.
    managers: RwLock<Arc<HashMap<String, NamespaceCrypto>>>,
    /// Manager per configured key name.
    by_key: HashMap<String, Arc<DataKeyManager>>,
    default_manager: Option<Arc<DataKeyManager>>,
    /// `[encryption] cluster_key` (else the default key): seals cluster-wide payloads, Nexus
    /// endpoint descriptions ([`NEXUS_ENDPOINT_SCOPE`]).
    cluster_manager: Option<Arc<DataKeyManager>>,
    /// `[encryption] encrypted_only`: the response rule of namespaces not listed.
    default_encrypted_only: bool,
    encode_failures: bool,
    on_open_failure: OpenFailurePolicy,
    upstream_max_request_bytes: usize,
    /// Keyrings that can be reloaded, with the manager whose data keys they wrap.
    reloadable: Vec<(Arc<ReloadingLocalProvider>, Arc<DataKeyManager>)>,
    /// PKCS#11 keys, with the manager whose data keys they wrap (checked for rotation).
    token_keys: Vec<(Arc<Pkcs11Provider>, Arc<DataKeyManager>)>,
    /// Every configured key by name, for metrics and readiness probes.
    keys: Vec<ConfiguredKey>,
    limits: EncryptionLimits,
    off_thread: OffThreadBudget,
    /// `[offload]`: where namespaces with `offload` store large payloads (and where references
    /// are resolved from).
    store: Option<Arc<crate::offload::ObjectStore>>,
    /// Compression and offload counters (the store's own when there is one).
    payload_stats: Arc<crate::telemetry::OffloadStats>,
}

/// One `[encryption.keys.NAME]`: its manager and its (timed) provider.
struct ConfiguredKey {
    name: String,
    manager: Arc<DataKeyManager>,
    provider: Arc<dyn KeyProvider>,
    stats: Arc<crate::telemetry::ProviderStats>,
}

/// How one served namespace is encrypted: `[[namespaces]] encryption_key` and
/// `encrypted_only` (resolved against `[encryption] encrypted_only`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceKey {
    pub namespace: String,
    /// The `[encryption.keys.NAME]` sealing it; `None`: the default key.
    pub key: Option<String>,
    /// Every payload of its responses must be sealed by portcullis.
    pub encrypted_only: bool,
    /// Compression and offload (`[[namespaces]] compression`, `offload`).
    pub services: crate::offload::PayloadServices,
}

impl NamespaceKey {
    pub fn new(namespace: &str, key: Option<&str>) -> NamespaceKey {
        NamespaceKey {
            namespace: namespace.to_string(),
            key: key.map(str::to_string),
            encrypted_only: false,
            services: Default::default(),
        }
    }
}

/// A served namespace's data key manager and response rule.
#[derive(Clone)]
struct NamespaceCrypto {
    manager: Arc<DataKeyManager>,
    encrypted_only: bool,
    services: crate::offload::PayloadServices,
}

fn namespace_managers(
    by_key: &HashMap<String, Arc<DataKeyManager>>,
    default_manager: Option<&Arc<DataKeyManager>>,
    namespace_keys: &[NamespaceKey],
) -> Result<HashMap<String, NamespaceCrypto>, EncryptionSetupError> {
    let mut managers = HashMap::new();
    for NamespaceKey {
        namespace,
        key,
        encrypted_only,
        services,
    } in namespace_keys
    {
        let manager = match key.as_deref() {
            Some(key) => by_key.get(key).cloned().ok_or_else(|| {
                EncryptionSetupError::Invalid(format!(
                    "namespace {namespace:?}: encryption key {key:?} is not configured (new keys need a restart)"
                ))
            })?,
            None => default_manager.cloned().ok_or_else(|| {
                EncryptionSetupError::Invalid(format!(
                    "namespace {namespace:?} names no encryption_key and there is no default_key"
                ))
            })?,
        };
        managers.insert(
            namespace.clone(),
            NamespaceCrypto {
                manager,
                encrypted_only: *encrypted_only,
                services: *services,
            },
        );
    }
    Ok(managers)
}

#[derive(Debug, thiserror::Error)]
pub enum EncryptionSetupError {
    #[error("encryption key {name:?}: {reason}")]
    Key { name: String, reason: String },
    #[error("encryption: {0}")]
    Invalid(String),
}

impl Encryption {
    /// Builds one data key manager per configured key; `namespace_keys` maps each served
    /// namespace to its key name (None: the default key).
    pub async fn new(
        config: &EncryptionConfig,
        namespace_keys: &[NamespaceKey],
        needs_default: bool,
    ) -> Result<Encryption, EncryptionSetupError> {
        let mut by_key: HashMap<String, Arc<DataKeyManager>> = HashMap::new();
        let mut reloadable = Vec::new();
        let mut token_keys = Vec::new();
        let mut keys = Vec::new();
        for (name, key) in &config.keys {
            let key_error = |reason: String| EncryptionSetupError::Key {
                name: name.clone(),
                reason,
            };
            let mut hsm = None;
            let (provider, local): (Arc<dyn KeyProvider>, Option<Arc<ReloadingLocalProvider>>) =
                match key {
                    KeyConfig::Local { keyring } => {
                        let local = Arc::new(
                            ReloadingLocalProvider::load(keyring)
                                .map_err(|e| key_error(e.to_string()))?,
                        );
                        (local.clone(), Some(local))
                    }
                    KeyConfig::AwsKms(kms) => {
                        let provider = AwsKmsProvider::new(kms)
                            .await
                            .map_err(|e| key_error(e.to_string()))?;
                        (Arc::new(provider), None)
                    }
                    KeyConfig::Pkcs11(p11) => {
                        let provider = Arc::new(
                            Pkcs11Provider::new(p11)
                                .await
                                .map_err(|e| key_error(e.to_string()))?,
                        );
                        hsm = Some(provider.clone());
                        (provider, None)
                    }
                };
            let timed = crate::crypto::timed::TimedProvider::new(provider);
            let stats = timed.stats().clone();
            let provider: Arc<dyn KeyProvider> = Arc::new(timed);
            let manager = Arc::new(
                DataKeyManager::new(provider.clone(), config.policy())
                    .map_err(|e| key_error(e.to_string()))?,
            );
            keys.push(ConfiguredKey {
                name: name.clone(),
                manager: manager.clone(),
                provider,
                stats,
            });
            if let Some(hsm) = hsm {
                token_keys.push((hsm, manager.clone()));
            }
            if let Some(local) = local {
                reloadable.push((local, manager.clone()));
            }
            by_key.insert(name.clone(), manager);
        }
        let lookup = |key: &str| {
            by_key
                .get(key)
                .cloned()
                .ok_or_else(|| EncryptionSetupError::Invalid(format!("unknown key {key:?}")))
        };
        let default_manager = config.default_key.as_deref().map(lookup).transpose()?;
        let cluster_manager = match config.cluster_key.as_deref() {
            Some(key) => Some(lookup(key)?),
            None => default_manager.clone(),
        };
        let managers = namespace_managers(&by_key, default_manager.as_ref(), namespace_keys)?;
        if needs_default && default_manager.is_none() {
            return Err(EncryptionSetupError::Invalid(
                "routing.default_upstream serves any namespace: set encryption.default_key".into(),
            ));
        }
        Ok(Encryption {
            index: PayloadIndex::global(),
            managers: RwLock::new(Arc::new(managers)),
            by_key,
            default_manager,
            cluster_manager,
            default_encrypted_only: config.encrypted_only,
            encode_failures: config.encode_failure_attributes,
            on_open_failure: config.on_open_failure,
            upstream_max_request_bytes: config.upstream_max_request_bytes,
            reloadable,
            token_keys,
            keys,
            limits: EncryptionLimits::default(),
            off_thread: OffThreadBudget::new(
                EncryptionLimits::default().off_thread_budget_bytes,
                EncryptionLimits::default().off_thread_wait,
            ),
            store: None,
            payload_stats: Arc::default(),
        })
    }

    /// Applies the `[limits]` that bound sealing and opening.
    pub fn with_limits(mut self, limits: EncryptionLimits) -> Encryption {
        self.off_thread =
            OffThreadBudget::new(limits.off_thread_budget_bytes, limits.off_thread_wait);
        self.limits = limits;
        self
    }

    /// Reloads local keyrings when their files change (or on SIGHUP). When the primary key
    /// changed, current data keys are retired so new payloads are sealed under the new key at
    /// once; payloads sealed under older keys keep opening.
    pub fn spawn_key_reloaders(&self) {
        for (provider, manager) in &self.reloadable {
            let (provider, manager) = (provider.clone(), manager.clone());
            let path = provider.path().to_path_buf();
            crate::reload::spawn_reloader("keyring", vec![path], move || {
                let rotated = provider.reload().map_err(|e| e.to_string())?;
                if rotated {
                    manager.retire_sealing_keys();
                    tracing::info!(primary = %provider.primary_id(), "keyring rotated: new data keys use the new primary key");
                }
                Ok(())
            });
        }
        // PKCS#11 keys by label rotate on the token: look for a newer key now and then. The
        // task ends with the provider.
        for (provider, manager) in &self.token_keys {
            let every = Duration::from_secs(provider.config().rotation_check_seconds);
            let (provider, manager) = (Arc::downgrade(provider), Arc::downgrade(manager));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let (Some(provider), Some(manager)) = (provider.upgrade(), manager.upgrade())
                    else {
                        return;
                    };
                    match provider.refresh_primary().await {
                        Ok(true) => manager.retire_sealing_keys(),
                        Ok(false) => {}
                        Err(e) => tracing::debug!(error = %e, "PKCS#11 rotation check failed"),
                    }
                }
            });
        }
    }

    /// The data key manager of a namespace, or of a fixed scope (Nexus endpoint descriptions).
    fn manager(&self, namespace: &str) -> Result<Arc<DataKeyManager>, ProxyError> {
        if namespace.starts_with(RESERVED_SCOPE_PREFIX) {
            return match namespace {
                NEXUS_ENDPOINT_SCOPE => self.cluster_manager.clone().ok_or_else(|| {
                    ProxyError::Encryption(
                        "Nexus endpoint descriptions are sealed under encryption.cluster_key (or default_key), and neither is set".into(),
                    )
                }),
                _ => Err(ProxyError::UnknownNamespace(namespace.to_string())),
            };
        }
        let managers = match self.managers.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        managers
            .get(namespace)
            .map(|n| &n.manager)
            .or(self.default_manager.as_ref())
            .cloned()
            .ok_or_else(|| ProxyError::UnknownNamespace(namespace.to_string()))
    }

    /// Whether `namespace` is one of the configured `[[namespaces]]`.
    pub fn is_configured(&self, namespace: &str) -> bool {
        let managers = match self.managers.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        managers.contains_key(namespace)
    }

    /// Whether a key seals the payloads of `scope` (a fixed scope such as
    /// [`NEXUS_ENDPOINT_SCOPE`], or a namespace).
    pub fn has_key(&self, scope: &str) -> bool {
        self.manager(scope).is_ok()
    }

    /// Whether every payload of `namespace`'s responses must be sealed by portcullis.
    pub fn encrypted_only(&self, namespace: &str) -> bool {
        let managers = match self.managers.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        managers
            .get(namespace)
            .map_or(self.default_encrypted_only, |n| n.encrypted_only)
    }

    /// Metrics of every configured key, by name.
    pub fn key_stats(&self) -> Vec<crate::telemetry::KeyStats> {
        self.keys
            .iter()
            .map(|k| crate::telemetry::KeyStats {
                name: k.name.clone(),
                crypto: k.manager.metrics().clone(),
                provider: k.stats.clone(),
            })
            .collect()
    }

    /// Every configured key's provider and data key manager, by name (readiness, `check`).
    pub fn key_providers(&self) -> Vec<(String, Arc<dyn KeyProvider>, Arc<DataKeyManager>)> {
        self.keys
            .iter()
            .map(|k| (k.name.clone(), k.provider.clone(), k.manager.clone()))
            .collect()
    }

    /// All data key managers (for metrics).
    pub fn managers(&self) -> impl Iterator<Item = &Arc<DataKeyManager>> {
        self.by_key.values()
    }

    /// Whether [`Encryption::set_namespace_keys`] would accept `namespace_keys`.
    pub fn check_namespace_keys(
        &self,
        namespace_keys: &[NamespaceKey],
    ) -> Result<(), EncryptionSetupError> {
        namespace_managers(&self.by_key, self.default_manager.as_ref(), namespace_keys).map(|_| ())
    }

    /// Re-maps namespaces to keys after a config change (namespaces added, removed or moved to
    /// another configured key). Keys themselves are set at start: a namespace naming a key
    /// that was not configured then is refused.
    pub fn set_namespace_keys(
        &self,
        namespace_keys: &[NamespaceKey],
    ) -> Result<(), EncryptionSetupError> {
        let managers =
            namespace_managers(&self.by_key, self.default_manager.as_ref(), namespace_keys)?;
        match self.managers.write() {
            Ok(mut guard) => *guard = Arc::new(managers),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(managers),
        }
        Ok(())
    }

    /// Seals every payload in `message` (of type `message_type`): under `namespace`'s data key,
    /// and those of a command aimed at another namespace (`targets`) under that namespace's,
    /// so the target can open them.
    pub async fn seal(
        &self,
        namespace: &str,
        targets: &[CommandTarget],
        message_type: &'static str,
        message: &Bytes,
    ) -> Result<Option<Bytes>, ProxyError> {
        if self.index.reaches(message_type) == Some(false) {
            return Ok(None);
        }
        let own = self
            .manager(namespace)?
            .sealing_key(namespace)
            .await
            .map_err(crypto_error)?;
        let mut keys = ScopedKeys::new(namespace, own);
        for target in targets.iter().filter(|t| t.carries_payloads) {
            let manager = self.manager(&target.namespace).map_err(|e| match e {
                ProxyError::UnknownNamespace(_) => ProxyError::UnknownCommandTarget {
                    command: target.command,
                    namespace: target.namespace.clone(),
                },
                other => other,
            })?;
            let key = manager
                .sealing_key(&target.namespace)
                .await
                .map_err(crypto_error)?;
            keys.add(target.namespace.as_str(), key);
        }
        let failures = if self.encode_failures {
            FailureMode::Encode
        } else {
            FailureMode::Keep
        };
        let limits = WalkLimits {
            max_payloads: self.limits.max_payloads,
            max_output: self.upstream_max_request_bytes,
        };
        // A field the API schema in force does not know may hold a payload the walk cannot see:
        // a namespace that must never see plaintext refuses it rather than pass it on.
        let vouch = self.encrypted_only(namespace);
        let services = self.services_for(namespace);
        if !services.is_empty() {
            return self
                .seal_with_services(
                    services,
                    keys,
                    failures,
                    limits,
                    vouch,
                    message_type,
                    message,
                )
                .await;
        }
        let (index, plain, size) = (self.index, message.clone(), message.len());
        let sealed =
            self.off_thread
                .run(size, move || {
                    if vouch {
                        ensure_known(message_type, &plain)?;
                    }
                    message::seal_message(index, message_type, &plain, &keys, failures, limits)
                        .map_err(|e| match e {
                            WalkError::OutputTooLarge {
                                size: sealed,
                                limit,
                            } => ProxyError::MessageTooLarge {
                                what: "sealed request",
                                size: format!("at least {sealed} bytes ({size} before encryption)"),
                                limit,
                            },
                            other => walk_error(other, message_type, true),
                        })
                })
                .await??;
        Ok(sealed.map(Bytes::from))
    }

    /// A served namespace's compression and offload settings.
    fn services_for(&self, namespace: &str) -> crate::offload::PayloadServices {
        let managers = match self.managers.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        managers
            .get(namespace)
            .map(|n| n.services)
            .unwrap_or_default()
    }

    /// Opens every payload this proxy sealed in `message`; others are left exactly as they are
    /// (or, for a namespace marked `encrypted_only`, refused). Payloads sealed for another
    /// namespace (a child's input and result in its parent's history) open with that
    /// namespace's keys; [`Opened::foreign`] names those namespaces, for authorization.
    pub async fn open(
        &self,
        namespace: &str,
        message_type: &'static str,
        message: &Bytes,
    ) -> Result<Opened, ProxyError> {
        let strict = self.encrypted_only(namespace);
        self.open_with(namespace, message_type, message, strict)
            .await
    }

    /// [`Encryption::open`] that lets unsealed payloads through whatever the namespace's
    /// rule: for the codec server, which shows people payloads rather than feeding workers.
    pub async fn open_lenient(
        &self,
        namespace: &str,
        message_type: &'static str,
        message: &Bytes,
    ) -> Result<Opened, ProxyError> {
        self.open_with(namespace, message_type, message, false)
            .await
    }

    async fn open_with(
        &self,
        namespace: &str,
        message_type: &'static str,
        message: &Bytes,
        strict: bool,
    ) -> Result<Opened, ProxyError> {
        if self.index.reaches(message_type) == Some(false) {
            return Ok(Opened::default());
        }
        let options = OpenOptions {
            decode_failures: self.encode_failures,
            // Otherwise a payload marked as ours but malformed fails the call, rather than
            // slipping by unopened.
            pass_through: self.on_open_failure == OpenFailurePolicy::PassThrough,
            limits: WalkLimits {
                max_payloads: self.limits.max_payloads,
                max_output: self.limits.max_response_bytes,
            },
            strict,
        };
        let (index, sealed) = (self.index, message.clone());
        let plan = self
            .off_thread
            .run(message.len(), move || {
                message::plan_open(index, message_type, &sealed, options)
            })
            .await?
            .map_err(|e| walk_error(e, message_type, false))?;
        if !plan.has_sealed() {
            return Ok(Opened::default());
        }
        let mut keys = Vec::new();
        let groups = std::iter::once((namespace, plan.refs())).chain(plan.foreign());
        for (scope, refs) in groups {
            // A fixed scope's payloads open only where the walker puts them in that scope, in
            // a call of that scope (a history naming one as a child's namespace does not).
            let misplaced = scope != namespace && scope.starts_with(RESERVED_SCOPE_PREFIX);
            let manager = if misplaced {
                Err(ProxyError::UnknownNamespace(scope.to_string()))
            } else {
                self.manager(scope)
            };
            let resolved = match manager {
                Ok(manager) => manager.opening_keys(scope, refs.iter().cloned()).await,
                Err(_) => Err(CryptoError::CannotOpen {
                    key_id: refs
                        .first()
                        .map(|r| r.data_key_id.clone())
                        .unwrap_or_default(),
                    namespace: scope.to_string(),
                    reason: OpenFailure::Unwrap(format!(
                        "namespace {scope:?} is not served by this proxy"
                    )),
                }),
            };
            match resolved {
                Ok(k) => keys.push(k),
                Err(e)
                    if !e.is_transient()
                        && self.on_open_failure == OpenFailurePolicy::PassThrough =>
                {
                    tracing::warn!(namespace = scope, error = %e, "passing sealed payloads through unopened");
                    return Ok(Opened::default());
                }
                Err(e) => return Err(crypto_error(e)),
            }
        }
        let foreign: Vec<String> = plan
            .foreign()
            .map(|(ns, _)| ns.to_string())
            .filter(|ns| ns != namespace)
            .collect();
        let sealed = message.clone();
        let opened = self
            .off_thread
            .run(message.len(), move || {
                plan.open_scoped(index, message_type, &sealed, &keys)
            })
            .await?
            .map_err(|e| walk_error(e, message_type, false))?;
        // References to offloaded payloads are sealed like any payload: only an opened answer
        // can hold one.
        let opened = match opened {
            Some(opened) if crate::offload::resolve::may_hold_references(&opened) => Some(
                self.resolve_offloaded(namespace, message_type, opened)
                    .await?,
            ),
            other => other,
        };
        Ok(Opened {
            message: opened,
            foreign,
        })
    }

    /// Opens payloads inside `grpc-status-details-bin` (QueryFailedFailure, …) and the texts
    /// sealed in `grpc-message` and in the details' own message, in place. Returns the other
    /// namespaces whose payloads it opened.
    async fn open_details(
        &self,
        namespace: &str,
        headers: &mut HeaderMap,
    ) -> Result<Vec<String>, ProxyError> {
        if let Some(value) = headers.get(GRPC_MESSAGE) {
            let text = percent_decode(value.as_bytes());
            if let Some(opened) = self.open_text(namespace, &text).await? {
                if let Ok(value) = HeaderValue::from_str(&percent_encode(&opened)) {
                    headers.insert(GRPC_MESSAGE, value);
                }
            }
        }
        let Some(value) = headers.get(STATUS_DETAILS) else {
            return Ok(Vec::new());
        };
        let Ok(raw) = LENIENT_BASE64.decode(value.as_bytes()) else {
            // Not ours to judge: pass details we cannot parse through untouched.
            return Ok(Vec::new());
        };
        let raw = Bytes::from(raw);
        let opened = self.open(namespace, walker::GRPC_STATUS, &raw).await?;
        let mut changed = opened.message.is_some();
        let mut status = opened.message.map_or(raw, Bytes::from);
        if let Some(text) = status_message(&status) {
            if let Some(plain) = self.open_text(namespace, &text).await? {
                status = Bytes::from(replace_status_message(&status, &plain));
                changed = true;
            }
        }
        if changed {
            if let Ok(value) = HeaderValue::from_str(&STANDARD_NO_PAD.encode(&status)) {
                headers.insert(STATUS_DETAILS, value);
            }
        }
        Ok(opened.foreign)
    }

    /// Opens the texts sealed in `text` (see [`message::SEALED_TEXT_PREFIX`]), all of the
    /// call's namespace. `None`: there are none.
    async fn open_text(&self, namespace: &str, text: &str) -> Result<Option<String>, ProxyError> {
        let found = message::find_sealed_texts(text);
        if found.is_empty() {
            return Ok(None);
        }
        let pass_through = self.on_open_failure == OpenFailurePolicy::PassThrough;
        let refs: Result<Vec<_>, _> = found.iter().map(message::sealed_text_ref).collect();
        let opened = match refs {
            Ok(refs) => match self.manager(namespace)?.opening_keys(namespace, refs).await {
                Ok(keys) => message::open_texts(text, &found, &keys),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        match opened {
            Ok(plain) => Ok(Some(plain)),
            Err(e) if pass_through && !e.is_transient() => {
                tracing::warn!(namespace, error = %e, "passing a sealed text through unopened");
                Ok(None)
            }
            Err(e) => Err(crypto_error(e)),
        }
    }
}

/// `google.rpc.Status.message` (field 2), if set.
fn status_message(status: &[u8]) -> Option<String> {
    let mut message = None;
    for field in wire::fields(status) {
        let field = field.ok()?;
        if field.number == 2 && field.wire_type == wire::WireType::Len {
            message = Some(String::from_utf8_lossy(field.value).into_owned());
        }
    }
    message
}

/// `status` with its message (field 2) replaced; every other field as it was.
fn replace_status_message(status: &[u8], message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(status.len());
    let mut written = false;
    for field in wire::fields(status).flatten() {
        if field.number == 2 {
            if !written {
                wire::put_len_field(&mut out, 2, message.as_bytes());
                written = true;
            }
            continue;
        }
        out.extend_from_slice(field.raw);
    }
    out
}

/// An opened message, and the other namespaces whose payloads were opened in it.
#[derive(Debug, Default)]
pub struct Opened {
    /// `None`: nothing changed.
    pub message: Option<Vec<u8>>,
    pub foreign: Vec<String>,
}

/// gRPC peers send `-bin` headers with or without padding.
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Refuses a message with fields the API schema in force does not know (`encrypted_only`).
fn ensure_known(message_type: &str, message: &[u8]) -> Result<(), ProxyError> {
    unknown::ensure_known(message_type, message).map_err(|e| {
        ProxyError::Encryption(format!("{e}: it could carry a payload this proxy cannot seal, and the namespace is encrypted_only"))
    })
}

fn crypto_error(error: CryptoError) -> ProxyError {
    ProxyError::Crypto(error)
}

fn walk_error(error: WalkError, message_type: &str, request: bool) -> ProxyError {
    match error {
        WalkError::TooManyPayloads { limit } => ProxyError::TooManyPayloads {
            message: message_type.to_string(),
            limit,
        },
        WalkError::OutputTooLarge { size, limit } => ProxyError::MessageTooLarge {
            what: if request {
                "sealed request"
            } else {
                "opened response"
            },
            size: format!("at least {size} bytes"),
            limit,
        },
        WalkError::Visitor(inner) => match inner.downcast::<CryptoError>() {
            Ok(crypto) => ProxyError::Crypto(*crypto),
            Err(other) => match other.downcast::<PlaintextPayload>() {
                Ok(plaintext) => ProxyError::PlaintextResponse(plaintext.to_string()),
                Err(other) => ProxyError::Encryption(format!("{message_type}: {other}")),
            },
        },
        WalkError::Malformed { .. }
        | WalkError::TooDeep { .. }
        | WalkError::FailureAttributes { .. }
            if request =>
        {
            ProxyError::MalformedMessage {
                message: message_type.to_string(),
                reason: error.to_string(),
            }
        }
        other => ProxyError::Encryption(format!("{message_type}: {other}")),
    }
}

#[derive(Clone)]
pub struct EncryptLayer {
    encryption: Arc<Encryption>,
}

impl EncryptLayer {
    pub fn new(encryption: Arc<Encryption>) -> Self {
        EncryptLayer { encryption }
    }
}

impl<S> Layer<S> for EncryptLayer {
    type Service = EncryptService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        EncryptService {
            inner,
            encryption: self.encryption.clone(),
        }
    }
}

#[derive(Clone)]
pub struct EncryptService<S> {
    inner: S,
    encryption: Arc<Encryption>,
}

impl<S> Service<GrpcRequest> for EncryptService<S>
where
    S: Service<GrpcRequest, Response = GrpcResponse, Error = ProxyError, Future = CallFuture>
        + Clone
        + Send
        + 'static,
{
    type Response = GrpcResponse;
    type Error = ProxyError;
    type Future = CallFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: GrpcRequest) -> CallFuture {
        let encryption = self.encryption.clone();
        let inner = self.inner.clone();
        Box::pin(async move {
            let method = request.method;
            let (input, output) = (method.input.full_name(), method.output.full_name());
            let Some(namespace) = request.namespace.clone() else {
                // Cluster-scoped calls carry no namespace to seal under. Those whose payloads
                // all belong to a fixed scope (the Nexus endpoint methods: descriptions) are
                // sealed and opened under its key; any other that could carry payloads is
                // refused rather than forwarded in plaintext.
                let scope = cluster_scope(encryption.index, input, output).ok_or_else(|| {
                    ProxyError::Encryption(format!(
                        "{} is cluster-scoped but can carry payloads",
                        method.path
                    ))
                })?;
                return match scope {
                    None => inner.oneshot(request).await,
                    Some(scope)
                        if !encryption.has_key(scope)
                            && !holds_payloads(encryption.index, input, &request.message) =>
                    {
                        // No key for the scope, and nothing to seal: an endpoint without a
                        // description. An answer holding one still needs the key.
                        let response = inner.oneshot(request).await?;
                        Box::pin(seal_and_open_response(&encryption, scope, output, response)).await
                    }
                    Some(scope) => sealed_call(&encryption, inner, request, scope).await,
                };
            };
            sealed_call(&encryption, inner, request, &namespace).await
        })
    }
}

/// Seals the request's payloads under `namespace`'s keys (and its command targets' keys),
/// forwards it, and opens the answer.
async fn sealed_call<S>(
    encryption: &Encryption,
    inner: S,
    mut request: GrpcRequest,
    namespace: &str,
) -> Result<GrpcResponse, ProxyError>
where
    S: Service<GrpcRequest, Response = GrpcResponse, Error = ProxyError, Future = CallFuture>,
{
    let method = request.method;
    // Sealing and opening are boxed: inline, their (large) futures would stay in the call's
    // future while it waits for the upstream (a held long poll waits for minutes).
    if let Some(sealed) = Box::pin(encryption.seal(
        namespace,
        &request.targets,
        method.input.full_name(),
        &request.message,
    ))
    .await?
    {
        request.message = sealed;
    }
    let response = inner.oneshot(request).await?;
    Box::pin(seal_and_open_response(
        encryption,
        namespace,
        method.output.full_name(),
        response,
    ))
    .await
}

/// Opens an answer's payloads, error details and sealed texts.
async fn seal_and_open_response(
    encryption: &Encryption,
    namespace: &str,
    output: &'static str,
    mut response: GrpcResponse,
) -> Result<GrpcResponse, ProxyError> {
    if let Some(message) = &response.message {
        let opened = encryption.open(namespace, output, message).await?;
        if let Some(opened) = opened.message {
            response.message = Some(Bytes::from(opened));
        }
        response.foreign_namespaces = opened.foreign;
    }
    for headers in [&mut response.headers, &mut response.trailers] {
        let foreign = encryption.open_details(namespace, headers).await?;
        response.foreign_namespaces.extend(foreign);
    }
    Ok(response)
}

/// The fixed scope of a cluster-scoped call's payloads: `Some(None)` when neither its request
/// nor its answer can hold a payload, `Some(Some(scope))` when every payload either can hold
/// belongs to one fixed scope, `None` otherwise (the call cannot be sealed).
fn cluster_scope(index: &PayloadIndex, input: &str, output: &str) -> Option<Option<&'static str>> {
    let mut scope = None;
    for message in [input, output] {
        if index.reaches(message) == Some(false) {
            continue;
        }
        match (index.fixed_scope(message), scope) {
            (Some(found), None) => scope = Some(found),
            (Some(found), Some(known)) if found == known => {}
            _ => return None,
        }
    }
    Some(scope)
}

/// Whether `message` (a serialized `message_type`) holds any payload. Malformed: it might.
fn holds_payloads(index: &PayloadIndex, message_type: &str, message: &[u8]) -> bool {
    let mut found = false;
    let mut visitor = |_: &walker::PayloadContext<'_>, _: &[u8]| {
        found = true;
        Ok(None)
    };
    let walked = walker::rewrite_named(
        index,
        message_type,
        message,
        &mut visitor,
        &walker::WalkOptions::default().request(),
    );
    found || walked.is_err()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cluster-scoped calls: the Nexus endpoint methods seal under the endpoint scope, those
    /// without payloads pass, anything else that could hold a payload has no scope (refused).
    #[test]
    fn cluster_calls_are_sealed_only_under_a_fixed_scope() {
        let index = PayloadIndex::global();
        let schema = crate::schema::Schema::global();
        let mut cluster_with_payloads = Vec::new();
        for method in schema.methods() {
            if method.scope != crate::schema::Scope::Cluster {
                continue;
            }
            let (input, output) = (method.input.full_name(), method.output.full_name());
            match cluster_scope(index, input, output) {
                Some(Some(scope)) => {
                    assert_eq!(scope, NEXUS_ENDPOINT_SCOPE, "{}", method.path);
                    cluster_with_payloads.push(method.name.as_str());
                }
                Some(None) => {}
                None => panic!(
                    "{} is cluster-scoped with payloads of no fixed scope",
                    method.path
                ),
            }
        }
        cluster_with_payloads.sort_unstable();
        assert_eq!(
            cluster_with_payloads,
            [
                "CreateNexusEndpoint",
                "GetNexusEndpoint",
                "ListNexusEndpoints",
                "UpdateNexusEndpoint"
            ]
        );
        assert_eq!(
            cluster_scope(
                index,
                "temporal.api.workflowservice.v1.StartWorkflowExecutionRequest",
                "temporal.api.operatorservice.v1.GetNexusEndpointResponse"
            ),
            None
        );
        // A request without a description holds nothing to seal.
        use prost::Message as _;
        use temporalio_protos::temporal::api::nexus::v1::EndpointSpec;
        use temporalio_protos::temporal::api::operatorservice::v1::CreateNexusEndpointRequest;
        const CREATE: &str = "temporal.api.operatorservice.v1.CreateNexusEndpointRequest";
        let bare = CreateNexusEndpointRequest {
            spec: Some(EndpointSpec {
                name: "e".into(),
                ..Default::default()
            }),
        };
        assert!(!holds_payloads(index, CREATE, &bare.encode_to_vec()));
        let mut described = bare.clone();
        if let Some(spec) = described.spec.as_mut() {
            spec.description = Some(Default::default());
        }
        assert!(holds_payloads(index, CREATE, &described.encode_to_vec()));
        assert!(holds_payloads(index, CREATE, b"\x0a\x09"));
    }

    #[tokio::test]
    async fn large_messages_wait_for_room_and_give_up_with_resource_exhausted() {
        let budget = Arc::new(OffThreadBudget::new(
            1024 * 1024,
            Duration::from_millis(200),
        ));
        let (release, released) = std::sync::mpsc::channel::<()>();
        // One message holds the whole budget until told to finish.
        let holder = {
            let budget = budget.clone();
            tokio::spawn(async move {
                budget
                    .run(1024 * 1024, move || {
                        let _ = released.recv();
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Small messages never wait: they run on the caller's thread.
        assert_eq!(budget.run(1000, || 7).await.unwrap(), 7);
        let started = std::time::Instant::now();
        let err = budget.run(512 * 1024, || ()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
        assert!(started.elapsed() >= Duration::from_millis(200));
        release.send(()).unwrap();
        holder.await.unwrap().unwrap();
        // Room again; a message larger than the whole budget runs alone.
        assert_eq!(budget.run(8 * 1024 * 1024, || 8).await.unwrap(), 8);
    }
}
