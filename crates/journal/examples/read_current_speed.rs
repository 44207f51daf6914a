//! Measures `RetentionLog::read_current` (what a resync hashes on the target) against a plain
//! read of the base file, in 4 MiB chunks, with a small journal over the base; each chunk is
//! hashed with BLAKE3 as a resync would, unless `TIDEMARK_NO_HASH=1`.
//!
//! `cargo run --release -p tidemark-journal --example read_current_speed [MiB]` (default
//! 1024 MiB). The base file lives in a temporary directory under `target/`; it is read once
//! before timing so both runs see the page cache warm.

use std::sync::Arc;
use std::time::Instant;

use tidemark_journal::{
    BlockIo, Event, FileIo, ManualClock, MemDir, Nanos, RecoveryPoint, RetentionConfig,
    RetentionLog, Seq, VolumeId,
};

const CHUNK: usize = 4 << 20;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mib: u64 = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(1024);
    let len = mib << 20;
    let tmp = tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target"))?;
    let path = tmp.path().join("base.img");
    let base = Arc::new(FileIo::create(&path, len)?);
    // Non-zero content, so the comparison reads real pages.
    let fill: Vec<u8> = (0..CHUNK).map(|i| (i / 4096) as u8).collect();
    let mut pos = 0;
    while pos < len {
        base.write_at(&fill, pos)?;
        pos += CHUNK as u64;
    }
    base.sync()?;
    // The journal itself stays in memory: only reads are timed.
    let clock = Arc::new(ManualClock::new(Nanos(1_800_000_000 * Nanos::SECOND)));
    let (mut log, _) = RetentionLog::open(
        Arc::new(MemDir::new()),
        vec![base.clone() as Arc<dyn BlockIo>],
        RetentionConfig::default(),
        clock,
    )?;
    // A small journal: 2000 scattered 4 KiB writes inside an open resync window.
    log.append(Seq(1), Nanos(1), &Event::ResyncBegin { id: 1 })?;
    for i in 0..2000u64 {
        let offset = (i * 7919 * 4096) % len;
        log.append(
            Seq(2 + i),
            Nanos(2 + i),
            &Event::Write { volume: VolumeId(0), offset, data: vec![i as u8; 4096].into() },
        )?;
    }
    // TIDEMARK_NO_HASH=1 times the reads alone.
    let hashing = std::env::var_os("TIDEMARK_NO_HASH").is_none();
    let time = |what: &str, f: &mut dyn FnMut(u64, &mut [u8])| {
        let mut buf = vec![0u8; CHUNK];
        let mut hash = blake3::Hasher::new();
        let t = Instant::now();
        let mut pos = 0;
        while pos < len {
            let n = (CHUNK as u64).min(len - pos) as usize;
            f(pos, &mut buf[..n]);
            if hashing {
                hash.update(&buf[..n]);
            }
            pos += n as u64;
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "{what:<40} {:>8.0} MiB/s  ({:.3} s, hash {})",
            mib as f64 / s,
            s,
            &hash.finalize().to_hex()[..16]
        );
        s
    };
    // Warm the page cache.
    time("warm-up: base file", &mut |pos, b| base.read_at(b, pos).expect("read"));
    let plain = time("base file, 4 MiB reads", &mut |pos, b| base.read_at(b, pos).expect("read"));
    let current = time("read_current, 4 MiB reads", &mut |pos, b| {
        log.read_current(VolumeId(0), pos, b).expect("read current")
    });
    // Close the window so `Latest` is everything received, the same state as above.
    log.append(Seq(2002), Nanos(2002), &Event::ResyncEnd { id: 1 })?;
    let at = log.resolve(&RecoveryPoint::Latest)?;
    let point = time("read_at (latest point), 4 MiB", &mut |pos, b| {
        log.read_at(&at, VolumeId(0), pos, b).expect("read at")
    });
    let blockwise = time("read_current, 4 KiB reads", &mut |pos, b| {
        for (i, c) in b.chunks_mut(4096).enumerate() {
            log.read_current(VolumeId(0), pos + (i * 4096) as u64, c).expect("read current");
        }
    });
    println!(
        "read_current / base = {:.2}, read_at / base = {:.2}, 4 KiB calls / base = {:.2}",
        current / plain,
        point / plain,
        blockwise / plain
    );
    Ok(())
}
