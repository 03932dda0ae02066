//! The HTTP API: health, readiness, metrics, stats and point lookups. Every error is a JSON body with a stable
//! `error` code.

use std::sync::Arc;

use akosha_protocol::RecordKind;
use akosha_protocol::exposition::Exposition;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::Aggregator;
use crate::query::{QueryError, QueryService};
use crate::search::Filters;

/// The router of the query API.
pub fn router(aggregator: Arc<Aggregator>) -> Router {
    Router::new()
        .route("/health", get(|| async { axum::Json(json!({"status": "ok"})) }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/stats", get(stats))
        .route("/v1/records/{system}/{kind}/{id}", get(get_record))
        .route("/v1/search/vector", post(|state, body| search(state, body, Mode::Vector)))
        .route("/v1/search/text", post(|state, body| search(state, body, Mode::Text)))
        .route("/v1/search/hybrid", post(|state, body| search(state, body, Mode::Hybrid)))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .with_state(aggregator)
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, axum::Json(json!({"error": code, "message": message}))).into_response()
}

fn starting() -> Response {
    error(StatusCode::SERVICE_UNAVAILABLE, "starting", "replaying the write-ahead log; not ready yet")
}

async fn ready(State(agg): State<Arc<Aggregator>>) -> Response {
    let Some(receiver) = agg.receiver() else { return starting() };
    if receiver.wal.failed() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "wal_failed",
            "the write-ahead log refuses writes after an I/O error",
        );
    }
    axum::Json(json!({"status": "ready"})).into_response()
}

async fn get_record(
    State(agg): State<Arc<Aggregator>>,
    Path((system, kind, id)): Path<(String, String, String)>,
) -> Response {
    let kind = match kind.parse::<RecordKind>() {
        Ok(kind) => kind,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_kind", &e.to_string()),
    };
    let Some(receiver) = agg.receiver() else { return starting() };
    let hot = receiver.hot.clone();
    match tokio::task::spawn_blocking(move || hot.get(&system, kind, &id)).await {
        Ok(Ok(Some(record))) => axum::Json(record).into_response(),
        Ok(Ok(None)) => error(StatusCode::NOT_FOUND, "not_found", "no record with that system, kind and id"),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, "storage", &e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", &e.to_string()),
    }
}

async fn stats(State(agg): State<Arc<Aggregator>>) -> Response {
    let Some(r) = agg.receiver() else { return starting() };
    let hot = r.hot.clone();
    let counts = match tokio::task::spawn_blocking(move || hot.counts()).await {
        Ok(Ok(counts)) => counts,
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, "storage", &e.to_string()),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", &e.to_string()),
    };
    let mut systems = serde_json::Map::new();
    let mut total = 0;
    for c in &counts {
        total += c.records;
        let entry = systems.entry(c.system_id.clone()).or_insert_with(|| json!({}));
        entry[c.kind] = json!(c.records);
    }
    axum::Json(json!({
        "total_records": total,
        "systems": systems,
        "hot": {
            "records": total,
            "pending": r.hot.pending(),
            "failed_batches": r.hot.failed_batches(),
            "duplicates_dropped": r.hot.duplicates(),
            "indexed": r.hot.indexes().sizes().0,
            "indexed_vectors": r.hot.indexes().sizes().1,
            "index_pending": r.hot.index_pending(),
            "index_failures": r.hot.index_failures(),
        },
        "wal": {"bytes": r.wal.size_bytes(), "segments": r.wal.segments(), "queued": r.wal.queued(), "failed": r.wal.failed()},
        "sessions": r.metrics.active(),
    }))
    .into_response()
}

