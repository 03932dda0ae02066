//! The HTTP API: health, readiness, metrics, stats, lookups, listings, search, the knowledge graph, metric
//! analyses, embeddings and MCP. Every error is a JSON body with a stable `error` code; every route but
//! `/health` and `/ready` passes the bearer-token check of [`crate::auth`].

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
use crate::auth::{AuthError, Scope};
use crate::listing::{Cursor, ListQuery};
use crate::query::{QueryError, QueryService};
use crate::search::Filters;
use crate::timeseries::{Resolution, SeriesQuery};

/// The router of the query API.
pub fn router(aggregator: Arc<Aggregator>) -> Router {
    let max_body = aggregator.max_body_bytes;
    Router::new()
        .route("/health", get(|| async { axum::Json(json!({"status": "ok"})) }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/stats", get(stats))
        .route("/v1/stats/projects", get(project_stats))
        .route("/v1/stats/storage", get(storage_stats))
        .route("/health/warm", get(warm_health))
        .route("/v1/records", get(list_records))
        .route("/v1/records/{system}/{kind}/{id}", get(get_record))
        .route("/v1/search/vector", post(|state, body| search(state, body, Mode::Vector)))
        .route("/v1/search/text", post(|state, body| search(state, body, Mode::Text)))
        .route("/v1/search/hybrid", post(|state, body| search(state, body, Mode::Hybrid)))
        .route("/v1/graph/neighbours", get(graph_neighbours))
        .route("/v1/graph/path", get(graph_path))
        .route("/v1/graph/stats", get(graph_stats))
        .route("/v1/metrics", get(metric_names))
        .route("/v1/metrics/series", get(|s, q| metric_analysis(s, q, Analysis::Series)))
        .route("/v1/metrics/trend", get(|s, q| metric_analysis(s, q, Analysis::Trend)))
        .route("/v1/metrics/anomalies", get(|s, q| metric_analysis(s, q, Analysis::Anomalies)))
        .route("/v1/metrics/correlation", get(|s, q| metric_analysis(s, q, Analysis::Correlation)))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/admin/warm/move", post(warm_move))
        .route("/v1/admin/cold/move", post(cold_move))
        .route("/v1/admin/cold/promote", post(cold_promote))
        .route("/v1/admin/keys", get(|s| keys(s, false)))
        .route("/v1/admin/keys/rewrap", post(|s| keys(s, true)))
        .route("/v1/lifecycle", get(lifecycle))
        .route("/v1/admin/delete", post(delete_records))
        .route("/v1/admin/audit", get(audit_log))
        .route("/v1/admin/backup", post(start_backup).get(backup_status))
        .route("/mcp", post(crate::mcp::post).get(crate::mcp::get).delete(crate::mcp::get))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        // Inside the auth layer: a cached answer is served only to a caller allowed to ask.
        .layer(axum::middleware::from_fn_with_state(aggregator.clone(), cached))
        .layer(axum::middleware::from_fn_with_state(aggregator.clone(), authorize))
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .with_state(aggregator)
}

/// Checks the bearer token and its scope, charges its rate limit, and hands the caller to the handler.
async fn authorize(
    State(agg): State<Arc<Aggregator>>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = request.uri().path();
    // Probes carry no token; `/health/warm` tells disk use, not data or paths.
    if path == "/health" || path == "/ready" || path == "/health/warm" {
        return next.run(request).await;
    }
    // Every route reads; storing is checked per tool inside MCP (a token needs `write` for the store tools).
    let scope = if path.starts_with("/v1/admin/") { Scope::Admin } else { Scope::Read };
    let header = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match agg.auth.check(header, Some(scope)) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(e) => auth_error(&e),
    }
}

/// Whether answers of `path` may be cached: queries and lookups, not operations, writes or MCP.
fn cacheable(method: &axum::http::Method, path: &str) -> bool {
    match *method {
        axum::http::Method::GET => {
            path.starts_with("/v1/records")
                || path.starts_with("/v1/graph/")
                || path.starts_with("/v1/metrics")
                || path == "/v1/stats/projects"
        }
        axum::http::Method::POST => path.starts_with("/v1/search/"),
        _ => false,
    }
}

/// The systems a request covers (empty: all), from the path, the `system_id` parameter or the search body.
fn covered_systems(path: &str, query: Option<&str>, body: &[u8]) -> Vec<String> {
    if let Some(rest) = path.strip_prefix("/v1/records/")
        && let Some((system, _)) = rest.split_once('/')
    {
        return vec![system.to_owned()];
    }
    let mut systems: Vec<String> = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter_map(|pair| pair.strip_prefix("system_id="))
        .flat_map(|v| v.split("%2C").flat_map(|v| v.split(',')).map(str::to_owned).collect::<Vec<_>>())
        .filter(|s| !s.is_empty())
        .collect();
    if let Ok(body) = serde_json::from_slice::<serde_json::Value>(body) {
        systems.extend(body.get("system_id").and_then(|v| v.as_str()).map(str::to_owned));
        systems.extend(
            body.get("system_ids")
                .and_then(|v| v.as_array())
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned)),
        );
    }
    systems.sort();
    systems.dedup();
    systems
}

/// Serves repeated queries from the cache and stores fresh successful answers. Percent-encoded system ids in
/// the query string are compared as sent; such a request only misses the cache more often, never reads a
/// wrong answer (its key includes the bytes of the query).
async fn cached(
    State(agg): State<Arc<Aggregator>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if agg.cache.kind() == "off" || !cacheable(request.method(), request.uri().path()) {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, agg.max_body_bytes).await {
        Ok(b) => b,
        Err(_) => {
            return error(StatusCode::PAYLOAD_TOO_LARGE, "too_large", "the request body exceeds http.max_body_bytes");
        }
    };
    let path = parts.uri.path().to_owned();
    let systems = covered_systems(&path, parts.uri.query(), &body);
    let mut key = Vec::with_capacity(64 + body.len());
    key.extend_from_slice(parts.method.as_str().as_bytes());
    key.push(b' ');
    key.extend_from_slice(parts.uri.to_string().as_bytes());
    key.push(b'\n');
    key.extend_from_slice(&body);
    let lookup = agg.cache.lookup(&systems, &key).await;
    if let crate::cache::Lookup::Hit(answer) = lookup {
        return (
            [(header::CONTENT_TYPE, "application/json"), (header::HeaderName::from_static("x-akosha-cache"), "hit")],
            answer,
        )
            .into_response();
    }
    let request = axum::extract::Request::from_parts(parts, axum::body::Body::from(body));
    let response = next.run(request).await;
    let crate::cache::Lookup::Miss(key) = lookup else {
        let mut response = response;
        response.headers_mut().insert("x-akosha-cache", header::HeaderValue::from_static("bypass"));
        return response;
    };
    if response.status() != StatusCode::OK {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, crate::cache::MAX_ENTRY_BYTES * 4).await else {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "answer too large to buffer");
    };
    agg.cache.store(key, bytes.to_vec()).await;
    parts.headers.insert("x-akosha-cache", header::HeaderValue::from_static("miss"));
    Response::from_parts(parts, axum::body::Body::from(bytes))
}

