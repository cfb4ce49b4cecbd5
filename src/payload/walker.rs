//! A wire-level walker that finds every `temporal.api.common.v1.Payload` in a message and lets a
//! [`PayloadVisitor`] replace it, guided by a [`PayloadIndex`] computed from the descriptors.
//!
//! The walker never decodes a message into typed structs. It reads the wire bytes, descends only
//! into fields that can reach a Payload, and records *edits* (byte ranges of the input to
//! replace). When the walk is over, the output is the input with the edits applied: every other
//! byte (unknown fields, field order, non-minimal encodings of untouched fields) is copied
//! verbatim, exactly once. The length prefix of every ancestor of a changed payload is rewritten.
//! When no visitor call changes anything, nothing is allocated and the caller gets `None`, so it
//! can forward the original bytes.
//!
//! Special places (each chosen from the schema; see the tests for the reviewed lists):
//! - `google.protobuf.Any` (`protocol.v1.Message.body`, `google.rpc.Status.details`,
//!   `MultiOperationExecutionFailure.OperationStatus.details`): `value` is walked as the message
//!   named by `type_url` (`type.googleapis.com/NAME`) when that message is in the pool and can
//!   reach a payload; unknown types are left as they are.
//! - `temporal.api.common.v1.DataBlob`: the only DataBlob field in the schema is
//!   `GetWorkflowExecutionHistoryResponse.raw_history`, whose `data` is a serialized `History`
//!   when `encoding_type` is `ENCODING_TYPE_PROTO3`; it is walked as such. A raw-history blob in
//!   another encoding, or a DataBlob with data anywhere else, is refused
//!   ([`WalkError::Unsupported`]) rather than passed on unexamined.
//! - The system Nexus endpoint `__temporal_system`: the server itself runs the operation, so it
//!   must read the `input` Payload, an envelope (`binary/protobuf`, marked
//!   `__temporal_system_payload`) holding the operation's request. Where a message that starts a
//!   Nexus operation names that endpoint, the walker leaves the envelope as it is and walks its
//!   `data` as the request of the operation (see [`crate::payload::system_nexus`]), so only the
//!   payloads inside are visited. In requests ([`Direction::Request`]) an operation or an input
//!   it does not know is refused ([`WalkError::Unsupported`]); in responses such an input is an
//!   ordinary payload.
//! - Fixed scopes ([`FIXED_SCOPE_FIELDS`]): a Nexus endpoint's description belongs to the
//!   cluster scope [`NEXUS_ENDPOINT_SCOPE`], reported as its namespace.
//! - Memo values are flagged ([`PayloadContext::is_memo_value`]): the server deletes a memo key
//!   given a nil value.
//! - Failures: see [`FailureMode`].
//!
//! - Legacy Nexus failures (`temporal.api.nexus.v1.Failure`, in the deprecated `HandlerError` /
//!   `UnsuccessfulOperationError`): message, stack trace, metadata and JSON `details` (which
//!   SDKs fill with a serialized Failure, payloads and all) are plain fields the server reads.
//!   One with any content is refused ([`WalkError::Unsupported`]); see `REFUSED_MESSAGES`.
//! - Text fields that carry user data (`USER_TEXT_FIELDS`: a query handler's error message)
//!   go to [`PayloadVisitor::text`].

mod failure;
mod index;

use std::fmt;

use prost_reflect::MessageDescriptor;

use super::wire::{self, put_varint, varint_len, Field, WireError, WireType};
pub use failure::{ENCODED_FAILURE_MESSAGE, FAILURE_MARKER_KEY, FAILURE_MARKER_VALUE};
pub use index::{
    BlobRule, Exclusion, PayloadField, PayloadIndex, FIXED_SCOPE_FIELDS, NEXUS_ENDPOINT_SCOPE,
    REFUSED_MESSAGES, RESERVED_SCOPE_PREFIX, USER_TEXT_FIELDS,
};
use index::{FieldTarget, MessageId, MessageKind, MessagePlan};

/// Default limit on message nesting (each message-typed field descended into is one level).
pub const DEFAULT_MAX_DEPTH: usize = 100;

/// Default limit on the payloads one message may hold. Generous for real traffic (a history
/// page or a workflow task holds hundreds to a few thousand), small enough that the walk's
/// bookkeeping (one edit per payload) stays a few MB.
pub const DEFAULT_MAX_PAYLOADS: usize = 100_000;

pub use super::system_nexus::SYSTEM_NEXUS_ENDPOINT;
use super::system_nexus::{self as system, SystemNexusError, SYSTEM_OPERATIONS};

/// What to do with `temporal.api.failure.v1.Failure` `message` and `stack_trace`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailureMode {
    /// Leave them as they are (only the Failure's payloads are visited).
    #[default]
    Keep,
    /// For requests: a Failure without `encoded_attributes` whose message or stack trace is
    /// non-empty gets `encoded_attributes` = Payload{metadata {encoding: json/plain,
    /// portcullis-failure: 1}, data: {"message":…,"stack_trace":…}}, message "Encoded failure"
    /// and no stack trace (Temporal's own convention). The new Payload goes to the visitor like
    /// any other, flagged by [`PayloadContext::is_encoded_failure_attributes`].
    Encode,
    /// For responses: after the visitor replaced (opened) `encoded_attributes`, a result that
    /// carries the portcullis marker is moved back into message and stack trace and removed.
    /// Encoded attributes without the marker (the client's own), or that the visitor left
    /// unchanged (never sealed by a proxy), stay exactly as they are.
    Decode,
}

