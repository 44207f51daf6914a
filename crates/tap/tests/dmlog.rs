//! The dm-log-writes reader against synthetic logs written the way the kernel target writes
//! them: event order around FLUSH/FUA/marks, splitting, replay to every point against a
//! byte model, and specific errors for truncated and malformed logs.

mod common;

use bytes::Bytes;
use common::{DISCARD, FLUSH, FUA, LogWriter, MARK, METADATA, pattern};
use rand::{Rng, SeedableRng};
use tidemark_journal::{BlockIo, Bookmark, BookmarkKind, Event, MemVolume, VolumeId};
use tidemark_tap::TapError;
use tidemark_tap::dmlog::{Cursor, DmLog, EntryFlags, ReplayPoint};

fn volume(bytes: &[u8]) -> MemVolume {
    let v = MemVolume::new(0);
    v.write_at(bytes, 0).expect("fill");
    v
}

fn events(log: &DmLog<'_>, volume: u16) -> Vec<Event> {
    log.events(VolumeId(volume)).collect::<Result<Vec<_>, _>>().expect("events")
}

fn write(offset: u64, data: &[u8]) -> Event {
    Event::Write { volume: VolumeId(3), offset, data: Bytes::copy_from_slice(data) }
}

#[test]
fn events_follow_the_kernel_order_rules() {
    for ss in [512u32, 4096] {
        let (a, b, c, d, e) = (
            pattern(1, 8192),
            pattern(2, 4096),
            pattern(3, 4096),
            pattern(4, 8192),
            pattern(5, 4096),
        );
        let mut w = LogWriter::new(ss);
        w.write(0, &a);
        w.write_flags(64 << 10, &b, METADATA);
        w.flush();
        w.write_flags(128 << 10, &c, FUA);
        w.write_flags(192 << 10, &d, FLUSH);
        w.write_flags(320 << 10, &e, FLUSH | FUA);
        w.discard(256 << 10, 64 << 10);
        w.mark("after-discard");
        w.raw(0, 0, FLUSH | FUA, 0, &[], &[]);
        let bytes = w.finish();
        let io = volume(&bytes);
        let log = DmLog::open(&io).expect("open");
        assert_eq!(log.super_block().sector_size, ss);
        assert_eq!(log.super_block().nr_entries, 9);

        let entries: Vec<_> = log.entries().collect::<Result<_, _>>().expect("entries");
        assert_eq!(entries.len(), 9);
        for (entry, &offset) in entries.iter().zip(&w.offsets) {
            assert_eq!(entry.offset, offset, "entry {} header offset", entry.index);
            assert_eq!(entry.device_offset(), entry.sector * u64::from(ss));
        }
        assert_eq!(entries[1].flags, EntryFlags::METADATA);
        assert_eq!(entries[6].device_len(), 64 << 10);
        assert_eq!(entries[6].payload_len(), 0, "a discard carries no data");
        assert_eq!(entries[7].mark.as_deref(), Some(&b"after-discard"[..]));
        assert_eq!(entries[7].data_len, 13);

        let mark = Bookmark::new("after-discard", BookmarkKind::User, 0).expect("name");
        let expected = vec![
            write(0, &a),
            write(64 << 10, &b),
            Event::Barrier,
            write(128 << 10, &c),
            Event::Barrier, // FUA: after the write
            Event::Barrier, // FLUSH with data: the preflush comes first
            write(192 << 10, &d),
            Event::Barrier, // FLUSH|FUA with data: before and after
            write(320 << 10, &e),
            Event::Barrier,
            Event::Discard { volume: VolumeId(3), offset: 256 << 10, len: 64 << 10 },
            Event::Bookmark(mark),
            Event::Barrier, // FLUSH|FUA without data: one barrier
        ];
        assert_eq!(events(&log, 3), expected, "sector size {ss}");
    }
}

