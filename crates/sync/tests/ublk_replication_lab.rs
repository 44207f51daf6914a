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
//! A second test kills the source agent: a child process (this binary, `agent ...`) holds
//! the tap, its spool and write-intent map, the shipper, the `SourcePair` and the ublk
//! server with user recovery, and ships over TCP on the guest's loopback to a receiver in
//! the test process (which survives). Writers in the test process stream O_DIRECT writes
//! through the device; the agent is killed with SIGKILL mid-stream; a new agent reopens the
//! spool and the map, reattaches the device (`UblkServer::recover`) and its pair resyncs
//! the map's dirty regions. Every acknowledged write must read back whole, the resync must
//! have compared no more than the dirty regions (and less than the volume), and the
//! replica must equal the device.
//!
//! - `ublk_replication_lab --lab`: the guest run; prints `TIDEMARK-LAB: PASS <test>` /
//!   `TIDEMARK-LAB: FAIL <test>: <why>` per test, then `TIDEMARK-LAB: PASS <n> tests` or
//!   `TIDEMARK-LAB: FAIL <k> of <n> tests`. A missing `/dev/ublk-control` is a failure.
//! - no argument (as `cargo test` runs it): without `/dev/ublk-control` it says loudly
//!   that it skipped; on a host with `ublk_drv`, root and e2fsprogs it runs the same tests
//!   in a temporary directory.

mod common;
mod lab_common;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use std::{env, thread};

use common::paired;
use lab_common::{PREFIX, Tally, TestResult, e, ensure, path_str, pattern, run};
use tidemark_journal::{
    BlockIo, Bookmark, BookmarkKind, FileIo, FsDir, RecoveryPoint, RetentionConfig, RetentionLog,
    Seq, Spool, SpoolConfig, SystemClock, VolumeId,
};
use tidemark_sync::apply::{Receiver, ReceiverConfig};
use tidemark_sync::pair::{PairStage, SourcePair, SourcePairConfig};
use tidemark_sync::secure::{AllowedPeers, Keypair, SecureConfig};
use tidemark_sync::ship::error_chain as chain;
use tidemark_sync::ship::{Backoff, Shipper, ShipperConfig, ShipperHandle};
use tidemark_sync::syncer::SyncerConfig;
use tidemark_sync::wire::{Hello, PairId, Role, SUPPORTED_VERSIONS, VolumeInfo};
use tidemark_tap::{IntentConfig, IntentMap, Tap, TapConfig, UblkConfig, UblkServer, ublk};

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

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("agent") => agent_main(&args[1..]),
        Some("--lab") => lab_main(),
        _ => host_main(),
    }
}

// ------------------------------------------------------------------------------------------
// Shared pieces
// ------------------------------------------------------------------------------------------

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
            .start(move || common::pipe_to(&served))
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
// Kill -9 of the source agent, user recovery, resync of the dirty regions
// ------------------------------------------------------------------------------------------

/// The crash test's volume (small: the guest runs under TCG).
const CRASH_VOLUME: u64 = 32 << 20;
/// The crash test's intent-map region.
const CRASH_REGION: u64 = 1 << 20;
const CRASH_PAIR: PairId = PairId([0x2c; 16]);
/// The crash test's writes: 64 KiB, so a torn one (part old, part new) would show.
const CRASH_WRITE: usize = 64 << 10;
const CRASH_WRITERS: u64 = 4;
/// Blocks each writer may use: the writers stay inside the first 24 MiB of the volume.
const CRASH_MAX_PER_WRITER: u64 = 96;
/// Acknowledged writes (all writers) before the kill.
const CRASH_KILL_AFTER: u64 = 40;
/// Writes each writer makes after it saw the new agent attached.
const CRASH_AFTER_RECOVERY: u64 = 6;

