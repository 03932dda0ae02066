//! MCP server (streamable HTTP, JSON responses) at `/mcp`, with Akosha's tool names and arguments so that
//! existing clients keep working, plus our own (`search_text`, `search_hybrid`, `get_memory`).
//!
//! `POST /mcp` takes a JSON-RPC request or batch: `initialize`, `ping`, `tools/list`, `tools/call` and
//! notifications. No server-initiated stream is offered, so `GET /mcp` answers 405 as the transport allows.
//! Session-Buddy's push (plain `tools/call` without `initialize`, reading plain keys from `result`) works too:
//! store tools put their keys at the top of `result` beside the MCP `content`. The bearer token of the HTTP
//! request applies: reading tools need `read` (checked by the HTTP layer), storing tools `write`.

use std::sync::Arc;

use akosha_protocol::RecordKind;
use akosha_session_buddy::push::{TOOLS as STORE_TOOLS, map_tool_call, tool_result};
use axum::Extension;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::Aggregator;
use crate::auth::{Caller, Scope};
use crate::query::{QueryError, QueryService};
use crate::search::Filters;
use crate::timeseries::{Resolution, SeriesQuery};

const PROTOCOL_VERSION: &str = "2025-06-18";
const DAY_US: i64 = 86_400_000_000;

/// `(name, description, input schema)` of every tool besides the store tools.
fn query_tools() -> Vec<(&'static str, &'static str, Value)> {
    let s = |t: &str, d: &str| json!({"type": t, "description": d});
    vec![
        (
            "search_all_systems",
            "Semantic search over the memories of every system (or one, with system_id).",
            json!({"type": "object", "required": ["query"], "properties": {
                "query": s("string", "What to look for."),
                "limit": s("integer", "Results (default 10)."),
                "threshold": s("number", "Minimum cosine similarity (default 0.7)."),
                "system_id": s("string", "Only this system."),
            }}),
        ),
        (
            "search_text",
            "BM25 full-text search with highlighted snippets.",
            json!({"type": "object", "required": ["query"], "properties": {
                "query": s("string", "Words to match."),
                "limit": s("integer", "Results (default 10)."),
                "system_id": s("string", "Only this system."),
                "project": s("string", "Only this project."),
                "kind": s("string", "conversation, reflection, entity, relation or metric."),
            }}),
        ),
        (
            "search_hybrid",
            "Vector and text search fused by reciprocal rank.",
            json!({"type": "object", "required": ["query"], "properties": {
                "query": s("string", "What to look for."),
                "limit": s("integer", "Results (default 10)."),
                "system_id": s("string", "Only this system."),
            }}),
        ),
        (
            "get_memory",
            "One record by system, kind and id.",
            json!({"type": "object", "required": ["system_id", "id"], "properties": {
                "system_id": s("string", "The system."),
                "kind": s("string", "Record kind (default conversation)."),
                "id": s("string", "Record id."),
            }}),
        ),
        (
            "generate_embedding",
            "The 384-dimensional all-MiniLM-L6-v2 embedding of a text.",
            json!({"type": "object", "required": ["text"], "properties": {"text": s("string", "The text.")}}),
        ),
        (
            "generate_batch_embeddings",
            "Embeddings of several texts.",
            json!({"type": "object", "required": ["texts"], "properties": {
                "texts": {"type": "array", "items": {"type": "string"}},
                "batch_size": s("integer", "Ignored (batching is automatic); accepted for compatibility."),
            }}),
        ),
        (
            "get_system_metrics",
            "Every metric tracked per system with summary statistics.",
            json!({"type": "object", "properties": {"time_range_days": s("integer", "Look-back in days (default 30).")}}),
        ),
        (
            "analyze_trends",
            "Linear trend of a metric per system.",
            json!({"type": "object", "required": ["metric_name"], "properties": {
                "metric_name": s("string", "Metric name."),
                "system_id": s("string", "Only this system."),
                "time_window_days": s("integer", "Look-back in days (default 7)."),
            }}),
        ),
        (
            "detect_anomalies",
            "Points of a metric whose z-score exceeds the threshold.",
            json!({"type": "object", "required": ["metric_name"], "properties": {
                "metric_name": s("string", "Metric name."),
                "system_id": s("string", "Only this system."),
                "time_window_days": s("integer", "Look-back in days (default 7)."),
                "threshold_std": s("number", "Score threshold (default 3)."),
                "robust": s("boolean", "Median/MAD score instead of mean/stddev (default false)."),
            }}),
        ),
        (
            "correlate_systems",
            "Pearson correlation of a metric between systems over common 5-minute buckets.",
            json!({"type": "object", "required": ["metric_name"], "properties": {
                "metric_name": s("string", "Metric name."),
                "time_window_days": s("integer", "Look-back in days (default 7)."),
            }}),
        ),
        (
            "query_knowledge_graph",
            "Neighbours of an entity (by id or name) in the knowledge graph.",
            json!({"type": "object", "required": ["entity_id"], "properties": {
                "entity_id": s("string", "Entity id or name."),
                "edge_type": s("string", "Only relations of this type."),
                "limit": s("integer", "Most neighbours returned (default 50)."),
                "depth": s("integer", "Hops (default 1, at most 5)."),
                "system_id": s("string", "Only this system."),
            }}),
        ),
        (
            "find_path",
            "Shortest path between two entities.",
            json!({"type": "object", "required": ["source_id", "target_id"], "properties": {
                "source_id": s("string", "Entity id or name."),
                "target_id": s("string", "Entity id or name."),
                "max_hops": s("integer", "Longest path searched (default 3, at most 8)."),
            }}),
        ),
        (
            "get_graph_statistics",
            "Size, types, degrees and connectivity of the knowledge graph.",
            json!({"type": "object", "properties": {"system_id": s("string", "Only this system.")}}),
        ),
        (
            "health_check",
            "Aggregator health: readiness, records, index lag.",
            json!({"type": "object", "properties": {}}),
        ),
    ]
}

