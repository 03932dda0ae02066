//! Search indexes over the hot tier: an HNSW index (usearch) over embeddings and a BM25 index (tantivy) over
//! text, plus a registry of every indexed record's filterable fields.
//!
//! The hot tier's writer feeds them inside its own critical section, after the table commit, so a query never
//! sees an index entry whose row is not in the table; an upsert of an existing key replaces its vector and its
//! text (same key), and [`SearchIndexes::remove`] takes a key out of all three. The indexes hold no data of their
//! own worth keeping: on restart the write-ahead log is replayed into the hot tier and they are rebuilt with it.
//!
//! Keys are the hot tier's 64-bit hash of `(kind, system_id, id)`; the registry maps them back.

pub mod filter;
pub mod text;
pub mod vector;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use akosha_protocol::{Record, RecordKind};

pub use filter::Filters;
use text::TextIndex;
use vector::VectorIndex;

/// Search index failures.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    /// The vector index refused an operation.
    #[error("vector index: {0}")]
    Vector(String),
    /// The text index refused an operation.
    #[error("text index: {0}")]
    Text(#[from] tantivy::TantivyError),
    /// The text query does not parse.
    #[error("text query: {0}")]
    Query(#[from] tantivy::query::QueryParserError),
    /// A query vector of the wrong size.
    #[error("the query embedding has {got} dimensions; records have {expected}")]
    Dimensions {
        /// Expected.
        expected: usize,
        /// Given.
        got: usize,
    },
}

/// What filters and result rows need of an indexed record, kept in memory.
#[derive(Debug, Clone)]
pub struct DocMeta {
    /// System id.
    pub system_id: Arc<str>,
    /// Record kind.
    pub kind: RecordKind,
    /// Record id.
    pub id: Box<str>,
    /// Project.
    pub project: Option<Arc<str>>,
    /// Category.
    pub category: Option<Arc<str>>,
    /// Tags.
    pub tags: Box<[Arc<str>]>,
    /// Timestamp, microseconds since the epoch.
    pub ts: i64,
}

impl DocMeta {
    /// The filterable fields of `r` (not interned: for short-lived entries).
    pub fn of(r: &Record) -> DocMeta {
        DocMeta {
            system_id: Arc::from(r.system_id.as_str()),
            kind: r.kind,
            id: Box::from(r.id.as_str()),
            project: r.project.as_deref().map(Arc::from),
            category: r.category.as_deref().map(Arc::from),
            tags: r.tags.iter().map(|t| Arc::from(t.as_str())).collect(),
            ts: r.ts,
        }
    }
}

/// Vectors written to the table but not yet in the ANN index, searched exactly, so that a burst faster than the
/// indexer is searchable at once. Entries leave when the indexer has taken in their version.
#[derive(Default)]
pub struct Tail {
    entries: RwLock<HashMap<u64, (DocMeta, Vec<f32>)>>,
}

impl Tail {
    /// Adds the vectors of records just written (replacing older versions of the same keys).
    pub fn add(&self, records: &[(u64, &Record)]) {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        for (key, r) in records {
            if let Some(e) = r.embedding.as_deref() {
                let norm = e.iter().map(|x| x * x).sum::<f32>().sqrt();
                let unit =
                    if norm > 0.0 && norm.is_finite() { e.iter().map(|x| x / norm).collect() } else { e.to_vec() };
                entries.insert(*key, (DocMeta::of(r), unit));
            }
        }
    }

    /// Removes keys whose version `ts` (or a newer one) is now indexed.
    pub fn indexed(&self, records: &[(u64, &Record)]) {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        if entries.is_empty() {
            return;
        }
        for (key, r) in records {
            if entries.get(key).is_some_and(|(d, _)| d.ts <= r.ts) {
                entries.remove(key);
            }
        }
    }

    /// Entries waiting.
    pub fn len(&self) -> usize {
        self.entries.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `key` has a version waiting (its indexed version, if any, is stale).
    pub fn contains(&self, key: u64) -> bool {
        self.entries.read().unwrap_or_else(|p| p.into_inner()).contains_key(&key)
    }

    /// The `k` nearest waiting records passing `filters`, exactly.
    pub fn search(&self, query: &[f32], k: usize, filters: &Filters) -> Vec<(u64, DocMeta, f32)> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        if entries.is_empty() {
            return Vec::new();
        }
        let norm = query.iter().map(|x| x * x).sum::<f32>().sqrt().max(f32::MIN_POSITIVE);
        let mut hits: Vec<(u64, DocMeta, f32)> = entries
            .iter()
            .filter(|(_, (d, v))| v.len() == query.len() && filters.matches(d))
            .map(|(key, (d, v))| (*key, d.clone(), v.iter().zip(query).map(|(a, b)| a * b).sum::<f32>() / norm))
            .filter(|(_, _, s)| filters.min_similarity.is_none_or(|min| *s >= min))
            .collect();
        hits.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)));
        hits.truncate(k);
        hits
    }
}

