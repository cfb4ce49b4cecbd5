//! Errors of sealing and opening. The pipeline maps them to gRPC statuses in `crate::error`;
//! each variant says which status it is meant for.

/// Why a sealed payload did not open. Every case names the data key in [`CryptoError::CannotOpen`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenFailure {
    /// AES-GCM rejected it. GCM cannot tell the two causes apart, and must not try to.
    #[error(
        "authentication failed: the payload was tampered with, or sealed for another namespace"
    )]
    Authentication,
    /// The payload's `encryption-key-id` does not name the wrapped key it carries.
    #[error("its encryption-key-id does not match the envelope's wrapped key (tampered)")]
    KeyIdMismatch,
    /// [`crate::crypto::OpeningKeys`] holds no key for it: it was not among the resolved refs.
    #[error("its data key was not resolved before opening")]
    KeyNotResolved,
    /// The key provider refused the wrapped key for good (unknown key-encryption key, another
    /// namespace, tampered wrapped key).
    #[error("the key provider cannot unwrap its data key: {0}")]
    Unwrap(String),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum CryptoError {
    /// The key provider could not be reached or timed out. Transient: meant for UNAVAILABLE.
    /// Nothing was sealed with a fallback: the call fails closed.
    #[error("key provider unavailable for namespace {namespace:?}: {reason}")]
    ProviderUnavailable { namespace: String, reason: String },
    /// The key provider refused to issue a data key (misconfiguration, access denied). Permanent,
    /// and the operator's problem rather than the caller's: meant for INTERNAL.
    #[error("key provider refused a data key for namespace {namespace:?}: {reason}")]
    ProviderRejected { namespace: String, reason: String },
    /// A well-formed envelope that does not open. Permanent: meant for DATA_LOSS (or
    /// INVALID_ARGUMENT where the payload came from the caller, e.g. the codec server).
    #[error(
        "cannot open a payload sealed with data key {key_id} in namespace {namespace:?}: {reason}"
    )]
    CannotOpen {
        key_id: String,
        namespace: String,
        reason: OpenFailure,
    },
    /// Marked as a portcullis envelope, but not one this version can read. Meant for DATA_LOSS
    /// (or INVALID_ARGUMENT where the payload came from the caller).
    #[error("malformed portcullis envelope: {0}")]
    MalformedEnvelope(&'static str),
    /// Sealing itself failed (a key used past the nonce safety bound, an oversized payload).
    /// Meant for INTERNAL; never retried with a weaker fallback.
    #[error("cannot seal payload: {0}")]
    SealFailed(&'static str),
    #[error("invalid data key policy: {0}")]
    InvalidPolicy(&'static str),
}

impl CryptoError {
    /// Whether retrying the same call later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, CryptoError::ProviderUnavailable { .. })
    }
}
