//! The block index of the retention log: for every (volume, block) the records that wrote
//! it, ordered by sequence number, so the newest version at or before a recovery point is
//! found in O(log n).
//!
//! Entries live in sorted runs (a log-structured merge in memory): new entries gather in a
//! small sorted buffer; a full buffer becomes a run, and runs of similar size are merged,
//! so there are O(log n) runs and each lookup is a binary search per run. An entry is 24
//! bytes; ten million entries take about 240 MB.

use crate::log::Loc;
use crate::types::{Seq, VolumeId};

/// A (volume, block) pair packed in one integer: volume in the top 16 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockKey(pub u64);

impl BlockKey {
    /// Largest block number a key holds.
    pub const MAX_BLOCK: u64 = (1 << 48) - 1;

    /// The key of `block` on `volume`.
    pub fn new(volume: VolumeId, block: u64) -> Self {
        debug_assert!(block <= Self::MAX_BLOCK);
        Self((u64::from(volume.0) << 48) | block)
    }

    /// The volume.
    pub fn volume(self) -> VolumeId {
        VolumeId((self.0 >> 48) as u16)
    }

    /// The block number.
    pub fn block(self) -> u64 {
        self.0 & Self::MAX_BLOCK
    }
}

/// One index entry: the record at `loc` wrote block `key` at sequence number `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The block.
    pub key: BlockKey,
    /// The record's sequence number.
    pub seq: Seq,
    packed: u64,
}

const FULL_BIT: u64 = 1 << 63;

impl Entry {
    /// An entry; `full` says the record covers the whole block.
    pub fn new(key: BlockKey, seq: Seq, loc: Loc, full: bool) -> Self {
        let packed =
            (u64::from(loc.slot) << 32) | u64::from(loc.offset) | if full { FULL_BIT } else { 0 };
        debug_assert!(loc.slot < 1 << 31);
        Self { key, seq, packed }
    }

    /// Where the record is.
    pub fn loc(&self) -> Loc {
        Loc { slot: ((self.packed & !FULL_BIT) >> 32) as u32, offset: self.packed as u32 }
    }

    /// True when the record covers the whole block.
    pub fn full(&self) -> bool {
        self.packed & FULL_BIT != 0
    }

    fn order(&self) -> (u64, u64) {
        (self.key.0, self.seq.0)
    }

    /// A total order: equal (key, seq) pairs (never written by the journal, but possible in
    /// a damaged one) fall back to log position, so the later record wins lookups and an
    /// unstable sort gives the same result as a stable one.
    fn total_order(&self) -> (u64, u64, u64) {
        (self.key.0, self.seq.0, self.packed & !FULL_BIT)
    }
}

const BUFFER_LIMIT: usize = 512;

/// The block index (see the module documentation).
#[derive(Debug, Default)]
pub struct BlockIndex {
    runs: Vec<Vec<Entry>>,
    /// Newest entries, unsorted (scanned linearly; it is small).
    buffer: Vec<Entry>,
}

