//! The query service: search (vector, text, hybrid), point lookups, listings, statistics, the knowledge graph
//! and metric analyses. HTTP, MCP and the CLI are thin layers over it.

use std::collections::HashMap;
use std::sync::Arc;

use akosha_protocol::RecordKind;
use serde::Serialize;

use crate::embed::Embedder;
use crate::graph::{self, GraphPath, GraphStats, Neighbourhood};
use crate::hot::{HotError, HotTier};
use crate::listing::{self, ListQuery, Page, ProjectCount};
use crate::search::text::Snippet;
use crate::search::{DocMeta, Filters};
use crate::timeseries::{self, Anomaly, Correlation, MetricSummary, Series, SeriesQuery, Trend};

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
    /// A capability the request needs is not available (no embedding model).
    #[error("{0}")]
    Unavailable(String),
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
    embedder: Option<Arc<Embedder>>,
}

impl QueryService {
    /// A service over `hot`; with an `embedder`, text can stand in for a query vector.
    pub fn new(hot: Arc<HotTier>, embedder: Option<Arc<Embedder>>) -> QueryService {
        QueryService { hot, embedder }
    }

    /// The embedding of `text` with the in-process model.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, QueryError> {
        let embedder = self.embedder.as_ref().ok_or_else(|| {
            QueryError::Unavailable(
                "no embedding model is loaded (see `embeddings.model_dir`); pass `embedding`".into(),
            )
        })?;
        if texts.iter().any(|t| t.trim().is_empty()) {
            return Err(QueryError::Invalid("cannot embed an empty text".into()));
        }
        embedder.embed(texts).map_err(|e| QueryError::Unavailable(e.to_string()))
    }

    /// The query vector: the one given, else the embedding of `text`.
    pub fn query_vector(&self, embedding: Option<&[f32]>, text: Option<&str>) -> Result<Vec<f32>, QueryError> {
        match (embedding, text) {
            (Some(e), _) => Ok(e.to_vec()),
            (None, Some(text)) => Ok(self.embed(&[text])?.remove(0)),
            (None, None) => Err(QueryError::Invalid("give `embedding` or `query`".into())),
        }
    }

    /// One record by key.
    pub fn get(&self, system_id: &str, kind: RecordKind, id: &str) -> Result<Option<serde_json::Value>, QueryError> {
        let stored = self.hot.get(system_id, kind, id)?;
        let Some(cold) = self.hot.cold() else { return Ok(stored) };
        let objects = cold.objects(kind, &[system_id.to_owned()], None, None).map_err(cold_error)?;
        if objects.is_empty() {
            return Ok(stored);
        }
        let lease = cold.lease(&objects).map_err(cold_error)?;
        let found = cold
            .scan(|conn| crate::cold::scan::get_many(conn, &lease, kind, &[(system_id, id)]))
            .map_err(cold_error)?;
        let record = match (stored, found.into_iter().next()) {
            (Some(s), Some(c)) => Some(if c["ts"].as_i64() > s["ts"].as_i64() { c } else { s }),
            (s, c) => s.or(c),
        };
        self.note_reads(record.iter());
        Ok(record)
    }

    /// Tells the lifecycle which old records were read (see [`crate::cold::access`]).
    fn note_reads<'a>(&self, records: impl IntoIterator<Item = &'a serde_json::Value>) {
        if let Some(cold) = self.hot.cold() {
            cold.note_reads(records);
        }
    }

    /// Moves records older than `older_than` from hot to warm now.
    pub fn move_to_warm(
        &self,
        older_than: Option<std::time::Duration>,
    ) -> Result<Option<crate::warm::MoveReport>, QueryError> {
        let Some(warm) = self.hot.warm() else {
            return Err(QueryError::Unavailable("the warm tier is disabled (`warm.enabled`)".into()));
        };
        let windows = older_than.map_or_else(|| warm.config.hot_windows(), crate::lifecycle::Windows::uniform);
        let now = jiff::Timestamp::now().as_microsecond();
        Ok(self.hot.move_to_warm_by(|k| windows.cutoff(k, now))?)
    }

    /// A page of records.
    pub fn list(&self, q: &ListQuery) -> Result<Page, QueryError> {
        let page =
            self.hot.read_spanning(&[q.kind], &q.systems, q.since_us, q.until_us, |conn| listing::list(conn, q))?;
        self.note_reads(&page.records);
        Ok(page)
    }

    /// Records per system, project and kind.
    pub fn project_counts(&self, systems: &[String]) -> Result<Vec<ProjectCount>, QueryError> {
        Ok(self
            .hot
            .read_spanning(&RecordKind::ALL, systems, None, None, |conn| listing::project_counts(conn, systems))?)
    }

    /// Entities within `depth` relations of `entity`.
    pub fn neighbours(
        &self,
        entity: &str,
        systems: &[String],
        relation_type: Option<&str>,
        depth: u32,
    ) -> Result<Neighbourhood, QueryError> {
        if entity.trim().is_empty() {
            return Err(QueryError::Invalid("`entity` is empty".into()));
        }
        Ok(self.hot.read_spanning(&[RecordKind::Entity, RecordKind::Relation], systems, None, None, |conn| {
            graph::neighbours(conn, entity, systems, relation_type, depth)
        })?)
    }

    /// A shortest path between two entities.
    pub fn path(
        &self,
        from: &str,
        to: &str,
        systems: &[String],
        max_hops: u32,
    ) -> Result<Option<GraphPath>, QueryError> {
        Ok(self.hot.read_spanning(&[RecordKind::Entity, RecordKind::Relation], systems, None, None, |conn| {
            graph::shortest_path(conn, from, to, systems, max_hops)
        })?)
    }

    /// Graph statistics.
    pub fn graph_stats(&self, systems: &[String]) -> Result<GraphStats, QueryError> {
        Ok(self.hot.read_spanning(&[RecordKind::Entity, RecordKind::Relation], systems, None, None, |conn| {
            graph::statistics(conn, systems)
        })?)
    }

    /// Metric names per system with summaries.
    pub fn metric_summaries(
        &self,
        systems: &[String],
        since_us: Option<i64>,
    ) -> Result<Vec<MetricSummary>, QueryError> {
        Ok(self.hot.read_spanning(&[RecordKind::Metric], systems, since_us, None, |conn| {
            timeseries::summaries(conn, systems, since_us)
        })?)
    }

    /// Runs a metric query on a connection that sees the cold points it needs (none at `1h`).
    fn read_series<T>(
        &self,
        q: &SeriesQuery,
        f: impl FnOnce(&duckdb::Connection) -> Result<T, HotError>,
    ) -> Result<T, QueryError> {
        if timeseries::reads_cold_points(q.resolution) {
            Ok(self.hot.read_spanning(&[RecordKind::Metric], &q.systems, q.since_us, q.until_us, f)?)
        } else {
            Ok(self.hot.read(f)?)
        }
    }

    /// A metric's series.
    pub fn series(&self, q: &SeriesQuery) -> Result<Vec<Series>, QueryError> {
        check_metric(q)?;
        self.read_series(q, |conn| timeseries::range(conn, q, 100_000))
    }

    /// A metric's trend per system.
    pub fn trend(&self, q: &SeriesQuery) -> Result<Vec<Trend>, QueryError> {
        check_metric(q)?;
        self.read_series(q, |conn| timeseries::trend(conn, q))
    }

    /// A metric's anomalous points.
    pub fn anomalies(
        &self,
        q: &SeriesQuery,
        threshold: f64,
        robust: bool,
        limit: usize,
    ) -> Result<Vec<Anomaly>, QueryError> {
        check_metric(q)?;
        if !(threshold.is_finite() && threshold > 0.0) {
            return Err(QueryError::Invalid(format!("`threshold` must be a positive number, not {threshold}")));
        }
        let limit = check_limit(limit)?;
        self.read_series(q, |conn| timeseries::anomalies(conn, q, threshold, robust, limit))
    }

    /// Correlations between systems for a metric.
    pub fn correlate(&self, q: &SeriesQuery, min_abs_r: f64) -> Result<Vec<Correlation>, QueryError> {
        check_metric(q)?;
        if !(0.0..=1.0).contains(&min_abs_r) {
            return Err(QueryError::Invalid(format!("`min_r` must be between 0 and 1, not {min_abs_r}")));
        }
        self.read_series(q, |conn| timeseries::correlate(conn, q, min_abs_r))
    }

    /// The `limit` records nearest to `embedding` that pass `filters`, most similar first.
    pub fn vector(&self, embedding: &[f32], limit: usize, filters: &Filters) -> Result<Vec<Hit>, QueryError> {
        let limit = check_limit(limit)?;
        let found = self.vector_found(embedding, limit, filters)?;
        self.assemble(found.into_iter().map(|(doc, similarity, record)| Found {
            doc,
            score: similarity,
            similarity: Some(similarity),
            snippet: None,
            record,
        }))
    }

    /// The `limit` best BM25 matches for `query` that pass `filters`, with snippets.
    pub fn text(&self, query: &str, limit: usize, filters: &Filters) -> Result<Vec<Hit>, QueryError> {
        let limit = check_limit(limit)?;
        if query.trim().is_empty() {
            return Err(QueryError::Invalid("`query` is empty".into()));
        }
        let found = self.text_found(query, limit, filters)?;
        self.assemble(found.into_iter().map(|(doc, score, snippet, record)| Found {
            doc,
            score,
            similarity: None,
            snippet: Some(snippet),
            record,
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
        let by_vector = self.vector_found(embedding, depth, filters)?;
        let by_text = if query.trim().is_empty() { Vec::new() } else { self.text_found(query, depth, filters)? };
        let mut fused: HashMap<(Arc<str>, u8, Box<str>), Found> = HashMap::new();
        let key = |d: &DocMeta| (d.system_id.clone(), d.kind as u8, d.id.clone());
        for (rank, (doc, similarity, record)) in by_vector.into_iter().enumerate() {
            let entry =
                fused.entry(key(&doc)).or_insert(Found { doc, score: 0.0, similarity: None, snippet: None, record });
            entry.score += 1.0 / (RRF_K + rank as f32 + 1.0);
            entry.similarity = Some(similarity);
        }
        for (rank, (doc, _, snippet, record)) in by_text.into_iter().enumerate() {
            let entry =
                fused.entry(key(&doc)).or_insert(Found { doc, score: 0.0, similarity: None, snippet: None, record });
            entry.score += 1.0 / (RRF_K + rank as f32 + 1.0);
            entry.snippet = Some(snippet);
        }
        let mut ranked: Vec<Found> = fused.into_values().collect();
        ranked.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.doc.id.cmp(&b.doc.id)));
        ranked.truncate(limit);
        self.assemble(ranked.into_iter())
    }

    /// The `k` nearest records across tiers (hot, warm, cold), best first, each key once; cold hits come with
    /// their record.
    fn vector_found(&self, embedding: &[f32], k: usize, filters: &Filters) -> Result<Vec<Candidate>, QueryError> {
        let mut found: Vec<Candidate> =
            self.hot.indexes().vector_search(embedding, k, filters)?.into_iter().map(|(d, s)| (d, s, None)).collect();
        if let Some(warm) = self.hot.warm() {
            found.extend(warm.indexes().vector_search(embedding, k, filters)?.into_iter().map(|(d, s)| (d, s, None)));
        }
        // Records not yet indexed are compared exactly; for their keys the waiting version is the current one.
        let tail = self.hot.tail();
        if !tail.is_empty() {
            found.retain(|(d, _, _)| !tail.contains(crate::hot::key_hash_of(d.kind, &d.system_id, &d.id)));
            found.extend(tail.search(embedding, k, filters).into_iter().map(|(_, d, s)| (d, s, None)));
        }
        found.extend(
            self.cold_scan(filters, |conn, files, kind| {
                crate::cold::scan::vector(conn, files, kind, embedding, k, filters)
            })?
            .into_iter()
            .map(|h| (h.doc, h.score, Some(h.record))),
        );
        Ok(best_once(found, k, |(doc, score, _)| (doc, *score)))
    }

    /// Runs `scan` over the cold objects each kind of `filters` has in its systems and time range.
    fn cold_scan(
        &self,
        filters: &Filters,
        scan: impl Fn(
            &duckdb::Connection,
            &crate::cold::cache::Lease,
            RecordKind,
        ) -> Result<Vec<crate::cold::scan::ColdHit>, crate::cold::ColdError>,
    ) -> Result<Vec<crate::cold::scan::ColdHit>, QueryError> {
        let Some(cold) = self.hot.cold() else { return Ok(Vec::new()) };
        let kinds = if filters.kinds.is_empty() { RecordKind::ALL.to_vec() } else { filters.kinds.clone() };
        let mut hits = Vec::new();
        for kind in kinds {
            let objects =
                cold.objects(kind, &filters.system_ids, filters.since_us, filters.until_us).map_err(cold_error)?;
            if objects.is_empty() {
                continue;
            }
            let lease = cold.lease(&objects).map_err(cold_error)?;
            hits.extend(cold.scan(|conn| scan(conn, &lease, kind)).map_err(cold_error)?);
        }
        Ok(hits)
    }

    /// The `k` best text matches across tiers, best first, each key once; both tiers score with their combined
    /// term statistics, so the merged ranking is the one a single index would give.
    ///
    /// Cold records are matched word by word and scored with BM25 over the cold rows scanned (see
    /// [`crate::cold::scan::text`]).
    fn text_found(&self, query: &str, k: usize, filters: &Filters) -> Result<Vec<TextCandidate>, QueryError> {
        let with_record = |v: Vec<(DocMeta, f32, Snippet)>| v.into_iter().map(|(d, s, n)| (d, s, n, None));
        let mut found: Vec<TextCandidate> = match self.hot.warm() {
            None => with_record(self.hot.indexes().text_search(query, k, filters, &[])?).collect(),
            Some(warm) => with_record(self.hot.indexes().text_search(query, k, filters, &[warm.indexes()])?)
                .chain(with_record(warm.indexes().text_search(query, k, filters, &[self.hot.indexes()])?))
                .collect(),
        };
        for h in
            self.cold_scan(filters, |conn, files, kind| crate::cold::scan::text(conn, files, kind, query, k, filters))?
        {
            let snippet = h.snippet.unwrap_or_else(|| crate::cold::scan::snippet("", &[]));
            found.push((h.doc, h.score, snippet, Some(h.record)));
        }
        Ok(best_once(found, k, |(doc, score, _, _)| (doc, *score)))
    }

    /// Records written to the hot tier but not yet searchable.
    pub fn index_lag(&self) -> u64 {
        self.hot.index_pending()
    }

    /// Turns ranked index entries into results: the stored records fetched in one join per kind, without
    /// embeddings; entries whose record left the tier meanwhile are skipped.
    ///
    /// A cold hit carries its record; a newer version of the key in hot or warm replaces it.
    fn assemble(&self, found: impl Iterator<Item = Found>) -> Result<Vec<Hit>, QueryError> {
        let found: Vec<Found> = found.collect();
        let mut records = HashMap::new();
        for kind in RecordKind::ALL {
            let keys: Vec<(&str, &str)> =
                found.iter().filter(|f| f.doc.kind == kind).map(|f| (&*f.doc.system_id, &*f.doc.id)).collect();
            for ((system_id, id), record) in self.hot.get_many(kind, &keys, false)? {
                records.insert((kind, system_id, id), record);
            }
        }
        let hits: Vec<Hit> = found
            .into_iter()
            .filter_map(|f| {
                let stored = records.remove(&(f.doc.kind, f.doc.system_id.to_string(), f.doc.id.to_string()));
                let record = match (stored, f.record) {
                    (Some(s), Some(c)) => Some(if c["ts"].as_i64() > s["ts"].as_i64() { c } else { s }),
                    (s, c) => s.or(c),
                }?;
                Some(Hit { record, score: f.score, similarity: f.similarity, snippet: f.snippet })
            })
            .collect();
        self.note_reads(hits.iter().map(|h| &h.record));
        Ok(hits)
    }
}

