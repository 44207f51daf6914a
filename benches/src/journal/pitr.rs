//! Point-in-time reads of a retention log holding millions of records (figure 3).
//!
//! The log is built fast: 512-byte writes at random sector-aligned offsets of an 8 GiB sparse
//! base, a barrier after every 100 writes, 256 MiB segments, one sync at the end. Reads of
//! random 4 KiB blocks at random retained points are timed on the live log, then the log is
//! reopened in a fresh process (segments evicted from the page cache first), which reports
//! its open time, its peak memory and the same reads again.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rand::Rng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use tidemark_journal::{
    Event, FileIo, FsDir, ManualClock, Nanos, PointInfo, RecoveryPoint, RetentionConfig,
    RetentionLog, Seq, VolumeId,
};

use super::{Env, MIB, quantile, rng};
use crate::figure::Figure;
use crate::sys;

/// The hidden subcommand that reopens the log in a fresh process.
pub const REOPEN_CHILD: &str = "__pitr-reopen";

const VOLUME_BYTES: u64 = 8 << 30;
const WRITE_BYTES: usize = 512;
const BARRIER_EVERY: u64 = 100;
const READ_BYTES: u64 = 4096;
/// Retained points the reads are spread over.
const POINTS: usize = 16;
const READ_SEED: u64 = 33;
/// Simulated time of the first record: 2024-01-01, one microsecond per record after it.
const T0: u64 = 1_704_067_200 * 1_000_000_000;

fn config() -> RetentionConfig {
    RetentionConfig { segment_bytes: 256 * MIB, ..RetentionConfig::default() }
}

fn open_log(log_dir: &Path, base: &Path, read_only: bool) -> Result<RetentionLog> {
    let base = if read_only { FileIo::open_read_only(base)? } else { FileIo::open(base)? };
    let clock = Arc::new(ManualClock::new(Nanos(T0)));
    let (log, _) =
        RetentionLog::open(Arc::new(FsDir::new(log_dir)?), vec![Arc::new(base)], config(), clock)?;
    Ok(log)
}

/// Appends `writes` random 512-byte writes with their barriers; returns records appended.
fn build(log: &mut RetentionLog, env: &Env<'_>, writes: u64) -> Result<u64> {
    let mut r = rng(3);
    let sectors = VOLUME_BYTES / WRITE_BYTES as u64;
    let mut seq = 0u64;
    for i in 0..writes {
        seq += 1;
        let offset = r.gen_range(0..sectors) * WRITE_BYTES as u64;
        let data = env.pool.get(i, WRITE_BYTES);
        log.append(
            Seq(seq),
            Nanos(T0 + seq * 1000),
            &Event::Write { volume: VolumeId(0), offset, data },
        )?;
        if (i + 1) % BARRIER_EVERY == 0 {
            seq += 1;
            log.append(Seq(seq), Nanos(T0 + seq * 1000), &Event::Barrier)?;
        }
    }
    log.sync()?;
    Ok(seq)
}

/// `n` random retained points (not the base), each resolved through the log.
fn choose_points(log: &RetentionLog, n: usize, r: &mut StdRng) -> Result<Vec<PointInfo>> {
    let all = log.points();
    if all.len() < 2 {
        bail!("the log offers no point besides its base");
    }
    (0..n)
        .map(|_| {
            let p = &all[r.gen_range(1..all.len())];
            Ok(log.resolve(&RecoveryPoint::Seq(p.seq))?)
        })
        .collect()
}

/// Times `n` reads of random 4 KiB blocks at the given points; sorted.
fn sample_reads(log: &RetentionLog, n: usize) -> Result<Vec<Duration>> {
    let mut r = rng(READ_SEED);
    let points = choose_points(log, POINTS, &mut r)?;
    let blocks = VOLUME_BYTES / READ_BYTES;
    let mut buf = vec![0u8; READ_BYTES as usize];
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let at = &points[r.gen_range(0..points.len())];
        let offset = r.gen_range(0..blocks) * READ_BYTES;
        let start = Instant::now();
        log.read_at(at, VolumeId(0), offset, &mut buf)?;
        times.push(start.elapsed());
    }
    times.sort_unstable();
    Ok(times)
}

/// What the reopening process reports.
#[derive(Debug, Serialize, Deserialize)]
struct ReopenReport {
    open_secs: f64,
    records: u64,
    max_rss: u64,
    read_p50_us: f64,
    read_p99_us: f64,
}

