//! Resync windows in the retention log and the spool: which points are offered, what
//! `Latest` means while the replica is inconsistent, crash recovery of an open window,
//! retention with an open window, refused input, and the format rules for the new records.

use std::sync::Arc;
use std::time::Duration;

use tidemark_journal::format::SEGMENT_HEADER_LEN;
use tidemark_journal::{
    BlockIo, Bookmark, BookmarkKind, Clock, CrashMode, Event, JournalError, JournalKey,
    ManualClock, MemDir, MemVolume, Nanos, PointKind, RecoveryPoint, RetentionConfig, RetentionLog,
    RetentionPolicy, Seq, Spool, SpoolConfig, VolumeId,
};

mod common;
use common::Feed;

const VOL: u64 = 256 << 10;

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(Nanos(1_800_000_000 * Nanos::SECOND)))
}

fn open(
    dir: &MemDir,
    base: &Arc<MemVolume>,
    clock: &Arc<ManualClock>,
    policy: RetentionPolicy,
) -> RetentionLog {
    let cfg = RetentionConfig { segment_bytes: 64 << 10, policy, ..Default::default() };
    RetentionLog::open(
        Arc::new(dir.clone()),
        vec![base.clone() as Arc<dyn BlockIo>],
        cfg,
        clock.clone(),
    )
    .expect("open")
    .0
}

impl Feed {
    fn bookmark(&mut self, name: &str) -> Seq {
        self.push(Event::Bookmark(Bookmark::new(name, BookmarkKind::User, 0).expect("name")))
    }

    fn read(&self, seq: Seq) -> Vec<u8> {
        let p = self.log.resolve(&RecoveryPoint::Seq(seq)).expect("resolve");
        let mut got = vec![0u8; VOL as usize];
        self.log.read_at(&p, VolumeId(0), 0, &mut got).expect("read");
        got
    }

    fn offered(&self) -> Vec<u64> {
        self.log.points().iter().map(|p| p.seq.0).collect()
    }
}

#[test]
fn points_inside_resync_windows_are_never_offered() {
    let (dir, base, clock) = (MemDir::new(), Arc::new(MemVolume::new(VOL)), clock());
    let mut f = Feed::new(open(&dir, &base, &clock, RetentionPolicy::default()), clock);
    f.write(0, 1); // 1
    f.push(Event::Barrier); // 2: consistent
    f.write(1, 2); // 3
    f.push(Event::ResyncBegin { id: 10 }); // 4
    f.write(2, 3); // 5: a resync block
    f.push(Event::Barrier); // 6: inside, hidden
    f.push(Event::ResyncBegin { id: 11 }); // 7: overlapping window
    f.push(Event::ResyncEnd { id: 10 }); // 8: 11 still open, not a point
    f.bookmark("during"); // 9: hidden
    f.write(3, 4); // 10
    assert_eq!(f.offered(), vec![0, 2]);
    let st = f.log.status();
    let w = st.inconsistent.expect("a window is open");
    assert_eq!((w.id, w.begin_seq, w.open_ids, w.initial_sync), (10, Seq(4), vec![11], false));
    // Latest is the state right before the window: everything up to seq 3.
    let latest = f.log.resolve(&RecoveryPoint::Latest).expect("latest");
    assert_eq!(latest.seq, Seq(3));
    assert_eq!(st.last_consistent.map(|p| p.seq), Some(Seq(3)));
    let mut got = vec![0u8; VOL as usize];
    f.log.read_at(&latest, VolumeId(0), 0, &mut got).expect("read");
    assert!(got == f.states[3], "latest during a resync is the state before it");
    // The replica's current state holds everything, resync blocks included.
    f.log.read_current(VolumeId(0), 0, &mut got).expect("read current");
    assert!(got == f.cur);

    f.push(Event::ResyncEnd { id: 11 }); // 11: closes the span, a point
    f.push(Event::Barrier); // 12
    assert_eq!(f.offered(), vec![0, 2, 11, 12]);
    let end = f.log.points()[2].clone();
    assert_eq!(end.kind, PointKind::ResyncEnd { id: 11 });
    assert!(f.read(Seq(11)) == f.states[11]);
    assert!(f.log.status().inconsistent.is_none());
    assert_eq!(f.log.resolve(&RecoveryPoint::Latest).expect("latest").seq, Seq(12));

    for s in [4, 6, 8, 10] {
        let e = f.log.resolve(&RecoveryPoint::Seq(Seq(s))).expect_err("inside the window");
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("seq {s} is inside resync window id 10 (seqs 4..11)"))
                && msg.contains("inconsistent"),
            "{msg}"
        );
    }
    let e = f.log.resolve(&RecoveryPoint::Bookmark("during".into())).expect_err("hidden");
    assert!(e.to_string().contains("\"during\" (seq 9) was taken during a resync"), "{e}");
    // By time: the newest consistent point at or before it, never one inside the window.
    let t6 = Nanos(1_800_000_000 * Nanos::SECOND + 6 * Nanos::SECOND);
    assert_eq!(f.log.resolve(&RecoveryPoint::Time(t6)).expect("time").seq, Seq(2));
    // A later bookmark of the same name outside any window is offered.
    let s = f.bookmark("during");
    assert_eq!(f.log.resolve(&RecoveryPoint::Bookmark("during".into())).expect("bm").seq, s);

    // Reopening rebuilds the same picture.
    f.log.sync().expect("sync");
    let before = f.log.points();
    let log = open(&dir, &base, &f.clock, RetentionPolicy::default());
    assert_eq!(log.points(), before);
    assert!(log.resolve(&RecoveryPoint::Seq(Seq(9))).is_err());
}

