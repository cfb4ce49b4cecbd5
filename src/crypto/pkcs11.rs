//! The `pkcs11` key provider: key-encryption keys that never leave a PKCS#11 token (an HSM, or
//! SoftHSM for development), used through the token's own AES-GCM or AES key wrap.
//!
//! ```toml
//! [encryption.keys.hsm]
//! provider = "pkcs11"
//! module = "/usr/lib/softhsm/libsofthsm2.so"
//! token_label = "portcullis"          # or token_serial = "…"
//! pin_file = "/run/secrets/hsm-pin"   # or pin_env = "PORTCULLIS_HSM_PIN"; never the PIN itself
//! key_label = "portcullis-kek"        # or key_id = "0a0b…" (hex CKA_ID)
//! # mechanism = "aes-gcm"             # or "aes-key-wrap-pad"
//! # timeout_seconds = 5
//! # max_sessions = 4
//! # rotation_check_seconds = 30
//! ```
//!
//! **Which key seals.** With `key_label`, every AES key on the token with that CKA_LABEL belongs
//! to the key; the one with the highest CKA_ID (an unsigned big-endian number) is the primary
//! and wraps new data keys, and any of them opens. Rotation is a token operation: create a key
//! with the same label and a higher id (`portcullis keys pkcs11-create`); running proxies look
//! for it every `rotation_check_seconds` and then retire their data keys. With `key_id`, exactly
//! that key seals, and it and `previous_key_ids` open (rotation: a config change and a restart).
//!
//! **What an envelope records.** The key-encryption key id is an RFC 7512 PKCS#11 URI naming the
//! token key: `pkcs11:object=LABEL;id=%00%00%00%02` (with `key_label`) or `pkcs11:id=%0a%0b`
//! (with `key_id`). It names no token, so replicas may find the same token by label or serial.
//!
//! **Wrapping and the namespace.** `aes-gcm` (the default): the data key comes from the token's
//! RNG and is encrypted inside the token with CKM_AES_GCM under the key-encryption key, with the
//! namespace and the key id as associated data: a key wrapped for one namespace does not unwrap
//! for another. `aes-key-wrap-pad` (for tokens that refuse caller-chosen GCM IVs): the data key
//! is generated in the token as a session object and wrapped with CKM_AES_KEY_WRAP_PAD, which has
//! no associated data, so a hash of the namespace is recorded next to the wrapped key and checked
//! before unwrapping (the envelope's own AEAD authenticates the recorded hash). Either way the
//! data key's plaintext leaves the token, as with KMS GenerateDataKey: it seals in this process.
//!
//! **Blocking calls.** PKCS#11 calls block: each runs on tokio's blocking pool, at most
//! `max_sessions` at once (one session each, reused from a pool), bounded by `timeout_seconds`.
//!
//! **Outages.** A module library that does not load refuses the start. A token that goes away
//! at run time (SoftHSM: its directory removed; an HSM: unplugged or unreachable) makes calls
//! fail as unavailable; the provider then re-initializes the module (at most once a second)
//! until the token is back, with no restart. A failure whose cause is unclear (SoftHSM answers a
//! wrong GCM tag with CKR_GENERAL_ERROR) is judged by asking the token whether it is still there.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

use super::envelope::length_prefixed;
use super::provider::{DataKeyMaterial, KeyProvider, ProviderError};

/// The default bound on one PKCS#11 operation, waiting for a session included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_TIMEOUT: Duration = Duration::from_secs(300);
/// Module re-initializations while a token is missing: at most one per this interval.
const REINIT_INTERVAL: Duration = Duration::from_secs(1);
/// Binds GCM-wrapped keys to this format, the namespace and the key-encryption key.
const GCM_AAD_TAG: &[u8] = b"portcullis/pkcs11/gcm/v1";
const KWP_NAMESPACE_TAG: &[u8] = b"portcullis/pkcs11/kwp/v1";
/// The first byte of a wrapped data key: which mechanism wrapped it.
const FORMAT_GCM: u8 = 1;
const FORMAT_KWP: u8 = 2;
const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;
const KEY_LEN: usize = 32;
const GCM_WRAPPED_LEN: usize = 1 + IV_LEN + KEY_LEN + TAG_LEN;
const NAMESPACE_HASH_LEN: usize = 16;
/// RFC 5649 output for a 32-byte key.
const KWP_LEN: usize = KEY_LEN + 8;

/// How data keys are wrapped inside the token.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum WrapMechanism {
    /// CKM_AES_GCM (C_Encrypt / C_Decrypt), the namespace as associated data.
    #[default]
    AesGcm,
    /// CKM_AES_KEY_WRAP_PAD (RFC 5649, C_WrapKey / C_UnwrapKey), the namespace recorded and checked.
    AesKeyWrapPad,
}

/// Configuration of the `pkcs11` provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Config {
    /// The PKCS#11 module (shared library), e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// The token, by its label ...
    #[serde(default)]
    pub token_label: Option<String>,
    /// ... or by its serial number.
    #[serde(default)]
    pub token_serial: Option<String>,
    /// A file holding the user PIN (one line; a trailing newline is ignored) ...
    #[serde(default)]
    pub pin_file: Option<PathBuf>,
    /// ... or the name of an environment variable holding it. Never the PIN itself.
    #[serde(default)]
    pub pin_env: Option<String>,
    /// The key-encryption keys by CKA_LABEL: the highest CKA_ID seals, all open.
    #[serde(default)]
    pub key_label: Option<String>,
    /// The key-encryption key by CKA_ID (hex): it seals ...
    #[serde(default)]
    pub key_id: Option<String>,
    /// ... and these (hex CKA_IDs) still open. Only with `key_id`.
    #[serde(default)]
    pub previous_key_ids: Vec<String>,
    #[serde(default)]
    pub mechanism: WrapMechanism,
    /// Bound on each operation, waiting for a session included (may be fractional).
    #[serde(
        default = "default_timeout",
        rename = "timeout_seconds",
        with = "super::aws_kms::seconds"
    )]
    pub timeout: Duration,
    /// Sessions (and blocking threads) in use at once, at most.
    #[serde(default = "default_max_sessions")]
    pub max_sessions: usize,
    /// With `key_label`: how often running proxies look for a newer key (rotation).
    #[serde(default = "default_rotation_check")]
    pub rotation_check_seconds: u64,
}

