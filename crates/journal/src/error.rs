//! The journal's error type.
//!
//! Every variant names the object it concerns (a segment file, the manifest, a record at an
//! offset) and, where a value was checked, what was found and what was expected. The
//! `source` of an I/O error is not repeated in the message: the top level prints the chain.

use std::io;

use crate::types::Seq;

/// Result alias for the journal crate.
pub type Result<T, E = JournalError> = std::result::Result<T, E>;

/// What went wrong in the journal.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// An operating-system I/O call failed.
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
    /// A file did not start with the expected magic bytes.
    #[error("{object}: bad magic {found:02x?}, expected {expected:02x?}")]
    BadMagic {
        /// The file or structure.
        object: String,
        /// The bytes found.
        found: Vec<u8>,
        /// The bytes expected.
        expected: Vec<u8>,
    },
    /// A structure is all zeros where a header was expected (a zero-filled or never-written
    /// file).
    #[error("{object}: zero-filled where a header with magic {expected:02x?} was expected")]
    ZeroFilled {
        /// The file or structure.
        object: String,
        /// The magic that should have been there.
        expected: Vec<u8>,
    },
    /// A format version this build cannot read.
    #[error(
        "{object}: format version {found} is not supported (this build reads version {supported})"
    )]
    UnsupportedVersion {
        /// The file or structure.
        object: String,
        /// The version found.
        found: u32,
        /// The newest version this build reads.
        supported: u32,
    },
    /// A header checksum did not match.
    #[error(
        "{object}: header checksum mismatch at offset {offset}: stored {expected:#010x}, computed {got:#010x}"
    )]
    HeaderChecksum {
        /// The file or structure.
        object: String,
        /// Byte offset of the header.
        offset: u64,
        /// The checksum computed over the bytes read.
        got: u32,
        /// The checksum stored in the header.
        expected: u32,
    },
    /// A structure ends before its declared length.
    #[error("{object}: truncated: {needed} bytes needed, {found} present")]
    Truncated {
        /// The file or structure.
        object: String,
        /// Bytes needed.
        needed: u64,
        /// Bytes present.
        found: u64,
    },
    /// A header field holds a value outside its valid range.
    #[error("{object}: field {field} is {found}, expected {expected}")]
    InvalidField {
        /// The file or structure.
        object: String,
        /// The field name as in the format spec.
        field: &'static str,
        /// The value found.
        found: u64,
        /// What a valid value looks like.
        expected: String,
    },
    /// A record failed its checks; the rest of the journal is still readable.
    #[error("segment {segment}: corrupt record at offset {offset}: {reason}")]
    CorruptRecord {
        /// The segment file name.
        segment: String,
        /// Byte offset of the record in the segment.
        offset: u64,
        /// What check failed.
        reason: String,
    },
    /// The journal is encrypted with a different key than the one supplied.
    #[error(
        "{object}: wrong key: the journal was encrypted with a different key (key check value mismatch)"
    )]
    WrongKey {
        /// The manifest or segment.
        object: String,
    },
    /// The journal is encrypted but no key was supplied.
    #[error("{object}: the journal is encrypted at rest and no key was supplied")]
    KeyRequired {
        /// The manifest or segment.
        object: String,
    },
    /// A key was supplied for a journal that is not encrypted.
    #[error("{object}: a key was supplied but the journal is not encrypted at rest")]
    KeyNotExpected {
        /// The manifest.
        object: String,
    },
    /// A record's payload failed authenticated decryption although its checksum matched.
    #[error(
        "segment {segment}: record at offset {offset} failed authentication (wrong key or tampered payload)"
    )]
    Decrypt {
        /// The segment file name.
        segment: String,
        /// Byte offset of the record.
        offset: u64,
    },
    /// The manifest lists a segment that is not on disk.
    #[error("segment {name} is listed in the manifest but missing from the journal directory")]
    MissingSegment {
        /// The segment file name.
        name: String,
    },
    /// A journal directory holds segments but no manifest.
    #[error("journal directory {dir}: segment files present but the manifest is missing")]
    MissingManifest {
        /// The directory.
        dir: String,
    },
    /// A segment belongs to another journal or role.
    #[error("segment {segment}: {what}")]
    ForeignSegment {
        /// The segment file name.
        segment: String,
        /// What does not match.
        what: String,
    },
    /// A record was appended out of sequence order.
    #[error("sequence number {got} appended after {last}: sequence numbers must grow")]
    SeqOrder {
        /// The sequence number offered.
        got: Seq,
        /// The last sequence number in the journal.
        last: Seq,
    },
    /// An earlier I/O error left the journal's state unknown; reopen it to recover.
    #[error(
        "journal refused the operation: an earlier I/O error left its state unknown ({cause}); reopen it"
    )]
    Poisoned {
        /// What the earlier error was.
        cause: String,
    },
    /// The spool is full: the caller must fall back to dirty-region tracking for this event.
    #[error(
        "spool full: {used} of {capacity} bytes in use, {needed} more needed; track the region as dirty instead"
    )]
    SpoolOverflow {
        /// Configured capacity in bytes.
        capacity: u64,
        /// Bytes of unacknowledged records.
        used: u64,
        /// Bytes the refused record needed.
        needed: u64,
    },
    /// A recovery point cannot be resolved.
    #[error("recovery point {point}: {reason}")]
    UnknownPoint {
        /// The point as the caller gave it.
        point: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// An I/O range lies outside the volume.
    #[error("volume {volume}: range {offset}+{len} lies outside the volume of {volume_len} bytes")]
    OutOfRange {
        /// Volume index in the group.
        volume: u16,
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Size of the volume.
        volume_len: u64,
    },
    /// A resize would shrink a volume: volumes only grow.
    #[error(
        "volume {volume}: resize to {new_size} bytes refused: the volume holds {size} bytes and volumes only grow"
    )]
    Shrink {
        /// Volume index in the group.
        volume: u16,
        /// Its size now.
        size: u64,
        /// The size asked for.
        new_size: u64,
    },
    /// A record is larger than the format allows.
    #[error("record payload of {len} bytes exceeds the maximum of {max}")]
    RecordTooLarge {
        /// Payload length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A bookmark name is unusable.
    #[error("bookmark name {name:?}: {reason}")]
    BadBookmark {
        /// The name given.
        name: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A resync begin or end does not fit the windows open at that point of the stream.
    #[error("seq {seq}: resync id {id}: {reason}")]
    Resync {
        /// The sequence number of the offending event.
        seq: Seq,
        /// The resync id it carries.
        id: u64,
        /// What is wrong (for example, an end for a window that is not open).
        reason: String,
    },
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl JournalError {
    pub(crate) fn io(op: &'static str, object: impl Into<String>, source: io::Error) -> Self {
        Self::Io { op, object: object.into(), source }
    }

    /// True when the error is a full disk (ENOSPC or EDQUOT).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, Self::Io { source, .. }
            if matches!(source.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)))
    }
}
