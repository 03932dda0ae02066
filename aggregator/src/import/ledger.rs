//! Which uploads were imported: a small JSON file in the aggregator's data directory, replaced atomically
//! after each upload whose records the aggregator acknowledged as durable, and guarded by a lock so two
//! importers never work on the same directory at once.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What is remembered of one imported upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Imported {
    /// The system it was imported as.
    pub system_id: String,
    /// Records delivered.
    pub records: u64,
    /// When the import finished (RFC 3339).
    pub imported_at: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Contents {
    /// Keyed by `<source url>#<manifest key>`.
    imported: BTreeMap<String, Imported>,
}

/// Why the ledger cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// Reading or writing failed.
    #[error("import ledger {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a ledger.
    #[error("import ledger {path} is damaged ({reason}); move it away to import everything again")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// serde's message.
        reason: String,
    },
    /// Another importer holds the lock.
    #[error("another import is running on {0} (it holds the lock file)")]
    Busy(PathBuf),
}

/// The opened ledger; holds the lock until dropped.
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    contents: Contents,
    _lock: File,
}

impl Ledger {
    /// Opens (or creates) the ledger at `path`, taking its lock.
    pub fn open(path: &Path) -> Result<Ledger, LedgerError> {
        let io = |source| LedgerError::Io { path: path.to_owned(), source };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let lock_path = path.with_extension("lock");
        let lock = File::options().create(true).truncate(false).write(true).open(&lock_path).map_err(io)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(LedgerError::Busy(lock_path)),
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        let contents = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| LedgerError::Damaged { path: path.to_owned(), reason: e.to_string() })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Contents::default(),
            Err(e) => return Err(io(e)),
        };
        Ok(Ledger { path: path.to_owned(), contents, _lock: lock })
    }

    /// The key of an upload.
    pub fn key(source: &str, manifest_key: &str) -> String {
        format!("{}#{manifest_key}", source.trim_end_matches('/'))
    }

    /// Whether the upload was imported.
    pub fn get(&self, key: &str) -> Option<&Imported> {
        self.contents.imported.get(key)
    }

    /// Number of uploads remembered.
    pub fn len(&self) -> usize {
        self.contents.imported.len()
    }

    /// Whether nothing was imported yet.
    pub fn is_empty(&self) -> bool {
        self.contents.imported.is_empty()
    }

    /// Records an upload as imported and makes that durable (write, fsync, rename, fsync directory).
    pub fn record(&mut self, key: String, imported: Imported) -> Result<(), LedgerError> {
        self.contents.imported.insert(key, imported);
        let io = |source| LedgerError::Io { path: self.path.clone(), source };
        let tmp = self.path.with_extension("tmp");
        let bytes = serde_json::to_vec_pretty(&self.contents).map_err(|e| io(std::io::Error::other(e)))?;
        let mut file = File::create(&tmp).map_err(io)?;
        file.write_all(&bytes).and_then(|()| file.sync_all()).map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_across_opens_and_refuses_a_second_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("imports.json");
        let key = Ledger::key("s3://b/", "systems/a/uploads/u/manifest.json");
        let entry = Imported { system_id: "a".into(), records: 3, imported_at: "2026-11-22T00:00:00Z".into() };
        {
            let mut ledger = Ledger::open(&path).unwrap();
            assert!(ledger.is_empty());
            assert!(matches!(Ledger::open(&path), Err(LedgerError::Busy(_))));
            ledger.record(key.clone(), entry.clone()).unwrap();
        }
        let ledger = Ledger::open(&path).unwrap();
        assert_eq!(ledger.get(&key), Some(&entry));
        assert_eq!(ledger.len(), 1);
        drop(ledger);
        std::fs::write(&path, b"{not json").unwrap();
        let err = Ledger::open(&path).unwrap_err();
        assert!(err.to_string().contains("is damaged"), "{err}");
    }
}