/// `GET /mcp`: no server-initiated stream.
pub async fn get() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        axum::Json(json!({"error": "method_not_allowed", "message": "POST JSON-RPC to /mcp"})),
    )
        .into_response()
}

/// `POST /mcp`.
pub async fn post(
    State(agg): State<Arc<Aggregator>>,
    caller: Option<Extension<Caller>>,
    body: crate::http::Body,
) -> Response {
    let body: Bytes = match body {
        Ok(b) => b,
        Err(rejection) => return crate::http::body_error(rejection),
    };
    let caller = caller.map(|Extension(c)| c);
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return axum::Json(rpc_error(&Value::Null, -32700, &format!("parse error: {e}"))).into_response(),
    };
    match request {
        Value::Array(items) if !items.is_empty() => {
            let mut answers = Vec::new();
            for item in &items {
                if let Some(answer) = handle(&agg, caller.as_ref(), item).await {
                    answers.push(answer);
                }
            }
            if answers.is_empty() {
                StatusCode::ACCEPTED.into_response()
            } else {
                axum::Json(Value::Array(answers)).into_response()
            }
        }
        single => match handle(&agg, caller.as_ref(), &single).await {
            None => StatusCode::ACCEPTED.into_response(),
            Some(answer) => axum::Json(answer).into_response(),
        },
    }
}

