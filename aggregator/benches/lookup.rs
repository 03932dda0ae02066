//! The second half of every search: fetching the hits' records from the hot tier's DuckDB table by key
//! (`HotTier::get_many`, 10 random keys, vectors left out), at scale. A search's latency is the index's
//! (`ann_recall`, `bm25`) plus this.
//!
//! `cargo bench --profile release --workspace --bench lookup -- [records, default 1000000]`
//!
//! The HNSW indexer keeps working in the background while the lookups run (on a 2-core machine it competes
//! for CPU), as it would under ingest.

use std::time::Instant;

use akosha_aggregator::hot::HotTier;
use akosha_protocol::{Record, RecordKind};

fn main() {
    let n: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(1_000_000);
    let hot = HotTier::open("16GB", 1, None).expect("hot tier");
    let mut rng = akosha_e2e::Xorshift(0x5851_F42D_4C95_7F2D);
    let started = Instant::now();
    for start in (0..n).step_by(50_000) {
        let batch: Vec<Record> = (start..(start + 50_000).min(n))
            .map(|i| Record {
                system_id: format!("host-{}", i % 50),
                id: format!("r{i}"),
                ts: 1_700_000_000_000_000 + i as i64,
                text: Some(format!("note {i}: {}", "words of a typical memory ".repeat(8))),
                project: Some("akosha".into()),
                embedding: Some(akosha_e2e::clustered_vector(i as u64, 384, |d| d % 16 == i % 16, 2.0)),
                ..Record::default()
            })
            .collect();
        hot.insert(&batch).expect("insert");
    }
    eprintln!("{n} records inserted in {:.1} s", started.elapsed().as_secs_f64());
    for (name, with_embedding) in [("without vectors (search results)", false), ("with vectors", true)] {
        let mut times = Vec::new();
        for _ in 0..300 {
            let ids: Vec<(String, String)> = (0..10)
                .map(|_| {
                    let i = (rng.next() % n as u64) as usize;
                    (format!("host-{}", i % 50), format!("r{i}"))
                })
                .collect();
            let keys: Vec<(&str, &str)> = ids.iter().map(|(s, i)| (s.as_str(), i.as_str())).collect();
            let t = Instant::now();
            let found = hot.get_many(RecordKind::Conversation, &keys, with_embedding).expect("lookup");
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(found.len(), keys.iter().collect::<std::collections::HashSet<_>>().len());
        }
        times.sort_by(f64::total_cmp);
        println!(
            "lookup of 10 records {name} at {n}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            times[150], times[296], times[299]
        );
    }
}
