//! The on-disk formats: segment header, record header, bookmark and resync payloads, and
//! manifest.
//!
//! `docs/journal-format.md` is the written spec; this module is its only implementation.
//! All integers are little-endian. Every parser validates each field before using it, so no
//! input can make it overflow, index out of bounds or allocate without limit; the fuzz
//! targets in `fuzz/` hold it to that.

use crate::error::{JournalError, Result};
use crate::types::{Bookmark, BookmarkKind, Event, Nanos, Seq, VolumeId};

/// Magic at the start of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"TDMKSEG\0";
/// Magic at the start of the manifest.
pub const MANIFEST_MAGIC: [u8; 8] = *b"TDMKMAN\0";
/// Magic at the start of every record.
pub const RECORD_MAGIC: [u8; 4] = *b"TMRC";
/// Length of the segment header.
pub const SEGMENT_HEADER_LEN: usize = 128;
/// Length of a record header.
pub const RECORD_HEADER_LEN: usize = 48;
/// Largest payload one record may carry.
pub const MAX_PAYLOAD: usize = 8 << 20;
/// Largest manifest accepted (bounds the segment list).
pub const MAX_MANIFEST_LEN: usize = 64 << 20;
/// Record flag: the payload is AES-256-GCM ciphertext plus tag.
pub const RECORD_FLAG_ENCRYPTED: u8 = 1;
/// Segment and manifest flag: payloads are encrypted at rest.
pub const FLAG_ENCRYPTED: u8 = 1;

/// Versions of the journal formats this build knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u32)]
#[non_exhaustive]
pub enum FormatVersion {
    /// The first version (2026-11).
    V1 = 1,
    /// Adds the record kinds `ResyncBegin` (6) and `ResyncEnd` (7) (2026-11). A v1 reader
    /// would take those records for damage (and cut them as a torn tail in the newest
    /// segment), so they get a new version that a v1 reader refuses by name.
    V2 = 2,
    /// Adds the record kind `Resize` (8) (2026-12), refused by a v2 reader by name for the
    /// same reason.
    V3 = 3,
}

impl FormatVersion {
    /// The version this build writes.
    pub const CURRENT: FormatVersion = FormatVersion::V3;

    fn parse(object: &str, v: u32) -> Result<Self> {
        match v {
            1 => Ok(Self::V1),
            2 => Ok(Self::V2),
            3 => Ok(Self::V3),
            _ => Err(JournalError::UnsupportedVersion {
                object: object.to_owned(),
                found: v,
                supported: Self::CURRENT as u32,
            }),
        }
    }
}

/// Which role a journal plays; stored so a spool is never opened as a retention log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// The source's durable FIFO of captured writes.
    Spool = 1,
    /// The target's CDP retention log.
    Retention = 2,
}

impl Role {
    fn parse(object: &str, v: u8) -> Result<Self> {
        match v {
            1 => Ok(Self::Spool),
            2 => Ok(Self::Retention),
            _ => Err(JournalError::InvalidField {
                object: object.to_owned(),
                field: "role",
                found: u64::from(v),
                expected: "1 (spool) or 2 (retention)".to_owned(),
            }),
        }
    }
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
fn arr16(b: &[u8], at: usize) -> [u8; 16] {
    b[at..at + 16].try_into().expect("16 bytes")
}

fn check_magic(object: &str, found: &[u8], expected: &[u8]) -> Result<()> {
    if found == expected {
        return Ok(());
    }
    if found.iter().all(|&b| b == 0) {
        return Err(JournalError::ZeroFilled {
            object: object.to_owned(),
            expected: expected.to_vec(),
        });
    }
    Err(JournalError::BadMagic {
        object: object.to_owned(),
        found: found.to_vec(),
        expected: expected.to_vec(),
    })
}

fn reserved_zero(object: &str, field: &'static str, bytes: &[u8]) -> Result<()> {
    if bytes.iter().all(|&b| b == 0) {
        Ok(())
    } else {
        Err(JournalError::InvalidField {
            object: object.to_owned(),
            field,
            found: bytes.iter().map(|&b| u64::from(b)).sum(),
            expected: "all zero".to_owned(),
        })
    }
}

/// The fixed header at the start of every segment file (128 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The format version of the segment: which record kinds it may hold. Writers create
    /// segments of [`FormatVersion::CURRENT`] only.
    pub version: FormatVersion,
    /// The role of the journal the segment belongs to.
    pub role: Role,
    /// Whether record payloads are encrypted.
    pub encrypted: bool,
    /// The journal's identity, shared by all of its segments and its manifest.
    pub log_id: [u8; 16],
    /// This segment's id (also in its file name).
    pub segment_id: u64,
    /// No record in the segment has a smaller sequence number.
    pub first_seq: Seq,
    /// When the segment was created.
    pub created: Nanos,
    /// Random salt: seeds the record header checksums and the segment key.
    pub salt: [u8; 16],
}

