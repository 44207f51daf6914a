//! The resync core against brute force: parallel tree building against the reference tree,
//! `hash_nodes` against the full tree, the top-down comparison against a leaf-by-leaf
//! comparison (sizes that are not multiples of the leaf, different fan-outs, volumes of
//! different sizes, limit ranges, chunked requests), and `FileSource` over a sparse file.

use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use proptest::prelude::*;
use tidemark_journal::VolumeId;
use tidemark_sync::resync::{
    BlockSource, CompareOptions, FileSource, HashOracle, LimitMode, MemSource, MerkleTree,
    ResyncError, SourceOracle, TreeOracle, compare, compare_with, hash_nodes, shape_for, verify,
    verify_source,
};
use tidemark_sync::wire::merkle::{leaf_hash, tree_levels};
use tidemark_sync::wire::{HashRequest, NodeHash, NodeRange, TreeShape};

const VOL: VolumeId = VolumeId(3);

/// Deterministic pseudo-random bytes (xorshift), cheaper than generating them in proptest.
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The byte ranges of the leaves that differ, by brute force: leaf `i` of `local` against
/// leaf `i` of `remote` (missing past its end), clamped to `local`, coalesced; and how many
/// leaves differ.
fn brute_force(shape: TreeShape, local: &[u8], remote: &[u8]) -> (Vec<Range<u64>>, u64) {
    let (ls, rs) = (local.len() as u64, remote.len() as u64);
    let mut out: Vec<Range<u64>> = Vec::new();
    let mut count = 0;
    for i in 0..shape.nodes_at(ls, 0) {
        let a = shape.leaf_bytes(ls, i);
        let b = shape.leaf_bytes(rs, i);
        let same = i < shape.nodes_at(rs, 0)
            && local[a.start as usize..a.end as usize] == remote[b.start as usize..b.end as usize];
        if !same {
            count += 1;
            if a.is_empty() {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.end == a.start => last.end = a.end,
                _ => out.push(a),
            }
        }
    }
    (out, count)
}

/// Keeps only the ranges (whole leaves) overlapping `limit`.
fn within(shape: TreeShape, ranges: &[Range<u64>], limit: &[Range<u64>]) -> Vec<Range<u64>> {
    let leaf = shape.leaf_size();
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in ranges {
        let mut s = r.start;
        while s < r.end {
            let e = (s / leaf + 1) * leaf;
            let e = e.min(r.end);
            if limit.iter().any(|l| l.start < e && s < l.end) {
                match out.last_mut() {
                    Some(last) if last.end == s => last.end = e,
                    _ => out.push(s..e),
                }
            }
            s = e;
        }
    }
    out
}

/// An oracle that checks every request it sees against the protocol's rules.
struct Checked<'a> {
    inner: TreeOracle<'a>,
    local: &'a MerkleTree,
    max: u32,
    requests: u64,
}

impl HashOracle for Checked<'_> {
    fn hashes(&mut self, req: &HashRequest) -> Result<Vec<NodeHash>, ResyncError> {
        assert!(req.node_count() >= 1 && req.node_count() <= u64::from(self.max), "{req:?}");
        assert_eq!(req.volume, VOL);
        let on_level = self.local.shape().nodes_at(self.local.volume_len(), req.level);
        let mut next = 0;
        for r in &req.ranges {
            assert!(r.count >= 1 && r.first >= next, "ranges ascending: {req:?}");
            next = r.first + u64::from(r.count);
            assert!(next <= on_level, "only nodes of the local tree are asked: {req:?}");
        }
        self.requests += 1;
        self.inner.hashes(req)
    }
}

