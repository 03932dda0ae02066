//! The stored form of a chunk of records, with its checksum.

use akosha_protocol::{Record, encode_record};

const CHUNK_FORMAT: u8 = 1;
/// format u8, crc u32, record_count u32, accepted_at i64.
pub(crate) const CHUNK_HEADER_LEN: usize = 1 + 4 + 4 + 8;

/// Header fields of a stored chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkHeader {
    pub(crate) record_count: u32,
    /// Wall-clock time the chunk was accepted, microseconds since the epoch.
    pub(crate) accepted_at: i64,
}

/// Why a stored chunk cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ChunkError {
    #[error("chunk is {0} bytes, shorter than its header")]
    TooShort(usize),
    #[error("chunk format {0} is not supported by this agent version")]
    UnsupportedFormat(u8),
    #[error("chunk checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("chunk holds 0 records")]
    Empty,
}

/// Serialises records into a chunk value.
#[cfg(test)]
pub(crate) fn encode_chunk(records: &[Record], accepted_at: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + records.iter().map(Record::approx_size).sum::<usize>());
    append_chunk(&mut out, records, accepted_at);
    out
}

/// Serialises records into a chunk value at the end of `out`.
pub(crate) fn append_chunk(out: &mut Vec<u8>, records: &[Record], accepted_at: i64) {
    let start = out.len();
    out.push(CHUNK_FORMAT);
    out.extend_from_slice(&[0; 4]);
    // Chunks are cut well below 4 Gi records.
    out.extend_from_slice(&(records.len() as u32).to_le_bytes());
    out.extend_from_slice(&accepted_at.to_le_bytes());
    for record in records {
        encode_record(record, out);
    }
    let crc = crc32c::crc32c(&out[start + 5..]);
    out[start + 1..start + 5].copy_from_slice(&crc.to_le_bytes());
}

/// Checks a chunk value and returns its header and the encoded-records payload.
///
/// Whether the format can be read is decided before the checksum, so a chunk from a newer agent is reported as
/// such rather than as corruption.
pub(crate) fn decode_chunk(value: &[u8]) -> Result<(ChunkHeader, &[u8]), ChunkError> {
    let header: &[u8; CHUNK_HEADER_LEN] = value.first_chunk().ok_or(ChunkError::TooShort(value.len()))?;
    if header[0] != CHUNK_FORMAT {
        return Err(ChunkError::UnsupportedFormat(header[0]));
    }
    let stored = u32::from_le_bytes([header[1], header[2], header[3], header[4]]);
    let computed = crc32c::crc32c(&value[5..]);
    if stored != computed {
        return Err(ChunkError::Checksum { stored, computed });
    }
    let record_count = u32::from_le_bytes([header[5], header[6], header[7], header[8]]);
    if record_count == 0 {
        return Err(ChunkError::Empty);
    }
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&header[9..17]);
    Ok((ChunkHeader { record_count, accepted_at: i64::from_le_bytes(ts) }, &value[CHUNK_HEADER_LEN..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let r = Record { system_id: "s".into(), id: "1".into(), text: Some("hello".into()), ..Record::default() };
        let chunk = encode_chunk(&[r.clone(), r.clone()], 42);
        let (header, payload) = decode_chunk(&chunk).unwrap();
        assert_eq!(header, ChunkHeader { record_count: 2, accepted_at: 42 });
        assert_eq!(akosha_protocol::decode_records(payload, 2).unwrap(), vec![r.clone(), r]);
        for i in 0..chunk.len() {
            let mut bad = chunk.clone();
            bad[i] ^= 0x10;
            assert!(decode_chunk(&bad).is_err(), "flip at {i} undetected");
        }
        assert_eq!(decode_chunk(&chunk[..3]), Err(ChunkError::TooShort(3)));
    }
}
