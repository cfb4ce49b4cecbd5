// One fuzz input through opening what an upstream sends back: sealed payloads in a Payloads
// message (envelope parsing, data key unwrapping with a real keyring, AES-GCM), and sealed
// texts in an error message. A compromised or buggy upstream controls every byte. Shared (via
// `include!`) by the cargo-fuzz target `fuzz/fuzz_targets/envelope.rs` and the replay test
// `tests/fuzz_corpus.rs`. Nothing here may panic, whatever the bytes; refusals are fine.
//
// Input layout:
//   byte 0 (mod 2): 0 = the rest is a `temporal.api.common.v1.Payloads` message, opened
//                   strictly and leniently (pass-through); 1 = the rest is an error message
//                   text whose sealed texts are opened
//
// Check reported in the outcome: `valid-*` seeds (sealed by this fixture's keyring for
// namespace "ns1") open, to payloads whose data starts with "seed-".

use std::sync::OnceLock;

use portcullis::crypto::message::{find_sealed_texts, open_texts, plan_open, sealed_text_ref};
use portcullis::crypto::{DataKeyManager, DataKeyPolicy, LocalKeyProvider, OpenOptions};
use portcullis::payload::walker::{PayloadIndex, WalkLimits};

include!("hostile_fixture.rs");

pub const PAYLOADS: &str = "temporal.api.common.v1.Payloads";
pub const NAMESPACE: &str = "ns1";

pub struct EnvelopeFixture {
    pub runtime: tokio::runtime::Runtime,
    pub manager: DataKeyManager,
}

pub fn envelope_fixture() -> &'static EnvelopeFixture {
    static FIXTURE: OnceLock<EnvelopeFixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("portcullis-fuzz-keyring-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("keyring.toml");
        std::fs::write(&path, KEYRING_TOML).expect("write keyring");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .expect("keyring mode");
        }
        let provider = LocalKeyProvider::load(&path).expect("fixture keyring");
        let manager = DataKeyManager::new(std::sync::Arc::new(provider), DataKeyPolicy::default())
            .expect("manager");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        EnvelopeFixture { runtime, manager }
    })
}

#[derive(Debug, Default)]
pub struct EnvelopeOutcome {
    /// Strict opening: the opened message, or why not.
    pub strict: Option<Result<Option<Vec<u8>>, String>>,
    /// Lenient opening (pass-through): must not fail where strict opening succeeded.
    pub lenient: Option<Result<Option<Vec<u8>>, String>>,
    pub text: Option<Result<String, String>>,
}

fn open_message(data: &[u8], pass_through: bool) -> Result<Option<Vec<u8>>, String> {
    let fixture = envelope_fixture();
    let index = PayloadIndex::global();
    let options = OpenOptions {
        decode_failures: true,
        pass_through,
        limits: WalkLimits::default(),
        strict: false,
    };
    let plan = plan_open(index, PAYLOADS, data, options).map_err(|e| e.to_string())?;
    if !plan.has_sealed() {
        return Ok(None);
    }
    let keys = fixture
        .runtime
        .block_on(
            fixture
                .manager
                .opening_keys(NAMESPACE, plan.refs().iter().cloned()),
        )
        .map_err(|e| e.to_string())?;
    plan.open(index, PAYLOADS, data, &keys)
        .map_err(|e| e.to_string())
}

pub fn one_envelope_input(data: &[u8]) -> Option<EnvelopeOutcome> {
    let (&selector, rest) = data.split_first()?;
    let mut outcome = EnvelopeOutcome::default();
    if selector % 2 == 0 {
        outcome.strict = Some(open_message(rest, false));
        outcome.lenient = Some(open_message(rest, true));
    } else {
        let text = String::from_utf8_lossy(rest);
        let found = find_sealed_texts(&text);
        if !found.is_empty() {
            let fixture = envelope_fixture();
            let refs: Result<Vec<_>, _> = found.iter().map(sealed_text_ref).collect();
            outcome.text = Some(match refs {
                Ok(refs) => fixture
                    .runtime
                    .block_on(fixture.manager.opening_keys(NAMESPACE, refs))
                    .and_then(|keys| open_texts(&text, &found, &keys))
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            });
        }
    }
    Some(outcome)
}
