//! The frame codec: [`Message`] to bytes and back, by hand, in the byte layout of
//! `docs/wire-protocol.md`.
//!
//! A frame is a 12-byte header (magic `TDMW`, protocol version, message type, flags, body
//! length) followed by the body. All integers are little-endian. The decoder reads through
//! a bounds-checked `Reader` and validates every field before it uses it; the encoder runs
//! the same checks on the message it is given, so that what encodes always decodes.
//!
//! Integrity is not this layer's job: frames travel inside AES-256-GCM-sealed messages
//! ([`crate::secure`]), whose tags catch any change. This layer only has to refuse, with a
//! typed error, anything that is not a well-formed frame.

use std::fmt;

use bytes::Bytes;
use tidemark_journal::types::{MAX_BOOKMARK_NAME, validate_bookmark_name};
use tidemark_journal::{Bookmark, BookmarkKind, Event, Nanos, Seq, VolumeId};

use super::merkle::TreeShape;
use super::{
    Batch, BatchEntry, BlockRef, ContentHash, DEDUPE_BLOCK, DEFAULT_MAX_FRAME_LEN, DedupedWrite,
    EntryBody, ErrorCode, FLAG_COMPRESSED, FRAME_HEADER_LEN, FRAME_MAGIC, Generation, HASH_LEN,
    HashReply, HashRequest, Hello, LineageInfo, MAX_FRAME_LEN_CEILING, MAX_GENERATIONS,
    MAX_NODE_NAME, MAX_OPEN_RESYNCS, MAX_REPAIR_IDS, MAX_REPAIR_RANGES, MAX_TEXT,
    MIN_FRAME_LEN_FLOOR, Message, MessageType, NodeHash, NodeRange, PROTOCOL_VERSION, PairId,
    REF_SPAN_LEN, RefSource, RefSpan, Refuse, RefuseReason, RepairRange, RepairRequest,
    ReplicaKind, ReplicaState, Role, SUPPORTED_VERSIONS, VersionRange, VolumeInfo, Welcome,
    WireError,
};

type Result<T, E = WireError> = std::result::Result<T, E>;

/// Length of the fixed part of a `Hello` body.
pub const HELLO_FIXED_LEN: usize = 32;
/// Length of one volume in a `Hello`.
pub const VOLUME_LEN: usize = 16;
/// Length of the fixed part of a `Welcome` body.
pub const WELCOME_FIXED_LEN: usize = 8;
/// Length of the fixed part of a `Refuse` body.
pub const REFUSE_FIXED_LEN: usize = 12;
/// Length of the fixed part of an `Error` body.
pub const ERROR_FIXED_LEN: usize = 8;
/// Length of the fixed part of a `Batch` body.
pub const BATCH_FIXED_LEN: usize = 16;
/// Length of a batch entry header; also the smallest entry.
pub const ENTRY_HEADER_LEN: usize = 24;
/// Length of a bookmark entry's tail before the name.
pub const BOOKMARK_TAIL_LEN: usize = 16;
/// Length of a resync begin or end entry's tail: the resync id.
pub const RESYNC_TAIL_LEN: usize = 8;
/// Length of a dedupe reference's tail after the entry header, source `earlier`.
pub const REF_EARLIER_TAIL_LEN: usize = 16;
/// Length of a dedupe reference's tail after the entry header, source `hash`.
pub const REF_HASH_TAIL_LEN: usize = 4 + HASH_LEN;
/// Length of the fixed part of a `HashRequest` body.
pub const HASH_REQUEST_FIXED_LEN: usize = 16;
/// Length of one node range in a `HashRequest`.
pub const NODE_RANGE_LEN: usize = 16;
/// Length of the fixed part of a `HashReply` body.
pub const HASH_REPLY_FIXED_LEN: usize = 16;
/// Length of the fixed part of a `SourceLineage` / `TargetLineage` body.
pub const LINEAGE_FIXED_LEN: usize = 16;
/// Length of one generation in a lineage message (and in a lineage file).
pub const GENERATION_LEN: usize = 24;
/// Lineage message flags.
const LINEAGE_DIRTY: u8 = 1;
const LINEAGE_SOURCE_WINS: u8 = 2;
const LINEAGE_FULL_RESYNC: u8 = 4;
/// Length of the uncompressed-length prefix of a compressed body.
const COMPRESSED_PREFIX_LEN: usize = 4;
/// Highest tree level a hash message may name (a tree over 2^64 bytes with 4 KiB leaves
/// and fan-out 2 has 52).
pub const MAX_TREE_LEVEL: u8 = 63;

/// Entry kind codes in a batch.
const ENTRY_WRITE: u8 = 1;
const ENTRY_WRITE_ZEROES: u8 = 2;
const ENTRY_DISCARD: u8 = 3;
const ENTRY_BARRIER: u8 = 4;
const ENTRY_BOOKMARK: u8 = 5;
const ENTRY_REF: u8 = 6;
const ENTRY_DEDUPED: u8 = 7;
const ENTRY_RESYNC_BEGIN: u8 = 8;
const ENTRY_RESYNC_END: u8 = 9;
const ENTRY_RESIZE: u8 = 10;
/// Dedupe reference source codes.
const REF_EARLIER: u8 = 1;
const REF_HASH: u8 = 2;

/// Whether `Batch` bodies are zstd-compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Bodies go as they are.
    Off,
    /// Bodies are compressed at this zstd level (1 to 22; negative levels are the fast
    /// modes). A body that does not shrink goes uncompressed.
    Zstd {
        /// The zstd level.
        level: i32,
    },
}

/// The decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The protocol version the body is laid out in.
    pub version: u16,
    /// The message type.
    pub message_type: MessageType,
    /// The flags (bit 0: compressed).
    pub flags: u8,
    /// Length of the body after the header.
    pub body_len: u32,
}

impl FrameHeader {
    /// Length of the whole frame.
    pub fn frame_len(&self) -> u64 {
        FRAME_HEADER_LEN as u64 + u64::from(self.body_len)
    }
}

/// Encodes and decodes frames under one maximum frame length, and holds the zstd contexts
/// so they are reused from frame to frame.
pub struct Codec {
    max_frame_len: u32,
    compression: Compression,
    compressor: Option<zstd::bulk::Compressor<'static>>,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
    scratch: Vec<u8>,
    compressed: Vec<u8>,
}

impl fmt::Debug for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Codec")
            .field("max_frame_len", &self.max_frame_len)
            .field("compression", &self.compression)
            .finish_non_exhaustive()
    }
}

impl Default for Codec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME_LEN).expect("the default maximum is in range")
    }
}

impl Codec {
    /// A codec refusing frames longer than `max_frame_len` bytes (header included), with
    /// compression off.
    pub fn new(max_frame_len: u32) -> Result<Self> {
        if !(MIN_FRAME_LEN_FLOOR..=MAX_FRAME_LEN_CEILING).contains(&max_frame_len) {
            return Err(WireError::InvalidField {
                object: "codec configuration".to_owned(),
                field: "max_frame_len",
                found: max_frame_len.to_string(),
                expected: format!("{MIN_FRAME_LEN_FLOOR} to {MAX_FRAME_LEN_CEILING}"),
            });
        }
        Ok(Self {
            max_frame_len,
            compression: Compression::Off,
            compressor: None,
            decompressor: None,
            scratch: Vec::new(),
            compressed: Vec::new(),
        })
    }

    /// The maximum frame length, header included.
    pub fn max_frame_len(&self) -> u32 {
        self.max_frame_len
    }

    /// The largest body a frame may carry.
    pub fn max_body_len(&self) -> u32 {
        self.max_frame_len - FRAME_HEADER_LEN as u32
    }

