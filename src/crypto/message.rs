//! Sealing and opening every payload of a whole message: the payload walker driven by a data
//! key. This is what the proxy's encryption stage runs on each request and response.
//!
//! Both directions write each payload straight into the output buffer, which the walk has
//! already sized exactly: a payload's plaintext is copied once (into place, then encrypted or
//! decrypted there) and no buffer is allocated per payload.
//!
//! - Sealing is one walk. Nonces come from the thread's [`Nonces`], one `getrandom` per batch.
//! - Opening needs the data keys before it can decrypt, and fetching them is async, so it is
//!   split: [`plan_open`] walks once, collecting the distinct keys and planning the output;
//!   after the caller resolved the keys, [`OpenPlan::open`] writes the output without walking
//!   again. Two cases walk a second time (as everything did before): a sealed Failure
//!   `encoded_attributes` when failure attributes are decoded (the walker must read what it
//!   opens to restore message and stack trace), and the `pass-through` open-failure policy
//!   (a payload that does not open must then stay as it is, which is only known once tried).
//!
//! A message can hold payloads of more than one namespace: a command that starts a child
//! workflow in (or signals) another namespace is sealed under that namespace's data key, so the
//! target can open it, and its history events come back sealed that way. The walker says where
//! each payload belongs ([`PayloadContext::namespace`]); sealing picks the key by it
//! ([`ScopedKeys`]), and opening groups the keys it needs by it ([`OpenPlan::foreign`]).

use std::collections::{HashMap, VecDeque};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use super::envelope::{self, EnvelopeRef, Nonces, Opener, SealedParts, ThreadNonces};
use super::error::CryptoError;
use super::manager::{OpeningKeys, SealingKey};
use crate::payload::walker::{
    self, FailureMode, PayloadContext, PayloadIndex, PayloadVisitor, RewritePlan, Visit, WalkError,
    WalkLimits, WalkOptions,
};
use crate::payload::wire::{self, WireType};

/// The keys of one call, each bound to a namespace: the call's own first, then those of other
/// namespaces its payloads belong to (see [`PayloadContext::namespace`]).
#[derive(Debug, Clone)]
pub struct ScopedKeys<K> {
    keys: Vec<(String, K)>,
}

impl<K> ScopedKeys<K> {
    /// The keys of a call in `namespace`, starting with its own.
    pub fn new(namespace: impl Into<String>, key: K) -> Self {
        ScopedKeys {
            keys: vec![(namespace.into(), key)],
        }
    }

    /// Adds the key of another namespace (the first key of a namespace stays).
    pub fn add(&mut self, namespace: impl Into<String>, key: K) {
        let namespace = namespace.into();
        if !self.keys.iter().any(|(n, _)| *n == namespace) {
            self.keys.push((namespace, key));
        }
    }

    /// The call's own namespace.
    pub fn own(&self) -> &str {
        self.keys.first().map_or("", |(n, _)| n.as_str())
    }

    /// Where the key for a payload of `namespace` (`None`: the call's own) is.
    fn position(&self, namespace: Option<&str>) -> Option<usize> {
        match namespace {
            None => Some(0),
            Some(ns) => self.keys.iter().position(|(n, _)| n == ns),
        }
    }

    fn get(&self, position: usize) -> Option<&K> {
        self.keys.get(position).map(|(_, k)| k)
    }

    fn key_for(&self, ctx: &PayloadContext<'_>) -> Result<(usize, &K), WalkError> {
        self.position(ctx.namespace())
            .and_then(|i| Some((i, self.get(i)?)))
            .ok_or_else(|| WalkError::Unsupported {
                path: ctx.to_string(),
                reason: format!(
                    "the payload belongs to namespace {:?}, for which this call has no data key",
                    ctx.namespace().unwrap_or_default()
                ),
            })
    }
}

/// Seals every payload of `message` (a serialized `message_type`), each under the key of the
/// namespace it belongs to (the walker says which; `keys` must hold every one, or the walk
/// fails). With [`FailureMode::Encode`], Failure messages and stack traces are moved into
/// sealed `encoded_attributes` first. `None`: nothing to seal. A message that sealing would
/// push past `limits` is refused during the walk, before its output is allocated.
pub fn seal_message(
    index: &PayloadIndex,
    message_type: &str,
    message: &[u8],
    keys: &ScopedKeys<SealingKey>,
    failures: FailureMode,
    limits: WalkLimits,
) -> Result<Option<Vec<u8>>, WalkError> {
    seal_message_with(index, message_type, message, keys, failures, limits, None)
}

/// Seals a payload some other way than the plain v1 envelope: compressed first, or stored in
/// object storage with a sealed reference in its place (see [`crate::offload`]). Asked for each
/// payload of the input (not for those the walker builds, such as encoded failure attributes).
pub trait SealExtras {
    /// The sealed replacement of `payload`, sealed with `key` (and `nonces`); `None`: seal it
    /// as usual.
    fn seal(
        &mut self,
        ctx: &PayloadContext<'_>,
        key: &SealingKey,
        nonces: &mut Nonces,
        payload: &[u8],
    ) -> Result<Option<Vec<u8>>, WalkError>;
}

/// [`seal_message`] with [`SealExtras`] asked first about every payload.
pub fn seal_message_with<'k>(
    index: &PayloadIndex,
    message_type: &str,
    message: &[u8],
    keys: &'k ScopedKeys<SealingKey>,
    failures: FailureMode,
    limits: WalkLimits,
    extras: Option<&'k mut dyn SealExtras>,
) -> Result<Option<Vec<u8>>, WalkError> {
    let mut sealing = Sealing {
        keys,
        seal_text: failures == FailureMode::Encode,
        nonces: Nonces::for_this_thread(),
        pending: VecDeque::new(),
        extras,
    };
    walker::rewrite_named(
        index,
        message_type,
        message,
        &mut sealing,
        &WalkOptions::with_failures(failures)
            .limited(limits)
            .request(),
    )
}

struct Sealing<'k> {
    keys: &'k ScopedKeys<SealingKey>,
    extras: Option<&'k mut dyn SealExtras>,
    /// Seal text fields too ([`FailureMode::Encode`]).
    seal_text: bool,
    nonces: ThreadNonces,
    /// For each deferred payload, in order, the key it was sized for (only with several keys).
    pending: VecDeque<usize>,
}

impl PayloadVisitor for Sealing<'_> {
    /// Payloads the walker builds (encoded failure attributes) are sealed on the spot.
    fn payload(
        &mut self,
        ctx: &PayloadContext<'_>,
        payload: &[u8],
    ) -> Result<Option<Vec<u8>>, WalkError> {
        let (_, key) = self.keys.key_for(ctx)?;
        key.seal(payload).map(Some).map_err(WalkError::visitor)
    }

    fn visit(&mut self, ctx: &PayloadContext<'_>, payload: &[u8]) -> Result<Visit, WalkError> {
        if ctx.is_memo_value() && is_memo_nil(payload) {
            // The server deletes the key (or leaves it out of a new workflow's memo): sealed,
            // it would keep it. The one thing sealing leaves visible, on purpose.
            return Ok(Visit::Keep);
        }
        let (position, key) = self.keys.key_for(ctx)?;
        if let Some(extras) = self.extras.as_deref_mut() {
            if let Some(sealed) = extras.seal(ctx, key, &mut self.nonces, payload)? {
                return Ok(Visit::Replace(sealed));
            }
        }
        if self.keys.keys.len() > 1 {
            self.pending.push_back(position);
        }
        Ok(Visit::Deferred(key.sealed_len(payload.len())))
    }

    fn text(&mut self, ctx: &PayloadContext<'_>, text: &str) -> Result<Option<String>, WalkError> {
        if !self.seal_text || text.is_empty() {
            return Ok(None);
        }
        let (_, key) = self.keys.key_for(ctx)?;
        seal_text(key, text).map(Some).map_err(WalkError::visitor)
    }

    fn write(&mut self, payload: &[u8], out: &mut Vec<u8>) -> Result<(), WalkError> {
        // Deferred payloads are written in the order they were visited.
        let position = self.pending.pop_front().unwrap_or(0);
        let key = self
            .keys
            .get(position)
            .ok_or_else(|| WalkError::Internal("no key for a deferred payload"))?;
        key.seal_into(payload, &mut self.nonces, out)
            .map_err(WalkError::visitor)
    }
}

/// What starts a text that portcullis sealed (a query handler's error message, see
/// [`crate::payload::walker::USER_TEXT_FIELDS`]): the rest, up to the first character outside
/// the URL-safe base64 alphabet, is the sealed Payload (unpadded URL-safe base64) holding the
/// text. It survives where the server copies the text: `grpc-message` and the
/// `google.rpc.Status` of a failed query.
pub const SEALED_TEXT_PREFIX: &str = "portcullis-sealed:v1:";
const TEXT_ENCODING: &[u8] = b"text/plain";

/// The Temporal server cuts a query failure's message to this many bytes (observed with
/// server 1.32): a sealed text must fit whole, or it no longer opens.
pub const MAX_SEALED_TEXT: usize = 4000;

/// `{encoding: text/plain}`, the metadata entry of a sealed text's Payload.
fn text_metadata() -> Vec<u8> {
    let mut entry = Vec::with_capacity(24);
    wire::put_len_field(&mut entry, 1, b"encoding");
    wire::put_len_field(&mut entry, 2, TEXT_ENCODING);
    entry
}

/// The length of [`seal_text`]'s output for a text of `len` bytes.
fn sealed_text_len(key: &SealingKey, metadata_len: usize, len: usize) -> usize {
    let field = |n: usize| 1 + wire::varint_len(n as u64) + n;
    let sealed = key.sealed_len(field(metadata_len) + field(len));
    // Unpadded base64.
    SEALED_TEXT_PREFIX.len() + (4 * sealed).div_ceil(3)
}

