//! Units and domain values shared by every part of the journal: sequence numbers, times,
//! volume indexes, capture events and bookmarks.

use std::fmt;

use bytes::Bytes;

use crate::error::{JournalError, Result};

/// A sequence number in the capture stream. Zero means "before the first event".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Seq(pub u64);

impl Seq {
    /// The position before any event.
    pub const ZERO: Seq = Seq(0);

    /// The next sequence number.
    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A wall-clock time in nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Nanos(pub u64);

impl Nanos {
    /// Nanoseconds in a second.
    pub const SECOND: u64 = 1_000_000_000;

    /// `self - other`, or zero when `other` is later.
    pub fn saturating_sub(self, other: Nanos) -> std::time::Duration {
        std::time::Duration::from_nanos(self.0.saturating_sub(other.0))
    }

    /// This time moved back by `d` (saturating at the epoch).
    pub fn minus(self, d: std::time::Duration) -> Nanos {
        Nanos(self.0.saturating_sub(d.as_nanos().min(u64::MAX as u128) as u64))
    }

    /// This time moved forward by `d`.
    pub fn plus(self, d: std::time::Duration) -> Nanos {
        Nanos(self.0.saturating_add(d.as_nanos().min(u64::MAX as u128) as u64))
    }
}

/// Index of a volume inside a consistency group that shares one timeline (0 for a single
/// volume).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct VolumeId(pub u16);

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Who asked for a bookmark, which tells how consistent the point is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum BookmarkKind {
    /// A name a person gave; crash-consistent.
    User = 1,
    /// Taken with the filesystem frozen (FIFREEZE/FITHAW); filesystem-consistent.
    Filesystem = 2,
    /// Taken after an application hook flushed its state; application-consistent.
    Application = 3,
}

impl BookmarkKind {
    /// All kinds, in code order.
    pub const ALL: [BookmarkKind; 3] =
        [BookmarkKind::User, BookmarkKind::Filesystem, BookmarkKind::Application];

    pub(crate) fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::User),
            2 => Some(Self::Filesystem),
            3 => Some(Self::Application),
            _ => None,
        }
    }

    /// The kind's name as used in configuration and output.
    pub fn name(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Filesystem => "filesystem",
            Self::Application => "application",
        }
    }
}

/// A named point in the capture stream. A bookmark is also a barrier: every write before it
/// is ordered before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bookmark {
    /// The name: 1 to 255 bytes of UTF-8, no control characters.
    pub name: String,
    /// Who took it.
    pub kind: BookmarkKind,
    /// The consistency group it spans (0 when the volume is not in a group).
    pub group: u64,
}

/// Longest bookmark name, in bytes.
pub const MAX_BOOKMARK_NAME: usize = 255;

impl Bookmark {
    /// A bookmark, with its name checked.
    pub fn new(name: impl Into<String>, kind: BookmarkKind, group: u64) -> Result<Self> {
        let name = name.into();
        validate_bookmark_name(&name)?;
        Ok(Self { name, kind, group })
    }
}

/// Checks a bookmark name: 1 to 255 bytes, no control characters, not all whitespace.
pub fn validate_bookmark_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("must not be empty")
    } else if name.len() > MAX_BOOKMARK_NAME {
        Some("is longer than 255 bytes")
    } else if name.chars().any(char::is_control) {
        Some("must not contain control characters")
    } else if name.trim().is_empty() {
        Some("must not be only whitespace")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(JournalError::BadBookmark { name: name.to_owned(), reason }),
        None => Ok(()),
    }
}

/// One captured event, as the tap produces it and the journal stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Data written at a byte offset of a volume.
    Write {
        /// Volume in the group.
        volume: VolumeId,
        /// Byte offset.
        offset: u64,
        /// The bytes written.
        data: Bytes,
    },
    /// A range set to zeros (WRITE_ZEROES).
    WriteZeroes {
        /// Volume in the group.
        volume: VolumeId,
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u32,
    },
    /// A range discarded (TRIM). The replica stores it as zeros.
    Discard {
        /// Volume in the group.
        volume: VolumeId,
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u32,
    },
    /// A flush point: every write before it is durable on the source before anything after.
    Barrier,
    /// A named consistency point (also a barrier).
    Bookmark(Bookmark),
    /// A resync starts: the blocks it sends (ordinary [`Event::Write`] and
    /// [`Event::WriteZeroes`] events, interleaved with the application's writes) are not part
    /// of the source's ordered write history, so from here until the matching
    /// [`Event::ResyncEnd`] the replica is not a state the source ever had. Windows may
    /// overlap: the replica is consistent again only when every open id has ended.
    ResyncBegin {
        /// Chosen by the source, nonzero; pairs this begin with its end.
        id: u64,
    },
    /// The resync with this id has sent all of its blocks. When it closes the last open
    /// window, the state after it is consistent again (a recovery point, like a barrier).
    ResyncEnd {
        /// The id of the matching [`Event::ResyncBegin`].
        id: u64,
    },
    /// The volume grew: from here on it holds `new_size` bytes, the range
    /// `old_size..new_size` reading as zeros until written. Ordered like every event: the
    /// states before it have the old size, the states after it the new one. Volumes only
    /// grow (`new_size >= old_size`; equal is a repeat, a no-op); a shrink is refused
    /// wherever it is met. `old_size` is the size its writer saw (the tap's, the target's
    /// own in its journal), so a journal knows the size of every state it holds.
    Resize {
        /// Volume in the group.
        volume: VolumeId,
        /// Size in bytes before the event.
        old_size: u64,
        /// Size in bytes after the event.
        new_size: u64,
    },
}

impl Event {
    /// True for events that end a crash-consistent prefix: barriers, bookmarks and resync
    /// ends (a [`Event::ResyncEnd`] that leaves another window open is not a point in the
    /// retention log; see `RetentionLog`). False for [`Event::ResyncBegin`].
    pub fn is_point(&self) -> bool {
        matches!(self, Event::Barrier | Event::Bookmark(_) | Event::ResyncEnd { .. })
    }

    /// The volume range the event changes, if any: `(volume, offset, len)`.
    pub fn range(&self) -> Option<(VolumeId, u64, u64)> {
        match self {
            Event::Write { volume, offset, data } => Some((*volume, *offset, data.len() as u64)),
            Event::WriteZeroes { volume, offset, len } | Event::Discard { volume, offset, len } => {
                Some((*volume, *offset, u64::from(*len)))
            }
            Event::Barrier
            | Event::Bookmark(_)
            | Event::ResyncBegin { .. }
            | Event::ResyncEnd { .. }
            | Event::Resize { .. } => None,
        }
    }
}
