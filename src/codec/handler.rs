//! One codec request: CORS, route, authenticate, authorize, audit, then decode or encode.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_MAX_AGE, AUTHORIZATION, CONTENT_TYPE, ORIGIN, VARY,
    WWW_AUTHENTICATE,
};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use super::config::CodecConfig;
use super::json::{self, JsonError};
use super::{CodecDeps, CodecOptions, DEV_ANONYMOUS_IDENTITY};
use crate::authz::{caller_of, AccessLevel, AuditEvent, ClaimedRoles, Decision, PolicySet, Role};
use crate::crypto::CryptoError;
use crate::error::ProxyError;
use crate::payload::walker::NEXUS_ENDPOINT_SCOPE;
use crate::schema::Scope;
use crate::tls::PeerInfo;

const X_NAMESPACE: &str = "x-namespace";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    Decode,
    Encode,
}

impl Operation {
    fn level(self) -> AccessLevel {
        match self {
            Operation::Decode => AccessLevel::Read,
            Operation::Encode => AccessLevel::Write,
        }
    }

    fn audit_method(self) -> &'static str {
        match self {
            Operation::Decode => "codec/decode",
            Operation::Encode => "codec/encode",
        }
    }
}

struct Settings {
    allowed_origins: Vec<String>,
    max_request_bytes: usize,
    max_payloads: usize,
    timeout: Duration,
    options: CodecOptions,
}

/// The codec server's request handling, shared by every connection.
#[derive(Clone)]
pub struct CodecService {
    deps: CodecDeps,
    settings: Arc<Settings>,
}

impl CodecService {
    pub fn new(config: &CodecConfig, deps: CodecDeps, options: CodecOptions) -> CodecService {
        CodecService {
            deps,
            settings: Arc::new(Settings {
                allowed_origins: config.allowed_origins.clone(),
                max_request_bytes: config.max_request_bytes,
                max_payloads: config.max_payloads,
                timeout: Duration::from_secs(config.request_timeout_seconds),
                options,
            }),
        }
    }

    pub(super) fn for_peer(&self, peer: PeerInfo) -> PeerService {
        PeerService {
            inner: self.clone(),
            peer: Arc::new(peer),
        }
    }
}

/// The service for one connection (its peer is known).
#[derive(Clone)]
pub struct PeerService {
    inner: CodecService,
    peer: Arc<PeerInfo>,
}

type Reply = Response<Full<Bytes>>;

impl hyper::service::Service<Request<Incoming>> for PeerService {
    type Response = Reply;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Reply, std::convert::Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let origin = request.headers().get(ORIGIN).cloned();
            let timeout = this.inner.settings.timeout;
            let mut reply = match tokio::time::timeout(timeout, this.handle(request)).await {
                Ok(reply) => reply,
                Err(_) => error(
                    StatusCode::REQUEST_TIMEOUT,
                    "timeout",
                    &format!("the request took longer than {timeout:?}"),
                ),
            };
            this.inner.cors(origin.as_ref(), reply.headers_mut());
            Ok(reply)
        })
    }
}

/// A JSON error answer: `{"code": 401, "error": "unauthenticated", "message": "..."}`.
fn error(status: StatusCode, kind: &str, message: &str) -> Reply {
    let body = serde_json::json!({"code": status.as_u16(), "error": kind, "message": message});
    let mut reply = Response::new(Full::new(Bytes::from(body.to_string())));
    *reply.status_mut() = status;
    reply
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    reply
}

impl CodecService {
    fn origin_allowed(&self, origin: &HeaderValue) -> bool {
        self.settings
            .allowed_origins
            .iter()
            .any(|allowed| allowed.as_bytes() == origin.as_bytes())
    }