fn shape_strategy() -> impl Strategy<Value = TreeShape> {
    (12u8..=13, 1u8..=5).prop_map(|(l, f)| TreeShape::new(l, f).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn build_equals_the_reference_tree(
        shape in shape_strategy(),
        len in 0usize..300_000,
        seed: u64,
        threads in 1usize..4,
        holes in proptest::collection::vec((0u64..300_000, 0u64..40_000), 0..4),
    ) {
        let data = bytes(seed, len);
        let plain = MemSource::new(data.clone());
        let tree = MerkleTree::build(&plain, shape, threads).unwrap();
        prop_assert_eq!(tree.levels(), &tree_levels(shape, &data)[..]);
        prop_assert_eq!(tree.root_level() as usize + 1, tree.levels().len());

        // Declared extents: the holes are zeroed and hashed without being read.
        let mut extents = Vec::new();
        let mut pos = 0u64;
        let mut holes = holes;
        holes.sort();
        for (at, n) in holes {
            if at > pos {
                extents.push(pos..at);
            }
            pos = pos.max(at + n);
        }
        extents.push(pos..u64::MAX);
        let sparse = MemSource::with_extents(data, extents);
        let tree = MerkleTree::build(&sparse, shape, threads).unwrap();
        prop_assert_eq!(tree.levels(), &tree_levels(shape, sparse.bytes())[..]);
    }

    #[test]
    fn hash_nodes_equals_the_full_tree(
        shape in shape_strategy(),
        len in 0usize..200_000,
        seed: u64,
        level in 0u8..6,
        ranges in proptest::collection::vec((0u64..40, 1u32..8), 1..4),
    ) {
        let data = bytes(seed, len);
        let source = MemSource::new(data);
        let tree = MerkleTree::build(&source, shape, 2).unwrap();
        let mut first = 0;
        let ranges: Vec<NodeRange> = ranges
            .into_iter()
            .map(|(gap, count)| {
                let r = NodeRange { first: first + gap, count };
                first = r.first + u64::from(count);
                r
            })
            .collect();
        let got = hash_nodes(&source, shape, level, &ranges, 2).unwrap();
        let want = tree.hashes(level, &ranges);
        prop_assert_eq!(got.len() as u64, ranges.iter().map(|r| u64::from(r.count)).sum::<u64>());
        prop_assert_eq!(&got, &want);
        let on_level = shape.nodes_at(len as u64, level);
        let mut i = 0;
        for r in &ranges {
            for n in r.first..r.first + u64::from(r.count) {
                prop_assert_eq!(got[i] == NodeHash::ABSENT, n >= on_level);
                i += 1;
            }
        }
    }

    #[test]
    fn compare_finds_exactly_the_differing_leaves(
        shape in shape_strategy(),
        len in 0usize..400_000,
        remote_len_delta in prop_oneof![3 => Just(0i64), 1 => -100_000i64..100_000],
        seed: u64,
        changes in proptest::collection::vec((0usize..500_000, 1u8..=255), 0..12),
        max in prop_oneof![Just(u32::MAX), 1u32..40],
    ) {
        let local = bytes(seed, len);
        let remote_len = (len as i64 + remote_len_delta).max(0) as usize;
        let mut remote = bytes(seed, remote_len);
        for &(at, x) in &changes {
            if remote_len > 0 {
                remote[at % remote_len] ^= x;
            }
        }
        let a = MerkleTree::build(&MemSource::new(local.clone()), shape, 2).unwrap();
        let b = MerkleTree::build(&MemSource::new(remote.clone()), shape, 2).unwrap();
        let (want, k) = brute_force(shape, &local, &remote);

        let options = CompareOptions { max_hashes_per_request: max, ..CompareOptions::default() };
        let mut oracle = Checked { inner: TreeOracle::new(&b), local: &a, max, requests: 0 };
        let diff = compare_with(&a, &mut oracle, VOL, None, &options).unwrap();
        prop_assert_eq!(&diff.ranges, &want);
        prop_assert_eq!(diff.stats.differing_leaves, k);
        prop_assert_eq!(diff.stats.hash_requests, oracle.requests);
        prop_assert_eq!(diff.is_empty(), a.root() == b.root());

        // The cost: at most fan-out hashes per differing leaf per level, plus the root's.
        let levels = u64::from(a.root_level()) + 1;
        let f = shape.fanout();
        let bound = if remote_len == len { k * f * levels + f } else { (k + 1) * f * levels + 1 };
        prop_assert!(diff.stats.hashes_exchanged <= bound,
            "{} hashes for {k} differing leaves, bound {bound}", diff.stats.hashes_exchanged);
        prop_assert!(diff.stats.hash_bytes_on_wire >= 32 * diff.stats.hashes_exchanged);

        // Hashing the remote volume on demand gives the same answer.
        let remote_source = MemSource::new(remote);
        let on_demand = verify_source(&a, &remote_source, 2).unwrap();
        prop_assert_eq!(&on_demand.ranges, &want);
        prop_assert_eq!(verify(&a, &b).unwrap().ranges, want);
    }

    #[test]
    fn limit_ranges_restrict_the_comparison(
        shape in shape_strategy(),
        len in 1usize..400_000,
        seed: u64,
        changes in proptest::collection::vec((0usize..400_000, 1u8..=255), 0..12),
        limit in proptest::collection::vec((0u64..450_000, 1u64..60_000), 0..5),
        max in prop_oneof![Just(u32::MAX), 1u32..40],
    ) {
        let local = bytes(seed, len);
        let mut remote = local.clone();
        for &(at, x) in &changes {
            remote[at % len] ^= x;
        }
        let limit: Vec<Range<u64>> = limit.into_iter().map(|(a, n)| a..a + n).collect();
        let a = MerkleTree::build(&MemSource::new(local.clone()), shape, 2).unwrap();
        let b = MerkleTree::build(&MemSource::new(remote.clone()), shape, 2).unwrap();
        let (all, _) = brute_force(shape, &local, &remote);
        let want = within(shape, &all, &limit);
        for mode in [LimitMode::Leaves, LimitMode::TopDown] {
            let options = CompareOptions { max_hashes_per_request: max, limit_mode: mode, ..CompareOptions::default() };
            let mut oracle = Checked { inner: TreeOracle::new(&b), local: &a, max, requests: 0 };
            let diff = compare_with(&a, &mut oracle, VOL, Some(&limit), &options).unwrap();
            prop_assert_eq!(&diff.ranges, &want, "mode {:?}", mode);
            if mode == LimitMode::Leaves {
                // Only leaves asked, one per leaf overlapping the limit.
                let leaf = shape.leaf_size();
                let mut leaves = std::collections::BTreeSet::new();
                for r in &limit {
                    let end = r.end.min(len as u64);
                    let mut s = r.start;
                    while s < end {
                        leaves.insert(s / leaf);
                        s = (s / leaf + 1) * leaf;
                    }
                }
                prop_assert_eq!(diff.stats.leaves_compared, leaves.len() as u64);
                prop_assert_eq!(diff.stats.hashes_exchanged, leaves.len() as u64);
            }
        }
    }
}

#[test]
fn equal_volumes_cost_one_hash() {
    let shape = TreeShape::default();
    let data = bytes(7, 5 << 20);
    let a = MerkleTree::build(&MemSource::new(data.clone()), shape, 2).unwrap();
    let b = MerkleTree::build(&MemSource::new(data), shape, 1).unwrap();
    let diff = compare(&a, &mut TreeOracle::new(&b), VOL, None).unwrap();
    assert!(diff.is_empty());
    assert_eq!(diff.stats.hashes_exchanged, 1);
    assert_eq!(diff.stats.hash_requests, 1);
    assert_eq!(diff.stats.leaves_compared, 0);
}

#[test]
fn one_changed_block_costs_fanout_hashes_per_level() {
    let shape = TreeShape::default();
    let data = bytes(11, 16 << 20);
    let mut other = data.clone();
    other[(9 << 20) + 5] ^= 1;
    let a = MerkleTree::build(&MemSource::new(data), shape, 2).unwrap();
    let b = MerkleTree::build(&MemSource::new(other), shape, 2).unwrap();
    let diff = verify(&a, &b).unwrap();
    assert_eq!(diff.ranges, one((9 << 20)..(9 << 20) + 4096));
    // 4096 leaves, fan-out 16: levels 0..=3; the root, then 16 per level below it.
    assert_eq!(diff.stats.hashes_exchanged, 1 + 16 * 3);
    assert_eq!(diff.stats.hash_requests, 4);
    assert_eq!(diff.stats.leaves_compared, 16);
}

#[test]
fn a_short_reply_is_an_error_naming_the_request() {
    struct Short;
    impl HashOracle for Short {
        fn hashes(&mut self, _: &HashRequest) -> Result<Vec<NodeHash>, ResyncError> {
            Ok(Vec::new())
        }
    }
    let a = MerkleTree::build(&MemSource::new(bytes(1, 100_000)), TreeShape::default(), 1).unwrap();
    let err = compare(&a, &mut Short, VOL, None).unwrap_err();
    assert!(matches!(err, ResyncError::ReplyLength { found: 0, expected: 1, .. }), "{err:?}");
    assert_eq!(err.to_string(), "hash reply 0 for volume 3 level 2 has 0 hashes, expected 1");
}

#[test]
fn answer_checks_volume_and_shape() {
    let a = MerkleTree::build(&MemSource::new(bytes(1, 100_000)), TreeShape::default(), 1).unwrap();
    let mut req = HashRequest {
        id: 9,
        volume: VOL,
        shape: TreeShape::default(),
        level: 0,
        ranges: vec![NodeRange { first: 20, count: 10 }],
    };
    let reply = a.answer(VOL, &req).unwrap();
    assert_eq!(reply.hashes.len(), 10);
    assert_eq!(reply.hashes[4], a.node(0, 24));
    assert_eq!(reply.hashes[5], NodeHash::ABSENT, "leaf 25 is past the end of 100000 bytes");
    assert!(matches!(a.answer(VolumeId(4), &req), Err(ResyncError::WrongVolume { .. })));
    req.shape = TreeShape::new(13, 4).unwrap();
    assert!(matches!(a.answer(VOL, &req), Err(ResyncError::ShapeMismatch { .. })));
}

#[test]
fn source_oracle_answers_any_level() {
    let shape = TreeShape::new(12, 1).unwrap();
    let source = MemSource::new(bytes(5, 3 << 20));
    let tree = MerkleTree::build(&source, shape, 2).unwrap();
    let mut oracle = SourceOracle::new(&source, 2);
    for level in 0..=tree.root_level() + 1 {
        let req = HashRequest {
            id: 0,
            volume: VOL,
            shape,
            level,
            ranges: vec![NodeRange { first: 0, count: 3 }],
        };
        assert_eq!(oracle.hashes(&req).unwrap(), tree.hashes(level, &req.ranges), "level {level}");
    }
}

#[test]
fn zero_leaves_are_recognised() {
    let mut data = bytes(3, 10 * 4096 + 100);
    data[4096..8192].fill(0);
    data[10 * 4096..].fill(0);
    let tree = MerkleTree::build(&MemSource::new(data), TreeShape::default(), 1).unwrap();
    let zero: Vec<u64> = (0..11).filter(|&i| tree.leaf_is_zero(i)).collect();
    assert_eq!(zero, vec![1, 10]);
    assert_eq!(tree.node(0, 10), leaf_hash(&[0; 100]));
}

#[test]
fn shape_for_keeps_the_leaf_count_bounded() {
    assert_eq!(shape_for(0).leaf_size(), 4096);
    assert_eq!(shape_for(64 << 30).leaf_size(), 4096);
    assert_eq!(shape_for((64 << 30) + 1).leaf_size(), 8192);
    assert_eq!(shape_for(1 << 40).leaf_size(), 64 << 10);
    assert_eq!(shape_for(u64::MAX).leaf_size(), 16 << 20);
    for len in [1u64 << 30, 3 << 40, 255 << 40] {
        assert!(len.div_ceil(shape_for(len).leaf_size()) <= 1 << 24, "{len}");
    }
    assert_eq!(shape_for(1 << 30).fanout(), 16);
}

#[test]
fn progress_adds_up_to_the_volume() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let source = MemSource::new(bytes(9, (9 << 20) + 123));
    let done = AtomicU64::new(0);
    let calls = AtomicU64::new(0);
    MerkleTree::build_with_progress(&source, TreeShape::default(), 2, &|n| {
        done.fetch_add(n, Ordering::Relaxed);
        calls.fetch_add(1, Ordering::Relaxed);
    })
    .unwrap();
    assert_eq!(done.load(Ordering::Relaxed), source.len());
    assert_eq!(calls.load(Ordering::Relaxed), 3, "three 4 MiB chunks");
}

