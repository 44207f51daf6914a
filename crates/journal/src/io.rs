//! The storage seam: one positional I/O trait for every file and device Tidemark touches
//! (journal segments, the manifest, replicas, base images), and a directory trait for the
//! journal's files.
//!
//! Real storage is [`FsDir`] / [`FileIo`]. [`MemDir`] keeps files in memory with a separate
//! durable image per file, so tests can crash it (dropping or tearing everything not yet
//! synced), fill the disk, or fail a sync at a chosen moment.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Positional block I/O: the only way the journal reads or writes bytes.
pub trait BlockIo: Send + Sync + fmt::Debug {
    /// Reads exactly `buf.len()` bytes at `offset`; a short read is `UnexpectedEof`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, extending the file if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable (fdatasync).
    fn sync(&self) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// True when the length is zero.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncates or extends to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Hints that `len` bytes at `offset`, just written, should start going to the disk now
    /// (so a later [`BlockIo::sync`] finds less to do). No durability promise; the default
    /// does nothing.
    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// Hints that `len` bytes at `offset` will be read soon, so that the reading can start
    /// now, in the background (`POSIX_FADV_WILLNEED` on a file). No promise; the default
    /// does nothing.
    fn will_need(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// The open file descriptor behind this object, for a caller that issues its own I/O on
    /// it (the ublk frontend's io_uring ops). `None` (the default) when there is none, as for
    /// an in-memory volume. The descriptor stays owned by `self`.
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// A name for error messages.
    fn name(&self) -> String;
}

/// `posix_fadvise(fd, offset, len, POSIX_FADV_WILLNEED)`: starts reading the range into the
/// page cache in the background.
pub fn advise_will_need(fd: std::os::fd::RawFd, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Ok(()); // beyond off_t: nothing worth hinting
    };
    // SAFETY: posix_fadvise takes a descriptor and plain integers; it touches no memory of
    // ours.
    let r = unsafe { libc::posix_fadvise(fd, off, len, libc::POSIX_FADV_WILLNEED) };
    if r != 0 { Err(io::Error::from_raw_os_error(r)) } else { Ok(()) }
}

/// Copies `len` bytes at `src_offset` of `src` to `dst_offset` of `dst` inside the kernel
/// (`copy_file_range(2)`: a reflink where the filesystem shares blocks, else a page-cache to
/// page-cache copy, with no trip through user space), as `cp` does. Returns how many bytes
/// it copied: fewer than `len` (from the start) when the pair cannot be copied that way (no
/// descriptor, a block device, two filesystems, an old kernel), for the caller to copy the
/// rest through a buffer. An I/O error is an error.
pub fn copy_range(
    src: &dyn BlockIo,
    src_offset: u64,
    dst: &dyn BlockIo,
    dst_offset: u64,
    len: u64,
) -> io::Result<u64> {
    let (Some(sfd), Some(dfd)) = (src.raw_fd(), dst.raw_fd()) else { return Ok(0) };
    let mut done = 0u64;
    while done < len {
        let (Ok(mut so), Ok(mut d)) =
            (libc::loff_t::try_from(src_offset + done), libc::loff_t::try_from(dst_offset + done))
        else {
            return Ok(done);
        };
        let want = (len - done).min(1 << 30) as usize;
        // SAFETY: copy_file_range on two descriptors owned by live objects, with offsets
        // in local variables that live across the call; it touches no other memory of ours.
        let n = unsafe { libc::copy_file_range(sfd, &mut so, dfd, &mut d, want, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(
                    libc::EINVAL | libc::EXDEV | libc::EOPNOTSUPP | libc::ENOSYS | libc::EBADF,
                ) => Ok(done),
                Some(libc::EINTR) => continue,
                _ => Err(e),
            };
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} ends before {}", src.name(), src_offset + len),
            ));
        }
        done += n as u64;
    }
    Ok(done)
}

/// A flat directory of named files: where a journal keeps its segments and manifest.
pub trait Dir: Send + Sync + fmt::Debug {
    /// Opens a file for reading and writing, creating it (empty) when `create` is set.
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn BlockIo>>;
    /// Names of the files present, sorted.
    fn list(&self) -> io::Result<Vec<String>>;
    /// Removes a file.
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Atomically replaces `to` with `from`.
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Makes creations, removals and renames durable (fsync of the directory).
    fn sync_dir(&self) -> io::Result<()>;
    /// A name for error messages.
    fn name(&self) -> String;
}

/// A file or block device on the real filesystem.
#[derive(Debug)]
pub struct FileIo {
    file: File,
    path: PathBuf,
    is_block_device: bool,
}

