//! The kernel's ublk user-space ABI (`include/uapi/linux/ublk_cmd.h`), declared by hand so
//! that the build needs no bindgen or libclang.
//!
//! Only what the server uses is declared. Every struct is `#[repr(C)]` with explicit padding
//! fields, so that it has no implicit padding bytes; the const assertions at the end check
//! the sizes and field offsets against the kernel header. All integers are in the host's
//! byte order (the ABI is native-endian).

#![allow(dead_code)] // The full command and flag sets are declared for reference.

use std::mem::{offset_of, size_of};

/// The control device: every control command goes here.
pub const CONTROL_PATH: &str = "/dev/ublk-control";
/// The per-device character device that carries the I/O commands: `/dev/ublkcN`.
pub const CHAR_PREFIX: &str = "/dev/ublkc";
/// The block device the kernel exposes: `/dev/ublkbN`.
pub const BLOCK_PREFIX: &str = "/dev/ublkb";

// ---- ioctl-style command encoding (`_IOR` / `_IOWR` with type 'u') -------------------------

const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;
const IOC_TYPE_UBLK: u32 = b'u' as u32;

const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | (IOC_TYPE_UBLK << 8) | nr
}
const fn ior(nr: u32, size: usize) -> u32 {
    ioc(IOC_READ, nr, size)
}
const fn iowr(nr: u32, size: usize) -> u32 {
    ioc(IOC_READ | IOC_WRITE, nr, size)
}

const CTRL: usize = size_of::<CtrlCmd>();
const IOCMD: usize = size_of::<IoCmd>();

/// `UBLK_U_CMD_GET_DEV_INFO`: reads the device's `ublksrv_ctrl_dev_info`.
pub const CMD_GET_DEV_INFO: u32 = ior(0x02, CTRL);
/// `UBLK_U_CMD_ADD_DEV`: creates a device from a `ublksrv_ctrl_dev_info` (read back filled).
pub const CMD_ADD_DEV: u32 = iowr(0x04, CTRL);
/// `UBLK_U_CMD_DEL_DEV`: removes a stopped device (waits until its char device is closed).
pub const CMD_DEL_DEV: u32 = iowr(0x05, CTRL);
/// `UBLK_U_CMD_START_DEV`: exposes `/dev/ublkbN` once every tag of every queue is fetched.
pub const CMD_START_DEV: u32 = iowr(0x06, CTRL);
/// `UBLK_U_CMD_STOP_DEV`: removes `/dev/ublkbN`.
pub const CMD_STOP_DEV: u32 = iowr(0x07, CTRL);
/// `UBLK_U_CMD_SET_PARAMS`: sets the `ublk_params` (before START_DEV).
pub const CMD_SET_PARAMS: u32 = iowr(0x08, CTRL);
/// `UBLK_U_CMD_GET_PARAMS`: reads the `ublk_params`.
pub const CMD_GET_PARAMS: u32 = ior(0x09, CTRL);
/// `UBLK_U_CMD_START_USER_RECOVERY`: begins reattaching a new server to a quiesced device.
pub const CMD_START_USER_RECOVERY: u32 = iowr(0x10, CTRL);
/// `UBLK_U_CMD_END_USER_RECOVERY`: completes it once every tag is fetched again.
pub const CMD_END_USER_RECOVERY: u32 = iowr(0x11, CTRL);

/// `UBLK_U_IO_FETCH_REQ`: hands a tag (and its buffer) to the driver, first time.
pub const IO_FETCH_REQ: u32 = iowr(0x20, IOCMD);
/// `UBLK_U_IO_COMMIT_AND_FETCH_REQ`: completes the tag's request and fetches the next.
pub const IO_COMMIT_AND_FETCH_REQ: u32 = iowr(0x21, IOCMD);

/// A fetch completed with a request to handle.
pub const IO_RES_OK: i32 = 0;
/// The driver will send nothing more on this tag (device stopping or server exiting).
pub const IO_RES_ABORT: i32 = -libc::ENODEV;

