//! Streams one destination's buffer to its aggregator.
//!
//! One task per destination runs sessions back to back: connect (QUIC + mutual TLS), Hello/Welcome, then keep
//! up to `credit` batches in flight, deleting chunks from the buffer only when their batch is acknowledged. Any
//! failure ends the session; unacknowledged chunks go back to the buffer and are sent again by the next session
//! after an exponential backoff with full jitter (or the delay the aggregator asked for, if longer).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use akosha_protocol::{
    Codec, DEFAULT_MAX_FRAME_LEN, ErrorCode, FRAME_HEADER_LEN, FrameHeader, Hello, MIN_PROTOCOL_VERSION, Message,
    OutgoingBatch, PROTOCOL_VERSION, SendWindow,
};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::buffer::{Buffer, BufferError, PendingBatch};
use crate::config::DestinationConfig;
use crate::policy::CompressionChooser;

/// What the status API shows about a destination.
#[derive(Debug, Default)]
pub struct DestinationStatus {
    /// A session is established.
    pub connected: AtomicBool,
    /// Sessions established since start.
    pub sessions: AtomicU64,
    /// Connection attempts that failed.
    pub failed_attempts: AtomicU64,
    /// Batches sent (including resends).
    pub batches_sent: AtomicU64,
    /// Batches acknowledged.
    pub batches_acked: AtomicU64,
    /// Records acknowledged.
    pub records_acked: AtomicU64,
    /// Batches the aggregator rejected for good.
    pub batches_rejected: AtomicU64,
    /// Payload bytes sent, after compression.
    pub bytes_sent: AtomicU64,
    /// Last error, for `status`.
    pub last_error: std::sync::Mutex<Option<String>>,
}

/// Runs the sender for one destination until `shutdown` turns true, then drains in-flight batches (bounded by
/// the destination's `drain_timeout`).
pub async fn run(
    dest: DestinationConfig,
    client: quinn::ClientConfig,
    system_id: String,
    buffer: Buffer,
    status: Arc<DestinationStatus>,
    compression: Arc<std::sync::Mutex<CompressionChooser>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let bind: std::net::SocketAddr = ([0, 0, 0, 0], 0).into();
    let endpoint = match quinn::Endpoint::client(bind) {
        Ok(mut endpoint) => {
            endpoint.set_default_client_config(client);
            endpoint
        }
        Err(error) => {
            warn!(message = "Cannot create the QUIC endpoint; this destination will not send.", %error, destination = %dest.name);
            return;
        }
    };
    let mut backoff = Backoff::new(dest.backoff_initial, dest.backoff_max);
    while !*shutdown.borrow() {
        let mut session = Session {
            dest: &dest,
            system_id: &system_id,
            buffer: &buffer,
            status: &status,
            compression: &compression,
            progressed: false,
        };
        let mut window = SendWindow::new(0);
        let result = session.run(&endpoint, &mut window, &mut shutdown).await;
        status.connected.store(false, Ordering::Relaxed);
        for chunks in window.into_unacked() {
            buffer.release(&chunks);
        }
        let retry_after = match result {
            Ok(()) => break,
            Err(end) => {
                if session.progressed {
                    backoff.reset();
                }
                status.failed_attempts.fetch_add(1, Ordering::Relaxed);
                warn!(message = "Session with the aggregator ended; reconnecting.", error = %end.error, destination = %dest.name, address = %dest.address);
                *status.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(end.error);
                end.retry_after
            }
        };
        let delay = backoff.next_delay().max(retry_after.unwrap_or_default());
        debug!(message = "Waiting before reconnecting.", delay_ms = delay.as_millis() as u64, destination = %dest.name);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => {}
        }
    }
    endpoint.close(0u32.into(), b"agent shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    if let Err(error) = buffer.flush() {
        warn!(message = "Failed to flush buffer.", %error, destination = %dest.name);
    }
}

/// Why a session ended, and how long the aggregator asked us to wait.
struct SessionEnd {
    error: String,
    retry_after: Option<Duration>,
}

impl<E: std::fmt::Display> From<E> for SessionEnd {
    fn from(e: E) -> Self {
        SessionEnd { error: e.to_string(), retry_after: None }
    }
}

struct Session<'a> {
    dest: &'a DestinationConfig,
    system_id: &'a str,
    buffer: &'a Buffer,
    status: &'a DestinationStatus,
    compression: &'a Arc<std::sync::Mutex<CompressionChooser>>,
    /// Something was acknowledged: the link works, so the next reconnect starts from the smallest backoff.
    progressed: bool,
}

