//! The HTTP/2 edge: authenticates a call from its headers, routes by path, reads and unframes
//! the unary request within its budgets and time, and writes the answer. Every [`ProxyError`]
//! becomes a gRPC status here, and only here.
//!
//! Order matters: nothing of a request's body is read before its caller is authenticated (a
//! refused call is answered at once and its body discarded by HTTP/2 without being buffered),
//! and every byte that is read is first reserved against the connection's and the process's
//! buffer budgets (see [`super::limits`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use h2::RecvStream;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue, Request, Response};
use tokio::time::Instant;
use tower::{Service, ServiceExt};

use super::authn::Authenticator;
use super::limits::{header_bytes, BudgetScope, BufferBudget, EdgeStats, Refusal, Reservation};
use super::{CallFuture, CallRequest, GrpcRequest, GrpcResponse};
use crate::authz::{AuditLog, EdgeAuditEvent, EdgeEventKind};
use crate::error::ProxyError;
use crate::grpc::frame::{self, Direction, Encoding, HEADER_LEN};
use crate::grpc::headers::{self, GRPC_ENCODING, GRPC_ENCODING_NAME, GRPC_TIMEOUT};
use crate::grpc::GrpcBody;
use crate::schema::Schema;
use crate::tls::PeerInfo;

/// Health checks are answered without a bearer token (load balancers send none); their bodies
/// are tiny, so an unauthenticated one may be at most this long.
const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
const UNAUTHENTICATED_HEALTH_CHECK_BYTES: usize = 4096;

/// What every connection's edge shares: limits, the authenticator, the process-wide budget.
pub struct EdgeShared {
    /// Largest request message (after decompression).
    pub max_request_bytes: usize,
    /// A request body must have fully arrived this long after its headers.
    pub body_timeout: Duration,
    /// Request bytes one connection's calls may hold at once.
    pub connection_budget: usize,
    /// With `[bearer]`: calls need a certificate or a valid token.
    pub authenticator: Option<Authenticator>,
    /// Request bytes all calls may hold at once.
    pub budget: BufferBudget,
    pub stats: Arc<EdgeStats>,
    /// Authentication failures are audited here (best effort: never more than half its queue).
    pub audit: Arc<AuditLog>,
}

/// One connection's state.
struct ConnectionState {
    peer: Arc<PeerInfo>,
    budget: BufferBudget,
    shared: Arc<EdgeShared>,
}

/// Per-connection front of the call pipeline `S`: HTTP/2 request in, gRPC response out.
#[derive(Clone)]
pub struct GrpcEdge<S> {
    pipeline: S,
    connection: Arc<ConnectionState>,
}

impl<S> GrpcEdge<S> {
    pub fn new(pipeline: S, peer: Arc<PeerInfo>, shared: Arc<EdgeShared>) -> Self {
        GrpcEdge {
            pipeline,
            connection: Arc::new(ConnectionState {
                peer,
                budget: BufferBudget::new(shared.connection_budget, "connection"),
                shared,
            }),
        }
    }
}

impl<S> GrpcEdge<S>
where
    S: Service<GrpcRequest, Response = GrpcResponse, Error = ProxyError, Future = CallFuture>
        + Clone
        + Send
        + 'static,
{
    /// Answers one HTTP/2 request: every outcome, success or error, is a gRPC response.
    /// The request comes boxed: a future keeps its arguments for its whole life, and this one
    /// lives as long as the call (a long poll: minutes); boxed, the request's head goes away
    /// once it was read.
    pub async fn handle(self, request: Box<Request<RecvStream>>) -> Response<GrpcBody> {
        let respond_gzip =
            request_is_gzip(request.headers()) && headers::accepts_gzip(request.headers());
        match self.call(request).await {
            Ok(response) => success_response(response, respond_gzip),
            Err(error) => error_response(&error),
        }
    }

    async fn call(self, request: Box<Request<RecvStream>>) -> Result<GrpcResponse, ProxyError> {
        // The steps before forwarding (authentication, reading the body) are a large future:
        // boxed, it is gone once the call is forwarded, and what stays while the call waits for
        // its answer (a long poll, for minutes) is small. The request's own headers and body
        // stream go with it (what goes upstream is in `call`).
        let connection = &*self.connection;
        let (call, _reservation, valid_until) = Box::pin(prepare(connection, request)).await?;
        // Pinned in place: one future for both arms below.
        let mut answer = std::pin::pin!(self.pipeline.oneshot(call));
        match valid_until {
            // Nothing runs past the token's expiry: the call (and its upstream call) ends then.
            Some(until) => {
                let left = until
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO);
                tokio::select! {
                    answer = &mut answer => answer,
                    _ = tokio::time::sleep(left) => Err(ProxyError::Unauthenticated(
                        "the bearer token expired during the call".into(),
                    )),
                }
            }
            None => answer.await,
        }
    }
}