#[test]
fn initial_sync_offers_no_point_until_it_ends() {
    let (dir, base, clock) = (MemDir::new(), Arc::new(MemVolume::new(VOL)), clock());
    let mut f = Feed::new(open(&dir, &base, &clock, RetentionPolicy::default()), clock);
    f.push(Event::ResyncBegin { id: 1 });
    for b in 0..8 {
        f.write(b, b as u8 + 1);
        f.push(Event::Barrier);
    }
    f.bookmark("app");
    assert!(f.log.points().is_empty(), "{:?}", f.log.points());
    let e = f.log.resolve(&RecoveryPoint::Latest).expect_err("no consistent state yet");
    assert!(e.to_string().contains("initial sync (resync window id 1 (open since seq 1))"), "{e}");
    assert!(e.to_string().contains("has not completed"), "{e}");
    let e = f.log.resolve(&RecoveryPoint::Seq(Seq(0))).expect_err("the blank replica");
    assert!(e.to_string().contains("precedes the initial sync"), "{e}");
    let e = f.log.resolve(&RecoveryPoint::Seq(Seq(5))).expect_err("inside");
    assert!(e.to_string().contains("inside resync window id 1"), "{e}");
    let e = f.log.resolve(&RecoveryPoint::Time(f.clock.now())).expect_err("no point by time");
    assert!(e.to_string().contains("initial sync"), "{e}");
    let st = f.log.status();
    assert!(st.inconsistent.as_ref().is_some_and(|w| w.initial_sync), "{st:?}");
    assert_eq!((st.last_consistent, st.points), (None, 0));
    // The resync reads the replica as it is to compare hashes.
    let mut got = vec![0u8; VOL as usize];
    f.log.read_current(VolumeId(0), 0, &mut got).expect("read current");
    assert!(got == f.cur);

    let end = f.push(Event::ResyncEnd { id: 1 });
    let points = f.log.points();
    assert_eq!(points.len(), 1, "only the end of the initial sync: {points:?}");
    assert_eq!((points[0].seq, &points[0].kind), (end, &PointKind::ResyncEnd { id: 1 }));
    let latest = f.log.resolve(&RecoveryPoint::Latest).expect("latest");
    f.log.read_at(&latest, VolumeId(0), 0, &mut got).expect("read");
    assert!(got == f.cur);
    assert!(f.log.status().inconsistent.is_none());
}

#[test]
fn crash_with_an_open_window_keeps_it_open() {
    let (dir, base, clock) = (MemDir::new(), Arc::new(MemVolume::new(VOL)), clock());
    let mut f = Feed::new(open(&dir, &base, &clock, RetentionPolicy::default()), clock);
    f.write(0, 1);
    f.push(Event::Barrier); // 2
    f.push(Event::ResyncBegin { id: 7 }); // 3
    f.push(Event::ResyncBegin { id: 8 }); // 4
    for b in 0..40 {
        f.write(b % 60, b as u8); // 5..=44
    }
    f.push(Event::ResyncEnd { id: 7 }); // 45
    f.log.sync().expect("sync");
    f.write(1, 99); // 46, lost in the crash
    let Feed { log, clock, .. } = f;
    drop(log);
    let crashed = dir.crash(CrashMode::LoseUnsynced);
    let mut log = open(&crashed, &base, &clock, RetentionPolicy::default());
    assert_eq!(log.last_seq(), Seq(45));
    let w = log.status().inconsistent.expect("still open after the crash");
    assert_eq!((w.id, w.begin_seq, w.open_ids), (7, Seq(3), vec![8]));
    assert_eq!(log.resolve(&RecoveryPoint::Latest).expect("latest").seq, Seq(2));
    assert_eq!(log.points().iter().map(|p| p.seq.0).collect::<Vec<_>>(), vec![0, 2]);
    // The closed id stays closed, the open one can end.
    let e = log.append(Seq(46), clock.now(), &Event::ResyncEnd { id: 7 }).expect_err("closed");
    assert!(matches!(e, JournalError::Resync { id: 7, seq: Seq(46), .. }), "{e:?}");
    log.append(Seq(46), clock.now(), &Event::ResyncEnd { id: 8 }).expect("end");
    assert!(log.status().inconsistent.is_none());
    assert_eq!(
        log.points().last().map(|p| (p.seq, p.kind.clone())),
        Some((Seq(46), PointKind::ResyncEnd { id: 8 }))
    );
}