    /// The compression used for `Batch` bodies from now on (changeable at any time: the
    /// receiver needs no notice).
    pub fn set_compression(&mut self, compression: Compression) {
        self.compression = compression;
    }

    /// The compression in use.
    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// Appends one frame carrying `message` to `out`. Refuses a message that breaks a rule
    /// of the spec, or whose frame would exceed the maximum frame length; `out` is then
    /// left as it was.
    pub fn encode(&mut self, message: &Message, out: &mut Vec<u8>) -> Result<()> {
        let start = out.len();
        let result = self.encode_inner(message, out, start);
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    fn encode_inner(&mut self, message: &Message, out: &mut Vec<u8>, start: usize) -> Result<()> {
        let ty = message.message_type();
        let compress = match (message, self.compression) {
            (Message::Batch(_), Compression::Zstd { level }) => Some(level),
            _ => None,
        };
        let mut flags = 0;
        out.extend_from_slice(&[0; FRAME_HEADER_LEN]);
        if let Some(level) = compress {
            let mut body = std::mem::take(&mut self.scratch);
            body.clear();
            let encoded = encode_body(message, &mut body, self.max_frame_len);
            let compressed = encoded.and_then(|()| {
                self.check_body_len(ty, body.len() as u64)?;
                self.compress(&body, level)
            });
            match compressed {
                Ok(true) => {
                    flags = FLAG_COMPRESSED;
                    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
                    out.extend_from_slice(&self.compressed);
                }
                Ok(false) => out.extend_from_slice(&body),
                Err(e) => {
                    self.scratch = body;
                    return Err(e);
                }
            }
            self.scratch = body;
        } else {
            encode_body(message, out, self.max_frame_len)?;
        }
        let body_len = (out.len() - start - FRAME_HEADER_LEN) as u64;
        self.check_body_len(ty, body_len)?;
        let h = &mut out[start..start + FRAME_HEADER_LEN];
        h[0..4].copy_from_slice(&FRAME_MAGIC);
        h[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        h[6] = ty as u8;
        h[7] = flags;
        h[8..12].copy_from_slice(&(body_len as u32).to_le_bytes());
        Ok(())
    }

    fn check_body_len(&self, ty: MessageType, body_len: u64) -> Result<()> {
        if body_len > u64::from(self.max_body_len()) {
            return Err(WireError::FrameTooLarge {
                object: format!("{ty} frame"),
                len: body_len + FRAME_HEADER_LEN as u64,
                max: u64::from(self.max_frame_len),
            });
        }
        Ok(())
    }

    /// Compresses `body` into `self.compressed`; false if that would not make it smaller.
    fn compress(&mut self, body: &[u8], level: i32) -> Result<bool> {
        let err = |source| WireError::Compress { object: "Batch body".to_owned(), source };
        let compressor = match &mut self.compressor {
            Some(c) => {
                c.set_compression_level(level).map_err(err)?;
                c
            }
            None => self.compressor.insert(zstd::bulk::Compressor::new(level).map_err(err)?),
        };
        self.compressed.clear();
        self.compressed.reserve(zstd::zstd_safe::compress_bound(body.len()));
        compressor.compress_to_buffer(body, &mut self.compressed).map_err(err)?;
        Ok(COMPRESSED_PREFIX_LEN + self.compressed.len() < body.len())
    }

    /// Reads and validates a frame header from the start of `bytes`. Needs only the 12
    /// header bytes; checks the magic, the type, the flags and the body length against the
    /// maximum, but not the version (see [`Codec::decode`]).
    pub fn peek_header(&self, bytes: &[u8]) -> Result<FrameHeader> {
        let obj = Obj::Header;
        if bytes.len() >= 4 && bytes[0..4] != FRAME_MAGIC {
            let mut found = [0; 4];
            found.copy_from_slice(&bytes[0..4]);
            return Err(WireError::BadMagic { found, expected: FRAME_MAGIC });
        }
        if bytes.len() < FRAME_HEADER_LEN {
            return Err(WireError::Truncated {
                object: obj.to_string(),
                needed: FRAME_HEADER_LEN as u64,
                found: bytes.len() as u64,
            });
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        let Some(message_type) = MessageType::from_code(bytes[6]) else {
            return Err(WireError::UnknownMessageType {
                found: bytes[6],
                expected: format!(
                    "one of {:?}",
                    MessageType::ALL.iter().map(|t| *t as u8).collect::<Vec<_>>()
                ),
            });
        };
        let flags = bytes[7];
        let allowed = if message_type == MessageType::Batch { FLAG_COMPRESSED } else { 0 };
        if flags & !allowed != 0 {
            return Err(invalid(
                obj,
                "flags",
                format!("{flags:#04x}"),
                if allowed == 0 {
                    format!("0 on a {message_type} frame")
                } else {
                    "only bit 0 (compressed)".to_owned()
                },
            ));
        }
        let body_len = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if body_len > self.max_body_len() {
            return Err(WireError::FrameTooLarge {
                object: format!("{message_type} frame"),
                len: u64::from(body_len) + FRAME_HEADER_LEN as u64,
                max: u64::from(self.max_frame_len),
            });
        }
        Ok(FrameHeader { version, message_type, flags, body_len })
    }

    /// Decodes one whole frame (exactly one: trailing bytes are an error). Write data in
    /// the result shares `frame`'s memory.
    ///
    /// A frame in a protocol version this build does not speak is refused with
    /// [`WireError::VersionMismatch`]; for a `Hello` the error carries the peer's whole
    /// version range, read from the frozen start of its body. `Refuse` and `Error` frames
    /// decode whatever their version, so a peer's refusal is always readable.
    pub fn decode(&mut self, frame: Bytes) -> Result<Message> {
        let header = self.peek_header(&frame)?;
        let len = frame.len() as u64;
        if len < header.frame_len() {
            return Err(WireError::Truncated {
                object: format!("{} frame", header.message_type),
                needed: header.frame_len(),
                found: len,
            });
        }
        if len > header.frame_len() {
            return Err(WireError::TrailingBytes {
                object: format!("{} frame", header.message_type),
                count: len - header.frame_len(),
            });
        }
        let body = frame.slice(FRAME_HEADER_LEN..);
        let ty = header.message_type;
        if !SUPPORTED_VERSIONS.contains(header.version)
            && !matches!(ty, MessageType::Refuse | MessageType::Error)
        {
            let mut theirs = VersionRange::single(header.version);
            if ty == MessageType::Hello && body.len() >= 4 {
                let min = u16::from_le_bytes([body[0], body[1]]);
                let max = u16::from_le_bytes([body[2], body[3]]);
                if min <= max && (min..=max).contains(&header.version) {
                    theirs = VersionRange { min, max };
                }
            }
            return Err(WireError::VersionMismatch { ours: SUPPORTED_VERSIONS, theirs });
        }
        let body = if header.flags & FLAG_COMPRESSED != 0 { self.decompress(&body)? } else { body };
        decode_body(ty, &body, self.max_frame_len)
    }

    /// [`Codec::decode`] of a borrowed frame (copies it once).
    pub fn decode_slice(&mut self, frame: &[u8]) -> Result<Message> {
        self.decode(Bytes::copy_from_slice(frame))
    }

    fn decompress(&mut self, body: &Bytes) -> Result<Bytes> {
        let obj = Obj::Compressed;
        let mut r = Reader::new(body);
        let declared = r.u32(obj)?;
        if declared == 0 {
            return Err(invalid(obj, "uncompressed_len", "0".to_owned(), "at least 1".to_owned()));
        }
        if declared > self.max_body_len() {
            return Err(WireError::FrameTooLarge {
                object: obj.to_string(),
                len: u64::from(declared) + FRAME_HEADER_LEN as u64,
                max: u64::from(self.max_frame_len),
            });
        }
        let err = |source| WireError::Decompress {
            object: obj.to_string(),
            declared: u64::from(declared),
            source,
        };
        let decompressor = match &mut self.decompressor {
            Some(d) => d,
            None => self.decompressor.insert(zstd::bulk::Decompressor::new().map_err(err)?),
        };
        // The capacity is the declared length, already bounded by the maximum frame length:
        // zstd fails rather than write past it.
        let out = decompressor
            .decompress(&body[COMPRESSED_PREFIX_LEN..], declared as usize)
            .map_err(err)?;
        if out.len() != declared as usize {
            return Err(invalid(
                obj,
                "uncompressed_len",
                declared.to_string(),
                format!("{} (the length the zstd data decompressed to)", out.len()),
            ));
        }
        Ok(Bytes::from(out))
    }
}

/// What a decode error names: built lazily, only when an error is returned.
#[derive(Debug, Clone, Copy)]
enum Obj {
    Header,
    Body(MessageType),
    Compressed,
    Entry { index: usize, seq: u64 },
    Volume(usize),
    Range(usize),
}

impl fmt::Display for Obj {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Obj::Header => f.write_str("frame header"),
            Obj::Body(ty) => write!(f, "{ty} body"),
            Obj::Compressed => f.write_str("Batch body (compressed)"),
            Obj::Entry { index, seq } => write!(f, "Batch entry {index} (seq {seq})"),
            Obj::Volume(i) => write!(f, "Hello volume {i}"),
            Obj::Range(i) => write!(f, "HashRequest range {i}"),
        }
    }
}

/// A `Resume`'s replica state: open windows only when inconsistent, at least one then, none
/// with id 0, at most [`MAX_OPEN_RESYNCS`].
fn check_replica(obj: Obj, replica: &ReplicaState) -> Result<()> {
    let n = replica.open_resyncs.len();
    let ok = match replica.kind {
        ReplicaKind::Inconsistent => (1..=MAX_OPEN_RESYNCS).contains(&n),
        ReplicaKind::Blank => n <= MAX_OPEN_RESYNCS,
        ReplicaKind::Consistent => n == 0,
    };
    if !ok {
        return Err(invalid(
            obj,
            "open_count",
            n.to_string(),
            format!("1 to {MAX_OPEN_RESYNCS} when inconsistent, 0 when consistent"),
        ));
    }
    if replica.open_resyncs.contains(&0) {
        return Err(invalid(obj, "open_resync", "0".to_owned(), "nonzero".to_owned()));
    }
    Ok(())
}

fn invalid(obj: Obj, field: &'static str, found: String, expected: String) -> WireError {
    WireError::InvalidField { object: obj.to_string(), field, found, expected }
}

/// A bounds-checked reader over a body. Every read checks the bytes that remain first.
struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a Bytes) -> Self {
        Self { buf, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, obj: Obj) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(WireError::Truncated {
                object: obj.to_string(),
                needed: self.pos as u64 + n as u64,
                found: self.buf.len() as u64,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn share(&mut self, n: usize, obj: Obj) -> Result<Bytes> {
        let start = self.pos;
        self.take(n, obj)?;
        Ok(self.buf.slice(start..start + n))
    }

    fn u8(&mut self, obj: Obj) -> Result<u8> {
        Ok(self.take(1, obj)?[0])
    }

    fn u16(&mut self, obj: Obj) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2, obj)?.try_into().expect("2 bytes")))
    }

    fn u32(&mut self, obj: Obj) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, obj)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self, obj: Obj) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, obj)?.try_into().expect("8 bytes")))
    }

    fn array<const N: usize>(&mut self, obj: Obj) -> Result<[u8; N]> {
        Ok(self.take(N, obj)?.try_into().expect("N bytes"))
    }

    fn reserved(&mut self, n: usize, obj: Obj) -> Result<()> {
        let bytes = self.take(n, obj)?;
        if bytes.iter().any(|&b| b != 0) {
            return Err(invalid(obj, "reserved", format!("{bytes:02x?}"), "all zero".to_owned()));
        }
        Ok(())
    }

    fn text(&mut self, n: usize, obj: Obj, field: &'static str) -> Result<String> {
        let bytes = self.take(n, obj)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(invalid(
                obj,
                field,
                format!("{n} bytes, invalid UTF-8 at byte {}", e.valid_up_to()),
                "UTF-8 text".to_owned(),
            )),
        }
    }

    fn finish(&self, obj: Obj) -> Result<()> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(WireError::TrailingBytes { object: obj.to_string(), count: count as u64 }),
        }
    }
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_zeros(out: &mut Vec<u8>, n: usize) {
    out.resize(out.len() + n, 0);
}

