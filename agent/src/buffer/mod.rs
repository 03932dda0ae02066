//! # The agent's durable buffer
//!
//! Records accepted from a source live here until the aggregator has acknowledged them; one buffer per
//! destination. Chunks of records are appended to segment files of our own; a sled database beside them holds
//! the little state that changes in place:
//!
//! ```text
//!  <dir>/segments/<first seq>.log   frames: u64 seq │ u32 len │ u32 crc32c(seq ‖ len) │ chunk, then an end
//!                                   marker and zeros to the block boundary   (see segment.rs)
//!  <dir>/segments/<old seq>.spare   spent segments kept for recycling (`spare_segments`)
//!  <dir>/db (sled)   meta:    "epoch" → u64   random identity of this buffer, sent in the handshake
//!                    removed: seq → ()        chunks that left the buffer while their segment is still on disk
//!                    dead:    seq → chunk     batches the aggregator rejected for good (for `buffer inspect`)
//!
//!  chunk:   u8 format=1 │ u32 crc32c(rest) │ u32 record_count │ i64 accepted_at_us │ records (protocol codec)
//! ```
//!
//! Every record gets a sequence number; a chunk holds consecutive ones, so its frame's seq plus its count gives
//! its range. A chunk is the unit of everything: appending (one source call → one or more chunks of at most
//! `max_chunk_bytes`), sending (a batch is one or more whole chunks), acknowledging, dropping and
//! dead-lettering. An in-memory index of the chunks (sequence, count, size, age, segment and offset, in-flight
//! flag) answers every question without touching the disk, and is rebuilt at open by reading and verifying every
//! segment.
//!
//! ## Writing
//! A source's records are encoded into sealed frames on its own task, numbered and queued under the state lock,
//! and written by one writer at a time: the appender that found nobody writing takes the whole queue on a
//! blocking-pool thread, writes it into the active segment with one direct-I/O write (`akosha_fsio`, the file's
//! last partial block rewritten from memory), syncs, indexes the chunks and answers every appender of that
//! round; appends queued meanwhile form the next round. Under load the disk therefore sees few large writes
//! each followed by one `fdatasync` (group commit), the way `dd` writes; `always` writes and syncs one append per
//! round, `interval` leaves the sync to a timer. Direct I/O skips the page cache, so the sender would read every
//! chunk back from the disk: the chunks just written stay in memory (up to [`CACHE_BYTES`]) until the sender
//! takes them, and the disk is read only when it has fallen further behind or after a restart.
//!
//! Why not values in sled, as the first version did: sled copies every value through its own log buffers and
//! I/O threads and then needs an extra `fdatasync` of its files (its flush uses `sync_file_range`); that capped
//! durable ingest at ~10–30 % of the disk's sequential bandwidth. Why not buffered writes, as the next version
//! did: copying into the page cache, writing it back and reading it again for the sender took more CPU than
//! encoding, and on two cores that capped ingest near 1 GB/s whatever the disk could do. Spent segments are
//! recycled rather than deleted, up to `spare_segments`: a group commit into blocks the file already owns syncs
//! data only, where one that grows a file also commits the filesystem journal.
//!
//! ## Invariants
//! - A chunk is durable (per the fsync policy) before [`Buffer::append`] returns; that return is what a source
//!   reports to its client as "accepted". A new segment's directory entry is synced before anything is written
//!   to it.
//! - A chunk leaves the buffer only when the aggregator acknowledged its batch, when `drop_oldest` evicts it
//!   (counted and logged), when it is dead-lettered after a permanent rejection, or when it is corrupt. Leaving
//!   is recorded in `removed`; a segment whose chunks have all left is deleted or kept as a spare (never the
//!   active one), and its `removed` keys go. A segment is recycled only if no reader or sync holds its file.
//! - `removed` is flushed lazily: after a crash an acknowledged chunk may be sent again. In-flight marks live
//!   only in memory, so after a restart every chunk is pending again too. The aggregator deduplicates, so
//!   at-least-once here becomes exactly-once in storage.
//! - The active segment is named after the next sequence number when it is created and is never deleted, so
//!   sequence numbers never go back, even when every chunk has been acknowledged.
//! - `bytes` counts stored chunk sizes and is what `max_bytes` limits; segment framing, space held by
//!   acknowledged chunks until their segment goes, and sled are reported apart (`disk_bytes`).
//!
//! ## Recovery
//! A chunk whose checksum fails or whose format is unknown is skipped, recorded as removed, counted in
//! `corrupted_chunks` and logged with its sequence number — except the last frame of the newest segment: a
//! direct write is padded to a whole block, so a write cut short by a crash leaves a whole header and a chunk
//! that does not verify rather than a short file; that frame is cut off with a warning (it was never accepted)
//! and its sequence numbers are not handed out again. A frame header that does not verify ends the scan of
//! its segment: at the end of the newest segment that is a write cut short by a crash (never acknowledged, so
//! nothing accepted is lost) and the file is cut back to its last whole frame. An end marker, or a frame
//! numbered below its segment's name (a recycled file's earlier life), ends a segment too. An older segment whose
//! frames stop inside the file before the next segment's first sequence number is counted as corruption,
//! whatever stopped them; bytes after frames that do reach it are a recycled file's earlier life. The agent never refuses to start because of a bad chunk: losing one chunk is bad, a crash loop
//! that loses everything that arrives afterwards is worse. Buffers written by the sled-only version (chunks in
//! a `chunks` tree) are moved into a segment at the first open.

mod chunk;
mod segment;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak, mpsc};
use std::time::Duration;

use akosha_fsio::AppendFile;
use akosha_protocol::Record;
use tokio::sync::{Notify, oneshot};
use tracing::{error, warn};

pub(crate) use chunk::{ChunkError, append_chunk, decode_chunk};
use segment::FRAME_HEADER_LEN;
/// What happens when a record does not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// The source is told to retry later (HTTP 503 with Retry-After); nothing is lost.
    Block,
    /// The oldest chunks are evicted to make room; every evicted record is counted and logged.
    DropOldest,
}

/// When appended chunks are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// One fsync for every append, before it returns.
    Always,
    /// Group commit: appends waiting while the previous group is written and synced, or arriving within
    /// `window` of the first, go to the disk in one write and share one fsync, before they return.
    Batch {
        /// How long the writer waits for more appends after the first one.
        window: Duration,
    },
    /// A background flush every interval; appends return before they are durable. A crash or `kill -9`
    /// can lose what was accepted in the last interval.
    Interval(Duration),
}

/// Buffer settings.
#[derive(Debug, Clone)]
pub struct BufferConfig {
    /// Limit on stored chunk bytes.
    pub max_bytes: u64,
    /// What to do when full.
    pub when_full: WhenFull,
    /// Durability of appends.
    pub fsync: FsyncPolicy,
    /// Largest chunk; bigger appends are split.
    pub max_chunk_bytes: usize,
    /// Page cache of the sled database that holds the buffer's metadata.
    pub cache_bytes: u64,
    /// Spent segments kept for recycling (0: delete them). An idle buffer then still holds its active segment
    /// and the spares on disk: up to `1 + spare_segments` segments of `max_bytes / 8` (at most 128 MiB each).
    pub spare_segments: usize,
}

impl Default for BufferConfig {
    fn default() -> Self {
        Self {
            max_bytes: 1 << 30,
            when_full: WhenFull::Block,
            fsync: FsyncPolicy::Batch { window: Duration::ZERO },
            max_chunk_bytes: 1 << 20,
            cache_bytes: 8 << 20,
            spare_segments: 1,
        }
    }
}

/// Errors of buffer operations.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    /// No room (policy `block`); retryable once the sender catches up.
    #[error("buffer is full ({used} of {max} bytes used, {needed} more needed); retry later")]
    Full {
        /// Bytes stored.
        used: u64,
        /// Limit.
        max: u64,
        /// Size of the rejected append.
        needed: u64,
    },
    /// The append alone is larger than the whole buffer; never retryable.
    #[error("{bytes} bytes cannot fit in a buffer of {max} bytes")]
    TooLarge {
        /// Size of the append.
        bytes: u64,
        /// Limit.
        max: u64,
    },
    /// The storage failed; the append was not accepted.
    #[error("buffer storage at {path} failed: {source}")]
    Storage {
        /// Buffer directory.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// The writer is gone (the buffer is shutting down).
    #[error("buffer is closed")]
    Closed,
}

