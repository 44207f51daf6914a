//! The resync core: hashing volumes into the Merkle tree of [`crate::wire::merkle`],
//! comparing two trees top-down through `HashRequest` / `HashReply`, `verify`, and the
//! extents that say which bytes are worth reading at all (holes, blocks an ext4
//! filesystem has not allocated). `docs/resync.md` describes the algorithm and its costs.
//!
//! - [`source`]: [`BlockSource`], the positional read seam ([`FileSource`], [`MemSource`]);
//! - [`ext4`]: [`Ext4InUse`], the filesystem-aware "logical view" of an ext4 volume, in
//!   which unallocated blocks read as zeros;
//! - [`tree`]: [`MerkleTree::build`] (parallel) and [`hash_nodes`] (chosen nodes only);
//! - [`compare`]: [`HashOracle`], [`compare()`] and [`verify`].
//!
//! Invariants:
//! 1. Every hash is the one `docs/wire-protocol.md` section 7 defines, so two builds of any
//!    version agree on every node.
//! 2. A [`BlockSource`]'s bytes outside its data extents read as zeros; a leaf that touches
//!    no data extent is hashed without being read.
//! 3. A comparison reports every leaf whose hash differs from the remote's (within the limit
//!    ranges, when given) and no other.

pub mod compare;
pub mod ext4;
pub mod source;
pub mod tree;

use std::io;
use std::ops::Range;
use std::path::PathBuf;

use tidemark_journal::VolumeId;

use crate::wire::TreeShape;

pub use compare::{
    CompareOptions, DEFAULT_MAX_HASHES_PER_REQUEST, Diff, DiffStats, HashOracle, LimitMode,
    SourceOracle, TreeOracle, compare, compare_with, verify, verify_source,
};
pub use ext4::Ext4InUse;
pub use source::{BlockSource, FileSource, MemSource, is_zero};
pub use tree::{CHUNK_BYTES, MerkleTree, hash_nodes, shape_for};

/// What can go wrong while hashing, comparing or reading a filesystem's allocation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResyncError {
    /// A file or device could not be opened or measured.
    #[error("cannot open {}", path.display())]
    Open {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A read failed.
    #[error("cannot read {len} bytes at offset {offset} of {object}")]
    Read {
        /// The source read (a device path).
        object: String,
        /// Offset of the read.
        offset: u64,
        /// Length of the read.
        len: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The data extents of a range could not be listed.
    #[error("cannot list the data extents of {object} in bytes {}..{}", range.start, range.end)]
    Extents {
        /// The source.
        object: String,
        /// The range asked about.
        range: Range<u64>,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A count too large for this machine's memory or address width.
    #[error("{what} of {value} is too large")]
    TooLarge {
        /// What was counted.
        what: &'static str,
        /// The count.
        value: u64,
    },
    /// The volume uses an ext4 feature the reader does not handle; fall back to reading the
    /// plain source.
    #[error("{object}: ext4 feature {feature} is not supported")]
    Ext4Unsupported {
        /// The source.
        object: String,
        /// The feature's name (as `mke2fs -O` spells it) or description.
        feature: String,
    },
    /// An ext4 field holds a value that cannot be right.
    #[error("{object}: invalid ext4 {field}: found {found}, expected {expected}")]
    Ext4Invalid {
        /// The source.
        object: String,
        /// The field (`superblock magic`, `group 7 block bitmap`).
        field: String,
        /// The value found.
        found: String,
        /// What would have been valid.
        expected: String,
    },
    /// A hash reply carried the wrong number of hashes.
    #[error(
        "hash reply {id} for volume {volume} level {level} has {found} hashes, expected {expected}"
    )]
    ReplyLength {
        /// The request id.
        id: u32,
        /// The volume.
        volume: VolumeId,
        /// The level.
        level: u8,
        /// Hashes in the reply.
        found: u64,
        /// Nodes in the request.
        expected: u64,
    },
    /// A hash request for a tree of another shape than the one held.
    #[error(
        "hash request {id} for volume {volume} uses shape {found:?}, the tree has {expected:?}"
    )]
    ShapeMismatch {
        /// The request id.
        id: u32,
        /// The volume.
        volume: VolumeId,
        /// The request's shape.
        found: TreeShape,
        /// The tree's shape.
        expected: TreeShape,
    },
    /// A hash request for another volume than the tree's.
    #[error("hash request {id} is for volume {found}, this tree is volume {expected}")]
    WrongVolume {
        /// The request id.
        id: u32,
        /// The request's volume.
        found: VolumeId,
        /// The tree's volume.
        expected: VolumeId,
    },
    /// The remote side of a comparison failed to answer (transport, peer error).
    #[error("hash request {id} for volume {volume} level {level} got no answer")]
    Oracle {
        /// The request id.
        id: u32,
        /// The volume.
        volume: VolumeId,
        /// The level.
        level: u8,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}
