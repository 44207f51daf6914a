//! Virtual snapshots ("vsnaps"): a recovery point of the target's retention log served as a
//! block device with no copy, for a restore, an inspection or a disaster-recovery drill
//! while replication goes on.
//!
//! A [`Vsnap`] is a [`BlockBackend`] (served by the FUSE + loop frontend,
//! `tidemark_tap::FuseLoopFrontend::start_backend`). A read is planned under the lock of a
//! shared handle to the log ([`LogAccess`]: the running [`Receiver`] or a log opened
//! offline) with [`RetentionLog::plan_read`] of its held point (index lookups only), and the
//! plan is carried out after the lock is let go ([`tidemark_journal::ReadPlan::read`]: one
//! base read per range plus one journal read per record the range needs). So concurrent
//! requests (the frontend's threads) read the disk in parallel, and appends and
//! acknowledgements go on while they do; the point still reads exactly (the plan's
//! documentation says why).
//!
//! - **Read-only**: every mutation is refused ([`TapError::ReadOnly`], `EROFS` at the
//!   frontend).
//! - **Read-write**: mutations go to an overlay at [`OVERLAY_BLOCK`] granularity (memory, or
//!   a sparse file); a partial block is first filled from the point. Reads take the overlay's
//!   blocks over the point's. The overlay is thrown away when the vsnap is dropped.
//!
//! Invariants:
//! - A vsnap never writes to the retention log, its base image (the replica) or the journal:
//!   its only access to the log is `plan_read` and `hold`.
//! - While a vsnap lives, its point reads back the same bytes whatever retention does: it
//!   holds the point ([`RetentionLog::hold`]), so no retention pass folds or thins history it
//!   needs; the hold is released when the vsnap is dropped.
//! - Lock order: the overlay's lock, then the log's. No path takes them the other way round.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tidemark_journal::{JournalError, PointHold, PointInfo, RecoveryPoint, RetentionLog, VolumeId};
use tidemark_tap::{BlockBackend, TapError};

use crate::apply::Receiver;

pub mod prefetch;
use prefetch::Prefetch;

/// Granularity of a read-write vsnap's overlay, in bytes.
pub const OVERLAY_BLOCK: u64 = 4096;

/// Shared access to a retention log: the running [`Receiver`]'s (under its lock, while
/// replication goes on) or a log opened offline behind a `Mutex`.
pub trait LogAccess: Send + Sync + fmt::Debug {
    /// Runs `f` on the log, holding whatever lock guards it for the call only.
    fn with_log_dyn(&self, f: &mut dyn FnMut(&mut RetentionLog));
}

impl LogAccess for Receiver {
    fn with_log_dyn(&self, f: &mut dyn FnMut(&mut RetentionLog)) {
        self.with_log(|log| f(log))
    }
}