fn default_timeout() -> Duration {
    DEFAULT_TIMEOUT
}
fn default_max_sessions() -> usize {
    4
}
fn default_rotation_check() -> u64 {
    30
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Pkcs11Error {
    #[error("invalid pkcs11 config: {0}")]
    InvalidConfig(String),
    /// The module library does not load or initialize: the proxy refuses to start.
    #[error("PKCS#11 module {path}: {reason}")]
    Module { path: PathBuf, reason: String },
    #[error("PKCS#11 PIN: {0}")]
    Pin(String),
    /// A token operation failed (tooling: list and create keys).
    #[error("{0}")]
    Token(ProviderError),
}

impl Pkcs11Config {
    /// A config for the token with `token_label`, the PIN in `pin_file`, keys labelled `key_label`.
    pub fn new(
        module: impl Into<PathBuf>,
        token_label: &str,
        pin_file: impl Into<PathBuf>,
        key_label: &str,
    ) -> Self {
        Pkcs11Config {
            module: module.into(),
            token_label: Some(token_label.into()),
            token_serial: None,
            pin_file: Some(pin_file.into()),
            pin_env: None,
            key_label: Some(key_label.into()),
            key_id: None,
            previous_key_ids: Vec::new(),
            mechanism: WrapMechanism::default(),
            timeout: DEFAULT_TIMEOUT,
            max_sessions: default_max_sessions(),
            rotation_check_seconds: default_rotation_check(),
        }
    }

    pub fn validate(&self) -> Result<(), Pkcs11Error> {
        let invalid = |msg: &str| Err(Pkcs11Error::InvalidConfig(msg.to_owned()));
        if self.module.as_os_str().is_empty() {
            return invalid("module is empty");
        }
        match (&self.token_label, &self.token_serial) {
            (Some(l), None) if !l.trim().is_empty() => {}
            (None, Some(s)) if !s.trim().is_empty() => {}
            _ => return invalid("set exactly one of token_label and token_serial"),
        }
        match (&self.pin_file, &self.pin_env) {
            (Some(f), None) if !f.as_os_str().is_empty() => {}
            (None, Some(e)) if !e.trim().is_empty() => {}
            _ => return invalid("set exactly one of pin_file and pin_env"),
        }
        match (&self.key_label, &self.key_id) {
            (Some(l), None) if !l.is_empty() => {
                if !self.previous_key_ids.is_empty() {
                    return invalid("previous_key_ids go with key_id (with key_label, every key of that label opens)");
                }
            }
            (None, Some(id)) => {
                parse_hex_id(id).map_err(Pkcs11Error::InvalidConfig)?;
                for id in &self.previous_key_ids {
                    parse_hex_id(id).map_err(Pkcs11Error::InvalidConfig)?;
                }
            }
            _ => return invalid("set exactly one of key_label and key_id"),
        }
        if self.timeout.is_zero() || self.timeout > MAX_TIMEOUT {
            return invalid("timeout_seconds must be positive and at most 300");
        }
        if !(1..=64).contains(&self.max_sessions) {
            return invalid("max_sessions must be 1-64");
        }
        if !(1..=86_400).contains(&self.rotation_check_seconds) {
            return invalid("rotation_check_seconds must be 1-86400");
        }
        Ok(())
    }

    fn token_name(&self) -> String {
        match (&self.token_label, &self.token_serial) {
            (Some(label), _) => format!("token labelled {label:?}"),
            (None, Some(serial)) => format!("token with serial {serial:?}"),
            (None, None) => "token".into(),
        }
    }

    fn read_pin(&self) -> Result<Zeroizing<String>, Pkcs11Error> {
        let pin = match (&self.pin_file, &self.pin_env) {
            (Some(path), _) => {
                let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
                    Pkcs11Error::Pin(format!("cannot read pin_file {}: {e}", path.display()))
                })?);
                Zeroizing::new(text.trim_end_matches(['\r', '\n']).to_owned())
            }
            (None, Some(var)) => Zeroizing::new(std::env::var(var).map_err(|_| {
                Pkcs11Error::Pin(format!("environment variable {var} (pin_env) is not set"))
            })?),
            (None, None) => return Err(Pkcs11Error::Pin("no pin_file or pin_env".into())),
        };
        if pin.is_empty() {
            return Err(Pkcs11Error::Pin("the PIN is empty".into()));
        }
        Ok(pin)
    }
}

pub fn parse_hex_id(hex: &str) -> Result<Vec<u8>, String> {
    let hex = hex.trim();
    if hex.is_empty() || !hex.len().is_multiple_of(2) || hex.len() > 128 {
        return Err(format!(
            "key id {hex:?} must be an even number of hex digits (1-64 bytes)"
        ));
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .ok_or_else(|| format!("key id {hex:?} is not hex"))
        })
        .collect()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A token key as an envelope names it (an RFC 7512 PKCS#11 URI without the token).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KekRef {
    pub label: Option<Vec<u8>>,
    pub id: Vec<u8>,
}

impl KekRef {
    pub fn to_uri(&self) -> String {
        let mut uri = String::from("pkcs11:");
        if let Some(label) = &self.label {
            uri.push_str("object=");
            uri.push_str(&pct_encode(label));
            uri.push(';');
        }
        uri.push_str("id=");
        for b in &self.id {
            uri.push_str(&format!("%{b:02x}"));
        }
        uri
    }

    pub fn parse(uri: &str) -> Option<KekRef> {
        let rest = uri.strip_prefix("pkcs11:")?;
        let (mut label, mut id) = (None, None);
        for part in rest.split(';') {
            let (name, value) = part.split_once('=')?;
            let value = pct_decode(value)?;
            match name {
                "object" if label.is_none() => label = Some(value),
                "id" if id.is_none() => id = Some(value),
                _ => return None,
            }
        }
        let id = id.filter(|id: &Vec<u8>| !id.is_empty())?;
        Some(KekRef { label, id })
    }
}

fn pct_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02x}"));
        }
    }
    out
}

fn pct_decode(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let pair = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(pair, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Orders CKA_IDs as unsigned big-endian numbers (leading zero bytes do not count).
fn id_order(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    let strip = |id: &[u8]| -> Vec<u8> { id.iter().copied().skip_while(|b| *b == 0).collect() };
    let (a, b) = (strip(a), strip(b));
    a.len().cmp(&b.len()).then_with(|| a.cmp(&b))
}

/// The next CKA_ID after `ids` (4 bytes, or longer if needed).
pub fn next_id(ids: &[Vec<u8>]) -> Vec<u8> {
    let Some(max) = ids.iter().max_by(|a, b| id_order(a, b)) else {
        return vec![0, 0, 0, 1];
    };
    let mut next: Vec<u8> = max.clone();
    let mut carry = true;
    for byte in next.iter_mut().rev() {
        if !carry {
            break;
        }
        let (sum, overflow) = byte.overflowing_add(1);
        *byte = sum;
        carry = overflow;
    }
    if carry {
        next.insert(0, 1);
    }
    while next.len() < 4 {
        next.insert(0, 0);
    }
    next
}

// ------------------------------------------------------------------------------------------
// Modules: one per library per process. C_Initialize is process-wide, so every provider (and
// tool) on the same library shares it; re-initializing it bumps its generation, which tells
// every pool that its sessions and object handles are gone.

struct Module {
    path: PathBuf,
    ctx: Pkcs11,
    /// Read-held by every operation; write-held to re-initialize.
    generation: RwLock<u64>,
    last_reinit: Mutex<Option<Instant>>,
}

fn modules() -> &'static Mutex<HashMap<PathBuf, Arc<Module>>> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Arc<Module>>>> = OnceLock::new();
    MODULES.get_or_init(Mutex::default)
}

fn init_args() -> CInitializeArgs {
    CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)
}

