//! # The agent's durable buffer
//!
//! Records accepted from a source live here until the aggregator has acknowledged them; one buffer per
//! destination. It is a sled database with three trees:
//!
//! ```text
//!  chunks:  key = first record sequence number (u64 BE)   value = chunk (see below)
//!  dead:    same layout; batches the aggregator rejected for good (kept for `buffer inspect`)
//!  meta:    "epoch" → u64   random identity of this buffer, sent in the handshake
//!           "next_seq" → u64 next record sequence number (survives an empty buffer)
//!
//!  chunk:   u8 format=1 │ u32 crc32c(rest) │ u32 record_count │ i64 accepted_at_us │ records (protocol codec)
//! ```
//!
//! Every record gets a sequence number; a chunk holds consecutive ones, so its key plus its count gives its
//! range. A chunk is the unit of everything: appending (one source call → one or more chunks of at most
//! `max_chunk_bytes`), sending (a batch is one or more whole chunks), acknowledging, dropping and dead-lettering.
//! An in-memory index of the chunks (sequence, count, size, age, in-flight flag) answers every question without
//! touching the disk, and is rebuilt at open by reading and verifying every chunk.
//!
//! ## Invariants
//! - A chunk is durable (per the fsync policy) before [`Buffer::append`] returns; that return is what a source
//!   reports to its client as "accepted".
//! - A chunk leaves `chunks` only when the aggregator acknowledged its batch, when `drop_oldest` evicts it
//!   (counted and logged), when it is dead-lettered after a permanent rejection, or when it is corrupt.
//! - In-flight marks live only in memory: after a restart every chunk is pending again and is sent again. The
//!   aggregator deduplicates, so at-least-once here becomes exactly-once in storage.
//! - `bytes` counts stored chunk sizes and is what `max_bytes` limits; sled's own overhead is reported apart.
//!
//! ## Durability
//! sled's own flush uses `sync_file_range` on Linux, which neither flushes the device cache nor the file size, and
//! it writes values above a threshold (segment size / 4) to separate blob files without syncing them. The
//! committer therefore follows every flush with `fdatasync` of sled's log file and of any new blob file, so an
//! acknowledged append survives power loss, not only a process crash. Segments are 8 MiB, so chunks up to
//! 2 MiB (the default `max_chunk_bytes` is 1 MiB) stay inside the log and blobs are rare.
//!
//! ## Recovery
//! A chunk whose checksum fails or whose format is unknown is removed, counted in `corrupted_chunks` and logged
//! with its key. The agent never refuses to start because of a bad chunk: losing one chunk is bad, a crash loop
//! that loses everything that arrives afterwards is worse.

mod chunk;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::Duration;

use akosha_protocol::Record;
use tokio::sync::{Notify, oneshot};
use tracing::{error, warn};

pub(crate) use chunk::{ChunkError, decode_chunk, encode_chunk};

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
    /// Group commit: appends arriving within `window` of each other share one fsync, before they return.
    Batch {
        /// How long the committer waits for more appends after the first one.
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
    /// sled page cache.
    pub cache_bytes: u64,
}

