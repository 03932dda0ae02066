//! Hybrid on-prem/cloud routing with real processes: one agent, a `cloud` and an `onprem` aggregator, and the
//! shipped residency policy (or a hostile one). What must stay on the premises never reaches the cloud
//! aggregator — checked through its API and byte-wise in everything it stored.

use std::time::Duration;

use akosha_e2e::{Agent, AgentOptions, Aggregator, Site, containing, plugin, read_tree};
use anyhow::Result;
use serde_json::Value;

const SYSTEM: &str = "hybrid-host";
/// The shipped policy's rules for [`mix`]: secrets (by default), a project and a tag on-prem, a tag dropped.
const SITE_RULES: &str = "onprem_projects: payroll, onprem_tags: confidential, drop_tags: scratch";

/// One record to post, and whether it must stay on the premises.
struct Case {
    id: String,
    /// The string that must not reach the cloud (a secret, or a marker of a record that must stay).
    sensitive: Option<String>,
    /// Tagged `scratch`: dropped by the policy.
    dropped: bool,
    line: String,
}

/// 60 ordinary records, 50 carrying secrets or e-mail addresses, 10 in an on-prem project, 10 tagged
/// confidential, 5 tagged scratch. Every sensitive string is unique to its record.
fn mix() -> Vec<Case> {
    let mut cases = Vec::new();
    let line = |id: &str, project: &str, text: &str, tags: &[&str]| {
        serde_json::json!({
            "id": id, "kind": "conversation", "ts": 1_760_000_000_000_000i64, "project": project,
            "text": text, "tags": tags,
        })
        .to_string()
    };
    for i in 0..60 {
        let id = format!("plain-{i}");
        let text = format!("refactored the parser for module {i}; tests pass");
        cases.push(Case { line: line(&id, "web", &text, &[]), id, sensitive: None, dropped: false });
    }
    for i in 0..50 {
        let secret = match i % 5 {
            0 => format!("AKIA{:016}", 1_000_000_000 + i),
            1 => format!("ghp_{:0>36}", format!("tok{i}zz")),
            2 => format!("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA{i:04}\n-----END RSA PRIVATE KEY-----"),
            3 => format!("password: hunter{i:04}x"),
            _ => format!("dev{i}@example.org"),
        };
        let id = format!("secret-{i}");
        let text = format!("while debugging I pasted {secret} into the chat, sorry");
        cases.push(Case { line: line(&id, "web", &text, &[]), id, sensitive: Some(secret), dropped: false });
    }
    for i in 0..10 {
        let id = format!("payroll-{i}");
        let marker = format!("salary band review {i} for team payroll");
        cases.push(Case { line: line(&id, "payroll", &marker, &[]), id, sensitive: Some(marker), dropped: false });
    }
    for i in 0..10 {
        let id = format!("confidential-{i}");
        let marker = format!("merger code name lighthouse-{i}");
        cases.push(Case {
            line: line(&id, "web", &marker, &["confidential"]),
            id,
            sensitive: Some(marker),
            dropped: false,
        });
    }
    for i in 0..5 {
        let id = format!("scratch-{i}");
        let marker = format!("throwaway scratch note {i}");
        cases.push(Case { line: line(&id, "web", &marker, &["scratch"]), id, sensitive: Some(marker), dropped: true });
    }
    cases
}

fn body(cases: &[Case]) -> String {
    cases.iter().map(|c| format!("{}\n", c.line)).collect()
}

/// The on-prem destination block, and the residency policy with `settings` (YAML flow-mapping entries).
fn hybrid_options(site: &Site, onprem: &Aggregator, policy: &str, settings: &str) -> AgentOptions {
    let certs = site.certs.display();
    AgentOptions {
        // Uncompressed on the wire and so in the aggregators' logs: a byte-wise search then sees everything.
        destination_extra: "    residency: cloud\n    compression: none\n".into(),
        more_destinations: onsite(&certs.to_string(), onprem.quic_port),
        extra_config: format!(
            "policies:\n  residency:\n    - name: site-rules\n      path: {}\n      config: {{{settings}}}\n",
            plugin(policy).display()
        ),
        ..AgentOptions::default()
    }
}

