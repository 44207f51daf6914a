//! Every recovery point a target offers is a state the source could have had after a power
//! cut, checked with `tidemark_tests::crashcheck` against a recorded source history:
//! - a random workload of concurrent writers, write-zeroes, discards, flushes and bookmarks
//!   through a tap, shipped while it runs (with one link cut) to an in-process target; the
//!   history is what the workload did, numbered by the sequence numbers the tap returned;
//! - a dm-log-writes recording of a random workload (FUA, preflush, discards, marks), read
//!   back with the reader, spooled and shipped; and the reader's own replay stopped at every
//!   flush point and mark.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::{Replication, assert_all_consistent, check_every_point, memory_spool, tap_over};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tidemark_journal::{BlockIo, Bookmark, BookmarkKind, Event, MemVolume, Seq, VolumeId};
use tidemark_tap::{Captured, DmLog};
use tidemark_tests::crashcheck::{History, SECTOR};
use tidemark_tests::figures;

#[path = "../../crates/tap/tests/common/mod.rs"]
mod dmlog_writer;

const V: VolumeId = VolumeId(0);
const DEVICE: u64 = 4 << 20;
const SECTORS: u64 = DEVICE / SECTOR;

/// A sector-aligned range of 1 to 32 sectors inside the device.
fn range(rng: &mut impl Rng) -> (u64, u64) {
    let sectors = rng.gen_range(1..=32);
    let start = rng.gen_range(0..=SECTORS - sectors);
    (start * SECTOR, sectors * SECTOR)
}

fn random_bytes(rng: &mut impl Rng, len: u64) -> Bytes {
    let mut v = vec![0u8; len as usize];
    rng.fill(&mut v[..]);
    Bytes::from(v)
}

/// The seq of an event the tap spooled (the workload never overflows the spool).
fn spooled(c: Captured, what: &str) -> Seq {
    match c {
        Captured::Spooled(seq) => seq,
        other => panic!("{what} was not spooled: {other:?}"),
    }
}

#[test]
fn every_target_point_of_a_concurrent_tap_workload_is_crash_consistent() {
    const WRITERS: u64 = 2;
    const OPS_PER_WRITER: u64 = 500;
    let device: Arc<dyn BlockIo> = Arc::new(MemVolume::new(DEVICE));
    let spool = Arc::new(Mutex::new(memory_spool()));
    let tap = tap_over(device, spool.clone());
    let target = Arc::new(Replication::start(spool, DEVICE));

    // seq -> event, as each caller learnt its seq from the tap. Every thread writes,
    // flushes and bookmarks, so the points do not depend on how the threads are scheduled.
    let recorded = Arc::new(Mutex::new(BTreeMap::<Seq, Event>::new()));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (tap, recorded, target) = (tap.clone(), recorded.clone(), target.clone());
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(0xC0FFEE + w);
                let mut bookmarks = 0u64;
                for op in 0..OPS_PER_WRITER {
                    if w == 0 && op == OPS_PER_WRITER / 2 {
                        // A link failure halfway: the shipper reconnects and resumes.
                        target.set_link(false);
                        target.set_link(true);
                    }
                    let (offset, len) = range(&mut rng);
                    let (captured, event) = match rng.gen_range(0..40) {
                        0..=1 => (
                            tap.write_zeroes(offset, len).expect("write zeroes"),
                            Event::WriteZeroes { volume: V, offset, len: len as u32 },
                        ),
                        2..=3 => (
                            tap.discard(offset, len).expect("discard"),
                            Event::Discard { volume: V, offset, len: len as u32 },
                        ),
                        4..=7 => (tap.flush().expect("flush"), Event::Barrier),
                        8 => {
                            bookmarks += 1;
                            let name = format!("writer{w}-{bookmarks}");
                            let b = Bookmark::new(name, BookmarkKind::User, 0).unwrap();
                            (tap.bookmark(b.clone()).expect("bookmark"), Event::Bookmark(b))
                        }
                        _ => {
                            let data = random_bytes(&mut rng, len);
                            (
                                tap.write(offset, data.clone()).expect("write"),
                                Event::Write { volume: V, offset, data },
                            )
                        }
                    };
                    let seq = spooled(captured, "an event");
                    let mut rec = recorded.lock().unwrap();
                    if matches!(event, Event::Barrier) {
                        // A flush with nothing since the last barrier gives no new event: the
                        // tap returns that barrier's seq (whoever issued it).
                        rec.entry(seq).or_insert(event);
                    } else {
                        assert!(rec.insert(seq, event).is_none(), "seq {seq} given twice");
                    }
                }
                bookmarks
            })
        })
        .collect();
    let mut bookmarks = 0;
    for w in writers {
        bookmarks += w.join().expect("writer thread");
    }
    // The end of the workload: a bookmark, so the last writes are on a point.
    let final_bookmark = Bookmark::new("final", BookmarkKind::Filesystem, 0).unwrap();
    let seq =
        spooled(tap.bookmark(final_bookmark.clone()).expect("bookmark"), "the final bookmark");
    recorded.lock().unwrap().insert(seq, Event::Bookmark(final_bookmark));
    let last = tap.sync_spool().expect("sync spool");
    let acked = target.wait_acked(last);

    let recorded = std::mem::take(&mut *recorded.lock().unwrap());
    let seqs: Vec<u64> = recorded.keys().map(|s| s.0).collect();
    assert_eq!(
        seqs,
        (1..=last.0).collect::<Vec<_>>(),
        "the workload's record must hold every spooled event exactly once"
    );
    let mut history = History::zeroed(V, DEVICE).unwrap();
    for (seq, event) in recorded {
        history.push(seq, event).unwrap();
    }
    let flush_points = history.flush_points().len() as u64;
    println!("{} events, {flush_points} flush points ({bookmarks} bookmarks)", last.0);

    let checked = check_every_point(&history, &target, acked);
    figures::report("scenarios_run", 1);
    assert_all_consistent(&checked);
    assert_eq!(checked.acked_writes_lost, 0);
    // Every flush point is offered (nothing thins the log here), plus the base.
    assert_eq!(checked.points, flush_points + 1, "points checked vs flush points recorded");
    assert_eq!(checked.bookmarks, bookmarks + 1);
}

