//! Seal and open throughput next to raw AES-256-GCM on the same sizes, in the same run.
//!
//! `cargo bench --bench crypto -- --warm-up-time 1 --measurement-time 2`

use std::hint::black_box;
use std::sync::Arc;

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng};
use aes_gcm::Aes256Gcm;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use portcullis::crypto::{envelope_info, DataKeyManager, DataKeyPolicy, Keyring, LocalKeyProvider};
use prost::Message;
use temporalio_protos::temporal::api::common::v1::Payload;

const SIZES: [(&str, usize); 4] = [
    ("64B", 64),
    ("1KiB", 1024),
    ("64KiB", 64 * 1024),
    ("2MiB", 2 * 1024 * 1024),
];

fn payload(size: usize) -> Vec<u8> {
    let mut payload = Payload::default();
    payload
        .metadata
        .insert("encoding".into(), b"json/plain".to_vec());
    // Not all zeroes, so nothing downstream can take a shortcut.
    payload.data = (0..size).map(|i| (i * 31 % 251) as u8).collect();
    payload.encode_to_vec()
}

fn crypto(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let provider = Arc::new(LocalKeyProvider::new(&Keyring::generate()));
    let manager = DataKeyManager::new(provider, DataKeyPolicy::default()).expect("policy");
    let key = runtime
        .block_on(manager.sealing_key("bench"))
        .expect("sealing key");
    let raw = Aes256Gcm::new(&Aes256Gcm::generate_key(OsRng));

    for (label, size) in SIZES {
        let plain = payload(size);
        let sealed = key.seal(&plain).expect("seal");
        let keys = runtime
            .block_on(manager.opening_keys("bench", envelope_info(&sealed)))
            .expect("opening keys");
        let raw_nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let raw_sealed = raw.encrypt(&raw_nonce, plain.as_slice()).expect("encrypt");

        let mut group = c.benchmark_group(label);
        group.throughput(Throughput::Bytes(plain.len() as u64));
        if size >= 64 * 1024 {
            group.sample_size(20);
        }
        // Raw: a fresh random nonce and a new output buffer per call, as seal does.
        group.bench_function("raw_aes_gcm_encrypt", |b| {
            b.iter(|| {
                let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
                raw.encrypt(&nonce, black_box(plain.as_slice()))
                    .expect("encrypt")
            })
        });
        group.bench_function("seal", |b| {
            b.iter(|| key.seal(black_box(&plain)).expect("seal"))
        });
        group.bench_function("raw_aes_gcm_decrypt", |b| {
            b.iter(|| {
                raw.decrypt(&raw_nonce, black_box(raw_sealed.as_slice()))
                    .expect("decrypt")
            })
        });
        group.bench_function("open", |b| {
            b.iter(|| keys.open(black_box(&sealed)).expect("open"))
        });
        group.finish();
    }
}

criterion_group!(benches, crypto);
criterion_main!(benches);