fn auth_error(e: &AuthError) -> Response {
    let (status, code) = match e {
        AuthError::Missing | AuthError::Invalid => (StatusCode::UNAUTHORIZED, "unauthorized"),
        AuthError::Forbidden { .. } => (StatusCode::FORBIDDEN, "forbidden"),
        AuthError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
    };
    let mut response = error(status, code, &e.to_string());
    let headers = response.headers_mut();
    match e {
        AuthError::RateLimited { retry_after_secs, .. } => {
            headers
                .insert(header::RETRY_AFTER, retry_after_secs.to_string().parse().expect("digits are a valid header"));
        }
        AuthError::Missing | AuthError::Invalid => {
            headers.insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        AuthError::Forbidden { .. } => {}
    }
    response
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
    let Some(service) = agg.query() else { return starting() };
    match tokio::task::spawn_blocking(move || service.get(&system, kind, &id)).await {
        Ok(Ok(Some(record))) => axum::Json(record).into_response(),
        Ok(Ok(None)) => error(StatusCode::NOT_FOUND, "not_found", "no record with that system, kind and id"),
        Ok(Err(e)) => query_error(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", &e.to_string()),
    }
}

async fn stats(State(agg): State<Arc<Aggregator>>) -> Response {
    let Some(r) = agg.receiver() else { return starting() };
    let hot = r.hot.clone();
    let counts = match tokio::task::spawn_blocking(move || {
        let mut counts = hot.counts()?;
        let warm = if hot.warm().is_some() { hot.read(crate::warm::WarmTier::counts)? } else { Vec::new() };
        let warm_total: u64 = warm.iter().map(|(_, _, n)| n).sum();
        let journal =
            if hot.warm().is_some() { hot.read(|c| crate::warm::WarmTier::journal_tail(c, 10))? } else { Vec::new() };
        for (system_id, kind, records) in warm {
            match counts.iter_mut().find(|c| c.system_id == system_id && c.kind == kind) {
                Some(c) => c.records += records,
                None => counts.push(crate::hot::KindCount { system_id, kind, records }),
            }
        }
        let mut cold_total = 0;
        if let Some(cold) = hot.cold() {
            for (system_id, kind, records) in cold.counts().map_err(|e| crate::hot::HotError::Io(e.to_string()))? {
                cold_total += records;
                match counts.iter_mut().find(|c| c.system_id == system_id && c.kind == kind) {
                    Some(c) => c.records += records,
                    None => counts.push(crate::hot::KindCount { system_id, kind, records }),
                }
            }
        }
        Ok::<_, crate::hot::HotError>((counts, warm_total + cold_total, journal, cold_total))
    })
    .await
    {
        Ok(Ok(counts)) => counts,
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, "storage", &e.to_string()),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", &e.to_string()),
    };
    let (counts, not_hot, journal, cold_total) = counts;
    let warm_total = not_hot - cold_total;
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
            "records": total - not_hot,
            "pending": r.hot.pending(),
            "failed_batches": r.hot.failed_batches(),
            "duplicates_dropped": r.hot.duplicates(),
            "indexed": r.hot.indexes().sizes().0,
            "indexed_vectors": r.hot.indexes().sizes().1,
            "index_pending": r.hot.index_pending(),
            "searched_exactly": r.hot.tail().len(),
            "index_failures": r.hot.index_failures(),
        },
        "embeddings": {
            "loaded": r.hot.backfill().is_some(),
            "source": agg.embedder().map(|e| e.source()),
            "backfill_queued": r.hot.backfill().map_or(0, |b| b.queued()),
            "backfill_embedded": r.hot.backfill().map_or(0, |b| b.embedded()),
            "backfill_failed": r.hot.backfill().map_or(0, |b| b.failed()),
            "backfill_skipped": r.hot.backfill().map_or(0, |b| b.skipped()),
        },
        "warm": r.hot.warm().map(|w| json!({
            "records": warm_total,
            "path": w.config.path,
            "bytes": w.size_bytes(),
            "hot_window_s": w.config.hot_window.as_secs(),
            "indexed": w.indexes().sizes().0,
            "indexed_vectors": w.indexes().sizes().1,
            "moves_done": w.moves_done.load(std::sync::atomic::Ordering::Relaxed),
            "moves_failed": w.moves_failed.load(std::sync::atomic::Ordering::Relaxed),
            "records_moved": w.records_moved.load(std::sync::atomic::Ordering::Relaxed),
            "interrupted_at_start": w.interrupted,
            "last_move": w.last_move(),
            "last_error": w.last_error(),
            "journal": journal,
        })),
        "cold": r.hot.cold().map(|c| cold_summary(c, cold_total)),
        "wal": {"bytes": r.wal.size_bytes(), "segments": r.wal.segments(), "queued": r.wal.queued(), "failed": r.wal.failed()},
        "sessions": r.metrics.active(),
        "cache": {
            "kind": agg.cache.kind(),
            "hits": agg.cache.metrics.hits.get(),
            "misses": agg.cache.metrics.misses.get(),
            "bypassed": agg.cache.metrics.bypassed.get(),
            "breaker_open": agg.cache.breaker_open(),
        },
    }))
    .into_response()
}

/// Disk use of the warm file's filesystem against the configured thresholds: 200 while below critical, 503 from
/// it, so that a probe or an alert can use the status code alone.
async fn warm_health(State(agg): State<Arc<Aggregator>>) -> Response {
    let Some(r) = agg.receiver() else { return starting() };
    let Some(warm) = r.hot.warm().cloned() else {
        return error(StatusCode::NOT_FOUND, "not_found", "the warm tier is not enabled (`warm.enabled: false`)");
    };
    let measured = tokio::task::spawn_blocking(move || {
        let usage = crate::storage::DiskUsage::of(&warm.config.path)?;
        Ok::<_, std::io::Error>((usage, warm.disk_footprint()))
    })
    .await;
    let (usage, (warm_bytes, _)) = match measured {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, "storage", &format!("warm disk: {e}")),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", &e.to_string()),
    };
    let used = usage.used_fraction();
    let status = agg.storage.health(used);
    let code =
        if status == crate::storage::DiskHealth::Critical { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    let percent = |f: f64| (f * 100_000.0).round() / 1000.0;
    (
        code,
        axum::Json(json!({
            "status": status,
            "warm_bytes": warm_bytes,
            "disk": usage,
            "used_percent": percent(used),
            "warning_percent": percent(agg.storage.disk_warning),
            "critical_percent": percent(agg.storage.disk_critical),
        })),
    )
        .into_response()
}

