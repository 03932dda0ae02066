//! `akosha-aggregator`: runs the aggregator, validates its configuration and manages certificates.

use std::path::PathBuf;

use akosha_aggregator::Aggregator;
use akosha_aggregator::certs::{self, CertPaths};
use akosha_aggregator::config::AggregatorConfig;
use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "akosha-aggregator",
    version,
    about = "Central aggregator: receives agent batches, stores and serves them"
)]
struct Cli {
    /// Configuration file (defaults apply when omitted; see config/lite.yaml).
    #[arg(long, short, global = true, env = "AKOSHA_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the aggregator until SIGINT/SIGTERM.
    Run,
    /// Check the configuration (and the TLS files it names) without starting.
    Validate,
    /// Create the site CA and certificates.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create a CA and the aggregator's server certificate.
    Init {
        /// Directory for the files (default: the configuration's certificate directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Names (DNS or IP) agents use to reach the aggregator.
        #[arg(long = "server-name", default_values = ["localhost", "127.0.0.1"])]
        server_names: Vec<String>,
        /// Replace an existing CA.
        #[arg(long)]
        force: bool,
    },
    /// Issue an agent certificate whose common name is the agent's system id.
    Issue {
        /// The agent's system id.
        system_id: String,
        /// Directory holding ca.pem and ca.key (default: the configuration's certificate directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Where to write <system-id>.pem and .key (default: <dir>/agents).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = AggregatorConfig::load(cli.config.as_deref()).with_context(|| match &cli.config {
        Some(path) => format!("invalid configuration {}", path.display()),
        None => "invalid configuration (defaults and environment)".to_string(),
    })?;
    let cert_dir = config.ca_cert.parent().map(PathBuf::from).unwrap_or_else(|| config.data_dir.join("certs"));
    match cli.command {
        Command::Run => {
            init_logging(&config);
            let runtime =
                tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the runtime")?;
            runtime.block_on(async {
                let udp = std::net::UdpSocket::bind(config.quic.listen)
                    .with_context(|| format!("cannot bind QUIC on udp {}", config.quic.listen))?;
                let http = tokio::net::TcpListener::bind(config.http_listen)
                    .await
                    .with_context(|| format!("cannot bind HTTP on {}", config.http_listen))?;
                Aggregator::run(config, udp, http, shutdown_signal()).await.context("aggregator failed")
            })
        }
        Command::Validate => {
            let transport = akosha_aggregator::receiver::Receiver::transport_config(&config.quic);
            certs::server_config(&config.ca_cert, &config.server_cert, &config.server_key, transport)
                .context("TLS files")?;
            println!(
                "configuration is valid: mode {:?}, data under {}, QUIC {}, HTTP {}",
                config.mode,
                config.data_dir.display(),
                config.quic.listen,
                config.http_listen
            );
            Ok(())
        }
        Command::Certs { command: CertsCommand::Init { dir, server_names, force } } => {
            let dir = dir.unwrap_or(cert_dir);
            certs::init(&CertPaths::in_dir(&dir), &server_names, force)?;
            println!("created CA and server certificate for {} in {}", server_names.join(", "), dir.display());
            Ok(())
        }
        Command::Certs { command: CertsCommand::Issue { system_id, dir, out } } => {
            let dir = dir.unwrap_or(cert_dir);
            let out = out.unwrap_or_else(|| dir.join("agents"));
            let (cert, key) = certs::issue(&CertPaths::in_dir(&dir), &system_id, &out)?;
            println!("issued certificate for `{system_id}`: {} and {}", cert.display(), key.display());
            Ok(())
        }
    }
}

fn init_logging(config: &AggregatorConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log_level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if config.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
