//! Journals written by format version 1 (committed under `tests/fixtures/`) must stay
//! readable by every later build. Regenerate only when adding a new version's fixture:
//! `TIDEMARK_REGENERATE_FIXTURES=1 cargo test -p tidemark-journal --test backward_compat`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tidemark_journal::{
    BlockIo, Bookmark, BookmarkKind, Dir, Event, JournalKey, ManualClock, MemDir, MemVolume, Nanos,
    PointKind, RecoveryPoint, RetentionConfig, RetentionLog, Seq, Spool, SpoolConfig, VolumeId,
};

const VOL: u64 = 128 << 10;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(Nanos(1_767_225_600 * Nanos::SECOND)))
}

fn key() -> JournalKey {
    JournalKey::from_bytes(*b"tidemark v1 fixture key 32 bytes")
}

/// The workload both fixtures hold: event `s` at time `s` seconds.
fn event(s: u64) -> Event {
    match s % 10 {
        0 => Event::Bookmark(
            Bookmark::new(format!("bm-{s}"), BookmarkKind::ALL[(s / 10 % 3) as usize], 1).unwrap(),
        ),
        4 | 8 => Event::Barrier,
        6 => Event::WriteZeroes { volume: VolumeId(0), offset: (s % 31) * 2048, len: 4096 },
        _ => Event::Write {
            volume: VolumeId(0),
            offset: (s * 7 % 120) * 1024,
            data: (0..3072u64).map(|i| (s * 13 + i) as u8).collect::<Vec<u8>>().into(),
        },
    }
}

fn model_at(seq: u64) -> Vec<u8> {
    let mut v = vec![0u8; VOL as usize];
    for s in 1..=seq {
        if let Some((_, off, len)) = event(s).range() {
            let dst = &mut v[off as usize..(off + len) as usize];
            match event(s) {
                Event::Write { data, .. } => dst.copy_from_slice(&data),
                _ => dst.fill(0),
            }
        }
    }
    v
}

fn load(name: &str) -> MemDir {
    let dir = MemDir::new();
    let path = fixture(name);
    for e in std::fs::read_dir(&path)
        .unwrap_or_else(|e| panic!("fixture {} missing: {e}", path.display()))
    {
        let e = e.expect("entry");
        dir.insert(&e.file_name().to_string_lossy(), std::fs::read(e.path()).expect("read"), true);
    }
    dir
}

fn save(dir: &MemDir, name: &str) {
    let path = fixture(name);
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir_all(&path).expect("mkdir");
    for f in dir.list().expect("list") {
        std::fs::write(path.join(&f), dir.read_file(&f).expect("file")).expect("write");
    }
}

fn retention_cfg() -> RetentionConfig {
    RetentionConfig { segment_bytes: 64 << 10, key: Some(key()), ..Default::default() }
}

#[test]
fn v1_retention_log_reads_back() {
    let base: Arc<dyn BlockIo> = Arc::new(MemVolume::new(VOL));
    if std::env::var_os("TIDEMARK_REGENERATE_FIXTURES").is_some() {
        let dir = MemDir::new();
        let (mut log, _) =
            RetentionLog::open(Arc::new(dir.clone()), vec![base.clone()], retention_cfg(), clock())
                .expect("create");
        for s in 1..=60 {
            log.append(Seq(s), Nanos(1_767_225_600 * Nanos::SECOND + s * Nanos::SECOND), &event(s))
                .expect("append");
        }
        log.sync().expect("sync");
        save(&dir, "v1-retention");
    }
    let dir = load("v1-retention");
    let (log, report) = RetentionLog::open(Arc::new(dir), vec![base], retention_cfg(), clock())
        .expect("open v1 journal");
    assert!(report.defects.is_empty() && report.truncated_tail.is_none(), "{report:?}");
    let points = log.points();
    assert_eq!(points.len(), 1 + 18, "base + 12 barriers + 6 bookmarks");
    for p in &points {
        let mut got = vec![0u8; VOL as usize];
        log.read_at(p, VolumeId(0), 0, &mut got).expect("read");
        assert!(got == model_at(p.seq.0), "v1 point {} reads back differently", p.seq);
    }
    let b = log.resolve(&RecoveryPoint::Bookmark("bm-10".into())).expect("bookmark");
    assert!(
        matches!(&b.kind, PointKind::Bookmark(bm) if bm.kind == BookmarkKind::Filesystem && bm.group == 1)
    );
    assert_eq!(log.last_seq(), Seq(60));
}

#[test]
fn v1_spool_reads_back() {
    let cfg = || SpoolConfig { capacity_bytes: 1 << 30, segment_bytes: 64 << 10, key: None };
    if std::env::var_os("TIDEMARK_REGENERATE_FIXTURES").is_some() {
        let dir = MemDir::new();
        let (mut spool, _) = Spool::open(Arc::new(dir.clone()), cfg(), clock()).expect("create");
        for s in 1..=40 {
            spool.append(&event(s)).expect("append");
        }
        spool.sync().expect("sync");
        spool.ack(Seq(5)).expect("ack");
        spool.close().expect("close");
        save(&dir, "v1-spool");
    }
    let (spool, report) =
        Spool::open(Arc::new(load("v1-spool")), cfg(), clock()).expect("open v1 spool");
    assert!(report.defects.is_empty());
    assert_eq!(spool.acked(), Seq(5));
    let got = spool.read_after(spool.acked(), u64::MAX).expect("read");
    assert_eq!(got.len(), 35);
    for e in got {
        assert_eq!(e.event, event(e.seq.0));
    }
}