// ---- Rules shared by the encoder and the decoder ----

fn check_versions(obj: Obj, v: VersionRange) -> Result<()> {
    if v.min == 0 || v.min > v.max {
        return Err(invalid(
            obj,
            "versions",
            format!("{}..={}", v.min, v.max),
            "1 <= min <= max".to_owned(),
        ));
    }
    Ok(())
}

fn check_node_name(obj: Obj, name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("1 to 255 bytes")
    } else if name.len() > MAX_NODE_NAME {
        Some("at most 255 bytes")
    } else if name.chars().any(char::is_control) {
        Some("no control characters")
    } else {
        None
    };
    match reason {
        Some(expected) => Err(invalid(obj, "node_name", format!("{name:?}"), expected.to_owned())),
        None => Ok(()),
    }
}

fn check_text(obj: Obj, field: &'static str, text: &str) -> Result<()> {
    if text.len() > MAX_TEXT {
        return Err(invalid(
            obj,
            field,
            format!("{} bytes", text.len()),
            format!("at most {MAX_TEXT} bytes"),
        ));
    }
    if text.chars().any(char::is_control) {
        return Err(invalid(obj, field, format!("{text:?}"), "no control characters".to_owned()));
    }
    Ok(())
}

fn check_volumes(volumes: &[VolumeInfo]) -> Result<()> {
    let obj = Obj::Body(MessageType::Hello);
    if volumes.is_empty() || volumes.len() > usize::from(u16::MAX) {
        return Err(invalid(
            obj,
            "volume_count",
            volumes.len().to_string(),
            "1 to 65535".to_owned(),
        ));
    }
    for (i, v) in volumes.iter().enumerate() {
        let obj = Obj::Volume(i);
        if i > 0 && v.id <= volumes[i - 1].id {
            return Err(invalid(
                obj,
                "id",
                v.id.to_string(),
                format!("above the previous volume's id {}", volumes[i - 1].id),
            ));
        }
        if !(512..=1 << 20).contains(&v.block_size) || !v.block_size.is_power_of_two() {
            return Err(invalid(
                obj,
                "block_size",
                v.block_size.to_string(),
                "a power of two from 512 to 1 MiB".to_owned(),
            ));
        }
        if v.size % u64::from(v.block_size) != 0 {
            return Err(invalid(
                obj,
                "size",
                v.size.to_string(),
                format!("a multiple of the block size {}", v.block_size),
            ));
        }
    }
    Ok(())
}

/// A resize entry grows a volume (or repeats its size): `new_size >= old_size`, and at
/// least 1.
fn check_resize(obj: Obj, old_size: u64, new_size: u64) -> Result<()> {
    if new_size < old_size || new_size == 0 {
        return Err(invalid(
            obj,
            "new_size",
            new_size.to_string(),
            format!("at least the old size {old_size} and at least 1 (volumes only grow)"),
        ));
    }
    Ok(())
}

fn check_range_end(obj: Obj, offset: u64, len: u64) -> Result<()> {
    if offset.checked_add(len).is_none() {
        return Err(invalid(
            obj,
            "offset",
            offset.to_string(),
            format!("offset + length ({len}) within 2^64"),
        ));
    }
    Ok(())
}

