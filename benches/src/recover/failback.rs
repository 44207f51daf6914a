//! The failback figure: bytes a failback's fast resync moves, against the 4 KiB blocks that
//! really differ between the two sides.
//!
//! The original site's volume A and the promoted DR replica B start as one image (random
//! blocks, one in ten zero). Then both sides diverge as in a real unplanned failover:
//! - A took a tail of writes that never reached the DR side before the disaster: small
//!   writes, 512 B to 12 KiB at 512-byte offsets (so most touch a block only in part);
//! - B ran as the primary meanwhile: 64 KiB writes at 4 KiB-aligned offsets, some
//!   overlapping A's tail, plus small unaligned ones like A's.
//!
//! The differing blocks are counted by comparing the images (not timed). Then the failback
//! runs as `protect --failback` does: B's tap and shipper against a receiver over A's
//! volume, `Syncer::fast_resync` of the whole volume over TCP loopback (Noise,
//! AES-256-GCM). Moved = the resync's data and zero bytes; the target must then read B's
//! bytes exactly (checked).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use tidemark_journal::VolumeId;

use crate::figure::{Figure, Goal};
use crate::journal::{GIB, MIB, size};
use crate::sync::rig::{Source, Target, Wire, paired_keys};
use crate::sync::{BLOCK, Rng, copy_synced, evict, write_random_image};

/// Writes `count` writes to `path`: `len_of(rng)` bytes of random data at `offset_of(rng, len)`.
fn scribble(
    path: &Path,
    count: u64,
    rng: &mut Rng,
    len_of: impl Fn(&mut Rng) -> u64,
    offset_of: impl Fn(&mut Rng, u64) -> u64,
) -> Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut buf = Vec::new();
    for _ in 0..count {
        let len = len_of(rng);
        let off = offset_of(rng, len);
        buf.resize(len as usize, 0);
        rng.fill(&mut buf);
        f.write_all_at(&buf, off).with_context(|| format!("writing {}", path.display()))?;
    }
    f.sync_all().with_context(|| format!("fsync {}", path.display()))
}

/// Bytes of the 4 KiB blocks in which `a` and `b` differ (both `len` long).
fn differing_block_bytes(a: &Path, b: &Path, len: u64) -> Result<u64> {
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; (4 * MIB) as usize], vec![0u8; (4 * MIB) as usize]);
    let (mut at, mut differ) = (0u64, 0u64);
    while at < len {
        let n = (len - at).min(ba.len() as u64) as usize;
        fa.read_exact(&mut ba[..n])?;
        fb.read_exact(&mut bb[..n])?;
        for (x, y) in ba[..n].chunks(BLOCK as usize).zip(bb[..n].chunks(BLOCK as usize)) {
            if x != y {
                differ += x.len() as u64;
            }
        }
        at += n as u64;
    }
    Ok(differ)
}

/// The BLAKE3 of a file.
fn file_hash(path: &Path) -> Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    h.update_reader(File::open(path)?).with_context(|| format!("reading {}", path.display()))?;
    Ok(h.finalize())
}

/// Runs the failback in `dir`.
pub fn run(dir: &Path, smoke: bool) -> Result<Figure> {
    let len = if smoke { 64 * MIB } else { GIB };
    let (a, b) = (dir.join("original.img"), dir.join("promoted.img"));
    eprintln!("[recover] failback: two {} sides", size(len));
    write_random_image(&a, len, 31)?;
    copy_synced(&a, &b)?;
    let mut rng = Rng::new(32);
    let small_len = |r: &mut Rng| 512 * (1 + r.below(24));
    let small_at = move |r: &mut Rng, n: u64| 512 * r.below((len - n) / 512);
    // A's lost tail: 0.1% of the volume in small writes; B's own writes: 1% in 64 KiB
    // writes and 0.1% in small ones.
    let tail = len / 1000 / (6 * 1024) + 1;
    scribble(&a, tail, &mut rng, small_len, small_at)?;
    let big = len / 100 / (64 << 10) + 1;
    scribble(&b, big, &mut rng, |_| 64 << 10, move |r, n| BLOCK * r.below((len - n) / BLOCK))?;
    scribble(&b, tail, &mut rng, small_len, small_at)?;
    let differ = differing_block_bytes(&a, &b, len)?;
    ensure!(differ > 0, "the two sides did not diverge");
    let want = file_hash(&b)?;

    let (cs, ct) = paired_keys()?;
    let target = Target::start(&dir.join("at-a"), &a, ct)?;
    let source = Source::start(&dir.join("at-b"), &b, cs, Wire::defaults(), &target)?;
    source.connected()?;
    evict(&[&a, &b])?;
    let report = source.syncer().fast_resync(None, &[]).context("the failback's fast resync")?;
    source.caught_up()?;
    let moved = report.data_bytes + report.zero_bytes;
    // The original site now holds the promoted side's bytes.
    let got = target.receiver.with_log(|log| -> Result<blake3::Hash> {
        let mut h = blake3::Hasher::new();
        let mut buf = vec![0u8; (4 * MIB) as usize];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(buf.len() as u64) as usize;
            log.read_current(VolumeId(0), at, &mut buf[..n])?;
            h.update(&buf[..n]);
            at += n as u64;
        }
        Ok(h.finalize())
    })?;
    ensure!(
        got == want,
        "after the failback the original site reads other bytes than the promoted side"
    );
    eprintln!("[recover] failback: moved {moved} bytes for {differ} bytes of differing blocks");
    Ok(Figure::new("failback_bytes_moved", moved as f64, "B")
        .compared(
            format!("the 4 KiB blocks in which the two sides differ: {differ} bytes"),
            Some(moved as f64 / differ as f64),
        )
        .goal(Goal::AtMost(1.1))
        .note(format!(
            "{} volume; the original took {tail} small writes (512 B-12 KiB at 512 B offsets) \
             that never reached the DR side, the promoted DR side {big} 64 KiB writes and \
             {tail} small ones; Syncer::fast_resync from the promoted side to a receiver over \
             the original's volume (as protect --failback), TCP loopback, Noise/AES-256-GCM; \
             moved = data + zero bytes the resync sent ({} + {}); the original site reads \
             the promoted side's bytes afterwards (checked)",
            size(len),
            report.data_bytes,
            report.zero_bytes,
        )))
}
