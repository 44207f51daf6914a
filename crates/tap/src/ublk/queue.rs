//! One queue of a ublk device: a ring thread that owns the queue's io_uring, and a small
//! pool of worker threads that serve up to `depth` requests concurrently.
//!
//! **Division of labour.** The ring thread is the only one that talks to the driver (it
//! requires every FETCH and COMMIT of a queue from one task) and the only one that touches
//! the tag buffers: it fetches every tag, decodes each delivered request (a write's data is
//! copied out of its tag buffer into an owned buffer), hands it to the workers over a
//! channel, and commits each finished request with the next fetch (a read's data is copied
//! into its tag buffer first). A worker serves one request at a time: READ from the
//! protected device; WRITE (FUA -> [`Tap::write_fua`]), FLUSH, DISCARD and WRITE_ZEROES
//! through the [`Tap`]. When a worker finishes it sends the result back and writes an
//! eventfd on which the ring keeps a poll armed, so the ring thread wakes up to commit.
//!
//! **Capture order with many requests in flight.** The tap appends a write's event after
//! its backing write and before the tap call returns; the ring thread commits a request
//! only after its worker returned. So *a write is in the spool before the driver learns
//! that it completed*. The block layer issues a FLUSH only after the writes it must cover
//! completed, i.e. after their commits, so their events are already in the spool when the
//! FLUSH reaches a worker, and [`Tap::flush`] appends its barrier after them: a write
//! completed before a flush was issued is ordered before that flush, whatever the number
//! of requests in flight. A write still in flight when the flush arrived may land on either
//! side of the barrier, which the flush promises nothing about. A FLUSH is completed after
//! its barrier is appended and the device synced.
//!
//! **Overlapping mutations.** Two writes (or discards, write-zeroes) in flight together
//! whose ranges overlap could reach the device in one order and the spool in the other if
//! they ran at once. [`ArrivalOrder`] prevents it: each mutation takes a ticket when the ring
//! thread receives it, and a worker starts it only once every earlier mutation overlapping
//! it has finished. Overlapping mutations thus reach the device and the spool in the order
//! the driver delivered them; disjoint ones run concurrently. (The block layer gives
//! concurrent overlapping writes no order; any one order, the same on both sides, is right.)
//! Deadlock-free: jobs leave the channel in ticket order, so the earliest unfinished
//! mutation is always held by a worker that does not wait.
//!
//! **Memory.** The tag buffers take `depth x max_io_bytes`; each request held by the server
//! owns at most one more buffer of its length (the write's data, or the read's result), so
//! at most another `depth x max_io_bytes`. Workers are `min(workers, depth)` threads.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use bytes::Bytes;
use tidemark_journal::BlockIo;

use super::os::{self, QueueRing};
use super::sys;
use crate::capture::Tap;
use crate::error::TapError;

/// How often an idle queue thread looks at the stop flag.
const IDLE_POLL: Duration = Duration::from_millis(200);

/// Live concurrency figures of one queue.
#[derive(Debug, Default)]
pub(super) struct QueueGauge {
    /// Requests being served by workers now.
    pub(super) busy: AtomicU64,
    /// The most requests served by workers at the same time so far.
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

/// What a queue thread works with.
#[derive(Debug, Clone)]
pub(super) struct QueueContext {
    pub(super) dev_id: u32,
    pub(super) q_id: u16,
    pub(super) depth: u16,
    /// Worker threads (at most `depth` are started).
    pub(super) workers: u16,
    pub(super) tap: Arc<Tap>,
    pub(super) device: Arc<dyn BlockIo>,
    pub(super) counters: Arc<Counters>,
    pub(super) stop: Arc<AtomicBool>,
}

impl QueueContext {
    fn gauge(&self) -> &QueueGauge {
        &self.counters.queues[usize::from(self.q_id)]
    }

    fn fail(&self, reason: String) -> TapError {
        TapError::UblkQueue { dev: self.dev_id, queue: self.q_id, reason }
    }
}

/// A decoded request.
#[derive(Debug)]
enum Op {
    Read { offset: u64, len: usize },
    Write { offset: u64, data: Bytes, fua: bool },
    Flush,
    Discard { offset: u64, len: u64 },
    WriteZeroes { offset: u64, len: u64 },
}

/// A request handed to the workers.
#[derive(Debug)]
struct Job {
    tag: u16,
    op: Op,
    /// The mutation's [`ArrivalOrder`] ticket.
    ticket: Option<u64>,
}

/// A served request, back to the ring thread.
#[derive(Debug)]
struct Done {
    tag: u16,
    /// Bytes, or a negative errno.
    result: i32,
    /// A successful read's data.
    data: Option<Vec<u8>>,
}

/// Mutations received and not finished, by ticket (see the module documentation).
#[derive(Debug, Default)]
pub(super) struct ArrivalOrder {
    state: Mutex<OrderState>,
    finished: Condvar,
}

#[derive(Debug, Default)]
struct OrderState {
    next: u64,
    /// `(ticket, start, end)` of each unfinished mutation, in ticket order.
    pending: Vec<(u64, u64, u64)>,
}

impl ArrivalOrder {
    fn lock(&self) -> std::sync::MutexGuard<'_, OrderState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a mutation of `[start, end)`, after every one registered so far; returns
    /// its ticket. Never blocks.
    pub(super) fn enter(&self, start: u64, end: u64) -> u64 {
        let mut state = self.lock();
        let ticket = state.next;
        state.next += 1;
        state.pending.push((ticket, start, end));
        ticket
    }