fn onsite(certs: &str, port: u16) -> String {
    format!(
        "  onsite:\n    address: 127.0.0.1:{port}\n    residency: onprem\n    compression: none\n    ca: {certs}/ca.pem\n    \
         cert: {certs}/agents/{SYSTEM}.pem\n    key: {certs}/agents/{SYSTEM}.key\n    backoff_initial: 50ms\n    \
         backoff_max: 500ms\n    drain_timeout: 3s\n"
    )
}

/// A cloud and an on-prem aggregator, and an agent sending to both through the residency `policy`.
struct Hybrid {
    agent: Agent,
    cloud: Aggregator,
    onprem: Aggregator,
    site: Site,
}

impl Hybrid {
    async fn start(policy: &str, settings: &str) -> Result<Hybrid> {
        let site = Site::new()?;
        let cloud = Aggregator::start(&site, "cloud").await?;
        let onprem = Aggregator::start(&site, "onprem").await?;
        let options = hybrid_options(&site, &onprem, policy, settings);
        let agent = Agent::start(&site, "agent", SYSTEM, cloud.quic_port, &options).await?;
        Ok(Hybrid { agent, cloud, onprem, site })
    }
}

async fn post_all(agent: &Agent, cases: &[Case]) -> Result<()> {
    let (status, response, _) = agent.post(body(cases)).await?;
    assert_eq!(status, 200, "{response}");
    assert_eq!(response["accepted"].as_u64(), Some(cases.len() as u64), "{response}");
    Ok(())
}