    /// Adds CORS headers to answers for allowed origins (errors too, so a page can read them).
    fn cors(&self, origin: Option<&HeaderValue>, headers: &mut HeaderMap) {
        headers.insert(VARY, HeaderValue::from_static("Origin"));
        if let Some(origin) = origin.filter(|o| self.origin_allowed(o)) {
            headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            headers.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
    }
}

impl PeerService {
    async fn handle(&self, request: Request<Incoming>) -> Reply {
        let service = &self.inner;
        let origin = request.headers().get(ORIGIN);
        // A browser page from an origin not on the list gets nothing, not even a decision.
        if origin.is_some_and(|o| !service.origin_allowed(o)) {
            return error(
                StatusCode::FORBIDDEN,
                "origin",
                "this origin may not call the codec server",
            );
        }
        let path = request.uri().path();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (path_namespace, operation) = match segments.as_slice() {
            ["decode"] => (None, Operation::Decode),
            ["encode"] => (None, Operation::Encode),
            [namespace, "decode"] => (Some(*namespace), Operation::Decode),
            [namespace, "encode"] => (Some(*namespace), Operation::Encode),
            _ => {
                return error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "the codec server serves POST /decode, /encode, /{namespace}/decode and /{namespace}/encode",
                )
            }
        };
        if request.method() == Method::OPTIONS {
            return preflight(request.headers());
        }
        if request.method() != Method::POST {
            let mut reply = error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method",
                "use POST (or OPTIONS for a CORS preflight)",
            );
            reply.headers_mut().insert(
                http::header::ALLOW,
                HeaderValue::from_static("POST, OPTIONS"),
            );
            return reply;
        }
        let named = match namespace_of(path_namespace, request.headers()) {
            Ok(named) => named,
            Err(message) => return error(StatusCode::BAD_REQUEST, "namespace", &message),
        };
        let target = match named {
            // The Web UI's cluster-level pages (Nexus endpoints) name no namespace: older UIs
            // send an empty X-Namespace, 2.54 the text `undefined`. Unless a namespace of that
            // name is configured, such a request is for the cluster scope.
            Named::Empty => Target::Cluster,
            Named::Namespace(ns)
                if ns == UI_NO_NAMESPACE && !service.deps.encryption.is_configured(&ns) =>
            {
                Target::Cluster
            }
            Named::Namespace(namespace) => {
                match service.deps.translation.as_ref().map(|t| t.current()) {
                    Some(translation) => match translation.client_name_for(&namespace) {
                        Ok(client) => Target::Namespace(client.to_string()),
                        Err(message) => {
                            return error(StatusCode::BAD_REQUEST, "namespace", &message)
                        }
                    },
                    None => Target::Namespace(namespace),
                }
            }
        };
        let namespace = target.scope().to_string();