/// Which way a message travels: what the walker refuses depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Direction {
    /// To the upstream: what cannot be sealed safely is refused.
    Request,
    /// From the upstream: what the walker does not recognise is an ordinary payload.
    #[default]
    Response,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkOptions {
    pub failures: FailureMode,
    pub max_depth: usize,
    pub limits: WalkLimits,
    pub direction: Direction,
}

/// Bounds on what one walk may build, checked while walking, so a small hostile message
/// (a million empty payloads, each sealed into an envelope) is refused before the walk's
/// bookkeeping or the output buffer grows with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkLimits {
    /// Payloads found in the message ([`WalkError::TooManyPayloads`] beyond it).
    pub max_payloads: usize,
    /// Size of the rewritten message ([`WalkError::OutputTooLarge`] beyond it).
    pub max_output: usize,
}

impl Default for WalkLimits {
    fn default() -> Self {
        WalkLimits {
            max_payloads: DEFAULT_MAX_PAYLOADS,
            max_output: usize::MAX,
        }
    }
}

impl Default for WalkOptions {
    fn default() -> Self {
        WalkOptions {
            failures: FailureMode::Keep,
            max_depth: DEFAULT_MAX_DEPTH,
            limits: WalkLimits::default(),
            direction: Direction::Response,
        }
    }
}

impl WalkOptions {
    pub fn with_failures(failures: FailureMode) -> Self {
        WalkOptions {
            failures,
            ..WalkOptions::default()
        }
    }

    pub fn limited(mut self, limits: WalkLimits) -> Self {
        self.limits = limits;
        self
    }

    /// For a request on its way upstream.
    pub fn request(mut self) -> Self {
        self.direction = Direction::Request;
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    #[error("malformed protobuf at {path}: {source}")]
    Malformed {
        path: String,
        #[source]
        source: WireError,
    },
    #[error("messages nested deeper than {limit} levels at {path}")]
    TooDeep { path: String, limit: usize },
    #[error("cannot rewrite payloads at {path}: {reason}")]
    Unsupported { path: String, reason: String },
    #[error("message type {0} is not in the payload index")]
    UnknownMessage(String),
    #[error("portcullis failure attributes at {path} are malformed: {reason}")]
    FailureAttributes { path: String, reason: String },
    #[error("more than {limit} payloads in one message")]
    TooManyPayloads { limit: usize },
    #[error("the rewritten message would exceed {limit} bytes (at least {size} bytes)")]
    OutputTooLarge { size: usize, limit: usize },
    #[error("payload visitor failed: {0}")]
    Visitor(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("walker invariant violated: {0}")]
    Internal(&'static str),
}

impl WalkError {
    /// Wraps an error raised by a visitor (e.g. a sealing failure).
    pub fn visitor(error: impl std::error::Error + Send + Sync + 'static) -> WalkError {
        WalkError::Visitor(Box::new(error))
    }
}

/// What a visitor does with a payload found in the input (see [`PayloadVisitor::visit`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Visit {
    /// Leave it as it is.
    Keep,
    /// Replace it with these bytes (a serialized Payload).
    Replace(Vec<u8>),
    /// Replace it with exactly this many bytes, which [`PayloadVisitor::write`] appends to the
    /// output once the walk is over.
    Deferred(usize),
}

/// Receives every Payload found by the walker.
pub trait PayloadVisitor {
    /// `payload` is the serialized `temporal.api.common.v1.Payload`. Return the serialized
    /// replacement, or `None` to leave it unchanged.
    fn payload(
        &mut self,
        ctx: &PayloadContext<'_>,
        payload: &[u8],
    ) -> Result<Option<Vec<u8>>, WalkError>;

    /// Like [`PayloadVisitor::payload`], for a payload that is part of the input. A visitor
    /// that knows the size of its replacement up front may answer [`Visit::Deferred`]: the
    /// walker then sizes the output exactly and calls [`PayloadVisitor::write`] to produce the
    /// replacement straight into it, with no buffer per payload and no second copy. Payloads
    /// the walker builds itself, and those whose replacement it must read (failure attributes
    /// in [`FailureMode::Decode`]), always go through [`PayloadVisitor::payload`].
    fn visit(&mut self, ctx: &PayloadContext<'_>, payload: &[u8]) -> Result<Visit, WalkError> {
        Ok(match self.payload(ctx, payload)? {
            Some(bytes) => Visit::Replace(bytes),
            None => Visit::Keep,
        })
    }

    /// A string field that carries user data in plain text ([`index::USER_TEXT_FIELDS`]: a
    /// query handler's error message). Return its replacement, or `None` to leave it.
    fn text(&mut self, ctx: &PayloadContext<'_>, text: &str) -> Result<Option<String>, WalkError> {
        let _ = (ctx, text);
        Ok(None)
    }

