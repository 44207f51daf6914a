//! The wire protocol: Tidemark's framed, versioned messages, the plaintext layer that the
//! secure channel ([`crate::secure`]) carries one frame per sealed message.
//!
//! `docs/wire-protocol.md` is the written spec, with byte tables; [`codec`] is its only
//! implementation. This module owns the message types and the protocol's limits.
//!
//! Invariants:
//! 1. Every integer on the wire is little-endian, at a fixed offset.
//! 2. The decoder validates each field before using it: no input can make it overflow, index
//!    out of bounds, or allocate more than the configured maximum frame length (a
//!    compressed body included). Counts are checked against the bytes that remain before
//!    any vector is sized from them.
//! 3. Whatever [`Codec::encode`] accepts, [`Codec::decode`] returns equal; whatever
//!    [`Codec::decode`] returns, [`Codec::encode`] accepts. The round-trip proptests and the
//!    `wire_frame` fuzz target hold the codec to this.
//! 4. The 12-byte frame header and the bodies of `Hello`, `Refuse` and `Error` are frozen
//!    across protocol versions, so that any two versions can tell each other, clearly, that
//!    they do not match ([`WireError::VersionMismatch`]) instead of misreading each other.
//! 5. The sequence numbers of a batch are contiguous by construction (entry `i` is
//!    `first_seq + i`): a batch cannot carry a gap.

pub mod codec;
mod error;
pub mod merkle;

use std::fmt;

use tidemark_journal::{Event, Nanos, Seq, VolumeId};

pub use codec::{Codec, Compression, FrameHeader};
pub use error::WireError;
pub use merkle::{NodeHash, TreeShape};

/// Magic at the start of every frame.
pub const FRAME_MAGIC: [u8; 4] = *b"TDMW";
/// Length of the frame header.
pub const FRAME_HEADER_LEN: usize = 12;
/// The protocol version this build writes.
pub const PROTOCOL_VERSION: u16 = 1;
/// The protocol versions this build reads and can negotiate.
pub const SUPPORTED_VERSIONS: VersionRange =
    VersionRange { min: PROTOCOL_VERSION, max: PROTOCOL_VERSION };
/// Default maximum length of a frame, header included (16 MiB).
pub const DEFAULT_MAX_FRAME_LEN: u32 = 16 << 20;
/// Largest maximum frame length a [`Codec`] may be configured with (256 MiB).
pub const MAX_FRAME_LEN_CEILING: u32 = 256 << 20;
/// Smallest maximum frame length a [`Codec`] may be configured with (64 KiB): every
/// handshake-phase message fits.
pub const MIN_FRAME_LEN_FLOOR: u32 = 64 << 10;
/// Frame flag: the body is zstd-compressed (only on `Batch`).
pub const FLAG_COMPRESSED: u8 = 1;
/// Longest node name, in bytes of UTF-8.
pub const MAX_NODE_NAME: usize = 255;
/// Longest free-text message (`Refuse`, `Error`), in bytes of UTF-8.
pub const MAX_TEXT: usize = 1024;
/// Length of a BLAKE3 hash.
pub const HASH_LEN: usize = 32;

/// A contiguous range of protocol versions, `min..=max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VersionRange {
    /// Oldest version spoken.
    pub min: u16,
    /// Newest version spoken.
    pub max: u16,
}

impl VersionRange {
    /// A range of one version.
    pub const fn single(version: u16) -> Self {
        Self { min: version, max: version }
    }

    /// True if `version` is in the range.
    pub fn contains(self, version: u16) -> bool {
        (self.min..=self.max).contains(&version)
    }

    /// The newest version both ranges contain.
    pub fn negotiate(self, theirs: VersionRange) -> Result<u16, WireError> {
        let newest = self.max.min(theirs.max);
        let oldest = self.min.max(theirs.min);
        if newest >= oldest && self.min <= self.max && theirs.min <= theirs.max {
            Ok(newest)
        } else {
            Err(WireError::VersionMismatch { ours: self, theirs })
        }
    }
}

impl fmt::Display for VersionRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "version {}", self.min)
        } else {
            write!(f, "versions {} to {}", self.min, self.max)
        }
    }
}

