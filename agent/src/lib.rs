//! The akosha edge agent: takes records from local sources, keeps them in a durable buffer and streams them to
//! one or more aggregators over QUIC with mutual TLS, deleting them only once the aggregator has acknowledged
//! that they are durable.
//!
//! [`Agent::run`] takes an already bound listener and a shutdown future (as mini-redis does), so tests start a
//! real agent in-process on port 0; `main` only parses arguments.

pub mod buffer;
pub mod config;
pub mod ingest;
pub mod mcp;
pub mod metrics;
pub mod plugin;
pub mod policy;
pub mod sender;
pub mod sources;
pub mod tls;

/// `rel` under this crate's directory as the running test finds it. cargo and nextest set `CARGO_MANIFEST_DIR` in
/// every test process; the compile-time value is stale when a shared target dir reuses a build made in another
/// checkout of the repository (cargo does not rebuild a workspace member for a new absolute path).
#[cfg(test)]
pub(crate) fn crate_path(rel: &str) -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")), std::path::PathBuf::from)
        .join(rel)
}

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use akosha_protocol::{Record, Residency};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::buffer::{Buffer, BufferError};
use crate::config::AgentConfig;
use crate::metrics::{Exposition, IngestCounters};
use crate::plugin::PluginIdentity;
use crate::policy::{Audit, CompressionChooser, ResidencyStage};
use crate::sender::DestinationStatus;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A destination's buffer cannot be opened.
    #[error("destination `{destination}`: {source}")]
    Buffer {
        /// The destination.
        destination: String,
        /// Why.
        #[source]
        source: BufferError,
    },
    /// A destination's TLS material is unusable.
    #[error("destination `{destination}`: {source}")]
    Tls {
        /// The destination.
        destination: String,
        /// Why.
        #[source]
        source: tls::TlsError,
    },
    /// The agent's state store cannot be opened.
    #[error("state store {path}: {source}")]
    State {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: sled::Error,
    },
    /// The HTTP server failed.
    #[error("ingest server failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// Appends the records whose route `wanted` accepts; returns how many. Appends the caller's slice as is when
/// all are wanted, so the common single-route batch is not copied.
async fn append_selected(
    buffer: &Buffer,
    records: &[Record],
    routes: &[Residency],
    wanted: impl Fn(Residency) -> bool,
    wait: std::time::Duration,
) -> Result<u64, BufferError> {
    if routes.iter().all(|r| wanted(*r)) {
        return Ok(buffer.append(records, wait).await?.records);
    }
    let selected: Vec<Record> =
        records.iter().zip(routes).filter(|(_, r)| wanted(**r)).map(|(record, _)| record.clone()).collect();
    if selected.is_empty() {
        return Ok(0);
    }
    Ok(buffer.append(&selected, wait).await?.records)
}

impl sources::file_tail::RecordSink for Agent {
    async fn accept(&self, records: &[Record]) -> Result<u64, BufferError> {
        let n = Agent::accept(self, records).await?;
        self.counters.accepted_records.add(n);
        Ok(n)
    }
}

/// A running agent's shared state.
pub struct Agent {
    system_id: String,
    /// Zone of naive local timestamps written by Session-Buddy.
    zone: jiff::tz::TimeZone,
    full_wait: std::time::Duration,
    destinations: BTreeMap<String, DestinationHandle>,
    residency: Arc<ResidencyStage>,
    compression: Vec<PluginIdentity>,
    audit: Arc<Audit>,
    quarantine: Quarantine,
    counters: IngestCounters,
    files: Vec<(std::path::PathBuf, Arc<sources::file_tail::FileTailStats>)>,
    snapshots: Arc<sources::session_buddy_snapshot::SnapshotStats>,
}

struct DestinationHandle {
    address: String,
    residency: Residency,
    routes: Vec<Residency>,
    buffer: Buffer,
    status: Arc<DestinationStatus>,
}

/// Records that must stay on the premises while no on-prem destination is configured: kept durably, never
/// sent, moved to the on-prem destinations at the next start that has one. Opened on first use.
struct Quarantine {
    path: std::path::PathBuf,
    config: buffer::BufferConfig,
    buffer: tokio::sync::OnceCell<Buffer>,
}

