//! The per-call layer: one tracing span per call (namespace, method, identity, peer; debug
//! level), the outcome logged once (failures at info with the same fields), and the call's
//! metrics recorded; plus the hooks inner stages use to
//! report what only they know, and the local answer to `grpc.health.v1.Health/Check`.
//!
//! Inner stages report through a task-local slot rather than through the request type, so no
//! stage's signature changes: [`record_authz_decision`] (authorization) and the
//! [`UpstreamTimerLayer`] around the forwarder. Outside a call (unit tests driving one stage)
//! the hooks do nothing.

use std::cell::{Cell, RefCell};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use tower::{Layer, Service, ServiceExt};
use tracing::field::Empty;
use tracing::Instrument as _;

use super::{code_name, CallSeries, Telemetry};
use crate::error::ProxyError;
use crate::payload::wire;
use crate::proxy::{CallFuture, GrpcRequest, GrpcResponse};
use crate::schema::Scope;

#[derive(Default)]
struct CallScope {
    authz: Cell<Option<bool>>,
    upstream: Cell<Option<Duration>>,
    /// The caller's identity, kept for the failure log line when the call span is off.
    identity: RefCell<Option<String>>,
    span_enabled: bool,
}

tokio::task_local! {
    static CALL: CallScope;
}

/// Called by the authorization stage with the caller's identity and its decision.
pub fn record_authz(identity: &str, allowed: bool) {
    let _ = CALL.try_with(|call| {
        call.authz.set(Some(allowed));
        if call.span_enabled {
            tracing::Span::current().record("identity", identity);
        } else {
            *call.identity.borrow_mut() = Some(identity.to_owned());
        }
    });
}

fn record_upstream_time(elapsed: Duration) {
    let _ = CALL.try_with(|call| call.upstream.set(Some(elapsed)));
}

/// The gRPC status code of an upstream answer: `grpc-status` from the trailers, or from the
/// headers of a trailers-only answer.
fn response_code(response: &GrpcResponse) -> usize {
    response
        .trailers
        .get("grpc-status")
        .or_else(|| response.headers.get("grpc-status"))
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|code| *code <= 16)
        .unwrap_or(2)
}

#[derive(Clone)]
pub struct TelemetryLayer {
    telemetry: Arc<Telemetry>,
}

impl TelemetryLayer {
    pub fn new(telemetry: Arc<Telemetry>) -> Self {
        TelemetryLayer { telemetry }
    }
}

impl<S> Layer<S> for TelemetryLayer {
    type Service = TelemetryService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        TelemetryService {
            inner,
            telemetry: self.telemetry.clone(),
        }
    }
}

#[derive(Clone)]
pub struct TelemetryService<S> {
    inner: S,
    telemetry: Arc<Telemetry>,
}

/// Counts a call as in flight while it lives; a call dropped before it finished (the caller
/// went away) is recorded as CANCELLED.
struct InFlight {
    telemetry: Arc<Telemetry>,
    series: Arc<CallSeries>,
    started: Instant,
    finished: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.telemetry.in_flight.fetch_sub(1, Ordering::Relaxed);
        if !self.finished {
            self.series.codes[1].fetch_add(1, Ordering::Relaxed);
            self.series.duration.observe(self.started.elapsed());
            tracing::debug!(
                code = "CANCELLED",
                total_us = self.started.elapsed().as_micros() as u64,
                "call cancelled by the caller"
            );
        }
    }
}

