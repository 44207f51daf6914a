//! Bad input and bad storage: damaged headers and manifests, wrong keys, missing or foreign
//! segments, full disks and failing syncs. Each gets a specific error that names the object,
//! and nothing acknowledged is lost.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tidemark_journal::format::{self, SEGMENT_HEADER_LEN};
use tidemark_journal::{
    BlockIo, Bookmark, BookmarkKind, Clock, CrashMode, Event, JournalError, JournalKey, Keep,
    ManualClock, MemDir, MemVolume, Nanos, RecoveryPoint, RetentionConfig, RetentionLog,
    RetentionPolicy, Seq, Spool, SpoolConfig, Tier, VolumeId,
};

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(Nanos(1_700_000_000 * Nanos::SECOND)))
}

fn write(seq: u64) -> Event {
    Event::Write {
        volume: VolumeId(0),
        offset: (seq % 64) * 4096,
        data: Bytes::from(vec![seq as u8; 4096]),
    }
}

fn cfg(key: Option<JournalKey>) -> SpoolConfig {
    SpoolConfig { capacity_bytes: 1 << 30, segment_bytes: 64 << 10, key }
}

/// A spool with `n` synced records, closed.
fn spool_dir(n: u64, key: Option<JournalKey>) -> MemDir {
    let dir = MemDir::new();
    let (mut spool, _) = Spool::open(Arc::new(dir.clone()), cfg(key), clock()).expect("open");
    for s in 1..=n {
        spool.append(&write(s)).expect("append");
    }
    spool.sync().expect("sync");
    dir
}

fn reopen(dir: &MemDir, key: Option<JournalKey>) -> Result<Spool, JournalError> {
    Spool::open(Arc::new(dir.clone()), cfg(key), clock()).map(|(s, _)| s)
}

fn with_segment(dir: &MemDir, f: impl FnOnce(&mut Vec<u8>)) -> String {
    let name = dir.list_segments()[0].clone();
    let mut b = dir.read_file(&name).expect("segment");
    f(&mut b);
    dir.write_file(&name, b);
    name
}

fn fix_header_crc(b: &mut [u8]) {
    let crc = crc32c_of(&b[..124]);
    b[124..128].copy_from_slice(&crc.to_le_bytes());
}

fn crc32c_of(b: &[u8]) -> u32 {
    crc32c::crc32c(b)
}

#[test]
fn truncated_segment_header() {
    let dir = spool_dir(40, None);
    let name = with_segment(&dir, |b| b.truncate(60));
    match reopen(&dir, None) {
        Err(JournalError::Truncated { object, needed, found }) => {
            assert_eq!((object, needed, found), (name, SEGMENT_HEADER_LEN as u64, 60));
        }
        other => panic!("expected Truncated, got {other:?}"),
    }
}

#[test]
fn wrong_magic() {
    let dir = spool_dir(40, None);
    let name = with_segment(&dir, |b| b[0..8].copy_from_slice(b"NOTAJRNL"));
    let e = reopen(&dir, None).expect_err("bad magic");
    assert!(matches!(&e, JournalError::BadMagic { object, .. } if *object == name), "{e:?}");
    assert!(e.to_string().contains("expected"), "{e}");
}

#[test]
fn future_version() {
    let dir = spool_dir(40, None);
    with_segment(&dir, |b| {
        b[8..12].copy_from_slice(&4u32.to_le_bytes());
        fix_header_crc(b);
    });
    let e = reopen(&dir, None).expect_err("future version");
    assert!(matches!(e, JournalError::UnsupportedVersion { found: 4, supported: 3, .. }), "{e:?}");
}

#[test]
fn flipped_bit_in_segment_header() {
    let dir = spool_dir(40, None);
    let name = with_segment(&dir, |b| b[50] ^= 0x10);
    let e = reopen(&dir, None).expect_err("flipped bit");
    assert!(matches!(&e, JournalError::HeaderChecksum { object, .. } if *object == name), "{e:?}");
}

#[test]
fn zero_filled_segment() {
    let dir = spool_dir(40, None);
    let name = with_segment(&dir, |b| b.iter_mut().for_each(|x| *x = 0));
    let e = reopen(&dir, None).expect_err("zeros");
    assert!(matches!(&e, JournalError::ZeroFilled { object, .. } if *object == name), "{e:?}");
}

