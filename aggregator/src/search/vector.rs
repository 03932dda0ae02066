//! HNSW over embeddings (usearch) with exact re-ranking.
//!
//! The graph holds half-precision copies of the vectors (half the memory traffic of `f32` when building and
//! walking it; 8-bit copies were faster still but cannot tell apart the near neighbours inside a dense
//! cluster, which cost a third of recall@10 at a million vectors); every search takes a few times more
//! candidates than asked for and scores them exactly against the full-precision vectors kept beside the graph
//! in one contiguous slab, so similarities and `min_similarity` are exact (BENCHMARKS.md).
//!
//! usearch adds and searches concurrently once capacity is reserved; growing the capacity needs the index to
//! itself, hence the lock: a read lock for add/search/remove, the write lock only to reserve more room.

use std::collections::HashMap;
use std::sync::RwLock;

use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

use super::SearchError;

/// Graph degree and build/search breadth: recall@10 0.998 at 1M dense clustered 384-dim vectors with ef 128
/// (p99 1.7 ms), building ~1,300 vectors/s on one core; 16/64 built 1.5× faster but stopped at 0.947 whatever
/// the search breadth (BENCHMARKS.md). Vectors the indexer has not reached yet are searched exactly meanwhile.
const CONNECTIVITY: usize = 24;
const EXPANSION_ADD: usize = 96;
const EXPANSION_SEARCH: usize = 128;
/// Candidates taken from the graph per result asked for, before exact re-ranking.
const OVERSAMPLE: usize = 3;
/// Concurrent operations usearch reserves per-thread state for.
const THREADS: usize = 8;

/// The vector index.
pub struct VectorIndex {
    index: RwLock<Index>,
    /// Full-precision vectors, normalised, for exact scoring.
    exact: RwLock<Slab>,
    dimensions: usize,
    /// Candidates taken from the graph per wanted result, re-ranked exactly.
    oversample: std::sync::atomic::AtomicUsize,
    /// The search breadth was set explicitly and no longer follows the size.
    fixed_expansion: std::sync::atomic::AtomicBool,
    /// How memory differs from the files last saved or loaded.
    since_save: std::sync::Mutex<SinceSave>,
}

/// What changed since the index was last written in full (or read). While the only changes are removals, a list
/// of the removed keys brings the saved files up to date: a warm→cold move then writes a few bytes per record
/// that left instead of the whole graph and every vector still in warm.
#[derive(Default)]
struct SinceSave {
    /// The checksum of the `vectors.exact` written or read last (`None`: no saved files match memory, e.g. an
    /// index never saved: then nothing is tracked).
    exact_crc: Option<u32>,
    /// Vectors were added or replaced since: only a full save captures them.
    added: bool,
    /// Keys removed since (each at most once: a key cannot be removed again without being added back).
    removed: Vec<u64>,
}

/// Search breadth for an index of `capacity` vectors: HNSW needs a wider beam as the graph grows to keep the
/// same recall. Measured at 1M clustered vectors (BENCHMARKS.md): with this graph (connectivity 24,
/// expansion_add 96) recall@10 is 0.998 already at ef 128; the narrower graph it replaced (16/64) needed ef 512
/// for 0.947 and got no more from a wider beam. One per four thousand vectors, between the default and 256,
/// keeps a margin for larger or harder data at ~2 ms p99.
fn expansion_for(capacity: usize) -> usize {
    (capacity / 4000).clamp(EXPANSION_SEARCH, 256)
}

fn err(e: impl std::fmt::Display) -> SearchError {
    SearchError::Vector(e.to_string())
}

impl VectorIndex {
    /// An empty index for `dimensions`-float vectors.
    pub fn new(dimensions: usize) -> Result<VectorIndex, SearchError> {
        Self::with_graph(dimensions, CONNECTIVITY, EXPANSION_ADD)
    }

