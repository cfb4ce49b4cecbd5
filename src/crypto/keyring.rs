//! The `local` key provider: versioned 256-bit KEKs in a keyring file.
//!
//! ```toml
//! primary = "k2"
//!
//! [[keys]]
//! id = "k1"
//! created = "2026-01-02T03:04:05Z"
//! key_base64 = "…"
//! ```
//! The primary wraps new data keys; every key in the file can still unwrap. Rotation adds a key
//! and makes it primary; it never removes one, since payloads sealed long ago may still be read.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::{AeadCore, AeadInPlace, KeyInit, OsRng};
use aes_gcm::{Aes256Gcm, Key, Nonce, Tag};
use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use super::envelope::{length_prefixed, NONCE_LEN, TAG_LEN};
use super::provider::{DataKeyMaterial, KeyProvider, ProviderError};

/// Binds wrapped keys to this format, the namespace and the KEK.
const WRAP_TAG: &[u8] = b"portcullis/kek/v1";
/// A wrapped data key from this provider: nonce, encrypted key, tag.
const WRAPPED_LEN: usize = NONCE_LEN + 32 + TAG_LEN;

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("keyring {0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
    #[error("keyring {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "keyring {path} is readable or writable by group or others (mode {mode:04o}); \
         run `chmod 600 {path}`"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("keyring {path} is invalid: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

#[derive(Serialize, Deserialize)]
struct KeyringFile {
    primary: String,
    keys: Vec<KeyEntry>,
}

#[derive(Serialize, Deserialize)]
struct KeyEntry {
    id: String,
    created: String,
    key_base64: String,
}

impl Drop for KeyEntry {
    fn drop(&mut self) {
        self.key_base64.zeroize();
    }
}

struct Kek {
    id: String,
    created: String,
    key: Zeroizing<[u8; 32]>,
}

/// The KEKs of a keyring file, in memory.
pub struct Keyring {
    primary: String,
    keys: Vec<Kek>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("primary", &self.primary)
            .field("keys", &self.key_ids().collect::<Vec<_>>())
            .finish()
    }
}

impl Keyring {
    /// A keyring with one fresh key that lives only in memory (dev mode, tests, benches).
    pub fn generate() -> Keyring {
        let kek = new_kek("k1".to_owned());
        Keyring {
            primary: kek.id.clone(),
            keys: vec![kek],
        }
    }

