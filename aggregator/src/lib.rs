//! The akosha aggregator: receives batches from agents over QUIC with mutual TLS, makes them durable in a
//! write-ahead log before acknowledging them, keeps them queryable in a tiered store, and answers queries over
//! HTTP.
//!
//! [`Aggregator::run`] takes already bound sockets and a shutdown future, so tests start a real aggregator
//! in-process on port 0; `main` only parses arguments.

pub mod auth;
pub mod backup;
pub mod cache;
pub mod certs;
pub mod cold;
pub mod config;
pub mod embed;
pub mod envelope;
pub mod erasure;
pub mod graph;
pub mod hot;
pub mod http;
pub mod import;
pub mod lifecycle;
pub mod listing;
pub mod mcp;
pub mod metrics;
pub mod objects;
pub mod query;
pub mod receiver;
pub mod rollup;
pub mod search;
pub mod storage;
pub mod timeseries;
pub mod wal;
pub mod warm;

/// `rel` under this crate's directory as the running test finds it. cargo and nextest set `CARGO_MANIFEST_DIR` in
/// every test process; the compile-time value is stale when a shared target dir reuses a build made in another
/// checkout of the repository (cargo does not rebuild a workspace member for a new absolute path).
#[cfg(test)]
pub(crate) fn crate_path(rel: &str) -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")), std::path::PathBuf::from)
        .join(rel)
}

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::AggregatorConfig;
use crate::hot::HotTier;
use crate::metrics::ReceiverMetrics;
use crate::receiver::Receiver;
use crate::wal::Wal;

