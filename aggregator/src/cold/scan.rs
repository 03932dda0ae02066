//! Queries over cold objects once they are local: exact vector search (brute force, which is what cold data
//! deserves), text search by word matching scored with BM25 over the scanned rows, and point lookups.
//!
//! Every scan reads the newest version of each key among the objects given; the caller reconciles with the
//! versions in hot and warm (newest `ts` wins).

use std::sync::Arc;

use akosha_protocol::{EMBEDDING_DIM, RecordKind};
use duckdb::Connection;

use super::cache::Lease;
use super::{ColdError, sql_text, visible_source};
use crate::hot::{RECORD_COLUMNS, row_json};
use crate::search::text::Snippet;
use crate::search::{DocMeta, Filters};

/// A record found in cold storage, with what the ranking needs.
#[derive(Debug, Clone)]
pub struct ColdHit {
    /// The index-style description.
    pub doc: DocMeta,
    /// Cosine similarity or BM25 score.
    pub score: f32,
    /// The record as the API shows it (without its embedding), `tier: cold`.
    pub record: serde_json::Value,
    /// Text searches: the excerpt.
    pub snippet: Option<Snippet>,
}

/// The newest version of each key in the files, without the rows deletions hid.
fn newest(kind: RecordKind, files: &Lease) -> String {
    format!(
        "(SELECT * FROM {} QUALIFY row_number() OVER (PARTITION BY system_id, id ORDER BY ts DESC) = 1)",
        visible_source(kind.as_str(), &files.paths, files.int8)
    )
}

/// `AND …` for every filter except kinds and `min_similarity`.
fn filter_sql(filters: &Filters) -> String {
    let mut sql = String::new();
    if !filters.system_ids.is_empty() {
        let list: Vec<String> = filters.system_ids.iter().map(|s| sql_text(s)).collect();
        sql.push_str(&format!(" AND system_id IN ({})", list.join(", ")));
    }
    if let Some(p) = &filters.project {
        sql.push_str(&format!(" AND project = {}", sql_text(p)));
    }
    if let Some(c) = &filters.category {
        sql.push_str(&format!(" AND category = {}", sql_text(c)));
    }
    if !filters.tags.is_empty() {
        let list: Vec<String> = filters.tags.iter().map(|t| sql_text(t)).collect();
        sql.push_str(&format!(" AND list_has_all(coalesce(tags, []::VARCHAR[]), [{}])", list.join(", ")));
    }
    if let Some(since) = filters.since_us {
        sql.push_str(&format!(" AND ts >= make_timestamp({since})"));
    }
    if let Some(until) = filters.until_us {
        sql.push_str(&format!(" AND ts < make_timestamp({until})"));
    }
    sql
}

/// Columns for [`row_json`] without the vector, then `tier`.
fn result_columns() -> String {
    format!("{}, 'cold' AS tier", RECORD_COLUMNS.replacen("embedding", "NULL::FLOAT[1] AS embedding", 1))
}

fn hit(row: &duckdb::Row<'_>, kind: RecordKind, score_column: usize) -> Result<ColdHit, ColdError> {
    let record = row_json(row, kind)?;
    let tags: Vec<Arc<str>> = record["tags"]
        .as_array()
        .map(|a| a.iter().filter_map(|t| t.as_str().map(Arc::from)).collect())
        .unwrap_or_default();
    let doc = DocMeta {
        system_id: Arc::from(record["system_id"].as_str().unwrap_or_default()),
        kind,
        id: Box::from(record["id"].as_str().unwrap_or_default()),
        project: record["project"].as_str().map(Arc::from),
        category: record["category"].as_str().map(Arc::from),
        tags: tags.into_boxed_slice(),
        ts: record["ts"].as_i64().unwrap_or_default(),
    };
    let score: f64 = row.get(score_column)?;
    Ok(ColdHit { doc, score: score as f32, record, snippet: None })
}

/// The `k` records of `kind` in `files` nearest to `embedding` that pass `filters`.
pub fn vector(
    conn: &Connection,
    files: &Lease,
    kind: RecordKind,
    embedding: &[f32],
    k: usize,
    filters: &Filters,
) -> Result<Vec<ColdHit>, ColdError> {
    if files.paths.is_empty() || embedding.len() != EMBEDDING_DIM || embedding.iter().any(|x| !x.is_finite()) {
        return Ok(Vec::new());
    }
    let query: Vec<String> = embedding.iter().map(|x| format!("{x:?}")).collect();
    let similarity = format!("array_cosine_similarity(embedding, [{}]::FLOAT[{EMBEDDING_DIM}])", query.join(","));
    let mut sql = format!(
        "SELECT {}, {similarity} AS similarity FROM {} WHERE embedding IS NOT NULL{}",
        result_columns(),
        newest(kind, files),
        filter_sql(filters)
    );
    if let Some(min) = filters.min_similarity {
        sql.push_str(&format!(" AND {similarity} >= {min:?}"));
    }
    sql.push_str(&format!(" ORDER BY similarity DESC, system_id, id LIMIT {k}"));
    let mut stmt = conn.prepare(&sql)?;
    let mut rows = stmt.query([])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(hit(row, kind, 20)?);
    }
    Ok(out)
}

/// The query's words as the text index tokenizes them (lower-case runs of letters and digits).
pub fn terms(query: &str) -> Vec<String> {
    let mut terms: Vec<String> =
        query.split(|c: char| !c.is_alphanumeric()).filter(|t| !t.is_empty()).map(str::to_lowercase).collect();
    terms.sort();
    terms.dedup();
    terms
}

