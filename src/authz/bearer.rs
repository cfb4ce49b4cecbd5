//! Bearer-token authentication: a JWT signed by a key from a configured JWKS (a file, an HTTPS
//! URL, or both), checked for issuer, audience and expiry. The caller's identity is the token's
//! `sub`; its roles come from a permissions claim in Temporal's `namespace:role` form and add to
//! whatever the policies grant that identity.
//!
//! Permissions follow Temporal's default JWT claim mapper (`common/authorization/
//! default_jwt_claim_mapper.go`): the claim (default `permissions`) is a list of strings, each
//! split at its first `:`; the role is `read`, `write` or `admin` (case-insensitive); the
//! namespace `temporal-system` means the cluster. Entries that are not strings or do not parse are
//! ignored, as Temporal ignores them. Differences, both on the cautious side: `worker` grants
//! nothing (Temporal's default authorizer lets a worker-only role do nothing either), and
//! `temporal-system:write` gives writer in every namespace and cluster reads, where Temporal's
//! default authorizer treats any system role above reader as allow-all.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;
use http_body_util::{BodyExt, Empty, Limited};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Deserializer, Serialize};

use super::policy::{ClaimedRoles, Role, JWT_PREFIX};

/// Temporal's name for the cluster in permissions (`temporal-system:admin`).
pub const SYSTEM_NAMESPACE: &str = "temporal-system";
/// The longest JWKS document accepted from a URL.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// A token naming a key the JWKS lacks triggers a fetch at most this often (key rotation at the
/// issuer), so garbage `kid`s cannot make the proxy hammer the issuer.
const MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(5);
/// The longest token looked at (a JWT with a few dozen permissions is ~2 KiB).
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The `[bearer]` section: optional JWT bearer-token authentication. Off when absent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BearerConfig {
    /// Required `iss`.
    pub issuer: String,
    /// Accepted `aud` values (a string or a list); the token must name at least one.
    #[serde(deserialize_with = "one_or_many")]
    pub audience: Vec<String>,
    /// A JWKS document on disk (reloaded on change or SIGHUP).
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// A JWKS URL (https; http only on loopback), fetched at start and every
    /// `jwks_refresh_seconds`, and sooner when a token names a key it does not have.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// CA bundle for the JWKS URL's certificate (default: the system's trust roots).
    #[serde(default)]
    pub jwks_ca: Option<PathBuf>,
    #[serde(default = "default_refresh")]
    pub jwks_refresh_seconds: u64,
    /// The claim holding `namespace:role` permissions.
    #[serde(default = "default_permissions_claim")]
    pub permissions_claim: String,
    /// Gone: a token's identity is always `jwt:` + `sub`, so token subjects and certificate
    /// names never meet. Kept only to refuse old configs with a message that says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_prefix: Option<String>,
    /// Accepted signature algorithms (asymmetric only).
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(default = "default_leeway")]
    pub leeway_seconds: u64,
}

fn default_refresh() -> u64 {
    300
}
fn default_permissions_claim() -> String {
    "permissions".into()
}
fn default_leeway() -> u64 {
    30
}
fn default_algorithms() -> Vec<String> {
    [
        "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
    ]
    .map(String::from)
    .to_vec()
}

fn one_or_many<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    })
}

fn parse_algorithm(name: &str) -> Option<Algorithm> {
    use Algorithm::*;
    Some(match name {
        "RS256" => RS256,
        "RS384" => RS384,
        "RS512" => RS512,
        "PS256" => PS256,
        "PS384" => PS384,
        "PS512" => PS512,
        "ES256" => ES256,
        "ES384" => ES384,
        "EdDSA" => EdDSA,
        // HS*: a symmetric key in a JWKS is a shared secret anyone holding the JWKS could sign
        // with. Refused.
        _ => return None,
    })
}

