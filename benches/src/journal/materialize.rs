//! Materializing a volume as of one hour back, against `cp` of the same size (figure 4).
//!
//! A base image of random content gets two hours of simulated history: 64 KiB writes at
//! random aligned offsets totalling a tenth of the volume, spread evenly, and a barrier every
//! simulated second. The volume as of `now - 1h` is then written to a new file
//! ([`RetentionLog::materialize`], which ends with fdatasync), and compared with
//! `cp base copy && sync copy`. Both run alternating, a warm-up round first (so both see
//! the base in the page cache), then the median of the following rounds counts.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use rand::Rng;
use tidemark_journal::{
    Clock, Event, FileIo, FsDir, ManualClock, Nanos, PointInfo, RecoveryPoint, RetentionConfig,
    RetentionLog, Seq, VolumeId,
};

use super::{Env, create_random_file, mb_per_s, median, rng, runs, size};
use crate::figure::{Figure, Goal};
use crate::sys;

const WRITE_BYTES: u64 = 64 * 1024;
const HISTORY_SECS: u64 = 2 * 3600;
const T0: u64 = 1_704_067_200 * 1_000_000_000;

/// Writes the history; returns (writes, records).
fn write_history(
    log: &mut RetentionLog,
    clock: &ManualClock,
    env: &Env<'_>,
    volume: u64,
) -> Result<(u64, u64)> {
    let writes = (volume / 10 / WRITE_BYTES).max(1);
    let slots = volume / WRITE_BYTES;
    let mut r = rng(4);
    let mut seq = 0u64;
    let mut next_write = 0u64;
    for sec in 0..HISTORY_SECS {
        clock.advance(Duration::from_secs(1));
        // Write `i` happens in second `i * HISTORY_SECS / writes`.
        while next_write < writes && next_write * HISTORY_SECS / writes <= sec {
            seq += 1;
            let offset = r.gen_range(0..slots) * WRITE_BYTES;
            let data = env.pool.get(next_write, WRITE_BYTES as usize);
            log.append(Seq(seq), clock.now(), &Event::Write { volume: VolumeId(0), offset, data })?;
            next_write += 1;
        }
        seq += 1;
        log.append(Seq(seq), clock.now(), &Event::Barrier)?;
    }
    log.sync()?;
    Ok((writes, seq))
}

fn time_materialize(log: &RetentionLog, at: &PointInfo, out: &Path) -> Result<(Duration, u64)> {
    let start = Instant::now();
    let file = FileIo::create(out, 0)?;
    let report = log.materialize(at, VolumeId(0), &file, &mut |_, _| {})?;
    let took = start.elapsed();
    drop(file);
    std::fs::remove_file(out)?;
    Ok((took, report.journal_blocks))
}