impl Default for BufferConfig {
    fn default() -> Self {
        Self {
            max_bytes: 1 << 30,
            when_full: WhenFull::Block,
            fsync: FsyncPolicy::Batch { window: Duration::ZERO },
            max_chunk_bytes: 1 << 20,
            cache_bytes: 8 << 20,
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
        /// sled's error.
        #[source]
        source: sled::Error,
    },
    /// The committer is gone (the buffer is shutting down).
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
    /// Records acknowledged since start.
    pub acked_records: u64,
    /// Records evicted by `drop_oldest` since start.
    pub dropped_records: u64,
    /// Corrupted chunks removed since start (including at open).
    pub corrupted_chunks: u64,
    /// Records in the dead-letter tree.
    pub dead_letter_records: u64,
    /// Bytes sled uses on disk.
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
    /// Bytes sled uses on disk.
    pub disk_bytes: u64,
}

/// Reads a buffer directory without modifying it. The agent that owns it must be stopped (sled holds a lock).
pub fn inspect(path: &Path) -> Result<InspectReport, BufferError> {
    let storage = |source| BufferError::Storage { path: path.to_owned(), source };
    if !path.join("db").exists() {
        return Err(storage(sled::Error::Io(std::io::Error::new(std::io::ErrorKind::NotFound, "no buffer here"))));
    }
    let db = open_waiting_for_lock(&sled::Config::new().path(path).segment_size(SEGMENT_BYTES).cache_capacity(1 << 20))
        .map_err(storage)?;
    let meta = db.open_tree("meta").map_err(storage)?;
    let read_u64 = |key: &[u8]| -> Result<u64, BufferError> {
        Ok(meta
            .get(key)
            .map_err(storage)?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0))
    };
    let mut report = InspectReport {
        epoch: read_u64(META_EPOCH)?,
        next_seq: read_u64(META_NEXT_SEQ)?,
        disk_bytes: db.size_on_disk().unwrap_or(0),
        ..InspectReport::default()
    };
    for entry in db.open_tree("chunks").map_err(storage)?.iter() {
        let (key, value) = entry.map_err(storage)?;
        let seq = key.as_ref().try_into().ok().map(u64::from_be_bytes);
        match (seq, decode_chunk(&value)) {
            (Some(seq), Ok((header, _))) => {
                let last = seq + u64::from(header.record_count) - 1;
                report.chunks += 1;
                report.records += u64::from(header.record_count);
                report.bytes += value.len() as u64;
                report.seq_range = Some(report.seq_range.map_or((seq, last), |(a, b)| (a.min(seq), b.max(last))));
                let t = header.accepted_at;
                report.accepted_range_us = Some(report.accepted_range_us.map_or((t, t), |(a, b)| (a.min(t), b.max(t))));
                report.next_seq = report.next_seq.max(last + 1);
            }
            _ => report.corrupted_chunks += 1,
        }
    }
    for entry in db.open_tree("dead").map_err(storage)?.iter() {
        let (_, value) = entry.map_err(storage)?;
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
    db: sled::Db,
    chunks: sled::Tree,
    dead: sled::Tree,
    meta: sled::Tree,
    epoch: u64,
    config: BufferConfig,
    state: Mutex<State>,
    space_freed: Notify,
    data_ready: Notify,
    committer: Option<Committer>,
    counters: Counters,
}

type CommitWaiter = oneshot::Sender<Result<(), sled::Error>>;

/// Handle on the group-commit thread; dropping it stops and joins the thread, so that the sled database is
/// closed (and its file lock released) when the buffer is dropped.
struct Committer {
    waiters: Mutex<Option<mpsc::Sender<CommitWaiter>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[derive(Default)]
struct Counters {
    appended: AtomicU64,
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
}

impl State {
    /// Removes a chunk from the index and its accounting; the caller removes it from the store.
    fn forget(&mut self, seq: u64) -> Option<ChunkMeta> {
        let meta = self.index.remove(&seq)?;
        self.bytes -= meta.bytes;
        self.records -= u64::from(meta.count);
        Some(meta)
    }
}

#[derive(Debug, Clone, Copy)]
struct ChunkMeta {
    count: u32,
    bytes: u64,
    accepted_at: i64,
    in_flight: bool,
}

const META_EPOCH: &[u8] = b"epoch";
const META_NEXT_SEQ: &[u8] = b"next_seq";

impl Buffer {
    /// Opens (or creates) the buffer at `path`, verifying every stored chunk.
    pub fn open(path: &Path, config: BufferConfig) -> Result<Buffer, BufferError> {
        let storage = |source| BufferError::Storage { path: path.to_owned(), source };
        let flush_every_ms = match config.fsync {
            FsyncPolicy::Interval(every) => Some(every.as_millis().max(1) as u64),
            FsyncPolicy::Always | FsyncPolicy::Batch { .. } => None,
        };
        let sled_config = sled::Config::new()
            .path(path)
            .segment_size(SEGMENT_BYTES)
            .cache_capacity(config.cache_bytes)
            .mode(sled::Mode::HighThroughput)
            .flush_every_ms(flush_every_ms);
        let db = open_waiting_for_lock(&sled_config).map_err(storage)?;
        let chunks = db.open_tree("chunks").map_err(storage)?;
        let dead = db.open_tree("dead").map_err(storage)?;
        let meta = db.open_tree("meta").map_err(storage)?;

        let epoch = match meta.get(META_EPOCH).map_err(storage)? {
            Some(v) if v.len() == 8 => u64::from_be_bytes(v.as_ref().try_into().unwrap_or_default()),
            _ => {
                let epoch = rand::random::<u64>() | 1;
                meta.insert(META_EPOCH, &epoch.to_be_bytes()).map_err(storage)?;
                db.flush().map_err(storage)?;
                epoch
            }
        };
        let stored_next = meta
            .get(META_NEXT_SEQ)
            .map_err(storage)?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(1);

        let mut state = State { next_seq: stored_next.max(1), ..State::default() };
        let mut corrupted = 0;
        for entry in chunks.iter() {
            let (key, value) = entry.map_err(storage)?;
            let Some(seq) = key.as_ref().try_into().ok().map(u64::from_be_bytes) else {
                warn!(message = "Removing buffer entry with a malformed key.", path = %path.display(), key = ?key);
                chunks.remove(&key).map_err(storage)?;
                corrupted += 1;
                continue;
            };
            match decode_chunk(&value) {
                Ok((header, _)) => {
                    state.index.insert(
                        seq,
                        ChunkMeta {
                            count: header.record_count,
                            bytes: value.len() as u64,
                            accepted_at: header.accepted_at,
                            in_flight: false,
                        },
                    );
                    state.bytes += value.len() as u64;
                    state.records += u64::from(header.record_count);
                    state.next_seq = state.next_seq.max(seq + u64::from(header.record_count));
                }
                Err(error) => {
                    error!(message = "Removing corrupted buffer chunk; its records are lost.", %error, seq, path = %path.display());
                    chunks.remove(&key).map_err(storage)?;
                    corrupted += 1;
                }
            }
        }
        for entry in dead.iter() {
            let (_, value) = entry.map_err(storage)?;
            if let Ok((header, _)) = decode_chunk(&value) {
                state.dead_records += u64::from(header.record_count);
            }
        }
        if corrupted > 0 {
            db.flush().map_err(storage)?;
        }

        let committer = match config.fsync {
            FsyncPolicy::Always => Some(spawn_committer(db.clone(), path, None)),
            FsyncPolicy::Batch { window } => Some(spawn_committer(db.clone(), path, Some(window))),
            FsyncPolicy::Interval(_) => None,
        }
        .transpose()
        .map_err(|e| storage(sled::Error::Io(e)))?;
        let counters = Counters::default();
        counters.corrupted_chunks.store(corrupted, Ordering::Relaxed);
        Ok(Buffer {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                db,
                chunks,
                dead,
                meta,
                epoch,
                config,
                state: Mutex::new(state),
                space_freed: Notify::new(),
                data_ready: Notify::new(),
                committer,
                counters,
            }),
        })
    }

