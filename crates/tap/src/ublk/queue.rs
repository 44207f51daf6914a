//! One queue of a ublk device: a thread that owns the queue's io_uring and drives on it both
//! the driver's commands (FETCH, COMMIT_AND_FETCH) and the pass-through I/O to the
//! protected device (READ, WRITE, FSYNC, FALLOCATE on its descriptor), up to `depth`
//! requests at once; plus one spool helper thread for the completion policy that waits for
//! the spool.
//!
//! **One ring.** Every entry's `user_data` says what it is: a bare tag for a driver command,
//! the tag with a high bit for that tag's backing op (`os::Completion`). A request goes
//! through these steps, each on the ring thread, none blocking on the device:
//! - READ: an io_uring READ from the device straight into the tag's buffer (resubmitted for
//!   the rest after a short read), then the commit.
//! - WRITE: [`Tap::begin_mutation`] (the write-intent mark and the ordering ticket); once
//!   [`Tap::may_issue`], an io_uring WRITE from the tag's buffer (with `RWF_DSYNC` for FUA);
//!   on its completion [`Tap::finish_write`] appends the event (its data copied out of the
//!   tag buffer), then the commit.
//! - DISCARD and WRITE_ZEROES: the same with an io_uring FALLOCATE (`ZERO_RANGE`, or
//!   `PUNCH_HOLE` where the file does not support it; both leave zeros to read, which is
//!   what the replica stores) and [`Tap::finish_range`].
//! - FLUSH: [`Tap::begin_flush`] appends the barrier, then an io_uring FSYNC (data sync),
//!   then the commit.
//!
//! **Capture order with many requests in flight.** A request is committed to the driver only
//! after its tap step finished: *a write is in the spool before the driver learns that it
//! completed*. The block layer issues a FLUSH only after the writes it must cover completed,
//! i.e. after their commits, so their events are already in the spool when the FLUSH's
//! barrier is appended: a write completed before a flush was issued is ordered before that
//! flush, whatever the number of requests in flight. A FLUSH is committed after its barrier
//! is appended and its FSYNC completed. Overlapping mutations are ordered by the tap's
//! tickets, taken in the order the driver delivered them: a mutation parked behind an
//! earlier overlapping one is issued once that one finished (re-checked after every finish
//! on this ring, and every millisecond while any is parked, for a ticket held by another
//! queue or a synchronous caller).
//!
//! **What still blocks the ring thread.** The tap's step 1 writes and syncs the intent map
//! when a write touches a region not yet marked durable (once per region until it is
//! cleared), and under [`crate::HotFullPolicy::Wait`] may wait for acknowledgements. The
//! spool append is in memory. Under [`crate::CompletionPolicy::Spooled`] a finished request
//! waits for the spool's group commit; that wait runs on the queue's spool helper thread
//! ([`Tap::wait_durable`]), which hands the request back over a channel and an eventfd the
//! ring keeps a poll armed on, so the ring thread goes on serving meanwhile.
//!
//! **Memory.** The tag buffers take `depth x max_io_bytes`; a write's event owns a copy of
//! its data (in the spool's memory until the spool drops it).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use bytes::Bytes;
use tidemark_journal::BlockIo;

use super::os::{self, Completion, QueueRing, falloc};
use super::sys;
use crate::capture::{Captured, Mutation, PendingMutation, Tap};
use crate::error::TapError;
use crate::fuse::BlockBackend;

/// How often an idle queue thread looks at the stop flag.
const IDLE_POLL: Duration = Duration::from_millis(200);
/// How often a queue with a mutation parked behind another's ticket checks it again.
const PARKED_POLL: Duration = Duration::from_millis(1);

/// Live concurrency figures of one queue.
#[derive(Debug, Default)]
pub(super) struct QueueGauge {
    /// Requests the server holds now (delivered, not yet committed).
    pub(super) busy: AtomicU64,
    /// The most requests held at the same time so far.
    pub(super) max_busy: AtomicU64,
}

