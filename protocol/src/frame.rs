//! Framing: every message travels as one frame.
//!
//! ```text
//!  0      2         3        4            8            12
//!  ├──────┼─────────┼────────┼────────────┼────────────┼──────────────┤
//!  │ "AK" │ version │  type  │ body len   │ crc32c     │ body …       │
//!  │      │   u8    │   u8   │ u32 LE     │ u32 LE     │ len bytes    │
//! ```
//!
//! The CRC32C covers the first eight header bytes and the body, so a flipped bit anywhere is detected. The body
//! length is checked against a cap before any of the body is buffered, so an oversized frame costs twelve bytes
//! of memory, not its declared size.

use crate::PROTOCOL_VERSION;

/// First two bytes of every frame.
pub const FRAME_MAGIC: [u8; 2] = *b"AK";
/// Size of the fixed frame header.
pub const FRAME_HEADER_LEN: usize = 12;
/// Default cap on a frame body (batches are far smaller in practice).
pub const DEFAULT_MAX_FRAME_LEN: usize = 16 * 1024 * 1024;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// Agent → aggregator, first frame.
    Hello = 1,
    /// Aggregator → agent, answer to Hello.
    Welcome = 2,
    /// Agent → aggregator, records.
    Batch = 3,
    /// Aggregator → agent, batches durable.
    Ack = 4,
    /// Aggregator → agent, more batches may be sent.
    Credit = 5,
    /// Either way, liveness probe.
    Heartbeat = 6,
    /// Answer to Heartbeat.
    HeartbeatAck = 7,
    /// Either way, a typed error.
    Error = 8,
    /// Either way, orderly end of the session.
    Goodbye = 9,
}

impl FrameType {
    fn from_u8(v: u8) -> Option<Self> {
        use FrameType::*;
        [Hello, Welcome, Batch, Ack, Credit, Heartbeat, HeartbeatAck, Error, Goodbye]
            .into_iter()
            .find(|t| *t as u8 == v)
    }
}

/// A frame that cannot be accepted. Every variant is fatal for the stream it arrived on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The stream does not start with the frame magic: not an akosha peer, or garbage.
    #[error("bad frame magic {0:02x?} (expected \"AK\")")]
    BadMagic([u8; 2]),
    /// The peer speaks a protocol version this build does not support.
    #[error("unsupported protocol version {got} (this build speaks {min}..={max})")]
    UnsupportedVersion {
        /// Version on the wire.
        got: u8,
        /// Oldest supported.
        min: u8,
        /// Newest supported.
        max: u8,
    },
    /// Unknown frame type.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// The body is larger than the configured cap.
    #[error("frame body of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Declared length.
        len: usize,
        /// Cap.
        max: usize,
    },
    /// The CRC32C does not match.
    #[error("frame checksum mismatch (expected {expected:#010x}, computed {actual:#010x})")]
    ChecksumMismatch {
        /// CRC on the wire.
        expected: u32,
        /// CRC of the bytes received.
        actual: u32,
    },
    /// The body does not parse as the message its type names.
    #[error("malformed {frame:?} frame: {reason}")]
    Malformed {
        /// Frame type.
        frame: FrameType,
        /// What was wrong.
        reason: String,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({missing} bytes missing)")]
    Truncated {
        /// Bytes still expected.
        missing: usize,
    },
}

/// A parsed and length-checked header; the body still has to be read and verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Frame type.
    pub frame_type: FrameType,
    /// Body length.
    pub body_len: usize,
    crc: u32,
    prefix: [u8; 8],
}

impl FrameHeader {
    /// Parses a header, checking magic, version, type and the size cap.
    pub fn parse(bytes: &[u8; FRAME_HEADER_LEN], max_body_len: usize) -> Result<Self, FrameError> {
        if bytes[0..2] != FRAME_MAGIC {
            return Err(FrameError::BadMagic([bytes[0], bytes[1]]));
        }
        let version = bytes[2];
        if !(crate::MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
            return Err(FrameError::UnsupportedVersion {
                got: version,
                min: crate::MIN_PROTOCOL_VERSION,
                max: PROTOCOL_VERSION,
            });
        }
        let frame_type = FrameType::from_u8(bytes[3]).ok_or(FrameError::UnknownType(bytes[3]))?;
        let body_len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
        if body_len > max_body_len {
            return Err(FrameError::TooLarge { len: body_len, max: max_body_len });
        }
        let crc = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        let mut prefix = [0u8; 8];
        prefix.copy_from_slice(&bytes[0..8]);
        Ok(FrameHeader { frame_type, body_len, crc, prefix })
    }

    /// Checks the body against the header's checksum.
    pub fn verify(&self, body: &[u8]) -> Result<(), FrameError> {
        self.verify_split(body, &[])
    }

    /// [`FrameHeader::verify`] for a body read in two parts (`first` followed by `second`).
    pub fn verify_split(&self, first: &[u8], second: &[u8]) -> Result<(), FrameError> {
        let actual = crc32c::crc32c_append(crc32c::crc32c_append(crc32c::crc32c(&self.prefix), first), second);
        if actual != self.crc {
            return Err(FrameError::ChecksumMismatch { expected: self.crc, actual });
        }
        Ok(())
    }
}

