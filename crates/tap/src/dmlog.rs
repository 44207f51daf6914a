//! Reader of the dm-log-writes log format, as written by the kernel's `dm-log-writes`
//! device-mapper target and by QEMU's `blklogwrites` block driver: the entries, the capture
//! events they stand for, and a replay onto a device up to a flush or a mark (what xfstests'
//! `replay-log` does).
//!
//! This module owns the interpretation of that format; `docs/dm-log-writes.md` is its written
//! form, with what was verified against real `qemu-io` output.
//!
//! The layout, all integers little-endian: a super block `{magic, version, nr_entries,
//! sectorsize}` at byte 0, padded to one `sectorsize` sector; then `nr_entries` entries, each a
//! header `{sector, nr_sectors, flags, data_len}` padded to one sector, followed (unless the
//! entry is a discard) by `nr_sectors * sectorsize` bytes of data. Both `sector` and
//! `nr_sectors` count `sectorsize` units (the kernel converts bio sectors with
//! `bio_to_dev_sectors`, QEMU shifts by the log sector size), so the device byte offset is
//! `sector * sectorsize`. A mark's text sits in its header sector after the 32-byte header,
//! `data_len` bytes long.
//!
//! Parsing is defensive: the super block's `nr_entries` is only a loop bound, never a size;
//! every entry is checked against the log's length before anything is read or allocated, and
//! all arithmetic on header fields is checked. A truncated or malformed entry ends the
//! iteration with an error naming the entry's index and byte offset; the entries before it
//! have been delivered.
//!
//! Mapping to capture events (one entry can give several, in this order):
//! 1. FLUSH: a [`Event::Barrier`] first. The kernel logs a flush after the writes that had
//!    completed when it was issued, and a FLUSH entry that carries data is a preflush: the
//!    barrier comes before its write.
//! 2. The data: [`Event::Write`] (split into pieces of at most `max_event_bytes`), or for a
//!    DISCARD entry, [`Event::Discard`] (split at 1 GiB so the length fits).
//! 3. FUA: a [`Event::Barrier`] after the write (the write itself is durable once it
//!    completes, and the kernel logs it only then). A FLUSH|FUA entry without data gives one
//!    barrier, not two.
//! 4. MARK: an [`Event::Bookmark`] of kind [`BookmarkKind::User`] named by the mark's text.
//!
//! METADATA (REQ_META) changes nothing in the stream.

use std::collections::VecDeque;
use std::fmt;

use bytes::Bytes;
use tidemark_journal::{BlockIo, Bookmark, BookmarkKind, Event, VolumeId};

use crate::error::{Result, TapError};
use crate::le::{le32, le64};

/// The super block's magic number (`"rhswfsj\0"` on disk).
pub const LOG_MAGIC: u64 = 0x006a_7366_7773_6872;
/// The only format version the kernel and QEMU write.
pub const LOG_VERSION: u64 = 1;
/// Bytes of the super block's fields (the rest of its sector is padding).
pub const SUPER_LEN: usize = 28;
/// Bytes of an entry header's fields (the rest of its sector is padding or mark text).
pub const ENTRY_HEADER_LEN: usize = 32;
/// Smallest sector size accepted (the smallest logical block size a Linux device has).
pub const MIN_SECTOR_SIZE: u32 = 512;
/// Largest sector size accepted (QEMU accepts powers of two below 2^24).
pub const MAX_SECTOR_SIZE: u32 = 1 << 23;
/// Default size of the pieces a large write entry is split into as events.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1 << 20;
/// Largest piece size allowed (the journal's largest record payload).
pub const MAX_EVENT_BYTES: usize = tidemark_journal::format::MAX_PAYLOAD;
/// Discard events are split at this length so that it fits the event's `u32` length.
const MAX_RANGE_EVENT: u64 = 1 << 30;
/// Bytes after a non-mark entry header that must be zero padding (as xfstests checks).
const PADDING_CHECK_LEN: usize = 512;
/// Buffer size used to copy data during a replay.
const COPY_CHUNK: usize = 1 << 20;

/// The flags word of an entry.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct EntryFlags(pub u64);

