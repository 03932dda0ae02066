//! # Backup and restore
//!
//! A backup is a consistent snapshot of everything the aggregator needs to answer the same queries again, copied
//! to any object store URL:
//!
//! ```text
//!  <url>/backups/<id>/files/warm.duckdb          the warm tier (with the cold catalog, journals, tombstones)
//!  <url>/backups/<id>/files/warm-indexes/…       its persisted vector and text indexes
//!  <url>/backups/<id>/files/wal/…                write-ahead log segments and checkpoint (they rebuild hot)
//!  <url>/backups/<id>/files/audit/audit.jsonl    the hash-chained audit log
//!  <url>/backups/<id>/manifest.json              written last: every file and object with its size and sha256
//!  <url>/objects/<sha256>                        cold objects, content-addressed, shared by every backup
//! ```
//!
//! A backup without a manifest is incomplete and never restored. Cold objects are stored once however many
//! backups name them, so a daily backup costs what changed, not the whole archive again.
//!
//! ## Consistency while the aggregator runs
//! Ingest is never stopped. Under the warm tier's move lock (hot→warm moves, warm→cold registration and
//! deletions hold it too, so none is half-done) the log is copied, the indexes are copied and a DuckDB
//! transaction is opened on warm; the lock is then released and the warm tables are copied inside that
//! transaction, which sees warm as it was when the lock was held. Every record is therefore in the copied log or
//! in the copied warm file (a record in both is one record: the replay upserts by key), and the copied catalog
//! names exactly the cold objects warm no longer has. Cold objects are pinned while the backup runs: compaction
//! and erasure keep the objects they retire (the next sweep removes them), so every object the snapshot's catalog
//! names can still be copied. Deletions that were not complete when the snapshot was taken are re-run at the
//! first start after a restore (they are idempotent), so a restore never brings back erased records.
//!
//! ## Restore
//! Offline, into an empty aggregator: every file is downloaded and checked against the manifest's sha256 before
//! anything is installed (a corrupt backup changes nothing), cold objects missing from the configured cold store
//! are put back from the backup (verified too), then the files are moved into place. The next start replays the
//! log and answers as the snapshot did.
//!
//! ## Encryption
//! With `encryption` configured, every file is sealed under its own data key on the way out (see
//! [`crate::envelope`]) and the manifest holds the wrapped key beside the file's size and sha256 (of the stored,
//! sealed bytes: corruption is found without any key). Cold objects are copied as the cold tier stored them —
//! sealed if it seals — and the manifest repeats each one's wrapped key. After a key rotation,
//! `backup <url> --rewrap-keys` re-wraps the keys in every manifest, so old backups stay restorable once the old
//! key is gone; a restore writes the manifest's wrapped keys into the restored catalog.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{StreamExt, TryStreamExt};
use object_store::ObjectStore;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tracing::info;

use crate::cold::cache::hex;
use crate::envelope::{Keyring, Opener, Sealer, WrappedKey};
use crate::erasure::AuditLog;
use crate::hot::HotTier;
use crate::objects::Location;
use crate::wal::Wal;

/// The manifest format this build writes and reads.
pub const FORMAT: u32 = 1;

/// Why a backup or restore failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The backup (or cold) object store failed.
    #[error("object store: {0}")]
    Store(String),
    /// A local file failed.
    #[error("{0}")]
    Io(String),
    /// Copying the warm tier failed.
    #[error("warm snapshot (DuckDB): {0}")]
    Db(#[from] duckdb::Error),
    /// A file or object does not match its manifest entry.
    #[error(
        "checksum mismatch for {path}: the manifest says sha256 {expected}, the backup holds {actual}; the backup is corrupt and nothing was restored"
    )]
    Corrupt {
        /// What was checked.
        path: String,
        /// The manifest's sha256.
        expected: String,
        /// What was read.
        actual: String,
    },
    /// The request cannot be carried out as asked.
    #[error("{0}")]
    Invalid(String),
    /// A sealed file or key cannot be opened (a missing or wrong key, or altered bytes).
    #[error("{path}: {error}")]
    Sealed {
        /// The file or object.
        path: String,
        /// What went wrong.
        error: crate::envelope::EnvelopeError,
    },
}

impl From<object_store::Error> for BackupError {
    fn from(e: object_store::Error) -> BackupError {
        BackupError::Store(e.to_string())
    }
}

fn io(context: impl std::fmt::Display, e: impl std::fmt::Display) -> BackupError {
    BackupError::Io(format!("{context}: {e}"))
}

/// One file of a backup.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileEntry {
    /// Path inside the backup's `files/` (and its role: `warm.duckdb`, `wal/…`, `warm-indexes/…`, `audit/…`).
    pub path: String,
    /// Size.
    pub bytes: u64,
    /// sha256, hex, of the stored bytes.
    pub sha256: String,
    /// The file's data key, wrapped, when it is sealed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<WrappedKey>,
}

/// One cold object a backup's catalog names.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ColdEntry {
    /// Key in the cold store.
    pub key: String,
    /// Size.
    pub bytes: u64,
    /// sha256, hex (also its name under `objects/`).
    pub sha256: String,
    /// The object's data key, wrapped, when the cold tier sealed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<WrappedKey>,
}

/// What a backup holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    /// `YYYYMMDDTHHMMSSffffffZ`: sorts by time.
    pub id: String,
    /// When the snapshot was taken (microseconds since the epoch).
    pub taken_at_us: i64,
    /// The aggregator that wrote it.
    pub aggregator_version: String,
    /// Whether the snapshot has a warm tier (and so may have a cold one).
    pub warm: bool,
    /// Deletions from this audit sequence number on run again after a restore.
    pub reapply_deletions_from: u64,
    /// Files.
    pub files: Vec<FileEntry>,
    /// Cold objects.
    pub cold_objects: Vec<ColdEntry>,
}