#[test]
fn large_writes_are_split_and_large_discards_fit_u32() {
    let data = pattern(9, 40 << 10);
    let mut w = LogWriter::new(512);
    w.write(1 << 20, &data);
    w.discard(1 << 30, 5 << 30);
    let io = volume(&w.finish());
    let log = DmLog::open(&io).expect("open").with_max_event_bytes(16 << 10);
    let got = events(&log, 0);
    let piece = |from: usize, to: usize| Event::Write {
        volume: VolumeId(0),
        offset: (1 << 20) + from as u64,
        data: Bytes::copy_from_slice(&data[from..to]),
    };
    let mut expected =
        vec![piece(0, 16 << 10), piece(16 << 10, 32 << 10), piece(32 << 10, 40 << 10)];
    for i in 0..5u64 {
        expected.push(Event::Discard { volume: VolumeId(0), offset: (1 + i) << 30, len: 1 << 30 });
    }
    assert_eq!(got, expected);

    // A piece size below one sector still moves whole sectors.
    let log = DmLog::open(&io).expect("open").with_max_event_bytes(100);
    let writes = events(&log, 0).into_iter().filter(|e| matches!(e, Event::Write { .. })).count();
    assert_eq!(writes, 80, "40 KiB in 512-byte pieces");
}

/// A random kernel-style workload, its log, and the device content after every entry.
fn workload(seed: u64, ss: u32, device: u64) -> (LogWriter, Vec<Vec<u8>>, Vec<String>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut w = LogWriter::new(ss);
    let mut model = vec![0u8; device as usize];
    let mut states = Vec::new();
    let mut marks = Vec::new();
    let blocks = device / u64::from(ss);
    for i in 0..60u64 {
        let pick = rng.gen_range(0..10);
        let start = rng.gen_range(0..blocks) * u64::from(ss);
        let max_len = (device - start).min(16 * u64::from(ss));
        let len = rng.gen_range(1..=max_len / u64::from(ss)) * u64::from(ss);
        let (s, e) = (start as usize, (start + len) as usize);
        match pick {
            0..=4 => {
                let data = pattern(seed * 1000 + i, len as usize);
                let flags = [0, 0, FUA, FLUSH, METADATA][rng.gen_range(0..5)];
                w.write_flags(start, &data, flags);
                model[s..e].copy_from_slice(&data);
            }
            5 => {
                w.discard(start, len);
                model[s..e].fill(0);
            }
            6 | 7 => w.flush(),
            _ => {
                let name = format!("mark-{i}");
                w.mark(&name);
                marks.push(name);
            }
        }
        states.push(model.clone());
    }
    (w, states, marks)
}

#[test]
fn replay_matches_the_model_at_every_point() {
    for (seed, ss) in [(1u64, 512u32), (2, 4096), (3, 512)] {
        let device = 256u64 << 10;
        let (w, states, marks) = workload(seed, ss, device);
        let io = volume(&w.finish());
        let log = DmLog::open(&io).expect("open");
        let entries: Vec<_> = log.entries().collect::<Result<_, _>>().expect("entries");

        // Every prefix (xfstests --limit).
        for n in 0..=entries.len() {
            let target = MemVolume::new(device);
            let report = log.replay_to(&ReplayPoint::Entries(n as u64), &target).expect("replay");
            assert_eq!(report.entries, n as u64);
            let want = if n == 0 { vec![0; device as usize] } else { states[n - 1].clone() };
            assert!(target.snapshot() == want, "seed {seed}: state after {n} entries differs");
        }

        // Every flush point, from scratch and cumulatively on one replay.
        let points: Vec<usize> =
            entries.iter().filter(|e| e.is_flush_point()).map(|e| e.index as usize).collect();
        assert!(points.len() > 3, "the workload has flush points");
        let stepped = MemVolume::new(device);
        let mut replay = log.replay(&stepped).expect("replay");
        for (k, &index) in points.iter().enumerate() {
            let k = k as u64 + 1;
            let target = MemVolume::new(device);
            let report = log.replay_to(&ReplayPoint::Flush(k), &target).expect("replay");
            assert_eq!(report.last_entry, Some(index as u64));
            assert_eq!(report.flush_points, k);
            assert!(target.snapshot() == states[index], "seed {seed}: flush point {k} differs");
            replay.run_to(&ReplayPoint::Flush(k)).expect("step to flush");
            assert!(stepped.snapshot() == states[index], "seed {seed}: stepped flush {k} differs");
        }

        // Every mark.
        for name in &marks {
            let index = entries
                .iter()
                .position(|e| {
                    e.flags.contains(EntryFlags::MARK) && e.mark.as_deref() == Some(name.as_bytes())
                })
                .expect("mark present");
            let target = MemVolume::new(device);
            log.replay_to(&ReplayPoint::Mark(name.clone()), &target).expect("replay to mark");
            assert!(target.snapshot() == states[index], "seed {seed}: mark {name} differs");
        }

        // The end.
        let target = MemVolume::new(device);
        let report = log.replay_to(&ReplayPoint::End, &target).expect("replay");
        assert!(target.snapshot() == *states.last().expect("states"));
        assert_eq!(report.entries, entries.len() as u64);
    }
}

