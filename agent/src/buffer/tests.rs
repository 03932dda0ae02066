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
        spare_segments: 1,
    }
}

/// 1 MiB segments (the smallest) and chunks of one record each: six 200 KB records fill a segment, the 7th
/// append starts the next.
fn one_mib_segments() -> BufferConfig {
    BufferConfig { max_chunk_bytes: 1, ..config(8 << 20, WhenFull::Block) }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Appends one record of `text_len` bytes per id, one call each.
fn append_each(rt: &tokio::runtime::Runtime, buffer: &Buffer, ids: std::ops::Range<u64>, text_len: usize) {
    for i in ids {
        rt.block_on(buffer.append(&[record(i, text_len)], Duration::ZERO)).unwrap();
    }
}

/// Takes and acknowledges everything waiting; the ids in delivery order.
fn drain(buffer: &Buffer) -> Vec<String> {
    let mut delivered = Vec::new();
    while let Some(batch) = buffer.next_batch(1000, u64::MAX).unwrap() {
        delivered.extend(ids(&batch));
        buffer.ack(&batch.chunks).unwrap();
    }
    delivered
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
    append_each(&rt, &buffer, 0..5, 400);
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
        append_each(&rt, &buffer, 0..3, 10);
        buffer.corrupt_chunk_for_test(2);
        buffer.flush().unwrap();
    }
    let buffer = Buffer::open(dir.path(), config(1 << 20, WhenFull::Block)).unwrap();
    assert_eq!(buffer.stats().corrupted_chunks, 1);
    let batch = buffer.next_batch(10, u64::MAX).unwrap().unwrap();
    assert_eq!(ids(&batch), vec!["0", "2"]);
    // Corruption discovered while sending (not at open) is handled the same way.
    // (The damaged chunk's count cannot be trusted: sequence numbers go on from a safe bound after it.)
    let receipt = rt.block_on(buffer.append(&[record(9, 10)], Duration::ZERO)).unwrap();
    assert!(receipt.first_seq >= 4, "{receipt:?}");
    buffer.corrupt_chunk_for_test(receipt.first_seq);
    assert!(buffer.next_batch(10, u64::MAX).unwrap().is_none());
    assert_eq!(buffer.stats().corrupted_chunks, 2);
}

#[test]
fn dead_letter_and_skip_through() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let buffer = Buffer::open(dir.path(), config(1 << 20, WhenFull::Block)).unwrap();
    append_each(&rt, &buffer, 0..4, 10);
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
        append_each(&rt, &buffer, 0..4, 10);
        let batch = buffer.next_batch(1, u64::MAX).unwrap().unwrap();
        buffer.dead_letter(&batch.chunks, "test").unwrap();
        buffer.corrupt_chunk_for_test(3);
        buffer.flush().unwrap();
    }
    let report = inspect(dir.path()).unwrap();
    assert_eq!((report.chunks, report.records, report.corrupted_chunks), (2, 2, 1));
    assert_eq!(report.seq_range, Some((2, 4)));
    assert_eq!((report.dead_letter_chunks, report.dead_letter_records), (1, 1));
    // What the agent will hand out next: past the damaged chunk's bound, so never a number already used.
    assert!(report.next_seq >= 5, "{report:?}");
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

