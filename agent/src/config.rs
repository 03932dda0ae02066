//! Agent configuration: the YAML file as written by users (`Raw*`), and the validated form the agent runs on.
//!
//! Precedence is environment > file > defaults. `AKOSHA_AGENT__SECTION__KEY` overrides any key; the short
//! names in [`ENV_ALIASES`] are documented in `config/agent.yaml`. Unknown keys and bad values are rejected
//! with the dotted key in the message.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use akosha_protocol::settings::{
    ConfigError, EnvOverrides, expand_home, parse_byte_size, parse_config, parse_duration,
};
use akosha_protocol::{Codec, Record, RecordKind, Residency};
use serde::Deserialize;

use crate::buffer::{BufferConfig, FsyncPolicy, WhenFull};
use crate::plugin::PluginConfig;

/// Short environment variable names and the keys they set.
pub const ENV_ALIASES: &[(&str, &str)] = &[
    ("AKOSHA_SYSTEM_ID", "system_id"),
    ("AKOSHA_AGENT_DATA_DIR", "data_dir"),
    ("AKOSHA_AGENT_LISTEN", "ingest.listen"),
    ("AKOSHA_LOG_LEVEL", "log.level"),
    ("AKOSHA_LOG_FORMAT", "log.format"),
];

const ENV_PREFIX: &str = "AKOSHA_AGENT__";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    system_id: String,
    #[serde(default = "default_data_dir")]
    data_dir: String,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    ingest: RawIngest,
    #[serde(default)]
    buffer: RawBuffer,
    #[serde(default)]
    routing: RawRouting,
    destinations: BTreeMap<String, RawDestination>,
    #[serde(default)]
    sources: RawSources,
    #[serde(default)]
    policies: RawPolicies,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicies {
    #[serde(default)]
    residency: Vec<RawPolicy>,
    #[serde(default)]
    compression: Vec<RawPolicy>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: Option<String>,
    path: String,
    sha256: Option<String>,
    #[serde(default = "default_policy_timeout")]
    timeout: String,
    #[serde(default = "default_policy_memory")]
    memory_limit: String,
    #[serde(default)]
    embeddings: bool,
    #[serde(default)]
    config: BTreeMap<String, ScalarValue>,
}

/// A plugin configuration value: plugins receive strings, but YAML users write numbers, booleans and lists
/// too (a list becomes its items joined with commas, the form the SDK's `Config::list` reads).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, expecting = "a string, number, boolean or list of those")]
enum ScalarValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
    List(Vec<ScalarValue>),
}

