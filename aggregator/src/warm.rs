//! Warm tier: a DuckDB file on local disk (`warm.path`) with persisted vector and text indexes beside it.
//!
//! The file is ATTACHed to the hot tier's database as `warm`, with the same table per kind, so one SQL query can
//! read both tiers (`all_<kind>` views) and a move is two local transactions:
//!
//! 1. **copy** (writes only `warm`): rows of `main.<kind>` older than the cutoff replace older-or-equal versions of
//!    their keys in `warm.<kind>`; a key whose warm version is newer keeps it. The journal row (`warm.moves`)
//!    says `copied` in the same transaction.
//! 2. **verify** (reads both): every hot row being moved has a warm version at least as new, and the rows that
//!    are the same version have the same checksum (count + sum of row hashes). Journal: `verified`.
//! 3. **index** the moved rows into the warm indexes, then **delete** them from hot (writes only `main`), take
//!    their keys out of the hot indexes. Journal: `done`. The warm file is checkpointed and the vector index
//!    saved with a manifest (row count, last move, key-hash probe).
//!
//! The hot writer's lock is held throughout, so no record older than the cutoff can slip in between copy and
//! delete. After `kill -9` at any point the write-ahead log rebuilds hot as usual and the first move after
//! start repeats the copy (a no-op for what is already warm), verifies and deletes: nothing is lost (every
//! record is in the log or in warm) and nothing is doubled (copy replaces by key). Journal rows left unfinished
//! are marked `interrupted`. Indexes whose manifest does not match the warm tables are rebuilt from them.
//!
//! The cold tier (Parquet on object storage) takes rows from here in the next issue; `warm.moves` is its
//! journal's model.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use akosha_protocol::{EMBEDDING_DIM, Record, RecordKind};
use duckdb::Connection;
use serde::Serialize;
use tracing::{info, warn};

use crate::hot::{HotError, index_records, key_hash};
use crate::search::SearchIndexes;

/// Warm tier settings.
#[derive(Debug, Clone)]
pub struct WarmConfig {
    /// Keep a warm tier at all.
    pub enabled: bool,
    /// The DuckDB file.
    pub path: PathBuf,
    /// Records older than this move from hot to warm.
    pub hot_window: Duration,
    /// How often moves run.
    pub move_interval: Duration,
    /// Kinds that leave hot after another window than `hot_window`.
    pub hot_window_per_kind: std::collections::BTreeMap<RecordKind, Duration>,
    /// Scheduled moves run only inside this daily window.
    pub schedule: Option<crate::lifecycle::Schedule>,
}

impl WarmConfig {
    /// The hot window of every kind.
    pub fn hot_windows(&self) -> crate::lifecycle::Windows {
        crate::lifecycle::Windows { default: self.hot_window, per_kind: self.hot_window_per_kind.clone() }
    }
}

/// One completed move.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MoveReport {
    /// Journal id (start time, microseconds since the epoch).
    pub id: i64,
    /// Rows older than this moved (microseconds since the epoch).
    pub cutoff_us: i64,
    /// Rows moved, per kind.
    pub records: Vec<(&'static str, u64)>,
    /// Wall time.
    pub took_ms: u64,
}

/// Rows verified in both tiers before deletion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verified {
    pub(crate) rows: u64,
    pub(crate) checksum: String,
}

#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
struct Manifest {
    rows: u64,
    last_move: i64,
    key_probe: u64,
}

/// The warm tier.
pub struct WarmTier {
    /// Settings.
    pub config: WarmConfig,
    indexes: Arc<SearchIndexes>,
    index_dir: PathBuf,
    /// Moves completed since start.
    pub moves_done: AtomicU64,
    /// Moves that failed (verification or I/O) since start.
    pub moves_failed: AtomicU64,
    /// Rows moved since start.
    pub records_moved: AtomicU64,
    /// Journal rows found unfinished at start.
    pub interrupted: u64,
    last_move: Mutex<Option<MoveReport>>,
    last_error: Mutex<Option<String>>,
    /// Fault injection for crash tests: pause this long after the copy commits.
    pause_after_copy: Option<Duration>,
    /// Held while warm rows or the warm indexes change (moves in and out of warm).
    moves: Mutex<()>,
}

