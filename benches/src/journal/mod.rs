//! The journal benchmark: one module per family of figures, all measured in one run in one
//! directory.
//!
//! 1. [`append`]: spool append throughput against fio, and CPU per GiB (also encrypted).
//! 2. [`pitr`]: point-in-time reads and reopen of a retention log with millions of records.
//! 3. [`materialize`]: materializing a volume an hour back, against `cp`.
//! 4. [`redo_undo`]: the target's cost per incoming write, redo log against undo emulation.

mod append;
mod materialize;
pub mod pitr;
mod redo_undo;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use crate::Ctx;
use crate::figure::Figure;

/// One KiB.
pub const KIB: u64 = 1 << 10;
/// One MiB.
pub const MIB: u64 = 1 << 20;
/// One GiB.
pub const GIB: u64 = 1 << 30;

/// Sizes of a run.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    /// Payload bytes appended per spool case.
    pub append_bytes: u64,
    /// Write records in the retention log read back at points in time.
    pub pitr_records: u64,
    /// Point-in-time reads sampled.
    pub pitr_reads: usize,
    /// Volume materialized.
    pub materialize_volume: u64,
    /// Incoming 4 KiB writes on the target, per design.
    pub target_writes: u64,
    /// Size of the target's replica (its base image).
    pub target_volume: u64,
    /// Repetitions of the comparisons that a drifting disk makes noisy (the median counts).
    pub reps: usize,
}

impl Scale {
    fn new(smoke: bool) -> Self {
        if smoke {
            Self {
                append_bytes: 16 * MIB,
                pitr_records: 100_000,
                pitr_reads: 2_000,
                materialize_volume: 32 * MIB,
                target_writes: 2_048,
                target_volume: 64 * MIB,
                reps: 1,
            }
        } else {
            Self {
                append_bytes: GIB,
                pitr_records: 10_000_000,
                pitr_reads: 20_000,
                materialize_volume: GIB,
                target_writes: 65_536,
                target_volume: GIB,
                reps: 3,
            }
        }
    }
}

/// What every family gets.
#[derive(Debug)]
pub struct Env<'a> {
    /// The run's settings.
    pub ctx: &'a Ctx,
    /// Its sizes.
    pub scale: Scale,
    /// Random payloads.
    pub pool: DataPool,
    /// fio can be run.
    pub fio: bool,
}

impl Env<'_> {
    /// A fresh directory for one family's files.
    pub fn subdir(&self, name: &str) -> Result<PathBuf> {
        let d = self.ctx.dir.join(name);
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        Ok(d)
    }
}

/// Random, incompressible payloads handed out as cheap slices of one buffer.
#[derive(Debug)]
pub struct DataPool {
    data: Bytes,
}

impl DataPool {
    fn new(len: usize, seed: u64) -> Self {
        let mut v = vec![0u8; len];
        rng(seed).fill_bytes(&mut v);
        Self { data: Bytes::from(v) }
    }

    /// `len` bytes for the `i`-th record (different records start at different offsets).
    pub fn get(&self, i: u64, len: usize) -> Bytes {
        let span = (self.data.len() - len) as u64 + 1;
        let off = (i.wrapping_mul(len as u64 + 4160) % span) as usize;
        self.data.slice(off..off + len)
    }
}

/// A seeded generator, so both sides of a comparison see the same workload.
pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Creates `path` holding `len` random bytes, synced.
pub fn create_random_file(path: &Path, len: u64, seed: u64) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut r = rng(seed);
    let mut buf = vec![0u8; (4 * MIB) as usize];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        r.fill_bytes(&mut buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.sync_all().with_context(|| format!("fsync {}", path.display()))
}

/// Bytes per second in MB/s (10^6 bytes).
pub fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

/// A size for humans: "4 KiB", "1 GiB", "1.5 MiB".
pub fn size(bytes: u64) -> String {
    for (unit, n) in [("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
        if bytes >= n {
            let v = bytes as f64 / n as f64;
            return if v.fract() == 0.0 { format!("{v} {unit}") } else { format!("{v:.1} {unit}") };
        }
    }
    format!("{bytes} B")
}

/// The `q`-quantile (0..=1) of sorted durations.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    assert!(!sorted.is_empty(), "no samples");
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

/// The median (the mean of the middle two for an even count).
pub fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    assert!(!v.is_empty(), "no values");
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// "1 run" or "median of 3 runs", for notes.
pub fn runs(n: usize) -> String {
    if n == 1 { "1 run".to_owned() } else { format!("median of {n} runs") }
}

/// Runs every family and returns their figures.
pub fn run(ctx: &Ctx) -> Result<Vec<Figure>> {
    let fio = crate::fio::available();
    if !fio {
        eprintln!(
            "\n!!! SKIPPED: fio not installed: append figures are reported without their fio \
             ratio (apt-get install fio)\n"
        );
    }
    let env = Env { ctx, scale: Scale::new(ctx.smoke), pool: DataPool::new(16 << 20, 1), fio };
    let mut figures = Vec::new();
    figures.extend(append::run(&env).context("append throughput")?);
    figures.extend(pitr::run(&env).context("point-in-time reads")?);
    figures.extend(materialize::run(&env).context("materialize")?);
    figures.extend(redo_undo::run(&env).context("redo vs undo")?);
    Ok(figures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(size(4096), "4 KiB");
        assert_eq!(size(GIB), "1 GiB");
        assert_eq!(size(3 * MIB / 2), "1.5 MiB");
        let d: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(quantile(&d, 0.5), Duration::from_micros(51));
        assert_eq!(quantile(&d, 0.99), Duration::from_micros(99));
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0].into_iter()), 2.5);
        let pool = DataPool::new(1 << 16, 3);
        assert_eq!(pool.get(12345, 4096).len(), 4096);
        assert_ne!(pool.get(0, 512), pool.get(1, 512));
    }
}