impl EntryFlags {
    /// REQ_PREFLUSH: every write completed before it is durable.
    pub const FLUSH: EntryFlags = EntryFlags(1 << 0);
    /// REQ_FUA: this write is durable when it completes.
    pub const FUA: EntryFlags = EntryFlags(1 << 1);
    /// A discard: no data follows the header.
    pub const DISCARD: EntryFlags = EntryFlags(1 << 2);
    /// A mark (`dmsetup message <dev> 0 mark <text>`): the text is in the header sector.
    pub const MARK: EntryFlags = EntryFlags(1 << 3);
    /// REQ_META: the write carried filesystem metadata (informational).
    pub const METADATA: EntryFlags = EntryFlags(1 << 4);
    /// Every flag bit this reader knows.
    pub const KNOWN: EntryFlags = EntryFlags(0x1f);

    /// True when every bit of `other` is set.
    pub fn contains(self, other: EntryFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// The raw bits.
    pub fn bits(self) -> u64 {
        self.0
    }
}

impl fmt::Debug for EntryFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (Self::FLUSH, "FLUSH"),
            (Self::FUA, "FUA"),
            (Self::DISCARD, "DISCARD"),
            (Self::MARK, "MARK"),
            (Self::METADATA, "METADATA"),
        ];
        let mut first = true;
        for (flag, name) in names {
            if self.contains(flag) {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        let unknown = self.0 & !Self::KNOWN.0;
        if unknown != 0 {
            if !first {
                f.write_str("|")?;
            }
            write!(f, "{unknown:#x}")?;
            first = false;
        }
        if first {
            f.write_str("NONE")?;
        }
        Ok(())
    }
}

/// The log's super block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogSuper {
    /// Entries the writer last recorded as logged. The kernel rewrites it after FUA and MARK
    /// entries, QEMU after every flush entry, so a log cut by a crash can hold a few more.
    pub nr_entries: u64,
    /// The unit of `sector`, `nr_sectors` and of the log's own layout, in bytes.
    pub sector_size: u32,
}

impl LogSuper {
    /// Decodes and validates the first [`SUPER_LEN`] bytes of a log.
    pub fn decode(b: &[u8], object: &str) -> Result<LogSuper> {
        if b.len() < SUPER_LEN {
            return Err(TapError::InvalidField {
                object: object.to_owned(),
                field: "log length",
                found: b.len() as u64,
                expected: format!("at least {SUPER_LEN} bytes for the super block"),
            });
        }
        let magic = le64(b, 0);
        if magic != LOG_MAGIC {
            return Err(TapError::BadMagic {
                object: object.to_owned(),
                found: b[0..8].to_vec(),
                expected: LOG_MAGIC.to_le_bytes().to_vec(),
            });
        }
        let version = le64(b, 8);
        if version != LOG_VERSION {
            return Err(TapError::UnsupportedVersion {
                object: object.to_owned(),
                found: version,
                supported: LOG_VERSION,
            });
        }
        let nr_entries = le64(b, 16);
        let sector_size = le32(b, 24);
        if !sector_size.is_power_of_two()
            || !(MIN_SECTOR_SIZE..=MAX_SECTOR_SIZE).contains(&sector_size)
        {
            return Err(TapError::InvalidField {
                object: object.to_owned(),
                field: "sectorsize",
                found: u64::from(sector_size),
                expected: format!("a power of two from {MIN_SECTOR_SIZE} to {MAX_SECTOR_SIZE}"),
            });
        }
        Ok(LogSuper { nr_entries, sector_size })
    }
}

/// Where the next entry starts: its index and the byte offset of its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cursor {
    /// Index of the entry (0 is the first after the super block).
    pub index: u64,
    /// Byte offset of its header in the log.
    pub offset: u64,
}

/// One entry of the log, validated; its data stays in the log until read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Index of the entry (0 is the first after the super block).
    pub index: u64,
    /// Byte offset of the entry header in the log.
    pub offset: u64,
    /// First device sector written, in `sector_size` units.
    pub sector: u64,
    /// Sectors written or discarded, in `sector_size` units.
    pub nr_sectors: u64,
    /// The flags.
    pub flags: EntryFlags,
    /// The `data_len` field: the mark text's length for a mark.
    pub data_len: u64,
    /// The mark's text, for a MARK entry.
    pub mark: Option<Vec<u8>>,
    /// The log's sector size.
    pub sector_size: u32,
}

impl LogEntry {
    /// Byte offset on the device (checked not to overflow when the entry was read).
    pub fn device_offset(&self) -> u64 {
        self.sector * u64::from(self.sector_size)
    }