/// Bytes, objects and the estimated monthly cost of each tier (and of the local WAL and cold cache).
async fn storage_stats(State(agg): State<Arc<Aggregator>>) -> Response {
    use crate::storage::TierUsage;
    let Some(r) = agg.receiver() else { return starting() };
    let hot = r.hot.clone();
    let wal_bytes = r.wal.size_bytes();
    let wal_segments = r.wal.segments();
    let prices = agg.storage.prices;
    let report = tokio::task::spawn_blocking(move || {
        let hot_records: u64 = hot.counts()?.iter().map(|c| c.records).sum();
        // DuckDB's own accounting: the hot tables, plus the buffer pool it keeps for warm.
        let memory: i64 = hot.read(|c| {
            Ok(c.query_row("SELECT coalesce(sum(memory_usage_bytes), 0)::BIGINT FROM duckdb_memory()", [], |r| {
                r.get(0)
            })?)
        })?;
        let mut tiers = serde_json::Map::new();
        let mut local = serde_json::Map::new();
        tiers.insert("hot".into(), json!(TierUsage::priced(Some(hot_records), memory.max(0) as u64, None, prices.hot)));
        if let Some(warm) = hot.warm() {
            let records: u64 = hot.read(crate::warm::WarmTier::counts)?.iter().map(|(_, _, n)| n).sum();
            let (bytes, files) = warm.disk_footprint();
            tiers.insert("warm".into(), json!(TierUsage::priced(Some(records), bytes, Some(files), prices.warm)));
        }
        if let Some(cold) = hot.cold() {
            let (objects, records, bytes) = cold.totals().map_err(|e| crate::hot::HotError::Io(e.to_string()))?;
            tiers.insert("cold".into(), json!(TierUsage::priced(Some(records), bytes, Some(objects), prices.cold)));
            let cache_bytes = cold.cache().size_bytes();
            local.insert("cold_cache".into(), json!(TierUsage::priced(None, cache_bytes, None, prices.warm)));
        }
        local.insert("wal".into(), json!(TierUsage::priced(None, wal_bytes, Some(wal_segments), prices.warm)));
        Ok::<_, crate::hot::HotError>((tiers, local))
    })
    .await;
    let (tiers, local) = match report {
        Ok(Ok(report)) => report,
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, "storage", &e.to_string()),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", &e.to_string()),
    };
    let lines = || tiers.values().chain(local.values());
    let total_bytes: u64 = lines().filter_map(|v| v["bytes"].as_u64()).sum();
    let total_cost: f64 = lines().filter_map(|v| v["monthly_cost"].as_f64()).sum();
    axum::Json(json!({
        "currency": agg.storage.currency,
        "tiers": tiers,
        "local": local,
        "total_bytes": total_bytes,
        "total_monthly_cost": (total_cost * 10_000.0).round() / 10_000.0,
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
    gauge(
        &mut e,
        "akosha_hot_tail_vectors",
        "Vectors written but not yet in the ANN index, searched exactly meanwhile.",
        r.hot.tail().len() as u64,
    );
    counter(&mut e, "akosha_hot_index_failures_total", "Records whose index update failed.", r.hot.index_failures());
    counter(
        &mut e,
        "akosha_hot_duplicates_total",
        "Records dropped because an equal or newer version was stored.",
        r.hot.duplicates(),
    );
    if let Some(w) = r.hot.warm() {
        let (indexed, vectors) = w.indexes().sizes();
        gauge(&mut e, "akosha_warm_indexed_records", "Warm records in the search indexes.", indexed as u64);
        gauge(&mut e, "akosha_warm_indexed_vectors", "Warm records in the vector index.", vectors as u64);
        gauge(&mut e, "akosha_warm_bytes", "Size of the warm DuckDB file.", w.size_bytes());
        if let Ok(disk) = crate::storage::DiskUsage::of(&w.config.path) {
            let help = "Bytes used on the warm tier's filesystem (alert at storage.disk_warning / disk_critical).";
            gauge(&mut e, "akosha_warm_disk_used_bytes", help, disk.used_bytes);
            let help = "Bytes still available on the warm tier's filesystem.";
            gauge(&mut e, "akosha_warm_disk_available_bytes", help, disk.available_bytes);
        }
        counter(
            &mut e,
            "akosha_warm_moves_total",
            "Completed hot-to-warm moves.",
            w.moves_done.load(std::sync::atomic::Ordering::Relaxed),
        );
        counter(
            &mut e,
            "akosha_warm_moves_failed_total",
            "Failed hot-to-warm moves.",
            w.moves_failed.load(std::sync::atomic::Ordering::Relaxed),
        );
        counter(
            &mut e,
            "akosha_warm_moved_records_total",
            "Records moved from hot to warm.",
            w.records_moved.load(std::sync::atomic::Ordering::Relaxed),
        );
    }
    if let Some(c) = r.hot.cold() {
        use std::sync::atomic::Ordering::Relaxed;
        let (objects, rows, bytes) = c.totals().unwrap_or_default();
        gauge(&mut e, "akosha_cold_objects", "Objects in the cold catalog.", objects);
        gauge(&mut e, "akosha_cold_records", "Rows in the cold catalog.", rows);
        gauge(&mut e, "akosha_cold_bytes", "Bytes of the catalogued cold objects.", bytes);
        gauge(&mut e, "akosha_cold_cache_bytes", "Bytes in the local cold-object cache.", c.cache().size_bytes());
        let cold_counters: [(&str, &str, &std::sync::atomic::AtomicU64); 11] = [
            ("akosha_cold_cache_fetches_total", "Cold objects downloaded into the cache.", &c.cache().fetched),
            ("akosha_cold_cache_hits_total", "Cold objects a query found in the cache.", &c.cache().hits),
            ("akosha_cold_moves_total", "Completed warm-to-cold moves.", &c.moves_done),
            ("akosha_cold_moves_failed_total", "Failed warm-to-cold moves.", &c.moves_failed),
            ("akosha_cold_moved_records_total", "Records moved from warm to cold.", &c.records_moved),
            (
                "akosha_cold_uploads_verified_by_checksum_total",
                "Cold uploads the store verified against the sha256 they declared.",
                &c.uploads_verified_by_checksum,
            ),
            (
                "akosha_cold_uploads_verified_by_etag_total",
                "Cold uploads the store verified by returning their MD5 as the ETag.",
                &c.uploads_verified_by_etag,
            ),
            (
                "akosha_cold_uploads_read_back_total",
                "Cold uploads verified by reading them back.",
                &c.uploads_read_back,
            ),
            ("akosha_cold_promotions_total", "Groups promoted from cold back to warm.", &c.promotions_done),
            ("akosha_cold_promotions_failed_total", "Failed promotions from cold to warm.", &c.promotions_failed),
            ("akosha_cold_promoted_records_total", "Records promoted from cold back to warm.", &c.records_promoted),
        ];
        for (name, help, value) in cold_counters {
            counter(&mut e, name, help, value.load(Relaxed));
        }
        if let Ok((totals, promoted)) = r.hot.promotion_to_hot() {
            counter(&mut e, "akosha_hot_promotions_total", "Groups promoted from warm to hot.", totals.promoted);
            counter(
                &mut e,
                "akosha_hot_promotion_releases_total",
                "Promoted groups that went idle and left hot.",
                totals.released,
            );
            counter(&mut e, "akosha_hot_promotions_failed_total", "Failed rounds of promotion to hot.", totals.failed);
            gauge(&mut e, "akosha_hot_promoted_groups", "Groups promoted to hot now.", promoted.len() as u64);
        }
        gauge(
            &mut e,
            "akosha_cold_circuit_open",
            "1 while the object store's circuit breaker refuses calls.",
            u64::from(c.circuit_open()),
        );
    }
    let c = &agg.cache.metrics;
    counter(&mut e, "akosha_cache_hits_total", "Answers served from the query cache.", c.hits.get());
    counter(&mut e, "akosha_cache_misses_total", "Query cache lookups that found nothing.", c.misses.get());
    counter(
        &mut e,
        "akosha_cache_bypassed_total",
        "Cache lookups and stores skipped because Redis failed.",
        c.bypassed.get(),
    );
    counter(&mut e, "akosha_cache_errors_total", "Redis calls that failed or timed out.", c.errors.get());
    counter(
        &mut e,
        "akosha_cache_breaker_opened_total",
        "Times the Redis circuit breaker opened.",
        c.breaker_opened.get(),
    );
    gauge(&mut e, "akosha_cache_breaker_open", "1 while Redis is bypassed.", u64::from(agg.cache.breaker_open()));
    if let Some(b) = r.hot.backfill() {
        gauge(&mut e, "akosha_embed_backfill_queue", "Records waiting for an embedding.", b.queued());
        counter(&mut e, "akosha_embed_backfill_embedded_total", "Records embedded in the background.", b.embedded());
        counter(&mut e, "akosha_embed_backfill_failed_total", "Records whose embedding failed.", b.failed());
        counter(&mut e, "akosha_embed_backfill_skipped_total", "Records not queued: the queue was full.", b.skipped());
    }
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

/// A request body, or the JSON error saying why it could not be read (too large, cut short).
pub(crate) type Body = Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>;

/// The JSON error for a body that could not be read.
pub(crate) fn body_error(rejection: axum::extract::rejection::BytesRejection) -> Response {
    let status = rejection.status();
    let code = if status == StatusCode::PAYLOAD_TOO_LARGE { "too_large" } else { "bad_request" };
    error(status, code, &rejection.body_text())
}

async fn search(State(agg): State<Arc<Aggregator>>, body: Body, mode: Mode) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(rejection) => return body_error(rejection),
    };
    let request: SearchRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", &format!("invalid search request: {e}")),
    };
    let filters = match request.filters() {
        Ok(f) => f,
        Err(message) => return error(StatusCode::BAD_REQUEST, "bad_request", &message),
    };
    let Some(service) = agg.query() else { return starting() };
    let started = std::time::Instant::now();
    let result = tokio::task::spawn_blocking(move || {
        let need = |field: &str| QueryError::Invalid(format!("`{field}` is required for this search"));
        match mode {
            Mode::Vector => {
                let embedding = service.query_vector(request.embedding.as_deref(), request.query.as_deref())?;
                service.vector(&embedding, request.limit, &filters)
            }
            Mode::Text => {
                let query = request.query.as_deref().ok_or_else(|| need("query"))?;
                service.text(query, request.limit, &filters)
            }
            // The text ranks by BM25 and, embedded, by vector; a given `embedding` replaces the latter.
            Mode::Hybrid => {
                let query = request.query.as_deref().ok_or_else(|| need("query"))?;
                let embedding = service.query_vector(request.embedding.as_deref(), Some(query))?;
                service.hybrid(query, &embedding, request.limit, &filters)
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
        Ok(Err(e)) => query_error(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", &e.to_string()),
    }
}

fn query_error(e: QueryError) -> Response {
    match e {
        QueryError::Invalid(message) => error(StatusCode::BAD_REQUEST, "bad_request", &message),
        QueryError::Unavailable(message) => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &message),
        QueryError::Storage(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "storage", &e.to_string()),
    }
}

/// Runs a query off the async runtime and answers with its JSON.
async fn blocking<T: serde::Serialize + Send + 'static>(
    agg: &Aggregator,
    f: impl FnOnce(QueryService) -> Result<T, QueryError> + Send + 'static,
) -> Response {
    let Some(service) = agg.query() else { return starting() };
    match tokio::task::spawn_blocking(move || f(service)).await {
        Ok(Ok(value)) => axum::Json(value).into_response(),
        Ok(Err(e)) => query_error(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", &e.to_string()),
    }
}

/// Query-string parameters shared by the GET endpoints (each uses the ones it needs).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    /// One system or several, comma-separated.
    system_id: Option<String>,
    kind: Option<String>,
    project: Option<String>,
    category: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
    embeddings: Option<bool>,
    entity: Option<String>,
    relation_type: Option<String>,
    depth: Option<u32>,
    from: Option<String>,
    to: Option<String>,
    max_hops: Option<u32>,
    metric: Option<String>,
    resolution: Option<String>,
    threshold: Option<f64>,
    robust: Option<bool>,
    min_r: Option<f64>,
    older_than: Option<String>,
}

impl Params {
    fn systems(&self) -> Vec<String> {
        self.system_id
            .as_deref()
            .map(|s| s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect())
            .unwrap_or_default()
    }

    fn time(&self, field: &str, value: Option<&String>) -> Result<Option<i64>, QueryError> {
        value
            .map(|v| match v.parse::<i64>() {
                Ok(us) => Ok(us),
                Err(_) => TimeBound::Text(v.clone()).micros(field),
            })
            .transpose()
            .map_err(QueryError::Invalid)
    }

    fn series(&self) -> Result<SeriesQuery, QueryError> {
        let since_us = self.time("since", self.since.as_ref())?;
        let until_us = self.time("until", self.until.as_ref())?;
        Ok(SeriesQuery {
            name: self.metric.clone().ok_or_else(|| QueryError::Invalid("`metric` is required".into()))?,
            systems: self.systems(),
            since_us,
            until_us,
            resolution: Resolution::parse(self.resolution.as_deref(), since_us, until_us)
                .map_err(QueryError::Invalid)?,
        })
    }
}

type QueryParams = Result<axum::extract::Query<Params>, axum::extract::rejection::QueryRejection>;

fn params(q: QueryParams) -> Result<Params, QueryError> {
    q.map(|axum::extract::Query(p)| p).map_err(|e| QueryError::Invalid(e.body_text()))
}

async fn list_records(State(agg): State<Arc<Aggregator>>, q: QueryParams) -> Response {
    let p = match params(q) {
        Ok(p) => p,
        Err(e) => return query_error(e),
    };
    let build = || -> Result<ListQuery, QueryError> {
        let kind = p.kind.as_deref().unwrap_or("conversation");
        Ok(ListQuery {
            kind: kind.parse::<RecordKind>().map_err(|e| QueryError::Invalid(format!("`kind`: {e}")))?,
            systems: p.systems(),
            project: p.project.clone(),
            category: p.category.clone(),
            since_us: p.time("since", p.since.as_ref())?,
            until_us: p.time("until", p.until.as_ref())?,
            limit: p.limit.unwrap_or(100),
            cursor: p.cursor.as_deref().map(Cursor::decode).transpose().map_err(QueryError::Invalid)?,
            with_embeddings: p.embeddings.unwrap_or(false),
        })
    };
    match build() {
        Ok(q) => blocking(&agg, move |s| s.list(&q)).await,
        Err(e) => query_error(e),
    }
}

async fn project_stats(State(agg): State<Arc<Aggregator>>, q: QueryParams) -> Response {
    match params(q) {
        Ok(p) => blocking(&agg, move |s| Ok(json!({"projects": s.project_counts(&p.systems())?}))).await,
        Err(e) => query_error(e),
    }
}

async fn graph_neighbours(State(agg): State<Arc<Aggregator>>, q: QueryParams) -> Response {
    let p = match params(q) {
        Ok(p) => p,
        Err(e) => return query_error(e),
    };
    blocking(&agg, move |s| {
        let entity = p.entity.as_deref().ok_or_else(|| QueryError::Invalid("`entity` is required".into()))?;
        s.neighbours(entity, &p.systems(), p.relation_type.as_deref(), p.depth.unwrap_or(1))
    })
    .await
}

async fn graph_path(State(agg): State<Arc<Aggregator>>, q: QueryParams) -> Response {
    let p = match params(q) {
        Ok(p) => p,
        Err(e) => return query_error(e),
    };
    blocking(&agg, move |s| {
        let (Some(from), Some(to)) = (p.from.as_deref(), p.to.as_deref()) else {
            return Err(QueryError::Invalid("`from` and `to` are required".into()));
        };
        let path = s.path(from, to, &p.systems(), p.max_hops.unwrap_or(3))?;
        Ok(json!({"found": path.is_some(), "path": path}))
    })
    .await
}

async fn graph_stats(State(agg): State<Arc<Aggregator>>, q: QueryParams) -> Response {
    match params(q) {
        Ok(p) => blocking(&agg, move |s| s.graph_stats(&p.systems())).await,
        Err(e) => query_error(e),
    }
}

async fn metric_names(State(agg): State<Arc<Aggregator>>, q: QueryParams) -> Response {
    let p = match params(q) {
        Ok(p) => p,
        Err(e) => return query_error(e),
    };
    blocking(&agg, move |s| {
        let since = p.time("since", p.since.as_ref())?;
        Ok(json!({"metrics": s.metric_summaries(&p.systems(), since)?}))
    })
    .await
}

#[derive(Debug, Clone, Copy)]
enum Analysis {
    Series,
    Trend,
    Anomalies,
    Correlation,
}

async fn metric_analysis(State(agg): State<Arc<Aggregator>>, q: QueryParams, analysis: Analysis) -> Response {
    let p = match params(q) {
        Ok(p) => p,
        Err(e) => return query_error(e),
    };
    blocking(&agg, move |s| {
        let q = p.series()?;
        let base = json!({"metric": q.name, "resolution": q.resolution});
        let mut out = base;
        match analysis {
            Analysis::Series => out["series"] = json!(s.series(&q)?),
            Analysis::Trend => out["trends"] = json!(s.trend(&q)?),
            Analysis::Anomalies => {
                let threshold = p.threshold.unwrap_or(3.0);
                out["anomalies"] =
                    json!(s.anomalies(&q, threshold, p.robust.unwrap_or(false), p.limit.unwrap_or(100))?);
            }
            Analysis::Correlation => out["correlations"] = json!(s.correlate(&q, p.min_r.unwrap_or(0.0))?),
        }
        Ok(out)
    })
    .await
}

/// `POST /v1/admin/warm/move?older_than=1h`: moves records older than that (default: the configured hot window)
/// to the warm tier now.
async fn warm_move(State(agg): State<Arc<Aggregator>>, q: QueryParams) -> Response {
    let p = match params(q) {
        Ok(p) => p,
        Err(e) => return query_error(e),
    };
    let older_than = match p.older_than.as_deref().map(akosha_protocol::settings::parse_duration).transpose() {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", &format!("`older_than`: {e}")),
    };
    blocking(&agg, move |s| {
        let report = s.move_to_warm(older_than)?;
        Ok(json!({"moved": report.is_some(), "report": report}))
    })
    .await
}

/// `POST /v1/admin/cold/move?older_than=90d`: moves warm records older than that (default: the configured warm
/// window) to cold now, then compacts.
async fn cold_move(State(agg): State<Arc<Aggregator>>, q: QueryParams) -> Response {
    let p = match params(q) {
        Ok(p) => p,
        Err(e) => return query_error(e),
    };
    let older_than = match p.older_than.as_deref().map(akosha_protocol::settings::parse_duration).transpose() {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", &format!("`older_than`: {e}")),
    };
    let Some(r) = agg.receiver() else { return starting() };
    let hot = r.hot.clone();
    let Some(cold) = hot.cold().cloned() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the cold tier is disabled (`cold.enabled`)");
    };
    let now = jiff::Timestamp::now().as_microsecond();
    let windows = match older_than {
        Some(d) => crate::lifecycle::Windows::uniform(d),
        None => cold.config.warm_windows(),
    };
    match tokio::task::spawn_blocking(move || {
        let report = hot.move_to_cold_by(|k| windows.cutoff(k, now))?;
        let compaction = cold.compact()?;
        Ok::<_, crate::cold::ColdError>(json!({"moved": report.is_some(), "report": report, "compaction": compaction}))
    })
    .await
    {
        Ok(Ok(answer)) => axum::Json(answer).into_response(),
        Ok(Err(e)) => cold_failure(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", &e.to_string()),
    }
}

/// A store that is down (or a breaker that is open) is 503: retry later; anything else is a storage error.
fn cold_failure(e: crate::cold::ColdError) -> Response {
    match e {
        crate::cold::ColdError::Store(_) | crate::cold::ColdError::CircuitOpen { .. } => {
            error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &e.to_string())
        }
        e => error(StatusCode::INTERNAL_SERVER_ERROR, "storage", &e.to_string()),
    }
}

/// `POST /v1/admin/cold/promote`: saves the read counts and promotes the groups read often enough, now — cold
/// to warm (`report`), then warm to hot (`hot`, which also lets idle promoted groups go).
async fn cold_promote(State(agg): State<Arc<Aggregator>>) -> Response {
    let Some(r) = agg.receiver() else { return starting() };
    let hot = r.hot.clone();
    match tokio::task::spawn_blocking(move || hot.promote_from_cold().map(|cold| (cold, hot.promote_to_hot()))).await {
        Ok(Ok((Some(report), Ok(to_hot)))) => axum::Json(json!({"report": report, "hot": to_hot})).into_response(),
        Ok(Ok((Some(_), Err(e)))) => error(StatusCode::INTERNAL_SERVER_ERROR, "storage", &e.to_string()),
        Ok(Ok((None, _))) => {
            error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the cold tier is disabled (`cold.enabled`)")
        }
        Ok(Err(e)) => cold_failure(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", &e.to_string()),
    }
}

/// `GET /v1/admin/keys`: the key-encryption keys (ids only) and how many cold objects each wraps;
/// `POST /v1/admin/keys/rewrap`: re-wraps the data keys of objects not under the active key first (the lifecycle
/// does it every round too), so that an old key can be removed once nothing uses it.
async fn keys(State(agg): State<Arc<Aggregator>>, rewrap: bool) -> Response {
    let Some(r) = agg.receiver() else { return starting() };
    let keyring = agg.encryption.clone();
    let cold = r.hot.cold().cloned();
    let answer = tokio::task::spawn_blocking(move || {
        let rewrapped = match (&cold, rewrap) {
            (Some(cold), true) => cold.rewrap_keys()?,
            _ => 0,
        };
        let usage = match &cold {
            Some(cold) => cold.key_usage()?,
            None => Vec::new(),
        };
        let objects: serde_json::Map<String, serde_json::Value> =
            usage.into_iter().map(|(kek, n)| (kek.unwrap_or_else(|| "plain".into()), json!(n))).collect();
        Ok::<_, crate::cold::ColdError>(json!({
            "enabled": keyring.is_some(),
            "active_key": keyring.as_ref().map(|k| k.active_id().to_owned()),
            "keys": keyring.as_ref().map(|k| k.ids()).unwrap_or_default(),
            "cold_objects": objects,
            "rewrapped": rewrapped,
        }))
    })
    .await;
    match answer {
        Ok(Ok(answer)) => axum::Json(answer).into_response(),
        Ok(Err(e)) => cold_failure(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", &e.to_string()),
    }
}

/// `POST /v1/admin/delete`: what to delete and why.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteBody {
    system_id: Option<String>,
    project: Option<String>,
    kind: Option<String>,
    id: Option<String>,
    reason: Option<String>,
    /// Rewrite the cold objects now instead of at the next compaction.
    #[serde(default)]
    compact_now: bool,
}

async fn delete_records(
    State(agg): State<Arc<Aggregator>>,
    caller: Option<axum::Extension<crate::auth::Caller>>,
    body: axum::body::Bytes,
) -> Response {
    let body: DeleteBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", &format!("deletion request: {e}")),
    };
    let kind = match body.kind.as_deref().map(str::parse::<RecordKind>).transpose() {
        Ok(k) => k,
        Err(_) => return error(StatusCode::BAD_REQUEST, "bad_request", "`kind` is not a record kind"),
    };
    let selector = crate::erasure::Selector { system_id: body.system_id, project: body.project, kind, id: body.id };
    let Some(r) = agg.receiver() else { return starting() };
    let (hot, audit) = (r.hot.clone(), agg.audit.clone());
    let actor = caller.map_or_else(|| "anonymous".to_owned(), |c| c.name.to_string());
    let reason = body.reason.unwrap_or_default();
    let compact_now = body.compact_now;
    let outcome = tokio::task::spawn_blocking(move || {
        let outcome = crate::erasure::delete(&hot, &audit, &selector, &reason, &actor)?;
        let cold = hot.cold().cloned().filter(|_| outcome.deleted.cold_tombstones > 0);
        let compaction = match cold {
            Some(cold) if compact_now => Some(cold.compact().map_err(|e| e.to_string())),
            Some(cold) => {
                // Hidden from reads already; the objects are rewritten in the background.
                std::thread::spawn(move || {
                    if let Err(e) = cold.compact() {
                        tracing::warn!(message = "Erasing rows from cold objects failed; the next compaction retries.", error = %e);
                    }
                });
                None
            }
            None => None,
        };
        Ok::<_, crate::erasure::ErasureError>((outcome, compaction))
    })
    .await;
    match outcome {
        Ok(Ok((outcome, compaction))) => axum::Json(json!({
            "request": outcome.request,
            "deleted": outcome.deleted,
            "compaction": compaction.map(|c| match c {
                Ok(report) => json!(report),
                Err(e) => json!({"error": e}),
            }),
        }))
        .into_response(),
        Ok(Err(e @ crate::erasure::ErasureError::Invalid(_))) => {
            error(StatusCode::BAD_REQUEST, "bad_request", &e.to_string())
        }
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, "storage", &e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", &e.to_string()),
    }
}

/// `POST /v1/admin/backup`: where the backup goes.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BackupBody {
    url: String,
    #[serde(default)]
    options: std::collections::BTreeMap<String, String>,
}

