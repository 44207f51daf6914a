//! The in-process capture API: events leave the spool in capture order with barriers where
//! the order rule puts them (also under concurrent writers and flushes), a spool overflow
//! falls back to the write-intent map, and the map covers every write the target has not
//! acknowledged, across crashes, under both completion policies.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use tidemark_journal::{
    BlockIo, Bookmark, BookmarkKind, CrashMode, Dir, Event, ManualClock, MemDir, MemVolume, Nanos,
    Seq, Spool, SpoolConfig, VolumeId,
};
use tidemark_tap::{
    Captured, CompletionPolicy, HotFullPolicy, IntentConfig, IntentMap, Mutation, RegionSet, Tap,
    TapConfig, TapError,
};

const REGION: u64 = 64 << 10;
const DEVICE: u64 = 16 << 20;
const MAP: &str = "intent.map";

struct Rig {
    spool_dir: MemDir,
    map_dir: MemDir,
    device: Arc<MemVolume>,
    tap: Tap,
}

fn spool_cfg(capacity: u64) -> SpoolConfig {
    SpoolConfig { capacity_bytes: capacity, segment_bytes: 256 << 10, key: None }
}

fn intent_cfg(max_hot: u32) -> IntentConfig {
    IntentConfig { region_bytes: REGION, max_hot_regions: max_hot, max_runs: 256 }
}

fn rig_with(capacity: u64, max_hot: u32, cfg: TapConfig) -> Rig {
    let spool_dir = MemDir::new();
    let map_dir = MemDir::new();
    let clock = Arc::new(ManualClock::new(Nanos(1_700_000_000 * Nanos::SECOND)));
    let (spool, _) =
        Spool::open(Arc::new(spool_dir.clone()), spool_cfg(capacity), clock).expect("spool");
    let (intent, _) =
        IntentMap::open(map_dir.open(MAP, true).expect("map"), DEVICE, intent_cfg(max_hot))
            .expect("intent map");
    let device = Arc::new(MemVolume::new(DEVICE));
    let tap = Tap::new(device.clone(), spool, intent, cfg).expect("tap");
    Rig { spool_dir, map_dir, device, tap }
}

fn rig(cfg: TapConfig) -> Rig {
    rig_with(1 << 30, 64, cfg)
}

fn spooled(tap: &Tap) -> Vec<(Seq, Event)> {
    let durable = tap.sync_spool().expect("sync spool");
    assert_eq!(durable, tap.status().last_seq);
    tap.read_after(Seq::ZERO, u64::MAX)
        .expect("read")
        .into_iter()
        .map(|e| (e.seq, e.event))
        .collect()
}

fn data(seed: u8, len: usize) -> Bytes {
    Bytes::from((0..len).map(|i| seed.wrapping_add((i / 7) as u8)).collect::<Vec<u8>>())
}

/// A compact description of an event (payloads summarised by length and checksum), so
/// that a failing comparison prints something readable.
fn summary(e: &Event) -> String {
    match e {
        Event::Write { volume, offset, data } => {
            let sum = data.iter().fold(0u32, |a, &b| a.wrapping_mul(31).wrapping_add(u32::from(b)));
            format!("write v{volume} @{offset}+{} sum {sum:#x}", data.len())
        }
        Event::WriteZeroes { volume, offset, len } => format!("zeroes v{volume} @{offset}+{len}"),
        Event::Discard { volume, offset, len } => format!("discard v{volume} @{offset}+{len}"),
        Event::Barrier => "barrier".into(),
        Event::Bookmark(b) => format!("bookmark {:?} {:?} group {}", b.name, b.kind, b.group),
        Event::ResyncBegin { id } => format!("resync begin {id}"),
        Event::ResyncEnd { id } => format!("resync end {id}"),
        Event::Resize { volume, old_size, new_size } => {
            format!("resize v{volume} {old_size} -> {new_size}")
        }
    }
}

fn seq_of(c: Captured) -> Seq {
    match c {
        Captured::Spooled(s) => s,
        other => panic!("expected a spooled event, got {other:?}"),
    }
}