    /// Bytes written or discarded on the device.
    pub fn device_len(&self) -> u64 {
        self.nr_sectors * u64::from(self.sector_size)
    }

    /// Byte offset of the entry's data in the log.
    pub fn payload_offset(&self) -> u64 {
        self.offset + u64::from(self.sector_size)
    }

    /// Bytes of data following the header in the log (none for a discard).
    pub fn payload_len(&self) -> u64 {
        if self.flags.contains(EntryFlags::DISCARD) { 0 } else { self.device_len() }
    }

    /// Where the entry after this one starts.
    pub fn next(&self) -> Cursor {
        Cursor { index: self.index + 1, offset: self.payload_offset() + self.payload_len() }
    }

    /// True for an entry that ends a replay step of xfstests' `--check flush` / `--check
    /// fua`: it carries FLUSH or FUA.
    pub fn is_flush_point(&self) -> bool {
        self.flags.0 & (EntryFlags::FLUSH.0 | EntryFlags::FUA.0) != 0
    }

    /// True when the entry writes data to the device.
    pub fn is_write(&self) -> bool {
        self.nr_sectors > 0 && !self.flags.contains(EntryFlags::DISCARD)
    }
}

/// A dm-log-writes log opened for reading (see the module documentation).
#[derive(Debug)]
pub struct DmLog<'a> {
    io: &'a dyn BlockIo,
    name: String,
    sup: LogSuper,
    len: u64,
    max_event_bytes: usize,
    device_len: Option<u64>,
}

impl<'a> DmLog<'a> {
    /// Opens a log: reads and validates the super block.
    pub fn open(io: &'a dyn BlockIo) -> Result<Self> {
        let name = io.name();
        let (sup, len) = read_super(io, &name)?;
        Ok(Self { io, name, sup, len, max_event_bytes: DEFAULT_MAX_EVENT_BYTES, device_len: None })
    }

    /// Sets the largest [`Event::Write`] the event iterator produces (rounded down to whole
    /// sectors, at least one sector, at most [`MAX_EVENT_BYTES`]).
    pub fn with_max_event_bytes(mut self, bytes: usize) -> Self {
        self.max_event_bytes = bytes.min(MAX_EVENT_BYTES);
        self
    }

    /// Refuses entries whose range ends past `bytes`, the size of the logged device (as a
    /// [`TapError::MalformedEntry`]). Without it any range that fits in 64 bits is accepted,
    /// and a discard can claim an arbitrarily large range (its data is not in the log).
    pub fn with_device_len(mut self, bytes: u64) -> Self {
        self.device_len = Some(bytes);
        self
    }

    /// The log's name (its file or device).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The super block as last read.
    pub fn super_block(&self) -> LogSuper {
        self.sup
    }

    /// The log's length in bytes as last read.
    pub fn log_len(&self) -> u64 {
        self.len
    }

    /// Re-reads the super block and the length, to follow a log that is still being written.
    /// The sector size must not change.
    pub fn refresh(&mut self) -> Result<()> {
        let (sup, len) = read_super(self.io, &self.name)?;
        if sup.sector_size != self.sup.sector_size {
            return Err(TapError::InvalidField {
                object: format!("dm-log-writes log {} super block", self.name),
                field: "sectorsize",
                found: u64::from(sup.sector_size),
                expected: format!("{} (its value when the log was opened)", self.sup.sector_size),
            });
        }
        self.sup = sup;
        self.len = len;
        Ok(())
    }

    /// The position of the first entry.
    pub fn start(&self) -> Cursor {
        Cursor { index: 0, offset: u64::from(self.sup.sector_size) }
    }

