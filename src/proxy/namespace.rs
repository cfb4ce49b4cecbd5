//! Reads the namespace from the request body and reconciles it with the `temporal-namespace`
//! header, which the caller controls and so may only agree with the body. Reads, too, the
//! other namespaces the request acts on ([`GrpcRequest::targets`]: commands aimed at another
//! namespace), and refuses nested requests that name another namespace than the request.

use std::task::{Context, Poll};

use http::HeaderValue;
use tower::{Layer, Service};

use super::{CallFuture, GrpcRequest, GrpcResponse};
use crate::error::ProxyError;
use crate::grpc::headers::{TEMPORAL_NAMESPACE, TEMPORAL_NAMESPACE_NAME};
use crate::payload::targets::{read_targets, TargetError, TargetIndex};
use crate::payload::walker::RESERVED_SCOPE_PREFIX;
use crate::payload::wire;
use crate::schema::Scope;

#[derive(Debug, Clone, Copy, Default)]
pub struct NamespaceLayer;

impl<S> Layer<S> for NamespaceLayer {
    type Service = NamespaceService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        NamespaceService { inner }
    }
}

#[derive(Debug, Clone)]
pub struct NamespaceService<S> {
    inner: S,
}

impl<S> Service<GrpcRequest> for NamespaceService<S>
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
        match resolve_namespace(request) {
            Ok(request) => self.inner.call(request),
            Err(error) => Box::pin(std::future::ready(Err(error))),
        }
    }
}

/// Validates the message's top level and settles its namespace.
pub fn resolve_namespace(mut request: GrpcRequest) -> Result<GrpcRequest, ProxyError> {
    let method = request.method;
    let body_namespace = wire::validate_and_find_string(&request.message, method.namespace_field)
        .map_err(|e| ProxyError::MalformedMessage {
        message: method.input.full_name().to_string(),
        reason: e.to_string(),
    })?;
    if method.scope == Scope::Cluster {
        return Ok(request);
    }
    let namespace = body_namespace
        .filter(|ns| !ns.is_empty())
        .ok_or_else(|| ProxyError::MissingNamespace(method.path.clone()))?
        .to_string();
    // A scope that is not a namespace (Nexus endpoint descriptions) is never one a call may
    // name: its key would seal and open what belongs to the scope.
    if namespace.starts_with(RESERVED_SCOPE_PREFIX) {
        return Err(ProxyError::UnknownNamespace(namespace));
    }
    match request.headers.get(TEMPORAL_NAMESPACE) {
        Some(header) if header.as_bytes() != namespace.as_bytes() => {
            return Err(ProxyError::NamespaceMismatch {
                header: String::from_utf8_lossy(header.as_bytes()).into_owned(),
                body: namespace,
            })
        }
        Some(_) => {}
        None => {
            let value =
                HeaderValue::from_str(&namespace).map_err(|_| ProxyError::MalformedMessage {
                    message: method.input.full_name().to_string(),
                    reason: "namespace is not a valid header value".into(),
                })?;
            request
                .headers
                .insert(TEMPORAL_NAMESPACE_NAME.clone(), value);
        }
    }
    request.targets = read_targets(
        TargetIndex::global(),
        method.input.full_name(),
        &request.message,
        &namespace,
    )
    .map_err(|e| match e {
        TargetError::NamespaceMismatch {
            command,
            namespace,
            expected,
        } => ProxyError::NestedNamespaceMismatch {
            operation: command,
            namespace,
            expected,
        },
        TargetError::SystemNexus(e) => ProxyError::SystemNexus(e.to_string()),
        other => ProxyError::MalformedMessage {
            message: method.input.full_name().to_string(),
            reason: other.to_string(),
        },
    })?;
    if let Some(target) = request
        .targets
        .iter()
        .find(|t| t.namespace.starts_with(RESERVED_SCOPE_PREFIX))
    {
        return Err(ProxyError::UnknownCommandTarget {
            command: target.command,
            namespace: target.namespace.clone(),
        });
    }
    request.namespace = Some(namespace);
    Ok(request)
}

#[cfg(test)]
mod tests {
    use crate::proxy::CallRequest;
    use std::sync::Arc;

    use bytes::Bytes;
    use http::HeaderMap;

