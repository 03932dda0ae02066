//! NDJSON file tail: follows a file that another program appends records to, one JSON record per line.
//!
//! The read position is a checkpoint in the agent's state store, written only after the records before it are
//! durable in the buffer, so a restart neither loses nor re-reads lines (beyond the at-least-once overlap of a
//! crash between the two). Rotation is handled both ways tools do it: *rename and create* (the old file is read
//! to its end through the still-open handle before the new one is opened) and *copy-truncate* (a file shorter
//! than the position, or whose first line changed, starts over at 0 — the first line's checksum identifies the
//! file's content, as in Vector's file source, so a truncated file that grew back past the old position is still
//! recognised). A line that is not a valid record is skipped, counted and logged with
//! its line number; the lines around it are kept. An incomplete last line waits for its newline.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use akosha_protocol::Record;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::buffer::BufferError;

/// Where records from a source go (the agent, or a test sink).
pub trait RecordSink: Send + Sync {
    /// Stores records durably; returns how many.
    fn accept(&self, records: &[Record]) -> impl std::future::Future<Output = Result<u64, BufferError>> + Send;
}

/// A tailed file's settings.
#[derive(Debug, Clone)]
pub struct FileTailConfig {
    /// The file.
    pub path: PathBuf,
    /// How often to look for new lines.
    pub poll_interval: Duration,
    /// Most bytes read per step.
    pub max_read_bytes: usize,
}

/// Counters of one tail.
#[derive(Debug, Default)]
pub struct FileTailStats {
    /// Lines turned into records.
    pub records: AtomicU64,
    /// Lines skipped as invalid.
    pub invalid_lines: AtomicU64,
    /// Rotations and truncations seen.
    pub rotations: AtomicU64,
    /// Current read position.
    pub position: AtomicU64,
}

/// Persisted position: which file (device, inode) and how far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Checkpoint {
    dev: u64,
    ino: u64,
    offset: u64,
    line: u64,
    /// Checksum of the first line + 1 (0: no complete first line yet).
    head: u64,
}

impl Checkpoint {
    fn encode(&self) -> [u8; 40] {
        let mut out = [0u8; 40];
        for (i, v) in [self.dev, self.ino, self.offset, self.line, self.head].into_iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&v.to_be_bytes());
        }
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let v = |i: usize| bytes.get(i * 8..i * 8 + 8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
        Some(Checkpoint { dev: v(0)?, ino: v(1)?, offset: v(2)?, line: v(3)?, head: v(4)? })
    }
}

/// Checksum of the file's first complete line (at most 1 KiB), `+ 1` so that 0 means "none yet".
fn head_fingerprint(file: &std::fs::File) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 1024];
    let n = file.read_at(&mut buf, 0).unwrap_or(0);
    match buf[..n].iter().position(|b| *b == b'\n') {
        Some(end) => u64::from(crc32c::crc32c(&buf[..=end])) + 1,
        None if n == buf.len() => u64::from(crc32c::crc32c(&buf)) + 1,
        None => 0,
    }
}

struct Open {
    file: std::fs::File,
    dev: u64,
    ino: u64,
    offset: u64,
    line: u64,
    head: u64,
    carry: Vec<u8>,
    /// Inside a line longer than [`MAX_LINE_BYTES`]: discard up to its newline.
    skipping: bool,
}

/// Longest line kept in memory; a valid record is far smaller (text is capped at 4 MiB).
const MAX_LINE_BYTES: usize = 16 << 20;

/// Follows one file until `shutdown`.
pub async fn run<S: RecordSink>(
    config: FileTailConfig,
    system_id: String,
    sink: &S,
    state: sled::Tree,
    stats: &FileTailStats,
    mut shutdown: watch::Receiver<bool>,
) {
    let key = format!("file:{}", config.path.display());
    let mut current: Option<Open> = None;
    while !*shutdown.borrow() {
        if current.is_none() {
            current = open(&config, &state, &key, stats);
        }
        if let Some(open) = current.as_mut() {
            match step(&config, &system_id, open, sink, stats).await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(StepError::Full) => {}
                Err(StepError::Io(error)) => {
                    warn!(message = "Failed to read tailed file; reopening.", %error, path = %config.path.display());
                    current = None;
                }
            }
            if let Some(open) = current.as_ref() {
                let checkpoint =
                    Checkpoint { dev: open.dev, ino: open.ino, offset: open.offset, line: open.line, head: open.head };
                let _ = state.insert(key.as_bytes(), checkpoint.encode().as_slice());
                stats.position.store(open.offset, Ordering::Relaxed);
            }
            if let Some(open) = current.as_ref()
                && rotated(&config, open)
            {
                stats.rotations.fetch_add(1, Ordering::Relaxed);
                info!(message = "Tailed file was rotated; following the new file.", path = %config.path.display());
                let _ = state.remove(key.as_bytes());
                current = None;
                continue;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(config.poll_interval) => {}
            _ = shutdown.changed() => {}
        }
    }
}