impl BufferError {
    /// Stable label for metrics.
    pub fn error_code(&self) -> &'static str {
        match self {
            BufferError::Full { .. } => "full",
            BufferError::TooLarge { .. } => "too_large",
            BufferError::Storage { .. } => "storage",
            BufferError::Closed => "closed",
        }
    }
}

/// What an append stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendReceipt {
    /// Sequence number of the first record.
    pub first_seq: u64,
    /// Records stored.
    pub records: u64,
    /// Records evicted to make room (`drop_oldest`).
    pub dropped: u64,
}

/// Chunks taken for sending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingBatch {
    /// Keys of the chunks, oldest first.
    pub chunks: Vec<u64>,
    /// Sequence number of the first record.
    pub first_record: u64,
    /// Sequence number of the last record.
    pub last_record: u64,
    /// Records in `payload`.
    pub record_count: u32,
    /// The records, encoded with the protocol codec, uncompressed.
    pub payload: Vec<u8>,
}

/// A snapshot of the buffer's state and counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct BufferStats {
    /// Records waiting for an ack.
    pub records: u64,
    /// Their stored size.
    pub bytes: u64,
    /// Configured limit.
    pub max_bytes: u64,
    /// Chunks waiting for an ack.
    pub chunks: u64,
    /// Chunks sent and not yet acknowledged.
    pub in_flight_chunks: u64,
    /// When the oldest waiting record was accepted (µs since the epoch).
    pub oldest_accepted_at_us: Option<i64>,
    /// Next record sequence number.
    pub next_seq: u64,
    /// Buffer identity.
    pub epoch: u64,
    /// Records appended since start.
    pub appended_records: u64,
    /// Chunk bytes appended since start.
    pub appended_bytes: u64,
    /// Records acknowledged since start.
    pub acked_records: u64,
    /// Records evicted by `drop_oldest` since start.
    pub dropped_records: u64,
    /// Corrupted chunks removed since start (including at open).
    pub corrupted_chunks: u64,
    /// Records in the dead-letter tree.
    pub dead_letter_records: u64,
    /// Bytes the buffer uses on disk (segments and metadata).
    pub disk_bytes: u64,
}

/// What `buffer inspect` reports about a buffer on disk (read without changing anything).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct InspectReport {
    /// Buffer identity.
    pub epoch: u64,
    /// Next record sequence number.
    pub next_seq: u64,
    /// Readable chunks.
    pub chunks: u64,
    /// Records in readable chunks.
    pub records: u64,
    /// Bytes of readable chunks.
    pub bytes: u64,
    /// Chunks that fail their checksum or have an unknown format (removed at the agent's next start).
    pub corrupted_chunks: u64,
    /// Sequence numbers of the oldest and newest waiting records.
    pub seq_range: Option<(u64, u64)>,
    /// Acceptance time of the oldest and newest waiting chunks (µs since the epoch).
    pub accepted_range_us: Option<(i64, i64)>,
    /// Chunks and records in the dead-letter tree.
    pub dead_letter_chunks: u64,
    /// Records in the dead-letter tree.
    pub dead_letter_records: u64,
    /// Bytes the buffer uses on disk (segments and metadata).
    pub disk_bytes: u64,
}

/// Reads a buffer directory without modifying it. The agent that owns it must be stopped (sled holds a lock).
pub fn inspect(path: &Path) -> Result<InspectReport, BufferError> {
    let storage = |source: io::Error| BufferError::Storage { path: path.to_owned(), source };
    if !path.join("db").exists() {
        return Err(storage(io::Error::new(io::ErrorKind::NotFound, "no buffer here")));
    }
    let db =
        open_waiting_for_lock(&sled::Config::new().path(path).segment_size(SLED_SEGMENT_BYTES).cache_capacity(1 << 20))
            .map_err(|e| storage(e.into()))?;
    let trees = Trees::open(&db).map_err(storage)?;
    let mut report = InspectReport {
        epoch: read_u64(&trees.meta, META_EPOCH).map_err(storage)?.unwrap_or(0),
        next_seq: read_u64(&trees.meta, META_NEXT_SEQ).map_err(storage)?.unwrap_or(0),
        disk_bytes: db.size_on_disk().unwrap_or(0),
        ..InspectReport::default()
    };
    let removed = trees.removed_set().map_err(storage)?;
    let count = |seq: u64, chunk: &[u8], report: &mut InspectReport| match decode_chunk(chunk) {
        Ok((header, _)) => {
            let last = seq + u64::from(header.record_count) - 1;
            report.chunks += 1;
            report.records += u64::from(header.record_count);
            report.bytes += chunk.len() as u64;
            report.seq_range = Some(report.seq_range.map_or((seq, last), |(a, b)| (a.min(seq), b.max(last))));
            let t = header.accepted_at;
            report.accepted_range_us = Some(report.accepted_range_us.map_or((t, t), |(a, b)| (a.min(t), b.max(t))));
            report.next_seq = report.next_seq.max(last + 1);
        }
        Err(_) => report.corrupted_chunks += 1,
    };
    let segments_dir = path.join(SEGMENTS_DIR);
    let segment::Listing { segments, spares, .. } = if segments_dir.exists() {
        segment::list(&segments_dir).map_err(storage)?
    } else {
        segment::Listing { segments: Vec::new(), spares: Vec::new(), strangers: Vec::new() }
    };
    report.disk_bytes += spares.iter().map(|s| s.bytes).sum::<u64>();
    for (i, (first, file)) in segments.iter().enumerate() {
        let mut end_seq = *first;
        let scan = segment::scan(file, *first, |header, _, chunk| {
            end_seq = end_seq.max(header.seq + seq_span(chunk));
            if !removed.contains(&header.seq) {
                count(header.seq, chunk, &mut report);
            }
        })
        .map_err(storage)?;
        report.disk_bytes += scan.file_len;
        report.next_seq = report.next_seq.max(end_seq);
        // A cut-short write at the end of the newest segment was never accepted; elsewhere it is damage.
        if segments.get(i + 1).is_some_and(|(successor, _)| scan.lost_frames(end_seq, *successor)) {
            report.corrupted_chunks += 1;
        }
    }
    for entry in trees.legacy_chunks.iter() {
        let (key, value) = entry.map_err(|e| storage(e.into()))?;
        match seq_of_key(&key) {
            Some(seq) => count(seq, &value, &mut report),
            None => report.corrupted_chunks += 1,
        }
    }
    for entry in trees.dead.iter() {
        let (_, value) = entry.map_err(|e| storage(e.into()))?;
        report.dead_letter_chunks += 1;
        if let Ok((header, _)) = decode_chunk(&value) {
            report.dead_letter_records += u64::from(header.record_count);
        }
    }
    Ok(report)
}

/// The durable buffer. Cheap to clone; all clones share one store.
#[derive(Clone)]
pub struct Buffer {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    segments_dir: PathBuf,
    db: sled::Db,
    trees: Trees,
    epoch: u64,
    config: BufferConfig,
    /// The active segment is replaced once it reaches this size.
    segment_bytes: u64,
    state: Mutex<State>,
    space_freed: Notify,
    data_ready: Notify,
    /// What the next sync makes durable; shared with the `interval` policy's sync thread.
    unsynced: Arc<Unsynced>,
    /// That thread (held for its `Drop`, which stops it after a last sync).
    _periodic_sync: Option<Committer>,
    counters: Counters,
}

struct Trees {
    meta: sled::Tree,
    removed: sled::Tree,
    dead: sled::Tree,
    /// Where the sled-only version kept chunks; emptied at open.
    legacy_chunks: sled::Tree,
}

