//! The tap benchmark, all measured in one run in one directory.
//!
//! 1. fio through the FUSE + loop frontend (capture on, spool on): 4 KiB random writes at
//!    QD 32 and 1 MiB sequential writes, each against a plain loop device over a plain file
//!    of the same size on the same filesystem. No goal: it is the fallback path, reported as
//!    it is. Needs root, `/dev/fuse`, loop devices, fio and losetup; otherwise SKIPPED.
//! 2. The user-space cost of the capture pipeline per 4 KiB write, from `Tap::write` to a
//!    durable spool append, with a synthetic request source (no kernel frontend), against the
//!    bare system calls such a write cannot avoid.
//! 3. ublk: not measured here; the command that measures it is printed.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use tidemark_journal::{Dir, FileIo, FsDir, Spool, SpoolConfig, SystemClock};
use tidemark_tap::{FuseLoopConfig, FuseLoopFrontend, IntentConfig, IntentMap, Tap, TapConfig};

use crate::Ctx;
use crate::figure::Figure;
use crate::{fio, sys};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Intent-map regions of the taps here (the default).
const REGION: u64 = 4 * MIB;

/// Sizes of a run.
#[derive(Debug, Clone, Copy)]
struct Scale {
    /// Protected device (and plain loop file) size for the fio figures.
    device_bytes: u64,
    /// Seconds of the time-based 4 KiB random-write fio jobs.
    rand_seconds: u64,
    /// Bytes of the 1 MiB sequential-write fio jobs (the whole device once).
    seq_bytes: u64,
    /// Synthetic 4 KiB writes through the capture pipeline.
    pipeline_writes: u64,
    /// Device size for the synthetic writes (random offsets within it).
    pipeline_device: u64,
}

impl Scale {
    fn new(smoke: bool) -> Self {
        if smoke {
            Self {
                device_bytes: 256 * MIB,
                rand_seconds: 2,
                seq_bytes: 256 * MIB,
                pipeline_writes: 16_384,
                pipeline_device: 64 * MIB,
            }
        } else {
            Self {
                device_bytes: GIB,
                rand_seconds: 10,
                seq_bytes: GIB,
                pipeline_writes: 262_144,
                pipeline_device: GIB,
            }
        }
    }
}

/// Runs every part and returns the figures.
pub fn run(ctx: &Ctx) -> Result<Vec<Figure>> {
    let scale = Scale::new(ctx.smoke);
    let mut figures = Vec::new();
    match fuse_prerequisites() {
        Ok(()) => figures.extend(fuse_vs_loop(ctx, &scale).context("FUSE + loop vs plain loop")?),
        Err(why) => eprintln!(
            "\n==============================================================\n\
             !!! SKIPPED: FUSE + loop fio figures not measured: {why}\n\
             =============================================================="
        ),
    }
    figures.extend(pipeline(ctx, &scale).context("capture pipeline cost")?);
    println!("\n{}", ublk_line());
    Ok(figures)
}

/// Why the FUSE figures cannot be measured, if they cannot.
fn fuse_prerequisites() -> std::result::Result<(), String> {
    let root = std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
    let fuse = Path::new("/dev/fuse").exists();
    let loop_ctl = Path::new("/dev/loop-control").exists();
    let fio = fio::available();
    let losetup = losetup().arg("--version").output().is_ok_and(|o| o.status.success());
    if root && fuse && loop_ctl && fio && losetup {
        return Ok(());
    }
    Err(format!(
        "needs root, /dev/fuse, loop devices, fio and losetup: root={root} /dev/fuse={fuse} \
         /dev/loop-control={loop_ctl} fio={fio} losetup={losetup}"
    ))
}

/// The ublk line: not measured here, with the command that measures it.
fn ublk_line() -> String {
    let why = if Path::new("/dev/ublk-control").exists() {
        "ublk_drv is loaded, but this benchmark does not start a ublk server yet"
    } else {
        "no ublk_drv on this kernel"
    };
    let job = "--ioengine=libaio --direct=1 --iodepth=32 --rw=randwrite --bs=4k \
               --time_based --runtime=30 --output-format=json";
    format!(
        "!!! ublk: not measured here ({why}); on a host with ublk_drv, with a ublk server \
         exporting RAW_DEVICE as /dev/ublkb0 (capture on, spool on), run:\n    \
         fio --name=ublk --filename=/dev/ublkb0 {job}\n    \
         fio --name=raw --filename=RAW_DEVICE {job}\n  \
         ublk_overhead = ublk write.iops / raw write.iops, goal >= 0.9 of raw IOPS at 4 KiB QD32"
    )
}

/// `losetup`, found in the sbin directories whatever PATH we got.
fn losetup() -> Command {
    let path = std::env::var("PATH").unwrap_or_default();
    let mut c = Command::new("losetup");
    c.env("PATH", format!("{path}:/usr/local/sbin:/usr/sbin:/sbin"));
    c
}

