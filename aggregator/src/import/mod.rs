//! `akosha-aggregator import <url>`: Session-Buddy cloud uploads, from a bucket into the aggregator.
//!
//! Session-Buddy's cloud sync writes `systems/<system>/uploads/<upload>/manifest.json` next to gzip'd copies of
//! its DuckDB files. The importer lists upload directories (by delimiter, so data files are never listed), skips
//! the uploads its ledger says were imported, and for each new one fetches and checks the manifest, downloads
//! and decompresses the files, reads them with the same reader as the agent's snapshots (same records, same
//! dedup keys), and delivers the records as system `<system>` through the aggregator's normal receive path
//! (QUIC + mTLS, write-ahead log, dedup). Only once the aggregator has acknowledged every record as durable is
//! the upload written to the ledger; an interrupted upload resumes where the aggregator's log ends.
//!
//! One bad upload (corrupt object, unreadable database, foreign manifest) is reported and skipped; the others
//! are imported. An upload without a manifest yet is still being written and is left for the next pass.

pub mod ledger;
pub mod manifest;
pub mod session;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use akosha_protocol::Record;
use futures_util::StreamExt;
use indicatif::ProgressBar;
use object_store::ObjectStore;
use object_store::path::Path as ObjectPath;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::objects::Location;
use ledger::{Imported, Ledger, LedgerError};
use manifest::{Manifest, ManifestFile};
pub use session::Destination;

/// What an import needs.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Where the uploads are.
    pub location: Location,
    /// The aggregator to deliver to.
    pub destination: Destination,
    /// The ledger of imported uploads.
    pub ledger: PathBuf,
    /// Scratch space for downloaded and decompressed files (emptied after each upload).
    pub work_dir: PathBuf,
    /// Zone of the naive timestamps in the uploaded databases (the uploading machine's).
    pub zone: jiff::tz::TimeZone,
}

/// What one pass did.
#[derive(Debug, Default)]
pub struct ImportReport {
    /// Upload directories found.
    pub found: usize,
    /// Of those, imported by an earlier pass.
    pub already_imported: usize,
    /// Still being written (no manifest yet); tried again next pass.
    pub incomplete: usize,
    /// Imported in this pass: `(system, upload, records)`.
    pub imported: Vec<(String, String, u64)>,
    /// Records the reader produced that were invalid and skipped.
    pub invalid_records: u64,
    /// Uploads that failed: `(manifest key, reason)`.
    pub failed: Vec<(String, String)>,
}

impl ImportReport {
    /// Records delivered in this pass.
    pub fn records(&self) -> u64 {
        self.imported.iter().map(|(_, _, n)| n).sum()
    }
}

/// Why a pass could not run at all (individual uploads failing are in the report instead).
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The ledger cannot be used.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The bucket cannot be listed.
    #[error("cannot list {url}: {source}")]
    List {
        /// The location.
        url: String,
        /// Why.
        #[source]
        source: object_store::Error,
    },
}

/// One upload directory.
#[derive(Debug, Clone)]
struct Candidate {
    system: String,
    upload: String,
    manifest: ObjectPath,
}

/// Runs one import pass. `progress` shows uploads done out of uploads pending (pass `ProgressBar::hidden()`
/// when nobody watches).
pub async fn import_once(options: &ImportOptions, progress: &ProgressBar) -> Result<ImportReport, ImportError> {
    let mut ledger = Ledger::open(&options.ledger)?;
    let candidates = discover(&options.location).await?;
    let mut report = ImportReport { found: candidates.len(), ..ImportReport::default() };
    let pending: Vec<Candidate> = candidates
        .into_iter()
        .filter(|c| ledger.get(&Ledger::key(&options.location.url, c.manifest.as_ref())).is_none())
        .collect();
    report.already_imported = report.found - pending.len();
    progress.set_length(pending.len() as u64);
    progress.set_position(0);
    for candidate in pending {
        let key = Ledger::key(&options.location.url, candidate.manifest.as_ref());
        progress.set_message(format!("{}/{}", candidate.system, candidate.upload));
        match import_upload(options, &candidate, &key, progress).await {
            Ok(Outcome::Incomplete) => report.incomplete += 1,
            Ok(Outcome::Delivered { records, invalid }) => {
                report.invalid_records += invalid;
                let imported = Imported {
                    system_id: candidate.system.clone(),
                    records,
                    imported_at: jiff::Timestamp::now().to_string(),
                };
                ledger.record(key, imported)?;
                info!(message = "Imported a Session-Buddy upload.", system_id = %candidate.system, upload = %candidate.upload, records, invalid);
                report.imported.push((candidate.system, candidate.upload, records));
            }
            Err(reason) => {
                warn!(message = "Upload not imported.", manifest = %candidate.manifest, %reason);
                report.failed.push((candidate.manifest.to_string(), reason));
            }
        }
        progress.inc(1);
    }
    progress.finish_and_clear();
    Ok(report)
}