impl Trees {
    fn open(db: &sled::Db) -> io::Result<Trees> {
        Ok(Trees {
            meta: db.open_tree("meta")?,
            removed: db.open_tree("removed")?,
            dead: db.open_tree("dead")?,
            legacy_chunks: db.open_tree("chunks")?,
        })
    }

    fn removed_set(&self) -> io::Result<HashSet<u64>> {
        let mut set = HashSet::new();
        for key in self.removed.iter().keys() {
            set.extend(seq_of_key(&key?));
        }
        Ok(set)
    }
}

type CommitResult = Result<(), Arc<io::Error>>;

/// Handle on the periodic sync thread of the `interval` policy; dropping it syncs what is left, stops and
/// joins the thread.
struct Committer {
    stop: Mutex<Option<mpsc::Sender<()>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.stop.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[derive(Default)]
struct Counters {
    appended: AtomicU64,
    appended_bytes: AtomicU64,
    acked: AtomicU64,
    dropped: AtomicU64,
    corrupted_chunks: AtomicU64,
}

#[derive(Default)]
struct State {
    next_seq: u64,
    index: BTreeMap<u64, ChunkMeta>,
    bytes: u64,
    records: u64,
    dead_records: u64,
    /// By first sequence number; the last one is the active segment.
    segments: BTreeMap<u64, Segment>,
    /// Spent segments waiting to be recycled into new ones.
    spares: Vec<segment::Spare>,
    /// Recently appended chunks not yet taken by the sender, by sequence number: segments are written around
    /// the page cache, so without this copy the sender would read every chunk back from the disk.
    cache: HashMap<u64, CachedChunk>,
    /// Chunk bytes in `cache`, at most [`CACHE_BYTES`].
    cached_bytes: u64,
    /// Appends numbered but not written yet, in sequence order; one appender at a time writes them.
    queue: std::collections::VecDeque<QueuedAppend>,
    /// Chunk bytes in `queue`: they count against `max_bytes` already.
    queued_bytes: u64,
    /// Whether an appender is writing the queue.
    writing: bool,
}

/// Writes the queue when dropped, whether or not the task it was handed to ran.
struct QueueWriter(Buffer);

impl Drop for QueueWriter {
    fn drop(&mut self) {
        self.0.write_queued();
    }
}

/// Should the writer panic, lets the next append write again instead of every later append waiting forever;
/// the appends it held are told the buffer closed (their senders are dropped), none is reported stored.
struct WriterUnwind<'a>(&'a Buffer);

impl Drop for WriterUnwind<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut state = self.0.lock();
            state.writing = false;
            state.queued_bytes = 0;
            state.queue.clear();
        }
    }
}

/// Sealed frames waiting for the writer.
struct QueuedAppend {
    frames: Frames,
    first_seq: u64,
    accepted_at: i64,
    /// Chunk bytes.
    bytes: u64,
    /// Told when the frames are written and, unless the policy is `interval`, synced; or that they failed.
    done: oneshot::Sender<CommitResult>,
}

/// A chunk as it was written: a range of the append's frames.
struct CachedChunk {
    frames: Arc<Vec<u8>>,
    start: usize,
    end: usize,
}

impl CachedChunk {
    fn chunk(&self) -> &[u8] {
        &self.frames[self.start..self.end]
    }
}

struct Segment {
    /// For reading, syncing and telling whether a reader holds the file.
    file: Arc<File>,
    /// Appends go through this (direct I/O); opened at the first append, closed when the segment stops being
    /// the active one.
    writer: Option<AppendFile>,
    /// Bytes of frames (appends go here).
    len: u64,
    /// File size: at least `len`; more in a recycled file, whose earlier bytes follow.
    allocated: u64,
    /// Chunks in the index that live in this segment.
    live: u64,
}

impl Segment {
    fn new(file: File, len: u64, allocated: u64) -> Segment {
        Segment { file: Arc::new(file), writer: None, len, allocated: allocated.max(len), live: 0 }
    }
}

impl State {
    /// Removes a chunk from the index and its accounting; the caller records the removal.
    fn forget(&mut self, seq: u64) -> Option<ChunkMeta> {
        let meta = self.index.remove(&seq)?;
        self.uncache(seq);
        self.bytes -= meta.bytes;
        self.records -= u64::from(meta.count);
        if let Some(segment) = self.segments.get_mut(&meta.segment) {
            segment.live -= 1;
        }
        Some(meta)
    }

    /// Adds the chunks of an append written at `at` in `segment` to the index (and to the cache, while it has
    /// room); returns whom to tell.
    fn index_written(&mut self, queued: QueuedAppend, segment: u64, at: u64) -> oneshot::Sender<CommitResult> {
        let frames = Arc::new(queued.frames.bytes);
        let mut seq = queued.first_seq;
        for &(count, start, end) in &queued.frames.chunks {
            let bytes = (end - start - FRAME_HEADER_LEN) as u64;
            let offset = at + (start + FRAME_HEADER_LEN) as u64;
            let accepted_at = queued.accepted_at;
            let meta = ChunkMeta { count, bytes, accepted_at, in_flight: false, segment, offset };
            self.bytes += bytes;
            self.records += u64::from(count);
            self.index.insert(seq, meta);
            if self.cached_bytes + bytes <= CACHE_BYTES {
                self.cache.insert(seq, CachedChunk { frames: frames.clone(), start: start + FRAME_HEADER_LEN, end });
                self.cached_bytes += bytes;
            }
            seq += u64::from(count);
        }
        queued.done
    }

    /// Drops the in-memory copy of a chunk, if there is one.
    fn uncache(&mut self, seq: u64) -> Option<CachedChunk> {
        let cached = self.cache.remove(&seq)?;
        self.cached_bytes -= (cached.end - cached.start) as u64;
        Some(cached)
    }

    fn active(&mut self) -> (u64, &mut Segment) {
        let (first, segment) = self.segments.iter_mut().next_back().expect("the active segment always exists");
        (*first, segment)
    }
}

#[derive(Debug, Clone, Copy)]
struct ChunkMeta {
    count: u32,
    bytes: u64,
    accepted_at: i64,
    in_flight: bool,
    /// First sequence number of the segment holding the chunk.
    segment: u64,
    /// Where the chunk (after its frame header) starts in that segment.
    offset: u64,
}

/// One or more chunks encoded as frames back to back, ready for one write.
struct Frames {
    bytes: Vec<u8>,
    /// (records, frame start, frame end) per chunk.
    chunks: Vec<(u32, usize, usize)>,
}

impl Frames {
    /// Stored chunk bytes (what `max_bytes` limits).
    fn chunk_bytes(&self) -> u64 {
        self.chunks.iter().map(|(_, start, end)| (end - start - FRAME_HEADER_LEN) as u64).sum()
    }
}

const META_EPOCH: &[u8] = b"epoch";
/// Written by the sled-only version; read so that its sequence numbers keep counting up.
const META_NEXT_SEQ: &[u8] = b"next_seq";
const SEGMENTS_DIR: &str = "segments";

