//! The read paths that do their disk I/O away from the log: read plans (planned under the
//! log's lock, carried out after it, while the log changes) and materialize's in-kernel copy
//! of the base's unchanged ranges. Both must give exactly the point's bytes, on real files.

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use tidemark_journal::{
    BlockIo, Bookmark, BookmarkKind, Clock, CopyMode, Event, FileIo, FsDir, ManualClock, MemVolume,
    Nanos, RecoveryPoint, RetentionConfig, RetentionLog, RetentionPolicy, Seq, VolumeId,
};

/// Over one materialize chunk (8 MiB), with a tail that is not a whole block.
const VOL: u64 = (8 << 20) + (20 << 10) + 512;

struct Feed {
    log: RetentionLog,
    clock: Arc<ManualClock>,
    seq: u64,
    cur: Vec<u8>,
    rng: StdRng,
}

impl Feed {
    fn open(dir: &std::path::Path, base: Arc<dyn BlockIo>, initial: Vec<u8>, max_age: u64) -> Self {
        let clock = Arc::new(ManualClock::new(Nanos(1_800_000_000 * Nanos::SECOND)));
        let cfg = RetentionConfig {
            segment_bytes: 256 << 10,
            policy: RetentionPolicy {
                max_age: Some(Duration::from_secs(max_age)),
                ..Default::default()
            },
            ..Default::default()
        };
        let (log, _) = RetentionLog::open(
            Arc::new(FsDir::new(dir.join("journal")).expect("journal dir")),
            vec![base],
            cfg,
            clock.clone(),
        )
        .expect("open");
        Feed { log, clock, seq: 0, cur: initial, rng: StdRng::seed_from_u64(7) }
    }

    fn push(&mut self, e: &Event) {
        self.seq += 1;
        self.clock.advance(Duration::from_secs(1));
        self.log.append(Seq(self.seq), self.clock.now(), e).expect("append");
    }

    /// `n` random mutations: writes of 1 byte to 80 KiB at any offset (partial blocks,
    /// blocks across the 8 MiB chunk edge, the tail), write-zeroes and discards.
    fn mutate(&mut self, n: usize) {
        for i in 0..n {
            let len = match i % 4 {
                0 => self.rng.gen_range(1..4096u64),
                1 => 4096 * self.rng.gen_range(1..20u64),
                _ => self.rng.gen_range(1..(80u64 << 10)),
            };
            let offset = match i % 7 {
                0 => ((8 << 20) - self.rng.gen_range(0..len)).min(VOL - len),
                1 => VOL - len,
                _ => self.rng.gen_range(0..VOL - len),
            };
            let range = offset as usize..(offset + len) as usize;
            let event = match i % 9 {
                3 => {
                    self.cur[range].fill(0);
                    Event::WriteZeroes { volume: VolumeId(0), offset, len: len as u32 }
                }
                5 => {
                    self.cur[range].fill(0);
                    Event::Discard { volume: VolumeId(0), offset, len: len as u32 }
                }
                _ => {
                    let mut data = vec![0u8; len as usize];
                    self.rng.fill_bytes(&mut data);
                    self.cur[range].copy_from_slice(&data);
                    Event::Write { volume: VolumeId(0), offset, data: data.into() }
                }
            };
            self.push(&event);
        }
        self.push(&Event::Barrier);
    }

    fn bookmark(&mut self, name: &str) {
        self.push(&Event::Bookmark(Bookmark::new(name, BookmarkKind::User, 0).expect("name")));
    }
}

fn random_base(path: &std::path::Path) -> (Arc<dyn BlockIo>, Vec<u8>) {
    let mut bytes = vec![0u8; VOL as usize];
    StdRng::seed_from_u64(1).fill_bytes(&mut bytes);
    std::fs::write(path, &bytes).expect("write base");
    (Arc::new(FileIo::open(path).expect("open base")), bytes)
}

