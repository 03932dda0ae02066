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
pub mod sender;
pub mod sources;
pub mod tls;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use akosha_protocol::Record;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

use crate::buffer::{Buffer, BufferError};
use crate::config::AgentConfig;
use crate::metrics::{Exposition, IngestCounters};
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
    default_destination: String,
    full_wait: std::time::Duration,
    destinations: BTreeMap<String, DestinationHandle>,
    counters: IngestCounters,
    files: Vec<(std::path::PathBuf, Arc<sources::file_tail::FileTailStats>)>,
    snapshots: Arc<sources::session_buddy_snapshot::SnapshotStats>,
}

struct DestinationHandle {
    address: String,
    buffer: Buffer,
    status: Arc<DestinationStatus>,
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
        let mut destinations = BTreeMap::new();
        let mut senders = Vec::new();
        for (name, dest) in &config.destinations {
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
                stop_rx.clone(),
            )));
            destinations.insert(name.clone(), DestinationHandle { address: dest.address.clone(), buffer, status });
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
            default_destination: config.default_destination.clone(),
            full_wait: config.ingest.full_wait,
            destinations,
            counters: IngestCounters::default(),
        });
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

    /// Stores records durably for delivery, returning how many were accepted.
    pub async fn accept(&self, records: &[Record]) -> Result<u64, BufferError> {
        // Residency policies (WASM plugins) will pick a destination per record; until one is configured, every
        // record goes to the default destination.
        let destination = &self.destinations[&self.default_destination];
        let receipt = destination.buffer.append(records, self.full_wait).await?;
        Ok(receipt.records)
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
            "default_destination": self.default_destination,
            "destinations": destinations,
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
        m.finish()
    }
}
