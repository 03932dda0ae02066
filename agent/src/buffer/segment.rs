//! Segment files: where the buffer's chunks live on disk.
//!
//! A segment is a file `segments/<first seq, 20 digits>.log` holding frames back to back, each write followed
//! by an end marker that the next write overwrites (and, since writes are direct I/O, by zeros up to the next
//! 4 KiB boundary):
//!
//! ```text
//!  frame:  u64 seq │ u32 len │ u32 crc32c(seq ‖ len) │ chunk[len]      (little-endian; the chunk has its own CRC)
//!  end:    16 zero bytes
//! ```
//!
//! The frame header has its own checksum so that a damaged length is never trusted: a scan stops at the first
//! header that does not verify, because nothing after it can be located. A chunk whose header verifies but whose
//! body does not is skipped on its own. The name of a segment is a lower bound for every sequence number written
//! to it, which is how the next sequence number survives even when every chunk has been acknowledged.
//!
//! A spent segment may be kept as a spare (`<old first seq>.spare`) and renamed into a later segment, as
//! PostgreSQL recycles its WAL files: overwriting blocks a file already owns needs no block allocation, so its
//! `fdatasync` is a data write, not a journal commit (measured here: overwriting ran at twice the speed of
//! appending, above `dd`). A recycled file still holds the frames of its earlier life after the write position;
//! they are recognised by the end marker in front of them, or by a sequence number below the segment's name,
//! since every frame written before the rename had a lower one.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub(crate) const FRAME_HEADER_LEN: usize = 8 + 4 + 4;
/// Written after every append (and overwritten by the next): where the frames of this segment end.
pub(crate) const END_MARKER: [u8; FRAME_HEADER_LEN] = [0; FRAME_HEADER_LEN];

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

/// Why a scan stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScanEnd {
    /// At the end of the file.
    EndOfFile,
    /// At an end marker, or at a frame from a recycled file's earlier life: the clean end of this segment.
    Marker,
    /// At a header that does not verify or a frame that runs past the end of the file: a write cut short, or
    /// damage.
    Unreadable,
}

/// What a scan of a whole segment found.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scan {
    /// Bytes of well-formed frames from the start of the file.
    pub(crate) valid_len: u64,
    /// File size.
    pub(crate) file_len: u64,
    /// Why the scan stopped at `valid_len`.
    pub(crate) end: ScanEnd,
}

/// Hands every frame of the segment whose sequence numbers start at `first_seq` to `visit` (header, offset of
/// the chunk in the file, unverified chunk), in order, up to its end (see [`ScanEnd`]). One chunk is in memory
/// at a time, whatever the segment's size.
pub(crate) fn scan(path: &Path, first_seq: u64, mut visit: impl FnMut(FrameHeader, u64, &[u8])) -> io::Result<Scan> {
    let file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut reader = io::BufReader::with_capacity(1 << 20, file);
    let mut chunk = Vec::new();
    let mut offset = 0u64;
    let end = loop {
        let mut header = [0u8; FRAME_HEADER_LEN];
        let remaining = file_len - offset;
        if remaining < FRAME_HEADER_LEN as u64 {
            reader.read_exact(&mut header[..remaining as usize])?;
            break if remaining == 0 {
                ScanEnd::EndOfFile
            } else if header[..remaining as usize].iter().all(|b| *b == 0) {
                ScanEnd::Marker
            } else {
                ScanEnd::Unreadable
            };
        }
        reader.read_exact(&mut header)?;
        if header == END_MARKER {
            break ScanEnd::Marker;
        }
        let Some(header) = parse_header(&header) else { break ScanEnd::Unreadable };
        if header.seq < first_seq {
            break ScanEnd::Marker;
        }
        let chunk_offset = offset + FRAME_HEADER_LEN as u64;
        if u64::from(header.len) > file_len - chunk_offset {
            break ScanEnd::Unreadable;
        }
        chunk.resize(header.len as usize, 0);
        reader.read_exact(&mut chunk)?;
        visit(header, chunk_offset, &chunk);
        offset = chunk_offset + u64::from(header.len);
    };
    Ok(Scan { valid_len: offset, file_len, end })
}