/// Authenticates the caller and reads the request: the call to forward, the reservation
/// of its bytes against the budgets (held until the call ends), and when its bearer token
/// expires.
async fn prepare(
    connection: &ConnectionState,
    request: Box<Request<RecvStream>>,
) -> Result<(GrpcRequest, Reservation<'_>, Option<SystemTime>), ProxyError> {
    let (mut parts, mut body) = request.into_parts();
    let arrived = Instant::now();
    let shared = &*connection.shared;
    let mut limit = shared.max_request_bytes;
    let (peer, valid_until) = match &shared.authenticator {
        Some(authenticator) => {
            match authenticator
                .authenticate(&mut parts.headers, &connection.peer)
                .await
            {
                Ok(authenticated) => (authenticated.peer, authenticated.valid_until),
                Err(_) if parts.uri.path() == HEALTH_CHECK => {
                    limit = limit.min(UNAUTHENTICATED_HEALTH_CHECK_BYTES);
                    (connection.peer.clone(), None)
                }
                Err(failure) => {
                    // Answered now; dropping `body` makes HTTP/2 discard what the caller
                    // sends (and tell it to stop) without buffering any of it.
                    drop(body);
                    shared.stats.call_refused(Refusal::Unauthenticated);
                    tracing::debug!(method = %parts.uri.path(), peer = %connection.peer.remote, error = %failure.error, "call refused: unauthenticated");
                    let mut event = EdgeAuditEvent::new(
                        EdgeEventKind::AuthenticationFailed,
                        failure.reason,
                        &connection.peer.remote,
                    )
                    .detail(match &failure.error {
                        ProxyError::Unauthenticated(why) => why.clone(),
                        other => other.to_string(),
                    });
                    event.method = Some(parts.uri.path().to_string());
                    event.credential = Some(failure.credential);
                    shared.audit.record_best_effort(&event);
                    return Err(failure.error);
                }
            }
        }
        None => (connection.peer.clone(), None),
    };
    let mut reservation = Reservation::new(&connection.budget, &shared.budget);
    match read_call(
        &mut parts,
        &mut body,
        peer,
        limit,
        &mut reservation,
        (arrived, shared.body_timeout),
    )
    .await
    {
        Ok(call) => Ok((call, reservation, valid_until)),
        Err(error) => {
            drop(body);
            match &error {
                ProxyError::BufferLimit { scope, .. } => {
                    shared.stats.call_refused(if *scope == "process" {
                        Refusal::ProcessBudget
                    } else {
                        Refusal::ConnectionBudget
                    })
                }
                ProxyError::BodyTimeout(_) => shared.stats.call_refused(Refusal::BodyTimeout),
                _ => {}
            }
            // Calls that reach the pipeline are logged (and measured) by its telemetry
            // layer, inside the call's span; only requests refused before that are logged
            // here.
            tracing::info!(method = %parts.uri.path(), code = ?error.code(), error = %error, peer = %connection.peer.remote, "request refused");
            Err(error)
        }
    }
}

