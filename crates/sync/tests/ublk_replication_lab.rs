//! Replication of an ext4 filesystem written through a real ublk device: the third guest
//! suite of `cargo xtask lab` (a QEMU guest running Debian's 6.12 kernel with `ublk_drv`),
//! built as a test binary without the libtest harness.
//!
//! One process holds the whole pair: a tap over a volume file in the guest's tmpfs (spool
//! and write-intent map beside it), a `UblkServer` exposing it as `/dev/ublkb<N>`, a
//! shipper and a receiver joined by in-memory pipes (Noise transport), and the target's
//! retention log in tmpfs over a blank base image. A `SourcePair` started with `fresh =
//! true` before the ublk device runs step I of the initial sync (the volume holds data
//! before protection begins) while mkfs.ext4 already writes through the device.
//!
//! The workload runs in rounds: mount, write files of known content (new ones, an
//! overwritten one, a deleted one), `sync`, umount, then a bookmark through the tap while
//! the filesystem is unmounted (quiescent and clean: its journal needs no recovery). At
//! the end, once the target acknowledged everything, every bookmark is materialized from
//! the retention log and must be byte for byte the device as it was at the bookmark,
//! `e2fsck -fn` clean, and hold exactly the files written up to then (read with
//! `debugfs rdump`, no mount needed); the latest point must equal the device.
//!
//! - `ublk_replication_lab --lab`: the guest run; prints `TIDEMARK-LAB: PASS <test>` /
//!   `TIDEMARK-LAB: FAIL <test>: <why>` per test, then `TIDEMARK-LAB: PASS <n> tests` or
//!   `TIDEMARK-LAB: FAIL <k> of <n> tests`. A missing `/dev/ublk-control` is a failure.
//! - no argument (as `cargo test` runs it): without `/dev/ublk-control` it says loudly
//!   that it skipped; on a host with `ublk_drv`, root and e2fsprogs it runs the same tests
//!   in a temporary directory.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};
use std::{env, thread};

use common::paired;
use tidemark_journal::{
    BlockIo, Bookmark, BookmarkKind, FileIo, FsDir, RecoveryPoint, RetentionConfig, RetentionLog,
    Seq, Spool, SpoolConfig, SystemClock, VolumeId,
};
use tidemark_sync::apply::{Receiver, ReceiverConfig};
use tidemark_sync::pair::{PairStage, SourcePair, SourcePairConfig};
use tidemark_sync::pipe::duplex;
use tidemark_sync::ship::{Backoff, Shipper, ShipperConfig, ShipperHandle};
use tidemark_sync::syncer::SyncerConfig;
use tidemark_sync::wire::{Hello, PairId, Role, SUPPORTED_VERSIONS, VolumeInfo};
use tidemark_tap::{IntentConfig, IntentMap, Tap, TapConfig, UblkConfig, UblkServer, ublk};

type TestResult<T = ()> = Result<T, String>;

const PREFIX: &str = "TIDEMARK-LAB:";
/// The protected volume's size.
const VOLUME: u64 = 128 << 20;
const BLOCK: u64 = 4096;
const PAIR: PairId = PairId([0x1b; 16]);
/// Workload rounds, one bookmark after each.
const ROUNDS: u64 = 4;
/// Where the filesystem's files live (one directory, so `debugfs rdump` takes them all).
const DATA_DIR: &str = "data";
/// How long any wait may take before the test fails (TCG is slow; never a delay).
const PATIENCE: Duration = Duration::from_secs(240);

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

