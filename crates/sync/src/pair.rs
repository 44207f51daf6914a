//! The source side of one protected volume, end to end: the [`SourcePair`] runs beside a
//! [`crate::Shipper`] and decides, from what the target reports and what the tap knows,
//! whether the replica needs an initial sync, a fast resync or nothing, and runs it through
//! the [`Syncer`].
//!
//! ```text
//!             session opens: Resume { replica }           tap: overflow, out-of-sync regions
//!                          \                                 /
//!   stage:  Connecting -> decide --------------------------+
//!              blank                -> InitialSync (step I over the view's data extents)
//!              inconsistent (ids)   -> Resync (whole volume, closing the ids)
//!              consistent + regions -> Resync (limited to the out-of-sync regions)
//!              consistent           -> DiffSync (the shipper keeps the replica current)
//!   spool overflow: Overflow -> wait until the spool drained -> resume spooling
//!                   -> Resync (the regions tracked meanwhile) -> DiffSync
//! ```
//!
//! Invariants:
//! 1. A region leaves the intent map's out-of-sync set only after the resync that copied it
//!    was acknowledged by the target up to its `ResyncEnd`: a crash before that leaves it
//!    out of sync, to be resynced again.
//! 2. Step I runs only on a replica the target reports blank and this pair has not synced:
//!    a blank report after a completed initial sync means the target lost its replica, and
//!    gets a fast resync of the whole volume instead (step I leaves zero blocks out).
//! 3. A failed resync (lost connection, overflow) is retried on the next session or once
//!    the overflow is over; the stage says what is pending.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use tidemark_tap::{RegionSet, Tap};

use crate::resync::BlockSource;
use crate::shape::ResyncSlots;
use crate::ship::{HashClient, LinkState, ShipperStatus, error_chain};
use crate::syncer::{Progress, ResyncReport, Syncer, SyncerConfig, SyncerError, TapSource};
use crate::watch::Watch;
use crate::wire::ReplicaKind;

/// Where a pair stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PairStage {
    /// No session with the target yet (or the link is down).
    Connecting,
    /// Step I of the initial sync: copying the volume's data into a blank replica.
    InitialSync,
    /// A fast resync (after an interruption, a crash, a spool overflow, or for failback):
    /// the replica is inconsistent until it ends.
    Resync,
    /// Differential sync: the shipper streams captured writes; the replica is consistent.
    DiffSync,
    /// The spool overflowed: writes are tracked as dirty regions until the backlog is
    /// shipped, then those regions are resynced.
    Overflow,
    /// Stopped.
    Stopped,
}

impl PairStage {
    /// The stage's name, as status output shows it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::InitialSync => "initial sync",
            Self::Resync => "resync",
            Self::DiffSync => "diff sync",
            Self::Overflow => "overflow",
            Self::Stopped => "stopped",
        }
    }
}

/// A snapshot of a pair.
#[derive(Debug, Clone)]
pub struct PairStatus {
    /// The stage.
    pub stage: PairStage,
    /// Progress of the running initial sync or resync.
    pub progress: Option<Progress>,
    /// The last completed initial sync or resync.
    pub last_resync: Option<ResyncReport>,
    /// Initial syncs and resyncs completed.
    pub resyncs: u64,
    /// The last failed attempt's error.
    pub last_error: Option<String>,
    /// Bytes of regions waiting for a resync.
    pub pending_bytes: u64,
    /// A resync is due but every slot of the node's cap is taken.
    pub waiting_for_slot: bool,
    /// Repairs of the target's journal completed (resyncs the target asked for with a
    /// `RepairRequest`).
    pub repairs: u64,
    /// The last completed repair.
    pub last_repair: Option<ResyncReport>,
}