async fn metrics(State(agg): State<Arc<Aggregator>>) -> Response {
    let Some(r) = agg.receiver() else { return starting() };
    let m = &r.metrics;
    let mut e = Exposition::new();
    let none: &[(&str, &str)] = &[];
    let counter =
        |e: &mut Exposition, name: &str, help: &str, v: u64| e.metric(name, "counter", help, [(none, v as f64)]);
    let gauge = |e: &mut Exposition, name: &str, help: &str, v: u64| e.metric(name, "gauge", help, [(none, v as f64)]);
    counter(
        &mut e,
        "akosha_ingest_records_total",
        "Records acknowledged as durable (rate() of this is the ingest rate).",
        m.records_acked.get(),
    );
    counter(&mut e, "akosha_ingest_batches_total", "Batches acknowledged as durable.", m.batches_acked.get());
    counter(&mut e, "akosha_ingest_bytes_total", "Batch payload bytes received.", m.bytes_received.get());
    e.metric(
        "akosha_ingest_rejected_batches_total",
        "counter",
        "Batches rejected, by reason.",
        [
            (&[("reason", "system_mismatch")][..], m.rejected_system_mismatch.get() as f64),
            (&[("reason", "invalid_batch")][..], m.rejected_invalid.get() as f64),
            (&[("reason", "storage_failure")][..], m.storage_failures.get() as f64),
        ],
    );
    counter(
        &mut e,
        "akosha_receiver_tls_failures_total",
        "Connections refused during the TLS handshake.",
        m.tls_failures.get(),
    );
    counter(
        &mut e,
        "akosha_receiver_malformed_frames_total",
        "Sessions closed after a bad frame.",
        m.malformed_frames.get(),
    );
    counter(
        &mut e,
        "akosha_receiver_protocol_violations_total",
        "Sessions closed for breaking the protocol.",
        m.protocol_violations.get(),
    );
    counter(
        &mut e,
        "akosha_receiver_sessions_refused_total",
        "Sessions refused by admission control.",
        m.sessions_refused.get(),
    );
    gauge(&mut e, "akosha_receiver_sessions", "Open agent sessions.", m.active());
    gauge(&mut e, "akosha_wal_bytes", "Size of the write-ahead log.", r.wal.size_bytes());
    gauge(&mut e, "akosha_wal_segments", "Segments of the write-ahead log.", r.wal.segments());
    gauge(&mut e, "akosha_wal_queued_batches", "Batches waiting for the log writer.", r.wal.queued() as u64);
    counter(&mut e, "akosha_wal_group_commits_total", "fsyncs of the write-ahead log.", r.wal.group_commits());
    gauge(&mut e, "akosha_hot_pending_records", "Durable records not yet queryable.", r.hot.pending());
    counter(&mut e, "akosha_hot_inserted_records_total", "Records applied to the hot tier.", r.hot.inserted());
    counter(&mut e, "akosha_hot_failed_batches_total", "Batches the hot tier failed to apply.", r.hot.failed_batches());
    let (indexed, vectors) = r.hot.indexes().sizes();
    gauge(&mut e, "akosha_hot_indexed_records", "Hot records in the search indexes.", indexed as u64);
    gauge(&mut e, "akosha_hot_indexed_vectors", "Hot records in the vector (HNSW) index.", vectors as u64);
    gauge(
        &mut e,
        "akosha_hot_index_pending_records",
        "Hot records readable but not yet searchable.",
        r.hot.index_pending(),
    );
    counter(&mut e, "akosha_hot_index_failures_total", "Records whose index update failed.", r.hot.index_failures());
    counter(
        &mut e,
        "akosha_hot_duplicates_total",
        "Records dropped because an equal or newer version was stored.",
        r.hot.duplicates(),
    );
    let seen: Vec<(String, i64)> = {
        let map = m.last_seen.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(k, v)| (k.clone(), *v)).collect()
    };
    let labels: Vec<[(&str, &str); 1]> = seen.iter().map(|(s, _)| [("system_id", s.as_str())]).collect();
    e.metric(
        "akosha_agent_last_seen_seconds",
        "gauge",
        "Unix time an agent was last heard from.",
        seen.iter().zip(&labels).map(|((_, t), l)| (&l[..], *t as f64 / 1e6)),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], e.finish()).into_response()
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    Vector,
    Text,
    Hybrid,
}