/// Sources appending at once on a multi-threaded runtime, with a sender taking and acknowledging meanwhile
/// (from the in-memory copies) and segments filling up mid-round: every policy numbers the appends without gaps
/// or overlaps, delivers each record once in sequence order, and a restart brings back exactly the rest.
#[test]
fn concurrent_appends_are_written_in_rounds_and_each_record_comes_out_once_in_order() {
    const SOURCES: u64 = 8;
    const APPENDS: u64 = 30;
    for fsync in [
        FsyncPolicy::Batch { window: Duration::ZERO },
        FsyncPolicy::Batch { window: Duration::from_millis(1) },
        FsyncPolicy::Always,
        FsyncPolicy::Interval(Duration::from_millis(5)),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        // 1 MiB segments; each append is three records of ~5 KB in one chunk.
        let config = BufferConfig { fsync, max_chunk_bytes: 64 << 10, ..config(8 << 20, WhenFull::Block) };
        let buffer = Buffer::open(dir.path(), config.clone()).unwrap();
        let (receipts, sent) = rt.block_on(async {
            let sender = {
                let buffer = buffer.clone();
                tokio::spawn(async move {
                    // Takes half of what arrives meanwhile, then stops: the rest waits for the restart.
                    let (mut sent, mut records) = (Vec::new(), 0);
                    while records < SOURCES * APPENDS * 3 / 2 {
                        match buffer.next_batch(7, u64::MAX).unwrap() {
                            Some(batch) => {
                                records += u64::from(batch.record_count);
                                sent.push((batch.first_record, ids(&batch)));
                                buffer.ack(&batch.chunks).unwrap();
                            }
                            None => tokio::time::sleep(Duration::from_micros(200)).await,
                        }
                    }
                    sent
                })
            };
            let sources: Vec<_> = (0..SOURCES)
                .map(|source| {
                    let buffer = buffer.clone();
                    tokio::spawn(async move {
                        let mut receipts = Vec::new();
                        for append in 0..APPENDS {
                            let first = source * 1000 + append * 3;
                            let records: Vec<_> = (first..first + 3).map(|id| record(id, 5000)).collect();
                            let receipt = buffer.append(&records, Duration::from_secs(5)).await.unwrap();
                            receipts.push((receipt.first_seq, first));
                        }
                        receipts
                    })
                })
                .collect();
            let mut receipts = Vec::new();
            for source in sources {
                receipts.extend(source.await.unwrap());
            }
            (receipts, sender.await.unwrap())
        });
        // Sequence numbers: contiguous, three per append, in no particular order between sources.
        let mut receipts = receipts;
        receipts.sort_unstable();
        for (i, (first_seq, _)) in receipts.iter().enumerate() {
            assert_eq!(*first_seq, 1 + 3 * i as u64, "{fsync:?}: appends numbered without gaps or overlaps");
        }
        // What was sent came in sequence order, each record with the numbers its append got.
        let by_seq: Vec<String> =
            receipts.iter().flat_map(|(_, first)| (*first..first + 3).map(|id| id.to_string())).collect();
        let mut expected_seq = 1;
        for (first_record, batch) in &sent {
            assert_eq!(*first_record, expected_seq, "{fsync:?}: batches follow each other");
            let at = (expected_seq - 1) as usize;
            assert_eq!(batch[..], by_seq[at..at + batch.len()], "{fsync:?}");
            expected_seq += batch.len() as u64;
        }
        drop(buffer);
        let buffer = Buffer::open(dir.path(), config).unwrap();
        let rest = drain(&buffer);
        assert_eq!(rest[..], by_seq[(expected_seq - 1) as usize..], "{fsync:?}: the rest after a restart, once");
        assert_eq!(buffer.stats().corrupted_chunks, 0);
    }
}

#[test]
fn spent_segments_are_deleted_and_sequence_numbers_survive_an_empty_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let config = one_mib_segments();
    {
        let buffer = Buffer::open(dir.path(), config.clone()).unwrap();
        append_each(&rt, &buffer, 0..12, 200_000);
        assert_eq!(buffer.segments_for_test(), vec![1, 7], "the 7th append found the first segment full");
        // Everything of the first segment and half the second is acknowledged: only the first file goes.
        let batch = buffer.next_batch(9, u64::MAX).unwrap().unwrap();
        assert_eq!(batch.record_count, 9);
        buffer.ack(&batch.chunks).unwrap();
        assert_eq!(buffer.segments_for_test(), vec![7]);
        assert!(buffer.stats().disk_bytes >= 6 * 200_000, "{:?}", buffer.stats());
        let rest = buffer.next_batch(100, u64::MAX).unwrap().unwrap();
        assert_eq!(ids(&rest), vec!["9", "10", "11"]);
        buffer.ack(&rest.chunks).unwrap();
        buffer.flush().unwrap();
    }
    // Reopened empty: the spent active segment goes, a new one carries the next sequence number.
    let buffer = Buffer::open(dir.path(), config).unwrap();
    assert_eq!((buffer.stats().records, buffer.stats().next_seq), (0, 13));
    assert_eq!(buffer.segments_for_test(), vec![13]);
    let receipt = rt.block_on(buffer.append(&[record(12, 10)], Duration::ZERO)).unwrap();
    assert_eq!(receipt.first_seq, 13);
}

