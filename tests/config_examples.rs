//! Every example in config/ loads and validates, so the docs cannot drift from the code.

use std::path::PathBuf;

use portcullis::config::{Config, ListenAddress};

#[test]
fn every_example_config_loads() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut loaded = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("config/") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let config = Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(!config.upstreams.is_empty());
        config.listen_address().expect("listen address");
        loaded.push(
            path.file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned(),
        );
    }
    loaded.sort();
    assert_eq!(
        loaded,
        [
            "cloud-credentials.toml",
            "cloud.toml",
            "service.toml",
            "sidecar-unix.toml",
            "sidecar.toml"
        ]
    );
}

#[test]
fn sidecar_examples_are_local_only() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config");
    let sidecar = Config::load(&dir.join("sidecar.toml")).expect("sidecar");
    match sidecar.listen_address().expect("address") {
        ListenAddress::Tcp(addr) => assert!(addr.ip().is_loopback()),
        ListenAddress::Unix(_) => panic!("expected TCP"),
    }
    let unix = Config::load(&dir.join("sidecar-unix.toml")).expect("unix");
    assert!(matches!(
        unix.listen_address().expect("address"),
        ListenAddress::Unix(_)
    ));
    // The same sidecar file on a public address is refused.
    let text = std::fs::read_to_string(dir.join("sidecar.toml")).expect("read");
    let public = text.replace("127.0.0.1:7233", "0.0.0.0:7233");
    assert!(Config::from_toml(&public).is_err());
}