impl Quarantine {
    async fn buffer(&self) -> Result<&Buffer, BufferError> {
        self.buffer
            .get_or_try_init(|| async {
                let (path, config) = (self.path.clone(), self.config.clone());
                tokio::task::spawn_blocking(move || Buffer::open(&path, config))
                    .await
                    .map_err(|e| BufferError::Storage { path: self.path.clone(), source: std::io::Error::other(e) })?
            })
            .await
    }
}

impl Agent {
    /// Opens buffers, checks TLS material, and runs ingest and senders until `shutdown` resolves; then stops
    /// accepting, drains in-flight batches and flushes the buffers.
    pub async fn run(
        config: AgentConfig,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let audit = Arc::new(Audit::default());
        // Compiling a component takes a second or so: off the runtime's threads.
        let residency = {
            let (policies, routing, audit) = (config.policies.residency.clone(), config.routing.clone(), audit.clone());
            tokio::task::spawn_blocking(move || ResidencyStage::load_fail_closed(&policies, &routing, audit))
                .await
                .map_err(|e| StartError::Serve(std::io::Error::other(e)))?
        };
        for identity in residency.identities() {
            info!(message = "Residency policy loaded.", policy = %identity.name, path = %identity.path.display(), sha256 = %identity.sha256, contract = %identity.contract);
        }
        let mut compression = Vec::new();
        let mut destinations = BTreeMap::new();
        let mut senders = Vec::new();
        for (name, dest) in &config.destinations {
            let chooser = {
                let (policies, name, codec, audit) =
                    (config.policies.compression.clone(), name.clone(), dest.codec, audit.clone());
                tokio::task::spawn_blocking(move || {
                    CompressionChooser::load_skipping_failures(&name, &policies, codec, audit)
                })
                .await
                .map_err(|e| StartError::Serve(std::io::Error::other(e)))?
            };
            if compression.is_empty() {
                compression = chooser.identities();
            }
            let client = tls::client_config(dest, &config.system_id)
                .map_err(|source| StartError::Tls { destination: name.clone(), source })?;
            let buffer = Buffer::open(&config.buffer_dir(name), config.buffer.clone())
                .map_err(|source| StartError::Buffer { destination: name.clone(), source })?;
            let status = Arc::new(DestinationStatus::default());
            senders.push(tokio::spawn(sender::run(
                dest.clone(),
                client,
                config.system_id.clone(),
                buffer.clone(),
                status.clone(),
                Arc::new(std::sync::Mutex::new(chooser)),
                stop_rx.clone(),
            )));
            let handle = DestinationHandle {
                address: dest.address.clone(),
                residency: dest.residency,
                routes: dest.routes.clone(),
                buffer,
                status,
            };
            destinations.insert(name.clone(), handle);
        }
        let state_dir = config.state_dir();
        let state = sled::Config::new()
            .path(&state_dir)
            .cache_capacity(1 << 20)
            .flush_every_ms(Some(500))
            .open()
            .and_then(|db| db.open_tree("sources"))
            .map_err(|source| StartError::State { path: state_dir.clone(), source })?;
        let files: Vec<_> = config
            .files
            .iter()
            .map(|f| (f.path.clone(), Arc::new(sources::file_tail::FileTailStats::default())))
            .collect();
        let agent = Arc::new(Agent {
            files: files.clone(),
            system_id: config.system_id.clone(),
            zone: config.session_buddy_zone.clone(),
            snapshots: Arc::new(sources::session_buddy_snapshot::SnapshotStats::default()),
            full_wait: config.ingest.full_wait,
            destinations,
            residency: Arc::new(residency),
            compression,
            audit,
            quarantine: Quarantine {
                path: config.quarantine_dir(),
                config: config.buffer.clone(),
                buffer: tokio::sync::OnceCell::new(),
            },
            counters: IngestCounters::default(),
        });
        agent.release_quarantine().await;
        info!(message = "Agent started.", system_id = %agent.system_id, listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default());
        let mut tails = Vec::new();
        for (file, (_, stats)) in config.files.iter().zip(files) {
            let (agent, state, stop) = (agent.clone(), state.clone(), stop_rx.clone());
            let (file, system_id) = (file.clone(), config.system_id.clone());
            tails.push(tokio::spawn(async move {
                sources::file_tail::run(file, system_id, &*agent, state, &stats, stop).await;
            }));
        }
        if let Some(snapshot) = config.session_buddy_snapshots.clone() {
            let (agent, state, stop) = (agent.clone(), state.clone(), stop_rx.clone());
            let system_id = config.system_id.clone();
            tails.push(tokio::spawn(async move {
                let stats = agent.snapshots.clone();
                sources::session_buddy_snapshot::run(snapshot, system_id, &*agent, state, &stats, stop).await;
            }));
        }
        let app = ingest::router(agent.clone(), config.ingest.max_body_bytes);
        axum::serve(listener, app).with_graceful_shutdown(shutdown).await.map_err(StartError::Serve)?;
        info!(message = "Ingest stopped; draining senders.");
        let _ = stop_tx.send(true);
        for tail in tails {
            let _ = tail.await;
        }
        let _ = state.flush();
        for sender in senders {
            let _ = sender.await;
        }
        info!(message = "Agent stopped.");
        Ok(())
    }