impl SegmentHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut b = [0u8; SEGMENT_HEADER_LEN];
        b[0..8].copy_from_slice(&SEGMENT_MAGIC);
        b[8..12].copy_from_slice(&(self.version as u32).to_le_bytes());
        b[12..16].copy_from_slice(&(SEGMENT_HEADER_LEN as u32).to_le_bytes());
        b[16] = self.role as u8;
        b[17] = if self.encrypted { FLAG_ENCRYPTED } else { 0 };
        b[24..40].copy_from_slice(&self.log_id);
        b[40..48].copy_from_slice(&self.segment_id.to_le_bytes());
        b[48..56].copy_from_slice(&self.first_seq.0.to_le_bytes());
        b[56..64].copy_from_slice(&self.created.0.to_le_bytes());
        b[64..80].copy_from_slice(&self.salt);
        let crc = crc32c::crc32c(&b[..124]);
        b[124..128].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and validates a header; `object` names the file in errors.
    pub fn decode(b: &[u8], object: &str) -> Result<Self> {
        if b.len() < 8 {
            return Err(JournalError::Truncated {
                object: object.to_owned(),
                needed: SEGMENT_HEADER_LEN as u64,
                found: b.len() as u64,
            });
        }
        check_magic(object, &b[0..8], &SEGMENT_MAGIC)?;
        let truncated = || JournalError::Truncated {
            object: object.to_owned(),
            needed: SEGMENT_HEADER_LEN as u64,
            found: b.len() as u64,
        };
        // Magic and version (bytes 0..12) keep their place in every version, so a header
        // of an unknown version is named as such before its checksum is judged.
        if b.len() < 12 {
            return Err(truncated());
        }
        let version = FormatVersion::parse(object, le32(b, 8))?;
        if b.len() < SEGMENT_HEADER_LEN {
            return Err(truncated());
        }
        let stored = le32(b, 124);
        let got = crc32c::crc32c(&b[..124]);
        if stored != got {
            return Err(JournalError::HeaderChecksum {
                object: object.to_owned(),
                offset: 0,
                got,
                expected: stored,
            });
        }
        let hlen = le32(b, 12);
        if hlen as usize != SEGMENT_HEADER_LEN {
            return Err(JournalError::InvalidField {
                object: object.to_owned(),
                field: "header_len",
                found: u64::from(hlen),
                expected: SEGMENT_HEADER_LEN.to_string(),
            });
        }
        let role = Role::parse(object, b[16])?;
        let flags = b[17];
        if flags & !FLAG_ENCRYPTED != 0 {
            return Err(JournalError::InvalidField {
                object: object.to_owned(),
                field: "flags",
                found: u64::from(flags),
                expected: "only bit 0 (encrypted) may be set".to_owned(),
            });
        }
        reserved_zero(object, "reserved", &b[18..24])?;
        reserved_zero(object, "reserved", &b[80..124])?;
        Ok(Self {
            version,
            role,
            encrypted: flags & FLAG_ENCRYPTED != 0,
            log_id: arr16(b, 24),
            segment_id: le64(b, 40),
            first_seq: Seq(le64(b, 48)),
            created: Nanos(le64(b, 56)),
            salt: arr16(b, 64),
        })
    }

    /// The seed of this segment's record header checksums.
    pub fn crc_seed(&self) -> u32 {
        crc32c::crc32c(&self.salt)
    }
}

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// Data for `length` bytes at `offset`.
    Write = 1,
    /// `length` bytes at `offset` set to zero.
    WriteZeroes = 2,
    /// `length` bytes at `offset` discarded (stored as zeros).
    Discard = 3,
    /// A flush point.
    Barrier = 4,
    /// A bookmark (payload: the bookmark); also a flush point.
    Bookmark = 5,
    /// A resync window opens (payload: the 8-byte resync id). Format version 2.
    ResyncBegin = 6,
    /// A resync window closes (payload: the 8-byte resync id). Format version 2.
    ResyncEnd = 7,
    /// The volume grew (payload: `u64` old size, `u64` new size). Format version 3.
    Resize = 8,
}

