//! The sync benchmark: the replication path end to end (tap, spool, shipper, TCP loopback
//! with Noise/AES-256-GCM, receiver, retention log, all on files in the run's directory),
//! against references measured in the same run.
//!
//! 1. [`resync`]: fast resync of an image with 1% of its 4 KiB blocks changed, against
//!    `rsync --inplace --no-whole-file` and against reading both images once.
//! 2. [`initial`]: initial sync (step I) of an ext4 image 20% full through its
//!    [`tidemark_sync::resync::Ext4InUse`] view, against a full copy with `dd`; the replica
//!    is verified (logical view equal, `e2fsck -fn` clean).
//! 3. [`stream`]: ship-and-apply throughput of that image's used blocks against `cat` and
//!    the zstd CLI, and the bytes on the wire per changed byte with compression and dedupe.
//!
//! Every family builds its own files under the run's directory and removes the large ones
//! before the next family starts, so the run needs at most about 13 GiB (full) at a time.

mod ext4img;
mod initial;
mod resync;
pub(crate) mod rig;
mod stream;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::Ctx;
use crate::figure::Figure;

/// One MiB.
pub const MIB: u64 = 1 << 20;
/// One GiB.
pub const GIB: u64 = 1 << 30;
/// The block size of the images and of the changes.
pub const BLOCK: u64 = 4096;

/// Sizes of a run.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    /// The image a fast resync compares.
    pub resync_image: u64,
    /// The ext4 image of the initial sync and the stream.
    pub ext4_image: u64,
    /// Bytes of files put into that filesystem (with its metadata, and without the files'
    /// zero blocks, about 20% of it is then in use).
    pub ext4_tree_bytes: u64,
}

impl Scale {
    fn new(smoke: bool) -> Self {
        if smoke {
            Self { resync_image: 64 * MIB, ext4_image: 64 * MIB, ext4_tree_bytes: 12 * MIB }
        } else {
            Self { resync_image: 4 * GIB, ext4_image: 4 * GIB, ext4_tree_bytes: 900 * MIB }
        }
    }
}

/// Runs every family and returns their figures.
pub fn run(ctx: &Ctx) -> Result<Vec<Figure>> {
    let scale = Scale::new(ctx.smoke);
    for tool in ["rsync", "zstd", "mkfs.ext4", "e2fsck", "dd", "cat"] {
        if !tool_exists(tool) {
            bail!("{tool} is needed by the sync benchmark (apt-get install rsync zstd e2fsprogs)");
        }
    }
    // `TIDEMARK_SYNC_PARTS=resync` (or `ext4`) runs one family only, when working on it.
    let parts = std::env::var("TIDEMARK_SYNC_PARTS").unwrap_or_else(|_| "resync,ext4".into());
    let wanted = |p: &str| parts.split(',').any(|w| w.trim() == p);
    let mut figures = Vec::new();
    if wanted("resync") {
        let d = subdir(ctx, "resync")?;
        figures.extend(resync::run(&d, scale).context("fast resync")?);
        remove_dir(&d)?;
    }
    if !wanted("ext4") {
        return Ok(figures);
    }
    let d = subdir(ctx, "ext4")?;
    let image = ext4img::build(&d, scale).context("building the ext4 image")?;
    figures.extend(initial::run(&d, &image).context("initial sync")?);
    figures.extend(stream::run(&d, &image).context("ship-and-apply stream")?);
    remove_dir(&d)?;
    Ok(figures)
}

fn subdir(ctx: &Ctx, name: &str) -> Result<PathBuf> {
    let d = ctx.dir.join(name);
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}

fn remove_dir(d: &Path) -> Result<()> {
    std::fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))
}

/// True when `program` is found on `PATH` (or at an absolute path).
fn tool_exists(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A SplitMix64 generator: fast, seeded, good enough for incompressible test data.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (n > 0; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let n = rest.len();
        rest.copy_from_slice(&self.next_u64().to_le_bytes()[..n]);
    }
}

/// Creates `path` holding `len` bytes: 4 KiB blocks of random bytes, one block in ten all
/// zeros (written, not a hole). Synced.
pub fn write_random_image(path: &Path, len: u64, seed: u64) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; (4 * MIB) as usize];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        for block in buf[..n].chunks_mut(BLOCK as usize) {
            if rng.below(10) == 0 {
                block.fill(0);
            } else {
                rng.fill(block);
            }
        }
        f.write_all(&buf[..n]).with_context(|| format!("writing {}", path.display()))?;
        left -= n as u64;
    }
    f.sync_all().with_context(|| format!("fsync {}", path.display()))
}

/// Copies `from` to a new file `to` (in-kernel copy) and syncs it.
pub fn copy_synced(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    File::open(to)?.sync_all().with_context(|| format!("fsync {}", to.display()))
}

/// Runs `cmd` to completion with its output discarded (or captured), timing it.
pub fn timed(cmd: &mut Command) -> Result<(Duration, std::process::Output)> {
    let start = Instant::now();
    let out = crate::sys::run_command(cmd)?;
    Ok((start.elapsed(), out))
}

/// Reads every file in `paths` once, each with its own `cat > /dev/null`, all at once;
/// returns the wall time until the last one finished.
pub fn cat_parallel(paths: &[&Path]) -> Result<Duration> {
    let start = Instant::now();
    let mut children = Vec::new();
    for p in paths {
        let child = Command::new("cat")
            .arg(p)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting cat {}", p.display()))?;
        children.push(child);
    }
    for mut c in children {
        let status = c.wait().context("waiting for cat")?;
        if !status.success() {
            bail!("cat failed: {status}");
        }
    }
    Ok(start.elapsed())
}

/// Drops the page-cache pages of each file (see [`crate::sys::evict_file`]).
pub fn evict(paths: &[&Path]) -> Result<()> {
    for p in paths {
        crate::sys::evict_file(p)?;
    }
    Ok(())
}

/// MiB per second.
pub fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_fills_every_byte_and_differs_by_seed() {
        let mut a = vec![0u8; 4099];
        Rng::new(1).fill(&mut a);
        let mut b = vec![0u8; 4099];
        Rng::new(2).fill(&mut b);
        assert_ne!(a, b);
        // The tail past the last whole word is filled too.
        assert!(a[4090..].iter().any(|&x| x != 0));
        let mut r = Rng::new(3);
        assert!((0..1000).all(|_| r.below(7) < 7));
    }

    #[test]
    fn random_image_has_the_length_and_some_zero_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        write_random_image(&p, 8 * MIB + BLOCK, 5).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(bytes.len() as u64, 8 * MIB + BLOCK);
        let zero = bytes.chunks(BLOCK as usize).filter(|b| b.iter().all(|&x| x == 0)).count();
        let blocks = bytes.len() / BLOCK as usize;
        assert!(zero > blocks / 20 && zero < blocks / 5, "{zero} zero blocks of {blocks}");
    }
}
