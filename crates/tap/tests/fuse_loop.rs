//! The FUSE + loop frontend against the real kernel: block requests at `/dev/loopN` reach
//! the tap as the module documentation's table says; ext4 made, filled, checked and
//! unmounted through it leaves a capture stream that replays to the protected device byte
//! for byte, with barriers and discards; an fsync in ext4 puts a barrier after the file's
//! data; a crashed agent's (kill -9) dead mount is cleared by the next start, only the
//! regions it wrote are dirty, and an application filesystem still mounted on the dead
//! device gets I/O errors without blocking the restart; a live mount is not mounted over; a
//! teardown with the device still in use aborts and says so. An ignored test measures
//! throughput against a plain loop device.
//!
//! These need root, `/dev/fuse` and loop devices. Where they are missing each test prints a
//! loud SKIPPED line and returns; CI runs them as root.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tempfile::TempDir;
use tidemark_journal::{
    Dir, Event, FileIo, FsDir, Seq, Spool, SpoolConfig, SpooledEvent, SystemClock,
};
use tidemark_tap::{
    FuseLoopConfig, FuseLoopFrontend, IntentConfig, IntentMap, LoopDevice, LoopOptions, Tap,
    TapConfig, TapError,
};

const REGION: u64 = 1 << 20;
const MIB: u64 = 1 << 20;

/// True when this process can mount FUSE and attach loop devices; otherwise prints a loud
/// SKIPPED line (straight to stderr: the harness captures `eprintln!`).
fn privileged(test: &str) -> bool {
    let root = fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
    let fuse = Path::new("/dev/fuse").exists();
    let loop_ctl = Path::new("/dev/loop-control").exists();
    if root && fuse && loop_ctl {
        return true;
    }
    let _ = writeln!(
        std::io::stderr(),
        "\n==============================================================\n\
         SKIPPED: needs root and /dev/fuse ({test}): root={root} /dev/fuse={fuse} \
         /dev/loop-control={loop_ctl}\n\
         =============================================================="
    );
    false
}

/// True when the ext4 tools are installed; otherwise a loud SKIPPED line.
fn have_e2fsprogs(test: &str) -> bool {
    let ok = ["mkfs.ext4", "e2fsck"]
        .iter()
        .all(|tool| cmd(tool).arg("-V").output().is_ok_and(|o| o.status.success()));
    if !ok {
        let _ = writeln!(
            std::io::stderr(),
            "\n==============================================================\n\
             SKIPPED: mkfs.ext4/e2fsck not installed ({test}); install Debian's e2fsprogs\n\
             =============================================================="
        );
    }
    ok
}

/// Runs a command, failing the test with its output when it fails; returns its stdout.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A command found on PATH or in the sbin directories (where mkfs.ext4, e2fsck and
/// blkdiscard live), whatever PATH the test harness got.
fn cmd(program: &str) -> Command {
    let path = std::env::var("PATH").unwrap_or_default();
    let mut c = Command::new(program);
    c.env("PATH", format!("{path}:/usr/local/sbin:/usr/sbin:/sbin"));
    c
}

/// A tap over a file-backed protected device, with its spool and intent map, in a temp dir.
struct Rig {
    dir: PathBuf,
    device: PathBuf,
    tap: Arc<Tap>,
}

fn open_tap(
    dir: &Path,
    device_bytes: u64,
    create: bool,
    region_bytes: u64,
) -> (Arc<Tap>, tidemark_tap::IntentOpenReport) {
    let device = dir.join("device.img");
    let io = if create {
        FileIo::create(&device, device_bytes).expect("create device")
    } else {
        FileIo::open(&device).expect("open device")
    };
    let (spool, _) = Spool::open(
        Arc::new(FsDir::new(dir.join("spool")).expect("spool dir")),
        SpoolConfig { capacity_bytes: 4 << 30, segment_bytes: 64 << 20, key: None },
        Arc::new(SystemClock),
    )
    .expect("spool");
    let map = FsDir::new(dir).expect("dir").open("intent.map", true).expect("intent map file");
    let cfg = IntentConfig {
        region_bytes,
        max_hot_regions: (device_bytes / region_bytes) as u32 + 1,
        max_runs: 1024,
    };
    let (intent, report) = IntentMap::open(map, device_bytes, cfg).expect("intent map");
    let tap = Tap::new(Arc::new(io), spool, intent, TapConfig::default()).expect("tap");
    (Arc::new(tap), report)
}