/// Offset in the char device of queue 0's descriptor table.
pub const CMD_BUF_OFFSET: u64 = 0;
/// Most tags per queue.
pub const MAX_QUEUE_DEPTH: u16 = 4096;
/// Most queues per device.
pub const MAX_NR_QUEUES: u16 = 4096;
/// Largest buffer for one request (`UBLK_IO_BUF_BITS` = 25: 32 MiB).
pub const MAX_IO_BUF_BYTES: u32 = 1 << 25;

// ---- feature flags (`ublksrv_ctrl_dev_info.flags`) ----------------------------------------

/// `UBLK_F_URING_CMD_COMP_IN_TASK`.
pub const F_URING_CMD_COMP_IN_TASK: u64 = 1 << 1;
/// `UBLK_F_USER_RECOVERY`: the block device survives the server; I/O waits for a new one.
pub const F_USER_RECOVERY: u64 = 1 << 3;
/// `UBLK_F_USER_RECOVERY_REISSUE`: requests in flight at the old server go to the new one.
pub const F_USER_RECOVERY_REISSUE: u64 = 1 << 4;
/// `UBLK_F_CMD_IOCTL_ENCODE`: commands use the ioctl encoding (as here).
pub const F_CMD_IOCTL_ENCODE: u64 = 1 << 6;

// ---- device states -------------------------------------------------------------------------

/// `UBLK_S_DEV_DEAD`: added, not started (or stopped).
pub const S_DEV_DEAD: u16 = 0;
/// `UBLK_S_DEV_LIVE`: started and served.
pub const S_DEV_LIVE: u16 = 1;
/// `UBLK_S_DEV_QUIESCED`: its server died; waiting for user recovery.
pub const S_DEV_QUIESCED: u16 = 2;

// ---- request operations and flags (`ublksrv_io_desc.op_flags`) ----------------------------

/// `UBLK_IO_OP_READ`.
pub const IO_OP_READ: u8 = 0;
/// `UBLK_IO_OP_WRITE`.
pub const IO_OP_WRITE: u8 = 1;
/// `UBLK_IO_OP_FLUSH`.
pub const IO_OP_FLUSH: u8 = 2;
/// `UBLK_IO_OP_DISCARD`.
pub const IO_OP_DISCARD: u8 = 3;
/// `UBLK_IO_OP_WRITE_SAME` (never sent by current kernels).
pub const IO_OP_WRITE_SAME: u8 = 4;
/// `UBLK_IO_OP_WRITE_ZEROES`.
pub const IO_OP_WRITE_ZEROES: u8 = 5;

/// `UBLK_IO_F_FUA` (in `op_flags`, not shifted): the write must be durable on completion.
pub const IO_F_FUA: u32 = 1 << 13;
/// `UBLK_IO_F_NOUNMAP`: a write-zeroes that must not deallocate.
pub const IO_F_NOUNMAP: u32 = 1 << 15;

// ---- parameters ----------------------------------------------------------------------------

/// `UBLK_ATTR_READ_ONLY`: the disk is read-only (the block layer refuses writes).
pub const ATTR_READ_ONLY: u32 = 1 << 0;
/// `UBLK_ATTR_VOLATILE_CACHE`: the device has a write cache, so FLUSH requests are sent.
pub const ATTR_VOLATILE_CACHE: u32 = 1 << 2;
/// `UBLK_ATTR_FUA`: the device honours FUA, so writes may carry it.
pub const ATTR_FUA: u32 = 1 << 3;

/// `UBLK_PARAM_TYPE_BASIC`.
pub const PARAM_TYPE_BASIC: u32 = 1 << 0;
/// `UBLK_PARAM_TYPE_DISCARD`.
pub const PARAM_TYPE_DISCARD: u32 = 1 << 1;
/// `UBLK_PARAM_TYPE_DEVT` (read-only: GET_PARAMS after START_DEV).
pub const PARAM_TYPE_DEVT: u32 = 1 << 2;

