//! The ublk frontend and dm-log-writes against a real kernel: the guest side of
//! `cargo xtask lab` (a QEMU guest running Debian's 6.12 kernel with `ublk_drv` and
//! device-mapper), built as a test binary without the libtest harness.
//!
//! - `ublk_lab --lab`: every test, on the guest's virtio disks (`/dev/vda` behind the ublk
//!   device of tests 1-3 and then of test 6, `/dev/vdb` + `/dev/vdc` for dm-log-writes,
//!   `/dev/vdd` behind the recovery device), printing `TIDEMARK-LAB: PASS <test>` / `TIDEMARK-LAB: FAIL <test>: <why>`
//!   per test and a last line `TIDEMARK-LAB: PASS <n> tests` or `TIDEMARK-LAB: FAIL <k> of
//!   <n> tests`.
//! - `ublk_lab serve ...`: a ublk server in its own process, for the kill -9 test.
//! - no argument (as `cargo test` runs it): on a host without `/dev/ublk-control` it says
//!   loudly that it skipped; on a host with `ublk_drv` (and root) it runs the tests that
//!   need only a ublk device, over a temporary file.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use std::{env, thread};

use bytes::Bytes;
use tidemark_journal::{BlockIo, Event, FileIo, FsDir, Seq, Spool, SpoolConfig, SystemClock};
use tidemark_tap::dmlog::{DmLog, ReplayPoint};
use tidemark_tap::{
    CompletionPolicy, IntentConfig, IntentMap, Tap, TapConfig, UblkConfig, UblkServer, UblkStats,
    ublk,
};

type TestResult = Result<(), String>;

const PREFIX: &str = "TIDEMARK-LAB:";
const BLOCK: usize = 4096;
const REGION: u64 = 1 << 20;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve_main(&args[1..]),
        Some("--lab") => lab_main(),
        _ => host_main(),
    }
}

// ------------------------------------------------------------------------------------------
// Shared pieces
// ------------------------------------------------------------------------------------------

fn e<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |err| format!("{what}: {err}")
}

/// The whole error chain of a tap error.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A tap over `backing` with its spool and write-intent map in `work`.
fn open_tap(
    backing: &Path,
    work: &Path,
    completion: CompletionPolicy,
) -> Result<(Arc<Tap>, Arc<dyn BlockIo>), String> {
    let device: Arc<dyn BlockIo> = Arc::new(FileIo::open(backing).map_err(e("open backing"))?);
    let len = device.len().map_err(e("backing length"))?;
    fs::create_dir_all(work.join("spool")).map_err(e("spool dir"))?;
    let dir = Arc::new(FsDir::new(work.join("spool")).map_err(e("spool dir"))?);
    let cfg = SpoolConfig { capacity_bytes: 512 << 20, segment_bytes: 16 << 20, key: None };
    let (spool, _) = Spool::open(dir, cfg, Arc::new(SystemClock)).map_err(e("spool open"))?;
    let map_path = work.join("intent.map");
    let map_io: Arc<dyn BlockIo> = if map_path.exists() {
        Arc::new(FileIo::open(&map_path).map_err(e("intent map"))?)
    } else {
        Arc::new(FileIo::create(&map_path, 0).map_err(e("intent map"))?)
    };
    let (intent, _) = IntentMap::open(map_io, len, intent_cfg()).map_err(|err| chain(&err))?;
    let cfg = TapConfig { completion, ..TapConfig::default() };
    let tap = Tap::new(device.clone(), spool, intent, cfg).map_err(|err| chain(&err))?;
    Ok((Arc::new(tap), device))
}

fn intent_cfg() -> IntentConfig {
    IntentConfig { region_bytes: REGION, max_hot_regions: 4096, max_runs: 1024 }
}

/// Every event in the spool in `work`, in sequence order.
fn spooled_events(work: &Path) -> Result<Vec<Event>, String> {
    let dir = Arc::new(FsDir::new(work.join("spool")).map_err(e("spool dir"))?);
    let cfg = SpoolConfig { capacity_bytes: 512 << 20, segment_bytes: 16 << 20, key: None };
    let (spool, _) = Spool::open(dir, cfg, Arc::new(SystemClock)).map_err(e("spool reopen"))?;
    let events = spool.read_after(Seq::ZERO, u64::MAX).map_err(|err| chain(&err))?;
    Ok(events.into_iter().map(|s| s.event).collect())
}