impl LogAccess for Mutex<RetentionLog> {
    fn with_log_dyn(&self, f: &mut dyn FnMut(&mut RetentionLog)) {
        // A panic under the lock leaves no half-done update the reads here depend on: the
        // log refuses further writes itself after an I/O error.
        f(&mut self.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Runs `f` on the log behind `access` and returns its result.
pub fn with_log<R>(access: &dyn LogAccess, f: impl FnOnce(&mut RetentionLog) -> R) -> R {
    let mut f = Some(f);
    let mut out = None;
    access.with_log_dyn(&mut |log| {
        if let Some(f) = f.take() {
            out = Some(f(log));
        }
    });
    out.expect("LogAccess::with_log_dyn runs its closure exactly once")
}

/// Where a read-write vsnap keeps its writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OverlayStore {
    /// In memory (lost with the process; bounded by what the drill writes).
    Memory,
    /// A sparse file at this path, created (it must not exist) and removed with the vsnap.
    File(PathBuf),
}

/// How a vsnap is exposed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VsnapMode {
    /// Every mutation refused.
    ReadOnly,
    /// Mutations go to a throw-away overlay.
    ReadWrite(OverlayStore),
}

/// Why a vsnap could not be opened or served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VsnapError {
    /// The point did not resolve, could not be held or read.
    #[error("{what}")]
    Journal {
        /// What was being done (`resolve bookmark "x"`, `read 4096 bytes at 0 of seq 12`).
        what: String,
        /// The journal's error.
        #[source]
        source: JournalError,
    },
    /// An overlay file operation failed.
    #[error("{op} failed on overlay file {path}")]
    Overlay {
        /// The operation.
        op: &'static str,
        /// The overlay file.
        path: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// A block map of overlay contents.
#[derive(Debug)]
enum Store {
    Memory(HashMap<u64, Vec<u8>>),
    File { file: File, path: PathBuf, present: HashSet<u64> },
}

#[derive(Debug)]
struct Overlay {
    store: Store,
}

impl Overlay {
    fn create(kind: &OverlayStore) -> Result<Overlay, VsnapError> {
        let store = match kind {
            OverlayStore::Memory => Store::Memory(HashMap::new()),
            OverlayStore::File(path) => {
                let file =
                    OpenOptions::new().read(true).write(true).create_new(true).open(path).map_err(
                        |source| VsnapError::Overlay {
                            op: "create",
                            path: path.display().to_string(),
                            source,
                        },
                    )?;
                Store::File { file, path: path.clone(), present: HashSet::new() }
            }
        };
        Ok(Overlay { store })
    }

    fn contains(&self, block: u64) -> bool {
        match &self.store {
            Store::Memory(m) => m.contains_key(&block),
            Store::File { present, .. } => present.contains(&block),
        }
    }

    fn blocks(&self) -> u64 {
        match &self.store {
            Store::Memory(m) => m.len() as u64,
            Store::File { present, .. } => present.len() as u64,
        }
    }

    /// Copies the overlay's block `block` into `out` (its whole length).
    fn get(&self, block: u64, out: &mut [u8]) -> Result<(), VsnapError> {
        match &self.store {
            Store::Memory(m) => {
                out.copy_from_slice(&m[&block][..out.len()]);
                Ok(())
            }
            Store::File { file, path, .. } => {
                file.read_exact_at(out, block * OVERLAY_BLOCK).map_err(|source| {
                    VsnapError::Overlay { op: "read", path: path.display().to_string(), source }
                })
            }
        }
    }

    fn put(&mut self, block: u64, data: &[u8]) -> Result<(), VsnapError> {
        match &mut self.store {
            Store::Memory(m) => {
                m.insert(block, data.to_vec());
                Ok(())
            }
            Store::File { file, path, present } => {
                file.write_all_at(data, block * OVERLAY_BLOCK).map_err(|source| {
                    VsnapError::Overlay { op: "write", path: path.display().to_string(), source }
                })?;
                present.insert(block);
                Ok(())
            }
        }
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if let Store::File { path, .. } = &self.store {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(path = %path.display(), error = %e, "could not remove a vsnap overlay file");
            }
        }
    }
}

/// A virtual snapshot of one volume at one point (see the module documentation).
pub struct Vsnap {
    log: Arc<dyn LogAccess>,
    hold: PointHold,
    volume: VolumeId,
    len: u64,
    name: String,
    overlay: Option<Mutex<Overlay>>,
    reads: AtomicU64,
    writes: AtomicU64,
    /// Where the last read ended, to notice a sequential reader.
    read_end: AtomicU64,
    /// The point read ahead of a sequential reader by worker threads (`None` if none could
    /// be started: every read is then direct).
    prefetch: Option<Prefetch>,
}

/// How far ahead of a sequential reader its point is read into memory ([`prefetch`]):
/// without it a cold sequential read at queue depth 1 waits for the disk once per request
/// (and once more per journal record, a random read) instead of overlapping with the
/// copy-out.
pub const READ_AHEAD: u64 = prefetch::WINDOW;

impl fmt::Debug for Vsnap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vsnap")
            .field("name", &self.name)
            .field("point", self.hold.point())
            .field("volume", &self.volume)
            .field("len", &self.len)
            .field("read_write", &self.overlay.is_some())
            .finish_non_exhaustive()
    }
}

