//! In-memory duplex byte streams: the link of in-process tests and demos, with the hooks a
//! test needs to play the network (take the bytes in flight, alter them, put bytes back).
//!
//! [`duplex`] returns two connected [`PipeEnd`]s. Each direction is a bounded byte queue
//! (writers block when it is full: backpressure as on a socket). Reads block until data
//! arrives, the writer shuts down or is dropped (end of stream), or the read timeout
//! passes (`WouldBlock`, as a socket with `SO_RCVTIMEO`). Clones of an end share its
//! queues; the end closes when its last clone is dropped.
//!
//! Invariant: bytes come out of a direction in the order they went in, except where a test
//! deliberately takes or injects them with [`PipeEnd::take_incoming`] and
//! [`PipeEnd::inject_incoming`].

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One direction: a bounded queue of bytes.
#[derive(Debug)]
struct Pipe {
    state: Mutex<PipeState>,
    changed: Condvar,
}

#[derive(Debug)]
struct PipeState {
    bytes: VecDeque<u8>,
    capacity: usize,
    /// The writer shut down or went away: readers see end of stream once drained.
    writer_closed: bool,
    /// The reader shut down or went away: writers get `BrokenPipe`.
    reader_closed: bool,
}

impl Pipe {
    fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(PipeState {
                bytes: VecDeque::new(),
                capacity,
                writer_closed: false,
                reader_closed: false,
            }),
            changed: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, PipeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn close_writer(&self) {
        self.lock().writer_closed = true;
        self.changed.notify_all();
    }

    fn close_reader(&self) {
        self.lock().reader_closed = true;
        self.changed.notify_all();
    }
}

/// Timeouts shared by the clones of one end.
#[derive(Debug, Default, Clone, Copy)]
struct Timeouts {
    read: Option<Duration>,
    write: Option<Duration>,
}

struct EndInner {
    incoming: Arc<Pipe>,
    outgoing: Arc<Pipe>,
    timeouts: Mutex<Timeouts>,
}

impl Drop for EndInner {
    fn drop(&mut self) {
        self.outgoing.close_writer();
        self.incoming.close_reader();
    }
}

/// One end of an in-memory duplex stream.
#[derive(Clone)]
pub struct PipeEnd {
    inner: Arc<EndInner>,
}

impl fmt::Debug for PipeEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PipeEnd")
            .field("incoming_buffered", &self.incoming_len())
            .finish_non_exhaustive()
    }
}

/// Two connected ends; each direction buffers up to `capacity` bytes.
pub fn duplex(capacity: usize) -> (PipeEnd, PipeEnd) {
    let a_to_b = Pipe::new(capacity.max(1));
    let b_to_a = Pipe::new(capacity.max(1));
    let a = PipeEnd {
        inner: Arc::new(EndInner {
            incoming: b_to_a.clone(),
            outgoing: a_to_b.clone(),
            timeouts: Mutex::default(),
        }),
    };
    let b = PipeEnd {
        inner: Arc::new(EndInner {
            incoming: a_to_b,
            outgoing: b_to_a,
            timeouts: Mutex::default(),
        }),
    };
    (a, b)
}

impl PipeEnd {
    fn timeouts(&self) -> Timeouts {
        *self.inner.timeouts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Limits how long a read blocks (`None`: forever).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) {
        self.inner.timeouts.lock().unwrap_or_else(|e| e.into_inner()).read = timeout;
    }

    /// Limits how long a write blocks on a full queue (`None`: forever).
    pub fn set_write_timeout(&self, timeout: Option<Duration>) {
        self.inner.timeouts.lock().unwrap_or_else(|e| e.into_inner()).write = timeout;
    }

    /// Shuts down reading, writing or both, as a socket does.
    pub fn shutdown(&self, how: Shutdown) {
        if matches!(how, Shutdown::Write | Shutdown::Both) {
            self.inner.outgoing.close_writer();
        }
        if matches!(how, Shutdown::Read | Shutdown::Both) {
            self.inner.incoming.close_reader();
        }
    }