impl Manifest {
    /// Bytes of files and objects.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum::<u64>() + self.cold_objects.iter().map(|o| o.bytes).sum::<u64>()
    }
}

/// Progress of a running backup or restore, readable from other threads.
#[derive(Debug, Default)]
pub struct Progress {
    phase: Mutex<String>,
    /// Bytes to copy.
    pub bytes_total: AtomicU64,
    /// Bytes copied (or found already there).
    pub bytes_done: AtomicU64,
    /// Files and objects to copy.
    pub items_total: AtomicU64,
    /// Files and objects copied.
    pub items_done: AtomicU64,
}

impl Progress {
    /// Names the current step.
    pub fn set_phase(&self, phase: &str) {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = phase.to_owned();
    }

    /// The current step.
    pub fn phase(&self) -> String {
        self.phase.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn add_total(&self, items: u64, bytes: u64) {
        self.items_total.fetch_add(items, Ordering::Relaxed);
        self.bytes_total.fetch_add(bytes, Ordering::Relaxed);
    }

    fn done(&self, bytes: u64) {
        self.items_done.fetch_add(1, Ordering::Relaxed);
        self.bytes_done.fetch_add(bytes, Ordering::Relaxed);
    }

    /// As the API shows it.
    pub fn to_json(&self) -> Value {
        json!({
            "phase": self.phase(),
            "bytes_total": self.bytes_total.load(Ordering::Relaxed),
            "bytes_done": self.bytes_done.load(Ordering::Relaxed),
            "items_total": self.items_total.load(Ordering::Relaxed),
            "items_done": self.items_done.load(Ordering::Relaxed),
        })
    }
}

/// A backup started through the API.
#[derive(Debug)]
pub struct BackupJob {
    /// The backup's id.
    pub id: String,
    /// Where it goes.
    pub url: String,
    /// How far it got.
    pub progress: Arc<Progress>,
    /// `None` while running.
    pub outcome: Mutex<Option<Result<Manifest, String>>>,
}

impl BackupJob {
    /// Whether it still runs.
    pub fn running(&self) -> bool {
        self.outcome.lock().unwrap_or_else(|p| p.into_inner()).is_none()
    }

