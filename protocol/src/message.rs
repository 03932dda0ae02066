//! Typed messages and their frame bodies.

use crate::compression::Codec;
use crate::frame::{FrameError, FrameType, encode_frame};
use crate::wire::{Reader, WireError, WriteExt};
use crate::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Opens a session (agent → aggregator).
    Hello(Hello),
    /// Accepts a session (aggregator → agent).
    Welcome(Welcome),
    /// Carries records (agent → aggregator).
    Batch(Batch),
    /// All batches with `seq <= through` are durable (aggregator → agent).
    Ack {
        /// Highest durable batch sequence number of this session.
        through: u64,
    },
    /// The agent may send `batches` more batches (aggregator → agent).
    Credit {
        /// Additional batches.
        batches: u32,
    },
    /// Liveness probe; the peer answers with the same nonce.
    Heartbeat {
        /// Echoed back.
        nonce: u64,
    },
    /// Answer to [`Message::Heartbeat`].
    HeartbeatAck {
        /// The probe's nonce.
        nonce: u64,
    },
    /// A typed error.
    Error(ErrorFrame),
    /// Orderly end: the sender will send nothing more of substance.
    Goodbye {
        /// Why.
        reason: String,
    },
}

/// First frame of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Oldest protocol version the agent speaks.
    pub min_version: u8,
    /// Newest protocol version the agent speaks.
    pub max_version: u8,
    /// Agent software version, for logs and status.
    pub agent_version: String,
    /// The system id the agent believes it is (must match its certificate).
    pub system_id: String,
    /// Identity of the agent's buffer; changes when the buffer is recreated.
    pub buffer_epoch: u64,
    /// Buffer sequence number of the oldest record the agent still holds unacknowledged.
    pub resume_from: u64,
}

/// The aggregator's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// Negotiated protocol version.
    pub version: u8,
    /// Aggregator software version.
    pub server_version: String,
    /// The system id taken from the agent's certificate.
    pub system_id: String,
    /// Batches the agent may send before the first credit grant.
    pub credit: u32,
    /// Largest uncompressed batch payload the aggregator accepts.
    pub max_batch_bytes: u32,
    /// Highest buffer sequence number of this buffer epoch the aggregator already stored durably, if any; the
    /// agent may drop records up to it without sending them again.
    pub durable_through: Option<u64>,
    /// How often the aggregator expects a heartbeat when idle.
    pub heartbeat_interval_ms: u32,
}

/// Records for the aggregator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Per-session sequence number, starting at 1.
    pub seq: u64,
    /// Buffer sequence number of the first record.
    pub first_record: u64,
    /// Buffer sequence number of the last record.
    pub last_record: u64,
    /// Number of records in the payload.
    pub record_count: u32,
    /// Compression of the payload.
    pub codec: Codec,
    /// Size of the payload once decompressed.
    pub uncompressed_len: u32,
    /// Records encoded with [`crate::encode_records`], then compressed with `codec`.
    pub payload: Vec<u8>,
}

/// A batch about to be sent, its payload not compressed yet: encoded by [`OutgoingBatch::encode`] into the same
/// frame as [`Message::Batch`], compressing straight into the frame.
#[derive(Debug, Clone, Copy)]
pub struct OutgoingBatch<'a> {
    /// Per-session sequence number, starting at 1.
    pub seq: u64,
    /// Buffer sequence number of the first record.
    pub first_record: u64,
    /// Buffer sequence number of the last record.
    pub last_record: u64,
    /// Number of records in the payload.
    pub record_count: u32,
    /// How to compress the payload.
    pub codec: Codec,
    /// Records encoded with [`crate::encode_records`].
    pub records: &'a [u8],
}

impl OutgoingBatch<'_> {
    /// The complete frame.
    pub fn encode(&self) -> Vec<u8> {
        // Room for the worst case, so that the frame never moves while the payload is compressed into it.
        let hint = BATCH_HEAD_LEN + self.codec.compressed_bound(self.records.len());
        encode_frame(FrameType::Batch, hint, |out| {
            put_batch_head(out, self.seq, self.first_record, self.last_record, self.record_count, self.codec);
            out.put_u32(u32::try_from(self.records.len()).unwrap_or(u32::MAX));
            self.codec.compress_onto(self.records, out);
        })
    }
}

/// Bytes of a batch body before its payload.
pub const BATCH_HEAD_LEN: usize = 8 + 8 + 8 + 4 + 1 + 1 + 4;