#[test]
fn spent_segments_are_recycled_and_their_earlier_life_never_comes_back() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let config = one_mib_segments();
    let segment_path = |first: u64| dir.path().join("segments").join(segment::segment_name(first));
    let append = |buffer: &Buffer, from: u64, to: u64| append_each(&rt, buffer, from..to, 200_000);
    {
        let buffer = Buffer::open(dir.path(), config.clone()).unwrap();
        append(&buffer, 0, 7);
        let first_inode = std::fs::metadata(segment_path(1)).unwrap().ino();
        assert_eq!(drain(&buffer).len(), 7);
        assert_eq!(buffer.segments_for_test(), vec![7]);
        assert_eq!(buffer.spares_for_test(), vec![dir.path().join("segments").join(segment::spare_name(1))]);
        // Segment 7 fills up (6 more records) and the next one is the first file again, full of its old frames.
        append(&buffer, 7, 13);
        assert_eq!(buffer.segments_for_test(), vec![7, 13]);
        assert!(buffer.spares_for_test().is_empty());
        assert_eq!(std::fs::metadata(segment_path(13)).unwrap().ino(), first_inode);
        assert!(std::fs::metadata(segment_path(13)).unwrap().len() >= 6 * 200_000);
        assert_eq!(drain(&buffer), (7..13).map(|i| i.to_string()).collect::<Vec<_>>());
        // Two records into the recycled file; segment 7 is spent and waits as the spare.
        append(&buffer, 13, 15);
        assert_eq!(buffer.segments_for_test(), vec![13]);
        assert_eq!(buffer.spares_for_test().len(), 1);
        // What a crash leaves: the removal marks of the newest records may not have reached the disk, but
        // nothing has been acknowledged here anyway.
        buffer.flush().unwrap();
        let stats = buffer.stats();
        assert_eq!((stats.records, stats.next_seq), (2, 16));
        assert!(stats.disk_bytes >= 12 * 200_000, "the spare and the recycled file's old bytes count: {stats:?}");
    }
    // After a restart exactly the two new records are there; the recycled file's earlier frames (numbered 1 to
    // 6, below its name 13) are neither delivered nor damage.
    let buffer = Buffer::open(dir.path(), config.clone()).unwrap();
    let stats = buffer.stats();
    assert_eq!((stats.records, stats.next_seq, stats.corrupted_chunks), (2, 16, 0));
    assert_eq!(drain(&buffer), vec!["13", "14"]);
    drop(buffer);
    // With recycling off, spent segments are deleted; a spare found at open is still used.
    let buffer = Buffer::open(dir.path(), BufferConfig { spare_segments: 0, ..config }).unwrap();
    assert_eq!((buffer.segments_for_test(), buffer.spares_for_test().len()), (vec![16], 1));
    append(&buffer, 15, 22);
    drain(&buffer);
    append(&buffer, 22, 23);
    assert_eq!((buffer.segments_for_test().len(), buffer.spares_for_test().len()), (1, 0));
}

