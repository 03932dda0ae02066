//! The QUIC receiver: one task pair per agent session.
//!
//! The reader task decodes frames, checks flow control and the claimed system of every record, and queues valid
//! batches in the write-ahead log without waiting for them; the writer task answers in order: an ack for each
//! batch once its group commit is durable, a typed error for each rejected batch, and credit as batches
//! complete. Credit is withheld while the log's queue is long (admission control), so thousands of agents cannot
//! pile more work on the aggregator than it can make durable.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use akosha_protocol::{
    BATCH_HEAD_LEN, Batch, DEFAULT_MAX_FRAME_LEN, ErrorCode, ErrorFrame, FRAME_HEADER_LEN, FrameError, FrameHeader,
    FrameType, Message, ReceiveWindow, Record, Welcome, decode_records, negotiate_version,
};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::certs::system_id_of;
use crate::config::QuicConfig;
use crate::hot::HotTier;
use crate::metrics::ReceiverMetrics;
use crate::wal::{Durability, Wal, WalEntry, WalError};

/// The buffer epoch of records written through the API rather than by an agent.
pub const API_BUFFER_EPOCH: u64 = u64::MAX;

/// Everything a session needs.
pub struct Receiver {
    /// Settings.
    pub config: QuicConfig,
    /// Where batches become durable.
    pub wal: Wal,
    /// Where durable records become queryable.
    pub hot: Arc<HotTier>,
    /// Counters.
    pub metrics: Arc<ReceiverMetrics>,
    sessions: AtomicUsize,
}

/// QUIC application close codes.
mod close_code {
    pub(super) const DONE: u32 = 0;
    pub(super) const PROTOCOL_ERROR: u32 = 1;
    pub(super) const NO_IDENTITY: u32 = 2;
    pub(super) const SHUTTING_DOWN: u32 = 3;
}

impl Receiver {
    /// A receiver writing to `wal`.
    pub fn new(config: QuicConfig, wal: Wal, hot: Arc<HotTier>, metrics: Arc<ReceiverMetrics>) -> Self {
        Self { config, wal, hot, metrics, sessions: AtomicUsize::new(0) }
    }

    /// Transport settings matching this configuration.
    /// Stores records written through the API (MCP store tools) for `system_id`: logged and made durable like
    /// an agent's batch, then applied to the hot tier. Resolves once durable.
    pub async fn store(&self, system_id: &str, records: Vec<Record>) -> Result<usize, WalError> {
        if records.is_empty() {
            return Ok(0);
        }
        let payload = akosha_protocol::encode_records(records.iter());
        let count = records.len();
        let entry = WalEntry {
            system_id: system_id.to_owned(),
            // API writes have no agent buffer; a reserved epoch keeps them apart from every agent's resume point.
            buffer_epoch: API_BUFFER_EPOCH,
            first_record: 0,
            last_record: 0,
            record_count: count as u32,
            codec: akosha_protocol::Codec::None,
            uncompressed_len: payload.len() as u32,
            payload,
        };
        self.hot.note_pending(count as u64);
        self.wal.append(entry, records).await?;
        self.metrics.records_acked.add(count as u64);
        Ok(count)
    }

    pub fn transport_config(config: &QuicConfig) -> quinn::TransportConfig {
        let mut transport = quinn::TransportConfig::default();
        transport.max_idle_timeout(config.idle_timeout.try_into().ok());
        transport.max_concurrent_bidi_streams(4u8.into());
        transport.max_concurrent_uni_streams(0u8.into());
        transport.stream_receive_window((16u32 << 20).into());
        transport.receive_window((32u32 << 20).into());
        transport
    }