    /// Stores records durably (per the fsync policy). With `block`, waits up to `wait` for room, then fails with
    /// [`BufferError::Full`]; with `drop_oldest`, evicts the oldest chunks instead.
    pub async fn append(&self, records: &[Record], wait: Duration) -> Result<AppendReceipt, BufferError> {
        if records.is_empty() {
            let next = self.lock().next_seq;
            return Ok(AppendReceipt { first_seq: next, records: 0, dropped: 0 });
        }
        let accepted_at = now_micros();
        let encoded = self.encode_chunks(records, accepted_at);
        let needed: u64 = encoded.iter().map(|(_, v)| v.len() as u64).sum();
        let max = self.inner.config.max_bytes;
        if needed > max {
            return Err(BufferError::TooLarge { bytes: needed, max });
        }
        let deadline = tokio::time::Instant::now() + wait;
        let receipt = loop {
            // Register interest before checking, so an ack between the check and the wait is not missed.
            let freed = self.inner.space_freed.notified();
            match self.try_insert(&encoded, needed, accepted_at)? {
                Some(receipt) => break receipt,
                None => {
                    let used = self.lock().bytes;
                    if tokio::time::timeout_at(deadline, freed).await.is_err() {
                        return Err(BufferError::Full { used, max, needed });
                    }
                }
            }
        };
        self.make_durable().await?;
        self.inner.counters.appended.fetch_add(receipt.records, Ordering::Relaxed);
        self.inner.data_ready.notify_one();
        Ok(receipt)
    }

    /// Takes the oldest chunks that are not in flight, up to the limits (at least one chunk if any is waiting),
    /// and marks them in flight.
    pub fn next_batch(&self, max_records: u32, max_bytes: u64) -> Result<Option<PendingBatch>, BufferError> {
        loop {
            let taken: Vec<(u64, ChunkMeta)> = {
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
                taken
            };
            if taken.is_empty() {
                return Ok(None);
            }
            let mut batch = PendingBatch {
                chunks: Vec::with_capacity(taken.len()),
                first_record: 0,
                last_record: 0,
                record_count: 0,
                payload: Vec::with_capacity(taken.iter().map(|(_, m)| m.bytes as usize).sum()),
            };
            for (seq, meta) in taken {
                let value = match self.inner.chunks.get(seq.to_be_bytes()).map_err(|e| self.storage(e))? {
                    Some(value) => value,
                    // Evicted by drop_oldest between the index scan and this read.
                    None => continue,
                };
                match decode_chunk(&value) {
                    Ok((_, payload)) => {
                        if batch.chunks.is_empty() {
                            batch.first_record = seq;
                        }
                        batch.chunks.push(seq);
                        batch.last_record = seq + u64::from(meta.count) - 1;
                        batch.record_count += meta.count;
                        batch.payload.extend_from_slice(payload);
                    }
                    Err(error) => self.discard_corrupt(seq, &error)?,
                }
            }
            if !batch.chunks.is_empty() {
                return Ok(Some(batch));
            }
        }
    }

