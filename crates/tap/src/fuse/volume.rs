//! The FUSE filesystem of the frontend: a root directory holding one regular file, the
//! served [`BlockBackend`] (the protected volume through the [`Tap`], or a virtual
//! snapshot), whose requests become backend calls.
//!
//! | FUSE request on the volume file | backend call (the tap's) |
//! |---|---|
//! | `READ` | [`BlockBackend::read`] ([`Tap::read`], not captured) |
//! | `WRITE` | [`BlockBackend::write`] ([`Tap::write`]) |
//! | `FSYNC` (fsync and fdatasync), `FLUSH` (a close) | [`BlockBackend::flush`] ([`Tap::flush`]) |
//! | `FALLOCATE(PUNCH_HOLE \| KEEP_SIZE)` | [`BlockBackend::discard`] ([`Tap::discard`]) |
//! | `FALLOCATE(ZERO_RANGE [\| KEEP_SIZE])` | [`BlockBackend::write_zeroes`] ([`Tap::write_zeroes`]) |
//! | `FALLOCATE(0 or KEEP_SIZE)` inside the volume | nothing (the space exists) |
//!
//! A read-only backend's file has mode 0400; an open for writing, a `WRITE` and a mutating
//! `FALLOCATE` are refused with `EROFS` without calling it.
//!
//! The file is opened with `FOPEN_DIRECT_IO` and `FOPEN_PARALLEL_DIRECT_WRITES` (see the
//! parent module for why). A request is answered only after the backend call returned, so a
//! block request the loop driver completed is already in the tap's spool.
//!
//! Overlapping mutations never run concurrently ([`InFlight`]): the tap passes a write
//! through and then appends it under its lock, so two overlapping writes in flight at once
//! could reach the device in one order and the spool in the other, and the replica would
//! differ from the device. The block layer gives no order to such writes anyway; serialising
//! them makes the device's order and the spool's the same.

use std::cell::RefCell;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, WriteFlags,
};

use super::backend::BlockBackend;
#[cfg(doc)]
use crate::capture::Tap;
use crate::error::TapError;

/// Inode of the root directory.
pub(crate) const ROOT: INodeNo = INodeNo::ROOT;
/// Inode of the volume file.
pub(crate) const VOLUME: INodeNo = INodeNo(2);
/// Block size reported by `stat` and `statfs`; the loop driver takes `statfs`'s as its
/// discard granularity.
const BLOCK: u32 = 4096;
/// Attributes never change while mounted (the size is the device's), so the kernel may
/// keep them long.
const ATTR_TTL: Duration = Duration::from_secs(3600);

/// `fallocate` mode bits (`linux/falloc.h`).
pub(crate) mod falloc {
    pub(crate) const KEEP_SIZE: i32 = 0x01;
    pub(crate) const PUNCH_HOLE: i32 = 0x02;
    pub(crate) const ZERO_RANGE: i32 = 0x10;
}

/// What a `fallocate` on the volume file does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FallocAction {
    /// Discard this range (`PUNCH_HOLE`).
    Discard { offset: u64, len: u64 },
    /// Zero this range (`ZERO_RANGE`).
    Zero { offset: u64, len: u64 },
    /// Nothing to do: a preallocation inside the volume, or an empty range.
    Nothing,
}

impl FallocAction {
    /// Decides what `fallocate(mode, offset, len)` does on a volume of `size` bytes. The
    /// volume cannot grow: a range past its end is refused with `ENOSPC` unless
    /// `KEEP_SIZE` says the caller only wants the part inside; any other mode bit (collapse,
    /// insert, unshare) is `EOPNOTSUPP`.
    pub(crate) fn decide(mode: i32, offset: u64, len: u64, size: u64) -> Result<Self, Errno> {
        use falloc::{KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE};
        if mode & !(KEEP_SIZE | PUNCH_HOLE | ZERO_RANGE) != 0
            || (mode & PUNCH_HOLE != 0 && mode & ZERO_RANGE != 0)
        {
            return Err(Errno::EOPNOTSUPP);
        }
        // fallocate(2): PUNCH_HOLE must come with KEEP_SIZE.
        if mode & PUNCH_HOLE != 0 && mode & KEEP_SIZE == 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        let Some(end) = offset.checked_add(len) else { return Err(Errno::EFBIG) };
        if end > size && mode & KEEP_SIZE == 0 {
            return Err(Errno::ENOSPC);
        }
        let end = end.min(size);
        if end <= offset {
            return Ok(Self::Nothing);
        }
        let len = end - offset;
        Ok(if mode & PUNCH_HOLE != 0 {
            Self::Discard { offset, len }
        } else if mode & ZERO_RANGE != 0 {
            Self::Zero { offset, len }
        } else {
            Self::Nothing
        })
    }
}