impl RecordKind {
    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => Self::Write,
            2 => Self::WriteZeroes,
            3 => Self::Discard,
            4 => Self::Barrier,
            5 => Self::Bookmark,
            6 => Self::ResyncBegin,
            7 => Self::ResyncEnd,
            8 => Self::Resize,
            _ => return None,
        })
    }

    /// The first format version whose segments may hold this kind.
    pub fn since(self) -> FormatVersion {
        match self {
            Self::ResyncBegin | Self::ResyncEnd => FormatVersion::V2,
            Self::Resize => FormatVersion::V3,
            _ => FormatVersion::V1,
        }
    }

    /// True for the resync window markers.
    pub fn is_resync(self) -> bool {
        matches!(self, Self::ResyncBegin | Self::ResyncEnd)
    }

    /// True for kinds that change volume content.
    pub fn is_data(self) -> bool {
        matches!(self, Self::Write | Self::WriteZeroes | Self::Discard)
    }

    /// True for kinds that can end a consistent prefix (a `ResyncEnd` does when it closes
    /// the last open resync window).
    pub fn is_point(self) -> bool {
        matches!(self, Self::Barrier | Self::Bookmark | Self::ResyncEnd)
    }
}

/// The 48-byte header in front of every record's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// What the record holds.
    pub kind: RecordKind,
    /// Whether the payload is encrypted.
    pub encrypted: bool,
    /// Volume in the consistency group.
    pub volume: VolumeId,
    /// Sequence number.
    pub seq: Seq,
    /// Capture time.
    pub time: Nanos,
    /// Byte offset on the volume (data kinds), else 0.
    pub offset: u64,
    /// Bytes of the volume affected (data kinds), else 0.
    pub length: u32,
    /// Bytes of payload stored after the header.
    pub payload_len: u32,
    /// CRC-32C of the stored payload.
    pub payload_crc: u32,
}

/// Why a record header was rejected (scanner-internal detail for reports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordDefect {
    /// Fewer than 48 bytes left.
    Short,
    /// The magic is not `TMRC`.
    Magic,
    /// Header checksum mismatch.
    HeaderCrc {
        /// Computed.
        got: u32,
        /// Stored.
        expected: u32,
    },
    /// A field is out of range.
    Field(&'static str, u64),
}

impl std::fmt::Display for RecordDefect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Short => {
                write!(f, "fewer than {RECORD_HEADER_LEN} bytes left for a record header")
            }
            Self::Magic => write!(f, "record magic {RECORD_MAGIC:02x?} not found"),
            Self::HeaderCrc { got, expected } => {
                write!(f, "record header checksum: stored {expected:#010x}, computed {got:#010x}")
            }
            Self::Field(name, v) => write!(f, "record field {name} has invalid value {v}"),
        }
    }
}