impl Module {
    /// Loads and initializes the library once per process.
    fn load(path: &Path) -> Result<Arc<Module>, Pkcs11Error> {
        let module_error = |reason: String| Pkcs11Error::Module {
            path: path.to_path_buf(),
            reason,
        };
        let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let mut loaded = modules().lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(module) = loaded.get(&key) {
            return Ok(module.clone());
        }
        let ctx = Pkcs11::new(path).map_err(|e| module_error(format!("cannot load: {e}")))?;
        match ctx.initialize(init_args()) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(module_error(format!("C_Initialize failed: {e}"))),
        }
        let module = Arc::new(Module {
            path: path.to_path_buf(),
            ctx,
            generation: RwLock::new(0),
            last_reinit: Mutex::new(None),
        });
        loaded.insert(key, module.clone());
        Ok(module)
    }

    fn read(&self) -> RwLockReadGuard<'_, u64> {
        self.generation
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// C_Finalize and C_Initialize (how SoftHSM, and some HSM libraries, notice a token that
    /// came back), unless someone already did since `seen`, or did less than a second ago.
    /// Waits at most `wait` for operations in flight to finish.
    fn reinitialize(&self, seen: u64, wait: Duration) -> Result<(), String> {
        let deadline = Instant::now() + wait;
        let mut generation = loop {
            match self.generation.try_write() {
                Ok(guard) => break guard,
                Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(std::sync::TryLockError::WouldBlock) => {
                    return Err("operations in flight did not finish".into())
                }
            }
        };
        if *generation != seen {
            return Ok(());
        }
        let mut last = self
            .last_reinit
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if last.is_some_and(|t| t.elapsed() < REINIT_INTERVAL) {
            return Err("module re-initialized less than a second ago".into());
        }
        *last = Some(Instant::now());
        // Sessions of the old generation die with it; pools drop them without closing.
        let _ = self.ctx.clone().finalize();
        *generation += 1;
        match self.ctx.initialize(init_args()) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {
                tracing::info!(module = %self.path.display(), "PKCS#11 module re-initialized");
                Ok(())
            }
            Err(e) => Err(format!("C_Initialize failed: {e}")),
        }
    }
}

// ------------------------------------------------------------------------------------------
// The provider.

/// The `pkcs11` provider.
pub struct Pkcs11Provider {
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
    timeout: Duration,
}

impl fmt::Debug for Pkcs11Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Provider")
            .field("module", &self.shared.module.path)
            .field("token", &self.shared.config.token_name())
            .finish_non_exhaustive()
    }
}

struct Shared {
    module: Arc<Module>,
    config: Pkcs11Config,
    conn: Mutex<Conn>,
    /// The token answered C_Login with CKR_PIN_INCORRECT for this PIN (a hash of it): it is not
    /// tried again, so a wrong PIN cannot lock the token.
    rejected_pin: Mutex<Option<[u8; 32]>>,
}

#[derive(Default)]
struct Conn {
    /// The module generation the rest belongs to.
    generation: u64,
    slot: Option<Slot>,
    idle: Vec<Session>,
    /// Key handles by the envelope's key id.
    handles: HashMap<String, ObjectHandle>,
    primary: Option<Primary>,
}

#[derive(Clone)]
struct Primary {
    kek_id: String,
    handle: ObjectHandle,
}

/// One session for one operation.
struct Lease {
    session: Session,
    slot: Slot,
    generation: u64,
}

/// Why one attempt failed.
enum Failure {
    /// A PKCS#11 call failed; `what` names it. Judged with the token's health.
    Call(&'static str, CkError),
    /// The key is not on the token (permanent if the token is healthy).
    NotFound(ProviderError),
    /// Permanent whatever the token's state.
    Final(ProviderError),
    /// No session could be had: the token is not there (or the module needs re-initializing).
    NoToken(String),
}

impl Failure {
    fn call(what: &'static str) -> impl FnOnce(CkError) -> Failure {
        move |e| Failure::Call(what, e)
    }
}

/// What kind of operation failed, for judging an unclear error.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OpKind {
    Wrap,
    Unwrap,
    Admin,
}

/// One secret key on the token, as `portcullis keys pkcs11-list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenKey {
    pub label: String,
    pub id: Vec<u8>,
    pub key_type: String,
    pub value_len: Option<u64>,
    pub sensitive: Option<bool>,
    pub extractable: Option<bool>,
    pub encrypt: Option<bool>,
    pub decrypt: Option<bool>,
    pub wrap: Option<bool>,
    pub unwrap: Option<bool>,
    /// How envelopes name it, if this provider may use it.
    pub kek_id: Option<String>,
    /// Whether new data keys are wrapped with it.
    pub primary: bool,
}

impl Pkcs11Provider {
    /// Loads the module (refuses if the library does not load), checks that the PIN can be
    /// read, and tries to reach the token; a missing token is no error here (calls fail as
    /// unavailable until it appears), and a wrong PIN shows on the first call.
    pub async fn new(config: &Pkcs11Config) -> Result<Pkcs11Provider, Pkcs11Error> {
        config.validate()?;
        config.read_pin()?;
        let module_path = config.module.clone();
        let module = tokio::task::spawn_blocking(move || Module::load(&module_path))
            .await
            .map_err(|e| Pkcs11Error::Module {
                path: config.module.clone(),
                reason: format!("loading failed: {e}"),
            })??;
        let provider = Pkcs11Provider {
            shared: Arc::new(Shared {
                module,
                config: config.clone(),
                conn: Mutex::default(),
                rejected_pin: Mutex::new(None),
            }),
            permits: Arc::new(Semaphore::new(config.max_sessions)),
            timeout: config.timeout,
        };
        match provider
            .blocking("connect", |shared| shared.primary(false).map(|p| p.kek_id))
            .await
        {
            Ok(kek_id) => tracing::info!(
                module = %config.module.display(),
                token = %config.token_name(),
                %kek_id,
                "PKCS#11 token ready"
            ),
            Err(e) => tracing::warn!(
                module = %config.module.display(),
                token = %config.token_name(),
                error = %e,
                "PKCS#11 token not usable yet; calls fail as unavailable until it is"
            ),
        }
        Ok(provider)
    }

    pub fn config(&self) -> &Pkcs11Config {
        &self.shared.config
    }

    /// Looks up the primary key again. `Ok(true)` if it changed since the last lookup (a newer
    /// key with the configured label): the caller should retire data keys wrapped by the old one.
    pub async fn refresh_primary(&self) -> Result<bool, ProviderError> {
        let before = self.cached_primary();
        let now = self
            .blocking("rotation check", |shared| {
                shared.primary(true).map(|p| p.kek_id)
            })
            .await?;
        let changed = before.is_some_and(|b| b != now);
        if changed {
            tracing::info!(kek_id = %now, "PKCS#11: a newer key-encryption key seals from now on");
        }
        Ok(changed)
    }

    /// The key id new data keys are wrapped with, as last looked up.
    pub fn cached_primary(&self) -> Option<String> {
        self.shared
            .lock_conn()
            .primary
            .as_ref()
            .map(|p| p.kek_id.clone())
    }

    /// Every secret key on the token (the tool's `pkcs11-list`).
    pub async fn list_keys(&self) -> Result<Vec<TokenKey>, ProviderError> {
        self.blocking("list keys", |shared| shared.list_keys())
            .await
    }

    /// Creates a non-extractable AES-256 key on the token for wrapping data keys, labelled
    /// `label` with CKA_ID `id` (default: the next id after the keys with that label). Returns
    /// the key id envelopes will record.
    pub async fn create_key(
        &self,
        label: Option<String>,
        id: Option<Vec<u8>>,
    ) -> Result<String, ProviderError> {
        self.blocking("create key", move |shared| {
            shared.create_key(label.as_deref(), id)
        })
        .await
    }

