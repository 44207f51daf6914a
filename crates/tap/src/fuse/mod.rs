//! The FUSE + loop frontend: the protected volume exposed as one regular file on a FUSE
//! mount, with a loop device attached to it; the application uses the loop device and
//! every block request it issues reaches the [`Tap`]. This is the fallback for kernels
//! without `ublk_drv` (issue 4); the ublk frontend is the primary one (see "Agent crash").
//!
//! The frontend serves any [`BlockBackend`] ([`FuseLoopFrontend::start_backend`]); the tap
//! is the one described below. A read-only backend gets a read-only file (writes refused
//! with `EROFS`), a read-only mount and a read-only loop device: that is how the target
//! exposes a virtual snapshot of a recovery point.
//!
//! ```text
//!  application / filesystem
//!        | bio
//!  /dev/loopN  (loop driver, LO_FLAGS_DIRECT_IO when the kernel allows it)
//!        | read_iter / write_iter / vfs_fsync / fallocate on <mountpoint>/volume
//!  FUSE (FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES, FUSE_ASYNC_DIO)
//!        | READ / WRITE / FSYNC / FALLOCATE requests, served by `threads` threads
//!  VolumeFs -> Tap: intent mark, pass-through to the protected device, spool append
//! ```
//!
//! # How block requests map (Linux 6.18, measured by `tests/fuse_loop.rs`)
//!
//! | at `/dev/loopN` | the loop driver on the file | FUSE request | tap |
//! |---|---|---|---|
//! | READ | `read_iter` | `READ` | [`Tap::read`] |
//! | WRITE | `write_iter` | `WRITE` (split at `max_write`) | [`Tap::write`] |
//! | FLUSH / PREFLUSH | `vfs_fsync` | `FSYNC` | [`Tap::flush`] (barrier, device sync) |
//! | FUA | not advertised by loop over a file (`queue/fua` is 0): the block layer turns it into the write followed by a flush | `WRITE`, then `FSYNC` | write, then barrier |
//! | DISCARD | `fallocate(PUNCH_HOLE \| KEEP_SIZE)` | `FALLOCATE` | [`Tap::discard`] |
//! | WRITE_ZEROES | `fallocate(ZERO_RANGE \| KEEP_SIZE)` with `REQ_NOUNMAP`, else `fallocate(PUNCH_HOLE \| KEEP_SIZE)` | `FALLOCATE` | [`Tap::write_zeroes`] or [`Tap::discard`] |
//!
//! The loop driver offers discard and write-zeroes for a file-backed device when the file
//! has `fallocate` and `statfs` works on its filesystem; the granularity is `statfs`'s
//! block size (4096 here). Both end in zeros on the protected device and in the replica
//! (the tap writes zeros for a discard). A close of the file (`FLUSH`) is also a barrier:
//! every write through that descriptor has completed. (`fallocate(2)` on `/dev/loopN`
//! itself is followed by a flush on this kernel, so it also gives a barrier.)
//!
//! # Cost
//!
//! Each write crosses the kernel twice (loop to FUSE, FUSE to the server), is copied out of
//! the FUSE request buffer into the event, passed through to the device and appended to the
//! spool; the intent map costs one durable map write per newly hot region. The ignored test
//! `throughput_dd_fuse_loop_vs_plain_loop` in `tests/fuse_loop.rs` measures 1 MiB direct
//! writes against a plain loop device over a plain file on the same filesystem.
//!
//! # Ordering
//!
//! The tap's rule is that a write completed before a flush was issued is ordered before
//! that flush's barrier. Here a block request completes when the FUSE reply arrives, and
//! the reply is sent only after the tap call returned, so after the spool append. A flush
//! reaches the server as `FSYNC` only after the block layer issued it, which the filesystem
//! above does after the writes it covers completed; the barrier is appended then. Requests
//! served concurrently by several threads may be appended in any order among themselves,
//! as a device may persist them in any order. Overlapping mutations in flight together are
//! run one after the other (`volume::InFlight`) so that the device and the spool see them
//! in the same order.
//!
//! # Direct I/O
//!
//! - `FOPEN_DIRECT_IO` on the volume file: no FUSE page cache, so nothing absorbs, merges,
//!   delays or reorders writes between the loop driver and the tap, reads always come from
//!   the device, and there is no writeback to race a flush. Even when the loop device runs
//!   buffered, its writes go straight through.
//! - `FOPEN_PARALLEL_DIRECT_WRITES`: without it the FUSE kernel takes the inode lock
//!   exclusively for every direct write, serialising the loop driver's queue.
//! - `LO_FLAGS_DIRECT_IO` on the loop device (asked for, reported by
//!   [`LoopDevice::direct_io`]): the loop driver submits asynchronous `IOCB_DIRECT` requests,
//!   many in flight, which `FUSE_ASYNC_DIO` sends to the serving threads concurrently;
//!   without it, loop writes one request at a time per worker through `write_iter`. It also
//!   avoids a second copy of the data in the loop device's backing page cache.
//!
//! # Agent crash
//!
//! When the agent dies, the kernel closes its `/dev/fuse` descriptors and aborts the FUSE
//! connection: every pending and later request on the volume file fails with `ENOTCONN`,
//! the loop driver completes the block requests with `EIO`, and the filesystem on
//! `/dev/loopN` sees I/O errors (ext4 aborts its journal and goes read-only, or panics,
//! according to `errors=`). Nothing can reconnect a new server to the old loop device: the
//! application must unmount and start over on the new device. Nothing is lost for
//! replication (the intent map marked every region before its write was passed through),
//! but the application's availability is. That is why ublk with `UBLK_F_USER_RECOVERY`,
//! where the device stays and I/O waits for a restarted agent, is the primary frontend.
//!
//! The dead mount stays in the mount table ("transport endpoint is not connected"). The
//! next [`FuseLoopFrontend::start`] at the same mount point detects it, detaches any loop
//! device still bound to a file under it, lazily unmounts it and mounts afresh; a live mount
//! there is refused with [`TapError::MountPointBusy`].
//!
//! # Teardown
//!
//! [`FuseLoopFrontend::shutdown`] (or drop) detaches the loop device (the kernel defers it
//! while someone else has the device open), unmounts the FUSE filesystem, retrying while it
//! is busy for up to [`FuseLoopConfig::shutdown_timeout`], and joins the serving threads.
//! If the volume is still in use then, it aborts the FUSE connection (`MNT_FORCE`): the
//! remaining users get I/O errors, as after a crash, and the call reports
//! [`TapError::TeardownForced`].

