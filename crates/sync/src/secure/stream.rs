//! The byte streams the secure channel runs over, and the two ways it reads and writes
//! them: against the handshake's deadline, or under the transport's I/O timeout.
//!
//! [`Stream`] is `Read + Write` plus the few socket controls the channel needs: timeouts
//! (so a silent or slow peer cannot hold a handshake or a read forever), shutdown (so a
//! failure closes the connection for both halves of a split channel) and cloning (to split
//! it). It is implemented for `TcpStream`, `UnixStream` and the in-memory [`PipeEnd`].
//!
//! Deadline invariant: during the handshake every single `read` or `write` call is given
//! only the time left until the deadline as its timeout, so a peer that trickles one byte
//! at a time (slow loris) still cannot stretch the handshake past `handshake_timeout`.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::SecureError;
use crate::pipe::PipeEnd;

/// A byte stream with the controls the secure channel needs.
pub trait Stream: Read + Write {
    /// Limits how long a `read` may block; `None` blocks forever. A read that times out
    /// fails with `WouldBlock` or `TimedOut`.
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// Limits how long a `write` may block; `None` blocks forever.
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// Shuts down one or both directions, for every clone of the stream.
    fn shutdown(&self, how: Shutdown) -> io::Result<()>;
    /// Another handle on the same stream (for the other half of a split channel).
    fn try_clone(&self) -> io::Result<Self>
    where
        Self: Sized;
}

impl Stream for TcpStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, timeout)
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        TcpStream::shutdown(self, how)
    }
    fn try_clone(&self) -> io::Result<Self> {
        TcpStream::try_clone(self)
    }
}

impl Stream for UnixStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, timeout)
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        UnixStream::shutdown(self, how)
    }
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }
}

impl Stream for PipeEnd {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        PipeEnd::set_read_timeout(self, timeout);
        Ok(())
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        PipeEnd::set_write_timeout(self, timeout);
        Ok(())
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        PipeEnd::shutdown(self, how);
        Ok(())
    }
    fn try_clone(&self) -> io::Result<Self> {
        Ok(self.clone())
    }
}

/// When the handshake must be over.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    at: Instant,
    limit: Duration,
}

impl Deadline {
    pub(crate) fn after(limit: Duration) -> Self {
        Self { at: Instant::now() + limit, limit }
    }

    fn left(&self, step: &'static str) -> Result<Duration, SecureError> {
        let left = self.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(SecureError::HandshakeTimeout { step, limit: self.limit });
        }
        Ok(left)
    }
}

/// How an I/O call is bounded, and how its failures are named.
#[derive(Clone, Copy)]
pub(crate) enum Phase<'a> {
    /// During the handshake: against the deadline.
    Handshake(&'a Deadline, &'static str),
    /// After it: under the I/O timeout already set on the stream.
    Transport(Option<Duration>),
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

fn map_io(phase: Phase<'_>, op: &dyn Fn() -> String, e: io::Error) -> SecureError {
    match phase {
        Phase::Handshake(d, step) if is_timeout(&e) => {
            SecureError::HandshakeTimeout { step, limit: d.limit }
        }
        Phase::Transport(Some(after)) if is_timeout(&e) => SecureError::Timeout { op: op(), after },
        _ => SecureError::Io { op: op(), source: e },
    }
}

/// One `read` call, bounded as the phase says. Returns 0 only at end of stream.
pub(crate) fn read_some<S: Stream>(
    stream: &mut S,
    buf: &mut [u8],
    phase: Phase<'_>,
    op: &dyn Fn() -> String,
) -> Result<usize, SecureError> {
    loop {
        if let Phase::Handshake(d, step) = phase {
            let left = d.left(step)?;
            stream.set_read_timeout(Some(left)).map_err(|e| map_io(phase, op, e))?;
        }
        match stream.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(map_io(phase, op, e)),
        }
    }
}

/// Fills `buf` unless the stream ends first; returns the bytes read (less than
/// `buf.len()` only at end of stream).
pub(crate) fn read_full<S: Stream>(
    stream: &mut S,
    buf: &mut [u8],
    phase: Phase<'_>,
    op: &dyn Fn() -> String,
) -> Result<usize, SecureError> {
    let mut filled = 0;
    while filled < buf.len() {
        match read_some(stream, &mut buf[filled..], phase, op)? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Writes all of `buf` and flushes.
pub(crate) fn write_all<S: Stream>(
    stream: &mut S,
    buf: &[u8],
    phase: Phase<'_>,
    op: &dyn Fn() -> String,
) -> Result<(), SecureError> {
    let mut written = 0;
    while written < buf.len() {
        if let Phase::Handshake(d, step) = phase {
            let left = d.left(step)?;
            stream.set_write_timeout(Some(left)).map_err(|e| map_io(phase, op, e))?;
        }
        match stream.write(&buf[written..]) {
            Ok(0) => {
                return Err(map_io(phase, op, io::ErrorKind::WriteZero.into()));
            }
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(map_io(phase, op, e)),
        }
    }
    loop {
        match stream.flush() {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(map_io(phase, op, e)),
        }
    }
}

/// A stream that reads from a fixed script and discards what is written: the fuzz
/// harness's peer.
#[derive(Debug)]
pub(crate) struct ScriptedStream<'a> {
    input: &'a [u8],
}

impl<'a> ScriptedStream<'a> {
    pub(crate) fn new(input: &'a [u8]) -> Self {
        Self { input }
    }
}

impl Read for ScriptedStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for ScriptedStream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Stream for ScriptedStream<'_> {
    fn set_read_timeout(&self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
    fn set_write_timeout(&self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
    fn shutdown(&self, _: Shutdown) -> io::Result<()> {
        Ok(())
    }
    fn try_clone(&self) -> io::Result<Self> {
        Ok(Self { input: self.input })
    }
}
