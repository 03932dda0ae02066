//! `akosha-agent`: runs the edge agent, validates its configuration, and reports its status.

use std::path::{Path, PathBuf};

use akosha_agent::Agent;
use akosha_agent::config::AgentConfig;
use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "akosha-agent",
    version,
    about = "Edge agent: buffers local memories and streams them to an akosha aggregator"
)]
struct Cli {
    /// Configuration file.
    #[arg(long, short, global = true, env = "AKOSHA_AGENT_CONFIG", default_value = "~/.akosha/agent.yaml")]
    config: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent until SIGINT/SIGTERM.
    Run,
    /// Check the configuration (and the TLS files it names) without starting.
    Validate,
    /// Show the running agent's sources, buffers and destinations.
    Status {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Internal: read one Session-Buddy snapshot and print its records (run by the agent as a child process).
    #[command(hide = true)]
    SnapshotWorker {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        snapshot_dir: PathBuf,
        #[arg(long)]
        timezone: String,
        #[arg(long)]
        system_id: String,
    },
    /// Inspect the buffers on disk (counts, sizes, oldest/newest, corrupted entries, dead letters).
    Buffer {
        #[command(subcommand)]
        command: BufferCommand,
    },
    /// Work with WASM policy plugins (no configuration or running agent needed).
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Print a plugin's contract version, exports and imports, and whether this agent can load it.
    Inspect {
        /// The `.wasm` component.
        plugin: PathBuf,
    },
    /// Run a residency plugin over NDJSON records and print the decision per record and the time per batch.
    Test {
        /// The `.wasm` component.
        plugin: PathBuf,
        /// Records, one JSON object per line (the agent's ingest format).
        records: PathBuf,
        /// Configuration passed to the plugin, key=value; repeatable.
        #[arg(long = "set", short = 's', value_parser = parse_key_value)]
        set: Vec<(String, String)>,
        /// Records per call.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        /// Time budget per call.
        #[arg(long, default_value = "500ms", value_parser = parse_duration)]
        timeout: std::time::Duration,
    },
    /// Turn a core module built with wit-bindgen into a component (what `wasm-tools component new` does).
    Componentize {
        /// The core module.
        module: PathBuf,
        /// Where to write the component.
        #[arg(long, short)]
        output: PathBuf,
    },
}

#[derive(Subcommand)]
enum BufferCommand {
    /// Read every destination's buffer; asks the running agent, or reads the files when it is stopped.
    Inspect {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The worker is started by a running agent with everything on its command line; it reads no configuration.
    let command = match cli.command {
        Command::SnapshotWorker { data_dir, snapshot_dir, timezone, system_id } => {
            return snapshot_worker(&data_dir, &snapshot_dir, &timezone, &system_id);
        }
        Command::Plugin { command } => return plugin_command(command),
        other => other,
    };
    let home = std::env::var("HOME").ok();
    let config_path = PathBuf::from(akosha_protocol::settings::expand_home(&cli.config, home.as_deref()));
    let config =
        AgentConfig::load(&config_path).with_context(|| format!("invalid configuration {}", config_path.display()))?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the runtime")?;
    match command {
        Command::Run => {
            init_logging(&config);
            runtime.block_on(async {
                let listener = tokio::net::TcpListener::bind(config.ingest.listen)
                    .await
                    .with_context(|| format!("cannot listen on {}", config.ingest.listen))?;
                Agent::run(config, listener, shutdown_signal()).await.context("agent failed")
            })
        }
        Command::Validate => {
            for (name, dest) in &config.destinations {
                akosha_agent::tls::client_config(dest, &config.system_id)
                    .with_context(|| format!("destination `{name}`"))?;
            }
            // Loading a policy checks its pin, contract version, imports and configuration, as `run` would.
            let audit = std::sync::Arc::new(akosha_agent::policy::Audit::default());
            let residency =
                akosha_agent::policy::ResidencyStage::load(&config.policies.residency, &config.routing, audit.clone())
                    .context("residency policies")?;
            let compression = akosha_agent::policy::CompressionChooser::load(
                "validate",
                &config.policies.compression,
                akosha_protocol::Codec::None,
                audit,
            )
            .context("compression policies")?;
            for identity in residency.identities().iter().chain(&compression.identities()) {
                println!(
                    "policy {} ({}): contract {}, sha256 {}",
                    identity.name,
                    identity.path.display(),
                    identity.contract,
                    identity.sha256
                );
            }
            println!(
                "{}: configuration is valid ({} destination(s), {} policy plugin(s), system id `{}`)",
                config_path.display(),
                config.destinations.len(),
                config.policies.residency.len() + config.policies.compression.len(),
                config.system_id
            );
            Ok(())
        }
        Command::SnapshotWorker { .. } | Command::Plugin { .. } => {
            Err(anyhow::anyhow!("handled before the configuration is read"))
        }
        Command::Buffer { command: BufferCommand::Inspect { json } } => inspect_buffers(&config, &runtime, json),
        Command::Status { json } => runtime.block_on(async {
            let url = format!("http://{}/v1/status", config.ingest.listen);
            let status: serde_json::Value = reqwest::get(&url)
                .await
                .with_context(|| format!("agent not reachable at {url}"))?
                .json()
                .await
                .context("agent sent an unreadable status")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
            Ok(())
        }),
    }
}

fn snapshot_worker(data_dir: &Path, snapshot_dir: &Path, timezone: &str, system_id: &str) -> anyhow::Result<()> {
    use akosha_agent::sources::session_buddy_snapshot::{SnapshotConfig, write_snapshot};
    let zone = match timezone {
        "local" => jiff::tz::TimeZone::try_system().unwrap_or(jiff::tz::TimeZone::UTC),
        name => jiff::tz::TimeZone::get(name).with_context(|| format!("unknown time zone `{name}`"))?,
    };
    let config = SnapshotConfig {
        data_dir: data_dir.to_owned(),
        snapshot_dir: snapshot_dir.to_owned(),
        interval: std::time::Duration::ZERO,
        zone,
        timezone: timezone.to_owned(),
        worker: PathBuf::new(),
    };
    let stdout = std::io::stdout();
    write_snapshot(&config, system_id, &mut stdout.lock()).context("snapshot failed")?;
    Ok(())
}

fn inspect_buffers(config: &AgentConfig, runtime: &tokio::runtime::Runtime, json: bool) -> anyhow::Result<()> {
    // A running agent holds the buffer lock: ask it. Otherwise read the files.
    let url = format!("http://{}/v1/status", config.ingest.listen);
    let live: Option<serde_json::Value> = runtime.block_on(async {
        let response = reqwest::Client::new().get(&url).timeout(std::time::Duration::from_secs(2)).send().await.ok()?;
        response.json().await.ok()
    });
    let mut out = serde_json::Map::new();
    let quarantine_dir = config.quarantine_dir();
    let quarantine = match &live {
        Some(status) => Some(serde_json::json!({"source": "running agent", "buffer": status["quarantine"]})),
        None if quarantine_dir.exists() => {
            let report = akosha_agent::buffer::inspect(&quarantine_dir)
                .with_context(|| format!("quarantine: cannot read {}", quarantine_dir.display()))?;
            Some(serde_json::json!({"source": "files", "buffer": report}))
        }
        None => None,
    };
    for name in config.destinations.keys() {
        let value = match &live {
            Some(status) => {
                serde_json::json!({"source": "running agent", "buffer": status["destinations"][name]["buffer"]})
            }
            None => {
                let report = akosha_agent::buffer::inspect(&config.buffer_dir(name)).with_context(|| {
                    format!("destination `{name}`: cannot read {}", config.buffer_dir(name).display())
                })?;
                serde_json::json!({"source": "files", "buffer": report})
            }
        };
        out.insert(name.clone(), value);
    }
    // Not a destination name: those are identifiers, and this has a space.
    if let Some(q) = quarantine.filter(|q| !q["buffer"].is_null()) {
        out.insert("(quarantine)".into(), q);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    for (name, v) in &out {
        let b = &v["buffer"];
        println!(
            "{name} (from the {}): {} records in {} chunks, {} bytes ({} on disk); corrupted chunks: {}; dead letters: {} records",
            v["source"].as_str().unwrap_or("?"),
            b["records"],
            b["chunks"],
            b["bytes"],
            b["disk_bytes"],
            b["corrupted_chunks"],
            b["dead_letter_records"],
        );
        if let Some(range) = b["accepted_range_us"].as_array() {
            let at = |v: &serde_json::Value| {
                v.as_i64()
                    .and_then(|us| jiff::Timestamp::from_microsecond(us).ok())
                    .map_or("?".into(), |t| t.to_string())
            };
            println!("  oldest accepted {}, newest {}", at(&range[0]), at(&range[1]));
        } else if let Some(oldest) = b["oldest_accepted_at_us"].as_i64() {
            let t = jiff::Timestamp::from_microsecond(oldest).map_or("?".into(), |t| t.to_string());
            println!("  oldest accepted {t}");
        }
    }
    Ok(())
}

fn print_status(status: &serde_json::Value) {
    let now = jiff::Timestamp::now().as_microsecond();
    println!(
        "system id: {}   version: {}",
        status["system_id"].as_str().unwrap_or("?"),
        status["version"].as_str().unwrap_or("?")
    );
    let ingest = &status["ingest"];
    println!(
        "ingest (HTTP NDJSON + Session-Buddy push): {} accepted, {} requests rejected, {} refused (buffer full)",
        ingest["accepted_records"], ingest["rejected_requests"], ingest["full_rejections"]
    );
    let sb = &status["session_buddy_snapshots"];
    println!(
        "session-buddy snapshots: {} taken, {} changed records sent, {} unchanged, {} failures",
        sb["snapshots"], sb["changed_records"], sb["unchanged_records"], sb["failures"]
    );
    for file in status["files"].as_array().into_iter().flatten() {
        println!(
            "file {}: position {}, {} records, {} invalid lines, {} rotations",
            file["path"].as_str().unwrap_or("?"),
            file["position"],
            file["records"],
            file["invalid_lines"],
            file["rotations"]
        );
    }
    for (name, d) in status["destinations"].as_object().into_iter().flatten() {
        let b = &d["buffer"];
        let age =
            b["oldest_accepted_at_us"].as_i64().map_or("-".to_string(), |t| format!("{:.1}s", (now - t) as f64 / 1e6));
        let routes: Vec<&str> = d["routes"].as_array().into_iter().flatten().filter_map(|r| r.as_str()).collect();
        println!(
            "destination {name} ({}, {} receiving {}): {}; buffer {} records / {} bytes, oldest {age}; acked {} records; last error: {}",
            d["address"].as_str().unwrap_or("?"),
            d["residency"].as_str().unwrap_or("?"),
            routes.join("+"),
            if d["connected"].as_bool() == Some(true) { "connected" } else { "disconnected" },
            b["records"],
            b["bytes"],
            d["records_acked"],
            d["last_error"].as_str().unwrap_or("none"),
        );
    }
    if let Some(q) = status["quarantine"].as_object() {
        println!(
            "quarantine (onprem records with no on-prem destination): {} records / {} bytes",
            q["records"], q["bytes"]
        );
    }
    for kind in ["residency", "compression"] {
        for p in status["policies"][kind].as_array().into_iter().flatten() {
            println!(
                "{kind} policy {} ({}): contract {}, sha256 {}",
                p["name"].as_str().unwrap_or("?"),
                p["path"].as_str().unwrap_or("?"),
                p["contract"].as_str().unwrap_or("?"),
                p["sha256"].as_str().unwrap_or("?"),
            );
        }
    }
    let audit = &status["audit"];
    let routed = |r: &str| audit["routed"][r].as_u64().unwrap_or(0);
    println!(
        "routing: {} cloud, {} onprem, {} dropped; {} redacted; {} routed onprem because a policy failed; {} quarantined",
        routed("cloud"),
        routed("onprem"),
        routed("drop"),
        audit["redacted_records"],
        audit["failed_closed_records"],
        audit["quarantined_records"],
    );
    for d in audit["decisions"].as_array().into_iter().flatten() {
        println!(
            "  {} by {}: {} ({} records)",
            d["route"].as_str().unwrap_or("?"),
            d["policy"].as_str().unwrap_or("?"),
            d["reason"].as_str().unwrap_or(""),
            d["count"]
        );
    }
    for f in audit["failures"].as_array().into_iter().flatten() {
        println!(
            "  policy {} failed: {} ({} calls)",
            f["policy"].as_str().unwrap_or("?"),
            f["cause"].as_str().unwrap_or("?"),
            f["count"]
        );
    }
}

fn init_logging(config: &AgentConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if config.log.json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn plugin_command(command: PluginCommand) -> anyhow::Result<()> {
    use akosha_agent::plugin::{self, PluginConfig, ResidencyPlugin};
    match command {
        PluginCommand::Inspect { plugin } => {
            print!("{}", plugin::describe(&plugin)?);
            Ok(())
        }
        PluginCommand::Componentize { module, output } => {
            let bytes = std::fs::read(&module).with_context(|| format!("cannot read {}", module.display()))?;
            let component = plugin::componentize(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", module.display()))?;
            std::fs::write(&output, component).with_context(|| format!("cannot write {}", output.display()))?;
            Ok(())
        }
        PluginCommand::Test { plugin, records, set, batch, timeout } => {
            let name = plugin.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let mut settings = PluginConfig::new(name, &plugin);
            settings.config = set;
            settings.timeout = timeout;
            let mut policy = ResidencyPlugin::load(settings)?;
            let body = std::fs::read(&records).with_context(|| format!("cannot read {}", records.display()))?;
            let parsed = akosha_agent::ingest::parse_ndjson(&body, "plugin-test").map_err(|errors| {
                let lines: Vec<String> = errors.iter().map(|e| format!("  line {}: {}", e.line, e.message)).collect();
                anyhow::anyhow!("{} has invalid lines:\n{}", records.display(), lines.join("\n"))
            })?;
            let mut counts = std::collections::BTreeMap::new();
            for (n, chunk) in parsed.chunks(batch.max(1)).enumerate() {
                let (decisions, took) = plugin::timed(|| policy.decide(chunk));
                let decisions = decisions?;
                println!(
                    "batch {}: {} records in {:.3} ms ({:.2} µs/record)",
                    n + 1,
                    chunk.len(),
                    took.as_secs_f64() * 1e3,
                    took.as_secs_f64() * 1e6 / chunk.len() as f64
                );
                for (record, decision) in chunk.iter().zip(&decisions) {
                    *counts.entry(decision.route.as_str()).or_insert(0u64) += 1;
                    let redacted = if decision.redactions.is_empty() {
                        String::new()
                    } else {
                        let text = record.text.as_deref().unwrap_or_default();
                        format!(" -> {:?}", plugin::apply_redactions(text, &decision.redactions))
                    };
                    println!(
                        "  {} {:<7} {}{redacted}",
                        record.id,
                        decision.route.as_str(),
                        decision.reason.as_deref().unwrap_or("-")
                    );
                }
            }
            let summary: Vec<String> = counts.iter().map(|(route, n)| format!("{n} {route}")).collect();
            println!("{} records: {}", parsed.len(), summary.join(", "));
            Ok(())
        }
    }
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("`{text}` is not key=value")),
    }
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    akosha_protocol::settings::parse_duration(text).map_err(|e| e.to_string())
}