/// The body of every `/v1/search/…` request.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchRequest {
    /// Text to match (text and hybrid).
    query: Option<String>,
    /// Query vector (vector and hybrid).
    embedding: Option<Vec<f32>>,
    #[serde(default = "default_limit")]
    limit: usize,
    #[serde(default)]
    system_ids: Vec<String>,
    /// One system (the name Akosha's tools use); joins `system_ids`.
    system_id: Option<String>,
    #[serde(default)]
    kinds: Vec<String>,
    project: Option<String>,
    category: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    since: Option<TimeBound>,
    until: Option<TimeBound>,
    min_similarity: Option<f32>,
}

fn default_limit() -> usize {
    10
}

/// A time as RFC 3339 text or microseconds since the epoch.
#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
enum TimeBound {
    Micros(i64),
    Text(String),
}

impl TimeBound {
    fn micros(&self, field: &str) -> Result<i64, String> {
        match self {
            TimeBound::Micros(us) => Ok(*us),
            TimeBound::Text(text) => text
                .parse::<jiff::Timestamp>()
                .map(|t| t.as_microsecond())
                .map_err(|e| format!("`{field}` is not an RFC 3339 time or microseconds since the epoch: {e}")),
        }
    }
}

impl SearchRequest {
    fn filters(&self) -> Result<Filters, String> {
        let mut system_ids = self.system_ids.clone();
        system_ids.extend(self.system_id.clone());
        let kinds = self
            .kinds
            .iter()
            .map(|k| k.parse::<RecordKind>().map_err(|e| format!("`kinds`: {e}")))
            .collect::<Result<_, _>>()?;
        if let Some(min) = self.min_similarity
            && !(-1.0..=1.0).contains(&min)
        {
            return Err(format!("`min_similarity` must be between -1 and 1, not {min}"));
        }
        Ok(Filters {
            system_ids,
            kinds,
            project: self.project.clone(),
            category: self.category.clone(),
            tags: self.tags.clone(),
            since_us: self.since.as_ref().map(|t| t.micros("since")).transpose()?,
            until_us: self.until.as_ref().map(|t| t.micros("until")).transpose()?,
            min_similarity: self.min_similarity,
        })
    }
}

async fn search(State(agg): State<Arc<Aggregator>>, body: axum::body::Bytes, mode: Mode) -> Response {
    let request: SearchRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", &format!("invalid search request: {e}")),
    };
    let filters = match request.filters() {
        Ok(f) => f,
        Err(message) => return error(StatusCode::BAD_REQUEST, "bad_request", &message),
    };
    let Some(receiver) = agg.receiver() else { return starting() };
    let service = QueryService::new(receiver.hot.clone());
    let started = std::time::Instant::now();
    let result = tokio::task::spawn_blocking(move || {
        let need = |field: &str| QueryError::Invalid(format!("`{field}` is required for this search"));
        match mode {
            Mode::Vector => {
                let embedding = request.embedding.as_deref().ok_or_else(|| need("embedding"))?;
                service.vector(embedding, request.limit, &filters)
            }
            Mode::Text => {
                let query = request.query.as_deref().ok_or_else(|| need("query"))?;
                service.text(query, request.limit, &filters)
            }
            // No embedding model in the aggregator yet: hybrid needs the caller's vector.
            Mode::Hybrid => {
                let embedding = request.embedding.as_deref().ok_or_else(|| need("embedding"))?;
                service.hybrid(request.query.as_deref().unwrap_or(""), embedding, request.limit, &filters)
            }
        }
        .map(|hits| (hits, service.index_lag()))
    })
    .await;
    match result {
        Ok(Ok((hits, lag))) => axum::Json(json!({
            "results": hits,
            "count": hits.len(),
            "took_ms": started.elapsed().as_secs_f64() * 1000.0,
            "index_lag_records": lag,
        }))
        .into_response(),
        Ok(Err(QueryError::Invalid(message))) => error(StatusCode::BAD_REQUEST, "bad_request", &message),
        Ok(Err(QueryError::Storage(e))) => error(StatusCode::INTERNAL_SERVER_ERROR, "storage", &e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", &e.to_string()),
    }
}