fn main() -> ExitCode {
    match env::args().nth(1).as_deref() {
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

/// The whole error chain.
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

/// Runs a command; fails with its output unless it exits 0. Returns its standard output.
fn run(program: &str, args: &[&str]) -> TestResult<String> {
    let out = Command::new(program).args(args).output().map_err(e(&format!("start {program}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "`{program} {}` exited with {}: {}{}",
        args.join(" "),
        out.status,
        stdout.trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(stdout)
}

fn path_str(path: &Path) -> TestResult<&str> {
    path.to_str().ok_or_else(|| format!("{} is not UTF-8", path.display()))
}

/// A reproducible byte pattern (xorshift), different for each seed.
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

/// BLAKE3 of `len` bytes of `io` from offset 0, read in 4 MiB pieces.
fn hash_volume(io: &dyn BlockIo, len: u64) -> TestResult<blake3::Hash> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        io.read_at(&mut buf[..n], at).map_err(e(&format!("read {}", io.name())))?;
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    Ok(hasher.finalize())
}

// ------------------------------------------------------------------------------------------
// The pair
// ------------------------------------------------------------------------------------------

/// Source and target of one protected volume, in this process.
struct Rig {
    tap: Arc<Tap>,
    device: Arc<dyn BlockIo>,
    receiver: Receiver,
    shipper: Option<ShipperHandle>,
    pair: Option<SourcePair>,
    server: Option<UblkServer>,
}

impl Rig {
    /// Source: the tap over `work/volume.img` (spool and intent map in `work`). Target: a
    /// receiver over a retention log in `work/target` over a blank base image. The pair is
    /// started fresh, then the ublk device.
    fn start(work: &Path) -> TestResult<Rig> {
        let volume = work.join("volume.img");
        let device: Arc<dyn BlockIo> =
            Arc::new(FileIo::open(&volume).map_err(e("open the volume"))?);
        let size = device.len().map_err(e("volume length"))?;

        fs::create_dir_all(work.join("spool")).map_err(e("spool dir"))?;
        let spool_dir = Arc::new(FsDir::new(work.join("spool")).map_err(e("spool dir"))?);
        let cfg = SpoolConfig { capacity_bytes: 256 << 20, segment_bytes: 8 << 20, key: None };
        let (spool, _) =
            Spool::open(spool_dir, cfg, Arc::new(SystemClock)).map_err(|err| chain(&err))?;
        let map_io: Arc<dyn BlockIo> =
            Arc::new(FileIo::create(work.join("intent.map"), 0).map_err(e("intent map"))?);
        let intent_cfg =
            IntentConfig { region_bytes: 1 << 20, max_hot_regions: 4096, max_runs: 1024 };
        let (intent, _) = IntentMap::open(map_io, size, intent_cfg).map_err(|err| chain(&err))?;
        let tap = Arc::new(
            Tap::new(device.clone(), spool, intent, TapConfig::default())
                .map_err(|err| chain(&err))?,
        );

        let target = work.join("target");
        fs::create_dir_all(target.join("journal")).map_err(e("target dir"))?;
        let base: Arc<dyn BlockIo> =
            Arc::new(FileIo::create(target.join("base.img"), size).map_err(e("blank base image"))?);
        let journal_dir = Arc::new(FsDir::new(target.join("journal")).map_err(e("journal dir"))?);
        let (log, _) = RetentionLog::open(
            journal_dir,
            vec![base],
            RetentionConfig { segment_bytes: 8 << 20, ..Default::default() },
            Arc::new(SystemClock),
        )
        .map_err(|err| chain(&err))?;
        let (source_keys, target_keys) = paired();
        let mut rcfg = ReceiverConfig::new("lab-target", PAIR, target_keys);
        rcfg.sync_bytes = 1 << 20;
        let receiver = Receiver::new(log, rcfg).map_err(|err| chain(&err))?;

        let hello = Hello {
            versions: SUPPORTED_VERSIONS,
            role: Role::Source,
            node: "lab-source".to_owned(),
            pair: PAIR,
            volumes: vec![VolumeInfo { id: VolumeId(0), block_size: BLOCK as u32, size }],
        };
        let mut scfg = ShipperConfig::new(hello, source_keys);
        scfg.poll_interval = Duration::from_millis(10);
        scfg.backoff = Backoff {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(50),
            factor: 2,
        };
        let served = receiver.clone();
        let shipper = Shipper::new(tap.shared_spool(), scfg)
            .start(move || {
                let (a, b) = duplex(1 << 20);
                let r = served.clone();
                thread::spawn(move || {
                    let _ = r.serve(b);
                });
                Ok::<_, std::io::Error>(a)
            })
            .map_err(|err| chain(&err))?;

        let mut rig =
            Rig { tap, device, receiver, shipper: Some(shipper), pair: None, server: None };
        let mut pcfg = SourcePairConfig::new(SyncerConfig::new(VolumeId(0)));
        pcfg.tick = Duration::from_millis(50);
        pcfg.fresh = true;
        let hash_client = rig.shipper()?.hash_client();
        rig.pair =
            Some(SourcePair::start(rig.tap.clone(), hash_client, pcfg).map_err(|err| chain(&err))?);
        rig.server = Some(
            UblkServer::start(UblkConfig::default(), rig.tap.clone(), rig.device.clone())
                .map_err(|err| chain(&err))?,
        );
        Ok(rig)
    }

    fn shipper(&self) -> TestResult<&ShipperHandle> {
        self.shipper.as_ref().ok_or_else(|| "the shipper is stopped".to_owned())
    }

    fn pair(&self) -> TestResult<&SourcePair> {
        self.pair.as_ref().ok_or_else(|| "the pair is stopped".to_owned())
    }

    fn block_path(&self) -> TestResult<PathBuf> {
        Ok(self.server.as_ref().ok_or("the ublk server is stopped")?.block_path())
    }

    /// Waits until the pair finished step I and streams (the target acknowledged the
    /// initial sync's end).
    fn wait_initial_sync(&self) -> TestResult {
        let pair = self.pair()?;
        pair.wait_for(PATIENCE, |s| s.stage == PairStage::DiffSync && s.resyncs >= 1)
            .map(|_| ())
            .ok_or_else(|| format!("the initial sync did not finish: {:?}", pair.status()))
    }

    /// Waits until the target acknowledged everything the tap spooled; returns that seq.
    fn caught_up(&self) -> TestResult<Seq> {
        let last = self.tap.sync_spool().map_err(|err| chain(&err))?;
        let shipper = self.shipper()?;
        shipper.notify();
        shipper
            .wait_for(PATIENCE, |s| s.acked >= last)
            .map(|_| last)
            .ok_or_else(|| format!("not caught up to seq {last}: {:?}", shipper.status()))
    }

    /// Stops the device, the pair, the shipper and the receiver, and closes the tap.
    fn stop(mut self) -> TestResult {
        let mut problems = Vec::new();
        if let Some(server) = self.server.take() {
            if let Err(err) = server.stop() {
                problems.push(format!("ublk server stop: {}", chain(&err)));
            }
        }
        if let Some(pair) = self.pair.take() {
            pair.stop();
        }
        if let Some(shipper) = self.shipper.take() {
            shipper.stop();
        }
        self.receiver.shutdown();
        let tap = self.tap.clone();
        drop(self);
        match Arc::try_unwrap(tap) {
            Ok(tap) => {
                if let Err(err) = tap.close() {
                    problems.push(format!("tap close: {}", chain(&err)));
                }
            }
            Err(_) => problems.push("the tap is still shared after every user stopped".into()),
        }
        ensure!(problems.is_empty(), "{}", problems.join("; "));
        Ok(())
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            let _ = server.stop();
        }
        if let Some(pair) = self.pair.take() {
            pair.stop();
        }
        if let Some(shipper) = self.shipper.take() {
            shipper.stop();
        }
        self.receiver.shutdown();
    }
}

// ------------------------------------------------------------------------------------------
// The workload
// ------------------------------------------------------------------------------------------

/// The filesystem's files under [`DATA_DIR`] (relative path -> BLAKE3 of the contents).
type Tree = BTreeMap<String, blake3::Hash>;

/// A bookmark taken after a round: its name, the files then, and the whole device's hash.
struct Taken {
    name: String,
    files: Tree,
    device: blake3::Hash,
}

/// Round `round`'s changes to the tree: six new files in `r<round>/` (16 KiB to 336 KiB),
/// `shared.bin` rewritten, and from round 3 on the first file of round `round - 2` deleted.
fn round_changes(round: u64) -> (Vec<(String, Vec<u8>)>, Vec<String>) {
    let mut writes = Vec::new();
    for i in 0..6u64 {
        let len = (16 << 10) + ((round * 7 + i * 13) % 21) as usize * (16 << 10);
        // Not a multiple of the block size: the tail block is partial.
        writes.push((format!("r{round}/f{i}.bin"), pattern(round * 100 + i, len - 123)));
    }
    writes.push(("shared.bin".to_owned(), pattern(9_000 + round, 200 << 10)));
    let deletes = if round >= 3 { vec![format!("r{}/f0.bin", round - 2)] } else { Vec::new() };
    (writes, deletes)
}

/// Mounts the device, applies round `round` to the files and to `tree`, syncs, unmounts.
fn write_round(dev: &str, mnt: &Path, round: u64, tree: &mut Tree) -> TestResult {
    let mnt_s = path_str(mnt)?;
    run("mount", &["-t", "ext4", dev, mnt_s])?;
    let applied = (|| -> TestResult {
        let (writes, deletes) = round_changes(round);
        for (name, data) in &writes {
            let path = mnt.join(DATA_DIR).join(name);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).map_err(e(&format!("mkdir {}", parent.display())))?;
            }
            fs::write(&path, data).map_err(e(&format!("write {}", path.display())))?;
            tree.insert(name.clone(), blake3::hash(data));
        }
        for name in &deletes {
            let path = mnt.join(DATA_DIR).join(name);
            fs::remove_file(&path).map_err(e(&format!("remove {}", path.display())))?;
            tree.remove(name);
        }
        run("sync", &[]).map(|_| ())
    })();
    let unmounted = run("umount", &[mnt_s]);
    applied?;
    unmounted.map(|_| ())
}

/// The files under `root` (relative path -> BLAKE3 of the contents).
fn read_tree(root: &Path) -> TestResult<Tree> {
    let mut tree = Tree::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).map_err(e(&format!("read dir {}", dir.display())))? {
            let path = entry.map_err(e("dir entry"))?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let data = fs::read(&path).map_err(e(&format!("read {}", path.display())))?;
            let rel = path.strip_prefix(root).map_err(e("relative path"))?;
            tree.insert(path_str(rel)?.to_owned(), blake3::hash(&data));
        }
    }
    Ok(tree)
}

