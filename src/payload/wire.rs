//! A minimal protobuf wire-format reader. It never allocates and never trusts lengths: every
//! read is bounds-checked, so malformed input yields an error, not a panic.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireType {
    Varint,
    Fixed64,
    Len,
    StartGroup,
    EndGroup,
    Fixed32,
}

impl WireType {
    #[inline]
    fn from_bits(bits: u64) -> Option<WireType> {
        Some(match bits {
            0 => WireType::Varint,
            1 => WireType::Fixed64,
            2 => WireType::Len,
            3 => WireType::StartGroup,
            4 => WireType::EndGroup,
            5 => WireType::Fixed32,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    Truncated,
    VarintTooLong,
    InvalidWireType(u64),
    InvalidFieldNumber,
    UnbalancedGroup,
    TooDeep,
    InvalidUtf8(u32),
    UnexpectedWireType { field: u32 },
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Truncated => write!(f, "truncated field"),
            WireError::VarintTooLong => write!(f, "varint longer than 10 bytes"),
            WireError::InvalidWireType(t) => write!(f, "invalid wire type {t}"),
            WireError::InvalidFieldNumber => write!(f, "invalid field number 0"),
            WireError::UnbalancedGroup => write!(f, "unbalanced group"),
            WireError::TooDeep => write!(f, "groups nested too deeply"),
            WireError::InvalidUtf8(n) => write!(f, "field {n} is not valid UTF-8"),
            WireError::UnexpectedWireType { field } => {
                write!(f, "field {field} has the wrong wire type")
            }
        }
    }
}

impl std::error::Error for WireError {}

const MAX_GROUP_DEPTH: usize = 64;

/// One top-level field of a message.
#[derive(Debug, Clone, Copy)]
pub struct Field<'a> {
    pub number: u32,
    pub wire_type: WireType,
    /// For `Len` fields, the content; for the others, the encoded value bytes.
    pub value: &'a [u8],
    /// The whole field as it appears on the wire, tag included.
    pub raw: &'a [u8],
    /// Where `raw` starts, relative to the buffer the field was read from.
    pub offset: usize,
    /// Length of the tag varint at the start of `raw`. For `Len` fields the length varint
    /// follows it, and `value` ends where `raw` ends.
    pub tag_len: usize,
}

#[inline]
pub fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64, WireError> {
    // Tags and most lengths are one byte. (A two-byte fast path too was measured: no gain on
    // a history page, sealing slightly slower.)
    if let Some(&byte) = buf.get(*pos) {
        if byte < 0x80 {
            *pos += 1;
            return Ok(u64::from(byte));
        }
    }
    read_varint_slow(buf, pos)
}

fn read_varint_slow(buf: &[u8], pos: &mut usize) -> Result<u64, WireError> {
    let mut value: u64 = 0;
    for i in 0..10 {
        let byte = *buf.get(*pos).ok_or(WireError::Truncated)?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(WireError::VarintTooLong)
}

#[inline]
fn take<'a>(buf: &'a [u8], pos: &mut usize, len: usize) -> Result<&'a [u8], WireError> {
    let end = pos.checked_add(len).ok_or(WireError::Truncated)?;
    let slice = buf.get(*pos..end).ok_or(WireError::Truncated)?;
    *pos = end;
    Ok(slice)
}

#[inline]
fn read_tag(buf: &[u8], pos: &mut usize) -> Result<(u32, WireType), WireError> {
    let tag = read_varint(buf, pos)?;
    let wire_type = WireType::from_bits(tag & 7).ok_or(WireError::InvalidWireType(tag & 7))?;
    let number = u32::try_from(tag >> 3).map_err(|_| WireError::InvalidFieldNumber)?;
    if number == 0 || number > 536_870_911 {
        return Err(WireError::InvalidFieldNumber);
    }
    Ok((number, wire_type))
}

/// Skips a field's value (after its tag), including a whole group.
fn skip_value(
    buf: &[u8],
    pos: &mut usize,
    number: u32,
    wire_type: WireType,
    depth: usize,
) -> Result<(), WireError> {
    match wire_type {
        WireType::Varint => read_varint(buf, pos).map(|_| ()),
        WireType::Fixed64 => take(buf, pos, 8).map(|_| ()),
        WireType::Fixed32 => take(buf, pos, 4).map(|_| ()),
        WireType::Len => {
            let len = usize::try_from(read_varint(buf, pos)?).map_err(|_| WireError::Truncated)?;
            take(buf, pos, len).map(|_| ())
        }
        WireType::StartGroup => {
            if depth >= MAX_GROUP_DEPTH {
                return Err(WireError::TooDeep);
            }
            loop {
                let (inner, inner_type) = read_tag(buf, pos)?;
                if inner_type == WireType::EndGroup {
                    return if inner == number {
                        Ok(())
                    } else {
                        Err(WireError::UnbalancedGroup)
                    };
                }
                skip_value(buf, pos, inner, inner_type, depth + 1)?;
            }
        }
        WireType::EndGroup => Err(WireError::UnbalancedGroup),
    }
}

/// Iterates over a message's top-level fields.
pub struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
    failed: bool,
}

pub fn fields(buf: &[u8]) -> Fields<'_> {
    Fields {
        buf,
        pos: 0,
        failed: false,
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<Field<'a>, WireError>;

    // Inlined: the walker reads every field of every message it descends into through this.
    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.buf.len() {
            return None;
        }
        let result = self.read_field();
        self.failed = result.is_err();
        Some(result)
    }
}