async fn read_call(
    parts: &mut http::request::Parts,
    body: &mut RecvStream,
    peer: Arc<PeerInfo>,
    limit: usize,
    reservation: &mut Reservation<'_>,
    (arrived, body_timeout): (Instant, Duration),
) -> Result<GrpcRequest, ProxyError> {
    let body_deadline = arrived + body_timeout;
    let method = Schema::global()
        .method(parts.uri.path())
        .ok_or_else(|| ProxyError::UnknownMethod(parts.uri.path().to_string()))?;
    if method.streaming {
        return Err(ProxyError::StreamingNotSupported(method.path.clone()));
    }
    if !headers::is_grpc_content_type(&parts.headers) {
        let content_type = parts
            .headers
            .get(CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        return Err(ProxyError::NotGrpc(content_type));
    }
    let encoding = Encoding::from_header(parts.headers.get(GRPC_ENCODING))?;
    let deadline = match parts.headers.get(GRPC_TIMEOUT) {
        Some(value) => {
            let timeout = headers::parse_timeout(value)?;
            Some((arrived + timeout, timeout))
        }
        None => None,
    };
    // The header block stays in memory while the call runs: it counts too.
    reservation
        .grow(header_bytes(parts))
        .map_err(|scope| reservation.refusal(scope))?;
    let wire = match crate::deadlines::timeout_at(
        body_deadline,
        read_body(body, limit, reservation),
    )
    .await
    {
        Ok(read) => read?,
        Err(_) => return Err(ProxyError::BodyTimeout(body_timeout)),
    };
    let wire_len = wire.len();
    let compressed = wire.first() == Some(&1);
    let message = frame::decode_unary(&wire, encoding, limit, Direction::Request)
        .map_err(|e| e.into_request_error())?
        .ok_or(ProxyError::MalformedFrame("no request message"))?;
    if compressed {
        // The decompressed message is a new buffer; the compressed one goes away with `wire`.
        reservation
            .grow(message.len())
            .map_err(|scope| reservation.refusal(scope))?;
        drop(wire);
        reservation.shrink(wire_len);
    }
    Ok(Box::new(CallRequest {
        method,
        headers: headers::request_headers_for_upstream(&parts.headers),
        message,
        deadline,
        namespace: None,
        targets: Vec::new(),
        peer,
    }))
}

/// Reads a request body of at most `limit` message bytes. Each chunk is reserved against the
/// budgets before its flow-control capacity goes back to the caller, so the caller can never
/// have more in flight than the budgets allow (plus what one HTTP/2 connection window lets it
/// send before the next read). A body of one DATA frame is returned without a copy; a longer
/// one is kept as its chunks and joined once at the end into a buffer of its exact size, the
/// join reserved too. (Growing a buffer as chunks arrive, or sizing it from the declared
/// length up front, measured worse under a flood: partly touched large buffers fragment the
/// heap.)
async fn read_body(
    body: &mut RecvStream,
    limit: usize,
    reservation: &mut Reservation<'_>,
) -> Result<Bytes, ProxyError> {
    let too_large = || ProxyError::MessageTooLarge {
        what: "request",
        size: format!("more than {limit} bytes"),
        limit,
    };
    let wire_limit = limit + HEADER_LEN;
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut total = 0usize;
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| ProxyError::RequestBody(e.to_string()))?;
        let len = chunk.len();
        total += len;
        if total > wire_limit {
            return Err(too_large());
        }
        reservation
            .grow(len)
            .map_err(|scope: BudgetScope| reservation.refusal(scope))?;
        // A failure here only means the stream is already gone, which the next read reports.
        let _ = body.flow_control().release_capacity(len);
        chunks.push(chunk);
    }
    body.trailers()
        .await
        .map_err(|e| ProxyError::RequestBody(e.to_string()))?;
    if chunks.len() == 1 {
        return Ok(chunks.pop().unwrap_or_default());
    }
    reservation
        .grow(total)
        .map_err(|scope: BudgetScope| reservation.refusal(scope))?;
    let mut out = Vec::with_capacity(total);
    for chunk in chunks {
        out.extend_from_slice(&chunk);
    }
    reservation.shrink(total);
    Ok(Bytes::from(out))
}

fn request_is_gzip(headers: &HeaderMap) -> bool {
    headers.get(GRPC_ENCODING).is_some_and(|v| v == "gzip")
}

fn success_response(response: GrpcResponse, gzip: bool) -> Response<GrpcBody> {
    let GrpcResponse {
        mut headers,
        message,
        trailers,
        ..
    } = response;
    let data = message.map(|m| {
        let encoding = if gzip {
            Encoding::Gzip
        } else {
            Encoding::Identity
        };
        if gzip {
            headers.insert(GRPC_ENCODING_NAME.clone(), HeaderValue::from_static("gzip"));
        }
        frame::encode(&m, encoding)
    });
    headers
        .entry(CONTENT_TYPE)
        .or_insert(HeaderValue::from_static("application/grpc"));
    let mut out = Response::new(GrpcBody::new(data, Some(trailers)));
    *out.headers_mut() = headers;
    out
}

/// A trailers-only gRPC answer carrying the error's status.
pub fn error_response(error: &ProxyError) -> Response<GrpcBody> {
    let mut out = Response::new(GrpcBody::empty());
    let headers = out.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    if error.to_status().add_header(headers).is_err() {
        headers.insert("grpc-status", HeaderValue::from_static("13"));
    }
    out
}
