//! Vector, text and hybrid search over the hot tier with real processes: records posted to an agent, searched
//! at the aggregator over HTTP, before and after the aggregator restarts (the indexes are rebuilt from the log).

use std::time::{Duration, Instant};

use akosha_e2e::{Agent, AgentOptions, Aggregator, Site};
use anyhow::{Result, bail};
use serde_json::{Value, json};

const SYSTEM: &str = "search-host";
const TOPICS: [&str; 5] = ["parser", "buffer", "certificate", "embedding", "compaction"];

/// A deterministic unit vector per record, clustered by topic so that neighbours share a topic.
fn embedding(i: u64) -> Vec<f32> {
    akosha_e2e::clustered_vector(i, 384, |d| d % 5 == (i % 5) as usize, 2.0)
}

fn line(i: u64, kind: &str, text: &str, project: &str, ts: i64) -> String {
    json!({
        "id": format!("m{i}"), "kind": kind, "ts": ts, "project": project, "text": text,
        "tags": [TOPICS[(i % 5) as usize]], "embedding": embedding(i),
    })
    .to_string()
}

fn corpus() -> String {
    (0..300u64)
        .map(|i| {
            let kind = if i % 2 == 0 { "conversation" } else { "reflection" };
            let project = if i % 3 == 0 { "akosha" } else { "web" };
            let text = format!(
                "note {i} about the {} subsystem: marker-{i} was observed while refactoring",
                TOPICS[(i % 5) as usize]
            );
            line(i, kind, &text, project, 1_700_000_000_000_000 + i as i64 * 1_000_000) + "\n"
        })
        .collect()
}

async fn search(agg: &Aggregator, mode: &str, body: Value) -> Result<(u16, Value)> {
    let response = reqwest::Client::new().post(format!("{}/v1/search/{mode}", agg.url)).json(&body).send().await?;
    Ok((response.status().as_u16(), response.json().await?))
}

