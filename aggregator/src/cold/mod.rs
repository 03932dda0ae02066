//! Cold tier: Parquet objects on object storage (S3 and compatible stores, Azure Blob, GCS, a local directory),
//! registered in a catalog inside the warm DuckDB file.
//!
//! ```text
//!  <prefix>/kind=<kind>/system=<system>/date=YYYY-MM-DD/part-<uuid>.parquet
//!  warm.cold_objects (key, kind, system_id, day, min_ts, max_ts, rows, bytes, sha256, created_at, kek_id, wrapped_dek)
//!  warm.cold_moves   (id, kind, system_id, day, object_key, state, records, started_at, finished_at, detail)
//! ```
//!
//! ## A move (warm → cold), one object per kind, system and day, in batches of up to 64 objects
//! 1. **export**: one sorted query streams the batch's warm rows older than the cutoff out of DuckDB as Arrow;
//!    writer threads turn each group into a Parquet file ([`write`]: zstd, statistics, row groups of
//!    `row_group_rows`; a group above `OBJECT_MAX_ROWS` rows into several) and read every file back, comparing
//!    it column by column with the rows it was written from. The exported versions' keys go to a scratch table.
//! 2. **upload** (journal `uploading`): a single PUT, or a multipart upload for large files, several objects at
//!    once; the store's client retries 5xx, SlowDown and timeouts with backoff and jitter.
//! 3. **verify**: the store holds exactly the local bytes — it refused any body that mismatched the SHA-256 the
//!    PUT declared (S3 and compatibles that a probe at the first upload showed to check it), or it returned the
//!    object's MD5 as the ETag, or the object is read back and compared.
//! 4. **register** (`done`), in one warm transaction for the batch: the catalog rows are inserted and exactly
//!    the exported versions (same key, timestamp and `ingested_at`) are deleted from warm — a newer version that
//!    reached warm meanwhile stays. Then the keys leave the warm indexes and the warm tier persists them.
//!
//! Batches are pipelined: while one is uploaded and registered, the next one is exported on a second
//! connection.
//!
//! Readers see an object only once it is in the catalog, so a half-written or unverified object is invisible.
//! After `kill -9` before step 4 the journal row is left unfinished: at start it is marked `interrupted`, its
//! object (if any) is deleted, and warm still has every row. After step 4 the rows are cold and the catalog says
//! so. Objects that nothing in the catalog names (a failed delete, a crash between upload and journal) are swept
//! by compaction, which is also when several objects of one kind, system and day are merged into one, newest
//! version per key.
//!
//! Embeddings are written as `embedding_encoding` says ([`EmbeddingEncoding`]): f32, or int8 with a scale per
//! vector (key `…-i8.parquet`) and a fingerprint of the floats it was written from (`embedding_hash`). Readers
//! dequantize per row only when a lease holds int8 objects. The 1-hour metric rollups of a day are recomputed in step 4 (see [`crate::rollup`]).
//!
//! With `encryption` configured every object is sealed under its own data key before upload (see
//! [`crate::envelope`]); `sha256` and `bytes` describe the sealed bytes, the catalog holds the wrapped key, and the
//! cache holds the opened Parquet file.
//!
//! Failures of the store open a circuit breaker after `breaker_failures` consecutive errors: moves and cold reads
//! fail fast for `breaker_cooldown`, then one attempt is let through. Warm keeps its rows until a cold copy is
//! verified, and hot and warm queries never wait for the store.

pub mod access;
pub mod cache;
pub mod scan;
mod vector_chunk;
mod write;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use akosha_protocol::RecordKind;
use duckdb::Connection;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use self::cache::{Lease, ObjectCache, Wanted, hex};
use crate::objects::Location;

/// Above this size an object is uploaded in parts.
const MULTIPART_THRESHOLD: u64 = 16 << 20;
/// Size of one part.
const PART_BYTES: usize = 8 << 20;
/// (system, day) groups moved per batch at most: one export, one parallel upload round and one warm commit each.
/// Batches go through a pipeline, so smaller ones fill it sooner; each costs a commit of warm and of its indexes.
const GROUPS_PER_BATCH: usize = 32;
/// How long deleting the objects of a failed or interrupted move may take before the sweep is left to do it.
const CLEANUP_BUDGET: Duration = Duration::from_secs(5);
/// Rows per batch (a group is never split): a batch's objects stay in memory until they are registered (≈ 1.4 KB
/// per row with vectors; two batches are in flight), and on the local disk until then.
const ROWS_PER_BATCH: u64 = 100_000;
/// Rows per object at most: a writer holds an object's rows in memory until it is written and verified, twice
/// during the comparison (with vectors ≈ 1.6 KB per row, so ≈ 350 MB per writer).
const OBJECT_MAX_ROWS: usize = 100_000;
/// A move connection's scratch table of the versions a batch is moving (key, `ts` and `ingested_at`).
const MOVING: &str = "cold_moving";

/// Warm rows of one kind, system and day that are due for cold.
#[derive(Clone)]
struct Group {
    system_id: String,
    day: String,
    rows: u64,
}

/// A batch of groups of one kind that a move will take.
struct Planned {
    kind: RecordKind,
    cutoff_us: i64,
    groups: Vec<Group>,
}

/// A batch whose objects are written (step 1), waiting for upload and registration. Its local directory, if
/// the batch needed local files, goes with it (files the cache adopted have moved out of it by then).
struct Staged {
    /// The journal's id of the batch.
    id: i64,
    kind: RecordKind,
    groups: Vec<Group>,
    dir: Option<PathBuf>,
    objects: Vec<Export>,
    /// Milliseconds of the phases done so far (export, journal, upload), for the debug log.
    timings: Vec<u64>,
}

impl Staged {
    /// Objects, rows and bytes.
    fn moved(&self) -> (u64, u64, u64) {
        (
            self.objects.len() as u64,
            self.objects.iter().map(|o| o.rows).sum(),
            self.objects.iter().map(|o| o.stored.bytes).sum(),
        )
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// One object of a move batch.
struct Export {
    key: String,
    /// The object's local copy, when the batch keeps one (metric rollups read it; `cache_on_write` adopts it).
    file: Option<PathBuf>,
    system_id: String,
    day: String,
    rows: u64,
    stored: Stored,
    min_ts: i64,
    max_ts: i64,
}

/// Rows on their way to one object (see [`ColdTier::write_groups`]).
struct Pending {
    idx: usize,
    part: usize,
    rows: usize,
    batches: Vec<arrow::array::RecordBatch>,
}

impl Pending {
    fn new(idx: usize, part: usize) -> Pending {
        Pending { idx, part, rows: 0, batches: Vec::new() }
    }
}

/// An object written for one group (see [`ColdTier::write_groups`]).
struct GroupFile {
    /// The group's index.
    idx: usize,
    /// Which of the group's objects (a group above `OBJECT_MAX_ROWS` rows gets several).
    part: usize,
    /// Where it was written locally, if the caller asked for files.
    path: Option<PathBuf>,
    written: write::Written,
}

/// What goes to the store for a local Parquet file: its bytes, or a sealed copy of them.
struct Stored {
    data: bytes::Bytes,
    sha256: String,
    bytes: u64,
    sealed: Option<crate::envelope::WrappedKey>,
}

impl Stored {
    /// The catalog's `kek_id, wrapped_dek` values.
    fn key_columns(&self) -> String {
        match &self.sealed {
            Some(w) => format!("{}, {}", sql_text(&w.kek_id), sql_text(&w.wrapped)),
            None => "NULL, NULL".into(),
        }
    }
}

/// Cold tier settings.
#[derive(Debug, Clone)]
pub struct ColdConfig {
    /// Keep a cold tier at all.
    pub enabled: bool,
    /// Where the objects go (`s3://bucket/prefix`, `gs://…`, `az://…`, `file:///dir` or a directory).
    pub url: String,
    /// Backend options (`endpoint`, `region`, `access_key_id`, …); the environment supplies the rest.
    pub options: Vec<(String, String)>,
    /// Records older than this move from warm to cold.
    pub warm_window: Duration,
    /// Kinds that leave warm after another window than `warm_window`.
    pub warm_window_per_kind: std::collections::BTreeMap<RecordKind, Duration>,
    /// Scheduled moves and compaction run only inside this daily window.
    pub schedule: Option<crate::lifecycle::Schedule>,
    /// How often moves and compaction run.
    pub move_interval: Duration,
    /// The local cache of objects.
    pub cache_dir: PathBuf,
    /// Most bytes the cache holds (one query may not need more).
    pub cache_max_bytes: u64,
    /// Rows per Parquet row group.
    pub row_group_rows: usize,
    /// How objects written from now on store embeddings.
    pub embedding_encoding: EmbeddingEncoding,
    /// Objects fetched at once.
    pub parallel_fetches: usize,
    /// Consecutive store failures that open the circuit breaker.
    pub breaker_failures: u32,
    /// How long the open breaker refuses store operations.
    pub breaker_cooldown: Duration,
    /// Store requests are retried (with backoff and jitter) for at most this long.
    pub retry_timeout: Duration,
    /// Access-based promotion back to warm.
    pub promotion: PromotionConfig,
    /// Seal objects with envelope encryption (see [`crate::envelope`]); `None` stores plain Parquet.
    pub encryption: Option<Arc<crate::envelope::Keyring>>,
    /// Objects a move writes also go into the local cache. Off by default: what leaves warm is old and seldom
    /// read, and caching it on the way out would evict what queries are actually reading (ClickHouse's
    /// `cache_on_write_operations` makes the same call).
    pub cache_on_write: bool,
}

/// When cold data that is read again goes back to warm (see [`access`]).
#[derive(Debug, Clone)]
pub struct PromotionConfig {
    /// Promote at all.
    pub enabled: bool,
    /// Reads (decayed) that make a (kind, system, day) group worth promoting.
    pub reads: f64,
    /// Half-life of the read counts: about `reads` reads within this long promote.
    pub window: Duration,
    /// Least time between two moves of the same group, either way (no ping-pong).
    pub min_age: Duration,
    /// Most groups promoted per round (a rate limit on moves).
    pub max_groups_per_run: usize,
}

/// How cold objects store embeddings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddingEncoding {
    /// 32-bit floats as ingested (lossless), byte-stream-split and zstd.
    #[default]
    F32,
    /// One signed byte per dimension and one scale per vector (`x ≈ q · scale / 127`): about a quarter of the
    /// bytes; similarities shift slightly (recall measured in BENCHMARKS.md).
    Int8,
}

impl std::str::FromStr for EmbeddingEncoding {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(EmbeddingEncoding::F32),
            "int8" => Ok(EmbeddingEncoding::Int8),
            other => Err(format!("must be `f32` or `int8`, not `{other}`")),
        }
    }
}

/// Floats back from `(q, scale)` expressions.
fn dequantized(q: &str, scale: &str) -> String {
    format!(
        "list_transform({q}, lambda x: CAST(x AS FLOAT) * {scale} / CAST(127 AS FLOAT))::FLOAT[{}]",
        akosha_protocol::EMBEDDING_DIM
    )
}

impl EmbeddingEncoding {
    /// The stored columns of rows aliased `row`, in file order: the table's columns with the embedding as four
    /// (`embedding`, `embedding_i8`, `embedding_scale`, `embedding_hash`; the unused ones NULL), then
    /// `ingested_at`. `embedding_hash` (int8) fingerprints the floats the object was written from, so that a
    /// move can check the object against warm.
    ///
    /// The unused vector column is a NULL *list*, not a NULL fixed-size array: in Parquet both are the same
    /// LIST column, but DuckDB keeps the 384 child slots of a NULL array and its writer visits every one —
    /// that NULL column cost as much as the real vectors, half of a warm→cold export (BENCHMARKS.md).
    fn stored_columns(self, row: &str) -> String {
        crate::hot::column_names()
            .iter()
            .map(|c| match (*c, self) {
                ("embedding", EmbeddingEncoding::F32) => format!(
                    "{row}.embedding, NULL::TINYINT[] AS embedding_i8, NULL::FLOAT AS embedding_scale, \
                     NULL::UBIGINT AS embedding_hash"
                ),
                // The floats go out in `embedding_i8` and are quantized on the way to the file
                // (`write::quantize`).
                ("embedding", EmbeddingEncoding::Int8) => format!(
                    "NULL::FLOAT[] AS embedding, {row}.embedding AS embedding_i8, NULL::FLOAT AS embedding_scale, \
                     hash({row}.embedding) AS embedding_hash"
                ),
                (c, _) => format!("{row}.{c}"),
            })
            .chain(std::iter::once(format!("{row}.ingested_at")))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl ColdConfig {
    /// The warm window of every kind.
    pub fn warm_windows(&self) -> crate::lifecycle::Windows {
        crate::lifecycle::Windows { default: self.warm_window, per_kind: self.warm_window_per_kind.clone() }
    }
}

impl PromotionConfig {
    /// The decayed score that promotes: `reads` reads close together score just under `reads` (each has decayed
    /// a little), `reads - 1` reads can never reach it.
    pub fn threshold(&self) -> f64 {
        self.reads - 0.5
    }
}

impl Default for PromotionConfig {
    fn default() -> PromotionConfig {
        PromotionConfig {
            enabled: true,
            reads: 3.0,
            window: Duration::from_secs(7 * 86_400),
            min_age: Duration::from_secs(86_400),
            max_groups_per_run: 16,
        }
    }
}

/// What a promotion round did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PromotionReport {
    /// Groups moved back to warm.
    pub groups: u64,
    /// Rows moved back.
    pub records: u64,
    /// Cold objects retired.
    pub objects: u64,
    /// Groups read often enough whose cold copy is younger than `min_age`.
    pub too_young: u64,
    /// Groups read often enough left for the next round (rate limit).
    pub deferred: u64,
    /// Wall time.
    pub took_ms: u64,
}

/// Cold tier failures.
#[derive(Debug, thiserror::Error)]
pub enum ColdError {
    /// The catalog or an export failed in DuckDB.
    #[error("cold tier (DuckDB): {0}")]
    Db(#[from] duckdb::Error),
    /// The object store failed.
    #[error("cold tier object store: {0}")]
    Store(String),
    /// The store failed repeatedly; calls are refused for a while.
    #[error(
        "cold tier object store is unavailable (circuit open for {remaining_s}s more after {failures} failures): {last}"
    )]
    CircuitOpen {
        /// Seconds until the next attempt is let through.
        remaining_s: u64,
        /// Consecutive failures.
        failures: u32,
        /// The last failure.
        last: String,
    },
    /// Writing or reading back a Parquet object failed.
    #[error("cold tier Parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    /// Arrow data from the warm tier could not be handled.
    #[error("cold tier Arrow data: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// An object does not match what was written.
    #[error("cold tier verification failed: {0}")]
    Corrupt(String),
    /// A local file failed.
    #[error("{0}")]
    Io(String),
    /// The objects one query needs do not fit in the cache.
    #[error(
        "the cold objects this query needs ({needed} bytes) exceed the cache budget ({budget} bytes); narrow it by system or time"
    )]
    TooLarge {
        /// Bytes needed.
        needed: u64,
        /// `cold.cache_max_bytes`.
        budget: u64,
    },
    /// The warm tier refused a step.
    #[error(transparent)]
    Warm(#[from] crate::hot::HotError),
    /// Sealing or opening an encrypted object failed (a missing or wrong key, or altered bytes).
    #[error("cold object {key}: {error}")]
    Sealed {
        /// The object.
        key: String,
        /// What went wrong.
        error: crate::envelope::EnvelopeError,
    },
}

/// One completed move or compaction.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ColdMoveReport {
    /// Rows older than this moved (microseconds since the epoch).
    pub cutoff_us: i64,
    /// Objects written.
    pub objects: u64,
    /// Rows moved.
    pub records: u64,
    /// Bytes uploaded.
    pub bytes: u64,
    /// Wall time.
    pub took_ms: u64,
}

/// What compaction did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompactionReport {
    /// Groups (kind, system, day) merged.
    pub groups: u64,
    /// Objects replaced by the merged ones.
    pub objects_replaced: u64,
    /// Objects deleted because the catalog did not name them.
    pub orphans_deleted: u64,
    /// Groups rewritten to drop rows that deletions hid.
    pub erased_groups: u64,
    /// Tombstones retired once no object holds their rows.
    pub tombstones_retired: u64,
}

/// One catalogued object.
#[derive(Debug, Clone, Serialize)]
pub struct ColdObject {
    /// Key inside the location.
    pub key: String,
    /// Record kind.
    pub kind: String,
    /// System id.
    pub system_id: String,
    /// Day (UTC).
    pub day: String,
    /// Oldest and newest `ts` (microseconds since the epoch).
    pub min_ts: i64,
    /// Newest `ts`.
    pub max_ts: i64,
    /// Rows.
    pub rows: u64,
    /// Size.
    pub bytes: u64,
    /// sha256 of the object, hex.
    pub sha256: String,
    /// Its data key, wrapped, when the object is sealed.
    pub sealed: Option<crate::envelope::WrappedKey>,
}

impl ColdObject {
    /// Whether the object stores int8 embeddings (its key says so: `…-i8.parquet`).
    pub fn int8(&self) -> bool {
        self.key.ends_with(INT8_SUFFIX)
    }
}

/// The end of the key of an object with int8 embeddings.
const INT8_SUFFIX: &str = "-i8.parquet";

impl EmbeddingEncoding {
    /// The end of an object key in this encoding.
    fn key_suffix(self) -> &'static str {
        match self {
            EmbeddingEncoding::F32 => ".parquet",
            EmbeddingEncoding::Int8 => INT8_SUFFIX,
        }
    }
}

struct Breaker {
    failures: AtomicU32,
    opened_at: Mutex<Option<Instant>>,
    last_error: Mutex<String>,
}