impl ScalarValue {
    fn into_string(self) -> String {
        match self {
            ScalarValue::Bool(b) => b.to_string(),
            ScalarValue::Int(i) => i.to_string(),
            ScalarValue::Float(f) => f.to_string(),
            ScalarValue::Text(s) => s,
            ScalarValue::List(items) => items.into_iter().map(ScalarValue::into_string).collect::<Vec<_>>().join(","),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSources {
    #[serde(default)]
    files: Vec<RawFileSource>,
    #[serde(default)]
    session_buddy: RawSessionBuddy,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSessionBuddy {
    #[serde(default)]
    snapshots: bool,
    data_dir: Option<String>,
    interval: Option<String>,
    timezone: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFileSource {
    path: String,
    #[serde(default = "default_poll")]
    poll_interval: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    #[serde(default = "default_log_level")]
    level: String,
    #[serde(default = "default_log_format")]
    format: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIngest {
    #[serde(default = "default_listen")]
    listen: String,
    #[serde(default = "default_max_body")]
    max_body_bytes: String,
    #[serde(default = "default_full_wait")]
    full_wait: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBuffer {
    #[serde(default = "default_buffer_max")]
    max_bytes: String,
    #[serde(default = "default_when_full")]
    when_full: String,
    #[serde(default = "default_fsync")]
    fsync: String,
    #[serde(default = "default_fsync_window")]
    fsync_window: String,
    #[serde(default = "default_fsync_interval")]
    fsync_interval: String,
    #[serde(default = "default_chunk")]
    max_chunk_bytes: String,
    #[serde(default = "default_spare_segments")]
    spare_segments: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouting {
    #[serde(default = "default_route")]
    default_route: String,
    #[serde(default = "default_policy_batch")]
    policy_batch_records: usize,
}

impl Default for RawRouting {
    fn default() -> Self {
        Self { default_route: default_route(), policy_batch_records: default_policy_batch() }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDestination {
    address: String,
    #[serde(default = "default_server_name")]
    server_name: String,
    ca: String,
    cert: String,
    key: String,
    #[serde(default = "default_destination_residency")]
    residency: String,
    routes: Option<Vec<String>>,
    #[serde(default = "default_codec")]
    compression: String,
    #[serde(default = "default_batch_records")]
    batch_max_records: u32,
    #[serde(default = "default_batch_bytes")]
    batch_max_bytes: String,
    #[serde(default = "default_connect_timeout")]
    connect_timeout: String,
    #[serde(default = "default_backoff_initial")]
    backoff_initial: String,
    #[serde(default = "default_backoff_max")]
    backoff_max: String,
    #[serde(default = "default_keep_alive")]
    keep_alive: String,
    #[serde(default = "default_idle_timeout")]
    idle_timeout: String,
    #[serde(default = "default_drain_timeout")]
    drain_timeout: String,
}

/// Upper bound on `buffer.spare_segments`: more buys nothing once a sender keeps up.
const MAX_SPARE_SEGMENTS: usize = 16;

macro_rules! defaults {
    ($($name:ident: $ty:ty = $value:expr;)*) => {
        $(fn $name() -> $ty { $value.into() })*
    };
}

defaults! {
    default_data_dir: String = "~/.akosha/agent";
    default_log_level: String = "info";
    default_log_format: String = "text";
    default_listen: String = "127.0.0.1:8682";
    default_max_body: String = "64MiB";
    default_full_wait: String = "1s";
    default_buffer_max: String = "1GiB";
    default_when_full: String = "block";
    default_fsync: String = "batch";
    default_fsync_window: String = "0ms";
    default_fsync_interval: String = "1s";
    default_chunk: String = "1MiB";
    default_spare_segments: usize = 1usize;
    default_server_name: String = "localhost";
    default_codec: String = "lz4";
    default_batch_records: u32 = 2000u32;
    default_batch_bytes: String = "4MiB";
    default_connect_timeout: String = "5s";
    default_backoff_initial: String = "100ms";
    default_backoff_max: String = "30s";
    default_keep_alive: String = "5s";
    default_idle_timeout: String = "30s";
    default_drain_timeout: String = "10s";
    default_poll: String = "250ms";
    default_route: String = "cloud";
    default_policy_batch: usize = 1000usize;
    default_policy_timeout: String = "500ms";
    default_policy_memory: String = "64MiB";
    default_destination_residency: String = "cloud";
}

impl Default for RawLog {
    fn default() -> Self {
        Self { level: default_log_level(), format: default_log_format() }
    }
}

impl Default for RawIngest {
    fn default() -> Self {
        Self { listen: default_listen(), max_body_bytes: default_max_body(), full_wait: default_full_wait() }
    }
}

impl Default for RawBuffer {
    fn default() -> Self {
        Self {
            max_bytes: default_buffer_max(),
            when_full: default_when_full(),
            fsync: default_fsync(),
            fsync_window: default_fsync_window(),
            fsync_interval: default_fsync_interval(),
            max_chunk_bytes: default_chunk(),
            spare_segments: default_spare_segments(),
        }
    }
}

/// Validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This agent's system id; must match its certificates.
    pub system_id: String,
    /// Where buffers and state live.
    pub data_dir: PathBuf,
    /// Logging.
    pub log: LogConfig,
    /// Local ingest API.
    pub ingest: IngestConfig,
    /// Buffer settings (one buffer per destination).
    pub buffer: BufferConfig,
    /// How records are routed to destinations.
    pub routing: RoutingConfig,
    /// WASM policies, in the order they run.
    pub policies: PoliciesConfig,
    /// Aggregators, by name.
    pub destinations: BTreeMap<String, DestinationConfig>,
    /// NDJSON files to follow.
    pub files: Vec<crate::sources::file_tail::FileTailConfig>,
    /// Zone of Session-Buddy's naive local timestamps (push and snapshots).
    pub session_buddy_zone: jiff::tz::TimeZone,
    /// Session-Buddy database snapshots, when enabled.
    pub session_buddy_snapshots: Option<crate::sources::session_buddy_snapshot::SnapshotConfig>,
}

/// Routing of records to destinations by residency.
#[derive(Debug, Clone)]
pub struct RoutingConfig {
    /// Route of records no residency policy decides about (no policy configured, or the record's own
    /// `residency` is laxer).
    pub default_route: Residency,
    /// Records per residency-policy call.
    pub policy_batch_records: usize,
}

/// Configured WASM policies.
#[derive(Debug, Clone, Default)]
pub struct PoliciesConfig {
    /// Residency policies: each sees the previous one's redacted output; the strictest route wins.
    pub residency: Vec<PluginConfig>,
    /// Compression policies: the first that answers picks the codec; if all fail, the destination's codec.
    pub compression: Vec<PluginConfig>,
}

/// Logging settings.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// `tracing` filter directive, e.g. `info` or `akosha_agent=debug`.
    pub level: String,
    /// JSON lines instead of text.
    pub json: bool,
}

/// Local ingest API settings.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Listen address (loopback by default).
    pub listen: SocketAddr,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// How long a request waits for buffer room before answering 503.
    pub full_wait: Duration,
}

/// One aggregator the agent sends to.
#[derive(Debug, Clone)]
pub struct DestinationConfig {
    /// Name in the config.
    pub name: String,
    /// `host:port` of the aggregator's QUIC endpoint.
    pub address: String,
    /// Name the aggregator's certificate must carry.
    pub server_name: String,
    /// CA certificate (PEM) that signed the aggregator's and this agent's certificates.
    pub ca: PathBuf,
    /// This agent's certificate (PEM).
    pub cert: PathBuf,
    /// This agent's private key (PEM).
    pub key: PathBuf,
    /// Whether this destination is on the premises (may hold records routed `onprem`) or in the cloud.
    pub residency: Residency,
    /// Which routes it receives: cloud destinations receive `cloud`; on-prem ones `cloud` and `onprem` unless
    /// configured otherwise.
    pub routes: Vec<Residency>,
    /// Payload compression when no compression policy answers.
    pub codec: Codec,
    /// Most records per batch.
    pub batch_max_records: u32,
    /// Most uncompressed bytes per batch.
    pub batch_max_bytes: u64,
    /// Time allowed for the QUIC + TLS handshake and the Welcome.
    pub connect_timeout: Duration,
    /// First reconnect delay (full jitter applies).
    pub backoff_initial: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// QUIC keep-alive interval.
    pub keep_alive: Duration,
    /// QUIC idle timeout.
    pub idle_timeout: Duration,
    /// How long shutdown waits for in-flight batches to be acknowledged.
    pub drain_timeout: Duration,
}

impl AgentConfig {
    /// Reads and validates the configuration file, with the process environment.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::invalid("(file)", format!("cannot read {}: {e}", path.display())))?;
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::parse(&text, |name| std::env::var(name).ok(), &env)
    }

    /// Parses and validates configuration text with an explicit environment.
    pub fn parse(
        text: &str,
        lookup: impl Fn(&str) -> Option<String>,
        env: &[(String, String)],
    ) -> Result<AgentConfig, ConfigError> {
        let home = lookup("HOME");
        let raw: RawConfig =
            parse_config(text, lookup, env, EnvOverrides { prefix: ENV_PREFIX, aliases: ENV_ALIASES })?;
        Self::validate(raw, home.as_deref())
    }

    fn validate(raw: RawConfig, home: Option<&str>) -> Result<AgentConfig, ConfigError> {
        let probe = Record {
            system_id: raw.system_id.clone(),
            id: "x".into(),
            kind: RecordKind::Conversation,
            ..Record::default()
        };
        probe.validate().map_err(|e| ConfigError::invalid("system_id", e.to_string()))?;
        let path = |s: &str| PathBuf::from(expand_home(s, home));
        let size = |key: &str, s: &str| parse_byte_size(s).map_err(|e| ConfigError::invalid(key, e.to_string()));
        let duration = |key: &str, s: &str| parse_duration(s).map_err(|e| ConfigError::invalid(key, e.to_string()));

        let level = raw.log.level.clone();
        tracing_subscriber::EnvFilter::try_new(&level)
            .map_err(|e| ConfigError::invalid("log.level", format!("`{level}` is not a log filter: {e}")))?;
        let json = match raw.log.format.as_str() {
            "text" => false,
            "json" => true,
            other => return Err(ConfigError::invalid("log.format", format!("`{other}` is not one of text, json"))),
        };

        let listen = raw.ingest.listen.parse::<SocketAddr>().map_err(|_| {
            ConfigError::invalid(
                "ingest.listen",
                format!("`{}` is not an address like 127.0.0.1:8682", raw.ingest.listen),
            )
        })?;
        let max_body_bytes = size("ingest.max_body_bytes", &raw.ingest.max_body_bytes)?;
        if !(1024..=1 << 30).contains(&max_body_bytes) {
            return Err(ConfigError::invalid("ingest.max_body_bytes", "must be between 1KiB and 1GiB"));
        }
        let ingest = IngestConfig {
            listen,
            max_body_bytes: max_body_bytes as usize,
            full_wait: duration("ingest.full_wait", &raw.ingest.full_wait)?,
        };

        let b = &raw.buffer;
        let max_bytes = size("buffer.max_bytes", &b.max_bytes)?;
        if max_bytes < 1 << 20 {
            return Err(ConfigError::invalid("buffer.max_bytes", "must be at least 1MiB"));
        }
        let when_full = match b.when_full.as_str() {
            "block" => WhenFull::Block,
            "drop_oldest" => WhenFull::DropOldest,
            other => {
                return Err(ConfigError::invalid(
                    "buffer.when_full",
                    format!("`{other}` is not one of block, drop_oldest"),
                ));
            }
        };
        let fsync = match b.fsync.as_str() {
            "always" => FsyncPolicy::Always,
            "batch" => FsyncPolicy::Batch { window: duration("buffer.fsync_window", &b.fsync_window)? },
            "interval" => FsyncPolicy::Interval(duration("buffer.fsync_interval", &b.fsync_interval)?),
            other => {
                return Err(ConfigError::invalid(
                    "buffer.fsync",
                    format!("`{other}` is not one of always, batch, interval"),
                ));
            }
        };
        if let FsyncPolicy::Batch { window } = fsync
            && window > Duration::from_secs(1)
        {
            return Err(ConfigError::invalid("buffer.fsync_window", "must be at most 1s"));
        }
        let max_chunk_bytes = size("buffer.max_chunk_bytes", &b.max_chunk_bytes)?;
        if !(4096..=64 << 20).contains(&max_chunk_bytes) || max_chunk_bytes > max_bytes {
            return Err(ConfigError::invalid(
                "buffer.max_chunk_bytes",
                "must be between 4KiB and 64MiB and below buffer.max_bytes",
            ));
        }
        if b.spare_segments > MAX_SPARE_SEGMENTS {
            return Err(ConfigError::invalid(
                "buffer.spare_segments",
                format!("must be at most {MAX_SPARE_SEGMENTS} (each keeps up to 128MiB of disk)"),
            ));
        }
        let buffer = BufferConfig {
            max_bytes,
            when_full,
            fsync,
            max_chunk_bytes: max_chunk_bytes as usize,
            cache_bytes: 8 << 20,
            spare_segments: b.spare_segments,
        };

        if raw.destinations.is_empty() {
            return Err(ConfigError::invalid("destinations", "at least one destination is required"));
        }
        let mut destinations = BTreeMap::new();
        for (name, d) in raw.destinations {
            let key = |k: &str| format!("destinations.{name}.{k}");
            if name.is_empty() || !name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-') {
                return Err(ConfigError::invalid(
                    format!("destinations.{name}"),
                    "names may only use letters, digits, '_' and '-'",
                ));
            }
            if d.address.rsplit_once(':').and_then(|(_, port)| port.parse::<u16>().ok()).is_none() {
                return Err(ConfigError::invalid(key("address"), format!("`{}` is not host:port", d.address)));
            }
            let codec =
                d.compression.parse::<Codec>().map_err(|e| ConfigError::invalid(key("compression"), e.to_string()))?;
            if !(1..=100_000).contains(&d.batch_max_records) {
                return Err(ConfigError::invalid(key("batch_max_records"), "must be between 1 and 100000"));
            }
            let batch_max_bytes = size(&key("batch_max_bytes"), &d.batch_max_bytes)?;
            if !(1024..=(akosha_protocol::DEFAULT_MAX_FRAME_LEN as u64 / 2)).contains(&batch_max_bytes) {
                return Err(ConfigError::invalid(key("batch_max_bytes"), "must be between 1KiB and 8MiB"));
            }
            let backoff_initial = duration(&key("backoff_initial"), &d.backoff_initial)?;
            let backoff_max = duration(&key("backoff_max"), &d.backoff_max)?;
            if backoff_initial.is_zero() || backoff_max < backoff_initial {
                return Err(ConfigError::invalid(key("backoff_max"), "backoff_initial must be > 0 and <= backoff_max"));
            }
            let keep_alive = duration(&key("keep_alive"), &d.keep_alive)?;
            let idle_timeout = duration(&key("idle_timeout"), &d.idle_timeout)?;
            if keep_alive >= idle_timeout {
                return Err(ConfigError::invalid(key("keep_alive"), "must be shorter than idle_timeout"));
            }
            let residency = match d.residency.as_str() {
                "cloud" => Residency::Cloud,
                "onprem" => Residency::Onprem,
                other => {
                    return Err(ConfigError::invalid(
                        key("residency"),
                        format!("`{other}` is not one of cloud, onprem"),
                    ));
                }
            };
            let routes = match &d.routes {
                None if residency == Residency::Onprem => vec![Residency::Cloud, Residency::Onprem],
                None => vec![Residency::Cloud],
                Some(list) => {
                    let mut routes = Vec::new();
                    for route in list {
                        let route = match route.as_str() {
                            "cloud" => Residency::Cloud,
                            "onprem" if residency == Residency::Onprem => Residency::Onprem,
                            "onprem" => {
                                return Err(ConfigError::invalid(
                                    key("routes"),
                                    "a cloud destination cannot receive records routed onprem (set residency: onprem \
                                     if this aggregator is on the premises)",
                                ));
                            }
                            other => {
                                return Err(ConfigError::invalid(
                                    key("routes"),
                                    format!("`{other}` is not one of cloud, onprem"),
                                ));
                            }
                        };
                        if !routes.contains(&route) {
                            routes.push(route);
                        }
                    }
                    if routes.is_empty() {
                        return Err(ConfigError::invalid(key("routes"), "must name at least one route"));
                    }
                    routes
                }
            };
            destinations.insert(
                name.clone(),
                DestinationConfig {
                    name: name.clone(),
                    residency,
                    routes,
                    address: d.address,
                    server_name: d.server_name,
                    ca: path(&d.ca),
                    cert: path(&d.cert),
                    key: path(&d.key),
                    codec,
                    batch_max_records: d.batch_max_records,
                    batch_max_bytes,
                    connect_timeout: duration(&key("connect_timeout"), &d.connect_timeout)?,
                    backoff_initial,
                    backoff_max,
                    keep_alive,
                    idle_timeout,
                    drain_timeout: duration(&key("drain_timeout"), &d.drain_timeout)?,
                },
            );
        }
        let default_route = match raw.routing.default_route.as_str() {
            "cloud" => Residency::Cloud,
            "onprem" => Residency::Onprem,
            other => {
                return Err(ConfigError::invalid(
                    "routing.default_route",
                    format!("`{other}` is not one of cloud, onprem"),
                ));
            }
        };
        if !destinations.values().any(|d| d.routes.contains(&Residency::Cloud)) {
            return Err(ConfigError::invalid("destinations", "no destination receives records routed cloud"));
        }
        if !(1..=100_000).contains(&raw.routing.policy_batch_records) {
            return Err(ConfigError::invalid("routing.policy_batch_records", "must be between 1 and 100000"));
        }
        let routing = RoutingConfig { default_route, policy_batch_records: raw.routing.policy_batch_records };
        let policies = PoliciesConfig {
            residency: policies(&raw.policies.residency, "policies.residency", home)?,
            compression: policies(&raw.policies.compression, "policies.compression", home)?,
        };

        let mut files = Vec::new();
        for (i, f) in raw.sources.files.iter().enumerate() {
            let poll_interval = duration(&format!("sources.files[{i}].poll_interval"), &f.poll_interval)?;
            if poll_interval < Duration::from_millis(10) {
                return Err(ConfigError::invalid(format!("sources.files[{i}].poll_interval"), "must be at least 10ms"));
            }
            files.push(crate::sources::file_tail::FileTailConfig {
                path: path(&f.path),
                poll_interval,
                max_read_bytes: 4 << 20,
            });
        }

        let sb = &raw.sources.session_buddy;
        let timezone = sb.timezone.clone().unwrap_or_else(|| "local".into());
        let zone = match timezone.as_str() {
            "local" => jiff::tz::TimeZone::try_system().unwrap_or(jiff::tz::TimeZone::UTC),
            name => jiff::tz::TimeZone::get(name).map_err(|e| {
                ConfigError::invalid("sources.session_buddy.timezone", format!("`{name}` is not a time zone: {e}"))
            })?,
        };
        let session_buddy_snapshots = if sb.snapshots {
            let interval = duration("sources.session_buddy.interval", sb.interval.as_deref().unwrap_or("30s"))?;
            if interval < Duration::from_secs(1) {
                return Err(ConfigError::invalid("sources.session_buddy.interval", "must be at least 1s"));
            }
            Some(crate::sources::session_buddy_snapshot::SnapshotConfig {
                data_dir: path(sb.data_dir.as_deref().unwrap_or("~/.claude/data")),
                snapshot_dir: path(&raw.data_dir).join("snapshots"),
                interval,
                zone: zone.clone(),
                timezone,
                worker: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("akosha-agent")),
            })
        } else {
            None
        };

        Ok(AgentConfig {
            files,
            session_buddy_zone: zone,
            session_buddy_snapshots,
            system_id: raw.system_id,
            data_dir: path(&raw.data_dir),
            log: LogConfig { level, json },
            ingest,
            buffer,
            routing,
            policies,
            destinations,
        })
    }

    /// The buffer of records that must stay on the premises when no on-prem destination is configured (or a
    /// residency policy failed and there is none): kept, never sent, inspectable with `buffer inspect`.
    pub fn quarantine_dir(&self) -> PathBuf {
        self.data_dir.join("quarantine")
    }

    /// The agent's own state (source checkpoints).
    pub fn state_dir(&self) -> PathBuf {
        self.data_dir.join("state")
    }

    /// Directory of a destination's buffer.
    pub fn buffer_dir(&self, destination: &str) -> PathBuf {
        self.data_dir.join("buffers").join(destination)
    }
}

/// Validates one list of policies; names must be unique within it (they label logs and metrics).
fn policies(raw: &[RawPolicy], list: &str, home: Option<&str>) -> Result<Vec<PluginConfig>, ConfigError> {
    let mut out: Vec<PluginConfig> = Vec::new();
    for (i, p) in raw.iter().enumerate() {
        let key = |k: &str| format!("{list}[{i}].{k}");
        let path = PathBuf::from(expand_home(&p.path, home));
        let name = match &p.name {
            Some(name) => name.clone(),
            None => path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        };
        if name.is_empty() || !name.bytes().all(|c| c.is_ascii_alphanumeric() || b"_-.".contains(&c)) {
            return Err(ConfigError::invalid(key("name"), format!("`{name}`: use letters, digits, '_', '-' and '.'")));
        }
        if out.iter().any(|o| o.name == name) {
            return Err(ConfigError::invalid(key("name"), format!("`{name}` is used twice in {list}")));
        }
        if let Some(pin) = &p.sha256
            && (pin.len() != 64 || !pin.bytes().all(|c| c.is_ascii_hexdigit()))
        {
            return Err(ConfigError::invalid(key("sha256"), "must be 64 hex digits"));
        }
        let timeout = parse_duration(&p.timeout).map_err(|e| ConfigError::invalid(key("timeout"), e.to_string()))?;
        if !(Duration::from_millis(10)..=Duration::from_secs(60)).contains(&timeout) {
            return Err(ConfigError::invalid(key("timeout"), "must be between 10ms and 60s"));
        }
        let memory_limit =
            parse_byte_size(&p.memory_limit).map_err(|e| ConfigError::invalid(key("memory_limit"), e.to_string()))?;
        if !(1 << 20..=4 << 30).contains(&memory_limit) {
            return Err(ConfigError::invalid(key("memory_limit"), "must be between 1MiB and 4GiB"));
        }
        let mut plugin = PluginConfig::new(name, path);
        plugin.sha256 = p.sha256.clone();
        plugin.timeout = timeout;
        plugin.memory_limit = memory_limit;
        plugin.embeddings = p.embeddings;
        plugin.config = p.config.iter().map(|(k, v)| (k.clone(), v.clone().into_string())).collect();
        out.push(plugin);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str =
        "system_id: host-1\ndestinations:\n  main: {address: '127.0.0.1:8684', ca: /c, cert: /a, key: /k}\n";

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<AgentConfig, ConfigError> {
        let env: Vec<(String, String)> = env.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        let lookup_env = env.clone();
        AgentConfig::parse(text, move |n| lookup_env.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone()), &env)
    }

    #[test]
    fn defaults_fill_a_minimal_file() {
        let c = parse(MINIMAL, &[("HOME", "/home/u")]).unwrap();
        assert_eq!(c.routing.default_route, Residency::Cloud);
        assert_eq!(c.destinations["main"].routes, [Residency::Cloud]);
        assert!(c.policies.residency.is_empty());
        assert_eq!(c.data_dir, PathBuf::from("/home/u/.akosha/agent"));
        assert_eq!(c.ingest.listen, "127.0.0.1:8682".parse().unwrap());
        assert_eq!(c.buffer.fsync, FsyncPolicy::Batch { window: Duration::ZERO });
        assert_eq!(c.buffer.spare_segments, 1);
        assert_eq!(c.destinations["main"].codec, Codec::Lz4);
    }

    #[test]
    fn shipped_example_is_valid() {
        let text = std::fs::read_to_string(crate::crate_path("../config/agent.yaml")).unwrap();
        let c = parse(&text, &[("HOME", "/home/dev"), ("AKOSHA_SYSTEM_ID", "laptop-7")]).unwrap();
        assert_eq!(c.system_id, "laptop-7");
        assert_eq!(c.destinations["primary"].cert, PathBuf::from("/home/dev/.akosha/dev/certs/agents/laptop-7.pem"));
        assert_eq!(c.data_dir, PathBuf::from("/home/dev/.akosha/agent"));
    }

    #[test]
    fn hybrid_destinations_and_policies() {
        let text = r#"
system_id: host-1
routing: {default_route: onprem, policy_batch_records: 500}
destinations:
  cloud: {address: 'cloud.example:8684', ca: /c, cert: /a, key: /k}
  site: {address: '10.0.0.2:8684', ca: /c, cert: /a, key: /k, residency: onprem}
policies:
  residency:
    - path: ~/plugins/akosha-residency.wasm
      sha256: 0123456789abcdef0123456789ABCDEF0123456789abcdef0123456789abcdef
      timeout: 2s
      memory_limit: 32MiB
      config: {on_match: onprem, redact: true, max: 3, ratio: 0.5, onprem_projects: [payroll, legal-*]}
  compression:
    - {name: adaptive, path: /p/c.wasm}
"#;
        let c = parse(text, &[("HOME", "/home/u")]).unwrap();
        assert_eq!(c.routing.default_route, Residency::Onprem);
        assert_eq!(c.routing.policy_batch_records, 500);
        assert_eq!(c.destinations["cloud"].routes, [Residency::Cloud]);
        assert_eq!(c.destinations["site"].routes, [Residency::Cloud, Residency::Onprem]);
        let r = &c.policies.residency[0];
        assert_eq!(r.name, "akosha-residency");
        assert_eq!(r.path, PathBuf::from("/home/u/plugins/akosha-residency.wasm"));
        assert_eq!(r.timeout, Duration::from_secs(2));
        assert_eq!(r.memory_limit, 32 << 20);
        let config: BTreeMap<_, _> = r.config.iter().cloned().collect();
        assert_eq!(config["redact"], "true");
        assert_eq!(config["max"], "3");
        assert_eq!(config["ratio"], "0.5");
        assert_eq!(config["onprem_projects"], "payroll,legal-*");
        assert_eq!(c.policies.compression[0].name, "adaptive");
    }

    #[test]
    fn environment_overrides_the_file() {
        let c = parse(
            MINIMAL,
            &[("AKOSHA_AGENT__BUFFER__WHEN_FULL", "drop_oldest"), ("AKOSHA_AGENT_LISTEN", "127.0.0.1:9999")],
        )
        .unwrap();
        assert_eq!(c.buffer.when_full, WhenFull::DropOldest);
        assert_eq!(c.ingest.listen.port(), 9999);
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            (format!("{MINIMAL}buffer: {{fsync: sometimes}}"), "buffer.fsync"),
            (format!("{MINIMAL}buffer: {{max_bytes: lots}}"), "buffer.max_bytes"),
            (format!("{MINIMAL}buffer: {{spare_segments: 99}}"), "buffer.spare_segments"),
            (format!("{MINIMAL}buffer: {{spare_segments: -1}}"), "buffer.spare_segments"),
            (format!("{MINIMAL}bufer: {{}}"), "bufer"),
            (MINIMAL.replace("8684", "port"), "destinations.main.address"),
            (MINIMAL.replace("host-1", "bad id"), "system_id"),
            (format!("{MINIMAL}routing: {{default_route: drop}}"), "routing.default_route"),
            (MINIMAL.replace("key: /k}", "key: /k, routes: [onprem]}"), "destinations.main.routes"),
            (MINIMAL.replace("key: /k}", "key: /k, residency: mars}"), "destinations.main.residency"),
            (
                format!("{MINIMAL}policies: {{residency: [{{path: /p.wasm, timeout: 1h}}]}}"),
                "policies.residency[0].timeout",
            ),
            (
                format!("{MINIMAL}policies: {{residency: [{{path: /p.wasm, sha256: abc}}]}}"),
                "policies.residency[0].sha256",
            ),
            (
                format!("{MINIMAL}policies: {{compression: [{{path: /a/p.wasm}}, {{path: /b/p.wasm}}]}}"),
                "policies.compression[1].name",
            ),
            (
                format!("{MINIMAL}policies: {{residency: [{{path: /p.wasm, limits: 1}}]}}"),
                "policies.residency[0].limits",
            ),
            (
                format!("{MINIMAL}policies: {{residency: [{{path: /p.wasm, config: {{rules: {{a: 1}}}}}}]}}"),
                "policies.residency[0].config.rules",
            ),
            (format!("{MINIMAL}log: {{format: xml}}"), "log.format"),
            (
                format!("{MINIMAL}sources: {{files: [{{path: /x, poll_interval: 1ns}}]}}"),
                "sources.files[0].poll_interval",
            ),
        ];
        for (text, key) in cases {
            let err = parse(&text, &[]).unwrap_err().to_string();
            assert!(err.contains(&format!("key `{key}`")), "{err} does not name {key}");
        }
    }
}
