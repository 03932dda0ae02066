//! Durable ingest throughput of the agent buffer against the raw sequential write bandwidth of the same disk.
//!
//! Records are ~1 KB of text plus a 384-float embedding (the Session-Buddy shape). Concurrent sources append 100
//! records per call, as HTTP requests would, each waiting for its append to be durable before the next one (the
//! default `batch` fsync policy returns only once the chunk is fsynced). Four sources is a light load: it is
//! bound by commit latency (two groups of two appends take turns at the disk). Sixteen keep the disk busy: that
//! is the buffer's throughput.
//!
//! The baseline is `dd … conv=fdatasync` of 512 MiB in the same directory, run right before **and** right after
//! each buffer run (the buffer is compared with their mean: this disk's speed drifts by 2–4× within seconds, so a
//! single `dd` a few seconds away measured the drift more than the buffer). A second baseline, run after, is a
//! bare `pwrite` + `fdatasync` loop with the same append size and group size (what any durable log must do for
//! this workload). `sync` runs before every measurement so none pays for another's write-back. Records are
//! generated before the clock starts (generating 384 random floats and a kilobyte of text was 8 % of the timed
//! samples) and each source cycles through its own set: the buffer neither reads nor deduplicates ids, so what is
//! timed is encoding, storing and syncing.
//!
//! Two situations: `steady`, the agent at work — a drain task takes batches and acknowledges them as the sender
//! does when the aggregator keeps up (it reads every chunk back), so spent segments are recycled; and `filling`,
//! the aggregator away — nothing is acknowledged and every segment is a new file.
//!
//! `cargo bench --profile release --workspace --bench buffer_ingest [-- <seconds>]` (`BENCH_ONLY=<text>` runs
//! the situations whose name contains it; `BENCH_SOURCES=<n>` sets the number of sources of every situation).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use akosha_agent::buffer::{Buffer, BufferConfig, FsyncPolicy};
use akosha_e2e::bench_record as record;
use akosha_protocol::Record;

/// Concurrent sources of a situation, unless `BENCH_SOURCES` sets them.
fn sources(situation: usize) -> usize {
    std::env::var("BENCH_SOURCES").ok().and_then(|s| s.parse().ok()).filter(|n| *n > 0).unwrap_or(situation)
}
const PER_APPEND: usize = 100;
/// Distinct appends each source cycles through (~10 MB of records per source, beyond any CPU cache).
const PREPARED_APPENDS: usize = 40;
/// Rounds per policy; the median ratio is reported.
const ROUNDS: usize = 5;

fn main() {
    let seconds: u64 = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(5);
    let dir =
        tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| std::env::temp_dir().display().to_string()))
            .expect("temp dir");
    // This machine's disk is shared and noisy: every round measures dd right before and right after the buffer,
    // and the median of the per-round ratios is reported.
    let default = FsyncPolicy::Batch { window: Duration::ZERO };
    for (name, fsync, drain, situation_sources) in [
        ("batch (default, 0ms window), steady, 16 sources", default, true, 16),
        ("batch (default, 0ms window), steady, 4 sources", default, true, 4),
        ("batch (default, 0ms window), filling, 4 sources", default, false, 4),
        ("batch (2ms window), steady, 4 sources", FsyncPolicy::Batch { window: Duration::from_millis(2) }, true, 4),
        ("always, steady, 4 sources", FsyncPolicy::Always, true, 4),
    ] {
        if std::env::var("BENCH_ONLY").is_ok_and(|only| !name.contains(&only)) {
            continue;
        }
        let sources = sources(situation_sources);
        let mut rounds = Vec::new();
        for _ in 0..ROUNDS {
            // Each measurement starts from a clean page cache: neither inherits the other's write-back.
            settle();
            let raw_before = dd_bandwidth(dir.path(), 512);
            settle();
            let cpu_before = akosha_e2e::process_cpu_seconds();
            let (records, bytes, elapsed) = run(dir.path(), name, fsync, drain, sources, Duration::from_secs(seconds));
            let cores = (akosha_e2e::process_cpu_seconds() - cpu_before) / elapsed.as_secs_f64();
            let mbps = bytes as f64 / elapsed.as_secs_f64() / 1e6;
            settle();
            let raw = (raw_before + dd_bandwidth(dir.path(), 512)) / 2.0;
            settle();
            let floor = write_sync_loop(dir.path(), bytes / records.max(1) * PER_APPEND as u64, sources, elapsed);
            rounds.push((mbps / raw, records as f64 / elapsed.as_secs_f64(), mbps, raw, mbps / floor, cores));
        }
        rounds.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (ratio, rps, mbps, raw, _, cores) = rounds[ROUNDS / 2];
        let mut of_loop: Vec<f64> = rounds.iter().map(|r| r.4).collect();
        of_loop.sort_by(f64::total_cmp);
        println!(
            "buffer fsync={name}: median of {ROUNDS} rounds: {rps:.0} records/s, {mbps:.1} MB/s durable vs dd {raw:.1} MB/s (mean of before and after) = {:.0}% of raw (rounds: {}); {:.0}% of a bare pwrite+fdatasync loop; {cores:.2} cores busy",
            100.0 * ratio,
            rounds.iter().map(|r| format!("{:.0}%", 100.0 * r.0)).collect::<Vec<_>>().join(", "),
            100.0 * of_loop[ROUNDS / 2],
        );
    }
}

