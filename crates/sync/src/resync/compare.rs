//! The top-down comparison of a local [`MerkleTree`] with a remote volume's tree, reached
//! through a [`HashOracle`] (in production: `HashRequest` / `HashReply` over the
//! connection), and `verify`, the same comparison against a second local tree or source.
//!
//! The walk asks for the root level, then, level by level, for the children of the nodes
//! whose hashes differ, down to the leaves; the differing leaves are the answer. With
//! `limit` ranges (the dirty regions after a spool overflow) only nodes overlapping them are
//! asked, and by default the walk starts at the leaves of those ranges, so that a remote
//! without a full tree reads only the dirty regions.
//!
//! Invariants: every request holds at most `max_hashes_per_request` nodes, in ascending,
//! non-overlapping ranges, all of them nodes of the local tree; a reply of the wrong length
//! fails the comparison ([`ResyncError::ReplyLength`]) instead of being trusted; the ranges
//! of a [`Diff`] are whole leaves, clamped to the local volume, sorted and coalesced.

use std::ops::Range;

use tidemark_journal::VolumeId;

use super::tree::{MerkleTree, hash_nodes, span};
use super::{BlockSource, ResyncError};
use crate::wire::codec::{HASH_REPLY_FIXED_LEN, HASH_REQUEST_FIXED_LEN, NODE_RANGE_LEN};
use crate::wire::{FRAME_HEADER_LEN, HASH_LEN, HashRequest, NodeHash, NodeRange};

/// Default cap on the nodes of one request (and so the hashes of one reply: 2 MiB).
pub const DEFAULT_MAX_HASHES_PER_REQUEST: u32 = 1 << 16;

/// The other side of a comparison: answers a [`HashRequest`] with one hash per node asked,
/// in request order, [`NodeHash::ABSENT`] for nodes past the end of its volume.
pub trait HashOracle {
    /// The hashes `request` asks for.
    fn hashes(&mut self, request: &HashRequest) -> Result<Vec<NodeHash>, ResyncError>;
}

/// How a comparison limited to some ranges walks the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LimitMode {
    /// Ask for the leaves of the limit ranges directly: the remote reads only those ranges,
    /// at a cost of one hash per leaf in them. The default.
    #[default]
    Leaves,
    /// Walk top-down from the root, asking only nodes that overlap the limit ranges: fewer
    /// hashes when few leaves differ, but a remote without a full tree must hash whole
    /// subtrees to answer.
    TopDown,
}

/// Knobs of [`compare_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompareOptions {
    /// Most nodes in one request (at least 1).
    pub max_hashes_per_request: u32,
    /// Id of the first request; the next ones count up (wrapping).
    pub first_request_id: u32,
    /// How to walk when limit ranges are given.
    pub limit_mode: LimitMode,
}

impl Default for CompareOptions {
    fn default() -> Self {
        Self {
            max_hashes_per_request: DEFAULT_MAX_HASHES_PER_REQUEST,
            first_request_id: 0,
            limit_mode: LimitMode::default(),
        }
    }
}

/// What a comparison cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiffStats {
    /// Requests sent.
    pub hash_requests: u64,
    /// Hashes received (one per node asked).
    pub hashes_exchanged: u64,
    /// Plaintext frame bytes of the requests and replies (headers included, the secure
    /// channel's record overhead not).
    pub hash_bytes_on_wire: u64,
    /// Leaf hashes compared.
    pub leaves_compared: u64,
    /// Leaves found different (including leaves under nodes the remote does not have).
    pub differing_leaves: u64,
}

/// The result of a comparison: the byte ranges whose leaves differ, and the cost.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Diff {
    /// Differing ranges of the local volume: whole leaves (the last one may be short),
    /// ascending, coalesced.
    pub ranges: Vec<Range<u64>>,
    /// What the comparison cost.
    pub stats: DiffStats,
}

impl Diff {
    /// True when the compared ranges are equal.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Total bytes in [`Diff::ranges`].
    pub fn differing_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }
}

/// Compares `local` with the remote tree of `volume` behind `remote`, with the default
/// [`CompareOptions`]. `limit`: compare only the leaves overlapping these byte ranges.
pub fn compare(
    local: &MerkleTree,
    remote: &mut dyn HashOracle,
    volume: VolumeId,
    limit: Option<&[Range<u64>]>,
) -> Result<Diff, ResyncError> {
    compare_with(local, remote, volume, limit, &CompareOptions::default())
}