    /// Appends the replacement of `payload` announced by [`Visit::Deferred`]: exactly the
    /// announced number of bytes (the walker checks, and fails otherwise). Called once per
    /// deferred payload, in input order, after the walk.
    fn write(&mut self, payload: &[u8], out: &mut Vec<u8>) -> Result<(), WalkError> {
        let _ = (payload, out);
        Err(WalkError::Internal(
            "the visitor deferred a payload but cannot write it",
        ))
    }
}

impl<F> PayloadVisitor for F
where
    F: FnMut(&PayloadContext<'_>, &[u8]) -> Result<Option<Vec<u8>>, WalkError>,
{
    fn payload(
        &mut self,
        ctx: &PayloadContext<'_>,
        payload: &[u8],
    ) -> Result<Option<Vec<u8>>, WalkError> {
        self(ctx, payload)
    }
}

#[derive(Debug, Clone, Copy)]
enum Segment<'a> {
    Field(&'a str),
    /// The `value` of an Any, with the type it was resolved to.
    AnyValue(&'a str),
    /// The `data` of a raw-history DataBlob.
    BlobData,
    /// The `data` of a system Nexus envelope, with the request type it was walked as.
    EnvelopeData(&'a str),
}

/// One step of the path from the root message to the current position, kept on the stack
/// (a linked list through the walker's frames), so paths cost no allocation.
#[derive(Debug, Clone, Copy)]
struct PathNode<'a> {
    parent: Option<&'a PathNode<'a>>,
    segment: Segment<'a>,
    /// This is the `encoded_attributes` field of a `temporal.api.failure.v1.Failure`.
    failure_attributes: bool,
    /// The namespace the payloads below belong to, when a message on the path names one
    /// (see [`PayloadContext::namespace`]); inherited from the parent otherwise.
    namespace: Option<&'a str>,
    /// This is the value of a memo entry.
    memo_value: bool,
}

impl<'a> PathNode<'a> {
    fn field(parent: Option<&'a PathNode<'a>>, name: &'a str) -> Self {
        PathNode::child(parent, Segment::Field(name))
    }

    fn child(parent: Option<&'a PathNode<'a>>, segment: Segment<'a>) -> Self {
        PathNode {
            parent,
            segment,
            failure_attributes: false,
            namespace: parent.and_then(|p| p.namespace),
            memo_value: false,
        }
    }
}

struct Path<'a> {
    root: &'a str,
    node: Option<&'a PathNode<'a>>,
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn write_node(f: &mut fmt::Formatter<'_>, node: &PathNode<'_>) -> fmt::Result {
            if let Some(parent) = node.parent {
                write_node(f, parent)?;
            }
            match node.segment {
                Segment::Field(name) => write!(f, ".{name}"),
                Segment::AnyValue(name) => write!(f, "<{name}>"),
                Segment::BlobData => write!(f, ".data<History>"),
                Segment::EnvelopeData(name) => write!(f, ".data<{name}>"),
            }
        }
        f.write_str(self.root)?;
        match self.node {
            Some(node) => write_node(f, node),
            None => Ok(()),
        }
    }
}

/// Where a payload was found.
pub struct PayloadContext<'a> {
    path: Path<'a>,
    encoded_failure_attributes: bool,
}

impl PayloadContext<'_> {
    /// Full name of the message the walk started from.
    pub fn root_message(&self) -> &str {
        self.path.root
    }

    /// The name of the field holding the payload (`None` when the root itself is a Payload).
    pub fn field_name(&self) -> Option<&str> {
        let mut node = self.path.node;
        while let Some(n) = node {
            if let Segment::Field(name) = n.segment {
                return Some(name);
            }
            node = n.parent;
        }
        None
    }

    /// True for the Payload that [`FailureMode::Encode`] just built from a Failure's message
    /// and stack trace (plaintext that must be sealed).
    pub fn is_encoded_failure_attributes(&self) -> bool {
        self.encoded_failure_attributes
    }

    /// The namespace the payload belongs to when it is not the call's own: the `namespace` of
    /// the nearest message on its path that names one (a command starting a child workflow in
    /// or signalling another namespace, the history events of such commands, a nested
    /// request), when not empty. `None`: the call's namespace. The root message's own
    /// `namespace` is never reported (it is the call's).
    pub fn namespace(&self) -> Option<&str> {
        self.path.node.and_then(|n| n.namespace)
    }

    /// True when the payload is the value of a memo entry (`temporal.api.common.v1.Memo.fields`),
    /// where the server gives a nil value a meaning: it deletes the key (and drops it from a
    /// new workflow's memo).
    pub fn is_memo_value(&self) -> bool {
        self.path.node.is_some_and(|n| n.memo_value)
    }

    /// True when the payload is the `encoded_attributes` of a `temporal.api.failure.v1.Failure`
    /// (the payload [`FailureMode::Encode`] and [`FailureMode::Decode`] act on).
    pub fn is_failure_attributes(&self) -> bool {
        self.path.node.is_some_and(|n| n.failure_attributes)
    }
}

impl fmt::Display for PayloadContext<'_> {
    /// `temporal.api.workflowservice.v1.StartWorkflowExecutionRequest.input.payloads`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.path.fmt(f)
    }
}

impl fmt::Debug for PayloadContext<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PayloadContext({})", self.path)
    }
}

/// Rewrites every Payload of `input` (a serialized `message`) through `visitor`.
/// Returns `None` when nothing changed.
pub fn rewrite(
    index: &PayloadIndex,
    message: &MessageDescriptor,
    input: &[u8],
    visitor: &mut dyn PayloadVisitor,
) -> Result<Option<Vec<u8>>, WalkError> {
    rewrite_with(index, message, input, visitor, &WalkOptions::default())
}

/// [`rewrite`] with options (failure attributes, depth limit).
pub fn rewrite_with(
    index: &PayloadIndex,
    message: &MessageDescriptor,
    input: &[u8],
    visitor: &mut dyn PayloadVisitor,
    options: &WalkOptions,
) -> Result<Option<Vec<u8>>, WalkError> {
    rewrite_named(index, message.full_name(), input, visitor, options)
}