impl Buffer {
    /// Opens (or creates) the buffer at `path`, verifying every stored chunk.
    pub fn open(path: &Path, config: BufferConfig) -> Result<Buffer, BufferError> {
        let storage = |source: io::Error| BufferError::Storage { path: path.to_owned(), source };
        let segments_dir = path.join(SEGMENTS_DIR);
        std::fs::create_dir_all(&segments_dir).map_err(storage)?;
        let sled_config = sled::Config::new()
            .path(path)
            .segment_size(SLED_SEGMENT_BYTES)
            .cache_capacity(config.cache_bytes)
            .flush_every_ms(Some(SLED_FLUSH_MS));
        let db = open_waiting_for_lock(&sled_config).map_err(|e| storage(e.into()))?;
        let trees = Trees::open(&db).map_err(storage)?;
        let epoch = match read_u64(&trees.meta, META_EPOCH).map_err(storage)? {
            Some(epoch) => epoch,
            None => {
                let epoch = rand::random::<u64>() | 1;
                trees.meta.insert(META_EPOCH, &epoch.to_be_bytes()).map_err(|e| storage(e.into()))?;
                db.flush().map_err(|e| storage(e.into()))?;
                SledFiles::open(path).and_then(|mut files| files.sync()).map_err(storage)?;
                epoch
            }
        };
        let stored_next = read_u64(&trees.meta, META_NEXT_SEQ).map_err(storage)?.unwrap_or(1);

        let mut recovery = Recovery::new(path, &trees).map_err(storage)?;
        let mut state = State { next_seq: stored_next.max(1), ..State::default() };
        let segment::Listing { segments, spares, strangers } = segment::list(&segments_dir).map_err(storage)?;
        for stranger in strangers {
            warn!(message = "Ignoring a file that is not a buffer segment.", file = %stranger.display());
        }
        state.spares = spares;
        for (i, (first, file)) in segments.iter().enumerate() {
            let successor = segments.get(i + 1).map(|(next, _)| *next);
            recovery.load_segment(&mut state, *first, file, successor).map_err(storage)?;
        }
        recovery.migrate_legacy(&mut state, &segments_dir).map_err(storage)?;
        let corrupted = recovery.finish().map_err(storage)?;

        // A fresh active segment named after the next sequence number, unless the newest one is that already.
        let reuse = state.segments.last_key_value().is_some_and(|(first, s)| *first == state.next_seq && s.len == 0);
        if !reuse {
            let spare = take_spare(&mut state.spares);
            let (file, allocated) = segment::create(&segments_dir, state.next_seq, spare.as_ref()).map_err(storage)?;
            segment::sync_dir(&segments_dir).map_err(storage)?;
            state.segments.insert(state.next_seq, Segment::new(file, 0, allocated));
        }

        let segment_bytes = (config.max_bytes / 8).clamp(MIN_SEGMENT_BYTES, MAX_SEGMENT_BYTES);
        let unsynced = Arc::new(Unsynced::new(segments_dir.clone()));
        let periodic_sync = match config.fsync {
            FsyncPolicy::Interval(every) => Some(spawn_committer(unsynced.clone(), every).map_err(storage)?),
            FsyncPolicy::Always | FsyncPolicy::Batch { .. } => None,
        };
        let counters = Counters::default();
        counters.corrupted_chunks.store(corrupted, Ordering::Relaxed);
        let buffer = Buffer {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                segments_dir,
                db,
                trees,
                epoch,
                config,
                segment_bytes,
                state: Mutex::new(state),
                space_freed: Notify::new(),
                data_ready: Notify::new(),
                unsynced,
                _periodic_sync: periodic_sync,
                counters,
            }),
        };
        {
            let mut state = buffer.lock();
            buffer.delete_spent_segments(&mut state)?;
        }
        Ok(buffer)
    }

    /// Stores records durably (per the fsync policy). With `block`, waits up to `wait` for room, then fails with
    /// [`BufferError::Full`]; with `drop_oldest`, evicts the oldest chunks instead.
    pub async fn append(&self, records: &[Record], wait: Duration) -> Result<AppendReceipt, BufferError> {
        if records.is_empty() {
            let next = self.lock().next_seq;
            return Ok(AppendReceipt { first_seq: next, records: 0, dropped: 0 });
        }
        let accepted_at = now_micros();
        let mut frames = self.encode_frames(records, accepted_at);
        let needed = frames.chunk_bytes();
        let max = self.inner.config.max_bytes;
        if needed > max {
            return Err(BufferError::TooLarge { bytes: needed, max });
        }
        let deadline = tokio::time::Instant::now() + wait;
        let (receipt, written, writes) = loop {
            // Register interest before checking, so an ack between the check and the wait is not missed.
            let freed = self.inner.space_freed.notified();
            match self.try_queue(&mut frames, needed, accepted_at)? {
                Some(queued) => break queued,
                None => {
                    let used = {
                        let state = self.lock();
                        state.bytes + state.queued_bytes
                    };
                    if tokio::time::timeout_at(deadline, freed).await.is_err() {
                        return Err(BufferError::Full { used, max, needed });
                    }
                }
            }
        };
        if writes {
            // On a blocking-pool thread: a direct write sleeps until the device has the bytes, and a runtime
            // worker blocked there cannot encode the next appends meanwhile (with two workers that halved the
            // throughput). If the runtime drops the task unrun (shutting down), the guard writes here.
            let writer = QueueWriter(self.clone());
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn_blocking(move || drop(writer))),
                Err(_) => drop(writer),
            }
        }
        match written.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(self.storage(io::Error::new(e.kind(), e.to_string()))),
            Err(_) => return Err(BufferError::Closed),
        }
        self.inner.counters.appended.fetch_add(receipt.records, Ordering::Relaxed);
        self.inner.counters.appended_bytes.fetch_add(needed, Ordering::Relaxed);
        self.inner.data_ready.notify_one();
        Ok(receipt)
    }

    /// Takes the oldest chunks that are not in flight, up to the limits (at least one chunk if any is waiting),
    /// and marks them in flight.
    pub fn next_batch(&self, max_records: u32, max_bytes: u64) -> Result<Option<PendingBatch>, BufferError> {
        loop {
            let taken: Vec<(u64, ChunkMeta, Arc<File>, Option<CachedChunk>)> = {
                let mut state = self.lock();
                let mut taken = Vec::new();
                let (mut records, mut bytes) = (0u64, 0u64);
                for (seq, meta) in state.index.iter_mut().filter(|(_, m)| !m.in_flight) {
                    let fits =
                        records + u64::from(meta.count) <= u64::from(max_records) && bytes + meta.bytes <= max_bytes;
                    if !taken.is_empty() && !fits {
                        break;
                    }
                    meta.in_flight = true;
                    records += u64::from(meta.count);
                    bytes += meta.bytes;
                    taken.push((*seq, *meta));
                }
                let mut readable = Vec::with_capacity(taken.len());
                let mut orphaned = Vec::new();
                for (seq, meta) in taken {
                    match state.segments.get(&meta.segment) {
                        Some(segment) => {
                            let file = segment.file.clone();
                            readable.push((seq, meta, file, state.uncache(seq)));
                        }
                        None => orphaned.push(seq),
                    }
                }
                // Only possible if a segment file vanished under us: its chunks are lost, counted like corruption,
                // and never left in flight forever.
                if !orphaned.is_empty() {
                    error!(message = "Buffer chunks lost their segment file; their records are lost.", chunks = orphaned.len(), path = %self.inner.path.display());
                    self.remove(&mut state, &orphaned)?;
                    self.inner.counters.corrupted_chunks.fetch_add(orphaned.len() as u64, Ordering::Relaxed);
                    if readable.is_empty() {
                        continue;
                    }
                }
                readable
            };
            if taken.is_empty() {
                return Ok(None);
            }
            let mut batch = PendingBatch {
                chunks: Vec::with_capacity(taken.len()),
                first_record: 0,
                last_record: 0,
                record_count: 0,
                payload: Vec::with_capacity(taken.iter().map(|(_, m, ..)| m.bytes as usize).sum()),
            };
            // A sender catching up reads what is no longer in memory from the disk: this batch's chunks and those
            // after them are read in large requests, ahead of the reads below.
            if let Some((_, meta, file, _)) = taken.iter().find(|(.., cached)| cached.is_none()) {
                akosha_fsio::prefetch(file, meta.offset, PREFETCH_BYTES);
            }
            let mut chunk = Vec::new();
            for (i, (seq, meta, file, cached)) in taken.iter().enumerate() {
                let verified = match cached {
                    // Checked when it was encoded, and never left memory since.
                    Some(cached) => Ok(&cached.chunk()[chunk::CHUNK_HEADER_LEN..]),
                    None => {
                        chunk.resize(meta.bytes as usize, 0);
                        if let Err(e) = file.read_exact_at(&mut chunk, meta.offset) {
                            // Nothing was lost; the chunks go back to waiting and the sender retries later.
                            self.release(&taken[i..].iter().map(|(seq, ..)| *seq).collect::<Vec<_>>());
                            self.release(&batch.chunks);
                            return Err(self.storage(e));
                        }
                        decode_chunk(&chunk).map(|(_, payload)| payload)
                    }
                };
                match verified {
                    Ok(payload) => {
                        if batch.chunks.is_empty() {
                            batch.first_record = *seq;
                        }
                        batch.chunks.push(*seq);
                        batch.last_record = seq + u64::from(meta.count) - 1;
                        batch.record_count += meta.count;
                        batch.payload.extend_from_slice(payload);
                    }
                    Err(error) => self.discard_corrupt(*seq, &error)?,
                }
            }
            if !batch.chunks.is_empty() {
                return Ok(Some(batch));
            }
        }
    }

    /// Removes acknowledged chunks for good.
    pub fn ack(&self, chunks: &[u64]) -> Result<u64, BufferError> {
        let removed_records = {
            let mut state = self.lock();
            self.remove(&mut state, chunks)?
        };
        self.inner.counters.acked.fetch_add(removed_records, Ordering::Relaxed);
        self.inner.space_freed.notify_waiters();
        Ok(removed_records)
    }

    /// Returns chunks to the pending state (their batch was not acknowledged).
    pub fn release(&self, chunks: &[u64]) {
        let mut state = self.lock();
        for seq in chunks {
            if let Some(meta) = state.index.get_mut(seq) {
                meta.in_flight = false;
            }
        }
        drop(state);
        self.inner.data_ready.notify_one();
    }

    /// Moves chunks the aggregator rejected for good to the dead-letter tree.
    pub fn dead_letter(&self, chunks: &[u64], reason: &str) -> Result<u64, BufferError> {
        let mut state = self.lock();
        let mut moved = Vec::new();
        for seq in chunks {
            let Some(meta) = state.index.get(seq) else { continue };
            let mut value = vec![0; meta.bytes as usize];
            if let Some(segment) = state.segments.get(&meta.segment) {
                segment.file.read_exact_at(&mut value, meta.offset).map_err(|e| self.storage(e))?;
                self.inner.trees.dead.insert(seq.to_be_bytes(), value).map_err(|e| self.storage(e.into()))?;
            }
            moved.push(*seq);
        }
        let records = self.remove(&mut state, &moved)?;
        state.dead_records += records;
        drop(state);
        if records > 0 {
            error!(message = "Aggregator rejected records for good; moved them to the dead-letter store.", records, reason, path = %self.inner.path.display());
        }
        self.inner.space_freed.notify_waiters();
        Ok(records)
    }

    /// Drops pending chunks whose records all have sequence numbers `<= through`: the aggregator reported them
    /// durable in an earlier session whose ack never arrived.
    pub fn skip_through(&self, through: u64) -> Result<u64, BufferError> {
        let covered: Vec<u64> = {
            let state = self.lock();
            state
                .index
                .iter()
                .take_while(|(seq, meta)| **seq + u64::from(meta.count) - 1 <= through)
                .filter(|(_, meta)| !meta.in_flight)
                .map(|(seq, _)| *seq)
                .collect()
        };
        self.ack(&covered)
    }

    /// Sequence number of the oldest record still held (or the next one if empty).
    pub fn resume_point(&self) -> u64 {
        let state = self.lock();
        state.index.keys().next().copied().unwrap_or(state.next_seq)
    }

    /// This buffer's identity.
    pub fn epoch(&self) -> u64 {
        self.inner.epoch
    }

    /// Resolves when records may be waiting to be sent.
    pub async fn wait_for_data(&self) {
        self.inner.data_ready.notified().await;
    }

    /// State and counters.
    pub fn stats(&self) -> BufferStats {
        let state = self.lock();
        let c = &self.inner.counters;
        BufferStats {
            records: state.records,
            bytes: state.bytes,
            max_bytes: self.inner.config.max_bytes,
            chunks: state.index.len() as u64,
            in_flight_chunks: state.index.values().filter(|m| m.in_flight).count() as u64,
            oldest_accepted_at_us: state.index.values().map(|m| m.accepted_at).min(),
            next_seq: state.next_seq,
            epoch: self.inner.epoch,
            appended_records: c.appended.load(Ordering::Relaxed),
            appended_bytes: c.appended_bytes.load(Ordering::Relaxed),
            acked_records: c.acked.load(Ordering::Relaxed),
            dropped_records: c.dropped.load(Ordering::Relaxed),
            corrupted_chunks: c.corrupted_chunks.load(Ordering::Relaxed),
            dead_letter_records: state.dead_records,
            disk_bytes: state.segments.values().map(|s| s.allocated).sum::<u64>()
                + state.spares.iter().map(|s| s.bytes).sum::<u64>()
                + self.inner.db.size_on_disk().unwrap_or(0),
        }
    }

    /// Makes everything durable, removals included (used at shutdown).
    pub fn flush(&self) -> Result<(), BufferError> {
        self.inner.unsynced.sync().map_err(|e| self.storage(io::Error::new(e.kind(), e.to_string())))?;
        self.inner.db.flush().map(drop).map_err(|e| self.storage(e.into()))
    }

    fn encode_frames(&self, records: &[Record], now: i64) -> Frames {
        let max = self.inner.config.max_chunk_bytes;
        let mut frames = Frames {
            bytes: Vec::with_capacity(records.iter().map(Record::approx_size).sum::<usize>() + 64),
            chunks: Vec::new(),
        };
        let push = |frames: &mut Frames, records: &[Record]| {
            let start = frames.bytes.len();
            frames.bytes.resize(start + FRAME_HEADER_LEN, 0);
            append_chunk(&mut frames.bytes, records, now);
            frames.chunks.push((records.len() as u32, start, frames.bytes.len()));
        };
        let mut start = 0;
        let mut size = 0;
        for (i, record) in records.iter().enumerate() {
            let s = record.approx_size();
            if i > start && size + s > max {
                push(&mut frames, &records[start..i]);
                start = i;
                size = 0;
            }
            size += s;
        }
        push(&mut frames, &records[start..]);
        frames
    }

    /// Queues the chunks for writing if they fit (evicting under `drop_oldest`), numbering them; `None` if they
    /// must wait. Returns the receipt, what tells when they are written, and whether the caller must write the
    /// queue (nobody is writing it).
    fn try_queue(
        &self,
        frames: &mut Frames,
        needed: u64,
        accepted_at: i64,
    ) -> Result<Option<(AppendReceipt, oneshot::Receiver<CommitResult>, bool)>, BufferError> {
        let mut state = self.lock();
        let max = self.inner.config.max_bytes;
        let mut dropped = 0;
        let used = state.bytes + state.queued_bytes;
        if used + needed > max {
            match self.inner.config.when_full {
                WhenFull::Block => return Ok(None),
                WhenFull::DropOldest => dropped = self.evict_oldest(&mut state, used + needed - max)?,
            }
        }
        let first_seq = state.next_seq;
        let mut seq = first_seq;
        for &(count, start, end) in &frames.chunks {
            segment::seal_frame(&mut frames.bytes[start..end], seq);
            seq += u64::from(count);
        }
        state.next_seq = seq;
        state.queued_bytes += needed;
        let (done, written) = oneshot::channel();
        let frames = std::mem::replace(frames, Frames { bytes: Vec::new(), chunks: Vec::new() });
        state.queue.push_back(QueuedAppend { frames, first_seq, accepted_at, bytes: needed, done });
        let writes = !std::mem::replace(&mut state.writing, true);
        Ok(Some((AppendReceipt { first_seq, records: seq - first_seq, dropped }, written, writes)))
    }

    /// Writes everything queued, with one write per round into the active segment, until the queue is empty.
    /// One caller at a time (the one that found nobody writing): appends queued meanwhile join the next round,
    /// so that under load the disk gets few large writes, which it takes several times faster than many small
    /// ones (a 1 MiB direct write and its sync ran at 1.7× the speed of 260 KiB ones here).
    fn write_queued(&self) {
        let policy = self.inner.config.fsync;
        let _unwinding = WriterUnwind(self);
        loop {
            if let FsyncPolicy::Batch { window } = policy
                && !window.is_zero()
            {
                std::thread::sleep(window);
            }
            let mut state = self.lock();
            let round: Vec<QueuedAppend> = match policy {
                // Every append has its own write and its own sync.
                FsyncPolicy::Always => state.queue.pop_front().into_iter().collect(),
                FsyncPolicy::Batch { .. } | FsyncPolicy::Interval(_) => state.queue.drain(..).collect(),
            };
            let Some(first) = round.first() else {
                state.writing = false;
                return;
            };
            let taken = self.rotate_if_due(&mut state, first.first_seq).and_then(|()| {
                let segments_dir = &self.inner.segments_dir;
                let (segment_first, active) = state.active();
                let writer = match active.writer.take() {
                    Some(writer) => writer,
                    None => {
                        AppendFile::open_at(&segments_dir.join(segment::segment_name(segment_first)), active.len, true)
                            .map_err(|e| self.storage(e))?
                    }
                };
                Ok((segment_first, writer))
            });
            let (segment_first, mut writer) = match taken {
                Ok(taken) => taken,
                Err(error) => {
                    state.queued_bytes -= round.iter().map(|q| q.bytes).sum::<u64>();
                    drop(state);
                    let error = Arc::new(match error {
                        BufferError::Storage { source, .. } => source,
                        other => io::Error::other(other.to_string()),
                    });
                    for queued in round {
                        let _ = queued.done.send(Err(error.clone()));
                    }
                    continue;
                }
            };
            drop(state);

            let base = writer.len();
            let total = round.iter().map(|q| q.frames.bytes.len()).sum();
            // The end marker tells a scan where this segment's frames stop; the next round overwrites it.
            let written = writer.append_marked(
                total,
                |out| round.iter().for_each(|q| out.extend_from_slice(&q.frames.bytes)),
                &segment::END_MARKER,
            );

            let mut state = self.lock();
            state.queued_bytes -= round.iter().map(|q| q.bytes).sum::<u64>();
            // Only this writer rotates, and the active segment is never deleted: it is still there.
            let Some(active) = state.segments.get_mut(&segment_first) else {
                drop(state);
                let error = Arc::new(io::Error::other("the active buffer segment vanished during a write"));
                round.into_iter().for_each(|q| drop(q.done.send(Err(error.clone()))));
                continue;
            };
            active.len = writer.len();
            active.allocated = active.allocated.max(writer.end());
            active.writer = Some(writer);
            let file = active.file.clone();
            let result = match written {
                Ok(()) => {
                    let mut at = base;
                    let mut chunks = 0;
                    let mut ready = Vec::with_capacity(round.len());
                    for queued in round {
                        let len = queued.frames.bytes.len() as u64;
                        chunks += queued.frames.chunks.len() as u64;
                        ready.push(state.index_written(queued, segment_first, at));
                        at += len;
                    }
                    if let Some(active) = state.segments.get_mut(&segment_first) {
                        active.live += chunks;
                    }
                    self.inner.unsynced.file(&file);
                    (ready, Ok(()))
                }
                // The writer cut the file back: none of these frames is there, and none of them was accepted.
                Err(e) => (round.into_iter().map(|q| q.done).collect(), Err(Arc::new(e))),
            };
            drop(state);
            let (ready, mut result) = result;
            // The sync happens here rather than on a thread of its own: it then never overlaps the next round's
            // write (a device cache flush in the middle of a direct write slowed both; measured: 53 % → 82 % of
            // `dd` with four sources), and appends arriving meanwhile make the next round larger.
            if result.is_ok() && !matches!(policy, FsyncPolicy::Interval(_)) {
                result = self.inner.unsynced.sync();
            }
            for done in ready {
                let _ = done.send(result.clone());
            }
        }
    }

    /// Starts a new active segment (a recycled one if a spare is waiting) when the current one is full. Without
    /// recycling also when it holds only chunks that have left and a quarter of its size, so that acknowledged
    /// data gives its room back soon. With recycling a spent segment keeps its room as a spare anyway, and early
    /// rotations under a sender that keeps up would only add renames and directory syncs (one per quarter
    /// segment instead of one per segment).
    /// `first_seq` is the first sequence number the next write holds: a new segment is named after it.
    fn rotate_if_due(&self, state: &mut State, first_seq: u64) -> Result<(), BufferError> {
        let segment_bytes = self.inner.segment_bytes;
        let recycling = self.inner.config.spare_segments > 0;
        let (_, active) = state.active();
        let spent_early = !recycling && active.live == 0 && active.len >= early_rotation_bytes(segment_bytes);
        if active.len < segment_bytes && !spent_early {
            return Ok(());
        }
        let next = first_seq;
        // No more appends go to the segment that was active: its direct-I/O handle closes.
        state.active().1.writer = None;
        let spare = take_spare(&mut state.spares);
        let (file, allocated) =
            segment::create(&self.inner.segments_dir, next, spare.as_ref()).map_err(|e| self.storage(e))?;
        // The new name must be durable before anything written under it is reported durable; the commit that
        // covers the first append does that, off this lock (a directory sync is a journal commit).
        self.inner.unsynced.directory();
        state.segments.insert(next, Segment::new(file, 0, allocated));
        self.delete_spent_segments(state)
    }

    /// Records that chunks left the buffer and deletes segments nothing lives in any more.
    fn remove(&self, state: &mut State, chunks: &[u64]) -> Result<u64, BufferError> {
        let mut records = 0;
        let mut batch = sled::Batch::default();
        let mut emptied = false;
        for seq in chunks {
            if let Some(meta) = state.forget(*seq) {
                records += u64::from(meta.count);
                batch.insert(&seq.to_be_bytes(), &[]);
                emptied |= state.segments.get(&meta.segment).is_some_and(|s| s.live == 0);
            }
        }
        self.inner.trees.removed.apply_batch(batch).map_err(|e| self.storage(e.into()))?;
        if emptied {
            self.delete_spent_segments(state)?;
        }
        Ok(records)
    }

    /// Deletes every segment but the active one that holds no live chunk, and forgets its removed chunks.
    fn delete_spent_segments(&self, state: &mut State) -> Result<(), BufferError> {
        let firsts: Vec<u64> = state.segments.keys().copied().collect();
        let mut deleted = false;
        for pair in firsts.windows(2) {
            let (first, next) = (pair[0], pair[1]);
            if state.segments.get(&first).is_none_or(|s| s.live > 0) {
                continue;
            }
            // Recycled only when nothing else holds the file (a reader of a chunk dropped while in flight, or a
            // pending sync): the next life of a recycled file overwrites what such a reader expects to find. A
            // deleted file stays readable through an open handle.
            let unshared = state.segments.get(&first).is_some_and(|s| Arc::strong_count(&s.file) == 1);
            let keep = unshared && state.spares.len() < self.inner.config.spare_segments;
            if let Some(spare) = segment::retire(&self.inner.segments_dir, first, keep).map_err(|e| self.storage(e))? {
                state.spares.push(spare);
            }
            state.segments.remove(&first);
            deleted = true;
            // The removal marks of a deleted segment's chunks have nothing left to hide.
            let mut batch = sled::Batch::default();
            for key in self.inner.trees.removed.range(first.to_be_bytes()..next.to_be_bytes()).keys() {
                batch.remove(key.map_err(|e| self.storage(e.into()))?);
            }
            self.inner.trees.removed.apply_batch(batch).map_err(|e| self.storage(e.into()))?;
        }
        if deleted {
            // Until the next commit a crash may bring the segment back; its chunks are then sent again, which
            // the invariants allow (as for removal marks).
            self.inner.unsynced.directory();
        }
        Ok(())
    }

    fn evict_oldest(&self, state: &mut State, mut to_free: u64) -> Result<u64, BufferError> {
        // Prefer chunks that are not in flight: those will be acknowledged soon and free their room anyway.
        let victims: Vec<u64> = {
            let idle = state.index.iter().filter(|(_, m)| !m.in_flight);
            let busy = state.index.iter().filter(|(_, m)| m.in_flight);
            idle.chain(busy)
                .take_while(|(_, m)| {
                    let take = to_free > 0;
                    to_free = to_free.saturating_sub(m.bytes);
                    take
                })
                .map(|(seq, _)| *seq)
                .collect()
        };
        let dropped = self.remove(state, &victims)?;
        self.inner.counters.dropped.fetch_add(dropped, Ordering::Relaxed);
        warn!(message = "Buffer full; dropped the oldest records (when_full: drop_oldest).", dropped, path = %self.inner.path.display());
        Ok(dropped)
    }

    fn discard_corrupt(&self, seq: u64, error: &ChunkError) -> Result<(), BufferError> {
        error!(message = "Removing corrupted buffer chunk; its records are lost.", %error, seq, path = %self.inner.path.display());
        {
            let mut state = self.lock();
            self.remove(&mut state, &[seq])?;
        }
        self.inner.counters.corrupted_chunks.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn storage(&self, source: io::Error) -> BufferError {
        BufferError::Storage { path: self.inner.path.clone(), source }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the index consistent at chunk granularity; keep going.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Overwrites a stored chunk with garbage, as a disk error would.
    #[cfg(test)]
    pub(crate) fn corrupt_chunk_for_test(&self, seq: u64) {
        let mut state = self.lock();
        state.uncache(seq);
        let meta = state.index[&seq];
        let garbage = b"\x01garbage-garbage-garbage";
        let len = garbage.len().min(meta.bytes as usize);
        let segment = state.segments.get_mut(&meta.segment).unwrap();
        segment.file.write_all_at(&garbage[..len], meta.offset).unwrap();
        // The writer keeps the file's last partial block in memory and would write it back unharmed; reopened,
        // it reads the damage back.
        segment.writer = None;
    }

    /// Keys of the stored chunks.
    #[cfg(test)]
    pub(crate) fn chunk_keys_for_test(&self) -> Vec<u64> {
        self.lock().index.keys().copied().collect()
    }

    /// A handle on a segment's file, as a reader of one of its chunks holds one.
    #[cfg(test)]
    pub(crate) fn hold_segment_for_test(&self, first: u64) -> Arc<File> {
        self.lock().segments[&first].file.clone()
    }

    /// Spare files on disk.
    #[cfg(test)]
    pub(crate) fn spares_for_test(&self) -> Vec<PathBuf> {
        segment::list(&self.inner.segments_dir).unwrap().spares.into_iter().map(|s| s.path).collect()
    }

    /// Segment files on disk, by first sequence number.
    #[cfg(test)]
    pub(crate) fn segments_for_test(&self) -> Vec<u64> {
        segment::list(&self.inner.segments_dir).unwrap().segments.into_iter().map(|(first, _)| first).collect()
    }
}

/// Rebuilds the index at open: reads every segment, skips removed and corrupt chunks, cuts off a write the
/// last crash left unfinished, and moves chunks of the sled-only version into a segment.
struct Recovery<'a> {
    path: &'a Path,
    trees: &'a Trees,
    removed: HashSet<u64>,
    /// Removal marks that matched a frame; the others are stale and cleaned up.
    seen_removed: HashSet<u64>,
    newly_removed: Vec<u64>,
    corrupted: u64,
}