mod backend;
mod loopdev;
mod volume;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{BackgroundSession, Config, MountOption, Session, SessionACL};
use nix::errno::Errno;
use nix::mount::{MntFlags, umount2};

pub use backend::BlockBackend;
pub use loopdev::{LoopDevice, LoopOptions};
pub use volume::FuseCounters;

use crate::capture::Tap;
use crate::error::{Result, TapError};
use volume::{Counters, KernelSettings, VolumeFs};

/// Settings of a [`FuseLoopFrontend`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FuseLoopConfig {
    /// Where the FUSE filesystem is mounted (created when missing).
    pub mountpoint: PathBuf,
    /// Name of the volume file in it.
    pub file_name: String,
    /// Threads serving FUSE requests (each with its own cloned `/dev/fuse` descriptor).
    pub threads: usize,
    /// Largest FUSE write request in bytes (the kernel caps it at its `max_pages_limit`,
    /// 1 MiB by default).
    pub max_write: u32,
    /// Most asynchronous FUSE requests in flight (the loop driver's direct I/O).
    pub max_background: u16,
    /// Attach a loop device; without one the volume is only the file (for a VMM).
    pub attach_loop: bool,
    /// How the loop device is attached.
    pub loop_options: LoopOptions,
    /// How long the teardown waits for the volume to be let go before it aborts the FUSE
    /// connection.
    pub shutdown_timeout: Duration,
}