/// Starts a backup in the background (one at a time): 202 with its id; `GET` follows it.
async fn start_backup(
    State(agg): State<Arc<Aggregator>>,
    caller: Option<axum::Extension<crate::auth::Caller>>,
    body: axum::body::Bytes,
) -> Response {
    let body: BackupBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", &format!("backup request: {e}")),
    };
    let options: Vec<(String, String)> = body.options.into_iter().collect();
    if let Some(dir) = crate::objects::local_dir(&body.url)
        && let Err(e) = std::fs::create_dir_all(&dir)
    {
        return error(StatusCode::BAD_REQUEST, "bad_request", &format!("cannot create {}: {e}", dir.display()));
    }
    let dest = match crate::objects::open(&body.url, &options) {
        Ok(dest) => dest,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", &e.to_string()),
    };
    let Some(r) = agg.receiver() else { return starting() };
    let (id, taken_at) = crate::backup::new_id();
    let job = Arc::new(crate::backup::BackupJob {
        id: id.clone(),
        url: body.url.clone(),
        progress: Arc::default(),
        outcome: std::sync::Mutex::new(None),
    });
    {
        let mut current = agg.backup.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(running) = current.as_ref().filter(|j| j.running()) {
            return error(
                StatusCode::CONFLICT,
                "conflict",
                &format!("backup {} to {} is still running", running.id, running.url),
            );
        }
        *current = Some(job.clone());
    }
    let actor = caller.map_or_else(|| "anonymous".to_owned(), |c| c.name.to_string());
    tracing::info!(message = "Backup started.", id = %id, url = %body.url, actor = %actor);
    let (hot, wal, audit) = (r.hot.clone(), r.wal.clone(), agg.audit.clone());
    let (staging, keyring) = (agg.backup_staging.clone(), agg.encryption.clone());
    let running = job.clone();
    tokio::spawn(async move {
        let progress = running.progress.clone();
        let plan = crate::backup::Plan { id: (id, taken_at), staging, dest, keyring };
        let outcome = crate::backup::take(hot, wal, audit, plan, progress).await.map_err(|e| e.to_string());
        *running.outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(outcome);
    });
    (StatusCode::ACCEPTED, axum::Json(job.to_json())).into_response()
}

