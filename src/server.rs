//! Listeners, TLS accept, HTTP/2 serving and graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::Layer;

use crate::authz::{
    AuditLog, AuditSettings, AuthzLayer, BearerVerifier, EdgeAuditEvent, EdgeEventKind, PolicyStore,
};
use crate::codec::{CodecDeps, CodecOptions, RunningCodec};
use crate::config::{Config, ListenAddress};
use crate::error::ProxyError;
use crate::proxy::connection::{self, ConnectionSettings, Lifetime};
use crate::proxy::limits::{BufferBudget, CloseReason, ConnectionGate, ConnectionSlot, EdgeStats};
use crate::proxy::{
    Authenticator, EdgeShared, EncryptLayer, Encryption, EncryptionLimits, Forwarder, GrpcEdge,
    GrpcRequest, GrpcResponse, IdentityLayer, IdentityModes, IdentitySources, IdentityStore,
    NamespaceKey, NamespaceLayer, NamespaceListLayer, NamespaceTranslation, Pipeline,
    TranslateLayer, TranslationStore,
};
use crate::telemetry::readiness::{self, ProbeTargets};
use crate::telemetry::{
    admin, CertValidity, HealthLayer, Telemetry, TelemetryLayer, UpstreamTimerLayer,
};
use crate::tls::{ClientCertificate, PeerInfo, ReloadableServerConfig, RevocationSet};
use crate::upstream::Upstreams;
use crate::workers::Workers;

/// Everything the pipeline is built from, kept so that reloaders can be started.
pub struct PipelineParts {
    pub pipeline: Pipeline,
    pub policies: Option<Arc<PolicyStore>>,
    pub encryption: Option<Arc<Encryption>>,
    /// The bearer-token verifier, when `[bearer]` is configured. The edge authenticates with
    /// it (see [`serve_settings`]); it is not a pipeline stage.
    pub bearer: Option<Arc<BearerVerifier>>,
    /// The audit log: authorization decisions, authentication failures, refused connections.
    pub audit: Arc<AuditLog>,
    /// Namespace translation, when some namespace has an `upstream_namespace`.
    pub translation: Option<Arc<TranslationStore>>,
    /// Routing and upstream connections (credential expiry: [`Upstreams::certificate_expiry`]).
    pub upstreams: Arc<Upstreams>,
    /// The identity mode of each namespace (`[[namespaces]] identity`), swapped on reload.
    pub identity: Arc<IdentityStore>,
}

