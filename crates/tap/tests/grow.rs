//! Growth of a protected volume in the tap: `Tap::grow` appends a durable `Resize` event
//! after the writes completed before it, grows the write-intent map with the new range
//! out of sync (durable: a crash keeps the new size and the range to resync), serves the
//! new size only then, hands the added regions to the pair, and refuses a shrink (naming
//! both sizes) or a device that is not that large. A map that did not follow a growth (a
//! crash before its write) opens at its own size with `IntentMap::open_grown`, and the
//! tap serves that size until it grows again.

use std::sync::Arc;

use bytes::Bytes;
use tidemark_journal::{
    BlockIo, CrashMode, Dir, Event, ManualClock, MemDir, MemVolume, Nanos, Seq, Spool, SpoolConfig,
    VolumeId,
};
use tidemark_tap::{IntentConfig, IntentMap, RegionRun, Tap, TapConfig, TapError};

const REGION: u64 = 64 << 10;
const OLD: u64 = 1 << 20;
const NEW: u64 = OLD + 3 * REGION + 8192;
const MAP: &str = "intent.map";

fn cfg() -> IntentConfig {
    IntentConfig { region_bytes: REGION, max_hot_regions: 64, max_runs: 256 }
}

fn spool(dir: &MemDir) -> Spool {
    let clock = Arc::new(ManualClock::new(Nanos(1_700_000_000 * Nanos::SECOND)));
    let cfg = SpoolConfig { capacity_bytes: 1 << 30, segment_bytes: 256 << 10, key: None };
    Spool::open(Arc::new(dir.clone()), cfg, clock).expect("spool").0
}

#[test]
fn growth_is_ordered_durable_and_refuses_a_shrink() {
    let (spool_dir, map_dir) = (MemDir::new(), MemDir::new());
    let (intent, _) = IntentMap::open(map_dir.open(MAP, true).unwrap(), OLD, cfg()).unwrap();
    let device = Arc::new(MemVolume::new(OLD));
    let tap = Tap::new(device.clone(), spool(&spool_dir), intent, TapConfig::default()).unwrap();
    tap.write(0, Bytes::from(vec![1u8; 4096])).unwrap();
    // Not yet grown: the new range is out of range, and a growth the device does not
    // hold is refused.
    assert!(matches!(
        tap.write(OLD, Bytes::from(vec![2u8; 512])),
        Err(TapError::OutOfRange { .. })
    ));
    assert!(matches!(tap.grow(NEW), Err(TapError::OutOfRange { object_len: OLD, .. })));
    device.set_len(NEW).unwrap();
    device.write_at(&[7u8; 100], NEW - 100).unwrap();
    assert_eq!(tap.device_len(), OLD, "the tap serves its size until it grows");
    let seq = tap.grow(NEW).unwrap().expect("grew");
    assert_eq!(tap.device_len(), NEW);
    assert_eq!(tap.intent().volume_bytes(), NEW);
    assert_eq!(tap.grow(NEW).unwrap(), None, "the same size again is nothing");
    tap.write(OLD, Bytes::from(vec![2u8; 512])).unwrap();
    tap.sync_spool().unwrap();
    let events: Vec<(Seq, Event)> = tap
        .read_after(Seq::ZERO, u64::MAX)
        .unwrap()
        .into_iter()
        .map(|e| (e.seq, e.event))
        .collect();
    assert!(
        matches!(&events[..], [
            (_, Event::Write { offset: 0, .. }),
            (s, Event::Resize { volume: VolumeId(0), old_size: OLD, new_size: NEW }),
            (_, Event::Write { offset: OLD, .. }),
        ] if *s == seq),
        "{:?}",
        events.iter().map(|(s, e)| (s.0, e.range(), e.is_point())).collect::<Vec<_>>()
    );
    assert!(tap.status().durable_seq >= seq, "the resize is durable once grow returns");
    // The added regions (from the one holding the old end) are out of sync, and handed
    // to the pair once.
    let run = RegionRun { first: OLD / REGION, count: NEW.div_ceil(REGION) - OLD / REGION };
    assert_eq!(tap.take_grown(), vec![(seq, run)]);
    assert!(tap.take_grown().is_empty());
    let oos = tap.intent().out_of_sync();
    assert!((run.first..run.end()).all(|r| oos.contains(r)), "{oos:?}");
    // A shrink is refused by name, and nothing changes.
    let e = tap.grow(OLD).unwrap_err();
    assert!(matches!(e, TapError::Shrink { size: NEW, new_size: OLD, .. }), "{e:?}");
    let text = e.to_string();
    assert!(text.contains(&NEW.to_string()) && text.contains(&OLD.to_string()), "{text}");
    assert_eq!(tap.device_len(), NEW);

    // A crash now: the map comes back with the new size and the range still to resync.
    drop(tap);
    let crashed = map_dir.crash(CrashMode::LoseUnsynced);
    let (map, report) = IntentMap::open(crashed.open(MAP, false).unwrap(), NEW, cfg()).unwrap();
    assert_eq!(map.volume_bytes(), NEW);
    assert!((run.first..run.end()).all(|r| report.dirty.contains(r)), "{report:?}");
    // Opened as the old size, it is a mismatch naming the map's size.
    let old = IntentMap::open(crashed.open(MAP, false).unwrap(), OLD, cfg());
    assert!(matches!(
        old,
        Err(TapError::MapMismatch { field: "volume_bytes", found: NEW, expected: OLD, .. })
    ));
}