impl Session<'_> {
    async fn run(
        &mut self,
        endpoint: &quinn::Endpoint,
        window: &mut SendWindow<Vec<u64>>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), SessionEnd> {
        let address = tokio::net::lookup_host(&self.dest.address)
            .await?
            .next()
            .ok_or_else(|| format!("{} resolves to no address", self.dest.address))?;
        let connecting = endpoint.connect(address, &self.dest.server_name)?;
        let connection = tokio::time::timeout(self.dest.connect_timeout, connecting)
            .await
            .map_err(|_| format!("QUIC handshake with {address} timed out"))??;
        let (mut send, recv) = connection.open_bi().await?;
        let hello = Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            system_id: self.system_id.to_owned(),
            buffer_epoch: self.buffer.epoch(),
            resume_from: self.buffer.resume_point(),
        };
        send.write_all(&Message::Hello(hello).encode()).await?;

        let (tx, mut incoming) = mpsc::channel(64);
        let reader = tokio::spawn(read_messages(recv, tx));
        let _abort_reader = AbortOnDrop(reader);

        let welcome = match tokio::time::timeout(self.dest.connect_timeout, incoming.recv()).await {
            Err(_) => return Err("no Welcome from the aggregator in time".into()),
            Ok(None) => return Err("aggregator closed the stream before its Welcome".into()),
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(Some(Ok(Message::Welcome(w)))) => w,
            Ok(Some(Ok(Message::Error(e)))) => {
                return Err(SessionEnd {
                    error: format!("aggregator refused the session: {} ({})", e.message, e.code.as_str()),
                    retry_after: e.retry_after_ms.map(|ms| Duration::from_millis(ms.into())),
                });
            }
            Ok(Some(Ok(other))) => return Err(format!("expected Welcome, got {:?}", other.frame_type()).into()),
        };
        if welcome.system_id != self.system_id {
            return Err(
                format!("aggregator sees this agent as `{}`, not `{}`", welcome.system_id, self.system_id).into()
            );
        }
        if let Some(through) = welcome.durable_through {
            let skipped = self.buffer.skip_through(through).map_err(|e| e.to_string())?;
            if skipped > 0 {
                info!(message = "Aggregator already stored records from an earlier session; not resending them.", records = skipped, destination = %self.dest.name);
            }
        }
        info!(message = "Connected to aggregator.", destination = %self.dest.name, address = %address, server_version = %welcome.server_version, credit = welcome.credit);
        self.status.connected.store(true, Ordering::Relaxed);
        self.status.sessions.fetch_add(1, Ordering::Relaxed);
        *window = SendWindow::new(welcome.credit);
        let max_batch_bytes = self.dest.batch_max_bytes.min(u64::from(welcome.max_batch_bytes));
        let heartbeat_every = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms.max(1000)));
        let mut heartbeat = tokio::time::interval(heartbeat_every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut draining: Option<tokio::time::Instant> = None;

        loop {
            while draining.is_none() && window.can_send() {
                let Some(pending) =
                    self.buffer.next_batch(self.dest.batch_max_records, max_batch_bytes).map_err(buffer_err)?
                else {
                    break;
                };
                let (codec, pending) = self.choose_codec(pending).await?;
                let seq = window.send(pending.chunks).map_err(|e| e.to_string())?;
                let frame = OutgoingBatch {
                    seq,
                    first_record: pending.first_record,
                    last_record: pending.last_record,
                    record_count: pending.record_count,
                    codec,
                    records: &pending.payload,
                }
                .encode();
                send.write_all(&frame).await?;
                self.status.batches_sent.fetch_add(1, Ordering::Relaxed);
                self.status.bytes_sent.fetch_add(frame.len() as u64, Ordering::Relaxed);
            }
            if draining.is_some() && window.in_flight() == 0 {
                let _ = send.write_all(&Message::Goodbye { reason: "agent shutting down".into() }.encode()).await;
                let _ = send.finish();
                connection.close(0u32.into(), b"drained");
                return Ok(());
            }
            let drain_deadline = draining.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                message = incoming.recv() => match message {
                    None => return Err("connection to the aggregator was lost".into()),
                    Some(Err(e)) => return Err(e.into()),
                    Some(Ok(message)) => self.handle(message, window, &mut send).await?,
                },
                _ = self.buffer.wait_for_data(), if draining.is_none() && window.can_send() => {}
                _ = heartbeat.tick() => {
                    send.write_all(&Message::Heartbeat { nonce: rand::random() }.encode()).await?;
                }
                _ = shutdown.changed(), if draining.is_none() => {
                    info!(message = "Draining in-flight batches before shutdown.", in_flight = window.in_flight(), destination = %self.dest.name);
                    draining = Some(tokio::time::Instant::now() + self.dest.drain_timeout);
                }
                _ = tokio::time::sleep_until(drain_deadline), if draining.is_some() => {
                    warn!(message = "Drain timed out; unacknowledged batches stay buffered for the next start.", in_flight = window.in_flight(), destination = %self.dest.name);
                    connection.close(0u32.into(), b"drain timeout");
                    return Ok(());
                }
            }
        }
    }

    /// Asks the compression policies (off the runtime's threads, since a policy may run up to its deadline);
    /// the destination's codec when there are none or all fail.
    async fn choose_codec(&self, pending: PendingBatch) -> Result<(Codec, PendingBatch), SessionEnd> {
        let lock = |c: &std::sync::Mutex<CompressionChooser>| {
            let mut chooser = c.lock().unwrap_or_else(|p| p.into_inner());
            if chooser.has_policies() { None } else { Some(chooser.choose(&pending.payload, pending.record_count)) }
        };
        if let Some(codec) = lock(self.compression) {
            return Ok((codec, pending));
        }
        let chooser = self.compression.clone();
        let chunks = pending.chunks.clone();
        tokio::task::spawn_blocking(move || {
            let codec =
                chooser.lock().unwrap_or_else(|p| p.into_inner()).choose(&pending.payload, pending.record_count);
            (codec, pending)
        })
        .await
        .map_err(|error| {
            // A host bug, not a plugin failure: the batch goes back to the buffer and the session restarts.
            self.buffer.release(&chunks);
            SessionEnd { error: format!("compression policy task failed: {error}"), retry_after: None }
        })
    }

    async fn handle(
        &mut self,
        message: Message,
        window: &mut SendWindow<Vec<u64>>,
        send: &mut quinn::SendStream,
    ) -> Result<(), SessionEnd> {
        match message {
            Message::Ack { through } => {
                for chunks in window.ack(through).map_err(|e| e.to_string())? {
                    let records = self.buffer.ack(&chunks).map_err(buffer_err)?;
                    self.status.batches_acked.fetch_add(1, Ordering::Relaxed);
                    self.status.records_acked.fetch_add(records, Ordering::Relaxed);
                    self.progressed = true;
                }
            }
            Message::Credit { batches } => window.grant(batches),
            Message::Heartbeat { nonce } => send.write_all(&Message::HeartbeatAck { nonce }.encode()).await?,
            Message::HeartbeatAck { .. } => {}
            Message::Error(e) if e.code.is_permanent_rejection() && e.batch_seq.is_some() => {
                let seq = e.batch_seq.unwrap_or_default();
                if let Some(chunks) = window.reject(seq) {
                    self.buffer.dead_letter(&chunks, &e.message).map_err(buffer_err)?;
                    self.status.batches_rejected.fetch_add(1, Ordering::Relaxed);
                }
            }
            Message::Error(e) => {
                return Err(SessionEnd {
                    error: format!("aggregator error {}: {}", e.code.as_str(), e.message),
                    retry_after: e
                        .retry_after_ms
                        .map(|ms| Duration::from_millis(ms.into()))
                        .or_else(|| (e.code == ErrorCode::ShuttingDown).then_some(Duration::from_millis(500))),
                });
            }
            Message::Goodbye { reason } => {
                return Err(SessionEnd {
                    error: format!("aggregator ended the session: {reason}"),
                    retry_after: Some(Duration::from_millis(500)),
                });
            }
            other => return Err(format!("unexpected {:?} frame from the aggregator", other.frame_type()).into()),
        }
        Ok(())
    }
}

