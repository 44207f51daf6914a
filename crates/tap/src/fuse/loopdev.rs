//! Loop devices over a file, through the kernel's loop ioctls: attach with
//! `LOOP_CTL_GET_FREE` and `LOOP_CONFIGURE` (one atomic call that binds the file and sets
//! the flags and block size, Linux >= 5.8), detach with `LOOP_CLR_FD`. Every `unsafe` of the
//! FUSE frontend is in this module.
//!
//! Why ioctls and not `losetup`: the attach needs the free-device race handled (another
//! process may bind the number `LOOP_CTL_GET_FREE` returned: `LOOP_CONFIGURE` then fails
//! with `EBUSY` and we take the next one), a direct I/O fallback decided on the kernel's
//! answer, and errors that name the device; parsing a tool's output gives none of that, and
//! the ioctls are three small, stable UAPI calls.
//!
//! The device is bound with `LO_FLAGS_AUTOCLEAR` and this handle keeps it open: the
//! binding ends at the last close, so a crashed agent (whose descriptor the kernel closes)
//! leaves no loop device behind once the application lets go of it too.

use std::fs::{File, OpenOptions};
use std::io;
use std::mem::size_of;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Result, TapError};

// `linux/loop.h`.
const LOOP_CLR_FD: libc::Ioctl = 0x4C01;
const LOOP_SET_CAPACITY: libc::Ioctl = 0x4C07;
/// `_IOR(0x12, 114, size_t)`: a block device's size in bytes.
const BLKGETSIZE64: libc::Ioctl = 0x8008_1272;
const LOOP_CONFIGURE: libc::Ioctl = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::Ioctl = 0x4C82;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;
const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;

/// How many free-device races an attach tolerates before giving up.
const ATTACH_ATTEMPTS: u32 = 32;

/// `struct loop_info64`.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

// The UAPI layouts, without padding: a mismatch would make the kernel read garbage.
const _: () = assert!(size_of::<LoopInfo64>() == 232);
const _: () = assert!(size_of::<LoopConfig>() == 304);

impl LoopConfig {
    fn new(fd: u32, block_size: u32, flags: u32, name: &str) -> Self {
        let mut lo_file_name = [0u8; LO_NAME_SIZE];
        let n = name.len().min(LO_NAME_SIZE - 1);
        lo_file_name[..n].copy_from_slice(&name.as_bytes()[..n]);
        LoopConfig {
            fd,
            block_size,
            info: LoopInfo64 {
                lo_device: 0,
                lo_inode: 0,
                lo_rdevice: 0,
                lo_offset: 0,
                lo_sizelimit: 0,
                lo_number: 0,
                lo_encrypt_type: 0,
                lo_encrypt_key_size: 0,
                lo_flags: flags,
                lo_file_name,
                lo_crypt_name: [0; LO_NAME_SIZE],
                lo_encrypt_key: [0; LO_KEY_SIZE],
                lo_init: [0; 2],
            },
            reserved: [0; 8],
        }
    }
}

/// How to attach a loop device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopOptions {
    /// Ask for `LO_FLAGS_DIRECT_IO`: the loop driver submits asynchronous `O_DIRECT` I/O to
    /// the file instead of buffered writes through its page cache. When the kernel refuses
    /// it for this file the device is attached without it ([`LoopDevice::direct_io`] tells).
    pub direct_io: bool,
    /// Logical block size of the device: 512, 1024, 2048 or 4096.
    pub block_size: u32,
    /// Attach read-only.
    pub read_only: bool,
}

impl Default for LoopOptions {
    fn default() -> Self {
        Self { direct_io: true, block_size: 512, read_only: false }
    }
}

/// A loop device bound to a file, detached on drop (see the module documentation).
#[derive(Debug)]
pub struct LoopDevice {
    number: u32,
    path: PathBuf,
    backing: PathBuf,
    direct_io: bool,
    /// Open while bound; `None` once detached.
    device: Option<File>,
}

