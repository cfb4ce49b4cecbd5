//! Namespace translation: clients call a namespace `payments`, the upstream knows it as
//! `payments.a1b2c` (`upstream_namespace` on its `[[namespaces]]` entry).
//!
//! Requests: every namespace name in the body (top level, nested — batch operations,
//! ExecuteMultiOperation, commands, links, Nexus targets — found by
//! [`NamespaceFieldIndex`]) and the `temporal-namespace` header are rewritten to upstream
//! names. Responses and their error details: upstream names are rewritten back, so SDKs, the
//! CLI and the UI only ever see client-facing names.
//!
//! Where it sits: `… → Authz → Encrypt → Translate → Forwarder`. Everything before it —
//! authorization, the audit log, routing, the data keys and the envelope's associated data,
//! the KMS encryption context — works with the client-facing name, which is also what
//! [`GrpcRequest::namespace`] keeps all the way through: only the bytes that go upstream carry
//! the upstream name. Binding sealed payloads to the client-facing name means the upstream
//! namespace can be renamed or moved (another Cloud account, a migration) without orphaning a
//! single sealed payload or wrapped key; the client-facing name is the namespace's identity
//! in every policy, key and audit line, so it is the one the ciphertext commits to.
//!
//! Names are per upstream: the upstream name of a translated namespace maps back only in
//! answers from that namespace's upstream. Names that no entry translates pass unchanged. The
//! upstream name of a translated namespace is not a client-facing name: a request that uses one
//! (anywhere a namespace goes) is refused as an unknown namespace, so nobody reaches
//! `payments.a1b2c` around the policies written for `payments` — not even through
//! `routing.default_upstream`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll};

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD_NO_PAD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use tower::{Layer, Service, ServiceExt};

use super::{CallFuture, GrpcRequest, GrpcResponse};
use crate::config::Config;
use crate::error::ProxyError;
use crate::grpc::headers::{percent_decode, percent_encode, TEMPORAL_NAMESPACE};
use crate::payload::namespaces::{rewrite_namespaces, NameRewriteError, NamespaceFieldIndex};
use crate::payload::wire::{self, WireType};
use crate::schema::Scope;

const STATUS_DETAILS: &str = "grpc-status-details-bin";
const GRPC_MESSAGE: &str = "grpc-message";
const GRPC_STATUS: &str = "google.rpc.Status";
const LIST_NAMESPACES: &str = "/temporal.api.workflowservice.v1.WorkflowService/ListNamespaces";

/// Names of one upstream.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct UpstreamNames {
    /// Upstream name → client-facing name.
    to_client: HashMap<String, String>,
    /// Client-facing names translated to something else on this upstream, that are not
    /// themselves the upstream name of any entry: a namespace of that name on this upstream
    /// is unreachable through the proxy, and is left out of `ListNamespaces`.
    shadowed: HashSet<String>,
}

/// The translation table, from the config's `[[namespaces]]` entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceTranslation {
    /// Client-facing name → upstream name (translated entries only).
    to_upstream: HashMap<String, String>,
    /// Upstream names that are not client-facing names: refused in requests.
    reserved: HashSet<String>,
    /// Client-facing name → the upstream (config name) serving it.
    upstream_of: HashMap<String, String>,
    default_upstream: Option<String>,
    system_upstream: String,
    by_upstream: HashMap<String, UpstreamNames>,
}

