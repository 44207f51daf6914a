//! Write holds (`tidemark_tap::gate`) cutting one bookmark across two taps, as a
//! consistency group's coordinator does: hold both, append the bookmark on both under their
//! holds, release both. A writer makes dependent writes across the two volumes (a counter
//! to volume A, and only once that write completed the same counter to volume B); in every
//! group bookmark, B's counter is A's or one less: the two cuts are one state of the pair.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tidemark_journal::{
    Bookmark, BookmarkKind, Event, ManualClock, MemDir, MemVolume, Nanos, Seq, Spool, SpoolConfig,
};
use tidemark_tap::{HoldRefusal, IntentConfig, IntentMap, Tap, TapConfig, TapError};

const DEVICE: u64 = 4 << 20;

fn tap() -> Tap {
    let clock = Arc::new(ManualClock::new(Nanos(1_700_000_000 * Nanos::SECOND)));
    let cfg = SpoolConfig { capacity_bytes: 1 << 30, segment_bytes: 1 << 20, key: None };
    let (spool, _) = Spool::open(Arc::new(MemDir::new()), cfg, clock).expect("spool");
    let map = MemDir::new();
    let icfg = IntentConfig { region_bytes: 64 << 10, max_hot_regions: 64, max_runs: 256 };
    let (intent, _) = IntentMap::open(
        tidemark_journal::Dir::open(&map, "intent.map", true).expect("map"),
        DEVICE,
        icfg,
    )
    .expect("intent map");
    Tap::new(Arc::new(MemVolume::new(DEVICE)), spool, intent, TapConfig::default()).expect("tap")
}

fn counter(n: u64) -> Bytes {
    let mut b = vec![0u8; 4096];
    b[..8].copy_from_slice(&n.to_le_bytes());
    Bytes::from(b)
}

/// The counter each group bookmark of `tap`'s stream cuts at: `(group, counter)` in order.
fn cuts(tap: &Tap) -> Vec<(u64, u64)> {
    tap.sync_spool().expect("sync");
    let mut value = 0;
    let mut out = Vec::new();
    for e in tap.read_after(Seq::ZERO, u64::MAX).expect("read") {
        match e.event {
            Event::Write { offset: 0, data, .. } => {
                value = u64::from_le_bytes(data[..8].try_into().unwrap())
            }
            Event::Bookmark(b) if b.group != 0 => out.push((b.group, value)),
            _ => {}
        }
    }
    out
}

#[test]
fn a_group_bookmark_under_holds_cuts_both_volumes_at_one_state() {
    let (a, b) = (Arc::new(tap()), Arc::new(tap()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (a, b, stop) = (a.clone(), b.clone(), stop.clone());
        thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                a.write(0, counter(n)).expect("write a");
                b.write(0, counter(n)).expect("write b");
            }
            n
        })
    };
    let lease = Duration::from_secs(10);
    for group in 1..=40u64 {
        let ha = a.hold_writes(lease).expect("hold a");
        let hb = b.hold_writes(lease).expect("hold b");
        // Some writes run between two cuts.
        let name = format!("g{group}");
        a.bookmark_held(ha.token, Bookmark::new(&name, BookmarkKind::User, group).unwrap())
            .expect("bookmark a");
        a.release_writes(ha.token).expect("release a");
        b.bookmark_held(hb.token, Bookmark::new(&name, BookmarkKind::User, group).unwrap())
            .expect("bookmark b");
        b.release_writes(hb.token).expect("release b");
        let until = Instant::now() + Duration::from_secs(10);
        let before = a.status().writes;
        while a.status().writes < before + 3 {
            assert!(Instant::now() < until, "the writer made no progress after a release");
            thread::yield_now();
        }
    }
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap();
    let (ca, cb) = (cuts(&a), cuts(&b));
    assert_eq!(ca.len(), 40);
    assert_eq!(
        ca.iter().map(|c| c.0).collect::<Vec<_>>(),
        cb.iter().map(|c| c.0).collect::<Vec<_>>()
    );
    let mut distinct = std::collections::BTreeSet::new();
    for ((g, va), (_, vb)) in ca.iter().zip(&cb) {
        assert!(vb <= va && va - vb <= 1, "group bookmark {g}: A at {va}, B at {vb}");
        distinct.insert(*va);
    }
    assert!(distinct.len() > 10, "the cuts hardly moved: {distinct:?} of {written} writes");
}

#[test]
fn a_hold_blocks_writes_until_its_lease_and_then_refuses_the_bookmark() {
    let t = Arc::new(tap());
    let lease = Duration::from_secs(1);
    // Before the hold, so that `done - started` can only overstate how long it held.
    let started = Instant::now();
    let h = t.hold_writes(lease).expect("hold");
    let w = {
        let t = t.clone();
        thread::spawn(move || {
            t.write(0, counter(1)).expect("write");
            Instant::now()
        })
    };
    while t.hold_status().waiting == 0 && !w.is_finished() {
        thread::yield_now();
    }
    let writes = t.status().writes;
    // Read while the lease still ran (however slow this thread was): nothing admitted.
    if started.elapsed() < lease {
        assert_eq!(writes, 0, "a write was admitted during the hold");
    }
    let done = w.join().unwrap();
    assert_eq!(t.hold_status().waited, 1, "the write did not wait at the gate");
    assert!(done - started >= lease, "the write passed the hold after {:?}", done - started);
    let e = t
        .bookmark_held(h.token, Bookmark::new("late", BookmarkKind::User, 9).unwrap())
        .unwrap_err();
    assert!(matches!(e, TapError::Hold(HoldRefusal::NotHeld { expired: true, .. })), "{e}");
    assert!(e.to_string().contains("lease ran out"), "{e}");
    assert!(cuts(&t).is_empty(), "a bookmark was appended after the lease ran out");
    assert_eq!(t.hold_status().expired, 1);
}
