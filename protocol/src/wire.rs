//! Bounds-checked primitives shared by the message and record codecs.
//!
//! Integers are little-endian; lengths and counts are LEB128 varints so that short strings cost one byte of
//! overhead. A [`Reader`] never panics: every read checks the remaining length and reports what was missing.

use std::fmt;

/// A body that could not be decoded, with the field that was being read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WireError {
    pub(crate) field: &'static str,
    pub(crate) problem: WireProblem,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WireProblem {
    Truncated,
    VarintOverflow,
    InvalidUtf8,
    TooLong { len: u64, max: u64 },
    Invalid(&'static str),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.problem {
            WireProblem::Truncated => write!(f, "field `{}` is truncated", self.field),
            WireProblem::VarintOverflow => write!(f, "field `{}` has an overlong varint", self.field),
            WireProblem::InvalidUtf8 => write!(f, "field `{}` is not valid UTF-8", self.field),
            WireProblem::TooLong { len, max } => {
                write!(f, "field `{}` declares {len} elements, more than the {max} allowed", self.field)
            }
            WireProblem::Invalid(why) => write!(f, "field `{}` is invalid: {why}", self.field),
        }
    }
}

impl std::error::Error for WireError {}

pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn err(field: &'static str, problem: WireProblem) -> WireError {
        WireError { field, problem }
    }

    pub(crate) fn bytes(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(Self::err(field, WireProblem::Truncated));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], WireError> {
        let bytes = self.bytes(N, field)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(field)?[0])
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn i64(&mut self, field: &'static str) -> Result<i64, WireError> {
        Ok(i64::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn f32(&mut self, field: &'static str) -> Result<f32, WireError> {
        Ok(f32::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn f64(&mut self, field: &'static str) -> Result<f64, WireError> {
        Ok(f64::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn varint(&mut self, field: &'static str) -> Result<u64, WireError> {
        let mut value: u64 = 0;
        for shift in (0..64).step_by(7) {
            let byte = self.u8(field)?;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(Self::err(field, WireProblem::VarintOverflow));
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(Self::err(field, WireProblem::VarintOverflow))
    }

    /// A varint length, checked against `max` and against the bytes actually left, so that a hostile length
    /// can never make the caller allocate more than the input could hold.
    pub(crate) fn len(&mut self, field: &'static str, max: u64, min_bytes_each: u64) -> Result<usize, WireError> {
        let len = self.varint(field)?;
        if len > max {
            return Err(Self::err(field, WireProblem::TooLong { len, max }));
        }
        if len.saturating_mul(min_bytes_each) > self.buf.len() as u64 {
            return Err(Self::err(field, WireProblem::Truncated));
        }
        // `len <= remaining bytes`, which fits in usize.
        Ok(len as usize)
    }

    pub(crate) fn str(&mut self, field: &'static str) -> Result<&'a str, WireError> {
        let len = self.len(field, u32::MAX as u64, 1)?;
        let bytes = self.bytes(len, field)?;
        std::str::from_utf8(bytes).map_err(|_| Self::err(field, WireProblem::InvalidUtf8))
    }

    pub(crate) fn string(&mut self, field: &'static str) -> Result<String, WireError> {
        self.str(field).map(str::to_owned)
    }

    pub(crate) fn invalid(field: &'static str, why: &'static str) -> WireError {
        Self::err(field, WireProblem::Invalid(why))
    }
}

pub(crate) trait WriteExt {
    fn put_u8(&mut self, v: u8);
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_u64(&mut self, v: u64);
    fn put_i64(&mut self, v: i64);
    fn put_f64(&mut self, v: f64);
    fn put_varint(&mut self, v: u64);
    fn put_str(&mut self, v: &str);
}

impl WriteExt for Vec<u8> {
    fn put_u8(&mut self, v: u8) {
        self.push(v);
    }
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_i64(&mut self, v: i64) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_f64(&mut self, v: f64) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.push(v as u8);
    }
    fn put_str(&mut self, v: &str) {
        self.put_varint(v.len() as u64);
        self.extend_from_slice(v.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_round_trips_edges() {
        for v in [0, 1, 127, 128, 300, u32::MAX as u64, u64::MAX - 1, u64::MAX] {
            let mut buf = Vec::new();
            buf.put_varint(v);
            assert_eq!(Reader::new(&buf).varint("v").unwrap(), v);
        }
    }

    #[test]
    fn overlong_varint_is_an_error() {
        let buf = [0xff; 11];
        assert_eq!(Reader::new(&buf).varint("v").unwrap_err().problem, WireProblem::VarintOverflow);
    }

    #[test]
    fn hostile_length_is_checked_against_remaining_bytes() {
        let mut buf = Vec::new();
        buf.put_varint(1 << 40);
        let err = Reader::new(&buf).str("name").unwrap_err();
        assert_eq!(err.field, "name");
    }
}