impl NamespaceTranslation {
    /// `None` when no namespace is translated (the stage is then left out).
    pub fn from_config(config: &Config) -> Option<NamespaceTranslation> {
        let mut to_upstream = HashMap::new();
        let mut by_upstream: HashMap<String, UpstreamNames> = HashMap::new();
        for ns in &config.namespaces {
            let Some(upstream_name) = &ns.upstream_namespace else {
                continue;
            };
            if *upstream_name == ns.name {
                continue;
            }
            to_upstream.insert(ns.name.clone(), upstream_name.clone());
            by_upstream
                .entry(ns.upstream.clone())
                .or_default()
                .to_client
                .insert(upstream_name.clone(), ns.name.clone());
        }
        if to_upstream.is_empty() {
            return None;
        }
        let client_names: HashSet<&str> =
            config.namespaces.iter().map(|n| n.name.as_str()).collect();
        let reserved = to_upstream
            .values()
            .filter(|u| !client_names.contains(u.as_str()))
            .cloned()
            .collect();
        for ns in &config.namespaces {
            if !to_upstream.contains_key(&ns.name) {
                continue;
            }
            let effective_elsewhere = config.namespaces.iter().any(|other| {
                other.upstream == ns.upstream
                    && other.upstream_namespace.as_deref().unwrap_or(&other.name) == ns.name
            });
            if !effective_elsewhere {
                if let Some(names) = by_upstream.get_mut(&ns.upstream) {
                    names.shadowed.insert(ns.name.clone());
                }
            }
        }
        Some(NamespaceTranslation {
            to_upstream,
            reserved,
            upstream_of: config
                .namespaces
                .iter()
                .map(|n| (n.name.clone(), n.upstream.clone()))
                .collect(),
            default_upstream: config.routing.default_upstream.clone(),
            system_upstream: config.routing.system_upstream.clone(),
            by_upstream,
        })
    }

    /// A client-facing name as the upstream knows it: `Ok(None)` unchanged, `Err` when the
    /// name is the upstream name of a translated namespace (not a name clients may use).
    pub fn to_upstream(&self, name: &str) -> Result<Option<&str>, ProxyError> {
        if self.reserved.contains(name) {
            return Err(ProxyError::UnknownNamespace(name.to_string()));
        }
        Ok(self.to_upstream.get(name).map(String::as_str))
    }

    /// An upstream name, as clients know it, in an answer from `upstream`.
    pub fn to_client(&self, upstream: &str, name: &str) -> Option<&str> {
        self.by_upstream
            .get(upstream)?
            .to_client
            .get(name)
            .map(String::as_str)
    }

    /// The client-facing name of `name`, for callers that may know only the upstream name (a
    /// Web UI or CLI talking to the upstream directly, asking the codec server to decode):
    /// a client-facing name is itself; the upstream name of one translated namespace is that
    /// namespace's client-facing name; an upstream name that two translated namespaces share
    /// (on different upstreams) cannot be told apart and is refused; others are unchanged.
    pub fn client_name_for<'a>(&'a self, name: &'a str) -> Result<&'a str, String> {
        if self.upstream_of.contains_key(name) {
            return Ok(name);
        }
        let mut clients = self
            .by_upstream
            .values()
            .filter_map(|names| names.to_client.get(name));
        match (clients.next(), clients.next()) {
            (Some(client), None) => Ok(client),
            (Some(_), Some(_)) => Err(format!(
                "namespace {name:?} is the upstream name of several namespaces: use its client-facing name"
            )),
            (None, _) => Ok(name),
        }
    }

    /// The upstream (config name) that answers `request`.
    fn upstream_for(&self, request: &GrpcRequest) -> Option<&str> {
        match (request.method.scope, request.namespace.as_deref()) {
            (Scope::Cluster, _) => Some(&self.system_upstream),
            (Scope::Namespace, Some(ns)) => self
                .upstream_of
                .get(ns)
                .or(self.default_upstream.as_ref())
                .map(String::as_str),
            (Scope::Namespace, None) => None,
        }
    }
}

/// The translation in force; [`TranslationStore::replace`] swaps it (for config reloads).
#[derive(Debug)]
pub struct TranslationStore {
    current: RwLock<Arc<NamespaceTranslation>>,
}

impl TranslationStore {
    pub fn new(translation: NamespaceTranslation) -> Arc<TranslationStore> {
        Arc::new(TranslationStore {
            current: RwLock::new(Arc::new(translation)),
        })
    }

    pub fn current(&self) -> Arc<NamespaceTranslation> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn replace(&self, translation: NamespaceTranslation) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(translation);
    }
}

#[derive(Clone)]
pub struct TranslateLayer {
    store: Arc<TranslationStore>,
}

impl TranslateLayer {
    pub fn new(store: Arc<TranslationStore>) -> Self {
        TranslateLayer { store }
    }
}

impl<S> Layer<S> for TranslateLayer {
    type Service = TranslateService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        TranslateService {
            inner,
            store: self.store.clone(),
        }
    }
}

#[derive(Clone)]
pub struct TranslateService<S> {
    inner: S,
    store: Arc<TranslationStore>,
}

