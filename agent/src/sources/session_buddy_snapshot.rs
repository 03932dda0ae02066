//! Session-Buddy's DuckDB files, read through private snapshots (works even when the HTTP push is off).
//!
//! Session-Buddy holds its databases' file lock while it runs: no other process can open them, not even
//! read-only, and a reader holding them would block Session-Buddy's start-up. So the live files are never
//! opened: `*.duckdb` and `*.duckdb.wal` are copied to a private snapshot directory, the copy is checked for
//! consistency (sizes and modification times unchanged across the copy, and DuckDB can open it), retried a few
//! times if a checkpoint tore it, and only the copy is opened, read-only.
//!
//! Rows map to the same records, with the same dedup keys, as Session-Buddy's HTTP push (see
//! `session_buddy_push`), so ingesting both converges instead of doubling: conversations and reflections by their
//! id, entities and relations by their uuid. `TIMESTAMP` columns hold the writer's naive local time and are
//! converted to UTC with the configured zone. Only new or changed rows are sent: a content fingerprint per
//! `(kind, id)` is kept in the agent's state store (there is no `updated_at` on conversations).
//!
//! The reading happens in a short-lived child process (`akosha-agent snapshot-worker`): DuckDB's memory and
//! code pages are released when it exits, so the resident agent stays small between snapshots, and a crash
//! inside DuckDB costs one snapshot, not the agent.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use akosha_protocol::{Record, RecordKind};
use akosha_session_buddy::{DATABASE_FILES, ReadError, open_read_only, read_database};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::sources::file_tail::RecordSink;

/// Settings of the snapshot source.
#[derive(Debug, Clone)]
pub struct SnapshotConfig {
    /// Session-Buddy's data directory (holds `reflection.duckdb`, `knowledge_graph.duckdb`).
    pub data_dir: PathBuf,
    /// Where private copies are made.
    pub snapshot_dir: PathBuf,
    /// How often to take a snapshot.
    pub interval: Duration,
    /// Zone of the naive timestamps Session-Buddy writes.
    pub zone: jiff::tz::TimeZone,
    /// The zone as configured (`local` or an IANA name), passed to the worker.
    pub timezone: String,
    /// The executable that runs `snapshot-worker` (the agent itself).
    pub worker: PathBuf,
}

/// Why a snapshot could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Copying failed.
    #[error("copying {path}: {source}")]
    Copy {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file kept changing during the copy, or the copy would not open.
    #[error("{path}: no consistent snapshot after {attempts} attempts: {reason}")]
    Torn {
        /// The database.
        path: PathBuf,
        /// Tries made.
        attempts: u32,
        /// Last problem.
        reason: String,
    },
    /// The worker process failed.
    #[error("snapshot worker: {0}")]
    Worker(String),
    /// A consistent copy could not be read (an unexpected schema).
    #[error("{path}: {source}")]
    Read {
        /// The database.
        path: PathBuf,
        /// Why.
        #[source]
        source: ReadError,
    },
}

/// Counters of the snapshot source.
#[derive(Debug, Default)]
pub struct SnapshotStats {
    /// Snapshots taken.
    pub snapshots: AtomicU64,
    /// Records sent because they were new or changed.
    pub changed_records: AtomicU64,
    /// Rows seen unchanged.
    pub unchanged_records: AtomicU64,
    /// Snapshots that failed (torn, unreadable).
    pub failures: AtomicU64,
}

const ATTEMPTS: u32 = 5;

/// Takes one snapshot of every Session-Buddy database present and maps its rows to records.
pub fn read_snapshot(config: &SnapshotConfig, system_id: &str) -> Result<Vec<Record>, SnapshotError> {
    let mut records = Vec::new();
    for name in DATABASE_FILES {
        let live = config.data_dir.join(name);
        if !live.exists() {
            continue;
        }
        let copy = consistent_copy(&live, &config.snapshot_dir.join(name))?;
        let conn = open_read_only(&copy).map_err(|source| SnapshotError::Read {
            path: live.clone(),
            source: ReadError::Query { table: "catalog", source },
        })?;
        records.extend(
            read_database(&conn, system_id, &config.zone)
                .map_err(|source| SnapshotError::Read { path: live.clone(), source })?,
        );
    }
    Ok(records)
}

