//! Who may do what: roles per namespace and for the cluster, granted to identities by exact name,
//! by `*` pattern, or through named groups. Anything not granted is denied.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::access::AccessLevel;
use crate::schema::{MethodInfo, Scope};
use crate::tls::CertificateNames;

/// A namespace (or cluster) role. Writer includes reader; admin includes writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Reader,
    Writer,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Writer => "writer",
            Role::Admin => "admin",
        }
    }

    /// The least role that grants `level` (None for open methods).
    pub fn required_for(level: AccessLevel) -> Option<Role> {
        match level {
            AccessLevel::Open => None,
            AccessLevel::Read => Some(Role::Reader),
            AccessLevel::Write => Some(Role::Writer),
            AccessLevel::Admin => Some(Role::Admin),
        }
    }
}

/// Which certificate name identifies a caller; the first kind present wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentitySource {
    Spiffe,
    Dns,
    Email,
    Cn,
}

/// SPIFFE ID, DNS name, email. The subject CN is free text that any certificate request can
/// set, so it names a caller only where a config asks for it.
pub fn default_identity_sources() -> Vec<IdentitySource> {
    vec![
        IdentitySource::Spiffe,
        IdentitySource::Dns,
        IdentitySource::Email,
    ]
}

/// Identities are typed: the kind of name is part of the name, so names of different kinds
/// never meet. A SPIFFE ID is `spiffe://…` as it is; the other kinds carry a prefix. A policy
/// entry must say which kind it matches.
pub const SPIFFE_PREFIX: &str = "spiffe://";
pub const DNS_PREFIX: &str = "dns:";
pub const EMAIL_PREFIX: &str = "email:";
pub const CN_PREFIX: &str = "cn:";
/// A bearer token's subject.
pub const JWT_PREFIX: &str = "jwt:";

/// The name a caller with a verified certificate is known by: its first name of the configured
/// kinds, typed (`spiffe://…`, `dns:…`, `email:…`, `cn:…`); [`UNNAMED_CERTIFICATE`] when it has
/// none of them.
pub fn identity_of(names: &CertificateNames, sources: &[IdentitySource]) -> String {
    for source in sources {
        let found = match source {
            IdentitySource::Spiffe => names.spiffe.first().cloned(),
            IdentitySource::Dns => names.dns.first().map(|n| format!("{DNS_PREFIX}{n}")),
            IdentitySource::Email => names.email.first().map(|n| format!("{EMAIL_PREFIX}{n}")),
            IdentitySource::Cn => names
                .common_name
                .as_ref()
                .map(|n| format!("{CN_PREFIX}{n}")),
        };
        if let Some(name) = found {
            return name;
        }
    }
    UNNAMED_CERTIFICATE.to_string()
}

/// Callers without any credential (plaintext sidecar listeners), which a policy can grant by
/// this name.
pub const ANONYMOUS: &str = "anonymous";

/// A verified certificate without a name of any configured kind. No policy entry can match it
/// (entries must be typed), so it holds no role anywhere.
pub const UNNAMED_CERTIFICATE: &str = "unnamed-certificate";

/// Checks that a policy entry (a name or a `*` pattern) says which kind of identity it matches.
pub fn check_typed_entry(entry: &str) -> Result<(), String> {
    if entry == ANONYMOUS {
        return Ok(());
    }
    for prefix in [
        SPIFFE_PREFIX,
        DNS_PREFIX,
        EMAIL_PREFIX,
        CN_PREFIX,
        JWT_PREFIX,
    ] {
        if let Some(rest) = entry.strip_prefix(prefix) {
            if rest.is_empty() {
                return Err(format!("{entry:?} names no identity after the kind"));
            }
            return Ok(());
        }
    }
    let hint = if entry.contains('@') {
        format!("email:{entry}")
    } else {
        format!("dns:{entry}\", \"cn:{entry}\" or \"jwt:{entry}")
    };
    Err(format!(
        "{entry:?} does not say which kind of identity it matches: write \"{hint}\" \
         (kinds: spiffe://…, dns:, email:, cn:, jwt:, or anonymous)"
    ))
}