/// Applies captured events to an image.
fn replay(events: &[Event], image: &mut [u8]) -> Result<(), String> {
    for event in events {
        let (offset, len, data): (u64, usize, Option<&Bytes>) = match event {
            Event::Write { offset, data, .. } => (*offset, data.len(), Some(data)),
            Event::WriteZeroes { offset, len, .. } | Event::Discard { offset, len, .. } => {
                (*offset, *len as usize, None)
            }
            _ => continue,
        };
        let at = usize::try_from(offset).map_err(e("offset"))?;
        ensure!(at + len <= image.len(), "event at {offset}+{len} past the image end");
        match data {
            Some(data) => image[at..at + len].copy_from_slice(data),
            None => image[at..at + len].fill(0),
        }
    }
    Ok(())
}

/// A buffer of `len` bytes aligned for O_DIRECT, without unsafe code: a larger vector and
/// the aligned window into it.
struct Aligned {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let raw = vec![0u8; len + BLOCK];
        let start = (BLOCK - raw.as_ptr() as usize % BLOCK) % BLOCK;
        Aligned { raw, start, len }
    }
    fn get(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

fn open_direct(path: &Path, extra: i32) -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT | extra)
        .open(path)
        .map_err(e(&format!("open {} O_DIRECT", path.display())))
}

/// Reads all of `path` (O_DIRECT, so through the device, not a cache).
fn read_device(path: &Path, len: u64) -> Result<Vec<u8>, String> {
    let file = open_direct(path, 0)?;
    let mut out = Vec::with_capacity(len as usize);
    let mut buf = Aligned::new(1 << 20);
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(1 << 20) as usize;
        let chunk = &mut buf.get()[..n];
        file.read_exact_at(chunk, at).map_err(e(&format!("read {}", path.display())))?;
        out.extend_from_slice(chunk);
        at += n as u64;
    }
    Ok(out)
}

/// Reads all of a file or device through the page cache.
fn read_all(path: &Path) -> Result<Vec<u8>, String> {
    let io = FileIo::open_read_only(path).map_err(e(&format!("open {}", path.display())))?;
    let len = io.len().map_err(e("length"))?;
    let mut out = vec![0u8; len as usize];
    io.read_at(&mut out, 0).map_err(e(&format!("read {}", path.display())))?;
    Ok(out)
}

fn first_difference(a: &[u8], b: &[u8]) -> String {
    if a.len() != b.len() {
        return format!("lengths differ: {} vs {}", a.len(), b.len());
    }
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => format!("first difference at byte {i} ({:#04x} vs {:#04x})", a[i], b[i]),
        None => "identical".into(),
    }
}

fn same(what: &str, a: &[u8], b: &[u8]) -> TestResult {
    ensure!(a == b, "{what}: {}", first_difference(a, b));
    Ok(())
}

/// Runs a command, failing with its output unless it exits 0.
fn run(program: &str, args: &[&str]) -> TestResult {
    let out = Command::new(program)
        .args(args)
        .env("DM_DISABLE_UDEV", "1")
        .output()
        .map_err(e(&format!("start {program}")))?;
    ensure!(
        out.status.success(),
        "`{program} {}` failed with {}: {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// A pseudo-random but reproducible byte pattern.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The file tree written on the test filesystems: (relative path, contents).
fn file_tree(seed: u64) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for d in 0..6u64 {
        for f in 0..5u64 {
            let n = d * 5 + f;
            let len = 1000 + ((n * 7919 + seed) % 60) as usize * 1024;
            files.push((format!("d{d}/f{f}.bin"), pattern(seed * 1000 + n, len)));
        }
    }
    files
}

fn write_tree(root: &Path, files: &[(String, Vec<u8>)]) -> TestResult {
    for (name, data) in files {
        let path = root.join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(e("mkdir"))?;
        }
        fs::write(&path, data).map_err(e(&format!("write {}", path.display())))?;
    }
    Ok(())
}