#[test]
fn retention_never_folds_past_the_last_consistent_point_before_an_open_window() {
    let (dir, base, clock) = (MemDir::new(), Arc::new(MemVolume::new(VOL)), clock());
    let policy = RetentionPolicy {
        max_age: Some(Duration::from_secs(60)),
        max_bytes: Some(256 << 10),
        tiers: Vec::new(),
    };
    let mut f = Feed::new(open(&dir, &base, &clock, policy), clock);
    for b in 0..10 {
        f.write(b, 1);
        f.push(Event::Barrier);
    }
    let last_point = f.push(Event::Barrier); // 21
    f.write(20, 5); // 22: after the point, before the window
    f.push(Event::ResyncBegin { id: 3 }); // 23
    // An hour of resync traffic, far beyond both the age and the space limits.
    for i in 0..200u64 {
        f.write(i % 60, i as u8);
        if i % 10 == 0 {
            f.push(Event::Barrier);
            f.clock.advance(Duration::from_secs(20));
        }
    }
    let report = f.log.enforce().expect("enforce does not fail");
    assert!(report.space_held_by_resync, "{report:?}");
    let st = f.log.status();
    assert!(st.space_held_by_resync && st.bytes > 256 << 10, "{st:?}");
    // The last consistent point is the base now, and reads back exactly.
    assert_eq!(st.oldest.seq, last_point);
    assert_eq!(f.offered(), vec![last_point.0]);
    assert!(f.read(last_point) == f.states[last_point.0 as usize]);
    // Latest is the state right before the window, also intact.
    let latest = f.log.resolve(&RecoveryPoint::Latest).expect("latest");
    assert_eq!(latest.seq, Seq(22));
    let mut got = vec![0u8; VOL as usize];
    f.log.read_at(&latest, VolumeId(0), 0, &mut got).expect("read");
    assert!(got == f.states[22]);
    f.log.read_current(VolumeId(0), 0, &mut got).expect("read current");
    assert!(got == f.cur);

    // Once the window closes, the policy applies again.
    let end = f.push(Event::ResyncEnd { id: 3 });
    f.clock.advance(Duration::from_secs(120));
    let closing = f.push(Event::Barrier);
    let report = f.log.enforce().expect("enforce");
    assert!(!report.space_held_by_resync, "{report:?}");
    assert!(f.log.status().oldest.seq >= end);
    assert!(f.read(closing) == f.cur);
}

