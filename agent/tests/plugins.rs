//! The plugin host against real components built by `scripts/build-plugins.sh`: the shipped policies, and
//! hostile plugins that loop, hoard memory, trap, panic, miscount, redact out of range, speak another contract
//! version or import WASI. Every failure names the plugin and the cause, and the host keeps working.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use std::sync::Arc;

use akosha_agent::config::RoutingConfig;
use akosha_agent::plugin::{
    BatchStats, CallFailure, CompressionPlugin, PluginConfig, PluginError, ResidencyPlugin, apply_redactions,
};
use akosha_agent::policy::{Audit, CompressionChooser, ResidencyStage};
use akosha_protocol::{Codec, Record, RecordKind, Residency};

fn plugin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("AKOSHA_PLUGIN_DIR") {
        return dir.into();
    }
    // target/release/deps/<test> → target/plugins
    let exe = std::env::current_exe().expect("test path");
    exe.ancestors().nth(3).expect("target dir").join("plugins")
}

fn plugin(name: &str) -> PathBuf {
    let path = plugin_dir().join(format!("{name}.wasm"));
    assert!(path.exists(), "{} is missing: run scripts/build-plugins.sh", path.display());
    path
}

fn record(id: &str, text: &str) -> Record {
    Record {
        system_id: "dev-1".into(),
        kind: RecordKind::Conversation,
        id: id.into(),
        ts: 1,
        text: Some(text.into()),
        ..Record::default()
    }
}

fn hostile(mode: &str) -> Result<ResidencyPlugin, PluginError> {
    let mut config = PluginConfig::new("hostile", plugin("akosha-hostile-plugin"));
    config.config = vec![("mode".into(), mode.into())];
    config.timeout = Duration::from_millis(200);
    config.memory_limit = 32 << 20;
    ResidencyPlugin::load(config)
}

fn failure(result: Result<Vec<akosha_agent::plugin::Decision>, PluginError>) -> CallFailure {
    match result {
        Err(PluginError::Call { plugin, cause }) => {
            assert_eq!(plugin, "hostile");
            cause
        }
        other => panic!("expected a call failure, got {other:?}"),
    }
}

#[test]
fn the_shipped_residency_policy_routes_and_redacts() {
    let mut config = PluginConfig::new("residency", plugin("akosha-residency"));
    config.config = vec![("onprem_projects".into(), "secret-*".into())];
    let mut policy = ResidencyPlugin::load(config).unwrap();
    let mut private = record("p", "nothing special");
    private.project = Some("secret-sauce".into());
    let batch = vec![
        record("ok", "refactored the parser"),
        record("aws", "key AKIAIOSFODNN7EXAMPLE leaked"),
        record("pem", "-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----"),
        private,
    ];
    let decisions = policy.decide(&batch).unwrap();
    let routes: Vec<Residency> = decisions.iter().map(|d| d.route).collect();
    assert_eq!(routes, [Residency::Cloud, Residency::Onprem, Residency::Onprem, Residency::Onprem]);
    assert_eq!(decisions[1].reason.as_deref(), Some("text contains an AWS key"));

    let mut config = PluginConfig::new("residency", plugin("akosha-residency"));
    config.config = vec![("on_match".into(), "redact".into())];
    let mut redacting = ResidencyPlugin::load(config).unwrap();
    let decisions = redacting.decide(&batch[1..2]).unwrap();
    assert_eq!(decisions[0].route, Residency::Cloud);
    let text = batch[1].text.as_deref().unwrap();
    assert_eq!(apply_redactions(text, &decisions[0].redactions), "key [REDACTED] leaked");

    // Many batches on one instance: decisions stay right (the instance is reused or replaced, never stale).
    for _ in 0..50 {
        assert_eq!(policy.decide(&batch).unwrap().len(), 4);
    }
}

