//! The ublk frontend: a user-space block device server (`/dev/ublkbN`, Linux >= 6.0 with
//! `ublk_drv`) in front of a protected device, capturing every write through a [`Tap`].
//!
//! The kernel hands each request of `/dev/ublkbN` to this server over io_uring passthrough
//! commands on `/dev/ublkcN`: the server fetches every tag of a queue (`FETCH_REQ`), the
//! driver completes a fetch with a request described in a shared descriptor table, and the
//! server answers with `COMMIT_AND_FETCH_REQ` (the result, and the next fetch in one
//! command). Data moves in the driver's copy mode: each tag has a buffer in this process,
//! the driver copies a write's data into it before delivering the request, and a read's
//! data out of it on commit.
//!
//! The device declares a volatile write cache and FUA (`UBLK_ATTR_VOLATILE_CACHE`,
//! `UBLK_ATTR_FUA`), so the block layer sends FLUSH requests and FUA writes to the server
//! instead of dropping them: they become barriers in the capture stream. DISCARD and
//! WRITE_ZEROES are captured too. With [`UblkConfig::user_recovery`] the device survives
//! the server (`UBLK_F_USER_RECOVERY` with `_REISSUE`): I/O waits, and
//! [`UblkServer::recover`] in a new process reattaches, the driver re-issuing the requests
//! the dead server had not completed (so a write may reach the tap twice, with the same
//! data; it was never acknowledged in between, so the replica's history stays a possible
//! one).
//!
//! **Concurrency.** Each queue has one thread and one ring (the driver requires every
//! command of a queue to come from one task), on which it drives both the driver's commands
//! and the pass-through I/O to the protected device: io_uring READ, WRITE, FSYNC and
//! FALLOCATE on the device's descriptor, through the tap's split capture calls
//! ([`Tap::begin_mutation`], [`Tap::finish_write`], [`Tap::begin_flush`]), so up to
//! `depth` requests of a queue are in flight at once with no thread per request (`queue`
//! documents the details, and what may still block the ring thread). The capture order rule
//! holds with any number in flight because a request is committed to the driver only after
//! its capture finished: a write is in the spool before its completion reaches the block
//! layer, hence before any FLUSH that must cover it is issued; a FLUSH is committed after its
//! barrier is appended and its FSYNC completed. Overlapping mutations in flight together
//! reach the device one after the other, in the order the driver delivered them (the tap's
//! ordering tickets), so the device and the spool see them in the same order.
//! [`UblkStats::max_in_flight`] reports the concurrency reached, [`UblkStats::backing_ops`]
//! the backing-device ops that went through the rings.
//!
//! Layout: [`sys`] declares the kernel ABI by hand (no bindgen); `os` holds every unsafe
//! operation (rings, mmaps, eventfd, prctl) behind a safe API; `ctrl` wraps the control
//! commands; `queue` is a queue's ring thread and its spool helper.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tidemark_journal::BlockIo;

use crate::capture::Tap;
use crate::error::{Result, TapError};
use crate::fuse::BlockBackend;

mod ctrl;
mod os;
mod queue;
pub mod sys;

use ctrl::{Control, dev_label};
use queue::{Counters, Engine, QueueContext};

/// How long to wait for the driver's char device node to appear after ADD_DEV (devtmpfs
/// creates it at once; udev may take a moment).
const NODE_WAIT: Duration = Duration::from_secs(10);

/// Settings of a ublk device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UblkConfig {
    /// Queues, each served by its own thread and ring (at most one per CPU is useful).
    pub queues: u16,
    /// Requests in flight per queue (tags).
    pub depth: u16,
    /// Largest request in bytes (each tag has a buffer of this size).
    pub max_io_bytes: u32,
    /// log2 of the logical block size (9 to 12).
    pub logical_block_shift: u8,
    /// log2 of the physical block size (at least the logical one).
    pub physical_block_shift: u8,
    /// Keep the block device alive when the server dies, for [`UblkServer::recover`].
    pub user_recovery: bool,
    /// The control device.
    pub control_path: PathBuf,
}

impl Default for UblkConfig {
    fn default() -> Self {
        Self {
            queues: 1,
            depth: 64,
            max_io_bytes: 512 << 10,
            logical_block_shift: 9,
            physical_block_shift: 12,
            user_recovery: true,
            control_path: PathBuf::from(sys::CONTROL_PATH),
        }
    }
}

