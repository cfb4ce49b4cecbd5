//! Who may do what: roles per namespace and for the cluster, granted to identities by exact name,
//! by `*` pattern, or through named groups. Anything not granted is denied.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::access::AccessLevel;
use crate::schema::Scope;
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

pub fn default_identity_sources() -> Vec<IdentitySource> {
    vec![
        IdentitySource::Spiffe,
        IdentitySource::Dns,
        IdentitySource::Email,
        IdentitySource::Cn,
    ]
}

/// The name a caller is known by. Callers without a certificate (plaintext sidecar listeners)
/// are `anonymous`, which a policy can grant like any other name.
pub fn identity_of(names: &CertificateNames, sources: &[IdentitySource]) -> String {
    for source in sources {
        let found = match source {
            IdentitySource::Spiffe => names.spiffe.first(),
            IdentitySource::Dns => names.dns.first(),
            IdentitySource::Email => names.email.first(),
            IdentitySource::Cn => names.common_name.as_ref(),
        };
        if let Some(name) = found {
            return name.clone();
        }
    }
    ANONYMOUS.to_string()
}

pub const ANONYMOUS: &str = "anonymous";

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
            groups.insert(
                name.clone(),
                members.iter().map(|m| Pattern::new(m)).collect(),
            );
        }
        let compile_grants = |grants: &Grants, what: &str| -> Result<CompiledGrants, PolicyError> {
            let mut by_role = Vec::new();
            for (role, entries) in [
                (Role::Reader, &grants.readers),
                (Role::Writer, &grants.writers),
                (Role::Admin, &grants.admins),
            ] {
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
                        None => subjects.push(Subject::Pattern(Pattern::new(entry))),
                    }
                }
                by_role.push((role, subjects));
            }
            Ok(CompiledGrants { by_role })
        };
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
        })
    }

    /// Sets which certificate names identify a caller (default: SPIFFE, DNS, email, CN).
    pub fn with_identity_sources(mut self, sources: Vec<IdentitySource>) -> PolicySet {
        self.identity_sources = sources;
        self
    }

    /// The name the caller with these certificate names is known by.
    pub fn identity_of(&self, names: &CertificateNames) -> String {
        identity_of(names, &self.identity_sources)
    }

    fn highest_role(&self, grants: &CompiledGrants, identity: &str) -> Option<Role> {
        grants
            .by_role
            .iter()
            .rev()
            .find(|(_, subjects)| {
                subjects.iter().any(|subject| match subject {
                    Subject::Pattern(p) => p.matches(identity),
                    Subject::Group(g) => self
                        .groups
                        .get(g)
                        .is_some_and(|ps| ps.iter().any(|p| p.matches(identity))),
                })
            })
            .map(|(role, _)| *role)
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
            auditors = ["alice@example.com", "spiffe://corp.example/audit/*"]

            [system]
            readers = ["monitoring"]
            admins = ["root-admin"]

            [[namespaces]]
            name = "payments"
            owner = "team-payments"
            readers = ["group:auditors"]
            writers = ["spiffe://corp.example/ns/payments/*"]
            admins = ["payments-admin"]

            [[namespaces]]
            name = "orders"
            writers = ["orders-worker"]
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
            (Some(Role::Reader), "alice@example.com"),
            (
                Some(Role::Writer),
                "spiffe://corp.example/ns/payments/worker",
            ),
            (Some(Role::Admin), "payments-admin"),
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
            (None, "payments-admin"),
            (Some(Role::Reader), "monitoring"),
            (Some(Role::Admin), "root-admin"),
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
        let alice = "alice@example.com";
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
            set.role_in_namespace("monitoring", "orders"),
            Some(Role::Reader)
        );
        assert_eq!(
            set.role_in_namespace("root-admin", "anything"),
            Some(Role::Admin)
        );
        assert_eq!(set.role_in_namespace("orders-worker", "payments"), None);
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
            email: vec![],
            common_name: Some("x".into()),
        };
        assert_eq!(
            identity_of(&names, &default_identity_sources()),
            "spiffe://corp/x"
        );
        assert_eq!(identity_of(&names, &[IdentitySource::Cn]), "x");
        assert_eq!(identity_of(&names, &[IdentitySource::Email]), ANONYMOUS);
    }
}