impl FileIo {
    /// Opens an existing file or block device for reading and writing.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        Self::from_file(file, path)
    }

    /// Opens an existing file or block device read-only; writes fail with `PermissionDenied`.
    pub fn open_read_only(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path)?;
        Self::from_file(file, path)
    }

    /// Creates (or truncates) a regular file of `len` bytes.
    pub fn create(path: impl AsRef<Path>, len: u64) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file =
            OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
        file.set_len(len)?;
        Self::from_file(file, path)
    }

    fn from_file(file: File, path: PathBuf) -> io::Result<Self> {
        let is_block_device = file.metadata()?.file_type().is_block_device();
        Ok(Self { file, path, is_block_device })
    }

    /// The path this was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl BlockIo for FileIo {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        if self.is_block_device {
            // SAFETY: lseek on a file descriptor we own; it reads no memory of ours.
            let end = unsafe { libc::lseek(self.file.as_raw_fd(), 0, libc::SEEK_END) };
            if end < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(end as u64)
        } else {
            Ok(self.file.metadata()?.len())
        }
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn will_need(&self, offset: u64, len: u64) -> io::Result<()> {
        advise_will_need(self.file.as_raw_fd(), offset, len)
    }

    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.file.as_raw_fd())
    }

    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: sync_file_range on a descriptor we own; it reads no memory of ours.
        let r = unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            // Not every file supports it (block devices on some kernels, FUSE): a hint only.
            if matches!(
                e.raw_os_error(),
                Some(libc::ESPIPE) | Some(libc::EINVAL) | Some(libc::ENOSYS)
            ) {
                return Ok(());
            }
            return Err(e);
        }
        Ok(())
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }
}

/// A directory on the real filesystem.
#[derive(Debug, Clone)]
pub struct FsDir {
    path: PathBuf,
}

impl FsDir {
    /// Uses `path` as the journal directory, creating it when missing.
    pub fn new(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        std::fs::create_dir_all(&path)?;
        Ok(Self { path })
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Dir for FsDir {
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn BlockIo>> {
        let path = self.path.join(name);
        let file = OpenOptions::new().read(true).write(true).create(create).open(&path)?;
        Ok(Arc::new(FileIo::from_file(file, path)?))
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.path)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        std::fs::remove_file(self.path.join(name))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        std::fs::rename(self.path.join(from), self.path.join(to))
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.path)?.sync_all()
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }
}

/// How a [`MemDir`] crash treats data written but not yet synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// Everything not synced is lost.
    LoseUnsynced,
    /// Of the bytes written since the last sync, the first `n` survive (per file, counted from
    /// the durable length; writes below it keep their durable content).
    KeepUnsyncedPrefix(u64),
    /// Everything written survives (the page cache reached the disk before the power cut).
    KeepAll,
}

#[derive(Debug, Default)]
struct MemFileData {
    /// What a reader sees now.
    current: Vec<u8>,
    /// What survives a crash.
    durable: Vec<u8>,
}

#[derive(Debug, Default)]
struct Faults {
    /// Bytes that may still be written before writes fail with ENOSPC.
    space_left: Option<u64>,
    /// Syncs that may still succeed before a sync fails with EIO.
    syncs_left: Option<u64>,
}

#[derive(Debug, Default)]
struct MemState {
    files: BTreeMap<String, Arc<MemFile>>,
    faults: Faults,
}