    /// Whether no earlier unfinished mutation overlaps `ticket`'s range.
    fn may_run_locked(state: &OrderState, ticket: u64) -> bool {
        let Some(&(_, start, end)) = state.pending.iter().find(|p| p.0 == ticket) else {
            return true;
        };
        !state.pending.iter().take_while(|p| p.0 < ticket).any(|&(_, s, e)| s < end && start < e)
    }

    /// Whether `ticket` may start now.
    #[cfg(test)]
    fn may_run(&self, ticket: u64) -> bool {
        Self::may_run_locked(&self.lock(), ticket)
    }

    /// Waits until `ticket` may start.
    pub(super) fn wait_turn(&self, ticket: u64) {
        let mut state = self.lock();
        while !Self::may_run_locked(&state, ticket) {
            state = self.finished.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Marks `ticket` finished, letting the mutations that waited for it start.
    pub(super) fn leave(&self, ticket: u64) {
        let mut state = self.lock();
        if let Some(i) = state.pending.iter().position(|p| p.0 == ticket) {
            state.pending.remove(i);
        }
        drop(state);
        self.finished.notify_all();
    }
}

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
    let (job_tx, job_rx) = mpsc::channel::<Job>();
    let (done_tx, done_rx) = mpsc::channel::<Done>();
    let job_rx = Arc::new(Mutex::new(job_rx));
    let order = Arc::new(ArrivalOrder::default());
    let mut workers = Vec::new();
    for w in 0..ctx.workers.clamp(1, ctx.depth) {
        let (ctx2, jobs, done, wake, order) =
            (ctx.clone(), job_rx.clone(), done_tx.clone(), wake.clone(), order.clone());
        let spawned = thread::Builder::new()
            .name(format!("ublk{}q{}w{w}", ctx.dev_id, ctx.q_id))
            .spawn(move || worker(&ctx2, &jobs, &done, &wake, &order));
        match spawned {
            Ok(handle) => workers.push(handle),
            Err(e) => {
                drop(job_tx);
                join_workers(&ctx, workers);
                let _ = ready.send(Err(ctx.fail(format!("worker thread spawn failed: {e}"))));
                return Err(ctx.fail(format!("worker thread spawn failed: {e}")));
            }
        }
    }
    drop(done_tx);
    let _ = ready.send(Ok(()));
    drop(ready);

    let served = serve(&ctx, ring, &wake, &job_tx, &done_rx, &order);
    // Workers end once the channel is closed and their current request is served.
    drop(job_tx);
    join_workers(&ctx, workers);
    served
}

fn join_workers(ctx: &QueueContext, workers: Vec<JoinHandle<()>>) {
    for handle in workers {
        if handle.join().is_err() {
            tracing::error!(dev = ctx.dev_id, queue = ctx.q_id, "a ublk worker thread panicked");
        }
    }
}

/// The ring thread's loop (see the module documentation).
fn serve(
    ctx: &QueueContext,
    mut ring: QueueRing,
    wake: &File,
    jobs: &Sender<Job>,
    done: &Receiver<Done>,
    order: &ArrivalOrder,
) -> Result<(), TapError> {
    let depth = usize::from(ctx.depth);
    let mut aborted = vec![false; depth];
    let mut finished = 0usize;
    let mut completions = Vec::with_capacity(depth);
    while finished < depth && !ctx.stop.load(Ordering::Acquire) {
        ring.arm_wake(wake.as_raw_fd())
            .map_err(|e| ctx.fail(format!("arming the wake poll: {e}")))?;
        completions.clear();
        ring.wait(IDLE_POLL, &mut completions)
            .map_err(|e| ctx.fail(format!("waiting for requests: {e}")))?;
        for &(tag, res) in &completions {
            if res == sys::IO_RES_OK {
                match decode(ctx, &mut ring, tag) {
                    Ok(op) => {
                        let ticket = match &op {
                            Op::Write { offset, data, .. } => {
                                Some(order.enter(*offset, offset + data.len() as u64))
                            }
                            Op::Discard { offset, len } | Op::WriteZeroes { offset, len } => {
                                Some(order.enter(*offset, offset + len))
                            }
                            Op::Read { .. } | Op::Flush => None,
                        };
                        jobs.send(Job { tag, op, ticket })
                            .map_err(|_| ctx.fail("every worker thread has ended".into()))?;
                    }
                    Err(result) => ring
                        .commit_and_fetch(tag, result)
                        .map_err(|e| ctx.fail(format!("commit of tag {tag}: {e}")))?,
                }
            } else {
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
        }
        // Reset the eventfd before draining: a result sent after the drain writes it again,
        // so the re-armed poll fires at once.
        let mut counter = [0u8; 8];
        match (&*wake).read(&mut counter) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(ctx.fail(format!("reading the wake eventfd: {e}"))),
        }
        while let Ok(served) = done.try_recv() {
            if let Some(data) = served.data {
                ring.buffer(served.tag, data.len()).copy_from_slice(&data);
            }
            ring.commit_and_fetch(served.tag, served.result)
                .map_err(|e| ctx.fail(format!("commit of tag {}: {e}", served.tag)))?;
        }
    }
    Ok(())
}

/// A worker: serves jobs until the channel closes.
fn worker(
    ctx: &QueueContext,
    jobs: &Mutex<Receiver<Job>>,
    done: &Sender<Done>,
    wake: &File,
    order: &ArrivalOrder,
) {
    if let Err(e) = os::set_io_flusher() {
        tracing::debug!(dev = ctx.dev_id, queue = ctx.q_id, "PR_SET_IO_FLUSHER failed: {e}");
    }
    loop {
        // The lock is held only while taking one job: jobs leave in ticket order.
        let job = match jobs.lock().unwrap_or_else(|e| e.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        if let Some(ticket) = job.ticket {
            order.wait_turn(ticket);
        }
        let gauge = ctx.gauge();
        let busy = gauge.busy.fetch_add(1, Ordering::AcqRel) + 1;
        gauge.max_busy.fetch_max(busy, Ordering::AcqRel);
        let tag = job.tag;
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| execute(ctx, job.op)))
                .unwrap_or_else(|_| Err((libc::EIO, "the request's handler panicked".into())));
        gauge.busy.fetch_sub(1, Ordering::AcqRel);
        if let Some(ticket) = job.ticket {
            order.leave(ticket);
        }
        let served = match outcome {
            Ok((result, data)) => Done { tag, result, data },
            Err((errno, what)) => {
                ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(dev = ctx.dev_id, queue = ctx.q_id, tag, "request failed: {what}");
                Done { tag, result: -errno, data: None }
            }
        };
        if done.send(served).is_err() {
            return;
        }
        if let Err(e) = (&*wake).write_all(&1u64.to_ne_bytes()) {
            // Only an overflowing counter fails, which 2^64 - 1 writes would take.
            tracing::error!(dev = ctx.dev_id, queue = ctx.q_id, "waking the ring failed: {e}");
        }
    }
}

type Outcome<T> = Result<T, (i32, String)>;

/// Decodes the request on `tag` and counts it; a request that cannot be served gives the
/// result to commit at once.
fn decode(ctx: &QueueContext, ring: &mut QueueRing, tag: u16) -> Result<Op, i32> {
    let desc = ring.desc(tag);
    let offset = desc.start_sector << 9;
    let len = u64::from(desc.nr_sectors) << 9;
    let c = &ctx.counters;
    let decoded = match desc.op() {
        sys::IO_OP_READ | sys::IO_OP_WRITE if len > ring.buffer_len() as u64 => {
            Err((libc::EINVAL, format!("request of {len} bytes exceeds the tag buffer")))
        }
        sys::IO_OP_READ => {
            c.reads.fetch_add(1, Ordering::Relaxed);
            c.bytes_read.fetch_add(len, Ordering::Relaxed);
            Ok(Op::Read { offset, len: len as usize })
        }
        sys::IO_OP_WRITE => {
            c.writes.fetch_add(1, Ordering::Relaxed);
            c.bytes_written.fetch_add(len, Ordering::Relaxed);
            let fua = desc.op_flags & sys::IO_F_FUA != 0;
            if fua {
                c.fua_writes.fetch_add(1, Ordering::Relaxed);
            }
            let data = Bytes::copy_from_slice(ring.buffer(tag, len as usize));
            Ok(Op::Write { offset, data, fua })
        }
        sys::IO_OP_FLUSH => {
            c.flushes.fetch_add(1, Ordering::Relaxed);
            Ok(Op::Flush)
        }
        sys::IO_OP_DISCARD => {
            c.discards.fetch_add(1, Ordering::Relaxed);
            Ok(Op::Discard { offset, len })
        }
        sys::IO_OP_WRITE_ZEROES => {
            c.write_zeroes.fetch_add(1, Ordering::Relaxed);
            Ok(Op::WriteZeroes { offset, len })
        }
        op => Err((libc::EOPNOTSUPP, format!("operation {op} not supported"))),
    };
    decoded.map_err(|(errno, what)| {
        c.errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            dev = ctx.dev_id,
            queue = ctx.q_id,
            tag,
            op = desc.op(),
            offset,
            len,
            "request refused: {what}"
        );
        -errno
    })
}