async fn handle(agg: &Arc<Aggregator>, caller: Option<&Caller>, request: &Value) -> Option<Value> {
    let Some(obj) = request.as_object() else {
        return Some(rpc_error(&Value::Null, -32600, "invalid request: expected a JSON-RPC object"));
    };
    let method = obj.get("method").and_then(Value::as_str);
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") || method.is_none() {
        let id = obj.get("id").cloned().unwrap_or(Value::Null);
        return Some(rpc_error(&id, -32600, "invalid request: `jsonrpc` must be \"2.0\" and `method` a string"));
    }
    // Notifications (`notifications/initialized`, …) get no answer.
    let id = obj.get("id").cloned()?;
    let params = obj.get("params").cloned().unwrap_or(Value::Null);
    let outcome = match method.unwrap_or_default() {
        "initialize" => Ok(json!({
            "protocolVersion": params.get("protocolVersion").and_then(Value::as_str).unwrap_or(PROTOCOL_VERSION),
            "capabilities": {"tools": {"listChanged": false}},
            "serverInfo": {"name": "akosha-aggregator", "version": env!("CARGO_PKG_VERSION")},
        })),
        "ping" => Ok(json!({})),
        "tools/list" => {
            let mut tools: Vec<Value> = query_tools()
                .into_iter()
                .map(|(name, description, schema)| json!({"name": name, "description": description, "inputSchema": schema}))
                .collect();
            tools.extend(STORE_TOOLS.iter().map(|(name, description)| {
                json!({"name": name, "description": description, "inputSchema": {"type": "object"}})
            }));
            Ok(json!({"tools": tools}))
        }
        "tools/call" => call(agg, caller, &params).await,
        other => Err((-32601, format!("method `{other}` not found"))),
    };
    Some(match outcome {
        Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
        Err((code, message)) => rpc_error(&id, code, &message),
    })
}

fn rpc_error(id: &Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

/// A tool's answer as an MCP `CallToolResult` with structured content.
fn tool_ok(value: Value) -> Value {
    json!({"content": [{"type": "text", "text": value.to_string()}], "structuredContent": value, "isError": false})
}

fn tool_error(message: &str) -> Value {
    json!({"content": [{"type": "text", "text": message}], "isError": true})
}

async fn call(agg: &Arc<Aggregator>, caller: Option<&Caller>, params: &Value) -> Result<Value, (i64, String)> {
    let Some(tool) = params.get("name").and_then(Value::as_str) else {
        return Err((-32602, "tools/call needs `params.name`".into()));
    };
    let args = params.get("arguments").cloned().unwrap_or_else(|| json!({}));
    if STORE_TOOLS.iter().any(|(name, _)| *name == tool) {
        if let Some(caller) = caller
            && !caller.may(Scope::Write)
        {
            return Ok(tool_error(&format!("token `{}` lacks the `write` scope that `{tool}` needs", caller.name)));
        }
        return store(agg, tool, &args).await;
    }
    if !query_tools().iter().any(|(name, _, _)| *name == tool) {
        return Err((-32602, format!("unknown tool `{tool}`")));
    }
    let Some(service) = agg.query() else { return Ok(tool_error("the aggregator is still replaying its log")) };
    let ready = agg.receiver().map(|r| (r.hot.inserted(), r.hot.index_pending(), r.wal.failed()));
    let tool = tool.to_owned();
    let answer = tokio::task::spawn_blocking(move || run_query(&service, &tool, &args, ready)).await;
    Ok(match answer {
        Ok(Ok(value)) => tool_ok(value),
        Ok(Err(e)) => tool_error(&e.to_string()),
        Err(e) => tool_error(&format!("internal error: {e}")),
    })
}

/// Stores records through the same mapping the agent uses for Session-Buddy's push. The system is the caller's
/// `metadata.source` (Session-Buddy's convention), else `mcp`.
async fn store(agg: &Arc<Aggregator>, tool: &str, args: &Value) -> Result<Value, (i64, String)> {
    let Some(receiver) = agg.receiver() else { return Ok(tool_error("the aggregator is still replaying its log")) };
    let source = args
        .get("metadata")
        .or_else(|| args.get("memories").and_then(|m| m.get(0)).and_then(|m| m.get("metadata")))
        .and_then(|m| m.get("source"))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or("mcp")
        .to_owned();
    let now = jiff::Timestamp::now().as_microsecond();
    let mapped =
        map_tool_call(tool, args, &source, &jiff::tz::TimeZone::UTC, now).map_err(|e| (-32602, e.to_string()))?;
    let stored =
        receiver.store(&source, mapped.records.clone()).await.map_err(|e| (-32000, format!("not stored: {e}")))?;
    let mut result = tool_result(tool, &mapped, stored);
    if let Some(map) = result.as_object_mut() {
        map.insert("system_id".into(), json!(source));
    }
    Ok(result)
}

fn str_arg<'a>(args: &'a Value, key: &str) -> Option<&'a str> {
    args.get(key).and_then(Value::as_str).filter(|s| !s.is_empty())
}

