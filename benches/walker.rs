//! The wire-level payload walker against a typed prost decode + encode, on a realistic history
//! page; sealing and opening that page against raw AES-256-GCM over the same payloads:
//! `cargo bench --bench walker -- --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;

use aes_gcm::aead::{Aead, AeadCore, AeadInPlace, KeyInit, OsRng, Payload as AeadPayload};
use aes_gcm::Aes256Gcm;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use portcullis::crypto::envelope::Nonces;
use portcullis::crypto::{
    inspect, message::ScopedKeys, plan_open, seal_message, DataKeyManager, DataKeyPolicy, Keyring,
    LocalKeyProvider, OpenOptions,
};
use portcullis::payload::walker::{
    rewrite, rewrite_named, rewrite_with, FailureMode, PayloadContext, PayloadIndex,
    PayloadVisitor, Visit, WalkError, WalkLimits, WalkOptions,
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

/// `page` with the metadata entries of its n-th payload rotated left by n mod 3.
fn as_the_server_writes_it(index: &PayloadIndex, page_type: &str, page: &[u8]) -> Vec<u8> {
    let mut n = 0usize;
    let mut rotate = |_: &PayloadContext<'_>, p: &[u8]| {
        let fields: Vec<_> = portcullis::payload::wire::fields(p)
            .collect::<Result<_, _>>()
            .expect("a sealed payload");
        let (mut metadata, rest): (Vec<_>, Vec<_>) =
            fields.into_iter().partition(|f| f.number == 1);
        let turn = n % metadata.len().max(1);
        metadata.rotate_left(turn);
        n += 1;
        Ok(Some(
            metadata
                .iter()
                .chain(&rest)
                .flat_map(|f| f.raw.to_vec())
                .collect(),
        ))
    };
    rewrite_named(index, page_type, page, &mut rotate, &WalkOptions::default())
        .expect("rotate")
        .expect("the page has payloads")
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
    let page_type = message.full_name();
    // What the proxy runs: seal_message writes every sealed payload straight into the output.
    let scoped = ScopedKeys::new(key.namespace().to_string(), key.clone());
    let seal_page = || {
        seal_message(
            index,
            page_type,
            black_box(&bytes),
            &scoped,
            FailureMode::Encode,
            WalkLimits::default(),
        )
    };
    // The previous way, for comparison in the same run: one sealed Vec per payload, copied
    // into the output afterwards, and one getrandom per nonce.
    let seal_page_vec_per_payload = || {
        let mut seal =
            |_: &PayloadContext<'_>, p: &[u8]| key.seal(p).map(Some).map_err(WalkError::visitor);
        rewrite(index, &message, black_box(&bytes), &mut seal)
    };
    // Attribution: sealing straight into the output like seal_message, but with one getrandom
    // per nonce (a fresh nonce source per payload), as before batching.
    let seal_page_nonce_per_payload = || {
        let mut visitor = NoncePerPayload(&key);
        rewrite_named(
            index,
            page_type,
            black_box(&bytes),
            &mut visitor,
            &WalkOptions::with_failures(FailureMode::Encode),
        )
    };
    let cipher = Aes256Gcm::new(&Aes256Gcm::generate_key(OsRng));
    let buffers: Vec<Vec<u8>> = sizes.iter().map(|n| vec![7u8; *n]).collect();
    // Raw AES-256-GCM as a caller would use it: a fresh random nonce and a new buffer each.
    let raw_encrypt = || {
        for buffer in &buffers {
            let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
            let _ = black_box(cipher.encrypt(&nonce, black_box(buffer.as_slice())));
        }
    };
    // The cipher alone: nonces drawn before the loop, every payload encrypted in place in one
    // reused buffer. No allocation, no syscall: the ceiling for any sealing code.
    let nonces: Vec<_> = sizes
        .iter()
        .map(|_| Aes256Gcm::generate_nonce(&mut OsRng))
        .collect();
    let scratch = std::cell::RefCell::new(vec![0u8; sizes.iter().copied().max().unwrap_or(0)]);
    let raw_encrypt_in_place = || {
        let mut scratch = scratch.borrow_mut();
        for (buffer, nonce) in buffers.iter().zip(&nonces) {
            let block = &mut scratch[..buffer.len()];
            block.copy_from_slice(buffer);
            let _ = black_box(cipher.encrypt_in_place_detached(nonce, b"", block));
        }
    };

    // Opening the sealed page as the proxy does: one walk plans the output and finds the keys;
    // they are resolved (cached after the first call); every payload is decrypted straight into
    // the output. Next to raw AES-256-GCM decryption of the same payloads, one call (and one
    // output buffer) each.
    let sealed_page = seal_page().expect("seal page").expect("page has payloads");
    // As the Temporal server returns it: protobuf-go writes a Payload's metadata map in Go's
    // map order, which varies (a page from the dev server held each envelope's three entries
    // in one of three rotations); sealing writes them in one order.
    let sealed_page = as_the_server_writes_it(index, page_type, &sealed_page);
    let open_options = OpenOptions {
        decode_failures: true,
        pass_through: false,
        limits: WalkLimits::default(),
        strict: false,
    };
    let open_page = || {
        let plan = plan_open(index, page_type, black_box(&sealed_page), open_options)?;
        let keys = runtime
            .block_on(manager.opening_keys("bench", plan.refs().iter().cloned()))
            .map_err(WalkError::visitor)?;
        plan.open(index, page_type, &sealed_page, &keys)
    };
    // The previous way: a collect walk (a full EnvelopeRef per payload), then a second walk
    // that opens each payload into its own Vec.
    let decode = WalkOptions::with_failures(FailureMode::Decode);
    let open_page_two_walks = || {
        let mut refs = Vec::new();
        let mut collect = |_: &PayloadContext<'_>, p: &[u8]| {
            if let Some(r) = inspect(p).map_err(WalkError::visitor)? {
                refs.push(r);
            }
            Ok(None)
        };
        rewrite(index, &message, black_box(&sealed_page), &mut collect)?;
        let keys = runtime
            .block_on(manager.opening_keys("bench", refs))
            .map_err(WalkError::visitor)?;
        let mut open =
            |_: &PayloadContext<'_>, p: &[u8]| keys.open_if_sealed(p).map_err(WalkError::visitor);
        rewrite_with(index, &message, &sealed_page, &mut open, &decode)
    };
    assert_eq!(
        open_page().expect("open").as_deref(),
        Some(bytes.as_slice()),
        "opening undoes sealing"
    );
    let raw_sealed: Vec<_> = buffers
        .iter()
        .zip(&nonces)
        .map(|(buffer, nonce)| cipher.encrypt(nonce, buffer.as_slice()).expect("encrypt"))
        .collect();
    let raw_decrypt = || {
        for (sealed, nonce) in raw_sealed.iter().zip(&nonces) {
            let _ = black_box(cipher.decrypt(nonce, black_box(sealed.as_slice())));
        }
    };
    // The floor for opening these envelopes: raw decryption with an envelope's associated
    // data (the format tag, namespace, kek id and data key id): GHASH covers it per payload.
    let envelope = plan_open(index, page_type, &sealed_page, open_options)
        .expect("plan")
        .refs()
        .first()
        .cloned()
        .expect("the page has a sealed payload");
    let aad = portcullis::crypto::envelope::associated_data(
        "bench",
        &envelope.kek_id,
        &envelope.data_key_id,
    );
    let raw_sealed_aad: Vec<_> = buffers
        .iter()
        .zip(&nonces)
        .map(|(buffer, nonce)| {
            let mut sealed = buffer.clone();
            let tag = cipher
                .encrypt_in_place_detached(nonce, &aad, &mut sealed)
                .expect("encrypt");
            sealed.extend_from_slice(&tag);
            sealed
        })
        .collect();
    let raw_decrypt_aad = || {
        for (sealed, nonce) in raw_sealed_aad.iter().zip(&nonces) {
            let payload = AeadPayload {
                msg: black_box(sealed.as_slice()),
                aad: &aad,
            };
            let _ = black_box(cipher.decrypt(nonce, payload));
        }
    };

    // WALKER_PROFILE_OPEN=N opens the page N times and nothing else: a loop to run under perf.
    if let Some(n) = std::env::var("WALKER_PROFILE_OPEN")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
    {
        for _ in 0..n {
            black_box(open_page().expect("open"));
        }
        return;
    }

    group.bench_function("walker_seal_page", |b| b.iter(seal_page));
    group.bench_function("walker_seal_page_vec_per_payload", |b| {
        b.iter(seal_page_vec_per_payload)
    });
    group.bench_function("walker_seal_page_nonce_per_payload", |b| {
        b.iter(seal_page_nonce_per_payload)
    });
    group.bench_function("raw_aes_gcm_same_payloads", |b| b.iter(raw_encrypt));
    group.bench_function("raw_aes_gcm_in_place_same_payloads", |b| {
        b.iter(raw_encrypt_in_place)
    });
    group.bench_function("walker_open_page", |b| b.iter(open_page));
    group.bench_function("walker_open_page_two_walks", |b| {
        b.iter(open_page_two_walks)
    });
    group.bench_function("raw_aes_gcm_decrypt_same_payloads", |b| b.iter(raw_decrypt));
    group.finish();

    // Criterion runs one bench after the other; on a shared machine the load changes in
    // between, and so would a ratio of two of its results. Here each pair runs back to back
    // (order alternating), many times, and the ratio of each pair is kept: its median is what
    // BENCHMARKS.md reports, with the 10th and 90th percentiles as the spread. The CPU-time
    // ratio leaves out the time other processes held the core. WALKER_PAIRED_ROUNDS=0 skips
    // this part; another number sets the rounds (default 60).
    if std::env::var_os("WALKER_PAIRED_ROUNDS").as_deref() != Some("0".as_ref()) {
        let rounds = std::env::var("WALKER_PAIRED_ROUNDS")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(60);
        paired(
            rounds,
            "walker_seal_page",
            &seal_page,
            "raw_aes_gcm_same_payloads",
            &raw_encrypt,
        );
        paired(
            rounds,
            "walker_seal_page",
            &seal_page,
            "raw_aes_gcm_in_place_same_payloads",
            &raw_encrypt_in_place,
        );
        paired(
            rounds,
            "walker_seal_page_nonce_per_payload",
            &seal_page_nonce_per_payload,
            "raw_aes_gcm_same_payloads",
            &raw_encrypt,
        );
        paired(
            rounds,
            "walker_seal_page_vec_per_payload",
            &seal_page_vec_per_payload,
            "raw_aes_gcm_same_payloads",
            &raw_encrypt,
        );
        paired(
            rounds,
            "walker_open_page",
            &open_page,
            "raw_aes_gcm_decrypt_same_payloads",
            &raw_decrypt,
        );
        paired(
            rounds,
            "raw_aes_gcm_decrypt_with_envelope_aad",
            &raw_decrypt_aad,
            "raw_aes_gcm_decrypt_same_payloads",
            &raw_decrypt,
        );
        paired(
            rounds,
            "walker_open_page",
            &open_page,
            "raw_aes_gcm_decrypt_with_envelope_aad",
            &raw_decrypt_aad,
        );
        paired(
            rounds,
            "walker_open_page_two_walks",
            &open_page_two_walks,
            "raw_aes_gcm_decrypt_same_payloads",
            &raw_decrypt,
        );
    }
}