impl RecordHeader {
    /// Encodes the header; `seed` is the segment's checksum seed.
    pub fn encode(&self, seed: u32) -> [u8; RECORD_HEADER_LEN] {
        let mut b = [0u8; RECORD_HEADER_LEN];
        b[0..4].copy_from_slice(&RECORD_MAGIC);
        b[4] = self.kind as u8;
        b[5] = if self.encrypted { RECORD_FLAG_ENCRYPTED } else { 0 };
        b[6..8].copy_from_slice(&self.volume.0.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.0.to_le_bytes());
        b[16..24].copy_from_slice(&self.time.0.to_le_bytes());
        b[24..32].copy_from_slice(&self.offset.to_le_bytes());
        b[32..36].copy_from_slice(&self.length.to_le_bytes());
        b[36..40].copy_from_slice(&self.payload_len.to_le_bytes());
        b[40..44].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32c::crc32c_append(seed, &b[..44]);
        b[44..48].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and validates a header.
    pub fn decode(b: &[u8], seed: u32) -> std::result::Result<Self, RecordDefect> {
        if b.len() < RECORD_HEADER_LEN {
            return Err(RecordDefect::Short);
        }
        if b[0..4] != RECORD_MAGIC {
            return Err(RecordDefect::Magic);
        }
        let expected = le32(b, 44);
        let got = crc32c::crc32c_append(seed, &b[..44]);
        if got != expected {
            return Err(RecordDefect::HeaderCrc { got, expected });
        }
        let kind =
            RecordKind::from_code(b[4]).ok_or(RecordDefect::Field("kind", u64::from(b[4])))?;
        let flags = b[5];
        if flags & !RECORD_FLAG_ENCRYPTED != 0 {
            return Err(RecordDefect::Field("flags", u64::from(flags)));
        }
        let h = Self {
            kind,
            encrypted: flags & RECORD_FLAG_ENCRYPTED != 0,
            volume: VolumeId(le16(b, 6)),
            seq: Seq(le64(b, 8)),
            time: Nanos(le64(b, 16)),
            offset: le64(b, 24),
            length: le32(b, 32),
            payload_len: le32(b, 36),
            payload_crc: le32(b, 40),
        };
        h.validate()?;
        Ok(h)
    }

    fn validate(&self) -> std::result::Result<(), RecordDefect> {
        // All arithmetic in u64: no header value can overflow it.
        let tag = if self.encrypted { crate::crypto::TAG_LEN as u64 } else { 0 };
        let payload_len = u64::from(self.payload_len);
        let length = u64::from(self.length);
        if payload_len > MAX_PAYLOAD as u64 + tag {
            return Err(RecordDefect::Field("payload_len", payload_len));
        }
        if self.offset.checked_add(u64::from(self.length)).is_none() {
            return Err(RecordDefect::Field("offset", self.offset));
        }
        match self.kind {
            RecordKind::Write => {
                if length == 0 || payload_len != length + tag {
                    return Err(RecordDefect::Field("payload_len", payload_len));
                }
            }
            RecordKind::WriteZeroes | RecordKind::Discard => {
                if self.length == 0 || self.payload_len != 0 || self.encrypted {
                    return Err(RecordDefect::Field("length", u64::from(self.length)));
                }
            }
            RecordKind::Barrier => {
                if self.length != 0 || self.payload_len != 0 || self.offset != 0 || self.encrypted {
                    return Err(RecordDefect::Field("length", u64::from(self.length)));
                }
            }
            RecordKind::Bookmark => {
                let min = BOOKMARK_FIXED_LEN as u64 + 1 + tag;
                let max = (BOOKMARK_FIXED_LEN + crate::types::MAX_BOOKMARK_NAME) as u64 + tag;
                if self.length != 0 || self.offset != 0 || !(min..=max).contains(&payload_len) {
                    return Err(RecordDefect::Field("payload_len", payload_len));
                }
            }
            RecordKind::ResyncBegin | RecordKind::ResyncEnd => {
                if self.length != 0
                    || self.offset != 0
                    || payload_len != RESYNC_BODY_LEN as u64 + tag
                {
                    return Err(RecordDefect::Field("payload_len", payload_len));
                }
            }
            RecordKind::Resize => {
                if self.length != 0
                    || self.offset != 0
                    || payload_len != RESIZE_BODY_LEN as u64 + tag
                {
                    return Err(RecordDefect::Field("payload_len", payload_len));
                }
            }
        }
        Ok(())
    }

    /// Checks the encryption flag against the segment's: in an encrypted segment every
    /// record with a payload is encrypted, in a plain one none is. A record that breaks this
    /// rule is refused (it could be a forged plaintext record in an encrypted journal).
    pub fn check_encryption(&self, segment_encrypted: bool) -> std::result::Result<(), String> {
        let want = segment_encrypted && self.payload_len > 0;
        if self.encrypted == want {
            Ok(())
        } else if want {
            Err("record with a payload is not encrypted in an encrypted journal".to_owned())
        } else {
            Err("record is flagged encrypted in a journal that is not".to_owned())
        }
    }

    /// Total bytes the record takes in the segment.
    pub fn total_len(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + u64::from(self.payload_len)
    }
}

/// Fixed part of a bookmark payload: kind, reserved, name length, group.
pub const BOOKMARK_FIXED_LEN: usize = 12;

/// Encodes a bookmark as a record payload.
pub fn encode_bookmark(b: &Bookmark) -> Vec<u8> {
    let mut out = Vec::with_capacity(BOOKMARK_FIXED_LEN + b.name.len());
    out.push(b.kind as u8);
    out.push(0);
    out.extend_from_slice(&(b.name.len() as u16).to_le_bytes());
    out.extend_from_slice(&b.group.to_le_bytes());
    out.extend_from_slice(b.name.as_bytes());
    out
}

/// Decodes a bookmark payload.
pub fn decode_bookmark(p: &[u8]) -> std::result::Result<Bookmark, String> {
    if p.len() < BOOKMARK_FIXED_LEN {
        return Err(format!("bookmark payload of {} bytes is shorter than 12", p.len()));
    }
    let kind =
        BookmarkKind::from_code(p[0]).ok_or_else(|| format!("bookmark kind {} unknown", p[0]))?;
    if p[1] != 0 {
        return Err("bookmark reserved byte is not zero".to_owned());
    }
    let len = le16(p, 2) as usize;
    if BOOKMARK_FIXED_LEN + len != p.len() {
        return Err(format!(
            "bookmark name length {len} disagrees with payload of {} bytes",
            p.len()
        ));
    }
    let group = le64(p, 4);
    let name = std::str::from_utf8(&p[BOOKMARK_FIXED_LEN..])
        .map_err(|_| "bookmark name is not UTF-8".to_owned())?;
    Bookmark::new(name, kind, group).map_err(|e| e.to_string())
}

/// Length of a resync record's payload: the resync id.
pub const RESYNC_BODY_LEN: usize = 8;

/// Decodes a resync record's payload: the `u64` id, nonzero.
pub fn decode_resync_id(p: &[u8]) -> std::result::Result<u64, String> {
    let bytes: [u8; RESYNC_BODY_LEN] = p
        .try_into()
        .map_err(|_| format!("resync payload of {} bytes, expected {RESYNC_BODY_LEN}", p.len()))?;
    match u64::from_le_bytes(bytes) {
        0 => Err("resync id is 0 (ids are nonzero)".to_owned()),
        id => Ok(id),
    }
}

/// Length of a resize record's payload: the old and the new size.
pub const RESIZE_BODY_LEN: usize = 16;

/// Decodes a resize record's payload: `(old_size, new_size)`, the new size at least the old
/// one and at least 1.
pub fn decode_resize(p: &[u8]) -> std::result::Result<(u64, u64), String> {
    let bytes: [u8; RESIZE_BODY_LEN] = p
        .try_into()
        .map_err(|_| format!("resize payload of {} bytes, expected {RESIZE_BODY_LEN}", p.len()))?;
    let old = u64::from_le_bytes(bytes[0..8].try_into().expect("8 bytes"));
    let new = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    if new < old || new == 0 {
        return Err(format!(
            "resize from {old} to {new} bytes (a volume only grows, to at least 1 byte)"
        ));
    }
    Ok((old, new))
}

fn encode_resize(old: u64, new: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(RESIZE_BODY_LEN);
    v.extend_from_slice(&old.to_le_bytes());
    v.extend_from_slice(&new.to_le_bytes());
    v
}

/// The record header fields and plaintext payload that represent an event (write data is
/// borrowed, not copied).
pub fn event_to_record(
    event: &Event,
) -> (RecordKind, VolumeId, u64, u32, std::borrow::Cow<'_, [u8]>) {
    use std::borrow::Cow;
    match event {
        Event::Write { volume, offset, data } => {
            (RecordKind::Write, *volume, *offset, data.len() as u32, Cow::Borrowed(&data[..]))
        }
        Event::WriteZeroes { volume, offset, len } => {
            (RecordKind::WriteZeroes, *volume, *offset, *len, Cow::Borrowed(&[][..]))
        }
        Event::Discard { volume, offset, len } => {
            (RecordKind::Discard, *volume, *offset, *len, Cow::Borrowed(&[][..]))
        }
        Event::Barrier => (RecordKind::Barrier, VolumeId(0), 0, 0, Cow::Borrowed(&[][..])),
        Event::Bookmark(b) => {
            (RecordKind::Bookmark, VolumeId(0), 0, 0, Cow::Owned(encode_bookmark(b)))
        }
        Event::ResyncBegin { id } => {
            (RecordKind::ResyncBegin, VolumeId(0), 0, 0, Cow::Owned(id.to_le_bytes().to_vec()))
        }
        Event::ResyncEnd { id } => {
            (RecordKind::ResyncEnd, VolumeId(0), 0, 0, Cow::Owned(id.to_le_bytes().to_vec()))
        }
        Event::Resize { volume, old_size, new_size } => {
            (RecordKind::Resize, *volume, 0, 0, Cow::Owned(encode_resize(*old_size, *new_size)))
        }
    }
}

/// Rebuilds an event from a record header and its plaintext payload.
pub fn record_to_event(h: &RecordHeader, payload: Vec<u8>) -> std::result::Result<Event, String> {
    Ok(match h.kind {
        RecordKind::Write => {
            Event::Write { volume: h.volume, offset: h.offset, data: payload.into() }
        }
        RecordKind::WriteZeroes => {
            Event::WriteZeroes { volume: h.volume, offset: h.offset, len: h.length }
        }
        RecordKind::Discard => Event::Discard { volume: h.volume, offset: h.offset, len: h.length },
        RecordKind::Barrier => Event::Barrier,
        RecordKind::Bookmark => Event::Bookmark(decode_bookmark(&payload)?),
        RecordKind::ResyncBegin => Event::ResyncBegin { id: decode_resync_id(&payload)? },
        RecordKind::ResyncEnd => Event::ResyncEnd { id: decode_resync_id(&payload)? },
        RecordKind::Resize => {
            let (old_size, new_size) = decode_resize(&payload)?;
            Event::Resize { volume: h.volume, old_size, new_size }
        }
    })
}

/// A record found by [`scan_segment`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScannedRecord {
    /// Byte offset of the record header in the segment.
    pub offset: u64,
    /// Its header.
    pub header: RecordHeader,
}

