//! Session-Buddy's DuckDB databases as akosha records.
//!
//! Two readers need this: the agent, which reads private snapshots of the live files on a developer machine,
//! and the aggregator, which imports the copies Session-Buddy's cloud sync uploads to a bucket. Both must
//! produce the same records with the same dedup keys as Session-Buddy's HTTP push, so that ingesting the same
//! data by several paths converges instead of doubling: conversations and reflections by their id, entities
//! and relations by their uuid.
//!
//! Session-Buddy's layout has changed over time (`conversations` became `conversations_v2`, columns were
//! added), so columns are looked up by name in the catalog rather than assumed: a column that does not exist
//! reads as NULL, and only a missing `id` makes a table unreadable. `TIMESTAMP` columns hold the writer's
//! naive local wall-clock time and are converted to UTC with the zone the caller names.

pub mod push;

use std::path::Path;

use akosha_protocol::{EMBEDDING_DIM, Record, RecordKind};
use duckdb::types::Value;

/// The database files Session-Buddy keeps in its data directory.
pub const DATABASE_FILES: [&str; 2] = ["reflection.duckdb", "knowledge_graph.duckdb"];

/// Why a database could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// DuckDB failed (the file is not a database, or a query failed).
    #[error("table {table}: {source}")]
    Query {
        /// The table being read (or `catalog`).
        table: &'static str,
        /// DuckDB's error.
        #[source]
        source: duckdb::Error,
    },
    /// A column has a type the reader cannot convert.
    #[error("table {table} has a column of a type that cannot be read")]
    UnsupportedType {
        /// The table.
        table: &'static str,
    },
    /// A table exists but lacks a column no record can do without.
    #[error("table {table} has no `{column}` column, so its rows cannot be identified")]
    MissingColumn {
        /// The table.
        table: &'static str,
        /// The column.
        column: &'static str,
    },
}

/// Opens a database file read-only with one thread (these files are small, and readers share a machine).
pub fn open_read_only(path: &Path) -> Result<duckdb::Connection, duckdb::Error> {
    let config = duckdb::Config::default().access_mode(duckdb::AccessMode::ReadOnly)?.threads(1)?;
    duckdb::Connection::open_with_flags(path, config)
}

/// Reads every Session-Buddy table present in `conn` as records of `system_id`, ordered by kind and id.
pub fn read_database(
    conn: &duckdb::Connection,
    system_id: &str,
    zone: &jiff::tz::TimeZone,
) -> Result<Vec<Record>, ReadError> {
    let catalog = Catalog::load(conn)?;
    let reader = Reader { system_id, zone };
    let mut records = Vec::new();
    for table in &TABLES {
        let Some(name) = table.names.iter().find(|name| catalog.has_table(name)) else { continue };
        reader.read_table(conn, &catalog, table, name, &mut records)?;
    }
    Ok(records)
}

/// One logical column and the names it has had, newest first; every present one is coalesced.
struct Field {
    names: &'static [&'static str],
    kind: FieldKind,
}

#[derive(Clone, Copy)]
enum FieldKind {
    /// Read as DuckDB gives it.
    Plain,
    /// A naive `TIMESTAMP`, read as microseconds of the writer's wall clock.
    Timestamp,
    /// JSON or anything else, read as text.
    Text,
    /// A number, read as a double.
    Number,
}

struct Table {
    kind: RecordKind,
    /// Table names across layouts, preferred first.
    names: &'static [&'static str],
    fields: &'static [Field],
}

const fn field(names: &'static [&'static str], kind: FieldKind) -> Field {
    Field { names, kind }
}

