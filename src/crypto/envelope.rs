//! The v1 envelope on the wire, and sealing and opening under a data key that is already known.
//!
//! A sealed payload is a `temporal.api.common.v1.Payload` with metadata
//! `encoding: binary/encrypted`, `encryption-key-id: <data key id>`, `portcullis-envelope: v1`
//! and, as data, a serialized `portcullis.v1.Envelope` (proto/portcullis/v1/envelope.proto).
//! Both are written and read here by hand rather than through prost's generated types: sealing
//! then encrypts the plaintext from where it lies straight into the end of the output buffer
//! (no copy of it, none of the ciphertext), and inspecting a 2 MiB payload copies nothing.
//! Tests check the hand-written codec against the generated one.

use std::sync::Arc;

use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::{AeadCore, OsRng};
use aes_gcm::{Aes256Gcm, Nonce};
use ring::digest;

use super::error::{CryptoError, OpenFailure};
use super::gcm::{DataKey, FixedAadGcm};

pub const ENCODING_KEY: &str = "encoding";
pub const ENCODING_ENCRYPTED: &[u8] = b"binary/encrypted";
pub const KEY_ID_KEY: &str = "encryption-key-id";
pub const ENVELOPE_KEY: &str = "portcullis-envelope";
pub const ENVELOPE_V1: &[u8] = b"v1";
/// The marker of an envelope whose plaintext was compressed before sealing (envelope version 2):
/// a reader that knows only v1 refuses it instead of handing out compressed bytes.
pub const ENVELOPE_V2: &[u8] = b"v2";
/// Metadata naming the scope of an envelope sealed for a scope that is not a namespace (Nexus
/// endpoint descriptions, [`crate::payload::walker::NEXUS_ENDPOINT_SCOPE`]), so a reader
/// without the context (the codec server) knows which key opens it. Outside the ciphertext, but
/// the associated data binds the scope: an altered one does not open.
pub const SCOPE_KEY: &str = "portcullis-scope";
pub const ENVELOPE_VERSION: u32 = 1;
/// The version of an envelope whose plaintext is compressed ([`ENVELOPE_V2`]).
pub const ENVELOPE_VERSION_COMPRESSED: u32 = 2;
/// First component of the associated data: a v1 ciphertext can never verify as another format.
const FORMAT_TAG: &[u8] = b"portcullis/v1";
/// The same for v2 (compressed plaintext).
const FORMAT_TAG_V2: &[u8] = b"portcullis/v2";
/// `portcullis.v1.Compression.COMPRESSION_ZSTD`.
const COMPRESSION_ZSTD: u64 = 1;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;

const WIRE_VARINT: u64 = 0;
const WIRE_FIXED64: u64 = 1;
const WIRE_LEN: u64 = 2;
const WIRE_START_GROUP: u64 = 3;
const WIRE_END_GROUP: u64 = 4;
const WIRE_FIXED32: u64 = 5;
const MAX_GROUP_DEPTH: usize = 32;

/// What is needed to fetch the data key of a sealed payload.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EnvelopeRef {
    pub kek_id: String,
    pub wrapped_data_key: Vec<u8>,
    pub data_key_id: String,
}

