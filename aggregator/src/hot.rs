//! Hot tier: an in-memory DuckDB database with one table per record kind.
//!
//! The hot tier is a replica of the write-ahead log (rebuilt from it at start), so it needs no durability of its
//! own. One writer thread applies durable batches in arrival order; queries use their own connection, which
//! DuckDB's MVCC keeps consistent while the writer works.
//!
//! Upserts follow the data model: the key is `(system_id, kind, id)` (the kind is the table), re-delivery of the
//! same record changes nothing, and of two versions the one with the later `ts` wins (on a tie, the later
//! arrival with different content). The decision is made in memory: a key index maps each key's hash to the
//! stored version's `ts` and content hash. New keys are appended with DuckDB's Arrow appender (no index
//! maintenance in DuckDB); an exact re-delivery is dropped before it reaches DuckDB at all; only a real update
//! deletes the old row (one set-based delete per batch) before appending the new one. The index is rebuilt with
//! the table when the log is replayed. Moving data out of the hot tier must remove its keys from the index.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use akosha_protocol::{EMBEDDING_DIM, Record, RecordKind};
use arrow::array::{
    ArrayRef, FixedSizeListArray, Float32Array, Float64Array, ListBuilder, StringArray, StringBuilder,
    TimestampMicrosecondArray,
};
use arrow::buffer::NullBuffer;
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use arrow::record_batch::RecordBatch;
use duckdb::Connection;
use tracing::{error, info};

use crate::search::{SearchError, SearchIndexes};
use crate::wal::DurableBatch;

