//! A key provider decorator that times every call and counts failures, for metrics. Wrapping
//! the provider (rather than instrumenting each one) covers the local keyring, AWS KMS and any
//! provider added later, readiness probes included.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use zeroize::Zeroizing;

use super::provider::{DataKeyMaterial, KeyProvider, ProviderError};
use crate::telemetry::ProviderStats;

pub struct TimedProvider {
    inner: Arc<dyn KeyProvider>,
    stats: Arc<ProviderStats>,
}

impl TimedProvider {
    pub fn new(inner: Arc<dyn KeyProvider>) -> TimedProvider {
        TimedProvider {
            inner,
            stats: Arc::default(),
        }
    }

    pub fn stats(&self) -> &Arc<ProviderStats> {
        &self.stats
    }
}

#[async_trait]
impl KeyProvider for TimedProvider {
    async fn generate_data_key(&self, namespace: &str) -> Result<DataKeyMaterial, ProviderError> {
        let started = Instant::now();
        let result = self.inner.generate_data_key(namespace).await;
        self.stats.generate.observe(started.elapsed());
        if result.is_err() {
            self.stats.generate_errors.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    async fn unwrap_data_key(
        &self,
        namespace: &str,
        kek_id: &str,
        wrapped: &[u8],
    ) -> Result<Zeroizing<[u8; 32]>, ProviderError> {
        let started = Instant::now();
        let result = self.inner.unwrap_data_key(namespace, kek_id, wrapped).await;
        self.stats.unwrap.observe(started.elapsed());
        if result.is_err() {
            self.stats.unwrap_errors.fetch_add(1, Ordering::Relaxed);
        }
        result
    }
}