/// Builds the pipeline for a config: namespace → authorization → identity stamping →
/// encryption → namespace listing → namespace translation → forwarding. (Callers are authenticated before it, by the edge.)
/// Each stage is type-erased into a [`Pipeline`], so stages that a config turns off are simply
/// left out.
pub async fn build_pipeline(config: &Config) -> anyhow::Result<PipelineParts> {
    let upstreams = Upstreams::from_config(config)?;
    let mut pipeline: Pipeline = Pipeline::new(UpstreamTimerLayer.layer(Forwarder::new(
        upstreams.clone(),
        config.limits.max_response_bytes,
    )));

    // Inside encryption and authorization: both work with client-facing names (see translate.rs).
    let translation = NamespaceTranslation::from_config(config).map(TranslationStore::new);
    if let Some(store) = &translation {
        pipeline = Pipeline::new(TranslateLayer::new(store.clone()).layer(pipeline));
    }

    let policies = if config.authorization.disabled {
        tracing::warn!(
            "authorization is DISABLED: every authenticated caller may call every method"
        );
        None
    } else {
        Some(PolicyStore::new(
            &config.authorization,
            config.source.as_deref(),
        )?)
    };

    // Above translation: its DescribeNamespace calls use client-facing names.
    pipeline =
        Pipeline::new(NamespaceListLayer::new(upstreams.clone(), policies.clone()).layer(pipeline));

    let encryption = if config.encryption.disabled {
        tracing::warn!(
            "encryption is DISABLED: payloads are forwarded to the upstream as they are"
        );
        None
    } else {
        let mut built = Encryption::new(
            &config.encryption,
            &namespace_keys(config),
            config.routing.default_upstream.is_some(),
        )
        .await?
        .with_limits(encryption_limits(config));
        if let Some(offload) = &config.offload {
            let store = crate::offload::ObjectStore::new(offload)
                .await
                .map_err(|e| anyhow::anyhow!("offload: {e}"))?;
            built = built.with_offload(Arc::new(store));
        }
        let encryption = Arc::new(built);
        pipeline = Pipeline::new(EncryptLayer::new(encryption.clone()).layer(pipeline));
        Some(encryption)
    };

    // Opened whether or not authorization is on: refused connections and failed
    // authentications are audited too, and the codec server audits every disclosure.
    let audit = Arc::new(
        AuditLog::open(
            &config.authorization.audit_log,
            audit_settings(&config.limits),
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot open audit log {}: {e}",
                config.authorization.audit_log
            )
        })?,
    );
    // Right after authorization: the identity stamped is the one decided on and audited.
    let identity = IdentityStore::new(IdentityModes::from_config(config));
    let sources = match &policies {
        Some(store) => IdentitySources::Policies(store.clone()),
        None => IdentitySources::Fixed(config.authorization.identity.clone().into()),
    };
    pipeline = Pipeline::new(IdentityLayer::new(identity.clone(), sources).layer(pipeline));
    if let Some(policies) = &policies {
        pipeline = Pipeline::new(AuthzLayer::new(policies.clone(), audit.clone()).layer(pipeline));
    }

    pipeline = Pipeline::new(NamespaceLayer.layer(pipeline));
    let bearer = match &config.bearer {
        Some(bearer) => Some(BearerVerifier::new(bearer).await?),
        None => None,
    };
    Ok(PipelineParts {
        pipeline,
        policies,
        encryption,
        bearer,
        audit,
        translation,
        upstreams,
        identity,
    })
}

fn encryption_limits(config: &Config) -> EncryptionLimits {
    let limits = &config.limits;
    EncryptionLimits {
        max_payloads: limits.max_payloads_per_message,
        max_response_bytes: limits.max_response_bytes,
        off_thread_budget_bytes: limits.crypto_budget_bytes,
        off_thread_wait: Duration::from_secs(limits.crypto_wait_seconds),
    }
}

fn audit_settings(limits: &crate::config::Limits) -> AuditSettings {
    AuditSettings {
        queue_bytes: limits.audit_queue_bytes,
        stall: Duration::from_secs(limits.audit_stall_seconds),
    }
}

/// How each served namespace is encrypted, from its `[[namespaces]]` entry and `[encryption]`.
pub fn namespace_keys(config: &Config) -> Vec<NamespaceKey> {
    config
        .namespaces
        .iter()
        .map(|ns| NamespaceKey {
            namespace: ns.name.clone(),
            key: ns.encryption_key.clone(),
            encrypted_only: ns
                .encrypted_only
                .unwrap_or(config.encryption.encrypted_only),
            services: crate::offload::PayloadServices {
                compression: ns.compression,
                offload: ns.offload,
            },
        })
        .collect()
}