    /// Accepts connections until `shutdown` turns true, then lets sessions finish in-flight batches (bounded by
    /// the drain timeout) before returning.
    pub async fn serve(self: Arc<Self>, endpoint: quinn::Endpoint, mut shutdown: watch::Receiver<bool>) {
        let mut sessions = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                incoming = endpoint.accept() => match incoming {
                    Some(incoming) => {
                        let receiver = self.clone();
                        let shutdown = shutdown.clone();
                        sessions.spawn(async move { receiver.handle_connection(incoming, shutdown).await });
                    }
                    None => break,
                },
                _ = shutdown.changed() => break,
                Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            }
        }
        info!(message = "Receiver draining sessions.", sessions = sessions.len());
        let drained = tokio::time::timeout(self.config.drain_timeout + Duration::from_secs(1), async {
            while sessions.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(message = "Sessions did not drain in time; unacknowledged batches will be resent by their agents.");
            sessions.abort_all();
        }
        endpoint.close(close_code::SHUTTING_DOWN.into(), b"aggregator shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    }

    async fn handle_connection(self: Arc<Self>, incoming: quinn::Incoming, shutdown: watch::Receiver<bool>) {
        let remote = incoming.remote_address();
        let connection = match tokio::time::timeout(self.config.handshake_timeout, incoming).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(error)) => {
                self.metrics.tls_failures.inc();
                warn!(message = "Rejected connection during the TLS handshake.", %error, %remote);
                return;
            }
            Err(_) => {
                self.metrics.tls_failures.inc();
                warn!(message = "TLS handshake timed out.", %remote);
                return;
            }
        };
        let system_id = connection
            .peer_identity()
            .and_then(|identity| identity.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
            .and_then(|chain| chain.first().and_then(system_id_of));
        let Some(system_id) = system_id else {
            self.metrics.tls_failures.inc();
            warn!(message = "Client certificate names no usable system id; closing.", %remote);
            connection.close(close_code::NO_IDENTITY.into(), b"client certificate has no usable common name");
            return;
        };
        let stream = tokio::time::timeout(self.config.handshake_timeout, connection.accept_bi()).await;
        let (send, recv) = match stream {
            Ok(Ok(streams)) => streams,
            Ok(Err(error)) => {
                debug!(message = "Connection closed before opening a stream.", %error, %system_id);
                return;
            }
            Err(_) => {
                connection.close(close_code::PROTOCOL_ERROR.into(), b"no stream opened in time");
                return;
            }
        };
        self.metrics.seen(&system_id);
        let session = Session { receiver: self.clone(), system_id: system_id.clone(), connection: connection.clone() };
        session.run(send, recv, shutdown).await;
    }
}

/// What the writer task sends, in order.
enum Outgoing {
    Frame(Vec<u8>),
    Durable {
        seq: u64,
        records: u64,
        durable: Durability,
    },
    Rejected {
        seq: u64,
        error: ErrorFrame,
    },
    /// Send this error after everything queued before it, then end the session.
    Close(ErrorFrame),
}

struct Session {
    receiver: Arc<Receiver>,
    system_id: String,
    connection: quinn::Connection,
}