/// How a [`SourcePair`] runs.
#[derive(Clone)]
pub struct SourcePairConfig {
    /// The resync driver's settings.
    pub syncer: SyncerConfig,
    /// The view of the device whose data extents step I copies (a
    /// [`crate::resync::FileSource`] of a sparse image, an [`crate::resync::Ext4InUse`]);
    /// `None`: the whole device.
    pub initial_view: Option<Arc<dyn BlockSource>>,
    /// How often the controller looks at the tap (overflow) when nothing else wakes it.
    pub tick: Duration,
    /// A new protection: the tap has captured nothing yet, and the replica is blank.
    /// [`SourcePair::start`] then opens the initial sync's resync window before returning,
    /// so that whatever the application writes before step I runs, the target keeps the
    /// replica marked as not initially synced. Start the pair before the frontend.
    pub fresh: bool,
    /// The cap on concurrent resyncs shared by the pairs of this node (changeable at run
    /// time through [`ResyncSlots::set_limit`]); `None`: no cap.
    pub slots: Option<Arc<ResyncSlots>>,
}

impl std::fmt::Debug for SourcePairConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourcePairConfig")
            .field("syncer", &self.syncer)
            .field("initial_view", &self.initial_view.as_ref().map(|v| v.describe()))
            .field("tick", &self.tick)
            .finish()
    }
}

impl SourcePairConfig {
    /// Defaults around `syncer`.
    pub fn new(syncer: SyncerConfig) -> Self {
        Self {
            syncer,
            initial_view: None,
            tick: Duration::from_millis(100),
            fresh: false,
            slots: None,
        }
    }
}

struct Inner {
    tap: Arc<Tap>,
    client: HashClient,
    cfg: SourcePairConfig,
    status: Arc<Watch<PairStatus>>,
    stopping: AtomicBool,
}

impl Inner {
    fn update(&self, f: impl FnOnce(&mut PairStatus)) {
        self.status.update(f);
    }

    fn stage(&self, stage: PairStage) {
        self.status.update(|s| {
            if s.stage != stage {
                tracing::info!(from = s.stage.name(), to = stage.name(), "pair stage");
                s.stage = stage;
            }
        });
    }
}

/// The controller of one protected volume (see the module documentation).
pub struct SourcePair {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for SourcePair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourcePair").field("status", &self.status()).finish_non_exhaustive()
    }
}

/// The status of a [`SourcePair`], readable from another thread ([`SourcePair::watch`]).
#[derive(Clone)]
pub struct PairWatch {
    status: Arc<Watch<PairStatus>>,
}

impl std::fmt::Debug for PairWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairWatch").field("status", &self.status()).finish()
    }
}

impl PairWatch {
    /// A snapshot.
    pub fn status(&self) -> PairStatus {
        self.status.get()
    }
}

/// What the controller runs next (see [`decide`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Job {
    /// Step I of an initial sync into a blank replica, closing these open windows too.
    Initial {
        /// Ids of resync windows already open on the replica, closed by this sync.
        close: Vec<u64>,
    },
    /// A whole-volume fast resync, closing these open windows too.
    Full {
        /// Ids of resync windows already open on the replica, closed by this resync.
        close: Vec<u64>,
    },
    /// A fast resync limited to these regions of the write-intent map.
    Regions(RegionSet),
}

impl SourcePair {
    /// Starts the controller of `tap`'s volume, using the connection of `client` (from the
    /// volume's shipper, [`crate::ShipperHandle::hash_client`]). The regions the tap's intent
    /// map holds out of sync when this starts (after an unclean shutdown: every region it
    /// marked dirty) are resynced once the replica is consistent.
    pub fn start(
        tap: Arc<Tap>,
        client: HashClient,
        cfg: SourcePairConfig,
    ) -> Result<Self, SyncerError> {
        let opened = if cfg.fresh {
            Some(
                Syncer::new(tap.clone(), client.clone(), cfg.syncer.clone())
                    .open_initial_window()?,
            )
        } else {
            None
        };
        let inner = Arc::new(Inner {
            tap,
            client,
            cfg,
            status: Arc::new(Watch::new(PairStatus {
                stage: PairStage::Connecting,
                progress: None,
                last_resync: None,
                resyncs: 0,
                last_error: None,
                pending_bytes: 0,
                waiting_for_slot: false,
                repairs: 0,
                last_repair: None,
            })),
            stopping: AtomicBool::new(false),
        });
        let i = inner.clone();
        let thread = thread::Builder::new()
            .name("tidemark-pair".to_owned())
            .spawn(move || run(&i, opened))
            .map_err(|e| SyncerError::Thread { what: e.to_string() })?;
        Ok(Self { inner, thread: Some(thread) })
    }