/// Runs passes every `interval` until `shutdown` resolves. A pass that cannot run is logged and retried.
pub async fn watch(options: &ImportOptions, interval: Duration, shutdown: impl std::future::Future<Output = ()>) {
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        match import_once(options, &ProgressBar::hidden()).await {
            Ok(report) => info!(
                message = "Import pass finished.",
                found = report.found,
                imported = report.imported.len(),
                records = report.records(),
                failed = report.failed.len(),
                incomplete = report.incomplete,
            ),
            Err(error) => warn!(message = "Import pass failed; retrying at the next interval.", %error),
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = &mut shutdown => return,
        }
    }
}

/// Lists `systems/*/uploads/*/` directories, sorted.
async fn discover(location: &Location) -> Result<Vec<Candidate>, ImportError> {
    let list_err = |source| ImportError::List { url: location.url.clone(), source };
    let store = &location.store;
    let mut out = Vec::new();
    let systems = store.list_with_delimiter(Some(&location.join("systems"))).await.map_err(list_err)?;
    for system_dir in systems.common_prefixes {
        let Some(system) = system_dir.filename().map(str::to_owned) else { continue };
        let uploads = store.list_with_delimiter(Some(&system_dir.child("uploads"))).await.map_err(list_err)?;
        for upload_dir in uploads.common_prefixes {
            let Some(upload) = upload_dir.filename().map(str::to_owned) else { continue };
            out.push(Candidate { system: system.clone(), upload, manifest: upload_dir.child("manifest.json") });
        }
    }
    out.sort_by(|a, b| a.manifest.as_ref().cmp(b.manifest.as_ref()));
    Ok(out)
}

enum Outcome {
    Incomplete,
    Delivered { records: u64, invalid: u64 },
}

async fn import_upload(
    options: &ImportOptions,
    candidate: &Candidate,
    key: &str,
    progress: &ProgressBar,
) -> Result<Outcome, String> {
    let store = &options.location.store;
    let manifest_bytes = match store.get(&candidate.manifest).await {
        Ok(found) => found.bytes().await.map_err(|e| format!("reading the manifest: {e}"))?,
        Err(object_store::Error::NotFound { .. }) => return Ok(Outcome::Incomplete),
        Err(e) => return Err(format!("fetching the manifest: {e}")),
    };
    let manifest = Manifest::parse(&manifest_bytes, candidate.manifest.as_ref(), &candidate.system, &candidate.upload)
        .map_err(|e| e.to_string())?;

    let work = options.work_dir.join(format!("{}-{}", candidate.system, candidate.upload));
    let _cleanup = RemoveOnDrop(work.clone());
    std::fs::create_dir_all(&work).map_err(|e| format!("creating {}: {e}", work.display()))?;
    let mut databases = Vec::new();
    for file in &manifest.files {
        progress.set_message(format!("{}/{}: downloading {}", candidate.system, candidate.upload, file.name));
        let object = options.location.join(file.relative_key());
        databases.push(fetch_file(store.as_ref(), &object, file, &work).await?);
    }

    progress.set_message(format!("{}/{}: reading", candidate.system, candidate.upload));
    let system_id = manifest.system_id.clone();
    let zone = options.zone.clone();
    let (records, invalid) = tokio::task::spawn_blocking(move || read_databases(&databases, &system_id, &zone))
        .await
        .map_err(|e| format!("reader failed: {e}"))??;

    let total = records.len() as u64;
    let message = format!("{}/{}: sending", candidate.system, candidate.upload);
    progress.set_message(format!("{message} 0/{total} records"));
    let epoch = epoch_of(key);
    session::deliver(&options.destination, &manifest.system_id, epoch, &records, |acked| {
        progress.set_message(format!("{message} {acked}/{total} records"));
    })
    .await
    .map_err(|e| e.to_string())?;
    Ok(Outcome::Delivered { records: total, invalid })
}