#[test]
fn flipped_bit_in_payload_is_reported_with_segment_and_offset() {
    let dir = spool_dir(40, None);
    let name = dir.list_segments()[0].clone();
    let at = SEGMENT_HEADER_LEN + 48 + 1000; // inside the first record's payload
    with_segment(&dir, |b| b[at] ^= 1);
    let (spool, report) = Spool::open(Arc::new(dir.clone()), cfg(None), clock()).expect("open");
    assert_eq!(report.defects.len(), 1);
    assert_eq!(report.defects[0].0, name);
    assert_eq!(report.defects[0].1.offset, SEGMENT_HEADER_LEN as u64);
    assert!(report.defects[0].1.reason.contains("payload checksum"), "{:?}", report.defects);
    let got = spool.read_after(Seq(0), u64::MAX).expect("rest readable");
    assert_eq!(got.len(), 39);
    assert_eq!(got[0].seq, Seq(2));
}

#[test]
fn damaged_manifest() {
    let base = spool_dir(10, None);
    let m = base.read_file("MANIFEST").expect("manifest");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", m[..20].to_vec()),
        ("magic", [b"XXXXXXXX".as_slice(), &m[8..]].concat()),
        ("bit", {
            let mut x = m.clone();
            x[60] ^= 4;
            x
        }),
        ("zero", vec![0; m.len()]),
        ("version", {
            let mut x = m.clone();
            x[8] = 9;
            x
        }),
    ];
    for (what, bytes) in cases {
        let dir = base.crash(CrashMode::KeepAll);
        dir.write_file("MANIFEST", bytes);
        let e = reopen(&dir, None).expect_err(what);
        let ok = match what {
            "truncated" => matches!(e, JournalError::Truncated { .. }),
            "magic" => matches!(e, JournalError::BadMagic { .. }),
            "bit" => matches!(e, JournalError::HeaderChecksum { .. }),
            "zero" => matches!(e, JournalError::ZeroFilled { .. }),
            _ => matches!(e, JournalError::UnsupportedVersion { found: 9, .. }),
        };
        assert!(ok, "{what}: {e:?}");
        assert!(e.to_string().starts_with("MANIFEST"), "{what}: error names the manifest: {e}");
    }
}

#[test]
fn keys_are_checked() {
    let key = JournalKey::from_bytes([1; 32]);
    let dir = spool_dir(10, Some(key.clone()));
    assert!(matches!(reopen(&dir, None), Err(JournalError::KeyRequired { .. })));
    assert!(matches!(
        reopen(&dir, Some(JournalKey::from_bytes([2; 32]))),
        Err(JournalError::WrongKey { .. })
    ));
    let plain = spool_dir(10, None);
    assert!(matches!(reopen(&plain, Some(key.clone())), Err(JournalError::KeyNotExpected { .. })));
    let spool = reopen(&dir, Some(key)).expect("right key");
    assert_eq!(spool.read_after(Seq(0), u64::MAX).expect("read")[3].event, write(4));
    // The plaintext is not on disk.
    let seg = dir.read_file(&dir.list_segments()[0]).expect("segment");
    assert!(!seg.windows(64).any(|w| w.iter().all(|&b| b == 4)), "payload stored in the clear");
}

#[test]
fn tampered_ciphertext_fails_authentication() {
    let key = JournalKey::from_bytes([1; 32]);
    let dir = spool_dir(10, Some(key.clone()));
    let at = SEGMENT_HEADER_LEN + 48 + 100;
    with_segment(&dir, |b| {
        b[at] ^= 0x80;
        // Recompute the payload checksum so only authentication can catch it.
        let plen = u32::from_le_bytes(
            b[SEGMENT_HEADER_LEN + 36..SEGMENT_HEADER_LEN + 40].try_into().unwrap(),
        ) as usize;
        let p0 = SEGMENT_HEADER_LEN + 48;
        let crc = crc32c_of(&b[p0..p0 + plen]);
        b[SEGMENT_HEADER_LEN + 40..SEGMENT_HEADER_LEN + 44].copy_from_slice(&crc.to_le_bytes());
        let seed = crc32c_of(&b[64..80]);
        let hcrc = crc_append(seed, &b[SEGMENT_HEADER_LEN..SEGMENT_HEADER_LEN + 44]);
        b[SEGMENT_HEADER_LEN + 44..SEGMENT_HEADER_LEN + 48].copy_from_slice(&hcrc.to_le_bytes());
    });
    let spool = reopen(&dir, Some(key)).expect("open");
    let e = spool.read_after(Seq(0), u64::MAX).expect_err("tampered");
    assert!(
        matches!(&e, JournalError::Decrypt { offset, .. } if *offset == SEGMENT_HEADER_LEN as u64),
        "{e:?}"
    );
}