impl BearerConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.issuer.is_empty() {
            return Err("bearer.issuer must not be empty".into());
        }
        if self.identity_prefix.is_some() {
            return Err("bearer.identity_prefix is no longer supported: a token's identity is always \"jwt:\" + its subject; write policy entries as \"jwt:SUBJECT\"".into());
        }
        if self.audience.is_empty() || self.audience.iter().any(String::is_empty) {
            return Err("bearer.audience must name at least one non-empty audience".into());
        }
        if self.jwks_file.is_none() && self.jwks_url.is_none() {
            return Err("bearer: set jwks_file, jwks_url, or both".into());
        }
        if let Some(url) = &self.jwks_url {
            jwks_uri(url)?;
        }
        if self.jwks_refresh_seconds < 10 {
            return Err("bearer.jwks_refresh_seconds must be at least 10".into());
        }
        if self.algorithms.is_empty() {
            return Err("bearer.algorithms must not be empty".into());
        }
        for name in &self.algorithms {
            if parse_algorithm(name).is_none() {
                return Err(format!(
                    "bearer.algorithms: {name:?} is not accepted (asymmetric only: RS256/384/512, PS256/384/512, ES256/384, EdDSA)"
                ));
            }
        }
        if self.permissions_claim.is_empty() {
            return Err("bearer.permissions_claim must not be empty".into());
        }
        Ok(())
    }

    pub fn resolve_paths(&mut self, base: &Path) {
        for path in [&mut self.jwks_file, &mut self.jwks_ca]
            .into_iter()
            .flatten()
        {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
    }
}

/// A JWKS URL must be https, or http on a loopback host.
fn jwks_uri(url: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("bearer.jwks_url {url:?}: {e}"))?;
    let host = uri
        .host()
        .ok_or_else(|| format!("bearer.jwks_url {url:?} has no host"))?;
    match uri.scheme_str() {
        Some("https") => Ok(uri),
        Some("http") if is_loopback_host(host) => Ok(uri),
        _ => Err(format!(
            "bearer.jwks_url {url:?} must be https (http only on a loopback host)"
        )),
    }
}

fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare == "localhost"
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Who a verified token says the caller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BearerIdentity {
    /// `jwt:` + `sub`: the name policies and audit lines use.
    pub identity: String,
    pub roles: ClaimedRoles,
    /// `exp`, seconds since the epoch.
    pub expires_at: u64,
}

/// Why a token was refused. Messages never include the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BearerError {
    #[error("the authorization header is not `Bearer <token>`")]
    NotBearer,
    #[error("more than one authorization header")]
    Ambiguous,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("token algorithm {0} is not accepted")]
    Algorithm(String),
    #[error("no key {0} in the configured JWKS")]
    UnknownKey(String),
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token issuer is not the configured issuer")]
    Issuer,
    #[error("token audience is not accepted")]
    Audience,
    #[error("token signature does not verify")]
    Signature,
    #[error("token lacks the {0} claim")]
    MissingClaim(String),
    #[error("token `sub` must be a non-empty string")]
    Subject,
}

#[derive(Debug, thiserror::Error)]
pub enum BearerSetupError {
    #[error("bearer: cannot read JWKS file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("bearer: {0}")]
    Invalid(String),
}

/// One verification key from a JWKS.
#[derive(Clone)]
pub(crate) struct VerifyingKey {
    kid: Option<String>,
    /// The JWK's own `alg`, when it names one: tokens must then use exactly that.
    alg: Option<Algorithm>,
    /// Algorithms the key type can verify.
    fits: &'static [Algorithm],
    key: DecodingKey,
}

impl VerifyingKey {
    fn accepts(&self, alg: Algorithm) -> bool {
        self.fits.contains(&alg) && self.alg.is_none_or(|own| own == alg)
    }
}

