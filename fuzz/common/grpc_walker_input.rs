// One fuzz input through the proxy's request path. Shared (via `include!`) by the cargo-fuzz
// target `fuzz/fuzz_targets/grpc_walker.rs` and the replay test `tests/fuzz_corpus.rs`, so both
// run exactly the same code. Nothing here may panic, whatever the bytes; errors are fine.
//
// Also run: the unknown-field check (`ensure_known`) over the request.
//
// Input layout:
//   byte 0: bit 0 selects the grpc-encoding (0 = identity, 1 = gzip)
//   byte 1: method selector, an index (mod count) into the forwarded methods sorted by path
//   rest:   the HTTP/2 request body (a 5-byte-framed message); when it does not decode as one
//           frame, the rest is walked as the raw message instead.
//
// Two differential checks, reported in the outcome (the fuzz target and the replay test assert
// them): sealing-like replacement through deferred writes produces exactly what the eager path
// produces; namespace translation ns1 → ns1.a1b2c and back gives the original bytes.

use bytes::Bytes;
use portcullis::grpc::frame::{decode_unary, Direction, Encoding};
use portcullis::payload::namespaces::{rewrite_namespaces, NamespaceFieldIndex};
use portcullis::payload::walker::{
    rewrite_named, rewrite_status_details_with, FailureMode, PayloadContext, PayloadIndex,
    PayloadVisitor, Visit, WalkError, WalkOptions,
};
use portcullis::payload::wire::validate_and_find_string;
use portcullis::schema::{MethodInfo, Schema};

/// Frame/decompression limit, as configured in the proxy by default.
pub const LIMIT: usize = 4 * 1024 * 1024;

/// What the encode visitor appends to every Payload: one more `metadata` map entry
/// (field 1, {key "fz": value 0x01}), a valid protobuf extension of any Payload.
pub const SUFFIX: &[u8] = &[0x0a, 0x07, 0x0a, 0x02, b'f', b'z', 0x12, 0x01, 0x01];

/// The forwarded methods in a stable order (the schema keeps them in a HashMap). Sorted once:
/// sorting per input was most of the fuzzer's time (every traced string comparison).
pub fn sorted_methods() -> &'static [&'static MethodInfo] {
    static SORTED: std::sync::OnceLock<Vec<&'static MethodInfo>> = std::sync::OnceLock::new();
    SORTED.get_or_init(|| {
        let mut methods: Vec<&'static MethodInfo> = Schema::global().methods().collect();
        methods.sort_by(|a, b| a.path.cmp(&b.path));
        methods
    })
}

#[derive(Debug)]
pub struct Outcome {
    pub method: &'static str,
    /// The body decoded as one gRPC frame (otherwise the raw bytes were walked).
    pub framed: bool,
    /// The message that was walked.
    pub message: Vec<u8>,
    pub namespace: Result<Option<String>, String>,
    /// Request pass (FailureMode::Encode, sealing-like visitor): the rewritten message, if any.
    pub encoded: Result<Option<Vec<u8>>, String>,
    /// Response pass over the request pass's output (FailureMode::Decode, unwrapping visitor).
    pub decoded: Result<Option<Vec<u8>>, String>,
    pub status_details: Result<Option<Vec<u8>>, String>,
    /// The unknown-field check of `encrypted_only` namespaces over the request.
    pub known: Result<(), String>,
    pub payloads_seen: usize,
    /// The deferred-write request pass gave the same result as `encoded`.
    pub deferred_agrees: bool,
    /// Namespace translation there and back restored the message (request and response
    /// types, and as status details), wherever it did not fail.
    pub translation_round_trips: bool,
}

/// The request-side visitor of `one_input`, writing through `Visit::Deferred`.
struct DeferredSuffix;

impl PayloadVisitor for DeferredSuffix {
    fn payload(
        &mut self,
        _: &PayloadContext<'_>,
        payload: &[u8],
    ) -> Result<Option<Vec<u8>>, WalkError> {
        Ok(Some([payload, SUFFIX].concat()))
    }

    fn visit(&mut self, _: &PayloadContext<'_>, payload: &[u8]) -> Result<Visit, WalkError> {
        Ok(Visit::Deferred(payload.len() + SUFFIX.len()))
    }

    fn write(&mut self, payload: &[u8], out: &mut Vec<u8>) -> Result<(), WalkError> {
        out.extend_from_slice(payload);
        out.extend_from_slice(SUFFIX);
        Ok(())
    }
}

const CLIENT_NAME: &str = "ns1";
const UPSTREAM_NAME: &str = "ns1.a1b2c";