impl Rig {
    fn new(dir: &Path, device_bytes: u64) -> Rig {
        Self::with_regions(dir, device_bytes, REGION)
    }

    fn with_regions(dir: &Path, device_bytes: u64, region_bytes: u64) -> Rig {
        let (tap, _) = open_tap(dir, device_bytes, true, region_bytes);
        Rig { dir: dir.to_path_buf(), device: dir.join("device.img"), tap }
    }

    fn start(&self) -> FuseLoopFrontend {
        let mut cfg = FuseLoopConfig::new(self.dir.join("mnt"));
        cfg.shutdown_timeout = Duration::from_secs(10);
        FuseLoopFrontend::start(self.tap.clone(), cfg).expect("start FUSE + loop frontend")
    }

    /// Every event in the spool (synced first).
    fn events(&self) -> Vec<SpooledEvent> {
        let durable = self.tap.sync_spool().expect("sync spool");
        assert_eq!(durable, self.tap.status().last_seq);
        self.tap.read_after(Seq::ZERO, u64::MAX).expect("read spool")
    }
}

/// Applies `events` to a zeroed image of `len` bytes.
fn replay(events: &[SpooledEvent], len: u64) -> Vec<u8> {
    let mut img = vec![0u8; len as usize];
    for e in events {
        match &e.event {
            Event::Write { offset, data, .. } => {
                img[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
            }
            Event::WriteZeroes { offset, len, .. } | Event::Discard { offset, len, .. } => {
                img[*offset as usize..(*offset + u64::from(*len)) as usize].fill(0);
            }
            Event::Barrier
            | Event::Bookmark(_)
            | Event::ResyncBegin { .. }
            | Event::ResyncEnd { .. }
            | Event::Resize { .. } => {}
        }
    }
    img
}

/// Index of the first differing byte.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y).or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

/// A filesystem mounted on a loop device, unmounted on drop (lazily if busy), so that a
/// failing test never leaves the loop device pinned.
struct FsMount {
    point: PathBuf,
    mounted: bool,
}

impl FsMount {
    fn new(device: &Path, point: &Path, options: &str) -> FsMount {
        fs::create_dir_all(point).expect("mount point");
        run(cmd("mount").args(["-t", "ext4", "-o", options]).arg(device).arg(point));
        FsMount { point: point.to_path_buf(), mounted: true }
    }

    fn unmount(&mut self) {
        if self.mounted {
            self.mounted = false;
            run(cmd("umount").arg(&self.point));
        }
    }
}

impl Drop for FsMount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = cmd("umount").arg(&self.point).status();
            let _ = cmd("umount").arg("-l").arg(&self.point).status();
        }
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

fn sysfs(device: &Path, attr: &str) -> String {
    let name = device.file_name().expect("device name").to_string_lossy().into_owned();
    fs::read_to_string(format!("/sys/block/{name}/{attr}"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|e| format!("<{e}>"))
}

fn count(events: &[SpooledEvent], pred: impl Fn(&Event) -> bool) -> usize {
    events.iter().filter(|e| pred(&e.event)).count()
}

/// dd, direct I/O, to or from the loop device.
fn dd(args: &[&str]) {
    run(cmd("dd").args(args).arg("status=none"));
}

/// The events captured while `f` ran (the spool is synced to read them).
fn captured_during(rig: &Rig, f: impl FnOnce()) -> Vec<Event> {
    let before = rig.tap.status().last_seq;
    f();
    let after = rig.tap.status().last_seq;
    rig.tap.sync_spool().expect("sync spool");
    rig.tap
        .read_after(before, u64::MAX)
        .expect("read spool")
        .into_iter()
        .filter(|e| e.seq <= after)
        .map(|e| e.event)
        .collect()
}

/// Events as short strings: `W offset+len`, `Z offset+len`, `D offset+len`, `B`.
fn shapes(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e {
            Event::Write { offset, data, .. } => format!("W {offset}+{}", data.len()),
            Event::WriteZeroes { offset, len, .. } => format!("Z {offset}+{len}"),
            Event::Discard { offset, len, .. } => format!("D {offset}+{len}"),
            Event::Barrier => "B".into(),
            Event::Bookmark(b) => format!("M {}", b.name),
            Event::ResyncBegin { id } => format!("RB {id}"),
            Event::ResyncEnd { id } => format!("RE {id}"),
            Event::Resize { new_size, .. } => format!("S {new_size}"),
        })
        .collect()
}

