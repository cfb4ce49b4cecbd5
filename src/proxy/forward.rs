//! The innermost stage: sends the call to its upstream and reads the whole answer.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::CONTENT_TYPE;
use http::HeaderValue;
use tower::Service;

use super::{CallFuture, GrpcRequest, GrpcResponse};
use crate::error::{CrossUpstream, ProxyError};
use crate::grpc::frame::{self, Direction, Encoding, FrameError, HEADER_LEN};
use crate::grpc::headers::{
    self, GRPC_ACCEPT_ENCODING_NAME, GRPC_ENCODING, GRPC_TIMEOUT_NAME, TEMPORAL_NAMESPACE,
};
use crate::schema::Scope;
use crate::upstream::{BodyError, Route, Router, Upstream, Upstreams};

#[derive(Debug, Clone)]
pub struct Forwarder {
    upstreams: Arc<Upstreams>,
    max_response_bytes: usize,
}

impl Forwarder {
    pub fn new(upstreams: Arc<Upstreams>, max_response_bytes: usize) -> Forwarder {
        Forwarder {
            upstreams,
            max_response_bytes,
        }
    }
}

impl Service<GrpcRequest> for Forwarder {
    type Response = GrpcResponse;
    type Error = ProxyError;
    type Future = CallFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: GrpcRequest) -> CallFuture {
        let router = self.upstreams.router();
        let max_response_bytes = self.max_response_bytes;
        Box::pin(async move {
            let mut request = request;
            let route = match (request.method.scope, request.namespace.as_deref()) {
                (Scope::Namespace, Some(namespace)) => router.route(namespace)?,
                (Scope::Namespace, None) => {
                    return Err(ProxyError::MissingNamespace(request.method.path.clone()))
                }
                (Scope::Cluster, _) => {
                    if request.method.path == GET_SYSTEM_INFO {
                        // As Temporal's SDKs send it: a regional endpoint that routes by this
                        // header must not take GetSystemInfo for one namespace's call.
                        request.headers.remove(TEMPORAL_NAMESPACE);
                    }
                    router.system_route()?
                }
            };
            check_targets(&router, &route.upstream, &request)?;
            drop(router);
            let deadline = request.deadline;
            // One `forward` future for both arms (two would each take room in this future).
            let call = forward(&route, request, max_response_bytes);
            match deadline {
                // The upstream gets the same deadline; the local timer is the backstop that also
                // covers connecting and a stalled upstream.
                Some((deadline, timeout)) => crate::deadlines::timeout_at(deadline, call)
                    .await
                    .unwrap_or(Err(ProxyError::DeadlineExceeded(timeout))),
                None => call.await,
            }
        })
    }
}

/// An upstream that cancels a call (RST_STREAM CANCEL) as its deadline runs out does so a
/// moment before the proxy's own timer fires (it counts from a deadline sent a moment later,
/// rounded down): that is the caller's deadline passing.
const DEADLINE_SLACK: Duration = Duration::from_millis(250);

/// What an upstream's RST_STREAM CANCEL means to the caller, who did not cancel (a caller's
/// cancellation never reaches here): at the deadline, the deadline; before it, the upstream gave
/// the call up (nginx does so when its own backend goes away mid-call), which is UNAVAILABLE,
/// retryable, as Envoy reports an upstream reset. gRPC's table (CANCEL = CANCELLED) is for a
/// client talking to the server itself, and CANCELLED would tell the SDK it cancelled.
fn deadline_or(
    error: ProxyError,
    deadline: Option<(tokio::time::Instant, Duration)>,
) -> ProxyError {
    match (&error, deadline) {
        (
            ProxyError::UpstreamReset {
                code: h2::Reason::CANCEL,
                ..
            },
            Some((at, timeout)),
        ) if at.saturating_duration_since(tokio::time::Instant::now()) <= DEADLINE_SLACK => {
            ProxyError::DeadlineExceeded(timeout)
        }
        (
            ProxyError::UpstreamReset {
                code: h2::Reason::CANCEL,
                upstream,
            },
            _,
        ) => ProxyError::UpstreamGaveUp {
            upstream: upstream.clone(),
        },
        _ => error,
    }
}

