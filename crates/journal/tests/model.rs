//! Model test: random interleavings of writes, zeroes, discards, barriers, bookmarks,
//! resync windows (nested, and ends without a begin), retention passes, syncs, reopenings
//! volume growth (a grow by whole sectors, so often not by whole 4 KiB blocks, and a shrink
//! that must be refused) and crashes against a plain in-memory model of the volume. Exactly the consistent points
//! (those outside every resync window, and the ends that close one) are offered, and every
//! one reads back byte for byte as the model had it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use tidemark_journal::{
    BlockIo, Bookmark, BookmarkKind, Clock, CrashMode, Event, JournalError, JournalKey, Keep,
    ManualClock, MemDir, MemVolume, Nanos, PointKind, RecoveryPoint, RetentionConfig, RetentionLog,
    RetentionPolicy, Seq, Tier, VolumeId,
};

const VOL: u64 = 64 << 10;
const SECTOR: u64 = 512;

#[derive(Debug, Clone)]
enum Op {
    Write {
        vol: u16,
        sector: u64,
        sectors: u64,
        seed: u8,
    },
    Zero {
        vol: u16,
        sector: u64,
        sectors: u64,
    },
    Discard {
        vol: u16,
        sector: u64,
        sectors: u64,
    },
    Barrier,
    Bookmark(u8),
    /// Opens a resync window with a fresh id.
    ResyncBegin,
    /// Closes the open window picked by the number (or, with none open, must be refused).
    ResyncEnd(u8),
    /// Grows the volume by this many sectors.
    Grow {
        vol: u16,
        sectors: u64,
    },
    /// Tries to shrink the volume by one sector: refused.
    Shrink(u16),
    Time(u64),
    Enforce,
    Sync,
    Reopen,
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    // Offsets are taken modulo the volume's size at the time, so twice the first size
    // reaches into grown ranges.
    let range = (0u16..2, 0u64..(2 * VOL / SECTOR), 1u64..=20);
    prop_oneof![
        8 => (range.clone(), any::<u8>()).prop_map(|((vol, sector, sectors), seed)| Op::Write { vol, sector, sectors, seed }),
        1 => range.clone().prop_map(|(vol, sector, sectors)| Op::Zero { vol, sector, sectors }),
        1 => range.prop_map(|(vol, sector, sectors)| Op::Discard { vol, sector, sectors }),
        3 => Just(Op::Barrier),
        1 => (0u8..3).prop_map(Op::Bookmark),
        1 => Just(Op::ResyncBegin),
        1 => any::<u8>().prop_map(Op::ResyncEnd),
        1 => (0u16..2, 1u64..=24).prop_map(|(vol, sectors)| Op::Grow { vol, sectors }),
        1 => (0u16..2).prop_map(Op::Shrink),
        3 => (1u64..40).prop_map(Op::Time),
        2 => Just(Op::Enforce),
        1 => Just(Op::Sync),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
    ]
}

fn policy(which: u8) -> RetentionPolicy {
    match which {
        0 => RetentionPolicy::default(),
        1 => RetentionPolicy { max_age: Some(Duration::from_secs(120)), ..Default::default() },
        2 => RetentionPolicy {
            max_age: Some(Duration::from_secs(400)),
            max_bytes: None,
            tiers: vec![
                Tier {
                    older_than: Duration::from_secs(30),
                    keep: Keep::Every {
                        interval: Duration::from_secs(20),
                        bookmarks: vec![BookmarkKind::User],
                    },
                },
                Tier {
                    older_than: Duration::from_secs(90),
                    keep: Keep::Bookmarks(vec![BookmarkKind::Filesystem]),
                },
            ],
        },
        _ => RetentionPolicy { max_bytes: Some(256 << 10), ..Default::default() },
    }
}

struct Model {
    /// State of each volume after every sequence number (index 0: the start).
    states: BTreeMap<Seq, Vec<Vec<u8>>>,
    cur: Vec<Vec<u8>>,
    seq: Seq,
    /// The non-data events (barriers, bookmarks, resync markers) by sequence number.
    marks: BTreeMap<Seq, Event>,
    dropped: BTreeSet<Seq>,
    next_resync_id: u64,
}

