use super::*;
use akosha_protocol::decode_records;
use proptest::prelude::*;
use std::collections::VecDeque;

fn record(id: u64, text_len: usize) -> Record {
    Record {
        system_id: "host-1".into(),
        id: id.to_string(),
        ts: id as i64,
        text: Some("x".repeat(text_len)),
        ..Record::default()
    }
}

fn config(max_bytes: u64, when_full: WhenFull) -> BufferConfig {
    BufferConfig {
        max_bytes,
        when_full,
        fsync: FsyncPolicy::Batch { window: Duration::ZERO },
        max_chunk_bytes: 600,
        cache_bytes: 1 << 20,
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn ids(batch: &PendingBatch) -> Vec<String> {
    decode_records(&batch.payload, batch.record_count as usize).unwrap().into_iter().map(|r| r.id).collect()
}

#[test]
fn append_send_ack_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let records: Vec<_> = (0..10).map(|i| record(i, 100)).collect();
    {
        let buffer = Buffer::open(dir.path(), config(1 << 20, WhenFull::Block)).unwrap();
        let receipt = rt.block_on(buffer.append(&records, Duration::ZERO)).unwrap();
        assert_eq!(receipt, AppendReceipt { first_seq: 1, records: 10, dropped: 0 });
        assert!(buffer.chunk_keys_for_test().len() > 1, "600-byte chunks split 10 records");
        let batch = buffer.next_batch(4, u64::MAX).unwrap().unwrap();
        assert_eq!(batch.first_record, 1);
        assert_eq!(ids(&batch), (0..batch.record_count as u64).map(|i| i.to_string()).collect::<Vec<_>>());
        buffer.ack(&batch.chunks).unwrap();
        // The rest is taken and never acknowledged: a restart must hand it out again.
        while buffer.next_batch(100, u64::MAX).unwrap().is_some() {}
        assert_eq!(buffer.stats().records, 10 - u64::from(batch.record_count));
    }
    let buffer = Buffer::open(dir.path(), config(1 << 20, WhenFull::Block)).unwrap();
    let stats = buffer.stats();
    assert_eq!(stats.in_flight_chunks, 0);
    assert_eq!(stats.next_seq, 11);
    let mut seen = Vec::new();
    while let Some(batch) = buffer.next_batch(100, u64::MAX).unwrap() {
        seen.extend(ids(&batch));
        buffer.ack(&batch.chunks).unwrap();
    }
    assert_eq!(seen.len() as u64, stats.records);
    assert_eq!(seen.last().unwrap(), "9");
    assert_eq!(buffer.resume_point(), 11);
}

#[test]
fn block_rejects_when_full_and_succeeds_after_ack() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let buffer = Buffer::open(dir.path(), config(1000, WhenFull::Block)).unwrap();
    rt.block_on(buffer.append(&[record(1, 400)], Duration::ZERO)).unwrap();
    rt.block_on(buffer.append(&[record(2, 400)], Duration::ZERO)).unwrap();
    let err = rt.block_on(buffer.append(&[record(3, 400)], Duration::from_millis(20))).unwrap_err();
    assert!(matches!(err, BufferError::Full { .. }), "{err}");
    assert!(matches!(
        rt.block_on(buffer.append(&[record(4, 5000)], Duration::ZERO)),
        Err(BufferError::TooLarge { .. })
    ));
    let batch = buffer.next_batch(1, u64::MAX).unwrap().unwrap();
    buffer.ack(&batch.chunks).unwrap();
    rt.block_on(buffer.append(&[record(3, 400)], Duration::ZERO)).unwrap();
    assert_eq!(buffer.stats().records, 2);
    assert_eq!(buffer.stats().dropped_records, 0);
}

#[test]
fn drop_oldest_evicts_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let buffer = Buffer::open(dir.path(), config(1000, WhenFull::DropOldest)).unwrap();
    for i in 0..5 {
        rt.block_on(buffer.append(&[record(i, 400)], Duration::ZERO)).unwrap();
    }
    let stats = buffer.stats();
    assert_eq!(stats.records, 2);
    assert_eq!(stats.dropped_records, 3);
    let batch = buffer.next_batch(10, u64::MAX).unwrap().unwrap();
    assert_eq!(ids(&batch), vec!["3", "4"]);
}