fn check_entry(obj: Obj, seq: u64, body: &EntryBody) -> Result<()> {
    match body {
        EntryBody::Event(Event::Write { offset, data, .. }) => {
            if data.is_empty() || data.len() > u32::MAX as usize {
                return Err(invalid(
                    obj,
                    "length",
                    data.len().to_string(),
                    "1 to 2^32 - 1".to_owned(),
                ));
            }
            check_range_end(obj, *offset, data.len() as u64)
        }
        EntryBody::Event(
            Event::WriteZeroes { offset, len, .. } | Event::Discard { offset, len, .. },
        ) => {
            if *len == 0 {
                return Err(invalid(obj, "length", "0".to_owned(), "at least 1".to_owned()));
            }
            check_range_end(obj, *offset, u64::from(*len))
        }
        EntryBody::Event(Event::Barrier) => Ok(()),
        EntryBody::Event(Event::Resize { old_size, new_size, .. }) => {
            check_resize(obj, *old_size, *new_size)
        }
        EntryBody::Event(Event::ResyncBegin { id } | Event::ResyncEnd { id }) => {
            if *id == 0 {
                return Err(invalid(obj, "resync_id", "0".to_owned(), "nonzero".to_owned()));
            }
            Ok(())
        }
        EntryBody::Event(Event::Bookmark(b)) => validate_bookmark_name(&b.name)
            .map_err(|e| invalid(obj, "bookmark_name", format!("{:?}", b.name), e.to_string())),
        EntryBody::Ref(r) => {
            if r.len == 0 {
                return Err(invalid(obj, "length", "0".to_owned(), "at least 1".to_owned()));
            }
            check_range_end(obj, r.offset, u64::from(r.len))?;
            if let RefSource::Earlier { seq: earlier, at } = r.source {
                if earlier.0 == 0 || earlier.0 >= seq {
                    return Err(invalid(
                        obj,
                        "ref_seq",
                        earlier.to_string(),
                        format!("1 to {} (an earlier entry)", seq - 1),
                    ));
                }
                if at.checked_add(r.len).is_none() {
                    return Err(invalid(
                        obj,
                        "ref_at",
                        at.to_string(),
                        format!("at + length ({}) within 2^32", r.len),
                    ));
                }
            }
            Ok(())
        }
        EntryBody::Deduped(d) => check_deduped(obj, seq, d),
    }
}

fn check_deduped(obj: Obj, seq: u64, d: &DedupedWrite) -> Result<()> {
    if d.len == 0 {
        return Err(invalid(obj, "length", "0".to_owned(), "at least 1".to_owned()));
    }
    check_range_end(obj, d.offset, u64::from(d.len))?;
    if d.spans.is_empty() {
        return Err(invalid(obj, "span_count", "0".to_owned(), "at least 1".to_owned()));
    }
    let whole_blocks = u64::from(d.len / DEDUPE_BLOCK);
    let mut next_free = 0u64;
    for span in &d.spans {
        let start = u64::from(span.first_block);
        let end = start + u64::from(span.blocks);
        if span.blocks == 0 || start < next_free || end > whole_blocks {
            return Err(invalid(
                obj,
                "ref_span",
                format!("blocks {start}..{end}"),
                format!(
                    "at least one block, from block {next_free} on (ascending, not overlapping), \
                     within the write's {whole_blocks} whole blocks"
                ),
            ));
        }
        next_free = end;
        if span.seq.0 == 0 || span.seq.0 >= seq {
            return Err(invalid(
                obj,
                "ref_seq",
                span.seq.to_string(),
                format!("1 to {} (an earlier entry)", seq - 1),
            ));
        }
        let bytes = u64::from(span.blocks) * u64::from(DEDUPE_BLOCK);
        if u64::from(span.at) + bytes > u64::from(u32::MAX) {
            return Err(invalid(
                obj,
                "ref_at",
                span.at.to_string(),
                format!("at + {bytes} (the span's bytes) within 2^32"),
            ));
        }
    }
    let literal = u64::from(d.len) - d.referenced_bytes();
    if d.literal.len() as u64 != literal {
        return Err(invalid(
            obj,
            "literal",
            format!("{} bytes", d.literal.len()),
            format!("{literal} bytes (the length less the referenced blocks)"),
        ));
    }
    Ok(())
}

fn check_batch_header(first_seq: Seq, count: u64) -> Result<()> {
    let obj = Obj::Body(MessageType::Batch);
    if count == 0 {
        return Err(invalid(obj, "entry_count", "0".to_owned(), "at least 1".to_owned()));
    }
    if first_seq.0 == 0 || first_seq.0.checked_add(count - 1).is_none() {
        return Err(invalid(
            obj,
            "first_seq",
            first_seq.to_string(),
            format!("1 to 2^64 - {count} (room for {count} entries)"),
        ));
    }
    Ok(())
}

fn check_level(obj: Obj, level: u8) -> Result<()> {
    if level > MAX_TREE_LEVEL {
        return Err(invalid(obj, "level", level.to_string(), format!("0 to {MAX_TREE_LEVEL}")));
    }
    Ok(())
}

/// The most hashes one `HashReply` can carry under `max_frame_len`.
pub fn max_hashes_per_reply(max_frame_len: u32) -> u64 {
    (u64::from(max_frame_len) - (FRAME_HEADER_LEN + HASH_REPLY_FIXED_LEN) as u64) / HASH_LEN as u64
}

fn check_ranges(ranges: &[NodeRange], max_frame_len: u32) -> Result<()> {
    let obj = Obj::Body(MessageType::HashRequest);
    if ranges.is_empty() {
        return Err(invalid(obj, "range_count", "0".to_owned(), "at least 1".to_owned()));
    }
    let mut total = 0u64;
    let mut next_free = 0u64;
    for (i, r) in ranges.iter().enumerate() {
        let obj = Obj::Range(i);
        if r.count == 0 {
            return Err(invalid(obj, "count", "0".to_owned(), "at least 1".to_owned()));
        }
        if i > 0 && r.first < next_free {
            return Err(invalid(
                obj,
                "first",
                r.first.to_string(),
                format!("at least {next_free} (ranges ascending, not overlapping)"),
            ));
        }
        next_free = r.first.checked_add(u64::from(r.count)).ok_or_else(|| {
            invalid(
                obj,
                "first",
                r.first.to_string(),
                format!("first + count ({}) within 2^64", r.count),
            )
        })?;
        total += u64::from(r.count);
    }
    let max = max_hashes_per_reply(max_frame_len);
    if total > max {
        return Err(invalid(
            obj,
            "node_count",
            total.to_string(),
            format!("at most {max}, so the reply fits one frame"),
        ));
    }
    Ok(())
}

// ---- Encoding ----