fn open(config: &FileTailConfig, state: &sled::Tree, key: &str, stats: &FileTailStats) -> Option<Open> {
    let mut file = std::fs::File::open(&config.path).ok()?;
    let meta = file.metadata().ok()?;
    let saved = state.get(key.as_bytes()).ok().flatten().and_then(|v| Checkpoint::decode(&v));
    let head = head_fingerprint(&file);
    let (offset, line) = match saved {
        Some(c)
            if c.dev == meta.dev()
                && c.ino == meta.ino()
                && c.offset <= meta.len()
                && (c.head == 0 || c.head == head) =>
        {
            (c.offset, c.line)
        }
        Some(_) => {
            stats.rotations.fetch_add(1, Ordering::Relaxed);
            warn!(message = "Tailed file changed while the agent was stopped; reading the new file from its start.", path = %config.path.display());
            (0, 0)
        }
        None => (0, 0),
    };
    file.seek(SeekFrom::Start(offset)).ok()?;
    Some(Open { file, dev: meta.dev(), ino: meta.ino(), offset, line, head, carry: Vec::new(), skipping: false })
}

/// Rename-rotation: the path now names another file and the old one is read to its end. Truncation: the same
/// file is now shorter than what was read.
fn rotated(config: &FileTailConfig, open: &Open) -> bool {
    match std::fs::metadata(&config.path) {
        Ok(meta) if meta.dev() != open.dev || meta.ino() != open.ino => {
            open.file.metadata().is_ok_and(|m| m.len() <= open.offset + open.carry.len() as u64)
        }
        Ok(meta) => meta.len() < open.offset || (open.head != 0 && head_fingerprint(&open.file) != open.head),
        Err(_) => false,
    }
}

enum StepError {
    Full,
    Io(std::io::Error),
}