/// Keys both processes derive (the agent is another process): fixed test secrets.
fn crash_keys() -> (SecureConfig, SecureConfig) {
    let s = Keypair::from_secret([0x51; 32]);
    let t = Keypair::from_secret([0x7a; 32]);
    let mut source = SecureConfig::new(s.clone(), AllowedPeers::from_keys([*t.public()]));
    let mut target = SecureConfig::new(t, AllowedPeers::from_keys([*s.public()]));
    source.io_timeout = Some(Duration::from_secs(10));
    target.io_timeout = Some(Duration::from_secs(10));
    (source, target)
}

fn crash_intent_cfg() -> IntentConfig {
    IntentConfig { region_bytes: CRASH_REGION, max_hot_regions: 4096, max_runs: 1024 }
}

/// `agent --work DIR --port P [--recover DEV_ID]`: the source side of the crash test in its
/// own process, shipping to `127.0.0.1:P`. Prints `READY <dev_id> <bytes of the regions the
/// intent map held dirty when opened>`; answers each `synced` line on its standard input,
/// once the pair streams (after its resync, when one was due) and the target acknowledged
/// everything spooled, with `SYNCED <seq> <resyncs> <bytes the last resync compared> <max
/// requests in flight on a queue>`; at the end of its input stops everything and prints
/// `STOPPED`. Any failure prints `ERROR <why>`.
fn agent_main(args: &[String]) -> ExitCode {
    let mut work = None;
    let mut port = None;
    let mut recover = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--work" => work = it.next().map(PathBuf::from),
            "--port" => port = it.next().and_then(|s| s.parse::<u16>().ok()),
            "--recover" => recover = it.next().and_then(|s| s.parse::<u32>().ok()),
            other => {
                println!("ERROR unknown argument {other}");
                return ExitCode::FAILURE;
            }
        }
    }
    let (Some(work), Some(port)) = (work, port) else {
        println!("ERROR agent needs --work and --port");
        return ExitCode::FAILURE;
    };
    match run_agent(&work, port, recover) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            println!("ERROR {err}");
            ExitCode::FAILURE
        }
    }
}

fn say(line: &str) -> TestResult {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).map_err(e("stdout"))
}

