//! The `aws-kms` key provider: data keys from AWS KMS `GenerateDataKey`, unwrapped with `Decrypt`.
//!
//! ```toml
//! key_id = "alias/portcullis"     # key id, key ARN, alias name or alias ARN
//! region = "eu-west-1"
//! # endpoint = "http://127.0.0.1:4566"   # a KMS-compatible endpoint instead of AWS's
//! # timeout_seconds = 5
//! ```
//! Both calls carry the encryption context `{"portcullis:namespace": NAMESPACE}`. KMS binds the
//! wrapped key to it, so a data key generated for one namespace does not unwrap for another.
//! The KEK id recorded in envelopes is the key ARN that KMS reports, never the alias: an alias may
//! later point at another key, and Decrypt is always called with the key that wrapped.
//!
//! Credentials come from the SDK's default chain (environment, profile files, web identity,
//! ECS and EC2 instance roles), or from `[credentials]` in the config (tests and development).
//! Every call is bounded by `timeout_seconds`: a hung KMS makes the call fail as unavailable.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_kms::config::Credentials;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::DataKeySpec;
use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider as TlsProvider};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::provider::{DataKeyMaterial, KeyProvider, ProviderError};

/// The encryption context key that binds a data key to its namespace.
pub const NAMESPACE_CONTEXT_KEY: &str = "portcullis:namespace";
/// The default bound on one KMS call, retries included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_TIMEOUT: Duration = Duration::from_secs(300);
/// Attempts per call (the SDK's standard retry mode with backoff), all within the timeout.
const MAX_ATTEMPTS: u32 = 3;

/// Configuration of the `aws-kms` provider.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsKmsConfig {
    /// The KMS key that wraps new data keys: key id, key ARN, alias name (`alias/…`) or alias ARN.
    pub key_id: String,
    /// The AWS region of the key, e.g. `eu-west-1`.
    pub region: String,
    /// A KMS endpoint URL instead of AWS's (a VPC endpoint, or a local KMS for tests).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Bound on each KMS call, retries included. In the file: `timeout_seconds` (may be fractional).
    #[serde(
        default = "default_timeout",
        rename = "timeout_seconds",
        with = "seconds"
    )]
    pub timeout: Duration,
    /// Fixed credentials instead of the default chain. For tests and development only: in
    /// production use an instance role, web identity or the environment.
    #[serde(default)]
    pub credentials: Option<StaticCredentials>,
}

impl fmt::Debug for AwsKmsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsKmsConfig")
            .field("key_id", &self.key_id)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("timeout", &self.timeout)
            .field("credentials", &self.credentials)
            .finish()
    }
}

/// Fixed AWS credentials (tests and development only).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    #[serde(default)]
    pub session_token: Option<String>,
}

impl fmt::Debug for StaticCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

fn default_timeout() -> Duration {
    DEFAULT_TIMEOUT
}