#[test]
fn events_come_out_of_the_spool_in_capture_order_with_barriers_in_place() {
    let cfg = TapConfig { volume: VolumeId(2), max_event_bytes: 1 << 20, ..TapConfig::default() };
    let r = rig(cfg);
    let tap = &r.tap;
    let (a, b, c, big) = (data(1, 4096), data(2, 8192), data(3, 512), data(4, 3 << 20));
    let w = |offset: u64, d: &Bytes| Event::Write { volume: VolumeId(2), offset, data: d.clone() };
    tap.write(0, a.clone()).expect("write");
    tap.write(1 << 20, b.clone()).expect("write");
    let f1 = seq_of(tap.flush().expect("flush"));
    assert_eq!(seq_of(tap.flush().expect("flush")), f1, "a flush right after a flush adds nothing");
    tap.write_fua(2 << 20, c.clone()).expect("fua");
    tap.write_zeroes(3 << 20, 8192).expect("zeroes");
    tap.discard(4 << 20, 1 << 20).expect("discard");
    let mark = Bookmark::new("before-big", BookmarkKind::Application, 7).expect("name");
    assert_eq!(tap.status().last_bookmark, None);
    let mark_seq = seq_of(tap.bookmark(mark.clone()).expect("bookmark"));
    assert_eq!(tap.status().last_bookmark, Some((mark_seq, "before-big".to_owned())));
    tap.write(8 << 20, big.clone()).expect("big write");
    tap.flush().expect("flush");
    assert_eq!(tap.write(5, Bytes::new()).expect("empty"), Captured::Nothing);

    let got: Vec<Event> = spooled(tap).into_iter().map(|(_, e)| e).collect();
    let summaries = |v: &[Event]| v.iter().map(summary).collect::<Vec<_>>();
    let expected = vec![
        w(0, &a),
        w(1 << 20, &b),
        Event::Barrier,
        w(2 << 20, &c),
        Event::Barrier,
        Event::WriteZeroes { volume: VolumeId(2), offset: 3 << 20, len: 8192 },
        Event::Discard { volume: VolumeId(2), offset: 4 << 20, len: 1 << 20 },
        Event::Bookmark(mark),
        w(8 << 20, &big.slice(0..1 << 20)),
        w(9 << 20, &big.slice(1 << 20..2 << 20)),
        w(10 << 20, &big.slice(2 << 20..)),
        Event::Barrier,
    ];
    assert_eq!(summaries(&got), summaries(&expected));
    assert!(got == expected);

    // The device holds what the events say.
    let mut model = vec![0u8; DEVICE as usize];
    for e in &got {
        if let Event::Write { offset, data, .. } = e {
            model[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
        }
    }
    assert!(r.device.snapshot() == model);
    let status = tap.status();
    assert_eq!(status.writes, 6);
    assert_eq!(status.last_seq, Seq(12));
}

#[test]
fn a_write_completed_before_a_flush_was_issued_is_ordered_before_it() {
    let r = rig(TapConfig::default());
    let tap = Arc::new(r.tap);
    let completed: Arc<Mutex<Vec<Seq>>> = Arc::default();
    let writers: Vec<_> = (0..6u64)
        .map(|t| {
            let (tap, completed) = (tap.clone(), completed.clone());
            thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                for i in 0..300u64 {
                    let offset = rng.gen_range(0..DEVICE / 4096) * 4096;
                    let c = tap.write(offset, data((t * 31 + i) as u8, 4096)).expect("write");
                    completed.lock().expect("list").push(seq_of(c));
                }
            })
        })
        .collect();
    let flusher = {
        let (tap, completed) = (tap.clone(), completed.clone());
        thread::spawn(move || {
            let mut checks = Vec::new();
            for _ in 0..200 {
                // Every write whose call returned before this flush is issued ...
                let done: Vec<Seq> = completed.lock().expect("list").clone();
                let barrier = seq_of(tap.flush().expect("flush"));
                // ... is before the flush's barrier.
                if let Some(&latest) = done.iter().max() {
                    assert!(latest < barrier, "write {latest} completed before flush {barrier}");
                }
                checks.push(barrier);
                thread::yield_now();
            }
            checks
        })
    };
    for w in writers {
        w.join().expect("writer");
    }
    let barriers = flusher.join().expect("flusher");
    let events: BTreeMap<Seq, Event> = spooled(&tap).into_iter().collect();
    for b in &barriers {
        assert_eq!(events.get(b), Some(&Event::Barrier), "flush {b} is a barrier in the spool");
    }
    assert_eq!(events.values().filter(|e| matches!(e, Event::Write { .. })).count(), 1800);
    let seqs: Vec<u64> = events.keys().map(|s| s.0).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "one gap-free order");
}