    /// Runs `work` on the blocking pool with one of `max_sessions` permits, within the timeout.
    /// A call that times out keeps its permit until the token answers: a hung token cannot
    /// take more than `max_sessions` threads.
    async fn blocking<T: Send + 'static>(
        &self,
        what: &'static str,
        work: impl FnOnce(&Shared) -> Result<T, ProviderError> + Send + 'static,
    ) -> Result<T, ProviderError> {
        let shared = self.shared.clone();
        let permits = self.permits.clone();
        let call = async move {
            let permit = permits
                .acquire_owned()
                .await
                .map_err(|_| ProviderError::Unavailable("PKCS#11 session pool closed".into()))?;
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                work(&shared)
            })
            .await
            .map_err(|e| ProviderError::Unavailable(format!("PKCS#11 {what} failed: {e}")))?
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .unwrap_or_else(|_| {
                Err(ProviderError::Unavailable(format!(
                    "PKCS#11 {what} did not finish within {:?}",
                    self.timeout
                )))
            })
    }
}

#[async_trait]
impl KeyProvider for Pkcs11Provider {
    async fn generate_data_key(&self, namespace: &str) -> Result<DataKeyMaterial, ProviderError> {
        let namespace = namespace.to_owned();
        self.blocking("wrap", move |shared| shared.generate(&namespace))
            .await
    }

    async fn unwrap_data_key(
        &self,
        namespace: &str,
        kek_id: &str,
        wrapped: &[u8],
    ) -> Result<Zeroizing<[u8; 32]>, ProviderError> {
        let cannot = |reason: &str| ProviderError::CannotUnwrap {
            kek_id: kek_id.to_owned(),
            reason: reason.to_owned(),
        };
        // Checks that need no token first.
        let kek = KekRef::parse(kek_id).ok_or_else(|| ProviderError::UnknownKek(kek_id.into()))?;
        self.shared.allowed(&kek, kek_id)?;
        match wrapped.first() {
            Some(&FORMAT_GCM) if wrapped.len() == GCM_WRAPPED_LEN => {}
            Some(&FORMAT_KWP) if wrapped.len() == 1 + NAMESPACE_HASH_LEN + KWP_LEN => {
                if wrapped[1..1 + NAMESPACE_HASH_LEN] != namespace_hash(namespace)[..] {
                    return Err(cannot("it was wrapped for another namespace"));
                }
            }
            _ => return Err(cannot("not a data key wrapped by the pkcs11 provider")),
        }
        let (namespace, kek_id, wrapped) =
            (namespace.to_owned(), kek_id.to_owned(), wrapped.to_vec());
        self.blocking("unwrap", move |shared| {
            shared.unwrap(&namespace, &kek_id, &wrapped)
        })
        .await
    }
}

fn gcm_aad(namespace: &str, kek_id: &str) -> Vec<u8> {
    length_prefixed(&[GCM_AAD_TAG, namespace.as_bytes(), kek_id.as_bytes()])
}

fn namespace_hash(namespace: &str) -> [u8; NAMESPACE_HASH_LEN] {
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        &length_prefixed(&[KWP_NAMESPACE_TAG, namespace.as_bytes()]),
    );
    let mut out = [0u8; NAMESPACE_HASH_LEN];
    out.copy_from_slice(&digest.as_ref()[..NAMESPACE_HASH_LEN]);
    out
}

fn to_key(bytes: &[u8]) -> Option<Zeroizing<[u8; 32]>> {
    let mut key = Zeroizing::new([0u8; 32]);
    if bytes.len() != KEY_LEN {
        return None;
    }
    key.copy_from_slice(bytes);
    Some(key)
}

fn secret_key_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
    ]
}

impl Shared {
    fn lock_conn(&self) -> std::sync::MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn label_mode(&self) -> Option<&str> {
        self.config.key_label.as_deref()
    }

    /// Whether this provider may open with `kek` at all (before asking the token).
    fn allowed(&self, kek: &KekRef, kek_id: &str) -> Result<(), ProviderError> {
        let ok = match (&self.config.key_label, &self.config.key_id) {
            (Some(label), _) => kek.label.as_deref() == Some(label.as_bytes()),
            (None, Some(primary)) => std::iter::once(primary)
                .chain(&self.config.previous_key_ids)
                .filter_map(|id| parse_hex_id(id).ok())
                .any(|id| id == kek.id),
            (None, None) => false,
        };
        if ok {
            Ok(())
        } else {
            Err(ProviderError::UnknownKek(kek_id.to_owned()))
        }
    }

    // ---- operations (run on a blocking thread) ----

    fn primary(&self, fresh: bool) -> Result<Primary, ProviderError> {
        self.run(OpKind::Wrap, |shared, lease| {
            shared.primary_on(lease, fresh)
        })
    }

    fn generate(&self, namespace: &str) -> Result<DataKeyMaterial, ProviderError> {
        let mechanism = self.config.mechanism;
        self.run(OpKind::Wrap, |shared, lease| {
            let primary = shared.primary_on(lease, false)?;
            let session = &lease.session;
            let (plaintext, wrapped) = match mechanism {
                WrapMechanism::AesGcm => {
                    let random = Zeroizing::new(
                        session
                            .generate_random_vec((KEY_LEN + IV_LEN) as u32)
                            .map_err(Failure::call("C_GenerateRandom"))?,
                    );
                    let plaintext = to_key(&random[..KEY_LEN]).ok_or_else(|| {
                        Failure::Final(ProviderError::Refused("short random data".into()))
                    })?;
                    let mut iv = [0u8; IV_LEN];
                    iv.copy_from_slice(&random[KEY_LEN..]);
                    let aad = gcm_aad(namespace, &primary.kek_id);
                    let params = GcmParams::new(&mut iv, &aad, ((TAG_LEN * 8) as u64).into())
                        .map_err(Failure::call("GCM parameters"))?;
                    let sealed = session
                        .encrypt(&Mechanism::AesGcm(params), primary.handle, &plaintext[..])
                        .map_err(Failure::call("C_Encrypt (CKM_AES_GCM)"))?;
                    if sealed.len() != KEY_LEN + TAG_LEN {
                        return Err(Failure::Final(ProviderError::Refused(format!(
                            "CKM_AES_GCM returned {} bytes for a 32-byte key",
                            sealed.len()
                        ))));
                    }
                    let mut wrapped = Vec::with_capacity(GCM_WRAPPED_LEN);
                    wrapped.push(FORMAT_GCM);
                    wrapped.extend_from_slice(&random[KEY_LEN..]);
                    wrapped.extend_from_slice(&sealed);
                    (plaintext, wrapped)
                }
                WrapMechanism::AesKeyWrapPad => {
                    let data_key = session
                        .generate_key(
                            &Mechanism::AesKeyGen,
                            &[
                                Attribute::Token(false),
                                Attribute::ValueLen((KEY_LEN as u64).into()),
                                Attribute::Sensitive(false),
                                Attribute::Extractable(true),
                            ],
                        )
                        .map_err(Failure::call("C_GenerateKey"))?;
                    let result = session
                        .wrap_key(&Mechanism::AesKeyWrapPad, primary.handle, data_key)
                        .map_err(Failure::call("C_WrapKey (CKM_AES_KEY_WRAP_PAD)"))
                        .and_then(|wrapped| Ok((key_value(session, data_key)?, wrapped)));
                    let _ = session.destroy_object(data_key);
                    let (plaintext, sealed) = result?;
                    if sealed.len() != KWP_LEN {
                        return Err(Failure::Final(ProviderError::Refused(format!(
                            "CKM_AES_KEY_WRAP_PAD returned {} bytes for a 32-byte key",
                            sealed.len()
                        ))));
                    }
                    let mut wrapped = Vec::with_capacity(1 + NAMESPACE_HASH_LEN + KWP_LEN);
                    wrapped.push(FORMAT_KWP);
                    wrapped.extend_from_slice(&namespace_hash(namespace));
                    wrapped.extend_from_slice(&sealed);
                    (plaintext, wrapped)
                }
            };
            Ok(DataKeyMaterial {
                plaintext,
                wrapped,
                kek_id: primary.kek_id,
            })
        })
    }