/// Byte ranges of mutations in progress; a mutation overlapping one waits for it to end.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    ranges: Mutex<Vec<(u64, u64)>>,
    ended: Condvar,
}

/// A range held in [`InFlight`] until dropped.
#[derive(Debug)]
pub(crate) struct InFlightGuard<'a> {
    set: &'a InFlight,
    range: (u64, u64),
}

impl InFlight {
    /// Holds `[start, end)`, waiting while it overlaps a range already held.
    pub(crate) fn hold(&self, start: u64, end: u64) -> InFlightGuard<'_> {
        let mut ranges = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
        while ranges.iter().any(|&(s, e)| s < end && start < e) {
            ranges = self.ended.wait(ranges).unwrap_or_else(|e| e.into_inner());
        }
        ranges.push((start, end));
        InFlightGuard { set: self, range: (start, end) }
    }

    #[cfg(test)]
    fn held(&self) -> usize {
        self.ranges.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        let mut ranges = self.set.ranges.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = ranges.iter().position(|&r| r == self.range) {
            ranges.swap_remove(i);
        }
        drop(ranges);
        self.set.ended.notify_all();
    }
}

/// Requests served by a FUSE frontend, by kind (a snapshot of its live counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FuseCounters {
    /// `READ` requests on the volume file.
    pub reads: u64,
    /// Their bytes.
    pub read_bytes: u64,
    /// `WRITE` requests.
    pub writes: u64,
    /// Their bytes.
    pub write_bytes: u64,
    /// `FSYNC` requests (fsync and fdatasync of the file; the loop driver's flushes).
    pub fsyncs: u64,
    /// `FLUSH` requests (a close of the file), also made barriers.
    pub close_flushes: u64,
    /// `FALLOCATE(PUNCH_HOLE)` requests (the loop driver's discards).
    pub punch_holes: u64,
    /// Their bytes.
    pub punch_hole_bytes: u64,
    /// `FALLOCATE(ZERO_RANGE)` requests.
    pub zero_ranges: u64,
    /// Their bytes.
    pub zero_range_bytes: u64,
    /// `FALLOCATE` requests with another mode, answered without touching the volume.
    pub other_fallocates: u64,
    /// Requests answered with an error.
    pub errors: u64,
}

/// Live counters, shared between the serving threads and the frontend.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    reads: AtomicU64,
    read_bytes: AtomicU64,
    writes: AtomicU64,
    write_bytes: AtomicU64,
    fsyncs: AtomicU64,
    close_flushes: AtomicU64,
    punch_holes: AtomicU64,
    punch_hole_bytes: AtomicU64,
    zero_ranges: AtomicU64,
    zero_range_bytes: AtomicU64,
    other_fallocates: AtomicU64,
    errors: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn snapshot(&self) -> FuseCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FuseCounters {
            reads: get(&self.reads),
            read_bytes: get(&self.read_bytes),
            writes: get(&self.writes),
            write_bytes: get(&self.write_bytes),
            fsyncs: get(&self.fsyncs),
            close_flushes: get(&self.close_flushes),
            punch_holes: get(&self.punch_holes),
            punch_hole_bytes: get(&self.punch_hole_bytes),
            zero_ranges: get(&self.zero_ranges),
            zero_range_bytes: get(&self.zero_range_bytes),
            other_fallocates: get(&self.other_fallocates),
            errors: get(&self.errors),
        }
    }
}

/// Settings the filesystem hands the kernel at `INIT`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KernelSettings {
    pub(crate) max_write: u32,
    pub(crate) max_background: u16,
}