/// Why the aggregator could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// TLS material is missing or invalid.
    #[error("TLS setup failed (run `akosha-aggregator certs init` first?): {0}")]
    Certs(#[from] certs::CertError),
    /// The write-ahead log cannot be opened.
    #[error(transparent)]
    Wal(#[from] wal::WalError),
    /// The hot tier cannot be created.
    #[error(transparent)]
    Hot(#[from] hot::HotError),
    /// A socket or thread failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

/// A running aggregator's shared state.
pub struct Aggregator {
    /// The receive path (log, hot tier, counters), set once the log has been replayed.
    receiver: std::sync::OnceLock<Arc<Receiver>>,
    /// The in-process embedding model, set (or not) with the receiver.
    embedder: std::sync::OnceLock<Option<Arc<embed::Embedder>>>,
    /// Bearer tokens.
    pub auth: auth::Auth,
    /// Largest HTTP request body.
    pub max_body_bytes: usize,
    /// Query-result cache.
    pub cache: Arc<cache::Cache>,
    /// Disk thresholds and prices.
    pub storage: storage::StorageConfig,
    /// Deletions and other operations worth proving later.
    pub audit: Arc<erasure::AuditLog>,
    /// The latest backup started through the API.
    pub backup: std::sync::Mutex<Option<Arc<backup::BackupJob>>>,
    /// Where backups stage their local copies.
    pub backup_staging: std::path::PathBuf,
    /// Key-encryption keys for backups (and, through the cold tier's own copy, cold objects).
    pub encryption: Option<Arc<envelope::Keyring>>,
}

impl Aggregator {
    /// The receive path, once the log has been replayed.
    pub fn receiver(&self) -> Option<&Arc<Receiver>> {
        self.receiver.get()
    }

    /// Where embeddings come from, once the log has been replayed (`None`: embeddings are off).
    pub fn embedder(&self) -> Option<&Arc<embed::Embedder>> {
        self.embedder.get()?.as_ref()
    }

    /// The query service, once the log has been replayed.
    pub fn query(&self) -> Option<query::QueryService> {
        let receiver = self.receiver.get()?;
        Some(query::QueryService::new(receiver.hot.clone(), self.embedder.get().cloned().flatten()))
    }

    /// Replays the log into the hot tier, then serves QUIC on `udp` and HTTP on `http` until `shutdown`
    /// resolves; then drains sessions and stops.
    pub async fn run(
        config: AggregatorConfig,
        udp: std::net::UdpSocket,
        http: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), RunError> {
        let transport = Receiver::transport_config(&config.quic);
        let server_config = certs::server_config(&config.ca_cert, &config.server_cert, &config.server_key, transport)?;

        // HTTP first, so that `/health` answers (and `/ready` says 503) while a long log is replayed.
        let aggregator =
            Arc::new(Aggregator {
                receiver: std::sync::OnceLock::new(),
                embedder: std::sync::OnceLock::new(),
                auth: auth::Auth::new(&config.auth),
                max_body_bytes: config.http_max_body_bytes,
                storage: config.storage.clone(),
                audit: Arc::new(erasure::AuditLog::open(&config.data_dir.join("audit")).map_err(|e| RunError::Io {
                    context: "cannot open the audit log",
                    source: std::io::Error::other(e.to_string()),
                })?),
                backup: std::sync::Mutex::new(None),
                backup_staging: config.data_dir.join("backup-staging"),
                encryption: config.encryption.clone(),
                cache: Arc::new(cache::Cache::new(config.cache.clone()).map_err(|e| RunError::Io {
                    context: "invalid cache.redis_url",
                    source: std::io::Error::other(e),
                })?),
            });
        if config.mode != config::Mode::Lite && config.cache.enabled && config.cache.redis_url.is_none() {
            warn!(message = "No cache.redis_url: caching in-process only (replicas will not share it).");
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut http_stop = stop_rx.clone();
        let http_addr = http.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let router = http::router(aggregator.clone());
        let http_task = tokio::spawn(async move {
            axum::serve(http, router)
                .with_graceful_shutdown(async move {
                    let _ = http_stop.wait_for(|stop| *stop).await;
                })
                .await
        });

        let replay_config = config.clone();
        let mut shutdown = std::pin::pin!(shutdown);
        let replayed = tokio::select! {
            replayed = tokio::task::spawn_blocking(move || replay(&replay_config)) => replayed,
            () = &mut shutdown => {
                // Nothing was accepted yet, so there is nothing to drain; the log is untouched by a partial replay.
                info!(message = "Shutdown requested during log replay; stopping.");
                let _ = stop_tx.send(true);
                let _ = http_task.await;
                return Ok(());
            }
        };
        let (wal, hot, durable_rx, embedder) = match replayed {
            Ok(Ok(parts)) => parts,
            Ok(Err(e)) => {
                let _ = stop_tx.send(true);
                return Err(e);
            }
            Err(e) => {
                let _ = stop_tx.send(true);
                return Err(RunError::Io {
                    context: "log replay panicked",
                    source: std::io::Error::other(e.to_string()),
                });
            }
        };
        // Writes and index commits make cached answers about those systems stale.
        let (changed_tx, mut changed_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<String>>();
        let cache = aggregator.cache.clone();
        hot.on_change(Box::new(move |systems| {
            if !cache.invalidate_now(&systems) {
                let _ = changed_tx.send(systems);
            }
        }));
        let cache = aggregator.cache.clone();
        tokio::spawn(async move {
            while let Some(mut systems) = changed_rx.recv().await {
                while let Ok(more) = changed_rx.try_recv() {
                    systems.extend(more);
                }
                systems.sort();
                systems.dedup();
                cache.invalidate(&systems).await;
            }
        });
        hot.spawn_writer(durable_rx)
            .map_err(|source| RunError::Io { context: "cannot start the hot-tier writer", source })?;
        // Deletions a crash interrupted are finished before anyone can read what they delete.
        let (resume_hot, audit) = (hot.clone(), aggregator.audit.clone());
        match tokio::task::spawn_blocking(move || erasure::resume(&resume_hot, &audit)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                warn!(message = "Cannot finish an interrupted deletion yet; the next start retries.", error = %e)
            }
            Err(e) => warn!(message = "Finishing interrupted deletions panicked.", error = %e),
        }

        let metrics = Arc::new(ReceiverMetrics::default());
        let receiver = Arc::new(Receiver::new(config.quic.clone(), wal, hot, metrics));
        let _ = aggregator.embedder.set(embedder);
        let _ = aggregator.receiver.set(receiver.clone());

        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config),
            udp,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| RunError::Io { context: "cannot start the QUIC endpoint", source })?;
        info!(
            message = "Aggregator started.",
            quic = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            http = %http_addr,
        );
        let quic_task = tokio::spawn(receiver.clone().serve(endpoint, stop_rx.clone()));
        if let Some(warm) = receiver.hot.warm().cloned() {
            let hot = receiver.hot.clone();
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(warm.config.move_interval);
                every.tick().await;
                loop {
                    tokio::select! {
                        _ = every.tick() => {}
                        _ = stop.wait_for(|s| *s) => break,
                    }
                    let now = jiff::Timestamp::now().as_microsecond();
                    if warm.config.schedule.is_some_and(|s| !s.contains(now)) {
                        continue;
                    }
                    let hot = hot.clone();
                    let windows = warm.config.hot_windows();
                    // Failures are counted and logged by the warm tier; the next round retries.
                    let _ = tokio::task::spawn_blocking(move || {
                        if let Err(e) = hot.keep_read_groups_hot(|k| windows.cutoff(k, now)) {
                            warn!(message = "Cannot keep read-often groups hot; they move by age.", error = %e);
                        }
                        hot.move_to_warm_by(|k| windows.cutoff(k, now))
                    })
                    .await;
                }
            });
        }
        if let Some(cold) = receiver.hot.cold().cloned() {
            let hot = receiver.hot.clone();
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(cold.config.move_interval);
                // After a key rotation, old data keys are re-wrapped at once: the old key can go sooner.
                let rewrap = cold.clone();
                let _ = tokio::task::spawn_blocking(move || rewrap.rewrap_keys()).await;
                // The first round waits one interval, like the warm one: start-up is busy enough.
                every.tick().await;
                loop {
                    tokio::select! {
                        _ = every.tick() => {}
                        _ = stop.wait_for(|s| *s) => break,
                    }
                    let now = jiff::Timestamp::now().as_microsecond();
                    if cold.config.schedule.is_some_and(|s| !s.contains(now)) {
                        continue;
                    }
                    let hot = hot.clone();
                    let cold = cold.clone();
                    let windows = cold.config.warm_windows();
                    // Failures are counted and logged by the cold tier; the next round retries.
                    let _ = tokio::task::spawn_blocking(move || {
                        // Promotion first: a group read often enough is not demoted in the same round.
                        let _ = hot.promote_from_cold();
                        if let Err(e) = hot.promote_to_hot() {
                            warn!(message = "Promotion to hot failed; the next round retries.", error = %e);
                        }
                        if hot.move_to_cold_by(|k| windows.cutoff(k, now)).is_ok() {
                            let _ = cold.compact();
                        }
                        if let Err(e) = cold.backfill_rollups(64) {
                            warn!(message = "Cannot compute hourly rollups of old cold days yet.", error = %e);
                        }
                        if let Err(e) = cold.rewrap_keys() {
                            warn!(message = "Cannot re-wrap cold data keys with the active key.", error = %e);
                        }
                    })
                    .await;
                }
            });
        }
        shutdown.await;
        info!(message = "Shutting down: draining agent sessions.");
        let _ = stop_tx.send(true);
        let _ = quic_task.await;
        match http_task.await {
            Ok(Err(source)) => return Err(RunError::Io { context: "HTTP server failed", source }),
            Err(e) => warn!(message = "HTTP task ended abnormally.", error = %e),
            Ok(Ok(())) => {}
        }
        info!(message = "Aggregator stopped.");
        Ok(())
    }
}