/// Follows Session-Buddy's databases until `shutdown`, sending new and changed rows.
pub async fn run<S: RecordSink>(
    config: SnapshotConfig,
    system_id: String,
    sink: &S,
    state: sled::Tree,
    stats: &SnapshotStats,
    mut shutdown: watch::Receiver<bool>,
) {
    // Unchanged files (same sizes and modification times) need no snapshot: an idle agent costs nothing.
    let mut last_seen: Option<Vec<Option<(u64, std::time::SystemTime)>>> = None;
    while !*shutdown.borrow() {
        let seen = source_stamps(&config.data_dir);
        if last_seen.as_ref() == Some(&seen) {
            tokio::select! {
                _ = tokio::time::sleep(config.interval) => {}
                _ = shutdown.changed() => {}
            }
            continue;
        }
        match snapshot_in_worker(&config, &system_id).await {
            Ok(records) => {
                stats.snapshots.fetch_add(1, Ordering::Relaxed);
                let mut all_buffered = true;
                let changed: Vec<(Record, [u8; 8])> = records
                    .into_iter()
                    .filter_map(|r| {
                        let fp = fingerprint(&r).to_be_bytes();
                        let unchanged = state.get(state_key(&r)).ok().flatten().is_some_and(|v| v.as_ref() == fp);
                        if unchanged {
                            stats.unchanged_records.fetch_add(1, Ordering::Relaxed);
                            None
                        } else {
                            Some((r, fp))
                        }
                    })
                    .collect();
                if !changed.is_empty() {
                    let records: Vec<Record> = changed.iter().map(|(r, _)| r.clone()).collect();
                    match sink.accept(&records).await {
                        Ok(n) => {
                            // Remembered only once durable in the buffer: a failure resends them next time.
                            for (r, fp) in &changed {
                                let _ = state.insert(state_key(r), fp.as_slice());
                            }
                            stats.changed_records.fetch_add(n, Ordering::Relaxed);
                            debug!(message = "Sent changed Session-Buddy rows.", records = n);
                        }
                        Err(error) => {
                            all_buffered = false;
                            warn!(message = "Could not buffer Session-Buddy rows; retrying next snapshot.", %error);
                        }
                    }
                }
                if all_buffered {
                    last_seen = Some(seen);
                }
            }
            Err(error) => {
                stats.failures.fetch_add(1, Ordering::Relaxed);
                warn!(message = "Session-Buddy snapshot failed.", %error);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(config.interval) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// Runs `snapshot-worker` and decodes what it prints: a little-endian u64 record count, then the records in
/// the protocol's record encoding.
async fn snapshot_in_worker(config: &SnapshotConfig, system_id: &str) -> Result<Vec<Record>, SnapshotError> {
    let output = tokio::process::Command::new(&config.worker)
        .arg("snapshot-worker")
        .arg("--data-dir")
        .arg(&config.data_dir)
        .arg("--snapshot-dir")
        .arg(&config.snapshot_dir)
        .args(["--timezone", &config.timezone, "--system-id", system_id])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| SnapshotError::Worker(format!("cannot start {}: {e}", config.worker.display())))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(SnapshotError::Worker(format!("{}: {}", output.status, stderr.trim())));
    }
    let (count, payload) = output
        .stdout
        .split_first_chunk::<8>()
        .ok_or_else(|| SnapshotError::Worker("output is shorter than its header".into()))?;
    let count = usize::try_from(u64::from_le_bytes(*count)).unwrap_or(usize::MAX);
    akosha_protocol::decode_records(payload, count).map_err(|e| SnapshotError::Worker(format!("bad output: {e}")))
}

/// The worker side: one snapshot, written to `out` in the format [`snapshot_in_worker`] reads.
pub fn write_snapshot(
    config: &SnapshotConfig,
    system_id: &str,
    out: &mut impl std::io::Write,
) -> Result<(), SnapshotError> {
    let records = read_snapshot(config, system_id)?;
    let payload = akosha_protocol::encode_records(&records);
    let io = |e: std::io::Error| SnapshotError::Worker(e.to_string());
    out.write_all(&(records.len() as u64).to_le_bytes()).map_err(io)?;
    out.write_all(&payload).map_err(io)?;
    out.flush().map_err(io)
}

/// Sizes and modification times of the live files (databases and their WALs).
fn source_stamps(dir: &Path) -> Vec<Option<(u64, std::time::SystemTime)>> {
    DATABASE_FILES
        .iter()
        .flat_map(|name| {
            let db = dir.join(name);
            [stamp(&db), stamp(&wal_path(&db))]
        })
        .collect()
}

fn state_key(r: &Record) -> Vec<u8> {
    format!("sb:{}:{}", r.kind.as_str(), r.id).into_bytes()
}

fn fingerprint(r: &Record) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (r.ts, &r.text, &r.name, &r.category, &r.project, &r.namespace, &r.tags, &r.metadata).hash(&mut h);
    (&r.from, &r.to, &r.relation_type).hash(&mut h);
    r.importance.map(f64::to_bits).hash(&mut h);
    if let Some(e) = &r.embedding {
        e.iter().for_each(|v| v.to_bits().hash(&mut h));
    }
    h.finish()
}

/// Copies the database and its WAL until a copy is consistent: the live files did not change while being
/// copied and the copy opens.
fn consistent_copy(live: &Path, copy: &Path) -> Result<PathBuf, SnapshotError> {
    let live_wal = wal_path(live);
    let copy_wal = wal_path(copy);
    if let Some(dir) = copy.parent() {
        std::fs::create_dir_all(dir).map_err(|source| SnapshotError::Copy { path: dir.to_owned(), source })?;
    }
    let mut reason = String::new();
    for attempt in 1..=ATTEMPTS {
        let before = (stamp(live), stamp(&live_wal));
        let copied =
            std::fs::copy(live, copy).map_err(|source| SnapshotError::Copy { path: live.to_owned(), source })?;
        let _ = std::fs::remove_file(&copy_wal);
        if live_wal.exists() {
            std::fs::copy(&live_wal, &copy_wal)
                .map_err(|source| SnapshotError::Copy { path: live_wal.clone(), source })?;
        }
        let after = (stamp(live), stamp(&live_wal));
        if before != after || copied != before.0.map_or(0, |s| s.0) {
            reason = "the database changed while it was copied".into();
        } else {
            match open_read_only(copy) {
                Ok(_) => return Ok(copy.to_owned()),
                Err(e) => reason = e.to_string(),
            }
        }
        debug!(message = "Snapshot copy was torn; retrying.", attempt, %reason, path = %live.display());
        std::thread::sleep(Duration::from_millis(50 * u64::from(attempt)));
    }
    Err(SnapshotError::Torn { path: live.to_owned(), attempts: ATTEMPTS, reason })
}

fn wal_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".wal");
    PathBuf::from(name)
}

