//! # Durable-log file I/O
//!
//! [`AppendFile`]: the file a durable log appends to (the aggregator's WAL segments, the agent buffer's
//! segments), written with direct I/O where the filesystem allows it.
//!
//! Why: a buffered `write` copies every logged byte into freshly allocated page-cache pages (allocate, zero,
//! copy, account dirty, write back later). The transport profile showed that copy as a quarter of the
//! aggregator's CPU while receiving, and an append followed by `fdatasync` through the page cache reached about
//! half the disk bandwidth that direct appends reach on the same disk. A log that is read only after a restart
//! gains nothing from caching what it writes. With `O_DIRECT` the device reads the bytes straight from our
//! buffer.
//!
//! A log that is read back soon after it is written must keep its own copy of what it wrote: nothing is left in
//! the page cache, so a read goes to the disk (the agent buffer's first try at direct writes had its sender
//! wait for those reads; the buffer now keeps recent chunks in memory for the sender).
//!
//! Direct I/O needs the file offset, the length and the memory of every write aligned to the device's logical
//! block. Each group is therefore written from the start of the block holding the end of the log: the bytes of
//! that partial block (kept in memory as `tail`), the new entries, and zeros up to the next block boundary. The
//! file can thus end in less than a block of zero padding after the last entry, which a reader must take for
//! the end of the log ([`is_padding`]); [`AppendFile::trim`] cuts it when the file is left for good. Rewriting
//! the partial block is what the page cache does for a buffered append as well: the block's earlier bytes are
//! written again unchanged, so a write torn at a sector leaves them as they were.
//!
//! Where `O_DIRECT` is refused (some filesystems, older tmpfs) the file is written through the page cache with
//! plain appends at the end of the log, no padding.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::debug;

/// Alignment of direct writes: a multiple of the logical block size of any disk (512 B or 4 KiB).
pub const BLOCK: usize = 4096;

/// A file appended to at its end, one write per append; durable once the caller syncs [`AppendFile::file`].
pub struct AppendFile {
    file: Arc<File>,
    path: PathBuf,
    /// Bytes of log in the file (the file may be longer: padding, a trailer, earlier bytes of a reused file).
    len: u64,
    /// The furthest byte written so far (or the file size at open, if larger).
    end: u64,
    /// The log's bytes from the last block boundary at or before `len` up to `len`.
    tail: Vec<u8>,
    direct: bool,
    /// Where a group is assembled; its allocation is reused from group to group.
    staging: Vec<u8>,
}

impl AppendFile {
    /// Opens an existing file for appending at its end, which must be the end of its log (recovery cuts off
    /// what follows, padding included).
    pub fn open(path: &Path) -> io::Result<AppendFile> {
        Self::open_with(path, true)
    }

    /// [`AppendFile::open`], through the page cache if `direct` is false (what a filesystem that refuses
    /// `O_DIRECT` gets; also how the tests exercise that path on any filesystem).
    pub fn open_with(path: &Path, direct: bool) -> io::Result<AppendFile> {
        let len = std::fs::metadata(path)?.len();
        Self::open_at(path, len, direct)
    }

