//! `tidemark protect`: the source of a pair. The protected volume is an image file (or a
//! block device); the state directory holds the spool (`spool/`), the write-intent map
//! (`intent.map`) and `status.json`. The volume is exposed to applications through a
//! frontend (`--frontend fuse`: a FUSE mount with a loop device attached, printed as
//! `device: /dev/loopN`); every write through it is captured by the tap, spooled, and
//! shipped to `--target`, while the pair controller runs the initial sync, resyncs and
//! diff sync.
//!
//! Order (the invariants of a protection):
//! 1. Start: tap, shipper, pair controller, and only then the frontend, so that on a fresh
//!    protection the initial sync's window is open before anything is captured.
//! 2. A group-commit thread makes the spool durable every few milliseconds and rings the
//!    shipper; writes are shipped only once durable in the spool.
//! 3. Stop (SIGINT/SIGTERM): frontend first (no more writes), pair controller, a last
//!    group commit and a bounded wait for the target's acknowledgement, shipper, then
//!    `Tap::close` (device sync, spool checkpoint, intent map cleared of clean regions).
//!    After a crash (kill -9) instead, the intent map's dirty regions are resynced at the
//!    next start.

use std::io::IsTerminal;
use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tidemark_journal::{Event, FileIo, FsDir, Spool, SpoolConfig, SystemClock, VolumeId};
use tidemark_sync::pair::{PairStatus, SourcePair, SourcePairConfig};
use tidemark_sync::resync::{BlockSource, Ext4InUse, FileSource};
use tidemark_sync::shape::{Rate, TokenBucket};
use tidemark_sync::ship::{Shipper, ShipperConfig, ShipperEvent, ShipperHandle, TcpConnect};
use tidemark_sync::syncer::{Phase, Progress, SyncerConfig};
use tidemark_sync::wire::{Hello, Role, SUPPORTED_VERSIONS, VolumeInfo};
use tidemark_tap::{FuseLoopConfig, FuseLoopFrontend, IntentConfig, IntentMap, Tap, TapConfig};

use crate::{common, metrics, signals, source_control, status};

/// How applications reach the protected volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Frontend {
    /// A FUSE mount holding the volume file, with a loop device attached to it.
    Fuse,
    /// No frontend: only the initial sync and resyncs run (the volume is not written
    /// through the tap).
    None,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The protected volume: an image file or a block device.
    #[arg(long)]
    image: PathBuf,
    /// State directory (spool/, intent.map, status.json); created if missing. A new one
    /// means a new protection (initial sync into a blank replica).
    #[arg(long)]
    state: PathBuf,
    /// The target's address (`tidemark receive --listen`).
    #[arg(long)]
    target: String,
    /// This node's private key (from `tidemark keygen`).
    #[arg(long)]
    key: PathBuf,
    /// The target's public key.
    #[arg(long)]
    peer: PathBuf,
    /// The pair id (32 hexadecimal digits), the same on both sides.
    #[arg(long)]
    pair: String,
    /// How applications reach the protected volume.
    #[arg(long, value_enum, default_value_t = Frontend::Fuse)]
    frontend: Frontend,
    /// Where the FUSE frontend mounts (default: STATE/mnt).
    #[arg(long)]
    mountpoint: Option<PathBuf>,
    /// This node's name, as the target sees it.
    #[arg(long, default_value = "source")]
    name: String,
    /// Most regions of the write-intent map dirty at once: what a crash can cost in resync
    /// (times the region size); writes beyond it wait or are tracked out of sync. Used when
    /// the map is created.
    #[arg(long)]
    max_hot_regions: Option<u32>,
    /// Spool capacity in MiB (beyond it the tap tracks regions and resyncs them later).
    #[arg(long, default_value_t = 1024)]
    spool_mib: u64,
    /// RPO threshold in seconds: above it the pair's status shows an alarm (one warn log
    /// line when raised, one when cleared; `tidemark_rpo_alarm`).
    #[arg(long, value_name = "SECS")]
    rpo_alarm: Option<f64>,
    /// Serve Prometheus metrics on this address (`GET /metrics`; port 0: any free port,
    /// printed as `metrics: ADDR`).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Most bytes per second put on the link, in MiB, `0` (paused) or `unlimited` (the
    /// default); changeable while running with `tidemark limits`.
    #[arg(long, value_parser = crate::limits::parse_rate)]
    rate_mib: Option<Rate>,
    /// Daily windows with their own rate, e.g. `08:00-18:00=10,18:00-08:00=unlimited`
    /// (MiB/s; UTC unless it ends with `@+HH:MM`); outside them `--rate-mib` applies.
    #[arg(long)]
    rate_schedule: Option<String>,
    /// Most resyncs (and verifies) that run at once.
    #[arg(long, default_value_t = 1)]
    resync_slots: u16,
    /// Failback: the target (`receive --replica`) holds an older state of this volume; start
    /// with a fast resync of the whole volume (only differing blocks move). Implied by a new
    /// protection of a promoted replica (its directory's `promoted.json`).
    #[arg(long)]
    failback: bool,
    /// On a clean stop (SIGINT, SIGTERM), once the frontend has stopped taking writes,
    /// append a bookmark of this name: the last event of the stream, the point a planned
    /// failover promotes (`promote --point bookmark:NAME --require-seq LAST_SEQ`).
    #[arg(long, value_name = "NAME")]
    final_bookmark: Option<String>,
    /// A lineage conflict (split brain, or a target whose generation is newer) is resolved
    /// for this side: the target's own writes are overwritten by the failback resync (with
    /// `--failback`). Never needed for a plain failback.
    #[arg(long)]
    discard_target_changes: bool,
    #[command(flatten)]
    control: source_control::Args,
}