impl<'a> Recovery<'a> {
    fn new(path: &'a Path, trees: &'a Trees) -> io::Result<Self> {
        Ok(Recovery {
            path,
            trees,
            removed: trees.removed_set()?,
            seen_removed: HashSet::new(),
            newly_removed: Vec::new(),
            corrupted: 0,
        })
    }

    /// Loads the segment starting at `first`; `successor` is the first sequence number of the next segment
    /// (`None` for the newest, where appends continue).
    fn load_segment(&mut self, state: &mut State, first: u64, file: &Path, successor: Option<u64>) -> io::Result<()> {
        let mut live = 0;
        let mut end_seq = first;
        // In the newest segment, a last frame whose chunk does not verify is a write the last run did not finish
        // (direct writes are padded, so a torn one need not end early): cut off, not counted as damage. Held
        // here until a later frame shows it was not the last.
        let mut unfinished: Option<(u64, u64, ChunkError)> = None;
        let scan = segment::scan(file, first, |header, chunk_offset, chunk| {
            if let Some((seq, _, error)) = unfinished.take() {
                self.count_corrupt(seq, &error);
            }
            let seq = header.seq;
            // Whether the chunk is still here, gone or damaged, its sequence numbers were handed out and must
            // never be again: the aggregator may hold them.
            end_seq = end_seq.max(seq + seq_span(chunk));
            if self.removed.contains(&seq) {
                self.seen_removed.insert(seq);
                return;
            }
            if state.index.contains_key(&seq) {
                return;
            }
            match decode_chunk(chunk) {
                Err(error) if successor.is_none() => {
                    unfinished = Some((seq, chunk_offset - FRAME_HEADER_LEN as u64, error));
                }
                _ => live += u64::from(self.index_chunk(state, seq, chunk, first, chunk_offset)),
            }
        })?;
        state.next_seq = state.next_seq.max(end_seq);
        let mut allocated = scan.file_len;
        let mut valid_len = scan.valid_len;
        let mut unfinished_write = scan.end == segment::ScanEnd::Unreadable;
        if let Some((seq, frame_offset, error)) = unfinished {
            warn!(message = "The newest buffer chunk does not verify: a write the last run did not finish.", seq, %error, segment = %file.display());
            valid_len = frame_offset;
            unfinished_write = true;
        }
        match successor {
            // Appends continue after the last whole frame; whatever follows it goes, so that nothing written
            // before can ever line up behind a later append.
            None if valid_len < scan.file_len => {
                let cut = scan.file_len - valid_len;
                if unfinished_write {
                    warn!(message = "Cutting off a write the last run did not finish; it was never accepted.", bytes = cut, segment = %file.display());
                }
                let handle = std::fs::OpenOptions::new().write(true).open(file)?;
                handle.set_len(valid_len)?;
                handle.sync_all()?;
                allocated = valid_len;
            }
            Some(successor) if scan.lost_frames(end_seq, successor) => {
                error!(message = "A buffer segment is damaged; the chunks after the damage are lost.", offset = scan.valid_len, bytes = scan.file_len - scan.valid_len, segment = %file.display());
                self.corrupted += 1;
            }
            _ => {}
        }
        state.next_seq = state.next_seq.max(first);
        let handle = std::fs::OpenOptions::new().read(true).write(true).open(file)?;
        let mut segment = Segment::new(handle, valid_len, allocated);
        segment.live = live;
        state.segments.insert(first, segment);
        Ok(())
    }

