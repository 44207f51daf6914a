//! The read side of a resync: [`BlockSource`], a positional, thread-safe view of a volume,
//! with its real implementation over a file or block device ([`FileSource`]) and an
//! in-memory one ([`MemSource`]).
//!
//! Invariant of every implementation: bytes of `0..len()` outside the ranges
//! [`BlockSource::data_extents`] returns read as zeros. The tree builder relies on it to
//! hash holes without reading them.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::ResyncError;

/// A volume to hash or copy: a fixed length and positional reads, usable from many threads
/// at once.
pub trait BlockSource: Send + Sync {
    /// Length of the volume in bytes.
    fn len(&self) -> u64;

    /// True for a volume of zero bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills `buf` with the bytes at `offset ..offset + buf.len()`, which must lie inside
    /// `0..len()`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// The parts of `range` (clamped to `0..len()`) that may hold data: ascending,
    /// non-overlapping, non-empty ranges. Every byte outside them reads as zero. The
    /// default says that everything is data.
    fn data_extents(&self, range: Range<u64>) -> io::Result<Vec<Range<u64>>> {
        let range = range.start.min(self.len())..range.end.min(self.len());
        Ok(if range.is_empty() { Vec::new() } else { vec![range] })
    }

    /// Hints that `range` will be read soon, so that a source on a disk can start reading
    /// it in the background while the caller hashes what it read before. No promise, no
    /// error; the default does nothing.
    fn will_need(&self, range: Range<u64>) {
        let _ = range;
    }

    /// What the source is, for error messages (a device path, "memory volume").
    fn describe(&self) -> String {
        "block source".to_owned()
    }
}

/// A reference, an `Arc` or a `Box` of a source is that source.
macro_rules! forward_block_source {
    ($($wrapper:ty),+) => {$(
        impl<S: BlockSource + ?Sized> BlockSource for $wrapper {
            fn len(&self) -> u64 {
                (**self).len()
            }
            fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
                (**self).read_at(offset, buf)
            }
            fn data_extents(&self, range: Range<u64>) -> io::Result<Vec<Range<u64>>> {
                (**self).data_extents(range)
            }
            fn will_need(&self, range: Range<u64>) {
                (**self).will_need(range)
            }
            fn describe(&self) -> String {
                (**self).describe()
            }
        }
    )+};
}

forward_block_source!(&S, Arc<S>, Box<S>);

/// Checks that `offset .. offset + len` lies inside a volume of `size` bytes.
pub(crate) fn check_bounds(offset: u64, len: usize, size: u64) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("read of {len} bytes at offset {offset} passes the end ({size} bytes)"),
        )),
    }
}

/// A [`BlockSource`] over a regular file or a block device.
///
/// Reads are `pread(2)`, so any number of threads share one descriptor. For a regular file,
/// [`BlockSource::data_extents`] asks the file system with `lseek(SEEK_DATA / SEEK_HOLE)`,
/// so holes are neither read nor sent. A block device has no such call: every byte is data,
/// except on a loop device, whose unmapped space is the holes of its backing file (a
/// discard on the loop device punches one): there the extents come from the backing file
/// (found through `/sys/dev/block/M:m/loop/`), after one `fdatasync` of the device at open
/// so that nothing written before it sits in the device's page cache unseen by the backing
/// file. (A write after the open is the stream's business: the tap captures it.) The
/// device's `BLKDISCARDZEROES` answer is kept ([`FileSource::discard_zeroes`]); Linux has
/// answered 0 for every device since 4.12, so zero blocks are found by reading them, and
/// the resync leaves them out of what it sends.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    path: PathBuf,
    len: u64,
    device: bool,
    /// For a loop device: its backing file and the loop's offset into it.
    backing: Option<(File, u64)>,
    discard_zeroes: bool,
}

/// `_IO(0x12, 124)`: does a discard leave zeros (deprecated; 0 since Linux 4.12).
const BLKDISCARDZEROES: libc::c_ulong = 0x127c;