    /// Reads and validates the entry at `at` (which must be the start or an entry's
    /// [`LogEntry::next`]).
    pub fn read_entry(&self, at: Cursor) -> Result<LogEntry> {
        let ss = u64::from(self.sup.sector_size);
        let malformed = |reason: String| TapError::MalformedEntry {
            log: self.name.clone(),
            index: at.index,
            offset: at.offset,
            reason,
        };
        let available = self.len.saturating_sub(at.offset);
        if available < ss {
            return Err(TapError::TruncatedEntry {
                log: self.name.clone(),
                index: at.index,
                offset: at.offset,
                needed: ss,
                available,
            });
        }
        let head_len = (ss as usize).min(PADDING_CHECK_LEN);
        let mut head = vec![0u8; head_len];
        self.read_exact(&mut head, at.offset)?;
        let sector = le64(&head, 0);
        let nr_sectors = le64(&head, 8);
        let flags = EntryFlags(le64(&head, 16));
        let data_len = le64(&head, 24);

        let unknown = flags.0 & !EntryFlags::KNOWN.0;
        if unknown != 0 {
            return Err(malformed(format!(
                "unknown flag bits {unknown:#x} in flags {:#x}",
                flags.0
            )));
        }
        if flags.0 == 0 && nr_sectors == 0 {
            return Err(malformed(
                "all-zero header: neither flags nor sectors (not an entry, or a log cut short)"
                    .to_owned(),
            ));
        }
        let device_offset = sector.checked_mul(ss);
        let device_len = nr_sectors.checked_mul(ss);
        let (Some(device_offset), Some(device_len)) = (device_offset, device_len) else {
            return Err(malformed(format!(
                "sector {sector} + {nr_sectors} sectors of {ss} bytes overflows a byte offset"
            )));
        };
        let Some(device_end) = device_offset.checked_add(device_len) else {
            return Err(malformed(format!(
                "device range {device_offset}+{device_len} overflows a byte offset"
            )));
        };
        if let Some(limit) = self.device_len.filter(|&l| device_end > l) {
            return Err(malformed(format!(
                "device range {device_offset}+{device_len} ends past the device's {limit} bytes"
            )));
        }

        let is_mark = flags.contains(EntryFlags::MARK);
        let mark = if is_mark {
            let room = ss - ENTRY_HEADER_LEN as u64;
            if data_len > room {
                return Err(malformed(format!(
                    "mark text of {data_len} bytes does not fit the {room} bytes after the header"
                )));
            }
            let mut text = vec![0u8; data_len as usize];
            self.read_exact(&mut text, at.offset + ENTRY_HEADER_LEN as u64)?;
            Some(text)
        } else {
            if let Some(pos) = head[ENTRY_HEADER_LEN..].iter().position(|&b| b != 0) {
                return Err(malformed(format!(
                    "non-zero byte in the header padding at +{}",
                    ENTRY_HEADER_LEN + pos
                )));
            }
            if data_len > device_len {
                return Err(malformed(format!(
                    "data_len {data_len} exceeds the {device_len} bytes of its sectors"
                )));
            }
            None
        };

        let payload = if flags.contains(EntryFlags::DISCARD) { 0 } else { device_len };
        let needed = ss.checked_add(payload);
        if needed.is_none_or(|n| n > available) {
            return Err(TapError::TruncatedEntry {
                log: self.name.clone(),
                index: at.index,
                offset: at.offset,
                needed: needed.unwrap_or(u64::MAX),
                available,
            });
        }
        Ok(LogEntry {
            index: at.index,
            offset: at.offset,
            sector,
            nr_sectors,
            flags,
            data_len,
            mark,
            sector_size: self.sup.sector_size,
        })
    }

    /// The entries from the first, up to `nr_entries` of the super block.
    pub fn entries(&self) -> Entries<'_> {
        self.entries_from(self.start())
    }

    /// The entries from `at` on (for a reader that follows a live log with
    /// [`DmLog::refresh`]).
    pub fn entries_from(&self, at: Cursor) -> Entries<'_> {
        Entries { log: self, at, done: false }
    }

    /// Reads `buf.len()` bytes of an entry's data, starting `at` bytes into it.
    pub fn read_payload(&self, entry: &LogEntry, at: u64, buf: &mut [u8]) -> Result<()> {
        let end = at.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > entry.payload_len()) {
            return Err(TapError::OutOfRange {
                object: format!("dm-log-writes log {} entry {} data", self.name, entry.index),
                offset: at,
                len: buf.len() as u64,
                object_len: entry.payload_len(),
            });
        }
        self.read_exact(buf, entry.payload_offset() + at)
    }

    /// The capture events the log stands for, for volume `volume` (see the module
    /// documentation for the mapping).
    pub fn events(&self, volume: VolumeId) -> Events<'_> {
        let ss = self.sup.sector_size as usize;
        let chunk = (self.max_event_bytes / ss).max(1) * ss;
        Events { entries: self.entries(), pending: VecDeque::new(), volume, chunk }
    }

    /// A replay of the log onto `target`, to be advanced entry by entry or point by point.
    pub fn replay<'t>(&'t self, target: &'t dyn BlockIo) -> Result<Replay<'t>> {
        let target_len =
            target.len().map_err(|e| TapError::io("length query", target.name(), e))?;
        Ok(Replay {
            entries: self.entries(),
            target,
            target_len,
            report: ReplayReport::default(),
            last_was_point: false,
            buf: Vec::new(),
        })
    }

    /// Replays the log onto `target` from the start up to `point`, then syncs `target`.
    pub fn replay_to(&self, point: &ReplayPoint, target: &dyn BlockIo) -> Result<ReplayReport> {
        let mut replay = self.replay(target)?;
        replay.run_to(point)?;
        Ok(replay.report)
    }

    fn read_exact(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.io.read_at(buf, offset).map_err(|e| TapError::io("read", self.name.clone(), e))
    }
}

