//! The query service: vector, text and hybrid search over the hot tier. HTTP (and later MCP and the CLI) are
//! thin layers over it.

use std::collections::HashMap;
use std::sync::Arc;

use akosha_protocol::RecordKind;
use serde::Serialize;

use crate::hot::{HotError, HotTier};
use crate::search::text::Snippet;
use crate::search::{DocMeta, Filters};

/// Most results one query may ask for.
pub const MAX_LIMIT: usize = 1000;
/// Reciprocal-rank-fusion constant (the usual 60: ranks past the first few matter little).
const RRF_K: f32 = 60.0;

/// One search result.
#[derive(Debug, Clone, Serialize)]
pub struct Hit {
    /// The record (without its embedding).
    pub record: serde_json::Value,
    /// Cosine similarity (vector), BM25 score (text) or fused score (hybrid).
    pub score: f32,
    /// Vector searches and hybrid: the cosine similarity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub similarity: Option<f32>,
    /// Text searches and hybrid: the highlighted excerpt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snippet: Option<Snippet>,
}

/// Query failures.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The request itself is wrong (the message says how).
    #[error("{0}")]
    Invalid(String),
    /// Storage or index failure.
    #[error(transparent)]
    Storage(#[from] HotError),
}

impl From<crate::search::SearchError> for QueryError {
    fn from(e: crate::search::SearchError) -> Self {
        match e {
            crate::search::SearchError::Dimensions { .. } => QueryError::Invalid(e.to_string()),
            other => QueryError::Storage(HotError::Search(other)),
        }
    }
}

/// Answers queries over the tiers (the hot tier for now).
#[derive(Clone)]
pub struct QueryService {
    hot: Arc<HotTier>,
}

impl QueryService {
    /// A service over `hot`.
    pub fn new(hot: Arc<HotTier>) -> QueryService {
        QueryService { hot }
    }

    /// The `limit` records nearest to `embedding` that pass `filters`, most similar first.
    pub fn vector(&self, embedding: &[f32], limit: usize, filters: &Filters) -> Result<Vec<Hit>, QueryError> {
        let limit = check_limit(limit)?;
        let found = self.hot.indexes().vector_search(embedding, limit, filters)?;
        self.assemble(found.into_iter().map(|(doc, similarity)| Found {
            doc,
            score: similarity,
            similarity: Some(similarity),
            snippet: None,
        }))
    }

    /// The `limit` best BM25 matches for `query` that pass `filters`, with snippets.
    pub fn text(&self, query: &str, limit: usize, filters: &Filters) -> Result<Vec<Hit>, QueryError> {
        let limit = check_limit(limit)?;
        if query.trim().is_empty() {
            return Err(QueryError::Invalid("`query` is empty".into()));
        }
        let found = self.hot.indexes().text_search(query, limit, filters)?;
        self.assemble(found.into_iter().map(|(doc, score, snippet)| Found {
            doc,
            score,
            similarity: None,
            snippet: Some(snippet),
        }))
    }

    /// Reciprocal-rank fusion of the vector and the text ranking: each list contributes `1 / (60 + rank)`, so a
    /// record near the top of both wins over one at the top of only one.
    pub fn hybrid(
        &self,
        query: &str,
        embedding: &[f32],
        limit: usize,
        filters: &Filters,
    ) -> Result<Vec<Hit>, QueryError> {
        let limit = check_limit(limit)?;
        // Each side looks deeper than the final list, so that fusion has candidates to agree on.
        let depth = (limit * 4).clamp(20, MAX_LIMIT);
        let by_vector = self.hot.indexes().vector_search(embedding, depth, filters)?;
        let by_text =
            if query.trim().is_empty() { Vec::new() } else { self.hot.indexes().text_search(query, depth, filters)? };
        let mut fused: HashMap<(Arc<str>, u8, Box<str>), Found> = HashMap::new();
        let key = |d: &DocMeta| (d.system_id.clone(), d.kind as u8, d.id.clone());
        for (rank, (doc, similarity)) in by_vector.into_iter().enumerate() {
            let entry = fused.entry(key(&doc)).or_insert(Found { doc, score: 0.0, similarity: None, snippet: None });
            entry.score += 1.0 / (RRF_K + rank as f32 + 1.0);
            entry.similarity = Some(similarity);
        }
        for (rank, (doc, _, snippet)) in by_text.into_iter().enumerate() {
            let entry = fused.entry(key(&doc)).or_insert(Found { doc, score: 0.0, similarity: None, snippet: None });
            entry.score += 1.0 / (RRF_K + rank as f32 + 1.0);
            entry.snippet = Some(snippet);
        }
        let mut ranked: Vec<Found> = fused.into_values().collect();
        ranked.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.doc.id.cmp(&b.doc.id)));
        ranked.truncate(limit);
        self.assemble(ranked.into_iter())
    }

    /// Records written to the hot tier but not yet searchable.
    pub fn index_lag(&self) -> u64 {
        self.hot.index_pending()
    }

    /// Turns ranked index entries into results: the stored records fetched in one join per kind, without
    /// embeddings; entries whose record left the tier meanwhile are skipped.
    fn assemble(&self, found: impl Iterator<Item = Found>) -> Result<Vec<Hit>, QueryError> {
        let found: Vec<Found> = found.collect();
        let mut records = HashMap::new();
        for kind in RecordKind::ALL {
            let keys: Vec<(&str, &str)> =
                found.iter().filter(|f| f.doc.kind == kind).map(|f| (&*f.doc.system_id, &*f.doc.id)).collect();
            for ((system_id, id), record) in self.hot.get_many(kind, &keys)? {
                records.insert((kind, system_id, id), record);
            }
        }
        Ok(found
            .into_iter()
            .filter_map(|f| {
                let mut record = records.remove(&(f.doc.kind, f.doc.system_id.to_string(), f.doc.id.to_string()))?;
                if let Some(map) = record.as_object_mut() {
                    map.remove("embedding");
                }
                Some(Hit { record, score: f.score, similarity: f.similarity, snippet: f.snippet })
            })
            .collect())
    }
}

/// An index entry on its way to becoming a [`Hit`].
struct Found {
    doc: DocMeta,
    score: f32,
    similarity: Option<f32>,
    snippet: Option<Snippet>,
}

fn check_limit(limit: usize) -> Result<usize, QueryError> {
    if limit == 0 || limit > MAX_LIMIT {
        return Err(QueryError::Invalid(format!("`limit` must be between 1 and {MAX_LIMIT}, not {limit}")));
    }
    Ok(limit)
}
