//! Session-Buddy's own HTTP push, mapped to records.
//!
//! Session-Buddy's `sync_to_akosha` posts JSON-RPC `tools/call` requests to `http://localhost:8682/mcp/mcp/v1`
//! (no MCP `initialize`, no session) and reads plain keys from `result`: `status`/`stored`/`errors` for
//! `batch_store_memories`, `status == "stored"` for `store_reflection`, a truthy `id` for the graph tools. Every
//! reply here carries those keys *and* is a valid MCP `CallToolResult` (`content`, `isError`), so a proper MCP
//! client (`initialize` → `tools/list` → `tools/call`) works too.
//!
//! Mapping (see `../shared/fixtures/session-buddy/README.md`):
//!
//! | tool | kind | id | notes |
//! |---|---|---|---|
//! | `batch_store_memories` | `metadata.type` or conversation | `memory_id` | one record per memory |
//! | `store_memory` | `metadata.type` or conversation | `memory_id` / `id` / content hash | |
//! | `store_reflection` | reflection | `reflection_id` | |
//! | `create_entity` | entity | `properties.original_id`, else the name | `name` and `original_id` both kept |
//! | `create_relation` | relation | `properties.original_id`, else a hash of from/type/to | `from`/`to` are entity ids |
//!
//! `metadata.created_at` is the writer's naive local time; it is converted to UTC with the configured zone.
//! Items of one `batch_store_memories` call are independent: valid ones are stored, invalid ones are listed in
//! `errors` with their id and reason, and `status` is `completed`, `partial` or `failed`.

use akosha_protocol::{Record, RecordKind};
use serde_json::{Map, Value, json};

/// Why a tool call cannot be mapped to records.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToolError {
    /// The tool name is not one this agent serves.
    #[error(
        "unknown tool `{0}` (expected batch_store_memories, store_memory, store_reflection, create_entity or create_relation)"
    )]
    UnknownTool(String),
    /// An argument is missing or has the wrong type.
    #[error("tool `{tool}`: {message}")]
    InvalidArguments {
        /// The tool.
        tool: String,
        /// What is wrong, naming the argument.
        message: String,
    },
}

/// One item of a batch that could not be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemError {
    /// The item's id, if it had one.
    pub id: Option<String>,
    /// Why.
    pub message: String,
}

/// What a tool call maps to: records to store and items rejected on their own.
#[derive(Debug, Default)]
pub struct Mapped {
    /// Valid records.
    pub records: Vec<Record>,
    /// Invalid items (batch tools only; a single-item tool fails as a whole instead).
    pub rejected: Vec<ItemError>,
}

/// The names and descriptions served by `tools/list`.
pub const TOOLS: &[(&str, &str)] = &[
    ("batch_store_memories", "Store up to 100 memories: {memories: [{memory_id, text, embedding?, metadata?}]}"),
    ("store_memory", "Store one memory: {memory_id?, text|content, embedding?, metadata?}"),
    ("store_reflection", "Store one reflection: {reflection_id, content, embedding?, metadata?}"),
    ("create_entity", "Store a knowledge-graph entity: {name, entity_type, observations?, properties?, metadata?}"),
    (
        "create_relation",
        "Store a knowledge-graph relation: {from_entity, to_entity, relation_type, properties?, metadata?}",
    ),
];

/// Maps a `tools/call` to records for `system_id`, converting naive timestamps with `zone`.
pub fn map_tool_call(
    tool: &str,
    arguments: &Value,
    system_id: &str,
    zone: &jiff::tz::TimeZone,
    now_us: i64,
) -> Result<Mapped, ToolError> {
    let invalid = |message: String| ToolError::InvalidArguments { tool: tool.to_owned(), message };
    let args = arguments.as_object().ok_or_else(|| invalid("arguments must be an object".into()))?;
    let ctx = Context { system_id, zone, now_us };
    match tool {
        "batch_store_memories" => {
            let memories = args
                .get("memories")
                .and_then(Value::as_array)
                .ok_or_else(|| invalid("`memories` must be an array".into()))?;
            let mut mapped = Mapped::default();
            for (index, memory) in memories.iter().enumerate() {
                let id = memory.get("memory_id").and_then(Value::as_str).map(str::to_owned);
                match ctx.memory(memory).and_then(validated) {
                    Ok(record) => mapped.records.push(record),
                    Err(message) => {
                        mapped.rejected.push(ItemError { id, message: format!("memories[{index}]: {message}") })
                    }
                }
            }
            Ok(mapped)
        }
        "store_memory" => single(ctx.memory(arguments), &invalid),
        "store_reflection" => single(ctx.reflection(args), &invalid),
        "create_entity" => single(ctx.entity(args), &invalid),
        "create_relation" => single(ctx.relation(args), &invalid),
        other => Err(ToolError::UnknownTool(other.to_owned())),
    }
}