fn ioctl_err(op: &'static str, object: String) -> impl FnOnce(io::Error) -> TapError {
    move |source| TapError::Io { op, object, source }
}

impl LoopDevice {
    /// Binds a free loop device to `backing` (a regular file).
    pub fn attach(backing: &Path, opts: LoopOptions) -> Result<LoopDevice> {
        let backing_name = format!("loop backing file {}", backing.display());
        let file = OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(backing)
            .map_err(ioctl_err("open", backing_name.clone()))?;
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/loop-control")
            .map_err(ioctl_err("open", "/dev/loop-control".into()))?;
        let mut flags = LO_FLAGS_AUTOCLEAR;
        if opts.read_only {
            flags |= LO_FLAGS_READ_ONLY;
        }
        let label = format!("tidemark:{}", backing.display());
        let mut want_dio = opts.direct_io;
        let mut last_busy = None;
        for _ in 0..ATTACH_ATTEMPTS {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument and reads no memory of ours.
            let number = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
            if number < 0 {
                return Err(io::Error::last_os_error())
                    .map_err(ioctl_err("LOOP_CTL_GET_FREE", "/dev/loop-control".into()));
            }
            let number = number as u32;
            let path = PathBuf::from(format!("/dev/loop{number}"));
            let object = format!("loop device {} (backing {})", path.display(), backing.display());
            let device =
                open_device(&path, opts.read_only).map_err(ioctl_err("open", object.clone()))?;
            loop {
                let dio = if want_dio { LO_FLAGS_DIRECT_IO } else { 0 };
                let cfg =
                    LoopConfig::new(file.as_raw_fd() as u32, opts.block_size, flags | dio, &label);
                // SAFETY: LOOP_CONFIGURE reads one `struct loop_config` from the pointer,
                // which is a live, properly laid out value (size asserted above) borrowed
                // for the duration of the call; the kernel takes its own reference on the
                // backing file descriptor.
                let rc = unsafe {
                    libc::ioctl(device.as_raw_fd(), LOOP_CONFIGURE, &cfg as *const LoopConfig)
                };
                if rc == 0 {
                    let direct_io = read_sysfs_flag(number, "dio").unwrap_or(false);
                    if opts.direct_io && !direct_io {
                        tracing::warn!(
                            device = %path.display(),
                            backing = %backing.display(),
                            "loop device attached without direct I/O (the kernel refused it \
                             for this file): buffered loop I/O"
                        );
                    }
                    return Ok(LoopDevice {
                        number,
                        path,
                        backing: backing.to_path_buf(),
                        direct_io,
                        device: Some(device),
                    });
                }
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    // Another process bound this number between GET_FREE and CONFIGURE.
                    Some(libc::EBUSY) => {
                        last_busy = Some(err);
                        break;
                    }
                    // Direct I/O refused for this backing file: bind without it.
                    Some(libc::EINVAL) if want_dio => want_dio = false,
                    _ => return Err(err).map_err(ioctl_err("LOOP_CONFIGURE", object)),
                }
            }
        }
        let source = last_busy.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EBUSY));
        Err(TapError::Io {
            op: "LOOP_CONFIGURE",
            object: format!(
                "every free loop device ({ATTACH_ATTEMPTS} attempts) for backing {}",
                backing.display()
            ),
            source,
        })
    }

    /// The device node, `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device number `N`.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// The file the device is bound to.
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// Whether the kernel runs the device with direct I/O (`/sys/block/loopN/loop/dio`).
    pub fn direct_io(&self) -> bool {
        self.direct_io
    }

    /// Whether the kernel still has the device bound (after [`LoopDevice::detach`], while
    /// another opener holds the device). Asked by number: the backing file's path as the
    /// kernel shows it changes when its mount is detached.
    pub fn is_bound(&self) -> bool {
        Path::new(&format!("/sys/block/loop{}/loop/backing_file", self.number)).exists()
    }

    /// Makes the loop device take its backing file's size again (`LOOP_SET_CAPACITY`),
    /// after the file grew; returns the device's size in bytes afterwards.
    pub fn set_capacity(&self) -> Result<u64> {
        let Some(device) = self.device.as_ref() else {
            return Err(TapError::Config(format!("{} is detached", self.describe())));
        };
        // SAFETY: LOOP_SET_CAPACITY takes no argument and reads no memory of ours.
        let rc = unsafe { libc::ioctl(device.as_raw_fd(), LOOP_SET_CAPACITY) };
        if rc != 0 {
            return Err(
                ioctl_err("LOOP_SET_CAPACITY", self.describe())(io::Error::last_os_error()),
            );
        }
        let mut size = 0u64;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, valid for the call.
        let rc = unsafe { libc::ioctl(device.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
        if rc != 0 {
            return Err(ioctl_err("BLKGETSIZE64", self.describe())(io::Error::last_os_error()));
        }
        Ok(size)
    }

    /// Unbinds the device: at once when this handle is its only opener, otherwise when the
    /// last opener closes it (the kernel's deferred detach). Idempotent.
    pub fn detach(&mut self) -> Result<()> {
        let Some(device) = self.device.take() else { return Ok(()) };
        clear_fd(&device).map_err(ioctl_err("LOOP_CLR_FD", self.describe()))?;
        // Closing the last descriptor runs the kernel's detach.
        drop(device);
        Ok(())
    }

    fn describe(&self) -> String {
        format!("loop device {} (backing {})", self.path.display(), self.backing.display())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if let Err(e) = self.detach() {
            tracing::error!(error = %e, "loop device detach on drop failed");
        }
    }
}

fn open_device(path: &Path, read_only: bool) -> io::Result<File> {
    // devtmpfs creates the node as the device is added; give it a moment.
    let mut waited = Duration::ZERO;
    loop {
        match OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
        {
            Err(e) if e.kind() == io::ErrorKind::NotFound && waited < Duration::from_secs(2) => {
                std::thread::sleep(Duration::from_millis(10));
                waited += Duration::from_millis(10);
            }
            other => return other,
        }
    }
}

/// `LOOP_CLR_FD`; a device that is not bound (`ENXIO`) is already detached.
fn clear_fd(device: &File) -> io::Result<()> {
    // SAFETY: LOOP_CLR_FD takes no argument and reads no memory of ours.
    let rc = unsafe { libc::ioctl(device.as_raw_fd(), LOOP_CLR_FD) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENXIO) { Ok(()) } else { Err(err) }
}

/// A flag file under `/sys/block/loopN/loop/` ("1" or "0").
fn read_sysfs_flag(number: u32, name: &str) -> Option<bool> {
    let text = std::fs::read_to_string(format!("/sys/block/loop{number}/loop/{name}")).ok()?;
    Some(text.trim() == "1")
}

/// The backing file of every bound loop device, from sysfs.
pub(crate) fn bound_loop_devices() -> Vec<(u32, PathBuf)> {
    let Ok(dir) = std::fs::read_dir("/sys/block") else { return Vec::new() };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(number) =
            name.to_str().and_then(|n| n.strip_prefix("loop")).and_then(|n| n.parse().ok())
        else {
            continue;
        };
        if let Ok(text) = std::fs::read_to_string(entry.path().join("loop/backing_file")) {
            let text = text.trim_end_matches('\n');
            let text = text.strip_suffix(" (deleted)").unwrap_or(text);
            out.push((number, PathBuf::from(text)));
        }
    }
    out.sort();
    out
}

/// Detaches loop device `number` (a leftover of a crashed run); deferred by the kernel while
/// something still holds it open.
pub(crate) fn detach_number(number: u32) -> Result<()> {
    let path = format!("/dev/loop{number}");
    let object = format!("loop device {path}");
    let device = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&path)
        .map_err(ioctl_err("open", object.clone()))?;
    clear_fd(&device).map_err(ioctl_err("LOOP_CLR_FD", object))
}