/// `GET /v1/admin/backup`: the latest backup started here, with its progress.
async fn backup_status(State(agg): State<Arc<Aggregator>>) -> Response {
    let current = agg.backup.lock().unwrap_or_else(|p| p.into_inner()).clone();
    match current {
        Some(job) => axum::Json(job.to_json()).into_response(),
        None => axum::Json(json!({"state": "none"})).into_response(),
    }
}

/// `GET /v1/admin/audit[?limit=N]`: the newest entries and whether the hash chain holds.
async fn audit_log(State(agg): State<Arc<Aggregator>>, q: QueryParams) -> Response {
    let p = match params(q) {
        Ok(p) => p,
        Err(e) => return query_error(e),
    };
    let limit = p.limit.unwrap_or(100);
    let audit = agg.audit.clone();
    match tokio::task::spawn_blocking(move || audit.tail(limit)).await {
        Ok(Ok((entries, chain))) => axum::Json(json!({"entries": entries, "chain": chain})).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, "storage", &e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", &e.to_string()),
    }
}

/// Rows of every kind in `schema` (`main`: hot, `warm`) older than `cutoff_us`: what the next move takes.
fn records_older_than(
    hot: &crate::hot::HotTier,
    schema: &str,
    windows: &crate::lifecycle::Windows,
    now_us: i64,
) -> Result<u64, crate::hot::HotError> {
    hot.read(|c| {
        let mut n = 0;
        for kind in RecordKind::ALL {
            let sql = format!("SELECT count(*) FROM {schema}.{} WHERE ts < make_timestamp(?)", kind.as_str());
            n += c.query_row(&sql, [windows.cutoff(kind, now_us)], |row| row.get::<_, i64>(0))? as u64;
        }
        Ok(n)
    })
}