/// Writes of one event list merged into one range per run of adjacent writes.
fn written_ranges(events: &[Event]) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Write { offset, data, .. } => Some((*offset, *offset + data.len() as u64)),
            _ => None,
        })
        .collect();
    ranges.sort();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in ranges {
        match merged.last_mut() {
            Some(last) if last.1 == s => last.1 = e,
            _ => merged.push((s, e)),
        }
    }
    merged
}

#[test]
fn loop_requests_reach_the_tap_as_documented() {
    if !privileged("loop_requests_reach_the_tap_as_documented") {
        return;
    }
    let tmp = TempDir::new().expect("tmp");
    let rig = Rig::new(tmp.path(), 16 * MIB);
    let frontend = rig.start();
    let dev = frontend.device_path().expect("loop device").to_path_buf();
    let loop_dev = frontend.loop_device().expect("loop device");
    println!(
        "{}: dio={} (asked true, handle says {}), queue: fua={} write_cache={:?} \
         discard_max_bytes={} discard_granularity={} write_zeroes_max_bytes={} \
         logical_block_size={}",
        dev.display(),
        sysfs(&dev, "loop/dio"),
        loop_dev.direct_io(),
        sysfs(&dev, "queue/fua"),
        sysfs(&dev, "queue/write_cache"),
        sysfs(&dev, "queue/discard_max_bytes"),
        sysfs(&dev, "queue/discard_granularity"),
        sysfs(&dev, "queue/write_zeroes_max_bytes"),
        sysfs(&dev, "queue/logical_block_size"),
    );
    assert_eq!(sysfs(&dev, "size"), (16 * MIB / 512).to_string(), "device size in sectors");
    assert_eq!(sysfs(&dev, "queue/fua"), "0", "loop over a file has no FUA (the table says so)");
    let of = format!("of={}", dev.display());
    let data = pattern(1, 256 << 10);
    let input = tmp.path().join("input");
    fs::write(&input, &data).expect("input");
    let inp = format!("if={}", input.display());

    // WRITE, then FLUSH (dd's fsync of a block device issues REQ_OP_FLUSH): the writes,
    // then a barrier.
    let step = captured_during(&rig, || {
        dd(&[&inp, &of, "bs=64K", "seek=4", "oflag=direct", "conv=fsync,notrunc"])
    });
    println!("write + fsync: {:?}", shapes(&step));
    assert_eq!(
        written_ranges(&step),
        vec![(256 << 10, 512 << 10)],
        "every byte, before fsync returned"
    );
    assert_eq!(step.last(), Some(&Event::Barrier), "the flush's barrier after the writes");

    // WRITE with FUA (O_DSYNC on a block device): the block layer sends the write, then a
    // flush, since loop has no FUA.
    let step = captured_during(&rig, || {
        dd(&[&inp, &of, "bs=64K", "count=1", "seek=96", "oflag=direct,dsync", "conv=notrunc"])
    });
    println!("FUA write: {:?}", shapes(&step));
    assert_eq!(shapes(&step), vec![format!("W {}+65536", 6 * MIB), "B".to_owned()]);

    // DISCARD -> fallocate(PUNCH_HOLE | KEEP_SIZE) -> discard.
    let step = captured_during(&rig, || {
        run(cmd("blkdiscard").args(["-o", "1048576", "-l", "1048576"]).arg(&dev));
    });
    println!("BLKDISCARD: {:?}", shapes(&step));
    assert_eq!(shapes(&step), vec![format!("D {MIB}+{MIB}")]);

    // WRITE_ZEROES with REQ_NOUNMAP (BLKZEROOUT) -> fallocate(ZERO_RANGE) -> write-zeroes.
    let step = captured_during(&rig, || {
        run(cmd("blkdiscard").args(["-z", "-o", "2097152", "-l", "1048576"]).arg(&dev));
    });
    println!("BLKZEROOUT: {:?}", shapes(&step));
    assert_eq!(shapes(&step), vec![format!("Z {}+{MIB}", 2 * MIB)]);

    // WRITE_ZEROES without REQ_NOUNMAP (fallocate(PUNCH_HOLE) on the block device) ->
    // fallocate(PUNCH_HOLE | KEEP_SIZE) on the file -> discard.
    let step = captured_during(&rig, || {
        run(cmd("fallocate").args(["-p", "-o", "3145728", "-l", "1048576"]).arg(&dev));
    });
    println!("fallocate -p on the device: {:?}", shapes(&step));
    // (fallocate(2) on the block device is followed by a flush on Linux 6.18.)
    let got = shapes(&step);
    assert_eq!(got[0], format!("D {}+{MIB}", 3 * MIB));
    assert!(got[1..].iter().all(|e| e == "B"), "{got:?}");

    // Reads come back from the device.
    let readback = tmp.path().join("readback");
    dd(&[
        &format!("if={}", dev.display()),
        &format!("of={}", readback.display()),
        "bs=64K",
        "skip=4",
        "count=4",
        "iflag=direct",
    ]);
    assert!(fs::read(&readback).expect("readback") == data, "read through the loop device");
    let counters = frontend.counters();
    println!("{counters:?}");
    frontend.shutdown().expect("clean shutdown");

    assert_eq!((counters.punch_holes, counters.zero_ranges, counters.errors), (2, 1, 0));
    assert!(counters.fsyncs >= 2);
    let events = rig.events();
    let device = fs::read(&rig.device).expect("device");
    assert!(device[256 << 10..512 << 10] == data[..], "the write reached the protected device");
    assert!(replay(&events, 16 * MIB) == device, "replay equals the device");
}

