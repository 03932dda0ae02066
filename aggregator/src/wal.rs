//! # Aggregator write-ahead log
//!
//! Every accepted batch is appended here and fsynced **before** the agent gets its ack; the hot tier is a
//! replica of the log that is rebuilt from it on restart. Commits are grouped and pipelined over two threads: the
//! writer takes every request queued meanwhile (optionally waiting a short window for more) and writes them with
//! one `write`; the flusher makes everything written so far durable with one `fdatasync` and only then answers
//! each request, in order, and hands its records to the hot tier. The next group is being written while the
//! previous one is being synced, so the disk never waits for the application.
//!
//! ```text
//!  <dir>/00000000000000000001.wal, 00000000000000000002.wal, …   (rolled at `segment_bytes`)
//!  <dir>/checkpoint.json   (retention: warm marks and released agents' high-water marks)
//!
//!  segment := "AKWAL001" entry*
//!  entry   := u32 body_len │ u32 crc32c(body) │ body
//!  body    := u8 kind=1 │ str system_id │ u64 buffer_epoch │ u64 first_record │ u64 last_record
//!             │ u32 record_count │ u8 codec │ i8 level │ u32 uncompressed_len │ payload (as received)
//! ```
//!
//! The payload is stored exactly as the agent compressed it: the log never re-encodes records. Segments are
//! written with direct I/O where the filesystem allows (`akosha_fsio`: the log is read only after a restart,
//! so copying it into the page cache was a quarter of the receiving side's CPU); the segment being appended may
//! therefore end in less than a block of zeros after its last entry.
//!
//! ## Recovery
//! Segments are read in order. A torn tail (a crash in the middle of a group write) ends the last segment: it is
//! truncated back to the last complete entry; nothing in it was acknowledged, because acks follow the fsync. An
//! entry whose checksum fails in the middle of the log is skipped, counted and logged; a length that cannot be
//! right ends that segment, and the remainder is counted as lost. Zero padding after the last entry is the end of
//! the log, not a loss (cut off silently in the last segment). Start-up never fails because of a bad entry.
//!
//! ## Retention
//! The hot tier lives only in memory, so the log is its durable copy until records reach the warm tier. Each
//! completed hot→warm move leaves a [`WarmMark`]: every record older than its cutoff and logged before the
//! position the hot tier had applied when the move started is durable in warm (or beyond). [`Wal::release`] saves the marks and the
//! agents' high-water marks to `checkpoint.json` (written atomically) and then deletes the sealed segments whose
//! newest record a mark covers. At start the marks are read first, and records they cover are not replayed
//! into hot — they would otherwise travel to warm, and from there to cold, a second time.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use akosha_fsio::AppendFile;
use akosha_protocol::{Codec, MAX_BATCH_UNCOMPRESSED_LEN, Record, decode_records};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

const SEGMENT_MAGIC: &[u8; 8] = b"AKWAL001";
const ENTRY_HEADER_LEN: usize = 8;
const ENTRY_KIND_BATCH: u8 = 1;
/// No single entry can be larger than a frame; anything bigger is a corrupt length.
const MAX_ENTRY_LEN: usize = akosha_protocol::DEFAULT_MAX_FRAME_LEN + 4096;

/// WAL settings.
#[derive(Debug, Clone)]
pub struct WalConfig {
    /// Directory of the segments.
    pub dir: PathBuf,
    /// Roll to a new segment past this size.
    pub segment_bytes: u64,
    /// Extra wait for more requests before each group commit (0 = commit as soon as the previous one is done).
    pub group_commit_window: Duration,
    /// Requests that may queue for the writer (backpressure on the receivers beyond that).
    pub queue_depth: usize,
}