/// Counters shared by a device's queues.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) reads: AtomicU64,
    pub(super) writes: AtomicU64,
    pub(super) fua_writes: AtomicU64,
    pub(super) flushes: AtomicU64,
    pub(super) discards: AtomicU64,
    pub(super) write_zeroes: AtomicU64,
    pub(super) bytes_read: AtomicU64,
    pub(super) bytes_written: AtomicU64,
    pub(super) errors: AtomicU64,
    /// Backing-device ops completed on the queues' rings.
    pub(super) backing_ops: AtomicU64,
    /// One gauge per queue, indexed by queue id.
    pub(super) queues: Box<[QueueGauge]>,
}

impl Counters {
    /// Zeroed counters for a device of `queues` queues.
    pub(super) fn new(queues: u16) -> Counters {
        Counters {
            queues: (0..queues).map(|_| QueueGauge::default()).collect(),
            ..Counters::default()
        }
    }
}

/// What serves a device's requests.
#[derive(Debug, Clone)]
pub(super) enum Engine {
    /// The protected device behind a tap: every mutation captured, the I/O passed through to
    /// the device's descriptor with io_uring ops on the queue's ring (the module
    /// documentation).
    Capture {
        tap: Arc<Tap>,
        /// The protected device, held so that `fd` stays open as long as the queue's ring.
        _device: Arc<dyn BlockIo>,
        /// Its descriptor, the target of the ring's backing ops.
        fd: RawFd,
    },
    /// Any other [`BlockBackend`] (a virtual snapshot, for one): each request is served by a
    /// synchronous backend call on the ring thread, then committed. Nothing is captured.
    Backend(Arc<dyn BlockBackend>),
}

/// What a queue thread works with.
#[derive(Debug, Clone)]
pub(super) struct QueueContext {
    pub(super) dev_id: u32,
    pub(super) q_id: u16,
    pub(super) depth: u16,
    pub(super) engine: Engine,
    pub(super) device_len: u64,
    pub(super) counters: Arc<Counters>,
    pub(super) stop: Arc<AtomicBool>,
}

impl QueueContext {
    /// The tap of a capture queue. Only the capture paths call it; a backend queue never
    /// has a request on them (it serves each one inside [`Queue::start`]).
    fn tap(&self) -> &Arc<Tap> {
        match &self.engine {
            Engine::Capture { tap, .. } => tap,
            Engine::Backend(_) => unreachable!("a capture step on a backend queue"),
        }
    }

    /// The protected device's descriptor (-1 for a backend queue, which issues no
    /// backing op).
    fn fd(&self) -> RawFd {
        match &self.engine {
            Engine::Capture { fd, .. } => *fd,
            Engine::Backend(_) => -1,
        }
    }

    fn gauge(&self) -> &QueueGauge {
        &self.counters.queues[usize::from(self.q_id)]
    }

    fn fail(&self, reason: String) -> TapError {
        TapError::UblkQueue { dev: self.dev_id, queue: self.q_id, reason }
    }
}

/// Where a tag's request stands.
#[derive(Debug)]
enum Slot {
    /// The driver holds the tag (a fetch is outstanding).
    Idle,
    /// A READ: `done` of `len` bytes at `offset` read so far.
    Read { offset: u64, len: usize, done: usize },
    /// A mutation: parked until it may be issued, then its backing op in flight (`done`
    /// bytes of a write completed; `punch` when a zeroing fell back to `PUNCH_HOLE`).
    Mutate { pending: PendingMutation, issued: bool, done: u64, punch: bool },
    /// A FLUSH: its barrier appended, its FSYNC in flight.
    Flush { captured: Captured },
    /// Finished; the spool helper waits for the spool to hold it durably.
    Durable,
}

/// A finished request waiting for the spool (to the helper), and back (`result` to commit).
#[derive(Debug)]
struct Done {
    tag: u16,
    captured: Captured,
    result: i32,
}

type Outcome<T> = Result<T, (i32, String)>;

