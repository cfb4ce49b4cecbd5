//! The wire-level payload walker against a typed prost decode + encode, on a realistic history
//! page: `cargo bench --bench walker -- --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;

use aes_gcm::aead::{Aead, AeadCore, AeadInPlace, KeyInit, OsRng};
use aes_gcm::Aes256Gcm;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use portcullis::crypto::{inspect, DataKeyManager, DataKeyPolicy, Keyring, LocalKeyProvider};
use portcullis::payload::walker::{
    rewrite, rewrite_with, FailureMode, PayloadContext, PayloadIndex, WalkError, WalkOptions,
};
use portcullis::schema::Schema;
use prost::Message as _;
use temporalio_protos::protos::temporal::api::{
    common::v1::{ActivityType, Header, Payload, Payloads},
    history::v1::{self as history, history_event::Attributes, History, HistoryEvent},
    workflowservice::v1::GetWorkflowExecutionHistoryResponse,
};

const ROUNDS: i64 = 1000;
const PAYLOAD_SIZE: usize = 1024;

fn payload(seed: i64) -> Payload {
    Payload {
        metadata: [("encoding".to_string(), b"json/plain".to_vec())].into(),
        data: (0..PAYLOAD_SIZE).map(|i| (i as i64 + seed) as u8).collect(),
        ..Default::default()
    }
}

fn payloads(seed: i64) -> Option<Payloads> {
    Some(Payloads {
        payloads: vec![payload(seed)],
    })
}

/// Activities (scheduled, started, completed), signals, markers and timers.
fn history_page() -> GetWorkflowExecutionHistoryResponse {
    let mut events = Vec::new();
    let mut push = |attributes: Attributes| {
        let id = events.len() as i64 + 1;
        events.push(HistoryEvent {
            event_id: id,
            event_type: 1,
            task_id: id * 7,
            event_time: Some(prost_wkt_types::Timestamp {
                seconds: 1_700_000_000 + id,
                nanos: 0,
            }),
            attributes: Some(attributes),
            ..Default::default()
        });
    };
    for round in 0..ROUNDS {
        push(Attributes::ActivityTaskScheduledEventAttributes(
            history::ActivityTaskScheduledEventAttributes {
                activity_id: round.to_string(),
                activity_type: Some(ActivityType {
                    name: "charge_card".into(),
                }),
                input: payloads(round),
                header: Some(Header {
                    fields: [("tracing".to_string(), payload(round + 1))].into(),
                }),
                workflow_task_completed_event_id: round,
                ..Default::default()
            },
        ));
        push(Attributes::ActivityTaskStartedEventAttributes(
            history::ActivityTaskStartedEventAttributes {
                scheduled_event_id: round,
                identity: "worker-1@host".into(),
                request_id: "5c1b6c9e-7d3f-4a0e-9b1e-1f2d3c4b5a69".into(),
                attempt: 1,
                ..Default::default()
            },
        ));
        push(Attributes::ActivityTaskCompletedEventAttributes(
            history::ActivityTaskCompletedEventAttributes {
                result: payloads(round + 2),
                scheduled_event_id: round,
                started_event_id: round + 1,
                identity: "worker-1@host".into(),
                ..Default::default()
            },
        ));
        if round % 4 == 0 {
            push(Attributes::WorkflowExecutionSignaledEventAttributes(
                history::WorkflowExecutionSignaledEventAttributes {
                    signal_name: "approve".into(),
                    input: payloads(round + 3),
                    identity: "cli".into(),
                    ..Default::default()
                },
            ));
        }
        if round % 5 == 0 {
            push(Attributes::MarkerRecordedEventAttributes(
                history::MarkerRecordedEventAttributes {
                    marker_name: "SideEffect".into(),
                    details: [("data".to_string(), payloads(round + 4).unwrap_or_default())].into(),
                    workflow_task_completed_event_id: round,
                    ..Default::default()
                },
            ));
        }
        if round % 3 == 0 {
            push(Attributes::TimerStartedEventAttributes(
                history::TimerStartedEventAttributes {
                    timer_id: round.to_string(),
                    start_to_fire_timeout: Some(prost_wkt_types::Duration {
                        seconds: 30,
                        nanos: 0,
                    }),
                    workflow_task_completed_event_id: round,
                },
            ));
            push(Attributes::TimerFiredEventAttributes(
                history::TimerFiredEventAttributes {
                    timer_id: round.to_string(),
                    started_event_id: round,
                },
            ));
        }
    }
    GetWorkflowExecutionHistoryResponse {
        history: Some(History { events }),
        next_page_token: b"page-2".to_vec(),
        ..Default::default()
    }
}

