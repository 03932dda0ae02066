//! The cold tier against a real S3 server (SeaweedFS): records spread over 400 days land hot, warm and cold as
//! the policy says and answer exactly like a hot-only copy; a warm→cold move killed with `kill -9` after its
//! upload loses, doubles and leaves behind nothing; an S3 outage pauses moves without touching warm or the
//! queries over hot and warm.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use akosha_e2e::s3::{ACCESS_KEY, S3Server, SECRET_KEY};
use akosha_e2e::{Agent, AgentOptions, Aggregator, Site};
use anyhow::{Result, bail};
use futures_util::TryStreamExt;
use serde_json::{Value, json};

const SYSTEM: &str = "cold-host";
const HOUR_US: i64 = 3_600_000_000;
/// Records, one every 60 hours: 400 days back.
const RECORDS: u64 = 160;

fn embedding(i: u64) -> Vec<f32> {
    akosha_e2e::clustered_vector(i, 384, |d| d == (i % 11) as usize, 3.0)
}

fn corpus(now_us: i64) -> String {
    (0..RECORDS)
        .map(|i| {
            let kind = if i % 2 == 0 { "conversation" } else { "reflection" };
            json!({"id": format!("c{i}"), "kind": kind, "ts": now_us - i as i64 * 60 * HOUR_US,
                   "project": format!("p{}", i % 3), "tags": [format!("t{}", i % 4)],
                   "text": format!("entry {i} marker{i} about topic{}", i % 11), "embedding": embedding(i)})
            .to_string()
                + "\n"
        })
        .collect()
}

/// Warm and cold on the S3 server; moves only when asked.
fn tiered_config(s3: &S3Server) -> String {
    tiered_config_with(s3, "")
}

/// [`tiered_config`] with more `cold:` settings (flow-mapping entries ending in a comma).
fn tiered_config_with(s3: &S3Server, cold_extra: &str) -> String {
    format!(
        "embeddings: {{enabled: false}}\ncache: {{enabled: false}}\nwarm: {{hot_window: 7d, move_interval: 1h}}\n\
         cold: {{url: 's3://cold/akosha', warm_window: 90d, move_interval: 1h, breaker_failures: 2, breaker_cooldown: 5s, \
         retry_timeout: 2s, {cold_extra} options: {{endpoint: '{}', allow_http: 'true', access_key_id: '{ACCESS_KEY}', \
         secret_access_key: '{SECRET_KEY}', region: us-east-1}}}}\n",
        s3.endpoint
    )
}

const HOT_ONLY: &str = "embeddings: {enabled: false}\ncache: {enabled: false}\nwarm: {enabled: false}\n";

async fn post(agg: &Aggregator, path: &str, body: Value) -> Result<Value> {
    Ok(reqwest::Client::new().post(format!("{}{path}", agg.url)).json(&body).send().await?.json().await?)
}

async fn admin(agg: &Aggregator, path: &str) -> Result<(u16, Value)> {
    let response = reqwest::Client::new().post(format!("{}{path}", agg.url)).send().await?;
    Ok((response.status().as_u16(), response.json().await?))
}

fn ids(r: &Value) -> Vec<String> {
    r["results"].as_array().into_iter().flatten().map(|h| h["record"]["id"].as_str().unwrap_or("").to_owned()).collect()
}

/// Every record id, page by page, optionally within a time range.
async fn listed(agg: &Aggregator, range: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for kind in ["conversation", "reflection"] {
        let mut cursor: Option<String> = None;
        loop {
            let mut url = format!("{}/v1/records?kind={kind}&limit=37{range}", agg.url);
            if let Some(c) = &cursor {
                url.push_str(&format!("&cursor={c}"));
            }
            let page: Value = reqwest::get(url).await?.json().await?;
            let Some(records) = page["records"].as_array() else { bail!("not a page: {page}") };
            out.extend(records.iter().map(|r| r["id"].as_str().unwrap_or("").to_owned()));
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => break,
            }
        }
    }
    Ok(out)
}

/// A fixed set of queries spanning the tiers, each as ids (ordered where the ranking is exact).
async fn answers(agg: &Aggregator, now_us: i64) -> Result<Vec<Vec<String>>> {
    let mut out = Vec::new();
    for i in [0u64, 20, 64, 150] {
        out.push(ids(&post(agg, "/v1/search/vector", json!({"embedding": embedding(i), "limit": 10})).await?));
    }
    let filtered = json!({"embedding": embedding(99), "limit": 5, "tags": ["t1"], "project": "p0",
                          "since": now_us - 200 * 24 * HOUR_US});
    out.push(ids(&post(agg, "/v1/search/vector", filtered).await?));
    for q in ["topic4", "marker130", "topic0 entry"] {
        // Limits above the match counts: tied scores at a cut-off would make any top-k arbitrary.
        let mut found = ids(&post(agg, "/v1/search/text", json!({"query": q, "limit": 1000})).await?);
        found.sort();
        out.push(found);
    }
    out.push(listed(agg, "").await?);
    let range = format!("&since={}&until={}", now_us - 300 * 24 * HOUR_US, now_us - 50 * 24 * HOUR_US);
    out.push(listed(agg, &range).await?);
    Ok(out)
}