/// The queue thread's body: sets up, fetches every tag, reports readiness on `ready`, then
/// serves requests until the driver aborts every tag or `stop` is set.
pub(super) fn run(
    ctx: QueueContext,
    char_dev: Arc<File>,
    buf_bytes: usize,
    ready: SyncSender<Result<(), TapError>>,
) -> Result<(), TapError> {
    let setup = || -> io::Result<(QueueRing, Arc<File>)> {
        if let Err(e) = os::set_io_flusher() {
            // Only a risk under memory pressure; older kernels lack the prctl.
            tracing::warn!(dev = ctx.dev_id, queue = ctx.q_id, "PR_SET_IO_FLUSHER failed: {e}");
        }
        let wake = Arc::new(os::eventfd()?);
        let mut ring = QueueRing::new(&char_dev, ctx.q_id, ctx.depth, buf_bytes)?;
        for tag in 0..ctx.depth {
            ring.fetch(tag)?;
        }
        ring.arm_wake(wake.as_raw_fd())?;
        ring.submit()?;
        Ok((ring, wake))
    };
    let (ring, wake) = match setup() {
        Ok(set) => set,
        Err(e) => {
            let _ = ready.send(Err(ctx.fail(format!("setup failed: {e}"))));
            return Err(ctx.fail(format!("setup failed: {e}")));
        }
    };
    let (to_helper, helper_rx) = mpsc::channel::<Done>();
    let (helper_tx, from_helper) = mpsc::channel::<Done>();
    // A backend queue captures nothing, so it has nothing to wait for: no helper.
    let helper = match &ctx.engine {
        Engine::Capture { tap, .. } => {
            let (tap, wake, dev, q) = (tap.clone(), wake.clone(), ctx.dev_id, ctx.q_id);
            thread::Builder::new()
                .name(format!("ublk{dev}q{q}s"))
                .spawn(move || spool_helper(&tap, &helper_rx, &helper_tx, &wake, dev, q))
                .map(Some)
        }
        Engine::Backend(_) => Ok(None),
    };
    let helper = match helper {
        Ok(handle) => handle,
        Err(e) => {
            let _ = ready.send(Err(ctx.fail(format!("spool helper spawn failed: {e}"))));
            return Err(ctx.fail(format!("spool helper spawn failed: {e}")));
        }
    };
    let _ = ready.send(Ok(()));
    drop(ready);

    let mut queue = Queue {
        slots: (0..ctx.depth).map(|_| Slot::Idle).collect(),
        parked: VecDeque::new(),
        ctx: &ctx,
        ring,
        to_helper,
    };
    let served = queue.serve(&wake, &from_helper);
    // The helper ends once its channel is closed and its current wait is over.
    drop(queue);
    if let Some(helper) = helper {
        join_helper(&ctx, helper);
    }
    served
}

fn join_helper(ctx: &QueueContext, helper: JoinHandle<()>) {
    if helper.join().is_err() {
        tracing::error!(dev = ctx.dev_id, queue = ctx.q_id, "a ublk spool helper panicked");
    }
}

/// The spool helper: waits until the spool holds each request durably, then hands it back.
fn spool_helper(
    tap: &Tap,
    jobs: &Receiver<Done>,
    done: &Sender<Done>,
    wake: &File,
    dev: u32,
    queue: u16,
) {
    if let Err(e) = os::set_io_flusher() {
        tracing::debug!(dev, queue, "PR_SET_IO_FLUSHER failed: {e}");
    }
    while let Ok(job) = jobs.recv() {
        // A failing spool sync sends the tap into overflow (the write stays covered by the
        // intent map); the request itself succeeded on the device.
        if let Err(e) = tap.wait_durable(job.captured) {
            tracing::warn!(dev, queue, tag = job.tag, "waiting for the spool: {e}");
        }
        if done.send(job).is_err() {
            return;
        }
        if let Err(e) = (&*wake).write_all(&1u64.to_ne_bytes()) {
            // Only an overflowing counter fails, which 2^64 - 1 writes would take.
            tracing::error!(dev, queue, "waking the ring failed: {e}");
        }
    }
}

/// The ring thread's state.
struct Queue<'a> {
    ctx: &'a QueueContext,
    ring: QueueRing,
    slots: Vec<Slot>,
    /// Tags of mutations begun and not yet issued, in the order they were begun.
    parked: VecDeque<u16>,
    to_helper: Sender<Done>,
}

