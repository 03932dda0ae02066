//! Session-Buddy's real HTTP push (`../shared/fixtures/session-buddy/http_push_20.jsonl`), replayed twice against
//! the agent exactly as Session-Buddy sent it: the aggregator ends up with each record once, bit-exact.

use std::time::Duration;

use akosha_e2e::{Agent, AgentOptions, Aggregator, Site};
use serde_json::Value;

fn fixture() -> Vec<Value> {
    let path = akosha_e2e::crate_path("../../shared/fixtures/session-buddy/http_push_20.jsonl");
    std::fs::read_to_string(path)
        .expect("fixture")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_the_push_twice_stores_each_record_once() -> anyhow::Result<()> {
    let site = Site::new()?;
    let aggregator = Aggregator::start(&site, "aggregator").await?;
    let agent = Agent::start(&site, "agent", "edge-host-1", aggregator.quic_port, &AgentOptions::default()).await?;
    let http = reqwest::Client::new();
    let requests = fixture();
    for _ in 0..2 {
        for request in &requests {
            let url = format!("{}{}", agent.url, request["path"].as_str().unwrap());
            let response = match request["method"].as_str().unwrap() {
                "GET" => http.get(&url).send().await?,
                _ => http.post(&url).header("content-type", "application/json").json(&request["body"]).send().await?,
            };
            assert!(response.status().is_success(), "{url}: {}", response.status());
            if request["method"] == "POST" {
                let answer: Value = response.json().await?;
                let result = &answer["result"];
                assert_eq!(answer["id"], request["body"]["id"], "{answer}");
                match request["body"]["params"]["name"].as_str().unwrap() {
                    "batch_store_memories" => {
                        assert_eq!(result["status"], "completed");
                        assert_eq!(result["stored"], 20);
                    }
                    "store_reflection" => assert_eq!(result["status"], "stored"),
                    _ => assert!(result["id"].as_str().is_some_and(|id| !id.is_empty()), "{answer}"),
                }
                assert_eq!(result["isError"], false);
                assert!(result["content"][0]["text"].is_string());
            }
        }
    }
    aggregator.wait_total(67, Duration::from_secs(60)).await?;
    let stats = aggregator.stats().await?;
    let host = &stats["systems"]["edge-host-1"];
    assert_eq!((host["conversation"].as_u64(), host["reflection"].as_u64()), (Some(20), Some(8)), "{stats}");
    assert_eq!((host["entity"].as_u64(), host["relation"].as_u64()), (Some(19), Some(20)), "{stats}");

    let memory = &requests[1]["body"]["params"]["arguments"]["memories"][0];
    let stored =
        aggregator.record("edge-host-1", "conversation", memory["memory_id"].as_str().unwrap()).await?.unwrap();
    assert_eq!(stored["text"], memory["text"]);
    assert_eq!(stored["project"], memory["metadata"]["project"]);
    assert_eq!(stored["category"], memory["metadata"]["category"]);
    let sent: Vec<u32> =
        memory["embedding"].as_array().unwrap().iter().map(|v| (v.as_f64().unwrap() as f32).to_bits()).collect();
    let got: Vec<u32> =
        stored["embedding"].as_array().unwrap().iter().map(|v| (v.as_f64().unwrap() as f32).to_bits()).collect();
    assert_eq!(got, sent, "embeddings are bit-exact");

    // Entities keep both their name and Session-Buddy's id, so relations (which use ids) resolve.
    let entity_call = requests.iter().find(|r| r["body"]["params"]["name"] == "create_entity").unwrap();
    let args = &entity_call["body"]["params"]["arguments"];
    let entity =
        aggregator.record("edge-host-1", "entity", args["properties"]["original_id"].as_str().unwrap()).await?.unwrap();
    assert_eq!(entity["name"], args["name"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_clients_and_bad_requests() -> anyhow::Result<()> {
    let site = Site::new()?;
    let aggregator = Aggregator::start(&site, "aggregator").await?;
    let agent = Agent::start(&site, "agent", "edge-host-1", aggregator.quic_port, &AgentOptions::default()).await?;
    let http = reqwest::Client::new();
    let url = format!("{}/mcp", agent.url);
    let call = |body: String| http.post(&url).header("content-type", "application/json").body(body).send();

    let init: Value =
        call(r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18"}}"#.into())
            .await?
            .json()
            .await?;
    assert_eq!(init["result"]["serverInfo"]["name"], "akosha-agent");
    let notified = call(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#.into()).await?;
    assert_eq!(notified.status(), 202);
    let tools: Value = call(r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#.into()).await?.json().await?;
    assert_eq!(tools["result"]["tools"].as_array().unwrap().len(), 5);

    let unknown: Value =
        call(r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"drop_tables","arguments":{}}}"#.into())
            .await?
            .json()
            .await?;
    assert_eq!(unknown["error"]["code"], -32602);
    assert!(unknown["error"]["message"].as_str().unwrap().contains("drop_tables"));
    let garbage: Value = call("{not json".into()).await?.json().await?;
    assert_eq!(garbage["error"]["code"], -32700);
    let not_utf8: Value = http.post(&url).body(vec![b'"', 0xff, 0xfe, b'"']).send().await?.json().await?;
    assert_eq!(not_utf8["error"]["code"], -32700);
    let short = r#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"batch_store_memories","arguments":{"memories":[{"memory_id":"ok-1","text":"fine"},{"memory_id":"bad-1","text":"x","embedding":[1,2,3]}]}}}"#;
    let partial: Value = call(short.into()).await?.json().await?;
    assert_eq!(partial["result"]["status"], "partial");
    assert_eq!(partial["result"]["stored"], 1);
    assert!(partial["result"]["errors"][0]["error"].as_str().unwrap().contains("384"));
    aggregator.wait_total(1, Duration::from_secs(30)).await?;
    assert!(aggregator.record("edge-host-1", "conversation", "ok-1").await?.is_some());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_and_push_of_the_same_data_converge() -> anyhow::Result<()> {
    let site = Site::new()?;
    let aggregator = Aggregator::start(&site, "aggregator").await?;
    let sb = site.session_buddy_data(&["reflection.duckdb", "knowledge_graph.duckdb"])?;
    let options = AgentOptions {
        sources: format!(
            "{{session_buddy: {{snapshots: true, data_dir: {}, interval: 1s, timezone: UTC}}}}",
            sb.display()
        ),
        ..AgentOptions::default()
    };
    let agent = Agent::start(&site, "agent", "edge-host-1", aggregator.quic_port, &options).await?;
    aggregator.wait_total(67, Duration::from_secs(60)).await?;
    let from_snapshots = aggregator.stats().await?;
    let host = &from_snapshots["systems"]["edge-host-1"];
    assert_eq!((host["conversation"].as_u64(), host["reflection"].as_u64()), (Some(20), Some(8)), "{from_snapshots}");
    assert_eq!((host["entity"].as_u64(), host["relation"].as_u64()), (Some(19), Some(20)), "{from_snapshots}");

    // The same data through the HTTP push: same keys, nothing doubles.
    let http = reqwest::Client::new();
    for request in fixture().iter().filter(|r| r["method"] == "POST") {
        let url = format!("{}{}", agent.url, request["path"].as_str().unwrap());
        let response = http.post(&url).json(&request["body"]).send().await?;
        assert!(response.status().is_success());
    }
    // Later snapshots see nothing new either.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(aggregator.total().await?, 67);
    let status = agent.status().await?;
    // Unchanged files are not snapshotted again: an idle agent does no work.
    assert_eq!(status["session_buddy_snapshots"]["snapshots"], 1, "{status}");
    assert_eq!(status["session_buddy_snapshots"]["changed_records"], 67, "{status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_work_while_session_buddy_holds_the_database_for_writing() -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let site = Site::new()?;
    let aggregator = Aggregator::start(&site, "aggregator").await?;
    let sb = site.session_buddy_data(&["reflection.duckdb"])?;

    // "Session-Buddy": another process with the database open for writing, inserting while we snapshot.
    let script = akosha_e2e::crate_path("helpers/session_buddy_writer.py");
    let mut writer = Command::new("python3")
        .arg(script)
        .arg(sb.join("reflection.duckdb"))
        .arg("40")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(writer.stdout.take().expect("stdout")).lines();
    assert_eq!(
        lines.next().transpose()?.as_deref(),
        Some("ready"),
        "the writer (python3 with duckdb 2.x) did not start"
    );

    let options = AgentOptions {
        sources: format!(
            "{{session_buddy: {{snapshots: true, data_dir: {}, interval: 1s, timezone: UTC}}}}",
            sb.display()
        ),
        ..AgentOptions::default()
    };
    let agent = Agent::start(&site, "agent", "edge-host-1", aggregator.quic_port, &options).await?;
    // The writer keeps working while the agent snapshots: all of its inserts succeed.
    let done = tokio::task::spawn_blocking(move || lines.next().transpose()).await??;
    assert_eq!(done.as_deref(), Some("done 60"), "the writer failed while the agent was snapshotting");
    // And the agent sees everything the writer committed: 20 fixture conversations, 8 reflections, 40 new ones.
    aggregator.wait_total(68, Duration::from_secs(60)).await?;
    let stats = aggregator.stats().await?;
    assert_eq!(stats["systems"]["edge-host-1"]["conversation"], 60, "{stats}");
    let live = aggregator.record("edge-host-1", "conversation", "live-0039").await?.expect("last live row");
    assert_eq!(live["project"], "live-writer");
    drop(writer.stdin.take());
    writer.wait()?;
    drop(agent);
    Ok(())
}
