//! Real PKCS#11 tokens for tests: Debian's SoftHSM (installed by scripts/setup.sh).
//!
//! SoftHSM reads `SOFTHSM2_CONF` when a process initializes the module, so one test process has
//! one token directory: `CARGO_TARGET_TMPDIR/softhsm-PID`, created for the first token and
//! removed when it drops (directories of test processes that died are removed by the next run).
//! Tokens are used one at a time ([`Token::new`] waits for the previous one to drop): tokens
//! created by `softhsm2-util` appear in a running process only after the module is
//! re-initialized, which would disturb a test running alongside.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use portcullis::crypto::pkcs11::Pkcs11Config;
use tempfile::TempDir;
use tokio::sync::{Mutex, MutexGuard};

pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub const PIN: &str = "246810";
const SO_PIN: &str = "13579111";

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// This process's SoftHSM directory (config file and token directory); sets `SOFTHSM2_CONF`.
fn base() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("softhsm-{}", std::process::id()))
}

fn prepare_base() -> PathBuf {
    assert!(
        Path::new(MODULE).is_file(),
        "SoftHSM is missing ({MODULE}): run `bash scripts/setup.sh` (it installs softhsm2)"
    );
    let base = base();
    // Directories left by test processes that are gone.
    if let Ok(entries) = std::fs::read_dir(env!("CARGO_TARGET_TMPDIR")) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("softhsm-") {
                if !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
    }
    std::fs::create_dir_all(base.join("tokens")).expect("softhsm token dir");
    std::fs::write(
        base.join("softhsm2.conf"),
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
            base.join("tokens").display()
        ),
    )
    .expect("softhsm2.conf");
    // The same value every time: set before any module initializes, never changed after.
    std::env::set_var("SOFTHSM2_CONF", base.join("softhsm2.conf"));
    base
}

/// A fresh token, its PIN in a file. Dropping it removes its files.
pub struct Token {
    pub label: String,
    pub dir: TempDir,
    pub pin_file: PathBuf,
    token_dir: PathBuf,
    parked: PathBuf,
    _one_at_a_time: MutexGuard<'static, ()>,
}

impl Token {
    pub async fn new(label: &str) -> Token {
        let guard = ONE_AT_A_TIME.lock().await;
        let base = prepare_base();
        let tokens = base.join("tokens");
        let before = subdirs(&tokens);
        let output = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", label])
            .args(["--pin", PIN, "--so-pin", SO_PIN])
            .env("SOFTHSM2_CONF", base.join("softhsm2.conf"))
            .output()
            .expect("softhsm2-util (install softhsm2: bash scripts/setup.sh)");
        assert!(output.status.success(), "softhsm2-util: {output:?}");
        let token_dir = subdirs(&tokens)
            .into_iter()
            .find(|d| !before.contains(d))
            .expect("the new token's directory");
        let dir = tempfile::tempdir().expect("tempdir");
        let pin_file = dir.path().join("pin");
        std::fs::write(&pin_file, format!("{PIN}\n")).expect("pin file");
        Token {
            label: label.to_string(),
            parked: base.join(format!("parked-{label}")),
            dir,
            pin_file,
            token_dir,
            _one_at_a_time: guard,
        }
    }

    /// A `pkcs11` provider config for this token, keys labelled `key_label`, 2 s timeouts.
    pub fn config(&self, key_label: &str) -> Pkcs11Config {
        let mut config = Pkcs11Config::new(MODULE, &self.label, &self.pin_file, key_label);
        config.timeout = std::time::Duration::from_secs(2);
        config.rotation_check_seconds = 1;
        config
    }

    /// The token's files go away (as when an HSM is unplugged): SoftHSM loses the token.
    pub fn remove(&self) {
        std::fs::rename(&self.token_dir, &self.parked).expect("park the token");
    }

    /// The token's files come back.
    pub fn restore(&self) {
        std::fs::rename(&self.parked, &self.token_dir).expect("restore the token");
    }

    /// Runs the `portcullis` binary (`keys pkcs11-…`, `check`) against this SoftHSM.
    pub fn portcullis(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(args)
            .env("SOFTHSM2_CONF", base().join("softhsm2.conf"))
            .env("PORTCULLIS_LOG", "warn")
            .output()
            .expect("run portcullis")
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.token_dir);
        let _ = std::fs::remove_dir_all(&self.parked);
        let _ = std::fs::remove_dir_all(base());
    }
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}