#[test]
fn a_plan_reads_the_held_point_after_appends_base_moves_and_segment_removal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, initial) = random_base(&dir.path().join("base.img"));
    let mut f = Feed::open(dir.path(), base, initial, 600);
    for _ in 0..3 {
        f.mutate(60);
    }
    f.bookmark("p");
    let want = f.cur.clone();
    let hold = {
        let p = f.log.resolve(&RecoveryPoint::Bookmark("p".into())).expect("resolve");
        f.log.hold(&p).expect("hold")
    };
    // Ranges of every shape: whole volume, unaligned, inside one block, across the chunk
    // edge, the tail.
    let ranges: [(u64, u64); 6] = [
        (0, VOL),
        (100, 70_001),
        (4096 * 5 + 10, 300),
        ((8 << 20) - 5000, 9000),
        (VOL - 7000, 7000),
        (1 << 20, 1 << 20),
    ];
    let plans: Vec<_> = ranges
        .iter()
        .map(|&(off, len)| f.log.plan_read(&hold, VolumeId(0), off, len).expect("plan"))
        .collect();
    assert!(plans[0].journal_blocks() > 100, "the point should need the journal");
    // Everything the plans were made from changes: newer writes over the same blocks, the
    // base moved up to the held point (its blocks written, its segments deleted).
    let segments = |d: &std::path::Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d.join("journal"))
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".seg"))
            .collect();
        v.sort();
        v
    };
    let before = segments(dir.path());
    for _ in 0..3 {
        f.mutate(60);
    }
    f.clock.advance(Duration::from_secs(3600));
    f.mutate(5);
    let report = f.log.enforce().expect("enforce");
    // Up to right before the held bookmark's record (the same state; the bookmark stays).
    assert_eq!(report.base_advanced_to, Some(Seq(hold.point().seq.0 - 1)), "{report:?}");
    let after = segments(dir.path());
    assert!(
        before.iter().any(|s| !after.contains(s)),
        "no segment was removed: {before:?} {after:?}"
    );
    for (plan, &(off, len)) in plans.iter().zip(&ranges) {
        let mut got = vec![0u8; len as usize];
        plan.read(&mut got).expect("read the plan");
        assert!(got == want[off as usize..(off + len) as usize], "plan at {off}+{len} differs");
    }
    // A plan needs a hold of its own log.
    let dir2 = tempfile::tempdir().expect("tempdir");
    let (base2, initial2) = random_base(&dir2.path().join("base.img"));
    let mut other = Feed::open(dir2.path(), base2, initial2, 600);
    other.mutate(3);
    let err = other.log.plan_read(&hold, VolumeId(0), 0, 4096).expect_err("foreign hold");
    assert!(err.to_string().contains("another retention log"), "{err}");
    let mut short = vec![0u8; 10];
    assert!(plans[1].read(&mut short).is_err(), "a buffer of the wrong length");
}

/// Materializes a point 150 mutations in (40 more after it) with `mode` and checks the
/// image, its hash and the progress reports; returns whether it went with direct I/O.
fn materialize_matches(
    base: Arc<dyn BlockIo>,
    initial: Vec<u8>,
    out: &dyn BlockIo,
    mode: CopyMode,
) -> bool {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut f = Feed::open(dir.path(), base, initial, 3600 * 24);
    f.mutate(150);
    f.bookmark("m");
    let want = f.cur.clone();
    f.mutate(40);
    let p = f.log.resolve(&RecoveryPoint::Bookmark("m".into())).expect("resolve");
    let mut seen = Vec::new();
    let report = f
        .log
        .materialize_with(&p, VolumeId(0), out, mode, &mut |done, total| seen.push((done, total)))
        .expect("materialize");
    let mut got = vec![0u8; VOL as usize];
    out.read_at(&mut got, 0).expect("read back");
    assert_eq!(out.len().expect("len"), VOL);
    assert!(got == want, "the materialized image differs from the point ({report:?})");
    assert_eq!(report.hash, *blake3::hash(&want).as_bytes());
    assert_eq!(report.bytes, VOL);
    assert!(report.journal_blocks > 100, "{report:?}");
    assert_eq!(seen.last(), Some(&(VOL, VOL)));
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "{seen:?}");
    report.direct_io
}

