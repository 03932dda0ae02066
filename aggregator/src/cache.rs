//! Query-result and lookup cache: Redis in standard/production (shared by every aggregator replica), an
//! in-process LRU-ish map in lite.
//!
//! Invalidation is by generation: every system has a counter, and so has "any system"; a cached answer's key
//! includes the counters of the systems the request covers (or the global one when it covers all). A write to
//! a system (applied to the hot tier, or made searchable by the indexer) bumps that system's counter and the
//! global one, so every affected answer is missed from then on and expires by TTL; nothing has to be found and
//! deleted.
//!
//! Redis is an optimisation, never a dependency: every Redis call has a short deadline, and after
//! [`FAILURES_TO_OPEN`] consecutive failures the breaker opens and the cache is bypassed for [`OPEN_FOR`]
//! (counted, logged once); then one probe decides whether it closes again. A failed query because of the
//! cache is a bug.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use akosha_protocol::exposition::Counter;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

/// Consecutive Redis failures that open the breaker.
pub const FAILURES_TO_OPEN: u32 = 3;
/// How long an open breaker bypasses Redis before probing it again.
pub const OPEN_FOR: Duration = Duration::from_secs(5);
/// Deadline of one Redis call.
const CALL_DEADLINE: Duration = Duration::from_millis(100);
/// Largest answer worth caching.
pub const MAX_ENTRY_BYTES: usize = 4 << 20;

/// Cache settings.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Off entirely.
    pub enabled: bool,
    /// `redis://…`; none: in-process.
    pub redis_url: Option<String>,
    /// Key prefix, so several deployments can share one Redis.
    pub namespace: String,
    /// How long an answer lives.
    pub ttl: Duration,
    /// In-process entries kept.
    pub max_entries: usize,
}

/// Cache counters.
#[derive(Debug, Default)]
pub struct CacheMetrics {
    /// Answers served from the cache.
    pub hits: Counter,
    /// Lookups that found nothing.
    pub misses: Counter,
    /// Lookups and stores skipped because Redis was failing.
    pub bypassed: Counter,
    /// Redis calls that failed or timed out.
    pub errors: Counter,
    /// Times the breaker opened.
    pub breaker_opened: Counter,
}

/// What a lookup found.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The cached answer.
    Hit(Vec<u8>),
    /// Nothing cached; store the answer under this key.
    Miss(String),
    /// The cache is off or bypassed.
    Bypass,
}

struct Local {
    entries: HashMap<String, (Instant, Vec<u8>)>,
    generations: HashMap<String, u64>,
}

struct Breaker {
    consecutive: u32,
    open_until: Option<Instant>,
}

/// The cache.
pub struct Cache {
    config: CacheConfig,
    backend: Backend,
    /// Counters.
    pub metrics: CacheMetrics,
    breaker: Mutex<Breaker>,
    /// 1 while the breaker is open (for the gauge).
    open: AtomicU64,
}

enum Backend {
    Off,
    Local(Mutex<Local>),
    Redis { client: redis::Client, connection: tokio::sync::Mutex<Option<redis::aio::ConnectionManager>> },
}

const GLOBAL: &str = "*";

impl Cache {
    /// A cache for `config` (no connection is made yet: Redis being down at start is only a bypass).
    pub fn new(config: CacheConfig) -> Result<Cache, String> {
        let backend = match (&config.redis_url, config.enabled) {
            (_, false) => Backend::Off,
            (None, true) => Backend::Local(Mutex::new(Local { entries: HashMap::new(), generations: HashMap::new() })),
            (Some(url), true) => Backend::Redis {
                client: redis::Client::open(url.as_str()).map_err(|e| format!("`{url}`: {e}"))?,
                connection: tokio::sync::Mutex::new(None),
            },
        };
        Ok(Cache {
            config,
            backend,
            metrics: CacheMetrics::default(),
            breaker: Mutex::new(Breaker { consecutive: 0, open_until: None }),
            open: AtomicU64::new(0),
        })
    }

