//! The agent's counters; the text format lives in `akosha_protocol::exposition`.

pub use akosha_protocol::exposition::{Counter, Exposition};

/// Ingest counters.
#[derive(Debug, Default)]
pub struct IngestCounters {
    /// Records stored in a buffer.
    pub accepted_records: Counter,
    /// Requests refused because a line was invalid.
    pub rejected_requests: Counter,
    /// Invalid lines.
    pub rejected_lines: Counter,
    /// Requests refused because the buffer was full.
    pub full_rejections: Counter,
}
