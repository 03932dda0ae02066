//! The whole pipeline with the real binaries on this machine: NDJSON into the agent, QUIC + mTLS, WAL fsync, hot
//! tier; agent buffer and aggregator WAL on the same disk.
//!
//! 1. Sustained throughput: two clients post 1,000-record requests as fast as the agent accepts them for the
//!    given number of seconds; reported: accepted/s and queryable/s over the window.
//! 2. Latency at a steady 5,000 records/s (100 records every 20 ms): from the moment the agent accepted a record
//!    (its 200) to the moment it became readable in the hot tier (`ingested_at`), p50/p99 over sampled records.
//!
//! `cargo bench --profile release --workspace --bench pipeline [-- <seconds>]`

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use akosha_e2e::{Agent, AgentOptions, Aggregator, Site, ndjson};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let seconds: u64 = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(60);
    let site = Site::new()?;
    let aggregator = Aggregator::start(&site, "aggregator").await?;
    let options = AgentOptions { buffer_max: "4GiB".into(), ..AgentOptions::default() };
    let agent = Agent::start(&site, "agent", "bench-host", aggregator.quic_port, &options).await?;

    // 1. Sustained throughput (skipped with a duration of 0, to measure latency on a fresh aggregator).
    let template = Arc::new(ndjson(0..1000, "conversation"));
    let accepted = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut clients = Vec::new();
    for client in 0..2 {
        let (template, accepted, stop, url) = (template.clone(), accepted.clone(), stop.clone(), agent.url.clone());
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let body = template.replace("\"id\":\"r", &format!("\"id\":\"c{client}b{n}-r"));
                n += 1;
                match http.post(format!("{url}/v1/records")).body(body).send().await {
                    Ok(r) if r.status().is_success() => {
                        accepted.fetch_add(1000, Ordering::Relaxed);
                    }
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }));
    }
    if seconds == 0 {
        stop.store(true, Ordering::Relaxed);
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let queryable_at_end = aggregator.total().await?;
    let window = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await?;
    }
    let accepted = accepted.load(Ordering::Relaxed);
    let drained = aggregator.wait_total(accepted, Duration::from_secs(600)).await?;
    let drain_time = start.elapsed();
    if seconds > 0 {
        println!(
            "sustained {:.0}s: accepted {:.0} records/s, queryable {:.0} records/s within the window; all {drained} queryable after {:.1}s",
            window.as_secs_f64(),
            accepted as f64 / window.as_secs_f64(),
            queryable_at_end as f64 / window.as_secs_f64(),
            drain_time.as_secs_f64()
        );
    }

    // 2. Latency at a steady 5,000 records/s.
    let base = 10_000_000u64;
    let latency_seconds = 20u64;
    let mut sent = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let http = reqwest::Client::new();
    let steady_start = Instant::now();
    let mut i = 0u64;
    while steady_start.elapsed() < Duration::from_secs(latency_seconds) {
        tick.tick().await;
        let body = ndjson(base + i * 100..base + (i + 1) * 100, "reflection");
        let response = http.post(format!("{}/v1/records", agent.url)).body(body).send().await?;
        let accepted_at = jiff_now_us();
        anyhow::ensure!(response.status().is_success(), "post failed: {}", response.status());
        sent.push((base + i * 100 + (i % 100), accepted_at));
        i += 1;
    }
    aggregator.wait_total(drained + i * 100, Duration::from_secs(120)).await?;
    let mut latencies = Vec::new();
    for (id, accepted_at) in sent.iter().step_by(2) {
        let record = aggregator.record("bench-host", "reflection", &format!("r{id}")).await?.expect("stored");
        let ingested_at = record["ingested_at"].as_i64().expect("ingested_at");
        latencies.push((ingested_at - accepted_at).max(0) as f64 / 1000.0);
    }
    if std::env::var_os("BENCH_VERBOSE").is_some() {
        let slow: Vec<(usize, f64)> = latencies.iter().copied().enumerate().filter(|(_, l)| *l > 100.0).collect();
        eprintln!("samples over 100 ms (index, ms): {slow:?}");
    }
    latencies.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    println!(
        "latency accepted→readable at 5000 records/s ({} samples over {latency_seconds}s): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        latencies.len(),
        pct(0.5),
        pct(0.99),
        latencies.last().copied().unwrap_or_default()
    );
    Ok(())
}

fn jiff_now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}
