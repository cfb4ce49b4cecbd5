//! The encryption stage's side of compression and offload (see [`crate::offload`]): sealing
//! with [`SealServices`] and writing the objects before anything is forwarded, and resolving
//! references in opened answers. Kept apart from the plain sealing and opening paths, which
//! namespaces without compression or offload keep using unchanged.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::try_join_all;
use tokio::sync::OwnedSemaphorePermit;

use super::{
    crypto_error, ensure_known, walk_error, Encryption, OffThreadBudget, OFF_THREAD_BYTES,
};
use crate::crypto::message::{self, ScopedKeys};
use crate::crypto::{CryptoError, SealingKey};
use crate::error::ProxyError;
use crate::offload::resolve::plan_resolve;
use crate::offload::seal::{threshold_to_fit, OffloadTarget};
use crate::offload::{ObjectStore, OffloadError, PayloadServices, SealServices};
use crate::payload::walker::{FailureMode, WalkError, WalkLimits};

impl OffThreadBudget {
    /// Takes `size` bytes (in KiB, at most the whole budget) of the budget for buffers held
    /// across an await: objects being written, objects fetched and the answer they expand to.
    /// `None`: too small to count.
    async fn reserve(&self, size: usize) -> Result<Option<OwnedSemaphorePermit>, ProxyError> {
        if size < OFF_THREAD_BYTES {
            return Ok(None);
        }
        let wanted = u32::try_from(size.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .min(self.total_kib);
        match tokio::time::timeout(self.wait, self.kib.clone().acquire_many_owned(wanted)).await {
            Ok(Ok(permit)) => Ok(Some(permit)),
            Ok(Err(_)) | Err(_) => Err(ProxyError::Overloaded(format!(
                "no room within {:?} for {size} bytes of offloaded payloads (budget {} KiB for large messages)",
                self.wait, self.total_kib
            ))),
        }
    }
}

impl Encryption {
    /// Attaches the `[offload]` object store: namespaces with `offload` write to it, and
    /// references in answers are resolved from it.
    pub fn with_offload(mut self, store: Arc<ObjectStore>) -> Encryption {
        self.payload_stats = store.stats().clone();
        self.store = Some(store);
        self
    }

    /// The object store, if one is configured.
    pub fn object_store(&self) -> Option<&Arc<ObjectStore>> {
        self.store.as_ref()
    }

    /// Compression and offload counters.
    pub fn payload_stats(&self) -> &Arc<crate::telemetry::OffloadStats> {
        &self.payload_stats
    }