/// What differs between the expected and the found tree, for a failure message.
fn tree_difference(expected: &Tree, found: &Tree) -> String {
    let mut out = Vec::new();
    for (name, hash) in expected {
        match found.get(name) {
            None => out.push(format!("{name} missing")),
            Some(h) if h != hash => out.push(format!("{name} has other contents")),
            Some(_) => {}
        }
    }
    out.extend(found.keys().filter(|n| !expected.contains_key(*n)).map(|n| format!("{n} extra")));
    out.join(", ")
}

// ------------------------------------------------------------------------------------------
// Tests
// ------------------------------------------------------------------------------------------

/// Data on the volume before protection begins (what step I must copy): a pattern in a
/// few places, so that the replica is wrong unless the initial sync ran.
fn prefill(volume: &Path) -> TestResult {
    let io = FileIo::create(volume, VOLUME).map_err(e("create the volume"))?;
    for (i, at) in [0u64, 5 << 20, 77 << 20, VOLUME - (1 << 20)].into_iter().enumerate() {
        io.write_at(&pattern(500 + i as u64, 1 << 20), at).map_err(e("prefill"))?;
    }
    io.sync().map_err(e("prefill sync"))
}

/// Test 1: the pair starts fresh, the device comes up, mkfs.ext4 runs through it while
/// step I may still run, and step I completes.
fn test_protect(work: &Path) -> TestResult<Rig> {
    prefill(&work.join("volume.img"))?;
    let rig = Rig::start(work)?;
    let dev = rig.block_path()?;
    run(
        "mkfs.ext4",
        &["-F", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", path_str(&dev)?],
    )?;
    let during_mkfs = rig.pair()?.status().stage;
    rig.wait_initial_sync()?;
    let status = rig.pair()?.status();
    let report = status.last_resync.as_ref().ok_or("no initial sync report")?;
    ensure!(report.data_bytes > 0, "step I sent no data although the volume held some");
    println!(
        "{PREFIX} info initial sync: {} data bytes, {} zero bytes left out; stage when mkfs ended: {}",
        report.data_bytes,
        report.zero_bytes,
        during_mkfs.name()
    );
    Ok(rig)
}

/// Test 2: the workload rounds, a bookmark after each while the filesystem is unmounted;
/// records each bookmark's files and the device's hash then.
fn test_rounds(rig: &Rig, work: &Path) -> TestResult<Vec<Taken>> {
    let dev = rig.block_path()?;
    let dev_s = path_str(&dev)?;
    let mnt = work.join("mnt");
    fs::create_dir_all(&mnt).map_err(e("mkdir mount point"))?;
    let mut tree = Tree::new();
    let mut taken = Vec::new();
    for round in 1..=ROUNDS {
        write_round(dev_s, &mnt, round, &mut tree)?;
        if round == 1 {
            // A bookmark inside step I's window would be no consistent point.
            rig.wait_initial_sync()?;
        }
        let name = format!("round-{round}");
        // The filesystem is unmounted: every write completed (and went through the tap)
        // and umount's flush reached the device; nothing writes until the next mount.
        let device = hash_volume(&*rig.device, VOLUME)?;
        let bookmark =
            Bookmark::new(name.clone(), BookmarkKind::User, 0).map_err(|err| chain(&err))?;
        rig.tap.bookmark(bookmark).map_err(|err| chain(&err))?;
        taken.push(Taken { name, files: tree.clone(), device });
    }
    // Each round changed the device: a check resolving the wrong bookmark cannot pass.
    for (i, a) in taken.iter().enumerate() {
        for b in &taken[i + 1..] {
            ensure!(
                a.device != b.device,
                "the device did not change between {} and {}",
                a.name,
                b.name
            );
        }
    }
    let stats = rig.server.as_ref().ok_or("no server")?.stats();
    ensure!(stats.errors == 0, "requests failed: {stats:?}");
    println!(
        "{PREFIX} info workload: {ROUNDS} rounds, {} files at the end; server saw {} writes, {} flushes, {} discards",
        tree.len(),
        stats.writes,
        stats.flushes,
        stats.discards
    );
    Ok(taken)
}

/// Test 3 (one per bookmark): the point materialized from the retention log is the device
/// as it was at the bookmark, e2fsck-clean, and holds exactly the files written by then.
fn test_bookmark(rig: &Rig, work: &Path, taken: &Taken) -> TestResult {
    let image = work.join("point.img");
    let dump = work.join("dump");
    let _ = fs::remove_dir_all(&dump);
    fs::create_dir_all(&dump).map_err(e("mkdir dump"))?;
    let out = FileIo::create(&image, 0).map_err(e("create the point image"))?;
    let report = rig.receiver.with_log(|log| {
        let point =
            log.resolve(&RecoveryPoint::Bookmark(taken.name.clone())).map_err(|err| chain(&err))?;
        log.materialize(&point, VolumeId(0), &out, &mut |_, _| {}).map_err(|err| chain(&err))
    })?;
    drop(out);
    let checked = (|| -> TestResult {
        ensure!(
            report.hash == *taken.device.as_bytes(),
            "the materialized image is not the device as it was at the bookmark ({} journal blocks)",
            report.journal_blocks
        );
        let image_s = path_str(&image)?;
        run("e2fsck", &["-fn", image_s])?;
        let request = format!("rdump /{DATA_DIR} {}", path_str(&dump)?);
        run("debugfs", &["-R", &request, image_s])?;
        let found = read_tree(&dump.join(DATA_DIR))?;
        ensure!(
            found == taken.files,
            "files at the bookmark differ: {}",
            tree_difference(&taken.files, &found)
        );
        Ok(())
    })();
    let _ = fs::remove_file(&image);
    let _ = fs::remove_dir_all(&dump);
    checked
}

/// Test 4: the latest point is the device byte for byte, and it is everything spooled.
fn test_latest(rig: &Rig, last: Seq) -> TestResult {
    let mut replica = vec![0u8; 4 << 20];
    let mut device = vec![0u8; 4 << 20];
    rig.receiver.with_log(|log| {
        let latest = log.resolve(&RecoveryPoint::Latest).map_err(|err| chain(&err))?;
        ensure!(
            latest.seq == last,
            "latest point at seq {}, the tap spooled up to {last}",
            latest.seq
        );
        let mut at = 0;
        while at < VOLUME {
            let n = (VOLUME - at).min(replica.len() as u64) as usize;
            log.read_at(&latest, VolumeId(0), at, &mut replica[..n]).map_err(|err| chain(&err))?;
            rig.device.read_at(&mut device[..n], at).map_err(e("read the device"))?;
            if let Some(i) = replica[..n].iter().zip(&device[..n]).position(|(a, b)| a != b) {
                return Err(format!(
                    "the latest point differs from the device at byte {}",
                    at + i as u64
                ));
            }
            at += n as u64;
        }
        Ok(())
    })
}

// ------------------------------------------------------------------------------------------
// Drivers
// ------------------------------------------------------------------------------------------

/// Counts outcomes and prints a PASS or FAIL line for each.
#[derive(Default)]
struct Tally {
    passed: u32,
    total: u32,
}

impl Tally {
    /// Runs `f`, catching panics, and reports it; returns its value when it passed.
    fn report<T>(&mut self, name: &str, f: impl FnOnce() -> TestResult<T>) -> Option<T> {
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
        self.total += 1;
        match outcome {
            Ok(value) => {
                self.passed += 1;
                println!("{PREFIX} PASS {name} ({secs:.1}s)");
                Some(value)
            }
            Err(err) => {
                println!("{PREFIX} FAIL {name} ({secs:.1}s): {err}");
                None
            }
        }
    }

    /// The summary line; success when everything passed.
    fn finish(self) -> ExitCode {
        if self.passed == self.total {
            println!("{PREFIX} PASS {} tests", self.total);
            ExitCode::SUCCESS
        } else {
            println!("{PREFIX} FAIL {} of {} tests", self.total - self.passed, self.total);
            ExitCode::FAILURE
        }
    }
}

/// Every test, in `work`. A test whose prerequisite failed is reported failed, so the
/// count stays the same.
fn run_all(work: &Path) -> ExitCode {
    let mut tally = Tally::default();
    let rig = tally.report("repl_protect_initial_sync", || {
        fs::create_dir_all(work).map_err(e("mkdir work"))?;
        ublk::probe(Path::new(ublk::sys::CONTROL_PATH)).map_err(|err| chain(&err))?;
        test_protect(work)
    });
    let taken = tally.report("repl_ext4_rounds_bookmarked", || match &rig {
        Some(rig) => test_rounds(rig, work),
        None => Err("needs repl_protect_initial_sync".into()),
    });
    let last = tally.report("repl_target_caught_up", || match &rig {
        Some(rig) => rig.caught_up(),
        None => Err("needs repl_protect_initial_sync".into()),
    });
    for round in 1..=ROUNDS {
        let name = format!("round-{round}");
        tally.report(&format!("repl_bookmark_{name}_fsck_clean_files_match"), || {
            let (Some(rig), Some(taken), Some(_)) = (&rig, &taken, last) else {
                return Err("needs the rounds and the target caught up".into());
            };
            let taken = taken.iter().find(|t| t.name == name).ok_or("bookmark not taken")?;
            test_bookmark(rig, work, taken)
        });
    }
    tally.report("repl_latest_equals_device", || match (&rig, last) {
        (Some(rig), Some(last)) => test_latest(rig, last),
        _ => Err("needs the target caught up".into()),
    });
    tally.report("repl_clean_stop", || match rig {
        Some(rig) => rig.stop(),
        None => Err("needs repl_protect_initial_sync".into()),
    });
    tally.finish()
}

fn lab_main() -> ExitCode {
    let work = PathBuf::from("/tmp/replication-lab");
    let _ = fs::remove_dir_all(&work);
    run_all(&work)
}

fn host_main() -> ExitCode {
    let control = Path::new(ublk::sys::CONTROL_PATH);
    if let Err(err) = ublk::probe(control) {
        let rule = "!".repeat(78);
        eprintln!(
            "\n{rule}\n!!! SKIPPED: no ublk_drv on this kernel (run cargo xtask lab)\n!!! ({})\n{rule}\n",
            chain(&err)
        );
        println!("ublk_replication_lab: SKIPPED (no ublk_drv on this kernel; run cargo xtask lab)");
        return ExitCode::SUCCESS;
    }
    let dir = match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(err) => {
            eprintln!("ublk_replication_lab: tempdir: {err}");
            return ExitCode::FAILURE;
        }
    };
    run_all(dir.path())
}