/// Reads what is new and stores its complete lines; `Ok(true)` if there may be more to read right away.
async fn step<S: RecordSink>(
    config: &FileTailConfig,
    system_id: &str,
    open: &mut Open,
    sink: &S,
    stats: &FileTailStats,
) -> Result<bool, StepError> {
    // `open.offset` is where the unconsumed bytes start; `carry` holds those already read (a partial line).
    let mut buf = std::mem::take(&mut open.carry);
    let read = (&open.file).take(config.max_read_bytes as u64).read_to_end(&mut buf).map_err(StepError::Io)?;
    if read == 0 {
        open.carry = buf;
        return Ok(false);
    }
    if open.skipping {
        match buf.iter().position(|b| *b == b'\n') {
            None => {
                open.offset += buf.len() as u64;
                return Ok(read == config.max_read_bytes);
            }
            Some(end) => {
                open.offset += end as u64 + 1;
                open.line += 1;
                open.skipping = false;
                buf.drain(..=end);
            }
        }
    }
    let complete = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    if complete == 0 && buf.len() > MAX_LINE_BYTES {
        warn!(message = "Skipping a line longer than any valid record.", line = open.line + 1, bytes = buf.len(), path = %config.path.display());
        stats.invalid_lines.fetch_add(1, Ordering::Relaxed);
        open.offset += buf.len() as u64;
        open.skipping = true;
        return Ok(read == config.max_read_bytes);
    }
    let now = jiff::Timestamp::now().as_microsecond();
    let mut records = Vec::new();
    let mut line_no = open.line;
    let mut invalid = 0;
    for line in buf[..complete].split_inclusive(|b| *b == b'\n') {
        line_no += 1;
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match crate::ingest::parse_line(line, system_id, now) {
            Ok(record) => records.push(record),
            Err(error) => {
                invalid += 1;
                warn!(message = "Skipping invalid line in tailed file.", %error, line = line_no, path = %config.path.display());
            }
        }
    }
    if !records.is_empty() {
        match sink.accept(&records).await {
            Ok(_) => {}
            Err(error) => {
                // Nothing advances: the same bytes are read again next time.
                open.file.seek(SeekFrom::Start(open.offset)).map_err(StepError::Io)?;
                open.carry.clear();
                if !matches!(error, BufferError::Full { .. }) {
                    warn!(message = "Failed to store tailed records; will retry.", %error, path = %config.path.display());
                }
                return Err(StepError::Full);
            }
        }
    }
    stats.records.fetch_add(records.len() as u64, Ordering::Relaxed);
    stats.invalid_lines.fetch_add(invalid, Ordering::Relaxed);
    open.offset += complete as u64;
    open.line = line_no;
    if open.head == 0 {
        open.head = head_fingerprint(&open.file);
    }
    open.carry = buf[complete..].to_vec();
    Ok(read == config.max_read_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::Mutex;

    #[derive(Default)]
    struct VecSink(Mutex<Vec<String>>);

    impl RecordSink for VecSink {
        async fn accept(&self, records: &[Record]) -> Result<u64, BufferError> {
            self.0.lock().unwrap().extend(records.iter().map(|r| r.id.clone()));
            Ok(records.len() as u64)
        }
    }

    fn line(id: &str) -> String {
        format!("{{\"id\":\"{id}\",\"kind\":\"conversation\",\"text\":\"t\"}}\n")
    }

    async fn settle(sink: &VecSink, n: usize) {
        for _ in 0..200 {
            if sink.0.lock().unwrap().len() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn follows_appends_partial_lines_rotation_truncation_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("records.ndjson");
        let db = sled::Config::new().temporary(true).open().unwrap();
        let state = db.open_tree("sources").unwrap();
        let config =
            FileTailConfig { path: path.clone(), poll_interval: Duration::from_millis(10), max_read_bytes: 64 };
        let sink = VecSink::default();
        let stats = FileTailStats::default();
        let (stop, stop_rx) = watch::channel(false);
        let mut file = std::fs::File::create(&path).unwrap();
        write!(file, "{}{}not json\n{}", line("a"), line("b"), &line("c")[..10]).unwrap();
        let tail = run(config.clone(), "h".into(), &sink, state.clone(), &stats, stop_rx.clone());
        let driver = async {
            settle(&sink, 2).await;
            write!(file, "{}", &line("c")[10..]).unwrap();
            settle(&sink, 3).await;
            // Rename rotation: the old file gets one more line before the new one appears.
            write!(file, "{}", line("d")).unwrap();
            std::fs::rename(&path, dir.path().join("records.ndjson.1")).unwrap();
            let mut new = std::fs::File::create(&path).unwrap();
            write!(new, "{}", line("e")).unwrap();
            settle(&sink, 5).await;
            // Copy-truncate.
            new.set_len(0).unwrap();
            let mut new = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            write!(new, "{}", line("f")).unwrap();
            settle(&sink, 6).await;
            stop.send(true).unwrap();
        };
        tokio::join!(tail, driver);
        assert_eq!(*sink.0.lock().unwrap(), vec!["a", "b", "c", "d", "e", "f"]);
        assert_eq!(stats.invalid_lines.load(Ordering::Relaxed), 1);
        assert!(stats.rotations.load(Ordering::Relaxed) >= 2);

        // A restart resumes at the checkpoint: nothing is read twice, new lines arrive.
        let mut new = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        write!(new, "{}", line("g")).unwrap();
        let (stop, stop_rx) = watch::channel(false);
        let sink2 = VecSink::default();
        let stats2 = FileTailStats::default();
        let tail = run(config, "h".into(), &sink2, state, &stats2, stop_rx);
        let driver = async {
            settle(&sink2, 1).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            stop.send(true).unwrap();
        };
        tokio::join!(tail, driver);
        assert_eq!(*sink2.0.lock().unwrap(), vec!["g"]);
    }

    #[tokio::test]
    async fn an_endless_line_is_skipped_without_holding_it_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("records.ndjson");
        let mut file = std::fs::File::create(&path).unwrap();
        write!(file, "{}", line("a")).unwrap();
        file.write_all(&vec![b'x'; MAX_LINE_BYTES + 1000]).unwrap();
        write!(file, "\n{}", line("b")).unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let config = FileTailConfig { path, poll_interval: Duration::from_millis(10), max_read_bytes: 4 << 20 };
        let (sink, stats) = (VecSink::default(), FileTailStats::default());
        let (stop, stop_rx) = watch::channel(false);
        let tail = run(config, "h".into(), &sink, db.open_tree("s").unwrap(), &stats, stop_rx);
        let driver = async {
            settle(&sink, 2).await;
            stop.send(true).unwrap();
        };
        tokio::join!(tail, driver);
        assert_eq!(*sink.0.lock().unwrap(), vec!["a", "b"]);
        assert_eq!(stats.invalid_lines.load(Ordering::Relaxed), 1);
    }
}
