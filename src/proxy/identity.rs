//! Stamps the caller's verified identity into the request: the `identity` fields Temporal
//! records in history and visibility (per namespace: keep, replace or append; see
//! [`crate::identity`]), and the [`IDENTITY_HEADER`] header for upstreams that log headers.
//!
//! Sits right after authorization (`… → Authz → Identity → Encrypt → …`): the identity is the
//! one the decision and the audit line were made for, so the audit log and the history join
//! on it.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderValue;
use tower::{Layer, Service};

use super::{CallFuture, GrpcRequest, GrpcResponse};
use crate::authz::{identity_of, IdentitySource, PolicyStore};
use crate::config::Config;
use crate::error::ProxyError;
use crate::grpc::headers::{percent_encode, IDENTITY_HEADER_NAME};
use crate::identity::{stamp_identities, stamped, IdentityFieldIndex, IdentityMode};
use crate::tls::PeerInfo;

/// The verified identity of the caller, sent upstream on every call (percent-encoded UTF-8:
/// `spiffe://…`, `dns:…`, `email:…`, `cn:…`, `jwt:…` or `anonymous`). A caller's own header
/// of that name is dropped at the edge.
pub use crate::grpc::headers::IDENTITY_HEADER;

/// Identity modes by namespace, from the config's `[[namespaces]]` entries; swapped on reload.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IdentityModes {
    by_namespace: HashMap<String, IdentityMode>,
}

impl IdentityModes {
    pub fn from_config(config: &Config) -> IdentityModes {
        IdentityModes {
            by_namespace: config
                .namespaces
                .iter()
                .map(|ns| (ns.name.clone(), ns.identity))
                .collect(),
        }
    }

    /// A namespace's mode: its entry's, else `append` (unlisted namespaces and cluster calls).
    pub fn mode(&self, namespace: Option<&str>) -> IdentityMode {
        namespace
            .and_then(|ns| self.by_namespace.get(ns))
            .copied()
            .unwrap_or_default()
    }
}

/// Where the verified identity comes from: the policies' identity sources (reloaded with
/// them), or, with authorization off, the config's.
#[derive(Clone)]
pub enum IdentitySources {
    Policies(Arc<PolicyStore>),
    Fixed(Arc<[IdentitySource]>),
}

impl IdentitySources {
    /// The caller's typed identity, as authorization and the audit log name it.
    pub fn identity(&self, peer: &PeerInfo) -> String {
        match (&peer.token, self) {
            (Some(token), _) => token.identity.clone(),
            (None, IdentitySources::Policies(store)) => {
                crate::authz::caller_of(&store.current(), peer).0
            }
            (None, IdentitySources::Fixed(_)) if !peer.has_certificate => {
                crate::authz::policy::ANONYMOUS.to_string()
            }
            (None, IdentitySources::Fixed(sources)) => identity_of(&peer.names, sources),
        }
    }
}

#[derive(Debug)]
pub struct IdentityStore {
    current: RwLock<Arc<IdentityModes>>,
}

impl IdentityStore {
    pub fn new(modes: IdentityModes) -> Arc<IdentityStore> {
        Arc::new(IdentityStore {
            current: RwLock::new(Arc::new(modes)),
        })
    }

    pub fn current(&self) -> Arc<IdentityModes> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn replace(&self, modes: IdentityModes) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(modes);
    }
}

#[derive(Clone)]
pub struct IdentityLayer {
    store: Arc<IdentityStore>,
    sources: IdentitySources,
}

impl IdentityLayer {
    pub fn new(store: Arc<IdentityStore>, sources: IdentitySources) -> Self {
        IdentityLayer { store, sources }
    }
}

impl<S> Layer<S> for IdentityLayer {
    type Service = IdentityService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        IdentityService {
            inner,
            store: self.store.clone(),
            sources: self.sources.clone(),
        }
    }
}

#[derive(Clone)]
pub struct IdentityService<S> {
    inner: S,
    store: Arc<IdentityStore>,
    sources: IdentitySources,
}

impl<S> Service<GrpcRequest> for IdentityService<S>
where
    S: Service<GrpcRequest, Response = GrpcResponse, Error = ProxyError, Future = CallFuture>,
{
    type Response = GrpcResponse;
    type Error = ProxyError;
    type Future = CallFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: GrpcRequest) -> CallFuture {
        let verified = self.sources.identity(&request.peer);
        let mode = self.store.current().mode(request.namespace.as_deref());
        if let Err(error) = stamp_request(&mut request, mode, &verified) {
            return Box::pin(std::future::ready(Err(error)));
        }
        self.inner.call(request)
    }
}