#[test]
fn an_older_recycled_segment_ending_in_its_earlier_life_is_not_damage() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    // Record i has sequence number i + 1.
    let config = one_mib_segments();
    {
        let buffer = Buffer::open(dir.path(), config.clone()).unwrap();
        append_each(&rt, &buffer, 0..7, 200_000);
        let batch = buffer.next_batch(7, u64::MAX).unwrap().unwrap();
        buffer.ack(&batch.chunks).unwrap();
        // Segment 1 is the spare; segment 7 fills up and segment 13 is the first file again.
        append_each(&rt, &buffer, 7..13, 200_000);
        assert_eq!((buffer.segments_for_test(), buffer.spares_for_test().len()), (vec![7, 13], 0));
        // Segment 13 ends about 100 KB before its earlier life did, and is rotated away.
        append_each(&rt, &buffer, 13..17, 200_000);
        append_each(&rt, &buffer, 17..18, 100_000);
        append_each(&rt, &buffer, 18..19, 10);
        assert_eq!(buffer.segments_for_test(), vec![7, 13, 19]);
        buffer.flush().unwrap();
    }
    // A crash that lost segment 13's end marker (power loss can persist pages out of order): its last frame is
    // followed by the middle of an earlier frame.
    let path = dir.path().join("segments").join(segment::segment_name(13));
    let scan = segment::scan(&path, 13, |_, _, _| {}).unwrap();
    assert_eq!(scan.end, segment::ScanEnd::Marker);
    assert!(scan.file_len > scan.valid_len + 50_000, "{scan:?}");
    let mut bytes = std::fs::read(&path).unwrap();
    let marker = scan.valid_len as usize;
    bytes[marker..marker + FRAME_HEADER_LEN].fill(0x5a);
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(segment::scan(&path, 13, |_, _, _| {}).unwrap().end, segment::ScanEnd::Unreadable);

    let buffer = Buffer::open(dir.path(), config).unwrap();
    assert_eq!((buffer.stats().corrupted_chunks, buffer.stats().records), (0, 12));
    let delivered = drain(&buffer);
    assert_eq!(delivered, (7..19).map(|i| i.to_string()).collect::<Vec<_>>());
}

#[test]
fn a_segment_a_reader_still_holds_is_deleted_not_recycled_and_a_pending_sync_does_not_hold_it() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    // `interval` keeps written segments in its pending-sync list until its timer fires.
    let config = BufferConfig { fsync: FsyncPolicy::Interval(Duration::from_secs(3600)), ..one_mib_segments() };
    let buffer = Buffer::open(dir.path(), config).unwrap();
    let append = |from: u64, to: u64| append_each(&rt, &buffer, from..to, 200_000);
    // Segment 1, full and waiting for its sync, is spent: it becomes the spare all the same.
    append(0, 7);
    let batch = buffer.next_batch(6, u64::MAX).unwrap().unwrap();
    buffer.ack(&batch.chunks).unwrap();
    assert_eq!((buffer.segments_for_test(), buffer.spares_for_test().len()), (vec![7], 1));
    // Segment 7 is spent while a reader still holds it (a chunk dropped while in flight): it is deleted, and the
    // reader still reads what it expected.
    append(7, 13);
    assert_eq!((buffer.segments_for_test(), buffer.spares_for_test().len()), (vec![7, 13], 0));
    let reader = buffer.hold_segment_for_test(7);
    let before = {
        let mut bytes = vec![0; 4096];
        reader.read_exact_at(&mut bytes, 0).unwrap();
        bytes
    };
    let batch = buffer.next_batch(100, u64::MAX).unwrap().unwrap();
    assert_eq!(batch.record_count, 7);
    buffer.ack(&batch.chunks).unwrap();
    assert_eq!((buffer.segments_for_test(), buffer.spares_for_test().len()), (vec![13], 0));
    append(13, 20);
    let mut after = vec![0; 4096];
    reader.read_exact_at(&mut after, 0).unwrap();
    assert_eq!(before, after);
    buffer.flush().unwrap();
}

#[test]
fn a_write_cut_short_by_a_crash_is_cut_off_and_everything_accepted_stays() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    {
        let buffer = Buffer::open(dir.path(), config(1 << 20, WhenFull::Block)).unwrap();
        append_each(&rt, &buffer, 0..3, 50);
    }
    // What a kill during the next write leaves: a whole header and part of its chunk, over the end marker.
    let segment = dir.path().join("segments").join(segment::segment_name(1));
    // (The file may be longer than its frames: direct writes pad it to a whole block after the end marker.)
    let whole = segment::scan(&segment, 1, |_, _, _| {}).unwrap().valid_len;
    let mut frame = vec![0; FRAME_HEADER_LEN];
    frame.extend(chunk::encode_chunk(&[record(3, 50)], 0));
    segment::seal_frame(&mut frame, 4);
    let file = std::fs::OpenOptions::new().write(true).open(&segment).unwrap();
    file.write_all_at(&frame[..frame.len() / 2], whole).unwrap();
    drop(file);

    let buffer = Buffer::open(dir.path(), config(1 << 20, WhenFull::Block)).unwrap();
    assert_eq!(std::fs::metadata(&segment).unwrap().len(), whole, "the torn frame is cut off");
    // The torn chunk's sequence number is not handed out again (a sender may have taken it before the crash).
    assert_eq!((buffer.stats().records, buffer.stats().corrupted_chunks, buffer.stats().next_seq), (3, 0, 5));
    rt.block_on(buffer.append(&[record(3, 50)], Duration::ZERO)).unwrap();
    let batch = buffer.next_batch(10, u64::MAX).unwrap().unwrap();
    assert_eq!(ids(&batch), vec!["0", "1", "2", "3"]);
}