/// Parses a JWKS document, keeping the signature keys it can use and skipping (with a log line)
/// the rest: encryption keys, symmetric keys, unknown key types.
pub(crate) fn parse_jwks(text: &[u8]) -> Result<Vec<VerifyingKey>, String> {
    #[derive(Deserialize)]
    struct Document {
        keys: Vec<serde_json::Value>,
    }
    let document: Document =
        serde_json::from_slice(text).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut keys = Vec::new();
    for (index, raw) in document.keys.into_iter().enumerate() {
        let jwk: Jwk = match serde_json::from_value(raw) {
            Ok(jwk) => jwk,
            Err(e) => {
                tracing::warn!(index, error = %e, "JWKS: skipping a key that does not parse");
                continue;
            }
        };
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }
        use Algorithm::*;
        let fits: &'static [Algorithm] = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => &[RS256, RS384, RS512, PS256, PS384, PS512],
            AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                EllipticCurve::P256 => &[ES256],
                EllipticCurve::P384 => &[ES384],
                _ => {
                    tracing::warn!(index, "JWKS: skipping an EC key on an unsupported curve");
                    continue;
                }
            },
            AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
                &[EdDSA]
            }
            _ => {
                tracing::warn!(index, "JWKS: skipping a symmetric or unsupported key");
                continue;
            }
        };
        let alg = jwk
            .common
            .key_algorithm
            .and_then(|a| parse_algorithm(&a.to_string()));
        let key = match DecodingKey::from_jwk(&jwk) {
            Ok(key) => key,
            Err(e) => {
                tracing::warn!(index, error = %e, "JWKS: skipping a key that does not load");
                continue;
            }
        };
        keys.push(VerifyingKey {
            kid: jwk.common.key_id.clone(),
            alg,
            fits,
            key,
        });
    }
    if keys.is_empty() {
        return Err("the JWKS holds no usable signature key".into());
    }
    Ok(keys)
}

type HttpsClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Empty<Bytes>,
>;

struct JwksFetcher {
    uri: http::Uri,
    client: HttpsClient,
}

impl JwksFetcher {
    fn new(config: &BearerConfig, url: &str) -> Result<JwksFetcher, BearerSetupError> {
        let uri = jwks_uri(url).map_err(BearerSetupError::Invalid)?;
        let mut roots = rustls::RootCertStore::empty();
        match &config.jwks_ca {
            Some(path) => {
                let certs = crate::tls::load_certs(path, "JWKS CA bundle")
                    .map_err(|e| BearerSetupError::Invalid(e.to_string()))?;
                for cert in certs {
                    roots
                        .add(cert)
                        .map_err(|e| BearerSetupError::Invalid(e.to_string()))?;
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                for error in &native.errors {
                    tracing::warn!(error = %error, "reading the system trust roots");
                }
                let (added, _) = roots.add_parsable_certificates(native.certs);
                if added == 0 && uri.scheme_str() == Some("https") {
                    return Err(BearerSetupError::Invalid(
                        "no system trust roots found for bearer.jwks_url: set bearer.jwks_ca"
                            .into(),
                    ));
                }
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| BearerSetupError::Invalid(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(connector);
        Ok(JwksFetcher { uri, client })
    }

    async fn fetch(&self) -> Result<Vec<VerifyingKey>, String> {
        let request = http::Request::get(self.uri.clone())
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let response = tokio::time::timeout(FETCH_TIMEOUT, async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("request failed: {e}"))?;
            if response.status() != http::StatusCode::OK {
                return Err(format!("HTTP status {}", response.status()));
            }
            Limited::new(response.into_body(), MAX_JWKS_BYTES)
                .collect()
                .await
                .map(|c| c.to_bytes())
                .map_err(|e| format!("reading the body: {e}"))
        })
        .await
        .map_err(|_| format!("no answer within {FETCH_TIMEOUT:?}"))??;
        parse_jwks(&response)
    }
}

/// Verifies bearer tokens against the configured JWKS. Shared by the gRPC pipeline and the
/// codec server.
pub struct BearerVerifier {
    config: BearerConfig,
    algorithms: Vec<Algorithm>,
    file_keys: RwLock<Arc<Vec<VerifyingKey>>>,
    url_keys: RwLock<Arc<Vec<VerifyingKey>>>,
    fetcher: Option<JwksFetcher>,
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for BearerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerVerifier")
            .field("issuer", &self.config.issuer)
            .field("audience", &self.config.audience)
            .finish_non_exhaustive()
    }
}

impl BearerVerifier {
    /// Loads the JWKS file (which must be valid) and fetches the URL once (a failure is logged:
    /// tokens are refused until a fetch succeeds, certificate callers are unaffected).
    pub async fn new(config: &BearerConfig) -> Result<Arc<BearerVerifier>, BearerSetupError> {
        config.validate().map_err(BearerSetupError::Invalid)?;
        let algorithms = config
            .algorithms
            .iter()
            .filter_map(|a| parse_algorithm(a))
            .collect();
        let file_keys = match &config.jwks_file {
            Some(path) => read_jwks_file(path)?,
            None => Vec::new(),
        };
        let fetcher = config
            .jwks_url
            .as_deref()
            .map(|url| JwksFetcher::new(config, url))
            .transpose()?;
        let verifier = Arc::new(BearerVerifier {
            config: config.clone(),
            algorithms,
            file_keys: RwLock::new(Arc::new(file_keys)),
            url_keys: RwLock::new(Arc::default()),
            fetcher,
            last_fetch: tokio::sync::Mutex::new(None),
        });
        if verifier.fetcher.is_some() {
            if let Err(e) = verifier.refetch(true).await {
                tracing::error!(error = %e, "bearer: cannot fetch the JWKS; tokens are refused until it can be fetched");
            }
        }
        Ok(verifier)
    }