/// A plain loop device over a file, attached with losetup and detached on drop.
struct PlainLoop {
    path: PathBuf,
    attached: bool,
}

impl PlainLoop {
    fn attach(file: &Path) -> Result<PlainLoop> {
        let out =
            sys::run_command(losetup().args(["--find", "--show", "--direct-io=on"]).arg(file))?;
        let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !path.starts_with("/dev/") {
            return Err(anyhow!("losetup printed no device: {path:?}"));
        }
        Ok(PlainLoop { path: PathBuf::from(path), attached: true })
    }

    /// Whether the loop driver took direct I/O (`/sys/block/loopN/loop/dio`).
    fn direct_io(&self) -> bool {
        let name = self.path.file_name().map(|n| n.to_string_lossy().into_owned());
        name.and_then(|n| std::fs::read_to_string(format!("/sys/block/{n}/loop/dio")).ok())
            .is_some_and(|s| s.trim() == "1")
    }

    fn detach(&mut self) -> Result<()> {
        if self.attached {
            self.attached = false;
            sys::run_command(losetup().arg("-d").arg(&self.path))?;
        }
        Ok(())
    }
}

impl Drop for PlainLoop {
    fn drop(&mut self) {
        if self.attached {
            let _ = losetup().arg("-d").arg(&self.path).status();
        }
    }
}

/// A tap over a file-backed device of `len` bytes in `dir`, with its spool and intent map.
fn open_tap(dir: &Path, len: u64) -> Result<Arc<Tap>> {
    let io = FileIo::create(dir.join("device.img"), len).context("creating the device")?;
    let (spool, _) = Spool::open(
        Arc::new(FsDir::new(dir.join("spool")).context("spool dir")?),
        // Large enough that no measured run overflows (checked after each run).
        SpoolConfig { capacity_bytes: 16 * GIB, segment_bytes: 64 * MIB, key: None },
        Arc::new(SystemClock),
    )
    .context("opening the spool")?;
    let map = FsDir::new(dir)?.open("intent.map", true).context("intent map file")?;
    let cfg = IntentConfig {
        region_bytes: REGION,
        max_hot_regions: (len / REGION) as u32 + 1,
        ..IntentConfig::default()
    };
    let (intent, _) = IntentMap::open(map, len, cfg).context("opening the intent map")?;
    let tap = Tap::new(Arc::new(io), spool, intent, TapConfig::default()).context("tap")?;
    Ok(Arc::new(tap))
}

/// The checks after a measured run: nothing overflowed the spool.
fn check_no_overflow(tap: &Tap, what: &str) -> Result<()> {
    match tap.status().overflow {
        None => Ok(()),
        Some(o) => {
            Err(anyhow!("{what}: the spool overflowed ({}); the figure would be wrong", o.cause))
        }
    }
}

/// One fio job: its name in figures, its options, how its value is read.
struct Job {
    name: &'static str,
    what: String,
    options: Vec<String>,
    iops: bool,
}

impl Job {
    fn value(&self, r: &fio::FioResult) -> f64 {
        if self.iops { r.iops } else { r.bytes_per_sec / 1e6 }
    }

    fn unit(&self) -> &'static str {
        if self.iops { "IOPS" } else { "MB/s" }
    }
}

fn jobs(scale: &Scale) -> Vec<Job> {
    let common = |more: &[&str]| -> Vec<String> {
        ["--ioengine=libaio", "--direct=1"].iter().chain(more).map(|s| (*s).to_owned()).collect()
    };
    let rand_runtime = format!("--runtime={}", scale.rand_seconds);
    let seq_size = format!("--size={}", scale.seq_bytes);
    vec![
        Job {
            name: "fuse_loop_randwrite_4k_qd32",
            what: format!("fio 4 KiB random writes, QD 32, {} s", scale.rand_seconds),
            options: common(&[
                "--iodepth=32",
                "--rw=randwrite",
                "--bs=4k",
                "--time_based",
                &rand_runtime,
                "--randrepeat=0",
            ]),
            iops: true,
        },
        Job {
            name: "fuse_loop_seqwrite_1m",
            what: format!("fio 1 MiB sequential writes, {}", crate::journal::size(scale.seq_bytes)),
            options: common(&["--iodepth=1", "--rw=write", "--bs=1M", &seq_size]),
            iops: false,
        },
    ]
}