#[test]
fn a_read_error_names_the_source_and_offset() {
    struct Failing;
    impl BlockSource for Failing {
        fn len(&self) -> u64 {
            64 << 20
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            if offset >= 40 << 20 {
                return Err(std::io::Error::other("medium error"));
            }
            buf.fill(1);
            Ok(())
        }
        fn describe(&self) -> String {
            "/dev/failing".to_owned()
        }
    }
    let err = MerkleTree::build(&Failing, TreeShape::default(), 2).unwrap_err();
    let ResyncError::Read { object, offset, .. } = &err else { panic!("{err:?}") };
    assert_eq!(object, "/dev/failing");
    assert!(*offset >= 40 << 20);
}

/// True when the file system under `dir` reports holes through SEEK_DATA; otherwise a loud
/// SKIPPED line.
fn seek_data_supported(file: &FileSource, test: &str) -> bool {
    let extents = file.data_extents(0..file.len()).unwrap();
    if extents.is_empty() {
        return true;
    }
    let _ = writeln!(
        std::io::stderr(),
        "\n==============================================================\n\
         SKIPPED: the temporary directory's file system reports no holes ({test})\n\
         =============================================================="
    );
    false
}

#[test]
fn file_source_finds_the_data_of_a_sparse_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sparse.img");
    let file = std::fs::File::create(&path).unwrap();
    let len = 64u64 << 20;
    file.set_len(len).unwrap();
    let probe = FileSource::open(&path).unwrap();
    if !seek_data_supported(&probe, "file_source_finds_the_data_of_a_sparse_file") {
        return;
    }
    let writes: [(u64, usize); 3] = [(1 << 20, 4096), (10 << 20, 100 << 10), (len - 1, 1)];
    for (i, &(at, n)) in writes.iter().enumerate() {
        file.write_all_at(&bytes(i as u64 + 1, n), at).unwrap();
    }
    file.sync_all().unwrap();
    let source = FileSource::open(&path).unwrap();
    assert_eq!(source.len(), len);
    assert!(!source.is_device());
    let extents = source.data_extents(0..len).unwrap();
    for &(at, n) in &writes {
        let end = at + n as u64;
        assert!(extents.iter().any(|e| e.start <= at && end <= e.end), "{at}+{n} in {extents:?}");
    }
    let total: u64 = extents.iter().map(|e| e.end - e.start).sum();
    assert!(total <= 3 * (1 << 20), "holes are not data: {extents:?}");
    // A sub-range is clamped.
    let part = source.data_extents((10 << 20) + 4096..(10 << 20) + 8192).unwrap();
    assert_eq!(part, one((10 << 20) + 4096..(10 << 20) + 8192));

    let tree = MerkleTree::build(&source, TreeShape::default(), 2).unwrap();
    let all = std::fs::read(&path).unwrap();
    assert_eq!(tree.levels(), &tree_levels(TreeShape::default(), &all)[..]);
}

