//! Point holds: a held state stays readable byte for byte through retention passes that
//! would otherwise fold or thin the history it needs (age, sparse tiers, space), and the
//! history goes once the hold is released.

use std::sync::Arc;
use std::time::Duration;

use tidemark_journal::{
    BlockIo, Bookmark, BookmarkKind, Clock, Event, Keep, ManualClock, MemDir, MemVolume, Nanos,
    PointHold, PointInfo, PointKind, RecoveryPoint, RetentionConfig, RetentionLog, RetentionPolicy,
    Seq, Tier, VolumeId,
};

const VOL: u64 = 256 << 10;
const BLOCKS: u64 = VOL / 4096;

struct Feed {
    log: RetentionLog,
    clock: Arc<ManualClock>,
    seq: u64,
    cur: Vec<u8>,
    /// The volume after each sequence number (index = seq).
    states: Vec<Vec<u8>>,
}

impl Feed {
    fn new(policy: RetentionPolicy) -> Self {
        let clock = Arc::new(ManualClock::new(Nanos(1_800_000_000 * Nanos::SECOND)));
        let base = Arc::new(MemVolume::new(VOL));
        let cfg = RetentionConfig { segment_bytes: 64 << 10, policy, ..Default::default() };
        let (log, _) = RetentionLog::open(
            Arc::new(MemDir::new()),
            vec![base as Arc<dyn BlockIo>],
            cfg,
            clock.clone(),
        )
        .expect("open");
        Self { log, clock, seq: 0, cur: vec![0; VOL as usize], states: vec![vec![0; VOL as usize]] }
    }