/// The `result` for a tool call: the plain keys Session-Buddy reads plus an MCP `CallToolResult`.
pub fn tool_result(tool: &str, mapped: &Mapped, stored: usize) -> Value {
    let errors: Vec<Value> = mapped.rejected.iter().map(|e| json!({"id": e.id, "error": e.message})).collect();
    let first_id = mapped.records.first().map(|r| r.id.clone());
    let (status, text, is_error) = match tool {
        "batch_store_memories" => {
            let status = match (stored, errors.len()) {
                (_, 0) => "completed",
                (0, _) => "failed",
                _ => "partial",
            };
            (status, format!("stored {stored} memories, {} rejected", errors.len()), stored == 0 && !errors.is_empty())
        }
        "store_reflection" | "store_memory" => {
            ("stored", format!("stored {}", first_id.as_deref().unwrap_or("")), false)
        }
        _ => ("created", format!("stored {}", first_id.as_deref().unwrap_or("")), false),
    };
    let mut result = json!({
        "content": [{"type": "text", "text": text}],
        "isError": is_error,
        "status": status,
        "stored": stored,
        "errors": errors,
    });
    if let Some(id) = first_id.filter(|_| tool != "batch_store_memories") {
        result["id"] = json!(id);
    }
    result
}

fn single(record: Result<Record, String>, invalid: &dyn Fn(String) -> ToolError) -> Result<Mapped, ToolError> {
    let record = record.and_then(validated).map_err(invalid)?;
    Ok(Mapped { records: vec![record], rejected: Vec::new() })
}

fn validated(record: Record) -> Result<Record, String> {
    record.validate().map_err(|e| e.to_string())?;
    Ok(record)
}

struct Context<'a> {
    system_id: &'a str,
    zone: &'a jiff::tz::TimeZone,
    now_us: i64,
}

