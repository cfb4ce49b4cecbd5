//! Compression before sealing (per namespace, off by default): zstd over the serialized
//! Payload, recorded in the envelope (version 2, see proto/portcullis/v1/envelope.proto) so that
//! opening restores the original byte for byte and v1 envelopes keep opening as they are.
//!
//! Caveat (compress-then-encrypt): the size of a compressed ciphertext depends on the content.
//! Where one payload mixes data an attacker chooses with a secret, and the attacker sees the
//! sealed sizes (in Temporal's history, say), repeated guesses can reveal the secret (the CRIME
//! and BREACH attacks on TLS and HTTP compression). That is why it is off unless a namespace
//! turns it on: turn it on where payloads do not mix attacker-chosen input with secrets.

use serde::{Deserialize, Serialize};

/// `compression = { … }` of a `[[namespaces]]` entry: present means on.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CompressionConfig {
    /// The only algorithm: `zstd`.
    #[serde(default)]
    pub algorithm: CompressionAlgorithm,
    /// Payloads smaller than this (serialized, in bytes) are sealed uncompressed: small ones
    /// rarely shrink and cost the same per call.
    #[serde(default = "default_min_bytes")]
    pub min_bytes: usize,
    /// zstd level, 1 (fastest) to 19. 3 is zstd's own default.
    #[serde(default = "default_level")]
    pub level: i32,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CompressionAlgorithm {
    #[default]
    Zstd,
}

fn default_min_bytes() -> usize {
    1024
}
fn default_level() -> i32 {
    3
}

impl Default for CompressionConfig {
    fn default() -> Self {
        CompressionConfig {
            algorithm: CompressionAlgorithm::Zstd,
            min_bytes: default_min_bytes(),
            level: default_level(),
        }
    }
}

impl CompressionConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=19).contains(&self.level) {
            return Err("compression.level must be between 1 and 19".into());
        }
        Ok(())
    }

    /// The zstd frame of `payload`, when it is at least `min_bytes` and compression saves at
    /// least 1/16 of it; `None`: seal it as it is.
    pub fn compress(&self, payload: &[u8]) -> Option<Vec<u8>> {
        if payload.len() < self.min_bytes.max(1) {
            return None;
        }
        let compressed = if payload.len() <= REUSE_CONTEXT_BELOW {
            COMPRESSOR.with(|cell| {
                let mut slot = cell.borrow_mut();
                if slot.as_ref().is_none_or(|(level, _)| *level != self.level) {
                    *slot = Some((self.level, zstd::bulk::Compressor::new(self.level).ok()?));
                }
                slot.as_mut()?.1.compress(payload).ok()
            })?
        } else {
            zstd::bulk::compress(payload, self.level).ok()?
        };
        (compressed.len() <= payload.len() - payload.len() / 16).then_some(compressed)
    }
}

/// Payloads up to this size are compressed and decompressed with a context kept per thread:
/// creating one costs more than compressing a few KiB (about 20 µs, measured in
/// benches/payload_services.rs), while its tables stay small for inputs this size. Larger
/// payloads get a context of their own, freed with them.
const REUSE_CONTEXT_BELOW: usize = 64 * 1024;

thread_local! {
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Decompresses one zstd frame that must hold exactly `size` bytes (anything else is an error,
/// and nothing beyond `size` is ever allocated).
pub fn decompress(compressed: &[u8], size: usize) -> Result<Vec<u8>, std::io::Error> {
    let out = if size <= REUSE_CONTEXT_BELOW {
        DECOMPRESSOR.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some(zstd::bulk::Decompressor::new()?);
            }
            match slot.as_mut() {
                Some(decompressor) => decompressor.decompress(compressed, size),
                None => Err(std::io::Error::other("no zstd context")),
            }
        })?
    } else {
        zstd::bulk::decompress(compressed, size)?
    };
    if out.len() != size {
        return Err(std::io::Error::other(
            "decompressed size differs from the recorded one",
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compresses_only_when_it_helps() {
        let config = CompressionConfig::default();
        let json = br#"{"customer":"a","items":[1,2,3]}"#.repeat(100);
        let small = config.compress(&json).unwrap();
        assert!(small.len() < json.len() / 10);
        assert_eq!(decompress(&small, json.len()).unwrap(), json);
        // Below the threshold: left alone.
        assert!(config.compress(&json[..500]).is_none());
        // Random bytes do not shrink: kept as they are.
        let mut noise = ring::digest::digest(&ring::digest::SHA256, b"seed")
            .as_ref()
            .to_vec();
        while noise.len() < 4096 {
            let next = ring::digest::digest(&ring::digest::SHA256, &noise);
            noise.extend_from_slice(next.as_ref());
        }
        assert!(config.compress(&noise).is_none());
        // A wrong recorded size is an error, never a short or long payload.
        assert!(decompress(&small, json.len() - 1).is_err());
        assert!(decompress(&small, json.len() + 1).is_err());
    }
}
