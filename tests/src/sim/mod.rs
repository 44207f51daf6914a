//! Deterministic fault simulation of the whole data path: source tap, spool, link, target
//! retention log, and the controller's resync decisions, driven step by step by one seeded
//! RNG on one thread.
//!
//! The real durable components run unmodified over simulated disks ([`disk`]): `Tap` (intent
//! map, pass-through to the device, spool append, overflow), `Spool`, `RetentionLog`
//! (append, group commit, retention passes, point-in-time reads). Batches and acks cross the
//! simulated link ([`net`]) as frames of the real wire codec, built by the shipper's
//! `build_batch` and resolved by the receiver's dedupe code. The threaded `Shipper`,
//! `Receiver` and `SourcePair` are not run; their decisions are, through the pure functions
//! they share with this module: `apply::admit_batch` (the receiver's order rule),
//! `apply::check_volumes` (a resized volume is refused), `apply::replica_state`,
//! `ship::check_resume` and `ship::check_ack` (the shipper's resume and ack rules) and
//! `pair::decide` (which resync to run), `pair::admit_grown` (when a grown range is
//! resynced). A resync compares Merkle trees with the resync
//! module's `MerkleTree` and `compare`, and copies through `Tap::resync_copy` between
//! `ResyncBegin` and `ResyncEnd` markers, as the `Syncer` does.
//!
//! Faults: frames dropped, duplicated and reordered; partitions and disconnects; a crash of
//! either side at any step (unsynced data lost, torn, or kept); a full spool (overflow to
//! the intent map) and a full disk (ENOSPC) on either side; slow disks (simulated latency);
//! the source volume grown (while the source runs, or while it is down: followed as
//! `protect` follows it, with part of the new range already holding data), a shrink asked
//! for (refused by name, nothing changes), and a replica larger than the source at a
//! target restart (refused at the `Hello`).
//!
//! Checked ([`SimReport::failures`]): every acknowledged event is still durable on the target
//! after any crash (`acked_writes_lost`); acks only grow; every recovery point the target
//! offers reads back, byte for byte (by hash), as the replay of the source's stream up to a
//! point event (the oracle is [`model::StreamModel`]); after the faults stop and the system
//! catches up, the replica equals the source device and the stream's replay, with no resync
//! window left open; every point keeps the size the source had there (points before a
//! growth read at the old size). A failing run prints its seed and `cargo xtask sim --seed S`; the same
//! seed gives the same trace hash.

pub mod disk;
pub mod model;
pub mod net;
pub mod rng;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tidemark_journal::{
    Bookmark, BookmarkKind, CrashMode, Event, JournalError, Keep, ManualClock, Nanos, PointKind,
    RetentionConfig, RetentionLog, RetentionPolicy, Seq, Spool, SpoolConfig, Tier, VolumeId,
};
use tidemark_sync::apply::{admit_batch, check_volumes, replica_state};
use tidemark_sync::dedupe::{AppliedWindow, DedupeWindow, resolve_batch};
use tidemark_sync::pair::{Job, admit_grown, decide, prepare_job, retry_of, windows_left_open};
use tidemark_sync::resync::{MemSource, MerkleTree, TreeOracle, compare, shape_for};
use tidemark_sync::ship::{build_batch, check_ack, check_resume, replica_after_backlog};
use tidemark_sync::syncer::TapSource;
use tidemark_sync::wire::{DEFAULT_MAX_FRAME_LEN, RefuseReason, ReplicaState, VolumeInfo};
use tidemark_sync::{ApplyError, Codec, Message};
use tidemark_tap::{IntentConfig, IntentMap, RegionSet, Tap, TapConfig, TapError, ZeroBlocks};

use disk::SimDisk;
use model::StreamModel;
use net::{Delivery, Dir, Link, LinkFaults};
use rng::SimRng;

/// Bytes of the simulated volume.
pub const VOLUME_BYTES: u64 = 256 << 10;
/// Bytes per write-intent region.
const REGION_BYTES: u64 = 16 << 10;
/// Segment size of both journals (the smallest the journal accepts).
const SEGMENT_BYTES: u64 = 64 << 10;
/// Dedupe window of both sides.
const DEDUPE_WINDOW: u64 = 64 << 10;
/// Bytes copied per resync step.
const COPY_CHUNK: u64 = 16 << 10;
/// Steps the catch-up after the faults may take before the run counts as stuck.
const CATCH_UP_STEPS: u32 = 3000;

/// A bug planted on purpose, to show that the checks catch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlantedBug {
    /// The target acknowledges what it received without a group commit first, so a crash
    /// can lose acknowledged events.
    AckBeforeSync,
    /// The target leaves out one write of a batch (not the batch's last entry) and
    /// acknowledges the batch anyway.
    DropWrite,
}

/// What one run does.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Fixes every choice of the run.
    pub seed: u64,
    /// Steps with faults, before the catch-up.
    pub steps: u32,
    /// A bug to plant (none for a real run).
    pub planted_bug: Option<PlantedBug>,
}

impl SimConfig {
    /// The default run for `seed`.
    pub fn new(seed: u64) -> Self {
        Self { seed, steps: 1500, planted_bug: None }
    }
}

/// Faults injected in a run, by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Frames lost on the link.
    pub frames_dropped: u64,
    /// Frames delivered twice.
    pub frames_duplicated: u64,
    /// Frames overtaken by the next one.
    pub frames_reordered: u64,
    /// Partitions (the connection dies, nothing gets through for a while).
    pub partitions: u64,
    /// Connections cut.
    pub disconnects: u64,
    /// Crashes of the source (device, intent map and spool disks).
    pub source_crashes: u64,
    /// Crashes of the target (journal and base disks).
    pub target_crashes: u64,
    /// Of the crashes, those that kept a torn prefix of the unsynced data.
    pub torn_crashes: u64,
    /// Periods of a full disk (ENOSPC) on the source's spool or the target's journal.
    pub disks_full: u64,
    /// Changes of a disk's simulated sync latency.
    pub slow_disks: u64,
    /// Times the tap fell back to the intent map (spool full or failing).
    pub spool_overflows: u64,
    /// Replicas grown at a target restart (each refused at the `Hello`, then restored).
    pub resizes: u64,
    /// Growths of the source volume (disk resize), while it ran or while it was down.
    pub grows: u64,
}

impl FaultCounts {
    /// All faults together.
    pub fn total(&self) -> u64 {
        self.frames_dropped
            + self.frames_duplicated
            + self.frames_reordered
            + self.partitions
            + self.disconnects
            + self.source_crashes
            + self.target_crashes
            + self.disks_full
            + self.slow_disks
            + self.spool_overflows
            + self.resizes
            + self.grows
    }
}

/// The outcome of a run.
#[derive(Debug, Clone, Default)]
pub struct SimReport {
    /// The run's seed.
    pub seed: u64,
    /// Hash of the run's trace (every step's action and outcome): equal for equal seeds.
    pub trace_hash: String,
    /// Steps taken, catch-up included.
    pub steps: u64,
    /// Faults injected.
    pub faults: FaultCounts,
    /// Application writes, write-zeroes and discards issued.
    pub app_writes: u64,
    /// Events the target acknowledged (the highest ack sent).
    pub acked_events: u64,
    /// Acknowledged data events the target no longer held after a crash (must be 0).
    pub acked_writes_lost: u64,
    /// Recovery points read back and compared with the stream's replay.
    pub points_checked: u64,
    /// Resyncs completed (initial sync included).
    pub resyncs: u64,
    /// Batches the receiver's order rule refused (a gap after a lost or reordered frame).
    pub batches_refused: u64,
    /// Acks the shipper's rule refused (went back after a reorder).
    pub acks_refused: u64,
    /// Duplicate batch entries dropped by the receiver.
    pub duplicates_dropped: u64,
    /// The planted bug (if any) took effect at least once.
    pub planted_fired: bool,
    /// Invariant violations, in order; empty when the run passed.
    pub failures: Vec<String>,
}