/// The cold tier.
pub struct ColdTier {
    /// Settings.
    pub config: ColdConfig,
    location: Location,
    runtime: Option<tokio::runtime::Runtime>,
    /// Moves and compaction, one at a time.
    mover: Mutex<Connection>,
    /// Catalog lookups for queries.
    reader: Mutex<Connection>,
    cache: Arc<ObjectCache>,
    breaker: Breaker,
    /// Moves completed since start.
    pub moves_done: AtomicU64,
    /// Moves that failed since start.
    pub moves_failed: AtomicU64,
    /// Rows moved to cold since start.
    pub records_moved: AtomicU64,
    /// Uploads the store verified against the sha256 they declared since start.
    pub uploads_verified_by_checksum: AtomicU64,
    /// Uploads the store verified (its ETag was the object's MD5) since start.
    pub uploads_verified_by_etag: AtomicU64,
    /// Uploads verified by reading the object back since start.
    pub uploads_read_back: AtomicU64,
    /// Journal rows found unfinished at start.
    pub interrupted: u64,
    last_move: Mutex<Option<ColdMoveReport>>,
    last_error: Mutex<Option<String>>,
    /// Fault injection for crash tests: pause this long after each upload.
    pause_after_upload: Option<Duration>,
    /// Whether the store refuses a PUT whose body does not match its declared sha256, once a probe has told.
    verifies_checksums: tokio::sync::OnceCell<bool>,
    /// Tests: SQL run once on the register connection right before the next batch registers.
    #[cfg(test)]
    before_register: Mutex<Option<String>>,
    /// `OBJECT_MAX_ROWS`, lowered by tests.
    object_max_rows: std::sync::atomic::AtomicUsize,
    /// The last journal id a move batch took.
    last_move_id: std::sync::atomic::AtomicI64,
    /// Running backups: objects a snapshot's catalog may name are not deleted meanwhile.
    pins: Arc<AtomicU64>,
    /// Reads of old data, for promotion.
    access: access::AccessTracker,
    /// Promotions completed since start.
    pub promotions_done: AtomicU64,
    /// Promotions that failed since start.
    pub promotions_failed: AtomicU64,
    /// Rows promoted back to warm since start.
    pub records_promoted: AtomicU64,
    /// Fault injection for crash tests: pause this long after a promotion commits, before its objects go.
    pause_after_promote: Option<Duration>,
}

/// While alive, catalogued objects that compaction replaces or deletions drop stay in the store (as orphans,
/// which the first sweep after the last pin is gone deletes): a backup copies the objects its snapshot names.
pub struct ColdPin(Arc<AtomicU64>);