/// A directory on the target's filesystem (ext4 or xfs, which take O_DIRECT), not a tmpfs.
fn disk_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir")
}

/// A stale output longer than the volume, which materialize cuts to size and overwrites.
fn stale_out(dir: &std::path::Path) -> FileIo {
    std::fs::write(dir.join("out.img"), vec![0xee; VOL as usize + 9000]).expect("stale");
    FileIo::open(dir.join("out.img")).expect("out")
}

#[test]
fn materialize_file_to_file_with_direct_io_is_exact() {
    let dir = disk_dir();
    let (base, initial) = random_base(&dir.path().join("base.img"));
    let out = stale_out(dir.path());
    let direct = materialize_matches(base, initial, &out, CopyMode::Auto);
    assert!(
        direct,
        "a file-to-file materialize on {} went through the page cache",
        dir.path().display()
    );
}

#[test]
fn materialize_file_to_file_through_the_page_cache_copies_in_the_kernel_and_is_exact() {
    let dir = disk_dir();
    let (base, initial) = random_base(&dir.path().join("base.img"));
    let out = stale_out(dir.path());
    assert!(!materialize_matches(base, initial, &out, CopyMode::PageCache));
}

#[test]
fn materialize_through_a_buffer_when_the_kernel_cannot_copy_is_exact() {
    let dir = disk_dir();
    // An in-memory base has no descriptor: no direct I/O, every range through a buffer.
    let (_, initial) = random_base(&dir.path().join("base.img"));
    let base = Arc::new(MemVolume::new(VOL));
    base.write_at(&initial, 0).expect("fill");
    let out = FileIo::create(dir.path().join("out.img"), 0).expect("out");
    assert!(!materialize_matches(base, initial.clone(), &out, CopyMode::Auto));
    // And into memory from a file.
    let (base, initial) = random_base(&dir.path().join("base2.img"));
    assert!(!materialize_matches(base, initial, &MemVolume::new(0), CopyMode::Auto));
}

#[test]
fn materialize_with_direct_io_of_a_grown_volume_reads_zeros_past_the_base() {
    // The base file keeps its size (it grows lazily); the point is of the grown volume, with
    // writes past the old end and an unaligned new size: zeros past the base, direct reads
    // of the base's aligned part, buffered reads and writes of the tails.
    let dir = disk_dir();
    let (base, initial) = random_base(&dir.path().join("base.img"));
    let mut f = Feed::open(dir.path(), base, initial, 3600 * 24);
    f.mutate(50);
    let grown = 2 * VOL + 777;
    f.push(&Event::Resize { volume: VolumeId(0), old_size: VOL, new_size: grown });
    f.cur.resize(grown as usize, 0);
    for (off, len, fill) in
        [(VOL - 100, 5000u64, 0x5au8), (VOL + (3 << 20), 70_000, 0xa5), (grown - 10, 10, 0x11)]
    {
        f.cur[off as usize..(off + len) as usize].fill(fill);
        let data = vec![fill; len as usize];
        f.push(&Event::Write { volume: VolumeId(0), offset: off, data: data.into() });
    }
    f.bookmark("g");
    let p = f.log.resolve(&RecoveryPoint::Bookmark("g".into())).expect("resolve");
    let out = FileIo::create(dir.path().join("out.img"), 0).expect("out");
    let report = f.log.materialize(&p, VolumeId(0), &out, &mut |_, _| {}).expect("materialize");
    assert!(report.direct_io, "{report:?}");
    assert_eq!(out.len().expect("len"), grown);
    let mut got = vec![0u8; grown as usize];
    out.read_at(&mut got, 0).expect("read back");
    assert!(got == f.cur, "the grown image differs from the point");
    assert_eq!(report.hash, *blake3::hash(&f.cur).as_bytes());
}