    /// Creates a keyring file with one fresh key, mode 0600. Refuses to overwrite a file.
    pub fn init(path: &Path) -> Result<Keyring, KeyringError> {
        let keyring = Keyring::generate();
        let mut file = create_private(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => KeyringError::Exists(path.to_path_buf()),
            _ => io_error(path, e),
        })?;
        write_all_synced(&mut file, &keyring.to_toml(path)?).map_err(|e| io_error(path, e))?;
        Ok(keyring)
    }

    /// Adds a fresh key to the keyring file and makes it primary. The file is replaced
    /// atomically (write a private temporary file, fsync, rename), so a crash leaves either the
    /// old or the new keyring, never half of one. Rotations must not run concurrently.
    pub fn rotate(path: &Path) -> Result<Keyring, KeyringError> {
        let mut keyring = Keyring::load(path)?;
        let next = keyring
            .keys
            .iter()
            .filter_map(|k| k.id.strip_prefix('k')?.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let kek = new_kek(format!("k{next}"));
        keyring.primary = kek.id.clone();
        keyring.keys.push(kek);
        let contents = keyring.to_toml(path)?;

        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let name = path.file_name().ok_or_else(|| KeyringError::Invalid {
            path: path.to_path_buf(),
            reason: "not a file path".into(),
        })?;
        let tmp = dir.join(format!(
            ".{}.tmp-{}-{:08x}",
            name.to_string_lossy(),
            std::process::id(),
            OsRng.next_u32()
        ));
        let written = create_private(&tmp)
            .and_then(|mut file| write_all_synced(&mut file, &contents))
            .and_then(|()| fs::rename(&tmp, path));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io_error(path, e));
        }
        // Persist the rename itself; a failure here does not undo the rotation.
        if let Ok(dir) = File::open(dir) {
            let _ = dir.sync_all();
        }
        Ok(keyring)
    }

    /// Reads a keyring file. On unix, refuses one that group or others may access.
    pub fn load(path: &Path) -> Result<Keyring, KeyringError> {
        let mut file = File::open(path).map_err(|e| io_error(path, e))?;
        // Check the open file, not the path: nothing can swap it in between.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = file
                .metadata()
                .map_err(|e| io_error(path, e))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(KeyringError::Permissions {
                    path: path.to_path_buf(),
                    mode: mode & 0o7777,
                });
            }
        }
        let mut contents = Zeroizing::new(String::new());
        file.read_to_string(&mut contents)
            .map_err(|e| io_error(path, e))?;
        let invalid = |reason: String| KeyringError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let parsed: KeyringFile = toml::from_str(&contents).map_err(|e| invalid(e.to_string()))?;
        let mut keys: Vec<Kek> = Vec::with_capacity(parsed.keys.len());
        for entry in &parsed.keys {
            if entry.id.is_empty() {
                return Err(invalid("a key has an empty id".into()));
            }
            if keys.iter().any(|k| k.id == entry.id) {
                return Err(invalid(format!("key id {:?} appears twice", entry.id)));
            }
            let decoded = Zeroizing::new(
                BASE64
                    .decode(entry.key_base64.trim())
                    .map_err(|_| invalid(format!("key {:?} is not base64", entry.id)))?,
            );
            let mut key = Zeroizing::new([0u8; 32]);
            if decoded.len() != key.len() {
                return Err(invalid(format!("key {:?} is not 256 bits", entry.id)));
            }
            key.copy_from_slice(&decoded);
            keys.push(Kek {
                id: entry.id.clone(),
                created: entry.created.clone(),
                key,
            });
        }
        if !keys.iter().any(|k| k.id == parsed.primary) {
            return Err(invalid(format!(
                "primary key {:?} is not in the keyring",
                parsed.primary
            )));
        }
        Ok(Keyring {
            primary: parsed.primary.clone(),
            keys,
        })
    }

    pub fn primary_id(&self) -> &str {
        &self.primary
    }

    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.id.as_str())
    }

    fn to_toml(&self, path: &Path) -> Result<Zeroizing<String>, KeyringError> {
        let file = KeyringFile {
            primary: self.primary.clone(),
            keys: self
                .keys
                .iter()
                .map(|k| KeyEntry {
                    id: k.id.clone(),
                    created: k.created.clone(),
                    key_base64: BASE64.encode(*k.key),
                })
                .collect(),
        };
        toml::to_string_pretty(&file)
            .map(Zeroizing::new)
            .map_err(|e| KeyringError::Invalid {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
    }
}

fn new_kek(id: String) -> Kek {
    let mut key = Zeroizing::new([0u8; 32]);
    OsRng.fill_bytes(&mut key[..]);
    let created = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    Kek { id, created, key }
}

fn io_error(path: &Path, source: std::io::Error) -> KeyringError {
    KeyringError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates a new file that only its owner can read (mode 0600 from the start, not chmod later).
fn create_private(path: &Path) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)
}

fn write_all_synced(file: &mut File, contents: &str) -> std::io::Result<()> {
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}

/// A [`LocalKeyProvider`] that re-reads its keyring file on demand ([`ReloadingLocalProvider::reload`]),
/// so `portcullis keys rotate` takes effect without a restart.
pub struct ReloadingLocalProvider {
    path: std::path::PathBuf,
    current: std::sync::RwLock<std::sync::Arc<LocalKeyProvider>>,
}