fn encode_body(message: &Message, out: &mut Vec<u8>, max_frame_len: u32) -> Result<()> {
    match message {
        Message::Hello(h) => encode_hello(h, out),
        Message::Welcome(w) => {
            let obj = Obj::Body(MessageType::Welcome);
            check_welcome_version(obj, w.version)?;
            check_node_name(obj, &w.node)?;
            put_u16(out, w.version);
            put_u16(out, w.node.len() as u16);
            put_zeros(out, 4);
            out.extend_from_slice(w.node.as_bytes());
            Ok(())
        }
        Message::Refuse(r) => {
            let obj = Obj::Body(MessageType::Refuse);
            check_versions(obj, r.supported)?;
            check_text(obj, "message", &r.message)?;
            put_u16(out, r.reason.0);
            put_u16(out, r.supported.min);
            put_u16(out, r.supported.max);
            put_u16(out, r.message.len() as u16);
            put_zeros(out, 4);
            out.extend_from_slice(r.message.as_bytes());
            Ok(())
        }
        Message::Resume { last_acked, replica } => {
            check_replica(Obj::Body(MessageType::Resume), replica)?;
            put_u64(out, last_acked.0);
            out.push(replica.kind as u8);
            put_zeros(out, 3);
            put_u32(out, replica.open_resyncs.len() as u32);
            for id in &replica.open_resyncs {
                put_u64(out, *id);
            }
            Ok(())
        }
        Message::Ack { upto: v } | Message::DedupeHeld { from: v } => {
            put_u64(out, v.0);
            Ok(())
        }
        Message::Ping { nonce } | Message::Pong { nonce } => {
            put_u64(out, *nonce);
            Ok(())
        }
        Message::Error { code, message } => {
            check_text(Obj::Body(MessageType::Error), "message", message)?;
            put_u16(out, code.0);
            put_u16(out, message.len() as u16);
            put_zeros(out, 4);
            out.extend_from_slice(message.as_bytes());
            Ok(())
        }
        Message::Batch(b) => encode_batch(b, out, max_frame_len),
        Message::HashRequest(r) => {
            check_level(Obj::Body(MessageType::HashRequest), r.level)?;
            check_ranges(&r.ranges, max_frame_len)?;
            put_u32(out, r.id);
            put_u16(out, r.volume.0);
            out.push(r.shape.leaf_log2());
            out.push(r.shape.fanout_log2());
            out.push(r.level);
            put_zeros(out, 3);
            put_u32(out, r.ranges.len() as u32);
            for range in &r.ranges {
                put_u64(out, range.first);
                put_u32(out, range.count);
                put_zeros(out, 4);
            }
            Ok(())
        }
        Message::HashReply(r) => {
            let obj = Obj::Body(MessageType::HashReply);
            check_level(obj, r.level)?;
            let max = max_hashes_per_reply(max_frame_len);
            if r.hashes.is_empty() || r.hashes.len() as u64 > max {
                return Err(invalid(
                    obj,
                    "hash_count",
                    r.hashes.len().to_string(),
                    format!("1 to {max}"),
                ));
            }
            put_u32(out, r.id);
            put_u16(out, r.volume.0);
            out.push(r.level);
            out.push(0);
            put_u32(out, r.hashes.len() as u32);
            put_zeros(out, 4);
            for h in &r.hashes {
                out.extend_from_slice(&h.0);
            }
            Ok(())
        }
        Message::SourceLineage(l) => encode_lineage(MessageType::SourceLineage, l, out),
        Message::TargetLineage(l) => encode_lineage(MessageType::TargetLineage, l, out),
        Message::RepairRequest(r) => encode_repair_request(r, out),
    }
}

/// A lineage's generations: at most [`MAX_GENERATIONS`] (at least one from a source), ids
/// not 0, a root with parent 0 and branch seq 0, each later one the child of the one before
/// it. Shared with the lineage file (`crate::lineage`).
pub fn check_generations(
    object: &str,
    generations: &[Generation],
    at_least: usize,
) -> Result<(), WireError> {
    let bad = |field, found: String, expected: String| WireError::InvalidField {
        object: object.to_owned(),
        field,
        found,
        expected,
    };
    let n = generations.len();
    if n < at_least || n > MAX_GENERATIONS {
        return Err(bad(
            "generation_count",
            n.to_string(),
            format!("{at_least} to {MAX_GENERATIONS}"),
        ));
    }
    for (i, g) in generations.iter().enumerate() {
        if g.id == 0 {
            return Err(bad("generation id", format!("0 (generation {i})"), "nonzero".to_owned()));
        }
        let (parent, branch_ok) = match i {
            0 => (0, g.branch_seq == Seq::ZERO),
            _ => (generations[i - 1].id, true),
        };
        if g.parent != parent || !branch_ok {
            return Err(bad(
                "parent",
                format!("generation {i}: parent {:016x} at seq {}", g.parent, g.branch_seq),
                if i == 0 {
                    "a root: parent 0 at seq 0".to_owned()
                } else {
                    format!("the generation before it, {parent:016x}")
                },
            ));
        }
    }
    Ok(())
}

fn encode_lineage(ty: MessageType, l: &LineageInfo, out: &mut Vec<u8>) -> Result<()> {
    let at_least = usize::from(ty == MessageType::SourceLineage);
    check_generations(&Obj::Body(ty).to_string(), &l.generations, at_least)?;
    put_u64(out, l.head.0);
    let mut flags = 0;
    for (on, bit) in [
        (l.dirty, LINEAGE_DIRTY),
        (l.source_wins, LINEAGE_SOURCE_WINS),
        (l.full_resync, LINEAGE_FULL_RESYNC),
    ] {
        if on {
            flags |= bit;
        }
    }
    out.push(flags);
    put_zeros(out, 3);
    put_u32(out, l.generations.len() as u32);
    for g in &l.generations {
        put_u64(out, g.id);
        put_u64(out, g.parent);
        put_u64(out, g.branch_seq.0);
    }
    Ok(())
}

fn decode_lineage(ty: MessageType, r: &mut Reader<'_>) -> Result<LineageInfo> {
    let obj = Obj::Body(ty);
    let head = Seq(r.u64(obj)?);
    let flags = r.u8(obj)?;
    let known = LINEAGE_DIRTY | LINEAGE_SOURCE_WINS | LINEAGE_FULL_RESYNC;
    if flags & !known != 0 {
        return Err(invalid(
            obj,
            "flags",
            format!("{flags:#04x}"),
            format!("only bits {known:#04x}"),
        ));
    }
    r.reserved(3, obj)?;
    let count = r.u32(obj)? as usize;
    if count > MAX_GENERATIONS || count > r.remaining() / GENERATION_LEN {
        return Err(invalid(
            obj,
            "generation_count",
            count.to_string(),
            format!(
                "at most {MAX_GENERATIONS}, with {GENERATION_LEN} bytes each in the frame ({} remain)",
                r.remaining()
            ),
        ));
    }
    let mut generations = Vec::with_capacity(count);
    for _ in 0..count {
        generations.push(Generation {
            id: r.u64(obj)?,
            parent: r.u64(obj)?,
            branch_seq: Seq(r.u64(obj)?),
        });
    }
    check_generations(
        &obj.to_string(),
        &generations,
        usize::from(ty == MessageType::SourceLineage),
    )?;
    Ok(LineageInfo {
        generations,
        head,
        dirty: flags & LINEAGE_DIRTY != 0,
        source_wins: flags & LINEAGE_SOURCE_WINS != 0,
        full_resync: flags & LINEAGE_FULL_RESYNC != 0,
    })
}

/// Length of one range of a `RepairRequest`.
pub const REPAIR_RANGE_LEN: usize = 24;

fn check_repair_request(obj: Obj, r: &RepairRequest) -> Result<()> {
    if r.ids.is_empty() || r.ids.len() > MAX_REPAIR_IDS {
        return Err(invalid(
            obj,
            "id_count",
            r.ids.len().to_string(),
            format!("1 to {MAX_REPAIR_IDS}"),
        ));
    }
    if r.ids.contains(&0) {
        return Err(invalid(obj, "id", "0".to_owned(), "nonzero".to_owned()));
    }
    if r.ranges.is_empty() || r.ranges.len() > MAX_REPAIR_RANGES {
        return Err(invalid(
            obj,
            "range_count",
            r.ranges.len().to_string(),
            format!("1 to {MAX_REPAIR_RANGES}"),
        ));
    }
    for range in &r.ranges {
        if range.len == 0 || range.offset.checked_add(range.len).is_none() {
            return Err(invalid(
                obj,
                "range",
                format!("{}+{}", range.offset, range.len),
                "at least 1 byte, offset + len within a u64".to_owned(),
            ));
        }
    }
    Ok(())
}

