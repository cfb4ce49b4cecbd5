//! The admin listener: plain HTTP/1.1 with `/metrics` (OpenMetrics text), `/healthz` (the process
//! is alive) and `/readyz` (the last readiness probe passed). Nothing here is secret — no
//! payloads, keys or identities — but bind it to loopback or a pod network, not the internet.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::Telemetry;

pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves until `shutdown` fires; open connections are closed then.
pub fn spawn(
    listener: TcpListener,
    telemetry: Arc<Telemetry>,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut connections = JoinSet::new();
        loop {
            while connections.try_join_next().is_some() {}
            let accepted = tokio::select! {
                _ = shutdown.changed() => break,
                accepted = listener.accept() => accepted,
            };
            let (stream, _) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let telemetry = telemetry.clone();
            connections.spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let telemetry = telemetry.clone();
                    async move { Ok::<_, Infallible>(handle(&telemetry, &request)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
        connections.shutdown().await;
    })
}

/// Binds the admin address (`HOST:PORT`).
pub async fn bind(address: &str) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let addr: SocketAddr = address
        .parse()
        .map_err(|_| anyhow::anyhow!("admin.listen {address:?} is not IP:PORT"))?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on admin address {addr}: {e}"))?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

fn handle(telemetry: &Arc<Telemetry>, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "GET only\n".into());
    }
    match request.uri().path() {
        "/metrics" => text(StatusCode::OK, METRICS_CONTENT_TYPE, telemetry.encode()),
        "/healthz" | "/livez" => text(StatusCode::OK, PLAIN, "ok\n".into()),
        "/readyz" => {
            let report = telemetry.readiness();
            let mut body = String::new();
            let ready = telemetry.is_ready();
            if telemetry.is_draining() {
                body.push_str("FAIL shutting down\n");
            }
            match &report {
                Some(report) => {
                    let age = report
                        .checked_at
                        .elapsed()
                        .map(|d| d.as_secs_f64())
                        .unwrap_or_default();
                    body.push_str(&report.render());
                    body.push_str(&format!("checked {age:.1} s ago\n"));
                }
                None => body.push_str("FAIL no readiness probe has completed yet\n"),
            }
            body.insert_str(0, if ready { "ready\n" } else { "not ready\n" });
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, PLAIN, body)
        }
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}
