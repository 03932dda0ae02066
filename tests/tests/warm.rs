//! Hot → warm moves with a real aggregator: a move killed with `kill -9` between its copy and its deletion
//! loses and doubles nothing after the restart; the warm indexes answer like the hot ones did, so the same
//! queries give the same ids on hot-only and on mixed data.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use akosha_e2e::{Agent, AgentOptions, Aggregator, Site};
use anyhow::{Result, bail};
use serde_json::{Value, json};

const SYSTEM: &str = "warm-host";
const DAY_US: i64 = 86_400_000_000;

fn embedding(i: u64) -> Vec<f32> {
    akosha_e2e::clustered_vector(i, 384, |d| d == (i % 11) as usize, 3.0)
}

fn corpus(now_us: i64) -> String {
    (0..500u64)
        .map(|i| {
            // 400 from two days ago (to move), 100 from the last minutes.
            let ts = if i < 400 { now_us - 2 * DAY_US + i as i64 * 1_000_000 } else { now_us - i as i64 * 1_000_000 };
            let kind = if i % 2 == 0 { "conversation" } else { "reflection" };
            json!({"id": format!("w{i}"), "kind": kind, "ts": ts, "text": format!("entry {i} marker{i} about topic{}", i % 11),
                   "embedding": embedding(i)})
            .to_string()
                + "\n"
        })
        .collect()
}

async fn post(agg: &Aggregator, path: &str, body: Value) -> Result<Value> {
    Ok(reqwest::Client::new().post(format!("{}{path}", agg.url)).json(&body).send().await?.json().await?)
}

fn ids(r: &Value) -> Vec<String> {
    r["results"].as_array().into_iter().flatten().map(|h| h["record"]["id"].as_str().unwrap_or("").to_owned()).collect()
}

/// A fixed set of queries: vector neighbours of a few records, text searches, each as ordered ids.
async fn answers(agg: &Aggregator) -> Result<Vec<Vec<String>>> {
    let mut out = Vec::new();
    for i in [3u64, 77, 250, 399, 420] {
        out.push(ids(&post(agg, "/v1/search/vector", json!({"embedding": embedding(i), "limit": 10})).await?));
    }
    for q in ["topic4", "marker12", "topic0 entry"] {
        // Limits above the match counts: equal BM25 scores at a cut-off would make any top-k arbitrary.
        let mut found = ids(&post(agg, "/v1/search/text", json!({"query": q, "limit": 1000})).await?);
        found.sort();
        out.push(found);
    }
    Ok(out)
}

async fn all_ids(agg: &Aggregator) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for kind in ["conversation", "reflection"] {
        let mut cursor: Option<String> = None;
        loop {
            let mut url = format!("{}/v1/records?kind={kind}&limit=77", agg.url);
            if let Some(c) = &cursor {
                url.push_str(&format!("&cursor={c}"));
            }
            let page: Value = reqwest::get(url).await?.json().await?;
            out.extend(page["records"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap().to_owned()));
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => break,
            }
        }
    }
    Ok(out)
}

async fn wait_searchable(agg: &Aggregator) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = agg.stats().await?;
        if s["hot"]["index_pending"] == 0 && s["hot"]["pending"] == 0 && s["total_records"] == 500 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("never settled: {s}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_killed_midway_loses_and_doubles_nothing() -> Result<()> {
    let site = Site::new()?;
    let extra = "embeddings: {enabled: false}\ncache: {enabled: false}\nwarm: {hot_window: 1d, move_interval: 1h}\n";
    let pause = vec![("AKOSHA_FAULT_WARM_PAUSE_AFTER_COPY_MS".to_string(), "60000".to_string())];
    let mut agg = Aggregator::start_full(&site, "aggregator", "", extra, pause).await?;
    let agent = Agent::start(&site, "agent", SYSTEM, agg.quic_port, &AgentOptions::default()).await?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_micros() as i64;
    let (status, body, _) = agent.post(corpus(now)).await?;
    assert_eq!(status, 200, "{body}");
    agg.wait_total(500, Duration::from_secs(60)).await?;
    wait_searchable(&agg).await?;
    let hot_only = answers(&agg).await?;
    assert_eq!(agg.stats().await?["warm"]["records"], 0);

    // The move copies the conversations to warm, then stalls (fault injection) before deleting them from hot.
    let url = agg.url.clone();
    let mover =
        tokio::spawn(async move { reqwest::Client::new().post(format!("{url}/v1/admin/warm/move")).send().await });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = agg.stats().await?;
        if s["warm"]["journal"].as_array().is_some_and(|j| j.iter().any(|m| m["state"] == "copied")) {
            // Read again: the counts above may predate the commit the journal already shows.
            let s = agg.stats().await?;
            assert_eq!(s["warm"]["records"], 200, "the conversations are copied: {s}");
            break;
        }
        if Instant::now() > deadline {
            bail!("the move never reached its copy: {s}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agg.proc.kill9();
    let _ = mover.await;

    agg.proc.set_env(vec![]);
    agg.restart().await?;
    let s = agg.stats().await?;
    assert_eq!(s["total_records"], 500, "{s}");
    assert_eq!((s["warm"]["records"].as_u64(), s["hot"]["records"].as_u64()), (Some(400), Some(100)), "{s}");
    assert_eq!(s["warm"]["interrupted_at_start"], 1, "{s}");
    assert_eq!(s["warm"]["indexed"], 400, "{s}");
    let journal = s["warm"]["journal"].as_array().unwrap();
    assert!(journal.iter().any(|m| m["state"] == "interrupted"), "{journal:?}");
    assert_eq!(journal.iter().filter(|m| m["state"] == "done").count(), 2, "{journal:?}");

    let ids = all_ids(&agg).await?;
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!((ids.len(), unique.len()), (500, 500), "every record once across the tiers");
    wait_searchable(&agg).await?;
    assert_eq!(answers(&agg).await?, hot_only, "the same ids from mixed tiers after the crash");
    let one = post(&agg, "/v1/search/text", json!({"query": "marker7", "limit": 10})).await?;
    assert_eq!(one["count"], 1, "no duplicate in the indexes: {one}");
    assert_eq!(one["results"][0]["record"]["tier"], "warm");

    // Everything warm: still the same answers.
    let r: Value = reqwest::Client::new()
        .post(format!("{}/v1/admin/warm/move?older_than=0s", agg.url))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(r["moved"], true, "{r}");
    assert_eq!(agg.stats().await?["hot"]["records"], 0);
    assert_eq!(answers(&agg).await?, hot_only, "the same ids from warm only");
    Ok(())
}