    /// As the API shows it.
    pub fn to_json(&self) -> Value {
        let outcome = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        let (state, error, summary) = match &*outcome {
            None => ("running", None, Value::Null),
            Some(Ok(m)) => (
                "done",
                None,
                json!({"files": m.files.len(), "cold_objects": m.cold_objects.len(), "bytes": m.bytes(),
                       "taken_at_us": m.taken_at_us}),
            ),
            Some(Err(e)) => ("failed", Some(e.clone()), Value::Null),
        };
        json!({"id": self.id, "url": self.url, "state": state, "error": error, "progress": self.progress.to_json(),
               "manifest": summary})
    }
}

/// A new backup id for now.
pub fn new_id() -> (String, i64) {
    let now = jiff::Timestamp::now();
    let micros = now.as_microsecond();
    (format!("{}{:06}Z", now.strftime("%Y%m%dT%H%M%S"), micros.rem_euclid(1_000_000)), micros)
}

/// What the snapshot step left in the staging directory.
struct Staged {
    files: Vec<String>,
    cold: Vec<ColdEntry>,
    reapply_from: u64,
    warm: bool,
}

const SNAPSHOT_DB: &str = "akosha_backup";

/// One backup to take.
pub struct Plan {
    /// Its id and time, from [`new_id`].
    pub id: (String, i64),
    /// Where local copies are staged.
    pub staging: PathBuf,
    /// Where the backup goes.
    pub dest: Location,
    /// Seals every file when given.
    pub keyring: Option<Arc<Keyring>>,
}

/// Takes a backup of the running aggregator as `plan` says.
pub async fn take(
    hot: Arc<HotTier>,
    wal: Wal,
    audit: Arc<AuditLog>,
    plan: Plan,
    progress: Arc<Progress>,
) -> Result<Manifest, BackupError> {
    let Plan { id: (id, taken_at_us), staging, dest, keyring } = plan;
    let started = std::time::Instant::now();
    let staging = staging.join(&id);
    let _ = std::fs::remove_dir_all(&staging);
    // Before the snapshot: the objects its catalog names must outlive the copy.
    let pin = hot.cold().map(|cold| cold.pin());
    progress.set_phase("snapshot");
    let cold_location = hot.cold().map(|cold| cold.location().clone());
    let dir = staging.clone();
    let snapshot = tokio::task::spawn_blocking(move || snapshot(&hot, &wal, &audit, &dir))
        .await
        .map_err(|e| BackupError::Io(format!("the snapshot panicked: {e}")))?;
    let result = async {
        let staged = snapshot?;
        let mut sizes = Vec::new();
        for path in &staged.files {
            let local = staging.join(path);
            let bytes = std::fs::metadata(&local).map_err(|e| io(local.display(), e))?.len();
            sizes.push(bytes);
        }
        progress.add_total(
            (staged.files.len() + staged.cold.len()) as u64,
            sizes.iter().sum::<u64>() + staged.cold.iter().map(|o| o.bytes).sum::<u64>(),
        );
        progress.set_phase("upload files");
        let mut files = Vec::new();
        for path in &staged.files {
            let key = format!("backups/{id}/files/{path}");
            let (bytes, sha256, sealed) =
                upload_file(&dest, &key, &staging.join(path), keyring.as_deref(), &progress).await?;
            progress.done(0);
            files.push(FileEntry { path: path.clone(), bytes, sha256, sealed });
        }
        progress.set_phase("copy cold objects");
        if let Some(cold) = &cold_location {
            copy_objects(cold, &dest, &staged.cold, &progress).await?;
        }
        let manifest = Manifest {
            format: FORMAT,
            id: id.clone(),
            taken_at_us,
            aggregator_version: env!("CARGO_PKG_VERSION").to_owned(),
            warm: staged.warm,
            reapply_deletions_from: staged.reapply_from,
            files,
            cold_objects: staged.cold,
        };
        progress.set_phase("manifest");
        let body = serde_json::to_vec_pretty(&manifest).map_err(|e| io("manifest", e))?;
        dest.store.put(&dest.join(&format!("backups/{id}/manifest.json")), body.into()).await?;
        Ok(manifest)
    }
    .await;
    drop(pin);
    let _ = std::fs::remove_dir_all(&staging);
    match &result {
        Ok(m) => {
            progress.set_phase("done");
            info!(
                message = "Backup complete.",
                id = %m.id,
                url = %dest.url,
                files = m.files.len(),
                cold_objects = m.cold_objects.len(),
                bytes = m.bytes(),
                ms = started.elapsed().as_millis() as u64
            );
        }
        Err(e) => {
            progress.set_phase("failed");
            tracing::warn!(message = "Backup failed; nothing was published (no manifest).", id = %id, error = %e);
        }
    }
    result
}

/// Copies the log, the indexes, the warm tables and the audit log into `staging` (see the module notes).
fn snapshot(hot: &HotTier, wal: &Wal, audit: &AuditLog, staging: &Path) -> Result<Staged, BackupError> {
    std::fs::create_dir_all(staging).map_err(|e| io(staging.display(), e))?;
    let warm = hot.warm().cloned();
    let conn = hot.connection().map_err(|e| BackupError::Io(e.to_string()))?;
    let mut files = Vec::new();
    if warm.is_some() {
        let path = staging.join("warm.duckdb");
        conn.execute_batch(&format!(
            "ATTACH {} AS {SNAPSHOT_DB};",
            crate::cold::sql_text(&path.display().to_string())
        ))?;
    }
    let reapply_from = {
        let _moving = warm.as_ref().map(|w| w.lock_moves());
        let names = wal.copy_to(&staging.join("wal")).map_err(|e| BackupError::Io(e.to_string()))?;
        files.extend(names.into_iter().map(|n| format!("wal/{n}")));
        if let Some(warm) = &warm {
            copy_tree(warm.index_dir(), &staging.join("warm-indexes"), "warm-indexes", &mut files)?;
            conn.execute_batch("BEGIN TRANSACTION")?;
            // DuckDB starts a database's transaction when the transaction first touches it: now, under the lock.
            conn.query_row("SELECT count(*) FROM warm.moves", [], |r| r.get::<_, i64>(0))?;
        }
        audit.unsettled_from().map_err(|e| BackupError::Io(e.to_string()))?
    };
    let mut cold = Vec::new();
    if warm.is_some() {
        let copied = copy_warm_tables(&conn);
        if let Err(e) = copied {
            let _ = conn.execute_batch(&format!("ROLLBACK; DETACH {SNAPSHOT_DB};"));
            return Err(e);
        }
        conn.execute_batch("COMMIT")?;
        let has_catalog: i64 = conn.query_row(
            &format!("SELECT count(*) FROM duckdb_tables() WHERE database_name = '{SNAPSHOT_DB}' AND table_name = 'cold_objects'"),
            [],
            |r| r.get(0),
        )?;
        if has_catalog > 0 {
            let mut stmt = conn.prepare(&format!(
                "SELECT key, bytes, sha256, kek_id, wrapped_dek FROM {SNAPSHOT_DB}.cold_objects ORDER BY key"
            ))?;
            cold = stmt
                .query_map([], |r| {
                    let sealed = match (r.get::<_, Option<String>>(3)?, r.get::<_, Option<String>>(4)?) {
                        (Some(kek_id), Some(wrapped)) => Some(WrappedKey { kek_id, wrapped }),
                        _ => None,
                    };
                    Ok(ColdEntry { key: r.get(0)?, bytes: r.get::<_, i64>(1)? as u64, sha256: r.get(2)?, sealed })
                })?
                .collect::<Result<_, _>>()?;
        }
        conn.execute_batch(&format!("DETACH {SNAPSHOT_DB};"))?;
        files.push("warm.duckdb".into());
    }
    // After the warm copy: deletions that ran meanwhile are in it, and re-run after a restore.
    let audit_dir = staging.join("audit");
    std::fs::create_dir_all(&audit_dir).map_err(|e| io(audit_dir.display(), e))?;
    audit.copy_to(&audit_dir.join("audit.jsonl")).map_err(|e| BackupError::Io(e.to_string()))?;
    files.push("audit/audit.jsonl".into());
    Ok(Staged { files, cold, reapply_from, warm: warm.is_some() })
}

/// Recreates every warm table in the snapshot database and copies its rows, inside the caller's transaction.
fn copy_warm_tables(conn: &duckdb::Connection) -> Result<(), BackupError> {
    let tables: Vec<(String, String, String)> = {
        let mut stmt = conn.prepare(
            "SELECT schema_name, table_name, sql FROM duckdb_tables() WHERE database_name = 'warm' ORDER BY 1, 2",
        )?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect::<Result<_, _>>()?
    };
    for (schema, table, sql) in tables {
        // The stored DDL names the table unqualified: `CREATE TABLE name(columns…);`.
        let columns = sql
            .strip_prefix("CREATE TABLE ")
            .and_then(|rest| rest.find('(').map(|i| &rest[i..]))
            .ok_or_else(|| BackupError::Invalid(format!("unexpected DDL for warm table {table}: {sql}")))?;
        if schema != "main" {
            conn.execute_batch(&format!("CREATE SCHEMA IF NOT EXISTS {SNAPSHOT_DB}.\"{schema}\";"))?;
        }
        conn.execute_batch(&format!(
            "CREATE TABLE {SNAPSHOT_DB}.\"{schema}\".\"{table}\"{columns}\n\
             INSERT INTO {SNAPSHOT_DB}.\"{schema}\".\"{table}\" SELECT * FROM warm.\"{schema}\".\"{table}\";"
        ))?;
    }
    Ok(())
}

/// Copies the files under `from` to `to`, adding `<prefix>/<relative path>` to `files`. A file that vanishes
/// while listed (an index merge retiring it) is skipped: an index that does not open is rebuilt from warm.
fn copy_tree(from: &Path, to: &Path, prefix: &str, files: &mut Vec<String>) -> Result<(), BackupError> {
    let entries = match std::fs::read_dir(from) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(from.display(), e)),
    };
    std::fs::create_dir_all(to).map_err(|e| io(to.display(), e))?;
    let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if path.is_dir() {
            copy_tree(&path, &to.join(&name), &format!("{prefix}/{name}"), files)?;
            continue;
        }
        match std::fs::copy(&path, to.join(&name)) {
            Ok(_) => files.push(format!("{prefix}/{name}")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(path.display(), e)),
        }
    }
    Ok(())
}

