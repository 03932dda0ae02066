//! BM25 over record text and names (tantivy, in memory, English stemming), with the filters as index terms so
//! that a selective filter narrows the search instead of emptying a top-k afterwards.

use std::ops::Bound;
use std::sync::Mutex;

use akosha_protocol::Record;
use tantivy::collector::TopDocs;
use tantivy::query::{
    BitSetDocSet, BooleanQuery, ConstScorer, EnableScoring, Explanation, Occur, Query, QueryParser, RangeQuery, Scorer,
    TermQuery, Weight,
};
use tantivy::schema::{
    FAST, Field, INDEXED, IndexRecordOption, STORED, STRING, Schema, TantivyDocument, TextFieldIndexing, TextOptions,
    Value,
};
use tantivy::snippet::SnippetGenerator;
use tantivy::{Index, IndexReader, IndexWriter, ReloadPolicy, Term};

use super::{Filters, SearchError};

/// Memory the writer may buffer before it flushes a segment.
const WRITER_BUDGET: usize = 64 << 20;
/// The field holding each document's key (the hot tier's key hash).
const KEY: &str = "key";
/// Longest snippet, in characters.
const SNIPPET_CHARS: usize = 200;

/// A highlighted excerpt of a matching record's text.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Snippet {
    /// The excerpt.
    pub fragment: String,
    /// Byte ranges of `fragment` that matched the query.
    pub highlighted: Vec<(usize, usize)>,
    /// The excerpt as HTML with `<b>` around the matches (text escaped).
    pub html: String,
}

struct Fields {
    key: Field,
    system_id: Field,
    kind: Field,
    project: Field,
    category: Field,
    tags: Field,
    ts: Field,
    text: Field,
    name: Field,
}

/// The text index.
pub struct TextIndex {
    index: Index,
    writer: Mutex<IndexWriter>,
    reader: IndexReader,
    fields: Fields,
}

impl TextIndex {
    /// An empty in-memory index.
    pub fn new() -> Result<TextIndex, SearchError> {
        let (schema, fields) = Self::schema();
        Self::with_index(Index::create_in_ram(schema), fields)
    }