/// How often the group-commit thread makes the spool durable.
const GROUP_COMMIT: Duration = Duration::from_millis(5);
/// How long a clean shutdown waits for the target to acknowledge the last writes.
const DRAIN: Duration = Duration::from_secs(10);

pub fn run(args: Args) -> anyhow::Result<()> {
    let pair_id = common::parse_pair(&args.pair)?;
    let secure = common::secure(&args.key, &args.peer)?;
    let target = args
        .target
        .to_socket_addrs()
        .with_context(|| format!("resolve target {}", args.target))?
        .next()
        .with_context(|| format!("target {} resolves to no address", args.target))?;
    std::fs::create_dir_all(&args.state)
        .with_context(|| format!("create {}", args.state.display()))?;
    let spool_dir = args.state.join("spool");
    let intent_path = args.state.join("intent.map");
    let fresh = match (spool_dir.exists(), intent_path.exists()) {
        (false, false) => true,
        (true, true) => false,
        (spool, intent) => bail!(
            "state directory {} is incomplete (spool/ present: {spool}, intent.map present: {intent}): \
             refusing to guess whether the replica is in sync; remove it to start a new protection",
            args.state.display()
        ),
    };

    // Before the image is opened: its fingerprint tells whether it changed since a clean stop.
    if let Some(name) = &args.final_bookmark {
        source_control::check_name(name).context("--final-bookmark")?;
    }
    let (lineage, dirty, origin) = crate::lineage::for_protect(&args.state, &args.image)?;
    // A new protection of a promoted replica compares the whole volume with its target: at
    // the original site (a failback) only what differs moves, and a blank target gets
    // every block that is not zero.
    let failback = args.failback || (fresh && origin == crate::lineage::Origin::Promoted);
    if failback && !args.failback {
        println!(
            "failback: {} is a promoted replica; the first job compares the whole volume with \
             the target (fast resync), as --failback does",
            args.image.display()
        );
    }
    let (device, vol_len) = common::open_volume(&args.image)?;
    let (spool, _) = Spool::open(
        Arc::new(FsDir::new(&spool_dir)?),
        SpoolConfig { capacity_bytes: args.spool_mib << 20, segment_bytes: 16 << 20, key: None },
        Arc::new(SystemClock),
    )
    .context("open the spool")?;
    let intent_file =
        if fresh { FileIo::create(&intent_path, 0) } else { FileIo::open(&intent_path) }
            .with_context(|| format!("open {}", intent_path.display()))?;
    let mut intent_cfg = IntentConfig::default();
    if let Some(n) = args.max_hot_regions {
        intent_cfg.max_hot_regions = n;
    }
    // A volume that grew while no agent ran opens at the map's size; the growth is followed
    // once the pair runs (`grow.rs`).
    let (intent, intent_open) = IntentMap::open_grown(Arc::new(intent_file), vol_len, intent_cfg)
        .context("open the write-intent map")?;
    let tap = Arc::new(Tap::new(Arc::new(device), spool, intent, TapConfig::default())?);
    let vol_len = tap.device_len();
    if failback {
        crate::failback::mark_whole_volume(&tap, vol_len)?;
    }
    println!(
        "protecting {} ({vol_len} bytes), pair {pair_id}, {}; {} dirty bytes in the intent map",
        args.image.display(),
        if fresh { "new protection" } else { "resuming" },
        intent_open.dirty_bytes
    );

    let hello = Hello {
        versions: SUPPORTED_VERSIONS,
        role: Role::Source,
        node: args.name.clone(),
        pair: pair_id,
        volumes: vec![VolumeInfo { id: VolumeId(0), block_size: 4096, size: vol_len }],
    };
    let weak: Weak<Tap> = Arc::downgrade(&tap);
    let mut ship_cfg = ShipperConfig::new(hello, secure);
    ship_cfg.lineage = crate::lineage::wire(&lineage, dirty, args.discard_target_changes, failback);
    let mut shipper = Shipper::new(tap.shared_spool(), ship_cfg);
    // Always a bucket (unlimited unless told otherwise), so that `tidemark limits` can
    // change the rate of a running protection.
    let bucket = Arc::new(TokenBucket::new(
        args.rate_mib.unwrap_or(Rate::Unlimited),
        1 << 20,
        Arc::new(SystemClock),
    )?);
    let schedule_text = args.rate_schedule.clone();
    if let Some(text) = &schedule_text {
        let schedule = crate::limits::parse_schedule(text)
            .map_err(anyhow::Error::msg)
            .context("--rate-schedule")?;
        bucket.set_schedule(Some(schedule));
    }
    if !(1..=64).contains(&args.resync_slots) {
        bail!("--resync-slots {}: expected 1 to 64", args.resync_slots);
    }
    shipper = shipper.bucket(bucket.clone());
    let shipper = shipper
        .observer(Box::new(move |e| {
            if let ShipperEvent::Acked { upto } = e {
                if let Some(tap) = weak.upgrade() {
                    // Regions whose writes are all acknowledged may leave the intent map.
                    tap.intent().acknowledge(*upto);
                }
            }
        }))
        .start(TcpConnect { addr: target, timeout: Duration::from_secs(5) })?;

    let mut pcfg = SourcePairConfig::new(SyncerConfig::new(VolumeId(0)));
    pcfg.initial_view = initial_view(&args.image);
    pcfg.fresh = fresh;
    // A verify through the control socket takes a slot like a resync; with one slot (the
    // default) they never compare at once.
    let slots = tidemark_sync::shape::ResyncSlots::new(usize::from(args.resync_slots));
    pcfg.slots = Some(slots.clone());
    let pair = SourcePair::start(tap.clone(), shipper.hash_client(), pcfg)
        .context("start the pair controller")?;

    let committing = Arc::new(AtomicBool::new(true));
    let committer = group_commit(tap.clone(), &shipper, committing.clone())?;

    signals::install()?;
    let metrics = args.metrics.as_deref().map(metrics::Server::start).transpose()?;
    if let Some(m) = &metrics {
        println!("metrics: {}", m.addr());
    }
    let alarm =
        args.rpo_alarm.map(Duration::try_from_secs_f64).transpose().context("--rpo-alarm")?;
    let mut tracker = status::PairTracker::new(
        pair_id.to_string(),
        alarm,
        status::now_ms(),
        intent_open.dirty_bytes > 0,
    );
    let frontend = match args.frontend {
        Frontend::Fuse => {
            let mnt = args.mountpoint.clone().unwrap_or_else(|| args.state.join("mnt"));
            let f = FuseLoopFrontend::start(tap.clone(), FuseLoopConfig::new(&mnt))
                .with_context(|| format!("start the FUSE + loop frontend at {}", mnt.display()))?;
            Some(f)
        }
        Frontend::None => None,
    };
    let device_path = frontend.as_ref().and_then(|f| f.device_path()).map(Path::to_path_buf);
    if let Some(p) = &device_path {
        println!("device: {}", p.display());
    }
    let control = source_control::SourceControl::start(
        &args.control,
        &args.state,
        tap.clone(),
        shipper.hash_client(),
        pair.watch(),
        slots,
        (bucket, schedule_text),
    )?;
    println!("control: {}", control.path().display());
    use std::io::Write as _;
    std::io::stdout().flush()?;

    let mut view = View::new(std::io::stderr().is_terminal());
    let started = Instant::now();
    let mut last_file = Instant::now() - Duration::from_secs(2);
    let mut ctx = DocContext {
        clock: std::sync::Mutex::default(),
        fresh,
        state: args.state.clone(),
        leaf_bytes: tidemark_sync::resync::shape_for(vol_len).leaf_size(),
        vol_len,
        device: device_path,
        dirty_at_open: intent_open.dirty_bytes,
        grow: crate::grow::Follower::default(),
    };
    while !signals::stop_requested() {
        let ps = pair.status();
        view.show(&ps);
        if last_file.elapsed() >= Duration::from_secs(1) {
            ctx.grow.check(&args.image, &tap, &shipper, frontend.as_ref());
            if tap.device_len() != ctx.vol_len {
                ctx.vol_len = tap.device_len();
                ctx.leaf_bytes = tidemark_sync::resync::shape_for(ctx.vol_len).leaf_size();
            }
            let ps = pair.status();
            let figures = sample(&mut tracker, &tap, &ps, &shipper, metrics.as_ref());
            status::write(
                &args.state,
                &document(&ctx, &tap, &ps, &shipper, started, "running", &figures),
            )?;
            last_file = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("signal: shutting down");
    view.finish();
    control.stop();
    if let Some(f) = frontend {
        f.shutdown().context("stop the frontend")?;
    }
    // No write is taken any more: the final bookmark is the state the drain delivers.
    let final_bookmark = args.final_bookmark.as_ref().map(|name| {
        let taken =
            source_control::append_bookmark(&tap, name, tidemark_journal::BookmarkKind::User);
        match &taken {
            Ok(seq) => println!("final bookmark {name:?}: seq {seq}"),
            Err(e) => eprintln!("error: final bookmark {name:?} not taken: {e:#}"),
        }
        taken
    });
    let final_pair = pair.stop();
    committing.store(false, Ordering::SeqCst);
    let _ = committer.join();
    let last = tap.sync_spool().context("last group commit")?;
    shipper.notify();
    // A shipper stopped by a refusal (a split brain, say) will not see an ack: no wait.
    let acked = shipper
        .wait_for(DRAIN, |s| s.acked >= last || s.state == tidemark_sync::LinkState::Failed)
        .filter(|s| s.acked >= last)
        .map(|s| s.acked);
    if acked.is_none() {
        eprintln!(
            "the target did not acknowledge up to seq {last} within {DRAIN:?}; the spool keeps the rest"
        );
    }
    let figures = sample(&mut tracker, &tap, &final_pair, &shipper, metrics.as_ref());
    status::write(
        &args.state,
        &document(&ctx, &tap, &final_pair, &shipper, started, "stopped", &figures),
    )?;
    let st = shipper.stop();
    tap.acknowledge(st.acked).context("record the acknowledged point")?;
    match Arc::try_unwrap(tap) {
        Ok(tap) => tap.close().context("close the tap")?,
        Err(_) => bail!("the tap is still shared at shutdown"),
    }
    crate::lineage::seal(&args.state, &args.image, lineage, last)?;
    println!("stopped: acknowledged up to seq {}", st.acked);
    if let Some(Err(e)) = final_bookmark {
        // Stopped cleanly all the same; a planned failover at that bookmark must not go on.
        return Err(e.context("the final bookmark was not taken (the stop itself was clean)"));
    }
    Ok(())
}

/// The view of the volume whose data extents step I copies: the ext4 file system's
/// in-use blocks when the volume holds one, else the image's allocated extents; `None`
/// (the whole device) when the image cannot be opened read-only.
fn initial_view(image: &Path) -> Option<Arc<dyn BlockSource>> {
    match FileSource::open(image).and_then(Ext4InUse::open) {
        Ok(v) => return Some(Arc::new(v)),
        Err(e) => tracing::info!(error = %e, "not using the ext4 view for step I"),
    }
    match FileSource::open(image) {
        Ok(v) => Some(Arc::new(v)),
        Err(e) => {
            eprintln!("step I reads the whole volume: {e}");
            None
        }
    }
}

fn group_commit(
    tap: Arc<Tap>,
    shipper: &ShipperHandle,
    running: Arc<AtomicBool>,
) -> anyhow::Result<JoinHandle<()>> {
    let bell = shipper.doorbell();
    std::thread::Builder::new()
        .name("tidemark-commit".into())
        .spawn(move || {
            let mut last = tidemark_journal::Seq(0);
            while running.load(Ordering::SeqCst) {
                match tap.sync_spool() {
                    Ok(seq) if seq != last => {
                        last = seq;
                        bell.ring();
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "group commit of the spool"),
                }
                std::thread::sleep(GROUP_COMMIT);
            }
        })
        .context("start the group-commit thread")
}

struct DocContext {
    /// Rate and ETA of the running resync phase, for `progress` in status.json.
    clock: std::sync::Mutex<PhaseClock>,
    fresh: bool,
    state: PathBuf,
    /// Leaf size of the volume's Merkle tree.
    leaf_bytes: u64,
    vol_len: u64,
    device: Option<PathBuf>,
    dirty_at_open: u64,
    grow: crate::grow::Follower,
}

/// Where the running resync phase was when first seen, to give its average rate and the
/// ETA at that rate.
#[derive(Default)]
struct PhaseClock {
    /// The phase, when it was first seen, and the bytes done then.
    start: Option<(Phase, Instant, u64)>,
}

impl PhaseClock {
    /// The rate (bytes per second since the phase was first seen) and the seconds left at
    /// that rate, once at least half a second of progress was seen.
    fn sample(&mut self, p: Option<Progress>, now: Instant) -> (Option<f64>, Option<f64>) {
        let Some(p) = p else {
            self.start = None;
            return (None, None);
        };
        let (phase, at, done0) = match self.start {
            Some((phase, at, done0)) if phase == p.phase && p.done >= done0 => (phase, at, done0),
            _ => (p.phase, now, p.done),
        };
        self.start = Some((phase, at, done0));
        let secs = now.duration_since(at).as_secs_f64();
        if secs < 0.5 || p.done <= done0 {
            return (None, None);
        }
        let rate = (p.done - done0) as f64 / secs;
        (Some(rate), Some(p.total.saturating_sub(p.done) as f64 / rate))
    }
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Hashing => "hashing",
        Phase::Comparing => "comparing",
        Phase::Copying => "copying",
    }
}

/// The pair's operator figures now (`status.json`'s `pair`), published to the metrics
/// endpoint too.
fn sample(
    tracker: &mut status::PairTracker,
    tap: &Tap,
    ps: &PairStatus,
    shipper: &ShipperHandle,
    metrics: Option<&metrics::Server>,
) -> status::PairFigures {
    let (ship, t) = (shipper.status(), tap.status());
    let (oldest, end_spooled) = tap.with_spool(|s| {
        let markers = s.markers_after(s.acked()).unwrap_or_default();
        let ends = markers.iter().any(|(_, e)| matches!(e, Event::ResyncEnd { .. }));
        (s.oldest_unacked_time(), ends)
    });
    let sample = status::PairSample {
        pair: ps,
        ship: &ship,
        tap: &t,
        oldest_unacked_ms: oldest.map(|t| t.0 / 1_000_000),
        end_spooled,
        now_ms: status::now_ms(),
    };
    let figures = tracker.sample(&sample, Instant::now());
    if let Some(m) = metrics {
        m.publish(&metrics::source(&figures));
    }
    figures
}

fn document(
    ctx: &DocContext,
    tap: &Tap,
    ps: &PairStatus,
    shipper: &ShipperHandle,
    started: Instant,
    state: &str,
    figures: &status::PairFigures,
) -> serde_json::Value {
    let s = shipper.status();
    let t = tap.status();
    let (rate, eta) =
        ctx.clock.lock().unwrap_or_else(|e| e.into_inner()).sample(ps.progress, Instant::now());
    let progress = ps.progress.map(|p| {
        json!({
            "phase": phase_name(p.phase), "done": p.done, "total": p.total,
            // Bytes per second since the phase began (as seen here), and the seconds left at
            // that rate; null during its first half second.
            "rate_bps": rate.map(f64::round), "eta_s": eta.map(|e| (e * 10.0).round() / 10.0),
        })
    });
    json!({
        "role": "protect",
        "state": state,
        "pid": std::process::id(),
        "updated_ms": status::now_ms(),
        "uptime_s": common::secs(started.elapsed()),
        "device": ctx.device.as_ref().map(|p| p.display().to_string()),
        "volume_bytes": ctx.vol_len,
        "grow": ctx.grow.json(),
        "fresh": ctx.fresh,
        "lineage": crate::lineage::status_json(&ctx.state),
        "pair": figures.json(),
        "stage": ps.stage.name(),
        "progress": progress,
        "last_resync": ps.last_resync.as_ref().map(|r| json!({
            "id": r.id,
            // What the library reports: the device's length for a fast resync (its local
            // Merkle tree covers the whole device), the bytes scanned for step I.
            "volume_bytes": r.volume_bytes,
            // Leaf hashes compared with the target, in bytes: for a resync limited to
            // regions, exactly the bytes of those regions compared.
            "compared_bytes": r.compare.leaves_compared.saturating_mul(ctx.leaf_bytes).min(ctx.vol_len),
            "hash_requests": r.compare.hash_requests,
            "differing_bytes": r.differing_bytes,
            "data_bytes": r.data_bytes,
            "zero_bytes": r.zero_bytes,
            "attempts": r.attempts,
            "end_seq": r.end_seq.0,
            "duration_s": common::secs(r.elapsed),
        })),
        "resyncs": ps.resyncs,
        // Resyncs the target asked for because its journal lost records (`RepairRequest`).
        "repairs": ps.repairs,
        "repair_requests": s.repair_requests,
        "last_repair": ps.last_repair.as_ref().map(|r| json!({
            "id": r.id,
            "compared_bytes": r.volume_bytes,
            "differing_bytes": r.differing_bytes,
            "data_bytes": r.data_bytes,
            "end_seq": r.end_seq.0,
            "duration_s": common::secs(r.elapsed),
        })),
        "pending_resync_bytes": ps.pending_bytes,
        "last_error": ps.last_error,
        "shipper": {
            "state": format!("{:?}", s.state),
            "sessions": s.sessions,
            "peer": s.peer,
            "last_sent": s.last_sent.0,
            "acked": s.acked.0,
            "backlog_bytes": s.backlog_bytes,
            "backlog_events": s.backlog_events,
            "wire_bytes": s.wire_bytes,
            "raw_bytes": s.raw_bytes,
            "batches": s.batches,
            "compression": format!("{:?}", s.compression),
            // What the lineages decided at the last opening (docs/failover.md).
            "lineage_verdict": s.lineage.as_ref().map(|v| v.name()),
            "last_error": s.last_error,
            "last_session_end": s.last_session_end,
        },
        "tap": {
            "writes": t.writes,
            "bytes": t.bytes,
            "last_seq": t.last_seq.0,
            "durable_seq": t.durable_seq.0,
            "overflow": t.overflow.as_ref().map(|o| o.cause.clone()),
            "dirty_regions": t.intent.dirty_regions,
            "out_of_sync_regions": t.intent.out_of_sync_regions,
            "region_bytes": t.intent.region_bytes,
            "resync_bound_bytes": t.intent.resync_bound_bytes,
            "dirty_bytes_at_open": ctx.dirty_at_open,
        },
    })
}

/// Progress for a person: indicatif bars on a terminal, log lines otherwise.
struct View {
    terminal: bool,
    bar: Option<(Phase, ProgressBar)>,
    stage: &'static str,
    resyncs: u64,
    last_line: Instant,
}

impl View {
    fn new(terminal: bool) -> Self {
        Self { terminal, bar: None, stage: "", resyncs: 0, last_line: Instant::now() }
    }

    fn show(&mut self, ps: &PairStatus) {
        if ps.stage.name() != self.stage {
            self.finish();
            eprintln!("stage: {}", ps.stage.name());
            self.stage = ps.stage.name();
        }
        if ps.resyncs != self.resyncs {
            self.resyncs = ps.resyncs;
            if let Some(r) = &ps.last_resync {
                eprintln!(
                    "resync {} done: {} bytes compared, {} differing, {} copied, in {:.2} s",
                    r.id,
                    r.volume_bytes,
                    r.differing_bytes,
                    r.data_bytes,
                    r.elapsed.as_secs_f64()
                );
            }
        }
        let Some(p) = ps.progress else { return };
        if self.terminal {
            if self.bar.as_ref().is_none_or(|(ph, _)| *ph != p.phase) {
                self.finish();
                let bar = ProgressBar::new(p.total);
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix:>9} [{bar:40}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar.set_prefix(phase_name(p.phase));
                self.bar = Some((p.phase, bar));
            }
            if let Some((_, bar)) = &self.bar {
                bar.set_length(p.total);
                bar.set_position(p.done);
            }
        } else if self.last_line.elapsed() >= Duration::from_secs(2) {
            eprintln!(
                "{} {}: {} / {} bytes",
                ps.stage.name(),
                phase_name(p.phase),
                p.done,
                p.total
            );
            self.last_line = Instant::now();
        }
    }

    fn finish(&mut self) {
        if let Some((_, bar)) = self.bar.take() {
            bar.finish();
        }
    }
}
