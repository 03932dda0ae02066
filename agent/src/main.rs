//! `akosha-agent`: runs the edge agent, validates its configuration, and reports its status.

use std::path::PathBuf;

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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let home = std::env::var("HOME").ok();
    let config_path = PathBuf::from(akosha_protocol::settings::expand_home(&cli.config, home.as_deref()));
    let config =
        AgentConfig::load(&config_path).with_context(|| format!("invalid configuration {}", config_path.display()))?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the runtime")?;
    match cli.command {
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
            println!(
                "{}: configuration is valid ({} destination(s), system id `{}`)",
                config_path.display(),
                config.destinations.len(),
                config.system_id
            );
            Ok(())
        }
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

fn print_status(status: &serde_json::Value) {
    println!(
        "system id: {}   version: {}",
        status["system_id"].as_str().unwrap_or("?"),
        status["version"].as_str().unwrap_or("?")
    );
    let ingest = &status["ingest"];
    println!(
        "ingest: {} accepted, {} requests rejected, {} refused (buffer full)",
        ingest["accepted_records"], ingest["rejected_requests"], ingest["full_rejections"]
    );
    if let Some(destinations) = status["destinations"].as_object() {
        for (name, d) in destinations {
            let b = &d["buffer"];
            println!(
                "destination {name} ({}): {}  buffer {} records / {} bytes  acked {} records  last error: {}",
                d["address"].as_str().unwrap_or("?"),
                if d["connected"].as_bool() == Some(true) { "connected" } else { "disconnected" },
                b["records"],
                b["bytes"],
                d["records_acked"],
                d["last_error"].as_str().unwrap_or("none"),
            );
        }
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
