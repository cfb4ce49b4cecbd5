//! Per-call authentication when bearer tokens are on, done by the edge from a call's headers
//! before a byte of its body is read: a call needs a verified client certificate or a valid
//! `authorization: Bearer <jwt>`. A token, when sent, must verify (no falling back to the
//! certificate), and it names the caller for this call. The `authorization` header is removed
//! here, valid or not: the caller's token is never forwarded upstream.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::AUTHORIZATION;
use http::HeaderMap;

use crate::authz::{BearerError, BearerVerifier};
use crate::error::ProxyError;
use crate::tls::PeerInfo;

/// Authenticates calls against the bearer-token verifier (and the connection's certificate).
#[derive(Debug, Clone)]
pub struct Authenticator {
    verifier: Arc<BearerVerifier>,
    /// Clock skew allowed on `exp` (the verifier's `leeway_seconds`): a call authenticated by a
    /// token runs until `exp` plus this, and no longer.
    leeway: Duration,
}

/// A call's authenticated caller.
#[derive(Debug)]
pub struct Authenticated {
    pub peer: Arc<PeerInfo>,
    /// For a token: when it stops being valid. The call is cut then.
    pub valid_until: Option<SystemTime>,
}

/// Why a call was refused, for the audit line and the answer.
#[derive(Debug)]
pub struct AuthnFailure {
    /// `no_credential`, `invalid_token` or `ambiguous_token`.
    pub reason: &'static str,
    /// The credential the caller presented: `none` or `bearer`.
    pub credential: &'static str,
    pub error: ProxyError,
}

impl Authenticator {
    pub fn new(verifier: Arc<BearerVerifier>) -> Authenticator {
        let leeway = Duration::from_secs(verifier.config().leeway_seconds);
        Authenticator { verifier, leeway }
    }

    /// Authenticates one call from its headers, removing every `authorization` header.
    pub async fn authenticate(
        &self,
        headers: &mut HeaderMap,
        peer: &Arc<PeerInfo>,
    ) -> Result<Authenticated, AuthnFailure> {
        let presented = headers.get_all(AUTHORIZATION).iter().count();
        let header = headers.remove(AUTHORIZATION);
        let refused = |reason, error: BearerError| AuthnFailure {
            reason,
            credential: "bearer",
            error: ProxyError::Unauthenticated(error.to_string()),
        };
        match header {
            Some(_) if presented > 1 => Err(refused("ambiguous_token", BearerError::Ambiguous)),
            Some(value) => {
                let identity = self
                    .verifier
                    .verify_header(&value)
                    .await
                    .map_err(|e| refused("invalid_token", e))?;
                let valid_until =
                    UNIX_EPOCH + Duration::from_secs(identity.expires_at) + self.leeway;
                Ok(Authenticated {
                    peer: Arc::new(PeerInfo {
                        token: Some(Arc::new(identity)),
                        ..PeerInfo::clone(peer)
                    }),
                    valid_until: Some(valid_until),
                })
            }
            None if peer.has_certificate => Ok(Authenticated {
                peer: peer.clone(),
                valid_until: None,
            }),
            None => Err(AuthnFailure {
                reason: "no_credential",
                credential: "none",
                error: ProxyError::Unauthenticated(
                    "a verified client certificate or a bearer token is required".into(),
                ),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::bearer::{now_seconds, DevSigningKey};
    use crate::authz::BearerConfig;
    use http::HeaderValue;

    async fn authenticator(key: &DevSigningKey) -> (Authenticator, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let jwks = dir.path().join("jwks.json");
        std::fs::write(&jwks, key.jwks().to_string()).unwrap();
        let config: BearerConfig = toml::from_str(&format!(
            "issuer = \"iss\"\naudience = \"aud\"\njwks_file = \"{}\"\nleeway_seconds = 5\n",
            jwks.display()
        ))
        .unwrap();
        let verifier = BearerVerifier::new(&config).await.unwrap();
        (Authenticator::new(verifier), dir)
    }

    fn token(key: &DevSigningKey, exp: u64) -> HeaderValue {
        let claims = serde_json::json!({"iss": "iss", "aud": "aud", "sub": "carol", "exp": exp});
        HeaderValue::from_str(&format!("Bearer {}", key.sign(&claims).unwrap())).unwrap()
    }

    #[tokio::test]
    async fn calls_need_a_certificate_or_a_valid_token_and_the_header_never_stays() {
        let key = DevSigningKey::generate("k1").unwrap();
        let (authn, _dir) = authenticator(&key).await;
        let anonymous = Arc::new(PeerInfo::default());
        let with_cert = Arc::new(PeerInfo {
            has_certificate: true,
            ..PeerInfo::default()
        });

        let mut headers = HeaderMap::new();
        let failure = authn
            .authenticate(&mut headers, &anonymous)
            .await
            .unwrap_err();
        assert_eq!(
            (failure.reason, failure.credential),
            ("no_credential", "none")
        );
        assert_eq!(failure.error.code(), tonic::Code::Unauthenticated);
        let ok = authn.authenticate(&mut headers, &with_cert).await.unwrap();
        assert!(ok.valid_until.is_none() && ok.peer.token.is_none());

        // A valid token names the caller and bounds the call at exp + leeway.
        let exp = now_seconds() + 600;
        headers.insert(AUTHORIZATION, token(&key, exp));
        let ok = authn.authenticate(&mut headers, &anonymous).await.unwrap();
        assert!(!headers.contains_key(AUTHORIZATION));
        assert_eq!(
            ok.peer.token.as_ref().map(|t| t.identity.as_str()),
            Some("jwt:carol")
        );
        assert_eq!(
            ok.valid_until,
            Some(UNIX_EPOCH + Duration::from_secs(exp + 5))
        );

        // A bad token is refused even with a certificate; two headers are ambiguous.
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer nope"));
        let failure = authn
            .authenticate(&mut headers, &with_cert)
            .await
            .unwrap_err();
        assert_eq!(failure.reason, "invalid_token");
        assert!(!headers.contains_key(AUTHORIZATION));
        headers.append(AUTHORIZATION, token(&key, exp));
        headers.append(AUTHORIZATION, token(&key, exp));
        let failure = authn
            .authenticate(&mut headers, &with_cert)
            .await
            .unwrap_err();
        assert_eq!(failure.reason, "ambiguous_token");
        assert!(!headers.contains_key(AUTHORIZATION));
    }
}
