//! The codec server: Temporal's remote codec protocol over HTTP, so the Web UI and the CLI show
//! plaintext payloads to those allowed to see them.
//!
//! `POST /decode` and `POST /encode` (also `/{namespace}/decode`, `/{namespace}/encode`; the
//! namespace otherwise comes from `X-Namespace`) take and return proto3-JSON Payloads. Decode
//! opens the envelopes this proxy sealed and leaves every other payload exactly as it is;
//! encode seals like the proxy does. Callers authenticate with a client certificate (HTTPS) or a
//! bearer token; decode needs the reader role in the namespace, encode the writer role, under
//! the proxy's own policies. Every decision is audited, with the payload count: decoding is a
//! disclosure.

pub mod config;
pub(crate) mod handler;
pub mod json;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

pub use config::{CodecConfig, CodecTls};
pub use handler::CodecService;

use crate::authz::{AuditLog, BearerVerifier, PolicyStore};
use crate::proxy::Encryption;
use crate::tls::PeerInfo;

/// At most this many connections are served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 512;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the codec server shares with the gRPC pipeline.
#[derive(Clone)]
pub struct CodecDeps {
    pub encryption: Arc<Encryption>,
    /// None when authorization is disabled: every authenticated caller may decode and encode.
    pub policies: Option<Arc<PolicyStore>>,
    pub audit: Arc<AuditLog>,
    pub bearer: Option<Arc<BearerVerifier>>,
    /// Namespace translation: a caller that names a namespace by its upstream name (a Web UI
    /// talking to the upstream directly) is served as its client-facing name, whose policies,
    /// keys and associated data apply.
    pub translation: Option<Arc<crate::proxy::TranslationStore>>,
}

/// Settings that no config file can turn on.
#[derive(Debug, Clone, Copy, Default)]
pub struct CodecOptions {
    /// `portcullis dev` only: callers with neither a certificate nor a token may decode (never
    /// encode), so the dev server's Web UI shows plaintext without a login. Refused unless the
    /// codec listener is plain HTTP on a loopback address, and applied only to loopback peers.
    pub dev_anonymous_reader: bool,
}

/// The identity the dev-only anonymous reader is audited as.
pub const DEV_ANONYMOUS_IDENTITY: &str = "portcullis-dev:anonymous-reader";

#[derive(Debug, thiserror::Error)]
pub enum CodecSetupError {
    #[error(
        "codec: the dev anonymous reader is only allowed on a plaintext loopback listener, not {0}"
    )]
    AnonymousOffLoopback(String),
    #[error("codec: {0}")]
    Invalid(String),
}

/// A running codec server.
pub struct RunningCodec {
    local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningCodec {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The base URL clients use (`--codec-endpoint`, `--ui-codec-endpoint`).
    pub fn url(&self, tls: bool) -> String {
        format!(
            "{}://{}",
            if tls { "https" } else { "http" },
            self.local_addr
        )
    }

    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

/// Checks `options` against `config`: the dev anonymous reader only on plaintext loopback.
pub fn check_options(config: &CodecConfig, options: &CodecOptions) -> Result<(), CodecSetupError> {
    if options.dev_anonymous_reader {
        let loopback = config.socket_address().is_ok_and(|a| a.ip().is_loopback());
        if !loopback || config.tls.is_some() || !config.plaintext {
            return Err(CodecSetupError::AnonymousOffLoopback(
                config.address.clone(),
            ));
        }
    }
    Ok(())
}

/// Binds the codec listener and starts serving.
pub async fn start(
    config: &CodecConfig,
    deps: CodecDeps,
    options: CodecOptions,
) -> anyhow::Result<RunningCodec> {
    config.validate().map_err(CodecSetupError::Invalid)?;
    check_options(config, &options)?;
    let acceptor = match &config.tls {
        Some(tls) => Some(TlsAcceptor::from(codec_tls(tls)?)),
        None => None,
    };
    let address = config.socket_address().map_err(CodecSetupError::Invalid)?;
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("codec: cannot listen on {address}"))?;
    let local_addr = listener.local_addr()?;
    if options.dev_anonymous_reader {
        tracing::warn!(address = %local_addr, "codec server: DEV MODE, callers without credentials may decode (loopback only)");
    }
    tracing::info!(address = %local_addr, tls = acceptor.is_some(), "codec server listening");
    let service = CodecService::new(config, deps, options);
    let (shutdown, shutdown_rx) = watch::channel(false);
    let task = tokio::spawn(accept_loop(
        listener,
        acceptor,
        service,
        Duration::from_secs(config.request_timeout_seconds),
        shutdown_rx,
    ));
    Ok(RunningCodec {
        local_addr,
        shutdown,
        task,
    })
}

/// Validates the section and loads its TLS material (for `portcullis check`).
pub fn check(config: &CodecConfig) -> anyhow::Result<()> {
    config.validate().map_err(CodecSetupError::Invalid)?;
    if let Some(tls) = &config.tls {
        codec_tls(tls)?;
    }
    Ok(())
}

fn codec_tls(tls: &CodecTls) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs = crate::tls::load_certs(&tls.cert, "codec certificate")?;
    let key = crate::tls::load_key(&tls.key, "codec key")?;
    let provider = crate::tls::provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mut config = match &tls.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in crate::tls::load_certs(ca, "codec client CA bundle")? {
                roots.add(cert)?;
            }
            // Certificates are optional at the handshake: browsers come with bearer tokens.
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()?;
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs, key)?
        }
        None => builder.with_no_client_auth().with_single_cert(certs, key)?,
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    service: CodecService,
    timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let permit = tokio::select! {
            _ = shutdown.changed() => break,
            permit = slots.clone().acquire_owned() => permit,
        };
        let Ok(permit) = permit else { break };
        let accepted = tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "codec: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (acceptor, service) = (acceptor.clone(), service.clone());
        connections.spawn(async move {
            let _permit = permit;
            let remote = remote.to_string();
            match acceptor {
                Some(acceptor) => {
                    let stream =
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                        {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(e)) => {
                                tracing::debug!(peer = %remote, error = %e, "codec: TLS handshake refused");
                                return;
                            }
                            Err(_) => return,
                        };
                    let peer =
                        PeerInfo::from_certificates(remote, stream.get_ref().1.peer_certificates());
                    serve(stream, service.for_peer(peer), timeout).await;
                }
                None => {
                    let peer = PeerInfo {
                        remote,
                        ..Default::default()
                    };
                    serve(stream, service.for_peer(peer), timeout).await;
                }
            }
        });
    }
    drop(listener);
    // In-flight requests are bounded by the request timeout.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    connections.shutdown().await;
}

async fn serve<IO>(io: IO, service: handler::PeerService, timeout: Duration)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(io), service);
    if let Err(e) = connection.await {
        tracing::debug!(error = %e, "codec: connection closed with error");
    }
}
