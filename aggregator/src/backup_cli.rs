//! `akosha-aggregator backup …` and `restore …`: backups of a running aggregator, restores into a stopped, empty one.

use std::time::Duration;

use akosha_aggregator::backup::{self, Progress, RestoreTargets};
use akosha_aggregator::config::AggregatorConfig;
use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};

use crate::query_cli::call;

#[derive(Args)]
pub(crate) struct BackupArgs {
    /// Where backups go: s3://bucket[/prefix], gs://…, az://container[/prefix], file:///dir or a directory.
    /// Credentials: the usual AWS_*, GOOGLE_*, AZURE_* variables (read by the aggregator, which writes them).
    url: String,
    /// Backend option key=value (e.g. endpoint=http://127.0.0.1:8333, allow_http=true); repeatable.
    #[arg(long = "option", short = 'o', value_parser = akosha_aggregator::objects::parse_option)]
    options: Vec<(String, String)>,
    /// List the complete backups at the URL instead of taking one (reads the store directly).
    #[arg(long)]
    list: bool,
    /// After a successful backup, keep only the newest N backups at the URL (with the cold objects they name).
    #[arg(long)]
    keep: Option<usize>,
    /// Aggregator HTTP address (default: the configuration's http.listen).
    #[arg(long = "aggregator-url")]
    aggregator_url: Option<String>,
    /// Bearer token (admin scope).
    #[arg(long, env = "AKOSHA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Instead of taking a backup, re-wrap the data keys in every manifest at the URL with the configuration's
    /// active encryption key (after a key rotation; data files are not rewritten).
    #[arg(long = "rewrap-keys", conflicts_with_all = ["list", "keep"])]
    rewrap_keys: bool,
}

#[derive(Args)]
pub(crate) struct RestoreArgs {
    /// Where the backups are (as given to `backup`).
    url: String,
    /// Backend option key=value; repeatable.
    #[arg(long = "option", short = 'o', value_parser = akosha_aggregator::objects::parse_option)]
    options: Vec<(String, String)>,
    /// Restore the newest backup taken at or before this time (RFC 3339, a date meaning its 00:00 UTC, or
    /// microseconds since the epoch); default: the newest.
    #[arg(long)]
    at: Option<String>,
}

