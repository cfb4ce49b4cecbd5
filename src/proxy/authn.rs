//! Per-call authentication when bearer tokens are on: a call needs a verified client certificate
//! or a valid `authorization: Bearer <jwt>`. A token, when sent, must verify (no falling back to
//! the certificate), and it names the caller for this call. The `authorization` header is removed
//! here, valid or not: the caller's token is never forwarded upstream.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::AUTHORIZATION;
use tower::{Layer, Service, ServiceExt};

use super::{CallFuture, GrpcRequest, GrpcResponse};
use crate::authz::{BearerError, BearerVerifier};
use crate::error::ProxyError;
use crate::tls::PeerInfo;

#[derive(Clone)]
pub struct AuthnLayer {
    verifier: Arc<BearerVerifier>,
}

impl AuthnLayer {
    pub fn new(verifier: Arc<BearerVerifier>) -> Self {
        AuthnLayer { verifier }
    }
}

impl<S> Layer<S> for AuthnLayer {
    type Service = AuthnService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthnService {
            inner,
            verifier: self.verifier.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthnService<S> {
    inner: S,
    verifier: Arc<BearerVerifier>,
}

impl<S> Service<GrpcRequest> for AuthnService<S>
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

    fn call(&mut self, mut request: GrpcRequest) -> CallFuture {
        let verifier = self.verifier.clone();
        let inner = self.inner.clone();
        Box::pin(async move {
            let presented = request.headers.get_all(AUTHORIZATION).iter().count();
            let header = request.headers.remove(AUTHORIZATION);
            let unauthenticated = |e: BearerError| ProxyError::Unauthenticated(e.to_string());
            match header {
                Some(_) if presented > 1 => return Err(unauthenticated(BearerError::Ambiguous)),
                Some(value) => {
                    let identity = verifier
                        .verify_header(&value)
                        .await
                        .map_err(unauthenticated)?;
                    request.peer = Arc::new(PeerInfo {
                        token: Some(Arc::new(identity)),
                        ..PeerInfo::clone(&request.peer)
                    });
                }
                None if request.peer.has_certificate => {}
                None => {
                    return Err(ProxyError::Unauthenticated(
                        "a verified client certificate or a bearer token is required".into(),
                    ))
                }
            }
            inner.oneshot(request).await
        })
    }
}