impl<S> Service<GrpcRequest> for TranslateService<S>
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
        let translation = self.store.current();
        let inner = self.inner.clone();
        Box::pin(async move {
            translate_request(&translation, &mut request)?;
            let upstream = translation.upstream_for(&request).map(str::to_owned);
            let own = request.namespace.clone();
            let method = request.method;
            let mut response = inner.oneshot(request).await?;
            if let Some(upstream) = upstream {
                let names = ResponseNames {
                    translation: &translation,
                    upstream: &upstream,
                    own: own.as_deref(),
                };
                names.translate(
                    method.output.full_name(),
                    method.path == LIST_NAMESPACES,
                    &mut response,
                )?;
            }
            Ok(response)
        })
    }
}

/// Rewrites the body's namespace names and the `temporal-namespace` header to upstream names.
pub fn translate_request(
    translation: &NamespaceTranslation,
    request: &mut GrpcRequest,
) -> Result<(), ProxyError> {
    let message_type = request.method.input.full_name();
    let mut map = |name: &str| match translation.to_upstream(name) {
        Ok(new) => Ok(new.map(str::to_owned)),
        Err(_) => Err(name.to_owned()),
    };
    match rewrite_namespaces(
        NamespaceFieldIndex::global(),
        message_type,
        &request.message,
        &mut map,
    ) {
        Ok(Some(rewritten)) => request.message = Bytes::from(rewritten),
        Ok(None) => {}
        Err(NameRewriteError::Refused(name)) => return Err(ProxyError::UnknownNamespace(name)),
        Err(e) => {
            return Err(ProxyError::MalformedMessage {
                message: message_type.to_string(),
                reason: e.to_string(),
            })
        }
    }
    if let Some(header) = request.headers.get(TEMPORAL_NAMESPACE) {
        let name = String::from_utf8_lossy(header.as_bytes()).into_owned();
        if let Some(upstream_name) = translation.to_upstream(&name)? {
            let value =
                HeaderValue::from_str(upstream_name).map_err(|_| ProxyError::MalformedMessage {
                    message: message_type.to_string(),
                    reason: "upstream namespace is not a valid header value".into(),
                })?;
            request.headers.insert(TEMPORAL_NAMESPACE, value);
        }
    }
    Ok(())
}

/// Translates an answer from one upstream back to client-facing names.
struct ResponseNames<'a> {
    translation: &'a NamespaceTranslation,
    upstream: &'a str,
    /// The call's own (client-facing) namespace, for error message texts.
    own: Option<&'a str>,
}

impl ResponseNames<'_> {
    fn names(&self) -> Option<&UpstreamNames> {
        self.translation
            .by_upstream
            .get(self.upstream)
            .filter(|n| !n.to_client.is_empty())
    }

    fn rewrite(&self, message_type: &str, message: &[u8]) -> Result<Option<Vec<u8>>, ProxyError> {
        let mut map = |name: &str| {
            Ok(self
                .translation
                .to_client(self.upstream, name)
                .map(str::to_owned))
        };
        rewrite_namespaces(
            NamespaceFieldIndex::global(),
            message_type,
            message,
            &mut map,
        )
        .map_err(|e| ProxyError::UpstreamProtocol {
            upstream: self.upstream.to_string(),
            reason: format!("cannot translate namespace names in {message_type}: {e}"),
        })
    }

    fn translate(
        &self,
        message_type: &str,
        list_namespaces: bool,
        response: &mut GrpcResponse,
    ) -> Result<(), ProxyError> {
        let Some(names) = self.names() else {
            return Ok(());
        };
        if let Some(message) = &response.message {
            let mut body = message.clone();
            if list_namespaces && !names.shadowed.is_empty() {
                body = drop_shadowed(&body, &names.shadowed).map_err(|e| {
                    ProxyError::UpstreamProtocol {
                        upstream: self.upstream.to_string(),
                        reason: format!("malformed ListNamespacesResponse: {e}"),
                    }
                })?;
            }
            if let Some(rewritten) = self.rewrite(message_type, &body)? {
                body = Bytes::from(rewritten);
            }
            response.message = Some(body);
        }
        self.translate_status(&mut response.headers)?;
        self.translate_status(&mut response.trailers)?;
        Ok(())
    }

    /// `grpc-status-details-bin` (NamespaceNotFoundFailure and friends, the Status message)
    /// and `grpc-message`.
    fn translate_status(&self, headers: &mut HeaderMap) -> Result<(), ProxyError> {
        let own = self.own.and_then(|own| {
            let upstream_name = self.translation.to_upstream.get(own)?;
            Some((upstream_name.as_str(), own))
        });
        if let (Some((from, to)), Some(value)) = (own, headers.get(GRPC_MESSAGE)) {
            let text = percent_decode(value.as_bytes());
            if let Some(replaced) = replace_name(&text, from, to) {
                if let Ok(value) = HeaderValue::from_str(&percent_encode(&replaced)) {
                    headers.insert(GRPC_MESSAGE, value);
                }
            }
        }
        let Some(value) = headers.get(STATUS_DETAILS) else {
            return Ok(());
        };
        let Ok(raw) = LENIENT_BASE64.decode(value.as_bytes()) else {
            // Not ours to judge: details that do not decode pass through untouched.
            return Ok(());
        };
        let mut details = self
            .rewrite(GRPC_STATUS, &raw)?
            .unwrap_or_else(|| raw.clone());
        if let Some((from, to)) = own {
            details = replace_status_message(&details, from, to).unwrap_or(details);
        }
        if details != raw {
            if let Ok(value) = HeaderValue::from_str(&STANDARD_NO_PAD.encode(details)) {
                headers.insert(STATUS_DETAILS, value);
            }
        }
        Ok(())
    }
}

