//! Listing records with filters and a keyset cursor, and per-project statistics.
//!
//! Pages are ordered newest first by `(ts, system_id, id)`; the cursor is the last row's key, so paging is
//! stable under concurrent inserts (a new record never shifts a page) and costs the same on page 1,000 as on
//! page 1.

use akosha_protocol::RecordKind;
use duckdb::{Connection, ToSql};
use serde::Serialize;

use crate::graph::{system_clause, time_clause};
use crate::hot::{HotError, RECORD_COLUMNS, row_json};

/// Most records one page may hold.
pub const MAX_PAGE: usize = 1000;

/// What to list.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Kind of record.
    pub kind: RecordKind,
    /// Systems (all when empty).
    pub systems: Vec<String>,
    /// Project.
    pub project: Option<String>,
    /// Category.
    pub category: Option<String>,
    /// From (inclusive), microseconds since the epoch.
    pub since_us: Option<i64>,
    /// Until (exclusive), microseconds since the epoch.
    pub until_us: Option<i64>,
    /// Page size.
    pub limit: usize,
    /// Where the previous page ended.
    pub cursor: Option<Cursor>,
    /// Include embeddings in the rows.
    pub with_embeddings: bool,
}

/// The key of the last row of a page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    ts: i64,
    system_id: String,
    id: String,
}

impl Cursor {
    /// The opaque text form handed to clients.
    pub fn encode(&self) -> String {
        format!("{}.{}.{}", self.ts, hex(self.system_id.as_bytes()), hex(self.id.as_bytes()))
    }