async fn wait_searchable(agg: &Aggregator, total: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = agg.stats().await?;
        if s["hot"]["index_pending"] == 0 && s["hot"]["pending"] == 0 && s["total_records"] == total {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("never settled: {s}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn bucket_keys(s3: &S3Server) -> Result<BTreeSet<String>> {
    let store = s3.bucket("cold")?;
    let listed: Vec<object_store::ObjectMeta> = store.list(None).try_collect().await?;
    Ok(listed.into_iter().map(|m| m.location.to_string()).collect())
}

fn tiers(s: &Value) -> (u64, u64, u64) {
    let n = |v: &Value| v.as_u64().unwrap_or(u64::MAX);
    (n(&s["hot"]["records"]), n(&s["warm"]["records"]), n(&s["cold"]["records"]))
}

/// Hot: the last 7 days (records 0..=2); warm: up to 90 days (3..=35); cold: the rest.
const EXPECTED_TIERS: (u64, u64, u64) = (3, 33, 124);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_hundred_days_land_in_three_tiers_answer_like_hot_only_and_survive_a_kill_mid_move() -> Result<()> {
    let site = Site::new()?;
    let s3 = S3Server::start(&site.path("s3"), &["cold"]).await?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_micros() as i64;

    let reference = Aggregator::start_configured(&site, "hot-only", "", HOT_ONLY).await?;
    let reference_agent =
        Agent::start(&site, "ref-agent", SYSTEM, reference.quic_port, &AgentOptions::default()).await?;
    let pause = vec![("AKOSHA_FAULT_COLD_PAUSE_AFTER_UPLOAD_MS".to_string(), "60000".to_string())];
    let mut agg = Aggregator::start_full(&site, "tiered", "", &tiered_config(&s3), pause).await?;
    let agent = Agent::start(&site, "agent", SYSTEM, agg.quic_port, &AgentOptions::default()).await?;
    for a in [&reference_agent, &agent] {
        let (status, body, _) = a.post(corpus(now)).await?;
        assert_eq!(status, 200, "{body}");
    }
    wait_searchable(&reference, RECORDS).await?;
    wait_searchable(&agg, RECORDS).await?;
    let expected = answers(&reference, now).await?;
    assert!(expected.iter().all(|a| !a.is_empty()), "{expected:?}");

    // Hot → warm, then warm → cold, which stalls (fault injection) right after its first verified upload.
    let (status, r) = admin(&agg, "/v1/admin/warm/move").await?;
    assert_eq!(status, 200, "{r}");
    let url = agg.url.clone();
    let mover =
        tokio::spawn(async move { reqwest::Client::new().post(format!("{url}/v1/admin/cold/move")).send().await });
    let deadline = Instant::now() + Duration::from_secs(60);
    while bucket_keys(&s3).await?.is_empty() {
        if Instant::now() > deadline {
            bail!("no upload happened: {}", agg.proc.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agg.proc.kill9();
    let _ = mover.await;

    // Restart: the interrupted move's object is deleted, warm still holds every row; nothing is doubled.
    agg.proc.set_env(vec![]);
    agg.restart().await?;
    let s = agg.stats().await?;
    assert!(s["cold"]["interrupted_at_start"].as_u64() > Some(0), "{s}");
    assert_eq!(tiers(&s), (EXPECTED_TIERS.0, EXPECTED_TIERS.1 + EXPECTED_TIERS.2, 0), "{s}");
    assert!(bucket_keys(&s3).await?.is_empty(), "the interrupted upload was removed");

    let (status, r) = admin(&agg, "/v1/admin/cold/move").await?;
    assert_eq!(status, 200, "{r}");
    let s = agg.stats().await?;
    assert_eq!(tiers(&s), EXPECTED_TIERS, "{s}");
    assert_eq!(s["total_records"], RECORDS, "{s}");
    let keys = bucket_keys(&s3).await?;
    assert_eq!(keys.len() as u64, s["cold"]["objects"].as_u64().unwrap_or(0), "the catalog matches the bucket: {s}");
    // SeaweedFS, like S3, refuses a body that does not match its declared sha256 (the aggregator's probe found
    // out): uploads are verified by the store, neither hashed again nor read back.
    assert_eq!(
        (
            s["cold"]["uploads_verified_by_checksum"].as_u64(),
            s["cold"]["uploads_verified_by_etag"].as_u64(),
            s["cold"]["uploads_read_back"].as_u64()
        ),
        (Some(keys.len() as u64), Some(0), Some(0)),
        "{s}"
    );
    assert!(
        keys.iter()
            .all(|k| k.starts_with("akosha/kind=") && k.contains("/system=cold-host/date=") && k.ends_with(".parquet")),
        "{keys:?}"
    );
    assert_eq!(answers(&agg, now).await?, expected, "the same ids from three tiers as from hot only");
    let one: Value = reqwest::get(format!("{}/v1/records/{SYSTEM}/reflection/c151", agg.url)).await?.json().await?;
    assert_eq!((one["tier"].as_str(), one["text"].as_str()), (Some("cold"), Some("entry 151 marker151 about topic8")));

    // Another restart (a clean one): the log does not bring cold records back into hot or warm.
    agg.proc.terminate(Duration::from_secs(30))?;
    agg.restart().await?;
    let s = agg.stats().await?;
    assert_eq!(tiers(&s), EXPECTED_TIERS, "{s}");
    let listed_ids = listed(&agg, "").await?;
    let unique: BTreeSet<&String> = listed_ids.iter().collect();
    assert_eq!((listed_ids.len() as u64, unique.len() as u64), (RECORDS, RECORDS), "every record once");
    let (status, r) = admin(&agg, "/v1/admin/cold/move").await?;
    assert_eq!((status, &r["moved"]), (200, &json!(false)), "nothing left to move: {r}");
    assert_eq!(bucket_keys(&s3).await?.len(), keys.len());
    let lifecycle: Value = reqwest::get(format!("{}/v1/lifecycle", agg.url)).await?.json().await?;
    assert_eq!(lifecycle["warm_to_cold"]["records_due"], 0, "{lifecycle}");
    assert_eq!((&lifecycle["warm_to_cold"]["running"], &lifecycle["warm_to_cold"]["failed"]), (&json!(0), &json!(0)));

    // The storage report adds up to the tiers and the bucket, priced per GiB and month.
    let report: Value = reqwest::get(format!("{}/v1/stats/storage", agg.url)).await?.json().await?;
    let tier = |t: &str, field: &str| report["tiers"][t][field].as_u64().unwrap_or(u64::MAX);
    assert_eq!((tier("hot", "records"), tier("warm", "records"), tier("cold", "records")), EXPECTED_TIERS, "{report}");
    assert_eq!(tier("cold", "objects"), keys.len() as u64, "{report}");
    assert!(
        tier("cold", "bytes") > 0 && tier("warm", "bytes") > 0 && report["local"]["wal"]["bytes"].as_u64() > Some(0)
    );
    let cold_cost = report["tiers"]["cold"]["monthly_cost"].as_f64().unwrap_or(-1.0);
    let expected_cost = tier("cold", "bytes") as f64 / f64::from(1u32 << 30) * 0.023;
    assert!((cold_cost - expected_cost).abs() < 0.0001, "{report}");
    assert_eq!(report["currency"], "USD");
    // Default thresholds (75 % / 90 %): the verdict and the status code follow the disk's real use.
    let response = reqwest::get(format!("{}/health/warm", agg.url)).await?;
    let code = response.status().as_u16();
    let health: Value = response.json().await?;
    let used = health["used_percent"].as_f64().unwrap_or(-1.0);
    let verdict = if used >= 90.0 {
        "critical"
    } else if used >= 75.0 {
        "warning"
    } else {
        "ok"
    };
    assert_eq!((health["status"].as_str(), code), (Some(verdict), if verdict == "critical" { 503 } else { 200 }));
    assert!(health["warm_bytes"].as_u64() > Some(0), "{health}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_outage_pauses_moves_and_keeps_warm_whole_and_queries_answering() -> Result<()> {
    let site = Site::new()?;
    let mut s3 = S3Server::start(&site.path("s3"), &["cold"]).await?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_micros() as i64;
    // Thresholds any disk is above: /health/warm reports critical (and 503) while everything else serves.
    let config = tiered_config(&s3) + "storage: {disk_warning: '0.001%', disk_critical: '0.002%'}\n";
    let agg = Aggregator::start_configured(&site, "tiered", "", &config).await?;
    let agent = Agent::start(&site, "agent", SYSTEM, agg.quic_port, &AgentOptions::default()).await?;
    let (status, body, _) = agent.post(corpus(now)).await?;
    assert_eq!(status, 200, "{body}");
    wait_searchable(&agg, RECORDS).await?;
    let response = reqwest::get(format!("{}/health/warm", agg.url)).await?;
    assert_eq!(response.status().as_u16(), 503);
    let health: Value = response.json().await?;
    assert_eq!(
        (health["status"].as_str(), health["critical_percent"].as_f64()),
        (Some("critical"), Some(0.002)),
        "{health}"
    );
    let (status, _) = admin(&agg, "/v1/admin/warm/move").await?;
    assert_eq!(status, 200);

    s3.proc.kill9();
    for _ in 0..2 {
        let (status, r) = admin(&agg, "/v1/admin/cold/move").await?;
        assert_eq!(status, 503, "{r}");
    }
    let s = agg.stats().await?;
    assert_eq!(tiers(&s), (EXPECTED_TIERS.0, EXPECTED_TIERS.1 + EXPECTED_TIERS.2, 0), "warm keeps everything: {s}");
    assert_eq!(s["cold"]["circuit_open"], true, "{s}");
    let lifecycle: Value = reqwest::get(format!("{}/v1/lifecycle", agg.url)).await?.json().await?;
    assert!(lifecycle["warm_to_cold"]["failed"].as_u64() > Some(0), "{lifecycle}");
    assert_eq!(lifecycle["warm_to_cold"]["records_due"], EXPECTED_TIERS.2, "{lifecycle}");
    // Hot and warm answer meanwhile.
    let hits = post(&agg, "/v1/search/vector", json!({"embedding": embedding(64), "limit": 3})).await?;
    assert_eq!(ids(&hits)[0], "c64", "{hits}");
    assert_eq!(listed(&agg, "").await?.len() as u64, RECORDS);

    // The store comes back: after the breaker's cool-down the next move goes through.
    s3.proc.start()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, r) = admin(&agg, "/v1/admin/cold/move").await?;
        if status == 200 {
            assert_eq!(r["report"]["records"], EXPECTED_TIERS.2, "{r}");
            break;
        }
        if Instant::now() > deadline {
            bail!("moves never resumed: {r}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let s = agg.stats().await?;
    assert_eq!(tiers(&s), EXPECTED_TIERS, "{s}");
    assert_eq!(bucket_keys(&s3).await?.len() as u64, s["cold"]["objects"].as_u64().unwrap_or(0));
    let hits = post(&agg, "/v1/search/vector", json!({"embedding": embedding(150), "limit": 1})).await?;
    assert_eq!((ids(&hits)[0].as_str(), hits["results"][0]["record"]["tier"].as_str()), ("c150", Some("cold")));
    Ok(())
}

/// An aggregator on `config` with the 400-day corpus ingested through an agent and moved into all three tiers.
async fn three_tiers(site: &Site, config: &str, envs: Vec<(String, String)>, now: i64) -> Result<(Aggregator, Agent)> {
    let agg = Aggregator::start_full(site, "tiered", "", config, envs).await?;
    let agent = Agent::start(site, "agent", SYSTEM, agg.quic_port, &AgentOptions::default()).await?;
    let (status, body, _) = agent.post(corpus(now)).await?;
    assert_eq!(status, 200, "{body}");
    wait_searchable(&agg, RECORDS).await?;
    for path in ["/v1/admin/warm/move", "/v1/admin/cold/move"] {
        let (status, r) = admin(&agg, path).await?;
        assert_eq!(status, 200, "{r}");
    }
    Ok((agg, agent))
}

async fn count_listed(agg: &Aggregator) -> Result<u64> {
    Ok(listed(agg, "").await?.len() as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletions_reach_every_tier_survive_a_crash_spare_later_records_and_are_audited() -> Result<()> {
    let site = Site::new()?;
    let s3 = S3Server::start(&site.path("s3"), &["cold"]).await?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_micros() as i64;
    let (mut agg, agent) = three_tiers(&site, &tiered_config(&s3), vec![], now).await?;
    assert_eq!(tiers(&agg.stats().await?), EXPECTED_TIERS);
    let delete = |body: Value| {
        let url = format!("{}/v1/admin/delete", agg.url);
        async move {
            let response = reqwest::Client::new().post(url).json(&body).send().await?;
            Ok::<_, anyhow::Error>((response.status().as_u16(), response.json::<Value>().await?))
        }
    };

    // Requests that do not say clearly what to delete, or why, are refused and delete nothing.
    for bad in [
        json!({"reason": "everything"}),
        json!({"system_id": SYSTEM, "id": "c1", "reason": "no kind"}),
        json!({"system_id": SYSTEM}),
        json!({"system_id": SYSTEM, "kind": "photo", "reason": "x"}),
        json!({"system_id": SYSTEM, "reason": "x", "colour": "red"}),
    ] {
        let (status, r) = delete(bad.clone()).await?;
        assert_eq!(status, 400, "{bad} → {r}");
    }
    assert_eq!(count_listed(&agg).await?, RECORDS);

    // One cold record by id: hidden at once from lookups, listings and searches.
    let (status, r) =
        delete(json!({"system_id": SYSTEM, "kind": "reflection", "id": "c151", "reason": "ticket 1"})).await?;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["deleted"], json!({"hot": 0, "warm": 0, "cold_tombstones": 1}), "{r}");
    let one = reqwest::get(format!("{}/v1/records/{SYSTEM}/reflection/c151", agg.url)).await?;
    assert_eq!(one.status().as_u16(), 404);
    assert!(ids(&post(&agg, "/v1/search/text", json!({"query": "marker151", "limit": 10})).await?).is_empty());
    let hits = post(&agg, "/v1/search/vector", json!({"embedding": embedding(151), "limit": 200})).await?;
    assert!(!ids(&hits).contains(&"c151".to_owned()), "{hits}");
    assert_eq!(count_listed(&agg).await?, RECORDS - 1);

    // A whole project, across hot, warm and cold; cold objects rewritten before the answer.
    let in_p0 = |i: u64| i.is_multiple_of(3);
    let count = |range: std::ops::RangeInclusive<u64>| range.filter(|&i| in_p0(i)).count() as u64;
    let (status, r) = delete(json!({"project": "p0", "reason": "retention", "compact_now": true})).await?;
    assert_eq!(status, 200, "{r}");
    assert_eq!(
        (r["deleted"]["hot"].as_u64(), r["deleted"]["warm"].as_u64()),
        (Some(count(0..=2)), Some(count(3..=35)))
    );
    assert!(r["compaction"]["erased_groups"].as_u64() > Some(0), "{r}");
    let p0 = count(0..=RECORDS - 1);
    let left = RECORDS - 1 - p0;
    let s = agg.stats().await?;
    assert_eq!(s["total_records"], left, "{s}");
    let cold_left = (36..RECORDS).filter(|&i| !in_p0(i) && i != 151).count() as u64;
    assert_eq!(s["cold"]["records"], cold_left, "the rewritten objects no longer hold the rows: {s}");
    assert_eq!(bucket_keys(&s3).await?.len() as u64, s["cold"]["objects"].as_u64().unwrap_or(0), "{s}");
    let found =
        post(&agg, "/v1/search/vector", json!({"embedding": embedding(0), "limit": 200, "project": "p0"})).await?;
    assert!(ids(&found).is_empty(), "{found}");

    // A record of that project arriving afterwards is kept; a crash and a replay of the log bring nothing back.
    let later = json!({"id": "late", "kind": "conversation", "ts": now, "project": "p0", "text": "after the deletion"});
    let (status, body, _) = agent.post(format!("{later}\n")).await?;
    assert_eq!(status, 200, "{body}");
    wait_searchable(&agg, left + 1).await?;
    agg.proc.kill9();
    agg.restart().await?;
    wait_searchable(&agg, left + 1).await?;
    let ids_now = listed(&agg, "").await?;
    assert_eq!(ids_now.len() as u64, left + 1);
    assert!(
        ids_now.contains(&"late".to_owned())
            && !ids_now.contains(&"c0".to_owned())
            && !ids_now.contains(&"c151".to_owned())
    );

    // The audit log: requested and completed per deletion, reasons and actors kept, the chain intact.
    let audit: Value = reqwest::get(format!("{}/v1/admin/audit", agg.url)).await?.json().await?;
    assert_eq!(audit["chain"], json!({"entries": 4, "broken": null}), "{audit}");
    let actions: Vec<&str> =
        audit["entries"].as_array().into_iter().flatten().filter_map(|e| e["action"].as_str()).collect();
    assert_eq!(actions, ["delete.completed", "delete.requested", "delete.completed", "delete.requested"]);
    assert_eq!(audit["entries"][1]["reason"], "retention");
    assert_eq!(audit["entries"][3]["selector"], json!({"system_id": SYSTEM, "kind": "reflection", "id": "c151"}));
    Ok(())
}

/// Runs the aggregator's command line against `agg`'s configuration.
async fn cli(site: &Site, name: &str, args: &[&str]) -> Result<std::process::Output> {
    let mut command = std::process::Command::new(akosha_e2e::binary("akosha-aggregator"));
    command.arg("--config").arg(site.path(name).join("aggregator.yaml")).args(args);
    Ok(tokio::task::spawn_blocking(move || command.output()).await??)
}

/// Everything an aggregator keeps under its data directory, except its configuration and log.
fn wipe(site: &Site, name: &str) -> Result<()> {
    for entry in std::fs::read_dir(site.path(name))? {
        let path = entry?.path();
        if path.file_name().is_some_and(|n| n == "aggregator.yaml" || n == "aggregator.log") {
            continue;
        }
        if path.is_dir() { std::fs::remove_dir_all(&path)? } else { std::fs::remove_file(&path)? }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_wipe_restore_answers_identically_and_a_corrupt_backup_is_refused() -> Result<()> {
    let site = Site::new()?;
    let s3 = S3Server::start(&site.path("s3"), &["cold", "backups"]).await?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_micros() as i64;
    let (mut agg, mut agent) = three_tiers(&site, &tiered_config(&s3), vec![], now).await?;
    // A deletion whose cold rows are only tombstoned yet: the restore must keep them erased.
    let r =
        post(&agg, "/v1/admin/delete", json!({"system_id": SYSTEM, "kind": "reflection", "id": "c151", "reason": "t"}))
            .await?;
    assert_eq!(r["deleted"]["cold_tombstones"], 1, "{r}");
    let expected = answers(&agg, now).await?;
    let expected_stats = agg.stats().await?;
    assert_eq!(tiers(&expected_stats), (EXPECTED_TIERS.0, EXPECTED_TIERS.1, EXPECTED_TIERS.2 - 1));
    let total = expected_stats["total_records"].as_u64().unwrap_or(0);

    let s3_options = |url: &str| {
        vec![
            url.to_owned(),
            "-o".into(),
            format!("endpoint={}", s3.endpoint),
            "-o".into(),
            "allow_http=true".into(),
            "-o".into(),
            format!("access_key_id={ACCESS_KEY}"),
            "-o".into(),
            format!("secret_access_key={SECRET_KEY}"),
            "-o".into(),
            "region=us-east-1".into(),
        ]
    };
    let backup = |extra: Vec<String>| {
        let mut args = vec!["backup".to_owned()];
        args.extend(s3_options("s3://backups/site"));
        args.extend(extra);
        args
    };
    let run = |args: Vec<String>| {
        let site = &site;
        async move {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            cli(site, "tiered", &refs).await
        }
    };
    let out = run(backup(vec![])).await?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("backup ") && stdout.contains(" cold objects"), "{stdout}");
    let between = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_micros() as i64;

    // A record after the first backup, and a second backup with it: `--at` picks the first.
    let later = json!({"id": "after-backup", "kind": "conversation", "ts": now, "text": "not in the first backup"});
    let (status, body, _) = agent.post(format!("{later}\n")).await?;
    assert_eq!(status, 200, "{body}");
    wait_searchable(&agg, total + 1).await?;
    let out = run(backup(vec![])).await?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(backup(vec!["--list".into(), "--json".into()])).await?;
    let listed_backups: Value = serde_json::from_slice(&out.stdout)?;
    let manifests = listed_backups.as_array().cloned().unwrap_or_default();
    assert_eq!(manifests.len(), 2, "{listed_backups}");
    let first = &manifests[0];
    let objects = first["cold_objects"].as_array().map_or(0, Vec::len);
    assert_eq!(objects as u64, expected_stats["cold"]["objects"].as_u64().unwrap_or(0), "{first}");
    let names: Vec<&str> = first["files"].as_array().into_iter().flatten().filter_map(|f| f["path"].as_str()).collect();
    assert!(names.contains(&"warm.duckdb") && names.contains(&"audit/audit.jsonl"), "{names:?}");
    assert!(names.iter().any(|n| n.starts_with("wal/")) && names.iter().any(|n| n.starts_with("warm-indexes/")));
    // Cold objects are stored once for both backups.
    let stored: Vec<object_store::ObjectMeta> =
        s3.bucket("backups")?.list(Some(&"site/objects".into())).try_collect().await?;
    assert_eq!(stored.len(), objects);

    // Wipe the aggregator and the cold bucket, restore the first backup, start: the same answers.
    agent.proc.terminate(Duration::from_secs(30))?;
    agg.proc.terminate(Duration::from_secs(30))?;
    wipe(&site, "tiered")?;
    let cold = s3.bucket("cold")?;
    for meta in cold.list(None).try_collect::<Vec<_>>().await? {
        cold.delete(&meta.location).await?;
    }
    let mut args = vec!["restore".to_owned()];
    args.extend(s3_options("s3://backups/site"));
    args.extend(["--at".into(), between.to_string()]);
    let out = run(args.clone()).await?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("restored backup {}", first["id"].as_str().unwrap_or("?"))), "{stdout}");
    // A second restore over the restored data is refused: a restore replaces, it does not merge.
    let out = run(args.clone()).await?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"), "{}", String::from_utf8_lossy(&out.stderr));

    agg.restart().await?;
    wait_searchable(&agg, total).await?;
    let s = agg.stats().await?;
    assert_eq!(tiers(&s), tiers(&expected_stats), "{s}");
    assert_eq!(answers(&agg, now).await?, expected, "the restored aggregator answers as the original did");
    assert!(agg.record(SYSTEM, "conversation", "after-backup").await?.is_none(), "taken after the chosen backup");
    assert!(agg.record(SYSTEM, "reflection", "c151").await?.is_none(), "erased before the backup");
    assert_eq!(bucket_keys(&s3).await?.len() as u64, s["cold"]["objects"].as_u64().unwrap_or(0), "{s}");

    // A corrupted backup file is caught by its checksum, and nothing is installed.
    agg.proc.terminate(Duration::from_secs(30))?;
    wipe(&site, "tiered")?;
    let id = first["id"].as_str().unwrap_or_default();
    let key = object_store::path::Path::from(format!("site/backups/{id}/files/audit/audit.jsonl"));
    let backups = s3.bucket("backups")?;
    let mut bytes = backups.get(&key).await?.bytes().await?.to_vec();
    bytes[10] ^= 1;
    backups.put(&key, bytes.into()).await?;
    let out = run(args).await?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(stderr.contains("checksum mismatch") && stderr.contains("audit.jsonl"), "{stderr}");
    assert!(
        !site.path("tiered").join("wal").exists()
            || std::fs::read_dir(site.path("tiered").join("wal"))?.next().is_none()
    );
    Ok(())
}

async fn tier_of(agg: &Aggregator, kind: &str, id: &str) -> Result<String> {
    let record = agg.record(SYSTEM, kind, id).await?;
    Ok(record.and_then(|r| r["tier"].as_str().map(str::to_owned)).unwrap_or_else(|| "missing".into()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_read_often_is_promoted_read_once_is_not_never_ping_pongs_and_survives_a_kill_mid_promotion() -> Result<()>
{
    const MIN_AGE: Duration = Duration::from_secs(10);
    let site = Site::new()?;
    let s3 = S3Server::start(&site.path("s3"), &["cold"]).await?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_micros() as i64;
    // 3 reads promote; read counts halve every 2 s; 10 s between two moves of the same data.
    let config = tiered_config_with(&s3, "promotion: {reads: 3, window: 2s, min_age: 10s, max_groups_per_run: 4},");
    let pause = vec![("AKOSHA_FAULT_COLD_PAUSE_AFTER_PROMOTE_MS".to_string(), "60000".to_string())];
    let (mut agg, _agent) = three_tiers(&site, &config, pause, now).await?;
    // c100 is read three times right after it reached cold: a candidate, but too young to move again.
    for _ in 0..3 {
        assert_eq!(tier_of(&agg, "conversation", "c100").await?, "cold");
    }
    let (status, r) = admin(&agg, "/v1/admin/cold/promote").await?;
    assert_eq!((status, &r["report"]["groups"], &r["report"]["too_young"]), (200, &json!(0), &json!(1)), "{r}");
    // Queries read many old groups; the scores decay (half-life 2 s) while min_age passes.
    let expected = answers(&agg, now).await?;
    tokio::time::sleep(MIN_AGE).await;

    // Now c100 is read three times, c121 once: only c100's group (its kind, system and day) is a candidate.
    for _ in 0..3 {
        assert_eq!(tier_of(&agg, "conversation", "c100").await?, "cold");
    }
    assert_eq!(tier_of(&agg, "reflection", "c121").await?, "cold");
    let lifecycle: Value = reqwest::get(format!("{}/v1/lifecycle", agg.url)).await?.json().await?;
    let candidates = lifecycle["cold_to_warm"]["candidates"].as_array().cloned().unwrap_or_default();
    assert_eq!(candidates.len(), 1, "{lifecycle}");
    assert_eq!(candidates[0]["kind"], "conversation");

    // Promoted, and killed with `kill -9` after the promotion committed but before its cold objects went.
    let url = agg.url.clone();
    let promoting =
        tokio::spawn(async move { reqwest::Client::new().post(format!("{url}/v1/admin/cold/promote")).send().await });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let lifecycle: Value = reqwest::get(format!("{}/v1/lifecycle", agg.url)).await?.json().await?;
        let journal = lifecycle["warm_to_cold"]["journal"].as_array().cloned().unwrap_or_default();
        if journal.iter().any(|j| j["detail"] == "cold to warm" && j["state"] == "done") {
            break;
        }
        if Instant::now() > deadline {
            bail!("the promotion never committed: {lifecycle}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agg.proc.kill9();
    let _ = promoting.await;
    agg.proc.set_env(vec![]);
    agg.restart().await?;

    // Nothing lost, nothing doubled; c100 answers from warm, c121 still from cold; the same answers as before.
    assert_eq!(tier_of(&agg, "conversation", "c100").await?, "warm");
    assert_eq!(tier_of(&agg, "reflection", "c121").await?, "cold");
    let lifecycle: Value = reqwest::get(format!("{}/v1/lifecycle", agg.url)).await?.json().await?;
    assert!(lifecycle["cold_to_warm"]["candidates"].as_array().is_some_and(Vec::is_empty), "{lifecycle}");
    let all = listed(&agg, "").await?;
    let unique: BTreeSet<&String> = all.iter().collect();
    assert_eq!((all.len() as u64, unique.len() as u64), (RECORDS, RECORDS), "every record once");
    assert_eq!(answers(&agg, now).await?, expected, "promotion changes where records live, not the answers");
    // The promoted group's objects outlived the crash as orphans; the next compaction deletes them, and moving
    // does not send the group straight back (it was promoted less than `min_age` ago).
    let (status, r) = admin(&agg, "/v1/admin/cold/move").await?;
    assert_eq!(status, 200, "{r}");
    assert!(r["compaction"]["orphans_deleted"].as_u64() > Some(0), "{r}");
    let s = agg.stats().await?;
    assert_eq!(bucket_keys(&s3).await?.len() as u64, s["cold"]["objects"].as_u64().unwrap_or(0), "{s}");
    assert_eq!(tier_of(&agg, "conversation", "c100").await?, "warm", "held in warm for min_age");

    // Once min_age has passed and nobody reads it any more, it goes back to cold like any old data.
    tokio::time::sleep(MIN_AGE).await;
    let (status, r) = admin(&agg, "/v1/admin/cold/move").await?;
    assert_eq!(status, 200, "{r}");
    assert_eq!(tier_of(&agg, "conversation", "c100").await?, "cold");
    let s = agg.stats().await?;
    assert_eq!(s["total_records"], RECORDS, "{s}");
    assert_eq!(bucket_keys(&s3).await?.len() as u64, s["cold"]["objects"].as_u64().unwrap_or(0), "{s}");
    Ok(())
}

/// Replaces the `encryption:` line of an aggregator's configuration.
fn set_encryption(site: &Site, name: &str, line: &str) -> Result<()> {
    let path = site.path(name).join("aggregator.yaml");
    let text = std::fs::read_to_string(&path)?;
    let kept: Vec<&str> = text.lines().filter(|l| !l.starts_with("encryption:")).collect();
    std::fs::write(&path, format!("{}\n{line}\n", kept.join("\n")))?;
    Ok(())
}

fn sealed(bytes: &[u8]) -> bool {
    bytes.starts_with(b"AKOSHA-SEALED-1\n") && !bytes.windows(6).any(|w| w == b"marker")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_cold_objects_and_backups_survive_a_key_rotation_and_restore_with_the_new_key_alone() -> Result<()> {
    let site = Site::new()?;
    let s3 = S3Server::start(&site.path("s3"), &["cold", "backups"]).await?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_micros() as i64;
    // Fixed test keys (base64 of 32 bytes); a site generates them with `keys generate`.
    let k1 = "MTExMTExMTExMTExMTExMTExMTExMTExMTExMTExMTE=";
    let k2 = "MjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjI=";
    let config = format!("{}encryption: {{keys: {{k1: '{k1}'}}}}\n", tiered_config(&s3));
    let (mut agg, mut agent) = three_tiers(&site, &config, vec![], now).await?;
    let expected = answers(&agg, now).await?;
    let stats = agg.stats().await?;
    let objects = stats["cold"]["objects"].as_u64().unwrap_or(0);
    assert!(objects > 50, "{stats}");
    // Every cold object is sealed: no Parquet magic, no record text.
    let cold = s3.bucket("cold")?;
    for meta in cold.list(None).try_collect::<Vec<_>>().await? {
        let bytes = cold.get(&meta.location).await?.bytes().await?;
        assert!(sealed(&bytes), "{} is readable without the key", meta.location);
    }

    let s3_options = |url: &str| -> Vec<String> {
        let mut args = vec![url.to_owned()];
        for option in [
            format!("endpoint={}", s3.endpoint),
            "allow_http=true".into(),
            format!("access_key_id={ACCESS_KEY}"),
            format!("secret_access_key={SECRET_KEY}"),
            "region=us-east-1".into(),
        ] {
            args.extend(["-o".to_owned(), option]);
        }
        args
    };
    let run = |command: &str, extra: &[&str]| {
        let mut args = vec![command.to_owned()];
        if command == "backup" || command == "restore" {
            args.extend(s3_options("s3://backups/enc"));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let site = &site;
        async move {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = cli(site, "tiered", &refs).await?;
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            Ok::<_, anyhow::Error>((out.status.success(), text))
        }
    };
    let (ok, text) = run("backup", &[]).await?;
    assert!(ok, "{text}");
    // Every backup file is sealed too, and the manifest names each file's key.
    let backups = s3.bucket("backups")?;
    let mut files = 0;
    for meta in backups.list(Some(&"enc".into())).try_collect::<Vec<_>>().await? {
        let bytes = backups.get(&meta.location).await?.bytes().await?;
        if meta.location.as_ref().ends_with("manifest.json") && !meta.location.as_ref().contains("/files/") {
            let manifest: Value = serde_json::from_slice(&bytes)?;
            assert!(manifest["files"].as_array().into_iter().flatten().all(|f| f["sealed"]["kek_id"] == "k1"));
            continue;
        }
        assert!(sealed(&bytes), "{} is readable without the key", meta.location);
        files += 1;
    }
    assert!(files as u64 > objects, "{files} files and objects");

    // Rotation: k2 becomes active (k1 stays to unwrap); the cold keys are re-wrapped, objects untouched.
    agent.proc.terminate(Duration::from_secs(30))?;
    agg.proc.terminate(Duration::from_secs(30))?;
    let before = bucket_keys(&s3).await?;
    set_encryption(&site, "tiered", &format!("encryption: {{active_key: k2, keys: {{k1: '{k1}', k2: '{k2}'}}}}"))?;
    agg.restart().await?;
    let (ok, text) = run("keys", &["rewrap"]).await?;
    assert!(ok, "{text}");
    // At start the aggregator re-wraps on its own; `keys rewrap` does the rest, if any.
    let per_key: Vec<Vec<&str>> =
        text.lines().filter(|l| l.ends_with("cold objects")).map(|l| l.split_whitespace().collect()).collect();
    let k2_line = vec!["k2".to_owned(), objects.to_string(), "cold".into(), "objects".into()];
    assert!(text.contains("active key: k2") && per_key == [k2_line], "nothing is left under k1: {text}");
    assert_eq!(bucket_keys(&s3).await?, before, "no object was rewritten");
    assert_eq!(answers(&agg, now).await?, expected);
    let (ok, text) = run("backup", &["--rewrap-keys"]).await?;
    assert!(ok && text.contains("in 1 backups") && text.contains("with key `k2`"), "{text}");

    // k1 is retired: wipe, restore with k2 alone, the same answers.
    agg.proc.terminate(Duration::from_secs(30))?;
    wipe(&site, "tiered")?;
    for meta in cold.list(None).try_collect::<Vec<_>>().await? {
        cold.delete(&meta.location).await?;
    }
    set_encryption(&site, "tiered", &format!("encryption: {{keys: {{k1: '{k1}'}}}}"))?;
    let (ok, text) = run("restore", &[]).await?;
    assert!(!ok && text.contains("`k2`, which is not in `encryption.keys`"), "{text}");
    set_encryption(&site, "tiered", &format!("encryption: {{keys: {{k2: '{k2}'}}}}"))?;
    let (ok, text) = run("restore", &[]).await?;
    assert!(ok, "{text}");
    agg.restart().await?;
    wait_searchable(&agg, RECORDS).await?;
    assert_eq!(tiers(&agg.stats().await?), EXPECTED_TIERS);
    assert_eq!(answers(&agg, now).await?, expected, "restored with the new key alone");
    Ok(())
}