impl SimReport {
    /// True when no invariant was violated.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// The command that replays this run.
    pub fn replay_command(&self) -> String {
        replay_command(self.seed)
    }
}

/// The command that replays the run of `seed`.
pub fn replay_command(seed: u64) -> String {
    format!("cargo xtask sim --seed {seed}")
}

/// Runs one simulation.
pub fn run(cfg: &SimConfig) -> SimReport {
    let mut world = World::new(cfg.clone());
    world.run();
    let mut report = std::mem::take(&mut world.report);
    report.trace_hash = world.trace.finalize().to_hex()[..32].to_owned();
    report
}

/// Adds a line to the run's trace hash (borrowing only the hasher, so it can be used while
/// a process's state is borrowed).
macro_rules! trace {
    ($world:expr, $($arg:tt)*) => {{
        let line = format!($($arg)*);
        if $world.print_trace {
            eprintln!("sim: {line}");
        }
        $world.trace.update(line.as_bytes());
        $world.trace.update(b"\n");
    }};
}

/// A failed check: ends the run.
struct Violation(String);

type Step<T = ()> = std::result::Result<T, Violation>;

fn violation(text: impl Into<String>) -> Violation {
    Violation(text.into())
}

/// The shipper's state of one connection.
struct SrcSession {
    conn: u64,
    /// The last sequence number queued on this connection.
    after: Seq,
    /// The last ack (or the resume point).
    acked: Seq,
    window: DedupeWindow,
    codec: Codec,
}

/// A resync under way, one stage per controller step (mirrors `Syncer::fast_resync` and
/// `Syncer::initial_sync`).
struct JobRun {
    job: Job,
    id: u64,
    stage: Stage,
    ranges: Vec<Range<u64>>,
    zeros: ZeroBlocks,
    /// Index of the range being copied and the offset reached in it.
    next: usize,
    at: u64,
    begin_seq: Seq,
    end_seq: Seq,
    /// Its own window, while open.
    own_open: Vec<u64>,
    /// Windows whose `ResyncEnd` it appended.
    closed: Vec<u64>,
    /// The windows it is to close besides its own.
    to_close: Vec<u64>,
    /// Sessions opened when the end markers were appended (their `Resume` is stale once
    /// the job completes).
    sessions_at_end: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Begin,
    Compare,
    Copy,
    End,
    WaitAck,
}

/// The source process: everything here is lost in a crash.
struct Source {
    tap: Arc<Tap>,
    session: Option<SrcSession>,
    /// Sessions opened and the last one the controller decided on.
    sessions: u64,
    handled_session: u64,
    replica: Option<ReplicaState>,
    pending: RegionSet,
    synced_once: bool,
    opened: Option<u64>,
    job: Option<JobRun>,
    /// A whole-volume job to run again (it failed).
    forced: Option<Job>,
    /// Windows failed resyncs left open.
    leftover: Vec<u64>,
    refs_off_through: Seq,
    /// The spool failed (a full disk poisons it): only a restart helps.
    needs_restart: bool,
    /// The spool's disk was full at some point in this process's life: an I/O error may
    /// have poisoned the spool, which then refuses everything until reopened.
    spool_was_full: bool,
    in_overflow: bool,
    /// Growths whose resize the target has not acknowledged yet (`pair::admit_grown`).
    grown: Vec<(Seq, tidemark_tap::RegionRun)>,
}

/// The receiver's state of one connection.
struct TgtSession {
    conn: u64,
    acked: Seq,
    window: AppliedWindow,
    codec: Codec,
    unsynced: bool,
}

/// The target process.
struct Target {
    log: RetentionLog,
    session: Option<TgtSession>,
    /// The retention log failed: only a restart helps.
    failed: bool,
}

struct World {
    cfg: SimConfig,
    rng: SimRng,
    clock: Arc<ManualClock>,
    trace: blake3::Hasher,
    report: SimReport,
    /// The source's device and intent map.
    src_disk: SimDisk,
    spool_disk: SimDisk,
    journal_disk: SimDisk,
    base_disk: SimDisk,
    link: Link,
    link_faults: LinkFaults,
    faults_on: bool,
    source: Option<Source>,
    target: Option<Target>,
    model: StreamModel,
    spool_cfg: SpoolConfig,
    retention_cfg: RetentionConfig,
    /// The highest ack the target ever sent, and the highest the source ever heard.
    max_acked_sent: Seq,
    next_conn: u64,
    /// Steps left of a full disk on the source's spool / the target's journal.
    spool_full_steps: u32,
    journal_full_steps: u32,
    /// Points already compared (seq and kind).
    verified: BTreeSet<(u64, String)>,
    planted_fired: bool,
    /// The source device loses unflushed writes at a power cut (as the journals do), or
    /// keeps them (no volatile cache); chosen by the seed.
    device_volatile: bool,
    /// Print every trace line (`TIDEMARK_SIM_TRACE=1`).
    print_trace: bool,
    bookmarks: u64,
    last_data: Option<Bytes>,
}

impl World {
    fn new(cfg: SimConfig) -> Self {
        let mut rng = SimRng::new(cfg.seed);
        let clock = Arc::new(ManualClock::new(Nanos(1_700_000_000 * Nanos::SECOND)));
        let link_faults = LinkFaults {
            drop: rng.below(25) as u32,
            duplicate: rng.below(25) as u32,
            reorder: rng.below(25) as u32,
        };
        let spool_cfg = SpoolConfig {
            capacity_bytes: rng.range(192, 1024) << 10,
            segment_bytes: SEGMENT_BYTES,
            key: None,
        };
        let policy = match rng.below(3) {
            0 => RetentionPolicy::default(),
            1 => RetentionPolicy {
                max_age: Some(Duration::from_secs(rng.range(2, 20))),
                max_bytes: None,
                tiers: vec![Tier {
                    older_than: Duration::from_secs(1),
                    keep: Keep::Every {
                        interval: Duration::from_millis(500),
                        bookmarks: vec![BookmarkKind::User],
                    },
                }],
            },
            _ => RetentionPolicy {
                max_age: None,
                max_bytes: Some(rng.range(4, 8) * SEGMENT_BYTES),
                tiers: Vec::new(),
            },
        };
        let retention_cfg =
            RetentionConfig { segment_bytes: SEGMENT_BYTES, block_size: 4096, key: None, policy };
        // Half the runs give the source device a volatile cache that a power cut empties.
        let device_volatile = rng.chance(500);
        let report = SimReport { seed: cfg.seed, ..SimReport::default() };
        Self {
            rng,
            src_disk: SimDisk::new(clock.clone()),
            spool_disk: SimDisk::new(clock.clone()),
            journal_disk: SimDisk::new(clock.clone()),
            base_disk: SimDisk::new(clock.clone()),
            clock,
            trace: blake3::Hasher::new(),
            report,
            link: Link::new(),
            link_faults,
            faults_on: true,
            source: None,
            target: None,
            model: StreamModel::new(VOLUME_BYTES),
            spool_cfg,
            retention_cfg,
            max_acked_sent: Seq::ZERO,
            next_conn: 1,
            spool_full_steps: 0,
            journal_full_steps: 0,
            verified: BTreeSet::new(),
            planted_fired: false,
            device_volatile,
            print_trace: std::env::var_os("TIDEMARK_SIM_TRACE").is_some_and(|v| v == "1"),
            bookmarks: 0,
            last_data: None,
            cfg,
        }
    }

    fn run(&mut self) {
        let result = self.run_inner();
        if let Err(Violation(text)) = result {
            self.report.failures.push(format!(
                "seed {}: {text} (replay: {})",
                self.cfg.seed,
                replay_command(self.cfg.seed)
            ));
        }
        self.report.acked_events = self.max_acked_sent.0;
        self.report.planted_fired = self.planted_fired;
    }