    pub fn config(&self) -> &BearerConfig {
        &self.config
    }

    /// Reloads the JWKS file on change or SIGHUP, and refetches the URL periodically.
    pub fn spawn_refreshers(self: &Arc<Self>) {
        if let Some(path) = self.config.jwks_file.clone() {
            let verifier = Arc::downgrade(self);
            crate::reload::spawn_reloader("jwks", vec![path.clone()], move || {
                let Some(verifier) = verifier.upgrade() else {
                    return Ok(());
                };
                let keys = read_jwks_file(&path).map_err(|e| e.to_string())?;
                *verifier
                    .file_keys
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = Arc::new(keys);
                Ok(())
            });
        }
        if self.fetcher.is_some() {
            let verifier = Arc::downgrade(self);
            let period = Duration::from_secs(self.config.jwks_refresh_seconds);
            tokio::spawn(async move {
                let mut ticker = tokio::time::interval(period);
                ticker.tick().await;
                loop {
                    ticker.tick().await;
                    let Some(verifier) = verifier.upgrade() else {
                        return;
                    };
                    if let Err(e) = verifier.refetch(true).await {
                        tracing::warn!(error = %e, "bearer: JWKS refresh failed; keeping the keys in force");
                    }
                }
            });
        }
    }

    /// Fetches the JWKS URL now (`force`) or unless it was fetched very recently. A failure
    /// keeps the keys in force.
    async fn refetch(&self, force: bool) -> Result<bool, String> {
        let Some(fetcher) = &self.fetcher else {
            return Ok(false);
        };
        let mut last = if force {
            self.last_fetch.lock().await
        } else {
            // A token naming an unknown key does not wait behind a fetch already running: calls
            // are authenticated before their bodies are read, and a waiting call's body would
            // sit in HTTP/2's buffers meanwhile.
            match self.last_fetch.try_lock() {
                Ok(last) => last,
                Err(_) => return Ok(false),
            }
        };
        if !force && last.is_some_and(|at| at.elapsed() < MIN_REFETCH_INTERVAL) {
            return Ok(false);
        }
        *last = Some(Instant::now());
        let keys = fetcher.fetch().await?;
        tracing::debug!(keys = keys.len(), "bearer: JWKS fetched");
        *self
            .url_keys
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(keys);
        Ok(true)
    }

    /// Verifies an `authorization` header value (`Bearer <jwt>`).
    pub async fn verify_header(&self, value: &HeaderValue) -> Result<BearerIdentity, BearerError> {
        let text = value.to_str().map_err(|_| BearerError::NotBearer)?;
        let (scheme, token) = text.split_once(' ').ok_or(BearerError::NotBearer)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(BearerError::NotBearer);
        }
        self.verify(token.trim()).await
    }

