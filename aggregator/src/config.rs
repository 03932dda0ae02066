//! Aggregator configuration: YAML as users write it, and the validated form the aggregator runs on.
//!
//! `mode` picks the defaults: `lite` (everything under `~/.akosha/dev`, loopback only, no external service),
//! `standard` (listens on all interfaces, data under `~/.akosha/data`), `production` (data under
//! `/data/akosha`, JSON logs). Precedence: environment (`AKOSHA_AGGREGATOR__SECTION__KEY` or the aliases in
//! [`ENV_ALIASES`]) > file > mode defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use akosha_protocol::settings::{
    ConfigError, EnvOverrides, expand_home, parse_byte_size, parse_config, parse_duration,
};
use serde::Deserialize;

use crate::wal::WalConfig;

/// Short environment variable names and the keys they set.
pub const ENV_ALIASES: &[(&str, &str)] = &[
    ("AKOSHA_MODE", "mode"),
    ("AKOSHA_DATA_DIR", "data_dir"),
    ("AKOSHA_QUIC_LISTEN", "quic.listen"),
    ("AKOSHA_HTTP_LISTEN", "http.listen"),
    ("AKOSHA_WAL_DIR", "wal.dir"),
    ("AKOSHA_LOG_LEVEL", "log.level"),
    ("AKOSHA_LOG_FORMAT", "log.format"),
    ("AKOSHA_REDIS_URL", "cache.redis_url"),
    ("AKOSHA_WARM_PATH", "warm.path"),
    ("AKOSHA_COLD_URL", "cold.url"),
];

const ENV_PREFIX: &str = "AKOSHA_AGGREGATOR__";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    mode: Option<String>,
    data_dir: Option<String>,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    tls: RawTls,
    #[serde(default)]
    quic: RawQuic,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    wal: RawWal,
    #[serde(default)]
    hot: RawHot,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    embeddings: RawEmbeddings,
    #[serde(default)]
    cache: RawCache,
    #[serde(default)]
    warm: RawWarm,
    #[serde(default)]
    cold: RawCold,
    #[serde(default)]
    storage: RawStorage,
    #[serde(default)]
    encryption: RawEncryption,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEncryption {
    enabled: Option<bool>,
    active_key: Option<String>,
    #[serde(default)]
    keys: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    disk_warning: Option<Fraction>,
    disk_critical: Option<Fraction>,
    currency: Option<String>,
    #[serde(default)]
    prices: RawPrices,
}