    /// Routes records by residency and stores each durably in the buffer of every destination that receives
    /// its route (records routed `onprem` with no on-prem destination go to quarantine; `drop` goes nowhere).
    /// Returns how many records were handled, dropped ones included.
    ///
    /// A record bound for several destinations is appended to each in turn; if a later append fails (buffer
    /// full), the source retries the whole call and the earlier destinations get the records again, which their
    /// aggregators deduplicate.
    pub async fn accept(&self, records: &[Record]) -> Result<u64, BufferError> {
        if records.is_empty() {
            return Ok(0);
        }
        let routed;
        let (records, routes): (&[Record], Vec<Residency>) = if self.residency.has_policies() {
            let stage = self.residency.clone();
            let owned = records.to_vec();
            match tokio::task::spawn_blocking(move || stage.decide(owned)).await {
                Ok(r) => {
                    routed = r;
                    (&routed.records, routed.routes)
                }
                // A bug in the host, not the plugin: still never to the cloud.
                Err(error) => {
                    warn!(message = "Residency stage crashed; the records stay on the premises.", %error);
                    (records, records.iter().map(|r| self.residency.floor(r).max(Residency::Onprem)).collect())
                }
            }
        } else {
            (records, records.iter().map(|r| self.residency.floor(r)).collect())
        };
        let onprem_receivers = self.destinations.values().any(|d| d.routes.contains(&Residency::Onprem));
        for destination in self.destinations.values() {
            debug_assert!(
                destination.residency == Residency::Onprem || !destination.routes.contains(&Residency::Onprem)
            );
            append_selected(&destination.buffer, records, &routes, |r| destination.routes.contains(&r), self.full_wait)
                .await?;
        }
        let mut quarantined = 0;
        if !onprem_receivers && routes.contains(&Residency::Onprem) {
            let quarantine = self.quarantine.buffer().await?;
            quarantined =
                append_selected(quarantine, records, &routes, |r| r == Residency::Onprem, self.full_wait).await?;
            warn!(message = "Records routed onprem with no on-prem destination were quarantined.", records = quarantined, path = %self.quarantine.path.display());
        }
        self.audit.routed(&routes, quarantined);
        Ok(records.len() as u64)
    }