/// Resolving `point` and reading 2000 random 4 KiB blocks from it (page cache warm): the
/// resolve time and the median read latency, in µs.
fn open_and_read(log: &RetentionLog, point: &RecoveryPoint, volume: u64) -> Result<(f64, f64)> {
    let t = Instant::now();
    let p = log.resolve(point)?;
    let resolve_us = t.elapsed().as_secs_f64() * 1e6;
    let mut r = rng(7);
    let mut buf = vec![0u8; 4096];
    let mut lat = Vec::with_capacity(2000);
    for _ in 0..2000 {
        let off = r.gen_range(0..volume / 4096) * 4096;
        let t = Instant::now();
        log.read_at(&p, VolumeId(0), off, &mut buf)?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok((resolve_us, median(lat.into_iter())))
}

fn time_cp(base: &Path, out: &Path) -> Result<Duration> {
    let start = Instant::now();
    sys::run_command(Command::new("cp").arg(base).arg(out))?;
    sys::run_command(Command::new("sync").arg(out))?;
    let took = start.elapsed();
    std::fs::remove_file(out)?;
    Ok(took)
}

pub fn run(env: &Env<'_>) -> Result<Vec<Figure>> {
    let volume = env.scale.materialize_volume;
    let dir = env.subdir("materialize")?;
    let base = dir.join("base.img");
    let out = dir.join("restored.img");
    create_random_file(&base, volume, 2)?;

    let clock = Arc::new(ManualClock::new(Nanos(T0)));
    let (mut log, _) = RetentionLog::open(
        Arc::new(FsDir::new(dir.join("log"))?),
        vec![Arc::new(FileIo::open(&base)?)],
        RetentionConfig::default(),
        clock.clone(),
    )?;
    let (writes, records) = write_history(&mut log, &clock, env, volume)?;
    let at = log.resolve(&RecoveryPoint::Time(clock.now().minus(Duration::from_secs(3600))))?;
    // The cost to open a point as a virtual snapshot: resolve it, then read from it. With a
    // redo journal "latest" and "one hour ago" cost the same; an undo journal would serve
    // latest from the replica and pay a lookup for the older one.
    let open_latest = open_and_read(&log, &RecoveryPoint::Latest, volume)?;
    let open_hour_ago = open_and_read(
        &log,
        &RecoveryPoint::Time(clock.now().minus(Duration::from_secs(3600))),
        volume,
    )?;

    let mut ours = Vec::new();
    let mut cp = Vec::new();
    let mut journal_blocks = 0;
    for _ in 0..=env.scale.reps {
        sys::settle(&dir)?;
        let (t, blocks) = time_materialize(&log, &at, &out)?;
        ours.push(t.as_secs_f64());
        journal_blocks = blocks;
        sys::settle(&dir)?;
        cp.push(time_cp(&base, &out)?.as_secs_f64());
    }
    if journal_blocks == 0 {
        bail!("the point an hour back took nothing from the journal");
    }
    drop(log);
    std::fs::remove_dir_all(&dir)?;

    let rounds = runs(ours.len() - 1);
    let list = |v: &[f64]| v.iter().map(|t| format!("{t:.3}")).collect::<Vec<_>>().join(", ");
    let (ours_runs, cp_runs) = (list(&ours[1..]), list(&cp[1..]));
    let (ours, cp) = (median(ours[1..].iter().copied()), median(cp[1..].iter().copied()));
    let ratio = ours / cp;
    eprintln!(
        "[journal] materialize {}: {ours:.2} s, cp {cp:.2} s (ratio {ratio:.2})",
        size(volume)
    );
    let cp_version = sys::program_version("cp").unwrap_or_else(|| "cp".to_owned());
    let open_note = |which: &str| {
        format!(
            "RecoveryPoint::{which} resolved, then 2000 RetentionLog::read_at of a random 4 KiB \
             block of the {} volume (page cache warm); median; resolve took {{}} µs",
            size(volume)
        )
    };
    Ok(vec![
        Figure::new("open_latest_read_4k_p50", open_latest.1, "µs")
            .note(open_note("Latest").replace("{}", &format!("{:.1}", open_latest.0))),
        Figure::new("open_hour_ago_read_4k_p50", open_hour_ago.1, "µs")
            .compared("open_latest_read_4k_p50 (same run)".to_owned(), Some(open_hour_ago.1 / open_latest.1))
            .note(open_note("Time(now - 1h)").replace("{}", &format!("{:.1}", open_hour_ago.0))),
        Figure::new("materialize_1h_back", ours, "s")
            .compared(
                format!(
                    "`cp base copy && sync copy` of the same {} base on the same filesystem ({cp_version}), \
                     base warm in the page cache, {rounds} after a warm-up: {cp:.3} s \
                     ({:.0} MB/s; runs {cp_runs} s)",
                    size(volume),
                    mb_per_s(volume, Duration::from_secs_f64(cp))
                ),
                Some(ratio),
            )
            .goal(Goal::AtMost(1.5))
            .note(format!(
                "RetentionLog::materialize of a {} volume to a new file (includes creating it, BLAKE3 of the image \
                 and the final fdatasync) at RecoveryPoint::Time(now - 1h) = seq {} of {records}, \
                 after {} simulated hours of {writes} 64 KiB writes (10% of the volume) and a \
                 barrier every simulated second; {journal_blocks} blocks from the journal; \
                 base warm in the page cache, {rounds} after a warm-up, alternating \
                 with cp: {:.0} MB/s (runs {ours_runs} s)",
                size(volume),
                at.seq,
                HISTORY_SECS / 3600,
                mb_per_s(volume, Duration::from_secs_f64(ours))
            )),
    ])
}
