//! The Merkle tree that the fast resync and `verify` compare through `HashRequest` and
//! `HashReply`: its shape (leaf size, fan-out, levels) and its hash functions.
//!
//! The tree of a volume of `size` bytes with shape (`L` = leaf size, `F` = fan-out):
//! - level 0 holds `max(1, ceil(size / L))` leaves; leaf `i` covers bytes
//!   `i*L .. min((i+1)*L, size)` and its hash is `BLAKE3-keyed(K_leaf, those bytes)`;
//! - level `k + 1` holds `ceil(n_k / F)` nodes; node `j` has the children
//!   `j*F .. min((j+1)*F, n_k)` of level `k` and its hash is
//!   `BLAKE3-keyed(K_node, child hashes in order)`;
//! - the root level is the first level with one node.
//!
//! `K_leaf` and `K_node` are `BLAKE3-derive-key` of the contexts [`LEAF_CONTEXT`] and
//! [`NODE_CONTEXT`] over empty key material: two different keys keep a leaf from ever
//! hashing like an interior node. (A one-byte prefix would do the same but shifts the
//! leaf's bytes off BLAKE3's 1 KiB chunk boundaries, which halves the hashing speed: the
//! chunks of a leaf are no longer hashed side by side in SIMD lanes.) Both sides
//! compute the same tree from the same shape and volume size (both sent in the protocol), so
//! a node is named by `(level, index)` alone.
//!
//! Invariant: the shape arithmetic never overflows for any shape [`TreeShape::new`] accepts
//! and any `u64` volume size.

use std::ops::Range;
use std::sync::OnceLock;

use super::{HASH_LEN, WireError};

/// Smallest leaf, as a power of two (4 KiB).
pub const MIN_LEAF_LOG2: u8 = 12;
/// Largest leaf, as a power of two (16 MiB).
pub const MAX_LEAF_LOG2: u8 = 24;
/// Largest fan-out, as a power of two (256).
pub const MAX_FANOUT_LOG2: u8 = 8;

/// A tree node's hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeHash(pub [u8; HASH_LEN]);

impl NodeHash {
    /// The answer for a node the replier's tree does not have (its volume is smaller).
    pub const ABSENT: NodeHash = NodeHash([0; HASH_LEN]);
}

impl std::fmt::Debug for NodeHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("..")
    }
}

/// The leaf size and fan-out of a tree, both powers of two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TreeShape {
    leaf_log2: u8,
    fanout_log2: u8,
}

impl Default for TreeShape {
    /// 4 KiB leaves (the block a resync sends), fan-out 16.
    fn default() -> Self {
        Self { leaf_log2: 12, fanout_log2: 4 }
    }
}

impl TreeShape {
    /// A shape with leaves of `2^leaf_log2` bytes (4 KiB to 16 MiB) and `2^fanout_log2`
    /// children per node (2 to 256).
    pub fn new(leaf_log2: u8, fanout_log2: u8) -> Result<Self, WireError> {
        if !(MIN_LEAF_LOG2..=MAX_LEAF_LOG2).contains(&leaf_log2) {
            return Err(WireError::InvalidField {
                object: "tree shape".to_owned(),
                field: "leaf_log2",
                found: leaf_log2.to_string(),
                expected: format!("{MIN_LEAF_LOG2} to {MAX_LEAF_LOG2}"),
            });
        }
        if !(1..=MAX_FANOUT_LOG2).contains(&fanout_log2) {
            return Err(WireError::InvalidField {
                object: "tree shape".to_owned(),
                field: "fanout_log2",
                found: fanout_log2.to_string(),
                expected: format!("1 to {MAX_FANOUT_LOG2}"),
            });
        }
        Ok(Self { leaf_log2, fanout_log2 })
    }

    /// Log2 of the leaf size.
    pub fn leaf_log2(self) -> u8 {
        self.leaf_log2
    }

    /// Log2 of the fan-out.
    pub fn fanout_log2(self) -> u8 {
        self.fanout_log2
    }

    /// Leaf size in bytes.
    pub fn leaf_size(self) -> u64 {
        1 << self.leaf_log2
    }

    /// Children per interior node.
    pub fn fanout(self) -> u64 {
        1 << self.fanout_log2
    }

    /// Nodes on `level` of the tree of a volume of `size` bytes; 0 above the root.
    pub fn nodes_at(self, size: u64, level: u8) -> u64 {
        let mut n = size.div_ceil(self.leaf_size()).max(1);
        for _ in 0..level {
            if n == 1 {
                return 0;
            }
            n = n.div_ceil(self.fanout());
        }
        n
    }

    /// The level of the root.
    pub fn root_level(self, size: u64) -> u8 {
        let mut n = size.div_ceil(self.leaf_size()).max(1);
        let mut level = 0;
        while n > 1 {
            n = n.div_ceil(self.fanout());
            level += 1;
        }
        level
    }