    fn push(&mut self, e: Event) -> Seq {
        self.seq += 1;
        self.clock.advance(Duration::from_secs(60));
        self.log.append(Seq(self.seq), self.clock.now(), &e).expect("append");
        if let Event::Write { offset, data, .. } = &e {
            self.cur[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
        }
        self.states.push(self.cur.clone());
        Seq(self.seq)
    }

    /// A round: every block rewritten with `round`-derived bytes, then a barrier or a
    /// bookmark. Returns the point's seq.
    fn round(&mut self, round: u64, bookmark: Option<&str>) -> Seq {
        for b in 0..BLOCKS {
            let fill = (round * 31 + b) as u8;
            self.push(Event::Write {
                volume: VolumeId(0),
                offset: b * 4096,
                data: vec![fill; 4096].into(),
            });
        }
        match bookmark {
            Some(name) => self.push(Event::Bookmark(
                Bookmark::new(name, BookmarkKind::User, 0).expect("bookmark name"),
            )),
            None => self.push(Event::Barrier),
        }
    }

    fn read(&self, p: &PointInfo) -> Vec<u8> {
        let mut got = vec![0u8; VOL as usize];
        self.log.read_at(p, VolumeId(0), 0, &mut got).expect("read");
        got
    }

    fn expect(&self, p: &PointInfo) -> &[u8] {
        &self.states[p.seq.0 as usize]
    }
}

#[test]
fn a_held_point_survives_age_and_tiers_then_thins_after_release() {
    // Everything older than 1 h is dropped; between 10 min and 1 h only bookmarks stay.
    let mut f = Feed::new(RetentionPolicy {
        max_age: Some(Duration::from_secs(3600)),
        max_bytes: None,
        tiers: vec![Tier {
            older_than: Duration::from_secs(600),
            keep: Keep::Bookmarks(vec![BookmarkKind::User]),
        }],
    });
    let mut barriers = Vec::new();
    for r in 0..6 {
        barriers.push(f.round(r, None));
    }
    let held = f.log.resolve(&RecoveryPoint::Seq(barriers[2])).expect("resolve a barrier");
    // A state between points: the middle of round 4 (not a barrier).
    let mid_seq = Seq(barriers[3].0 + BLOCKS / 2);
    let mid = f.log.resolve(&RecoveryPoint::Seq(mid_seq)).expect("resolve a mid-round seq");
    let hold = f.log.hold(&held).expect("hold");
    let hold_mid = f.log.hold(&mid).expect("hold mid");
    assert_eq!(f.log.held(), vec![held.seq, mid.seq]);
    assert_eq!(hold.point(), &held);

    // Later rounds, then time passes: every barrier so far is past the tier, most past the
    // maximum age.
    for r in 6..9 {
        f.round(r, None);
    }
    f.clock.advance(Duration::from_secs(3000));
    let report = f.log.enforce().expect("enforce with holds");
    assert!(report.kept_for_holds >= 2, "{report:?}");
    assert!(
        report.base_advanced_to.is_none_or(|b| b <= held.seq),
        "the base moved past the hold: {report:?}"
    );
    assert_eq!(f.read(&held), f.expect(&held), "the held barrier reads back changed");
    assert_eq!(f.read(&mid), f.expect(&mid), "the held mid-round state reads back changed");
    // Still readable after another pass and more writes.
    f.round(9, None);
    f.clock.advance(Duration::from_secs(600));
    f.log.enforce().expect("second pass");
    assert_eq!(f.read(&held), f.expect(&held));
    assert_eq!(f.read(&mid), f.expect(&mid));

    // Released: the next pass thins past both.
    drop(hold);
    drop(hold_mid);
    assert!(f.log.held().is_empty());
    let before = f.log.status();
    let report = f.log.enforce().expect("enforce after release");
    let base = report.base_advanced_to.expect("the base moves once the holds are gone");
    assert!(base > mid.seq, "base {base} still at or below the released hold {}", mid.seq);
    assert!(report.bytes_after < before.bytes, "{report:?}");
    assert!(f.log.resolve(&RecoveryPoint::Seq(held.seq)).is_err(), "the thinned point resolves");
    // The newest point is intact.
    let latest = f.log.resolve(&RecoveryPoint::Latest).expect("latest");
    assert_eq!(f.read(&latest), f.expect(&latest));
}

#[test]
fn a_held_bookmark_survives_coalescing_of_its_neighbours() {
    // Between 10 min and 1 day, one point an hour: rounds 1 minute apart coalesce.
    let mut f = Feed::new(RetentionPolicy {
        max_age: None,
        max_bytes: None,
        tiers: vec![Tier {
            older_than: Duration::from_secs(600),
            keep: Keep::Every { interval: Duration::from_secs(3600 * 24), bookmarks: vec![] },
        }],
    });
    let mut points = Vec::new();
    for r in 0..8 {
        let name = format!("b{r}");
        points.push(f.round(r, Some(&name)));
    }
    let held = f.log.resolve(&RecoveryPoint::Bookmark("b3".into())).expect("b3");
    assert_eq!(held.seq, points[3]);
    let hold = f.log.hold(&held).expect("hold b3");
    f.clock.advance(Duration::from_secs(7200));
    f.round(8, None);
    let report = f.log.enforce().expect("enforce");
    assert!(report.dropped_points > 0, "nothing thinned: {report:?}");
    // b0..b2 went and the base moved up to right before b3's record (the oldest point
    // kept, the same state), never past it; b3 stays a bookmark.
    assert_eq!(report.base_advanced_to, Some(Seq(held.seq.0 - 1)), "{report:?}");
    assert_eq!(f.log.resolve(&RecoveryPoint::Seq(held.seq)).expect("b3's state").seq, held.seq);
    assert_eq!(f.log.resolve(&RecoveryPoint::Bookmark("b3".into())).expect("b3").seq, held.seq);
    assert_eq!(f.read(&held), f.expect(&held));
    // b4..b7 were coalesced into the next kept point; b3 still reads the same.
    assert!(report.intervals_coalesced > 0 || report.dropped_points >= 7, "{report:?}");
    drop(hold);
    // Released: b3 starts the window now, which it does until a later point leaves it.
    let report = f.log.enforce().expect("enforce after release");
    assert_eq!(report.kept_for_holds, 0, "{report:?}");
}

#[test]
fn a_hold_stops_the_space_limit_and_says_so() {
    let mut f = Feed::new(RetentionPolicy {
        max_age: None,
        max_bytes: Some(4 * (64 << 10)),
        tiers: vec![],
    });
    let first = f.round(0, None);
    let held = f.log.resolve(&RecoveryPoint::Seq(first)).expect("first barrier");
    let hold = f.log.hold(&held).expect("hold");
    for r in 1..12 {
        f.round(r, None);
    }
    let report = f.log.enforce().expect("enforce");
    assert!(report.space_held_by_holds, "{report:?}");
    assert!(report.base_advanced_to.is_none_or(|b| b <= held.seq), "{report:?}");
    assert_eq!(f.read(&held), f.expect(&held));
    drop(hold);
    let report = f.log.enforce().expect("enforce after release");
    assert!(!report.space_held_by_holds, "{report:?}");
    assert!(report.bytes_after <= 4 * (64 << 10), "{report:?}");
}

#[test]
fn holding_a_point_outside_the_window_is_refused() {
    let mut f = Feed::new(RetentionPolicy::default());
    f.round(0, None);
    let future = PointInfo { seq: Seq(10_000), time: Nanos(0), kind: PointKind::Latest };
    let err = f.log.hold(&future).expect_err("a point not received yet");
    assert!(err.to_string().contains("seq 10000"), "{err}");
}

mod model {
    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// Write `fill` into block `block` (of 64).
        Write {
            block: u64,
            fill: u8,
        },
        Barrier,
        Bookmark,
        /// Hold the state after the `pick`-th retained seq (mod the count).
        Hold {
            pick: usize,
        },
        /// Drop the `pick`-th live hold.
        Release {
            pick: usize,
        },
        /// Let `minutes` pass, then run a retention pass.
        Enforce {
            minutes: u64,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..BLOCKS, any::<u8>()).prop_map(|(block, fill)| Op::Write { block, fill }),
            2 => Just(Op::Barrier),
            1 => Just(Op::Bookmark),
            1 => any::<usize>().prop_map(|pick| Op::Hold { pick }),
            1 => any::<usize>().prop_map(|pick| Op::Release { pick }),
            2 => (1..120u64).prop_map(|minutes| Op::Enforce { minutes }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Whatever the interleaving of writes, holds, releases and retention passes (age,
        /// sparse tiers, space), every held state reads back as the model says.
        #[test]
        fn held_states_read_back_exactly(ops in proptest::collection::vec(op(), 1..80)) {
            let mut f = Feed::new(RetentionPolicy {
                max_age: Some(Duration::from_secs(3 * 3600)),
                max_bytes: Some(4 * (64 << 10)),
                tiers: vec![Tier {
                    older_than: Duration::from_secs(1800),
                    keep: Keep::Every { interval: Duration::from_secs(3600), bookmarks: vec![] },
                }],
            });
            let mut holds: Vec<PointHold> = Vec::new();
            let mut marks = 0;
            for op in ops {
                match op {
                    Op::Write { block, fill } => {
                        f.push(Event::Write {
                            volume: VolumeId(0),
                            offset: block * 4096,
                            data: vec![fill; 4096].into(),
                        });
                    }
                    Op::Barrier => {
                        f.push(Event::Barrier);
                    }
                    Op::Bookmark => {
                        marks += 1;
                        let b = Bookmark::new(format!("m{marks}"), BookmarkKind::User, 0).unwrap();
                        f.push(Event::Bookmark(b));
                    }
                    Op::Hold { pick } => {
                        // Any retained state: an offered point or a seq that still resolves.
                        let base = f.log.status().oldest.seq.0;
                        let last = f.log.last_seq().0;
                        let seq = Seq(base + (pick as u64) % (last - base + 1));
                        if let Ok(p) = f.log.resolve(&RecoveryPoint::Seq(seq)) {
                            holds.push(f.log.hold(&p).expect("hold a resolved point"));
                        }
                    }
                    Op::Release { pick } => {
                        if !holds.is_empty() {
                            let i = pick % holds.len();
                            holds.swap_remove(i);
                        }
                    }
                    Op::Enforce { minutes } => {
                        f.clock.advance(Duration::from_secs(minutes * 60));
                        f.log.enforce().expect("enforce");
                    }
                }
                for h in &holds {
                    prop_assert_eq!(f.read(h.point()), f.expect(h.point()), "held seq {}", h.point().seq);
                }
            }
            let mut want: Vec<Seq> = holds.iter().map(|h| h.point().seq).collect();
            want.sort();
            want.dedup();
            prop_assert_eq!(f.log.held(), want);
        }
    }
}
