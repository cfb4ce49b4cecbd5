//! Compression and offload through the sealing and opening walks (no object store: the objects
//! the walk collects are handed to the resolving half directly).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use temporalio_protos::temporal::api::common::v1::{Payload, Payloads};
use temporalio_protos::temporal::api::workflowservice::v1::StartWorkflowExecutionRequest;

use super::resolve::{may_hold_references, plan_resolve};
use super::seal::{threshold_to_fit, OffloadTarget};
use super::SealServices;
use crate::crypto::message::{plan_open, seal_message_with, ScopedKeys};
use crate::crypto::proto::Envelope;
use crate::crypto::{
    CompressionConfig, CryptoError, DataKeyManager, DataKeyPolicy, Keyring, LocalKeyProvider,
    OpenOptions,
};
use crate::payload::walker::{FailureMode, PayloadIndex, WalkError, WalkLimits};

const START: &str = "temporal.api.workflowservice.v1.StartWorkflowExecutionRequest";

fn manager() -> DataKeyManager {
    DataKeyManager::new(
        Arc::new(LocalKeyProvider::new(&Keyring::generate())),
        DataKeyPolicy::default(),
    )
    .unwrap()
}

fn json_payload(data: Vec<u8>) -> Payload {
    Payload {
        metadata: [("encoding".to_string(), b"json/plain".to_vec())].into(),
        data,
        ..Default::default()
    }
}