/// What the marks say about consistency.
struct Analysis {
    /// Consistent points: barriers and bookmarks outside resync spans, and the resync ends
    /// that close a span.
    points: BTreeSet<Seq>,
    /// Resync spans: (begin, closing end).
    spans: Vec<(Seq, Option<Seq>)>,
    /// Ids open at the end.
    open: Vec<u64>,
}

impl Model {
    fn analyze(&self) -> Analysis {
        let mut a = Analysis { points: BTreeSet::new(), spans: Vec::new(), open: Vec::new() };
        for (s, e) in &self.marks {
            match e {
                Event::ResyncBegin { id } => {
                    if a.open.is_empty() {
                        a.spans.push((*s, None));
                    }
                    a.open.push(*id);
                }
                Event::ResyncEnd { id } => {
                    a.open.retain(|i| i != id);
                    if a.open.is_empty() {
                        a.spans.last_mut().expect("span").1 = Some(*s);
                        a.points.insert(*s);
                    }
                }
                _ if a.open.is_empty() => {
                    a.points.insert(*s);
                }
                _ => {}
            }
        }
        a
    }
}

impl Analysis {
    fn inside(&self, s: Seq) -> bool {
        self.spans.iter().any(|(b, e)| s >= *b && e.is_none_or(|e| s < e))
    }

    /// True when the log must treat its blank base as "before the initial sync".
    fn initial_sync(&self, base: Seq) -> bool {
        base == Seq(0) && self.spans.first().is_some_and(|(b, _)| self.points.iter().all(|p| p > b))
    }
}

fn data(seed: u8, seq: Seq, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 7) as u8).wrapping_mul(31).wrapping_add(seq.0 as u8))
        .collect()
}

fn check_all(log: &RetentionLog, model: &Model) -> Result<(), TestCaseError> {
    let points = log.points();
    let an = model.analyze();
    let base = log.status().oldest.seq;
    let newest_point = an.points.iter().next_back().copied();
    // Exactly the consistent points that are neither thinned nor folded into the base.
    let want: BTreeSet<Seq> =
        an.points.iter().copied().filter(|s| *s > base && !model.dropped.contains(s)).collect();
    let got: BTreeSet<Seq> =
        points.iter().filter(|p| p.kind != PointKind::Base).map(|p| p.seq).collect();
    prop_assert_eq!(&got, &want, "offered points");
    prop_assert_eq!(
        points.iter().any(|p| p.kind == PointKind::Base),
        !an.initial_sync(base),
        "the base is offered unless it is the blank replica of an initial sync"
    );
    for p in &points {
        prop_assert!(
            !model.dropped.contains(&p.seq) || p.kind == PointKind::Base,
            "point {} was dropped earlier but is offered again",
            p.seq
        );
        prop_assert!(!an.inside(p.seq), "point {} lies inside a resync window", p.seq);
        if let PointKind::ResyncEnd { id } = p.kind {
            prop_assert_eq!(&model.marks[&p.seq], &Event::ResyncEnd { id });
        }
        let want = model.states.get(&p.seq).expect("model has every seq");
        for (v, want_v) in want.iter().enumerate() {
            let vol = VolumeId(v as u16);
            prop_assert_eq!(log.volume_len_at(vol, p.seq).expect("size"), want_v.len() as u64);
            let mut got = vec![0u8; want_v.len()];
            log.read_at(p, vol, 0, &mut got).expect("read point");
            prop_assert!(&got == want_v, "volume {} differs at point {} ({:?})", v, p.seq, p.kind);
            // Past the point's size is out of range, even where a later state is larger.
            let past = log.read_at(p, vol, want_v.len() as u64, &mut [0u8; 1]);
            prop_assert!(
                matches!(past, Err(JournalError::OutOfRange { .. })),
                "a read past point {}'s size: {:?}",
                p.seq,
                past
            );
        }
    }
    if let Some(np) = newest_point {
        prop_assert!(
            points.iter().any(|p| p.seq == np) || log.status().oldest.seq >= np,
            "the newest point {} is not offered",
            np
        );
    }
    let open_span = an.spans.last().filter(|(_, e)| e.is_none()).map(|(b, _)| *b);
    match open_span {
        Some(b) if an.initial_sync(base) && an.spans.len() == 1 => {
            let e = log.resolve(&RecoveryPoint::Latest).expect_err("latest during initial sync");
            prop_assert!(e.to_string().contains("initial sync"), "{}", e);
            prop_assert!(log.status().last_consistent.is_none());
            prop_assert_eq!(log.status().inconsistent.map(|w| w.begin_seq), Some(b));
        }
        _ => {
            let want_seq = open_span.map_or(model.seq, |b| Seq(b.0 - 1)).max(base);
            let latest = log.resolve(&RecoveryPoint::Latest).expect("latest");
            prop_assert_eq!(latest.seq, want_seq, "latest is the newest consistent state");
            prop_assert_eq!(log.status().inconsistent.map(|w| w.begin_seq), open_span);
            for (v, want) in model.states[&want_seq].iter().enumerate() {
                let mut got = vec![0u8; want.len()];
                log.read_at(&latest, VolumeId(v as u16), 0, &mut got).expect("read latest");
                prop_assert!(&got == want, "latest state of volume {} differs", v);
            }
        }
    }
    // The replica as it is now, consistent or not.
    for (v, want) in model.cur.iter().enumerate() {
        let mut got = vec![0u8; want.len()];
        prop_assert_eq!(log.volume_len(VolumeId(v as u16)).expect("size"), want.len() as u64);
        log.read_current(VolumeId(v as u16), 0, &mut got).expect("read current");
        prop_assert!(&got == want, "current state of volume {} differs", v);
        let mut part = vec![0u8; 5000];
        log.read_current(VolumeId(v as u16), 3000, &mut part).expect("read current, unaligned");
        prop_assert!(
            part[..] == want[3000..8000],
            "unaligned current read of volume {} differs",
            v
        );
    }
    Ok(())
}

