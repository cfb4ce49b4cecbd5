//! Sealing with compression and offload: the [`SealExtras`] the encryption stage hands to the
//! sealing walk. The walk is synchronous, so offloaded objects are sealed and collected here
//! ([`SealServices::objects`]) and written by the caller before it forwards anything.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use super::reference::{sha256, Reference};
use super::ObjectStore;
use crate::crypto::envelope::Nonces;
use crate::crypto::message::SealExtras;
use crate::crypto::{CompressionConfig, SealingKey};
use crate::payload::walker::{self, PayloadContext, PayloadIndex, WalkError, WalkOptions};

/// Payloads smaller than this are never offloaded, even to fit a request under the upstream's
/// limit: the sealed reference alone is a few hundred bytes.
pub const MIN_OFFLOAD_BYTES: usize = 1024;
/// What sealing adds to a payload at most (the envelope; generous, for KMS-wrapped keys).
const ENVELOPE_OVERHEAD: usize = 512;
/// A sealed reference's size at most.
const SEALED_REFERENCE: usize = 1024;

/// An object to write before the request goes upstream.
#[derive(Debug, Clone)]
pub struct PendingObject {
    pub key: String,
    pub sha256: [u8; 32],
    /// The sealed original Payload.
    pub bytes: Bytes,
}

/// Where offloaded objects go.
#[derive(Debug, Clone)]
pub struct OffloadTarget {
    pub bucket: String,
    pub prefix: String,
    /// Payloads at least this large are offloaded.
    pub min_bytes: usize,
}

/// Compression and offload for one call's sealing walk.
#[derive(Debug, Default)]
pub struct SealServices {
    compression: Option<CompressionConfig>,
    offload: Option<OffloadTarget>,
    objects: Vec<PendingObject>,
    compressed: Option<Arc<AtomicU64>>,
}

impl SealServices {
    pub fn new(compression: Option<CompressionConfig>, offload: Option<OffloadTarget>) -> Self {
        SealServices {
            compression,
            offload,
            objects: Vec::new(),
            compressed: None,
        }
    }

    /// Counts compressed payloads here (a metric).
    pub fn counting(mut self, compressed: Arc<AtomicU64>) -> Self {
        self.compressed = Some(compressed);
        self
    }

    pub fn is_empty(&self) -> bool {
        self.compression.is_none() && self.offload.is_none()
    }

    /// The objects sealed so far, to be written before the request is forwarded.
    pub fn take_objects(&mut self) -> Vec<PendingObject> {
        std::mem::take(&mut self.objects)
    }

    /// Bytes of the objects collected so far.
    pub fn object_bytes(&self) -> usize {
        self.objects.iter().map(|o| o.bytes.len()).sum()
    }
}

impl SealExtras for SealServices {
    fn seal(
        &mut self,
        ctx: &PayloadContext<'_>,
        key: &SealingKey,
        nonces: &mut Nonces,
        payload: &[u8],
    ) -> Result<Option<Vec<u8>>, WalkError> {
        // Failure attributes are read back by the walker when failures are decoded: they stay
        // in the message (compressed, perhaps).
        let offload = self
            .offload
            .as_ref()
            .filter(|o| payload.len() >= o.min_bytes && !ctx.is_failure_attributes());
        let compressed = self.compression.and_then(|c| c.compress(payload));
        if compressed.is_some() {
            if let Some(counter) = &self.compressed {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
        let sealed = match (compressed, offload) {
            (None, None) => return Ok(None),
            (Some(compressed), _) => key.seal_compressed(&compressed, payload.len(), nonces),
            (None, Some(_)) => key.seal(payload),
        }
        .map_err(WalkError::visitor)?;
        let Some(offload) = offload else {
            return Ok(Some(sealed));
        };
        let digest = sha256(&sealed);
        let object_key = ObjectStore::object_key(&offload.prefix, key.namespace(), &digest);
        let reference = Reference {
            bucket: offload.bucket.clone(),
            key: object_key.clone(),
            size: sealed.len() as u64,
            sha256: digest,
            payload_size: payload.len() as u64,
        };
        let sealed_reference = key
            .seal(&reference.to_payload())
            .map_err(WalkError::visitor)?;
        self.objects.push(PendingObject {
            key: object_key,
            sha256: digest,
            bytes: Bytes::from(sealed),
        });
        Ok(Some(sealed_reference))
    }
}

/// The offload threshold that brings a request whose sealed form would pass `limit` under it:
/// payloads are taken largest first (none under [`MIN_OFFLOAD_BYTES`]) until the estimate fits.
/// `None`: offloading cannot make it fit (or the message cannot be walked).
pub fn threshold_to_fit(
    index: &PayloadIndex,
    message_type: &str,
    message: &[u8],
    limit: usize,
) -> Option<usize> {
    let mut sizes = Vec::new();
    let mut visitor = |_: &PayloadContext<'_>, payload: &[u8]| {
        sizes.push(payload.len());
        Ok(None)
    };
    walker::rewrite_named(
        index,
        message_type,
        message,
        &mut visitor,
        &WalkOptions::default().request(),
    )
    .ok()?;
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    let mut estimate = message.len() + sizes.len() * ENVELOPE_OVERHEAD;
    for size in sizes {
        if size < MIN_OFFLOAD_BYTES {
            return None;
        }
        estimate = estimate.saturating_sub(size) + SEALED_REFERENCE;
        if estimate <= limit {
            return Some(size);
        }
    }
    None
}