#[test]
fn replay_point_errors_say_what_happened() {
    let mut w = LogWriter::new(512);
    w.write(0, &pattern(1, 512));
    w.flush();
    w.write(512, &pattern(2, 512));
    w.flush();
    w.mark("m");
    let io = volume(&w.finish());
    let log = DmLog::open(&io).expect("open");
    let target = MemVolume::new(1 << 20);

    assert!(matches!(log.replay_to(&ReplayPoint::Flush(0), &target), Err(TapError::Config(_))));
    match log.replay_to(&ReplayPoint::Flush(3), &target) {
        Err(e @ TapError::ReplayPointNotReached { entries: 5, .. }) => {
            assert!(e.to_string().contains("flush/FUA #3"), "{e}");
        }
        other => panic!("expected ReplayPointNotReached, got {other:?}"),
    }
    assert!(matches!(
        log.replay_to(&ReplayPoint::Mark("other".into()), &target),
        Err(TapError::ReplayPointNotReached { .. })
    ));
    assert!(matches!(
        log.replay_to(&ReplayPoint::Entries(6), &target),
        Err(TapError::ReplayPointNotReached { entries: 5, .. })
    ));

    let mut replay = log.replay(&target).expect("replay");
    replay.run_to(&ReplayPoint::Flush(1)).expect("flush 1");
    replay.run_to(&ReplayPoint::Flush(1)).expect("already exactly there: nothing to do");
    assert_eq!(replay.report().entries, 2);
    replay.run_to(&ReplayPoint::Entries(3)).expect("one more entry");
    assert!(matches!(
        replay.run_to(&ReplayPoint::Flush(1)),
        Err(TapError::ReplayPointPassed { .. })
    ));
    assert!(matches!(
        replay.run_to(&ReplayPoint::Entries(2)),
        Err(TapError::ReplayPointPassed { entries: 3, .. })
    ));
    replay.run_to(&ReplayPoint::Mark("m".into())).expect("mark");
    assert_eq!(replay.report().marks, 1);
    assert_eq!(replay.report().bytes_written, 1024);
}

#[test]
fn replay_refuses_ranges_past_the_target() {
    let mut w = LogWriter::new(512);
    w.write(0, &pattern(1, 512));
    w.write(8192, &pattern(2, 1024));
    let io = volume(&w.finish());
    let log = DmLog::open(&io).expect("open");
    let target = MemVolume::new(8192 + 512);
    match log.replay_to(&ReplayPoint::End, &target) {
        Err(e @ TapError::OutOfRange { offset: 8192, len: 1024, object_len: 8704, .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("mem-volume") && msg.contains("entry 1"), "{msg}");
        }
        other => panic!("expected OutOfRange, got {other:?}"),
    }
    assert_eq!(target.len().expect("len"), 8704, "the target was not grown");
}

#[test]
fn truncated_log_delivers_every_entry_before_the_cut() {
    let mut w = LogWriter::new(512);
    w.write(0, &pattern(1, 2048));
    w.flush();
    w.mark("m1");
    w.discard(4096, 4096);
    w.write_flags(8192, &pattern(2, 1024), FUA);
    w.write(0, &pattern(3, 512));
    let full = w.finish();
    let ends: Vec<u64> = w.offsets.iter().skip(1).copied().chain([full.len() as u64]).collect();
    for cut in 512..full.len() {
        let io = volume(&full[..cut]);
        let log = DmLog::open(&io).expect("open");
        let got: Vec<_> = log.entries().collect();
        let complete = ends.iter().filter(|&&e| e <= cut as u64).count();
        assert_eq!(got.len(), complete + 1, "cut at {cut}: entries and one error");
        assert!(got[..complete].iter().all(Result::is_ok), "cut at {cut}");
        match &got[complete] {
            Err(e @ TapError::TruncatedEntry { index, offset, available, .. }) => {
                assert_eq!(*index, complete as u64, "cut at {cut}");
                assert_eq!(*offset, w.offsets[complete], "cut at {cut}");
                assert_eq!(*available, cut as u64 - w.offsets[complete]);
                let msg = e.to_string();
                assert!(
                    msg.contains(&format!("entry {index} at byte offset {offset}")),
                    "message names the entry: {msg}"
                );
            }
            other => panic!("cut at {cut}: expected TruncatedEntry, got {other:?}"),
        }
        // The event iterator delivers the same prefix, then the error.
        let evs: Vec<_> = log.events(VolumeId(0)).collect();
        assert!(matches!(evs.last(), Some(Err(TapError::TruncatedEntry { .. }))), "cut at {cut}");
    }
}