fn run_agent(work: &Path, port: u16, recover: Option<u32>) -> TestResult {
    let device: Arc<dyn BlockIo> =
        Arc::new(FileIo::open(work.join("volume.img")).map_err(e("open the volume"))?);
    let size = device.len().map_err(e("volume length"))?;
    fs::create_dir_all(work.join("spool")).map_err(e("spool dir"))?;
    let spool_dir = Arc::new(FsDir::new(work.join("spool")).map_err(e("spool dir"))?);
    let cfg = SpoolConfig { capacity_bytes: 128 << 20, segment_bytes: 8 << 20, key: None };
    let (spool, _) =
        Spool::open(spool_dir, cfg, Arc::new(SystemClock)).map_err(|err| chain(&err))?;
    let map_path = work.join("intent.map");
    let map_io: Arc<dyn BlockIo> = if map_path.exists() {
        Arc::new(FileIo::open(&map_path).map_err(e("open the intent map"))?)
    } else {
        Arc::new(FileIo::create(&map_path, 0).map_err(e("create the intent map"))?)
    };
    let (intent, opened) =
        IntentMap::open(map_io, size, crash_intent_cfg()).map_err(|err| chain(&err))?;
    let dirty_bytes = opened.dirty.region_count() * CRASH_REGION;
    let tap = Arc::new(
        Tap::new(device.clone(), spool, intent, TapConfig::default()).map_err(|err| chain(&err))?,
    );
    let hello = Hello {
        versions: SUPPORTED_VERSIONS,
        role: Role::Source,
        node: "crash-source".to_owned(),
        pair: CRASH_PAIR,
        volumes: vec![VolumeInfo { id: VolumeId(0), block_size: BLOCK as u32, size }],
    };
    let mut scfg = ShipperConfig::new(hello, crash_keys().0);
    scfg.poll_interval = Duration::from_millis(10);
    scfg.backoff =
        Backoff { initial: Duration::from_millis(5), max: Duration::from_millis(100), factor: 2 };
    let shipper = Shipper::new(tap.shared_spool(), scfg)
        .start(move || {
            let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
            stream.set_nodelay(true)?;
            Ok(stream)
        })
        .map_err(|err| chain(&err))?;
    let mut pcfg = SourcePairConfig::new(SyncerConfig::new(VolumeId(0)));
    pcfg.tick = Duration::from_millis(50);
    pcfg.fresh = recover.is_none();
    let pair =
        SourcePair::start(tap.clone(), shipper.hash_client(), pcfg).map_err(|err| chain(&err))?;
    let server = match recover {
        Some(id) => UblkServer::recover(id, UblkConfig::default(), tap.clone(), device),
        None => UblkServer::start(UblkConfig::default(), tap.clone(), device),
    }
    .map_err(|err| chain(&err))?;
    let resync_due = recover.is_none() || opened.dirty.region_count() > 0;
    say(&format!("READY {} {dirty_bytes}", server.dev_id()))?;

    for line in std::io::stdin().lock().lines() {
        if line.map_err(e("stdin"))?.trim() != "synced" {
            continue;
        }
        let status = pair
            .wait_for(PATIENCE, |s| {
                s.stage == PairStage::DiffSync && (s.resyncs >= 1 || !resync_due)
            })
            .ok_or_else(|| format!("the pair did not reach diff sync: {:?}", pair.status()))?;
        let last = tap.sync_spool().map_err(|err| chain(&err))?;
        shipper.notify();
        shipper
            .wait_for(PATIENCE, |s| s.acked >= last)
            .ok_or_else(|| format!("not caught up to seq {last}: {:?}", shipper.status()))?;
        let compared = status.last_resync.as_ref().map_or(0, |r| r.volume_bytes);
        say(&format!(
            "SYNCED {} {} {compared} {}",
            last.0,
            status.resyncs,
            server.stats().max_in_flight
        ))?;
    }
    server.stop().map_err(|err| chain(&err))?;
    pair.stop();
    shipper.stop();
    let tap = Arc::try_unwrap(tap).map_err(|_| "the tap is still shared".to_owned())?;
    tap.close().map_err(|err| chain(&err))?;
    say("STOPPED")
}

/// An agent child process.
struct Agent {
    child: Child,
    stdin: Option<ChildStdin>,
    out: BufReader<ChildStdout>,
    dev_id: u32,
    /// Bytes of the regions its intent map held dirty when it opened it.
    dirty_bytes: u64,
    reaped: bool,
}

/// What an agent said when asked `synced`.
struct Synced {
    seq: u64,
    resyncs: u64,
    compared: u64,
    max_in_flight: u64,
}

