//! The tap's error type.
//!
//! Every variant names the object it concerns (a dm-log-writes log and the entry's index and
//! byte offset, a write-intent map file and its slot, the protected device) and, where a value
//! was checked, what was found and what was expected. The `source` of an underlying error is
//! not repeated in the message: the top level prints the chain.

use std::io;

use tidemark_journal::JournalError;

/// Result alias for the tap crate.
pub type Result<T, E = TapError> = std::result::Result<T, E>;

/// What went wrong in the tap.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TapError {
    /// An operating-system I/O call failed on a log, a map file or a device.
    #[error("{op} failed on {object}")]
    Io {
        /// The operation (`read`, `write`, `fdatasync`, ...).
        op: &'static str,
        /// The file or device it was done on.
        object: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A structure did not start with its magic bytes.
    #[error("{object}: bad magic {found:02x?}, expected {expected:02x?}")]
    BadMagic {
        /// The log super block, map header or slot.
        object: String,
        /// The bytes found.
        found: Vec<u8>,
        /// The bytes expected.
        expected: Vec<u8>,
    },
    /// A format version this build cannot read.
    #[error(
        "{object}: format version {found} is not supported (this build reads version {supported})"
    )]
    UnsupportedVersion {
        /// The log super block or map header.
        object: String,
        /// The version found.
        found: u64,
        /// The version this build reads.
        supported: u64,
    },
    /// A header field holds a value outside its valid range.
    #[error("{object}: field {field} is {found}, expected {expected}")]
    InvalidField {
        /// The structure.
        object: String,
        /// The field name as in the format spec.
        field: &'static str,
        /// The value found.
        found: u64,
        /// What a valid value looks like.
        expected: String,
    },
    /// A dm-log-writes entry runs past the end of the log. The entries before it were
    /// delivered.
    #[error(
        "dm-log-writes log {log}: entry {index} at byte offset {offset} is cut short: it needs \
         {needed} bytes, the log holds {available} from there"
    )]
    TruncatedEntry {
        /// The log file or device.
        log: String,
        /// Index of the entry (0 is the first after the super block).
        index: u64,
        /// Byte offset of the entry header in the log.
        offset: u64,
        /// Bytes the entry (header sector and data) needs.
        needed: u64,
        /// Bytes the log holds from the entry's offset.
        available: u64,
    },
    /// A dm-log-writes entry header is not one the kernel or QEMU writes. The entries before
    /// it were delivered.
    #[error(
        "dm-log-writes log {log}: entry {index} at byte offset {offset} is malformed: {reason}"
    )]
    MalformedEntry {
        /// The log file or device.
        log: String,
        /// Index of the entry.
        index: u64,
        /// Byte offset of the entry header in the log.
        offset: u64,
        /// What check failed.
        reason: String,
    },
    /// A dm-log-writes mark cannot become a bookmark (its text is not a valid bookmark name).
    /// The entry is well framed; reading continues after it.
    #[error("dm-log-writes log {log}: mark in entry {index} at byte offset {offset}: {reason}")]
    BadMark {
        /// The log file or device.
        log: String,
        /// Index of the entry.
        index: u64,
        /// Byte offset of the entry header in the log.
        offset: u64,
        /// Why the text is refused.
        reason: String,
    },
    /// A replay ended before the requested point (flush count or mark) was found.
    #[error("dm-log-writes log {log}: replay point {point} not found in its {entries} entries")]
    ReplayPointNotReached {
        /// The log file or device.
        log: String,
        /// The point as requested.
        point: String,
        /// Entries read.
        entries: u64,
    },
    /// A replay was asked for a point it has already gone past.
    #[error(
        "dm-log-writes log {log}: replay point {point} is behind the replay position (entry {entries})"
    )]
    ReplayPointPassed {
        /// The log file or device.
        log: String,
        /// The point as requested.
        point: String,
        /// Entries already replayed.
        entries: u64,
    },
    /// A byte range lies outside a device or volume.
    #[error("{object}: range {offset}+{len} lies outside its {object_len} bytes")]
    OutOfRange {
        /// The device, replay target or volume.
        object: String,
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Size of the object.
        object_len: u64,
    },
    /// A volume would shrink: a protected volume only grows (the pair stays paused until
    /// the device is back to at least its size).
    #[error(
        "{object}: shrinking from {size} to {new_size} bytes is refused: a protected volume only grows"
    )]
    Shrink {
        /// The device or map.
        object: String,
        /// Its size now.
        size: u64,
        /// The size it was asked to take.
        new_size: u64,
    },
    /// A checksum did not match.
    #[error(
        "{object}: {what} checksum mismatch at byte offset {offset}: stored {stored:#010x}, computed {computed:#010x}"
    )]
    ChecksumMismatch {
        /// The map file and slot.
        object: String,
        /// Which checksum (`header`, `runs`).
        what: &'static str,
        /// Byte offset of the checksummed structure.
        offset: u64,
        /// The checksum stored.
        stored: u32,
        /// The checksum computed over the bytes read.
        computed: u32,
    },
    /// Neither slot of a write-intent map holds a valid image: the dirty regions are unknown
    /// and the whole volume needs a resync.
    #[error(
        "write-intent map {map}: no valid slot (slot 0: {slot0}; slot 1: {slot1}); the dirty \
         regions are unknown, resync the whole volume"
    )]
    NoValidSlot {
        /// The map file.
        map: String,
        /// Why slot 0 was refused.
        slot0: String,
        /// Why slot 1 was refused.
        slot1: String,
    },
    /// A write-intent map was opened with a geometry other than the one it was created with.
    #[error("write-intent map {map}: created with {field} = {found}, opened with {expected}")]
    MapMismatch {
        /// The map file.
        map: String,
        /// The header field.
        field: &'static str,
        /// The value in the file.
        found: u64,
        /// The value the caller asked for.
        expected: u64,
    },
    /// Admitting a write would make more regions hot than the configured bound: back-pressure.
    /// Wait for acknowledgements to free regions, or track the range as out of sync.
    #[error(
        "write-intent map {map}: {needed} more hot regions needed, {hot} of {limit} in use \
         (resync bound {resync_bound_bytes} bytes)"
    )]
    HotRegionsFull {
        /// The map file.
        map: String,
        /// Hot regions in use (with unacknowledged writes).
        hot: u64,
        /// Regions the refused write would add.
        needed: u64,
        /// The configured bound.
        limit: u64,
        /// The resync after a crash that the bound implies, in bytes.
        resync_bound_bytes: u64,
    },
    /// An earlier I/O error left the object's on-disk state unknown; reopen it.
    #[error(
        "{object} refused the operation: an earlier I/O error left its state unknown ({cause}); reopen it"
    )]
    Poisoned {
        /// The map file.
        object: String,
        /// What the earlier error was.
        cause: String,
    },
    /// A spool operation failed.
    #[error("spool {op} failed")]
    Spool {
        /// The operation (`append`, `sync`, `ack`, `close`, `read`).
        op: &'static str,
        /// The journal's error.
        #[source]
        source: JournalError,
    },
    /// A resync copy or marker was asked for while the tap is not spooling (overflow): the
    /// caller resumes spooling first ([`crate::Tap::resume_spooling`]).
    #[error("{what} refused: the tap is in overflow and not spooling ({cause})")]
    NotSpooling {
        /// What was asked (`resync copy of 4096 bytes at 8192`).
        what: String,
        /// Why the tap stopped spooling.
        cause: String,
    },
    /// A configuration value is invalid.
    /// A write hold (consistency-group bookmark) was refused or is no longer in force.
    #[error("{0}")]
    Hold(crate::gate::HoldRefusal),
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A FUSE frontend's mount point is already mounted by something alive (another
    /// agent's FUSE server, or any other filesystem); it is not mounted over.
    #[error("mount point {mountpoint} is in use by a live {fstype} mount of {mounted}")]
    MountPointBusy {
        /// The mount point.
        mountpoint: String,
        /// The filesystem type mounted there.
        fstype: String,
        /// What is mounted there (the mount's source).
        mounted: String,
    },
    /// A FUSE frontend's volume was still in use when it was torn down: the FUSE connection
    /// was aborted, and whoever still uses the volume (the loop device's users) gets I/O
    /// errors. The frontend is torn down all the same.
    #[error(
        "FUSE mount {mountpoint} still in use after {waited_ms} ms ({holder}): its FUSE \
         connection was aborted, remaining users get I/O errors"
    )]
    TeardownForced {
        /// The mount point.
        mountpoint: String,
        /// Who still held the volume (a loop device and its users, or an open file).
        holder: String,
        /// How long the teardown waited.
        waited_ms: u64,
    },
    /// A mutation was asked of a read-only block backend (a read-only virtual snapshot).
    #[error("{op} refused: {object} is read-only")]
    ReadOnly {
        /// The backend.
        object: String,
        /// What was asked (`write of 4096 bytes at 8192`).
        op: String,
    },
    /// A block backend other than the tap failed a request (its own error is the source).
    #[error("{op} failed on {object}")]
    Backend {
        /// The request (`read`, `write`, ...).
        op: &'static str,
        /// The backend (`virtual snapshot 3 of seq 1200`).
        object: String,
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The ublk driver is not usable here: its control device does not open (module
    /// `ublk_drv` not loaded, a kernel older than 6.0, or not root).
    #[error("ublk control device {path} is not available (is the ublk_drv module loaded?)")]
    UblkUnavailable {
        /// The control device's path.
        path: String,
        /// Why it did not open.
        #[source]
        source: io::Error,
    },
    /// A ublk control command failed.
    #[error("ublk {command} failed for {device}")]
    UblkCommand {
        /// The command (`ADD_DEV`, `START_DEV`, ...).
        command: &'static str,
        /// The device (`ublk device N`).
        device: String,
        /// The driver's answer.
        #[source]
        source: io::Error,
    },
    /// A ublk queue thread failed; the queue no longer serves requests.
    #[error("ublk device {dev} queue {queue}: {reason}")]
    UblkQueue {
        /// The device number.
        dev: u32,
        /// The queue (`65535` when no single queue is concerned).
        queue: u16,
        /// What went wrong.
        reason: String,
    },
}

impl TapError {
    pub(crate) fn io(op: &'static str, object: impl Into<String>, source: io::Error) -> Self {
        Self::Io { op, object: object.into(), source }
    }
}