/// The data key id: hex of the first 8 bytes of SHA-256 of the wrapped key. Derived rather than
/// random so that any reader can check the metadata against the envelope it describes.
pub fn data_key_id(wrapped: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let hash = digest::digest(&digest::SHA256, wrapped);
    let mut id = String::with_capacity(16);
    for byte in &hash.as_ref()[..8] {
        id.push(char::from(HEX[usize::from(byte >> 4)]));
        id.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    id
}

/// Concatenates length-prefixed parts (u64 big-endian), so no two different part lists (say,
/// namespace "a" + key "bc" and namespace "ab" + key "c") produce the same bytes.
pub(crate) fn length_prefixed(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| 8 + p.len()).sum());
    for part in parts {
        out.extend_from_slice(&(part.len() as u64).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// The associated data of a v1 envelope.
pub fn associated_data(namespace: &str, kek_id: &str, data_key_id: &str) -> Vec<u8> {
    length_prefixed(&[
        FORMAT_TAG,
        namespace.as_bytes(),
        kek_id.as_bytes(),
        data_key_id.as_bytes(),
    ])
}

/// The associated data of a v2 envelope: v1's parts under another tag, then the compression
/// and the size of the original Payload, so neither can be changed or stripped.
fn associated_data_v2(
    namespace: &str,
    kek_id: &str,
    data_key_id: &str,
    plaintext_size: u64,
) -> Vec<u8> {
    length_prefixed(&[
        FORMAT_TAG_V2,
        namespace.as_bytes(),
        kek_id.as_bytes(),
        data_key_id.as_bytes(),
        b"zstd",
        &plaintext_size.to_be_bytes(),
    ])
}

/// Everything about sealing under one data key in one namespace that does not change per
/// payload, computed once per rotation.
pub(crate) struct Sealer {
    /// AES-GCM under the data key with this namespace's v1 associated data absorbed.
    gcm: FixedAadGcm,
    /// The sealed Payload's metadata fields, encoded.
    metadata: Vec<u8>,
    /// The same with the v2 marker (compressed plaintext).
    metadata_v2: Vec<u8>,
    namespace: String,
    /// Envelope fields 1-3 (version, kek_id, wrapped_data_key), encoded.
    envelope_head: Vec<u8>,
    pub(crate) kek_id: String,
    pub(crate) data_key_id: String,
}

impl Sealer {
    pub(crate) fn new(key: Arc<DataKey>, namespace: &str, kek_id: &str, wrapped: &[u8]) -> Self {
        let key_id = data_key_id(wrapped);
        let scope = namespace
            .starts_with(crate::payload::walker::RESERVED_SCOPE_PREFIX)
            .then_some((SCOPE_KEY, namespace.as_bytes()));
        let metadata_for = |marker: &[u8]| {
            let mut metadata = Vec::new();
            for (key, value) in [
                (ENCODING_KEY, ENCODING_ENCRYPTED),
                (KEY_ID_KEY, key_id.as_bytes()),
                (ENVELOPE_KEY, marker),
            ]
            .into_iter()
            .chain(scope)
            {
                let mut entry = Vec::with_capacity(key.len() + value.len() + 4);
                put_len_field(&mut entry, 1, key.as_bytes());
                put_len_field(&mut entry, 2, value);
                put_len_field(&mut metadata, 1, &entry);
            }
            metadata
        };
        let metadata = metadata_for(ENVELOPE_V1);
        let metadata_v2 = metadata_for(ENVELOPE_V2);
        let mut envelope_head = Vec::with_capacity(kek_id.len() + wrapped.len() + 8);
        put_varint(&mut envelope_head, 1 << 3 | WIRE_VARINT);
        put_varint(&mut envelope_head, u64::from(ENVELOPE_VERSION));
        put_len_field(&mut envelope_head, 2, kek_id.as_bytes());
        put_len_field(&mut envelope_head, 3, wrapped);
        Sealer {
            gcm: key.with_fixed_aad(&associated_data(namespace, kek_id, &key_id)),
            metadata,
            metadata_v2,
            namespace: namespace.to_owned(),
            envelope_head,
            kek_id: kek_id.to_owned(),
            data_key_id: key_id,
        }
    }

    fn envelope_len(&self, plaintext_len: usize) -> usize {
        let ciphertext_len = plaintext_len + TAG_LEN;
        self.envelope_head.len() + len_field_len(NONCE_LEN) + len_field_len(ciphertext_len)
    }

    /// The size of the sealed Payload for a plaintext Payload of `plaintext_len` bytes.
    pub(crate) fn sealed_len(&self, plaintext_len: usize) -> usize {
        self.metadata.len() + len_field_len(self.envelope_len(plaintext_len))
    }

    /// Seals a serialized Payload; returns the serialized sealed Payload.
    pub(crate) fn seal(&self, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let mut out = Vec::with_capacity(self.sealed_len(plaintext.len()));
        self.seal_into(plaintext, &nonce, &mut out)?;
        Ok(out)
    }

    /// Seals a serialized Payload, appending the sealed Payload (exactly
    /// [`Sealer::sealed_len`] bytes) to `out`: the plaintext is encrypted from where it lies
    /// into place. On error `out` is left as it was.
    pub(crate) fn seal_into(
        &self,
        plaintext: &[u8],
        nonce: &Nonce<<Aes256Gcm as AeadCore>::NonceSize>,
        out: &mut Vec<u8>,
    ) -> Result<(), CryptoError> {
        let begin = out.len();
        out.reserve(self.sealed_len(plaintext.len()));
        out.extend_from_slice(&self.metadata);
        put_varint(out, 2 << 3 | WIRE_LEN);
        put_varint(out, self.envelope_len(plaintext.len()) as u64);
        out.extend_from_slice(&self.envelope_head);
        put_len_field(out, 4, nonce);
        put_varint(out, 5 << 3 | WIRE_LEN);
        put_varint(out, (plaintext.len() + TAG_LEN) as u64);
        match self.gcm.encrypt_to(nonce, plaintext, out) {
            Ok(()) => {
                debug_assert_eq!(out.len() - begin, self.sealed_len(plaintext.len()));
                Ok(())
            }
            Err(_) => {
                out.truncate(begin);
                Err(CryptoError::SealFailed("payload too large for AES-GCM"))
            }
        }
    }
}

impl Sealer {
    /// Seals `compressed`, the zstd frame of a serialized Payload of `plaintext_size` bytes, as a
    /// v2 envelope; returns the serialized sealed Payload.
    pub(crate) fn seal_compressed(
        &self,
        compressed: &[u8],
        plaintext_size: usize,
        nonce: &Nonce<<Aes256Gcm as AeadCore>::NonceSize>,
    ) -> Result<Vec<u8>, CryptoError> {
        let size = plaintext_size as u64;
        let aad = associated_data_v2(&self.namespace, &self.kek_id, &self.data_key_id, size);
        // The envelope up to its ciphertext; the ciphertext is then encrypted straight into
        // the sealed Payload, behind it, as `seal_into` does for v1.
        let mut head = Vec::with_capacity(self.envelope_head.len() + 48);
        put_varint(&mut head, 1 << 3 | WIRE_VARINT);
        put_varint(&mut head, u64::from(ENVELOPE_VERSION_COMPRESSED));
        // Fields 2 and 3 (kek_id, wrapped key), as v1 writes them after its version.
        head.extend_from_slice(self.envelope_head.get(2..).unwrap_or_default());
        put_varint(&mut head, 6 << 3 | WIRE_VARINT);
        put_varint(&mut head, COMPRESSION_ZSTD);
        put_varint(&mut head, 7 << 3 | WIRE_VARINT);
        put_varint(&mut head, size);
        put_len_field(&mut head, 4, nonce);
        let ciphertext_len = compressed.len() + TAG_LEN;
        let envelope_len = head.len() + len_field_len(ciphertext_len);
        let mut out = Vec::with_capacity(self.metadata_v2.len() + len_field_len(envelope_len));
        out.extend_from_slice(&self.metadata_v2);
        put_varint(&mut out, 2 << 3 | WIRE_LEN);
        put_varint(&mut out, envelope_len as u64);
        out.extend_from_slice(&head);
        put_varint(&mut out, 5 << 3 | WIRE_LEN);
        put_varint(&mut out, ciphertext_len as u64);
        self.gcm
            .data_key()
            .with_fixed_aad(&aad)
            .encrypt_to(nonce, compressed, &mut out)
            .map_err(|_| CryptoError::SealFailed("payload too large for AES-GCM"))?;
        debug_assert_eq!(
            out.len(),
            self.metadata_v2.len() + len_field_len(envelope_len)
        );
        Ok(out)
    }
}

/// Random 96-bit nonces, drawn from the operating system in batches: one `getrandom` per batch
/// rather than one per payload (on a history page of thousands of small payloads the syscalls
/// cost as much as the encryption). Batches grow 1, 2, 4, … up to 256 nonces. The nonces are
/// exactly as random as one `getrandom` each, and each is handed out once. Sealing takes its
/// thread's batch ([`Nonces::for_this_thread`]), so the batches outlive a call: a serving
/// thread draws once per up to 256 sealed messages, not once per message. Deliberately not
/// `Clone`: a copy would hand out the same nonces again.
#[derive(Debug, Default)]
pub struct Nonces {
    buffer: Vec<u8>,
    next: usize,
}

const MAX_NONCE_BATCH: usize = 256;

thread_local! {
    static THREAD_NONCES: std::cell::Cell<Nonces> = std::cell::Cell::new(Nonces::default());
}

/// A thread's [`Nonces`], taken for one sealing pass and given back when dropped. Taken, not
/// shared: a pass nested on the same thread starts an empty batch of its own, and whichever
/// is given back last stays (the other's remaining nonces are dropped, never handed out twice).
#[derive(Debug)]
pub struct ThreadNonces(Nonces);

impl std::ops::Deref for ThreadNonces {
    type Target = Nonces;
    fn deref(&self) -> &Nonces {
        &self.0
    }
}

impl std::ops::DerefMut for ThreadNonces {
    fn deref_mut(&mut self) -> &mut Nonces {
        &mut self.0
    }
}

impl Drop for ThreadNonces {
    fn drop(&mut self) {
        let nonces = std::mem::take(&mut self.0);
        // At thread exit the slot may be gone: the nonces go with the thread.
        let _ = THREAD_NONCES.try_with(|slot| slot.set(nonces));
    }
}

impl Nonces {
    pub fn new() -> Self {
        Nonces::default()
    }

    /// This thread's batch, for one sealing pass.
    pub fn for_this_thread() -> ThreadNonces {
        ThreadNonces(
            THREAD_NONCES
                .try_with(std::cell::Cell::take)
                .unwrap_or_default(),
        )
    }

    pub(crate) fn next_nonce(
        &mut self,
    ) -> Result<Nonce<<Aes256Gcm as AeadCore>::NonceSize>, CryptoError> {
        if self.next + NONCE_LEN > self.buffer.len() {
            let batch = (self.buffer.len() / NONCE_LEN * 2).clamp(1, MAX_NONCE_BATCH);
            self.buffer.resize(batch * NONCE_LEN, 0);
            OsRng
                .try_fill_bytes(&mut self.buffer)
                .map_err(|_| CryptoError::SealFailed("the operating system gave no randomness"))?;
            self.next = 0;
        }
        let bytes = self
            .buffer
            .get(self.next..self.next + NONCE_LEN)
            .ok_or(CryptoError::SealFailed("nonce batch out of range"))?;
        self.next += NONCE_LEN;
        Ok(*Nonce::from_slice(bytes))
    }
}

/// Where an uncompressed envelope's nonce and ciphertext (with its tag) sit inside its
/// serialized Payload: what opening needs once the names in it have been checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SealedParts {
    nonce_at: u32,
    ciphertext_at: u32,
    ciphertext_len: u32,
}

impl SealedParts {
    /// The size of the original Payload.
    pub(crate) fn opened_len(&self) -> usize {
        usize::try_from(self.ciphertext_len)
            .unwrap_or(usize::MAX)
            .saturating_sub(TAG_LEN)
    }
}

/// The tags of the fields a [`Shape`] reads at fixed places: Payload `data` (2), envelope
/// `nonce` (4) and `ciphertext` (5), all length-delimited.
const DATA_TAG: u8 = 2 << 3 | WIRE_LEN as u8;
const NONCE_TAG: u8 = 4 << 3 | WIRE_LEN as u8;
const CIPHERTEXT_TAG: u8 = 5 << 3 | WIRE_LEN as u8;
const DATA_NUMBER: u64 = 2;
const NONCE_NUMBER: u64 = 4;
const CIPHERTEXT_NUMBER: u64 = 5;

/// The layout of an uncompressed envelope as portcullis writes it: all bytes before the nonce
/// (the Payload's metadata, then the envelope's version, kek id and wrapped key) fixed by the
/// data key, then the nonce and the ciphertext, and nothing after. A history page holds
/// thousands of payloads sealed under one key; once one has been parsed, the others are
/// recognised by comparing those bytes and read at known places instead of field by field.
///
/// Why a match needs no parse: a payload that [`Shape::parts`] accepts has the same complete
/// fields before its `data` as the payload the shape was learned from, then `data` as its last
/// field; in `data`, the same complete fields before the nonce, then a 12-byte nonce and a
/// ciphertext (at least a tag long) as its last two fields. A protobuf reader keeps the last
/// value of a field, so [`parse`] reads from it the same metadata, version, kek id and wrapped
/// key, passes the same checks, and finds its own nonce and ciphertext where `parts` says.
#[derive(Debug)]
pub(crate) struct Shape {
    /// The Payload's fields before `data`.
    metadata: Vec<u8>,
    /// The envelope's fields before the nonce.
    head: Vec<u8>,
}

/// The start of the last field of `buf`, with its number and value when it is length-delimited
/// (`None` when `buf` is empty, not valid protobuf, or ends with another kind of field).
fn last_len_field(buf: &[u8]) -> Option<(usize, u64, &[u8])> {
    let mut fields = Fields::new(buf);
    let mut last = None;
    while fields.pos < buf.len() {
        let start = fields.pos;
        last = match fields.field().ok()? {
            (number, Value::Len(value)) => Some((start, number, value)),
            _ => None,
        };
    }
    last
}

/// The value of a length-delimited field whose length prefix starts `buf` and whose value ends
/// it exactly.
fn len_value_to_end(buf: &[u8]) -> Option<&[u8]> {
    let mut fields = Fields::new(buf);
    let len = fields.varint().ok()?;
    let value = Fields::take(&mut fields, len).ok()?;
    (fields.pos == buf.len()).then_some(value)
}

impl Shape {
    /// The nonce and ciphertext of `payload` if it has this shape; `None` otherwise (it may
    /// still be a valid envelope: [`parse`] decides).
    #[inline]
    pub(crate) fn parts(&self, payload: &[u8]) -> Option<SealedParts> {
        let rest = payload.strip_prefix(self.metadata.as_slice())?;
        let envelope = len_value_to_end(rest.strip_prefix(&[DATA_TAG])?)?;
        let rest = envelope.strip_prefix(self.head.as_slice())?;
        let rest = rest.strip_prefix(&[NONCE_TAG, NONCE_LEN as u8])?;
        let rest = rest.get(NONCE_LEN..)?;
        let ciphertext = len_value_to_end(rest.strip_prefix(&[CIPHERTEXT_TAG])?)?;
        if ciphertext.len() < TAG_LEN {
            return None;
        }
        // The ciphertext ends the payload, and its tag byte follows the nonce; neither
        // subtraction can underflow (those bytes were just read), checked all the same.
        let ciphertext_at = payload.len().checked_sub(ciphertext.len())?;
        let nonce_at = payload.len().checked_sub(rest.len() + NONCE_LEN)?;
        Some(SealedParts {
            nonce_at: u32::try_from(nonce_at).ok()?,
            ciphertext_at: u32::try_from(ciphertext_at).ok()?,
            ciphertext_len: u32::try_from(ciphertext.len()).ok()?,
        })
    }
}

/// A sealed payload, parsed but not decrypted. Borrows from the payload bytes.
#[derive(Debug)]
pub(crate) struct SealedView<'a> {
    metadata_key_id: &'a [u8],
    kek_id: &'a str,
    wrapped: &'a [u8],
    nonce: &'a [u8],
    /// Ciphertext followed by the tag.
    ciphertext: &'a [u8],
    /// v2: the size of the original Payload (the ciphertext holds it compressed with zstd).
    plaintext_size: Option<u64>,
}

