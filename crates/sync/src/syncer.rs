//! The source's resync driver for one protected volume behind a [`Tap`]: initial sync
//! (step I), fast resync (whole volume or limited to dirty regions) and verify, using the
//! Merkle comparison of [`crate::resync`] over the shipper's connection.
//!
//! A resync never sends data outside the capture stream: the differing ranges are copied
//! into the spool by [`Tap::resync_copy`] (read and appended under the capture lock), so
//! they reach the target in order with the application's writes, through the same batches,
//! acks, compression and encryption. The copy is bracketed by `ResyncBegin { id }` and
//! `ResyncEnd { id }`: the target's retention log marks the replica inconsistent in
//! between and keeps the last consistent point before it.
//!
//! ```text
//!  local: MerkleTree::build(device via the tap) --+
//!                                                  +--> compare (HashRequest/HashReply over
//!  target: builds its tree on the first request ---+     the shipper's connection)
//!                                                           |
//!                           differing ranges --> Tap::resync_copy --> spool --> shipper
//! ```
//!
//! Step I (initial sync into a blank replica) skips the comparison: it copies the data
//! extents of a view of the volume (holes of a sparse image, blocks an ext4 filesystem has
//! not allocated are not data) and leaves all-zero blocks out. Step II is the stream
//! itself: application writes captured during step I are spooled and shipped in order
//! with it; if the spool overflows meanwhile, the regions it tracked are resynced after.
//!
//! Invariants:
//! 1. Every range a comparison finds different is copied from the device as it is at copy
//!    time, after the comparison, so the replica ends equal to the device (the argument is
//!    in `docs/resync.md`).
//! 2. The spool's backlog is kept under `max_backlog_bytes` by waiting for acks between
//!    copy chunks: a resync never overflows the spool by itself.
//! 3. `ResyncEnd` is appended only after every differing range was copied.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemark_journal::{Event, Seq, VolumeId};
use tidemark_tap::{Tap, TapError, ZeroBlocks};

use crate::resync::{
    BlockSource, CompareOptions, Diff, DiffStats, HashOracle, MerkleTree, ResyncError,
    compare_with, shape_for,
};
use crate::ship::HashClient;
use crate::wire::{HashRequest, NodeHash, NodeRange, TreeShape};

/// How the [`Syncer`] runs.
#[derive(Debug, Clone)]
pub struct SyncerConfig {
    /// The volume in the consistency group.
    pub volume: VolumeId,
    /// Hashing threads (0: one per core).
    pub threads: usize,
    /// How long one hash request may wait for its reply (the target's first reply includes
    /// hashing its whole replica).
    pub request_timeout: Duration,
    /// Comparisons attempted before giving up when the connection keeps failing.
    pub attempts: u32,
    /// Bytes copied into the spool per step (between backlog checks).
    pub copy_chunk: u64,
    /// The resync waits for acknowledgements while the spool holds more than this.
    pub max_backlog_bytes: u64,
    /// How long to wait for the backlog to drain before giving up.
    pub backlog_timeout: Duration,
    /// Most nodes per hash request.
    pub max_hashes_per_request: u32,
}

impl SyncerConfig {
    /// Defaults for `volume`.
    pub fn new(volume: VolumeId) -> Self {
        Self {
            volume,
            threads: 0,
            request_timeout: Duration::from_secs(600),
            attempts: 5,
            copy_chunk: 4 << 20,
            max_backlog_bytes: 256 << 20,
            backlog_timeout: Duration::from_secs(3600),
            max_hashes_per_request: crate::resync::DEFAULT_MAX_HASHES_PER_REQUEST,
        }
    }
}

/// What a long operation is doing, for a progress bar or the status output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Hashing the local volume.
    Hashing,
    /// Exchanging hashes with the target.
    Comparing,
    /// Copying ranges into the capture stream.
    Copying,
}

/// Progress of a phase: `done` of `total` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// The phase.
    pub phase: Phase,
    /// Bytes done.
    pub done: u64,
    /// Bytes in all.
    pub total: u64,
}

/// A progress callback (called from worker threads).
pub type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;