impl UblkConfig {
    fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(TapError::Config(what));
        if self.queues == 0 || self.queues > sys::MAX_NR_QUEUES {
            return bad(format!(
                "ublk queues {} is not from 1 to {}",
                self.queues,
                sys::MAX_NR_QUEUES
            ));
        }
        if self.depth == 0 || self.depth > sys::MAX_QUEUE_DEPTH {
            return bad(format!(
                "ublk depth {} is not from 1 to {}",
                self.depth,
                sys::MAX_QUEUE_DEPTH
            ));
        }
        if self.max_io_bytes < 4096
            || self.max_io_bytes > sys::MAX_IO_BUF_BYTES
            || self.max_io_bytes % 4096 != 0
        {
            return bad(format!(
                "ublk max_io_bytes {} is not a multiple of 4096 from 4096 to {}",
                self.max_io_bytes,
                sys::MAX_IO_BUF_BYTES
            ));
        }
        if !(9..=12).contains(&self.logical_block_shift)
            || self.physical_block_shift < self.logical_block_shift
            || self.physical_block_shift > 16
        {
            return bad(format!(
                "ublk block shifts logical {} / physical {} are not 9 <= logical <= 12, logical <= physical <= 16",
                self.logical_block_shift, self.physical_block_shift
            ));
        }
        Ok(())
    }

    fn flags(&self) -> u64 {
        let mut flags = sys::F_CMD_IOCTL_ENCODE;
        if self.user_recovery {
            flags |= sys::F_USER_RECOVERY | sys::F_USER_RECOVERY_REISSUE;
        }
        flags
    }
}

/// Request counters of a device since this server started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UblkStats {
    /// READ requests.
    pub reads: u64,
    /// WRITE requests (FUA ones included).
    pub writes: u64,
    /// WRITE requests with FUA.
    pub fua_writes: u64,
    /// FLUSH requests.
    pub flushes: u64,
    /// DISCARD requests.
    pub discards: u64,
    /// WRITE_ZEROES requests.
    pub write_zeroes: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Requests completed with an error.
    pub errors: u64,
    /// The most requests of one queue held by the server at the same time (delivered and
    /// not yet committed), over every queue.
    pub max_in_flight: u64,
    /// Backing-device ops (READ, WRITE, FSYNC, FALLOCATE) completed on the queues' rings:
    /// at least one per request served, more after a short read or write.
    pub backing_ops: u64,
}

/// Whether the ublk driver is usable here: `Ok` when `control_path` opens.
pub fn probe(control_path: &Path) -> Result<()> {
    Control::open(control_path).map(drop)
}

/// The shape and state (`info.state`, one of `sys::S_DEV_*`) of device `dev_id` as the
/// driver reports them now (GET_DEV_INFO), served by this process or not: after its server
/// died, a device with user recovery turns [`sys::S_DEV_QUIESCED`] once the driver noticed,
/// and holds its I/O until a new server reattaches.
pub fn device_info(control_path: &Path, dev_id: u32) -> Result<sys::DevInfo> {
    Control::open(control_path)?.dev_info(dev_id)
}

/// A running ublk device served by this process (see the module documentation).
///
/// [`UblkServer::stop`] removes the device; dropping the server does the same, best effort.
/// A process that dies without either leaves a device with user recovery waiting for
/// [`UblkServer::recover`].
#[derive(Debug)]
pub struct UblkServer {
    dev_id: u32,
    info: sys::DevInfo,
    control: Mutex<Control>,
    char_dev: Option<Arc<File>>,
    queues: Vec<JoinHandle<Result<()>>>,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    stopped: bool,
}

impl UblkServer {
    /// Creates a ublk device of the protected device's size, serves it with `tap` (the
    /// capture of writes, flushes, discards, write-zeroes) and `device` (the tap's protected
    /// device, whose descriptor the queues' io_uring ops use: a [`BlockIo`] with a
    /// [`BlockIo::raw_fd`], such as a `FileIo`), and starts it: `/dev/ublkbN`
    /// ([`UblkServer::block_path`]) exists when this returns.
    ///
    /// The tap does not expose its device, so the caller passes the same one again.
    pub fn start(config: UblkConfig, tap: Arc<Tap>, device: Arc<dyn BlockIo>) -> Result<Self> {
        config.validate()?;
        let device_len =
            device.len().map_err(|e| TapError::io("length query", device.name(), e))?;
        let fd = backing_fd(&device)?;
        let engine = Engine::Capture { tap, _device: device.clone(), fd };
        Self::create(config, engine, &device.name(), device_len, false)
    }