#[test]
fn a_spool_overflow_falls_back_to_the_intent_map() {
    let r = rig_with(64 << 10, 64, TapConfig::default());
    let tap = &r.tap;
    let mut spooled_writes = Vec::new();
    let mut tracked = RegionSet::new();
    for i in 0..40u64 {
        let offset = i * REGION + 512;
        match tap.write(offset, data(i as u8, 4096)).expect("write never fails for the spool") {
            Captured::Spooled(seq) => spooled_writes.push((seq, offset)),
            Captured::OutOfSync => tracked.insert(offset / REGION),
            Captured::Nothing => panic!("not empty"),
        }
    }
    assert!(!spooled_writes.is_empty() && !tracked.is_empty(), "the spool filled up part way");
    let status = tap.status();
    let overflow = status.overflow.expect("overflow state");
    assert!(overflow.cause.contains("spool full"), "{}", overflow.cause);
    assert_eq!(overflow.events_not_spooled, tracked.region_count());
    assert_eq!(overflow.last_spooled, spooled_writes.last().expect("some").0);
    assert!(r.device.snapshot()[39 * REGION as usize + 512] != 0, "the backing write happened");

    // Once overflowed, the tap keeps tracking (a gap in the stream needs a resync anyway),
    // even after acknowledgements free space; flushes are not recorded.
    tap.acknowledge(tap.status().last_seq).expect("ack");
    assert_eq!(tap.write(45 * REGION, data(9, 512)).expect("write"), Captured::OutOfSync);
    tracked.insert(45);
    assert_eq!(tap.flush().expect("flush"), Captured::OutOfSync);
    assert_eq!(tap.status().overflow.expect("still").points_not_spooled, 1);

    // The tracked writes are out of sync in the map, durably.
    assert!(tap.intent().out_of_sync().covers(&tracked));
    let crashed = r.map_dir.crash(CrashMode::LoseUnsynced);
    let (_, report) =
        IntentMap::open(crashed.open(MAP, false).expect("map"), DEVICE, intent_cfg(64))
            .expect("reopen");
    assert!(report.dirty.covers(&tracked), "{} vs {}", report.dirty, tracked);

    // Resuming hands the regions to resync and spools again.
    let to_resync = tap.resume_spooling();
    assert!(to_resync.covers(&tracked));
    assert!(tap.status().overflow.is_none());
    assert!(matches!(tap.write(50 * REGION, data(1, 512)).expect("write"), Captured::Spooled(_)));
}

/// A write's regions and what became of it.
struct Issued {
    first: u64,
    end: u64,
    seq: Option<Seq>,
}

fn check_cover(tap: &Tap, map_dir: &MemDir, issued: &[Issued], acked: Seq, when: &str) {
    let mut must = RegionSet::new();
    for w in issued {
        if w.seq.is_none_or(|s| s > acked) {
            must.insert_range(w.first, w.end);
        }
    }
    let live = tap.intent().dirty_regions();
    assert!(live.covers(&must), "{when}: live map {live} does not cover {must}");
    let crashed = map_dir.crash(CrashMode::LoseUnsynced);
    let (_, report) =
        IntentMap::open(crashed.open(MAP, false).expect("map"), DEVICE, intent_cfg(16))
            .expect("reopen after crash");
    assert!(
        report.dirty.covers(&must),
        "{when}: after a crash {} does not cover {must}",
        report.dirty
    );
}

#[test]
fn the_intent_map_covers_every_unacknowledged_write() {
    for completion in [CompletionPolicy::Backing, CompletionPolicy::Spooled] {
        let cfg = TapConfig { completion, ..TapConfig::default() };
        let r = rig_with(256 << 10, 16, cfg);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut issued = Vec::new();
        let mut acked = Seq::ZERO;
        for step in 0..400 {
            match rng.gen_range(0..12) {
                0..=6 => {
                    let offset = rng.gen_range(0..DEVICE / 512 - 64) * 512;
                    let len = rng.gen_range(1..=64u64) * 512;
                    let c = match rng.gen_range(0..4) {
                        0 => r.tap.write_zeroes(offset, len),
                        1 => r.tap.discard(offset, len),
                        2 => r.tap.write_fua(offset, data(step as u8, len as usize)),
                        _ => r.tap.write(offset, data(step as u8, len as usize)),
                    }
                    .expect("write");
                    let seq = match c {
                        Captured::Spooled(s) => Some(s),
                        _ => None,
                    };
                    issued.push(Issued {
                        first: offset / REGION,
                        end: (offset + len - 1) / REGION + 1,
                        seq,
                    });
                }
                7 | 8 => {
                    r.tap.flush().expect("flush");
                }
                9 | 10 => {
                    // The target acknowledges part of what was shipped: durable events only.
                    if rng.gen_bool(0.5) && r.tap.status().overflow.is_none() {
                        r.tap.sync_spool().expect("sync spool");
                    }
                    let durable = r.tap.status().durable_seq;
                    let upto = Seq(rng.gen_range(acked.0..=durable.0.max(acked.0)));
                    r.tap.acknowledge(upto).expect("ack");
                    acked = upto;
                }
                _ => r.tap.clear_clean().expect("clear"),
            }
            if completion == CompletionPolicy::Spooled {
                let status = r.tap.status();
                if status.overflow.is_none() {
                    assert_eq!(
                        status.durable_seq, status.last_seq,
                        "spooled policy: durable before return"
                    );
                }
            }
            if step % 20 == 0 {
                check_cover(
                    &r.tap,
                    &r.map_dir,
                    &issued,
                    acked,
                    &format!("{completion:?} step {step}"),
                );
            }
        }
        check_cover(&r.tap, &r.map_dir, &issued, acked, &format!("{completion:?} end"));
        let status = r.tap.status();
        assert!(status.intent.hot_regions <= 16, "hot bound kept: {status:?}");
        // The workload is sized to reach both fallbacks.
        assert!(status.hot_full_events > 0, "{completion:?}: the hot bound was reached");
        assert!(status.overflow.is_some(), "{completion:?}: the spool overflowed");

        // Everything acknowledged and a clean shutdown: nothing left to resync, unless the
        // hot bound or an overflow sent ranges out of sync.
        // A spool that overflowed for lack of space still syncs what it holds.
        let last = r.tap.sync_spool().expect("sync");
        assert_eq!(last, status.last_seq);
        r.tap.acknowledge(last).expect("ack");
        let out_of_sync = r.tap.intent().out_of_sync();
        let map_dir = r.map_dir.clone();
        r.tap.close().expect("close");
        let (_, report) =
            IntentMap::open(map_dir.open(MAP, false).expect("map"), DEVICE, intent_cfg(16))
                .expect("reopen");
        assert!(
            out_of_sync.covers(&report.dirty),
            "{completion:?}: left {} beyond {}",
            report.dirty,
            out_of_sync
        );
    }
}

