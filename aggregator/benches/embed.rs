//! Throughput and latency of the in-process embedding model (all-MiniLM-L6-v2 on candle, CPU).
//!
//! `cargo bench --profile release --workspace --bench embed -- [texts, default 2000]`
//!
//! Texts shaped like Session-Buddy's conversation turns (150–300 characters of English-like prose). Reports the
//! batch throughput (what the background backfill gets) and the latency of one short query (what a search by
//! text pays before the index is even asked).

use std::time::Instant;

use akosha_aggregator::embed::{Embedder, default_model_dir};

fn main() {
    let n: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(2000);
    let dir = default_model_dir(std::env::var("HOME").ok().as_deref());
    let Ok(embedder) = Embedder::load(&dir, 256) else {
        eprintln!("no embedding model at {} (run scripts/setup.sh)", dir.display());
        return;
    };
    const WORDS: &[&str] = &[
        "the",
        "agent",
        "buffer",
        "flushed",
        "before",
        "shutdown",
        "aggregator",
        "query",
        "vector",
        "index",
        "session",
        "reflection",
        "duckdb",
        "parquet",
        "latency",
        "schema",
        "project",
        "refactor",
        "test",
        "cache",
        "can",
        "you",
        "investigate",
        "a",
        "lock",
        "error",
        "in",
        "checkpoints",
        "migrate",
        "the",
        "regression",
    ];
    let mut rng = akosha_e2e::Xorshift(0x2545_F491_4F6C_DD1D);
    let texts: Vec<String> = (0..n)
        .map(|_| {
            let mut t = String::from("User: ");
            let target = 150 + (rng.next() % 150) as usize;
            while t.len() < target {
                t.push_str(WORDS[(rng.next() % WORDS.len() as u64) as usize]);
                t.push(' ');
            }
            t
        })
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let _ = embedder.embed(&refs[..32.min(n)]);
    let started = Instant::now();
    let vectors = embedder.embed(&refs).expect("embed");
    let batch = started.elapsed().as_secs_f64();
    assert_eq!(vectors.len(), n);
    let mut single = Vec::new();
    for q in ["why were batches lost at shutdown?", "flaky test in the parquet writer", "certificate rotation"] {
        for _ in 0..20 {
            let t = Instant::now();
            embedder.embed(&[q]).expect("embed");
            single.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    single.sort_by(f64::total_cmp);
    println!(
        "{n} texts (150–300 chars) in {batch:.1} s: {:.0} texts/s on {} threads; one short query: p50 {:.1} ms, p99 {:.1} ms",
        n as f64 / batch,
        std::thread::available_parallelism().map_or(1, |p| p.get()),
        single[single.len() / 2],
        single[single.len() * 99 / 100],
    );
}