/// Stamps `verified` into the request's identity fields (per `mode`) and its header.
pub fn stamp_request(
    request: &mut GrpcRequest,
    mode: IdentityMode,
    verified: &str,
) -> Result<(), ProxyError> {
    // gRPC metadata is printable ASCII: anything else (a CN in UTF-8) is percent-encoded, as
    // `grpc-message` is.
    let plain = verified
        .bytes()
        .all(|b| (0x20..=0x7e).contains(&b) && b != b'%');
    let header = if plain {
        HeaderValue::from_str(verified)
    } else {
        HeaderValue::from_str(&percent_encode(verified))
    }
    .map_err(|_| ProxyError::MalformedMessage {
        message: request.method.input.full_name().to_string(),
        reason: "the identity is not a valid header value".into(),
    })?;
    request.headers.insert(IDENTITY_HEADER_NAME.clone(), header);
    if mode == IdentityMode::Keep {
        return Ok(());
    }
    let message_type = request.method.input.full_name();
    let mut stamp = |client: &str| stamped(mode, client, verified).unwrap_or_default();
    match stamp_identities(
        IdentityFieldIndex::global(),
        message_type,
        &request.message,
        &mut stamp,
    ) {
        Ok(Some(rewritten)) => request.message = Bytes::from(rewritten),
        Ok(None) => {}
        Err(e) => {
            return Err(ProxyError::MalformedMessage {
                message: message_type.to_string(),
                reason: e.to_string(),
            })
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::proxy::CallRequest;
    use std::sync::Mutex;

    use prost::Message;
    use temporalio_protos::temporal::api::workflowservice::v1::{
        GetSystemInfoRequest, TerminateWorkflowExecutionRequest,
    };

    use super::*;
    use crate::schema::Schema;
    use crate::tls::CertificateNames;

    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<GrpcRequest>>>);

    impl Service<GrpcRequest> for Recorder {
        type Response = GrpcResponse;
        type Error = ProxyError;
        type Future = CallFuture;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, request: GrpcRequest) -> CallFuture {
            self.0.lock().unwrap().push(request);
            Box::pin(std::future::ready(Ok(GrpcResponse::default())))
        }
    }

    fn request(path: &str, message: Vec<u8>, namespace: Option<&str>, cn: &str) -> GrpcRequest {
        let mut headers = http::HeaderMap::new();
        headers.insert(IDENTITY_HEADER, HeaderValue::from_static("spoofed"));
        Box::new(CallRequest {
            method: Schema::global().method(path).unwrap(),
            headers,
            message: Bytes::from(message),
            deadline: None,
            namespace: namespace.map(str::to_owned),
            targets: Vec::new(),
            peer: Arc::new(PeerInfo {
                has_certificate: true,
                names: CertificateNames {
                    common_name: Some(cn.into()),
                    ..Default::default()
                },
                ..PeerInfo::default()
            }),
        })
    }

    const TERMINATE: &str =
        "/temporal.api.workflowservice.v1.WorkflowService/TerminateWorkflowExecution";

    #[tokio::test]
    async fn stamps_per_namespace_mode_and_always_sends_the_header() {
        let config = Config::from_toml(
            r#"
            [listener]
            address = "127.0.0.1:0"
            plaintext = true
            [upstreams.u]
            address = "127.0.0.1:7233"
            [routing]
            system_upstream = "u"
            [[namespaces]]
            name = "kept"
            upstream = "u"
            identity = "keep"
            [[namespaces]]
            name = "replaced"
            upstream = "u"
            identity = "replace"
            [[namespaces]]
            name = "appended"
            upstream = "u"
            [authorization]
            disabled = true
            [encryption]
            disabled = true
            "#,
        )
        .unwrap();
        let recorder = Recorder::default();
        let sources = IdentitySources::Fixed(Arc::from(vec![IdentitySource::Cn]));
        let mut stage = IdentityLayer::new(
            IdentityStore::new(IdentityModes::from_config(&config)),
            sources,
        )
        .layer(recorder.clone());
        for ns in ["kept", "replaced", "appended", "unlisted"] {
            let body = TerminateWorkflowExecutionRequest {
                namespace: ns.into(),
                identity: "cli@laptop".into(),
                ..Default::default()
            };
            stage
                .call(request(TERMINATE, body.encode_to_vec(), Some(ns), "ops é"))
                .await
                .unwrap();
        }
        stage
            .call(request(
                "/temporal.api.workflowservice.v1.WorkflowService/GetSystemInfo",
                GetSystemInfoRequest::default().encode_to_vec(),
                None,
                "ops é",
            ))
            .await
            .unwrap();
        let seen = recorder.0.lock().unwrap();
        let identities: Vec<String> = seen[..4]
            .iter()
            .map(|r| {
                TerminateWorkflowExecutionRequest::decode(r.message.as_ref())
                    .unwrap()
                    .identity
            })
            .collect();
        assert_eq!(
            identities,
            [
                "cli@laptop",
                "cn:ops é",
                "cli@laptop (via portcullis: cn:ops é)",
                "cli@laptop (via portcullis: cn:ops é)",
            ]
        );
        for r in seen.iter() {
            assert_eq!(r.headers.get_all(IDENTITY_HEADER).iter().count(), 1);
            assert_eq!(r.headers[IDENTITY_HEADER], "cn:ops %C3%A9");
        }
    }
}