#[test]
fn a_clean_shutdown_after_full_acknowledgement_leaves_nothing_to_resync() {
    let r = rig(TapConfig::default());
    for i in 0..20u64 {
        r.tap.write(i * 3 * REGION, data(i as u8, 4096)).expect("write");
    }
    r.tap.flush().expect("flush");
    assert!(r.tap.intent().dirty_regions().region_count() >= 20);
    let last = r.tap.sync_spool().expect("sync");
    assert_eq!(last, r.tap.status().last_seq);
    r.tap.acknowledge(last).expect("ack");
    let (map_dir, spool_dir) = (r.map_dir.clone(), r.spool_dir.clone());
    r.tap.close().expect("close");
    let (_, report) =
        IntentMap::open(map_dir.open(MAP, false).expect("map"), DEVICE, intent_cfg(64))
            .expect("reopen");
    assert!(report.dirty.is_empty(), "{}", report.dirty);
    let clock = Arc::new(ManualClock::new(Nanos(1)));
    let (spool, _) = Spool::open(Arc::new(spool_dir), spool_cfg(1 << 30), clock).expect("spool");
    assert_eq!(spool.backlog_events(), 0);
}

#[test]
fn the_spooled_policy_makes_the_event_durable_before_the_call_returns() {
    for (completion, survives) in
        [(CompletionPolicy::Spooled, true), (CompletionPolicy::Backing, false)]
    {
        let r = rig(TapConfig { completion, ..TapConfig::default() });
        let seq = seq_of(r.tap.write(REGION, data(5, 4096)).expect("write"));
        let clock = Arc::new(ManualClock::new(Nanos(1)));
        let crashed = r.spool_dir.crash(CrashMode::LoseUnsynced);
        let (spool, _) = Spool::open(Arc::new(crashed), spool_cfg(1 << 30), clock).expect("spool");
        assert_eq!(spool.durable_seq() >= seq, survives, "{completion:?}");
        // Either way the intent map covers the write.
        let crashed = r.map_dir.crash(CrashMode::LoseUnsynced);
        let (_, report) =
            IntentMap::open(crashed.open(MAP, false).expect("map"), DEVICE, intent_cfg(64))
                .expect("reopen");
        assert!(report.dirty.contains(1), "{completion:?}");
    }
}