    /// The index kept in `dir` (created when empty). Committed documents survive restarts.
    pub fn open(dir: &std::path::Path) -> Result<TextIndex, SearchError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| SearchError::Text(tantivy::TantivyError::SystemError(format!("{}: {e}", dir.display()))))?;
        let (schema, fields) = Self::schema();
        let directory = tantivy::directory::MmapDirectory::open(dir)
            .map_err(|e| SearchError::Text(tantivy::TantivyError::SystemError(e.to_string())))?;
        let index = Index::open_or_create(directory, schema)?;
        Self::with_index(index, fields)
    }

    /// Documents committed.
    pub fn len(&self) -> u64 {
        self.reader.searcher().num_docs()
    }

    /// Whether no document is committed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Deletes every document (committed with the next [`TextIndex::commit`]).
    pub fn clear(&self) -> Result<(), SearchError> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner()).delete_all_documents()?;
        Ok(())
    }

    fn schema() -> (Schema, Fields) {
        let mut schema = Schema::builder();
        let prose = TextOptions::default().set_stored().set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer("en_stem")
                .set_index_option(IndexRecordOption::WithFreqsAndPositions),
        );
        let fields = Fields {
            // FAST: deleting many keys reads this column instead of walking the term dictionary.
            key: schema.add_u64_field(KEY, INDEXED | STORED | FAST),
            system_id: schema.add_text_field("system_id", STRING),
            kind: schema.add_text_field("kind", STRING),
            project: schema.add_text_field("project", STRING),
            category: schema.add_text_field("category", STRING),
            tags: schema.add_text_field("tags", STRING),
            ts: schema.add_i64_field("ts", INDEXED | FAST),
            text: schema.add_text_field("text", prose.clone()),
            name: schema.add_text_field("name", prose),
        };
        (schema.build(), fields)
    }

    fn with_index(index: Index, fields: Fields) -> Result<TextIndex, SearchError> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4);
        let writer = index.writer_with_num_threads(threads, WRITER_BUDGET * threads)?;
        let reader = index.reader_builder().reload_policy(ReloadPolicy::Manual).try_into()?;
        Ok(TextIndex { index, writer: Mutex::new(writer), reader, fields })
    }

    /// Adds or replaces the documents of `records` (keyed by the hot tier's key). Searchable after
    /// [`TextIndex::commit`].
    pub fn upsert(&self, records: &[(u64, &Record)]) -> Result<(), SearchError> {
        let f = &self.fields;
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        for (key, r) in records {
            writer.delete_term(Term::from_field_u64(f.key, *key));
            if r.text.is_none() && r.name.is_none() {
                continue;
            }
            let mut doc = TantivyDocument::default();
            doc.add_u64(f.key, *key);
            doc.add_text(f.system_id, &r.system_id);
            doc.add_text(f.kind, r.kind.as_str());
            if let Some(p) = &r.project {
                doc.add_text(f.project, p);
            }
            if let Some(c) = &r.category {
                doc.add_text(f.category, c);
            }
            for t in &r.tags {
                doc.add_text(f.tags, t);
            }
            doc.add_i64(f.ts, r.ts);
            if let Some(t) = &r.text {
                doc.add_text(f.text, t);
            }
            if let Some(n) = &r.name {
                doc.add_text(f.name, n);
            }
            writer.add_document(doc)?;
        }
        Ok(())
    }

    /// Deletes documents by key.
    pub fn remove(&self, keys: &[u64]) -> Result<(), SearchError> {
        if keys.is_empty() {
            return Ok(());
        }
        // One query for the whole set: a delete per key costs a scoring weight per key and, at commit, a term
        // lookup per key and segment (tantivy's `TermSetQuery` compiles the set into an FST first, which costs
        // more than the deletes).
        let mut keys = keys.to_vec();
        keys.sort_unstable();
        keys.dedup();
        let keys = KeySet { field: self.fields.key, keys: keys.into() };
        self.writer.lock().unwrap_or_else(|p| p.into_inner()).delete_query(Box::new(keys))?;
        Ok(())
    }

    /// Makes everything written so far searchable.
    pub fn commit(&self) -> Result<(), SearchError> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner()).commit()?;
        self.reader.reload()?;
        Ok(())
    }

    /// A point-in-time view, for sharing term statistics with another index.
    pub fn searcher(&self) -> tantivy::Searcher {
        self.reader.searcher()
    }

    /// The `k` best matches for `query` (tantivy query syntax, parsed leniently: stray syntax is taken as
    /// words), keys with BM25 scores and snippets, best first. With `peers` (the other tiers' searchers), BM25
    /// uses the statistics of all of them together, so scores rank across tiers exactly as one index would.
    pub fn search(
        &self,
        query: &str,
        k: usize,
        filters: &Filters,
        peers: &[tantivy::Searcher],
    ) -> Result<Vec<(u64, f32, Snippet)>, SearchError> {
        let f = &self.fields;
        let mut parser = QueryParser::for_index(&self.index, vec![f.text, f.name]);
        parser.set_field_boost(f.name, 2.0);
        let (user_query, _ignored) = parser.parse_query_lenient(query);
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = vec![(Occur::Must, user_query.box_clone())];
        let term = |field: Field, value: &str| -> Box<dyn Query> {
            Box::new(TermQuery::new(Term::from_field_text(field, value), IndexRecordOption::Basic))
        };
        let any_of = |field: Field, values: &mut dyn Iterator<Item = &str>| -> Box<dyn Query> {
            Box::new(BooleanQuery::new(values.map(|v| (Occur::Should, term(field, v))).collect()))
        };
        if !filters.system_ids.is_empty() {
            clauses.push((Occur::Must, any_of(f.system_id, &mut filters.system_ids.iter().map(String::as_str))));
        }
        if !filters.kinds.is_empty() {
            clauses.push((Occur::Must, any_of(f.kind, &mut filters.kinds.iter().map(|k| k.as_str()))));
        }
        if let Some(p) = &filters.project {
            clauses.push((Occur::Must, term(f.project, p)));
        }
        if let Some(c) = &filters.category {
            clauses.push((Occur::Must, term(f.category, c)));
        }
        for t in &filters.tags {
            clauses.push((Occur::Must, term(f.tags, t)));
        }
        if filters.since_us.is_some() || filters.until_us.is_some() {
            let lower = filters.since_us.map_or(Bound::Unbounded, |s| Bound::Included(Term::from_field_i64(f.ts, s)));
            let upper = filters.until_us.map_or(Bound::Unbounded, |u| Bound::Excluded(Term::from_field_i64(f.ts, u)));
            clauses.push((Occur::Must, Box::new(RangeQuery::new(lower, upper))));
        }
        let combined = BooleanQuery::new(clauses);
        let searcher = self.reader.searcher();
        let collector = TopDocs::with_limit(k.max(1)).order_by_score();
        let top = if peers.is_empty() {
            searcher.search(&combined, &collector)?
        } else {
            let mut all = peers.to_vec();
            all.push(searcher.clone());
            searcher.search_with_statistics_provider(&combined, &collector, &SharedStatistics(all))?
        };
        let snippets = SnippetGenerator::create(&searcher, &*user_query, f.text).map(|mut g| {
            g.set_max_num_chars(SNIPPET_CHARS);
            g
        })?;
        let mut hits = Vec::with_capacity(top.len());
        for (score, address) in top.into_iter().take(k) {
            let doc: TantivyDocument = searcher.doc(address)?;
            let Some(key) = doc.get_first(f.key).and_then(|v| v.as_u64()) else { continue };
            let snippet = snippets.snippet_from_doc(&doc);
            let highlighted = snippet.highlighted().iter().map(|r| (r.start, r.end)).collect();
            hits.push((
                key,
                score,
                Snippet { fragment: snippet.fragment().to_owned(), highlighted, html: snippet.to_html() },
            ));
        }
        Ok(hits)
    }
}

