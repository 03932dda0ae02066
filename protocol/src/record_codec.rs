//! Compact binary encoding of records, used for batch payloads and for the agent buffer.
//!
//! ```text
//! records  := (varint body_len, body)*            count travels beside the payload
//! body     := u8 format=1, u8 kind, str system_id, str id, i64 ts, u16 present,
//!             [str project] [str namespace] [str category] [str text] [str name]
//!             [varint dim, f32 × dim embedding] [str metadata] [f64 importance] [u8 residency]
//!             [str from] [str to] [str relation_type] [f64 weight] [f64 value],
//!             varint n_tags, str × n_tags
//! str      := varint len, UTF-8 bytes
//! ```
//!
//! Floats are stored as their IEEE bits, so embeddings survive bit-exact. Decoding checks every length against
//! the bytes that remain and validates the decoded record, so garbage is an error, never a panic or a huge
//! allocation.

use crate::record::{Record, RecordError, RecordKind, Residency};
use crate::wire::{Reader, WireError, WriteExt};

const RECORD_FORMAT: u8 = 1;

const HAS_PROJECT: u16 = 1 << 0;
const HAS_NAMESPACE: u16 = 1 << 1;
const HAS_CATEGORY: u16 = 1 << 2;
const HAS_TEXT: u16 = 1 << 3;
const HAS_NAME: u16 = 1 << 4;
const HAS_EMBEDDING: u16 = 1 << 5;
const HAS_METADATA: u16 = 1 << 6;
const HAS_IMPORTANCE: u16 = 1 << 7;
const HAS_RESIDENCY: u16 = 1 << 8;
const HAS_FROM: u16 = 1 << 9;
const HAS_TO: u16 = 1 << 10;
const HAS_RELATION_TYPE: u16 = 1 << 11;
const HAS_WEIGHT: u16 = 1 << 12;
const HAS_VALUE: u16 = 1 << 13;
const KNOWN_FLAGS: u16 = (1 << 14) - 1;

/// A record payload that could not be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RecordDecodeError {
    /// The bytes do not follow the record layout.
    #[error("record {index}: {source}")]
    Malformed {
        /// Position of the record in the payload.
        index: usize,
        /// What was wrong.
        #[source]
        source: MalformedRecord,
    },
    /// The record decoded but breaks the data model.
    #[error("record {index}: {source}")]
    Invalid {
        /// Position of the record in the payload.
        index: usize,
        /// The rule it breaks.
        #[source]
        source: RecordError,
    },
    /// The payload holds a different number of records than declared.
    #[error("payload declares {declared} records but holds {actual}")]
    CountMismatch {
        /// Declared count.
        declared: usize,
        /// Records found (or `declared` + 1 when bytes trail the last one).
        actual: usize,
    },
}

/// The layout error inside a [`RecordDecodeError::Malformed`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct MalformedRecord(String);

impl From<WireError> for MalformedRecord {
    fn from(e: WireError) -> Self {
        MalformedRecord(e.to_string())
    }
}

/// Appends one length-prefixed record to `out`.
pub fn encode_record(record: &Record, out: &mut Vec<u8>) {
    // The exact size first, so the body is written once, straight into `out` behind its length prefix.
    let len = body_len(record);
    out.reserve(len + varint_len(len as u64));
    out.put_varint(len as u64);
    let start = out.len();
    encode_body(record, out);
    debug_assert_eq!(out.len() - start, len, "body_len disagrees with encode_body");
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// The size `encode_body` writes for `r`.
fn body_len(r: &Record) -> usize {
    let str_len = |s: &str| varint_len(s.len() as u64) + s.len();
    let opt_str = |s: &Option<String>| s.as_deref().map_or(0, str_len);
    let mut len = 1 + 1 + str_len(&r.system_id) + str_len(&r.id) + 8 + 2;
    len += [&r.project, &r.namespace, &r.category, &r.text, &r.name].into_iter().map(opt_str).sum::<usize>();
    len += r.embedding.as_ref().map_or(0, |e| varint_len(e.len() as u64) + 4 * e.len());
    len += opt_str(&r.metadata);
    len += 8 * usize::from(r.importance.is_some()) + usize::from(r.residency.is_some());
    len += [&r.from, &r.to, &r.relation_type].into_iter().map(opt_str).sum::<usize>();
    len += 8 * (usize::from(r.weight.is_some()) + usize::from(r.value.is_some()));
    len + varint_len(r.tags.len() as u64) + r.tags.iter().map(|t| str_len(t)).sum::<usize>()
}

/// Encodes records into one payload.
pub fn encode_records<'a>(records: impl IntoIterator<Item = &'a Record>) -> Vec<u8> {
    let mut out = Vec::new();
    for record in records {
        encode_record(record, &mut out);
    }
    out
}

