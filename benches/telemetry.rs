//! The per-call cost of the telemetry layer (span, series lookup, counters, histograms, the
//! task-local hooks) around a pipeline that answers at once, against that pipeline alone.
//!
//! `cargo bench --bench telemetry -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue};
use portcullis::proxy::{CallFuture, CallRequest, GrpcRequest, GrpcResponse};
use portcullis::schema::Schema;
use portcullis::telemetry::{Telemetry, TelemetryLayer, UpstreamTimerLayer};
use portcullis::tls::PeerInfo;
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
    fn call(&mut self, _: GrpcRequest) -> CallFuture {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        Box::pin(std::future::ready(Ok(GrpcResponse {
            headers: HeaderMap::new(),
            message: Some(Bytes::from_static(b"\x0a\x02ok")),
            trailers,
            foreign_namespaces: Vec::new(),
        })))
    }
}

fn request() -> GrpcRequest {
    let method = Schema::global()
        .method("/temporal.api.workflowservice.v1.WorkflowService/DescribeNamespace")
        .expect("method");
    // DescribeNamespaceRequest { namespace = "payments" }
    let mut message = vec![0x0a, 8];
    message.extend_from_slice(b"payments");
    Box::new(CallRequest {
        method,
        headers: HeaderMap::new(),
        message: Bytes::from(message),
        deadline: None,
        namespace: None,
        targets: Vec::new(),
        peer: Arc::new(PeerInfo::default()),
    })
}

fn layer(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let telemetry = Telemetry::new();
    telemetry.set_namespaces(["payments"]);
    let bare = UpstreamTimerLayer.layer(Answer);
    let measured = TelemetryLayer::new(telemetry.clone()).layer(UpstreamTimerLayer.layer(Answer));
    let mut group = c.benchmark_group("telemetry_layer");
    group.bench_function("pipeline_alone", |b| {
        b.iter(|| runtime.block_on(bare.clone().oneshot(black_box(request()))))
    });
    group.bench_function("with_telemetry_layer", |b| {
        b.iter(|| runtime.block_on(measured.clone().oneshot(black_box(request()))))
    });
    // As the binary runs by default: a fmt subscriber at `info`, so the call span is created
    // (its fields formatted) on every call; output goes nowhere.
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(std::io::sink)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        group.bench_function("with_telemetry_layer_and_info_logging", |b| {
            b.iter(|| runtime.block_on(measured.clone().oneshot(black_box(request()))))
        });
    });
    group.bench_function("scrape_encode", |b| {
        b.iter(|| black_box(telemetry.encode()))
    });
    group.finish();
}

criterion_group!(benches, layer);
criterion_main!(benches);