pub(crate) mod seconds {
    use std::time::Duration;

    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(value.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(deserializer)?;
        Duration::try_from_secs_f64(secs).map_err(D::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AwsKmsError {
    #[error("invalid aws-kms config: {0}")]
    InvalidConfig(String),
}

impl AwsKmsConfig {
    /// A config with the default timeout and the default credential chain.
    pub fn new(key_id: impl Into<String>, region: impl Into<String>) -> Self {
        AwsKmsConfig {
            key_id: key_id.into(),
            region: region.into(),
            endpoint: None,
            timeout: DEFAULT_TIMEOUT,
            credentials: None,
        }
    }

    pub fn validate(&self) -> Result<(), AwsKmsError> {
        let invalid = |msg: &str| Err(AwsKmsError::InvalidConfig(msg.to_owned()));
        if self.key_id.trim().is_empty() {
            return invalid("key_id is empty");
        }
        if self.region.trim().is_empty() {
            return invalid("region is empty");
        }
        if let Some(endpoint) = &self.endpoint {
            let scheme_ok = endpoint.starts_with("https://") || endpoint.starts_with("http://");
            if !scheme_ok || endpoint.parse::<http::Uri>().is_err() {
                return invalid("endpoint must be an http:// or https:// URL");
            }
        }
        if self.timeout.is_zero() || self.timeout > MAX_TIMEOUT {
            return invalid("timeout_seconds must be positive and at most 300");
        }
        if let Some(creds) = &self.credentials {
            if creds.access_key_id.is_empty() || creds.secret_access_key.is_empty() {
                return invalid("credentials need access_key_id and secret_access_key");
            }
        }
        Ok(())
    }

    /// A KMS client as this config describes it (also for tooling and tests that manage keys).
    /// Its HTTP client uses rustls with ring and the system's root certificates.
    pub async fn sdk_client(&self) -> Result<aws_sdk_kms::Client, AwsKmsError> {
        self.validate()?;
        let sdk_config = aws_sdk_config(
            &self.region,
            self.endpoint.as_deref(),
            self.credentials.as_ref(),
            self.timeout,
            MAX_ATTEMPTS,
        )
        .await;
        Ok(aws_sdk_kms::Client::new(&sdk_config))
    }
}

/// The AWS SDK configuration portcullis uses for every AWS service (KMS, and S3 for offload):
/// rustls with ring and the system's roots, standard retries up to `max_attempts`, `timeout`
/// for connecting and for each operation (retries included), an endpoint override, and static
/// credentials when given (else the default chain).
pub(crate) async fn aws_sdk_config(
    region: &str,
    endpoint: Option<&str>,
    credentials: Option<&StaticCredentials>,
    timeout: Duration,
    max_attempts: u32,
) -> aws_config::SdkConfig {
    let http_client = aws_smithy_http_client::Builder::new()
        .tls_provider(TlsProvider::Rustls(CryptoMode::Ring))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(region.to_owned()))
        .http_client(http_client)
        .retry_config(RetryConfig::standard().with_max_attempts(max_attempts))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(timeout)
                .operation_timeout(timeout)
                .build(),
        );
    if let Some(endpoint) = endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    if let Some(creds) = credentials {
        loader = loader.credentials_provider(Credentials::new(
            creds.access_key_id.clone(),
            creds.secret_access_key.clone(),
            creds.session_token.clone(),
            None,
            "portcullis-config",
        ));
    }
    loader.load().await
}

/// The `aws-kms` provider.
#[derive(Clone)]
pub struct AwsKmsProvider {
    client: aws_sdk_kms::Client,
    key_id: String,
    timeout: Duration,
}

impl fmt::Debug for AwsKmsProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsKmsProvider")
            .field("key_id", &self.key_id)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl AwsKmsProvider {
    /// Builds the client. Nothing is sent to KMS yet: a wrong key or missing credentials show
    /// on the first call.
    pub async fn new(config: &AwsKmsConfig) -> Result<Self, AwsKmsError> {
        let client = config.sdk_client().await?;
        Ok(Self::from_client(
            client,
            config.key_id.clone(),
            config.timeout,
        ))
    }

    /// Over an existing client (its own timeouts and retries apply within `timeout`).
    pub fn from_client(client: aws_sdk_kms::Client, key_id: String, timeout: Duration) -> Self {
        AwsKmsProvider {
            client,
            key_id,
            timeout,
        }
    }

    /// The configured key (as configured: possibly an alias).
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn client(&self) -> &aws_sdk_kms::Client {
        &self.client
    }

    async fn bounded<T, E>(
        &self,
        operation: &str,
        kek_id: &str,
        call: impl Future<Output = Result<T, SdkError<E>>>,
    ) -> Result<T, ProviderError>
    where
        E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
    {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(output)) => Ok(output),
            Ok(Err(e)) => Err(classify(operation, kek_id, &e)),
            Err(_) => Err(ProviderError::Unavailable(format!(
                "KMS {operation} timed out after {:?}",
                self.timeout
            ))),
        }
    }
}