// Field positions: every table starts with id, then its own fields in the order its mapping reads them.
const TABLES: [Table; 4] = [
    Table {
        kind: RecordKind::Conversation,
        names: &["conversations_v2", "conversations"],
        fields: &[
            field(&["id"], FieldKind::Text),
            field(&["content", "text"], FieldKind::Text),
            field(&["embedding"], FieldKind::Plain),
            field(&["category"], FieldKind::Text),
            field(&["importance_score", "importance"], FieldKind::Number),
            field(&["project"], FieldKind::Text),
            field(&["namespace"], FieldKind::Text),
            field(&["timestamp", "created_at"], FieldKind::Timestamp),
            field(&["metadata"], FieldKind::Text),
            field(&["tags"], FieldKind::Plain),
        ],
    },
    Table {
        kind: RecordKind::Reflection,
        names: &["reflections_v2", "reflections"],
        fields: &[
            field(&["id"], FieldKind::Text),
            field(&["content", "text"], FieldKind::Text),
            field(&["embedding"], FieldKind::Plain),
            field(&["category"], FieldKind::Text),
            field(&["importance_score", "importance"], FieldKind::Number),
            field(&["project"], FieldKind::Text),
            field(&["namespace"], FieldKind::Text),
            field(&["created_at", "timestamp"], FieldKind::Timestamp),
            field(&["metadata"], FieldKind::Text),
            field(&["tags"], FieldKind::Plain),
        ],
    },
    Table {
        kind: RecordKind::Entity,
        names: &["kg_entities"],
        fields: &[
            field(&["id"], FieldKind::Text),
            field(&["name"], FieldKind::Text),
            field(&["entity_type"], FieldKind::Text),
            field(&["observations"], FieldKind::Plain),
            field(&["properties"], FieldKind::Text),
            field(&["created_at"], FieldKind::Timestamp),
            field(&["metadata"], FieldKind::Text),
            field(&["embedding"], FieldKind::Plain),
        ],
    },
    Table {
        kind: RecordKind::Relation,
        names: &["kg_relationships"],
        fields: &[
            field(&["id"], FieldKind::Text),
            field(&["from_entity"], FieldKind::Text),
            field(&["to_entity"], FieldKind::Text),
            field(&["relation_type"], FieldKind::Text),
            field(&["properties"], FieldKind::Text),
            field(&["created_at"], FieldKind::Timestamp),
            field(&["metadata"], FieldKind::Text),
        ],
    },
];

/// Tables and their columns, from DuckDB's catalog.
struct Catalog {
    columns: Vec<(String, String)>,
}

impl Catalog {
    fn load(conn: &duckdb::Connection) -> Result<Self, ReadError> {
        let query = |source| ReadError::Query { table: "catalog", source };
        let mut stmt = conn
            .prepare("SELECT table_name, column_name FROM duckdb_columns() WHERE schema_name = 'main'")
            .map_err(query)?;
        let columns = stmt
            .query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?)))
            .map_err(query)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(query)?;
        Ok(Self { columns })
    }

    fn has_table(&self, table: &str) -> bool {
        self.columns.iter().any(|(t, _)| t == table)
    }

    fn has_column(&self, table: &str, column: &str) -> bool {
        self.columns.iter().any(|(t, c)| t == table && c == column)
    }
}

/// The SQL for one field of `table`: the present names, coalesced, or NULL when none exists.
fn select_expression(catalog: &Catalog, table: &str, field: &Field) -> String {
    let present: Vec<String> = field
        .names
        .iter()
        .filter(|name| catalog.has_column(table, name))
        .map(|name| {
            let column = format!("\"{name}\"");
            match field.kind {
                FieldKind::Plain => column,
                FieldKind::Timestamp => format!("epoch_us(CAST({column} AS TIMESTAMP))"),
                FieldKind::Text => format!("CAST({column} AS VARCHAR)"),
                FieldKind::Number => format!("TRY_CAST({column} AS DOUBLE)"),
            }
        })
        .collect();
    match present.len() {
        // A typed NULL: the duckdb crate cannot read a column of DuckDB's NULL type.
        0 => match field.kind {
            FieldKind::Timestamp => "CAST(NULL AS BIGINT)",
            FieldKind::Number => "CAST(NULL AS DOUBLE)",
            FieldKind::Plain | FieldKind::Text => "CAST(NULL AS VARCHAR)",
        }
        .to_owned(),
        1 => present.into_iter().next().unwrap_or_default(),
        _ => format!("coalesce({})", present.join(", ")),
    }
}

struct Reader<'a> {
    system_id: &'a str,
    zone: &'a jiff::tz::TimeZone,
}