impl Vsnap {
    /// Resolves `point` in the log behind `log`, holds it and returns the vsnap of `volume`
    /// there. `name` names it in errors and logs.
    pub fn open(
        log: Arc<dyn LogAccess>,
        point: &RecoveryPoint,
        volume: VolumeId,
        mode: VsnapMode,
        name: impl Into<String>,
    ) -> Result<Vsnap, VsnapError> {
        let journal = |what: String| move |source| VsnapError::Journal { what, source };
        let (hold, len) = with_log(&*log, |l| -> Result<_, VsnapError> {
            let info = l.resolve(point).map_err(journal(format!("resolve {point}")))?;
            let len =
                l.volume_len_at(volume, info.seq).map_err(journal(format!("volume {volume}")))?;
            let hold = l.hold(&info).map_err(journal(format!("hold {point}")))?;
            Ok((hold, len))
        })?;
        let overlay = match &mode {
            VsnapMode::ReadOnly => None,
            VsnapMode::ReadWrite(store) => Some(Mutex::new(Overlay::create(store)?)),
        };
        let name = name.into();
        let prefetch = Prefetch::start(&name, prefetch::Shape::default());
        tracing::info!(
            vsnap = %name,
            seq = %hold.point().seq,
            read_write = overlay.is_some(),
            "virtual snapshot opened"
        );
        Ok(Vsnap {
            log,
            hold,
            volume,
            len,
            name,
            overlay,
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            read_end: AtomicU64::new(u64::MAX),
            prefetch,
        })
    }

    /// The point served.
    pub fn point(&self) -> &PointInfo {
        self.hold.point()
    }