    /// Removes acknowledged chunks for good.
    pub fn ack(&self, chunks: &[u64]) -> Result<u64, BufferError> {
        let mut removed_records = 0;
        let mut batch = sled::Batch::default();
        {
            let mut state = self.lock();
            for seq in chunks {
                if let Some(meta) = state.forget(*seq) {
                    removed_records += u64::from(meta.count);
                    batch.remove(&seq.to_be_bytes());
                }
            }
            // Inside the lock: a later append could otherwise interleave its insert with this removal.
            self.inner.chunks.apply_batch(batch).map_err(|e| self.storage(e))?;
        }
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
        let mut moved = 0;
        let mut state = self.lock();
        for seq in chunks {
            let key = seq.to_be_bytes();
            let Some(meta) = state.forget(*seq) else { continue };
            if let Some(value) = self.inner.chunks.get(key).map_err(|e| self.storage(e))? {
                self.inner.dead.insert(key, value).map_err(|e| self.storage(e))?;
                self.inner.chunks.remove(key).map_err(|e| self.storage(e))?;
            }
            moved += u64::from(meta.count);
        }
        state.dead_records += moved;
        drop(state);
        if moved > 0 {
            error!(message = "Aggregator rejected records for good; moved them to the dead-letter store.", records = moved, reason, path = %self.inner.path.display());
        }
        self.inner.space_freed.notify_waiters();
        Ok(moved)
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
            acked_records: c.acked.load(Ordering::Relaxed),
            dropped_records: c.dropped.load(Ordering::Relaxed),
            corrupted_chunks: c.corrupted_chunks.load(Ordering::Relaxed),
            dead_letter_records: state.dead_records,
            disk_bytes: self.inner.db.size_on_disk().unwrap_or(0),
        }
    }

    /// Flushes everything to disk (used at shutdown).
    pub fn flush(&self) -> Result<(), BufferError> {
        self.inner.db.flush().map(drop).map_err(|e| self.storage(e))
    }

    fn encode_chunks(&self, records: &[Record], now: i64) -> Vec<(usize, Vec<u8>)> {
        let max = self.inner.config.max_chunk_bytes;
        let mut out = Vec::new();
        let mut start = 0;
        let mut size = 0;
        for (i, record) in records.iter().enumerate() {
            let s = record.approx_size();
            if i > start && size + s > max {
                out.push((i - start, encode_chunk(&records[start..i], now)));
                start = i;
                size = 0;
            }
            size += s;
        }
        out.push((records.len() - start, encode_chunk(&records[start..], now)));
        out
    }

    /// Inserts the chunks if they fit (evicting under `drop_oldest`); `None` if they must wait.
    fn try_insert(
        &self,
        encoded: &[(usize, Vec<u8>)],
        needed: u64,
        accepted_at: i64,
    ) -> Result<Option<AppendReceipt>, BufferError> {
        let mut state = self.lock();
        let max = self.inner.config.max_bytes;
        let mut dropped = 0;
        if state.bytes + needed > max {
            match self.inner.config.when_full {
                WhenFull::Block => return Ok(None),
                WhenFull::DropOldest => {
                    let to_free = state.bytes + needed - max;
                    dropped = self.evict_oldest(&mut state, to_free)?;
                }
            }
        }
        let first_seq = state.next_seq;
        let mut seq = first_seq;
        let mut batch = sled::Batch::default();
        let mut metas = Vec::with_capacity(encoded.len());
        for (count, value) in encoded {
            batch.insert(&seq.to_be_bytes(), value.as_slice());
            metas.push((
                seq,
                ChunkMeta { count: *count as u32, bytes: value.len() as u64, accepted_at, in_flight: false },
            ));
            seq += *count as u64;
        }
        self.inner.chunks.apply_batch(batch).map_err(|e| self.storage(e))?;
        self.inner.meta.insert(META_NEXT_SEQ, &seq.to_be_bytes()).map_err(|e| self.storage(e))?;
        for (key, meta) in metas {
            state.bytes += meta.bytes;
            state.records += u64::from(meta.count);
            state.index.insert(key, meta);
        }
        state.next_seq = seq;
        Ok(Some(AppendReceipt { first_seq, records: seq - first_seq, dropped }))
    }

    fn evict_oldest(&self, state: &mut State, mut to_free: u64) -> Result<u64, BufferError> {
        let mut dropped = 0;
        let mut batch = sled::Batch::default();
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
        for seq in victims {
            if let Some(meta) = state.forget(seq) {
                dropped += u64::from(meta.count);
                batch.remove(&seq.to_be_bytes());
            }
        }
        self.inner.chunks.apply_batch(batch).map_err(|e| self.storage(e))?;
        self.inner.counters.dropped.fetch_add(dropped, Ordering::Relaxed);
        warn!(message = "Buffer full; dropped the oldest records (when_full: drop_oldest).", dropped, path = %self.inner.path.display());
        Ok(dropped)
    }

    async fn make_durable(&self) -> Result<(), BufferError> {
        let Some(committer) = &self.inner.committer else { return Ok(()) };
        let (tx, rx) = oneshot::channel();
        {
            let waiters = committer.waiters.lock().unwrap_or_else(|p| p.into_inner());
            waiters.as_ref().ok_or(BufferError::Closed)?.send(tx).map_err(|_| BufferError::Closed)?;
        }
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.storage(e)),
            Err(_) => Err(BufferError::Closed),
        }
    }

    fn discard_corrupt(&self, seq: u64, error: &ChunkError) -> Result<(), BufferError> {
        error!(message = "Removing corrupted buffer chunk; its records are lost.", %error, seq, path = %self.inner.path.display());
        self.lock().forget(seq);
        self.inner.chunks.remove(seq.to_be_bytes()).map_err(|e| self.storage(e))?;
        self.inner.counters.corrupted_chunks.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn storage(&self, source: sled::Error) -> BufferError {
        BufferError::Storage { path: self.inner.path.clone(), source }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the index consistent at chunk granularity; keep going.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Overwrites a stored chunk with garbage, as a disk error would.
    #[cfg(test)]
    pub(crate) fn corrupt_chunk_for_test(&self, seq: u64) {
        self.inner.chunks.insert(seq.to_be_bytes(), b"\x01garbage-garbage-garbage".as_slice()).unwrap();
    }

    /// Keys of the stored chunks.
    #[cfg(test)]
    pub(crate) fn chunk_keys_for_test(&self) -> Vec<u64> {
        self.lock().index.keys().copied().collect()
    }
}

/// The group-commit thread: waits for the first waiter, lets a window pass, then one fsync answers everyone
/// who arrived meanwhile. Without a window every waiter gets its own fsync (`always`).
fn spawn_committer(db: sled::Db, path: &Path, window: Option<Duration>) -> std::io::Result<Committer> {
    let (tx, rx) = mpsc::channel::<CommitWaiter>();
    let mut files = SledFiles::open(path)?;
    let thread = std::thread::Builder::new().name("buffer-commit".into()).spawn(move || {
        while let Ok(first) = rx.recv() {
            let mut waiters = vec![first];
            if let Some(window) = window {
                if !window.is_zero() {
                    std::thread::sleep(window);
                }
                waiters.extend(rx.try_iter());
            }
            let result = db.flush().map(drop).and_then(|()| files.sync().map_err(sled::Error::Io));
            for waiter in waiters {
                let _ = waiter.send(result.clone());
            }
        }
    })?;
    Ok(Committer { waiters: Mutex::new(Some(tx)), thread: Some(thread) })
}

/// sled log segment size; values above a quarter of it become separate blob files.
const SEGMENT_BYTES: usize = 8 << 20;

/// The files sled writes, for a real `fdatasync` after its flush.
struct SledFiles {
    log: std::fs::File,
    blobs: PathBuf,
    synced_blobs: std::collections::HashSet<std::ffi::OsString>,
}

impl SledFiles {
    fn open(path: &Path) -> std::io::Result<Self> {
        Ok(Self {
            log: std::fs::File::open(path.join("db"))?,
            blobs: path.join("blobs"),
            synced_blobs: Default::default(),
        })
    }

    fn sync(&mut self) -> std::io::Result<()> {
        self.log.sync_data()?;
        let Ok(entries) = std::fs::read_dir(&self.blobs) else { return Ok(()) };
        let mut present = std::collections::HashSet::new();
        let mut synced_new = false;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if !self.synced_blobs.contains(&name) {
                std::fs::File::open(entry.path())?.sync_data()?;
                synced_new = true;
            }
            present.insert(name);
        }
        if synced_new {
            std::fs::File::open(&self.blobs)?.sync_all()?;
        }
        // Forget blobs sled has garbage-collected.
        self.synced_blobs = present;
        Ok(())
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