#[test]
fn bad_resync_markers_are_refused_by_id_and_seq() {
    let (dir, base, clock) = (MemDir::new(), Arc::new(MemVolume::new(VOL)), clock());
    let mut log = open(&dir, &base, &clock, RetentionPolicy::default());
    let e = log.append(Seq(1), clock.now(), &Event::ResyncEnd { id: 42 }).expect_err("no begin");
    assert!(matches!(e, JournalError::Resync { id: 42, seq: Seq(1), .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "seq 1: resync id 42: ResyncEnd without a ResyncBegin: no resync window is open"
    );
    assert_eq!(log.last_seq(), Seq(0), "nothing was written");
    let e = log.append(Seq(1), clock.now(), &Event::ResyncBegin { id: 0 }).expect_err("id 0");
    assert!(e.to_string().contains("resync ids are nonzero"), "{e}");
    log.append(Seq(1), clock.now(), &Event::ResyncBegin { id: 5 }).expect("begin");
    let e = log.append(Seq(2), clock.now(), &Event::ResyncBegin { id: 5 }).expect_err("twice");
    assert!(e.to_string().contains("already open (since seq 1)"), "{e}");
    let e = log.append(Seq(2), clock.now(), &Event::ResyncEnd { id: 6 }).expect_err("other id");
    assert_eq!(
        e.to_string(),
        "seq 2: resync id 6: ResyncEnd for a window that is not open (open ids: [5])"
    );
    log.append(Seq(2), clock.now(), &Event::ResyncEnd { id: 5 }).expect("end");
}

fn spool_cfg(key: Option<JournalKey>) -> SpoolConfig {
    SpoolConfig { capacity_bytes: 1 << 30, segment_bytes: 64 << 10, key }
}

#[test]
fn spool_round_trips_resync_markers() {
    for key in [None, Some(JournalKey::from_bytes([9; 32]))] {
        let dir = MemDir::new();
        let clock = clock();
        let events = vec![
            Event::ResyncBegin { id: u64::MAX },
            Event::Write { volume: VolumeId(2), offset: 512, data: vec![7; 1024].into() },
            Event::ResyncBegin { id: 1 },
            Event::Barrier,
            Event::ResyncEnd { id: u64::MAX },
            Event::ResyncEnd { id: 1 },
        ];
        let (mut spool, _) =
            Spool::open(Arc::new(dir.clone()), spool_cfg(key.clone()), clock.clone())
                .expect("open");
        for e in &events {
            spool.append(e).expect("append");
        }
        spool.sync().expect("sync");
        spool.close().expect("close");
        let (spool, report) =
            Spool::open(Arc::new(dir.clone()), spool_cfg(key), clock).expect("reopen");
        assert!(report.defects.is_empty(), "{report:?}");
        let got: Vec<Event> = spool
            .read_after(Seq(0), u64::MAX)
            .expect("read")
            .into_iter()
            .map(|e| e.event)
            .collect();
        assert_eq!(got, events);
    }
}

#[test]
fn a_version_1_segment_may_not_hold_resync_records() {
    let dir = MemDir::new();
    let clock = clock();
    let (mut spool, _) =
        Spool::open(Arc::new(dir.clone()), spool_cfg(None), clock.clone()).expect("open");
    spool.append(&Event::Barrier).expect("append");
    spool.append(&Event::ResyncBegin { id: 3 }).expect("append");
    spool.sync().expect("sync");
    spool.close().expect("close");
    // Relabel the segment as version 1 (checksum fixed): the resync record is not valid
    // there, so it is reported as damage rather than read.
    let name = dir.list_segments()[0].clone();
    let mut b = dir.read_file(&name).expect("segment");
    assert_eq!(&b[8..12], &3u32.to_le_bytes(), "writers write version 3");
    b[8..12].copy_from_slice(&1u32.to_le_bytes());
    let crc = crc32c::crc32c(&b[..124]);
    b[124..128].copy_from_slice(&crc.to_le_bytes());
    assert!(b.len() > SEGMENT_HEADER_LEN);
    dir.write_file(&name, b);
    let (spool, report) = Spool::open(Arc::new(dir), spool_cfg(None), clock).expect("reopen");
    let (_, cut, _) = report.truncated_tail.expect("the v2 record is cut from the v1 segment");
    assert!(cut > SEGMENT_HEADER_LEN as u64);
    let got = spool.read_after(Seq(0), u64::MAX).expect("read");
    assert_eq!(got.iter().map(|e| e.event.clone()).collect::<Vec<_>>(), vec![Event::Barrier]);
}

#[test]
fn partial_and_unaligned_reads_match_the_current_state() {
    let (dir, base, clock) = (MemDir::new(), Arc::new(MemVolume::new(VOL)), clock());
    base.write_at(&vec![0x5a; VOL as usize], 0).expect("fill base");
    let mut f = Feed::new(open(&dir, &base, &clock, RetentionPolicy::default()), clock);
    f.cur = vec![0x5a; VOL as usize];
    f.push(Event::Write { volume: VolumeId(0), offset: 1000, data: vec![1; 9000].into() });
    f.push(Event::WriteZeroes { volume: VolumeId(0), offset: 20_000, len: 3000 });
    f.cur[20_000..23_000].fill(0);
    f.push(Event::ResyncBegin { id: 1 });
    f.push(Event::Write { volume: VolumeId(0), offset: 4096 * 10, data: vec![2; 4096].into() });
    for (off, len) in [(0, 1), (999, 2), (4095, 4098), (19_999, 3002), (40_000, 9000), (0, VOL)] {
        let mut got = vec![0u8; len as usize];
        f.log.read_current(VolumeId(0), off, &mut got).expect("read current");
        assert!(got[..] == f.cur[off as usize..(off + len) as usize], "range {off}+{len}");
    }
    let e = f.log.read_current(VolumeId(0), VOL - 10, &mut [0u8; 11]).expect_err("past the end");
    assert!(matches!(e, JournalError::OutOfRange { .. }), "{e:?}");
}