/// A batch body's fields up to `uncompressed_len`.
fn put_batch_head(out: &mut Vec<u8>, seq: u64, first_record: u64, last_record: u64, record_count: u32, codec: Codec) {
    out.put_u64(seq);
    out.put_u64(first_record);
    out.put_u64(last_record);
    out.put_u32(record_count);
    let (tag, level) = codec.to_wire();
    out.put_u8(tag);
    out.put_u8(level as u8);
}

/// A typed error with a stable code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    /// What kind of error.
    pub code: ErrorCode,
    /// The batch it refers to, if any.
    pub batch_seq: Option<u64>,
    /// When the receiver should try again, if it should (milliseconds).
    pub retry_after_ms: Option<u32>,
    /// Human-readable detail.
    pub message: String,
}

/// Stable error codes. `is_fatal` codes close the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// A frame could not be decoded.
    MalformedFrame,
    /// No common protocol version.
    UnsupportedVersion,
    /// A frame exceeded the size cap.
    FrameTooLarge,
    /// The peer broke the protocol (out-of-order sequence, credit exceeded, unexpected message).
    ProtocolViolation,
    /// A batch's records claim another system than the certificate's; the batch was not stored.
    SystemMismatch,
    /// A batch's payload is invalid (bad compression, bad records); the batch was not stored.
    InvalidBatch,
    /// The aggregator is overloaded; retry after the given delay.
    Overloaded,
    /// The aggregator is shutting down; reconnect after the given delay.
    ShuttingDown,
    /// The aggregator failed to store the batch; retry.
    StorageFailure,
    /// A code from a newer peer.
    Unknown(u16),
}

impl ErrorCode {
    fn to_u16(self) -> u16 {
        match self {
            ErrorCode::MalformedFrame => 1,
            ErrorCode::UnsupportedVersion => 2,
            ErrorCode::FrameTooLarge => 3,
            ErrorCode::ProtocolViolation => 4,
            ErrorCode::SystemMismatch => 5,
            ErrorCode::InvalidBatch => 6,
            ErrorCode::Overloaded => 7,
            ErrorCode::ShuttingDown => 8,
            ErrorCode::StorageFailure => 9,
            ErrorCode::Unknown(v) => v,
        }
    }

    fn from_u16(v: u16) -> Self {
        match v {
            1 => ErrorCode::MalformedFrame,
            2 => ErrorCode::UnsupportedVersion,
            3 => ErrorCode::FrameTooLarge,
            4 => ErrorCode::ProtocolViolation,
            5 => ErrorCode::SystemMismatch,
            6 => ErrorCode::InvalidBatch,
            7 => ErrorCode::Overloaded,
            8 => ErrorCode::ShuttingDown,
            9 => ErrorCode::StorageFailure,
            other => ErrorCode::Unknown(other),
        }
    }

    /// Stable label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MalformedFrame => "malformed_frame",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::ProtocolViolation => "protocol_violation",
            ErrorCode::SystemMismatch => "system_mismatch",
            ErrorCode::InvalidBatch => "invalid_batch",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::StorageFailure => "storage_failure",
            ErrorCode::Unknown(_) => "unknown",
        }
    }

    /// Whether the batch the error names can never be accepted as sent (retrying it is pointless).
    pub fn is_permanent_rejection(self) -> bool {
        matches!(self, ErrorCode::SystemMismatch | ErrorCode::InvalidBatch)
    }

    /// Whether the session is over after this error.
    pub fn is_fatal(self) -> bool {
        !self.is_permanent_rejection()
    }
}

impl From<&FrameError> for ErrorCode {
    fn from(e: &FrameError) -> Self {
        match e {
            FrameError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            _ => ErrorCode::MalformedFrame,
        }
    }
}

/// Picks the protocol version for a session, or says why there is none.
pub fn negotiate_version(hello: &Hello) -> Result<u8, ErrorFrame> {
    let version = hello.max_version.min(PROTOCOL_VERSION);
    if version < hello.min_version || version < MIN_PROTOCOL_VERSION {
        return Err(ErrorFrame {
            code: ErrorCode::UnsupportedVersion,
            batch_seq: None,
            retry_after_ms: None,
            message: format!(
                "agent speaks protocol {}..={}, aggregator speaks {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}",
                hello.min_version, hello.max_version
            ),
        });
    }
    Ok(version)
}

