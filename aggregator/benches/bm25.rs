//! BM25 top-10 latency of the hot tier's text index at scale.
//!
//! `cargo bench --profile release --workspace --bench bm25 -- [records, default 1000000]`
//!
//! Records: sentences of 12–30 words drawn from a 20,000-word vocabulary with a Zipf-like frequency (a few
//! words are everywhere, most are rare — like real notes), plus metadata the filters use. Queries: 300 of
//! 1–3 words mixing common and rare ones, some with a system filter. Reports indexing rate, p50 and p99.

use std::time::Instant;

use akosha_aggregator::search::Filters;
use akosha_aggregator::search::text::TextIndex;
use akosha_protocol::{Record, RecordKind};

struct Rng(akosha_e2e::Xorshift);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.next()
    }

    /// A word index with P(i) ∝ 1/(i+1): squaring a uniform draw skews towards the head of the vocabulary.
    fn zipf(&mut self, vocabulary: usize) -> usize {
        let u = (self.next() % 1_000_000) as f64 / 1_000_000.0;
        ((vocabulary as f64).powf(u) - 1.0) as usize
    }
}

fn word(i: usize) -> String {
    // Pronounceable, distinct, stemmer-stable words: consonant-vowel pairs spelling the index.
    const C: &[u8] = b"bdfgklmnprstvz";
    const V: &[u8] = b"aeiou";
    let mut w = String::new();
    let mut n = i + 1;
    while n > 0 {
        w.push(C[n % C.len()] as char);
        n /= C.len();
        w.push(V[n % V.len()] as char);
        n /= V.len();
    }
    w
}

fn main() {
    let n: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(1_000_000);
    const VOCABULARY: usize = 20_000;
    let words: Vec<String> = (0..VOCABULARY).map(word).collect();
    let mut rng = Rng(akosha_e2e::Xorshift(0x9E37_79B9_7F4A_7C15));
    let index = TextIndex::new().expect("index");
    let started = Instant::now();
    let chunk = 50_000;
    let mut done = 0;
    while done < n {
        let records: Vec<Record> = (done..(done + chunk).min(n))
            .map(|i| {
                let len = 12 + (rng.next() % 19) as usize;
                let text: Vec<&str> = (0..len).map(|_| words[rng.zipf(VOCABULARY)].as_str()).collect();
                Record {
                    system_id: format!("system-{}", i % 100),
                    kind: RecordKind::Conversation,
                    id: format!("r{i}"),
                    ts: 1_700_000_000_000_000 + i as i64,
                    project: Some(format!("project-{}", i % 20)),
                    text: Some(text.join(" ")),
                    ..Record::default()
                }
            })
            .collect();
        let keyed: Vec<(u64, &Record)> = records.iter().enumerate().map(|(j, r)| ((done + j) as u64, r)).collect();
        index.upsert(&keyed).expect("upsert");
        index.commit().expect("commit");
        done += records.len();
        eprint!("\rindexed {done}/{n} ({:.0} records/s)", done as f64 / started.elapsed().as_secs_f64());
    }
    eprintln!();
    let build = started.elapsed();
    let mut times = Vec::new();
    let mut results = 0;
    for q in 0..300 {
        let terms = 1 + q % 3;
        let query: Vec<&str> = (0..terms)
            .map(|t| {
                if t == 0 {
                    words[(rng.next() % 2_000) as usize].as_str()
                } else {
                    words[rng.zipf(VOCABULARY)].as_str()
                }
            })
            .collect();
        let filters = if q % 4 == 0 {
            Filters { system_ids: vec![format!("system-{}", q % 100)], ..Filters::default() }
        } else {
            Filters::default()
        };
        let t = Instant::now();
        let hits = index.search(&query.join(" "), 10, &filters, &[]).expect("search");
        times.push(t.elapsed().as_secs_f64() * 1e3);
        results += hits.len();
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{n} records indexed in {:.1} s ({:.0} records/s); BM25 top-10 over 300 queries (1–3 terms, a quarter \
         filtered by system): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, {:.1} results/query",
        build.as_secs_f64(),
        n as f64 / build.as_secs_f64(),
        times[times.len() / 2],
        times[times.len() * 99 / 100],
        times[times.len() - 1],
        results as f64 / 300.0
    );
}