/// One batch as logged.
#[derive(Debug, Clone, PartialEq)]
pub struct WalEntry {
    /// The agent's authenticated identity.
    pub system_id: String,
    /// The agent's buffer identity.
    pub buffer_epoch: u64,
    /// First buffer sequence number in the batch.
    pub first_record: u64,
    /// Last buffer sequence number in the batch.
    pub last_record: u64,
    /// Records in the payload.
    pub record_count: u32,
    /// Payload compression.
    pub codec: Codec,
    /// Payload size once decompressed.
    pub uncompressed_len: u32,
    /// Payload as received.
    pub payload: Vec<u8>,
}

impl WalEntry {
    /// Decompresses and decodes the records.
    pub fn records(&self) -> Result<Vec<Record>, String> {
        let raw = self
            .codec
            .decompress(&self.payload, self.uncompressed_len as usize, MAX_BATCH_UNCOMPRESSED_LEN)
            .map_err(|e| e.to_string())?;
        decode_records(&raw, self.record_count as usize).map_err(|e| e.to_string())
    }
}

/// WAL failures.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WalError {
    /// Disk I/O failed; the batch is not durable. Retryable after the operator fixes the disk; the log stops
    /// accepting writes so that nothing is acknowledged out of order.
    #[error("write-ahead log I/O failed at {path}: {message}")]
    Io {
        /// File involved.
        path: PathBuf,
        /// OS error.
        message: String,
    },
    /// The writer has stopped (shutdown or an earlier I/O failure).
    #[error("write-ahead log is closed")]
    Closed,
}

impl WalError {
    fn io(path: &Path, e: std::io::Error) -> Self {
        WalError::Io { path: path.to_owned(), message: e.to_string() }
    }
}

/// What recovery found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Entries replayed.
    pub entries: u64,
    /// Entries skipped because their checksum failed.
    pub corrupt_entries: u64,
    /// Bytes cut from the end of the last segment (torn tail) or lost after an impossible length.
    pub truncated_bytes: u64,
    /// Segments read.
    pub segments: u64,
}

/// Where an entry is in the log: its segment in the high 32 bits, its index within the segment in the low 32.
/// Positions order like the log.
pub fn position(segment: u64, entry: u64) -> u64 {
    (segment << 32) | (entry & 0xFFFF_FFFF)
}

/// A completed hot→warm move: records older than `cutoff_us` logged before position `applied` are in warm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WarmMark {
    /// Every entry before this position had been applied to the hot tier when the move started.
    pub applied: u64,
    /// The move's cutoff (microseconds since the epoch).
    pub cutoff_us: i64,
}

impl WarmMark {
    /// Whether a record logged at `position` with timestamp `ts` is durable in warm under any of `marks`.
    pub fn covered(marks: &[WarmMark], position: u64, ts: i64) -> bool {
        marks.iter().any(|m| position < m.applied && ts < m.cutoff_us)
    }

    /// Whether every record of `segment`, the newest of which has timestamp `max_ts`, is covered.
    fn covers_segment(marks: &[WarmMark], segment: u64, max_ts: i64) -> bool {
        marks.iter().any(|m| segment < m.applied >> 32 && max_ts < m.cutoff_us)
    }
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Checkpoint {
    marks: Vec<WarmMark>,
    /// `(system_id, buffer_epoch, last durable record)`.
    high_water: Vec<(String, u64, u64)>,
}

const CHECKPOINT: &str = "checkpoint.json";

fn read_checkpoint(dir: &Path) -> Result<Checkpoint, WalError> {
    let path = dir.join(CHECKPOINT);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| WalError::Io { path, message: format!("unreadable checkpoint: {e}") }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Checkpoint::default()),
        Err(e) => Err(WalError::io(&path, e)),
    }
}

/// Durable, ordered storage of batches. Cheap to clone.
#[derive(Clone)]
pub struct Wal {
    requests: mpsc::Sender<WalRequest>,
    shared: Arc<WalShared>,
}

struct WalShared {
    dir: PathBuf,
    /// Newest record timestamp per segment (`i64::MAX` when unknown).
    segment_max_ts: Mutex<BTreeMap<u64, i64>>,
    /// The segment being appended to.
    current_segment: AtomicU64,
    /// The position after the last replayed entry.
    replayed_end: u64,
    marks: Mutex<Vec<WarmMark>>,
    high_water: Mutex<HashMap<(String, u64), u64>>,
    bytes: AtomicU64,
    segments: AtomicU64,
    group_commits: AtomicU64,
    failed: AtomicBool,
}

