//! The retention log: the target's continuous-data-protection history of one volume, or of
//! a consistency group of volumes that share one timeline.
//!
//! Design: a **redo** journal over a base image. Every incoming write is appended once,
//! sequentially, to the log (new data), and is indexed by (volume, block). The base image
//! holds the volume as of the oldest point in the window. A read of block `b` as of
//! recovery point `P` takes the newest record for `b` at or below `P` from the index (one
//! O(log n) lookup and one read), else the base. When history leaves the window its records
//! are applied to the base (the last version of each block only) and their segments are
//! deleted; sparse tiers coalesce the records between two retained points into one version
//! per block, rewriting those segments. `ARCHITECTURE.md` gives the I/O cost of this choice
//! against an undo journal.
//!
//! Invariants:
//! - Every retained point reads back exactly the state the source had there: the base plus
//!   the newest record at or below it for every block.
//! - A point dropped by thinning is never offered again: its barrier record is removed by
//!   the same rewrite that coalesces its interval, and the manifest's thin horizon stops a
//!   sequence number there from resolving.
//! - Incoming writes are never refused for space and the newest point is never dropped;
//!   when the space limit is hit the oldest history goes first, with a log line and a
//!   status flag.
//! - A base advance is redo-idempotent: the manifest records the target first, records are
//!   deleted only after the base is synced, and an interrupted advance is finished on open.
//! - A resync never destroys the last consistent recovery point before it completes. A
//!   resync window runs from a `ResyncBegin` until every id opened since has its
//!   `ResyncEnd` (overlapping windows form one span). No barrier or bookmark inside a span
//!   is offered, no sequence number inside one resolves, and the `ResyncEnd` that closes a
//!   span is a point. Since the base only ever moves to an offered point, retention never
//!   folds history past the last consistent point before an open span, whatever the
//!   policy; a space limit that cannot be met because of that is reported, not enforced.
//! - A resync span that opens before any consistent point of a journal whose base is still
//!   at seq 0 is an initial sync into a blank replica: not even the base is offered until it
//!   completes. (The journal cannot see whether the base device held a consistent state.)
//! - Resync spans are rebuilt from the `ResyncBegin`/`ResyncEnd` records on open; a
//!   compaction keeps a span's markers exactly when it keeps the point that closes it.
//! - A held state stays readable byte for byte (see [`PointHold`]): while a hold on seq `H`
//!   lives, no retention pass moves the base above `H` (age, tiers or space: a space limit
//!   it blocks is reported as `space_held_by_holds`), and no thinned interval is coalesced
//!   across `H` (the retained points on both sides of `H` are kept). Holds live in memory
//!   only: they are for virtual snapshots of the running process, not across a restart.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::Clock;
use crate::crypto::JournalKey;
use crate::error::{JournalError, Result};
use crate::format::{self, MAX_PAYLOAD, RecordHeader, RecordKind, Role};
use crate::index::{BlockIndex, BlockKey, Entry};
use crate::io::{BlockIo, Dir};
use crate::log::{Loc, LogOptions, OpenReport, RecordSource, RecordSpec, SegmentLog};
use crate::types::{Bookmark, BookmarkKind, Event, Nanos, Seq, VolumeId};

mod damage;
mod direct;
pub use damage::JournalDamage;

/// A point in the history to read, expose or recover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryPoint {
    /// Everything received.
    Latest,
    /// The newest barrier or bookmark at or before this time.
    Time(Nanos),
    /// The state right after this sequence number.
    Seq(Seq),
    /// The newest bookmark with this name.
    Bookmark(String),
}

impl std::fmt::Display for RecoveryPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Latest => write!(f, "latest"),
            Self::Time(t) => write!(f, "time {}", t.0),
            Self::Seq(s) => write!(f, "seq {s}"),
            Self::Bookmark(b) => write!(f, "bookmark {b:?}"),
        }
    }
}

/// What a retained point is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PointKind {
    /// The oldest point: the base image.
    Base,
    /// A flush point.
    Barrier,
    /// A bookmark.
    Bookmark(Bookmark),
    /// Everything received (may end between barriers).
    Latest,
    /// The end of a resync: the replica is consistent again after it.
    ResyncEnd {
        /// The id of the resync window whose end closed the last open window.
        id: u64,
    },
}

/// A recovery point the log offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointInfo {
    /// State after this sequence number.
    pub seq: Seq,
    /// Its time.
    pub time: Nanos,
    /// What it is.
    pub kind: PointKind,
}

impl PointInfo {
    fn bookmark_kind(&self) -> Option<BookmarkKind> {
        match &self.kind {
            PointKind::Bookmark(b) => Some(b.kind),
            _ => None,
        }
    }

    /// A bookmark of a consistency group (group id not 0). Sparse tiers always keep these:
    /// whether a tier keeps an ordinary point depends on the other points of its own log
    /// (the last of its interval), which differ between the group's members, and a group
    /// bookmark is only recoverable while every member keeps it. Only the age limit and the
    /// space limit drop them.
    pub fn is_group_bookmark(&self) -> bool {
        matches!(&self.kind, PointKind::Bookmark(b) if b.group != 0)
    }
}

/// Which points a tier keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keep {
    /// Every point.
    All,
    /// The last point of every `interval` (aligned to the epoch), plus every bookmark of
    /// the listed kinds.
    Every {
        /// Spacing of the kept points.
        interval: Duration,
        /// Bookmark kinds always kept.
        bookmarks: Vec<BookmarkKind>,
    },
    /// Only bookmarks of the listed kinds.
    Bookmarks(Vec<BookmarkKind>),
}

/// A sparse-retention tier: points older than `older_than` are kept as `keep` says (the
/// tier with the largest `older_than` at or below a point's age applies; younger points are
/// all kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    /// Age at which the tier starts.
    pub older_than: Duration,
    /// What it keeps.
    pub keep: Keep,
}

/// How much history to keep. Limits combine: the first one hit wins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Nothing older than this is kept.
    pub max_age: Option<Duration>,
    /// The journal's files never stay above this many bytes (at segment granularity).
    pub max_bytes: Option<u64>,
    /// Sparse tiers, any order.
    pub tiers: Vec<Tier>,
}