impl FuseLoopConfig {
    /// Defaults for a mount at `mountpoint`.
    pub fn new(mountpoint: impl Into<PathBuf>) -> Self {
        Self {
            mountpoint: mountpoint.into(),
            file_name: "volume".into(),
            threads: 4,
            max_write: 1 << 20,
            max_background: 64,
            attach_loop: true,
            loop_options: LoopOptions::default(),
            shutdown_timeout: Duration::from_secs(5),
        }
    }
}

/// The FUSE + loop frontend of one protected volume (see the module documentation):
/// mounted and served in background threads from [`FuseLoopFrontend::start`] until
/// [`FuseLoopFrontend::shutdown`] or drop.
#[derive(Debug)]
pub struct FuseLoopFrontend {
    mountpoint: PathBuf,
    volume: PathBuf,
    session: Option<BackgroundSession>,
    loop_device: Option<LoopDevice>,
    counters: Arc<Counters>,
    shutdown_timeout: Duration,
}

impl FuseLoopFrontend {
    /// Mounts the volume file of `tap`'s device at `cfg.mountpoint`, serves it, and attaches
    /// a loop device to it. A dead mount left there by a crashed run is cleared first.
    pub fn start(tap: Arc<Tap>, cfg: FuseLoopConfig) -> Result<FuseLoopFrontend> {
        Self::start_backend(tap, cfg)
    }

    /// Mounts a volume file serving `backend` at `cfg.mountpoint` and attaches a loop
    /// device to it, as [`FuseLoopFrontend::start`] does for a tap. A read-only backend is
    /// mounted read-only and its loop device attached read-only whatever
    /// `cfg.loop_options` says.
    pub fn start_backend(
        backend: Arc<dyn BlockBackend>,
        mut cfg: FuseLoopConfig,
    ) -> Result<FuseLoopFrontend> {
        let read_only = backend.read_only();
        if read_only {
            cfg.loop_options.read_only = true;
        }
        if cfg.threads == 0 {
            return Err(TapError::Config("FUSE frontend needs at least one thread".into()));
        }
        if cfg.file_name.is_empty() || cfg.file_name.contains('/') {
            return Err(TapError::Config(format!(
                "volume file name {:?} must be a non-empty name without '/'",
                cfg.file_name
            )));
        }
        let mountpoint = prepare_mountpoint(&cfg.mountpoint)?;
        clear_stale_mount(&mountpoint)?;

        let counters = Arc::new(Counters::default());
        let settings =
            KernelSettings { max_write: cfg.max_write, max_background: cfg.max_background };
        let fs = VolumeFs::new(backend, cfg.file_name.clone(), settings, counters.clone());
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("tidemark".into()),
            // Passed to the kernel (fuser's `Subtype` only reaches fusermount): the mount
            // shows as `fuse.tidemark`.
            MountOption::CUSTOM("subtype=tidemark".into()),
            MountOption::NoAtime,
            MountOption::NoExec,
        ];
        if read_only {
            config.mount_options.push(MountOption::RO);
        }
        // Only the agent's user reaches the file (no allow_other): the volume is the
        // protected device's contents.
        config.acl = SessionACL::Owner;
        config.n_threads = Some(cfg.threads);
        config.clone_fd = true;
        let object = format!("mount point {}", mountpoint.display());
        let session = Session::new(fs, &mountpoint, &config).map_err(|source| TapError::Io {
            op: "FUSE mount",
            object: object.clone(),
            source,
        })?;
        let session = session.spawn().map_err(|source| TapError::Io {
            op: "start FUSE serving threads",
            object,
            source,
        })?;

