//! A real filesystem replayed to every recovery point (xfstests generic/482 in spirit), for
//! ext4 and for xfs: a workload of creates, overwrites, appends, truncates, deletes, renames
//! and fsyncs on the filesystem made on the FUSE + loop frontend, with filesystem bookmarks
//! (sync + fsfreeze, and umount), replicated to an in-process target. Then for every point
//! the target offers: materialize it, check it against the spool's history with the
//! crash-consistency checker, and recover it as the kernel would after a power cut, then
//! check it offline:
//! - ext4: replay the journal (`e2fsck -E journal_only`), then `e2fsck -fn` must find
//!   nothing (if it finds something, the image is mounted and unmounted, which also releases
//!   orphan inodes as the kernel does, and `e2fsck -fn` must then find nothing); at each
//!   bookmark the files read out of the image (`debugfs rdump`) match the checksums taken on
//!   the source.
//! - xfs: mount the image (log recovery, unlinked-inode processing), read the files at a
//!   bookmark and compare their checksums, unmount, then `xfs_repair -n` must find nothing.
//!   mkfs.xfs refuses filesystems under 300 MB unless it runs under fstests; the test sets
//!   fstests' variables (TEST_DIR, TEST_DEV, QA_CHECK_FS) so that a 32 MiB volume is allowed
//!   and every point stays cheap to check.
//!
//! The link is down while the workload runs, so that the spool still holds the whole
//! history when the test reads it back; the target then receives it in one catch-up.
//!
//! Needs root, /dev/fuse, loop devices, fsfreeze, and e2fsprogs (ext4) or xfsprogs and the
//! kernel's xfs (xfs); without them a test prints a loud SKIPPED line (and a
//! `scenarios_skipped` figure).

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

/// The filesystems replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fs {
    Ext4,
    Xfs,
}

impl Fs {
    fn name(self) -> &'static str {
        match self {
            Fs::Ext4 => "ext4",
            Fs::Xfs => "xfs",
        }
    }

    /// The tools it needs besides mount, umount and fsfreeze.
    fn tools(self) -> &'static [&'static str] {
        match self {
            Fs::Ext4 => &["mkfs.ext4", "e2fsck", "debugfs"],
            Fs::Xfs => &["mkfs.xfs", "xfs_repair"],
        }
    }

    fn mkfs(self, device: &Path) {
        match self {
            Fs::Ext4 => run(cmd("mkfs.ext4")
                .args(["-q", "-F", "-b", "4096", "-E", "nodiscard"])
                .arg(device)),
            // fstests' variables lift mkfs.xfs's 300 MB minimum (see the module doc).
            Fs::Xfs => run(cmd("mkfs.xfs")
                .args(["-q", "-f", "-K"])
                .env("TEST_DIR", "/tmp")
                .env("TEST_DEV", device)
                .env("QA_CHECK_FS", "1")
                .arg(device)),
        }
    }
}

/// What is missing to run `fs` here, if anything.
fn missing_requirement(fs: Fs) -> Option<String> {
    let root = fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
    if !root {
        return Some("not root".into());
    }
    for dev in ["/dev/fuse", "/dev/loop-control"] {
        if !Path::new(dev).exists() {
            return Some(format!("{dev} missing"));
        }
    }
    for tool in ["fsfreeze", "mount", "umount"].iter().chain(fs.tools()) {
        let found = cmd("sh")
            .args(["-c", "command -v \"$1\"", "sh", tool])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!("{tool} not installed"));
        }
    }
    let known = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !known.split_whitespace().any(|f| f == fs.name()) {
        return Some(format!("this kernel has no {} (/proc/filesystems)", fs.name()));
    }
    None
}

/// A scratch directory on tmpfs when there is one (the materialized images are synced once
/// per point), else the default temp dir.
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(dir) = tempfile::Builder::new().prefix("tidemark-fs-replay").tempdir_in(shm)
    {
        return dir;
    }
    tempfile::Builder::new().prefix("tidemark-fs-replay").tempdir().expect("temp dir")
}

/// A mount, unmounted on drop (lazily if busy) so a failing test leaves nothing pinned.
struct Mount {
    point: PathBuf,
    mounted: bool,
}

