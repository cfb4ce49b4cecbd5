//! What compression and offload add to sealing, per payload size, in one run: a
//! StartWorkflowExecutionRequest with one payload sealed plainly, compressed then sealed, and
//! offloaded (sealed object, its SHA-256, a sealed reference in its place); and the way back:
//! opening, opening a compressed envelope, and checking and opening an offloaded object. The
//! object store's own round trip is not in here (it is the network's; see BENCHMARKS.md for
//! the end-to-end figures). Also prints the compression ratio of realistic JSON.
//!
//! `cargo bench --bench payload_services -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use portcullis::crypto::envelope::Nonces;
use portcullis::crypto::message::{seal_message_with, ScopedKeys, SealExtras};
use portcullis::crypto::{
    envelope_info, seal_message, CompressionConfig, DataKeyManager, DataKeyPolicy, Keyring,
    LocalKeyProvider,
};
use portcullis::offload::reference::sha256;
use portcullis::offload::seal::OffloadTarget;
use portcullis::offload::SealServices;
use portcullis::payload::walker::{FailureMode, PayloadIndex, WalkLimits};
use prost::Message as _;
use temporalio_protos::protos::temporal::api::common::v1::{Payload, Payloads, WorkflowType};
use temporalio_protos::protos::temporal::api::workflowservice::v1::StartWorkflowExecutionRequest;

const REQUEST: &str = "temporal.api.workflowservice.v1.StartWorkflowExecutionRequest";
const SIZES: [(&str, usize); 5] = [
    ("1KiB", 1024),
    ("64KiB", 64 * 1024),
    ("256KiB", 256 * 1024),
    ("1MiB", 1024 * 1024),
    ("10MiB", 10 * 1024 * 1024),
];

/// Order records as a service would pass them: repeated keys, ids, names, amounts, timestamps.
pub fn realistic_json(size: usize) -> Vec<u8> {
    const NAMES: [&str; 8] = [
        "Ada Lovelace",
        "Grace Hopper",
        "Alan Turing",
        "Barbara Liskov",
        "Edsger Dijkstra",
        "Frances Allen",
        "Donald Knuth",
        "Margaret Hamilton",
    ];
    const STATES: [&str; 4] = ["pending", "paid", "shipped", "delivered"];
    let mut out = String::from("[");
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut i = 0u64;
    while out.len() < size {
        let r = next();
        let (items, cents) = (r % 7 + 1, (r >> 8) % 100_000);
        out.push_str(&format!(
            "{}{{\"order_id\":\"ord-{:016x}\",\"customer\":{{\"name\":\"{}\",\"email\":\"c{}@example.com\"}},\
             \"status\":\"{}\",\"items\":{},\"total\":{{\"amount\":{}.{:02},\"currency\":\"EUR\"}},\
             \"created_at\":\"2026-11-{:02}T{:02}:{:02}:{:02}Z\"}}",
            if i == 0 { "" } else { "," },
            next(),
            NAMES[(r % 8) as usize],
            r % 100_000,
            STATES[((r >> 4) % 4) as usize],
            items,
            cents / 100,
            cents % 100,
            r % 28 + 1,
            (r >> 12) % 24,
            (r >> 16) % 60,
            (r >> 20) % 60,
        ));
        i += 1;
    }
    out.push(']');
    out.into_bytes()
}

fn request(data: Vec<u8>) -> Vec<u8> {
    StartWorkflowExecutionRequest {
        namespace: "bench".into(),
        workflow_id: "order-123".into(),
        workflow_type: Some(WorkflowType {
            name: "ProcessOrders".into(),
        }),
        input: Some(Payloads {
            payloads: vec![Payload {
                metadata: [("encoding".to_string(), b"json/plain".to_vec())].into(),
                data,
                ..Default::default()
            }],
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

fn limits() -> WalkLimits {
    WalkLimits::default()
}

fn payload_services(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let provider = Arc::new(LocalKeyProvider::new(&Keyring::generate()));
    let manager = DataKeyManager::new(provider, DataKeyPolicy::default()).expect("policy");
    let key = runtime
        .block_on(manager.sealing_key("bench"))
        .expect("sealing key");
    let keys = ScopedKeys::new("bench", key.clone());
    let index = PayloadIndex::global();
    let compression = CompressionConfig::default();
    let offload = OffloadTarget {
        bucket: "bench".into(),
        prefix: "portcullis/".into(),
        min_bytes: 1024,
    };

    for (label, size) in SIZES {
        let json = realistic_json(size);
        let payload = Payload {
            metadata: [("encoding".to_string(), b"json/plain".to_vec())].into(),
            data: json.clone(),
            ..Default::default()
        }
        .encode_to_vec();
        let compressed = compression.compress(&payload).expect("JSON compresses");
        println!(
            "{label}: realistic JSON payload {} bytes, zstd level {} {} bytes ({:.1}x)",
            payload.len(),
            compression.level,
            compressed.len(),
            payload.len() as f64 / compressed.len() as f64
        );
        let message = request(json);
        let sealed = key.seal(&payload).expect("seal");
        let sealed_compressed = key
            .seal_compressed(&compressed, payload.len(), &mut Nonces::new())
            .expect("seal compressed");
        let digest = sha256(&sealed);
        let opening = runtime
            .block_on(manager.opening_keys("bench", envelope_info(&sealed)))
            .expect("opening keys");

        let mut group = c.benchmark_group(format!("payload_services/{label}"));
        group.throughput(Throughput::Bytes(payload.len() as u64));
        group.sample_size(if size >= 1024 * 1024 { 10 } else { 30 });
        group.bench_function("seal", |b| {
            b.iter(|| {
                seal_message(
                    index,
                    REQUEST,
                    black_box(&message),
                    &keys,
                    FailureMode::Keep,
                    limits(),
                )
                .expect("seal")
            })
        });
        group.bench_function("compress_seal", |b| {
            b.iter(|| {
                let mut services = SealServices::new(Some(compression), None);
                let extras: &mut dyn SealExtras = &mut services;
                seal_message_with(
                    index,
                    REQUEST,
                    black_box(&message),
                    &keys,
                    FailureMode::Keep,
                    limits(),
                    Some(extras),
                )
                .expect("seal")
            })
        });
        group.bench_function("offload_seal", |b| {
            b.iter(|| {
                let mut services = SealServices::new(None, Some(offload.clone()));
                let sealed = {
                    let extras: &mut dyn SealExtras = &mut services;
                    seal_message_with(
                        index,
                        REQUEST,
                        black_box(&message),
                        &keys,
                        FailureMode::Keep,
                        limits(),
                        Some(extras),
                    )
                    .expect("seal")
                };
                (sealed, services.take_objects())
            })
        });
        group.bench_function("open", |b| {
            b.iter(|| opening.open(black_box(&sealed)).expect("open"))
        });
        group.bench_function("open_compressed", |b| {
            b.iter(|| opening.open(black_box(&sealed_compressed)).expect("open"))
        });
        // What resolving adds besides the fetch: the digest check, then opening.
        group.bench_function("open_offloaded", |b| {
            b.iter(|| {
                assert_eq!(sha256(black_box(&sealed)), digest);
                opening.open(&sealed).expect("open")
            })
        });
        group.finish();
    }
}

criterion_group!(benches, payload_services);
criterion_main!(benches);