fn ids(response: &Value) -> Vec<String> {
    response["results"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|h| h["record"]["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Whether the aggregator will find the embedding model where it looks by default; in CI (set up by
/// `scripts/setup.sh`) a missing model is a failure, elsewhere the test is skipped.
fn embedding_model_installed() -> bool {
    // The aggregator's default: $AKOSHA_MODEL_DIR, else ~/.akosha/models/all-MiniLM-L6-v2.
    let dir = std::env::var_os("AKOSHA_MODEL_DIR").map(std::path::PathBuf::from).unwrap_or_else(|| {
        std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".akosha/models/all-MiniLM-L6-v2")
    });
    if dir.join("model.safetensors").exists() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "embedding model missing at {} (run scripts/setup.sh)", dir.display());
    eprintln!("skipping: no embedding model at {}", dir.display());
    false
}

/// Waits until every record written to the hot tier is searchable.
async fn wait_indexed(agg: &Aggregator, records: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stats = agg.stats().await?;
        // Records older than the hot window live in warm after a restart: both tiers' indexes count.
        let indexed = stats["hot"]["indexed"].as_u64().unwrap_or(0) + stats["warm"]["indexed"].as_u64().unwrap_or(0);
        if indexed == records && stats["hot"]["index_pending"].as_u64() == Some(0) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("indexes did not catch up: {stats}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn check_queries(agg: &Aggregator) -> Result<()> {
    // The stored vector of m42 finds m42 first, with similarity 1, then its own topic.
    let (status, r) = search(agg, "vector", json!({"embedding": embedding(42), "limit": 5})).await?;
    assert_eq!(status, 200, "{r}");
    assert_eq!(ids(&r)[0], "m42", "{r}");
    assert!((r["results"][0]["similarity"].as_f64().unwrap() - 1.0).abs() < 1e-3, "{r}");
    assert!(r["results"][0]["record"].get("embedding").is_none(), "embeddings are not echoed");
    assert!(ids(&r).iter().all(|id| id[1..].parse::<u64>().unwrap() % 5 == 2), "same topic: {r}");
    // Filters: project, kind, system, time, tags, minimum similarity.
    let (_, r) = search(agg, "vector", json!({"embedding": embedding(42), "limit": 10, "project": "akosha"})).await?;
    assert!(ids(&r).iter().all(|id| id[1..].parse::<u64>().unwrap() % 3 == 0), "{r}");
    assert_eq!(ids(&r).len(), 10);
    let (_, r) =
        search(agg, "vector", json!({"embedding": embedding(42), "limit": 10, "kinds": ["reflection"]})).await?;
    assert!(ids(&r).iter().all(|id| id[1..].parse::<u64>().unwrap() % 2 == 1), "{r}");
    let (_, r) =
        search(agg, "vector", json!({"embedding": embedding(42), "limit": 10, "system_id": "someone-else"})).await?;
    assert!(ids(&r).is_empty(), "{r}");
    let (_, r) = search(
        agg,
        "vector",
        json!({"embedding": embedding(42), "limit": 50, "since": 1_700_000_100_000_000i64, "until": "2023-11-14T22:18:20Z"}),
    )
    .await?;
    // since = m100, until = 1_700_000_300 s = m300 (exclusive).
    assert!(!ids(&r).is_empty());
    assert!(ids(&r).iter().all(|id| (100..300).contains(&id[1..].parse::<u64>().unwrap())), "{r}");
    let (_, r) = search(agg, "vector", json!({"embedding": embedding(42), "limit": 50, "tags": ["buffer"]})).await?;
    assert!(ids(&r).iter().all(|id| id[1..].parse::<u64>().unwrap() % 5 == 1), "{r}");
    let (_, r) =
        search(agg, "vector", json!({"embedding": embedding(42), "limit": 50, "min_similarity": 0.99})).await?;
    assert_eq!(ids(&r), ["m42"], "{r}");

    // Text: the stored text's unique marker finds it first, highlighted.
    let (status, r) = search(agg, "text", json!({"query": "marker-42 refactoring", "limit": 5})).await?;
    assert_eq!(status, 200, "{r}");
    assert_eq!(ids(&r)[0], "m42", "{r}");
    assert!(r["results"][0]["snippet"]["html"].as_str().unwrap().contains("<b>42</b>"), "{r}");
    let (_, r) = search(agg, "text", json!({"query": "compaction", "limit": 100, "project": "web"})).await?;
    assert_eq!(ids(&r).len(), 40, "{r}");
    assert!(ids(&r).iter().all(|id| {
        let n = id[1..].parse::<u64>().unwrap();
        n % 5 == 4 && n % 3 != 0
    }));

    // Hybrid: agreeing on m42 puts it first.
    let (status, r) =
        search(agg, "hybrid", json!({"query": "marker-42", "embedding": embedding(42), "limit": 3})).await?;
    assert_eq!(status, 200, "{r}");
    assert_eq!(ids(&r)[0], "m42", "{r}");
    assert!(r["results"][0]["snippet"].is_object() && r["results"][0]["similarity"].is_number(), "{r}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vector_text_and_hybrid_search_with_filters_survive_a_restart() -> Result<()> {
    let site = Site::new()?;
    let mut agg = Aggregator::start(&site, "aggregator").await?;
    let agent = Agent::start(&site, "agent", SYSTEM, agg.quic_port, &AgentOptions::default()).await?;
    let (status, body, _) = agent.post(corpus()).await?;
    assert_eq!(status, 200, "{body}");
    agg.wait_total(300, Duration::from_secs(60)).await?;
    wait_indexed(&agg, 300).await?;
    check_queries(&agg).await?;

    // An upsert replaces the text and the vector of the same key.
    let newer = line(42, "conversation", "rewritten entirely: zebra crossing", "akosha", 1_800_000_000_000_000);
    let (status, body, _) = agent.post(newer + "\n").await?;
    assert_eq!(status, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, r) = search(&agg, "text", json!({"query": "zebra", "limit": 5})).await?;
        if ids(&r) == ["m42"] {
            break;
        }
        assert!(Instant::now() < deadline, "the new text never became searchable: {r}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, r) = search(&agg, "text", json!({"query": "marker-42", "limit": 5})).await?;
    assert!(!ids(&r).contains(&"m42".to_owned()), "old text still indexed: {r}");
    wait_indexed(&agg, 300).await?;

    // Restart: rebuilt from the write-ahead log, and the records older than the hot window (all but the
    // rewritten m42, dated in the future) move to warm at start-up: same answers from mixed tiers.
    agg.proc.kill9();
    agg.restart().await?;
    wait_indexed(&agg, 300).await?;
    let (_, r) = search(&agg, "text", json!({"query": "zebra", "limit": 5})).await?;
    assert_eq!(ids(&r), ["m42"], "{r}");
    let (_, r) = search(&agg, "vector", json!({"embedding": embedding(7), "limit": 1})).await?;
    assert_eq!(ids(&r), ["m7"], "{r}");
    let metrics = agg.metrics().await?;
    assert!(metrics.contains("akosha_hot_indexed_vectors 1\n"), "{metrics}");
    assert!(metrics.contains("akosha_warm_indexed_vectors 299\n"), "{metrics}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_search_requests_name_what_is_wrong() -> Result<()> {
    let site = Site::new()?;
    let agg = Aggregator::start(&site, "aggregator").await?;
    let cases = [
        ("vector", json!({"embedding": [0.5, 0.5]}), "384"),
        ("vector", json!({"limit": 3}), "give `embedding` or `query`"),
        ("text", json!({"query": "x", "limit": 0}), "`limit` must be between 1 and 1000"),
        ("text", json!({"query": "   "}), "`query` is empty"),
        ("text", json!({"query": "x", "kinds": ["memo"]}), "`kinds`"),
        ("text", json!({"query": "x", "since": "yesterday"}), "`since`"),
        ("text", json!({"query": "x", "filter": {}}), "unknown field `filter`"),
        ("hybrid", json!({"embedding": embedding(1)}), "`query` is required"),
        ("vector", json!({"embedding": [0.1], "min_similarity": 3}), "`min_similarity`"),
    ];
    for (mode, body, expected) in cases {
        let (status, r) = search(&agg, mode, body.clone()).await?;
        assert_eq!(status, 400, "{mode} {body}: {r}");
        assert_eq!(r["error"], "bad_request", "{r}");
        assert!(r["message"].as_str().unwrap().contains(expected), "{mode} {body}: {r}");
    }
    let response = reqwest::Client::new().post(format!("{}/v1/search/text", agg.url)).body("{not json").send().await?;
    assert_eq!(response.status().as_u16(), 400);
    // This aggregator runs without the embedding model: text cannot stand in for a vector, and it says why.
    let (status, r) = search(&agg, "vector", json!({"query": "x"})).await?;
    assert_eq!((status, r["error"].as_str()), (503, Some("unavailable")), "{r}");
    assert!(r["message"].as_str().unwrap().contains("embedding model"), "{r}");
    Ok(())
}

/// Search correctness on Session-Buddy's own data, with the in-process model: every conversation and reflection
/// of the fixture, searched by its own text, comes back first — by vector (the query embedded here must land on
/// the vector Session-Buddy stored), by text and hybrid; filters exclude what they should; a record that
/// arrives without an embedding is embedded in the background and found by meaning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixture_texts_find_their_own_records_first() -> Result<()> {
    if !embedding_model_installed() {
        return Ok(());
    }
    let site = Site::new()?;
    let agg = Aggregator::start_configured(&site, "aggregator", "", "").await?;
    let sb = site.session_buddy_data(&["reflection.duckdb"])?;
    let options = AgentOptions {
        sources: format!(
            "{{session_buddy: {{snapshots: true, data_dir: {}, interval: 1s, timezone: UTC}}}}",
            sb.display()
        ),
        ..AgentOptions::default()
    };
    let agent = Agent::start(&site, "agent", "edge-host-1", agg.quic_port, &options).await?;
    agg.wait_total(28, Duration::from_secs(60)).await?;
    wait_indexed(&agg, 28).await?;

    let copy = site.path("fixture-copy.duckdb");
    std::fs::copy(sb.join("reflection.duckdb"), &copy)?;
    let texts: Vec<(String, String, String)> = {
        let conn = duckdb::Connection::open(&copy)?;
        let mut out = Vec::new();
        for (table, kind) in [("conversations_v2", "conversation"), ("reflections_v2", "reflection")] {
            let mut stmt = conn.prepare(&format!("SELECT id, content FROM {table}"))?;
            let rows =
                stmt.query_map([], |row| Ok((kind.to_string(), row.get::<_, String>(0)?, row.get::<_, String>(1)?)))?;
            for row in rows {
                out.push(row?);
            }
        }
        out
    };
    assert_eq!(texts.len(), 28);
    let mut hot_answers = Vec::new();
    for (kind, id, content) in &texts {
        let (status, r) = search(&agg, "vector", json!({"query": content, "limit": 3})).await?;
        assert_eq!(status, 200, "{r}");
        assert_eq!(ids(&r).first(), Some(id), "vector search for {kind} {id}: {r}");
        assert!(r["results"][0]["similarity"].as_f64().unwrap() > 0.999, "{r}");
        let (_, h) = search(&agg, "hybrid", json!({"query": content, "limit": 3})).await?;
        assert_eq!(ids(&h).first(), Some(id), "hybrid search for {kind} {id}: {h}");
        hot_answers.push((ids(&r), ids(&h)));
        let (_, r) = search(&agg, "vector", json!({"query": content, "limit": 3, "kinds": [if kind == "conversation" { "reflection" } else { "conversation" }]})).await?;
        assert!(!ids(&r).contains(id), "the kind filter excludes {id}: {r}");
        let (_, r) = search(&agg, "vector", json!({"query": content, "system_id": "someone-else"})).await?;
        assert_eq!(r["count"], 0, "{r}");
    }
    // Everything to the warm tier: the same queries give the same ids from warm only.
    let moved: Value = reqwest::Client::new()
        .post(format!("{}/v1/admin/warm/move?older_than=0s", agg.url))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(moved["moved"], true, "{moved}");
    assert_eq!(agg.stats().await?["warm"]["records"], 28);
    for ((_, id, content), (vector, hybrid)) in texts.iter().zip(&hot_answers) {
        let (_, r) = search(&agg, "vector", json!({"query": content, "limit": 3})).await?;
        assert_eq!(&ids(&r), vector, "warm-only vector answer for {id}");
        assert_eq!(r["results"][0]["record"]["tier"], "warm");
        let (_, h) = search(&agg, "hybrid", json!({"query": content, "limit": 3})).await?;
        assert_eq!(&ids(&h), hybrid, "warm-only hybrid answer for {id}");
    }

    // A record without a vector: embedded in the background, then found by meaning, not by shared words.
    let line = json!({"id": "fresh", "kind": "reflection", "text": "Our cat Whiskers loves sleeping on the warm laptop keyboard every afternoon."});
    let (status, _, _) = agent.post(format!("{line}\n")).await?;
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, r) = search(&agg, "vector", json!({"query": "a pet kitten napping on a computer", "limit": 1})).await?;
        if ids(&r) == ["fresh"] {
            break;
        }
        if Instant::now() > deadline {
            bail!("the backfilled record was never found by meaning: {r}; stats {}", agg.stats().await?);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stats = agg.stats().await?;
    assert!(stats["embeddings"]["backfill_embedded"].as_u64() >= Some(1), "{stats}");
    Ok(())
}

/// `embeddings.endpoint`: an aggregator without the model embeds through another one's OpenAI-compatible
/// `/v1/embeddings` (bearer key included) — same vectors as the model, backfill and text queries work — and says
/// which endpoint failed when it goes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_embeddings_endpoint_stands_in_for_the_model() -> Result<()> {
    if !embedding_model_installed() {
        return Ok(());
    }
    let site = Site::new()?;
    let key = "remote-embeddings-key-0001";
    let mut embedder = Aggregator::start_configured(
        &site,
        "embedder",
        "",
        &format!("auth: {{tokens: [{{name: front, token: {key}, scopes: [read]}}]}}\n"),
    )
    .await?;
    let endpoint = format!("{}/v1/embeddings", embedder.url);
    let front = Aggregator::start_configured(
        &site,
        "front",
        "",
        &format!("embeddings: {{endpoint: '{endpoint}', api_key: {key}, timeout: 10s, batch_size: 8}}\n"),
    )
    .await?;
    let stats = front.stats().await?;
    assert_eq!(stats["embeddings"]["source"], endpoint.as_str(), "{stats}");

    // The front's vectors are the model's.
    let text = "how do I rotate the TLS certificates of an agent";
    let direct: Value = reqwest::Client::new()
        .post(&endpoint)
        .bearer_auth(key)
        .json(&json!({"input": text}))
        .send()
        .await?
        .json()
        .await?;
    let relayed: Value = reqwest::Client::new()
        .post(format!("{}/v1/embeddings", front.url))
        .json(&json!({"input": [text]}))
        .send()
        .await?
        .json()
        .await?;
    let vector = |v: &Value| -> Vec<f64> {
        v["data"][0]["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
    };
    let (a, b) = (vector(&direct), vector(&relayed));
    assert_eq!(a.len(), 384, "{direct}");
    let cosine: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    assert!(cosine > 0.99999, "cosine {cosine}");

    // Records without vectors are backfilled through the endpoint and found by meaning.
    let agent = Agent::start(&site, "agent", SYSTEM, front.quic_port, &AgentOptions::default()).await?;
    let lines = [
        json!({"id": "cat", "kind": "reflection", "text": "Our cat Whiskers loves sleeping on the warm laptop keyboard every afternoon."}),
        json!({"id": "tax", "kind": "reflection", "text": "Quarterly VAT returns are due at the end of the month."}),
    ];
    let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let (status, _, _) = agent.post(body).await?;
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, r) =
            search(&front, "vector", json!({"query": "a pet kitten napping on a computer", "limit": 1})).await?;
        assert_eq!(status, 200, "{r}");
        if ids(&r) == ["cat"] {
            break;
        }
        if Instant::now() > deadline {
            bail!("the backfilled record was never found by meaning: {r}; stats {}", front.stats().await?);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(front.stats().await?["embeddings"]["backfill_embedded"].as_u64() >= Some(2));

    // The endpoint gone: text queries fail with the endpoint named; vector queries still answer.
    embedder.proc.terminate(Duration::from_secs(10))?;
    let (status, r) = search(&front, "vector", json!({"query": "kitten", "limit": 1})).await?;
    assert_eq!(status, 503, "{r}");
    assert!(r["message"].as_str().unwrap().contains(&endpoint), "{r}");
    let (status, r) = search(&front, "text", json!({"query": "Whiskers", "limit": 1})).await?;
    assert_eq!((status, ids(&r)), (200, vec!["cat".to_owned()]), "{r}");
    Ok(())
}