fn key_probe() -> u64 {
    key_hash(&Record { system_id: "probe".into(), kind: RecordKind::Entity, id: "probe".into(), ..Record::default() })
}

impl WarmTier {
    /// Attaches the warm file to the hot database (`conn` is one of its connections), creates what is missing,
    /// closes unfinished journal rows and opens (or rebuilds) the indexes.
    pub fn open(conn: &Connection, config: WarmConfig) -> Result<WarmTier, HotError> {
        let dir = config.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| HotError::Io(format!("cannot create {}: {e}", dir.display())))?;
        let path = config.path.display().to_string().replace('\'', "''");
        conn.execute_batch(&format!("ATTACH '{path}' AS warm;"))?;
        let mut ddl = String::from(
            "CREATE TABLE IF NOT EXISTS warm.hot_holds (kind VARCHAR, system_id VARCHAR, day DATE, until TIMESTAMP);\n",
        );
        let columns = crate::hot::column_ddl();
        for kind in RecordKind::ALL {
            let t = kind.as_str();
            ddl.push_str(&format!(
                "CREATE TABLE IF NOT EXISTS warm.{t} ({columns}, ingested_at TIMESTAMP NOT NULL);\n\
                 CREATE INDEX IF NOT EXISTS {t}_id ON warm.{t} (id);\n"
            ));
            // A group promoted to hot is answered from its hot copy (see `HotTier::promote_to_hot`).
            ddl.push_str(&format!(
                "CREATE OR REPLACE VIEW main.all_{t} AS SELECT *, 'hot' AS tier FROM main.{t} \
                 UNION ALL SELECT *, 'warm' AS tier FROM warm.{t} w WHERE {};\n",
                not_promoted(kind, "w")
            ));
        }

        let had_rollups: i64 = conn.query_row(
            "SELECT count(*) FROM duckdb_tables() WHERE database_name = 'warm' AND table_name = 'metric_5m'",
            [],
            |r| r.get(0),
        )?;
        ddl.push_str(crate::rollup::DDL);
        let has_catalog: i64 = conn.query_row(
            "SELECT count(*) FROM duckdb_tables() WHERE database_name = 'warm' AND table_name = 'cold_objects'",
            [],
            |r| r.get(0),
        )?;
        ddl.push_str(crate::rollup::BACKFILL_DDL);
        if had_rollups == 0 {
            // A warm file from before rollups existed: summarise what it holds once, and queue its cold days.
            ddl.push_str(&crate::rollup::backfill_sql());
            if has_catalog > 0 {
                ddl.push_str(crate::rollup::QUEUE_COLD_DAYS);
            }
        }
        ddl.push_str(
            "CREATE TABLE IF NOT EXISTS warm.moves (id BIGINT, kind VARCHAR, cutoff TIMESTAMP, state VARCHAR, \
             records BIGINT, checksum VARCHAR, started_at TIMESTAMP, finished_at TIMESTAMP, detail VARCHAR);\n",
        );
        conn.execute_batch(&ddl)?;
        let interrupted = conn.execute(
            "UPDATE warm.moves SET state = 'interrupted', finished_at = now() WHERE state NOT IN ('done', 'failed', 'interrupted')",
            [],
        )? as u64;
        if interrupted > 0 {
            warn!(
                message = "Moves to the warm tier were interrupted by a crash; the next move repeats them.",
                moves = interrupted
            );
        }
        let index_dir = index_dir(&config.path);
        let indexes = Arc::new(open_indexes(conn, &index_dir)?);
        let pause_after_copy = std::env::var("AKOSHA_FAULT_WARM_PAUSE_AFTER_COPY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis);
        Ok(WarmTier {
            config,
            indexes,
            index_dir,
            moves_done: AtomicU64::new(0),
            moves_failed: AtomicU64::new(0),
            records_moved: AtomicU64::new(0),
            interrupted,
            last_move: Mutex::new(None),
            last_error: Mutex::new(None),
            pause_after_copy,
            moves: Mutex::new(()),
        })
    }