fn check_tree(root: &Path, files: &[(String, Vec<u8>)]) -> TestResult {
    for (name, data) in files {
        let got = fs::read(root.join(name)).map_err(e(&format!("read back {name}")))?;
        ensure!(&got == data, "file {name} reads back different: {}", first_difference(&got, data));
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Tests 1-3: one ublk device over a backing device
// ------------------------------------------------------------------------------------------

/// The server of tests 1-3 and what it serves.
struct Rig {
    server: UblkServer,
    tap: Arc<Tap>,
    backing: PathBuf,
    work: PathBuf,
    len: u64,
}

/// Test 1: the device comes up, sized like the backing device, and data written through it
/// (plain, FUA, then a flush) reads back identical through it and from the backing device.
fn test_device_up(backing: &Path, work: &Path) -> Result<Rig, String> {
    let (tap, device) = open_tap(backing, work, CompletionPolicy::Backing)?;
    let len = device.len().map_err(e("length"))?;
    let server =
        UblkServer::start(UblkConfig::default(), tap.clone(), device).map_err(|err| chain(&err))?;
    let rig = Rig { server, tap, backing: backing.into(), work: work.into(), len };
    let dev = rig.server.block_path();
    let dev_len = FileIo::open_read_only(&dev).and_then(|d| d.len()).map_err(e("device size"))?;
    ensure!(dev_len == len, "{} holds {dev_len} bytes, the backing device {len}", dev.display());

    let data = pattern(1, 1 << 20);
    let mut buf = Aligned::new(data.len());
    buf.get().copy_from_slice(&data);
    let file = open_direct(&dev, 0)?;
    file.write_all_at(buf.get(), 0).map_err(e("O_DIRECT write"))?;
    let fua = open_direct(&dev, libc::O_DSYNC)?;
    let mut small = Aligned::new(64 << 10);
    small.get().copy_from_slice(&pattern(2, 64 << 10));
    fua.write_all_at(small.get(), 1 << 20).map_err(e("O_DSYNC write"))?;
    file.sync_all().map_err(e("fsync"))?;

    let through = read_device(&dev, (1 << 20) + (64 << 10))?;
    same("read back through the ublk device", &through[..1 << 20], &data)?;
    same("FUA write read back", &through[1 << 20..], &pattern(2, 64 << 10))?;
    let mut direct = vec![0u8; through.len()];
    File::open(backing).and_then(|f| f.read_exact_at(&mut direct, 0)).map_err(e("read backing"))?;
    same("backing device vs ublk device", &direct, &through)?;
    let stats = rig.server.stats();
    ensure!(stats.fua_writes > 0, "no FUA write reached the server: {stats:?}");
    ensure!(stats.flushes > 0, "no FLUSH reached the server: {stats:?}");
    Ok(rig)
}

/// Test 2: mkfs.ext4 through the device, mount, a file tree, sync, umount, fsck clean,
/// the files read back after a remount, and the device identical to the backing device.
fn test_ext4(rig: &Rig, mnt: &Path) -> TestResult {
    let dev = rig.server.block_path();
    let dev_s = dev.to_str().ok_or("device path")?;
    let mnt_s = mnt.to_str().ok_or("mount path")?;
    fs::create_dir_all(mnt).map_err(e("mkdir mount point"))?;
    run("mkfs.ext4", &["-F", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev_s])?;
    run("mount", &["-t", "ext4", dev_s, mnt_s])?;
    let files = file_tree(7);
    let written = write_tree(mnt, &files);
    run("sync", &[])?;
    run("umount", &[mnt_s])?;
    written?;
    run("e2fsck", &["-fn", dev_s])?;
    run("mount", &["-t", "ext4", "-o", "ro", dev_s, mnt_s])?;
    let checked = check_tree(mnt, &files);
    run("umount", &[mnt_s])?;
    checked?;
    let through = read_device(&dev, rig.len)?;
    let backing = read_all(&rig.backing)?;
    same("backing device vs ublk device after ext4", &backing, &through)?;
    let stats = rig.server.stats();
    ensure!(stats.errors == 0, "requests failed: {stats:?}");
    Ok(())
}

/// Test 3: flush and FUA reached the tap: the spool holds barriers, and replaying it onto a
/// zeroed image gives the backing device byte for byte.
fn test_capture(rig: Rig) -> Result<String, String> {
    let Rig { server, tap, backing, work, len } = rig;
    let stats = server.stats();
    server.stop().map_err(|err| chain(&err))?;
    let tap = Arc::try_unwrap(tap).map_err(|_| "the tap is still shared after stop".to_string())?;
    tap.close().map_err(|err| chain(&err))?;
    let events = spooled_events(&work)?;
    let barriers = events.iter().filter(|e| e.is_point()).count();
    let writes = events.iter().filter(|e| matches!(e, Event::Write { .. })).count();
    ensure!(stats.flushes > 0 && stats.fua_writes > 0, "no flush or FUA request: {stats:?}");
    ensure!(barriers > 0, "no barrier in the spool ({} events)", events.len());
    ring_served_all("tests 1-3", &stats)?;
    let mut image = vec![0u8; len as usize];
    replay(&events, &mut image)?;
    same("spool replay vs backing device", &image, &read_all(&backing)?)?;
    Ok(format!(
        "{} events ({writes} writes, {barriers} barriers); server saw {} writes ({} FUA), {} flushes, {} discards, {} write-zeroes, {} reads, {} backing ops on the rings",
        events.len(),
        stats.writes,
        stats.fua_writes,
        stats.flushes,
        stats.discards,
        stats.write_zeroes,
        stats.reads,
        stats.backing_ops
    ))
}

/// The data path went through the queues' rings: every request served had at least one
/// io_uring op on the backing device (a READ, WRITE, FSYNC or FALLOCATE).
fn ring_served_all(what: &str, stats: &UblkStats) -> TestResult {
    let requests = stats.reads + stats.writes + stats.flushes + stats.discards + stats.write_zeroes;
    ensure!(requests > 0, "{what}: no request served: {stats:?}");
    ensure!(
        stats.backing_ops >= requests,
        "{what}: {} backing io_uring ops for {requests} requests: {stats:?}",
        stats.backing_ops
    );
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Test 4: dm-log-writes
// ------------------------------------------------------------------------------------------

/// A dm-log-writes target over `data` logging to `log`; ext4 and a mark through it; the
/// log read back and replayed: identical to the data device at the end, and at the mark
/// identical to the data device as it was then.
fn test_dm_log_writes(data: &Path, log: &Path, scratch: &Path, mnt: &Path) -> TestResult {
    const NAME: &str = "tidemark-lw";
    let data_len = FileIo::open_read_only(data).and_then(|d| d.len()).map_err(e("data size"))?;
    let table = format!("0 {} log-writes {} {}", data_len / 512, data.display(), log.display());
    run("dmsetup", &["create", NAME, "--table", &table])?;
    let outcome = (|| -> TestResult {
        let dev = PathBuf::from(format!("/dev/mapper/{NAME}"));
        let dev_s = dev.to_str().ok_or("device path")?;
        let mnt_s = mnt.to_str().ok_or("mount path")?;
        fs::create_dir_all(mnt).map_err(e("mkdir mount point"))?;
        // The filesystem leaves the last 8 MiB for raw writes after the mark.
        let fs_kib = (data_len >> 10) - 8192;
        run("mkfs.ext4", &["-F", "-q", dev_s, &format!("{fs_kib}k")])?;
        run("mount", &["-t", "ext4", dev_s, mnt_s])?;
        let written = write_tree(mnt, &file_tree(11));
        run("sync", &[])?;
        run("umount", &[mnt_s])?;
        written?;
        let at_mark = read_device(&dev, data_len)?;
        run("dmsetup", &["message", NAME, "0", "mark", "lab-mark"])?;
        let raw = open_direct(&dev, 0)?;
        let mut buf = Aligned::new(256 << 10);
        for i in 0..4u64 {
            buf.get().copy_from_slice(&pattern(100 + i, 256 << 10));
            raw.write_all_at(buf.get(), data_len - (8 << 20) + i * (1 << 20))
                .map_err(e("raw write"))?;
            raw.sync_all().map_err(e("fsync"))?;
        }
        drop(raw);
        let end = read_device(&dev, data_len)?;
        run("dmsetup", &["remove", NAME])?;

        let log_io = FileIo::open_read_only(log).map_err(e("open log"))?;
        let dmlog = DmLog::open(&log_io).map_err(|err| chain(&err))?;
        let replayed = scratch.join("replay.img");
        let target = FileIo::create(&replayed, data_len).map_err(e("replay image"))?;
        let report = dmlog.replay_to(&ReplayPoint::End, &target).map_err(|err| chain(&err))?;
        ensure!(report.flush_points > 0, "no flush point in the log: {report:?}");
        same("replay to the end vs data device", &read_all(&replayed)?, &end)?;
        same("data device vs what was written through the target", &read_all(data)?, &end)?;
        run("e2fsck", &["-fn", replayed.to_str().ok_or("path")?])?;

        let target = FileIo::create(&replayed, data_len).map_err(e("replay image"))?;
        dmlog
            .replay_to(&ReplayPoint::Mark("lab-mark".into()), &target)
            .map_err(|err| chain(&err))?;
        same("replay to the mark vs the device at the mark", &read_all(&replayed)?, &at_mark)?;
        fs::remove_file(&replayed).map_err(e("remove replay image"))?;
        println!(
            "{PREFIX} info dm-log-writes: {} entries, {} flush points, {} marks replayed",
            report.entries, report.flush_points, report.marks
        );
        Ok(())
    })();
    if outcome.is_err() {
        let _ = run("umount", &[mnt.to_str().unwrap_or("/")]);
        let _ = run("dmsetup", &["remove", NAME]);
    }
    outcome
}

// ------------------------------------------------------------------------------------------
// Test 5: kill -9 of the server mid-write, user recovery
// ------------------------------------------------------------------------------------------

/// `serve --backing PATH --work DIR [--recover DEV_ID]`: a ublk server in this process,
/// spooling durably before completing each write. Prints `READY <dev_id>`, serves until
/// its standard input closes, then removes the device and prints `STOPPED`.
fn serve_main(args: &[String]) -> ExitCode {
    let mut backing = None;
    let mut work = None;
    let mut recover = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--backing" => backing = it.next().map(PathBuf::from),
            "--work" => work = it.next().map(PathBuf::from),
            "--recover" => recover = it.next().and_then(|s| s.parse::<u32>().ok()),
            other => {
                eprintln!("serve: unknown argument {other}");
                return ExitCode::FAILURE;
            }
        }
    }
    let (Some(backing), Some(work)) = (backing, work) else {
        eprintln!("serve: needs --backing and --work");
        return ExitCode::FAILURE;
    };
    let served = (|| -> TestResult {
        let (tap, device) = open_tap(&backing, &work, CompletionPolicy::Spooled)?;
        let server = match recover {
            Some(id) => UblkServer::recover(id, UblkConfig::default(), tap.clone(), device),
            None => UblkServer::start(UblkConfig::default(), tap.clone(), device),
        }
        .map_err(|err| chain(&err))?;
        println!("READY {}", server.dev_id());
        std::io::stdout().flush().map_err(e("stdout"))?;
        let mut line = String::new();
        while std::io::stdin().read_line(&mut line).map_err(e("stdin"))? > 0 {
            line.clear();
        }
        server.stop().map_err(|err| chain(&err))?;
        let tap = Arc::try_unwrap(tap).map_err(|_| "tap still shared".to_string())?;
        tap.close().map_err(|err| chain(&err))?;
        println!("STOPPED");
        Ok(())
    })();
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            println!("ERROR {err}");
            ExitCode::FAILURE
        }
    }
}

