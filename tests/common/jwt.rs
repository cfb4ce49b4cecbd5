//! A test token issuer: an ES256 signing key, its JWKS (as a file and served over HTTPS), and
//! tokens with chosen subject, permissions, audience and expiry.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use portcullis::authz::bearer::{now_seconds, DevSigningKey};
use serde_json::{json, Value};

use super::Pki;

pub const ISSUER: &str = "https://issuer.portcullis.test";
pub const AUDIENCE: &str = "portcullis-test";

pub struct Issuer {
    pub key: DevSigningKey,
    pub jwks_file: PathBuf,
}

impl Issuer {
    /// A fresh key whose JWKS is written next to the PKI.
    pub fn new(pki: &Pki) -> Issuer {
        let key = DevSigningKey::generate("test-key-1").expect("signing key");
        let jwks_file = pki.dir.path().join("jwks.json");
        std::fs::write(&jwks_file, key.jwks().to_string()).expect("write jwks");
        Issuer { key, jwks_file }
    }

    /// A valid token for `sub` holding `permissions`, expiring in an hour.
    pub fn token(&self, sub: &str, permissions: &[&str]) -> String {
        self.token_with(sub, permissions, AUDIENCE, 3600)
    }

    pub fn token_with(
        &self,
        sub: &str,
        permissions: &[&str],
        aud: &str,
        expires_in: i64,
    ) -> String {
        let claims = json!({
            "iss": ISSUER,
            "aud": aud,
            "sub": sub,
            "iat": now_seconds(),
            "exp": now_seconds() as i64 + expires_in,
            "permissions": permissions,
        });
        self.key.sign(&claims).expect("sign")
    }

    /// The `[bearer]` section for a proxy trusting this issuer through its JWKS file.
    pub fn bearer_toml(&self) -> String {
        format!(
            "issuer = \"{ISSUER}\"\naudience = \"{AUDIENCE}\"\njwks_file = \"{}\"\n",
            self.jwks_file.display()
        )
    }

    pub fn bearer_config(&self) -> portcullis::authz::BearerConfig {
        toml::from_str(&self.bearer_toml()).expect("bearer config")
    }
}

/// A token signed by a key the proxy does not trust (same `kid`, so only the signature is wrong).
pub fn forged_token(sub: &str, permissions: &[&str]) -> String {
    let other = DevSigningKey::generate("test-key-1").expect("key");
    let claims = json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": sub,
        "exp": now_seconds() + 3600, "permissions": permissions,
    });
    other.sign(&claims).expect("sign")
}

/// An HTTPS server answering every GET with the current JWKS document, counting fetches.
pub struct JwksServer {
    pub address: SocketAddr,
    pub document: Arc<Mutex<Value>>,
    pub fetches: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl JwksServer {
    pub async fn start(pki: &Pki, document: Value) -> JwksServer {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_file_iter(&pki.server_cert)
            .expect("cert")
            .collect::<Result<Vec<_>, _>>()
            .expect("certs");
        let key = PrivateKeyDer::from_pem_file(&pki.server_key).expect("key");
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("addr");
        let document = Arc::new(Mutex::new(document));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (doc, count) = (document.clone(), fetches.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, doc, count) = (acceptor.clone(), doc.clone(), count.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |_request| {
                        count.fetch_add(1, Ordering::SeqCst);
                        let body = doc.lock().expect("lock").to_string();
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(body)))
                                    .expect("response"),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        JwksServer {
            address,
            document,
            fetches,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!(
            "https://localhost:{}/.well-known/jwks.json",
            self.address.port()
        )
    }
}