/// An in-memory file of a [`MemDir`].
#[derive(Debug)]
pub struct MemFile {
    name: String,
    data: Mutex<MemFileData>,
    dir: Arc<Mutex<MemState>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain byte vectors behind, which are
    // still safe to use in a test double.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl BlockIo for MemFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = lock(&self.data);
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start.checked_add(buf.len()).ok_or(io::ErrorKind::UnexpectedEof)?;
        if end > data.current.len() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past end of file"));
        }
        buf.copy_from_slice(&data.current[start..end]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        {
            let mut st = lock(&self.dir);
            if let Some(left) = st.faults.space_left.as_mut() {
                if (buf.len() as u64) > *left {
                    return Err(io::Error::from_raw_os_error(libc::ENOSPC));
                }
                *left -= buf.len() as u64;
            }
        }
        let mut data = lock(&self.data);
        let start = offset as usize;
        let end = start + buf.len();
        if end > data.current.len() {
            data.current.resize(end, 0);
        }
        data.current[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        {
            let mut st = lock(&self.dir);
            if let Some(left) = st.faults.syncs_left.as_mut() {
                if *left == 0 {
                    return Err(io::Error::from_raw_os_error(libc::EIO));
                }
                *left -= 1;
            }
        }
        let mut data = lock(&self.data);
        data.durable = data.current.clone();
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(lock(&self.data).current.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        lock(&self.data).current.resize(len as usize, 0);
        Ok(())
    }

    fn name(&self) -> String {
        format!("mem:{}", self.name)
    }
}

/// An in-memory [`Dir`] that can crash, run out of space and fail syncs.
///
/// Directory operations (create, remove, rename) are durable at once, as on a filesystem
/// mounted with `dirsync`; file contents are durable only after [`BlockIo::sync`].
#[derive(Debug, Clone, Default)]
pub struct MemDir {
    state: Arc<Mutex<MemState>>,
}

impl MemDir {
    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new directory holding what would be on disk after a power cut now.
    pub fn crash(&self, mode: CrashMode) -> MemDir {
        let st = lock(&self.state);
        let out = MemDir::new();
        for (name, file) in &st.files {
            let data = lock(&file.data);
            let bytes = match mode {
                CrashMode::LoseUnsynced => data.durable.clone(),
                CrashMode::KeepAll => data.current.clone(),
                CrashMode::KeepUnsyncedPrefix(n) => {
                    let mut b = data.durable.clone();
                    let keep_to = (data.durable.len() as u64 + n).min(data.current.len() as u64);
                    let from = b.len().min(keep_to as usize);
                    b.extend_from_slice(&data.current[from..keep_to as usize]);
                    b
                }
            };
            out.insert(name, bytes, true);
        }
        out
    }

    /// Puts a file with the given content in place (durable when `durable` is set).
    pub fn insert(&self, name: &str, bytes: Vec<u8>, durable: bool) {
        let file = Arc::new(MemFile {
            name: name.to_owned(),
            data: Mutex::new(MemFileData {
                durable: if durable { bytes.clone() } else { Vec::new() },
                current: bytes,
            }),
            dir: self.state.clone(),
        });
        lock(&self.state).files.insert(name.to_owned(), file);
    }

    /// The current content of a file.
    pub fn read_file(&self, name: &str) -> Option<Vec<u8>> {
        lock(&self.state).files.get(name).map(|f| lock(&f.data).current.clone())
    }

    /// Replaces the current content of a file (for corrupting it in tests).
    pub fn write_file(&self, name: &str, bytes: Vec<u8>) {
        self.insert(name, bytes, true);
    }

    /// After `bytes` more bytes are written, every write fails with ENOSPC; `None` lifts it.
    pub fn set_space_left(&self, bytes: Option<u64>) {
        lock(&self.state).faults.space_left = bytes;
    }

    /// After `n` more successful syncs, every sync fails with EIO; `None` lifts it.
    pub fn set_syncs_left(&self, n: Option<u64>) {
        lock(&self.state).faults.syncs_left = n;
    }

    /// Segment file names, in id order.
    pub fn list_segments(&self) -> Vec<String> {
        lock(&self.state).files.keys().filter(|n| n.ends_with(".seg")).cloned().collect()
    }

    /// Bytes of a file written since its last sync (beyond its durable length).
    pub fn unsynced_bytes(&self, name: &str) -> u64 {
        lock(&self.state).files.get(name).map_or(0, |f| {
            let d = lock(&f.data);
            (d.current.len() as u64).saturating_sub(d.durable.len() as u64)
        })
    }

    /// Total bytes held by all files.
    pub fn total_bytes(&self) -> u64 {
        lock(&self.state).files.values().map(|f| lock(&f.data).current.len() as u64).sum()
    }
}

impl Dir for MemDir {
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn BlockIo>> {
        if let Some(f) = lock(&self.state).files.get(name) {
            return Ok(f.clone());
        }
        if !create {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("{name} not found")));
        }
        self.insert(name, Vec::new(), true);
        Ok(lock(&self.state).files[name].clone())
    }

    fn list(&self) -> io::Result<Vec<String>> {
        Ok(lock(&self.state).files.keys().cloned().collect())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        lock(&self.state)
            .files
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{name} not found")))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut st = lock(&self.state);
        let f = st
            .files
            .remove(from)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{from} not found")))?;
        st.files.insert(to.to_owned(), f);
        Ok(())
    }

    fn sync_dir(&self) -> io::Result<()> {
        Ok(())
    }

    fn name(&self) -> String {
        "mem:/".to_owned()
    }
}

/// A volume held in memory: a base image or replica for tests.
#[derive(Debug, Default)]
pub struct MemVolume {
    data: Mutex<Vec<u8>>,
}

impl MemVolume {
    /// A zero-filled volume of `len` bytes.
    pub fn new(len: u64) -> Self {
        Self { data: Mutex::new(vec![0; len as usize]) }
    }

    /// A copy of the whole content.
    pub fn snapshot(&self) -> Vec<u8> {
        lock(&self.data).clone()
    }
}

impl BlockIo for MemVolume {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = lock(&self.data);
        let s = offset as usize;
        let e = s.checked_add(buf.len()).filter(|&e| e <= d.len());
        let Some(e) = e else {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past end of volume"));
        };
        buf.copy_from_slice(&d[s..e]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut d = lock(&self.data);
        let s = offset as usize;
        let e = s + buf.len();
        if e > d.len() {
            d.resize(e, 0);
        }
        d[s..e].copy_from_slice(buf);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(lock(&self.data).len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        lock(&self.data).resize(len as usize, 0);
        Ok(())
    }

    fn name(&self) -> String {
        "mem-volume".to_owned()
    }
}