/// Translates `message` (a `full_name`) ns1 → ns1.a1b2c and back. False only when the way
/// back does not restore the input (errors are fine: malformed input).
fn translation_round_trips(full_name: &str, message: &[u8]) -> bool {
    let index = NamespaceFieldIndex::global();
    let mut forward =
        |name: &str| Ok((name == CLIENT_NAME).then(|| UPSTREAM_NAME.to_string()));
    let mut backward =
        |name: &str| Ok((name == UPSTREAM_NAME).then(|| CLIENT_NAME.to_string()));
    let Ok(there) = rewrite_namespaces(index, full_name, message, &mut forward) else {
        return true;
    };
    let there = there.unwrap_or_else(|| message.to_vec());
    let back = rewrite_namespaces(index, full_name, &there, &mut backward);
    // Only looked for when the way back differs (a window-by-window search is slow under the
    // fuzzer's comparison tracing).
    let contains_target = || {
        message
            .windows(UPSTREAM_NAME.len())
            .any(|w| w == UPSTREAM_NAME.as_bytes())
    };
    match back {
        Ok(back) => back.as_deref().unwrap_or(&there) == message || contains_target(),
        // What parsed one way parses the other way.
        Err(_) => false,
    }
}

pub fn one_input(data: &[u8]) -> Option<Outcome> {
    if data.len() < 2 {
        return None;
    }
    let encoding = if data[0] & 1 == 0 {
        Encoding::Identity
    } else {
        Encoding::Gzip
    };
    let methods = sorted_methods();
    let method = methods[usize::from(data[1]) % methods.len()];
    let body = Bytes::copy_from_slice(&data[2..]);

    let (framed, message) = match decode_unary(&body, encoding, LIMIT, Direction::Request) {
        Ok(Some(msg)) => (true, msg),
        _ => (false, body.clone()),
    };

    let namespace = validate_and_find_string(&message, method.namespace_field)
        .map(|ns| ns.map(str::to_string))
        .map_err(|e| e.to_string());

    let index = PayloadIndex::global();
    let mut seen = 0usize;
    // Request side: replace every payload with a modified copy (like sealing does).
    let mut seal = |ctx: &PayloadContext<'_>, payload: &[u8]| -> Result<Option<Vec<u8>>, WalkError> {
        seen += 1;
        let _ = (ctx.to_string(), ctx.root_message(), ctx.field_name());
        let _ = ctx.is_encoded_failure_attributes();
        let mut out = Vec::with_capacity(payload.len() + SUFFIX.len());
        out.extend_from_slice(payload);
        out.extend_from_slice(SUFFIX);
        Ok(Some(out))
    };
    // Response side: undo the request side (like opening does); leave anything else alone.
    let mut open = |ctx: &PayloadContext<'_>, payload: &[u8]| -> Result<Option<Vec<u8>>, WalkError> {
        let _ = format!("{ctx:?}");
        Ok(payload.strip_suffix(SUFFIX).map(<[u8]>::to_vec))
    };
    let encode_opts = WalkOptions::with_failures(FailureMode::Encode).request();
    let decode_opts = WalkOptions::with_failures(FailureMode::Decode);
    let name = method.input.full_name();

    let encoded = rewrite_named(index, name, &message, &mut seal, &encode_opts);
    let decoded = match &encoded {
        Ok(out) => {
            let sealed: &[u8] = out.as_deref().unwrap_or(&message);
            rewrite_named(index, name, sealed, &mut open, &decode_opts).map_err(|e| e.to_string())
        }
        Err(e) => Err(format!("not run: {e}")),
    };
    let encoded = encoded.map_err(|e| e.to_string());

    // grpc-status-details-bin (google.rpc.Status) over the same bytes, both directions.
    let status_details = rewrite_status_details_with(index, &message, &mut seal, &encode_opts)
        .and_then(|out| {
            let sealed: &[u8] = out.as_deref().unwrap_or(&message);
            rewrite_status_details_with(index, sealed, &mut open, &decode_opts)
        })
        .map_err(|e| e.to_string());

    let deferred = rewrite_named(index, name, &message, &mut DeferredSuffix, &encode_opts)
        .map_err(|e| e.to_string());
    let deferred_agrees = match (&deferred, &encoded) {
        (Ok(d), Ok(e)) => d == e,
        (Err(_), Err(_)) => true,
        _ => false,
    };
    let known =
        portcullis::payload::unknown::ensure_known(name, &message).map_err(|e| e.to_string());
    let translation_round_trips = translation_round_trips(name, &message)
        && translation_round_trips(method.output.full_name(), &message)
        && translation_round_trips("google.rpc.Status", &message);

    Some(Outcome {
        method: &method.path,
        framed,
        message: message.to_vec(),
        namespace,
        encoded,
        decoded,
        status_details,
        known,
        payloads_seen: seen,
        deferred_agrees,
        translation_round_trips,
    })
}