impl Message {
    /// The frame type this message travels in.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Message::Hello(_) => FrameType::Hello,
            Message::Welcome(_) => FrameType::Welcome,
            Message::Batch(_) => FrameType::Batch,
            Message::Ack { .. } => FrameType::Ack,
            Message::Credit { .. } => FrameType::Credit,
            Message::Heartbeat { .. } => FrameType::Heartbeat,
            Message::HeartbeatAck { .. } => FrameType::HeartbeatAck,
            Message::Error(_) => FrameType::Error,
            Message::Goodbye { .. } => FrameType::Goodbye,
        }
    }

    /// Encodes the message as one complete frame.
    pub fn encode(&self) -> Vec<u8> {
        let hint = match self {
            Message::Batch(b) => BATCH_HEAD_LEN + b.payload.len(),
            _ => 64,
        };
        encode_frame(self.frame_type(), hint, |out| self.encode_body(out))
    }

    fn encode_body(&self, out: &mut Vec<u8>) {
        match self {
            Message::Hello(h) => {
                out.put_u8(h.min_version);
                out.put_u8(h.max_version);
                out.put_str(&h.agent_version);
                out.put_str(&h.system_id);
                out.put_u64(h.buffer_epoch);
                out.put_u64(h.resume_from);
            }
            Message::Welcome(w) => {
                out.put_u8(w.version);
                out.put_str(&w.server_version);
                out.put_str(&w.system_id);
                out.put_u32(w.credit);
                out.put_u32(w.max_batch_bytes);
                put_opt_u64(out, w.durable_through);
                out.put_u32(w.heartbeat_interval_ms);
            }
            Message::Batch(b) => {
                put_batch_head(out, b.seq, b.first_record, b.last_record, b.record_count, b.codec);
                out.put_u32(b.uncompressed_len);
                out.extend_from_slice(&b.payload);
            }
            Message::Ack { through } => out.put_u64(*through),
            Message::Credit { batches } => out.put_u32(*batches),
            Message::Heartbeat { nonce } | Message::HeartbeatAck { nonce } => out.put_u64(*nonce),
            Message::Error(e) => {
                out.put_u16(e.code.to_u16());
                put_opt_u64(out, e.batch_seq);
                out.put_u32(e.retry_after_ms.unwrap_or(0));
                out.put_str(&e.message);
            }
            Message::Goodbye { reason } => out.put_str(reason),
        }
    }

    /// Decodes a frame body already checked by the framing layer.
    pub fn decode(frame_type: FrameType, body: &[u8]) -> Result<Message, FrameError> {
        let malformed = |e: WireError| FrameError::Malformed { frame: frame_type, reason: e.to_string() };
        let mut rd = Reader::new(body);
        let message = Self::decode_body(frame_type, &mut rd).map_err(malformed)?;
        // A batch's payload takes the rest of the body; every other message must end exactly.
        if !rd.is_empty() {
            return Err(FrameError::Malformed {
                frame: frame_type,
                reason: format!("{} unexpected bytes after the message", rd.remaining()),
            });
        }
        Ok(message)
    }

    /// Decodes a batch frame whose body was read in two parts: its first [`BATCH_HEAD_LEN`] bytes and the
    /// payload, which the batch takes over without a copy. The frame's checksum must already have been verified
    /// over both ([`crate::FrameHeader::verify_split`]).
    pub fn decode_batch_parts(head: &[u8; BATCH_HEAD_LEN], payload: Vec<u8>) -> Result<Message, FrameError> {
        match Message::decode(FrameType::Batch, head)? {
            Message::Batch(batch) => Ok(Message::Batch(Batch { payload, ..batch })),
            other => Err(FrameError::Malformed {
                frame: FrameType::Batch,
                reason: format!("decoded as {:?}", other.frame_type()),
            }),
        }
    }

    fn decode_body(frame_type: FrameType, rd: &mut Reader<'_>) -> Result<Message, WireError> {
        Ok(match frame_type {
            FrameType::Hello => Message::Hello(Hello {
                min_version: rd.u8("min_version")?,
                max_version: rd.u8("max_version")?,
                agent_version: rd.string("agent_version")?,
                system_id: rd.string("system_id")?,
                buffer_epoch: rd.u64("buffer_epoch")?,
                resume_from: rd.u64("resume_from")?,
            }),
            FrameType::Welcome => Message::Welcome(Welcome {
                version: rd.u8("version")?,
                server_version: rd.string("server_version")?,
                system_id: rd.string("system_id")?,
                credit: rd.u32("credit")?,
                max_batch_bytes: rd.u32("max_batch_bytes")?,
                durable_through: opt_u64(rd, "durable_through")?,
                heartbeat_interval_ms: rd.u32("heartbeat_interval_ms")?,
            }),
            FrameType::Batch => {
                let seq = rd.u64("seq")?;
                let first_record = rd.u64("first_record")?;
                let last_record = rd.u64("last_record")?;
                let record_count = rd.u32("record_count")?;
                let tag = rd.u8("codec")?;
                let level = rd.u8("codec level")? as i8;
                let codec = Codec::from_wire(tag, level).map_err(|_| Reader::invalid("codec", "unknown codec"))?;
                let uncompressed_len = rd.u32("uncompressed_len")?;
                if last_record < first_record {
                    return Err(Reader::invalid("last_record", "smaller than first_record"));
                }
                let payload = rd.bytes(rd.remaining(), "payload")?.to_vec();
                Message::Batch(Batch { seq, first_record, last_record, record_count, codec, uncompressed_len, payload })
            }
            FrameType::Ack => Message::Ack { through: rd.u64("through")? },
            FrameType::Credit => Message::Credit { batches: rd.u32("batches")? },
            FrameType::Heartbeat => Message::Heartbeat { nonce: rd.u64("nonce")? },
            FrameType::HeartbeatAck => Message::HeartbeatAck { nonce: rd.u64("nonce")? },
            FrameType::Error => Message::Error(ErrorFrame {
                code: ErrorCode::from_u16(rd.u16("code")?),
                batch_seq: opt_u64(rd, "batch_seq")?,
                retry_after_ms: Some(rd.u32("retry_after_ms")?).filter(|ms| *ms > 0),
                message: rd.string("message")?,
            }),
            FrameType::Goodbye => Message::Goodbye { reason: rd.string("reason")? },
        })
    }
}

