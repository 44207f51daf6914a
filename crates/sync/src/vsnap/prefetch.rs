//! Read-ahead of a vsnap's point for a sequential reader: the next [`WINDOW`] bytes are read
//! (base and journal, as [`ReadPlan`]s) by worker threads into memory before they are asked
//! for, several at once, so that a reader at queue depth 1 finds its data ready instead of
//! waiting for the disk once per request.
//!
//! What is kept is the point's content itself, not the base's: a held point reads the same
//! bytes for as long as it is held whatever the log does meanwhile (appends, retention moving
//! the base up to it), so a chunk read ahead never goes stale and needs no invalidation. A
//! read-write vsnap lays its overlay over what comes from here, as over a direct read.
//!
//! Memory: at most [`WINDOW`] / [`CHUNK`] chunks plus the ones the current request spans,
//! and as many spare buffers, per vsnap.
//! A chunk that failed to read is served by a direct read instead, which reports the error.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use tidemark_journal::ReadPlan;

/// Granularity of the read-ahead, in bytes: a chunk is read by one worker with one plan.
pub const CHUNK: u64 = 1 << 20;

/// How far ahead of a sequential reader its point is read, in bytes.
pub const WINDOW: u64 = 16 * CHUNK;

/// The sizes of a read-ahead: [`CHUNK`] and [`WINDOW`] but in tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Bytes read by one worker with one plan.
    pub chunk: u64,
    /// Bytes kept read ahead of a sequential reader (a multiple of `chunk`).
    pub window: u64,
}

impl Default for Shape {
    fn default() -> Shape {
        Shape { chunk: CHUNK, window: WINDOW }
    }
}

/// Worker threads reading chunks (so several disk reads are in flight at once).
const WORKERS: usize = 3;

/// One chunk of the window.
enum Slot {
    /// Planned, being read by a worker.
    Pending,
    /// The point's bytes of the chunk.
    Ready(Arc<Vec<u8>>),
    /// The worker's read failed: readers fall back to a direct read.
    Failed,
}

#[derive(Default)]
struct State {
    /// Chunk number -> slot.
    slots: BTreeMap<u64, Slot>,
    /// Buffers of chunks let go of, for the next reads (bounded by the window).
    spare: Vec<Vec<u8>>,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when a slot leaves `Pending`.
    settled: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A buffer for a chunk of `len` bytes (a spare one when there is one).
    fn buffer(&self, len: usize) -> Vec<u8> {
        let mut buf = self.lock().spare.pop().unwrap_or_default();
        buf.resize(len, 0);
        buf
    }

    /// Puts `slot` in place of chunk `chunk`'s pending slot and wakes the readers waiting.
    /// A chunk let go of meanwhile, or already read by a second plan, is left alone (a
    /// buffer read for it goes to the spares).
    fn settle(&self, chunk: u64, slot: Slot) {
        let mut st = self.lock();
        match st.slots.get_mut(&chunk) {
            Some(s @ Slot::Pending) => *s = slot,
            _ => {
                if let Slot::Ready(data) = slot {
                    if let Ok(buf) = Arc::try_unwrap(data) {
                        st.spare.push(buf);
                    }
                }
            }
        }
        drop(st);
        self.settled.notify_all();
    }
}

/// The read-ahead of one vsnap (see the module documentation).
pub struct Prefetch {
    shape: Shape,
    shared: Arc<Shared>,
    /// Requests served from the window.
    served: AtomicU64,
    /// To the workers; dropped first on drop, which ends them.
    work: Option<Sender<(u64, ReadPlan)>>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Prefetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prefetch").field("workers", &self.workers.len()).finish_non_exhaustive()
    }
}

impl Prefetch {
    /// Starts the workers; `None` if no thread could be started (reads are then all direct).
    pub fn start(name: &str, shape: Shape) -> Option<Prefetch> {
        assert!(
            shape.chunk > 0 && shape.window >= shape.chunk,
            "a read-ahead window of {} bytes in chunks of {}",
            shape.window,
            shape.chunk
        );
        let shared =
            Arc::new(Shared { state: Mutex::new(State::default()), settled: Condvar::new() });
        let (tx, rx) = crossbeam_channel::unbounded::<(u64, ReadPlan)>();
        let mut workers = Vec::with_capacity(WORKERS);
        for i in 0..WORKERS {
            let (shared, rx) = (shared.clone(), rx.clone());
            match std::thread::Builder::new()
                .name(format!("vsnap-ahead-{i}"))
                .spawn(move || work(&shared, &rx))
            {
                Ok(h) => workers.push(h),
                Err(e) => {
                    tracing::warn!(vsnap = name, error = %e, "a vsnap read-ahead worker could not start");
                    break;
                }
            }
        }
        if workers.is_empty() {
            return None;
        }
        Some(Prefetch { shape, shared, served: AtomicU64::new(0), work: Some(tx), workers })
    }

    /// True when the chunk holding `offset` is in the window (so a read there continues a
    /// sequential run).
    pub fn holds(&self, offset: u64) -> bool {
        self.shared.lock().slots.contains_key(&self.chunk_of(offset))
    }

    /// Requests served from the window so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// The chunk holding byte `offset`.
    fn chunk_of(&self, offset: u64) -> u64 {
        offset / self.shape.chunk
    }

