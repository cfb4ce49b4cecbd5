//! Envelope encryption of Temporal payloads.
//!
//! - [`envelope`]: the v1 wire format (a Payload wrapping a `portcullis.v1.Envelope`), AES-256-GCM
//!   over the whole original Payload, with the namespace and key ids bound as associated data.
//! - `gcm`: AES-256-GCM with that associated data hashed once per data key.
//! - [`provider`]: key-encryption keys behind the [`KeyProvider`] trait; [`keyring`] is the
//!   `local` provider (a keyring file), [`aws_kms`] the `aws-kms` provider (AWS KMS).
//! - [`manager`]: per-namespace data keys, rotation, single-flight generation and the cache of
//!   unwrapped keys, with sync [`SealingKey::seal`] and [`OpeningKeys::open`] for the walker.
//! - [`message`]: sealing and opening every payload of a whole message through the walker.
//!
//! Fail closed: every failure is an error; there is no path that returns plaintext instead.

pub mod aws_kms;
pub mod compress;
pub mod config;
pub mod envelope;
pub mod error;
pub(crate) mod gcm;
pub mod keyring;
pub mod manager;
pub mod message;
pub mod metrics;
pub mod pkcs11;
pub mod provider;
pub mod timed;

/// Types generated from proto/portcullis/v1/envelope.proto.
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/portcullis.v1.rs"));
}

pub use aws_kms::{AwsKmsConfig, AwsKmsError, AwsKmsProvider, StaticCredentials};
pub use compress::CompressionConfig;
pub use envelope::{envelope_info, inspect, EnvelopeRef};
pub use error::{CryptoError, OpenFailure};
pub use keyring::{Keyring, KeyringError, LocalKeyProvider};
pub use manager::{
    Clock, DataKeyManager, DataKeyPolicy, OpeningKeys, SealingKey, SystemClock, NONCE_SAFETY_LIMIT,
};
pub use message::{plan_open, seal_message, OpenOptions, OpenPlan};
pub use metrics::{CryptoMetrics, CryptoMetricsSnapshot};
pub use provider::{DataKeyMaterial, KeyProvider, ProviderError};

#[cfg(test)]
mod tests;