/// Roles a caller brings with it rather than holds by policy: the permissions claim of a
/// verified bearer token. They add to what the policies grant the identity; they never remove.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimedRoles {
    /// A cluster role (`temporal-system:ROLE`): applies to cluster-scoped methods and in every
    /// namespace.
    pub system: Option<Role>,
    pub namespaces: HashMap<String, Role>,
}

impl ClaimedRoles {
    /// Records a role, keeping the higher one when the same scope is named twice.
    pub fn grant_namespace(&mut self, namespace: &str, role: Role) {
        let entry = self.namespaces.entry(namespace.to_string()).or_insert(role);
        *entry = (*entry).max(role);
    }

    pub fn grant_system(&mut self, role: Role) {
        self.system = self.system.max(Some(role));
    }
}

/// Role grants: identity names, `*` patterns, or `group:NAME`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Grants {
    #[serde(default)]
    pub readers: Vec<String>,
    #[serde(default)]
    pub writers: Vec<String>,
    #[serde(default)]
    pub admins: Vec<String>,
}

/// One namespace's policy (also the format of a file in a policy directory).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NamespacePolicy {
    pub name: String,
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(flatten)]
    pub grants: Grants,
}

/// Policies as written: in the config's `[authorization]` section or in a policy file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    /// Named groups of identities (names or patterns).
    #[serde(default)]
    pub groups: BTreeMap<String, Vec<String>>,
    /// Cluster-wide roles: readers and admins for cluster-scoped methods. They also apply in
    /// every namespace, as Temporal's system roles do.
    #[serde(default)]
    pub system: Grants,
    #[serde(default)]
    pub namespaces: Vec<NamespacePolicy>,
    /// Identities (names, patterns, groups) refused everything, whatever they are granted
    /// here or claim in a token: e.g. a compromised workload until its certificate expires.
    #[serde(default)]
    pub deny: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("invalid policy {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("invalid policy: {0}")]
    Invalid(String),
}

/// A compiled, validated set of policies.
#[derive(Debug, Default)]
pub struct PolicySet {
    /// Which certificate names identify a caller, swapped together with the policies on reload.
    identity_sources: Vec<IdentitySource>,
    groups: HashMap<String, Vec<Pattern>>,
    system: CompiledGrants,
    namespaces: HashMap<String, CompiledGrants>,
    denied: Vec<Subject>,
    /// Configured levels for methods Temporal's table does not know, by path.
    method_access: BTreeMap<String, AccessLevel>,
}

#[derive(Debug, Default)]
struct CompiledGrants {
    by_role: Vec<(Role, Vec<Subject>)>,
}

#[derive(Debug)]
enum Subject {
    Pattern(Pattern),
    Group(String),
}

/// An exact name, or a glob where `*` matches any run of characters.
#[derive(Debug, Clone)]
pub struct Pattern {
    parts: Vec<String>,
    wildcard: bool,
}

impl Pattern {
    pub fn new(text: &str) -> Pattern {
        Pattern {
            parts: text.split('*').map(str::to_string).collect(),
            wildcard: text.contains('*'),
        }
    }

    pub fn matches(&self, name: &str) -> bool {
        if !self.wildcard {
            return self.parts.first().is_some_and(|p| p == name);
        }
        let (first, rest) = match self.parts.split_first() {
            Some(split) => split,
            None => return false,
        };
        let Some(mut remaining) = name.strip_prefix(first.as_str()) else {
            return false;
        };
        let (last, middle) = match rest.split_last() {
            Some(split) => split,
            None => return true,
        };
        for part in middle {
            match remaining.find(part.as_str()) {
                Some(at) => remaining = &remaining[at + part.len()..],
                None => return false,
            }
        }
        remaining.len() >= last.len() && remaining.ends_with(last.as_str())
    }
}