fn stamp(path: &Path) -> Option<(u64, std::time::SystemTime)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.len(), meta.modified().ok()?))
}

/// Keys `(kind, id)` of records, for comparing sources.
pub fn keys(records: &[Record]) -> HashMap<(RecordKind, String), usize> {
    let mut out = HashMap::new();
    for r in records {
        *out.entry((r.kind, r.id.clone())).or_insert(0) += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_dir() -> PathBuf {
        crate::crate_path("../../shared/fixtures/session-buddy/small")
    }

    #[test]
    fn fixture_snapshot_has_every_row_with_the_push_keys() {
        let snapshots = tempfile::tempdir().unwrap();
        let config = SnapshotConfig {
            data_dir: fixture_dir(),
            snapshot_dir: snapshots.path().to_owned(),
            interval: Duration::from_secs(1),
            zone: jiff::tz::TimeZone::UTC,
            timezone: "UTC".into(),
            worker: PathBuf::new(),
        };
        let records = read_snapshot(&config, "edge-host-1").unwrap();
        // What the worker prints decodes to the same records.
        let mut out = Vec::new();
        write_snapshot(&config, "edge-host-1", &mut out).unwrap();
        let count = u64::from_le_bytes(out[..8].try_into().unwrap()) as usize;
        assert_eq!(akosha_protocol::decode_records(&out[8..], count).unwrap(), records);
        let mut by_kind: HashMap<&str, usize> = HashMap::new();
        for r in &records {
            r.validate().unwrap();
            *by_kind.entry(r.kind.as_str()).or_insert(0) += 1;
        }
        assert_eq!(
            by_kind,
            [("conversation", 20), ("reflection", 8), ("entity", 19), ("relation", 20)].into_iter().collect()
        );
        assert!(records.iter().filter(|r| r.kind == RecordKind::Conversation).all(|r| r.embedding.is_some()));

        // The HTTP push of the same data yields the same dedup keys.
        let push = std::fs::read_to_string(fixture_dir().join("../http_push_20.jsonl")).unwrap();
        let mut pushed = Vec::new();
        for line in push.lines() {
            let request: serde_json::Value = serde_json::from_str(line).unwrap();
            let params = &request["body"]["params"];
            if let Some(tool) = params["name"].as_str() {
                let mapped = crate::sources::session_buddy_push::map_tool_call(
                    tool,
                    &params["arguments"],
                    "edge-host-1",
                    &jiff::tz::TimeZone::UTC,
                    0,
                )
                .unwrap();
                pushed.extend(mapped.records);
            }
        }
        assert_eq!(keys(&records), keys(&pushed));
        // And the same text and embeddings, bit for bit.
        let pushed_by_key: HashMap<_, _> = pushed.iter().map(|r| ((r.kind, r.id.clone()), r)).collect();
        for r in records.iter().filter(|r| r.kind == RecordKind::Conversation) {
            let p = pushed_by_key[&(r.kind, r.id.clone())];
            assert_eq!(r.text, p.text);
            let bits = |e: &Option<Vec<f32>>| e.as_ref().map(|v| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>());
            assert_eq!(bits(&r.embedding), bits(&p.embedding));
        }
    }

    #[test]
    fn a_missing_directory_is_an_empty_snapshot_and_garbage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let config = SnapshotConfig {
            data_dir: dir.path().join("nothing-here"),
            snapshot_dir: dir.path().join("snap"),
            interval: Duration::from_secs(1),
            zone: jiff::tz::TimeZone::UTC,
            timezone: "UTC".into(),
            worker: PathBuf::new(),
        };
        assert!(read_snapshot(&config, "h").unwrap().is_empty());
        std::fs::create_dir_all(dir.path().join("garbage")).unwrap();
        std::fs::write(dir.path().join("garbage/reflection.duckdb"), b"this is not a database").unwrap();
        let config = SnapshotConfig { data_dir: dir.path().join("garbage"), ..config };
        let err = read_snapshot(&config, "h").unwrap_err();
        assert!(matches!(err, SnapshotError::Torn { .. }), "{err}");
    }
}