    /// A snapshot.
    pub fn status(&self) -> PairStatus {
        self.inner.status.get()
    }

    /// A view of the status for other threads (a control socket), which keeps neither the
    /// controller nor its tap alive.
    pub fn watch(&self) -> PairWatch {
        PairWatch { status: self.inner.status.clone() }
    }

    /// Waits until `pred` holds for the status, or `timeout` passes.
    pub fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&PairStatus) -> bool,
    ) -> Option<PairStatus> {
        self.inner.status.wait_for(timeout, pred)
    }

    /// Stops the controller (a resync under way stops at its next step; its regions stay
    /// out of sync).
    pub fn stop(mut self) -> PairStatus {
        self.stop_inner();
        self.status()
    }

    fn stop_inner(&mut self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.inner.update(|_| {});
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.inner.stage(PairStage::Stopped);
    }
}

impl Drop for SourcePair {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop_inner();
        }
    }
}

/// `opened`: the window a fresh protection opened, closed by the first sync that completes
/// (the target may not have received it when it reported the replica's state).
fn run(inner: &Arc<Inner>, mut opened: Option<u64>) {
    let tick = inner.cfg.tick;
    let mut handled_session = 0u64;
    let mut synced_once = false;
    // Out of sync when the pair starts: what an unclean shutdown left.
    let mut pending = inner.tap.intent().out_of_sync();
    let mut forced: Option<Job> = None;
    // Windows failed resyncs left open: the next resync closes them.
    let mut leftover: Vec<u64> = Vec::new();
    // Ranges a growth added, waiting for the target to acknowledge the resize.
    let mut grown: Vec<(tidemark_journal::Seq, tidemark_tap::RegionRun)> = Vec::new();
    // `RepairRequest`s of the target already run (or given up with their session).
    let mut handled_repairs = 0u64;
    while !inner.stopping.load(Ordering::SeqCst) {
        let st = inner.client.status();
        pending = take_grown(inner, &mut grown, st.acked, pending);
        let pending_bytes = region_bytes(inner, &pending);
        inner.update(|s| s.pending_bytes = pending_bytes);
        // Overflow: wait until the spool is shipped, then spool again and resync what the
        // intent map tracked meanwhile.
        if inner.tap.status().overflow.is_some() {
            inner.stage(PairStage::Overflow);
            // What was appended before the overflow must become durable to be shipped.
            let last = match inner.tap.sync_spool() {
                Ok(last) => last,
                Err(e) => {
                    let text = error_chain(&e);
                    inner.update(|s| s.last_error = Some(text));
                    wait(inner, tick, |_| false);
                    continue;
                }
            };
            inner.client.ring();
            if st.state == LinkState::Shipping && st.acked >= last {
                let regions = inner.tap.resume_spooling();
                tracing::info!(
                    regions = regions.region_count(),
                    "spool drained after an overflow: resyncing the regions tracked meanwhile"
                );
                pending = pending.union(&regions);
                continue;
            }
            wait(inner, tick, |s| s.acked >= last && s.state == LinkState::Shipping);
            continue;
        }
        if st.state != LinkState::Shipping {
            inner.stage(PairStage::Connecting);
            wait(inner, tick, |s| s.state == LinkState::Shipping);
            continue;
        }
        let job = if let Some(job) = forced.take() {
            Some(job)
        } else if st.sessions != handled_session {
            handled_session = st.sessions;
            decide(st.replica.as_ref(), synced_once, &pending, opened)
        } else if !pending.is_empty() {
            Some(Job::Regions(pending.clone()))
        } else {
            None
        };
        if job.is_none() && st.repair_requests != handled_repairs {
            handled_repairs = st.repair_requests;
            if let Some(request) = &st.repair_request {
                run_repair(inner, request, &mut leftover);
                continue;
            }
        }
        let Some(job) = job else {
            inner.stage(PairStage::DiffSync);
            let (seen, repairs) = (st.sessions, st.repair_requests);
            wait(inner, tick, |s| {
                s.sessions != seen || s.state != LinkState::Shipping || s.repair_requests != repairs
            });
            continue;
        };
        // Wait for a slot under the node's cap on concurrent resyncs.
        let _permit = match &inner.cfg.slots {
            Some(slots) => match slots.acquire(Some(tick)) {
                Some(permit) => Some(permit),
                None => {
                    inner.update(|s| s.waiting_for_slot = true);
                    forced = Some(job);
                    continue;
                }
            },
            None => None,
        };
        inner.update(|s| s.waiting_for_slot = false);
        let job = prepare_job(job, &pending, &leftover);
        let (result, open) = run_job(inner, &job, &leftover);
        leftover = open;
        match result {
            Ok(report) => {
                // The sessions opened so far reported the replica before this resync's
                // markers were appended: their state is stale once it completes.
                let sessions_at_end = inner.client.status().sessions;
                // Invariant 1: the regions leave the out-of-sync set once the target holds
                // the resync's end.
                let end = report.end_seq;
                let acked = inner
                    .client
                    .wait_for(Duration::from_secs(3600), |s| {
                        s.acked >= end || inner.stopping.load(Ordering::SeqCst)
                    })
                    .is_some_and(|s| s.acked >= end);
                if !acked {
                    // Its windows are closed in the stream: run it again without them.
                    forced = retry_of(&job);
                    continue;
                }
                // A whole-volume sync covers every region. In overflow nothing is cleared:
                // regions tracked since the copy go with `pending` to the next resync.
                let done = match &job {
                    Job::Regions(done) => done.clone(),
                    _ => pending.clone(),
                };
                if inner.tap.resynced(done.runs()) {
                    pending = RegionSet::new();
                }
                synced_once = true;
                opened = None;
                handled_session = handled_session.max(sessions_at_end);
                inner.update(|s| {
                    s.resyncs += 1;
                    s.last_resync = Some(report);
                    s.progress = None;
                });
            }
            Err(e) => {
                let text = error_chain(&e);
                tracing::warn!(error = %text, "resync did not complete; it runs again");
                inner.update(|s| {
                    s.last_error = Some(text);
                    s.progress = None;
                });
                // Retried: a whole-volume job as it was (the windows to close are in
                // `leftover` now), a regions job from `pending`.
                forced = retry_of(&job);
                if !matches!(e, SyncerError::Tap { .. }) {
                    // Wait for the link to change before trying again.
                    let seen = inner.client.status().sessions;
                    wait(inner, tick, |s| s.sessions != seen);
                }
            }
        }
    }
}