/// Same size, different bytes: what sealing with a fixed overhead looks like to the walker.
fn replace_same_size(_: &PayloadContext<'_>, p: &[u8]) -> Result<Option<Vec<u8>>, WalkError> {
    let mut out = p.to_vec();
    if let Some(last) = out.last_mut() {
        *last ^= 0x5a;
    }
    Ok(Some(out))
}

fn replace_typed(p: &mut Payload) {
    if let Some(last) = p.data.last_mut() {
        *last ^= 0x5a;
    }
}

fn replace_all_typed(p: &mut Option<Payloads>) {
    for p in p.iter_mut().flat_map(|p| p.payloads.iter_mut()) {
        replace_typed(p);
    }
}

/// The typed path: decode, replace every payload in the structs, encode.
fn typed_rewrite(bytes: &[u8]) -> Vec<u8> {
    let Ok(mut response) = GetWorkflowExecutionHistoryResponse::decode(bytes) else {
        return Vec::new();
    };
    for event in response
        .history
        .iter_mut()
        .flat_map(|h| h.events.iter_mut())
    {
        match event.attributes.as_mut() {
            Some(Attributes::ActivityTaskScheduledEventAttributes(a)) => {
                replace_all_typed(&mut a.input);
                for p in a.header.iter_mut().flat_map(|h| h.fields.values_mut()) {
                    replace_typed(p);
                }
            }
            Some(Attributes::ActivityTaskCompletedEventAttributes(a)) => {
                replace_all_typed(&mut a.result)
            }
            Some(Attributes::WorkflowExecutionSignaledEventAttributes(a)) => {
                replace_all_typed(&mut a.input)
            }
            Some(Attributes::MarkerRecordedEventAttributes(a)) => {
                for p in a.details.values_mut().flat_map(|p| p.payloads.iter_mut()) {
                    replace_typed(p);
                }
            }
            _ => {}
        }
    }
    response.encode_to_vec()
}