/// BM25 statistics summed over several indexes with the same schema.
struct SharedStatistics(Vec<tantivy::Searcher>);

impl tantivy::query::Bm25StatisticsProvider for SharedStatistics {
    fn total_num_tokens(&self, field: Field) -> tantivy::Result<u64> {
        self.0.iter().map(|s| s.total_num_tokens(field)).sum()
    }

    fn total_num_docs(&self) -> tantivy::Result<u64> {
        self.0.iter().map(|s| s.total_num_docs()).sum()
    }

    fn doc_freq(&self, term: &Term) -> tantivy::Result<u64> {
        self.0.iter().map(|s| s.doc_freq(term)).sum()
    }
}

/// What looking one key up in a term dictionary costs, in documents of the `key` column checked (an estimate: a
/// lookup follows the FST from its root through a transition per key byte and opens a posting list, a document
/// is one unpacked value and a binary search in the keys).
const LOOKUP_PER_STEP: u64 = 8;

/// The documents whose `key` field holds one of a set of keys: per segment, lookups of the keys when they are few
/// against the segment's documents, else one pass over the segment's `key` column with a binary search per document
/// (in a 90,000-row warm→cold move, a sixth of the CPU that walking the term dictionary took: its stream compares
/// and copies every term). An index written before the column existed fails to open and is rebuilt.
#[derive(Clone, Debug)]
struct KeySet {
    field: Field,
    /// Sorted, without duplicates.
    keys: std::sync::Arc<[u64]>,
}

impl Query for KeySet {
    fn weight(&self, _: EnableScoring<'_>) -> tantivy::Result<Box<dyn Weight>> {
        Ok(Box::new(self.clone()))
    }
}

impl Weight for KeySet {
    fn scorer(&self, reader: &tantivy::SegmentReader, boost: tantivy::Score) -> tantivy::Result<Box<dyn Scorer>> {
        use tantivy::{DocSet, TERMINATED};
        let inverted = reader.inverted_index(self.field)?;
        let mut docs = tantivy::BitSet::with_max_value(reader.max_doc());
        let mut delete = |info: &tantivy::postings::TermInfo| -> tantivy::Result<()> {
            let mut postings = inverted.read_postings_from_terminfo(info, IndexRecordOption::Basic)?;
            let mut doc = postings.doc();
            while doc != TERMINATED {
                docs.insert(doc);
                doc = postings.advance();
            }
            Ok(())
        };
        // A few keys are cheaper to look up one by one than the column is to read, many the other way round.
        if (self.keys.len() as u64).saturating_mul(LOOKUP_PER_STEP) < u64::from(reader.max_doc()) {
            for key in self.keys.iter() {
                if let Some(info) = inverted.terms().get(key.to_be_bytes())? {
                    delete(&info)?;
                }
            }
        } else {
            let column = reader.fast_fields().u64(KEY)?;
            for doc in 0..reader.max_doc() {
                if column.values_for_doc(doc).any(|key| self.keys.binary_search(&key).is_ok()) {
                    docs.insert(doc);
                }
            }
        }
        Ok(Box::new(ConstScorer::new(BitSetDocSet::from(docs), boost)))
    }

    fn explain(&self, _: &tantivy::SegmentReader, _: tantivy::DocId) -> tantivy::Result<Explanation> {
        Err(tantivy::TantivyError::InvalidArgument("key sets select documents to delete; they do not score".into()))
    }
}

#[cfg(test)]
mod tests {
    use akosha_protocol::RecordKind;

    use super::*;

