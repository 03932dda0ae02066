//! The local cache of cold objects: files named by their sha256, fetched in parallel, verified before use,
//! evicted least-recently-used beyond a byte budget. A query holds a [`Lease`] on the files it reads, so that
//! eviction never removes a file under a running scan.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::StreamExt;
use sha2::{Digest, Sha256};

use super::ColdError;
use crate::objects::Location;

/// One object to have locally.
#[derive(Debug, Clone)]
pub struct Wanted {
    /// Object key inside the location.
    pub key: String,
    /// Its sha256 (hex), as the catalog recorded it.
    pub sha256: String,
    /// Its size.
    pub bytes: u64,
    /// Its wrapped data key when it is sealed: the cache holds the opened (plain Parquet) form.
    pub sealed: Option<crate::envelope::WrappedKey>,
}

struct Entry {
    bytes: u64,
    last_used: Instant,
    pins: usize,
}

/// The cache directory and its bookkeeping.
pub struct ObjectCache {
    dir: PathBuf,
    max_bytes: u64,
    keyring: Option<Arc<crate::envelope::Keyring>>,
    entries: Mutex<HashMap<String, Entry>>,
    /// Objects fetched from the store since start.
    pub fetched: std::sync::atomic::AtomicU64,
    /// Objects served from the cache since start.
    pub hits: std::sync::atomic::AtomicU64,
}

/// Files pinned for one scan; unpinned on drop.
pub struct Lease {
    cache: Arc<ObjectCache>,
    shas: Vec<String>,
    /// The local files, in the order asked for.
    pub paths: Vec<PathBuf>,
    /// Whether any of them stores int8 embeddings (see `EmbeddingEncoding`): readers pick the expression.
    pub int8: bool,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut entries = self.cache.entries.lock().unwrap_or_else(|p| p.into_inner());
        for sha in &self.shas {
            if let Some(e) = entries.get_mut(sha) {
                e.pins = e.pins.saturating_sub(1);
            }
        }
    }
}