/// `struct ublksrv_ctrl_cmd`: the payload of a control command, in the SQE's command area.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CtrlCmd {
    /// Target device (`u32::MAX` in ADD_DEV: allocate one).
    pub dev_id: u32,
    /// Target queue; `u16::MAX` when the command is not for a queue.
    pub queue_id: u16,
    /// Length of the buffer at `addr`.
    pub len: u16,
    /// User address of the command's buffer (in or out).
    pub addr: u64,
    /// Inline argument (the server's pid for START_DEV / END_USER_RECOVERY).
    pub data: [u64; 1],
    /// For unprivileged devices and GET_DEV_INFO2 only.
    pub dev_path_len: u16,
    /// Padding.
    pub pad: u16,
    /// Reserved.
    pub reserved: u32,
}

/// `struct ublksrv_ctrl_dev_info`: a device's shape and state.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DevInfo {
    /// Queues (each served by one thread with one ring).
    pub nr_hw_queues: u16,
    /// Tags per queue.
    pub queue_depth: u16,
    /// `S_DEV_*`.
    pub state: u16,
    /// Padding.
    pub pad0: u16,
    /// Largest request in bytes (the size of each tag's buffer).
    pub max_io_buf_bytes: u32,
    /// Device number N of `/dev/ublkbN`.
    pub dev_id: u32,
    /// Pid of the serving process.
    pub ublksrv_pid: i32,
    /// Padding.
    pub pad1: u32,
    /// `F_*` feature flags.
    pub flags: u64,
    /// For the server's own use; the driver keeps it.
    pub ublksrv_flags: u64,
    /// Set by the kernel.
    pub owner_uid: u32,
    /// Set by the kernel.
    pub owner_gid: u32,
    /// Reserved.
    pub reserved1: u64,
    /// Reserved.
    pub reserved2: u64,
}

/// `struct ublk_param_basic`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParamBasic {
    /// `ATTR_*`.
    pub attrs: u32,
    /// log2 of the logical block size (9 to 12).
    pub logical_bs_shift: u8,
    /// log2 of the physical block size.
    pub physical_bs_shift: u8,
    /// log2 of the optimal I/O size.
    pub io_opt_shift: u8,
    /// log2 of the minimal I/O size.
    pub io_min_shift: u8,
    /// Largest request in 512-byte sectors (at most `max_io_buf_bytes / 512`).
    pub max_sectors: u32,
    /// Chunk size in sectors (0: none).
    pub chunk_sectors: u32,
    /// Device size in 512-byte sectors.
    pub dev_sectors: u64,
    /// Virtual boundary mask (0: none).
    pub virt_boundary_mask: u64,
}

/// `struct ublk_param_discard`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParamDiscard {
    /// Discard alignment in bytes.
    pub discard_alignment: u32,
    /// Discard granularity in bytes (non-zero).
    pub discard_granularity: u32,
    /// Largest discard in sectors.
    pub max_discard_sectors: u32,
    /// Largest write-zeroes in sectors.
    pub max_write_zeroes_sectors: u32,
    /// Must be 1 when `max_discard_sectors` is set.
    pub max_discard_segments: u16,
    /// Reserved.
    pub reserved0: u16,
}

/// `struct ublk_param_devt` (filled by the kernel).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParamDevt {
    /// Char device major.
    pub char_major: u32,
    /// Char device minor.
    pub char_minor: u32,
    /// Block device major.
    pub disk_major: u32,
    /// Block device minor.
    pub disk_minor: u32,
}