impl Mount {
    fn new(fs: Fs, device: &Path, point: &Path) -> Mount {
        fs::create_dir_all(point).expect("mount point");
        run(cmd("mount").args(["-t", fs.name(), "-o", "noatime"]).arg(device).arg(point));
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
    replay_every_point(Fs::Ext4);
}

#[test]
fn xfs_every_flush_point_and_bookmark_repairs_clean() {
    replay_every_point(Fs::Xfs);
}

/// Counts of the offline checks.
#[derive(Debug, Default)]
struct Checked {
    fscks: u64,
    journal_replays: u64,
    mount_cycles: u64,
    bookmarks_verified: u64,
}

fn replay_every_point(fs: Fs) {
    if let Some(why) = missing_requirement(fs) {
        let name = fs.name();
        let _ = writeln!(
            std::io::stderr(),
            "\n==============================================================\n\
             SKIPPED: {name}_every_flush_point_and_bookmark: {why} (needs root, /dev/fuse, \
             loop devices, fsfreeze and the {name} tools)\n\
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

    fs.mkfs(&loopdev);
    // mkfs ends with a flush: from here on every flush point holds a filesystem.
    let fs_born = tap.status().last_seq;

    let mnt = dir.path().join("mnt");
    let mut mount = Mount::new(fs, &loopdev, &mnt);
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
            mount = Mount::new(fs, &loopdev, &mnt);
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
    let mut points = 0u64;
    let mut checked = Checked::default();
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
        let bookmark = match &point.kind {
            PointKind::Bookmark(b) => Some(b.name.clone()),
            _ => None,
        };
        let want = match &bookmark {
            Some(name) => match expected.get(name) {
                Some(want) => Some(want),
                None => {
                    failures
                        .push(format!("bookmark {name:?} at seq {} was never taken", point.seq));
                    continue;
                }
            },
            None => None,
        };
        let what = format!("point {:?} at seq {}", point.kind, point.seq);
        match fs {
            Fs::Ext4 => {
                check_ext4(&image_path, dir.path(), &what, want, &mut checked, &mut failures)
            }
            Fs::Xfs => check_xfs(&image_path, dir.path(), &what, want, &mut checked, &mut failures),
        }
    }
    let Checked { fscks, journal_replays, mount_cycles, bookmarks_verified } = checked;
    println!(
        "{} replay: {} events, {} flush points in the history, {points} points offered and \
         checked, {journal_replays} needed a journal replay, {fscks} offline check runs \
         ({mount_cycles} after a mount), {bookmarks_verified} bookmarks' files verified, \
         {} fsyncs; workload {:.1}s, whole test {:.1}s",
        fs.name(),
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

/// Compares the files read out of a point with the source's at its bookmark.
fn compare_files(
    what: &str,
    want: &BTreeMap<String, String>,
    got: &BTreeMap<String, String>,
) -> Option<String> {
    if got == want {
        return None;
    }
    let differ: Vec<&String> =
        want.keys().chain(got.keys()).filter(|k| want.get(*k) != got.get(*k)).take(10).collect();
    Some(format!("{what}: files differ from the source's: {differ:?}"))
}

fn describe(out: &Output) -> String {
    format!(
        "({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// ext4 at one point: journal replay, `e2fsck -fn` (again after a mount if it complains),
/// and the files at a bookmark through `debugfs rdump`.
fn check_ext4(
    image_path: &Path,
    dir: &Path,
    what: &str,
    want: Option<&BTreeMap<String, String>>,
    checked: &mut Checked,
    failures: &mut Vec<String>,
) {
    // What a mount does first after a power cut: replay the journal.
    let replay = output(cmd("e2fsck").args(["-y", "-E", "journal_only"]).arg(image_path));
    if !matches!(replay.status.code(), Some(0 | 1)) {
        failures.push(format!("{what}: journal replay failed {}", describe(&replay)));
        return;
    }
    if String::from_utf8_lossy(&replay.stdout).contains("recovering journal") {
        checked.journal_replays += 1;
    }
    let mut fsck = output(cmd("e2fsck").arg("-fn").arg(image_path));
    checked.fscks += 1;
    if !fsck.status.success() {
        // What else a mount does after a power cut: release the orphan inodes (files
        // deleted or truncated while open, in a transaction that had not finished),
        // which e2fsck -n reports but does not release. Mount, unmount, check again.
        let first = fsck;
        let point_mnt = dir.join("point-mnt");
        fs::create_dir_all(&point_mnt).expect("mount point");
        let mounted = output(
            cmd("mount").args(["-t", "ext4", "-o", "loop,noatime"]).arg(image_path).arg(&point_mnt),
        );
        if mounted.status.success() {
            run(cmd("umount").arg(&point_mnt));
        }
        fsck = output(cmd("e2fsck").arg("-fn").arg(image_path));
        checked.fscks += 1;
        checked.mount_cycles += 1;
        if !fsck.status.success() {
            failures.push(format!(
                "{what}: e2fsck -fn found problems {}\nand again after a mount (mount: {}) {}",
                describe(&first),
                mounted.status,
                describe(&fsck)
            ));
        }
    }
    if let Some(want) = want {
        let out = dir.join("rdump");
        let _ = fs::remove_dir_all(&out);
        fs::create_dir_all(&out).expect("rdump dir");
        run(cmd("debugfs").arg("-R").arg(format!("rdump / {}", out.display())).arg(image_path));
        match compare_files(what, want, &checksums(&out)) {
            Some(failure) => failures.push(failure),
            None => checked.bookmarks_verified += 1,
        }
        let _ = fs::remove_dir_all(&out);
    }
}

/// xfs at one point: a mount recovers the log and processes unlinked inodes as after a
/// power cut; the files at a bookmark are read from that mount; after the unmount,
/// `xfs_repair -n` must find nothing.
fn check_xfs(
    image_path: &Path,
    dir: &Path,
    what: &str,
    want: Option<&BTreeMap<String, String>>,
    checked: &mut Checked,
    failures: &mut Vec<String>,
) {
    let point_mnt = dir.join("point-mnt");
    fs::create_dir_all(&point_mnt).expect("mount point");
    // nouuid: the image has the source filesystem's UUID, and points are mounted one after
    // another.
    let mounted = output(
        cmd("mount")
            .args(["-t", "xfs", "-o", "loop,noatime,nouuid"])
            .arg(image_path)
            .arg(&point_mnt),
    );
    checked.mount_cycles += 1;
    if !mounted.status.success() {
        failures
            .push(format!("{what}: the xfs mount (log recovery) failed {}", describe(&mounted)));
        return;
    }
    if let Some(want) = want {
        match compare_files(what, want, &checksums(&point_mnt)) {
            Some(failure) => failures.push(failure),
            None => checked.bookmarks_verified += 1,
        }
    }
    run(cmd("umount").arg(&point_mnt));
    let repair = output(cmd("xfs_repair").arg("-n").arg(image_path));
    checked.fscks += 1;
    if !repair.status.success() {
        failures.push(format!("{what}: xfs_repair -n found problems {}", describe(&repair)));
    }
}