    fn run_inner(&mut self) -> Step {
        trace!(self, "seed {} faults {:?}", self.cfg.seed, self.link_faults);
        self.start_source(true)?;
        self.start_target()?;
        for _ in 0..self.cfg.steps {
            self.step()?;
        }
        self.catch_up()?;
        self.final_checks()
    }

    // ---- the step -------------------------------------------------------------------

    fn step(&mut self) -> Step {
        self.report.steps += 1;
        self.clock.advance(Duration::from_millis(self.rng.below(20)));
        self.link.tick();
        self.drop_dead_sessions();
        if self.faults_on {
            self.inject_faults()?;
        }
        self.heal()?;
        self.follow_growth(false)?;
        self.keepalive();
        match self.rng.below(100) {
            0..=21 => self.app_write()?,
            22..=24 => self.app_zero()?,
            25..=31 => self.app_flush()?,
            32..=33 => self.app_bookmark()?,
            34..=43 => self.spool_commit()?,
            44..=55 => self.ship()?,
            56..=69 => self.deliver_up()?,
            70..=76 => self.target_commit()?,
            77..=85 => self.deliver_down()?,
            86..=93 => self.controller()?,
            94..=96 => self.connect()?,
            97 => self.enforce()?,
            _ => self.verify_points(16)?,
        }
        Ok(())
    }

    fn inject_faults(&mut self) -> Step {
        if self.rng.chance(2) {
            self.crash_source()?;
        }
        if self.rng.chance(2) {
            self.crash_target()?;
        }
        if self.rng.chance(4) {
            let steps = self.rng.range(5, 40) as u32;
            self.link.partition(steps);
            self.report.faults.partitions += 1;
            trace!(self, "fault partition {steps}");
        }
        if self.rng.chance(4) && self.link.connection().is_some() {
            self.link.close();
            self.report.faults.disconnects += 1;
            trace!(self, "fault disconnect");
        }
        if self.rng.chance(2) && self.spool_full_steps == 0 {
            self.spool_full_steps = self.rng.range(10, 60) as u32;
            self.spool_disk.set_full(true);
            self.report.faults.disks_full += 1;
            trace!(self, "fault spool disk full {}", self.spool_full_steps);
        }
        if self.rng.chance(2) && self.journal_full_steps == 0 {
            self.journal_full_steps = self.rng.range(10, 60) as u32;
            self.journal_disk.set_full(true);
            self.report.faults.disks_full += 1;
            trace!(self, "fault journal disk full {}", self.journal_full_steps);
        }
        if self.rng.chance(3) && self.grow_device()? {
            self.follow_growth(true)?;
        }
        if self.rng.chance(5) {
            let ms = if self.rng.chance(500) { 0 } else { self.rng.range(1, 50) };
            let which = self.rng.below(4);
            let disk = match which {
                0 => &self.src_disk,
                1 => &self.spool_disk,
                2 => &self.journal_disk,
                _ => &self.base_disk,
            };
            disk.set_sync_latency(Duration::from_millis(ms));
            self.report.faults.slow_disks += 1;
            trace!(self, "fault slow disk {which} {ms}ms");
        }
        Ok(())
    }

    /// Ends full-disk periods and restarts the processes that need it.
    fn heal(&mut self) -> Step {
        if let Some(src) = self.source.as_mut() {
            src.spool_was_full |= self.spool_full_steps > 0;
        }
        if self.spool_full_steps > 0 {
            self.spool_full_steps -= 1;
            if self.spool_full_steps == 0 {
                self.spool_disk.set_full(false);
                trace!(self, "spool disk has room again");
            }
        }
        if self.journal_full_steps > 0 {
            self.journal_full_steps -= 1;
            if self.journal_full_steps == 0 {
                self.journal_disk.set_full(false);
                trace!(self, "journal disk has room again");
            }
        }
        let src_stuck = self.source.as_ref().is_none_or(|s| s.needs_restart);
        if src_stuck && self.spool_full_steps == 0 {
            trace!(self, "restart source after a spool failure");
            self.restart_source(CrashMode::KeepAll)?;
        }
        let tgt_stuck = self.target.as_ref().is_none_or(|t| t.failed);
        if tgt_stuck && self.journal_full_steps == 0 {
            trace!(self, "restart target after a journal failure");
            self.target = None;
            self.link.close();
            self.journal_disk.crash(CrashMode::KeepAll);
            self.base_disk.crash(CrashMode::KeepAll);
            self.start_target()?;
        }
        Ok(())
    }

    fn drop_dead_sessions(&mut self) {
        let live = self.link.connection();
        if let Some(s) = self.source.as_mut()
            && s.session.as_ref().is_some_and(|x| Some(x.conn) != live)
        {
            s.session = None;
        }
        if let Some(t) = self.target.as_mut()
            && t.session.as_ref().is_some_and(|x| Some(x.conn) != live)
        {
            t.session = None;
        }
    }

    fn crash_mode(&mut self) -> CrashMode {
        match self.rng.below(3) {
            0 => CrashMode::LoseUnsynced,
            1 => {
                self.report.faults.torn_crashes += 1;
                CrashMode::KeepUnsyncedPrefix(self.rng.below(16 << 10))
            }
            _ => CrashMode::KeepAll,
        }
    }

    // ---- source process ---------------------------------------------------------------

    fn crash_source(&mut self) -> Step {
        let mode = self.crash_mode();
        self.report.faults.source_crashes += 1;
        trace!(self, "fault crash source {mode:?}");
        self.restart_source(mode)
    }

    fn restart_source(&mut self, mode: CrashMode) -> Step {
        self.source = None;
        self.link.close();
        // The device's own volatile cache: with `KeepAll` for the device only, a power cut
        // loses nothing the application wrote (a device without a volatile cache).
        self.src_disk.crash(if self.device_volatile { mode } else { CrashMode::KeepAll });
        self.spool_disk.crash(mode);
        if self.spool_full_steps > 0 {
            self.spool_disk.set_full(true);
        }
        let grew = self.rng.chance(200) && self.grow_device()?;
        self.start_source(false)?;
        // The agent follows a device that grew while it was down (the map opened at its
        // own, smaller size).
        if grew { self.follow_growth(true) } else { Ok(()) }
    }

    /// Disk resize: the source device grows by a few blocks (not always whole regions),
    /// part of the new range already holding data (a device grown over used space; it is
    /// not a captured write, so only the resync of the new range can bring it over). The
    /// whole volume stays at most twice its first size. False when it is that large.
    fn grow_device(&mut self) -> Result<bool, Violation> {
        let device = self.src_disk.file("device", VOLUME_BYTES);
        let old = device.len().map_err(|e| violation(format!("size of the device: {e}")))?;
        let add = self.rng.range(1, 2 * REGION_BYTES / 4096) * 4096;
        if old + add > 2 * VOLUME_BYTES {
            return Ok(false);
        }
        self.report.faults.grows += 1;
        device.set_len(old + add).map_err(|e| violation(format!("growing the device: {e}")))?;
        if self.rng.chance(500) {
            let len = self.rng.range(1, add.min(16 << 10) / 512) * 512;
            let at = old + self.rng.below((add - len) / 512 + 1) * 512;
            let data = self.app_data(len as usize);
            device
                .write_at(&data, at)
                .map_err(|e| violation(format!("writing the grown range: {e}")))?;
        }
        // A resize of a device is durable when the tool that made it returns (LVM, or
        // `truncate` and an fsync of an image file), and what the range held was there.
        device.sync().map_err(|e| violation(format!("syncing the grown device: {e}")))?;
        trace!(self, "fault grow device {old} -> {}", old + add);
        Ok(true)
    }