fn crc_append(seed: u32, b: &[u8]) -> u32 {
    crc32c::crc32c_append(seed, b)
}

#[test]
fn missing_and_foreign_segments() {
    let dir = spool_dir(60, None);
    let segs = dir.list_segments();
    assert!(segs.len() >= 2);
    let gone = dir.crash(CrashMode::KeepAll);
    tidemark_journal::Dir::remove(&gone, &segs[0]).expect("remove");
    match reopen(&gone, None) {
        Err(JournalError::MissingSegment { name }) => assert_eq!(name, segs[0]),
        other => panic!("expected MissingSegment, got {other:?}"),
    }
    let other = spool_dir(60, None);
    let foreign = dir.crash(CrashMode::KeepAll);
    foreign.write_file(&segs[0], other.read_file(&segs[0]).expect("other segment"));
    assert!(matches!(reopen(&foreign, None), Err(JournalError::ForeignSegment { .. })));
    let no_manifest = dir.crash(CrashMode::KeepAll);
    tidemark_journal::Dir::remove(&no_manifest, "MANIFEST").expect("remove");
    assert!(matches!(reopen(&no_manifest, None), Err(JournalError::MissingManifest { .. })));
}

#[test]
fn full_disk_refuses_cleanly_and_keeps_what_was_durable() {
    let dir = MemDir::new();
    let (mut spool, _) = Spool::open(Arc::new(dir.clone()), cfg(None), clock()).expect("open");
    for s in 1..=30 {
        spool.append(&write(s)).expect("append");
    }
    assert_eq!(spool.sync().expect("sync"), Seq(30));
    dir.set_space_left(Some(10_000));
    let mut err = None;
    for s in 31..=200 {
        if let Err(e) = spool.append(&write(s)).and_then(|_| spool.sync()) {
            err = Some(e);
            break;
        }
    }
    let e = err.expect("the disk fills up");
    assert!(e.is_disk_full(), "{e:?}");
    // State is unknown after a failed write: further work is refused.
    assert!(matches!(spool.append(&write(999)), Err(JournalError::Poisoned { .. })));
    drop(spool);
    dir.set_space_left(None);
    let spool = reopen(&dir.crash(CrashMode::LoseUnsynced), None).expect("reopen after ENOSPC");
    let got = spool.read_after(Seq(0), u64::MAX).expect("read");
    assert!(got.len() >= 30, "acknowledged-durable records kept");
    for e in got {
        assert_eq!(e.event, write(e.seq.0));
    }
}

#[test]
fn spool_overflow_is_explicit_and_drops_nothing() {
    let dir = MemDir::new();
    let cfg = SpoolConfig { capacity_bytes: 64 << 10, segment_bytes: 64 << 10, key: None };
    let (mut spool, _) = Spool::open(Arc::new(dir.clone()), cfg, clock()).expect("open");
    let mut accepted = 0;
    let overflow = loop {
        match spool.append(&write(accepted + 1)) {
            Ok(_) => accepted += 1,
            Err(e) => break e,
        }
    };
    assert!(
        matches!(overflow, JournalError::SpoolOverflow { capacity: 65536, .. }),
        "{overflow:?}"
    );
    assert_eq!(spool.backlog_events() as u64, accepted);
    // Acknowledging frees room; the next append takes the next sequence number.
    spool.ack(Seq(accepted / 2)).expect("ack");
    assert_eq!(spool.append(&write(accepted + 1)).expect("room again"), Seq(accepted + 1));
    // Only durable events are offered to the shipper.
    let undurable = spool.read_after(spool.acked(), u64::MAX).expect("read");
    assert!(undurable.iter().all(|e| e.seq <= spool.durable_seq()));
    spool.sync().expect("sync");
    let got = spool.read_after(spool.acked(), u64::MAX).expect("read");
    assert_eq!(got.first().expect("events").seq, Seq(accepted / 2 + 1));
    assert_eq!(got.len() as u64, accepted - accepted / 2 + 1);
}