impl BlockIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds an index from entries in any order, with one sort.
    pub fn from_entries(mut entries: Vec<Entry>) -> Self {
        // Unstable (no scratch memory) but on a total order, so ties follow log position.
        entries.sort_unstable_by_key(Entry::total_order);
        let runs = if entries.is_empty() { Vec::new() } else { vec![entries] };
        Self { runs, buffer: Vec::new() }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.runs.iter().map(Vec::len).sum::<usize>() + self.buffer.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds an entry.
    pub fn insert(&mut self, e: Entry) {
        self.buffer.push(e);
        if self.buffer.len() >= BUFFER_LIMIT {
            let mut run = std::mem::take(&mut self.buffer);
            run.sort_unstable_by_key(Entry::total_order);
            self.push_run(run);
        }
    }

    fn push_run(&mut self, mut run: Vec<Entry>) {
        while let Some(last) = self.runs.last() {
            if last.len() > run.len() * 2 {
                break;
            }
            let last = self.runs.pop().expect("checked");
            run = merge(last, run);
        }
        self.runs.push(run);
    }

    /// The newest entry for `key` with a sequence number at or below `at`.
    pub fn lookup_le(&self, key: BlockKey, at: Seq) -> Option<Entry> {
        let probe = (key.0, at.0);
        let mut best: Option<Entry> = None;
        for run in &self.runs {
            let i = run.partition_point(|e| e.order() <= probe);
            if i > 0 {
                let e = run[i - 1];
                if e.key == key && best.is_none_or(|b| e.seq >= b.seq) {
                    best = Some(e);
                }
            }
        }
        for e in &self.buffer {
            if e.key == key && e.seq <= at && best.is_none_or(|b| e.seq >= b.seq) {
                best = Some(*e);
            }
        }
        best
    }

    /// Keeps only the entries for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&Entry) -> bool) {
        for run in &mut self.runs {
            run.retain(&mut keep);
        }
        self.runs.retain(|r| !r.is_empty());
        self.buffer.retain(&mut keep);
    }

    /// The keys from `lo` to `hi` (inclusive) that have an entry at or below `at`, sorted
    /// and without duplicates: a binary search per run, then only the entries in the range,
    /// so a range the journal never touched costs O(runs x log n).
    pub fn keys_in_range(&self, lo: BlockKey, hi: BlockKey, at: Seq) -> Vec<BlockKey> {
        let mut keys: Vec<BlockKey> = Vec::new();
        for run in &self.runs {
            let i = run.partition_point(|e| e.key < lo);
            keys.extend(
                run[i..].iter().take_while(|e| e.key <= hi).filter(|e| e.seq <= at).map(|e| e.key),
            );
        }
        keys.extend(
            self.buffer.iter().filter(|e| e.key >= lo && e.key <= hi && e.seq <= at).map(|e| e.key),
        );
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// Every key with an entry at or below `at` whose sequence number is above `after`,
    /// sorted and without duplicates.
    pub fn keys_between(&self, after: Seq, at: Seq) -> Vec<BlockKey> {
        let mut keys: Vec<BlockKey> = self
            .runs
            .iter()
            .flatten()
            .chain(self.buffer.iter())
            .filter(|e| e.seq > after && e.seq <= at)
            .map(|e| e.key)
            .collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }
}

fn merge(a: Vec<Entry>, b: Vec<Entry>) -> Vec<Entry> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        // `a` is older: on equal order it goes first, so a later duplicate wins lookups.
        if a[i].total_order() <= b[j].total_order() {
            out.push(a[i]);
            i += 1;
        } else {
            out.push(b[j]);
            j += 1;
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_finds_newest_at_or_below() {
        let mut ix = BlockIndex::new();
        let k = BlockKey::new(VolumeId(1), 7);
        for s in [3u64, 9, 5, 20] {
            ix.insert(Entry::new(k, Seq(s), Loc { slot: 1, offset: s as u32 }, s % 2 == 1));
        }
        for i in 0..10_000u64 {
            ix.insert(Entry::new(
                BlockKey::new(VolumeId(0), i),
                Seq(100 + i),
                Loc { slot: 2, offset: 0 },
                true,
            ));
        }
        assert_eq!(ix.lookup_le(k, Seq(2)), None);
        assert_eq!(ix.lookup_le(k, Seq(4)).map(|e| e.seq), Some(Seq(3)));
        assert_eq!(ix.lookup_le(k, Seq(8)).map(|e| e.seq), Some(Seq(5)));
        assert_eq!(ix.lookup_le(k, Seq(100)).map(|e| e.seq), Some(Seq(20)));
        let e = ix.lookup_le(k, Seq(9)).expect("entry");
        assert_eq!((e.loc().offset, e.full()), (9, true));
        assert!(!ix.lookup_le(k, Seq(20)).expect("entry").full());
        assert_eq!(ix.lookup_le(BlockKey::new(VolumeId(0), 5000), Seq(5099)), None);
        assert!(ix.lookup_le(BlockKey::new(VolumeId(0), 5000), Seq(5100)).is_some());
        assert!(ix.runs.len() <= 16, "runs stay logarithmic: {}", ix.runs.len());
        ix.retain(|e| e.seq > Seq(5));
        assert_eq!(ix.lookup_le(k, Seq(8)), None);
        assert_eq!(ix.keys_between(Seq(0), Seq(102)).len(), 4);
        let lo = BlockKey::new(VolumeId(0), 10);
        let hi = BlockKey::new(VolumeId(0), 20);
        let want: Vec<BlockKey> = (10..=20).map(|b| BlockKey::new(VolumeId(0), b)).collect();
        assert_eq!(ix.keys_in_range(lo, hi, Seq(1000)), want);
        assert_eq!(ix.keys_in_range(lo, hi, Seq(114)).len(), 5, "entries above `at` are left out");
        assert_eq!(ix.keys_in_range(k, k, Seq(100)), vec![k]);
        assert!(ix.keys_in_range(k, k, Seq(5)).is_empty());
    }
}
