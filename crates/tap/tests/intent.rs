//! The write-intent map: durability before `mark` returns, lazy clearing, the hot bound,
//! group commit, and crash safety: a crash after every step and inside every sync, torn slot
//! writes at every sector, both slots damaged, and a property test that after any crash the
//! map covers every range that was marked and not acknowledged.

use std::collections::BTreeSet;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use proptest::prelude::*;
use tidemark_journal::{BlockIo, CrashMode, Dir, MemDir, Seq};
use tidemark_tap::intent::{HEADER_LEN, MAP_BLOCK, MapHeader};
use tidemark_tap::{
    IntentConfig, IntentMap, IntentOpenReport, RegionRun, RegionSet, TapError, WriteIntent,
};

const MAP: &str = "intent.map";
const REGION: u64 = 1 << 20;
const VOLUME: u64 = 64 * REGION;

fn cfg() -> IntentConfig {
    IntentConfig { region_bytes: REGION, max_hot_regions: 16, max_runs: 64 }
}

fn open(dir: &MemDir) -> Result<(IntentMap, IntentOpenReport), TapError> {
    open_with(dir, cfg())
}

fn open_with(dir: &MemDir, cfg: IntentConfig) -> Result<(IntentMap, IntentOpenReport), TapError> {
    IntentMap::open(dir.open(MAP, true).expect("map file"), VOLUME, cfg)
}

fn reopen_after(dir: &MemDir, mode: CrashMode) -> IntentOpenReport {
    let crashed = dir.crash(mode);
    match open(&crashed) {
        Ok((_, report)) => report,
        Err(e) => panic!("reopen after crash {mode:?} failed: {e}"),
    }
}

fn regions(first: u64, count: u64) -> RegionSet {
    RegionSet::from_runs([RegionRun { first, count }])
}

#[test]
fn a_new_map_is_created_clean_and_reopens_clean() {
    let dir = MemDir::new();
    let (map, report) = open(&dir).expect("create");
    assert!(report.created);
    assert!(report.dirty.is_empty());
    let h = map.header();
    assert_eq!(h.slot_bytes, MapHeader::slot_bytes_for(64));
    assert_eq!(dir.read_file(MAP).expect("file").len() as u64, MAP_BLOCK + 2 * h.slot_bytes);
    map.close().expect("close");
    let (_, report) = open(&dir).expect("reopen");
    assert!(!report.created);
    assert!(report.dirty.is_empty());
    assert_eq!(report.other_slot.as_deref().map(|s| s.contains("never written")), Some(true));
}

#[test]
fn a_mark_is_on_disk_before_it_returns() {
    let dir = MemDir::new();
    let (map, _) = open(&dir).expect("create");
    let intent = map.mark(3 * REGION + 100, 2 * REGION).expect("mark");
    assert_eq!(intent.regions(), Some(RegionRun { first: 3, count: 3 }));
    // Power cut right now, with nothing more synced.
    let report = reopen_after(&dir, CrashMode::LoseUnsynced);
    assert_eq!(report.dirty, regions(3, 3));
    assert_eq!(report.dirty_bytes, 3 * REGION);
    intent.record(Seq(1));

    // A second mark inside regions already dirty on disk needs no map write.
    let before = map.status().slot_writes;
    map.mark(4 * REGION, 10).expect("mark").record(Seq(2));
    let status = map.status();
    assert_eq!(status.slot_writes, before);
    assert_eq!(status.marks_without_io, 1);
    assert_eq!(status.hot_regions, 3);
}

#[test]
fn acknowledged_regions_clear_lazily_and_a_clean_shutdown_leaves_nothing() {
    let dir = MemDir::new();
    let (map, _) = open(&dir).expect("create");
    map.mark(0, REGION).expect("mark").record(Seq(1));
    map.mark(5 * REGION, REGION).expect("mark").record(Seq(2));
    map.acknowledge(Seq(1));
    // Lazy: still dirty on disk until a map write or clear_clean.
    assert_eq!(map.dirty_regions(), regions(0, 1).union(&regions(5, 1)));
    map.clear_clean().expect("clear");
    assert_eq!(map.dirty_regions(), regions(5, 1));
    assert_eq!(reopen_after(&dir, CrashMode::LoseUnsynced).dirty, regions(5, 1));

    map.acknowledge(Seq(2));
    map.close().expect("close");
    let (_, report) = open(&dir).expect("reopen");
    assert!(report.dirty.is_empty(), "clean shutdown after full acknowledgement: {}", report.dirty);
}