/// Downloads one file of an upload, checks it and returns the path of the (decompressed) database.
async fn fetch_file(
    store: &dyn ObjectStore,
    object: &ObjectPath,
    file: &ManifestFile,
    work: &Path,
) -> Result<PathBuf, String> {
    let downloaded = work.join(format!("{}.download", file.name));
    let result = store.get(object).await.map_err(|e| format!("fetching {object}: {e}"))?;
    let mut stream = result.into_stream();
    let mut out = std::fs::File::create(&downloaded).map_err(|e| format!("{}: {e}", downloaded.display()))?;
    let mut raw_hash = Sha256::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| format!("downloading {object}: {e}"))?;
        raw_hash.update(&chunk);
        out.write_all(&chunk).map_err(|e| format!("{}: {e}", downloaded.display()))?;
    }
    drop(out);
    let raw_hash = hex(&raw_hash.finalize());

    let database = work.join(&file.name);
    let decoded_hash = if file.gzipped() {
        let (from, to) = (downloaded.clone(), database.clone());
        tokio::task::spawn_blocking(move || gunzip(&from, &to))
            .await
            .map_err(|e| format!("decompressing {object}: {e}"))?
            .map_err(|e| format!("{object} is not valid gzip: {e}"))?
    } else {
        std::fs::rename(&downloaded, &database).map_err(|e| format!("{}: {e}", database.display()))?;
        raw_hash.clone()
    };
    if let Some(expected) = file.expected_sha256() {
        // The manifest does not say whether it hashed the object or its content: either matches.
        if expected != raw_hash && expected != decoded_hash {
            return Err(format!("{object}: checksum mismatch (manifest says {expected}, object is {raw_hash})"));
        }
    }
    Ok(database)
}

/// Decompresses `from` into `to`, returning the hex SHA-256 of the result. The gzip trailer's CRC and length
/// are checked by the decoder, so a truncated or damaged object is an error here, not a puzzling database.
fn gunzip(from: &Path, to: &Path) -> std::io::Result<String> {
    let mut decoder = flate2::read::MultiGzDecoder::new(std::io::BufReader::new(std::fs::File::open(from)?));
    let mut out = HashingWriter { inner: std::fs::File::create(to)?, hash: Sha256::new() };
    // A hostile object must not fill the aggregator's disk: no Session-Buddy database comes near this.
    let copied = std::io::copy(&mut std::io::Read::take(&mut decoder, MAX_DATABASE_BYTES + 1), &mut out)?;
    if copied > MAX_DATABASE_BYTES {
        return Err(std::io::Error::other(format!("decompresses to more than {MAX_DATABASE_BYTES} bytes")));
    }
    out.inner.sync_all()?;
    std::fs::remove_file(from)?;
    Ok(hex(&out.hash.finalize()))
}

/// Largest decompressed database the importer accepts (16 GiB).
const MAX_DATABASE_BYTES: u64 = 16 << 30;

struct HashingWriter {
    inner: std::fs::File,
    hash: Sha256,
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Reads every downloaded database; returns the valid records (sorted, so that a resumed import numbers them
/// the same way) and how many were invalid.
fn read_databases(paths: &[PathBuf], system_id: &str, zone: &jiff::tz::TimeZone) -> Result<(Vec<Record>, u64), String> {
    let mut records = Vec::new();
    for path in paths {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let conn = akosha_session_buddy::open_read_only(path)
            .map_err(|e| format!("{name} is not a readable DuckDB database: {e}"))?;
        records
            .extend(akosha_session_buddy::read_database(&conn, system_id, zone).map_err(|e| format!("{name}: {e}"))?);
    }
    let before = records.len();
    records.retain(|r| match r.validate() {
        Ok(()) => true,
        Err(error) => {
            warn!(message = "Skipping an invalid imported row.", kind = r.kind.as_str(), id = %r.id, %error);
            false
        }
    });
    let invalid = (before - records.len()) as u64;
    records.sort_by(|a, b| (a.kind.as_str(), &a.id).cmp(&(b.kind.as_str(), &b.id)));
    Ok((records, invalid))
}

/// A buffer epoch per upload, stable across runs: the aggregator's high-water mark for it is where an
/// interrupted import resumes. The top bit keeps it apart from agents' epochs in logs.
fn epoch_of(key: &str) -> u64 {
    let digest = Sha256::digest(key.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(bytes) | (1 << 63)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_are_stable_and_distinct() {
        assert_eq!(epoch_of("s3://b#x"), epoch_of("s3://b#x"));
        assert_ne!(epoch_of("s3://b#x"), epoch_of("s3://b#y"));
        assert!(epoch_of("a") >= 1 << 63);
    }

    #[test]
    fn gunzip_rejects_a_truncated_object() {
        let dir = tempfile::tempdir().unwrap();
        let fixture = crate::crate_path(
            "../../shared/fixtures/session-buddy/cloud_upload_small/systems/edge-host-1/uploads/20261122_094622_edge-host-1/knowledge_graph.duckdb",
        );
        let bytes = std::fs::read(fixture).unwrap();
        let whole = dir.path().join("whole");
        std::fs::write(&whole, &bytes).unwrap();
        let hash = gunzip(&whole, &dir.path().join("out")).unwrap();
        assert_eq!(hash, "232a7bec3e97971bc238ad053179380726d540c84779babe796c894e563afe91");
        let cut = dir.path().join("cut");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        assert!(gunzip(&cut, &dir.path().join("out2")).is_err());
    }
}
