//! The object store: S3 (or an S3-compatible store) through the official AWS SDK for Rust,
//! built like the `aws-kms` key provider (rustls with ring, the SDK's credentials chain or fixed
//! test credentials, an endpoint override, bounded calls with standard retries), with a bounded
//! cache of recently written and fetched objects (sealed: the cache holds no plaintext).

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use bytes::{Bytes, BytesMut};
use futures_util::future::try_join_all;
use tokio::sync::Semaphore;

use super::reference::{hex, sha256, MalformedReference, Reference};
use super::seal::PendingObject;
use super::OffloadConfig;
use crate::telemetry::OffloadStats;

/// Why offloading or resolving a payload failed. Writes that fail and a store that cannot be
/// reached are UNAVAILABLE (retry later); a missing object, or one that does not match its
/// reference, is DATA_LOSS naming the key.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OffloadError {
    #[error("cannot write the offloaded payload {key} to the object store (nothing was forwarded): {reason}")]
    WriteFailed { key: String, reason: String },
    #[error("cannot read the offloaded payload {key} from the object store: {reason}")]
    ReadFailed { key: String, reason: String },
    #[error("the offloaded payload {key} is missing from bucket {bucket}")]
    Missing { bucket: String, key: String },
    #[error(
        "the offloaded payload {key} in bucket {bucket} does not match its reference: {reason}"
    )]
    Corrupt {
        bucket: String,
        key: String,
        reason: String,
    },
    #[error("{0}")]
    Malformed(#[from] MalformedReference),
    #[error(
        "the offloaded payload {key} is {size} bytes, more than offload.max_object_bytes ({limit})"
    )]
    TooLarge {
        key: String,
        size: u64,
        limit: usize,
    },
    #[error("payloads of this call are offloaded, but no [offload] object store is configured")]
    NotConfigured,
}

impl OffloadError {
    /// Missing or not what the reference says: the payload is lost (DATA_LOSS).
    pub fn is_data_loss(&self) -> bool {
        matches!(
            self,
            OffloadError::Missing { .. }
                | OffloadError::Corrupt { .. }
                | OffloadError::Malformed(_)
        )
    }

    /// The store could not be reached or refused: retrying may work (UNAVAILABLE).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            OffloadError::WriteFailed { .. } | OffloadError::ReadFailed { .. }
        )
    }
}

type CacheKey = (String, String);

/// The configured object store.
pub struct ObjectStore {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    timeout: Duration,
    max_object_bytes: usize,
    permits: Arc<Semaphore>,
    /// (bucket, key) → (digest, sealed object), weighed by size.
    cache: moka::future::Cache<CacheKey, ([u8; 32], Bytes)>,
    stats: Arc<OffloadStats>,
}