#[derive(Debug, Default)]
struct Stats {
    coalesced: usize,
    base_advances: usize,
    space_thinnings: usize,
    dropped: usize,
}

fn run(ops: Vec<Op>, which_policy: u8, encrypted: bool) -> Result<Stats, TestCaseError> {
    let mut stats = Stats::default();
    let dir = MemDir::new();
    let vols: Vec<Arc<MemVolume>> = (0..2).map(|_| Arc::new(MemVolume::new(VOL))).collect();
    let clock = Arc::new(ManualClock::new(Nanos(1_000 * Nanos::SECOND)));
    let cfg = RetentionConfig {
        segment_bytes: 64 << 10,
        block_size: 4096,
        key: encrypted.then(|| JournalKey::from_bytes([7; 32])),
        policy: policy(which_policy),
    };
    let open = |dir: &MemDir| {
        let v: Vec<Arc<dyn BlockIo>> = vols.iter().map(|v| v.clone() as Arc<dyn BlockIo>).collect();
        RetentionLog::open(Arc::new(dir.clone()), v, cfg.clone(), clock.clone()).expect("open").0
    };
    let mut dir = dir;
    let mut log = open(&dir);
    let mut model = Model {
        states: BTreeMap::from([(Seq(0), vec![vec![0; VOL as usize]; 2])]),
        cur: vec![vec![0; VOL as usize]; 2],
        seq: Seq(0),
        marks: BTreeMap::new(),
        dropped: BTreeSet::new(),
        next_resync_id: 1,
    };
    for op in ops {
        let now = clock.now();
        let event = match op {
            Op::Write { vol, sector, sectors, seed } => {
                let size = model.cur[vol as usize].len() as u64;
                let off = (sector * SECTOR) % size;
                let len = (sectors * SECTOR).min(size - off);
                Some(Event::Write {
                    volume: VolumeId(vol),
                    offset: off,
                    data: data(seed, model.seq.next(), len as usize).into(),
                })
            }
            Op::Zero { vol, sector, sectors } => {
                let size = model.cur[vol as usize].len() as u64;
                let off = (sector * SECTOR) % size;
                Some(Event::WriteZeroes {
                    volume: VolumeId(vol),
                    offset: off,
                    len: (sectors * SECTOR).min(size - off) as u32,
                })
            }
            Op::Discard { vol, sector, sectors } => {
                let size = model.cur[vol as usize].len() as u64;
                let off = (sector * SECTOR) % size;
                Some(Event::Discard {
                    volume: VolumeId(vol),
                    offset: off,
                    len: (sectors * SECTOR).min(size - off) as u32,
                })
            }
            Op::Grow { vol, sectors } => {
                let size = model.cur[vol as usize].len() as u64;
                // The writer's old size is informational: the log records its own.
                Some(Event::Resize {
                    volume: VolumeId(vol),
                    old_size: 0,
                    new_size: size + sectors * SECTOR,
                })
            }
            Op::Shrink(vol) => {
                let size = model.cur[vol as usize].len() as u64;
                let e = log
                    .append(
                        model.seq.next(),
                        now,
                        &Event::Resize {
                            volume: VolumeId(vol),
                            old_size: size,
                            new_size: size - SECTOR,
                        },
                    )
                    .expect_err("a shrink");
                prop_assert!(
                    matches!(e, JournalError::Shrink { volume, size: s, new_size }
                        if volume == vol && s == size && new_size == size - SECTOR),
                    "{:?}",
                    e
                );
                prop_assert!(e.to_string().contains(&size.to_string()), "{}", e);
                None
            }
            Op::Barrier => Some(Event::Barrier),
            Op::Bookmark(k) => Some(Event::Bookmark(
                Bookmark::new(format!("bm-{}", model.seq.0 + 1), BookmarkKind::ALL[k as usize], 0)
                    .expect("name"),
            )),
            Op::ResyncBegin => {
                model.next_resync_id += 1;
                Some(Event::ResyncBegin { id: model.next_resync_id - 1 })
            }
            Op::ResyncEnd(k) => {
                let open = model.analyze().open;
                if open.is_empty() {
                    let seq = model.seq.next();
                    let e = log
                        .append(seq, now, &Event::ResyncEnd { id: 999 })
                        .expect_err("an end without a begin");
                    prop_assert!(
                        matches!(e, JournalError::Resync { id: 999, seq: s, .. } if s == seq),
                        "{:?}",
                        e
                    );
                    None
                } else {
                    Some(Event::ResyncEnd { id: open[usize::from(k) % open.len()] })
                }
            }
            Op::Time(s) => {
                clock.advance(Duration::from_secs(s));
                None
            }
            Op::Enforce => {
                let before: BTreeSet<Seq> = log.points().iter().map(|p| p.seq).collect();
                let r = log.enforce().expect("enforce");
                stats.coalesced += r.intervals_coalesced;
                stats.base_advances += usize::from(r.base_advanced_to.is_some());
                stats.space_thinnings += usize::from(r.thinned_for_space);
                stats.dropped += r.dropped_points;
                let after: BTreeSet<Seq> = log.points().iter().map(|p| p.seq).collect();
                for s in before.difference(&after) {
                    model.dropped.insert(*s);
                }
                if let Some(max_age) = cfg.policy.max_age {
                    let now = clock.now();
                    // Bookmarks right above the base start the window with it (the base
                    // stops before their records, the same state): they may be older.
                    let mut start = log.status().oldest.seq;
                    for p in log.points() {
                        if p.seq == start.next() && matches!(p.kind, PointKind::Bookmark(_)) {
                            start = p.seq;
                        }
                    }
                    for p in
                        log.points().iter().filter(|p| p.kind != PointKind::Base && p.seq > start)
                    {
                        prop_assert!(
                            now.saturating_sub(p.time) <= max_age,
                            "point {} older than the maximum age survived",
                            p.seq
                        );
                    }
                }
                None
            }
            Op::Sync => {
                log.sync().expect("sync");
                None
            }
            Op::Reopen => {
                log.sync().expect("sync");
                drop(log);
                log = open(&dir);
                None
            }
            Op::Crash => {
                let durable = log.durable_seq();
                drop(log);
                dir = dir.crash(CrashMode::LoseUnsynced);
                log = open(&dir);
                prop_assert_eq!(log.last_seq(), durable.max(log.status().oldest.seq));
                // What was not durable is gone from the model too.
                let keep_to = log.last_seq();
                model.states.retain(|s, _| *s <= keep_to);
                model.marks.retain(|s, _| *s <= keep_to);
                model.cur = model.states[&keep_to].clone();
                model.seq = keep_to;
                None
            }
        };
        if let Some(ev) = event {
            let seq = model.seq.next();
            log.append(seq, now, &ev).expect("append");
            model.seq = seq;
            if let Some((v, off, len)) = ev.range() {
                let dst = &mut model.cur[v.0 as usize][off as usize..(off + len) as usize];
                match &ev {
                    Event::Write { data, .. } => dst.copy_from_slice(data),
                    _ => dst.fill(0),
                }
            }
            if let Event::Resize { volume, new_size, .. } = &ev {
                model.cur[volume.0 as usize].resize(*new_size as usize, 0);
            } else if ev.range().is_none() {
                model.marks.insert(seq, ev);
            }
            model.states.insert(seq, model.cur.clone());
        }
    }
    check_all(&log, &model)?;
    // Materialize one point per volume and compare whole images.
    let points = log.points();
    if let Some(p) = points.get(points.len() / 2) {
        for v in 0..2u16 {
            let out = MemVolume::new(0);
            let rep = log.materialize(p, VolumeId(v), &out, &mut |_, _| {}).expect("materialize");
            prop_assert!(
                out.snapshot() == model.states[&p.seq][v as usize],
                "materialized image differs"
            );
            let want = blake3::hash(&model.states[&p.seq][v as usize]);
            prop_assert_eq!(rep.hash, *want.as_bytes());
        }
    }
    // Seq reads in the unthinned region are exact too, unless inside a resync window.
    let horizon = points.iter().map(|p| p.seq).max().unwrap_or(Seq(0));
    let last = log.last_seq();
    let an = model.analyze();
    if last > horizon {
        let r = log.resolve(&RecoveryPoint::Seq(last));
        if an.inside(last) {
            let e = r.expect_err("a seq inside a resync window or before the initial sync");
            prop_assert!(e.to_string().contains("resync window id"), "{}", e);
        } else {
            let at = r.expect("seq");
            let mut got = vec![0u8; model.states[&last][0].len()];
            log.read_at(&at, VolumeId(0), 0, &mut got).expect("read");
            prop_assert!(got == model.states[&last][0]);
        }
    }
    Ok(stats)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48),
        ..ProptestConfig::default()
    })]

    #[test]
    fn retention_log_matches_model(ops in prop::collection::vec(op(), 1..120), which in 0u8..4, enc in any::<bool>()) {
        run(ops, which, enc)?;
    }
}