/// The outcome of one authorization decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub required: Option<Role>,
    /// The role the identity holds where it matters, if any.
    pub held: Option<Role>,
    pub reason: &'static str,
}

impl PolicySet {
    pub fn compile(document: &PolicyDocument) -> Result<PolicySet, PolicyError> {
        let mut groups = HashMap::new();
        for (name, members) in &document.groups {
            if members.iter().any(|m| m.starts_with("group:")) {
                return Err(PolicyError::Invalid(format!(
                    "group {name:?}: groups cannot contain groups"
                )));
            }
            for member in members {
                check_typed_entry(member)
                    .map_err(|e| PolicyError::Invalid(format!("group {name:?}: {e}")))?;
            }
            groups.insert(
                name.clone(),
                members.iter().map(|m| Pattern::new(m)).collect(),
            );
        }
        let subjects = |entries: &[String], what: &str| -> Result<Vec<Subject>, PolicyError> {
            let mut subjects = Vec::new();
            for entry in entries {
                if entry.is_empty() {
                    return Err(PolicyError::Invalid(format!("{what}: empty identity")));
                }
                match entry.strip_prefix("group:") {
                    Some(group) if groups.contains_key(group) => {
                        subjects.push(Subject::Group(group.to_string()))
                    }
                    Some(group) => {
                        return Err(PolicyError::Invalid(format!(
                            "{what}: unknown group {group:?}"
                        )))
                    }
                    None => {
                        check_typed_entry(entry)
                            .map_err(|e| PolicyError::Invalid(format!("{what}: {e}")))?;
                        subjects.push(Subject::Pattern(Pattern::new(entry)))
                    }
                }
            }
            Ok(subjects)
        };
        let compile_grants = |grants: &Grants, what: &str| -> Result<CompiledGrants, PolicyError> {
            let mut by_role = Vec::new();
            for (role, entries) in [
                (Role::Reader, &grants.readers),
                (Role::Writer, &grants.writers),
                (Role::Admin, &grants.admins),
            ] {
                by_role.push((role, subjects(entries, what)?));
            }
            Ok(CompiledGrants { by_role })
        };
        let denied = subjects(&document.deny, "deny")?;
        if !document.system.writers.is_empty() {
            return Err(PolicyError::Invalid(
                "system: cluster roles are readers and admins (there are no cluster writers)"
                    .into(),
            ));
        }
        let system = compile_grants(&document.system, "system")?;
        let mut namespaces = HashMap::new();
        for ns in &document.namespaces {
            if ns.name.is_empty() {
                return Err(PolicyError::Invalid(
                    "a namespace policy has no name".into(),
                ));
            }
            let compiled = compile_grants(&ns.grants, &format!("namespace {:?}", ns.name))?;
            if namespaces.insert(ns.name.clone(), compiled).is_some() {
                return Err(PolicyError::Invalid(format!(
                    "namespace {:?} has two policies",
                    ns.name
                )));
            }
        }
        Ok(PolicySet {
            identity_sources: default_identity_sources(),
            groups,
            system,
            namespaces,
            denied,
            method_access: BTreeMap::new(),
        })
    }

    /// Sets which certificate names identify a caller (default: SPIFFE, DNS, email, CN).
    pub fn with_identity_sources(mut self, sources: Vec<IdentitySource>) -> PolicySet {
        self.identity_sources = sources;
        self
    }

    /// Sets the configured levels of methods Temporal's table does not know.
    pub fn with_method_access(mut self, levels: BTreeMap<String, AccessLevel>) -> PolicySet {
        self.method_access = levels;
        self
    }

    /// What a call of `method` needs: Temporal's table, else the configured level, else
    /// cluster admin.
    pub fn required_access(&self, method: &MethodInfo) -> (Scope, AccessLevel) {
        match self.method_access.get(&method.path) {
            Some(level)
                if super::access::classified_level(&method.service, &method.name).is_none() =>
            {
                (method.scope, *level)
            }
            _ => super::access::required_access(method),
        }
    }