impl Context<'_> {
    fn base(&self, kind: RecordKind, id: String, metadata: &Map<String, Value>) -> Result<Record, String> {
        let ts = match metadata.get("created_at") {
            Some(Value::String(s)) => self.naive_to_utc(s)?,
            _ => self.now_us,
        };
        Ok(Record {
            system_id: self.system_id.to_owned(),
            kind,
            id,
            ts,
            project: str_field(metadata, "project"),
            namespace: str_field(metadata, "namespace"),
            category: str_field(metadata, "category"),
            importance: metadata.get("importance_score").and_then(Value::as_f64),
            tags: metadata
                .get("tags")
                .and_then(Value::as_array)
                .map(|tags| tags.iter().filter_map(|t| t.as_str().map(str::to_owned)).collect())
                .unwrap_or_default(),
            metadata: Some(Value::Object(metadata.clone()).to_string()),
            ..Record::default()
        })
    }

    /// Session-Buddy writes naive local wall-clock time; an explicit offset, if present, wins.
    fn naive_to_utc(&self, text: &str) -> Result<i64, String> {
        if let Ok(ts) = text.parse::<jiff::Timestamp>() {
            return Ok(ts.as_microsecond());
        }
        let civil: jiff::civil::DateTime =
            text.parse().map_err(|e| format!("`metadata.created_at` `{text}` is not a timestamp: {e}"))?;
        let zoned = civil.to_zoned(self.zone.clone()).map_err(|e| format!("`metadata.created_at` `{text}`: {e}"))?;
        Ok(zoned.timestamp().as_microsecond())
    }

    fn memory(&self, memory: &Value) -> Result<Record, String> {
        let obj = memory.as_object().ok_or("a memory must be an object")?;
        let metadata = metadata_of(obj)?;
        let text = obj
            .get("text")
            .or_else(|| obj.get("content"))
            .and_then(Value::as_str)
            .ok_or("`text` is required and must be a string")?;
        let id = ["memory_id", "id"]
            .iter()
            .find_map(|k| obj.get(*k).and_then(Value::as_str))
            .map(str::to_owned)
            .unwrap_or_else(|| content_id(&[text]));
        let kind = match metadata.get("type").and_then(Value::as_str) {
            Some("reflection") => RecordKind::Reflection,
            _ => RecordKind::Conversation,
        };
        let mut record = self.base(kind, id, &metadata)?;
        record.text = Some(text.to_owned());
        record.embedding = embedding(obj)?;
        Ok(record)
    }

    fn reflection(&self, args: &Map<String, Value>) -> Result<Record, String> {
        let metadata = metadata_of(args)?;
        let content =
            args.get("content").and_then(Value::as_str).ok_or("`content` is required and must be a string")?;
        let id = args
            .get("reflection_id")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| content_id(&[content]));
        let mut record = self.base(RecordKind::Reflection, id, &metadata)?;
        record.text = Some(content.to_owned());
        record.embedding = embedding(args)?;
        Ok(record)
    }

    fn entity(&self, args: &Map<String, Value>) -> Result<Record, String> {
        let name = args.get("name").and_then(Value::as_str).ok_or("`name` is required and must be a string")?;
        let properties = object_field(args, "properties")?;
        let mut metadata = metadata_of(args)?;
        let id = str_field(&properties, "original_id").unwrap_or_else(|| name.to_owned());
        let observations: Vec<&str> = args
            .get("observations")
            .and_then(Value::as_array)
            .map(|o| o.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if let Some(created) = properties.get("created_at") {
            metadata.entry("created_at").or_insert_with(|| created.clone());
        }
        metadata.insert("properties".into(), Value::Object(properties));
        metadata.insert("observations".into(), json!(observations));
        let mut record = self.base(RecordKind::Entity, id, &metadata)?;
        record.name = Some(name.to_owned());
        record.category = args.get("entity_type").and_then(Value::as_str).map(str::to_owned).or(record.category);
        record.text = (!observations.is_empty()).then(|| observations.join("\n"));
        Ok(record)
    }

    fn relation(&self, args: &Map<String, Value>) -> Result<Record, String> {
        let field = |k: &str| {
            args.get(k)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or(format!("`{k}` is required and must be a string"))
        };
        let (from, to, relation_type) = (field("from_entity")?, field("to_entity")?, field("relation_type")?);
        let properties = object_field(args, "properties")?;
        let mut metadata = metadata_of(args)?;
        let id = str_field(&properties, "original_id").unwrap_or_else(|| content_id(&[&from, &relation_type, &to]));
        if let Some(created) = properties.get("created_at") {
            metadata.entry("created_at").or_insert_with(|| created.clone());
        }
        let weight = properties.get("weight").and_then(Value::as_f64);
        metadata.insert("properties".into(), Value::Object(properties));
        let mut record = self.base(RecordKind::Relation, id, &metadata)?;
        record.from = Some(from);
        record.to = Some(to);
        record.relation_type = Some(relation_type);
        record.weight = weight;
        Ok(record)
    }
}

fn metadata_of(obj: &Map<String, Value>) -> Result<Map<String, Value>, String> {
    object_field(obj, "metadata")
}

fn object_field(obj: &Map<String, Value>, key: &str) -> Result<Map<String, Value>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(m)) => Ok(m.clone()),
        Some(_) => Err(format!("`{key}` must be an object")),
    }
}

fn str_field(obj: &Map<String, Value>, key: &str) -> Option<String> {
    obj.get(key).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned)
}

