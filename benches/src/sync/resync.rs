//! Fast resync of an image with 1% of its 4 KiB blocks changed at random.
//!
//! Image A (random 4 KiB blocks, one in ten zero) is copied to B, the base of the target's
//! retention log, and to C, rsync's destination; then 1% of A's blocks (distinct, chosen
//! at random) are overwritten with random bytes. Three contenders, each starting with the
//! page cache of every file it reads dropped (`POSIX_FADV_DONTNEED` per file after a
//! sync):
//!
//! - ours: [`tidemark_sync::syncer::Syncer::fast_resync`] over TCP loopback with
//!   Noise/AES-256-GCM (shipper defaults: zstd adaptive from level 1, dedupe on), timed
//!   from the call until the target acknowledged `ResyncEnd`; wire bytes are the shipper's
//!   frames (batches and hash requests) plus the hash replies it received;
//! - `rsync --inplace --no-whole-file --ignore-times --stats A C` (local: sender and
//!   receiver processes over a pipe; its default block size; `--ignore-times` because A
//!   and C may share size and mtime), wire bytes = "Total bytes sent" + "received";
//! - `cat A` and `cat B` to `/dev/null` at the same time (both sides of ours hash in
//!   parallel too): the floor any comparison that reads both images has.
//!
//! The resync must find exactly the changed bytes (checked).

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tidemark_sync::syncer::{Phase, Progress, ProgressFn};

use super::rig::{Source, Target, Wire, paired_keys};
use super::{BLOCK, Rng, Scale, cat_parallel, copy_synced, evict, timed, write_random_image};
use crate::figure::{Figure, Goal};
use crate::journal::size;
use crate::sys;

/// What our resync measured.
#[derive(Debug)]
struct Ours {
    elapsed: Duration,
    /// Until both trees were built (the first `Comparing` progress report).
    hashed: Duration,
    /// Until the comparison ended (the first `Copying` report).
    compared: Duration,
    /// Until the last range was copied into the spool (`fast_resync` returned).
    copied: Duration,
    /// CPU time of this process (source and target) over the whole resync.
    cpu: Duration,
    wire_bytes: u64,
    hash_bytes: u64,
    hash_requests: u64,
}

/// Overwrites `count` distinct random blocks of `path` with random bytes; syncs.
fn diverge(path: &Path, len: u64, count: u64, seed: u64) -> Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    let mut rng = Rng::new(seed);
    let mut blocks = BTreeSet::new();
    while (blocks.len() as u64) < count {
        blocks.insert(rng.below(len / BLOCK));
    }
    let mut buf = vec![0u8; BLOCK as usize];
    for b in blocks {
        rng.fill(&mut buf);
        f.write_all_at(&buf, b * BLOCK)?;
    }
    f.sync_all().with_context(|| format!("fsync {}", path.display()))
}

fn ours(dir: &Path, a: &Path, b: &Path, changed_bytes: u64) -> Result<Ours> {
    let (cs, ct) = paired_keys()?;
    let target = Target::start(dir, b, ct)?;
    let source = Source::start(dir, a, cs, Wire::defaults(), &target)?;
    // Connected and idle before the clock starts.
    source.connected()?;
    evict(&[a, b])?;
    let before = source.shipper().status();
    let phases: Arc<Mutex<[Option<Instant>; 2]>> = Arc::default();
    let seen = phases.clone();
    let progress: ProgressFn = Arc::new(move |p: Progress| {
        let i = match p.phase {
            Phase::Comparing => 0,
            Phase::Copying => 1,
            Phase::Hashing => return,
        };
        let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
        seen[i].get_or_insert_with(Instant::now);
    });
    let cpu = sys::cpu_time();
    let start = Instant::now();
    let report =
        source.syncer().progress(progress).fast_resync(None, &[]).context("fast_resync")?;
    let copied = start.elapsed();
    let after = source.caught_up()?;
    let elapsed = start.elapsed();
    let cpu = sys::cpu_time() - cpu;
    let [hashed, compared] = *phases.lock().unwrap_or_else(|e| e.into_inner());
    let since = |t: Option<Instant>| t.map_or(Duration::ZERO, |t| t - start);
    ensure!(
        report.differing_bytes == changed_bytes && report.data_bytes == changed_bytes,
        "the resync found {} differing bytes and copied {}, {changed_bytes} were changed",
        report.differing_bytes,
        report.data_bytes
    );
    let replies = after.hash_reply_bytes - before.hash_reply_bytes;
    Ok(Ours {
        elapsed,
        hashed: since(hashed),
        compared: since(compared),
        copied,
        cpu,
        wire_bytes: after.wire_bytes - before.wire_bytes + replies,
        hash_bytes: after.hash_request_bytes - before.hash_request_bytes + replies,
        hash_requests: report.compare.hash_requests,
    })
}

