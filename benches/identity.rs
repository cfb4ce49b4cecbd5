//! The per-call cost of identity stamping: the identity stage (verified identity from the
//! certificate's names, per-namespace mode, the `portcullis-identity` header, the wire-level
//! rewrite of the request's identity fields) against the same call with `identity = "keep"`
//! (header only) and with no stage at all.
//!
//! `cargo bench --bench identity -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue};
use portcullis::authz::IdentitySource;
use portcullis::identity::{stamp_identities, stamped, IdentityFieldIndex, IdentityMode};
use portcullis::proxy::{
    CallFuture, CallRequest, GrpcRequest, GrpcResponse, IdentityLayer, IdentityModes,
    IdentitySources, IdentityStore,
};
use portcullis::schema::Schema;
use portcullis::tls::{CertificateNames, PeerInfo};
use prost::Message;
use temporalio_protos::temporal::api::common::v1::{Payload, Payloads, WorkflowType};
use temporalio_protos::temporal::api::taskqueue::v1::TaskQueue;
use temporalio_protos::temporal::api::workflowservice::v1::{
    PollWorkflowTaskQueueRequest, StartWorkflowExecutionRequest,
};
use tower::{Layer, Service, ServiceExt};

#[derive(Clone)]
struct Answer;

impl Service<GrpcRequest> for Answer {
    type Response = GrpcResponse;
    type Error = portcullis::error::ProxyError;
    type Future = CallFuture;
    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, request: GrpcRequest) -> CallFuture {
        black_box(&request.message);
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        Box::pin(std::future::ready(Ok(GrpcResponse {
            trailers,
            ..Default::default()
        })))
    }
}

const START: &str = "/temporal.api.workflowservice.v1.WorkflowService/StartWorkflowExecution";
const POLL: &str = "/temporal.api.workflowservice.v1.WorkflowService/PollWorkflowTaskQueue";

fn start_message() -> Vec<u8> {
    StartWorkflowExecutionRequest {
        namespace: "default".into(),
        workflow_id: "wf-1234567890".into(),
        workflow_type: Some(WorkflowType {
            name: "LoadWorkflow".into(),
        }),
        task_queue: Some(TaskQueue {
            name: "loadgen".into(),
            ..Default::default()
        }),
        input: Some(Payloads {
            payloads: vec![Payload {
                metadata: [("encoding".to_string(), b"json/plain".to_vec())].into(),
                data: vec![b'x'; 256],
                ..Default::default()
            }],
        }),
        identity: "12345@worker-host".into(),
        request_id: "5f0c6a52-8c55-4f27-9d5b-3f0a2c1b9e77".into(),
        ..Default::default()
    }
    .encode_to_vec()
}

fn poll_message() -> Vec<u8> {
    PollWorkflowTaskQueueRequest {
        namespace: "default".into(),
        task_queue: Some(TaskQueue {
            name: "loadgen".into(),
            ..Default::default()
        }),
        identity: "12345@worker-host".into(),
        ..Default::default()
    }
    .encode_to_vec()
}

fn request(path: &str, message: &Bytes, peer: &Arc<PeerInfo>) -> GrpcRequest {
    Box::new(CallRequest {
        method: Schema::global().method(path).expect("method"),
        headers: HeaderMap::new(),
        message: message.clone(),
        deadline: None,
        namespace: Some("default".into()),
        targets: Vec::new(),
        peer: peer.clone(),
    })
}

fn rewrite(c: &mut Criterion) {
    let start = start_message();
    let index = IdentityFieldIndex::global();
    let mut group = c.benchmark_group("identity_rewrite");
    group.bench_function("start_workflow_append", |b| {
        b.iter(|| {
            let mut f = |client: &str| {
                stamped(
                    IdentityMode::Append,
                    client,
                    "spiffe://corp.example/ns/default/worker",
                )
                .unwrap_or_default()
            };
            stamp_identities(
                index,
                "temporal.api.workflowservice.v1.StartWorkflowExecutionRequest",
                black_box(&start),
                &mut f,
            )
        })
    });
    group.finish();
}

fn stage(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let peer = Arc::new(PeerInfo {
        has_certificate: true,
        names: CertificateNames {
            spiffe: vec!["spiffe://corp.example/ns/default/worker".into()],
            ..Default::default()
        },
        ..PeerInfo::default()
    });
    let sources = IdentitySources::Fixed(Arc::from(vec![IdentitySource::Spiffe]));
    let modes = |mode: &str| {
        let config = portcullis::config::Config::from_toml(&format!(
            r#"
            [listener]
            address = "127.0.0.1:0"
            plaintext = true
            [upstreams.u]
            address = "127.0.0.1:7233"
            [routing]
            system_upstream = "u"
            [[namespaces]]
            name = "default"
            upstream = "u"
            identity = "{mode}"
            [authorization]
            disabled = true
            [encryption]
            disabled = true
            "#
        ))
        .expect("config");
        IdentityStore::new(IdentityModes::from_config(&config))
    };
    let bare = Answer;
    let append = IdentityLayer::new(modes("append"), sources.clone()).layer(Answer);
    let keep = IdentityLayer::new(modes("keep"), sources).layer(Answer);
    for (name, path, message) in [
        ("start_workflow", START, Bytes::from(start_message())),
        ("poll_workflow_task", POLL, Bytes::from(poll_message())),
    ] {
        let mut group = c.benchmark_group(format!("identity_stage/{name}"));
        group.bench_function("no_stage", |b| {
            b.iter(|| {
                runtime.block_on(
                    bare.clone()
                        .oneshot(black_box(request(path, &message, &peer))),
                )
            })
        });
        group.bench_function("keep_header_only", |b| {
            b.iter(|| {
                runtime.block_on(
                    keep.clone()
                        .oneshot(black_box(request(path, &message, &peer))),
                )
            })
        });
        group.bench_function("append", |b| {
            b.iter(|| {
                runtime.block_on(
                    append
                        .clone()
                        .oneshot(black_box(request(path, &message, &peer))),
                )
            })
        });
        group.finish();
    }
}

criterion_group!(benches, rewrite, stage);
criterion_main!(benches);
