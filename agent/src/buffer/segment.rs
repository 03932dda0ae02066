//! Segment files: where the buffer's chunks live on disk.
//!
//! A segment is an append-only file `segments/<first seq, 20 digits>.log` holding frames back to back:
//!
//! ```text
//!  frame:  u64 seq │ u32 len │ u32 crc32c(seq ‖ len) │ chunk[len]      (little-endian; the chunk has its own CRC)
//! ```
//!
//! The frame header has its own checksum so that a damaged length is never trusted: a scan stops at the first
//! header that does not verify, because nothing after it can be located. A chunk whose header verifies but whose
//! body does not is skipped on its own. The name of a segment is a lower bound for every sequence number written
//! to it, which is how the next sequence number survives even when every chunk has been acknowledged.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub(crate) const FRAME_HEADER_LEN: usize = 8 + 4 + 4;

/// Builds a frame in place: `frame` holds [`FRAME_HEADER_LEN`] reserved bytes followed by the chunk.
pub(crate) fn seal_frame(frame: &mut [u8], seq: u64) {
    let len = (frame.len() - FRAME_HEADER_LEN) as u32;
    frame[..8].copy_from_slice(&seq.to_le_bytes());
    frame[8..12].copy_from_slice(&len.to_le_bytes());
    let crc = crc32c::crc32c(&frame[..12]);
    frame[12..16].copy_from_slice(&crc.to_le_bytes());
}

/// A verified frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameHeader {
    pub(crate) seq: u64,
    pub(crate) len: u32,
}

fn parse_header(bytes: &[u8; FRAME_HEADER_LEN]) -> Option<FrameHeader> {
    let stored = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
    if crc32c::crc32c(&bytes[..12]) != stored {
        return None;
    }
    let mut seq = [0; 8];
    seq.copy_from_slice(&bytes[..8]);
    Some(FrameHeader {
        seq: u64::from_le_bytes(seq),
        len: u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]),
    })
}

/// What a scan of a whole segment found.
pub(crate) struct Scan {
    /// Bytes of well-formed frames from the start of the file.
    pub(crate) valid_len: u64,
    /// File size.
    pub(crate) file_len: u64,
}

impl Scan {
    /// Whether something that is not a whole, verified frame follows the valid part.
    pub(crate) fn has_unreadable_tail(&self) -> bool {
        self.valid_len < self.file_len
    }
}

/// Hands every frame of a segment to `visit` (header, offset of the chunk in the file, unverified chunk), in
/// order, up to the first header that fails its checksum or runs past the end of the file. One chunk is in
/// memory at a time, whatever the segment's size.
pub(crate) fn scan(path: &Path, mut visit: impl FnMut(FrameHeader, u64, &[u8])) -> io::Result<Scan> {
    let file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut reader = io::BufReader::with_capacity(1 << 20, file);
    let mut chunk = Vec::new();
    let mut offset = 0u64;
    loop {
        let mut header = [0u8; FRAME_HEADER_LEN];
        if file_len - offset < FRAME_HEADER_LEN as u64 {
            break;
        }
        reader.read_exact(&mut header)?;
        let Some(header) = parse_header(&header) else { break };
        let chunk_offset = offset + FRAME_HEADER_LEN as u64;
        if u64::from(header.len) > file_len - chunk_offset {
            break;
        }
        chunk.resize(header.len as usize, 0);
        reader.read_exact(&mut chunk)?;
        visit(header, chunk_offset, &chunk);
        offset = chunk_offset + u64::from(header.len);
    }
    Ok(Scan { valid_len: offset, file_len })
}

/// The file name of the segment whose sequence numbers start at `first_seq`.
pub(crate) fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.log")
}

/// The segments of a directory by first sequence number, and the files in it that are not segments.
pub(crate) struct Listing {
    pub(crate) segments: Vec<(u64, PathBuf)>,
    pub(crate) strangers: Vec<PathBuf>,
}

/// The segments in `dir`, by first sequence number. Files that are not segments are left alone and reported.
pub(crate) fn list(dir: &Path) -> io::Result<Listing> {
    let mut segments = Vec::new();
    let mut strangers = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let first_seq = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".log"))
            .filter(|n| n.len() == 20)
            .and_then(|n| n.parse::<u64>().ok());
        match first_seq {
            Some(first_seq) => segments.push((first_seq, path)),
            None => strangers.push(path),
        }
    }
    segments.sort_unstable_by_key(|(first_seq, _)| *first_seq);
    Ok(Listing { segments, strangers })
}

/// Makes a new or removed directory entry durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates an empty segment and makes its directory entry durable, so that an append synced into it survives.
pub(crate) fn create(dir: &Path, first_seq: u64) -> io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(segment_name(first_seq)))?;
    file.sync_all()?;
    sync_dir(dir)?;
    Ok(file)
}

/// Writes `bytes` at `offset`; on failure, cuts the file back to `offset` so that a half-written frame is
/// not followed by later ones.
pub(crate) fn write_at(file: &File, bytes: &[u8], offset: u64) -> io::Result<()> {
    file.write_all_at(bytes, offset).inspect_err(|_| {
        let _ = file.set_len(offset);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u64, body: &[u8]) -> Vec<u8> {
        let mut frame = vec![0; FRAME_HEADER_LEN];
        frame.extend_from_slice(body);
        seal_frame(&mut frame, seq);
        frame
    }

    #[test]
    fn scan_stops_at_a_torn_or_damaged_header_and_reports_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(segment_name(7));
        let mut bytes = frame(7, b"first");
        bytes.extend(frame(9, b"second chunk"));
        let whole = bytes.len() as u64;
        std::fs::write(&path, &bytes).unwrap();
        let mut frames = Vec::new();
        let found = scan(&path, |header, _, chunk| frames.push((header.seq, chunk.to_vec()))).unwrap();
        assert_eq!(frames.iter().map(|f| f.0).collect::<Vec<_>>(), vec![7, 9]);
        assert_eq!(frames[1].1, b"second chunk");
        assert_eq!((found.valid_len, found.file_len), (whole, whole));
        assert!(!found.has_unreadable_tail());

        // A write cut short: the header is whole but its chunk is not.
        let mut torn = bytes.clone();
        torn.extend(&frame(11, b"third")[..FRAME_HEADER_LEN + 2]);
        std::fs::write(&path, &torn).unwrap();
        let mut count = 0;
        let found = scan(&path, |_, _, _| count += 1).unwrap();
        assert_eq!((count, found.valid_len, found.has_unreadable_tail()), (2, whole, true));

        // A damaged length in the first header: nothing can be located.
        let mut damaged = bytes.clone();
        damaged[9] ^= 0x40;
        std::fs::write(&path, &damaged).unwrap();
        let mut count = 0;
        let found = scan(&path, |_, _, _| count += 1).unwrap();
        assert_eq!((count, found.valid_len), (0, 0));
    }

    #[test]
    fn segments_are_listed_in_order_and_strangers_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        for seq in [300, 2, 41] {
            create(dir.path(), seq).unwrap();
        }
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        let Listing { segments, strangers } = list(dir.path()).unwrap();
        assert_eq!(segments.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![2, 41, 300]);
        assert_eq!(strangers, vec![dir.path().join("notes.txt")]);
    }
}