/// Figure 1: fio through the FUSE + loop frontend against a plain loop device.
fn fuse_vs_loop(ctx: &Ctx, scale: &Scale) -> Result<Vec<Figure>> {
    let mut figures = Vec::new();
    for job in jobs(scale) {
        // The reference first: a plain loop over a plain file of the same size.
        let plain = ctx.dir.join(format!("{}-plain.img", job.name));
        File::create(&plain).and_then(|f| f.set_len(scale.device_bytes)).context("plain file")?;
        sys::settle(&ctx.dir)?;
        let mut l = PlainLoop::attach(&plain)?;
        let plain_dio = l.direct_io();
        let reference = fio::device_job(job.name, &l.path, &job.options);
        l.detach()?;
        std::fs::remove_file(&plain)?;
        let reference =
            reference.with_context(|| format!("fio on the plain loop ({})", job.what))?;

        // Then through the frontend, capture and spool on, a fresh tap.
        let dir = ctx.dir.join(job.name);
        std::fs::create_dir_all(&dir)?;
        let tap = open_tap(&dir, scale.device_bytes)?;
        sys::settle(&ctx.dir)?;
        let mut cfg = FuseLoopConfig::new(dir.join("mnt"));
        cfg.shutdown_timeout = Duration::from_secs(10);
        let frontend = FuseLoopFrontend::start(tap.clone(), cfg).context("starting FUSE + loop")?;
        let dev = frontend.device_path().context("no loop device")?.to_path_buf();
        let fuse_dio = frontend.loop_device().is_some_and(|l| l.direct_io());
        // The shipper's group commit: the spool is made durable every 10 ms while fio runs.
        let stop = AtomicBool::new(false);
        let (measured, syncs) = std::thread::scope(|s| {
            let syncer = s.spawn(|| {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                    if tap.sync_spool().is_ok() {
                        n += 1;
                    }
                }
                n
            });
            let r = fio::device_job(job.name, &dev, &job.options);
            stop.store(true, Ordering::Relaxed);
            (r, syncer.join().expect("syncer thread"))
        });
        let counters = frontend.counters();
        frontend.shutdown().context("FUSE + loop teardown")?;
        let measured =
            measured.with_context(|| format!("fio through FUSE + loop ({})", job.what))?;
        tap.sync_spool().context("final spool sync")?;
        check_no_overflow(&tap, job.name)?;
        let status = tap.status();
        drop(tap);
        std::fs::remove_dir_all(&dir)?;

        let (ours, theirs) = (job.value(&measured), job.value(&reference));
        figures.push(
            Figure::new(job.name, ours, job.unit())
                .compared(
                    format!(
                        "plain loop over a plain file of the same size (losetup --direct-io=on, \
                         dio {}): {}; no goal: the fallback path, reported as it is. 1 run. \
                         Not like for like: the tap writes its device file with buffered \
                         pwrite (completion after the backing write, made durable only by a \
                         flush) plus a sequential spool append, the plain loop writes its \
                         sparse file with O_DIRECT, so a ratio above 1 means page cache, not \
                         a faster path",
                        if plain_dio { "on" } else { "off" },
                        fio::FioResult::summary(&reference),
                    ),
                    Some(ours / theirs),
                )
                .note(format!(
                    "{}, fio --ioengine=libaio --direct=1 on the loop device of the FUSE \
                     frontend (loop dio {}), capture on, spool on with a group commit every \
                     10 ms ({syncs} syncs); {} ({}); {} FUSE writes (avg {} KiB), {} captured \
                     writes, {} in the spool",
                    job.what,
                    if fuse_dio { "on" } else { "off" },
                    fio::FioResult::summary(&measured),
                    ctx.fs_type,
                    counters.writes,
                    counters.write_bytes / counters.writes.max(1) / KIB,
                    status.writes,
                    crate::journal::size(status.bytes),
                )),
        );
    }
    Ok(figures)
}

/// Random payloads handed out as slices of one buffer.
fn payloads(len: usize) -> Bytes {
    let mut v = vec![0u8; len];
    StdRng::seed_from_u64(7).fill_bytes(&mut v);
    Bytes::from(v)
}

/// 4 KiB-aligned random offsets within `device`, the same for both sides.
fn offsets(n: u64, device: u64) -> Vec<u64> {
    let mut r = StdRng::seed_from_u64(11);
    let blocks = device / (4 * KIB);
    (0..n).map(|_| r.gen_range(0..blocks) * 4 * KIB).collect()
}

/// What [`measure`] measured.
#[derive(Debug, Clone, Copy)]
struct Cost {
    /// User plus system CPU.
    cpu: Duration,
    /// User CPU alone.
    user: Duration,
    /// Wall time.
    wall: Duration,
}

/// CPU and wall time of `f`.
fn measure(f: impl FnOnce() -> Result<()>) -> Result<Cost> {
    let before = sys::usage();
    let start = Instant::now();
    f()?;
    let wall = start.elapsed();
    let after = sys::usage();
    Ok(Cost { cpu: after.cpu - before.cpu, user: after.user - before.user, wall })
}