    /// Creates a ublk device of `backend`'s size served by `backend` (any [`BlockBackend`]
    /// other than the tap: a virtual snapshot of a recovery point, for one) and starts it, on
    /// the same queue machinery as [`UblkServer::start`]: each request is one synchronous
    /// backend call on its queue's ring thread, then its commit. Nothing is captured. A
    /// read-only backend gets a read-only disk (`UBLK_ATTR_READ_ONLY`: the block layer
    /// refuses writes before they reach the server, which would refuse them with `EROFS`
    /// too). The device is created without user recovery whatever `config` says: it lives
    /// only as long as this server.
    pub fn start_backend(config: UblkConfig, backend: Arc<dyn BlockBackend>) -> Result<Self> {
        let config = UblkConfig { user_recovery: false, ..config };
        config.validate()?;
        let (len, read_only) = (backend.size(), backend.read_only());
        Self::create(config, Engine::Backend(backend), "backend", len, read_only)
    }

    fn create(
        config: UblkConfig,
        engine: Engine,
        name: &str,
        device_len: u64,
        read_only: bool,
    ) -> Result<Self> {
        let block = 1u64 << config.logical_block_shift;
        if device_len == 0 || device_len % block != 0 {
            return Err(TapError::Config(format!(
                "device {name} holds {device_len} bytes, not a positive multiple of the {block}-byte block"
            )));
        }
        let mut control = Control::open(&config.control_path)?;
        let wanted = sys::DevInfo {
            nr_hw_queues: config.queues,
            queue_depth: config.depth,
            max_io_buf_bytes: config.max_io_bytes,
            dev_id: u32::MAX,
            flags: config.flags(),
            ..sys::DevInfo::default()
        };
        let info = control.add_dev(wanted)?;
        let dev_id = info.dev_id;
        tracing::info!(
            dev_id,
            queues = info.nr_hw_queues,
            depth = info.queue_depth,
            read_only,
            "ublk device added"
        );
        let mut server = Self::new(dev_id, info, control);
        let started = (|| {
            let mut p = params(&config, &info, device_len);
            if read_only {
                p.basic.attrs |= sys::ATTR_READ_ONLY;
            }
            server.lock_control().set_params(dev_id, p)?;
            server.spawn_queues(&engine, device_len)?;
            server.lock_control().start_dev(dev_id, std::process::id())
        })();
        if let Err(e) = started {
            if let Err(cleanup) = server.teardown(false) {
                tracing::warn!(dev_id, "removing the half-started ublk device failed: {cleanup}");
            }
            return Err(e);
        }
        tracing::info!(dev_id, path = %server.block_path().display(), "ublk device started");
        Ok(server)
    }

    /// Reattaches to device `dev_id`, whose previous server died (it was created with
    /// [`UblkConfig::user_recovery`]): waits until the driver has noticed, fetches every tag
    /// again and resumes I/O. Requests the dead server had not completed are re-issued to
    /// this one. Only `control_path` is used from `config`; the shape comes from the driver.
    pub fn recover(
        dev_id: u32,
        config: UblkConfig,
        tap: Arc<Tap>,
        device: Arc<dyn BlockIo>,
    ) -> Result<Self> {
        config.validate()?;
        let fd = backing_fd(&device)?;
        let device_len =
            device.len().map_err(|e| TapError::io("length query", device.name(), e))?;
        let engine = Engine::Capture { tap, _device: device, fd };
        let mut control = Control::open(&config.control_path)?;
        let info = control.dev_info(dev_id)?;
        if info.flags & sys::F_USER_RECOVERY == 0 {
            return Err(TapError::Config(format!(
                "{} was created without user recovery; it cannot be reattached",
                dev_label(dev_id)
            )));
        }
        control.start_user_recovery(dev_id)?;
        let mut server = Self::new(dev_id, info, control);
        let recovered = (|| {
            server.spawn_queues(&engine, device_len)?;
            server.lock_control().end_user_recovery(dev_id, std::process::id())
        })();
        if let Err(e) = recovered {
            // Leave the device for another attempt: removing it would fail the
            // application's waiting I/O.
            server.stop.store(true, Ordering::Release);
            for handle in server.queues.drain(..) {
                let _ = handle.join();
            }
            server.stopped = true;
            return Err(e);
        }
        tracing::info!(dev_id, "ublk device recovered by a new server");
        Ok(server)
    }

    fn new(dev_id: u32, info: sys::DevInfo, control: Control) -> Self {
        UblkServer {
            dev_id,
            info,
            control: Mutex::new(control),
            char_dev: None,
            queues: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            counters: Arc::new(Counters::new(info.nr_hw_queues)),
            stopped: false,
        }
    }