    /// Adds a verified chunk to the index; a corrupt one is counted and marked removed.
    fn index_chunk(&mut self, state: &mut State, seq: u64, chunk: &[u8], segment: u64, offset: u64) -> bool {
        match decode_chunk(chunk) {
            Ok((header, _)) => {
                let bytes = chunk.len() as u64;
                let meta = ChunkMeta {
                    count: header.record_count,
                    bytes,
                    accepted_at: header.accepted_at,
                    in_flight: false,
                    segment,
                    offset,
                };
                state.index.insert(seq, meta);
                state.bytes += bytes;
                state.records += u64::from(header.record_count);
                state.next_seq = state.next_seq.max(seq + u64::from(header.record_count));
                true
            }
            Err(error) => {
                self.count_corrupt(seq, &error);
                false
            }
        }
    }

    /// Counts, logs and marks removed a chunk that does not verify.
    fn count_corrupt(&mut self, seq: u64, error: &ChunkError) {
        error!(message = "Removing corrupted buffer chunk; its records are lost.", %error, seq, path = %self.path.display());
        self.corrupted += 1;
        self.newly_removed.push(seq);
    }

    /// Moves the chunks the sled-only version stored into a segment of their own, then empties its tree.
    fn migrate_legacy(&mut self, state: &mut State, segments_dir: &Path) -> io::Result<()> {
        if self.trees.legacy_chunks.is_empty() {
            return Ok(());
        }
        let mut frames = Vec::new();
        let mut chunks = Vec::new();
        for entry in self.trees.legacy_chunks.iter() {
            let (key, value) = entry?;
            let Some(seq) = seq_of_key(&key) else {
                warn!(message = "Dropping a buffer entry with a malformed key.", path = %self.path.display(), key = ?key);
                self.corrupted += 1;
                continue;
            };
            if state.index.contains_key(&seq) {
                continue;
            }
            let start = frames.len();
            frames.resize(start + FRAME_HEADER_LEN, 0);
            frames.extend_from_slice(&value);
            segment::seal_frame(&mut frames[start..], seq);
            chunks.push((seq, start));
        }
        if let Some(&(first, _)) = chunks.first() {
            let target = state.segments.range(..=first).next_back().map(|(f, _)| *f).unwrap_or(first);
            let segment = match state.segments.entry(target) {
                std::collections::btree_map::Entry::Occupied(entry) => entry.into_mut(),
                std::collections::btree_map::Entry::Vacant(entry) => {
                    let (file, allocated) = segment::create(segments_dir, target, None)?;
                    segment::sync_dir(segments_dir)?;
                    entry.insert(Segment::new(file, 0, allocated))
                }
            };
            let base = segment.len;
            segment::write_at(&segment.file, &frames, base)?;
            segment.file.sync_data()?;
            segment.len += frames.len() as u64;
            segment.allocated = segment.allocated.max(segment.len);
            for (i, &(seq, start)) in chunks.iter().enumerate() {
                let end = chunks.get(i + 1).map_or(frames.len(), |(_, next)| *next);
                let chunk = &frames[start + FRAME_HEADER_LEN..end];
                let offset = base + (start + FRAME_HEADER_LEN) as u64;
                if self.index_chunk(state, seq, chunk, target, offset)
                    && let Some(segment) = state.segments.get_mut(&target)
                {
                    segment.live += 1;
                }
            }
            tracing::info!(message = "Moved the chunks of an older buffer format into a segment.", chunks = chunks.len(), path = %self.path.display());
        }
        self.trees.legacy_chunks.clear()?;
        Ok(())
    }