/// Decodes exactly `count` records from `payload` and validates each one.
pub fn decode_records(payload: &[u8], count: usize) -> Result<Vec<Record>, RecordDecodeError> {
    let mut reader = Reader::new(payload);
    // Each record takes at least a few bytes: never trust `count` for the allocation.
    let mut records = Vec::with_capacity(count.min(payload.len() / 8));
    for index in 0..count {
        if reader.is_empty() {
            return Err(RecordDecodeError::CountMismatch { declared: count, actual: index });
        }
        let malformed = |e: WireError| RecordDecodeError::Malformed { index, source: e.into() };
        let len = reader.len("record length", u32::MAX as u64, 1).map_err(malformed)?;
        let body = reader.bytes(len, "record body").map_err(malformed)?;
        let record = decode_body(body).map_err(malformed)?;
        record.validate().map_err(|source| RecordDecodeError::Invalid { index, source })?;
        records.push(record);
    }
    if !reader.is_empty() {
        return Err(RecordDecodeError::CountMismatch { declared: count, actual: count + 1 });
    }
    Ok(records)
}

/// Sizes of an encoded payload's records, read without decoding them (what the compression policy is told).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PayloadStats {
    /// Records read.
    pub records: u32,
    /// Bytes of record text.
    pub text_bytes: u64,
    /// Bytes of embeddings (4 per dimension).
    pub embedding_bytes: u64,
}

/// Walks `payload` up to each record's embedding, allocating nothing. Stops quietly at the first malformed
/// record: the stats only steer a codec choice, and the payload is checked in full where it is decoded.
pub fn payload_stats(payload: &[u8]) -> PayloadStats {
    let mut stats = PayloadStats::default();
    let mut reader = Reader::new(payload);
    while !reader.is_empty() {
        let Ok(len) = reader.len("record length", u32::MAX as u64, 1) else { break };
        let Ok(body) = reader.bytes(len, "record body") else { break };
        let Ok((text, embedding)) = body_sizes(body) else { break };
        stats.records += 1;
        stats.text_bytes += text;
        stats.embedding_bytes += embedding;
    }
    stats
}

fn body_sizes(body: &[u8]) -> Result<(u64, u64), WireError> {
    let mut rd = Reader::new(body);
    rd.u8("format")?;
    rd.u8("kind")?;
    rd.str("system_id")?;
    rd.str("id")?;
    rd.i64("ts")?;
    let flags = rd.u16("flags")?;
    let mut text = 0;
    for bit in [HAS_PROJECT, HAS_NAMESPACE, HAS_CATEGORY, HAS_TEXT, HAS_NAME] {
        if flags & bit != 0 {
            let s = rd.str("field")?;
            if bit == HAS_TEXT {
                text = s.len() as u64;
            }
        }
    }
    let embedding = if flags & HAS_EMBEDDING != 0 { rd.len("embedding", 1 << 20, 4)? as u64 * 4 } else { 0 };
    Ok((text, embedding))
}

fn encode_body(r: &Record, out: &mut Vec<u8>) {
    let mut flags = 0u16;
    let mut flag = |present: bool, bit: u16| {
        if present {
            flags |= bit;
        }
    };
    flag(r.project.is_some(), HAS_PROJECT);
    flag(r.namespace.is_some(), HAS_NAMESPACE);
    flag(r.category.is_some(), HAS_CATEGORY);
    flag(r.text.is_some(), HAS_TEXT);
    flag(r.name.is_some(), HAS_NAME);
    flag(r.embedding.is_some(), HAS_EMBEDDING);
    flag(r.metadata.is_some(), HAS_METADATA);
    flag(r.importance.is_some(), HAS_IMPORTANCE);
    flag(r.residency.is_some(), HAS_RESIDENCY);
    flag(r.from.is_some(), HAS_FROM);
    flag(r.to.is_some(), HAS_TO);
    flag(r.relation_type.is_some(), HAS_RELATION_TYPE);
    flag(r.weight.is_some(), HAS_WEIGHT);
    flag(r.value.is_some(), HAS_VALUE);

    out.put_u8(RECORD_FORMAT);
    out.put_u8(r.kind.tag());
    out.put_str(&r.system_id);
    out.put_str(&r.id);
    out.put_i64(r.ts);
    out.put_u16(flags);
    for s in [&r.project, &r.namespace, &r.category, &r.text, &r.name].into_iter().flatten() {
        out.put_str(s);
    }
    if let Some(embedding) = &r.embedding {
        out.put_varint(embedding.len() as u64);
        // Resize-then-fill compiles to a plain copy on little-endian targets; pushing float by float does not.
        let start = out.len();
        out.resize(start + embedding.len() * 4, 0);
        for (bytes, v) in out[start..].chunks_exact_mut(4).zip(embedding) {
            bytes.copy_from_slice(&v.to_le_bytes());
        }
    }
    if let Some(m) = &r.metadata {
        out.put_str(m);
    }
    if let Some(v) = r.importance {
        out.put_f64(v);
    }
    if let Some(v) = r.residency {
        out.put_u8(v.tag());
    }
    for s in [&r.from, &r.to, &r.relation_type].into_iter().flatten() {
        out.put_str(s);
    }
    for v in [r.weight, r.value].into_iter().flatten() {
        out.put_f64(v);
    }
    out.put_varint(r.tags.len() as u64);
    for tag in &r.tags {
        out.put_str(tag);
    }
}

