//! Key providers: whoever holds the key-encryption keys (KEKs) that wrap data keys.

use std::fmt;

use async_trait::async_trait;
use zeroize::Zeroizing;

/// A fresh data key, in the clear and wrapped under the provider's current KEK.
pub struct DataKeyMaterial {
    pub plaintext: Zeroizing<[u8; 32]>,
    pub wrapped: Vec<u8>,
    pub kek_id: String,
}

impl fmt::Debug for DataKeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataKeyMaterial")
            .field("plaintext", &"<redacted>")
            .field("wrapped_len", &self.wrapped.len())
            .field("kek_id", &self.kek_id)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// Could not reach the provider, or it timed out or throttled: worth retrying later.
    #[error("key provider unavailable: {0}")]
    Unavailable(String),
    /// The KEK is not known to this provider (removed, or from another deployment).
    #[error("unknown key-encryption key {0:?}")]
    UnknownKek(String),
    /// The wrapped key does not unwrap under that KEK (another namespace, tampered, truncated).
    #[error("cannot unwrap data key with key-encryption key {kek_id:?}: {reason}")]
    CannotUnwrap { kek_id: String, reason: String },
    /// Any other refusal that retrying will not fix (access denied, misconfiguration).
    #[error("key provider refused: {0}")]
    Refused(String),
}

impl ProviderError {
    pub fn is_transient(&self) -> bool {
        matches!(self, ProviderError::Unavailable(_))
    }
}

/// Generates and unwraps data keys. Both calls bind the namespace: a key wrapped for one
/// namespace must not unwrap for another.
#[async_trait]
pub trait KeyProvider: Send + Sync + 'static {
    /// A new random data key, wrapped under the provider's primary KEK.
    async fn generate_data_key(&self, namespace: &str) -> Result<DataKeyMaterial, ProviderError>;

    /// The plaintext of a data key wrapped by `generate_data_key` under `kek_id`, which need not
    /// be the current primary.
    async fn unwrap_data_key(
        &self,
        namespace: &str,
        kek_id: &str,
        wrapped: &[u8],
    ) -> Result<Zeroizing<[u8; 32]>, ProviderError>;
}
