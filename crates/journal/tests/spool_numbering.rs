//! A number the spool gave to an event lost in a crash (appended, never synced) is given
//! again after reopening, even when a manifest was written between the append and the
//! crash (found by the deterministic simulation, `tests/src/sim`: the reopened spool
//! skipped the lost numbers, and the shipper met a gap).

use std::sync::Arc;

use bytes::Bytes;
use tidemark_journal::{
    CrashMode, Event, ManualClock, MemDir, Nanos, Seq, Spool, SpoolConfig, VolumeId,
};

fn write(i: u64) -> Event {
    Event::Write { volume: VolumeId(0), offset: i * 4096, data: Bytes::from(vec![i as u8; 4096]) }
}

#[test]
fn numbers_lost_in_a_crash_are_given_again_after_a_manifest_write() {
    let clock = Arc::new(ManualClock::new(Nanos(1)));
    let dir = MemDir::new();
    let cfg = SpoolConfig { capacity_bytes: 1 << 30, segment_bytes: 64 << 10, key: None };
    let (mut spool, _) = Spool::open(Arc::new(dir.clone()), cfg.clone(), clock.clone()).unwrap();
    // Enough events to fill a few segments, all durable.
    for i in 0..40 {
        spool.append(&write(i)).unwrap();
    }
    let durable = spool.sync().unwrap();
    assert_eq!(durable, Seq(40));
    // Appended, not synced; then an ack drops whole segments, which writes the manifest.
    for i in 40..43 {
        spool.append(&write(i)).unwrap();
    }
    spool.ack(Seq(30)).unwrap();
    assert!(dir.list_segments().len() < 3, "the ack should have dropped segments");
    let crashed = dir.crash(CrashMode::LoseUnsynced);
    drop(spool);
    let (mut spool, _) = Spool::open(Arc::new(crashed), cfg, clock).unwrap();
    assert_eq!(spool.last_seq(), durable, "the reopened spool claims numbers it lost");
    assert_eq!(spool.append(&write(99)).unwrap(), Seq(41), "the next event follows on");
    spool.sync().unwrap();
    let events = spool.read_after(Seq(30), u64::MAX).unwrap();
    let seqs: Vec<u64> = events.iter().map(|e| e.seq.0).collect();
    assert_eq!(seqs, (31..=41).collect::<Vec<_>>(), "the stream has a gap");
}

/// The capture time of the oldest unacknowledged event (what a pair's RPO is measured
/// from) follows acks and survives a reopen.
#[test]
fn oldest_unacked_time_follows_acks_and_reopens() {
    let clock = Arc::new(ManualClock::new(Nanos(1_000)));
    let dir = MemDir::new();
    let cfg = SpoolConfig { capacity_bytes: 1 << 30, segment_bytes: 64 << 10, key: None };
    let (mut spool, _) = Spool::open(Arc::new(dir.clone()), cfg.clone(), clock.clone()).unwrap();
    assert_eq!(spool.oldest_unacked_time(), None);
    for i in 0..5 {
        clock.set(Nanos(1_000 + i * 10));
        spool.append(&write(i)).unwrap();
    }
    assert_eq!(spool.oldest_unacked_time(), Some(Nanos(1_000)));
    spool.sync().unwrap();
    spool.ack(Seq(2)).unwrap();
    assert_eq!(spool.oldest_unacked_time(), Some(Nanos(1_020)), "the third event is oldest");
    spool.close().unwrap();
    let (mut spool, _) = Spool::open(Arc::new(dir), cfg, clock).unwrap();
    assert_eq!(spool.oldest_unacked_time(), Some(Nanos(1_020)), "after reopening");
    spool.ack(Seq(5)).unwrap();
    assert_eq!(spool.oldest_unacked_time(), None);
}