impl Session {
    async fn run(self, send: quinn::SendStream, mut recv: quinn::RecvStream, mut shutdown: watch::Receiver<bool>) {
        let r = &self.receiver;
        let hello = match tokio::time::timeout(r.config.handshake_timeout, read_message(&mut recv)).await {
            Ok(Ok(Some(Message::Hello(hello)))) => hello,
            Ok(Ok(Some(other))) => {
                return self
                    .refuse_raw(
                        send,
                        ErrorCode::ProtocolViolation,
                        &format!("expected Hello, got {:?}", other.frame_type()),
                    )
                    .await;
            }
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                r.metrics.malformed_frames.inc();
                return self.refuse_raw(send, ErrorCode::from(&e), &e.to_string()).await;
            }
            Err(_) => return self.refuse_raw(send, ErrorCode::ProtocolViolation, "no Hello in time").await,
        };
        if hello.system_id != self.system_id {
            let message =
                format!("Hello claims system `{}` but the certificate is for `{}`", hello.system_id, self.system_id);
            return self.refuse_raw(send, ErrorCode::SystemMismatch, &message).await;
        }
        let version = match negotiate_version(&hello) {
            Ok(v) => v,
            Err(e) => return self.refuse_raw(send, e.code, &e.message).await,
        };
        if *shutdown.borrow() {
            return self.refuse_raw(send, ErrorCode::ShuttingDown, "aggregator is shutting down").await;
        }
        let active = r.sessions.fetch_add(1, Ordering::AcqRel) + 1;
        let _slot = SessionSlot(&r.sessions);
        if active > r.config.max_sessions {
            r.metrics.sessions_refused.inc();
            let mut error = ErrorFrame::new(
                ErrorCode::Overloaded,
                format!("{} sessions open, limit {}", active - 1, r.config.max_sessions),
            );
            // Spread the retries of many refused agents over a few seconds.
            error.retry_after_ms = Some(1000 + rand::random::<u32>() % 4000);
            return self.send_final_error(send, error).await;
        }
        r.metrics.sessions_opened.inc();
        let window = Arc::new(Mutex::new(ReceiveWindow::new(r.config.credit_window)));
        let welcome = Welcome {
            version,
            server_version: env!("CARGO_PKG_VERSION").to_owned(),
            system_id: self.system_id.clone(),
            credit: r.config.credit_window,
            max_batch_bytes: r.config.max_batch_bytes,
            durable_through: r.wal.high_water(&self.system_id, hello.buffer_epoch),
            heartbeat_interval_ms: r.config.heartbeat_interval.as_millis() as u32,
        };
        info!(message = "Agent session opened.", system_id = %self.system_id, agent_version = %hello.agent_version, remote = %self.connection.remote_address());
        let (out_tx, out_rx) = mpsc::channel::<Outgoing>(r.config.credit_window as usize * 2 + 8);
        let writer = tokio::spawn(write_loop(
            send,
            out_rx,
            window.clone(),
            r.clone(),
            self.connection.clone(),
            self.system_id.clone(),
        ));
        let _ = out_tx.send(Outgoing::Frame(Message::Welcome(welcome).encode())).await;