#[test]
fn the_hot_bound_sends_ranges_out_of_sync_or_waits_for_acknowledgements() {
    let r = rig_with(1 << 30, 2, TapConfig::default());
    let s1 = seq_of(r.tap.write(0, data(1, 512)).expect("write"));
    r.tap.write(REGION, data(2, 512)).expect("write");
    // Third hot region: tracked out of sync, still spooled, the write still done.
    assert!(matches!(r.tap.write(5 * REGION, data(3, 512)).expect("write"), Captured::Spooled(_)));
    assert_eq!(r.tap.status().hot_full_events, 1);
    assert!(r.tap.intent().out_of_sync().contains(5));

    let cfg = TapConfig {
        hot_full: HotFullPolicy::Wait(Duration::from_secs(10)),
        ..TapConfig::default()
    };
    let r2 = rig_with(1 << 30, 2, cfg);
    let tap = Arc::new(r2.tap);
    let first = seq_of(tap.write(0, data(1, 512)).expect("write"));
    tap.write(REGION, data(2, 512)).expect("write");
    let acker = {
        let tap = tap.clone();
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            tap.acknowledge(first).expect("ack");
        })
    };
    tap.write(5 * REGION, data(3, 512)).expect("write waits, then goes hot");
    acker.join().expect("acker");
    assert_eq!(tap.status().hot_full_events, 0);
    assert!(tap.intent().out_of_sync().is_empty());
    assert_eq!(s1, first);
}

/// A device whose writes fail.
#[derive(Debug)]
struct FailingDevice(MemVolume);

impl BlockIo for FailingDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        Err(io::Error::other("injected write failure"))
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn name(&self) -> String {
        "failing-device".into()
    }
}

#[test]
fn a_failed_backing_write_is_an_error_and_its_regions_stay_dirty() {
    let spool_dir = MemDir::new();
    let map_dir = MemDir::new();
    let clock = Arc::new(ManualClock::new(Nanos(1)));
    let (spool, _) = Spool::open(Arc::new(spool_dir), spool_cfg(1 << 30), clock).expect("spool");
    let (intent, _) =
        IntentMap::open(map_dir.open(MAP, true).expect("map"), DEVICE, intent_cfg(64))
            .expect("map");
    let tap = Tap::new(
        Arc::new(FailingDevice(MemVolume::new(DEVICE))),
        spool,
        intent,
        TapConfig::default(),
    )
    .expect("tap");
    match tap.write(3 * REGION, data(1, 4096)) {
        Err(e @ TapError::Io { op: "write", .. }) => {
            assert!(e.to_string().contains("failing-device"))
        }
        other => panic!("expected a write error, got {other:?}"),
    }
    assert!(tap.intent().out_of_sync().contains(3), "never silently clean");
    assert_eq!(tap.status().last_seq, Seq::ZERO, "nothing spooled");
    match tap.write(DEVICE - 512, data(1, 1024)) {
        Err(e @ TapError::OutOfRange { .. }) => {
            assert!(e.to_string().contains("protected device failing-device"))
        }
        other => panic!("expected OutOfRange, got {other:?}"),
    }
}

#[test]
fn a_tap_refuses_a_map_of_another_size() {
    let clock = Arc::new(ManualClock::new(Nanos(1)));
    let (spool, _) =
        Spool::open(Arc::new(MemDir::new()), spool_cfg(1 << 30), clock).expect("spool");
    let (intent, _) =
        IntentMap::open(MemDir::new().open(MAP, true).expect("map"), DEVICE * 2, intent_cfg(64))
            .expect("map");
    assert!(matches!(
        Tap::new(Arc::new(MemVolume::new(DEVICE)), spool, intent, TapConfig::default()),
        Err(TapError::Config(_))
    ));
}