/// [`rewrite_with`] for a message named by its full name.
pub fn rewrite_named(
    index: &PayloadIndex,
    full_name: &str,
    input: &[u8],
    visitor: &mut dyn PayloadVisitor,
    options: &WalkOptions,
) -> Result<Option<Vec<u8>>, WalkError> {
    match plan_named(index, full_name, input, visitor, options)? {
        Some(plan) => plan.apply(input, visitor).map(Some),
        None => Ok(None),
    }
}

/// The first half of [`rewrite_named`]: walks `input` and returns what would change, without
/// writing anything. [`RewritePlan::apply`] writes the output later, possibly with another
/// visitor (e.g. one that holds the keys the first walk found were needed). `None`: nothing
/// changes.
pub fn plan_named(
    index: &PayloadIndex,
    full_name: &str,
    input: &[u8],
    visitor: &mut dyn PayloadVisitor,
    options: &WalkOptions,
) -> Result<Option<RewritePlan>, WalkError> {
    let id = index
        .id(full_name)
        .ok_or_else(|| WalkError::UnknownMessage(full_name.to_string()))?;
    let plan = index
        .plan(id)
        .ok_or_else(|| WalkError::UnknownMessage(full_name.to_string()))?;
    if !plan.reaches {
        return Ok(None);
    }
    let mut walk = Walk {
        index,
        visitor,
        options: *options,
        root: &plan.name,
        edits: Vec::new(),
        input_len: input.len(),
        payloads: 0,
        payload_growth: 0,
    };
    let delta = walk.walk_message(id, 0, input, 0, None)?;
    if walk.edits.is_empty() {
        return Ok(None);
    }
    let output_len = input
        .len()
        .checked_add_signed(delta)
        .ok_or_else(|| WalkError::Internal("negative output length"))?;
    if output_len > options.limits.max_output {
        return Err(WalkError::OutputTooLarge {
            size: output_len,
            limit: options.limits.max_output,
        });
    }
    Ok(Some(RewritePlan {
        edits: walk.edits,
        input_len: input.len(),
        output_len,
    }))
}

/// The edits one walk computed for its input (see [`plan_named`]).
#[derive(Debug)]
pub struct RewritePlan {
    edits: Vec<Edit>,
    input_len: usize,
    output_len: usize,
}

impl RewritePlan {
    /// A plan from edits computed elsewhere in the crate (sorted, non-overlapping), for an
    /// input of `input_len` bytes that the edits grow by `delta`.
    pub(crate) fn from_edits(
        edits: Vec<Edit>,
        input_len: usize,
        delta: isize,
    ) -> Result<RewritePlan, WalkError> {
        let output_len = input_len
            .checked_add_signed(delta)
            .ok_or_else(|| WalkError::Internal("negative output length"))?;
        Ok(RewritePlan {
            edits,
            input_len,
            output_len,
        })
    }

    /// The size of the output, exactly.
    pub fn output_len(&self) -> usize {
        self.output_len
    }

    /// How many payloads `writer` will be asked to write.
    pub fn deferred(&self) -> usize {
        self.edits
            .iter()
            .filter(|e| matches!(e.with, Replacement::Deferred(_)))
            .count()
    }

    /// Writes the output: `input` (the very bytes the plan was computed from) with the edits
    /// applied. Deferred payloads are written by `writer`, straight into the output buffer,
    /// which is allocated once at its final size.
    pub fn apply(
        &self,
        input: &[u8],
        writer: &mut dyn PayloadVisitor,
    ) -> Result<Vec<u8>, WalkError> {
        if input.len() != self.input_len {
            return Err(WalkError::Internal(
                "a rewrite plan applied to another input",
            ));
        }
        let mut out = Vec::with_capacity(self.output_len);
        let mut cursor = 0;
        for edit in &self.edits {
            let kept = input
                .get(cursor..edit.start)
                .ok_or_else(|| WalkError::Internal("edits out of order"))?;
            out.extend_from_slice(kept);
            match &edit.with {
                Replacement::Bytes(bytes) => out.extend_from_slice(bytes),
                Replacement::Varint(value) => put_varint(&mut out, *value),
                Replacement::Deferred(len) => {
                    let payload = input
                        .get(edit.start..edit.end)
                        .ok_or_else(|| WalkError::Internal("deferred payload out of range"))?;
                    let before = out.len();
                    writer.write(payload, &mut out)?;
                    if out.len().checked_sub(before) != Some(*len) {
                        return Err(WalkError::Internal(
                            "a deferred payload was written at another length than announced",
                        ));
                    }
                }
            }
            cursor = edit.end;
        }
        let rest = input
            .get(cursor..)
            .ok_or_else(|| WalkError::Internal("edit past the end"))?;
        out.extend_from_slice(rest);
        if out.len() != self.output_len {
            return Err(WalkError::Internal("output length differs from the plan"));
        }
        Ok(out)
    }
}

/// Calls `f` for every Payload of `input` without changing anything (a "collect" pass, e.g.
/// to gather the key references of sealed payloads before opening them). Allocates nothing.
pub fn visit_payloads(
    index: &PayloadIndex,
    message: &MessageDescriptor,
    input: &[u8],
    mut f: impl FnMut(&PayloadContext<'_>, &[u8]) -> Result<(), WalkError>,
) -> Result<(), WalkError> {
    let mut visitor = |ctx: &PayloadContext<'_>, payload: &[u8]| {
        f(ctx, payload)?;
        Ok(None)
    };
    rewrite_with(index, message, input, &mut visitor, &WalkOptions::default()).map(|_| ())
}

