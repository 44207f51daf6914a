//! Hashing a volume into the Merkle tree of [`crate::wire::merkle`]: a full tree
//! ([`MerkleTree::build`]) for the side that drives a comparison, and the hashes of chosen
//! nodes only ([`hash_nodes`]) for a side that answers requests without keeping a tree.
//!
//! Both read the volume in chunks of [`CHUNK_BYTES`] handed out to worker threads by an
//! atomic counter, so reading and hashing overlap across threads and use every core. A leaf
//! that lies entirely outside the source's data extents (a hole, a block the filesystem has
//! not allocated) is not read: its hash is the hash of a zero leaf, computed once.
//!
//! Invariants: the hashes are exactly those of [`crate::wire::merkle::tree_levels`] on the
//! same bytes (the tests check it); memory is the tree itself (32 bytes a leaf plus
//! 1/(fan-out - 1) of that for the levels above) plus one chunk buffer per thread.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use tidemark_journal::VolumeId;

use super::{BlockSource, ResyncError};
use crate::wire::merkle::{MAX_LEAF_LOG2, MIN_LEAF_LOG2, leaf_hash, node_hash, parent_level};
use crate::wire::{HashReply, HashRequest, NodeHash, NodeRange, TreeShape};

/// Bytes a worker reads and hashes in one go (rounded up to a whole leaf).
pub const CHUNK_BYTES: u64 = 4 << 20;

/// Log2 of the most leaves [`shape_for`] lets a tree have (16 Mi leaves: a 512 MiB level 0).
pub const MAX_LEAVES_LOG2: u32 = 24;

/// Leaves [`hash_nodes`] hashes before folding them up, bounding its memory to 2 MiB of
/// hashes whatever the level asked.
const FOLD_BATCH_LEAVES: u64 = 1 << 16;

/// The default fan-out of [`shape_for`] (16, as [`TreeShape::default`]).
const DEFAULT_FANOUT_LOG2: u8 = 4;

/// The shape for a volume of `volume_len` bytes: fan-out 16 and the smallest leaf, from
/// 4 KiB up, that keeps the leaf count at or below 2^24, so that a full tree stays under
/// about 512 MiB + 34 MiB whatever the volume (4 KiB leaves up to 64 GiB, 8 KiB up to
/// 128 GiB, ..., 16 MiB leaves up to 256 TiB; beyond that the leaf count grows past 2^24).
pub fn shape_for(volume_len: u64) -> TreeShape {
    let mut leaf_log2 = MIN_LEAF_LOG2;
    while leaf_log2 < MAX_LEAF_LOG2
        && volume_len.div_ceil(1u64 << leaf_log2) > 1u64 << MAX_LEAVES_LOG2
    {
        leaf_log2 += 1;
    }
    TreeShape::new(leaf_log2, DEFAULT_FANOUT_LOG2).expect("leaf and fan-out within the limits")
}

/// Leaves beneath one node of `level`: `fanout^level`, saturated at `u64::MAX`.
pub(crate) fn span(shape: TreeShape, level: u8) -> u64 {
    let bits = u32::from(shape.fanout_log2()) * u32::from(level);
    if bits >= 64 { u64::MAX } else { 1 << bits }
}

/// A full Merkle tree of one volume: every level, leaves first.
#[derive(Clone, PartialEq, Eq)]
pub struct MerkleTree {
    shape: TreeShape,
    volume_len: u64,
    levels: Vec<Vec<NodeHash>>,
}

impl std::fmt::Debug for MerkleTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MerkleTree")
            .field("shape", &self.shape)
            .field("volume_len", &self.volume_len)
            .field("leaves", &self.levels[0].len())
            .field("root", &self.root())
            .finish()
    }
}

impl MerkleTree {
    /// Hashes all of `source` with `threads` workers (0 means one per core).
    pub fn build(
        source: &dyn BlockSource,
        shape: TreeShape,
        threads: usize,
    ) -> Result<Self, ResyncError> {
        Self::build_with_progress(source, shape, threads, &|_| {})
    }

