//! The agent as a product on a developer machine: idle RSS and CPU with every source on, and RSS while
//! ingesting at full speed. Targets: idle RSS under 40 MB, idle CPU under 0.5 % of a core.
//!
//! Sources on: Session-Buddy snapshots (a copy of the fixture databases), an NDJSON file tail, the HTTP push and
//! NDJSON endpoints; one destination, connected.
//!
//! `cargo bench --profile release --workspace --bench footprint [-- <idle seconds>]`

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use akosha_e2e::{Agent, AgentOptions, Aggregator, Site, ndjson};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let idle_seconds: u64 = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(30);
    let site = Site::new()?;
    let aggregator = Aggregator::start(&site, "aggregator").await?;
    let sb = site.session_buddy_data(&["reflection.duckdb", "knowledge_graph.duckdb"])?;
    let tailed = site.path("tailed.ndjson");
    std::fs::write(&tailed, ndjson(0..10, "entity"))?;
    let options = AgentOptions {
        sources: format!(
            "{{session_buddy: {{snapshots: true, data_dir: {}, interval: 30s}}, files: [{{path: {}}}]}}",
            sb.display(),
            tailed.display()
        ),
        ..AgentOptions::default()
    };
    let agent = Agent::start(&site, "agent", "edge-host-1", aggregator.quic_port, &options).await?;
    aggregator.wait_total(77, Duration::from_secs(60)).await?;
    let pid = agent.proc.pid().expect("agent running");
    tokio::time::sleep(Duration::from_secs(3)).await;

    let ticks_per_second: f64 = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0);
    let cpu_before = cpu_ticks(pid)?;
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(idle_seconds)).await;
    let cpu = (cpu_ticks(pid)? - cpu_before) as f64 / ticks_per_second / start.elapsed().as_secs_f64();
    let idle_rss = rss_kib(pid, "VmRSS")?;
    println!(
        "agent idle ({idle_seconds}s, all sources on, connected): RSS {:.1} MB (anonymous {:.1} MB, file-backed {:.1} MB), CPU {:.3}% of a core",
        idle_rss as f64 / 1024.0,
        rss_kib(pid, "RssAnon")? as f64 / 1024.0,
        rss_kib(pid, "RssFile")? as f64 / 1024.0,
        cpu * 100.0
    );

    // Full speed: two clients posting 1,000-record requests for 15 s; peak RSS sampled every 100 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let template = Arc::new(ndjson(0..1000, "conversation"));
    let mut clients = Vec::new();
    for client in 0..2 {
        let (stop, template, url) = (stop.clone(), template.clone(), agent.url.clone());
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let body = template.replace("\"id\":\"r", &format!("\"id\":\"c{client}b{n}-r"));
                n += 1;
                let _ = http.post(format!("{url}/v1/records")).body(body).send().await;
            }
        }));
    }
    let mut peak = 0;
    let load_start = Instant::now();
    while load_start.elapsed() < Duration::from_secs(15) {
        peak = peak.max(rss_kib(pid, "VmRSS")?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await?;
    }
    println!(
        "agent at full ingest speed (15s): peak RSS {:.1} MB (VmHWM {:.1} MB)",
        peak as f64 / 1024.0,
        rss_kib(pid, "VmHWM")? as f64 / 1024.0
    );
    Ok(())
}

fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces): utime is the 14th field, stime the 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

fn rss_kib(pid: u32, key: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with(key)).ok_or_else(|| anyhow::anyhow!("no {key}"))?;
    Ok(line.split_whitespace().nth(1).unwrap_or("0").parse()?)
}