impl ObjectCache {
    /// Opens (creating) the directory and takes stock of what is already there; partial downloads are removed.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        keyring: Option<Arc<crate::envelope::Keyring>>,
    ) -> Result<ObjectCache, ColdError> {
        let io = |e: std::io::Error| ColdError::Io(format!("cold cache {}: {e}", dir.display()));
        std::fs::create_dir_all(dir.join("tmp")).map_err(io)?;
        for leftover in std::fs::read_dir(dir.join("tmp")).map_err(io)?.flatten() {
            // Partial downloads are files; an interrupted move's export is a directory.
            let _ = std::fs::remove_file(leftover.path()).or_else(|_| std::fs::remove_dir_all(leftover.path()));
        }
        let mut entries = HashMap::new();
        for file in std::fs::read_dir(dir).map_err(io)?.flatten() {
            let name = file.file_name().to_string_lossy().into_owned();
            if let Some(sha) = name.strip_suffix(".parquet")
                && let Ok(meta) = file.metadata()
            {
                entries.insert(sha.to_owned(), Entry { bytes: meta.len(), last_used: Instant::now(), pins: 0 });
            }
        }
        Ok(ObjectCache {
            dir: dir.to_owned(),
            max_bytes,
            keyring,
            entries: Mutex::new(entries),
            fetched: Default::default(),
            hits: Default::default(),
        })
    }

    /// Where the files being written or downloaded go first.
    pub fn tmp_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    fn path_of(&self, sha: &str) -> PathBuf {
        self.dir.join(format!("{sha}.parquet"))
    }

    /// Bytes held.
    pub fn size_bytes(&self) -> u64 {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).values().map(|e| e.bytes).sum()
    }

    /// Adopts a file the tier has just written and verified (the upload's source), so that the first query
    /// does not download it again.
    pub fn adopt(&self, file: &Path, sha: &str) -> Result<(), ColdError> {
        let bytes = std::fs::metadata(file).map_err(|e| ColdError::Io(format!("{}: {e}", file.display())))?.len();
        std::fs::rename(file, self.path_of(sha)).map_err(|e| ColdError::Io(format!("{}: {e}", file.display())))?;
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sha.to_owned(), Entry { bytes, last_used: Instant::now(), pins: 0 });
        self.evict();
        Ok(())
    }

    /// Makes every wanted object local (downloading the missing ones, `parallel` at a time, each checked against
    /// its sha256) and pins them for the caller.
    pub async fn lease(
        self: &Arc<Self>,
        location: &Location,
        wanted: &[Wanted],
        parallel: usize,
    ) -> Result<Lease, ColdError> {
        let needed: u64 = wanted.iter().map(|w| w.bytes).sum();
        if needed > self.max_bytes {
            return Err(ColdError::TooLarge { needed, budget: self.max_bytes });
        }
        // Pin first (also what is not here yet), so that a concurrent eviction cannot take what this scan needs.
        let mut present = Vec::new();
        let mut missing: Vec<&Wanted> = Vec::new();
        {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            for w in wanted {
                match entries.get_mut(&w.sha256) {
                    Some(e) => {
                        e.pins += 1;
                        e.last_used = Instant::now();
                        present.push(w.sha256.clone());
                    }
                    None if missing.iter().any(|m| m.sha256 == w.sha256) => {}
                    None => missing.push(w),
                }
            }
        }
        self.hits.fetch_add(present.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let mut lease = Lease {
            cache: self.clone(),
            shas: present,
            paths: wanted.iter().map(|w| self.path_of(&w.sha256)).collect(),
            int8: false,
        };
        let mut downloads = futures_util::stream::iter(missing.into_iter().map(|w| self.download(location, w)))
            .buffer_unordered(parallel.max(1));
        let mut first_error = None;
        while let Some(done) = downloads.next().await {
            match done {
                Ok(sha) => lease.shas.push(sha),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        drop(downloads);
        if let Some(e) = first_error {
            return Err(e);
        }
        self.evict();
        Ok(lease)
    }

    async fn download(&self, location: &Location, wanted: &Wanted) -> Result<String, ColdError> {
        let path = location.join(&wanted.key);
        let bytes = location
            .store
            .get(&path)
            .await
            .map_err(|e| ColdError::Store(format!("GET {}: {e}", wanted.key)))?
            .bytes()
            .await
            .map_err(|e| ColdError::Store(format!("GET {}: {e}", wanted.key)))?;
        let sha = hex(&Sha256::digest(&bytes));
        if sha != wanted.sha256 {
            return Err(ColdError::Corrupt(format!(
                "{} has sha256 {sha}, the catalog says {}",
                wanted.key, wanted.sha256
            )));
        }
        let bytes = match &wanted.sealed {
            None => bytes,
            Some(wrapped) => {
                let sealed_err =
                    |error: crate::envelope::EnvelopeError| ColdError::Sealed { key: wanted.key.clone(), error };
                let keyring = self
                    .keyring
                    .as_ref()
                    .ok_or_else(|| sealed_err(crate::envelope::EnvelopeError::UnknownKey(wrapped.kek_id.clone())))?;
                bytes::Bytes::from(keyring.open(wrapped, &bytes).map_err(sealed_err)?)
            }
        };
        let tmp = self.tmp_dir().join(format!("{sha}.{}", rand::random::<u64>()));
        let io = |e: std::io::Error| ColdError::Io(format!("cold cache {}: {e}", self.dir.display()));
        tokio::fs::write(&tmp, &bytes).await.map_err(io)?;
        tokio::fs::rename(&tmp, self.path_of(&sha)).await.map_err(io)?;
        self.fetched.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let entry = entries.entry(sha.clone()).or_insert(Entry { bytes: 0, last_used: Instant::now(), pins: 0 });
        entry.bytes = bytes.len() as u64;
        entry.pins += 1;
        entry.last_used = Instant::now();
        Ok(sha)
    }

    /// Drops unpinned files, least recently used first, until the cache fits its budget.
    fn evict(&self) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut total: u64 = entries.values().map(|e| e.bytes).sum();
        if total <= self.max_bytes {
            return;
        }
        let mut idle: Vec<(Instant, String, u64)> =
            entries.iter().filter(|(_, e)| e.pins == 0).map(|(s, e)| (e.last_used, s.clone(), e.bytes)).collect();
        idle.sort();
        for (_, sha, bytes) in idle {
            if total <= self.max_bytes {
                break;
            }
            let _ = std::fs::remove_file(self.path_of(&sha));
            entries.remove(&sha);
            total -= bytes;
        }
    }

    /// Drops every unpinned file (benchmarks measure a cold cache with it).
    pub fn clear(&self) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.retain(|sha, e| {
            if e.pins > 0 {
                return true;
            }
            let _ = std::fs::remove_file(self.path_of(sha));
            false
        });
    }

    /// Forgets a file (its object was replaced by compaction).
    pub fn forget(&self, sha: &str) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.get(sha).is_some_and(|e| e.pins == 0) {
            entries.remove(sha);
            let _ = std::fs::remove_file(self.path_of(sha));
        }
    }
}

/// Lower-case hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