    /// The name the caller with these certificate names is known by.
    pub fn identity_of(&self, names: &CertificateNames) -> String {
        identity_of(names, &self.identity_sources)
    }

    fn matches(&self, subject: &Subject, identity: &str) -> bool {
        match subject {
            Subject::Pattern(p) => p.matches(identity),
            Subject::Group(g) => self
                .groups
                .get(g)
                .is_some_and(|ps| ps.iter().any(|p| p.matches(identity))),
        }
    }

    fn highest_role(&self, grants: &CompiledGrants, identity: &str) -> Option<Role> {
        grants
            .by_role
            .iter()
            .rev()
            .find(|(_, subjects)| subjects.iter().any(|s| self.matches(s, identity)))
            .map(|(role, _)| *role)
    }

    /// Whether the deny list names this identity: then it holds no role anywhere.
    pub fn is_denied(&self, identity: &str) -> bool {
        self.denied.iter().any(|s| self.matches(s, identity))
    }

    /// The identity's effective role in a namespace (its own grants and the system grants).
    pub fn role_in_namespace(&self, identity: &str, namespace: &str) -> Option<Role> {
        self.role_in_namespace_for(identity, None, namespace)
    }

    /// Like [`PolicySet::role_in_namespace`], adding the roles a token claims.
    pub fn role_in_namespace_for(
        &self,
        identity: &str,
        claimed: Option<&ClaimedRoles>,
        namespace: &str,
    ) -> Option<Role> {
        if self.is_denied(identity) {
            return None;
        }
        let own = self
            .namespaces
            .get(namespace)
            .and_then(|grants| self.highest_role(grants, identity));
        let claimed_here = claimed.and_then(|c| c.namespaces.get(namespace).copied());
        own.max(claimed_here)
            .max(self.system_role_for(identity, claimed))
    }

    pub fn system_role(&self, identity: &str) -> Option<Role> {
        self.system_role_for(identity, None)
    }

    pub fn system_role_for(&self, identity: &str, claimed: Option<&ClaimedRoles>) -> Option<Role> {
        if self.is_denied(identity) {
            return None;
        }
        self.highest_role(&self.system, identity)
            .max(claimed.and_then(|c| c.system))
    }

    pub fn decide(
        &self,
        identity: &str,
        scope: Scope,
        namespace: Option<&str>,
        level: AccessLevel,
    ) -> Decision {
        self.decide_for(identity, None, scope, namespace, level)
    }

    /// Like [`PolicySet::decide`], adding the roles a token claims to the policies' grants.
    pub fn decide_for(
        &self,
        identity: &str,
        claimed: Option<&ClaimedRoles>,
        scope: Scope,
        namespace: Option<&str>,
        level: AccessLevel,
    ) -> Decision {
        if self.is_denied(identity) {
            // Even methods open to every authenticated caller.
            return Decision {
                allowed: false,
                required: Role::required_for(level),
                held: None,
                reason: "identity is on the deny list",
            };
        }
        let Some(required) = Role::required_for(level) else {
            return Decision {
                allowed: true,
                required: None,
                held: None,
                reason: "open to every authenticated caller",
            };
        };
        let held = match (scope, namespace) {
            (Scope::Namespace, Some(ns)) => self.role_in_namespace_for(identity, claimed, ns),
            (Scope::Namespace, None) => None,
            (Scope::Cluster, _) => self.system_role_for(identity, claimed),
        };
        let allowed = held.is_some_and(|h| h >= required);
        let reason = match (allowed, held, scope) {
            (true, _, _) => "role grants access",
            (false, None, Scope::Namespace) => "no role in this namespace",
            (false, None, Scope::Cluster) => "no cluster role",
            (false, Some(_), _) => "role too low",
        };
        Decision {
            allowed,
            required: Some(required),
            held,
            reason,
        }
    }
}