/// Loads the embedding model (or connects the remote endpoint), if enabled; a model that cannot be loaded
/// leaves embeddings off (queries that need one say so) rather than the aggregator down.
fn load_embedder(config: &config::EmbeddingsConfig) -> Option<Arc<embed::Embedder>> {
    if !config.enabled {
        return None;
    }
    if let Some(remote) = &config.remote {
        let endpoint = remote.endpoint.to_string();
        // Called from the replay's blocking thread, inside the runtime.
        let runtime = match tokio::runtime::Handle::try_current() {
            Ok(runtime) => runtime,
            Err(e) => {
                warn!(message = "Embeddings are off: no runtime for the remote endpoint.", error = %e);
                return None;
            }
        };
        return match embed::Embedder::remote(remote.clone(), runtime) {
            Ok(embedder) => {
                info!(message = "Embeddings come from a remote endpoint.", endpoint = %endpoint, model = %remote.model);
                Some(Arc::new(embedder))
            }
            Err(e) => {
                warn!(message = "Embeddings are off: the remote endpoint cannot be used.", error = %e);
                None
            }
        };
    }
    let started = std::time::Instant::now();
    match embed::Embedder::load(&config.model_dir, config.max_tokens) {
        Ok(embedder) => {
            info!(
                message = "Embedding model loaded.",
                model_dir = %config.model_dir.display(),
                ms = started.elapsed().as_millis() as u64,
            );
            Some(Arc::new(embedder))
        }
        Err(e) => {
            warn!(
                message = "Embeddings are off: the model cannot be loaded (run scripts/setup.sh, or set embeddings.model_dir).",
                error = %e,
            );
            None
        }
    }
}

