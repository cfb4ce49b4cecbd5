//! The HTTP/2 edge: routes by path, reads and unframes the unary request, and writes the answer.
//! Every [`ProxyError`] becomes a gRPC status here, and only here.

use std::sync::Arc;

use bytes::Bytes;
use h2::RecvStream;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue, Request, Response};
use tower::{Service, ServiceExt};

use super::{CallFuture, GrpcRequest, GrpcResponse};
use crate::error::ProxyError;
use crate::grpc::body::{collect_h2, BodyError};
use crate::grpc::frame::{self, Direction, Encoding, HEADER_LEN};
use crate::grpc::headers::{self, GRPC_ENCODING, GRPC_TIMEOUT};
use crate::grpc::GrpcBody;
use crate::schema::Schema;
use crate::tls::PeerInfo;

/// Per-connection front of the call pipeline `S`: HTTP/2 request in, gRPC response out.
#[derive(Clone)]
pub struct GrpcEdge<S> {
    pipeline: S,
    peer: Arc<PeerInfo>,
    max_request_bytes: usize,
}

impl<S> GrpcEdge<S> {
    pub fn new(pipeline: S, peer: Arc<PeerInfo>, max_request_bytes: usize) -> Self {
        GrpcEdge {
            pipeline,
            peer,
            max_request_bytes,
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
    pub async fn handle(self, request: Request<RecvStream>) -> Response<GrpcBody> {
        let path = request.uri().path().to_string();
        let respond_gzip =
            request_is_gzip(request.headers()) && headers::accepts_gzip(request.headers());
        // Calls that reach the pipeline are logged (and measured) by its telemetry layer, inside
        // the call's span; only requests refused before that are logged here.
        let result = match read_call(request, self.peer.clone(), self.max_request_bytes).await {
            Ok(call) => self.pipeline.oneshot(call).await,
            Err(error) => {
                tracing::info!(method = %path, code = ?error.code(), error = %error, peer = %self.peer.remote, "request refused");
                Err(error)
            }
        };
        match result {
            Ok(response) => success_response(response, respond_gzip),
            Err(error) => error_response(&error),
        }
    }
}

async fn read_call(
    request: Request<RecvStream>,
    peer: Arc<PeerInfo>,
    limit: usize,
) -> Result<GrpcRequest, ProxyError> {
    let (parts, body) = request.into_parts();
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
            Some((tokio::time::Instant::now() + timeout, timeout))
        }
        None => None,
    };
    let body = read_body(body, limit).await?;
    let message = frame::decode_unary(&body, encoding, limit, Direction::Request)
        .map_err(|e| e.into_request_error())?
        .ok_or(ProxyError::MalformedFrame("no request message"))?;
    Ok(GrpcRequest {
        method,
        headers: headers::request_headers_for_upstream(&parts.headers),
        message,
        deadline,
        namespace: None,
        targets: Vec::new(),
        peer,
    })
}

async fn read_body(mut body: RecvStream, limit: usize) -> Result<Bytes, ProxyError> {
    match collect_h2(&mut body, limit + HEADER_LEN).await {
        Ok((data, _trailers)) => Ok(data),
        Err(BodyError::TooLarge) => Err(ProxyError::MessageTooLarge {
            what: "request",
            size: format!("more than {limit} bytes"),
            limit,
        }),
        Err(BodyError::Interrupted(e)) => Err(ProxyError::RequestBody(e)),
    }
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
            headers.insert(GRPC_ENCODING, HeaderValue::from_static("gzip"));
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