fn put_opt_u64(out: &mut Vec<u8>, v: Option<u64>) {
    match v {
        Some(v) => {
            out.put_u8(1);
            out.put_u64(v);
        }
        None => out.put_u8(0),
    }
}

fn opt_u64(rd: &mut Reader<'_>, field: &'static str) -> Result<Option<u64>, WireError> {
    match rd.u8(field)? {
        0 => Ok(None),
        1 => rd.u64(field).map(Some),
        _ => Err(Reader::invalid(field, "option tag is neither 0 nor 1")),
    }
}

impl ErrorFrame {
    /// An error frame without batch or retry hint.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, batch_seq: None, retry_after_ms: None, message: message.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FrameDecoder;
    use proptest::prelude::*;

    fn arb_message() -> impl Strategy<Value = Message> {
        let s = || "[ -~]{0,24}";
        prop_oneof![
            (any::<u8>(), any::<u8>(), s(), s(), any::<u64>(), any::<u64>()).prop_map(|(a, b, c, d, e, f)| {
                Message::Hello(Hello {
                    min_version: a,
                    max_version: b,
                    agent_version: c,
                    system_id: d,
                    buffer_epoch: e,
                    resume_from: f,
                })
            }),
            (any::<u8>(), s(), s(), any::<u32>(), any::<u32>(), any::<Option<u64>>(), any::<u32>()).prop_map(
                |(version, server_version, system_id, credit, max_batch_bytes, durable_through, hb)| {
                    Message::Welcome(Welcome {
                        version,
                        server_version,
                        system_id,
                        credit,
                        max_batch_bytes,
                        durable_through,
                        heartbeat_interval_ms: hb,
                    })
                }
            ),
            (
                any::<u64>(),
                0u64..1000,
                0u64..1000,
                any::<u32>(),
                0usize..4,
                any::<u32>(),
                proptest::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(seq, a, n, record_count, codec, uncompressed_len, payload)| {
                    let codec = [Codec::None, Codec::Lz4, Codec::Zstd(1), Codec::Zstd(19)][codec];
                    Message::Batch(Batch {
                        seq,
                        first_record: a,
                        last_record: a + n,
                        record_count,
                        codec,
                        uncompressed_len,
                        payload,
                    })
                }),
            any::<u64>().prop_map(|through| Message::Ack { through }),
            any::<u32>().prop_map(|batches| Message::Credit { batches }),
            any::<u64>().prop_map(|nonce| Message::Heartbeat { nonce }),
            any::<u64>().prop_map(|nonce| Message::HeartbeatAck { nonce }),
            (1u16..12, any::<Option<u64>>(), proptest::option::of(1u32..), s()).prop_map(
                |(code, batch_seq, retry_after_ms, message)| {
                    Message::Error(ErrorFrame { code: ErrorCode::from_u16(code), batch_seq, retry_after_ms, message })
                }
            ),
            s().prop_map(|reason| Message::Goodbye { reason }),
        ]
    }

