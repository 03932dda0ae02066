//! HNSW over embeddings (usearch), cosine similarity, full-precision vectors: the distances the graph search
//! returns are exact, so candidates need no second scoring pass.
//!
//! usearch adds and searches concurrently once capacity is reserved; growing the capacity needs the index to
//! itself, hence the lock: a read lock for add/search/remove, the write lock only to reserve more room.

use std::sync::RwLock;

use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

use super::SearchError;

/// Graph degree; with the expansions below it keeps recall@10 ≥ 0.95 on clustered 384-dim data (see
/// BENCHMARKS.md).
const CONNECTIVITY: usize = 16;
const EXPANSION_ADD: usize = 64;
const EXPANSION_SEARCH: usize = 96;
/// Concurrent operations usearch reserves per-thread state for.
const THREADS: usize = 8;

/// The vector index.
pub struct VectorIndex {
    index: RwLock<Index>,
    dimensions: usize,
}

fn err(e: impl std::fmt::Display) -> SearchError {
    SearchError::Vector(e.to_string())
}

impl VectorIndex {
    /// An empty index for `dimensions`-float vectors.
    pub fn new(dimensions: usize) -> Result<VectorIndex, SearchError> {
        let options = IndexOptions {
            dimensions,
            metric: MetricKind::Cos,
            quantization: ScalarKind::F32,
            connectivity: CONNECTIVITY,
            expansion_add: EXPANSION_ADD,
            expansion_search: EXPANSION_SEARCH,
            multi: false,
        };
        let index = Index::new(&options).map_err(err)?;
        index.reserve_capacity_and_threads(1024, THREADS).map_err(err)?;
        Ok(VectorIndex { index: RwLock::new(index), dimensions })
    }

    /// Adds or replaces vectors (keys already present are removed first). Vectors of the wrong size are skipped:
    /// the receive path has validated them already.
    pub fn upsert(&self, vectors: &[(u64, &[f32])]) -> Result<(), SearchError> {
        if vectors.is_empty() {
            return Ok(());
        }
        self.ensure_capacity(vectors.len())?;
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
        index.reserve_capacity_and_threads(needed.next_power_of_two(), THREADS).map_err(err)
    }

    /// Removes a key, if present.
    pub fn remove(&self, key: u64) -> Result<(), SearchError> {
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        if index.contains(key) {
            index.remove(key).map_err(err)?;
        }
        Ok(())
    }

    /// Vectors held.
    pub fn len(&self) -> usize {
        self.index.read().unwrap_or_else(|p| p.into_inner()).size()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `k` nearest keys passing `pass`, with their cosine similarity, best first. When the filter is so
    /// selective that the graph walk finds fewer than `k`, the matching vectors are compared exhaustively, so
    /// a filter never costs results that exist.
    pub fn search(&self, query: &[f32], k: usize, pass: &dyn Fn(u64) -> bool) -> Result<Vec<(u64, f32)>, SearchError> {
        if query.len() != self.dimensions {
            return Err(SearchError::Dimensions { expected: self.dimensions, got: query.len() });
        }
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        if k == 0 || index.size() == 0 {
            return Ok(Vec::new());
        }
        let matches = index.filtered_search(query, k, pass).map_err(err)?;
        let mut hits: Vec<(u64, f32)> =
            matches.keys.iter().zip(&matches.distances).map(|(key, d)| (*key, 1.0 - d)).collect();
        if hits.len() < k.min(index.size()) {
            hits = self.exhaustive(&index, query, k, pass)?;
        }
        Ok(hits)
    }

    fn exhaustive(
        &self,
        index: &Index,
        query: &[f32],
        k: usize,
        pass: &dyn Fn(u64) -> bool,
    ) -> Result<Vec<(u64, f32)>, SearchError> {
        let matches = index.exact_search(query, index.size()).map_err(err)?;
        let mut hits: Vec<(u64, f32)> = matches
            .keys
            .iter()
            .zip(&matches.distances)
            .filter(|(key, _)| pass(**key))
            .take(k)
            .map(|(key, d)| (*key, 1.0 - d))
            .collect();
        hits.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(hits)
    }
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
}
