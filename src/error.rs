//! Typed errors raised anywhere in the pipeline, and the one place that maps them to a gRPC status.

use std::time::Duration;

use tonic::Code;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("unknown method {0}: this proxy forwards only Temporal's WorkflowService, OperatorService and grpc.health.v1.Health")]
    UnknownMethod(String),
    #[error("streaming method {0} is not proxied")]
    StreamingNotSupported(String),
    #[error("request is not gRPC (content-type {0:?})")]
    NotGrpc(String),
    #[error("malformed gRPC framing: {0}")]
    MalformedFrame(&'static str),
    #[error("malformed protobuf in {message}: {reason}")]
    MalformedMessage { message: String, reason: String },
    #[error("unsupported grpc-encoding {0:?} (supported: identity, gzip)")]
    UnsupportedEncoding(String),
    #[error("{what} message of {size} exceeds the limit of {limit} bytes")]
    MessageTooLarge {
        what: &'static str,
        /// "5000000 bytes", or "more than 4194304 bytes" when reading stopped at the limit.
        size: String,
        limit: usize,
    },
    #[error("{message} holds more than {limit} payloads")]
    TooManyPayloads { message: String, limit: usize },
    #[error("the proxy is at capacity: {0}")]
    Overloaded(String),
    #[error("invalid grpc-timeout header {0:?}")]
    InvalidTimeout(String),
    #[error("namespace is required for {0}")]
    MissingNamespace(String),
    #[error(
        "temporal-namespace header {header:?} does not match the request's namespace {body:?}"
    )]
    NamespaceMismatch { header: String, body: String },
    #[error("namespace {0:?} is not served by this proxy")]
    UnknownNamespace(String),
    /// A nested request (ExecuteMultiOperation) names another namespace than the request.
    #[error("{operation} names namespace {namespace:?}, but the request is for namespace {expected:?}: nested requests must name the request's namespace")]
    NestedNamespaceMismatch {
        operation: &'static str,
        namespace: String,
        expected: String,
    },
    /// A command aimed at a namespace this proxy does not serve.
    #[error("{command} is aimed at namespace {namespace:?}, which is not served by this proxy")]
    UnknownCommandTarget {
        command: &'static str,
        namespace: String,
    },
    /// A command aimed at a namespace that another upstream serves: the request's upstream
    /// would run it, not the one the target namespace is served by.
    #[error("{} is aimed at namespace {:?}, served by upstream {}, but the request's namespace {:?} is served by upstream {}: cross-namespace commands only work within one upstream", .0.command, .0.target, .0.target_upstream, .0.namespace, .0.upstream)]
    CrossUpstreamCommand(Box<CrossUpstream>),
    #[error("no system upstream is configured for cluster-scoped method {0}")]
    NoSystemUpstream(String),
    #[error("upstream {upstream} ({address}) is unavailable: {reason}")]
    UpstreamUnavailable {
        upstream: String,
        address: String,
        reason: String,
    },
    #[error("upstream {upstream} has no usable client credential: {reason}")]
    UpstreamCredentials { upstream: String, reason: String },
    #[error("upstream {upstream} answered with HTTP status {status}")]
    UpstreamHttpStatus { upstream: String, status: u16 },
    #[error("upstream {upstream} reset the call ({code:?})")]
    UpstreamReset { upstream: String, code: h2::Reason },
    #[error("upstream {upstream} gave the call up (RST_STREAM CANCEL before its deadline)")]
    UpstreamGaveUp { upstream: String },
    #[error("upstream {upstream} sent a malformed response: {reason}")]
    UpstreamProtocol { upstream: String, reason: String },
    #[error("deadline of {0:?} exceeded in the proxy")]
    DeadlineExceeded(Duration),
    #[error("reading the request body failed: {0}")]
    RequestBody(String),
    #[error("{0}")]
    Crypto(#[from] crate::crypto::CryptoError),
    #[error("cannot encrypt this call, refusing to forward it: {0}")]
    Encryption(String),
    /// Offloading a payload to object storage, or resolving one, failed.
    #[error("{0}")]
    Offload(crate::offload::OffloadError),
    /// A Nexus operation addressed to the system endpoint that portcullis cannot read.
    #[error("refusing to forward this call: {0}")]
    SystemNexus(String),
    /// An answer of an `encrypted_only` namespace holds a payload portcullis did not seal.
    #[error("the upstream answered with a payload that is not sealed, in a namespace that accepts only sealed payloads: {0}")]
    PlaintextResponse(String),
    #[error("the proxy is shutting down and this call outlived the shutdown grace period; retry")]
    ShuttingDown,
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    #[error("the audit log cannot take this call's decision, so the call is refused: {0}")]
    AuditUnavailable(crate::authz::AuditError),
    #[error("buffered request bytes would exceed the {scope} limit of {limit} bytes; retry later")]
    BufferLimit { scope: &'static str, limit: usize },
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(Duration),
    #[error("the connection is closing ({0}); retry on a new connection")]
    ConnectionClosing(&'static str),
    #[error("{identity} may not call {method}{}: it needs the {required} role", namespace.as_ref().map(|n| format!(" in namespace {n}")).unwrap_or_else(|| " on the cluster".into()))]
    PermissionDenied {
        identity: String,
        method: String,
        namespace: Option<String>,
        required: &'static str,
    },
    /// A command of a request aimed at a namespace where the caller lacks the role it needs.
    #[error("{} may not {} in namespace {} (a command of {} in namespace {}): it needs the {} role in {}", .0.identity, .0.command, .0.target, .0.method, .0.namespace, .0.required, .0.target)]
    CommandDenied(Box<CommandDenial>),
    /// A response holds payloads sealed for a namespace the caller may not read.
    #[error("{identity} may not read payloads of namespace {namespace} that {method} returns: it needs the {required} role in {namespace}")]
    ForeignPayloadsDenied {
        identity: String,
        method: String,
        namespace: String,
        required: &'static str,
    },
}

/// See [`ProxyError::CrossUpstreamCommand`].
#[derive(Debug)]
pub struct CrossUpstream {
    pub command: &'static str,
    pub target: String,
    pub target_upstream: String,
    pub namespace: String,
    pub upstream: String,
}

/// See [`ProxyError::CommandDenied`].
#[derive(Debug)]
pub struct CommandDenial {
    pub identity: String,
    pub method: &'static str,
    pub command: &'static str,
    pub namespace: String,
    pub target: String,
    pub required: &'static str,
}

impl ProxyError {
    pub fn code(&self) -> Code {
        use ProxyError::*;
        match self {
            UnknownMethod(_) | StreamingNotSupported(_) | UnsupportedEncoding(_) => {
                Code::Unimplemented
            }
            NotGrpc(_) | MalformedFrame(_) | MalformedMessage { .. } | InvalidTimeout(_) => {
                Code::InvalidArgument
            }
            MissingNamespace(_) | NamespaceMismatch { .. } | NestedNamespaceMismatch { .. } => {
                Code::InvalidArgument
            }
            MessageTooLarge { .. }
            | TooManyPayloads { .. }
            | Overloaded(_)
            | BufferLimit { .. } => Code::ResourceExhausted,
            BodyTimeout(_) => Code::DeadlineExceeded,
            AuditUnavailable(_) | ConnectionClosing(_) => Code::Unavailable,
            UnknownNamespace(_) | UnknownCommandTarget { .. } => Code::NotFound,
            CrossUpstreamCommand(_) => Code::FailedPrecondition,
            NoSystemUpstream(_) => Code::Unimplemented,
            UpstreamUnavailable { .. }
            | UpstreamGaveUp { .. }
            | UpstreamCredentials { .. }
            | ShuttingDown => Code::Unavailable,
            UpstreamHttpStatus { status, .. } => http_status_to_code(*status),
            UpstreamProtocol { .. } => Code::Internal,
            UpstreamReset { code, .. } => reset_to_code(*code),
            DeadlineExceeded(_) => Code::DeadlineExceeded,
            RequestBody(_) => Code::Cancelled,
            PermissionDenied { .. } | CommandDenied(_) | ForeignPayloadsDenied { .. } => {
                Code::PermissionDenied
            }
            Unauthenticated(_) => Code::Unauthenticated,
            Crypto(e) => {
                use crate::crypto::CryptoError as C;
                match e {
                    C::ProviderUnavailable { .. } => Code::Unavailable,
                    C::CannotOpen { .. } | C::MalformedEnvelope(_) => Code::DataLoss,
                    C::ProviderRejected { .. } | C::SealFailed(_) | C::InvalidPolicy(_) => {
                        Code::Internal
                    }
                }
            }
            Encryption(_) | SystemNexus(_) => Code::FailedPrecondition,
            Offload(e) if e.is_data_loss() => Code::DataLoss,
            Offload(e) if e.is_unavailable() => Code::Unavailable,
            Offload(crate::offload::OffloadError::TooLarge { .. }) => Code::ResourceExhausted,
            Offload(_) => Code::FailedPrecondition,
            PlaintextResponse(_) => Code::DataLoss,
        }
    }

    pub fn to_status(&self) -> tonic::Status {
        tonic::Status::new(self.code(), format!("portcullis: {self}"))
    }
}

/// gRPC's mapping of RST_STREAM codes received from a server (grpc/doc/PROTOCOL-HTTP2.md,
/// "Errors"). A refused stream (not processed) is retried before it gets here.
fn reset_to_code(code: h2::Reason) -> Code {
    match code {
        h2::Reason::CANCEL => Code::Cancelled, // see proxy::forward::deadline_or
        h2::Reason::REFUSED_STREAM => Code::Unavailable,
        h2::Reason::ENHANCE_YOUR_CALM => Code::ResourceExhausted,
        h2::Reason::INADEQUATE_SECURITY => Code::PermissionDenied,
        _ => Code::Internal,
    }
}

/// gRPC's mapping of HTTP statuses from a non-gRPC answer (grpc/doc/http-grpc-status-mapping.md).
fn http_status_to_code(status: u16) -> Code {
    match status {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
    }
}
