// One fuzz input through bearer-token handling: token verification against a JWKS, JWKS
// documents, and the permissions claim. Shared (via `include!`) by the cargo-fuzz target
// `fuzz/fuzz_targets/bearer.rs` and the replay test `tests/fuzz_corpus.rs`. Nothing here may
// panic, whatever the bytes; refusals are fine.
//
// Input layout:
//   byte 0 (mod 3): 0 = the rest is a token (as after "Bearer "), verified against the fixed
//                   key's JWKS; 1 = the rest is a JWKS document; 2 = the rest is the JSON of a
//                   permissions claim
//   rest:           the bytes
//
// Check reported in the outcome: a token verifies only if it was signed by the fixed key
// (`valid-*` seeds are, and must verify; the fuzzer cannot forge one).

use std::sync::{Arc, OnceLock};

use portcullis::authz::bearer::{roles_from_permissions, BearerVerifier, DevSigningKey};

include!("hostile_fixture.rs");

pub struct BearerFixture {
    pub runtime: tokio::runtime::Runtime,
    pub verifier: Arc<BearerVerifier>,
    pub key: DevSigningKey,
    _dir: std::path::PathBuf,
}

pub fn bearer_fixture() -> &'static BearerFixture {
    static FIXTURE: OnceLock<BearerFixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        use base64::Engine as _;
        let pkcs8 = base64::engine::general_purpose::STANDARD
            .decode(TOKEN_KEY_PKCS8_B64)
            .expect("fixture key");
        let key = DevSigningKey::from_pkcs8("fuzz-kid", &pkcs8).expect("fixture key");
        let dir = std::env::temp_dir().join(format!("portcullis-fuzz-jwks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let jwks = dir.join("jwks.json");
        std::fs::write(&jwks, key.jwks().to_string()).expect("write jwks");
        let config: portcullis::authz::BearerConfig = serde_json::from_value(serde_json::json!({
            "issuer": ISSUER,
            "audience": [AUDIENCE],
            "jwks_file": jwks,
        }))
        .expect("bearer config");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let verifier = runtime
            .block_on(BearerVerifier::new(&config))
            .expect("verifier");
        BearerFixture {
            runtime,
            verifier,
            key,
            _dir: dir,
        }
    })
}

#[derive(Debug)]
pub struct BearerOutcome {
    pub mode: u8,
    /// For tokens: verified (with the identity) or why not.
    pub verified: Option<Result<String, String>>,
    pub jwks_keys: Option<Result<usize, String>>,
}

pub fn one_bearer_input(data: &[u8]) -> Option<BearerOutcome> {
    let (&selector, rest) = data.split_first()?;
    let mode = selector % 3;
    let mut outcome = BearerOutcome {
        mode,
        verified: None,
        jwks_keys: None,
    };
    match mode {
        0 => {
            let fixture = bearer_fixture();
            let token = String::from_utf8_lossy(rest);
            let result = fixture
                .runtime
                .block_on(fixture.verifier.verify(&token))
                .map(|identity| identity.identity)
                .map_err(|e| e.to_string());
            outcome.verified = Some(result);
        }
        1 => outcome.jwks_keys = Some(portcullis::fuzzing::jwks_keys(rest)),
        _ => {
            if let Ok(claim) = serde_json::from_slice::<serde_json::Value>(rest) {
                let _ = roles_from_permissions(&claim);
            }
        }
    }
    Some(outcome)
}
