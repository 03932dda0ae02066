//! The cold tier: migration throughput (hot→warm, warm→cold over S3), bytes per record in cold against the raw
//! record, and cold query latency for one system-day and for a 30-day range, with a cold and a warm cache.
//!
//! `cargo bench --profile release --workspace --bench cold -- [records per system-day, default 2000]`
//!
//! 3 systems × 30 days × 2 kinds of records with 384-dimension vectors and ~60 words of text each, 100 to 130
//! days old, so that one warm→cold move takes all of them. Each record has the fields Session-Buddy's tables give
//! the agent (see [`session_buddy_record`]). The S3 server is SeaweedFS on loopback (from `scripts/setup.sh`),
//! started by the bench.
//!
//! `AKOSHA_BENCH_COLD=local` puts the cold tier in a local directory (an on-prem disk: `file://`) instead, so the
//! move shares the two cores with no S3 server.
//!
//! `AKOSHA_BENCH_TEXT_BYTES=N` gives each record N bytes of real developer text instead (see [`Prose`]): the
//! 60 words come from a 32-word list and compress far better than any real text, so they show the vectors' share
//! of the bytes, not what a record with a real conversation in it costs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use akosha_aggregator::cold::{ColdConfig, EmbeddingEncoding};
use akosha_aggregator::hot::HotTier;
use akosha_aggregator::query::QueryService;
use akosha_aggregator::search::Filters;
use akosha_aggregator::warm::WarmConfig;
use akosha_e2e::s3::{ACCESS_KEY, S3Server, SECRET_KEY};
use akosha_protocol::{Record, RecordKind};

/// The aggregator binary's allocator (see its `main.rs`), so that the bench measures what ships.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const DAY: i64 = 86_400_000_000;
const WORDS: &[&str] = &[
    "the",
    "agent",
    "buffer",
    "policy",
    "quic",
    "search",
    "vector",
    "index",
    "tier",
    "rust",
    "duckdb",
    "parquet",
    "session",
    "memory",
    "reflection",
    "project",
    "error",
    "fixed",
    "test",
    "deploy",
    "config",
    "latency",
    "throughput",
    "cache",
    "redis",
    "schema",
    "migration",
    "object",
    "storage",
    "compaction",
    "query",
    "user",
];