impl Agent {
    fn spawn(work: &Path, port: u16, recover: Option<u32>) -> TestResult<Agent> {
        let exe = env::current_exe().map_err(e("current exe"))?;
        let mut cmd = Command::new(exe);
        cmd.arg("agent").arg("--work").arg(work).arg("--port").arg(port.to_string());
        if let Some(id) = recover {
            cmd.arg("--recover").arg(id.to_string());
        }
        let mut child =
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().map_err(e("spawn agent"))?;
        let stdin = child.stdin.take();
        let out = child.stdout.take().map(BufReader::new);
        let mut agent = Agent {
            child,
            stdin,
            out: out.ok_or("no agent stdout")?,
            dev_id: 0,
            dirty_bytes: 0,
            reaped: false,
        };
        let line = agent.line()?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["READY", id, dirty] => {
                agent.dev_id = id.parse().map_err(e("device id"))?;
                agent.dirty_bytes = dirty.parse().map_err(e("dirty bytes"))?;
                Ok(agent)
            }
            _ => Err(format!("the agent did not start: {line}")),
        }
    }

    fn line(&mut self) -> TestResult<String> {
        let mut line = String::new();
        let n = self.out.read_line(&mut line).map_err(e("agent output"))?;
        ensure!(n > 0, "the agent ended without a word");
        Ok(line.trim().to_owned())
    }

    fn synced(&mut self) -> TestResult<Synced> {
        let stdin = self.stdin.as_mut().ok_or("agent input closed")?;
        writeln!(stdin, "synced").and_then(|()| stdin.flush()).map_err(e("agent input"))?;
        let line = self.line()?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let num = |s: &str| s.parse::<u64>().map_err(e("agent's number"));
        match words.as_slice() {
            ["SYNCED", seq, resyncs, compared, max] => Ok(Synced {
                seq: num(seq)?,
                resyncs: num(resyncs)?,
                compared: num(compared)?,
                max_in_flight: num(max)?,
            }),
            _ => Err(format!("the agent did not sync: {line}")),
        }
    }

    /// Closes its input: it stops everything and must say `STOPPED` and exit 0.
    fn stop(mut self) -> TestResult {
        drop(self.stdin.take());
        let line = self.line()?;
        let status = self.child.wait().map_err(e("wait for the agent"))?;
        self.reaped = true;
        ensure!(status.success() && line == "STOPPED", "the agent ended with {status}: {line}");
        Ok(())
    }

    /// SIGKILL, and reaped.
    fn kill(mut self) -> TestResult {
        self.child.kill().map_err(e("kill -9 the agent"))?;
        self.child.wait().map_err(e("reap the agent"))?;
        self.reaped = true;
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A receiver serving every connection accepted on a loopback port, until dropped.
struct TcpTarget {
    receiver: Receiver,
    port: u16,
    stopping: Arc<AtomicBool>,
    acceptor: Option<thread::JoinHandle<()>>,
}

impl TcpTarget {
    fn start(dir: &Path) -> TestResult<TcpTarget> {
        fs::create_dir_all(dir.join("journal")).map_err(e("target dir"))?;
        let base: Arc<dyn BlockIo> = Arc::new(
            FileIo::create(dir.join("base.img"), CRASH_VOLUME).map_err(e("blank base image"))?,
        );
        let journal_dir = Arc::new(FsDir::new(dir.join("journal")).map_err(e("journal dir"))?);
        let (log, _) = RetentionLog::open(
            journal_dir,
            vec![base],
            RetentionConfig { segment_bytes: 8 << 20, ..Default::default() },
            Arc::new(SystemClock),
        )
        .map_err(|err| chain(&err))?;
        let mut rcfg = ReceiverConfig::new("crash-target", CRASH_PAIR, crash_keys().1);
        rcfg.sync_bytes = 1 << 20;
        let receiver = Receiver::new(log, rcfg).map_err(|err| chain(&err))?;
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(e("listen"))?;
        let port = listener.local_addr().map_err(e("listen address"))?.port();
        let stopping = Arc::new(AtomicBool::new(false));
        let (served, stop) = (receiver.clone(), stopping.clone());
        let acceptor = thread::spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                if let Ok(stream) = stream {
                    let _ = stream.set_nodelay(true);
                    let r = served.clone();
                    thread::spawn(move || {
                        let _ = r.serve(stream);
                    });
                }
            }
        });
        Ok(TcpTarget { receiver, port, stopping, acceptor: Some(acceptor) })
    }
}

impl Drop for TcpTarget {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        // Wake the acceptor with a connection of our own.
        let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        self.receiver.shutdown();
    }
}

/// A buffer aligned for O_DIRECT, without unsafe code: a larger vector and the aligned
/// window into it.
struct Aligned {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let align = BLOCK as usize;
        let raw = vec![0u8; len + align];
        let start = (align - raw.as_ptr() as usize % align) % align;
        Aligned { raw, start, len }
    }
    fn get(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

fn open_direct(path: &Path) -> TestResult<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(e(&format!("open {} O_DIRECT", path.display())))
}