#[test]
fn unacknowledged_and_out_of_sync_regions_survive_a_clean_shutdown() {
    let dir = MemDir::new();
    let (map, _) = open(&dir).expect("create");
    map.mark(0, REGION).expect("mark").record(Seq(5));
    let dropped = map.mark(10 * REGION, REGION).expect("mark");
    drop(dropped); // e.g. the backing write failed: out of sync, never silently clean
    map.mark(20 * REGION, REGION).expect("mark").out_of_sync();
    map.acknowledge(Seq(100));
    map.clone().close().expect("close");
    let (reopened, report) = open(&dir).expect("reopen");
    assert_eq!(report.dirty, regions(10, 1).union(&regions(20, 1)));
    // After an open, everything the map held is out of sync until resynced.
    assert_eq!(reopened.out_of_sync(), report.dirty);
    reopened.resynced(RegionRun { first: 10, count: 1 });
    reopened.resynced(RegionRun { first: 20, count: 1 });
    reopened.close().expect("close");
    assert!(open(&dir).expect("reopen").1.dirty.is_empty());

    // An unacknowledged write survives close.
    let (map, _) = open(&dir).expect("open");
    map.mark(30 * REGION, 1).expect("mark").record(Seq(7));
    map.acknowledge(Seq(6));
    map.close().expect("close");
    assert_eq!(open(&dir).expect("reopen").1.dirty, regions(30, 1));
}

#[test]
fn the_hot_bound_refuses_with_back_pressure_and_names_the_resync_bound() {
    let dir = MemDir::new();
    let small = IntentConfig { max_hot_regions: 4, ..cfg() };
    assert_eq!(small.resync_bound_bytes(), 4 * REGION);
    let (map, _) = open_with(&dir, small).expect("create");
    for r in 0..4 {
        map.mark(r * REGION, 1).expect("mark").record(Seq(r + 1));
    }
    let err = map.mark(9 * REGION, 1).expect_err("fifth hot region");
    match &err {
        TapError::HotRegionsFull { hot: 4, needed: 1, limit: 4, resync_bound_bytes, .. } => {
            assert_eq!(*resync_bound_bytes, 4 * REGION);
            let msg = err.to_string();
            assert!(msg.contains(MAP) && msg.contains("resync bound 4194304 bytes"), "{msg}");
        }
        other => panic!("expected HotRegionsFull, got {other:?}"),
    }
    // A write into an already hot region is admitted.
    map.mark(2 * REGION + 7, 1).expect("already hot").record(Seq(5));
    // A range larger than the whole bound can never be admitted as hot ...
    assert!(matches!(
        map.mark(40 * REGION, 5 * REGION),
        Err(TapError::HotRegionsFull { needed: 5, .. })
    ));
    // ... but can be tracked out of sync, outside the bound.
    let _ = map.mark_out_of_sync(40 * REGION, 5 * REGION).expect("out of sync");
    assert!(map.dirty_regions().covers(&regions(40, 5)));
    assert_eq!(map.status().out_of_sync_regions, 5);

    // Back-pressure: wait for room; an acknowledgement from another thread frees it.
    assert!(!map.wait_for_room(9 * REGION, 1, Duration::from_millis(20)).expect("wait"));
    let acker = {
        let map = map.clone();
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            map.acknowledge(Seq(1));
        })
    };
    assert!(map.wait_for_room(9 * REGION, 1, Duration::from_secs(10)).expect("wait"));
    acker.join().expect("acker");
    map.mark(9 * REGION, 1).expect("room now").record(Seq(6));
    let status = map.status();
    assert_eq!(status.hot_regions, 4);
    assert!(status.dirty_regions <= 4 + 5, "on-disk hot regions stay within the bound");
    assert_eq!(status.resync_bound_bytes, (4 + 5) * REGION);
}

/// A map file whose syncs take a while, counting writes and syncs.
#[derive(Debug)]
struct SlowSync {
    inner: Arc<dyn BlockIo>,
    syncs: AtomicU64,
}

