//! The call pipeline. The edge turns an HTTP/2 request into a [`GrpcRequest`] (one decoded
//! unary message), the stages below are tower services over that type, and the edge turns the
//! [`GrpcResponse`] or [`ProxyError`] back into HTTP/2.
//!
//! ```text
//! GrpcEdge (authenticate at HEADERS, budgets, body timeout) → NamespaceService → AuthzService
//!          → IdentityService → EncryptService → NamespaceListService → TranslateService
//!          → Forwarder
//! ```

mod authn;
pub mod connection;
mod edge;
pub mod encrypt;
mod forward;
pub mod identity;
pub mod limits;
pub mod list_namespaces;
mod namespace;
mod pipeline;
pub mod translate;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::HeaderMap;
use tokio::time::Instant;

pub use authn::{Authenticated, Authenticator, AuthnFailure};
pub use edge::{EdgeShared, GrpcEdge};
pub use encrypt::{EncryptLayer, Encryption, EncryptionLimits, NamespaceKey};
pub use forward::Forwarder;
pub use identity::{IdentityLayer, IdentityModes, IdentitySources, IdentityStore, IDENTITY_HEADER};
pub use list_namespaces::NamespaceListLayer;
pub use namespace::{NamespaceLayer, NamespaceService};
pub use pipeline::Pipeline;
pub use translate::{NamespaceTranslation, TranslateLayer, TranslationStore};

use crate::error::ProxyError;
use crate::payload::targets::CommandTarget;
use crate::schema::MethodInfo;
use crate::tls::PeerInfo;

/// One unary call on its way upstream, boxed: every stage's future holds the request (in its
/// captures and in the inner service's `Oneshot`), and a call waiting for its answer (a long
/// poll, for minutes) keeps all those futures; boxed, each holds a pointer instead of ~220 bytes.
pub type GrpcRequest = Box<CallRequest>;

/// What a [`GrpcRequest`] carries.
#[derive(Debug, Clone)]
pub struct CallRequest {
    pub method: &'static MethodInfo,
    /// The caller's headers that may go upstream (hop-by-hop and principal headers removed).
    pub headers: HeaderMap,
    /// The request message, uncompressed.
    pub message: Bytes,
    /// When the caller stops waiting, and the timeout it sent.
    pub deadline: Option<(Instant, Duration)>,
    /// The request's namespace, once read from its body (namespace-scoped methods only).
    pub namespace: Option<String>,
    /// Other namespaces the request acts on (commands that start a child, signal or cancel a
    /// workflow elsewhere), read from its body with the namespace: authorized, routed and
    /// sealed for each.
    pub targets: Vec<CommandTarget>,
    pub peer: Arc<PeerInfo>,
}

/// The upstream's answer to a unary call.
#[derive(Debug, Clone, Default)]
pub struct GrpcResponse {
    /// Response headers (for a trailers-only answer they carry `grpc-status`).
    pub headers: HeaderMap,
    /// The response message, uncompressed, if there is one.
    pub message: Option<Bytes>,
    pub trailers: HeaderMap,
    /// Namespaces other than the call's own whose sealed payloads the encryption stage opened
    /// in this answer (a child workflow's input and result in its parent's history):
    /// authorization checks that the caller may read them.
    pub foreign_namespaces: Vec<String>,
}

pub type CallFuture = BoxFuture<'static, Result<GrpcResponse, ProxyError>>;