/// Block `i` of the crash test: a pattern with its number in the first 8 bytes.
fn crash_block(i: u64) -> Vec<u8> {
    let mut b = pattern(7_000 + i, CRASH_WRITE);
    b[..8].copy_from_slice(&i.to_le_bytes());
    b
}

/// Writer `t` of the crash test: writes blocks `t`, `t + WRITERS`, ... in turn (O_DIRECT,
/// each acknowledged before the next), counting acknowledgements in `acked`, until it has
/// made [`CRASH_AFTER_RECOVERY`] writes after `recovered` was set (or used all its blocks).
/// Returns how many blocks it wrote.
fn crash_writer(dev: &Path, t: u64, acked: &AtomicU64, recovered: &AtomicBool) -> TestResult<u64> {
    let file = open_direct(dev)?;
    let mut buf = Aligned::new(CRASH_WRITE);
    let mut after = 0;
    for k in 0..CRASH_MAX_PER_WRITER {
        if after >= CRASH_AFTER_RECOVERY {
            file.sync_all().map_err(e("fsync"))?;
            return Ok(k);
        }
        if recovered.load(Ordering::Acquire) {
            after += 1;
        }
        let i = t + CRASH_WRITERS * k;
        buf.get().copy_from_slice(&crash_block(i));
        file.write_all_at(buf.get(), i * CRASH_WRITE as u64)
            .map_err(e(&format!("writer {t}: write of block {i}")))?;
        acked.fetch_add(1, Ordering::AcqRel);
    }
    file.sync_all().map_err(e("fsync"))?;
    Ok(CRASH_MAX_PER_WRITER)
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) -> TestResult {
    let start = Instant::now();
    while !done() {
        ensure!(start.elapsed() < PATIENCE, "timed out after {PATIENCE:?} waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The kill -9 test (see the module documentation).
fn test_kill9_recovery(work: &Path) -> TestResult<String> {
    fs::create_dir_all(work).map_err(e("mkdir work"))?;
    FileIo::create(work.join("volume.img"), CRASH_VOLUME).map_err(e("create the volume"))?;
    let target = TcpTarget::start(&work.join("target"))?;
    let first = Agent::spawn(work, target.port, None)?;
    let dev_id = first.dev_id;
    let mut first = first;
    let initial = first.synced()?;
    ensure!(initial.resyncs >= 1, "the first agent's initial sync did not run");
    let dev = PathBuf::from(format!("{}{dev_id}", ublk::sys::BLOCK_PREFIX));

    let acked = Arc::new(AtomicU64::new(0));
    let recovered = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..CRASH_WRITERS)
        .map(|t| {
            let (dev, acked, recovered) = (dev.clone(), acked.clone(), recovered.clone());
            thread::spawn(move || crash_writer(&dev, t, &acked, &recovered))
        })
        .collect();
    let waited = wait_until("the writes before the kill", || {
        acked.load(Ordering::Acquire) >= CRASH_KILL_AFTER || writers.iter().all(|w| w.is_finished())
    });
    first.kill()?;
    let acked_at_kill = acked.load(Ordering::Acquire);
    waited?;
    ensure!(
        !writers.iter().all(|w| w.is_finished()),
        "the writers ended before the kill: {acked_at_kill} writes"
    );

    // Writes are in progress at the kill, so the map normally holds dirty regions. If every
    // write before the kill had been acknowledged and cleared already, kill the new agent
    // again mid-write (the writers keep going until `recovered` is set).
    let mut kills = 1;
    let mut second = loop {
        let agent = Agent::spawn(work, target.port, Some(dev_id))?;
        ensure!(agent.dev_id == dev_id, "recovered device {}, expected {dev_id}", agent.dev_id);
        if agent.dirty_bytes > 0 || kills >= 5 {
            break agent;
        }
        let at = acked.load(Ordering::Acquire);
        wait_until("writes through the recovered agent", || {
            acked.load(Ordering::Acquire) >= at + 8 || writers.iter().all(|w| w.is_finished())
        })?;
        agent.kill()?;
        kills += 1;
    };
    recovered.store(true, Ordering::Release);
    wait_until("the writers after recovery", || writers.iter().all(|w| w.is_finished()))?;
    let mut written = Vec::new();
    for (t, w) in writers.into_iter().enumerate() {
        let count = w.join().map_err(|_| format!("writer {t} panicked"))??;
        written.push(count);
    }

    // No acknowledged write lost or torn: each block reads back whole through the device,
    // and the rest of the writers' area still holds zeros.
    let span = CRASH_WRITERS * CRASH_MAX_PER_WRITER * CRASH_WRITE as u64;
    let file = open_direct(&dev)?;
    let mut buf = Aligned::new(CRASH_WRITE);
    for i in 0..span / CRASH_WRITE as u64 {
        file.read_exact_at(buf.get(), i * CRASH_WRITE as u64).map_err(e("read back"))?;
        let (t, k) = (i % CRASH_WRITERS, i / CRASH_WRITERS);
        let expected =
            if k < written[t as usize] { crash_block(i) } else { vec![0u8; CRASH_WRITE] };
        ensure!(
            buf.get()[..] == expected[..],
            "block {i} (writer {t}, write {k} of {}) reads back wrong (bytes 0..8: {:?})",
            written[t as usize],
            &buf.get()[..8]
        );
    }
    drop(file);

    let synced = second.synced()?;
    let dirty = second.dirty_bytes;
    second.stop()?;
    ensure!(dirty > 0, "the intent map held no dirty region after the kill");
    ensure!(synced.resyncs >= 1, "the recovered agent's pair ran no resync");
    ensure!(
        synced.compared <= dirty && synced.compared < CRASH_VOLUME,
        "the resync compared {} bytes; the map's dirty regions hold {dirty}, the volume {CRASH_VOLUME}",
        synced.compared
    );

    // The replica's latest point is the device, byte for byte.
    let device = FileIo::open_read_only(work.join("volume.img")).map_err(e("open the volume"))?;
    let mut replica = vec![0u8; 4 << 20];
    let mut local = vec![0u8; 4 << 20];
    target.receiver.with_log(|log| {
        let latest = log.resolve(&RecoveryPoint::Latest).map_err(|err| chain(&err))?;
        ensure!(
            latest.seq.0 == synced.seq,
            "latest point at seq {}, the agent spooled up to {}",
            latest.seq,
            synced.seq
        );
        let mut at = 0;
        while at < CRASH_VOLUME {
            let n = (CRASH_VOLUME - at).min(replica.len() as u64) as usize;
            log.read_at(&latest, VolumeId(0), at, &mut replica[..n]).map_err(|err| chain(&err))?;
            device.read_at(&mut local[..n], at).map_err(e("read the volume"))?;
            if let Some(i) = replica[..n].iter().zip(&local[..n]).position(|(a, b)| a != b) {
                return Err(format!(
                    "the replica differs from the device at byte {}",
                    at + i as u64
                ));
            }
            at += n as u64;
        }
        Ok(())
    })?;
    Ok(format!(
        "killed after {acked_at_kill} acknowledged writes ({} in all, {kills} kill(s)); resync compared {} KiB of {} KiB dirty, volume {} KiB; max in flight on a queue after recovery {}",
        written.iter().sum::<u64>(),
        synced.compared >> 10,
        dirty >> 10,
        CRASH_VOLUME >> 10,
        synced.max_in_flight
    ))
}

// ------------------------------------------------------------------------------------------
// Drivers
// ------------------------------------------------------------------------------------------

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
    let crash = tally.report("repl_kill9_agent_user_recovery_resyncs_dirty_regions", || {
        test_kill9_recovery(&work.join("crash"))
    });
    if let Some(info) = crash {
        println!("{PREFIX} info kill -9: {info}");
    }
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