impl BlockIo for SlowSync {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.syncs.fetch_add(1, Ordering::SeqCst);
        thread::sleep(Duration::from_millis(30));
        self.inner.sync()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn name(&self) -> String {
        self.inner.name()
    }
}

#[test]
fn concurrent_marks_share_map_writes() {
    let dir = MemDir::new();
    let io =
        Arc::new(SlowSync { inner: dir.open(MAP, true).expect("file"), syncs: AtomicU64::new(0) });
    let wide = IntentConfig { max_hot_regions: 64, ..cfg() };
    let (map, _) = IntentMap::open(io.clone(), VOLUME, wide).expect("create");
    let syncs_at_start = io.syncs.load(Ordering::SeqCst);
    let threads = 32u64;
    let gate = Arc::new(Barrier::new(threads as usize));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (map, gate) = (map.clone(), gate.clone());
            thread::spawn(move || {
                gate.wait();
                let intent = map.mark(t * 2 * REGION, 10).expect("mark");
                // Durable now: a crash must show it.
                assert!(map.dirty_regions().contains(t * 2));
                intent.record(Seq(t + 1));
            })
        })
        .collect();
    for h in handles {
        h.join().expect("marker");
    }
    let writes = map.status().slot_writes;
    let syncs = io.syncs.load(Ordering::SeqCst) - syncs_at_start;
    assert_eq!(writes, syncs);
    assert!(writes < threads / 2, "{threads} concurrent marks took {writes} map writes");
    let report = reopen_after(&dir, CrashMode::LoseUnsynced);
    for t in 0..threads {
        assert!(report.dirty.contains(t * 2), "region {} lost", t * 2);
    }
}

/// The regions that must be dirty on disk: marks that returned and whose write is not
/// acknowledged, plus out-of-sync regions.
#[derive(Debug, Default)]
struct Model {
    live: Vec<(RegionRun, Option<WriteIntent>, Option<u64>)>,
    oos: BTreeSet<u64>,
    acked: u64,
    next_seq: u64,
}

impl Model {
    fn must_cover(&self) -> RegionSet {
        let mut set = RegionSet::new();
        for (run, intent, seq) in &self.live {
            if intent.is_some() || seq.is_some_and(|s| s > self.acked) {
                set.insert_range(run.first, run.end());
            }
        }
        for &r in &self.oos {
            set.insert(r);
        }
        set
    }

    /// After a crash and reopen everything that had to be covered is out of sync.
    fn crashed(&mut self) {
        let cover = self.must_cover();
        // Intents still pending belong to the map that crashed; dropping them only changes
        // that map's memory.
        self.live.clear();
        self.oos = cover.iter().collect();
    }