fn bench(c: &mut Criterion) {
    let bytes = history_page().encode_to_vec();
    let index = PayloadIndex::global();
    let message = Schema::global()
        .message("temporal.api.workflowservice.v1.GetWorkflowExecutionHistoryResponse")
        .expect("schema has GetWorkflowExecutionHistoryResponse");
    let walked = rewrite(index, &message, &bytes, &mut replace_same_size)
        .ok()
        .flatten()
        .unwrap_or_default();
    // Both paths must produce the same message.
    assert_eq!(
        GetWorkflowExecutionHistoryResponse::decode(walked.as_slice()).ok(),
        GetWorkflowExecutionHistoryResponse::decode(typed_rewrite(&bytes).as_slice()).ok()
    );
    eprintln!(
        "history page: {} bytes, {} events",
        bytes.len(),
        history_page().history.map_or(0, |h| h.events.len())
    );

    let mut group = c.benchmark_group("history_page");
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function("walker_rewrite", |b| {
        b.iter(|| rewrite(index, &message, black_box(&bytes), &mut replace_same_size))
    });
    group.bench_function("walker_collect", |b| {
        b.iter(|| {
            let mut n = 0usize;
            let mut count = |_: &PayloadContext<'_>, _: &[u8]| {
                n += 1;
                Ok(None)
            };
            let _ = rewrite(index, &message, black_box(&bytes), &mut count);
            n
        })
    });
    group.bench_function("prost_decode_encode", |b| {
        b.iter(|| typed_rewrite(black_box(&bytes)))
    });

    // The real thing: seal every payload of the page (walker + envelope + AES-256-GCM), next to
    // raw AES-256-GCM over the same payload bytes, one buffer per payload.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let manager = DataKeyManager::new(
        std::sync::Arc::new(LocalKeyProvider::new(&Keyring::generate())),
        DataKeyPolicy::default(),
    )
    .expect("manager");
    let key = runtime
        .block_on(manager.sealing_key("bench"))
        .expect("sealing key");
    let mut sizes = Vec::new();
    let mut collect = |_: &PayloadContext<'_>, p: &[u8]| {
        sizes.push(p.len());
        Ok(None)
    };
    let _ = rewrite(index, &message, &bytes, &mut collect);
    let payload_bytes: usize = sizes.iter().sum();
    eprintln!(
        "history page: {} payloads, {payload_bytes} payload bytes",
        sizes.len()
    );
    group.bench_function("walker_seal_page", |b| {
        b.iter(|| {
            let mut seal = |_: &PayloadContext<'_>, p: &[u8]| {
                key.seal(p).map(Some).map_err(WalkError::visitor)
            };
            rewrite(index, &message, black_box(&bytes), &mut seal)
        })
    });
    let cipher = Aes256Gcm::new(&Aes256Gcm::generate_key(OsRng));
    let buffers: Vec<Vec<u8>> = sizes.iter().map(|n| vec![7u8; *n]).collect();
    group.bench_function("raw_aes_gcm_same_payloads", |b| {
        b.iter(|| {
            for buffer in &buffers {
                let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
                let _ = black_box(cipher.encrypt(&nonce, buffer.as_slice()));
            }
        })
    });
    // The cipher alone: nonces drawn before the loop, every payload encrypted in place in one
    // reused buffer. No allocation, no syscall: the ceiling for any sealing code.
    let nonces: Vec<_> = sizes
        .iter()
        .map(|_| Aes256Gcm::generate_nonce(&mut OsRng))
        .collect();
    let mut scratch = vec![0u8; sizes.iter().copied().max().unwrap_or(0)];
    group.bench_function("raw_aes_gcm_in_place_same_payloads", |b| {
        b.iter(|| {
            for (buffer, nonce) in buffers.iter().zip(&nonces) {
                let block = &mut scratch[..buffer.len()];
                block.copy_from_slice(buffer);
                let _ = black_box(cipher.encrypt_in_place_detached(nonce, b"", block));
            }
        })
    });

    // Opening the sealed page as the proxy does: collect the key references, resolve them
    // (cached after the first call), open every payload. Next to raw AES-256-GCM decryption of
    // the same payloads, one call (and one output buffer) each.
    let sealed_page = {
        let mut seal =
            |_: &PayloadContext<'_>, p: &[u8]| key.seal(p).map(Some).map_err(WalkError::visitor);
        rewrite(index, &message, &bytes, &mut seal)
            .expect("seal page")
            .expect("page has payloads")
    };
    let decode = WalkOptions::with_failures(FailureMode::Decode);
    group.bench_function("walker_open_page", |b| {
        b.iter(|| {
            let mut refs = Vec::new();
            let mut collect = |_: &PayloadContext<'_>, p: &[u8]| {
                if let Some(r) = inspect(p).map_err(WalkError::visitor)? {
                    refs.push(r);
                }
                Ok(None)
            };
            rewrite(index, &message, black_box(&sealed_page), &mut collect).expect("collect");
            let keys = runtime
                .block_on(manager.opening_keys("bench", refs))
                .expect("opening keys");
            let mut open = |_: &PayloadContext<'_>, p: &[u8]| {
                keys.open_if_sealed(p).map_err(WalkError::visitor)
            };
            rewrite_with(index, &message, &sealed_page, &mut open, &decode)
        })
    });
    let raw_sealed: Vec<_> = buffers
        .iter()
        .zip(&nonces)
        .map(|(buffer, nonce)| cipher.encrypt(nonce, buffer.as_slice()).expect("encrypt"))
        .collect();
    group.bench_function("raw_aes_gcm_decrypt_same_payloads", |b| {
        b.iter(|| {
            for (sealed, nonce) in raw_sealed.iter().zip(&nonces) {
                let _ = black_box(cipher.decrypt(nonce, sealed.as_slice()));
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
