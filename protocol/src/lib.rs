//! The wire protocol between the akosha agent and the aggregator, without any I/O.
//!
//! Like `quinn-proto`, this crate is a set of pure functions and small state machines: bytes come in through
//! [`FrameDecoder::push`], typed [`Message`]s come out of [`FrameDecoder::next_message`], and
//! [`Message::encode`] turns a message back into bytes. Time, sockets and tasks belong to the callers, which
//! makes every part of the protocol testable in memory and fuzzable (`fuzz/`).
//!
//! ```text
//!  agent                                         aggregator
//!    │ ── Hello {versions, system id, resume} ──▶ │   (first frame of the stream)
//!    │ ◀── Welcome {version, credit, durable} ─── │   or Error {code, retry_after}
//!    │ ── Batch {seq, records…} ────────────────▶ │   at most `credit` unacked batches in flight
//!    │ ◀── Ack {through seq} ───────────────────── │   only after the batch is durable (WAL fsync)
//!    │ ◀── Credit {n} ──────────────────────────── │   flow control, admission control
//!    │ ── Heartbeat / ◀── HeartbeatAck ─────────── │
//!    │ ◀── Error {code, batch, message} ────────── │   typed; fatal codes close the stream
//! ```

#![warn(missing_docs)]

mod compression;
pub mod exposition;
mod flow;
mod frame;
mod message;
mod record;
mod record_codec;
pub mod settings;
mod wire;

pub use compression::{Codec, CompressionError};
pub use flow::{FlowError, ReceiveWindow, SendWindow};
pub use frame::{
    DEFAULT_MAX_FRAME_LEN, FRAME_HEADER_LEN, FRAME_MAGIC, FrameDecoder, FrameError, FrameHeader, FrameType,
    encode_frame,
};
pub use message::{
    BATCH_HEAD_LEN, Batch, ErrorCode, ErrorFrame, Hello, Message, OutgoingBatch, Welcome, negotiate_version,
};
pub use record::{EMBEDDING_DIM, Record, RecordError, RecordKind, Residency};
pub use record_codec::{PayloadStats, RecordDecodeError, decode_records, encode_record, encode_records, payload_stats};

/// The protocol version this build speaks. Every frame header carries it.
pub const PROTOCOL_VERSION: u8 = 1;

/// The oldest protocol version this build still accepts.
pub const MIN_PROTOCOL_VERSION: u8 = 1;

/// TLS application protocol name negotiated by agent and aggregator (ALPN).
pub const ALPN: &[u8] = b"akosha/1";

/// Upper bound on the uncompressed size of one batch, so a small compressed frame cannot expand without limit.
pub const MAX_BATCH_UNCOMPRESSED_LEN: usize = 64 * 1024 * 1024;