impl SealedView<'_> {
    pub(crate) fn wrapped(&self) -> &[u8] {
        self.wrapped
    }

    /// The size of the original Payload (parse() checked the ciphertext holds a tag). For a
    /// compressed envelope, the size it records (authenticated when opened): a size beyond
    /// memory comes out as `usize::MAX`, which every output limit refuses.
    pub(crate) fn opened_len(&self) -> usize {
        match self.plaintext_size {
            Some(size) => usize::try_from(size).unwrap_or(usize::MAX),
            None => self.ciphertext.len().saturating_sub(TAG_LEN),
        }
    }

    pub(crate) fn kek_id(&self) -> &str {
        self.kek_id
    }

    pub(crate) fn metadata_key_id(&self) -> &[u8] {
        self.metadata_key_id
    }

    /// Where this (uncompressed) envelope's nonce and ciphertext sit in `payload`, the bytes it
    /// was parsed from, so it can be opened later without parsing it again. `None` for a
    /// compressed envelope, or when `payload` is not what it was parsed from.
    pub(crate) fn parts_in(&self, payload: &[u8]) -> Option<SealedParts> {
        if self.plaintext_size.is_some() {
            return None;
        }
        let offset = |part: &[u8]| -> Option<u32> {
            // Address arithmetic only: both slices borrow from `payload` when it is the parsed
            // buffer, and the bounds are checked before the offset is trusted.
            let start = (part.as_ptr() as usize).checked_sub(payload.as_ptr() as usize)?;
            let end = start.checked_add(part.len())?;
            (end <= payload.len()).then_some(())?;
            u32::try_from(start).ok()
        };
        Some(SealedParts {
            nonce_at: offset(self.nonce)?,
            ciphertext_at: offset(self.ciphertext)?,
            ciphertext_len: u32::try_from(self.ciphertext.len()).ok()?,
        })
    }

    /// The [`Shape`] of `payload`, the bytes this view was parsed from, when it is laid out as
    /// portcullis writes envelopes (checked: the shape finds this view's nonce and ciphertext).
    pub(crate) fn shape_in(&self, payload: &[u8]) -> Option<Shape> {
        let parts = self.parts_in(payload)?;
        let (data_at, DATA_NUMBER, envelope) = last_len_field(payload)? else {
            return None;
        };
        let (ciphertext_at, CIPHERTEXT_NUMBER, _) = last_len_field(envelope)? else {
            return None;
        };
        let before_ciphertext = envelope.get(..ciphertext_at)?;
        let (nonce_at, NONCE_NUMBER, _) = last_len_field(before_ciphertext)? else {
            return None;
        };
        let shape = Shape {
            metadata: payload.get(..data_at)?.to_vec(),
            head: envelope.get(..nonce_at)?.to_vec(),
        };
        // A tag written in more than one byte, say, is valid protobuf but not this shape: the
        // check leaves such payloads to the general parser.
        (shape.parts(payload) == Some(parts)).then_some(shape)
    }

    pub(crate) fn envelope_ref(&self) -> EnvelopeRef {
        EnvelopeRef {
            kek_id: self.kek_id.to_owned(),
            wrapped_data_key: self.wrapped.to_vec(),
            data_key_id: data_key_id(self.wrapped),
        }
    }
}

