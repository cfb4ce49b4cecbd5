//! `ListNamespaces` answered by the proxy, when its namespaces live on different upstreams or
//! behind per-namespace endpoints (Temporal Cloud: a namespace endpoint refuses to list, and a
//! cluster-wide call has no single right upstream). See `routing.list_namespaces`.
//!
//! The answer is built from the configured namespaces the caller may read (sorted by name,
//! paged as the API pages: `page_size`, default 100, and an opaque `next_page_token`), each
//! described by `DescribeNamespace` at its own upstream, through the stages below this one
//! (namespace translation, the namespace's API key). Descriptions are cached for a few seconds,
//! shared by all callers (what a caller may see is decided before, per caller). A namespace
//! whose upstream does not answer is left out of the page (logged); a page none of whose
//! namespaces answer fails with the first error.
//!
//! Where it sits: `… → Encrypt → NamespaceList → Translate → Forwarder`. With a single system
//! upstream it passes the call on, as before.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use prost::Message;
use temporalio_protos::temporal::api::workflowservice::v1::{
    DescribeNamespaceRequest, DescribeNamespaceResponse, ListNamespacesRequest,
};
use tower::{Layer, Service, ServiceExt};

use super::{CallFuture, CallRequest, GrpcRequest, GrpcResponse};
use crate::authz::PolicyStore;
use crate::error::ProxyError;
use crate::grpc::headers::TEMPORAL_NAMESPACE;
use crate::payload::wire;
use crate::schema::{MethodInfo, Schema};
use crate::upstream::Upstreams;

const LIST_NAMESPACES: &str = "/temporal.api.workflowservice.v1.WorkflowService/ListNamespaces";
const DESCRIBE_NAMESPACE: &str =
    "/temporal.api.workflowservice.v1.WorkflowService/DescribeNamespace";
/// Temporal's own default page size for ListNamespaces.
const DEFAULT_PAGE_SIZE: usize = 100;
const MAX_PAGE_SIZE: usize = 1000;
/// How long a namespace's description is reused.
pub const DESCRIPTION_TTL: Duration = Duration::from_secs(10);
const TOKEN_PREFIX: &[u8] = b"portcullis-namespaces:v1:";
/// `NamespaceState.NAMESPACE_STATE_DELETED`.
const STATE_DELETED: i32 = 3;

#[derive(Clone)]
pub struct NamespaceListLayer {
    upstreams: Arc<Upstreams>,
    policies: Option<Arc<PolicyStore>>,
    cache: moka::future::Cache<String, Bytes>,
}

impl NamespaceListLayer {
    pub fn new(upstreams: Arc<Upstreams>, policies: Option<Arc<PolicyStore>>) -> Self {
        NamespaceListLayer {
            upstreams,
            policies,
            cache: moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(DESCRIPTION_TTL)
                .build(),
        }
    }
}

impl<S> Layer<S> for NamespaceListLayer {
    type Service = NamespaceListService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        NamespaceListService {
            inner,
            shared: Arc::new(self.clone()),
        }
    }
}

#[derive(Clone)]
pub struct NamespaceListService<S> {
    inner: S,
    /// Shared, not cloned with the service for every call: cloning a moka cache clones half a
    /// dozen reference counts.
    shared: Arc<NamespaceListLayer>,
}

impl<S> Service<GrpcRequest> for NamespaceListService<S>
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
        if request.method.path != LIST_NAMESPACES {
            return self.inner.call(request);
        }
        let router = self.shared.upstreams.router();
        if !router.lists_namespaces_itself() {
            return self.inner.call(request);
        }
        let mut names: Vec<String> = router.configured_namespaces().to_vec();
        drop(router);
        if let Some(store) = &self.shared.policies {
            let policies = store.current();
            let (identity, claimed, _) = crate::authz::caller_of(&policies, &request.peer);
            names.retain(|ns| {
                policies
                    .role_in_namespace_for(&identity, claimed, ns)
                    .is_some()
            });
        }
        let inner = self.inner.clone();
        let cache = self.shared.cache.clone();
        Box::pin(async move { list(inner, cache, request, names).await })
    }
}