impl<S> Service<GrpcRequest> for TelemetryService<S>
where
    S: Service<GrpcRequest, Response = GrpcResponse, Error = ProxyError, Future = CallFuture>
        + Clone
        + Send
        + 'static,
{
    type Response = GrpcResponse;
    type Error = ProxyError;
    type Future = CallFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: GrpcRequest) -> CallFuture {
        let started = Instant::now();
        let method = request.method;
        // The namespace stage validates the message; here a malformed one just has no namespace.
        let namespace = match method.scope {
            Scope::Namespace => {
                wire::validate_and_find_string(&request.message, method.namespace_field)
                    .ok()
                    .flatten()
            }
            Scope::Cluster => None,
        };
        let label = self.telemetry.namespace_label(method, namespace);
        let series = self.telemetry.series(label, method);
        // A debug span: at the default `info` level it costs nothing (creating one with the fmt
        // subscriber costs a few µs per call), and the rare failure line carries its fields.
        let span = tracing::debug_span!(
            "call",
            method = method.name.as_str(),
            namespace = namespace.unwrap_or_default(),
            identity = Empty,
            peer = request.peer.remote.as_str(),
        );
        series
            .received_bytes
            .fetch_add(request.message.len() as u64, Ordering::Relaxed);
        self.telemetry.in_flight.fetch_add(1, Ordering::Relaxed);
        let mut guard = InFlight {
            telemetry: self.telemetry.clone(),
            series,
            started,
            finished: false,
        };
        let inner = self.inner.clone();
        let telemetry = self.telemetry.clone();
        let (message, peer) = (request.message.clone(), request.peer.clone());
        let span_enabled = !span.is_disabled();
        Box::pin(
            async move {
                let (result, authz, upstream, identity) = CALL
                    .scope(
                        CallScope {
                            span_enabled,
                            ..CallScope::default()
                        },
                        async move {
                            let result = inner.oneshot(request).await;
                            let (authz, upstream, identity) = CALL.with(|call| {
                                (call.authz.get(), call.upstream.get(), call.identity.take())
                            });
                            (result, authz, upstream, identity)
                        },
                    )
                    .await;
                guard.finished = true;
                let series = &guard.series;
                let total = started.elapsed();
                series.duration.observe(total);
                let upstream_us = upstream.map(|elapsed| {
                    series.upstream.observe(elapsed);
                    elapsed.as_micros() as u64
                });
                if let Some(allowed) = authz {
                    series.authz[usize::from(!allowed)].fetch_add(1, Ordering::Relaxed);
                }
                let total_us = total.as_micros() as u64;
                match &result {
                    Ok(response) => {
                        let code = response_code(response);
                        series.codes[code].fetch_add(1, Ordering::Relaxed);
                        let sent = response.message.as_ref().map_or(0, Bytes::len);
                        series.sent_bytes.fetch_add(sent as u64, Ordering::Relaxed);
                        tracing::debug!(
                            code = code_name(code),
                            total_us,
                            upstream_us,
                            "call finished"
                        );
                    }
                    Err(error) => {
                        let code = error.code() as usize;
                        if let Some(slot) = series.codes.get(code) {
                            slot.fetch_add(1, Ordering::Relaxed);
                        }
                        if let ProxyError::UpstreamUnavailable { upstream, .. } = error {
                            telemetry.upstream_failed(upstream);
                        }
                        if span_enabled {
                            tracing::info!(
                                code = code_name(code),
                                total_us,
                                upstream_us,
                                error = %error,
                                "call failed in proxy"
                            );
                        } else {
                            let namespace = match method.scope {
                                Scope::Namespace => {
                                    wire::validate_and_find_string(&message, method.namespace_field)
                                        .ok()
                                        .flatten()
                                }
                                Scope::Cluster => None,
                            };
                            tracing::info!(
                                method = method.name.as_str(),
                                namespace = namespace.unwrap_or_default(),
                                identity = identity.as_deref().unwrap_or_default(),
                                peer = peer.remote.as_str(),
                                code = code_name(code),
                                total_us,
                                upstream_us,
                                error = %error,
                                "call failed in proxy"
                            );
                        }
                    }
                }
                result
            }
            .instrument(span),
        )
    }
}

/// Times the innermost stage (the upstream call) for the call's metrics and log line.
#[derive(Debug, Clone, Copy, Default)]
pub struct UpstreamTimerLayer;