type Replayed = (Wal, Arc<HotTier>, std::sync::mpsc::Receiver<wal::DurableBatch>, Option<Arc<embed::Embedder>>);

/// Opens the hot tier and replays the write-ahead log into it (blocking).
fn replay(config: &AggregatorConfig) -> Result<Replayed, RunError> {
    let hot = Arc::new(HotTier::open(
        &config.hot_memory_limit,
        config.hot_threads,
        Some(&config.data_dir.join("hot-spill")),
    )?);
    // Before the replay, so that replayed records without vectors are embedded too.
    let embedder = load_embedder(&config.embeddings);
    if let Some(embedder) = &embedder {
        hot.start_backfill(embedder.clone(), config.embeddings.backfill_queue)?;
    }
    let (durable_tx, durable_rx) = std::sync::mpsc::sync_channel(1024);
    let mut replay_batch = Vec::new();
    let mut replay_error = None;
    // Records that completed hot→warm moves made durable in warm stay out of hot.
    let marks = if config.warm.enabled { Wal::warm_marks(&config.wal.dir)? } else { Vec::new() };
    let mut already_warm = 0u64;
    // Records that deletions removed stay out too (see `erasure`).
    let deletions = erasure::AuditLog::deletions_in(&config.data_dir.join("audit/audit.jsonl")).map_err(|e| {
        RunError::Io { context: "cannot read the audit log", source: std::io::Error::other(e.to_string()) }
    })?;
    let mut erased = 0u64;
    let (wal, report) = Wal::open(
        config.wal.clone(),
        |position, entry| {
            let newest = match entry.records() {
                Ok(records) => {
                    let newest = records.iter().map(|r| r.ts).max();
                    let before = records.len();
                    let kept: Vec<_> =
                        records.into_iter().filter(|r| !wal::WarmMark::covered(&marks, position, r.ts)).collect();
                    already_warm += (before - kept.len()) as u64;
                    let before = kept.len();
                    let kept: Vec<_> = kept.into_iter().filter(|r| !erasure::erased(&deletions, position, r)).collect();
                    erased += (before - kept.len()) as u64;
                    replay_batch.extend(kept);
                    newest
                }
                Err(e) => {
                    warn!(message = "Skipping a logged batch that does not decode.", error = %e, system_id = %entry.system_id);
                    Some(i64::MIN)
                }
            };
            if replay_batch.len() >= 50_000 && replay_error.is_none() {
                replay_error = hot.insert(&std::mem::take(&mut replay_batch)).err();
            }
            newest
        },
        durable_tx,
    )?;
    hot.set_applied(wal.replayed_end());
    if config.warm.enabled {
        let log = wal.clone();
        hot.on_warm_move(Box::new(move |mark| {
            if let Err(e) = log.release(mark) {
                warn!(message = "Cannot release write-ahead log segments; they stay.", error = %e);
            }
        }));
    }
    if let Some(e) = replay_error {
        return Err(e.into());
    }
    hot.insert(&replay_batch)?;
    if config.warm.enabled {
        let warm = hot.attach_warm(config.warm.clone())?;
        // Records the log brought back that belong in warm (all of them after a crash mid-move) go there now.
        let (now, windows) = (jiff::Timestamp::now().as_microsecond(), config.warm.hot_windows());
        if let Err(e) = hot.move_to_warm_by(|k| windows.cutoff(k, now)) {
            warn!(message = "Start-up move to the warm tier failed; the records stay hot.", error = %e);
        }
        info!(message = "Warm tier attached.", path = %warm.config.path.display());
        if config.cold.enabled {
            let cold = hot.attach_cold(config.cold.clone()).map_err(|e| RunError::Io {
                context: "cannot open the cold tier",
                source: std::io::Error::other(e.to_string()),
            })?;
            info!(message = "Cold tier attached.", url = %cold.location().url, interrupted_moves = cold.interrupted);
        }
    }
    info!(
        message = "Hot tier rebuilt from the write-ahead log.",
        entries = report.entries,
        records = hot.inserted(),
        already_warm,
        erased
    );
    Ok((wal, hot, durable_rx, embedder))
}