#[async_trait]
impl KeyProvider for AwsKmsProvider {
    async fn generate_data_key(&self, namespace: &str) -> Result<DataKeyMaterial, ProviderError> {
        let call = self
            .client
            .generate_data_key()
            .key_id(&self.key_id)
            .key_spec(DataKeySpec::Aes256)
            .encryption_context(NAMESPACE_CONTEXT_KEY, namespace)
            .send();
        let output = self.bounded("GenerateDataKey", &self.key_id, call).await?;
        let refused =
            |what: &str| ProviderError::Refused(format!("KMS GenerateDataKey returned {what}"));
        let kek_id = output
            .key_id
            .filter(|id| !id.is_empty())
            .ok_or_else(|| refused("no KeyId"))?;
        let wrapped = output
            .ciphertext_blob
            .map(Blob::into_inner)
            .filter(|blob| !blob.is_empty())
            .ok_or_else(|| refused("no CiphertextBlob"))?;
        let plaintext = Zeroizing::new(
            output
                .plaintext
                .map(Blob::into_inner)
                .ok_or_else(|| refused("no Plaintext"))?,
        );
        let plaintext =
            to_key(&plaintext).ok_or_else(|| refused("a data key that is not 256 bits"))?;
        Ok(DataKeyMaterial {
            plaintext,
            wrapped,
            kek_id,
        })
    }

    async fn unwrap_data_key(
        &self,
        namespace: &str,
        kek_id: &str,
        wrapped: &[u8],
    ) -> Result<Zeroizing<[u8; 32]>, ProviderError> {
        if kek_id.is_empty() {
            return Err(ProviderError::UnknownKek(kek_id.to_owned()));
        }
        let cannot = |reason: &str| ProviderError::CannotUnwrap {
            kek_id: kek_id.to_owned(),
            reason: reason.to_owned(),
        };
        if wrapped.is_empty() {
            return Err(cannot("empty wrapped key"));
        }
        let call = self
            .client
            .decrypt()
            .key_id(kek_id)
            .ciphertext_blob(Blob::new(wrapped))
            .encryption_context(NAMESPACE_CONTEXT_KEY, namespace)
            .send();
        let output = self.bounded("Decrypt", kek_id, call).await?;
        if output.key_id.as_deref().is_some_and(|id| id != kek_id) {
            return Err(cannot("KMS decrypted it under another key"));
        }
        let plaintext = Zeroizing::new(
            output
                .plaintext
                .map(Blob::into_inner)
                .ok_or_else(|| cannot("KMS Decrypt returned no Plaintext"))?,
        );
        to_key(&plaintext).ok_or_else(|| cannot("it is not a 256-bit data key"))
    }
}

fn to_key(bytes: &[u8]) -> Option<Zeroizing<[u8; 32]>> {
    let mut key = Zeroizing::new([0u8; 32]);
    if bytes.len() != key.len() {
        return None;
    }
    key.copy_from_slice(bytes);
    Some(key)
}

/// Error codes that retrying may fix (throttling, KMS-side timeouts and faults).
const TRANSIENT_CODES: &[&str] = &[
    "ThrottlingException",
    "Throttling",
    "ThrottledException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "DependencyTimeoutException",
    "KMSInternalException",
    "KeyUnavailableException",
    "InternalFailure",
    "InternalError",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "RequestTimeout",
    "RequestTimeoutException",
];

/// Transient: could not reach KMS, timed out, throttled or failed on its side. Permanent: KMS
/// answered with a refusal (bad ciphertext or context, unknown, disabled or misused key, access
/// denied) or the request could not be built or signed (e.g. no credentials configured).
fn classify<E>(operation: &str, kek_id: &str, error: &SdkError<E>) -> ProviderError
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
{
    let unavailable =
        |detail: String| ProviderError::Unavailable(format!("KMS {operation}: {detail}"));
    match error {
        SdkError::TimeoutError(_) => unavailable("timed out".into()),
        SdkError::DispatchFailure(failure) => match credentials_error(error) {
            Some(CredentialsError::CredentialsNotLoaded(_))
            | Some(CredentialsError::InvalidConfiguration(_)) => ProviderError::Refused(format!(
                "KMS {operation}: no usable AWS credentials: {}",
                chain(error)
            )),
            _ if failure.is_user() => {
                ProviderError::Refused(format!("KMS {operation}: {}", chain(error)))
            }
            _ => unavailable(chain(error)),
        },
        // The answer could not be read (a proxy's error page, a cut connection): retry later.
        SdkError::ResponseError(_) => unavailable(chain(error)),
        SdkError::ServiceError(service) => {
            let err = service.err();
            let status = service.raw().status().as_u16();
            let code = err.code().unwrap_or("");
            let message = err.message().unwrap_or("");
            let detail = format!("{code} (HTTP {status}): {message}");
            match code {
                _ if TRANSIENT_CODES.contains(&code) || status >= 500 || status == 429 => {
                    unavailable(detail)
                }
                "InvalidCiphertextException" | "IncorrectKeyException" => {
                    ProviderError::CannotUnwrap {
                        kek_id: kek_id.to_owned(),
                        reason: format!("KMS {operation}: {detail}"),
                    }
                }
                "NotFoundException" => ProviderError::UnknownKek(kek_id.to_owned()),
                _ => ProviderError::Refused(format!("KMS {operation}: {detail}")),
            }
        }
        // Could not even build the request: misconfiguration, not worth retrying.
        _ => ProviderError::Refused(format!("KMS {operation}: {}", chain(error))),
    }
}

