//! `kill -9` of either side while records stream: nothing acknowledged is lost, nothing is stored twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use akosha_e2e::{Agent, AgentOptions, Aggregator, Site, ndjson};
use rand::Rng;

/// Posts batches of 50 records until `stop`, counting what the agent accepted (200). Requests refused while
/// the agent is down are simply not counted: they were never accepted.
fn spawn_writer(
    url: String,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    next_id: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
        while !stop.load(Ordering::Relaxed) {
            let first = next_id.fetch_add(50, Ordering::Relaxed);
            let body = ndjson(first..first + 50, "conversation");
            match client.post(format!("{url}/v1/records")).body(body).send().await {
                Ok(r) if r.status().is_success() => {
                    accepted.fetch_add(50, Ordering::Relaxed);
                }
                // Not accepted: those ids are never counted (a retry would reuse them, which is fine too).
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregator_killed_five_times_while_streaming() -> anyhow::Result<()> {
    let site = Site::new()?;
    let mut aggregator = Aggregator::start(&site, "aggregator").await?;
    let agent = Agent::start(&site, "agent", "host-1", aggregator.quic_port, &AgentOptions::default()).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicU64::new(0));
    let writer = spawn_writer(agent.url.clone(), stop.clone(), accepted.clone(), Arc::new(AtomicU64::new(0)));

    let mut acked_before_kill = Vec::new();
    for _ in 0..5 {
        let wait = rand::rng().random_range(300..1500);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        acked_before_kill.push(aggregator.total().await.unwrap_or(0));
        aggregator.proc.kill9();
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(100..800))).await;
        aggregator.restart().await?;
        // Everything stored before the kill is still there after the restart (rebuilt from the log).
        let after = aggregator.total().await?;
        assert!(after >= *acked_before_kill.last().unwrap(), "lost records: {after} < {acked_before_kill:?}");
    }
    stop.store(true, Ordering::Relaxed);
    writer.await?;
    let accepted = accepted.load(Ordering::Relaxed);
    assert!(accepted > 1000, "the stream made progress ({accepted})");
    let total = aggregator.wait_total(accepted, Duration::from_secs(120)).await?;
    assert_eq!(total, accepted, "every accepted record stored exactly once");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_while_streaming_delivers_everything_it_accepted() -> anyhow::Result<()> {
    let site = Site::new()?;
    let aggregator = Aggregator::start(&site, "aggregator").await?;
    let mut agent = Agent::start(&site, "agent", "host-1", aggregator.quic_port, &AgentOptions::default()).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicU64::new(0));
    let next_id = Arc::new(AtomicU64::new(0));
    let writer = spawn_writer(agent.url.clone(), stop.clone(), accepted.clone(), next_id.clone());

    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(400..1200))).await;
        agent.proc.kill9();
        tokio::time::sleep(Duration::from_millis(200)).await;
        agent.restart().await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await?;
    let accepted = accepted.load(Ordering::Relaxed);
    assert!(accepted > 500, "the stream made progress ({accepted})");
    let total = aggregator.wait_total(accepted, Duration::from_secs(120)).await?;
    // Requests cut off by a kill may have reached the buffer without the client hearing 200: they arrive too,
    // so the store may hold more than was confirmed, but never fewer, and never a duplicate.
    assert!(total >= accepted, "lost records: stored {total}, accepted {accepted}");
    assert!(total <= next_id.load(Ordering::Relaxed));
    let stats = aggregator.stats().await?;
    assert_eq!(stats["systems"]["host-1"]["conversation"].as_u64(), Some(total));
    Ok(())
}