    /// The warm tier's search indexes.
    pub fn indexes(&self) -> &SearchIndexes {
        &self.indexes
    }

    /// The last completed move.
    pub fn last_move(&self) -> Option<MoveReport> {
        self.last_move.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The last failure, if the last move failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Size of the warm file on disk.
    pub fn size_bytes(&self) -> u64 {
        std::fs::metadata(&self.config.path).map_or(0, |m| m.len())
    }

    /// Bytes and files on disk: the DuckDB file, its WAL and the index directory.
    pub fn disk_footprint(&self) -> (u64, u64) {
        let name = self.config.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let dir = self.config.path.parent().unwrap_or(std::path::Path::new("."));
        let (db, db_files) = crate::storage::files_bytes(dir, &name);
        let (index, index_files) = crate::storage::dir_bytes(&self.index_dir);
        (db + index, db_files + index_files)
    }

    pub(crate) fn journal(
        conn: &Connection,
        id: i64,
        kind: RecordKind,
        cutoff_us: i64,
        state: &str,
        rows: u64,
        checksum: Option<&str>,
    ) -> Result<(), HotError> {
        conn.execute(
            "INSERT INTO warm.moves VALUES (?, ?, make_timestamp(?), ?, ?, ?, now(), NULL, NULL)",
            duckdb::params![id, kind.as_str(), cutoff_us, state, rows as i64, checksum],
        )?;
        Ok(())
    }

    pub(crate) fn set_state(
        conn: &Connection,
        id: i64,
        kind: RecordKind,
        state: &str,
        detail: Option<&str>,
    ) -> Result<(), HotError> {
        conn.execute(
            "UPDATE warm.moves SET state = ?, detail = coalesce(?, detail), finished_at = CASE WHEN ? IN ('done', 'failed') THEN now() END \
             WHERE id = ? AND kind = ?",
            duckdb::params![state, detail, state, id, kind.as_str()],
        )?;
        Ok(())
    }

    /// Copies the hot rows of `kind` older than `cutoff_us` into warm (step 1), journaled in the same transaction.
    pub(crate) fn copy(&self, conn: &Connection, id: i64, kind: RecordKind, cutoff_us: i64) -> Result<(), HotError> {
        let t = kind.as_str();
        // The days whose metric rows change get their 5-minute buckets recomputed in the same transaction.
        let rollups = if kind == RecordKind::Metric {
            crate::rollup::Rollup::FiveMinutes.refresh_from_warm_sql(&format!(
                "(SELECT system_id, CAST(ts AS DATE) AS day FROM main.metric WHERE ts < make_timestamp({cutoff_us}))"
            ))
        } else {
            String::new()
        };
        // Every value in this SQL is ours (an enum name and integers), so building it as text is safe.
        conn.execute_batch(&format!(
            "BEGIN TRANSACTION;\n\
             DELETE FROM warm.{t} w WHERE EXISTS (SELECT 1 FROM main.{t} h WHERE h.ts < make_timestamp({cutoff_us}) \
               AND h.system_id = w.system_id AND h.id = w.id AND h.ts >= w.ts AND NOT ({same}));\n\
             INSERT INTO warm.{t} SELECT h.* FROM main.{t} h WHERE h.ts < make_timestamp({cutoff_us}) \
               AND NOT EXISTS (SELECT 1 FROM warm.{t} w WHERE w.system_id = h.system_id AND w.id = h.id);\n\
             {rollups}\
             UPDATE warm.moves SET state = 'copied' WHERE id = {id} AND kind = '{t}';\n\
             COMMIT;",
            same = same_version("h", "w"),
        ))
        .inspect_err(|_| {
            let _ = conn.execute_batch("ROLLBACK");
        })?;
        if let Some(pause) = self.pause_after_copy {
            warn!(message = "Fault injection: pausing after the warm copy.", ms = pause.as_millis() as u64);
            std::thread::sleep(pause);
        }
        Ok(())
    }

    /// Checks (step 2) that every hot row of `kind` older than `cutoff_us` has a warm version at least as new and
    /// that the identical versions carry the same content.
    pub(crate) fn verify(
        conn: &Connection,
        kind: RecordKind,
        cutoff_us: i64,
    ) -> Result<Result<Verified, String>, HotError> {
        let t = kind.as_str();
        let sql = format!(
            "SELECT (SELECT count(*) FROM main.{t} WHERE ts < make_timestamp({cutoff_us})), \
                    count(*) FILTER (WHERE w.ts >= h.ts), \
                    coalesce(sum({hh}::HUGEINT) FILTER (WHERE w.ts = h.ts), 0)::VARCHAR, \
                    coalesce(sum({wh}::HUGEINT) FILTER (WHERE w.ts = h.ts), 0)::VARCHAR \
             FROM main.{t} h JOIN warm.{t} w ON h.system_id = w.system_id AND h.id = w.id \
             WHERE h.ts < make_timestamp({cutoff_us})",
            hh = row_hash("h"),
            wh = row_hash("w"),
        );
        let (hot_rows, matched, hot_sum, warm_sum): (i64, i64, String, String) =
            conn.query_row(&sql, [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
        if hot_rows != matched {
            return Ok(Err(format!("{t}: {hot_rows} rows to move, {matched} found in warm")));
        }
        if hot_sum != warm_sum {
            return Ok(Err(format!("{t}: checksums differ (hot {hot_sum}, warm {warm_sum})")));
        }
        Ok(Ok(Verified { rows: hot_rows as u64, checksum: hot_sum }))
    }

    /// Indexes moved records (step 3, before they leave hot).
    pub(crate) fn index(&self, records: &[Record]) -> Result<(), HotError> {
        let keyed: Vec<(u64, &Record)> = records.iter().map(|r| (key_hash(r), r)).collect();
        self.indexes.upsert(&keyed)?;
        self.indexes.commit()?;
        Ok(())
    }

    /// Makes a finished move durable on disk: checkpoint, vectors and manifest.
    pub(crate) fn finish(&self, conn: &Connection, report: MoveReport) -> Result<(), HotError> {
        conn.execute_batch("CHECKPOINT warm;")?;
        self.indexes.save(&self.index_dir)?;
        let manifest = Manifest { rows: warm_rows(conn)?, last_move: report.id, key_probe: key_probe() };
        write_manifest(&self.index_dir, &manifest)?;
        let moved: u64 = report.records.iter().map(|(_, n)| n).sum();
        self.records_moved.fetch_add(moved, Ordering::Relaxed);
        self.moves_done.fetch_add(1, Ordering::Relaxed);
        info!(
            message = "Moved records from hot to warm.",
            records = moved,
            took_ms = report.took_ms,
            cutoff_us = report.cutoff_us
        );
        *self.last_move.lock().unwrap_or_else(|p| p.into_inner()) = Some(report);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(())
    }

    pub(crate) fn failed(&self, error: &str) {
        self.moves_failed.fetch_add(1, Ordering::Relaxed);
        warn!(message = "A move to the warm tier failed; hot keeps the records and the next move retries.", error = %error);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_owned());
    }

    /// Where the persisted indexes live.
    pub(crate) fn index_dir(&self) -> &Path {
        &self.index_dir
    }

    /// Excludes other moves into or out of warm while the guard lives.
    pub(crate) fn lock_moves(&self) -> std::sync::MutexGuard<'_, ()> {
        self.moves.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes keys that left warm (to cold) out of the warm indexes.
    pub(crate) fn forget(&self, keys: &[u64]) -> Result<(), HotError> {
        self.indexes.remove(keys)?;
        self.indexes.commit()?;
        Ok(())
    }

    /// Makes warm's current state durable after rows left it: checkpoint, vectors and manifest.
    pub(crate) fn persist(&self, conn: &Connection) -> Result<(), HotError> {
        let _moving = self.lock_moves();
        conn.execute_batch("CHECKPOINT warm;")?;
        self.indexes.save_changes(&self.index_dir)?;
        let last_move = self.last_move().map_or(0, |m| m.id);
        write_manifest(&self.index_dir, &Manifest { rows: warm_rows(conn)?, last_move, key_probe: key_probe() })
    }

    /// Rows per kind that warm answers for (not those of groups promoted to hot, which hot counts).
    pub fn counts(conn: &Connection) -> Result<Vec<(String, &'static str, u64)>, HotError> {
        let mut out = Vec::new();
        for kind in RecordKind::ALL {
            let mut stmt = conn.prepare(&format!(
                "SELECT system_id, count(*) FROM warm.{} w WHERE {} GROUP BY 1 ORDER BY 1",
                kind.as_str(),
                not_promoted(kind, "w")
            ))?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (system, n) = row?;
                out.push((system, kind.as_str(), n as u64));
            }
        }
        Ok(out)
    }

    /// The journal's latest rows, newest first.
    pub fn journal_tail(conn: &Connection, limit: usize) -> Result<Vec<serde_json::Value>, HotError> {
        let mut stmt = conn.prepare(
            "SELECT id, kind, epoch_us(cutoff), state, records, checksum, epoch_us(started_at), epoch_us(finished_at), detail \
             FROM warm.moves ORDER BY id DESC, kind LIMIT ?",
        )?;
        let rows = stmt.query_map([limit as i64], |r| {
            Ok(serde_json::json!({
                "id": r.get::<_, i64>(0)?, "kind": r.get::<_, String>(1)?, "cutoff": r.get::<_, Option<i64>>(2)?,
                "state": r.get::<_, String>(3)?, "records": r.get::<_, Option<i64>>(4)?,
                "checksum": r.get::<_, Option<String>>(5)?, "started_at": r.get::<_, Option<i64>>(6)?,
                "finished_at": r.get::<_, Option<i64>>(7)?, "detail": r.get::<_, Option<String>>(8)?,
            }))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// The content hash a move compares versions by.
fn row_hash(a: &str) -> String {
    format!("hash({a}.system_id, {a}.id, {a}.ts, {a}.text, {a}.name, {a}.value, {a}.metadata, {a}.from_id, {a}.to_id)")
}

/// A SQL condition true when rows `a` and `b` (of the same key) are the same version.
pub(crate) fn same_version(a: &str, b: &str) -> String {
    format!("{a}.ts = {b}.ts AND {} = {}", row_hash(a), row_hash(b))
}

/// A SQL condition true for rows (alias `alias`, of `kind`) whose (system, day) group is not promoted to hot.
pub(crate) fn not_promoted(kind: RecordKind, alias: &str) -> String {
    format!(
        "NOT EXISTS (SELECT 1 FROM warm.hot_holds p WHERE p.kind = '{}' AND p.system_id = {alias}.system_id \
         AND p.day = CAST({alias}.ts AS DATE))",
        kind.as_str()
    )
}

pub(crate) fn index_dir(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".indexes");
    path.with_file_name(name)
}

fn warm_rows(conn: &Connection) -> Result<u64, HotError> {
    let mut total = 0;
    for kind in RecordKind::ALL {
        total +=
            conn.query_row(&format!("SELECT count(*) FROM warm.{}", kind.as_str()), [], |r| r.get::<_, i64>(0))? as u64;
    }
    Ok(total)
}

fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<(), HotError> {
    let tmp = dir.join("manifest.json.tmp");
    let bytes = serde_json::to_vec(manifest).map_err(|e| HotError::Io(e.to_string()))?;
    let io = |e: std::io::Error| HotError::Io(format!("{}: {e}", dir.display()));
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io)?;
    std::fs::rename(&tmp, dir.join("manifest.json")).map_err(io)
}

/// Loads the persisted indexes when their manifest matches the warm tables, else rebuilds them from the tables.
fn open_indexes(conn: &Connection, dir: &Path) -> Result<SearchIndexes, HotError> {
    let rows = warm_rows(conn)?;
    let manifest: Option<Manifest> =
        std::fs::read(dir.join("manifest.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
    let usable = manifest.as_ref().is_some_and(|m| m.rows == rows && m.key_probe == key_probe());
    if usable && let Ok(indexes) = SearchIndexes::open(dir, EMBEDDING_DIM) {
        // The registry of filterable fields lives in memory only: read it back from the tables (no text, no vectors).
        for kind in RecordKind::ALL {
            let records = index_records(conn, &format!("FROM warm.{} t", kind.as_str()), kind, false)?;
            let keyed: Vec<(u64, &Record)> = records.iter().map(|r| (key_hash(r), r)).collect();
            indexes.register(&keyed);
        }
        info!(message = "Warm indexes loaded.", records = rows);
        return Ok(indexes);
    }
    if rows > 0 {
        warn!(
            message = "Warm indexes do not match the warm tables (crash during a move, or first start); rebuilding.",
            records = rows
        );
    }
    let indexes = SearchIndexes::create(dir, EMBEDDING_DIM)?;
    let mut last_move = 0;
    for kind in RecordKind::ALL {
        let records = index_records(conn, &format!("FROM warm.{} t", kind.as_str()), kind, true)?;
        for chunk in records.chunks(50_000) {
            let keyed: Vec<(u64, &Record)> = chunk.iter().map(|r| (key_hash(r), r)).collect();
            indexes.upsert(&keyed)?;
        }
    }
    indexes.commit()?;
    indexes.save(dir)?;
    if let Ok(id) =
        conn.query_row("SELECT coalesce(max(id), 0) FROM warm.moves WHERE state = 'done'", [], |r| r.get::<_, i64>(0))
    {
        last_move = id;
    }
    write_manifest(dir, &Manifest { rows, last_move, key_probe: key_probe() })?;
    Ok(indexes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hot::HotTier;
    use crate::query::QueryService;
    use crate::search::Filters;

    const HOUR: i64 = 3_600_000_000;

    fn record(i: u64, ts: i64) -> Record {
        // Distinct directions, so no two records tie for a query and rankings are comparable exactly.
        let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let embedding: Vec<f32> = (0..EMBEDDING_DIM)
            .map(|d| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 1000) as f32 / 1000.0 + if d == (i % 7) as usize { 3.0 } else { 0.0 }
            })
            .collect();
        Record {
            system_id: format!("s{}", i % 3),
            kind: if i.is_multiple_of(2) { RecordKind::Conversation } else { RecordKind::Reflection },
            id: format!("r{i}"),
            ts,
            project: Some("p".into()),
            text: Some(format!("record {i} mentions topic{}", i % 7)),
            embedding: Some(embedding),
            ..Record::default()
        }
    }

    fn open(dir: &Path) -> Arc<HotTier> {
        let hot = Arc::new(HotTier::open("512MB", 1, None).unwrap());
        hot.attach_warm(WarmConfig {
            enabled: true,
            path: dir.join("warm.duckdb"),
            hot_window: Duration::from_secs(3600),
            move_interval: Duration::from_secs(60),
            hot_window_per_kind: Default::default(),
            schedule: None,
        })
        .unwrap();
        hot
    }

    fn ids(hits: &[crate::query::Hit]) -> Vec<String> {
        hits.iter().map(|h| h.record["id"].as_str().unwrap().to_owned()).collect()
    }

    #[test]
    fn moves_are_verified_idempotent_and_searchable_across_tiers_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let now = jiff::Timestamp::now().as_microsecond();
        // 300 old records (to move) and 100 recent ones.
        let records: Vec<Record> =
            (0..400).map(|i| record(i, if i < 300 { now - 48 * HOUR + i as i64 } else { now - i as i64 })).collect();
        let query = |hot: &Arc<HotTier>| {
            let service = QueryService::new(hot.clone(), None);
            let filters = Filters::default();
            let v = service.vector(records[10].embedding.as_ref().unwrap(), 20, &filters).unwrap();
            let t = service.text("topic3", 200, &filters).unwrap();
            (ids(&v), {
                let mut t = ids(&t);
                t.sort();
                t
            })
        };
        let hot = open(dir.path());
        hot.insert(&records).unwrap();
        assert!(hot.wait_indexed(Duration::from_secs(30)));
        let before = query(&hot);

        let report = hot.move_to_warm(now - 24 * HOUR).unwrap().expect("something moved");
        assert_eq!(report.records.iter().map(|(_, n)| n).sum::<u64>(), 300);
        let warm_rows = hot.read(|c| Ok(WarmTier::counts(c)?.iter().map(|(_, _, n)| n).sum::<u64>())).unwrap();
        assert_eq!(warm_rows, 300);
        assert_eq!(hot.counts().unwrap().iter().map(|c| c.records).sum::<u64>(), 100);
        assert_eq!(query(&hot), before, "the same answers from mixed tiers");
        assert_eq!(hot.get("s1", RecordKind::Reflection, "r1").unwrap().unwrap()["tier"], "warm");
        assert!(hot.move_to_warm(now - 24 * HOUR).unwrap().is_none(), "nothing left to move");
        drop(hot);
        std::thread::sleep(Duration::from_millis(200));

        // Restart: the log replays everything into hot again; the warm indexes load from disk and the next
        // move finds the old records already warm — nothing is doubled.
        let hot = open(dir.path());
        assert_eq!(hot.warm().unwrap().indexes().sizes().0, 300, "registry rebuilt, indexes loaded");
        hot.insert(&records).unwrap();
        assert!(hot.wait_indexed(Duration::from_secs(30)));
        hot.move_to_warm(now - 24 * HOUR).unwrap();
        let warm_rows = hot.read(|c| Ok(WarmTier::counts(c)?.iter().map(|(_, _, n)| n).sum::<u64>())).unwrap();
        assert_eq!(warm_rows, 300);
        assert_eq!(hot.counts().unwrap().iter().map(|c| c.records).sum::<u64>(), 100);
        assert_eq!(query(&hot), before);

        // Everything warm: the same answers again.
        hot.move_to_warm(now + HOUR).unwrap();
        assert_eq!(hot.counts().unwrap().iter().map(|c| c.records).sum::<u64>(), 0);
        assert_eq!(query(&hot), before, "the same answers from warm only");
        let journal = hot.read(|c| WarmTier::journal_tail(c, 100)).unwrap();
        assert!(journal.iter().all(|j| j["state"] == "done"), "{journal:?}");
    }

    #[test]
    fn a_torn_index_directory_is_rebuilt_from_the_tables() {
        let dir = tempfile::tempdir().unwrap();
        let now = jiff::Timestamp::now().as_microsecond();
        let records: Vec<Record> = (0..50).map(|i| record(i, now - 48 * HOUR)).collect();
        let hot = open(dir.path());
        hot.insert(&records).unwrap();
        assert!(hot.wait_indexed(Duration::from_secs(30)));
        hot.move_to_warm(now - HOUR).unwrap();
        drop(hot);
        std::thread::sleep(Duration::from_millis(200));
        std::fs::write(dir.path().join("warm.duckdb.indexes/vectors.exact"), b"torn").unwrap();
        let hot = open(dir.path());
        assert_eq!(hot.warm().unwrap().indexes().sizes(), (50, 50));
        let service = QueryService::new(hot.clone(), None);
        let hits = service.vector(records[3].embedding.as_ref().unwrap(), 1, &Filters::default()).unwrap();
        assert!(hits[0].similarity.unwrap() > 0.9999, "{:?}", hits[0].similarity);
    }
}