fn required<'a>(args: &'a Value, key: &str) -> Result<&'a str, QueryError> {
    str_arg(args, key).ok_or_else(|| QueryError::Invalid(format!("`{key}` is required")))
}

fn int_arg(args: &Value, key: &str, default: u64) -> Result<u64, QueryError> {
    match args.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_u64().ok_or_else(|| QueryError::Invalid(format!("`{key}` must be a non-negative integer"))),
    }
}

fn float_arg(args: &Value, key: &str, default: f64) -> Result<f64, QueryError> {
    match args.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_f64().ok_or_else(|| QueryError::Invalid(format!("`{key}` must be a number"))),
    }
}

fn systems(args: &Value) -> Vec<String> {
    str_arg(args, "system_id").map(|s| vec![s.to_owned()]).unwrap_or_default()
}

fn window(args: &Value, metric: &str, default_days: u64, resolution: Resolution) -> Result<SeriesQuery, QueryError> {
    let days = int_arg(args, "time_window_days", default_days)?.clamp(1, 3650) as i64;
    let now = jiff::Timestamp::now().as_microsecond();
    Ok(SeriesQuery {
        name: metric.to_owned(),
        systems: systems(args),
        since_us: Some(now - days * DAY_US),
        until_us: None,
        resolution,
    })
}

fn hits_json(hits: Vec<crate::query::Hit>) -> Value {
    let results: Vec<Value> = hits
        .into_iter()
        .map(|h| {
            let r = &h.record;
            json!({
                "system_id": r.get("system_id"),
                "kind": r.get("kind"),
                "id": r.get("id"),
                "content": r.get("text"),
                "project": r.get("project"),
                "timestamp": r.get("ts"),
                "score": h.score,
                "similarity": h.similarity,
                "snippet": h.snippet,
                "record": h.record,
            })
        })
        .collect();
    json!({"total_results": results.len(), "results": results})
}