/// A stretch of a segment that held no valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defect {
    /// Where the bad bytes start.
    pub offset: u64,
    /// How many bytes were skipped.
    pub len: u64,
    /// The first check that failed there.
    pub reason: String,
    /// The damaged record's header when the header itself was valid (the payload checksum,
    /// the sequence order or the payload failed): then exactly this one record was lost,
    /// and its volume range is known. `None` when the stretch may have held any number of
    /// records.
    pub header: Option<RecordHeader>,
    /// The sequence floor at the stretch: the `seq` of the valid record before it in the
    /// segment, or the segment header's `first_seq` when there is none. No record lost
    /// here had a smaller sequence number.
    pub min_seq: Seq,
    /// The kind of the valid record before the stretch in the segment (`None`: the stretch
    /// starts the segment). A record after a non-data record at `min_seq` has a larger
    /// sequence number (coalesced records precede the point they share a number with).
    pub prev_kind: Option<RecordKind>,
}

impl Defect {
    /// The smallest sequence number a record lost in this stretch can have: the damaged
    /// record's own when its header is known, else the floor (one above it when the record
    /// before was not a data record).
    pub fn lost_from(&self) -> Seq {
        match (&self.header, self.prev_kind) {
            (Some(h), _) => h.seq,
            (None, Some(k)) if !k.is_data() => Seq(self.min_seq.0.saturating_add(1)),
            (None, _) => self.min_seq,
        }
    }
}