/// What a resync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResyncReport {
    /// The resync window's id.
    pub id: u64,
    /// Bytes of the volume compared: the limit ranges of a limited resync, else the whole
    /// volume (for step I: scanned).
    pub volume_bytes: u64,
    /// Bytes found different (step I: bytes of data extents).
    pub differing_bytes: u64,
    /// Bytes appended as data.
    pub data_bytes: u64,
    /// Bytes found all-zero (sent as ranges, or left out for a blank replica).
    pub zero_bytes: u64,
    /// The comparison's cost (zero for step I).
    pub compare: DiffStats,
    /// Comparisons started (more than one after a lost connection).
    pub attempts: u32,
    /// Sequence number of the `ResyncEnd`.
    pub end_seq: Seq,
    /// Wall time.
    pub elapsed: Duration,
}

/// Why a resync stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncerError {
    /// The comparison failed (hashing, a bad reply), or every attempt lost its connection.
    #[error("resync {id} of volume {volume}: comparison failed")]
    Compare {
        /// The resync id.
        id: u64,
        /// The volume.
        volume: VolumeId,
        /// The cause.
        #[source]
        source: ResyncError,
    },
    /// The tap refused a copy or a marker (the spool overflowed or failed).
    #[error("resync {id} of volume {volume}: {what}")]
    Tap {
        /// The resync id (0 before it began).
        id: u64,
        /// The volume.
        volume: VolumeId,
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: Box<TapError>,
    },
    /// A controller thread could not be started.
    #[error("cannot start the pair controller: {what}")]
    Thread {
        /// What the system said.
        what: String,
    },
    /// The view given to step I does not have the device's length.
    #[error("initial sync: {view} holds {found} bytes, the protected device {expected}")]
    ViewLength {
        /// The view.
        view: String,
        /// Its length.
        found: u64,
        /// The device's length.
        expected: u64,
    },
    /// The spool's backlog did not drain in time (the link is down or too slow).
    #[error(
        "resync {id} of volume {volume}: the spool backlog stayed above {limit} bytes for {waited:?}"
    )]
    Backlog {
        /// The resync id.
        id: u64,
        /// The volume.
        volume: VolumeId,
        /// The limit.
        limit: u64,
        /// How long it waited.
        waited: Duration,
    },
    /// The target did not acknowledge the events before the resync's window in time, so
    /// the comparison could not start (the link is down or too slow).
    #[error(
        "resync {id} of volume {volume}: the target did not acknowledge seq {seq} (the window's start) within {waited:?}"
    )]
    NotAcknowledged {
        /// The resync id.
        id: u64,
        /// The volume.
        volume: VolumeId,
        /// The sequence number awaited.
        seq: Seq,
        /// How long it waited.
        waited: Duration,
    },
}

/// The resync driver of one volume (see the module documentation).
pub struct Syncer {
    tap: Arc<Tap>,
    client: HashClient,
    cfg: SyncerConfig,
    progress: Option<ProgressFn>,
    /// Ids of the windows this driver opened (its `ResyncBegin` was appended) and has not
    /// closed, and of the windows it closed: what a failed resync leaves open on the
    /// replica, and which of the windows it was asked to close it did close.
    windows: std::sync::Mutex<(Vec<u64>, Vec<u64>)>,
}

impl std::fmt::Debug for Syncer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Syncer").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

/// The protected device as the tap reads it, as a [`BlockSource`].
#[derive(Clone)]
pub struct TapSource(pub Arc<Tap>);

impl std::fmt::Debug for TapSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TapSource")
    }
}

impl BlockSource for TapSource {
    fn len(&self) -> u64 {
        self.0.device_len()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read(offset, buf).map_err(std::io::Error::other)
    }

    fn will_need(&self, range: std::ops::Range<u64>) {
        self.0.will_need(range.start, range.end.saturating_sub(range.start));
    }

    fn describe(&self) -> String {
        "the protected device".to_owned()
    }
}

/// The target's tree through the shipper's connection, with the root level fetched ahead
/// (so that the target hashes its replica while this side hashes the device).
struct RemoteOracle<'a> {
    client: &'a HashClient,
    timeout: Duration,
    prefetched: Option<(HashRequest, Vec<NodeHash>)>,
}