/// The scope a sealed payload names ([`SCOPE_KEY`]), if it is a portcullis envelope that names
/// one.
pub fn scope_of(payload: &[u8]) -> Option<&str> {
    let mut scope = None;
    let mut sealed = false;
    for field in Fields::new(payload) {
        let Ok((1, Value::Len(entry))) = field else {
            continue;
        };
        match map_entry(entry) {
            Some((b"portcullis-envelope", _)) => sealed = true,
            Some((key, value)) if key == SCOPE_KEY.as_bytes() => scope = Some(value),
            _ => {}
        }
    }
    scope
        .filter(|_| sealed)
        .and_then(|s| std::str::from_utf8(s).ok())
}

/// Parses a serialized Payload. `Ok(None)`: it does not carry the portcullis marker (plaintext,
/// or encrypted by someone else). `Err`: marked, but not a readable v1 envelope.
pub(crate) fn parse(payload: &[u8]) -> Result<Option<SealedView<'_>>, CryptoError> {
    let malformed = CryptoError::MalformedEnvelope;
    let mut encoding = None;
    let mut key_id = None;
    let mut marker = None;
    let mut data: &[u8] = &[];
    for field in Fields::new(payload) {
        let (number, value) = field.map_err(|_| malformed("the payload is not valid protobuf"))?;
        match (number, value) {
            (1, Value::Len(entry)) => {
                let (key, value) =
                    map_entry(entry).ok_or_else(|| malformed("invalid payload metadata entry"))?;
                // Protobuf maps: the last entry for a key wins.
                match key {
                    b"encoding" => encoding = Some(value),
                    b"encryption-key-id" => key_id = Some(value),
                    b"portcullis-envelope" => marker = Some(value),
                    _ => {}
                }
            }
            (1, _) => return Err(malformed("payload metadata has the wrong wire type")),
            (2, Value::Len(bytes)) => data = bytes,
            (2, _) => return Err(malformed("payload data has the wrong wire type")),
            _ => {}
        }
    }
    let Some(marker) = marker else {
        return Ok(None);
    };
    let expected_version = match marker {
        ENVELOPE_V1 => ENVELOPE_VERSION,
        ENVELOPE_V2 => ENVELOPE_VERSION_COMPRESSED,
        _ => return Err(malformed("unsupported portcullis-envelope version")),
    };
    if encoding != Some(ENCODING_ENCRYPTED) {
        return Err(malformed(
            "a portcullis envelope must have encoding binary/encrypted",
        ));
    }
    let metadata_key_id = key_id.ok_or_else(|| malformed("encryption-key-id is missing"))?;

    let mut version = 0u64;
    let mut kek_id: &[u8] = &[];
    let mut wrapped: &[u8] = &[];
    let mut nonce: &[u8] = &[];
    let mut ciphertext: &[u8] = &[];
    let mut compression = 0u64;
    let mut plaintext_size = None;
    for field in Fields::new(data) {
        let (number, value) = field.map_err(|_| malformed("the envelope is not valid protobuf"))?;
        match (number, value) {
            (1, Value::Varint(v)) => version = v,
            (2, Value::Len(v)) => kek_id = v,
            (3, Value::Len(v)) => wrapped = v,
            (4, Value::Len(v)) => nonce = v,
            (5, Value::Len(v)) => ciphertext = v,
            (6, Value::Varint(v)) => compression = v,
            (7, Value::Varint(v)) => plaintext_size = Some(v),
            (1..=7, _) => return Err(malformed("an envelope field has the wrong wire type")),
            // Unknown fields: skipped, as protobuf readers do; nothing in them is trusted.
            _ => {}
        }
    }
    if version != u64::from(expected_version) {
        return Err(malformed("unsupported envelope version"));
    }
    let plaintext_size = if expected_version == ENVELOPE_VERSION_COMPRESSED {
        if compression != COMPRESSION_ZSTD {
            return Err(malformed("unsupported envelope compression"));
        }
        Some(plaintext_size.unwrap_or_default())
    } else {
        None
    };
    let kek_id = std::str::from_utf8(kek_id).map_err(|_| malformed("kek_id is not UTF-8"))?;
    if kek_id.is_empty() {
        return Err(malformed("kek_id is empty"));
    }
    if wrapped.is_empty() {
        return Err(malformed("wrapped_data_key is empty"));
    }
    if nonce.len() != NONCE_LEN {
        return Err(malformed("the nonce is not 12 bytes"));
    }
    if ciphertext.len() < TAG_LEN {
        return Err(malformed("the ciphertext is shorter than its tag"));
    }
    Ok(Some(SealedView {
        metadata_key_id,
        kek_id,
        wrapped,
        nonce,
        ciphertext,
        plaintext_size,
    }))
}