fn run(
    dir: &Path,
    name: &str,
    fsync: FsyncPolicy,
    drain: bool,
    sources: usize,
    duration: Duration,
) -> (u64, u64, Duration) {
    let path = dir.join(name.replace([' ', ',', '(', ')'], "_"));
    let config = BufferConfig { max_bytes: 64 << 30, fsync, ..BufferConfig::default() };
    let buffer = Buffer::open(&path, config).expect("open buffer");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let records = Arc::new(AtomicU64::new(0));
    let prepared: Vec<Arc<Vec<Vec<Record>>>> = (0..sources)
        .map(|source| {
            let appends = (0..PREPARED_APPENDS)
                .map(|a| (0..PER_APPEND).map(|i| record(source * 1_000_000_000 + a * PER_APPEND + i)).collect())
                .collect();
            Arc::new(appends)
        })
        .collect();
    let start = Instant::now();
    runtime.block_on(async {
        let drainer = drain.then(|| {
            let buffer = buffer.clone();
            tokio::spawn(async move {
                while start.elapsed() < duration {
                    match buffer.next_batch(2000, 4 << 20).expect("take a batch") {
                        Some(batch) => {
                            buffer.ack(&batch.chunks).expect("ack");
                        }
                        None => {
                            let _ = tokio::time::timeout(Duration::from_millis(10), buffer.wait_for_data()).await;
                        }
                    }
                }
            })
        });
        let mut tasks = Vec::new();
        for appends in &prepared {
            let (buffer, records, appends) = (buffer.clone(), records.clone(), appends.clone());
            tasks.push(tokio::spawn(async move {
                for batch in appends.iter().cycle() {
                    if start.elapsed() >= duration {
                        break;
                    }
                    buffer.append(batch, Duration::from_secs(10)).await.expect("append");
                    records.fetch_add(PER_APPEND as u64, Ordering::Relaxed);
                }
            }));
        }
        for t in tasks {
            t.await.expect("source task");
        }
        if let Some(drainer) = drainer {
            drainer.await.expect("drain task");
        }
    });
    let elapsed = start.elapsed();
    let stats = buffer.stats();
    drop(buffer);
    let _ = std::fs::remove_dir_all(&path);
    (records.load(Ordering::Relaxed), stats.appended_bytes, elapsed)
}

/// MB/s of the least any durable append log must do with this workload: one thread `pwrite`s appends of
/// `append_bytes` (already encoded) to one file and `fdatasync`s after every `sources` of them — the group a
/// commit sees when each of the sources waits for its append — for `duration`.
fn write_sync_loop(dir: &Path, append_bytes: u64, sources: usize, duration: Duration) -> f64 {
    use std::os::unix::fs::FileExt;
    let path = dir.join("loop.bin");
    let file = std::fs::File::create(&path).expect("create loop file");
    let block: Vec<u8> = (0..append_bytes).map(|i| ((i * 2_654_435_761) >> 13) as u8).collect();
    let start = Instant::now();
    let mut offset = 0u64;
    while start.elapsed() < duration {
        for _ in 0..sources {
            file.write_all_at(&block, offset).expect("write");
            offset += append_bytes;
        }
        file.sync_data().expect("fdatasync");
    }
    let elapsed = start.elapsed();
    drop(file);
    let _ = std::fs::remove_file(&path);
    offset as f64 / elapsed.as_secs_f64() / 1e6
}

/// Writes every dirty page back (`sync`), so that the next measurement does not pay for the previous one.
fn settle() {
    let status = Command::new("sync").status().expect("run sync");
    assert!(status.success(), "sync failed");
}

/// MB/s of `dd` writing `mib` MiB with a final fdatasync, in `dir`.
fn dd_bandwidth(dir: &Path, mib: u64) -> f64 {
    let target = dir.join("dd.bin");
    let start = Instant::now();
    let status = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", target.display()))
        .args(["bs=1M", &format!("count={mib}"), "conv=fdatasync", "status=none"])
        .status()
        .expect("run dd");
    assert!(status.success(), "dd failed");
    let elapsed = start.elapsed();
    let _ = std::fs::remove_file(&target);
    (mib << 20) as f64 / elapsed.as_secs_f64() / 1e6
}