    /// Parses [`Cursor::encode`]'s output.
    pub fn decode(text: &str) -> Result<Cursor, String> {
        let bad = || format!("`cursor` `{text}` is not a cursor this API returned");
        let mut parts = text.splitn(3, '.');
        let ts = parts.next().and_then(|t| t.parse().ok()).ok_or_else(bad)?;
        let system_id = parts.next().and_then(unhex).ok_or_else(bad)?;
        let id = parts.next().and_then(unhex).ok_or_else(bad)?;
        Ok(Cursor { ts, system_id, id })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<String> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> =
        (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect();
    String::from_utf8(bytes?).ok()
}

/// A page of records.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    /// Records, newest first.
    pub records: Vec<serde_json::Value>,
    /// Pass as `cursor` for the next page; absent on the last one.
    pub next_cursor: Option<String>,
}

/// One page of `q`.
pub fn list(conn: &Connection, q: &ListQuery) -> Result<Page, HotError> {
    let limit = q.limit.clamp(1, MAX_PAGE);
    let mut params: Vec<&dyn ToSql> = Vec::new();
    let mut sql = format!("SELECT {RECORD_COLUMNS}, tier FROM all_{} WHERE TRUE", q.kind.as_str());
    sql.push_str(&system_clause("system_id", &q.systems, &mut params));
    if let Some(project) = &q.project {
        sql.push_str(" AND project = ?");
        params.push(project);
    }
    if let Some(category) = &q.category {
        sql.push_str(" AND category = ?");
        params.push(category);
    }
    sql.push_str(&time_clause(&q.since_us, &q.until_us, &mut params));
    if let Some(c) = &q.cursor {
        // Descending order: the next page holds rows strictly before the cursor's key.
        sql.push_str(" AND (epoch_us(ts) < ? OR (epoch_us(ts) = ? AND (system_id < ? OR (system_id = ? AND id < ?))))");
        params.extend([&c.ts as &dyn ToSql, &c.ts, &c.system_id, &c.system_id, &c.id]);
    }
    let fetch = (limit + 1) as i64;
    sql.push_str(" ORDER BY ts DESC, system_id DESC, id DESC LIMIT ?");
    params.push(&fetch);
    let mut stmt = conn.prepare(&sql)?;
    let mut rows = stmt.query(params.as_slice())?;
    let mut records = Vec::new();
    let mut keys = Vec::new();
    while let Some(row) = rows.next()? {
        keys.push(Cursor { ts: row.get(2)?, system_id: row.get(0)?, id: row.get(1)? });
        let mut record = row_json(row, q.kind)?;
        if !q.with_embeddings
            && let Some(map) = record.as_object_mut()
        {
            map.remove("embedding");
        }
        records.push(record);
    }
    let next_cursor = if records.len() > limit {
        records.truncate(limit);
        keys.get(limit - 1).map(Cursor::encode)
    } else {
        None
    };
    Ok(Page { records, next_cursor })
}

/// Records of one kind in one project of one system.
#[derive(Debug, Clone, Serialize)]
pub struct ProjectCount {
    /// System id.
    pub system_id: String,
    /// Project (`null` for records without one).
    pub project: Option<String>,
    /// Kind.
    pub kind: &'static str,
    /// Records.
    pub records: u64,
    /// Oldest record, microseconds since the epoch.
    pub first_ts: i64,
    /// Newest record, microseconds since the epoch.
    pub last_ts: i64,
}

/// Records per system, project and kind.
pub fn project_counts(conn: &Connection, systems: &[String]) -> Result<Vec<ProjectCount>, HotError> {
    let mut out = Vec::new();
    for kind in RecordKind::ALL {
        let mut params: Vec<&dyn ToSql> = Vec::new();
        let clause = system_clause("system_id", systems, &mut params);
        let sql = format!(
            "SELECT system_id, project, count(*), epoch_us(min(ts)), epoch_us(max(ts)) FROM all_{} WHERE TRUE{clause} \
             GROUP BY 1, 2 ORDER BY 1, 2 NULLS LAST",
            kind.as_str()
        );
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(params.as_slice(), |row| {
            Ok(ProjectCount {
                system_id: row.get(0)?,
                project: row.get(1)?,
                kind: kind.as_str(),
                records: row.get::<_, i64>(2)? as u64,
                first_ts: row.get(3)?,
                last_ts: row.get(4)?,
            })
        })?;
        for row in rows {
            out.push(row?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let c = Cursor { ts: 1_700_000_000_000_000, system_id: "edge.host-1".into(), id: "a.b.c/ü".into() };
        assert_eq!(Cursor::decode(&c.encode()).unwrap(), c);
        for bad in ["", "x", "1.zz.00", "1.0", "1.616.6"] {
            assert!(Cursor::decode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pages_walk_every_record_once_newest_first() {
        use akosha_protocol::Record;
        let hot = crate::hot::HotTier::open("256MB", 1, None).unwrap();
        // Equal timestamps across systems exercise the tie-breaks of the cursor.
        let records: Vec<Record> = (0..57)
            .map(|i| Record {
                system_id: format!("s{}", i % 3),
                kind: RecordKind::Reflection,
                id: format!("r{i:02}"),
                ts: 1_000_000 * (i / 4),
                project: Some(if i % 2 == 0 { "even" } else { "odd" }.into()),
                text: Some(format!("text {i}")),
                ..Record::default()
            })
            .collect();
        hot.insert(&records).unwrap();
        let mut q = ListQuery { kind: RecordKind::Reflection, limit: 10, ..ListQuery::default() };
        let mut seen = Vec::new();
        let mut last_ts = i64::MAX;
        loop {
            let page = hot.read(|c| list(c, &q)).unwrap();
            for r in &page.records {
                let ts = r["ts"].as_i64().unwrap();
                assert!(ts <= last_ts, "newest first");
                last_ts = ts;
                assert!(r.get("embedding").is_none());
                seen.push(r["id"].as_str().unwrap().to_owned());
            }
            match page.next_cursor {
                Some(c) => q.cursor = Some(Cursor::decode(&c).unwrap()),
                None => break,
            }
        }
        let mut sorted = seen.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!((seen.len(), sorted.len()), (57, 57));
        let q = ListQuery {
            kind: RecordKind::Reflection,
            systems: vec!["s1".into()],
            project: Some("odd".into()),
            since_us: Some(4_000_000),
            limit: 100,
            ..ListQuery::default()
        };
        let page = hot.read(|c| list(c, &q)).unwrap();
        assert!(page.next_cursor.is_none());
        for r in &page.records {
            assert_eq!((r["system_id"].as_str(), r["project"].as_str()), (Some("s1"), Some("odd")));
            assert!(r["ts"].as_i64().unwrap() >= 4_000_000);
        }
        let expected = records
            .iter()
            .filter(|r| r.system_id == "s1" && r.project.as_deref() == Some("odd") && r.ts >= 4_000_000)
            .count();
        assert_eq!(page.records.len(), expected);
        let counts = hot.read(|c| project_counts(c, &[])).unwrap();
        assert_eq!(counts.iter().map(|c| c.records).sum::<u64>(), 57);
        assert_eq!(counts.len(), 6, "3 systems x 2 projects");
    }
}