/// Everything about opening under one data key in one namespace that does not change per
/// payload, computed once when the key is resolved.
pub(crate) struct Opener {
    /// AES-GCM under the data key with this namespace's v1 associated data absorbed.
    gcm: FixedAadGcm,
    kek_id: String,
    data_key_id: String,
}

impl Opener {
    pub(crate) fn new(key: Arc<DataKey>, namespace: &str, kek_id: &str, wrapped: &[u8]) -> Self {
        let data_key_id = data_key_id(wrapped);
        Opener {
            gcm: key.with_fixed_aad(&associated_data(namespace, kek_id, &data_key_id)),
            kek_id: kek_id.to_owned(),
            data_key_id,
        }
    }

    /// Opens a parsed envelope; returns the original serialized Payload. The caller found this
    /// opener by the envelope's wrapped key.
    pub(crate) fn open(
        &self,
        view: &SealedView<'_>,
        namespace: &str,
    ) -> Result<Vec<u8>, CryptoError> {
        let mut out = Vec::with_capacity(view.opened_len());
        self.open_into(view, namespace, &mut out)?;
        Ok(out)
    }

    /// Opens a parsed envelope, appending the original serialized Payload (exactly
    /// [`SealedView::opened_len`] bytes) to `out`, decrypted from the envelope straight into
    /// it. On error `out` is left as it was: nothing unauthenticated stays behind.
    pub(crate) fn open_into(
        &self,
        view: &SealedView<'_>,
        namespace: &str,
        out: &mut Vec<u8>,
    ) -> Result<(), CryptoError> {
        if view.kek_id != self.kek_id {
            return Err(self.cannot_open(namespace, OpenFailure::KeyNotResolved));
        }
        // The metadata sits outside the ciphertext; it must agree with what the AAD binds.
        if view.metadata_key_id != self.data_key_id.as_bytes() {
            return Err(self.cannot_open(namespace, OpenFailure::KeyIdMismatch));
        }
        // parse() checked both lengths; checked again here so a slip can never panic.
        let body_len =
            view.ciphertext
                .len()
                .checked_sub(TAG_LEN)
                .ok_or(CryptoError::MalformedEnvelope(
                    "the ciphertext is shorter than its tag",
                ))?;
        if view.nonce.len() != NONCE_LEN {
            return Err(CryptoError::MalformedEnvelope("the nonce is not 12 bytes"));
        }
        if let Some(size) = view.plaintext_size {
            return self.open_compressed_into(view, namespace, size, out);
        }
        let (body, tag) = view.ciphertext.split_at(body_len);
        self.decrypt_into(view.nonce, body, tag, namespace, out)
    }

    pub(crate) fn kek_id(&self) -> &str {
        &self.kek_id
    }

    fn cannot_open(&self, namespace: &str, reason: OpenFailure) -> CryptoError {
        CryptoError::CannotOpen {
            key_id: self.data_key_id.clone(),
            namespace: namespace.to_owned(),
            reason,
        }
    }

    /// [`Opener::open_into`] for an envelope parsed before (by the walk that planned the
    /// output), whose key names were checked then against the [`EnvelopeRef`] this opener was
    /// resolved for. `payload` must be the bytes `parts` was found in; anything else fails.
    pub(crate) fn open_parts_into(
        &self,
        payload: &[u8],
        parts: SealedParts,
        namespace: &str,
        out: &mut Vec<u8>,
    ) -> Result<(), CryptoError> {
        let misplaced = || CryptoError::MalformedEnvelope("the envelope is not where it was found");
        let at = |offset: u32| usize::try_from(offset).map_err(|_| misplaced());
        let nonce_at = at(parts.nonce_at)?;
        let ciphertext_at = at(parts.ciphertext_at)?;
        let nonce = payload
            .get(nonce_at..nonce_at.saturating_add(NONCE_LEN))
            .ok_or_else(misplaced)?;
        let ciphertext = payload
            .get(ciphertext_at..ciphertext_at.saturating_add(at(parts.ciphertext_len)?))
            .ok_or_else(misplaced)?;
        let body_len = ciphertext
            .len()
            .checked_sub(TAG_LEN)
            .ok_or_else(misplaced)?;
        let (body, tag) = ciphertext.split_at(body_len);
        self.decrypt_into(nonce, body, tag, namespace, out)
    }

    /// Appends the decryption of `body` to `out`; on failure `out` is left as it was.
    fn decrypt_into(
        &self,
        nonce: &[u8],
        body: &[u8],
        tag: &[u8],
        namespace: &str,
        out: &mut Vec<u8>,
    ) -> Result<(), CryptoError> {
        self.gcm
            .decrypt_to(Nonce::from_slice(nonce), body, tag, out)
            .map_err(|_| self.cannot_open(namespace, OpenFailure::Authentication))
    }
}

impl Opener {
    /// [`Opener::open_into`] for a v2 envelope: decrypts into a buffer of its own (the size and
    /// compression are authenticated with it), then decompresses exactly `size` bytes onto `out`.
    fn open_compressed_into(
        &self,
        view: &SealedView<'_>,
        namespace: &str,
        size: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), CryptoError> {
        let body_len = view.ciphertext.len().saturating_sub(TAG_LEN);
        let (body, tag) = view.ciphertext.split_at(body_len);
        let aad = associated_data_v2(namespace, &self.kek_id, &self.data_key_id, size);
        let mut compressed = zeroize::Zeroizing::new(Vec::with_capacity(body.len()));
        self.gcm
            .data_key()
            .with_fixed_aad(&aad)
            .decrypt_to(Nonce::from_slice(view.nonce), body, tag, &mut compressed)
            .map_err(|_| self.cannot_open(namespace, OpenFailure::Authentication))?;
        // Authenticated: the size is the one this proxy recorded when it sealed.
        let size = usize::try_from(size)
            .map_err(|_| CryptoError::MalformedEnvelope("the recorded size is too large"))?;
        let opened = super::compress::decompress(&compressed, size).map_err(|_| {
            CryptoError::MalformedEnvelope(
                "the compressed payload does not decompress to its recorded size",
            )
        })?;
        out.extend_from_slice(&opened);
        Ok(())
    }
}

/// If `payload` is a Payload sealed by portcullis, what is needed to fetch its key; `None` for
/// plaintext, for payloads encrypted by someone else, and for malformed envelopes (use
/// [`inspect`] to tell those apart).
pub fn envelope_info(payload: &[u8]) -> Option<EnvelopeRef> {
    inspect(payload).ok().flatten()
}