/// The message inside `grpc-status-details-bin`.
pub const GRPC_STATUS: &str = "google.rpc.Status";

/// Rewrites the payloads inside the `grpc-status-details-bin` trailer: `bytes` is the
/// serialized `google.rpc.Status` (already base64-decoded), whose `details` are Anys such as
/// `temporal.api.errordetails.v1.QueryFailedFailure` or `MultiOperationExecutionFailure`.
pub fn rewrite_status_details(
    index: &PayloadIndex,
    grpc_status_details_bin: &[u8],
    visitor: &mut dyn PayloadVisitor,
) -> Result<Option<Vec<u8>>, WalkError> {
    rewrite_status_details_with(
        index,
        grpc_status_details_bin,
        visitor,
        &WalkOptions::default(),
    )
}

/// [`rewrite_status_details`] with options (use [`FailureMode::Decode`] for responses).
pub fn rewrite_status_details_with(
    index: &PayloadIndex,
    grpc_status_details_bin: &[u8],
    visitor: &mut dyn PayloadVisitor,
    options: &WalkOptions,
) -> Result<Option<Vec<u8>>, WalkError> {
    rewrite_named(
        index,
        GRPC_STATUS,
        grpc_status_details_bin,
        visitor,
        options,
    )
}

/// What to put in place of a byte range of the input.
#[derive(Debug)]
pub(crate) enum Replacement {
    Bytes(Vec<u8>),
    /// A length prefix.
    Varint(u64),
    /// A payload the visitor writes when the plan is applied, this many bytes long.
    Deferred(usize),
}

/// Replace `input[start..end]` (an empty range inserts). Edits are kept sorted by position and
/// never overlap.
#[derive(Debug)]
pub(crate) struct Edit {
    pub(crate) start: usize,
    pub(crate) end: usize,
    pub(crate) with: Replacement,
}

/// A field a Failure walk treats specially (see `failure.rs`).
#[derive(Debug)]
pub(crate) struct Override {
    number: u32,
    action: OverrideAction,
}

#[derive(Debug)]
pub(crate) enum OverrideAction {
    /// Remove every occurrence; insert this value (the content of a length-delimited field)
    /// before the first field numbered higher, or at the end.
    Set(Option<Vec<u8>>),
    /// The single occurrence was already visited: replace its content with this, if any.
    Visited(Option<Vec<u8>>),
}

struct Walk<'a> {
    index: &'a PayloadIndex,
    visitor: &'a mut dyn PayloadVisitor,
    options: WalkOptions,
    root: &'a str,
    edits: Vec<Edit>,
    input_len: usize,
    /// Payloads found so far.
    payloads: usize,
    /// How much the payloads replaced so far grew the message (length prefixes aside: the
    /// exact size is checked once the walk is over).
    payload_growth: isize,
}

pub(crate) fn delta_of(new: usize, old: usize) -> isize {
    // Both are lengths of live buffers, so they fit in isize.
    new as isize - old as isize
}

/// Offset of a length-delimited field's content within the buffer it was read from.
/// Where a field's value starts, relative to the buffer it was read from.
pub(crate) fn value_offset(field: &Field<'_>) -> usize {
    field.offset + field.raw.len() - field.value.len()
}

/// Edits that replace the value of a length-delimited `field` (read from `input[base..]`) with
/// `new`, its length prefix included. Returns the field's growth.
pub(crate) fn replace_len_value(
    edits: &mut Vec<Edit>,
    base: usize,
    field: &Field<'_>,
    new: Vec<u8>,
) -> isize {
    let value_at = base + value_offset(field);
    let len_at = base + field.offset + field.tag_len;
    let delta = delta_of(new.len(), field.value.len())
        + delta_of(varint_len(new.len() as u64), value_at - len_at);
    edits.push(Edit {
        start: len_at,
        end: value_at,
        with: Replacement::Varint(new.len() as u64),
    });
    edits.push(Edit {
        start: value_at,
        end: value_at + field.value.len(),
        with: Replacement::Bytes(new),
    });
    delta
}

/// After the content of a length-delimited `field` (read from `input[base..]`) was walked,
/// its edits pushed from `mark` on and growing it by `delta`: the edit of its length prefix,
/// inserted before them (edits stay in order). Returns the field's growth, prefix included;
/// `None` if the new length would be negative (a walker's internal error).
pub(crate) fn resize_len_prefix(
    edits: &mut Vec<Edit>,
    mark: usize,
    base: usize,
    field: &Field<'_>,
    delta: isize,
) -> Option<isize> {
    if delta == 0 {
        return Some(0);
    }
    let new_len = field.value.len().checked_add_signed(delta)?;
    let value_at = base + value_offset(field);
    let len_at = base + field.offset + field.tag_len;
    edits.insert(
        mark,
        Edit {
            start: len_at,
            end: value_at,
            with: Replacement::Varint(new_len as u64),
        },
    );
    Some(delta + delta_of(varint_len(new_len as u64), value_at - len_at))
}

impl<'a> Walk<'a> {
    fn path(&self, node: Option<&PathNode<'_>>) -> String {
        Path {
            root: self.root,
            node,
        }
        .to_string()
    }

