//! Every unsafe operation of the ublk frontend, behind a safe API: the control ring
//! (SQE128 `IORING_OP_URING_CMD` on `/dev/ublk-control`), a queue's ring with its
//! descriptor table (mmapped read-only from `/dev/ublkcN`) and its request buffers
//! (anonymous memory the driver copies request data into and out of), the queue ring's
//! backing-device ops (READ into and WRITE from a tag's buffer, FSYNC, FALLOCATE), the
//! eventfd that wakes a queue's ring when its spool helper finished a request, and `prctl`.
//!
//! The contract of io_uring is that memory named by a submitted entry stays valid until the
//! entry's completion is reaped. The control ring waits for each command's completion
//! before returning, with the command's buffer borrowed for the whole call. A queue's
//! buffers live as long as its ring; when a queue is dropped with fetches or backing ops
//! still outstanding, the buffers are leaked rather than unmapped, so neither the driver nor
//! a backing op can ever write into memory reused for something else. A tag's buffer is
//! named by at most one thing at a time: the driver (between a fetch and its completion),
//! one backing op (between its submission and its completion), or a Rust borrow (neither
//! outstanding); `QueueRing` checks this with its per-tag flags.

use std::fs::{File, OpenOptions};
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::ptr::NonNull;
use std::time::Duration;

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use super::sys::{self, CtrlCmd, IoCmd, IoDesc};

/// Plain UAPI structs: `#[repr(C)]`, integers only, no padding bytes (checked by the const
/// assertions in `sys`), so every byte pattern is a valid value and viewing one as bytes
/// reads no uninitialised memory.
///
/// # Safety
/// Implement only for such structs.
pub(super) unsafe trait Plain: Copy + Default {}

// SAFETY: repr(C), integer fields, explicit padding fields, sizes asserted in `sys`.
unsafe impl Plain for CtrlCmd {}
// SAFETY: as above.
unsafe impl Plain for sys::DevInfo {}
// SAFETY: as above (the tail padding is the explicit `pad` field).
unsafe impl Plain for sys::Params {}
// SAFETY: as above.
unsafe impl Plain for IoCmd {}

/// The bytes of a plain struct.
fn bytes_of<T: Plain>(value: &T) -> &[u8] {
    // SAFETY: `T: Plain` has no padding, so all `size_of::<T>()` bytes are initialised; the
    // slice borrows `value` and so cannot outlive it.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
}

fn page_size() -> usize {
    // SAFETY: sysconf reads no memory of ours.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(page).ok().filter(|&p| p > 0).unwrap_or(4096)
}

fn open_rw(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).open(path)
}

/// Retries `f` while it fails with `EINTR`.
fn retry_eintr<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// The control device and a small SQE128 ring for its commands.
pub(super) struct ControlRing {
    // Field order: the ring closes before the file it refers to.
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    file: File,
    /// Set when a command's fate is unknown (the ring failed mid-call): refuse further use.
    broken: bool,
}

impl std::fmt::Debug for ControlRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlRing")
            .field("file", &self.file)
            .field("broken", &self.broken)
            .finish()
    }
}

impl ControlRing {
    /// Opens `/dev/ublk-control` (or `path`).
    pub(super) fn open(path: &Path) -> io::Result<ControlRing> {
        let file = open_rw(path)?;
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder().build(4)?;
        Ok(ControlRing { ring, file, broken: false })
    }

    /// Issues the control command `op` with header `cmd` and, when given, `buf` as the
    /// command's in/out buffer (`cmd.addr` and `cmd.len` are set here). Returns the
    /// driver's non-negative result; a negative one becomes the matching OS error.
    pub(super) fn call<T: Plain>(
        &mut self,
        op: u32,
        mut cmd: CtrlCmd,
        buf: Option<&mut T>,
    ) -> io::Result<i32> {
        if self.broken {
            return Err(io::Error::other("ublk control ring is unusable after an earlier failure"));
        }
        if let Some(buf) = buf {
            cmd.addr = (buf as *mut T) as u64;
            cmd.len = u16::try_from(size_of::<T>()).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, "control buffer too large")
            })?;
        }
        let mut payload = [0u8; 80];
        payload[..size_of::<CtrlCmd>()].copy_from_slice(bytes_of(&cmd));
        let entry = opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), op)
            .cmd(payload)
            .build()
            .user_data(u64::from(op));
        // SAFETY: the entry names `buf` (through `cmd.addr`), which is mutably borrowed for
        // this whole call, and the call does not return before the entry's completion is
        // reaped below, or marks the ring broken (never used again, so nothing it still
        // holds is submitted later) when that cannot be established.
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| io::Error::other("ublk control ring full"))?;
        loop {
            if let Err(e) = retry_eintr(|| self.ring.submit_and_wait(1)) {
                self.broken = true;
                return Err(e);
            }
            if let Some(cqe) = self.ring.completion().next() {
                let res = cqe.result();
                return if res < 0 { Err(io::Error::from_raw_os_error(-res)) } else { Ok(res) };
            }
        }
    }
}