impl<S> Layer<S> for UpstreamTimerLayer {
    type Service = UpstreamTimer<S>;
    fn layer(&self, inner: S) -> Self::Service {
        UpstreamTimer { inner }
    }
}

#[derive(Debug, Clone)]
pub struct UpstreamTimer<S> {
    inner: S,
}

impl<S> Service<GrpcRequest> for UpstreamTimer<S>
where
    S: Service<GrpcRequest, Response = GrpcResponse, Error = ProxyError, Future = CallFuture>,
{
    type Response = GrpcResponse;
    type Error = ProxyError;
    type Future = CallFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: GrpcRequest) -> CallFuture {
        let started = Instant::now();
        let call = self.inner.call(request);
        Box::pin(async move {
            let result = call.await;
            record_upstream_time(started.elapsed());
            result
        })
    }
}

pub const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

/// Services whose health the proxy reports: the server as a whole (`""`) and what it serves.
const HEALTH_SERVICES: &[&str] = &[
    "",
    "temporal.api.workflowservice.v1.WorkflowService",
    "temporal.api.operatorservice.v1.OperatorService",
];

/// Answers `grpc.health.v1.Health/Check` from the proxy's own readiness instead of forwarding
/// it: a caller (SDK, gRPC load balancer, kubelet gRPC probe) asking whether this endpoint can
/// serve needs the proxy's answer — keys usable, certificate valid, upstreams reachable — not
/// one upstream's view that knows nothing of the proxy's key provider.
#[derive(Clone)]
pub struct HealthLayer {
    telemetry: Arc<Telemetry>,
}

impl HealthLayer {
    pub fn new(telemetry: Arc<Telemetry>) -> Self {
        HealthLayer { telemetry }
    }
}

impl<S> Layer<S> for HealthLayer {
    type Service = HealthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        HealthService {
            inner,
            telemetry: self.telemetry.clone(),
        }
    }
}

#[derive(Clone)]
pub struct HealthService<S> {
    inner: S,
    telemetry: Arc<Telemetry>,
}

impl<S> Service<GrpcRequest> for HealthService<S>
where
    S: Service<GrpcRequest, Response = GrpcResponse, Error = ProxyError, Future = CallFuture>,
{
    type Response = GrpcResponse;
    type Error = ProxyError;
    type Future = CallFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: GrpcRequest) -> CallFuture {
        if request.method.path != HEALTH_CHECK {
            return self.inner.call(request);
        }
        let answer = health_answer(&self.telemetry, &request.message);
        Box::pin(std::future::ready(answer))
    }
}

fn health_answer(telemetry: &Telemetry, message: &[u8]) -> Result<GrpcResponse, ProxyError> {
    // HealthCheckRequest { string service = 1; }
    let service = wire::validate_and_find_string(message, Some(1))
        .map_err(|e| ProxyError::MalformedMessage {
            message: "grpc.health.v1.HealthCheckRequest".into(),
            reason: e.to_string(),
        })?
        .unwrap_or_default();
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    let mut trailers = HeaderMap::new();
    if !HEALTH_SERVICES.contains(&service) {
        trailers.insert("grpc-status", HeaderValue::from_static("5"));
        trailers.insert(
            "grpc-message",
            HeaderValue::from_static("portcullis: unknown service"),
        );
        return Ok(GrpcResponse {
            headers,
            message: None,
            trailers,
            foreign_namespaces: Vec::new(),
        });
    }
    // HealthCheckResponse { ServingStatus status = 1; } SERVING = 1, NOT_SERVING = 2.
    let status = if telemetry.is_ready() { 1 } else { 2 };
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    Ok(GrpcResponse {
        headers,
        message: Some(Bytes::from_static(if status == 1 {
            &[0x08, 0x01]
        } else {
            &[0x08, 0x02]
        })),
        trailers,
        foreign_namespaces: Vec::new(),
    })
}