fn encode_repair_request(r: &RepairRequest, out: &mut Vec<u8>) -> Result<()> {
    check_repair_request(Obj::Body(MessageType::RepairRequest), r)?;
    put_u32(out, r.ids.len() as u32);
    put_u32(out, r.ranges.len() as u32);
    for id in &r.ids {
        put_u64(out, *id);
    }
    for range in &r.ranges {
        put_u16(out, range.volume.0);
        put_zeros(out, 6);
        put_u64(out, range.offset);
        put_u64(out, range.len);
    }
    Ok(())
}

fn decode_repair_request(r: &mut Reader<'_>) -> Result<RepairRequest> {
    let obj = Obj::Body(MessageType::RepairRequest);
    let id_count = r.u32(obj)? as usize;
    let range_count = r.u32(obj)? as usize;
    let need =
        id_count.saturating_mul(8).saturating_add(range_count.saturating_mul(REPAIR_RANGE_LEN));
    if id_count > MAX_REPAIR_IDS || range_count > MAX_REPAIR_RANGES || need != r.remaining() {
        return Err(invalid(
            obj,
            "counts",
            format!("{id_count} ids, {range_count} ranges"),
            format!(
                "at most {MAX_REPAIR_IDS} ids and {MAX_REPAIR_RANGES} ranges, filling the {} bytes present",
                r.remaining()
            ),
        ));
    }
    let mut ids = Vec::with_capacity(id_count);
    for _ in 0..id_count {
        ids.push(r.u64(obj)?);
    }
    let mut ranges = Vec::with_capacity(range_count);
    for _ in 0..range_count {
        let volume = VolumeId(r.u16(obj)?);
        r.reserved(6, obj)?;
        let offset = r.u64(obj)?;
        let len = r.u64(obj)?;
        ranges.push(RepairRange { volume, offset, len });
    }
    let request = RepairRequest { ids, ranges };
    check_repair_request(obj, &request)?;
    Ok(request)
}

fn check_welcome_version(obj: Obj, version: u16) -> Result<()> {
    if version == 0 {
        return Err(invalid(obj, "version", "0".to_owned(), "at least 1".to_owned()));
    }
    if !SUPPORTED_VERSIONS.contains(version) {
        return Err(WireError::VersionMismatch {
            ours: SUPPORTED_VERSIONS,
            theirs: VersionRange::single(version),
        });
    }
    Ok(())
}

fn encode_hello(h: &Hello, out: &mut Vec<u8>) -> Result<()> {
    let obj = Obj::Body(MessageType::Hello);
    check_versions(obj, h.versions)?;
    check_node_name(obj, &h.node)?;
    check_volumes(&h.volumes)?;
    put_u16(out, h.versions.min);
    put_u16(out, h.versions.max);
    out.push(h.role as u8);
    out.push(0);
    put_u16(out, h.volumes.len() as u16);
    out.extend_from_slice(&h.pair.0);
    put_u16(out, h.node.len() as u16);
    put_zeros(out, 6);
    out.extend_from_slice(h.node.as_bytes());
    for v in &h.volumes {
        put_u16(out, v.id.0);
        put_zeros(out, 2);
        put_u32(out, v.block_size);
        put_u64(out, v.size);
    }
    Ok(())
}

fn encode_batch(b: &Batch, out: &mut Vec<u8>, max_frame_len: u32) -> Result<()> {
    check_batch_header(b.first_seq, b.entries.len() as u64)?;
    let start = out.len();
    put_u64(out, b.first_seq.0);
    put_u32(out, b.entries.len() as u32);
    put_zeros(out, 4);
    for (index, entry) in b.entries.iter().enumerate() {
        let seq = b.first_seq.0 + index as u64;
        let obj = Obj::Entry { index, seq };
        check_entry(obj, seq, &entry.body)?;
        // Stop early rather than build a body far past the limit (a 4 GiB write, say).
        if out.len() - start > max_frame_len as usize {
            return Err(WireError::FrameTooLarge {
                object: "Batch frame".to_owned(),
                len: (out.len() - start) as u64,
                max: u64::from(max_frame_len),
            });
        }
        encode_entry(entry, out);
    }
    Ok(())
}

/// Writes the 24-byte entry header.
fn entry_header(out: &mut Vec<u8>, kind: u8, volume: VolumeId, len: u32, time: Nanos, offset: u64) {
    out.push(kind);
    out.push(0);
    put_u16(out, volume.0);
    put_u32(out, len);
    put_u64(out, time.0);
    put_u64(out, offset);
}

fn encode_entry(entry: &BatchEntry, out: &mut Vec<u8>) {
    let t = entry.time;
    match &entry.body {
        EntryBody::Event(Event::Write { volume, offset, data }) => {
            entry_header(out, ENTRY_WRITE, *volume, data.len() as u32, t, *offset);
            out.extend_from_slice(data);
        }
        EntryBody::Event(Event::WriteZeroes { volume, offset, len }) => {
            entry_header(out, ENTRY_WRITE_ZEROES, *volume, *len, t, *offset);
        }
        EntryBody::Event(Event::Discard { volume, offset, len }) => {
            entry_header(out, ENTRY_DISCARD, *volume, *len, t, *offset);
        }
        EntryBody::Event(Event::Barrier) => entry_header(out, ENTRY_BARRIER, VolumeId(0), 0, t, 0),
        EntryBody::Event(Event::ResyncBegin { id }) => {
            entry_header(out, ENTRY_RESYNC_BEGIN, VolumeId(0), 0, t, 0);
            put_u64(out, *id);
        }
        EntryBody::Event(Event::ResyncEnd { id }) => {
            entry_header(out, ENTRY_RESYNC_END, VolumeId(0), 0, t, 0);
            put_u64(out, *id);
        }
        EntryBody::Event(Event::Resize { volume, old_size, new_size }) => {
            entry_header(out, ENTRY_RESIZE, *volume, 0, t, 0);
            put_u64(out, *old_size);
            put_u64(out, *new_size);
        }
        EntryBody::Event(Event::Bookmark(b)) => {
            entry_header(out, ENTRY_BOOKMARK, VolumeId(0), b.name.len() as u32, t, 0);
            put_u64(out, b.group);
            out.push(b.kind as u8);
            put_zeros(out, 7);
            out.extend_from_slice(b.name.as_bytes());
        }
        EntryBody::Ref(r) => {
            entry_header(out, ENTRY_REF, r.volume, r.len, t, r.offset);
            match r.source {
                RefSource::Earlier { seq, at } => {
                    out.push(REF_EARLIER);
                    put_zeros(out, 3);
                    put_u32(out, at);
                    put_u64(out, seq.0);
                }
                RefSource::Hash(h) => {
                    out.push(REF_HASH);
                    put_zeros(out, 3);
                    out.extend_from_slice(&h.0);
                }
            }
        }
        EntryBody::Deduped(d) => {
            entry_header(out, ENTRY_DEDUPED, d.volume, d.len, t, d.offset);
            // Checked by `check_deduped`: fewer spans than whole blocks of a u32 length.
            put_u32(out, d.spans.len() as u32);
            put_zeros(out, 4);
            for span in &d.spans {
                put_u32(out, span.first_block);
                put_u32(out, span.blocks);
                put_u64(out, span.seq.0);
                put_u32(out, span.at);
                put_zeros(out, 4);
            }
            out.extend_from_slice(&d.literal);
        }
    }
}

// ---- Decoding ----