#[test]
fn damage_inside_an_older_segment_is_counted_and_later_segments_still_deliver() {
    // A flipped length in the second frame's header, and the header wiped with zeros (which would otherwise read
    // as an end marker).
    let damages: [fn(&mut [u8]); 2] = [|header| header[9] ^= 0x01, |header| header.fill(0)];
    for damage in damages {
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        {
            let buffer = Buffer::open(dir.path(), config(1 << 20, WhenFull::Block)).unwrap();
            append_each(&rt, &buffer, 0..2, 50);
        }
        // Reopening starts segment 3, so segment 1 is no longer the newest (and is cut to its two frames).
        drop(Buffer::open(dir.path(), config(1 << 20, WhenFull::Block)).unwrap());
        let segment = dir.path().join("segments").join(segment::segment_name(1));
        let mut bytes = std::fs::read(&segment).unwrap();
        let second = bytes.len() / 2;
        damage(&mut bytes[second..second + FRAME_HEADER_LEN]);
        std::fs::write(&segment, &bytes).unwrap();
        {
            let buffer = Buffer::open(dir.path(), config(1 << 20, WhenFull::Block)).unwrap();
            rt.block_on(buffer.append(&[record(2, 50)], Duration::ZERO)).unwrap();
            assert_eq!(buffer.stats().corrupted_chunks, 1);
        }
        let buffer = Buffer::open(dir.path(), config(1 << 20, WhenFull::Block)).unwrap();
        let batch = buffer.next_batch(10, u64::MAX).unwrap().unwrap();
        assert_eq!(ids(&batch), vec!["0", "2"]);
    }
}