    /// Moves quarantined records to the on-prem destinations once there are any (at start).
    async fn release_quarantine(&self) {
        let receivers: Vec<&DestinationHandle> =
            self.destinations.values().filter(|d| d.routes.contains(&Residency::Onprem)).collect();
        if !self.quarantine.path.exists() {
            return;
        }
        if receivers.is_empty() {
            // Open it anyway so that status shows what is held.
            match self.quarantine.buffer().await {
                Ok(quarantine) => {
                    let held = quarantine.stats().records;
                    if held > 0 {
                        warn!(message = "Records are quarantined until an on-prem destination is configured.", records = held, path = %self.quarantine.path.display());
                    }
                }
                Err(error) => warn!(message = "Cannot open the quarantine.", %error),
            }
            return;
        }
        let result: Result<u64, BufferError> = async {
            let quarantine = self.quarantine.buffer().await?;
            let mut moved = 0;
            while let Some(batch) = quarantine.next_batch(10_000, 8 << 20)? {
                let records = match akosha_protocol::decode_records(&batch.payload, batch.record_count as usize) {
                    Ok(records) => records,
                    Err(error) => {
                        warn!(message = "Quarantined chunk cannot be decoded; left in place.", %error);
                        quarantine.release(&batch.chunks);
                        break;
                    }
                };
                for destination in &receivers {
                    destination.buffer.append(&records, self.full_wait).await?;
                }
                moved += quarantine.ack(&batch.chunks)?;
            }
            Ok(moved)
        }
        .await;
        match result {
            Ok(0) => {}
            Ok(moved) => info!(message = "Quarantined records moved to the on-prem destinations.", records = moved),
            Err(error) => warn!(message = "Cannot release the quarantine now; will retry at the next start.", %error),
        }
    }

    /// The status document served at `/v1/status`.
    pub fn status(&self) -> serde_json::Value {
        let destinations: serde_json::Map<String, serde_json::Value> = self
            .destinations
            .iter()
            .map(|(name, d)| {
                let s = &d.status;
                let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
                let value = json!({
                    "address": d.address,
                    "residency": d.residency.as_str(),
                    "routes": d.routes.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
                    "connected": s.connected.load(std::sync::atomic::Ordering::Relaxed),
                    "sessions": load(&s.sessions),
                    "failed_attempts": load(&s.failed_attempts),
                    "batches_sent": load(&s.batches_sent),
                    "batches_acked": load(&s.batches_acked),
                    "records_acked": load(&s.records_acked),
                    "batches_rejected": load(&s.batches_rejected),
                    "bytes_sent": load(&s.bytes_sent),
                    "last_error": *s.last_error.lock().unwrap_or_else(|p| p.into_inner()),
                    "buffer": d.buffer.stats(),
                });
                (name.clone(), value)
            })
            .collect();
        json!({
            "system_id": self.system_id,
            "version": env!("CARGO_PKG_VERSION"),
            "destinations": destinations,
            "policies": {
                "residency": self.residency.identities(),
                "compression": self.compression,
                "unloadable": self.residency.load_errors().map(|e| json!({
                    "policy": e.plugin(), "cause": e.label(), "error": e.to_string(),
                })).collect::<Vec<_>>(),
            },
            "audit": self.audit.status(),
            "quarantine": self.quarantine.buffer.get().map(Buffer::stats),
            "files": self.files.iter().map(|(path, s)| json!({
                "path": path.display().to_string(),
                "position": s.position.load(std::sync::atomic::Ordering::Relaxed),
                "records": s.records.load(std::sync::atomic::Ordering::Relaxed),
                "invalid_lines": s.invalid_lines.load(std::sync::atomic::Ordering::Relaxed),
                "rotations": s.rotations.load(std::sync::atomic::Ordering::Relaxed),
            })).collect::<Vec<_>>(),
            "session_buddy_snapshots": {
                "snapshots": self.snapshots.snapshots.load(std::sync::atomic::Ordering::Relaxed),
                "changed_records": self.snapshots.changed_records.load(std::sync::atomic::Ordering::Relaxed),
                "unchanged_records": self.snapshots.unchanged_records.load(std::sync::atomic::Ordering::Relaxed),
                "failures": self.snapshots.failures.load(std::sync::atomic::Ordering::Relaxed),
            },
            "ingest": {
                "accepted_records": self.counters.accepted_records.get(),
                "rejected_requests": self.counters.rejected_requests.get(),
                "rejected_lines": self.counters.rejected_lines.get(),
                "full_rejections": self.counters.full_rejections.get(),
            },
        })
    }