#[test]
fn ext4_through_the_frontend_replays_to_the_device_byte_for_byte() {
    let test = "ext4_through_the_frontend_replays_to_the_device_byte_for_byte";
    if !privileged(test) || !have_e2fsprogs(test) {
        return;
    }
    const SIZE: u64 = 64 * MIB;
    let tmp = TempDir::new().expect("tmp");
    let rig = Rig::new(tmp.path(), SIZE);
    let frontend = rig.start();
    let dev = frontend.device_path().expect("loop device").to_path_buf();

    // mkfs discards the device first (no -E nodiscard).
    run(cmd("mkfs.ext4").args(["-q", "-F", "-b", "4096"]).arg(&dev));
    let after_mkfs = rig.tap.status().last_seq;
    let mut mount = FsMount::new(&dev, &tmp.path().join("ext4"), "discard");
    let root = tmp.path().join("ext4");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut total = 0usize;
    for d in 0..4 {
        let sub = root.join(format!("dir{d}/nested"));
        fs::create_dir_all(&sub).expect("dirs");
        for f in 0..25 {
            let len = rng.gen_range(1..=12 << 10);
            fs::write(sub.join(format!("small{f}")), pattern(d * 100 + f, len)).expect("small");
            total += len;
        }
    }
    for f in 0..3u64 {
        fs::write(root.join(format!("big{f}")), pattern(1000 + f, MIB as usize)).expect("big");
        total += MIB as usize;
    }
    fs::write(root.join("odd"), pattern(2000, (2 * MIB + 12345) as usize)).expect("odd");
    total += (2 * MIB + 12345) as usize;
    // Overwrite part of a file, delete another (online discard of its blocks at commit).
    let f = OpenOptions::new().write(true).open(root.join("big1")).expect("open big1");
    f.write_all_at(&pattern(3000, 300_000), 123_456).expect("overwrite");
    f.sync_all().expect("fsync big1");
    drop(f);
    // big2 reaches the disk before it is deleted, so that its blocks are discarded.
    run(cmd("sync").arg("-f").arg(&root));
    fs::remove_file(root.join("big2")).expect("remove");
    run(cmd("sync").arg("-f").arg(&root));
    mount.unmount();
    let fsck = cmd("e2fsck").arg("-fn").arg(&dev).output().expect("e2fsck");
    assert!(
        fsck.status.success(),
        "e2fsck -fn found problems:\n{}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let counters = frontend.counters();
    println!("wrote {total} bytes of files; {counters:?}");
    frontend.shutdown().expect("clean shutdown");

    let status = rig.tap.status();
    assert!(status.overflow.is_none(), "the spool never overflowed: {:?}", status.overflow);
    let events = rig.events();
    let device = fs::read(&rig.device).expect("device");
    let image = replay(&events, SIZE);
    assert!(
        first_difference(&image, &device).is_none(),
        "replayed stream differs from the protected device at byte {:?}",
        first_difference(&image, &device)
    );
    let barriers = count(&events, |e| *e == Event::Barrier);
    let discards = count(&events, |e| matches!(e, Event::Discard { .. }));
    let zeroes = count(&events, |e| matches!(e, Event::WriteZeroes { .. }));
    let writes = count(&events, |e| matches!(e, Event::Write { .. }));
    let discards_after_mkfs = events
        .iter()
        .filter(|e| e.seq > after_mkfs && matches!(e.event, Event::Discard { .. }))
        .count();
    println!(
        "{} events: {writes} writes, {barriers} barriers, {discards} discards \
         ({discards_after_mkfs} after mkfs, from online discard), {zeroes} write-zeroes",
        events.len()
    );
    assert!(barriers > 0, "ext4 journal commits and syncs issue flushes");
    assert!(discards + zeroes > 0, "mkfs discards the device");
    assert!(discards_after_mkfs > 0, "ext4's online discard of the deleted file's blocks");
    assert!(counters.fsyncs > 0 && counters.punch_holes > 0);
    assert_eq!(counters.errors, 0);
}

#[test]
fn fsync_in_ext4_puts_a_barrier_after_the_file_data() {
    let test = "fsync_in_ext4_puts_a_barrier_after_the_file_data";
    if !privileged(test) || !have_e2fsprogs(test) {
        return;
    }
    let tmp = TempDir::new().expect("tmp");
    let rig = Rig::new(tmp.path(), 64 * MIB);
    let frontend = rig.start();
    let dev = frontend.device_path().expect("loop device").to_path_buf();
    run(cmd("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0"])
        .arg(&dev));
    let mut mount = FsMount::new(&dev, &tmp.path().join("ext4"), "defaults");

    // Distinct 4 KiB blocks, so each can be recognised in the capture stream.
    let data = pattern(42, 2 * MIB as usize);
    let blocks: HashSet<&[u8]> = data.chunks(4096).collect();
    assert_eq!(blocks.len(), data.len() / 4096);
    let before = rig.tap.status().last_seq;
    let mut file = File::create(tmp.path().join("ext4/payload")).expect("create");
    file.write_all(&data).expect("write");
    file.sync_all().expect("fsync");
    let after = rig.tap.status().last_seq;
    drop(file);
    mount.unmount();
    frontend.shutdown().expect("clean shutdown");

    let events = rig.events();
    let mut seen = HashSet::new();
    let mut last_data_seq = Seq::ZERO;
    for e in &events {
        let Event::Write { offset, data: bytes, .. } = &e.event else { continue };
        // The file's blocks sit at 4 KiB-aligned device offsets.
        let skip = ((4096 - offset % 4096) % 4096) as usize;
        for chunk in bytes.get(skip..).unwrap_or_default().chunks_exact(4096) {
            if blocks.contains(chunk) {
                assert!(
                    e.seq > before && e.seq <= after,
                    "file data captured at seq {} outside the write+fsync window ({before}, {after}]",
                    e.seq
                );
                seen.insert(chunk);
                last_data_seq = last_data_seq.max(e.seq);
            }
        }
    }
    if seen.len() != blocks.len() {
        let device = fs::read(&rig.device).expect("device");
        let on_device = device.chunks_exact(4096).filter(|c| blocks.contains(c)).count();
        for e in events.iter().filter(|e| e.seq > before) {
            match &e.event {
                Event::Write { offset, data, .. } => {
                    println!("{} write {offset}+{}", e.seq, data.len())
                }
                other => println!("{} {other:?}", e.seq),
            }
        }
        println!("window ({before}, {after}], {on_device} file blocks on the device");
    }
    assert_eq!(
        seen.len(),
        blocks.len(),
        "every block of the file was captured before fsync returned"
    );
    let barrier = events
        .iter()
        .find(|e| e.seq > last_data_seq && e.event == Event::Barrier)
        .map(|e| e.seq)
        .expect("a barrier after the file's data");
    assert!(
        barrier <= after,
        "the barrier after the file's data (seq {barrier}) is captured before fsync returns (seq {after})"
    );
    println!(
        "file data up to seq {last_data_seq}, barrier at seq {barrier}, fsync returned at seq {after}"
    );
}