fn embedding(obj: &Map<String, Value>) -> Result<Option<Vec<f32>>, String> {
    match obj.get("embedding") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(values)) => values
            .iter()
            .map(|v| v.as_f64().map(|f| f as f32).ok_or_else(|| "`embedding` must hold only numbers".to_owned()))
            .collect::<Result<Vec<f32>, String>>()
            .map(Some),
        Some(_) => Err("`embedding` must be an array of numbers or null".into()),
    }
}

/// A stable id for content without one (FNV-1a 64, hex): the same content always maps to the same record.
fn content_id(parts: &[&str]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes().chain([0u8]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_calls() -> Vec<(String, Value)> {
        let path = crate::crate_path("../../shared/fixtures/session-buddy/http_push_20.jsonl");
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .filter_map(|line| {
                let request: Value = serde_json::from_str(line).unwrap();
                let params = request["body"]["params"].clone();
                params["name"].as_str().map(|n| (n.to_owned(), params["arguments"].clone()))
            })
            .collect()
    }

    #[test]
    fn the_fixture_maps_to_the_expected_records() {
        let zone = jiff::tz::TimeZone::UTC;
        let mut by_kind = std::collections::BTreeMap::new();
        for (tool, args) in fixture_calls() {
            let mapped = map_tool_call(&tool, &args, "edge-host-1", &zone, 0).unwrap();
            assert!(mapped.rejected.is_empty(), "{tool}: {:?}", mapped.rejected);
            for r in mapped.records {
                *by_kind.entry(r.kind.as_str()).or_insert(0) += 1;
                if r.kind == RecordKind::Conversation {
                    assert_eq!(r.embedding.as_ref().map(Vec::len), Some(384));
                    assert!(r.project.is_some() && r.category.is_some());
                }
                if r.kind == RecordKind::Entity {
                    assert!(r.name.is_some());
                    assert!(r.metadata.as_ref().unwrap().contains("original_id"));
                }
            }
        }
        assert_eq!(
            by_kind,
            [("conversation", 20), ("entity", 19), ("reflection", 8), ("relation", 20)].into_iter().collect()
        );
    }

    #[test]
    fn floats_are_bit_exact_and_time_is_converted() {
        let (_, args) = fixture_calls().into_iter().find(|(t, _)| t == "batch_store_memories").unwrap();
        let zone = jiff::tz::TimeZone::get("Europe/Berlin").unwrap();
        let mapped = map_tool_call("batch_store_memories", &args, "edge-host-1", &zone, 0).unwrap();
        let first = &mapped.records[0];
        let sent = args["memories"][0]["embedding"][0].as_f64().unwrap();
        assert_eq!(first.embedding.as_ref().unwrap()[0].to_bits(), (sent as f32).to_bits());
        // 2026-11-22T09:45:49.091519 in Berlin (UTC+1) is 08:45:49.091519Z.
        assert_eq!(first.ts, "2026-11-22T08:45:49.091519Z".parse::<jiff::Timestamp>().unwrap().as_microsecond());
    }

    #[test]
    fn bad_items_are_rejected_one_by_one() {
        let args = json!({"memories": [
            {"memory_id": "a", "text": "ok"},
            {"memory_id": "b", "text": "short vector", "embedding": [0.1, 0.2]},
            {"memory_id": "c"},
        ]});
        let mapped = map_tool_call("batch_store_memories", &args, "h", &jiff::tz::TimeZone::UTC, 5).unwrap();
        assert_eq!(mapped.records.len(), 1);
        assert_eq!(mapped.records[0].ts, 5);
        assert_eq!(mapped.rejected.len(), 2);
        assert!(mapped.rejected[0].message.contains("384"));
        let result = tool_result("batch_store_memories", &mapped, 1);
        assert_eq!(result["status"], "partial");
        assert_eq!(result["stored"], 1);
        assert!(matches!(
            map_tool_call("forget_everything", &json!({}), "h", &jiff::tz::TimeZone::UTC, 0),
            Err(ToolError::UnknownTool(_))
        ));
        assert!(
            map_tool_call("store_reflection", &json!({"reflection_id": "x"}), "h", &jiff::tz::TimeZone::UTC, 0)
                .is_err()
        );
    }
}