/// Encodes a frame whose body is written by `write_body` directly after the header (no extra copy).
pub fn encode_frame(frame_type: FrameType, body_hint: usize, write_body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + body_hint);
    out.extend_from_slice(&FRAME_MAGIC);
    out.push(PROTOCOL_VERSION);
    out.push(frame_type as u8);
    out.extend_from_slice(&[0; 8]);
    write_body(&mut out);
    // Bodies are bounded by the frame cap, far below 4 GiB; saturate rather than wrap if a caller ever
    // builds a larger one, so the receiver rejects it as too large.
    let body_len = u32::try_from(out.len() - FRAME_HEADER_LEN).unwrap_or(u32::MAX);
    out[4..8].copy_from_slice(&body_len.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[0..8]), &out[FRAME_HEADER_LEN..]);
    out[8..12].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Incremental decoder for a byte stream of frames (in-memory peers, fuzzing, tests).
///
/// After the first error the decoder is poisoned and returns that error forever: a stream with a bad frame has
/// lost its framing and must be closed.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max_body_len: usize,
    poisoned: Option<FrameError>,
}

impl FrameDecoder {
    /// A decoder that rejects bodies larger than `max_body_len`.
    pub fn new(max_body_len: usize) -> Self {
        Self { buf: Vec::new(), max_body_len, poisoned: None }
    }

    /// Feeds bytes received from the peer.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.poisoned.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// The next complete frame, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<(FrameType, Vec<u8>)>, FrameError> {
        if let Some(e) = &self.poisoned {
            return Err(e.clone());
        }
        let result = self.try_next();
        if let Err(e) = &result {
            self.poisoned = Some(e.clone());
            self.buf = Vec::new();
        }
        result
    }

    /// The next complete message, `Ok(None)` when more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<crate::Message>, FrameError> {
        match self.next_frame()? {
            None => Ok(None),
            Some((frame_type, body)) => match crate::Message::decode(frame_type, &body) {
                Ok(m) => Ok(Some(m)),
                Err(e) => {
                    self.poisoned = Some(e.clone());
                    Err(e)
                }
            },
        }
    }

    /// Call at end of stream: an error if a frame was cut off.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let missing = if self.buf.len() < FRAME_HEADER_LEN {
            FRAME_HEADER_LEN - self.buf.len()
        } else {
            let len = u32::from_le_bytes([self.buf[4], self.buf[5], self.buf[6], self.buf[7]]) as usize;
            (FRAME_HEADER_LEN + len).saturating_sub(self.buf.len())
        };
        Err(FrameError::Truncated { missing })
    }

    fn try_next(&mut self) -> Result<Option<(FrameType, Vec<u8>)>, FrameError> {
        let Some(header_bytes) = self.buf.first_chunk::<FRAME_HEADER_LEN>() else {
            // Fail fast on a bad magic so garbage is rejected after two bytes, not twelve.
            if self.buf.len() >= 2 && self.buf[0..2] != FRAME_MAGIC {
                return Err(FrameError::BadMagic([self.buf[0], self.buf[1]]));
            }
            return Ok(None);
        };
        let header = FrameHeader::parse(header_bytes, self.max_body_len)?;
        let total = FRAME_HEADER_LEN + header.body_len;
        if self.buf.len() < total {
            return Ok(None);
        }
        let body = self.buf[FRAME_HEADER_LEN..total].to_vec();
        header.verify(&body)?;
        self.buf.drain(..total);
        Ok(Some((header.frame_type, body)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(body: &[u8]) -> Vec<u8> {
        encode_frame(FrameType::Heartbeat, body.len(), |out| out.extend_from_slice(body))
    }

    #[test]
    fn frames_split_anywhere_decode() {
        let mut stream = frame(b"12345678");
        stream.extend(frame(b"abcdefgh"));
        for split in 0..stream.len() {
            let mut d = FrameDecoder::new(1024);
            d.push(&stream[..split]);
            let mut got = Vec::new();
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
            d.push(&stream[split..]);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
            assert_eq!(got.len(), 2);
            d.finish().unwrap();
        }
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let f = frame(b"some body");
        for byte in 0..f.len() {
            for bit in 0..8 {
                let mut g = f.clone();
                g[byte] ^= 1 << bit;
                let mut d = FrameDecoder::new(1024);
                d.push(&g);
                assert!(!matches!(d.next_frame(), Ok(Some(_))), "flip at {byte}:{bit} undetected");
            }
        }
    }

    #[test]
    fn oversized_and_wrong_version_frames_are_typed_errors() {
        let mut f = frame(&[0; 100]);
        let mut d = FrameDecoder::new(50);
        d.push(&f[..FRAME_HEADER_LEN]);
        assert_eq!(d.next_frame(), Err(FrameError::TooLarge { len: 100, max: 50 }));
        f[2] = 9;
        let mut d = FrameDecoder::new(1024);
        d.push(&f);
        assert!(matches!(d.next_frame(), Err(FrameError::UnsupportedVersion { got: 9, .. })));
        let mut d = FrameDecoder::new(1024);
        d.push(b"GET / HTTP/1.1\r\n");
        assert!(matches!(d.next_frame(), Err(FrameError::BadMagic(_))));
        // Poisoned: stays an error.
        assert!(d.next_frame().is_err());
    }

    #[test]
    fn truncated_stream_is_reported() {
        let f = frame(b"abcdef");
        let mut d = FrameDecoder::new(1024);
        d.push(&f[..f.len() - 2]);
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(d.finish(), Err(FrameError::Truncated { missing: 2 }));
    }
}
