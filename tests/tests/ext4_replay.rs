//! ext4 replayed to every recovery point (xfstests generic/482 in spirit): a workload of
//! creates, overwrites, appends, truncates, deletes, renames and fsyncs on ext4 made on the
//! FUSE + loop frontend, with filesystem bookmarks (sync + fsfreeze, and umount), replicated
//! to an in-process target. Then for every point the target offers: materialize it, check
//! it against the spool's history with the crash-consistency checker, replay the ext4
//! journal as a mount would (`e2fsck -E journal_only`), and `e2fsck -fn` must find nothing
//! (if it finds something, the image is mounted and unmounted, which also releases orphan
//! inodes as the kernel does after a power cut, and `e2fsck -fn` must then find nothing);
//! at each bookmark the files read out of the image (`debugfs rdump`) match the checksums
//! taken on the source.
//!
//! The link is down while the workload runs, so that the spool still holds the whole
//! history when the test reads it back; the target then receives it in one catch-up.
//!
//! Needs root, /dev/fuse, loop devices, e2fsprogs (mkfs.ext4, e2fsck, debugfs) and fsfreeze;
//! without them it prints a loud SKIPPED line (and a `scenarios_skipped` figure).

mod common;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Replication;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tidemark_journal::{
    Bookmark, BookmarkKind, FileIo, FsDir, MemDir, PointKind, Seq, Spool, SpoolConfig, SystemClock,
    VolumeId,
};
use tidemark_tap::{FuseLoopConfig, FuseLoopFrontend, IntentConfig, IntentMap, Tap, TapConfig};
use tidemark_tests::crashcheck::History;
use tidemark_tests::figures;

/// The protected volume: small, so that every point can be checked in a few seconds.
const DEVICE: u64 = 32 << 20;
const ROUNDS: u64 = 8;
const OPS_PER_ROUND: u64 = 20;

/// A command found on PATH or in the sbin directories, whatever PATH the harness got.
fn cmd(program: &str) -> Command {
    let path = std::env::var("PATH").unwrap_or_default();
    let mut c = Command::new(program);
    c.env("PATH", format!("{path}:/usr/local/sbin:/usr/sbin:/sbin"));
    c
}

fn output(c: &mut Command) -> Output {
    c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"))
}

/// Runs a command, failing the test with its output unless it succeeds.
fn run(c: &mut Command) {
    let out = output(c);
    assert!(
        out.status.success(),
        "{c:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What is missing to run here, if anything.
fn missing_requirement() -> Option<String> {
    let root = fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
    if !root {
        return Some("not root".into());
    }
    for dev in ["/dev/fuse", "/dev/loop-control"] {
        if !Path::new(dev).exists() {
            return Some(format!("{dev} missing"));
        }
    }
    for tool in ["mkfs.ext4", "e2fsck", "debugfs", "fsfreeze", "mount", "umount"] {
        let found = cmd("sh")
            .args(["-c", "command -v \"$1\"", "sh", tool])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!("{tool} not installed"));
        }
    }
    None
}

/// A scratch directory on tmpfs when there is one (the materialized images are synced once
/// per point), else the default temp dir.
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(dir) = tempfile::Builder::new().prefix("tidemark-ext4-replay").tempdir_in(shm)
    {
        return dir;
    }
    tempfile::Builder::new().prefix("tidemark-ext4-replay").tempdir().expect("temp dir")
}

/// An ext4 mount, unmounted on drop (lazily if busy) so a failing test leaves nothing pinned.
struct Mount {
    point: PathBuf,
    mounted: bool,
}

impl Mount {
    fn new(device: &Path, point: &Path) -> Mount {
        fs::create_dir_all(point).expect("mount point");
        run(cmd("mount").args(["-t", "ext4", "-o", "noatime"]).arg(device).arg(point));
        Mount { point: point.to_path_buf(), mounted: true }
    }

    fn unmount(&mut self) {
        if self.mounted {
            self.mounted = false;
            run(cmd("umount").arg(&self.point));
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = cmd("fsfreeze").arg("-u").arg(&self.point).status();
            let _ = cmd("umount").arg(&self.point).status();
            let _ = cmd("umount").arg("-l").arg(&self.point).status();
        }
    }
}