    /// Opens an existing file whose log ends at `len`, for appending there; whatever the file holds after `len`
    /// (a reused file's earlier life) is overwritten by the appends.
    pub fn open_at(path: &Path, len: u64, direct: bool) -> io::Result<AppendFile> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let size = file.metadata()?.len();
        if size < len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} holds {size} bytes, less than its log's {len}", path.display()),
            ));
        }
        let boundary = block_floor(len);
        let mut tail = vec![0; (len - boundary) as usize];
        file.read_exact_at(&mut tail, boundary)?;
        let append_file = |file, direct| AppendFile {
            file: Arc::new(file),
            path: path.to_owned(),
            len,
            end: size,
            tail,
            direct,
            staging: Vec::new(),
        };
        if !direct {
            return Ok(append_file(file, false));
        }
        match OpenOptions::new().write(true).custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32).open(path) {
            Ok(direct) => Ok(append_file(direct, true)),
            Err(e) => {
                debug!(message = "Direct I/O refused; the log goes through the page cache.", path = %path.display(), error = %e);
                Ok(append_file(file, false))
            }
        }
    }

    /// Appends `data` with one write. Not durable until the file is synced.
    pub fn append(&mut self, data: &[u8]) -> io::Result<()> {
        self.append_with(data.len(), |out| out.extend_from_slice(data))
    }

    /// Appends what `fill` writes into the vector it is given (exactly `bytes` bytes) with one write, so that a
    /// caller can encode straight into the write buffer. Not durable until the file is synced. On failure the
    /// file is cut back to the end of the log, so that a half-written append is never followed by later ones.
    pub fn append_with(&mut self, bytes: usize, fill: impl FnOnce(&mut Vec<u8>)) -> io::Result<()> {
        self.append_marked(bytes, fill, &[])
    }

    /// [`AppendFile::append_with`], with `trailer` written right after the appended bytes in the same write but
    /// left out of the log: the next append overwrites it (an end marker, for a reader of a file whose earlier
    /// bytes follow the log).
    pub fn append_marked(&mut self, bytes: usize, fill: impl FnOnce(&mut Vec<u8>), trailer: &[u8]) -> io::Result<()> {
        let written = self.write_group(bytes, fill, trailer);
        if written.is_err() && self.file.set_len(self.len).is_ok() {
            self.end = self.len;
        }
        written
    }

    fn write_group(&mut self, bytes: usize, fill: impl FnOnce(&mut Vec<u8>), trailer: &[u8]) -> io::Result<()> {
        let base = block_floor(self.len);
        // Room for the alignment slack, the partial block, the new bytes, the trailer and the padding: the vector
        // must not grow while it is filled, or it would move and lose its alignment.
        let needed = BLOCK + self.tail.len() + bytes + trailer.len() + BLOCK;
        if self.staging.capacity() < needed {
            self.staging = Vec::with_capacity(needed.next_power_of_two());
        }
        self.staging.clear();
        let start = self.staging.as_ptr().align_offset(BLOCK).min(BLOCK);
        self.staging.resize(start, 0);
        self.staging.extend_from_slice(&self.tail);
        let from = self.staging.len();
        fill(&mut self.staging);
        let end = self.staging.len();
        let added = end - from;
        debug_assert_eq!(added, bytes, "`fill` must write exactly the announced bytes");
        self.staging.extend_from_slice(trailer);
        let written_to = self.staging.len();
        if self.direct {
            self.staging.resize(start + (written_to - start).next_multiple_of(BLOCK), 0);
            let aligned = (self.staging.as_ptr() as usize + start).is_multiple_of(BLOCK);
            let written = if aligned {
                self.file.write_all_at(&self.staging[start..], base)
            } else {
                Err(io::Error::from(io::ErrorKind::InvalidInput))
            };
            match written {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                    // The filesystem took the flag but not the write (or the buffer moved): go through the page
                    // cache from here on. The failed write may have left anything after `len`; rewriting from
                    // `len` covers exactly that.
                    debug!(message = "Direct write refused; the write-ahead log goes through the page cache.", path = %self.path.display(), error = %e);
                    self.file = Arc::new(OpenOptions::new().write(true).open(&self.path)?);
                    self.direct = false;
                    self.file.write_all_at(&self.staging[from..written_to], self.len)?;
                }
                Err(e) => return Err(e),
            }
        } else {
            self.file.write_all_at(&self.staging[from..written_to], self.len)?;
        }
        let physical = if self.direct { (self.staging.len() - start) as u64 } else { (written_to - start) as u64 };
        self.end = self.end.max(base + physical);
        self.len += added as u64;
        let boundary = block_floor(self.len);
        let tail_from = start + (boundary - base) as usize;
        let tail_to = start + (self.len - base) as usize;
        self.tail.clear();
        self.tail.extend_from_slice(&self.staging[tail_from..tail_to]);
        Ok(())
    }

    /// Cuts the zero padding after the log (before the file is left for good).
    pub fn trim(&self) -> io::Result<()> {
        if self.direct { self.file.set_len(self.len) } else { Ok(()) }
    }

    /// Bytes of log in the file.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// How far the file reaches: the furthest byte written, or its size at open if larger (until a `trim`).
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The file, for syncing (`fdatasync` on any handle of the file makes these writes durable).
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether writes bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }
}

/// Asks the kernel to start reading `len` bytes of `file` from `offset` into the page cache in the background
/// (`posix_fadvise(WILLNEED)`), so that the reads that follow find them there: what direct writes left behind is
/// not cached, and the kernel's own readahead for a reader of whole chunks is a fraction of a chunk. A hint only;
/// a filesystem that ignores it costs nothing.
pub fn prefetch(file: &File, offset: u64, len: u64) {
    let _ = rustix::fs::fadvise(file, offset, std::num::NonZeroU64::new(len), rustix::fs::Advice::WillNeed);
}

/// Whether `rest` (what follows the last whole entry of a log) is only the zero padding of direct appends: the
/// end of the log, not a torn or damaged write.
pub fn is_padding(rest: &[u8]) -> bool {
    rest.len() < BLOCK && rest.iter().all(|b| *b == 0)
}