impl Scan {
    /// Whether a segment that is not the newest lost frames: its scan stopped inside the file (at something
    /// unreadable, or at zeros or an older frame where damage wiped a frame) before `end_seq` (the sequence
    /// number after its last frame) reached the first one of the segment after it. Whatever follows a segment's
    /// last frame is a recycled file's earlier life, not damage. A file that simply ends early was cut by the
    /// filesystem after a crash, before its last writes were synced (and accepted).
    pub(crate) fn lost_frames(&self, end_seq: u64, successor_first: u64) -> bool {
        self.end != ScanEnd::EndOfFile && end_seq < successor_first
    }
}

/// The file name of the segment whose sequence numbers start at `first_seq`.
pub(crate) fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.log")
}

/// The file name a spent segment keeps while it waits to be recycled.
pub(crate) fn spare_name(first_seq: u64) -> String {
    format!("{first_seq:020}.spare")
}

/// A spent segment kept for recycling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Spare {
    pub(crate) path: PathBuf,
    /// File size: the blocks it brings.
    pub(crate) bytes: u64,
}

/// The segments of a directory by first sequence number, the spares, and the files in it that are neither.
pub(crate) struct Listing {
    pub(crate) segments: Vec<(u64, PathBuf)>,
    pub(crate) spares: Vec<Spare>,
    pub(crate) strangers: Vec<PathBuf>,
}

/// The segments in `dir`, by first sequence number, and its spares. Other files are left alone and reported.
pub(crate) fn list(dir: &Path) -> io::Result<Listing> {
    let mut listing = Listing { segments: Vec::new(), spares: Vec::new(), strangers: Vec::new() };
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let numbered =
            |suffix: &str| name.strip_suffix(suffix).filter(|n| n.len() == 20).and_then(|n| n.parse::<u64>().ok());
        if let Some(first_seq) = numbered(".log") {
            listing.segments.push((first_seq, path));
        } else if numbered(".spare").is_some() {
            listing.spares.push(Spare { bytes: entry.metadata()?.len(), path });
        } else {
            listing.strangers.push(path);
        }
    }
    listing.segments.sort_unstable_by_key(|(first_seq, _)| *first_seq);
    Ok(listing)
}

/// Makes a new or removed directory entry durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates the segment whose sequence numbers start at `first_seq` — by renaming `spare` if one is given and
/// no segment of that name exists, else as an empty file. Returns the file and its size (a recycled file's
/// earlier bytes). The caller syncs the directory before anything written to the segment counts as durable.
pub(crate) fn create(dir: &Path, first_seq: u64, spare: Option<&Spare>) -> io::Result<(File, u64)> {
    let path = dir.join(segment_name(first_seq));
    if let Some(spare) = spare
        && !path.exists()
    {
        std::fs::rename(&spare.path, &path)?;
    }
    let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
    let bytes = file.metadata()?.len();
    Ok((file, bytes))
}