impl HashOracle for RemoteOracle<'_> {
    fn hashes(&mut self, request: &HashRequest) -> Result<Vec<NodeHash>, ResyncError> {
        if let Some((asked, hashes)) = self.prefetched.take() {
            if asked.volume == request.volume
                && asked.shape == request.shape
                && asked.level == request.level
                && asked.ranges == request.ranges
            {
                return Ok(hashes);
            }
        }
        self.client.request(request.clone(), self.timeout).map(|reply| reply.hashes).map_err(|e| {
            ResyncError::Oracle {
                id: request.id,
                volume: request.volume,
                level: request.level,
                source: Box::new(e),
            }
        })
    }
}

impl Syncer {
    /// A driver copying through `tap`, comparing over the connection of `client`.
    pub fn new(tap: Arc<Tap>, client: HashClient, cfg: SyncerConfig) -> Self {
        Self { tap, client, cfg, progress: None, windows: std::sync::Mutex::default() }
    }

    /// Ids of the resync windows this driver opened and did not close: after a failed
    /// resync, the window it leaves open on the replica (in the capture stream, so the target
    /// will hold it), which the next resync must close with its `also_close`.
    pub fn open_windows(&self) -> Vec<u64> {
        self.windows.lock().unwrap_or_else(|e| e.into_inner()).0.clone()
    }

    /// Ids of the windows whose `ResyncEnd` this driver appended (its own and those of
    /// `also_close`).
    pub fn closed_windows(&self) -> Vec<u64> {
        self.windows.lock().unwrap_or_else(|e| e.into_inner()).1.clone()
    }

    /// Reports progress to `progress`.
    pub fn progress(mut self, progress: ProgressFn) -> Self {
        self.progress = Some(progress);
        self
    }

    fn report(&self, phase: Phase, done: u64, total: u64) {
        if let Some(p) = &self.progress {
            p(Progress { phase, done, total });
        }
    }

    fn new_id() -> u64 {
        loop {
            let id = rand_u64();
            if id != 0 {
                return id;
            }
        }
    }

    fn marker(&self, id: u64, event: Event, what: &str) -> Result<Seq, SyncerError> {
        let seq = self.tap.append_marker(event.clone()).map_err(|source| SyncerError::Tap {
            id,
            volume: self.cfg.volume,
            what: what.to_owned(),
            source: Box::new(source),
        })?;
        {
            let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
            match event {
                Event::ResyncBegin { id } => windows.0.push(id),
                Event::ResyncEnd { id } => {
                    windows.0.retain(|&o| o != id);
                    windows.1.push(id);
                }
                _ => {}
            }
        }
        self.commit(id)?;
        Ok(seq)
    }

    fn commit(&self, id: u64) -> Result<(), SyncerError> {
        self.tap.sync_spool().map_err(|source| SyncerError::Tap {
            id,
            volume: self.cfg.volume,
            what: "syncing the spool".to_owned(),
            source: Box::new(source),
        })?;
        self.client.ring();
        Ok(())
    }

    /// The backlog limit in force: the configured one, and at most half the spool, so that
    /// the application's writes always find room beside the resync's.
    fn backlog_limit(&self) -> u64 {
        let capacity = self.tap.with_spool(|s| s.capacity_bytes());
        self.cfg.max_backlog_bytes.min(capacity / 2)
    }

    /// Bytes copied per step: the configured chunk, at most a quarter of the spool.
    fn chunk(&self) -> u64 {
        let capacity = self.tap.with_spool(|s| s.capacity_bytes());
        self.cfg.copy_chunk.min(capacity / 4).max(4096)
    }