fn block_floor(offset: u64) -> u64 {
    offset - offset % BLOCK as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_of_every_size_read_back_as_one_log_and_trim_cuts_the_padding() {
        appends_read_back(true);
    }

    #[test]
    fn through_the_page_cache_the_same_appends_read_back_with_no_padding() {
        appends_read_back(false);
    }

    fn appends_read_back(direct: bool) {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("segment");
        std::fs::write(&path, b"MAGIC").expect("create");
        let mut expected = b"MAGIC".to_vec();
        let mut segment = AppendFile::open_with(&path, direct).expect("open");
        assert!(direct || !segment.is_direct());
        for (i, size) in [1usize, 4090, 4096, 5, 10_000, 0, 3, 8191, 8192, 70_001].into_iter().enumerate() {
            let chunk: Vec<u8> = (0..size).map(|j| (i * 31 + j) as u8 | 1).collect();
            segment.append(&chunk).expect("append");
            expected.extend_from_slice(&chunk);
            assert_eq!(segment.len(), expected.len() as u64);
            let on_disk = std::fs::read(&path).expect("read");
            assert_eq!(&on_disk[..expected.len()], &expected[..], "after append {i}");
            assert!(is_padding(&on_disk[expected.len()..]), "only padding after the log");
            if !segment.is_direct() {
                assert_eq!(on_disk.len(), expected.len(), "page-cache appends leave no padding");
            }
        }
        segment.trim().expect("trim");
        assert_eq!(std::fs::read(&path).expect("read"), expected);
    }

    #[test]
    fn a_reused_file_is_appended_from_the_given_length_and_the_trailer_is_overwritten_by_the_next_append() {
        for direct in [true, false] {
            let dir = tempfile::tempdir().expect("dir");
            let path = dir.path().join("segment");
            // An earlier life: 10,000 bytes of 0xee; the new log is 5 bytes long.
            let mut earlier = vec![0xee; 10_000];
            earlier[..5].copy_from_slice(b"HELLO");
            std::fs::write(&path, &earlier).expect("create");
            let mut segment = AppendFile::open_at(&path, 5, direct).expect("open");
            assert_eq!((segment.len(), segment.end()), (5, 10_000));
            segment.append_marked(3, |out| out.extend_from_slice(b"abc"), b"END").expect("append");
            assert_eq!(segment.len(), 8);
            let on_disk = std::fs::read(&path).expect("read");
            assert_eq!(&on_disk[..11], b"HELLOabcEND");
            if segment.is_direct() {
                assert!(on_disk[11..BLOCK].iter().all(|b| *b == 0), "padding to the block boundary");
                assert!(on_disk[BLOCK..].iter().all(|b| *b == 0xee), "the earlier life beyond it untouched");
            } else {
                assert!(on_disk[11..].iter().all(|b| *b == 0xee));
            }
            segment.append_marked(5000, |out| out.extend_from_slice(&[7; 5000]), b"END").expect("append");
            let on_disk = std::fs::read(&path).expect("read");
            assert_eq!(&on_disk[..8], b"HELLOabc");
            assert!(on_disk[8..5008].iter().all(|b| *b == 7), "the trailer was overwritten");
            assert_eq!(&on_disk[5008..5011], b"END");
            assert_eq!(segment.end(), 10_000, "the earlier life still ends the file");
            segment.append(&[9; 6000]).expect("append past the end");
            assert_eq!(segment.end(), if segment.is_direct() { 12_288 } else { 11_008 });
            assert!(AppendFile::open_at(&path, 20_000, direct).is_err(), "a log longer than its file");
        }
    }

    #[test]
    fn padding_is_only_short_runs_of_zeros() {
        assert!(is_padding(&[]));
        assert!(is_padding(&[0; BLOCK - 1]));
        assert!(!is_padding(&[0; BLOCK]));
        assert!(!is_padding(&[0, 0, 1]));
    }

    #[test]
    fn reopening_continues_after_the_last_byte_of_the_log() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("segment");
        std::fs::write(&path, b"M").expect("create");
        let mut segment = AppendFile::open(&path).expect("open");
        segment.append(&[7; 5000]).expect("append");
        segment.trim().expect("trim");
        drop(segment);
        let mut segment = AppendFile::open(&path).expect("reopen");
        assert_eq!(segment.len(), 5001);
        segment.append_with(3, |out| out.extend_from_slice(b"abc")).expect("append");
        segment.trim().expect("trim");
        let data = std::fs::read(&path).expect("read");
        assert_eq!(data.len(), 5004);
        assert_eq!(&data[5001..], b"abc");
        assert!(data[1..5001].iter().all(|b| *b == 7));
    }
}