impl Reader<'_> {
    fn read_table(
        &self,
        conn: &duckdb::Connection,
        catalog: &Catalog,
        table: &Table,
        name: &str,
        out: &mut Vec<Record>,
    ) -> Result<(), ReadError> {
        let table_name = table.names[0];
        if !catalog.has_column(name, "id") {
            return Err(ReadError::MissingColumn { table: table_name, column: "id" });
        }
        let select: Vec<String> = table.fields.iter().map(|f| select_expression(catalog, name, f)).collect();
        let sql = format!("SELECT {} FROM \"{name}\" WHERE id IS NOT NULL ORDER BY 1", select.join(", "));
        let query = |source| ReadError::Query { table: table_name, source };
        let mut stmt = conn.prepare(&sql).map_err(query)?;
        let mut rows = stmt.query([]).map_err(query)?;
        while let Some(row) = rows.next().map_err(query)? {
            // The duckdb crate panics on column types it cannot convert; a file from elsewhere must not take
            // the reader down with it.
            let values = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                (0..table.fields.len()).map(|i| row.get::<_, Value>(i)).collect::<Result<Vec<_>, _>>()
            }))
            .map_err(|_| ReadError::UnsupportedType { table: table_name })?
            .map_err(query)?;
            out.push(self.record(table.kind, values));
        }
        Ok(())
    }

    fn record(&self, kind: RecordKind, values: Vec<Value>) -> Record {
        let mut v = values.into_iter();
        let mut next = || v.next().unwrap_or(Value::Null);
        let id = text(next()).unwrap_or_default();
        let mut r = Record { system_id: self.system_id.to_owned(), kind, id, ..Record::default() };
        match kind {
            RecordKind::Conversation | RecordKind::Reflection => {
                r.text = text(next());
                r.embedding = embedding(next());
                r.category = text(next());
                r.importance = number(next());
                r.project = text(next());
                r.namespace = text(next());
                r.ts = self.utc(next());
                r.metadata = json_object(text(next()));
                r.tags = strings(next());
            }
            RecordKind::Entity => {
                r.name = text(next());
                r.category = text(next());
                let observations = strings(next());
                r.text = (!observations.is_empty()).then(|| observations.join("\n"));
                let properties = json_map(text(next()));
                r.ts = self.utc(next());
                let mut metadata = json_map(text(next()));
                metadata.insert("properties".into(), serde_json::Value::Object(properties));
                metadata.insert("observations".into(), serde_json::json!(observations));
                r.metadata = Some(serde_json::Value::Object(metadata).to_string());
                r.embedding = embedding(next());
            }
            RecordKind::Relation => {
                r.from = text(next());
                r.to = text(next());
                r.relation_type = text(next());
                let properties = json_map(text(next()));
                r.weight = properties.get("weight").and_then(serde_json::Value::as_f64);
                r.ts = self.utc(next());
                let mut metadata = json_map(text(next()));
                metadata.insert("properties".into(), serde_json::Value::Object(properties));
                r.metadata = Some(serde_json::Value::Object(metadata).to_string());
            }
            _ => {}
        }
        r
    }

    /// A naive local `TIMESTAMP` (microseconds "since the epoch" on the writer's wall clock) to UTC.
    fn utc(&self, value: Value) -> i64 {
        let Some(us) = integer(value) else { return jiff::Timestamp::now().as_microsecond() };
        naive_to_utc(us, self.zone)
    }
}

/// Converts microseconds of a naive wall-clock time in `zone` to microseconds since the Unix epoch (UTC).
/// Times that do not exist or are ambiguous in the zone (DST changes) resolve as jiff's "compatible" rule does.
pub fn naive_to_utc(naive_us: i64, zone: &jiff::tz::TimeZone) -> i64 {
    let Ok(ts) = jiff::Timestamp::from_microsecond(naive_us) else { return naive_us };
    let civil = ts.to_zoned(jiff::tz::TimeZone::UTC).datetime();
    civil.to_zoned(zone.clone()).map_or(naive_us, |z| z.timestamp().as_microsecond())
}

