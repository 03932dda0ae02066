//! Payload compression codecs. The codec travels in each batch, so every batch can use a different one.

use std::fmt;
use std::str::FromStr;

/// How a batch payload is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Codec {
    /// Stored as is.
    None,
    /// LZ4 block format: cheap, for CPU-bound senders.
    #[default]
    Lz4,
    /// Zstandard at the given level (1..=19).
    Zstd(i8),
}

/// A payload that could not be compressed or decompressed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompressionError {
    /// The codec tag or level on the wire is unknown.
    #[error("unknown codec tag {tag} (level {level})")]
    UnknownCodec {
        /// Tag byte.
        tag: u8,
        /// Level byte.
        level: i8,
    },
    /// The declared uncompressed size is over the limit.
    #[error("declared uncompressed size {declared} exceeds the limit of {max} bytes")]
    TooLarge {
        /// Declared size.
        declared: usize,
        /// Limit.
        max: usize,
    },
    /// The compressed bytes are corrupt or do not expand to the declared size.
    #[error("{codec} payload is corrupt: {reason}")]
    Corrupt {
        /// Codec name.
        codec: &'static str,
        /// Decoder message.
        reason: String,
    },
    /// A codec name in a config could not be parsed.
    #[error("unknown codec `{0}` (expected none, lz4 or zstd[:level 1-19])")]
    BadName(String),
}

impl Codec {
    /// Wire tag and level.
    pub fn to_wire(self) -> (u8, i8) {
        match self {
            Codec::None => (0, 0),
            Codec::Lz4 => (1, 0),
            Codec::Zstd(level) => (2, level),
        }
    }

    /// Parses the wire tag and level.
    pub fn from_wire(tag: u8, level: i8) -> Result<Self, CompressionError> {
        match (tag, level) {
            (0, _) => Ok(Codec::None),
            (1, _) => Ok(Codec::Lz4),
            (2, 1..=19) => Ok(Codec::Zstd(level)),
            _ => Err(CompressionError::UnknownCodec { tag, level }),
        }
    }

    /// Compresses `input`.
    pub fn compress(self, input: &[u8]) -> Vec<u8> {
        match self {
            Codec::None => input.to_vec(),
            Codec::Lz4 => lz4_flex::block::compress(input),
            Codec::Zstd(level) => {
                // Compressing into memory only fails for invalid parameters; the level is range-checked on
                // construction, so fall back to storing rather than panicking.
                zstd::bulk::compress(input, i32::from(level)).unwrap_or_else(|_| input.to_vec())
            }
        }
    }

    /// Most bytes [`Codec::compress_onto`] appends for `len` input bytes (zstd's own bound is not exposed by the
    /// bulk API; its output goes through a buffer of its own anyway).
    pub fn compressed_bound(self, len: usize) -> usize {
        match self {
            Codec::None => len,
            Codec::Lz4 => lz4_flex::block::get_maximum_output_size(len),
            Codec::Zstd(_) => len + len / 128 + 512,
        }
    }

    /// Appends `input` compressed to `out` (what [`Codec::compress`] returns, without a buffer of its own: a
    /// batch is compressed straight into its frame).
    pub fn compress_onto(self, input: &[u8], out: &mut Vec<u8>) {
        match self {
            Codec::None => out.extend_from_slice(input),
            Codec::Lz4 => {
                let start = out.len();
                out.resize(start + lz4_flex::block::get_maximum_output_size(input.len()), 0);
                match lz4_flex::block::compress_into(input, &mut out[start..]) {
                    Ok(n) => out.truncate(start + n),
                    // Cannot happen with the maximum output size; fall back to the allocating path anyway.
                    Err(_) => {
                        out.truncate(start);
                        out.extend_from_slice(&lz4_flex::block::compress(input));
                    }
                }
            }
            Codec::Zstd(_) => out.extend_from_slice(&self.compress(input)),
        }
    }

    /// The codec family name, without level.
    fn name(self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Lz4 => "lz4",
            Codec::Zstd(_) => "zstd",
        }
    }

    /// Decompresses a payload that must expand to exactly `uncompressed_len` bytes, at most `max`.
    pub fn decompress(self, input: &[u8], uncompressed_len: usize, max: usize) -> Result<Vec<u8>, CompressionError> {
        if uncompressed_len > max {
            return Err(CompressionError::TooLarge { declared: uncompressed_len, max });
        }
        let corrupt = |reason: String| CompressionError::Corrupt { codec: self.name(), reason };
        let out = match self {
            Codec::None => input.to_vec(),
            Codec::Lz4 => lz4_flex::block::decompress(input, uncompressed_len).map_err(|e| corrupt(e.to_string()))?,
            Codec::Zstd(_) => zstd::bulk::decompress(input, uncompressed_len).map_err(|e| corrupt(e.to_string()))?,
        };
        if out.len() != uncompressed_len {
            return Err(corrupt(format!("expanded to {} bytes, declared {uncompressed_len}", out.len())));
        }
        Ok(out)
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Codec::Zstd(level) => write!(f, "zstd:{level}"),
            other => f.write_str(other.name()),
        }
    }
}

impl FromStr for Codec {
    type Err = CompressionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || CompressionError::BadName(s.to_owned());
        match s {
            "none" => Ok(Codec::None),
            "lz4" => Ok(Codec::Lz4),
            "zstd" => Ok(Codec::Zstd(3)),
            _ => {
                let level = s.strip_prefix("zstd:").ok_or_else(bad)?.parse::<i8>().map_err(|_| bad())?;
                if (1..=19).contains(&level) { Ok(Codec::Zstd(level)) } else { Err(bad()) }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_codec_round_trips() {
        let input: Vec<u8> = (0..10_000u32).flat_map(|i| (i % 97).to_le_bytes()).collect();
        for codec in [Codec::None, Codec::Lz4, Codec::Zstd(1), Codec::Zstd(19)] {
            let packed = codec.compress(&input);
            assert_eq!(codec.decompress(&packed, input.len(), 1 << 20).unwrap(), input, "{codec}");
            let (tag, level) = codec.to_wire();
            assert_eq!(Codec::from_wire(tag, level).unwrap(), codec);
            assert_eq!(codec.to_string().parse::<Codec>().unwrap(), codec);
        }
    }

    #[test]
    fn lying_sizes_and_garbage_are_errors() {
        let packed = Codec::Lz4.compress(b"hello hello hello hello");
        assert!(Codec::Lz4.decompress(&packed, 5, 1 << 20).is_err());
        assert!(Codec::Lz4.decompress(&packed, 1 << 30, 1 << 20).is_err());
        assert!(Codec::Zstd(3).decompress(b"not zstd", 10, 1 << 20).is_err());
        assert!(Codec::None.decompress(b"abc", 4, 1 << 20).is_err());
        assert!(Codec::from_wire(9, 0).is_err());
        assert!(Codec::from_wire(2, 40).is_err());
        assert!("zstd:0".parse::<Codec>().is_err());
        assert!("gzip".parse::<Codec>().is_err());
    }
}