/// A start request with one payload per entry of `inputs`.
fn start(inputs: Vec<Vec<u8>>) -> Vec<u8> {
    StartWorkflowExecutionRequest {
        namespace: "ns".into(),
        workflow_id: "wf".into(),
        input: Some(Payloads {
            payloads: inputs.into_iter().map(json_payload).collect(),
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

fn big_json(len: usize) -> Vec<u8> {
    let mut out = b"[".to_vec();
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(
            format!(
                "{{\"order\":{i},\"customer\":\"secret-marker-{}\",\"status\":\"shipped\"}},",
                i % 97
            )
            .as_bytes(),
        );
        i += 1;
    }
    out.push(b']');
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn payloads_of(message: &[u8]) -> Vec<Payload> {
    StartWorkflowExecutionRequest::decode(message)
        .unwrap()
        .input
        .unwrap()
        .payloads
}

async fn open(manager: &DataKeyManager, message: &[u8]) -> Vec<u8> {
    let index = PayloadIndex::global();
    let plan = plan_open(index, START, message, OpenOptions::default()).unwrap();
    let keys = manager
        .opening_keys("ns", plan.refs().iter().cloned())
        .await
        .unwrap();
    plan.open(index, START, message, &keys).unwrap().unwrap()
}

#[tokio::test]
async fn compressed_payloads_are_v2_envelopes_that_open_to_the_original() {
    let manager = manager();
    let key = manager.sealing_key("ns").await.unwrap();
    let keys = ScopedKeys::new("ns", key);
    let big = big_json(200_000);
    // One that compresses, one below the threshold, one that does not shrink.
    let noise: Vec<u8> = (0..8192u32)
        .flat_map(|i| {
            ring::digest::digest(&ring::digest::SHA256, &i.to_be_bytes()).as_ref()[..4].to_vec()
        })
        .collect();
    let original = start(vec![big.clone(), b"\"small\"".to_vec(), noise]);
    let mut extras = SealServices::new(Some(CompressionConfig::default()), None);
    let sealed = seal_message_with(
        PayloadIndex::global(),
        START,
        &original,
        &keys,
        FailureMode::Keep,
        WalkLimits::default(),
        Some(&mut extras),
    )
    .unwrap()
    .unwrap();
    assert!(!contains(&sealed, b"secret-marker"));
    let markers: Vec<_> = payloads_of(&sealed)
        .iter()
        .map(|p| p.metadata["portcullis-envelope"].clone())
        .collect();
    assert_eq!(markers, [b"v2".to_vec(), b"v1".to_vec(), b"v1".to_vec()]);
    let first = &payloads_of(&sealed)[0];
    let envelope = Envelope::decode(first.data.as_slice()).unwrap();
    assert_eq!(envelope.version, 2);
    assert_eq!(envelope.compression, 1);
    assert!(
        envelope.ciphertext.len() < big.len() / 5,
        "{}",
        envelope.ciphertext.len()
    );
    assert!(sealed.len() < original.len() / 2);
    assert_eq!(open(&manager, &sealed).await, original);

    // The recorded size is authenticated: changing it fails the open (never a short payload).
    let mut tampered = payloads_of(&sealed);
    let mut envelope = Envelope::decode(tampered[0].data.as_slice()).unwrap();
    envelope.plaintext_size -= 1;
    tampered[0].data = envelope.encode_to_vec();
    let request = StartWorkflowExecutionRequest {
        input: Some(Payloads { payloads: tampered }),
        ..StartWorkflowExecutionRequest::decode(sealed.as_slice()).unwrap()
    }
    .encode_to_vec();
    let index = PayloadIndex::global();
    let plan = plan_open(index, START, &request, OpenOptions::default()).unwrap();
    let opening = manager
        .opening_keys("ns", plan.refs().iter().cloned())
        .await
        .unwrap();
    let err = plan.open(index, START, &request, &opening).unwrap_err();
    let WalkError::Visitor(inner) = err else {
        panic!("{err}")
    };
    assert!(matches!(
        inner.downcast_ref::<CryptoError>(),
        Some(CryptoError::CannotOpen { .. })
    ));
}

#[tokio::test]
async fn offloaded_payloads_become_sealed_references_and_resolve_back() {
    let manager = manager();
    let key = manager.sealing_key("ns").await.unwrap();
    let keys = ScopedKeys::new("ns", key);
    let big = big_json(300_000);
    let original = start(vec![big.clone(), b"\"small\"".to_vec(), big.clone()]);
    let target = OffloadTarget {
        bucket: "bucket".into(),
        prefix: "p/".into(),
        min_bytes: 100_000,
    };
    let mut extras = SealServices::new(None, Some(target));
    let sealed = seal_message_with(
        PayloadIndex::global(),
        START,
        &original,
        &keys,
        FailureMode::Keep,
        WalkLimits::default(),
        Some(&mut extras),
    )
    .unwrap()
    .unwrap();
    let objects = extras.take_objects();
    assert_eq!(objects.len(), 2);
    assert!(sealed.len() < 2000, "{}", sealed.len());
    for object in &objects {
        assert!(object.key.starts_with("p/ns/"), "{}", object.key);
        assert_eq!(object.key.len(), "p/ns/".len() + 64);
        assert!(!contains(&object.bytes, b"secret-marker"));
        assert!(crate::crypto::inspect(&object.bytes).unwrap().is_some());
    }
    // Upstream sees sealed references only: no marker, no reference metadata.
    assert!(!contains(&sealed, b"secret-marker"));
    assert!(!may_hold_references(&sealed));

    // Opening gives the references; resolving gives the original.
    let opened = open(&manager, &sealed).await;
    assert!(may_hold_references(&opened));
    let index = PayloadIndex::global();
    let plan = plan_resolve(index, START, &opened, WalkLimits::default())
        .unwrap()
        .unwrap();
    assert_eq!(plan.references().len(), 2);
    let by_key: HashMap<String, Bytes> = objects
        .iter()
        .map(|o| (o.key.clone(), o.bytes.clone()))
        .collect();
    let refs: Vec<_> = objects
        .iter()
        .map(|o| crate::crypto::inspect(&o.bytes).unwrap().unwrap())
        .collect();
    let opening = manager.opening_keys("ns", refs).await.unwrap();
    let resolved = plan.apply(&opened, &by_key, &[(None, opening)]).unwrap();
    assert_eq!(resolved, original);

    // The response limit applies to the expanded answer, before anything is fetched.
    let limits = WalkLimits {
        max_payloads: 100,
        max_output: 500_000,
    };
    assert!(matches!(
        plan_resolve(index, START, &opened, limits),
        Err(WalkError::OutputTooLarge { .. })
    ));

    // A truncated object fails to open: never a short payload (digests are the store's
    // check, see tests/offload.rs).
    let refs: Vec<_> = objects
        .iter()
        .map(|o| crate::crypto::inspect(&o.bytes).unwrap().unwrap())
        .collect();
    let opening = manager.opening_keys("ns", refs).await.unwrap();
    let truncated: HashMap<String, Bytes> = objects
        .iter()
        .map(|o| (o.key.clone(), o.bytes.slice(..o.bytes.len() - 1)))
        .collect();
    assert!(plan.apply(&opened, &truncated, &[(None, opening)]).is_err());
}

#[test]
fn threshold_to_fit_takes_the_largest_payloads_first() {
    let message = start(vec![
        vec![b'a'; 3_000_000],
        vec![b'b'; 2_000_000],
        vec![b'c'; 500],
        vec![b'd'; 100_000],
    ]);
    let index = PayloadIndex::global();
    let size = |n: usize| json_payload(vec![0; n]).encoded_len();
    // Under 4 MiB it takes the 3 MB payload; under 1 MiB both large ones.
    assert_eq!(
        threshold_to_fit(index, START, &message, 4 << 20),
        Some(size(3_000_000))
    );
    assert_eq!(
        threshold_to_fit(index, START, &message, 1 << 20),
        Some(size(2_000_000))
    );
    // Below what the small payloads need: cannot fit.
    assert_eq!(threshold_to_fit(index, START, &message, 1000), None);
}