/// Applies the routing sections of a changed config file (upstreams, routing, namespaces) to a
/// running proxy: on file change and SIGHUP. All or nothing: a config that does not load, or
/// whose upstreams or namespace keys cannot be set up, is rejected with an error log line and
/// the running state stays. Sections that need a restart are named in a warning.
fn spawn_config_reloader(
    running: &Config,
    upstreams: Arc<Upstreams>,
    encryption: Option<Arc<Encryption>>,
    translation: Option<Arc<TranslationStore>>,
    identity: Arc<IdentityStore>,
) {
    let Some(path) = running.source.clone() else {
        return;
    };
    let fixed = |c: &Config| {
        (
            serde_json::to_value(&c.listener).ok(),
            serde_json::to_value(&c.limits).ok(),
            serde_json::to_value(&c.encryption).ok(),
            c.encryption.disabled,
            c.authorization.disabled,
        )
    };
    let started = std::sync::Mutex::new(fixed(running));
    let watched = path.clone();
    crate::reload::spawn_reloader(
        "config (upstreams, routing, namespaces)",
        vec![watched],
        move || {
            let config = Config::load(&path).map_err(|e| e.to_string())?;
            let keys = namespace_keys(&config);
            if let Some(encryption) = &encryption {
                encryption
                    .check_namespace_keys(&keys)
                    .map_err(|e| e.to_string())?;
            }
            // The translation stage is in the pipeline only when some namespace was translated
            // at start; switching it on or off needs a restart (refused, not half applied).
            let new_translation = match (&translation, NamespaceTranslation::from_config(&config)) {
                (Some(_), Some(t)) => Some(t),
                (None, None) => None,
                (None, Some(_)) => {
                    return Err("a namespace now has upstream_namespace, but none had at start: namespace translation needs a restart".into())
                }
                (Some(_), None) => {
                    return Err("no namespace has upstream_namespace any more: turning namespace translation off needs a restart".into())
                }
            };
            let summary = upstreams.apply(&config).map_err(|e| e.to_string())?;
            if let Some(encryption) = &encryption {
                encryption
                    .set_namespace_keys(&keys)
                    .map_err(|e| e.to_string())?;
            }
            if let (Some(store), Some(t)) = (&translation, new_translation) {
                store.replace(t);
            }
            identity.replace(IdentityModes::from_config(&config));
            if !summary.is_empty() {
                tracing::info!(changes = %summary, "routing updated from the config");
            }
            if let Ok(started) = started.lock() {
                if *started != fixed(&config) {
                    tracing::warn!("[listener], [limits], [encryption] or the disabled switches changed: those take effect after a restart");
                }
            }
            Ok(())
        },
    );
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// A running proxy. Dropping it does not stop it; call [`RunningProxy::shutdown`].
pub struct RunningProxy {
    local_addr: Option<SocketAddr>,
    upstreams: Arc<Upstreams>,
    admin_addr: Option<SocketAddr>,
    telemetry: Arc<Telemetry>,
    shutdown: watch::Sender<bool>,
    /// Stops the admin listener and the prober, after the calls drained.
    admin_shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    admin_task: Option<tokio::task::JoinHandle<()>>,
    codec: Option<RunningCodec>,
}

/// Start-up choices that no config file can make.
#[derive(Debug, Clone, Copy, Default)]
pub struct StartOptions {
    pub codec: CodecOptions,
}

impl RunningProxy {
    /// The bound TCP address (None for a Unix socket).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// The admin listener's address, when `[admin]` is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// This proxy's metrics and readiness (e.g. to register more certificates to watch).
    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }

    /// The codec server's bound address, when `[codec]` is configured.
    pub fn codec_addr(&self) -> Option<SocketAddr> {
        self.codec.as_ref().map(RunningCodec::local_addr)
    }

    /// The upstreams in force (routing, connections, credential expiry).
    pub fn upstreams(&self) -> &Arc<Upstreams> {
        &self.upstreams
    }

    /// Stops accepting, lets in-flight calls finish up to the configured grace period, then
    /// closes what remains. Readiness fails from the first moment; the admin listener stays up
    /// until the calls are drained.
    pub async fn shutdown(self) {
        self.telemetry.start_draining();
        let _ = self.shutdown.send(true);
        if let Some(codec) = self.codec {
            codec.shutdown().await;
        }
        let _ = self.task.await;
        let _ = self.admin_shutdown.send(true);
        if let Some(admin) = self.admin_task {
            let _ = admin.await;
        }
    }

    /// Runs until the process receives SIGTERM or Ctrl-C, then shuts down gracefully.
    pub async fn run_until_signal(self) {
        wait_for_signal().await;
        tracing::info!("shutdown signal received: draining in-flight calls");
        self.shutdown().await;
        tracing::info!("shut down");
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// A write past the process's file size limit (RLIMIT_FSIZE) raises SIGXFSZ, whose default
/// action ends the process. Handled instead, the write fails with EFBIG: the audit log then
/// fails closed (calls refused until it can write again) and everything else keeps serving.
fn survive_file_size_limit() {
    // SIGXFSZ's number on Linux (every architecture but MIPS) and the BSDs, macOS included.
    #[cfg(all(unix, not(any(target_arch = "mips", target_arch = "mips64"))))]
    const SIGXFSZ: i32 = 25;
    #[cfg(all(unix, any(target_arch = "mips", target_arch = "mips64")))]
    const SIGXFSZ: i32 = 31;
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let xfsz = SignalKind::from_raw(SIGXFSZ);
        // Once installed, tokio's handler stays for the life of the process: install it once
        // (a process may start several proxies, as the tests do).
        static INSTALLED: std::sync::Once = std::sync::Once::new();
        let mut first = false;
        INSTALLED.call_once(|| first = true);
        if !first {
            return;
        }
        if let Ok(mut received) = signal(xfsz) {
            tokio::spawn(async move {
                while received.recv().await.is_some() {
                    tracing::warn!("a write passed the file size limit (SIGXFSZ)");
                }
            });
        }
    }
}

/// Binds the listener and starts serving.
pub async fn start(config: Config) -> anyhow::Result<RunningProxy> {
    start_with(config, StartOptions::default()).await
}

/// Like [`start`], with options only the program itself can set (`portcullis dev`).
pub async fn start_with(config: Config, options: StartOptions) -> anyhow::Result<RunningProxy> {
    survive_file_size_limit();
    if let Some(codec) = &config.codec {
        // Refuse before anything binds.
        crate::codec::check_options(codec, &options.codec)?;
    }
    // Before anything reads the schema: the payload and namespace indexes follow it.
    let schema = crate::api::install(&config.schema, &config.authorization.method_access)?;
    if schema.sha256.is_some() {
        tracing::info!(
            schema = %schema.summary(),
            added_methods = ?schema.added_methods,
            added_payload_fields = ?schema.added_payload_fields,
            "API schema from the configured descriptor set"
        );
    }
    let PipelineParts {
        pipeline,
        policies,
        encryption,
        bearer,
        audit,
        translation,
        upstreams,
        identity,
    } = build_pipeline(&config).await?;
    if let Some(policies) = &policies {
        policies.spawn_reloader();
    }
    if let Some(encryption) = &encryption {
        encryption.spawn_key_reloaders();
    }
    if let Some(bearer) = &bearer {
        bearer.spawn_refreshers();
    }
    spawn_config_reloader(
        &config,
        upstreams.clone(),
        encryption.clone(),
        translation.clone(),
        identity,
    );
    let telemetry = Telemetry::new();
    telemetry.set_schema(vec![
        ("source", schema.source.to_string()),
        ("sha256", schema.sha256.clone().unwrap_or_default()),
        ("methods", schema.methods.to_string()),
        ("added_methods", schema.added_methods.len().to_string()),
        (
            "added_payload_fields",
            schema.added_payload_fields.len().to_string(),
        ),
    ]);
    let pipeline = instrument_pipeline(
        pipeline,
        &config,
        encryption.as_deref(),
        &upstreams,
        &telemetry,
    );
    // With bearer tokens on, the handshake lets callers without a certificate in; the
    // authentication stage then refuses any call that has neither a certificate nor a token.
    let tls = match &config.listener.tls {
        Some(server_tls) => {
            let tls = ReloadableServerConfig::load(
                server_tls,
                server_tls.require_client_cert && bearer.is_none(),
            )?;
            tls.spawn_reloader();
            let watched = tls.clone();
            telemetry.watch_certificate("listener", move || Some(watched.validity()));
            Some(tls)
        }
        None => None,
    };
    let address = config.listen_address()?;
    let listener = match &address {
        ListenAddress::Tcp(addr) => Listener::Tcp(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?,
        ),
        ListenAddress::Unix(path) => {
            // A socket file left by an earlier run would make bind fail.
            if path.exists() {
                std::fs::remove_file(path)
                    .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
            }
            let listener = UnixListener::bind(path)
                .with_context(|| format!("cannot listen on unix:{}", path.display()))?;
            Listener::Unix(listener, path.clone())
        }
    };
    let local_addr = match &listener {
        Listener::Tcp(l) => Some(l.local_addr()?),
        Listener::Unix(..) => None,
    };
    let shown = local_addr.map_or_else(|| config.listener.address.clone(), |a| a.to_string());
    match &config.listener.tls {
        Some(t) if t.require_client_cert && bearer.is_some() => {
            tracing::info!(address = %shown, "portcullis listening (TLS, client certificate or bearer token required)")
        }
        Some(t) if t.require_client_cert => {
            tracing::info!(address = %shown, "portcullis listening (TLS, client certificate required)")
        }
        Some(_) => {
            tracing::warn!(address = %shown, "portcullis listening (TLS, client certificate OPTIONAL)")
        }
        None => {
            tracing::warn!(address = %shown, "portcullis listening WITHOUT TLS (plaintext, loopback/unix only)")
        }
    }

    let codec = match (&config.codec, &encryption) {
        (Some(codec), Some(encryption)) => {
            let deps = CodecDeps {
                encryption: encryption.clone(),
                policies: policies.clone(),
                audit: audit.clone(),
                bearer: bearer.clone(),
                translation,
            };
            Some(crate::codec::start(codec, deps, options.codec).await?)
        }
        (Some(_), None) => anyhow::bail!("codec: the codec server needs encryption"),
        (None, _) => None,
    };

    let (shutdown, shutdown_rx) = watch::channel(false);
    let (admin_shutdown, admin_shutdown_rx) = watch::channel(false);
    let (grace_over, grace_over_rx) = watch::channel(false);
    let pipeline = Pipeline::new(TelemetryLayer::new(telemetry.clone()).layer(CutAtGraceEnd {
        inner: pipeline,
        grace_over: grace_over_rx,
    }));
    let admin_settings = config.admin.clone().unwrap_or_default();
    let targets = ProbeTargets {
        keys: encryption
            .as_ref()
            .map(|e| {
                e.key_providers()
                    .into_iter()
                    .map(|(name, provider, _)| (name, provider))
                    .collect()
            })
            .unwrap_or_default(),
        upstreams: upstreams.clone(),
        interval: Duration::from_secs(admin_settings.probe_interval_seconds),
        timeout: Duration::from_secs(admin_settings.probe_timeout_seconds),
    };
    // Readiness is probed with or without an admin listener: Health/Check answers from it.
    readiness::spawn_prober(telemetry.clone(), targets, admin_shutdown_rx.clone());
    let (admin_addr, admin_task) = match &config.admin {
        Some(settings) => {
            let (listener, addr) = admin::bind(&settings.listen).await?;
            tracing::info!(address = %addr, "admin listener: /metrics /healthz /readyz");
            let task = admin::spawn(listener, telemetry.clone(), admin_shutdown_rx);
            (Some(addr), Some(task))
        }
        None => (None, None),
    };
    let settings = serve_settings(
        &config, pipeline, tls, bearer, audit, &telemetry, grace_over,
    );
    let workers = Workers::start("portcullis-serve", config.listener.serving_threads())
        .context("cannot start the serving threads")?;
    let task = tokio::spawn(accept_loop(listener, settings, workers, shutdown_rx));
    Ok(RunningProxy {
        local_addr,
        upstreams,
        admin_addr,
        telemetry,
        shutdown,
        admin_shutdown,
        task,
        admin_task,
        codec,
    })
}

/// Adds the proxy's own answer to health checks and the per-call span and metrics around the
/// pipeline, and tells telemetry what the config serves (namespace labels, upstreams to probe,
/// keys to report).
fn instrument_pipeline(
    pipeline: Pipeline,
    config: &Config,
    encryption: Option<&Encryption>,
    upstreams: &Arc<Upstreams>,
    telemetry: &Arc<Telemetry>,
) -> Pipeline {
    telemetry.set_namespaces(config.namespaces.iter().map(|ns| ns.name.as_str()));
    telemetry.set_upstreams(upstreams.addresses());
    if let Some(encryption) = encryption {
        telemetry.set_keys(encryption.key_stats());
        telemetry.set_offload(encryption.payload_stats().clone());
    }
    // Upstream client certificates as they rotate (issued, files, the tls.cert shorthand),
    // and each upstream's open connections, read live at every scrape by upstream name (a
    // block changed by a config reload reports its new certificate).
    for name in config.upstreams.keys() {
        if upstreams.client_certificate(name).is_some() {
            let (source, upstream) = (upstreams.clone(), name.clone());
            telemetry.watch_certificate(format!("upstream/{name}"), move || {
                source.client_certificate(&upstream).and_then(|c| {
                    c.certified
                        .end_entity_cert()
                        .ok()
                        .and_then(|leaf| CertValidity::of_der(leaf.as_ref()))
                })
            });
        }
        let (source, upstream) = (upstreams.clone(), name.clone());
        telemetry.watch_upstream_connections(name.clone(), move || {
            source.open_connections(&upstream) as u64
        });
        let (source, upstream) = (upstreams.clone(), name.clone());
        telemetry.watch_upstream_pool(name.clone(), move || source.pool_stats(&upstream));
    }
    Pipeline::new(HealthLayer::new(telemetry.clone()).layer(pipeline))
}

/// Ends calls still running when the shutdown grace period is over with UNAVAILABLE (and
/// cancels their upstream call), so a caller gets a status it may retry instead of a reset.
#[derive(Clone)]
struct CutAtGraceEnd {
    inner: Pipeline,
    grace_over: watch::Receiver<bool>,
}

impl tower::Service<GrpcRequest> for CutAtGraceEnd {
    type Response = GrpcResponse;
    type Error = ProxyError;
    type Future = crate::proxy::CallFuture;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: GrpcRequest) -> Self::Future {
        let call = self.inner.call(request);
        let mut grace_over = self.grace_over.clone();
        Box::pin(async move {
            tokio::select! {
                result = call => result,
                _ = grace_over.wait_for(|over| *over) => Err(ProxyError::ShuttingDown),
            }
        })
    }
}