/// Keeps a spent segment as a spare (renamed so that no scan reads it), or deletes it when `keep` is false.
/// The caller syncs the directory.
pub(crate) fn retire(dir: &Path, first_seq: u64, keep: bool) -> io::Result<Option<Spare>> {
    let path = dir.join(segment_name(first_seq));
    let result = if keep {
        let spare = dir.join(spare_name(first_seq));
        std::fs::rename(&path, &spare)
            .and_then(|()| Ok(Some(Spare { bytes: std::fs::metadata(&spare)?.len(), path: spare })))
    } else {
        std::fs::remove_file(&path).map(|()| None)
    };
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        other => other,
    }
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
        let found = scan(&path, 7, |header, _, chunk| frames.push((header.seq, chunk.to_vec()))).unwrap();
        assert_eq!(frames.iter().map(|f| f.0).collect::<Vec<_>>(), vec![7, 9]);
        assert_eq!(frames[1].1, b"second chunk");
        assert_eq!((found.valid_len, found.file_len, found.end), (whole, whole, ScanEnd::EndOfFile));

        // A write cut short: the header is whole but its chunk is not.
        let mut torn = bytes.clone();
        torn.extend(&frame(11, b"third")[..FRAME_HEADER_LEN + 2]);
        std::fs::write(&path, &torn).unwrap();
        let mut count = 0;
        let found = scan(&path, 7, |_, _, _| count += 1).unwrap();
        assert_eq!((count, found.valid_len, found.end), (2, whole, ScanEnd::Unreadable));

        // A header cut short.
        let mut torn = bytes.clone();
        torn.extend(&frame(11, b"third")[..5]);
        std::fs::write(&path, &torn).unwrap();
        let found = scan(&path, 7, |_, _, _| {}).unwrap();
        assert_eq!((found.valid_len, found.end), (whole, ScanEnd::Unreadable));

        // A damaged length in the first header: nothing can be located.
        let mut damaged = bytes.clone();
        damaged[9] ^= 0x40;
        std::fs::write(&path, &damaged).unwrap();
        let mut count = 0;
        let found = scan(&path, 7, |_, _, _| count += 1).unwrap();
        assert_eq!((count, found.valid_len, found.end), (0, 0, ScanEnd::Unreadable));
    }

    #[test]
    fn an_end_marker_or_an_older_frame_ends_a_recycled_segment_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(segment_name(100));
        // The file's earlier life: frames 1 and 2, longer than what the new life wrote so far.
        let mut earlier = frame(1, &[0xaa; 40]);
        earlier.extend(frame(2, &[0xbb; 40]));
        let current = frame(100, b"new");

        // The new life's append with its end marker over the start of the old bytes.
        let mut bytes = earlier.clone();
        let mut append = current.clone();
        append.extend(END_MARKER);
        bytes[..append.len()].copy_from_slice(&append);
        std::fs::write(&path, &bytes).unwrap();
        let mut seqs = Vec::new();
        let found = scan(&path, 100, |h, _, _| seqs.push(h.seq)).unwrap();
        assert_eq!((seqs, found.valid_len, found.end), (vec![100], current.len() as u64, ScanEnd::Marker));

        // Without the marker (lost in a crash), an older frame right behind ends it too...
        let mut bytes = current.clone();
        bytes.extend(&earlier);
        std::fs::write(&path, &bytes).unwrap();
        let found = scan(&path, 100, |_, _, _| {}).unwrap();
        assert_eq!((found.valid_len, found.end), (current.len() as u64, ScanEnd::Marker));

        // ...and the middle of an older frame is unreadable, which only the newest segment may shrug off, or an
        // older one whose frames reach its successor.
        let mut bytes = current.clone();
        bytes.extend(&earlier[7..]);
        std::fs::write(&path, &bytes).unwrap();
        let found = scan(&path, 100, |_, _, _| {}).unwrap();
        assert_eq!((found.valid_len, found.end), (current.len() as u64, ScanEnd::Unreadable));
        assert!(!found.lost_frames(101, 101));
        assert!(found.lost_frames(101, 105));
        // Zeros or an older frame where the next frame should be lost frames just the same; a file that ends
        // early does not (its missing writes were never synced).
        assert!(Scan { end: ScanEnd::Marker, ..found }.lost_frames(101, 105));
        assert!(!Scan { end: ScanEnd::Marker, ..found }.lost_frames(101, 101));
        assert!(!Scan { end: ScanEnd::EndOfFile, ..found }.lost_frames(101, 105));
    }

    #[test]
    fn segments_and_spares_are_listed_and_strangers_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        for seq in [300, 2, 41] {
            create(dir.path(), seq, None).unwrap();
        }
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        std::fs::write(dir.path().join(segment_name(2)), b"abcdef").unwrap();
        assert_eq!(retire(dir.path(), 2, true).unwrap().map(|s| s.bytes), Some(6));
        assert_eq!(retire(dir.path(), 41, false).unwrap(), None);
        assert_eq!(retire(dir.path(), 41, true).unwrap(), None, "already gone");
        let Listing { segments, spares, strangers } = list(dir.path()).unwrap();
        assert_eq!(segments.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![300]);
        assert_eq!(spares, vec![Spare { path: dir.path().join(spare_name(2)), bytes: 6 }]);
        assert_eq!(strangers, vec![dir.path().join("notes.txt")]);

        // A spare becomes the next segment with its bytes; an existing segment is never replaced by one.
        let (_, bytes) = create(dir.path(), 500, Some(&spares[0])).unwrap();
        assert_eq!(bytes, 6);
        assert_eq!(std::fs::read(dir.path().join(segment_name(500))).unwrap(), b"abcdef");
        let listing = list(dir.path()).unwrap();
        assert!(listing.spares.is_empty());
        std::fs::write(dir.path().join(spare_name(9)), b"zz").unwrap();
        let spare = Spare { path: dir.path().join(spare_name(9)), bytes: 2 };
        let (_, bytes) = create(dir.path(), 500, Some(&spare)).unwrap();
        assert_eq!(bytes, 6);
        assert!(spare.path.exists());
    }
}