/// Seals into the output like `seal_message`, drawing each nonce with its own getrandom.
struct NoncePerPayload<'k>(&'k portcullis::crypto::SealingKey);

impl PayloadVisitor for NoncePerPayload<'_> {
    fn payload(
        &mut self,
        _: &PayloadContext<'_>,
        payload: &[u8],
    ) -> Result<Option<Vec<u8>>, WalkError> {
        self.0.seal(payload).map(Some).map_err(WalkError::visitor)
    }

    fn visit(&mut self, _: &PayloadContext<'_>, payload: &[u8]) -> Result<Visit, WalkError> {
        Ok(Visit::Deferred(self.0.sealed_len(payload.len())))
    }

    fn write(&mut self, payload: &[u8], out: &mut Vec<u8>) -> Result<(), WalkError> {
        self.0
            .seal_into(payload, &mut Nonces::new(), out)
            .map_err(WalkError::visitor)
    }
}

/// CPU time of the calling thread (`CLOCK_THREAD_CPUTIME_ID`). Unlike wall time it does not
/// count the time other processes held the core. (`/proc/thread-self/schedstat` would do
/// without a dependency, but it is only brought up to date at scheduler ticks, 4 ms here.)
fn thread_cpu() -> Option<std::time::Duration> {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    let secs = u64::try_from(now.tv_sec).ok()?;
    let nanos = u32::try_from(now.tv_nsec).ok()?;
    Some(std::time::Duration::new(secs, nanos))
}

