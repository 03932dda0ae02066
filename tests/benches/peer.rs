//! Side by side with the Python peer (PyPI `akosha` 0.24.5, installed by `scripts/peer-setup.sh`) on the same
//! data: N records with 384-dim clustered embeddings, then 200 top-10 vector queries.
//!
//! - Ours: the real binaries — NDJSON posted to the agent in 1,000-record requests, QUIC + mTLS, WAL fsync, hot
//!   tier with both indexes; ingest is timed until every record is queryable (stored and vector-searchable:
//!   indexed, or in the exactly searched tail) and, separately, until both indexes hold it all; searches run
//!   once indexing is complete, as HTTP round trips to `/v1/search/vector`.
//! - The peer: its HotStore in-process (no HTTP, no network: every advantage), one awaited `insert` per record
//!   as its ingestion worker does, `search_similar` per query. Its answers are exact (brute force), so they
//!   also give our recall@10.
//!
//! `cargo bench --profile release --workspace --bench peer [-- 5000 20000]`

use std::time::{Duration, Instant};

use akosha_e2e::{Agent, AgentOptions, Aggregator, Site, clustered_vector};
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

const QUERIES: u64 = 200;
const CLUSTERS: u64 = 16;

fn vector(seed: u64) -> Vec<f32> {
    clustered_vector(seed, 384, |d| d as u64 % CLUSTERS == seed % CLUSTERS, 2.0)
}