    /// Records new removal marks, drops stale ones, and makes that durable. Returns the corrupt chunks found.
    fn finish(self) -> io::Result<u64> {
        let mut batch = sled::Batch::default();
        for seq in &self.newly_removed {
            batch.insert(&seq.to_be_bytes(), &[]);
        }
        for seq in self.removed.difference(&self.seen_removed) {
            batch.remove(&seq.to_be_bytes());
        }
        self.trees.removed.apply_batch(batch)?;
        self.trees.removed.flush()?;
        Ok(self.corrupted)
    }
}

/// How many sequence numbers a stored chunk used. For a damaged chunk the unverified count is taken, bounded
/// by the chunk's size (every record takes more than one byte): too high only skips numbers, too low could
/// hand out numbers the aggregator already holds.
fn seq_span(chunk: &[u8]) -> u64 {
    match decode_chunk(chunk) {
        Ok((header, _)) => u64::from(header.record_count),
        Err(_) => {
            let unverified = chunk.get(5..9).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            u64::from(unverified).min(chunk.len() as u64).max(1)
        }
    }
}

fn seq_of_key(key: &[u8]) -> Option<u64> {
    key.try_into().ok().map(u64::from_be_bytes)
}

fn read_u64(tree: &sled::Tree, key: &[u8]) -> io::Result<Option<u64>> {
    Ok(tree.get(key)?.and_then(|v| seq_of_key(&v)))
}