    fn rec(id: &str, text: &str, project: &str, ts: i64) -> Record {
        Record {
            system_id: "laptop-1".into(),
            kind: RecordKind::Reflection,
            id: id.into(),
            ts,
            project: Some(project.into()),
            text: Some(text.into()),
            tags: vec!["t".into()],
            ..Record::default()
        }
    }

    #[test]
    fn ranks_filters_highlights_replaces_and_deletes() {
        let index = TextIndex::new().unwrap();
        let a = rec("a", "The aggregator replays its write-ahead log on restart.", "akosha", 10);
        let b = rec("b", "Buffers are flushed; restarting the agent replays nothing twice.", "web", 20);
        let c = rec("c", "Unrelated notes about lunch.", "akosha", 30);
        index.upsert(&[(1, &a), (2, &b), (3, &c)]).unwrap();
        index.commit().unwrap();
        let hits = index.search("replays restart", 10, &Filters::default(), &[]).unwrap();
        let keys: Vec<u64> = hits.iter().map(|h| h.0).collect();
        assert_eq!(keys.len(), 2, "{hits:?}");
        assert!(keys.contains(&1) && keys.contains(&2));
        // Stemming: "restarting" matched "restart"; the snippet marks the words.
        let snippet = &hits.iter().find(|h| h.0 == 2).unwrap().2;
        assert!(snippet.html.contains("<b>restarting</b>"), "{snippet:?}");
        let only_web = Filters { project: Some("web".into()), ..Filters::default() };
        assert_eq!(index.search("replays", 10, &only_web, &[]).unwrap().iter().map(|h| h.0).collect::<Vec<_>>(), [2]);
        let early = Filters { until_us: Some(15), ..Filters::default() };
        assert_eq!(index.search("replays", 10, &early, &[]).unwrap().iter().map(|h| h.0).collect::<Vec<_>>(), [1]);
        // Replacing a key's text; deleting a key.
        let a2 = rec("a", "Now about lunch only.", "akosha", 40);
        index.upsert(&[(1, &a2)]).unwrap();
        index.remove(&[3]).unwrap();
        index.commit().unwrap();
        assert_eq!(
            index.search("replays", 10, &Filters::default(), &[]).unwrap().iter().map(|h| h.0).collect::<Vec<_>>(),
            [2]
        );
        assert_eq!(
            index.search("lunch", 10, &Filters::default(), &[]).unwrap().iter().map(|h| h.0).collect::<Vec<_>>(),
            [1]
        );
        // Query syntax errors are taken leniently.
        assert!(index.search("lunch AND (", 10, &Filters::default(), &[]).is_ok());
    }

    #[test]
    fn removes_exactly_a_set_of_keys_across_segments() {
        let index = TextIndex::new().unwrap();
        // Keys spread over the whole u64 range (they are hashes), in three segments.
        let key = |i: u64| i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let records: Vec<Record> =
            (0..300).map(|i| rec(&format!("r{i}"), "shared words here", "p", i as i64)).collect();
        for part in records.chunks(100).enumerate() {
            let keyed: Vec<(u64, &Record)> =
                part.1.iter().enumerate().map(|(j, r)| (key((part.0 * 100 + j) as u64), r)).collect();
            index.upsert(&keyed).unwrap();
            index.commit().unwrap();
        }
        // Every third key, unsorted, with duplicates and keys that were never indexed.
        let mut gone: Vec<u64> = (0..300).rev().filter(|i| i % 3 == 0).map(key).collect();
        gone.extend([key(0), key(3), key(1000), 0, u64::MAX]);
        index.remove(&gone).unwrap();
        index.commit().unwrap();
        let hits = index.search("shared", 300, &Filters::default(), &[]).unwrap();
        let mut left: Vec<u64> = hits.iter().map(|h| h.0).collect();
        left.sort_unstable();
        let mut expected: Vec<u64> = (0..300).filter(|i| i % 3 != 0).map(key).collect();
        expected.sort_unstable();
        assert_eq!(left, expected, "as many keys as a segment has documents: the key columns are read");
        // A few keys against ~100 documents per segment: looked up one by one.
        index.remove(&[key(2), key(1), 42]).unwrap();
        index.commit().unwrap();
        let hits = index.search("shared", 300, &Filters::default(), &[]).unwrap();
        let mut left: Vec<u64> = hits.iter().map(|h| h.0).collect();
        left.sort_unstable();
        expected.retain(|k| ![key(1), key(2)].contains(k));
        assert_eq!(left, expected);
        // An empty set removes nothing.
        index.remove(&[]).unwrap();
        index.commit().unwrap();
        assert_eq!(index.len(), 198);
    }
}