fn cold_summary(c: &crate::cold::ColdTier, records: u64) -> serde_json::Value {
    use std::sync::atomic::Ordering::Relaxed;
    let (objects, _, bytes) = c.totals().unwrap_or_default();
    json!({
        "records": records,
        "objects": objects,
        "bytes": bytes,
        "url": c.location().url,
        "warm_window_s": c.config.warm_window.as_secs(),
        "cache_bytes": c.cache().size_bytes(),
        "moves_done": c.moves_done.load(Relaxed),
        "moves_failed": c.moves_failed.load(Relaxed),
        "records_moved": c.records_moved.load(Relaxed),
        "uploads_verified_by_checksum": c.uploads_verified_by_checksum.load(Relaxed),
        "uploads_verified_by_etag": c.uploads_verified_by_etag.load(Relaxed),
        "uploads_read_back": c.uploads_read_back.load(Relaxed),
        "interrupted_at_start": c.interrupted,
        "circuit_open": c.circuit_open(),
        "last_move": c.last_move(),
        "last_error": c.last_error(),
    })
}

/// `GET /v1/lifecycle`: the tiers' windows, moves pending, running and failed, and the journals' latest rows.
async fn lifecycle(State(agg): State<Arc<Aggregator>>) -> Response {
    let Some(r) = agg.receiver() else { return starting() };
    let hot = r.hot.clone();
    let answer = tokio::task::spawn_blocking(move || -> Result<serde_json::Value, String> {
        let now = jiff::Timestamp::now().as_microsecond();
        let mut out = json!({});
        if let Some(w) = hot.warm() {
            let windows = w.config.hot_windows();
            let due = records_older_than(&hot, "main", &windows, now).map_err(|e| e.to_string())?;
            let journal = hot.read(|c| crate::warm::WarmTier::journal_tail(c, 50)).map_err(|e| e.to_string())?;
            out["hot_to_warm"] = json!({
                "window_s": w.config.hot_window.as_secs(),
                "windows_s": windows.to_json(),
                "schedule": w.config.schedule.map(|s| s.to_string()),
                "interval_s": w.config.move_interval.as_secs(),
                "records_due": due,
                "running": journal.iter().filter(|j| !matches!(j["state"].as_str(), Some("done" | "failed" | "interrupted"))).count(),
                "failed": journal.iter().filter(|j| j["state"] == "failed").count(),
                "last_move": w.last_move(),
                "last_error": w.last_error(),
                "journal": journal,
            });
        }
        if let Some(c) = hot.cold() {
            let windows = c.config.warm_windows();
            let due = records_older_than(&hot, "warm", &windows, now).map_err(|e| e.to_string())?;
            let journal = c.journal_tail(50).map_err(|e| e.to_string())?;
            out["warm_to_cold"] = json!({
                "window_s": c.config.warm_window.as_secs(),
                "windows_s": windows.to_json(),
                "schedule": c.config.schedule.map(|s| s.to_string()),
                "interval_s": c.config.move_interval.as_secs(),
                "records_due": due,
                "running": journal.iter().filter(|j| !matches!(j["state"].as_str(), Some("done" | "failed" | "interrupted"))).count(),
                "failed": journal.iter().filter(|j| j["state"] == "failed").count(),
                "circuit_open": c.circuit_open(),
                "last_move": c.last_move(),
                "last_error": c.last_error(),
                "journal": journal,
            });
            let candidates = c.promotion_candidates().map_err(|e| e.to_string())?;
            let p = &c.config.promotion;
            out["cold_to_warm"] = json!({
                "enabled": p.enabled,
                "reads": p.reads,
                "window_s": p.window.as_secs(),
                "min_age_s": p.min_age.as_secs(),
                "max_groups_per_run": p.max_groups_per_run,
                "promoted": c.promotions_done.load(std::sync::atomic::Ordering::Relaxed),
                "failed": c.promotions_failed.load(std::sync::atomic::Ordering::Relaxed),
                "records_promoted": c.records_promoted.load(std::sync::atomic::Ordering::Relaxed),
                "candidates": candidates.iter().map(|(g, score)| json!({
                    "kind": g.kind, "system_id": g.system_id, "day": g.day, "reads": score,
                })).collect::<Vec<_>>(),
            });
            let (totals, promoted) = hot.promotion_to_hot().map_err(|e| e.to_string())?;
            let candidates = hot.hot_promotion_candidates().map_err(|e| e.to_string())?;
            out["warm_to_hot"] = json!({
                "totals": totals,
                "candidates": candidates.iter().map(|(g, reads, young)| json!({
                    "kind": g.kind, "system_id": g.system_id, "day": g.day, "reads": reads, "too_young": young,
                })).collect::<Vec<_>>(),
                "promoted_now": promoted.iter().map(|(kind, system_id, day, until)| json!({
                    "kind": kind.as_str(), "system_id": system_id, "day": day, "held_until": until,
                })).collect::<Vec<_>>(),
            });
        }
        Ok(out)
    })
    .await;
    match answer {
        Ok(Ok(answer)) => axum::Json(answer).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, "storage", &e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", &e.to_string()),
    }
}

