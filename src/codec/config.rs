//! The `[codec]` section.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CodecConfig {
    /// `IP:PORT` of the codec server's own HTTP listener.
    pub address: String,
    /// HTTPS, and optionally client certificates. Required unless `plaintext = true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<CodecTls>,
    /// Plain HTTP: only allowed on a loopback address.
    #[serde(default)]
    pub plaintext: bool,
    /// Origins (`scheme://host[:port]`) whose pages may call the codec server from a browser,
    /// e.g. the Temporal Web UI's. Requests from other origins are refused.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Largest request body accepted.
    #[serde(default = "default_max_request")]
    pub max_request_bytes: usize,
    /// Most payloads in one request.
    #[serde(default = "default_max_payloads")]
    pub max_payloads: usize,
    /// A request (headers, body and work) that takes longer is answered 408 and dropped.
    #[serde(default = "default_timeout")]
    pub request_timeout_seconds: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CodecTls {
    /// The codec server's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// CA bundle for client certificates. When set, callers may authenticate with a client
    /// certificate (the same identities and policies as the gRPC listener); they may still
    /// come without one and use a bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
}

fn default_max_request() -> usize {
    8 * 1024 * 1024
}
fn default_max_payloads() -> usize {
    1000
}
fn default_timeout() -> u64 {
    10
}

impl CodecConfig {
    /// A plaintext codec listener on `address` (loopback), for `portcullis dev`.
    pub fn loopback(address: &str, allowed_origins: Vec<String>) -> CodecConfig {
        CodecConfig {
            address: address.to_string(),
            tls: None,
            plaintext: true,
            allowed_origins,
            max_request_bytes: default_max_request(),
            max_payloads: default_max_payloads(),
            request_timeout_seconds: default_timeout(),
        }
    }

    pub fn socket_address(&self) -> Result<SocketAddr, String> {
        self.address
            .parse()
            .map_err(|_| format!("codec.address {:?} is not IP:PORT", self.address))
    }

    pub fn validate(&self) -> Result<(), String> {
        let address = self.socket_address()?;
        match (&self.tls, self.plaintext) {
            (Some(_), true) => {
                return Err("codec: set either [codec.tls] or plaintext = true, not both".into())
            }
            (None, false) => {
                return Err(
                    "codec: [codec.tls] is required (plaintext = true is allowed only on loopback)"
                        .into(),
                )
            }
            (None, true) if !address.ip().is_loopback() => {
                return Err(format!(
                    "codec: plaintext is allowed only on a loopback address, not {}",
                    self.address
                ))
            }
            _ => {}
        }
        for origin in &self.allowed_origins {
            validate_origin(origin)?;
        }
        if self.max_request_bytes == 0
            || self.max_payloads == 0
            || self.request_timeout_seconds == 0
        {
            return Err("codec: limits must be positive".into());
        }
        Ok(())
    }

    pub fn resolve_paths(&mut self, base: &Path) {
        if let Some(tls) = &mut self.tls {
            for path in [&mut tls.cert, &mut tls.key]
                .into_iter()
                .chain(tls.client_ca.as_mut())
            {
                if path.is_relative() {
                    *path = base.join(&*path);
                }
            }
        }
    }
}

/// An origin is `scheme://host[:port]`: no wildcard (credentials are allowed, and browsers
/// refuse `*` with credentials anyway), no path.
fn validate_origin(origin: &str) -> Result<(), String> {
    let bad = || {
        Err(format!(
            "codec.allowed_origins: {origin:?} is not an origin (scheme://host[:port], no path, no wildcard)"
        ))
    };
    let Some((scheme, rest)) = origin.split_once("://") else {
        return bad();
    };
    if !matches!(scheme, "http" | "https")
        || rest.is_empty()
        || rest.contains(['/', '*', '?', '#', ' '])
    {
        return bad();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_only_on_loopback_and_origins_are_checked() {
        let ok = CodecConfig::loopback("127.0.0.1:0", vec!["http://localhost:8233".into()]);
        assert!(ok.validate().is_ok());
        let mut public = ok.clone();
        public.address = "0.0.0.0:8081".into();
        assert!(public.validate().unwrap_err().contains("loopback"));
        for origin in [
            "*",
            "http://ui.example/path",
            "ui.example",
            "ftp://x",
            "https://*.x",
        ] {
            let mut c = ok.clone();
            c.allowed_origins = vec![origin.into()];
            assert!(c.validate().is_err(), "{origin}");
        }
        let mut neither = ok.clone();
        neither.plaintext = false;
        assert!(neither.validate().is_err());
    }
}