/// Appends a bad entry to a log under test.
type Mutation = Box<dyn FnOnce(&mut LogWriter)>;

fn third_entry_error(mutate: impl FnOnce(&mut LogWriter)) -> (TapError, u64) {
    let mut w = LogWriter::new(512);
    w.write(0, &pattern(1, 512));
    w.flush();
    mutate(&mut w);
    let io = volume(&w.finish());
    let log = DmLog::open(&io).expect("open");
    let got: Vec<_> = log.entries().collect();
    assert_eq!(got.len(), 3, "two entries, then the error");
    assert!(got[0].is_ok() && got[1].is_ok());
    let offset = w.offsets[2];
    (got.into_iter().nth(2).expect("third").expect_err("third entry is refused"), offset)
}

#[test]
fn malformed_entries_are_named_with_index_offset_and_reason() {
    let cases: Vec<(&str, Mutation)> = vec![
        ("unknown flag bits 0x20", Box::new(|w| w.raw(0, 1, 1 << 5, 0, &[], &[0; 512]))),
        ("all-zero header", Box::new(|w| w.raw(0, 0, 0, 0, &[], &[]))),
        (
            "non-zero byte in the header padding at +40",
            Box::new(|w| {
                let mut inline = [0u8; 9];
                inline[8] = 1;
                w.raw(0, 1, 0, 0, &inline, &[0; 512]);
            }),
        ),
        ("does not fit the 480 bytes", Box::new(|w| w.raw(0, 0, MARK, 481, b"x", &[]))),
        ("overflows a byte offset", Box::new(|w| w.raw(u64::MAX / 256, 1, 0, 0, &[], &[0; 512]))),
        ("overflows a byte offset", Box::new(|w| w.raw(0, u64::MAX / 2, DISCARD, 0, &[], &[]))),
        ("data_len 1024 exceeds", Box::new(|w| w.raw(0, 1, 0, 1024, &[], &[0; 512]))),
    ];
    for (want, mutate) in cases {
        let (err, offset) = third_entry_error(mutate);
        match &err {
            TapError::MalformedEntry { index: 2, offset: o, reason, .. } => {
                assert_eq!(*o, offset);
                assert!(reason.contains(want), "reason {reason:?} should say {want:?}");
                assert!(err.to_string().contains(&format!("entry 2 at byte offset {offset}")));
            }
            other => panic!("expected MalformedEntry({want}), got {other:?}"),
        }
    }
    // A huge write whose data is not in the log is a truncation, not an allocation.
    let (err, offset) = third_entry_error(|w| w.raw(0, 1 << 40, 0, 0, &[], &[]));
    assert!(
        matches!(err, TapError::TruncatedEntry { index: 2, offset: o, needed, .. } if o == offset && needed == 512 + (512 << 40)),
        "{err:?}"
    );
}

#[test]
fn bad_super_blocks_are_refused() {
    let good = {
        let mut w = LogWriter::new(512);
        w.flush();
        w.finish()
    };
    let with = |at: usize, bytes: &[u8]| {
        let mut b = good.clone();
        b[at..at + bytes.len()].copy_from_slice(bytes);
        b
    };
    let open = |b: Vec<u8>| {
        let io = volume(&b);
        DmLog::open(&io).map(|_| ())
    };
    assert!(matches!(open(with(0, b"RHSWFSJ\0")), Err(TapError::BadMagic { .. })));
    assert!(matches!(
        open(with(8, &2u64.to_le_bytes())),
        Err(TapError::UnsupportedVersion { found: 2, supported: 1, .. })
    ));
    for bad in [0u32, 256, 1000, 1 << 24] {
        match open(with(24, &bad.to_le_bytes())) {
            Err(TapError::InvalidField { field: "sectorsize", found, .. }) => {
                assert_eq!(found, u64::from(bad));
            }
            other => panic!("sector size {bad}: {other:?}"),
        }
    }
    assert!(matches!(
        open(good[..20].to_vec()),
        Err(TapError::InvalidField { field: "log length", found: 20, .. })
    ));
}