fn read_super(io: &dyn BlockIo, name: &str) -> Result<(LogSuper, u64)> {
    let object = format!("dm-log-writes log {name} super block");
    let len = io.len().map_err(|e| TapError::io("length query", name, e))?;
    if len < SUPER_LEN as u64 {
        return Err(TapError::InvalidField {
            object,
            field: "log length",
            found: len,
            expected: format!("at least {SUPER_LEN} bytes for the super block"),
        });
    }
    let mut b = [0u8; SUPER_LEN];
    io.read_at(&mut b, 0).map_err(|e| TapError::io("read", name, e))?;
    Ok((LogSuper::decode(&b, &object)?, len))
}

/// Iterator over a log's entries (see [`DmLog::entries`]). After an error it ends.
#[derive(Debug)]
pub struct Entries<'l> {
    log: &'l DmLog<'l>,
    at: Cursor,
    done: bool,
}

impl Entries<'_> {
    /// Where the next entry starts.
    pub fn position(&self) -> Cursor {
        self.at
    }
}

impl Iterator for Entries<'_> {
    type Item = Result<LogEntry>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.at.index >= self.log.sup.nr_entries {
            return None;
        }
        match self.log.read_entry(self.at) {
            Ok(entry) => {
                self.at = entry.next();
                Some(Ok(entry))
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// Events of the current entry still to yield. Data and discards are split into pieces one
/// at a time, so a huge range costs no memory up front.
#[derive(Debug)]
enum Pending {
    Ready(Event),
    Data { device_offset: u64, log_offset: u64, len: u64 },
    Discard { offset: u64, len: u64 },
    Failed(TapError),
}

/// Iterator over the capture events of a log (see [`DmLog::events`]).
///
/// A framing error (truncated or malformed entry) is yielded once and ends the iteration; a
/// mark whose text is not a valid bookmark name is yielded as [`TapError::BadMark`] and the
/// iteration goes on with the next entry.
#[derive(Debug)]
pub struct Events<'l> {
    entries: Entries<'l>,
    pending: VecDeque<Pending>,
    volume: VolumeId,
    chunk: usize,
}

impl Events<'_> {
    fn expand(&mut self, entry: LogEntry) {
        let flush = entry.flags.contains(EntryFlags::FLUSH);
        if flush {
            self.pending.push_back(Pending::Ready(Event::Barrier));
        }
        let start = entry.device_offset();
        let len = entry.device_len();
        if len > 0 {
            self.pending.push_back(if entry.flags.contains(EntryFlags::DISCARD) {
                Pending::Discard { offset: start, len }
            } else {
                Pending::Data { device_offset: start, log_offset: entry.payload_offset(), len }
            });
        }
        if entry.flags.contains(EntryFlags::FUA) && !(flush && len == 0) {
            self.pending.push_back(Pending::Ready(Event::Barrier));
        }
        if let Some(text) = &entry.mark {
            let log = self.entries.log;
            let bad = |reason: String| TapError::BadMark {
                log: log.name.clone(),
                index: entry.index,
                offset: entry.offset,
                reason,
            };
            let item = match std::str::from_utf8(text) {
                Err(e) => Pending::Failed(bad(format!("text is not UTF-8 ({e})"))),
                Ok(name) => match Bookmark::new(name, BookmarkKind::User, 0) {
                    Ok(b) => Pending::Ready(Event::Bookmark(b)),
                    Err(e) => Pending::Failed(bad(e.to_string())),
                },
            };
            self.pending.push_back(item);
        }
    }
}