impl std::fmt::Debug for ObjectStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStore")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl ObjectStore {
    /// Builds the client; nothing is sent yet (`portcullis check` and the first call show a
    /// wrong bucket or missing credentials).
    pub async fn new(config: &OffloadConfig) -> Result<ObjectStore, String> {
        config.validate()?;
        let client = sdk_client(config).await;
        let cache = moka::future::Cache::builder()
            .max_capacity(config.cache_bytes)
            .weigher(|_: &CacheKey, value: &([u8; 32], Bytes)| {
                u32::try_from(value.1.len()).unwrap_or(u32::MAX)
            })
            .build();
        Ok(ObjectStore {
            client,
            bucket: config.bucket.clone(),
            prefix: config.prefix.clone(),
            timeout: config.timeout,
            max_object_bytes: config.max_object_bytes,
            permits: Arc::new(Semaphore::new(config.max_concurrent_requests)),
            cache,
            stats: Arc::new(OffloadStats::default()),
        })
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn stats(&self) -> &Arc<OffloadStats> {
        &self.stats
    }

    pub fn client(&self) -> &aws_sdk_s3::Client {
        &self.client
    }

    /// The content-addressed key of an object of `namespace` with digest `sha256`.
    pub fn object_key(prefix: &str, namespace: &str, sha256: &[u8]) -> String {
        format!("{prefix}{namespace}/{}", hex(sha256))
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Writes every object (at most `max_concurrent_requests` at once across the proxy);
    /// the first failure fails them all.
    pub async fn put_all(&self, objects: Vec<PendingObject>) -> Result<(), OffloadError> {
        try_join_all(objects.into_iter().map(|object| self.put(object))).await?;
        Ok(())
    }

    async fn put(&self, object: PendingObject) -> Result<(), OffloadError> {
        let failed = |reason: String| OffloadError::WriteFailed {
            key: object.key.clone(),
            reason,
        };
        let started = Instant::now();
        let size = object.bytes.len();
        let call = async {
            let _permit = self
                .permits
                .acquire()
                .await
                .map_err(|_| failed("the store is closed".into()))?;
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&object.key)
                .content_length(i64::try_from(size).unwrap_or(i64::MAX))
                .content_type("application/octet-stream")
                .body(ByteStream::from(object.bytes.clone()))
                .send()
                .await
                .map_err(|e| failed(describe(&e)))
        };
        let result = match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result.map(|_| ()),
            Err(_) => Err(failed(format!("timed out after {:?}", self.timeout))),
        };
        self.stats.write_duration.observe(started.elapsed());
        match &result {
            Ok(()) => {
                count(&self.stats.objects_written, 1);
                count(&self.stats.bytes_written, size as u64);
                // The worker that takes the task usually asks for it soon.
                self.cache
                    .insert(
                        (self.bucket.clone(), object.key.clone()),
                        (object.sha256, object.bytes),
                    )
                    .await;
            }
            Err(e) => {
                count(&self.stats.write_errors, 1);
                tracing::warn!(error = %e, "offload write failed");
            }
        }
        result
    }

    /// The sealed object a reference names, its size and digest checked (from the cache when
    /// it is there; concurrent reads of one object share one fetch).
    pub async fn get(&self, reference: &Reference) -> Result<Bytes, OffloadError> {
        if reference.size > self.max_object_bytes as u64 {
            return Err(OffloadError::TooLarge {
                key: reference.key.clone(),
                size: reference.size,
                limit: self.max_object_bytes,
            });
        }
        let cache_key = (reference.bucket.clone(), reference.key.clone());
        let (digest, bytes) = match self.cache.get(&cache_key).await {
            Some(hit) => {
                count(&self.stats.cache_hits, 1);
                hit
            }
            None => self
                .cache
                .try_get_with(cache_key, self.fetch(reference))
                .await
                .map_err(|e| (*e).clone())?,
        };
        if digest != reference.sha256 || bytes.len() as u64 != reference.size {
            count(&self.stats.objects_lost, 1);
            return Err(OffloadError::Corrupt {
                bucket: reference.bucket.clone(),
                key: reference.key.clone(),
                reason: "its digest or size differs".into(),
            });
        }
        Ok(bytes)
    }

    async fn fetch(&self, reference: &Reference) -> Result<([u8; 32], Bytes), OffloadError> {
        let started = Instant::now();
        let result = match tokio::time::timeout(self.timeout, self.fetch_unbounded(reference)).await
        {
            Ok(result) => result,
            Err(_) => Err(OffloadError::ReadFailed {
                key: reference.key.clone(),
                reason: format!("timed out after {:?}", self.timeout),
            }),
        };
        self.stats.read_duration.observe(started.elapsed());
        match &result {
            Ok((_, bytes)) => {
                count(&self.stats.objects_read, 1);
                count(&self.stats.bytes_read, bytes.len() as u64);
            }
            Err(e) => {
                count(&self.stats.read_errors, 1);
                if e.is_data_loss() {
                    count(&self.stats.objects_lost, 1);
                }
                tracing::warn!(error = %e, "offload read failed");
            }
        }
        result
    }

    async fn fetch_unbounded(
        &self,
        reference: &Reference,
    ) -> Result<([u8; 32], Bytes), OffloadError> {
        let (bucket, key) = (&reference.bucket, &reference.key);
        let unavailable = |reason: String| OffloadError::ReadFailed {
            key: key.clone(),
            reason,
        };
        let corrupt = |reason: String| OffloadError::Corrupt {
            bucket: bucket.clone(),
            key: key.clone(),
            reason,
        };
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| unavailable("the store is closed".into()))?;
        let output = match self
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
        {
            Ok(output) => output,
            Err(SdkError::ServiceError(service))
                if service.err().is_no_such_key() || service.raw().status().as_u16() == 404 =>
            {
                return Err(OffloadError::Missing {
                    bucket: bucket.clone(),
                    key: key.clone(),
                })
            }
            Err(e) => return Err(unavailable(describe(&e))),
        };
        if let Some(length) = output.content_length {
            if u64::try_from(length).ok() != Some(reference.size) {
                return Err(corrupt(format!(
                    "it is {length} bytes, the reference says {}",
                    reference.size
                )));
            }
        }
        // Read no more than the reference says, whatever the store sends.
        let limit = usize::try_from(reference.size).unwrap_or(usize::MAX);
        let mut body = output.body;
        let mut buffer = BytesMut::with_capacity(limit.min(self.max_object_bytes));
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| unavailable(format!("reading the object: {e}")))?;
            if buffer.len() + chunk.len() > limit {
                return Err(corrupt(format!(
                    "it is longer than the {} bytes the reference says",
                    reference.size
                )));
            }
            buffer.extend_from_slice(&chunk);
        }
        let bytes = buffer.freeze();
        let digest = sha256(&bytes);
        if bytes.len() != limit {
            return Err(corrupt(format!(
                "it is {} bytes, the reference says {}",
                bytes.len(),
                reference.size
            )));
        }
        if digest != reference.sha256 {
            return Err(corrupt("its SHA-256 differs".into()));
        }
        Ok((digest, bytes))
    }

    /// Verifies access for `portcullis check`: the bucket exists, and an object can be written
    /// under the prefix and read back (then removed, if the credentials may).
    pub async fn check(&self) -> Result<String, String> {
        let bounded = |what: &'static str| {
            let timeout = self.timeout;
            move |r: Result<Result<(), String>, tokio::time::error::Elapsed>| match r {
                Ok(r) => r.map_err(|e| format!("{what}: {e}")),
                Err(_) => Err(format!("{what}: timed out after {timeout:?}")),
            }
        };
        let head = async {
            self.client
                .head_bucket()
                .bucket(&self.bucket)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| describe(&e))
        };
        bounded("HeadBucket")(tokio::time::timeout(self.timeout, head).await)?;
        let mut nonce = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
            .map_err(|_| "no randomness".to_string())?;
        let key = format!("{}.portcullis-check/{}", self.prefix, hex(&nonce));
        let body = Bytes::from_static(b"portcullis check");
        let put = async {
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&key)
                .body(ByteStream::from(body.clone()))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| describe(&e))
        };
        bounded("PutObject")(tokio::time::timeout(self.timeout, put).await)?;
        let get = async {
            let output = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(&key)
                .send()
                .await
                .map_err(|e| describe(&e))?;
            let read = output
                .body
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .into_bytes();
            if read == body {
                Ok(())
            } else {
                Err("read back other bytes than written".into())
            }
        };
        bounded("GetObject")(tokio::time::timeout(self.timeout, get).await)?;
        let deleted = self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
            .is_ok();
        Ok(format!(
            "bucket {} reachable; wrote and read back {key}{}",
            self.bucket,
            if deleted {
                " (removed)"
            } else {
                " (not removed: no delete permission)"
            }
        ))
    }
}