#[test]
fn a_buffer_of_the_sled_only_format_is_moved_into_a_segment() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let epoch = 0x5eed_u64;
    {
        // The layout the first version wrote: chunks as sled values keyed by their first sequence number.
        let db = sled::Config::new().path(dir.path()).segment_size(SLED_SEGMENT_BYTES).open().unwrap();
        db.open_tree("meta").unwrap().insert(META_EPOCH, &epoch.to_be_bytes()).unwrap();
        db.open_tree("meta").unwrap().insert(META_NEXT_SEQ, &40u64.to_be_bytes()).unwrap();
        let chunks = db.open_tree("chunks").unwrap();
        chunks.insert(10u64.to_be_bytes(), chunk::encode_chunk(&[record(0, 20), record(1, 20)], 7)).unwrap();
        chunks.insert(12u64.to_be_bytes(), chunk::encode_chunk(&[record(2, 20)], 8)).unwrap();
        chunks.insert(13u64.to_be_bytes(), b"\x01damaged".to_vec()).unwrap();
        db.flush().unwrap();
    }
    {
        let buffer = Buffer::open(dir.path(), config(1 << 20, WhenFull::Block)).unwrap();
        let stats = buffer.stats();
        assert_eq!((stats.epoch, stats.records, stats.corrupted_chunks, stats.next_seq), (epoch, 3, 1, 40));
        let batch = buffer.next_batch(1, u64::MAX).unwrap().unwrap();
        assert_eq!((ids(&batch), batch.first_record), (vec!["0".to_owned(), "1".to_owned()], 10));
        buffer.ack(&batch.chunks).unwrap();
        buffer.flush().unwrap();
    }
    // The second open finds the migrated chunks in their segment, and nothing is migrated twice.
    let buffer = Buffer::open(dir.path(), config(1 << 20, WhenFull::Block)).unwrap();
    assert_eq!((buffer.stats().records, buffer.stats().corrupted_chunks), (1, 0));
    let batch = buffer.next_batch(10, u64::MAX).unwrap().unwrap();
    assert_eq!((ids(&batch), batch.first_record), (vec!["2".to_owned()], 12));
    let receipt = rt.block_on(buffer.append(&[record(3, 20)], Duration::ZERO)).unwrap();
    assert_eq!(receipt.first_seq, 40);
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
    /// The chunk written last since the buffer was opened: the last frame of the newest segment, where damage
    /// cannot be told from a write cut short by a crash (recovery cuts it off without counting it), so the
    /// model does not damage it.
    last_written: Option<u64>,
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
        // 16 KiB segments: rotation and recycling happen all the time.
        // 128 KiB hold everything 60 operations can append.
        let open = || Buffer::open(dir.path(), config(128 << 10, WhenFull::Block)).unwrap();
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
                    model.last_written = new_keys.last().copied();
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
                    model.last_written = None;
                }
                Op::Corrupt { pick } => {
                    // Only chunks not in flight: an in-flight chunk was already read into memory.
                    let taken: Vec<u64> = model.in_flight.iter().flat_map(|b| b.chunks.clone()).collect();
                    let candidates: Vec<usize> = (0..model.chunks.len())
                        .filter(|i| !taken.contains(&model.chunks[*i].0) && Some(model.chunks[*i].0) != model.last_written)
                        .collect();
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
        let delivered = drain(&buffer);
        let expected: Vec<String> = model.chunks.iter().flat_map(|(_, ids)| ids.iter().map(u64::to_string)).collect();
        prop_assert_eq!(delivered, expected);
        prop_assert_eq!(buffer.stats().records, 0);
        // Every corruption was discovered (by a read or an open) and counted exactly once.
        prop_assert_eq!(discovered_corruptions + buffer.stats().corrupted_chunks, model.corrupted);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Whatever a disk does to a segment, the agent starts, and what it delivers is a subset of what it
    /// accepted, each record once.
    #[test]
    fn damaged_segments_never_stop_the_agent(
        damage in proptest::collection::vec((any::<u16>(), proptest::collection::vec(any::<u8>(), 1..64)), 1..4),
        cut in proptest::option::of(any::<u16>()),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        {
            let buffer = Buffer::open(dir.path(), config(1 << 20, WhenFull::Block)).unwrap();
            for i in 0..8 {
                rt.block_on(buffer.append(&[record(i, 40), record(100 + i, 40)], Duration::ZERO)).unwrap();
            }
        }
        let segment = dir.path().join("segments").join(segment::segment_name(1));
        let mut bytes = std::fs::read(&segment).unwrap();
        for (at, garbage) in damage {
            let at = usize::from(at) % bytes.len();
            let end = (at + garbage.len()).min(bytes.len());
            bytes[at..end].copy_from_slice(&garbage[..end - at]);
        }
        if let Some(cut) = cut {
            bytes.truncate(usize::from(cut) % bytes.len());
        }
        std::fs::write(&segment, &bytes).unwrap();

        let buffer = Buffer::open(dir.path(), config(1 << 20, WhenFull::Block)).unwrap();
        let delivered = drain(&buffer);
        let accepted: HashSet<String> = (0..8).flat_map(|i| [i, 100 + i]).map(|i: u64| i.to_string()).collect();
        let unique: HashSet<String> = delivered.iter().cloned().collect();
        prop_assert_eq!(unique.len(), delivered.len(), "delivered twice: {:?}", delivered);
        prop_assert!(unique.is_subset(&accepted), "{:?}", delivered);
        // New records still go in and come out.
        let receipt = rt.block_on(buffer.append(&[record(999, 10)], Duration::ZERO)).unwrap();
        let batch = buffer.next_batch(1000, u64::MAX).unwrap().unwrap();
        prop_assert_eq!((ids(&batch), batch.first_record), (vec!["999".to_owned()], receipt.first_seq));
    }
}