/// "Total bytes sent: 1,234" in rsync's `--stats`: the number.
fn stat_line(stats: &str, label: &str) -> Result<u64> {
    let line = stats
        .lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .with_context(|| format!("no {label:?} line in rsync --stats output"))?;
    let digits: String = line.chars().filter(char::is_ascii_digit).collect();
    digits.parse().with_context(|| format!("rsync {label:?} {line:?} is not a number"))
}

/// rsync's wall time and wire bytes (sent + received).
fn rsync(a: &Path, c: &Path) -> Result<(Duration, u64)> {
    evict(&[a, c])?;
    let (took, out) = timed(
        Command::new("rsync")
            .args(["--inplace", "--no-whole-file", "--ignore-times", "--stats"])
            .arg(a)
            .arg(c),
    )?;
    let stats = String::from_utf8_lossy(&out.stdout);
    let bytes =
        stat_line(&stats, "Total bytes sent:")? + stat_line(&stats, "Total bytes received:")?;
    if bytes == 0 {
        bail!("rsync reported no bytes: {stats}");
    }
    Ok((took, bytes))
}

/// Runs the comparison in `dir`.
pub fn run(dir: &Path, scale: Scale) -> Result<Vec<Figure>> {
    let len = scale.resync_image;
    let (a, b, c) = (dir.join("a.img"), dir.join("b.img"), dir.join("c.img"));
    eprintln!("[sync] resync: writing a {} image and two copies", size(len));
    write_random_image(&a, len, 7)?;
    copy_synced(&a, &b)?;
    copy_synced(&a, &c)?;
    let changed = len / BLOCK / 100;
    diverge(&a, len, changed, 8)?;
    let changed_bytes = changed * BLOCK;

    eprintln!("[sync] resync: ours");
    let ours = ours(&dir.join("rig"), &a, &b, changed_bytes)?;
    eprintln!("[sync] resync: cat");
    evict(&[&a, &b])?;
    let cat = cat_parallel(&[&a, &b])?;
    eprintln!("[sync] resync: rsync");
    let (rsync_time, rsync_bytes) = rsync(&a, &c)?;

    let secs = ours.elapsed.as_secs_f64();
    let what = format!("{} image, {changed} of its 4 KiB blocks changed (1%)", size(len));
    let cache = "page cache of every file read dropped before each contender";
    Ok(vec![
        Figure::new("fast resync vs rsync: wall time", secs, "s")
            .compared(
                format!(
                    "rsync --inplace --no-whole-file --ignore-times (local pipe, default block size) on the \
                     same pair: {:.2} s; goal: ours at least 5x faster",
                    rsync_time.as_secs_f64()
                ),
                Some(secs / rsync_time.as_secs_f64()),
            )
            .goal(Goal::AtMost(0.2))
            .note(format!(
                "{what}; Syncer::fast_resync over TCP loopback, Noise/AES-256-GCM, zstd adaptive \
                 from 1, dedupe on; until the target acked ResyncEnd; {cache}; both trees \
                 built after {:.2} s, comparison done at {:.2} s, ranges spooled at {:.2} s, \
                 acked at {secs:.2} s; {:.1} CPU s in all (source and target)",
                ours.hashed.as_secs_f64(),
                ours.compared.as_secs_f64(),
                ours.copied.as_secs_f64(),
                ours.cpu.as_secs_f64(),
            )),
        Figure::new("fast resync vs reading both images", secs, "s")
            .compared(
                format!(
                    "cat A and cat B to /dev/null in parallel: {:.2} s",
                    cat.as_secs_f64()
                ),
                Some(secs / cat.as_secs_f64()),
            )
            .goal(Goal::AtMost(1.3))
            .note(cache),
        Figure::new("fast resync: bytes on the wire", ours.wire_bytes as f64, "B")
            .compared(
                format!("rsync's total bytes sent + received: {rsync_bytes}"),
                Some(ours.wire_bytes as f64 / rsync_bytes as f64),
            )
            .note(format!(
                "{changed_bytes} changed bytes; ours includes {} bytes of hash requests and \
                 replies ({} requests): {:.3} wire bytes per changed byte",
                ours.hash_bytes,
                ours.hash_requests,
                ours.wire_bytes as f64 / changed_bytes as f64
            )),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsync_stats_are_parsed_with_thousands_separators() {
        let s = "Number of files: 1\nTotal bytes sent: 1,234,567\nTotal bytes received: 89\n";
        assert_eq!(stat_line(s, "Total bytes sent:").unwrap(), 1_234_567);
        assert_eq!(stat_line(s, "Total bytes received:").unwrap(), 89);
        assert!(stat_line(s, "Total file size:").is_err());
    }
}