thread_local! {
    /// Each serving thread's read buffer, reused across requests.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The filesystem (see the module documentation).
#[derive(Debug)]
pub(crate) struct VolumeFs {
    backend: Arc<dyn BlockBackend>,
    read_only: bool,
    file_name: String,
    uid: u32,
    gid: u32,
    born: SystemTime,
    settings: KernelSettings,
    in_flight: InFlight,
    counters: Arc<Counters>,
}

impl VolumeFs {
    pub(crate) fn new(
        backend: Arc<dyn BlockBackend>,
        file_name: String,
        settings: KernelSettings,
        counters: Arc<Counters>,
    ) -> Self {
        let read_only = backend.read_only();
        Self {
            backend,
            read_only,
            file_name,
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            born: SystemTime::now(),
            settings,
            in_flight: InFlight::default(),
            counters,
        }
    }

    /// The volume's size now: the backend's, read per request, so a grown volume
    /// ([`crate::FuseLoopFrontend::refresh_size`]) is served at its new size.
    fn size(&self) -> u64 {
        self.backend.size()
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, nlink, size) = match ino {
            ROOT => (FileType::Directory, 0o700, 2, 0),
            VOLUME => {
                (FileType::RegularFile, if self.read_only { 0o400 } else { 0o600 }, 1, self.size())
            }
            _ => return None,
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.born,
            mtime: self.born,
            ctime: self.born,
            crtime: self.born,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLOCK,
            flags: 0,
        })
    }

    /// Logs a failed backend call (the kernel only sees `EIO`, or `EROFS` for a refused
    /// mutation) and counts it.
    fn failed(&self, op: &'static str, offset: u64, len: u64, err: &TapError) -> Errno {
        bump(&self.counters.errors, 1);
        if matches!(err, TapError::ReadOnly { .. }) {
            return Errno::EROFS;
        }
        let mut chain = err.to_string();
        let mut source = std::error::Error::source(err);
        while let Some(s) = source {
            chain.push_str(": ");
            chain.push_str(&s.to_string());
            source = s.source();
        }
        tracing::error!(op, offset, len, error = %chain, "FUSE frontend: backend call failed, answering EIO");
        Errno::EIO
    }

    fn refuse(&self, errno: Errno) -> Errno {
        bump(&self.counters.errors, 1);
        errno
    }

    fn barrier(&self) -> Result<(), Errno> {
        self.backend.flush().map_err(|e| self.failed("flush", 0, 0, &e))
    }
}