impl Drop for ColdPin {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for ColdTier {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which is not allowed inside another runtime's async context.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The stored columns, read back from Parquet with the warm tables' exact types.
///
/// With `int8`, some of the files store int8 embeddings and each row's are read in its own encoding (the
/// per-row choice costs a third more on a vector scan, so f32-only files skip it).
pub(crate) fn typed_columns(int8: bool) -> String {
    crate::hot::column_names()
        .iter()
        .map(|c| {
            if *c == "embedding" && !int8 {
                format!("embedding::FLOAT[{}] AS embedding", akosha_protocol::EMBEDDING_DIM)
            } else if *c == "embedding" {
                // Either encoding (see `EmbeddingEncoding`), per row.
                format!(
                    "CASE WHEN embedding_i8 IS NULL THEN embedding::FLOAT[{}] ELSE {} END AS embedding",
                    akosha_protocol::EMBEDDING_DIM,
                    dequantized("embedding_i8", "embedding_scale")
                )
            } else {
                (*c).to_owned()
            }
        })
        .chain(std::iter::once("ingested_at".to_owned()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The content hash of a row (every stored column but `ingested_at`).
fn row_hash(alias: &str) -> String {
    let columns: Vec<String> = crate::hot::column_names().iter().map(|c| format!("{alias}.{c}")).collect();
    format!("hash({})", columns.join(", "))
}

/// `read_parquet([...])` over local files, typed like the warm tables.
pub(crate) fn parquet_source(paths: &[PathBuf], int8: bool) -> String {
    let list: Vec<String> = paths.iter().map(|p| sql_text(&p.display().to_string())).collect();
    format!("(SELECT {} FROM read_parquet([{}]))", typed_columns(int8), list.join(", "))
}

/// [`parquet_source`] without the rows a deletion's tombstone hides (rows of `kind` it covers that were ingested
/// before it; see [`crate::erasure`]).
pub(crate) fn visible_source(kind: &str, paths: &[PathBuf], int8: bool) -> String {
    format!(
        "(SELECT * FROM {} p WHERE NOT EXISTS (SELECT 1 FROM warm.cold_tombstones t WHERE t.kind = {} \
         AND (t.system_id IS NULL OR t.system_id = p.system_id) AND (t.project IS NULL OR t.project = p.project) \
         AND (t.id IS NULL OR t.id = p.id) AND p.ingested_at <= t.created_at))",
        parquet_source(paths, int8),
        sql_text(kind)
    )
}

/// [`visible_source`] with one row per key, its newest version: what the cold tier holds for `paths`.
pub(crate) fn newest_visible(kind: &str, paths: &[PathBuf], int8: bool) -> String {
    format!(
        "(SELECT * FROM {} QUALIFY row_number() OVER (PARTITION BY system_id, id ORDER BY ts DESC) = 1)",
        visible_source(kind, paths, int8)
    )
}

/// A SQL string literal.
pub(crate) fn sql_text(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A path segment that cannot break the Hive layout (`/`, `=`, `%` and control characters escaped).
fn key_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Splits groups into batches of at most `GROUPS_PER_BATCH` groups (as many in each as the count allows, so that
/// the pipeline's stages take about as long for each) and about `ROWS_PER_BATCH` rows.
fn batches(groups: &[Group]) -> Vec<&[Group]> {
    let per_batch = groups.len().div_ceil(groups.len().div_ceil(GROUPS_PER_BATCH).max(1)).max(1);
    let mut out = Vec::new();
    let (mut start, mut rows) = (0, 0);
    for (i, group) in groups.iter().enumerate() {
        if i > start && (i - start == per_batch || rows + group.rows > ROWS_PER_BATCH) {
            out.push(&groups[start..i]);
            (start, rows) = (i, 0);
        }
        rows += group.rows;
    }
    if start < groups.len() {
        out.push(&groups[start..]);
    }
    out
}

/// A closure that returns the milliseconds since it was made or last called (a move's phases, for the debug log).
fn lap_timer() -> impl FnMut() -> u64 {
    let mut phase = Instant::now();
    move || {
        let ms = phase.elapsed().as_millis() as u64;
        phase = Instant::now();
        ms
    }
}

fn new_uuid() -> String {
    let b: [u8; 16] = rand::random();
    let h = hex(&b);
    format!("{}-{}-4{}-{}-{}", &h[0..8], &h[8..12], &h[13..16], &h[16..20], &h[20..32])
}

impl ColdTier {
    /// Opens the store and the cache, creates the catalog in warm (`conn` is a connection of the hot database with
    /// warm attached) and cleans up after moves a crash interrupted.
    pub fn open(conn: &Connection, config: ColdConfig) -> Result<ColdTier, ColdError> {
        let retry = object_store::RetryConfig {
            backoff: object_store::BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
            max_retries: 6,
            retry_timeout: config.retry_timeout,
        };
        if let Some(dir) = crate::objects::local_dir(&config.url) {
            std::fs::create_dir_all(&dir)
                .map_err(|e| ColdError::Io(format!("cannot create {}: {e}", dir.display())))?;
        }
        let location = crate::objects::open_with_retry(&config.url, &config.options, Some(retry))
            .map_err(|e| ColdError::Store(e.to_string()))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cold-io")
            .enable_all()
            .build()
            .map_err(|e| ColdError::Io(format!("cannot start the cold tier's I/O threads: {e}")))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS warm.cold_objects (key VARCHAR NOT NULL, kind VARCHAR NOT NULL, \
               system_id VARCHAR NOT NULL, day DATE NOT NULL, min_ts TIMESTAMP NOT NULL, max_ts TIMESTAMP NOT NULL, \
               rows BIGINT NOT NULL, bytes BIGINT NOT NULL, sha256 VARCHAR NOT NULL, created_at TIMESTAMP NOT NULL, \
               kek_id VARCHAR, wrapped_dek VARCHAR);\n\
             ALTER TABLE warm.cold_objects ADD COLUMN IF NOT EXISTS kek_id VARCHAR;\n\
             ALTER TABLE warm.cold_objects ADD COLUMN IF NOT EXISTS wrapped_dek VARCHAR;\n\
             CREATE TABLE IF NOT EXISTS warm.cold_moves (id BIGINT, kind VARCHAR, system_id VARCHAR, day DATE, \
               object_key VARCHAR, state VARCHAR, records BIGINT, started_at TIMESTAMP, finished_at TIMESTAMP, \
               detail VARCHAR);\n\
             CREATE TABLE IF NOT EXISTS warm.cold_tombstones (request BIGINT NOT NULL, kind VARCHAR NOT NULL, \
               system_id VARCHAR, project VARCHAR, id VARCHAR, created_at TIMESTAMP NOT NULL);\n\
             CREATE TABLE IF NOT EXISTS warm.tier_holds (kind VARCHAR NOT NULL, system_id VARCHAR NOT NULL, \
               day DATE NOT NULL, until TIMESTAMP NOT NULL);",
        )?;
        let access = access::AccessTracker::new(config.promotion.window);
        access.load(conn)?;
        let mover = conn.try_clone()?;
        let reader = conn.try_clone()?;
        let cache = Arc::new(ObjectCache::open(&config.cache_dir, config.cache_max_bytes, config.encryption.clone())?);
        let pause_after_upload = std::env::var("AKOSHA_FAULT_COLD_PAUSE_AFTER_UPLOAD_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis);
        let mut tier = ColdTier {
            config,
            location,
            runtime: Some(runtime),
            mover: Mutex::new(mover),
            reader: Mutex::new(reader),
            cache,
            breaker: Breaker { failures: AtomicU32::new(0), opened_at: Mutex::new(None), last_error: Mutex::default() },
            moves_done: AtomicU64::new(0),
            moves_failed: AtomicU64::new(0),
            records_moved: AtomicU64::new(0),
            uploads_verified_by_checksum: AtomicU64::new(0),
            uploads_verified_by_etag: AtomicU64::new(0),
            uploads_read_back: AtomicU64::new(0),
            interrupted: 0,
            last_move: Mutex::new(None),
            last_error: Mutex::new(None),
            pause_after_upload,
            verifies_checksums: tokio::sync::OnceCell::new(),
            #[cfg(test)]
            before_register: Mutex::new(None),
            object_max_rows: OBJECT_MAX_ROWS.into(),
            last_move_id: 0.into(),
            pins: Arc::new(AtomicU64::new(0)),
            access,
            promotions_done: AtomicU64::new(0),
            promotions_failed: AtomicU64::new(0),
            records_promoted: AtomicU64::new(0),
            pause_after_promote: std::env::var("AKOSHA_FAULT_COLD_PAUSE_AFTER_PROMOTE_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .map(Duration::from_millis),
        };
        tier.interrupted = tier.recover()?;
        Ok(tier)
    }

    /// Marks unfinished journal rows `interrupted` and deletes the objects they may have left behind.
    fn recover(&self) -> Result<u64, ColdError> {
        let conn = self.mover.lock().unwrap_or_else(|p| p.into_inner());
        let mut stmt = conn.prepare(
            "SELECT id, object_key FROM warm.cold_moves WHERE state NOT IN ('done', 'failed', 'interrupted') \
             AND object_key IS NOT NULL AND object_key NOT IN (SELECT key FROM warm.cold_objects)",
        )?;
        let unfinished: Vec<(i64, String)> =
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
        // Best effort: if the store is down now, compaction sweeps the orphans later. A store that is down must not
        // hold up start-up for its whole retry budget.
        let keys: Vec<String> = unfinished.into_iter().map(|(_, key)| key).collect();
        for (key, error) in self.delete_objects(&keys, Some(CLEANUP_BUDGET)) {
            warn!(message = "Cannot delete an object left by an interrupted move yet.", key = %key, error = %error);
        }
        let n = conn.execute(
            "UPDATE warm.cold_moves SET state = 'interrupted', finished_at = now() \
             WHERE state NOT IN ('done', 'failed', 'interrupted')",
            [],
        )? as u64;
        if n > 0 {
            warn!(
                message = "Moves to the cold tier were interrupted by a crash; warm kept their rows and the next move repeats them.",
                moves = n
            );
        }
        Ok(n)
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        match &self.runtime {
            Some(runtime) => runtime.block_on(f),
            None => unreachable!("the runtime is only taken on drop"),
        }
    }

    /// Keeps every object the catalog names now in the store until the pin is dropped.
    pub fn pin(&self) -> ColdPin {
        self.pins.fetch_add(1, Ordering::SeqCst);
        ColdPin(self.pins.clone())
    }

    /// Deletes objects the catalog no longer names, unless a backup holds a pin (then the next sweep does).
    fn retire_objects(&self, keys: &[String]) -> Vec<(String, String)> {
        if self.pins.load(Ordering::SeqCst) > 0 {
            info!(
                message = "Keeping retired cold objects while a backup runs; a later sweep deletes them.",
                objects = keys.len()
            );
            return Vec::new();
        }
        self.delete_objects(keys, None)
    }

    /// The store location.
    pub fn location(&self) -> &Location {
        &self.location
    }

    /// The local object cache.
    pub fn cache(&self) -> &Arc<ObjectCache> {
        &self.cache
    }

    /// The last completed move.
    pub fn last_move(&self) -> Option<ColdMoveReport> {
        self.last_move.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The last failure, if the last move failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether the breaker refuses store operations now.
    pub fn circuit_open(&self) -> bool {
        self.check_breaker().is_err()
    }

    fn check_breaker(&self) -> Result<(), ColdError> {
        let opened = *self.breaker.opened_at.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = opened {
            let elapsed = at.elapsed();
            if elapsed < self.config.breaker_cooldown {
                return Err(ColdError::CircuitOpen {
                    remaining_s: (self.config.breaker_cooldown - elapsed).as_secs().max(1),
                    failures: self.breaker.failures.load(Ordering::Relaxed),
                    last: self.breaker.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                });
            }
        }
        Ok(())
    }

    /// Counts a store outcome; opens the breaker after enough consecutive failures.
    fn record<T>(&self, result: Result<T, ColdError>) -> Result<T, ColdError> {
        match &result {
            Ok(_) => {
                self.breaker.failures.store(0, Ordering::Relaxed);
                *self.breaker.opened_at.lock().unwrap_or_else(|p| p.into_inner()) = None;
            }
            Err(ColdError::Store(e)) => {
                let failures = self.breaker.failures.fetch_add(1, Ordering::Relaxed) + 1;
                *self.breaker.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e.clone();
                if failures >= self.config.breaker_failures {
                    let mut opened = self.breaker.opened_at.lock().unwrap_or_else(|p| p.into_inner());
                    if opened.is_none_or(|at| at.elapsed() >= self.config.breaker_cooldown) {
                        warn!(message = "Cold tier object store keeps failing; pausing its use.", failures, cooldown_s = self.config.breaker_cooldown.as_secs(), error = %e);
                        *opened = Some(Instant::now());
                    }
                }
            }
            Err(_) => {}
        }
        result
    }

    /// Uploads `stored` as `key` and makes sure the store holds exactly it (the catalog records its sha256): the
    /// store verified the body against a declared checksum or returned its MD5 as the ETag, or it is read back.
    async fn upload_one(&self, stored: &Stored, key: &str) -> Result<(), ColdError> {
        let path = self.location.join(key);
        let store = &self.location.store;
        let data = &stored.data;
        let store_err = |op: &str, e: object_store::Error| ColdError::Store(format!("{op} {key}: {e}"));
        let e_tag = if stored.bytes > MULTIPART_THRESHOLD {
            let upload = store.put_multipart(&path).await.map_err(|e| store_err("multipart upload", e))?;
            let mut writer = object_store::WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
            writer.write(data);
            writer.finish().await.map_err(|e| store_err("multipart upload", e))?.e_tag
        } else if let Some(checked) = self.checksummed_store().await? {
            // The client hashes the body for the request's signature anyway; declaring that hash costs nothing.
            checked.put(&path, data.clone().into()).await.map_err(|e| store_err("PUT", e))?;
            self.uploads_verified_by_checksum.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        } else {
            store.put(&path, data.clone().into()).await.map_err(|e| store_err("PUT", e))?.e_tag
        };
        // S3 and its compatibles answer a single-part PUT with the MD5 of what they stored as the ETag: when it
        // is ours, the store has verified the object. Anything else (multipart ETags, SSE-KMS, other stores'
        // opaque ETags) is read back.
        // (Hashed only when the ETag looks like an MD5: a local directory's is the file's inode, time and size.)
        let md5_tag = e_tag
            .as_deref()
            .map(|tag| tag.trim_matches('"'))
            .filter(|tag| tag.len() == 32 && tag.bytes().all(|b| b.is_ascii_hexdigit()));
        if md5_tag.is_some_and(|tag| tag.eq_ignore_ascii_case(&hex(&md5::Md5::digest(data)))) {
            self.uploads_verified_by_etag.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.uploads_read_back.fetch_add(1, Ordering::Relaxed);
        let back =
            store.get(&path).await.map_err(|e| store_err("GET", e))?.bytes().await.map_err(|e| store_err("GET", e))?;
        if back != data {
            return Err(ColdError::Corrupt(format!(
                "{key} reads back as {} bytes with sha256 {}, wrote {} bytes with {}",
                back.len(),
                hex(&Sha256::digest(&back)),
                stored.bytes,
                stored.sha256
            )));
        }
        Ok(())
    }

    /// The checksum-declaring client when the store is known to refuse a body that does not match the
    /// declaration; asks the store the first time (and again after a probe that could not reach it).
    async fn checksummed_store(&self) -> Result<Option<&Arc<dyn object_store::ObjectStore>>, ColdError> {
        let Some(checked) = &self.location.checksummed else { return Ok(None) };
        let verifies = self
            .verifies_checksums
            .get_or_try_init(|| async {
                let path = self.location.join(&format!("_probe/checksum-{}", new_uuid()));
                let verifies =
                    crate::objects::probe_checksum_verification(self.location.store.as_ref(), checked.as_ref(), &path)
                        .await
                        .map_err(|e| ColdError::Store(format!("checksum probe {path}: {e}")))?;
                if verifies {
                    info!(message = "The object store verifies declared sha256 checksums; uploads rely on it.");
                } else {
                    warn!(message = "The object store does not refuse a body that mismatches its declared sha256; uploads are verified by ETag or read back.");
                }
                Ok::<_, ColdError>(verifies)
            })
            .await?;
        Ok(verifies.then_some(checked))
    }

    /// The form `file` is stored in: as it is, or sealed under a new data key when encryption is configured.
    fn stored_form(&self, key: &str, plain: &bytes::Bytes, sha256: &str) -> Result<Stored, ColdError> {
        let Some(keyring) = &self.config.encryption else {
            return Ok(Stored {
                data: plain.clone(),
                sha256: sha256.to_owned(),
                bytes: plain.len() as u64,
                sealed: None,
            });
        };
        let (sealed, wrapped) =
            keyring.seal(plain).map_err(|error| ColdError::Sealed { key: key.to_owned(), error })?;
        Ok(Stored {
            sha256: hex(&Sha256::digest(&sealed)),
            bytes: sealed.len() as u64,
            data: sealed.into(),
            sealed: Some(wrapped),
        })
    }

    /// Moves every warm row older than its kind's cutoff to cold (see the module documentation).
    pub fn move_from_warm(
        &self,
        warm: &crate::warm::WarmTier,
        cutoff_of: &dyn Fn(RecordKind) -> i64,
    ) -> Result<Option<ColdMoveReport>, ColdError> {
        let result = self.move_inner(warm, cutoff_of);
        match &result {
            Ok(Some(report)) => {
                self.moves_done.fetch_add(1, Ordering::Relaxed);
                self.records_moved.fetch_add(report.records, Ordering::Relaxed);
                info!(
                    message = "Moved records from warm to cold.",
                    records = report.records,
                    objects = report.objects,
                    bytes = report.bytes,
                    took_ms = report.took_ms
                );
                *self.last_move.lock().unwrap_or_else(|p| p.into_inner()) = Some(report.clone());
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
            }
            Ok(None) => {}
            Err(e) => {
                self.moves_failed.fetch_add(1, Ordering::Relaxed);
                warn!(message = "A move to the cold tier failed; warm keeps the records and the next move retries.", error = %e);
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            }
        }
        result
    }

    fn move_inner(
        &self,
        warm: &crate::warm::WarmTier,
        cutoff_of: &dyn Fn(RecordKind) -> i64,
    ) -> Result<Option<ColdMoveReport>, ColdError> {
        self.check_breaker()?;
        let started = Instant::now();
        let conn = self.mover.lock().unwrap_or_else(|p| p.into_inner());
        let earliest = RecordKind::ALL.iter().map(|k| cutoff_of(*k)).min().unwrap_or(i64::MIN);
        let mut report = ColdMoveReport { cutoff_us: earliest, ..Default::default() };
        let mut plan = Vec::new();
        for kind in RecordKind::ALL {
            let t = kind.as_str();
            let cutoff_us = cutoff_of(kind);
            let groups: Vec<Group> = {
                let mut stmt = conn.prepare(&format!(
                    "SELECT system_id, strftime(CAST(ts AS DATE), '%Y-%m-%d') AS day, count(*) FROM warm.{t} \
                     WHERE ts < make_timestamp(?) GROUP BY ALL ORDER BY day, system_id"
                ))?;
                stmt.query_map([cutoff_us], |r| {
                    Ok(Group { system_id: r.get(0)?, day: r.get(1)?, rows: r.get::<_, i64>(2)? as u64 })
                })?
                .collect::<Result<_, _>>()?
            };
            let groups = self.demotable(&conn, t, groups)?;
            plan.extend(batches(&groups).into_iter().map(|chunk| Planned { kind, cutoff_us, groups: chunk.to_vec() }));
        }
        (report.objects, report.records, report.bytes) = self.run_batches(&conn, warm, plan)?;
        if report.objects == 0 {
            return Ok(None);
        }
        warm.persist(&conn)?;
        report.took_ms = started.elapsed().as_millis() as u64;
        Ok(Some(report))
    }

    /// The groups that may go down now: not promoted less than `min_age` ago (their hold), and not still read
    /// often enough to be promoted again (only idle data is demoted).
    fn demotable(&self, conn: &Connection, kind: &str, groups: Vec<Group>) -> Result<Vec<Group>, ColdError> {
        let held: std::collections::HashSet<(String, String)> = {
            // Groups promoted to hot stay in warm (their durable copy) as long as they are hot.
            let mut stmt = conn.prepare(
                "SELECT system_id, strftime(day, '%Y-%m-%d') FROM warm.tier_holds WHERE kind = $1 AND until > now() \
                 UNION SELECT system_id, strftime(day, '%Y-%m-%d') FROM warm.hot_holds WHERE kind = $1",
            )?;
            stmt.query_map([kind], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?
        };
        let now = jiff::Timestamp::now().as_microsecond();
        let promotion = &self.config.promotion;
        Ok(groups
            .into_iter()
            .filter(|g| {
                let group = access::Group { kind: kind.to_owned(), system_id: g.system_id.clone(), day: g.day.clone() };
                let still_read = promotion.enabled && self.access.score(&group, now) >= promotion.threshold();
                !(held.contains(&(g.system_id.clone(), g.day.clone())) || still_read)
            })
            .collect())
    }

    /// Counts reads of records a query returned (see [`access`]), per (kind, system, day) group in any tier:
    /// cold groups read often enough are promoted to warm, warm ones to hot, and promoted ones stay up while
    /// they are read.
    pub fn note_reads<'a>(&self, records: impl IntoIterator<Item = &'a serde_json::Value>) {
        let now = jiff::Timestamp::now().as_microsecond();
        let groups = records.into_iter().filter_map(|r| {
            let ts = r["ts"].as_i64()?;
            let (kind, system_id) = (r["kind"].as_str()?, r["system_id"].as_str()?);
            Some(access::Group::of(kind, system_id, ts))
        });
        self.access.note(groups.collect::<Vec<_>>(), now);
    }

    /// The decayed read count of a group now.
    pub fn read_score(&self, group: &access::Group, now_us: i64) -> f64 {
        self.access.score(group, now_us)
    }

    /// Groups (in any tier) whose decayed read count is at least `threshold`, with it.
    pub fn read_groups_at_least(&self, threshold: f64, now_us: i64) -> Vec<(access::Group, f64)> {
        self.access.at_least(threshold, now_us)
    }

    /// Groups read often enough to be promoted that are (still) in cold, with their scores.
    pub fn promotion_candidates(&self) -> Result<Vec<(access::Group, f64)>, ColdError> {
        let now = jiff::Timestamp::now().as_microsecond();
        let conn = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (group, score) in self.access.at_least(self.config.promotion.threshold(), now) {
            if !self.group_objects(&conn, &group.kind, &group.system_id, &group.day)?.is_empty() {
                out.push((group, score));
            }
        }
        Ok(out)
    }

    /// Saves the read counts and promotes the groups read often enough back to warm (cold→warm rehydration):
    /// at most `max_groups_per_run`, none whose cold copy is younger than `min_age`. Each group is one warm
    /// transaction — its newest visible rows inserted (a newer warm version of a key wins), verified against the
    /// objects, the objects uncatalogued and a hold against demotion for `min_age` written — after which the
    /// objects are deleted. A crash before the commit changes nothing; after it, the objects are orphans the next
    /// compaction sweeps.
    pub fn promote(&self, warm: &crate::warm::WarmTier) -> Result<PromotionReport, ColdError> {
        let started = Instant::now();
        let now = jiff::Timestamp::now().as_microsecond();
        let conn = self.mover.lock().unwrap_or_else(|p| p.into_inner());
        self.access.save(&conn, now)?;
        conn.execute("DELETE FROM warm.tier_holds WHERE until <= now()", [])?;
        let mut report = PromotionReport::default();
        let promotion = &self.config.promotion;
        if !promotion.enabled {
            return Ok(report);
        }
        let min_age_us = promotion.min_age.as_micros() as i64;
        for (group, score) in self.access.at_least(promotion.threshold(), now) {
            let objects = self.group_objects(&conn, &group.kind, &group.system_id, &group.day)?;
            if objects.is_empty() {
                continue;
            }
            let youngest: i64 = conn.query_row(
                "SELECT epoch_us(max(created_at)) FROM warm.cold_objects WHERE kind = ? AND system_id = ? AND day = CAST(? AS DATE)",
                [&group.kind, &group.system_id, &group.day],
                |r| r.get(0),
            )?;
            if youngest > now - min_age_us {
                report.too_young += 1;
                continue;
            }
            if report.groups as usize >= promotion.max_groups_per_run {
                report.deferred += 1;
                continue;
            }
            self.check_breaker()?;
            match self.promote_group(&conn, warm, &group, &objects, now) {
                Ok(records) => {
                    info!(
                        message = "Promoted a group read often back to warm.",
                        kind = %group.kind,
                        system_id = %group.system_id,
                        day = %group.day,
                        reads = score,
                        records
                    );
                    report.groups += 1;
                    report.records += records;
                    report.objects += objects.len() as u64;
                    self.promotions_done.fetch_add(1, Ordering::Relaxed);
                    self.records_promoted.fetch_add(records, Ordering::Relaxed);
                }
                Err(e) => {
                    self.promotions_failed.fetch_add(1, Ordering::Relaxed);
                    warn!(message = "A promotion to warm failed; cold keeps the records and the next round retries.", error = %e);
                    *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                    return Err(e);
                }
            }
        }
        if report.groups > 0 {
            warm.persist(&conn)?;
        }
        report.took_ms = started.elapsed().as_millis() as u64;
        Ok(report)
    }

    fn promote_group(
        &self,
        conn: &Connection,
        warm: &crate::warm::WarmTier,
        group: &access::Group,
        objects: &[ColdObject],
        now: i64,
    ) -> Result<u64, ColdError> {
        let kind: RecordKind = group
            .kind
            .parse()
            .map_err(|_| ColdError::Corrupt(format!("unknown kind `{}` in the catalog", group.kind)))?;
        let t = kind.as_str();
        let id = now;
        conn.execute(
            "INSERT INTO warm.cold_moves VALUES (?, ?, ?, CAST(? AS DATE), NULL, 'promoting', NULL, now(), NULL, 'cold to warm')",
            duckdb::params![id, t, group.system_id, group.day],
        )?;
        let lease = self.record(self.lease(objects))?;
        let source = newest_visible(t, &lease.paths, lease.int8);
        // The day's metric rows are warm now: 5-minute buckets from them, no hourly ones.
        let rollups = match kind {
            RecordKind::Metric => {
                let days =
                    crate::rollup::days_relation([(group.system_id.as_str(), group.day.as_str())]).expect("one day");
                crate::rollup::Rollup::FiveMinutes.refresh_from_warm_sql(&days)
                    + &crate::rollup::Rollup::Hour.clear_sql(&days)
            }
            _ => String::new(),
        };
        let hold_until = now + self.config.promotion.min_age.as_micros() as i64;
        let moving = warm.lock_moves();
        conn.execute_batch("BEGIN TRANSACTION")?;
        let promoted = (|| -> Result<u64, ColdError> {
            conn.execute_batch(&format!(
                "DELETE FROM warm.{t} w USING {source} c WHERE w.system_id = c.system_id AND w.id = c.id AND w.ts < c.ts;\n\
                 INSERT INTO warm.{t} SELECT c.* FROM {source} c \
                   WHERE NOT EXISTS (SELECT 1 FROM warm.{t} w WHERE w.system_id = c.system_id AND w.id = c.id);"
            ))?;
            // Every cold row is in warm now, as the same version or a newer one.
            let (rows, represented): (i64, i64) = conn.query_row(
                &format!(
                    "SELECT (SELECT count(*) FROM {source}), (SELECT count(*) FROM {source} c JOIN warm.{t} w \
                       ON w.system_id = c.system_id AND w.id = c.id \
                       AND (w.ts > c.ts OR (w.ts = c.ts AND {} = {})))",
                    row_hash("w"),
                    row_hash("c")
                ),
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            if rows != represented {
                return Err(ColdError::Corrupt(format!(
                    "promotion of {t}/{}/{}: {represented} of {rows} rows reached warm",
                    group.system_id, group.day
                )));
            }
            let keys: Vec<String> = objects.iter().map(|o| sql_text(&o.key)).collect();
            conn.execute_batch(&format!(
                "DELETE FROM warm.cold_objects WHERE key IN ({keys});\n\
                 DELETE FROM warm.tier_holds WHERE kind = '{t}' AND system_id = {system} AND day = DATE {day};\n\
                 INSERT INTO warm.tier_holds VALUES ('{t}', {system}, DATE {day}, make_timestamp({hold_until}));\n\
                 UPDATE warm.cold_moves SET state = 'done', records = {rows}, finished_at = now() \
                   WHERE id = {id} AND kind = '{t}' AND state = 'promoting';\n{rollups}",
                keys = keys.join(", "),
                system = sql_text(&group.system_id),
                day = sql_text(&group.day),
            ))?;
            Ok(rows as u64)
        })();
        let rows = match promoted {
            Ok(rows) => {
                conn.execute_batch("COMMIT")?;
                rows
            }
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                let _ = conn.execute(
                    "UPDATE warm.cold_moves SET state = 'failed', detail = ?, finished_at = now() WHERE id = ? AND kind = ?",
                    duckdb::params![e.to_string(), id, t],
                );
                return Err(e);
            }
        };
        if let Some(pause) = self.pause_after_promote {
            std::thread::sleep(pause);
        }
        let records = crate::hot::index_records(
            conn,
            &format!(
                "FROM warm.{t} t WHERE t.system_id = {} AND CAST(t.ts AS DATE) = DATE {}",
                sql_text(&group.system_id),
                sql_text(&group.day)
            ),
            kind,
            true,
        )?;
        warm.index(&records)?;
        drop(moving);
        drop(lease);
        for object in objects {
            self.cache.forget(&object.sha256);
        }
        let keys: Vec<String> = objects.iter().map(|o| o.key.clone()).collect();
        for (key, error) in self.retire_objects(&keys) {
            warn!(message = "Cannot delete a promoted cold object yet; the next sweep will.", key = %key, error = %error);
        }
        Ok(rows)
    }

    /// Moves the planned batches (see the module documentation) in a three-stage pipeline: while one batch is
    /// registered, the next is uploaded and the one after it exported, so that DuckDB's and the writers' work,
    /// the store's and the single-threaded commit overlap. The first failure stops the move. Returns objects,
    /// rows and bytes.
    fn run_batches(
        &self,
        conn: &Connection,
        warm: &crate::warm::WarmTier,
        plan: Vec<Planned>,
    ) -> Result<(u64, u64, u64), ColdError> {
        let add = |totals: &mut (u64, u64, u64), (o, r, b): (u64, u64, u64)| {
            totals.0 += o;
            totals.1 += r;
            totals.2 += b;
        };
        let mut totals = (0, 0, 0);
        if plan.len() < 2 {
            for planned in &plan {
                let mut staged = self.stage_batch(conn, planned)?;
                add(&mut totals, self.finish_batch(conn, warm, &mut staged)?);
            }
            return Ok(totals);
        }
        // Each batch keeps its connection from export to registration (its scratch table is connection-local):
        // one connection per stage.
        let (give_back, free) = std::sync::mpsc::channel::<Connection>();
        for _ in 0..3 {
            let _ = give_back.send(conn.try_clone()?);
        }
        let (to_upload, exported) = std::sync::mpsc::sync_channel::<(Connection, Staged)>(0);
        let (to_register, uploaded) = std::sync::mpsc::sync_channel::<(Connection, Staged)>(0);
        let spawn_error = |e: std::io::Error| ColdError::Io(format!("cannot start a cold move thread: {e}"));
        std::thread::scope(|scope| {
            let give_back_registered = give_back.clone();
            let uploader = std::thread::Builder::new()
                .name("cold-upload".into())
                .spawn_scoped(scope, move || -> Result<(), ColdError> {
                    for (conn, mut staged) in exported {
                        if let Err(e) = self.upload_batch(&conn, &mut staged) {
                            self.fail_batch(&conn, &staged, &e);
                            let _ = give_back.send(conn);
                            return Err(e);
                        }
                        if let Err(std::sync::mpsc::SendError((conn, staged))) = to_register.send((conn, staged)) {
                            // The registrar stopped on an earlier batch's error, which it reports.
                            let stopped = ColdError::Io("the move stopped at an earlier batch's error".into());
                            self.fail_batch(&conn, &staged, &stopped);
                            return Ok(());
                        }
                    }
                    Ok(())
                })
                .map_err(spawn_error)?;
            let registrar = std::thread::Builder::new()
                .name("cold-register".into())
                .spawn_scoped(scope, move || -> Result<(u64, u64, u64), ColdError> {
                    let mut totals = (0, 0, 0);
                    for (conn, staged) in uploaded {
                        let registered = self.register_batch(&conn, warm, &staged);
                        if let Err(e) = &registered {
                            self.fail_batch(&conn, &staged, e);
                        }
                        let _ = give_back_registered.send(conn);
                        registered?;
                        add(&mut totals, staged.moved());
                    }
                    Ok(totals)
                })
                .map_err(spawn_error)?;
            let staging = (|| -> Result<(), ColdError> {
                for planned in &plan {
                    // No connection back, or nobody taking the batch, means a later stage stopped on an error,
                    // which it reports.
                    let Ok(conn) = free.recv() else { return Ok(()) };
                    let staged = self.stage_batch(&conn, planned)?;
                    if to_upload.send((conn, staged)).is_err() {
                        return Ok(());
                    }
                }
                Ok(())
            })();
            drop(to_upload);
            let panicked = |stage: &str| ColdError::Io(format!("the cold {stage} thread panicked"));
            let uploaded = uploader.join().unwrap_or_else(|_| Err(panicked("upload")));
            let registered = registrar.join().unwrap_or_else(|_| Err(panicked("register")));
            // Errors in the order of the batches they happened to: a later stage's batch is an earlier one.
            totals = registered?;
            uploaded?;
            staging
        })?;
        Ok(totals)
    }

    /// Step 1 for a batch of (system, day) groups of one kind: its objects written locally, each verified, and
    /// the exported versions in the connection's scratch table. One export (one sorted scan of warm) covers the
    /// whole batch, so the cost per object is its bytes, not a scan.
    fn stage_batch(&self, conn: &Connection, planned: &Planned) -> Result<Staged, ColdError> {
        let started = Instant::now();
        let t = planned.kind.as_str();
        let mut staged = Staged {
            id: self.next_move_id(),
            kind: planned.kind,
            groups: planned.groups.clone(),
            // Metric rollups are computed from the objects' local copies.
            dir: (planned.kind == RecordKind::Metric || self.config.cache_on_write)
                .then(|| self.cache.tmp_dir().join(new_uuid())),
            objects: Vec::new(),
            timings: Vec::new(),
        };
        let values: Vec<String> = planned
            .groups
            .iter()
            .enumerate()
            .map(|(i, g)| format!("({i}, {}, DATE {})", sql_text(&g.system_id), sql_text(&g.day)))
            .collect();
        // The warm rows of the batch's groups, each with its group's index `g.idx`. One statement reads them and
        // their hashes from one snapshot, so a hot→warm move meanwhile cannot make the two disagree. The batch's
        // days are consecutive (groups are planned in day order): bounding `ts` by them lets the scan skip the
        // rest of warm instead of decoding every row's vector for the join to drop.
        let first_day = planned.groups.iter().map(|g| g.day.as_str()).min().unwrap_or_default();
        let last_day = planned.groups.iter().map(|g| g.day.as_str()).max().unwrap_or_default();
        let rows = format!(
            "(SELECT g.idx, w.* FROM warm.{t} w JOIN (VALUES {}) g(idx, g_system, g_day) \
             ON w.system_id = g.g_system AND CAST(w.ts AS DATE) = g.g_day WHERE w.ts < make_timestamp({}) \
             AND w.ts >= CAST(DATE {} AS TIMESTAMP) AND w.ts < CAST(DATE {} AS TIMESTAMP) + INTERVAL 1 DAY)",
            values.join(", "),
            planned.cutoff_us,
            sql_text(first_day),
            sql_text(last_day)
        );
        if let Some(dir) = &staged.dir {
            std::fs::create_dir_all(dir).map_err(|e| ColdError::Io(format!("{}: {e}", dir.display())))?;
        }
        for file in self.write_groups(conn, &rows, planned.groups.len(), staged.dir.as_deref(), true)? {
            let group = &planned.groups[file.idx];
            let key = self.new_object_key(t, &group.system_id, &group.day);
            let stored = self.stored_form(&key, &file.written.bytes, &file.written.sha256)?;
            staged.objects.push(Export {
                key,
                file: file.path,
                system_id: group.system_id.clone(),
                day: group.day.clone(),
                rows: file.written.rows,
                stored,
                min_ts: file.written.min_ts,
                max_ts: file.written.max_ts,
            });
        }
        staged.timings.push(started.elapsed().as_millis() as u64);
        Ok(staged)
    }

    /// The Hive-style key of a new object of one (kind, system, day) group.
    fn new_object_key(&self, kind: &str, system_id: &str, day: &str) -> String {
        format!(
            "kind={kind}/system={}/date={day}/part-{}{}",
            key_segment(system_id),
            new_uuid(),
            self.config.embedding_encoding.key_suffix()
        )
    }

    /// A journal id later than every earlier one (ids are start times in µs).
    fn next_move_id(&self) -> i64 {
        let now = jiff::Timestamp::now().as_microsecond();
        let previous = self
            .last_move_id
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| Some(now.max(last + 1)))
            .unwrap_or(now);
        now.max(previous + 1)
    }

    /// After a failure in steps 2–4: the journal says so and the batch's objects are deleted again.
    fn fail_batch(&self, conn: &Connection, staged: &Staged, error: &ColdError) {
        let _ = conn.execute(
            "UPDATE warm.cold_moves SET state = 'failed', detail = ?, finished_at = now() \
             WHERE id = ? AND state NOT IN ('done', 'failed', 'interrupted')",
            duckdb::params![error.to_string(), staged.id],
        );
        // Objects may exist without catalog rows; remove them now if the store lets us, else the sweep will (a
        // store the breaker gave up on is not asked).
        if !self.circuit_open() {
            let keys: Vec<String> = staged.objects.iter().map(|o| o.key.clone()).collect();
            self.delete_objects(&keys, Some(CLEANUP_BUDGET));
        }
    }

    /// Steps 2–4 for a staged batch. Returns objects, rows and bytes moved.
    fn finish_batch(
        &self,
        conn: &Connection,
        warm: &crate::warm::WarmTier,
        staged: &mut Staged,
    ) -> Result<(u64, u64, u64), ColdError> {
        let outcome = self.upload_batch(conn, staged).and_then(|()| self.register_batch(conn, warm, staged));
        match outcome {
            Ok(()) => Ok(staged.moved()),
            Err(e) => {
                self.fail_batch(conn, staged, &e);
                Err(e)
            }
        }
    }

    /// Steps 2 and 3: the journal says `uploading`, then the objects are uploaded and verified.
    fn upload_batch(&self, conn: &Connection, staged: &mut Staged) -> Result<(), ColdError> {
        let Staged { id, kind, ref objects, .. } = *staged;
        let t = kind.as_str();
        if objects.is_empty() {
            return Ok(());
        }
        let mut lap = lap_timer();
        let journal: Vec<String> = objects
            .iter()
            .map(|o| {
                format!(
                    "({id}, '{t}', {}, DATE {}, {}, 'uploading', {}, now(), NULL, NULL)",
                    sql_text(&o.system_id),
                    sql_text(&o.day),
                    sql_text(&o.key),
                    o.rows
                )
            })
            .collect();
        conn.execute_batch(&format!("INSERT INTO warm.cold_moves VALUES {};", journal.join(", ")))?;
        let journal_ms = lap();
        // 2 and 3. Upload and read back, several at once.
        self.upload_all(objects.iter().map(|o| (&o.stored, o.key.as_str())))?;
        let upload_ms = lap();
        staged.timings.extend([journal_ms, upload_ms]);
        if let Some(pause) = self.pause_after_upload {
            warn!(message = "Fault injection: pausing after cold uploads.", ms = pause.as_millis() as u64);
            std::thread::sleep(pause);
        }
        Ok(())
    }

    /// Step 4: the catalog rows in, the exported versions out of warm, in one transaction; then the keys leave
    /// the warm indexes and the files move into the cache.
    fn register_batch(
        &self,
        conn: &Connection,
        warm: &crate::warm::WarmTier,
        staged: &Staged,
    ) -> Result<(), ColdError> {
        let Staged { id, kind, ref groups, ref objects, .. } = *staged;
        let t = kind.as_str();
        let int8 = self.config.embedding_encoding == EmbeddingEncoding::Int8;
        if objects.is_empty() {
            return Ok(());
        }
        let mut lap = lap_timer();
        // The hourly rollup of a day is recomputed from all of the day's objects: lease those already in cold.
        let (rollups, _prior) = if kind == RecordKind::Metric {
            let mut prior = Vec::new();
            for g in groups {
                prior.extend(self.group_objects(conn, t, &g.system_id, &g.day)?);
            }
            let lease = self.record(self.lease(&prior))?;
            let mut paths = lease.paths.clone();
            paths.extend(objects.iter().filter_map(|o| o.file.clone()));
            let days = crate::rollup::days_relation(objects.iter().map(|o| (o.system_id.as_str(), o.day.as_str())))
                .expect("objects is not empty");
            let sql = crate::rollup::Rollup::Hour.refresh_sql(&days, &newest_visible(t, &paths, lease.int8 || int8))
                + &crate::rollup::Rollup::FiveMinutes.refresh_from_warm_sql(&days);
            (sql, Some(lease))
        } else {
            (String::new(), None)
        };
        // 4. Register and delete in one transaction, under the warm lock (the warm indexes change too).
        let _moving = warm.lock_moves();
        #[cfg(test)]
        if let Some(sql) = self.before_register.lock().unwrap_or_else(|p| p.into_inner()).take() {
            conn.execute_batch(&sql)?;
        }
        // Returns the hashes of the keys whose exported version left warm, or `None` when the cheap way (no
        // `RETURNING`) cannot tell them (see below).
        let register = |returning: bool| -> Result<Option<Vec<u64>>, ColdError> {
            let catalog: Vec<String> = objects
                .iter()
                .map(|o| {
                    format!(
                        "({}, '{t}', {}, DATE {}, make_timestamp({}), make_timestamp({}), {}, {}, '{}', now(), {})",
                        sql_text(&o.key),
                        sql_text(&o.system_id),
                        sql_text(&o.day),
                        o.min_ts,
                        o.max_ts,
                        o.rows,
                        o.stored.bytes,
                        o.stored.sha256,
                        o.stored.key_columns()
                    )
                })
                .collect();
            conn.execute_batch(&format!("INSERT INTO warm.cold_objects VALUES {};", catalog.join(", ")))?;
            // Exactly the exported versions leave warm: a newer one that arrived meanwhile stays. Every insert
            // stamps its rows with its own `ingested_at` (and hot keeps one version per key), so key, `ts` and
            // `ingested_at` name a version without hashing its content.
            let delete = format!(
                "DELETE FROM warm.{t} w USING {MOVING} p \
                 WHERE p.system_id = w.system_id AND p.id = w.id AND p.ts = w.ts AND p.ingested_at = w.ingested_at"
            );
            // `RETURNING` makes DuckDB fetch every column of the deleted rows, vectors included (half of this
            // step's CPU). When the delete's count equals the scratch table's, every exported version was
            // deleted and the scratch table names the keys; otherwise (a version erased or replaced meanwhile)
            // the caller rolls back and asks again with `RETURNING`.
            let gone = if returning {
                format!("{delete} RETURNING w.system_id, w.id")
            } else {
                let deleted = conn.execute(&delete, [])?;
                let exported: i64 = conn.query_row(&format!("SELECT count(*) FROM {MOVING}"), [], |r| r.get(0))?;
                if i64::try_from(deleted).ok() != Some(exported) {
                    return Ok(None);
                }
                format!("SELECT system_id, id FROM {MOVING}")
            };
            let hashes = conn
                .prepare(&gone)?
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
                .map(|row| row.map(|(system, id)| crate::hot::key_hash_of(kind, &system, &id)))
                .collect::<Result<Vec<u64>, _>>()?;
            if !rollups.is_empty() {
                conn.execute_batch(&rollups)?;
            }
            let done: Vec<String> =
                objects.iter().map(|o| format!("({}, {})", sql_text(&o.key), sql_text(&o.stored.sha256))).collect();
            conn.execute_batch(&format!(
                "UPDATE warm.cold_moves SET state = 'done', detail = 'sha256 ' || v.sha256, finished_at = now() \
                 FROM (VALUES {}) v(object_key, sha256) WHERE id = {id} AND cold_moves.object_key = v.object_key;",
                done.join(", ")
            ))?;
            Ok(Some(hashes))
        };
        let in_transaction = |returning: bool| -> Result<Option<Vec<u64>>, ColdError> {
            conn.execute_batch("BEGIN TRANSACTION")?;
            match register(returning) {
                Ok(Some(hashes)) => {
                    conn.execute_batch("COMMIT")?;
                    Ok(Some(hashes))
                }
                outcome => {
                    let _ = conn.execute_batch("ROLLBACK");
                    outcome
                }
            }
        };
        let hashes = match in_transaction(false)? {
            Some(hashes) => hashes,
            None => {
                debug!(
                    message = "Warm changed under a cold move; naming the deleted versions with RETURNING.",
                    kind = t
                );
                in_transaction(true)?.unwrap_or_default()
            }
        };
        let register_ms = lap();
        conn.execute_batch(&format!("DROP TABLE IF EXISTS {MOVING}"))?;
        warm.forget(&hashes)?;
        for o in objects.iter() {
            if let Some(file) = &o.file {
                self.cache.adopt(file, &o.stored.sha256)?;
            }
        }
        let (copy_ms, journal_ms, upload_ms) = match staged.timings[..] {
            [copy, journal, upload] => (copy, journal, upload),
            _ => (0, 0, 0),
        };
        debug!(
            message = "Moved a batch to cold.",
            kind = t,
            objects = objects.len(),
            copy_ms,
            journal_ms,
            upload_ms,
            register_ms,
            forget_ms = lap()
        );
        Ok(())
    }

    /// Writes the rows of `rows` (a relation with the stored table columns, `ingested_at` and a group index
    /// `idx` below `groups`) as objects, one or more per group, sorted by `ts` and `id`: DuckDB streams them out
    /// sorted by group, and several writer threads each write and verify a whole object while DuckDB produces the
    /// next rows. Objects are `<dir>/<idx>-<part>.parquet`, in order. With `moving`, the exported versions' keys
    /// and content hashes go into `MOVING` (exactly those rows leave warm when a move registers).
    fn write_groups(
        &self,
        conn: &Connection,
        rows: &str,
        groups: usize,
        dir: Option<&Path>,
        moving: bool,
    ) -> Result<Vec<GroupFile>, ColdError> {
        use arrow::array::{AsArray, RecordBatch};
        use arrow::datatypes::Int32Type;
        let encoding = self.config.embedding_encoding;
        let mut stmt = conn.prepare(&format!(
            "SELECT w.idx::INTEGER AS idx, {} FROM {rows} w ORDER BY w.idx, w.ts, w.id",
            encoding.stored_columns("w"),
        ))?;
        let stream = stmt.stream_arrow([])?;
        let int8 = encoding == EmbeddingEncoding::Int8;
        let schema = match int8 {
            true => Arc::new(write::quantized_schema(&stream.get_schema())?),
            false => stream.get_schema(),
        };
        let stored: Vec<usize> = (1..schema.fields().len()).collect();
        let stored_schema = Arc::new(write::object_schema(&schema.project(&stored)?));
        let mut moving_columns = vec![0];
        for c in ["system_id", "id", "ts", "ingested_at"] {
            moving_columns.push(schema.index_of(c)?);
        }
        let layout = write::layout(&stored_schema, self.config.row_group_rows)?;
        let writers = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4).min(groups.max(1));
        let max_rows = self.object_max_rows.load(Ordering::Relaxed).max(1);
        let (to_writers, queue) = std::sync::mpsc::sync_channel::<Pending>(writers);
        let queue = Mutex::new(queue);

        // Each writer takes whole objects until the queue closes; after a failure it keeps draining the queue
        // (unwritten) so that the producer never waits on a full queue nobody reads.
        let write_objects = || -> Result<Vec<GroupFile>, ColdError> {
            let mut done = Vec::new();
            let mut failed = None;
            loop {
                let next = queue.lock().unwrap_or_else(|p| p.into_inner()).recv();
                let Ok(object) = next else { break };
                if failed.is_some() {
                    continue;
                }
                let result = write::write_verified(&stored_schema, &object.batches, &layout).and_then(|written| {
                    let path = dir.map(|dir| dir.join(format!("{}-{}.parquet", object.idx, object.part)));
                    if let Some(path) = &path {
                        std::fs::write(path, &written.bytes)
                            .map_err(|e| ColdError::Io(format!("{}: {e}", path.display())))?;
                    }
                    Ok(GroupFile { idx: object.idx, part: object.part, path, written })
                });
                match result {
                    Ok(file) => done.push(file),
                    Err(e) => failed = Some(e),
                }
            }
            failed.map_or(Ok(done), Err)
        };

        let mut keys: Vec<RecordBatch> = Vec::new();
        let (produced, written) = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..writers).map(|_| scope.spawn(write_objects)).collect();
            let to_writers = to_writers;
            let send = |object: Pending| {
                to_writers.send(object).map_err(|_| ColdError::Io("the cold writer threads stopped".into()))
            };
            let produced = (|| -> Result<(), ColdError> {
                let mut current: Option<Pending> = None;
                for batch in stream {
                    let batch = match int8 {
                        true => write::quantize(&batch?, &schema)?,
                        false => batch?,
                    };
                    let unexpected =
                        |c: &str| ColdError::Corrupt(format!("the export's {c} column has an unexpected type"));
                    let idx = batch.column(0).as_primitive_opt::<Int32Type>().ok_or_else(|| unexpected("idx"))?;
                    if moving {
                        keys.push(batch.project(&moving_columns)?);
                    }
                    let values = write::conform(&batch.project(&stored)?, &stored_schema)?;
                    let mut start = 0;
                    while start < batch.num_rows() {
                        let group = idx.value(start);
                        let run_end =
                            (start..batch.num_rows()).find(|&i| idx.value(i) != group).unwrap_or(batch.num_rows());
                        let group = usize::try_from(group).ok().filter(|g| *g < groups).ok_or_else(|| {
                            ColdError::Corrupt(format!("the export returned group {group}, not one of the batch's"))
                        })?;
                        // The object this run continues, or a new one (the next group, or the next part of a
                        // group that filled an object).
                        let part = match current.take() {
                            Some(object) if object.idx == group && object.rows < max_rows => {
                                current = Some(object);
                                0
                            }
                            Some(object) => {
                                let next = if object.idx == group { object.part + 1 } else { 0 };
                                send(object)?;
                                next
                            }
                            None => 0,
                        };
                        let object = current.get_or_insert_with(|| Pending::new(group, part));
                        let end = run_end.min(start + (max_rows - object.rows));
                        object.rows += end - start;
                        object.batches.push(values.slice(start, end - start));
                        start = end;
                    }
                }
                current.map_or(Ok(()), send)
            })();
            drop(to_writers);
            let written: Vec<Result<Vec<GroupFile>, ColdError>> = handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(ColdError::Io("a cold writer thread panicked".into()))))
                .collect();
            (produced, written)
        });
        produced?;
        let mut files = Vec::new();
        for result in written {
            files.extend(result?);
        }
        files.sort_by_key(|f| (f.idx, f.part));
        if moving {
            conn.execute_batch(&format!(
                "CREATE OR REPLACE TEMP TABLE {MOVING} \
                 (idx INTEGER, system_id VARCHAR, id VARCHAR, ts TIMESTAMP, ingested_at TIMESTAMP)"
            ))?;
            let mut appender = conn.appender_to_catalog_and_db(MOVING, "temp", "main")?;
            for batch in keys {
                appender.append_record_batch(batch)?;
            }
            appender.flush()?;
        }
        Ok(files)
    }

    /// Deletes objects `parallel_fetches` at a time (a missing one counts as deleted) and returns those that could
    /// not be deleted, within `budget` if one is given, with the reason.
    fn delete_objects(&self, keys: &[String], budget: Option<Duration>) -> Vec<(String, String)> {
        use futures_util::StreamExt;
        let deadline = budget.map(|b| tokio::time::Instant::now() + b);
        let delete = |key: String| async move {
            let path = self.location.join(&key);
            let delete = self.location.store.delete(&path);
            let outcome = match deadline {
                Some(at) => tokio::time::timeout_at(at, delete).await.unwrap_or_else(|_| {
                    Err(object_store::Error::Generic { store: "cold", source: "timed out".into() })
                }),
                None => delete.await,
            };
            match outcome {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => None,
                Err(e) => Some((key, e.to_string())),
            }
        };
        self.block_on(
            futures_util::stream::iter(keys.iter().cloned().map(delete))
                .buffer_unordered(self.config.parallel_fetches.max(1))
                .filter_map(std::future::ready)
                .collect(),
        )
    }

    /// Uploads `(object, key)` pairs several at a time, each verified.
    ///
    /// The first failure ends the batch (the rest would likely meet the same store): uploads not started yet are
    /// skipped, but those in flight are waited for — a dropped request can still land after the caller has
    /// deleted the batch's keys, and would leave an object nothing names until the next sweep.
    fn upload_all<'a>(&self, uploads: impl Iterator<Item = (&'a Stored, &'a str)>) -> Result<(), ColdError> {
        use futures_util::StreamExt;
        self.check_breaker()?;
        let failed = std::sync::atomic::AtomicBool::new(false);
        let outcome = self.block_on(async {
            let failed = &failed;
            let mut uploads = futures_util::stream::iter(uploads.map(|(stored, key)| async move {
                if failed.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let result = self.upload_one(stored, key).await;
                if result.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                result
            }))
            .buffer_unordered(self.config.parallel_fetches.max(1));
            let mut first_error = None;
            while let Some(result) = uploads.next().await {
                if let Err(e) = result {
                    first_error.get_or_insert(e);
                }
            }
            first_error.map_or(Ok(()), Err)
        });
        // One attempt for the breaker, however many objects it carried.
        self.record(outcome)
    }

    /// Merges the objects of each kind, system and day that has more than one into one (newest version per key),
    /// then deletes objects the catalog does not name.
    pub fn compact(&self) -> Result<CompactionReport, ColdError> {
        self.check_breaker()?;
        let conn = self.mover.lock().unwrap_or_else(|p| p.into_inner());
        let mut report = CompactionReport::default();
        let groups: Vec<(String, String, String)> = {
            // A group that fills several objects (`OBJECT_MAX_ROWS`) is left alone once they are full.
            let mut stmt = conn.prepare(&format!(
                "SELECT kind, system_id, strftime(day, '%Y-%m-%d') FROM warm.cold_objects GROUP BY ALL \
                 HAVING count(*) > 1 AND count(*) > ceil(sum(rows) / {}) ORDER BY 3, 1, 2",
                self.object_max_rows.load(Ordering::Relaxed).max(1)
            ))?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect::<Result<_, _>>()?
        };
        for (kind, system_id, day) in groups {
            report.objects_replaced += self.record(self.compact_group(&conn, &kind, &system_id, &day))?;
            report.groups += 1;
        }
        (report.erased_groups, report.tombstones_retired) = self.apply_tombstones(&conn)?;
        report.orphans_deleted = self.record(self.sweep_orphans(&conn))?;
        if report.groups > 0 || report.orphans_deleted > 0 {
            info!(
                message = "Cold tier compacted.",
                groups = report.groups,
                objects_replaced = report.objects_replaced,
                orphans_deleted = report.orphans_deleted
            );
        }
        Ok(report)
    }

    fn compact_group(&self, conn: &Connection, kind: &str, system_id: &str, day: &str) -> Result<u64, ColdError> {
        let int8 = self.config.embedding_encoding == EmbeddingEncoding::Int8;
        let objects = self.group_objects(conn, kind, system_id, day)?;
        let lease = self.lease(&objects)?;
        let visible: i64 = conn.query_row(
            &format!("SELECT count(*) FROM {}", visible_source(kind, &lease.paths, lease.int8)),
            [],
            |r| r.get(0),
        )?;
        let days = crate::rollup::days_relation([(system_id, day)]).expect("one day");
        let hourly = |source: Option<String>| match (kind, source) {
            ("metric", Some(source)) => crate::rollup::Rollup::Hour.refresh_sql(&days, &source),
            ("metric", None) => crate::rollup::Rollup::Hour.clear_sql(&days),
            _ => String::new(),
        };
        if visible == 0 {
            // Deletions hid every row: the objects go, nothing replaces them.
            let old: Vec<String> = objects.iter().map(|o| sql_text(&o.key)).collect();
            conn.execute_batch(&format!(
                "BEGIN TRANSACTION;\nDELETE FROM warm.cold_objects WHERE key IN ({});\n{}COMMIT;",
                old.join(", "),
                hourly(None)
            ))
            .inspect_err(|_| {
                let _ = conn.execute_batch("ROLLBACK");
            })?;
            drop(lease);
            for object in &objects {
                self.cache.forget(&object.sha256);
            }
            let keys: Vec<String> = objects.iter().map(|o| o.key.clone()).collect();
            for (key, error) in self.retire_objects(&keys) {
                warn!(message = "Cannot delete an erased cold object yet; the next sweep will.", key = %key, error = %error);
            }
            return Ok(objects.len() as u64);
        }
        let dir = self.cache.tmp_dir().join(new_uuid());
        let mut written: Vec<(String, GroupFile, Stored)> = Vec::new();
        let result = (|| -> Result<u64, ColdError> {
            std::fs::create_dir_all(&dir).map_err(|e| ColdError::Io(format!("{}: {e}", dir.display())))?;
            let rows = format!("(SELECT 0 AS idx, v.* FROM {} v)", newest_visible(kind, &lease.paths, lease.int8));
            for file in self.write_groups(conn, &rows, 1, Some(&dir), false)? {
                let key = self.new_object_key(kind, system_id, day);
                let stored = self.stored_form(&key, &file.written.bytes, &file.written.sha256)?;
                written.push((key, file, stored));
            }
            self.upload_all(written.iter().map(|(key, _, stored)| (stored, key.as_str())))?;
            let catalog: Vec<String> = written
                .iter()
                .map(|(key, file, stored)| {
                    format!(
                        "({}, {}, {}, DATE {}, make_timestamp({}), make_timestamp({}), {}, {}, '{}', now(), {})",
                        sql_text(key),
                        sql_text(kind),
                        sql_text(system_id),
                        sql_text(day),
                        file.written.min_ts,
                        file.written.max_ts,
                        file.written.rows,
                        stored.bytes,
                        stored.sha256,
                        stored.key_columns()
                    )
                })
                .collect();
            let paths: Vec<PathBuf> = written.iter().filter_map(|(_, file, _)| file.path.clone()).collect();
            conn.execute_batch("BEGIN TRANSACTION")?;
            let swapped = (|| -> Result<(), ColdError> {
                conn.execute_batch(&format!("INSERT INTO warm.cold_objects VALUES {};", catalog.join(", ")))?;
                let old: Vec<String> = objects.iter().map(|o| sql_text(&o.key)).collect();
                conn.execute(&format!("DELETE FROM warm.cold_objects WHERE key IN ({})", old.join(", ")), [])?;
                // Compaction applies erasures: the day's hourly buckets follow the rewritten objects.
                let rollups = hourly(Some(parquet_source(&paths, int8)));
                if !rollups.is_empty() {
                    conn.execute_batch(&rollups)?;
                }
                Ok(())
            })();
            match swapped {
                Ok(()) => conn.execute_batch("COMMIT")?,
                Err(e) => {
                    let _ = conn.execute_batch("ROLLBACK");
                    return Err(e);
                }
            }
            for (_, file, stored) in &written {
                if let Some(path) = &file.path {
                    self.cache.adopt(path, &stored.sha256)?;
                }
            }
            Ok(objects.len() as u64)
        })();
        let _ = std::fs::remove_dir_all(&dir);
        drop(lease);
        if result.is_err() && !self.circuit_open() {
            // Uploaded objects the catalog never named: remove them now if the store lets us, else the sweep will.
            let keys: Vec<String> = written.iter().map(|(key, _, _)| key.clone()).collect();
            self.delete_objects(&keys, Some(CLEANUP_BUDGET));
        }
        let replaced = result?;
        for object in &objects {
            self.cache.forget(&object.sha256);
        }
        // A failed delete leaves an orphan for the next sweep.
        let keys: Vec<String> = objects.iter().map(|o| o.key.clone()).collect();
        for (key, error) in self.retire_objects(&keys) {
            warn!(message = "Cannot delete a compacted cold object yet; the next sweep will.", key = %key, error = %error);
        }
        Ok(replaced)
    }

    /// Computes the hourly rollups of up to `max_days` queued cold days (see [`crate::rollup`]), each from its
    /// objects in one transaction with its removal from the queue. Returns the days done.
    pub fn backfill_rollups(&self, max_days: usize) -> Result<u64, ColdError> {
        let conn = self.mover.lock().unwrap_or_else(|p| p.into_inner());
        let queued: Vec<(String, String)> = {
            let mut stmt = conn.prepare(
                "SELECT DISTINCT system_id, strftime(day, '%Y-%m-%d') FROM warm.rollup_backfill ORDER BY 2, 1 LIMIT ?",
            )?;
            stmt.query_map([max_days as i64], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?
        };
        for (system_id, day) in &queued {
            let objects = self.group_objects(&conn, "metric", system_id, day)?;
            let lease = self.lease(&objects)?;
            let days = crate::rollup::days_relation([(system_id.as_str(), day.as_str())]).expect("one day");
            let refresh = if objects.is_empty() {
                crate::rollup::Rollup::Hour.clear_sql(&days)
            } else {
                crate::rollup::Rollup::Hour.refresh_sql(&days, &newest_visible("metric", &lease.paths, lease.int8))
            };
            conn.execute_batch(&format!(
                "BEGIN TRANSACTION;\n{refresh}DELETE FROM warm.rollup_backfill WHERE system_id = {} AND day = DATE {};\nCOMMIT;",
                sql_text(system_id),
                sql_text(day)
            ))
            .inspect_err(|_| {
                let _ = conn.execute_batch("ROLLBACK");
            })?;
        }
        if !queued.is_empty() {
            info!(
                message = "Hourly rollups computed for cold days written before rollups existed.",
                days = queued.len()
            );
        }
        Ok(queued.len() as u64)
    }

    /// Hides what a deletion covers from every cold read at once (see [`crate::erasure`]); compaction rewrites
    /// the objects. One tombstone per kind. Returns the tombstones written.
    pub fn tombstone(
        &self,
        request: u64,
        selector: &crate::erasure::Selector,
        ingested_before_us: i64,
    ) -> Result<u64, ColdError> {
        let conn = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        let text = |v: &Option<String>| v.as_deref().map_or_else(|| "NULL".to_owned(), sql_text);
        // Rows carry `ingested_at` as UTC microseconds, the cutoff hot and warm used too.
        let now = ingested_before_us;
        let rows: Vec<String> = selector
            .kinds()
            .iter()
            .map(|k| {
                format!(
                    "({request}, '{}', {}, {}, {}, make_timestamp({now}))",
                    k.as_str(),
                    text(&selector.system_id),
                    text(&selector.project),
                    text(&selector.id)
                )
            })
            .collect();
        conn.execute_batch(&format!(
            "DELETE FROM warm.cold_tombstones WHERE request = {request};\n\
             INSERT INTO warm.cold_tombstones VALUES {};",
            rows.join(", ")
        ))?;
        Ok(rows.len() as u64)
    }

    /// Tombstones not yet applied to the objects.
    pub fn tombstones(&self) -> Result<u64, ColdError> {
        let conn = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        Ok(conn.query_row("SELECT count(*) FROM warm.cold_tombstones", [], |r| r.get::<_, i64>(0))? as u64)
    }

    /// Rewrites (or drops) the objects holding rows that tombstones hide, then retires those tombstones: the
    /// erased rows are then gone from the store, not just hidden. Returns groups rewritten and tombstones retired.
    fn apply_tombstones(&self, conn: &Connection) -> Result<(u64, u64), ColdError> {
        let (pending, newest): (i64, Option<i64>) =
            conn.query_row("SELECT count(*), epoch_us(max(created_at)) FROM warm.cold_tombstones", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
        let Some(newest) = newest.filter(|_| pending > 0) else { return Ok((0, 0)) };
        let groups: Vec<(String, String, String)> = {
            let mut stmt = conn.prepare(
                "SELECT DISTINCT o.kind, o.system_id, strftime(o.day, '%Y-%m-%d') FROM warm.cold_objects o \
                 JOIN warm.cold_tombstones t ON t.kind = o.kind AND (t.system_id IS NULL OR t.system_id = o.system_id) \
                 ORDER BY 3, 1, 2",
            )?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect::<Result<_, _>>()?
        };
        let mut rewritten = 0;
        for (kind, system_id, day) in groups {
            let objects = self.group_objects(conn, &kind, &system_id, &day)?;
            let hidden = {
                let lease = self.record(self.lease(&objects))?;
                let count = |source: String| -> Result<i64, ColdError> {
                    Ok(conn.query_row(&format!("SELECT count(*) FROM {source}"), [], |r| r.get(0))?)
                };
                count(parquet_source(&lease.paths, lease.int8))?
                    - count(visible_source(&kind, &lease.paths, lease.int8))?
            };
            if hidden > 0 {
                self.record(self.compact_group(conn, &kind, &system_id, &day))?;
                rewritten += 1;
            }
        }
        let retired =
            conn.execute("DELETE FROM warm.cold_tombstones WHERE created_at <= make_timestamp(?)", [newest])? as u64;
        if rewritten > 0 || retired > 0 {
            info!(message = "Erased rows from cold objects.", groups = rewritten, tombstones = retired);
        }
        Ok((rewritten, retired))
    }

    /// Deletes every object under the prefix that the catalog does not name (moves are not running: the caller
    /// holds the mover).
    fn sweep_orphans(&self, conn: &Connection) -> Result<u64, ColdError> {
        if self.pins.load(Ordering::SeqCst) > 0 {
            return Ok(0);
        }
        let listed = self.list_keys()?;
        let known: std::collections::HashSet<String> = {
            let mut stmt = conn.prepare("SELECT key FROM warm.cold_objects")?;
            stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?
        };
        let orphans: Vec<String> = listed.into_iter().filter(|k| !known.contains(k)).collect();
        if let Some((key, error)) = self.delete_objects(&orphans, None).into_iter().next() {
            return Err(ColdError::Store(format!("DELETE {key}: {error}")));
        }
        for key in &orphans {
            info!(message = "Deleted an orphan cold object.", key = %key);
        }
        Ok(orphans.len() as u64)
    }

    /// Every object key under the prefix (relative to it).
    pub fn list_keys(&self) -> Result<Vec<String>, ColdError> {
        use futures_util::TryStreamExt;
        let prefix = self.location.prefix.clone();
        let listed: Vec<object_store::ObjectMeta> = self
            .block_on(
                self.location.store.list(if prefix.as_ref().is_empty() { None } else { Some(&prefix) }).try_collect(),
            )
            .map_err(|e| ColdError::Store(format!("LIST: {e}")))?;
        let strip = if prefix.as_ref().is_empty() { String::new() } else { format!("{}/", prefix.as_ref()) };
        Ok(listed
            .into_iter()
            .map(|m| m.location.as_ref().strip_prefix(&strip).unwrap_or(m.location.as_ref()).to_owned())
            .collect())
    }

    /// Catalog rows matching a SQL condition (built by this module only).
    /// The catalogued objects of one kind, system and day.
    fn group_objects(
        &self,
        conn: &Connection,
        kind: &str,
        system_id: &str,
        day: &str,
    ) -> Result<Vec<ColdObject>, ColdError> {
        let condition = format!(
            "kind = {} AND system_id = {} AND day = DATE {}",
            sql_text(kind),
            sql_text(system_id),
            sql_text(day)
        );
        self.catalog_where(conn, &condition)
    }

    fn catalog_where(&self, conn: &Connection, condition: &str) -> Result<Vec<ColdObject>, ColdError> {
        let mut stmt = conn.prepare(&format!(
            "SELECT key, kind, system_id, strftime(day, '%Y-%m-%d'), epoch_us(min_ts), epoch_us(max_ts), rows, bytes, sha256, \
             kek_id, wrapped_dek FROM warm.cold_objects WHERE {condition} ORDER BY day, key"
        ))?;
        let rows = stmt.query_map([], |r| {
            Ok(ColdObject {
                key: r.get(0)?,
                kind: r.get(1)?,
                system_id: r.get(2)?,
                day: r.get(3)?,
                min_ts: r.get(4)?,
                max_ts: r.get(5)?,
                rows: r.get::<_, i64>(6)? as u64,
                bytes: r.get::<_, i64>(7)? as u64,
                sha256: r.get(8)?,
                sealed: match (r.get::<_, Option<String>>(9)?, r.get::<_, Option<String>>(10)?) {
                    (Some(kek_id), Some(wrapped)) => Some(crate::envelope::WrappedKey { kek_id, wrapped }),
                    _ => None,
                },
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The catalogued objects of `kind` that may hold rows of `systems` (all when empty) in `[since, until)`.
    pub fn objects(
        &self,
        kind: RecordKind,
        systems: &[String],
        since_us: Option<i64>,
        until_us: Option<i64>,
    ) -> Result<Vec<ColdObject>, ColdError> {
        let mut condition = format!("kind = {}", sql_text(kind.as_str()));
        if !systems.is_empty() {
            let list: Vec<String> = systems.iter().map(|s| sql_text(s)).collect();
            condition.push_str(&format!(" AND system_id IN ({})", list.join(", ")));
        }
        if let Some(since) = since_us {
            condition.push_str(&format!(" AND max_ts >= make_timestamp({since})"));
        }
        if let Some(until) = until_us {
            condition.push_str(&format!(" AND min_ts < make_timestamp({until})"));
        }
        let conn = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        self.catalog_where(&conn, &condition)
    }

    /// Catalogued objects per key-encryption key, `None` for objects stored in the clear.
    pub fn key_usage(&self) -> Result<Vec<(Option<String>, u64)>, ColdError> {
        let conn = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        let mut stmt =
            conn.prepare("SELECT kek_id, count(*) FROM warm.cold_objects GROUP BY kek_id ORDER BY kek_id NULLS FIRST")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Re-wraps every data key that the active key-encryption key does not wrap (after a rotation), in the
    /// catalog only: objects are not read or rewritten. Returns how many were re-wrapped.
    pub fn rewrap_keys(&self) -> Result<u64, ColdError> {
        let Some(keyring) = &self.config.encryption else {
            return Ok(0);
        };
        let conn = self.mover.lock().unwrap_or_else(|p| p.into_inner());
        let stale: Vec<(String, String, String)> = {
            let mut stmt = conn.prepare(
                "SELECT key, kek_id, wrapped_dek FROM warm.cold_objects WHERE kek_id IS NOT NULL AND kek_id <> ?",
            )?;
            stmt.query_map([keyring.active_id()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()?
        };
        let mut rewrapped = Vec::with_capacity(stale.len());
        let mut failed: Option<(ColdError, usize)> = None;
        for (key, kek_id, wrapped) in stale {
            let old = crate::envelope::WrappedKey { kek_id, wrapped };
            match keyring.rewrap(&old) {
                Ok(Some(new)) => rewrapped.push(format!(
                    "({}, {}, {})",
                    sql_text(&key),
                    sql_text(&new.kek_id),
                    sql_text(&new.wrapped)
                )),
                Ok(None) => {}
                // One object whose key cannot be unwrapped (its KEK was removed too early) must not keep the
                // others under the old key: re-wrap what can be, then report the first failure and the count.
                Err(error) => match &mut failed {
                    Some((_, n)) => *n += 1,
                    None => failed = Some((ColdError::Sealed { key, error }, 1)),
                },
            }
        }
        let outcome = |rewrapped: usize| match failed {
            None => Ok(rewrapped as u64),
            Some((first, n)) => {
                warn!(message = "Cold data keys left under a key that cannot unwrap them.", objects = n, rewrapped, error = %first);
                Err(first)
            }
        };
        if rewrapped.is_empty() {
            return outcome(0);
        }
        conn.execute_batch("BEGIN TRANSACTION")?;
        let updated = rewrapped.chunks(1000).try_for_each(|chunk| {
            conn.execute_batch(&format!(
                "UPDATE warm.cold_objects SET kek_id = v.kek_id, wrapped_dek = v.wrapped \
                 FROM (VALUES {}) v(key, kek_id, wrapped) WHERE cold_objects.key = v.key;",
                chunk.join(", ")
            ))
        });
        match updated {
            Ok(()) => conn.execute_batch("COMMIT")?,
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e.into());
            }
        }
        info!(
            message = "Re-wrapped cold data keys with the active key.",
            objects = rewrapped.len(),
            kek_id = keyring.active_id()
        );
        outcome(rewrapped.len())
    }

    /// Every catalogued object.
    pub fn catalog(&self) -> Result<Vec<ColdObject>, ColdError> {
        let conn = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        self.catalog_where(&conn, "TRUE")
    }

    /// Makes `objects` local and pins them.
    pub fn lease(&self, objects: &[ColdObject]) -> Result<Lease, ColdError> {
        self.check_breaker()?;
        let wanted: Vec<Wanted> = objects
            .iter()
            .map(|o| Wanted { key: o.key.clone(), sha256: o.sha256.clone(), bytes: o.bytes, sealed: o.sealed.clone() })
            .collect();
        let cache = self.cache.clone();
        let result = self.block_on(cache.lease(&self.location, &wanted, self.config.parallel_fetches));
        let mut lease = self.record(result)?;
        lease.int8 = objects.iter().any(ColdObject::int8);
        Ok(lease)
    }

    /// The journal's latest rows, newest first.
    pub fn journal_tail(&self, limit: usize) -> Result<Vec<serde_json::Value>, ColdError> {
        let conn = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        let mut stmt = conn.prepare(
            "SELECT id, kind, system_id, strftime(day, '%Y-%m-%d'), object_key, state, records, epoch_us(started_at), \
             epoch_us(finished_at), detail FROM warm.cold_moves ORDER BY started_at DESC, id DESC LIMIT ?",
        )?;
        let rows = stmt.query_map([limit as i64], |r| {
            Ok(serde_json::json!({
                "id": r.get::<_, i64>(0)?, "kind": r.get::<_, String>(1)?, "system_id": r.get::<_, String>(2)?,
                "day": r.get::<_, String>(3)?, "object": r.get::<_, Option<String>>(4)?, "state": r.get::<_, String>(5)?,
                "records": r.get::<_, Option<i64>>(6)?, "started_at": r.get::<_, Option<i64>>(7)?,
                "finished_at": r.get::<_, Option<i64>>(8)?, "detail": r.get::<_, Option<String>>(9)?,
            }))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Catalogued rows per system and kind.
    pub fn counts(&self) -> Result<Vec<(String, &'static str, u64)>, ColdError> {
        let conn = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        let mut stmt = conn
            .prepare("SELECT system_id, kind, sum(rows)::BIGINT FROM warm.cold_objects GROUP BY ALL ORDER BY 1, 2")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (system, kind, n) = row?;
            if let Ok(kind) = kind.parse::<RecordKind>() {
                out.push((system, kind.as_str(), n as u64));
            }
        }
        Ok(out)
    }

    /// Objects, rows and bytes in the catalog.
    pub fn totals(&self) -> Result<(u64, u64, u64), ColdError> {
        let conn = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        Ok(conn.query_row(
            "SELECT count(*), coalesce(sum(rows), 0)::BIGINT, coalesce(sum(bytes), 0)::BIGINT FROM warm.cold_objects",
            [],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64)),
        )?)
    }
}

impl ColdTier {
    /// Runs a scan of local cold files on the tier's own connection (hot and warm queries are not held up).
    pub fn scan<T>(&self, f: impl FnOnce(&Connection) -> Result<T, ColdError>) -> Result<T, ColdError> {
        let conn = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use akosha_protocol::{EMBEDDING_DIM, Record};

    use super::*;
    use crate::hot::HotTier;
    use crate::listing::ListQuery;
    use crate::query::QueryService;
    use crate::search::Filters;
    use crate::warm::WarmConfig;

    const DAY: i64 = 86_400_000_000;

    fn record(i: u64, ts: i64) -> Record {
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
            project: Some(format!("p{}", i % 2)),
            text: Some(format!("record {i} mentions topic{} and more words", i % 7)),
            tags: vec![format!("t{}", i % 4)],
            embedding: Some(embedding),
            ..Record::default()
        }
    }

    fn cold_config(dir: &Path) -> ColdConfig {
        ColdConfig {
            enabled: true,
            url: dir.join("bucket").display().to_string(),
            options: Vec::new(),
            warm_window: Duration::from_secs(90 * 86_400),
            move_interval: Duration::from_secs(60),
            cache_dir: dir.join("cache"),
            cache_max_bytes: 1 << 30,
            row_group_rows: 10_000,
            embedding_encoding: EmbeddingEncoding::F32,
            parallel_fetches: 4,
            breaker_failures: 3,
            breaker_cooldown: Duration::from_secs(30),
            retry_timeout: Duration::from_secs(5),
            promotion: Default::default(),
            encryption: None,
            warm_window_per_kind: Default::default(),
            schedule: None,
            cache_on_write: false,
        }
    }

    /// A hot tier with a warm file in `dir`.
    fn with_warm(dir: &Path) -> Arc<HotTier> {
        let hot = Arc::new(HotTier::open("512MB", 1, None).unwrap());
        hot.attach_warm(WarmConfig {
            enabled: true,
            path: dir.join("warm.duckdb"),
            hot_window: Duration::from_secs(7 * 86_400),
            move_interval: Duration::from_secs(60),
            hot_window_per_kind: Default::default(),
            schedule: None,
        })
        .unwrap();
        hot
    }

    fn open(dir: &Path, tiers: bool) -> Arc<HotTier> {
        open_sealed(dir, tiers, None)
    }

    fn open_sealed(dir: &Path, tiers: bool, keyring: Option<crate::envelope::Keyring>) -> Arc<HotTier> {
        if !tiers {
            return Arc::new(HotTier::open("512MB", 1, None).unwrap());
        }
        let hot = with_warm(dir);
        hot.attach_cold(ColdConfig { encryption: keyring.map(Arc::new), ..cold_config(dir) }).unwrap();
        hot
    }

    /// The answers the tests compare: ids of a vector search, a text search, a listing and a filtered listing.
    fn answers(hot: &Arc<HotTier>, probe: &[f32], now: i64) -> Vec<Vec<String>> {
        let service = QueryService::new(hot.clone(), None);
        let ids = |hits: Vec<crate::query::Hit>| -> Vec<String> {
            hits.iter().map(|h| h.record["id"].as_str().unwrap().to_owned()).collect()
        };
        let sorted = |mut v: Vec<String>| {
            v.sort();
            v
        };
        let vector = ids(service.vector(probe, 10, &Filters::default()).unwrap());
        let text = sorted(ids(service.text("topic3", 1000, &Filters::default()).unwrap()));
        let filtered = Filters {
            system_ids: vec!["s1".into()],
            tags: vec!["t1".into()],
            since_us: Some(now - 200 * DAY),
            ..Filters::default()
        };
        let vector_filtered = ids(service.vector(probe, 5, &filtered).unwrap());
        let mut listed = Vec::new();
        for kind in [RecordKind::Conversation, RecordKind::Reflection] {
            let q = ListQuery { kind, limit: 1000, since_us: Some(now - 300 * DAY), ..ListQuery::default() };
            listed.extend(service.list(&q).unwrap().records.iter().map(|r| r["id"].as_str().unwrap().to_owned()));
        }
        vec![vector, text, vector_filtered, listed]
    }

    #[test]
    fn records_move_through_every_tier_and_queries_give_the_same_answers() {
        let dir = tempfile::tempdir().unwrap();
        let now = jiff::Timestamp::now().as_microsecond();
        // 400 records, one every day for 400 days.
        let records: Vec<Record> = (0..400).map(|i| record(i, now - i as i64 * DAY - 1000)).collect();
        let probe = records[250].embedding.clone().unwrap();

        let reference = open(dir.path(), false);
        reference.insert(&records).unwrap();
        assert!(reference.wait_indexed(Duration::from_secs(30)));
        let expected = answers(&reference, &probe, now);
        assert_eq!(expected[0][0], "r250");

        let hot = open(dir.path(), true);
        hot.insert(&records).unwrap();
        assert!(hot.wait_indexed(Duration::from_secs(30)));
        hot.move_to_warm(now - 7 * DAY).unwrap().unwrap();
        let report = hot.move_to_cold(now - 90 * DAY).unwrap().unwrap();
        assert_eq!(report.records, 310, "days 90..399");
        let cold = hot.cold().unwrap();
        let (objects, rows, _) = cold.totals().unwrap();
        assert_eq!((objects, rows), (310, 310), "one object per kind, system and day");
        // A local directory's ETags are not MD5s: every upload was read back.
        assert_eq!(
            (cold.uploads_verified_by_etag.load(Ordering::Relaxed), cold.uploads_read_back.load(Ordering::Relaxed)),
            (0, 310)
        );
        let in_hot: u64 = hot.counts().unwrap().iter().map(|c| c.records).sum();
        let in_warm =
            hot.read(|c| Ok(crate::warm::WarmTier::counts(c)?.iter().map(|(_, _, n)| n).sum::<u64>())).unwrap();
        assert_eq!((in_hot, in_warm), (7, 83));
        let key = cold.catalog().unwrap()[0].key.clone();
        assert!(
            key.starts_with("kind=")
                && key.contains("/system=s")
                && key.contains("/date=")
                && key.ends_with(".parquet"),
            "{key}"
        );
        assert_eq!(answers(&hot, &probe, now), expected, "the same answers from three tiers");

        let service = QueryService::new(hot.clone(), None);
        let r = service.get("s1", RecordKind::Reflection, "r391").unwrap().unwrap();
        assert_eq!((r["tier"].as_str(), r["embedding"].as_array().map(Vec::len)), (Some("cold"), Some(EMBEDDING_DIM)));

        // A newer version of a cold record arrives: hot shows it, and after it too goes cold, compaction keeps
        // only it.
        let mut updated = records[391].clone();
        updated.text = Some("updated text about topic3".into());
        updated.ts += 1;
        hot.insert(std::slice::from_ref(&updated)).unwrap();
        assert!(hot.wait_indexed(Duration::from_secs(30)));
        assert_eq!(service.get("s1", RecordKind::Reflection, "r391").unwrap().unwrap()["tier"], "hot");
        hot.move_to_warm(now - 7 * DAY).unwrap();
        hot.move_to_cold(now - 90 * DAY).unwrap().unwrap();
        assert_eq!(cold.totals().unwrap().0, 311);
        // An object nobody registered (a crash between upload and catalog).
        cold.block_on(cold.location.store.put(
            &cold.location.join("kind=entity/system=x/date=2020-01-01/part-orphan.parquet"),
            bytes::Bytes::from_static(b"x").into(),
        ))
        .unwrap();
        let compacted = cold.compact().unwrap();
        assert_eq!((compacted.groups, compacted.objects_replaced, compacted.orphans_deleted), (1, 2, 1));
        let catalog: BTreeSet<String> = cold.catalog().unwrap().into_iter().map(|o| o.key).collect();
        let listed: BTreeSet<String> = cold.list_keys().unwrap().into_iter().collect();
        assert_eq!(catalog, listed, "the catalog matches the bucket exactly");
        assert_eq!(cold.totals().unwrap().1, 310, "one version per key");
        let r = service.get("s1", RecordKind::Reflection, "r391").unwrap().unwrap();
        assert_eq!((r["tier"].as_str(), r["text"].as_str()), (Some("cold"), Some("updated text about topic3")));
        let text = service.text("updated", 10, &Filters::default()).unwrap();
        assert_eq!(text.len(), 1);
        assert_eq!(text[0].snippet.as_ref().unwrap().html, "<b>updated</b> text about topic3");

        // A cold cache emptied: objects come back from the store, verified.
        drop(service);
        drop(hot);
        std::thread::sleep(Duration::from_millis(200));
        std::fs::remove_dir_all(dir.path().join("cache")).unwrap();
        let hot = open(dir.path(), true);
        hot.insert(&records[..7]).unwrap();
        assert!(hot.wait_indexed(Duration::from_secs(30)));
        // The only change since `expected`: r391 now mentions topic3.
        let mut expected_after = expected.clone();
        expected_after[1].push("r391".into());
        expected_after[1].sort();
        assert_eq!(answers(&hot, &probe, now), expected_after);
        assert!(hot.cold().unwrap().cache().fetched.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn batches_are_even_and_bounded_by_groups_and_rows() {
        let groups = |n: usize, rows: u64| -> Vec<Group> {
            (0..n).map(|i| Group { system_id: format!("s{i}"), day: "2020-01-01".into(), rows }).collect()
        };
        let sizes = |g: &[Group]| batches(g).iter().map(|b| b.len()).collect::<Vec<_>>();
        assert_eq!(sizes(&groups(90, 10)), [30, 30, 30]);
        assert_eq!(sizes(&groups(64, 10)), [32, 32]);
        assert_eq!(sizes(&groups(33, 10)), [17, 16]);
        assert_eq!(sizes(&groups(5, 10)), [5]);
        assert!(sizes(&groups(0, 10)).is_empty());
        // Rows bound a batch too; a group larger than the bound is a batch of its own.
        assert_eq!(sizes(&groups(4, ROWS_PER_BATCH / 2)), [2, 2]);
        assert_eq!(sizes(&groups(2, ROWS_PER_BATCH * 3)), [1, 1]);
    }

    #[test]
    fn a_batch_that_fails_mid_move_stops_the_pipeline_and_leaves_nothing_half_done() {
        let dir = tempfile::tempdir().unwrap();
        let now = jiff::Timestamp::now().as_microsecond();
        let first_day = (now / DAY - 220) * DAY;
        // 120 days of one reflection each (system s0): four batches of 30 groups, oldest first.
        let records: Vec<Record> = (0..120).map(|n| record(6 * n + 3, first_day + n as i64 * DAY)).collect();
        let hot = open(dir.path(), true);
        hot.insert(&records).unwrap();
        assert!(hot.wait_indexed(Duration::from_secs(30)));
        hot.move_to_warm(now - 7 * DAY).unwrap().unwrap();
        let cold = hot.cold().unwrap();
        // A file where the 76th day's directory would go: that upload fails, in the third batch.
        let day = jiff::Timestamp::from_microsecond(first_day + 75 * DAY).unwrap().strftime("%Y-%m-%d").to_string();
        let blocker = dir.path().join(format!("bucket/kind=reflection/system=s0/date={day}"));
        std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
        std::fs::write(&blocker, b"in the way").unwrap();

        assert!(hot.move_to_cold(now - 90 * DAY).is_err());
        let parquet_keys = |cold: &ColdTier| -> BTreeSet<String> {
            cold.list_keys().unwrap().into_iter().filter(|k| k.ends_with(".parquet")).collect()
        };
        let catalog: BTreeSet<String> = cold.catalog().unwrap().into_iter().map(|o| o.key).collect();
        assert_eq!(catalog.len(), 60, "the two batches before the failure are registered, nothing after it");
        assert_eq!(parquet_keys(cold), catalog, "the failed and the stopped batches' uploads are gone again");
        let in_warm =
            hot.read(|c| Ok(crate::warm::WarmTier::counts(c)?.iter().map(|(_, _, n)| n).sum::<u64>())).unwrap();
        assert_eq!(in_warm, 60, "warm keeps every row that is not cold");
        let failed: i64 = hot
            .read(|c| Ok(c.query_row("SELECT count(*) FROM warm.cold_moves WHERE state = 'failed'", [], |r| r.get(0))?))
            .unwrap();
        assert!(failed >= 30, "the failed batch's objects are journaled as failed: {failed}");

        std::fs::remove_file(&blocker).unwrap();
        assert_eq!(hot.move_to_cold(now - 90 * DAY).unwrap().unwrap().records, 60);
        let catalog: BTreeSet<String> = cold.catalog().unwrap().into_iter().map(|o| o.key).collect();
        assert_eq!((catalog.len(), parquet_keys(cold)), (120, catalog.clone()));
        let service = QueryService::new(hot.clone(), None);
        let listed = service.list(&ListQuery { kind: RecordKind::Reflection, limit: 1000, ..ListQuery::default() });
        assert_eq!(listed.unwrap().records.len(), 120, "every record once");
    }

    #[test]
    fn a_large_day_becomes_several_full_objects_that_compaction_leaves_alone() {
        let dir = tempfile::tempdir().unwrap();
        let now = jiff::Timestamp::now().as_microsecond();
        let day = (now / DAY - 200) * DAY;
        // 30 reflections of one system on one day (i = 3, 9, 15, …: odd and ≡ 0 mod 3).
        let records: Vec<Record> = (0..30).map(|n| record(6 * n + 3, day + n as i64 * 1_000_000)).collect();
        let hot = open(dir.path(), true);
        let cold = hot.cold().unwrap();
        cold.object_max_rows.store(8, Ordering::Relaxed);
        // Scrambled (7 is prime to 30), in two inserts: nothing upstream hands the move its rows in time order.
        let scrambled: Vec<Record> = (0..30).map(|n| records[n * 7 % 30].clone()).collect();
        for part in scrambled.chunks(15) {
            hot.insert(part).unwrap();
        }
        assert!(hot.wait_indexed(Duration::from_secs(30)));
        hot.move_to_warm(now - 7 * DAY).unwrap().unwrap();
        assert_eq!(hot.move_to_cold(now - 90 * DAY).unwrap().unwrap().records, 30);
        let mut catalog = cold.catalog().unwrap();
        catalog.sort_by_key(|o| o.min_ts);
        let rows: Vec<u64> = catalog.iter().map(|o| o.rows).collect();
        assert_eq!(rows, [8, 8, 8, 6], "objects of at most 8 rows, in time order");
        assert!(catalog.windows(2).all(|w| w[0].max_ts < w[1].min_ts), "each object holds its own stretch of the day");
        let base = crate::objects::local_dir(&cold.location().url).unwrap();
        for object in &catalog {
            use arrow::array::AsArray;
            let file = std::fs::File::open(base.join(&object.key)).unwrap();
            let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
            let ts: Vec<i64> = reader
                .build()
                .unwrap()
                .flat_map(|b| {
                    let b = b.unwrap();
                    let ts = b.column_by_name("ts").unwrap();
                    ts.as_primitive::<arrow::datatypes::TimestampMicrosecondType>().values().to_vec()
                })
                .collect();
            assert!(ts.is_sorted() && ts.len() as u64 == object.rows, "{}: {ts:?}", object.key);
        }
        assert_eq!(cold.compact().unwrap().groups, 0, "full objects are not merged again");

        // A newer version of one record adds a fifth, small object: compaction merges the day back into four.
        let mut updated = records[4].clone();
        updated.ts += 1;
        updated.text = Some("a later version".into());
        hot.insert(std::slice::from_ref(&updated)).unwrap();
        assert!(hot.wait_indexed(Duration::from_secs(30)));
        hot.move_to_warm(now - 7 * DAY).unwrap().unwrap();
        hot.move_to_cold(now - 90 * DAY).unwrap().unwrap();
        assert_eq!(cold.totals().unwrap().0, 5);
        let compacted = cold.compact().unwrap();
        assert_eq!((compacted.groups, compacted.objects_replaced), (1, 5));
        let (objects, rows, _) = cold.totals().unwrap();
        assert_eq!((objects, rows), (4, 30), "one version per key, in full objects");
        let service = QueryService::new(hot.clone(), None);
        let r = service.get("s0", RecordKind::Reflection, &updated.id).unwrap().unwrap();
        assert_eq!((r["tier"].as_str(), r["text"].as_str()), (Some("cold"), Some("a later version")));
        let catalog: BTreeSet<String> = cold.catalog().unwrap().into_iter().map(|o| o.key).collect();
        let listed: BTreeSet<String> = cold.list_keys().unwrap().into_iter().collect();
        assert_eq!(catalog, listed, "the catalog matches the bucket exactly");
    }

    #[test]
    fn moved_objects_enter_the_cache_only_when_configured_to() {
        let now = jiff::Timestamp::now().as_microsecond();
        let records: Vec<Record> = (0..12).map(|i| record(i, now - (100 + i as i64) * DAY)).collect();
        for cache_on_write in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let hot = with_warm(dir.path());
            hot.attach_cold(ColdConfig { cache_on_write, ..cold_config(dir.path()) }).unwrap();
            let cold = hot.cold().unwrap();
            hot.insert(&records).unwrap();
            assert!(hot.wait_indexed(Duration::from_secs(30)));
            hot.move_to_warm(now - 7 * DAY).unwrap().unwrap();
            let report = hot.move_to_cold(now - 90 * DAY).unwrap().unwrap();
            assert_eq!(report.records, 12);
            let stored: u64 = cold.catalog().unwrap().iter().map(|o| o.bytes).sum();
            let cached = cold.cache().size_bytes();
            assert_eq!(cached, if cache_on_write { stored } else { 0 }, "cache_on_write = {cache_on_write}");
            let tmp = std::fs::read_dir(cold.cache().tmp_dir()).map_or(0, |d| d.count());
            assert_eq!(tmp, 0, "no staging files are left behind");
            // Either way the first query reads every record.
            let service = QueryService::new(hot.clone(), None);
            for r in &records {
                let found = service.get(&r.system_id, r.kind, &r.id).unwrap().unwrap();
                assert_eq!(found["tier"].as_str(), Some("cold"));
            }
            assert_eq!(cold.cache().size_bytes(), stored, "the query filled the cache");
        }
    }

    #[test]
    fn a_version_replaced_in_warm_during_a_move_stays_in_warm_and_in_its_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let now = jiff::Timestamp::now().as_microsecond();
        let records: Vec<Record> = (0..12).map(|i| record(i, now - (100 + i as i64) * DAY)).collect();
        let hot = open(dir.path(), true);
        let cold = hot.cold().unwrap();
        hot.insert(&records).unwrap();
        assert!(hot.wait_indexed(Duration::from_secs(30)));
        hot.move_to_warm(now - 7 * DAY).unwrap().unwrap();
        // Between export and registration a newer version of one exported record reaches warm (what a hot→warm
        // move meanwhile does): the delete misses it, so the move must name the deleted versions exactly.
        let replaced = &records[3];
        *cold.before_register.lock().unwrap() = Some(format!(
            "UPDATE warm.{} SET ts = ts + INTERVAL 1 SECOND, text = 'a newer version' \
             WHERE system_id = '{}' AND id = '{}'",
            replaced.kind.as_str(),
            replaced.system_id,
            replaced.id
        ));
        hot.move_to_cold(now - 90 * DAY).unwrap().unwrap();
        assert!(cold.before_register.lock().unwrap().is_none(), "the hook ran");
        let in_warm =
            hot.read(|c| Ok(crate::warm::WarmTier::counts(c)?.iter().map(|(_, _, n)| n).sum::<u64>())).unwrap();
        assert_eq!(in_warm, 1, "only the newer version is left in warm");
        let service = QueryService::new(hot.clone(), None);
        let r = service.get(&replaced.system_id, replaced.kind, &replaced.id).unwrap().unwrap();
        assert_eq!((r["tier"].as_str(), r["text"].as_str()), (Some("warm"), Some("a newer version")));
        // Its key is still in the warm indexes (and only its key), and searches find it there once.
        assert_eq!(hot.warm().unwrap().indexes().sizes(), (1, 1));
        let hits = service.vector(replaced.embedding.as_ref().unwrap(), 3, &Filters::default()).unwrap();
        assert_eq!(hits[0].record["id"].as_str(), Some(replaced.id.as_str()));
        assert_eq!(hits[0].record["tier"].as_str(), Some("warm"));
        assert_eq!(hits.iter().filter(|h| h.record["id"] == hits[0].record["id"]).count(), 1);
        // Every other record is cold and found by its own vector too.
        for other in records.iter().filter(|r| r.id != replaced.id) {
            let hits = service.vector(other.embedding.as_ref().unwrap(), 1, &Filters::default()).unwrap();
            assert_eq!(hits[0].record["id"].as_str(), Some(other.id.as_str()));
            assert_eq!(hits[0].record["tier"].as_str(), Some("cold"));
        }
    }

    #[test]
    fn an_interrupted_move_leaves_warm_whole_and_no_object_behind() {
        let dir = tempfile::tempdir().unwrap();
        let now = jiff::Timestamp::now().as_microsecond();
        let records: Vec<Record> = (0..20).map(|i| record(i, now - (100 + i as i64) * DAY)).collect();
        let hot = open(dir.path(), true);
        hot.insert(&records).unwrap();
        hot.move_to_warm(now - 7 * DAY).unwrap().unwrap();
        let cold = hot.cold().unwrap().clone();
        // What a crash after the upload leaves: a journal row in `uploading` and its object in the bucket.
        let key = "kind=reflection/system=s1/date=2020-01-01/part-crashed.parquet";
        cold.block_on(cold.location.store.put(&cold.location.join(key), bytes::Bytes::from_static(b"partial").into()))
            .unwrap();
        cold.mover
            .lock()
            .unwrap()
            .execute(
                "INSERT INTO warm.cold_moves VALUES (1, 'reflection', 's1', DATE '2020-01-01', ?, 'uploading', NULL, now(), NULL, NULL)",
                [key],
            )
            .unwrap();
        drop(cold);
        drop(hot);
        std::thread::sleep(Duration::from_millis(200));
        let hot = open(dir.path(), true);
        let cold = hot.cold().unwrap();
        assert_eq!(cold.interrupted, 1);
        assert!(cold.list_keys().unwrap().is_empty(), "the interrupted move's object is gone");
        let in_warm =
            hot.read(|c| Ok(crate::warm::WarmTier::counts(c)?.iter().map(|(_, _, n)| n).sum::<u64>())).unwrap();
        assert_eq!(in_warm, 20);
        assert_eq!(hot.move_to_cold(now - 90 * DAY).unwrap().unwrap().records, 20);
    }

    #[test]
    fn a_store_that_fails_opens_the_breaker_and_warm_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let now = jiff::Timestamp::now().as_microsecond();
        let records: Vec<Record> = (0..6).map(|i| record(i, now - (100 + i as i64) * DAY)).collect();
        let hot = with_warm(dir.path());
        // Nothing listens on port 9: every request fails at once.
        let mut config = cold_config(dir.path());
        config.url = "s3://bucket/prefix".into();
        config.options = vec![
            ("endpoint".into(), "http://127.0.0.1:9".into()),
            ("allow_http".into(), "true".into()),
            ("access_key_id".into(), "k".into()),
            ("secret_access_key".into(), "s".into()),
            ("region".into(), "us-east-1".into()),
        ];
        config.retry_timeout = Duration::from_millis(300);
        config.breaker_failures = 2;
        hot.attach_cold(config).unwrap();
        hot.insert(&records).unwrap();
        hot.move_to_warm(now - 7 * DAY).unwrap().unwrap();
        for _ in 0..2 {
            let err = hot.move_to_cold(now - 90 * DAY).unwrap_err();
            assert!(matches!(err, ColdError::Store(_)), "{err}");
        }
        let err = hot.move_to_cold(now - 90 * DAY).unwrap_err();
        assert!(err.to_string().contains("circuit open"), "{err}");
        let in_warm =
            hot.read(|c| Ok(crate::warm::WarmTier::counts(c)?.iter().map(|(_, _, n)| n).sum::<u64>())).unwrap();
        assert_eq!(in_warm, 6, "nothing left warm without a verified cold copy");
        let journal = hot.cold().unwrap().journal_tail(10).unwrap();
        assert!(journal.iter().all(|j| j["state"] == "failed"), "{journal:?}");
        // Hot and warm queries still answer.
        let service = QueryService::new(hot.clone(), None);
        assert_eq!(service.vector(records[0].embedding.as_ref().unwrap(), 3, &Filters::default()).unwrap().len(), 3);
    }

    fn files_under(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            if entry.path().is_dir() {
                out.extend(files_under(&entry.path()));
            } else {
                out.push(entry.path());
            }
        }
        out
    }

    #[test]
    fn sealed_objects_hold_no_plaintext_answer_the_same_and_survive_a_key_rotation() {
        use crate::envelope::{Keyring, generate_key};
        let dir = tempfile::tempdir().unwrap();
        let now = jiff::Timestamp::now().as_microsecond();
        let records: Vec<Record> = (0..130).map(|i| record(i, now - i as i64 * DAY - 1000)).collect();
        let probe = records[100].embedding.clone().unwrap();
        let reference = open(dir.path(), false);
        reference.insert(&records).unwrap();
        assert!(reference.wait_indexed(Duration::from_secs(30)));
        let expected = answers(&reference, &probe, now);

        let (k1, k2) = (generate_key().unwrap(), generate_key().unwrap());
        let only_k1 = || Keyring::new("k1", &[("k1".into(), k1.clone())]).unwrap();
        let hot = open_sealed(dir.path(), true, Some(only_k1()));
        hot.insert(&records).unwrap();
        assert!(hot.wait_indexed(Duration::from_secs(30)));
        hot.move_to_warm(now - 7 * DAY).unwrap().unwrap();
        assert_eq!(hot.move_to_cold(now - 90 * DAY).unwrap().unwrap().records, 40);
        // A newer version of a cold record goes cold too: compaction writes a merged object, sealed as well.
        let mut updated = records[120].clone();
        updated.text = Some("updated text".into());
        updated.ts += 1;
        hot.insert(std::slice::from_ref(&updated)).unwrap();
        hot.move_to_warm(now - 7 * DAY).unwrap();
        hot.move_to_cold(now - 90 * DAY).unwrap().unwrap();
        assert_eq!(hot.cold().unwrap().compact().unwrap().groups, 1);
        let objects = files_under(&dir.path().join("bucket"));
        assert_eq!(objects.len(), 40);
        for file in &objects {
            let bytes = std::fs::read(file).unwrap();
            assert!(crate::envelope::is_sealed(&bytes), "{} is not sealed", file.display());
            assert!(!bytes.windows(4).any(|w| w == b"PAR1"), "{} shows Parquet", file.display());
            assert!(!bytes.windows(8).any(|w| w == b"mentions"), "{} shows text", file.display());
        }
        let cold = hot.cold().unwrap().clone();
        assert_eq!(cold.key_usage().unwrap(), vec![(Some("k1".to_owned()), 40)]);
        let service = QueryService::new(hot.clone(), None);
        assert_eq!(service.get("s0", RecordKind::Conversation, "r120").unwrap().unwrap()["text"], "updated text");
        drop((service, cold, hot));
        std::thread::sleep(Duration::from_millis(200));

        // Rotation: k2 becomes active; the data keys are re-wrapped and no object changes.
        let before: Vec<Vec<u8>> = objects.iter().map(|f| std::fs::read(f).unwrap()).collect();
        let both = Keyring::new("k2", &[("k1".into(), k1.clone()), ("k2".into(), k2.clone())]).unwrap();
        let hot = open_sealed(dir.path(), true, Some(both));
        let cold = hot.cold().unwrap().clone();
        // One object under a key that is gone does not keep the others under k1; it is reported.
        let first = cold.catalog().unwrap()[0].key.clone();
        let set_kek = |kek: &str| {
            let conn = cold.mover.lock().unwrap();
            conn.execute("UPDATE warm.cold_objects SET kek_id = ? WHERE key = ?", [kek, first.as_str()]).unwrap();
        };
        set_kek("gone");
        let err = cold.rewrap_keys().unwrap_err().to_string();
        assert!(err.contains("`gone`") && err.contains(&first), "{err}");
        assert_eq!(cold.key_usage().unwrap(), vec![(Some("gone".to_owned()), 1), (Some("k2".to_owned()), 39)]);
        set_kek("k1");
        assert_eq!(cold.rewrap_keys().unwrap(), 1);
        assert_eq!(cold.rewrap_keys().unwrap(), 0, "nothing left under k1");
        assert_eq!(cold.key_usage().unwrap(), vec![(Some("k2".to_owned()), 40)]);
        let after: Vec<Vec<u8>> = objects.iter().map(|f| std::fs::read(f).unwrap()).collect();
        assert!(before == after, "rotation rewrote an object");
        drop((cold, hot));
        std::thread::sleep(Duration::from_millis(200));

        // k1 can go: with only k2 and an empty cache, every object is fetched, opened and answers as before.
        std::fs::remove_dir_all(dir.path().join("cache")).unwrap();
        let only_k2 = Keyring::new("k2", &[("k2".into(), k2.clone())]).unwrap();
        let hot = open_sealed(dir.path(), true, Some(only_k2));
        hot.insert(&records[..7]).unwrap();
        assert!(hot.wait_indexed(Duration::from_secs(30)));
        let got = answers(&hot, &probe, now);
        // [1] is a text search whose words r120's update changed.
        for i in [0, 2, 3] {
            assert_eq!(got[i], expected[i], "answer {i} over sealed objects");
        }
        assert!(hot.cold().unwrap().cache().fetched.load(Ordering::Relaxed) > 0);
        drop(hot);
        std::thread::sleep(Duration::from_millis(200));

        // Without k2 the objects cannot be read, and the error says which key is missing.
        std::fs::remove_dir_all(dir.path().join("cache")).unwrap();
        let hot = open_sealed(dir.path(), true, Some(only_k1()));
        let err = QueryService::new(hot.clone(), None).get("s0", RecordKind::Conversation, "r120").unwrap_err();
        assert!(err.to_string().contains("`k2`"), "{err}");
    }

    #[test]
    fn each_kind_leaves_hot_and_warm_after_its_own_window() {
        let dir = tempfile::tempdir().unwrap();
        let now = jiff::Timestamp::now().as_microsecond();
        // One record a day for 40 days; even days are conversations, odd ones reflections.
        let records: Vec<Record> = (0..40).map(|i| record(i, now - i as i64 * DAY - 1000)).collect();
        let hot = open(dir.path(), true);
        hot.insert(&records).unwrap();
        let mut hot_windows = crate::lifecycle::Windows::uniform(Duration::from_secs(7 * 86_400));
        hot_windows.per_kind.insert(RecordKind::Reflection, Duration::from_secs(2 * 86_400));
        let mut warm_windows = crate::lifecycle::Windows::uniform(Duration::from_secs(90 * 86_400));
        warm_windows.per_kind.insert(RecordKind::Conversation, Duration::from_secs(20 * 86_400));
        hot.move_to_warm_by(|k| hot_windows.cutoff(k, now)).unwrap().unwrap();
        hot.move_to_cold_by(|k| warm_windows.cutoff(k, now)).unwrap().unwrap();
        let tier_of = |id: &str, kind| {
            let service = QueryService::new(hot.clone(), None);
            let system = format!("s{}", id[1..].parse::<u64>().unwrap() % 3);
            service.get(&system, kind, id).unwrap().unwrap()["tier"].as_str().unwrap().to_owned()
        };
        // Conversations: hot for 7 days, warm until 20.
        assert_eq!(tier_of("r6", RecordKind::Conversation), "hot");
        assert_eq!(tier_of("r8", RecordKind::Conversation), "warm");
        assert_eq!(tier_of("r18", RecordKind::Conversation), "warm");
        assert_eq!(tier_of("r22", RecordKind::Conversation), "cold");
        // Reflections: hot for 2 days, then warm for the default 90.
        assert_eq!(tier_of("r1", RecordKind::Reflection), "hot");
        assert_eq!(tier_of("r3", RecordKind::Reflection), "warm");
        assert_eq!(tier_of("r39", RecordKind::Reflection), "warm");
    }

    /// Every 10 minutes for 120 days, two systems: `cpu` (with a gap where the value is NaN) and `mem`.
    fn metric_points(now: i64) -> Vec<Record> {
        const TEN_MINUTES: i64 = 600_000_000;
        let mut records = Vec::new();
        for i in 0..(120 * 144) {
            let ts = now - i * TEN_MINUTES - 7_000_000;
            for (s, system) in ["s0", "s1"].iter().enumerate() {
                let value = if i % 1000 == 17 { f64::NAN } else { (i % 97) as f64 * 0.25 + 1000.0 * s as f64 };
                for name in ["cpu", "mem"] {
                    records.push(Record {
                        system_id: (*system).into(),
                        kind: RecordKind::Metric,
                        id: format!("{name}-{i}"),
                        ts,
                        name: Some(name.into()),
                        value: Some(if name == "mem" { 64.0 } else { value }),
                        ..Record::default()
                    });
                }
            }
        }
        records
    }

    /// A point as compared: bucket, mean × 10⁶ rounded, min, max, count.
    type SeriesPoint = (i64, i64, f64, f64, u64);

    /// The series of `cpu` at `resolution` over `[since, until)` for every system, values rounded so that sums
    /// taken in another order compare equal.
    fn series(
        hot: &Arc<HotTier>,
        resolution: crate::timeseries::Resolution,
        since_us: Option<i64>,
        until_us: Option<i64>,
    ) -> Vec<(String, Vec<SeriesPoint>)> {
        let service = QueryService::new(hot.clone(), None);
        let q =
            crate::timeseries::SeriesQuery { name: "cpu".into(), systems: Vec::new(), since_us, until_us, resolution };
        service
            .series(&q)
            .unwrap()
            .into_iter()
            .map(|s| {
                let points = s.points.iter().map(|p| (p.ts, (p.value * 1e6).round() as i64, p.min, p.max, p.count));
                (s.system_id, points.collect())
            })
            .collect()
    }

    #[test]
    fn metric_rollups_answer_like_the_raw_points_across_tiers_erasure_and_promotion() {
        use crate::timeseries::Resolution::{FiveMinutes, Hour};
        const HOUR: i64 = 3_600_000_000;
        let dir = tempfile::tempdir().unwrap();
        // Whole hours, so that the ranges below start on bucket boundaries.
        let now = jiff::Timestamp::now().as_microsecond() / HOUR * HOUR;
        let records = metric_points(now);
        let reference = open(dir.path(), false);
        reference.insert(&records).unwrap();
        let hot = open(dir.path(), true);
        hot.insert(&records).unwrap();
        // Neither cutoff falls on a day boundary: a day is split between hot and warm, and between warm and cold.
        hot.move_to_warm(now - 7 * DAY - 5 * HOUR).unwrap().unwrap();
        hot.move_to_cold(now - 90 * DAY - 5 * HOUR).unwrap().unwrap();
        let cold = hot.cold().unwrap().clone();
        let rollup_rows = |table: &str| -> i64 {
            hot.read(|c| Ok(c.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))?)).unwrap()
        };
        // 83 days of 5-minute buckets (every other bucket has a point), 30 days of hourly ones; 2 systems, 2 names.
        let (five, hourly) = (rollup_rows("warm.metric_5m"), rollup_rows("warm.metric_1h"));
        assert!((2 * 2 * 144 * 82..=2 * 2 * 144 * 84).contains(&five), "{five}");
        assert!((2 * 2 * 24 * 29..=2 * 2 * 24 * 31).contains(&hourly), "{hourly}");

        let ranges = [
            (None, None),
            (Some(now - 30 * DAY), Some(now)),
            (Some(now - 100 * DAY), Some(now - 80 * DAY)),
            (Some(now - 8 * DAY), Some(now - 6 * DAY)),
            (Some(now - 119 * DAY), Some(now - 91 * DAY)),
        ];
        let compare = |hot: &Arc<HotTier>, what: &str| {
            for (since, until) in ranges {
                for resolution in [FiveMinutes, Hour] {
                    let got = series(hot, resolution, since, until);
                    let expected = series(&reference, resolution, since, until);
                    assert_eq!(got.len(), 2, "{what}: {resolution:?} {since:?}..{until:?}");
                    assert!(got == expected, "{what}: {resolution:?} over {since:?}..{until:?} differs from raw");
                }
            }
        };
        compare(&hot, "after the moves");

        // An hourly query reads no cold object; a 5-minute one over cold days does.
        drop(cold);
        drop(hot);
        std::thread::sleep(Duration::from_millis(200));
        std::fs::remove_dir_all(dir.path().join("cache")).unwrap();
        let hot = open(dir.path(), true);
        let still_hot: Vec<Record> = records.iter().filter(|r| r.ts >= now - 7 * DAY - 5 * HOUR).cloned().collect();
        hot.insert(&still_hot).unwrap();
        let cold = hot.cold().unwrap().clone();
        assert!(series(&hot, Hour, None, None) == series(&reference, Hour, None, None));
        assert_eq!(cold.cache().fetched.load(Ordering::Relaxed), 0, "hourly buckets come from the rollups");
        compare(&hot, "with an empty cache");
        assert!(cold.cache().fetched.load(Ordering::Relaxed) > 0);

        // Erasing a system's metrics takes its points out of every rollup (cold's at the compaction that applies
        // the tombstone).
        let selector = crate::erasure::Selector {
            system_id: Some("s1".into()),
            kind: Some(RecordKind::Metric),
            ..Default::default()
        };
        let erased_before = jiff::Timestamp::now().as_microsecond();
        reference.delete(&selector, Some(erased_before), |_, _| Ok(())).unwrap();
        let deleted = hot.delete(&selector, Some(erased_before), |_, _| Ok(())).unwrap();
        assert!(deleted.hot > 0 && deleted.warm > 0, "{deleted:?}");
        cold.tombstone(1, &selector, erased_before).unwrap();
        cold.compact().unwrap();
        let s1_buckets = |table: &str| -> i64 {
            hot.read(|c| {
                Ok(c.query_row(&format!("SELECT count(*) FROM {table} WHERE system_id = 's1'"), [], |r| r.get(0))?)
            })
            .unwrap()
        };
        assert_eq!((s1_buckets("warm.metric_5m"), s1_buckets("warm.metric_1h")), (0, 0));
        for resolution in [FiveMinutes, Hour] {
            let got = series(&hot, resolution, None, None);
            assert_eq!(got.len(), 1);
            assert!(got == series(&reference, resolution, None, None), "{resolution:?} after the erasure");
        }

        // A cold day promoted back to warm trades its hourly buckets for 5-minute ones.
        let day_ts = now - 100 * DAY;
        let group = access::Group::of("metric", "s0", day_ts);
        {
            let conn = cold.mover.lock().unwrap();
            let objects = cold.group_objects(&conn, "metric", "s0", &group.day).unwrap();
            assert!(!objects.is_empty());
            cold.promote_group(&conn, hot.warm().unwrap(), &group, &objects, jiff::Timestamp::now().as_microsecond())
                .unwrap();
        }
        let day_buckets = |table: &str| -> i64 {
            hot.read(|c| {
                Ok(c.query_row(
                    &format!(
                        "SELECT count(*) FROM {table} WHERE system_id = 's0' AND CAST(bucket AS DATE) = DATE '{}'",
                        group.day
                    ),
                    [],
                    |r| r.get(0),
                )?)
            })
            .unwrap()
        };
        assert_eq!(day_buckets("warm.metric_1h"), 0);
        assert_eq!(day_buckets("warm.metric_5m"), 2 * 144);
        for resolution in [FiveMinutes, Hour] {
            let got = series(&hot, resolution, None, None);
            assert!(got == series(&reference, resolution, None, None), "{resolution:?} after the promotion");
        }

        // A warm file from before rollups existed: 5-minute buckets at open, hourly ones from the queue.
        let (five, hourly) = (rollup_rows_of(&hot, "warm.metric_5m"), rollup_rows_of(&hot, "warm.metric_1h"));
        hot.read(|c| Ok(c.execute_batch("DROP TABLE warm.metric_5m; DROP TABLE warm.metric_1h;")?)).unwrap();
        drop(cold);
        drop(hot);
        std::thread::sleep(Duration::from_millis(200));
        let hot = open(dir.path(), true);
        hot.insert(&still_hot.iter().filter(|r| r.system_id == "s0").cloned().collect::<Vec<_>>()).unwrap();
        assert_eq!((rollup_rows_of(&hot, "warm.metric_5m"), rollup_rows_of(&hot, "warm.metric_1h")), (five, 0));
        let cold = hot.cold().unwrap().clone();
        let days = cold.backfill_rollups(1000).unwrap();
        assert!(days >= 29, "{days}");
        assert_eq!(cold.backfill_rollups(1000).unwrap(), 0, "the queue is empty");
        assert_eq!(rollup_rows_of(&hot, "warm.metric_1h"), hourly);
        assert!(series(&hot, Hour, None, None) == series(&reference, Hour, None, None), "after the backfill");
    }

    fn rollup_rows_of(hot: &Arc<HotTier>, table: &str) -> i64 {
        hot.read(|c| Ok(c.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))?)).unwrap()
    }

    #[test]
    fn warm_groups_read_often_are_promoted_to_hot_survive_a_restart_and_go_back_when_idle() {
        let dir = tempfile::tempdir().unwrap();
        let now = jiff::Timestamp::now().as_microsecond();
        let records: Vec<Record> = (0..40).map(|i| record(i, now - i as i64 * DAY - 1000)).collect();
        let open = || {
            let hot = with_warm(dir.path());
            let promotion = PromotionConfig {
                enabled: true,
                reads: 3.0,
                window: Duration::from_secs(3600),
                // Long enough that a loaded machine still reads again within it (the last step).
                min_age: Duration::from_secs(4),
                max_groups_per_run: 10,
            };
            hot.attach_cold(ColdConfig { promotion, ..cold_config(dir.path()) }).unwrap();
            // Hot lives in memory: what the log would replay.
            let recent: Vec<Record> = records.iter().filter(|r| r.ts >= now - 7 * DAY).cloned().collect();
            hot.insert(&recent).unwrap();
            hot
        };
        let hot = open();
        hot.insert(&records).unwrap();
        hot.move_to_warm(now - 7 * DAY).unwrap().unwrap();
        let tier = |hot: &Arc<HotTier>, i: u64| {
            let kind = if i.is_multiple_of(2) { RecordKind::Conversation } else { RecordKind::Reflection };
            let service = QueryService::new(hot.clone(), None);
            service.get(&format!("s{}", i % 3), kind, &format!("r{i}")).unwrap().unwrap()["tier"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        let listed = |hot: &Arc<HotTier>| {
            let q = ListQuery { kind: RecordKind::Conversation, limit: 1000, ..ListQuery::default() };
            let page = QueryService::new(hot.clone(), None).list(&q).unwrap();
            let mut ids: Vec<String> = page.records.iter().map(|r| r["id"].as_str().unwrap().to_owned()).collect();
            ids.sort();
            ids
        };
        let everything = listed(&hot);
        assert_eq!(everything.len(), 20);
        let read = |hot: &Arc<HotTier>, i: u64, times: usize| {
            let r = serde_json::json!({"kind": "conversation", "system_id": format!("s{}", i % 3), "ts": records[i as usize].ts});
            for _ in 0..times {
                hot.cold().unwrap().note_reads([&r]);
            }
        };
        read(&hot, 20, 3);
        read(&hot, 22, 1);
        let candidates = hot.hot_promotion_candidates().unwrap();
        assert_eq!(candidates.len(), 1, "what a dry run shows");
        assert_eq!((candidates[0].0.system_id.as_str(), candidates[0].2), ("s2", false));
        let report = hot.promote_to_hot().unwrap().unwrap();
        assert_eq!((report.promoted, report.records), (1, 1), "{report:?}");
        let (totals, promoted_now) = hot.promotion_to_hot().unwrap();
        assert_eq!((totals.promoted, promoted_now.len()), (1, 1));
        assert_eq!((promoted_now[0].0, promoted_now[0].1.as_str()), (RecordKind::Conversation, "s2"));
        assert_eq!((tier(&hot, 20), tier(&hot, 22)), ("hot".to_owned(), "warm".to_owned()));
        assert_eq!(listed(&hot), everything, "a promoted record is listed once");
        let in_hot: u64 = hot.counts().unwrap().iter().map(|c| c.records).sum();
        let in_warm =
            hot.read(|c| Ok(crate::warm::WarmTier::counts(c)?.iter().map(|(_, _, n)| n).sum::<u64>())).unwrap();
        assert_eq!(in_hot + in_warm, 40, "a promoted record is counted once");
        // The hot→warm move leaves the copy where it is; warm keeps its durable version.
        hot.move_to_warm(now - 7 * DAY).unwrap();
        assert_eq!(tier(&hot, 20), "hot");
        let in_warm: i64 = hot
            .read(|c| Ok(c.query_row("SELECT count(*) FROM warm.conversation WHERE id = 'r20'", [], |r| r.get(0))?))
            .unwrap();
        assert_eq!(in_warm, 1);
        // Nor does a move to cold take a promoted group.
        hot.move_to_cold(now - 10 * DAY).unwrap();
        assert_eq!(tier(&hot, 20), "hot");
        assert_eq!(tier(&hot, 26), "cold", "listed twice: not read enough to stay");
        // A hot group read often enough stays hot when its age would move it in a scheduled round (promoted in
        // place), not out and straight back.
        read(&hot, 2, 3);
        assert_eq!(hot.keep_read_groups_hot(|_| now - DAY).unwrap(), 1, "the scheduled round's first step");
        hot.move_to_warm(now - DAY).unwrap().unwrap();
        assert_eq!(tier(&hot, 2), "hot");
        assert_eq!(tier(&hot, 4), "warm");
        assert_eq!(hot.promotion_to_hot().unwrap().1.len(), 2);

        // A restart brings the hot copy back (the read counts were never saved: the group is idle now).
        drop(hot);
        std::thread::sleep(Duration::from_millis(200));
        let hot = open();
        assert_eq!(tier(&hot, 20), "hot");
        let report = hot.promote_to_hot().unwrap().unwrap();
        assert_eq!(report.released, 0, "held for min_age");
        std::thread::sleep(Duration::from_millis(4100));
        let report = hot.promote_to_hot().unwrap().unwrap();
        assert_eq!(report.released, 2, "{report:?}");
        assert_eq!((tier(&hot, 20), tier(&hot, 2)), ("warm".to_owned(), "warm".to_owned()));
        let listed_now = listed(&hot);
        assert!(listed_now.iter().filter(|id| *id == "r20").count() == 1, "{listed_now:?}");
        // Read again at once: it just moved, so it waits out min_age.
        read(&hot, 20, 3);
        let report = hot.promote_to_hot().unwrap().unwrap();
        assert_eq!((report.promoted, report.too_young), (0, 1), "{report:?}");
    }

    #[test]
    fn int8_embeddings_take_a_fraction_of_the_bytes_and_read_back_close() {
        let now = jiff::Timestamp::now().as_microsecond();
        // One day, so that the objects are few and their bytes mostly data.
        let day = now - 100 * DAY - now % DAY;
        let records: Vec<Record> = (0..200).map(|i| record(i, day + i as i64 * 1_000_000)).collect();
        let mut bytes = Vec::new();
        let mut dirs = Vec::new();
        for encoding in [EmbeddingEncoding::F32, EmbeddingEncoding::Int8] {
            let dir = tempfile::tempdir().unwrap();
            let hot = with_warm(dir.path());
            hot.attach_cold(ColdConfig { embedding_encoding: encoding, ..cold_config(dir.path()) }).unwrap();
            hot.insert(&records).unwrap();
            hot.move_to_warm(now - 7 * DAY).unwrap().unwrap();
            assert_eq!(hot.move_to_cold(now - 90 * DAY).unwrap().unwrap().records, 200);
            // A second version of one record, moved too: compaction rewrites its group in the same encoding.
            let mut updated = records[7].clone();
            updated.ts += 1;
            hot.insert(std::slice::from_ref(&updated)).unwrap();
            hot.move_to_warm(now - 7 * DAY).unwrap();
            hot.move_to_cold(now - 90 * DAY).unwrap().unwrap();
            assert_eq!(hot.cold().unwrap().compact().unwrap().groups, 1);
            bytes.push(hot.cold().unwrap().totals().unwrap().2);
            let int8_keys = hot.cold().unwrap().catalog().unwrap().iter().filter(|o| o.int8()).count();
            assert_eq!(int8_keys > 0, encoding == EmbeddingEncoding::Int8, "keys say the encoding");
            let service = QueryService::new(hot.clone(), None);
            for r in [&records[3], &updated] {
                let kind = r.kind;
                let got = service.get(&r.system_id, kind, &r.id).unwrap().unwrap();
                assert_eq!(got["tier"], "cold");
                let stored: Vec<f64> =
                    got["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
                let original = r.embedding.as_ref().unwrap();
                let scale = original.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                let worst = stored.iter().zip(original).map(|(a, b)| (a - *b as f64).abs()).fold(0.0, f64::max);
                match encoding {
                    EmbeddingEncoding::F32 => assert_eq!(worst, 0.0),
                    EmbeddingEncoding::Int8 => assert!(worst <= scale / 254.0 + 1e-6, "{worst} vs scale {scale}"),
                }
            }
            let probe = records[150].embedding.clone().unwrap();
            let hits = service.vector(&probe, 3, &Filters::default()).unwrap();
            assert_eq!(hits[0].record["id"], "r150", "{encoding:?}");
            let text = service.text("topic3", 1000, &Filters::default()).unwrap();
            assert_eq!(text.len(), 200 / 7 + 1);
            dirs.push(dir);
        }
        assert!(bytes[1] * 2 < bytes[0], "int8 {} bytes, f32 {} bytes", bytes[1], bytes[0]);
    }
}