    /// As [`MerkleTree::build`], calling `progress` with the bytes of each chunk once it is
    /// hashed (from the worker threads; the calls add up to the volume length).
    pub fn build_with_progress(
        source: &dyn BlockSource,
        shape: TreeShape,
        threads: usize,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Self, ResyncError> {
        let volume_len = source.len();
        let n0 = shape.nodes_at(volume_len, 0);
        let leaves = hash_leaves(source, shape, 0..n0, threads, progress)?;
        Ok(Self::from_leaves(shape, volume_len, leaves))
    }

    /// A tree whose leaves are hashed only where they overlap `ranges` (byte ranges of the
    /// volume); every other leaf is [`NodeHash::ABSENT`], and so are the nodes above them
    /// worth nothing. Only for a comparison limited to those same ranges with
    /// [`crate::resync::LimitMode::Leaves`] (the default), which looks at those leaves and
    /// nothing else: a resync after a crash or an overflow then reads only the dirty regions
    /// of the device, not all of it.
    pub fn build_limited(
        source: &dyn BlockSource,
        shape: TreeShape,
        ranges: &[Range<u64>],
        threads: usize,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Self, ResyncError> {
        let volume_len = source.len();
        let n0 = shape.nodes_at(volume_len, 0);
        let count = usize::try_from(n0)
            .map_err(|_| ResyncError::TooLarge { what: "leaf count", value: n0 })?;
        let mut leaves = vec![NodeHash::ABSENT; count];
        for r in leaf_ranges(shape, volume_len, ranges) {
            let hashes = hash_leaves(source, shape, r.clone(), threads, progress)?;
            for (i, h) in hashes.into_iter().enumerate() {
                leaves[r.start as usize + i] = h;
            }
        }
        Ok(Self::from_leaves(shape, volume_len, leaves))
    }

    /// The tree over precomputed leaf hashes (`shape.nodes_at(volume_len, 0)` of them).
    pub(crate) fn from_leaves(shape: TreeShape, volume_len: u64, leaves: Vec<NodeHash>) -> Self {
        debug_assert_eq!(leaves.len() as u64, shape.nodes_at(volume_len, 0));
        let mut levels = vec![leaves];
        while levels.last().is_some_and(|l| l.len() > 1) {
            let next = parent_level(shape, levels.last().expect("a level"));
            levels.push(next);
        }
        Self { shape, volume_len, levels }
    }

    /// Hashes again the leaves overlapping `ranges` (byte ranges of the volume) from
    /// `source`, and the nodes above them, so that the tree is again that of `source` when
    /// only those ranges changed since it was built. `source` must have the tree's length.
    pub fn rehash(
        &mut self,
        source: &dyn BlockSource,
        ranges: &[Range<u64>],
        threads: usize,
    ) -> Result<(), ResyncError> {
        let mut merged: Vec<Range<u64>> = Vec::new();
        for r in leaf_ranges(self.shape, self.volume_len, ranges) {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        for r in &merged {
            let hashes = hash_leaves(source, self.shape, r.clone(), threads, &|_| {})?;
            self.levels[0][r.start as usize..r.end as usize].copy_from_slice(&hashes);
        }
        // The parents of the changed nodes, level by level.
        let fanout = 1u64 << self.shape.fanout_log2();
        let mut changed = merged;
        for level in 1..self.levels.len() {
            let mut parents: Vec<Range<u64>> = Vec::new();
            for r in &changed {
                let p = r.start / fanout..(r.end - 1) / fanout + 1;
                match parents.last_mut() {
                    Some(last) if p.start <= last.end => last.end = last.end.max(p.end),
                    _ => parents.push(p),
                }
            }
            let (below, above) = self.levels.split_at_mut(level);
            let (children, nodes) = (&below[level - 1], &mut above[0]);
            for p in &parents {
                for j in p.clone() {
                    let kids = (j * fanout) as usize
                        ..((j + 1) * fanout).min(children.len() as u64) as usize;
                    nodes[j as usize] = node_hash(&children[kids]);
                }
            }
            changed = parents;
        }
        Ok(())
    }

    /// The tree's shape.
    pub fn shape(&self) -> TreeShape {
        self.shape
    }

    /// Length of the volume it was built from.
    pub fn volume_len(&self) -> u64 {
        self.volume_len
    }

    /// The level of the root (0 when the volume has one leaf).
    pub fn root_level(&self) -> u8 {
        (self.levels.len() - 1) as u8
    }

    /// The root hash: equal roots mean equal volumes of equal size.
    pub fn root(&self) -> NodeHash {
        self.levels[self.levels.len() - 1][0]
    }

    /// Every level, leaves first, root last.
    pub fn levels(&self) -> &[Vec<NodeHash>] {
        &self.levels
    }

    /// The hashes of one level, or `None` above the root.
    pub fn level(&self, level: u8) -> Option<&[NodeHash]> {
        self.levels.get(usize::from(level)).map(Vec::as_slice)
    }

    /// One node's hash; [`NodeHash::ABSENT`] for a node the tree does not have.
    pub fn node(&self, level: u8, index: u64) -> NodeHash {
        self.level(level)
            .and_then(|l| usize::try_from(index).ok().and_then(|i| l.get(i)))
            .copied()
            .unwrap_or(NodeHash::ABSENT)
    }

    /// True when leaf `index` holds only zero bytes (its hash is a zero leaf's).
    pub fn leaf_is_zero(&self, index: u64) -> bool {
        let bytes = self.shape.leaf_bytes(self.volume_len, index);
        let hash = self.node(0, index);
        if bytes.end - bytes.start == self.shape.leaf_size() {
            hash == zero_leaf_hash(self.shape)
        } else {
            hash == leaf_hash(&vec![0; (bytes.end - bytes.start) as usize])
        }
    }

    /// Bytes of memory the hashes take.
    pub fn memory_bytes(&self) -> u64 {
        self.levels.iter().map(|l| l.len() as u64 * 32).sum()
    }

    /// The hashes of the nodes `ranges` names on `level`, [`NodeHash::ABSENT`] for those the
    /// tree does not have: the body of a [`HashReply`].
    pub fn hashes(&self, level: u8, ranges: &[NodeRange]) -> Vec<NodeHash> {
        let total: u64 = ranges.iter().map(|r| u64::from(r.count)).sum();
        let mut out = Vec::with_capacity(total.min(1 << 20) as usize);
        for r in ranges {
            for i in 0..u64::from(r.count) {
                out.push(self.node(level, r.first.saturating_add(i)));
            }
        }
        out
    }

    /// Answers `request` from this tree, which must be of `volume` and of the request's
    /// shape.
    pub fn answer(
        &self,
        volume: VolumeId,
        request: &HashRequest,
    ) -> Result<HashReply, ResyncError> {
        if request.volume != volume {
            return Err(ResyncError::WrongVolume {
                id: request.id,
                found: request.volume,
                expected: volume,
            });
        }
        if request.shape != self.shape {
            return Err(ResyncError::ShapeMismatch {
                id: request.id,
                volume,
                found: request.shape,
                expected: self.shape,
            });
        }
        Ok(HashReply {
            id: request.id,
            volume,
            level: request.level,
            hashes: self.hashes(request.level, &request.ranges),
        })
    }
}

/// The leaves overlapping byte ranges `ranges` of a volume of `volume_len` bytes, clamped
/// to the volume, sorted by start (not coalesced).
fn leaf_ranges(shape: TreeShape, volume_len: u64, ranges: &[Range<u64>]) -> Vec<Range<u64>> {
    let (leaf, n0) = (shape.leaf_size(), shape.nodes_at(volume_len, 0));
    let mut leaves: Vec<Range<u64>> = ranges
        .iter()
        .map(|r| r.start.min(volume_len)..r.end.min(volume_len))
        .filter(|r| !r.is_empty())
        .map(|r| r.start / leaf..r.end.div_ceil(leaf).min(n0))
        .collect();
    leaves.sort_by_key(|r| r.start);
    leaves
}

/// The hash of a full zero leaf of `shape` (computed once per leaf size).
pub(crate) fn zero_leaf_hash(shape: TreeShape) -> NodeHash {
    const SIZES: usize = (MAX_LEAF_LOG2 - MIN_LEAF_LOG2 + 1) as usize;
    static CACHE: [OnceLock<NodeHash>; SIZES] = [const { OnceLock::new() }; SIZES];
    *CACHE[usize::from(shape.leaf_log2() - MIN_LEAF_LOG2)]
        .get_or_init(|| leaf_hash(&vec![0; shape.leaf_size() as usize]))
}

/// The hashes of the nodes `ranges` names on `level` of the tree of `source`, computed from
/// the leaves beneath them only, with `threads` workers (0: one per core). A node past the
/// end of the tree is [`NodeHash::ABSENT`]. Memory stays bounded (a few MiB of hashes plus
/// the chunk buffers) whatever the level.
pub fn hash_nodes(
    source: &dyn BlockSource,
    shape: TreeShape,
    level: u8,
    ranges: &[NodeRange],
    threads: usize,
) -> Result<Vec<NodeHash>, ResyncError> {
    hash_nodes_batched(source, shape, level, ranges, threads, FOLD_BATCH_LEAVES)
}

/// [`hash_nodes`] folding up at most `batch` leaves at a time.
fn hash_nodes_batched(
    source: &dyn BlockSource,
    shape: TreeShape,
    level: u8,
    ranges: &[NodeRange],
    threads: usize,
    batch: u64,
) -> Result<Vec<NodeHash>, ResyncError> {
    let size = source.len();
    let on_level = shape.nodes_at(size, level);
    let mut out = Vec::new();
    for r in ranges {
        let end = r.first.saturating_add(u64::from(r.count));
        let present = r.first.min(on_level)..end.min(on_level);
        out.extend(subtree_hashes(source, shape, level, present.clone(), threads, batch)?);
        let absent = (end - r.first) - (present.end - present.start);
        out.extend(std::iter::repeat_n(NodeHash::ABSENT, absent as usize));
    }
    Ok(out)
}

/// Hashes of the existing nodes `nodes` of `level`.
fn subtree_hashes(
    source: &dyn BlockSource,
    shape: TreeShape,
    level: u8,
    nodes: Range<u64>,
    threads: usize,
    batch: u64,
) -> Result<Vec<NodeHash>, ResyncError> {
    let size = source.len();
    let n0 = shape.nodes_at(size, 0);
    let span = span(shape, level);
    let mut out = Vec::with_capacity((nodes.end - nodes.start).min(1 << 20) as usize);
    if span <= batch {
        // Groups of whole nodes, each group's leaves hashed in parallel and folded up.
        let group = (batch / span).max(1);
        let mut first = nodes.start;
        while first < nodes.end {
            let last = first.saturating_add(group).min(nodes.end);
            let leaves = first * span..(last * span).min(n0);
            let mut hashes = hash_leaves(source, shape, leaves, threads, &|_| {})?;
            for _ in 0..level {
                hashes = parent_level(shape, &hashes);
            }
            out.extend(hashes);
            first = last;
        }
    } else {
        // One node at a time from its children, so at most `batch` hashes live per level.
        for j in nodes {
            let kids = shape.children(size, level, j);
            let hashes = subtree_hashes(source, shape, level - 1, kids, threads, batch)?;
            out.push(node_hash(&hashes));
        }
    }
    Ok(out)
}

/// The hashes of leaves `leaves` (inside the tree) of `source`, hashed by up to `threads`
/// workers (0: one per core), each taking the next [`CHUNK_BYTES`] chunk.
pub(crate) fn hash_leaves(
    source: &dyn BlockSource,
    shape: TreeShape,
    leaves: Range<u64>,
    threads: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Vec<NodeHash>, ResyncError> {
    let size = source.len();
    if size == 0 {
        // The one leaf of an empty volume.
        return Ok(if leaves.contains(&0) { vec![leaf_hash(&[])] } else { Vec::new() });
    }
    let count = usize::try_from(leaves.end.saturating_sub(leaves.start)).map_err(|_| {
        ResyncError::TooLarge { what: "leaf range", value: leaves.end - leaves.start }
    })?;
    let mut out = vec![NodeHash::ABSENT; count];
    let per_chunk = (CHUNK_BYTES >> shape.leaf_log2()).max(1) as usize;
    let slots: Vec<Mutex<&mut [NodeHash]>> = out.chunks_mut(per_chunk).map(Mutex::new).collect();
    let threads = if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    }
    .min(slots.len())
    .max(1);
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<ResyncError>> = Mutex::new(None);
    let worker = || {
        let mut buf = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= slots.len() || failed.load(Ordering::Relaxed) {
                return;
            }
            let mut slot = slots[i].lock().expect("slot lock not poisoned");
            let first = leaves.start + (i * per_chunk) as u64;
            // Read ahead: the chunk some worker takes after the ones in hand now, so that
            // a disk reads it while this one is hashed.
            let ahead = first + (threads * per_chunk) as u64;
            if ahead < leaves.end {
                let to = (ahead + per_chunk as u64).min(leaves.end) - 1;
                source
                    .will_need(shape.leaf_bytes(size, ahead).start..shape.leaf_bytes(size, to).end);
            }
            match hash_chunk(source, shape, first, &mut slot, &mut buf) {
                Ok(bytes) => progress(bytes),
                Err(e) => {
                    failed.store(true, Ordering::Relaxed);
                    first_error.lock().expect("error lock not poisoned").get_or_insert(e);
                    return;
                }
            }
        }
    };
    if threads == 1 {
        worker();
    } else {
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(worker);
            }
        });
    }
    drop(slots);
    match first_error.into_inner().expect("error lock not poisoned") {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// Hashes the leaves `first .. first + out.len()` into `out`, reading only the leaves that
/// touch a data extent; returns the bytes covered.
fn hash_chunk(
    source: &dyn BlockSource,
    shape: TreeShape,
    first: u64,
    out: &mut [NodeHash],
    buf: &mut Vec<u8>,
) -> Result<u64, ResyncError> {
    let size = source.len();
    let leaf = shape.leaf_size();
    let start = shape.leaf_bytes(size, first).start;
    let end = shape.leaf_bytes(size, first + out.len() as u64 - 1).end;
    let extents = source.data_extents(start..end).map_err(|e| ResyncError::Extents {
        object: source.describe(),
        range: start..end,
        source: e,
    })?;
    // Runs of consecutive leaves touching data, as leaf indices relative to `first`.
    let mut runs: Vec<Range<usize>> = Vec::new();
    for e in &extents {
        let a = ((e.start.max(start) - start) / leaf) as usize;
        let b = ((e.end.min(end) - start).div_ceil(leaf) as usize).min(out.len());
        match runs.last_mut() {
            Some(last) if a <= last.end => last.end = last.end.max(b),
            _ => runs.push(a..b),
        }
    }
    let mut pos = 0usize;
    for run in runs.iter().chain(std::iter::once(&(out.len()..out.len()))) {
        for (k, hash) in out[pos..run.start].iter_mut().enumerate() {
            let bytes = shape.leaf_bytes(size, first + (pos + k) as u64);
            *hash = if bytes.end - bytes.start == leaf {
                zero_leaf_hash(shape)
            } else {
                leaf_hash(&vec![0; (bytes.end - bytes.start) as usize])
            };
        }
        if run.is_empty() {
            pos = pos.max(run.end);
            continue;
        }
        let from = start + run.start as u64 * leaf;
        let to = shape.leaf_bytes(size, first + run.end as u64 - 1).end;
        let len = (to - from) as usize;
        buf.resize(len, 0);
        source.read_at(from, &mut buf[..len]).map_err(|e| ResyncError::Read {
            object: source.describe(),
            offset: from,
            len: len as u64,
            source: e,
        })?;
        for (k, data) in (run.start..run.end).zip(buf[..len].chunks(leaf as usize)) {
            out[k] = leaf_hash(data);
        }
        pos = run.end;
    }
    Ok(end - start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resync::MemSource;
    use crate::wire::merkle::tree_levels;

    #[test]
    fn rehashing_changed_ranges_gives_the_tree_of_the_new_bytes() {
        let mut data: Vec<u8> =
            (0..(300u32 << 12) + 99).map(|i| (i.wrapping_mul(2246822519u32) >> 24) as u8).collect();
        for shape in [TreeShape::new(12, 1).unwrap(), TreeShape::new(12, 4).unwrap()] {
            let mut tree = MerkleTree::build(&MemSource::new(data.clone()), shape, 2).unwrap();
            let changed = [5000..5001, 40960..49153, (299 << 12) + 1..(300 << 12) + 99];
            for r in &changed {
                for b in &mut data[r.start as usize..r.end as usize] {
                    *b = !*b;
                }
            }
            let source = MemSource::new(data.clone());
            assert_ne!(tree, MerkleTree::build(&source, shape, 2).unwrap());
            tree.rehash(&source, &changed, 2).unwrap();
            assert_eq!(tree.levels(), &tree_levels(shape, &data)[..]);
        }
    }

    #[test]
    fn small_fold_batches_give_the_same_hashes() {
        let data: Vec<u8> =
            (0..(700u32 << 12) + 77).map(|i| (i.wrapping_mul(2654435761u32) >> 24) as u8).collect();
        let source = MemSource::new(data.clone());
        for shape in [TreeShape::new(12, 1).unwrap(), TreeShape::new(12, 3).unwrap()] {
            let levels = tree_levels(shape, &data);
            for (level, want) in levels.iter().enumerate() {
                let ranges = [NodeRange { first: 0, count: want.len() as u32 + 2 }];
                for batch in [1, 2, 5, 64] {
                    let got =
                        hash_nodes_batched(&source, shape, level as u8, &ranges, 2, batch).unwrap();
                    assert_eq!(&got[..want.len()], &want[..], "level {level} batch {batch}");
                    assert_eq!(got[want.len()..], [NodeHash::ABSENT; 2]);
                }
            }
        }
    }
}