/// Reads a policy file (TOML, the same shape as `[authorization]`'s policy keys).
pub fn read_policy_file(path: &Path) -> Result<PolicyDocument, PolicyError> {
    let text = std::fs::read_to_string(path).map_err(|e| PolicyError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    toml::from_str(&text).map_err(|e| PolicyError::Parse {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Reads a directory of namespace resources: one `*.toml` file per namespace
/// (`name`, `owner`, `readers`, `writers`, `admins`).
pub fn read_policy_dir(dir: &Path) -> Result<Vec<NamespacePolicy>, PolicyError> {
    let entries = std::fs::read_dir(dir).map_err(|e| PolicyError::Read {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("toml"))
        .collect();
    paths.sort();
    let mut policies = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path).map_err(|e| PolicyError::Read {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        policies.push(toml::from_str(&text).map_err(|e| PolicyError::Parse {
            path: path.clone(),
            reason: e.to_string(),
        })?);
    }
    Ok(policies)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policies() -> PolicySet {
        let doc: PolicyDocument = toml::from_str(
            r#"
            [groups]
            auditors = ["email:alice@example.com", "spiffe://corp.example/audit/*"]

            [system]
            readers = ["dns:monitoring"]
            admins = ["cn:root-admin"]

            [[namespaces]]
            name = "payments"
            owner = "team-payments"
            readers = ["group:auditors"]
            writers = ["spiffe://corp.example/ns/payments/*"]
            admins = ["dns:payments-admin"]

            [[namespaces]]
            name = "orders"
            writers = ["jwt:orders-worker"]
            "#,
        )
        .unwrap();
        PolicySet::compile(&doc).unwrap()
    }

    #[test]
    fn patterns_match_like_globs() {
        assert!(Pattern::new("a").matches("a"));
        assert!(!Pattern::new("a").matches("ab"));
        assert!(Pattern::new("spiffe://x/*").matches("spiffe://x/worker"));
        assert!(!Pattern::new("spiffe://x/*").matches("spiffe://y/worker"));
        assert!(Pattern::new("*@example.com").matches("bob@example.com"));
        assert!(Pattern::new("a*b*c").matches("a-b-c"));
        assert!(!Pattern::new("a*b*c").matches("a-c"));
        assert!(!Pattern::new("ab*ba").matches("aba"));
        assert!(Pattern::new("*").matches(""));
    }

    /// Every role against every level, in both scopes: the whole decision matrix.
    #[test]
    fn decision_matrix_is_exhaustive() {
        let set = policies();
        let ns_identities = [
            (None, "stranger"),
            (Some(Role::Reader), "email:alice@example.com"),
            (
                Some(Role::Writer),
                "spiffe://corp.example/ns/payments/worker",
            ),
            (Some(Role::Admin), "dns:payments-admin"),
        ];
        let levels = [
            AccessLevel::Open,
            AccessLevel::Read,
            AccessLevel::Write,
            AccessLevel::Admin,
        ];
        for (role, identity) in ns_identities {
            for level in levels {
                let d = set.decide(identity, Scope::Namespace, Some("payments"), level);
                let expected = match Role::required_for(level) {
                    None => true,
                    Some(required) => role.is_some_and(|r| r >= required),
                };
                assert_eq!(d.allowed, expected, "{identity} {level:?}: {d:?}");
                // Nothing in another namespace.
                let other = set.decide(identity, Scope::Namespace, Some("orders"), level);
                assert_eq!(
                    other.allowed,
                    level == AccessLevel::Open,
                    "{identity} in orders {level:?}"
                );
            }
        }
        let cluster_identities = [
            (None, "dns:payments-admin"),
            (Some(Role::Reader), "dns:monitoring"),
            (Some(Role::Admin), "cn:root-admin"),
        ];
        for (role, identity) in cluster_identities {
            for level in levels {
                let d = set.decide(identity, Scope::Cluster, None, level);
                let expected = match Role::required_for(level) {
                    None => true,
                    Some(required) => role.is_some_and(|r| r >= required),
                };
                assert_eq!(d.allowed, expected, "{identity} cluster {level:?}: {d:?}");
            }
        }
    }

    #[test]
    fn claimed_roles_add_to_policy_grants() {
        let set = policies();
        let mut claimed = ClaimedRoles::default();
        claimed.grant_namespace("orders", Role::Reader);
        claimed.grant_namespace("orders", Role::Writer);
        claimed.grant_namespace("orders", Role::Reader);
        // The policy makes alice a reader in payments; the token adds orders.
        let alice = "email:alice@example.com";
        let read = |ns| {
            set.decide_for(
                alice,
                Some(&claimed),
                Scope::Namespace,
                Some(ns),
                AccessLevel::Read,
            )
        };
        assert!(read("payments").allowed);
        assert!(read("orders").allowed);
        assert!(
            set.decide_for(
                alice,
                Some(&claimed),
                Scope::Namespace,
                Some("orders"),
                AccessLevel::Write
            )
            .allowed
        );
        assert!(!read("billing").allowed);
        assert!(
            !set.decide_for(
                alice,
                Some(&claimed),
                Scope::Cluster,
                None,
                AccessLevel::Read
            )
            .allowed
        );
        // A cluster writer claim: writer everywhere, cluster reads, no cluster admin.
        let mut system = ClaimedRoles::default();
        system.grant_system(Role::Writer);
        let d = |scope, ns, level| set.decide_for("x", Some(&system), scope, ns, level).allowed;
        assert!(d(Scope::Namespace, Some("anything"), AccessLevel::Write));
        assert!(!d(Scope::Namespace, Some("anything"), AccessLevel::Admin));
        assert!(d(Scope::Cluster, None, AccessLevel::Read));
        assert!(!d(Scope::Cluster, None, AccessLevel::Admin));
    }

    #[test]
    fn system_roles_apply_in_every_namespace() {
        let set = policies();
        assert_eq!(
            set.role_in_namespace("dns:monitoring", "orders"),
            Some(Role::Reader)
        );
        assert_eq!(
            set.role_in_namespace("cn:root-admin", "anything"),
            Some(Role::Admin)
        );
        assert_eq!(set.role_in_namespace("jwt:orders-worker", "payments"), None);
    }

    #[test]
    fn bad_documents_are_rejected() {
        let bad = [
            "[[namespaces]]\nname = \"a\"\nreaders = [\"group:nope\"]",
            "[system]\nwriters = [\"x\"]",
            "[[namespaces]]\nname = \"a\"\n[[namespaces]]\nname = \"a\"",
            "[groups]\na = [\"group:b\"]",
        ];
        for text in bad {
            let doc: PolicyDocument = toml::from_str(text).unwrap();
            assert!(PolicySet::compile(&doc).is_err(), "{text}");
        }
        assert!(
            toml::from_str::<PolicyDocument>("[[namespaces]]\nname = \"a\"\nreeders = []").is_err()
        );
    }

    #[test]
    fn identity_follows_the_configured_sources() {
        let names = CertificateNames {
            spiffe: vec!["spiffe://corp/x".into()],
            dns: vec!["x.corp".into()],
            email: vec!["x@corp".into()],
            common_name: Some("x".into()),
        };
        assert_eq!(
            identity_of(&names, &default_identity_sources()),
            "spiffe://corp/x"
        );
        assert_eq!(identity_of(&names, &[IdentitySource::Dns]), "dns:x.corp");
        assert_eq!(
            identity_of(&names, &[IdentitySource::Email]),
            "email:x@corp"
        );
        assert_eq!(identity_of(&names, &[IdentitySource::Cn]), "cn:x");
        // The CN names a caller only when configured.
        let cn_only = CertificateNames {
            common_name: Some("spiffe://corp.example/platform/x".into()),
            ..Default::default()
        };
        assert_eq!(
            identity_of(&cn_only, &default_identity_sources()),
            UNNAMED_CERTIFICATE
        );
        assert_eq!(
            identity_of(&cn_only, &[IdentitySource::Spiffe, IdentitySource::Cn]),
            "cn:spiffe://corp.example/platform/x"
        );
    }

    /// A name of one kind never matches a grant of another, whatever its text.
    #[test]
    fn kinds_never_meet() {
        let doc: PolicyDocument = toml::from_str(
            r#"
            [system]
            admins = ["spiffe://corp.example/platform/*"]
            [[namespaces]]
            name = "payments"
            writers = ["cn:payments-worker", "email:ops@corp.example"]
            "#,
        )
        .unwrap();
        let set = PolicySet::compile(&doc).unwrap();
        let admin = |id: &str| set.system_role(id);
        assert_eq!(admin("spiffe://corp.example/platform/x"), Some(Role::Admin));
        // A CN or a token subject spelled like the SPIFFE ID is another identity.
        assert_eq!(admin("cn:spiffe://corp.example/platform/x"), None);
        assert_eq!(admin("jwt:spiffe://corp.example/platform/x"), None);
        let writer = |id: &str| set.role_in_namespace(id, "payments");
        assert_eq!(writer("cn:payments-worker"), Some(Role::Writer));
        assert_eq!(writer("jwt:payments-worker"), None);
        assert_eq!(writer("dns:payments-worker"), None);
        assert_eq!(writer("email:ops@corp.example"), Some(Role::Writer));
        assert_eq!(writer("jwt:ops@corp.example"), None);
        assert_eq!(writer(UNNAMED_CERTIFICATE), None);
    }

    #[test]
    fn untyped_entries_are_refused_with_the_fix() {
        for (text, hint) in [
            ("[system]\nadmins = [\"root\"]", "cn:root"),
            ("[groups]\na = [\"alice@corp\"]", "email:alice@corp"),
            ("deny = [\"mallory\"]", "jwt:mallory"),
            ("[[namespaces]]\nname = \"a\"\nreaders = [\"*\"]", "kind"),
            (
                "[[namespaces]]\nname = \"a\"\nreaders = [\"dns:\"]",
                "names no identity",
            ),
        ] {
            let doc: PolicyDocument = toml::from_str(text).unwrap();
            let err = PolicySet::compile(&doc).unwrap_err().to_string();
            assert!(err.contains(hint), "{text}: {err}");
        }
        for ok in [
            "anonymous",
            "spiffe://x/*",
            "dns:*.corp",
            "email:*@corp",
            "cn:x",
            "jwt:sub",
        ] {
            assert!(check_typed_entry(ok).is_ok(), "{ok}");
        }
    }

    /// The deny list beats every grant: namespace roles, system roles, a token's claims, and
    /// even methods open to every caller.
    #[test]
    fn the_deny_list_beats_every_grant() {
        let doc: PolicyDocument = toml::from_str(
            r#"
            deny = ["spiffe://corp.example/compromised/*", "group:gone"]
            [groups]
            gone = ["jwt:mallory"]
            [system]
            admins = ["spiffe://corp.example/*"]
            [[namespaces]]
            name = "payments"
            admins = ["spiffe://corp.example/compromised/worker", "jwt:mallory"]
            "#,
        )
        .unwrap();
        let set = PolicySet::compile(&doc).unwrap();
        let mut claims = ClaimedRoles::default();
        claims.grant_system(Role::Admin);
        for id in ["spiffe://corp.example/compromised/worker", "jwt:mallory"] {
            for level in [AccessLevel::Open, AccessLevel::Read, AccessLevel::Admin] {
                let d =
                    set.decide_for(id, Some(&claims), Scope::Namespace, Some("payments"), level);
                assert!(!d.allowed, "{id} {level:?}");
                assert_eq!(d.reason, "identity is on the deny list");
                assert!(
                    !set.decide_for(id, Some(&claims), Scope::Cluster, None, level)
                        .allowed
                );
            }
            assert_eq!(
                set.role_in_namespace_for(id, Some(&claims), "payments"),
                None
            );
        }
        // Everyone else keeps their grants.
        assert_eq!(
            set.system_role("spiffe://corp.example/platform/x"),
            Some(Role::Admin)
        );
    }
}