    fn malformed(&self, node: Option<&PathNode<'_>>, source: WireError) -> WalkError {
        WalkError::Malformed {
            path: self.path(node),
            source,
        }
    }

    fn unsupported(&self, node: Option<&PathNode<'_>>, reason: String) -> WalkError {
        WalkError::Unsupported {
            path: self.path(node),
            reason,
        }
    }

    fn context<'n>(
        &self,
        node: Option<&'n PathNode<'n>>,
        encoded_failure_attributes: bool,
    ) -> PayloadContext<'n>
    where
        'a: 'n,
    {
        PayloadContext {
            path: Path {
                root: self.root,
                node,
            },
            encoded_failure_attributes,
        }
    }

    fn count_payload(&mut self) -> Result<(), WalkError> {
        self.payloads += 1;
        if self.payloads > self.options.limits.max_payloads {
            return Err(WalkError::TooManyPayloads {
                limit: self.options.limits.max_payloads,
            });
        }
        Ok(())
    }

    /// Refuses, as soon as it shows, an output that would not fit the limit: before the edits
    /// of a million tiny payloads pile up.
    fn grow(&mut self, delta: isize) -> Result<(), WalkError> {
        self.payload_growth = self.payload_growth.saturating_add(delta);
        let size = self.input_len.saturating_add_signed(self.payload_growth);
        if size > self.options.limits.max_output {
            return Err(WalkError::OutputTooLarge {
                size,
                limit: self.options.limits.max_output,
            });
        }
        Ok(())
    }

    /// Hands a payload to the visitor and returns its replacement at once.
    fn visit(
        &mut self,
        node: Option<&PathNode<'_>>,
        payload: &[u8],
        encoded_failure_attributes: bool,
    ) -> Result<Option<Vec<u8>>, WalkError> {
        self.count_payload()?;
        let ctx = self.context(node, encoded_failure_attributes);
        self.visitor.payload(&ctx, payload)
    }

    /// Walks one value of message type `id` found at `input[base..base + buf.len()]`, and
    /// returns by how many bytes its encoding grew (negative: shrank).
    fn walk_message(
        &mut self,
        id: MessageId,
        base: usize,
        buf: &[u8],
        depth: usize,
        node: Option<&PathNode<'_>>,
    ) -> Result<isize, WalkError> {
        if depth > self.options.max_depth {
            return Err(WalkError::TooDeep {
                path: self.path(node),
                limit: self.options.max_depth,
            });
        }
        let index = self.index;
        let plan = index
            .plan(id)
            .ok_or_else(|| WalkError::Internal("message id out of range"))?;
        match plan.kind {
            MessageKind::Payload => {
                self.count_payload()?;
                let ctx = self.context(node, false);
                let (len, with) = match self.visitor.visit(&ctx, buf)? {
                    Visit::Keep => return Ok(0),
                    Visit::Replace(new) => (new.len(), Replacement::Bytes(new)),
                    Visit::Deferred(len) => (len, Replacement::Deferred(len)),
                };
                let delta = delta_of(len, buf.len());
                self.grow(delta)?;
                self.edits.push(Edit {
                    start: base,
                    end: base + buf.len(),
                    with,
                });
                Ok(delta)
            }
            MessageKind::Any => self.walk_any(base, buf, depth, node),
            MessageKind::DataBlob => self.walk_blob(BlobRule::Refuse, base, buf, depth, node),
            MessageKind::Refused(_) if buf.is_empty() => Ok(0),
            MessageKind::Refused(reason) => Err(self.unsupported(node, reason.to_string())),
            MessageKind::Failure if self.options.failures != FailureMode::Keep => {
                self.walk_failure(plan, base, buf, depth, node)
            }
            MessageKind::Failure | MessageKind::Plain => {
                self.walk_fields(plan, base, buf, depth, node, &mut [])
            }
        }
    }

    fn walk_target(
        &mut self,
        target: FieldTarget,
        base: usize,
        buf: &[u8],
        depth: usize,
        node: Option<&PathNode<'_>>,
    ) -> Result<isize, WalkError> {
        match target {
            FieldTarget::Message(id) => self.walk_message(id, base, buf, depth, node),
            // Text fields are handled where they are found (walk_fields).
            FieldTarget::Text => Ok(0),
            FieldTarget::SystemEnvelope(operation) => {
                if depth > self.options.max_depth {
                    return Err(WalkError::TooDeep {
                        path: self.path(node),
                        limit: self.options.max_depth,
                    });
                }
                self.walk_system_envelope(operation, base, buf, depth, node)
            }
            FieldTarget::Blob(rule) => {
                if depth > self.options.max_depth {
                    return Err(WalkError::TooDeep {
                        path: self.path(node),
                        limit: self.options.max_depth,
                    });
                }
                self.walk_blob(rule, base, buf, depth, node)
            }
        }
    }

    /// Walks the content of a length-delimited `field` (read from `input[base..]`) as `target`,
    /// and rewrites its length prefix if the content changed size. Returns the field's growth.
    fn descend(
        &mut self,
        target: FieldTarget,
        base: usize,
        field: &Field<'_>,
        depth: usize,
        node: &PathNode<'_>,
    ) -> Result<isize, WalkError> {
        let value_at = base + value_offset(field);
        let mark = self.edits.len();
        let delta = self.walk_target(target, value_at, field.value, depth + 1, Some(node))?;
        resize_len_prefix(&mut self.edits, mark, base, field, delta)
            .ok_or_else(|| WalkError::Internal("negative length"))
    }

    /// Replaces the content of a length-delimited `field` with `new`.
    fn replace_value(&mut self, base: usize, field: &Field<'_>, new: Vec<u8>) -> isize {
        replace_len_value(&mut self.edits, base, field, new)
    }

    /// Inserts a length-delimited field at `at`.
    fn insert_field(&mut self, at: usize, number: u32, value: &[u8]) -> isize {
        let mut bytes = Vec::with_capacity(value.len() + 10);
        wire::put_len_field(&mut bytes, number, value);
        let delta = delta_of(bytes.len(), 0);
        self.edits.push(Edit {
            start: at,
            end: at,
            with: Replacement::Bytes(bytes),
        });
        delta
    }

    fn walk_fields(
        &mut self,
        plan: &'a MessagePlan,
        base: usize,
        buf: &[u8],
        depth: usize,
        node: Option<&PathNode<'_>>,
        overrides: &mut [Override],
    ) -> Result<isize, WalkError> {
        let namespace = match plan.namespace_field {
            Some(number) if depth > 0 => wire::validate_and_find_string(buf, Some(number))
                .map_err(|e| self.malformed(node, e))?
                .filter(|ns| !ns.is_empty())
                .or(node.and_then(|n| n.namespace)),
            _ => node.and_then(|n| n.namespace),
        };
        let system_input = match plan.nexus {
            Some(fields) => self
                .system_operation(fields, buf, node)?
                .map(|operation| (fields.input, operation)),
            None => None,
        };
        let mut delta = 0isize;
        for field in wire::fields(buf) {
            let field = field.map_err(|e| self.malformed(node, e))?;
            if !overrides.is_empty() {
                delta += self.insert_pending(base + field.offset, field.number, overrides);
                if let Some(o) = overrides.iter_mut().find(|o| o.number == field.number) {
                    match &mut o.action {
                        OverrideAction::Set(_) => {
                            let start = base + field.offset;
                            self.edits.push(Edit {
                                start,
                                end: start + field.raw.len(),
                                with: Replacement::Bytes(Vec::new()),
                            });
                            delta -= delta_of(field.raw.len(), 0);
                        }
                        OverrideAction::Visited(new) => {
                            if let Some(new) = new.take() {
                                delta += self.replace_value(base, &field, new);
                            }
                        }
                    }
                    continue;
                }
            }
            let Some(fp) = plan.field(field.number) else {
                continue;
            };
            let mut child = PathNode::field(node, &fp.name);
            child.namespace = fp.scope.or(namespace);
            child.memo_value = fp.memo_value;
            child.failure_attributes = plan.kind == MessageKind::Failure
                && self
                    .index
                    .failure
                    .is_some_and(|f| f.encoded_attributes == field.number);
            if field.wire_type != WireType::Len {
                return Err(self.malformed(
                    Some(&child),
                    WireError::UnexpectedWireType {
                        field: field.number,
                    },
                ));
            }
            if fp.target == FieldTarget::Text {
                delta += self.visit_text(base, &field, &child)?;
                continue;
            }
            let target = match system_input {
                Some((input, operation)) if input == field.number => {
                    FieldTarget::SystemEnvelope(operation)
                }
                _ => fp.target,
            };
            delta += self.descend(target, base, &field, depth, &child)?;
        }
        if !overrides.is_empty() {
            delta += self.insert_pending(base + buf.len(), u32::MAX, overrides);
        }
        Ok(delta)
    }

    /// A text field: the visitor may replace it.
    fn visit_text(
        &mut self,
        base: usize,
        field: &Field<'_>,
        node: &PathNode<'_>,
    ) -> Result<isize, WalkError> {
        let text = std::str::from_utf8(field.value)
            .map_err(|_| self.malformed(Some(node), WireError::InvalidUtf8(field.number)))?;
        let ctx = self.context(Some(node), false);
        match self.visitor.text(&ctx, text)? {
            Some(new) if new != text => Ok(self.replace_value(base, field, new.into_bytes())),
            _ => Ok(0),
        }
    }

    /// Inserts at `at` the `Set` values of overrides numbered below `before`.
    fn insert_pending(&mut self, at: usize, before: u32, overrides: &mut [Override]) -> isize {
        let mut delta = 0;
        for o in overrides.iter_mut().filter(|o| o.number < before) {
            if let OverrideAction::Set(value) = &mut o.action {
                if let Some(value) = value.take() {
                    delta += self.insert_field(at, o.number, &value);
                }
            }
        }
        delta
    }

    /// `google.protobuf.Any`: `value` is walked as the message `type_url` names, when that
    /// message is in the pool and can reach a payload. Anything else is left as it is.
    fn walk_any(
        &mut self,
        base: usize,
        buf: &[u8],
        depth: usize,
        node: Option<&PathNode<'_>>,
    ) -> Result<isize, WalkError> {
        // The well-known type fixes the numbers: type_url = 1, value = 2.
        const TYPE_URL: u32 = 1;
        const VALUE: u32 = 2;
        let mut type_url = None;
        for field in wire::fields(buf) {
            let field = field.map_err(|e| self.malformed(node, e))?;
            if field.number == TYPE_URL || field.number == VALUE {
                if field.wire_type != WireType::Len {
                    return Err(self.malformed(
                        node,
                        WireError::UnexpectedWireType {
                            field: field.number,
                        },
                    ));
                }
                if field.number == TYPE_URL {
                    type_url = Some(field.value);
                }
            }
        }
        let Some(name) = wire::any_message_name(type_url) else {
            return Ok(0);
        };
        let index = self.index;
        let Some(id) = index.id(name) else {
            return Ok(0);
        };
        let Some(plan) = index.plan(id).filter(|p| p.reaches) else {
            return Ok(0);
        };
        let child = PathNode::child(node, Segment::AnyValue(&plan.name));
        let mut delta = 0;
        for field in wire::fields(buf) {
            let field = field.map_err(|e| self.malformed(node, e))?;
            if field.number == VALUE {
                delta += self.descend(FieldTarget::Message(id), base, &field, depth, &child)?;
            }
        }
        Ok(delta)
    }

    /// `temporal.api.common.v1.DataBlob`: see the module comment.
    fn walk_blob(
        &mut self,
        rule: BlobRule,
        base: usize,
        buf: &[u8],
        depth: usize,
        node: Option<&PathNode<'_>>,
    ) -> Result<isize, WalkError> {
        // DataBlob: encoding_type = 1 (enum), data = 2 (bytes).
        const ENCODING_TYPE: u32 = 1;
        const DATA: u32 = 2;
        let mut encoding = 0u64;
        let mut has_data = false;
        for field in wire::fields(buf) {
            let field = field.map_err(|e| self.malformed(node, e))?;
            let expected = match field.number {
                ENCODING_TYPE => WireType::Varint,
                DATA => WireType::Len,
                _ => continue,
            };
            if field.wire_type != expected {
                return Err(self.malformed(
                    node,
                    WireError::UnexpectedWireType {
                        field: field.number,
                    },
                ));
            }
            if field.number == ENCODING_TYPE {
                encoding =
                    wire::read_varint(field.value, &mut 0).map_err(|e| self.malformed(node, e))?;
            } else {
                has_data |= !field.value.is_empty();
            }
        }
        if !has_data {
            return Ok(0);
        }
        let index = self.index;
        let history = match (rule, index.history, index.proto3_encoding) {
            (BlobRule::History, Some(history), Some(proto3))
                if encoding as i64 == i64::from(proto3) =>
            {
                history
            }
            (BlobRule::History, _, _) => {
                return Err(self.unsupported(
                    node,
                    format!(
                        "raw history in encoding {} cannot be walked (only ENCODING_TYPE_PROTO3)",
                        encoding as i64
                    ),
                ))
            }
            (BlobRule::Refuse, _, _) => {
                return Err(self.unsupported(
                    node,
                    "a DataBlob outside raw_history has unknown contents".to_string(),
                ))
            }
        };
        let child = PathNode::child(node, Segment::BlobData);
        let mut delta = 0;
        for field in wire::fields(buf) {
            let field = field.map_err(|e| self.malformed(node, e))?;
            if field.number == DATA {
                delta +=
                    self.descend(FieldTarget::Message(history), base, &field, depth, &child)?;
            }
        }
        Ok(delta)
    }

    /// For a message that starts a Nexus operation: the position in `SYSTEM_OPERATIONS` of the
    /// system operation it asks for, `None` when it is not addressed to the system endpoint.
    /// An operation portcullis does not know is refused in requests; in responses its input is
    /// an ordinary payload.
    fn system_operation(
        &self,
        fields: system::NexusFields,
        buf: &[u8],
        node: Option<&PathNode<'_>>,
    ) -> Result<Option<usize>, WalkError> {
        match system::system_operation(fields, buf) {
            Ok(None) => Ok(None),
            Ok(Some(operation)) => Ok(SYSTEM_OPERATIONS.iter().position(|o| o == operation)),
            Err(SystemNexusError::Malformed(e)) => Err(self.malformed(node, e)),
            Err(e) if self.options.direction == Direction::Request => {
                Err(self.unsupported(node, e.to_string()))
            }
            Err(_) => Ok(None),
        }
    }

    /// The `input` of a system Nexus operation: the envelope stays as it is, its `data` is
    /// walked as the operation's request (see the module comment).
    fn walk_system_envelope(
        &mut self,
        operation: usize,
        base: usize,
        buf: &[u8],
        depth: usize,
        node: Option<&PathNode<'_>>,
    ) -> Result<isize, WalkError> {
        let index = self.index;
        let resolved = SYSTEM_OPERATIONS
            .get(operation)
            .zip(index.system_requests.get(operation).copied().flatten());
        let Some((operation, request)) = resolved else {
            return Err(WalkError::Internal(
                "a system operation the index did not resolve",
            ));
        };
        let data = match system::envelope_data(buf, operation) {
            Ok(data) => data,
            Err(SystemNexusError::Malformed(e)) => return Err(self.malformed(node, e)),
            Err(e) if self.options.direction == Direction::Request => {
                return Err(self.unsupported(node, e.to_string()))
            }
            Err(_) => {
                // A response: not an envelope after all, so an ordinary payload.
                let payload = index
                    .payload
                    .ok_or_else(|| WalkError::Internal("no Payload in the index"))?;
                return self.walk_message(payload, base, buf, depth, node);
            }
        };
        let child = PathNode::child(node, Segment::EnvelopeData(operation.request));
        let mut delta = 0;
        for field in data {
            delta += self.descend(FieldTarget::Message(request), base, &field, depth, &child)?;
        }
        Ok(delta)
    }
}