struct WalRequest {
    entry: WalEntry,
    records: Vec<Record>,
    done: oneshot::Sender<Result<(), WalError>>,
    /// Set by the writer.
    position: u64,
}

/// Records that became durable, for the hot tier.
#[derive(Debug, Clone, PartialEq)]
pub struct DurableBatch {
    /// Where they were logged ([`position`]).
    pub position: u64,
    /// The records.
    pub records: Vec<Record>,
}

/// Resolves when a submitted batch is durable (or failed).
pub type Durability = oneshot::Receiver<Result<(), WalError>>;

impl Wal {
    /// The marks saved by earlier [`Wal::release`] calls: records they cover need no replay.
    pub fn warm_marks(dir: &Path) -> Result<Vec<WarmMark>, WalError> {
        Ok(read_checkpoint(dir)?.marks)
    }

    /// Opens the log, replays every entry through `replay` (in log order, with its [`position`]; `replay` returns
    /// the entry's newest record timestamp, `None` if unknown), then starts the writer, which sends the records of
    /// each durable batch to `durable`.
    pub fn open(
        config: WalConfig,
        mut replay: impl FnMut(u64, &WalEntry) -> Option<i64>,
        durable: std::sync::mpsc::SyncSender<DurableBatch>,
    ) -> Result<(Wal, RecoveryReport), WalError> {
        std::fs::create_dir_all(&config.dir).map_err(|e| WalError::io(&config.dir, e))?;
        let checkpoint = read_checkpoint(&config.dir)?;
        let mut segments = list_segments(&config.dir)?;
        let mut report = RecoveryReport::default();
        // High-water marks of released segments come from the checkpoint; the log's own entries add the rest.
        let mut high_water: HashMap<(String, u64), u64> =
            checkpoint.high_water.into_iter().map(|(system, epoch, hw)| ((system, epoch), hw)).collect();
        let mut segment_max_ts = BTreeMap::new();
        let mut total_bytes = 0;
        let mut entries_in_last = 0;
        let last_index = segments.len().saturating_sub(1);
        for (i, (id, path)) in segments.iter().enumerate() {
            let max_ts = segment_max_ts.entry(*id).or_insert(i64::MIN);
            let mut index = 0;
            let len = replay_segment(path, i == last_index, &mut report, &mut |entry| {
                let key = (entry.system_id.clone(), entry.buffer_epoch);
                let hw = high_water.entry(key).or_insert(0);
                *hw = (*hw).max(entry.last_record);
                *max_ts = (*max_ts).max(replay(position(*id, index), entry).unwrap_or(i64::MAX));
                index += 1;
            })?;
            entries_in_last = index;
            total_bytes += len;
        }
        report.segments = segments.len() as u64;
        if report.corrupt_entries > 0 || report.truncated_bytes > 0 {
            warn!(message = "Write-ahead log recovered with losses.", corrupt_entries = report.corrupt_entries, truncated_bytes = report.truncated_bytes, dir = %config.dir.display());
        }
        info!(
            message = "Write-ahead log replayed.",
            entries = report.entries,
            segments = report.segments,
            bytes = total_bytes
        );

        let (id, path) = match segments.pop() {
            Some((id, path)) => (id, path),
            None => (1, segment_path(&config.dir, 1)),
        };
        let segment = open_segment(&path)?;
        segment_max_ts.entry(id).or_insert(i64::MIN);
        let shared = Arc::new(WalShared {
            dir: config.dir.clone(),
            segment_max_ts: Mutex::new(segment_max_ts),
            current_segment: AtomicU64::new(id),
            replayed_end: position(id, entries_in_last),
            marks: Mutex::new(checkpoint.marks),
            high_water: Mutex::new(high_water),
            bytes: AtomicU64::new(total_bytes),
            segments: AtomicU64::new(report.segments.max(1)),
            group_commits: AtomicU64::new(0),
            failed: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel(config.queue_depth.max(1));
        let writer = Writer {
            config: config.clone(),
            segment_id: id,
            entries: entries_in_last,
            segment,
            shared: shared.clone(),
        };
        std::thread::Builder::new()
            .name("wal-writer".into())
            .spawn(move || writer.run(rx, durable))
            .map_err(|e| WalError::io(&config.dir, e))?;
        Ok((Wal { requests: tx, shared }, report))
    }

    /// Appends a batch; resolves once it is durable. `records` are the decoded records, handed to the hot tier
    /// after the fsync.
    pub async fn append(&self, entry: WalEntry, records: Vec<Record>) -> Result<(), WalError> {
        self.submit(entry, records).await?.await.map_err(|_| WalError::Closed)?
    }

    /// Queues a batch (waiting only for queue space) and returns a receiver that resolves once it is durable, so
    /// that one session can pipeline several batches into the same group commit.
    pub async fn submit(&self, entry: WalEntry, records: Vec<Record>) -> Result<Durability, WalError> {
        let (done, result) = oneshot::channel();
        self.requests.send(WalRequest { entry, records, done, position: 0 }).await.map_err(|_| WalError::Closed)?;
        Ok(result)
    }

    /// Highest durable record sequence number for an agent buffer.
    pub fn high_water(&self, system_id: &str, buffer_epoch: u64) -> Option<u64> {
        let map = self.shared.high_water.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&(system_id.to_owned(), buffer_epoch)).copied()
    }

    /// The segment being appended to.
    pub fn current_segment(&self) -> u64 {
        self.shared.current_segment.load(Ordering::Relaxed)
    }

    /// The position after the last entry replayed at open (everything before it is in the hot tier then).
    pub fn replayed_end(&self) -> u64 {
        self.shared.replayed_end
    }

    /// Records a completed hot→warm move, saves the checkpoint, and deletes the sealed segments whose records
    /// are all durable in warm now. Returns the segments deleted.
    pub fn release(&self, mark: WarmMark) -> Result<u64, WalError> {
        let dir = &self.shared.dir;
        let marks = {
            let mut marks = self.shared.marks.lock().unwrap_or_else(|p| p.into_inner());
            // A mark that another covers entirely adds nothing.
            if !marks.iter().any(|m| m.applied >= mark.applied && m.cutoff_us >= mark.cutoff_us) {
                marks.retain(|m| !(m.applied <= mark.applied && m.cutoff_us <= mark.cutoff_us));
                marks.push(mark);
            }
            marks.clone()
        };
        let high_water: Vec<(String, u64, u64)> = {
            let map = self.shared.high_water.lock().unwrap_or_else(|p| p.into_inner());
            map.iter().map(|((system, epoch), hw)| (system.clone(), *epoch, *hw)).collect()
        };
        // The checkpoint must be durable before any segment whose high-water marks it carries disappears.
        let tmp = dir.join(format!("{CHECKPOINT}.tmp"));
        let bytes = serde_json::to_vec(&Checkpoint { marks: marks.clone(), high_water })
            .map_err(|e| WalError::Io { path: tmp.clone(), message: e.to_string() })?;
        let write = || -> std::io::Result<()> {
            let mut file = File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, dir.join(CHECKPOINT))?;
            File::open(dir)?.sync_all()
        };
        write().map_err(|e| WalError::io(&tmp, e))?;
        let current = self.current_segment();
        let releasable: Vec<u64> = {
            let map = self.shared.segment_max_ts.lock().unwrap_or_else(|p| p.into_inner());
            map.iter()
                .filter(|(id, max_ts)| **id < current && WarmMark::covers_segment(&marks, **id, **max_ts))
                .map(|(id, _)| *id)
                .collect()
        };
        for id in &releasable {
            let path = segment_path(dir, *id);
            let len = std::fs::metadata(&path).map_or(0, |m| m.len());
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(WalError::io(&path, e)),
            }
            self.shared.segment_max_ts.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
            self.shared.bytes.fetch_sub(len.min(self.shared.bytes.load(Ordering::Relaxed)), Ordering::Relaxed);
            self.shared.segments.fetch_sub(1, Ordering::Relaxed);
        }
        if !releasable.is_empty() {
            info!(
                message = "Write-ahead log segments released: their records are durable in the warm tier.",
                segments = releasable.len(),
                cutoff_us = mark.cutoff_us
            );
        }
        Ok(releasable.len() as u64)
    }

    /// Copies the checkpoint and every segment into `dest` (for a backup) and returns the file names. The caller
    /// keeps segments from being released meanwhile (releases happen under the warm tier's move lock); the
    /// segment being appended is copied as far as it is written, and a torn last entry in the copy is cut off
    /// when it is replayed, like after a crash.
    pub fn copy_to(&self, dest: &Path) -> Result<Vec<String>, WalError> {
        std::fs::create_dir_all(dest).map_err(|e| WalError::io(dest, e))?;
        let dir = &self.shared.dir;
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map_err(|e| WalError::io(dir, e))?
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|name| name.ends_with(".wal") || name == CHECKPOINT)
            .collect();
        names.sort();
        for name in &names {
            let from = dir.join(name);
            std::fs::copy(&from, dest.join(name)).map_err(|e| WalError::io(&from, e))?;
        }
        Ok(names)
    }

    /// Bytes in all segments.
    pub fn size_bytes(&self) -> u64 {
        self.shared.bytes.load(Ordering::Relaxed)
    }

    /// Number of segments.
    pub fn segments(&self) -> u64 {
        self.shared.segments.load(Ordering::Relaxed)
    }

    /// Group commits (fsyncs) since start.
    pub fn group_commits(&self) -> u64 {
        self.shared.group_commits.load(Ordering::Relaxed)
    }

    /// Requests waiting for the writer.
    pub fn queued(&self) -> usize {
        self.requests.max_capacity() - self.requests.capacity()
    }

    /// Most requests that can wait for the writer.
    pub fn capacity(&self) -> usize {
        self.requests.max_capacity()
    }

    /// Whether the log refuses writes after an I/O failure.
    pub fn failed(&self) -> bool {
        self.shared.failed.load(Ordering::Relaxed)
    }
}