fn decode_body(ty: MessageType, body: &Bytes, max_frame_len: u32) -> Result<Message> {
    let obj = Obj::Body(ty);
    let mut r = Reader::new(body);
    let message = match ty {
        MessageType::Hello => Message::Hello(decode_hello(&mut r)?),
        MessageType::Welcome => {
            let version = r.u16(obj)?;
            check_welcome_version(obj, version)?;
            let name_len = r.u16(obj)?;
            r.reserved(4, obj)?;
            let node = r.text(usize::from(name_len), obj, "node_name")?;
            check_node_name(obj, &node)?;
            Message::Welcome(Welcome { version, node })
        }
        MessageType::Refuse => {
            let reason = RefuseReason(r.u16(obj)?);
            let supported = VersionRange { min: r.u16(obj)?, max: r.u16(obj)? };
            check_versions(obj, supported)?;
            let len = r.u16(obj)?;
            r.reserved(4, obj)?;
            let message = r.text(usize::from(len), obj, "message")?;
            check_text(obj, "message", &message)?;
            Message::Refuse(Refuse { reason, supported, message })
        }
        MessageType::Resume => {
            let last_acked = Seq(r.u64(obj)?);
            let code = r.u8(obj)?;
            let kind = ReplicaKind::from_code(code)
                .ok_or_else(|| invalid(obj, "replica", code.to_string(), "1, 2 or 3".to_owned()))?;
            r.reserved(3, obj)?;
            let count = r.u32(obj)? as usize;
            if count > MAX_OPEN_RESYNCS || count * 8 > r.remaining() {
                return Err(invalid(
                    obj,
                    "open_count",
                    count.to_string(),
                    format!("at most {MAX_OPEN_RESYNCS}, with 8 bytes each in the frame"),
                ));
            }
            let mut open_resyncs = Vec::with_capacity(count);
            for _ in 0..count {
                open_resyncs.push(r.u64(obj)?);
            }
            let replica = ReplicaState { kind, open_resyncs };
            check_replica(obj, &replica)?;
            Message::Resume { last_acked, replica }
        }
        MessageType::Ack => Message::Ack { upto: Seq(r.u64(obj)?) },
        MessageType::DedupeHeld => Message::DedupeHeld { from: Seq(r.u64(obj)?) },
        MessageType::Ping => Message::Ping { nonce: r.u64(obj)? },
        MessageType::Pong => Message::Pong { nonce: r.u64(obj)? },
        MessageType::Error => {
            let code = ErrorCode(r.u16(obj)?);
            let len = r.u16(obj)?;
            r.reserved(4, obj)?;
            let message = r.text(usize::from(len), obj, "message")?;
            check_text(obj, "message", &message)?;
            Message::Error { code, message }
        }
        MessageType::Batch => Message::Batch(decode_batch(&mut r)?),
        MessageType::HashRequest => {
            let id = r.u32(obj)?;
            let volume = VolumeId(r.u16(obj)?);
            let leaf_log2 = r.u8(obj)?;
            let fanout_log2 = r.u8(obj)?;
            let shape = TreeShape::new(leaf_log2, fanout_log2).map_err(|e| match e {
                WireError::InvalidField { field, found, expected, .. } => {
                    WireError::InvalidField { object: obj.to_string(), field, found, expected }
                }
                other => other,
            })?;
            let level = r.u8(obj)?;
            check_level(obj, level)?;
            r.reserved(3, obj)?;
            let count = r.u32(obj)? as usize;
            if count > r.remaining() / NODE_RANGE_LEN {
                return Err(count_error(obj, "range_count", count, r.remaining(), NODE_RANGE_LEN));
            }
            let mut ranges = Vec::with_capacity(count);
            for i in 0..count {
                let obj = Obj::Range(i);
                let first = r.u64(obj)?;
                let n = r.u32(obj)?;
                r.reserved(4, obj)?;
                ranges.push(NodeRange { first, count: n });
            }
            check_ranges(&ranges, max_frame_len)?;
            Message::HashRequest(HashRequest { id, volume, shape, level, ranges })
        }
        MessageType::HashReply => {
            let id = r.u32(obj)?;
            let volume = VolumeId(r.u16(obj)?);
            let level = r.u8(obj)?;
            check_level(obj, level)?;
            r.reserved(1, obj)?;
            let count = r.u32(obj)? as usize;
            r.reserved(4, obj)?;
            if count == 0 || count != r.remaining() / HASH_LEN {
                return Err(invalid(
                    obj,
                    "hash_count",
                    count.to_string(),
                    format!(
                        "{} for the {} hash bytes present (at least 1)",
                        r.remaining() / HASH_LEN,
                        r.remaining()
                    ),
                ));
            }
            let mut hashes = Vec::with_capacity(count);
            for _ in 0..count {
                hashes.push(NodeHash(r.array(obj)?));
            }
            Message::HashReply(HashReply { id, volume, level, hashes })
        }
        MessageType::SourceLineage => Message::SourceLineage(decode_lineage(ty, &mut r)?),
        MessageType::TargetLineage => Message::TargetLineage(decode_lineage(ty, &mut r)?),
        MessageType::RepairRequest => Message::RepairRequest(decode_repair_request(&mut r)?),
    };
    r.finish(obj)?;
    Ok(message)
}

fn count_error(
    obj: Obj,
    field: &'static str,
    count: usize,
    remaining: usize,
    each: usize,
) -> WireError {
    invalid(
        obj,
        field,
        count.to_string(),
        format!("at most {} ({remaining} bytes remain, {each} per item)", remaining / each),
    )
}

fn decode_hello(r: &mut Reader<'_>) -> Result<Hello> {
    let obj = Obj::Body(MessageType::Hello);
    let versions = VersionRange { min: r.u16(obj)?, max: r.u16(obj)? };
    check_versions(obj, versions)?;
    let role_code = r.u8(obj)?;
    let role = Role::from_code(role_code).ok_or_else(|| {
        invalid(obj, "role", role_code.to_string(), "1 (source) or 2 (target)".to_owned())
    })?;
    r.reserved(1, obj)?;
    let count = usize::from(r.u16(obj)?);
    let pair = PairId(r.array(obj)?);
    let name_len = usize::from(r.u16(obj)?);
    r.reserved(6, obj)?;
    debug_assert_eq!(r.pos, HELLO_FIXED_LEN);
    let node = r.text(name_len, obj, "node_name")?;
    check_node_name(obj, &node)?;
    if count > r.remaining() / VOLUME_LEN {
        return Err(count_error(obj, "volume_count", count, r.remaining(), VOLUME_LEN));
    }
    let mut volumes = Vec::with_capacity(count);
    for i in 0..count {
        let obj = Obj::Volume(i);
        let id = VolumeId(r.u16(obj)?);
        r.reserved(2, obj)?;
        let block_size = r.u32(obj)?;
        let size = r.u64(obj)?;
        volumes.push(VolumeInfo { id, block_size, size });
    }
    check_volumes(&volumes)?;
    Ok(Hello { versions, role, node, pair, volumes })
}

fn decode_batch(r: &mut Reader<'_>) -> Result<Batch> {
    let obj = Obj::Body(MessageType::Batch);
    let first_seq = Seq(r.u64(obj)?);
    let count = r.u32(obj)? as usize;
    r.reserved(4, obj)?;
    debug_assert_eq!(r.pos, BATCH_FIXED_LEN);
    if count > r.remaining() / ENTRY_HEADER_LEN {
        return Err(count_error(obj, "entry_count", count, r.remaining(), ENTRY_HEADER_LEN));
    }
    check_batch_header(first_seq, count as u64)?;
    let mut entries = Vec::with_capacity(count);
    for index in 0..count {
        let seq = first_seq.0 + index as u64;
        let obj = Obj::Entry { index, seq };
        let entry = decode_entry(r, obj)?;
        check_entry(obj, seq, &entry.body)?;
        entries.push(entry);
    }
    Ok(Batch { first_seq, entries })
}