        // Authenticate before reading the body.
        let peer = match self.authenticate(request.headers()).await {
            Ok(peer) => peer,
            Err(message) => {
                let mut reply = error(StatusCode::UNAUTHORIZED, "unauthenticated", &message);
                reply
                    .headers_mut()
                    .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return reply;
            }
        };
        let level = target.level(operation);
        let (identity, decision, credential) = self.decide(&peer, &target, level);
        let audit = |count: Option<usize>| {
            let mut event = AuditEvent::new(
                &identity,
                Some(&namespace),
                operation.audit_method(),
                level,
                &decision,
                &peer.remote,
            );
            event.credential = Some(credential);
            event.count = count;
            // Fail closed: a request whose decision cannot be audited is refused.
            service.deps.audit.record(&event).err().map(|e| {
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "audit_unavailable",
                    &format!("the audit log cannot take this request, so it is refused: {e}"),
                )
            })
        };
        if !decision.allowed {
            if let Some(reply) = audit(None) {
                return reply;
            }
            let required = decision.required.map_or("", Role::as_str);
            return error(
                StatusCode::FORBIDDEN,
                "permission_denied",
                &format!(
                    "{identity} may not {} payloads {}: it needs the {required} role{}",
                    match operation {
                        Operation::Decode => "decode",
                        Operation::Encode => "encode",
                    },
                    target.described(),
                    if target == Target::Cluster {
                        " on the cluster"
                    } else {
                        ""
                    },
                ),
            );
        }

        if let Some(content_type) = request.headers().get(CONTENT_TYPE) {
            let json = content_type.to_str().is_ok_and(|v| {
                v.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("application/json")
            });
            if !json {
                if let Some(reply) = audit(None) {
                    return reply;
                }
                return error(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "content_type",
                    "send Content-Type: application/json",
                );
            }
        }
        let limit = service.settings.max_request_bytes;
        let body = match Limited::new(request.into_body(), limit).collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                if let Some(reply) = audit(None) {
                    return reply;
                }
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    &format!("the request body exceeds {limit} bytes"),
                );
            }
            Err(e) => {
                if let Some(reply) = audit(None) {
                    return reply;
                }
                return error(
                    StatusCode::BAD_REQUEST,
                    "body",
                    &format!("reading the body: {e}"),
                );
            }
        };
        let (encoded, count) = match json::parse(&body, service.settings.max_payloads) {
            Ok(parsed) => parsed,
            Err(e) => {
                if let Some(reply) = audit(None) {
                    return reply;
                }
                let status = match e {
                    JsonError::TooMany { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                    JsonError::Malformed(_) => StatusCode::BAD_REQUEST,
                    JsonError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
                };
                return error(status, "malformed", &e.to_string());
            }
        };
        if let Some(reply) = audit(Some(count)) {
            return reply;
        }
        let encryption = &service.deps.encryption;
        let encoded = Bytes::from(encoded);
        let scoped = match (operation, &target) {
            (Operation::Decode, Target::Namespace(_)) => scoped_payloads(&encoded),
            _ => Vec::new(),
        };
        if scoped.iter().any(|s| *s) {
            // Nexus endpoint descriptions among a namespace's payloads (the CLI decodes them
            // with its namespace): they open under the cluster scope, for a cluster reader.
            let cluster_level = Target::Cluster.level(operation);
            let (_, decision, _) = self.decide(&peer, &Target::Cluster, cluster_level);
            let mut event = AuditEvent::new(
                &identity,
                Some(NEXUS_ENDPOINT_SCOPE),
                operation.audit_method(),
                cluster_level,
                &decision,
                &peer.remote,
            );
            event.credential = Some(credential);
            event.count = Some(scoped.iter().filter(|s| **s).count());
            if let Err(e) = service.deps.audit.record(&event) {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "audit_unavailable",
                    &format!("the audit log cannot take this request, so it is refused: {e}"),
                );
            }
            if !decision.allowed {
                let required = decision.required.map_or("", Role::as_str);
                return error(
                    StatusCode::FORBIDDEN,
                    "permission_denied",
                    &format!(
                        "{identity} may not decode Nexus endpoint descriptions: it needs the {required} role on the cluster"
                    ),
                );
            }
        }
        let result = match operation {
            Operation::Decode if scoped.iter().any(|s| *s) => {
                open_split(encryption, &namespace, &encoded, &scoped).await
            }
            Operation::Decode => encryption
                .open_lenient(&namespace, json::PAYLOADS, &encoded)
                .await
                .map(|opened| opened.message),
            Operation::Encode => encryption
                .seal(&namespace, &[], json::PAYLOADS, &encoded)
                .await
                .map(|sealed| sealed.map(|b| b.to_vec())),
        };
        let output = match result {
            Ok(Some(changed)) => Bytes::from(changed),
            Ok(None) => encoded,
            Err(e) => {
                tracing::info!(namespace, operation = operation.audit_method(), error = %e, "codec request failed");
                return crypto_error(&e);
            }
        };
        match json::render(&output) {
            Ok(body) => {
                let mut reply = Response::new(Full::new(Bytes::from(body)));
                reply
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                reply
            }
            Err(e) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                &e.to_string(),
            ),
        }
    }

    /// The caller, with the bearer token (if any) verified: a token, when sent, must verify.
    async fn authenticate(&self, headers: &HeaderMap) -> Result<PeerInfo, String> {
        let service = &self.inner;
        let mut peer = PeerInfo::clone(&self.peer);
        let mut tokens = headers.get_all(AUTHORIZATION).iter();
        if let Some(value) = tokens.next() {
            if tokens.next().is_some() {
                return Err("more than one Authorization header".into());
            }
            let Some(verifier) = &service.deps.bearer else {
                return Err(
                    "bearer tokens are not enabled on this server ([bearer] is not configured)"
                        .into(),
                );
            };
            let identity = verifier
                .verify_header(value)
                .await
                .map_err(|e| e.to_string())?;
            peer.token = Some(Arc::new(identity));
            return Ok(peer);
        }
        if peer.has_certificate {
            return Ok(peer);
        }
        if service.settings.options.dev_anonymous_reader && is_loopback_peer(&peer.remote) {
            peer.token = Some(Arc::new(crate::authz::BearerIdentity {
                identity: DEV_ANONYMOUS_IDENTITY.into(),
                roles: ClaimedRoles {
                    system: Some(Role::Reader),
                    namespaces: Default::default(),
                },
                expires_at: 0,
            }));
            return Ok(peer);
        }
        Err("send a bearer token (Authorization: Bearer <jwt>) or a client certificate".into())
    }

    fn decide(
        &self,
        peer: &PeerInfo,
        target: &Target,
        level: AccessLevel,
    ) -> (String, Decision, &'static str) {
        let (scope, namespace) = match target {
            Target::Namespace(ns) => (Scope::Namespace, Some(ns.as_str())),
            Target::Cluster => (Scope::Cluster, None),
        };
        let policies = match &self.inner.deps.policies {
            Some(store) => store.current(),
            None => {
                // Authorization disabled: authenticated callers may do everything, except that
                // the dev anonymous reader still only reads.
                let set = PolicySet::default()
                    .with_identity_sources(crate::authz::default_identity_sources());
                let (identity, claimed, credential) = caller_of(&set, peer);
                let anonymous = identity == DEV_ANONYMOUS_IDENTITY;
                let decision = if anonymous {
                    set.decide_for(&identity, claimed, scope, namespace, level)
                } else {
                    Decision {
                        allowed: true,
                        required: Role::required_for(level),
                        held: None,
                        reason: "authorization disabled",
                    }
                };
                return (
                    identity,
                    decision,
                    if anonymous { "none" } else { credential },
                );
            }
        };
        let (identity, claimed, credential) = caller_of(&policies, peer);
        let decision = policies.decide_for(&identity, claimed, scope, namespace, level);
        let credential = if identity == DEV_ANONYMOUS_IDENTITY {
            "none"
        } else {
            credential
        };
        (identity, decision, credential)
    }
}