        loop {
            let message = tokio::select! {
                m = read_message(&mut recv) => m,
                _ = shutdown.changed() => {
                    let mut error = ErrorFrame::new(ErrorCode::ShuttingDown, "aggregator is shutting down");
                    error.retry_after_ms = Some(1000);
                    let _ = out_tx.send(Outgoing::Close(error)).await;
                    break;
                }
            };
            let message = match message {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    r.metrics.malformed_frames.inc();
                    warn!(message = "Closing session after a bad frame.", error = %e, system_id = %self.system_id);
                    let _ = out_tx.send(Outgoing::Close(ErrorFrame::new(ErrorCode::from(&e), e.to_string()))).await;
                    break;
                }
            };
            r.metrics.seen(&self.system_id);
            let outgoing = match message {
                Message::Batch(batch) => {
                    let flow = window.lock().unwrap_or_else(|p| p.into_inner()).on_batch(batch.seq);
                    if let Err(e) = flow {
                        r.metrics.protocol_violations.inc();
                        let _ = out_tx
                            .send(Outgoing::Close(ErrorFrame::new(ErrorCode::ProtocolViolation, e.to_string())))
                            .await;
                        break;
                    }
                    self.accept_batch(batch, hello.buffer_epoch).await
                }
                Message::Heartbeat { nonce } => Outgoing::Frame(Message::HeartbeatAck { nonce }.encode()),
                Message::HeartbeatAck { .. } => continue,
                Message::Goodbye { .. } => break,
                other => {
                    r.metrics.protocol_violations.inc();
                    let message = format!("unexpected {:?} frame from an agent", other.frame_type());
                    let _ = out_tx.send(Outgoing::Close(ErrorFrame::new(ErrorCode::ProtocolViolation, message))).await;
                    break;
                }
            };
            if out_tx.send(outgoing).await.is_err() {
                break;
            }
        }
        drop(out_tx);
        let _ = writer.await;
        r.metrics.sessions_closed.inc();
        info!(message = "Agent session closed.", system_id = %self.system_id);
    }

    /// Validates a batch and queues it in the log; a rejection is answered in order with the acks.
    async fn accept_batch(&self, batch: Batch, buffer_epoch: u64) -> Outgoing {
        let r = &self.receiver;
        r.metrics.bytes_received.add(batch.payload.len() as u64);
        let seq = batch.seq;
        let reject = |code: ErrorCode, message: String| {
            warn!(message = "Rejected a batch.", reason = code.as_str(), detail = %message, system_id = %self.system_id, batch = seq);
            Outgoing::Rejected { seq, error: ErrorFrame { code, batch_seq: Some(seq), retry_after_ms: None, message } }
        };
        let raw = match batch.codec.decompress(
            &batch.payload,
            batch.uncompressed_len as usize,
            r.config.max_batch_bytes as usize,
        ) {
            Ok(raw) => raw,
            Err(e) => {
                r.metrics.rejected_invalid.inc();
                return reject(ErrorCode::InvalidBatch, e.to_string());
            }
        };
        let records = match decode_records(&raw, batch.record_count as usize) {
            Ok(records) => records,
            Err(e) => {
                r.metrics.rejected_invalid.inc();
                return reject(ErrorCode::InvalidBatch, e.to_string());
            }
        };
        if let Some(foreign) = records.iter().find(|rec| rec.system_id != self.system_id) {
            r.metrics.rejected_system_mismatch.inc();
            let message = format!(
                "record `{}` claims system `{}` but this agent's certificate is for `{}`; the whole batch was rejected",
                foreign.id, foreign.system_id, self.system_id
            );
            return reject(ErrorCode::SystemMismatch, message);
        }
        let count = records.len() as u64;
        let entry = WalEntry {
            system_id: self.system_id.clone(),
            buffer_epoch,
            first_record: batch.first_record,
            last_record: batch.last_record,
            record_count: batch.record_count,
            codec: batch.codec,
            uncompressed_len: batch.uncompressed_len,
            payload: batch.payload,
        };
        r.hot.note_pending(count);
        match r.wal.submit(entry, records).await {
            Ok(durable) => Outgoing::Durable { seq, records: count, durable },
            Err(e) => {
                r.metrics.storage_failures.inc();
                Outgoing::Close(ErrorFrame {
                    code: ErrorCode::StorageFailure,
                    batch_seq: Some(seq),
                    retry_after_ms: Some(5000),
                    message: e.to_string(),
                })
            }
        }
    }

    /// Refuses the session before it started: one error frame, then close.
    async fn refuse_raw(&self, send: quinn::SendStream, code: ErrorCode, message: &str) {
        let r = &self.receiver;
        if matches!(code, ErrorCode::ProtocolViolation | ErrorCode::SystemMismatch | ErrorCode::UnsupportedVersion) {
            r.metrics.protocol_violations.inc();
        }
        warn!(message = "Refused an agent session.", reason = code.as_str(), detail = message, system_id = %self.system_id);
        self.send_final_error(send, ErrorFrame::new(code, message)).await;
    }

    /// Sends one error frame and closes once the peer has read it (or after a short grace period): dropping the
    /// connection right away could discard the frame before it is delivered.
    async fn send_final_error(&self, mut send: quinn::SendStream, error: ErrorFrame) {
        let _ = send.write_all(&Message::Error(error).encode()).await;
        finish_and_close(send, &self.connection, close_code::PROTOCOL_ERROR).await;
    }
}

/// Releases a session slot when the session ends.
struct SessionSlot<'a>(&'a AtomicUsize);