struct Writer {
    config: WalConfig,
    segment_id: u64,
    /// Entries written to the current segment.
    entries: u64,
    segment: AppendFile,
    shared: Arc<WalShared>,
}

/// A group written to a segment, waiting for the flusher's fdatasync.
struct Written {
    file: Arc<File>,
    path: PathBuf,
    group: Vec<WalRequest>,
}

impl Writer {
    /// Writes groups back to back while the flusher makes earlier ones durable: the disk is never idle waiting
    /// for the next `write`, and every fdatasync covers everything written so far.
    fn run(mut self, mut rx: mpsc::Receiver<WalRequest>, durable: std::sync::mpsc::SyncSender<DurableBatch>) {
        let (to_flusher, flusher_rx) = std::sync::mpsc::sync_channel::<Written>(8);
        let shared = self.shared.clone();
        let flusher = std::thread::Builder::new().name("wal-flusher".into()).spawn({
            // The writer keeps a sender too, so that the channel closes only once the segment is trimmed and
            // synced: a closed channel means the log is closed.
            let durable = durable.clone();
            move || flush_loop(flusher_rx, shared, durable)
        });
        let flusher = match flusher {
            Ok(handle) => handle,
            Err(e) => {
                error!(message = "Cannot start the write-ahead log flusher.", error = %e);
                self.shared.failed.store(true, Ordering::Relaxed);
                while let Some(request) = rx.blocking_recv() {
                    let _ = request.done.send(Err(WalError::Closed));
                }
                return;
            }
        };
        while let Some(first) = rx.blocking_recv() {
            if !self.config.group_commit_window.is_zero() {
                std::thread::sleep(self.config.group_commit_window);
            }
            let mut group = vec![first];
            let mut group_bytes = group[0].entry.payload.len();
            while group_bytes < 32 << 20 {
                match rx.try_recv() {
                    Ok(request) => {
                        group_bytes += request.entry.payload.len();
                        group.push(request);
                    }
                    Err(_) => break,
                }
            }
            if self.shared.failed.load(Ordering::Relaxed) {
                for request in group {
                    let _ = request.done.send(Err(WalError::Closed));
                }
                continue;
            }
            for request in &mut group {
                request.position = position(self.segment_id, self.entries);
                self.entries += 1;
            }
            let (file, path, segment) = (self.segment.file().clone(), self.segment.path().to_owned(), self.segment_id);
            let newest = group.iter().flat_map(|r| &r.records).map(|r| r.ts).max().unwrap_or(i64::MIN);
            {
                let mut map = self.shared.segment_max_ts.lock().unwrap_or_else(|p| p.into_inner());
                let slot = map.entry(segment).or_insert(i64::MIN);
                *slot = (*slot).max(newest);
            }
            match self.write(&group) {
                Ok(()) => {
                    if to_flusher.send(Written { file, path, group }).is_err() {
                        self.shared.failed.store(true, Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    error!(message = "Write-ahead log write failed; refusing further writes until restart.", error = %e, path = %self.segment.path().display());
                    self.shared.failed.store(true, Ordering::Relaxed);
                    for request in group {
                        let _ = request.done.send(Err(e.clone()));
                    }
                }
            }
        }
        drop(to_flusher);
        let _ = flusher.join();
        let _ = self.segment.trim();
        let _ = self.segment.file().sync_all();
        drop(durable);
    }

    /// Writes a group's entries to the segment with one write, and rolls to a new segment past the size limit.
    fn write(&mut self, group: &[WalRequest]) -> Result<(), WalError> {
        let bytes = group.iter().map(|r| entry_len(&r.entry)).sum();
        self.segment
            .append_with(bytes, |out| {
                for request in group {
                    encode_entry(&request.entry, out);
                }
            })
            .map_err(|e| WalError::io(self.segment.path(), e))?;
        self.shared.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        if self.segment.len() >= self.config.segment_bytes {
            // The sealed segment keeps no padding (recovery would read past it as the end of the log anyway).
            self.segment.trim().map_err(|e| WalError::io(self.segment.path(), e))?;
            self.segment_id += 1;
            self.entries = 0;
            self.segment = open_segment(&segment_path(&self.config.dir, self.segment_id))?;
            self.shared
                .segment_max_ts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(self.segment_id)
                .or_insert(i64::MIN);
            self.shared.current_segment.store(self.segment_id, Ordering::Relaxed);
            // The new segment's directory entry must be durable too, or a crash could lose the file itself.
            File::open(&self.config.dir).and_then(|d| d.sync_all()).map_err(|e| WalError::io(&self.config.dir, e))?;
            self.shared.segments.fetch_add(1, Ordering::Relaxed);
            self.shared.bytes.fetch_add(SEGMENT_MAGIC.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Makes written groups durable in order: one fdatasync per segment for everything queued meanwhile, then the
/// acks and the hand-off to the hot tier.
fn flush_loop(
    rx: std::sync::mpsc::Receiver<Written>,
    shared: Arc<WalShared>,
    durable: std::sync::mpsc::SyncSender<DurableBatch>,
) {
    while let Ok(first) = rx.recv() {
        let mut pending = vec![first];
        pending.extend(rx.try_iter());
        let mut result = Ok(());
        let mut synced: Vec<*const File> = Vec::new();
        for written in &pending {
            let ptr = Arc::as_ptr(&written.file);
            if result.is_ok() && !synced.contains(&ptr) {
                result = written.file.sync_data().map_err(|e| WalError::io(&written.path, e));
                synced.push(ptr);
            }
        }
        match result {
            Ok(()) => {
                shared.group_commits.fetch_add(1, Ordering::Relaxed);
                {
                    let mut hw = shared.high_water.lock().unwrap_or_else(|p| p.into_inner());
                    for request in pending.iter().flat_map(|w| &w.group) {
                        let e = &request.entry;
                        let slot = hw.entry((e.system_id.clone(), e.buffer_epoch)).or_insert(0);
                        *slot = (*slot).max(e.last_record);
                    }
                }
                for request in pending.into_iter().flat_map(|w| w.group) {
                    let _ = request.done.send(Ok(()));
                    // The hot tier is a replica: if it is gone (shutdown) the data is still in the log.
                    let _ = durable.send(DurableBatch { position: request.position, records: request.records });
                }
            }
            Err(e) => {
                error!(message = "Write-ahead log fsync failed; refusing further writes until restart.", error = %e);
                shared.failed.store(true, Ordering::Relaxed);
                for request in pending.into_iter().flat_map(|w| w.group) {
                    let _ = request.done.send(Err(e.clone()));
                }
            }
        }
    }
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.wal"))
}

fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, WalError> {
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| WalError::io(dir, e))? {
        let entry = entry.map_err(|e| WalError::io(dir, e))?;
        let name = entry.file_name();
        let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".wal")).and_then(|n| n.parse::<u64>().ok()) else {
            continue;
        };
        segments.push((id, entry.path()));
    }
    segments.sort();
    Ok(segments)
}

/// Opens a segment for appending, writing the magic (durably) if it is new.
fn open_segment(path: &Path) -> Result<AppendFile, WalError> {
    let io = |e| WalError::io(path, e);
    let file = OpenOptions::new().write(true).create(true).truncate(false).open(path).map_err(io)?;
    if file.metadata().map_err(io)?.len() == 0 {
        (&file).write_all(SEGMENT_MAGIC).map_err(io)?;
        file.sync_all().map_err(io)?;
    }
    AppendFile::open(path).map_err(io)
}

/// Replays one segment; returns its length after any truncation.
fn replay_segment(
    path: &Path,
    is_last: bool,
    report: &mut RecoveryReport,
    on_entry: &mut dyn FnMut(&WalEntry),
) -> Result<u64, WalError> {
    let mut data = Vec::new();
    File::open(path).and_then(|mut f| f.read_to_end(&mut data)).map_err(|e| WalError::io(path, e))?;
    if data.len() < SEGMENT_MAGIC.len() || &data[..SEGMENT_MAGIC.len()] != SEGMENT_MAGIC {
        if is_last && data.len() < SEGMENT_MAGIC.len() {
            // Created but the magic never reached the disk: an empty segment.
            let file = OpenOptions::new().write(true).open(path).map_err(|e| WalError::io(path, e))?;
            file.set_len(0).map_err(|e| WalError::io(path, e))?;
            report.truncated_bytes += data.len() as u64;
            return Ok(0);
        }
        error!(message = "Write-ahead log segment has no valid header; skipping it.", path = %path.display(), bytes = data.len());
        report.truncated_bytes += data.len() as u64;
        return Ok(data.len() as u64);
    }
    let mut pos = SEGMENT_MAGIC.len();
    let mut padding = false;
    while pos < data.len() {
        let rest = &data[pos..];
        if akosha_fsio::is_padding(rest) {
            // The padding a direct write leaves after the last entry (see `akosha_fsio`), however short: the end
            // of the log. An entry never starts with zeros to the end of the file (its length is not zero).
            padding = true;
            break;
        }
        let Some(header) = rest.first_chunk::<ENTRY_HEADER_LEN>() else { break };
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len == 0 || len > MAX_ENTRY_LEN {
            error!(message = "Write-ahead log entry has an impossible length; the rest of the segment is lost.", path = %path.display(), offset = pos, len);
            break;
        }
        let Some(body) = rest.get(ENTRY_HEADER_LEN..ENTRY_HEADER_LEN + len) else { break };
        if crc32c::crc32c(body) != crc {
            error!(message = "Skipping write-ahead log entry with a bad checksum.", path = %path.display(), offset = pos);
            report.corrupt_entries += 1;
        } else {
            match decode_entry(body) {
                Some(entry) => {
                    report.entries += 1;
                    on_entry(&entry);
                }
                None => {
                    error!(message = "Skipping write-ahead log entry that does not decode.", path = %path.display(), offset = pos);
                    report.corrupt_entries += 1;
                }
            }
        }
        pos += ENTRY_HEADER_LEN + len;
    }
    if padding {
        if is_last {
            let file = OpenOptions::new().write(true).open(path).map_err(|e| WalError::io(path, e))?;
            file.set_len(pos as u64).map_err(|e| WalError::io(path, e))?;
        }
        return Ok(pos as u64);
    }
    if pos < data.len() {
        let lost = (data.len() - pos) as u64;
        report.truncated_bytes += lost;
        if is_last {
            warn!(message = "Truncating torn tail of the write-ahead log (never acknowledged).", path = %path.display(), bytes = lost);
            let file = OpenOptions::new().write(true).open(path).map_err(|e| WalError::io(path, e))?;
            file.set_len(pos as u64).map_err(|e| WalError::io(path, e))?;
            file.sync_all().map_err(|e| WalError::io(path, e))?;
            return Ok(pos as u64);
        }
    }
    Ok(data.len() as u64)
}

/// Bytes [`encode_entry`] writes for `entry`.
fn entry_len(entry: &WalEntry) -> usize {
    ENTRY_HEADER_LEN + 1 + 4 + entry.system_id.len() + 8 + 8 + 8 + 4 + 2 + 4 + entry.payload.len()
}

fn encode_entry(entry: &WalEntry, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; ENTRY_HEADER_LEN]);
    out.push(ENTRY_KIND_BATCH);
    out.extend_from_slice(&(entry.system_id.len() as u32).to_le_bytes());
    out.extend_from_slice(entry.system_id.as_bytes());
    out.extend_from_slice(&entry.buffer_epoch.to_le_bytes());
    out.extend_from_slice(&entry.first_record.to_le_bytes());
    out.extend_from_slice(&entry.last_record.to_le_bytes());
    out.extend_from_slice(&entry.record_count.to_le_bytes());
    let (tag, level) = entry.codec.to_wire();
    out.push(tag);
    out.push(level as u8);
    out.extend_from_slice(&entry.uncompressed_len.to_le_bytes());
    out.extend_from_slice(&entry.payload);
    let body_len = (out.len() - start - ENTRY_HEADER_LEN) as u32;
    let crc = crc32c::crc32c(&out[start + ENTRY_HEADER_LEN..]);
    out[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    debug_assert_eq!(out.len() - start, entry_len(entry));
}

fn decode_entry(body: &[u8]) -> Option<WalEntry> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = body.get(at..at.checked_add(n)?)?;
        at += n;
        Some(s)
    };
    if take(1)?[0] != ENTRY_KIND_BATCH {
        return None;
    }
    let u32_at = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let u64_at = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
    let id_len = u32_at(take(4)?) as usize;
    let system_id = std::str::from_utf8(take(id_len)?).ok()?.to_owned();
    let buffer_epoch = u64_at(take(8)?);
    let first_record = u64_at(take(8)?);
    let last_record = u64_at(take(8)?);
    let record_count = u32_at(take(4)?);
    let codec_bytes = take(2)?;
    let codec = Codec::from_wire(codec_bytes[0], codec_bytes[1] as i8).ok()?;
    let uncompressed_len = u32_at(take(4)?);
    let payload = body[at..].to_vec();
    Some(WalEntry {
        system_id,
        buffer_epoch,
        first_record,
        last_record,
        record_count,
        codec,
        uncompressed_len,
        payload,
    })
}

#[cfg(test)]
#[path = "wal_tests.rs"]
mod tests;