const CRASH_DIR_ENV: &str = "TIDEMARK_FUSE_CRASH_DIR";
const CRASH_EXT4_ENV: &str = "TIDEMARK_FUSE_CRASH_EXT4";

/// Not a test: the agent half of the `crashed_agent_*` tests, run in a child process that
/// the parent kills with SIGKILL. Ignored so that it only runs when a parent asks for it.
#[test]
#[ignore = "child process of the crashed_agent_* tests"]
fn crash_child_serves_until_killed() {
    let Some(dir) = std::env::var_os(CRASH_DIR_ENV) else { return };
    let dir = PathBuf::from(dir);
    let rig = Rig::new(&dir, 32 * MIB);
    let frontend = rig.start();
    let dev = frontend.device_path().expect("loop device").to_path_buf();
    if std::env::var_os(CRASH_EXT4_ENV).is_some() {
        // The application has ext4 mounted on the device when the agent dies.
        run(cmd("mkfs.ext4").args(["-q", "-F", "-E", "nodiscard"]).arg(&dev));
        let point = dir.join("ext4");
        fs::create_dir_all(&point).expect("ext4 mount point");
        run(cmd("mount").args(["-t", "ext4"]).arg(&dev).arg(&point));
        fs::write(point.join("before-crash"), pattern(5, 100_000)).expect("write");
        run(cmd("sync").arg("-f").arg(&point));
    } else {
        // Writes into regions 8 and 20 only (1 MiB regions).
        for mib in [8u64, 20] {
            dd(&[
                "if=/dev/urandom",
                &format!("of={}", dev.display()),
                "bs=64K",
                "count=2",
                &format!("seek={}", mib * 16),
                "oflag=direct",
                "conv=notrunc",
            ]);
        }
    }
    println!("READY {}", dev.display());
    std::io::stdout().flush().expect("flush stdout");
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// A child agent, killed with SIGKILL on drop if the test has not done it.
struct ChildAgent {
    child: std::process::Child,
    device: PathBuf,
}

impl ChildAgent {
    /// Starts the child agent in `dir` and waits until it serves its loop device.
    fn start(dir: &Path, with_ext4: bool) -> ChildAgent {
        let mut command = Command::new(std::env::current_exe().expect("test binary"));
        command
            .args(["--exact", "crash_child_serves_until_killed", "--ignored", "--nocapture"])
            .env(CRASH_DIR_ENV, dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if with_ext4 {
            command.env(CRASH_EXT4_ENV, "1");
        }
        let mut child = command.spawn().expect("spawn child agent");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let device = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(dev) = line.strip_prefix("READY ") {
                        break PathBuf::from(dev);
                    }
                }
                other => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("child agent ended before it was ready: {other:?}");
                }
            }
        };
        ChildAgent { child, device }
    }

    /// kill -9: no teardown of any kind.
    fn kill(&mut self) {
        self.child.kill().expect("kill -9 the child agent");
        self.child.wait().expect("reap");
    }
}