    /// As `protect` does once a second: a device larger than the tap's volume is grown
    /// into (`Tap::grow`). With `check_shrink`, a shrink is asked for first: it must be
    /// refused by name and change nothing.
    fn follow_growth(&mut self, check_shrink: bool) -> Step {
        let Some(src) = self.source.as_mut() else { return Ok(()) };
        if src.needs_restart {
            return Ok(());
        }
        let tap = src.tap.clone();
        let backing = tap.backing_len().map_err(|e| violation(format!("device size: {e}")))?;
        let served = tap.device_len();
        if check_shrink {
            match tap.grow(served - 512) {
                Err(TapError::Shrink { size, new_size, .. })
                    if size == served && new_size == served - 512 && tap.device_len() == served => {
                }
                other => return Err(violation(format!("a shrink got {other:?} from the tap"))),
            }
        }
        if backing <= served {
            return Ok(());
        }
        match tap.grow(backing) {
            Ok(seq) => {
                trace!(self, "grew {served} -> {backing} at {seq:?}");
                let src = self.source.as_mut().expect("checked");
                src.grown.extend(tap.take_grown());
                self.spool_commit()
            }
            // Not spooling (an overflow) or a full spool disk: tried again later, as the
            // agent's next check does.
            Err(e) => {
                trace!(self, "growth not followed yet: {e}");
                self.note_overflow();
                Ok(())
            }
        }
    }

    fn start_source(&mut self, fresh: bool) -> Step {
        let device = self.src_disk.file("device", VOLUME_BYTES);
        let intent_io = self.src_disk.file("intent", 0);
        let device_len = device.len().map_err(|e| violation(format!("size of the device: {e}")))?;
        let (intent, report) = IntentMap::open_grown(intent_io, device_len, intent_config())
            .map_err(|e| violation(format!("opening the intent map: {e}")))?;
        let opened = Spool::open(self.spool_disk.dir(), self.spool_cfg.clone(), self.clock.clone());
        let (spool, _) = match opened {
            Ok(s) => s,
            Err(e) if self.spool_full_steps > 0 => {
                // A spool that cannot even open on a full disk: the agent waits for room
                // (`heal` starts it again).
                trace!(self, "source cannot open its spool on a full disk: {e}");
                return Ok(());
            }
            Err(e) => return Err(violation(format!("opening the spool after a crash: {e}"))),
        };
        // Durable events survive (journal invariant 1), and say what they said.
        if spool.last_seq() < self.model.last_seq() {
            return Err(violation(format!(
                "the spool reopened at seq {} but seq {} was durable before the crash",
                spool.last_seq(),
                self.model.last_seq()
            )));
        }
        let tap_cfg = TapConfig { max_event_bytes: 8192, ..TapConfig::default() };
        let tap = Tap::new(device, spool, intent, tap_cfg)
            .map_err(|e| violation(format!("opening the tap: {e}")))?;
        let tap = Arc::new(tap);
        let recovered = tap
            .with_spool(|s| s.read_after(s.acked(), u64::MAX))
            .map_err(|e| violation(format!("reading the reopened spool: {e}")))?;
        for e in &recovered {
            if let Some(m) = self.model.event(e.seq)
                && *m != e.event
            {
                return Err(violation(format!(
                    "the reopened spool holds {:?} at seq {}, {:?} was spooled",
                    e.event, e.seq, m
                )));
            }
        }
        trace!(
            self,
            "source open: last {} acked {} dirty {}",
            tap.status().last_seq,
            tap.status().acked,
            report.dirty
        );
        let mut src = Source {
            pending: tap.intent().out_of_sync(),
            tap,
            session: None,
            sessions: 0,
            handled_session: 0,
            replica: None,
            synced_once: false,
            opened: None,
            job: None,
            forced: None,
            leftover: Vec::new(),
            refs_off_through: Seq::ZERO,
            needs_restart: false,
            spool_was_full: self.spool_full_steps > 0,
            in_overflow: false,
            grown: Vec::new(),
        };
        if fresh {
            // A new protection opens its initial sync's window before anything is captured.
            let id = self.resync_id();
            src.tap
                .append_marker(Event::ResyncBegin { id })
                .map_err(|e| violation(format!("opening the initial window: {e}")))?;
            src.opened = Some(id);
        }
        self.source = Some(src);
        if fresh { self.spool_commit() } else { self.pull_durable() }
    }

    fn resync_id(&mut self) -> u64 {
        self.rng.next_u64() | 1
    }

    fn tap(&self) -> Option<Arc<Tap>> {
        self.source.as_ref().map(|s| s.tap.clone())
    }

    fn note_overflow(&mut self) {
        let Some(src) = self.source.as_mut() else { return };
        let now = src.tap.status().overflow.is_some();
        if now && !src.in_overflow {
            self.report.faults.spool_overflows += 1;
        }
        src.in_overflow = now;
    }

    fn app_data(&mut self, len: usize) -> Bytes {
        match self.rng.below(10) {
            0 => Bytes::from(vec![0u8; len]),
            1 if self.last_data.as_ref().is_some_and(|d| d.len() == len) => {
                self.last_data.clone().expect("checked")
            }
            _ => {
                let mut v = Vec::with_capacity(len + 8);
                while v.len() < len {
                    v.extend_from_slice(&self.rng.next_u64().to_le_bytes());
                }
                v.truncate(len);
                let b = Bytes::from(v);
                self.last_data = Some(b.clone());
                b
            }
        }
    }

    fn app_range(&mut self) -> (u64, u64) {
        let size = self.tap().map_or(VOLUME_BYTES, |t| t.device_len());
        let sectors = self.rng.range(1, 32);
        let offset = self.rng.below(size / 512 - sectors + 1) * 512;
        (offset, sectors * 512)
    }

    fn app_write(&mut self) -> Step {
        let Some(tap) = self.tap() else { return Ok(()) };
        let (offset, len) = self.app_range();
        let data = self.app_data(len as usize);
        let fua = self.rng.chance(50);
        let r = if fua { tap.write_fua(offset, data) } else { tap.write(offset, data) };
        let captured = r.map_err(|e| violation(format!("application write refused: {e}")))?;
        self.report.app_writes += 1;
        trace!(self, "write {offset}+{len} fua {fua}: {captured:?}");
        self.note_overflow();
        Ok(())
    }

    fn app_zero(&mut self) -> Step {
        let Some(tap) = self.tap() else { return Ok(()) };
        let (offset, len) = self.app_range();
        let discard = self.rng.chance(500);
        let r = if discard { tap.discard(offset, len) } else { tap.write_zeroes(offset, len) };
        let captured = r.map_err(|e| violation(format!("application zeroing refused: {e}")))?;
        self.report.app_writes += 1;
        trace!(self, "zero {offset}+{len} discard {discard}: {captured:?}");
        self.note_overflow();
        Ok(())
    }

    fn app_flush(&mut self) -> Step {
        let Some(tap) = self.tap() else { return Ok(()) };
        let captured = tap.flush().map_err(|e| violation(format!("flush refused: {e}")))?;
        trace!(self, "flush: {captured:?}");
        self.note_overflow();
        Ok(())
    }

    fn app_bookmark(&mut self) -> Step {
        let Some(tap) = self.tap() else { return Ok(()) };
        self.bookmarks += 1;
        let bm = Bookmark::new(format!("bm-{}", self.bookmarks), BookmarkKind::User, 0)
            .map_err(|e| violation(format!("bookmark name: {e}")))?;
        let captured = tap.bookmark(bm).map_err(|e| violation(format!("bookmark refused: {e}")))?;
        trace!(self, "bookmark {}: {captured:?}", self.bookmarks);
        self.note_overflow();
        Ok(())
    }

    /// Group commit of the spool; the model takes every event that became durable.
    fn spool_commit(&mut self) -> Step {
        let Some(src) = self.source.as_mut() else { return Ok(()) };
        if src.needs_restart {
            return Ok(());
        }
        match src.tap.sync_spool() {
            Ok(durable) => {
                trace!(self, "spool sync: durable {durable}");
                self.pull_durable()
            }
            Err(e) => {
                if src.spool_was_full {
                    src.needs_restart = true;
                    trace!(self, "spool sync failed on a full disk");
                    Ok(())
                } else {
                    Err(violation(format!("spool sync failed with room on the disk: {e}")))
                }
            }
        }
    }