    /// Bytes waiting to be read by this end.
    pub fn incoming_len(&self) -> usize {
        self.inner.incoming.lock().bytes.len()
    }

    /// Removes and returns every byte waiting to be read by this end (the network eating
    /// them, or a test about to alter them).
    pub fn take_incoming(&self) -> Vec<u8> {
        let mut state = self.inner.incoming.lock();
        let bytes = state.bytes.drain(..).collect();
        drop(state);
        self.inner.incoming.changed.notify_all();
        bytes
    }

    /// Queues bytes for this end to read, as if the peer had sent them (ignores the
    /// capacity).
    pub fn inject_incoming(&self, bytes: &[u8]) {
        self.inner.incoming.lock().bytes.extend(bytes);
        self.inner.incoming.changed.notify_all();
    }

    /// Makes this end's reads see end of stream once the bytes queued are read, as if the
    /// peer's writing side went away (a cut connection).
    pub fn end_incoming(&self) {
        self.inner.incoming.close_writer();
    }
}

fn wait<'a>(
    pipe: &'a Pipe,
    guard: MutexGuard<'a, PipeState>,
    until: Option<Instant>,
) -> io::Result<MutexGuard<'a, PipeState>> {
    match until {
        None => Ok(pipe.changed.wait(guard).unwrap_or_else(|e| e.into_inner())),
        Some(at) => {
            let left = at.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::WouldBlock, "pipe timed out"));
            }
            Ok(pipe.changed.wait_timeout(guard, left).unwrap_or_else(|e| e.into_inner()).0)
        }
    }
}

impl Read for PipeEnd {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let pipe = &self.inner.incoming;
        let until = self.timeouts().read.map(|t| Instant::now() + t);
        let mut state = pipe.lock();
        loop {
            if !state.bytes.is_empty() {
                let n = buf.len().min(state.bytes.len());
                for (dst, src) in buf.iter_mut().zip(state.bytes.drain(..n)) {
                    *dst = src;
                }
                drop(state);
                pipe.changed.notify_all();
                return Ok(n);
            }
            if state.writer_closed || state.reader_closed {
                return Ok(0);
            }
            state = wait(pipe, state, until)?;
        }
    }
}

impl Write for PipeEnd {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let pipe = &self.inner.outgoing;
        let until = self.timeouts().write.map(|t| Instant::now() + t);
        let mut state = pipe.lock();
        loop {
            if state.reader_closed || state.writer_closed {
                return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the pipe is closed"));
            }
            let room = state.capacity.saturating_sub(state.bytes.len());
            if room > 0 {
                let n = room.min(buf.len());
                state.bytes.extend(&buf[..n]);
                drop(state);
                pipe.changed.notify_all();
                return Ok(n);
            }
            state = wait(pipe, state, until)?;
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_flow_both_ways_and_end_at_drop() {
        let (mut a, mut b) = duplex(4);
        let writer = std::thread::spawn(move || {
            a.write_all(b"hello world").unwrap();
            let mut back = [0; 2];
            a.read_exact(&mut back).unwrap();
            assert_eq!(&back, b"ok");
        });
        let mut got = [0; 11];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello world");
        b.write_all(b"ok").unwrap();
        writer.join().unwrap();
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        assert_eq!(b.write(b"x").unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn read_timeout_is_would_block() {
        let (_a, mut b) = duplex(16);
        b.set_read_timeout(Some(Duration::from_millis(20)));
        let err = b.read(&mut [0; 4]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn take_and_inject_play_the_network() {
        let (mut a, b) = duplex(64);
        a.write_all(b"abc").unwrap();
        assert_eq!(b.take_incoming(), b"abc");
        b.inject_incoming(b"xyz");
        let mut b2 = b.clone();
        let mut got = [0; 3];
        b2.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"xyz");
    }
}
