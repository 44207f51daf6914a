//! Simulated disks: a [`SimDisk`] is a [`MemDir`] (a current and a durable image of every
//! file) seen through [`SimDir`], a wrapper that turns a slow disk into simulated time: every
//! sync advances the shared [`ManualClock`] by the disk's current latency.
//!
//! The faults: a crash keeps only what a [`CrashMode`] says survives (unsynced data lost, a
//! torn prefix of it kept, or all of it kept: a process kill rather than a power cut);
//! "disk full" makes every write fail with ENOSPC (through [`MemDir::set_space_left`]);
//! latency makes syncs slow. Directory operations are durable at once (as `MemDir`).
//!
//! Invariant: the simulation never reads a disk's hidden state to decide anything a real
//! process could not see; it only crashes it, fills it, or slows it.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tidemark_journal::{BlockIo, CrashMode, Dir, ManualClock, MemDir};

/// Counters shared by a disk and every file opened on it.
#[derive(Debug, Default)]
pub struct DiskStats {
    /// Syncs (fdatasync) served.
    pub syncs: AtomicU64,
    /// Nanoseconds of simulated latency added to the clock.
    pub latency_ns: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    clock: Arc<ManualClock>,
    /// Simulated latency of one sync, in nanoseconds (0: a fast disk).
    sync_latency_ns: AtomicU64,
    stats: DiskStats,
}

/// One simulated disk (see the module documentation). Cloning gives another handle to the
/// same disk.
#[derive(Debug, Clone)]
pub struct SimDisk {
    mem: MemDir,
    shared: Arc<Shared>,
}

impl SimDisk {
    /// An empty disk whose syncs advance `clock`.
    pub fn new(clock: Arc<ManualClock>) -> Self {
        let shared =
            Shared { clock, sync_latency_ns: AtomicU64::new(0), stats: DiskStats::default() };
        Self { mem: MemDir::new(), shared: Arc::new(shared) }
    }

    /// The directory a process opens its journal in.
    pub fn dir(&self) -> Arc<dyn Dir> {
        Arc::new(SimDir { mem: self.mem.clone(), shared: self.shared.clone() })
    }

    /// A file of the disk (created durable and zero-filled to `len` bytes when absent).
    pub fn file(&self, name: &str, len: u64) -> Arc<dyn BlockIo> {
        if self.mem.read_file(name).is_none() {
            self.mem.insert(name, vec![0; len as usize], true);
        }
        let inner = self.mem.open(name, false).expect("the file was just created");
        Arc::new(SimFile { inner, shared: self.shared.clone() })
    }

    /// The disk after a power cut or a process kill now: what `mode` says survives. The
    /// old handles keep the old image; the process must reopen everything.
    pub fn crash(&mut self, mode: CrashMode) {
        let crashed = self.mem.crash(mode);
        let old = std::mem::replace(&mut self.mem, crashed);
        wipe(&old);
    }

    /// Removes every file: the end of a run (see [`wipe`]).
    pub fn wipe(&self) {
        wipe(&self.mem);
    }

    /// Fills the disk (every write fails with ENOSPC) or frees it.
    pub fn set_full(&self, full: bool) {
        self.mem.set_space_left(full.then_some(0));
    }

    /// Sets the simulated latency of one sync.
    pub fn set_sync_latency(&self, latency: Duration) {
        self.shared.sync_latency_ns.store(latency.as_nanos() as u64, Ordering::SeqCst);
    }

    /// Counters.
    pub fn stats(&self) -> &DiskStats {
        &self.shared.stats
    }

    /// The current content of a file.
    pub fn read_file(&self, name: &str) -> Option<Vec<u8>> {
        self.mem.read_file(name)
    }
}

/// Removes every file of `mem`. A `MemDir`'s files and its state refer to each other, so an
/// image is only freed once its files are removed; without this every crash (a new image)
/// and every run would keep its bytes until the process ends.
fn wipe(mem: &MemDir) {
    for name in mem.list().unwrap_or_default() {
        let _ = mem.remove(&name);
    }
}

impl Shared {
    fn on_sync(&self) {
        let ns = self.sync_latency_ns.load(Ordering::SeqCst);
        self.stats.syncs.fetch_add(1, Ordering::SeqCst);
        if ns > 0 {
            self.clock.advance(Duration::from_nanos(ns));
            self.stats.latency_ns.fetch_add(ns, Ordering::SeqCst);
        }
    }
}

/// The [`Dir`] of a [`SimDisk`].
#[derive(Debug)]
struct SimDir {
    mem: MemDir,
    shared: Arc<Shared>,
}

impl Dir for SimDir {
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn BlockIo>> {
        let inner = self.mem.open(name, create)?;
        Ok(Arc::new(SimFile { inner, shared: self.shared.clone() }))
    }
    fn list(&self) -> io::Result<Vec<String>> {
        self.mem.list()
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        self.mem.remove(name)
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.mem.rename(from, to)
    }
    fn sync_dir(&self) -> io::Result<()> {
        self.shared.on_sync();
        self.mem.sync_dir()
    }
    fn name(&self) -> String {
        format!("sim{}", self.mem.name())
    }
}

/// A file of a [`SimDisk`]: the in-memory file, with slow syncs.
#[derive(Debug)]
struct SimFile {
    inner: Arc<dyn BlockIo>,
    shared: Arc<Shared>,
}

impl BlockIo for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.shared.on_sync();
        self.inner.sync()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn name(&self) -> String {
        format!("sim-{}", self.inner.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_journal::{Clock, Nanos};

    #[test]
    fn crash_loses_unsynced_and_slow_sync_moves_the_clock() {
        let clock = Arc::new(ManualClock::new(Nanos(0)));
        let mut disk = SimDisk::new(clock.clone());
        let f = disk.file("dev", 8);
        f.write_at(b"abcd", 0).unwrap();
        f.sync().unwrap();
        f.write_at(b"wxyz", 4).unwrap();
        disk.set_sync_latency(Duration::from_millis(5));
        disk.dir().sync_dir().unwrap();
        assert_eq!(clock.now(), Nanos(5_000_000));
        disk.crash(CrashMode::LoseUnsynced);
        assert_eq!(disk.read_file("dev").unwrap(), b"abcd\0\0\0\0");
        disk.set_full(true);
        let err = disk.file("dev", 8).write_at(b"x", 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(28), "ENOSPC expected, got {err}");
    }
}
