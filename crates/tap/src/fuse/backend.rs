//! What the FUSE + loop frontend serves: any [`BlockBackend`], a device-like object with
//! positional reads and writes, flush, discard and write-zeroes, a fixed length and a
//! read-only flag. The [`Tap`] is one (the protected volume, every mutation captured); a
//! virtual snapshot of a recovery point (`tidemark_sync::vsnap`) is another.
//!
//! Contract for implementations:
//! - `size` only grows while served, and only a backend whose size grew is followed (the
//!   tap, after [`Tap::grow`]; the frontend reads it per request and
//!   `FuseLoopFrontend::refresh_size` tells the kernel); every request the frontend passes
//!   lies inside `[0, size)` (it checks before calling).
//! - A request returns only once it took effect: a read returns the data, a write, a zeroed
//!   or discarded range is visible to every later read, a flush orders everything completed
//!   before it. The frontend answers the kernel only after the call returned.
//! - A read-only backend ([`BlockBackend::read_only`] true) is never asked to mutate: the
//!   frontend refuses writes with `EROFS`, attaches the loop device read-only and mounts
//!   read-only. It should still refuse with [`TapError::ReadOnly`] if asked.
//! - Overlapping mutations are not called concurrently (the frontend serialises them);
//!   disjoint ones and reads may be.

use bytes::Bytes;

use crate::capture::Tap;
use crate::error::Result;

/// A block device the FUSE + loop frontend can serve (see the module documentation).
pub trait BlockBackend: Send + Sync + std::fmt::Debug {
    /// Size in bytes; it never shrinks while served.
    fn size(&self) -> u64;

    /// Whether the backend takes no mutation.
    fn read_only(&self) -> bool;

    /// Reads `buf.len()` bytes at byte `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Writes `data` at byte `offset`.
    fn write(&self, offset: u64, data: &[u8]) -> Result<()>;

    /// Orders and makes durable everything completed before it (a device flush).
    fn flush(&self) -> Result<()>;

    /// Discards `len` bytes at `offset` (they read back as zeros afterwards).
    fn discard(&self, offset: u64, len: u64) -> Result<()>;

    /// Sets `len` bytes at `offset` to zeros.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;
}

/// The protected volume: reads from the device, every mutation captured (intent mark,
/// pass-through, spool append), flushes as barriers.
impl BlockBackend for Tap {
    fn size(&self) -> u64 {
        self.device_len()
    }

    fn read_only(&self) -> bool {
        false
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        Tap::read(self, offset, buf)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        Tap::write(self, offset, Bytes::copy_from_slice(data)).map(|_| ())
    }

    fn flush(&self) -> Result<()> {
        Tap::flush(self).map(|_| ())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        Tap::discard(self, offset, len).map(|_| ())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        Tap::write_zeroes(self, offset, len).map(|_| ())
    }
}