/// Relative path -> BLAKE3 of the content, for every regular file under `root` except
/// `lost+found`; directories appear as `path/` with an empty hash.
fn checksums(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let mut entries: Vec<_> =
            fs::read_dir(dir).expect("read dir").map(|e| e.expect("dir entry").path()).collect();
        entries.sort();
        for path in entries {
            let rel = path.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel == "lost+found" {
                continue;
            }
            if path.is_dir() {
                out.insert(format!("{rel}/"), String::new());
                walk(root, &path, out);
            } else {
                let data = fs::read(&path).expect("read file");
                out.insert(rel, blake3::hash(&data).to_hex().to_string());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// The file-level workload: a few operations of every kind per round.
struct Workload {
    rng: StdRng,
    root: PathBuf,
    files: Vec<PathBuf>,
    next: u64,
    fsyncs: u64,
}

impl Workload {
    fn data(&mut self, max: usize) -> Vec<u8> {
        let len = self.rng.gen_range(1..=max);
        let mut v = vec![0u8; len];
        self.rng.fill(&mut v[..]);
        v
    }

    fn pick(&mut self) -> Option<PathBuf> {
        (!self.files.is_empty())
            .then(|| self.files[self.rng.gen_range(0..self.files.len())].clone())
    }

    fn maybe_fsync(&mut self, f: &File) {
        if self.rng.gen_range(0..3) == 0 {
            f.sync_all().expect("fsync");
            self.fsyncs += 1;
        }
    }

    fn round(&mut self) {
        for _ in 0..OPS_PER_ROUND {
            match self.rng.gen_range(0..10) {
                0..=3 => {
                    let dir = self.root.join(format!("d{}", self.rng.gen_range(0..3)));
                    fs::create_dir_all(&dir).expect("mkdir");
                    self.next += 1;
                    let path = dir.join(format!("f{}", self.next));
                    let data = self.data(256 << 10);
                    let mut f = File::create(&path).expect("create");
                    f.write_all(&data).expect("write");
                    self.maybe_fsync(&f);
                    self.files.push(path);
                }
                4..=5 => {
                    let Some(path) = self.pick() else { continue };
                    let mut f = OpenOptions::new().write(true).open(&path).expect("open");
                    let len = f.metadata().expect("stat").len();
                    let at = self.rng.gen_range(0..=len);
                    let data = self.data(64 << 10);
                    f.seek(SeekFrom::Start(at)).expect("seek");
                    f.write_all(&data).expect("overwrite");
                    self.maybe_fsync(&f);
                }
                6 => {
                    let Some(path) = self.pick() else { continue };
                    let mut f = OpenOptions::new().append(true).open(&path).expect("open");
                    let data = self.data(32 << 10);
                    f.write_all(&data).expect("append");
                    self.maybe_fsync(&f);
                }
                7 => {
                    let Some(path) = self.pick() else { continue };
                    let f = OpenOptions::new().write(true).open(&path).expect("open");
                    let len = f.metadata().expect("stat").len();
                    f.set_len(len / 2).expect("truncate");
                    self.maybe_fsync(&f);
                }
                8 => {
                    let Some(path) = self.pick() else { continue };
                    fs::remove_file(&path).expect("unlink");
                    self.files.retain(|p| *p != path);
                }
                _ => {
                    let Some(path) = self.pick() else { continue };
                    self.next += 1;
                    let to = self.root.join(format!("d{}", self.rng.gen_range(0..3)));
                    fs::create_dir_all(&to).expect("mkdir");
                    let to = to.join(format!("r{}", self.next));
                    fs::rename(&path, &to).expect("rename");
                    for p in &mut self.files {
                        if *p == path {
                            p.clone_from(&to);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn ext4_every_flush_point_and_bookmark_fscks_clean() {
    if let Some(why) = missing_requirement() {
        let _ = writeln!(
            std::io::stderr(),
            "\n==============================================================\n\
             SKIPPED: ext4_every_flush_point_and_bookmark_fscks_clean: {why} (needs root, \
             /dev/fuse, loop devices, e2fsprogs and fsfreeze)\n\
             =============================================================="
        );
        figures::report("scenarios_skipped", 1);
        return;
    }
    let started = Instant::now();
    let dir = scratch();
    let device_path = dir.path().join("device.img");
    let device = FileIo::create(&device_path, DEVICE).expect("create device");
    let (spool, _) = Spool::open(
        Arc::new(FsDir::new(dir.path().join("spool")).expect("spool dir")),
        SpoolConfig { capacity_bytes: 2 << 30, segment_bytes: 16 << 20, key: None },
        Arc::new(SystemClock),
    )
    .expect("spool");
    let map_dir = MemDir::new();
    let (intent, _) = IntentMap::open(
        tidemark_journal::Dir::open(&map_dir, "intent.map", true).expect("intent map file"),
        DEVICE,
        IntentConfig { region_bytes: 1 << 20, max_hot_regions: 64, max_runs: 1024 },
    )
    .expect("intent map");
    let tap =
        Arc::new(Tap::new(Arc::new(device), spool, intent, TapConfig::default()).expect("tap"));
    let target = Replication::start_with_link(tap.shared_spool(), DEVICE, false);
    let mut fcfg = FuseLoopConfig::new(dir.path().join("fuse"));
    fcfg.shutdown_timeout = Duration::from_secs(20);
    let frontend = FuseLoopFrontend::start(tap.clone(), fcfg).expect("start FUSE + loop");
    let loopdev = frontend.device_path().expect("loop device attached").to_path_buf();

    run(cmd("mkfs.ext4").args(["-q", "-F", "-b", "4096", "-E", "nodiscard"]).arg(&loopdev));
    // mkfs ends with a flush: from here on every flush point holds a filesystem.
    let fs_born = tap.status().last_seq;

    let mnt = dir.path().join("mnt");
    let mut mount = Mount::new(&loopdev, &mnt);
    let mut workload = Workload {
        rng: StdRng::seed_from_u64(0xE47),
        root: mnt.clone(),
        files: Vec::new(),
        next: 0,
        fsyncs: 0,
    };
    // Bookmark name -> the files' checksums on the source at that bookmark.
    let mut expected: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let bookmark = |name: &str| {
        tap.bookmark(Bookmark::new(name, BookmarkKind::Filesystem, 0).unwrap()).expect("bookmark")
    };
    for round in 1..=ROUNDS {
        workload.round();
        let name = format!("round-{round}");
        // Checksums first: reading a frozen filesystem could block on an atime update.
        expected.insert(name.clone(), checksums(&mnt));
        if round % 3 == 0 {
            mount.unmount();
            bookmark(&name);
            mount = Mount::new(&loopdev, &mnt);
        } else {
            run(&mut cmd("sync"));
            run(cmd("fsfreeze").arg("-f").arg(&mnt));
            bookmark(&name);
            run(cmd("fsfreeze").arg("-u").arg(&mnt));
        }
    }
    workload.round();
    expected.insert("final".into(), checksums(&mnt));
    mount.unmount();
    bookmark("final");
    frontend.shutdown().expect("FUSE + loop teardown");

    let last = tap.sync_spool().expect("sync spool");
    let events = tap.read_after(Seq::ZERO, u64::MAX).expect("read the spool");
    assert_eq!(events.len() as u64, last.0, "the spool holds the whole history");
    let history = History::from_spooled(VolumeId(0), vec![0; DEVICE as usize], events)
        .expect("the spool as a history");
    target.set_link(true);
    let acked = target.wait_acked(last);
    let workload_time = started.elapsed();

    let image_path = dir.path().join("point.img");
    let image = FileIo::create(&image_path, DEVICE).expect("create image");
    let mut checker = history.checker();
    let mut failures = Vec::new();
    let (mut points, mut fscks, mut bookmarks_verified, mut journal_replays) =
        (0u64, 0u64, 0u64, 0u64);
    let mut mount_cycles = 0u64;
    let mut lost = std::collections::BTreeSet::new();
    for point in target.points() {
        points += 1;
        target
            .receiver
            .with_log(|log| log.materialize(&point, VolumeId(0), &image, &mut |_, _| {}))
            .expect("materialize");
        let bytes = fs::read(&image_path).expect("read image");
        let verdict = checker.check(point.seq, &bytes).expect("check the image");
        lost.extend(verdict.lost_writes.iter().copied().filter(|s| *s <= acked));
        if !verdict.is_consistent() {
            failures.push(format!("point {:?} at seq {}: {verdict}", point.kind, point.seq));
        }
        if point.seq < fs_born {
            continue; // mkfs had not finished: no filesystem to check yet
        }
        // What a mount does first after a power cut: replay the journal.
        let replay = output(cmd("e2fsck").args(["-y", "-E", "journal_only"]).arg(&image_path));
        if !matches!(replay.status.code(), Some(0 | 1)) {
            failures.push(format!(
                "point {:?} at seq {}: journal replay failed ({}): {}{}",
                point.kind,
                point.seq,
                replay.status,
                String::from_utf8_lossy(&replay.stdout),
                String::from_utf8_lossy(&replay.stderr)
            ));
            continue;
        }
        if String::from_utf8_lossy(&replay.stdout).contains("recovering journal") {
            journal_replays += 1;
        }
        let mut fsck = output(cmd("e2fsck").arg("-fn").arg(&image_path));
        fscks += 1;
        if !fsck.status.success() {
            // What else a mount does after a power cut: release the orphan inodes (files
            // deleted or truncated while open, in a transaction that had not finished),
            // which e2fsck -n reports but does not release. Mount, unmount, check again.
            let first = fsck;
            let point_mnt = dir.path().join("point-mnt");
            fs::create_dir_all(&point_mnt).expect("mount point");
            let mounted = output(
                cmd("mount")
                    .args(["-t", "ext4", "-o", "loop,noatime"])
                    .arg(&image_path)
                    .arg(&point_mnt),
            );
            if mounted.status.success() {
                run(cmd("umount").arg(&point_mnt));
            }
            fsck = output(cmd("e2fsck").arg("-fn").arg(&image_path));
            fscks += 1;
            mount_cycles += 1;
            if !fsck.status.success() {
                failures.push(format!(
                    "point {:?} at seq {}: e2fsck -fn found problems ({}), and again after a \
                     mount ({}, mount: {}):\n{}{}\nafter the mount:\n{}{}",
                    point.kind,
                    point.seq,
                    first.status,
                    fsck.status,
                    mounted.status,
                    String::from_utf8_lossy(&first.stdout),
                    String::from_utf8_lossy(&first.stderr),
                    String::from_utf8_lossy(&fsck.stdout),
                    String::from_utf8_lossy(&fsck.stderr)
                ));
            }
        }
        if let PointKind::Bookmark(b) = &point.kind {
            let Some(want) = expected.get(&b.name) else {
                failures
                    .push(format!("bookmark {:?} at seq {} was never taken", b.name, point.seq));
                continue;
            };
            let out = dir.path().join(format!("rdump-{}", b.name));
            fs::create_dir_all(&out).expect("rdump dir");
            run(cmd("debugfs")
                .arg("-R")
                .arg(format!("rdump / {}", out.display()))
                .arg(&image_path));
            let got = checksums(&out);
            if got != *want {
                let differ: Vec<&String> = want
                    .keys()
                    .chain(got.keys())
                    .filter(|k| want.get(*k) != got.get(*k))
                    .take(10)
                    .collect();
                failures.push(format!(
                    "bookmark {:?} at seq {}: files differ from the source's: {differ:?}",
                    b.name, point.seq
                ));
            } else {
                bookmarks_verified += 1;
            }
            let _ = fs::remove_dir_all(&out);
        }
    }
    println!(
        "ext4 replay: {} events, {} flush points in the history, {points} points offered and \
         checked, {journal_replays} needed a journal replay, {fscks} e2fsck -fn runs ({mount_cycles} \
         after a mount released orphans), {bookmarks_verified} bookmarks' files verified, \
         {} fsyncs; workload {:.1}s, whole test {:.1}s",
        last.0,
        history.flush_points().len(),
        workload.fsyncs,
        workload_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    figures::report("scenarios_run", 1);
    figures::report("recovery_points_checked", points);
    figures::report("fsck_runs", fscks);
    figures::report("acknowledged_writes_lost", lost.len() as u64);
    assert!(failures.is_empty(), "{} failure(s):\n{}", failures.len(), failures.join("\n"));
    assert_eq!(bookmarks_verified, ROUNDS + 1, "every bookmark is offered and verified");
    assert_eq!(
        points,
        history.flush_points().len() as u64 + 1,
        "every flush point of the history is offered (plus the base)"
    );
}