    fn mark(&mut self, map: &IntentMap, offset: u64, len: u64) -> Result<(), TapError> {
        match map.mark(offset, len) {
            Ok(intent) => {
                if let Some(run) = intent.regions() {
                    self.live.push((run, Some(intent), None));
                }
                Ok(())
            }
            Err(TapError::HotRegionsFull { .. }) => {
                let _ = map.mark_out_of_sync(offset, len)?;
                let run = map.regions_of(offset, len)?.expect("non-empty");
                self.oos.extend(run.first..run.end());
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn record(&mut self, i: usize) {
        let pending: Vec<usize> =
            (0..self.live.len()).filter(|&j| self.live[j].1.is_some()).collect();
        if pending.is_empty() {
            return;
        }
        let j = pending[i % pending.len()];
        self.next_seq += 1;
        let intent = self.live[j].1.take().expect("pending");
        intent.record(Seq(self.next_seq));
        self.live[j].2 = Some(self.next_seq);
    }

    fn drop_intent(&mut self, i: usize) {
        let pending: Vec<usize> =
            (0..self.live.len()).filter(|&j| self.live[j].1.is_some()).collect();
        if pending.is_empty() {
            return;
        }
        let j = pending[i % pending.len()];
        drop(self.live[j].1.take());
        let run = self.live[j].0;
        self.oos.extend(run.first..run.end());
    }
}

fn assert_covers(dirty: &RegionSet, model: &Model, when: &str) {
    let must = model.must_cover();
    assert!(dirty.covers(&must), "{when}: map {dirty} does not cover {must}");
}

/// A fixed workload: every step is followed by crashes of every kind, and every sync of the
/// run is made to fail once.
fn scripted(map: &IntentMap, model: &mut Model, step: usize) -> Result<(), TapError> {
    match step % 9 {
        0 => model.mark(map, (step as u64 * 7 % 60) * REGION, REGION + 1),
        1 => {
            model.record(step);
            Ok(())
        }
        2 => model.mark(map, (step as u64 * 3 % 64) * REGION, 1),
        3 => {
            model.acked = model.next_seq.saturating_sub(1);
            map.acknowledge(Seq(model.acked));
            Ok(())
        }
        4 => map.clear_clean(),
        5 => {
            model.drop_intent(step);
            Ok(())
        }
        6 => model.mark(map, (step as u64 * 11 % 56) * REGION, 5 * REGION),
        7 => {
            if let Some(&r) = model.oos.iter().next() {
                map.resynced(RegionRun { first: r, count: 1 });
                model.oos.remove(&r);
            }
            Ok(())
        }
        _ => {
            model.record(step + 1);
            Ok(())
        }
    }
}

const STEPS: usize = 60;

#[test]
fn a_crash_after_every_step_keeps_every_unacknowledged_mark() {
    let dir = MemDir::new();
    let (map, _) = open(&dir).expect("create");
    let mut model = Model::default();
    for step in 0..STEPS {
        scripted(&map, &mut model, step).expect("step");
        assert_covers(&map.dirty_regions(), &model, &format!("live after step {step}"));
        for mode in
            [CrashMode::LoseUnsynced, CrashMode::KeepAll, CrashMode::KeepUnsyncedPrefix(100)]
        {
            let report = reopen_after(&dir, mode);
            assert_covers(&report.dirty, &model, &format!("crash {mode:?} after step {step}"));
        }
    }
}

#[test]
fn a_failed_sync_at_any_point_poisons_the_map_and_a_crash_then_keeps_every_mark() {
    let mut failures_seen = 0;
    for fail_at in 0..40u64 {
        let dir = MemDir::new();
        let (map, _) = open(&dir).expect("create");
        dir.set_syncs_left(Some(fail_at));
        let mut model = Model::default();
        let mut failed = false;
        for step in 0..STEPS {
            match scripted(&map, &mut model, step) {
                // Steps without map I/O (record, acknowledge, resynced) still succeed.
                Ok(()) => {}
                Err(TapError::Io { op: "fdatasync", .. }) if !failed => failed = true,
                Err(TapError::Poisoned { .. }) if failed => {}
                Err(e) => panic!("fail_at {fail_at}, step {step}: unexpected {e}"),
            }
        }
        if failed {
            failures_seen += 1;
            assert!(matches!(map.mark(0, 1), Err(TapError::Poisoned { .. })));
        }
        dir.set_syncs_left(None);
        for mode in [CrashMode::LoseUnsynced, CrashMode::KeepAll] {
            let report = reopen_after(&dir, mode);
            assert_covers(&report.dirty, &model, &format!("fail_at {fail_at}, crash {mode:?}"));
        }
    }
    assert!(failures_seen > 10, "the workload reached the injected failures");
}

#[test]
fn a_crash_during_creation_recreates_the_map() {
    for fail_at in 0..2u64 {
        let dir = MemDir::new();
        dir.set_syncs_left(Some(fail_at));
        assert!(matches!(open(&dir), Err(TapError::Io { op: "fdatasync", .. })));
        dir.set_syncs_left(None);
        for mode in
            [CrashMode::LoseUnsynced, CrashMode::KeepAll, CrashMode::KeepUnsyncedPrefix(5000)]
        {
            let crashed = dir.crash(mode);
            let (_, report) = open(&crashed).expect("reopen");
            assert!(report.dirty.is_empty());
            assert_eq!(
                report.created,
                fail_at == 0 || mode != CrashMode::KeepAll,
                "{fail_at} {mode:?}"
            );
        }
    }
}

#[test]
fn a_torn_slot_write_falls_back_to_the_other_slot() {
    let dir = MemDir::new();
    let (map, _) = open(&dir).expect("create");
    map.mark(2 * REGION, 1).expect("mark A").record(Seq(1));
    map.mark(7 * REGION, 1).expect("mark B").record(Seq(2));
    let before = dir.read_file(MAP).expect("file");
    let generation = map.status().generation;
    let _c = map.mark(40 * REGION, 3 * REGION).expect("mark C");
    let after = dir.read_file(MAP).expect("file");
    let slot = map.header().slot_offset(((generation + 1) & 1) as u8) as usize;
    let changed = (0..after.len()).filter(|&i| before[i] != after[i]).max().expect("a change") + 1;
    assert!(changed > slot && changed <= slot + MAP_BLOCK as usize);

    let mut tears: Vec<usize> = (0..=(changed - slot)).step_by(512).collect();
    tears.extend([1, 8, 63, 64, 65, 79, 80, changed - slot - 1, changed - slot]);
    for tear in tears {
        let mut image = before.clone();
        image[slot..slot + tear].copy_from_slice(&after[slot..slot + tear]);
        let torn = MemDir::new();
        torn.insert(MAP, image, true);
        let (_, report) = open(&torn).unwrap_or_else(|e| panic!("tear at +{tear}: {e}"));
        let ab = regions(2, 1).union(&regions(7, 1));
        assert!(report.dirty.covers(&ab), "tear at +{tear}: {}", report.dirty);
        if tear >= changed - slot {
            assert!(report.dirty.covers(&regions(40, 3)), "complete write at +{tear}");
            assert_eq!(report.generation, generation + 1);
        } else {
            assert_eq!(report.generation, generation, "tear at +{tear} falls back");
        }
    }
}

#[test]
fn both_slots_damaged_is_a_clear_error() {
    let dir = MemDir::new();
    let (map, _) = open(&dir).expect("create");
    map.mark(0, 1).expect("mark").record(Seq(1));
    map.mark(REGION, 1).expect("mark").record(Seq(2));
    let h = map.header();
    let mut b = dir.read_file(MAP).expect("file");
    b[h.slot_offset(0) as usize + 20] ^= 0x40;
    b[h.slot_offset(1) as usize + 70] ^= 0x01;
    dir.write_file(MAP, b);
    let err = open(&dir).expect_err("both slots damaged");
    let msg = err.to_string();
    match &err {
        TapError::NoValidSlot { slot0, slot1, .. } => {
            assert!(slot0.contains("slot header checksum"), "{slot0}");
            assert!(slot1.contains("runs checksum"), "{slot1}");
        }
        other => panic!("expected NoValidSlot, got {other:?}"),
    }
    assert!(msg.contains("mem:intent.map") && msg.contains("resync the whole volume"), "{msg}");
}

#[test]
fn header_damage_and_geometry_mismatch_are_refused() {
    let dir = MemDir::new();
    drop(open(&dir).expect("create"));
    assert!(matches!(
        open_with(&dir, IntentConfig { region_bytes: 2 * REGION, ..cfg() }),
        Err(TapError::MapMismatch { field: "region_bytes", .. })
    ));
    assert!(matches!(
        IntentMap::open(dir.open(MAP, false).expect("file"), VOLUME * 2, cfg()),
        Err(TapError::MapMismatch { field: "volume_bytes", found: VOLUME, .. })
    ));
    assert!(matches!(
        open_with(&dir, IntentConfig { max_runs: 65, ..cfg() }),
        Err(TapError::MapMismatch { field: "max_runs", .. })
    ));
    // The hot bound is a policy, not geometry: it may change between opens.
    open_with(&dir, IntentConfig { max_hot_regions: 3, ..cfg() }).expect("new bound");

    let mut b = dir.read_file(MAP).expect("file");
    b[30] ^= 1;
    dir.write_file(MAP, b.clone());
    assert!(matches!(open(&dir), Err(TapError::ChecksumMismatch { what: "header", .. })));
    b[0] = b'X';
    dir.write_file(MAP, b);
    assert!(matches!(open(&dir), Err(TapError::BadMagic { .. })));
    assert!(matches!(
        open_with(&dir, IntentConfig { region_bytes: 1000, ..cfg() }),
        Err(TapError::Config(_))
    ));
    assert!(HEADER_LEN < MAP_BLOCK as usize);
}

#[test]
fn a_dirty_set_with_more_runs_than_a_slot_holds_is_coalesced_never_shrunk() {
    let dir = MemDir::new();
    let narrow = IntentConfig { max_runs: 4, ..cfg() };
    let (map, _) = open_with(&dir, narrow).expect("create");
    let mut want = RegionSet::new();
    for r in [1u64, 5, 9, 20, 22, 40, 50, 63] {
        let _ = map.mark_out_of_sync(r * REGION, 1).expect("mark");
        want.insert(r);
    }
    let dirty = map.dirty_regions();
    assert!(dirty.covers(&want));
    assert!(dirty.run_count() <= 4);
    assert!(map.status().coalesced_regions > 0);
    let (_, report) = open_with(&dir.crash(CrashMode::LoseUnsynced), narrow).expect("reopen");
    assert!(report.dirty.covers(&want));
}

#[derive(Debug, Clone)]
enum Op {
    Mark(u64, u64),
    Record(usize),
    Drop(usize),
    Ack(u8),
    ClearClean,
    Resynced(u64, u64),
    Crash(u8, u64),
    Close,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..VOLUME, 1..6 * REGION).prop_map(|(o, l)| Op::Mark(o, l.min(VOLUME - o))),
        3 => any::<usize>().prop_map(Op::Record),
        1 => any::<usize>().prop_map(Op::Drop),
        2 => any::<u8>().prop_map(Op::Ack),
        1 => Just(Op::ClearClean),
        1 => (0..64u64, 1..8u64).prop_map(|(f, c)| Op::Resynced(f, c)),
        1 => (0..3u8, 0..20_000u64).prop_map(|(m, n)| Op::Crash(m, n)),
        1 => Just(Op::Close),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// After any sequence of marks, records, acknowledgements, clears, resyncs, crashes of
    /// every kind and clean shutdowns, the map covers every range that was marked and not
    /// acknowledged (and every out-of-sync region not yet resynced).
    #[test]
    fn after_any_crash_the_map_covers_every_unacknowledged_mark(ops in proptest::collection::vec(op(), 1..80)) {
        let mut dir = MemDir::new();
        let small = IntentConfig { region_bytes: REGION, max_hot_regions: 8, max_runs: 6 };
        let (mut map, _) = open_with(&dir, small).expect("create");
        let mut model = Model::default();
        for op in ops {
            match op {
                Op::Mark(o, l) => model.mark(&map, o, l).expect("mark"),
                Op::Record(i) => model.record(i),
                Op::Drop(i) => model.drop_intent(i),
                Op::Ack(x) => {
                    let upto = model.next_seq * u64::from(x) / 255;
                    model.acked = model.acked.max(upto);
                    map.acknowledge(Seq(upto));
                }
                Op::ClearClean => map.clear_clean().expect("clear"),
                Op::Resynced(f, c) => {
                    map.resynced(RegionRun { first: f, count: c });
                    for r in f..f + c { model.oos.remove(&r); }
                }
                Op::Crash(m, n) => {
                    let mode = match m {
                        0 => CrashMode::LoseUnsynced,
                        1 => CrashMode::KeepAll,
                        _ => CrashMode::KeepUnsyncedPrefix(n),
                    };
                    dir = dir.crash(mode);
                    let (m2, report) = open_with(&dir, small).expect("reopen after crash");
                    prop_assert!(report.dirty.covers(&model.must_cover()), "crash {:?}: {} vs {}", mode, report.dirty, model.must_cover());
                    model.crashed();
                    map = m2;
                }
                Op::Close => {
                    let pending = model.live.iter().any(|(_, i, _)| i.is_some());
                    if !pending {
                        map.clone().close().expect("close");
                        let (m2, report) = open_with(&dir, small).expect("reopen");
                        let must = model.must_cover();
                        prop_assert!(report.dirty.covers(&must));
                        if must.is_empty() {
                            prop_assert!(report.dirty.is_empty(), "clean shutdown left {}", report.dirty);
                        }
                        model.crashed();
                        map = m2;
                    }
                }
            }
            prop_assert!(map.dirty_regions().covers(&model.must_cover()), "live map: {} vs {}", map.dirty_regions(), model.must_cover());
        }
    }
}

/// A map file whose next sync, once armed, waits until the test lets it go.
#[derive(Debug)]
struct GatedSync {
    inner: Arc<dyn BlockIo>,
    armed: std::sync::Mutex<Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>>,
}

impl BlockIo for GatedSync {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        let gate = self.armed.lock().expect("gate").take();
        if let Some((entered, go)) = gate {
            entered.send(()).expect("signal");
            go.recv().expect("released");
        }
        self.inner.sync()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn name(&self) -> String {
        self.inner.name()
    }
}

/// While a map write that clears region 0 is in flight, a new mark of region 0 must not count
/// on the old image: it waits and makes region 0 dirty again before it returns.
#[test]
fn a_mark_racing_a_clearing_write_is_not_lost() {
    use std::sync::mpsc;
    let dir = MemDir::new();
    let io = Arc::new(GatedSync {
        inner: dir.open(MAP, true).expect("file"),
        armed: Default::default(),
    });
    let (map, _) = IntentMap::open(io.clone(), VOLUME, cfg()).expect("create");
    map.mark(0, 1).expect("mark").record(Seq(1));
    map.acknowledge(Seq(1));
    assert!(map.dirty_regions().contains(0), "clean but not yet cleared");

    let (entered_tx, entered_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel();
    *io.armed.lock().expect("gate") = Some((entered_tx, go_rx));
    let clearer = {
        let map = map.clone();
        thread::spawn(move || map.clear_clean().expect("clear"))
    };
    entered_rx.recv().expect("the clearing write is in flight");

    let (done_tx, done_rx) = mpsc::channel();
    let marker = {
        let map = map.clone();
        thread::spawn(move || {
            let intent = map.mark(0, 1).expect("mark");
            done_tx.send(()).expect("done");
            intent.record(Seq(2));
        })
    };
    assert!(
        done_rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "the mark returned while the image on its way to disk does not hold its region"
    );
    go_tx.send(()).expect("release");
    done_rx.recv().expect("mark returns after the next write");
    clearer.join().expect("clearer");
    marker.join().expect("marker");
    let report = reopen_after(&dir, CrashMode::LoseUnsynced);
    assert!(report.dirty.contains(0), "region 0 must be dirty on disk: {}", report.dirty);
}

#[test]
fn mark_many_takes_one_map_write_and_is_all_or_nothing() {
    let dir = MemDir::new();
    let small = IntentConfig { max_hot_regions: 6, ..cfg() };
    let (map, _) = open_with(&dir, small).expect("create");
    let before = map.status().slot_writes;
    let intents = map
        .mark_many(&[(0, 1), (10 * REGION, 2 * REGION), (0, 0), (30 * REGION, 5)])
        .expect("marks");
    assert_eq!(map.status().slot_writes, before + 1, "one map write for all ranges");
    let runs: Vec<_> = intents.iter().map(WriteIntent::regions).collect();
    assert_eq!(
        runs,
        vec![
            Some(RegionRun { first: 0, count: 1 }),
            Some(RegionRun { first: 10, count: 2 }),
            None,
            Some(RegionRun { first: 30, count: 1 }),
        ]
    );
    for (i, intent) in intents.into_iter().enumerate() {
        intent.record(Seq(i as u64 + 1));
    }
    assert_eq!(reopen_after(&dir, CrashMode::LoseUnsynced).dirty, {
        let mut s = regions(0, 1).union(&regions(10, 2));
        s.insert(30);
        s
    });
    // Two more hot regions would exceed 6 (4 in use + 3 new): nothing is marked.
    assert!(matches!(
        map.mark_many(&[(40 * REGION, 1), (50 * REGION, 2 * REGION)]),
        Err(TapError::HotRegionsFull { hot: 4, needed: 3, .. })
    ));
    assert_eq!(map.status().hot_regions, 4);
    assert!(!map.dirty_regions().contains(40));
}

#[test]
fn a_later_format_version_is_named_as_such() {
    let dir = MemDir::new();
    drop(open(&dir).expect("create"));
    let mut b = dir.read_file(MAP).expect("file");
    b[8..12].copy_from_slice(&2u32.to_le_bytes());
    dir.write_file(MAP, b);
    assert!(matches!(open(&dir), Err(TapError::UnsupportedVersion { found: 2, supported: 1, .. })));
}