/// A server child and its announced device number.
fn spawn_server(
    backing: &Path,
    work: &Path,
    recover: Option<u32>,
) -> Result<(Child, u32, BufReader<std::process::ChildStdout>), String> {
    let exe = env::current_exe().map_err(e("current exe"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("serve").arg("--backing").arg(backing).arg("--work").arg(work);
    if let Some(id) = recover {
        cmd.arg("--recover").arg(id.to_string());
    }
    let mut child =
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().map_err(e("spawn server"))?;
    let mut out = BufReader::new(child.stdout.take().ok_or("no stdout")?);
    let mut line = String::new();
    out.read_line(&mut line).map_err(e("server output"))?;
    let id = line.strip_prefix("READY ").and_then(|s| s.trim().parse::<u32>().ok());
    match id {
        Some(id) => Ok((child, id, out)),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!("server did not start: {}", line.trim()))
        }
    }
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> TestResult {
    let start = Instant::now();
    while !done() {
        ensure!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Test 5: a writer streams 64 KiB O_DIRECT writes through the device; the server is
/// killed with SIGKILL mid-stream; the device stays and the writer waits; a new server
/// process reattaches (user recovery). Every write completes, reads back whole (not torn)
/// through the device and from the backing device, is in the spool, and the write-intent
/// map marks only the regions written.
fn test_recovery(backing: &Path, work: &Path) -> Result<String, String> {
    // 64 KiB writes, so that a torn write (part old, part new) would show.
    const WRITE: usize = 64 << 10;
    const WRITES: u64 = 96;
    const KILL_AFTER: u64 = 40;
    let block = |i: u64| {
        let mut b = pattern(5000 + i, WRITE);
        b[..8].copy_from_slice(&i.to_le_bytes());
        b
    };
    let (mut first, dev_id, _out) = spawn_server(backing, work, None)?;
    let dev = PathBuf::from(format!("{}{dev_id}", ublk::sys::BLOCK_PREFIX));
    let progress = Arc::new(AtomicU64::new(0));
    let writer = {
        let (dev, progress) = (dev.clone(), progress.clone());
        thread::spawn(move || -> TestResult {
            let file = open_direct(&dev, 0)?;
            let mut buf = Aligned::new(WRITE);
            for i in 0..WRITES {
                buf.get().copy_from_slice(&block(i));
                file.write_all_at(buf.get(), i * WRITE as u64)
                    .map_err(e(&format!("write {i} (acknowledged so far: {i})")))?;
                progress.store(i + 1, Ordering::Release);
            }
            file.sync_all().map_err(e("fsync"))
        })
    };
    let waited = wait_until("the first writes", Duration::from_secs(60), || {
        progress.load(Ordering::Acquire) >= KILL_AFTER || writer.is_finished()
    });
    first.kill().map_err(e("kill -9 the server"))?;
    first.wait().map_err(e("reap the server"))?;
    let acked_at_kill = progress.load(Ordering::Acquire);
    waited?;
    // Without a server the device stays and its I/O waits: once the driver has noticed the
    // death (the device is quiesced), nothing has completed and nothing has failed.
    let control = Path::new(ublk::sys::CONTROL_PATH);
    let mut state = None;
    wait_until("the driver to quiesce the device", Duration::from_secs(60), || {
        state = ublk::device_info(control, dev_id).ok().map(|info| info.state);
        state == Some(ublk::sys::S_DEV_QUIESCED)
    })
    .map_err(|err| format!("{err} (last state {state:?})"))?;
    ensure!(
        !writer.is_finished() && progress.load(Ordering::Acquire) == acked_at_kill,
        "I/O did not wait for the new server: {} writes done, writer finished: {}",
        progress.load(Ordering::Acquire),
        writer.is_finished()
    );
    let (mut second, second_id, mut out) = spawn_server(backing, work, Some(dev_id))?;
    let recovered_at = progress.load(Ordering::Acquire);
    ensure!(second_id == dev_id, "recovered device {second_id}, expected {dev_id}");
    let finished =
        wait_until("the writer after recovery", Duration::from_secs(120), || writer.is_finished());
    let result = match finished {
        Ok(()) => writer.join().map_err(|_| "writer panicked".to_string()).and_then(|r| r),
        Err(err) => Err(err),
    };
    let expected: Vec<u8> = (0..WRITES).flat_map(block).collect();
    let checked = result.and_then(|()| {
        let through = read_device(&dev, WRITES * WRITE as u64)?;
        same("writes read back through the recovered device", &through, &expected)
    });
    drop(second.stdin.take());
    let mut line = String::new();
    let _ = out.read_line(&mut line);
    let status = second.wait().map_err(e("wait for the second server"))?;
    checked?;
    ensure!(
        status.success() && line.trim() == "STOPPED",
        "second server ended with {status}: {}",
        line.trim()
    );
    let mut on_backing = vec![0u8; expected.len()];
    File::open(backing)
        .and_then(|f| f.read_exact_at(&mut on_backing, 0))
        .map_err(e("read backing"))?;
    same("backing device after recovery", &on_backing, &expected)?;

    // Every write is in the spool (the servers complete a write once it is spooled durably);
    // a write in flight at the kill may be there twice (re-issued), with the same data.
    let events = spooled_events(work)?;
    for event in &events {
        if let Event::Write { offset, data, .. } = event {
            ensure!(
                offset + data.len() as u64 <= expected.len() as u64,
                "unexpected write at {offset}+{} in the spool",
                data.len()
            );
        }
    }
    let mut image = vec![0u8; expected.len()];
    replay(&events, &mut image)?;
    same("spool replay after the crash", &image, &expected)?;
    let spooled_writes = events.iter().filter(|e| matches!(e, Event::Write { .. })).count();

    let device_len =
        FileIo::open_read_only(backing).and_then(|d| d.len()).map_err(e("backing length"))?;
    let map_io: Arc<dyn BlockIo> =
        Arc::new(FileIo::open(work.join("intent.map")).map_err(e("intent map"))?);
    let (_map, report) =
        IntentMap::open(map_io, device_len, intent_cfg()).map_err(|err| chain(&err))?;
    let written_regions = (WRITES * WRITE as u64).div_ceil(REGION);
    ensure!(
        report.dirty.contains_range(0, written_regions)
            && report.dirty.region_count() == written_regions,
        "write-intent map after the crash marks {:?}, expected regions 0..{written_regions}",
        report.dirty
    );
    Ok(format!(
        "killed after {acked_at_kill} acknowledged writes, {recovered_at} done when the new server attached; {spooled_writes} writes spooled for {WRITES} issued; {} region(s) to resync",
        report.dirty.region_count()
    ))
}

// ------------------------------------------------------------------------------------------
// Test 6: many requests in flight on one queue
// ------------------------------------------------------------------------------------------

/// A small xorshift generator, so that the load is reproducible per thread.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Test 6: one queue (depth 64, 8 workers) under a load of eight O_DIRECT threads: writes
/// of 4 to 128 KiB at random offsets of a shared 16 MiB area (they overlap each other),
/// an fsync every eight writes, and in each thread's private 1 MiB area a write read back
/// and compared at once. Rounds of load run until the server reports that requests of the
/// queue were served concurrently (max in-flight >= 2; a deadline only fails the test).
/// Then the spool replayed over the area as it was before equals the device, which holds
/// only if overlapping writes reached the device and the spool in the same order.
fn test_queue_depth(backing: &Path, work: &Path) -> Result<String, String> {
    const SHARED: u64 = 16 << 20;
    const PRIVATE: u64 = 1 << 20;
    const THREADS: u64 = 8;
    const WRITES: u64 = 24;
    const AREA: u64 = SHARED + THREADS * PRIVATE;
    let before = read_device(backing, AREA)?;
    let (tap, device) = open_tap(backing, work, CompletionPolicy::Spooled)?;
    let config = UblkConfig { queues: 1, depth: 64, ..UblkConfig::default() };
    let server = UblkServer::start(config, tap.clone(), device).map_err(|err| chain(&err))?;
    let dev = server.block_path();
    let started = Instant::now();
    let mut rounds = 0u64;
    let loaded = loop {
        rounds += 1;
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let dev = dev.clone();
                let seed = rounds * 1000 + t;
                thread::spawn(move || -> TestResult {
                    let file = open_direct(&dev, 0)?;
                    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
                    let mut buf = Aligned::new(128 << 10);
                    let mut back = Aligned::new(128 << 10);
                    for i in 0..WRITES {
                        let len = (1 + rng.below(32)) as usize * BLOCK;
                        let at = rng.below((SHARED - len as u64) / BLOCK as u64) * BLOCK as u64;
                        buf.get()[..len].copy_from_slice(&pattern(seed * 100 + i, len));
                        file.write_all_at(&buf.get()[..len], at).map_err(e("shared write"))?;
                        let mine =
                            SHARED + t * PRIVATE + rng.below(PRIVATE / (128 << 10)) * (128 << 10);
                        buf.get()[..len].copy_from_slice(&pattern(seed * 100 + i + 50, len));
                        file.write_all_at(&buf.get()[..len], mine).map_err(e("private write"))?;
                        file.read_exact_at(&mut back.get()[..len], mine)
                            .map_err(e("private read"))?;
                        ensure!(
                            back.get()[..len] == buf.get()[..len],
                            "thread {t} write {i}: {len} bytes at {mine} read back different: {}",
                            first_difference(&back.get()[..len], &buf.get()[..len])
                        );
                        if i % 8 == 7 {
                            file.sync_all().map_err(e("fsync"))?;
                        }
                    }
                    file.sync_all().map_err(e("fsync"))
                })
            })
            .collect();
        let mut failed = None;
        for handle in threads {
            let outcome = handle.join().unwrap_or_else(|_| Err("a load thread panicked".into()));
            if let Err(err) = outcome {
                failed.get_or_insert(err);
            }
        }
        if let Some(err) = failed {
            break Err(err);
        }
        let stats = server.stats();
        if stats.max_in_flight >= 2 {
            break Ok(stats);
        }
        if started.elapsed() > Duration::from_secs(180) {
            break Err(format!(
                "after {rounds} rounds no two requests of the queue were served at once: {stats:?}"
            ));
        }
    };
    let per_queue = server.max_in_flight_per_queue();
    let stopped = server.stop().map_err(|err| chain(&err));
    let stats = loaded?;
    stopped?;
    ensure!(stats.errors == 0, "requests failed: {stats:?}");
    ring_served_all("test 6", &stats)?;
    let tap = Arc::try_unwrap(tap).map_err(|_| "the tap is still shared after stop".to_string())?;
    tap.close().map_err(|err| chain(&err))?;

    let events = spooled_events(work)?;
    let mut image = before;
    replay(&events, &mut image)?;
    same("spool replayed over the area vs the device", &image, &read_device(backing, AREA)?)?;
    let barriers = events.iter().filter(|e| e.is_point()).count();
    ensure!(barriers > 0, "no barrier in the spool ({} events)", events.len());
    Ok(format!(
        "{rounds} round(s) of {THREADS} threads; max in flight per queue {per_queue:?} (depth 64, one ring); {} writes, {} flushes, {} reads; {} events replayed",
        stats.writes,
        stats.flushes,
        stats.reads,
        events.len()
    ))
}

// ------------------------------------------------------------------------------------------
// Drivers
// ------------------------------------------------------------------------------------------

/// Runs `f`, catching panics, printing a PASS or FAIL line; returns whether it passed.
fn report<T>(name: &str, f: impl FnOnce() -> Result<T, String>) -> Option<T> {
    let start = Instant::now();
    let outcome =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "panic".into());
            Err(format!("panicked: {text}"))
        });
    let secs = start.elapsed().as_secs_f64();
    match outcome {
        Ok(value) => {
            println!("{PREFIX} PASS {name} ({secs:.1}s)");
            Some(value)
        }
        Err(err) => {
            println!("{PREFIX} FAIL {name} ({secs:.1}s): {err}");
            None
        }
    }
}