fn buffer_err(e: BufferError) -> SessionEnd {
    SessionEnd { error: e.to_string(), retry_after: None }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads frames until the stream ends or breaks; every error is forwarded once, then reading stops.
async fn read_messages(mut recv: quinn::RecvStream, tx: mpsc::Sender<Result<Message, String>>) {
    loop {
        let mut header = [0u8; FRAME_HEADER_LEN];
        let result = match recv.read_exact(&mut header).await {
            Ok(_) => read_body(&mut recv, &header).await,
            Err(e) => Err(e.to_string()),
        };
        let failed = result.is_err();
        if tx.send(result).await.is_err() || failed {
            return;
        }
    }
}

async fn read_body(recv: &mut quinn::RecvStream, header: &[u8; FRAME_HEADER_LEN]) -> Result<Message, String> {
    let header = FrameHeader::parse(header, DEFAULT_MAX_FRAME_LEN).map_err(|e| e.to_string())?;
    let mut body = vec![0u8; header.body_len];
    recv.read_exact(&mut body).await.map_err(|e| e.to_string())?;
    header.verify(&body).map_err(|e| e.to_string())?;
    Message::decode(header.frame_type, &body).map_err(|e| e.to_string())
}

/// Exponential backoff with full jitter: each delay is uniform in `[0, min(max, initial × 2^attempt)]`.
#[derive(Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `initial`, capped at `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max, attempt: 0 }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.initial.saturating_mul(1u32 << self.attempt.min(20)).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(rand::random::<f64>())
    }

    /// Back to the smallest delay.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<Duration> = (0..30).map(|_| b.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(delays[..1].iter().all(|d| *d <= Duration::from_millis(100)));
        // Full jitter: not all late delays sit at the cap.
        assert!(delays[10..].iter().any(|d| *d < Duration::from_millis(1900)));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