#[test]
fn a_map_that_missed_a_growth_opens_at_its_size_and_grows_again() {
    let (spool_dir, map_dir) = (MemDir::new(), MemDir::new());
    drop(IntentMap::open(map_dir.open(MAP, true).unwrap(), OLD, cfg()).unwrap());
    // The device grew while no tap ran (or the map write of a growth was lost).
    let device = Arc::new(MemVolume::new(NEW));
    assert!(matches!(
        IntentMap::open(map_dir.open(MAP, false).unwrap(), NEW, cfg()),
        Err(TapError::MapMismatch { field: "volume_bytes", found: OLD, .. })
    ));
    let (intent, _) = IntentMap::open_grown(map_dir.open(MAP, false).unwrap(), NEW, cfg()).unwrap();
    assert_eq!(intent.volume_bytes(), OLD);
    let tap = Tap::new(device.clone(), spool(&spool_dir), intent, TapConfig::default()).unwrap();
    assert_eq!(tap.device_len(), OLD);
    assert_eq!(tap.backing_len().unwrap(), NEW);
    let seq = tap.grow(NEW).unwrap().expect("grew");
    assert_eq!(tap.device_len(), NEW);
    let events = tap.read_after(Seq::ZERO, u64::MAX).unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].seq, seq);
    // A map larger than the device (it shrank) is refused by the tap.
    drop(tap);
    let (intent, _) = IntentMap::open(map_dir.open(MAP, false).unwrap(), NEW, cfg()).unwrap();
    let small = Arc::new(MemVolume::new(OLD));
    let e = Tap::new(small, spool(&MemDir::new()), intent, TapConfig::default()).unwrap_err();
    assert!(
        e.to_string().contains(&NEW.to_string()) && e.to_string().contains(&OLD.to_string()),
        "{e}"
    );
}

#[test]
fn a_torn_growth_write_leaves_the_old_size_and_the_old_marks() {
    let dir = MemDir::new();
    let (map, _) = IntentMap::open(dir.open(MAP, true).unwrap(), OLD, cfg()).unwrap();
    map.mark(0, 4096).unwrap().record(Seq(1));
    let before = dir.read_file(MAP).unwrap();
    map.grow(NEW).unwrap();
    let after = dir.read_file(MAP).unwrap();
    let slot = map.header().slot_offset((map.status().generation & 1) as u8) as usize;
    drop(map);
    // The image's used bytes: its 64-byte header and 16 bytes a run; a cut at or past
    // them is a whole write.
    let runs = u32::from_le_bytes(after[slot + 32..slot + 36].try_into().unwrap()) as usize;
    let used = 64 + 16 * runs;
    for cut in [1usize, 60, 64, used - 16, used - 8] {
        let mut torn = before.clone();
        torn[slot..slot + cut].copy_from_slice(&after[slot..slot + cut]);
        let d = MemDir::new();
        d.write_file(MAP, torn);
        let (map, report) = IntentMap::open_grown(d.open(MAP, false).unwrap(), NEW, cfg()).unwrap();
        assert_eq!(map.volume_bytes(), OLD, "torn at {cut}: the old image, the old size");
        assert!(report.dirty.contains(0), "torn at {cut}: the old marks stay");
        // (One byte in: the slot's first byte is the same in both images, so the slot
        // still holds its older, valid image and nothing is torn to name.)
        assert!(cut == 1 || report.other_slot.is_some(), "torn at {cut}: the torn slot is named");
    }
}