    /// The volume served.
    pub fn volume(&self) -> VolumeId {
        self.volume
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Blocks of [`OVERLAY_BLOCK`] bytes written to the overlay so far (0 when read-only).
    pub fn overlay_blocks(&self) -> u64 {
        self.overlay.as_ref().map_or(0, |o| lock(o).blocks())
    }

    /// Read requests served from memory read ahead ([`READ_AHEAD`]) so far.
    pub fn read_ahead_served(&self) -> u64 {
        self.prefetch.as_ref().map_or(0, Prefetch::served)
    }

    /// The same vsnap with its read-ahead reshaped (smaller chunks, to test it on small
    /// volumes).
    #[cfg(test)]
    fn with_read_ahead(mut self, shape: prefetch::Shape) -> Vsnap {
        self.prefetch = Prefetch::start(&self.name, shape);
        self
    }

    /// Read and mutation requests served so far.
    pub fn requests(&self) -> (u64, u64) {
        (self.reads.load(Ordering::Relaxed), self.writes.load(Ordering::Relaxed))
    }

    fn read_point(&self, offset: u64, buf: &mut [u8]) -> Result<(), VsnapError> {
        let point = self.hold.point();
        let end = offset + buf.len() as u64;
        // A read that starts where the previous one ended, or inside the window read ahead,
        // continues a sequential run: keep the window ahead of it read.
        let previous = self.read_end.swap(end, Ordering::Relaxed);
        if let Some(ahead) = &self.prefetch {
            if previous == offset || ahead.holds(offset) {
                let wanted = ahead.wanted(offset, end, self.len);
                if !wanted.is_empty() {
                    // Index lookups only under the log's lock; the workers read.
                    let plans = with_log(&*self.log, |l| {
                        wanted
                            .iter()
                            .map(|&(c, at, len)| (c, l.plan_read(&self.hold, self.volume, at, len)))
                            .collect::<Vec<_>>()
                    });
                    for (c, plan) in plans {
                        match plan {
                            Ok(plan) => ahead.submit(c, plan),
                            Err(_) => ahead.fail(c),
                        }
                    }
                }
            }
            if ahead.serve(offset, buf) {
                return Ok(());
            }
        }
        // Only the index lookups run under the log's lock; the disk reads run after it is
        // let go, so concurrent requests and the receiver's appends do not wait for them.
        let plan = with_log(&*self.log, |l| {
            l.plan_read(&self.hold, self.volume, offset, buf.len() as u64)
        });
        plan.and_then(|plan| plan.read(buf)).map_err(|source| VsnapError::Journal {
            what: format!(
                "read {} bytes at {offset} of volume {} as of seq {}",
                buf.len(),
                self.volume,
                point.seq
            ),
            source,
        })
    }

    fn block_len(&self, block: u64) -> usize {
        (self.len - block * OVERLAY_BLOCK).min(OVERLAY_BLOCK) as usize
    }

    fn read_inner(&self, offset: u64, buf: &mut [u8]) -> Result<(), VsnapError> {
        let Some(overlay) = &self.overlay else { return self.read_point(offset, buf) };
        let overlay = lock(overlay);
        self.read_point(offset, buf)?;
        if buf.is_empty() || overlay.blocks() == 0 {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        let mut block = vec![0u8; OVERLAY_BLOCK as usize];
        for b in offset / OVERLAY_BLOCK..end.div_ceil(OVERLAY_BLOCK) {
            if !overlay.contains(b) {
                continue;
            }
            let blen = self.block_len(b);
            overlay.get(b, &mut block[..blen])?;
            let bstart = b * OVERLAY_BLOCK;
            let (s, t) = (bstart.max(offset), (bstart + blen as u64).min(end));
            buf[(s - offset) as usize..(t - offset) as usize]
                .copy_from_slice(&block[(s - bstart) as usize..(t - bstart) as usize]);
        }
        Ok(())
    }

    /// Writes `data` (or zeros, when `None`, over `len` bytes) at `offset` into the overlay.
    fn mutate(&self, offset: u64, len: u64, data: Option<&[u8]>) -> Result<(), TapError> {
        let Some(overlay) = &self.overlay else {
            let what = if data.is_some() { "write" } else { "zeroing" };
            return Err(TapError::ReadOnly {
                object: format!("read-only virtual snapshot {}", self.name),
                op: format!("{what} of {len} bytes at {offset}"),
            });
        };
        self.writes.fetch_add(1, Ordering::Relaxed);
        let mut overlay = lock(overlay);
        let end = offset + len;
        let mut block = vec![0u8; OVERLAY_BLOCK as usize];
        for b in offset / OVERLAY_BLOCK..end.div_ceil(OVERLAY_BLOCK) {
            let blen = self.block_len(b);
            let bstart = b * OVERLAY_BLOCK;
            let (s, t) = (bstart.max(offset), (bstart + blen as u64).min(end));
            let whole = s == bstart && t == bstart + blen as u64;
            let cur = &mut block[..blen];
            if !whole {
                if overlay.contains(b) {
                    overlay.get(b, cur)
                } else {
                    self.read_point(bstart, cur)
                }
                .map_err(|e| self.backend_err("write", e))?;
            }
            let dst = &mut cur[(s - bstart) as usize..(t - bstart) as usize];
            match data {
                Some(d) => dst.copy_from_slice(&d[(s - offset) as usize..(t - offset) as usize]),
                None => dst.fill(0),
            }
            overlay.put(b, cur).map_err(|e| self.backend_err("write", e))?;
        }
        Ok(())
    }

    fn backend_err(&self, op: &'static str, e: VsnapError) -> TapError {
        TapError::Backend {
            op,
            object: format!("virtual snapshot {}", self.name),
            source: Box::new(e),
        }
    }
}

impl Drop for Vsnap {
    fn drop(&mut self) {
        tracing::info!(
            vsnap = %self.name,
            seq = %self.hold.point().seq,
            overlay_blocks = self.overlay_blocks(),
            "virtual snapshot removed (overlay thrown away, point released)"
        );
    }
}

fn lock(m: &Mutex<Overlay>) -> MutexGuard<'_, Overlay> {
    // Every overlay update is complete (block written, then marked present) before a call
    // that can panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl BlockBackend for Vsnap {
    fn size(&self) -> u64 {
        self.len
    }

    fn read_only(&self) -> bool {
        self.overlay.is_none()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), TapError> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.read_inner(offset, buf).map_err(|e| self.backend_err("read", e))
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), TapError> {
        self.mutate(offset, data.len() as u64, Some(data))
    }