/// Moves the ranges growths added into `pending` once the target acknowledged their resize
/// (`acked`): from then on the replica has the range (as zeros) and a region resync moves
/// only what differs from that.
fn take_grown(
    inner: &Inner,
    grown: &mut Vec<(tidemark_journal::Seq, tidemark_tap::RegionRun)>,
    acked: tidemark_journal::Seq,
    pending: RegionSet,
) -> RegionSet {
    grown.extend(inner.tap.take_grown());
    admit_grown(grown, acked, pending)
}

/// The regions of the growths in `grown` whose resize the target acknowledged (`acked`)
/// join `pending` (and leave `grown`): a region resync then compares them with the
/// replica's new range (zeros) and moves only what differs. Pure, shared with the
/// deterministic simulation.
pub fn admit_grown(
    grown: &mut Vec<(tidemark_journal::Seq, tidemark_tap::RegionRun)>,
    acked: tidemark_journal::Seq,
    mut pending: RegionSet,
) -> RegionSet {
    grown.retain(|(seq, run)| {
        if *seq > acked {
            return true;
        }
        tracing::info!(regions = run.count, resize = %seq, "resyncing the range the volume grew by");
        pending.insert_range(run.first, run.end());
        false
    });
    pending
}

/// The controller's decision when a session opens: what to run given the replica's state in
/// the target's `Resume` (`None` before any), whether a sync already completed here
/// (`synced_once`), the regions out of sync (`pending`) and the window a fresh protection
/// opened (`opened`). Pure, so that the deterministic simulation (`tests/src/sim`) drives
/// the same decision.
pub fn decide(
    replica: Option<&crate::wire::ReplicaState>,
    synced_once: bool,
    pending: &RegionSet,
    opened: Option<u64>,
) -> Option<Job> {
    let replica = replica?;
    let mut ids = replica.open_resyncs.clone();
    ids.extend(opened.filter(|id| !ids.contains(id)));
    let replica = crate::wire::ReplicaState { kind: replica.kind, open_resyncs: ids };
    match replica.kind {
        // Step I leaves all-zero blocks out, right only when every write since the window
        // opened is in the stream; regions out of sync (an overflow, a crash) may hold
        // zeros over data the replica received, so they need a comparison.
        ReplicaKind::Blank if !synced_once && pending.is_empty() => {
            Some(Job::Initial { close: replica.open_resyncs.clone() })
        }
        // Blank after an initial sync completed here (the target lost its replica), or with
        // regions out of sync.
        ReplicaKind::Blank => Some(Job::Full { close: replica.open_resyncs.clone() }),
        ReplicaKind::Inconsistent => Some(Job::Full { close: replica.open_resyncs.clone() }),
        // A fresh protection against a replica that holds another history: compare it all.
        ReplicaKind::Consistent if opened.is_some() => {
            Some(Job::Full { close: replica.open_resyncs.clone() })
        }
        ReplicaKind::Consistent if !pending.is_empty() => Some(Job::Regions(pending.clone())),
        ReplicaKind::Consistent => None,
    }
}