/// A read-only shared mapping of one queue's descriptor table.
#[derive(Debug)]
struct DescTable {
    ptr: NonNull<IoDesc>,
    depth: u16,
    map_len: usize,
}

impl DescTable {
    fn map(char_dev: &File, q_id: u16, depth: u16) -> io::Result<DescTable> {
        let page = page_size();
        let map_len = sys::queue_cmd_buf_size(depth, page);
        let offset = sys::CMD_BUF_OFFSET + u64::from(q_id) * sys::max_cmd_buf_size(page);
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "queue id too large"))?;
        // SAFETY: a new shared read-only mapping of the driver's table for this queue; it
        // aliases no Rust object and is only read through volatile reads below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                char_dev.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast::<IoDesc>()).ok_or_else(|| io::Error::other("mmap null"))?;
        Ok(DescTable { ptr, depth, map_len })
    }

    fn get(&self, tag: u16) -> IoDesc {
        assert!(tag < self.depth, "tag {tag} out of the queue depth {}", self.depth);
        // SAFETY: `tag < depth`, so the element lies inside the mapping (page-aligned, so
        // aligned for IoDesc); the driver writes it before completing the fetch of `tag`,
        // and a volatile read copies whatever bytes are there (any bit pattern is valid).
        unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(usize::from(tag))) }
    }
}

impl Drop for DescTable {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; no reference into it exists.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.map_len) };
    }
}

/// Anonymous memory holding one request buffer per tag.
#[derive(Debug)]
struct IoBuffers {
    ptr: NonNull<u8>,
    per_tag: usize,
    depth: u16,
    map_len: usize,
    /// Set when the driver may still write into the buffers: never unmap them then.
    leak: bool,
}

impl IoBuffers {
    fn new(depth: u16, per_tag: usize) -> io::Result<IoBuffers> {
        let per_tag = per_tag.next_multiple_of(page_size());
        let map_len = per_tag
            .checked_mul(usize::from(depth))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "buffers too large"))?;
        // SAFETY: a new private anonymous mapping; it aliases nothing.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap null"))?;
        Ok(IoBuffers { ptr, per_tag, depth, map_len, leak: false })
    }

    fn addr(&self, tag: u16) -> u64 {
        assert!(tag < self.depth);
        self.ptr.as_ptr() as u64 + (usize::from(tag) * self.per_tag) as u64
    }

    fn slice_mut(&mut self, tag: u16, len: usize) -> &mut [u8] {
        assert!(tag < self.depth && len <= self.per_tag);
        // SAFETY: the range lies inside the mapping; the `&mut self` borrow makes it the
        // only Rust reference into the buffers. The driver touches a tag's buffer only
        // while a fetch of that tag is outstanding, and the queue hands out the buffer of a
        // tag only between that fetch's completion and its next commit (see `Queue`).
        unsafe {
            std::slice::from_raw_parts_mut(
                self.ptr.as_ptr().add(usize::from(tag) * self.per_tag),
                len,
            )
        }
    }
}

impl Drop for IoBuffers {
    fn drop(&mut self) {
        if self.leak {
            return;
        }
        // SAFETY: unmaps exactly the mapping made in `new`; no reference into it exists and
        // no fetch naming it is outstanding (`leak` is false).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.map_len) };
    }
}

// SAFETY: the raw pointers are owned mappings, used from one thread at a time (`&mut`).
unsafe impl Send for DescTable {}
// SAFETY: as above.
unsafe impl Send for IoBuffers {}