fn record(i: u64, now_us: i64) -> Value {
    const TOPICS: [&str; 8] = ["parser", "buffer", "certificate", "embedding", "compaction", "tokio", "duckdb", "quic"];
    json!({
        "id": format!("c{i}"), "kind": "conversation", "ts": now_us - i as i64 * 1_000,
        "project": if i.is_multiple_of(3) { "akosha" } else { "web" },
        "text": format!("note {i} about the {} subsystem, observed while refactoring the {} path",
            TOPICS[(i % 8) as usize], TOPICS[(i / 8 % 8) as usize]),
        "embedding": vector(i),
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((p * sorted.len() as f64) as usize).min(sorted.len() - 1)]
}

struct Side {
    ingest_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    answers: Vec<Vec<String>>,
}

async fn ours(n: u64, records: &[Value], queries: &[Vec<f32>]) -> Result<Side> {
    let site = Site::new()?;
    let aggregator = Aggregator::start(&site, "aggregator").await?;
    let options = AgentOptions { buffer_max: "2GiB".into(), ..AgentOptions::default() };
    let agent = Agent::start(&site, "agent", "peer-bench", aggregator.quic_port, &options).await?;
    let started = Instant::now();
    for chunk in records.chunks(1000) {
        let body: String = chunk.iter().map(|r| format!("{r}\n")).collect();
        let (status, answer, _) = agent.post(body).await?;
        anyhow::ensure!(status == 200, "agent refused a request: {status} {answer}");
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut queryable = None;
    loop {
        let stats = aggregator.stats().await?;
        // Queryable: stored, and vector-searchable (indexed or in the exactly searched tail).
        if queryable.is_none() && stats["total_records"].as_u64() == Some(n) {
            queryable = Some(started.elapsed());
        }
        if stats["hot"]["indexed"].as_u64() == Some(n) && stats["hot"]["index_pending"].as_u64() == Some(0) {
            break;
        }
        if Instant::now() > deadline {
            bail!("not all records became searchable: {stats}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let indexed = started.elapsed();
    let queryable = queryable.unwrap_or(indexed);

    let http = reqwest::Client::new();
    let mut latencies = Vec::new();
    let mut answers = Vec::new();
    let mut server = Vec::new();
    for q in queries {
        let t = Instant::now();
        let r: Value = http
            .post(format!("{}/v1/search/vector", aggregator.url))
            .json(&json!({"embedding": q, "limit": 10}))
            .send()
            .await?
            .json()
            .await?;
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        server.push(r["took_ms"].as_f64().unwrap_or(f64::NAN));
        let ids = r["results"].as_array().context("search answer")?;
        answers.push(ids.iter().filter_map(|h| h["record"]["id"].as_str().map(str::to_owned)).collect());
    }
    latencies.sort_by(f64::total_cmp);
    server.sort_by(f64::total_cmp);
    println!("n={n} ours: server-side p50 {:.2} ms, p99 {:.2} ms", percentile(&server, 0.5), percentile(&server, 0.99));
    println!(
        "n={n} ours: queryable after {:.2} s ({:.0} records/s), both indexes complete after {:.2} s ({:.0} records/s)",
        queryable.as_secs_f64(),
        n as f64 / queryable.as_secs_f64(),
        indexed.as_secs_f64(),
        n as f64 / indexed.as_secs_f64()
    );
    Ok(Side {
        ingest_per_s: n as f64 / queryable.as_secs_f64(),
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
        answers,
    })
}

fn peer(records: &[Value], queries: &[Vec<f32>]) -> Result<Option<Side>> {
    let python = std::env::var("AKOSHA_PEER_PYTHON").unwrap_or_else(|_| {
        format!("{}/.cache/akosha-peer/venv/bin/python", std::env::var("HOME").unwrap_or_default())
    });
    if !std::path::Path::new(&python).exists() {
        eprintln!("the Python peer is not installed ({python}): run scripts/peer-setup.sh");
        return Ok(None);
    }
    let dir = tempfile::tempdir()?;
    let dataset = dir.path().join("dataset.jsonl");
    let rows: String = records
        .iter()
        .map(|r| {
            let mut row = r.clone();
            row["system_id"] = json!("peer-bench");
            format!("{row}\n")
        })
        .collect();
    std::fs::write(&dataset, rows)?;
    let queries_path = dir.path().join("queries.json");
    std::fs::write(&queries_path, serde_json::to_vec(queries)?)?;
    let script = akosha_e2e::crate_path("../scripts/peer_bench.py");
    let output = std::process::Command::new(&python).arg(script).arg(&dataset).arg(&queries_path).output()?;
    if !output.status.success() {
        bail!("the peer harness failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let r: Value = serde_json::from_slice(&output.stdout).context("the peer harness's answer")?;
    let answers = r["answers"]
        .as_array()
        .context("answers")?
        .iter()
        .map(|a| a.as_array().into_iter().flatten().filter_map(|id| id.as_str().map(str::to_owned)).collect())
        .collect();
    Ok(Some(Side {
        ingest_per_s: r["insert_per_s"].as_f64().context("insert_per_s")?,
        p50_ms: r["search_p50_ms"].as_f64().context("p50")?,
        p99_ms: r["search_p99_ms"].as_f64().context("p99")?,
        answers,
    }))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let mut sizes: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    if sizes.is_empty() {
        sizes = vec![5_000, 20_000];
    }
    let now_us = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_micros() as i64;
    let queries: Vec<Vec<f32>> = (0..QUERIES).map(|q| vector(1 << 40 | q)).collect();
    for n in sizes {
        let records: Vec<Value> = (0..n).map(|i| record(i, now_us)).collect();
        let ours = ours(n, &records, &queries).await?;
        println!(
            "n={n} ours: ingest {:.0} records/s (queryable), vector top-10 p50 {:.2} ms, p99 {:.2} ms (HTTP)",
            ours.ingest_per_s, ours.p50_ms, ours.p99_ms
        );
        let Some(peer) = tokio::task::block_in_place(|| peer(&records, &queries))? else { continue };
        let recall = ours
            .answers
            .iter()
            .zip(&peer.answers)
            .map(|(a, exact)| a.iter().filter(|id| exact.contains(id)).count() as f64 / exact.len().max(1) as f64)
            .sum::<f64>()
            / queries.len() as f64;
        println!(
            "n={n} peer: ingest {:.0} records/s, vector top-10 p50 {:.2} ms, p99 {:.2} ms (in-process)",
            peer.ingest_per_s, peer.p50_ms, peer.p99_ms
        );
        println!(
            "n={n} ratio: ingest {:.1}x, search p50 {:.1}x, p99 {:.1}x faster; our recall@10 against the peer's exact answers {recall:.3}",
            ours.ingest_per_s / peer.ingest_per_s,
            peer.p50_ms / ours.p50_ms,
            peer.p99_ms / ours.p99_ms
        );
    }
    Ok(())
}