    /// Waits until the spool's backlog is under the limit.
    fn throttle(&self, id: u64) -> Result<(), SyncerError> {
        let limit = self.backlog_limit();
        if self.tap.status().backlog_bytes <= limit {
            return Ok(());
        }
        let started = Instant::now();
        // The spool decides, not the shipper's status: that snapshot is taken when the
        // shipper last read or trimmed the spool, before the copies appended since (on a
        // loaded machine it lags by chunks, and the copy then overflowed the spool).
        loop {
            if self.tap.status().backlog_bytes <= limit {
                return Ok(());
            }
            let left = self.cfg.backlog_timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Err(SyncerError::Backlog {
                    id,
                    volume: self.cfg.volume,
                    limit,
                    waited: started.elapsed(),
                });
            }
            // Woken by the next ack (the spool is trimmed before the status shows it).
            let seen = self.client.status().acked;
            self.client.wait_for(left.min(Duration::from_millis(50)), |s| s.acked != seen);
        }
    }

    /// Waits until the target acknowledged `seq` (within the backlog timeout).
    fn wait_acked(&self, id: u64, seq: Seq) -> Result<(), SyncerError> {
        let started = Instant::now();
        if self.client.wait_for(self.cfg.backlog_timeout, |s| s.acked >= seq).is_some() {
            return Ok(());
        }
        Err(SyncerError::NotAcknowledged {
            id,
            volume: self.cfg.volume,
            seq,
            waited: started.elapsed(),
        })
    }

    /// Copies `ranges` into the capture stream, chunk by chunk, within the backlog limit.
    fn copy(
        &self,
        id: u64,
        ranges: &[Range<u64>],
        zeros: ZeroBlocks,
        report: &mut ResyncReport,
    ) -> Result<(), SyncerError> {
        let total: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        let chunk = self.chunk();
        let mut done = 0;
        // Bytes appended since the last group commit: one commit per `chunk` of copies,
        // not one per range (a scattered diff has thousands of 4 KiB ranges).
        let mut uncommitted = 0;
        self.report(Phase::Copying, 0, total);
        for r in ranges {
            let mut at = r.start;
            while at < r.end {
                if uncommitted >= chunk {
                    self.commit(id)?;
                    uncommitted = 0;
                }
                self.throttle(id)?;
                let n = (r.end - at).min(chunk);
                let copied =
                    self.tap.resync_copy(at, n, zeros).map_err(|source| SyncerError::Tap {
                        id,
                        volume: self.cfg.volume,
                        what: format!("copying {n} bytes at byte {at}"),
                        source: Box::new(source),
                    })?;
                report.data_bytes += copied.data_bytes;
                report.zero_bytes += copied.zero_bytes;
                uncommitted += n;
                at += n;
                done += n;
                self.report(Phase::Copying, done, total);
            }
        }
        if uncommitted > 0 {
            self.commit(id)?;
        }
        Ok(())
    }

    /// Step I of an initial sync into a blank replica: copies the data extents of `view`
    /// (a view of the protected device: a [`crate::resync::FileSource`] of its image for
    /// holes, an [`crate::resync::Ext4InUse`] for a filesystem's allocated blocks, or
    /// [`TapSource`] for everything), all-zero blocks left out.
    ///
    /// `also_close`: ids of resync windows already open on the blank replica (the window a
    /// new protection opens first, an interrupted step I), closed with this one.
    pub fn initial_sync(
        &self,
        view: &dyn BlockSource,
        also_close: &[u64],
    ) -> Result<ResyncReport, SyncerError> {
        let started = Instant::now();
        let id = Self::new_id();
        let volume = self.cfg.volume;
        let len = self.tap.device_len();
        if view.len() != len {
            return Err(SyncerError::ViewLength {
                view: view.describe(),
                found: view.len(),
                expected: len,
            });
        }
        let extents = view.data_extents(0..len).map_err(|source| SyncerError::Compare {
            id,
            volume,
            source: ResyncError::Extents { object: view.describe(), range: 0..len, source },
        })?;
        let mut report = ResyncReport { id, volume_bytes: len, ..ResyncReport::default() };
        report.differing_bytes = extents.iter().map(|r| r.end - r.start).sum();
        self.marker(id, Event::ResyncBegin { id }, "appending ResyncBegin")?;
        self.copy(id, &extents, ZeroBlocks::Skip, &mut report)?;
        self.close_also(id, also_close)?;
        report.end_seq = self.marker(id, Event::ResyncEnd { id }, "appending ResyncEnd")?;
        report.elapsed = started.elapsed();
        Ok(report)
    }

    /// Fast resync: compares the device with the replica through the Merkle trees and
    /// copies the differing leaves. `limit`: compare only these ranges (the dirty regions
    /// after a crash or a spool overflow). `also_close`: ids of resync windows left open by
    /// an earlier, interrupted resync, closed together with this one.
    pub fn fast_resync(
        &self,
        limit: Option<&[Range<u64>]>,
        also_close: &[u64],
    ) -> Result<ResyncReport, SyncerError> {
        let started = Instant::now();
        let id = Self::new_id();
        // The bytes compared: the limit ranges, or the whole volume.
        let volume_bytes = limit.map_or(self.tap.device_len(), |ranges| {
            ranges.iter().map(|r| r.end.min(self.tap.device_len()).saturating_sub(r.start)).sum()
        });
        let mut report = ResyncReport { id, volume_bytes, ..ResyncReport::default() };
        let begin = self.marker(id, Event::ResyncBegin { id }, "appending ResyncBegin")?;
        // Compare only once the target holds everything before the window: an event still
        // in the backlog could otherwise change a range found equal (a write the device
        // lost in a crash, or one an out-of-sync write overtook) after the comparison.
        self.wait_acked(id, begin)?;
        let diff = self.compare_retrying(id, limit, &mut report.attempts)?;
        report.differing_bytes = diff.differing_bytes();
        report.compare = diff.stats;
        self.copy(id, &diff.ranges, ZeroBlocks::Send, &mut report)?;
        self.close_also(id, also_close)?;
        report.end_seq = self.marker(id, Event::ResyncEnd { id }, "appending ResyncEnd")?;
        report.elapsed = started.elapsed();
        Ok(report)
    }

    /// A repair the target asked for (`RepairRequest`): a fast resync limited to `limit`
    /// whose window opens with each of the target's repair `ids`, so the target knows which
    /// of its journal damage the resync's end repairs. Ids in `also_close` are open on the
    /// replica already (an interrupted repair): they are not begun again, only closed with
    /// the rest at the end.
    pub fn repair(
        &self,
        ids: &[u64],
        limit: &[Range<u64>],
        also_close: &[u64],
    ) -> Result<ResyncReport, SyncerError> {
        let started = Instant::now();
        let mut fresh: Vec<u64> = Vec::new();
        for id in ids {
            if *id != 0 && !also_close.contains(id) && !fresh.contains(id) {
                fresh.push(*id);
            }
        }
        if fresh.is_empty() {
            fresh.push(Self::new_id());
        }
        let id = fresh[0];
        let len = self.tap.device_len();
        let limit: Vec<Range<u64>> = limit
            .iter()
            .map(|r| r.start.min(len)..r.end.min(len))
            .filter(|r| r.start < r.end)
            .collect();
        let volume_bytes = limit.iter().map(|r| r.end - r.start).sum();
        let mut report = ResyncReport { id, volume_bytes, ..ResyncReport::default() };
        let mut begin = Seq::ZERO;
        for &w in &fresh {
            begin = self.marker(w, Event::ResyncBegin { id: w }, "opening a repair window")?;
        }
        // As for a fast resync: compare once the target holds everything before the window.
        self.wait_acked(id, begin)?;
        if !limit.is_empty() {
            let diff = self.compare_retrying(id, Some(&limit), &mut report.attempts)?;
            report.differing_bytes = diff.differing_bytes();
            report.compare = diff.stats;
            self.copy(id, &diff.ranges, ZeroBlocks::Send, &mut report)?;
        }
        self.close_also(id, also_close)?;
        for &w in &fresh[1..] {
            self.marker(w, Event::ResyncEnd { id: w }, "closing a repair window")?;
        }
        report.end_seq = self.marker(id, Event::ResyncEnd { id }, "closing the repair")?;
        report.elapsed = started.elapsed();
        Ok(report)
    }

    fn close_also(&self, id: u64, also_close: &[u64]) -> Result<(), SyncerError> {
        for &old in also_close {
            if old != id {
                self.marker(id, Event::ResyncEnd { id: old }, "closing an interrupted resync")?;
            }
        }
        Ok(())
    }

    /// Opens a resync window before anything else is captured, for a new protection: the
    /// replica then stays marked as not yet initially synced whatever the application
    /// writes before step I runs. Returns the window's id, for
    /// [`Syncer::initial_sync`]'s `also_close`.
    pub fn open_initial_window(&self) -> Result<u64, SyncerError> {
        let id = Self::new_id();
        self.marker(id, Event::ResyncBegin { id }, "opening the initial sync's window")?;
        Ok(id)
    }

    /// Compares the device with the replica without sending anything; returns the
    /// differing ranges.
    pub fn verify(&self, limit: Option<&[Range<u64>]>) -> Result<Diff, SyncerError> {
        let mut attempts = 0;
        self.compare_retrying(0, limit, &mut attempts)
    }

    fn compare_retrying(
        &self,
        id: u64,
        limit: Option<&[Range<u64>]>,
        attempts: &mut u32,
    ) -> Result<Diff, SyncerError> {
        let volume = self.cfg.volume;
        let source = TapSource(self.tap.clone());
        let shape = shape_for(source.len());
        loop {
            *attempts += 1;
            match self.compare_once(&source, shape, limit) {
                Ok(diff) => return Ok(diff),
                Err(e @ ResyncError::Oracle { .. }) if *attempts < self.cfg.attempts => {
                    tracing::warn!(id, %volume, error = %crate::ship::error_chain(&e), "resync comparison lost its connection; starting again");
                }
                Err(source) => return Err(SyncerError::Compare { id, volume, source }),
            }
        }
    }

    fn compare_once(
        &self,
        source: &TapSource,
        shape: TreeShape,
        limit: Option<&[Range<u64>]>,
    ) -> Result<Diff, ResyncError> {
        let volume = self.cfg.volume;
        let len = source.len();
        let root = HashRequest {
            id: 0,
            volume,
            shape,
            level: shape.root_level(len),
            ranges: vec![NodeRange { first: 0, count: 1 }],
        };
        let total = limit.map_or(len, |ranges| {
            ranges.iter().map(|r| r.end.min(len).saturating_sub(r.start)).sum()
        });
        let done = std::sync::atomic::AtomicU64::new(0);
        let progress = |n: u64| {
            let d = done.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
            self.report(Phase::Hashing, d, total);
        };
        // Without a limit, the target hashes its replica while this side hashes the device.
        let (local, prefetched) = std::thread::scope(|s| {
            let prefetch = limit.is_none().then(|| {
                let (client, timeout, root) =
                    (&self.client, self.cfg.request_timeout, root.clone());
                s.spawn(move || client.request(root, timeout))
            });
            // With a limit, only the leaves of the limit ranges are compared (the default
            // `LimitMode::Leaves`): hash just those.
            let local = match limit {
                Some(ranges) => {
                    MerkleTree::build_limited(source, shape, ranges, self.cfg.threads, &progress)
                }
                None => MerkleTree::build_with_progress(source, shape, self.cfg.threads, &progress),
            };
            let prefetched =
                prefetch.map(|t| t.join().expect("the prefetch thread does not panic"));
            (local, prefetched)
        });
        let local = local?;
        let prefetched = match prefetched {
            Some(Ok(reply)) => Some((root, reply.hashes)),
            Some(Err(e)) => {
                return Err(ResyncError::Oracle {
                    id: 0,
                    volume,
                    level: root.level,
                    source: Box::new(e),
                });
            }
            None => None,
        };
        self.report(Phase::Comparing, 0, 1);
        let mut oracle =
            RemoteOracle { client: &self.client, timeout: self.cfg.request_timeout, prefetched };
        let options = CompareOptions {
            max_hashes_per_request: self.cfg.max_hashes_per_request,
            ..CompareOptions::default()
        };
        let diff = compare_with(&local, &mut oracle, volume, limit, &options)?;
        self.report(Phase::Comparing, 1, 1);
        Ok(diff)
    }
}

fn rand_u64() -> u64 {
    // The id only needs to differ from the ids of this pair's other resync windows.
    rand::random()
}