/// gRPC peers send `-bin` headers with or without padding.
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Leaves out of a ListNamespacesResponse (`namespaces` = 1 → `namespace_info` = 1 → `name` =
/// 1) the entries whose upstream name is shadowed.
fn drop_shadowed(message: &[u8], shadowed: &HashSet<String>) -> Result<Bytes, wire::WireError> {
    let name_of = |entry: &[u8]| -> Result<Option<Vec<u8>>, wire::WireError> {
        let mut info = None;
        for field in wire::fields(entry) {
            let field = field?;
            if field.number == 1 && field.wire_type == WireType::Len {
                info = Some(field.value);
            }
        }
        let Some(info) = info else { return Ok(None) };
        let mut name = None;
        for field in wire::fields(info) {
            let field = field?;
            if field.number == 1 && field.wire_type == WireType::Len {
                name = Some(field.value.to_vec());
            }
        }
        Ok(name)
    };
    let mut out = Vec::with_capacity(message.len());
    for field in wire::fields(message) {
        let field = field?;
        if field.number == 1 && field.wire_type == WireType::Len {
            let hidden = name_of(field.value)?
                .and_then(|n| String::from_utf8(n).ok())
                .is_some_and(|n| shadowed.contains(&n));
            if hidden {
                continue;
            }
        }
        out.extend_from_slice(field.raw);
    }
    Ok(Bytes::from(out))
}

/// Characters of a namespace name, for finding whole names in a text.
fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')
}

/// Replaces whole occurrences of the name `from` in `text` by `to` ("namespace payments.a1b2c
/// is not found." → "namespace payments is not found."). `None`: no occurrence.
fn replace_name(text: &str, from: &str, to: &str) -> Option<String> {
    if from.is_empty() {
        return None;
    }
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    for (at, _) in text.match_indices(from) {
        if at < copied {
            continue;
        }
        let end = at + from.len();
        let before = at == 0 || bytes.get(at - 1).is_some_and(|b| !is_name_byte(*b));
        // A '.' right after the name ends a sentence unless a name continues after it.
        let after = match bytes.get(end) {
            None => true,
            Some(b'.') => bytes.get(end + 1).is_none_or(|b| !is_name_byte(*b)),
            Some(b) => !is_name_byte(*b),
        };
        if before && after {
            out.push_str(text.get(copied..at)?);
            out.push_str(to);
            copied = end;
        }
    }
    if copied == 0 {
        return None;
    }
    out.push_str(text.get(copied..)?);
    Some(out)
}