/// Strings that repeat across records (systems, projects, categories, tags) are stored once.
#[derive(Default)]
struct Interner(HashMap<Box<str>, Arc<str>>);

impl Interner {
    fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.0.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        self.0.insert(Box::from(s), a.clone());
        a
    }
}

fn meta(interner: &mut Interner, r: &Record) -> DocMeta {
    DocMeta {
        system_id: interner.get(&r.system_id),
        kind: r.kind,
        id: Box::from(r.id.as_str()),
        project: r.project.as_deref().map(|p| interner.get(p)),
        category: r.category.as_deref().map(|c| interner.get(c)),
        tags: r.tags.iter().map(|t| interner.get(t)).collect(),
        ts: r.ts,
    }
}

/// A tier's search indexes.
pub struct SearchIndexes {
    docs: RwLock<HashMap<u64, DocMeta>>,
    interner: std::sync::Mutex<Interner>,
    vectors: VectorIndex,
    text: TextIndex,
    /// Serialises vector writes of the indexer and the embedding backfill, so that a computed embedding never
    /// lands on a newer version of its record.
    vector_writes: std::sync::Mutex<()>,
}

impl SearchIndexes {
    /// Empty indexes for `dimensions`-float embeddings.
    pub fn new(dimensions: usize) -> Result<SearchIndexes, SearchError> {
        Ok(SearchIndexes {
            docs: RwLock::new(HashMap::new()),
            interner: std::sync::Mutex::new(Interner::default()),
            vectors: VectorIndex::new(dimensions)?,
            text: TextIndex::new()?,
            vector_writes: std::sync::Mutex::new(()),
        })
    }

    /// Indexes kept under `dir`: the text index in place, the vectors from the last [`SearchIndexes::save`].
    /// Errors mean the files are missing, torn or foreign: the caller rebuilds.
    pub fn open(dir: &std::path::Path, dimensions: usize) -> Result<SearchIndexes, SearchError> {
        Ok(SearchIndexes {
            docs: RwLock::new(HashMap::new()),
            interner: std::sync::Mutex::new(Interner::default()),
            vectors: VectorIndex::load(dir, dimensions)?,
            text: TextIndex::open(&dir.join("text"))?,
            vector_writes: std::sync::Mutex::new(()),
        })
    }