async fn list<S>(
    inner: S,
    cache: moka::future::Cache<String, Bytes>,
    request: GrpcRequest,
    names: Vec<String>,
) -> Result<GrpcResponse, ProxyError>
where
    S: Service<GrpcRequest, Response = GrpcResponse, Error = ProxyError, Future = CallFuture>
        + Clone
        + Send
        + 'static,
{
    let malformed = |reason: String| ProxyError::MalformedMessage {
        message: request.method.input.full_name().to_string(),
        reason,
    };
    let asked = ListNamespacesRequest::decode(request.message.as_ref())
        .map_err(|e| malformed(e.to_string()))?;
    let page_size = match usize::try_from(asked.page_size) {
        Ok(0) | Err(_) => DEFAULT_PAGE_SIZE,
        Ok(n) => n.min(MAX_PAGE_SIZE),
    };
    let include_deleted = asked
        .namespace_filter
        .as_ref()
        .is_some_and(|f| f.include_deleted);
    let start = if asked.next_page_token.is_empty() {
        None
    } else {
        let name = asked
            .next_page_token
            .strip_prefix(TOKEN_PREFIX)
            .and_then(|n| std::str::from_utf8(n).ok())
            .ok_or_else(|| malformed("next_page_token is not one this proxy issued".into()))?;
        Some(name.to_string())
    };
    let from = start
        .as_deref()
        .map_or(0, |s| names.partition_point(|n| n.as_str() < s));
    let page: Vec<&String> = names.iter().skip(from).take(page_size).collect();
    let next = names.get(from + page.len());
    let describe = describe_method()?;

    let mut out = Vec::new();
    let mut first_error = None;
    let mut answered = 0usize;
    for name in &page {
        let fetch = fetch_description(inner.clone(), describe, &request, name);
        match cache.try_get_with((*name).clone(), fetch).await {
            Ok(bytes) => {
                answered += 1;
                let deleted = DescribeNamespaceResponse::decode(bytes.as_ref())
                    .ok()
                    .and_then(|d| d.namespace_info)
                    .is_some_and(|i| i.state == STATE_DELETED);
                if deleted && !include_deleted {
                    continue;
                }
                wire::put_len_field(&mut out, 1, &bytes);
            }
            Err(error) => {
                tracing::warn!(namespace = %name, error = %error, "ListNamespaces: the namespace's upstream did not describe it; left out");
                if first_error.is_none() {
                    first_error = Some(((*name).clone(), error));
                }
            }
        }
    }
    if answered == 0 {
        if let Some((name, error)) = first_error {
            return Err(ProxyError::UpstreamUnavailable {
                upstream: format!("the upstream of namespace {name}"),
                address: "ListNamespaces".into(),
                reason: format!(
                    "ListNamespaces: no namespace of the page could be described: {error}"
                ),
            });
        }
    }
    if let Some(next) = next {
        let mut token = TOKEN_PREFIX.to_vec();
        token.extend_from_slice(next.as_bytes());
        wire::put_len_field(&mut out, 2, &token);
    }
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    Ok(GrpcResponse {
        headers,
        message: Some(Bytes::from(out)),
        trailers,
        foreign_namespaces: Vec::new(),
    })
}

fn describe_method() -> Result<&'static MethodInfo, ProxyError> {
    Schema::global()
        .method(DESCRIBE_NAMESPACE)
        .ok_or_else(|| ProxyError::UnknownMethod(DESCRIBE_NAMESPACE.to_string()))
}

/// `DescribeNamespace` for `name` at its upstream, as the caller's call would go (deadline,
/// headers), through the stages below.
async fn fetch_description<S>(
    inner: S,
    method: &'static MethodInfo,
    list: &GrpcRequest,
    name: &str,
) -> Result<Bytes, ProxyError>
where
    S: Service<GrpcRequest, Response = GrpcResponse, Error = ProxyError, Future = CallFuture>,
{
    let mut headers = list.headers.clone();
    let value = HeaderValue::from_str(name).map_err(|_| ProxyError::MalformedMessage {
        message: method.input.full_name().to_string(),
        reason: "namespace is not a valid header value".into(),
    })?;
    headers.insert(TEMPORAL_NAMESPACE, value);
    let request = Box::new(CallRequest {
        method,
        headers,
        message: Bytes::from(
            DescribeNamespaceRequest {
                namespace: name.to_string(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        deadline: list.deadline,
        namespace: Some(name.to_string()),
        targets: Vec::new(),
        peer: list.peer.clone(),
    });
    let response = inner.oneshot(request).await?;
    if let Some(status) = response
        .trailers
        .get("grpc-status")
        .or_else(|| response.headers.get("grpc-status"))
    {
        if status.as_bytes() != b"0" {
            let message = response
                .trailers
                .get("grpc-message")
                .or_else(|| response.headers.get("grpc-message"))
                .map(|m| crate::grpc::headers::percent_decode(m.as_bytes()))
                .unwrap_or_default();
            return Err(ProxyError::UpstreamProtocol {
                upstream: name.to_string(),
                reason: format!(
                    "DescribeNamespace answered grpc-status {}: {message}",
                    String::from_utf8_lossy(status.as_bytes())
                ),
            });
        }
    }
    response
        .message
        .ok_or_else(|| ProxyError::UpstreamProtocol {
            upstream: name.to_string(),
            reason: "DescribeNamespace answered no message".into(),
        })
}