    fn unwrap(
        &self,
        namespace: &str,
        kek_id: &str,
        wrapped: &[u8],
    ) -> Result<Zeroizing<[u8; 32]>, ProviderError> {
        let cannot = |reason: String| {
            Failure::Final(ProviderError::CannotUnwrap {
                kek_id: kek_id.to_owned(),
                reason,
            })
        };
        let result = self.run(OpKind::Unwrap, |shared, lease| {
            let handle = shared.key_on(lease, kek_id)?;
            let session = &lease.session;
            match wrapped.first() {
                Some(&FORMAT_GCM) => {
                    let mut iv = [0u8; IV_LEN];
                    iv.copy_from_slice(&wrapped[1..1 + IV_LEN]);
                    let aad = gcm_aad(namespace, kek_id);
                    let params = GcmParams::new(&mut iv, &aad, ((TAG_LEN * 8) as u64).into())
                        .map_err(Failure::call("GCM parameters"))?;
                    let plaintext = Zeroizing::new(
                        session
                            .decrypt(&Mechanism::AesGcm(params), handle, &wrapped[1 + IV_LEN..])
                            .map_err(Failure::call("C_Decrypt (CKM_AES_GCM)"))?,
                    );
                    to_key(&plaintext).ok_or_else(|| cannot("not a 256-bit data key".into()))
                }
                Some(&FORMAT_KWP) => {
                    let data_key = session
                        .unwrap_key(
                            &Mechanism::AesKeyWrapPad,
                            handle,
                            &wrapped[1 + NAMESPACE_HASH_LEN..],
                            &[
                                Attribute::Class(ObjectClass::SECRET_KEY),
                                Attribute::KeyType(KeyType::AES),
                                Attribute::Token(false),
                                Attribute::Sensitive(false),
                                Attribute::Extractable(true),
                            ],
                        )
                        .map_err(Failure::call("C_UnwrapKey (CKM_AES_KEY_WRAP_PAD)"))?;
                    let value = key_value(session, data_key);
                    let _ = session.destroy_object(data_key);
                    value
                }
                _ => Err(cannot("unknown wrapping format".into())),
            }
        });
        result.map_err(|e| match e {
            ProviderError::CannotUnwrap { kek_id: k, reason } if k.is_empty() => {
                ProviderError::CannotUnwrap {
                    kek_id: kek_id.to_owned(),
                    reason,
                }
            }
            other => other,
        })
    }

