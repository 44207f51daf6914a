//! The control path: typed wrappers of the commands sent to `/dev/ublk-control`.
//!
//! Each command is one SQE128 `URING_CMD` on a private ring, waited for synchronously
//! (control commands are rare and START_DEV / END_USER_RECOVERY block in the kernel until
//! every queue has fetched its tags, which the queue threads do meanwhile).

use std::io;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use super::os::ControlRing;
use super::sys::{self, CtrlCmd, DevInfo, Params};
use crate::error::{Result, TapError};

/// How long START_USER_RECOVERY is retried while the driver still reports the old server
/// as alive (`EBUSY`): the kernel notices a dead server within a few seconds.
const RECOVERY_WAIT: Duration = Duration::from_secs(60);

/// A handle on `/dev/ublk-control`.
#[derive(Debug)]
pub(super) struct Control {
    ring: ControlRing,
}

impl Control {
    /// Opens the control device; a missing device is [`TapError::UblkUnavailable`].
    pub(super) fn open(path: &Path) -> Result<Control> {
        let ring = ControlRing::open(path).map_err(|source| TapError::UblkUnavailable {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Control { ring })
    }

    fn header(dev_id: u32) -> CtrlCmd {
        CtrlCmd { dev_id, queue_id: u16::MAX, ..CtrlCmd::default() }
    }

    fn failed(command: &'static str, dev_id: u32) -> impl FnOnce(io::Error) -> TapError {
        move |source| TapError::UblkCommand { command, device: dev_label(dev_id), source }
    }

    /// ADD_DEV: creates a device from `info` (`dev_id` `u32::MAX` lets the driver choose)
    /// and returns the driver's view of it, with its number.
    pub(super) fn add_dev(&mut self, mut info: DevInfo) -> Result<DevInfo> {
        let dev_id = info.dev_id;
        self.ring
            .call(sys::CMD_ADD_DEV, Self::header(dev_id), Some(&mut info))
            .map_err(Self::failed("ADD_DEV", dev_id))?;
        Ok(info)
    }

    /// GET_DEV_INFO.
    pub(super) fn dev_info(&mut self, dev_id: u32) -> Result<DevInfo> {
        let mut info = DevInfo::default();
        self.ring
            .call(sys::CMD_GET_DEV_INFO, Self::header(dev_id), Some(&mut info))
            .map_err(Self::failed("GET_DEV_INFO", dev_id))?;
        Ok(info)
    }

    /// SET_PARAMS.
    pub(super) fn set_params(&mut self, dev_id: u32, mut params: Params) -> Result<()> {
        self.ring
            .call(sys::CMD_SET_PARAMS, Self::header(dev_id), Some(&mut params))
            .map_err(Self::failed("SET_PARAMS", dev_id))?;
        Ok(())
    }

    /// START_DEV: blocks until every queue has fetched its tags, then exposes the disk.
    pub(super) fn start_dev(&mut self, dev_id: u32, pid: u32) -> Result<()> {
        let mut cmd = Self::header(dev_id);
        cmd.data[0] = u64::from(pid);
        self.ring
            .call::<DevInfo>(sys::CMD_START_DEV, cmd, None)
            .map_err(Self::failed("START_DEV", dev_id))?;
        Ok(())
    }

    /// STOP_DEV: removes the disk (serving the I/O that removal issues) and aborts the
    /// queues' fetches.
    pub(super) fn stop_dev(&mut self, dev_id: u32) -> Result<()> {
        self.ring
            .call::<DevInfo>(sys::CMD_STOP_DEV, Self::header(dev_id), None)
            .map_err(Self::failed("STOP_DEV", dev_id))?;
        Ok(())
    }

    /// DEL_DEV: forgets the device; the driver waits until its char device is closed.
    pub(super) fn del_dev(&mut self, dev_id: u32) -> Result<()> {
        self.ring
            .call::<DevInfo>(sys::CMD_DEL_DEV, Self::header(dev_id), None)
            .map_err(Self::failed("DEL_DEV", dev_id))?;
        Ok(())
    }

    /// START_USER_RECOVERY, retried while the driver has not yet noticed that the old
    /// server is gone (`EBUSY`).
    pub(super) fn start_user_recovery(&mut self, dev_id: u32) -> Result<()> {
        let started = Instant::now();
        loop {
            match self.ring.call::<DevInfo>(
                sys::CMD_START_USER_RECOVERY,
                Self::header(dev_id),
                None,
            ) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    if started.elapsed() > RECOVERY_WAIT {
                        return Err(Self::failed("START_USER_RECOVERY", dev_id)(e));
                    }
                    thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(Self::failed("START_USER_RECOVERY", dev_id)(e)),
            }
        }
    }

    /// END_USER_RECOVERY: blocks until every queue has fetched again, then resumes I/O.
    pub(super) fn end_user_recovery(&mut self, dev_id: u32, pid: u32) -> Result<()> {
        let mut cmd = Self::header(dev_id);
        cmd.data[0] = u64::from(pid);
        self.ring
            .call::<DevInfo>(sys::CMD_END_USER_RECOVERY, cmd, None)
            .map_err(Self::failed("END_USER_RECOVERY", dev_id))?;
        Ok(())
    }
}

/// `ublk device N` for messages (`new` before the driver assigned a number).
pub(super) fn dev_label(dev_id: u32) -> String {
    if dev_id == u32::MAX { "ublk device (new)".into() } else { format!("ublk device {dev_id}") }
}
