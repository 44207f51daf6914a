//! One queue of a ublk device: its thread fetches every tag, then loops on completions,
//! handling each request against the tap and committing its result with the next fetch.
//!
//! Requests are handled one at a time, in completion order, on the queue's thread: the
//! tap's calls are synchronous (intent mark, backing write, spool append), so more
//! concurrency comes from more queues. READ is served from the protected device directly;
//! WRITE, FLUSH, DISCARD and WRITE_ZEROES go through the [`Tap`], so they are captured in
//! the order the tap's rule gives; a write with FUA becomes [`Tap::write_fua`] (durable,
//! then a barrier).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::time::Duration;

use bytes::Bytes;
use tidemark_journal::BlockIo;

use super::os::{self, QueueRing};
use super::sys;
use crate::capture::Tap;
use crate::error::TapError;

/// How often an idle queue thread looks at the stop flag.
const IDLE_POLL: Duration = Duration::from_millis(200);

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
}

/// What a queue thread works with.
#[derive(Debug, Clone)]
pub(super) struct QueueContext {
    pub(super) dev_id: u32,
    pub(super) q_id: u16,
    pub(super) depth: u16,
    pub(super) tap: Arc<Tap>,
    pub(super) device: Arc<dyn BlockIo>,
    pub(super) counters: Arc<Counters>,
    pub(super) stop: Arc<AtomicBool>,
}

/// The queue thread's body: sets up, fetches every tag, reports readiness on `ready`, then
/// serves requests until the driver aborts every tag or `stop` is set.
pub(super) fn run(
    ctx: QueueContext,
    char_dev: Arc<std::fs::File>,
    buf_bytes: usize,
    ready: SyncSender<Result<(), TapError>>,
) -> Result<(), TapError> {
    let fail = |reason: String| TapError::UblkQueue { dev: ctx.dev_id, queue: ctx.q_id, reason };
    let setup = || -> io::Result<QueueRing> {
        if let Err(e) = os::set_io_flusher() {
            // Only a risk under memory pressure; older kernels lack the prctl.
            tracing::warn!(dev = ctx.dev_id, queue = ctx.q_id, "PR_SET_IO_FLUSHER failed: {e}");
        }
        let mut ring = QueueRing::new(&char_dev, ctx.q_id, ctx.depth, buf_bytes)?;
        for tag in 0..ctx.depth {
            ring.fetch(tag)?;
        }
        ring.submit()?;
        Ok(ring)
    };
    let mut ring = match setup() {
        Ok(ring) => {
            let _ = ready.send(Ok(()));
            ring
        }
        Err(e) => {
            let _ = ready.send(Err(fail(format!("setup failed: {e}"))));
            return Err(fail(format!("setup failed: {e}")));
        }
    };
    drop(ready);

    let mut done = vec![false; usize::from(ctx.depth)];
    let mut finished = 0usize;
    let mut completions = Vec::with_capacity(usize::from(ctx.depth));
    while finished < done.len() && !ctx.stop.load(Ordering::Acquire) {
        completions.clear();
        ring.wait(IDLE_POLL, &mut completions)
            .map_err(|e| fail(format!("waiting for requests: {e}")))?;
        for &(tag, res) in &completions {
            if res == sys::IO_RES_OK {
                let result = handle(&ctx, &mut ring, tag);
                ring.commit_and_fetch(tag, result)
                    .map_err(|e| fail(format!("commit of tag {tag}: {e}")))?;
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
                if !std::mem::replace(&mut done[usize::from(tag)], true) {
                    finished += 1;
                }
            }
        }
    }
    Ok(())
}

/// Handles the request on `tag`; returns the result to commit (bytes, or a negative errno).
fn handle(ctx: &QueueContext, ring: &mut QueueRing, tag: u16) -> i32 {
    let desc = ring.desc(tag);
    let offset = desc.start_sector << 9;
    let len = u64::from(desc.nr_sectors) << 9;
    let c = &ctx.counters;
    let outcome = match desc.op() {
        sys::IO_OP_READ | sys::IO_OP_WRITE if len > ring.buffer_len() as u64 => {
            Err((libc::EINVAL, format!("request of {len} bytes exceeds the tag buffer")))
        }
        sys::IO_OP_READ => {
            c.reads.fetch_add(1, Ordering::Relaxed);
            c.bytes_read.fetch_add(len, Ordering::Relaxed);
            let buf = ring.buffer(tag, len as usize);
            ctx.device.read_at(buf, offset).map_err(|e| (libc::EIO, format!("read: {e}")))
        }
        sys::IO_OP_WRITE => {
            c.writes.fetch_add(1, Ordering::Relaxed);
            c.bytes_written.fetch_add(len, Ordering::Relaxed);
            let data = Bytes::copy_from_slice(ring.buffer(tag, len as usize));
            let captured = if desc.op_flags & sys::IO_F_FUA != 0 {
                c.fua_writes.fetch_add(1, Ordering::Relaxed);
                ctx.tap.write_fua(offset, data)
            } else {
                ctx.tap.write(offset, data)
            };
            captured.map(drop).map_err(tap_errno)
        }
        sys::IO_OP_FLUSH => {
            c.flushes.fetch_add(1, Ordering::Relaxed);
            ctx.tap.flush().map(drop).map_err(tap_errno)
        }
        sys::IO_OP_DISCARD => {
            c.discards.fetch_add(1, Ordering::Relaxed);
            ctx.tap.discard(offset, len).map(drop).map_err(tap_errno)
        }
        sys::IO_OP_WRITE_ZEROES => {
            c.write_zeroes.fetch_add(1, Ordering::Relaxed);
            ctx.tap.write_zeroes(offset, len).map(drop).map_err(tap_errno)
        }
        op => Err((libc::EOPNOTSUPP, format!("operation {op} not supported"))),
    };
    match outcome {
        Ok(()) => match desc.op() {
            sys::IO_OP_READ | sys::IO_OP_WRITE => len as i32,
            _ => 0,
        },
        Err((errno, what)) => {
            c.errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                dev = ctx.dev_id,
                queue = ctx.q_id,
                tag,
                op = desc.op(),
                offset,
                len,
                "request failed: {what}"
            );
            -errno
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