fn main() {
    let per_day: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(2000);
    // `AKOSHA_BENCH_EMBEDDINGS=int8` stores cold embeddings quantized.
    let encoding: EmbeddingEncoding = std::env::var("AKOSHA_BENCH_EMBEDDINGS")
        .ok()
        .map(|v| v.parse().expect("AKOSHA_BENCH_EMBEDDINGS: f32 or int8"))
        .unwrap_or_default();
    println!("cold embeddings: {encoding:?}");
    let mut prose = std::env::var("AKOSHA_BENCH_TEXT_BYTES").ok().map(|n| {
        let n: usize = n.parse().expect("AKOSHA_BENCH_TEXT_BYTES: a number of bytes");
        println!("text: {n} bytes of developer prose and code per record");
        (Prose::from_cargo_registry(), n)
    });
    // `RUST_LOG=akosha_aggregator=debug` shows each move's phases.
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (s3, url, options) = match std::env::var("AKOSHA_BENCH_COLD").as_deref() {
        Ok("local") => {
            let objects = dir.path().join("objects");
            std::fs::create_dir_all(&objects).unwrap();
            (None, format!("file://{}", objects.display()), Vec::new())
        }
        Ok("s3") | Err(_) => {
            let s3 = runtime.block_on(S3Server::start(&dir.path().join("s3"), &["cold"])).expect("SeaweedFS");
            let options = vec![
                ("endpoint".into(), s3.endpoint.clone()),
                ("allow_http".into(), "true".into()),
                ("access_key_id".into(), ACCESS_KEY.into()),
                ("secret_access_key".into(), SECRET_KEY.into()),
                ("region".into(), "us-east-1".into()),
            ];
            (Some(s3), "s3://cold/bench".to_owned(), options)
        }
        Ok(other) => panic!("AKOSHA_BENCH_COLD: local or s3, not {other}"),
    };
    println!("cold tier: {url}");
    // Noon (UTC) today: a system-day's records, up to 1,000 s apart, then lie in one UTC date whatever the hour
    // the bench runs, so the objects (one per kind, system and date) and their bytes do not depend on it.
    let now = jiff::Timestamp::now().as_microsecond().div_euclid(DAY) * DAY + DAY / 2;
    let mut rng = akosha_e2e::Xorshift(0x2545_F491_4F6C_DD1D);

    let hot = Arc::new(HotTier::open("16GB", 1, None).unwrap());
    hot.attach_warm(WarmConfig {
        enabled: true,
        path: dir.path().join("warm.duckdb"),
        hot_window: Duration::from_secs(7 * 86_400),
        move_interval: Duration::from_secs(3600),
        hot_window_per_kind: Default::default(),
        schedule: None,
    })
    .unwrap();
    let cold = hot
        .attach_cold(ColdConfig {
            enabled: true,
            url: url.clone(),
            options,
            warm_window: Duration::from_secs(90 * 86_400),
            move_interval: Duration::from_secs(3600),
            cache_dir: dir.path().join("cache"),
            cache_max_bytes: 8 << 30,
            row_group_rows: 122_880,
            embedding_encoding: encoding,
            parallel_fetches: 8,
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(30),
            retry_timeout: Duration::from_secs(30),
            promotion: Default::default(),
            encryption: None,
            warm_window_per_kind: Default::default(),
            schedule: None,
            cache_on_write: false,
        })
        .unwrap();

    let mut raw_bytes = 0u64;
    let mut total = 0u64;
    let mut probe = None;
    let mut all: Vec<(String, Vec<f32>)> = Vec::new();
    for day in 0..30i64 {
        let mut batch = Vec::new();
        for system in 0..3 {
            for i in 0..per_day {
                let n = total as usize + batch.len();
                let text = match &mut prose {
                    Some((prose, bytes)) => prose.take(*bytes),
                    None => {
                        let words: Vec<&str> =
                            (0..60).map(|_| WORDS[(rng.next() % WORDS.len() as u64) as usize]).collect();
                        words.join(" ")
                    }
                };
                let ts = now - (100 + day) * DAY + (i as i64) * 1_000_000;
                let embedding = normalised(akosha_e2e::clustered_vector(n as u64, 384, |d| d % 32 == n % 32, 2.0));
                let mut record = session_buddy_record(&mut rng, format!("host-{system}"), i, format!("r{n}"), ts, text);
                record.embedding = Some(embedding);
                raw_bytes += akosha_protocol::encode_records(std::slice::from_ref(&record)).len() as u64;
                all.push((record.id.clone(), record.embedding.clone().unwrap()));
                if probe.is_none() && system == 1 && day == 10 {
                    probe = record.embedding.clone();
                }
                batch.push(record);
            }
        }
        total += batch.len() as u64;
        hot.insert(&batch).unwrap();
    }
    hot.wait_indexed(Duration::from_secs(3600));
    println!(
        "{total} records, raw (binary wire encoding, uncompressed) {:.1} bytes/record",
        raw_bytes as f64 / total as f64
    );

    let t = Instant::now();
    hot.move_to_warm(now - 7 * DAY).unwrap().unwrap();
    let warm_s = t.elapsed().as_secs_f64();
    println!("hot→warm: {total} rows in {warm_s:.2} s = {:.0} rows/s", total as f64 / warm_s);
    // CPU time as well as wall time: on a shared box the wall time of a 3-second move swings with the neighbours,
    // the CPU it takes much less.
    let s3_pid = s3.as_ref().map(|s3| s3.proc.pid().expect("SeaweedFS runs"));
    let s3_cpu_seconds = || s3_pid.map_or(0.0, akosha_e2e::pid_cpu_seconds);
    let (cpu, s3_cpu) = (akosha_e2e::process_cpu_seconds(), s3_cpu_seconds());
    let t = Instant::now();
    let report = hot.move_to_cold(now - 90 * DAY).unwrap().unwrap();
    let cold_s = t.elapsed().as_secs_f64();
    let (cpu, s3_cpu) = (akosha_e2e::process_cpu_seconds() - cpu, s3_cpu_seconds() - s3_cpu);
    let server = if s3.is_some() { format!(" + {s3_cpu:.2} s in the S3 server") } else { String::new() };
    println!(
        "warm→cold over {url}: {} rows in {} objects in {cold_s:.2} s = {:.0} rows/s; CPU {cpu:.2} s here{server} = \
         {:.0} rows per CPU-second",
        report.records,
        report.objects,
        report.records as f64 / cold_s,
        report.records as f64 / (cpu + s3_cpu)
    );
    let verified = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "uploads verified: {} by a declared checksum, {} by their ETag, {} read back",
        verified(&cold.uploads_verified_by_checksum),
        verified(&cold.uploads_verified_by_etag),
        verified(&cold.uploads_read_back)
    );
    let (objects, rows, bytes) = cold.totals().unwrap();
    println!(
        "cold: {objects} objects, {rows} rows, {bytes} bytes = {:.1} bytes/record = {:.2} % of raw",
        bytes as f64 / rows as f64,
        100.0 * bytes as f64 / raw_bytes as f64
    );

    let service = QueryService::new(hot.clone(), None);
    let probe = probe.unwrap();
    let one_day = Filters {
        system_ids: vec!["host-1".into()],
        since_us: Some(now - 110 * DAY),
        until_us: Some(now - 109 * DAY),
        ..Filters::default()
    };
    let thirty_days = Filters { since_us: Some(now - 131 * DAY), until_us: Some(now - 99 * DAY), ..Filters::default() };
    for (name, filters) in [("one system-day", &one_day), ("30 days, 3 systems", &thirty_days)] {
        for cache in ["cold cache", "warm cache"] {
            let mut times = Vec::new();
            for _ in 0..if name.starts_with("one") { 40 } else { 8 } {
                if cache == "cold cache" {
                    cold.cache().clear();
                }
                let t = Instant::now();
                let hits = service.vector(&probe, 10, filters).unwrap();
                times.push(t.elapsed().as_secs_f64() * 1000.0);
                assert_eq!(hits.len(), 10);
            }
            times.sort_by(f64::total_cmp);
            let p = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
            println!("cold vector top-10, {name}, {cache}: p50 {:.1} ms, p99 {:.1} ms", p(0.5), p(0.99));
        }
    }

    // Recall@10 of cold vector search against the exact top 10 over the ingested f32 vectors: new vectors near
    // each of the 32 clusters, every record a candidate (each cluster holds ~1/32 of them, so the 10th and 11th
    // are close: a hard case for quantization).
    let mut found = 0;
    let probes = 32;
    for j in 0..probes {
        let probe = normalised(akosha_e2e::clustered_vector(1_000_000_007 + j as u64, 384, |d| d % 32 == j % 32, 2.0));
        let dot = |v: &[f32]| v.iter().zip(&probe).map(|(a, b)| a * b).sum::<f32>();
        let mut exact: Vec<(f32, &str)> = all.iter().map(|(id, v)| (dot(v), id.as_str())).collect();
        exact.sort_by(|a, b| b.0.total_cmp(&a.0));
        let truth: std::collections::HashSet<&str> = exact[..10].iter().map(|(_, id)| *id).collect();
        let hits = service.vector(&probe, 10, &thirty_days).unwrap();
        found += hits.iter().filter(|h| truth.contains(h.record["id"].as_str().unwrap())).count();
    }
    println!("cold vector recall@10 over {probes} probes: {:.3}", found as f64 / (10 * probes) as f64);
    drop(service);
    drop(s3);
}

