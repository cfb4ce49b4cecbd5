//! A real AWS KMS API endpoint for tests: `moto_server` from the project venv on a free port,
//! killed when its handle drops (also when a test panics).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use portcullis::crypto::{AwsKmsConfig, AwsKmsProvider, StaticCredentials};
use portcullis::dev::free_port;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

pub const TIMEOUT: Duration = Duration::from_secs(2);

pub fn moto_binary() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/moto_server");
    assert!(
        path.is_file(),
        "moto_server (a local AWS KMS API) is missing at {}: run `bash scripts/setup.sh` first",
        path.display()
    );
    path
}

/// A running `moto_server`.
pub struct Moto {
    pub child: Child,
    pub port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Moto {
    pub async fn start() -> Moto {
        Moto::start_on(free_port().expect("free port")).await
    }

    pub async fn start_on(port: u16) -> Moto {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("moto.log");
        let log_file = std::fs::File::create(&log).expect("moto log");
        let mut child = Command::new(moto_binary())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("moto log"))
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .expect("start moto_server");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().expect("moto status") {
                panic!(
                    "moto_server exited with {status}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen on {port}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Moto {
            child,
            port,
            log,
            _dir: dir,
        }
    }

    pub async fn stop(&mut self) {
        self.child.kill().await.expect("kill moto_server");
    }

    pub fn config(&self, key_id: &str) -> AwsKmsConfig {
        let mut config = AwsKmsConfig::new(key_id, "us-east-1");
        config.endpoint = Some(format!("http://127.0.0.1:{}", self.port));
        config.timeout = TIMEOUT;
        // Dummy credentials: moto accepts any, and the test needs no global environment.
        config.credentials = Some(StaticCredentials {
            access_key_id: "testing".into(),
            secret_access_key: "testing".into(),
            session_token: None,
        });
        config
    }

    /// Creates a symmetric key (and an alias for it); returns its ARN.
    pub async fn create_key(&self, alias: Option<&str>) -> String {
        // Set-up is not what is measured: give moto time on a loaded machine (its first
        // request is slow), unlike the tight timeout the tests put on the proxy's calls.
        let mut config = self.config("unused");
        config.timeout = Duration::from_secs(20);
        let client = config.sdk_client().await.expect("KMS client");
        let created = client.create_key().send().await;
        let arn = created
            .unwrap_or_else(|e| panic!("CreateKey: {e:?}\n{}", self.log_text()))
            .key_metadata
            .and_then(|m| m.arn)
            .expect("CreateKey returned an ARN");
        if let Some(alias) = alias {
            client
                .create_alias()
                .alias_name(alias)
                .target_key_id(&arn)
                .send()
                .await
                .expect("CreateAlias");
        }
        arn
    }

    pub async fn provider(&self, key_id: &str) -> AwsKmsProvider {
        AwsKmsProvider::new(&self.config(key_id))
            .await
            .expect("provider")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
