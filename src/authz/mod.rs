//! Identity-based authorization: every call is attributed to the caller's certificate identity
//! and allowed only when that identity holds the role the method needs in the request's
//! namespace (or on the cluster). Default deny.

pub mod access;
pub mod audit;
pub mod bearer;
pub mod policy;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use serde::{Deserialize, Serialize};
use tower::{Layer, Service};

pub use access::{required_access, AccessLevel};
pub use audit::{
    AuditError, AuditEvent, AuditLog, AuditSettings, AuditStats, EdgeAuditEvent, EdgeEventKind,
};
pub use bearer::{BearerConfig, BearerError, BearerIdentity, BearerVerifier};
pub use policy::{
    check_typed_entry, default_identity_sources, identity_of, ClaimedRoles, Decision, Grants,
    IdentitySource, NamespacePolicy, PolicyDocument, PolicyError, PolicySet, Role,
};

use crate::config::Config;
use crate::error::{CommandDenial, ProxyError};
use crate::payload::wire;
use crate::proxy::{CallFuture, GrpcRequest, GrpcResponse};
use crate::schema::Scope;
use crate::tls::PeerInfo;

/// Who is calling: the bearer token's identity and claimed roles when the call carried one,
/// else the certificate's identity under the policies' identity sources.
pub fn caller_of<'a>(
    policies: &PolicySet,
    peer: &'a PeerInfo,
) -> (String, Option<&'a ClaimedRoles>, &'static str) {
    match &peer.token {
        Some(token) => (token.identity.clone(), Some(&token.roles), "bearer"),
        None if peer.has_certificate => (policies.identity_of(&peer.names), None, "certificate"),
        None => (policy::ANONYMOUS.to_string(), None, "none"),
    }
}

/// The `[authorization]` section of the config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationConfig {
    /// Turn authorization off: every authenticated caller may do everything. Logged loudly.
    #[serde(default)]
    pub disabled: bool,
    /// Which certificate names identify a caller, in order of preference.
    #[serde(default = "default_identity_sources")]
    pub identity: Vec<IdentitySource>,
    /// Where decisions are written as JSON lines: "stdout", "stderr", "off", or a file path.
    #[serde(default = "default_audit")]
    pub audit_log: String,
    /// A TOML file with more `groups`, `system` and `namespaces` (reloaded on change).
    #[serde(default)]
    pub policy_file: Option<PathBuf>,
    /// A directory of namespace resources, one TOML file each (reloaded on change).
    #[serde(default)]
    pub policy_dir: Option<PathBuf>,
    #[serde(default)]
    pub groups: std::collections::BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub system: Grants,
    #[serde(default)]
    pub namespaces: Vec<NamespacePolicy>,
    /// Identities refused everything, whatever they are granted (see [`PolicyDocument::deny`]).
    #[serde(default)]
    pub deny: Vec<String>,
    /// Access levels for methods of a newer API schema (`[schema]`) that Temporal's table,
    /// built in, does not know: `"/package.Service/Method" = "read" | "write" | "admin" |
    /// "open"`. Methods nobody classified need cluster admin.
    #[serde(default)]
    pub method_access: BTreeMap<String, AccessLevel>,
}

fn default_audit() -> String {
    "stdout".into()
}

impl AuthorizationConfig {
    fn inline_document(&self) -> PolicyDocument {
        PolicyDocument {
            groups: self.groups.clone(),
            system: self.system.clone(),
            namespaces: self.namespaces.clone(),
            deny: self.deny.clone(),
        }
    }

    /// Checks the policies written in the section itself (not the policy file or directory,
    /// which are read at start and on reload): a config with an invalid entry does not load.
    pub fn validate_inline(&self) -> Result<(), PolicyError> {
        self.finish(PolicySet::compile(&self.inline_document())?)
            .map(|_| ())
    }