/// Like [`envelope_info`], but a payload that carries the portcullis marker and is not a
/// readable v1 envelope is an error, so a walker can fail closed on it.
pub fn inspect(payload: &[u8]) -> Result<Option<EnvelopeRef>, CryptoError> {
    Ok(parse(payload)?.map(|view| view.envelope_ref()))
}

// --- protobuf wire format: the little that is needed, bounds-checked, no allocation ---

use crate::payload::wire::{put_varint, varint_len};

fn len_field_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

/// Appends a length-delimited field; field numbers here are all below 16 (one-byte tags).
fn put_len_field(out: &mut Vec<u8>, number: u64, value: &[u8]) {
    put_varint(out, number << 3 | WIRE_LEN);
    put_varint(out, value.len() as u64);
    out.extend_from_slice(value);
}

#[derive(Debug, Clone, Copy)]
enum Value<'a> {
    Varint(u64),
    Len(&'a [u8]),
    Fixed,
}

struct WireFailure;

struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
    failed: bool,
}

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Fields {
            buf,
            pos: 0,
            failed: false,
        }
    }

    #[inline]
    fn varint(&mut self) -> Result<u64, WireFailure> {
        // Tags and short lengths are one byte.
        if let Some(&byte) = self.buf.get(self.pos) {
            if byte < 0x80 {
                self.pos += 1;
                return Ok(u64::from(byte));
            }
        }
        self.varint_slow()
    }

    fn varint_slow(&mut self) -> Result<u64, WireFailure> {
        let mut value = 0u64;
        for shift in (0..70).step_by(7) {
            let byte = *self.buf.get(self.pos).ok_or(WireFailure)?;
            self.pos += 1;
            if shift == 63 && byte > 1 {
                return Err(WireFailure);
            }
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(WireFailure)
    }

    fn take(&mut self, len: u64) -> Result<&'a [u8], WireFailure> {
        let len = usize::try_from(len).map_err(|_| WireFailure)?;
        let end = self.pos.checked_add(len).ok_or(WireFailure)?;
        let bytes = self.buf.get(self.pos..end).ok_or(WireFailure)?;
        self.pos = end;
        Ok(bytes)
    }

    #[inline]
    fn field(&mut self) -> Result<(u64, Value<'a>), WireFailure> {
        let key = self.varint()?;
        let number = key >> 3;
        if number == 0 || number > u64::from(u32::MAX >> 3) {
            return Err(WireFailure);
        }
        let value = match key & 7 {
            WIRE_VARINT => Value::Varint(self.varint()?),
            WIRE_FIXED64 => {
                self.take(8)?;
                Value::Fixed
            }
            WIRE_LEN => {
                let len = self.varint()?;
                Value::Len(self.take(len)?)
            }
            WIRE_FIXED32 => {
                self.take(4)?;
                Value::Fixed
            }
            // Deprecated groups appear in neither message, but are valid protobuf: a plaintext
            // payload carrying one as an unknown field is still plaintext, not an error.
            WIRE_START_GROUP => {
                self.skip_group(number, 0)?;
                Value::Fixed
            }
            _ => return Err(WireFailure),
        };
        Ok((number, value))
    }

    fn skip_group(&mut self, number: u64, depth: usize) -> Result<(), WireFailure> {
        if depth >= MAX_GROUP_DEPTH {
            return Err(WireFailure);
        }
        loop {
            let key = self.varint()?;
            match key & 7 {
                WIRE_VARINT => {
                    self.varint()?;
                }
                WIRE_FIXED64 => {
                    self.take(8)?;
                }
                WIRE_LEN => {
                    let len = self.varint()?;
                    self.take(len)?;
                }
                WIRE_FIXED32 => {
                    self.take(4)?;
                }
                WIRE_START_GROUP => self.skip_group(key >> 3, depth + 1)?,
                WIRE_END_GROUP if key >> 3 == number => return Ok(()),
                _ => return Err(WireFailure),
            }
        }
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u64, Value<'a>), WireFailure>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.buf.len() {
            return None;
        }
        let result = self.field();
        self.failed = result.is_err();
        Some(result)
    }
}