/// Everything [`scan_segment`] learned about one segment image.
#[derive(Debug, Clone)]
pub struct SegmentScan {
    /// The segment header.
    pub header: SegmentHeader,
    /// Valid records, in file order.
    pub records: Vec<ScannedRecord>,
    /// Stretches without valid records, in file order (a torn tail is the last of these).
    pub defects: Vec<Defect>,
    /// End of the last valid record (the header's end when there is none).
    pub valid_end: u64,
}

impl SegmentScan {
    /// True when the segment ends with a defect that no valid record follows (a torn tail
    /// in the newest segment; damage in any other).
    pub fn has_bad_tail(&self) -> bool {
        self.defects.last().is_some_and(|d| d.offset >= self.valid_end)
    }
}

/// Checks the record at `pos`: header and payload checksum, bounds, sequence order.
fn record_at(
    b: &[u8],
    pos: usize,
    seg: &SegmentHeader,
    min_seq: Seq,
) -> std::result::Result<RecordHeader, (bool, String)> {
    // The bool says whether the header itself was valid (so its length can be trusted).
    let h = RecordHeader::decode(&b[pos..], seg.crc_seed()).map_err(|d| (false, d.to_string()))?;
    if let Err(reason) = h.check_encryption(seg.encrypted) {
        return Err((true, reason));
    }
    if h.kind.since() > seg.version {
        return Err((
            true,
            format!(
                "record kind {} needs format version {} but the segment is version {}",
                h.kind as u8,
                h.kind.since() as u32,
                seg.version as u32
            ),
        ));
    }
    let end = pos as u64 + h.total_len();
    if end > b.len() as u64 {
        return Err((
            false,
            format!("record of {} bytes runs past the end of the segment", h.total_len()),
        ));
    }
    let payload = &b[pos + RECORD_HEADER_LEN..end as usize];
    let got = crc32c::crc32c(payload);
    if got != h.payload_crc {
        return Err((
            true,
            format!("payload checksum: stored {:#010x}, computed {got:#010x}", h.payload_crc),
        ));
    }
    if h.seq < min_seq {
        return Err((true, format!("sequence number {} goes back from {}", h.seq, min_seq)));
    }
    if h.kind == RecordKind::Bookmark && !h.encrypted {
        decode_bookmark(payload).map_err(|e| (true, e))?;
    }
    if h.kind.is_resync() && !h.encrypted {
        decode_resync_id(payload).map_err(|e| (true, e))?;
    }
    if h.kind == RecordKind::Resize && !h.encrypted {
        decode_resize(payload).map_err(|e| (true, e))?;
    }
    Ok(h)
}