/// Seals `text` into its string form (see [`SEALED_TEXT_PREFIX`]). A text whose sealed form
/// would pass [`MAX_SEALED_TEXT`] is cut first (at a character boundary) so it still opens:
/// the server would cut it anyway, and a cut envelope opens to nothing.
pub fn seal_text(key: &SealingKey, text: &str) -> Result<String, CryptoError> {
    let metadata = text_metadata();
    let mut keep = text.len();
    if sealed_text_len(key, metadata.len(), keep) > MAX_SEALED_TEXT {
        // The longest prefix that fits, by bisection (the sealed length grows with the text).
        let (mut fits, mut too_long) = (0, keep);
        while too_long - fits > 1 {
            let middle = fits + (too_long - fits) / 2;
            if sealed_text_len(key, metadata.len(), middle) <= MAX_SEALED_TEXT {
                fits = middle;
            } else {
                too_long = middle;
            }
        }
        keep = fits;
        while !text.is_char_boundary(keep) {
            keep -= 1;
        }
    }
    let text = text.get(..keep).unwrap_or_default();
    // A Payload {metadata {encoding: text/plain}, data: text}, sealed like any payload.
    let mut payload = Vec::with_capacity(metadata.len() + text.len() + 8);
    wire::put_len_field(&mut payload, 1, &metadata);
    wire::put_len_field(&mut payload, 2, text.as_bytes());
    let sealed = key.seal(&payload)?;
    Ok(format!(
        "{SEALED_TEXT_PREFIX}{}",
        URL_SAFE_NO_PAD.encode(sealed)
    ))
}

/// One sealed text found inside a string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedText {
    /// Where it is in the string (prefix included).
    pub range: std::ops::Range<usize>,
    /// The sealed Payload.
    pub sealed: Vec<u8>,
}

/// Every sealed text in `text`. A prefix not followed by the base64 of a portcullis envelope
/// (say, cut short by whoever copied the text) is not one, and stays as it is.
pub fn find_sealed_texts(text: &str) -> Vec<SealedText> {
    let mut found = Vec::new();
    for (at, _) in text.match_indices(SEALED_TEXT_PREFIX) {
        let start = at + SEALED_TEXT_PREFIX.len();
        let rest = text.get(start..).unwrap_or_default();
        let len = rest
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
            .count();
        let Some(encoded) = rest.get(..len) else {
            continue;
        };
        let Ok(sealed) = URL_SAFE_NO_PAD.decode(encoded) else {
            continue;
        };
        if matches!(envelope::inspect(&sealed), Ok(Some(_))) {
            found.push(SealedText {
                range: at..start + len,
                sealed,
            });
        }
    }
    found
}

/// The data key a sealed text needs.
pub fn sealed_text_ref(text: &SealedText) -> Result<EnvelopeRef, CryptoError> {
    envelope::inspect(&text.sealed)?.ok_or(CryptoError::MalformedEnvelope(
        "a sealed text that is not a portcullis envelope",
    ))
}

/// Replaces every sealed text found in `text` (by [`find_sealed_texts`]) with what it holds,
/// opened with `keys`.
pub fn open_texts(
    text: &str,
    found: &[SealedText],
    keys: &OpeningKeys,
) -> Result<String, CryptoError> {
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    for sealed in found {
        let opened = keys.open(&sealed.sealed)?;
        let mut data: &[u8] = &[];
        let mut encoding = None;
        for field in wire::fields(&opened) {
            let field = field
                .map_err(|_| CryptoError::MalformedEnvelope("a sealed text is not a Payload"))?;
            match (field.number, field.wire_type) {
                (1, WireType::Len) => {
                    for part in wire::fields(field.value).flatten() {
                        if part.number == 2 {
                            encoding = Some(part.value);
                        }
                    }
                }
                (2, WireType::Len) => data = field.value,
                _ => {}
            }
        }
        let plain = std::str::from_utf8(data)
            .ok()
            .filter(|_| encoding == Some(TEXT_ENCODING))
            .ok_or(CryptoError::MalformedEnvelope(
                "a sealed text that holds no text",
            ))?;
        out.push_str(text.get(copied..sealed.range.start).unwrap_or_default());
        out.push_str(plain);
        copied = sealed.range.end;
    }
    out.push_str(text.get(copied..).unwrap_or_default());
    Ok(out)
}

/// How to open a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpenOptions {
    /// Restore Failure message and stack trace from sealed `encoded_attributes` that the proxy
    /// encoded ([`FailureMode::Decode`]).
    pub decode_failures: bool,
    /// A sealed payload that cannot be opened (malformed, or its key will not unwrap) is left
    /// as it is instead of failing the call.
    pub pass_through: bool,
    pub limits: WalkLimits,
    /// Every payload must be sealed by portcullis: any other (plaintext, or encrypted by
    /// someone else) fails the walk with [`PlaintextPayload`]. Nil payloads (`binary/null`, no
    /// data) carry nothing and pass.
    pub strict: bool,
}

/// A payload that is not sealed by portcullis where every payload must be
/// ([`OpenOptions::strict`]).
#[derive(Debug, thiserror::Error)]
#[error("{path} holds a payload that is not sealed by portcullis (encoding {encoding:?})")]
pub struct PlaintextPayload {
    /// Where: `temporal.api.workflowservice.v1.PollWorkflowTaskQueueResponse.history.events…`
    pub path: String,
    /// Its `encoding` metadata, for the error message (never its data).
    pub encoding: String,
}

/// The sealed payloads of one namespace in a message, and the distinct data keys they need.
#[derive(Debug, Default)]
struct Group {
    /// `None`: the call's own namespace.
    namespace: Option<String>,
    refs: Vec<EnvelopeRef>,
    /// Wrapped keys already in `refs`, with their position there: a page of thousands of
    /// payloads usually needs one key (the last one found is compared before this is asked).
    seen: HashMap<Vec<u8>, usize>,
}

/// A deferred payload as the planning walk found it: which of its group's keys opens it and
/// where its nonce and ciphertext are, so the second half neither parses it nor looks its key
/// up again.
#[derive(Debug, Clone, Copy)]
struct Located {
    key: usize,
    parts: SealedParts,
}

/// The first half of opening a message: the data keys it needs, by namespace, and (usually)
/// its output, planned.
#[derive(Debug)]
pub struct OpenPlan {
    /// The call's own namespace first, then others in order of appearance.
    groups: Vec<Group>,
    /// For each deferred payload, in order, its group; empty while there is only one group.
    scopes: Vec<u16>,
    /// For each deferred payload, in order, where it was found; `None`: it is opened the general
    /// way (a compressed envelope, or key names that differ from its key's first envelope).
    located: Vec<Option<Located>>,
    /// `None` when the second half must walk again (see the module comment), or when nothing
    /// is sealed.
    plan: Option<RewritePlan>,
    rewalk: bool,
    options: OpenOptions,
    /// Payloads the planning walk parsed field by field.
    parsed: usize,
}

/// Walks `message` once: finds the sealed payloads, the distinct data keys they need (grouped
/// by the namespace they belong to), and where each opened payload goes. A payload marked as
/// sealed by portcullis that is not a readable envelope fails the walk (unless
/// `pass_through`); so does any unsealed payload when `strict`.
pub fn plan_open(
    index: &PayloadIndex,
    message_type: &str,
    message: &[u8],
    options: OpenOptions,
) -> Result<OpenPlan, WalkError> {
    let mut collect = Collect {
        groups: vec![Group::default()],
        scopes: Vec::new(),
        located: Vec::new(),
        deferred: 0,
        options,
        sealed_failure_attributes: false,
        shapes: Vec::new(),
        learn_attempts: 0,
        parsed: 0,
    };
    // Failure attributes are not decoded in this walk: it cannot read what it does not open.
    let plan = walker::plan_named(
        index,
        message_type,
        message,
        &mut collect,
        &WalkOptions::default().limited(options.limits),
    )?;
    let rewalk =
        options.pass_through || (options.decode_failures && collect.sealed_failure_attributes);
    Ok(OpenPlan {
        groups: collect.groups,
        scopes: collect.scopes,
        located: collect.located,
        plan: if rewalk { None } else { plan },
        rewalk,
        options,
        parsed: collect.parsed,
    })
}

impl OpenPlan {
    /// The data keys to resolve (each once) for the call's own namespace, before
    /// [`OpenPlan::open`].
    pub fn refs(&self) -> &[EnvelopeRef] {
        self.groups.first().map_or(&[], |g| g.refs.as_slice())
    }

    /// Other namespaces whose sealed payloads the message holds (a child workflow's input and
    /// result in its parent's history, …), each with the data keys to resolve for it.
    pub fn foreign(&self) -> impl Iterator<Item = (&str, &[EnvelopeRef])> {
        self.groups
            .iter()
            .skip(1)
            .filter_map(|g| Some((g.namespace.as_deref()?, g.refs.as_slice())))
    }

    /// Whether anything in the message is sealed by portcullis.
    pub fn has_sealed(&self) -> bool {
        self.groups.iter().any(|g| !g.refs.is_empty())
    }

    /// Whether [`OpenPlan::open`] will walk the message again.
    pub fn rewalks(&self) -> bool {
        self.rewalk
    }

    /// How many payloads the planning walk parsed field by field: an envelope laid out like
    /// one parsed before under the same key is read at known places instead.
    pub fn payloads_parsed(&self) -> usize {
        self.parsed
    }

    /// Opens every sealed payload of `message` (the same bytes [`plan_open`] walked) with
    /// `keys`, resolved for [`OpenPlan::refs`]. A plan with [`OpenPlan::foreign`] groups needs
    /// [`OpenPlan::open_scoped`]. `None`: nothing changed.
    pub fn open(
        &self,
        index: &PayloadIndex,
        message_type: &str,
        message: &[u8],
        keys: &OpeningKeys,
    ) -> Result<Option<Vec<u8>>, WalkError> {
        self.open_scoped(index, message_type, message, std::slice::from_ref(keys))
    }

