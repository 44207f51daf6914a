//! Writes the seed corpora of the journal fuzz targets (`fuzz/corpus/journal_segment`,
//! `fuzz/corpus/journal_manifest`): real segments and manifests from spools and retention
//! logs, plain and encrypted, plus damaged variants. Run with
//! `cargo run -p tidemark-journal --example fuzz_seeds`.

use std::path::Path;
use std::sync::Arc;

use tidemark_journal::{
    BlockIo, Bookmark, BookmarkKind, Event, JournalKey, ManualClock, MemDir, MemVolume, Nanos,
    RetentionConfig, RetentionLog, Seq, Spool, SpoolConfig, VolumeId,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    let seg_dir = root.join("journal_segment");
    let man_dir = root.join("journal_manifest");
    std::fs::create_dir_all(&seg_dir)?;
    std::fs::create_dir_all(&man_dir)?;
    let clock = Arc::new(ManualClock::new(Nanos(1_700_000_000 * Nanos::SECOND)));
    let mut n = 0;
    for key in [None, Some(JournalKey::from_bytes([3; 32]))] {
        // A spool with every event kind.
        let dir = MemDir::new();
        let cfg =
            SpoolConfig { capacity_bytes: 1 << 20, segment_bytes: 64 << 10, key: key.clone() };
        let (mut spool, _) = Spool::open(Arc::new(dir.clone()), cfg, clock.clone())?;
        for i in 0..6u64 {
            spool.append(&Event::Write {
                volume: VolumeId(i as u16 % 2),
                offset: i * 4096,
                data: vec![i as u8; 512 * (i as usize + 1)].into(),
            })?;
            spool.append(&Event::WriteZeroes { volume: VolumeId(0), offset: 8192, len: 4096 })?;
            spool.append(&Event::Discard { volume: VolumeId(0), offset: 0, len: 512 })?;
            spool.append(&Event::Barrier)?;
        }
        spool.append(&Event::Bookmark(Bookmark::new("seed", BookmarkKind::Filesystem, 7)?))?;
        spool.sync()?;
        // A retention log with a bookmark and a coalesced history.
        let rdir = MemDir::new();
        let base: Arc<dyn BlockIo> = Arc::new(MemVolume::new(1 << 20));
        let rcfg =
            RetentionConfig { segment_bytes: 64 << 10, key: key.clone(), ..Default::default() };
        let (mut log, _) =
            RetentionLog::open(Arc::new(rdir.clone()), vec![base], rcfg, clock.clone())?;
        for s in 1..=20u64 {
            let ev = if s % 5 == 0 {
                Event::Bookmark(Bookmark::new(format!("b{s}"), BookmarkKind::User, 0)?)
            } else {
                Event::Write {
                    volume: VolumeId(0),
                    offset: s * 1024,
                    data: vec![s as u8; 1536].into(),
                }
            };
            log.append(Seq(s), Nanos(1_700_000_000 * Nanos::SECOND + s), &ev)?;
        }
        log.sync()?;
        for d in [&dir, &rdir] {
            for name in d.list_segments() {
                let bytes = d.read_file(&name).ok_or("segment vanished")?;
                std::fs::write(seg_dir.join(format!("seed-{n:02}")), &bytes)?;
                // A torn tail and a damaged record in the middle.
                let cut = bytes.len() - 37;
                std::fs::write(seg_dir.join(format!("seed-{n:02}-torn")), &bytes[..cut])?;
                let mut bad = bytes.clone();
                let mid = bad.len() / 2;
                bad[mid] ^= 0x55;
                std::fs::write(seg_dir.join(format!("seed-{n:02}-flip")), &bad)?;
                n += 1;
            }
            let m = d.read_file("MANIFEST").ok_or("manifest missing")?;
            std::fs::write(man_dir.join(format!("seed-{n:02}")), &m)?;
            std::fs::write(man_dir.join(format!("seed-{n:02}-short")), &m[..m.len() - 5])?;
            n += 1;
        }
    }
    // A spool across a volume growth (record kind 8, format version 3), plain and
    // encrypted, with a torn copy.
    for (i, key) in [None, Some(JournalKey::from_bytes([5; 32]))].into_iter().enumerate() {
        let dir = MemDir::new();
        let cfg = SpoolConfig { capacity_bytes: 1 << 20, segment_bytes: 64 << 10, key };
        let (mut spool, _) = Spool::open(Arc::new(dir.clone()), cfg, clock.clone())?;
        spool.append(&Event::Write {
            volume: VolumeId(0),
            offset: 0,
            data: vec![3u8; 512].into(),
        })?;
        spool.append(&Event::Resize {
            volume: VolumeId(0),
            old_size: 1 << 20,
            new_size: 2 << 20,
        })?;
        spool.append(&Event::Write {
            volume: VolumeId(0),
            offset: (2 << 20) - 512,
            data: vec![4u8; 512].into(),
        })?;
        spool.append(&Event::Barrier)?;
        spool.sync()?;
        for name in dir.list_segments() {
            let bytes = dir.read_file(&name).ok_or("segment vanished")?;
            std::fs::write(seg_dir.join(format!("resize-{i:02}")), &bytes)?;
            std::fs::write(seg_dir.join(format!("resize-{i:02}-torn")), &bytes[..bytes.len() - 9])?;
        }
    }
    println!("wrote seeds to {}", root.display());
    Ok(())
}
