//! Drops `source_code_info` (the comments and source positions of every declaration) from a
//! serialized `google.protobuf.FileDescriptorSet`. Temporal's descriptor set is about 70 %
//! comments; the proxy never reads them, and a `DescriptorPool` keeps them decoded in memory
//! (about 10 MB of small allocations). The rewrite is at the wire level: every other byte of
//! every file (options, extensions, fields this code does not know) is kept as it was.
//!
//! Plain `std`, no dependencies: `build.rs` includes this file too, to strip the embedded set.

/// `FileDescriptorSet.file`.
const SET_FILE: u64 = 1;
/// `FileDescriptorProto.name` and `.dependency` (the files it imports).
const FILE_NAME: u64 = 1;
const FILE_DEPENDENCY: u64 = 3;
/// `FileDescriptorProto.source_code_info`.
const FILE_SOURCE_CODE_INFO: u64 = 9;
const WIRE_VARINT: u64 = 0;
const WIRE_I64: u64 = 1;
const WIRE_LEN: u64 = 2;
const WIRE_I32: u64 = 5;

fn read_varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn write_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// One field: its number, wire type, and where it starts (at its tag), where its payload
/// starts and where it ends.
struct Field {
    number: u64,
    wire: u64,
    start: usize,
    body: usize,
    end: usize,
}

fn next_field(bytes: &[u8], at: &mut usize) -> Option<Field> {
    let start = *at;
    let tag = read_varint(bytes, at)?;
    let (number, wire) = (tag >> 3, tag & 7);
    let body = *at;
    let end = match wire {
        WIRE_VARINT => {
            read_varint(bytes, at)?;
            *at
        }
        WIRE_I64 => body.checked_add(8)?,
        WIRE_LEN => {
            let len = usize::try_from(read_varint(bytes, at)?).ok()?;
            let end = at.checked_add(len)?;
            *at = end;
            return (end <= bytes.len()).then_some(Field {
                number,
                wire,
                start,
                body: end - len,
                end,
            });
        }
        WIRE_I32 => body.checked_add(4)?,
        // Groups are not used by descriptor.proto.
        _ => return None,
    };
    *at = end;
    (end <= bytes.len()).then_some(Field {
        number,
        wire,
        start,
        body,
        end,
    })
}

/// The set without `source_code_info`; `None` if `set` is not well-formed protobuf (the caller
/// then decodes the original, which reports the error).
pub fn strip_source_info(set: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(set.len());
    let mut at = 0;
    while at < set.len() {
        let field = next_field(set, &mut at)?;
        if field.number != SET_FILE || field.wire != WIRE_LEN {
            out.extend_from_slice(set.get(field.start..field.end)?);
            continue;
        }
        let file = set.get(field.body..field.end)?;
        let mut kept = Vec::with_capacity(file.len());
        let mut inner = 0;
        while inner < file.len() {
            let part = next_field(file, &mut inner)?;
            if part.number == FILE_SOURCE_CODE_INFO && part.wire == WIRE_LEN {
                continue;
            }
            kept.extend_from_slice(file.get(part.start..part.end)?);
        }
        write_varint(&mut out, (SET_FILE << 3) | WIRE_LEN);
        write_varint(&mut out, kept.len() as u64);
        out.extend_from_slice(&kept);
    }
    Some(out)
}

/// Files of Temporal's descriptor set left out of the embedded schema: not on the proxy's path,
/// and ~30 % of the decoded pool (1.9 of 6.5 MiB). Temporal Cloud's control-plane API (its own
/// endpoint, not proxied), the SDK core's internal protocol (between an SDK's language layer
/// and its core, never sent to a server) and the test server's service.
#[cfg_attr(not(test), allow(dead_code))] // used by build.rs
pub const NOT_SERVED: &[&str] = &[
    "temporal/api/cloud/",
    "temporal/sdk/core/",
    "temporal/api/testservice/",
];

/// The set without the files whose names start with one of `prefixes`. Refused (with the
/// reason) when a file that stays imports one that goes, or when `set` is malformed.
#[cfg_attr(not(test), allow(dead_code))] // used by build.rs
pub fn drop_files(set: &[u8], prefixes: &[&str]) -> Result<Vec<u8>, String> {
    let malformed = || "the descriptor set is not well-formed protobuf".to_string();
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    let mut out = Vec::with_capacity(set.len());
    let mut dropped = Vec::new();
    let mut imports = Vec::new();
    let mut at = 0;
    while at < set.len() {
        let field = next_field(set, &mut at).ok_or_else(malformed)?;
        let whole = set.get(field.start..field.end).ok_or_else(malformed)?;
        if field.number != SET_FILE || field.wire != WIRE_LEN {
            out.extend_from_slice(whole);
            continue;
        }
        let file = set.get(field.body..field.end).ok_or_else(malformed)?;
        let (mut name, mut dependencies) = (String::new(), Vec::new());
        let mut inner = 0;
        while inner < file.len() {
            let part = next_field(file, &mut inner).ok_or_else(malformed)?;
            let value = file.get(part.body..part.end).ok_or_else(malformed)?;
            match (part.number, part.wire) {
                (FILE_NAME, WIRE_LEN) => name = text(value),
                (FILE_DEPENDENCY, WIRE_LEN) => dependencies.push(text(value)),
                _ => {}
            }
        }
        if prefixes.iter().any(|p| name.starts_with(p)) {
            dropped.push(name);
        } else {
            imports.extend(dependencies.into_iter().map(|d| (name.clone(), d)));
            out.extend_from_slice(whole);
        }
    }
    match imports.iter().find(|(_, d)| dropped.contains(d)) {
        Some((file, import)) => Err(format!("{file} imports {import}, which would be dropped")),
        None => Ok(out),
    }
}

/// Each file of a serialized `FileDescriptorSet`, in order; `None` if `set` is not well-formed
/// protobuf or carries anything but files.
#[cfg_attr(not(test), allow(dead_code))] // not used by build.rs
pub fn file_entries(set: &[u8]) -> Option<Vec<&[u8]>> {
    let mut files = Vec::new();
    let mut at = 0;
    while at < set.len() {
        let field = next_field(set, &mut at)?;
        if field.number != SET_FILE || field.wire != WIRE_LEN {
            return None;
        }
        files.push(set.get(field.body..field.end)?);
    }
    Some(files)
}