/// Hot tier failures.
#[derive(Debug, thiserror::Error)]
pub enum HotError {
    /// DuckDB refused a statement.
    #[error("hot tier (DuckDB): {0}")]
    Db(#[from] duckdb::Error),
    /// Building the Arrow batch failed.
    #[error("hot tier (Arrow): {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// The search indexes refused an update or a query.
    #[error("hot tier indexes: {0}")]
    Search(#[from] SearchError),
    /// A worker thread could not be started.
    #[error("hot tier thread: {0}")]
    Thread(String),
    /// A file outside DuckDB (warm tier manifest, directories) failed.
    #[error("{0}")]
    Io(String),
}

/// Columns shared by every kind's table, in staging order.
const COLUMNS: &[(&str, &str)] = &[
    ("system_id", "VARCHAR NOT NULL"),
    ("id", "VARCHAR NOT NULL"),
    ("ts", "TIMESTAMP NOT NULL"),
    ("project", "VARCHAR"),
    ("namespace", "VARCHAR"),
    ("category", "VARCHAR"),
    ("text", "VARCHAR"),
    ("name", "VARCHAR"),
    ("embedding", "FLOAT[384]"),
    ("tags", "VARCHAR[]"),
    ("metadata", "VARCHAR"),
    ("importance", "DOUBLE"),
    ("residency", "VARCHAR"),
    ("from_id", "VARCHAR"),
    ("to_id", "VARCHAR"),
    ("relation_type", "VARCHAR"),
    ("weight", "DOUBLE"),
    ("value", "DOUBLE"),
];

/// Called with the systems whose data changed (applied to the table, or made searchable).
pub type ChangeHook = Box<dyn Fn(Vec<String>) + Send + Sync>;

/// Called after a hot→warm move with what it made durable in warm.
pub type WarmMoveHook = Box<dyn Fn(crate::wal::WarmMark) + Send + Sync>;

fn notify(hook: &std::sync::OnceLock<ChangeHook>, records: impl Iterator<Item = String>) {
    if let Some(hook) = hook.get() {
        let mut systems: Vec<String> = records.collect();
        systems.sort();
        systems.dedup();
        if !systems.is_empty() {
            hook(systems);
        }
    }
}

/// The hot tier.
pub struct HotTier {
    /// Vectors written but not yet indexed, searched exactly.
    tail: Arc<crate::search::Tail>,
    /// The warm tier, once attached.
    warm: std::sync::OnceLock<Arc<crate::warm::WarmTier>>,
    /// The cold tier, once attached (after the warm tier, whose file holds its catalog).
    cold: std::sync::OnceLock<Arc<crate::cold::ColdTier>>,
    /// Told about every change (cache invalidation).
    on_change: Arc<std::sync::OnceLock<ChangeHook>>,
    writer: Mutex<Writer>,
    indexes: Arc<SearchIndexes>,
    indexer: Indexer,
    /// Embeds records that arrive without a vector, once a model is loaded.
    backfill: Arc<std::sync::OnceLock<crate::embed::Backfill>>,
    /// Records that may travel to the indexer with their contents ([`MAX_INDEX_BACKLOG`]; tests lower it).
    index_backlog: AtomicU64,
    reader: Mutex<Connection>,
    inserted: AtomicU64,
    batches: AtomicU64,
    failed_batches: AtomicU64,
    pending: AtomicU64,
    /// Every log entry before this position ([`crate::wal::position`]) is applied.
    applied: AtomicU64,
    /// Set when a durable batch could not be applied: the log must keep it, so retention stops.
    apply_failed: std::sync::atomic::AtomicBool,
    /// Told about each completed hot→warm move (the log releases what it covers).
    on_warm_move: std::sync::OnceLock<WarmMoveHook>,
    /// Promotions to hot so far.
    to_hot: Mutex<HotPromotionTotals>,
    duplicates: AtomicU64,
}

/// Feeds the search indexes off the writer's path: building HNSW links costs far more than appending a row,
/// so rows become readable by id at table speed and searchable shortly after (`index_pending` says how far
/// behind). Up to [`MAX_INDEX_BACKLOG`] records travel to the indexer with their contents; past that only their
/// keys do, and the indexer reads the rows back from the table when it gets to them — so a burst never blocks
/// ingest nor fills memory, and the indexer always indexes the latest version of a row.
struct Indexer {
    queue: std::sync::mpsc::Sender<IndexJob>,
    pending: Arc<AtomicU64>,
    failures: Arc<AtomicU64>,
}

enum IndexJob {
    Records(Vec<(u64, Record)>),
    Keys(RecordKind, Vec<(String, String)>),
}

impl Indexer {
    fn start(
        indexes: Arc<SearchIndexes>,
        conn: Connection,
        backfill: Arc<std::sync::OnceLock<crate::embed::Backfill>>,
        on_change: Arc<std::sync::OnceLock<ChangeHook>>,
        tail: Arc<crate::search::Tail>,
    ) -> std::io::Result<Indexer> {
        let (queue, rx) = std::sync::mpsc::channel::<IndexJob>();
        let pending = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(AtomicU64::new(0));
        let (p, f) = (pending.clone(), failures.clone());
        std::thread::Builder::new().name("hot-indexer".into()).spawn(move || {
            let mut next = None;
            while let Some(job) = next.take().or_else(|| rx.recv().ok()) {
                let (records, count) = match job {
                    IndexJob::Records(mut records) => {
                        let count = records.len();
                        while records.len() < 50_000 {
                            match rx.try_recv() {
                                Ok(IndexJob::Records(more)) => records.extend(more),
                                Ok(keys) => {
                                    next = Some(keys);
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        let count = count.max(records.len());
                        (Ok(records), count)
                    }
                    IndexJob::Keys(kind, keys) => {
                        let count = keys.len();
                        (load_rows(&conn, kind, &keys).map(|rows| rows.into_iter().map(|r| (key_hash(&r), r)).collect()), count)
                    }
                };
                // An index failure must not undo or refuse durable data: the rows stay readable by id and the
                // indexes are whole again after the next restart's replay.
                let result = records.map_err(SearchOrHot::Hot).and_then(|records| {
                    let keyed: Vec<(u64, &Record)> = records.iter().map(|(k, r)| (*k, r)).collect();
                    let indexed = indexes.upsert(&keyed).and_then(|()| indexes.commit());
                    // Indexed or failed, these versions leave the tail (a failure is counted and logged below).
                    tail.indexed(&keyed);
                    indexed.map_err(SearchOrHot::Search)?;
                    notify(&on_change, records.iter().map(|(_, r)| r.system_id.clone()));
                    if let Some(backfill) = backfill.get() {
                        for (key, r) in &records {
                            if r.embedding.is_none()
                                && let Some(text) = r.text.as_deref().filter(|t| !t.trim().is_empty())
                            {
                                backfill.offer(crate::embed::BackfillJob {
                                    key: *key,
                                    ts: r.ts,
                                    system_id: r.system_id.clone(),
                                    text: text.to_owned(),
                                });
                            }
                        }
                    }
                    Ok(())
                });
                if let Err(e) = result {
                    f.fetch_add(count as u64, Ordering::Relaxed);
                    error!(message = "Search index update failed; these records are missing from search until restart.", error = %e, records = count);
                }
                p.fetch_sub((count as u64).min(p.load(Ordering::Relaxed)), Ordering::Relaxed);
            }
        })?;
        Ok(Indexer { queue, pending, failures })
    }
}

#[derive(Debug, thiserror::Error)]
enum SearchOrHot {
    #[error(transparent)]
    Search(SearchError),
    #[error(transparent)]
    Hot(HotError),
}

/// Puts `keys` into a connection's scratch table (emptied first) so that one join can fetch many rows: values
/// travel as appended data, never as SQL text.
pub(crate) fn stage_keys<'a>(
    conn: &Connection,
    table: &str,
    keys: impl Iterator<Item = (&'a str, &'a str)>,
) -> Result<(), HotError> {
    conn.execute_batch(&format!("DELETE FROM {table}"))?;
    let mut appender = conn.appender(table)?;
    for (system_id, id) in keys {
        appender.append_row(duckdb::params![system_id, id])?;
    }
    appender.flush()?;
    Ok(())
}

/// The current rows of `keys` (`(system_id, id)` of one kind); keys no longer in the table are skipped.
fn load_rows(conn: &Connection, kind: RecordKind, keys: &[(String, String)]) -> Result<Vec<Record>, HotError> {
    stage_keys(conn, "index_keys", keys.iter().map(|(s, i)| (s.as_str(), i.as_str())))?;
    let from = format!("FROM {} t JOIN index_keys k ON t.system_id = k.system_id AND t.id = k.id", kind.as_str());
    let records = index_records(conn, &from, kind, true)?;
    conn.execute_batch("DELETE FROM index_keys")?;
    Ok(records)
}

/// What the search indexes need of the rows `from` selects (a `FROM … t [JOIN …] [WHERE …]` clause over a
/// table of `kind`): filter fields always, text and embedding when `with_content`.
pub(crate) fn index_records(
    conn: &Connection,
    from: &str,
    kind: RecordKind,
    with_content: bool,
) -> Result<Vec<Record>, HotError> {
    let content =
        if with_content { "t.text, t.name, t.embedding" } else { "NULL::VARCHAR, NULL::VARCHAR, NULL::FLOAT[]" };
    let sql = format!("SELECT t.system_id, t.id, epoch_us(t.ts), t.project, t.category, t.tags, {content} {from}");
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map([], |row| {
        Ok(Record {
            system_id: row.get(0)?,
            kind,
            id: row.get(1)?,
            ts: row.get(2)?,
            project: row.get(3)?,
            category: row.get(4)?,
            tags: match row.get::<_, duckdb::types::Value>(5)? {
                duckdb::types::Value::List(values) => values
                    .into_iter()
                    .filter_map(|v| match v {
                        duckdb::types::Value::Text(s) => Some(s),
                        _ => None,
                    })
                    .collect(),
                _ => Vec::new(),
            },
            text: row.get(6)?,
            name: row.get(7)?,
            embedding: match row.get::<_, duckdb::types::Value>(8)? {
                duckdb::types::Value::Array(values) | duckdb::types::Value::List(values) => Some(
                    values
                        .into_iter()
                        .map(|v| match v {
                            duckdb::types::Value::Float(f) => f,
                            _ => 0.0,
                        })
                        .collect(),
                ),
                _ => None,
            },
            ..Record::default()
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// The stored columns' names (without `ingested_at`), in table order.
pub(crate) fn column_names() -> Vec<&'static str> {
    COLUMNS.iter().map(|(name, _)| *name).collect()
}

/// The column definitions of an on-disk table with these columns (the warm tier's).
///
/// `id` is stored uncompressed: at commit DuckDB takes every deleted row out of the ART index on `id` by
/// fetching that row's `id`, and from a dictionary/FSST segment each single-row fetch decodes the segment again —
/// a warm→cold move of 32,000 rows spent 2.5–2.9 s in that commit. Uncompressed, a standalone test commits the
/// same delete in 10 ms instead of 258 ms at the same file size (ids are short; BENCHMARKS.md).
pub(crate) fn column_ddl() -> String {
    COLUMNS
        .iter()
        .map(|(name, ty)| match *name {
            "id" => format!("{name} {ty} USING COMPRESSION uncompressed"),
            _ => format!("{name} {ty}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Records travelling to the indexer with their contents (≈ 250 MB); beyond this, only their keys travel.
const MAX_INDEX_BACKLOG: u64 = 100_000;

struct Writer {
    conn: Connection,
    /// Hash of `(kind, system_id, id)` → (`ts`, content hash) of the stored version.
    keys: HashMap<u64, (i64, u64)>,
}

/// One round of promotion to hot (see [`HotTier::promote_to_hot`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct HotPromotionReport {
    /// Warm groups copied into hot.
    pub promoted: u64,
    /// Rows copied.
    pub records: u64,
    /// Promoted groups that went idle and left hot.
    pub released: u64,
    /// Groups read often enough that moved less than `min_age` ago.
    pub too_young: u64,
    /// Groups read often enough left for the next round (rate limit).
    pub deferred: u64,
    /// Wall time.
    pub took_ms: u64,
}

/// A group promoted to hot: kind, system, day (`YYYY-MM-DD`) and the end of its hold (microseconds).
pub type PromotedGroup = (RecordKind, String, String, i64);

/// Promotion to hot since start (see [`HotTier::promotion_to_hot`]).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct HotPromotionTotals {
    /// Groups promoted.
    pub promoted: u64,
    /// Promoted groups released (idle).
    pub released: u64,
    /// Rows copied into hot.
    pub records_promoted: u64,
    /// Failed rounds.
    pub failed: u64,
    /// The last round.
    pub last_round: Option<HotPromotionReport>,
    /// The last failure, if the last round failed.
    pub last_error: Option<String>,
}

/// Rows per system and kind.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KindCount {
    /// System id.
    pub system_id: String,
    /// Record kind.
    pub kind: &'static str,
    /// Rows.
    pub records: u64,
}

impl HotTier {
    /// Creates the in-memory database and its tables.
    ///
    /// DuckDB spills to `spill_dir` when the hot data outgrows `memory_limit`; without one it never writes to disk
    /// (and fails a batch that does not fit instead).
    pub fn open(memory_limit: &str, threads: usize, spill_dir: Option<&std::path::Path>) -> Result<HotTier, HotError> {
        // Without an explicit directory DuckDB would spill into `.tmp` under the process's working directory.
        let spill = spill_dir.map(|d| d.display().to_string()).unwrap_or_default();
        let config = duckdb::Config::default()
            .max_memory(memory_limit)?
            .threads(threads.max(1) as i64)?
            .with("temp_directory", &spill)?;
        let writer = Connection::open_in_memory_with_flags(config)?;
        let mut ddl = String::new();
        let columns: Vec<String> = COLUMNS.iter().map(|(name, ty)| format!("{name} {ty}")).collect();
        for kind in RecordKind::ALL {
            let table = kind.as_str();
            ddl.push_str(&format!("CREATE TABLE {table} ({}, ingested_at TIMESTAMP NOT NULL);\n", columns.join(", ")));
            // Point lookups (search results, `get`) probe this instead of scanning the table.
            ddl.push_str(&format!("CREATE INDEX {table}_id ON main.{table} (id);\n"));
            ddl.push_str(&format!("CREATE TABLE replaced_{table} (system_id VARCHAR, id VARCHAR);\n"));
            // Every tier's rows; the warm tier replaces this view with one that includes its table.
            ddl.push_str(&format!("CREATE VIEW all_{table} AS SELECT *, 'hot' AS tier FROM main.{table};\n"));
        }
        // The indexer's own scratch table (rows it reads back by key).
        ddl.push_str("CREATE TABLE index_keys (system_id VARCHAR, id VARCHAR);\n");
        // The query connection's, for fetching search results in one join.
        ddl.push_str("CREATE TABLE lookup_keys (system_id VARCHAR, id VARCHAR);\n");
        // An in-memory database needs no checkpoints; the automatic ones stall a commit now and then.
        writer.execute_batch("SET checkpoint_threshold = '1TB';")?;
        writer.execute_batch(&ddl)?;
        let reader = writer.try_clone()?;
        let indexes = Arc::new(SearchIndexes::new(EMBEDDING_DIM)?);
        let backfill = Arc::new(std::sync::OnceLock::new());
        let on_change = Arc::new(std::sync::OnceLock::new());
        let tail = Arc::new(crate::search::Tail::default());
        let indexer =
            Indexer::start(indexes.clone(), writer.try_clone()?, backfill.clone(), on_change.clone(), tail.clone())
                .map_err(|e| HotError::Thread(e.to_string()))?;
        Ok(HotTier {
            tail,
            warm: std::sync::OnceLock::new(),
            cold: std::sync::OnceLock::new(),
            on_change,
            writer: Mutex::new(Writer { conn: writer, keys: HashMap::new() }),
            indexes,
            indexer,
            backfill,
            index_backlog: AtomicU64::new(MAX_INDEX_BACKLOG),
            reader: Mutex::new(reader),
            inserted: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            failed_batches: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            apply_failed: std::sync::atomic::AtomicBool::new(false),
            on_warm_move: std::sync::OnceLock::new(),
            to_hot: Mutex::new(HotPromotionTotals::default()),
            duplicates: AtomicU64::new(0),
        })
    }

    /// Upserts records (any mix of kinds) in one transaction per kind.
    pub fn insert(&self, records: &[Record]) -> Result<(), HotError> {
        self.insert_at(records, None)
    }

    /// [`Self::insert`], then — still under the writer lock, so that a deletion's position agrees with the
    /// table — notes that log entries before `applied` are in.
    fn insert_at(&self, records: &[Record], applied: Option<u64>) -> Result<(), HotError> {
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        self.insert_locked(&mut writer, records, applied)?;
        self.inserted.fetch_add(records.len() as u64, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// [`Self::insert_at`] under a writer lock the caller holds, without counting the records as ingested.
    fn insert_locked(&self, writer: &mut Writer, records: &[Record], applied: Option<u64>) -> Result<(), HotError> {
        let Writer { conn, keys } = writer;
        let ingested_at = jiff::Timestamp::now().as_microsecond();
        let mut duplicates = 0;
        for kind in RecordKind::ALL {
            // Decide in memory which records are new, which replace a stored version, and which change nothing.
            let mut appended: Vec<Option<&Record>> = Vec::new();
            let mut position: HashMap<u64, usize> = HashMap::new();
            let mut replaced: Vec<&Record> = Vec::new();
            let mut updates: HashMap<u64, (i64, u64)> = HashMap::new();
            for record in records.iter().filter(|r| r.kind == kind) {
                let key = key_hash(record);
                let version = (record.ts, content_hash(record));
                let stored = updates.get(&key).or_else(|| keys.get(&key)).copied();
                match stored {
                    Some((ts, _)) if record.ts < ts => {
                        duplicates += 1;
                        continue;
                    }
                    Some(existing) if existing == version => {
                        duplicates += 1;
                        continue;
                    }
                    Some(_) => match position.get(&key) {
                        // Superseded within this batch: never written, just dropped.
                        Some(&i) => appended[i] = None,
                        None => replaced.push(record),
                    },
                    None => {}
                }
                position.insert(key, appended.len());
                appended.push(Some(record));
                updates.insert(key, version);
            }
            let rows: Vec<&Record> = appended.into_iter().flatten().collect();
            if rows.is_empty() {
                continue;
            }
            let table = kind.as_str();
            let batch = to_arrow(&rows, ingested_at)?;
            conn.execute_batch("BEGIN TRANSACTION")?;
            let result = (|| -> Result<(), HotError> {
                if !replaced.is_empty() {
                    let mut appender = conn.appender(&format!("replaced_{table}"))?;
                    for r in &replaced {
                        appender.append_row(duckdb::params![r.system_id, r.id])?;
                    }
                    appender.flush()?;
                    drop(appender);
                    conn.execute_batch(&format!(
                        "DELETE FROM {table} t USING replaced_{table} k WHERE t.system_id = k.system_id AND t.id = k.id;\n\
                         DELETE FROM replaced_{table};"
                    ))?;
                }
                let mut appender = conn.appender(table)?;
                appender.append_record_batch(batch)?;
                appender.flush()?;
                Ok(())
            })();
            match result.and_then(|()| conn.execute_batch("COMMIT").map_err(HotError::from)) {
                Ok(()) => keys.extend(updates),
                Err(e) => {
                    let _ = conn.execute_batch("ROLLBACK");
                    return Err(e);
                }
            }
            // After the commit: an index entry never points at a row that is not there.
            let job = if self.indexer.pending.load(Ordering::Relaxed) < self.index_backlog.load(Ordering::Relaxed) {
                let keyed: Vec<(u64, Record)> = rows.iter().map(|r| (key_hash(r), (*r).clone())).collect();
                self.tail.add(&keyed.iter().map(|(k, r)| (*k, r)).collect::<Vec<_>>());
                IndexJob::Records(keyed)
            } else {
                IndexJob::Keys(kind, rows.iter().map(|r| (r.system_id.clone(), r.id.clone())).collect())
            };
            self.indexer.pending.fetch_add(rows.len() as u64, Ordering::Relaxed);
            if self.indexer.queue.send(job).is_err() {
                error!(message = "The search indexer has stopped; new records are not searchable until restart.");
            }
        }
        self.duplicates.fetch_add(duplicates, Ordering::Relaxed);
        if let Some(applied) = applied
            && !self.apply_failed.load(Ordering::Relaxed)
        {
            self.applied.fetch_max(applied, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Deletes what `selector` covers from hot and warm, with their index entries. `before` runs first, under
    /// the writer lock, with the log position up to which hot has applied batches and the `ingested_at` cutoff
    /// (the audit log records both, so that a restart does not replay what this deletes). Only rows ingested at or
    /// before the cutoff go — `ingested_before_us`, or now (under the lock, so every applied row is covered) —
    /// so that re-running an interrupted deletion spares records that arrived after it: replayed rows are
    /// ingested anew.
    pub fn delete(
        &self,
        selector: &crate::erasure::Selector,
        ingested_before_us: Option<i64>,
        before: impl FnOnce(u64, i64) -> Result<(), HotError>,
    ) -> Result<crate::erasure::Deleted, HotError> {
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let warm = self.warm.get().cloned();
        let _moving = warm.as_ref().map(|w| w.lock_moves());
        // Index jobs still queued could re-add deleted keys to the hot indexes after their removal.
        self.wait_indexed(std::time::Duration::from_secs(300));
        let ingested_before_us = ingested_before_us.unwrap_or_else(|| jiff::Timestamp::now().as_microsecond());
        before(self.applied.load(Ordering::Relaxed), ingested_before_us)?;
        let Writer { conn, keys } = &mut *writer;
        let mut deleted = crate::erasure::Deleted::default();
        let delete = |conn: &Connection, sql: String, kind: RecordKind| -> Result<Vec<u64>, HotError> {
            let mut stmt = conn.prepare(&sql)?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            let mut hashes = Vec::new();
            for row in rows {
                let (system_id, id) = row?;
                hashes.push(key_hash_of(kind, &system_id, &id));
            }
            Ok(hashes)
        };
        for kind in selector.kinds() {
            let t = kind.as_str();
            let hashes = delete(
                conn,
                format!(
                    "DELETE FROM main.{t} w WHERE {} AND w.ingested_at <= make_timestamp({ingested_before_us}) \
                     RETURNING system_id, id",
                    selector.sql("w")
                ),
                kind,
            )?;
            for h in &hashes {
                keys.remove(h);
            }
            self.indexes.remove(&hashes)?;
            deleted.hot += hashes.len() as u64;
            if let Some(warm) = &warm {
                let matching =
                    format!("{} AND w.ingested_at <= make_timestamp({ingested_before_us})", selector.sql("w"));
                // The erased points leave the 5-minute buckets of their days in the same transaction.
                let rollups = if kind == RecordKind::Metric {
                    let mut stmt = conn.prepare(&format!(
                        "SELECT DISTINCT system_id, strftime(CAST(ts AS DATE), '%Y-%m-%d') FROM warm.metric w WHERE {matching}"
                    ))?;
                    let days = stmt
                        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
                        .collect::<Result<Vec<_>, _>>()?;
                    crate::rollup::days_relation(days.iter().map(|(s, d)| (s.as_str(), d.as_str())))
                        .map(|days| crate::rollup::Rollup::FiveMinutes.refresh_from_warm_sql(&days))
                } else {
                    None
                };
                // A separate transaction: DuckDB writes one attached database per transaction.
                conn.execute_batch("BEGIN TRANSACTION")?;
                let hashes =
                    delete(conn, format!("DELETE FROM warm.{t} w WHERE {matching} RETURNING system_id, id"), kind)
                        .and_then(|hashes| {
                            if let Some(sql) = &rollups {
                                conn.execute_batch(sql)?;
                            }
                            conn.execute_batch("COMMIT")?;
                            Ok(hashes)
                        })
                        .inspect_err(|_| {
                            let _ = conn.execute_batch("ROLLBACK");
                        })?;
                warm.forget(&hashes)?;
                deleted.warm += hashes.len() as u64;
            }
        }
        self.indexes.commit()?;
        if let Some(warm) = &warm
            && deleted.warm > 0
        {
            drop(_moving);
            warm.persist(conn)?;
        }
        notify(&self.on_change, std::iter::once(String::from("*")));
        Ok(deleted)
    }

    /// Vectors written but not yet in the ANN index.
    pub fn tail(&self) -> &crate::search::Tail {
        &self.tail
    }

    /// The search indexes over this tier's records.
    pub fn indexes(&self) -> &SearchIndexes {
        &self.indexes
    }

    /// Records whose index update failed.
    pub fn index_failures(&self) -> u64 {
        self.indexer.failures.load(Ordering::Relaxed)
    }

    /// Records written to the table and not yet searchable.
    pub fn index_pending(&self) -> u64 {
        self.indexer.pending.load(Ordering::Relaxed)
    }

    /// Waits until everything written so far is searchable, or `timeout` passes; returns whether it is.
    pub fn wait_indexed(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while self.index_pending() > 0 {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        true
    }

    /// Records dropped because an equal or newer version was already stored.
    pub fn duplicates(&self) -> u64 {
        self.duplicates.load(Ordering::Relaxed)
    }

    /// Applies durable batches until the channel closes. Batches that queued up meanwhile are merged into one
    /// insert, so the tier keeps up with bursts by doing fewer, larger transactions.
    pub fn spawn_writer(self: &Arc<Self>, rx: std::sync::mpsc::Receiver<DurableBatch>) -> std::io::Result<()> {
        let hot = self.clone();
        std::thread::Builder::new().name("hot-writer".into()).spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut applied = first.position + 1;
                let mut records = first.records;
                while records.len() < 50_000 {
                    match rx.try_recv() {
                        Ok(more) => {
                            applied = applied.max(more.position + 1);
                            records.extend(more.records);
                        }
                        Err(_) => break,
                    }
                }
                let n = records.len() as u64;
                let result = hot.insert_at(&records, Some(applied));
                notify(&hot.on_change, records.iter().map(|r| r.system_id.clone()));
                if let Err(e) = result {
                    hot.apply_failed.store(true, Ordering::Relaxed);
                    hot.failed_batches.fetch_add(1, Ordering::Relaxed);
                    error!(message = "Hot tier insert failed; the records stay in the write-ahead log and return on restart.", error = %e, records = n);
                }
                hot.pending.fetch_sub(n.min(hot.pending.load(Ordering::Relaxed)), Ordering::Relaxed);
            }
        })?;
        Ok(())
    }

    /// Notes that every log entry before `position` is applied (the replay's end).
    pub fn set_applied(&self, position: u64) {
        self.applied.fetch_max(position, Ordering::Relaxed);
    }

    /// Registers the hook told about completed hot→warm moves (once).
    pub fn on_warm_move(&self, hook: WarmMoveHook) {
        let _ = self.on_warm_move.set(hook);
    }

    /// Counts records handed to the writer and not yet applied (for metrics and readiness).
    pub fn note_pending(&self, records: u64) {
        self.pending.fetch_add(records, Ordering::Relaxed);
    }

    /// Records waiting to be applied.
    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }

    /// Records applied since start.
    pub fn inserted(&self) -> u64 {
        self.inserted.load(Ordering::Relaxed)
    }

    /// Batches that failed to apply.
    pub fn failed_batches(&self) -> u64 {
        self.failed_batches.load(Ordering::Relaxed)
    }

    /// One record as JSON, or `None`.
    pub fn get(&self, system_id: &str, kind: RecordKind, id: &str) -> Result<Option<serde_json::Value>, HotError> {
        Ok(self.get_many(kind, &[(system_id, id)], true)?.into_values().next())
    }

    /// Many records of one kind, keyed by `(system_id, id)`; keys not stored are absent. `with_embedding: false`
    /// leaves the vectors out (search results do not show them, and they are most of a row).
    ///
    /// Each tier's table is probed through its index on `id` (`id IN (…)`), table by table: DuckDB does not take
    /// an index through the `all_<kind>` union, and a scan costs ~50 ms at a million rows. During a move a key can
    /// briefly be in both tiers; the newer version wins, hot on a tie.
    pub fn get_many(
        &self,
        kind: RecordKind,
        keys: &[(&str, &str)],
        with_embedding: bool,
    ) -> Result<HashMap<(String, String), serde_json::Value>, HotError> {
        let mut best: HashMap<(String, String), (i64, serde_json::Value)> = HashMap::with_capacity(keys.len());
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let wanted: std::collections::HashSet<(&str, &str)> = keys.iter().copied().collect();
        let mut ids: Vec<&str> = keys.iter().map(|(_, id)| *id).collect();
        ids.sort_unstable();
        ids.dedup();
        let columns = if with_embedding {
            RECORD_COLUMNS.to_owned()
        } else {
            RECORD_COLUMNS.replacen("embedding", "NULL::FLOAT[1] AS embedding", 1)
        };
        let mut tables = vec![(format!("main.{}", kind.as_str()), "hot")];
        if self.warm.get().is_some() {
            tables.push((format!("warm.{}", kind.as_str()), "warm"));
        }
        let conn = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        // Warm first, so that a hot version with the same timestamp replaces it.
        for (table, tier) in tables.iter().rev() {
            for chunk in ids.chunks(LOOKUP_SLOTS[LOOKUP_SLOTS.len() - 1]) {
                // A few fixed list lengths (the last id repeated) keep the cached statements few.
                let slots = LOOKUP_SLOTS.iter().copied().find(|&n| n >= chunk.len()).unwrap_or(chunk.len());
                let list = vec!["?"; slots].join(", ");
                let sql = format!("SELECT {columns}, '{tier}' AS tier FROM {table} WHERE id IN ({list})");
                let mut stmt = conn.prepare_cached(&sql)?;
                let params: Vec<&str> =
                    chunk.iter().copied().chain(std::iter::repeat(chunk[chunk.len() - 1])).take(slots).collect();
                let mut rows = stmt.query(duckdb::params_from_iter(params))?;
                while let Some(row) = rows.next()? {
                    let (system_id, id): (String, String) = (row.get(0)?, row.get(1)?);
                    if !wanted.contains(&(system_id.as_str(), id.as_str())) {
                        continue;
                    }
                    let ts: i64 = row.get(2)?;
                    let key = (system_id, id);
                    if best.get(&key).is_none_or(|(seen, _)| ts >= *seen) {
                        best.insert(key, (ts, row_json(row, kind)?));
                    }
                }
            }
        }
        Ok(best.into_iter().map(|(key, (_, record))| (key, record)).collect())
    }

    /// Attaches the warm tier (once) and returns it.
    pub fn attach_warm(&self, config: crate::warm::WarmConfig) -> Result<Arc<crate::warm::WarmTier>, HotError> {
        if let Some(warm) = self.warm.get() {
            return Ok(warm.clone());
        }
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let warm = Arc::new(crate::warm::WarmTier::open(&writer.conn, config)?);
        // The hot copies of promoted groups died with the last process; warm hides its rows of them.
        let promoted = self.promoted_groups(&writer.conn)?;
        for (kind, system_id, day, _) in &promoted {
            self.copy_group_to_hot(&mut writer, *kind, system_id, day)?;
        }
        if !promoted.is_empty() {
            info!(message = "Groups promoted to hot reloaded from warm.", groups = promoted.len());
        }
        let _ = self.warm.set(warm.clone());
        Ok(warm)
    }

    /// The groups promoted to hot: kind, system, day and the end of their hold (microseconds).
    fn promoted_groups(&self, conn: &Connection) -> Result<Vec<PromotedGroup>, HotError> {
        let mut stmt = conn.prepare(
            "SELECT kind, system_id, strftime(day, '%Y-%m-%d'), epoch_us(until) FROM warm.hot_holds ORDER BY 3, 1, 2",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (kind, system_id, day, until) = row?;
            let kind = kind.parse().map_err(|_| HotError::Io(format!("unknown kind `{kind}` in warm.hot_holds")))?;
            out.push((kind, system_id, day, until));
        }
        Ok(out)
    }

    /// Copies the warm rows of one (kind, system, day) group into hot, where hot has no newer version.
    fn copy_group_to_hot(
        &self,
        writer: &mut Writer,
        kind: RecordKind,
        system_id: &str,
        day: &str,
    ) -> Result<u64, HotError> {
        let Writer { conn, keys } = writer;
        let t = kind.as_str();
        let group = "w.system_id = $1 AND CAST(w.ts AS DATE) = CAST($2 AS DATE)";
        conn.execute_batch("BEGIN TRANSACTION")?;
        let copied = (|| -> Result<Vec<(String, String, i64)>, HotError> {
            conn.execute(
                &format!(
                    "DELETE FROM main.{t} h USING warm.{t} w WHERE {group} \
                     AND h.system_id = w.system_id AND h.id = w.id AND h.ts < w.ts"
                ),
                duckdb::params![system_id, day],
            )?;
            let mut stmt = conn.prepare(&format!(
                "INSERT INTO main.{t} SELECT w.* FROM warm.{t} w WHERE {group} \
                 AND NOT EXISTS (SELECT 1 FROM main.{t} h WHERE h.system_id = w.system_id AND h.id = w.id) \
                 RETURNING system_id, id, epoch_us(ts)"
            ))?;
            let rows = stmt.query_map(duckdb::params![system_id, day], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })();
        let copied = match copied.and_then(|c| conn.execute_batch("COMMIT").map(|()| c).map_err(HotError::from)) {
            Ok(copied) => copied,
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e);
            }
        };
        // The content hash is unknown here: any later version with the same timestamp replaces the copy.
        for (system_id, id, ts) in &copied {
            keys.insert(key_hash_of(kind, system_id, id), (*ts, 0));
        }
        if !copied.is_empty() {
            self.indexer.pending.fetch_add(copied.len() as u64, Ordering::Relaxed);
            let job = IndexJob::Keys(kind, copied.iter().map(|(s, i, _)| (s.clone(), i.clone())).collect());
            if self.indexer.queue.send(job).is_err() {
                error!(message = "The search indexer has stopped; new records are not searchable until restart.");
            }
        }
        Ok(copied.len() as u64)
    }

    /// Promotion to hot, one round (see "Lifecycle" in `docs/STORAGE.md`): warm groups read at least the
    /// promotion threshold get a copy in hot — warm keeps the durable one and hides its rows while the group is
    /// promoted, the hot→warm move leaves the copy alone — and promoted groups idle past their hold (`min_age`)
    /// drop the copy and are held in warm for `min_age`. Needs the cold tier, which keeps the read counts.
    pub fn promote_to_hot(&self) -> Result<Option<HotPromotionReport>, HotError> {
        let result = self.promote_to_hot_round();
        let mut totals = self.to_hot.lock().unwrap_or_else(|p| p.into_inner());
        match &result {
            Ok(Some(report)) => {
                totals.promoted += report.promoted;
                totals.released += report.released;
                totals.records_promoted += report.records;
                totals.last_round = Some(report.clone());
                totals.last_error = None;
            }
            Ok(None) => {}
            Err(e) => {
                totals.failed += 1;
                totals.last_error = Some(e.to_string());
            }
        }
        result
    }

    /// What promotion to hot has done since start, and the groups promoted now (kind, system, day, hold end).
    pub fn promotion_to_hot(&self) -> Result<(HotPromotionTotals, Vec<PromotedGroup>), HotError> {
        let totals = self.to_hot.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if self.warm.get().is_none() {
            return Ok((totals, Vec::new()));
        }
        let conn = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        Ok((totals, self.promoted_groups(&conn)?))
    }

    /// Warm groups read often enough to be promoted to hot and not promoted yet, with their reads and whether
    /// they moved less than `min_age` ago.
    fn warm_candidates(
        &self,
        conn: &Connection,
        cold: &crate::cold::ColdTier,
        held: &std::collections::HashSet<(String, String, String)>,
        now: i64,
    ) -> Result<Vec<(crate::cold::access::Group, RecordKind, f64, bool)>, HotError> {
        let mut out = Vec::new();
        for (group, reads) in cold.read_groups_at_least(cold.config.promotion.threshold(), now) {
            let Ok(kind) = group.kind.parse::<RecordKind>() else { continue };
            if held.contains(&(group.kind.clone(), group.system_id.clone(), group.day.clone())) {
                continue;
            }
            // A range on `ts` (not a cast of it) lets DuckDB skip row groups by their min/max: this runs for every
            // group read often, each round.
            let (in_warm, young): (bool, bool) = conn.query_row(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM warm.{} WHERE system_id = $1 AND ts >= CAST($2 AS DATE) \
                       AND ts < CAST($2 AS DATE) + INTERVAL 1 DAY), \
                     EXISTS (SELECT 1 FROM warm.tier_holds WHERE kind = $3 AND system_id = $1 AND day = CAST($2 AS DATE) \
                       AND until > now())",
                    kind.as_str()
                ),
                duckdb::params![group.system_id, group.day, group.kind],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            if in_warm {
                out.push((group, kind, reads, young));
            }
        }
        Ok(out)
    }

    /// What the next round of promotion to hot would promote: group, reads, and whether it must wait (`min_age`).
    pub fn hot_promotion_candidates(&self) -> Result<Vec<(crate::cold::access::Group, f64, bool)>, HotError> {
        let (Some(_), Some(cold)) = (self.warm.get(), self.cold.get()) else { return Ok(Vec::new()) };
        let conn = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        let held = self.promoted_groups(&conn)?.into_iter().map(|(k, s, d, _)| (k.as_str().to_owned(), s, d)).collect();
        let now = jiff::Timestamp::now().as_microsecond();
        let candidates = self.warm_candidates(&conn, cold, &held, now)?;
        Ok(candidates.into_iter().map(|(g, _, reads, young)| (g, reads, young)).collect())
    }

    /// Before a scheduled hot→warm move: the hot groups with rows older than their kind's cutoff that are still
    /// read often enough to be promoted are promoted in place — the move then copies them to warm (the durable
    /// copy) and leaves them in hot — so that they do not leave by age and come straight back. Returns the groups.
    pub fn keep_read_groups_hot(&self, cutoff_of: impl Fn(RecordKind) -> i64) -> Result<u64, HotError> {
        let (Some(warm), Some(cold)) = (self.warm.get(), self.cold.get()) else { return Ok(0) };
        let promotion = &cold.config.promotion;
        if !promotion.enabled {
            return Ok(0);
        }
        let now = jiff::Timestamp::now().as_microsecond();
        let until = now + promotion.min_age.as_micros() as i64;
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let _moving = warm.lock_moves();
        let mut kept = 0;
        for (group, _) in cold.read_groups_at_least(promotion.threshold(), now) {
            let Ok(kind) = group.kind.parse::<RecordKind>() else { continue };
            let t = kind.as_str();
            kept += writer.conn.execute(
                &format!(
                    "INSERT INTO warm.hot_holds SELECT $1, $2, CAST($3 AS DATE), make_timestamp($4) \
                     WHERE EXISTS (SELECT 1 FROM main.{t} WHERE system_id = $2 \
                       AND CAST(ts AS DATE) = CAST($3 AS DATE) AND ts < make_timestamp($5)) \
                     AND NOT EXISTS (SELECT 1 FROM warm.hot_holds WHERE kind = $1 AND system_id = $2 \
                       AND day = CAST($3 AS DATE))"
                ),
                duckdb::params![t, group.system_id, group.day, until, cutoff_of(kind)],
            )? as u64;
        }
        if kept > 0 {
            info!(message = "Hot groups still read often stay hot past their window.", groups = kept);
            self.to_hot.lock().unwrap_or_else(|p| p.into_inner()).promoted += kept;
        }
        Ok(kept)
    }

    fn promote_to_hot_round(&self) -> Result<Option<HotPromotionReport>, HotError> {
        let (Some(warm), Some(cold)) = (self.warm.get().cloned(), self.cold.get().cloned()) else { return Ok(None) };
        let started = std::time::Instant::now();
        let promotion = cold.config.promotion.clone();
        let mut report = HotPromotionReport::default();
        if !promotion.enabled {
            return Ok(Some(report));
        }
        let now = jiff::Timestamp::now().as_microsecond();
        let hold_until = now + promotion.min_age.as_micros() as i64;
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let _moving = warm.lock_moves();
        let promoted = self.promoted_groups(&writer.conn)?;
        for (kind, system_id, day, until) in &promoted {
            let group = crate::cold::access::Group {
                kind: kind.as_str().into(),
                system_id: system_id.clone(),
                day: day.clone(),
            };
            if *until > now || cold.read_score(&group, now) >= promotion.threshold() {
                continue;
            }
            // Queries wait: between the two statements a reader would see the group twice (or not at all).
            let _readers = self.reader.lock().unwrap_or_else(|p| p.into_inner());
            let Writer { conn, keys } = &mut *writer;
            let t = kind.as_str();
            // Copies identical to warm's go; a newer version stays for the next hot→warm move.
            let hashes: Vec<u64> = {
                let mut stmt = conn.prepare(&format!(
                    "DELETE FROM main.{t} h WHERE h.system_id = ? AND CAST(h.ts AS DATE) = CAST(? AS DATE) \
                     AND EXISTS (SELECT 1 FROM warm.{t} w WHERE w.system_id = h.system_id AND w.id = h.id AND {}) \
                     RETURNING system_id, id",
                    crate::warm::same_version("h", "w")
                ))?;
                let rows = stmt.query_map(duckdb::params![system_id, day], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                })?;
                rows.map(|row| row.map(|(s, id)| key_hash_of(*kind, &s, &id))).collect::<Result<_, _>>()?
            };
            for h in &hashes {
                keys.remove(h);
            }
            self.indexes.remove(&hashes)?;
            self.indexes.commit()?;
            conn.execute(
                "DELETE FROM warm.hot_holds WHERE kind = ? AND system_id = ? AND day = CAST(? AS DATE)",
                duckdb::params![t, system_id, day],
            )?;
            conn.execute(
                "INSERT INTO warm.tier_holds VALUES (?, ?, CAST(? AS DATE), make_timestamp(?))",
                duckdb::params![t, system_id, day, hold_until],
            )?;
            info!(message = "A group promoted to hot went idle; warm answers for it again.", kind = t, system_id = %system_id, day = %day);
            report.released += 1;
        }
        let held: std::collections::HashSet<(String, String, String)> =
            promoted.into_iter().map(|(k, s, d, _)| (k.as_str().to_owned(), s, d)).collect();
        for (group, kind, reads, young) in self.warm_candidates(&writer.conn, &cold, &held, now)? {
            if young {
                report.too_young += 1;
                continue;
            }
            if report.promoted as usize >= promotion.max_groups_per_run {
                report.deferred += 1;
                continue;
            }
            let _readers = self.reader.lock().unwrap_or_else(|p| p.into_inner());
            let records = self.copy_group_to_hot(&mut writer, kind, &group.system_id, &group.day)?;
            writer.conn.execute(
                "INSERT INTO warm.hot_holds VALUES (?, ?, CAST(? AS DATE), make_timestamp(?))",
                duckdb::params![group.kind, group.system_id, group.day, hold_until],
            )?;
            info!(
                message = "Promoted a group read often to hot.",
                kind = %group.kind,
                system_id = %group.system_id,
                day = %group.day,
                reads,
                records
            );
            report.promoted += 1;
            report.records += records;
        }
        drop(_moving);
        if report.promoted > 0 || report.released > 0 {
            warm.persist(&writer.conn)?;
            notify(&self.on_change, std::iter::once(String::from("*")));
        }
        report.took_ms = started.elapsed().as_millis() as u64;
        Ok(Some(report))
    }

    /// A new connection to the hot database (warm attached), for work that must not hold the shared ones.
    pub fn connection(&self) -> Result<Connection, HotError> {
        Ok(self.writer.lock().unwrap_or_else(|p| p.into_inner()).conn.try_clone()?)
    }

    /// The warm tier, if attached.
    pub fn warm(&self) -> Option<&Arc<crate::warm::WarmTier>> {
        self.warm.get()
    }

    /// Attaches the cold tier (once; the warm tier must be attached, its file holds the catalog).
    pub fn attach_cold(
        &self,
        config: crate::cold::ColdConfig,
    ) -> Result<Arc<crate::cold::ColdTier>, crate::cold::ColdError> {
        if let Some(cold) = self.cold.get() {
            return Ok(cold.clone());
        }
        if self.warm.get().is_none() {
            return Err(crate::cold::ColdError::Io("the cold tier needs the warm tier (`warm.enabled`)".into()));
        }
        let conn = self.writer.lock().unwrap_or_else(|p| p.into_inner()).conn.try_clone()?;
        let cold = Arc::new(crate::cold::ColdTier::open(&conn, config)?);
        let _ = self.cold.set(cold.clone());
        Ok(cold)
    }

    /// The cold tier, if attached.
    pub fn cold(&self) -> Option<&Arc<crate::cold::ColdTier>> {
        self.cold.get()
    }

    /// Moves every warm record older than `cutoff_us` to the cold tier (see [`crate::cold`]). Ingest goes on
    /// meanwhile. `None` when there is no cold tier or nothing to move.
    pub fn move_to_cold(&self, cutoff_us: i64) -> Result<Option<crate::cold::ColdMoveReport>, crate::cold::ColdError> {
        self.move_to_cold_by(|_| cutoff_us)
    }

    /// [`HotTier::move_to_cold`] with a cutoff per kind (the configured per-kind windows).
    pub fn move_to_cold_by(
        &self,
        cutoff_of: impl Fn(RecordKind) -> i64,
    ) -> Result<Option<crate::cold::ColdMoveReport>, crate::cold::ColdError> {
        let (Some(warm), Some(cold)) = (self.warm.get(), self.cold.get()) else { return Ok(None) };
        let report = cold.move_from_warm(warm, &cutoff_of)?;
        if report.is_some() {
            notify(&self.on_change, std::iter::once(String::from("*")));
        }
        Ok(report)
    }

    /// Promotes cold groups read often enough back to warm (see [`crate::cold::ColdTier::promote`]). `None` when
    /// there is no cold tier.
    pub fn promote_from_cold(&self) -> Result<Option<crate::cold::PromotionReport>, crate::cold::ColdError> {
        let (Some(warm), Some(cold)) = (self.warm.get(), self.cold.get()) else { return Ok(None) };
        let report = cold.promote(warm)?;
        if report.groups > 0 {
            notify(&self.on_change, std::iter::once(String::from("*")));
        }
        Ok(Some(report))
    }

    /// Runs `f` on the query connection with `all_<kind>` spanning the cold tier too, for each of `kinds` that has
    /// cold objects for `systems` (all when empty) in `[since, until)`: the objects are fetched into the cache
    /// first, and a key in several tiers shows its newest version (hot or warm on a tie).
    pub fn read_spanning<T>(
        &self,
        kinds: &[RecordKind],
        systems: &[String],
        since_us: Option<i64>,
        until_us: Option<i64>,
        f: impl FnOnce(&Connection) -> Result<T, HotError>,
    ) -> Result<T, HotError> {
        let Some(cold) = self.cold.get() else { return self.read(f) };
        let cold_err = |e: crate::cold::ColdError| HotError::Io(e.to_string());
        let mut leases = Vec::new();
        for &kind in kinds {
            let objects = cold.objects(kind, systems, since_us, until_us).map_err(cold_err)?;
            if !objects.is_empty() {
                leases.push((kind, cold.lease(&objects).map_err(cold_err)?));
            }
        }
        if leases.is_empty() {
            return self.read(f);
        }
        self.read(|conn| {
            // Unqualified, `main` would name the temp catalog's schema, where the view being created lives.
            let database: String = conn.query_row("SELECT current_database()", [], |r| r.get(0))?;
            let mut views = String::new();
            for (kind, lease) in &leases {
                let t = kind.as_str();
                views.push_str(&format!(
                    "CREATE OR REPLACE TEMP VIEW all_{t} AS SELECT * FROM (SELECT * FROM \"{database}\".main.all_{t} \
                     UNION ALL SELECT *, 'cold' AS tier FROM {}) \
                     QUALIFY row_number() OVER (PARTITION BY system_id, id ORDER BY ts DESC, tier = 'cold') = 1;\n",
                    crate::cold::visible_source(t, &lease.paths, lease.int8)
                ));
            }
            conn.execute_batch(&views)?;
            let result = f(conn);
            let drop: String =
                leases.iter().map(|(kind, _)| format!("DROP VIEW IF EXISTS temp.all_{};\n", kind.as_str())).collect();
            conn.execute_batch(&drop)?;
            result
        })
    }

    /// Moves every record older than `cutoff_us` to the warm tier (see [`crate::warm`] for the protocol).
    /// Ingest waits while it runs. `None` when there is no warm tier or nothing to move.
    pub fn move_to_warm(&self, cutoff_us: i64) -> Result<Option<crate::warm::MoveReport>, HotError> {
        self.move_to_warm_by(|_| cutoff_us)
    }

    /// [`HotTier::move_to_warm`] with a cutoff per kind (the configured per-kind windows).
    pub fn move_to_warm_by(
        &self,
        cutoff_of: impl Fn(RecordKind) -> i64,
    ) -> Result<Option<crate::warm::MoveReport>, HotError> {
        let Some(warm) = self.warm.get().cloned() else { return Ok(None) };
        // The log may only forget what is warm for every kind: the earliest cutoff.
        let cutoff_us = RecordKind::ALL.iter().map(|k| cutoff_of(*k)).min().unwrap_or(i64::MIN);
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let _moving = warm.lock_moves();
        // Index jobs still queued could re-add moved keys to the hot indexes after their removal.
        self.wait_indexed(std::time::Duration::from_secs(300));
        let started = std::time::Instant::now();
        // Under the writer lock: every logged batch before this position is in the table now.
        let mark = crate::wal::WarmMark { applied: self.applied.load(Ordering::Relaxed), cutoff_us };
        let released = !self.apply_failed.load(Ordering::Relaxed);
        let id = jiff::Timestamp::now().as_microsecond();
        let mut report = crate::warm::MoveReport { id, cutoff_us, ..Default::default() };
        let Writer { conn, keys } = &mut *writer;
        let result = (|| -> Result<(), HotError> {
            for kind in RecordKind::ALL {
                let t = kind.as_str();
                let cutoff_us = cutoff_of(kind);
                // A group promoted to hot keeps its rows here; only versions warm lacks are copied (so that warm
                // holds every version the log may forget).
                let promoted_here = crate::warm::not_promoted(kind, "h");
                let due: i64 = conn.query_row(
                    &format!(
                        "SELECT count(*) FROM main.{t} h WHERE h.ts < make_timestamp(?) AND ({promoted_here} OR \
                         NOT EXISTS (SELECT 1 FROM warm.{t} w WHERE w.system_id = h.system_id AND w.id = h.id AND {}))",
                        crate::warm::same_version("h", "w")
                    ),
                    [cutoff_us],
                    |r| r.get(0),
                )?;
                if due == 0 {
                    continue;
                }
                crate::warm::WarmTier::journal(conn, id, kind, cutoff_us, "copying", due as u64, None)?;
                warm.copy(conn, id, kind, cutoff_us)?;
                let verified = match crate::warm::WarmTier::verify(conn, kind, cutoff_us)? {
                    Ok(v) => v,
                    Err(problem) => {
                        crate::warm::WarmTier::set_state(conn, id, kind, "failed", Some(&problem))?;
                        return Err(HotError::Io(format!("warm move verification failed: {problem}")));
                    }
                };
                conn.execute(
                    "UPDATE warm.moves SET state = 'verified', records = ?, checksum = ? WHERE id = ? AND kind = ?",
                    duckdb::params![verified.rows as i64, verified.checksum, id, t],
                )?;
                let moved = index_records(
                    conn,
                    &format!("FROM main.{t} t WHERE t.ts < make_timestamp({cutoff_us})"),
                    kind,
                    true,
                )?;
                warm.index(&moved)?;
                let hashes: Vec<u64> = {
                    let mut stmt = conn.prepare(&format!(
                        "DELETE FROM main.{t} h WHERE h.ts < make_timestamp(?) AND {} RETURNING system_id, id",
                        crate::warm::not_promoted(kind, "h")
                    ))?;
                    let rows = stmt.query_map([cutoff_us], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
                    rows.map(|row| row.map(|(system, id)| key_hash_of(kind, &system, &id))).collect::<Result<_, _>>()?
                };
                for h in &hashes {
                    keys.remove(h);
                }
                self.indexes.remove(&hashes)?;
                self.indexes.commit()?;
                crate::warm::WarmTier::set_state(conn, id, kind, "done", None)?;
                report.records.push((t, hashes.len() as u64));
            }
            Ok(())
        })();
        if let Err(e) = result {
            warm.failed(&e.to_string());
            return Err(e);
        }
        let tell = |mark| {
            if let (true, Some(hook)) = (released, self.on_warm_move.get()) {
                hook(mark);
            }
        };
        if report.records.is_empty() {
            // Everything older than the cutoff was already warm (and checkpointed by the move that put it there).
            tell(mark);
            return Ok(None);
        }
        report.took_ms = started.elapsed().as_millis() as u64;
        warm.finish(conn, report.clone())?;
        tell(mark);
        // The answers stay the same records; only their `tier` changed.
        notify(&self.on_change, std::iter::once(String::from("*")));
        Ok(Some(report))
    }

    /// Registers the hook told about changed systems (once; later calls change nothing).
    pub fn on_change(&self, hook: ChangeHook) {
        let _ = self.on_change.set(hook);
    }

    /// Starts embedding records that arrive without a vector (once; later calls change nothing).
    pub fn start_backfill(&self, embedder: Arc<crate::embed::Embedder>, capacity: usize) -> Result<(), HotError> {
        if self.backfill.get().is_some() {
            return Ok(());
        }
        let on_change = self.on_change.clone();
        let attached = move |systems: Vec<String>| notify(&on_change, systems.into_iter());
        let backfill = crate::embed::Backfill::start(embedder, self.indexes.clone(), capacity, attached)
            .map_err(|e| HotError::Thread(e.to_string()))?;
        let _ = self.backfill.set(backfill);
        Ok(())
    }

    /// The embedding backfill, if running.
    pub fn backfill(&self) -> Option<&crate::embed::Backfill> {
        self.backfill.get()
    }

    /// Runs `f` on the query connection (analytical queries: graph, metrics, listings).
    pub fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T, HotError>) -> Result<T, HotError> {
        let conn = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn)
    }

    /// Rows per system and kind.
    pub fn counts(&self) -> Result<Vec<KindCount>, HotError> {
        let conn = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for kind in RecordKind::ALL {
            let sql =
                format!("SELECT system_id, count(*) FROM {} GROUP BY system_id ORDER BY system_id", kind.as_str());
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt.query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?)))?;
            for row in rows {
                let (system_id, records) = row?;
                out.push(KindCount { system_id, kind: kind.as_str(), records: records as u64 });
            }
        }
        Ok(out)
    }
}

/// Columns of a stored record, in the order [`row_json`] reads them.
/// List lengths of the `id IN (…)` lookups.
const LOOKUP_SLOTS: [usize; 4] = [1, 16, 64, 256];

pub(crate) const RECORD_COLUMNS: &str = "system_id, id, epoch_us(ts), project, namespace, category, text, name, embedding, tags, \
     metadata, importance, residency, from_id, to_id, relation_type, weight, value, epoch_us(ingested_at)";

/// A stored record as the API shows it (null fields left out).
pub(crate) fn row_json(row: &duckdb::Row<'_>, kind: RecordKind) -> Result<serde_json::Value, HotError> {
    let text = |i: usize| -> Result<serde_json::Value, duckdb::Error> {
        Ok(row.get::<_, Option<String>>(i)?.map_or(serde_json::Value::Null, serde_json::Value::String))
    };
    let float = |i: usize| -> Result<serde_json::Value, duckdb::Error> {
        Ok(row.get::<_, Option<f64>>(i)?.map_or(serde_json::Value::Null, serde_json::Value::from))
    };
    let embedding = match row.get::<_, duckdb::types::Value>(8)? {
        duckdb::types::Value::Array(values) | duckdb::types::Value::List(values) => serde_json::Value::Array(
            values
                .into_iter()
                .map(|v| match v {
                    duckdb::types::Value::Float(f) => serde_json::Value::from(f),
                    _ => serde_json::Value::Null,
                })
                .collect(),
        ),
        _ => serde_json::Value::Null,
    };
    let tags = match row.get::<_, duckdb::types::Value>(9)? {
        duckdb::types::Value::List(values) => values
            .into_iter()
            .filter_map(|v| match v {
                duckdb::types::Value::Text(s) => Some(serde_json::Value::String(s)),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let metadata = row
        .get::<_, Option<String>>(10)?
        .and_then(|m| serde_json::from_str(&m).ok())
        .unwrap_or(serde_json::Value::Null);
    let mut out = serde_json::json!({
        "system_id": text(0)?,
        "id": text(1)?,
        "kind": kind.as_str(),
        "ts": row.get::<_, i64>(2)?,
        "project": text(3)?,
        "namespace": text(4)?,
        "category": text(5)?,
        "text": text(6)?,
        "name": text(7)?,
        "embedding": embedding,
        "tags": tags,
        "metadata": metadata,
        "importance": float(11)?,
        "residency": text(12)?,
        "from": text(13)?,
        "to": text(14)?,
        "relation_type": text(15)?,
        "weight": float(16)?,
        "value": float(17)?,
        "ingested_at": row.get::<_, i64>(18)?,
        "tier": row.get::<_, String>(19).unwrap_or_else(|_| "hot".into()),
    });
    if let Some(map) = out.as_object_mut() {
        map.retain(|_, v| !v.is_null());
    }
    Ok(out)
}

/// Identity of a record's key: `(kind, system_id, id)`.
pub(crate) fn key_hash(record: &Record) -> u64 {
    key_hash_of(record.kind, &record.system_id, &record.id)
}

/// [`key_hash`] from the key's parts.
pub(crate) fn key_hash_of(kind: RecordKind, system_id: &str, id: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (kind as u8, system_id, id).hash(&mut h);
    h.finish()
}

/// Identity of a record's content (everything but the key), to recognise an exact re-delivery.
fn content_hash(r: &Record) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (r.ts, &r.project, &r.namespace, &r.category, &r.text, &r.name, &r.tags, &r.metadata).hash(&mut h);
    (&r.from, &r.to, &r.relation_type, r.residency.map(|x| x.as_str())).hash(&mut h);
    for v in [r.importance, r.weight, r.value] {
        v.map(f64::to_bits).hash(&mut h);
    }
    if let Some(e) = &r.embedding {
        e.iter().for_each(|v| v.to_bits().hash(&mut h));
    }
    h.finish()
}

fn to_arrow(records: &[&Record], ingested_at: i64) -> Result<RecordBatch, HotError> {
    let strings = |f: &dyn Fn(&Record) -> Option<&str>| -> ArrayRef {
        Arc::new(records.iter().map(|r| f(r)).collect::<StringArray>())
    };
    let floats = |f: &dyn Fn(&Record) -> Option<f64>| -> ArrayRef {
        Arc::new(records.iter().map(|r| f(r)).collect::<Float64Array>())
    };
    let mut values = Vec::with_capacity(records.len() * EMBEDDING_DIM);
    let mut valid = Vec::with_capacity(records.len());
    for r in records {
        match &r.embedding {
            Some(e) if e.len() == EMBEDDING_DIM => {
                values.extend_from_slice(e);
                valid.push(true);
            }
            _ => {
                values.extend(std::iter::repeat_n(0.0f32, EMBEDDING_DIM));
                valid.push(false);
            }
        }
    }
    let item = Arc::new(Field::new("item", DataType::Float32, true));
    let embedding = FixedSizeListArray::try_new(
        item.clone(),
        EMBEDDING_DIM as i32,
        Arc::new(Float32Array::from(values)),
        Some(NullBuffer::from(valid)),
    )?;
    let mut tags = ListBuilder::new(StringBuilder::new());
    for r in records {
        for tag in &r.tags {
            tags.values().append_value(tag);
        }
        tags.append(true);
    }
    let tags = tags.finish();
    let columns: Vec<ArrayRef> = vec![
        strings(&|r| Some(r.system_id.as_str())),
        strings(&|r| Some(r.id.as_str())),
        Arc::new(TimestampMicrosecondArray::from(records.iter().map(|r| r.ts).collect::<Vec<i64>>())),
        strings(&|r| r.project.as_deref()),
        strings(&|r| r.namespace.as_deref()),
        strings(&|r| r.category.as_deref()),
        strings(&|r| r.text.as_deref()),
        strings(&|r| r.name.as_deref()),
        Arc::new(embedding),
        Arc::new(tags),
        strings(&|r| r.metadata.as_deref()),
        floats(&|r| r.importance),
        strings(&|r| r.residency.map(|x| x.as_str())),
        strings(&|r| r.from.as_deref()),
        strings(&|r| r.to.as_deref()),
        strings(&|r| r.relation_type.as_deref()),
        floats(&|r| r.weight),
        floats(&|r| r.value),
        Arc::new(TimestampMicrosecondArray::from(vec![ingested_at; records.len()])),
    ];
    let schema = Schema::new(
        columns
            .iter()
            .zip(COLUMNS.iter().map(|(n, _)| *n).chain(["ingested_at"]))
            .map(|(array, name)| Field::new(name, array.data_type().clone(), true))
            .collect::<Vec<_>>(),
    );
    debug_assert_eq!(schema.fields()[2].data_type(), &DataType::Timestamp(TimeUnit::Microsecond, None));
    Ok(RecordBatch::try_new(Arc::new(schema), columns)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, ts: i64, text: &str) -> Record {
        Record {
            system_id: "host-1".into(),
            id: id.into(),
            ts,
            text: Some(text.into()),
            embedding: Some((0..EMBEDDING_DIM).map(|i| i as f32 / 7.0).collect()),
            tags: vec!["a".into(), "b".into()],
            metadata: Some(r#"{"k":1}"#.into()),
            ..Record::default()
        }
    }

    #[test]
    fn records_become_searchable_with_or_without_their_contents_queued() {
        use crate::search::Filters;
        for backlog in [MAX_INDEX_BACKLOG, 0] {
            let hot = HotTier::open("1GB", 1, None).unwrap();
            // 0: every job travels as keys and the indexer reads the rows back from the table.
            hot.index_backlog.store(backlog, Ordering::Relaxed);
            let mut other = rec("b", 10, "completely different words");
            other.embedding = Some((0..EMBEDDING_DIM).map(|i| if i == 0 { 1.0 } else { 0.0 }).collect());
            hot.insert(&[rec("a", 10, "the walrus sleeps"), other]).unwrap();
            hot.insert(&[rec("a", 20, "the walrus wakes")]).unwrap();
            assert!(hot.wait_indexed(std::time::Duration::from_secs(30)));
            let text = hot.indexes().text_search("walrus", 5, &Filters::default(), &[]).unwrap();
            assert_eq!(text.len(), 1, "backlog {backlog}");
            assert_eq!(&*text[0].0.id, "a");
            assert!(text[0].2.html.contains("wakes"), "latest version: {:?}", text[0].2);
            let query: Vec<f32> = (0..EMBEDDING_DIM).map(|i| i as f32 / 7.0).collect();
            let near = hot.indexes().vector_search(&query, 1, &Filters::default()).unwrap();
            assert_eq!(&*near[0].0.id, "a");
            assert!(near[0].1 > 0.999);
            assert_eq!(hot.indexes().sizes(), (2, 2));
            assert_eq!(hot.index_failures(), 0);
        }
    }

    #[test]
    fn a_burst_is_searchable_before_the_index_catches_up() {
        use crate::query::QueryService;
        use crate::search::Filters;
        let hot = Arc::new(HotTier::open("1GB", 1, None).unwrap());
        // 20,000 vectors take the one indexer thread seconds; the last one is searched for at once.
        let vector = |i: usize| -> Vec<f32> {
            let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            (0..EMBEDDING_DIM)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % 1000) as f32 / 1000.0 - 0.5
                })
                .collect()
        };
        let records: Vec<Record> = (0..20_000)
            .map(|i| {
                let mut r = rec(&format!("r{i}"), 10, "burst");
                r.embedding = Some(vector(i));
                r
            })
            .collect();
        hot.insert(&records).unwrap();
        let service = QueryService::new(hot.clone(), None);
        let waiting = hot.index_pending();
        let hits = service.vector(&vector(19_999), 3, &Filters::default()).unwrap();
        assert_eq!(hits[0].record["id"], "r19999", "found while {waiting} records wait for the index");
        assert!(hits[0].similarity.unwrap() > 0.9999);
        // A filter applies to the waiting records too.
        let only_other = Filters { system_ids: vec!["elsewhere".into()], ..Filters::default() };
        assert!(service.vector(&vector(19_999), 3, &only_other).unwrap().is_empty());
        assert!(hot.wait_indexed(std::time::Duration::from_secs(120)));
        assert!(hot.tail().is_empty(), "indexed versions leave the tail");
        let hits = service.vector(&vector(19_999), 1, &Filters::default()).unwrap();
        assert_eq!(hits[0].record["id"], "r19999");
    }

    #[test]
    fn upsert_is_idempotent_and_last_writer_by_ts_wins() {
        let hot = HotTier::open("1GB", 1, None).unwrap();
        hot.insert(&[rec("a", 10, "first"), rec("b", 10, "b")]).unwrap();
        hot.insert(&[rec("a", 10, "first"), rec("b", 10, "b")]).unwrap();
        hot.insert(&[rec("a", 5, "older loses")]).unwrap();
        hot.insert(&[rec("a", 20, "newer"), rec("a", 30, "newest in same batch"), rec("a", 25, "middle")]).unwrap();
        let counts = hot.counts().unwrap();
        assert_eq!(counts, vec![KindCount { system_id: "host-1".into(), kind: "conversation", records: 2 }]);
        let a = hot.get("host-1", RecordKind::Conversation, "a").unwrap().unwrap();
        assert_eq!(a["text"], "newest in same batch");
        assert_eq!(a["ts"], 30);
        assert_eq!(a["tags"], serde_json::json!(["a", "b"]));
        assert_eq!(a["metadata"]["k"], 1);
        let e = a["embedding"].as_array().unwrap();
        assert_eq!(e.len(), EMBEDDING_DIM);
        assert_eq!(e[3].as_f64().unwrap() as f32, 3.0f32 / 7.0);
        assert!(hot.get("host-1", RecordKind::Entity, "a").unwrap().is_none());
        // Many at once: stored keys come back whole, missing ones are absent; quotes in ids are just data.
        hot.insert(&[rec("it's", 1, "quoted")]).unwrap();
        let many = hot
            .get_many(
                RecordKind::Conversation,
                &[("host-1", "a"), ("host-1", "it's"), ("host-1", "nope"), ("h2", "b")],
                true,
            )
            .unwrap();
        assert_eq!(many.len(), 2);
        assert_eq!(many[&("host-1".to_owned(), "a".to_owned())], a);
        assert_eq!(many[&("host-1".to_owned(), "it's".to_owned())]["text"], "quoted");
        let lean = hot.get_many(RecordKind::Conversation, &[("host-1", "a")], false).unwrap();
        let lean = &lean[&("host-1".to_owned(), "a".to_owned())];
        assert!(lean.get("embedding").is_none() && lean["text"] == "newest in same batch", "{lean}");

        // More keys than one lookup list holds, the same id under two systems, and ids that are not stored.
        let records: Vec<Record> = (0..600i64).map(|i| rec(&format!("k{i}"), 100 + i, "bulk")).collect();
        hot.insert(&records).unwrap();
        let mut other = rec("k7", 5, "other system");
        other.system_id = "host-2".into();
        hot.insert(&[other]).unwrap();
        let ids: Vec<String> = (0..650).map(|i| format!("k{i}")).collect();
        let keys: Vec<(&str, &str)> = ids.iter().map(|id| ("host-1", id.as_str())).collect();
        let many = hot.get_many(RecordKind::Conversation, &keys, false).unwrap();
        assert_eq!(many.len(), 600);
        assert_eq!(many[&("host-1".to_owned(), "k599".to_owned())]["ts"], 699);
        let both = hot.get_many(RecordKind::Conversation, &[("host-1", "k7"), ("host-2", "k7")], false).unwrap();
        assert_eq!(both[&("host-2".to_owned(), "k7".to_owned())]["text"], "other system");
        assert_eq!(both[&("host-1".to_owned(), "k7".to_owned())]["text"], "bulk");
    }
}

#[cfg(test)]
mod scale {
    use super::*;

    /// Not a timing assertion: prints how long small upserts take on a large table, to compare strategies.
    #[test]
    fn small_upserts_on_a_large_table() {
        let hot = HotTier::open("4GB", 2, None).unwrap();
        let mk = |i: usize| Record {
            system_id: "h".into(),
            id: format!("r{i}"),
            ts: i as i64,
            text: Some("x".repeat(200)),
            // Distinct vectors: identical ones are HNSW's worst case and nothing like real embeddings.
            embedding: Some(
                (0..EMBEDDING_DIM)
                    .map(|d| {
                        let x = ((i * EMBEDDING_DIM + d) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                        (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                    })
                    .collect(),
            ),
            ..Record::default()
        };
        for start in (0..100_000).step_by(50_000) {
            let batch: Vec<Record> = (start..start + 50_000).map(mk).collect();
            hot.insert(&batch).unwrap();
        }
        let mut times = Vec::new();
        for k in 0..100 {
            let batch: Vec<Record> = (0..100).map(|i| mk(1_000_000 + k * 100 + i)).collect();
            let t = std::time::Instant::now();
            hot.insert(&batch).unwrap();
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let slow: Vec<(usize, u64)> =
            times.iter().enumerate().filter(|(_, t)| **t > 50.0).map(|(i, t)| (i, *t as u64)).collect();
        times.sort_by(f64::total_cmp);
        eprintln!(
            "100 upserts of 100 records on 100k rows: p50 {:.1} ms, max {:.1} ms, slow {slow:?}",
            times[50], times[99]
        );
        assert_eq!(hot.counts().unwrap()[0].records, 110_000);
    }
}