/// The identity of a replication pair (a protected volume or consistency group and its
/// replica), chosen at random when the pair is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PairId(pub [u8; 16]);

impl fmt::Display for PairId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Which side of a replication pair a node plays on this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Role {
    /// Captures writes and ships them.
    Source = 1,
    /// Receives, stores and acknowledges them.
    Target = 2,
}

impl Role {
    pub(crate) fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::Source),
            2 => Some(Self::Target),
            _ => None,
        }
    }
}

/// One volume of the pair, as the sender of a `Hello` sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VolumeInfo {
    /// Index of the volume in the consistency group.
    pub id: VolumeId,
    /// Logical block size in bytes: a power of two from 512 to 1 MiB.
    pub block_size: u32,
    /// Size in bytes: a multiple of `block_size`.
    pub size: u64,
}

/// The source's opening message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The protocol versions the sender speaks. Frozen at the start of the body.
    pub versions: VersionRange,
    /// The role the sender takes on this connection.
    pub role: Role,
    /// The sender's node name: 1 to 255 bytes of UTF-8, no control characters.
    pub node: String,
    /// The replication pair this connection serves.
    pub pair: PairId,
    /// The volumes of the pair, by strictly ascending id; at least one.
    pub volumes: Vec<VolumeInfo>,
}

/// The target's acceptance of a `Hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The protocol version both sides now speak (in both ranges).
    pub version: u16,
    /// The target's node name: 1 to 255 bytes of UTF-8, no control characters.
    pub node: String,
}

/// Why a `Hello` was refused. An open set: a newer peer may send codes this build does not
/// name, and they still decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RefuseReason(pub u16);

impl RefuseReason {
    /// No protocol version in common; `Refuse::supported` says which the refuser speaks.
    pub const VERSION_MISMATCH: Self = Self(1);
    /// The target does not know the pair id.
    pub const UNKNOWN_PAIR: Self = Self(2);
    /// The volumes announced do not match the replica (count, ids, sizes, block sizes).
    pub const VOLUME_MISMATCH: Self = Self(3);
    /// Both sides claim the same role.
    pub const ROLE_CONFLICT: Self = Self(4);
    /// The pair already has a live connection, or the target is at its connection limit.
    pub const BUSY: Self = Self(5);
    /// The target cannot take a session now (its retention log failed, or it is shutting
    /// down); the source retries later.
    pub const UNAVAILABLE: Self = Self(6);
    /// Split brain: both sides took writes after their lineages branched (section 6.3);
    /// nothing is applied until the operator names the winner.
    pub const SPLIT_BRAIN: Self = Self(7);
    /// The lineages do not allow this direction without the operator's choice: the
    /// source's generation is older than the target's, the two are unrelated while the
    /// target holds writes of its own, or a failback resync is due and the source does not
    /// compare the whole volume (section 6.3).
    pub const LINEAGE: Self = Self(8);

    /// The reason's name, or `None` for a code this build does not know.
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            Self::VERSION_MISMATCH => "version mismatch",
            Self::UNKNOWN_PAIR => "unknown pair",
            Self::VOLUME_MISMATCH => "volume mismatch",
            Self::ROLE_CONFLICT => "role conflict",
            Self::BUSY => "busy",
            Self::UNAVAILABLE => "unavailable",
            Self::SPLIT_BRAIN => "split brain",
            Self::LINEAGE => "lineage conflict",
            _ => return None,
        })
    }
}

impl fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name} ({})", self.0),
            None => write!(f, "reason code {}", self.0),
        }
    }
}

/// The target's refusal of a `Hello`; the connection closes after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refuse {
    /// Why.
    pub reason: RefuseReason,
    /// The protocol versions the refuser speaks (always filled in, so a version mismatch
    /// can be reported in full whatever the reason).
    pub supported: VersionRange,
    /// A sentence for the operator: up to 1024 bytes of UTF-8.
    pub message: String,
}