/// The backing file and offset of loop device `rdev`, if it is one with a backing file.
fn loop_backing(rdev: u64) -> Option<(File, u64)> {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}/loop"));
    let name = std::fs::read_to_string(sys.join("backing_file")).ok()?;
    let name = name.trim_end_matches('\n');
    if name.ends_with(" (deleted)") {
        return None;
    }
    let offset = std::fs::read_to_string(sys.join("offset")).ok()?.trim().parse().ok()?;
    Some((File::open(name).ok()?, offset))
}

impl FileSource {
    /// Opens `path` read-only.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ResyncError> {
        let path = path.as_ref();
        let file = File::open(path)
            .map_err(|source| ResyncError::Open { path: path.to_owned(), source })?;
        Self::from_file(file, path)
    }

    /// Wraps an open file; `path` is only used in error messages.
    pub fn from_file(file: File, path: impl AsRef<Path>) -> Result<Self, ResyncError> {
        let path = path.as_ref().to_owned();
        let meta =
            file.metadata().map_err(|source| ResyncError::Open { path: path.clone(), source })?;
        let device = meta.file_type().is_block_device();
        let (mut backing, mut discard_zeroes) = (None, false);
        if device {
            let mut answer: libc::c_uint = 0;
            // SAFETY: BLKDISCARDZEROES writes one unsigned int through the pointer, which
            // points at `answer`, alive for the call.
            let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKDISCARDZEROES as _, &mut answer) };
            discard_zeroes = r == 0 && answer != 0;
            use std::os::unix::fs::MetadataExt;
            backing = loop_backing(meta.rdev());
            if backing.is_some() {
                // Push what the device's page cache holds to the backing file, whose extents
                // are then read.
                file.sync_data()
                    .map_err(|source| ResyncError::Open { path: path.clone(), source })?;
            }
        }
        let len = if device {
            // A block device's metadata says 0 bytes; its end is where seeking to the end
            // lands. The file offset is never used for reads (they are positional).
            (&file)
                .seek(SeekFrom::End(0))
                .map_err(|source| ResyncError::Open { path: path.clone(), source })?
        } else {
            meta.len()
        };
        Ok(Self { file, path, len, device, backing, discard_zeroes })
    }

    /// True when the device says that a discard leaves zeros (`BLKDISCARDZEROES`).
    pub fn discard_zeroes(&self) -> bool {
        self.discard_zeroes
    }

    /// True when the data extents of this device come from a loop device's backing file.
    pub fn extents_from_backing_file(&self) -> bool {
        self.backing.is_some()
    }

    /// The path the source was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when the source is a block device.
    pub fn is_device(&self) -> bool {
        self.device
    }

    /// `lseek(fd, offset, whence)`; `None` when there is no such position (`ENXIO`: no data,
    /// or no hole, at or after `offset`).
    fn seek_extent(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset beyond off_t"))?;
        // SAFETY: lseek takes a descriptor this struct owns and plain integers; it touches no
        // memory of ours. It moves the shared file offset, which no read here uses.
        let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
        if r < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(err);
        }
        Ok(Some(r as u64))
    }
}