impl ReloadingLocalProvider {
    pub fn load(path: &Path) -> Result<Self, KeyringError> {
        Ok(ReloadingLocalProvider {
            path: path.to_path_buf(),
            current: std::sync::RwLock::new(std::sync::Arc::new(LocalKeyProvider::load(path)?)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn provider(&self) -> std::sync::Arc<LocalKeyProvider> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn primary_id(&self) -> String {
        self.provider().primary.clone()
    }

    /// Re-reads the keyring; returns whether the primary key changed. A keyring that does not
    /// load (bad permissions, corrupt) leaves the current one in force.
    pub fn reload(&self) -> Result<bool, KeyringError> {
        let fresh = LocalKeyProvider::load(&self.path)?;
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = current.primary != fresh.primary;
        *current = std::sync::Arc::new(fresh);
        Ok(changed)
    }
}

#[async_trait::async_trait]
impl KeyProvider for ReloadingLocalProvider {
    async fn generate_data_key(&self, namespace: &str) -> Result<DataKeyMaterial, ProviderError> {
        self.provider().generate_data_key(namespace).await
    }

    async fn unwrap_data_key(
        &self,
        namespace: &str,
        kek_id: &str,
        wrapped: &[u8],
    ) -> Result<Zeroizing<[u8; 32]>, ProviderError> {
        self.provider()
            .unwrap_data_key(namespace, kek_id, wrapped)
            .await
    }
}

/// The `local` provider: wraps data keys with AES-256-GCM under the keyring's KEKs.
pub struct LocalKeyProvider {
    primary: String,
    ciphers: Vec<(String, Aes256Gcm)>,
}

impl fmt::Debug for LocalKeyProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalKeyProvider")
            .field("primary", &self.primary)
            .field(
                "keys",
                &self.ciphers.iter().map(|(id, _)| id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl LocalKeyProvider {
    pub fn new(keyring: &Keyring) -> Self {
        let ciphers = keyring
            .keys
            .iter()
            .map(|k| {
                (
                    k.id.clone(),
                    Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&k.key[..])),
                )
            })
            .collect();
        LocalKeyProvider {
            primary: keyring.primary.clone(),
            ciphers,
        }
    }

    pub fn load(path: &Path) -> Result<Self, KeyringError> {
        Keyring::load(path).map(|keyring| LocalKeyProvider::new(&keyring))
    }

    fn cipher(&self, kek_id: &str) -> Option<&Aes256Gcm> {
        self.ciphers
            .iter()
            .find(|(id, _)| id == kek_id)
            .map(|(_, cipher)| cipher)
    }
}

fn wrap_aad(namespace: &str, kek_id: &str) -> Vec<u8> {
    length_prefixed(&[WRAP_TAG, namespace.as_bytes(), kek_id.as_bytes()])
}

#[async_trait]
impl KeyProvider for LocalKeyProvider {
    async fn generate_data_key(&self, namespace: &str) -> Result<DataKeyMaterial, ProviderError> {
        let cipher = self
            .cipher(&self.primary)
            .ok_or_else(|| ProviderError::UnknownKek(self.primary.clone()))?;
        let mut plaintext = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(&mut plaintext[..]);

        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let mut wrapped = Vec::with_capacity(WRAPPED_LEN);
        wrapped.extend_from_slice(&nonce);
        wrapped.extend_from_slice(&plaintext[..]);
        let tag = cipher
            .encrypt_in_place_detached(
                &nonce,
                &wrap_aad(namespace, &self.primary),
                &mut wrapped[NONCE_LEN..],
            )
            .map_err(|_| ProviderError::Refused("AES-GCM wrap failed".into()))?;
        wrapped.extend_from_slice(&tag);
        Ok(DataKeyMaterial {
            plaintext,
            wrapped,
            kek_id: self.primary.clone(),
        })
    }

    async fn unwrap_data_key(
        &self,
        namespace: &str,
        kek_id: &str,
        wrapped: &[u8],
    ) -> Result<Zeroizing<[u8; 32]>, ProviderError> {
        let cipher = self
            .cipher(kek_id)
            .ok_or_else(|| ProviderError::UnknownKek(kek_id.to_owned()))?;
        let cannot = |reason: &str| ProviderError::CannotUnwrap {
            kek_id: kek_id.to_owned(),
            reason: reason.to_owned(),
        };
        if wrapped.len() != WRAPPED_LEN {
            return Err(cannot("wrong length"));
        }
        let (nonce, rest) = wrapped.split_at(NONCE_LEN);
        let (body, tag) = rest.split_at(32);
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(body);
        cipher
            .decrypt_in_place_detached(
                Nonce::from_slice(nonce),
                &wrap_aad(namespace, kek_id),
                &mut key[..],
                Tag::from_slice(tag),
            )
            .map_err(|_| cannot("authentication failed (another namespace, or tampered)"))?;
        Ok(key)
    }
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn init_writes_a_private_file_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.toml");
        let keyring = Keyring::init(&path).unwrap();
        assert_eq!(keyring.primary_id(), "k1");
        assert_eq!(mode(&path), 0o600);
        let before = fs::read(&path).unwrap();
        let text = String::from_utf8(before.clone()).unwrap();
        assert!(text.starts_with("primary = \"k1\"\n"), "{text}");
        assert!(
            text.contains("[[keys]]\nid = \"k1\"\ncreated = \"20"),
            "{text}"
        );
        assert!(matches!(Keyring::init(&path), Err(KeyringError::Exists(_))));
        assert_eq!(fs::read(&path).unwrap(), before);

        let loaded = Keyring::load(&path).unwrap();
        assert_eq!(loaded.primary_id(), "k1");
        assert_eq!(loaded.keys[0].key, keyring.keys[0].key);
        assert!(!format!("{loaded:?}").contains(&BASE64.encode(*loaded.keys[0].key)));
    }

    #[test]
    fn load_refuses_group_or_world_access() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.toml");
        Keyring::init(&path).unwrap();
        for bad in [0o640, 0o604, 0o660, 0o644] {
            fs::set_permissions(&path, fs::Permissions::from_mode(bad)).unwrap();
            let err = Keyring::load(&path).unwrap_err();
            assert!(
                matches!(err, KeyringError::Permissions { mode, .. } if mode == bad),
                "{err}"
            );
            assert!(err.to_string().contains("chmod 600"), "{err}");
            assert!(Keyring::rotate(&path).is_err());
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        Keyring::load(&path).unwrap();
    }

    #[test]
    fn load_rejects_invalid_files() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("not toml", "not = [valid"),
            ("missing primary", "primary = \"k9\"\n[[keys]]\nid = \"k1\"\ncreated = \"\"\nkey_base64 = \"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"\n"),
            ("short key", "primary = \"k1\"\n[[keys]]\nid = \"k1\"\ncreated = \"\"\nkey_base64 = \"AAAA\"\n"),
        ];
        for (name, contents) in cases {
            let path = dir.path().join(name);
            let mut file = create_private(&path).unwrap();
            file.write_all(contents.as_bytes()).unwrap();
            assert!(
                matches!(Keyring::load(&path), Err(KeyringError::Invalid { .. })),
                "{name}"
            );
        }
    }

    #[tokio::test]
    async fn rotation_keeps_old_keys_able_to_unwrap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.toml");
        Keyring::init(&path).unwrap();
        let old = LocalKeyProvider::load(&path).unwrap();
        let before = old.generate_data_key("ns").await.unwrap();
        assert_eq!(before.kek_id, "k1");

        let rotated = Keyring::rotate(&path).unwrap();
        assert_eq!(rotated.primary_id(), "k2");
        assert_eq!(rotated.key_ids().collect::<Vec<_>>(), ["k1", "k2"]);
        assert_eq!(mode(&path), 0o600);
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);

        let new = LocalKeyProvider::load(&path).unwrap();
        let unwrapped = new
            .unwrap_data_key("ns", "k1", &before.wrapped)
            .await
            .unwrap();
        assert_eq!(unwrapped, before.plaintext);

        let after = new.generate_data_key("ns").await.unwrap();
        assert_eq!(after.kek_id, "k2");
        // The old process does not know k2: a permanent error, not a transient one.
        let err = old
            .unwrap_data_key("ns", "k2", &after.wrapped)
            .await
            .unwrap_err();
        assert_eq!(err, ProviderError::UnknownKek("k2".into()));
        assert!(!err.is_transient());

        assert_eq!(Keyring::rotate(&path).unwrap().primary_id(), "k3");
    }

    #[tokio::test]
    async fn wrapped_keys_are_bound_to_namespace_and_kek() {
        let provider = LocalKeyProvider::new(&Keyring::generate());
        let material = provider.generate_data_key("a").await.unwrap();
        assert_eq!(material.wrapped.len(), WRAPPED_LEN);
        assert!(!format!("{material:?}").contains("plaintext: ["));
        for (namespace, wrapped) in [
            ("b", material.wrapped.clone()),
            ("a", material.wrapped[1..].to_vec()),
            ("a", {
                let mut w = material.wrapped.clone();
                w[20] ^= 1;
                w
            }),
        ] {
            let err = provider
                .unwrap_data_key(namespace, "k1", &wrapped)
                .await
                .unwrap_err();
            assert!(matches!(err, ProviderError::CannotUnwrap { .. }), "{err}");
        }
    }
}
