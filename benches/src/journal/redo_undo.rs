//! The target's cost per incoming 4 KiB write: the chosen redo design against an emulated
//! undo design, on the same replica file, in the same run (figure 5).
//!
//! - Redo: [`RetentionLog::append`] of each write (new data appended once to the log; the
//!   replica is its base and is not touched), group commit every 1 MiB (256 writes).
//! - Undo: for each write, pread the old 4 KiB at its offset in the replica, append it
//!   (with a 16-byte offset/sequence header) to an undo journal, then pwrite the new data
//!   in place. Per 1 MiB group: the old blocks are appended with one write and the journal
//!   is fdatasynced *before* the new data overwrites the replica (otherwise a crash could
//!   lose the old version), then the replica is fdatasynced.
//!
//! Both see the same offsets and data, and start with the replica evicted from the page
//! cache, so undo's reads of old data come from disk as they would on a real target.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use rand::Rng;
use tidemark_journal::{
    Event, FileIo, FsDir, ManualClock, Nanos, RetentionConfig, RetentionLog, Seq, VolumeId,
};

use super::{Env, MIB, create_random_file, rng, size};
use crate::figure::Figure;
use crate::sys;

const WRITE_BYTES: u64 = 4096;
/// Writes per group commit: 1 MiB of incoming data.
const GROUP: usize = (MIB / WRITE_BYTES) as usize;
const T0: u64 = 1_704_067_200 * 1_000_000_000;

/// The incoming writes: offsets, the same for both designs.
fn offsets(env: &Env<'_>) -> Vec<u64> {
    let mut r = rng(5);
    let blocks = env.scale.target_volume / WRITE_BYTES;
    (0..env.scale.target_writes).map(|_| r.gen_range(0..blocks) * WRITE_BYTES).collect()
}

fn redo(env: &Env<'_>, replica: &Path, log_dir: &Path, offsets: &[u64]) -> Result<Duration> {
    sys::evict_file(replica)?;
    let clock = Arc::new(ManualClock::new(Nanos(T0)));
    let (mut log, _) = RetentionLog::open(
        Arc::new(FsDir::new(log_dir)?),
        vec![Arc::new(FileIo::open(replica)?)],
        RetentionConfig::default(),
        clock,
    )?;
    let start = Instant::now();
    let mut n = 0u64;
    for group in offsets.chunks(GROUP) {
        for &offset in group {
            n += 1;
            let data = env.pool.get(n, WRITE_BYTES as usize);
            log.append(
                Seq(n),
                Nanos(T0 + n * 1000),
                &Event::Write { volume: VolumeId(0), offset, data },
            )?;
        }
        log.sync()?;
    }
    Ok(start.elapsed())
}

fn undo(env: &Env<'_>, replica: &Path, journal: &Path, offsets: &[u64]) -> Result<Duration> {
    sys::evict_file(replica)?;
    let vol = OpenOptions::new().read(true).write(true).open(replica)?;
    let jf = File::create(journal)?;
    let mut jbuf = Vec::with_capacity(GROUP * (16 + WRITE_BYTES as usize));
    let mut jpos = 0u64;
    let mut old = vec![0u8; WRITE_BYTES as usize];
    let start = Instant::now();
    for (g, group) in offsets.chunks(GROUP).enumerate() {
        jbuf.clear();
        for (j, &offset) in group.iter().enumerate() {
            vol.read_exact_at(&mut old, offset)?;
            let seq = (g * GROUP + j) as u64 + 1;
            jbuf.extend_from_slice(&offset.to_le_bytes());
            jbuf.extend_from_slice(&seq.to_le_bytes());
            jbuf.extend_from_slice(&old);
        }
        jf.write_all_at(&jbuf, jpos)?;
        jpos += jbuf.len() as u64;
        jf.sync_data()?;
        for (j, &offset) in group.iter().enumerate() {
            let seq = (g * GROUP + j) as u64 + 1;
            vol.write_all_at(&env.pool.get(seq, WRITE_BYTES as usize), offset)?;
        }
        vol.sync_data()?;
    }
    Ok(start.elapsed())
}

pub fn run(env: &Env<'_>) -> Result<Vec<Figure>> {
    let dir = env.subdir("redo-undo")?;
    let replica = dir.join("replica.img");
    create_random_file(&replica, env.scale.target_volume, 6)?;
    let offsets = offsets(env);
    let n = offsets.len() as f64;

    let redo_time = redo(env, &replica, &dir.join("redo-log"), &offsets)?;
    let undo_time = undo(env, &replica, &dir.join("undo.journal"), &offsets)?;
    std::fs::remove_dir_all(&dir)?;

    let redo_us = redo_time.as_secs_f64() * 1e6 / n;
    let undo_us = undo_time.as_secs_f64() * 1e6 / n;
    eprintln!("[journal] target cost per 4 KiB write: redo {redo_us:.1} µs, undo {undo_us:.1} µs");
    let workload = format!(
        "{} incoming 4 KiB writes at random aligned offsets of a {} replica of random data, \
         replica evicted from the page cache first, fdatasync every 1 MiB (256 writes)",
        offsets.len(),
        size(env.scale.target_volume)
    );
    Ok(vec![
        Figure::new("target_write_redo_4k", redo_us, "µs/write")
            .compared(
                format!(
                    "undo journal emulation (read old + append + write new): {undo_us:.1} µs/write"
                ),
                Some(redo_us / undo_us),
            )
            .note(format!(
                "RetentionLog::append + RetentionLog::sync every 1 MiB; {workload}. Excludes \
                 redo's deferred cost: when history leaves the window the newest version of each \
                 block is written to the base once (RetentionLog::enforce)"
            )),
        Figure::new("target_write_undo_4k", undo_us, "µs/write").note(format!(
            "undo emulation: per write pread old 4 KiB from the replica, append it with a \
             16-byte header to a journal file (one pwrite per group, no checksum), pwrite new \
             data in place; per group fdatasync the journal before overwriting, then the \
             replica; {workload}"
        )),
    ])
}
