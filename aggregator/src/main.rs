//! `akosha-aggregator`: runs the aggregator, validates its configuration and manages certificates.

mod backup_cli;
mod query_cli;

use std::path::PathBuf;

use akosha_aggregator::Aggregator;
use akosha_aggregator::certs::{self, CertPaths};
use akosha_aggregator::config::AggregatorConfig;
use akosha_aggregator::import::{Destination, ImportOptions};
use anyhow::Context;
use clap::{Parser, Subcommand};

/// jemalloc for Rust and, through its unprefixed `malloc`, for DuckDB's and usearch's C++ as well: glibc's
/// allocator spent ~7 % of a warm→cold move in `_int_malloc`, `unlink_chunk` and fresh-page faults on DuckDB's
/// and Parquet's short-lived buffers; with jemalloc the move takes ~5 % less CPU (BENCHMARKS.md, issue 6). Vector
/// and GreptimeDB make the same choice.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// Import Session-Buddy cloud uploads (`systems/*/uploads/*/manifest.json`) from an object store into
    /// the running aggregator; uploads already imported are remembered and skipped.
    Import {
        /// Where the uploads are: s3://bucket[/prefix], gs://…, az://container[/prefix], file:///dir or a
        /// directory. Credentials come from the usual AWS_*, GOOGLE_*, AZURE_* variables.
        url: String,
        /// Backend option key=value (e.g. endpoint=http://127.0.0.1:8333, allow_http=true, region=eu-west-1);
        /// repeatable; wins over the environment.
        #[arg(long = "option", short = 'o', value_parser = akosha_aggregator::objects::parse_option)]
        options: Vec<(String, String)>,
        /// The aggregator's QUIC address (default: the configuration's quic.listen, on loopback when it listens
        /// on every address).
        #[arg(long)]
        aggregator: Option<std::net::SocketAddr>,
        /// The name the aggregator's server certificate carries.
        #[arg(long, default_value = "localhost")]
        server_name: String,
        /// Directory holding ca.pem and ca.key, used to sign a short-lived certificate per uploading system
        /// (default: the configuration's certificate directory).
        #[arg(long)]
        certs_dir: Option<PathBuf>,
        /// Zone of the uploading machines' clocks (Session-Buddy writes local wall-clock time): an IANA name
        /// or `local`.
        #[arg(long, default_value = "UTC")]
        timezone: String,
        /// Keep watching: run a pass every interval (e.g. `5m`) until SIGINT/SIGTERM.
        #[arg(long, value_parser = parse_duration)]
        watch: Option<std::time::Duration>,
    },
    /// Ask the running aggregator: search, records, stats, graph and metric queries.
    Query(query_cli::QueryArgs),
    /// Data lifecycle of the running aggregator: run the tier moves now, or show what would move.
    Lifecycle(query_cli::LifecycleArgs),
    /// Back up the running aggregator (a consistent snapshot: warm, log, indexes, audit log, cold objects) to an
    /// object store, with a manifest and a sha256 per file; `--list` shows the backups there.
    Backup(backup_cli::BackupArgs),
    /// Restore a backup into this aggregator, which must be stopped and empty.
    Restore(backup_cli::RestoreArgs),
    /// Encryption at rest: make a key, show which keys wrap the cold objects, re-wrap them after a rotation.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Create the site CA and certificates.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print a new random 256-bit key-encryption key (base64) for `encryption.keys`.
    Generate,
    /// Show the configured key ids (never the keys), the active one, and cold objects per key.
    Status {
        /// Aggregator HTTP address (default: the configuration's http.listen).
        #[arg(long = "aggregator-url")]
        aggregator_url: Option<String>,
        /// Bearer token (admin scope).
        #[arg(long, env = "AKOSHA_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Re-wrap every cold data key not under the active key now (objects are not rewritten); backups are
    /// re-wrapped with `backup <url> --rewrap-keys`.
    Rewrap {
        /// Aggregator HTTP address (default: the configuration's http.listen).
        #[arg(long = "aggregator-url")]
        aggregator_url: Option<String>,
        /// Bearer token (admin scope).
        #[arg(long, env = "AKOSHA_TOKEN", hide_env_values = true)]
        token: Option<String>,
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

/// The aggregator's HTTP address as a local client reaches it (a wildcard listen address means loopback).
fn local_http(config: &AggregatorConfig) -> String {
    let mut addr = config.http_listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    format!("http://{addr}")
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = AggregatorConfig::load(cli.config.as_deref()).with_context(|| match &cli.config {
        Some(path) => format!("invalid configuration {}", path.display()),
        None => "invalid configuration (defaults and environment)".to_string(),
    })?;
    let cert_dir = config.ca_cert.parent().map(PathBuf::from).unwrap_or_else(|| config.data_dir.join("certs"));
    match cli.command {
        Command::Query(args) => query_cli::run(args, local_http(&config)),
        Command::Lifecycle(args) => query_cli::lifecycle(args, local_http(&config)),
        Command::Backup(args) => backup_cli::backup(args, &config, local_http(&config)),
        Command::Keys { command: KeysCommand::Generate } => {
            println!("{}", akosha_aggregator::envelope::generate_key()?);
            Ok(())
        }
        Command::Keys { command: KeysCommand::Status { aggregator_url, token } } => {
            query_cli::keys(aggregator_url.unwrap_or_else(|| local_http(&config)), token, false)
        }
        Command::Keys { command: KeysCommand::Rewrap { aggregator_url, token } } => {
            query_cli::keys(aggregator_url.unwrap_or_else(|| local_http(&config)), token, true)
        }
        Command::Restore(args) => backup_cli::restore(args, &config),
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
        Command::Import { url, options, aggregator, server_name, certs_dir, timezone, watch } => {
            // A one-off import reports on stdout and draws progress on stderr; only a watch logs as a service.
            let mut config = config;
            if watch.is_none() && std::env::var_os("RUST_LOG").is_none() {
                config.log_level = "warn".into();
            }
            init_logging(&config);
            let zone = match timezone.as_str() {
                "local" => jiff::tz::TimeZone::try_system().unwrap_or(jiff::tz::TimeZone::UTC),
                name => jiff::tz::TimeZone::get(name).with_context(|| format!("--timezone `{name}`"))?,
            };
            let location = akosha_aggregator::objects::open(&url, &options)?;
            let addr = aggregator.unwrap_or_else(|| {
                let mut addr = config.quic.listen;
                if addr.ip().is_unspecified() {
                    addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                addr
            });
            let import = ImportOptions {
                location,
                destination: Destination {
                    addr,
                    server_name,
                    certs: CertPaths::in_dir(&certs_dir.unwrap_or(cert_dir)),
                },
                ledger: config.data_dir.join("imports").join("ledger.json"),
                work_dir: config.data_dir.join("imports").join("work"),
                zone,
            };
            let runtime =
                tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the runtime")?;
            runtime.block_on(run_import(import, watch))
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

async fn run_import(import: ImportOptions, watch: Option<std::time::Duration>) -> anyhow::Result<()> {
    if let Some(interval) = watch {
        akosha_aggregator::import::watch(&import, interval, shutdown_signal()).await;
        return Ok(());
    }
    let progress = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed}] {bar:30} {pos}/{len} uploads  {wide_msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    progress.enable_steady_tick(std::time::Duration::from_millis(200));
    let report = akosha_aggregator::import::import_once(&import, &progress).await?;
    for (system, upload, records) in &report.imported {
        println!("imported {system}/{upload}: {records} records");
    }
    for (manifest, reason) in &report.failed {
        println!("FAILED {manifest}: {reason}");
    }
    println!(
        "{} uploads found: {} imported now ({} records), {} imported before, {} still being written, {} failed{}",
        report.found,
        report.imported.len(),
        report.records(),
        report.already_imported,
        report.incomplete,
        report.failed.len(),
        if report.invalid_records > 0 {
            format!("; {} invalid rows skipped", report.invalid_records)
        } else {
            String::new()
        },
    );
    if !report.failed.is_empty() {
        anyhow::bail!("{} of {} uploads could not be imported", report.failed.len(), report.found);
    }
    Ok(())
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    akosha_protocol::settings::parse_duration(text).map_err(|e| e.to_string())
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// scripts/backup.sh, scripts/restore.sh and the deployment files call these command lines.
    #[test]
    fn the_backup_scripts_command_lines_parse() {
        for line in [
            "akosha-aggregator backup s3://b/p --keep 14 --option endpoint=http://m:9000 --aggregator-url http://a:8080",
            "akosha-aggregator backup s3://b/p --list --json",
            "akosha-aggregator restore s3://b/p --at 2026-11-20T02:15:00Z --option allow_http=true",
        ] {
            if let Err(e) = Cli::try_parse_from(line.split(' ')) {
                panic!("{line}: {e}");
            }
        }
        let cron: serde_norway::Value =
            serde_norway::from_str(include_str!("../../config/kubernetes/backup-cronjob.yaml")).unwrap();
        assert_eq!(cron["kind"], "CronJob");
        let container = &cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(container["command"][0], "/opt/akosha/scripts/backup.sh");
        let script = include_str!("../../scripts/backup.sh");
        assert!(script.contains("backup \"$url\" --keep") && script.contains("--aggregator-url"));
    }
}
