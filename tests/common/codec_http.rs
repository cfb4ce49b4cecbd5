//! A small HTTP/1.1 client (plain or TLS, with or without a client certificate) for the codec
//! server's JSON endpoints.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::Value;

use super::{ClientCert, Pki};

pub struct Http {
    client: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Full<Bytes>,
    >,
    base: String,
}

pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Value,
}

impl Http {
    pub fn plain(address: SocketAddr) -> Http {
        Http::with_tls(format!("http://{address}"), None)
    }

    pub fn tls(address: SocketAddr, pki: &Pki, client: Option<&ClientCert>) -> Http {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(&pki.ca_path).expect("ca"))
            .expect("add ca");
        let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
        let config = match client {
            Some(c) => builder
                .with_client_auth_cert(
                    CertificateDer::pem_file_iter(&c.cert)
                        .expect("cert")
                        .collect::<Result<Vec<_>, _>>()
                        .expect("certs"),
                    PrivateKeyDer::from_pem_file(&c.key).expect("key"),
                )
                .expect("client auth"),
            None => builder.with_no_client_auth(),
        };
        Http::with_tls(
            format!("https://localhost:{}", address.port()),
            Some(config),
        )
    }

    pub fn with_tls(base: String, tls: Option<rustls::ClientConfig>) -> Http {
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let connector = match tls {
            Some(tls) => builder
                .with_tls_config(tls)
                .https_or_http()
                .enable_http1()
                .build(),
            None => builder
                .with_tls_config(
                    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                        rustls::crypto::ring::default_provider(),
                    ))
                    .with_safe_default_protocol_versions()
                    .expect("versions")
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth(),
                )
                .https_or_http()
                .enable_http1()
                .build(),
        };
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(connector);
        Http { client, base }
    }

    pub async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Answer {
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = self
            .client
            .request(request.body(Full::new(Bytes::from(body))).expect("request"))
            .await
            .expect("codec request");
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.expect("body").to_bytes();
        Answer {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }

    pub async fn post(&self, path: &str, headers: &[(&str, &str)], body: &Value) -> Answer {
        let mut all = vec![("content-type", "application/json")];
        all.extend_from_slice(headers);
        self.send("POST", path, &all, body.to_string().into_bytes())
            .await
    }
}