    fn lock_control(&self) -> std::sync::MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens the char device and starts one thread per queue; returns once every queue has
    /// submitted a fetch for each of its tags.
    fn spawn_queues(&mut self, engine: &Engine, device_len: u64) -> Result<()> {
        let char_path = self.char_path();
        let char_dev = Arc::new(open_node(&char_path)?);
        self.char_dev = Some(char_dev.clone());
        let (ready_tx, ready_rx) = mpsc::sync_channel(usize::from(self.info.nr_hw_queues));
        for q_id in 0..self.info.nr_hw_queues {
            let ctx = QueueContext {
                dev_id: self.dev_id,
                q_id,
                depth: self.info.queue_depth,
                engine: engine.clone(),
                device_len,
                counters: self.counters.clone(),
                stop: self.stop.clone(),
            };
            let char_dev = char_dev.clone();
            let ready = ready_tx.clone();
            let buf_bytes = self.info.max_io_buf_bytes as usize;
            let handle = thread::Builder::new()
                .name(format!("ublk{}q{q_id}", self.dev_id))
                .spawn(move || queue::run(ctx, char_dev, buf_bytes, ready))
                .map_err(|e| TapError::io("thread spawn", dev_label(self.dev_id), e))?;
            self.queues.push(handle);
        }
        drop(ready_tx);
        for _ in 0..self.info.nr_hw_queues {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(TapError::UblkQueue {
                        dev: self.dev_id,
                        queue: u16::MAX,
                        reason: "a queue thread exited during setup".into(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The device number N.
    pub fn dev_id(&self) -> u32 {
        self.dev_id
    }

    /// `/dev/ublkbN`, the protected block device the application uses.
    pub fn block_path(&self) -> PathBuf {
        PathBuf::from(format!("{}{}", sys::BLOCK_PREFIX, self.dev_id))
    }

    /// `/dev/ublkcN`, the char device this server serves.
    pub fn char_path(&self) -> PathBuf {
        PathBuf::from(format!("{}{}", sys::CHAR_PREFIX, self.dev_id))
    }

    /// The device's shape and flags as the driver reported them.
    pub fn info(&self) -> sys::DevInfo {
        self.info
    }

    /// Request counters.
    pub fn stats(&self) -> UblkStats {
        let c = &self.counters;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        UblkStats {
            reads: get(&c.reads),
            writes: get(&c.writes),
            fua_writes: get(&c.fua_writes),
            flushes: get(&c.flushes),
            discards: get(&c.discards),
            write_zeroes: get(&c.write_zeroes),
            bytes_read: get(&c.bytes_read),
            bytes_written: get(&c.bytes_written),
            errors: get(&c.errors),
            max_in_flight: c.queues.iter().map(|q| get(&q.max_busy)).max().unwrap_or(0),
            backing_ops: get(&c.backing_ops),
        }
    }

    /// Per queue (indexed by queue id): the most requests held at the same time so far.
    pub fn max_in_flight_per_queue(&self) -> Vec<u64> {
        self.counters.queues.iter().map(|q| q.max_busy.load(Ordering::Relaxed)).collect()
    }

    /// Removes the device: STOP_DEV (the disk goes away, after the I/O its removal issues
    /// is served), then the queue threads end, then DEL_DEV. Returns the first error; a
    /// queue thread's failure is reported even when the removal worked.
    pub fn stop(mut self) -> Result<()> {
        self.stopped = true;
        self.teardown(true)
    }

    fn teardown(&mut self, started: bool) -> Result<()> {
        let dev_id = self.dev_id;
        let mut first_err = None;
        if started {
            if let Err(e) = self.lock_control().stop_dev(dev_id) {
                first_err.get_or_insert(e);
            }
        }
        self.stop.store(true, Ordering::Release);
        for handle in self.queues.drain(..) {
            match handle.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(TapError::UblkQueue {
                        dev: dev_id,
                        queue: u16::MAX,
                        reason: "a queue thread panicked".into(),
                    });
                }
            }
        }
        // DEL_DEV waits until the char device is released.
        self.char_dev = None;
        if let Err(e) = self.lock_control().del_dev(dev_id) {
            first_err.get_or_insert(e);
        }
        self.stopped = true;
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for UblkServer {
    fn drop(&mut self) {
        if !self.stopped {
            if let Err(e) = self.teardown(true) {
                tracing::warn!(dev = self.dev_id, "ublk device removal on drop failed: {e}");
            }
        }
    }
}

/// The parameters SET_PARAMS sends: size, block sizes, cache and FUA, discard limits.
fn params(config: &UblkConfig, info: &sys::DevInfo, device_len: u64) -> sys::Params {
    let max_sectors = info.max_io_buf_bytes >> 9;
    sys::Params {
        len: std::mem::size_of::<sys::Params>() as u32,
        types: sys::PARAM_TYPE_BASIC | sys::PARAM_TYPE_DISCARD,
        basic: sys::ParamBasic {
            attrs: sys::ATTR_VOLATILE_CACHE | sys::ATTR_FUA,
            logical_bs_shift: config.logical_block_shift,
            physical_bs_shift: config.physical_block_shift,
            io_opt_shift: config.physical_block_shift,
            io_min_shift: config.logical_block_shift,
            max_sectors,
            chunk_sectors: 0,
            dev_sectors: device_len >> 9,
            virt_boundary_mask: 0,
        },
        discard: sys::ParamDiscard {
            discard_alignment: 0,
            discard_granularity: 1 << config.physical_block_shift,
            // The tap writes zeros for both; cap one request at 1 GiB (its event limit).
            max_discard_sectors: 1 << 21,
            max_write_zeroes_sectors: 1 << 21,
            max_discard_segments: 1,
            reserved0: 0,
        },
        ..sys::Params::default()
    }
}

/// The protected device's descriptor, for the queues' io_uring ops.
fn backing_fd(device: &Arc<dyn BlockIo>) -> Result<std::os::fd::RawFd> {
    device.raw_fd().ok_or_else(|| {
        TapError::Config(format!(
            "protected device {} has no file descriptor; the ublk frontend passes I/O through to it with io_uring",
            device.name()
        ))
    })
}

/// Opens a device node the driver just created, waiting briefly for it to appear.
fn open_node(path: &Path) -> Result<File> {
    let started = Instant::now();
    loop {
        match os::open_char_dev(path) {
            Ok(file) => return Ok(file),
            Err(e) if e.kind() == io::ErrorKind::NotFound && started.elapsed() < NODE_WAIT => {
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(TapError::io("open", path.display().to_string(), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid_and_asks_for_recovery() {
        let cfg = UblkConfig::default();
        cfg.validate().unwrap();
        assert_eq!(
            cfg.flags(),
            sys::F_CMD_IOCTL_ENCODE | sys::F_USER_RECOVERY | sys::F_USER_RECOVERY_REISSUE
        );
        let plain = UblkConfig { user_recovery: false, ..cfg };
        assert_eq!(plain.flags(), sys::F_CMD_IOCTL_ENCODE);
    }

    #[test]
    fn bad_shapes_are_refused() {
        let base = UblkConfig::default();
        for bad in [
            UblkConfig { queues: 0, ..base.clone() },
            UblkConfig { depth: 0, ..base.clone() },
            UblkConfig { depth: sys::MAX_QUEUE_DEPTH + 1, ..base.clone() },
            UblkConfig { max_io_bytes: 1000, ..base.clone() },
            UblkConfig { max_io_bytes: sys::MAX_IO_BUF_BYTES * 2, ..base.clone() },
            UblkConfig { logical_block_shift: 8, ..base.clone() },
            UblkConfig { logical_block_shift: 12, physical_block_shift: 9, ..base.clone() },
        ] {
            assert!(matches!(bad.validate(), Err(TapError::Config(_))), "{bad:?}");
        }
    }

    #[test]
    fn params_declare_cache_fua_and_the_device_size() {
        let cfg = UblkConfig::default();
        let info = sys::DevInfo { max_io_buf_bytes: cfg.max_io_bytes, ..sys::DevInfo::default() };
        let p = params(&cfg, &info, 64 << 20);
        assert_eq!(p.len as usize, std::mem::size_of::<sys::Params>());
        assert_eq!(p.types, sys::PARAM_TYPE_BASIC | sys::PARAM_TYPE_DISCARD);
        assert_eq!(p.basic.attrs, sys::ATTR_VOLATILE_CACHE | sys::ATTR_FUA);
        assert_eq!(p.basic.dev_sectors, (64 << 20) >> 9);
        assert_eq!(p.basic.max_sectors, cfg.max_io_bytes >> 9);
        assert_eq!(p.discard.max_discard_segments, 1);
        assert!(p.discard.discard_granularity > 0);
    }

    #[test]
    fn a_missing_control_device_is_reported_as_unavailable() {
        let err = probe(Path::new("/nonexistent/ublk-control")).unwrap_err();
        assert!(matches!(err, TapError::UblkUnavailable { .. }), "{err}");
    }
}