    /// The children (on `level - 1`) of node `index` on `level`; empty for a leaf or a node
    /// that does not exist.
    pub fn children(self, size: u64, level: u8, index: u64) -> Range<u64> {
        if level == 0 || index >= self.nodes_at(size, level) {
            return 0..0;
        }
        let below = self.nodes_at(size, level - 1);
        let start = index << self.fanout_log2;
        start..start.saturating_add(self.fanout()).min(below)
    }

    /// The bytes of the volume leaf `index` covers; empty past the end.
    pub fn leaf_bytes(self, size: u64, index: u64) -> Range<u64> {
        let Some(start) = index.checked_mul(self.leaf_size()).filter(|&s| s < size) else {
            return 0..0;
        };
        start..start.saturating_add(self.leaf_size()).min(size)
    }
}

/// Context string of the key that hashes leaves.
pub const LEAF_CONTEXT: &str = "tidemark 2026-11 merkle leaf v1";
/// Context string of the key that hashes interior nodes.
pub const NODE_CONTEXT: &str = "tidemark 2026-11 merkle node v1";

fn key(context: &'static str, cell: &'static OnceLock<[u8; 32]>) -> &'static [u8; 32] {
    cell.get_or_init(|| blake3::derive_key(context, &[]))
}

/// The hash of a leaf's bytes.
pub fn leaf_hash(data: &[u8]) -> NodeHash {
    static KEY: OnceLock<[u8; 32]> = OnceLock::new();
    NodeHash(*blake3::keyed_hash(key(LEAF_CONTEXT, &KEY), data).as_bytes())
}

/// The hash of an interior node from its children's hashes, in order.
pub fn node_hash(children: &[NodeHash]) -> NodeHash {
    static KEY: OnceLock<[u8; 32]> = OnceLock::new();
    let mut h = blake3::Hasher::new_keyed(key(NODE_CONTEXT, &KEY));
    for c in children {
        h.update(&c.0);
    }
    NodeHash(*h.finalize().as_bytes())
}

/// The level above `level`: one hash per group of `shape.fanout()` consecutive hashes.
pub fn parent_level(shape: TreeShape, level: &[NodeHash]) -> Vec<NodeHash> {
    level.chunks(shape.fanout() as usize).map(node_hash).collect()
}

/// Every level of the tree of `volume`, leaves first, root last. A reference
/// implementation for tests and small volumes: the resync hashes in parallel.
pub fn tree_levels(shape: TreeShape, volume: &[u8]) -> Vec<Vec<NodeHash>> {
    let leaves: Vec<NodeHash> = if volume.is_empty() {
        vec![leaf_hash(&[])]
    } else {
        volume.chunks(shape.leaf_size() as usize).map(leaf_hash).collect()
    };
    let mut levels = vec![leaves];
    while levels.last().is_some_and(|l| l.len() > 1) {
        let next = parent_level(shape, levels.last().expect("a level"));
        levels.push(next);
    }
    levels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_arithmetic_matches_the_reference_tree() {
        let shape = TreeShape::new(12, 2).unwrap();
        for size in [0u64, 1, 4095, 4096, 4097, 5 * 4096, 17 * 4096 + 3, 64 * 4096] {
            let volume = vec![7u8; size as usize];
            let levels = tree_levels(shape, &volume);
            assert_eq!(usize::from(shape.root_level(size)), levels.len() - 1, "size {size}");
            for (k, level) in levels.iter().enumerate() {
                assert_eq!(shape.nodes_at(size, k as u8), level.len() as u64, "size {size}");
                if k > 0 {
                    for (j, node) in level.iter().enumerate() {
                        let kids = shape.children(size, k as u8, j as u64);
                        let hashes = &levels[k - 1][kids.start as usize..kids.end as usize];
                        assert_eq!(*node, node_hash(hashes));
                    }
                }
            }
            assert_eq!(shape.nodes_at(size, levels.len() as u8), 0);
            let leaves = shape.nodes_at(size, 0);
            let covered: u64 =
                (0..leaves).map(|i| shape.leaf_bytes(size, i)).map(|r| r.end - r.start).sum();
            assert_eq!(covered, size);
        }
    }

    #[test]
    fn extreme_sizes_do_not_overflow() {
        for shape in [TreeShape::new(12, 1).unwrap(), TreeShape::new(24, 8).unwrap()] {
            let root = shape.root_level(u64::MAX);
            assert_eq!(shape.nodes_at(u64::MAX, root), 1);
            assert!(shape.children(u64::MAX, root, 0).end > 0);
            assert_eq!(shape.leaf_bytes(u64::MAX, u64::MAX), 0..0);
        }
    }

    #[test]
    fn leaves_and_nodes_hash_apart() {
        let a = leaf_hash(&[1; 64]);
        let b = NodeHash([1; 32]);
        let c = NodeHash([1; 32]);
        assert_ne!(node_hash(&[b, c]), leaf_hash(&[1; 64]));
        assert_ne!(a, node_hash(&[a]));
    }

    #[test]
    fn bad_shapes_are_refused() {
        assert!(TreeShape::new(11, 4).is_err());
        assert!(TreeShape::new(25, 4).is_err());
        assert!(TreeShape::new(12, 0).is_err());
        assert!(TreeShape::new(12, 9).is_err());
    }
}
