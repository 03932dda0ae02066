//! JSON-RPC / MCP endpoint for Session-Buddy's push (`/mcp`, `/mcp/v1`, `/mcp/mcp/v1`) and its status probe.
//!
//! Handles `initialize`, `ping`, `tools/list`, `tools/call` and notifications, single or batched. A tool call is
//! answered only once its records are durable in the buffer. Errors are JSON-RPC errors naming the problem:
//! `-32700` unparsable body (including non-UTF-8), `-32600` not a JSON-RPC request, `-32601` unknown method,
//! `-32602` unknown tool or invalid arguments, `-32000` buffer full (HTTP 503 with `Retry-After`, so the
//! client's retry finds room later).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::Agent;
use crate::buffer::BufferError;
use crate::sources::session_buddy_push::{TOOLS, ToolError, map_tool_call, tool_result};

const PROTOCOL_VERSION: &str = "2025-06-18";

/// `GET /mcp/status` (and `/mcp`, `/mcp/v1`): Session-Buddy's reachability probe.
pub async fn status(State(agent): State<Arc<Agent>>) -> Response {
    axum::Json(json!({"status": "ok", "service": "akosha-agent", "version": env!("CARGO_PKG_VERSION"), "system_id": agent.system_id}))
        .into_response()
}

/// `POST` of a JSON-RPC request or batch.
pub async fn post(State(agent): State<Arc<Agent>>, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return crate::ingest::body_rejected(rejection),
    };
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return reply(StatusCode::OK, rpc_error(&Value::Null, -32700, &format!("parse error: {e}"))),
    };
    match request {
        Value::Array(items) if !items.is_empty() => {
            let mut answers = Vec::new();
            let mut busy = false;
            for item in &items {
                if let Some((answer, full)) = handle(&agent, item).await {
                    busy |= full;
                    answers.push(answer);
                }
            }
            if answers.is_empty() {
                return StatusCode::ACCEPTED.into_response();
            }
            reply(if busy { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK }, Value::Array(answers))
        }
        single => match handle(&agent, &single).await {
            None => StatusCode::ACCEPTED.into_response(),
            Some((answer, full)) => reply(if full { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK }, answer),
        },
    }
}

fn reply(status: StatusCode, body: Value) -> Response {
    let mut response = (status, axum::Json(body)).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// Answers one request; `None` for notifications. The flag says the buffer was full.
async fn handle(agent: &Agent, request: &Value) -> Option<(Value, bool)> {
    let Some(obj) = request.as_object() else {
        return Some((rpc_error(&Value::Null, -32600, "invalid request: expected a JSON-RPC object"), false));
    };
    let id = obj.get("id").cloned();
    let method = obj.get("method").and_then(Value::as_str);
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") || method.is_none() {
        let id = id.unwrap_or(Value::Null);
        return Some((
            rpc_error(&id, -32600, "invalid request: `jsonrpc` must be \"2.0\" and `method` a string"),
            false,
        ));
    }
    let method = method.unwrap_or_default();
    let Some(id) = id else {
        // Notifications (`notifications/initialized`, …) get no answer.
        return None;
    };
    let params = obj.get("params").cloned().unwrap_or(Value::Null);
    let outcome = match method {
        "initialize" => Ok(json!({
            "protocolVersion": params.get("protocolVersion").and_then(Value::as_str).unwrap_or(PROTOCOL_VERSION),
            "capabilities": {"tools": {"listChanged": false}},
            "serverInfo": {"name": "akosha-agent", "version": env!("CARGO_PKG_VERSION")},
        })),
        "ping" => Ok(json!({})),
        "tools/list" => Ok(json!({"tools": TOOLS.iter().map(|(name, description)| json!({
            "name": name,
            "description": description,
            "inputSchema": {"type": "object"},
        })).collect::<Vec<_>>()})),
        "tools/call" => call_tool(agent, &params).await,
        other => Err((-32601, format!("method `{other}` not found"), false)),
    };
    Some(match outcome {
        Ok(result) => (json!({"jsonrpc": "2.0", "id": id, "result": result}), false),
        Err((code, message, full)) => (rpc_error(&id, code, &message), full),
    })
}

async fn call_tool(agent: &Agent, params: &Value) -> Result<Value, (i64, String, bool)> {
    let Some(tool) = params.get("name").and_then(Value::as_str) else {
        return Err((-32602, "tools/call needs `params.name`".into(), false));
    };
    let arguments = params.get("arguments").cloned().unwrap_or_else(|| json!({}));
    let now = jiff::Timestamp::now().as_microsecond();
    let mapped = map_tool_call(tool, &arguments, &agent.system_id, &agent.zone, now).map_err(|e| match e {
        ToolError::UnknownTool(_) | ToolError::InvalidArguments { .. } => (-32602, e.to_string(), false),
    })?;
    let stored = if mapped.records.is_empty() {
        0
    } else {
        match agent.accept(&mapped.records).await {
            Ok(n) => n as usize,
            Err(e @ BufferError::Full { .. }) => return Err((-32000, e.to_string(), true)),
            Err(e) => return Err((-32603, e.to_string(), false)),
        }
    };
    agent.counters.accepted_records.add(stored as u64);
    Ok(tool_result(tool, &mapped, stored))
}

fn rpc_error(id: &Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}