#[test]
fn corrupted_chunk_is_skipped_counted_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    {
        let buffer = Buffer::open(dir.path(), config(1 << 20, WhenFull::Block)).unwrap();
        for i in 0..3 {
            rt.block_on(buffer.append(&[record(i, 10)], Duration::ZERO)).unwrap();
        }
        buffer.corrupt_chunk_for_test(2);
        buffer.flush().unwrap();
    }
    let buffer = Buffer::open(dir.path(), config(1 << 20, WhenFull::Block)).unwrap();
    assert_eq!(buffer.stats().corrupted_chunks, 1);
    let batch = buffer.next_batch(10, u64::MAX).unwrap().unwrap();
    assert_eq!(ids(&batch), vec!["0", "2"]);
    // Corruption discovered while sending (not at open) is handled the same way.
    rt.block_on(buffer.append(&[record(9, 10)], Duration::ZERO)).unwrap();
    buffer.corrupt_chunk_for_test(4);
    assert!(buffer.next_batch(10, u64::MAX).unwrap().is_none());
    assert_eq!(buffer.stats().corrupted_chunks, 2);
}

#[test]
fn dead_letter_and_skip_through() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let buffer = Buffer::open(dir.path(), config(1 << 20, WhenFull::Block)).unwrap();
    for i in 0..4 {
        rt.block_on(buffer.append(&[record(i, 10)], Duration::ZERO)).unwrap();
    }
    let batch = buffer.next_batch(1, u64::MAX).unwrap().unwrap();
    assert_eq!(buffer.dead_letter(&batch.chunks, "test").unwrap(), 1);
    assert_eq!(buffer.skip_through(3).unwrap(), 2);
    assert_eq!(buffer.stats().records, 1);
    assert_eq!(buffer.stats().dead_letter_records, 1);
    assert_eq!(buffer.resume_point(), 4);
}

#[test]
fn inspect_reads_without_changing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    {
        let buffer = Buffer::open(dir.path(), config(1 << 20, WhenFull::Block)).unwrap();
        for i in 0..4 {
            rt.block_on(buffer.append(&[record(i, 10)], Duration::ZERO)).unwrap();
        }
        let batch = buffer.next_batch(1, u64::MAX).unwrap().unwrap();
        buffer.dead_letter(&batch.chunks, "test").unwrap();
        buffer.corrupt_chunk_for_test(3);
        buffer.flush().unwrap();
    }
    let report = inspect(dir.path()).unwrap();
    assert_eq!((report.chunks, report.records, report.corrupted_chunks), (2, 2, 1));
    assert_eq!(report.seq_range, Some((2, 4)));
    assert_eq!((report.dead_letter_chunks, report.dead_letter_records), (1, 1));
    assert_eq!(report.next_seq, 5);
    // Inspecting twice sees the same: nothing was repaired or removed.
    assert_eq!(inspect(dir.path()).unwrap().corrupted_chunks, 1);
    assert!(inspect(&dir.path().join("missing")).is_err());
}

#[test]
fn always_and_interval_policies_store_records() {
    for fsync in [FsyncPolicy::Always, FsyncPolicy::Interval(Duration::from_millis(10))] {
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        let buffer = Buffer::open(dir.path(), BufferConfig { fsync, ..config(1 << 20, WhenFull::Block) }).unwrap();
        rt.block_on(buffer.append(&[record(1, 10), record(2, 10)], Duration::ZERO)).unwrap();
        assert_eq!(buffer.stats().records, 2);
    }
}

#[derive(Debug, Clone)]
enum Op {
    Append { count: u8, text_len: u16 },
    Take { max_records: u8 },
    AckOldest,
    Release,
    Restart,
    Corrupt { pick: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u8..6, 1u16..300).prop_map(|(count, text_len)| Op::Append { count, text_len }),
        3 => (1u8..8).prop_map(|max_records| Op::Take { max_records }),
        3 => Just(Op::AckOldest),
        1 => Just(Op::Release),
        1 => Just(Op::Restart),
        1 => any::<u8>().prop_map(|pick| Op::Corrupt { pick }),
    ]
}