    /// An empty index with a given graph width (benchmarks compare them; `new` uses the aggregator's).
    pub fn with_graph(
        dimensions: usize,
        connectivity: usize,
        expansion_add: usize,
    ) -> Result<VectorIndex, SearchError> {
        let options = IndexOptions {
            dimensions,
            metric: MetricKind::Cos,
            quantization: ScalarKind::F16,
            connectivity,
            expansion_add,
            expansion_search: EXPANSION_SEARCH,
            multi: false,
        };
        let index = Index::new(&options).map_err(err)?;
        index.reserve_capacity_and_threads(1024, THREADS).map_err(err)?;
        Ok(VectorIndex {
            index: RwLock::new(index),
            exact: RwLock::new(Slab::new(dimensions)),
            dimensions,
            oversample: std::sync::atomic::AtomicUsize::new(OVERSAMPLE),
            fixed_expansion: std::sync::atomic::AtomicBool::new(false),
            since_save: std::sync::Mutex::new(SinceSave::default()),
        })
    }

    /// Adds or replaces vectors (keys already present are removed first). Vectors of the wrong size are skipped:
    /// the receive path has validated them already.
    pub fn upsert(&self, vectors: &[(u64, &[f32])]) -> Result<(), SearchError> {
        if vectors.is_empty() {
            return Ok(());
        }
        self.since_save.lock().unwrap_or_else(|p| p.into_inner()).added = true;
        self.ensure_capacity(vectors.len())?;
        {
            let mut exact = self.exact.write().unwrap_or_else(|p| p.into_inner());
            for (key, vector) in vectors {
                if vector.len() == self.dimensions {
                    exact.insert(*key, &normalised(vector));
                }
            }
        }
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        let add = |chunk: &[(u64, &[f32])]| -> Result<(), SearchError> {
            for (key, vector) in chunk {
                if vector.len() != self.dimensions {
                    continue;
                }
                if index.contains(*key) {
                    index.remove(*key).map_err(err)?;
                }
                index.add(*key, vector).map_err(err)?;
            }
            Ok(())
        };
        // Insertion is the costly part of HNSW: large batches use every core but one, which stays with ingest.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).saturating_sub(1).clamp(1, THREADS);
        if vectors.len() < 2_000 || threads < 2 {
            return add(vectors);
        }
        let chunk = vectors.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let handles: Vec<_> = vectors.chunks(chunk).map(|part| scope.spawn(move || add(part))).collect();
            handles.into_iter().try_for_each(|h| h.join().unwrap_or_else(|_| Err(err("indexing thread panicked"))))
        })
    }

    fn ensure_capacity(&self, more: usize) -> Result<(), SearchError> {
        let needed = {
            let index = self.index.read().unwrap_or_else(|p| p.into_inner());
            let needed = index.size() + more;
            if needed <= index.capacity() {
                return Ok(());
            }
            needed
        };
        let index = self.index.write().unwrap_or_else(|p| p.into_inner());
        let capacity = needed.next_power_of_two();
        index.reserve_capacity_and_threads(capacity, THREADS).map_err(err)?;
        // Growing under the write lock is also when the search breadth follows the size (no search runs).
        if !self.fixed_expansion.load(std::sync::atomic::Ordering::Relaxed) {
            index.change_expansion_search(expansion_for(capacity));
        }
        Ok(())
    }

    /// Removes a key, if present.
    pub fn remove(&self, key: u64) -> Result<(), SearchError> {
        let was_there = self.exact.write().unwrap_or_else(|p| p.into_inner()).remove(key);
        if was_there {
            let mut since = self.since_save.lock().unwrap_or_else(|p| p.into_inner());
            if since.exact_crc.is_some() && !since.added {
                since.removed.push(key);
            }
        }
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        if index.contains(key) {
            index.remove(key).map_err(err)?;
        }
        Ok(())
    }

    /// Writes the graph and the exact vectors under `dir` (`vectors.usearch`, `vectors.exact`), each through a
    /// temporary file renamed into place, so a crash leaves the previous save or the new one.
    pub fn save(&self, dir: &std::path::Path) -> Result<(), SearchError> {
        // Held throughout, so that no addition or removal falls between the snapshot written and the reset of
        // what changed since (lock order: `since_save` before `index` and `exact`; nobody takes it holding them).
        let mut since = self.since_save.lock().unwrap_or_else(|p| p.into_inner());
        let graph = dir.join("vectors.usearch");
        let graph_tmp = dir.join("vectors.usearch.tmp");
        let graph_tmp_str = graph_tmp.to_str().ok_or_else(|| err("index path is not UTF-8"))?;
        self.index.read().unwrap_or_else(|p| p.into_inner()).save(graph_tmp_str).map_err(err)?;
        let exact = self.exact.read().unwrap_or_else(|p| p.into_inner());
        let mut bytes = Vec::with_capacity(24 + exact.len() * (8 + 4 * self.dimensions));
        bytes.extend_from_slice(EXACT_MAGIC);
        bytes.extend_from_slice(&(self.dimensions as u32).to_le_bytes());
        bytes.extend_from_slice(&(exact.len() as u64).to_le_bytes());
        for (key, vector) in exact.iter() {
            bytes.extend_from_slice(&key.to_le_bytes());
            for v in vector {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
        }
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        drop(exact);
        let exact_tmp = dir.join("vectors.exact.tmp");
        let io = |e: std::io::Error| err(format!("saving vectors under {}: {e}", dir.display()));
        write_synced(&exact_tmp, &bytes).map_err(io)?;
        std::fs::rename(&graph_tmp, &graph).map_err(io)?;
        std::fs::rename(&exact_tmp, dir.join("vectors.exact")).map_err(io)?;
        *since = SinceSave { exact_crc: Some(crc), added: false, removed: Vec::new() };
        // A removal list left by a crash (or a failed delete) right here names the previous `vectors.exact`:
        // loading ignores it, and the next `save_changes` replaces it.
        match std::fs::remove_file(dir.join(REMOVED_FILE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(e)),
            _ => Ok(()),
        }
    }

    /// Brings the files under `dir` up to date the cheap way when the only changes since they were written are
    /// removals (a list of the removed keys, `vectors.removed`), else saves in full ([`VectorIndex::save`]).
    pub fn save_changes(&self, dir: &std::path::Path) -> Result<(), SearchError> {
        let since = self.since_save.lock().unwrap_or_else(|p| p.into_inner());
        let Some(exact_crc) = since.exact_crc.filter(|_| !since.added) else {
            drop(since);
            return self.save(dir);
        };
        let mut bytes = Vec::with_capacity(24 + 8 * since.removed.len());
        bytes.extend_from_slice(REMOVED_MAGIC);
        bytes.extend_from_slice(&exact_crc.to_le_bytes());
        bytes.extend_from_slice(&(since.removed.len() as u64).to_le_bytes());
        for key in &since.removed {
            bytes.extend_from_slice(&key.to_le_bytes());
        }
        drop(since);
        bytes.extend_from_slice(&crc32c::crc32c(&bytes).to_le_bytes());
        let tmp = dir.join("vectors.removed.tmp");
        let io = |e: std::io::Error| err(format!("saving removed vectors under {}: {e}", dir.display()));
        write_synced(&tmp, &bytes).map_err(io)?;
        std::fs::rename(&tmp, dir.join(REMOVED_FILE)).map_err(io)
    }

    /// Reads what [`VectorIndex::save`] wrote; an error (missing, torn or foreign files) means: rebuild.
    pub fn load(dir: &std::path::Path, dimensions: usize) -> Result<VectorIndex, SearchError> {
        let index = VectorIndex::new(dimensions)?;
        let graph = dir.join("vectors.usearch");
        let graph_str = graph.to_str().ok_or_else(|| err("index path is not UTF-8"))?;
        {
            let native = index.index.write().unwrap_or_else(|p| p.into_inner());
            native.load(graph_str).map_err(err)?;
            // A loaded index has exactly its own size as capacity; inserts need room and per-thread state.
            let size = native.size();
            native.reserve_capacity_and_threads((size + 1024).next_power_of_two(), THREADS).map_err(err)?;
            native.change_expansion_search(expansion_for((size + 1024).next_power_of_two()));
        }
        let bytes = std::fs::read(dir.join("vectors.exact")).map_err(|e| err(format!("vectors.exact: {e}")))?;
        let corrupt = || err("vectors.exact is torn or not ours");
        if bytes.len() < 24 || &bytes[..8] != EXACT_MAGIC {
            return Err(corrupt());
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32c::crc32c(body).to_le_bytes() != crc {
            return Err(corrupt());
        }
        let dims = u32::from_le_bytes(body[8..12].try_into().map_err(|_| corrupt())?) as usize;
        let count = u64::from_le_bytes(body[12..20].try_into().map_err(|_| corrupt())?) as usize;
        let entry = 8 + 4 * dims;
        if dims != dimensions || body.len() != 20 + count * entry {
            return Err(corrupt());
        }
        {
            let mut exact = index.exact.write().unwrap_or_else(|p| p.into_inner());
            let mut vector = vec![0f32; dims];
            for chunk in body[20..].chunks_exact(entry) {
                let key = u64::from_le_bytes(chunk[..8].try_into().map_err(|_| corrupt())?);
                for (v, b) in vector.iter_mut().zip(chunk[8..].chunks_exact(4)) {
                    *v = f32::from_le_bytes(b.try_into().map_err(|_| corrupt())?);
                }
                exact.insert(key, &vector);
            }
        }
        if index.exact.read().unwrap_or_else(|p| p.into_inner()).len() != index.len() {
            return Err(err("the graph and the exact vectors disagree"));
        }
        let exact_crc = u32::from_le_bytes(crc.try_into().map_err(|_| corrupt())?);
        let removed = read_removed(dir, exact_crc)?;
        for key in &removed {
            index.remove(*key)?;
        }
        *index.since_save.lock().unwrap_or_else(|p| p.into_inner()) =
            SinceSave { exact_crc: Some(exact_crc), added: false, removed };
        Ok(index)
    }

    /// Whether `key` has a vector.
    pub fn contains(&self, key: u64) -> bool {
        self.index.read().unwrap_or_else(|p| p.into_inner()).contains(key)
    }

    /// Vectors held.
    pub fn len(&self) -> usize {
        self.index.read().unwrap_or_else(|p| p.into_inner()).size()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `k` nearest keys passing `pass`, with their exact cosine similarity, best first. When the filter is
    /// so selective that the graph walk finds fewer than `k`, the matching vectors are compared exhaustively, so
    /// a filter never costs results that exist.
    pub fn search(&self, query: &[f32], k: usize, pass: &dyn Fn(u64) -> bool) -> Result<Vec<(u64, f32)>, SearchError> {
        if query.len() != self.dimensions {
            return Err(SearchError::Dimensions { expected: self.dimensions, got: query.len() });
        }
        let query = normalised(query);
        let candidates = {
            let index = self.index.read().unwrap_or_else(|p| p.into_inner());
            if k == 0 || index.size() == 0 {
                return Ok(Vec::new());
            }
            let oversample = self.oversample.load(std::sync::atomic::Ordering::Relaxed);
            index.filtered_search(&query, k * oversample, pass).map_err(err)?.keys
        };
        let exact = self.exact.read().unwrap_or_else(|p| p.into_inner());
        let wanted = k.min(exact.len());
        let mut hits: Vec<(u64, f32)> =
            candidates.into_iter().filter_map(|key| exact.get(key).map(|v| (key, dot(&query, v)))).collect();
        if hits.len() < wanted {
            hits = exact.iter().filter(|(key, _)| pass(*key)).map(|(key, v)| (key, dot(&query, v))).collect();
        }
        rank(hits, k)
    }

    /// The true `k` nearest keys by brute force over the full-precision vectors (to measure the graph's recall).
    pub fn exact(&self, query: &[f32], k: usize) -> Result<Vec<(u64, f32)>, SearchError> {
        if query.len() != self.dimensions {
            return Err(SearchError::Dimensions { expected: self.dimensions, got: query.len() });
        }
        let query = normalised(query);
        let exact = self.exact.read().unwrap_or_else(|p| p.into_inner());
        rank(exact.iter().map(|(key, v)| (key, dot(&query, v))).collect(), k)
    }

    /// Sets how many graph candidates per wanted result are re-ranked with the exact vectors.
    pub fn set_oversample(&self, oversample: usize) {
        self.oversample.store(oversample.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// The current search breadth.
    pub fn expansion_search(&self) -> usize {
        self.index.read().unwrap_or_else(|p| p.into_inner()).expansion_search()
    }

    /// Sets how many candidates a graph search keeps (`ef`) from now on, instead of following the size: more is
    /// slower and finds more true neighbours.
    pub fn set_expansion_search(&self, expansion: usize) {
        self.fixed_expansion.store(true, std::sync::atomic::Ordering::Relaxed);
        self.index.read().unwrap_or_else(|p| p.into_inner()).change_expansion_search(expansion);
    }
}

const EXACT_MAGIC: &[u8; 8] = b"AKVEC001";
const REMOVED_MAGIC: &[u8; 8] = b"AKVRM001";
const REMOVED_FILE: &str = "vectors.removed";

/// The keys `vectors.removed` lists, if it was written against the `vectors.exact` with checksum `exact_crc`;
/// none when it is missing or belongs to an older `vectors.exact` (a full save came after it). A torn or foreign
/// list is an error: the caller rebuilds.
fn read_removed(dir: &std::path::Path, exact_crc: u32) -> Result<Vec<u64>, SearchError> {
    let bytes = match std::fs::read(dir.join(REMOVED_FILE)) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(err(format!("{REMOVED_FILE}: {e}"))),
    };
    let corrupt = || err(format!("{REMOVED_FILE} is torn or not ours"));
    if bytes.len() < 24 || &bytes[..8] != REMOVED_MAGIC {
        return Err(corrupt());
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32c::crc32c(body).to_le_bytes() != crc {
        return Err(corrupt());
    }
    let word = |at: usize, n: usize| body.get(at..at + n).ok_or_else(corrupt);
    if u32::from_le_bytes(word(8, 4)?.try_into().map_err(|_| corrupt())?) != exact_crc {
        return Ok(Vec::new());
    }
    let count = u64::from_le_bytes(word(12, 8)?.try_into().map_err(|_| corrupt())?) as usize;
    let keys = &body[20..];
    if keys.len() != count.checked_mul(8).ok_or_else(corrupt)? {
        return Err(corrupt());
    }
    Ok(keys.chunks_exact(8).map(|k| u64::from_le_bytes([k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7]])).collect())
}

fn write_synced(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Vectors of one size in one allocation (no per-vector allocation, scans run at memory speed), with a free
/// list so replaced and removed vectors' room is reused.
struct Slab {
    dimensions: usize,
    values: Vec<f32>,
    /// Key of each slot (`None`: free).
    keys: Vec<Option<u64>>,
    slots: HashMap<u64, usize>,
    free: Vec<usize>,
}

impl Slab {
    fn new(dimensions: usize) -> Slab {
        Slab { dimensions, values: Vec::new(), keys: Vec::new(), slots: HashMap::new(), free: Vec::new() }
    }

    fn len(&self) -> usize {
        self.slots.len()
    }

    fn insert(&mut self, key: u64, vector: &[f32]) {
        let d = self.dimensions;
        let slot = match self.slots.get(&key) {
            Some(&slot) => slot,
            None => {
                let slot = self.free.pop().unwrap_or_else(|| {
                    self.values.resize(self.values.len() + d, 0.0);
                    self.keys.push(None);
                    self.keys.len() - 1
                });
                self.slots.insert(key, slot);
                self.keys[slot] = Some(key);
                slot
            }
        };
        self.values[slot * d..(slot + 1) * d].copy_from_slice(vector);
    }

    /// Whether `key` was there.
    fn remove(&mut self, key: u64) -> bool {
        let Some(slot) = self.slots.remove(&key) else { return false };
        self.keys[slot] = None;
        self.free.push(slot);
        true
    }

    fn get(&self, key: u64) -> Option<&[f32]> {
        let d = self.dimensions;
        self.slots.get(&key).map(|&slot| &self.values[slot * d..(slot + 1) * d])
    }

    fn iter(&self) -> impl Iterator<Item = (u64, &[f32])> {
        self.keys.iter().zip(self.values.chunks_exact(self.dimensions)).filter_map(|(key, v)| key.map(|k| (k, v)))
    }
}

/// The best `k` by similarity (ties by key, so results are deterministic).
fn rank(mut hits: Vec<(u64, f32)>, k: usize) -> Result<Vec<(u64, f32)>, SearchError> {
    if hits.len() > k {
        hits.select_nth_unstable_by(k, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        hits.truncate(k);
    }
    hits.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    Ok(hits)
}

fn normalised(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt();
    if norm == 0.0 || !norm.is_finite() {
        return v.to_vec();
    }
    v.iter().map(|a| a / norm).collect()
}

/// Dot product in eight independent lanes, which the compiler keeps in vector registers.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks.remainder().iter().zip(b_chunks.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(seed: u64, dims: usize) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let v: Vec<f32> = (0..dims)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 2000) as f32 / 1000.0 - 1.0
            })
            .collect();
        let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt();
        v.into_iter().map(|a| a / norm).collect()
    }

    #[test]
    fn finds_itself_replaces_and_removes() {
        let index = VectorIndex::new(16).unwrap();
        let vectors: Vec<Vec<f32>> = (0..3000).map(|i| unit(i, 16)).collect();
        let pairs: Vec<(u64, &[f32])> = vectors.iter().enumerate().map(|(i, v)| (i as u64, v.as_slice())).collect();
        index.upsert(&pairs).unwrap();
        assert_eq!(index.len(), 3000);
        let hits = index.search(&vectors[42], 3, &|_| true).unwrap();
        assert_eq!(hits[0].0, 42);
        assert!((hits[0].1 - 1.0).abs() < 1e-4, "{hits:?}");
        // Replacing key 42's vector moves it.
        index.upsert(&[(42, &vectors[7])]).unwrap();
        assert_eq!(index.len(), 3000);
        let hits = index.search(&vectors[7], 2, &|_| true).unwrap();
        let keys: Vec<u64> = hits.iter().map(|h| h.0).collect();
        assert!(keys.contains(&7) && keys.contains(&42), "{hits:?}");
        index.remove(42).unwrap();
        assert_eq!(index.len(), 2999);
        // A filter that only one far-away key passes still finds it.
        let hits = index.search(&vectors[1], 5, &|key| key == 2999).unwrap();
        assert_eq!(hits.iter().map(|h| h.0).collect::<Vec<_>>(), [2999]);
        assert!(matches!(index.search(&[0.0; 3], 1, &|_| true), Err(SearchError::Dimensions { .. })));
    }

    #[test]
    fn removals_since_a_save_persist_as_a_list_and_a_stale_list_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let graph = dir.path().join("vectors.usearch");
        let vectors: Vec<Vec<f32>> = (0..500).map(|i| unit(i, 16)).collect();
        let pairs: Vec<(u64, &[f32])> = vectors.iter().enumerate().map(|(i, v)| (i as u64, v.as_slice())).collect();
        let index = VectorIndex::new(16).unwrap();
        index.upsert(&pairs).unwrap();
        index.save(dir.path()).unwrap();
        let saved_graph = std::fs::read(&graph).unwrap();

        // Only removals since the save: the graph stays as saved, a list names the removed keys.
        for key in 0..100 {
            index.remove(key).unwrap();
        }
        index.save_changes(dir.path()).unwrap();
        assert_eq!(std::fs::read(&graph).unwrap(), saved_graph);
        let loaded = VectorIndex::load(dir.path(), 16).unwrap();
        assert_eq!(loaded.len(), 400);
        assert!(loaded.exact(&vectors[7], 400).unwrap().iter().all(|(key, _)| *key >= 100));
        assert_eq!(loaded.search(&vectors[200], 1, &|_| true).unwrap()[0].0, 200);
        // The loaded index goes on from the list: more removals extend it.
        loaded.remove(200).unwrap();
        loaded.save_changes(dir.path()).unwrap();
        assert_eq!(std::fs::read(&graph).unwrap(), saved_graph);
        assert_eq!(VectorIndex::load(dir.path(), 16).unwrap().len(), 399);
        let stale = std::fs::read(dir.path().join(REMOVED_FILE)).unwrap();

        // An addition needs a full save, which drops the list.
        loaded.upsert(&[(5, &vectors[5])]).unwrap();
        loaded.save_changes(dir.path()).unwrap();
        assert_ne!(std::fs::read(&graph).unwrap(), saved_graph);
        assert!(!dir.path().join(REMOVED_FILE).exists());
        // A list left over from before that save (a crash between the save and the list's deletion) names the
        // older vectors file and is ignored: key 5 stays.
        std::fs::write(dir.path().join(REMOVED_FILE), &stale).unwrap();
        let reloaded = VectorIndex::load(dir.path(), 16).unwrap();
        assert_eq!(reloaded.len(), 400);
        assert_eq!(reloaded.search(&vectors[5], 1, &|_| true).unwrap()[0].0, 5);

        // A torn list is an error (the caller rebuilds), not a silent partial load.
        std::fs::write(dir.path().join(REMOVED_FILE), &stale[..stale.len() - 3]).unwrap();
        assert!(VectorIndex::load(dir.path(), 16).is_err());
    }
}
