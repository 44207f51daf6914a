//! Volume growth in the retention log: an `Event::Resize` is ordered like every event, so
//! points before it read the old size and points after it the new one; the log records
//! its own old size; a shrink is refused naming the volume and both sizes; the sizes
//! survive a reopen; and a retention pass that folds past the resize grows the base image
//! (while an older point, still retained, reads at its old size until then).

use std::sync::Arc;
use std::time::Duration;

use tidemark_journal::{
    BlockIo, Clock, Event, JournalError, JournalKey, ManualClock, MemDir, MemVolume, Nanos,
    RecoveryPoint, RetentionConfig, RetentionLog, RetentionPolicy, Seq, VolumeId,
};

const OLD: u64 = 40 << 10;
// Not a whole number of 4 KiB blocks: the old last block is partial.
const MID: u64 = OLD + 6 * 512;
const NEW: u64 = 96 << 10;
const V: VolumeId = VolumeId(0);

fn open(
    dir: &MemDir,
    base: &Arc<MemVolume>,
    clock: &Arc<ManualClock>,
    policy: RetentionPolicy,
    key: Option<JournalKey>,
) -> RetentionLog {
    let cfg = RetentionConfig { segment_bytes: 64 << 10, block_size: 4096, key, policy };
    let bases: Vec<Arc<dyn BlockIo>> = vec![base.clone()];
    RetentionLog::open(Arc::new(dir.clone()), bases, cfg, clock.clone()).expect("open").0
}

fn write(off: u64, len: usize, b: u8) -> Event {
    Event::Write { volume: V, offset: off, data: vec![b; len].into() }
}

fn read(log: &RetentionLog, seq: u64) -> Vec<u8> {
    let p = log.resolve(&RecoveryPoint::Seq(Seq(seq))).expect("point");
    let len = log.volume_len_at(V, p.seq).expect("size");
    let mut buf = vec![0u8; len as usize];
    log.read_at(&p, V, 0, &mut buf).expect("read");
    buf
}

#[test]
fn reads_across_a_resize_and_folding_grows_the_base() {
    for key in [None, Some(JournalKey::from_bytes([9; 32]))] {
        let (dir, base) = (MemDir::new(), Arc::new(MemVolume::new(OLD)));
        let clock = Arc::new(ManualClock::new(Nanos(1_000 * Nanos::SECOND)));
        let policy =
            RetentionPolicy { max_age: Some(Duration::from_secs(100)), ..Default::default() };
        let mut log = open(&dir, &base, &clock, policy.clone(), key.clone());
        let t = |clock: &ManualClock| clock.now();
        // seq 1-2: a write at the old end, a barrier (a point at the old size).
        log.append(Seq(1), t(&clock), &write(OLD - 1000, 1000, 0xa1)).unwrap();
        log.append(Seq(2), t(&clock), &Event::Barrier).unwrap();
        // seq 3: the volume grows by a few sectors; the writer's old size is informational.
        let grow = Event::Resize { volume: V, old_size: 7, new_size: MID };
        log.append(Seq(3), t(&clock), &grow).unwrap();
        assert_eq!(log.resizes(), &[(Seq(3), V, OLD, MID)], "the log records its own old size");
        // seq 4: a write across the old end into the new range; seq 5 a barrier.
        log.append(Seq(4), t(&clock), &write(OLD - 512, 2048, 0xb2)).unwrap();
        log.append(Seq(5), t(&clock), &Event::Barrier).unwrap();
        // A write past the current size is refused; so is a shrink, by name.
        let past = log.append(Seq(6), t(&clock), &write(MID, 512, 1));
        assert!(matches!(past, Err(JournalError::OutOfRange { volume_len: MID, .. })), "{past:?}");
        let shrink = log.append(
            Seq(6),
            t(&clock),
            &Event::Resize { volume: V, old_size: MID, new_size: OLD },
        );
        match shrink {
            Err(e @ JournalError::Shrink { volume: 0, size: MID, new_size: OLD }) => {
                let text = e.to_string();
                assert!(
                    text.contains("volume 0")
                        && text.contains(&MID.to_string())
                        && text.contains(&OLD.to_string()),
                    "{text}"
                );
            }
            other => panic!("a shrink was not refused: {other:?}"),
        }
        // seq 6: a second growth, a repeat of it (a no-op), a write at the very end.
        log.append(Seq(6), t(&clock), &Event::Resize { volume: V, old_size: MID, new_size: NEW })
            .unwrap();
        log.append(Seq(7), t(&clock), &Event::Resize { volume: V, old_size: MID, new_size: NEW })
            .unwrap();
        log.append(Seq(8), t(&clock), &write(NEW - 4096, 4096, 0xc3)).unwrap();
        log.append(Seq(9), t(&clock), &Event::Barrier).unwrap();
        log.sync().unwrap();

        let mut want2 = vec![0u8; OLD as usize];
        want2[(OLD - 1000) as usize..].fill(0xa1);
        let mut want5 = want2.clone();
        want5.resize(MID as usize, 0);
        want5[(OLD - 512) as usize..(OLD + 1536) as usize].fill(0xb2);
        let mut want9 = want5.clone();
        want9.resize(NEW as usize, 0);
        want9[(NEW - 4096) as usize..].fill(0xc3);
        let check = |log: &RetentionLog, from: u64| {
            for (seq, want) in [(2, &want2), (5, &want5), (9, &want9)] {
                if seq >= from {
                    assert_eq!(read(log, seq), *want, "the state at seq {seq}");
                }
            }
            // Before the growth, the new range does not exist.
            if from <= 2 {
                let p = log.resolve(&RecoveryPoint::Seq(Seq(2))).unwrap();
                let e = log.read_at(&p, V, OLD - 10, &mut [0u8; 20]).unwrap_err();
                assert!(matches!(e, JournalError::OutOfRange { volume_len: OLD, .. }), "{e:?}");
            }
            let mut cur = vec![0u8; NEW as usize];
            log.read_current(V, 0, &mut cur).unwrap();
            assert_eq!(cur, want9);
            assert_eq!(log.volume_len(V).unwrap(), NEW);
        };
        check(&log, 0);
        assert_eq!(base.len().unwrap(), OLD, "the base grows lazily");
        // Materialize the old point: an image of the old size.
        let out = MemVolume::new(0);
        let p2 = log.resolve(&RecoveryPoint::Seq(Seq(2))).unwrap();
        log.materialize(&p2, V, &out, &mut |_, _| {}).unwrap();
        assert_eq!(out.snapshot(), want2);

        // The sizes come back from the segments after a reopen.
        drop(log);
        let mut log = open(&dir, &base, &clock, policy.clone(), key.clone());
        assert_eq!(log.volume_len_at(V, Seq(2)).unwrap(), OLD);
        assert_eq!(log.volume_len_at(V, Seq(4)).unwrap(), MID);
        check(&log, 0);

        // Age the first three points out: the base folds past the first growth and its
        // image grows to that size; the newer states still read exactly.
        clock.advance(Duration::from_secs(50));
        log.append(Seq(10), clock.now(), &Event::Barrier).unwrap();
        clock.advance(Duration::from_secs(60));
        log.append(Seq(11), clock.now(), &Event::Barrier).unwrap();
        log.sync().unwrap();
        let r = log.enforce().unwrap();
        let base_seq = r.base_advanced_to.expect("the base moved").0;
        assert!(base_seq >= 9, "the base moved past both growths (to seq {base_seq})");
        assert_eq!(base.len().unwrap(), NEW, "folding past the growth grew the base image");
        assert_eq!(base.snapshot(), want9);
        assert!(log.resizes().is_empty());
        check(&log, base_seq);
        drop(log);
        let log = open(&dir, &base, &clock, policy, key);
        assert_eq!(log.volume_len(V).unwrap(), NEW);
        check(&log, base_seq);
    }
}