    /// For a sequential read of `[offset, end)` of a volume of `len` bytes: lets go of the
    /// chunks behind it and of any outside the window ahead, and returns the ranges
    /// (`(chunk, start, len)`) of the chunks of the window not yet planned, now marked
    /// pending: the caller plans them and hands each to [`Prefetch::submit`] or
    /// [`Prefetch::fail`].
    pub fn wanted(&self, offset: u64, end: u64, len: u64) -> Vec<(u64, u64, u64)> {
        let first = self.chunk_of(end.saturating_sub(1)) + 1;
        let last = self.chunk_of((end + self.shape.window).min(len).saturating_sub(1));
        let keep = self.chunk_of(offset)..=last;
        let mut st = self.shared.lock();
        let gone: Vec<u64> = st.slots.keys().copied().filter(|c| !keep.contains(c)).collect();
        for c in gone {
            if let Some(Slot::Ready(data)) = st.slots.remove(&c) {
                if let Ok(buf) = Arc::try_unwrap(data) {
                    st.spare.push(buf);
                }
            }
        }
        st.spare.truncate((self.shape.window / self.shape.chunk) as usize);
        let mut wanted = Vec::new();
        if end >= len {
            return wanted;
        }
        for c in first..=last {
            if let std::collections::btree_map::Entry::Vacant(v) = st.slots.entry(c) {
                v.insert(Slot::Pending);
                let start = c * self.shape.chunk;
                wanted.push((c, start, (len - start).min(self.shape.chunk)));
            }
        }
        wanted
    }

    /// Hands the plan of chunk `chunk` (from [`Prefetch::wanted`]) to the workers.
    pub fn submit(&self, chunk: u64, plan: ReadPlan) {
        let sent = self.work.as_ref().is_some_and(|tx| tx.send((chunk, plan)).is_ok());
        if !sent {
            self.fail(chunk);
        }
    }

    /// Chunk `chunk` (from [`Prefetch::wanted`]) could not be planned: readers read it
    /// directly.
    pub fn fail(&self, chunk: u64) {
        self.shared.settle(chunk, Slot::Failed);
    }

    /// Copies `[offset, offset + buf.len())` into `buf` from the window, waiting for chunks
    /// still being read; false (with `buf` in any state) when a chunk of it is not in the
    /// window or failed, and the caller must read it directly.
    pub fn serve(&self, offset: u64, buf: &mut [u8]) -> bool {
        let end = offset + buf.len() as u64;
        if buf.is_empty() {
            return true;
        }
        let mut st = self.shared.lock();
        for c in self.chunk_of(offset)..=self.chunk_of(end - 1) {
            let data = loop {
                match st.slots.get(&c) {
                    None | Some(Slot::Failed) => return false,
                    Some(Slot::Ready(d)) => break d.clone(),
                    Some(Slot::Pending) => {
                        st = self.shared.settled.wait(st).unwrap_or_else(|e| e.into_inner())
                    }
                }
            };
            drop(st);
            let start = c * self.shape.chunk;
            let (s, t) = (start.max(offset), (start + data.len() as u64).min(end));
            if t <= s {
                // A chunk shorter than the read asks for (past the volume's end).
                return false;
            }
            buf[(s - offset) as usize..(t - offset) as usize]
                .copy_from_slice(&data[(s - start) as usize..(t - start) as usize]);
            st = self.shared.lock();
        }
        self.served.fetch_add(1, Ordering::Relaxed);
        true
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        self.work = None;
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

/// A worker: reads the chunks it is handed until the sender is dropped.
fn work(shared: &Shared, rx: &Receiver<(u64, ReadPlan)>) {
    for (chunk, plan) in rx {
        let mut buf = shared.buffer(plan.len());
        let slot = match plan.read(&mut buf) {
            Ok(()) => Slot::Ready(Arc::new(buf)),
            Err(e) => {
                tracing::debug!(chunk, error = %e, "vsnap read-ahead failed; the reader reads directly");
                Slot::Failed
            }
        };
        shared.settle(chunk, slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: Shape = Shape { chunk: 4096, window: 4 * 4096 };

    #[test]
    fn the_window_follows_the_reader_and_a_failed_chunk_is_read_directly() {
        let p = Prefetch::start("t", SHAPE).expect("workers");
        let len = 16 * 4096;
        // A read of chunk 0: chunks 1..=4 wanted, and only once.
        let wanted: Vec<u64> = p.wanted(0, 4096, len).into_iter().map(|w| w.0).collect();
        assert_eq!(wanted, [1, 2, 3, 4]);
        assert!(p.wanted(0, 4096, len).is_empty(), "pending chunks were wanted twice");
        assert!(p.holds(4096) && p.holds(4 * 4096) && !p.holds(5 * 4096));
        for c in wanted {
            p.fail(c);
        }
        let mut buf = vec![0u8; 4096];
        assert!(!p.serve(4096, &mut buf), "a failed chunk was served");
        assert!(!p.serve(8 * 4096, &mut buf), "a chunk never wanted was served");
        assert_eq!(p.served(), 0);
        // A jump ahead lets go of everything behind the reader; the last chunk is short of
        // the window, which stops at the volume's end.
        let wanted: Vec<(u64, u64, u64)> = p.wanted(12 * 4096, 12 * 4096 + 100, len);
        assert_eq!(wanted, [(13, 13 * 4096, 4096), (14, 14 * 4096, 4096), (15, 15 * 4096, 4096)]);
        assert!(!p.holds(4096), "chunks behind the reader were kept");
        // At the volume's end, nothing more.
        for (c, _, _) in wanted {
            p.fail(c);
        }
        assert!(p.wanted(15 * 4096, len, len).is_empty());
    }
}