#[test]
fn thinning_keeps_every_retained_point_exact() {
    // A deterministic long run through every policy, so CI always exercises coalescing.
    for which in 0..4u8 {
        let mut ops = Vec::new();
        for i in 0..400u64 {
            ops.push(Op::Write {
                vol: (i % 2) as u16,
                sector: (i * 37) % 128,
                sectors: 1 + i % 17,
                seed: i as u8,
            });
            if i % 3 == 0 {
                ops.push(Op::Barrier);
            }
            if i % 25 == 0 {
                ops.push(Op::Bookmark((i % 3) as u8));
            }
            if i % 5 == 0 {
                ops.push(Op::Time(4));
            }
            if i % 40 == 39 {
                ops.push(Op::Enforce);
            }
            // Resync windows, one of them overlapping another, so thinning and base
            // advances meet open and closed windows.
            match i % 90 {
                10 | 30 => ops.push(Op::ResyncBegin),
                40 | 70 => ops.push(Op::ResyncEnd(0)),
                _ => {}
            }
            if i % 150 == 149 {
                ops.push(Op::Crash);
            }
            // Growth, by whole blocks and by a few sectors, so folds and coalescing meet it.
            if i % 60 == 20 {
                ops.push(Op::Grow {
                    vol: (i % 2) as u16,
                    sectors: if i % 120 == 20 { 8 } else { 3 },
                });
            }
        }
        ops.push(Op::Barrier);
        ops.push(Op::Enforce);
        let stats = run(ops, which, which % 2 == 1).expect("model run");
        eprintln!("policy {which}: {stats:?}");
        match which {
            0 => assert_eq!(stats.dropped, 0, "no policy drops nothing"),
            1 => assert!(stats.base_advances > 0, "max age moved the base"),
            2 => {
                assert!(stats.coalesced > 0 && stats.base_advances > 0, "tiers coalesced intervals")
            }
            _ => assert!(stats.space_thinnings > 0, "space limit thinned history"),
        }
    }
}