fn text_of(record: &Value) -> &str {
    record["text"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sensitive_records_stay_on_the_premises() -> Result<()> {
    let Hybrid { site, cloud, onprem, mut agent } = Hybrid::start("akosha-residency", SITE_RULES).await?;
    let cases = mix();
    post_all(&agent, &cases).await?;

    let kept = cases.iter().filter(|c| !c.dropped).count() as u64;
    let plain = cases.iter().filter(|c| c.sensitive.is_none()).count() as u64;
    assert_eq!(onprem.wait_total(kept, Duration::from_secs(60)).await?, kept);
    assert_eq!(cloud.wait_total(plain, Duration::from_secs(60)).await?, plain);
    for case in &cases {
        let at_cloud = cloud.record(SYSTEM, "conversation", &case.id).await?;
        let on_site = onprem.record(SYSTEM, "conversation", &case.id).await?;
        assert_eq!(at_cloud.is_some(), case.sensitive.is_none(), "{} at the cloud", case.id);
        assert_eq!(on_site.is_some(), !case.dropped, "{} on site", case.id);
    }

    let status = agent.status().await?;
    assert_eq!(status["policies"]["residency"][0]["name"], "site-rules");
    assert_eq!(status["policies"]["residency"][0]["contract"], "0.1.0");
    assert_eq!(status["destinations"]["onsite"]["residency"], "onprem");
    assert_eq!(status["destinations"]["primary"]["routes"], serde_json::json!(["cloud"]));

    // Everything the cloud aggregator wrote, byte by byte; the on-prem one as the control that the search works.
    agent.proc.terminate(Duration::from_secs(10))?;
    let cloud_files = read_tree(&site.path("cloud"))?;
    let onprem_files = read_tree(&site.path("onprem"))?;
    for case in &cases {
        let Some(sensitive) = &case.sensitive else { continue };
        for needle in [sensitive.as_str(), case.id.as_str()] {
            let leaked = containing(&cloud_files, needle);
            assert!(leaked.is_empty(), "`{needle}` reached the cloud aggregator's storage: {leaked:?}");
        }
        assert_eq!(
            containing(&onprem_files, sensitive).is_empty(),
            case.dropped,
            "`{sensitive}` in the on-prem storage"
        );
    }
    assert!(!containing(&cloud_files, "refactored the parser for module 7;").is_empty(), "control: plain text");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_counts_every_onprem_and_drop_decision() -> Result<()> {
    let Hybrid { site: _site, cloud, onprem, agent } = Hybrid::start("akosha-residency", SITE_RULES).await?;
    let cases = mix();
    post_all(&agent, &cases).await?;
    let status = agent.status().await?;
    let audit = &status["audit"];
    assert_eq!(audit["routed"]["cloud"], 60, "{audit}");
    assert_eq!(audit["routed"]["onprem"], 70, "{audit}");
    assert_eq!(audit["routed"]["drop"], 5, "{audit}");
    let decisions = audit["decisions"].as_array().unwrap();
    let count = |route: &str, reason_part: &str| -> u64 {
        decisions
            .iter()
            .filter(|d| d["route"] == route && d["reason"].as_str().unwrap_or("").contains(reason_part))
            .map(|d| d["count"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(count("onprem", "AWS key"), 10, "{audit}");
    assert_eq!(count("onprem", "e-mail"), 10, "{audit}");
    assert_eq!(count("drop", ""), 5, "{audit}");
    assert_eq!(count("onprem", ""), 70, "{audit}");
    // Each audited record is inspectable with its reason.
    let recent = audit["recent"].as_array().unwrap();
    assert!(recent.iter().any(|e| e["id"] == "scratch-4" && e["route"] == "drop"), "{audit}");
    let metrics = agent.metrics().await?;
    assert!(metrics.contains("akosha_agent_routed_records_total{route=\"onprem\"} 70"), "{metrics}");
    assert!(
        metrics.contains("akosha_agent_residency_decisions_total{policy=\"site-rules\",route=\"drop\""),
        "{metrics}"
    );
    assert!(metrics.contains("akosha_agent_policy_calls_total{policy=\"site-rules\"}"), "{metrics}");
    onprem.wait_total(130, Duration::from_secs(60)).await?;
    cloud.wait_total(60, Duration::from_secs(60)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redaction_sends_the_record_without_the_secret() -> Result<()> {
    let Hybrid { site, cloud, onprem, mut agent } = Hybrid::start("akosha-residency", "on_match: redact").await?;
    // Secrets only: in redact mode the projects and tags above have no rules.
    let cases: Vec<Case> =
        mix().into_iter().filter(|c| c.id.starts_with("secret-") || c.id.starts_with("plain-")).collect();
    post_all(&agent, &cases).await?;
    let total = cases.len() as u64;
    assert_eq!(cloud.wait_total(total, Duration::from_secs(60)).await?, total);
    assert_eq!(onprem.wait_total(total, Duration::from_secs(60)).await?, total);
    for case in cases.iter().filter(|c| c.sensitive.is_some()) {
        let record = cloud.record(SYSTEM, "conversation", &case.id).await?.expect("redacted record at the cloud");
        let text = text_of(&record);
        assert!(text.starts_with("while debugging I pasted [REDACTED]"), "{}: {text}", case.id);
        assert!(!text.contains(case.sensitive.as_deref().unwrap()), "{}: {text}", case.id);
    }
    agent.proc.terminate(Duration::from_secs(10))?;
    let cloud_files = read_tree(&site.path("cloud"))?;
    for case in &cases {
        if let Some(secret) = &case.sensitive {
            let leaked = containing(&cloud_files, secret);
            assert!(leaked.is_empty(), "`{secret}` reached the cloud aggregator's storage: {leaked:?}");
        }
    }
    assert!(!containing(&cloud_files, "while debugging I pasted [REDACTED]").is_empty(), "control");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_policy_keeps_every_batch_on_the_premises() -> Result<()> {
    let Hybrid { site, cloud, onprem, agent } = Hybrid::start("akosha-hostile-plugin", "mode: panic").await?;
    let cases = mix();
    // Two requests: the agent goes on serving after the first failure.
    post_all(&agent, &cases[..60]).await?;
    post_all(&agent, &cases[60..]).await?;
    let total = cases.len() as u64;
    assert_eq!(onprem.wait_total(total, Duration::from_secs(60)).await?, total);
    let status = agent.status().await?;
    assert_eq!(status["audit"]["failed_closed_records"], total, "{status}");
    let failure = &status["audit"]["failures"][0];
    assert_eq!(failure["policy"], "site-rules");
    assert_eq!(failure["cause"], "panic");
    assert_eq!(failure["count"], 2);
    let reason = status["audit"]["recent"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("hostile plugin panicked on purpose"), "{reason}");
    let metrics = agent.metrics().await?;
    assert!(
        metrics.contains("akosha_agent_policy_failures_total{policy=\"site-rules\",cause=\"panic\"} 2"),
        "{metrics}"
    );
    let log = std::fs::read_to_string(site.path("agent/agent.log"))?;
    assert!(log.contains("site-rules") && log.contains("hostile plugin panicked on purpose"), "{log}");
    // Give a wrongly routed batch every chance to arrive before looking.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(cloud.total().await?, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_cannot_load_fails_closed_without_stopping_the_agent() -> Result<()> {
    let Hybrid { site: _site, cloud, onprem, agent } = Hybrid::start("akosha-wrong-version-plugin", "").await?;
    let cases = mix();
    post_all(&agent, &cases).await?;
    let total = cases.len() as u64;
    assert_eq!(onprem.wait_total(total, Duration::from_secs(60)).await?, total);
    let status = agent.status().await?;
    let unloadable = &status["policies"]["unloadable"][0];
    assert_eq!(unloadable["policy"], "site-rules");
    assert_eq!(unloadable["cause"], "contract_version");
    assert!(unloadable["error"].as_str().unwrap().contains("akosha:plugin@9.0.0"), "{status}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(cloud.total().await?, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_onprem_destination_records_wait_in_quarantine() -> Result<()> {
    let site = Site::new()?;
    let cloud = Aggregator::start(&site, "cloud").await?;
    let onprem = Aggregator::start(&site, "onprem").await?;
    let mut options = hybrid_options(&site, &onprem, "akosha-residency", "drop_tags: scratch");
    let onsite_block = std::mem::take(&mut options.more_destinations);
    let mut agent = Agent::start(&site, "agent", SYSTEM, cloud.quic_port, &options).await?;
    let cases: Vec<Case> =
        mix().into_iter().filter(|c| c.id.starts_with("secret-") || c.id.starts_with("plain-")).collect();
    post_all(&agent, &cases).await?;
    assert_eq!(cloud.wait_total(60, Duration::from_secs(60)).await?, 60);
    let status = agent.status().await?;
    assert_eq!(status["quarantine"]["records"], 50, "{status}");
    assert_eq!(status["audit"]["quarantined_records"], 50, "{status}");

    // The next start with an on-prem destination hands the quarantine over.
    agent.proc.terminate(Duration::from_secs(10))?;
    options.more_destinations = onsite_block;
    let agent = Agent::start(&site, "agent", SYSTEM, cloud.quic_port, &options).await?;
    assert_eq!(onprem.wait_total(50, Duration::from_secs(60)).await?, 50);
    for case in cases.iter().filter(|c| c.sensitive.is_some()) {
        assert!(onprem.record(SYSTEM, "conversation", &case.id).await?.is_some(), "{}", case.id);
    }
    assert_eq!(agent.status().await?["quarantine"]["records"], 0);
    assert_eq!(cloud.total().await?, 60);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_policies_pick_the_codec_and_failures_fall_back() -> Result<()> {
    let site = Site::new()?;
    let cloud = Aggregator::start(&site, "cloud").await?;
    let compression = plugin("akosha-compression").display().to_string();
    let hostile = plugin("akosha-hostile-compression-plugin").display().to_string();
    let options = AgentOptions {
        destination_extra: "    compression: lz4\n".into(),
        // The hostile one first: it traps on every batch, and the shipped policy answers instead.
        extra_config: format!(
            "policies:\n  compression:\n    - {{name: broken, path: {hostile}, config: {{mode: trap}}}}\n    - {{name: adaptive, path: {compression}}}\n"
        ),
        ..AgentOptions::default()
    };
    let agent = Agent::start(&site, "agent", SYSTEM, cloud.quic_port, &options).await?;
    // One tiny batch (not worth compressing) and, once that is acked, one large text-heavy batch.
    post_all(&agent, &mix()[..1]).await?;
    cloud.wait_total(1, Duration::from_secs(60)).await?;
    agent.post(akosha_e2e::ndjson(0..400, "reflection")).await?;
    cloud.wait_total(401, Duration::from_secs(60)).await?;
    let status = agent.status().await?;
    let codecs = status["audit"]["codecs"].as_array().unwrap();
    let batches = |codec: &str| -> u64 {
        codecs.iter().filter(|c| c["codec"] == codec).map(|c| c["batches"].as_u64().unwrap()).sum()
    };
    assert!(batches("none") >= 1, "{codecs:?}");
    assert!(batches("zstd:3") >= 1, "{codecs:?}");
    let failures = status["audit"]["failures"].as_array().unwrap();
    assert!(failures.iter().any(|f| f["policy"] == "broken" && f["cause"] == "trap"), "{failures:?}");
    assert_eq!(status["policies"]["compression"].as_array().unwrap().len(), 2);
    Ok(())
}