/// A `map<string, bytes>` entry: (key, value), absent parts empty as protobuf defines.
fn map_entry(entry: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut key: &[u8] = &[];
    let mut value: &[u8] = &[];
    for field in Fields::new(entry) {
        match field.ok()? {
            (1, Value::Len(k)) => key = k,
            (2, Value::Len(v)) => value = v,
            (1 | 2, _) => return None,
            _ => {}
        }
    }
    Some((key, value))
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use temporalio_protos::temporal::api::common::v1::Payload;

    use super::*;
    use crate::crypto::proto::Envelope;

    fn data_key() -> Arc<DataKey> {
        Arc::new(DataKey::new(&[7u8; 32]))
    }

    fn opener(wrapped: &[u8]) -> Opener {
        Opener::new(data_key(), "ns", "k1", wrapped)
    }

    fn plain_payload(data: &[u8]) -> Vec<u8> {
        let mut payload = Payload::default();
        payload
            .metadata
            .insert("encoding".into(), b"json/plain".to_vec());
        payload.data = data.to_vec();
        payload.encode_to_vec()
    }

    #[test]
    fn hand_written_codec_agrees_with_prost() {
        let sealer = Sealer::new(data_key(), "ns", "k1", b"wrapped-key-bytes");
        let original = plain_payload(b"{\"hello\":1}");
        let sealed = sealer.seal(&original).unwrap();
        assert_eq!(sealed.len(), sealer.sealed_len(original.len()));

        let payload = Payload::decode(sealed.as_slice()).unwrap();
        assert_eq!(payload.metadata.len(), 3);
        assert_eq!(payload.metadata["encoding"], b"binary/encrypted");
        assert_eq!(payload.metadata["portcullis-envelope"], b"v1");
        let key_id = data_key_id(b"wrapped-key-bytes");
        assert_eq!(key_id.len(), 16);
        assert_eq!(payload.metadata["encryption-key-id"], key_id.as_bytes());

        let envelope = Envelope::decode(payload.data.as_slice()).unwrap();
        assert_eq!(envelope.version, 1);
        assert_eq!(envelope.kek_id, "k1");
        assert_eq!(envelope.wrapped_data_key, b"wrapped-key-bytes");
        assert_eq!(envelope.nonce.len(), NONCE_LEN);
        assert_eq!(envelope.ciphertext.len(), original.len() + TAG_LEN);
        // Field order and encoding match prost's own, byte for byte.
        assert_eq!(envelope.encode_to_vec(), payload.data);

        // And the reader accepts what prost writes.
        let rewritten = payload.encode_to_vec();
        let view = parse(&rewritten).unwrap().unwrap();
        assert_eq!(
            opener(b"wrapped-key-bytes").open(&view, "ns").unwrap(),
            original
        );
    }

    /// `seal_into` appends exactly `sealed_len` bytes, which prost reads as the envelope, and
    /// `open_into` appends the original; on failure neither leaves anything behind.
    #[test]
    fn seal_into_and_open_into_append_to_the_buffer() {
        let sealer = Sealer::new(data_key(), "ns", "k1", b"wrapped-key-bytes");
        let original = plain_payload(b"{\"hello\":2}");
        let mut nonces = Nonces::new();
        let mut out = b"prefix".to_vec();
        let nonce = nonces.next_nonce().unwrap();
        sealer.seal_into(&original, &nonce, &mut out).unwrap();
        assert_eq!(&out[..6], b"prefix");
        let sealed = &out[6..];
        assert_eq!(sealed.len(), sealer.sealed_len(original.len()));
        let payload = Payload::decode(sealed).unwrap();
        let envelope = Envelope::decode(payload.data.as_slice()).unwrap();
        assert_eq!(envelope.nonce, nonce.as_slice());
        assert_eq!(envelope.encode_to_vec(), payload.data);

        let view = parse(sealed).unwrap().unwrap();
        assert_eq!(view.opened_len(), original.len());
        let mut opened = b"before".to_vec();
        opener(b"wrapped-key-bytes")
            .open_into(&view, "ns", &mut opened)
            .unwrap();
        assert_eq!(&opened[..6], b"before");
        assert_eq!(&opened[6..], original.as_slice());

        // Wrong namespace: authentication fails, and the buffer is as it was.
        let wrong = Opener::new(data_key(), "other", "k1", b"wrapped-key-bytes");
        let mut untouched = b"before".to_vec();
        assert!(wrong.open_into(&view, "other", &mut untouched).is_err());
        assert_eq!(untouched, b"before");
    }

    /// Nonces: each one handed out once, drawn in growing batches (1, 2, 4, … 256).
    #[test]
    fn nonces_are_distinct_and_batched() {
        let mut nonces = Nonces::new();
        let mut seen = std::collections::HashSet::new();
        let mut batches = Vec::new();
        for _ in 0..2000 {
            let nonce = nonces.next_nonce().unwrap();
            assert!(seen.insert(nonce.to_vec()), "a nonce repeated");
            if nonces.next == NONCE_LEN {
                batches.push(nonces.buffer.len() / NONCE_LEN);
            }
        }
        assert_eq!(batches[..10], [1, 2, 4, 8, 16, 32, 64, 128, 256, 256]);
        // A call that seals one payload draws 12 bytes, as one getrandom per nonce did.
        let mut single = Nonces::new();
        single.next_nonce().unwrap();
        assert_eq!(single.buffer.len(), NONCE_LEN);
    }

    /// A thread's nonces carry over from one sealing pass to the next (a pass of one payload
    /// does not draw again while the thread's batch lasts), every nonce is still handed out
    /// once, and a pass nested on the same thread never gets the outer pass's nonces.
    #[test]
    fn thread_nonces_outlive_a_pass_and_never_repeat() {
        std::thread::spawn(|| {
            let mut seen = std::collections::HashSet::new();
            let mut draws = 0;
            for _ in 0..600 {
                let mut pass = Nonces::for_this_thread();
                let nonce = pass.next_nonce().unwrap();
                // The first nonce of a batch: this draw refilled it.
                if pass.next == NONCE_LEN {
                    draws += 1;
                }
                assert!(seen.insert(nonce.to_vec()), "a nonce repeated");
            }
            // 600 one-payload passes: batches 1, 2, 4, … 256, then one more of 256: 10 draws.
            assert_eq!(draws, 10, "draws for 600 one-payload passes");

            let mut outer = Nonces::for_this_thread();
            let a = outer.next_nonce().unwrap();
            {
                let mut inner = Nonces::for_this_thread();
                assert!(
                    inner.buffer.is_empty(),
                    "the nested pass shares the outer batch"
                );
                let b = inner.next_nonce().unwrap();
                assert_ne!(a, b);
            }
            let c = outer.next_nonce().unwrap();
            assert!(seen.insert(a.to_vec()) && seen.insert(c.to_vec()));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn empty_payload_round_trips() {
        let sealer = Sealer::new(data_key(), "ns", "k1", b"w");
        let sealed = sealer.seal(&[]).unwrap();
        let view = parse(&sealed).unwrap().unwrap();
        assert_eq!(opener(b"w").open(&view, "ns").unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn other_namespace_fails_authentication() {
        let sealer = Sealer::new(data_key(), "payments", "k1", b"w");
        let sealed = sealer.seal(&plain_payload(b"secret")).unwrap();
        let view = parse(&sealed).unwrap().unwrap();
        let wrong = Opener::new(data_key(), "payments2", "k1", b"w");
        let err = wrong.open(&view, "payments2").unwrap_err();
        assert!(matches!(
            err,
            CryptoError::CannotOpen {
                reason: OpenFailure::Authentication,
                ..
            }
        ));
        assert!(err.to_string().contains(&data_key_id(b"w")), "{err}");
    }

    #[test]
    fn associated_data_components_cannot_shift() {
        assert_ne!(
            associated_data("ab", "c", "d"),
            associated_data("a", "bc", "d")
        );
    }

    #[test]
    fn plaintext_and_foreign_payloads_are_not_ours() {
        assert_eq!(envelope_info(&plain_payload(b"x")), None);
        assert_eq!(envelope_info(&[]), None);
        let mut foreign = Payload::default();
        foreign
            .metadata
            .insert("encoding".into(), b"binary/encrypted".to_vec());
        foreign
            .metadata
            .insert("encryption-key-id".into(), b"someone-else".to_vec());
        foreign.data = vec![1, 2, 3];
        assert_eq!(inspect(&foreign.encode_to_vec()).unwrap(), None);
    }

    #[test]
    fn unknown_fields_and_groups_in_plaintext_are_fine() {
        let mut bytes = plain_payload(b"x");
        // Field 9 as a group holding a nested group and a varint; then field 10, fixed32.
        bytes.extend_from_slice(&[9 << 3 | 3, 10 << 3 | 3, 1 << 3, 5, 10 << 3 | 4, 9 << 3 | 4]);
        bytes.extend_from_slice(&[10 << 3 | 5, 1, 2, 3, 4]);
        assert_eq!(inspect(&bytes).unwrap(), None);
        // An unbalanced group is not protobuf.
        assert!(inspect(&[9 << 3 | 3, 8 << 3 | 4]).is_err());
        assert!(inspect(&[9 << 3 | 4]).is_err());
    }

    #[test]
    fn envelope_overhead_is_small_and_exact() {
        let wrapped = [0u8; 60]; // the local provider's wrapped key size
        let sealer = Sealer::new(data_key(), "ns", "k1", &wrapped);
        for size in [0, 64, 1024, 2 << 20] {
            let overhead = sealer.sealed_len(size) - size;
            assert!(overhead < 256, "{size}: {overhead}");
        }
        assert_eq!(
            sealer.seal(&[0; 1000]).unwrap().len(),
            sealer.sealed_len(1000)
        );
    }

    #[test]
    fn marked_but_malformed_is_an_error() {
        let mut payload = Payload::default();
        payload
            .metadata
            .insert("portcullis-envelope".into(), b"v1".to_vec());
        payload
            .metadata
            .insert("encoding".into(), b"binary/encrypted".to_vec());
        payload
            .metadata
            .insert("encryption-key-id".into(), b"00".to_vec());
        payload.data = b"\xff\xff".to_vec();
        let bytes = payload.encode_to_vec();
        assert!(matches!(
            inspect(&bytes),
            Err(CryptoError::MalformedEnvelope(_))
        ));
        assert_eq!(envelope_info(&bytes), None);

        payload
            .metadata
            .insert("portcullis-envelope".into(), b"v9".to_vec());
        assert!(matches!(
            inspect(&payload.encode_to_vec()),
            Err(CryptoError::MalformedEnvelope(
                "unsupported portcullis-envelope version"
            ))
        ));
    }

    /// What a payload's envelope says, as the general parser reads it: the names the key is
    /// found and checked by, and where its nonce and ciphertext are.
    fn parsed(payload: &[u8]) -> Option<(String, Vec<u8>, Vec<u8>, SealedParts)> {
        let view = parse(payload).ok()??;
        Some((
            view.kek_id().to_owned(),
            view.wrapped().to_vec(),
            view.metadata_key_id().to_vec(),
            view.parts_in(payload)?,
        ))
    }

    /// Payloads sealed under one key, of every length-prefix width, are all read by the
    /// shape learned from one of them exactly as the parser reads them.
    #[test]
    fn a_shape_reads_envelopes_of_its_key_as_the_parser_does() {
        let sealer = Sealer::new(data_key(), "ns", "k1", b"wrapped-key-bytes");
        let sealed: Vec<Vec<u8>> = [0, 1, 40, 100, 120, 200, 16_000, 17_000, 2_100_000]
            .iter()
            .map(|&n| sealer.seal(&plain_payload(&vec![b'x'; n])).unwrap())
            .collect();
        let first = parse(&sealed[0]).unwrap().unwrap();
        let shape = first.shape_in(&sealed[0]).unwrap();
        for payload in &sealed {
            let (.., parts) = parsed(payload).unwrap();
            assert_eq!(shape.parts(payload), Some(parts));
            assert_eq!(
                parts.opened_len(),
                parse(payload).unwrap().unwrap().opened_len()
            );
        }

        // Another key's envelopes, a compressed envelope, plaintext: not this shape.
        let other = Sealer::new(data_key(), "ns", "k1", b"wrapped-key-bytez");
        assert_eq!(
            shape.parts(&other.seal(&plain_payload(b"x")).unwrap()),
            None
        );
        let compressed = sealer
            .seal_compressed(b"zstd frame", 100, &Aes256Gcm::generate_nonce(&mut OsRng))
            .unwrap();
        assert_eq!(shape.parts(&compressed), None);
        assert!(parse(&compressed)
            .unwrap()
            .unwrap()
            .shape_in(&compressed)
            .is_none());
        assert_eq!(shape.parts(&plain_payload(b"x")), None);
    }

    /// Any payload a shape accepts is one the parser reads the same way: tried with every
    /// single-byte change, every truncation and trailing bytes. Changes before the nonce are
    /// never accepted; changes to the nonce or the ciphertext are (decryption refuses them).
    #[test]
    fn a_shape_accepts_only_what_the_parser_reads_the_same() {
        let sealer = Sealer::new(data_key(), "ns", "k1", b"wrapped-key-bytes");
        let sealed = sealer.seal(&plain_payload(&[b'y'; 130])).unwrap();
        let shape = parse(&sealed).unwrap().unwrap().shape_in(&sealed).unwrap();
        let (kek_id, wrapped, key_id, parts) = parsed(&sealed).unwrap();
        let nonce_at = parts.nonce_at as usize;
        let check = |candidate: &[u8]| -> bool {
            let Some(found) = shape.parts(candidate) else {
                return false;
            };
            let (k, w, m, p) = parsed(candidate).expect("a shaped payload parses");
            assert_eq!(
                (k, w, m, p),
                (kek_id.clone(), wrapped.clone(), key_id.clone(), found)
            );
            true
        };
        let mut accepted = 0;
        for i in 0..sealed.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut changed = sealed.clone();
                changed[i] ^= flip;
                let ok = check(&changed);
                assert!(
                    !ok || i >= nonce_at,
                    "a change at {i}, before the nonce, was accepted"
                );
                accepted += usize::from(ok);
            }
            assert!(
                !check(&sealed[..i]),
                "a truncation to {i} bytes was accepted"
            );
        }
        assert!(accepted >= 3 * (sealed.len() - nonce_at - 3), "{accepted}");
        for tail in [&[0u8][..], &[0x08, 0x01], &[0x12, 0x00], &[0x2a, 0x00]] {
            let mut longer = sealed.clone();
            longer.extend_from_slice(tail);
            assert!(!check(&longer), "{tail:?} appended was accepted");
        }
    }

    /// Valid envelopes laid out otherwise (an unknown field after the ciphertext, a tag in two
    /// bytes) have no shape; the parser reads them.
    #[test]
    fn envelopes_laid_out_otherwise_have_no_shape() {
        let sealer = Sealer::new(data_key(), "ns", "k1", b"wrapped-key-bytes");
        let sealed = sealer.seal(&plain_payload(b"z")).unwrap();
        let mut payload = Payload::decode(sealed.as_slice()).unwrap();
        let mut envelope = payload.data.clone();
        envelope.extend_from_slice(&[0x40, 0x01]); // field 8, varint 1: unknown
        payload.data = envelope;
        let trailing = payload.encode_to_vec();
        let view = parse(&trailing).unwrap().unwrap();
        assert!(view.shape_in(&trailing).is_none());

        let mut long_tag = sealed.clone();
        // The metadata's first tag (field 1, length-delimited) in two bytes.
        assert_eq!(long_tag[0], 0x0a);
        long_tag.splice(0..1, [0x8a, 0x00]);
        let view = parse(&long_tag).unwrap().unwrap();
        let shape = view.shape_in(&long_tag).unwrap();
        assert_eq!(shape.parts(&long_tag), view.parts_in(&long_tag));
        assert_eq!(shape.parts(&sealed), None);
    }

    #[test]
    fn varint_lengths() {
        for value in [
            0u64,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            assert_eq!(out.len(), varint_len(value), "{value}");
            assert_eq!(Fields::new(&out).varint().ok(), Some(value));
        }
    }
}