#[test]
fn spool_ack_trims_segments_and_survives_reopen() {
    let dir = MemDir::new();
    let (mut spool, _) = Spool::open(Arc::new(dir.clone()), cfg(None), clock()).expect("open");
    for s in 1..=100 {
        spool.append(&write(s)).expect("append");
    }
    spool.sync().expect("sync");
    let before = spool.disk_bytes();
    spool.ack(Seq(80)).expect("ack");
    assert!(spool.disk_bytes() < before / 2, "whole acknowledged segments are deleted");
    spool.close().expect("close");
    let mut spool = reopen(&dir, None).expect("reopen");
    assert_eq!(spool.acked(), Seq(80));
    let got = spool.read_after(spool.acked(), u64::MAX).expect("read");
    assert_eq!(got.iter().map(|e| e.seq.0).collect::<Vec<_>>(), (81..=100).collect::<Vec<_>>());
    assert_eq!(spool.append(&Event::Barrier).expect("append"), Seq(101));
    spool.ack(Seq(101)).expect("ack all");
    spool.close().expect("close");
    let mut spool = reopen(&dir, None).expect("reopen");
    assert_eq!(spool.append(&Event::Barrier).expect("numbers continue"), Seq(102));
}

fn retention(
    dir: &MemDir,
    base: &Arc<MemVolume>,
    clock: &Arc<ManualClock>,
    policy: RetentionPolicy,
) -> RetentionLog {
    let cfg = RetentionConfig { segment_bytes: 64 << 10, block_size: 4096, key: None, policy };
    RetentionLog::open(
        Arc::new(dir.clone()),
        vec![base.clone() as Arc<dyn BlockIo>],
        cfg,
        clock.clone(),
    )
    .expect("open")
    .0
}

#[test]
fn retention_pass_interrupted_by_failing_sync_recovers_every_point() {
    let policy = RetentionPolicy {
        max_age: Some(Duration::from_secs(300)),
        max_bytes: None,
        tiers: vec![Tier {
            older_than: Duration::from_secs(60),
            keep: Keep::Every { interval: Duration::from_secs(30), bookmarks: vec![] },
        }],
    };
    // Try the failure at every sync the pass makes.
    for syncs_ok in 0..40u64 {
        let dir = MemDir::new();
        let base = Arc::new(MemVolume::new(256 << 10));
        let clock = clock();
        let mut log = retention(&dir, &base, &clock, policy.clone());
        let mut model = vec![0u8; 256 << 10];
        let mut states = std::collections::BTreeMap::from([(0, model.clone())]);
        for s in 1..=600u64 {
            let ev = if s % 4 == 0 {
                Event::Barrier
            } else {
                let off = (s * 7919 % 60) * 4096 + (s % 3) * 512;
                let data = vec![(s % 251) as u8; 1024 + (s % 5) as usize * 1024];
                model[off as usize..off as usize + data.len()].copy_from_slice(&data);
                Event::Write { volume: VolumeId(0), offset: off, data: data.into() }
            };
            log.append(Seq(s), clock.now(), &ev).expect("append");
            states.insert(s, model.clone());
            clock.advance(Duration::from_secs(1));
        }
        log.sync().expect("sync");
        dir.set_syncs_left(Some(syncs_ok));
        let outcome = log.enforce();
        drop(log);
        dir.set_syncs_left(None);
        let dir = dir.crash(CrashMode::LoseUnsynced);
        let log = retention(&dir, &base, &clock, policy.clone());
        for p in log.points() {
            let mut got = vec![0u8; 256 << 10];
            log.read_at(&p, VolumeId(0), 0, &mut got).expect("read");
            assert!(
                got == states[&p.seq.0],
                "after failing sync #{syncs_ok}: point {} differs",
                p.seq
            );
        }
        let latest = log.resolve(&RecoveryPoint::Latest).expect("latest");
        assert_eq!(latest.seq, Seq(600));
        if outcome.is_ok() {
            assert!(syncs_ok >= 3, "the pass was interrupted at several of its syncs: {syncs_ok}");
            return;
        }
    }
    panic!("the retention pass never completed");
}