impl Iterator for Events<'_> {
    type Item = Result<Event>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(p) = self.pending.pop_front() {
                return Some(match p {
                    Pending::Ready(e) => Ok(e),
                    Pending::Failed(e) => Err(e),
                    Pending::Discard { offset, len } => {
                        let piece = len.min(MAX_RANGE_EVENT);
                        if len > piece {
                            self.pending.push_front(Pending::Discard {
                                offset: offset + piece,
                                len: len - piece,
                            });
                        }
                        Ok(Event::Discard { volume: self.volume, offset, len: piece as u32 })
                    }
                    Pending::Data { device_offset, log_offset, len } => {
                        let piece = len.min(self.chunk as u64);
                        if len > piece {
                            self.pending.push_front(Pending::Data {
                                device_offset: device_offset + piece,
                                log_offset: log_offset + piece,
                                len: len - piece,
                            });
                        }
                        let mut data = vec![0u8; piece as usize];
                        match self.entries.log.read_exact(&mut data, log_offset) {
                            Ok(()) => Ok(Event::Write {
                                volume: self.volume,
                                offset: device_offset,
                                data: Bytes::from(data),
                            }),
                            Err(e) => {
                                self.pending.clear();
                                self.entries.done = true;
                                Err(e)
                            }
                        }
                    }
                });
            }
            match self.entries.next()? {
                Ok(entry) => self.expand(entry),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// Where a replay stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayPoint {
    /// After every entry the super block counts.
    End,
    /// After this many entries from the start (xfstests `--limit`).
    Entries(u64),
    /// After the n-th entry (from 1) that carries FLUSH or FUA, that entry's data included
    /// (xfstests `--check flush` / `--check fua` stop there too).
    Flush(u64),
    /// After the first mark entry, from the replay position on, whose text is this
    /// (xfstests `--end-mark`).
    Mark(String),
}

impl fmt::Display for ReplayPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplayPoint::End => f.write_str("end of log"),
            ReplayPoint::Entries(n) => write!(f, "after {n} entries"),
            ReplayPoint::Flush(n) => write!(f, "flush/FUA #{n}"),
            ReplayPoint::Mark(m) => write!(f, "mark {m:?}"),
        }
    }
}

/// What a replay did so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Entries replayed.
    pub entries: u64,
    /// Entries replayed that carried FLUSH or FUA.
    pub flush_points: u64,
    /// Mark entries replayed.
    pub marks: u64,
    /// Bytes of data written to the target.
    pub bytes_written: u64,
    /// Bytes of discarded ranges written as zeros to the target.
    pub bytes_zeroed: u64,
    /// Index of the last entry replayed.
    pub last_entry: Option<u64>,
}

/// A replay of a log onto a target device in progress (see [`DmLog::replay`]).
///
/// A discard is replayed by writing zeros ([`BlockIo`] has no discard; the journal stores
/// discards as zeros too). Every entry's range is checked against the target's length before
/// it is written.
#[derive(Debug)]
pub struct Replay<'t> {
    entries: Entries<'t>,
    target: &'t dyn BlockIo,
    target_len: u64,
    report: ReplayReport,
    last_was_point: bool,
    buf: Vec<u8>,
}