#[test]
fn file_source_open_errors_name_the_path() {
    let err = FileSource::open("/nonexistent/tidemark-volume").unwrap_err();
    assert!(err.to_string().contains("/nonexistent/tidemark-volume"), "{err}");
}

#[test]
fn reads_past_the_end_fail() {
    let source = MemSource::new(vec![1; 100]);
    let mut buf = [0; 10];
    assert!(source.read_at(95, &mut buf).is_err());
    assert!(source.read_at(u64::MAX - 2, &mut buf).is_err());
    source.read_at(90, &mut buf).unwrap();
}

/// A one-range list (clippy reads `vec![a..b]` as a likely mistake).
fn one(r: std::ops::Range<u64>) -> Vec<std::ops::Range<u64>> {
    std::iter::once(r).collect()
}

/// Counts the bytes read through it.
struct Counting {
    inner: MemSource,
    read: std::sync::atomic::AtomicU64,
}

impl BlockSource for Counting {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.read.fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.inner.read_at(offset, buf)
    }
}

#[test]
fn a_limited_tree_reads_only_its_ranges_and_finds_what_the_full_tree_finds_there() {
    let shape = TreeShape::default();
    let local = bytes(3, 6 << 20);
    let mut remote = local.clone();
    // Differences inside and outside the limit.
    for at in [4096usize, 70_000, (2 << 20) + 8192, 5 << 20] {
        remote[at] ^= 0xff;
    }
    let limit = [0..128 << 10, (2 << 20)..(2 << 20) + (64 << 10)];
    let counting = Counting { inner: MemSource::new(local.clone()), read: Default::default() };
    let limited = MerkleTree::build_limited(&counting, shape, &limit, 2, &|_| {}).unwrap();
    let read = counting.read.load(std::sync::atomic::Ordering::Relaxed);
    assert!(read <= (192 << 10), "read {read} bytes for a 192 KiB limit");
    let full = MerkleTree::build(&MemSource::new(local), shape, 2).unwrap();
    let other = MerkleTree::build(&MemSource::new(remote), shape, 2).unwrap();
    let a = compare(&limited, &mut TreeOracle::new(&other), VOL, Some(&limit)).unwrap();
    let b = compare(&full, &mut TreeOracle::new(&other), VOL, Some(&limit)).unwrap();
    assert_eq!(a.ranges, b.ranges);
    assert_eq!(a.ranges, vec![4096..8192, 69632..73728, (2 << 20) + 8192..(2 << 20) + 12288]);
}