/// A record with the fields Session-Buddy's tables give the agent for a memory (`small/reflection.duckdb` in the
/// fixtures): conversations (even `i`) carry its metadata JSON — session, model, tools used, token counts, when
/// it was extracted — and a category; reflections carry three tags and no metadata. All of it is part of the raw
/// record the cold bytes are compared with, and none of it is constant: sessions change every 20 records, tools
/// and token counts at random.
fn session_buddy_record(
    rng: &mut akosha_e2e::Xorshift,
    system_id: String,
    i: usize,
    id: String,
    ts: i64,
    text: String,
) -> Record {
    const PROJECTS: &[&str] = &["mahavishnu", "crackerjack", "session-buddy", "akosha", "acb"];
    const CATEGORIES: &[&str] = &["skills", "facts", "claude_turn", "preferences", "decisions"];
    const TOOLS: &[&str] = &["Read", "Write", "Edit", "Grep", "Glob", "Bash", "WebFetch"];
    const TAGS: &[&str] = &["minio", "testing", "rust", "duckdb", "ci", "performance", "security", "docs"];
    let project = PROJECTS[i / 7 % PROJECTS.len()];
    fn pick(rng: &mut akosha_e2e::Xorshift, options: &[&'static str]) -> &'static str {
        options[(rng.next() % options.len() as u64) as usize]
    }
    let (kind, category, tags, metadata) = if i.is_multiple_of(2) {
        let tools: Vec<&str> = (0..1 + i % 3).map(|_| pick(rng, TOOLS)).collect();
        let extracted_at = jiff::Timestamp::from_microsecond(ts + 1_234_567).expect("a timestamp");
        let metadata = serde_json::json!({
            "project": project,
            "source_session": format!("sess-{:02}-{:04}", i / 400 % 100, i / 20),
            "model": pick(rng, &["claude-sonnet-4-5", "claude-opus-4-1", "claude-haiku-4-5"]),
            "tool_names": tools,
            "token_usage": {"input": 100 + rng.next() % 6000, "output": 20 + rng.next() % 3000},
            "extracted_at": extracted_at.strftime("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string(),
        });
        (RecordKind::Conversation, pick(rng, CATEGORIES), Vec::new(), Some(metadata.to_string()))
    } else {
        let tags = (0..3).map(|_| pick(rng, TAGS).to_owned()).collect();
        (RecordKind::Reflection, "context", tags, None)
    };
    Record {
        system_id,
        kind,
        id,
        ts,
        project: Some(project.to_owned()),
        namespace: Some("default".to_owned()),
        category: Some(category.to_owned()),
        text: Some(text),
        tags,
        metadata,
        importance: Some(0.5),
        ..Record::default()
    }
}

fn normalised(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

/// Real text written by developers, each byte handed out once: the Markdown and Rust files of the crates in the
/// local cargo registry (one version per crate, files over 64 KiB — generated tables — skipped), the nearest
/// thing on an offline machine to the conversations about code that Session-Buddy stores.
struct Prose {
    files: std::vec::IntoIter<std::path::PathBuf>,
    pending: String,
}

impl Prose {
    fn from_cargo_registry() -> Prose {
        let home = std::env::var_os("CARGO_HOME")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cargo"));
        let mut crates = std::collections::BTreeMap::new();
        for index in std::fs::read_dir(home.join("registry/src")).expect("a cargo registry").flatten() {
            for krate in std::fs::read_dir(index.path()).into_iter().flatten().flatten() {
                let dir = krate.file_name().to_string_lossy().into_owned();
                // `name-1.2.3`: the last `-` before a digit ends the name; later versions sort last and win.
                let name =
                    dir.rmatch_indices('-').find(|(i, _)| dir[i + 1..].starts_with(|c: char| c.is_ascii_digit()));
                let name = name.map_or(dir.as_str(), |(i, _)| &dir[..i]).to_owned();
                crates.insert(name, krate.path());
            }
        }
        let mut files = Vec::new();
        for dir in crates.values() {
            let mut stack = vec![dir.clone()];
            let mut found = Vec::new();
            while let Some(dir) = stack.pop() {
                for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    let path = entry.path();
                    let Ok(meta) = entry.metadata() else { continue };
                    if meta.is_dir() {
                        stack.push(path);
                    } else if matches!(path.extension().and_then(|e| e.to_str()), Some("md" | "rs"))
                        && meta.len() < 64 << 10
                    {
                        found.push(path);
                    }
                }
            }
            found.sort();
            files.extend(found);
        }
        Prose { files: files.into_iter(), pending: String::new() }
    }

    /// The next `bytes` bytes (to a character boundary).
    fn take(&mut self, bytes: usize) -> String {
        while self.pending.len() < bytes {
            let file = self.files.next().expect("the cargo registry holds enough text for this many records");
            if let Ok(text) = std::fs::read_to_string(file) {
                self.pending.push_str(&text);
            }
        }
        let mut end = bytes;
        while !self.pending.is_char_boundary(end) {
            end += 1;
        }
        let rest = self.pending.split_off(end);
        std::mem::replace(&mut self.pending, rest)
    }
}