fn bar(unit: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{spinner}} [{{elapsed}}] {{bar:30}} {{bytes}}/{{total_bytes}} {unit} {{wide_msg}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn show(bar: &indicatif::ProgressBar, progress: &Value) {
    bar.set_length(progress["bytes_total"].as_u64().unwrap_or(0));
    bar.set_position(progress["bytes_done"].as_u64().unwrap_or(0));
    bar.set_message(format!(
        "{} ({}/{} files and objects)",
        progress["phase"].as_str().unwrap_or(""),
        progress["items_done"],
        progress["items_total"]
    ));
}

fn open(url: &str, options: &[(String, String)]) -> anyhow::Result<akosha_aggregator::objects::Location> {
    if let Some(dir) = akosha_aggregator::objects::local_dir(url) {
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    Ok(akosha_aggregator::objects::open(url, options)?)
}

pub(crate) fn backup(args: BackupArgs, config: &AggregatorConfig, default_url: String) -> anyhow::Result<()> {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the runtime")?;
    if args.rewrap_keys {
        let Some(keyring) = &config.encryption else {
            bail!("--rewrap-keys needs `encryption.keys` and `encryption.active_key` in the configuration");
        };
        let location = open(&args.url, &args.options)?;
        let done = runtime.block_on(backup::rewrap(&location, keyring))?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&done)?);
        } else {
            println!(
                "re-wrapped {} data keys in {} backups at {} with key `{}`",
                done.keys,
                done.manifests,
                args.url,
                keyring.active_id()
            );
        }
        return Ok(());
    }
    if args.list {
        let location = open(&args.url, &args.options)?;
        let backups = runtime.block_on(backup::list(&location))?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&backups)?);
            return Ok(());
        }
        if backups.is_empty() {
            println!("no complete backups at {}", args.url);
        }
        for m in &backups {
            println!(
                "{}  {} files, {} cold objects, {} bytes, aggregator {}",
                m.id,
                m.files.len(),
                m.cold_objects.len(),
                m.bytes(),
                m.aggregator_version
            );
        }
        return Ok(());
    }
    if args.keep == Some(0) {
        bail!("--keep 0 would remove every backup; keep at least 1");
    }
    let base = args.aggregator_url.clone().unwrap_or(default_url).trim_end_matches('/').to_owned();
    let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;
    let token = args.token.as_deref();
    let options: serde_json::Map<String, Value> =
        args.options.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
    let url = format!("{base}/v1/admin/backup");
    let started =
        call(&runtime, &client, &base, token, true, &url, &[], Some(&json!({"url": args.url, "options": options})))?;
    let id = started["id"].as_str().unwrap_or_default().to_owned();
    let progress = bar("copied");
    let finished = loop {
        let status = call(&runtime, &client, &base, token, false, &url, &[], None)?;
        if status["id"].as_str() != Some(id.as_str()) {
            bail!("another backup replaced {id} in the aggregator's status; see GET {url}");
        }
        show(&progress, &status["progress"]);
        if status["state"] != "running" {
            break status;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    progress.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&finished)?);
    }
    if finished["state"] != "done" {
        bail!("backup {id} failed: {}", finished["error"].as_str().unwrap_or("unknown error"));
    }
    if !args.json {
        let m = &finished["manifest"];
        println!(
            "backup {id} written to {}: {} files, {} cold objects, {} bytes",
            args.url, m["files"], m["cold_objects"], m["bytes"]
        );
    }
    if let Some(keep) = args.keep {
        let location = open(&args.url, &args.options)?;
        let pruned = runtime.block_on(backup::prune(&location, keep)).context("pruning old backups")?;
        if !pruned.backups.is_empty() {
            println!(
                "removed {} older backups ({}) and {} cold objects only they named",
                pruned.backups.len(),
                pruned.backups.join(", "),
                pruned.objects
            );
        }
    }
    Ok(())
}

fn parse_at(text: &str) -> anyhow::Result<i64> {
    if let Ok(us) = text.parse::<i64>() {
        return Ok(us);
    }
    if let Ok(t) = text.parse::<jiff::Timestamp>() {
        return Ok(t.as_microsecond());
    }
    let date: jiff::civil::Date =
        text.parse().with_context(|| format!("--at `{text}` is neither an RFC 3339 time nor a date (YYYY-MM-DD)"))?;
    Ok(date.to_zoned(jiff::tz::TimeZone::UTC)?.timestamp().as_microsecond())
}

pub(crate) fn restore(args: RestoreArgs, config: &AggregatorConfig) -> anyhow::Result<()> {
    let at = args.at.as_deref().map(parse_at).transpose()?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the runtime")?;
    let src = open(&args.url, &args.options)?;
    let cold = match config.cold.enabled && config.warm.enabled {
        true => Some(open(&config.cold.url, &config.cold.options).context("the configuration's cold store")?),
        false => None,
    };
    let targets = RestoreTargets {
        warm_path: config.warm.enabled.then(|| config.warm.path.clone()),
        wal_dir: config.wal.dir.clone(),
        audit_dir: config.data_dir.join("audit"),
        cold,
        staging: config.data_dir.join("restore-staging"),
        keyring: config.encryption.clone(),
    };
    let progress = std::sync::Arc::new(Progress::default());
    let shown = bar("restored");
    let watched = progress.clone();
    let manifest = runtime.block_on(async {
        let restore = backup::restore(&src, at, &targets, &progress);
        tokio::pin!(restore);
        loop {
            tokio::select! {
                result = &mut restore => break result,
                () = tokio::time::sleep(Duration::from_millis(200)) => show(&shown, &watched.to_json()),
            }
        }
    });
    shown.finish_and_clear();
    let manifest = manifest?;
    println!(
        "restored backup {} ({} files, {} cold objects, {} bytes) into {}; start the aggregator to serve it",
        manifest.id,
        manifest.files.len(),
        manifest.cold_objects.len(),
        manifest.bytes(),
        config.data_dir.display()
    );
    Ok(())
}