/// Parses a whole segment image: the header strictly (an error names what is wrong), then
/// every record, skipping and reporting damaged stretches so one bad record never hides the
/// records after it.
pub fn scan_segment(b: &[u8], object: &str) -> Result<SegmentScan> {
    let header = SegmentHeader::decode(b, object)?;
    let mut records = Vec::new();
    let mut defects = Vec::new();
    let mut pos = SEGMENT_HEADER_LEN;
    let mut valid_end = pos as u64;
    let mut min_seq = header.first_seq;
    while pos < b.len() {
        match record_at(b, pos, &header, min_seq) {
            Ok(h) => {
                records.push(ScannedRecord { offset: pos as u64, header: h });
                min_seq = h.seq;
                pos += h.total_len() as usize;
                valid_end = pos as u64;
            }
            Err((header_ok, reason)) => {
                // Resume at the next valid record, if any; a valid header lets us skip the
                // damaged record exactly.
                let known = header_ok.then(|| {
                    RecordHeader::decode(&b[pos..], header.crc_seed()).expect("validated above")
                });
                let skip_to = match &known {
                    Some(h) => Some(pos + h.total_len() as usize),
                    None => find_next_record(b, pos + 1, &header, min_seq),
                };
                let next = skip_to.unwrap_or(b.len());
                defects.push(Defect {
                    offset: pos as u64,
                    len: (next - pos) as u64,
                    reason,
                    header: known,
                    min_seq,
                    prev_kind: records.last().map(|r: &ScannedRecord| r.header.kind),
                });
                pos = next;
            }
        }
    }
    Ok(SegmentScan { header, records, defects, valid_end })
}

fn find_next_record(b: &[u8], from: usize, seg: &SegmentHeader, min_seq: Seq) -> Option<usize> {
    let mut p = from;
    while p + RECORD_HEADER_LEN <= b.len() {
        let rel = b[p..].windows(4).position(|w| w == RECORD_MAGIC)?;
        p += rel;
        if record_at(b, p, seg, min_seq).is_ok() {
            return Some(p);
        }
        p += 1;
    }
    None
}

/// The journal's manifest: which segments are live and where history begins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Spool or retention log.
    pub role: Role,
    /// Whether payloads are encrypted at rest.
    pub encrypted: bool,
    /// Granularity of the block index (retention log), in bytes.
    pub block_size: u32,
    /// The journal's identity.
    pub log_id: [u8; 16],
    /// Key check value (zero when not encrypted).
    pub key_check: [u8; 16],
    /// Retention: the base image holds the state after this sequence number. Spool: every
    /// record up to here is acknowledged and may be discarded.
    pub base_seq: Seq,
    /// Time of the base point.
    pub base_time: Nanos,
    /// Points at or below this sequence number may have been thinned: a sequence number
    /// there is exact only if it is a retained point.
    pub thin_horizon: Seq,
    /// A base advance to this sequence number was started and must be finished (0 = none).
    pub pending_base: Seq,
    /// The id the next new segment gets.
    pub next_segment_id: u64,
    /// The highest sequence number ever appended.
    pub last_seq: Seq,
    /// Live segments in sequence order.
    pub segments: Vec<u64>,
}

const MANIFEST_FIXED_LEN: usize = 112;

