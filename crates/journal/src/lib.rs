//! Tidemark's journal: the durable segment log under the source's spool and the target's
//! continuous-data-protection retention log.
//!
//! - [`io`]: the positional I/O seam ([`BlockIo`], [`Dir`]) with real and fault-injecting
//!   implementations.
//! - [`format`]: the on-disk formats (spec in `docs/journal-format.md`).
//! - [`log`]: the segment-log engine: framing, checksums, encryption, group commit,
//!   recovery.
//! - [`spool`]: the source's durable FIFO.
//! - [`retention`]: the target's CDP history with point-in-time reads and retention
//!   policies.

pub mod clock;
pub mod crypto;
pub mod error;
pub mod format;
pub mod index;
pub mod io;
pub mod log;
pub mod retention;
pub mod spool;
pub mod types;

pub use clock::{Clock, ManualClock, SystemClock};
pub use crypto::JournalKey;
pub use error::{JournalError, Result};
pub use io::{BlockIo, CrashMode, Dir, FileIo, FsDir, MemDir, MemVolume};
pub use retention::{
    CopyMode, JournalDamage, Keep, MaterializeReport, PointHold, PointInfo, PointKind, ReadAhead,
    ReadPlan, RecoveryPoint, ResyncWindowInfo, RetentionConfig, RetentionLog, RetentionPolicy,
    RetentionReport, RetentionStatus, Tier,
};
pub use spool::{Spool, SpoolConfig, SpooledEvent};
pub use types::{Bookmark, BookmarkKind, Event, Nanos, Seq, VolumeId};