#[test]
fn records_reach_the_guest_intact() {
    // The host lowers records with its own batch lowering (agent/src/plugin/guest_record.rs): the `echo` guest
    // renders every field it received, and each must be what the host sent — present and absent optionals,
    // no, one and many tags, empty strings, multi-byte text, embeddings on and off, batches of every size —
    // both as one block per batch (the SDK declares akosha:bulk-arguments) and one per string (the same
    // component with the declaration renamed away).
    let unmarked = tempfile::tempdir().unwrap();
    let echo = |embeddings: bool, bulk: bool| {
        let path = if bulk { plugin("akosha-hostile-plugin") } else { without_bulk_marker(&unmarked) };
        let mut config = PluginConfig::new("hostile", path);
        config.config = vec![("mode".into(), "echo".into())];
        config.embeddings = embeddings;
        let plugin = ResidencyPlugin::load(config).unwrap();
        assert_eq!(plugin.identity().bulk_arguments, bulk);
        plugin
    };
    let kinds = [
        (RecordKind::Conversation, "conversation"),
        (RecordKind::Reflection, "reflection"),
        (RecordKind::Entity, "entity"),
        (RecordKind::Relation, "relation"),
        (RecordKind::Metric, "metric"),
    ];
    let records: Vec<Record> = (0..300)
        .map(|i| {
            let some = |s: String| if i % 3 == 0 { None } else { Some(s) };
            Record {
                system_id: format!("sys-{}", i % 4),
                kind: kinds[i % 5].0,
                id: if i == 7 { String::new() } else { format!("rec-{i}") },
                ts: 1,
                project: some(format!("project-{i}")),
                namespace: if i % 2 == 0 { Some("ns".into()) } else { None },
                category: some(String::new()),
                name: if i % 5 == 1 { Some(format!("entity {i} ✓")) } else { None },
                tags: (0..i % 4).map(|t| format!("tag-{t}-{}", "x".repeat(i % 7))).collect(),
                text: some(format!("{i}: Grüße, naïve café — {}", "lorem ipsum ".repeat(i % 50))),
                metadata: if i % 4 == 2 { Some(format!("{{\"turn\":{i}}}")) } else { None },
                embedding: if i % 2 == 1 { Some(vec![i as f32, -0.5, 1e-3]) } else { None },
                ..Record::default()
            }
        })
        .collect();
    for (embeddings, bulk) in [(false, true), (true, true), (false, false), (true, false)] {
        let mut plugin = echo(embeddings, bulk);
        for size in [1, 2, 17, 300] {
            for batch in records.chunks(size) {
                let decisions = plugin.decide(batch).unwrap();
                for (r, d) in batch.iter().zip(&decisions) {
                    let kind = kinds.iter().find(|k| k.0 == r.kind).unwrap().1;
                    let embedding = if embeddings { r.embedding.clone() } else { None };
                    let expected = format!(
                        "{kind}|{}|{}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}",
                        r.system_id,
                        r.id,
                        r.project,
                        r.namespace,
                        r.category,
                        r.name,
                        r.tags,
                        r.text,
                        r.metadata,
                        embedding
                    );
                    assert_eq!(d.reason.as_deref(), Some(expected.as_str()), "record {}", r.id);
                }
            }
        }
    }
}