/// `0.75` or `75%`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Fraction {
    Number(f64),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrices {
    hot: Option<f64>,
    warm: Option<f64>,
    cold: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCold {
    enabled: Option<bool>,
    url: Option<String>,
    #[serde(default)]
    options: std::collections::BTreeMap<String, String>,
    warm_window: Option<String>,
    move_interval: Option<String>,
    #[serde(default)]
    warm_window_per_kind: std::collections::BTreeMap<String, String>,
    schedule: Option<String>,
    cache_dir: Option<String>,
    cache_max_bytes: Option<String>,
    row_group_rows: Option<usize>,
    embedding_encoding: Option<String>,
    parallel_fetches: Option<usize>,
    breaker_failures: Option<u32>,
    breaker_cooldown: Option<String>,
    retry_timeout: Option<String>,
    cache_on_write: Option<bool>,
    #[serde(default)]
    promotion: RawPromotion,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPromotion {
    enabled: Option<bool>,
    reads: Option<f64>,
    window: Option<String>,
    min_age: Option<String>,
    max_groups_per_run: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWarm {
    enabled: Option<bool>,
    path: Option<String>,
    hot_window: Option<String>,
    move_interval: Option<String>,
    #[serde(default)]
    hot_window_per_kind: std::collections::BTreeMap<String, String>,
    schedule: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    enabled: Option<bool>,
    redis_url: Option<String>,
    namespace: Option<String>,
    ttl: Option<String>,
    max_entries: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    #[serde(default)]
    tokens: Vec<RawToken>,
    /// Standard and production modes refuse to serve without tokens unless this says so.
    anonymous: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    name: Option<String>,
    token: Option<String>,
    token_sha256: Option<String>,
    #[serde(default)]
    scopes: Vec<String>,
    rate_limit: Option<String>,
    burst: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEmbeddings {
    enabled: Option<bool>,
    model_dir: Option<String>,
    max_tokens: Option<usize>,
    backfill_queue: Option<usize>,
    endpoint: Option<String>,
    model: Option<String>,
    api_key: Option<String>,
    timeout: Option<String>,
    batch_size: Option<usize>,
}

/// The remote embeddings endpoint, when one is configured (an empty `endpoint` means none, so that
/// `${VAR:}` can leave it unset).
fn validate_remote_embeddings(e: &RawEmbeddings) -> Result<Option<crate::embed::RemoteEmbeddings>, ConfigError> {
    let Some(endpoint) = e.endpoint.as_deref().map(str::trim).filter(|s| !s.is_empty()) else {
        for (key, set) in [
            ("embeddings.model", e.model.is_some()),
            ("embeddings.timeout", e.timeout.is_some()),
            ("embeddings.batch_size", e.batch_size.is_some()),
        ] {
            if set {
                return Err(ConfigError::invalid(key, "only applies with `embeddings.endpoint`"));
            }
        }
        return Ok(None);
    };
    let url = url::Url::parse(endpoint)
        .map_err(|err| ConfigError::invalid("embeddings.endpoint", format!("`{endpoint}` is not a URL: {err}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(ConfigError::invalid("embeddings.endpoint", "must be an http:// or https:// URL with a host"));
    }
    let timeout = match e.timeout.as_deref() {
        Some(t) => parse_duration(t).map_err(|err| ConfigError::invalid("embeddings.timeout", err.to_string()))?,
        None => Duration::from_secs(30),
    };
    if timeout.is_zero() || timeout > Duration::from_secs(600) {
        return Err(ConfigError::invalid("embeddings.timeout", "must be between 1ms and 10m"));
    }
    let batch_size = e.batch_size.unwrap_or(64);
    if !(1..=2048).contains(&batch_size) {
        return Err(ConfigError::invalid("embeddings.batch_size", "must be between 1 and 2048"));
    }
    let model = e.model.clone().unwrap_or_else(|| "all-MiniLM-L6-v2".into());
    if model.trim().is_empty() {
        return Err(ConfigError::invalid("embeddings.model", "must not be empty"));
    }
    let api_key = e.api_key.clone().filter(|k| !k.trim().is_empty());
    Ok(Some(crate::embed::RemoteEmbeddings { endpoint: url, model, api_key, timeout, batch_size }))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca_cert: Option<String>,
    server_cert: Option<String>,
    server_key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuic {
    listen: Option<String>,
    credit_window: Option<u32>,
    max_sessions: Option<usize>,
    max_batch_bytes: Option<String>,
    handshake_timeout: Option<String>,
    idle_timeout: Option<String>,
    heartbeat_interval: Option<String>,
    drain_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: Option<String>,
    max_body_bytes: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWal {
    dir: Option<String>,
    segment_bytes: Option<String>,
    group_commit_window: Option<String>,
    queue_depth: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHot {
    memory_limit: Option<String>,
    threads: Option<usize>,
}

/// Deployment mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One machine, no external services.
    Lite,
    /// A shared server.
    Standard,
    /// A production deployment.
    Production,
}

/// Validated aggregator configuration.
#[derive(Debug, Clone)]
pub struct AggregatorConfig {
    /// Deployment mode.
    pub mode: Mode,
    /// Root of the aggregator's data.
    pub data_dir: PathBuf,
    /// `tracing` filter.
    pub log_level: String,
    /// JSON logs.
    pub log_json: bool,
    /// Site CA certificate (trusted for agent certificates).
    pub ca_cert: PathBuf,
    /// Server certificate.
    pub server_cert: PathBuf,
    /// Server private key.
    pub server_key: PathBuf,
    /// QUIC receiver.
    pub quic: QuicConfig,
    /// HTTP API listen address.
    pub http_listen: SocketAddr,
    /// Write-ahead log.
    pub wal: WalConfig,
    /// DuckDB memory limit of the hot tier, e.g. `2GB`.
    pub hot_memory_limit: String,
    /// DuckDB threads of the hot tier.
    pub hot_threads: usize,
    /// Largest HTTP request body.
    pub http_max_body_bytes: usize,
    /// Bearer tokens.
    pub auth: crate::auth::AuthConfig,
    /// In-process embedding model.
    pub embeddings: EmbeddingsConfig,
    /// Query cache.
    pub cache: crate::cache::CacheConfig,
    /// Warm tier.
    pub warm: crate::warm::WarmConfig,
    /// Cold tier.
    pub cold: crate::cold::ColdConfig,
    /// Disk thresholds and prices for the storage report.
    pub storage: crate::storage::StorageConfig,
    /// Key-encryption keys for cold objects and backups; `None` stores them in the clear.
    pub encryption: Option<std::sync::Arc<crate::envelope::Keyring>>,
}

/// In-process embeddings.
#[derive(Debug, Clone)]
pub struct EmbeddingsConfig {
    /// Load the model at start (a missing model is then an error, not a silent downgrade).
    pub enabled: bool,
    /// Directory with `model.safetensors`, `tokenizer.json`, `config.json`.
    pub model_dir: PathBuf,
    /// Tokens kept per text.
    pub max_tokens: usize,
    /// Records waiting for an embedding beyond which backfill stops queueing (and counts what it skipped).
    pub backfill_queue: usize,
    /// An OpenAI-compatible `/v1/embeddings` endpoint used instead of the in-process model.
    pub remote: Option<crate::embed::RemoteEmbeddings>,
}

/// Receiver settings.
#[derive(Debug, Clone)]
pub struct QuicConfig {
    /// UDP listen address.
    pub listen: SocketAddr,
    /// Batches an agent may have in flight.
    pub credit_window: u32,
    /// Concurrent agent sessions; more are told to back off.
    pub max_sessions: usize,
    /// Largest uncompressed batch accepted.
    pub max_batch_bytes: u32,
    /// Time for an agent to complete TLS and send its Hello.
    pub handshake_timeout: Duration,
    /// QUIC idle timeout.
    pub idle_timeout: Duration,
    /// Heartbeat interval announced to agents.
    pub heartbeat_interval: Duration,
    /// How long shutdown waits for in-flight batches.
    pub drain_timeout: Duration,
}

impl AggregatorConfig {
    /// Reads and validates the configuration file with the process environment; `None` uses defaults only.
    pub fn load(path: Option<&Path>) -> Result<AggregatorConfig, ConfigError> {
        let text = match path {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| ConfigError::invalid("(file)", format!("cannot read {}: {e}", path.display())))?,
            None => String::new(),
        };
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::parse(&text, |name| std::env::var(name).ok(), &env)
    }

    /// Parses and validates configuration text with an explicit environment.
    pub fn parse(
        text: &str,
        lookup: impl Fn(&str) -> Option<String>,
        env: &[(String, String)],
    ) -> Result<AggregatorConfig, ConfigError> {
        let home = lookup("HOME");
        let raw: RawConfig =
            parse_config(text, lookup, env, EnvOverrides { prefix: ENV_PREFIX, aliases: ENV_ALIASES })?;
        validate(raw, home.as_deref())
    }
}

fn validate(raw: RawConfig, home: Option<&str>) -> Result<AggregatorConfig, ConfigError> {
    let mode = match raw.mode.as_deref().unwrap_or("lite") {
        "lite" => Mode::Lite,
        "standard" => Mode::Standard,
        "production" => Mode::Production,
        other => {
            return Err(ConfigError::invalid("mode", format!("`{other}` is not one of lite, standard, production")));
        }
    };
    let (default_dir, default_host, default_format) = match mode {
        Mode::Lite => ("~/.akosha/dev", "127.0.0.1", "text"),
        Mode::Standard => ("~/.akosha/data", "0.0.0.0", "text"),
        Mode::Production => ("/data/akosha", "0.0.0.0", "json"),
    };
    let path = |s: &str| PathBuf::from(expand_home(s, home));
    let data_dir = path(raw.data_dir.as_deref().unwrap_or(default_dir));
    let under = |opt: Option<&String>, rel: &str| opt.map_or_else(|| data_dir.join(rel), |s| path(s));
    let size = |key: &str, v: Option<&String>, default: &str| {
        parse_byte_size(v.map_or(default, String::as_str)).map_err(|e| ConfigError::invalid(key, e.to_string()))
    };
    let duration = |key: &str, v: Option<&String>, default: &str| {
        parse_duration(v.map_or(default, String::as_str)).map_err(|e| ConfigError::invalid(key, e.to_string()))
    };
    let addr = |key: &str, v: Option<&String>, port: u16| -> Result<SocketAddr, ConfigError> {
        let text = v.cloned().unwrap_or_else(|| format!("{default_host}:{port}"));
        text.parse().map_err(|_| ConfigError::invalid(key, format!("`{text}` is not an address like 127.0.0.1:{port}")))
    };

    let log_level = raw.log.level.clone().unwrap_or_else(|| "info".into());
    tracing_subscriber::EnvFilter::try_new(&log_level)
        .map_err(|e| ConfigError::invalid("log.level", format!("`{log_level}` is not a log filter: {e}")))?;
    let log_json = match raw.log.format.as_deref().unwrap_or(default_format) {
        "text" => false,
        "json" => true,
        other => return Err(ConfigError::invalid("log.format", format!("`{other}` is not one of text, json"))),
    };

    let q = &raw.quic;
    let credit_window = q.credit_window.unwrap_or(16);
    if !(1..=1024).contains(&credit_window) {
        return Err(ConfigError::invalid("quic.credit_window", "must be between 1 and 1024"));
    }
    let max_sessions = q.max_sessions.unwrap_or(20_000);
    if max_sessions == 0 {
        return Err(ConfigError::invalid("quic.max_sessions", "must be at least 1"));
    }
    let max_batch_bytes = size("quic.max_batch_bytes", q.max_batch_bytes.as_ref(), "8MiB")?;
    if !(64 * 1024..=akosha_protocol::MAX_BATCH_UNCOMPRESSED_LEN as u64).contains(&max_batch_bytes) {
        return Err(ConfigError::invalid("quic.max_batch_bytes", "must be between 64KiB and 64MiB"));
    }
    let quic = QuicConfig {
        listen: addr("quic.listen", q.listen.as_ref(), 8684)?,
        credit_window,
        max_sessions,
        max_batch_bytes: max_batch_bytes as u32,
        handshake_timeout: duration("quic.handshake_timeout", q.handshake_timeout.as_ref(), "10s")?,
        idle_timeout: duration("quic.idle_timeout", q.idle_timeout.as_ref(), "30s")?,
        heartbeat_interval: duration("quic.heartbeat_interval", q.heartbeat_interval.as_ref(), "5s")?,
        drain_timeout: duration("quic.drain_timeout", q.drain_timeout.as_ref(), "10s")?,
    };
    if quic.heartbeat_interval >= quic.idle_timeout {
        return Err(ConfigError::invalid("quic.heartbeat_interval", "must be shorter than quic.idle_timeout"));
    }

    let w = &raw.wal;
    let segment_bytes = size("wal.segment_bytes", w.segment_bytes.as_ref(), "64MiB")?;
    if !(1 << 20..=1 << 32).contains(&segment_bytes) {
        return Err(ConfigError::invalid("wal.segment_bytes", "must be between 1MiB and 4GiB"));
    }
    let group_commit_window = duration("wal.group_commit_window", w.group_commit_window.as_ref(), "0ms")?;
    if group_commit_window > Duration::from_millis(100) {
        return Err(ConfigError::invalid("wal.group_commit_window", "must be at most 100ms (it delays every ack)"));
    }
    let wal = WalConfig {
        dir: under(w.dir.as_ref(), "wal"),
        segment_bytes,
        group_commit_window,
        queue_depth: w.queue_depth.unwrap_or(256).clamp(1, 65_536),
    };

    let hot_memory_limit = raw.hot.memory_limit.clone().unwrap_or_else(|| "2GB".into());
    parse_byte_size(&hot_memory_limit).map_err(|e| ConfigError::invalid("hot.memory_limit", e.to_string()))?;
    let hot_threads = raw.hot.threads.unwrap_or(2);
    if !(1..=256).contains(&hot_threads) {
        return Err(ConfigError::invalid("hot.threads", "must be between 1 and 256"));
    }

    let http_max_body_bytes = size("http.max_body_bytes", raw.http.max_body_bytes.as_ref(), "16MiB")?;
    if !(1024..=1 << 30).contains(&http_max_body_bytes) {
        return Err(ConfigError::invalid("http.max_body_bytes", "must be between 1KiB and 1GiB"));
    }
    let auth = validate_auth(&raw.auth, mode)?;
    let e = &raw.embeddings;
    let embeddings = EmbeddingsConfig {
        enabled: e.enabled.unwrap_or(true),
        model_dir: e.model_dir.as_deref().map_or_else(|| crate::embed::default_model_dir(home), path),
        max_tokens: e.max_tokens.unwrap_or(256),
        backfill_queue: e.backfill_queue.unwrap_or(100_000),
        remote: validate_remote_embeddings(e)?,
    };
    if !(8..=512).contains(&embeddings.max_tokens) {
        return Err(ConfigError::invalid("embeddings.max_tokens", "must be between 8 and 512"));
    }

    let c = &raw.cache;
    let redis_url = c.redis_url.clone().filter(|u| !u.trim().is_empty());
    if let Some(url) = &redis_url
        && !(url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("unix://"))
    {
        return Err(ConfigError::invalid(
            "cache.redis_url",
            format!("`{url}` is not a redis://, rediss:// or unix:// URL"),
        ));
    }
    let cache = crate::cache::CacheConfig {
        enabled: c.enabled.unwrap_or(true),
        redis_url,
        namespace: c.namespace.clone().unwrap_or_else(|| "akosha:v1".into()),
        ttl: duration("cache.ttl", c.ttl.as_ref(), "60s")?,
        max_entries: c.max_entries.unwrap_or(10_000).max(1),
    };
    if cache.ttl.is_zero() || cache.ttl > Duration::from_secs(86_400) {
        return Err(ConfigError::invalid("cache.ttl", "must be between 1s and 24h"));
    }

    let w = &raw.warm;
    let warm = crate::warm::WarmConfig {
        enabled: w.enabled.unwrap_or(true),
        path: w.path.as_deref().map_or_else(|| data_dir.join("warm/warm.duckdb"), path),
        hot_window: duration("warm.hot_window", w.hot_window.as_ref(), "7d")?,
        move_interval: duration("warm.move_interval", w.move_interval.as_ref(), "10m")?,
        hot_window_per_kind: per_kind("warm.hot_window_per_kind", &w.hot_window_per_kind)?,
        schedule: schedule("warm.schedule", w.schedule.as_deref())?,
    };
    if warm.move_interval < Duration::from_secs(1) {
        return Err(ConfigError::invalid("warm.move_interval", "must be at least 1s"));
    }

    let encryption = validate_encryption(&raw.encryption)?;
    let c = &raw.cold;
    let cold = crate::cold::ColdConfig {
        encryption: encryption.clone(),
        // On by default wherever warm is (a local directory needs no service); asked for without warm, an error.
        enabled: c.enabled.unwrap_or(warm.enabled),
        url: c.url.as_deref().map_or_else(
            || data_dir.join("cold").display().to_string(),
            |u| {
                if u.contains("://") { u.to_owned() } else { path(u).display().to_string() }
            },
        ),
        options: c.options.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        warm_window: duration("cold.warm_window", c.warm_window.as_ref(), "90d")?,
        warm_window_per_kind: per_kind("cold.warm_window_per_kind", &c.warm_window_per_kind)?,
        schedule: schedule("cold.schedule", c.schedule.as_deref())?,
        move_interval: duration("cold.move_interval", c.move_interval.as_ref(), "1h")?,
        cache_dir: under(c.cache_dir.as_ref(), "cold-cache"),
        cache_max_bytes: size("cold.cache_max_bytes", c.cache_max_bytes.as_ref(), "2GiB")?,
        row_group_rows: c.row_group_rows.unwrap_or(122_880),
        embedding_encoding: c
            .embedding_encoding
            .as_deref()
            .map_or(Ok(Default::default()), str::parse)
            .map_err(|e: String| ConfigError::invalid("cold.embedding_encoding", e))?,
        parallel_fetches: c.parallel_fetches.unwrap_or(8),
        breaker_failures: c.breaker_failures.unwrap_or(5),
        breaker_cooldown: duration("cold.breaker_cooldown", c.breaker_cooldown.as_ref(), "30s")?,
        retry_timeout: duration("cold.retry_timeout", c.retry_timeout.as_ref(), "30s")?,
        cache_on_write: c.cache_on_write.unwrap_or(false),
        promotion: crate::cold::PromotionConfig {
            enabled: c.promotion.enabled.unwrap_or(true),
            reads: c.promotion.reads.unwrap_or(3.0),
            window: duration("cold.promotion.window", c.promotion.window.as_ref(), "7d")?,
            min_age: duration("cold.promotion.min_age", c.promotion.min_age.as_ref(), "1d")?,
            max_groups_per_run: c.promotion.max_groups_per_run.unwrap_or(16),
        },
    };
    let promotion = &cold.promotion;
    if !(promotion.reads.is_finite() && promotion.reads >= 1.0) {
        return Err(ConfigError::invalid("cold.promotion.reads", "must be a number of reads, at least 1"));
    }
    if promotion.window < Duration::from_secs(1) {
        return Err(ConfigError::invalid("cold.promotion.window", "must be at least 1s"));
    }
    if promotion.max_groups_per_run == 0 {
        return Err(ConfigError::invalid(
            "cold.promotion.max_groups_per_run",
            "must be at least 1 (or set enabled: false)",
        ));
    }
    if cold.enabled {
        if !warm.enabled {
            return Err(ConfigError::invalid(
                "cold.enabled",
                "the cold tier needs the warm tier (`warm.enabled: true`)",
            ));
        }
        if cold.warm_window <= warm.hot_window {
            return Err(ConfigError::invalid("cold.warm_window", "must be longer than `warm.hot_window`"));
        }
        let (hot_windows, warm_windows) = (warm.hot_windows(), cold.warm_windows());
        for kind in akosha_protocol::RecordKind::ALL {
            if warm_windows.of(kind) <= hot_windows.of(kind) {
                return Err(ConfigError::invalid(
                    format!("cold.warm_window_per_kind.{}", kind.as_str()),
                    format!(
                        "{} records would leave warm ({:?}) no later than they leave hot ({:?}); the warm window must be longer",
                        kind.as_str(),
                        warm_windows.of(kind),
                        hot_windows.of(kind)
                    ),
                ));
            }
        }
        if cold.move_interval < Duration::from_secs(1) {
            return Err(ConfigError::invalid("cold.move_interval", "must be at least 1s"));
        }
        if !(1_000..=10_000_000).contains(&cold.row_group_rows) {
            return Err(ConfigError::invalid("cold.row_group_rows", "must be between 1000 and 10000000"));
        }
        if !(1..=64).contains(&cold.parallel_fetches) {
            return Err(ConfigError::invalid("cold.parallel_fetches", "must be between 1 and 64"));
        }
        if cold.breaker_failures == 0 {
            return Err(ConfigError::invalid("cold.breaker_failures", "must be at least 1"));
        }
        if cold.cache_max_bytes < 16 << 20 {
            return Err(ConfigError::invalid("cold.cache_max_bytes", "must be at least 16MiB"));
        }
        // Remote URLs and their options are checked by opening the location (no request is made); a local
        // directory is created when the tier opens.
        if crate::objects::local_dir(&cold.url).is_none() {
            crate::objects::open(&cold.url, &cold.options)
                .map_err(|e| ConfigError::invalid("cold.url", e.to_string()))?;
        }
    }

    let storage = validate_storage(&raw.storage)?;

    Ok(AggregatorConfig {
        encryption,
        storage,
        cold,
        warm,
        cache,
        http_max_body_bytes: http_max_body_bytes as usize,
        auth,
        embeddings,
        mode,
        ca_cert: under(raw.tls.ca_cert.as_ref(), "certs/ca.pem"),
        server_cert: under(raw.tls.server_cert.as_ref(), "certs/server.pem"),
        server_key: under(raw.tls.server_key.as_ref(), "certs/server.key"),
        http_listen: addr("http.listen", raw.http.listen.as_ref(), 8683)?,
        quic,
        wal,
        hot_memory_limit,
        hot_threads,
        log_level,
        log_json,
        data_dir,
    })
}

/// Per-kind windows: `{metric: 2d}`.
fn per_kind(
    key: &str,
    raw: &std::collections::BTreeMap<String, String>,
) -> Result<std::collections::BTreeMap<akosha_protocol::RecordKind, Duration>, ConfigError> {
    raw.iter()
        .map(|(kind, window)| {
            let key = format!("{key}.{kind}");
            let kind: akosha_protocol::RecordKind =
                kind.parse().map_err(|_| ConfigError::invalid(&key, format!("`{kind}` is not a record kind")))?;
            let window = parse_duration(window).map_err(|e| ConfigError::invalid(&key, e.to_string()))?;
            Ok((kind, window))
        })
        .collect()
}

fn schedule(key: &str, raw: Option<&str>) -> Result<Option<crate::lifecycle::Schedule>, ConfigError> {
    raw.map(|text| crate::lifecycle::Schedule::parse(text).map_err(|e| ConfigError::invalid(key, e))).transpose()
}

/// The keyring, when encryption is asked for: by `enabled: true` or simply by listing keys.
fn validate_encryption(raw: &RawEncryption) -> Result<Option<std::sync::Arc<crate::envelope::Keyring>>, ConfigError> {
    let wanted = raw.enabled.unwrap_or(!raw.keys.is_empty() || raw.active_key.is_some());
    if !wanted {
        return Ok(None);
    }
    if raw.keys.is_empty() {
        return Err(ConfigError::invalid(
            "encryption.keys",
            "encryption is enabled but no key is configured; add `id: <base64 of 32 bytes>` (e.g. `${AKOSHA_KEK}`, made with `akosha-aggregator keys generate`)",
        ));
    }
    let active = match (&raw.active_key, raw.keys.len()) {
        (Some(active), _) => active.clone(),
        (None, 1) => raw.keys.keys().next().cloned().unwrap_or_default(),
        (None, _) => {
            return Err(ConfigError::invalid(
                "encryption.active_key",
                "several keys are configured; name the one that wraps new data keys",
            ));
        }
    };
    let keys: Vec<(String, String)> = raw.keys.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let keyring = crate::envelope::Keyring::new(&active, &keys).map_err(|e| {
        let key = if raw.keys.contains_key(&active) { "encryption.keys" } else { "encryption.active_key" };
        ConfigError::invalid(key, e.to_string())
    })?;
    Ok(Some(std::sync::Arc::new(keyring)))
}

/// A fraction written as `75%` or `0.75`.
fn fraction(key: &str, value: Option<&Fraction>, default: f64) -> Result<f64, ConfigError> {
    let text = match value {
        None => return Ok(default),
        Some(Fraction::Number(n)) => n.to_string(),
        Some(Fraction::Text(t)) => t.trim().to_owned(),
    };
    let parsed = match text.strip_suffix('%') {
        Some(percent) => percent.trim().parse::<f64>().map(|p| p / 100.0),
        None => text.parse::<f64>(),
    };
    match parsed {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
        _ => Err(ConfigError::invalid(key, format!("`{text}` is not a percentage between 0 and 100 (e.g. `75%`)"))),
    }
}

fn validate_storage(raw: &RawStorage) -> Result<crate::storage::StorageConfig, ConfigError> {
    let defaults = crate::storage::StorageConfig::default();
    let disk_warning = fraction("storage.disk_warning", raw.disk_warning.as_ref(), defaults.disk_warning)?;
    let disk_critical = fraction("storage.disk_critical", raw.disk_critical.as_ref(), defaults.disk_critical)?;
    if disk_critical <= disk_warning {
        return Err(ConfigError::invalid("storage.disk_critical", "must be above `storage.disk_warning`"));
    }
    let price = |key: &str, value: Option<f64>, default: f64| match value {
        None => Ok(default),
        Some(p) if p.is_finite() && p >= 0.0 => Ok(p),
        Some(p) => Err(ConfigError::invalid(key, format!("`{p}` is not a price (a number ≥ 0 per GiB and month)"))),
    };
    let prices = crate::storage::TierPrices {
        hot: price("storage.prices.hot", raw.prices.hot, defaults.prices.hot)?,
        warm: price("storage.prices.warm", raw.prices.warm, defaults.prices.warm)?,
        cold: price("storage.prices.cold", raw.prices.cold, defaults.prices.cold)?,
    };
    let currency = raw.currency.clone().unwrap_or(defaults.currency);
    if currency.trim().is_empty() {
        return Err(ConfigError::invalid("storage.currency", "must not be empty"));
    }
    Ok(crate::storage::StorageConfig { disk_warning, disk_critical, prices, currency })
}

fn validate_auth(raw: &RawAuth, mode: Mode) -> Result<crate::auth::AuthConfig, ConfigError> {
    use crate::auth::{RateLimit, Scope, TokenConfig, hash_token, parse_sha256};
    let mut tokens = Vec::new();
    let mut names = std::collections::HashSet::new();
    for (i, t) in raw.tokens.iter().enumerate() {
        let key = |field: &str| format!("auth.tokens[{i}].{field}");
        let name = t.name.clone().ok_or_else(|| ConfigError::invalid(key("name"), "every token needs a name"))?;
        if !names.insert(name.clone()) {
            return Err(ConfigError::invalid(key("name"), format!("`{name}` is used by two tokens")));
        }
        let sha256 = match (&t.token, &t.token_sha256) {
            (Some(secret), None) if secret.len() >= 16 => hash_token(secret),
            (Some(_), None) => {
                return Err(ConfigError::invalid(key("token"), "must be at least 16 characters (or unset variable?)"));
            }
            (None, Some(hex)) => parse_sha256(hex).map_err(|e| ConfigError::invalid(key("token_sha256"), e))?,
            _ => return Err(ConfigError::invalid(key("token"), "give exactly one of `token` and `token_sha256`")),
        };
        if t.scopes.is_empty() {
            return Err(ConfigError::invalid(key("scopes"), "list at least one of read, write, admin"));
        }
        let scopes = t
            .scopes
            .iter()
            .map(|s| Scope::parse(s).map_err(|e| ConfigError::invalid(key("scopes"), e)))
            .collect::<Result<_, _>>()?;
        let rate_limit = t
            .rate_limit
            .as_deref()
            .map(|r| RateLimit::parse(r, t.burst).map_err(|e| ConfigError::invalid(key("rate_limit"), e)))
            .transpose()?;
        tokens.push(TokenConfig { name, sha256, scopes, rate_limit });
    }
    if tokens.is_empty() && mode != Mode::Lite && raw.anonymous != Some(true) {
        return Err(ConfigError::invalid(
            "auth.tokens",
            "standard and production modes serve the network: configure tokens, or set `auth.anonymous: true` \
             to serve without authentication",
        ));
    }
    Ok(crate::auth::AuthConfig { tokens })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<AggregatorConfig, ConfigError> {
        let env: Vec<(String, String)> = env.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        let e2 = env.clone();
        AggregatorConfig::parse(text, move |n| e2.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone()), &env)
    }

    #[test]
    fn lite_defaults_need_nothing() {
        let c = parse("", &[("HOME", "/home/u")]).unwrap();
        assert_eq!(c.mode, Mode::Lite);
        assert_eq!(c.data_dir, PathBuf::from("/home/u/.akosha/dev"));
        assert_eq!(c.wal.dir, PathBuf::from("/home/u/.akosha/dev/wal"));
        assert_eq!(c.quic.listen, "127.0.0.1:8684".parse().unwrap());
        assert_eq!(c.http_listen, "127.0.0.1:8683".parse().unwrap());
        assert_eq!(c.warm.path, PathBuf::from("/home/u/.akosha/dev/warm/warm.duckdb"));
        assert_eq!(c.warm.hot_window, Duration::from_secs(7 * 86_400));
    }

    #[test]
    fn shipped_example_is_valid() {
        let text = std::fs::read_to_string(crate::crate_path("../config/lite.yaml")).unwrap();
        let c = parse(&text, &[("HOME", "/home/dev")]).unwrap();
        assert_eq!(c.mode, Mode::Lite);
        assert_eq!(c.ca_cert, PathBuf::from("/home/dev/.akosha/dev/certs/ca.pem"));
        assert_eq!(c.wal.dir, PathBuf::from("/home/dev/.akosha/dev/wal"));
        let c = parse(&text, &[("HOME", "/home/dev"), ("AKOSHA_DATA_DIR", "/srv/a")]).unwrap();
        assert_eq!(c.wal.dir, PathBuf::from("/srv/a/wal"));
    }

    #[test]
    fn production_mode_and_environment() {
        let c = parse(
            "mode: production\nauth: {anonymous: true}",
            &[("AKOSHA_WAL_DIR", "/fast/wal"), ("AKOSHA_AGGREGATOR__QUIC__CREDIT_WINDOW", "32")],
        )
        .unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/data/akosha"));
        assert!(c.log_json);
        assert_eq!(c.wal.dir, PathBuf::from("/fast/wal"));
        assert_eq!(c.quic.credit_window, 32);
        let c = parse("mode: lite\nauth: {anonymous: true}", &[("AKOSHA_MODE", "standard")]).unwrap();
        assert_eq!(c.mode, Mode::Standard);
        let err = parse("mode: standard", &[]).unwrap_err().to_string();
        assert!(err.contains("auth.tokens"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("mode: huge", "mode"),
            ("quic: {credit_window: 0}", "quic.credit_window"),
            ("quic: {listen: nowhere}", "quic.listen"),
            ("wal: {segment_bytes: 10}", "wal.segment_bytes"),
            ("wal: {sync: maybe}", "wal.sync"),
            ("colour: red", "colour"),
            ("auth: {tokens: [{name: a, token: short, scopes: [read]}]}", "auth.tokens[0].token"),
            ("auth: {tokens: [{name: a, token: 0123456789abcdef0, scopes: [root]}]}", "auth.tokens[0].scopes"),
            (
                "auth: {tokens: [{name: a, token: 0123456789abcdef0, scopes: [read], rate_limit: fast}]}",
                "auth.tokens[0].rate_limit",
            ),
            ("auth: {tokens: [{token: 0123456789abcdef0, scopes: [read]}]}", "auth.tokens[0].name"),
            ("http: {max_body_bytes: 10}", "http.max_body_bytes"),
            ("cache: {redis_url: localhost:6379}", "cache.redis_url"),
            ("cache: {ttl: 0s}", "cache.ttl"),
            ("warm: {hot_window: soon}", "warm.hot_window"),
            ("warm: {move_interval: 0s}", "warm.move_interval"),
            ("embeddings: {max_tokens: 4096}", "embeddings.max_tokens"),
            ("embeddings: {endpoint: 'gpu-box:8080'}", "embeddings.endpoint"),
            ("embeddings: {endpoint: 'ftp://gpu-box/v1/embeddings'}", "embeddings.endpoint"),
            ("embeddings: {endpoint: 'http://gpu-box/v1/embeddings', batch_size: 0}", "embeddings.batch_size"),
            ("embeddings: {endpoint: 'http://gpu-box/v1/embeddings', timeout: 0s}", "embeddings.timeout"),
            ("embeddings: {model: text-embedding-3-small}", "embeddings.model"),
            ("storage: {disk_warning: 120%}", "storage.disk_warning"),
            ("storage: {disk_critical: lots}", "storage.disk_critical"),
            ("storage: {disk_warning: 80%, disk_critical: 0.7}", "storage.disk_critical"),
            ("storage: {prices: {cold: -1}}", "storage.prices.cold"),
            ("storage: {prices: {tape: 0.001}}", "storage.prices.tape"),
            ("cold: {promotion: {reads: 0.5}}", "cold.promotion.reads"),
            ("cold: {promotion: {window: 0s}}", "cold.promotion.window"),
            ("cold: {promotion: {min_age: later}}", "cold.promotion.min_age"),
            ("cold: {promotion: {max_groups_per_run: 0}}", "cold.promotion.max_groups_per_run"),
            ("cold: {promotion: {often: true}}", "cold.promotion.often"),
            ("encryption: {enabled: true}", "encryption.keys"),
            ("encryption: {keys: {k1: c2hvcnQ=}}", "encryption.keys"),
            ("encryption: {keys: {k1: 'not base64!'}}", "encryption.keys"),
            (
                "encryption: {keys: {k1: AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=, k2: AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=}}",
                "encryption.active_key",
            ),
            (
                "encryption: {active_key: k9, keys: {k1: AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=}}",
                "encryption.active_key",
            ),
            ("encryption: {kek: x}", "encryption.kek"),
            ("warm: {hot_window_per_kind: {metrics: 1d}}", "warm.hot_window_per_kind.metrics"),
            ("warm: {hot_window_per_kind: {metric: soon}}", "warm.hot_window_per_kind.metric"),
            ("warm: {schedule: nightly}", "warm.schedule"),
            ("cold: {schedule: '05:00-05:00'}", "cold.schedule"),
            ("cold: {embedding_encoding: f16}", "cold.embedding_encoding"),
            ("cold: {warm_window_per_kind: {metric: 2d}}", "cold.warm_window_per_kind.metric"),
            ("cold: {cache_on_write: sometimes}", "cold.cache_on_write"),
        ] {
            let err = parse(text, &[]).unwrap_err().to_string();
            assert!(err.contains(&format!("key `{key}`")), "{err} does not name {key}");
        }
    }

    #[test]
    fn encryption_is_off_unless_keys_are_given_and_keys_come_from_the_environment() {
        assert!(parse("", &[]).unwrap().encryption.is_none());
        let key = crate::envelope::generate_key().unwrap();
        let c = parse("encryption: {keys: {k2026: '${AKOSHA_KEK}'}}", &[("AKOSHA_KEK", &key)]).unwrap();
        let keyring = c.encryption.expect("keys given");
        assert_eq!(keyring.active_id(), "k2026");
        assert!(c.cold.encryption.is_some(), "the cold tier seals with the same keys");
        let off = parse("encryption: {enabled: false, keys: {k1: '${AKOSHA_KEK}'}}", &[("AKOSHA_KEK", &key)]).unwrap();
        assert!(off.encryption.is_none());
    }

    #[test]
    fn storage_thresholds_take_percentages_or_fractions_and_prices_default_to_list_prices() {
        let c = parse("storage: {disk_warning: 70%, disk_critical: 0.95, prices: {cold: 0.01}, currency: EUR}", &[])
            .unwrap();
        assert_eq!((c.storage.disk_warning, c.storage.disk_critical), (0.7, 0.95));
        assert_eq!((c.storage.prices.cold, c.storage.prices.warm, c.storage.currency.as_str()), (0.01, 0.08, "EUR"));
        let d = parse("", &[]).unwrap();
        assert_eq!(d.storage, crate::storage::StorageConfig::default());
    }

    #[test]
    fn a_remote_embeddings_endpoint_is_parsed_and_an_empty_one_means_none() {
        let c = parse(
            "embeddings: {endpoint: 'https://gpu-box:8080/v1/embeddings', api_key: sk-1, timeout: 5s, batch_size: 16}",
            &[],
        )
        .unwrap();
        let remote = c.embeddings.remote.unwrap();
        assert_eq!(remote.endpoint.as_str(), "https://gpu-box:8080/v1/embeddings");
        assert_eq!((remote.model.as_str(), remote.api_key.as_deref()), ("all-MiniLM-L6-v2", Some("sk-1")));
        assert_eq!((remote.timeout, remote.batch_size), (Duration::from_secs(5), 16));
        assert!(!format!("{remote:?}").contains("sk-1"), "the key stays out of Debug output");
        assert!(parse("embeddings: {endpoint: '', api_key: ''}", &[]).unwrap().embeddings.remote.is_none());
    }
}