fn run_query(
    service: &QueryService,
    tool: &str,
    args: &Value,
    ready: Option<(u64, u64, bool)>,
) -> Result<Value, QueryError> {
    let limit = || int_arg(args, "limit", 10).map(|l| l as usize);
    let filters = || Filters { system_ids: systems(args), ..Filters::default() };
    Ok(match tool {
        "search_all_systems" => {
            let query = required(args, "query")?;
            let threshold = float_arg(args, "threshold", 0.7)? as f32;
            let mut filters = filters();
            filters.min_similarity = Some(threshold.clamp(-1.0, 1.0));
            let embedding = service.query_vector(None, Some(query))?;
            let mut out = hits_json(service.vector(&embedding, limit()?, &filters)?);
            out["query"] = json!(query);
            out["threshold"] = json!(threshold);
            out
        }
        "search_text" => {
            let mut filters = filters();
            filters.project = str_arg(args, "project").map(str::to_owned);
            if let Some(kind) = str_arg(args, "kind") {
                filters.kinds = vec![kind.parse::<RecordKind>().map_err(|e| QueryError::Invalid(e.to_string()))?];
            }
            hits_json(service.text(required(args, "query")?, limit()?, &filters)?)
        }
        "search_hybrid" => {
            let query = required(args, "query")?;
            let embedding = service.query_vector(None, Some(query))?;
            hits_json(service.hybrid(query, &embedding, limit()?, &filters())?)
        }
        "get_memory" => {
            let kind = str_arg(args, "kind").unwrap_or("conversation");
            let kind = kind.parse::<RecordKind>().map_err(|e| QueryError::Invalid(e.to_string()))?;
            match service.get(required(args, "system_id")?, kind, required(args, "id")?)? {
                Some(mut record) => {
                    if let Some(map) = record.as_object_mut() {
                        map.remove("embedding");
                    }
                    json!({"found": true, "record": record})
                }
                None => json!({"found": false}),
            }
        }
        "generate_embedding" => {
            let text = required(args, "text")?;
            let embedding = service.embed(&[text])?.remove(0);
            json!({"embedding": embedding, "dimension": embedding.len(), "model": "all-MiniLM-L6-v2", "text_length": text.len()})
        }
        "generate_batch_embeddings" => {
            let texts: Vec<&str> = args
                .get("texts")
                .and_then(Value::as_array)
                .ok_or_else(|| QueryError::Invalid("`texts` must be a list of strings".into()))?
                .iter()
                .map(|t| t.as_str().ok_or_else(|| QueryError::Invalid("`texts` must be a list of strings".into())))
                .collect::<Result<_, _>>()?;
            if texts.len() > 1000 {
                return Err(QueryError::Invalid("at most 1000 texts per call".into()));
            }
            let embeddings = if texts.is_empty() { Vec::new() } else { service.embed(&texts)? };
            json!({"embeddings": embeddings, "count": embeddings.len(), "dimension": 384, "model": "all-MiniLM-L6-v2"})
        }
        "get_system_metrics" => {
            let days = int_arg(args, "time_range_days", 30)?.clamp(1, 3650) as i64;
            let since = jiff::Timestamp::now().as_microsecond() - days * DAY_US;
            let metrics = service.metric_summaries(&systems(args), Some(since))?;
            json!({"time_range_days": days, "metric_count": metrics.len(), "metrics": to_json(&metrics)})
        }
        "analyze_trends" => {
            let metric = required(args, "metric_name")?;
            let trends = service.trend(&window(args, metric, 7, Resolution::FiveMinutes)?)?;
            json!({"metric_name": metric, "trends": to_json(&trends)})
        }
        "detect_anomalies" => {
            let metric = required(args, "metric_name")?;
            let threshold = float_arg(args, "threshold_std", 3.0)?;
            let robust = args.get("robust").and_then(Value::as_bool).unwrap_or(false);
            let found = service.anomalies(&window(args, metric, 7, Resolution::Raw)?, threshold, robust, 1000)?;
            json!({"metric_name": metric, "threshold_std": threshold, "anomaly_count": found.len(), "anomalies": to_json(&found)})
        }
        "correlate_systems" => {
            let metric = required(args, "metric_name")?;
            let found = service.correlate(&window(args, metric, 7, Resolution::FiveMinutes)?, 0.0)?;
            json!({"metric_name": metric, "correlations": to_json(&found)})
        }
        "query_knowledge_graph" => {
            let entity = required(args, "entity_id")?;
            let depth = int_arg(args, "depth", 1)? as u32;
            let limit = int_arg(args, "limit", 50)?.clamp(1, 10_000) as usize;
            let mut found = service.neighbours(entity, &systems(args), str_arg(args, "edge_type"), depth)?;
            let truncated = found.truncated || found.nodes.len() > limit + found.start.len();
            found.nodes.truncate(limit + found.start.len());
            json!({
                "entity_id": entity,
                "found": !found.start.is_empty(),
                "neighbors": to_json(&found.nodes.iter().filter(|n| n.depth > 0).collect::<Vec<_>>()),
                "start": to_json(&found.start),
                "edges": to_json(&found.edges),
                "truncated": truncated,
            })
        }
        "find_path" => {
            let (from, to) = (required(args, "source_id")?, required(args, "target_id")?);
            let hops = int_arg(args, "max_hops", 3)? as u32;
            match service.path(from, to, &systems(args), hops)? {
                Some(path) => {
                    json!({"found": true, "path": to_json(&path.nodes), "edges": to_json(&path.edges), "hops": path.hops})
                }
                None => json!({"found": false, "max_hops": hops}),
            }
        }
        "get_graph_statistics" => to_json(&service.graph_stats(&systems(args))?),
        "health_check" => {
            let (records, index_lag, wal_failed) = ready.unwrap_or((0, 0, false));
            json!({
                "status": if wal_failed { "degraded" } else { "healthy" },
                "records_applied": records,
                "index_lag_records": index_lag,
                "embeddings": service.embed(&["ping"]).is_ok(),
                "version": env!("CARGO_PKG_VERSION"),
            })
        }
        other => return Err(QueryError::Invalid(format!("unknown tool `{other}`"))),
    })
}

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}
