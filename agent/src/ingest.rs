//! The local ingest API: NDJSON records over HTTP on loopback.
//!
//! `POST /v1/records` takes one JSON record per line (the DESIGN.md data model). A request is **all or
//! nothing**: every line is parsed and validated first, and if any line is bad the response is 400 with every bad
//! line's number and reason (up to 100) and nothing of the request is stored. Clients can then fix and resend the
//! whole request without working out which part went in; resending is safe anyway because storage deduplicates.
//! A 200 means every record is durable in the agent's buffer.
//!
//! Backpressure: when the buffer is full under `when_full: block`, the answer is 503 with `Retry-After`, and
//! nothing is stored.

use std::sync::Arc;

use akosha_protocol::{Record, RecordKind, Residency};
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use crate::Agent;
use crate::buffer::BufferError;

const MAX_REPORTED_ERRORS: usize = 100;

/// The HTTP router of the agent.
pub fn router(agent: Arc<Agent>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/records", post(post_records))
        .route("/v1/status", get(status))
        .route("/health", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/mcp", get(crate::mcp::status).post(crate::mcp::post))
        .route("/mcp/v1", get(crate::mcp::status).post(crate::mcp::post))
        .route("/mcp/mcp/v1", get(crate::mcp::status).post(crate::mcp::post))
        .route("/mcp/status", get(crate::mcp::status))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(agent)
}

async fn post_records(State(agent): State<Arc<Agent>>, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return crate::ingest::body_rejected(rejection),
    };
    let records = match parse_ndjson(&body, &agent.system_id) {
        Ok(records) => records,
        Err(errors) => {
            agent.counters.rejected_requests.inc();
            agent.counters.rejected_lines.add(errors.len() as u64);
            let shown: Vec<_> =
                errors.iter().take(MAX_REPORTED_ERRORS).map(|e| json!({"line": e.line, "error": e.message})).collect();
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_records",
                &format!("{} of the request's lines are invalid; nothing was stored", errors.len()),
                json!({"errors": shown, "invalid_lines": errors.len()}),
            );
        }
    };
    if records.is_empty() {
        return (StatusCode::OK, axum::Json(json!({"accepted": 0}))).into_response();
    }
    match agent.accept(&records).await {
        Ok(accepted) => {
            agent.counters.accepted_records.add(accepted);
            (StatusCode::OK, axum::Json(json!({"accepted": accepted}))).into_response()
        }
        Err(error @ BufferError::Full { .. }) => {
            agent.counters.full_rejections.inc();
            let mut response =
                error_response(StatusCode::SERVICE_UNAVAILABLE, "buffer_full", &error.to_string(), json!({}));
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
        Err(error @ BufferError::TooLarge { .. }) => {
            error_response(StatusCode::PAYLOAD_TOO_LARGE, "too_large", &error.to_string(), json!({}))
        }
        Err(error) => {
            tracing::error!(message = "Failed to store records in the buffer.", %error);
            error_response(StatusCode::INTERNAL_SERVER_ERROR, error.error_code(), &error.to_string(), json!({}))
        }
    }
}

async fn status(State(agent): State<Arc<Agent>>) -> Response {
    axum::Json(agent.status()).into_response()
}

async fn metrics(State(agent): State<Arc<Agent>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], agent.metrics_text()).into_response()
}

/// A body that could not be read (too large, broken connection), as the same JSON error as everything else.
pub(crate) fn body_rejected(rejection: BytesRejection) -> Response {
    let status = rejection.status();
    let code = if status == StatusCode::PAYLOAD_TOO_LARGE { "too_large" } else { "bad_body" };
    error_response(status, code, &rejection.body_text(), json!({}))
}

fn error_response(status: StatusCode, code: &str, message: &str, mut extra: serde_json::Value) -> Response {
    if let Some(map) = extra.as_object_mut() {
        map.insert("error".into(), json!(code));
        map.insert("message".into(), json!(message));
    }
    (status, axum::Json(extra)).into_response()
}

/// One bad line of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub message: String,
}

/// A record as clients write it in NDJSON.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IngestRecord {
    #[serde(default)]
    system_id: Option<String>,
    id: String,
    kind: String,
    #[serde(default)]
    ts: Option<serde_json::Value>,
    project: Option<String>,
    namespace: Option<String>,
    category: Option<String>,
    text: Option<String>,
    name: Option<String>,
    embedding: Option<Vec<f32>>,
    #[serde(default)]
    tags: Vec<String>,
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
    importance: Option<f64>,
    residency: Option<String>,
    from: Option<String>,
    to: Option<String>,
    relation_type: Option<String>,
    weight: Option<f64>,
    value: Option<f64>,
}