    /// Empty indexes kept under `dir` (whatever was there is deleted).
    pub fn create(dir: &std::path::Path, dimensions: usize) -> Result<SearchIndexes, SearchError> {
        let io = |e: std::io::Error| SearchError::Vector(format!("{}: {e}", dir.display()));
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(io)?;
        }
        std::fs::create_dir_all(dir).map_err(io)?;
        Ok(SearchIndexes {
            docs: RwLock::new(HashMap::new()),
            interner: std::sync::Mutex::new(Interner::default()),
            vectors: VectorIndex::new(dimensions)?,
            text: TextIndex::open(&dir.join("text"))?,
            vector_writes: std::sync::Mutex::new(()),
        })
    }

    /// Persists the vectors under `dir` (the text index persists on every commit).
    pub fn save(&self, dir: &std::path::Path) -> Result<(), SearchError> {
        let _writes = self.vector_writes.lock().unwrap_or_else(|p| p.into_inner());
        self.vectors.save(dir)
    }

    /// Brings the persisted vectors up to date, cheaply when only removals happened since the last save (see
    /// [`VectorIndex::save_changes`]).
    pub fn save_changes(&self, dir: &std::path::Path) -> Result<(), SearchError> {
        let _writes = self.vector_writes.lock().unwrap_or_else(|p| p.into_inner());
        self.vectors.save_changes(dir)
    }

    /// Registers what filters need of records whose vectors and text are already indexed (loading persisted
    /// indexes: the registry itself is rebuilt from the table).
    pub fn register(&self, records: &[(u64, &Record)]) {
        let mut interner = self.interner.lock().unwrap_or_else(|p| p.into_inner());
        let mut docs = self.docs.write().unwrap_or_else(|p| p.into_inner());
        for (key, r) in records {
            docs.insert(*key, meta(&mut interner, r));
        }
    }

    /// Indexes records that were just written to the table (new keys or replacements of stored ones).
    pub fn upsert(&self, records: &[(u64, &Record)]) -> Result<(), SearchError> {
        if records.is_empty() {
            return Ok(());
        }
        {
            let mut interner = self.interner.lock().unwrap_or_else(|p| p.into_inner());
            let mut docs = self.docs.write().unwrap_or_else(|p| p.into_inner());
            for (key, r) in records {
                docs.insert(*key, meta(&mut interner, r));
            }
        }
        let _writes = self.vector_writes.lock().unwrap_or_else(|p| p.into_inner());
        let with_vectors: Vec<(u64, &[f32])> =
            records.iter().filter_map(|(key, r)| r.embedding.as_deref().map(|e| (*key, e))).collect();
        // A replacement without an embedding must not keep the old one.
        for (key, r) in records {
            if r.embedding.is_none() {
                self.vectors.remove(*key)?;
            }
        }
        self.vectors.upsert(&with_vectors)?;
        self.text.upsert(records)?;
        Ok(())
    }

    /// Gives the version `ts` of record `key` a vector computed after it was indexed (embedding backfill).
    /// Returns false, changing nothing, when the record is gone, was replaced, or got a vector meanwhile.
    pub fn attach_vector(&self, key: u64, ts: i64, vector: &[f32]) -> Result<bool, SearchError> {
        let _writes = self.vector_writes.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.docs.read().unwrap_or_else(|p| p.into_inner()).get(&key).is_some_and(|d| d.ts == ts);
        if !current || self.vectors.contains(key) {
            return Ok(false);
        }
        self.vectors.upsert(&[(key, vector)])?;
        Ok(true)
    }

    /// Takes keys out of every index (records moved out of the hot tier or deleted).
    pub fn remove(&self, keys: &[u64]) -> Result<(), SearchError> {
        let _writes = self.vector_writes.lock().unwrap_or_else(|p| p.into_inner());
        {
            let mut docs = self.docs.write().unwrap_or_else(|p| p.into_inner());
            for key in keys {
                docs.remove(key);
            }
        }
        for key in keys {
            self.vectors.remove(*key)?;
        }
        self.text.remove(keys)
    }

    /// The `k` records nearest to `query` (cosine similarity, highest first) that pass `filters`.
    pub fn vector_search(
        &self,
        query: &[f32],
        k: usize,
        filters: &Filters,
    ) -> Result<Vec<(DocMeta, f32)>, SearchError> {
        let docs = self.docs.read().unwrap_or_else(|p| p.into_inner());
        let pass = |key: u64| docs.get(&key).is_some_and(|d| filters.matches(d));
        let hits = self.vectors.search(query, k, &pass)?;
        Ok(hits
            .into_iter()
            .filter(|(_, similarity)| filters.min_similarity.is_none_or(|min| *similarity >= min))
            .filter_map(|(key, similarity)| docs.get(&key).map(|d| (d.clone(), similarity)))
            .collect())
    }

    /// The `k` best BM25 matches for `query` that pass `filters`, with a highlighted snippet each; `peers` (other
    /// tiers' indexes) contribute their term statistics so that scores compare across tiers.
    pub fn text_search(
        &self,
        query: &str,
        k: usize,
        filters: &Filters,
        peers: &[&SearchIndexes],
    ) -> Result<Vec<(DocMeta, f32, text::Snippet)>, SearchError> {
        let peers: Vec<tantivy::Searcher> = peers.iter().map(|p| p.text.searcher()).collect();
        let hits = self.text.search(query, k, filters, &peers)?;
        let docs = self.docs.read().unwrap_or_else(|p| p.into_inner());
        Ok(hits
            .into_iter()
            .filter_map(|(key, score, snippet)| docs.get(&key).map(|d| (d.clone(), score, snippet)))
            .collect())
    }

    /// Makes text written so far searchable (the writer calls it once per applied batch).
    pub fn commit(&self) -> Result<(), SearchError> {
        self.text.commit()
    }

    /// Indexed records, and how many of them have a vector.
    pub fn sizes(&self) -> (usize, usize) {
        (self.docs.read().unwrap_or_else(|p| p.into_inner()).len(), self.vectors.len())
    }
}