/// One queue's ring, descriptor table and buffers. Owned by the queue's thread: the driver
/// requires every FETCH and COMMIT of a queue to come from one task.
pub(super) struct QueueRing {
    // Field order matters: the ring is closed (cancelling outstanding fetches) before the
    // table and the buffers are released.
    ring: IoUring<squeue::Entry, cqueue::Entry>,
    descs: DescTable,
    bufs: IoBuffers,
    char_fd: i32,
    q_id: u16,
    /// Tags with a FETCH or COMMIT_AND_FETCH submitted and not completed.
    outstanding: usize,
    /// Per tag: whether the server holds it (its fetch completed, not yet committed).
    held: Vec<bool>,
    /// Per tag: whether a backing op naming its buffer is submitted and not completed.
    backing: Vec<bool>,
    /// Whether a poll on the wake eventfd is submitted and not completed.
    wake_armed: bool,
}

/// `user_data` of the poll on the wake eventfd (tags are below 4096).
const WAKE_USER_DATA: u64 = u64::MAX;
/// Set in the `user_data` of a backing-device op (the tag in the low 16 bits); the driver's
/// commands carry the bare tag.
const BACKING_BIT: u64 = 1 << 32;

/// One completion reaped from a queue's ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Completion {
    /// A FETCH or COMMIT_AND_FETCH of `tag` completed with `res` (a request, or an abort).
    Request { tag: u16, res: i32 },
    /// The backing op of `tag` completed with `res` (bytes, 0, or a negative errno).
    Backing { tag: u16, res: i32 },
}

/// The range of `fallocate(2)` modes the queue uses (`linux/falloc.h`).
pub(super) mod falloc {
    /// Keep the file size.
    pub(in super::super) const KEEP_SIZE: i32 = 0x01;
    /// Deallocate; reads return zeros.
    pub(in super::super) const PUNCH_HOLE: i32 = 0x02;
    /// Zero the range (on a block device: write zeroes, falling back to writing zero pages).
    pub(in super::super) const ZERO_RANGE: i32 = 0x10;
}

/// `RWF_DSYNC`: the write is durable (as after `fdatasync`) when it completes.
const RWF_DSYNC: i32 = 0x02;

impl std::fmt::Debug for QueueRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueRing")
            .field("q_id", &self.q_id)
            .field("depth", &self.held.len())
            .field("outstanding", &self.outstanding)
            .finish()
    }
}

impl QueueRing {
    /// Sets up queue `q_id` of the device whose char device is `char_dev`. The file must
    /// stay open as long as the queue (the caller keeps it).
    pub(super) fn new(
        char_dev: &File,
        q_id: u16,
        depth: u16,
        buf_bytes: usize,
    ) -> io::Result<QueueRing> {
        let descs = DescTable::map(char_dev, q_id, depth)?;
        let bufs = IoBuffers::new(depth, buf_bytes)?;
        // Per tag a driver command and a backing op, plus the wake poll.
        let ring = IoUring::builder().build((2 * u32::from(depth) + 1).next_power_of_two())?;
        Ok(QueueRing {
            ring,
            descs,
            bufs,
            char_fd: char_dev.as_raw_fd(),
            q_id,
            outstanding: 0,
            held: vec![false; usize::from(depth)],
            backing: vec![false; usize::from(depth)],
            wake_armed: false,
        })
    }