    /// Verifies a JWT: algorithm, key, signature, `iss`, `aud`, `exp`, `nbf`, `sub`.
    pub async fn verify(&self, token: &str) -> Result<BearerIdentity, BearerError> {
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return Err(BearerError::Malformed("empty or too long".into()));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| BearerError::Malformed(e.to_string()))?;
        if !self.algorithms.contains(&header.alg) {
            return Err(BearerError::Algorithm(format!("{:?}", header.alg)));
        }
        let mut candidates = self.candidates(header.kid.as_deref(), header.alg);
        if candidates.is_empty() && self.refetch(false).await.unwrap_or(false) {
            candidates = self.candidates(header.kid.as_deref(), header.alg);
        }
        if candidates.is_empty() {
            return Err(BearerError::UnknownKey(
                header
                    .kid
                    .map_or_else(|| "(no kid)".to_string(), |k| format!("{k:?}")),
            ));
        }
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&self.config.audience);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = self.config.leeway_seconds;
        let mut last_error = BearerError::Signature;
        for key in candidates {
            match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
                token,
                &key.key,
                &validation,
            ) {
                Ok(data) => return self.identity(&data.claims),
                Err(e) => {
                    last_error = map_error(e);
                    // Only a signature failure is worth trying the next key for.
                    if last_error != BearerError::Signature {
                        return Err(last_error);
                    }
                }
            }
        }
        Err(last_error)
    }

    fn candidates(&self, kid: Option<&str>, alg: Algorithm) -> Vec<VerifyingKey> {
        let file = self
            .file_keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let url = self
            .url_keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        file.iter()
            .chain(url.iter())
            .filter(|k| k.accepts(alg))
            .filter(|k| match kid {
                Some(kid) => k.kid.as_deref() == Some(kid),
                None => true,
            })
            .take(8)
            .cloned()
            .collect()
    }

    fn identity(
        &self,
        claims: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<BearerIdentity, BearerError> {
        let subject = claims
            .get("sub")
            .and_then(|s| s.as_str())
            .filter(|s| !s.is_empty())
            .ok_or(BearerError::Subject)?;
        let expires_at = claims.get("exp").and_then(|e| e.as_u64()).unwrap_or(0);
        let roles = claims
            .get(&self.config.permissions_claim)
            .map(roles_from_permissions)
            .unwrap_or_default();
        Ok(BearerIdentity {
            identity: format!("{JWT_PREFIX}{subject}"),
            roles,
            expires_at,
        })
    }
}