    /// Inline policies plus the policy file and directory, compiled.
    pub fn compile(&self) -> Result<PolicySet, PolicyError> {
        let mut document = self.inline_document();
        if let Some(path) = &self.policy_file {
            let file = policy::read_policy_file(path)?;
            for (name, members) in file.groups {
                if document.groups.insert(name.clone(), members).is_some() {
                    return Err(PolicyError::Invalid(format!(
                        "group {name:?} is defined twice"
                    )));
                }
            }
            document.system.readers.extend(file.system.readers);
            document.system.writers.extend(file.system.writers);
            document.system.admins.extend(file.system.admins);
            document.namespaces.extend(file.namespaces);
            document.deny.extend(file.deny);
        }
        if let Some(dir) = &self.policy_dir {
            document.namespaces.extend(policy::read_policy_dir(dir)?);
        }
        self.finish(PolicySet::compile(&document)?)
    }

    fn finish(&self, set: PolicySet) -> Result<PolicySet, PolicyError> {
        for path in self.method_access.keys() {
            access::check_configured_method(path)
                .map_err(|e| PolicyError::Invalid(format!("method_access: {e}")))?;
        }
        Ok(set
            .with_identity_sources(self.identity.clone())
            .with_method_access(self.method_access.clone()))
    }

    pub fn resolve_paths(&mut self, base: &Path) {
        for path in [&mut self.policy_file, &mut self.policy_dir]
            .into_iter()
            .flatten()
        {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
        if !matches!(self.audit_log.as_str(), "stdout" | "stderr" | "off")
            && Path::new(&self.audit_log).is_relative()
        {
            self.audit_log = base.join(&self.audit_log).display().to_string();
        }
    }
}

/// The policies in force, swapped atomically on reload. A failed reload keeps the old ones.
pub struct PolicyStore {
    current: RwLock<Arc<PolicySet>>,
    settings: RwLock<AuthorizationConfig>,
    /// The config file the section came from, re-read on reload.
    config_path: Option<PathBuf>,
}

impl PolicyStore {
    pub fn new(
        config: &AuthorizationConfig,
        config_path: Option<&Path>,
    ) -> Result<Arc<PolicyStore>, PolicyError> {
        let set = config.compile()?;
        Ok(Arc::new(PolicyStore {
            current: RwLock::new(Arc::new(set)),
            settings: RwLock::new(config.clone()),
            config_path: config_path.map(Path::to_path_buf),
        }))
    }