#[test]
fn bad_mark_names_are_reported_and_reading_goes_on() {
    let mut w = LogWriter::new(4096);
    w.raw(0, 0, MARK, 0, &[], &[]);
    w.mark("tab\there");
    w.raw(0, 0, MARK, 2, &[0xff, 0xfe], &[]);
    w.mark(&"x".repeat(300));
    w.mark("good one");
    w.write(0, &pattern(1, 4096));
    let io = volume(&w.finish());
    let log = DmLog::open(&io).expect("open");
    let got: Vec<_> = log.events(VolumeId(0)).collect();
    assert_eq!(got.len(), 6);
    for (i, want) in [(0, "empty"), (1, "control"), (2, "UTF-8"), (3, "longer than 255")] {
        match &got[i] {
            Err(TapError::BadMark { index, offset, reason, .. }) => {
                assert_eq!(*index, i as u64);
                assert_eq!(*offset, w.offsets[i]);
                assert!(reason.contains(want), "{reason:?} should say {want:?}");
            }
            other => panic!("mark {i}: expected BadMark, got {other:?}"),
        }
    }
    assert!(matches!(&got[4], Ok(Event::Bookmark(b)) if b.name == "good one"));
    assert!(matches!(&got[5], Ok(Event::Write { offset: 0, .. })));
}

#[test]
fn nr_entries_bounds_the_read_and_a_live_log_can_be_followed() {
    let mut w = LogWriter::new(512);
    w.write(0, &pattern(1, 512));
    w.flush();
    w.write(512, &pattern(2, 512));
    w.raw(0, 0, FLUSH | FUA, 0, &[], &[]);
    // The writer has logged 4 entries but the super block was last written after 2.
    let io = volume(&w.finish_with(2));
    let mut log = DmLog::open(&io).expect("open");
    let first: Vec<_> = log.entries().collect::<Result<_, _>>().expect("entries");
    assert_eq!(first.len(), 2);
    let cursor: Cursor = first[1].next();
    assert_eq!(cursor, Cursor { index: 2, offset: w.offsets[2] });

    // The super block is rewritten; the follower picks up where it stopped.
    io.write_at(&w.finish()[..512], 0).expect("rewrite super");
    log.refresh().expect("refresh");
    let rest: Vec<_> = log.entries_from(cursor).collect::<Result<_, _>>().expect("entries");
    assert_eq!(rest.iter().map(|e| e.index).collect::<Vec<_>>(), vec![2, 3]);
    assert!(rest[1].is_flush_point());

    // The sector size of a followed log cannot change.
    let mut other = w.finish();
    other[24..28].copy_from_slice(&4096u32.to_le_bytes());
    io.write_at(&other[..512], 0).expect("rewrite super");
    assert!(matches!(log.refresh(), Err(TapError::InvalidField { field: "sectorsize", .. })));
}

/// Found by the fuzzer: a discard's data is not in the log, so its range is bounded only by
/// 64-bit arithmetic; its events must come lazily, and a known device size refuses it.
#[test]
fn a_huge_discard_costs_nothing_up_front_and_a_device_size_refuses_it() {
    let mut w = LogWriter::new(512);
    w.discard(0, 1 << 62);
    w.write(0, &pattern(1, 512));
    let io = volume(&w.finish());
    let log = DmLog::open(&io).expect("open");
    let first: Vec<_> = log.events(VolumeId(0)).take(3).collect::<Result<_, _>>().expect("events");
    assert_eq!(
        first,
        (0..3u64)
            .map(|i| Event::Discard { volume: VolumeId(0), offset: i << 30, len: 1 << 30 })
            .collect::<Vec<_>>()
    );

    let log = DmLog::open(&io).expect("open").with_device_len(1 << 30);
    match log.entries().next() {
        Some(Err(TapError::MalformedEntry { index: 0, reason, .. })) => {
            assert!(reason.contains("ends past the device's 1073741824 bytes"), "{reason}");
        }
        other => panic!("expected MalformedEntry, got {other:?}"),
    }
}