struct ServeSettings {
    pipeline: Pipeline,
    tls: Option<Arc<ReloadableServerConfig>>,
    telemetry: Arc<Telemetry>,
    /// What every connection's edge shares (limits, authenticator, process-wide budget).
    edge: Arc<EdgeShared>,
    /// Refused and closed connections, refused calls.
    stats: Arc<EdgeStats>,
    audit: Arc<AuditLog>,
    /// At most `max_connections` open at once.
    gate: Arc<ConnectionGate>,
    connection: ConnectionSettings,
    grace: Duration,
    /// Set when the grace period is over: running calls end with UNAVAILABLE.
    grace_over: watch::Sender<bool>,
}

/// How connections and their calls are served, from the config's `[limits]`.
fn serve_settings(
    config: &Config,
    pipeline: Pipeline,
    tls: Option<Arc<ReloadableServerConfig>>,
    bearer: Option<Arc<BearerVerifier>>,
    audit: Arc<AuditLog>,
    telemetry: &Arc<Telemetry>,
    grace_over: watch::Sender<bool>,
) -> ServeSettings {
    let limits = &config.limits;
    let stats = Arc::new(EdgeStats::default());
    let edge = Arc::new(EdgeShared {
        max_request_bytes: limits.max_request_bytes,
        body_timeout: Duration::from_secs(limits.body_timeout_seconds),
        connection_budget: limits.max_connection_buffered_bytes,
        authenticator: bearer.map(Authenticator::new),
        budget: BufferBudget::new(limits.max_buffered_bytes, "process"),
        stats: stats.clone(),
        audit: audit.clone(),
    });
    let gate = ConnectionGate::new(limits.max_connections);
    let (buffered, open) = (edge.clone(), gate.clone());
    telemetry.set_edge(crate::telemetry::EdgeSources {
        stats: stats.clone(),
        buffered_bytes: Arc::new(move || buffered.budget.in_use()),
        open_slots: Arc::new(move || open.open()),
        audit: audit.stats(),
    });
    ServeSettings {
        pipeline,
        tls,
        telemetry: telemetry.clone(),
        edge,
        stats,
        audit,
        gate,
        connection: ConnectionSettings {
            handshake_timeout: Duration::from_secs(limits.handshake_timeout_seconds),
            max_concurrent_streams: limits.max_concurrent_streams,
            max_header_list_bytes: limits.max_header_list_bytes,
            max_age: (limits.max_connection_age_seconds > 0)
                .then(|| Duration::from_secs(limits.max_connection_age_seconds)),
            max_age_grace: Duration::from_secs(limits.max_connection_age_grace_seconds),
            ..ConnectionSettings::default()
        },
        grace: Duration::from_secs(limits.shutdown_grace_seconds),
        grace_over,
    }
}