    /// The spool failed outside a sync: expected on a full disk (the process must restart),
    /// a violation otherwise.
    fn source_spool_failed(&mut self, what: String) -> Step {
        if self.source.as_ref().is_some_and(|s| s.spool_was_full) {
            if let Some(src) = self.source.as_mut() {
                src.needs_restart = true;
                src.session = None;
            }
            self.link.close();
            trace!(self, "source spool failed on a full disk: {what}");
            return Ok(());
        }
        Err(violation(format!("the spool failed with room on the disk: {what}")))
    }

    fn pull_durable(&mut self) -> Step {
        let Some(tap) = self.tap() else { return Ok(()) };
        let after = self.model.last_seq();
        let events = tap
            .with_spool(|s| s.read_after(after.max(s.acked()), u64::MAX))
            .map_err(|e| violation(format!("reading the spool: {e}")))?;
        for e in events {
            if e.seq <= self.model.last_seq() {
                continue;
            }
            self.model.push(e.seq, e.event).map_err(violation)?;
        }
        Ok(())
    }

    fn ship(&mut self) -> Step {
        // Events can become durable without a commit of ours (a segment roll syncs): the
        // model takes them before they can be shipped, acknowledged and trimmed.
        self.pull_durable()?;
        let max = self.rng.range(4, 48) << 10;
        let Some(src) = self.source.as_mut() else { return Ok(()) };
        let Some(s) = src.session.as_mut() else { return Ok(()) };
        let events = src
            .tap
            .read_after(s.after, max)
            .map_err(|e| violation(format!("reading the spool to ship: {e}")))?;
        if events.is_empty() {
            return Ok(());
        }
        let (batch, _) = build_batch(s.after, events, true, &mut s.window, src.refs_off_through)
            .map_err(|e| violation(format!("building a batch: {e}")))?;
        let (first, last) = (batch.first_seq, batch.last_seq());
        let mut frame = Vec::new();
        s.codec
            .encode(&Message::Batch(batch), &mut frame)
            .map_err(|e| violation(format!("encoding a batch: {e}")))?;
        s.after = last;
        self.link.send(Dir::Up, frame);
        trace!(self, "ship {first}..={last}");
        Ok(())
    }

    /// The shipper's keepalive: on an idle link, a `Ping` (and the target's `Pong`) would
    /// reveal a lost frame through the secure channel's record numbers and end the
    /// connection. Here: nothing in flight either way, nothing uncommitted on the target,
    /// and still events queued but not acknowledged, so a batch or an ack was lost.
    fn keepalive(&mut self) {
        if self.link.pending(Dir::Up) > 0 || self.link.pending(Dir::Down) > 0 {
            return;
        }
        let stalled = self
            .source
            .as_ref()
            .and_then(|s| s.session.as_ref())
            .is_some_and(|s| s.acked < s.after);
        let target_idle =
            self.target.as_ref().is_none_or(|t| t.session.as_ref().is_none_or(|s| !s.unsynced));
        if stalled && target_idle {
            trace!(self, "keepalive: a frame was lost, the connection ends");
            self.link.close();
            self.drop_dead_sessions();
        }
    }

    fn count_delivery(&mut self, d: Delivery) {
        match d {
            Delivery::Clean => {}
            Delivery::Dropped => self.report.faults.frames_dropped += 1,
            Delivery::Duplicated => self.report.faults.frames_duplicated += 1,
            Delivery::Reordered => self.report.faults.frames_reordered += 1,
        }
    }

    fn faults(&self) -> LinkFaults {
        if self.faults_on { self.link_faults } else { LinkFaults::NONE }
    }

    // ---- the source's acks and the controller -----------------------------------------

    fn deliver_down(&mut self) -> Step {
        let faults = self.faults();
        let Some((frame, d)) = self.link.deliver(Dir::Down, faults, &mut self.rng) else {
            return Ok(());
        };
        self.count_delivery(d);
        if d == Delivery::Dropped {
            return Ok(());
        }
        let Some(src) = self.source.as_mut() else { return Ok(()) };
        let Some(s) = src.session.as_mut() else { return Ok(()) };
        let message = s
            .codec
            .decode(Bytes::from(frame))
            .map_err(|e| violation(format!("the source could not decode a frame: {e}")))?;
        let Message::Ack { upto } = message else {
            return Err(violation(format!("the source received {message:?}")));
        };
        match check_ack(upto, s.acked, s.after) {
            Ok(true) => {
                s.acked = upto;
                if let Err(e) = src.tap.acknowledge(upto) {
                    return self.source_spool_failed(format!("trimming the spool to {upto}: {e}"));
                }
                trace!(self, "ack {upto}");
            }
            Ok(false) => trace!(self, "ack {upto} repeated"),
            Err(e) => {
                // A protocol violation ends the connection; the next one resumes.
                self.report.acks_refused += 1;
                trace!(self, "ack refused: {e}");
                self.link.close();
            }
        }
        Ok(())
    }

    /// One step of the pair controller (mirrors `SourcePair`'s loop).
    fn controller(&mut self) -> Step {
        let Some(src) = self.source.as_mut() else { return Ok(()) };
        if src.needs_restart {
            return Ok(());
        }
        if src.job.is_some() {
            return self.job_step();
        }
        if src.tap.status().overflow.is_some() {
            // Wait until the spool is shipped, then spool again and resync what the intent
            // map tracked meanwhile.
            let last = match src.tap.sync_spool() {
                Ok(last) => last,
                Err(e) if src.spool_was_full => {
                    src.needs_restart = true;
                    trace!(self, "overflow: spool sync failed: {e}");
                    return Ok(());
                }
                Err(e) => return Err(violation(format!("spool sync failed: {e}"))),
            };
            let drained = src.session.as_ref().is_some_and(|s| s.acked >= last);
            if drained {
                let regions = src.tap.resume_spooling();
                src.pending = src.pending.union(&regions);
                src.in_overflow = false;
                trace!(self, "overflow drained: resync {regions}");
            }
            return self.pull_durable();
        }
        if src.session.is_none() {
            return Ok(());
        }
        let acked = src.tap.status().acked;
        src.pending = admit_grown(&mut src.grown, acked, std::mem::take(&mut src.pending));
        let job = if let Some(job) = src.forced.take() {
            Some(job)
        } else if src.sessions != src.handled_session {
            src.handled_session = src.sessions;
            decide(src.replica.as_ref(), src.synced_once, &src.pending, src.opened)
        } else if !src.pending.is_empty() {
            Some(Job::Regions(src.pending.clone()))
        } else {
            None
        };
        let Some(job) = job else { return Ok(()) };
        let job = prepare_job(job, &src.pending, &src.leftover);
        let to_close = match &job {
            Job::Initial { close } | Job::Full { close } => close.clone(),
            Job::Regions(_) => src.leftover.clone(),
        };
        let id = self.rng.next_u64() | 1;
        trace!(self, "job {job:?} id {id}");
        let src = self.source.as_mut().expect("checked");
        src.job = Some(JobRun {
            job,
            id,
            stage: Stage::Begin,
            ranges: Vec::new(),
            zeros: ZeroBlocks::Send,
            next: 0,
            at: 0,
            begin_seq: Seq::ZERO,
            end_seq: Seq::ZERO,
            sessions_at_end: 0,
            own_open: Vec::new(),
            closed: Vec::new(),
            to_close,
        });
        Ok(())
    }

    /// The job failed: a whole-volume job runs again, a regions job from `pending`.
    fn job_failed(&mut self, why: String) {
        let Some(src) = self.source.as_mut() else { return };
        if let Some(run) = src.job.take() {
            src.leftover = windows_left_open(&run.to_close, &run.closed, &run.own_open);
            src.forced = retry_of(&run.job);
        }
        trace!(self, "job failed: {why}");
    }

