//! Wrap (new data key) and unwrap cost of each key provider, next to the data key manager's
//! cached paths, in the same run: the local keyring, a PKCS#11 token (SoftHSM, both
//! mechanisms) and AWS KMS (moto_server on loopback). Needs `scripts/setup.sh` (softhsm2, the
//! venv with moto): fails at once without them.
//!
//! `cargo bench --bench key_providers -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use portcullis::crypto::pkcs11::{Pkcs11Config, Pkcs11Provider, WrapMechanism};
use portcullis::crypto::{
    envelope_info, AwsKmsConfig, AwsKmsProvider, DataKeyManager, DataKeyPolicy, KeyProvider,
    Keyring, LocalKeyProvider, StaticCredentials,
};

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// Kills moto and removes the token directory when the bench ends (also on panic).
struct Cleanup {
    moto: Child,
    dir: tempfile::TempDir,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = self.moto.kill();
        let _ = self.moto.wait();
        let _ = std::fs::remove_dir_all(self.dir.path());
    }
}

fn softhsm(dir: &Path) -> PathBuf {
    assert!(
        Path::new(MODULE).is_file(),
        "softhsm2 missing: run scripts/setup.sh"
    );
    std::fs::create_dir_all(dir.join("tokens")).expect("token dir");
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            dir.join("tokens").display()
        ),
    )
    .expect("conf");
    std::env::set_var("SOFTHSM2_CONF", &conf);
    let status = Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            "bench",
            "--pin",
            "1234",
            "--so-pin",
            "5678",
        ])
        .stdout(Stdio::null())
        .status()
        .expect("softhsm2-util");
    assert!(status.success());
    let pin = dir.join("pin");
    std::fs::write(&pin, "1234").expect("pin");
    pin
}

fn moto(port: u16) -> Child {
    let binary = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/moto_server");
    assert!(
        binary.is_file(),
        "moto_server missing: run scripts/setup.sh"
    );
    let child = Command::new(binary)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto_server");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto_server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    child
}

fn providers(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let pin = softhsm(dir.path());
    let port = portcullis::dev::free_port().expect("port");
    let _cleanup = Cleanup {
        moto: moto(port),
        dir,
    };

    let mut list: Vec<(&str, Arc<dyn KeyProvider>)> = vec![(
        "local",
        Arc::new(LocalKeyProvider::new(&Keyring::generate())),
    )];
    for (name, mechanism) in [
        ("pkcs11_softhsm_gcm", WrapMechanism::AesGcm),
        ("pkcs11_softhsm_kwp", WrapMechanism::AesKeyWrapPad),
    ] {
        let mut config = Pkcs11Config::new(MODULE, "bench", &pin, "kek");
        config.mechanism = mechanism;
        let provider = runtime
            .block_on(Pkcs11Provider::new(&config))
            .expect("pkcs11");
        if runtime
            .block_on(provider.list_keys())
            .expect("keys")
            .is_empty()
        {
            runtime
                .block_on(provider.create_key(None, None))
                .expect("create key");
        }
        list.push((name, Arc::new(provider)));
    }
    let mut kms = AwsKmsConfig::new("unused", "us-east-1");
    kms.endpoint = Some(format!("http://127.0.0.1:{port}"));
    kms.timeout = Duration::from_secs(20);
    kms.credentials = Some(StaticCredentials {
        access_key_id: "testing".into(),
        secret_access_key: "testing".into(),
        session_token: None,
    });
    let arn = runtime.block_on(async {
        let client = kms.sdk_client().await.expect("client");
        client
            .create_key()
            .send()
            .await
            .expect("CreateKey")
            .key_metadata
            .and_then(|m| m.arn)
            .expect("arn")
    });
    kms.key_id = arn;
    let provider = runtime.block_on(AwsKmsProvider::new(&kms)).expect("kms");
    list.push(("aws_kms_moto", Arc::new(provider)));

    let mut group = c.benchmark_group("key_provider");
    group.sample_size(30);
    for (name, provider) in &list {
        let material = runtime
            .block_on(provider.generate_data_key("bench"))
            .expect("wrap");
        group.bench_function(format!("{name}/wrap"), |b| {
            b.iter(|| {
                runtime
                    .block_on(provider.generate_data_key(black_box("bench")))
                    .expect("wrap")
            })
        });
        group.bench_function(format!("{name}/unwrap"), |b| {
            b.iter(|| {
                runtime
                    .block_on(provider.unwrap_data_key(
                        "bench",
                        &material.kek_id,
                        black_box(&material.wrapped),
                    ))
                    .expect("unwrap")
            })
        });
    }
    // What a call pays once the data key manager holds the key: no provider call at all.
    let (_, token) = &list[1];
    let manager = DataKeyManager::new(token.clone(), DataKeyPolicy::default()).expect("manager");
    let sealed = runtime
        .block_on(manager.sealing_key("bench"))
        .expect("sealing key")
        .seal(b"\x0a\x00")
        .expect("seal");
    group.bench_function("pkcs11_softhsm_gcm/manager_sealing_key_cached", |b| {
        b.iter(|| {
            runtime
                .block_on(manager.sealing_key(black_box("bench")))
                .expect("key")
        })
    });
    group.bench_function("pkcs11_softhsm_gcm/manager_opening_keys_cached", |b| {
        b.iter(|| {
            runtime
                .block_on(manager.opening_keys("bench", envelope_info(black_box(&sealed))))
                .expect("keys")
        })
    });
    group.finish();
}

criterion_group!(benches, providers);
criterion_main!(benches);