#[test]
fn unknown_points_and_bad_bookmarks_say_why() {
    let dir = MemDir::new();
    let base = Arc::new(MemVolume::new(64 << 10));
    let clock = clock();
    let mut log = retention(&dir, &base, &clock, RetentionPolicy::default());
    log.append(Seq(1), clock.now(), &write(1)).expect("append");
    log.append(
        Seq(2),
        clock.now(),
        &Event::Bookmark(Bookmark::new("before-upgrade", BookmarkKind::User, 0).unwrap()),
    )
    .expect("append");
    let e = log.resolve(&RecoveryPoint::Bookmark("nope".into())).expect_err("unknown bookmark");
    assert!(
        e.to_string().contains("\"nope\"") && e.to_string().contains("no retained bookmark"),
        "{e}"
    );
    let e = log.resolve(&RecoveryPoint::Seq(Seq(9))).expect_err("future seq");
    assert!(e.to_string().contains("not received yet"), "{e}");
    assert_eq!(
        log.resolve(&RecoveryPoint::Bookmark("before-upgrade".into())).expect("bookmark").seq,
        Seq(2)
    );
    for bad in ["", "a\nb", "   ", &"x".repeat(256)] {
        let e = Bookmark::new(bad, BookmarkKind::User, 0).expect_err("bad name");
        assert!(matches!(e, JournalError::BadBookmark { .. }), "{e:?}");
    }
    let e = log
        .append(
            Seq(3),
            clock.now(),
            &Event::Write { volume: VolumeId(0), offset: 63 << 10, data: vec![1; 2048].into() },
        )
        .expect_err("out of range");
    assert!(matches!(e, JournalError::OutOfRange { volume_len: 65536, .. }), "{e:?}");
    let e = log.append(Seq(2), clock.now(), &Event::Barrier).expect_err("seq order");
    assert!(matches!(e, JournalError::SeqOrder { .. }), "{e:?}");
    let _ = format::Role::Spool;
}

#[test]
fn reopening_over_the_wrong_volumes_is_refused() {
    let dir = MemDir::new();
    let base = Arc::new(MemVolume::new(64 << 10));
    let clock = clock();
    let mut log = retention(&dir, &base, &clock, RetentionPolicy::default());
    log.append(
        Seq(1),
        clock.now(),
        &Event::Write { volume: VolumeId(0), offset: 60 << 10, data: vec![1; 4096].into() },
    )
    .expect("append");
    log.sync().expect("sync");
    drop(log);
    let small = Arc::new(MemVolume::new(32 << 10));
    let cfg = RetentionConfig { segment_bytes: 64 << 10, ..Default::default() };
    let e = RetentionLog::open(
        Arc::new(dir.clone()),
        vec![small as Arc<dyn BlockIo>],
        cfg,
        clock.clone(),
    )
    .expect_err("shrunken volume");
    assert!(matches!(e, JournalError::OutOfRange { volume_len: 32768, .. }), "{e:?}");
}

#[test]
fn forged_plaintext_record_in_an_encrypted_journal_is_refused() {
    let key = JournalKey::from_bytes([5; 32]);
    let dir = spool_dir(3, Some(key.clone()));
    // Clear the encrypted flag of the first record and fix both checksums, as a forger
    // who knows the format (but not the key) would.
    with_segment(&dir, |b| {
        let h = SEGMENT_HEADER_LEN;
        b[h + 5] = 0;
        let plen = u32::from_le_bytes(b[h + 36..h + 40].try_into().unwrap()) - 16;
        b[h + 36..h + 40].copy_from_slice(&plen.to_le_bytes());
        b[h + 32..h + 36].copy_from_slice(&plen.to_le_bytes());
        let seed = crc32c_of(&b[64..80]);
        let crc = crc_append(seed, &b[h..h + 44]);
        b[h + 44..h + 48].copy_from_slice(&crc.to_le_bytes());
    });
    let (spool, report) =
        Spool::open(Arc::new(dir.clone()), cfg(Some(key)), clock()).expect("open");
    assert!(
        report
            .defects
            .iter()
            .any(|(_, d)| d.reason.contains("not encrypted in an encrypted journal")),
        "{:?}",
        report.defects
    );
    assert!(spool.read_after(Seq(0), u64::MAX).expect("read").iter().all(|e| e.seq != Seq(1)));
}