    pub fn current(&self) -> Arc<PolicySet> {
        match self.current.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Re-reads the config's `[authorization]` section and the policy files; installs them only
    /// if everything is valid.
    pub fn reload(&self) -> Result<(), String> {
        let config = match &self.config_path {
            Some(path) => Config::load(path).map_err(|e| e.to_string())?.authorization,
            None => match self.settings.read() {
                Ok(guard) => guard.clone(),
                Err(poisoned) => poisoned.into_inner().clone(),
            },
        };
        let set = config.compile().map_err(|e| e.to_string())?;
        if let Ok(mut guard) = self.current.write() {
            *guard = Arc::new(set);
        }
        if let Ok(mut guard) = self.settings.write() {
            *guard = config;
        }
        Ok(())
    }

    /// Files whose change triggers a reload.
    fn watched_paths(&self) -> Vec<PathBuf> {
        let settings = match self.settings.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        self.config_path
            .iter()
            .cloned()
            .chain(settings.policy_file)
            .chain(settings.policy_dir)
            .collect()
    }

    /// Reloads on SIGHUP and when a watched file changes, until the process ends.
    pub fn spawn_reloader(self: &Arc<Self>) {
        let store = self.clone();
        crate::reload::spawn_reloader("policies", self.watched_paths(), move || store.reload());
    }
}

impl<S> AuthzService<S> {
    /// A command aimed at another namespace acts there as a writer would (starts, signals,
    /// cancels a workflow): the caller must be a writer there too. Every command target gets
    /// its own decision and audit line; one denial refuses the whole call.
    fn decide_commands(
        &self,
        policies: &PolicySet,
        request: &GrpcRequest,
        identity: &str,
        claimed: Option<&ClaimedRoles>,
        credential: &'static str,
    ) -> Result<(), ProxyError> {
        let method = request.method;
        let mut denied = None;
        for target in &request.targets {
            let level = AccessLevel::Write;
            let decision = policies.decide_for(
                identity,
                claimed,
                Scope::Namespace,
                Some(&target.namespace),
                level,
            );
            crate::telemetry::call::record_authz(identity, decision.allowed);
            let command_method = format!("{}/{}", method.path, target.command);
            let mut event = AuditEvent::new(
                identity,
                Some(&target.namespace),
                &command_method,
                level,
                &decision,
                &request.peer.remote,
            );
            event.credential = Some(credential);
            event.command = Some(target.command);
            event.request_namespace = request.namespace.as_deref();
            // An action that cannot be audited is not taken.
            self.audit
                .record(&event)
                .map_err(ProxyError::AuditUnavailable)?;
            if !decision.allowed && denied.is_none() {
                denied = Some(ProxyError::CommandDenied(Box::new(CommandDenial {
                    identity: identity.to_string(),
                    method: &method.name,
                    command: target.command,
                    namespace: request.namespace.clone().unwrap_or_default(),
                    target: target.namespace.clone(),
                    required: decision.required.map_or("", Role::as_str),
                })));
            }
        }
        denied.map_or(Ok(()), Err)
    }
}

const LIST_NAMESPACES: &str = "/temporal.api.workflowservice.v1.WorkflowService/ListNamespaces";

#[derive(Clone)]
pub struct AuthzLayer {
    store: Arc<PolicyStore>,
    audit: Arc<AuditLog>,
}

impl AuthzLayer {
    pub fn new(store: Arc<PolicyStore>, audit: Arc<AuditLog>) -> Self {
        AuthzLayer { store, audit }
    }
}

impl<S> Layer<S> for AuthzLayer {
    type Service = AuthzService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthzService {
            inner,
            store: self.store.clone(),
            audit: self.audit.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthzService<S> {
    inner: S,
    store: Arc<PolicyStore>,
    audit: Arc<AuditLog>,
}

impl<S> Service<GrpcRequest> for AuthzService<S>
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
        let policies = self.store.current();
        let peer = request.peer.clone();
        let (identity, claimed, credential) = caller_of(&policies, &peer);
        let method = request.method;
        let listing_namespaces = method.path == LIST_NAMESPACES;
        let (scope, level) = if listing_namespaces {
            // Everyone may list; the answer is cut down to what the caller may read.
            (Scope::Cluster, AccessLevel::Open)
        } else {
            policies.required_access(method)
        };
        let decision = policies.decide_for(
            &identity,
            claimed,
            scope,
            request.namespace.as_deref(),
            level,
        );
        crate::telemetry::call::record_authz(&identity, decision.allowed);
        let mut event = AuditEvent::new(
            &identity,
            request.namespace.as_deref(),
            &method.path,
            level,
            &decision,
            &request.peer.remote,
        );
        event.credential = Some(credential);
        // Fail closed: a call whose decision cannot be audited does not run.
        if let Err(e) = self.audit.record(&event) {
            return Box::pin(std::future::ready(Err(ProxyError::AuditUnavailable(e))));
        }
        if !decision.allowed {
            let error = ProxyError::PermissionDenied {
                identity,
                method: method.name.clone(),
                namespace: request.namespace.clone(),
                required: decision.required.map_or("", Role::as_str),
            };
            return Box::pin(std::future::ready(Err(error)));
        }
        if let Err(error) =
            self.decide_commands(&policies, &request, &identity, claimed, credential)
        {
            return Box::pin(std::future::ready(Err(error)));
        }
        let namespace = request.namespace.clone();
        let call = self.inner.call(request);
        let audit = self.audit.clone();
        Box::pin(async move {
            let mut response = call.await?;
            let claimed = peer.token.as_ref().map(|t| &t.roles);
            let reads = ForeignReads {
                policies: &policies,
                audit: &audit,
                identity: &identity,
                claimed,
                credential,
                peer: &peer.remote,
                method: &method.path,
                namespace: namespace.as_deref(),
            };
            reads.decide(&response.foreign_namespaces)?;
            if listing_namespaces {
                if let Some(message) = &response.message {
                    response.message =
                        Some(filter_namespaces(message, &policies, &identity, claimed)?);
                }
            }
            Ok(response)
        })
    }
}

/// An answer can hold payloads sealed for another namespace (a child workflow's input and
/// result in its parent's history, a signal sent elsewhere): they open only for a caller who
/// may read that namespace too, as the caller could not read them there either.
struct ForeignReads<'a> {
    policies: &'a PolicySet,
    audit: &'a AuditLog,
    identity: &'a str,
    claimed: Option<&'a ClaimedRoles>,
    credential: &'static str,
    peer: &'a str,
    method: &'a str,
    namespace: Option<&'a str>,
}

impl ForeignReads<'_> {
    fn decide(&self, foreign: &[String]) -> Result<(), ProxyError> {
        let mut denied = None;
        for other in foreign {
            let level = AccessLevel::Read;
            let decision = self.policies.decide_for(
                self.identity,
                self.claimed,
                Scope::Namespace,
                Some(other),
                level,
            );
            crate::telemetry::call::record_authz(self.identity, decision.allowed);
            let mut event = AuditEvent::new(
                self.identity,
                Some(other),
                self.method,
                level,
                &decision,
                self.peer,
            );
            event.credential = Some(self.credential);
            event.request_namespace = self.namespace;
            self.audit
                .record(&event)
                .map_err(ProxyError::AuditUnavailable)?;
            if !decision.allowed && denied.is_none() {
                denied = Some(ProxyError::ForeignPayloadsDenied {
                    identity: self.identity.to_string(),
                    method: self
                        .method
                        .rsplit('/')
                        .next()
                        .unwrap_or(self.method)
                        .to_string(),
                    namespace: other.clone(),
                    required: decision.required.map_or("", Role::as_str),
                });
            }
        }
        denied.map_or(Ok(()), Err)
    }
}