/// The hostile fixture with its akosha:bulk-arguments section renamed (same length), so the host must give it
/// one allocation per string.
fn without_bulk_marker(dir: &tempfile::TempDir) -> PathBuf {
    let mut bytes = std::fs::read(plugin("akosha-hostile-plugin")).unwrap();
    let marker = b"akosha:bulk-arguments";
    let at = bytes.windows(marker.len()).position(|w| w == marker).expect("the SDK embeds the marker");
    bytes[at + marker.len() - 1] = b'z';
    let path = dir.path().join("unmarked.wasm");
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn configuration_errors_are_reported_at_load() {
    let mut config = PluginConfig::new("residency", plugin("akosha-residency"));
    config.config = vec![("on_match".into(), "shrug".into())];
    let err = ResidencyPlugin::load(config).err().expect("refused");
    assert!(err.to_string().starts_with("plugin `residency` refused its configuration: `on_match` must be"), "{err}");
}

#[test]
fn an_endless_loop_times_out_and_the_host_goes_on() {
    let mut looping = hostile("loop").unwrap();
    let started = Instant::now();
    assert_eq!(failure(looping.decide(&[record("a", "x")])), CallFailure::Timeout(Duration::from_millis(200)));
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    // Still usable (fails again, promptly, rather than hanging or crashing).
    assert!(matches!(failure(looping.decide(&[record("a", "x")])), CallFailure::Timeout(_)));
    let mut fine = hostile("cloud-all").unwrap();
    assert_eq!(fine.decide(&[record("a", "x")]).unwrap()[0].route, Residency::Cloud);
}

#[test]
fn a_memory_bomb_hits_the_limit() {
    let mut bomb = hostile("memory-bomb").unwrap();
    assert_eq!(failure(bomb.decide(&[record("a", "x")])), CallFailure::MemoryLimit(32 << 20));
}

#[test]
fn malformed_results_are_refused_and_the_host_goes_on() {
    // The host lifts decisions out of guest memory itself (agent/src/plugin/guest_decision.rs): a reason that is
    // not UTF-8 is an error naming it, not a panic or a garbled string, and the next good call works.
    let mut bad = hostile("bad-utf8").unwrap();
    match failure(bad.decide(&[record("a", "x"), record("b", "y")])) {
        CallFailure::Trap(message) => assert!(message.contains("invalid utf-8"), "{message}"),
        other => panic!("{other:?}"),
    }
    let mut fine = hostile("onprem-all").unwrap();
    let decisions = fine.decide(&[record("a", "x")]).unwrap();
    assert_eq!(decisions[0].reason.as_deref(), Some("hostile: everything on-premises"));
}

#[test]
fn traps_and_panics_are_named_with_the_guest_message() {
    let mut trap = hostile("trap").unwrap();
    assert!(matches!(failure(trap.decide(&[record("a", "x")])), CallFailure::Trap(m) if m.contains("unreachable")));
    let mut panicking = hostile("panic").unwrap();
    match failure(panicking.decide(&[record("a", "x"), record("b", "y")])) {
        CallFailure::Panic(message) => {
            assert!(message.contains("hostile plugin panicked on purpose with 2 records"), "{message}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn wrong_answers_are_refused() {
    let mut short = hostile("short").unwrap();
    assert_eq!(
        failure(short.decide(&[record("a", "x"), record("b", "y")])),
        CallFailure::WrongCount { expected: 2, got: 1 }
    );
    let mut bad = hostile("bad-redaction").unwrap();
    assert_eq!(
        failure(bad.decide(&[record("a", "four")])),
        CallFailure::BadRedaction { record: "a".into(), start: 0, end: 14, len: 4 }
    );
}

#[test]
fn foreign_contracts_and_ungranted_imports_are_refused_at_load() {
    let err = ResidencyPlugin::load(PluginConfig::new("old", plugin("akosha-wrong-version-plugin"))).err().unwrap();
    assert_eq!(
        err.to_string(),
        "plugin `old` implements akosha:plugin@9.0.0, but this agent speaks akosha:plugin@0.1.0"
    );
    let err = ResidencyPlugin::load(PluginConfig::new("nosy", plugin("akosha-wasi-import-plugin"))).err().unwrap();
    assert_eq!(
        err.to_string(),
        "plugin `nosy` imports `wasi:cli/environment@0.2.0`, which is not granted (policies get no WASI or other host access)"
    );
    let err = ResidencyPlugin::load(PluginConfig::new("compression", plugin("akosha-compression"))).err().unwrap();
    assert!(err.to_string().contains("exports no akosha:plugin/residency-policy"), "{err}");
    let mut pinned = PluginConfig::new("pinned", plugin("akosha-residency"));
    pinned.sha256 = Some("00".repeat(32));
    let err = ResidencyPlugin::load(pinned).err().unwrap();
    assert!(err.to_string().contains("but the configuration pins"), "{err}");
}

#[test]
fn the_compression_policy_picks_by_size_and_entropy() {
    let mut policy = CompressionPlugin::load(PluginConfig::new("compression", plugin("akosha-compression"))).unwrap();
    let tiny = BatchStats { records: 1, bytes: 100, sample: b"hello".to_vec(), ..BatchStats::default() };
    assert_eq!(policy.choose(&tiny).unwrap(), Codec::None);
    let text = b"the quick brown fox jumps over the lazy dog ".repeat(100);
    let texty = BatchStats { records: 100, bytes: 64 << 10, sample: text[..4096].to_vec(), ..BatchStats::default() };
    assert_eq!(policy.choose(&texty).unwrap(), Codec::Zstd(3));
}

fn hostile_config(name: &str, component: &str, mode: &str) -> PluginConfig {
    let mut config = PluginConfig::new(name, plugin(component));
    config.config = vec![("mode".into(), mode.into())];
    config.timeout = Duration::from_millis(200);
    config.memory_limit = 32 << 20;
    config
}

const ROUTING: RoutingConfig = RoutingConfig { default_route: Residency::Cloud, policy_batch_records: 1000 };

/// Every way a residency policy can misbehave, at run time or at load: the stage keeps deciding batches, none
/// of them cloud, and the audit names the plugin and the cause.
#[test]
fn every_hostile_residency_policy_fails_closed() {
    let cases = [
        ("akosha-hostile-plugin", "loop", "timeout"),
        ("akosha-hostile-plugin", "memory-bomb", "memory_limit"),
        ("akosha-hostile-plugin", "trap", "trap"),
        ("akosha-hostile-plugin", "panic", "panic"),
        ("akosha-hostile-plugin", "short", "wrong_count"),
        ("akosha-hostile-plugin", "bad-redaction", "bad_redaction"),
        ("akosha-hostile-plugin", "bad-utf8", "trap"),
        ("akosha-wrong-version-plugin", "", "contract_version"),
        ("akosha-wasi-import-plugin", "", "ungranted_import"),
    ];
    for (component, mode, cause) in cases {
        let name = format!("hostile-{cause}");
        let audit = Arc::new(Audit::default());
        let stage =
            ResidencyStage::load_fail_closed(&[hostile_config(&name, component, mode)], &ROUTING, audit.clone());
        assert!(
            ResidencyStage::load(&[hostile_config(&name, component, mode)], &ROUTING, audit.clone()).is_err()
                == (cause == "contract_version" || cause == "ungranted_import")
        );
        for batch in 0..2 {
            let records: Vec<Record> =
                (0..3).map(|i| record(&format!("{batch}-{i}"), "AKIAIOSFODNN7EXAMPLE and more")).collect();
            let routed = stage.decide(records);
            assert_eq!(routed.routes, [Residency::Onprem; 3], "{name}: batch {batch}");
            assert!(routed.records.iter().all(|r| r.residency == Some(Residency::Onprem)), "{name}");
            // Nothing half-applied from a failed call.
            assert!(routed.records.iter().all(|r| r.text.as_deref() == Some("AKIAIOSFODNN7EXAMPLE and more")));
        }
        let status = audit.status();
        let failures = status["failures"].as_array().unwrap();
        assert_eq!(failures.len(), 1, "{name}: {status}");
        assert_eq!(failures[0]["policy"], name.as_str());
        assert_eq!(failures[0]["cause"], cause);
        assert_eq!(failures[0]["count"], 2);
        assert_eq!(status["failed_closed_records"], 6);
        let recent = status["recent"][0]["reason"].as_str().unwrap();
        assert!(recent.starts_with("failed closed: plugin `hostile-"), "{recent}");
    }
}

#[test]
fn policies_run_in_order_and_the_strictest_route_wins() {
    let audit = Arc::new(Audit::default());
    let mut residency = PluginConfig::new("secrets", plugin("akosha-residency"));
    residency.config = vec![("on_match".into(), "redact".into()), ("drop_tags".into(), "scratch".into())];
    let onprem = hostile_config("everything-onprem", "akosha-hostile-plugin", "onprem-all");
    let stage = ResidencyStage::load(&[residency, onprem], &ROUTING, audit.clone()).unwrap();
    let mut scratch = record("c", "nothing to see");
    scratch.tags = vec!["scratch".into()];
    let routed = stage.decide(vec![record("a", "key AKIAIOSFODNN7EXAMPLE here"), record("b", "plain words"), scratch]);
    assert_eq!(routed.routes, [Residency::Onprem, Residency::Onprem, Residency::Drop]);
    let redacted = routed.records[0].text.as_deref().unwrap();
    assert!(!redacted.contains("AKIAIOSFODNN7EXAMPLE"), "{redacted}");
    let status = audit.status();
    assert_eq!(status["redacted_records"], 1);
    let decisions = status["decisions"].as_array().unwrap();
    assert!(decisions.iter().any(|d| d["policy"] == "secrets" && d["route"] == "drop"), "{status}");
    // The drop was final: the second policy was not asked about it.
    assert!(
        decisions.iter().any(|d| d["policy"] == "everything-onprem" && d["route"] == "onprem" && d["count"] == 2),
        "{status}"
    );
}

#[test]
fn a_failing_compression_policy_costs_only_its_choice() {
    let payload = akosha_protocol::encode_records(&[record("a", &"text ".repeat(2000))]);
    for (mode, cause) in [("loop", "timeout"), ("trap", "trap"), ("panic", "panic"), ("zstd-99", "bad_level")] {
        let audit = Arc::new(Audit::default());
        let configs = [hostile_config("squeeze", "akosha-hostile-compression-plugin", mode)];
        let mut chooser = CompressionChooser::load("cloud", &configs, Codec::Lz4, audit.clone()).unwrap();
        assert_eq!(chooser.choose(&payload, 1), Codec::Lz4, "{mode}");
        assert_eq!(chooser.choose(&payload, 1), Codec::Lz4, "{mode}: again");
        let status = audit.status();
        assert_eq!(status["failures"][0]["policy"], "squeeze");
        assert_eq!(status["failures"][0]["cause"], cause, "{status}");
        assert_eq!(status["codecs"][0]["codec"], "lz4");
        assert_eq!(status["codecs"][0]["batches"], 2);
    }
    // One that cannot be loaded is left out, and the destination's codec is used.
    let audit = Arc::new(Audit::default());
    let configs = [PluginConfig::new("wrong-world", plugin("akosha-residency"))];
    let mut chooser = CompressionChooser::load_skipping_failures("cloud", &configs, Codec::Zstd(3), audit.clone());
    assert!(!chooser.has_policies());
    assert_eq!(chooser.choose(&payload, 1), Codec::Zstd(3));
    assert_eq!(audit.status()["failures"][0]["cause"], "load");
}

/// A policy that keeps timing out is rested after three failures: later batches still fail closed (or fall
/// back), but without waiting out its deadline each time.
#[test]
fn a_policy_that_keeps_failing_is_rested() {
    let audit = Arc::new(Audit::default());
    let stage =
        ResidencyStage::load(&[hostile_config("looping", "akosha-hostile-plugin", "loop")], &ROUTING, audit.clone())
            .unwrap();
    for batch in 0..6 {
        let routed = stage.decide(vec![record(&format!("r{batch}"), "x")]);
        assert_eq!(routed.routes, [Residency::Onprem], "batch {batch}");
    }
    let status = audit.status();
    assert_eq!(status["calls"][0]["calls"], 3, "{status}");
    assert_eq!(status["failures"][0]["count"], 6, "{status}");
    assert_eq!(status["failures"][0]["cause"], "timeout");
    assert_eq!(status["failed_closed_records"], 6);

    let audit = Arc::new(Audit::default());
    let configs = [hostile_config("squeeze", "akosha-hostile-compression-plugin", "loop")];
    let mut chooser = CompressionChooser::load("cloud", &configs, Codec::Lz4, audit.clone()).unwrap();
    for _ in 0..6 {
        assert_eq!(chooser.choose(b"payload", 1), Codec::Lz4);
    }
    let status = audit.status();
    assert_eq!(status["calls"][0]["calls"], 3, "{status}");
    assert_eq!(status["codecs"][0]["batches"], 6);
}