impl BlockSource for FileSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_bounds(offset, buf.len(), self.len)?;
        self.file.read_exact_at(buf, offset)
    }

    /// Hints only the data extents of `range`: read-ahead over a hole would fill the page
    /// cache with zero pages nobody reads (`hash_chunk` does not read holes).
    fn will_need(&self, range: Range<u64>) {
        let Ok(extents) = self.data_extents(range) else { return };
        for e in extents {
            // The device's own descriptor reads what the device shows: a loop device's
            // extents are positions on the device too.
            let _ = tidemark_journal::io::advise_will_need(
                self.file.as_raw_fd(),
                e.start,
                e.end - e.start,
            );
        }
    }

    fn data_extents(&self, range: Range<u64>) -> io::Result<Vec<Range<u64>>> {
        let (start, end) = (range.start.min(self.len), range.end.min(self.len));
        if start >= end {
            return Ok(Vec::new());
        }
        // Positions in `file` are `shift` bytes past those of the volume.
        let (file, shift) = match (&self.backing, self.device) {
            (_, false) => (&self.file, 0),
            (Some((backing, offset)), true) => (backing, *offset),
            (None, true) => return Ok(std::iter::once(start..end).collect()),
        };
        let file_end = shift + self.len;
        let mut out = Vec::new();
        let mut pos = start;
        while pos < end {
            let data = match Self::seek_extent(file, shift + pos, libc::SEEK_DATA) {
                Ok(Some(d)) => d.max(shift) - shift,
                Ok(None) => break,
                // A file system without SEEK_DATA support: everything is data.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
                    return Ok(std::iter::once(start..end).collect());
                }
                Err(e) => return Err(e),
            };
            if data >= end {
                break;
            }
            let hole = Self::seek_extent(file, shift + data, libc::SEEK_HOLE)?
                .unwrap_or(file_end)
                .min(file_end)
                .max(shift)
                - shift;
            let hole = hole.min(end);
            if hole <= data {
                // The file changed under us (truncated): be conservative.
                out.push(data..end);
                break;
            }
            out.push(data..hole);
            pos = hole;
        }
        Ok(out)
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// An in-memory volume, with optional declared data extents (everything else must be
/// zero). For tests and small images.
#[derive(Debug, Clone, Default)]
pub struct MemSource {
    bytes: Vec<u8>,
    extents: Option<Vec<Range<u64>>>,
}

impl MemSource {
    /// A volume holding `bytes`; every byte counts as data.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self { bytes, extents: None }
    }

    /// A volume holding `bytes` whose data lies in `extents` (sorted, non-overlapping);
    /// the bytes outside them are zeroed so that the [`BlockSource`] invariant holds.
    pub fn with_extents(mut bytes: Vec<u8>, mut extents: Vec<Range<u64>>) -> Self {
        let len = bytes.len() as u64;
        extents.retain(|r| r.start < r.end.min(len));
        for r in &mut extents {
            r.end = r.end.min(len);
        }
        extents.sort_by_key(|r| r.start);
        let mut pos = 0u64;
        for r in &extents {
            if r.start > pos {
                bytes[pos as usize..r.start as usize].fill(0);
            }
            pos = pos.max(r.end);
        }
        bytes[pos as usize..].fill(0);
        Self { bytes, extents: Some(extents) }
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The bytes, to change them (declared extents are not updated).
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.bytes
    }
}

impl BlockSource for MemSource {
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_bounds(offset, buf.len(), self.len())?;
        let start = offset as usize;
        buf.copy_from_slice(&self.bytes[start..start + buf.len()]);
        Ok(())
    }

    fn data_extents(&self, range: Range<u64>) -> io::Result<Vec<Range<u64>>> {
        let range = range.start.min(self.len())..range.end.min(self.len());
        if range.is_empty() {
            return Ok(Vec::new());
        }
        Ok(match &self.extents {
            None => vec![range],
            Some(extents) => intersect(extents, &range),
        })
    }

    fn describe(&self) -> String {
        format!("memory volume of {} bytes", self.bytes.len())
    }
}

/// The parts of sorted, non-overlapping `extents` inside `range`.
pub(crate) fn intersect(extents: &[Range<u64>], range: &Range<u64>) -> Vec<Range<u64>> {
    let first = extents.partition_point(|e| e.end <= range.start);
    extents[first..]
        .iter()
        .take_while(|e| e.start < range.end)
        .map(|e| e.start.max(range.start)..e.end.min(range.end))
        .filter(|r| !r.is_empty())
        .collect()
}

/// True when every byte of `buf` is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(16);
    chunks.by_ref().all(|c| u128::from_ne_bytes(c.try_into().expect("16-byte chunk")) == 0)
        && chunks.remainder().iter().all(|&b| b == 0)
}