/// The model: records the buffer must still deliver, in order, and which of them are in flight.
#[derive(Default)]
struct Model {
    /// (chunk key, record ids) of every stored chunk, oldest first.
    chunks: Vec<(u64, Vec<u64>)>,
    in_flight: VecDeque<PendingBatch>,
    next_id: u64,
    corrupted: u64,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random write / take / ack / release / restart / corrupt sequences against a simple model: nothing
    /// accepted is ever lost except the corrupted chunks (which are counted), nothing is delivered out of order,
    /// and a restart hands out everything unacknowledged again.
    #[test]
    fn buffer_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        let open = || Buffer::open(dir.path(), config(1 << 24, WhenFull::Block)).unwrap();
        let mut buffer = open();
        let mut model = Model::default();
        let mut discovered_corruptions = 0;
        for op in ops {
            match op {
                Op::Append { count, text_len } => {
                    let records: Vec<_> = (0..u64::from(count)).map(|i| record(model.next_id + i, text_len.into())).collect();
                    let receipt = rt.block_on(buffer.append(&records, Duration::ZERO)).unwrap();
                    prop_assert_eq!(receipt.records, u64::from(count));
                    // Chunk boundaries are the buffer's business: learn them from its index.
                    let keys = buffer.chunk_keys_for_test();
                    let new_keys: Vec<u64> = keys.into_iter().filter(|k| *k >= receipt.first_seq).collect();
                    for (i, key) in new_keys.iter().enumerate() {
                        let end = new_keys.get(i + 1).copied().unwrap_or(receipt.first_seq + receipt.records);
                        let ids = (*key..end).map(|seq| model.next_id + (seq - receipt.first_seq)).collect();
                        model.chunks.push((*key, ids));
                    }
                    model.next_id += u64::from(count);
                }
                Op::Take { max_records } => {
                    let taken_keys: Vec<u64> = model.in_flight.iter().flat_map(|b| b.chunks.clone()).collect();
                    let expected: Vec<String> = model
                        .chunks
                        .iter()
                        .filter(|(k, _)| !taken_keys.contains(k))
                        .flat_map(|(_, ids)| ids.iter().map(u64::to_string))
                        .collect();
                    match buffer.next_batch(max_records.into(), u64::MAX).unwrap() {
                        Some(batch) => {
                            let got = ids(&batch);
                            prop_assert!(expected.starts_with(&got), "got {:?}, expected a prefix of {:?}", got, expected);
                            prop_assert!(got.len() <= usize::from(max_records) || batch.chunks.len() == 1);
                            model.in_flight.push_back(batch);
                        }
                        None => prop_assert!(expected.is_empty()),
                    }
                }
                Op::AckOldest => {
                    if let Some(batch) = model.in_flight.pop_front() {
                        buffer.ack(&batch.chunks).unwrap();
                        model.chunks.retain(|(k, _)| !batch.chunks.contains(k));
                    }
                }
                Op::Release => {
                    for batch in model.in_flight.drain(..) {
                        buffer.release(&batch.chunks);
                    }
                }
                Op::Restart => {
                    buffer.flush().unwrap();
                    discovered_corruptions += buffer.stats().corrupted_chunks;
                    drop(buffer);
                    buffer = open();
                    model.in_flight.clear();
                }
                Op::Corrupt { pick } => {
                    // Only chunks not in flight: an in-flight chunk was already read into memory.
                    let taken: Vec<u64> = model.in_flight.iter().flat_map(|b| b.chunks.clone()).collect();
                    let candidates: Vec<usize> = (0..model.chunks.len()).filter(|i| !taken.contains(&model.chunks[*i].0)).collect();
                    if !candidates.is_empty() {
                        let index = candidates[usize::from(pick) % candidates.len()];
                        let (key, _) = model.chunks.remove(index);
                        buffer.corrupt_chunk_for_test(key);
                        model.corrupted += 1;
                    }
                }
            }
            let stats = buffer.stats();
            let model_records: u64 = model.chunks.iter().map(|(_, ids)| ids.len() as u64).sum();
            // A corrupted chunk still counts in the buffer's stats until it is discovered.
            prop_assert!(stats.records >= model_records);
        }
        // Drain everything: exactly the model's records come out, in order.
        for batch in model.in_flight.drain(..) {
            buffer.release(&batch.chunks);
        }
        let mut delivered = Vec::new();
        while let Some(batch) = buffer.next_batch(1000, u64::MAX).unwrap() {
            delivered.extend(ids(&batch));
            buffer.ack(&batch.chunks).unwrap();
        }
        let expected: Vec<String> = model.chunks.iter().flat_map(|(_, ids)| ids.iter().map(u64::to_string)).collect();
        prop_assert_eq!(delivered, expected);
        prop_assert_eq!(buffer.stats().records, 0);
        // Every corruption was discovered (by a read or an open) and counted exactly once.
        prop_assert_eq!(discovered_corruptions + buffer.stats().corrupted_chunks, model.corrupted);
    }
}