    fn job_step(&mut self) -> Step {
        let src = self.source.as_mut().expect("a job runs in a live source");
        let tap = src.tap.clone();
        let run = src.job.as_mut().expect("checked");
        match run.stage {
            Stage::Begin => {
                let id = run.id;
                let seq = match tap.append_marker(Event::ResyncBegin { id }) {
                    Ok(seq) => seq,
                    Err(e) => {
                        self.job_failed(format!("ResyncBegin: {e}"));
                        return Ok(());
                    }
                };
                run.own_open.push(id);
                run.begin_seq = seq;
                run.stage = Stage::Compare;
                self.spool_commit()
            }
            Stage::Compare => {
                // As `Syncer::fast_resync`: compare once the target holds everything before
                // the window.
                if !matches!(run.job, Job::Initial { .. }) && tap.status().acked < run.begin_seq {
                    return Ok(());
                }
                let limit: Option<Vec<Range<u64>>> = match &run.job {
                    Job::Initial { .. } => {
                        run.ranges = std::iter::once(0..tap.device_len()).collect();
                        run.zeros = ZeroBlocks::Skip;
                        run.stage = Stage::Copy;
                        return Ok(());
                    }
                    Job::Full { .. } => None,
                    Job::Regions(regions) => Some(
                        regions
                            .runs()
                            .map(|r| {
                                let (o, l) = tap.intent().byte_range(r);
                                o..(o + l).min(tap.device_len())
                            })
                            .collect(),
                    ),
                };
                // The target answers the hash requests from its replica as it is now.
                let connected = src.session.is_some();
                let Some(t) = self.target.as_ref().filter(|t| connected && !t.failed) else {
                    self.job_failed("no connection for the hash requests".to_owned());
                    return Ok(());
                };
                // The volume grew after the window opened and the target has not applied
                // the resize yet: the trees would not match in shape, and the real
                // receiver refuses the hash requests past its size, so the job fails and
                // runs again (the growth's own resync covers the new range).
                let len = t.log.volume_len(VolumeId(0)).map_err(|e| violation(e.to_string()))?;
                if len != tap.device_len() {
                    let why = format!(
                        "hash requests for a device of {} bytes, the replica has {len}",
                        tap.device_len()
                    );
                    self.job_failed(why);
                    return Ok(());
                }
                let mut replica = vec![0u8; len as usize];
                t.log
                    .read_current(VolumeId(0), 0, &mut replica)
                    .map_err(|e| violation(format!("reading the replica: {e}")))?;
                let shape = shape_for(len);
                let remote = MerkleTree::build(&MemSource::new(replica), shape, 1)
                    .map_err(|e| violation(format!("hashing the replica: {e}")))?;
                let source = TapSource(tap.clone());
                let local = match &limit {
                    Some(ranges) => MerkleTree::build_limited(&source, shape, ranges, 1, &|_| {}),
                    None => MerkleTree::build(&source, shape, 1),
                }
                .map_err(|e| violation(format!("hashing the device: {e}")))?;
                let diff =
                    compare(&local, &mut TreeOracle::new(&remote), VolumeId(0), limit.as_deref())
                        .map_err(|e| violation(format!("comparing the trees: {e}")))?;
                let src = self.source.as_mut().expect("checked");
                let run = src.job.as_mut().expect("checked");
                run.ranges = diff.ranges;
                run.stage = Stage::Copy;
                let n = run.ranges.len();
                trace!(self, "compare: {n} ranges differ");
                Ok(())
            }
            Stage::Copy => {
                let Some(range) = run.ranges.get(run.next).cloned() else {
                    run.stage = Stage::End;
                    return Ok(());
                };
                // Throttle: at most half the spool of backlog (as `Syncer::throttle`).
                let backlog = tap.status().backlog_bytes;
                if backlog > self.spool_cfg.capacity_bytes / 2 {
                    return Ok(());
                }
                let at = range.start.max(run.at);
                let n = (range.end - at).min(COPY_CHUNK);
                let zeros = run.zeros;
                match tap.resync_copy(at, n, zeros) {
                    Ok(_) => {
                        if at + n >= range.end {
                            run.next += 1;
                            run.at = 0;
                        } else {
                            run.at = at + n;
                        }
                        trace!(self, "copy {at}+{n}");
                        self.spool_commit()
                    }
                    Err(e) => {
                        self.note_overflow();
                        self.job_failed(format!("copy: {e}"));
                        Ok(())
                    }
                }
            }
            Stage::End => {
                let (id, close) = (run.id, run.to_close.clone());
                let mut last = Seq::ZERO;
                for old in close.into_iter().filter(|&o| o != id).chain([id]) {
                    match tap.append_marker(Event::ResyncEnd { id: old }) {
                        Ok(seq) => {
                            last = seq;
                            run.closed.push(old);
                            run.own_open.retain(|&o| o != old);
                        }
                        Err(e) => {
                            self.job_failed(format!("ResyncEnd: {e}"));
                            return Ok(());
                        }
                    }
                }
                run.end_seq = last;
                run.sessions_at_end = src.sessions;
                run.stage = Stage::WaitAck;
                trace!(self, "resync {id} ends at {last}");
                self.spool_commit()
            }
            Stage::WaitAck => {
                let acked = tap.status().acked;
                if acked < run.end_seq {
                    return Ok(());
                }
                // Invariant 7: regions leave the out-of-sync set once the target holds the
                // resync's end.
                let done = match &run.job {
                    Job::Regions(done) => done.clone(),
                    _ => src.pending.clone(),
                };
                // As `SourcePair`: nothing is cleared while the tap is in overflow.
                if tap.resynced(done.runs()) {
                    src.pending = RegionSet::new();
                }
                src.leftover = windows_left_open(&run.to_close, &run.closed, &run.own_open);
                src.synced_once = true;
                src.opened = None;
                src.handled_session = src.handled_session.max(run.sessions_at_end);
                src.job = None;
                self.report.resyncs += 1;
                trace!(self, "resync acknowledged");
                Ok(())
            }
        }
    }

    // ---- target process ---------------------------------------------------------------

    fn crash_target(&mut self) -> Step {
        let mode = self.crash_mode();
        self.report.faults.target_crashes += 1;
        trace!(self, "fault crash target {mode:?}");
        self.target = None;
        self.link.close();
        self.journal_disk.crash(mode);
        self.base_disk.crash(mode);
        if self.journal_full_steps > 0 {
            self.journal_disk.set_full(true);
        }
        if self.rng.chance(200) {
            self.resize_target()?;
        }
        self.start_target()
    }

    /// A replica grown while the target was down: the source's `Hello` must be refused
    /// (then the old size is put back).
    fn resize_target(&mut self) -> Step {
        self.report.faults.resizes += 1;
        let base = self.base_disk.file("base", VOLUME_BYTES);
        let size = base.len().map_err(|e| violation(format!("size of the replica: {e}")))?;
        let grown = size + REGION_BYTES;
        base.set_len(grown).map_err(|e| violation(format!("resizing the replica: {e}")))?;
        let announced = [VolumeInfo { id: VolumeId(0), block_size: 4096, size }];
        match check_volumes(&announced, &[grown]) {
            Err(r) if r.reason == RefuseReason::VOLUME_MISMATCH => {
                trace!(self, "resized replica refused");
            }
            other => {
                return Err(violation(format!("a resized replica got {other:?} at the Hello")));
            }
        }
        base.set_len(size).map_err(|e| violation(format!("restoring the replica: {e}")))
    }

    fn start_target(&mut self) -> Step {
        let base = self.base_disk.file("base", VOLUME_BYTES);
        let opened = RetentionLog::open(
            self.journal_disk.dir(),
            vec![base],
            self.retention_cfg.clone(),
            self.clock.clone(),
        );
        let log = match opened {
            Ok((log, _)) => log,
            Err(e) if self.journal_full_steps > 0 => {
                trace!(self, "target cannot open on a full disk: {e}");
                self.target = None;
                return Ok(());
            }
            Err(e) => return Err(violation(format!("opening the retention log: {e}"))),
        };
        let durable = log.durable_seq();
        if durable < self.max_acked_sent {
            let lost = (durable.0 + 1..=self.max_acked_sent.0)
                .filter(|&s| self.model.event(Seq(s)).is_some_and(|e| e.range().is_some()))
                .count() as u64;
            self.report.acked_writes_lost += lost;
            return Err(violation(format!(
                "the target reopened durable to seq {durable} but acknowledged seq {}: {lost} acknowledged write(s) lost",
                self.max_acked_sent
            )));
        }
        trace!(self, "target open: durable {durable}");
        self.target = Some(Target { log, session: None, failed: false });
        Ok(())
    }

