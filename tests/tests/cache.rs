//! The query cache with a real Redis: answers are served from it, a write to a system invalidates that
//! system's answers, and Redis killed in the middle of a query load costs zero failed queries (the breaker
//! opens, queries bypass it); once Redis is back, the cache works again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use akosha_e2e::{Agent, AgentOptions, Aggregator, RedisServer, Site};
use anyhow::{Result, bail};
use serde_json::{Value, json};

async fn text_search(client: &reqwest::Client, agg: &Aggregator, query: &str) -> Result<(u16, String, Value)> {
    let response = client
        .post(format!("{}/v1/search/text", agg.url))
        .json(&json!({"query": query, "limit": 50, "system_id": "cache-host"}))
        .send()
        .await?;
    let status = response.status().as_u16();
    let cache = response.headers().get("x-akosha-cache").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    Ok((status, cache, response.json().await.unwrap_or(Value::Null)))
}

fn lines(range: std::ops::Range<u64>, word: &str) -> String {
    range
        .map(|i| json!({"id": format!("c{i}"), "kind": "conversation", "text": format!("{word} note {i} about topic{}", i % 10)}).to_string() + "\n")
        .collect()
}

async fn wait_searchable(agg: &Aggregator, records: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stats = agg.stats().await?;
        if stats["hot"]["indexed"].as_u64() >= Some(records) && stats["hot"]["index_pending"] == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("not searchable: {stats}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_cache_invalidates_on_writes_and_a_dead_redis_fails_no_query() -> Result<()> {
    let site = Site::new()?;
    let mut redis = RedisServer::start(&site).await?;
    let extra = format!("embeddings: {{enabled: false}}\ncache: {{redis_url: {}, ttl: 60s}}\n", redis.url());
    let agg = Aggregator::start_configured(&site, "aggregator", "", &extra).await?;
    let agent = Agent::start(&site, "agent", "cache-host", agg.quic_port, &AgentOptions::default()).await?;
    let (status, body, _) = agent.post(lines(0..200, "alpha")).await?;
    assert_eq!(status, 200, "{body}");
    agg.wait_total(200, Duration::from_secs(30)).await?;
    wait_searchable(&agg, 200).await?;
    let client = reqwest::Client::new();

    let (status, cache, first) = text_search(&client, &agg, "topic3").await?;
    assert_eq!((status, cache.as_str()), (200, "miss"), "{first}");
    assert_eq!(first["count"], 20);
    let (_, cache, again) = text_search(&client, &agg, "topic3").await?;
    assert_eq!(cache, "hit");
    assert_eq!(again["results"], first["results"]);

    // A write to the system makes its cached answers stale.
    let (status, _, _) = agent.post(lines(200..210, "beta")).await?;
    assert_eq!(status, 200);
    agg.wait_total(210, Duration::from_secs(30)).await?;
    wait_searchable(&agg, 210).await?;
    let (_, cache, fresh) = text_search(&client, &agg, "topic3").await?;
    assert_eq!((cache.as_str(), fresh["count"].as_u64()), ("miss", Some(21)), "{fresh}");

    // Query load; Redis is killed a second in.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut workers = Vec::new();
    for w in 0..4u64 {
        let (stop, ok, failed, client, url) =
            (stop.clone(), ok.clone(), failed.clone(), client.clone(), agg.url.clone());
        workers.push(tokio::spawn(async move {
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let response = client
                    .post(format!("{url}/v1/search/text"))
                    .json(&json!({"query": format!("topic{}", i % 10), "limit": 10, "system_id": "cache-host"}))
                    .send()
                    .await;
                match response {
                    Ok(r) if r.status().is_success() => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.proc.kill9();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await?;
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "{failed} of {} queries failed while Redis died", ok + failed);
    assert!(ok > 50, "the load ran: {ok} queries");
    let metrics = agg.metrics().await?;
    assert!(metrics.contains("akosha_cache_breaker_opened_total 1"), "{metrics}");
    assert!(metrics.contains("akosha_cache_breaker_open 1"), "{metrics}");
    let (status, cache, _) = text_search(&client, &agg, "topic4").await?;
    assert_eq!((status, cache.as_str()), (200, "bypass"));

    // Redis back: after the breaker's rest the cache serves again.
    redis.restart().await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, cache, _) = text_search(&client, &agg, "topic5").await?;
        assert_eq!(status, 200);
        if cache == "hit" {
            break;
        }
        if Instant::now() > deadline {
            bail!("the cache never came back: last {cache}; {}", agg.metrics().await?);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(agg.metrics().await?.contains("akosha_cache_breaker_open 0"));
    Ok(())
}