impl RetentionPolicy {
    /// Checks the policy for contradictions.
    pub fn validate(&self, segment_bytes: u64) -> Result<()> {
        if let Some(b) = self.max_bytes {
            if b < 4 * segment_bytes {
                return Err(JournalError::Config(format!(
                    "space limit of {b} bytes is below four segments ({} bytes); lower the segment size",
                    4 * segment_bytes
                )));
            }
        }
        for t in &self.tiers {
            if let Keep::Every { interval, .. } = &t.keep {
                if interval.is_zero() {
                    return Err(JournalError::Config(format!(
                        "tier older than {:?} keeps one point per zero interval",
                        t.older_than
                    )));
                }
            }
            if let Some(max) = self.max_age {
                if t.older_than >= max {
                    return Err(JournalError::Config(format!(
                        "tier older than {:?} starts beyond the maximum age {max:?}",
                        t.older_than
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Settings of a retention log.
#[derive(Debug, Clone)]
pub struct RetentionConfig {
    /// Segment size.
    pub segment_bytes: u64,
    /// Index granularity for a new log (4096 is right for most filesystems).
    pub block_size: u32,
    /// Encryption at rest.
    pub key: Option<JournalKey>,
    /// What to keep.
    pub policy: RetentionPolicy,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
            block_size: 4096,
            key: None,
            policy: RetentionPolicy::default(),
        }
    }
}

/// What one retention pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Points no longer offered.
    pub dropped_points: usize,
    /// Points that remain (including the base).
    pub retained_points: usize,
    /// The base moved to this point.
    pub base_advanced_to: Option<Seq>,
    /// Intervals coalesced.
    pub intervals_coalesced: usize,
    /// Journal bytes before and after.
    pub bytes_before: u64,
    /// Journal bytes after.
    pub bytes_after: u64,
    /// History was dropped to stay within the space limit.
    pub thinned_for_space: bool,
    /// The space limit is still exceeded because an open resync window holds everything
    /// since the last consistent point before it (see [`RetentionStatus::inconsistent`]).
    pub space_held_by_resync: bool,
    /// History was kept, and the space limit possibly not met, because a [`PointHold`]
    /// (a virtual snapshot) needs it.
    pub space_held_by_holds: bool,
    /// Points kept only because a [`PointHold`] needs them.
    pub kept_for_holds: usize,
}

/// The resync window that leaves the replica inconsistent now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResyncWindowInfo {
    /// The id of the `ResyncBegin` that opened the span of (possibly overlapping) windows.
    pub id: u64,
    /// Its sequence number.
    pub begin_seq: Seq,
    /// Its time.
    pub begin_time: Nanos,
    /// The ids still open, in the order they began.
    pub open_ids: Vec<u64>,
    /// True when no consistent point precedes the window (an initial sync into a blank
    /// replica): nothing can be recovered until it ends.
    pub initial_sync: bool,
}

/// The state of the window, for status output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionStatus {
    /// The oldest point (the base).
    pub oldest: PointInfo,
    /// The newest sequence number received.
    pub newest_seq: Seq,
    /// Its time.
    pub newest_time: Nanos,
    /// Time span really recoverable.
    pub window_available: Duration,
    /// Time span the policy asks for.
    pub window_configured: Option<Duration>,
    /// Points offered.
    pub points: usize,
    /// Journal bytes on disk.
    pub bytes: u64,
    /// Space limit.
    pub max_bytes: Option<u64>,
    /// The space limit has forced history out (the window is shorter than configured).
    pub thinned_for_space: bool,
    /// What the last forced thinning did.
    pub space_note: Option<String>,
    /// The open resync window, if the replica is inconsistent now.
    pub inconsistent: Option<ResyncWindowInfo>,
    /// What [`RecoveryPoint::Latest`] resolves to: the newest consistent state (`None`
    /// during an initial sync).
    pub last_consistent: Option<PointInfo>,
    /// At the last retention pass the space limit could not be met because of the open
    /// resync window.
    pub space_held_by_resync: bool,
    /// Damaged stretches of the journal above the base and their repairs.
    pub damage: Vec<JournalDamage>,
}

/// A stretch of the capture stream during which at least one resync window was open.
#[derive(Debug, Clone)]
struct ResyncSpan {
    /// Id of the `ResyncBegin` that opened the span.
    first_id: u64,
    begin_seq: Seq,
    begin_time: Nanos,
    /// The `ResyncEnd` that closed the last open window; `None` while open.
    end: Option<Seq>,
    /// Ids open now, in begin order (empty once closed).
    open_ids: Vec<(u64, Seq)>,
    /// Bookmarks taken inside the span (never offered): (seq, name).
    bookmarks: Vec<(Seq, String)>,
    /// Every id opened in the span, in begin order (a repair names its damage by id).
    ids: Vec<u64>,
}

impl ResyncSpan {
    /// True when the state after `s` lies inside the span (`begin_seq <= s < end`).
    fn contains(&self, s: Seq) -> bool {
        s >= self.begin_seq && self.end.is_none_or(|e| s < e)
    }

    fn describe(&self) -> String {
        match self.end {
            Some(e) => {
                format!("resync window id {} (seqs {}..{})", self.first_id, self.begin_seq, e)
            }
            None => {
                format!("resync window id {} (open since seq {})", self.first_id, self.begin_seq)
            }
        }
    }
}

/// The resync spans above the base, in sequence order (only the last may be open).
#[derive(Debug, Default)]
struct Windows {
    spans: Vec<ResyncSpan>,
}

impl Windows {
    fn open(&self) -> Option<&ResyncSpan> {
        self.spans.last().filter(|s| s.end.is_none())
    }

    fn containing(&self, s: Seq) -> Option<&ResyncSpan> {
        let i = self.spans.partition_point(|sp| sp.begin_seq <= s);
        self.spans[..i].last().filter(|sp| sp.contains(s))
    }

    /// The seq of the `ResyncEnd` closing the span that holds the marker at `s`.
    fn closes_at(&self, s: Seq) -> Option<Seq> {
        let i = self.spans.partition_point(|sp| sp.begin_seq <= s);
        let sp = self.spans[..i].last()?;
        sp.end.filter(|e| *e >= s)
    }

    /// Checks a resync marker against the open windows, without changing anything.
    fn check(&self, seq: Seq, event: &Event) -> Result<()> {
        let err = |id: u64, reason: String| JournalError::Resync { seq, id, reason };
        let open_ids = || -> Vec<u64> {
            self.open()
                .map(|sp| sp.open_ids.iter().map(|(id, _)| *id).collect())
                .unwrap_or_default()
        };
        match event {
            Event::ResyncBegin { id: 0 } | Event::ResyncEnd { id: 0 } => {
                Err(err(0, "resync ids are nonzero".to_owned()))
            }
            Event::ResyncBegin { id } => match self
                .open()
                .and_then(|sp| sp.open_ids.iter().find(|(i, _)| i == id))
            {
                Some((_, since)) => Err(err(
                    *id,
                    format!("ResyncBegin for a window that is already open (since seq {since})"),
                )),
                None => Ok(()),
            },
            Event::ResyncEnd { id } => {
                let open = open_ids();
                if open.contains(id) {
                    Ok(())
                } else if open.is_empty() {
                    Err(err(
                        *id,
                        "ResyncEnd without a ResyncBegin: no resync window is open".to_owned(),
                    ))
                } else {
                    Err(err(
                        *id,
                        format!("ResyncEnd for a window that is not open (open ids: {open:?})"),
                    ))
                }
            }
            _ => Ok(()),
        }
    }

    /// Applies a checked event: opens or closes windows, hides points inside them. Returns
    /// the kind of point the event makes, if it makes one.
    fn apply(&mut self, seq: Seq, time: Nanos, event: &Event) -> Option<PointKind> {
        let open = self.spans.last_mut().filter(|s| s.end.is_none());
        match (event, open) {
            (Event::ResyncBegin { id }, Some(sp)) => {
                sp.open_ids.push((*id, seq));
                sp.ids.push(*id);
                None
            }
            (Event::ResyncBegin { id }, None) => {
                self.spans.push(ResyncSpan {
                    first_id: *id,
                    begin_seq: seq,
                    begin_time: time,
                    end: None,
                    open_ids: vec![(*id, seq)],
                    bookmarks: Vec::new(),
                    ids: vec![*id],
                });
                None
            }
            (Event::ResyncEnd { id }, Some(sp)) => {
                sp.open_ids.retain(|(i, _)| i != id);
                if sp.open_ids.is_empty() {
                    sp.end = Some(seq);
                    Some(PointKind::ResyncEnd { id: *id })
                } else {
                    None
                }
            }
            (Event::Bookmark(b), Some(sp)) => {
                sp.bookmarks.push((seq, b.name.clone()));
                None
            }
            (Event::Bookmark(b), None) => Some(PointKind::Bookmark(b.clone())),
            (Event::Barrier, None) => Some(PointKind::Barrier),
            _ => None,
        }
    }
}

/// What [`RetentionLog::materialize`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaterializeReport {
    /// Bytes written.
    pub bytes: u64,
    /// Blocks that came from the journal rather than the base.
    pub journal_blocks: u64,
    /// BLAKE3 of the whole image written.
    pub hash: [u8; 32],
    /// The base was read and the image written with direct I/O ([`CopyMode::Auto`] on a
    /// pair that takes it), not through the page cache.
    pub direct_io: bool,
}

/// How [`RetentionLog::materialize_with`] moves the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CopyMode {
    /// Direct I/O (`O_DIRECT`: no page cache, no CPU copy of the base's bytes) where both
    /// the base and the output take it, else [`CopyMode::PageCache`].
    #[default]
    Auto,
    /// Through the page cache: the unchanged ranges copied inside the kernel
    /// (`copy_file_range`) where the pair allows it, else through a buffer; the image read
    /// back to be hashed.
    PageCache,
}

/// The held sequence numbers of a log, each with its number of holds.
type HoldSet = Arc<Mutex<BTreeMap<Seq, usize>>>;

/// Keeps the state after one sequence number readable while it lives (see the module
/// documentation): [`RetentionLog::enforce`] neither moves the base past it nor coalesces
/// history across it. Taken with [`RetentionLog::hold`]; released on drop. Holds of the
/// same state stack.
#[derive(Debug)]
pub struct PointHold {
    holds: HoldSet,
    point: PointInfo,
}

impl PointHold {
    /// The held point.
    pub fn point(&self) -> &PointInfo {
        &self.point
    }
}

impl Drop for PointHold {
    fn drop(&mut self) {
        let mut holds = self.holds.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = holds.get_mut(&self.point.seq) {
            *n -= 1;
            if *n == 0 {
                holds.remove(&self.point.seq);
            }
        }
    }
}

type CachedRecord = Arc<(RecordHeader, Vec<u8>)>;
type IndexedRecords = Vec<(Loc, RecordHeader)>;

/// The retention log (see the module documentation).
#[derive(Debug)]
pub struct RetentionLog {
    log: SegmentLog,
    volumes: Vec<Arc<dyn BlockIo>>,
    /// Per volume, its size in the base state.
    volume_lens: Vec<u64>,
    /// Per volume, the length of its base image file (reads past it see zeros: a grown
    /// volume's base grows lazily, when retention folds past the resize).
    base_file_lens: Vec<u64>,
    /// The resizes above the base, in sequence order: (seq, volume, old size, new size).
    resizes: Vec<(Seq, VolumeId, u64, u64)>,
    index: BlockIndex,
    /// Offered points above the base (barriers, bookmarks and resync ends outside resync
    /// spans), in sequence order.
    points: Vec<PointInfo>,
    /// Resync spans above the base.
    windows: Windows,
    space_held_by_resync: bool,
    base: PointInfo,
    last_time: Nanos,
    bs: u64,
    policy: RetentionPolicy,
    segment_bytes: u64,
    clock: Arc<dyn Clock>,
    thinned_for_space: bool,
    space_note: Option<String>,
    segment_count: usize,
    cache: Arc<RecordCache>,
    holds: HoldSet,
    /// Damaged stretches of live segments above the base, and their repairs (see
    /// [`JournalDamage`]).
    damage: Vec<JournalDamage>,
    /// Records a read found damaged (an encrypted payload whose tag fails while its
    /// checksum holds, bit rot since open), for [`RetentionLog::scrub`] to register.
    read_damage: Arc<Mutex<Vec<Loc>>>,
}

fn block_entries(h: &RecordHeader, loc: Loc, bs: u64, mut f: impl FnMut(Entry)) {
    let start = h.offset;
    let end = h.offset + u64::from(h.length);
    let mut b = start / bs;
    while b * bs < end {
        let full = start <= b * bs && end >= (b + 1) * bs;
        f(Entry::new(BlockKey::new(h.volume, b), h.seq, loc, full));
        b += 1;
    }
}

impl RetentionLog {
    /// Opens or creates the retention log in `dir` over the base images `volumes` (one per
    /// volume of the group, index = [`VolumeId`]).
    pub fn open(
        dir: Arc<dyn Dir>,
        volumes: Vec<Arc<dyn BlockIo>>,
        cfg: RetentionConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<(Self, OpenReport)> {
        cfg.policy.validate(cfg.segment_bytes)?;
        if volumes.is_empty() || volumes.len() > usize::from(u16::MAX) {
            return Err(JournalError::Config(format!(
                "{} volumes; a group has 1 to 65535",
                volumes.len()
            )));
        }
        let mut volume_lens = Vec::new();
        for v in &volumes {
            volume_lens.push(v.len().map_err(|e| JournalError::io("stat", v.name(), e))?);
        }
        let opts = LogOptions {
            role: Role::Retention,
            segment_bytes: cfg.segment_bytes,
            key: cfg.key.clone(),
            block_size: cfg.block_size,
            create: true,
        };
        let mut idx = Vec::new();
        let mut points = Vec::new();
        let mut windows = Windows::default();
        let mut resync_defects: Vec<(Loc, RecordHeader, String)> = Vec::new();
        let mut last_time = Nanos(0);
        let mut mismatch: Option<JournalError> = None;
        let base_file_lens = volume_lens.clone();
        // Sizes as the scan goes: a write is checked against the size when it was taken.
        let mut running = volume_lens.clone();
        let mut resizes: Vec<(Seq, VolumeId, u64, u64)> = Vec::new();
        let (log, report) = SegmentLog::open(dir, opts, clock.clone(), &mut |v| {
            last_time = last_time.max(v.header.time);
            if v.header.seq <= v.base_seq {
                return;
            }
            if v.header.kind.is_data() {
                // Records must fit the volumes supplied: a journal opened over the wrong
                // (or shrunken) devices is refused, not indexed.
                let (vol, off, len) =
                    (v.header.volume, v.header.offset, u64::from(v.header.length));
                let bad = match running.get(usize::from(vol.0)) {
                    None => Some(JournalError::Config(format!(
                        "the journal holds writes for volume {vol} (seq {}) but {} volumes were supplied",
                        v.header.seq,
                        running.len()
                    ))),
                    Some(&vlen) if off + len > vlen => Some(JournalError::OutOfRange {
                        volume: vol.0,
                        offset: off,
                        len,
                        volume_len: vlen,
                    }),
                    Some(_) => None,
                };
                if bad.is_some() {
                    if mismatch.is_none() {
                        mismatch = bad;
                    }
                    return;
                }
            }
            if let (RecordKind::Resize, Some((old, new))) = (v.header.kind, v.resize) {
                let vol = v.header.volume;
                match running.get_mut(usize::from(vol.0)) {
                    Some(len) => {
                        *len = (*len).max(new);
                        resizes.push((v.header.seq, vol, old, new));
                    }
                    None if mismatch.is_none() => {
                        mismatch = Some(JournalError::Config(format!(
                            "the journal resizes volume {vol} (seq {}) but {} volumes were supplied",
                            v.header.seq,
                            running.len()
                        )))
                    }
                    None => {}
                }
                return;
            }
            let (seq, time) = (v.header.seq, v.header.time);
            let event = match (v.header.kind, v.bookmark, v.resync_id) {
                (k, _, _) if k.is_data() => {
                    block_entries(v.header, v.loc, u64::from(v.block_size), |e| idx.push(e));
                    return;
                }
                (RecordKind::Barrier, _, _) => Event::Barrier,
                (RecordKind::Bookmark, Some(b), _) => Event::Bookmark(b),
                (RecordKind::ResyncBegin, _, Some(id)) => Event::ResyncBegin { id },
                (RecordKind::ResyncEnd, _, Some(id)) => Event::ResyncEnd { id },
                _ => return,
            };
            let header = *v.header;
            if let Err(e) = windows.check(seq, &event) {
                // Only damage (a lost begin record) can produce this: report it, skip it.
                resync_defects.push((v.loc, header, e.to_string()));
                return;
            }
            if let Some(kind) = windows.apply(seq, time, &event) {
                points.push(PointInfo { seq, time, kind });
            }
        })?;
        let mut report = report;
        for (loc, header, reason) in resync_defects {
            let segment = log.segment_name(loc.slot);
            tracing::error!(%segment, offset = loc.offset, "resync record skipped: {reason}");
            report.defects.push((
                segment,
                format::Defect {
                    offset: u64::from(loc.offset),
                    len: header.total_len(),
                    reason,
                    header: Some(header),
                    min_seq: header.seq,
                    prev_kind: None,
                },
            ));
        }
        if let Some(e) = mismatch {
            return Err(e);
        }
        let m = log.manifest().clone();
        let bs = u64::from(m.block_size);
        let base_seq = m.base_seq;
        points.retain(|p| p.seq > base_seq);
        resizes.retain(|r| r.0 > base_seq);
        // The size of the base state: what the first resize above it started from (the
        // image may already be longer, if a fold past that resize was interrupted).
        for (i, len) in volume_lens.iter_mut().enumerate() {
            if let Some(r) = resizes.iter().find(|r| usize::from(r.1.0) == i) {
                *len = r.2;
            }
        }
        let segment_count = log.segment_count();
        let mut this = Self {
            index: BlockIndex::from_entries(idx),
            base: PointInfo { seq: base_seq, time: m.base_time, kind: PointKind::Base },
            last_time: last_time.max(m.base_time),
            log,
            volumes,
            volume_lens,
            base_file_lens,
            resizes,
            points,
            windows,
            space_held_by_resync: false,
            bs,
            policy: cfg.policy,
            segment_bytes: cfg.segment_bytes,
            clock,
            thinned_for_space: false,
            space_note: None,
            segment_count,
            cache: Arc::default(),
            holds: HoldSet::default(),
            damage: Vec::new(),
            read_damage: Arc::default(),
        };
        this.damage_on_open(&report);
        if m.pending_base > base_seq {
            // A base advance was interrupted: finish it (redo is idempotent).
            let target = this.points.iter().find(|p| p.seq == m.pending_base).cloned().unwrap_or(
                PointInfo { seq: m.pending_base, time: this.last_time, kind: PointKind::Barrier },
            );
            tracing::warn!(seq = %target.seq, "finishing an interrupted base advance");
            // The pending seq is what the base was being written through (a bookmark's own
            // seq for a base that stops right before it, found again among the points).
            this.advance_base(target)?;
        }
        Ok((this, report))
    }

    /// Index granularity in bytes.
    pub fn block_size(&self) -> u64 {
        self.bs
    }

    /// Size of a volume in bytes now (after every resize received).
    pub fn volume_len(&self, volume: VolumeId) -> Result<u64> {
        self.volume_len_at(volume, Seq(u64::MAX))
    }

    /// Size of a volume in bytes in the state after `seq` (the base's size for a seq at or
    /// below the base): the new size of the last resize at or below `seq`.
    pub fn volume_len_at(&self, volume: VolumeId, seq: Seq) -> Result<u64> {
        let base =
            self.volume_lens.get(usize::from(volume.0)).copied().ok_or_else(|| {
                JournalError::Config(format!("volume {volume} is not in this group"))
            })?;
        Ok(self
            .resizes
            .iter()
            .rev()
            .find(|r| r.1 == volume && r.0 <= seq)
            .map_or(base, |r| r.3.max(r.2)))
    }

    /// The resizes retained above the base, oldest first: (seq, volume, old size, new size).
    pub fn resizes(&self) -> &[(Seq, VolumeId, u64, u64)] {
        &self.resizes
    }

    /// Reads the base image of `volume` at `offset`; bytes past the image's end (a volume
    /// grown since the base state) read as zeros.
    fn read_base(&self, volume: VolumeId, buf: &mut [u8], offset: u64) -> Result<()> {
        let i = usize::from(volume.0);
        let (base, flen) = (&self.volumes[i], self.base_file_lens[i]);
        let have = flen.saturating_sub(offset).min(buf.len() as u64) as usize;
        if have > 0 {
            base.read_at(&mut buf[..have], offset)
                .map_err(|e| JournalError::io("read", base.name(), e))?;
        }
        buf[have..].fill(0);
        Ok(())
    }

    fn check_range(&self, volume: VolumeId, offset: u64, len: u64) -> Result<()> {
        self.check_range_at(volume, Seq(u64::MAX), offset, len)
    }

    fn check_range_at(&self, volume: VolumeId, at: Seq, offset: u64, len: u64) -> Result<()> {
        let vlen = self.volume_len_at(volume, at)?;
        if offset.checked_add(len).is_none_or(|e| e > vlen) {
            return Err(JournalError::OutOfRange {
                volume: volume.0,
                offset,
                len,
                volume_len: vlen,
            });
        }
        Ok(())
    }

    /// Appends one event received from the source. Sequence numbers must grow; times that
    /// go back are clamped to the previous time so points stay ordered in time.
    ///
    /// Resync markers must pair up: a `ResyncBegin` with id 0 or with an id already open, and
    /// a `ResyncEnd` whose id is not open, are refused ([`JournalError::Resync`]) before
    /// anything is written.
    pub fn append(&mut self, seq: Seq, time: Nanos, event: &Event) -> Result<()> {
        if let Some((volume, offset, len)) = event.range() {
            self.check_range(volume, offset, len)?;
        }
        self.windows.check(seq, event)?;
        let time = time.max(self.last_time);
        // A resize is recorded with the size this log had before it (the writer's old size
        // is only what the source saw; a repeated resize is a no-op).
        let resized;
        let event = match event {
            Event::Resize { volume, new_size, .. } => {
                let size = self.volume_len(*volume)?;
                if *new_size < size {
                    return Err(JournalError::Shrink {
                        volume: volume.0,
                        size,
                        new_size: *new_size,
                    });
                }
                resized = Event::Resize { volume: *volume, old_size: size, new_size: *new_size };
                &resized
            }
            other => other,
        };
        let (kind, volume, offset, length, payload) = format::event_to_record(event);
        if payload.len() > MAX_PAYLOAD {
            return Err(JournalError::RecordTooLarge {
                len: payload.len() as u64,
                max: MAX_PAYLOAD as u64,
            });
        }
        let spec = RecordSpec { kind, volume, seq, time, offset, length };
        let loc = self.log.append(spec, &payload)?;
        self.last_time = time;
        match event {
            Event::Barrier
            | Event::Bookmark(_)
            | Event::ResyncBegin { .. }
            | Event::ResyncEnd { .. } => {
                if let Some(kind) = self.windows.apply(seq, time, event) {
                    if matches!(kind, PointKind::ResyncEnd { .. }) {
                        self.close_repairs(seq);
                    }
                    if self.hidden_by_damage(seq).is_none() {
                        self.points.push(PointInfo { seq, time, kind });
                    }
                }
            }
            Event::Resize { volume, old_size, new_size } => {
                self.resizes.push((seq, *volume, *old_size, *new_size));
            }
            Event::Write { .. } | Event::WriteZeroes { .. } | Event::Discard { .. } => {
                let h = RecordHeader {
                    kind,
                    encrypted: false,
                    volume,
                    seq,
                    time,
                    offset,
                    length,
                    payload_len: 0,
                    payload_crc: 0,
                };
                let index = &mut self.index;
                block_entries(&h, loc, self.bs, |e| index.insert(e));
            }
        }
        let n = self.log.segment_count();
        if n != self.segment_count {
            self.segment_count = n;
            if self.policy.max_bytes.is_some_and(|max| self.log.bytes() > max) {
                self.enforce()?;
            }
        }
        Ok(())
    }

    /// Group commit: makes everything appended durable and returns the highest durable
    /// sequence number (what the target acknowledges).
    pub fn sync(&mut self) -> Result<Seq> {
        self.log.sync()
    }

    /// The highest sequence number received.
    pub fn last_seq(&self) -> Seq {
        self.log.last_seq()
    }

    /// The highest durable sequence number.
    pub fn durable_seq(&self) -> Seq {
        self.log.durable_seq()
    }

    /// Every point offered, oldest first: the base, then barriers, bookmarks and resync
    /// ends. Points inside a resync window are never offered, and neither is the base while
    /// it is the blank replica of an initial sync.
    pub fn points(&self) -> Vec<PointInfo> {
        let mut out = Vec::with_capacity(self.points.len() + 1);
        if self.initial_sync().is_none() {
            out.push(self.base.clone());
        }
        out.extend(self.points.iter().cloned());
        out
    }

    /// The first resync span when it is an initial sync: the base is still the blank replica
    /// at seq 0 and no consistent point precedes the span.
    fn initial_sync(&self) -> Option<&ResyncSpan> {
        let first = self.windows.spans.first()?;
        (self.base.seq == Seq::ZERO && self.points.first().is_none_or(|p| p.seq > first.begin_seq))
            .then_some(first)
    }

    /// The newest consistent state: everything received, or, while a resync window is open,
    /// the state right before it.
    fn latest(&self) -> std::result::Result<PointInfo, String> {
        if let Some(d) = self.unrepaired_damage() {
            // Everything from the damaged stretch on depends on what it lost: the newest
            // state before it (or before an open window further back).
            let mut before = Seq(d.lost_from.0 - 1);
            if let Some(open) = self.windows.open() {
                before = before.min(Seq(open.begin_seq.0.saturating_sub(1)));
            }
            return self.newest_state_at_or_below(before).ok_or_else(|| {
                format!(
                    "no consistent state precedes the journal damage at {} offset {} (seq {} on)",
                    d.segment, d.offset, d.lost_from
                )
            });
        }
        let Some(open) = self.windows.open() else {
            return Ok(PointInfo {
                seq: self.last_seq().max(self.base.seq),
                time: self.last_time,
                kind: PointKind::Latest,
            });
        };
        if self.initial_sync().is_some_and(|sp| sp.begin_seq == open.begin_seq) {
            return Err(format!(
                "the initial sync ({}) has not completed: the replica holds no consistent state yet",
                open.describe()
            ));
        }
        // The base never moves into a span, so the state before it is retained.
        let before = Seq(open.begin_seq.0 - 1);
        if before == self.base.seq {
            return Ok(self.base.clone());
        }
        if let Some(p) = self.points.iter().find(|p| p.seq == before) {
            return Ok(p.clone());
        }
        Ok(PointInfo { seq: before, time: self.time_of(before), kind: PointKind::Latest })
    }

    /// Resolves a recovery point to the sequence number whose state it names. Only
    /// consistent states resolve: a sequence number or bookmark inside a resync window is
    /// refused, and `Latest` is the state before an open window.
    pub fn resolve(&self, point: &RecoveryPoint) -> Result<PointInfo> {
        let unknown =
            |reason: String| JournalError::UnknownPoint { point: point.to_string(), reason };
        let last = self.last_seq();
        let initial = self.initial_sync();
        match point {
            RecoveryPoint::Latest => self.latest().map_err(unknown),
            RecoveryPoint::Seq(s) => {
                if *s < self.base.seq {
                    return Err(unknown(format!(
                        "older than the retention window, which starts at seq {}",
                        self.base.seq
                    )));
                }
                if let Some(sp) = initial.filter(|sp| *s < sp.begin_seq) {
                    return Err(unknown(format!(
                        "seq {s} precedes the initial sync ({}): the replica was blank, not a state of the source",
                        sp.describe()
                    )));
                }
                if *s == self.base.seq {
                    return Ok(self.base.clone());
                }
                if *s > last {
                    return Err(unknown(format!("not received yet (newest is seq {last})")));
                }
                if let Some(p) = self.points.iter().find(|p| p.seq == *s) {
                    return Ok(p.clone());
                }
                if let Some(sp) = self.windows.containing(*s) {
                    return Err(unknown(format!(
                        "seq {s} is inside {}: the replica was inconsistent",
                        sp.describe()
                    )));
                }
                if let Some(d) = self.hidden_by_damage(*s) {
                    return Err(unknown(format!("seq {s} depends on {}", d.describe())));
                }
                if *s <= self.log.manifest().thin_horizon {
                    return Err(unknown(format!(
                        "thinned by retention (history up to seq {} keeps only retained points; see `points`)",
                        self.log.manifest().thin_horizon
                    )));
                }
                Ok(PointInfo { seq: *s, time: self.time_of(*s), kind: PointKind::Latest })
            }
            RecoveryPoint::Time(t) => {
                if *t < self.base.time {
                    return Err(unknown(format!(
                        "before the retention window, which starts at time {}",
                        self.base.time.0
                    )));
                }
                let i = self.points.partition_point(|p| p.time <= *t);
                if i > 0 {
                    return Ok(self.points[i - 1].clone());
                }
                match initial {
                    Some(sp) => Err(unknown(format!(
                        "no consistent point at or before this time: the initial sync ({}) completed later or not at all",
                        sp.describe()
                    ))),
                    None => Ok(self.base.clone()),
                }
            }
            RecoveryPoint::Bookmark(name) => {
                let offered = self
                    .points
                    .iter()
                    .rev()
                    .find(|p| matches!(&p.kind, PointKind::Bookmark(b) if &b.name == name))
                    .cloned()
                    .or_else(|| {
                        matches!(&self.base.kind, PointKind::Bookmark(b) if &b.name == name)
                            .then(|| self.base.clone())
                    });
                let hidden = self.windows.spans.iter().rev().find_map(|sp| {
                    sp.bookmarks.iter().rev().find(|(_, n)| n == name).map(|(s, _)| (*s, sp))
                });
                match (offered, hidden) {
                    (Some(p), h) if h.is_none_or(|(s, _)| s < p.seq) => Ok(p),
                    (_, Some((s, sp))) => Err(unknown(format!(
                        "bookmark {name:?} (seq {s}) was taken during a resync, inside {}: the replica was inconsistent",
                        sp.describe()
                    ))),
                    _ => Err(unknown("no retained bookmark has this name".to_owned())),
                }
            }
        }
    }

    /// Holds `point` (a point [`RetentionLog::resolve`] returned) so that it stays readable
    /// byte for byte through every retention pass until the returned hold is dropped.
    /// Refused when the point is no longer retained (below the base, or not received).
    pub fn hold(&self, point: &PointInfo) -> Result<PointHold> {
        if point.seq < self.base.seq || point.seq > self.last_seq().max(self.base.seq) {
            return Err(JournalError::UnknownPoint {
                point: format!("seq {}", point.seq),
                reason: format!(
                    "cannot hold it: the retained history runs from seq {} to seq {}",
                    self.base.seq,
                    self.last_seq().max(self.base.seq)
                ),
            });
        }
        *self.lock_holds().entry(point.seq).or_insert(0) += 1;
        Ok(PointHold { holds: self.holds.clone(), point: point.clone() })
    }

    /// The sequence numbers held now, oldest first.
    pub fn held(&self) -> Vec<Seq> {
        self.lock_holds().keys().copied().collect()
    }

    fn lock_holds(&self) -> std::sync::MutexGuard<'_, BTreeMap<Seq, usize>> {
        self.holds.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn time_of(&self, s: Seq) -> Nanos {
        let i = self.points.partition_point(|p| p.seq <= s);
        if i == 0 { self.base.time } else { self.points[i - 1].time }
    }

    fn record(&self, loc: Loc) -> Result<CachedRecord> {
        if let Some(r) = self.cache.get(loc) {
            return Ok(r);
        }
        let r = match self.log.read(loc) {
            Ok(r) => Arc::new(r),
            Err(e @ JournalError::CorruptRecord { .. }) => {
                // The read fails (no wrong bytes); the next scrub registers the damage.
                let mut found = self.read_damage.lock().unwrap_or_else(|e| e.into_inner());
                if !found.contains(&loc) {
                    found.push(loc);
                }
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        self.cache.put(loc, r.clone());
        Ok(r)
    }

    /// A block's length at the volume's largest (current) size; for a state of a smaller
    /// size, the bytes past its end read as zeros and are never returned.
    fn block_len(&self, key: BlockKey) -> usize {
        let vlen = self.volume_len(key.volume()).unwrap_or(0);
        vlen.saturating_sub(key.block() * self.bs).min(self.bs) as usize
    }

    /// Sets `stack` to the index entries that make block `key` as of `at`: the newest at or
    /// below it first, down to the newest one that covers the whole block (else to the
    /// oldest, over the base).
    fn layers(&self, key: BlockKey, at: Seq, stack: &mut Vec<Entry>) {
        stack.clear();
        let mut s = at;
        while let Some(e) = self.index.lookup_le(key, s) {
            stack.push(e);
            if e.full() || e.seq.0 == 0 {
                break;
            }
            s = Seq(e.seq.0 - 1);
        }
    }

    /// The content of one block as of `at` (the newest version at or below it).
    fn block_view(&self, key: BlockKey, at: Seq, out: &mut [u8]) -> Result<bool> {
        self.block_over(key, at, out, false)
    }

    /// Like [`Self::block_view`]; with `base_loaded`, `out` already holds the block's base
    /// content, so the base is not read again.
    fn block_over(
        &self,
        key: BlockKey,
        at: Seq,
        out: &mut [u8],
        base_loaded: bool,
    ) -> Result<bool> {
        let mut stack: Vec<Entry> = Vec::new();
        self.layers(key, at, &mut stack);
        let from_base = !base_loaded && stack.last().is_none_or(|e| !e.full());
        if from_base {
            self.read_base(key.volume(), out, key.block() * self.bs)?;
        }
        let bstart = key.block() * self.bs;
        let bend = bstart + out.len() as u64;
        for e in stack.iter().rev() {
            let rec = self.record(e.loc())?;
            overlay(&rec.0, &rec.1, bstart, bend, out);
        }
        Ok(!stack.is_empty())
    }

    /// Reads `buf.len()` bytes at `offset` of `volume` as of the resolved point `at`,
    /// without materializing anything.
    pub fn read_at(
        &self,
        at: &PointInfo,
        volume: VolumeId,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        // A point resolved (or held) before damage was found under it reads no wrong bytes.
        if let Some(d) = self.damage_under(at.seq, volume, offset, buf.len() as u64) {
            return Err(JournalError::UnknownPoint {
                point: format!("seq {}", at.seq),
                reason: format!("the range depends on {}", d.describe()),
            });
        }
        self.read_range(at.seq, volume, offset, buf)
    }

    /// Reads `buf.len()` bytes at `offset` of `volume` as the replica holds them now: every
    /// event received applied, consistent or not (inside a resync window this is a state
    /// the source never had; it is what a resync compares against the source). Costs one
    /// read of the base for the whole range plus one per block the journal changed in it.
    pub fn read_current(&self, volume: VolumeId, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_range(self.last_seq().max(self.base.seq), volume, offset, buf)
    }

    /// Hints that [`RetentionLog::read_current`] will soon read `len` bytes at `offset` of
    /// `volume`: the base image starts reading them in the background. Cheap, and safe to
    /// call under a lock that readers share.
    pub fn will_need_current(&self, volume: VolumeId, offset: u64, len: u64) {
        if let Some(base) = self.volumes.get(usize::from(volume.0)) {
            let _ = base.will_need(offset, len);
        }
    }

    /// Reads `buf.len()` bytes at `offset` of `volume` as they were right after event `seq`
    /// was applied, whether or not that is a recovery point (inside a resync window it is a
    /// state the source never had). For reading back the data of a retained write (the
    /// target's dedupe references), not for recovery: use [`RetentionLog::resolve`] and
    /// [`RetentionLog::read_at`] for that. `seq` must be retained: at or above the base and
    /// at or below the newest event received.
    pub fn read_as_of(
        &self,
        seq: Seq,
        volume: VolumeId,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let unknown = |reason: String| JournalError::UnknownPoint {
            point: format!("the state after seq {seq}"),
            reason,
        };
        if seq < self.base.seq {
            return Err(unknown(format!(
                "older than the retention window, which starts at seq {}",
                self.base.seq
            )));
        }
        if seq > self.last_seq() {
            return Err(unknown(format!("not received yet (newest is seq {})", self.last_seq())));
        }
        if let Some(d) = self.damage_under(seq, volume, offset, buf.len() as u64) {
            return Err(unknown(format!("the range depends on {}", d.describe())));
        }
        self.read_range(seq, volume, offset, buf)
    }

    /// The state at `at` of a byte range: one base read for the whole range, then the blocks
    /// the journal changed at or below `at` laid over it.
    fn read_range(&self, at: Seq, volume: VolumeId, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.plan_range(at, volume, offset, buf.len() as u64)?.read(buf)
    }

    /// Plans a read of `len` bytes at `offset` of `volume` as of the held point `hold`, to be
    /// carried out with [`ReadPlan::read`] once the caller has let go of the log (its lock):
    /// the index lookups are done here, the disk reads (the base range and the journal
    /// records) there, so that readers do not wait for each other's disk reads and appends
    /// go on meanwhile. Exact whatever the log does in between, because the point is held
    /// (see [`ReadPlan`]). `hold` must be one of this log's holds.
    pub fn plan_read(
        &self,
        hold: &PointHold,
        volume: VolumeId,
        offset: u64,
        len: u64,
    ) -> Result<ReadPlan> {
        if !Arc::ptr_eq(&hold.holds, &self.holds) {
            return Err(JournalError::Config(format!(
                "the hold of seq {} belongs to another retention log",
                hold.point.seq
            )));
        }
        if let Some(d) = self.damage_under(hold.point.seq, volume, offset, len) {
            return Err(JournalError::UnknownPoint {
                point: format!("seq {}", hold.point.seq),
                reason: format!("the range depends on {}", d.describe()),
            });
        }
        self.plan_range(hold.point.seq, volume, offset, len)
    }

    fn plan_range(&self, at: Seq, volume: VolumeId, offset: u64, len: u64) -> Result<ReadPlan> {
        self.check_range_at(volume, at, offset, len)?;
        let mut plan = ReadPlan {
            base: self.volumes[usize::from(volume.0)].clone(),
            base_len: self.base_file_lens[usize::from(volume.0)],
            offset,
            len: len as usize,
            blocks: Vec::new(),
            layers: Vec::new(),
            records: Vec::new(),
            cache: self.cache.clone(),
            read_damage: self.read_damage.clone(),
        };
        if len == 0 {
            return Ok(plan);
        }
        let end = offset + len;
        let keys = self.index.keys_in_range(
            BlockKey::new(volume, offset / self.bs),
            BlockKey::new(volume, (end - 1) / self.bs),
            at,
        );
        let mut numbers: HashMap<Loc, u32> = HashMap::new();
        let mut stack: Vec<Entry> = Vec::new();
        for k in keys {
            self.layers(k, at, &mut stack);
            if stack.is_empty() {
                continue;
            }
            let first = plan.layers.len();
            for e in stack.iter().rev() {
                let n = match numbers.get(&e.loc()) {
                    Some(&n) => n,
                    None => {
                        let n = plan.records.len() as u32;
                        plan.records.push((e.loc(), self.log.record_source(e.loc())?));
                        numbers.insert(e.loc(), n);
                        n
                    }
                };
                plan.layers.push(n);
            }
            plan.blocks.push(PlannedBlock {
                start: k.block() * self.bs,
                len: self.block_len(k),
                needs_base: stack.last().is_some_and(|e| !e.full()),
                layers: first..plan.layers.len(),
            });
        }
        Ok(plan)
    }

    /// Writes the whole of `volume` as of `at` to `out` (a file is sized to fit), syncs it,
    /// and returns what was written with its BLAKE3 hash. `progress` sees (done, total) bytes.
    pub fn materialize(
        &self,
        at: &PointInfo,
        volume: VolumeId,
        out: &dyn BlockIo,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<MaterializeReport> {
        self.materialize_with(at, volume, out, CopyMode::Auto, progress)
    }

    /// [`RetentionLog::materialize`] with the way the bytes move chosen.
    pub fn materialize_with(
        &self,
        at: &PointInfo,
        volume: VolumeId,
        out: &dyn BlockIo,
        mode: CopyMode,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<MaterializeReport> {
        let vlen = self.volume_len_at(volume, at.seq)?;
        if let Some(d) = self.damage_under(at.seq, volume, 0, vlen) {
            return Err(JournalError::UnknownPoint {
                point: format!("seq {}", at.seq),
                reason: format!("it depends on {}", d.describe()),
            });
        }
        let olen = out.len().map_err(|e| JournalError::io("stat", out.name(), e))?;
        if olen != vlen {
            out.set_len(vlen).map_err(|e| JournalError::io("resize", out.name(), e))?;
        }
        let keys: Vec<BlockKey> = self
            .index
            .keys_between(self.base.seq, at.seq)
            .into_iter()
            .filter(|k| k.volume() == volume)
            .collect();
        if mode == CopyMode::Auto {
            if let Some(r) = self.materialize_direct(at, volume, out, &keys, vlen, progress)? {
                return Ok(r);
            }
        }
        let base = &self.volumes[usize::from(volume.0)];
        // Where direct I/O cannot be had, the copy goes chunk by chunk. In each, the ranges the
        // journal did not change at or below `at` are copied from the base inside the kernel
        // (`copy_range`, as `cp` does; through a buffer where the pair cannot), and each run
        // of changed blocks is built in memory (base where needed, then the journal's
        // records) and written. A second
        // thread computes the image's BLAKE3 a chunk or two behind, reading back what was
        // written (from the page cache), so the hash overlaps the copy.
        const CHUNK: u64 = 8 << 20;
        let (to_hash, hash_rx) = std::sync::mpsc::sync_channel::<(u64, u64)>(2);
        std::thread::scope(|scope| {
            let hasher = scope.spawn(move || -> Result<[u8; 32]> {
                let mut hasher = blake3::Hasher::new();
                let mut buf = vec![0u8; 1 << 20];
                for (pos, len) in hash_rx {
                    let mut p = pos;
                    while p < pos + len {
                        let n = (pos + len - p).min(buf.len() as u64) as usize;
                        out.read_at(&mut buf[..n], p)
                            .map_err(|e| JournalError::io("read back", out.name(), e))?;
                        hasher.update(&buf[..n]);
                        p += n as u64;
                    }
                }
                Ok(*hasher.finalize().as_bytes())
            });
            let copied = (|| -> Result<u64> {
                let mut ki = 0usize;
                let mut journal_blocks = 0u64;
                let mut pos = 0u64;
                let mut kernel_copy = true;
                let mut buf = Vec::new();
                let mut zeros: Vec<u8> = Vec::new();
                // Copies the base's [from, to) to the image; past the base file's end (a
                // volume that grew after the base was written) the image gets zeros.
                let base_len = self.base_file_lens[usize::from(volume.0)];
                let mut copy_base = |from: u64, to_wanted: u64| -> Result<()> {
                    let to = to_wanted.min(base_len.max(from));
                    let mut z = to;
                    while z < to_wanted {
                        let n = (to_wanted - z).min(CHUNK) as usize;
                        zeros.resize(n, 0);
                        out.write_at(&zeros[..n], z)
                            .map_err(|e| JournalError::io("write", out.name(), e))?;
                        z += n as u64;
                    }
                    let mut done = 0;
                    if kernel_copy {
                        done = crate::io::copy_range(base.as_ref(), from, out, from, to - from)
                            .map_err(|e| {
                                JournalError::io(
                                    "copy_file_range",
                                    format!("{} to {}", base.name(), out.name()),
                                    e,
                                )
                            })?;
                        kernel_copy = done == to - from;
                    }
                    let mut p = from + done;
                    while p < to {
                        let n = (to - p).min(CHUNK) as usize;
                        buf.resize(n, 0);
                        base.read_at(&mut buf, p)
                            .map_err(|e| JournalError::io("read", base.name(), e))?;
                        out.write_at(&buf, p)
                            .map_err(|e| JournalError::io("write", out.name(), e))?;
                        p += n as u64;
                    }
                    Ok(())
                };
                // Read-ahead: the chunk after the one being copied is hinted (its base range
                // and the journal records of its blocks), so a cold copy reads them in
                // parallel while this one is patched and written, instead of one synchronous
                // read at a time.
                let mut hinted_ki = 0usize;
                self.hint_chunk(Some(base), &keys, &mut hinted_ki, at.seq, 0, CHUNK.min(vlen))
                    .issue();
                let mut run = Vec::new();
                while pos < vlen {
                    let target = (pos + CHUNK).min(vlen);
                    if target < vlen {
                        self.hint_chunk(
                            Some(base),
                            &keys,
                            &mut hinted_ki,
                            at.seq,
                            target,
                            CHUNK.min(vlen - target),
                        )
                        .issue();
                    }
                    let mut cur = pos;
                    while ki < keys.len() && keys[ki].block() * self.bs < target {
                        // A run of consecutive changed blocks, keys[ki..kj].
                        let mut kj = ki + 1;
                        while kj < keys.len()
                            && keys[kj].block() == keys[kj - 1].block() + 1
                            && keys[kj].block() * self.bs < target
                        {
                            kj += 1;
                        }
                        let start = keys[ki].block() * self.bs;
                        let last = keys[kj - 1];
                        // Block lengths are at the volume's current size; a point before a
                        // growth ends at its own size (`target` is at most `vlen`).
                        let end =
                            (last.block() * self.bs + self.block_len(last) as u64).min(target);
                        if start > cur {
                            copy_base(cur, start)?;
                        }
                        run.clear();
                        run.resize((end - start) as usize, 0);
                        for &k in &keys[ki..kj] {
                            let s = (k.block() * self.bs - start) as usize;
                            let blen = self.block_len(k).min(run.len() - s);
                            if self.block_over(k, at.seq, &mut run[s..s + blen], false)? {
                                journal_blocks += 1;
                            }
                        }
                        out.write_at(&run, start)
                            .map_err(|e| JournalError::io("write", out.name(), e))?;
                        cur = end;
                        ki = kj;
                    }
                    if cur < target {
                        copy_base(cur, target)?;
                        cur = target;
                    }
                    // Let the disk work while the next chunk is read, instead of all of it in
                    // the final fdatasync.
                    out.start_writeback(pos, cur - pos)
                        .map_err(|e| JournalError::io("sync_file_range", out.name(), e))?;
                    if to_hash.send((pos, cur - pos)).is_err() {
                        // The hasher stopped on an error: its join reports it.
                        break;
                    }
                    pos = cur;
                    progress(pos, vlen);
                }
                drop(to_hash);
                out.sync().map_err(|e| JournalError::io("fdatasync", out.name(), e))?;
                Ok(journal_blocks)
            })();
            // On an error the sender is dropped with the closure, so the hasher ends too.
            let hash = hasher.join().expect("the hasher does not panic");
            let journal_blocks = copied?;
            Ok(MaterializeReport { bytes: vlen, journal_blocks, hash: hash?, direct_io: false })
        })
    }

    /// The read-ahead of [`Self::materialize`] over `[pos, pos + len)`: the base range (when
    /// `base` is given), and for the blocks `keys[*ki..]` inside it the newest record at or
    /// below `at` (consecutive blocks of one record hinted once, with its length estimated
    /// from the blocks it covers).
    fn hint_chunk(
        &self,
        base: Option<&Arc<dyn BlockIo>>,
        keys: &[BlockKey],
        ki: &mut usize,
        at: Seq,
        pos: u64,
        len: u64,
    ) -> ReadAhead {
        let mut ahead =
            ReadAhead { ranges: base.map(|b| (b.clone(), pos, len)).into_iter().collect() };
        let mut record = |l: Loc, blocks: u64| {
            if let Some(file) = self.log.segment_file(l.slot) {
                let len = format::RECORD_HEADER_LEN as u64 + (blocks + 1) * self.bs;
                ahead.ranges.push((file, u64::from(l.offset), len));
            }
        };
        let mut run: Option<(Loc, u64)> = None;
        while *ki < keys.len() && keys[*ki].block() * self.bs < pos + len {
            if let Some(e) = self.index.lookup_le(keys[*ki], at) {
                let loc = e.loc();
                match &mut run {
                    Some((l, blocks)) if *l == loc => *blocks += 1,
                    _ => {
                        if let Some((l, blocks)) = run.take() {
                            record(l, blocks);
                        }
                        run = Some((loc, 1));
                    }
                }
            }
            *ki += 1;
        }
        if let Some((l, blocks)) = run {
            record(l, blocks);
        }
        ahead
    }

    /// The window as it stands.
    pub fn status(&self) -> RetentionStatus {
        RetentionStatus {
            oldest: self.base.clone(),
            newest_seq: self.last_seq(),
            newest_time: self.last_time,
            window_available: self.last_time.saturating_sub(self.base.time),
            window_configured: self.policy.max_age,
            points: self.points.len() + usize::from(self.initial_sync().is_none()),
            bytes: self.log.bytes(),
            max_bytes: self.policy.max_bytes,
            thinned_for_space: self.thinned_for_space,
            space_note: self.space_note.clone(),
            inconsistent: self.windows.open().map(|sp| ResyncWindowInfo {
                id: sp.first_id,
                begin_seq: sp.begin_seq,
                begin_time: sp.begin_time,
                open_ids: sp.open_ids.iter().map(|(id, _)| *id).collect(),
                initial_sync: self
                    .initial_sync()
                    .is_some_and(|first| first.begin_seq == sp.begin_seq),
            }),
            last_consistent: self.latest().ok(),
            space_held_by_resync: self.space_held_by_resync,
            damage: self.damage.clone(),
        }
    }

    /// Changes the policy (takes effect at the next [`RetentionLog::enforce`]).
    pub fn set_policy(&mut self, policy: RetentionPolicy) -> Result<()> {
        policy.validate(self.segment_bytes)?;
        self.policy = policy;
        Ok(())
    }

    /// Which points the policy keeps now (the newest is always kept).
    fn plan_keep(&self, now: Nanos) -> Vec<bool> {
        let mut tiers = self.policy.tiers.clone();
        tiers.sort_by_key(|t| t.older_than);
        let n = self.points.len();
        let mut keep = vec![true; n];
        // Per tier with `Every`, the last point of each bucket.
        let mut bucket_last: std::collections::HashMap<(usize, u64), usize> = Default::default();
        let tier_of = |p: &PointInfo| -> Option<usize> {
            let age = now.saturating_sub(p.time);
            tiers.iter().rposition(|t| age >= t.older_than)
        };
        for (i, p) in self.points.iter().enumerate() {
            if let Some(ti) = tier_of(p) {
                if let Keep::Every { interval, .. } = &tiers[ti].keep {
                    let bucket = p.time.0 / (interval.as_nanos() as u64).max(1);
                    bucket_last.insert((ti, bucket), i);
                }
            }
        }
        for (i, p) in self.points.iter().enumerate() {
            let age = now.saturating_sub(p.time);
            if self.policy.max_age.is_some_and(|m| age > m) {
                keep[i] = false;
                continue;
            }
            let Some(ti) = tier_of(p) else { continue };
            keep[i] = match &tiers[ti].keep {
                Keep::All => true,
                Keep::Every { interval, bookmarks } => {
                    let bucket = p.time.0 / (interval.as_nanos() as u64).max(1);
                    bucket_last.get(&(ti, bucket)) == Some(&i)
                        || p.bookmark_kind().is_some_and(|k| bookmarks.contains(&k))
                        || p.is_group_bookmark()
                }
                Keep::Bookmarks(kinds) => {
                    p.bookmark_kind().is_some_and(|k| kinds.contains(&k)) || p.is_group_bookmark()
                }
            };
        }
        if let Some(last) = keep.last_mut() {
            *last = true;
        }
        keep
    }

    /// Applies the retention policy: drops the points it no longer keeps, moves the base
    /// forward past history that left the window, coalesces thinned intervals (rewriting
    /// their segments so space is reclaimed), and then enforces the space limit by dropping
    /// the oldest history.
    pub fn enforce(&mut self) -> Result<RetentionReport> {
        let now = self.clock.now();
        // Retention works on durable records only, so a crash during it never leaves the
        // base or the manifest ahead of what the log holds.
        self.log.sync()?;
        let mut report = RetentionReport { bytes_before: self.log.bytes(), ..Default::default() };
        let mut keep = self.plan_keep(now);
        let held = self.held();
        let floor = held.first().copied();
        report.kept_for_holds = self.keep_for_holds(&held, &mut keep);
        self.keep_for_damage(&mut keep);
        if let Some(first_kept) = keep.iter().position(|k| *k) {
            // Thin interior intervals before moving the base, so both see one index.
            let mut intervals = Vec::new();
            let mut prev = first_kept;
            for (i, kept) in keep.iter().enumerate().skip(first_kept + 1) {
                if *kept {
                    if i > prev + 1 {
                        intervals.push((self.points[prev].seq, self.points[i].seq));
                    }
                    prev = i;
                }
            }
            let dropped: HashSet<Seq> =
                self.points.iter().zip(&keep).filter(|(_, k)| !**k).map(|(p, _)| p.seq).collect();
            report.dropped_points = dropped.len();
            // The first kept point becomes the base when older points go, or when it is
            // itself past the maximum age (kept only because it is the newest).
            let too_old =
                |p: &PointInfo| self.policy.max_age.is_some_and(|m| now.saturating_sub(p.time) > m);
            // Never past the oldest held state (`keep_for_holds` kept the point at or below
            // it, so this only stops an advance to a too-old point above it).
            let new_base = (first_kept > 0 || too_old(&self.points[first_kept]))
                .then(|| self.points[first_kept].clone())
                .filter(|p| floor.is_none_or(|f| p.seq <= f));
            if !intervals.is_empty() {
                report.intervals_coalesced = intervals.len();
                self.coalesce(&intervals, &dropped)?;
            }
            if let Some(target) = new_base {
                report.base_advanced_to = self.advance_base(target)?;
            }
        }
        if let Some(max) = self.policy.max_bytes {
            if self.log.bytes() > max {
                self.enforce_space(max, &mut report)?;
            }
            if let Some(open) = self.windows.open().filter(|_| self.log.bytes() > max) {
                // Everything since the last consistent point before the open window must
                // stay until the window closes.
                tracing::warn!(
                    bytes = self.log.bytes(),
                    max_bytes = max,
                    "space limit not met: {} holds the history since the last consistent point before it",
                    open.describe()
                );
                report.space_held_by_resync = true;
            }
        }
        self.space_held_by_resync = report.space_held_by_resync;
        report.bytes_after = self.log.bytes();
        report.retained_points = self.points.len() + usize::from(self.initial_sync().is_none());
        Ok(report)
    }

    /// Marks kept, for each held sequence number `h`, the newest point at or below `h` and,
    /// unless that point is `h` itself, the oldest point above it: no interval between two
    /// kept points then strictly contains `h`, so no coalescing rewrites history `h` reads,
    /// and the first kept point is at or below the oldest hold whenever a point is. Returns
    /// how many points were kept for holds only.
    fn keep_for_holds(&self, held: &[Seq], keep: &mut [bool]) -> usize {
        let mut kept = 0;
        for h in held {
            let i = self.points.partition_point(|p| p.seq <= *h);
            let mut mark = |j: usize| {
                if let Some(k) = keep.get_mut(j).filter(|k| !**k) {
                    *k = true;
                    kept += 1;
                }
            };
            if i > 0 {
                mark(i - 1);
            }
            if i == 0 || self.points[i - 1].seq != *h {
                mark(i);
            }
        }
        kept
    }

    fn enforce_space(&mut self, max: u64, report: &mut RetentionReport) -> Result<()> {
        let floor = self.lock_holds().keys().next().copied();
        let segs = self.log.segments();
        // Bytes left if the base moves to point `p`: segments with anything above `p`.
        let left = |p: Seq| -> u64 {
            segs.iter()
                .filter(|s| s.active || s.last_seq.is_some_and(|l| l > p))
                .map(|s| s.len)
                .sum()
        };
        // A hold stops the base at the newest point at or below it.
        let allowed = |p: &&PointInfo| floor.is_none_or(|f| p.seq <= f);
        let Some(last) = self.points.iter().rev().find(allowed) else {
            if floor.is_some() && self.points.iter().any(|p| left(p.seq) <= max) {
                tracing::warn!(
                    bytes = self.log.bytes(),
                    max_bytes = max,
                    "space limit not met: a held point (a virtual snapshot) needs the whole window"
                );
                report.space_held_by_holds = true;
            }
            return Ok(());
        };
        let target =
            self.points.iter().filter(allowed).find(|p| left(p.seq) <= max).unwrap_or(last).clone();
        // Only when the hold made the difference: a point past it would have fitted.
        let blocked = floor.is_some_and(|f| {
            left(target.seq) > max && self.points.iter().any(|p| p.seq > f && left(p.seq) <= max)
        });
        if blocked {
            tracing::warn!(
                bytes = self.log.bytes(),
                max_bytes = max,
                held_from = %target.seq,
                "space limit not met: a held point (a virtual snapshot) needs the history after it"
            );
            report.space_held_by_holds = true;
        }
        let dropped = self.points.iter().filter(|p| p.seq < target.seq).count() + 1;
        let note = format!(
            "space limit of {max} bytes reached: dropped the {dropped} oldest points, window now starts at seq {} (time {})",
            target.seq, target.time.0
        );
        tracing::warn!("{note}");
        report.thinned_for_space = true;
        report.dropped_points += dropped;
        self.thinned_for_space = true;
        self.space_note = Some(note);
        report.base_advanced_to = self.advance_base(target)?.or(report.base_advanced_to);
        Ok(())
    }

    /// Moves the base image forward to `target`: the newest version of every block written
    /// up to it is applied, then the records at or below it are released. Returns where the
    /// base went, `None` when it did not move.
    ///
    /// A bookmark is not folded into the base: the base is recorded right before its record
    /// (before the first of bookmarks back to back), which is the same state (a bookmark
    /// changes no data), and the record stays, so the bookmark is still found by name (and
    /// a group's by its id) at the start of the window, across restarts, without the
    /// manifest naming it.
    fn advance_base(&mut self, target: PointInfo) -> Result<Option<Seq>> {
        // Written through `target`, recorded at `at`: the same unless `target` is a bookmark,
        // then the seq right before it (before the first of bookmarks back to back). A
        // bookmark changes no data, so both name the same state; but sparse retention may
        // have coalesced an interval ending at the bookmark into records carrying its seq,
        // which is why the blocks are written through `target` itself. Those records stay in
        // the log above the base (re-laying them over it gives the same bytes).
        let at = match target.kind {
            PointKind::Bookmark(_) => {
                let mut seq = target.seq;
                while let Ok(i) = self.points.binary_search_by_key(&seq, |p| p.seq) {
                    if !matches!(self.points[i].kind, PointKind::Bookmark(_)) {
                        break;
                    }
                    seq = Seq(seq.0.saturating_sub(1));
                }
                seq
            }
            _ => target.seq,
        };
        if at <= self.base.seq {
            return Ok(None);
        }
        debug_assert!(
            self.windows.containing(target.seq).is_none(),
            "the base never moves into a resync window"
        );
        self.log.update_manifest(|m| m.pending_base = target.seq)?;
        // A volume grown at or below the target: its base image grows to the size there
        // first (a device that is already large enough is left as it is).
        for i in 0..self.volumes.len() {
            let size = self.volume_len_at(VolumeId(i as u16), target.seq)?;
            if size > self.base_file_lens[i] {
                let v = &self.volumes[i];
                let flen = v.len().map_err(|e| JournalError::io("stat", v.name(), e))?;
                if flen < size {
                    v.set_len(size).map_err(|e| JournalError::io("grow", v.name(), e))?;
                }
                self.base_file_lens[i] = flen.max(size);
            }
        }
        let keys = self.index.keys_between(self.base.seq, target.seq);
        let mut buf = vec![0u8; self.bs as usize];
        for k in keys {
            let size = self.volume_len_at(k.volume(), target.seq)?;
            let blen = self.block_len(k).min(size.saturating_sub(k.block() * self.bs) as usize);
            self.block_view(k, target.seq, &mut buf[..blen])?;
            let v = &self.volumes[usize::from(k.volume().0)];
            v.write_at(&buf[..blen], k.block() * self.bs)
                .map_err(|e| JournalError::io("write", v.name(), e))?;
        }
        for v in &self.volumes {
            v.sync().map_err(|e| JournalError::io("fdatasync", v.name(), e))?;
        }
        let done: Vec<u32> = self
            .log
            .segments()
            .iter()
            .filter(|s| !s.active && s.last_seq.is_none_or(|l| l <= at))
            .filter(|s| !self.damage.iter().any(|d| d.slot == s.slot && d.repaired_at.is_none()))
            .map(|s| s.slot)
            .collect();
        let (seq, time) = (at, target.time);
        self.log.replace_segments(&done, &[], |m| {
            m.base_seq = seq;
            m.base_time = time;
            m.pending_base = Seq::ZERO;
            m.thin_horizon = m.thin_horizon.max(seq);
        })?;
        let gone: HashSet<u32> = done.into_iter().collect();
        self.index.retain(|e| e.seq > seq && !gone.contains(&e.loc().slot));
        self.points.retain(|p| p.seq > seq);
        for i in 0..self.volume_lens.len() {
            self.volume_lens[i] = self.volume_len_at(VolumeId(i as u16), seq)?;
        }
        self.resizes.retain(|r| r.0 > seq);
        self.windows.spans.retain(|sp| sp.end.is_none_or(|e| e > seq));
        self.damage.retain(|d| !gone.contains(&d.slot) && d.repaired_at.is_none_or(|e| e > seq));
        self.base = PointInfo { seq, time, kind: PointKind::Base };
        self.cache.clear();
        self.segment_count = self.log.segment_count();
        Ok(Some(seq))
    }

    /// Rewrites the segments holding records of the intervals `(a, b]` so that each keeps
    /// one version per block (the state at `b`) and no barrier of a dropped point.
    fn coalesce(&mut self, intervals: &[(Seq, Seq)], dropped: &HashSet<Seq>) -> Result<()> {
        let in_interval = |s: Seq| intervals.iter().position(|(a, b)| s > *a && s <= *b);
        let segs = self.log.segments();
        let affected: Vec<bool> = segs
            .iter()
            .map(|s| match (s.first_seq, s.last_seq) {
                (Some(f), Some(l)) => intervals.iter().any(|(a, b)| f <= *b && l > *a),
                // An empty sealed segment (left by a crash) would split a group; it goes
                // with the rewrite.
                _ => !s.active,
            })
            .collect();
        if segs.iter().zip(&affected).any(|(s, a)| *a && s.active) {
            self.log.seal_active()?;
        }
        // Maximal runs of adjacent affected segments.
        let mut groups: Vec<Vec<u32>> = Vec::new();
        let mut cur: Vec<u32> = Vec::new();
        for (s, a) in segs.iter().zip(&affected) {
            if *a {
                cur.push(s.slot);
            } else if !cur.is_empty() {
                groups.push(std::mem::take(&mut cur));
            }
        }
        if !cur.is_empty() {
            groups.push(cur);
        }
        let base_seq = self.base.seq;
        let max_b = intervals.iter().map(|(_, b)| *b).max().unwrap_or(Seq::ZERO);
        for group in groups {
            let mut out = Rewriter::new(self.segment_bytes);
            let mut touched: BTreeSet<BlockKey> = BTreeSet::new();
            for slot in &group {
                for (loc, h) in self.log.records(*slot)? {
                    if h.seq <= base_seq {
                        continue;
                    }
                    match in_interval(h.seq) {
                        Some(ii) => {
                            if h.kind.is_data() {
                                block_entries(&h, loc, self.bs, |e| {
                                    touched.insert(e.key);
                                });
                            } else if h.kind == RecordKind::Resize {
                                // A size change is history every later state needs: kept.
                                let (_, payload) = self.log.read(loc)?;
                                out.copy(&mut self.log, &h, &payload)?;
                            } else if h.seq == intervals[ii].1 {
                                // The retained point closing the interval: its coalesced
                                // state first, then the point itself.
                                let keys = std::mem::take(&mut touched);
                                self.emit_coalesced(&mut out, &keys, h.seq, h.time)?;
                                let (_, payload) = self.log.read(loc)?;
                                out.copy(&mut self.log, &h, &payload)?;
                            } else if h.kind.is_resync()
                                && self.windows.closes_at(h.seq) == Some(intervals[ii].1)
                            {
                                // The markers of a resync span whose closing point is
                                // retained stay, so the span is rebuilt on open.
                                let (_, payload) = self.log.read(loc)?;
                                out.copy(&mut self.log, &h, &payload)?;
                            } else {
                                // A dropped point, a point hidden inside a resync span, or a
                                // marker of a span whose closing point is dropped.
                                debug_assert!(
                                    dropped.contains(&h.seq)
                                        || self.windows.containing(h.seq).is_some()
                                        || self.windows.closes_at(h.seq).is_some()
                                        || self.hidden_by_damage(h.seq).is_some()
                                );
                            }
                        }
                        None => {
                            let (_, payload) = self.log.read(loc)?;
                            out.copy(&mut self.log, &h, &payload)?;
                        }
                    }
                }
            }
            debug_assert!(touched.is_empty(), "an interval's end lies outside its group");
            let (new_slots, new_entries) = out.finish(&mut self.log)?;
            self.log.replace_segments(&group, &new_slots, |m| {
                m.thin_horizon = m.thin_horizon.max(max_b);
            })?;
            let gone: HashSet<u32> = group.iter().copied().collect();
            self.index.retain(|e| !gone.contains(&e.loc().slot));
            for (loc, h) in new_entries {
                let index = &mut self.index;
                block_entries(&h, loc, self.bs, |e| index.insert(e));
            }
            self.cache.clear();
        }
        self.points.retain(|p| !dropped.contains(&p.seq));
        // Spans inside coalesced intervals: gone with their closing point, or kept without
        // the bookmarks hidden in them (their records were not copied).
        self.windows.spans.retain(|sp| sp.end.is_none_or(|e| !dropped.contains(&e)));
        for sp in &mut self.windows.spans {
            if in_interval(sp.begin_seq).is_some() {
                sp.bookmarks.clear();
            }
        }
        self.segment_count = self.log.segment_count();
        Ok(())
    }

    /// Writes the state at `at` of `keys` as full-block records, runs of adjacent blocks
    /// merged, all-zero runs as zero records.
    fn emit_coalesced(
        &self,
        out: &mut Rewriter,
        keys: &BTreeSet<BlockKey>,
        at: Seq,
        time: Nanos,
    ) -> Result<()> {
        let mut run: Option<(BlockKey, bool, Vec<u8>)> = None;
        let mut block = vec![0u8; self.bs as usize];
        for &k in keys {
            let size = self.volume_len_at(k.volume(), at)?;
            let blen = self.block_len(k).min(size.saturating_sub(k.block() * self.bs) as usize);
            let view = &mut block[..blen];
            self.block_view(k, at, view)?;
            let zero = view.iter().all(|&b| b == 0);
            let extends = run.as_ref().is_some_and(|(start, z, data)| {
                let len = data.len() as u64;
                start.volume() == k.volume()
                    && len % self.bs == 0
                    && start.block() + len / self.bs == k.block()
                    && *z == zero
                    && data.len() + blen <= 1 << 20
            });
            match run.as_mut() {
                Some(r) if extends => r.2.extend_from_slice(view),
                _ => {
                    if let Some((start, z, data)) = run.take() {
                        out.pending.push((start, z, data, at, time));
                    }
                    run = Some((k, zero, view.to_vec()));
                }
            }
        }
        if let Some((start, z, data)) = run {
            out.pending.push((start, z, data, at, time));
        }
        Ok(())
    }
}

/// Journal records read lately, shared by the log and its read plans (a few, so that the
/// blocks of one record, read one request after another, cost one record read).
/// Keyed by location: segment slots are never reused in a process, so an entry never
/// stands for another record.
#[derive(Debug, Default)]
struct RecordCache {
    entries: Mutex<Vec<(Loc, CachedRecord)>>,
}

impl RecordCache {
    const ENTRIES: usize = 8;

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Loc, CachedRecord)>> {
        // Every update is a whole push or remove: nothing half-done to see after a panic.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, loc: Loc) -> Option<CachedRecord> {
        self.lock().iter().rev().find(|(l, _)| *l == loc).map(|(_, r)| r.clone())
    }

    fn put(&self, loc: Loc, record: CachedRecord) {
        let mut entries = self.lock();
        if entries.iter().any(|(l, _)| *l == loc) {
            return;
        }
        if entries.len() >= Self::ENTRIES {
            entries.remove(0);
        }
        entries.push((loc, record));
    }

    fn clear(&self) {
        self.lock().clear();
    }
}

/// Ranges of files to read ahead (`POSIX_FADV_WILLNEED`), for [`RetentionLog::materialize`]:
/// a hint, issued without the log.
#[derive(Debug, Default)]
pub struct ReadAhead {
    ranges: Vec<(Arc<dyn BlockIo>, u64, u64)>,
}

impl ReadAhead {
    /// Asks the kernel to start reading the ranges; failures are ignored (a hint only).
    pub fn issue(&self) {
        for (file, offset, len) in &self.ranges {
            let _ = file.will_need(*offset, *len);
        }
    }
}

/// A point-in-time read of one byte range, planned under the log's lock
/// ([`RetentionLog::plan_read`]) and carried out after it is let go ([`ReadPlan::read`]).
///
/// The plan names the base image and, for each block the journal changed in the range, the
/// records to lay over it (oldest first, down to the newest whole-block one, else over the
/// base). Why it still reads the held point exactly when the log changes in between:
/// - records are never changed in place: a segment is append-only, a record still in the
///   write buffer was copied into the plan, and a segment rewritten or removed by a
///   retention pass stays readable through the handle the plan keeps;
/// - the base only moves to a point at or below the held one (the hold), by writing into it
///   the versions of blocks changed at or below that point. Such a block is in the plan
///   with every record of it up to the held point, and laying those over the base again
///   gives the same bytes whether the base was read before, during or after the move (each
///   byte is either covered by a record of the plan, whose newest is applied last, or was
///   not written by the move).
#[derive(Debug)]
pub struct ReadPlan {
    base: Arc<dyn BlockIo>,
    /// The base file's length: a volume that grew reads zeros past it.
    base_len: u64,
    offset: u64,
    len: usize,
    blocks: Vec<PlannedBlock>,
    /// Record numbers (into `records`) of each block, oldest first.
    layers: Vec<u32>,
    records: Vec<(Loc, RecordSource)>,
    cache: Arc<RecordCache>,
    /// Where a record found damaged is noted for [`RetentionLog::note_read_damage`].
    read_damage: Arc<Mutex<Vec<Loc>>>,
}

/// One block of a [`ReadPlan`] that the journal changed.
#[derive(Debug)]
struct PlannedBlock {
    start: u64,
    len: usize,
    /// The oldest record does not cover the whole block: the rest is the base's.
    needs_base: bool,
    layers: std::ops::Range<usize>,
}

impl ReadPlan {
    /// Bytes the plan reads.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when it reads nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Blocks of the range the journal changed (each read from the journal).
    pub fn journal_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Reads the planned range into `buf` (which must be [`ReadPlan::len`] long).
    pub fn read(&self, buf: &mut [u8]) -> Result<()> {
        if buf.len() != self.len {
            return Err(JournalError::Config(format!(
                "a read plan of {} bytes at {} was given a buffer of {}",
                self.len,
                self.offset,
                buf.len()
            )));
        }
        if buf.is_empty() {
            return Ok(());
        }
        self.read_base(buf, self.offset)?;
        let end = self.offset + self.len as u64;
        let mut loaded: Vec<Option<CachedRecord>> = vec![None; self.records.len()];
        let mut block = Vec::new();
        for b in &self.blocks {
            let bend = b.start + b.len as u64;
            if b.start >= self.offset && bend <= end {
                // Whole block inside the buffer, which already holds its base content.
                let dst = &mut buf[(b.start - self.offset) as usize..(bend - self.offset) as usize];
                self.lay(b, dst, &mut loaded)?;
            } else {
                block.resize(b.len, 0);
                if b.needs_base {
                    self.read_base(&mut block, b.start)?;
                }
                self.lay(b, &mut block, &mut loaded)?;
                let s = b.start.max(self.offset);
                let t = bend.min(end);
                buf[(s - self.offset) as usize..(t - self.offset) as usize]
                    .copy_from_slice(&block[(s - b.start) as usize..(t - b.start) as usize]);
            }
        }
        Ok(())
    }

    /// Reads the base at `offset` into `buf`, zeros past the base file's end.
    fn read_base(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let have = self.base_len.saturating_sub(offset).min(buf.len() as u64) as usize;
        if have > 0 {
            self.base
                .read_at(&mut buf[..have], offset)
                .map_err(|e| JournalError::io("read", self.base.name(), e))?;
        }
        buf[have..].fill(0);
        Ok(())
    }

    /// Lays the records of block `b` over `out` (the block's bytes), oldest first.
    fn lay(
        &self,
        b: &PlannedBlock,
        out: &mut [u8],
        loaded: &mut [Option<CachedRecord>],
    ) -> Result<()> {
        let bend = b.start + out.len() as u64;
        for &n in &self.layers[b.layers.clone()] {
            let n = n as usize;
            let rec = match &loaded[n] {
                Some(r) => r.clone(),
                None => {
                    let (loc, source) = &self.records[n];
                    let r = match self.cache.get(*loc) {
                        Some(r) => r,
                        None => {
                            let r = match source.read() {
                                Ok(r) => r,
                                Err(e @ JournalError::CorruptRecord { .. }) => {
                                    // No wrong bytes; the next scrub registers the damage.
                                    let mut found =
                                        self.read_damage.lock().unwrap_or_else(|e| e.into_inner());
                                    if !found.contains(loc) {
                                        found.push(*loc);
                                    }
                                    return Err(e);
                                }
                                Err(e) => return Err(e),
                            };
                            self.cache.put(*loc, r.clone());
                            r
                        }
                    };
                    loaded[n] = Some(r.clone());
                    r
                }
            };
            overlay(&rec.0, &rec.1, b.start, bend, out);
        }
        Ok(())
    }
}

/// Copies what record `h` (with `payload`) holds of `[bstart, bend)` into `out` (those
/// bytes): its data for a write, zeros for a discard or write-zeroes.
fn overlay(h: &RecordHeader, payload: &[u8], bstart: u64, bend: u64, out: &mut [u8]) {
    let rstart = h.offset;
    let rend = h.offset + u64::from(h.length);
    let s = rstart.max(bstart);
    let t = rend.min(bend);
    if s >= t {
        return;
    }
    let dst = &mut out[(s - bstart) as usize..(t - bstart) as usize];
    match h.kind {
        RecordKind::Write => {
            dst.copy_from_slice(&payload[(s - rstart) as usize..(t - rstart) as usize])
        }
        _ => dst.fill(0),
    }
}

/// Output side of a compaction: new segments, rolled at the segment size.
#[derive(Debug)]
struct Rewriter {
    segment_bytes: u64,
    slots: Vec<u32>,
    entries: Vec<(Loc, RecordHeader)>,
    /// Coalesced runs waiting to be written: (first block, all zero, data, seq, time).
    pending: Vec<(BlockKey, bool, Vec<u8>, Seq, Nanos)>,
}

impl Rewriter {
    fn new(segment_bytes: u64) -> Self {
        Self { segment_bytes, slots: Vec::new(), entries: Vec::new(), pending: Vec::new() }
    }

    fn target(&mut self, log: &mut SegmentLog, seq: Seq, len: u64) -> Result<u32> {
        if let Some(&s) = self.slots.last() {
            if log.segment_len(s) + len <= self.segment_bytes {
                return Ok(s);
            }
            log.finish_rewrite(s)?;
        }
        let s = log.begin_rewrite(seq)?;
        self.slots.push(s);
        Ok(s)
    }

    fn write(&mut self, log: &mut SegmentLog, spec: RecordSpec, payload: &[u8]) -> Result<()> {
        let slot = self.target(log, spec.seq, log.stored_len(payload.len()))?;
        let loc = log.append_rewrite(slot, spec, payload)?;
        if spec.kind.is_data() {
            let h = RecordHeader {
                kind: spec.kind,
                encrypted: false,
                volume: spec.volume,
                seq: spec.seq,
                time: spec.time,
                offset: spec.offset,
                length: spec.length,
                payload_len: 0,
                payload_crc: 0,
            };
            self.entries.push((loc, h));
        }
        Ok(())
    }

    fn drain_pending(&mut self, log: &mut SegmentLog, bs: u64) -> Result<()> {
        for (start, zero, data, seq, time) in std::mem::take(&mut self.pending) {
            let spec = RecordSpec {
                kind: if zero { RecordKind::WriteZeroes } else { RecordKind::Write },
                volume: start.volume(),
                seq,
                time,
                offset: start.block() * bs,
                length: data.len() as u32,
            };
            self.write(log, spec, if zero { &[] } else { &data })?;
        }
        Ok(())
    }

    fn copy(&mut self, log: &mut SegmentLog, h: &RecordHeader, payload: &[u8]) -> Result<()> {
        let bs = u64::from(log.block_size());
        self.drain_pending(log, bs)?;
        let spec = RecordSpec {
            kind: h.kind,
            volume: h.volume,
            seq: h.seq,
            time: h.time,
            offset: h.offset,
            length: h.length,
        };
        self.write(log, spec, payload)
    }

    fn finish(mut self, log: &mut SegmentLog) -> Result<(Vec<u32>, IndexedRecords)> {
        let bs = u64::from(log.block_size());
        self.drain_pending(log, bs)?;
        if let Some(&s) = self.slots.last() {
            log.finish_rewrite(s)?;
        }
        Ok((self.slots, self.entries))
    }
}