/// What a fatal `Error` message is about. An open set, like [`RefuseReason`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    /// A frame failed to decode.
    pub const MALFORMED: Self = Self(1);
    /// A well-formed message arrived where the protocol does not allow it.
    pub const UNEXPECTED_MESSAGE: Self = Self(2);
    /// A batch does not start right after the last sequence number received.
    pub const SEQUENCE_GAP: Self = Self(3);
    /// A change falls outside its volume.
    pub const OUT_OF_RANGE: Self = Self(4);
    /// A dedupe reference names data the target no longer holds.
    pub const UNKNOWN_REFERENCE: Self = Self(5);
    /// The sender's storage failed (the journal refused the write, a disk error).
    pub const STORAGE: Self = Self(6);
    /// The sender is shutting down.
    pub const SHUTDOWN: Self = Self(7);
    /// Anything else.
    pub const INTERNAL: Self = Self(8);

    /// The code's name, or `None` for a code this build does not know.
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            Self::MALFORMED => "malformed frame",
            Self::UNEXPECTED_MESSAGE => "unexpected message",
            Self::SEQUENCE_GAP => "sequence gap",
            Self::OUT_OF_RANGE => "out of range",
            Self::UNKNOWN_REFERENCE => "unknown reference",
            Self::STORAGE => "storage failure",
            Self::SHUTDOWN => "shutting down",
            Self::INTERNAL => "internal error",
            _ => return None,
        })
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name} ({})", self.0),
            None => write!(f, "error code {}", self.0),
        }
    }
}

/// A BLAKE3 hash of block content, as a dedupe reference names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ContentHash(pub [u8; HASH_LEN]);

/// Where the target finds the bytes of a dedupe reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefSource {
    /// Bytes `at .. at + len` of the data of the earlier write `seq`, which the target
    /// holds in its retention window. `seq` is below the referring entry's own.
    Earlier {
        /// The earlier write's sequence number.
        seq: Seq,
        /// Offset into that write's data.
        at: u32,
    },
    /// A block whose content has this BLAKE3 hash and which the target holds (for example
    /// a block it reported in a hash exchange).
    Hash(ContentHash),
}

/// A write whose bytes the target already holds: sent as a reference instead of data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockRef {
    /// Volume in the group.
    pub volume: VolumeId,
    /// Byte offset of the write.
    pub offset: u64,
    /// Length of the write in bytes (at least 1).
    pub len: u32,
    /// Where the bytes are.
    pub source: RefSource,
}

/// The block size of a deduplicated write: its data is cut into blocks of this many bytes,
/// counted from the start of the write, and only whole blocks are sent by reference.
pub const DEDUPE_BLOCK: u32 = 4096;
/// Length of one [`RefSpan`] on the wire.
pub const REF_SPAN_LEN: usize = 24;

/// A run of consecutive whole blocks of a [`DedupedWrite`] whose bytes the target holds:
/// blocks `first_block .. first_block + blocks` of the write are bytes
/// `at .. at + blocks * DEDUPE_BLOCK` of the data of the earlier write `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RefSpan {
    /// Index of the first block of the run in the write (block `i` starts at byte
    /// `i * DEDUPE_BLOCK` of the write's data).
    pub first_block: u32,
    /// Number of blocks in the run (at least 1).
    pub blocks: u32,
    /// The earlier write's sequence number (below the referring entry's own).
    pub seq: Seq,
    /// Offset into that write's data.
    pub at: u32,
}

/// A write sent partly by reference (dedupe): the blocks its spans name are bytes the
/// target already holds, the others travel as data.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DedupedWrite {
    /// Volume in the group.
    pub volume: VolumeId,
    /// Byte offset of the write.
    pub offset: u64,
    /// Length of the write in bytes (at least 1).
    pub len: u32,
    /// The referenced runs: ascending, not overlapping, whole blocks inside the write; at
    /// least one.
    pub spans: Vec<RefSpan>,
    /// The bytes of every block no span covers, in write order (the last block may be
    /// partial): `len` minus the referenced bytes.
    pub literal: bytes::Bytes,
}

impl DedupedWrite {
    /// Bytes of the write sent by reference.
    pub fn referenced_bytes(&self) -> u64 {
        self.spans.iter().map(|s| u64::from(s.blocks) * u64::from(DEDUPE_BLOCK)).sum()
    }
}