    use super::*;
    use crate::payload::wire::put_len_field;
    use crate::schema::Schema;

    fn request(method: &str, message: Vec<u8>, header: Option<&str>) -> GrpcRequest {
        let mut headers = HeaderMap::new();
        if let Some(h) = header {
            headers.insert(TEMPORAL_NAMESPACE, HeaderValue::from_str(h).unwrap());
        }
        Box::new(CallRequest {
            method: Schema::global().method(method).unwrap(),
            headers,
            message: Bytes::from(message),
            deadline: None,
            namespace: None,
            targets: Vec::new(),
            peer: Arc::default(),
        })
    }

    const START: &str = "/temporal.api.workflowservice.v1.WorkflowService/StartWorkflowExecution";
    const HEARTBEAT: &str =
        "/temporal.api.workflowservice.v1.WorkflowService/RecordActivityTaskHeartbeat";

    #[test]
    fn header_is_set_from_body() {
        let mut msg = Vec::new();
        put_len_field(&mut msg, 1, b"payments");
        let r = resolve_namespace(request(START, msg, None)).unwrap();
        assert_eq!(r.namespace.as_deref(), Some("payments"));
        assert_eq!(r.headers[TEMPORAL_NAMESPACE], "payments");
    }

    #[test]
    fn mismatched_header_is_refused() {
        let mut msg = Vec::new();
        put_len_field(&mut msg, 1, b"payments");
        let err = resolve_namespace(request(START, msg, Some("other"))).unwrap_err();
        assert!(matches!(err, ProxyError::NamespaceMismatch { .. }), "{err}");
    }

    #[test]
    fn task_token_method_uses_its_own_field() {
        let mut msg = Vec::new();
        put_len_field(&mut msg, 1, b"opaque-token");
        put_len_field(&mut msg, 4, b"orders");
        let r = resolve_namespace(request(HEARTBEAT, msg, Some("orders"))).unwrap();
        assert_eq!(r.namespace.as_deref(), Some("orders"));
        let mut only_token = Vec::new();
        put_len_field(&mut only_token, 1, b"opaque-token");
        let err = resolve_namespace(request(HEARTBEAT, only_token, Some("orders"))).unwrap_err();
        assert!(matches!(err, ProxyError::MissingNamespace(_)), "{err}");
    }

    const COMPLETED: &str =
        "/temporal.api.workflowservice.v1.WorkflowService/RespondWorkflowTaskCompleted";
    const MULTI: &str = "/temporal.api.workflowservice.v1.WorkflowService/ExecuteMultiOperation";

    /// Commands aimed elsewhere become targets; a nested request naming another namespace is
    /// refused before anything else sees it.
    #[test]
    fn targets_are_read_with_the_namespace() {
        // RespondWorkflowTaskCompleted { commands: [start child in beta], namespace: alpha }
        let mut attributes = Vec::new();
        put_len_field(&mut attributes, 1, b"beta");
        let mut command = Vec::new();
        put_len_field(&mut command, 12, &attributes);
        let mut msg = Vec::new();
        put_len_field(&mut msg, 2, &command);
        put_len_field(&mut msg, 9, b"alpha");
        let r = resolve_namespace(request(COMPLETED, msg, None)).unwrap();
        assert_eq!(r.namespace.as_deref(), Some("alpha"));
        assert_eq!(r.targets.len(), 1);
        assert_eq!(r.targets[0].command, "StartChildWorkflowExecution");
        assert_eq!(r.targets[0].namespace, "beta");

        // ExecuteMultiOperation { namespace: alpha, operations: [{ start_workflow: { namespace: beta } }] }
        let mut start = Vec::new();
        put_len_field(&mut start, 1, b"beta");
        let mut operation = Vec::new();
        put_len_field(&mut operation, 1, &start);
        let mut msg = Vec::new();
        put_len_field(&mut msg, 1, b"alpha");
        put_len_field(&mut msg, 2, &operation);
        let err = resolve_namespace(request(MULTI, msg, None)).unwrap_err();
        assert!(
            matches!(err, ProxyError::NestedNamespaceMismatch { .. }),
            "{err}"
        );
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn malformed_message_is_invalid_argument() {
        let err = resolve_namespace(request(START, vec![0x0a, 0x09, b'x'], None)).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }
}