impl Filesystem for VolumeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(nearest) = config.set_max_write(self.settings.max_write) {
            let _ = config.set_max_write(nearest);
        }
        let _ = config.set_max_background(self.settings.max_background);
        let _ = config.set_congestion_threshold(self.settings.max_background / 4 * 3);
        // Asynchronous direct I/O: the loop driver's AIO requests are sent to the server
        // concurrently instead of one at a time.
        if config.add_capabilities(InitFlags::FUSE_ASYNC_DIO).is_err() {
            tracing::warn!("FUSE frontend: kernel lacks FUSE_ASYNC_DIO; direct I/O is synchronous");
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match (parent, self.attr(VOLUME)) {
            (ROOT, Some(attr)) if name == OsStr::new(&self.file_name) => {
                reply.entry(&ATTR_TTL, &attr, Generation(0));
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&ATTR_TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(attr) = self.attr(ino) else { return reply.error(Errno::ENOENT) };
        // The volume has the device's size and fixed ownership; time updates are ignored.
        if size.is_some_and(|s| s != attr.size) {
            return reply.error(self.refuse(Errno::EINVAL));
        }
        if mode.is_some() || uid.is_some() || gid.is_some() {
            return reply.error(self.refuse(Errno::EPERM));
        }
        reply.attr(&ATTR_TTL, &attr);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match ino {
            VOLUME if self.read_only && flags.0 & libc::O_ACCMODE != libc::O_RDONLY => {
                reply.error(self.refuse(Errno::EROFS))
            }
            VOLUME => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
            ),
            ROOT => reply.error(Errno::EISDIR),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != VOLUME {
            return reply.error(Errno::EISDIR);
        }
        // Regular-file semantics at the end: a short read, then nothing.
        let len = u64::from(size).min(self.size().saturating_sub(offset));
        bump(&self.counters.reads, 1);
        bump(&self.counters.read_bytes, len);
        READ_BUF.with_borrow_mut(|buf| {
            buf.resize(len as usize, 0);
            match self.backend.read(offset, buf) {
                Ok(()) => reply.data(buf),
                Err(e) => reply.error(self.failed("read", offset, len, &e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != VOLUME {
            return reply.error(Errno::EISDIR);
        }
        let len = data.len() as u64;
        let Some(end) = offset.checked_add(len).filter(|&end| end <= self.size()) else {
            // A block device does not grow.
            return reply.error(self.refuse(Errno::ENOSPC));
        };
        if self.read_only {
            return reply.error(self.refuse(Errno::EROFS));
        }
        bump(&self.counters.writes, 1);
        bump(&self.counters.write_bytes, len);
        let held = self.in_flight.hold(offset, end);
        let result = self.backend.write(offset, data);
        drop(held);
        match result {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(self.failed("write", offset, len, &e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        if ino != VOLUME {
            return reply.ok();
        }
        // A close: every write through this file has completed, so its state is a valid
        // recovery point.
        bump(&self.counters.close_flushes, 1);
        match self.barrier() {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if ino != VOLUME {
            return reply.ok();
        }
        bump(&self.counters.fsyncs, 1);
        match self.barrier() {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino != VOLUME {
            return reply.error(Errno::EISDIR);
        }
        tracing::trace!(mode, offset, length, "FUSE frontend: fallocate");
        let action = match FallocAction::decide(mode, offset, length, self.size()) {
            Ok(action) => action,
            Err(errno) => {
                tracing::debug!(mode, offset, length, "FUSE frontend: fallocate refused");
                return reply.error(self.refuse(errno));
            }
        };
        if self.read_only && action != FallocAction::Nothing {
            return reply.error(self.refuse(Errno::EROFS));
        }
        let result = match action {
            FallocAction::Discard { offset, len } => {
                bump(&self.counters.punch_holes, 1);
                bump(&self.counters.punch_hole_bytes, len);
                let _held = self.in_flight.hold(offset, offset + len);
                self.backend
                    .discard(offset, len)
                    .map_err(|e| self.failed("discard", offset, len, &e))
            }
            FallocAction::Zero { offset, len } => {
                bump(&self.counters.zero_ranges, 1);
                bump(&self.counters.zero_range_bytes, len);
                let _held = self.in_flight.hold(offset, offset + len);
                self.backend
                    .write_zeroes(offset, len)
                    .map_err(|e| self.failed("write-zeroes", offset, len, &e))
            }
            FallocAction::Nothing => {
                bump(&self.counters.other_fallocates, 1);
                return reply.ok();
            }
        };
        match result {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
            (VOLUME, FileType::RegularFile, self.file_name.as_str()),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.size().div_ceil(u64::from(BLOCK));
        reply.statfs(blocks, 0, 0, 2, 0, BLOCK, 255, BLOCK);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::thread;

    use super::falloc::{KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE};
    use super::*;

    const SIZE: u64 = 1 << 20;

    #[test]
    fn fallocate_modes_map_to_discard_zero_or_nothing() {
        let d = |mode, offset, len| FallocAction::decide(mode, offset, len, SIZE);
        // The loop driver's discard.
        assert_eq!(
            d(PUNCH_HOLE | KEEP_SIZE, 4096, 8192),
            Ok(FallocAction::Discard { offset: 4096, len: 8192 })
        );
        // Write-zeroes, with and without KEEP_SIZE.
        assert_eq!(
            d(ZERO_RANGE | KEEP_SIZE, 0, 512),
            Ok(FallocAction::Zero { offset: 0, len: 512 })
        );
        assert_eq!(d(ZERO_RANGE, 0, 512), Ok(FallocAction::Zero { offset: 0, len: 512 }));
        // Preallocation inside the volume: nothing to do.
        assert_eq!(d(0, 0, SIZE), Ok(FallocAction::Nothing));
        assert_eq!(d(KEEP_SIZE, 10, 10), Ok(FallocAction::Nothing));
        // KEEP_SIZE clips at the end; without it a range past the end would grow the file.
        assert_eq!(
            d(PUNCH_HOLE | KEEP_SIZE, SIZE - 10, 100),
            Ok(FallocAction::Discard { offset: SIZE - 10, len: 10 })
        );
        assert_eq!(d(PUNCH_HOLE | KEEP_SIZE, SIZE + 10, 100), Ok(FallocAction::Nothing));
        assert_eq!(d(ZERO_RANGE, SIZE - 10, 100), Err(Errno::ENOSPC));
        assert_eq!(d(0, SIZE, 1), Err(Errno::ENOSPC));
        assert_eq!(d(ZERO_RANGE, u64::MAX, 2), Err(Errno::EFBIG));
        // PUNCH_HOLE without KEEP_SIZE, both at once, collapse/insert/unshare.
        assert_eq!(d(PUNCH_HOLE, 0, 512), Err(Errno::EOPNOTSUPP));
        assert_eq!(d(PUNCH_HOLE | ZERO_RANGE | KEEP_SIZE, 0, 512), Err(Errno::EOPNOTSUPP));
        for other in [0x08, 0x20, 0x40] {
            assert_eq!(d(other, 0, 512), Err(Errno::EOPNOTSUPP), "mode {other:#x}");
        }
    }

    #[test]
    fn overlapping_ranges_wait_disjoint_ones_do_not() {
        let set = Arc::new(InFlight::default());
        let a = set.hold(0, 100);
        let b = set.hold(100, 200); // touches, does not overlap
        assert_eq!(set.held(), 2);
        let entered = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (set, entered) = (set.clone(), entered.clone());
            thread::spawn(move || {
                let _c = set.hold(50, 150);
                entered.store(true, Ordering::SeqCst);
            })
        };
        thread::sleep(Duration::from_millis(50));
        assert!(!entered.load(Ordering::SeqCst), "an overlapping range must wait");
        drop(a);
        thread::sleep(Duration::from_millis(50));
        assert!(!entered.load(Ordering::SeqCst), "still overlaps the second range");
        drop(b);
        waiter.join().expect("waiter");
        assert!(entered.load(Ordering::SeqCst));
        assert_eq!(set.held(), 0);
    }
}
