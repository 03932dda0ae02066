//! The delivery contract with real processes: agent → QUIC + mTLS → aggregator, exactly once in storage.

use std::time::Duration;

use akosha_e2e::{Agent, AgentOptions, Aggregator, Site, ndjson};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_records_arrive_exactly_once() -> anyhow::Result<()> {
    let site = Site::new()?;
    let aggregator = Aggregator::start(&site, "aggregator").await?;
    let agent = Agent::start(&site, "agent", "host-1", aggregator.quic_port, &AgentOptions::default()).await?;

    for chunk in 0..20u64 {
        let (status, body, _) = agent.post(ndjson(chunk * 1000..(chunk + 1) * 1000, "conversation")).await?;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["accepted"], 1000);
    }
    // Re-sending part of it (as a retrying client would) must not create duplicates.
    let (status, _, _) = agent.post(ndjson(0..500, "conversation")).await?;
    assert_eq!(status, 200);

    let total = aggregator.wait_total(20_000, Duration::from_secs(120)).await?;
    assert_eq!(total, 20_000);
    let stats = aggregator.stats().await?;
    assert_eq!(stats["systems"]["host-1"]["conversation"], 20_000);

    for i in [0u64, 1, 4_321, 19_999] {
        let record = aggregator.record("host-1", "conversation", &format!("r{i}")).await?.expect("stored");
        assert_eq!(record["text"], format!("memory {i}: ").repeat(80));
        assert_eq!(record["ts"], 1_700_000_000_000_000i64 + i as i64);
        assert_eq!(record["project"], format!("p{}", i % 7));
        assert_eq!(record["embedding"].as_array().map(Vec::len), (i % 2 == 0).then_some(384));
        if i % 2 == 0 {
            let first = record["embedding"][5].as_f64().unwrap() as f32;
            assert_eq!(first.to_bits(), ((i as f32) * 0.001 + 5.0 * 0.0001).sin().to_bits(), "floats are bit-exact");
        }
    }
    assert!(aggregator.record("host-1", "conversation", "r20000").await?.is_none());

    // Everything acknowledged: the agent's buffer is empty.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = agent.status().await?;
        if status["destinations"]["primary"]["buffer"]["records"] == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "buffer never drained: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_lines_are_rejected_with_line_numbers_and_nothing_is_stored() -> anyhow::Result<()> {
    let site = Site::new()?;
    let aggregator = Aggregator::start(&site, "aggregator").await?;
    let agent = Agent::start(&site, "agent", "host-1", aggregator.quic_port, &AgentOptions::default()).await?;
    let mut body = ndjson(0..3, "reflection");
    body.push_str("{\"id\":\"x\",\"kind\":\"memory\"}\n");
    body.push_str(&ndjson(3..4, "reflection"));
    body.push_str("{broken\n");
    let (status, response, _) = agent.post(body).await?;
    assert_eq!(status, 400);
    assert_eq!(response["error"], "invalid_records");
    let lines: Vec<u64> = response["errors"].as_array().unwrap().iter().map(|e| e["line"].as_u64().unwrap()).collect();
    assert_eq!(lines, vec![4, 6]);
    assert!(response["errors"][0]["error"].as_str().unwrap().contains("unknown kind `memory`"));

    // A body over ingest.max_body_bytes (64 MiB) is refused with the same JSON error shape.
    let (status, response, _) = agent.post("x".repeat(65 << 20)).await?;
    assert_eq!(status, 413);
    assert_eq!(response["error"], "too_large");

    let (status, _, _) = agent.post(ndjson(10..12, "reflection")).await?;
    assert_eq!(status, 200);
    assert_eq!(aggregator.wait_total(2, Duration::from_secs(30)).await?, 2);
    assert!(aggregator.record("host-1", "reflection", "r0").await?.is_none(), "all-or-nothing");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregator_down_for_a_while_then_everything_arrives() -> anyhow::Result<()> {
    let site = Site::new()?;
    let mut aggregator = Aggregator::start(&site, "aggregator").await?;
    aggregator.proc.kill9();
    let agent = Agent::start(&site, "agent", "host-1", aggregator.quic_port, &AgentOptions::default()).await?;
    for chunk in 0..5u64 {
        let (status, body, _) = agent.post(ndjson(chunk * 1000..(chunk + 1) * 1000, "entity")).await?;
        assert_eq!(status, 200, "{body}");
    }
    let status = agent.status().await?;
    assert_eq!(status["destinations"]["primary"]["buffer"]["records"], 5000);
    assert_eq!(status["destinations"]["primary"]["connected"], false);
    tokio::time::sleep(Duration::from_secs(1)).await;

    aggregator.restart().await?;
    assert_eq!(aggregator.wait_total(5000, Duration::from_secs(60)).await?, 5000);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_buffer_blocks_with_503_and_loses_nothing() -> anyhow::Result<()> {
    let site = Site::new()?;
    let mut aggregator = Aggregator::start(&site, "aggregator").await?;
    aggregator.proc.kill9();
    let options = AgentOptions { buffer_max: "2MiB".into(), ..AgentOptions::default() };
    let agent = Agent::start(&site, "agent", "host-1", aggregator.quic_port, &options).await?;

    let mut accepted = 0u64;
    let mut refused = 0;
    for chunk in 0..40u64 {
        let (status, body, retry_after) = agent.post(ndjson(chunk * 100..(chunk + 1) * 100, "conversation")).await?;
        match status {
            200 => accepted += 100,
            503 => {
                refused += 1;
                assert_eq!(body["error"], "buffer_full");
                assert_eq!(retry_after.as_deref(), Some("1"));
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    assert!(refused > 0, "a 2 MiB buffer cannot hold 4000 records of ~2 KB");
    assert!(accepted > 0);
    let status = agent.status().await?;
    assert_eq!(status["destinations"]["primary"]["buffer"]["dropped_records"], 0);

    aggregator.restart().await?;
    assert_eq!(aggregator.wait_total(accepted, Duration::from_secs(60)).await?, accepted);
    // Once drained, the agent accepts again.
    let (status, _, _) = agent.post(ndjson(10_000..10_100, "conversation")).await?;
    assert_eq!(status, 200);
    assert_eq!(aggregator.wait_total(accepted + 100, Duration::from_secs(60)).await?, accepted + 100);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_of_both_sides_loses_nothing() -> anyhow::Result<()> {
    let site = Site::new()?;
    let mut aggregator = Aggregator::start(&site, "aggregator").await?;
    let mut agent = Agent::start(&site, "agent", "host-1", aggregator.quic_port, &AgentOptions::default()).await?;
    let (status, _, _) =
        agent.post(ndjson(0..3000, "metric").replace("\"text\"", "\"name\":\"cpu\",\"value\":1.5,\"text\"")).await?;
    assert_eq!(status, 200);
    agent.proc.terminate(Duration::from_secs(15))?;
    aggregator.proc.terminate(Duration::from_secs(15))?;
    aggregator.restart().await?;
    agent.restart().await?;
    assert_eq!(aggregator.wait_total(3000, Duration::from_secs(60)).await?, 3000);
    let metric = aggregator.record("host-1", "metric", "r7").await?.expect("stored");
    assert_eq!(metric["value"], 1.5);
    assert_eq!(metric["name"], "cpu");
    Ok(())
}
