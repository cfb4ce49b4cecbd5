//! The `[encryption]` section of the config: keys (providers) and when data keys rotate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::DataKeyPolicy;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EncryptionConfig {
    /// Forward payloads as they are. Logged loudly; never the default.
    #[serde(default)]
    pub disabled: bool,
    /// The key (from `keys`) for namespaces that do not name one.
    #[serde(default)]
    pub default_key: Option<String>,
    /// The key (from `keys`) that seals cluster-wide payloads: Nexus endpoint descriptions.
    /// Default: `default_key`.
    #[serde(default)]
    pub cluster_key: Option<String>,
    /// Move Failure `message` and `stack_trace` into the sealed `encoded_attributes` on the way
    /// in, and back on the way out.
    #[serde(default = "yes")]
    pub encode_failure_attributes: bool,
    /// What to do with a response payload sealed by portcullis that cannot be opened:
    /// "fail" the call (naming the key), or "pass-through" the sealed payload.
    #[serde(default)]
    pub on_open_failure: OpenFailurePolicy,
    /// Refuse responses holding a payload that portcullis did not seal (nil payloads aside),
    /// for every namespace that does not say otherwise (`[[namespaces]] encrypted_only`).
    #[serde(default)]
    pub encrypted_only: bool,
    /// A namespace's data key is replaced after this many seconds ...
    #[serde(default = "default_max_age")]
    pub data_key_max_age_seconds: u64,
    /// ... or this many seals (random 96-bit nonces: stay far below 2^32).
    #[serde(default = "default_max_seals")]
    pub data_key_max_seals: u64,
    /// How long unwrapped data keys stay cached for opening, and how many.
    #[serde(default = "default_max_age")]
    pub key_cache_ttl_seconds: u64,
    #[serde(default = "default_cache_capacity")]
    pub key_cache_capacity: u64,
    /// The largest request the upstream accepts (Temporal: 4 MiB). A request that sealing grows
    /// past it is refused here with RESOURCE_EXHAUSTED.
    #[serde(default = "default_upstream_max")]
    pub upstream_max_request_bytes: usize,
    /// Key-encryption keys by name.
    #[serde(default)]
    pub keys: BTreeMap<String, KeyConfig>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OpenFailurePolicy {
    #[default]
    Fail,
    PassThrough,
}

/// One key-encryption key and the provider that holds it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "provider", rename_all = "kebab-case", deny_unknown_fields)]
pub enum KeyConfig {
    /// A keyring file created by `portcullis keys init` (versioned 256-bit keys; the primary
    /// seals, older ones still open). Must not be readable by group or others.
    Local { keyring: PathBuf },
    /// AWS KMS (GenerateDataKey / Decrypt with the namespace in the encryption context).
    AwsKms(super::aws_kms::AwsKmsConfig),
    /// A PKCS#11 token (an HSM, or SoftHSM): data keys wrapped inside the token.
    Pkcs11(super::pkcs11::Pkcs11Config),
}

fn yes() -> bool {
    true
}
fn default_max_age() -> u64 {
    3600
}
fn default_max_seals() -> u64 {
    1 << 24
}
fn default_cache_capacity() -> u64 {
    10_000
}
fn default_upstream_max() -> usize {
    4 * 1024 * 1024
}

impl Default for EncryptionConfig {
    fn default() -> Self {
        EncryptionConfig {
            disabled: false,
            default_key: None,
            cluster_key: None,
            encode_failure_attributes: true,
            on_open_failure: OpenFailurePolicy::Fail,
            encrypted_only: false,
            data_key_max_age_seconds: default_max_age(),
            data_key_max_seals: default_max_seals(),
            key_cache_ttl_seconds: default_max_age(),
            key_cache_capacity: default_cache_capacity(),
            upstream_max_request_bytes: default_upstream_max(),
            keys: BTreeMap::new(),
        }
    }
}

impl EncryptionConfig {
    pub fn policy(&self) -> DataKeyPolicy {
        DataKeyPolicy {
            max_age: Duration::from_secs(self.data_key_max_age_seconds),
            max_seals: self.data_key_max_seals,
            cache_ttl: Duration::from_secs(self.key_cache_ttl_seconds),
            cache_capacity: self.key_cache_capacity,
        }
    }

    pub fn resolve_paths(&mut self, base: &Path) {
        for key in self.keys.values_mut() {
            match key {
                KeyConfig::Local { keyring } if keyring.is_relative() => {
                    *keyring = base.join(&*keyring)
                }
                KeyConfig::Pkcs11(p11) => {
                    if let Some(pin_file) = p11.pin_file.as_mut().filter(|p| p.is_relative()) {
                        *pin_file = base.join(&*pin_file);
                    }
                }
                KeyConfig::Local { .. } | KeyConfig::AwsKms(_) => {}
            }
        }
    }

    /// Checks each key's own settings (what can be checked without reaching the provider).
    pub fn validate_keys(&self) -> Result<(), String> {
        for (name, key) in &self.keys {
            let checked = match key {
                KeyConfig::Pkcs11(p11) => p11.validate().map_err(|e| e.to_string()),
                KeyConfig::AwsKms(kms) => kms.validate().map_err(|e| e.to_string()),
                KeyConfig::Local { .. } => Ok(()),
            };
            checked.map_err(|e| format!("encryption.keys.{name}: {e}"))?;
        }
        Ok(())
    }
}