/// As [`compare`], with explicit options.
pub fn compare_with(
    local: &MerkleTree,
    remote: &mut dyn HashOracle,
    volume: VolumeId,
    limit: Option<&[Range<u64>]>,
    options: &CompareOptions,
) -> Result<Diff, ResyncError> {
    let shape = local.shape();
    let size = local.volume_len();
    let max = options.max_hashes_per_request.max(1);
    let limit_leaves = limit.map(|ranges| leaves_of(local, ranges));
    let (mut level, mut want) = match (&limit_leaves, options.limit_mode) {
        (Some(leaves), LimitMode::Leaves) => (0u8, leaves.clone()),
        _ => {
            let root = local.root_level();
            (root, restrict(local, root, std::iter::once(0..1).collect(), limit_leaves.as_deref()))
        }
    };
    let mut stats = DiffStats::default();
    let mut differing_leaves: Vec<Range<u64>> = Vec::new();
    let mut id = options.first_request_id;
    while !want.is_empty() {
        let mut differing: Vec<Range<u64>> = Vec::new();
        for ranges in requests(&want, max) {
            let request = HashRequest { id, volume, shape, level, ranges };
            id = id.wrapping_add(1);
            let hashes = remote.hashes(&request)?;
            let expected = request.node_count();
            if hashes.len() as u64 != expected {
                return Err(ResyncError::ReplyLength {
                    id: request.id,
                    volume,
                    level,
                    found: hashes.len() as u64,
                    expected,
                });
            }
            stats.hash_requests += 1;
            stats.hashes_exchanged += expected;
            stats.hash_bytes_on_wire += (2 * FRAME_HEADER_LEN
                + HASH_REQUEST_FIXED_LEN
                + HASH_REPLY_FIXED_LEN
                + NODE_RANGE_LEN * request.ranges.len())
                as u64
                + HASH_LEN as u64 * expected;
            if level == 0 {
                stats.leaves_compared += expected;
            }
            let nodes = request.ranges.iter().flat_map(|r| r.first..r.first + u64::from(r.count));
            for (index, theirs) in nodes.zip(hashes) {
                if local.node(level, index) == theirs {
                    continue;
                }
                if level == 0 {
                    // Not push_range: leaves found under absent nodes above may lie after.
                    match differing_leaves.last_mut() {
                        Some(last) if last.end == index => last.end += 1,
                        _ => differing_leaves.push(index..index + 1),
                    }
                } else if theirs == NodeHash::ABSENT && index > 0 {
                    // Past the end of the remote's volume: all leaves beneath differ. (Node 0
                    // is absent also when the remote's tree is just shorter: descend.)
                    let leaves = leaf_span(local, level, index..index + 1);
                    match &limit_leaves {
                        None => differing_leaves.push(leaves),
                        Some(l) => differing_leaves.extend(super::source::intersect(l, &leaves)),
                    }
                } else {
                    push_range(&mut differing, index..index + 1);
                }
            }
        }
        if level == 0 || differing.is_empty() {
            break;
        }
        let mut children: Vec<Range<u64>> = Vec::new();
        for r in &differing {
            let first = shape.children(size, level, r.start);
            let last = shape.children(size, level, r.end - 1);
            push_range(&mut children, first.start..last.end);
        }
        level -= 1;
        want = restrict(local, level, children, limit_leaves.as_deref());
    }
    differing_leaves.sort_by_key(|r| r.start);
    let mut ranges: Vec<Range<u64>> = Vec::new();
    for leaves in differing_leaves {
        stats.differing_leaves += leaves.end - leaves.start;
        let bytes =
            shape.leaf_bytes(size, leaves.start).start..shape.leaf_bytes(size, leaves.end - 1).end;
        if !bytes.is_empty() {
            push_range(&mut ranges, bytes);
        }
    }
    Ok(Diff { ranges, stats })
}

/// Appends `r` to ascending `ranges`, merging it with the last one when they touch.
fn push_range(ranges: &mut Vec<Range<u64>>, r: Range<u64>) {
    match ranges.last_mut() {
        Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
        _ => ranges.push(r),
    }
}

/// The leaves (of the local tree) beneath nodes `nodes` of `level`.
fn leaf_span(tree: &MerkleTree, level: u8, nodes: Range<u64>) -> Range<u64> {
    let n0 = tree.shape().nodes_at(tree.volume_len(), 0);
    let s = span(tree.shape(), level);
    nodes.start.saturating_mul(s).min(n0)..nodes.end.saturating_mul(s).min(n0)
}