fn credentials_error<'a>(error: &'a (dyn StdError + 'static)) -> Option<&'a CredentialsError> {
    let mut next: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<CredentialsError>() {
            return Some(found);
        }
        next = e.source();
    }
    None
}

/// An error and its causes on one line (the SDK's top-level messages alone say little).
fn chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        let cause = e.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        next = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parses_with_defaults_and_rejects_unknown_fields() {
        let config: AwsKmsConfig =
            toml::from_str("key_id = \"alias/p\"\nregion = \"eu-west-1\"\n").unwrap();
        assert_eq!(config.timeout, DEFAULT_TIMEOUT);
        assert!(config.endpoint.is_none() && config.credentials.is_none());
        config.validate().unwrap();

        let config: AwsKmsConfig = toml::from_str(
            "key_id = \"k\"\nregion = \"r\"\nendpoint = \"http://127.0.0.1:1\"\n\
             timeout_seconds = 0.5\n[credentials]\naccess_key_id = \"a\"\n\
             secret_access_key = \"sekrit\"\n",
        )
        .unwrap();
        assert_eq!(config.timeout, Duration::from_millis(500));
        config.validate().unwrap();
        assert!(!format!("{config:?}").contains("sekrit"));
        let round_trip: AwsKmsConfig = toml::from_str(&toml::to_string(&config).unwrap()).unwrap();
        assert_eq!(round_trip.timeout, config.timeout);

        for bad in [
            "key_id = \"k\"\nregion = \"r\"\ntimeout = 5\n",
            "key_id = \"k\"\n",
            "key_id = \"k\"\nregion = \"r\"\ntimeout_seconds = -1\n",
        ] {
            assert!(toml::from_str::<AwsKmsConfig>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn validate_rejects_unusable_configs() {
        type Change = fn(&mut AwsKmsConfig);
        let ok = AwsKmsConfig::new("k", "r");
        let cases: [(&str, Change); 6] = [
            ("empty key", |c| c.key_id = " ".into()),
            ("empty region", |c| c.region.clear()),
            ("bad endpoint", |c| {
                c.endpoint = Some("127.0.0.1:4566".into())
            }),
            ("zero timeout", |c| c.timeout = Duration::ZERO),
            ("long timeout", |c| c.timeout = Duration::from_secs(3600)),
            ("empty secret", |c| {
                c.credentials = Some(StaticCredentials {
                    access_key_id: "a".into(),
                    secret_access_key: String::new(),
                    session_token: None,
                })
            }),
        ];
        for (name, change) in cases {
            let mut config = ok.clone();
            change(&mut config);
            assert!(
                matches!(config.validate(), Err(AwsKmsError::InvalidConfig(_))),
                "{name}"
            );
        }
    }

    #[tokio::test]
    async fn an_unreachable_endpoint_is_transient_and_bounded() {
        // Nothing listens on a port we just bound and released.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let mut config = AwsKmsConfig::new("alias/x", "us-east-1");
        config.endpoint = Some(format!("http://127.0.0.1:{port}"));
        config.timeout = Duration::from_secs(2);
        config.credentials = Some(StaticCredentials {
            access_key_id: "test".into(),
            secret_access_key: "test".into(),
            session_token: None,
        });
        let provider = AwsKmsProvider::new(&config).await.unwrap();
        let started = std::time::Instant::now();
        let err = provider.generate_data_key("ns").await.unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    fn service_error(code: &str, status: u16) -> ProviderError {
        use aws_sdk_kms::config::http::HttpResponse;
        use aws_sdk_kms::error::ErrorMetadata;
        use aws_sdk_kms::operation::decrypt::DecryptError;
        use aws_smithy_types::body::SdkBody;

        let err = DecryptError::generic(ErrorMetadata::builder().code(code).message("m").build());
        let raw = http::Response::builder()
            .status(status)
            .body(SdkBody::from(""))
            .unwrap();
        let raw = HttpResponse::try_from(raw).unwrap();
        classify("Decrypt", "arn:k", &SdkError::service_error(err, raw))
    }

    #[test]
    fn service_errors_are_classified() {
        for (code, status) in [
            ("ThrottlingException", 400),
            ("KMSInternalException", 500),
            ("KeyUnavailableException", 500),
            ("DependencyTimeoutException", 503),
            ("SomethingNew", 502),
            ("SomethingNew", 429),
        ] {
            let err = service_error(code, status);
            assert!(err.is_transient(), "{code} {status}: {err}");
        }
        for code in ["InvalidCiphertextException", "IncorrectKeyException"] {
            let err = service_error(code, 400);
            assert!(
                matches!(&err, ProviderError::CannotUnwrap { kek_id, .. } if kek_id == "arn:k"),
                "{err}"
            );
        }
        assert_eq!(
            service_error("NotFoundException", 400),
            ProviderError::UnknownKek("arn:k".into())
        );
        for code in [
            "AccessDeniedException",
            "DisabledException",
            "KMSInvalidStateException",
            "InvalidKeyUsageException",
            "UnrecognizedClientException",
        ] {
            let err = service_error(code, 400);
            assert!(
                matches!(&err, ProviderError::Refused(m) if m.contains(code)),
                "{err}"
            );
        }
    }

    #[derive(Debug)]
    struct FailingCredentials(fn() -> CredentialsError);

    impl aws_credential_types::provider::ProvideCredentials for FailingCredentials {
        fn provide_credentials<'a>(
            &'a self,
        ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            aws_credential_types::provider::future::ProvideCredentials::ready(Err((self.0)()))
        }
    }

    #[tokio::test]
    async fn credential_failures_are_classified() {
        let cases: [(fn() -> CredentialsError, bool); 3] = [
            (|| CredentialsError::not_loaded("none in this test"), false),
            (
                || CredentialsError::invalid_configuration("bad profile"),
                false,
            ),
            (
                || CredentialsError::provider_timed_out(Duration::from_secs(1)),
                true,
            ),
        ];
        for (make, transient) in cases {
            let config = aws_sdk_kms::Config::builder()
                .behavior_version(BehaviorVersion::latest())
                .region(Region::new("us-east-1"))
                // Never reached: credentials fail first.
                .endpoint_url("http://127.0.0.1:9")
                .credentials_provider(FailingCredentials(make))
                .build();
            let provider = AwsKmsProvider::from_client(
                aws_sdk_kms::Client::from_conf(config),
                "k".into(),
                Duration::from_secs(2),
            );
            let err = provider.generate_data_key("ns").await.unwrap_err();
            assert_eq!(err.is_transient(), transient, "{err}");
        }
    }

    #[tokio::test]
    async fn a_hung_endpoint_times_out_as_transient() {
        // Accepts connections and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let mut config = AwsKmsConfig::new("alias/x", "us-east-1");
        config.endpoint = Some(format!("http://127.0.0.1:{port}"));
        config.timeout = Duration::from_millis(800);
        config.credentials = Some(StaticCredentials {
            access_key_id: "test".into(),
            secret_access_key: "test".into(),
            session_token: None,
        });
        let provider = AwsKmsProvider::new(&config).await.unwrap();
        let started = std::time::Instant::now();
        for result in [
            provider.generate_data_key("ns").await.map(|_| ()),
            provider
                .unwrap_data_key("ns", "arn:k", b"wrapped")
                .await
                .map(|_| ()),
        ] {
            let err = result.unwrap_err();
            assert!(err.is_transient(), "{err}");
        }
        assert!(started.elapsed() < Duration::from_secs(3));
        hold.abort();
    }
}