impl Replay<'_> {
    /// What has been replayed so far.
    pub fn report(&self) -> &ReplayReport {
        &self.report
    }

    /// Replays the next entry; `None` at the end of the log.
    pub fn step(&mut self) -> Option<Result<LogEntry>> {
        let entry = match self.entries.next()? {
            Ok(entry) => entry,
            Err(e) => return Some(Err(e)),
        };
        Some(self.apply(&entry).map(|()| entry))
    }

    fn apply(&mut self, entry: &LogEntry) -> Result<()> {
        let offset = entry.device_offset();
        let len = entry.device_len();
        if len > 0 {
            if offset.checked_add(len).is_none_or(|end| end > self.target_len) {
                return Err(TapError::OutOfRange {
                    object: format!(
                        "replay target {} (entry {} of dm-log-writes log {})",
                        self.target.name(),
                        entry.index,
                        self.entries.log.name
                    ),
                    offset,
                    len,
                    object_len: self.target_len,
                });
            }
            let discard = entry.flags.contains(EntryFlags::DISCARD);
            let chunk = (len.min(COPY_CHUNK as u64)) as usize;
            if self.buf.len() < chunk {
                self.buf.resize(chunk, 0);
            }
            if discard {
                self.buf[..chunk].fill(0);
            }
            let mut done = 0u64;
            while done < len {
                let piece = (len - done).min(chunk as u64) as usize;
                if !discard {
                    self.entries.log.read_payload(entry, done, &mut self.buf[..piece])?;
                }
                self.target
                    .write_at(&self.buf[..piece], offset + done)
                    .map_err(|e| TapError::io("write", self.target.name(), e))?;
                done += piece as u64;
            }
            if discard {
                self.report.bytes_zeroed += len;
            } else {
                self.report.bytes_written += len;
            }
        }
        self.report.entries += 1;
        self.report.last_entry = Some(entry.index);
        self.last_was_point = entry.is_flush_point();
        if entry.is_flush_point() {
            self.report.flush_points += 1;
        }
        if entry.flags.contains(EntryFlags::MARK) {
            self.report.marks += 1;
        }
        Ok(())
    }

    /// Replays from the current position up to `point`, then syncs the target.
    pub fn run_to(&mut self, point: &ReplayPoint) -> Result<&ReplayReport> {
        let log = self.entries.log.name.clone();
        let passed = |r: &ReplayReport| TapError::ReplayPointPassed {
            log: log.clone(),
            point: point.to_string(),
            entries: r.entries,
        };
        let not_reached = |r: &ReplayReport| TapError::ReplayPointNotReached {
            log: log.clone(),
            point: point.to_string(),
            entries: r.entries,
        };
        match point {
            ReplayPoint::End => {
                while let Some(r) = self.step() {
                    r?;
                }
            }
            ReplayPoint::Entries(n) => {
                if self.report.entries > *n {
                    return Err(passed(&self.report));
                }
                while self.report.entries < *n {
                    match self.step() {
                        Some(r) => {
                            r?;
                        }
                        None => return Err(not_reached(&self.report)),
                    }
                }
            }
            ReplayPoint::Flush(n) => {
                if *n == 0 {
                    return Err(TapError::Config(
                        "replay to flush #0: flush points are counted from 1".to_owned(),
                    ));
                }
                let at_point = self.report.flush_points == *n && self.last_was_point;
                if self.report.flush_points > *n || (self.report.flush_points == *n && !at_point) {
                    return Err(passed(&self.report));
                }
                while self.report.flush_points < *n {
                    match self.step() {
                        Some(r) => {
                            r?;
                        }
                        None => return Err(not_reached(&self.report)),
                    }
                }
            }
            ReplayPoint::Mark(name) => loop {
                match self.step() {
                    Some(r) => {
                        if r?.mark.as_deref() == Some(name.as_bytes()) {
                            break;
                        }
                    }
                    None => return Err(not_reached(&self.report)),
                }
            },
        }
        self.target.sync().map_err(|e| TapError::io("fdatasync", self.target.name(), e))?;
        Ok(&self.report)
    }
}

/// Fuzz entry point: reads arbitrary bytes as a log, walks its entries and events, and
/// replays it onto a small in-memory device. Never panics.
pub fn fuzz_dmlog(data: &[u8]) {
    let io = tidemark_journal::MemVolume::new(0);
    if io.write_at(data, 0).is_err() {
        return;
    }
    let Ok(log) = DmLog::open(&io) else { return };
    let log = log.with_max_event_bytes(4096);
    let mut prev_end = log.start().offset;
    for entry in log.entries() {
        let Ok(entry) = entry else { break };
        assert_eq!(entry.offset, prev_end, "entries are contiguous");
        prev_end = entry.next().offset;
        assert!(prev_end <= data.len() as u64, "entry ends inside the log");
    }
    // Without a device length a discard may claim an exabyte; its pieces come lazily, so a
    // bounded number of them costs bounded work.
    for event in log.events(VolumeId(0)).take(4096) {
        if let Ok(Event::Write { data: d, .. }) = event {
            assert!(d.len() <= 4096, "write pieces are bounded");
        }
    }
    let bounded = DmLog::open(&io).map(|l| l.with_device_len(64 << 10));
    if let Ok(log) = bounded {
        for event in log.events(VolumeId(0)) {
            if let Ok(Event::Write { offset, data: d, .. }) = event {
                assert!(offset + d.len() as u64 <= 64 << 10, "ranges stay on the device");
            }
        }
    }
    let target = tidemark_journal::MemVolume::new(64 << 10);
    let _ = log.replay_to(&ReplayPoint::End, &target);
    assert_eq!(target.len().ok(), Some(64 << 10), "replay never grows the target");
}