/// The job to run again after `job` failed, or to start as chosen, given what is out of
/// sync now and the windows failed resyncs left open (`leftover`), which it closes: a step I
/// becomes a comparison once regions are out of sync (see [`decide`]). Pure, shared with
/// the deterministic simulation.
pub fn prepare_job(job: Job, pending: &RegionSet, leftover: &[u64]) -> Job {
    let merge = |mut close: Vec<u64>| {
        close.extend(leftover.iter().filter(|id| !close.contains(id)).collect::<Vec<_>>());
        close
    };
    match job {
        Job::Initial { close } if !pending.is_empty() => Job::Full { close: merge(close) },
        Job::Initial { close } => Job::Initial { close: merge(close) },
        Job::Full { close } => Job::Full { close: merge(close) },
        Job::Regions(r) => Job::Regions(r),
    }
}

/// The job that runs again after `job` failed: a whole-volume job with no windows of its
/// own to close (those still open are in `leftover`), none for a regions job (it runs
/// again from `pending`).
pub fn retry_of(job: &Job) -> Option<Job> {
    match job {
        Job::Initial { .. } => Some(Job::Initial { close: Vec::new() }),
        Job::Full { .. } => Some(Job::Full { close: Vec::new() }),
        Job::Regions(_) => None,
    }
}

/// Runs `job`, closing `leftover` too for a regions job; returns the outcome and the windows
/// left open afterwards: `leftover` less those the run closed, plus its own when it failed
/// after opening it.
fn run_job(
    inner: &Arc<Inner>,
    job: &Job,
    leftover: &[u64],
) -> (Result<ResyncReport, SyncerError>, Vec<u64>) {
    let syncer = reporting_syncer(inner);
    let result = run_syncer(inner, &syncer, job, leftover);
    let to_close = match job {
        Job::Initial { close } | Job::Full { close } => close.as_slice(),
        Job::Regions(_) => leftover,
    };
    (result, windows_left_open(to_close, &syncer.closed_windows(), &syncer.open_windows()))
}

/// A resync driver for the pair whose progress goes to the pair's status.
fn reporting_syncer(inner: &Arc<Inner>) -> Syncer {
    let sink = inner.clone();
    Syncer::new(inner.tap.clone(), inner.client.clone(), inner.cfg.syncer.clone())
        .progress(Arc::new(move |p: Progress| sink.update(|s| s.progress = Some(p))))
}