/// One entry of a generated dm-log-writes workload.
#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, data: Vec<u8>, flags: u64 },
    Flush,
    Discard { offset: u64, len: u64 },
    Mark(String),
}

#[test]
fn every_point_of_a_dm_log_writes_recording_is_crash_consistent() {
    use dmlog_writer::{FLUSH, FUA, LogWriter};

    let mut rng = StdRng::seed_from_u64(0x0010_6117);
    let mut writer = LogWriter::new(SECTOR as u32);
    // Events each entry stands for, as docs/dm-log-writes.md maps them.
    let mut expected: Vec<Event> = Vec::new();
    // The number of events after each entry.
    let mut events_after: Vec<u64> = Vec::new();
    let mut marks = 0;
    for _ in 0..600 {
        let op = match rng.gen_range(0..40) {
            0..=3 => Op::Flush,
            4..=5 => {
                let (offset, len) = range(&mut rng);
                Op::Discard { offset, len }
            }
            6 => {
                marks += 1;
                Op::Mark(format!("mark-{marks}"))
            }
            n => {
                let (offset, len) = range(&mut rng);
                let flags = match n {
                    7..=8 => FUA,
                    9 => FLUSH,
                    10 => FLUSH | FUA,
                    _ => 0,
                };
                Op::Write { offset, data: random_bytes(&mut rng, len).to_vec(), flags }
            }
        };
        match &op {
            Op::Write { offset, data, flags } => {
                writer.write_flags(*offset, data, *flags);
                if flags & FLUSH != 0 {
                    expected.push(Event::Barrier);
                }
                expected.push(Event::Write {
                    volume: V,
                    offset: *offset,
                    data: Bytes::from(data.clone()),
                });
                if flags & FUA != 0 {
                    expected.push(Event::Barrier);
                }
            }
            Op::Flush => {
                writer.flush();
                expected.push(Event::Barrier);
            }
            Op::Discard { offset, len } => {
                writer.discard(*offset, *len);
                expected.push(Event::Discard { volume: V, offset: *offset, len: *len as u32 });
            }
            Op::Mark(name) => {
                writer.mark(name);
                expected.push(Event::Bookmark(Bookmark::new(name, BookmarkKind::User, 0).unwrap()));
            }
        }
        events_after.push(expected.len() as u64);
    }
    writer.flush();
    expected.push(Event::Barrier);
    events_after.push(expected.len() as u64);

    let log_bytes = writer.finish();
    let log_volume = MemVolume::new(log_bytes.len() as u64);
    log_volume.write_at(&log_bytes, 0).unwrap();
    let log = DmLog::open(&log_volume).expect("open the recorded log");
    let history =
        History::from_dmlog(&log, V, vec![0; DEVICE as usize]).expect("read the log back");
    let read_back: Vec<&Event> = history.events().iter().map(|(_, e)| e).collect();
    assert_eq!(read_back.len(), expected.len());
    for (i, (got, want)) in read_back.iter().zip(&expected).enumerate() {
        assert_eq!(*got, want, "event {i} of the log read back");
    }

    // The recording as a source: spooled in log order (seq = index + 1), shipped, and every
    // point of the target checked.
    let spool = Arc::new(Mutex::new(memory_spool()));
    {
        let mut s = spool.lock().unwrap();
        for (seq, event) in history.events() {
            assert_eq!(s.append(event).unwrap(), *seq);
        }
        s.sync().unwrap();
    }
    let target = Replication::start(spool, DEVICE);
    let acked = target.wait_acked(history.last_seq());
    let checked = check_every_point(&history, &target, acked);
    figures::report("scenarios_run", 1);
    assert_all_consistent(&checked);
    assert_eq!(checked.acked_writes_lost, 0);
    assert_eq!(checked.bookmarks, marks);

    // The reader's own replay, stopped after every flush point and mark (xfstests'
    // replay-log --check flush / --end-mark), checked at the state after that entry.
    let replica = MemVolume::new(DEVICE);
    let mut replay = log.replay(&replica).expect("replay");
    let mut checker = history.checker();
    let mut replay_points = 0u64;
    while let Some(entry) = replay.step() {
        let entry = entry.expect("replay an entry");
        if !(entry.is_flush_point() || entry.mark.is_some()) {
            continue;
        }
        let at = Seq(events_after[entry.index as usize]);
        let verdict = checker.check(at, &replica.snapshot()).expect("check a replayed point");
        assert!(verdict.is_consistent(), "replay to entry {}: {verdict}", entry.index);
        replay_points += 1;
    }
    figures::report("recovery_points_checked", replay_points);
    figures::report("scenarios_run", 1);
    assert!(replay_points >= marks, "{replay_points} replay points");
}