fn lab_main() -> ExitCode {
    let work = PathBuf::from("/tmp/lab");
    let _ = fs::remove_dir_all(&work);
    let mut passed = 0;
    let mut total = 0;
    let mut tally = |ok: bool| {
        total += 1;
        if ok {
            passed += 1;
        }
    };

    let rig = report("ublk_device_up", || test_device_up(Path::new("/dev/vda"), &work.join("t1")));
    tally(rig.is_some());
    let ext4 = report("ublk_ext4_mkfs_mount_fsck", || match &rig {
        Some(rig) => test_ext4(rig, &work.join("mnt")),
        None => Err("needs ublk_device_up".into()),
    });
    tally(ext4.is_some());
    let capture = report("ublk_flush_fua_captured_and_replayed", || match rig {
        Some(rig) => test_capture(rig),
        None => Err("needs ublk_device_up".into()),
    });
    if let Some(info) = &capture {
        println!("{PREFIX} info capture: {info}");
    }
    tally(capture.is_some());
    let dm = report("dm_log_writes_replay", || {
        fs::create_dir_all(work.join("t4")).map_err(e("mkdir"))?;
        test_dm_log_writes(
            Path::new("/dev/vdb"),
            Path::new("/dev/vdc"),
            &work.join("t4"),
            &work.join("mnt4"),
        )
    });
    tally(dm.is_some());
    let recovery = report("ublk_kill9_user_recovery", || {
        test_recovery(Path::new("/dev/vdd"), &work.join("t5"))
    });
    if let Some(info) = &recovery {
        println!("{PREFIX} info recovery: {info}");
    }
    tally(recovery.is_some());
    let depth = report("ublk_queue_depth_concurrent_requests", || {
        test_queue_depth(Path::new("/dev/vda"), &work.join("t6"))
    });
    if let Some(info) = &depth {
        println!("{PREFIX} info queue depth: {info}");
    }
    tally(depth.is_some());

    if passed == total {
        println!("{PREFIX} PASS {total} tests");
        ExitCode::SUCCESS
    } else {
        println!("{PREFIX} FAIL {} of {total} tests", total - passed);
        ExitCode::FAILURE
    }
}