/// What one batch entry carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryBody {
    /// A capture event as the journal stores it: data, a zeroed or discarded range (sent as
    /// a range, never as bytes), a barrier or a bookmark.
    Event(Event),
    /// A write sent as a reference to bytes the target holds (dedupe).
    Ref(BlockRef),
    /// A write sent partly as references to blocks the target holds, partly as data
    /// (dedupe).
    Deduped(DedupedWrite),
}

/// One entry of a batch. Its sequence number is implied by its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchEntry {
    /// When the source captured it.
    pub time: Nanos,
    /// What it is.
    pub body: EntryBody,
}

/// Consecutive events of the capture stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Sequence number of the first entry (at least 1).
    pub first_seq: Seq,
    /// The entries; entry `i` has sequence number `first_seq + i`. At least one.
    pub entries: Vec<BatchEntry>,
}

impl Batch {
    /// Sequence number of the last entry (`first_seq` for an empty batch, which does not
    /// encode).
    pub fn last_seq(&self) -> Seq {
        Seq(self.first_seq.0.saturating_add((self.entries.len() as u64).saturating_sub(1)))
    }

    /// The entries with their sequence numbers.
    pub fn iter(&self) -> impl Iterator<Item = (Seq, &BatchEntry)> {
        self.entries.iter().enumerate().map(|(i, e)| (Seq(self.first_seq.0 + i as u64), e))
    }
}

/// A run of consecutive tree nodes on one level, `first .. first + count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeRange {
    /// Index of the first node on its level.
    pub first: u64,
    /// Number of nodes (at least 1).
    pub count: u32,
}

/// A request for the hashes of some nodes of one level of a volume's Merkle tree (see
/// [`merkle`]). The fast resync walks top-down: it asks for the root level, compares, and
/// asks for the children of the nodes that differ, down to the leaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashRequest {
    /// Matches the reply to the request, so several can be in flight.
    pub id: u32,
    /// The volume.
    pub volume: VolumeId,
    /// The tree's leaf size and fan-out; both sides build the same tree from it.
    pub shape: TreeShape,
    /// The level: 0 is the leaves.
    pub level: u8,
    /// The nodes wanted: ascending, not overlapping, at least one range.
    pub ranges: Vec<NodeRange>,
}

impl HashRequest {
    /// Total number of nodes requested.
    pub fn node_count(&self) -> u64 {
        self.ranges.iter().map(|r| u64::from(r.count)).sum()
    }
}

/// The hashes a `HashRequest` asked for, in the order of its ranges. A node past the end of
/// the replier's tree is answered with [`NodeHash::ABSENT`] (all zeros).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashReply {
    /// The request's id.
    pub id: u32,
    /// The volume.
    pub volume: VolumeId,
    /// The level.
    pub level: u8,
    /// One hash per node requested.
    pub hashes: Vec<NodeHash>,
}

/// Most open resync windows a `Resume` reports.
pub const MAX_OPEN_RESYNCS: usize = 64;

/// What the target's replica is, as `Resume` reports it: what the source must do before
/// plain shipping can keep it current.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReplicaKind {
    /// No initial sync ever completed: the replica is blank (zeros) apart from captured
    /// events it may have received, whose windows are listed; the source runs step I of an
    /// initial sync, closing them.
    Blank = 1,
    /// The replica is at a consistent point of the source's history.
    Consistent = 2,
    /// A resync window is open (an initial sync or a resync was interrupted, or its end is
    /// still on the way): the source compares and resyncs, closing the windows named.
    Inconsistent = 3,
}

impl ReplicaKind {
    pub(crate) fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::Blank),
            2 => Some(Self::Consistent),
            3 => Some(Self::Inconsistent),
            _ => None,
        }
    }
}

/// The replica's state in a `Resume`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReplicaState {
    /// Blank, consistent or inconsistent.
    pub kind: ReplicaKind,
    /// The ids of the open resync windows (at least one when inconsistent, none when
    /// consistent; at most [`MAX_OPEN_RESYNCS`]; none is 0).
    pub open_resyncs: Vec<u64>,
}

impl ReplicaState {
    /// A consistent replica.
    pub fn consistent() -> Self {
        Self { kind: ReplicaKind::Consistent, open_resyncs: Vec::new() }
    }
}