fn read_jwks_file(path: &Path) -> Result<Vec<VerifyingKey>, BearerSetupError> {
    let text = std::fs::read(path).map_err(|e| BearerSetupError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    parse_jwks(&text).map_err(|reason| BearerSetupError::File {
        path: path.to_path_buf(),
        reason,
    })
}

fn map_error(error: jsonwebtoken::errors::Error) -> BearerError {
    use jsonwebtoken::errors::ErrorKind as K;
    match error.kind() {
        K::ExpiredSignature => BearerError::Expired,
        K::ImmatureSignature => BearerError::NotYetValid,
        K::InvalidIssuer => BearerError::Issuer,
        K::InvalidAudience => BearerError::Audience,
        K::InvalidSignature | K::InvalidEcdsaKey | K::InvalidRsaKey(_) | K::Crypto(_) => {
            BearerError::Signature
        }
        K::MissingRequiredClaim(claim) => BearerError::MissingClaim(claim.clone()),
        K::InvalidAlgorithm | K::MissingAlgorithm => BearerError::Algorithm("mismatch".into()),
        other => BearerError::Malformed(format!("{other:?}")),
    }
}

/// Roles from a permissions claim, following Temporal's default claim mapper.
pub fn roles_from_permissions(claim: &serde_json::Value) -> ClaimedRoles {
    let mut roles = ClaimedRoles::default();
    let Some(entries) = claim.as_array() else {
        return roles;
    };
    for entry in entries {
        let Some((namespace, role)) = entry.as_str().and_then(|p| p.split_once(':')) else {
            continue;
        };
        let role = match role.to_ascii_lowercase().as_str() {
            "read" => Role::Reader,
            "write" => Role::Writer,
            "admin" => Role::Admin,
            // "worker" and anything else: no role.
            _ => continue,
        };
        if namespace.is_empty() {
            continue;
        }
        if namespace == SYSTEM_NAMESPACE {
            roles.grant_system(role);
        } else {
            roles.grant_namespace(namespace, role);
        }
    }
    roles
}

/// A signing key and its JWKS, for `portcullis dev` and tests: an ECDSA P-256 key (ES256).
pub struct DevSigningKey {
    pub kid: String,
    /// PKCS#8 DER of the private key.
    pkcs8: Vec<u8>,
    public_point: Vec<u8>,
}

impl DevSigningKey {
    pub fn generate(kid: &str) -> Result<DevSigningKey, String> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .map_err(|e| e.to_string())?;
        Self::from_pkcs8(kid, pkcs8.as_ref())
    }

    pub fn from_pkcs8(kid: &str, pkcs8: &[u8]) -> Result<DevSigningKey, String> {
        use ring::signature::KeyPair as _;
        let rng = ring::rand::SystemRandom::new();
        let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8,
            &rng,
        )
        .map_err(|e| e.to_string())?;
        Ok(DevSigningKey {
            kid: kid.to_string(),
            pkcs8: pkcs8.to_vec(),
            public_point: pair.public_key().as_ref().to_vec(),
        })
    }

    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The JWKS document holding this key's public half.
    pub fn jwks(&self) -> serde_json::Value {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        // Uncompressed point: 0x04 || x (32) || y (32).
        let (x, y) = self
            .public_point
            .get(1..)
            .map(|xy| xy.split_at(xy.len() / 2))
            .unwrap_or((&[], &[]));
        serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": self.kid,
            "x": b64.encode(x), "y": b64.encode(y),
        }]})
    }

    /// Signs `claims` (ES256, with this key's `kid`).
    pub fn sign(&self, claims: &serde_json::Value) -> Result<String, String> {
        let mut header = jsonwebtoken::Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(
            &header,
            claims,
            &jsonwebtoken::EncodingKey::from_ec_der(&self.pkcs8),
        )
        .map_err(|e| e.to_string())
    }
}