/// `struct ublk_params`, up to and including `devt`; the kernel copies `len` bytes, so the
/// later parameter kinds (zoned, DMA alignment, segments) stay zero and unused.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Params {
    /// Bytes of this struct the kernel reads or writes.
    pub len: u32,
    /// `PARAM_TYPE_*` present.
    pub types: u32,
    /// Basic limits.
    pub basic: ParamBasic,
    /// Discard and write-zeroes limits.
    pub discard: ParamDiscard,
    /// Device numbers (read-only).
    pub devt: ParamDevt,
    /// Explicit tail padding up to the struct's 8-byte alignment (overlaps the kernel's
    /// `zoned.max_open_zones`, which stays zero because ZONED is never set).
    pub pad: u32,
}

/// `struct ublksrv_io_desc`: one request, in the table the driver shares read-only.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoDesc {
    /// Operation in bits 0-7, flags above.
    pub op_flags: u32,
    /// Length in 512-byte sectors.
    pub nr_sectors: u32,
    /// First 512-byte sector.
    pub start_sector: u64,
    /// The buffer the driver copied to or will copy from (the one the server gave).
    pub addr: u64,
}

impl IoDesc {
    /// The operation (`IO_OP_*`).
    pub fn op(&self) -> u8 {
        (self.op_flags & 0xff) as u8
    }
}

/// `struct ublksrv_io_cmd`: the payload of FETCH_REQ and COMMIT_AND_FETCH_REQ.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoCmd {
    /// Queue.
    pub q_id: u16,
    /// Tag.
    pub tag: u16,
    /// Result of the request being committed: bytes done, or a negative errno.
    pub result: i32,
    /// The tag's buffer for the next request.
    pub addr: u64,
}

/// Bytes of one queue's descriptor table slot in the char device's mmap space
/// (`ublk_max_cmd_buf_size`): room for the largest queue depth, rounded to pages.
pub fn max_cmd_buf_size(page: usize) -> u64 {
    (usize::from(MAX_QUEUE_DEPTH) * size_of::<IoDesc>()).next_multiple_of(page) as u64
}

/// Bytes of a queue's descriptor table as mapped (`ublk_queue_cmd_buf_size`).
pub fn queue_cmd_buf_size(depth: u16, page: usize) -> usize {
    (usize::from(depth) * size_of::<IoDesc>()).next_multiple_of(page)
}

// Checked against the kernel header: sizes, and offsets where an error would be silent.
const _: () = {
    assert!(size_of::<CtrlCmd>() == 32);
    assert!(offset_of!(CtrlCmd, addr) == 8);
    assert!(offset_of!(CtrlCmd, data) == 16);
    assert!(offset_of!(CtrlCmd, dev_path_len) == 24);
    assert!(size_of::<DevInfo>() == 64);
    assert!(offset_of!(DevInfo, max_io_buf_bytes) == 8);
    assert!(offset_of!(DevInfo, ublksrv_pid) == 16);
    assert!(offset_of!(DevInfo, flags) == 24);
    assert!(offset_of!(DevInfo, owner_uid) == 40);
    assert!(size_of::<ParamBasic>() == 32);
    assert!(offset_of!(ParamBasic, max_sectors) == 8);
    assert!(offset_of!(ParamBasic, dev_sectors) == 16);
    assert!(size_of::<ParamDiscard>() == 20);
    assert!(size_of::<ParamDevt>() == 16);
    assert!(offset_of!(Params, basic) == 8);
    assert!(offset_of!(Params, discard) == 40);
    assert!(offset_of!(Params, devt) == 60);
    assert!(size_of::<Params>() == 80);
    assert!(size_of::<IoDesc>() == 24);
    assert!(offset_of!(IoDesc, start_sector) == 8);
    assert!(size_of::<IoCmd>() == 16);
    assert!(offset_of!(IoCmd, addr) == 8);
    // Spot checks of the encoding against values computed from the C macros.
    assert!(CMD_ADD_DEV == 0xc020_7504);
    assert!(CMD_GET_DEV_INFO == 0x8020_7502);
    assert!(IO_FETCH_REQ == 0xc010_7520);
    assert!(IO_COMMIT_AND_FETCH_REQ == 0xc010_7521);
};