/// Keeps only the namespaces the identity may read in a ListNamespacesResponse, at the wire
/// level (field 1: DescribeNamespaceResponse → field 1: NamespaceInfo → field 1: name).
fn filter_namespaces(
    message: &[u8],
    policies: &PolicySet,
    identity: &str,
    claimed: Option<&ClaimedRoles>,
) -> Result<bytes::Bytes, ProxyError> {
    let malformed = |e: wire::WireError| ProxyError::UpstreamProtocol {
        upstream: "system".into(),
        reason: format!("malformed ListNamespacesResponse: {e}"),
    };
    let nested_string = |buf: &[u8], path: &[u32]| -> Result<Option<String>, wire::WireError> {
        let mut current = buf;
        for (depth, number) in path.iter().enumerate() {
            let mut found = None;
            for field in wire::fields(current) {
                let field = field?;
                if field.number == *number && field.wire_type == wire::WireType::Len {
                    found = Some(field.value);
                }
            }
            match found {
                Some(value) if depth + 1 == path.len() => {
                    return Ok(Some(String::from_utf8_lossy(value).into_owned()))
                }
                Some(value) => current = value,
                None => return Ok(None),
            }
        }
        Ok(None)
    };
    let mut out = Vec::with_capacity(message.len());
    for field in wire::fields(message) {
        let field = field.map_err(malformed)?;
        if field.number == 1 && field.wire_type == wire::WireType::Len {
            let name = nested_string(field.value, &[1, 1]).map_err(malformed)?;
            let readable = name.is_some_and(|ns| {
                policies
                    .role_in_namespace_for(identity, claimed, &ns)
                    .is_some()
            });
            if !readable {
                continue;
            }
        }
        out.extend_from_slice(field.raw);
    }
    Ok(bytes::Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use crate::proxy::CallRequest;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http::HeaderMap;

    use super::*;
    use crate::payload::targets::CommandTarget;
    use crate::schema::Schema;

    const COMPLETED: &str =
        "/temporal.api.workflowservice.v1.WorkflowService/RespondWorkflowTaskCompleted";

    /// Answers every call, with `foreign` as the namespaces whose payloads it opened.
    #[derive(Clone)]
    struct Upstream {
        calls: Arc<AtomicUsize>,
        foreign: Vec<String>,
    }

    impl Service<GrpcRequest> for Upstream {
        type Response = GrpcResponse;
        type Error = ProxyError;
        type Future = CallFuture;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: GrpcRequest) -> CallFuture {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let response = GrpcResponse {
                foreign_namespaces: self.foreign.clone(),
                ..GrpcResponse::default()
            };
            Box::pin(std::future::ready(Ok(response)))
        }
    }

    /// A caller with a bearer token claiming `roles` (`alpha:write` style).
    fn request(roles: &[(&str, Role)], targets: &[&str]) -> GrpcRequest {
        let mut claimed = ClaimedRoles::default();
        for (namespace, role) in roles {
            claimed.grant_namespace(namespace, *role);
        }
        Box::new(CallRequest {
            method: Schema::global().method(COMPLETED).unwrap(),
            headers: HeaderMap::new(),
            message: Bytes::new(),
            deadline: None,
            namespace: Some("alpha".into()),
            targets: targets
                .iter()
                .map(|ns| CommandTarget {
                    command: "SignalExternalWorkflowExecution",
                    namespace: ns.to_string(),
                    carries_payloads: true,
                })
                .collect(),
            peer: Arc::new(PeerInfo {
                token: Some(Arc::new(BearerIdentity {
                    identity: "token-user".into(),
                    roles: claimed,
                    expires_at: u64::MAX,
                })),
                ..PeerInfo::default()
            }),
        })
    }

    async fn call(
        request: GrpcRequest,
        foreign: &[&str],
    ) -> (
        Result<GrpcResponse, ProxyError>,
        usize,
        Vec<serde_json::Value>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let config: AuthorizationConfig = toml::from_str("audit_log = \"off\"").unwrap();
        let store = PolicyStore::new(&config, None).unwrap();
        let audit = Arc::new(
            AuditLog::open(path.to_str().unwrap(), audit::AuditSettings::default()).unwrap(),
        );
        let upstream = Upstream {
            calls: Arc::default(),
            foreign: foreign.iter().map(|s| s.to_string()).collect(),
        };
        let calls = upstream.calls.clone();
        let mut service = AuthzLayer::new(store, audit.clone()).layer(upstream);
        let result = service.call(request).await;
        drop(service);
        // The last reference writes every line out.
        drop(Arc::into_inner(audit));
        let lines = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (result, calls.load(Ordering::SeqCst), lines)
    }

    /// A command aimed at another namespace needs the writer role there; claimed token roles
    /// count like policy roles; each target is one audited decision.
    #[tokio::test]
    async fn command_targets_need_the_writer_role_there() {
        let (result, calls, audit) = call(
            request(
                &[("alpha", Role::Writer), ("beta", Role::Reader)],
                &["beta"],
            ),
            &[],
        )
        .await;
        let err = result.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        let text = err.to_string();
        assert!(
            text.contains("SignalExternalWorkflowExecution")
                && text.contains("namespace beta")
                && text.contains("writer"),
            "{text}"
        );
        assert_eq!(calls, 0, "nothing forwarded");
        let command = audit
            .iter()
            .find(|l| l["command"] == "SignalExternalWorkflowExecution")
            .expect("the command's decision is audited");
        assert_eq!(command["decision"], "deny");
        assert_eq!(command["namespace"], "beta");
        assert_eq!(command["request_namespace"], "alpha");
        assert_eq!(command["credential"], "bearer");
        assert!(command["method"]
            .as_str()
            .unwrap()
            .ends_with("/RespondWorkflowTaskCompleted/SignalExternalWorkflowExecution"));

        let (result, calls, audit) = call(
            request(
                &[("alpha", Role::Writer), ("beta", Role::Writer)],
                &["beta"],
            ),
            &[],
        )
        .await;
        result.expect("a writer in both");
        assert_eq!(calls, 1);
        assert_eq!(audit.len(), 2, "the request's decision and the command's");
    }

    /// An answer holding payloads of another namespace reaches only a caller with a role there.
    #[tokio::test]
    async fn payloads_of_another_namespace_need_a_role_there() {
        let (result, _, audit) = call(request(&[("alpha", Role::Writer)], &[]), &["beta"]).await;
        let err = result.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(err.to_string().contains("namespace beta"), "{err}");
        assert!(audit
            .iter()
            .any(|l| l["namespace"] == "beta" && l["access"] == "read" && l["decision"] == "deny"));
        let (result, _, _) = call(
            request(&[("alpha", Role::Writer), ("beta", Role::Reader)], &[]),
            &["beta"],
        )
        .await;
        result.expect("a reader of beta");
    }
}