/// Serves one request; returns the result to commit and a read's data.
fn execute(ctx: &QueueContext, op: Op) -> Outcome<(i32, Option<Vec<u8>>)> {
    match op {
        Op::Read { offset, len } => {
            let mut buf = vec![0u8; len];
            ctx.device
                .read_at(&mut buf, offset)
                .map_err(|e| (libc::EIO, format!("read of {len} bytes at {offset}: {e}")))?;
            Ok((len as i32, Some(buf)))
        }
        Op::Write { offset, data, fua } => {
            let len = data.len() as i32;
            let captured =
                if fua { ctx.tap.write_fua(offset, data) } else { ctx.tap.write(offset, data) };
            captured.map(|_| (len, None)).map_err(tap_errno)
        }
        Op::Flush => ctx.tap.flush().map(|_| (0, None)).map_err(tap_errno),
        Op::Discard { offset, len } => {
            ctx.tap.discard(offset, len).map(|_| (0, None)).map_err(tap_errno)
        }
        Op::WriteZeroes { offset, len } => {
            ctx.tap.write_zeroes(offset, len).map(|_| (0, None)).map_err(tap_errno)
        }
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
        TapError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        _ => libc::EIO,
    };
    (errno, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mutation_waits_only_for_earlier_overlapping_ones() {
        let order = ArrivalOrder::default();
        let a = order.enter(0, 8192);
        let b = order.enter(4096, 12288); // overlaps a
        let c = order.enter(16384, 20480); // disjoint
        let d = order.enter(8192, 16384); // overlaps b only (ends are exclusive)
        assert!(order.may_run(a));
        assert!(!order.may_run(b));
        assert!(order.may_run(c));
        assert!(!order.may_run(d));
        order.leave(a);
        assert!(order.may_run(b));
        assert!(!order.may_run(d));
        order.leave(b);
        assert!(order.may_run(d));
        // A later mutation does not hold back an earlier one.
        let e = order.enter(0, 1 << 20);
        assert!(order.may_run(c) && order.may_run(d) && !order.may_run(e));
        order.leave(c);
        order.leave(d);
        assert!(order.may_run(e));
    }

    /// Many threads take overlapping tickets in a shuffled order of arrival at the worker
    /// side; each records its ticket when it runs. Whatever the scheduling, tickets that
    /// overlap ran in ticket order.
    #[test]
    fn overlapping_mutations_run_in_ticket_order_under_any_scheduling() {
        let order = Arc::new(ArrivalOrder::default());
        let ran = Arc::new(Mutex::new(Vec::new()));
        // Ranges on a 4-slot line, each covering one or two slots.
        let ranges: Vec<(u64, u64)> =
            (0..64u64).map(|i| (i % 4, i % 4 + 1 + (i % 3) / 2)).collect();
        let tickets: Vec<u64> = ranges.iter().map(|&(s, e)| order.enter(s, e)).collect();
        // Workers start in reverse ticket order: the latest would run first without the wait.
        let handles: Vec<_> = tickets
            .iter()
            .rev()
            .map(|&t| {
                let (order, ran) = (order.clone(), ran.clone());
                thread::spawn(move || {
                    order.wait_turn(t);
                    ran.lock().unwrap().push(t);
                    order.leave(t);
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let ran = ran.lock().unwrap().clone();
        assert_eq!(ran.len(), ranges.len());
        let position = |t: u64| ran.iter().position(|&r| r == t).unwrap();
        for (i, &(s1, e1)) in ranges.iter().enumerate() {
            for (j, &(s2, e2)) in ranges.iter().enumerate().skip(i + 1) {
                if s1 < e2 && s2 < e1 {
                    assert!(
                        position(tickets[i]) < position(tickets[j]),
                        "ticket {} ran after overlapping later ticket {}",
                        tickets[i],
                        tickets[j]
                    );
                }
            }
        }
    }
}
