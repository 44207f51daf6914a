//! The write tap: capture of every write to a protected block device, in order, with its
//! flush/FUA barriers, into the journal's capture stream (`tidemark_journal::Event`).
//!
//! - [`dmlog`]: reader of the dm-log-writes log format (the kernel's `dm-log-writes` target
//!   and QEMU's `blklogwrites` driver), as a capture source and as a replay tool
//!   (`docs/dm-log-writes.md`).
//! - [`intent`]: the persistent write-intent map that bounds the resync after a crash or a
//!   spool overflow (DRBD activity-log style; format in `docs/intent-map.md`).
//! - [`capture`]: the in-process capture API for embedders ([`Tap`]): intent mark, pass-through
//!   to the protected device, spool append, in the capture order.
//! - [`regions`]: sets of regions as sorted runs, shared by the intent map and its callers.
//! - [`ublk`]: the ublk frontend, a user-space block device server over io_uring that
//!   passes `/dev/ublkbN` through to the protected device via a [`Tap`] (Linux >= 6.0).
//!
//! - [`gate`]: the write gate, a bounded hold on new mutations for a consistency group's
//!   bookmark.
//! - [`fuse`]: the FUSE + loop frontend, the fallback where ublk is missing: the volume as a
//!   file on a FUSE mount with a loop device over it, every request through a [`Tap`], or
//!   through any other [`BlockBackend`] (a virtual snapshot).

pub mod capture;
pub mod dmlog;
pub mod error;
pub mod fuse;
pub mod gate;
pub mod intent;
mod le;
pub mod regions;
pub mod ublk;

pub use capture::{
    Captured, CompletionPolicy, HotFullPolicy, Mutation, OverflowState, PendingMutation,
    ResyncCopied, Tap, TapConfig, TapStatus, ZeroBlocks,
};
pub use dmlog::{DmLog, EntryFlags, LogEntry, LogSuper, ReplayPoint, ReplayReport};
pub use error::{Result, TapError};
pub use fuse::{
    BlockBackend, FuseCounters, FuseLoopConfig, FuseLoopFrontend, LoopDevice, LoopOptions,
};
pub use gate::{HoldRefusal, HoldStatus, MAX_HOLD_LEASE, WriteHold};
pub use intent::{IntentConfig, IntentMap, IntentOpenReport, IntentStatus, WriteIntent};
pub use regions::{RegionRun, RegionSet};
pub use ublk::{UblkConfig, UblkServer, UblkStats};