    fn list_keys(&self) -> Result<Vec<TokenKey>, ProviderError> {
        self.run(OpKind::Admin, |shared, lease| {
            let primary = shared.primary_on(lease, true).ok().map(|p| p.kek_id);
            let session = &lease.session;
            let handles = session
                .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])
                .map_err(Failure::call("C_FindObjects"))?;
            let mut keys = Vec::with_capacity(handles.len());
            for handle in handles {
                let attributes = session
                    .get_attributes(
                        handle,
                        &[
                            AttributeType::Label,
                            AttributeType::Id,
                            AttributeType::KeyType,
                            AttributeType::ValueLen,
                            AttributeType::Sensitive,
                            AttributeType::Extractable,
                            AttributeType::Encrypt,
                            AttributeType::Decrypt,
                            AttributeType::Wrap,
                            AttributeType::Unwrap,
                        ],
                    )
                    .map_err(Failure::call("C_GetAttributeValue"))?;
                let mut key = TokenKey {
                    label: String::new(),
                    id: Vec::new(),
                    key_type: "?".into(),
                    value_len: None,
                    sensitive: None,
                    extractable: None,
                    encrypt: None,
                    decrypt: None,
                    wrap: None,
                    unwrap: None,
                    kek_id: None,
                    primary: false,
                };
                let mut aes = false;
                for attribute in attributes {
                    match attribute {
                        Attribute::Label(l) => key.label = String::from_utf8_lossy(&l).into(),
                        Attribute::Id(id) => key.id = id,
                        Attribute::KeyType(t) => {
                            aes = t == KeyType::AES;
                            key.key_type = t.to_string();
                        }
                        Attribute::ValueLen(n) => key.value_len = Some(*n),
                        Attribute::Sensitive(b) => key.sensitive = Some(b),
                        Attribute::Extractable(b) => key.extractable = Some(b),
                        Attribute::Encrypt(b) => key.encrypt = Some(b),
                        Attribute::Decrypt(b) => key.decrypt = Some(b),
                        Attribute::Wrap(b) => key.wrap = Some(b),
                        Attribute::Unwrap(b) => key.unwrap = Some(b),
                        _ => {}
                    }
                }
                if aes && !key.id.is_empty() {
                    let reference = KekRef {
                        label: shared.label_mode().map(|l| l.as_bytes().to_vec()),
                        id: key.id.clone(),
                    };
                    let uri = reference.to_uri();
                    let label_matches = shared
                        .label_mode()
                        .is_none_or(|l| l.as_bytes() == key.label.as_bytes());
                    if label_matches && shared.allowed(&reference, &uri).is_ok() {
                        key.primary = primary.as_deref() == Some(uri.as_str());
                        key.kek_id = Some(uri);
                    }
                }
                keys.push(key);
            }
            keys.sort_by(|a, b| a.label.cmp(&b.label).then_with(|| id_order(&a.id, &b.id)));
            Ok(keys)
        })
    }

    fn create_key(
        &self,
        label: Option<&str>,
        id: Option<Vec<u8>>,
    ) -> Result<String, ProviderError> {
        let label = label
            .or(self.config.key_label.as_deref())
            .ok_or_else(|| ProviderError::Refused("no label: pass --label".into()))?
            .to_owned();
        self.run(OpKind::Admin, |shared, lease| {
            let session = &lease.session;
            let id = match &id {
                Some(id) => id.clone(),
                None => {
                    let mut template = secret_key_template();
                    template.push(Attribute::Label(label.as_bytes().to_vec()));
                    let ids = shared.ids_of(session, &template)?;
                    next_id(&ids.into_iter().map(|(id, _)| id).collect::<Vec<_>>())
                }
            };
            let mut template = secret_key_template();
            template.push(Attribute::Id(id.clone()));
            if !shared.ids_of(session, &template)?.is_empty() {
                return Err(Failure::Final(ProviderError::Refused(format!(
                    "an AES key with id {} exists already",
                    hex(&id)
                ))));
            }
            // A read-write session: token objects cannot be created in a read-only one.
            let rw = shared
                .module
                .ctx
                .open_rw_session_no_drop(lease.slot)
                .map_err(Failure::call("C_OpenSession"))?;
            let created = rw
                .generate_key(
                    &Mechanism::AesKeyGen,
                    &[
                        Attribute::Token(true),
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(false),
                        Attribute::Modifiable(false),
                        Attribute::ValueLen((KEY_LEN as u64).into()),
                        Attribute::Label(label.as_bytes().to_vec()),
                        Attribute::Id(id.clone()),
                        Attribute::Encrypt(true),
                        Attribute::Decrypt(true),
                        Attribute::Wrap(true),
                        Attribute::Unwrap(true),
                        Attribute::Sign(false),
                        Attribute::Verify(false),
                        Attribute::Derive(false),
                    ],
                )
                .map_err(Failure::call("C_GenerateKey"));
            let _ = rw.close();
            created?;
            Ok(KekRef {
                label: shared.label_mode().map(|_| label.as_bytes().to_vec()),
                id,
            }
            .to_uri())
        })
    }

    // ---- keys on the token ----

    /// (CKA_ID, handle) of the AES keys matching `template`.
    fn ids_of(
        &self,
        session: &Session,
        template: &[Attribute],
    ) -> Result<Vec<(Vec<u8>, ObjectHandle)>, Failure> {
        let handles = session
            .find_objects(template)
            .map_err(Failure::call("C_FindObjects"))?;
        let mut out = Vec::with_capacity(handles.len());
        for handle in handles {
            let attributes = session
                .get_attributes(handle, &[AttributeType::Id])
                .map_err(Failure::call("C_GetAttributeValue"))?;
            let id = attributes.into_iter().find_map(|a| match a {
                Attribute::Id(id) => Some(id),
                _ => None,
            });
            out.push((id.unwrap_or_default(), handle));
        }
        Ok(out)
    }

    /// The key that wraps new data keys (cached per module generation unless `fresh`).
    fn primary_on(&self, lease: &Lease, fresh: bool) -> Result<Primary, Failure> {
        if !fresh {
            let conn = self.lock_conn();
            if conn.generation == lease.generation {
                if let Some(primary) = &conn.primary {
                    return Ok(primary.clone());
                }
            }
        }
        let mut template = secret_key_template();
        let (label, id) = match (&self.config.key_label, &self.config.key_id) {
            (Some(label), _) => (Some(label.as_bytes().to_vec()), None),
            (None, Some(id)) => (
                None,
                Some(parse_hex_id(id).map_err(|e| Failure::Final(ProviderError::Refused(e)))?),
            ),
            (None, None) => {
                return Err(Failure::Final(ProviderError::Refused(
                    "no key_label or key_id".into(),
                )))
            }
        };
        if let Some(label) = &label {
            template.push(Attribute::Label(label.clone()));
        }
        if let Some(id) = &id {
            template.push(Attribute::Id(id.clone()));
        }
        let mut candidates: Vec<_> = self
            .ids_of(&lease.session, &template)?
            .into_iter()
            .filter(|(id, _)| !id.is_empty())
            .collect();
        candidates.sort_by(|a, b| id_order(&a.0, &b.0));
        let wanted = match (&self.config.key_label, &self.config.key_id) {
            (Some(label), _) => format!("an AES key labelled {label:?} with a CKA_ID"),
            (_, Some(id)) => format!("an AES key with CKA_ID {id}"),
            _ => String::new(),
        };
        let Some((best_id, handle)) = candidates.pop() else {
            return Err(Failure::NotFound(ProviderError::UnknownKek(format!(
                "{wanted} on the {}",
                self.config.token_name()
            ))));
        };
        if candidates
            .last()
            .is_some_and(|(id, _)| id_order(id, &best_id).is_eq())
        {
            return Err(Failure::Final(ProviderError::Refused(format!(
                "two keys match {wanted} with id {}: ambiguous",
                hex(&best_id)
            ))));
        }
        let primary = Primary {
            kek_id: KekRef { label, id: best_id }.to_uri(),
            handle,
        };
        warn_if_extractable(&lease.session, handle, &primary.kek_id);
        let mut conn = self.lock_conn();
        if conn.generation == lease.generation {
            conn.handles.insert(primary.kek_id.clone(), handle);
            conn.primary = Some(primary.clone());
        }
        Ok(primary)
    }

    /// The token key an envelope names (cached per module generation).
    fn key_on(&self, lease: &Lease, kek_id: &str) -> Result<ObjectHandle, Failure> {
        {
            let conn = self.lock_conn();
            if conn.generation == lease.generation {
                if let Some(handle) = conn.handles.get(kek_id) {
                    return Ok(*handle);
                }
            }
        }
        let kek = KekRef::parse(kek_id)
            .ok_or_else(|| Failure::Final(ProviderError::UnknownKek(kek_id.to_owned())))?;
        let mut template = secret_key_template();
        template.push(Attribute::Id(kek.id.clone()));
        if let Some(label) = &kek.label {
            template.push(Attribute::Label(label.clone()));
        }
        let found = self.ids_of(&lease.session, &template)?;
        let handle = match found.as_slice() {
            [(_, handle)] => *handle,
            [] => {
                return Err(Failure::NotFound(ProviderError::UnknownKek(
                    kek_id.to_owned(),
                )))
            }
            _ => {
                return Err(Failure::Final(ProviderError::Refused(format!(
                    "several keys on the token match {kek_id}: ambiguous"
                ))))
            }
        };
        let mut conn = self.lock_conn();
        if conn.generation == lease.generation {
            conn.handles.insert(kek_id.to_owned(), handle);
        }
        Ok(handle)
    }

    // ---- sessions, health, recovery ----

    /// Runs `op` with a session, judging failures by the token's health: session-level
    /// failures are retried once with a new session, a missing token once after
    /// re-initializing the module. Never panics; every failure is typed.
    fn run<T>(
        &self,
        kind: OpKind,
        op: impl Fn(&Shared, &Lease) -> Result<T, Failure>,
    ) -> Result<T, ProviderError> {
        let mut last = String::new();
        for attempt in 0..2 {
            let guard = self.module.read();
            let generation = *guard;
            let lease = match self.checkout(generation) {
                Ok(lease) => lease,
                Err(Failure::NoToken(reason)) => {
                    drop(guard);
                    last = reason;
                    if attempt == 0 {
                        if let Err(e) = self.module.reinitialize(generation, self.config.timeout) {
                            tracing::debug!(error = %e, "PKCS#11 module not re-initialized");
                        }
                    }
                    continue;
                }
                Err(Failure::Final(e)) => return Err(e),
                Err(Failure::NotFound(e)) => return Err(e),
                Err(Failure::Call(what, e)) => {
                    drop(guard);
                    last = format!("{what}: {e}");
                    continue;
                }
            };
            let failure = match op(self, &lease) {
                Ok(value) => {
                    self.checkin(lease);
                    return Ok(value);
                }
                Err(failure) => failure,
            };
            match failure {
                Failure::Final(e) => {
                    self.checkin(lease);
                    return Err(e);
                }
                Failure::NoToken(reason) => {
                    self.discard(lease, true);
                    last = reason;
                }
                Failure::NotFound(e) => {
                    if self.token_present(lease.slot) {
                        self.checkin(lease);
                        return Err(e);
                    }
                    self.discard(lease, true);
                    last = format!("the {} is not present", self.config.token_name());
                }
                Failure::Call(what, e) => {
                    if let Some(permanent) = permanent(kind, what, &e) {
                        self.checkin(lease);
                        return Err(permanent);
                    }
                    let present = self.token_present(lease.slot);
                    if present && kind == OpKind::Unwrap && ambiguous(&e) {
                        // SoftHSM reports a GCM tag mismatch as CKR_GENERAL_ERROR.
                        self.checkin(lease);
                        return Err(ProviderError::CannotUnwrap {
                            kek_id: String::new(),
                            reason: format!("{what}: {e}"),
                        });
                    }
                    self.discard(lease, !present);
                    last = if present {
                        format!("{what}: {e}")
                    } else {
                        format!(
                            "{what}: {e} (the {} is not present)",
                            self.config.token_name()
                        )
                    };
                }
            }
            drop(guard);
            if attempt == 0 && self.lock_conn().slot.is_none() {
                if let Err(e) = self.module.reinitialize(generation, self.config.timeout) {
                    tracing::debug!(error = %e, "PKCS#11 module not re-initialized");
                }
            }
        }
        Err(ProviderError::Unavailable(format!("PKCS#11: {last}")))
    }

    /// A pooled session of this generation, or a new one (finding the token, logging in).
    fn checkout(&self, generation: u64) -> Result<Lease, Failure> {
        let slot = {
            let mut conn = self.lock_conn();
            if conn.generation != generation {
                // The module was re-initialized: old sessions and handles are gone (their
                // numbers may be reused: never close them).
                drop(std::mem::take(&mut *conn));
                conn.generation = generation;
            }
            if let Some(session) = conn.idle.pop() {
                if let Some(slot) = conn.slot {
                    return Ok(Lease {
                        session,
                        slot,
                        generation,
                    });
                }
            }
            conn.slot
        };
        let slot = match slot {
            Some(slot) => slot,
            None => {
                let slot = self.find_slot()?;
                let mut conn = self.lock_conn();
                if conn.generation == generation {
                    conn.slot = Some(slot);
                }
                slot
            }
        };
        let session = match self.module.ctx.open_ro_session_no_drop(slot) {
            Ok(session) => session,
            Err(e @ CkError::Pkcs11(RvError::SessionCount, _)) => {
                return Err(Failure::Final(ProviderError::Unavailable(format!(
                    "C_OpenSession: {e}"
                ))))
            }
            Err(e) => {
                return Err(self.lost_or(generation, slot, Failure::Call("C_OpenSession", e)))
            }
        };
        let lease = Lease {
            session,
            slot,
            generation,
        };
        match self.login(&lease.session) {
            Ok(()) => Ok(lease),
            Err(failure) => {
                self.discard(lease, false);
                Err(self.lost_or(generation, slot, failure))
            }
        }
    }

    /// `failure`, unless the token is gone: then the slot is forgotten and it is `NoToken`.
    fn lost_or(&self, generation: u64, slot: Slot, failure: Failure) -> Failure {
        if !matches!(failure, Failure::Call(..)) || self.token_present(slot) {
            return failure;
        }
        let mut conn = self.lock_conn();
        if conn.generation == generation {
            conn.slot = None;
        }
        Failure::NoToken(format!(
            "the {} is not present in {}",
            self.config.token_name(),
            self.module.path.display()
        ))
    }

    fn login(&self, session: &Session) -> Result<(), Failure> {
        let pin = self
            .config
            .read_pin()
            .map_err(|e| Failure::Final(ProviderError::Refused(e.to_string())))?;
        let fingerprint = pin_fingerprint(&pin);
        let pin = AuthPin::new(pin.as_str().into());
        let mut rejected = self
            .rejected_pin
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *rejected == Some(fingerprint) {
            return Err(Failure::Final(ProviderError::Refused(
                "the token rejected this PIN before; not trying it again (fix the PIN and it is read again)".into(),
            )));
        }
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
            Err(CkError::Pkcs11(
                rv @ (RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange),
                _,
            )) => {
                *rejected = Some(fingerprint);
                Err(Failure::Final(ProviderError::Refused(format!(
                    "C_Login: the token rejected the PIN ({rv})"
                ))))
            }
            Err(CkError::Pkcs11(
                rv @ (RvError::PinLocked | RvError::PinExpired | RvError::UserPinNotInitialized),
                _,
            )) => Err(Failure::Final(ProviderError::Refused(format!(
                "C_Login: {rv}"
            )))),
            Err(e) => Err(Failure::Call("C_Login", e)),
        }
    }

    fn checkin(&self, lease: Lease) {
        let mut conn = self.lock_conn();
        if conn.generation == lease.generation && conn.idle.len() < self.config.max_sessions {
            conn.idle.push(lease.session);
        } else if conn.generation == lease.generation {
            drop(conn);
            let _ = lease.session.close();
        }
        // Another generation: the handle is dead (and may be reused): dropped, not closed.
    }

    /// Drops a session after a failure; `token_gone` also forgets the slot and every pooled
    /// session and key handle, so the next call finds the token anew.
    fn discard(&self, lease: Lease, token_gone: bool) {
        let mut conn = self.lock_conn();
        if conn.generation != lease.generation {
            return;
        }
        conn.handles.clear();
        conn.primary = None;
        let mut dead = vec![lease.session];
        if token_gone {
            conn.slot = None;
            dead.append(&mut conn.idle);
        }
        drop(conn);
        for session in dead {
            let _ = session.close();
        }
    }

    fn find_slot(&self) -> Result<Slot, Failure> {
        let ctx = &self.module.ctx;
        let slots = ctx
            .get_slots_with_token()
            .map_err(|e| Failure::NoToken(format!("C_GetSlotList: {e}")))?;
        for slot in slots {
            if let Ok(info) = ctx.get_token_info(slot) {
                if self.is_our_token(&info) {
                    return Ok(slot);
                }
            }
        }
        Err(Failure::NoToken(format!(
            "the {} is not present in {}",
            self.config.token_name(),
            self.module.path.display()
        )))
    }

    fn is_our_token(&self, info: &cryptoki::slot::TokenInfo) -> bool {
        match (&self.config.token_label, &self.config.token_serial) {
            (Some(label), _) => info.label().trim() == label.trim(),
            (None, Some(serial)) => info.serial_number().trim() == serial.trim(),
            (None, None) => false,
        }
    }

    fn token_present(&self, slot: Slot) -> bool {
        self.module
            .ctx
            .get_token_info(slot)
            .is_ok_and(|info| self.is_our_token(&info))
    }
}