        let volume = mountpoint.join(&cfg.file_name);
        // From here on, drop tears down whatever is up.
        let mut frontend = FuseLoopFrontend {
            mountpoint,
            volume,
            session: Some(session),
            loop_device: None,
            counters,
            shutdown_timeout: cfg.shutdown_timeout,
        };
        if cfg.attach_loop {
            frontend.loop_device = Some(LoopDevice::attach(&frontend.volume, cfg.loop_options)?);
        }
        tracing::info!(
            mountpoint = %frontend.mountpoint.display(),
            device = ?frontend.device_path(),
            direct_io = frontend.loop_device.as_ref().map(LoopDevice::direct_io),
            "FUSE + loop frontend up"
        );
        Ok(frontend)
    }

    /// The loop device the application uses (`/dev/loopN`), when one is attached.
    pub fn device_path(&self) -> Option<&Path> {
        self.loop_device.as_ref().map(LoopDevice::path)
    }

    /// The loop device, when one is attached.
    pub fn loop_device(&self) -> Option<&LoopDevice> {
        self.loop_device.as_ref()
    }

    /// The volume file on the FUSE mount.
    pub fn volume_path(&self) -> &Path {
        &self.volume
    }

    /// The mount point.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The backend grew ([`crate::Tap::grow`]): the kernel drops the volume file's cached
    /// attributes (a FUSE inode notification), so the file shows the new size, and the
    /// loop device takes it (`LOOP_SET_CAPACITY`). Returns the loop device's size
    /// afterwards (the file's size without a loop device). Writes into the new range are
    /// captured as soon as the tap serves the new size, whatever the kernel knows.
    pub fn refresh_size(&self) -> Result<u64> {
        if let Some(session) = self.session.as_ref() {
            // Offset -1: the attributes only, the page cache of the old range stays.
            session.notifier().inval_inode(volume::VOLUME, -1, 0).map_err(|source| {
                TapError::Io {
                    op: "FUSE inode notification",
                    object: self.volume.display().to_string(),
                    source,
                }
            })?;
        }
        // A stat makes the kernel ask again and take the new size into the inode, which is
        // what the loop driver reads.
        let file_len = std::fs::metadata(&self.volume).map(|m| m.len()).map_err(|source| {
            TapError::Io { op: "stat", object: self.volume.display().to_string(), source }
        })?;
        match self.loop_device.as_ref() {
            Some(l) => l.set_capacity(),
            None => Ok(file_len),
        }
    }

    /// Requests served so far.
    pub fn counters(&self) -> FuseCounters {
        self.counters.snapshot()
    }

    /// Detaches the loop device, unmounts and joins the serving threads (see "Teardown" in
    /// the module documentation). Everything is torn down even when this returns an error.
    pub fn shutdown(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        let Some(session) = self.session.take() else { return Ok(()) };
        let mut first_err = None;
        let loop_name = self.loop_device.as_ref().map(|l| l.path().display().to_string());
        let mut loop_device = self.loop_device.take();
        if let Some(l) = loop_device.as_mut() {
            if let Err(e) = l.detach() {
                first_err.get_or_insert(e);
            }
        }
        let deadline = Instant::now() + self.shutdown_timeout;
        let loop_bound = || loop_device.as_ref().is_some_and(LoopDevice::is_bound);
        match self.unmount(deadline, loop_bound) {
            Ok(Unmounted::Cleanly) => {}
            Ok(Unmounted::Forced { loop_bound }) => {
                let holder = match (loop_bound, loop_name) {
                    (true, Some(name)) => {
                        format!("loop device {name} is still open by another user")
                    }
                    _ => format!("the volume file {} is still open", self.volume.display()),
                };
                first_err.get_or_insert(TapError::TeardownForced {
                    mountpoint: self.mountpoint.display().to_string(),
                    holder,
                    waited_ms: self.shutdown_timeout.as_millis() as u64,
                });
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
        // The loop device's handle is already closed; dropping it does nothing more.
        drop(loop_device);
        if let Err(e) = self.join(session, deadline + self.shutdown_timeout) {
            first_err.get_or_insert(e);
        }
        match first_err {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// Unmounts, retrying while busy until `deadline`, then aborting the connection.
    /// `loop_bound` tells whether the loop device still holds the volume; it is asked just
    /// before a forced unmount, to say who kept the volume busy.
    fn unmount(&self, deadline: Instant, loop_bound: impl Fn() -> bool) -> Result<Unmounted> {
        loop {
            match umount2(&self.mountpoint, MntFlags::empty()) {
                // EINVAL: not a mount point any more (someone unmounted it).
                Ok(()) | Err(Errno::EINVAL) => return Ok(Unmounted::Cleanly),
                Err(Errno::EBUSY) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(Errno::EBUSY) => {
                    let loop_bound = loop_bound();
                    self.force_unmount()?;
                    return Ok(Unmounted::Forced { loop_bound });
                }
                Err(e) => {
                    let first = TapError::Io {
                        op: "unmount",
                        object: format!("FUSE mount {}", self.mountpoint.display()),
                        source: io::Error::from(e),
                    };
                    // Still make sure the serving threads can end.
                    let _ = self.force_unmount();
                    return Err(first);
                }
            }
        }
    }

    /// `MNT_FORCE` makes the FUSE kernel abort the connection (pending and later requests
    /// fail, the serving threads see the device end); `MNT_DETACH` removes the mount now.
    fn force_unmount(&self) -> Result<()> {
        tracing::warn!(
            mountpoint = %self.mountpoint.display(),
            "FUSE frontend: volume still in use, aborting the FUSE connection"
        );
        match umount2(&self.mountpoint, MntFlags::MNT_FORCE | MntFlags::MNT_DETACH) {
            Ok(()) | Err(Errno::EINVAL) => Ok(()),
            Err(e) => Err(TapError::Io {
                op: "forced unmount",
                object: format!("FUSE mount {}", self.mountpoint.display()),
                source: io::Error::from(e),
            }),
        }
    }

    /// Waits for the serving threads to end (they do once the connection is gone).
    fn join(&self, session: BackgroundSession, deadline: Instant) -> Result<()> {
        while !session.guard.is_finished() {
            if Instant::now() >= deadline {
                // Leave the threads; joining would block forever.
                return Err(TapError::Io {
                    op: "join FUSE serving threads",
                    object: format!("mount point {}", self.mountpoint.display()),
                    source: io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the FUSE connection is still up after the unmount",
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        match session.join() {
            Ok(()) => Ok(()),
            // An aborted connection ends the threads with ECONNABORTED: expected after a
            // forced teardown.
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => Ok(()),
            Err(source) => Err(TapError::Io {
                op: "serve FUSE requests",
                object: format!("mount point {}", self.mountpoint.display()),
                source,
            }),
        }
    }
}

impl Drop for FuseLoopFrontend {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            let mut chain = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                chain.push_str(": ");
                chain.push_str(&s.to_string());
                source = s.source();
            }
            tracing::error!(error = %chain, "FUSE frontend teardown on drop");
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unmounted {
    Cleanly,
    /// The connection was aborted; `loop_bound`: the loop device still held the volume.
    Forced {
        loop_bound: bool,
    },
}

/// Creates the mount point when missing and returns its absolute path without resolving
/// through it (a dead FUSE mount there cannot be stat'ed).
fn prepare_mountpoint(path: &Path) -> Result<PathBuf> {
    let object = format!("mount point {}", path.display());
    let name = path
        .file_name()
        .ok_or_else(|| TapError::Config(format!("{object} has no final component to mount on")))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|source| TapError::Io {
        op: "create",
        object: object.clone(),
        source,
    })?;
    let parent = parent.canonicalize().map_err(|source| TapError::Io {
        op: "resolve",
        object: object.clone(),
        source,
    })?;
    let mountpoint = parent.join(name);
    match std::fs::symlink_metadata(&mountpoint) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::create_dir(&mountpoint)
            .map_err(|source| TapError::Io { op: "create", object: object.clone(), source })?,
        // A dead FUSE mount: cleared next.
        Err(e) if is_dead_connection(&e) => {}
        Err(source) => return Err(TapError::Io { op: "stat", object, source }),
    }
    Ok(mountpoint)
}

fn is_dead_connection(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOTCONN) | Some(libc::ECONNABORTED))
}

/// Refuses a live mount at `mountpoint`; clears a dead FUSE one (a crashed agent's) and the
/// loop devices still bound to files under it.
fn clear_stale_mount(mountpoint: &Path) -> Result<()> {
    let object = format!("mount point {}", mountpoint.display());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| {
        TapError::Io { op: "read", object: "/proc/self/mountinfo".into(), source }
    })?;
    let Some(entry) = mount_at(&mountinfo, mountpoint) else { return Ok(()) };
    // statfs always reaches a FUSE server (a stat may be answered from cached attributes).
    match nix::sys::statfs::statfs(mountpoint) {
        Err(Errno::ENOTCONN | Errno::ECONNABORTED) => {}
        _ => {
            return Err(TapError::MountPointBusy {
                mountpoint: mountpoint.display().to_string(),
                fstype: entry.fstype,
                mounted: entry.source,
            });
        }
    }
    tracing::warn!(
        mountpoint = %mountpoint.display(),
        fstype = entry.fstype,
        "dead FUSE mount from a crashed run: clearing it"
    );
    for (number, backing) in loopdev::bound_loop_devices() {
        if backing.starts_with(mountpoint) {
            tracing::warn!(
                device = format!("/dev/loop{number}"),
                backing = %backing.display(),
                "detaching the loop device of the dead mount (deferred while still open)"
            );
            if let Err(e) = loopdev::detach_number(number) {
                tracing::warn!(error = %e, "could not detach a stale loop device");
            }
        }
    }
    // Lazily: a stale loop device may still pin the dead mount.
    umount2(mountpoint, MntFlags::MNT_DETACH).map_err(|e| TapError::Io {
        op: "lazy unmount of a dead FUSE mount",
        object,
        source: io::Error::from(e),
    })
}

/// A mount table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MountEntry {
    fstype: String,
    source: String,
}

/// The topmost mount at `path` in a `/proc/self/mountinfo` text (the last one listed).
fn mount_at(mountinfo: &str, path: &Path) -> Option<MountEntry> {
    let want = path.to_str()?;
    mountinfo.lines().rev().find_map(|line| {
        let mut fields = line.split(' ');
        let point = fields.nth(4)?;
        let mut rest = fields.skip_while(|f| *f != "-").skip(1);
        let fstype = rest.next()?;
        let source = rest.next().unwrap_or("");
        (unescape_mountinfo(point) == want)
            .then(|| MountEntry { fstype: fstype.to_owned(), source: unescape_mountinfo(source) })
    })
}

/// Undoes the octal escapes (`\040` for a space, ...) of a mountinfo field.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
98 22 0:52 / /tmp/a\\040b/mnt rw,nosuid,nodev,relatime shared:60 - fuse.tidemark tidemark rw,user_id=0,group_id=0
99 22 0:53 / /tmp/x rw - tmpfs tmpfs rw
100 99 0:54 / /tmp/x rw - fuse.tidemark tidemark rw
";

    #[test]
    fn mountinfo_lookup_unescapes_and_takes_the_topmost() {
        let e = mount_at(MOUNTINFO, Path::new("/tmp/a b/mnt")).expect("escaped path found");
        assert_eq!(e, MountEntry { fstype: "fuse.tidemark".into(), source: "tidemark".into() });
        let top = mount_at(MOUNTINFO, Path::new("/tmp/x")).expect("stacked mount found");
        assert_eq!(top.fstype, "fuse.tidemark");
        assert_eq!(mount_at(MOUNTINFO, Path::new("/tmp/a")), None);
        assert_eq!(mount_at(MOUNTINFO, Path::new("/")).map(|e| e.fstype), Some("ext4".into()));
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"a\040b\011c\134d"), "a b\tc\\d");
        assert_eq!(unescape_mountinfo(r"trailing\04"), r"trailing\04");
        assert_eq!(unescape_mountinfo(r"\999"), r"\999");
    }
}