/// The windows open after a resync that was to close `to_close`, closed `closed` and left
/// its own `opened` open (all empty after a success). Pure, shared with the deterministic
/// simulation.
pub fn windows_left_open(to_close: &[u64], closed: &[u64], opened: &[u64]) -> Vec<u64> {
    let mut open: Vec<u64> = to_close.iter().copied().filter(|id| !closed.contains(id)).collect();
    open.extend(opened.iter().filter(|id| !open.contains(id)).collect::<Vec<_>>());
    open
}

fn run_syncer(
    inner: &Arc<Inner>,
    syncer: &Syncer,
    job: &Job,
    leftover: &[u64],
) -> Result<ResyncReport, SyncerError> {
    match job {
        Job::Initial { close } => {
            inner.stage(PairStage::InitialSync);
            let whole = TapSource(inner.tap.clone());
            let view: &dyn BlockSource = match &inner.cfg.initial_view {
                Some(v) => &**v,
                None => &whole,
            };
            syncer.initial_sync(view, close)
        }
        Job::Full { close } => {
            inner.stage(PairStage::Resync);
            syncer.fast_resync(None, close)
        }
        Job::Regions(regions) => {
            inner.stage(PairStage::Resync);
            let ranges = byte_ranges(inner, regions);
            syncer.fast_resync(Some(&ranges), leftover)
        }
    }
}

/// Runs a repair the target asked for: the ranges of this pair's volume, in windows with
/// the target's repair ids, closing what failed resyncs left open (`leftover`). A failed
/// repair is not retried here: the target asks again on its next session (or, if the
/// repair's window is open there, reports the replica inconsistent, and the whole-volume
/// resync that follows closes it).
fn run_repair(inner: &Arc<Inner>, request: &crate::wire::RepairRequest, leftover: &mut Vec<u64>) {
    let volume = inner.cfg.syncer.volume;
    let ranges: Vec<Range<u64>> = request
        .ranges
        .iter()
        .filter(|r| r.volume == volume)
        .map(|r| r.offset..r.offset.saturating_add(r.len))
        .collect();
    // Windows failed resyncs left open (an interrupted repair among them) are closed with
    // it, not begun again. (The target never asks for a repair whose window it has open.)
    let open = leftover.clone();
    let mut _permit = None;
    if let Some(slots) = &inner.cfg.slots {
        while _permit.is_none() && !inner.stopping.load(Ordering::SeqCst) {
            _permit = slots.acquire(Some(inner.cfg.tick));
            inner.update(|s| s.waiting_for_slot = _permit.is_none());
        }
    }
    inner.stage(PairStage::Resync);
    let syncer = reporting_syncer(inner);
    tracing::warn!(ids = ?request.ids, bytes = ranges.iter().map(|r| r.end - r.start).sum::<u64>(),
        "repairing the target's journal: resyncing the ranges it lost");
    let result = syncer.repair(&request.ids, &ranges, &open);
    *leftover = windows_left_open(&open, &syncer.closed_windows(), &syncer.open_windows());
    match result {
        Ok(report) => {
            tracing::info!(id = report.id, differing = report.differing_bytes, end = %report.end_seq,
                "repair of the target's journal sent");
            inner.update(|s| {
                s.repairs += 1;
                s.resyncs += 1;
                s.last_repair = Some(report);
                s.progress = None;
            });
        }
        Err(e) => {
            let text = error_chain(&e);
            tracing::warn!(error = %text, "repair did not complete; the target asks again");
            inner.update(|s| {
                s.last_error = Some(text);
                s.progress = None;
            });
        }
    }
}

fn byte_ranges(inner: &Inner, regions: &RegionSet) -> Vec<Range<u64>> {
    regions
        .runs()
        .map(|run| {
            let (offset, len) = inner.tap.intent().byte_range(run);
            offset..offset + len
        })
        .collect()
}

fn region_bytes(inner: &Inner, regions: &RegionSet) -> u64 {
    byte_ranges(inner, regions).iter().map(|r| r.end - r.start).sum()
}

/// Waits up to `tick` for the shipper's status to satisfy `pred`, or for a stop.
fn wait(inner: &Inner, tick: Duration, pred: impl Fn(&ShipperStatus) -> bool) {
    let stopping = || inner.stopping.load(Ordering::SeqCst);
    inner.client.wait_for(tick, |s| pred(s) || stopping());
}