    /// `off`, `local` or `redis`.
    pub fn kind(&self) -> &'static str {
        match self.backend {
            Backend::Off => "off",
            Backend::Local(_) => "local",
            Backend::Redis { .. } => "redis",
        }
    }

    /// Whether the breaker currently bypasses Redis.
    pub fn breaker_open(&self) -> bool {
        self.open.load(Ordering::Relaxed) == 1
    }

    fn generation_key(&self, system: &str) -> String {
        format!("{}:gen:{system}", self.config.namespace)
    }

    /// Looks up the answer to `request` (any bytes identifying it) covering `systems` (empty: all).
    pub async fn lookup(&self, systems: &[String], request: &[u8]) -> Lookup {
        let scopes: Vec<&str> =
            if systems.is_empty() { vec![GLOBAL] } else { systems.iter().map(String::as_str).collect() };
        match &self.backend {
            Backend::Off => Lookup::Bypass,
            Backend::Local(local) => {
                let local = local.lock().unwrap_or_else(|p| p.into_inner());
                let generations: Vec<u64> =
                    scopes.iter().map(|s| local.generations.get(*s).copied().unwrap_or(0)).collect();
                let key = self.entry_key(&scopes, &generations, request);
                match local.entries.get(&key) {
                    Some((expires, value)) if *expires > Instant::now() => {
                        self.metrics.hits.inc();
                        Lookup::Hit(value.clone())
                    }
                    _ => {
                        self.metrics.misses.inc();
                        Lookup::Miss(key)
                    }
                }
            }
            Backend::Redis { .. } => {
                let generation_keys: Vec<String> = scopes.iter().map(|s| self.generation_key(s)).collect();
                let generations = self
                    .redis(|mut c| async move {
                        redis::cmd("MGET").arg(&generation_keys).query_async::<Vec<Option<u64>>>(&mut c).await
                    })
                    .await;
                let Some(generations) = generations else { return Lookup::Bypass };
                let generations: Vec<u64> = generations.into_iter().map(Option::unwrap_or_default).collect();
                let key = self.entry_key(&scopes, &generations, request);
                let lookup_key = key.clone();
                match self
                    .redis(|mut c| async move {
                        redis::cmd("GET").arg(&lookup_key).query_async::<Option<Vec<u8>>>(&mut c).await
                    })
                    .await
                {
                    Some(Some(value)) => {
                        self.metrics.hits.inc();
                        Lookup::Hit(value)
                    }
                    Some(None) => {
                        self.metrics.misses.inc();
                        Lookup::Miss(key)
                    }
                    None => Lookup::Bypass,
                }
            }
        }
    }

    /// Stores an answer under the key a [`Lookup::Miss`] gave.
    pub async fn store(&self, key: String, value: Vec<u8>) {
        if value.len() > MAX_ENTRY_BYTES {
            return;
        }
        match &self.backend {
            Backend::Off => {}
            Backend::Local(local) => {
                let mut local = local.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                if local.entries.len() >= self.config.max_entries {
                    local.entries.retain(|_, (expires, _)| *expires > now);
                    // Still full of live entries: drop an arbitrary half rather than track recency on every hit.
                    if local.entries.len() >= self.config.max_entries {
                        let keep = self.config.max_entries / 2;
                        let doomed: Vec<String> = local.entries.keys().skip(keep).cloned().collect();
                        for k in doomed {
                            local.entries.remove(&k);
                        }
                    }
                }
                local.entries.insert(key, (now + self.config.ttl, value));
            }
            Backend::Redis { .. } => {
                let ttl = self.config.ttl.as_secs().max(1);
                self.redis(|mut c| async move {
                    redis::cmd("SET").arg(&key).arg(value).arg("EX").arg(ttl).query_async::<()>(&mut c).await
                })
                .await;
            }
        }
    }

    /// Invalidates at once when that needs no I/O (in-process cache, or off); false when [`Cache::invalidate`]
    /// must be awaited (Redis). The hot tier calls this from its threads, so that a query issued after a write is
    /// visible can never be answered from before it.
    pub fn invalidate_now(&self, systems: &[String]) -> bool {
        match &self.backend {
            Backend::Off => true,
            Backend::Local(_) => {
                futures_util::FutureExt::now_or_never(self.invalidate(systems));
                true
            }
            Backend::Redis { .. } => false,
        }
    }

    /// Marks every cached answer covering `systems` (and every all-systems answer) stale.
    pub async fn invalidate(&self, systems: &[String]) {
        if systems.is_empty() {
            return;
        }
        match &self.backend {
            Backend::Off => {}
            Backend::Local(local) => {
                let mut local = local.lock().unwrap_or_else(|p| p.into_inner());
                for s in systems.iter().map(String::as_str).chain([GLOBAL]) {
                    *local.generations.entry(s.to_owned()).or_default() += 1;
                }
            }
            Backend::Redis { .. } => {
                let keys: Vec<String> =
                    systems.iter().map(String::as_str).chain([GLOBAL]).map(|s| self.generation_key(s)).collect();
                self.redis(|mut c| async move {
                    let mut pipe = redis::pipe();
                    for k in &keys {
                        pipe.cmd("INCR").arg(k).ignore();
                    }
                    pipe.query_async::<()>(&mut c).await
                })
                .await;
            }
        }
    }

    fn entry_key(&self, scopes: &[&str], generations: &[u64], request: &[u8]) -> String {
        let mut hash = Sha256::new();
        for (scope, generation) in scopes.iter().zip(generations) {
            hash.update(scope.as_bytes());
            hash.update([0]);
            hash.update(generation.to_le_bytes());
        }
        hash.update(request);
        let digest: String = hash.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect();
        format!("{}:q:{digest}", self.config.namespace)
    }

    /// Runs one Redis call behind the breaker; `None` when bypassed or failed.
    async fn redis<T, F, Fut>(&self, call: F) -> Option<T>
    where
        F: FnOnce(redis::aio::ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let Backend::Redis { client, connection } = &self.backend else { return None };
        {
            let mut breaker = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(until) = breaker.open_until {
                if Instant::now() < until {
                    self.metrics.bypassed.inc();
                    return None;
                }
                // Half-open: this call is the probe; until it succeeds, a failure reopens at once.
                breaker.open_until = None;
                breaker.consecutive = FAILURES_TO_OPEN - 1;
            }
        }
        let conn = {
            let mut slot = connection.lock().await;
            if slot.is_none() {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CALL_DEADLINE))
                    .set_response_timeout(Some(CALL_DEADLINE))
                    .set_number_of_retries(1);
                match tokio::time::timeout(CALL_DEADLINE * 2, client.get_connection_manager_with_config(config)).await {
                    Ok(Ok(c)) => *slot = Some(c),
                    Ok(Err(e)) => {
                        self.failed(&e.to_string());
                        return None;
                    }
                    Err(_) => {
                        self.failed("connecting timed out");
                        return None;
                    }
                }
            }
            slot.clone()?
        };
        match tokio::time::timeout(CALL_DEADLINE, call(conn)).await {
            Ok(Ok(value)) => {
                let mut breaker = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
                if breaker.consecutive >= FAILURES_TO_OPEN - 1 && self.open.swap(0, Ordering::Relaxed) == 1 {
                    info!(message = "Redis answers again; cache back on.");
                }
                breaker.consecutive = 0;
                Some(value)
            }
            Ok(Err(e)) => {
                self.failed(&e.to_string());
                None
            }
            Err(_) => {
                self.failed("call timed out");
                None
            }
        }
    }

    fn failed(&self, error: &str) {
        self.metrics.errors.inc();
        self.metrics.bypassed.inc();
        let mut breaker = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        breaker.consecutive += 1;
        if breaker.consecutive >= FAILURES_TO_OPEN && breaker.open_until.is_none() {
            breaker.open_until = Some(Instant::now() + OPEN_FOR);
            self.metrics.breaker_opened.inc();
            if self.open.swap(1, Ordering::Relaxed) == 0 {
                warn!(message = "Redis is failing; bypassing the cache.", error = %error, retry_in_s = OPEN_FOR.as_secs());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(ttl: Duration, max_entries: usize) -> Cache {
        Cache::new(CacheConfig { enabled: true, redis_url: None, namespace: "t".into(), ttl, max_entries }).unwrap()
    }

    #[tokio::test]
    async fn local_answers_until_a_covered_system_changes() {
        let cache = local(Duration::from_secs(60), 100);
        let a = vec!["a".to_string()];
        let Lookup::Miss(key) = cache.lookup(&a, b"q1").await else { panic!("first lookup misses") };
        cache.store(key, b"answer".to_vec()).await;
        assert_eq!(cache.lookup(&a, b"q1").await, Lookup::Hit(b"answer".to_vec()));
        assert!(matches!(cache.lookup(&a, b"q2").await, Lookup::Miss(_)), "another request");
        let Lookup::Miss(all) = cache.lookup(&[], b"q1").await else { panic!() };
        cache.store(all, b"everyone".to_vec()).await;
        // A write to b leaves a's answers alone but not the all-systems ones.
        cache.invalidate(&["b".to_string()]).await;
        assert_eq!(cache.lookup(&a, b"q1").await, Lookup::Hit(b"answer".to_vec()));
        assert!(matches!(cache.lookup(&[], b"q1").await, Lookup::Miss(_)));
        cache.invalidate(&a).await;
        assert!(matches!(cache.lookup(&a, b"q1").await, Lookup::Miss(_)));
        assert_eq!((cache.metrics.hits.get(), cache.metrics.misses.get()), (2, 5));
    }

    #[tokio::test]
    async fn local_entries_expire_and_stay_bounded() {
        let cache = local(Duration::from_millis(20), 10);
        for i in 0..50 {
            if let Lookup::Miss(key) = cache.lookup(&[], format!("q{i}").as_bytes()).await {
                cache.store(key, vec![0; 8]).await;
            }
        }
        if let Backend::Local(l) = &cache.backend {
            assert!(l.lock().unwrap().entries.len() <= 10);
        }
        let Lookup::Miss(key) = cache.lookup(&[], b"x").await else { panic!() };
        cache.store(key, b"v".to_vec()).await;
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(matches!(cache.lookup(&[], b"x").await, Lookup::Miss(_)));
    }

    #[tokio::test]
    async fn unreachable_redis_is_a_bypass_behind_a_breaker() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let cache = Cache::new(CacheConfig {
            enabled: true,
            redis_url: Some(format!("redis://127.0.0.1:{port}")),
            namespace: "t".into(),
            ttl: Duration::from_secs(60),
            max_entries: 10,
        })
        .unwrap();
        for _ in 0..10 {
            assert_eq!(cache.lookup(&[], b"q").await, Lookup::Bypass);
        }
        assert!(cache.breaker_open());
        assert_eq!(cache.metrics.breaker_opened.get(), 1);
        assert_eq!(cache.metrics.errors.get(), u64::from(FAILURES_TO_OPEN), "no calls while open");
        assert!(cache.metrics.bypassed.get() >= 10);
    }
}