fn text(value: Value) -> Option<String> {
    match value {
        Value::Text(s) => Some(s),
        Value::Null => None,
        Value::BigInt(i) => Some(i.to_string()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn integer(value: Value) -> Option<i64> {
    match value {
        Value::BigInt(i) => Some(i),
        Value::Int(i) => Some(i64::from(i)),
        _ => None,
    }
}

fn number(value: Value) -> Option<f64> {
    match value {
        Value::Double(d) if d.is_finite() => Some(d),
        Value::Float(f) if f.is_finite() => Some(f64::from(f)),
        _ => None,
    }
}

/// An embedding of the expected dimension, floats kept bit-exact; anything else is no embedding.
fn embedding(value: Value) -> Option<Vec<f32>> {
    match value {
        Value::Array(values) | Value::List(values) if values.len() == EMBEDDING_DIM => values
            .into_iter()
            .map(|v| match v {
                Value::Float(f) => Some(f),
                Value::Double(d) => Some(d as f32),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

/// A list of strings; older layouts kept lists as JSON text.
fn strings(value: Value) -> Vec<String> {
    match value {
        Value::List(values) | Value::Array(values) => values.into_iter().filter_map(text).collect(),
        Value::Text(s) => match serde_json::from_str::<Vec<serde_json::Value>>(&s) {
            Ok(items) => items.into_iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
            Err(_) => Vec::new(),
        },
        _ => Vec::new(),
    }
}

fn json_map(text: Option<String>) -> serde_json::Map<String, serde_json::Value> {
    match text.as_deref().map(serde_json::from_str::<serde_json::Value>) {
        Some(Ok(serde_json::Value::Object(map))) => map,
        _ => serde_json::Map::new(),
    }
}

fn json_object(text: Option<String>) -> Option<String> {
    let map = json_map(text);
    (!map.is_empty()).then(|| serde_json::Value::Object(map).to_string())
}

/// `rel` under this crate's directory as the running test finds it. cargo and nextest set `CARGO_MANIFEST_DIR` in
/// every test process; the compile-time value is stale when a shared target dir reuses a build made in another
/// checkout of the repository (cargo does not rebuild a workspace member for a new absolute path).
#[cfg(test)]
pub(crate) fn crate_path(rel: &str) -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")), std::path::PathBuf::from)
        .join(rel)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::PathBuf;

    use super::*;

    fn fixture(name: &str) -> PathBuf {
        crate::crate_path("../../shared/fixtures/session-buddy/small").join(name)
    }

    fn counts(records: &[Record]) -> HashMap<&'static str, usize> {
        let mut by_kind = HashMap::new();
        for r in records {
            *by_kind.entry(r.kind.as_str()).or_insert(0) += 1;
        }
        by_kind
    }

    #[test]
    fn the_fixture_databases_read_completely() {
        let copy = tempfile::tempdir().unwrap();
        let mut records = Vec::new();
        for name in DATABASE_FILES {
            // Opening creates no WAL next to a read-only file, but the fixture stays untouched anyway.
            std::fs::copy(fixture(name), copy.path().join(name)).unwrap();
            let conn = open_read_only(&copy.path().join(name)).unwrap();
            records.extend(read_database(&conn, "edge-host-1", &jiff::tz::TimeZone::UTC).unwrap());
        }
        assert_eq!(
            counts(&records),
            [("conversation", 20), ("reflection", 8), ("entity", 19), ("relation", 20)].into_iter().collect()
        );
        for r in &records {
            r.validate().unwrap();
        }
        assert!(records.iter().filter(|r| r.kind == RecordKind::Conversation).all(|r| r.embedding.is_some()));
        assert!(records.iter().filter(|r| r.kind == RecordKind::Reflection).any(|r| !r.tags.is_empty()));
        assert!(records.iter().filter(|r| r.kind == RecordKind::Relation).all(|r| r.from.is_some() && r.to.is_some()));
    }

    #[test]
    fn the_migrated_layout_reads_the_same_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reflection.duckdb");
        let conn = duckdb::Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE conversations (id VARCHAR, content TEXT, embedding FLOAT[384], project VARCHAR, \
                 timestamp TIMESTAMP, metadata JSON);
             CREATE TABLE reflections (id VARCHAR PRIMARY KEY, content TEXT, embedding FLOAT[384], tags VARCHAR[], \
                 timestamp TIMESTAMP);
             INSERT INTO conversations VALUES ('c1', 'old layout', list_transform(range(384), lambda x: 0.5)::FLOAT[384], \
                 'proj', TIMESTAMP '2026-01-02 03:04:05', '{\"k\": 1}');
             INSERT INTO conversations VALUES (NULL, 'no id: skipped', NULL, NULL, NULL, NULL);
             INSERT INTO reflections VALUES ('r1', 'a lesson', NULL, ['a', 'b'], TIMESTAMP '2026-01-02 03:04:05');",
        )
        .unwrap();
        let zone = jiff::tz::TimeZone::get("Europe/Berlin").unwrap();
        let records = read_database(&conn, "h", &zone).unwrap();
        assert_eq!(records.len(), 2);
        let c = &records[0];
        assert_eq!((c.kind, c.id.as_str(), c.text.as_deref()), (RecordKind::Conversation, "c1", Some("old layout")));
        assert_eq!(c.project.as_deref(), Some("proj"));
        assert_eq!(c.metadata.as_deref(), Some(r#"{"k":1}"#));
        assert_eq!(c.embedding.as_ref().map(Vec::len), Some(EMBEDDING_DIM));
        // 03:04:05 in Berlin in winter is 02:04:05 UTC.
        assert_eq!(c.ts, "2026-01-02T02:04:05Z".parse::<jiff::Timestamp>().unwrap().as_microsecond());
        let r = &records[1];
        assert_eq!((r.kind, r.tags.clone()), (RecordKind::Reflection, vec!["a".to_owned(), "b".to_owned()]));
    }

    #[test]
    fn a_table_without_ids_is_a_named_error_and_unknown_tables_are_ignored() {
        let conn = duckdb::Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE something_else (x INT); CREATE TABLE kg_entities (name VARCHAR);").unwrap();
        let err = read_database(&conn, "h", &jiff::tz::TimeZone::UTC).unwrap_err();
        assert_eq!(err.to_string(), "table kg_entities has no `id` column, so its rows cannot be identified");
    }
}