/// Streams a local file to `key` (multipart when large), sealed under a new data key when `keyring` is given;
/// returns the stored size, the stored bytes' sha256 and the wrapped data key.
async fn upload_file(
    dest: &Location,
    key: &str,
    file: &Path,
    keyring: Option<&Keyring>,
    progress: &Progress,
) -> Result<(u64, String, Option<WrappedKey>), BackupError> {
    use tokio::io::AsyncReadExt;
    let sealed_err = |error| BackupError::Sealed { path: key.to_owned(), error };
    let (mut sealer, wrapped) = match keyring {
        Some(keyring) => {
            let (dek, wrapped) = keyring.new_data_key().map_err(sealed_err)?;
            (Some(Sealer::new(&dek)), Some(wrapped))
        }
        None => (None, None),
    };
    let mut reader = tokio::fs::File::open(file).await.map_err(|e| io(file.display(), e))?;
    let mut writer = object_store::buffered::BufWriter::new(dest.store.clone(), dest.join(key));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf).await.map_err(|e| io(file.display(), e))?;
        let last = n == 0;
        let out = match (&mut sealer, last) {
            (None, _) => buf[..n].to_vec(),
            (Some(s), false) => s.push(&buf[..n]).map_err(sealed_err)?,
            (Some(_), true) => sealer.take().map(Sealer::finish).transpose().map_err(sealed_err)?.unwrap_or_default(),
        };
        hasher.update(&out);
        if let Err(e) = writer.write_all(&out).await {
            let _ = writer.abort().await;
            return Err(BackupError::Store(format!("PUT {key}: {e}")));
        }
        total += out.len() as u64;
        progress.bytes_done.fetch_add(n as u64, Ordering::Relaxed);
        if last {
            break;
        }
    }
    writer.shutdown().await.map_err(|e| BackupError::Store(format!("PUT {key}: {e}")))?;
    Ok((total, hex(&hasher.finalize()), wrapped))
}

/// Replaces the sealed file `file` by its plaintext, in 1 MiB steps.
fn open_file(file: &Path, wrapped: &WrappedKey, keyring: Option<&Keyring>, name: &str) -> Result<(), BackupError> {
    use std::io::{Read, Write};
    let sealed_err = |error| BackupError::Sealed { path: name.to_owned(), error };
    let keyring =
        keyring.ok_or_else(|| sealed_err(crate::envelope::EnvelopeError::UnknownKey(wrapped.kek_id.clone())))?;
    let mut opener = Opener::new(&keyring.unwrap(wrapped).map_err(sealed_err)?);
    let mut plain = file.as_os_str().to_owned();
    plain.push(".opened");
    let plain = PathBuf::from(plain);
    let mut reader = std::fs::File::open(file).map_err(|e| io(file.display(), e))?;
    let mut writer = std::io::BufWriter::new(std::fs::File::create(&plain).map_err(|e| io(plain.display(), e))?);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf).map_err(|e| io(file.display(), e))?;
        if n == 0 {
            break;
        }
        writer.write_all(&opener.push(&buf[..n]).map_err(sealed_err)?).map_err(|e| io(plain.display(), e))?;
    }
    writer.write_all(&opener.finish().map_err(sealed_err)?).map_err(|e| io(plain.display(), e))?;
    writer.into_inner().map_err(|e| io(plain.display(), e.error()))?.sync_all().map_err(|e| io(plain.display(), e))?;
    std::fs::rename(&plain, file).map_err(|e| io(file.display(), e))
}