    /// [`Encryption::seal`] for a namespace with compression or offload: seals in one walk,
    /// collecting the offloaded objects; when the sealed request would pass the upstream's
    /// limit, seals again offloading the largest payloads until it fits. Then writes every
    /// object, and only then returns the request to forward.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn seal_with_services(
        &self,
        services: PayloadServices,
        keys: ScopedKeys<SealingKey>,
        failures: FailureMode,
        limits: WalkLimits,
        vouch: bool,
        message_type: &'static str,
        message: &Bytes,
    ) -> Result<Option<Bytes>, ProxyError> {
        let offload = match services.offload {
            Some(settings) => {
                let store = self
                    .store
                    .as_ref()
                    .ok_or(ProxyError::Offload(OffloadError::NotConfigured))?;
                Some((
                    settings.when_too_large,
                    OffloadTarget {
                        bucket: store.bucket().to_string(),
                        prefix: store.prefix().to_string(),
                        min_bytes: settings.min_bytes,
                    },
                ))
            }
            None => None,
        };
        let compression = services.compression;
        let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let compressed = counter.clone();
        let (index, plain, size) = (self.index, message.clone(), message.len());
        let (sealed, objects) = self
            .off_thread
            .run(size, move || {
                if vouch {
                    ensure_known(message_type, &plain)?;
                }
                let attempt = |target: Option<OffloadTarget>| {
                    let mut extras =
                        SealServices::new(compression, target).counting(compressed.clone());
                    message::seal_message_with(
                        index,
                        message_type,
                        &plain,
                        &keys,
                        failures,
                        limits,
                        Some(&mut extras),
                    )
                    .map(|sealed| (sealed, extras.take_objects()))
                };
                let first = attempt(offload.as_ref().map(|(_, target)| target.clone()));
                let result = match (first, &offload) {
                    (Err(WalkError::OutputTooLarge { .. }), Some((true, target))) => {
                        match threshold_to_fit(index, message_type, &plain, limits.max_output)
                            .filter(|t| *t < target.min_bytes)
                        {
                            Some(min_bytes) => attempt(Some(OffloadTarget {
                                min_bytes,
                                ..target.clone()
                            })),
                            None => attempt(Some(target.clone())),
                        }
                    }
                    (first, _) => first,
                };
                result.map_err(|e| match e {
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
        self.payload_stats.payloads_compressed.fetch_add(
            counter.load(std::sync::atomic::Ordering::Relaxed),
            std::sync::atomic::Ordering::Relaxed,
        );
        if !objects.is_empty() {
            let store = self
                .store
                .as_ref()
                .ok_or(ProxyError::Offload(OffloadError::NotConfigured))?;
            let bytes = objects.iter().map(|o| o.bytes.len()).sum();
            let _held = self.off_thread.reserve(bytes).await?;
            store.put_all(objects).await.map_err(ProxyError::Offload)?;
        }
        Ok(sealed.map(Bytes::from))
    }

    /// Replaces the references in an opened answer with the payloads they stand for: plan
    /// (sizes checked against the response limit), fetch (digests checked), resolve the
    /// objects' keys, write.
    pub(super) async fn resolve_offloaded(
        &self,
        namespace: &str,
        message_type: &'static str,
        opened: Vec<u8>,
    ) -> Result<Vec<u8>, ProxyError> {
        let limits = WalkLimits {
            max_payloads: self.limits.max_payloads,
            max_output: self.limits.max_response_bytes,
        };
        let index = self.index;
        let (plan, opened) = self
            .off_thread
            .run(opened.len(), move || {
                (plan_resolve(index, message_type, &opened, limits), opened)
            })
            .await?;
        let Some(plan) = plan.map_err(|e| resolve_error(e, message_type))? else {
            return Ok(opened);
        };
        let store = self
            .store
            .as_ref()
            .ok_or(ProxyError::Offload(OffloadError::NotConfigured))?;
        let mut distinct = HashMap::new();
        for (_, reference) in plan.references() {
            distinct.entry(reference.key.clone()).or_insert(reference);
        }
        let fetched_bytes: u64 = distinct.values().map(|r| r.size).sum();
        let expanded: u64 = plan.references().iter().map(|(_, r)| r.payload_size).sum();
        // The fetched objects and the answer they expand to are held at once.
        let held = usize::try_from(fetched_bytes.saturating_add(expanded)).unwrap_or(usize::MAX);
        let permit = self.off_thread.reserve(held).await?;
        let objects: HashMap<String, Bytes> =
            try_join_all(distinct.values().map(|reference| async move {
                store
                    .get(reference)
                    .await
                    .map(|bytes| (reference.key.clone(), bytes))
            }))
            .await
            .map_err(ProxyError::Offload)?
            .into_iter()
            .collect();

        // The data keys that open the objects, by namespace (usually the ones that opened the
        // references, still cached).
        let mut groups: Vec<(Option<String>, Vec<crate::crypto::EnvelopeRef>)> = Vec::new();
        for (scope, reference) in plan.references() {
            let object = objects
                .get(&reference.key)
                .ok_or(ProxyError::Encryption("an object was not fetched".into()))?;
            let envelope = crate::crypto::inspect(object)
                .map_err(crypto_error)?
                .ok_or_else(|| {
                    ProxyError::Offload(OffloadError::Corrupt {
                        bucket: reference.bucket.clone(),
                        key: reference.key.clone(),
                        reason: "the object is not sealed by portcullis".into(),
                    })
                })?;
            match groups.iter_mut().find(|(s, _)| s == scope) {
                Some((_, refs)) if !refs.contains(&envelope) => refs.push(envelope),
                Some(_) => {}
                None => groups.push((scope.clone(), vec![envelope])),
            }
        }
        let mut keys = Vec::with_capacity(groups.len());
        for (scope, refs) in groups {
            let name = scope.as_deref().unwrap_or(namespace);
            let resolved = self
                .manager(name)?
                .opening_keys(name, refs)
                .await
                .map_err(crypto_error)?;
            keys.push((scope, resolved));
        }
        let write = move || {
            let _permit = permit;
            plan.apply(&opened, &objects, &keys)
        };
        let written = if held < OFF_THREAD_BYTES {
            write()
        } else {
            tokio::task::spawn_blocking(write)
                .await
                .map_err(|e| ProxyError::Encryption(format!("the resolving task failed: {e}")))?
        };
        written.map_err(|e| resolve_error(e, message_type))
    }
}

fn resolve_error(error: WalkError, message_type: &str) -> ProxyError {
    match error {
        WalkError::Visitor(inner) => match inner.downcast::<OffloadError>() {
            Ok(offload) => ProxyError::Offload(*offload),
            Err(other) => match other.downcast::<CryptoError>() {
                Ok(crypto) => ProxyError::Crypto(*crypto),
                Err(other) => ProxyError::Encryption(format!("{message_type}: {other}")),
            },
        },
        other => walk_error(other, message_type, false),
    }
}