impl<'a> Fields<'a> {
    #[inline(always)]
    fn read_field(&mut self) -> Result<Field<'a>, WireError> {
        let buf = self.buf;
        let start = self.pos;
        let (number, wire_type) = read_tag(buf, &mut self.pos)?;
        let value_start = self.pos;
        let tag_len = value_start - start;
        let value = match wire_type {
            WireType::Len => {
                let len = usize::try_from(read_varint(buf, &mut self.pos)?)
                    .map_err(|_| WireError::Truncated)?;
                take(buf, &mut self.pos, len)?
            }
            WireType::Varint => {
                read_varint(buf, &mut self.pos)?;
                buf.get(value_start..self.pos).ok_or(WireError::Truncated)?
            }
            _ => {
                skip_value(buf, &mut self.pos, number, wire_type, 0)?;
                buf.get(value_start..self.pos).ok_or(WireError::Truncated)?
            }
        };
        Ok(Field {
            number,
            wire_type,
            value,
            raw: buf.get(start..self.pos).ok_or(WireError::Truncated)?,
            offset: start,
            tag_len,
        })
    }
}

/// Checks that `buf` is a well-formed sequence of fields, and returns the last value of the
/// string field `number` (protobuf's rule for a repeated scalar on the wire), if present.
pub fn validate_and_find_string(
    buf: &[u8],
    number: Option<u32>,
) -> Result<Option<&str>, WireError> {
    let mut found = None;
    for field in fields(buf) {
        let field = field?;
        if Some(field.number) == number {
            if field.wire_type != WireType::Len {
                return Err(WireError::UnexpectedWireType {
                    field: field.number,
                });
            }
            found = Some(
                std::str::from_utf8(field.value)
                    .map_err(|_| WireError::InvalidUtf8(field.number))?,
            );
        }
    }
    Ok(found)
}

/// Appends a length-delimited field.
/// The message name an `Any`'s type URL names: `type.googleapis.com/temporal.api.update.v1.Request`
/// → `temporal.api.update.v1.Request` (the name follows the last '/').
pub fn any_message_name(type_url: Option<&[u8]>) -> Option<&str> {
    type_url
        .and_then(|url| std::str::from_utf8(url).ok())
        .and_then(|url| url.rsplit('/').next())
}

pub fn put_len_field(out: &mut Vec<u8>, number: u32, value: &[u8]) {
    put_varint(out, (u64::from(number) << 3) | 2);
    put_varint(out, value.len() as u64);
    out.extend_from_slice(value);
}

/// The number of bytes `put_varint` writes for `value`.
pub fn varint_len(value: u64) -> usize {
    // 1 byte per started group of 7 significant bits; 0 still takes one byte.
    let bits = 64 - (value | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

pub fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_and_last_string_wins() {
        let mut msg = Vec::new();
        put_len_field(&mut msg, 1, b"first");
        put_varint(&mut msg, 3 << 3);
        put_varint(&mut msg, 300);
        put_len_field(&mut msg, 1, b"second");
        assert_eq!(
            validate_and_find_string(&msg, Some(1)).unwrap(),
            Some("second")
        );
        assert_eq!(validate_and_find_string(&msg, Some(9)).unwrap(), None);
        let numbers: Vec<u32> = fields(&msg).map(|f| f.unwrap().number).collect();
        assert_eq!(numbers, vec![1, 3, 1]);
    }

    #[test]
    fn varint_len_matches_put_varint() {
        for v in [
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
            put_varint(&mut out, v);
            assert_eq!(varint_len(v), out.len(), "{v}");
            // Read back at the end of a buffer and inside one, and refused when cut short.
            let mut pos = 0;
            assert_eq!(read_varint(&out, &mut pos), Ok(v));
            assert_eq!(pos, out.len());
            let mut longer = out.clone();
            longer.extend_from_slice(&[0x81, 0x01]);
            let mut pos = 0;
            assert_eq!(read_varint(&longer, &mut pos), Ok(v));
            assert_eq!(pos, out.len());
            let mut pos = 0;
            let cut = &out[..out.len() - 1];
            assert_eq!(read_varint(cut, &mut pos), Err(WireError::Truncated));
        }
        // Non-minimal encodings are valid protobuf.
        assert_eq!(read_varint(&[0x80, 0x00], &mut 0), Ok(0));
        assert_eq!(read_varint(&[0xff, 0x7f], &mut 0), Ok(16_383));
    }

    #[test]
    fn fields_report_their_offsets() {
        let mut msg = Vec::new();
        put_varint(&mut msg, 8);
        put_varint(&mut msg, 300);
        put_len_field(&mut msg, 2000, b"abc");
        let all: Vec<Field<'_>> = fields(&msg).map(|f| f.unwrap()).collect();
        assert_eq!((all[0].offset, all[0].tag_len), (0, 1));
        assert_eq!((all[1].offset, all[1].tag_len), (3, 2));
        assert_eq!(&msg[all[1].offset..], all[1].raw);
    }

    #[test]
    fn groups_are_skipped() {
        // field 5 group containing varint field 1, then end group 5, then string field 1
        let mut msg = vec![(5 << 3) | 3, 1 << 3, 42, (5 << 3) | 4];
        put_len_field(&mut msg, 1, b"ns");
        assert_eq!(validate_and_find_string(&msg, Some(1)).unwrap(), Some("ns"));
        let unbalanced = vec![(5 << 3) | 3, (6 << 3) | 4];
        assert!(validate_and_find_string(&unbalanced, None).is_err());
    }

    #[test]
    fn malformed_input_is_an_error() {
        let cases: &[&[u8]] = &[
            &[0x0a, 0x05, b'a'],
            &[0x0a],
            &[0x07],
            &[0x00, 0x01],
            &[
                0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
            &[0x0a, 0x02, 0xff, 0xfe],
            &[0x08, 0x01, 0x0d, 1, 2],
        ];
        for case in cases {
            assert!(validate_and_find_string(case, Some(1)).is_err(), "{case:?}");
        }
    }
}
