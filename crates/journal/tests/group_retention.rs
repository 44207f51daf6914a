//! Sparse retention tiers keep a consistency group's bookmarks (group id not 0) whatever
//! the other points of the log are, so every member of a group keeps them alike; ordinary
//! bookmarks of a kind the tier does not list are thinned to one point per interval.

use std::sync::Arc;
use std::time::Duration;

use tidemark_journal::{
    BlockIo, Bookmark, BookmarkKind, Clock, Event, Keep, ManualClock, MemDir, MemVolume, Nanos,
    PointKind, RecoveryPoint, RetentionConfig, RetentionLog, RetentionPolicy, Seq, Tier, VolumeId,
};

const VOL: u64 = 64 << 10;

#[test]
fn tiers_keep_group_bookmarks_and_thin_the_others() {
    let clock = Arc::new(ManualClock::new(Nanos(1_800_000_000 * Nanos::SECOND)));
    let policy = RetentionPolicy {
        max_age: None,
        max_bytes: None,
        tiers: vec![Tier {
            older_than: Duration::from_secs(600),
            keep: Keep::Every { interval: Duration::from_secs(86_400), bookmarks: vec![] },
        }],
    };
    let cfg = RetentionConfig { segment_bytes: 64 << 10, policy, ..Default::default() };
    let base = Arc::new(MemVolume::new(VOL));
    let (mut log, _) = RetentionLog::open(
        Arc::new(MemDir::new()),
        vec![base as Arc<dyn BlockIo>],
        cfg,
        clock.clone(),
    )
    .expect("open");
    let mut seq = 0;
    let mut push = |log: &mut RetentionLog, e: Event| {
        seq += 1;
        clock.advance(Duration::from_secs(60));
        log.append(Seq(seq), clock.now(), &e).expect("append");
        Seq(seq)
    };
    let mut group_seqs = Vec::new();
    for r in 0..8u8 {
        push(&mut log, Event::Write { volume: VolumeId(0), offset: 0, data: vec![r; 4096].into() });
        let group = if r % 3 == 1 { 0x5eed_0000 + u64::from(r) } else { 0 };
        let s = push(
            &mut log,
            Event::Bookmark(Bookmark::new(format!("b{r}"), BookmarkKind::User, group).unwrap()),
        );
        if group != 0 {
            group_seqs.push((s, r));
        }
    }
    clock.advance(Duration::from_secs(7200));
    push(&mut log, Event::Write { volume: VolumeId(0), offset: 0, data: vec![99; 4096].into() });
    push(&mut log, Event::Barrier);
    let report = log.enforce().expect("enforce");
    assert!(report.dropped_points > 0, "nothing thinned: {report:?}");
    let kept: Vec<_> = log
        .points()
        .into_iter()
        .filter_map(|p| match p.kind {
            PointKind::Bookmark(b) => Some((p.seq, b.name, b.group)),
            _ => None,
        })
        .collect();
    let plain = kept.iter().filter(|k| k.2 == 0).count();
    assert!(plain <= 1, "plain bookmarks not thinned to one per interval: {kept:?}");
    // The oldest kept point becomes the base (which is listed as the base, not as a
    // bookmark: docs/consistency-groups.md, limits); every group bookmark after it stays.
    let base = log.points()[0].seq;
    assert_eq!(base, group_seqs[0].0, "the base moved to {base}, not to the first group bookmark");
    for (s, r) in &group_seqs[1..] {
        assert!(
            kept.iter().any(|k| k.0 == *s),
            "group bookmark b{r} (seq {s}) was thinned: {kept:?}"
        );
        let p = log.resolve(&RecoveryPoint::Bookmark(format!("b{r}"))).expect("resolve");
        let mut buf = vec![0u8; 4096];
        log.read_at(&p, VolumeId(0), 0, &mut buf).expect("read");
        assert!(buf.iter().all(|&b| b == *r), "group bookmark b{r} reads {}", buf[0]);
    }
}