    fn target_failed(&mut self, what: String, e: JournalError) -> Step {
        if self.journal_full_steps > 0 {
            trace!(self, "target failed on a full disk: {what}");
            if let Some(t) = self.target.as_mut() {
                t.failed = true;
                t.session = None;
            }
            self.link.close();
            return Ok(());
        }
        Err(violation(format!("the retention log failed with room on the disk: {what}: {e}")))
    }

    /// A session opens: `Hello` checked, the target commits and answers `Resume`, the
    /// source reconciles.
    fn connect(&mut self) -> Step {
        if self.link.connection().is_some() || self.link.partitioned() {
            return Ok(());
        }
        let Some(src) = self.source.as_ref() else { return Ok(()) };
        if src.needs_restart {
            return Ok(());
        }
        let Some(t) = self.target.as_mut() else { return Ok(()) };
        if t.failed {
            return Ok(());
        }
        let lens = [t.log.volume_len(VolumeId(0)).map_err(|e| violation(e.to_string()))?];
        let announced =
            [VolumeInfo { id: VolumeId(0), block_size: 4096, size: src.tap.device_len() }];
        check_volumes(&announced, &lens)
            .map_err(|r| violation(format!("Hello refused: {}", r.message)))?;
        let resume = match t.log.sync() {
            Ok(d) => d,
            Err(e) => return self.target_failed("group commit at accept".to_owned(), e),
        };
        let replica = replica_state(&t.log);
        let conn = self.next_conn;
        self.next_conn += 1;
        // The Resume crosses the wire through the codec.
        let codec = || Codec::new(DEFAULT_MAX_FRAME_LEN).expect("the default frame length");
        let mut frame = Vec::new();
        codec()
            .encode(&Message::Resume { last_acked: resume, replica }, &mut frame)
            .map_err(|e| violation(format!("encoding Resume: {e}")))?;
        let Message::Resume { last_acked, replica } = codec()
            .decode(Bytes::from(frame))
            .map_err(|e| violation(format!("decoding Resume: {e}")))?
        else {
            return Err(violation("Resume decoded as another message"));
        };
        if last_acked < self.max_acked_sent {
            return Err(violation(format!(
                "the target resumes at seq {last_acked} after acknowledging seq {}",
                self.max_acked_sent
            )));
        }
        t.session = Some(TgtSession {
            conn,
            acked: last_acked,
            window: AppliedWindow::new(DEDUPE_WINDOW),
            codec: codec(),
            unsynced: false,
        });
        let src = self.source.as_mut().expect("checked");
        let (last, trimmed) = src.tap.with_spool(|s| (s.last_seq(), s.acked()));
        check_resume(last_acked, last, trimmed)
            .map_err(|e| violation(format!("resume refused: {e}")))?;
        if let Err(e) = src.tap.acknowledge(last_acked) {
            return self.source_spool_failed(format!("trimming the spool at resume: {e}"));
        }
        let markers = src
            .tap
            .with_spool(|s| s.markers_after(last_acked))
            .map_err(|e| violation(format!("reading the backlog's markers: {e}")))?;
        let replica = replica_after_backlog(&replica, &markers);
        src.session = Some(SrcSession {
            conn,
            after: last_acked,
            acked: last_acked,
            window: DedupeWindow::new(DEDUPE_WINDOW),
            codec: codec(),
        });
        src.sessions += 1;
        trace!(self, "connect {conn}: resume {last_acked} {:?}", replica.kind);
        src.replica = Some(replica);
        self.link.connect(conn);
        Ok(())
    }

    fn deliver_up(&mut self) -> Step {
        let faults = self.faults();
        let Some((frame, d)) = self.link.deliver(Dir::Up, faults, &mut self.rng) else {
            return Ok(());
        };
        self.count_delivery(d);
        if d == Delivery::Dropped {
            return Ok(());
        }
        let Some(t) = self.target.as_mut() else { return Ok(()) };
        let Some(s) = t.session.as_mut() else { return Ok(()) };
        let message = s
            .codec
            .decode(Bytes::from(frame))
            .map_err(|e| violation(format!("the target could not decode a frame: {e}")))?;
        let Message::Batch(batch) = message else {
            return Err(violation(format!("the target received {message:?}")));
        };
        let duplicates = match admit_batch(t.log.last_seq(), batch.first_seq, batch.entries.len()) {
            Ok(d) => d,
            Err(e @ ApplyError::SequenceGap { .. }) => {
                self.report.batches_refused += 1;
                trace!(self, "batch refused: {e}");
                self.link.close();
                return Ok(());
            }
            Err(e) => return Err(violation(format!("admission: {e}"))),
        };
        self.report.duplicates_dropped += duplicates;
        let fresh = || batch.iter().skip(duplicates as usize);
        let resolved =
            match resolve_batch(&t.log, &mut s.window, fresh().map(|(q, e)| (q, &e.body))) {
                Ok(r) => r,
                Err(u) => {
                    // `Error` code 5: the source resends this batch's writes as data.
                    trace!(self, "reference refused: {u}");
                    self.link.close();
                    if let Some(src) = self.source.as_mut() {
                        src.refs_off_through = batch.last_seq();
                    }
                    return Ok(());
                }
            };
        let n = resolved.len();
        // In steady state only: a write dropped during an initial sync would be copied over
        // by the sync itself.
        let planted_drop = self.cfg.planted_bug == Some(PlantedBug::DropWrite)
            && !self.planted_fired
            && t.log.status().inconsistent.is_none();
        for (i, ((seq, entry), event)) in fresh().zip(&resolved).enumerate() {
            if planted_drop && i + 1 < n && matches!(event, Event::Write { .. }) {
                self.planted_fired = true;
                continue;
            }
            if let Err(e) = t.log.append(seq, entry.time, event) {
                return self.target_failed(format!("appending seq {seq}"), e);
            }
            s.unsynced = true;
        }
        trace!(self, "apply {}..={} dup {duplicates}", batch.first_seq, batch.last_seq());
        Ok(())
    }

    /// Group commit on the target, then an ack of what it made durable.
    fn target_commit(&mut self) -> Step {
        let Some(t) = self.target.as_mut() else { return Ok(()) };
        let Some(s) = t.session.as_mut() else { return Ok(()) };
        if !s.unsynced {
            return Ok(());
        }
        let durable = if self.cfg.planted_bug == Some(PlantedBug::AckBeforeSync) {
            if t.log.durable_seq() < t.log.last_seq() {
                self.planted_fired = true;
            }
            t.log.last_seq()
        } else {
            match t.log.sync() {
                Ok(d) => d,
                Err(e) => return self.target_failed("group commit".to_owned(), e),
            }
        };
        s.unsynced = false;
        if durable > s.acked {
            s.acked = durable;
            let mut frame = Vec::new();
            s.codec
                .encode(&Message::Ack { upto: durable }, &mut frame)
                .map_err(|e| violation(format!("encoding an ack: {e}")))?;
            self.link.send(Dir::Down, frame);
            if durable < self.max_acked_sent {
                return Err(violation(format!(
                    "ack {durable} after ack {} was sent",
                    self.max_acked_sent
                )));
            }
            self.max_acked_sent = durable;
            trace!(self, "target ack {durable}");
        }
        Ok(())
    }