impl Drop for SessionSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn write_loop(
    mut send: quinn::SendStream,
    mut queue: mpsc::Receiver<Outgoing>,
    window: Arc<Mutex<ReceiveWindow>>,
    receiver: Arc<Receiver>,
    connection: quinn::Connection,
    system_id: String,
) {
    let metrics = &receiver.metrics;
    while let Some(outgoing) = queue.recv().await {
        let (frames, close) = match outgoing {
            Outgoing::Frame(frame) => (vec![frame], None),
            Outgoing::Durable { seq, records, durable } => match durable.await {
                Ok(Ok(())) => {
                    metrics.batches_acked.inc();
                    metrics.records_acked.add(records);
                    window.lock().unwrap_or_else(|p| p.into_inner()).on_completed();
                    (vec![Message::Ack { through: seq }.encode()], None)
                }
                Ok(Err(e)) => {
                    metrics.storage_failures.inc();
                    let error = ErrorFrame {
                        code: ErrorCode::StorageFailure,
                        batch_seq: Some(seq),
                        retry_after_ms: Some(5000),
                        message: e.to_string(),
                    };
                    (vec![], Some(error))
                }
                Err(_) => (vec![], Some(ErrorFrame::new(ErrorCode::StorageFailure, "write-ahead log stopped"))),
            },
            Outgoing::Rejected { seq, error } => {
                window.lock().unwrap_or_else(|p| p.into_inner()).on_completed();
                (vec![Message::Error(error).encode(), Message::Ack { through: seq }.encode()], None)
            }
            Outgoing::Close(error) => (vec![], Some(error)),
        };
        for frame in frames {
            if send.write_all(&frame).await.is_err() {
                return;
            }
        }
        if let Some(error) = close {
            let _ = send.write_all(&Message::Error(error).encode()).await;
            finish_and_close(send, &connection, close_code::DONE).await;
            return;
        }
        // Admission control: while the log has a long queue, agents get credit back more slowly.
        let admit = receiver.wal.queued() < receiver.wal_queue_soft_limit();
        let grant = window.lock().unwrap_or_else(|p| p.into_inner()).take_grant(admit);
        if let Some(batches) = grant
            && send.write_all(&Message::Credit { batches }.encode()).await.is_err()
        {
            return;
        }
    }
    let _ = send.finish();
    debug!(message = "Session writer finished.", %system_id);
}

impl Receiver {
    fn wal_queue_soft_limit(&self) -> usize {
        // Half the queue: past that the log is the bottleneck and more in-flight batches only add latency.
        (self.config.credit_window as usize).max(8).max(self.wal_queue_depth() / 2)
    }

    fn wal_queue_depth(&self) -> usize {
        self.wal.capacity()
    }
}

/// Ends the stream and closes the connection once the peer has read everything (or after a grace period):
/// closing at once could discard the last frames before they are delivered.
async fn finish_and_close(mut send: quinn::SendStream, connection: &quinn::Connection, code: u32) {
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    connection.close(code.into(), b"");
}

/// Reads one message; `Ok(None)` at a clean end of stream.
async fn read_message(recv: &mut quinn::RecvStream) -> Result<Option<Message>, FrameError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(n)) => {
            return Err(FrameError::Truncated { missing: FRAME_HEADER_LEN - n });
        }
        Err(quinn::ReadExactError::ReadError(_)) => return Ok(None),
    }
    let header = FrameHeader::parse(&header, DEFAULT_MAX_FRAME_LEN)?;
    if header.frame_type == FrameType::Batch && header.body_len >= BATCH_HEAD_LEN {
        return read_batch(recv, &header).await;
    }
    let mut body = vec![0u8; header.body_len];
    match recv.read_exact(&mut body).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(n)) => {
            return Err(FrameError::Truncated { missing: header.body_len - n });
        }
        Err(quinn::ReadExactError::ReadError(_)) => return Ok(None),
    }
    header.verify(&body)?;
    Message::decode(header.frame_type, &body).map(Some)
}

/// Reads a batch frame's body as its head and its payload, so that the payload lands in its own buffer once
/// (no zero-filling, no copy out of a body buffer): batches are nearly all the bytes a receiver reads.
async fn read_batch(recv: &mut quinn::RecvStream, header: &FrameHeader) -> Result<Option<Message>, FrameError> {
    let mut head = [0u8; BATCH_HEAD_LEN];
    match recv.read_exact(&mut head).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(n)) => {
            return Err(FrameError::Truncated { missing: header.body_len - n });
        }
        Err(quinn::ReadExactError::ReadError(_)) => return Ok(None),
    }
    let payload_len = header.body_len - BATCH_HEAD_LEN;
    let mut payload = Vec::with_capacity(payload_len);
    while payload.len() < payload_len {
        match recv.read_chunk(payload_len - payload.len(), true).await {
            Ok(Some(chunk)) => payload.extend_from_slice(&chunk.bytes),
            Ok(None) => return Err(FrameError::Truncated { missing: payload_len - payload.len() }),
            Err(_) => return Ok(None),
        }
    }
    header.verify_split(&head, &payload)?;
    Message::decode_batch_parts(&head, payload).map(Some)
}