fn is_loopback_peer(remote: &str) -> bool {
    remote
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|a| a.ip().is_loopback())
}

/// What the Web UI 2.54 sends as `X-Namespace` on pages that belong to no namespace.
const UI_NO_NAMESPACE: &str = "undefined";

/// What a request names: a namespace, or explicitly none (an empty `X-Namespace`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Named {
    Namespace(String),
    Empty,
}

/// Whose payloads a request decodes or encodes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Namespace(String),
    /// The cluster: Nexus endpoint descriptions, sealed under [`NEXUS_ENDPOINT_SCOPE`].
    Cluster,
}

impl Target {
    /// The key scope: the namespace, or the cluster scope.
    fn scope(&self) -> &str {
        match self {
            Target::Namespace(ns) => ns,
            Target::Cluster => NEXUS_ENDPOINT_SCOPE,
        }
    }

    fn described(&self) -> String {
        match self {
            Target::Namespace(ns) => format!("in namespace {ns}"),
            Target::Cluster => "of the cluster (Nexus endpoint descriptions)".into(),
        }
    }

    /// The level an operation needs: reader or writer in a namespace; on the cluster, reader
    /// to decode and admin to encode (as Temporal's Get and Create/UpdateNexusEndpoint).
    fn level(&self, operation: Operation) -> AccessLevel {
        match (self, operation) {
            (Target::Cluster, Operation::Encode) => AccessLevel::Admin,
            _ => operation.level(),
        }
    }
}

/// For each payload of a serialized Payloads, whether it is sealed under the Nexus endpoint
/// scope (its envelope says so; the associated data binds it).
fn scoped_payloads(payloads: &[u8]) -> Vec<bool> {
    crate::payload::wire::fields(payloads)
        .flatten()
        .filter(|f| f.number == 1)
        .map(|f| crate::crypto::envelope::scope_of(f.value) == Some(NEXUS_ENDPOINT_SCOPE))
        .collect()
}

/// Opens a Payloads whose payloads belong to two scopes (`scoped`: the endpoint scope) and puts
/// them back in their order. `Ok(None)`: nothing changed.
async fn open_split(
    encryption: &crate::proxy::Encryption,
    namespace: &str,
    payloads: &Bytes,
    scoped: &[bool],
) -> Result<Option<Vec<u8>>, ProxyError> {
    use crate::payload::wire::{fields, put_len_field};
    let items: Vec<&[u8]> = fields(payloads)
        .flatten()
        .filter(|f| f.number == 1)
        .map(|f| f.value)
        .collect();
    let mut parts: [(Vec<u8>, &str); 2] =
        [(Vec::new(), namespace), (Vec::new(), NEXUS_ENDPOINT_SCOPE)];
    for (item, in_scope) in items.iter().zip(scoped) {
        put_len_field(&mut parts[usize::from(*in_scope)].0, 1, item);
    }
    let mut opened: Vec<Vec<Vec<u8>>> = Vec::with_capacity(2);
    for (part, scope) in parts {
        let part = Bytes::from(part);
        let message = encryption
            .open_lenient(scope, json::PAYLOADS, &part)
            .await?
            .message
            .map_or(part, Bytes::from);
        opened.push(
            fields(&message)
                .flatten()
                .filter(|f| f.number == 1)
                .map(|f| f.value.to_vec())
                .collect(),
        );
    }
    let mut iters: Vec<_> = opened.into_iter().map(Vec::into_iter).collect();
    let mut out = Vec::with_capacity(payloads.len());
    for in_scope in scoped {
        let item = iters
            .get_mut(usize::from(*in_scope))
            .and_then(Iterator::next)
            .ok_or_else(|| ProxyError::Encryption("codec: opened payloads went missing".into()))?;
        put_len_field(&mut out, 1, &item);
    }
    Ok(Some(out))
}