impl Drop for ChildAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Loop devices bound to `volume`, from sysfs.
fn loops_bound_to(volume: &Path) -> Vec<String> {
    let mut found: Vec<String> = fs::read_dir("/sys/block")
        .expect("sysfs")
        .flatten()
        .filter(|e| {
            fs::read_to_string(e.path().join("loop/backing_file"))
                .is_ok_and(|b| b.trim() == volume.display().to_string())
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    found
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn crashed_agent_leaves_a_dead_mount_the_next_start_clears() {
    if !privileged("crashed_agent_leaves_a_dead_mount_the_next_start_clears") {
        return;
    }
    let tmp = TempDir::new().expect("tmp");
    let mut agent = ChildAgent::start(tmp.path(), false);
    agent.kill();

    let mnt = tmp.path().join("mnt");
    let err = nix::sys::statfs::statfs(&mnt).expect_err("the dead mount answers nothing");
    assert_eq!(err, nix::errno::Errno::ENOTCONN, "a dead FUSE mount is left behind");
    // Nobody else had the device open: its autoclear detached it at the agent's death.
    let volume = mnt.join("volume");
    let old = agent.device.file_name().expect("name").to_string_lossy().into_owned();
    wait_until("the dead agent's loop device is detached", || {
        !loops_bound_to(&volume).contains(&old)
    });

    // Restart: the map says exactly which regions to resync.
    let (tap, report) = open_tap(tmp.path(), 32 * MIB, false, REGION);
    let dirty: Vec<u64> = report.dirty.iter().collect();
    assert_eq!(dirty, vec![8, 20], "only the regions the crashed agent wrote are dirty");
    let mut cfg = FuseLoopConfig::new(&mnt);
    cfg.shutdown_timeout = Duration::from_secs(10);
    let frontend = FuseLoopFrontend::start(tap.clone(), cfg).expect("start over the dead mount");
    let new_dev = frontend.device_path().expect("loop device").to_path_buf();
    let mut buf = vec![0u8; 4096];
    File::open(&new_dev).expect("open new device").read_exact(&mut buf).expect("read");
    assert_eq!(loops_bound_to(&volume).len(), 1, "one loop device on the volume: the new one");
    frontend.shutdown().expect("clean shutdown");
}

#[test]
fn crashed_agent_under_a_mounted_ext4_does_not_block_the_restart() {
    let test = "crashed_agent_under_a_mounted_ext4_does_not_block_the_restart";
    if !privileged(test) || !have_e2fsprogs(test) {
        return;
    }
    let tmp = TempDir::new().expect("tmp");
    let mut agent = ChildAgent::start(tmp.path(), true);
    // From here the old ext4 mount is this test's to clean up.
    let mut old_fs = FsMount { point: tmp.path().join("ext4"), mounted: true };
    agent.kill();

    let mnt = tmp.path().join("mnt");
    let volume = mnt.join("volume");
    let old = agent.device.file_name().expect("name").to_string_lossy().into_owned();
    assert_eq!(loops_bound_to(&volume), vec![old.clone()], "ext4 pins the dead agent's device");
    // The application's filesystem now fails its writes.
    let write = fs::write(old_fs.point.join("after-crash"), b"x")
        .and_then(|()| File::open(old_fs.point.join("after-crash"))?.sync_all());
    println!("write to the old ext4 after the crash: {write:?}");
    assert!(write.is_err(), "the dead agent's device fails I/O");

    // Restart at the same mount point while the old device is still pinned.
    let (tap, _) = open_tap(tmp.path(), 32 * MIB, false, REGION);
    let frontend = FuseLoopFrontend::start(tap.clone(), FuseLoopConfig::new(&mnt))
        .expect("start over the dead mount, its loop device still in use");
    let new_dev = frontend.device_path().expect("loop device").to_path_buf();
    assert_ne!(new_dev, agent.device);
    // What the application synced before the crash is there (the mount replays the
    // journal through the new device).
    let mut new_fs = FsMount::new(&new_dev, &tmp.path().join("ext4-new"), "defaults");
    let synced = fs::read(new_fs.point.join("before-crash")).expect("file synced before the crash");
    assert!(synced == pattern(5, 100_000), "synced data survived the agent's crash");
    new_fs.unmount();

    // Once the application unmounts the old filesystem, the old device goes away.
    old_fs.mounted = false;
    let _ = cmd("umount").arg(&old_fs.point).status();
    wait_until("the old loop device is detached", || {
        !Path::new(&format!("/sys/block/{old}/loop/backing_file")).exists()
    });
    frontend.shutdown().expect("clean shutdown");
}

#[test]
fn a_second_frontend_on_a_live_mount_is_refused() {
    if !privileged("a_second_frontend_on_a_live_mount_is_refused") {
        return;
    }
    let tmp = TempDir::new().expect("tmp");
    let rig = Rig::new(tmp.path(), 8 * MIB);
    let mut cfg = FuseLoopConfig::new(tmp.path().join("mnt"));
    cfg.attach_loop = false;
    let first = FuseLoopFrontend::start(rig.tap.clone(), cfg.clone()).expect("first");
    assert_eq!(fs::metadata(first.volume_path()).expect("volume").len(), 8 * MIB);
    match FuseLoopFrontend::start(rig.tap.clone(), cfg) {
        Err(TapError::MountPointBusy { fstype, mounted, .. }) => {
            assert_eq!((fstype.as_str(), mounted.as_str()), ("fuse.tidemark", "tidemark"))
        }
        other => panic!("expected MountPointBusy, got {other:?}"),
    }
    first.shutdown().expect("clean shutdown");
}

#[test]
fn teardown_with_the_device_in_use_aborts_and_reports_it() {
    if !privileged("teardown_with_the_device_in_use_aborts_and_reports_it") {
        return;
    }
    let tmp = TempDir::new().expect("tmp");
    let rig = Rig::new(tmp.path(), 8 * MIB);
    let mut cfg = FuseLoopConfig::new(tmp.path().join("mnt"));
    cfg.shutdown_timeout = Duration::from_millis(300);
    let frontend = FuseLoopFrontend::start(rig.tap.clone(), cfg).expect("start");
    let dev = frontend.device_path().expect("loop device").to_path_buf();
    let held = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&dev)
        .expect("the application holds the device");
    match frontend.shutdown() {
        Err(TapError::TeardownForced { holder, .. }) => {
            assert!(holder.contains(&dev.display().to_string()), "names the device: {holder}")
        }
        other => panic!("expected TeardownForced, got {other:?}"),
    }
    // The application now gets I/O errors, as after an agent crash.
    let mut buf = AlignedBlock([0; 4096]);
    let err = held.read_at(&mut buf.0, 0).expect_err("I/O on an aborted connection fails");
    println!("read after the forced teardown: {err}");
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    drop(held);
    // Its last close detaches it.
    let volume = tmp.path().join("mnt/volume").display().to_string();
    let deadline = Instant::now() + Duration::from_secs(5);
    while sysfs(&dev, "loop/backing_file") == volume {
        assert!(Instant::now() < deadline, "{} still bound", dev.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[repr(align(4096))]
struct AlignedBlock([u8; 4096]);

/// Seconds `dd` takes to write `input` to `dev` with 1 MiB direct writes, and seconds the
/// flush after it takes (`sync DEVICE`: fsync of the block device, a REQ_OP_FLUSH).
fn time_dd(input: &Path, dev: &Path) -> (f64, f64) {
    let start = Instant::now();
    dd(&[
        &format!("if={}", input.display()),
        &format!("of={}", dev.display()),
        "bs=1M",
        "oflag=direct",
        "conv=notrunc",
    ]);
    let written = start.elapsed().as_secs_f64();
    run(cmd("sync").arg(dev));
    (written, start.elapsed().as_secs_f64() - written)
}

/// A measurement, not an assertion: 256 MiB of 1 MiB direct writes through the FUSE + loop
/// frontend (capture on, spool on) against a plain loop device over a plain file on the
/// same filesystem. Run with `cargo test --release -p tidemark-tap --test fuse_loop --
/// --ignored --nocapture throughput`.
#[test]
#[ignore = "measurement; run explicitly"]
fn throughput_dd_fuse_loop_vs_plain_loop() {
    if !privileged("throughput_dd_fuse_loop_vs_plain_loop") {
        return;
    }
    const LEN: u64 = 256 * MIB;
    let tmp = TempDir::new().expect("tmp");
    let input = tmp.path().join("input");
    fs::write(&input, pattern(9, LEN as usize)).expect("input");
    let mb = LEN as f64 / 1e6;
    let mut report = Vec::new();

    for direct_io in [false, true] {
        let plain = tmp.path().join(format!("plain-{direct_io}.img"));
        File::create(&plain).and_then(|f| f.set_len(LEN)).expect("plain file");
        let opts = LoopOptions { direct_io, ..LoopOptions::default() };
        let mut l = LoopDevice::attach(&plain, opts).expect("plain loop");
        let (write, flush) = time_dd(&input, l.path());
        report.push(format!(
            "plain loop over a plain file (loop dio {}): {:.0} MB/s with the final flush, \
             {:.0} MB/s without ({write:.2} s + flush {flush:.2} s)",
            l.direct_io(),
            mb / (write + flush),
            mb / write
        ));
        l.detach().expect("detach");
        fs::remove_file(&plain).expect("remove");
    }
    for direct_io in [false, true] {
        let dir = tmp.path().join(format!("fuse-{direct_io}"));
        fs::create_dir(&dir).expect("dir");
        // The intent map's default 4 MiB regions: a durable map write per new region.
        let rig = Rig::with_regions(&dir, LEN, 4 * MIB);
        let mut cfg = FuseLoopConfig::new(dir.join("mnt"));
        cfg.loop_options.direct_io = direct_io;
        let frontend = FuseLoopFrontend::start(rig.tap.clone(), cfg).expect("start");
        let dev = frontend.device_path().expect("loop").to_path_buf();
        let (write, flush) = time_dd(&input, &dev);
        let c = frontend.counters();
        report.push(format!(
            "FUSE + loop (loop dio {}), capture and spool on: {:.0} MB/s with the final flush, \
             {:.0} MB/s without ({write:.2} s + flush {flush:.2} s); {} FUSE writes \
             (avg {} KiB), {} fsyncs",
            frontend.loop_device().expect("loop").direct_io(),
            mb / (write + flush),
            mb / write,
            c.writes,
            c.write_bytes / c.writes.max(1) / 1024,
            c.fsyncs
        ));
        frontend.shutdown().expect("shutdown");
        let status = rig.tap.status();
        assert_eq!(status.bytes, LEN);
        report.push(format!(
            "    intent map writes (write + fdatasync each): {}",
            status.intent.slot_writes
        ));
    }
    for line in &report {
        println!("{line}");
    }
}
