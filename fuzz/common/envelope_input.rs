// One fuzz input through opening what an upstream sends back: sealed payloads in a Payloads
// message (envelope parsing, data key unwrapping with a real keyring, AES-GCM), and sealed
// texts in an error message. A compromised or buggy upstream controls every byte. Shared (via
// `include!`) by the cargo-fuzz target `fuzz/fuzz_targets/envelope.rs` and the replay test
// `tests/fuzz_corpus.rs`. Nothing here may panic, whatever the bytes; refusals are fine.
//
// Input layout:
//   byte 0 (mod 3): 0 = the rest is a `temporal.api.common.v1.Payloads` message, opened
//                   strictly and leniently (pass-through: every envelope parsed field by field,
//                   none read by its shape, so the two must agree); 1 = the rest is an error message
//                   text whose sealed texts are opened; 2 = the rest is a Payloads message
//                   opened, then its offload references found (plan_resolve), each checked to
//                   re-encode to itself, and resolved with one fixed sealed object for every key
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
    /// Offload references found in the opened message, and the message with them resolved.
    pub resolved: Option<Result<(usize, Vec<u8>), String>>,
    /// How many payloads strict opening parsed field by field (an envelope laid out like one
    /// parsed before under its key is read by that layout instead).
    pub strict_parsed: Option<usize>,
}

/// The object every reference resolves to in mode 2: a sealed Payload whose data is
/// "seed-offloaded".
pub fn fixed_object() -> &'static bytes::Bytes {
    static OBJECT: OnceLock<bytes::Bytes> = OnceLock::new();
    OBJECT.get_or_init(|| {
        let fixture = envelope_fixture();
        let key = fixture
            .runtime
            .block_on(fixture.manager.sealing_key(NAMESPACE))
            .expect("sealing key");
        bytes::Bytes::from(key.seal(&fixed_payload()).expect("seal"))
    })
}

/// The serialized Payload [`fixed_object`] opens to.
pub fn fixed_payload() -> Vec<u8> {
    use prost::Message as _;
    temporalio_protos::protos::temporal::api::common::v1::Payload {
        metadata: [("encoding".to_string(), b"json/plain".to_vec())].into(),
        data: b"seed-offloaded".to_vec(),
        ..Default::default()
    }
    .encode_to_vec()
}

fn resolve_references(data: &[u8]) -> Result<(usize, Vec<u8>), String> {
    use portcullis::offload::resolve::plan_resolve;
    use portcullis::offload::Reference;
    let opened = open_message(data, false)?.unwrap_or_else(|| data.to_vec());
    let index = PayloadIndex::global();
    let Some(plan) =
        plan_resolve(index, PAYLOADS, &opened, WalkLimits::default()).map_err(|e| e.to_string())?
    else {
        return Ok((0, opened));
    };
    let mut objects = std::collections::HashMap::new();
    for (_, reference) in plan.references() {
        let again = Reference::from_payload(&reference.to_payload());
        assert_eq!(again, Ok(Some(reference.clone())), "a reference re-encodes to another");
        objects.insert(reference.key.clone(), fixed_object().clone());
    }
    let fixture = envelope_fixture();
    let refs = portcullis::crypto::envelope_info(fixed_object());
    let keys = fixture
        .runtime
        .block_on(fixture.manager.opening_keys(NAMESPACE, refs))
        .map_err(|e| e.to_string())?;
    let resolved = plan
        .apply(&opened, &objects, &[(None, keys)])
        .map_err(|e| e.to_string())?;
    Ok((plan.references().len(), resolved))
}

fn open_message(data: &[u8], pass_through: bool) -> Result<Option<Vec<u8>>, String> {
    open_counting(data, pass_through, &mut None)
}

/// [`open_message`], also telling how many payloads its plan parsed field by field.
fn open_counting(
    data: &[u8],
    pass_through: bool,
    parsed: &mut Option<usize>,
) -> Result<Option<Vec<u8>>, String> {
    let fixture = envelope_fixture();
    let index = PayloadIndex::global();
    let options = OpenOptions {
        decode_failures: true,
        pass_through,
        limits: WalkLimits::default(),
        strict: false,
    };
    let plan = plan_open(index, PAYLOADS, data, options).map_err(|e| e.to_string())?;
    *parsed = Some(plan.payloads_parsed());
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
    if selector % 3 == 2 {
        outcome.resolved = Some(resolve_references(rest));
    } else if selector % 3 == 0 {
        outcome.strict = Some(open_counting(rest, false, &mut outcome.strict_parsed));
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