fn decode_entry(r: &mut Reader<'_>, obj: Obj) -> Result<BatchEntry> {
    let kind = r.u8(obj)?;
    r.reserved(1, obj)?;
    let volume = VolumeId(r.u16(obj)?);
    let len = r.u32(obj)?;
    let time = Nanos(r.u64(obj)?);
    let offset = r.u64(obj)?;
    let no_range = |what: &str| -> Result<()> {
        if volume.0 != 0 || offset != 0 {
            return Err(invalid(
                obj,
                "volume/offset",
                format!("{volume}/{offset}"),
                format!("0/0 on a {what} entry"),
            ));
        }
        Ok(())
    };
    let body = match kind {
        ENTRY_WRITE => {
            let data = r.share(len as usize, obj)?;
            EntryBody::Event(Event::Write { volume, offset, data })
        }
        ENTRY_WRITE_ZEROES => EntryBody::Event(Event::WriteZeroes { volume, offset, len }),
        ENTRY_DISCARD => EntryBody::Event(Event::Discard { volume, offset, len }),
        ENTRY_BARRIER => {
            no_range("barrier")?;
            if len != 0 {
                return Err(invalid(
                    obj,
                    "length",
                    len.to_string(),
                    "0 on a barrier entry".to_owned(),
                ));
            }
            EntryBody::Event(Event::Barrier)
        }
        ENTRY_RESYNC_BEGIN | ENTRY_RESYNC_END => {
            no_range("resync")?;
            if len != 0 {
                return Err(invalid(
                    obj,
                    "length",
                    len.to_string(),
                    "0 on a resync entry".to_owned(),
                ));
            }
            let id = r.u64(obj)?;
            if id == 0 {
                return Err(invalid(obj, "resync_id", "0".to_owned(), "nonzero".to_owned()));
            }
            EntryBody::Event(if kind == ENTRY_RESYNC_BEGIN {
                Event::ResyncBegin { id }
            } else {
                Event::ResyncEnd { id }
            })
        }
        ENTRY_RESIZE => {
            if offset != 0 || len != 0 {
                return Err(invalid(
                    obj,
                    "offset/length",
                    format!("{offset}/{len}"),
                    "0/0 on a resize entry".to_owned(),
                ));
            }
            let (old_size, new_size) = (r.u64(obj)?, r.u64(obj)?);
            check_resize(obj, old_size, new_size)?;
            EntryBody::Event(Event::Resize { volume, old_size, new_size })
        }
        ENTRY_BOOKMARK => {
            no_range("bookmark")?;
            if len == 0 || len as usize > MAX_BOOKMARK_NAME {
                return Err(invalid(
                    obj,
                    "length",
                    len.to_string(),
                    format!("1 to {MAX_BOOKMARK_NAME} (the bookmark name's length)"),
                ));
            }
            let group = r.u64(obj)?;
            let code = r.u8(obj)?;
            let kind =
                BookmarkKind::ALL.into_iter().find(|k| *k as u8 == code).ok_or_else(|| {
                    invalid(
                        obj,
                        "bookmark_kind",
                        code.to_string(),
                        "1 (user), 2 (filesystem) or 3 (application)".to_owned(),
                    )
                })?;
            r.reserved(BOOKMARK_TAIL_LEN - 9, obj)?;
            let name = r.text(len as usize, obj, "bookmark_name")?;
            let bookmark = Bookmark::new(name.clone(), kind, group)
                .map_err(|e| invalid(obj, "bookmark_name", format!("{name:?}"), e.to_string()))?;
            EntryBody::Event(Event::Bookmark(bookmark))
        }
        ENTRY_REF => {
            let source_code = r.u8(obj)?;
            r.reserved(3, obj)?;
            let source = match source_code {
                REF_EARLIER => {
                    let at = r.u32(obj)?;
                    let seq = Seq(r.u64(obj)?);
                    RefSource::Earlier { seq, at }
                }
                REF_HASH => RefSource::Hash(ContentHash(r.array(obj)?)),
                _ => {
                    return Err(invalid(
                        obj,
                        "ref_source",
                        source_code.to_string(),
                        "1 (earlier write) or 2 (content hash)".to_owned(),
                    ));
                }
            };
            EntryBody::Ref(BlockRef { volume, offset, len, source })
        }
        ENTRY_DEDUPED => EntryBody::Deduped(decode_deduped(r, obj, volume, offset, len)?),
        _ => {
            return Err(invalid(
                obj,
                "kind",
                kind.to_string(),
                "1 (write), 2 (write zeroes), 3 (discard), 4 (barrier), 5 (bookmark), 6 (ref), \
                 7 (deduplicated write), 8 (resync begin) or 9 (resync end)"
                    .to_owned(),
            ));
        }
    };
    Ok(BatchEntry { time, body })
}

/// The tail of a deduplicated write: the spans, then as many literal bytes as the spans
/// leave (the rest of the checks are `check_deduped`'s).
fn decode_deduped(
    r: &mut Reader<'_>,
    obj: Obj,
    volume: VolumeId,
    offset: u64,
    len: u32,
) -> Result<DedupedWrite> {
    let count = r.u32(obj)? as usize;
    r.reserved(4, obj)?;
    if count > r.remaining() / REF_SPAN_LEN {
        return Err(count_error(obj, "span_count", count, r.remaining(), REF_SPAN_LEN));
    }
    let mut spans = Vec::with_capacity(count);
    let mut referenced = 0u64;
    for _ in 0..count {
        let first_block = r.u32(obj)?;
        let blocks = r.u32(obj)?;
        let seq = Seq(r.u64(obj)?);
        let at = r.u32(obj)?;
        r.reserved(4, obj)?;
        // Saturating: a hostile count of huge spans must fail the check below, not wrap.
        referenced = referenced.saturating_add(u64::from(blocks) * u64::from(DEDUPE_BLOCK));
        spans.push(RefSpan { first_block, blocks, seq, at });
    }
    let Some(literal_len) = u64::from(len).checked_sub(referenced) else {
        return Err(invalid(
            obj,
            "ref_span",
            format!("{referenced} bytes referenced"),
            format!("at most the write's length ({len})"),
        ));
    };
    let literal = r.share(literal_len as usize, obj)?;
    Ok(DedupedWrite { volume, offset, len, spans, literal })
}

/// Fuzz entry point (`fuzz/fuzz_targets/wire_frame.rs`): decodes arbitrary bytes as a frame.
/// Never panics on any input. Whatever decodes must re-encode, plain and compressed, and
/// decode equal; and since the layout is canonical (reserved bytes zero, every length
/// implied by the content), an uncompressed version-1 frame must re-encode byte for byte.
/// The same bytes are also parsed as a lineage file ([`crate::lineage::fuzz_file`]), whose
/// layout is as canonical.
pub fn fuzz_frame(data: &[u8]) {
    crate::lineage::fuzz_file(data);
    let mut codec = Codec::new(1 << 20).expect("1 MiB is in range");
    let Ok(message) = codec.decode_slice(data) else {
        return;
    };
    let canonical = data[4..6] == PROTOCOL_VERSION.to_le_bytes() && data[7] & FLAG_COMPRESSED == 0;
    for compression in [Compression::Off, Compression::Zstd { level: 1 }] {
        codec.set_compression(compression);
        let mut out = Vec::new();
        if let Err(e) = codec.encode(&message, &mut out) {
            panic!("a decoded {} failed to re-encode: {e}", message.message_type());
        }
        if canonical && compression == Compression::Off {
            assert_eq!(out, data, "re-encoding changed the bytes");
        }
        let again = codec.decode_slice(&out).expect("a re-encoded frame decodes");
        assert_eq!(again, message, "round trip changed the message");
    }
}