fn decode_body(body: &[u8]) -> Result<Record, WireError> {
    let mut rd = Reader::new(body);
    let format = rd.u8("format")?;
    if format != RECORD_FORMAT {
        return Err(Reader::invalid("format", "unsupported record format version"));
    }
    let kind = RecordKind::from_tag(rd.u8("kind")?).ok_or_else(|| Reader::invalid("kind", "unknown kind tag"))?;
    let system_id = rd.string("system_id")?;
    let id = rd.string("id")?;
    let ts = rd.i64("ts")?;
    let flags = rd.u16("flags")?;
    if flags & !KNOWN_FLAGS != 0 {
        return Err(Reader::invalid("flags", "unknown optional field"));
    }
    let has = |bit: u16| flags & bit != 0;
    let mut opt_str = |bit: u16, field: &'static str| -> Result<Option<String>, WireError> {
        if has(bit) { rd.string(field).map(Some) } else { Ok(None) }
    };
    let project = opt_str(HAS_PROJECT, "project")?;
    let namespace = opt_str(HAS_NAMESPACE, "namespace")?;
    let category = opt_str(HAS_CATEGORY, "category")?;
    let text = opt_str(HAS_TEXT, "text")?;
    let name = opt_str(HAS_NAME, "name")?;
    let embedding = if has(HAS_EMBEDDING) {
        let dim = rd.len("embedding", 1 << 20, 4)?;
        let mut v = Vec::with_capacity(dim);
        for _ in 0..dim {
            v.push(rd.f32("embedding")?);
        }
        Some(v)
    } else {
        None
    };
    let metadata = if has(HAS_METADATA) { Some(rd.string("metadata")?) } else { None };
    let importance = if has(HAS_IMPORTANCE) { Some(rd.f64("importance")?) } else { None };
    let residency = if has(HAS_RESIDENCY) {
        Some(Residency::from_tag(rd.u8("residency")?).ok_or_else(|| Reader::invalid("residency", "unknown tag"))?)
    } else {
        None
    };
    let from = if has(HAS_FROM) { Some(rd.string("from")?) } else { None };
    let to = if has(HAS_TO) { Some(rd.string("to")?) } else { None };
    let relation_type = if has(HAS_RELATION_TYPE) { Some(rd.string("relation_type")?) } else { None };
    let weight = if has(HAS_WEIGHT) { Some(rd.f64("weight")?) } else { None };
    let value = if has(HAS_VALUE) { Some(rd.f64("value")?) } else { None };
    let n_tags = rd.len("tags", 1 << 16, 1)?;
    let mut tags = Vec::with_capacity(n_tags);
    for _ in 0..n_tags {
        tags.push(rd.string("tags")?);
    }
    if !rd.is_empty() {
        return Err(Reader::invalid("record body", "bytes after the last field"));
    }
    Ok(Record {
        system_id,
        kind,
        id,
        ts,
        project,
        namespace,
        category,
        text,
        name,
        embedding,
        tags,
        metadata,
        importance,
        residency,
        from,
        to,
        relation_type,
        weight,
        value,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::record::EMBEDDING_DIM;
    use proptest::prelude::*;

    #[test]
    fn payload_stats_count_text_and_embeddings_without_decoding() {
        let with = Record {
            system_id: "s".into(),
            id: "1".into(),
            project: Some("p".into()),
            text: Some("hello world".into()),
            name: Some("n".into()),
            embedding: Some(vec![0.5; EMBEDDING_DIM]),
            ..Record::default()
        };
        let without = Record { system_id: "s".into(), id: "2".into(), ..Record::default() };
        let payload = encode_records([&with, &without]);
        let stats = payload_stats(&payload);
        assert_eq!(stats, PayloadStats { records: 2, text_bytes: 11, embedding_bytes: 4 * EMBEDDING_DIM as u64 });
        assert_eq!(payload_stats(&payload[..payload.len() - 3]).records, 1);
        assert_eq!(payload_stats(b"\xff\xff\xff"), PayloadStats::default());
    }

    fn opt_text() -> impl Strategy<Value = Option<String>> {
        proptest::option::of("[a-zA-Z0-9 _é❤-]{0,40}")
    }

    /// Valid records of every kind, with bit patterns of floats preserved.
    pub(crate) fn arb_record() -> impl Strategy<Value = Record> {
        (
            (0usize..5, "[a-z0-9._-]{1,20}", "[a-f0-9-]{1,36}", any::<i64>()),
            (opt_text(), opt_text(), opt_text(), opt_text(), opt_text()),
            proptest::option::of(proptest::collection::vec(-1.0f32..1.0, EMBEDDING_DIM)),
            proptest::collection::vec("[a-z]{1,8}", 0..4),
            proptest::option::of(Just("{\"a\":[1,2,{\"b\":null}]}".to_owned())),
            (proptest::option::of(-1e9f64..1e9), proptest::option::of(0u8..3)),
            ("[a-z]{1,8}", "[a-z]{1,8}", "[a-z_]{1,8}", -1e3f64..1e3),
        )
            .prop_map(
                |(
                    (kind, system_id, id, ts),
                    (project, namespace, category, text, name),
                    embedding,
                    tags,
                    metadata,
                    (importance, residency),
                    (from, to, rel, num),
                )| {
                    let kind = RecordKind::ALL[kind];
                    let mut r = Record {
                        system_id,
                        kind,
                        id,
                        ts,
                        project,
                        namespace,
                        category,
                        text,
                        name,
                        embedding,
                        tags,
                        metadata,
                        importance,
                        residency: residency.and_then(Residency::from_tag),
                        ..Record::default()
                    };
                    match kind {
                        RecordKind::Relation => {
                            r.from = Some(from);
                            r.to = Some(to);
                            r.relation_type = Some(rel);
                            r.weight = Some(num);
                        }
                        RecordKind::Metric => {
                            r.name = Some(from);
                            r.value = Some(num);
                        }
                        _ => {}
                    }
                    r
                },
            )
    }

    proptest! {
        #[test]
        fn records_round_trip(records in proptest::collection::vec(arb_record(), 0..8)) {
            let payload = encode_records(&records);
            let decoded = decode_records(&payload, records.len()).unwrap();
            prop_assert_eq!(&decoded, &records);
            // The length prefix is computed ahead of the body: both must agree on every shape of record.
            for record in &records {
                let mut body = Vec::new();
                encode_body(record, &mut body);
                prop_assert_eq!(body.len(), body_len(record));
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512), count in 0usize..1_000_000) {
            let _ = decode_records(&bytes, count);
        }

        #[test]
        fn truncation_is_an_error(record in arb_record(), cut in 1usize..64) {
            let payload = encode_records([&record]);
            let cut = cut.min(payload.len());
            prop_assert!(decode_records(&payload[..payload.len() - cut], 1).is_err());
        }
    }

    #[test]
    fn varint_lengths_match_what_is_written() {
        for v in [0, 1, 127, 128, 16_383, 16_384, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            out.put_varint(v);
            assert_eq!(varint_len(v), out.len(), "{v}");
        }
    }

    #[test]
    fn count_mismatch_is_reported() {
        let r = Record { system_id: "s".into(), id: "1".into(), ..Record::default() };
        let payload = encode_records([&r, &r]);
        assert!(matches!(
            decode_records(&payload, 3),
            Err(RecordDecodeError::CountMismatch { declared: 3, actual: 2 })
        ));
        assert!(matches!(
            decode_records(&payload, 1),
            Err(RecordDecodeError::CountMismatch { declared: 1, actual: 2 })
        ));
    }

    #[test]
    fn embeddings_are_bit_exact() {
        let mut e = vec![0.0f32; EMBEDDING_DIM];
        e[0] = f32::from_bits(0x3dcc_cccd);
        e[1] = -0.0;
        e[2] = f32::MIN_POSITIVE / 2.0; // subnormal
        let r = Record { system_id: "s".into(), id: "1".into(), embedding: Some(e.clone()), ..Record::default() };
        let back = decode_records(&encode_records([&r]), 1).unwrap().remove(0).embedding.unwrap();
        assert!(back.iter().zip(&e).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