    /// Prometheus text exposition.
    pub fn metrics_text(&self) -> String {
        let mut m = Exposition::new();
        let c = &self.counters;
        m.metric(
            "akosha_agent_ingest_records_total",
            "counter",
            "Records accepted into a buffer.",
            [(&[][..], c.accepted_records.get() as f64)],
        );
        m.metric(
            "akosha_agent_ingest_rejected_requests_total",
            "counter",
            "Requests refused for invalid lines.",
            [(&[][..], c.rejected_requests.get() as f64)],
        );
        m.metric(
            "akosha_agent_ingest_buffer_full_total",
            "counter",
            "Requests refused because the buffer was full.",
            [(&[][..], c.full_rejections.get() as f64)],
        );
        let now = jiff::Timestamp::now().as_microsecond();
        let per_dest: Vec<(&String, &DestinationHandle, buffer::BufferStats)> =
            self.destinations.iter().map(|(n, d)| (n, d, d.buffer.stats())).collect();
        let labels: Vec<[(&str, &str); 1]> = per_dest.iter().map(|(n, _, _)| [("destination", n.as_str())]).collect();
        let series = |f: &dyn Fn(&DestinationHandle, &buffer::BufferStats) -> f64| -> Vec<(&[(&str, &str)], f64)> {
            per_dest.iter().zip(&labels).map(|((_, d, s), l)| (&l[..], f(d, s))).collect()
        };
        let ld = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed) as f64;
        m.metric(
            "akosha_agent_buffer_records",
            "gauge",
            "Records waiting for an ack.",
            series(&|_, s| s.records as f64),
        );
        m.metric(
            "akosha_agent_buffer_bytes",
            "gauge",
            "Stored bytes waiting for an ack.",
            series(&|_, s| s.bytes as f64),
        );
        m.metric(
            "akosha_agent_buffer_disk_bytes",
            "gauge",
            "Disk used by the buffer store.",
            series(&|_, s| s.disk_bytes as f64),
        );
        m.metric(
            "akosha_agent_buffer_oldest_age_seconds",
            "gauge",
            "Age of the oldest record waiting for an ack.",
            series(&|_, s| s.oldest_accepted_at_us.map_or(0.0, |t| (now - t).max(0) as f64 / 1e6)),
        );
        m.metric(
            "akosha_agent_buffer_dropped_records_total",
            "counter",
            "Records evicted by drop_oldest.",
            series(&|_, s| s.dropped_records as f64),
        );
        m.metric(
            "akosha_agent_buffer_corrupted_chunks_total",
            "counter",
            "Corrupted chunks removed.",
            series(&|_, s| s.corrupted_chunks as f64),
        );
        m.metric(
            "akosha_agent_buffer_dead_letter_records",
            "gauge",
            "Records rejected for good by the aggregator.",
            series(&|_, s| s.dead_letter_records as f64),
        );
        m.metric(
            "akosha_agent_connected",
            "gauge",
            "1 while a session with the aggregator is up.",
            series(&|d, _| f64::from(u8::from(d.status.connected.load(std::sync::atomic::Ordering::Relaxed)))),
        );
        m.metric(
            "akosha_agent_batches_sent_total",
            "counter",
            "Batches sent, resends included.",
            series(&|d, _| ld(&d.status.batches_sent)),
        );
        m.metric(
            "akosha_agent_batches_acked_total",
            "counter",
            "Batches acknowledged.",
            series(&|d, _| ld(&d.status.batches_acked)),
        );
        m.metric(
            "akosha_agent_records_acked_total",
            "counter",
            "Records acknowledged.",
            series(&|d, _| ld(&d.status.records_acked)),
        );
        m.metric(
            "akosha_agent_batches_rejected_total",
            "counter",
            "Batches rejected for good.",
            series(&|d, _| ld(&d.status.batches_rejected)),
        );
        m.metric(
            "akosha_agent_sent_bytes_total",
            "counter",
            "Bytes sent after compression.",
            series(&|d, _| ld(&d.status.bytes_sent)),
        );
        m.metric(
            "akosha_agent_reconnects_total",
            "counter",
            "Sessions that ended with an error.",
            series(&|d, _| ld(&d.status.failed_attempts)),
        );
        m.metric(
            "akosha_agent_quarantine_records",
            "gauge",
            "Records held in quarantine (routed onprem, no on-prem destination).",
            [(&[][..], self.quarantine.buffer.get().map_or(0, |b| b.stats().records) as f64)],
        );
        self.audit.metrics(&mut m);
        m.finish()
    }
}