    /// [`OpenPlan::open`] with one resolved set of keys per group: the call's own first, then
    /// one for each [`OpenPlan::foreign`] namespace, in that order.
    pub fn open_scoped(
        &self,
        index: &PayloadIndex,
        message_type: &str,
        message: &[u8],
        keys: &[OpeningKeys],
    ) -> Result<Option<Vec<u8>>, WalkError> {
        if !self.has_sealed() {
            return Ok(None);
        }
        if keys.len() != self.groups.len() {
            return Err(WalkError::Internal(
                "opening keys do not match the namespaces of the plan",
            ));
        }
        // Each group's keys in the order of its refs, looked up once for the whole message.
        let openers: Vec<Vec<Option<&Opener>>> = self
            .groups
            .iter()
            .zip(keys)
            .map(|(group, keys)| {
                group
                    .refs
                    .iter()
                    // Found by the wrapped key, so its data key id is the ref's.
                    .map(|r| {
                        keys.opener(&r.wrapped_data_key)
                            .filter(|o| o.kek_id() == r.kek_id)
                    })
                    .collect()
            })
            .collect();
        let mut opening = Opening {
            groups: &self.groups,
            keys,
            openers,
            scopes: self.scopes.iter(),
            located: self.located.iter(),
            pass_through: self.options.pass_through,
        };
        if self.rewalk {
            let failures = if self.options.decode_failures {
                FailureMode::Decode
            } else {
                FailureMode::Keep
            };
            return walker::rewrite_named(
                index,
                message_type,
                message,
                &mut opening,
                &WalkOptions::with_failures(failures).limited(self.options.limits),
            );
        }
        match &self.plan {
            Some(plan) => plan.apply(message, &mut opening).map(Some),
            None => Ok(None),
        }
    }
}

/// Whether a serialized Payload is nil (`encoding: binary/null`, no data): it carries nothing,
/// and SDKs and the server give it a meaning of its own (delete a memo key).
pub fn is_nil_payload(payload: &[u8]) -> bool {
    let mut nil = false;
    for field in wire::fields(payload) {
        let Ok(field) = field else { return false };
        match (field.number, field.wire_type) {
            (1, WireType::Len) => {
                let (mut key, mut value) = (None, None);
                for part in wire::fields(field.value) {
                    let Ok(part) = part else { return false };
                    match part.number {
                        1 => key = Some(part.value),
                        2 => value = Some(part.value),
                        _ => return false,
                    }
                }
                if key != Some(b"encoding".as_slice()) || value != Some(b"binary/null".as_slice()) {
                    return false;
                }
                nil = true;
            }
            (2, WireType::Len) if field.value.is_empty() => {}
            _ => return false,
        }
    }
    nil
}

/// Whether a serialized Payload is a value the Temporal server treats as nil in a memo: it
/// deletes the key on upsert (`ModifyWorkflowPropertiesCommandAttributes.upserted_memo`) and
/// leaves it out of a new workflow's memo (server 1.32, `common/payload`: data empty, `null`
/// or `[]`). portcullis leaves such a value unsealed where it is a memo value, and only in the
/// spellings SDKs write: metadata exactly `encoding: binary/null` with no data (every SDK's
/// nil), or `encoding: json/plain` with data `null` or `[]` (JSON null and the empty list).
/// Anything else is sealed (the server then keeps it).
pub fn is_memo_nil(payload: &[u8]) -> bool {
    let (mut encoding, mut data): (Option<&[u8]>, &[u8]) = (None, &[]);
    for field in wire::fields(payload) {
        let Ok(field) = field else { return false };
        match (field.number, field.wire_type) {
            (1, WireType::Len) if encoding.is_none() => {
                let (mut key, mut value) = (None, None);
                for part in wire::fields(field.value) {
                    let Ok(part) = part else { return false };
                    match part.number {
                        1 => key = Some(part.value),
                        2 => value = Some(part.value),
                        _ => return false,
                    }
                }
                if key != Some(b"encoding".as_slice()) {
                    return false;
                }
                encoding = Some(value.unwrap_or_default());
            }
            (2, WireType::Len) => data = field.value,
            _ => return false,
        }
    }
    match encoding {
        Some(b"binary/null") => data.is_empty(),
        Some(b"json/plain") => data == b"null" || data == b"[]",
        _ => false,
    }
}

/// The `encoding` metadata of a serialized Payload, for error messages.
fn encoding_of(payload: &[u8]) -> String {
    for field in wire::fields(payload).flatten() {
        if field.number != 1 || field.wire_type != WireType::Len {
            continue;
        }
        let (mut key, mut value) = (None, None);
        for part in wire::fields(field.value).flatten() {
            match part.number {
                1 => key = Some(part.value),
                2 => value = Some(part.value),
                _ => {}
            }
        }
        if key == Some(b"encoding".as_slice()) {
            return String::from_utf8_lossy(value.unwrap_or_default()).into_owned();
        }
    }
    String::new()
}

/// Whether an unsealed payload in an answer carries no user data, so an `encrypted_only`
/// namespace accepts it: a nil payload; a nil memo value (left unsealed on the way in, see
/// [`is_memo_nil`]); the server's record of a system Nexus operation's result
/// ([`crate::payload::system_nexus::is_system_response`]).
fn carries_nothing(ctx: &PayloadContext<'_>, payload: &[u8]) -> bool {
    is_nil_payload(payload)
        || (ctx.is_memo_value() && is_memo_nil(payload))
        || (ctx.field_name() == Some("result")
            && crate::payload::system_nexus::is_system_response(payload))
}

/// The first walk of opening: records each distinct data key once, per namespace, and defers
/// every sealed payload to the second half.
struct Collect {
    groups: Vec<Group>,
    scopes: Vec<u16>,
    located: Vec<Option<Located>>,
    /// Payloads deferred so far.
    deferred: usize,
    options: OpenOptions,
    sealed_failure_attributes: bool,
    /// The layouts of envelopes parsed so far, each with its group and key: a payload sealed
    /// under the same key and laid out the same is read at known places, not parsed. Several
    /// per key: the Temporal server writes a Payload's metadata map in a varying order
    /// (protobuf-go iterates Go maps), so a page from it holds each key's envelopes in up to
    /// three or six layouts.
    shapes: Vec<KnownShape>,
    /// Layouts tried to learn so far (see [`LEARN_ATTEMPTS_PER_MESSAGE`]).
    learn_attempts: usize,
    /// Payloads parsed field by field (sealed ones not read by their shape, and plaintext).
    parsed: usize,
}

#[derive(Debug)]
struct KnownShape {
    shape: envelope::Shape,
    group: usize,
    key: usize,
}

/// How many envelope layouts one opening walk learns and tries (a few per data key); past
/// that, envelopes of other layouts are parsed the general way. Trying a layout that does
/// not fit fails within the first few bytes.
const SHAPES_PER_MESSAGE: usize = 12;
/// How many times one opening walk tries to learn a layout, failures included: a message whose
/// envelopes are not laid out as portcullis writes them stops paying for the attempt.
const LEARN_ATTEMPTS_PER_MESSAGE: usize = 2 * SHAPES_PER_MESSAGE;

impl Collect {
    /// Records a sealed payload of `group` for the second half.
    fn defer(&mut self, ctx: &PayloadContext<'_>, group: usize, located: Option<Located>) {
        self.sealed_failure_attributes |= ctx.is_failure_attributes();
        if self.groups.len() > 1 {
            // `group` keeps positions below u16::MAX.
            self.scopes.push(u16::try_from(group).unwrap_or(u16::MAX));
        }
        self.located.push(located);
        self.deferred += 1;
    }

    /// The group of the namespace the payload at `ctx` belongs to, created on first use.
    fn group(&mut self, ctx: &PayloadContext<'_>) -> Result<usize, WalkError> {
        let Some(namespace) = ctx.namespace() else {
            return Ok(0);
        };
        if let Some(i) = self
            .groups
            .iter()
            .position(|g| g.namespace.as_deref() == Some(namespace))
        {
            return Ok(i);
        }
        if self.groups.len() >= usize::from(u16::MAX) {
            return Err(WalkError::Unsupported {
                path: ctx.to_string(),
                reason: "payloads of too many namespaces in one message".into(),
            });
        }
        if self.groups.len() == 1 {
            // From now on every deferred payload records its group.
            self.scopes = vec![0; self.deferred];
        }
        self.groups.push(Group {
            namespace: Some(namespace.to_owned()),
            ..Group::default()
        });
        Ok(self.groups.len() - 1)
    }
}

impl PayloadVisitor for Collect {
    fn payload(
        &mut self,
        ctx: &PayloadContext<'_>,
        payload: &[u8],
    ) -> Result<Option<Vec<u8>>, WalkError> {
        self.visit(ctx, payload).map(|_| None)
    }

    fn visit(&mut self, ctx: &PayloadContext<'_>, payload: &[u8]) -> Result<Visit, WalkError> {
        let first =
            self.shapes.iter().enumerate().find_map(|(i, known)| {
                Some((i, known.shape.parts(payload)?, known.group, known.key))
            });
        if let Some((i, parts, learned_in, key)) = first {
            // A sealed envelope, so its group is needed either way. A layout names its key,
            // not its namespace: only one learned in this payload's group opens it.
            let group = self.group(ctx)?;
            let found = if learned_in == group {
                Some((parts, key))
            } else {
                self.shapes.get(i + 1..).and_then(|later| {
                    later
                        .iter()
                        .filter(|known| known.group == group)
                        .find_map(|known| Some((known.shape.parts(payload)?, known.key)))
                })
            };
            if let Some((parts, key)) = found {
                self.defer(ctx, group, Some(Located { key, parts }));
                return Ok(Visit::Deferred(parts.opened_len()));
            }
        }
        self.parsed += 1;
        let view = match envelope::parse(payload) {
            Ok(Some(view)) => view,
            Ok(None) if self.options.strict && !carries_nothing(ctx, payload) => {
                return Err(WalkError::visitor(PlaintextPayload {
                    path: ctx.to_string(),
                    encoding: encoding_of(payload),
                }))
            }
            Ok(None) => return Ok(Visit::Keep),
            Err(_) if self.options.pass_through => return Ok(Visit::Keep),
            Err(e) => return Err(WalkError::visitor(e)),
        };
        let position = self.group(ctx)?;
        let group = self
            .groups
            .get_mut(position)
            .ok_or_else(|| WalkError::Internal("group out of range"))?;
        let key = match group.refs.last() {
            Some(last) if last.wrapped_data_key == view.wrapped() => group.refs.len() - 1,
            _ => match group.seen.get(view.wrapped()) {
                Some(&i) => i,
                None => {
                    let i = group.refs.len();
                    group.seen.insert(view.wrapped().to_vec(), i);
                    group.refs.push(view.envelope_ref());
                    i
                }
            },
        };
        // The names in this envelope must be those of the reference its key is resolved by;
        // one that differs is opened (and refused) the general way.
        let located = group
            .refs
            .get(key)
            .filter(|r| {
                r.kek_id == view.kek_id() && r.data_key_id.as_bytes() == view.metadata_key_id()
            })
            .and_then(|_| {
                Some(Located {
                    key,
                    parts: view.parts_in(payload)?,
                })
            });
        if self.options.pass_through {
            // Opened (or not) by the second walk.
            self.sealed_failure_attributes |= ctx.is_failure_attributes();
            return Ok(Visit::Keep);
        }
        if located.is_some()
            && self.shapes.len() < SHAPES_PER_MESSAGE
            && self.learn_attempts < LEARN_ATTEMPTS_PER_MESSAGE
        {
            self.learn_attempts += 1;
            if let Some(shape) = view.shape_in(payload) {
                self.shapes.push(KnownShape {
                    shape,
                    group: position,
                    key,
                });
            }
        }
        let opened_len = view.opened_len();
        self.defer(ctx, position, located);
        Ok(Visit::Deferred(opened_len))
    }
}