/// Figure 2: CPU and wall time per 4 KiB write through `Tap::write`, the spool synced every
/// 1 MiB, against the bare system calls: a pwrite to the device file and an append to a log
/// file, fdatasync of the log every 1 MiB.
fn pipeline(ctx: &Ctx, scale: &Scale) -> Result<Vec<Figure>> {
    const BS: usize = 4096;
    let per_sync = MIB / BS as u64;
    let n = scale.pipeline_writes;
    let pool = payloads(16 << 20);
    let offs = offsets(n, scale.pipeline_device);
    let data = |i: u64| {
        let off = (i as usize * (BS + 64)) % (pool.len() - BS);
        pool.slice(off..off + BS)
    };

    // Reference: the bare system calls.
    let dir = ctx.dir.join("pipeline-bare");
    std::fs::create_dir_all(&dir)?;
    let dev = File::create(dir.join("device.img"))?;
    dev.set_len(scale.pipeline_device)?;
    let log = OpenOptions::new().create(true).append(true).open(dir.join("log"))?;
    sys::settle(&ctx.dir)?;
    let bare = measure(|| {
        let mut tail = 0u64;
        for (i, &off) in offs.iter().enumerate() {
            let d = data(i as u64);
            dev.write_all_at(&d, off)?;
            log.write_all_at(&d, tail)?;
            tail += BS as u64;
            if (i as u64 + 1).is_multiple_of(per_sync) {
                log.sync_data()?;
            }
        }
        log.sync_data()?;
        Ok(())
    })?;
    drop((dev, log));
    std::fs::remove_dir_all(&dir)?;

    // The capture pipeline.
    let dir = ctx.dir.join("pipeline-tap");
    std::fs::create_dir_all(&dir)?;
    let tap = open_tap(&dir, scale.pipeline_device)?;
    sys::settle(&ctx.dir)?;
    let ours = measure(|| {
        for (i, &off) in offs.iter().enumerate() {
            tap.write(off, data(i as u64))?;
            if (i as u64 + 1).is_multiple_of(per_sync) {
                tap.sync_spool()?;
            }
        }
        tap.sync_spool()?;
        Ok(())
    })?;
    check_no_overflow(&tap, "pipeline")?;
    let status = tap.status();
    anyhow::ensure!(status.writes == n, "{} of {n} writes captured", status.writes);
    anyhow::ensure!(status.durable_seq == status.last_seq, "spool not durable at the end");
    drop(tap);
    std::fs::remove_dir_all(&dir)?;

    let per = |d: Duration| d.as_nanos() as f64 / n as f64;
    let how = format!(
        "{n} synthetic 4 KiB writes at random 4 KiB-aligned offsets of a {} file-backed \
         device (FileIo), Tap::write each, Tap::sync_spool every 1 MiB and at the end; \
         getrusage user+sys of the process over the loop ({})",
        crate::journal::size(scale.pipeline_device),
        ctx.fs_type
    );
    let bare_how = "the bare system calls of the same writes: pwrite to a plain device file \
                    and append to a plain log file, fdatasync of the log every 1 MiB";
    Ok(vec![
        Figure::new("capture_cpu_per_4k_write", per(ours.cpu), "ns CPU")
            .compared(
                format!(
                    "{bare_how}: {:.0} ns CPU per write (user {:.0} ns)",
                    per(bare.cpu),
                    per(bare.user)
                ),
                Some(ours.cpu.as_secs_f64() / bare.cpu.as_secs_f64()),
            )
            .note(format!("{how}; of which user {:.0} ns per write", per(ours.user))),
        Figure::new("capture_wall_per_4k_write", per(ours.wall) / 1e3, "µs")
            .compared(
                format!("{bare_how}: {:.2} µs per write", per(bare.wall) / 1e3),
                Some(ours.wall.as_secs_f64() / bare.wall.as_secs_f64()),
            )
            .note(format!("{how}; wall time over the loop")),
    ])
}

impl fio::FioResult {
    /// "12345 IOPS, 50.6 MB/s" for references and notes.
    fn summary(&self) -> String {
        format!("{:.0} IOPS, {:.1} MB/s", self.iops, self.bytes_per_sec / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ublk_line_has_both_commands_and_the_goal() {
        let l = ublk_line();
        assert!(l.contains("--filename=/dev/ublkb0"));
        assert!(l.contains("--filename=RAW_DEVICE"));
        assert!(l.contains("--iodepth=32") && l.contains("--bs=4k"));
        assert!(l.contains(">= 0.9"));
    }

    #[test]
    fn offsets_are_aligned_and_inside() {
        for o in offsets(1000, 64 * MIB) {
            assert_eq!(o % 4096, 0);
            assert!(o + 4096 <= 64 * MIB);
        }
    }
}