async fn accept_loop(
    listener: Listener,
    settings: ServeSettings,
    workers: Workers,
    mut shutdown: watch::Receiver<bool>,
) {
    let settings = Arc::new(settings);
    // Tells every connection to send GOAWAY and finish the calls it has.
    let (closing, closing_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut at_limit = false;
    loop {
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            _ = shutdown.changed() => break,
            accepted = accept(&listener) => accepted,
        };
        match accepted {
            Ok((io, remote)) => {
                // Refused at once, before any TLS work, when max_connections are open.
                let Some(slot) = settings.gate.enter() else {
                    drop(io);
                    settings.stats.connection_refused();
                    if !at_limit {
                        tracing::warn!(limit = settings.gate.open(), "connection limit reached: new connections are closed at once (limits.max_connections)");
                        at_limit = true;
                    }
                    settings.audit.record_best_effort(
                        &EdgeAuditEvent::new(
                            EdgeEventKind::ConnectionRefused,
                            "connection_limit",
                            &remote,
                        )
                        .detail(format!(
                            "{} client connections are open (limits.max_connections)",
                            settings.gate.open()
                        )),
                    );
                    continue;
                };
                at_limit = false;
                let settings = settings.clone();
                let closing = closing_rx.clone();
                workers.spawn_connection(&mut connections, async move {
                    serve_connection(io, remote, slot, settings, closing).await;
                });
            }
            Err(e) => {
                // Usually fd exhaustion: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    if let Listener::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
    drop(listener);
    let _ = closing.send(true);
    let drained = tokio::time::timeout(settings.grace, drain(&mut connections)).await;
    if drained.is_err() {
        tracing::warn!(grace = ?settings.grace, "in-flight calls still running after the grace period: ending them with UNAVAILABLE");
        let _ = settings.grace_over.send(true);
        // Let those answers reach their callers before the connections close.
        let _ = tokio::time::timeout(Duration::from_secs(2), drain(&mut connections)).await;
    }
    connections.shutdown().await;
    // Stops the serving threads (off the runtime: it joins them).
    let _ = tokio::task::spawn_blocking(move || drop(workers)).await;
}

async fn drain(connections: &mut JoinSet<()>) {
    while connections.join_next().await.is_some() {}
}

type BoxedIo = Box<dyn AsyncIo>;
trait AsyncIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncIo for T {}

/// An accepted socket, not yet registered with any runtime: the serving thread that takes it
/// registers it with its own.
enum Accepted {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl Accepted {
    fn register(self) -> std::io::Result<BoxedIo> {
        Ok(match self {
            Accepted::Tcp(stream) => Box::new(tokio::net::TcpStream::from_std(stream)?),
            Accepted::Unix(stream) => Box::new(tokio::net::UnixStream::from_std(stream)?),
        })
    }
}

async fn accept(listener: &Listener) -> std::io::Result<(Accepted, String)> {
    match listener {
        Listener::Tcp(l) => {
            let (stream, addr) = l.accept().await?;
            let _ = stream.set_nodelay(true);
            Ok((Accepted::Tcp(stream.into_std()?), addr.to_string()))
        }
        Listener::Unix(l, path) => {
            let (stream, _) = l.accept().await?;
            Ok((
                Accepted::Unix(stream.into_std()?),
                format!("unix:{}", path.display()),
            ))
        }
    }
}

async fn serve_connection(
    accepted: Accepted,
    remote: String,
    _slot: ConnectionSlot,
    settings: Arc<ServeSettings>,
    closing: watch::Receiver<bool>,
) {
    let io = match accepted.register() {
        Ok(io) => io,
        Err(e) => {
            tracing::warn!(peer = %remote, error = %e, "cannot take the accepted connection");
            return;
        }
    };
    let refused = |reason: &'static str, detail: String| {
        settings.telemetry.handshake_failed();
        tracing::info!(peer = %remote, reason, error = %detail, "TLS handshake refused");
        settings.audit.record_best_effort(
            &EdgeAuditEvent::new(EdgeEventKind::ConnectionRefused, reason, &remote).detail(detail),
        );
    };
    let (io, peer, certificate, revocations): (BoxedIo, PeerInfo, _, _) = match &settings.tls {
        Some(tls) => {
            // The current configuration: a reloaded certificate applies from the next handshake.
            let acceptor = TlsAcceptor::from(tls.current());
            match tokio::time::timeout(settings.connection.handshake_timeout, acceptor.accept(io))
                .await
            {
                Ok(Ok(stream)) => {
                    let certs = stream.get_ref().1.peer_certificates();
                    let certificate = certs
                        .and_then(|c| c.first())
                        .and_then(|leaf| ClientCertificate::from_der(leaf.as_ref()));
                    let peer = PeerInfo::from_certificates(remote.clone(), certs);
                    (Box::new(stream), peer, certificate, Some(tls.revocations()))
                }
                Ok(Err(e)) => {
                    refused(handshake_refusal(&e), e.to_string());
                    return;
                }
                Err(_) => {
                    refused(
                        "handshake_timeout",
                        format!(
                            "no TLS handshake within {:?}",
                            settings.connection.handshake_timeout
                        ),
                    );
                    return;
                }
            }
        }
        None => (
            io,
            PeerInfo {
                remote: remote.clone(),
                ..Default::default()
            },
            None,
            None,
        ),
    };
    tracing::debug!(peer = %peer.remote, names = ?peer.names, "connection accepted");
    let lifetime = match (&certificate, revocations) {
        (Some(certificate), revocations) => Lifetime {
            certificate_expires: Some(certificate.not_after),
            revoked: revocations.map(|revocations| {
                Box::pin(revoked(revocations, certificate.clone()))
                    as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
            }),
        },
        (None, _) => Lifetime::default(),
    };
    let edge = GrpcEdge::new(
        settings.pipeline.clone(),
        Arc::new(peer),
        settings.edge.clone(),
    );
    let on_close = |reason: CloseReason| {
        settings.stats.connection_closed(reason);
        if reason == CloseReason::MaxAge {
            // Routine: every connection, every max_connection_age_seconds.
            tracing::debug!(peer = %remote, reason = reason.label(), "closing the connection (GOAWAY)");
        } else {
            tracing::info!(peer = %remote, reason = reason.label(), "closing the connection (GOAWAY)");
            let mut event =
                EdgeAuditEvent::new(EdgeEventKind::ConnectionClosed, reason.label(), &remote);
            if let Some(certificate) = &certificate {
                event.subject = Some(certificate.subject.clone());
                event.serial = Some(certificate.serial_hex());
            }
            settings.audit.record_best_effort(&event);
        }
    };
    settings.telemetry.connection_opened();
    if let Err(e) =
        connection::serve(io, edge, &settings.connection, closing, lifetime, on_close).await
    {
        tracing::debug!(error = %e, "connection closed with error");
    }
    settings.telemetry.connection_closed();
}

/// Completes when `certificate` is in the revocation set (now or after a reload).
async fn revoked(
    mut revocations: watch::Receiver<Arc<RevocationSet>>,
    certificate: ClientCertificate,
) {
    loop {
        if revocations.borrow_and_update().is_revoked(&certificate) {
            return;
        }
        if revocations.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// The audit `reason` of a refused TLS handshake.
fn handshake_refusal(error: &std::io::Error) -> &'static str {
    use rustls::CertificateError as C;
    match error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(C::Revoked)) => "certificate_revoked",
        Some(rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. })) => {
            "certificate_expired"
        }
        Some(rustls::Error::InvalidCertificate(C::UnknownIssuer)) => "unknown_issuer",
        Some(rustls::Error::InvalidCertificate(_)) => "invalid_certificate",
        Some(rustls::Error::NoCertificatesPresented) => "no_certificate",
        _ => "tls_handshake",
    }
}