/// The leaves overlapping byte ranges `ranges`, clamped to the volume, sorted, coalesced.
fn leaves_of(tree: &MerkleTree, ranges: &[Range<u64>]) -> Vec<Range<u64>> {
    let (size, leaf) = (tree.volume_len(), tree.shape().leaf_size());
    let mut sorted: Vec<Range<u64>> = ranges
        .iter()
        .map(|r| r.start.min(size)..r.end.min(size))
        .filter(|r| !r.is_empty())
        .map(|r| r.start / leaf..r.end.div_ceil(leaf))
        .collect();
    sorted.sort_by_key(|r| r.start);
    let mut out = Vec::new();
    for r in sorted {
        push_range(&mut out, r);
    }
    out
}

/// Of the node ranges `nodes` of `level`, the nodes overlapping `limit` (leaf ranges), or
/// all of them without a limit.
fn restrict(
    tree: &MerkleTree,
    level: u8,
    nodes: Vec<Range<u64>>,
    limit: Option<&[Range<u64>]>,
) -> Vec<Range<u64>> {
    let Some(limit) = limit else { return nodes };
    let s = span(tree.shape(), level);
    let mut out = Vec::new();
    for r in &nodes {
        for hit in super::source::intersect(limit, &leaf_span(tree, level, r.clone())) {
            push_range(&mut out, hit.start / s..hit.end.div_ceil(s));
        }
    }
    out
}

/// Splits ascending node ranges into requests of at most `max` nodes each.
fn requests(want: &[Range<u64>], max: u32) -> Vec<Vec<NodeRange>> {
    let mut out = Vec::new();
    let mut current: Vec<NodeRange> = Vec::new();
    let mut room = max;
    for r in want {
        let mut first = r.start;
        while first < r.end {
            let count = (r.end - first).min(u64::from(room)) as u32;
            current.push(NodeRange { first, count });
            first += u64::from(count);
            room -= count;
            if room == 0 {
                out.push(std::mem::take(&mut current));
                room = max;
            }
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// A [`HashOracle`] answering from a tree in memory.
#[derive(Debug, Clone, Copy)]
pub struct TreeOracle<'a> {
    tree: &'a MerkleTree,
}

impl<'a> TreeOracle<'a> {
    /// Answers from `tree`.
    pub fn new(tree: &'a MerkleTree) -> Self {
        Self { tree }
    }
}

impl HashOracle for TreeOracle<'_> {
    fn hashes(&mut self, request: &HashRequest) -> Result<Vec<NodeHash>, ResyncError> {
        if request.shape != self.tree.shape() {
            return Err(ResyncError::ShapeMismatch {
                id: request.id,
                volume: request.volume,
                found: request.shape,
                expected: self.tree.shape(),
            });
        }
        Ok(self.tree.hashes(request.level, &request.ranges))
    }
}

/// A [`HashOracle`] hashing the requested nodes straight from a [`BlockSource`] (reading
/// only the leaves beneath them), for a side without a full tree.
#[derive(Clone, Copy)]
pub struct SourceOracle<'a> {
    source: &'a dyn BlockSource,
    threads: usize,
}

impl std::fmt::Debug for SourceOracle<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceOracle")
            .field("source", &self.source.describe())
            .field("threads", &self.threads)
            .finish()
    }
}

impl<'a> SourceOracle<'a> {
    /// Answers from `source` with `threads` hashing workers (0: one per core).
    pub fn new(source: &'a dyn BlockSource, threads: usize) -> Self {
        Self { source, threads }
    }
}

impl HashOracle for SourceOracle<'_> {
    fn hashes(&mut self, request: &HashRequest) -> Result<Vec<NodeHash>, ResyncError> {
        hash_nodes(self.source, request.shape, request.level, &request.ranges, self.threads)
    }
}

/// The ranges where `b` differs from `a` (clamped to `a`'s volume), nothing sent anywhere.
/// Both trees must have the same shape.
pub fn verify(a: &MerkleTree, b: &MerkleTree) -> Result<Diff, ResyncError> {
    if a.shape() != b.shape() {
        return Err(ResyncError::ShapeMismatch {
            id: 0,
            volume: VolumeId(0),
            found: b.shape(),
            expected: a.shape(),
        });
    }
    compare(a, &mut TreeOracle::new(b), VolumeId(0), None)
}

/// The ranges where source `b` differs from the tree `a`, hashing only the parts of `b` the
/// walk asks about.
pub fn verify_source(
    a: &MerkleTree,
    b: &dyn BlockSource,
    threads: usize,
) -> Result<Diff, ResyncError> {
    compare(a, &mut SourceOracle::new(b, threads), VolumeId(0), None)
}