/// The `k` best-scored entries, a key found in two tiers (briefly, during a move) counted once.
fn best_once<T>(mut found: Vec<T>, k: usize, key: impl Fn(&T) -> (&DocMeta, f32)) -> Vec<T> {
    found.sort_by(|a, b| {
        let ((da, sa), (db, sb)) = (key(a), key(b));
        sb.total_cmp(&sa)
            .then_with(|| (&da.system_id, da.kind as u8, &da.id).cmp(&(&db.system_id, db.kind as u8, &db.id)))
    });
    let mut seen = std::collections::HashSet::new();
    found.retain(|item| {
        let (d, _) = key(item);
        seen.insert((d.system_id.clone(), d.kind as u8, d.id.clone()))
    });
    found.truncate(k);
    found
}

/// An index entry on its way to becoming a [`Hit`].
struct Found {
    doc: DocMeta,
    score: f32,
    similarity: Option<f32>,
    snippet: Option<Snippet>,
    /// Cold hits: the record itself (no index to fetch it from).
    record: Option<serde_json::Value>,
}

/// A vector match: the entry, its similarity and (cold) its record.
type Candidate = (DocMeta, f32, Option<serde_json::Value>);
/// A text match: the entry, its score, the excerpt and (cold) its record.
type TextCandidate = (DocMeta, f32, Snippet, Option<serde_json::Value>);

fn cold_error(e: crate::cold::ColdError) -> QueryError {
    match e {
        crate::cold::ColdError::TooLarge { .. } => QueryError::Invalid(e.to_string()),
        crate::cold::ColdError::CircuitOpen { .. } | crate::cold::ColdError::Store(_) => {
            QueryError::Unavailable(format!("cold data is needed but unavailable: {e}"))
        }
        other => QueryError::Storage(HotError::Io(other.to_string())),
    }
}

fn check_metric(q: &SeriesQuery) -> Result<(), QueryError> {
    if q.name.trim().is_empty() {
        return Err(QueryError::Invalid("`metric` (the metric name) is empty".into()));
    }
    if let (Some(since), Some(until)) = (q.since_us, q.until_us)
        && since >= until
    {
        return Err(QueryError::Invalid("`since` must be before `until`".into()));
    }
    Ok(())
}

fn check_limit(limit: usize) -> Result<usize, QueryError> {
    if limit == 0 || limit > MAX_LIMIT {
        return Err(QueryError::Invalid(format!("`limit` must be between 1 and {MAX_LIMIT}, not {limit}")));
    }
    Ok(limit)
}