    /// Queues a one-shot poll for input on `wake` (an eventfd) unless one is pending: its
    /// completion ends the next [`QueueRing::wait`] once the eventfd is written. The fd
    /// must stay open as long as this ring (the caller keeps it).
    pub(super) fn arm_wake(&mut self, wake: RawFd) -> io::Result<()> {
        if self.wake_armed {
            return Ok(());
        }
        let entry = opcode::PollAdd::new(types::Fd(wake), libc::POLLIN as u32)
            .build()
            .user_data(WAKE_USER_DATA);
        // SAFETY: a poll names no memory of this process, only the fd, which outlives the
        // ring (the caller's contract above).
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| io::Error::other("ublk queue ring full"))?;
        self.wake_armed = true;
        Ok(())
    }

    fn push_cmd(&mut self, op: u32, tag: u16, result: i32) -> io::Result<()> {
        let cmd = IoCmd { q_id: self.q_id, tag, result, addr: self.bufs.addr(tag) };
        let mut payload = [0u8; 16];
        payload.copy_from_slice(bytes_of(&cmd));
        let entry = opcode::UringCmd16::new(types::Fd(self.char_fd), op)
            .cmd(payload)
            .build()
            .user_data(u64::from(tag));
        // SAFETY: the entry names the tag's buffer, which stays mapped as long as this
        // QueueRing, and after it when fetches are still outstanding at drop (leaked). The
        // command payload itself is copied into the SQE.
        unsafe { self.ring.submission().push(&entry) }.map_err(|_| {
            // The ring has room for one entry per tag, and each tag has at most one.
            io::Error::other("ublk queue ring full")
        })?;
        self.outstanding += 1;
        self.held[usize::from(tag)] = false;
        Ok(())
    }

    /// Queues a FETCH_REQ for `tag` (submitted by the next [`QueueRing::wait`] or
    /// [`QueueRing::submit`]).
    pub(super) fn fetch(&mut self, tag: u16) -> io::Result<()> {
        self.push_cmd(sys::IO_FETCH_REQ, tag, 0)
    }

    /// Queues a COMMIT_AND_FETCH_REQ completing `tag`'s request with `result`.
    pub(super) fn commit_and_fetch(&mut self, tag: u16, result: i32) -> io::Result<()> {
        assert!(self.held[usize::from(tag)], "commit of tag {tag}, which the server does not hold");
        assert!(!self.backing[usize::from(tag)], "commit of tag {tag} with its backing op running");
        self.push_cmd(sys::IO_COMMIT_AND_FETCH_REQ, tag, result)
    }

    /// Checks that the server holds `tag` with no backing op outstanding, and returns the
    /// address of byte `at` of its buffer, with room for `len` bytes.
    fn backing_buf(&self, tag: u16, at: usize, len: usize) -> u64 {
        let t = usize::from(tag);
        assert!(self.held[t], "backing op of tag {tag}, which the server does not hold");
        assert!(!self.backing[t], "second backing op of tag {tag}");
        assert!(at.checked_add(len).is_some_and(|end| end <= self.bufs.per_tag), "buffer range");
        self.bufs.addr(tag) + at as u64
    }

    /// Pushes a backing op of `tag` (its memory checked by the caller with `backing_buf`).
    ///
    /// # Safety
    /// Any memory `entry` names lies in `tag`'s buffer, checked with `backing_buf`.
    unsafe fn push_backing(&mut self, tag: u16, entry: squeue::Entry) -> io::Result<()> {
        let entry = entry.user_data(BACKING_BIT | u64::from(tag));
        // SAFETY: the entry names at most `tag`'s buffer (the caller's contract), which
        // stays mapped while the op is outstanding (leaked at drop otherwise); the flag set
        // below keeps every other user of the buffer away until the op's completion is
        // reaped in `wait`.
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| io::Error::other("ublk queue ring full"))?;
        self.backing[usize::from(tag)] = true;
        self.outstanding += 1;
        Ok(())
    }

    /// Queues a READ of `len` bytes at `offset` of `fd` into `tag`'s buffer from byte `at`.
    /// `fd` must stay open until the completion (the caller keeps the device).
    pub(super) fn read_backing(
        &mut self,
        tag: u16,
        fd: RawFd,
        offset: u64,
        at: usize,
        len: usize,
    ) -> io::Result<()> {
        let addr = self.backing_buf(tag, at, len);
        let entry =
            opcode::Read::new(types::Fd(fd), addr as *mut u8, len as u32).offset(offset).build();
        // SAFETY: the entry names `len` bytes of `tag`'s buffer from `at`, checked above.
        unsafe { self.push_backing(tag, entry) }
    }

    /// Queues a WRITE of `len` bytes from `tag`'s buffer (from byte `at`) to `offset` of
    /// `fd`, with `RWF_DSYNC` when `dsync` (a FUA write).
    pub(super) fn write_backing(
        &mut self,
        tag: u16,
        fd: RawFd,
        offset: u64,
        at: usize,
        len: usize,
        dsync: bool,
    ) -> io::Result<()> {
        let addr = self.backing_buf(tag, at, len);
        let entry = opcode::Write::new(types::Fd(fd), addr as *const u8, len as u32)
            .offset(offset)
            .rw_flags(if dsync { RWF_DSYNC } else { 0 })
            .build();
        // SAFETY: the entry names `len` bytes of `tag`'s buffer from `at`, checked above.
        unsafe { self.push_backing(tag, entry) }
    }

    /// Queues an FSYNC (data only, `fdatasync`) of `fd` for `tag`.
    pub(super) fn fsync_backing(&mut self, tag: u16, fd: RawFd) -> io::Result<()> {
        self.backing_buf(tag, 0, 0);
        let entry = opcode::Fsync::new(types::Fd(fd)).flags(types::FsyncFlags::DATASYNC).build();
        // SAFETY: an fsync names no memory of this process.
        unsafe { self.push_backing(tag, entry) }
    }

    /// Queues a FALLOCATE of `len` bytes at `offset` of `fd` with `mode` ([`falloc`]).
    pub(super) fn fallocate_backing(
        &mut self,
        tag: u16,
        fd: RawFd,
        mode: i32,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        self.backing_buf(tag, 0, 0);
        let entry = opcode::Fallocate::new(types::Fd(fd), len).offset(offset).mode(mode).build();
        // SAFETY: a fallocate names no memory of this process.
        unsafe { self.push_backing(tag, entry) }
    }

    /// Submits what is queued without waiting.
    pub(super) fn submit(&mut self) -> io::Result<()> {
        retry_eintr(|| self.ring.submit()).map(drop)
    }

    /// Submits what is queued and waits up to `timeout` for at least one completion, then
    /// appends every completion to `out`.
    pub(super) fn wait(&mut self, timeout: Duration, out: &mut Vec<Completion>) -> io::Result<()> {
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        for cqe in self.ring.completion() {
            if cqe.user_data() == WAKE_USER_DATA {
                self.wake_armed = false;
                continue;
            }
            let backing = cqe.user_data() & BACKING_BIT != 0;
            let tag = u16::try_from(cqe.user_data() & !BACKING_BIT).unwrap_or(u16::MAX);
            if usize::from(tag) >= self.held.len() {
                continue;
            }
            self.outstanding = self.outstanding.saturating_sub(1);
            if backing {
                self.backing[usize::from(tag)] = false;
                out.push(Completion::Backing { tag, res: cqe.result() });
                continue;
            }
            if cqe.result() == sys::IO_RES_OK {
                self.held[usize::from(tag)] = true;
            }
            out.push(Completion::Request { tag, res: cqe.result() });
        }
        Ok(())
    }

    /// The request the driver delivered on `tag` (valid after its fetch completed).
    pub(super) fn desc(&self, tag: u16) -> IoDesc {
        self.descs.get(tag)
    }

    /// The first `len` bytes of `tag`'s buffer, which the server holds.
    pub(super) fn buffer(&mut self, tag: u16, len: usize) -> &mut [u8] {
        assert!(self.held[usize::from(tag)], "buffer of tag {tag}, which the server does not hold");
        assert!(!self.backing[usize::from(tag)], "buffer of tag {tag} with its backing op running");
        self.bufs.slice_mut(tag, len)
    }

    /// Bytes of each tag's buffer.
    pub(super) fn buffer_len(&self) -> usize {
        self.bufs.per_tag
    }
}

impl Drop for QueueRing {
    fn drop(&mut self) {
        if self.outstanding > 0 {
            // Closing the ring cancels the fetches (and backing ops) asynchronously; keep the
            // buffers mapped so a late copy lands in memory nothing else uses.
            self.bufs.leak = true;
        }
    }
}

/// Marks the calling thread as an I/O flusher (`PR_SET_IO_FLUSHER`), so memory reclaim
/// never waits on I/O this thread must serve.
pub(super) fn set_io_flusher() -> io::Result<()> {
    /// `PR_SET_IO_FLUSHER` (Linux 5.6; not in every libc crate version).
    const PR_SET_IO_FLUSHER: libc::c_int = 57;
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// A new non-blocking eventfd (counter 0): writing 8 bytes adds to the counter, reading
/// them returns it and resets it.
pub(super) fn eventfd() -> io::Result<File> {
    // SAFETY: eventfd takes integer arguments only.
    let fd: RawFd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by eventfd, is open, and nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(File::from(owned))
}

/// Opens a ublk char device for its queues.
pub(super) fn open_char_dev(path: &Path) -> io::Result<File> {
    open_rw(path)
}