/// The `k` best matches for the words of `query` among the records of `kind` in `files`, BM25 (k1 = 1.2,
/// b = 0.75) over the text and name of the scanned rows.
pub fn text(
    conn: &Connection,
    files: &Lease,
    kind: RecordKind,
    query: &str,
    k: usize,
    filters: &Filters,
) -> Result<Vec<ColdHit>, ColdError> {
    let terms = terms(query);
    if files.paths.is_empty() || terms.is_empty() {
        return Ok(Vec::new());
    }
    // Terms are letters and digits only, so they are safe inside both a SQL literal and a regular expression.
    let tf: Vec<String> =
        terms.iter().enumerate().map(|(i, t)| format!("len(regexp_extract_all(lt, '\\b{t}\\b')) AS tf{i}")).collect();
    let df: Vec<String> = (0..terms.len()).map(|i| format!("count(*) FILTER (WHERE tf{i} > 0) AS df{i}")).collect();
    let score: Vec<String> = (0..terms.len())
        .map(|i| {
            format!(
                "ln(1 + (stats.n - stats.df{i} + 0.5) / (stats.df{i} + 0.5)) * tf{i} * 2.2 \
                 / (tf{i} + 1.2 * (0.25 + 0.75 * dl / greatest(stats.avgdl, 1)))"
            )
        })
        .collect();
    let any = format!("\\b({})\\b", terms.join("|"));
    let sql = format!(
        "WITH docs AS (SELECT *, lower(concat_ws(' ', text, name)) AS lt FROM {source} WHERE TRUE{filters}), \
         lengths AS (SELECT count(*) AS n, avg(len(string_split_regex(trim(lt), '\\s+'))) AS avgdl FROM docs), \
         matched AS (SELECT *, {tf}, len(string_split_regex(trim(lt), '\\s+')) AS dl FROM docs \
                     WHERE regexp_matches(lt, '{any}')), \
         stats AS (SELECT (SELECT n FROM lengths) AS n, (SELECT avgdl FROM lengths) AS avgdl, {df} FROM matched) \
         SELECT {columns}, ({score})::DOUBLE AS score FROM matched, stats ORDER BY score DESC, system_id, id LIMIT {k}",
        source = newest(kind, files),
        filters = filter_sql(filters),
        tf = tf.join(", "),
        df = df.join(", "),
        score = score.join(" + "),
        columns = result_columns(),
    );
    let mut stmt = conn.prepare(&sql)?;
    let mut rows = stmt.query([])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let mut h = hit(row, kind, 20)?;
        let source = h.record["text"].as_str().or(h.record["name"].as_str()).unwrap_or_default().to_owned();
        h.snippet = Some(snippet(&source, &terms));
        out.push(h);
    }
    Ok(out)
}

/// Records of `kind` with these ids (the newest version of each in `files`), embeddings included.
pub fn get_many(
    conn: &Connection,
    files: &Lease,
    kind: RecordKind,
    keys: &[(&str, &str)],
) -> Result<Vec<serde_json::Value>, ColdError> {
    if files.paths.is_empty() || keys.is_empty() {
        return Ok(Vec::new());
    }
    let pairs: Vec<String> = keys.iter().map(|(s, i)| format!("({}, {})", sql_text(s), sql_text(i))).collect();
    let sql = format!(
        "SELECT {RECORD_COLUMNS}, 'cold' AS tier FROM {} WHERE (system_id, id) IN (VALUES {})",
        newest(kind, files),
        pairs.join(", ")
    );
    let mut stmt = conn.prepare(&sql)?;
    let mut rows = stmt.query([])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(row_json(row, kind)?);
    }
    Ok(out)
}

/// An excerpt of about 160 bytes around the first matching word, with every matching word highlighted.
pub fn snippet(text: &str, terms: &[String]) -> Snippet {
    let words = word_spans(text).into_iter().filter(|(a, b)| terms.contains(&text[*a..*b].to_lowercase()));
    let words: Vec<(usize, usize)> = words.collect();
    let centre = words.first().map_or(0, |(a, _)| *a);
    let mut start = centre.saturating_sub(60);
    while !text.is_char_boundary(start) {
        start -= 1;
    }
    let mut end = (start + 160).min(text.len());
    while !text.is_char_boundary(end) {
        end += 1;
    }
    let fragment = text[start..end].to_owned();
    let highlighted: Vec<(usize, usize)> =
        words.iter().filter(|(a, b)| *a >= start && *b <= end).map(|(a, b)| (a - start, b - start)).collect();
    let mut html = String::new();
    let mut at = 0;
    for (a, b) in &highlighted {
        html.push_str(&escape(&fragment[at..*a]));
        html.push_str("<b>");
        html.push_str(&escape(&fragment[*a..*b]));
        html.push_str("</b>");
        at = *b;
    }
    html.push_str(&escape(&fragment[at..]));
    Snippet { fragment, highlighted, html }
}

fn word_spans(text: &str) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        match (c.is_alphanumeric(), start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                spans.push((s, i));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        spans.push((s, text.len()));
    }
    spans
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snippets_highlight_whole_words_only() {
        let s = snippet("Topic3 is not topic33, but <topic3> is.", &terms("TOPIC3"));
        assert_eq!(s.highlighted, vec![(0, 6), (28, 34)]);
        assert_eq!(s.html, "<b>Topic3</b> is not topic33, but &lt;<b>topic3</b>&gt; is.");
        assert_eq!(terms("a-b  A"), vec!["a", "b"]);
    }
}