    fn flush(&self) -> Result<(), TapError> {
        // Nothing to make durable: the overlay is thrown away with the vsnap.
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), TapError> {
        self.mutate(offset, len, None)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), TapError> {
        self.mutate(offset, len, None)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tidemark_journal::{
        BlockIo, Bookmark, BookmarkKind, Clock, Event, ManualClock, MemDir, MemVolume, Nanos,
        RetentionConfig, RetentionPolicy, Seq,
    };

    use super::*;

    const VOL: u64 = 64 << 10;

    /// A read-ahead window of a few chunks of two blocks, so that the small test volumes
    /// go through it.
    const SMALL_AHEAD: prefetch::Shape = prefetch::Shape { chunk: 8192, window: 4 * 8192 };

    /// A log with three rounds of writes, a bookmark after the second; returns the log and
    /// the model state at the bookmark.
    fn log_with_bookmark() -> (Arc<Mutex<RetentionLog>>, Arc<ManualClock>, Vec<u8>) {
        let clock = Arc::new(ManualClock::new(Nanos(1_800_000_000 * Nanos::SECOND)));
        let cfg = RetentionConfig {
            segment_bytes: 64 << 10,
            policy: RetentionPolicy {
                max_age: Some(Duration::from_secs(60)),
                ..Default::default()
            },
            ..Default::default()
        };
        let (mut log, _) = RetentionLog::open(
            Arc::new(MemDir::new()),
            vec![Arc::new(MemVolume::new(VOL)) as Arc<dyn BlockIo>],
            cfg,
            clock.clone(),
        )
        .expect("open");
        let mut seq = 0;
        let mut model = vec![0u8; VOL as usize];
        let mut at_bookmark = Vec::new();
        for round in 0..3u8 {
            for b in 0..VOL / 4096 {
                seq += 1;
                clock.advance(Duration::from_millis(10));
                // Odd offsets and lengths: the journal's and the overlay's blocks both split.
                let (off, len) = (b * 4096 + 100, 3000usize);
                let data = vec![round.wrapping_mul(40).wrapping_add(b as u8); len];
                model[off as usize..off as usize + len].copy_from_slice(&data);
                let e = Event::Write { volume: VolumeId(0), offset: off, data: data.into() };
                log.append(Seq(seq), clock.now(), &e).expect("append");
            }
            seq += 1;
            let e = if round == 1 {
                at_bookmark = model.clone();
                Event::Bookmark(Bookmark::new("drill", BookmarkKind::User, 0).expect("name"))
            } else {
                Event::Barrier
            };
            log.append(Seq(seq), clock.now(), &e).expect("append");
        }
        log.sync().expect("sync");
        (Arc::new(Mutex::new(log)), clock, at_bookmark)
    }

    fn read_all(v: &Vsnap) -> Vec<u8> {
        let mut got = vec![0u8; VOL as usize];
        // In uneven pieces, as the loop driver would not, to cross block edges.
        let mut at = 0;
        while at < VOL {
            let n = (VOL - at).min(12345);
            v.read(at, &mut got[at as usize..(at + n) as usize]).expect("read");
            at += n;
        }
        got
    }

    #[test]
    fn read_only_vsnap_reads_the_point_as_materialize_writes_it_and_refuses_writes() {
        let (log, _, at_bookmark) = log_with_bookmark();
        let point = RecoveryPoint::Bookmark("drill".into());
        let v =
            Vsnap::open(log.clone(), &point, VolumeId(0), VsnapMode::ReadOnly, "t").expect("open");
        assert!(v.read_only());
        let got = read_all(&v);
        assert_eq!(got, at_bookmark);
        let out = MemVolume::new(0);
        let report = with_log(&*log, |l| {
            let p = l.resolve(&point).expect("resolve");
            l.materialize(&p, VolumeId(0), &out, &mut |_, _| {})
        })
        .expect("materialize");
        assert_eq!(report.hash, *blake3::hash(&got).as_bytes());
        let err = v.write(0, &[1; 512]).expect_err("a write to a read-only vsnap");
        assert!(matches!(err, TapError::ReadOnly { .. }), "{err}");
        assert!(v.write_zeroes(0, 4096).is_err());
        assert!(v.discard(0, 4096).is_err());
        assert_eq!(read_all(&v), at_bookmark, "a refused write changed the vsnap");
    }

    fn rw_overlay_keeps_writes_and_leaves_the_log_alone(store: OverlayStore) {
        let (log, _, at_bookmark) = log_with_bookmark();
        let current_before = {
            let mut b = vec![0u8; VOL as usize];
            with_log(&*log, |l| l.read_current(VolumeId(0), 0, &mut b)).expect("current");
            b
        };
        let mode = VsnapMode::ReadWrite(store.clone());
        let point = RecoveryPoint::Bookmark("drill".into());
        let v = Vsnap::open(log.clone(), &point, VolumeId(0), mode, "rw")
            .expect("open")
            .with_read_ahead(SMALL_AHEAD);
        assert!(!v.read_only());
        let mut model = at_bookmark.clone();
        // A partial block, a whole block, a span over three blocks, zeros, a discard.
        let writes: [(u64, usize, u8); 3] =
            [(10, 100, 0xaa), (8192, 4096, 0xbb), (5000, 9000, 0xcc)];
        for (off, len, fill) in writes {
            v.write(off, &vec![fill; len]).expect("write");
            model[off as usize..off as usize + len].fill(fill);
        }
        v.write_zeroes(20_000, 3000).expect("zeroes");
        model[20_000..23_000].fill(0);
        v.discard(VOL - 4096, 4096).expect("discard");
        model[(VOL - 4096) as usize..].fill(0);
        assert_eq!(read_all(&v), model);
        assert!(v.overlay_blocks() >= 6, "{}", v.overlay_blocks());
        v.flush().expect("flush");
        drop(v);
        if let OverlayStore::File(path) = &store {
            assert!(!path.exists(), "the overlay file outlived the vsnap");
        }
        // The log is untouched: the point and the replica read as before.
        let again = Vsnap::open(log.clone(), &point, VolumeId(0), VsnapMode::ReadOnly, "ro")
            .expect("reopen");
        assert_eq!(read_all(&again), at_bookmark);
        let mut now = vec![0u8; VOL as usize];
        with_log(&*log, |l| l.read_current(VolumeId(0), 0, &mut now)).expect("current");
        assert_eq!(now, current_before);
    }

    #[test]
    fn read_write_memory_overlay() {
        rw_overlay_keeps_writes_and_leaves_the_log_alone(OverlayStore::Memory);
    }

    #[test]
    fn read_write_file_overlay() {
        let dir = tempfile::tempdir().expect("tempdir");
        rw_overlay_keeps_writes_and_leaves_the_log_alone(OverlayStore::File(
            dir.path().join("overlay"),
        ));
    }

    #[test]
    fn a_vsnap_holds_its_point_through_retention_and_releases_it() {
        let (log, clock, at_bookmark) = log_with_bookmark();
        let point = RecoveryPoint::Bookmark("drill".into());
        let v = Vsnap::open(log.clone(), &point, VolumeId(0), VsnapMode::ReadOnly, "held")
            .expect("open");
        let held = v.point().seq;
        assert_eq!(with_log(&*log, |l| l.held()), vec![held]);
        // Past the maximum age: without the hold the bookmark would be folded away.
        clock.advance(Duration::from_secs(600));
        with_log(&*log, |l| l.append(l.last_seq().next(), clock.now(), &Event::Barrier))
            .expect("append");
        let report = with_log(&*log, |l| l.enforce()).expect("enforce");
        assert!(report.base_advanced_to.is_none_or(|b| b <= held), "{report:?}");
        assert!(report.dropped_points >= 1, "nothing was old enough to go: {report:?}");
        assert_eq!(read_all(&v), at_bookmark);
        drop(v);
        assert!(with_log(&*log, |l| l.held()).is_empty(), "the vsnap's hold outlived it");
    }

    #[test]
    fn concurrent_readers_read_the_point_while_appends_and_retention_go_on() {
        use std::sync::atomic::AtomicBool;
        let (log, clock, at_bookmark) = log_with_bookmark();
        let point = RecoveryPoint::Bookmark("drill".into());
        let v = Arc::new(
            Vsnap::open(log.clone(), &point, VolumeId(0), VsnapMode::ReadOnly, "conc")
                .expect("open")
                .with_read_ahead(SMALL_AHEAD),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let (appended, advanced) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        std::thread::scope(|scope| {
            // The receiver's side: every block overwritten again and again, and retention
            // passes that move the base up to the held point and delete segments.
            let writer = scope.spawn(|| {
                let mut round = 0u8;
                while !stop.load(Ordering::SeqCst) {
                    round = round.wrapping_add(1);
                    with_log(&*log, |l| {
                        for b in 0..VOL / 4096 {
                            clock.advance(Duration::from_secs(1));
                            let e = Event::Write {
                                volume: VolumeId(0),
                                offset: b * 4096 + 7,
                                data: vec![round; 4000].into(),
                            };
                            l.append(l.last_seq().next(), clock.now(), &e).expect("append");
                        }
                        l.append(l.last_seq().next(), clock.now(), &Event::Barrier)
                            .expect("barrier");
                        let r = l.enforce().expect("enforce");
                        if r.base_advanced_to.is_some() {
                            advanced.fetch_add(1, Ordering::SeqCst);
                        }
                    });
                    appended.fetch_add(1, Ordering::SeqCst);
                }
            });
            let readers: Vec<_> = (0..4)
                .map(|t| {
                    let (v, want) = (v.clone(), &at_bookmark);
                    let (appended, advanced) = (&appended, &advanced);
                    scope.spawn(move || {
                        let mut reads = 0;
                        // Until the writer has gone round a few times and the base moved.
                        while reads < 3
                            || appended.load(Ordering::SeqCst) < 20
                            || advanced.load(Ordering::SeqCst) == 0
                        {
                            let piece = 4096 * (t + 1) as u64 + 512 * t as u64;
                            let mut at = 0;
                            while at < VOL {
                                let n = (VOL - at).min(piece) as usize;
                                let mut got = vec![0u8; n];
                                v.read(at, &mut got).expect("read");
                                assert!(
                                    got[..] == want[at as usize..at as usize + n],
                                    "reader {t} read other bytes at {at}+{n} than the point holds"
                                );
                                at += n as u64;
                            }
                            reads += 1;
                        }
                    })
                })
                .collect();
            for r in readers {
                r.join().expect("reader");
            }
            stop.store(true, Ordering::SeqCst);
            writer.join().expect("writer");
        });
        assert!(advanced.load(Ordering::SeqCst) > 0, "the base never moved under the readers");
        assert_eq!(with_log(&*log, |l| l.held()), vec![v.point().seq]);
    }

    #[test]
    fn a_sequential_reader_is_served_from_the_read_ahead_which_follows_it_back() {
        let (log, _, at_bookmark) = log_with_bookmark();
        let point = RecoveryPoint::Bookmark("drill".into());
        let v = Vsnap::open(log.clone(), &point, VolumeId(0), VsnapMode::ReadOnly, "ahead")
            .expect("open")
            .with_read_ahead(SMALL_AHEAD);
        assert_eq!(read_all(&v), at_bookmark);
        let first = v.read_ahead_served();
        // 12345-byte pieces over 64 KiB: the first read (not yet sequential) and the one
        // after it are direct, and so is a read the window cannot cover to its end; most of
        // the others are not.
        assert!(first >= 2, "only {first} of the sequential reads came from the read-ahead");
        // Back to the start: the window left behind is let go of and forms again there.
        assert_eq!(read_all(&v), at_bookmark);
        assert!(v.read_ahead_served() >= 2 * first, "{} after {first}", v.read_ahead_served());
        // Backwards, block-sized: nothing sequential, every read direct and exact.
        for b in (0..VOL / 4096).rev() {
            let mut got = vec![0u8; 4096];
            v.read(b * 4096, &mut got).expect("read");
            assert!(got[..] == at_bookmark[(b * 4096) as usize..][..4096], "block {b}");
        }
        drop(v);
        assert!(with_log(&*log, |l| l.held()).is_empty(), "the read-ahead kept the point held");
    }

    #[test]
    fn unknown_points_are_refused_with_the_journal_reason() {
        let (log, _, _) = log_with_bookmark();
        let err = Vsnap::open(
            log,
            &RecoveryPoint::Bookmark("nope".into()),
            VolumeId(0),
            VsnapMode::ReadOnly,
            "x",
        )
        .expect_err("unknown bookmark");
        let chain = format!("{err}: {}", std::error::Error::source(&err).expect("source"));
        assert!(chain.contains("nope"), "{chain}");
    }
}
