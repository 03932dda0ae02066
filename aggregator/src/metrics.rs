//! The aggregator's counters; the text format lives in `akosha_protocol::exposition`.

use std::collections::HashMap;
use std::sync::Mutex;

pub use akosha_protocol::exposition::{Counter, Exposition};

/// Receive-path counters.
#[derive(Debug, Default)]
pub struct ReceiverMetrics {
    /// Sessions established.
    pub sessions_opened: Counter,
    /// Connections whose TLS handshake failed (unknown CA, no client certificate, …).
    pub tls_failures: Counter,
    /// Sessions refused by admission control.
    pub sessions_refused: Counter,
    /// Streams closed because a frame could not be decoded.
    pub malformed_frames: Counter,
    /// Protocol violations (order, credit, unexpected frames, wrong Hello).
    pub protocol_violations: Counter,
    /// Batches acknowledged (durable).
    pub batches_acked: Counter,
    /// Records acknowledged (durable).
    pub records_acked: Counter,
    /// Payload bytes received.
    pub bytes_received: Counter,
    /// Batches rejected because records claimed another system.
    pub rejected_system_mismatch: Counter,
    /// Batches rejected because the payload was invalid.
    pub rejected_invalid: Counter,
    /// Batches that failed to become durable.
    pub storage_failures: Counter,
    /// Live sessions.
    pub active_sessions: Counter,
    /// Sessions ended.
    pub sessions_closed: Counter,
    /// Last time each system was heard from (µs since the epoch).
    pub last_seen: Mutex<HashMap<String, i64>>,
}

impl ReceiverMetrics {
    /// Notes that `system_id` is alive now.
    pub fn seen(&self, system_id: &str) {
        let now = jiff::Timestamp::now().as_microsecond();
        let mut map = self.last_seen.lock().unwrap_or_else(|p| p.into_inner());
        match map.get_mut(system_id) {
            Some(t) => *t = now,
            None => {
                map.insert(system_id.to_owned(), now);
            }
        }
    }

    /// Sessions currently open.
    pub fn active(&self) -> u64 {
        self.sessions_opened.get().saturating_sub(self.sessions_closed.get())
    }
}