impl Manifest {
    /// Encodes the manifest.
    pub fn encode(&self) -> Vec<u8> {
        let len = MANIFEST_FIXED_LEN + 8 * self.segments.len() + 4;
        let mut b = vec![0u8; len];
        b[0..8].copy_from_slice(&MANIFEST_MAGIC);
        b[8..12].copy_from_slice(&(FormatVersion::CURRENT as u32).to_le_bytes());
        b[12..16].copy_from_slice(&(len as u32).to_le_bytes());
        b[16] = self.role as u8;
        b[17] = if self.encrypted { FLAG_ENCRYPTED } else { 0 };
        b[20..24].copy_from_slice(&self.block_size.to_le_bytes());
        b[24..40].copy_from_slice(&self.log_id);
        b[40..56].copy_from_slice(&self.key_check);
        b[56..64].copy_from_slice(&self.base_seq.0.to_le_bytes());
        b[64..72].copy_from_slice(&self.base_time.0.to_le_bytes());
        b[72..80].copy_from_slice(&self.thin_horizon.0.to_le_bytes());
        b[80..88].copy_from_slice(&self.pending_base.0.to_le_bytes());
        b[88..96].copy_from_slice(&self.next_segment_id.to_le_bytes());
        b[96..104].copy_from_slice(&self.last_seq.0.to_le_bytes());
        b[104..108].copy_from_slice(&(self.segments.len() as u32).to_le_bytes());
        for (i, id) in self.segments.iter().enumerate() {
            let at = MANIFEST_FIXED_LEN + 8 * i;
            b[at..at + 8].copy_from_slice(&id.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b[..len - 4]);
        b[len - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and validates a manifest.
    pub fn decode(b: &[u8], object: &str) -> Result<Self> {
        let truncated = |needed: usize| JournalError::Truncated {
            object: object.to_owned(),
            needed: needed as u64,
            found: b.len() as u64,
        };
        if b.len() < 8 {
            return Err(truncated(MANIFEST_FIXED_LEN + 4));
        }
        check_magic(object, &b[0..8], &MANIFEST_MAGIC)?;
        if b.len() < MANIFEST_FIXED_LEN + 4 {
            return Err(truncated(MANIFEST_FIXED_LEN + 4));
        }
        FormatVersion::parse(object, le32(b, 8))?;
        let len = le32(b, 12) as usize;
        if !(MANIFEST_FIXED_LEN + 4..=MAX_MANIFEST_LEN).contains(&len) {
            return Err(JournalError::InvalidField {
                object: object.to_owned(),
                field: "length",
                found: len as u64,
                expected: format!("{} to {MAX_MANIFEST_LEN}", MANIFEST_FIXED_LEN + 4),
            });
        }
        if b.len() < len {
            return Err(truncated(len));
        }
        let stored = le32(b, len - 4);
        let got = crc32c::crc32c(&b[..len - 4]);
        if stored != got {
            return Err(JournalError::HeaderChecksum {
                object: object.to_owned(),
                offset: 0,
                got,
                expected: stored,
            });
        }
        let n = le32(b, 104) as usize;
        if MANIFEST_FIXED_LEN + 8 * n + 4 != len {
            return Err(JournalError::InvalidField {
                object: object.to_owned(),
                field: "segment_count",
                found: n as u64,
                expected: format!(
                    "{} for a manifest of {len} bytes",
                    (len - MANIFEST_FIXED_LEN - 4) / 8
                ),
            });
        }
        let role = Role::parse(object, b[16])?;
        let flags = b[17];
        if flags & !FLAG_ENCRYPTED != 0 {
            return Err(JournalError::InvalidField {
                object: object.to_owned(),
                field: "flags",
                found: u64::from(flags),
                expected: "only bit 0 (encrypted) may be set".to_owned(),
            });
        }
        reserved_zero(object, "reserved", &b[18..20])?;
        reserved_zero(object, "reserved", &b[108..112])?;
        let block_size = le32(b, 20);
        if !(512..=1 << 20).contains(&block_size) || !block_size.is_power_of_two() {
            return Err(JournalError::InvalidField {
                object: object.to_owned(),
                field: "block_size",
                found: u64::from(block_size),
                expected: "a power of two from 512 to 1 MiB".to_owned(),
            });
        }
        if b.len() != len {
            return Err(JournalError::InvalidField {
                object: object.to_owned(),
                field: "file size",
                found: b.len() as u64,
                expected: format!("exactly the manifest length {len}"),
            });
        }
        let next_segment_id = le64(b, 88);
        let segments = (0..n).map(|i| le64(b, MANIFEST_FIXED_LEN + 8 * i)).collect::<Vec<u64>>();
        let mut seen = std::collections::HashSet::with_capacity(n);
        for &id in &segments {
            if id == 0 || id >= next_segment_id || !seen.insert(id) {
                return Err(JournalError::InvalidField {
                    object: object.to_owned(),
                    field: "segment id",
                    found: id,
                    expected: format!("unique ids from 1 to {}", next_segment_id.saturating_sub(1)),
                });
            }
        }
        Ok(Self {
            role,
            encrypted: flags & FLAG_ENCRYPTED != 0,
            block_size,
            log_id: arr16(b, 24),
            key_check: arr16(b, 40),
            base_seq: Seq(le64(b, 56)),
            base_time: Nanos(le64(b, 64)),
            thin_horizon: Seq(le64(b, 72)),
            pending_base: Seq(le64(b, 80)),
            next_segment_id,
            last_seq: Seq(le64(b, 96)),
            segments,
        })
    }
}

/// Name of a segment file.
pub fn segment_file_name(id: u64) -> String {
    format!("{id:016x}.seg")
}

/// Parses a segment file name back to its id.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".seg")?;
    if hex.len() != 16 || !hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// Fuzz entry point: parses arbitrary bytes as a segment image. Never panics.
pub fn fuzz_segment(data: &[u8]) {
    if let Ok(scan) = scan_segment(data, "fuzz") {
        let mut prev_end = SEGMENT_HEADER_LEN as u64;
        for r in &scan.records {
            assert!(r.offset >= prev_end, "records overlap");
            prev_end = r.offset + r.header.total_len();
            assert!(prev_end <= data.len() as u64, "record past end");
        }
        assert!(scan.valid_end <= data.len() as u64);
        // Round trip the header.
        let again = SegmentHeader::decode(&scan.header.encode(), "fuzz").expect("re-decode");
        assert_eq!(again, scan.header);
    }
}

/// Fuzz entry point: parses arbitrary bytes as a manifest. Never panics.
pub fn fuzz_manifest(data: &[u8]) {
    if let Ok(m) = Manifest::decode(data, "fuzz") {
        let again = Manifest::decode(&m.encode(), "fuzz").expect("re-decode");
        assert_eq!(again, m);
    }
}