    proptest! {
        #[test]
        fn messages_round_trip_through_frames(messages in proptest::collection::vec(arb_message(), 1..6), chunk in 1usize..64) {
            let stream: Vec<u8> = messages.iter().flat_map(Message::encode).collect();
            let mut decoder = FrameDecoder::new(1 << 20);
            let mut decoded = Vec::new();
            for piece in stream.chunks(chunk) {
                decoder.push(piece);
                while let Some(m) = decoder.next_message().unwrap() {
                    decoded.push(m);
                }
            }
            prop_assert_eq!(decoded, messages);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256), frame_type in 1u8..10) {
            let mut d = FrameDecoder::new(1 << 16);
            d.push(&bytes);
            let _ = d.next_message();
            // Also valid framing around a garbage body.
            let ft = [FrameType::Hello, FrameType::Welcome, FrameType::Batch, FrameType::Ack, FrameType::Credit,
                FrameType::Heartbeat, FrameType::HeartbeatAck, FrameType::Error, FrameType::Goodbye][usize::from(frame_type - 1)];
            let _ = Message::decode(ft, &bytes);
            if let Some((head, payload)) = bytes.split_first_chunk::<BATCH_HEAD_LEN>() {
                let _ = Message::decode_batch_parts(head, payload.to_vec());
            }
        }
    }

    proptest! {
        #[test]
        fn outgoing_batches_encode_like_batches_and_split_reads_decode_them(
            records in proptest::collection::vec(any::<u8>(), 0..3000),
            repeat in 1usize..8,
            codec in 0usize..4,
            seq in any::<u64>(),
        ) {
            // Repetition makes the payload compressible, as records are.
            let records: Vec<u8> = records.iter().copied().cycle().take(records.len() * repeat).collect();
            let codec = [Codec::None, Codec::Lz4, Codec::Zstd(1), Codec::Zstd(19)][codec];
            let outgoing = OutgoingBatch { seq, first_record: 5, last_record: 9, record_count: 5, codec, records: &records };
            let batch = Batch {
                seq,
                first_record: 5,
                last_record: 9,
                record_count: 5,
                codec,
                uncompressed_len: records.len() as u32,
                payload: codec.compress(&records),
            };
            let frame = outgoing.encode();
            prop_assert_eq!(&frame, &Message::Batch(batch.clone()).encode());
            // Compressed in place: the frame was never reallocated (a move would copy the whole payload).
            let bound = crate::FRAME_HEADER_LEN + BATCH_HEAD_LEN + codec.compressed_bound(records.len());
            prop_assert!(frame.capacity() <= bound, "capacity {} > bound {}", frame.capacity(), bound);
            let header = crate::FrameHeader::parse(frame[..crate::FRAME_HEADER_LEN].try_into().unwrap(), 1 << 24).unwrap();
            let body = &frame[crate::FRAME_HEADER_LEN..];
            let (head, payload) = body.split_at(BATCH_HEAD_LEN);
            header.verify_split(head, payload).unwrap();
            let decoded = Message::decode_batch_parts(head.try_into().unwrap(), payload.to_vec()).unwrap();
            prop_assert_eq!(decoded, Message::Batch(batch));
        }
    }

    #[test]
    fn version_negotiation() {
        let hello = |min, max| Hello {
            min_version: min,
            max_version: max,
            agent_version: "t".into(),
            system_id: "s".into(),
            buffer_epoch: 0,
            resume_from: 0,
        };
        assert_eq!(negotiate_version(&hello(1, 5)), Ok(PROTOCOL_VERSION));
        let err = negotiate_version(&hello(2, 3)).unwrap_err();
        assert_eq!(err.code, ErrorCode::UnsupportedVersion);
        assert!(err.message.contains("2..=3"));
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let mut frame = Message::Ack { through: 3 }.encode();
        frame.push(0);
        let body = &frame[crate::FRAME_HEADER_LEN..];
        assert!(matches!(Message::decode(FrameType::Ack, body), Err(FrameError::Malformed { .. })));
    }
}
