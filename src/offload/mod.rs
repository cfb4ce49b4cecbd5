//! Large-payload offload ("claim check") to S3-compatible object storage, per namespace.
//!
//! On the way in, a payload of at least `min_bytes` (and, when a request would otherwise pass
//! the upstream's message limit, the largest payloads until it fits) is sealed as usual into an
//! object of its own, stored under a content-addressed key (`<prefix><namespace>/<SHA-256 of the
//! object>`), and replaced upstream by a small sealed reference (bucket, key, size, digest; see
//! `OffloadReference` in proto/portcullis/v1/envelope.proto). The walk that seals is synchronous:
//! it seals and collects the objects ([`seal::SealServices`]); the proxy writes them all, and
//! only then forwards the request. A write that fails fails the call with UNAVAILABLE; nothing
//! is forwarded.
//!
//! On the way back, after the envelopes are opened, the references are resolved in the same
//! plan/fetch/write pattern as data keys: one walk finds them and sizes the answer (the
//! response limit applies to the answer as the caller gets it, references expanded), the
//! objects are fetched (a bounded cache first, bounded concurrency), each digest is checked,
//! and the second half writes every object's opened payload in place ([`resolve`]). A missing
//! object or a wrong digest fails the call with DATA_LOSS naming the key; never a wrong payload.

pub mod reference;
pub mod resolve;
pub mod seal;
pub mod store;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use reference::Reference;
pub use seal::{PendingObject, SealServices};
pub use store::{ObjectStore, OffloadError};

use crate::crypto::aws_kms::StaticCredentials;
use crate::crypto::CompressionConfig;

/// The `[offload]` section: the object store that namespaces with `offload` write to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OffloadConfig {
    /// The bucket objects are written to (references name their bucket: objects written
    /// before a change of bucket keep resolving from the old one).
    pub bucket: String,
    /// The bucket's region.
    #[serde(default = "default_region")]
    pub region: String,
    /// An S3-compatible endpoint instead of AWS's (MinIO, Ceph, a local store for tests).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Address buckets by path (`http://host/bucket/key`) rather than by host name: what most
    /// S3-compatible stores need.
    #[serde(default)]
    pub force_path_style: bool,
    /// Key prefix; each namespace's objects are under `<prefix><namespace>/`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Bound on each object store call, retries included. May be fractional.
    #[serde(
        default = "default_timeout",
        rename = "timeout_seconds",
        with = "crate::crypto::aws_kms::seconds"
    )]
    pub timeout: Duration,
    /// Attempts per call (the SDK's standard retry mode, with backoff), within the timeout.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Fixed credentials instead of the SDK's default chain (tests and development only).
    #[serde(default)]
    pub credentials: Option<StaticCredentials>,
    /// Recently written and fetched objects (sealed, digest checked) kept in memory, in bytes.
    #[serde(default = "default_cache_bytes")]
    pub cache_bytes: u64,
    /// The largest object read back; a reference to a larger one fails the call.
    #[serde(default = "default_max_object")]
    pub max_object_bytes: usize,
    /// Object store calls in flight at once, across all calls.
    #[serde(default = "default_concurrency")]
    pub max_concurrent_requests: usize,
}

fn default_region() -> String {
    "us-east-1".into()
}
fn default_prefix() -> String {
    "portcullis/".into()
}
fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_attempts() -> u32 {
    3
}
fn default_cache_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_max_object() -> usize {
    64 * 1024 * 1024
}
fn default_concurrency() -> usize {
    16
}

impl OffloadConfig {
    /// A config with every default, for `bucket`.
    pub fn new(bucket: impl Into<String>) -> OffloadConfig {
        OffloadConfig {
            bucket: bucket.into(),
            region: default_region(),
            endpoint: None,
            force_path_style: false,
            prefix: default_prefix(),
            timeout: default_timeout(),
            max_attempts: default_attempts(),
            credentials: None,
            cache_bytes: default_cache_bytes(),
            max_object_bytes: default_max_object(),
            max_concurrent_requests: default_concurrency(),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        let invalid = |msg: &str| Err(format!("offload.{msg}"));
        if self.bucket.len() < 3 || self.bucket.len() > 63 {
            return invalid("bucket must be 3 to 63 characters");
        }
        if self.region.trim().is_empty() {
            return invalid("region is empty");
        }
        if let Some(endpoint) = &self.endpoint {
            let scheme_ok = endpoint.starts_with("https://") || endpoint.starts_with("http://");
            if !scheme_ok || endpoint.parse::<http::Uri>().is_err() {
                return invalid("endpoint must be an http:// or https:// URL");
            }
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(300) {
            return invalid("timeout_seconds must be positive and at most 300");
        }
        if self.max_attempts == 0 || self.max_attempts > 10 {
            return invalid("max_attempts must be 1 to 10");
        }
        if self.max_object_bytes == 0 || self.max_concurrent_requests == 0 {
            return invalid("max_object_bytes and max_concurrent_requests must be positive");
        }
        if let Some(creds) = &self.credentials {
            if creds.access_key_id.is_empty() || creds.secret_access_key.is_empty() {
                return invalid("credentials need access_key_id and secret_access_key");
            }
        }
        Ok(())
    }
}

/// `offload = { … }` of a `[[namespaces]]` entry: present means on (and `[offload]` must be set).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NamespaceOffload {
    /// Payloads at least this large (serialized, before sealing) are stored as objects.
    #[serde(default = "default_min_bytes")]
    pub min_bytes: usize,
    /// Also offload smaller payloads (largest first, none under 1 KiB) when the sealed request
    /// would otherwise pass `encryption.upstream_max_request_bytes`.
    #[serde(default = "yes")]
    pub when_too_large: bool,
}

fn default_min_bytes() -> usize {
    256 * 1024
}
fn yes() -> bool {
    true
}

impl Default for NamespaceOffload {
    fn default() -> Self {
        NamespaceOffload {
            min_bytes: default_min_bytes(),
            when_too_large: true,
        }
    }
}

/// What a namespace does to its payloads besides sealing them. Default: nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PayloadServices {
    pub compression: Option<CompressionConfig>,
    pub offload: Option<NamespaceOffload>,
}

impl PayloadServices {
    pub fn is_empty(&self) -> bool {
        self.compression.is_none() && self.offload.is_none()
    }
}

#[cfg(test)]
mod tests;