/// Seconds since the epoch.
pub fn now_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(jwks: &Path) -> BearerConfig {
        toml::from_str(&format!(
            "issuer = \"https://issuer.test\"\naudience = \"portcullis\"\njwks_file = \"{}\"\n",
            jwks.display()
        ))
        .unwrap()
    }

    fn claims(exp_offset: i64, aud: &str, permissions: serde_json::Value) -> serde_json::Value {
        json!({
            "iss": "https://issuer.test", "aud": aud, "sub": "alice",
            "exp": (now_seconds() as i64 + exp_offset), "permissions": permissions,
        })
    }

    async fn setup() -> (tempfile::TempDir, DevSigningKey, Arc<BearerVerifier>) {
        let dir = tempfile::tempdir().unwrap();
        let key = DevSigningKey::generate("k1").unwrap();
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, key.jwks().to_string()).unwrap();
        let verifier = BearerVerifier::new(&config(&path)).await.unwrap();
        (dir, key, verifier)
    }

    #[test]
    fn permissions_follow_temporals_claim_mapper() {
        let roles = roles_from_permissions(&json!([
            "payments:write",
            "payments:read",
            "orders:READ",
            "temporal-system:admin",
            "noroleseparator",
            42,
            "billing:worker",
            "x:unknown",
            ":admin",
            "ns:with:colons:read",
        ]));
        assert_eq!(roles.namespaces.get("payments"), Some(&Role::Writer));
        assert_eq!(roles.namespaces.get("orders"), Some(&Role::Reader));
        assert_eq!(roles.system, Some(Role::Admin));
        assert!(!roles.namespaces.contains_key("billing"));
        assert!(!roles.namespaces.contains_key("x"));
        assert!(!roles.namespaces.contains_key(""));
        // Split at the first colon, as Temporal does: "ns" with role "with:colons:read".
        assert!(!roles.namespaces.contains_key("ns"));
        assert_eq!(
            roles_from_permissions(&json!("a:read")),
            ClaimedRoles::default()
        );
    }

    #[tokio::test]
    async fn valid_tokens_verify_and_bad_ones_say_why() {
        let (_dir, key, verifier) = setup().await;
        let good = key
            .sign(&claims(300, "portcullis", json!(["alpha:write"])))
            .unwrap();
        let who = verifier.verify(&good).await.unwrap();
        assert_eq!(who.identity, "jwt:alice");
        assert_eq!(who.roles.namespaces.get("alpha"), Some(&Role::Writer));
        let header = HeaderValue::from_str(&format!("bearer {good}")).unwrap();
        assert!(verifier.verify_header(&header).await.is_ok());

        let expired = key.sign(&claims(-3600, "portcullis", json!([]))).unwrap();
        assert_eq!(verifier.verify(&expired).await, Err(BearerError::Expired));
        let wrong_aud = key.sign(&claims(300, "someone-else", json!([]))).unwrap();
        assert_eq!(
            verifier.verify(&wrong_aud).await,
            Err(BearerError::Audience)
        );
        let other_key = DevSigningKey::generate("k1").unwrap();
        let forged = other_key
            .sign(&claims(300, "portcullis", json!([])))
            .unwrap();
        assert_eq!(verifier.verify(&forged).await, Err(BearerError::Signature));
        let unknown = DevSigningKey::generate("k2").unwrap();
        let unknown = unknown.sign(&claims(300, "portcullis", json!([]))).unwrap();
        assert!(matches!(
            verifier.verify(&unknown).await,
            Err(BearerError::UnknownKey(_))
        ));
        let mut wrong_iss = claims(300, "portcullis", json!([]));
        wrong_iss["iss"] = json!("https://evil.test");
        let wrong_iss = key.sign(&wrong_iss).unwrap();
        assert_eq!(verifier.verify(&wrong_iss).await, Err(BearerError::Issuer));
        let mut no_sub = claims(300, "portcullis", json!([]));
        no_sub.as_object_mut().unwrap().remove("sub");
        let no_sub = key.sign(&no_sub).unwrap();
        assert!(verifier.verify(&no_sub).await.is_err());
        for junk in ["", "a.b.c", "not a token", &"x".repeat(20_000)] {
            assert!(verifier.verify(junk).await.is_err(), "{junk:.20}");
        }
        let basic = HeaderValue::from_static("Basic dXNlcjpwYXNz");
        assert_eq!(
            verifier.verify_header(&basic).await,
            Err(BearerError::NotBearer)
        );
    }

    #[tokio::test]
    async fn symmetric_and_none_algorithms_are_refused() {
        let (_dir, _key, verifier) = setup().await;
        // alg "none": header {"alg":"none"}, claims, empty signature.
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let none = format!(
            "{}.{}.",
            b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(claims(300, "portcullis", json!([])).to_string())
        );
        assert!(verifier.verify(&none).await.is_err());
        let hs = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &claims(300, "portcullis", json!(["alpha:admin"])),
            &jsonwebtoken::EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        assert!(matches!(
            verifier.verify(&hs).await,
            Err(BearerError::Algorithm(_))
        ));
        let mut cfg = verifier.config().clone();
        cfg.algorithms = vec!["HS256".into()];
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn config_validation() {
        let base = config(Path::new("/x/jwks.json"));
        assert!(base.validate().is_ok());
        let mut c = base.clone();
        c.jwks_file = None;
        assert!(c.validate().is_err());
        c.jwks_url = Some("http://idp.example/jwks".into());
        assert!(c.validate().is_err(), "plain http off loopback");
        c.jwks_url = Some("http://127.0.0.1:9/jwks".into());
        assert!(c.validate().is_ok());
        c.jwks_url = Some("https://idp.example/jwks".into());
        assert!(c.validate().is_ok());
        let mut c = base.clone();
        c.audience.clear();
        assert!(c.validate().is_err());
        let list: BearerConfig =
            toml::from_str("issuer = \"i\"\naudience = [\"a\", \"b\"]\njwks_file = \"j\"\n")
                .unwrap();
        assert_eq!(list.audience, vec!["a", "b"]);
        assert!(
            toml::from_str::<BearerConfig>("issuer = \"i\"\naudience = \"a\"\njwks = \"j\"\n")
                .is_err()
        );
    }
}
