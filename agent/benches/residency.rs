//! What running the residency policy in WASM costs, against the same rules compiled natively.
//!
//! Records are Session-Buddy-like (≈600 bytes of prose, project, tags, metadata; one in ten carries a secret or
//! an e-mail address). The native side calls `akosha_residency::rules::Rules::decide` on borrowed records; the
//! WASM side is the agent's real path: `ResidencyPlugin::decide` with the built component (copying records
//! into the guest, running the same rules there, checking the decisions). Batches of 1, 100 and 1,000, each
//! side timed in the same rounds (median of the per-round ratios). The
//! last column is the same path with a plugin that decides nothing (the hostile fixture in `cloud-all` mode):
//! what crossing into the guest and back costs by itself.
//!
//! `scripts/build-plugins.sh && cargo bench --profile release --workspace --bench residency [-- <seconds>]`

use std::time::{Duration, Instant};

use akosha_agent::plugin::{PluginConfig, ResidencyPlugin};
use akosha_protocol::{Record, RecordKind};
use akosha_residency::rules::{RecordView, Rules};

fn records(n: usize) -> Vec<Record> {
    let prose = "Refactored the ingestion path so that batches are validated before they reach the buffer; \
                 the parser now rejects oversized lines early and the tests cover rotation and truncation. \
                 Next: measure the group commit window against the disk's fdatasync latency and document it. ";
    (0..n)
        .map(|i| {
            let mut text = format!("{i}: {prose}{prose}");
            match i % 10 {
                3 => text.push_str(" The key was AKIAIOSFODNN7EXAMPLE, rotate it."),
                7 => text.push_str(" Ask jane.doe@example.com for access."),
                _ => {}
            }
            Record {
                system_id: "dev-1".into(),
                kind: RecordKind::Conversation,
                id: format!("rec-{i}"),
                ts: 1,
                project: Some(if i % 5 == 0 { "client-x".into() } else { "akosha".into() }),
                tags: vec!["session".into(), "rust".into()],
                text: Some(text),
                metadata: Some(r#"{"source":"session-buddy","turn":3}"#.into()),
                ..Record::default()
            }
        })
        .collect()
}

fn main() {
    let seconds: f64 = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(2.0);
    let plugin = std::env::var_os("AKOSHA_PLUGIN_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().expect("bench path");
            exe.ancestors().nth(3).expect("target dir").join("plugins")
        })
        .join("akosha-residency.wasm");
    assert!(plugin.exists(), "{} missing: run scripts/build-plugins.sh", plugin.display());
    let config = vec![("onprem_projects".to_owned(), "client-*".to_owned())];
    let rules = Rules::from_config(&config).expect("rules");
    let mut settings = PluginConfig::new("residency", &plugin);
    settings.config = config;
    let mut wasm = ResidencyPlugin::load(settings).expect("plugin");
    let mut noop_settings = PluginConfig::new("noop", plugin.with_file_name("akosha-hostile-plugin.wasm"));
    noop_settings.config = vec![("mode".to_owned(), "cloud-all".to_owned())];
    let mut noop = ResidencyPlugin::load(noop_settings).expect("no-op plugin");

    println!("| batch | native rec/s | WASM rec/s | WASM / native time | added per record | boundary alone |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for batch in [1usize, 100, 1000] {
        let input = records(batch.max(100));
        let chunk = &input[..batch];
        // Same decisions both ways.
        let native_routes: Vec<_> = chunk.iter().map(|r| format!("{:?}", rules.decide(&view(r)).route)).collect();
        let wasm_routes: Vec<_> = wasm.decide(chunk).expect("wasm").iter().map(|d| format!("{:?}", d.route)).collect();
        assert_eq!(native_routes, wasm_routes);

        let rounds = interleaved(
            seconds,
            batch,
            &mut [
                &mut || {
                    for r in chunk {
                        std::hint::black_box(rules.decide(&view(r)));
                    }
                },
                &mut || {
                    std::hint::black_box(wasm.decide(chunk).expect("wasm"));
                },
                &mut || {
                    std::hint::black_box(noop.decide(chunk).expect("wasm"));
                },
            ],
        );
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let native = median(rounds.iter().map(|r| r[0]).collect());
        let in_wasm = median(rounds.iter().map(|r| r[1]).collect());
        let boundary = median(rounds.iter().map(|r| r[2]).collect());
        let ratio = median(rounds.iter().map(|r| r[1] / r[0]).collect());
        let added = median(rounds.iter().map(|r| r[1] - r[0]).collect());
        println!(
            "| {batch} | {:.0} | {:.0} | {ratio:.2}× | {:.2} µs | {:.2} µs |",
            1.0 / native,
            1.0 / in_wasm,
            added * 1e6,
            boundary * 1e6,
        );
    }
}

fn view(r: &Record) -> RecordView<'_> {
    RecordView {
        project: r.project.as_deref(),
        tags: &r.tags,
        text: r.text.as_deref(),
        name: r.name.as_deref(),
        metadata: r.metadata.as_deref(),
    }
}

/// Seconds per record of each of `fs` (one call = one batch of `batch` records), measured in rounds that run
/// every `f` back to back: on a shared, noisy machine a ratio is only fair between measurements taken at the
/// same moment, so ratios are taken per round and the caller reports their median.
fn interleaved(seconds: f64, batch: usize, fs: &mut [&mut dyn FnMut()]) -> Vec<Vec<f64>> {
    for f in fs.iter_mut() {
        for _ in 0..3 {
            f();
        }
    }
    let calls = (2000 / batch).max(1);
    let deadline = Instant::now() + Duration::from_secs_f64(seconds * fs.len() as f64);
    let mut rounds = Vec::new();
    while Instant::now() < deadline || rounds.len() < 5 {
        let round = fs
            .iter_mut()
            .map(|f| {
                let start = Instant::now();
                for _ in 0..calls {
                    f();
                }
                start.elapsed().as_secs_f64() / (calls * batch) as f64
            })
            .collect();
        rounds.push(round);
    }
    rounds
}