/// `POST /v1/embeddings`, OpenAI-compatible: `{"input": "text" | ["text", …]}`.
async fn embeddings(State(agg): State<Arc<Aggregator>>, body: Body) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(rejection) => return body_error(rejection),
    };
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Input {
        One(String),
        Many(Vec<String>),
    }
    #[derive(serde::Deserialize)]
    struct Request {
        input: Input,
        #[serde(default)]
        model: Option<String>,
    }
    let request: Request = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", &format!("invalid embeddings request: {e}")),
    };
    let texts = match request.input {
        Input::One(t) => vec![t],
        Input::Many(ts) => ts,
    };
    if texts.is_empty() || texts.len() > 1000 {
        return error(StatusCode::BAD_REQUEST, "bad_request", "`input` must hold 1 to 1000 texts");
    }
    let model = request.model.unwrap_or_else(|| "all-MiniLM-L6-v2".into());
    blocking(&agg, move |s| {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let vectors = s.embed(&refs)?;
        let data: Vec<_> = vectors
            .into_iter()
            .enumerate()
            .map(|(index, embedding)| json!({"object": "embedding", "index": index, "embedding": embedding}))
            .collect();
        Ok(json!({"object": "list", "data": data, "model": model}))
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::router;
    use crate::Aggregator;

    /// A body over `http.max_body_bytes` is refused with the JSON error, on cached and uncached routes alike.
    #[tokio::test]
    async fn oversized_bodies_get_a_json_413() {
        let config = crate::config::AggregatorConfig::parse(
            "http: {max_body_bytes: 2KiB}\ncache: {enabled: false}",
            |_| None,
            &[],
        )
        .unwrap();
        // No receiver: the handlers would answer `starting`, so a 413 proves the body limit answered first.
        let audit_dir = tempfile::tempdir().unwrap();
        let agg = Arc::new(Aggregator {
            receiver: std::sync::OnceLock::new(),
            embedder: std::sync::OnceLock::new(),
            auth: crate::auth::Auth::new(&config.auth),
            max_body_bytes: config.http_max_body_bytes,
            storage: config.storage.clone(),
            audit: Arc::new(crate::erasure::AuditLog::open(audit_dir.path()).unwrap()),
            backup: std::sync::Mutex::new(None),
            backup_staging: audit_dir.path().join("backup-staging"),
            encryption: None,
            cache: Arc::new(crate::cache::Cache::new(config.cache.clone()).unwrap()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router(agg)).await });
        let client = reqwest::Client::new();
        for path in ["/v1/search/text", "/v1/embeddings", "/mcp"] {
            let response = client
                .post(format!("http://{addr}{path}"))
                .header("content-type", "application/json")
                .body(vec![b' '; 4096])
                .send()
                .await
                .unwrap();
            assert_eq!(response.status().as_u16(), 413, "{path}");
            let json: serde_json::Value = response.json().await.unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(json["error"], "too_large", "{path}");
        }
    }

    /// Every route the router serves is described in docs/openapi.yaml, and nothing more.
    #[test]
    fn openapi_describes_every_route() {
        let spec: serde_json::Value =
            serde_norway::from_str(include_str!("../../docs/openapi.yaml")).expect("openapi.yaml parses");
        assert_eq!(spec["openapi"], "3.1.0");
        let mut documented: Vec<String> = spec["paths"].as_object().unwrap().keys().cloned().collect();
        documented.sort();
        let source = include_str!("http.rs");
        let mut served: Vec<String> =
            source.split(".route(\"").skip(1).filter_map(|rest| rest.split('"').next()).map(str::to_owned).collect();
        served.sort();
        served.dedup();
        assert_eq!(documented, served);
    }
}