/// Most generations a lineage holds, on the wire and in a lineage file.
pub const MAX_GENERATIONS: usize = 1024;

/// One generation of a volume's history: the span of capture sequence numbers one live
/// side assigned (a `protect` of a new volume starts the first; a `promote` starts a child
/// of the generation it promoted). Sequence numbers of one generation are its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Generation {
    /// Random, never 0.
    pub id: u64,
    /// The generation this one branched from (0 for the root).
    pub parent: u64,
    /// The seq of the parent generation at which this one branched: its history starts as
    /// the parent's state after that seq (0 for the root).
    pub branch_seq: Seq,
}

/// A side's lineage as the opening exchange carries it (messages 12 and 13, section 5.9):
/// its generations, how far into the newest one its data goes, and the operator's choice.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LineageInfo {
    /// Root first, the side's current generation last; each one's parent is the one
    /// before it. Empty only from a target that never held a history (blank).
    pub generations: Vec<Generation>,
    /// The highest seq of the current generation the side's data includes.
    pub head: Seq,
    /// The side's data may hold writes of its current generation that `head` does not count
    /// (a promoted image used live; an image changed while nothing captured it).
    pub dirty: bool,
    /// The operator chose the source as the winner of a conflict (`protect
    /// --discard-target-changes` on the source, `receive --discard-local-changes` on the
    /// target).
    pub source_wins: bool,
    /// Source only: the source compares the whole volume before shipping (a failback), so a
    /// target holding another state of the volume converges.
    pub full_resync: bool,
}

impl LineageInfo {
    /// The current generation, `None` for a blank target.
    pub fn current(&self) -> Option<&Generation> {
        self.generations.last()
    }
}

/// Most repair ids in a `RepairRequest`.
pub const MAX_REPAIR_IDS: usize = 64;
/// Most ranges in a `RepairRequest`.
pub const MAX_REPAIR_RANGES: usize = 4096;

/// A volume range a `RepairRequest` asks the source to resend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RepairRange {
    /// The volume in the group.
    pub volume: VolumeId,
    /// Byte offset.
    pub offset: u64,
    /// Bytes (at least 1; `offset + len` fits a u64).
    pub len: u64,
}

/// Target to source: the target's journal lost records (damage found on open or by a
/// scrub); resend these ranges in a resync window opened with each of these ids, so that
/// the target can offer recovery points again from the window's end.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RepairRequest {
    /// The repair ids (each nonzero, 1 to [`MAX_REPAIR_IDS`]): the source opens one
    /// `ResyncBegin` per id and closes them all at the end of the repair.
    pub ids: Vec<u64>,
    /// The ranges to compare and resend (1 to [`MAX_REPAIR_RANGES`]).
    pub ranges: Vec<RepairRange>,
}

/// A wire message: the body of one frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Source to target, first: who I am, which pair, which volumes, which versions.
    Hello(Hello),
    /// Target to source: accepted, at this version.
    Welcome(Welcome),
    /// Target to source: not accepted; the connection closes.
    Refuse(Refuse),
    /// Target to source, after `Welcome`: everything up to `last_acked` is durable here;
    /// ship from the next sequence number.
    Resume {
        /// The highest sequence number durable on the target (0: nothing yet).
        last_acked: Seq,
        /// What the replica is: blank, consistent, or inside resync windows.
        replica: ReplicaState,
    },
    /// Source to target: consecutive capture events.
    Batch(Batch),
    /// Target to source: every event up to `upto` is durable in the retention log.
    Ack {
        /// The highest durable sequence number.
        upto: Seq,
    },
    /// Either way: a fatal protocol or storage error; the connection closes after it.
    Error {
        /// What kind of error.
        code: ErrorCode,
        /// A sentence for the operator: up to 1024 bytes of UTF-8.
        message: String,
    },
    /// Either way: are you there? Answered by a `Pong` with the same nonce.
    Ping {
        /// Echoed back.
        nonce: u64,
    },
    /// The answer to a `Ping`.
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
    /// Either way (fast resync, verify): send me these tree hashes.
    HashRequest(HashRequest),
    /// The answer to a `HashRequest`.
    HashReply(HashReply),
    /// Source to target, after the target's lineage: the source's lineage and choices.
    SourceLineage(LineageInfo),
    /// Target to source, right after `Welcome`: the target's lineage.
    TargetLineage(LineageInfo),
    /// Target to source: resend these ranges, the journal lost them.
    RepairRequest(RepairRequest),
    /// Target to source, right after `Resume`: its dedupe window holds every write from
    /// seq `from` up to the resume point (`from` above the resume point: none), so the
    /// source may keep referencing those across the reconnection (section 5.11).
    DedupeHeld {
        /// The oldest write the target's window holds.
        from: Seq,
    },
}