/// The namespace from the path or `X-Namespace`; both present must agree. An empty
/// `X-Namespace` (and no path namespace) names none on purpose.
pub(crate) fn namespace_of(from_path: Option<&str>, headers: &HeaderMap) -> Result<Named, String> {
    let from_header = match headers.get(X_NAMESPACE) {
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| "X-Namespace is not valid text".to_string())?
                .trim(),
        ),
        None => None,
    };
    let namespace = match (from_path, from_header) {
        (None, Some("")) => return Ok(Named::Empty),
        (Some(path), Some(header)) if path != header => {
            return Err(format!(
                "the path names namespace {path:?} but X-Namespace says {header:?}"
            ))
        }
        (Some(ns), _) | (None, Some(ns)) => ns,
        (None, None) => {
            return Err(
                "no namespace: use /{namespace}/decode (or /encode) or send X-Namespace".into(),
            )
        }
    };
    let valid = !namespace.is_empty()
        && namespace.len() <= 255
        && namespace
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !valid {
        return Err(format!("{namespace:?} is not a valid namespace name"));
    }
    Ok(Named::Namespace(namespace.to_string()))
}

/// The answer to a CORS preflight from an allowed origin (others were refused already).
fn preflight(headers: &HeaderMap) -> Reply {
    let mut reply = Response::new(Full::new(Bytes::new()));
    *reply.status_mut() = StatusCode::NO_CONTENT;
    let out = reply.headers_mut();
    out.insert(
        ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, OPTIONS"),
    );
    out.insert(
        ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Authorization, Content-Type, X-Namespace"),
    );
    out.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    // Chromium's Private Network Access asks before a public page calls a private address.
    if headers
        .get("access-control-request-private-network")
        .is_some_and(|v| v == "true")
    {
        out.insert(
            "access-control-allow-private-network",
            HeaderValue::from_static("true"),
        );
    }
    reply
}

fn crypto_error(failure: &ProxyError) -> Reply {
    let (status, kind) = match failure {
        ProxyError::UnknownNamespace(_) => (StatusCode::NOT_FOUND, "namespace"),
        ProxyError::MessageTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
        ProxyError::MalformedMessage { .. } => (StatusCode::BAD_REQUEST, "malformed"),
        ProxyError::Crypto(CryptoError::ProviderUnavailable { .. }) => {
            (StatusCode::SERVICE_UNAVAILABLE, "key_provider")
        }
        ProxyError::Crypto(CryptoError::CannotOpen { .. } | CryptoError::MalformedEnvelope(_)) => {
            (StatusCode::UNPROCESSABLE_ENTITY, "cannot_open")
        }
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    };
    error(status, kind, &format!("portcullis: {failure}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_from_path_or_header() {
        let named = |n: &str| Named::Namespace(n.into());
        let mut headers = HeaderMap::new();
        assert!(namespace_of(None, &headers).is_err());
        assert_eq!(namespace_of(Some("a"), &headers).unwrap(), named("a"));
        headers.insert(X_NAMESPACE, HeaderValue::from_static("b"));
        assert_eq!(namespace_of(None, &headers).unwrap(), named("b"));
        assert!(namespace_of(Some("a"), &headers).is_err());
        assert_eq!(namespace_of(Some("b"), &headers).unwrap(), named("b"));
        assert!(namespace_of(Some("a%2Fb"), &HeaderMap::new()).is_err());
        // An empty X-Namespace names none on purpose (the Web UI's cluster pages).
        headers.insert(X_NAMESPACE, HeaderValue::from_static(""));
        assert_eq!(namespace_of(None, &headers).unwrap(), Named::Empty);
        assert!(namespace_of(Some("a"), &headers).is_err());
    }
}
