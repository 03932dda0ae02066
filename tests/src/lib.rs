//! Harness for end-to-end tests: starts the real `akosha-aggregator` and `akosha-agent` binaries on free
//! loopback ports in a temporary directory, and stops (or `kill -9`s) them.
//!
//! The binaries are taken from the same target directory as the test executable; `scripts/test.sh` builds
//! them first (`cargo build --release --bins`).

use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

pub mod raw_client;
pub mod s3;

/// `rel` under this crate's directory (`tests/`) as the running test or bench finds it. cargo and nextest set `CARGO_MANIFEST_DIR` in
/// every test process; the compile-time value is stale when a shared target dir reuses a build made in another
/// checkout of the repository (cargo does not rebuild a workspace member for a new absolute path).
pub fn crate_path(rel: &str) -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .join(rel)
}

/// Locates a workspace binary next to the running test executable.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target profile directory");
    let path = dir.join(name);
    assert!(path.exists(), "{} not found: build the binaries first (cargo build --release --bins)", path.display());
    path
}

/// A policy component built by `scripts/build-plugins.sh` (`$AKOSHA_PLUGIN_DIR`, default `<target>/plugins`).
pub fn plugin(name: &str) -> PathBuf {
    let dir = std::env::var_os("AKOSHA_PLUGIN_DIR").map(PathBuf::from).unwrap_or_else(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test> → target/plugins
        exe.ancestors().nth(3).expect("target directory").join("plugins")
    });
    let path = dir.join(format!("{name}.wasm"));
    assert!(path.exists(), "{} not found: run scripts/build-plugins.sh", path.display());
    path
}

/// A free loopback TCP port.
pub fn free_tcp_port() -> u16 {
    free_port(|port| TcpListener::bind(("127.0.0.1", port)).is_ok())
        .unwrap_or_else(|| TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free tcp port").port())
}

/// A free loopback UDP port.
pub fn free_udp_port() -> u16 {
    free_port(|port| UdpSocket::bind(("127.0.0.1", port)).is_ok())
        .unwrap_or_else(|| UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).expect("free udp port").port())
}

/// A port that `is_free` accepts, drawn at random from below the kernel's ephemeral range.
///
/// A port the kernel hands out for `bind(0)` lies in the ephemeral range, which is also where every outgoing
/// connection of every process takes its local port: between our probe and the server's own bind, a client
/// connection (SeaweedFS's components talk to each other while they start) can take it, and the server dies
/// with "address already in use". Below that range only explicit binds compete. `None` when the range
/// cannot be read or leaves no room, and the caller falls back to `bind(0)`.
fn free_port(is_free: impl Fn(u16) -> bool) -> Option<u16> {
    use rand::Rng;
    const LOWEST: u16 = 10_000;
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let ephemeral_start: u16 = range.split_whitespace().next()?.parse().ok()?;
    if ephemeral_start <= LOWEST + 1_000 {
        return None;
    }
    let mut rng = rand::rng();
    (0..200).map(|_| rng.random_range(LOWEST..ephemeral_start)).find(|&port| is_free(port))
}

/// A temporary site: certificates, one aggregator, agents.
pub struct Site {
    /// Root of everything the test writes.
    pub dir: tempfile::TempDir,
    /// Certificates (`ca.pem`, `server.pem`, `agents/<id>.pem`).
    pub certs: PathBuf,
}

impl Site {
    /// Creates the CA and the server certificate with `akosha-aggregator certs init`.
    pub fn new() -> Result<Site> {
        let dir = tempfile::tempdir()?;
        let certs = dir.path().join("certs");
        run_ok(Command::new(binary("akosha-aggregator")).args(["certs", "init", "--dir"]).arg(&certs))?;
        Ok(Site { dir, certs })
    }

    /// Issues an agent certificate with `akosha-aggregator certs issue`.
    pub fn issue(&self, system_id: &str) -> Result<()> {
        run_ok(Command::new(binary("akosha-aggregator")).args(["certs", "issue", system_id, "--dir"]).arg(&self.certs))
    }

