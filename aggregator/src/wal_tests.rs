use super::*;
use akosha_protocol::encode_records;

fn entry(system: &str, first: u64, n: u64) -> (WalEntry, Vec<Record>) {
    let records: Vec<Record> = (first..first + n)
        .map(|i| Record { system_id: system.into(), id: i.to_string(), ts: i as i64, ..Record::default() })
        .collect();
    let raw = encode_records(&records);
    let payload = Codec::Lz4.compress(&raw);
    let entry = WalEntry {
        system_id: system.into(),
        buffer_epoch: 7,
        first_record: first,
        last_record: first + n - 1,
        record_count: n as u32,
        codec: Codec::Lz4,
        uncompressed_len: raw.len() as u32,
        payload,
    };
    (entry, records)
}

fn config(dir: &Path, segment_bytes: u64) -> WalConfig {
    WalConfig { dir: dir.to_owned(), segment_bytes, group_commit_window: Duration::ZERO, queue_depth: 16 }
}

fn open(
    dir: &Path,
    segment_bytes: u64,
) -> (Wal, RecoveryReport, Vec<WalEntry>, std::sync::mpsc::Receiver<DurableBatch>) {
    let mut replayed = Vec::new();
    let (tx, rx) = std::sync::mpsc::sync_channel(1024);
    let (wal, report) = Wal::open(
        config(dir, segment_bytes),
        |_, e| {
            replayed.push(e.clone());
            e.records().ok()?.iter().map(|r| r.ts).max()
        },
        tx,
    )
    .unwrap();
    (wal, report, replayed, rx)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[test]
fn appended_entries_replay_in_order_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let mut written = Vec::new();
    {
        let (wal, report, replayed, durable) = open(dir.path(), 600);
        assert_eq!(report, RecoveryReport::default());
        assert!(replayed.is_empty());
        for i in 0..10 {
            let (e, records) = entry("host-1", i * 5 + 1, 5);
            rt.block_on(wal.append(e.clone(), records.clone())).unwrap();
            assert_eq!(durable.recv().unwrap().records, records);
            written.push(e);
        }
        assert!(wal.segments() > 1, "600-byte segments roll");
        assert_eq!(wal.high_water("host-1", 7), Some(50));
    }
    let (wal, report, replayed, _) = open(dir.path(), 600);
    assert_eq!(replayed, written);
    assert_eq!(report.entries, 10);
    assert_eq!(wal.high_water("host-1", 7), Some(50));
    assert_eq!(wal.high_water("host-1", 8), None);
    assert_eq!(replayed[3].records().unwrap()[0].id, "16");
}

/// Closes a log and waits until its writer has stopped (trimmed the padding of its direct writes, see
/// `akosha_fsio`, and synced): the channel of durable batches closes only then.
fn close(wal: Wal, durable: std::sync::mpsc::Receiver<DurableBatch>) {
    drop(wal);
    while durable.recv().is_ok() {}
}

#[test]
fn padding_after_the_last_entry_is_the_end_of_the_log_not_a_loss() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let mut written = Vec::new();
    let (wal, _, _, durable) = open(dir.path(), 1 << 20);
    for i in 0..3 {
        let (e, r) = entry("h", i * 2 + 1, 2);
        rt.block_on(wal.append(e.clone(), r)).unwrap();
        written.push(e);
    }
    close(wal, durable);
    // A kill -9 leaves the zeros up to the block boundary that a clean stop would have cut; the log may end
    // anywhere in a block, so the padding may also be shorter than an entry header.
    let segment = segment_path(dir.path(), 1);
    let logical = std::fs::metadata(&segment).unwrap().len();
    let full = logical.next_multiple_of(akosha_fsio::BLOCK as u64) - logical;
    for padding in [1, 7, 8, 9, full] {
        OpenOptions::new().write(true).open(&segment).unwrap().set_len(logical + padding).unwrap();
        let (wal, report, replayed, durable) = open(dir.path(), 1 << 20);
        close(wal, durable);
        assert_eq!(replayed, written, "{padding} bytes of padding");
        assert_eq!((report.truncated_bytes, report.corrupt_entries), (0, 0), "{padding} bytes of padding");
        assert_eq!(std::fs::metadata(&segment).unwrap().len(), logical, "the padding is cut at open");
    }
    OpenOptions::new().write(true).open(&segment).unwrap().set_len(logical + full).unwrap();
    let (wal, _, _, durable) = open(dir.path(), 1 << 20);
    let (e, r) = entry("h", 7, 2);
    rt.block_on(wal.append(e.clone(), r)).unwrap();
    written.push(e);
    close(wal, durable);
    let (_, report, replayed, _) = open(dir.path(), 1 << 20);
    assert_eq!(replayed, written);
    assert_eq!(report.truncated_bytes, 0);
}