/// Parses and validates every line; all errors are returned, not only the first.
pub fn parse_ndjson(body: &[u8], system_id: &str) -> Result<Vec<Record>, Vec<LineError>> {
    let now = jiff::Timestamp::now().as_microsecond();
    let mut records = Vec::new();
    let mut errors = Vec::new();
    for (index, line) in body.split(|b| *b == b'\n').enumerate() {
        let line_no = index + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match parse_line(line, system_id, now) {
            Ok(record) => records.push(record),
            Err(message) => errors.push(LineError { line: line_no, message }),
        }
    }
    if errors.is_empty() { Ok(records) } else { Err(errors) }
}

/// Parses one NDJSON line into a validated record of `system_id`.
pub(crate) fn parse_line(line: &[u8], system_id: &str, now: i64) -> Result<Record, String> {
    let raw: IngestRecord = serde_json::from_slice(line).map_err(|e| {
        // serde_json reports "line 1 column N" for the single line it saw; keep the column only.
        let msg = e.to_string();
        match msg.rsplit_once(" at line 1 column ") {
            Some((what, column)) => format!("{what} (column {column})"),
            None => msg,
        }
    })?;
    if let Some(claimed) = &raw.system_id
        && claimed != system_id
    {
        return Err(format!("record claims system `{claimed}`, but this agent is `{system_id}`"));
    }
    let kind = raw.kind.parse::<RecordKind>().map_err(|e| e.to_string())?;
    let residency = raw.residency.as_deref().map(str::parse::<Residency>).transpose().map_err(|e| e.to_string())?;
    let ts = match raw.ts {
        None | Some(serde_json::Value::Null) => now,
        Some(value) => parse_ts(&value)?,
    };
    let record = Record {
        system_id: system_id.to_owned(),
        kind,
        id: raw.id,
        ts,
        project: raw.project,
        namespace: raw.namespace,
        category: raw.category,
        text: raw.text,
        name: raw.name,
        embedding: raw.embedding,
        tags: raw.tags,
        metadata: raw.metadata.map(|m| serde_json::Value::Object(m).to_string()),
        importance: raw.importance,
        residency,
        from: raw.from,
        to: raw.to,
        relation_type: raw.relation_type,
        weight: raw.weight,
        value: raw.value,
    };
    record.validate().map_err(|e| e.to_string())?;
    Ok(record)
}

/// `ts` is either an integer of microseconds since the epoch or an RFC 3339 timestamp with offset.
fn parse_ts(value: &serde_json::Value) -> Result<i64, String> {
    match value {
        serde_json::Value::Number(n) => {
            n.as_i64().ok_or_else(|| format!("field `ts` {n} is not an integer number of microseconds"))
        }
        serde_json::Value::String(s) => s
            .parse::<jiff::Timestamp>()
            .map(|t| t.as_microsecond())
            .map_err(|e| format!("field `ts` `{s}` is not an RFC 3339 timestamp with offset: {e}")),
        other => Err(format!("field `ts` must be microseconds or an RFC 3339 string, not {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_good_lines_and_reports_every_bad_one() {
        let body = concat!(
            r#"{"id":"a","kind":"conversation","text":"hi","ts":"2026-11-22T10:00:00Z","tags":["x"],"metadata":{"k":1}}"#,
            "\n\n",
            r#"{"id":"b","kind":"nope"}"#,
            "\n",
            r#"{"id":"c","kind":"metric","name":"cpu","value":0.5,"ts":1700000000000000}"#,
            "\r\n",
            r#"{"id":"d","kind":"reflection","embedding":[1,2]}"#,
            "\n",
            r#"{"id":"e","kind":"entity","colour":"red"}"#,
            "\n",
            r#"{"id":"f","kind":"entity","system_id":"other"}"#,
            "\n",
            "not json\n",
        );
        let errors = parse_ndjson(body.as_bytes(), "host-1").unwrap_err();
        let lines: Vec<usize> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![3, 5, 6, 7, 8]);
        assert!(errors[0].message.contains("unknown kind `nope`"));
        assert!(errors[1].message.contains("384"));
        assert!(errors[2].message.contains("unknown field `colour`"));
        assert!(errors[3].message.contains("claims system `other`"));
    }

    #[test]
    fn fills_system_id_and_converts_timestamps() {
        let body = br#"{"id":"a","kind":"conversation","ts":"2026-11-22T10:00:00+01:00"}"#;
        let records = parse_ndjson(body, "host-1").unwrap();
        assert_eq!(records[0].system_id, "host-1");
        assert_eq!(records[0].ts, "2026-11-22T09:00:00Z".parse::<jiff::Timestamp>().unwrap().as_microsecond());
        assert!(parse_ndjson(br#"{"id":"a","kind":"conversation","ts":"yesterday"}"#, "h").is_err());
        assert!(parse_ndjson(br#"{"id":"a","kind":"conversation","ts":1.5}"#, "h").is_err());
    }

    #[test]
    fn non_utf8_is_rejected_with_the_line() {
        let errors = parse_ndjson(b"{\"id\":\"\xff\",\"kind\":\"entity\"}", "h").unwrap_err();
        assert_eq!(errors[0].line, 1);
    }
}