fn count(counter: &std::sync::atomic::AtomicU64, n: u64) {
    counter.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
}

/// An SDK error in a line: code, HTTP status and message when the store answered.
fn describe<E: ProvideErrorMetadata + std::error::Error + 'static, R>(
    error: &SdkError<E, R>,
) -> String
where
    R: std::fmt::Debug,
{
    match error {
        SdkError::ServiceError(service) => {
            let err = service.err();
            format!(
                "{} {}",
                err.code().unwrap_or("error"),
                err.message().unwrap_or("")
            )
        }
        SdkError::TimeoutError(_) => "timed out".into(),
        other => {
            let mut text = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(e) = source {
                text.push_str(": ");
                text.push_str(&e.to_string());
                source = e.source();
            }
            text
        }
    }
}

/// An S3 client as `config` describes it.
pub async fn sdk_client(config: &OffloadConfig) -> aws_sdk_s3::Client {
    let sdk_config = crate::crypto::aws_kms::aws_sdk_config(
        &config.region,
        config.endpoint.as_deref(),
        config.credentials.as_ref(),
        config.timeout,
        config.max_attempts,
    )
    .await;
    let s3 = aws_sdk_s3::config::Builder::from(&sdk_config)
        .force_path_style(config.force_path_style)
        // portcullis checks a SHA-256 of every object itself; the SDK's own CRC trailers
        // (aws-chunked uploads) are not understood by every S3-compatible store.
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .build();
    aws_sdk_s3::Client::from_conf(s3)
}