#[test]
fn torn_tail_is_truncated_and_the_log_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let (wal, _, _, durable) = open(dir.path(), 1 << 20);
    for i in 0..3 {
        let (e, r) = entry("h", i * 2 + 1, 2);
        rt.block_on(wal.append(e, r)).unwrap();
    }
    close(wal, durable);
    let segment = segment_path(dir.path(), 1);
    let full = std::fs::metadata(&segment).unwrap().len();
    // A crash in the middle of writing a fourth entry.
    let (partial, _) = entry("h", 7, 2);
    let mut bytes = Vec::new();
    encode_entry(&partial, &mut bytes);
    let mut f = OpenOptions::new().append(true).open(&segment).unwrap();
    f.write_all(&bytes[..bytes.len() / 2]).unwrap();
    drop(f);
    let (wal, report, replayed, durable) = open(dir.path(), 1 << 20);
    assert_eq!(replayed.len(), 3);
    assert_eq!(report.truncated_bytes, (bytes.len() / 2) as u64);
    assert_eq!(std::fs::metadata(&segment).unwrap().len(), full);
    let (e, r) = entry("h", 7, 2);
    rt.block_on(wal.append(e, r)).unwrap();
    close(wal, durable);
    let (_, _, replayed, _) = open(dir.path(), 1 << 20);
    assert_eq!(replayed.len(), 4);
}

#[test]
fn corrupt_entry_in_the_middle_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    {
        let (wal, _, _, _durable) = open(dir.path(), 1 << 20);
        for i in 0..3 {
            let (e, r) = entry("h", i * 2 + 1, 2);
            rt.block_on(wal.append(e, r)).unwrap();
        }
    }
    let segment = segment_path(dir.path(), 1);
    let mut data = std::fs::read(&segment).unwrap();
    // Flip a payload byte of the second entry.
    let first_len = u32::from_le_bytes(data[8..12].try_into().unwrap()) as usize;
    let second = 8 + ENTRY_HEADER_LEN + first_len;
    data[second + ENTRY_HEADER_LEN + 20] ^= 0xff;
    std::fs::write(&segment, &data).unwrap();
    let (_, report, replayed, _) = open(dir.path(), 1 << 20);
    assert_eq!(report.corrupt_entries, 1);
    assert_eq!(replayed.iter().map(|e| e.first_record).collect::<Vec<_>>(), vec![1, 5]);
}

#[test]
fn garbage_segments_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = SEGMENT_MAGIC.to_vec();
    data.extend((0..5000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8));
    std::fs::write(segment_path(dir.path(), 1), &data).unwrap();
    std::fs::write(segment_path(dir.path(), 2), b"not a wal").unwrap();
    let (_, report, _, _) = open(dir.path(), 1 << 20);
    assert!(report.truncated_bytes > 0);
}

#[test]
fn released_segments_are_gone_and_their_high_water_marks_survive() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    {
        let (wal, _, _, durable) = open(dir.path(), 200);
        // Records 1..=50 (ts = sequence number); note which segment each batch went to.
        let mut newest_per_segment = std::collections::BTreeMap::new();
        for i in 0..10 {
            let segment = wal.current_segment();
            let (e, records) = entry("host-1", i * 5 + 1, 5);
            rt.block_on(wal.append(e, records)).unwrap();
            durable.recv().unwrap();
            newest_per_segment.insert(segment, i as i64 * 5 + 5);
        }
        let segments = wal.segments();
        assert!(segments > 3, "{segments}");
        // A move applied through segment 3 with cutoff 26: only sealed segments below 3 whose newest record is
        // older than 26 go.
        let expected = newest_per_segment.iter().filter(|(s, ts)| **s < 3 && **ts < 26).count() as u64;
        assert!(expected > 0);
        assert_eq!(wal.release(WarmMark { applied: position(3, 0), cutoff_us: 26 }).unwrap(), expected);
        assert_eq!(wal.segments(), segments - expected);
        assert!(!segment_path(dir.path(), 1).exists());
        assert!(segment_path(dir.path(), 3).exists());
        // A dominated mark changes nothing; a later one releases every sealed segment.
        assert_eq!(wal.release(WarmMark { applied: position(2, 0), cutoff_us: 10 }).unwrap(), 0);
        assert!(wal.release(WarmMark { applied: position(wal.current_segment(), 0), cutoff_us: 1000 }).unwrap() > 0);
        assert_eq!(wal.segments(), 1, "only the open segment is left");
    }
    let marks = Wal::warm_marks(dir.path()).unwrap();
    assert_eq!(marks.len(), 1, "{marks:?}");
    assert!(WarmMark::covered(&marks, position(1, 3), 40) && !WarmMark::covered(&marks, marks[0].applied, 40));
    let (wal, _, replayed, _) = open(dir.path(), 200);
    assert_eq!(wal.high_water("host-1", 7), Some(50), "kept by the checkpoint");
    assert!(replayed.len() < 10, "released entries are not replayed");
}