/// Replays `events` onto `image` (a replica model).
fn replay(image: &mut [u8], events: &[(Seq, Event)]) {
    for (_, e) in events {
        match e {
            Event::Write { offset, data, .. } => {
                image[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
            }
            Event::WriteZeroes { offset, len, .. } | Event::Discard { offset, len, .. } => {
                image[*offset as usize..(*offset + u64::from(*len)) as usize].fill(0);
            }
            _ => {}
        }
    }
}

#[test]
fn a_resync_copy_racing_application_writes_leaves_the_replica_equal_to_the_device() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let cfg = TapConfig { max_event_bytes: 256 << 10, ..TapConfig::default() };
    let r = rig(cfg);
    // Content written before protection (not captured): random, with zero stretches.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut initial = vec![0u8; DEVICE as usize];
    for (i, block) in initial.chunks_mut(4096).enumerate() {
        if i % 5 != 0 {
            rng.fill(block);
        }
    }
    r.device.write_at(&initial, 0).expect("prefill");
    let before = r.tap.status().last_seq;
    let stop = AtomicBool::new(false);
    let writes = AtomicU64::new(0);
    let copied = thread::scope(|s| {
        for t in 0..2u64 {
            let (tap, stop, writes) = (&r.tap, &stop, &writes);
            s.spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(100 + t);
                while !stop.load(Ordering::SeqCst) {
                    let len = rng.gen_range(1..=16usize) * 512;
                    // The first half only: the zero blocks of the second half are
                    // still zero when the copy reads them.
                    let offset = rng.gen_range(0..(DEVICE / 2 - len as u64) / 512) * 512;
                    let seed = rng.r#gen::<u8>();
                    tap.write(offset, data(seed, len)).expect("write");
                    writes.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        // Start once the writers are going, so that the copy races them. On a loaded
        // machine the writers may not run during one copy; copy again (each copy must
        // leave the replica right on its own) until at least one write completed while a
        // copy was in progress, or give up after 40 (640 MiB of a 1 GiB spool).
        while writes.load(Ordering::SeqCst) < 50 {
            thread::yield_now();
        }
        let mut attempts = 0;
        let result = loop {
            attempts += 1;
            let during_from = writes.load(Ordering::SeqCst);
            let copied =
                r.tap.resync_copy(0, DEVICE, tidemark_tap::ZeroBlocks::Send).expect("copy");
            let during = writes.load(Ordering::SeqCst) - during_from;
            if during > 0 || attempts == 40 {
                break (copied, during, attempts);
            }
        };
        stop.store(true, Ordering::SeqCst);
        result
    });
    let (copied, during, attempts) = copied;
    assert!(during > 0, "no application write raced any of {attempts} copies");
    // Every write is nonzero in each 4 KiB block it touches, so a block that is zero at
    // the end was zero throughout, and the copy must have found it; none but the blocks
    // zero before protection can be.
    let mut device = vec![0u8; DEVICE as usize];
    r.device.read_at(&mut device, 0).expect("read device");
    let zero_blocks =
        |image: &[u8]| image.chunks(4096).filter(|b| b.iter().all(|&x| x == 0)).count() as u64;
    let untouched = zero_blocks(&device[DEVICE as usize / 2..]);
    assert_eq!(
        untouched,
        zero_blocks(&initial[DEVICE as usize / 2..]),
        "the writers keep to the first half"
    );
    assert!(
        (zero_blocks(&device) * 4096..=zero_blocks(&initial) * 4096).contains(&copied.zero_bytes),
        "zero blocks not detected: {copied:?}"
    );
    assert_eq!(copied.data_bytes + copied.zero_bytes, DEVICE);
    // A replica that held garbage before the copy: the events from the copy on make it
    // equal to the device.
    let events: Vec<_> = spooled(&r.tap).into_iter().filter(|(s, _)| *s > before).collect();
    let mut replica = vec![0xA5u8; DEVICE as usize];
    replay(&mut replica, &events);
    assert!(replica == device, "replica differs from the device after the resync copy");
}

#[test]
fn a_resync_copy_can_skip_zero_blocks_and_refuses_while_not_spooling() {
    let r = rig_with(1 << 20, 64, TapConfig::default());
    r.device.write_at(&[7u8; 8192], 64 << 10).expect("prefill");
    let copied = r.tap.resync_copy(0, 256 << 10, tidemark_tap::ZeroBlocks::Skip).expect("copy");
    assert_eq!(copied.data_bytes, 8192);
    assert_eq!(copied.zero_bytes, (256 << 10) - 8192);
    let events = spooled(&r.tap);
    assert_eq!(events.len(), 1, "{:?}", events.iter().map(|e| summary(&e.1)).collect::<Vec<_>>());
    assert!(matches!(&events[0].1, Event::Write { offset, data, .. }
        if *offset == 64 << 10 && data.len() == 8192));
    assert!(r.tap.append_marker(Event::Barrier).is_err(), "a barrier is not a marker");
    // Fill the 1 MiB spool until it refuses: the tap overflows, and a copy is refused.
    let mut i = 0u64;
    while r.tap.status().overflow.is_none() {
        r.tap.write((i % 64) * 65536, data(i as u8, 65536)).expect("write");
        i += 1;
    }
    let err = r.tap.resync_copy(0, 4096, tidemark_tap::ZeroBlocks::Send).unwrap_err();
    assert!(matches!(err, TapError::NotSpooling { .. }), "{err}");
    assert!(err.to_string().contains("overflow"), "{err}");
}

// ------------------------------------------------------------------------------------------
// The split API (begin / device I/O by the caller / finish), as the ublk frontend uses it
// ------------------------------------------------------------------------------------------

fn write_event(offset: u64, d: &Bytes) -> Event {
    Event::Write { volume: VolumeId(0), offset, data: d.clone() }
}

#[test]
fn split_mutations_issue_after_earlier_overlapping_ones_and_append_in_finish_order() {
    let r = rig(TapConfig::default());
    let tap = &r.tap;
    let (a, b, c) = (data(1, 8192), data(2, 8192), data(3, 4096));
    let pa = tap.begin_mutation(Mutation::Write { fua: false }, 0, 8192).expect("begin a");
    let pb = tap.begin_mutation(Mutation::Write { fua: false }, 4096, 8192).expect("begin b");
    let pc = tap.begin_mutation(Mutation::Write { fua: false }, 1 << 20, 4096).expect("begin c");
    let pz = tap.begin_mutation(Mutation::WriteZeroes, 8192, 4096).expect("begin zeroes");
    assert!(tap.may_issue(&pa), "the first mutation may go at once");
    assert!(!tap.may_issue(&pb), "b overlaps a, begun before it");
    assert!(tap.may_issue(&pc), "c overlaps nothing");
    assert!(!tap.may_issue(&pz), "the zeroes overlap b, begun before them");
    // Nothing is in the spool before a finish.
    assert_eq!(tap.status().last_seq, Seq::ZERO);

    r.device.write_at(&c, 1 << 20).expect("device write c");
    let sc = seq_of(tap.finish_write(pc, c.clone()).expect("finish c"));
    assert!(!tap.may_issue(&pb), "finishing a disjoint mutation frees nothing");
    r.device.write_at(&a, 0).expect("device write a");
    let sa = seq_of(tap.finish_write(pa, a.clone()).expect("finish a"));
    assert!(tap.may_issue(&pb), "a finished: b may go");
    assert!(!tap.may_issue(&pz), "the zeroes still wait for b");
    r.device.write_at(&b, 4096).expect("device write b");
    let sb = seq_of(tap.finish_write(pb, b.clone()).expect("finish b"));
    assert!(tap.may_issue(&pz));
    r.device.write_at(&[0u8; 4096], 8192).expect("device zeroes");
    let sz = seq_of(tap.finish_range(pz).expect("finish zeroes"));
    assert!(sc < sa && sa < sb && sb < sz, "{sc} {sa} {sb} {sz}");

    let got: Vec<Event> = spooled(tap).into_iter().map(|(_, e)| e).collect();
    let expected = [
        write_event(1 << 20, &c),
        write_event(0, &a),
        write_event(4096, &b),
        Event::WriteZeroes { volume: VolumeId(0), offset: 8192, len: 4096 },
    ];
    assert_eq!(
        got.iter().map(summary).collect::<Vec<_>>(),
        expected.iter().map(summary).collect::<Vec<_>>()
    );
    // Replaying the spool gives the device's content.
    let mut model = vec![0u8; DEVICE as usize];
    for e in &got {
        match e {
            Event::Write { offset, data, .. } => {
                model[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
            }
            Event::WriteZeroes { offset, len, .. } => {
                model[*offset as usize..(*offset + u64::from(*len)) as usize].fill(0);
            }
            _ => {}
        }
    }
    assert!(r.device.snapshot() == model, "the spool replayed differs from the device");
}

#[test]
fn a_split_flush_orders_its_barrier_after_finished_writes_and_fua_adds_one() {
    let r = rig(TapConfig::default());
    let tap = &r.tap;
    let (a, b, f) = (data(1, 4096), data(2, 4096), data(3, 4096));
    let pa = tap.begin_mutation(Mutation::Write { fua: false }, 0, 4096).expect("begin a");
    r.device.write_at(&a, 0).expect("device write a");
    let sa = seq_of(tap.finish_write(pa, a.clone()).expect("finish a"));
    // b is in flight (begun, device write not finished) when the flush is issued.
    let pb = tap.begin_mutation(Mutation::Write { fua: false }, 65536, 4096).expect("begin b");
    let barrier = seq_of(tap.begin_flush());
    assert!(sa < barrier, "a finished before the flush was issued: before its barrier");
    r.device.write_at(&b, 65536).expect("device write b");
    let sb = seq_of(tap.finish_write(pb, b.clone()).expect("finish b"));
    assert!(barrier < sb, "b finished after the barrier was appended");
    let pf = tap.begin_mutation(Mutation::Write { fua: true }, 131072, 4096).expect("begin fua");
    r.device.write_at(&f, 131072).expect("device write fua");
    let sf = seq_of(tap.finish_write(pf, f.clone()).expect("finish fua"));
    let got: Vec<(Seq, Event)> = spooled(tap);
    let expected = [
        write_event(0, &a),
        Event::Barrier,
        write_event(65536, &b),
        write_event(131072, &f),
        Event::Barrier,
    ];
    assert_eq!(
        got.iter().map(|(_, e)| summary(e)).collect::<Vec<_>>(),
        expected.iter().map(summary).collect::<Vec<_>>()
    );
    assert_eq!(got.last().map(|(s, _)| *s), Some(sf), "a FUA write's seq is its barrier's");
}

#[test]
fn a_dropped_pending_mutation_stays_out_of_sync_and_frees_its_ticket() {
    let r = rig(TapConfig::default());
    let tap = &r.tap;
    let failed = tap.begin_mutation(Mutation::Write { fua: false }, 0, 8192).expect("begin");
    let next = tap.begin_mutation(Mutation::Discard, 4096, 8192).expect("begin discard");
    assert!(!tap.may_issue(&next));
    // The device write failed: the caller drops the pending write.
    drop(failed);
    assert!(tap.may_issue(&next), "the dropped write no longer holds back the discard");
    assert_eq!(tap.intent().out_of_sync().region_count(), 1, "the failed write's region");
    r.device.write_at(&[0u8; 8192], 4096).expect("device discard");
    let s = seq_of(tap.finish_range(next).expect("finish discard"));
    let got = spooled(tap);
    assert_eq!(got.len(), 1, "only the discard is in the spool: {got:?}");
    assert_eq!(got[0], (s, Event::Discard { volume: VolumeId(0), offset: 4096, len: 8192 }));
}

#[test]
fn split_finishes_refuse_a_mismatched_call() {
    let r = rig(TapConfig::default());
    let tap = &r.tap;
    let w = tap.begin_mutation(Mutation::Write { fua: false }, 0, 4096).expect("begin");
    let err = tap.finish_write(w, data(1, 512)).expect_err("wrong length");
    assert!(matches!(err, TapError::Config(_)), "{err}");
    let w = tap.begin_mutation(Mutation::Write { fua: false }, 0, 4096).expect("begin");
    assert!(matches!(tap.finish_range(w), Err(TapError::Config(_))));
    let z = tap.begin_mutation(Mutation::WriteZeroes, 0, 4096).expect("begin");
    assert!(matches!(tap.finish_write(z, data(1, 4096)), Err(TapError::Config(_))));
    let err = tap.begin_mutation(Mutation::Discard, DEVICE - 512, 4096).expect_err("past the end");
    assert!(matches!(err, TapError::OutOfRange { .. }), "{err}");
    assert_eq!(tap.status().last_seq, Seq::ZERO, "nothing was appended");
}

#[test]
fn under_the_spooled_policy_a_split_write_waits_for_the_spool_only_when_asked() {
    let r = rig(TapConfig { completion: CompletionPolicy::Spooled, ..TapConfig::default() });
    let tap = &r.tap;
    let p = tap.begin_mutation(Mutation::Write { fua: false }, 0, 4096).expect("begin");
    let d = data(7, 4096);
    r.device.write_at(&d, 0).expect("device write");
    let captured = tap.finish_write(p, d).expect("finish");
    let seq = seq_of(captured);
    assert!(tap.status().durable_seq < seq, "finish does not wait for the spool");
    assert!(tap.needs_durable(captured));
    assert_eq!(tap.wait_durable(captured).expect("wait"), captured);
    assert!(tap.status().durable_seq >= seq);
    assert!(!tap.needs_durable(captured), "durable now");
    let backing = rig(TapConfig::default());
    let p = backing.tap.begin_mutation(Mutation::Write { fua: false }, 0, 4096).expect("begin");
    let captured = backing.tap.finish_write(p, data(8, 4096)).expect("finish");
    assert!(!backing.tap.needs_durable(captured), "the backing policy never waits");
}

/// A synchronous write overlapping a split mutation still in flight waits for it: the
/// device and the spool get them in the same order.
#[test]
fn a_synchronous_write_waits_for_an_earlier_overlapping_split_one() {
    let r = rig(TapConfig::default());
    let tap = Arc::new(r.tap);
    let (a, b) = (data(1, 8192), data(2, 8192));
    let pa = tap.begin_mutation(Mutation::Write { fua: false }, 0, 8192).expect("begin a");
    let marks = tap.status().intent.marks_without_io;
    let writer = {
        let (tap, b) = (tap.clone(), b.clone());
        thread::spawn(move || tap.write(4096, b).expect("sync write b"))
    };
    // Wait until the synchronous write has marked its region (its step 1 is done).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while tap.status().intent.marks_without_io == marks {
        assert!(std::time::Instant::now() < deadline, "the synchronous write never began");
        thread::yield_now();
    }
    r.device.write_at(&a, 0).expect("device write a");
    let sa = seq_of(tap.finish_write(pa, a.clone()).expect("finish a"));
    let sb = seq_of(writer.join().expect("writer"));
    assert!(sa < sb, "b began after a: appended after it");
    let mut expected = a.to_vec();
    expected[4096..].copy_from_slice(&b[..4096]);
    expected.extend_from_slice(&b[4096..]);
    assert!(r.device.snapshot()[..12288] == expected[..], "b reached the device after a");
}