/// What the next commit must make durable: segments written to since their last sync, and the segment
/// directory after a segment was created, renamed or deleted.
struct Unsynced {
    dir: PathBuf,
    pending: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    /// Weak: a segment whose chunks have all left needs no sync, and must not look held to the recycling check.
    files: Vec<Weak<File>>,
    dir: bool,
}

impl Unsynced {
    fn new(dir: PathBuf) -> Self {
        Unsynced { dir, pending: Mutex::new(Pending::default()) }
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn file(&self, file: &Arc<File>) {
        self.lock().files.push(Arc::downgrade(file));
    }

    fn directory(&self) {
        self.lock().dir = true;
    }

    /// Syncs the directory if due, then `fdatasync`s every segment written since its last sync that is still in
    /// use. Whatever failed stays due; the error goes to every waiter of this round.
    fn sync(&self) -> Result<(), Arc<io::Error>> {
        let Pending { mut files, dir } = std::mem::take(&mut *self.lock());
        if dir && let Err(e) = segment::sync_dir(&self.dir) {
            let mut pending = self.lock();
            pending.dir = true;
            pending.files.extend(files);
            return Err(Arc::new(e));
        }
        files.dedup_by(|a, b| Weak::ptr_eq(a, b));
        for (i, file) in files.iter().enumerate() {
            let Some(file) = file.upgrade() else { continue };
            if let Err(e) = file.sync_data() {
                self.lock().files.extend(files[i..].iter().cloned());
                return Err(Arc::new(e));
            }
        }
        Ok(())
    }
}

/// The `interval` policy's sync thread: syncs on a timer (appends do not wait for it), and what is left at
/// shutdown.
fn spawn_committer(unsynced: Arc<Unsynced>, every: Duration) -> io::Result<Committer> {
    let (stop, stopped) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new().name("buffer-commit".into()).spawn(move || {
        // Nothing is ever sent: the sender's drop is the stop signal.
        while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
            if let Err(error) = unsynced.sync() {
                error!(message = "Periodic buffer sync failed; will retry.", %error);
            }
        }
        let _ = unsynced.sync();
    })?;
    Ok(Committer { stop: Mutex::new(Some(stop)), thread: Some(thread) })
}

/// The spare that brings the most blocks, if any.
fn take_spare(spares: &mut Vec<segment::Spare>) -> Option<segment::Spare> {
    let largest = spares.iter().enumerate().max_by_key(|(_, s)| s.bytes).map(|(i, _)| i)?;
    Some(spares.swap_remove(largest))
}

/// Size from which a segment that holds only chunks that have left is replaced before it is full.
fn early_rotation_bytes(segment_bytes: u64) -> u64 {
    (segment_bytes / 4).max(MIN_SEGMENT_BYTES)
}

/// sled's log segment size. sled refuses to open a database with another size than it was created with, so
/// this stays what the sled-only version used.
const SLED_SEGMENT_BYTES: usize = 8 << 20;
/// How often sled writes removal marks and dead letters out (they may be lost in a crash; see the invariants).
const SLED_FLUSH_MS: u64 = 200;
/// Bounds on the size at which the active segment is replaced (an eighth of `max_bytes` in between): small
/// enough that acknowledged data is given back soon, large enough that rotation is rare.
/// Tests use a smaller minimum, so that a model test rotates and recycles segments with a few records.
const MIN_SEGMENT_BYTES: u64 = if cfg!(test) { 4 << 10 } else { 1 << 20 };
const MAX_SEGMENT_BYTES: u64 = 128 << 20;
/// Memory for chunks waiting to be sent ([`State::cache`]): at 1 GB/s of appends, the sender may fall this many
/// tens of milliseconds behind before it reads from the disk. When the aggregator is away, it holds the oldest
/// waiting chunks: the first to be sent when it is back.
const CACHE_BYTES: u64 = 64 << 20;
/// How much of a segment is read ahead from the first chunk of a batch that is read from the disk.
const PREFETCH_BYTES: u64 = 16 << 20;

/// sled's files, for a real `fdatasync` after its flush when the buffer's identity is first written (sled's
/// own flush uses `sync_file_range`, which neither flushes the device cache nor the file size).
struct SledFiles {
    log: File,
}

impl SledFiles {
    fn open(path: &Path) -> io::Result<Self> {
        Ok(Self { log: File::open(path.join("db"))? })
    }

    fn sync(&mut self) -> io::Result<()> {
        self.log.sync_data()
    }
}

/// Opens the database, waiting a moment if another handle (a previous instance that is still shutting down, or
/// sled's background threads of a just-dropped handle) holds the file lock.
fn open_waiting_for_lock(config: &sled::Config) -> Result<sled::Db, sled::Error> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match config.open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            result => return result,
        }
    }
}

/// How long [`Buffer::open`] waits for the buffer's file lock before reporting it as held.
const LOCK_WAIT: Duration = Duration::from_secs(5);

fn now_micros() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

#[cfg(test)]
mod tests;