    fn enforce(&mut self) -> Step {
        // Points are checked before a retention pass may drop them.
        self.verify_points(usize::MAX)?;
        let Some(t) = self.target.as_mut() else { return Ok(()) };
        if t.failed {
            return Ok(());
        }
        match t.log.enforce() {
            Ok(r) => {
                trace!(self, "enforce: dropped {} base {:?}", r.dropped_points, r.base_advanced_to);
                Ok(())
            }
            Err(e) => self.target_failed("retention pass".to_owned(), e),
        }
    }

    /// Reads back up to `max` recovery points not yet checked and compares each with the
    /// replay of the stream up to it.
    fn verify_points(&mut self, max: usize) -> Step {
        let Some(t) = self.target.as_ref() else { return Ok(()) };
        let mut checked = 0;
        for p in t.log.points() {
            if checked == max {
                break;
            }
            let key = (p.seq.0, format!("{:?}", p.kind));
            if self.verified.contains(&key) {
                continue;
            }
            let len =
                t.log.volume_len_at(VolumeId(0), p.seq).map_err(|e| violation(e.to_string()))?;
            let mut image = vec![0u8; len as usize];
            t.log
                .read_at(&p, VolumeId(0), 0, &mut image)
                .map_err(|e| violation(format!("reading point {p:?}: {e}")))?;
            // A base right before a bookmark's record (retention stops there so that the
            // bookmark stays a point) holds the bookmark's state: no data in between.
            let before_bookmark = || {
                let next = t.log.points().into_iter().find(|q| q.seq > p.seq)?;
                let adjacent = p.kind == PointKind::Base && next.seq == p.seq.next();
                adjacent.then_some(next).filter(|q| matches!(q.kind, PointKind::Bookmark(_)))
            };
            let expected = self
                .model
                .point_hash(p.seq)
                .or_else(|| before_bookmark().and_then(|q| self.model.point_hash(q.seq)));
            let Some(expected) = expected else {
                return Err(violation(format!(
                    "the target offers {:?} at seq {}, which ends no point of the source's stream",
                    p.kind, p.seq
                )));
            };
            if blake3::hash(&image) != expected {
                let first = first_difference(&image, p.seq, &self.model);
                return Err(violation(format!(
                    "recovery point {:?} at seq {} differs from the source stream replayed to it{first}",
                    p.kind, p.seq
                )));
            }
            self.verified.insert(key);
            self.report.points_checked += 1;
            checked += 1;
        }
        Ok(())
    }

    // ---- the end of a run ---------------------------------------------------------------

    /// Stops the faults and lets the system converge.
    fn catch_up(&mut self) -> Step {
        self.faults_on = false;
        trace!(self, "catch-up");
        for _ in 0..200 {
            if self.spool_full_steps == 0 && self.journal_full_steps == 0 {
                break;
            }
            self.heal()?;
        }
        self.heal()?;
        if let Some(tap) = self.tap() {
            tap.flush().map_err(|e| violation(format!("final flush: {e}")))?;
        }
        for i in 0..CATCH_UP_STEPS {
            self.report.steps += 1;
            self.link.tick();
            self.drop_dead_sessions();
            self.heal()?;
            self.follow_growth(false)?;
            self.connect()?;
            self.controller()?;
            self.spool_commit()?;
            self.ship()?;
            while self.link.pending(Dir::Up) > 0 {
                self.deliver_up()?;
            }
            self.target_commit()?;
            while self.link.pending(Dir::Down) > 0 {
                self.deliver_down()?;
            }
            self.keepalive();
            if i % 16 == 0 {
                self.enforce()?;
            }
            if self.quiescent() {
                trace!(self, "quiescent after {i} catch-up steps");
                return Ok(());
            }
        }
        Err(violation(format!(
            "no convergence within {CATCH_UP_STEPS} steps after the faults stopped: {}",
            self.describe()
        )))
    }

    fn quiescent(&self) -> bool {
        let (Some(src), Some(t)) = (self.source.as_ref(), self.target.as_ref()) else {
            return false;
        };
        let st = src.tap.status();
        src.session.is_some()
            && src.job.is_none()
            && src.forced.is_none()
            && src.pending.is_empty()
            && src.grown.is_empty()
            && src.tap.backing_len().is_ok_and(|b| b == src.tap.device_len())
            && src.sessions == src.handled_session
            && st.overflow.is_none()
            && st.acked == st.last_seq
            && st.durable_seq == st.last_seq
            && t.log.last_seq() == st.last_seq
            && t.log.status().inconsistent.is_none()
    }

    fn describe(&self) -> String {
        let mut s = String::new();
        if let Some(src) = &self.source {
            let st = src.tap.status();
            let _ = write!(
                s,
                "source last {} durable {} acked {} overflow {} job {:?} pending {} session {}; ",
                st.last_seq,
                st.durable_seq,
                st.acked,
                st.overflow.is_some(),
                src.job.as_ref().map(|j| (j.stage, &j.job)),
                src.pending,
                src.session.is_some()
            );
        }
        if let Some(t) = &self.target {
            let _ = write!(
                s,
                "target last {} inconsistent {:?}",
                t.log.last_seq(),
                t.log.status().inconsistent
            );
        }
        s
    }

    fn final_checks(&mut self) -> Step {
        self.verify_points(usize::MAX)?;
        let tap = self.tap().expect("quiescent implies a source");
        let t = self.target.as_ref().expect("quiescent implies a target");
        let backing = tap.backing_len().map_err(|e| violation(format!("device size: {e}")))?;
        if backing != tap.device_len() {
            return Err(violation(format!(
                "the tap serves {} bytes of a device of {backing} after catch-up",
                tap.device_len()
            )));
        }
        let len = t.log.volume_len(VolumeId(0)).map_err(|e| violation(e.to_string()))?;
        if len != backing {
            return Err(violation(format!(
                "after catch-up the replica holds {len} bytes, the device {backing}"
            )));
        }
        let mut device = vec![0u8; backing as usize];
        tap.read(0, &mut device).map_err(|e| violation(format!("reading the device: {e}")))?;
        let mut replica = vec![0u8; len as usize];
        t.log
            .read_current(VolumeId(0), 0, &mut replica)
            .map_err(|e| violation(format!("reading the replica: {e}")))?;
        if self.model.image() != &device[..] {
            return Err(violation(format!(
                "the source stream replayed differs from the device at byte {}",
                diff_at(self.model.image(), &device)
            )));
        }
        if replica != device {
            return Err(violation(format!(
                "after catch-up the replica differs from the device at byte {}",
                diff_at(&replica, &device)
            )));
        }
        if t.log.durable_seq() < self.max_acked_sent {
            return Err(violation("the target holds less than it acknowledged"));
        }
        if self.cfg.planted_bug.is_some() && !self.planted_fired {
            trace!(self, "planted bug never fired");
        }
        trace!(self, "final: seq {} points {}", t.log.last_seq(), self.report.points_checked);
        Ok(())
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // The processes first (they hold files), then the disks' images.
        self.source = None;
        self.target = None;
        for disk in [&self.src_disk, &self.spool_disk, &self.journal_disk, &self.base_disk] {
            disk.wipe();
        }
    }
}

fn intent_config() -> IntentConfig {
    IntentConfig { region_bytes: REGION_BYTES, max_hot_regions: 6, max_runs: 8 }
}

fn diff_at(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len()))
}

fn first_difference(image: &[u8], seq: Seq, model: &StreamModel) -> String {
    let mut replay = vec![0u8; image.len()];
    for s in 1..=seq.0 {
        if let Some(e) = model.event(Seq(s)) {
            model::apply(&mut replay, e);
        }
    }
    format!(" (first differing byte {})", diff_at(image, &replay))
}

/// Runs `seeds` and sums them up; used by the test and by `cargo xtask sim`.
pub fn run_seeds(seeds: impl IntoIterator<Item = u64>, steps: Option<u32>) -> Vec<SimReport> {
    seeds
        .into_iter()
        .map(|seed| {
            let mut cfg = SimConfig::new(seed);
            if let Some(s) = steps {
                cfg.steps = s;
            }
            run(&cfg)
        })
        .collect()
}