/// The type code of each message, as in the frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    /// [`Message::Hello`].
    Hello = 1,
    /// [`Message::Welcome`].
    Welcome = 2,
    /// [`Message::Refuse`].
    Refuse = 3,
    /// [`Message::Resume`].
    Resume = 4,
    /// [`Message::Batch`].
    Batch = 5,
    /// [`Message::Ack`].
    Ack = 6,
    /// [`Message::Error`].
    Error = 7,
    /// [`Message::Ping`].
    Ping = 8,
    /// [`Message::Pong`].
    Pong = 9,
    /// [`Message::HashRequest`].
    HashRequest = 10,
    /// [`Message::HashReply`].
    HashReply = 11,
    /// [`Message::SourceLineage`].
    SourceLineage = 12,
    /// [`Message::TargetLineage`].
    TargetLineage = 13,
    /// [`Message::RepairRequest`].
    RepairRequest = 14,
    /// [`Message::DedupeHeld`].
    DedupeHeld = 15,
}

impl MessageType {
    /// Every type, in code order.
    pub const ALL: [MessageType; 15] = [
        Self::Hello,
        Self::Welcome,
        Self::Refuse,
        Self::Resume,
        Self::Batch,
        Self::Ack,
        Self::Error,
        Self::Ping,
        Self::Pong,
        Self::HashRequest,
        Self::HashReply,
        Self::SourceLineage,
        Self::TargetLineage,
        Self::RepairRequest,
        Self::DedupeHeld,
    ];

    /// The type with this code.
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.iter().copied().find(|t| *t as u8 == code)
    }

    /// The message name as in the spec.
    pub fn name(self) -> &'static str {
        match self {
            Self::Hello => "Hello",
            Self::Welcome => "Welcome",
            Self::Refuse => "Refuse",
            Self::Resume => "Resume",
            Self::Batch => "Batch",
            Self::Ack => "Ack",
            Self::Error => "Error",
            Self::Ping => "Ping",
            Self::Pong => "Pong",
            Self::HashRequest => "HashRequest",
            Self::HashReply => "HashReply",
            Self::SourceLineage => "SourceLineage",
            Self::TargetLineage => "TargetLineage",
            Self::RepairRequest => "RepairRequest",
            Self::DedupeHeld => "DedupeHeld",
        }
    }

    /// True for the types whose body layout is frozen across protocol versions.
    pub fn is_frozen(self) -> bool {
        matches!(self, Self::Hello | Self::Refuse | Self::Error)
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Message {
    /// The message's type code.
    pub fn message_type(&self) -> MessageType {
        match self {
            Self::Hello(_) => MessageType::Hello,
            Self::Welcome(_) => MessageType::Welcome,
            Self::Refuse(_) => MessageType::Refuse,
            Self::Resume { .. } => MessageType::Resume,
            Self::Batch(_) => MessageType::Batch,
            Self::Ack { .. } => MessageType::Ack,
            Self::Error { .. } => MessageType::Error,
            Self::Ping { .. } => MessageType::Ping,
            Self::Pong { .. } => MessageType::Pong,
            Self::HashRequest(_) => MessageType::HashRequest,
            Self::HashReply(_) => MessageType::HashReply,
            Self::SourceLineage(_) => MessageType::SourceLineage,
            Self::TargetLineage(_) => MessageType::TargetLineage,
            Self::RepairRequest(_) => MessageType::RepairRequest,
            Self::DedupeHeld { .. } => MessageType::DedupeHeld,
        }
    }
}