fn host_main() -> ExitCode {
    let control = Path::new(ublk::sys::CONTROL_PATH);
    if let Err(err) = ublk::probe(control) {
        let rule = "!".repeat(78);
        eprintln!(
            "\n{rule}\n!!! SKIPPED: no ublk_drv on this kernel (run cargo xtask lab)\n!!! ({})\n{rule}\n",
            chain(&err)
        );
        println!("ublk_lab: SKIPPED (no ublk_drv on this kernel; run cargo xtask lab)");
        return ExitCode::SUCCESS;
    }
    // A host with ublk_drv: the tests that need only a ublk device, over a temporary file.
    let dir = match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(err) => {
            eprintln!("ublk_lab: tempdir: {err}");
            return ExitCode::FAILURE;
        }
    };
    let backing = dir.path().join("backing.img");
    if let Err(err) = FileIo::create(&backing, 64 << 20) {
        eprintln!("ublk_lab: backing file: {err}");
        return ExitCode::FAILURE;
    }
    let rig = report("ublk_device_up", || test_device_up(&backing, &dir.path().join("t1")));
    let ok1 = rig.is_some();
    let capture = report("ublk_flush_fua_captured_and_replayed", || match rig {
        Some(rig) => test_capture(rig),
        None => Err("needs ublk_device_up".into()),
    });
    if ok1 && capture.is_some() {
        println!("2 passed, 0 failed");
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