    /// A path inside the site.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A Session-Buddy data directory holding copies of the named fixture databases (from
    /// `shared/fixtures/session-buddy/small`), as Session-Buddy leaves them.
    pub fn session_buddy_data(&self, databases: &[&str]) -> Result<PathBuf> {
        let dir = self.path("session-buddy-data");
        std::fs::create_dir_all(&dir)?;
        let fixtures = crate_path("../../shared/fixtures/session-buddy/small");
        for name in databases {
            std::fs::copy(fixtures.join(name), dir.join(name)).with_context(|| format!("copying fixture {name}"))?;
        }
        Ok(dir)
    }
}

fn run_ok(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A process that is killed when dropped.
pub struct Proc {
    name: String,
    binary: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    envs: Vec<(String, String)>,
}

impl Proc {
    fn spawn(
        name: &str,
        binary: PathBuf,
        args: Vec<String>,
        log: PathBuf,
        envs: Vec<(String, String)>,
    ) -> Result<Proc> {
        let mut p = Proc { name: name.into(), binary, args, log, child: None, envs };
        p.start()?;
        Ok(p)
    }

    /// (Re)starts the process, appending to its log.
    pub fn start(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(&self.binary)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    /// Replaces the environment of the next start.
    pub fn set_env(&mut self, envs: Vec<(String, String)>) {
        self.envs = envs;
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait (graceful shutdown).
    pub fn terminate(&mut self, timeout: Duration) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let deadline = Instant::now() + timeout;
            loop {
                if let Some(status) = child.try_wait()? {
                    if !status.success() {
                        bail!("{} exited with {status}; log:\n{}", self.name, self.log_tail());
                    }
                    return Ok(());
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    bail!("{} did not stop within {timeout:?}", self.name);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// The OS process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The last lines of the process log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A real Redis server on a free loopback port, in the site's temp dir, without persistence.
pub struct RedisServer {
    /// The process.
    pub proc: Proc,
    /// Its port.
    pub port: u16,
}

impl RedisServer {
    /// Starts `redis-server` (installed by scripts/setup.sh) and waits until it accepts connections.
    pub async fn start(site: &Site) -> Result<RedisServer> {
        let port = free_tcp_port();
        let dir = site.path("redis");
        std::fs::create_dir_all(&dir)?;
        let proc = Proc::spawn(
            "redis",
            PathBuf::from("redis-server"),
            ["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir"]
                .iter()
                .map(|s| s.to_string())
                .chain([dir.display().to_string()])
                .collect(),
            dir.join("redis.log"),
            vec![],
        )?;
        let server = RedisServer { proc, port };
        server.wait_up().await?;
        Ok(server)
    }

    /// Starts it again after a kill, on the same port.
    pub async fn restart(&mut self) -> Result<()> {
        self.proc.start()?;
        self.wait_up().await
    }

    async fn wait_up(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
            if Instant::now() > deadline {
                bail!("redis-server did not start: {}", self.proc.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

/// A running aggregator process.
pub struct Aggregator {
    /// The process.
    pub proc: Proc,
    /// UDP port of the QUIC endpoint.
    pub quic_port: u16,
    /// Base URL of the HTTP API.
    pub url: String,
}

impl Aggregator {
    /// Writes a config under `site/<name>` and starts the aggregator; waits until `/ready`.
    pub async fn start(site: &Site, name: &str) -> Result<Aggregator> {
        Self::start_with(site, name, "").await
    }

    /// Like [`Aggregator::start`], with extra `quic:` settings (YAML flow-mapping entries, e.g.
    /// `max_sessions: 1`).
    pub async fn start_with(site: &Site, name: &str, quic_extra: &str) -> Result<Aggregator> {
        // Embeddings stay off unless a test asks: loading the model and backfilling every record without a vector
        // would cost each test CPU it does not need.
        Self::start_configured(site, name, quic_extra, "embeddings: {enabled: false}\n").await
    }

    /// Like [`Aggregator::start_with`], with `extra` top-level YAML appended to the configuration (its sections
    /// must not repeat the ones the harness writes: tls, quic, http, hot).
    pub async fn start_configured(site: &Site, name: &str, quic_extra: &str, extra: &str) -> Result<Aggregator> {
        Self::start_full(site, name, quic_extra, extra, vec![]).await
    }

    /// Like [`Aggregator::start_configured`], with environment variables for the process (fault injection).
    pub async fn start_full(
        site: &Site,
        name: &str,
        quic_extra: &str,
        extra: &str,
        envs: Vec<(String, String)>,
    ) -> Result<Aggregator> {
        let quic_port = free_udp_port();
        let http_port = free_tcp_port();
        let data = site.path(name);
        std::fs::create_dir_all(&data)?;
        let config = data.join("aggregator.yaml");
        let certs = site.certs.display();
        std::fs::write(
            &config,
            format!(
                "mode: lite\ndata_dir: {}\ntls: {{ca_cert: {certs}/ca.pem, server_cert: {certs}/server.pem, server_key: {certs}/server.key}}\n\
                 quic: {{listen: 127.0.0.1:{quic_port}, drain_timeout: 3s{sep}{quic_extra}}}\nhttp: {{listen: 127.0.0.1:{http_port}}}\n\
                 hot: {{memory_limit: 1GB, threads: 1}}\n{extra}",
                data.display(),
                sep = if quic_extra.is_empty() { "" } else { ", " },
            ),
        )?;
        let proc = Proc::spawn(
            name,
            binary("akosha-aggregator"),
            vec!["--config".into(), config.display().to_string(), "run".into()],
            data.join("aggregator.log"),
            envs,
        )?;
        let agg = Aggregator { proc, quic_port, url: format!("http://127.0.0.1:{http_port}") };
        agg.wait_ready(Duration::from_secs(60)).await?;
        Ok(agg)
    }

    /// Restarts after a kill and waits until ready.
    pub async fn restart(&mut self) -> Result<()> {
        self.proc.start()?;
        self.wait_ready(Duration::from_secs(60)).await
    }

    /// Waits for `/ready`.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        wait_http(&format!("{}/ready", self.url), timeout).await.with_context(|| self.proc.log_tail())
    }

    /// `GET /v1/stats`.
    pub async fn stats(&self) -> Result<Value> {
        get_json(&format!("{}/v1/stats", self.url)).await
    }

    /// Total records in storage.
    pub async fn total(&self) -> Result<u64> {
        Ok(self.stats().await?["total_records"].as_u64().unwrap_or(0))
    }

    /// Waits until the stored total reaches `expected` (and stays there briefly); returns the final total.
    pub async fn wait_total(&self, expected: u64, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let total = self.total().await.unwrap_or(0);
            if total >= expected {
                // Anything extra would arrive right behind: look once more.
                tokio::time::sleep(Duration::from_millis(300)).await;
                return self.total().await;
            }
            if Instant::now() > deadline {
                bail!("timed out with {total} of {expected} records stored; aggregator log:\n{}", self.proc.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `GET /v1/records/{system}/{kind}/{id}`; `None` on 404.
    pub async fn record(&self, system: &str, kind: &str, id: &str) -> Result<Option<Value>> {
        let response = reqwest::get(format!("{}/v1/records/{system}/{kind}/{id}", self.url)).await?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        Ok(Some(response.error_for_status()?.json().await?))
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> Result<String> {
        Ok(reqwest::get(format!("{}/metrics", self.url)).await?.text().await?)
    }
}

/// Agent settings a test may change.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Buffer limit.
    pub buffer_max: String,
    /// `block` or `drop_oldest`.
    pub when_full: String,
    /// Extra YAML appended to the destination block.
    pub destination_extra: String,
    /// A top-level `sources:` block (YAML flow mapping), e.g. `{session_buddy: {snapshots: true}}`.
    pub sources: String,
    /// More destinations: YAML block entries indented by two spaces, appended under `destinations:`.
    pub more_destinations: String,
    /// Top-level YAML appended to the config (e.g. `policies:` and `routing:`).
    pub extra_config: String,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            buffer_max: "256MiB".into(),
            when_full: "block".into(),
            destination_extra: String::new(),
            sources: "{}".into(),
            more_destinations: String::new(),
            extra_config: String::new(),
        }
    }
}

/// A running agent process.
pub struct Agent {
    /// The process.
    pub proc: Proc,
    /// Base URL of the ingest API.
    pub url: String,
    /// The agent's system id.
    pub system_id: String,
}

impl Agent {
    /// Writes a config under `site/<name>` and starts the agent against `quic_port`; waits for `/health`.
    pub async fn start(
        site: &Site,
        name: &str,
        system_id: &str,
        quic_port: u16,
        options: &AgentOptions,
    ) -> Result<Agent> {
        site.issue(system_id)?;
        let port = free_tcp_port();
        let data = site.path(name);
        std::fs::create_dir_all(&data)?;
        let config = data.join("agent.yaml");
        let certs = site.certs.display();
        std::fs::write(
            &config,
            format!(
                "system_id: {system_id}\ndata_dir: {data}\ningest: {{listen: 127.0.0.1:{port}, full_wait: 0s}}\n\
                 buffer: {{max_bytes: {max}, when_full: {when_full}}}\nsources: {sources}\n\
                 destinations:\n  primary:\n    address: 127.0.0.1:{quic_port}\n    ca: {certs}/ca.pem\n    \
                 cert: {certs}/agents/{system_id}.pem\n    key: {certs}/agents/{system_id}.key\n    \
                 backoff_initial: 50ms\n    backoff_max: 500ms\n    drain_timeout: 3s\n{extra}{more}\n{top}\n",
                data = data.display(),
                max = options.buffer_max,
                when_full = options.when_full,
                extra = options.destination_extra,
                more = options.more_destinations,
                top = options.extra_config,
                sources = options.sources,
            ),
        )?;
        let proc = Proc::spawn(
            name,
            binary("akosha-agent"),
            vec!["--config".into(), config.display().to_string(), "run".into()],
            data.join("agent.log"),
            vec![],
        )?;
        let agent = Agent { proc, url: format!("http://127.0.0.1:{port}"), system_id: system_id.into() };
        agent.wait_healthy().await?;
        Ok(agent)
    }

    /// Restarts after a kill and waits for `/health`.
    pub async fn restart(&mut self) -> Result<()> {
        self.proc.start()?;
        self.wait_healthy().await
    }

    async fn wait_healthy(&self) -> Result<()> {
        wait_http(&format!("{}/health", self.url), Duration::from_secs(30)).await.with_context(|| self.proc.log_tail())
    }

    /// Posts NDJSON; returns the status code and the JSON body.
    pub async fn post(&self, body: String) -> Result<(u16, Value, Option<String>)> {
        let response = http_client().post(format!("{}/v1/records", self.url)).body(body).send().await?;
        let status = response.status().as_u16();
        let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(String::from);
        let body = response.json().await.unwrap_or(Value::Null);
        Ok((status, body, retry_after))
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> Result<Value> {
        get_json(&format!("{}/v1/status", self.url)).await
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> Result<String> {
        Ok(http_client().get(format!("{}/metrics", self.url)).send().await?.error_for_status()?.text().await?)
    }
}

/// Every file under `dir` with its bytes (to search what a process stored, byte-wise).
pub fn read_tree(dir: &Path) -> Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                files.push((path, bytes));
            }
        }
    }
    Ok(files)
}

/// The files among `files` whose bytes contain `needle`.
pub fn containing<'a>(files: &'a [(PathBuf, Vec<u8>)], needle: &str) -> Vec<&'a Path> {
    let needle = needle.as_bytes();
    files
        .iter()
        .filter(|(_, bytes)| bytes.windows(needle.len()).any(|w| w == needle))
        .map(|(p, _)| p.as_path())
        .collect()
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("http client")
}

async fn get_json(url: &str) -> Result<Value> {
    Ok(http_client().get(url).send().await?.error_for_status()?.json().await?)
}

async fn wait_http(url: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(response) = http_client().get(url).send().await
            && response.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{url} did not answer within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// NDJSON for records `ids` of `kind`, each with a ~1 KB text and, every other one, a 384-float embedding.
pub fn ndjson(ids: impl IntoIterator<Item = u64>, kind: &str) -> String {
    let mut out = String::new();
    for i in ids {
        let text = format!("memory {i}: ").repeat(80);
        let embedding = if i % 2 == 0 {
            let values: Vec<String> =
                (0..384).map(|d| format!("{}", ((i as f32) * 0.001 + d as f32 * 0.0001).sin())).collect();
            format!(",\"embedding\":[{}]", values.join(","))
        } else {
            String::new()
        };
        out.push_str(&format!(
            "{{\"id\":\"r{i}\",\"kind\":\"{kind}\",\"ts\":{},\"project\":\"p{}\",\"text\":\"{text}\",\"tags\":[\"t{}\"]{embedding}}}\n",
            1_700_000_000_000_000i64 + i as i64,
            i % 7,
            i % 3
        ));
    }
    out
}

/// xorshift64: deterministic, seedable, fast — benches and tests generate their data with it.
#[derive(Debug, Clone)]
pub struct Xorshift(pub u64);

impl Xorshift {
    /// The next 64 random bits.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A deterministic unit vector for `seed`: uniform noise in `[-0.5, 0.5)` per dimension plus `weight` on the
/// dimensions `in_cluster` selects, normalised — records sharing a cluster are each other's neighbours, and no two
/// seeds give the same vector (so rankings have no ties).
pub fn clustered_vector(seed: u64, dims: usize, in_cluster: impl Fn(usize) -> bool, weight: f32) -> Vec<f32> {
    let mut rng = Xorshift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let v: Vec<f32> = (0..dims)
        .map(|d| (rng.next() % 1000) as f32 / 1000.0 - 0.5 + if in_cluster(d) { weight } else { 0.0 })
        .collect();
    let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt();
    v.into_iter().map(|a| a / norm).collect()
}

/// CPU time (user + system) this process has used so far, in seconds: for benchmarks that report how busy they kept the cores.
pub fn process_cpu_seconds() -> f64 {
    cpu_seconds_of("self")
}

/// CPU time (user + system) another process has used so far, in seconds (0 when it is gone).
pub fn pid_cpu_seconds(pid: u32) -> f64 {
    cpu_seconds_of(&pid.to_string())
}

fn cpu_seconds_of(process: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{process}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th of them.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks: f64 = fields.get(11..13).map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum()).unwrap_or(0.0);
    // /proc reports clock ticks in USER_HZ, which the Linux ABI fixes at 100 per second.
    ticks / 100.0
}

/// A Session-Buddy-shaped record: ~1 KB of varied English-like text and a 384-float embedding of pseudo-random
/// values (real embeddings are close to incompressible; a smooth function of `i` would flatter every codec).
pub fn bench_record(i: usize) -> akosha_protocol::Record {
    const WORDS: &[&str] = &[
        "the",
        "agent",
        "buffer",
        "memory",
        "aggregator",
        "query",
        "vector",
        "index",
        "session",
        "reflection",
        "tokio",
        "duckdb",
        "parquet",
        "quic",
        "latency",
        "throughput",
        "record",
        "schema",
        "project",
        "claude",
        "refactor",
        "test",
        "deploy",
        "cache",
        "redis",
        "embedding",
        "search",
        "graph",
        "entity",
        "relation",
    ];
    let mut state = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut text = String::with_capacity(1100);
    while text.len() < 1024 {
        text.push_str(WORDS[(next() % WORDS.len() as u64) as usize]);
        text.push(if next() % 9 == 0 { '.' } else { ' ' });
    }
    let embedding = (0..384).map(|_| ((next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.3).collect();
    akosha_protocol::Record {
        system_id: "bench-host".into(),
        id: format!("r{i}"),
        ts: 1_700_000_000_000_000 + i as i64,
        project: Some("akosha".into()),
        text: Some(text),
        embedding: Some(embedding),
        tags: vec!["bench".into()],
        ..akosha_protocol::Record::default()
    }
}