fn key_value(session: &Session, key: ObjectHandle) -> Result<Zeroizing<[u8; 32]>, Failure> {
    let attributes = session
        .get_attributes(key, &[AttributeType::Value])
        .map_err(Failure::call("C_GetAttributeValue"))?;
    for attribute in attributes {
        if let Attribute::Value(value) = attribute {
            let value = Zeroizing::new(value);
            return to_key(&value).ok_or_else(|| {
                Failure::Final(ProviderError::Refused(
                    "the data key is not 256 bits".into(),
                ))
            });
        }
    }
    Err(Failure::Final(ProviderError::Refused(
        "the token did not reveal the data key's value".into(),
    )))
}

fn warn_if_extractable(session: &Session, handle: ObjectHandle, kek_id: &str) {
    if let Ok(attributes) = session.get_attributes(handle, &[AttributeType::Extractable]) {
        if attributes.contains(&Attribute::Extractable(true)) {
            tracing::warn!(%kek_id, "the PKCS#11 key-encryption key is extractable (CKA_EXTRACTABLE): it can leave the token");
        }
    }
}

fn pin_fingerprint(pin: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, pin.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Failures that retrying will not fix, whatever the token's health.
fn permanent(kind: OpKind, what: &str, error: &CkError) -> Option<ProviderError> {
    let CkError::Pkcs11(rv, _) = error else {
        // Not a token answer (a bad parameter built here): a bug or a misconfiguration.
        return Some(ProviderError::Refused(format!("{what}: {error}")));
    };
    match rv {
        RvError::EncryptedDataInvalid
        | RvError::EncryptedDataLenRange
        | RvError::WrappedKeyInvalid
        | RvError::WrappedKeyLenRange
        | RvError::DataInvalid
        | RvError::DataLenRange
            if kind == OpKind::Unwrap =>
        {
            Some(ProviderError::CannotUnwrap {
                kek_id: String::new(),
                reason: format!("{what}: {error}"),
            })
        }
        RvError::KeyFunctionNotPermitted
        | RvError::KeyTypeInconsistent
        | RvError::KeySizeRange
        | RvError::KeyUnextractable
        | RvError::KeyNotWrappable
        | RvError::MechanismInvalid
        | RvError::MechanismParamInvalid
        | RvError::TemplateIncomplete
        | RvError::TemplateInconsistent
        | RvError::AttributeValueInvalid
        | RvError::AttributeTypeInvalid
        | RvError::AttributeReadOnly
        | RvError::FunctionNotSupported
        | RvError::UnwrappingKeyTypeInconsistent
        | RvError::UnwrappingKeySizeRange
        | RvError::WrappingKeyTypeInconsistent
        | RvError::WrappingKeySizeRange
        | RvError::TokenWriteProtected
        | RvError::ActionProhibited
        | RvError::RandomNoRng => Some(ProviderError::Refused(format!(
            "{what}: {error} (check the key's attributes and the mechanism)"
        ))),
        _ => None,
    }
}

/// Errors that mean "this data" on a healthy token and "the token" on a missing one.
fn ambiguous(error: &CkError) -> bool {
    matches!(
        error,
        CkError::Pkcs11(RvError::GeneralError | RvError::FunctionFailed, _)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parses_with_defaults_and_never_takes_a_pin() {
        let config: Pkcs11Config = toml::from_str(
            "module = \"/usr/lib/softhsm/libsofthsm2.so\"\ntoken_label = \"t\"\n\
             pin_file = \"/run/pin\"\nkey_label = \"kek\"\n",
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(config.mechanism, WrapMechanism::AesGcm);
        assert_eq!(config.timeout, DEFAULT_TIMEOUT);
        assert_eq!(config.max_sessions, 4);
        assert_eq!(config.rotation_check_seconds, 30);

        let config: Pkcs11Config = toml::from_str(
            "module = \"m.so\"\ntoken_serial = \"abc\"\npin_env = \"P\"\nkey_id = \"0a0B\"\n\
             previous_key_ids = [\"01\"]\nmechanism = \"aes-key-wrap-pad\"\ntimeout_seconds = 0.5\n",
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(config.timeout, Duration::from_millis(500));
        assert_eq!(config.mechanism, WrapMechanism::AesKeyWrapPad);

        // The PIN itself is not a field.
        let err = toml::from_str::<Pkcs11Config>(
            "module = \"m\"\ntoken_label = \"t\"\npin = \"1234\"\nkey_label = \"k\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn validate_rejects_unusable_configs() {
        type Change = fn(&mut Pkcs11Config);
        let ok = Pkcs11Config::new("/m.so", "t", "/pin", "kek");
        ok.validate().unwrap();
        let cases: [(&str, Change); 9] = [
            ("no token", |c| c.token_label = None),
            ("two tokens", |c| c.token_serial = Some("s".into())),
            ("no pin", |c| c.pin_file = None),
            ("two pins", |c| c.pin_env = Some("P".into())),
            ("two keys", |c| c.key_id = Some("01".into())),
            ("bad id", |c| {
                c.key_label = None;
                c.key_id = Some("xyz".into())
            }),
            ("previous with label", |c| {
                c.previous_key_ids = vec!["01".into()]
            }),
            ("zero timeout", |c| c.timeout = Duration::ZERO),
            ("no sessions", |c| c.max_sessions = 0),
        ];
        for (name, change) in cases {
            let mut config = ok.clone();
            change(&mut config);
            assert!(
                matches!(config.validate(), Err(Pkcs11Error::InvalidConfig(_))),
                "{name}"
            );
        }
    }

    #[test]
    fn key_references_round_trip_as_pkcs11_uris() {
        let with_label = KekRef {
            label: Some(b"kek one/2;x".to_vec()),
            id: vec![0, 0, 0, 2],
        };
        let uri = with_label.to_uri();
        assert_eq!(uri, "pkcs11:object=kek%20one%2f2%3bx;id=%00%00%00%02");
        assert_eq!(KekRef::parse(&uri), Some(with_label));
        let id_only = KekRef {
            label: None,
            id: vec![0xab],
        };
        assert_eq!(id_only.to_uri(), "pkcs11:id=%ab");
        assert_eq!(KekRef::parse("pkcs11:id=%ab"), Some(id_only));
        for bad in [
            "pkcs11:",
            "pkcs11:object=k",
            "pkcs11:id=",
            "pkcs11:id=%zz",
            "pkcs11:id=%0",
            "arn:aws:kms:x",
            "pkcs11:token=t;id=%01",
            "pkcs11:id=%01;id=%02",
        ] {
            assert_eq!(KekRef::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn ids_order_as_numbers_and_next_id_counts_up() {
        use std::cmp::Ordering::*;
        assert_eq!(id_order(&[0, 0, 2], &[1]), Greater);
        assert_eq!(id_order(&[0, 1], &[1]), Equal);
        assert_eq!(id_order(&[1, 0], &[0xff]), Greater);
        assert_eq!(next_id(&[]), vec![0, 0, 0, 1]);
        assert_eq!(next_id(&[vec![0, 0, 0, 1], vec![7]]), vec![0, 0, 0, 8]);
        assert_eq!(next_id(&[vec![0xff]]), vec![0, 0, 1, 0]);
        assert_eq!(next_id(&[vec![0xff; 4]]), vec![1, 0, 0, 0, 0]);
    }

    #[test]
    fn namespace_hashes_differ() {
        assert_ne!(namespace_hash("a"), namespace_hash("b"));
        assert_eq!(namespace_hash("a"), namespace_hash("a"));
    }
}