/// Downloads `key` to `file`, checking it against `expected` (size and sha256).
async fn download_checked(
    src: &Location,
    key: &str,
    file: &Path,
    expected: &FileEntry,
    progress: &Progress,
) -> Result<(), BackupError> {
    if let Some(parent) = file.parent() {
        tokio::fs::create_dir_all(parent).await.map_err(|e| io(parent.display(), e))?;
    }
    let mut stream = src.store.get(&src.join(key)).await.map_err(|e| missing(key, e))?.into_stream();
    let mut out = tokio::fs::File::create(file).await.map_err(|e| io(file.display(), e))?;
    let mut hasher = Sha256::new();
    while let Some(chunk) = stream.try_next().await? {
        hasher.update(&chunk);
        out.write_all(&chunk).await.map_err(|e| io(file.display(), e))?;
        progress.bytes_done.fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
    out.sync_all().await.map_err(|e| io(file.display(), e))?;
    let actual = hex(&hasher.finalize());
    if actual != expected.sha256 {
        return Err(BackupError::Corrupt { path: key.to_owned(), expected: expected.sha256.clone(), actual });
    }
    Ok(())
}

fn missing(key: &str, e: object_store::Error) -> BackupError {
    match e {
        object_store::Error::NotFound { .. } => {
            BackupError::Invalid(format!("the backup is incomplete: `{key}` is missing from the store"))
        }
        e => BackupError::Store(format!("GET {key}: {e}")),
    }
}

/// Reads an object whole and checks its sha256.
async fn get_checked(location: &Location, key: &str, sha256: &str) -> Result<bytes::Bytes, BackupError> {
    let data = location.store.get(&location.join(key)).await.map_err(|e| missing(key, e))?.bytes().await?;
    let actual = hex(&Sha256::digest(&data));
    if actual != sha256 {
        return Err(BackupError::Corrupt { path: key.to_owned(), expected: sha256.to_owned(), actual });
    }
    Ok(data)
}

/// Whether `key` exists with `bytes` bytes.
async fn present(location: &Location, key: &str, bytes: u64) -> Result<bool, BackupError> {
    match location.store.head(&location.join(key)).await {
        Ok(meta) => Ok(meta.size == bytes),
        Err(object_store::Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(BackupError::Store(format!("HEAD {key}: {e}"))),
    }
}

/// Copies the cold objects a snapshot names into the backup's shared `objects/`, skipping those already there.
async fn copy_objects(
    cold: &Location,
    dest: &Location,
    objects: &[ColdEntry],
    progress: &Arc<Progress>,
) -> Result<(), BackupError> {
    // Owned futures: a stream of futures borrowing the arguments is not `Send` enough for `tokio::spawn`.
    futures_util::stream::iter(objects.iter().cloned().map(|o| {
        let (cold, dest, progress) = (cold.clone(), dest.clone(), progress.clone());
        async move {
            let target = format!("objects/{}", o.sha256);
            if !present(&dest, &target, o.bytes).await? {
                let data = get_checked(&cold, &o.key, &o.sha256).await?;
                dest.store.put(&dest.join(&target), data.into()).await?;
            }
            progress.done(o.bytes);
            Ok::<_, BackupError>(())
        }
    }))
    .buffer_unordered(4)
    .try_collect::<Vec<()>>()
    .await?;
    Ok(())
}

/// Every complete backup under `src`, oldest first.
pub async fn list(src: &Location) -> Result<Vec<Manifest>, BackupError> {
    let listing = src.store.list_with_delimiter(Some(&src.join("backups"))).await?;
    let mut out = Vec::new();
    for dir in listing.common_prefixes {
        let key = dir.child("manifest.json");
        let data = match src.store.get(&key).await {
            Ok(got) => got.bytes().await?,
            // Still being written, or abandoned by a failed backup.
            Err(object_store::Error::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        let manifest: Manifest = serde_json::from_slice(&data)
            .map_err(|e| BackupError::Invalid(format!("{key} is not a backup manifest: {e}")))?;
        if manifest.format != FORMAT {
            return Err(BackupError::Invalid(format!(
                "{key} has manifest format {}; this aggregator reads format {FORMAT}",
                manifest.format
            )));
        }
        out.push(manifest);
    }
    out.sort_by_key(|m| m.taken_at_us);
    Ok(out)
}

/// What [`prune`] removed.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Pruned {
    /// Backups removed (ids).
    pub backups: Vec<String>,
    /// Shared cold objects no remaining backup names, removed.
    pub objects: u64,
}

/// Keeps the newest `keep` complete backups at `location` and removes the rest: each manifest first (so a
/// backup is never half there yet listed), then its files, then the objects only removed backups named.
pub async fn prune(location: &Location, keep: usize) -> Result<Pruned, BackupError> {
    if keep == 0 {
        return Err(BackupError::Invalid("keeping 0 backups would remove every backup; keep at least 1".into()));
    }
    let backups = list(location).await?;
    let cut = backups.len().saturating_sub(keep);
    let (old, kept) = backups.split_at(cut);
    let mut pruned = Pruned::default();
    for m in old {
        location.store.delete(&location.join(&format!("backups/{}/manifest.json", m.id))).await?;
        let files: Vec<object_store::path::Path> = location
            .store
            .list(Some(&location.join(&format!("backups/{}", m.id))))
            .map_ok(|o| o.location)
            .try_collect()
            .await?;
        for path in files {
            location.store.delete(&path).await?;
        }
        pruned.backups.push(m.id.clone());
    }
    if !old.is_empty() {
        let named: std::collections::HashSet<&str> =
            kept.iter().flat_map(|m| m.cold_objects.iter().map(|o| o.sha256.as_str())).collect();
        let stored: Vec<object_store::path::Path> =
            location.store.list(Some(&location.join("objects"))).map_ok(|o| o.location).try_collect().await?;
        for path in stored {
            if !path.filename().is_some_and(|sha| named.contains(sha)) {
                location.store.delete(&path).await?;
                pruned.objects += 1;
            }
        }
    }
    Ok(pruned)
}

/// The newest backup taken at or before `at` (the newest of all without one).
pub fn choose(backups: &[Manifest], at: Option<i64>) -> Result<&Manifest, BackupError> {
    let chosen = backups.iter().rev().find(|m| at.is_none_or(|at| m.taken_at_us <= at));
    chosen.ok_or_else(|| {
        let taken: Vec<String> = backups.iter().map(|m| m.id.clone()).collect();
        BackupError::Invalid(match (at, taken.is_empty()) {
            (_, true) => "no complete backup at that location".into(),
            (Some(at), false) => format!(
                "no backup was taken at or before {}; the backups are: {}",
                jiff::Timestamp::from_microsecond(at).map_or_else(|_| at.to_string(), |t| t.to_string()),
                taken.join(", ")
            ),
            (None, false) => unreachable!("a non-empty list has a newest entry"),
        })
    })
}

/// Where a restore puts things: the configured paths of the aggregator being restored.
#[derive(Debug, Clone)]
pub struct RestoreTargets {
    /// The warm DuckDB file (`None` when the configuration has no warm tier).
    pub warm_path: Option<PathBuf>,
    /// The write-ahead log directory.
    pub wal_dir: PathBuf,
    /// The audit log directory.
    pub audit_dir: PathBuf,
    /// The cold store (`None` when the configuration has no cold tier).
    pub cold: Option<Location>,
    /// Where downloads are staged before they are installed.
    pub staging: PathBuf,
    /// Keys for sealed files and objects.
    pub keyring: Option<Arc<Keyring>>,
}

impl RestoreTargets {
    fn local_path(&self, path: &str) -> Option<PathBuf> {
        let warm = self.warm_path.as_ref();
        if path == "warm.duckdb" {
            return warm.cloned();
        }
        if let Some(rest) = path.strip_prefix("warm-indexes/") {
            return warm.map(|w| crate::warm::index_dir(w).join(rest));
        }
        if let Some(rest) = path.strip_prefix("wal/") {
            return Some(self.wal_dir.join(rest));
        }
        path.strip_prefix("audit/").map(|rest| self.audit_dir.join(rest))
    }

    /// Refuses unless the aggregator is empty: a restore replaces, it does not merge.
    fn check_empty(&self) -> Result<(), BackupError> {
        let occupied = |path: &Path| -> bool {
            match std::fs::read_dir(path) {
                Ok(mut entries) => entries.next().is_some(),
                Err(_) => std::fs::metadata(path).is_ok_and(|m| m.len() > 0),
            }
        };
        let mut taken = Vec::new();
        if let Some(warm) = &self.warm_path {
            taken.extend([warm.clone(), crate::warm::index_dir(warm)].into_iter().filter(|p| occupied(p)));
        }
        for path in [self.wal_dir.clone(), self.audit_dir.join("audit.jsonl")] {
            if occupied(&path) {
                taken.push(path);
            }
        }
        if taken.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = taken.iter().map(|p| p.display().to_string()).collect();
        Err(BackupError::Invalid(format!(
            "the aggregator is not empty ({}): a restore replaces its data; stop it and move these away first",
            names.join(", ")
        )))
    }
}

/// Restores the newest backup at or before `at` from `src` into the empty aggregator `targets` describes.
pub async fn restore(
    src: &Location,
    at: Option<i64>,
    targets: &RestoreTargets,
    progress: &Progress,
) -> Result<Manifest, BackupError> {
    targets.check_empty()?;
    progress.set_phase("read manifests");
    let backups = list(src).await?;
    let manifest = choose(&backups, at)?.clone();
    if manifest.warm && targets.warm_path.is_none() {
        return Err(BackupError::Invalid(
            "the backup has a warm tier but the configuration disables it (`warm.enabled`)".into(),
        ));
    }
    if !manifest.cold_objects.is_empty() && targets.cold.is_none() {
        return Err(BackupError::Invalid(format!(
            "the backup names {} cold objects but the configuration has no cold tier (`cold.enabled`)",
            manifest.cold_objects.len()
        )));
    }
    let mut installs = Vec::new();
    for file in &manifest.files {
        // Only plain relative names: `..`, an absolute path or `wal//etc/x` would write outside the aggregator.
        let safe = !file.path.is_empty()
            && Path::new(&file.path).components().all(|c| matches!(c, std::path::Component::Normal(_)))
            && !file.path.contains("//");
        if !safe {
            return Err(BackupError::Invalid(format!("the manifest names an unsafe path `{}`", file.path)));
        }
        let target = targets.local_path(&file.path).ok_or_else(|| {
            BackupError::Invalid(format!("the manifest names `{}`, which this aggregator does not know", file.path))
        })?;
        installs.push((file, target));
    }
    // Every data key must open before anything is downloaded: a missing key is a configuration error.
    let sealed = manifest
        .files
        .iter()
        .filter_map(|f| f.sealed.as_ref().map(|k| (&f.path, k)))
        .chain(manifest.cold_objects.iter().filter_map(|o| o.sealed.as_ref().map(|k| (&o.key, k))));
    for (path, key) in sealed {
        let keyring = targets.keyring.as_ref().ok_or_else(|| BackupError::Sealed {
            path: path.clone(),
            error: crate::envelope::EnvelopeError::UnknownKey(key.kek_id.clone()),
        })?;
        keyring.unwrap(key).map_err(|error| BackupError::Sealed { path: path.clone(), error })?;
    }
    progress.add_total((manifest.files.len() + manifest.cold_objects.len()) as u64, manifest.bytes());
    let staging = targets.staging.join(&manifest.id);
    let _ = std::fs::remove_dir_all(&staging);
    let result = async {
        // 1. Everything downloaded and checked before anything is touched.
        progress.set_phase("download files");
        for (file, _) in &installs {
            let key = format!("backups/{}/files/{}", manifest.id, file.path);
            let local = staging.join(&file.path);
            download_checked(src, &key, &local, file, progress).await?;
            if let Some(wrapped) = &file.sealed {
                open_file(&local, wrapped, targets.keyring.as_deref(), &key)?;
            }
            progress.items_done.fetch_add(1, Ordering::Relaxed);
        }
        // 2. Cold objects the store lacks come back from the backup (checked on the way).
        progress.set_phase("restore cold objects");
        if let Some(cold) = &targets.cold {
            futures_util::stream::iter(manifest.cold_objects.iter().map(|o| async move {
                if !present(cold, &o.key, o.bytes).await? {
                    let data = get_checked(src, &format!("objects/{}", o.sha256), &o.sha256).await?;
                    cold.store.put(&cold.join(&o.key), data.into()).await?;
                }
                progress.done(o.bytes);
                Ok::<_, BackupError>(())
            }))
            .buffer_unordered(4)
            .try_collect::<Vec<()>>()
            .await?;
        }
        // 3. Install.
        progress.set_phase("install");
        for (file, target) in &installs {
            let from = staging.join(&file.path);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(|e| io(parent.display(), e))?;
            }
            if std::fs::rename(&from, target).is_err() {
                std::fs::copy(&from, target).map_err(|e| io(target.display(), e))?;
            }
        }
        if let Some(warm) = &targets.warm_path {
            adopt_object_keys(warm, &manifest.cold_objects)?;
        }
        std::fs::create_dir_all(&targets.audit_dir).map_err(|e| io(targets.audit_dir.display(), e))?;
        let marker = targets.audit_dir.join(crate::erasure::RESTORED_MARKER);
        let body = json!({"backup": manifest.id, "reapply_from": manifest.reapply_deletions_from});
        std::fs::write(&marker, body.to_string()).map_err(|e| io(marker.display(), e))?;
        Ok::<(), BackupError>(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&staging);
    result?;
    progress.set_phase("done");
    Ok(manifest)
}

/// Writes the manifest's wrapped data keys into the restored catalog: `--rewrap-keys` may have re-wrapped them
/// under a newer key since the snapshot was taken.
fn adopt_object_keys(warm: &Path, objects: &[ColdEntry]) -> Result<(), BackupError> {
    let rows: Vec<String> = objects
        .iter()
        .filter_map(|o| {
            o.sealed.as_ref().map(|k| {
                format!(
                    "({}, {}, {})",
                    crate::cold::sql_text(&o.key),
                    crate::cold::sql_text(&k.kek_id),
                    crate::cold::sql_text(&k.wrapped)
                )
            })
        })
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    let conn = duckdb::Connection::open(warm)?;
    for chunk in rows.chunks(1000) {
        conn.execute_batch(&format!(
            "UPDATE cold_objects SET kek_id = v.kek_id, wrapped_dek = v.wrapped \
             FROM (VALUES {}) v(key, kek_id, wrapped) WHERE cold_objects.key = v.key;",
            chunk.join(", ")
        ))?;
    }
    Ok(())
}

/// What [`rewrap`] changed.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Rewrapped {
    /// Manifests rewritten.
    pub manifests: u64,
    /// Data keys re-wrapped (files and cold objects).
    pub keys: u64,
}

/// Re-wraps every data key in every manifest at `location` that the active key does not wrap, rewriting only
/// the manifests (each in one PUT): after a rotation, old backups stay restorable with the new key alone.
pub async fn rewrap(location: &Location, keyring: &Keyring) -> Result<Rewrapped, BackupError> {
    let mut done = Rewrapped::default();
    for mut manifest in list(location).await? {
        let mut changed = 0;
        let keys = manifest
            .files
            .iter_mut()
            .map(|f| (&f.path, &mut f.sealed))
            .chain(manifest.cold_objects.iter_mut().map(|o| (&o.key, &mut o.sealed)));
        for (path, sealed) in keys {
            let Some(old) = sealed.as_ref() else { continue };
            if let Some(new) = keyring.rewrap(old).map_err(|error| BackupError::Sealed { path: path.clone(), error })? {
                *sealed = Some(new);
                changed += 1;
            }
        }
        if changed > 0 {
            let body = serde_json::to_vec_pretty(&manifest).map_err(|e| io("manifest", e))?;
            location.store.put(&location.join(&format!("backups/{}/manifest.json", manifest.id)), body.into()).await?;
            done.manifests += 1;
            done.keys += changed;
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(id: &str, taken_at_us: i64) -> Manifest {
        Manifest {
            format: FORMAT,
            id: id.into(),
            taken_at_us,
            aggregator_version: "0".into(),
            warm: true,
            reapply_deletions_from: 1,
            files: Vec::new(),
            cold_objects: Vec::new(),
        }
    }

    #[test]
    fn the_newest_backup_at_or_before_the_time_is_chosen() {
        let backups = vec![manifest("a", 10), manifest("b", 20), manifest("c", 30)];
        assert_eq!(choose(&backups, None).unwrap().id, "c");
        assert_eq!(choose(&backups, Some(25)).unwrap().id, "b");
        assert_eq!(choose(&backups, Some(20)).unwrap().id, "b");
        let err = choose(&backups, Some(5)).unwrap_err().to_string();
        assert!(err.contains("no backup was taken at or before") && err.contains("a, b, c"), "{err}");
        assert!(choose(&[], None).unwrap_err().to_string().contains("no complete backup"));
    }

    #[test]
    fn ids_sort_by_time() {
        let (a, at) = new_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let (b, bt) = new_id();
        assert!(a < b && at < bt, "{a} {b}");
        assert_eq!(a.len(), "20261123T101500123456Z".len());
    }

    #[test]
    fn restore_targets_map_every_file_and_refuse_a_full_aggregator() {
        let dir = tempfile::tempdir().unwrap();
        let targets = RestoreTargets {
            warm_path: Some(dir.path().join("warm/warm.duckdb")),
            wal_dir: dir.path().join("wal"),
            audit_dir: dir.path().join("audit"),
            cold: None,
            staging: dir.path().join("staging"),
            keyring: None,
        };
        assert_eq!(
            targets.local_path("wal/00000000000000000001.wal"),
            Some(dir.path().join("wal/00000000000000000001.wal"))
        );
        assert_eq!(
            targets.local_path("warm-indexes/text/meta.json"),
            Some(dir.path().join("warm/warm.duckdb.indexes/text/meta.json"))
        );
        assert_eq!(targets.local_path("other/x"), None);
        targets.check_empty().unwrap();
        std::fs::create_dir_all(dir.path().join("wal")).unwrap();
        targets.check_empty().unwrap();
        std::fs::write(dir.path().join("wal/checkpoint.json"), b"{}").unwrap();
        let err = targets.check_empty().unwrap_err().to_string();
        assert!(err.contains("not empty") && err.contains("wal"), "{err}");
    }

    #[tokio::test]
    async fn a_corrupt_file_is_named_and_nothing_is_installed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("backup")).unwrap();
        let store = crate::objects::open(dir.path().join("backup").to_str().unwrap(), &[]).unwrap();
        let body = b"line\n".to_vec();
        let mut m = manifest("20260101T000000000000Z", 1);
        m.warm = false;
        m.files.push(FileEntry {
            path: "audit/audit.jsonl".into(),
            bytes: 5,
            sha256: hex(&Sha256::digest(&body)),
            sealed: None,
        });
        store
            .store
            .put(&store.join(&format!("backups/{}/files/audit/audit.jsonl", m.id)), b"lime\n".to_vec().into())
            .await
            .unwrap();
        store
            .store
            .put(&store.join(&format!("backups/{}/manifest.json", m.id)), serde_json::to_vec(&m).unwrap().into())
            .await
            .unwrap();
        let targets = RestoreTargets {
            warm_path: None,
            wal_dir: dir.path().join("data/wal"),
            audit_dir: dir.path().join("data/audit"),
            cold: None,
            staging: dir.path().join("data/staging"),
            keyring: None,
        };
        let err = restore(&store, None, &targets, &Progress::default()).await.unwrap_err().to_string();
        assert!(err.contains("checksum mismatch for backups/") && err.contains("audit.jsonl"), "{err}");
        assert!(!dir.path().join("data/audit/audit.jsonl").exists());
        // Fixed, it restores.
        store.store.put(&store.join(&format!("backups/{}/files/audit/audit.jsonl", m.id)), body.into()).await.unwrap();
        let restored = restore(&store, None, &targets, &Progress::default()).await.unwrap();
        assert_eq!(restored.id, m.id);
        assert_eq!(std::fs::read(dir.path().join("data/audit/audit.jsonl")).unwrap(), b"line\n");
        assert!(dir.path().join("data/audit/restored.json").exists());

        // A manifest naming paths outside the aggregator is refused before anything is downloaded.
        std::fs::remove_dir_all(dir.path().join("data")).unwrap();
        for path in ["wal/../../escaped", "wal//tmp/escaped", "/etc/escaped"] {
            let mut bad = manifest("20260102T000000000000Z", 2);
            bad.warm = false;
            bad.files.push(FileEntry { path: path.into(), bytes: 0, sha256: String::new(), sealed: None });
            let key = format!("backups/{}/manifest.json", bad.id);
            store.store.put(&store.join(&key), serde_json::to_vec(&bad).unwrap().into()).await.unwrap();
            let err = restore(&store, None, &targets, &Progress::default()).await.unwrap_err().to_string();
            assert!(err.contains("unsafe path"), "{path}: {err}");
        }
    }

    #[tokio::test]
    async fn pruning_keeps_the_newest_and_the_objects_they_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::objects::open(dir.path().to_str().unwrap(), &[]).unwrap();
        let object = |sha: &str| ColdEntry { key: format!("k/{sha}"), bytes: 1, sha256: sha.into(), sealed: None };
        for (i, shas) in [vec!["aa", "bb"], vec!["bb", "cc"], vec!["cc"]].into_iter().enumerate() {
            let mut m = manifest(&format!("b{i}"), i as i64);
            m.cold_objects = shas.iter().map(|s| object(s)).collect();
            for o in &m.cold_objects {
                store.store.put(&store.join(&format!("objects/{}", o.sha256)), b"x".to_vec().into()).await.unwrap();
            }
            for (key, body) in [
                (format!("backups/{}/files/wal/1.wal", m.id), b"w".to_vec()),
                (format!("backups/{}/manifest.json", m.id), serde_json::to_vec(&m).unwrap()),
            ] {
                store.store.put(&store.join(&key), body.into()).await.unwrap();
            }
        }
        assert!(prune(&store, 0).await.is_err());
        let pruned = prune(&store, 2).await.unwrap();
        assert_eq!(pruned, Pruned { backups: vec!["b0".into()], objects: 1 });
        let left: Vec<String> = list(&store).await.unwrap().into_iter().map(|m| m.id).collect();
        assert_eq!(left, ["b1", "b2"]);
        assert!(!dir.path().join("backups/b0/files/wal/1.wal").exists());
        assert!(!dir.path().join("objects/aa").exists() && dir.path().join("objects/bb").exists());
        assert_eq!(prune(&store, 2).await.unwrap(), Pruned::default());
    }
}