/// The writes of `history`: seq, offset, data.
fn writes(history: &History) -> impl DoubleEndedIterator<Item = (Seq, u64, Bytes)> + '_ {
    history.events().iter().filter_map(|(seq, event)| match event {
        Event::Write { offset, data, .. } => Some((*seq, *offset, data.clone())),
        _ => None,
    })
}

/// The checker is not vacuous on a real target: a point read back with one flushed write
/// undone, or one sector of a later write let in, is refused.
#[test]
fn a_damaged_target_point_is_refused() {
    let device: Arc<dyn BlockIo> = Arc::new(MemVolume::new(DEVICE));
    let spool = Arc::new(Mutex::new(memory_spool()));
    let tap = tap_over(device, spool.clone());
    let target = Replication::start(spool, DEVICE);
    let mut rng = StdRng::seed_from_u64(99);
    let mut history = History::zeroed(V, DEVICE).unwrap();
    let mut barriers = Vec::new();
    for i in 0..40 {
        let (offset, len) = range(&mut rng);
        let data = random_bytes(&mut rng, len);
        let seq = spooled(tap.write(offset, data.clone()).unwrap(), "a write");
        history.push(seq, Event::Write { volume: V, offset, data }).unwrap();
        if i % 10 == 9 {
            let seq = spooled(tap.flush().unwrap(), "a flush");
            history.push(seq, Event::Barrier).unwrap();
            barriers.push(seq);
        }
    }
    let last = tap.sync_spool().unwrap();
    target.wait_acked(last);
    let points = target.points();
    let at = points.iter().find(|p| p.seq == barriers[1]).expect("the second barrier is offered");
    let good = target.read_point(at);
    assert!(history.check(at.seq, &good).unwrap().is_consistent());

    // Undo the last write before the barrier: its sectors go back to what was there.
    let (wseq, offset, data) =
        writes(&history).rev().find(|(s, ..)| *s < at.seq).expect("a write before the barrier");
    let before = history.state_at(Seq(wseq.0 - 1));
    let mut lost = good.clone();
    let r = offset as usize..offset as usize + data.len();
    lost[r.clone()].copy_from_slice(&before[r]);
    assert_ne!(lost, good);
    let verdict = history.check(at.seq, &lost).unwrap();
    assert!(!verdict.is_consistent());
    assert!(verdict.lost_writes.contains(&wseq), "{verdict}");

    // Let in the first sector of the first write after the barrier.
    let (_, offset, data) =
        writes(&history).find(|(s, ..)| *s > at.seq).expect("a write after the barrier");
    let mut early = good.clone();
    early[offset as usize..(offset + SECTOR) as usize].copy_from_slice(&data[..SECTOR as usize]);
    assert_ne!(early, good);
    let verdict = history.check(at.seq, &early).unwrap();
    assert_eq!(verdict.bad_sectors, 1, "{verdict}");
    assert_eq!(verdict.violations[0].sector, offset / SECTOR);
}