#[test]
fn the_spool_round_trips_resizes_and_a_version_2_segment_may_not_hold_them() {
    use tidemark_journal::format::SEGMENT_HEADER_LEN;
    use tidemark_journal::{Spool, SpoolConfig};
    let clock = Arc::new(ManualClock::new(Nanos(1_800_000_000 * Nanos::SECOND)));
    let cfg = |key| SpoolConfig { capacity_bytes: 1 << 30, segment_bytes: 64 << 10, key };
    let events = vec![
        write(0, 512, 1),
        Event::Resize { volume: VolumeId(1), old_size: OLD, new_size: NEW },
        Event::Barrier,
    ];
    for key in [None, Some(JournalKey::from_bytes([4; 32]))] {
        let dir = MemDir::new();
        let (mut spool, _) =
            Spool::open(Arc::new(dir.clone()), cfg(key.clone()), clock.clone()).unwrap();
        for e in &events {
            spool.append(e).unwrap();
        }
        spool.sync().unwrap();
        spool.close().unwrap();
        let (spool, report) =
            Spool::open(Arc::new(dir.clone()), cfg(key.clone()), clock.clone()).unwrap();
        assert!(report.defects.is_empty(), "{report:?}");
        let got: Vec<Event> =
            spool.read_after(Seq(0), u64::MAX).unwrap().into_iter().map(|e| e.event).collect();
        assert_eq!(got, events);
        drop(spool);
        if key.is_some() {
            continue;
        }
        // Relabelled as version 2 (checksum fixed): the resize record is cut as damage.
        let name = dir.list_segments()[0].clone();
        let mut b = dir.read_file(&name).unwrap();
        assert_eq!(&b[8..12], &3u32.to_le_bytes(), "writers write version 3");
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
        let crc = crc32c::crc32c(&b[..124]);
        b[124..128].copy_from_slice(&crc.to_le_bytes());
        assert!(b.len() > SEGMENT_HEADER_LEN);
        dir.write_file(&name, b);
        let (spool, report) = Spool::open(Arc::new(dir), cfg(None), clock.clone()).unwrap();
        assert!(report.truncated_tail.is_some(), "the v3 record is cut from the v2 segment");
        let got: Vec<Event> =
            spool.read_after(Seq(0), u64::MAX).unwrap().into_iter().map(|e| e.event).collect();
        assert_eq!(got, events[..1].to_vec());
    }
}