/// Commands aimed at another namespace are run by the upstream that receives the request: the
/// target must be served by this proxy, and by that same upstream (endpoint), or the command
/// would act on a namespace of the same name somewhere the proxy does not route it.
fn check_targets(
    router: &Router,
    upstream: &Arc<Upstream>,
    request: &GrpcRequest,
) -> Result<(), ProxyError> {
    for target in &request.targets {
        let served = router
            .for_namespace(&target.namespace)
            .map_err(|e| match e {
                ProxyError::UnknownNamespace(_) => ProxyError::UnknownCommandTarget {
                    command: target.command,
                    namespace: target.namespace.clone(),
                },
                other => other,
            })?;
        if !Arc::ptr_eq(&served, upstream) {
            return Err(ProxyError::CrossUpstreamCommand(Box::new(CrossUpstream {
                command: target.command,
                target: target.namespace.clone(),
                target_upstream: served.name.clone(),
                namespace: request.namespace.clone().unwrap_or_default(),
                upstream: upstream.name.clone(),
            })));
        }
    }
    Ok(())
}

const GET_SYSTEM_INFO: &str = "/temporal.api.workflowservice.v1.WorkflowService/GetSystemInfo";

async fn forward(
    route: &Route,
    request: GrpcRequest,
    max_response_bytes: usize,
) -> Result<GrpcResponse, ProxyError> {
    let upstream = &route.upstream;
    let protocol_error = |reason: String| ProxyError::UpstreamProtocol {
        upstream: upstream.name.clone(),
        reason,
    };
    let mut headers = request.headers;
    if !headers.contains_key(CONTENT_TYPE) {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    }
    headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    headers.insert(
        GRPC_ACCEPT_ENCODING_NAME.clone(),
        HeaderValue::from_static("gzip,identity"),
    );
    if let Some((deadline, _)) = request.deadline {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        headers.insert(
            GRPC_TIMEOUT_NAME.clone(),
            headers::format_timeout(remaining),
        );
    }
    let body = frame::encode(&request.message, Encoding::Identity);

    let response = upstream
        .send_with_key(&request.method.path, &headers, body, route.api_key.as_ref())
        .await
        .map_err(|e| deadline_or(e, request.deadline))?;
    let parts = response.head;
    if parts.status != http::StatusCode::OK {
        return Err(ProxyError::UpstreamHttpStatus {
            upstream: upstream.name.clone(),
            status: parts.status.as_u16(),
        });
    }
    if !headers::is_grpc_content_type(&parts.headers) {
        return Err(protocol_error("response is not gRPC".into()));
    }
    let encoding = Encoding::from_header(parts.headers.get(GRPC_ENCODING))
        .map_err(|e| protocol_error(e.to_string()))?;
    let (body, trailers) = response
        .body
        .collect(max_response_bytes + HEADER_LEN)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge => ProxyError::MessageTooLarge {
                what: "response",
                size: format!("more than {max_response_bytes} bytes"),
                limit: max_response_bytes,
            },
            BodyError::Interrupted(reason) => ProxyError::UpstreamUnavailable {
                upstream: upstream.name.clone(),
                address: upstream.address.clone(),
                reason: format!("response interrupted: {reason}"),
            },
            BodyError::Reset(code) => ProxyError::UpstreamReset {
                upstream: upstream.name.clone(),
                code,
            },
        })
        .map_err(|e| deadline_or(e, request.deadline))?;
    let message = frame::decode_unary(&body, encoding, max_response_bytes, Direction::Response)
        .map_err(|e| match e {
            FrameError::Malformed(reason) => protocol_error(reason.to_string()),
            FrameError::TooLarge { size, limit } => ProxyError::MessageTooLarge {
                what: "response",
                size: format!("{size} bytes"),
                limit,
            },
        })?;
    Ok(GrpcResponse {
        headers: headers::response_headers_for_caller(&parts.headers),
        message,
        trailers,
        foreign_namespaces: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use crate::proxy::CallRequest;
    use std::sync::Arc;

    use bytes::Bytes;
    use http::HeaderMap;

    use super::*;
    use crate::config::Config;
    use crate::payload::targets::CommandTarget;
    use crate::schema::Schema;
    use tonic::Code;

    /// alpha and beta on one upstream, delta on another, gamma and eps behind a template.
    const CONFIG: &str = r#"
[listener]
address = "127.0.0.1:0"
plaintext = true
[upstreams.one]
address = "127.0.0.1:7233"
[upstreams.two]
address = "127.0.0.1:7234"
[upstreams.cloud]
address = "{namespace}.example.invalid:7233"
[routing]
system_upstream = "one"
[[namespaces]]
name = "alpha"
upstream = "one"
[[namespaces]]
name = "beta"
upstream = "one"
[[namespaces]]
name = "delta"
upstream = "two"
[[namespaces]]
name = "gamma"
upstream = "cloud"
[[namespaces]]
name = "eps"
upstream = "cloud"
[authorization]
disabled = true
[encryption]
disabled = true
"#;

    fn check(own: &str, target: &str) -> Result<(), ProxyError> {
        let config = Config::from_toml(CONFIG).unwrap();
        let router = Router::from_config(&config).unwrap();
        let request = Box::new(CallRequest {
            method: Schema::global()
                .method(
                    "/temporal.api.workflowservice.v1.WorkflowService/RespondWorkflowTaskCompleted",
                )
                .unwrap(),
            headers: HeaderMap::new(),
            message: Bytes::new(),
            deadline: None,
            namespace: Some(own.into()),
            targets: vec![CommandTarget {
                command: "StartChildWorkflowExecution",
                namespace: target.into(),
                carries_payloads: true,
            }],
            peer: Arc::default(),
        });
        let upstream = router.for_namespace(own).unwrap();
        check_targets(&router, &upstream, &request)
    }

    /// A command target must be served, by the very endpoint the request goes to: whatever
    /// authorization says (here it is off).
    #[test]
    fn targets_must_share_the_request_upstream() {
        check("alpha", "beta").expect("one upstream");
        let err = check("alpha", "delta").unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(err.to_string().contains("upstream two"), "{err}");
        let err = check("alpha", "nowhere").unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
        assert!(
            err.to_string().contains("StartChildWorkflowExecution"),
            "{err}"
        );
        // A template gives each namespace an endpoint of its own.
        let err = check("gamma", "eps").unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        check("gamma", "gamma").expect("its own endpoint");
    }

    fn reset(code: h2::Reason) -> ProxyError {
        ProxyError::UpstreamReset {
            upstream: "u".into(),
            code,
        }
    }

    #[tokio::test]
    async fn upstream_resets_map_as_grpc_prescribes() {
        let now = tokio::time::Instant::now();
        let timeout = Duration::from_secs(5);
        let expiring = Some((now + Duration::from_millis(100), timeout));
        let far = Some((now + Duration::from_secs(30), timeout));
        // CANCEL at the deadline is the deadline; earlier, or without one, the upstream gave up.
        assert_eq!(
            deadline_or(reset(h2::Reason::CANCEL), expiring).code(),
            Code::DeadlineExceeded
        );
        assert_eq!(
            deadline_or(reset(h2::Reason::CANCEL), far).code(),
            Code::Unavailable
        );
        assert_eq!(
            deadline_or(reset(h2::Reason::CANCEL), None).code(),
            Code::Unavailable
        );
        for (code, expected) in [
            (h2::Reason::REFUSED_STREAM, Code::Unavailable),
            (h2::Reason::ENHANCE_YOUR_CALM, Code::ResourceExhausted),
            (h2::Reason::INADEQUATE_SECURITY, Code::PermissionDenied),
            (h2::Reason::INTERNAL_ERROR, Code::Internal),
            (h2::Reason::PROTOCOL_ERROR, Code::Internal),
            (h2::Reason::NO_ERROR, Code::Internal),
        ] {
            assert_eq!(
                deadline_or(reset(code), expiring).code(),
                expected,
                "{code:?}"
            );
        }
    }
}