/// Entry point of the reopening process: `__pitr-reopen LOG_DIR BASE READS`.
pub fn reopen_child(args: &[String]) -> Result<()> {
    let [log_dir, base, reads] = args else {
        bail!("usage: {REOPEN_CHILD} LOG_DIR BASE READS");
    };
    let reads: usize = reads.parse().context("READS")?;
    let start = Instant::now();
    let base = FileIo::open_read_only(base)?;
    let clock = Arc::new(ManualClock::new(Nanos(T0)));
    let (log, report) =
        RetentionLog::open(Arc::new(FsDir::new(log_dir)?), vec![Arc::new(base)], config(), clock)?;
    let open_secs = start.elapsed().as_secs_f64();
    let times = sample_reads(&log, reads)?;
    let out = ReopenReport {
        open_secs,
        records: report.records,
        max_rss: sys::usage().max_rss,
        read_p50_us: quantile(&times, 0.5).as_secs_f64() * 1e6,
        read_p99_us: quantile(&times, 0.99).as_secs_f64() * 1e6,
    };
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}

fn reopen_in_child(log_dir: &Path, base: &Path, reads: usize) -> Result<ReopenReport> {
    let exe = std::env::current_exe().context("finding our own executable")?;
    let out = sys::run_command(
        Command::new(exe)
            .arg(REOPEN_CHILD)
            .arg(log_dir)
            .arg(base)
            .arg(reads.to_string())
            .stderr(Stdio::inherit()),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().context("the reopening process printed nothing")?;
    serde_json::from_str(line).with_context(|| format!("parsing the reopen report {line:?}"))
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

pub fn run(env: &Env<'_>) -> Result<Vec<Figure>> {
    let writes = env.scale.pitr_records;
    let reads = env.scale.pitr_reads;
    let dir = env.subdir("pitr")?;
    let base = dir.join("base.img");
    let log_dir = dir.join("log");
    FileIo::create(&base, VOLUME_BYTES)?;

    let mut log = open_log(&log_dir, &base, false)?;
    let start = Instant::now();
    let records = build(&mut log, env, writes)?;
    let build_time = start.elapsed();
    let build_rss = sys::usage().max_rss;
    let log_bytes = sys::dir_bytes(&log_dir)?;
    eprintln!(
        "[journal] retention log built: {records} records, {:.2} GB, in {:.1} s",
        log_bytes as f64 / 1e9,
        build_time.as_secs_f64()
    );
    let live = sample_reads(&log, reads)?;
    drop(log);

    sys::evict_dir(&log_dir)?;
    let child = reopen_in_child(&log_dir, &base, reads)?;
    if child.records != records {
        bail!("reopen found {} records, {records} were appended", child.records);
    }
    eprintln!(
        "[journal] retention log reopened in {:.2} s; read p50 {:.1} µs live, {:.1} µs reopened",
        child.open_secs,
        us(quantile(&live, 0.5)),
        child.read_p50_us
    );
    std::fs::remove_dir_all(&dir)?;

    let shape = format!(
        "{writes} writes of 512 B at random sector offsets of an 8 GiB sparse base plus a \
         barrier every {BARRIER_EVERY} ({records} records, {:.2} GB of 256 MiB segments)",
        log_bytes as f64 / 1e9
    );
    let reads_how = format!(
        "{reads} RetentionLog::read_at of one random 4 KiB block at one of {POINTS} random \
         retained points (resolved with RetentionLog::resolve); page cache warm"
    );
    let mib = |b: u64| b as f64 / MIB as f64;
    Ok(vec![
        Figure::new(
            "pitr_build_records_per_s",
            records as f64 / build_time.as_secs_f64(),
            "records/s",
        )
        .note(format!(
            "RetentionLog::append of {shape}, one sync at the end: {:.1} s",
            build_time.as_secs_f64()
        )),
        Figure::new("pitr_build_max_rss", mib(build_rss), "MiB")
            .note("peak RSS of the benchmark process after building the log (getrusage ru_maxrss; process-wide, so it also covers the earlier figures, which hold far less)"),
        Figure::new("pitr_read_4k_p50", us(quantile(&live, 0.5)), "µs")
            .note(format!("{reads_how}; the live log right after the build (index in sorted runs as appends left it)")),
        Figure::new("pitr_read_4k_p99", us(quantile(&live, 0.99)), "µs")
            .note("as pitr_read_4k_p50"),
        Figure::new("pitr_reopen", child.open_secs, "s").note(format!(
            "RetentionLog::open in a fresh process of {shape}; segments evicted from the page \
             cache first (fdatasync + POSIX_FADV_DONTNEED), so they are read from disk: {:.0} MB/s",
            log_bytes as f64 / child.open_secs / 1e6
        )),
        Figure::new("pitr_reopen_max_rss", mib(child.max_rss), "MiB").note(
            "peak RSS (getrusage ru_maxrss) of the fresh process after the open and its reads",
        ),
        Figure::new("pitr_read_4k_p50_after_reopen", child.read_p50_us, "µs")
            .note(format!("{reads_how}; the reopened log (index built in one sorted run)")),
        Figure::new("pitr_read_4k_p99_after_reopen", child.read_p99_us, "µs")
            .note("as pitr_read_4k_p50_after_reopen"),
    ])
}