/// The second half of opening, with the resolved keys.
struct Opening<'k> {
    groups: &'k [Group],
    keys: &'k [OpeningKeys],
    /// Per group, the opener of each of its refs (`None`: not resolved as that ref).
    openers: Vec<Vec<Option<&'k Opener>>>,
    /// The groups of deferred payloads, in order (empty: all the call's own).
    scopes: std::slice::Iter<'k, u16>,
    located: std::slice::Iter<'k, Option<Located>>,
    pass_through: bool,
}

impl Opening<'_> {
    fn keys_for(&self, ctx: &PayloadContext<'_>) -> Result<&OpeningKeys, WalkError> {
        let position = match ctx.namespace() {
            None => Some(0),
            Some(ns) => self
                .groups
                .iter()
                .position(|g| g.namespace.as_deref() == Some(ns)),
        };
        position
            .and_then(|i| self.keys.get(i))
            .ok_or_else(|| WalkError::Internal("a payload of a namespace the plan did not see"))
    }
}

impl PayloadVisitor for Opening<'_> {
    fn payload(
        &mut self,
        ctx: &PayloadContext<'_>,
        payload: &[u8],
    ) -> Result<Option<Vec<u8>>, WalkError> {
        let keys = match self.keys_for(ctx) {
            Ok(keys) => keys,
            // No sealed payload of that namespace was seen: this one is not sealed either
            // (the first walk let it through), or does not open (pass-through).
            Err(_) if self.pass_through || matches!(envelope::parse(payload), Ok(None)) => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        match keys.open_if_sealed(payload) {
            Ok(opened) => Ok(opened),
            Err(CryptoError::CannotOpen { .. } | CryptoError::MalformedEnvelope(_))
                if self.pass_through =>
            {
                Ok(None)
            }
            Err(e) => Err(WalkError::visitor(e)),
        }
    }

    fn write(&mut self, payload: &[u8], out: &mut Vec<u8>) -> Result<(), WalkError> {
        let position = self.scopes.next().map_or(0, |g| usize::from(*g));
        let keys = self
            .keys
            .get(position)
            .ok_or_else(|| WalkError::Internal("no keys for a deferred payload"))?;
        let located = self.located.next().copied().flatten();
        let opener = located.and_then(|l| {
            let opener = self.openers.get(position)?.get(l.key).copied().flatten()?;
            Some((opener, l.parts))
        });
        match opener {
            Some((opener, parts)) => keys.open_parts_into(opener, payload, parts, out),
            None => keys.open_into(payload, out),
        }
        .map_err(WalkError::visitor)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use prost::Message;
    use temporalio_protos::temporal::api::common::v1::{ActivityType, Payload, Payloads};
    use temporalio_protos::temporal::api::failure::v1::Failure;
    use temporalio_protos::temporal::api::history::v1::{
        self as history, history_event::Attributes, History, HistoryEvent,
    };
    use temporalio_protos::temporal::api::workflowservice::v1::GetWorkflowExecutionHistoryResponse;

    use super::*;
    use crate::crypto::proto::Envelope;
    use crate::crypto::{DataKeyManager, DataKeyPolicy, Keyring, LocalKeyProvider, OpenFailure};

    const PAGE: &str = "temporal.api.workflowservice.v1.GetWorkflowExecutionHistoryResponse";
    const SECRET: &str = "secret-marker";

    fn payloads(data: &str) -> Option<Payloads> {
        Some(Payloads {
            payloads: vec![Payload {
                metadata: [("encoding".to_string(), b"json/plain".to_vec())].into(),
                data: format!("\"{SECRET} {data}\"").into_bytes(),
                ..Default::default()
            }],
        })
    }

    fn event(id: i64, attributes: Attributes) -> HistoryEvent {
        HistoryEvent {
            event_id: id,
            attributes: Some(attributes),
            ..Default::default()
        }
    }

    /// Every payload of the page `input` replaced through `each` (the walker's own rewrite).
    fn rewrite_page(input: &[u8], each: &mut dyn PayloadVisitor) -> Vec<u8> {
        walker::rewrite_named(index(), PAGE, input, each, &WalkOptions::default())
            .unwrap()
            .unwrap()
    }

    /// A history page; with `failure`, one activity failed with a message and stack trace.
    fn page(failure: bool) -> Vec<u8> {
        let mut events = Vec::new();
        for round in 0..20 {
            events.push(event(
                round * 2 + 1,
                Attributes::ActivityTaskScheduledEventAttributes(
                    history::ActivityTaskScheduledEventAttributes {
                        activity_id: round.to_string(),
                        activity_type: Some(ActivityType {
                            name: "charge".into(),
                        }),
                        input: payloads(&format!("input {round}")),
                        ..Default::default()
                    },
                ),
            ));
            events.push(event(
                round * 2 + 2,
                Attributes::ActivityTaskCompletedEventAttributes(
                    history::ActivityTaskCompletedEventAttributes {
                        result: payloads(&format!("result {round}")),
                        ..Default::default()
                    },
                ),
            ));
        }
        if failure {
            events.push(event(
                100,
                Attributes::ActivityTaskFailedEventAttributes(
                    history::ActivityTaskFailedEventAttributes {
                        failure: Some(Failure {
                            message: format!("{SECRET} failed"),
                            stack_trace: format!("{SECRET} at line 1"),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                ),
            ));
        }
        GetWorkflowExecutionHistoryResponse {
            history: Some(History { events }),
            next_page_token: b"next".to_vec(),
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn contains(haystack: &[u8], needle: &str) -> bool {
        haystack
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    }

    fn manager() -> DataKeyManager {
        DataKeyManager::new(
            Arc::new(LocalKeyProvider::new(&Keyring::generate())),
            DataKeyPolicy::default(),
        )
        .unwrap()
    }

    fn index() -> &'static PayloadIndex {
        PayloadIndex::global()
    }

    const STRICT: OpenOptions = OpenOptions {
        decode_failures: true,
        pass_through: false,
        limits: WalkLimits {
            max_payloads: crate::payload::walker::DEFAULT_MAX_PAYLOADS,
            max_output: usize::MAX,
        },
        strict: false,
    };

    async fn open(
        manager: &DataKeyManager,
        message: &[u8],
        options: OpenOptions,
    ) -> Result<(Option<Vec<u8>>, bool), WalkError> {
        let plan = plan_open(index(), PAGE, message, options)?;
        let keys = manager
            .opening_keys("ns", plan.refs().iter().cloned())
            .await
            .map_err(WalkError::visitor)?;
        Ok((plan.open(index(), PAGE, message, &keys)?, plan.rewalks()))
    }

    /// `original` (a history page) sealed for namespace `ns`.
    async fn seal_page(
        manager: &DataKeyManager,
        original: &[u8],
        failures: FailureMode,
    ) -> Vec<u8> {
        let key = manager.sealing_key("ns").await.unwrap();
        seal_message(
            index(),
            PAGE,
            original,
            &ScopedKeys::new("ns", key),
            failures,
            WalkLimits::default(),
        )
        .unwrap()
        .unwrap()
    }

    /// Every sealed payload decodes (prost) as a Payload whose data is a v1 Envelope.
    fn assert_sealed_with_prost(sealed: &[u8]) -> usize {
        let mut count = 0;
        let message = crate::schema::Schema::global().message(PAGE).unwrap();
        walker::visit_payloads(index(), &message, sealed, |_, p| {
            let payload = Payload::decode(p).unwrap();
            assert_eq!(payload.metadata["encoding"], b"binary/encrypted");
            assert_eq!(payload.metadata["portcullis-envelope"], b"v1");
            let envelope = Envelope::decode(payload.data.as_slice()).unwrap();
            assert_eq!(envelope.version, 1);
            assert_eq!(envelope.nonce.len(), 12);
            // The hand-written encoding is the one prost writes.
            assert_eq!(envelope.encode_to_vec(), payload.data);
            count += 1;
            Ok(())
        })
        .unwrap();
        count
    }

    /// A QueryWorkflow request whose `query_args` holds `count` empty payloads: 2 bytes each on
    /// the wire, an envelope of ~150 bytes each once sealed.
    fn empty_payload_query(count: usize) -> Vec<u8> {
        use temporalio_protos::temporal::api::query::v1::WorkflowQuery;
        use temporalio_protos::temporal::api::workflowservice::v1::QueryWorkflowRequest;
        QueryWorkflowRequest {
            namespace: "ns".into(),
            query: Some(WorkflowQuery {
                query_type: "q".into(),
                query_args: Some(Payloads {
                    payloads: vec![Payload::default(); count],
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec()
    }

    const QUERY: &str = "temporal.api.workflowservice.v1.QueryWorkflowRequest";

    #[tokio::test]
    async fn sealing_stops_as_soon_as_the_output_would_pass_the_limit() {
        let manager = manager();
        let key = manager.sealing_key("ns").await.unwrap();
        let message = empty_payload_query(200_000);
        let limits = WalkLimits {
            max_payloads: 1_000_000,
            max_output: 4 << 20,
        };
        let err = seal_message(
            index(),
            QUERY,
            &message,
            &ScopedKeys::new("ns", key.clone()),
            FailureMode::Keep,
            limits,
        )
        .unwrap_err();
        let WalkError::OutputTooLarge { size, limit } = err else {
            panic!("{err}");
        };
        assert_eq!(limit, 4 << 20);
        // Refused on the first payload past the limit, not after sealing the rest.
        assert!(size <= limit + 1024, "{size}");
        // Nothing was sealed: the sizes come from the plan.
        assert_eq!(manager.metrics().snapshot().seals, 0);

        // Within the limit the same kind of message seals.
        let small = empty_payload_query(100);
        assert!(seal_message(
            index(),
            QUERY,
            &small,
            &ScopedKeys::new("ns", key.clone()),
            FailureMode::Keep,
            limits
        )
        .unwrap()
        .is_some());
    }

    #[tokio::test]
    async fn too_many_payloads_are_refused_in_both_directions() {
        let manager = manager();
        let key = manager.sealing_key("ns").await.unwrap();
        let limits = WalkLimits {
            max_payloads: 1000,
            max_output: usize::MAX,
        };
        let at_limit = empty_payload_query(1000);
        let sealed = seal_message(
            index(),
            QUERY,
            &at_limit,
            &ScopedKeys::new("ns", key.clone()),
            FailureMode::Keep,
            limits,
        )
        .unwrap()
        .unwrap();
        let over = empty_payload_query(1001);
        let err = seal_message(
            index(),
            QUERY,
            &over,
            &ScopedKeys::new("ns", key.clone()),
            FailureMode::Keep,
            limits,
        )
        .unwrap_err();
        assert!(
            matches!(err, WalkError::TooManyPayloads { limit: 1000 }),
            "{err}"
        );

        let options = |max_payloads| OpenOptions {
            decode_failures: false,
            pass_through: false,
            strict: false,
            limits: WalkLimits {
                max_payloads,
                max_output: usize::MAX,
            },
        };
        assert!(plan_open(index(), QUERY, &sealed, options(1000)).is_ok());
        let err = plan_open(index(), QUERY, &sealed, options(999)).unwrap_err();
        assert!(
            matches!(err, WalkError::TooManyPayloads { limit: 999 }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_page_seals_and_opens_in_one_walk_each() {
        let manager = manager();
        let original = page(false);
        let sealed = seal_page(&manager, &original, FailureMode::Encode).await;
        assert!(!contains(&sealed, SECRET));
        assert_eq!(assert_sealed_with_prost(&sealed), 40);
        assert_eq!(manager.metrics().snapshot().seals, 40);

        let plan = plan_open(index(), PAGE, &sealed, STRICT).unwrap();
        assert_eq!(plan.refs().len(), 1, "one data key, listed once");
        assert_eq!(
            plan.payloads_parsed(),
            1,
            "the others are read by their shape"
        );
        let (opened, rewalked) = open(&manager, &sealed, STRICT).await.unwrap();
        assert!(!rewalked);
        assert_eq!(opened.unwrap(), original);

        // Nothing sealed: nothing to do.
        let plan = plan_open(index(), PAGE, &original, STRICT).unwrap();
        assert!(plan.refs().is_empty());
    }

    #[tokio::test]
    async fn sealed_failure_attributes_are_restored_by_a_second_walk() {
        let manager = manager();
        let original = page(true);
        let sealed = seal_page(&manager, &original, FailureMode::Encode).await;
        assert!(!contains(&sealed, SECRET));
        assert_eq!(assert_sealed_with_prost(&sealed), 41);
        let (opened, rewalked) = open(&manager, &sealed, STRICT).await.unwrap();
        assert!(rewalked);
        assert_eq!(opened.unwrap(), original);

        // Not decoding failures: opened in one walk, the attributes stay encoded (in plaintext).
        let keep = OpenOptions {
            decode_failures: false,
            pass_through: false,
            limits: WalkLimits::default(),
            strict: false,
        };
        let (opened, rewalked) = open(&manager, &sealed, keep).await.unwrap();
        assert!(!rewalked);
        let opened = opened.unwrap();
        assert_ne!(opened, original);
        assert!(contains(&opened, "Encoded failure"));
        assert!(contains(&opened, &format!("{SECRET} failed")));
    }

    /// Data sealed payload by payload (the earlier way, one Vec each) opens the new way, and
    /// the new output opens the earlier way.
    #[tokio::test]
    async fn earlier_sealed_data_opens_and_new_data_opens_the_earlier_way() {
        let manager = manager();
        let key = manager.sealing_key("ns").await.unwrap();
        let original = page(false);
        let mut seal_each =
            |_: &PayloadContext<'_>, p: &[u8]| key.seal(p).map(Some).map_err(WalkError::visitor);
        let sealed_each = rewrite_page(&original, &mut seal_each);
        assert_eq!(
            open(&manager, &sealed_each, STRICT)
                .await
                .unwrap()
                .0
                .unwrap(),
            original
        );

        let sealed = seal_message(
            index(),
            PAGE,
            &original,
            &ScopedKeys::new("ns", key.clone()),
            FailureMode::Keep,
            WalkLimits::default(),
        )
        .unwrap()
        .unwrap();
        let plan = plan_open(index(), PAGE, &sealed, STRICT).unwrap();
        let keys = manager
            .opening_keys("ns", plan.refs().iter().cloned())
            .await
            .unwrap();
        let mut open_each =
            |_: &PayloadContext<'_>, p: &[u8]| keys.open_if_sealed(p).map_err(WalkError::visitor);
        let opened = rewrite_page(&sealed, &mut open_each);
        assert_eq!(opened, original);
    }

    /// A tampered payload fails the call (strict) or stays sealed (pass-through) while the
    /// others open; nothing unauthenticated is ever returned.
    #[tokio::test]
    async fn tampered_payloads_fail_or_pass_through() {
        let manager = manager();
        let original = page(false);
        let mut sealed = seal_page(&manager, &original, FailureMode::Keep).await;
        // The last byte of the page is in the last payload's tag.
        let position = sealed.len() - b"next".len() - 3;
        sealed[position] ^= 1;
        let err = open(&manager, &sealed, STRICT).await.unwrap_err();
        let WalkError::Visitor(inner) = err else {
            panic!("{err}")
        };
        assert!(matches!(
            inner.downcast_ref::<CryptoError>(),
            Some(CryptoError::CannotOpen {
                reason: OpenFailure::Authentication,
                ..
            })
        ));

        let lenient = OpenOptions {
            decode_failures: true,
            pass_through: true,
            limits: WalkLimits::default(),
            strict: false,
        };
        let (opened, rewalked) = open(&manager, &sealed, lenient).await.unwrap();
        assert!(rewalked);
        let opened = opened.unwrap();
        let message = crate::schema::Schema::global().message(PAGE).unwrap();
        let (mut plain, mut still_sealed) = (0, 0);
        walker::visit_payloads(index(), &message, &opened, |_, p| {
            match crate::crypto::inspect(p).unwrap() {
                Some(_) => still_sealed += 1,
                None => plain += 1,
            }
            Ok(())
        })
        .unwrap();
        assert_eq!((plain, still_sealed), (39, 1));
    }

    /// Opening uses what the planning walk found (no second parse, no lookup per payload) only
    /// for envelopes whose key names agree with their key's first envelope; a later envelope
    /// under the same wrapped key that names another key id or key-encryption key is refused
    /// exactly as before.
    #[tokio::test]
    async fn envelopes_that_rename_their_key_are_refused_even_after_a_good_one() {
        let manager = manager();
        let original = page(false);
        let sealed = seal_page(&manager, &original, FailureMode::Keep).await;
        let (opened, _) = open(&manager, &sealed, STRICT).await.unwrap();
        assert_eq!(opened.as_deref(), Some(original.as_slice()));

        // The third payload (second event's result), renamed one way or the other.
        let rename = |edit: &dyn Fn(&mut Payload)| {
            let mut page = GetWorkflowExecutionHistoryResponse::decode(sealed.as_slice()).unwrap();
            let event = &mut page.history.as_mut().unwrap().events[1];
            let Some(Attributes::ActivityTaskCompletedEventAttributes(a)) = &mut event.attributes
            else {
                panic!("second event is not a completion")
            };
            edit(&mut a.result.as_mut().unwrap().payloads[0]);
            page.encode_to_vec()
        };
        let manager = &manager;
        let refusal = |message: Vec<u8>| async move {
            match open(manager, &message, STRICT).await {
                Err(WalkError::Visitor(inner)) => match inner.downcast_ref::<CryptoError>() {
                    Some(CryptoError::CannotOpen { reason, .. }) => reason.clone(),
                    other => panic!("{other:?}"),
                },
                other => panic!("opened a renamed envelope: {other:?}"),
            }
        };
        let other_key_id = rename(&|p: &mut Payload| {
            p.metadata
                .insert("encryption-key-id".into(), b"0123456789abcdef".to_vec());
        });
        assert_eq!(refusal(other_key_id).await, OpenFailure::KeyIdMismatch);
        let other_kek = rename(&|p: &mut Payload| {
            let mut envelope = Envelope::decode(p.data.as_slice()).unwrap();
            envelope.kek_id.push_str("-other");
            p.data = envelope.encode_to_vec();
        });
        assert_eq!(refusal(other_kek).await, OpenFailure::KeyNotResolved);
    }

    /// Reading envelopes by the layouts of those parsed before trusts nothing it has not
    /// compared: an envelope in the middle of a page whose key id or kek id differs from the
    /// others' by one character (same length, so every position stays put) is parsed and
    /// refused (the payloads after it are read by their shape again), and a page of two keys
    /// opens with both.
    #[tokio::test]
    async fn envelopes_read_by_their_shape_are_checked_like_parsed_ones() {
        let manager = manager();
        let original = page(false);
        let sealed = seal_page(&manager, &original, FailureMode::Keep).await;
        let r#ref = plan_open(index(), PAGE, &sealed, STRICT).unwrap().refs()[0].clone();
        // The payload at `nth` (0-based) with the first occurrence of `name` in it changed.
        let rename = |name: &[u8], nth: usize| {
            let mut page = sealed.clone();
            let at = (0..page.len())
                .filter(|&i| page[i..].starts_with(name))
                .nth(nth)
                .unwrap();
            page[at + name.len() - 1] ^= 1;
            page
        };
        let refusal = |message: Vec<u8>| {
            let manager = &manager;
            async move {
                let plan = plan_open(index(), PAGE, &message, STRICT).unwrap();
                // The renamed one teaches nothing: the next is read by the first one's shape.
                assert_eq!(plan.payloads_parsed(), 2, "the first and the renamed");
                match open(manager, &message, STRICT).await {
                    Err(WalkError::Visitor(inner)) => match inner.downcast_ref::<CryptoError>() {
                        Some(CryptoError::CannotOpen { reason, .. }) => reason.clone(),
                        other => panic!("{other:?}"),
                    },
                    other => panic!("opened a renamed envelope: {other:?}"),
                }
            }
        };
        // Each payload names its data key id once and its kek id once.
        let key_id = rename(r#ref.data_key_id.as_bytes(), 7);
        assert_eq!(refusal(key_id).await, OpenFailure::KeyIdMismatch);
        let kek_id = rename(r#ref.kek_id.as_bytes(), 7);
        assert_eq!(refusal(kek_id).await, OpenFailure::KeyNotResolved);

        // Two data keys under one key-encryption key: the first 20 payloads under one, the
        // rest under the other but for the 31st. Each change of key is parsed; all opens.
        let keyring = Keyring::generate();
        let with_key = || {
            DataKeyManager::new(
                Arc::new(LocalKeyProvider::new(&keyring)),
                DataKeyPolicy::default(),
            )
            .unwrap()
        };
        let (first, second) = (with_key(), with_key());
        let keys = [
            first.sealing_key("ns").await.unwrap(),
            second.sealing_key("ns").await.unwrap(),
        ];
        let mut n = 0;
        let mut seal = |_: &PayloadContext<'_>, p: &[u8]| {
            let key = &keys[usize::from(n >= 20 && n != 30)];
            n += 1;
            key.seal(p).map(Some).map_err(WalkError::visitor)
        };
        let two_keys = rewrite_page(&original, &mut seal);
        let plan = plan_open(index(), PAGE, &two_keys, STRICT).unwrap();
        // The first of each key; the 31st and 32nd fit layouts already learned.
        assert_eq!((plan.refs().len(), plan.payloads_parsed()), (2, 2));
        let (opened, _) = open(&first, &two_keys, STRICT).await.unwrap();
        assert_eq!(opened.unwrap(), original);
    }

    /// The Temporal server writes a Payload's metadata map in a varying order (protobuf-go
    /// iterates Go maps: a history page from the dev server held its envelopes' three entries
    /// in three rotations). Each layout is parsed once, then read by its shape; all opens.
    #[tokio::test]
    async fn envelopes_whose_metadata_the_server_reordered_are_read_by_their_shapes() {
        let manager = manager();
        let original = page(false);
        let sealed = seal_page(&manager, &original, FailureMode::Keep).await;
        let mut n = 0usize;
        let mut rotate = |_: &PayloadContext<'_>, p: &[u8]| {
            let fields: Vec<_> = wire::fields(p).map(Result::unwrap).collect();
            let (mut metadata, rest): (Vec<_>, Vec<_>) =
                fields.into_iter().partition(|f| f.number == 1);
            assert_eq!(metadata.len(), 3);
            metadata.rotate_left(n % 3);
            n += 1;
            let bytes: Vec<u8> = metadata
                .iter()
                .chain(&rest)
                .flat_map(|f| f.raw.to_vec())
                .collect();
            assert_eq!(bytes.len(), p.len());
            Ok(Some(bytes))
        };
        let reordered = rewrite_page(&sealed, &mut rotate);
        assert_ne!(reordered, sealed);
        let plan = plan_open(index(), PAGE, &reordered, STRICT).unwrap();
        assert_eq!((plan.refs().len(), plan.payloads_parsed()), (1, 3));
        let (opened, _) = open(&manager, &reordered, STRICT).await.unwrap();
        assert_eq!(opened.unwrap(), original);

        // A page whose every envelope is laid out differently (an extra metadata entry of its
        // own, outside what is authenticated and ignored by opening): every envelope is
        // parsed (past SHAPES_PER_MESSAGE no layout is learned), and all opens.
        let mut n = 0usize;
        let mut distinct = |_: &PayloadContext<'_>, p: &[u8]| {
            let mut entry = Vec::new();
            wire::put_len_field(&mut entry, 1, b"x-layout");
            wire::put_len_field(&mut entry, 2, n.to_string().as_bytes());
            n += 1;
            let mut bytes = Vec::new();
            wire::put_len_field(&mut bytes, 1, &entry);
            bytes.extend_from_slice(p);
            Ok(Some(bytes))
        };
        let each_its_own = rewrite_page(&sealed, &mut distinct);
        let plan = plan_open(index(), PAGE, &each_its_own, STRICT).unwrap();
        assert_eq!(plan.payloads_parsed(), 40);
        let (opened, _) = open(&manager, &each_its_own, STRICT).await.unwrap();
        assert_eq!(opened.unwrap(), original);
    }

    /// A payload marked as a portcullis envelope that is not one fails the first walk, unless
    /// the policy passes it through.
    #[test]
    fn marked_but_malformed_payloads_fail_the_plan() {
        let bogus = Payload {
            metadata: [
                ("encoding".to_string(), b"binary/encrypted".to_vec()),
                ("portcullis-envelope".to_string(), b"v1".to_vec()),
                ("encryption-key-id".to_string(), b"00".to_vec()),
            ]
            .into(),
            data: vec![0xff, 0xff],
            ..Default::default()
        };
        let message = GetWorkflowExecutionHistoryResponse {
            history: Some(History {
                events: vec![event(
                    1,
                    Attributes::ActivityTaskCompletedEventAttributes(
                        history::ActivityTaskCompletedEventAttributes {
                            result: Some(Payloads {
                                payloads: vec![bogus],
                            }),
                            ..Default::default()
                        },
                    ),
                )],
            }),
            ..Default::default()
        }
        .encode_to_vec();
        assert!(plan_open(index(), PAGE, &message, STRICT).is_err());
        let lenient = OpenOptions {
            decode_failures: true,
            pass_through: true,
            limits: WalkLimits::default(),
            strict: false,
        };
        let plan = plan_open(index(), PAGE, &message, lenient).unwrap();
        assert!(plan.refs().is_empty());
    }

    const COMPLETED: &str = "temporal.api.workflowservice.v1.RespondWorkflowTaskCompletedRequest";

    /// Each payload of `message` with what opens it: the namespace whose keys open it.
    async fn opens_as(
        manager: &DataKeyManager,
        message_type: &str,
        message: &[u8],
    ) -> Vec<(String, Option<&'static str>)> {
        let descriptor = crate::schema::Schema::global()
            .message(message_type)
            .unwrap();
        let mut payloads = Vec::new();
        walker::visit_payloads(index(), &descriptor, message, |ctx, p| {
            payloads.push((ctx.field_name().unwrap_or("").to_string(), p.to_vec()));
            Ok(())
        })
        .unwrap();
        let mut out = Vec::new();
        for (field, payload) in payloads {
            let r = crate::crypto::inspect(&payload).unwrap().unwrap();
            let mut opened_by = None;
            for ns in ["alpha", "beta"] {
                let keys = manager.opening_keys(ns, [r.clone()]).await;
                if keys.is_ok_and(|k| k.open(&payload).is_ok()) {
                    opened_by = Some(ns);
                }
            }
            out.push((field, opened_by));
        }
        out
    }

    #[allow(deprecated)] // the commands' namespace field
    fn completion() -> Vec<u8> {
        use temporalio_protos::temporal::api::command::v1::{
            command, Command, ScheduleActivityTaskCommandAttributes,
            SignalExternalWorkflowExecutionCommandAttributes,
            StartChildWorkflowExecutionCommandAttributes,
        };
        use temporalio_protos::temporal::api::common::v1::{Header, Memo};
        use temporalio_protos::temporal::api::workflowservice::v1::RespondWorkflowTaskCompletedRequest;
        let one = |text: &str| Payload {
            metadata: [("encoding".to_string(), b"json/plain".to_vec())].into(),
            data: format!("\"{SECRET} {text}\"").into_bytes(),
            ..Default::default()
        };
        let command = |attributes| Command {
            attributes: Some(attributes),
            ..Default::default()
        };
        RespondWorkflowTaskCompletedRequest {
            namespace: "alpha".into(),
            commands: vec![
                command(
                    command::Attributes::StartChildWorkflowExecutionCommandAttributes(
                        StartChildWorkflowExecutionCommandAttributes {
                            namespace: "beta".into(),
                            input: payloads("child input"),
                            header: Some(Header {
                                fields: [("h".to_string(), one("child header"))].into(),
                            }),
                            memo: Some(Memo {
                                fields: [("m".to_string(), one("child memo"))].into(),
                            }),
                            ..Default::default()
                        },
                    ),
                ),
                command(
                    command::Attributes::SignalExternalWorkflowExecutionCommandAttributes(
                        SignalExternalWorkflowExecutionCommandAttributes {
                            namespace: "".into(),
                            input: payloads("local signal"),
                            ..Default::default()
                        },
                    ),
                ),
                command(
                    command::Attributes::SignalExternalWorkflowExecutionCommandAttributes(
                        SignalExternalWorkflowExecutionCommandAttributes {
                            namespace: "beta".into(),
                            input: payloads("remote signal"),
                            ..Default::default()
                        },
                    ),
                ),
                command(command::Attributes::ScheduleActivityTaskCommandAttributes(
                    ScheduleActivityTaskCommandAttributes {
                        input: payloads("activity"),
                        ..Default::default()
                    },
                )),
            ],
            ..Default::default()
        }
        .encode_to_vec()
    }

    /// A command aimed at another namespace is sealed under that namespace's data key (so it
    /// opens there, and only there); the rest under the call's own.
    #[tokio::test]
    async fn commands_aimed_elsewhere_are_sealed_for_their_namespace() {
        let manager = manager();
        let mut keys = ScopedKeys::new("alpha", manager.sealing_key("alpha").await.unwrap());
        keys.add("beta", manager.sealing_key("beta").await.unwrap());
        let original = completion();
        let sealed = seal_message(
            index(),
            COMPLETED,
            &original,
            &keys,
            FailureMode::Encode,
            WalkLimits::default(),
        )
        .unwrap()
        .unwrap();
        assert!(!contains(&sealed, SECRET));
        let mut seen = opens_as(&manager, COMPLETED, &sealed).await;
        seen.sort();
        assert_eq!(
            seen,
            [
                // The local signal and the activity.
                ("payloads".to_string(), Some("alpha")),
                ("payloads".to_string(), Some("alpha")),
                // The child's input and the remote signal.
                ("payloads".to_string(), Some("beta")),
                ("payloads".to_string(), Some("beta")),
                // The child's header and memo (map values).
                ("value".to_string(), Some("beta")),
                ("value".to_string(), Some("beta")),
            ]
        );

        // Without beta's key the walk fails: nothing is sealed under a guess.
        let only_alpha = ScopedKeys::new("alpha", manager.sealing_key("alpha").await.unwrap());
        let err = seal_message(
            index(),
            COMPLETED,
            &original,
            &only_alpha,
            FailureMode::Encode,
            WalkLimits::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("\"beta\""), "{err}");
    }

    /// A parent's history holds its child's input sealed for the child's namespace: opening
    /// groups the keys by namespace and opens each payload with its own.
    #[tokio::test]
    async fn a_history_with_payloads_of_another_namespace_opens_with_both() {
        let manager = manager();
        let child_input = manager
            .sealing_key("beta")
            .await
            .unwrap()
            .seal(
                &Payload {
                    data: format!("{SECRET} child").into_bytes(),
                    ..Default::default()
                }
                .encode_to_vec(),
            )
            .unwrap();
        let mut events = vec![event(
            1,
            Attributes::StartChildWorkflowExecutionInitiatedEventAttributes(
                history::StartChildWorkflowExecutionInitiatedEventAttributes {
                    namespace: "beta".into(),
                    input: Some(Payloads {
                        payloads: vec![Payload::decode(child_input.as_slice()).unwrap()],
                    }),
                    ..Default::default()
                },
            ),
        )];
        let own = ScopedKeys::new("alpha", manager.sealing_key("alpha").await.unwrap());
        let activity = GetWorkflowExecutionHistoryResponse {
            history: Some(History {
                events: vec![event(
                    2,
                    Attributes::ActivityTaskScheduledEventAttributes(
                        history::ActivityTaskScheduledEventAttributes {
                            input: payloads("activity"),
                            ..Default::default()
                        },
                    ),
                )],
            }),
            ..Default::default()
        }
        .encode_to_vec();
        let sealed_activity = seal_message(
            index(),
            PAGE,
            &activity,
            &own,
            FailureMode::Keep,
            WalkLimits::default(),
        )
        .unwrap()
        .unwrap();
        events.extend(
            GetWorkflowExecutionHistoryResponse::decode(sealed_activity.as_slice())
                .unwrap()
                .history
                .unwrap()
                .events,
        );
        let page = GetWorkflowExecutionHistoryResponse {
            history: Some(History { events }),
            ..Default::default()
        }
        .encode_to_vec();

        let plan = plan_open(index(), PAGE, &page, STRICT).unwrap();
        assert_eq!(plan.refs().len(), 1);
        let foreign: Vec<&str> = plan.foreign().map(|(ns, _)| ns).collect();
        assert_eq!(foreign, ["beta"]);
        let mut keys = vec![manager
            .opening_keys("alpha", plan.refs().iter().cloned())
            .await
            .unwrap()];
        for (ns, refs) in plan.foreign() {
            keys.push(
                manager
                    .opening_keys(ns, refs.iter().cloned())
                    .await
                    .unwrap(),
            );
        }
        let opened = plan
            .open_scoped(index(), PAGE, &page, &keys)
            .unwrap()
            .unwrap();
        assert!(contains(&opened, &format!("{SECRET} child")));
        assert!(contains(&opened, &format!("{SECRET} activity")));
        // The single-namespace form refuses a plan that needs two.
        assert!(plan.open(index(), PAGE, &page, &keys[0]).is_err());
        // Swapped keys do not open: the namespace is bound into every envelope.
        keys.swap(0, 1);
        assert!(plan.open_scoped(index(), PAGE, &page, &keys).is_err());
    }

    /// Strict opening refuses any payload portcullis did not seal, except nil ones.
    #[tokio::test]
    async fn strict_opening_refuses_plaintext_but_not_nil() {
        let manager = manager();
        let key = ScopedKeys::new("ns", manager.sealing_key("ns").await.unwrap());
        let sealed = seal_message(
            index(),
            PAGE,
            &page(false),
            &key,
            FailureMode::Keep,
            WalkLimits::default(),
        )
        .unwrap()
        .unwrap();
        let strict = OpenOptions {
            strict: true,
            ..STRICT
        };
        assert!(open(&manager, &sealed, strict).await.unwrap().0.is_some());

        let err = plan_open(index(), PAGE, &page(false), strict).unwrap_err();
        let WalkError::Visitor(inner) = err else {
            panic!("{err}")
        };
        let plaintext = inner
            .downcast_ref::<PlaintextPayload>()
            .expect("plaintext error");
        assert_eq!(plaintext.encoding, "json/plain");
        assert!(
            plaintext
                .path
                .contains("activity_task_scheduled_event_attributes.input"),
            "{}",
            plaintext.path
        );
        assert!(!plaintext.to_string().contains(SECRET));
        // Lenient: passed through.
        assert!(plan_open(index(), PAGE, &page(false), STRICT).is_ok());

        let nil = Payload {
            metadata: [("encoding".to_string(), b"binary/null".to_vec())].into(),
            ..Default::default()
        };
        assert!(is_nil_payload(&nil.encode_to_vec()));
        let not_nil = Payload {
            metadata: [("encoding".to_string(), b"binary/null".to_vec())].into(),
            data: b"x".to_vec(),
            ..Default::default()
        };
        assert!(!is_nil_payload(&not_nil.encode_to_vec()));
        assert!(!is_nil_payload(&Payload::default().encode_to_vec()));
        let nil_page = GetWorkflowExecutionHistoryResponse {
            history: Some(History {
                events: vec![event(
                    1,
                    Attributes::ActivityTaskCompletedEventAttributes(
                        history::ActivityTaskCompletedEventAttributes {
                            result: Some(Payloads {
                                payloads: vec![nil],
                            }),
                            ..Default::default()
                        },
                    ),
                )],
            }),
            ..Default::default()
        }
        .encode_to_vec();
        let plan = plan_open(index(), PAGE, &nil_page, strict).unwrap();
        assert!(!plan.has_sealed());
    }

    /// A memo value the server treats as nil (delete the key) stays as it is, on the way in and
    /// in strict opening; every other memo value, and a nil anywhere else, is sealed.
    #[tokio::test]
    async fn nil_memo_values_stay_nil_and_nothing_else_does() {
        use temporalio_protos::temporal::api::command::v1::{
            command, Command, ModifyWorkflowPropertiesCommandAttributes,
        };
        use temporalio_protos::temporal::api::common::v1::Memo;
        use temporalio_protos::temporal::api::workflowservice::v1::RespondWorkflowTaskCompletedRequest;
        const COMPLETED: &str =
            "temporal.api.workflowservice.v1.RespondWorkflowTaskCompletedRequest";
        let value = |encoding: &str, data: &[u8]| Payload {
            metadata: [("encoding".to_string(), encoding.as_bytes().to_vec())].into(),
            data: data.to_vec(),
            ..Default::default()
        };
        let nils = [
            value("binary/null", b""),
            value("json/plain", b"null"),
            value("json/plain", b"[]"),
        ];
        let not_nils = [
            value("json/plain", b"\"secret-marker\""),
            value("binary/null", b"x"),
            value("json/plain", b""),
            value("binary/plain", b""),
            Payload {
                metadata: [
                    ("encoding".to_string(), b"binary/null".to_vec()),
                    ("other".to_string(), b"x".to_vec()),
                ]
                .into(),
                ..Default::default()
            },
        ];
        for nil in &nils {
            assert!(is_memo_nil(&nil.encode_to_vec()), "{nil:?}");
        }
        for other in &not_nils {
            assert!(!is_memo_nil(&other.encode_to_vec()), "{other:?}");
        }
        let fields: std::collections::HashMap<String, Payload> = nils
            .iter()
            .chain(&not_nils)
            .enumerate()
            .map(|(i, p)| (format!("k{i}"), p.clone()))
            .collect();
        let request = RespondWorkflowTaskCompletedRequest {
            namespace: "ns".into(),
            commands: vec![Command {
                attributes: Some(
                    command::Attributes::ModifyWorkflowPropertiesCommandAttributes(
                        ModifyWorkflowPropertiesCommandAttributes {
                            upserted_memo: Some(Memo {
                                fields: fields.clone(),
                            }),
                        },
                    ),
                ),
                ..Default::default()
            }],
            // A nil payload that is not a memo value is sealed.
            ..Default::default()
        };
        let manager = manager();
        let key = ScopedKeys::new("ns", manager.sealing_key("ns").await.unwrap());
        let sealed = seal_message(
            index(),
            COMPLETED,
            &request.encode_to_vec(),
            &key,
            FailureMode::Keep,
            WalkLimits::default(),
        )
        .unwrap()
        .unwrap();
        let sealed = RespondWorkflowTaskCompletedRequest::decode(sealed.as_slice()).unwrap();
        let Some(command::Attributes::ModifyWorkflowPropertiesCommandAttributes(attributes)) =
            &sealed.commands[0].attributes
        else {
            panic!("command kept");
        };
        let memo = &attributes.upserted_memo.as_ref().unwrap().fields;
        for (k, original) in &fields {
            let kept = &memo[k];
            if nils.contains(original) {
                assert_eq!(kept, original, "{k} stays nil");
            } else {
                assert_eq!(
                    kept.metadata.get("encoding").map(Vec::as_slice),
                    Some(b"binary/encrypted".as_slice()),
                    "{k} is sealed"
                );
            }
        }
        // A nil result (not a memo value) is sealed.
        let nil_result = GetWorkflowExecutionHistoryResponse {
            history: Some(History {
                events: vec![event(
                    1,
                    Attributes::ActivityTaskCompletedEventAttributes(
                        history::ActivityTaskCompletedEventAttributes {
                            result: Some(Payloads {
                                payloads: vec![nils[1].clone()],
                            }),
                            ..Default::default()
                        },
                    ),
                )],
            }),
            ..Default::default()
        };
        let sealed_result = seal_message(
            index(),
            PAGE,
            &nil_result.encode_to_vec(),
            &key,
            FailureMode::Keep,
            WalkLimits::default(),
        )
        .unwrap();
        assert!(sealed_result.is_some(), "a JSON null result is sealed");

        // Strict opening: the nil memo values of a WorkflowPropertiesModified event pass, a
        // JSON null result does not.
        let strict = OpenOptions {
            strict: true,
            ..STRICT
        };
        let modified = GetWorkflowExecutionHistoryResponse {
            history: Some(History {
                events: vec![event(
                    1,
                    Attributes::WorkflowPropertiesModifiedEventAttributes(
                        history::WorkflowPropertiesModifiedEventAttributes {
                            upserted_memo: Some(Memo {
                                fields: nils
                                    .iter()
                                    .enumerate()
                                    .map(|(i, p)| (format!("k{i}"), p.clone()))
                                    .collect(),
                            }),
                            ..Default::default()
                        },
                    ),
                )],
            }),
            ..Default::default()
        };
        assert!(plan_open(index(), PAGE, &modified.encode_to_vec(), strict).is_ok());
        assert!(plan_open(index(), PAGE, &nil_result.encode_to_vec(), strict).is_err());
    }

    /// The server's record of a system Nexus operation's result carries no user data: an
    /// encrypted-only namespace accepts it there, and nothing else of the kind.
    #[test]
    fn strict_opening_accepts_system_nexus_results() {
        let record = |message_type: &str| Payload {
            metadata: [
                ("encoding".to_string(), b"binary/protobuf".to_vec()),
                ("messageType".to_string(), message_type.as_bytes().to_vec()),
            ]
            .into(),
            data: b"\x0a\x03run".to_vec(),
            ..Default::default()
        };
        let completed = |result: Payload| {
            GetWorkflowExecutionHistoryResponse {
                history: Some(History {
                    events: vec![event(
                        1,
                        Attributes::NexusOperationCompletedEventAttributes(
                            history::NexusOperationCompletedEventAttributes {
                                result: Some(result),
                                ..Default::default()
                            },
                        ),
                    )],
                }),
                ..Default::default()
            }
            .encode_to_vec()
        };
        let strict = OpenOptions {
            strict: true,
            ..STRICT
        };
        let response = "temporal.api.workflowservice.v1.SignalWithStartWorkflowExecutionResponse";
        assert!(plan_open(index(), PAGE, &completed(record(response)), strict).is_ok());
        assert!(plan_open(index(), PAGE, &completed(record("my.app.Result")), strict).is_err());
    }

    /// A query handler's error message is sealed into its string form (under
    /// encode_failure_attributes only), and opens back from wherever the server copies it.
    #[tokio::test]
    async fn query_error_messages_are_sealed_as_text() {
        use temporalio_protos::temporal::api::query::v1::WorkflowQueryResult;
        use temporalio_protos::temporal::api::workflowservice::v1::{
            RespondQueryTaskCompletedRequest, RespondWorkflowTaskCompletedRequest,
        };
        const QUERY: &str = "temporal.api.workflowservice.v1.RespondQueryTaskCompletedRequest";
        let manager = manager();
        let keys = ScopedKeys::new("ns", manager.sealing_key("ns").await.unwrap());
        let marker = format!("{SECRET} ünïcode query failed");
        let request = RespondQueryTaskCompletedRequest {
            namespace: "ns".into(),
            error_message: marker.clone(),
            ..Default::default()
        }
        .encode_to_vec();
        let sealed = seal_message(
            index(),
            QUERY,
            &request,
            &keys,
            FailureMode::Encode,
            WalkLimits::default(),
        )
        .unwrap()
        .unwrap();
        assert!(!contains(&sealed, SECRET));
        let text = RespondQueryTaskCompletedRequest::decode(sealed.as_slice())
            .unwrap()
            .error_message;
        assert!(text.starts_with(SEALED_TEXT_PREFIX), "{text}");

        // The server wraps it in its own words; the sealed part opens in place.
        let error = format!("query failed: {text}. (and {text})");
        let found = find_sealed_texts(&error);
        assert_eq!(found.len(), 2);
        let refs: Vec<EnvelopeRef> = found.iter().map(|t| sealed_text_ref(t).unwrap()).collect();
        let opening = manager.opening_keys("ns", refs.clone()).await.unwrap();
        assert_eq!(
            open_texts(&error, &found, &opening).unwrap(),
            format!("query failed: {marker}. (and {marker})")
        );
        // Bound to its namespace like any payload: its key does not even unwrap elsewhere.
        assert!(manager.opening_keys("other", refs).await.is_err());
        // A prefix without a sealed payload behind it is just text, also when cut short.
        assert!(find_sealed_texts(&format!("{SEALED_TEXT_PREFIX}!")).is_empty());
        assert!(find_sealed_texts(&text[..text.len() - 10]).is_empty());

        // In a workflow task completion's query results too.
        let completed = RespondWorkflowTaskCompletedRequest {
            namespace: "ns".into(),
            query_results: [(
                "q1".to_string(),
                WorkflowQueryResult {
                    result_type: 2,
                    error_message: marker.clone(),
                    ..Default::default()
                },
            )]
            .into(),
            ..Default::default()
        }
        .encode_to_vec();
        let sealed = seal_message(
            index(),
            COMPLETED,
            &completed,
            &keys,
            FailureMode::Encode,
            WalkLimits::default(),
        )
        .unwrap()
        .unwrap();
        assert!(!contains(&sealed, SECRET));
        assert!(contains(&sealed, SEALED_TEXT_PREFIX));

        // A text too long for the server's limit is cut so that its sealed form still fits
        // (and opens); one that fits is kept whole, exactly.
        let key = manager.sealing_key("ns").await.unwrap();
        for len in [0, 1, 100, 2000, 2700, 2900, 3000, 10_000] {
            let text = "é".repeat(len / 2) + &"x".repeat(len % 2);
            let sealed = seal_text(&key, &text).unwrap();
            assert!(sealed.len() <= MAX_SEALED_TEXT, "{len}: {}", sealed.len());
            let fits = sealed_text_len(&key, text_metadata().len(), text.len()) <= MAX_SEALED_TEXT;
            if fits {
                assert_eq!(
                    sealed.len(),
                    sealed_text_len(&key, text_metadata().len(), text.len())
                );
            }
            let found = find_sealed_texts(&sealed);
            let refs: Vec<EnvelopeRef> =
                found.iter().map(|t| sealed_text_ref(t).unwrap()).collect();
            let opening = manager.opening_keys("ns", refs).await.unwrap();
            let opened = open_texts(&sealed, &found, &opening).unwrap();
            if fits {
                assert_eq!(opened, text, "{len}");
            } else {
                assert!(
                    text.starts_with(&opened) && opened.len() > 2500,
                    "{len}: cut to {}",
                    opened.len()
                );
            }
        }

        // encode_failure_attributes off: left as it is.
        assert!(seal_message(
            index(),
            QUERY,
            &request,
            &keys,
            FailureMode::Keep,
            WalkLimits::default()
        )
        .unwrap()
        .is_none());
    }

    /// A legacy Nexus failure with content cannot be sealed: the request is refused. An
    /// empty one (only the error type) passes.
    #[tokio::test]
    #[allow(deprecated)]
    async fn legacy_nexus_failures_are_refused() {
        use temporalio_protos::temporal::api::nexus::v1::{Failure as NexusFailure, HandlerError};
        use temporalio_protos::temporal::api::workflowservice::v1::RespondNexusTaskFailedRequest;
        const FAILED: &str = "temporal.api.workflowservice.v1.RespondNexusTaskFailedRequest";
        let manager = manager();
        let keys = ScopedKeys::new("ns", manager.sealing_key("ns").await.unwrap());
        let request = |failure: Option<NexusFailure>| {
            RespondNexusTaskFailedRequest {
                namespace: "ns".into(),
                error: Some(HandlerError {
                    error_type: "INTERNAL".into(),
                    failure,
                    ..Default::default()
                }),
                ..Default::default()
            }
            .encode_to_vec()
        };
        let err = seal_message(
            index(),
            FAILED,
            &request(Some(NexusFailure {
                message: SECRET.into(),
                ..Default::default()
            })),
            &keys,
            FailureMode::Encode,
            WalkLimits::default(),
        )
        .unwrap_err();
        assert!(matches!(err, WalkError::Unsupported { .. }), "{err}");
        assert!(err.to_string().contains("error.failure"), "{err}");
        assert!(!err.to_string().contains(SECRET));
        for empty in [None, Some(NexusFailure::default())] {
            assert!(seal_message(
                index(),
                FAILED,
                &request(empty),
                &keys,
                FailureMode::Encode,
                WalkLimits::default()
            )
            .is_ok());
        }
    }
}