/// `google.rpc.Status.message` (field 2) with the name replaced.
fn replace_status_message(status: &[u8], from: &str, to: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(status.len());
    let mut changed = false;
    for field in wire::fields(status) {
        let field = field.ok()?;
        if field.number == 2 && field.wire_type == WireType::Len {
            if let Some(text) = std::str::from_utf8(field.value)
                .ok()
                .and_then(|t| replace_name(t, from, to))
            {
                wire::put_len_field(&mut out, 2, text.as_bytes());
                changed = true;
                continue;
            }
        }
        out.extend_from_slice(field.raw);
    }
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use crate::proxy::CallRequest;
    use std::sync::Mutex;

    use prost::Message;
    use temporalio_protos::google::rpc::Status;
    use temporalio_protos::temporal::api::errordetails::v1::NamespaceNotFoundFailure;
    use temporalio_protos::temporal::api::namespace::v1::NamespaceInfo;
    use temporalio_protos::temporal::api::workflowservice::v1::{
        DescribeNamespaceRequest, DescribeNamespaceResponse, ListNamespacesResponse,
        SignalWithStartWorkflowExecutionRequest,
    };

    use super::*;
    use crate::schema::Schema;

    const CONFIG: &str = r#"
        [listener]
        address = "127.0.0.1:7443"
        plaintext = true
        [upstreams.cloud]
        address = "127.0.0.1:7233"
        [upstreams.other]
        address = "127.0.0.1:7234"
        [routing]
        system_upstream = "cloud"
        default_upstream = "cloud"
        [[namespaces]]
        name = "payments"
        upstream = "cloud"
        upstream_namespace = "payments-up"
        [[namespaces]]
        name = "orders"
        upstream = "cloud"
        [[namespaces]]
        name = "eu"
        upstream = "other"
        upstream_namespace = "payments-up"
        [authorization]
        disabled = true
        [encryption]
        disabled = true
    "#;

    fn translation() -> NamespaceTranslation {
        NamespaceTranslation::from_config(&Config::from_toml(CONFIG).unwrap()).unwrap()
    }

    const DESCRIBE: &str = "/temporal.api.workflowservice.v1.WorkflowService/DescribeNamespace";
    const SIGNAL_WITH_START: &str =
        "/temporal.api.workflowservice.v1.WorkflowService/SignalWithStartWorkflowExecution";

    fn request(path: &str, message: Vec<u8>, namespace: Option<&str>) -> GrpcRequest {
        let mut headers = HeaderMap::new();
        if let Some(ns) = namespace {
            headers.insert(TEMPORAL_NAMESPACE, HeaderValue::from_str(ns).unwrap());
        }
        Box::new(CallRequest {
            method: Schema::global().method(path).unwrap(),
            headers,
            message: Bytes::from(message),
            deadline: None,
            namespace: namespace.map(str::to_owned),
            targets: Vec::new(),
            peer: Arc::default(),
        })
    }

    #[test]
    fn the_table_is_per_upstream() {
        let t = translation();
        assert_eq!(t.to_upstream("payments").unwrap(), Some("payments-up"));
        assert_eq!(t.to_upstream("eu").unwrap(), Some("payments-up"));
        assert_eq!(t.to_upstream("orders").unwrap(), None);
        assert_eq!(t.to_upstream("unlisted").unwrap(), None);
        // The upstream name is no client-facing name.
        assert!(matches!(
            t.to_upstream("payments-up"),
            Err(ProxyError::UnknownNamespace(_))
        ));
        assert_eq!(t.to_client("cloud", "payments-up"), Some("payments"));
        assert_eq!(t.to_client("other", "payments-up"), Some("eu"));
        assert_eq!(t.to_client("cloud", "orders"), None);
        assert!(t.by_upstream["cloud"].shadowed.contains("payments"));
        assert!(t.by_upstream["other"].shadowed.contains("eu"));
        // No translated entry: no stage.
        let plain = CONFIG.replace("upstream_namespace = \"payments-up\"", "");
        assert!(NamespaceTranslation::from_config(&Config::from_toml(&plain).unwrap()).is_none());
    }

    #[test]
    fn the_codec_can_name_a_namespace_by_its_upstream_name() {
        let t = translation();
        assert_eq!(t.client_name_for("payments"), Ok("payments"));
        assert_eq!(t.client_name_for("orders"), Ok("orders"));
        assert_eq!(t.client_name_for("unlisted"), Ok("unlisted"));
        // payments-up is both cloud's `payments` and other's `eu`.
        assert!(t.client_name_for("payments-up").is_err());
        let one = CONFIG.replace(
            "name = \"eu\"\n        upstream = \"other\"\n        upstream_namespace = \"payments-up\"",
            "name = \"eu\"\n        upstream = \"other\"\n        upstream_namespace = \"eu-up\"",
        );
        assert_ne!(one, CONFIG);
        let t = NamespaceTranslation::from_config(&Config::from_toml(&one).unwrap()).unwrap();
        assert_eq!(t.client_name_for("payments-up"), Ok("payments"));
        assert_eq!(t.client_name_for("eu-up"), Ok("eu"));
    }

    #[test]
    fn requests_carry_upstream_names_and_keep_the_client_name_for_the_pipeline() {
        let t = translation();
        let body = SignalWithStartWorkflowExecutionRequest {
            namespace: "payments".into(),
            workflow_id: "w".into(),
            ..Default::default()
        };
        let mut r = request(SIGNAL_WITH_START, body.encode_to_vec(), Some("payments"));
        translate_request(&t, &mut r).unwrap();
        let sent = SignalWithStartWorkflowExecutionRequest::decode(r.message.as_ref()).unwrap();
        assert_eq!(sent.namespace, "payments-up");
        assert_eq!(sent.workflow_id, "w");
        assert_eq!(r.headers[TEMPORAL_NAMESPACE], "payments-up");
        assert_eq!(
            r.namespace.as_deref(),
            Some("payments"),
            "routing, keys, AD"
        );

        // Untranslated: untouched.
        let body = DescribeNamespaceRequest {
            namespace: "orders".into(),
            ..Default::default()
        };
        let mut r = request(DESCRIBE, body.encode_to_vec(), Some("orders"));
        let before = r.message.clone();
        translate_request(&t, &mut r).unwrap();
        assert_eq!(r.message, before);
        assert_eq!(r.headers[TEMPORAL_NAMESPACE], "orders");

        // The upstream name, in the body or only in the header: unknown namespace.
        let body = DescribeNamespaceRequest {
            namespace: "payments-up".into(),
            ..Default::default()
        };
        let mut r = request(DESCRIBE, body.encode_to_vec(), Some("payments-up"));
        let err = translate_request(&t, &mut r).unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
        let mut r = request(
            "/temporal.api.workflowservice.v1.WorkflowService/GetSystemInfo",
            Vec::new(),
            None,
        );
        r.headers
            .insert(TEMPORAL_NAMESPACE, HeaderValue::from_static("payments-up"));
        assert!(translate_request(&t, &mut r).is_err());
    }

    /// What the fake upstream saw, and the answer it gives.
    #[derive(Clone)]
    struct FakeUpstream {
        seen: Arc<Mutex<Vec<GrpcRequest>>>,
        answer: GrpcResponse,
    }

    impl Service<GrpcRequest> for FakeUpstream {
        type Response = GrpcResponse;
        type Error = ProxyError;
        type Future = CallFuture;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: GrpcRequest) -> CallFuture {
            self.seen.lock().unwrap().push(request);
            let answer = self.answer.clone();
            Box::pin(async move { Ok(answer) })
        }
    }

    fn stage(
        answer: GrpcResponse,
    ) -> (TranslateService<FakeUpstream>, Arc<Mutex<Vec<GrpcRequest>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let upstream = FakeUpstream {
            seen: seen.clone(),
            answer,
        };
        let layer = TranslateLayer::new(TranslationStore::new(translation()));
        (layer.layer(upstream), seen)
    }

    fn describe(name: &str) -> DescribeNamespaceResponse {
        DescribeNamespaceResponse {
            namespace_info: Some(NamespaceInfo {
                name: name.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn answers_and_error_details_come_back_with_client_names() {
        let status = Status {
            code: 5,
            message: "Namespace payments-up is not found.".into(),
            details: vec![prost_wkt_types::Any {
                type_url:
                    "type.googleapis.com/temporal.api.errordetails.v1.NamespaceNotFoundFailure"
                        .into(),
                value: NamespaceNotFoundFailure {
                    namespace: "payments-up".into(),
                }
                .encode_to_vec(),
            }],
        };
        let mut trailers = HeaderMap::new();
        trailers.insert(
            STATUS_DETAILS,
            HeaderValue::from_str(&STANDARD_NO_PAD.encode(status.encode_to_vec())).unwrap(),
        );
        trailers.insert(
            GRPC_MESSAGE,
            HeaderValue::from_static("Namespace payments-up is not found.%0Asee payments-upx"),
        );
        let answer = GrpcResponse {
            headers: HeaderMap::new(),
            message: Some(Bytes::from(describe("payments-up").encode_to_vec())),
            trailers,
            foreign_namespaces: Vec::new(),
        };
        let (mut stage, seen) = stage(answer);
        let body = DescribeNamespaceRequest {
            namespace: "payments".into(),
            ..Default::default()
        };
        let response = stage
            .call(request(DESCRIBE, body.encode_to_vec(), Some("payments")))
            .await
            .unwrap();
        let sent = seen.lock().unwrap()[0].clone();
        assert_eq!(
            DescribeNamespaceRequest::decode(sent.message.as_ref())
                .unwrap()
                .namespace,
            "payments-up"
        );
        let answer = DescribeNamespaceResponse::decode(response.message.unwrap().as_ref()).unwrap();
        assert_eq!(answer, describe("payments"));
        let details = LENIENT_BASE64
            .decode(response.trailers[STATUS_DETAILS].as_bytes())
            .unwrap();
        let details = Status::decode(details.as_slice()).unwrap();
        assert_eq!(details.message, "Namespace payments is not found.");
        let failure =
            NamespaceNotFoundFailure::decode(details.details[0].value.as_slice()).unwrap();
        assert_eq!(failure.namespace, "payments");
        assert_eq!(
            response.trailers[GRPC_MESSAGE],
            "Namespace payments is not found.%0Asee payments-upx"
        );
    }

    /// ListNamespaces (system upstream "cloud"): the translated namespace appears under its
    /// client name; the upstream's own namespace of that client name is unreachable through
    /// the proxy and left out; others pass.
    #[tokio::test]
    async fn list_namespaces_shows_client_names_only() {
        let list = ListNamespacesResponse {
            namespaces: vec![
                describe("default"),
                describe("payments"),
                describe("payments-up"),
            ],
            next_page_token: vec![],
        };
        let (mut stage, _) = stage(GrpcResponse {
            message: Some(Bytes::from(list.encode_to_vec())),
            ..Default::default()
        });
        let response = stage
            .call(request(
                "/temporal.api.workflowservice.v1.WorkflowService/ListNamespaces",
                Vec::new(),
                None,
            ))
            .await
            .unwrap();
        let names: Vec<String> = ListNamespacesResponse::decode(response.message.unwrap().as_ref())
            .unwrap()
            .namespaces
            .into_iter()
            .filter_map(|n| n.namespace_info.map(|i| i.name))
            .collect();
        assert_eq!(names, ["default", "payments"]);
    }

    #[test]
    fn names_are_replaced_as_whole_words() {
        let r = |t: &str| replace_name(t, "payments.a1b2c", "payments");
        assert_eq!(
            r("Namespace payments.a1b2c is not found.").as_deref(),
            Some("Namespace payments is not found.")
        );
        assert_eq!(
            r("ends with payments.a1b2c.").as_deref(),
            Some("ends with payments.")
        );
        assert_eq!(r("payments.a1b2c").as_deref(), Some("payments"));
        assert_eq!(
            r("\"payments.a1b2c\", payments.a1b2c").as_deref(),
            Some("\"payments\", payments")
        );
        assert_eq!(r("xpayments.a1b2c"), None);
        assert_eq!(r("payments.a1b2c-2 payments.a1b2c.x"), None);
        assert_eq!(r("nothing here"), None);
        assert_eq!(replace_name("a", "", "b"), None);
    }

    #[test]
    fn grpc_message_percent_coding_round_trips() {
        let text = "Namespace ü 100% not found\nnext";
        let encoded = percent_encode(text);
        assert_eq!(encoded, "Namespace %C3%BC 100%25 not found%0Anext");
        assert_eq!(percent_decode(encoded.as_bytes()), text);
        // Malformed escapes are kept as they are.
        assert_eq!(percent_decode(b"50%z"), "50%z");
    }
}