/// Times `ours` and `raw` back to back `rounds` times and prints the median throughput ratio
/// (raw time / our time: 1.0 means as fast as raw) with its 10th and 90th percentiles, by
/// this thread's CPU time and by wall time.
fn paired<A, B>(
    rounds: usize,
    ours_name: &str,
    ours: &dyn Fn() -> A,
    raw_name: &str,
    raw: &dyn Fn() -> B,
) {
    use std::time::{Duration, Instant};
    if rounds == 0 {
        return;
    }
    // (wall, cpu)
    let time = |f: &dyn Fn()| {
        let cpu = thread_cpu();
        let start = Instant::now();
        f();
        let wall = start.elapsed();
        let cpu = cpu
            .zip(thread_cpu())
            .map(|(before, after)| after.saturating_sub(before));
        (wall, cpu)
    };
    let run_ours = || {
        black_box(ours());
    };
    let run_raw = || {
        black_box(raw());
    };
    // Warm-up.
    time(&run_ours);
    time(&run_raw);
    let mut wall: Vec<(Duration, Duration)> = Vec::with_capacity(rounds);
    let mut cpu: Vec<(Duration, Duration)> = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let (o, r) = if round % 2 == 0 {
            let o = time(&run_ours);
            (o, time(&run_raw))
        } else {
            let r = time(&run_raw);
            (time(&run_ours), r)
        };
        wall.push((o.0, r.0));
        if let (Some(o), Some(r)) = (o.1, r.1) {
            cpu.push((o, r));
        }
    }
    let summary = |pairs: &[(Duration, Duration)]| -> Option<String> {
        if pairs.is_empty() {
            return None;
        }
        let mut ratios: Vec<f64> = pairs
            .iter()
            .map(|(o, r)| r.as_secs_f64() / o.as_secs_f64().max(1e-9))
            .collect();
        ratios.sort_by(f64::total_cmp);
        let at = |q: f64| ratios[((ratios.len() - 1) as f64 * q).round() as usize];
        let mut ours: Vec<Duration> = pairs.iter().map(|p| p.0).collect();
        let mut raw: Vec<Duration> = pairs.iter().map(|p| p.1).collect();
        ours.sort();
        raw.sort();
        Some(format!(
            "{:.2} of raw (p10 {:.2}, p90 {:.2}; median {:.2} ms vs {:.2} ms)",
            at(0.5),
            at(0.1),
            at(0.9),
            ours[ours.len() / 2].as_secs_f64() * 1e3,
            raw[raw.len() / 2].as_secs_f64() * 1e3,
        ))
    };
    println!(
        "paired: {ours_name} vs {raw_name} ({rounds} pairs): cpu {}; wall {}",
        summary(&cpu).unwrap_or_else(|| "n/a".into()),
        summary(&wall).unwrap_or_default(),
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