impl Queue<'_> {
    /// The loop (see the module documentation).
    fn serve(&mut self, wake: &File, from_helper: &Receiver<Done>) -> Result<(), TapError> {
        let ctx = self.ctx;
        let depth = usize::from(ctx.depth);
        let mut aborted = vec![false; depth];
        let mut finished = 0usize;
        let mut completions = Vec::with_capacity(2 * depth);
        while finished < depth && !ctx.stop.load(Ordering::Acquire) {
            self.ring
                .arm_wake(wake.as_raw_fd())
                .map_err(|e| ctx.fail(format!("arming the wake poll: {e}")))?;
            completions.clear();
            let timeout = if self.parked.is_empty() { IDLE_POLL } else { PARKED_POLL };
            self.ring
                .wait(timeout, &mut completions)
                .map_err(|e| ctx.fail(format!("waiting for requests: {e}")))?;
            for &completion in &completions {
                match completion {
                    Completion::Request { tag, res } if res == sys::IO_RES_OK => {
                        self.start(tag)?;
                    }
                    Completion::Request { tag, res } => {
                        if res != sys::IO_RES_ABORT {
                            tracing::warn!(
                                dev = ctx.dev_id,
                                queue = ctx.q_id,
                                tag,
                                "fetch failed: {}",
                                io::Error::from_raw_os_error(-res)
                            );
                        }
                        if !std::mem::replace(&mut aborted[usize::from(tag)], true) {
                            finished += 1;
                        }
                    }
                    Completion::Backing { tag, res } => {
                        ctx.counters.backing_ops.fetch_add(1, Ordering::Relaxed);
                        self.backing_done(tag, res)?;
                    }
                }
            }
            // Reset the eventfd before draining: a request handed back after the drain
            // writes it again, so the re-armed poll fires at once.
            let mut counter = [0u8; 8];
            match (&*wake).read(&mut counter) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(ctx.fail(format!("reading the wake eventfd: {e}"))),
            }
            while let Ok(done) = from_helper.try_recv() {
                self.commit(done.tag, done.result)?;
            }
            self.issue_parked()?;
        }
        Ok(())
    }

    /// A request arrived on `tag`: decodes it, counts it and starts it.
    fn start(&mut self, tag: u16) -> Result<(), TapError> {
        let gauge = self.ctx.gauge();
        let busy = gauge.busy.fetch_add(1, Ordering::AcqRel) + 1;
        gauge.max_busy.fetch_max(busy, Ordering::AcqRel);
        let started = self.decode_and_begin(tag);
        match started {
            Ok(None) => Ok(()),
            Ok(Some(result)) => self.commit(tag, result),
            Err((errno, what)) => self.fail_request(tag, errno, &what),
        }
    }

    /// Checks the request on `tag` and starts it; `Some(result)` when it was served at once
    /// (a backend queue) and is to be committed with `result`.
    fn decode_and_begin(&mut self, tag: u16) -> Outcome<Option<i32>> {
        let desc = self.ring.desc(tag);
        let offset = desc.start_sector << 9;
        let len = u64::from(desc.nr_sectors) << 9;
        let in_range = offset.checked_add(len).is_some_and(|end| end <= self.ctx.device_len);
        let ring_err = |e: io::Error| (libc::EIO, format!("submitting the backing op: {e}"));
        match desc.op() {
            sys::IO_OP_READ | sys::IO_OP_WRITE if len > self.ring.buffer_len() as u64 => {
                return Err((
                    libc::EINVAL,
                    format!("request of {len} bytes exceeds the tag buffer"),
                ));
            }
            // A FLUSH's sector fields mean nothing (the block layer leaves them unset).
            op if !in_range && op != sys::IO_OP_FLUSH && op <= sys::IO_OP_WRITE_ZEROES => {
                return Err((
                    libc::EINVAL,
                    format!(
                        "{len} bytes at byte {offset} reach past the device's {} bytes",
                        self.ctx.device_len
                    ),
                ));
            }
            _ => {}
        }
        if let Engine::Backend(backend) = &self.ctx.engine {
            let backend = backend.clone();
            return self.serve_backend(&*backend, tag, desc.op(), offset, len).map(Some);
        }
        let (c, tap) = (&self.ctx.counters, self.ctx.tap());
        match desc.op() {
            sys::IO_OP_READ => {
                c.reads.fetch_add(1, Ordering::Relaxed);
                c.bytes_read.fetch_add(len, Ordering::Relaxed);
                let len = len as usize;
                self.ring.read_backing(tag, self.ctx.fd(), offset, 0, len).map_err(ring_err)?;
                self.slots[usize::from(tag)] = Slot::Read { offset, len, done: 0 };
                Ok(None)
            }
            sys::IO_OP_WRITE => {
                c.writes.fetch_add(1, Ordering::Relaxed);
                c.bytes_written.fetch_add(len, Ordering::Relaxed);
                let fua = desc.op_flags & sys::IO_F_FUA != 0;
                if fua {
                    c.fua_writes.fetch_add(1, Ordering::Relaxed);
                }
                let pending =
                    tap.begin_mutation(Mutation::Write { fua }, offset, len).map_err(tap_errno)?;
                self.park(tag, pending);
                Ok(None)
            }
            sys::IO_OP_FLUSH => {
                c.flushes.fetch_add(1, Ordering::Relaxed);
                let captured = tap.begin_flush();
                self.ring.fsync_backing(tag, self.ctx.fd()).map_err(ring_err)?;
                self.slots[usize::from(tag)] = Slot::Flush { captured };
                Ok(None)
            }
            op @ (sys::IO_OP_DISCARD | sys::IO_OP_WRITE_ZEROES) => {
                let kind = if op == sys::IO_OP_DISCARD {
                    c.discards.fetch_add(1, Ordering::Relaxed);
                    Mutation::Discard
                } else {
                    c.write_zeroes.fetch_add(1, Ordering::Relaxed);
                    Mutation::WriteZeroes
                };
                let pending = tap.begin_mutation(kind, offset, len).map_err(tap_errno)?;
                self.park(tag, pending);
                Ok(None)
            }
            op => Err((libc::EOPNOTSUPP, format!("operation {op} not supported"))),
        }
    }

    /// Serves `op` on `tag` with a backend call, synchronously; returns the result to
    /// commit (bytes read or written, 0 for the others).
    fn serve_backend(
        &mut self,
        backend: &dyn BlockBackend,
        tag: u16,
        op: u8,
        offset: u64,
        len: u64,
    ) -> Outcome<i32> {
        let c = &self.ctx.counters;
        let ulen = len as usize;
        let done = match op {
            sys::IO_OP_READ => {
                c.reads.fetch_add(1, Ordering::Relaxed);
                c.bytes_read.fetch_add(len, Ordering::Relaxed);
                backend.read(offset, self.ring.buffer(tag, ulen)).map(|()| len as i32)
            }
            sys::IO_OP_WRITE => {
                c.writes.fetch_add(1, Ordering::Relaxed);
                c.bytes_written.fetch_add(len, Ordering::Relaxed);
                if self.ring.desc(tag).op_flags & sys::IO_F_FUA != 0 {
                    c.fua_writes.fetch_add(1, Ordering::Relaxed);
                }
                backend.write(offset, self.ring.buffer(tag, ulen)).map(|()| len as i32)
            }
            sys::IO_OP_FLUSH => {
                c.flushes.fetch_add(1, Ordering::Relaxed);
                backend.flush().map(|()| 0)
            }
            sys::IO_OP_DISCARD => {
                c.discards.fetch_add(1, Ordering::Relaxed);
                backend.discard(offset, len).map(|()| 0)
            }
            sys::IO_OP_WRITE_ZEROES => {
                c.write_zeroes.fetch_add(1, Ordering::Relaxed);
                backend.write_zeroes(offset, len).map(|()| 0)
            }
            op => return Err((libc::EOPNOTSUPP, format!("operation {op} not supported"))),
        };
        done.map_err(|e| {
            let (errno, what) = tap_errno(e);
            (errno, format!("backend op {op} of {len} bytes at byte {offset}: {what}"))
        })
    }

    /// Holds a begun mutation until [`Queue::issue_parked`] issues it.
    fn park(&mut self, tag: u16, pending: PendingMutation) {
        self.slots[usize::from(tag)] =
            Slot::Mutate { pending, issued: false, done: 0, punch: false };
        self.parked.push_back(tag);
    }

    /// Issues every parked mutation whose ticket allows it.
    fn issue_parked(&mut self) -> Result<(), TapError> {
        let mut i = 0;
        while i < self.parked.len() {
            let tag = self.parked[i];
            let Slot::Mutate { pending, .. } = &self.slots[usize::from(tag)] else {
                self.parked.remove(i);
                continue;
            };
            if !self.ctx.tap().may_issue(pending) {
                i += 1;
                continue;
            }
            self.parked.remove(i);
            if let Err(e) = self.submit_mutation(tag) {
                self.fail_request(tag, libc::EIO, &format!("submitting the backing op: {e}"))?;
            }
        }
        Ok(())
    }

    /// Submits (or resubmits, for the rest) the backing op of the mutation on `tag`.
    fn submit_mutation(&mut self, tag: u16) -> io::Result<()> {
        let fd = self.ctx.fd();
        let Slot::Mutate { pending, issued, done, punch } = &mut self.slots[usize::from(tag)]
        else {
            return Err(io::Error::other("no mutation on the tag"));
        };
        *issued = true;
        let (offset, len, kind) = (pending.offset(), pending.len(), pending.kind());
        match kind {
            Mutation::Write { fua } => {
                let at = *done as usize;
                let rest = (len - *done) as usize;
                self.ring.write_backing(tag, fd, offset + *done, at, rest, fua)
            }
            Mutation::WriteZeroes | Mutation::Discard => {
                let way = if *punch { falloc::PUNCH_HOLE } else { falloc::ZERO_RANGE };
                self.ring.fallocate_backing(tag, fd, way | falloc::KEEP_SIZE, offset, len)
            }
        }
    }

    /// The backing op of `tag` completed with `res`.
    fn backing_done(&mut self, tag: u16, res: i32) -> Result<(), TapError> {
        let slot = std::mem::replace(&mut self.slots[usize::from(tag)], Slot::Idle);
        match slot {
            Slot::Read { offset, len, done } => {
                if res <= 0 {
                    let errno = if res < 0 { -res } else { libc::EIO };
                    let what = format!("read of {len} bytes at byte {offset}");
                    return self.fail_request(tag, errno, &backing_failed(&what, res));
                }
                let done = done + res as usize;
                if done < len {
                    self.slots[usize::from(tag)] = Slot::Read { offset, len, done };
                    if let Err(e) = self.ring.read_backing(
                        tag,
                        self.ctx.fd(),
                        offset + done as u64,
                        done,
                        len - done,
                    ) {
                        self.slots[usize::from(tag)] = Slot::Idle;
                        return self.fail_request(tag, libc::EIO, &format!("resubmitting: {e}"));
                    }
                    return Ok(());
                }
                self.commit(tag, len as i32)
            }
            Slot::Mutate { pending, issued: _, done, punch } => {
                let (offset, len, kind) = (pending.offset(), pending.len(), pending.kind());
                let zeroing = !matches!(kind, Mutation::Write { .. });
                if zeroing && !punch && (res == -libc::EOPNOTSUPP || res == -libc::EINVAL) {
                    // No ZERO_RANGE here (tmpfs, for one): punch a hole instead.
                    self.slots[usize::from(tag)] =
                        Slot::Mutate { pending, issued: true, done, punch: true };
                    return match self.submit_mutation(tag) {
                        Ok(()) => Ok(()),
                        Err(e) => self.abandon(tag, libc::EIO, &format!("resubmitting: {e}")),
                    };
                }
                if res < 0 || (res == 0 && !zeroing) {
                    drop(pending); // its regions stay out of sync in the intent map
                    let errno = if res < 0 { -res } else { libc::EIO };
                    let what = format!("{kind:?} of {len} bytes at byte {offset}");
                    return self.abandon(tag, errno, &backing_failed(&what, res));
                }
                let finished = if zeroing {
                    self.ctx.tap().finish_range(pending)
                } else {
                    let done = done + res as u64;
                    if done < len {
                        self.slots[usize::from(tag)] =
                            Slot::Mutate { pending, issued: true, done, punch };
                        return match self.submit_mutation(tag) {
                            Ok(()) => Ok(()),
                            Err(e) => self.abandon(tag, libc::EIO, &format!("resubmitting: {e}")),
                        };
                    }
                    let data = Bytes::copy_from_slice(self.ring.buffer(tag, len as usize));
                    self.ctx.tap().finish_write(pending, data)
                };
                // Its ticket is released: mutations parked behind it may go now.
                self.issue_parked()?;
                let result = if zeroing { 0 } else { len as i32 };
                match finished {
                    Ok(captured) => self.complete(tag, captured, result),
                    Err(e) => {
                        let (errno, what) = tap_errno(e);
                        self.fail_request(tag, errno, &what)
                    }
                }
            }
            Slot::Flush { captured } => {
                if res < 0 {
                    return self.fail_request(tag, -res, &backing_failed("fdatasync", res));
                }
                self.complete(tag, captured, 0)
            }
            Slot::Idle | Slot::Durable => {
                tracing::error!(
                    dev = self.ctx.dev_id,
                    queue = self.ctx.q_id,
                    tag,
                    "backing completion of a tag with no backing op"
                );
                Ok(())
            }
        }
    }

    /// A failed mutation: its pending state is dropped (regions out of sync, ticket
    /// released), so parked ones may go; then the request fails.
    fn abandon(&mut self, tag: u16, errno: i32, what: &str) -> Result<(), TapError> {
        self.slots[usize::from(tag)] = Slot::Idle;
        self.issue_parked()?;
        self.fail_request(tag, errno, what)
    }

    /// A request's tap step finished: commit now, or after the spool helper's wait.
    fn complete(&mut self, tag: u16, captured: Captured, result: i32) -> Result<(), TapError> {
        if !self.ctx.tap().needs_durable(captured) {
            return self.commit(tag, result);
        }
        self.slots[usize::from(tag)] = Slot::Durable;
        self.to_helper
            .send(Done { tag, captured, result })
            .map_err(|_| self.ctx.fail("the spool helper has ended".into()))
    }

    fn fail_request(&mut self, tag: u16, errno: i32, what: &str) -> Result<(), TapError> {
        self.ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            dev = self.ctx.dev_id,
            queue = self.ctx.q_id,
            tag,
            "request failed: {what}"
        );
        self.commit(tag, -errno)
    }

    /// Commits `tag` with `result` and the next fetch.
    fn commit(&mut self, tag: u16, result: i32) -> Result<(), TapError> {
        self.slots[usize::from(tag)] = Slot::Idle;
        self.ctx.gauge().busy.fetch_sub(1, Ordering::AcqRel);
        self.ring
            .commit_and_fetch(tag, result)
            .map_err(|e| self.ctx.fail(format!("commit of tag {tag}: {e}")))
    }
}

fn backing_failed(what: &str, res: i32) -> String {
    if res < 0 {
        format!("{what} on the protected device: {}", io::Error::from_raw_os_error(-res))
    } else {
        format!("{what} on the protected device: unexpected end of device")
    }
}

/// The errno a failed tap call completes its request with, and the error's whole chain.
fn tap_errno(e: TapError) -> (i32, String) {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    let errno = match &e {
        TapError::OutOfRange { .. } => libc::EINVAL,
        TapError::ReadOnly { .. } => libc::EROFS,
        TapError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        _ => libc::EIO,
    };
    (errno, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_mutation_of_a_read_only_backend_completes_with_erofs() {
        let err = TapError::ReadOnly {
            object: "vsnap lab".into(),
            op: "write of 4096 bytes at 0".into(),
        };
        let (errno, text) = tap_errno(err);
        assert_eq!(errno, libc::EROFS);
        assert!(text.contains("vsnap lab"), "{text}");
        let (errno, _) = tap_errno(TapError::Config("x".into()));
        assert_eq!(errno, libc::EIO);
    }
}
