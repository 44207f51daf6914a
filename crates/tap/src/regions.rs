//! Sets of regions (fixed-size stretches of a volume, numbered from 0) kept as sorted runs.
//!
//! This module owns the run arithmetic the write-intent map and its callers share: insert,
//! remove, membership, intersection, and coalescing to a bounded number of runs (which only
//! ever adds regions, so a coalesced set still covers everything it covered before).

use std::fmt;

/// Consecutive regions `first .. first + count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RegionRun {
    /// The first region.
    pub first: u64,
    /// How many regions (at least 1 in a [`RegionSet`]).
    pub count: u64,
}

impl RegionRun {
    /// One past the last region.
    pub fn end(&self) -> u64 {
        self.first + self.count
    }

    /// True when `region` is in the run.
    pub fn contains(&self, region: u64) -> bool {
        region >= self.first && region < self.end()
    }
}

impl fmt::Display for RegionRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.count == 1 {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}..{}", self.first, self.end())
        }
    }
}

/// A set of regions as sorted, disjoint, non-adjacent runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionSet {
    /// `(start, end)` with `end` exclusive; `runs[i].1 < runs[i + 1].0`.
    runs: Vec<(u64, u64)>,
}

impl RegionSet {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The set of the given runs (in any order, overlapping or not).
    pub fn from_runs(runs: impl IntoIterator<Item = RegionRun>) -> Self {
        let mut set = Self::new();
        for r in runs {
            set.insert_range(r.first, r.end());
        }
        set
    }

    /// Adds the regions `first .. end`.
    pub fn insert_range(&mut self, first: u64, end: u64) {
        if first >= end {
            return;
        }
        // Runs that overlap or touch [first, end) merge with it.
        let lo = self.runs.partition_point(|&(_, e)| e < first);
        let hi = self.runs.partition_point(|&(s, _)| s <= end);
        if lo == hi {
            self.runs.insert(lo, (first, end));
            return;
        }
        let start = first.min(self.runs[lo].0);
        let stop = end.max(self.runs[hi - 1].1);
        self.runs.splice(lo..hi, [(start, stop)]);
    }

    /// Adds one region.
    pub fn insert(&mut self, region: u64) {
        self.insert_range(region, region.saturating_add(1));
    }

    /// Removes the regions `first .. end`.
    pub fn remove_range(&mut self, first: u64, end: u64) {
        if first >= end {
            return;
        }
        let lo = self.runs.partition_point(|&(_, e)| e <= first);
        let hi = self.runs.partition_point(|&(s, _)| s < end);
        if lo >= hi {
            return;
        }
        let mut keep = Vec::with_capacity(2);
        let (s0, _) = self.runs[lo];
        let (_, e1) = self.runs[hi - 1];
        if s0 < first {
            keep.push((s0, first));
        }
        if e1 > end {
            keep.push((end, e1));
        }
        self.runs.splice(lo..hi, keep);
    }

    /// True when `region` is in the set.
    pub fn contains(&self, region: u64) -> bool {
        let i = self.runs.partition_point(|&(_, e)| e <= region);
        self.runs.get(i).is_some_and(|&(s, _)| s <= region)
    }

    /// True when every region of `first .. end` is in the set (true for an empty range).
    pub fn contains_range(&self, first: u64, end: u64) -> bool {
        if first >= end {
            return true;
        }
        let i = self.runs.partition_point(|&(_, e)| e <= first);
        self.runs.get(i).is_some_and(|&(s, e)| s <= first && e >= end)
    }

    /// True when no region of `first .. end` is in the set.
    pub fn disjoint_from(&self, first: u64, end: u64) -> bool {
        let i = self.runs.partition_point(|&(_, e)| e <= first);
        self.runs.get(i).is_none_or(|&(s, _)| s >= end)
    }

    /// The regions in both sets.
    pub fn intersection(&self, other: &RegionSet) -> RegionSet {
        let (mut i, mut j) = (0, 0);
        let mut out = Vec::new();
        while i < self.runs.len() && j < other.runs.len() {
            let (a0, a1) = self.runs[i];
            let (b0, b1) = other.runs[j];
            let (s, e) = (a0.max(b0), a1.min(b1));
            if s < e {
                out.push((s, e));
            }
            if a1 < b1 {
                i += 1;
            } else {
                j += 1;
            }
        }
        // Pieces of two canonical sets cannot touch unless both inputs had a run ending and
        // starting at the same point, which canonical runs never do; merge defensively anyway.
        let mut set = RegionSet::new();
        for (s, e) in out {
            set.insert_range(s, e);
        }
        set
    }

    /// The regions in either set.
    pub fn union(&self, other: &RegionSet) -> RegionSet {
        let mut set = self.clone();
        for &(s, e) in &other.runs {
            set.insert_range(s, e);
        }
        set
    }

    /// True when every region of `other` is in `self`.
    pub fn covers(&self, other: &RegionSet) -> bool {
        other.runs.iter().all(|&(s, e)| self.contains_range(s, e))
    }

    /// The runs, in order.
    pub fn runs(&self) -> impl ExactSizeIterator<Item = RegionRun> + '_ {
        self.runs.iter().map(|&(s, e)| RegionRun { first: s, count: e - s })
    }

    /// Number of runs.
    pub fn run_count(&self) -> usize {
        self.runs.len()
    }

    /// Number of regions.
    pub fn region_count(&self) -> u64 {
        self.runs.iter().map(|&(s, e)| e - s).sum()
    }

    /// True when the set is empty.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Every region, in order (for small sets and tests).
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.runs.iter().flat_map(|&(s, e)| s..e)
    }

    /// Merges runs across the smallest gaps until at most `max_runs` remain (at least 1);
    /// returns how many regions were added. The result covers the original set.
    pub fn coalesce_to(&mut self, max_runs: usize) -> u64 {
        let max_runs = max_runs.max(1);
        if self.runs.len() <= max_runs {
            return 0;
        }
        let merges = self.runs.len() - max_runs;
        let mut gaps: Vec<(u64, usize)> =
            self.runs.windows(2).enumerate().map(|(i, w)| (w[1].0 - w[0].1, i)).collect();
        gaps.sort_unstable();
        let mut bridge = vec![false; self.runs.len()];
        let mut added = 0;
        for &(gap, i) in &gaps[..merges] {
            bridge[i] = true;
            added += gap;
        }
        let mut out = Vec::with_capacity(max_runs);
        let mut cur = self.runs[0];
        for i in 1..self.runs.len() {
            if bridge[i - 1] {
                cur.1 = self.runs[i].1;
            } else {
                out.push(cur);
                cur = self.runs[i];
            }
        }
        out.push(cur);
        self.runs = out;
        added
    }
}

impl fmt::Display for RegionSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, r) in self.runs().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{r}")?;
        }
        f.write_str("}")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    fn model(set: &RegionSet) -> BTreeSet<u64> {
        set.iter().collect()
    }

    fn canonical(set: &RegionSet) -> bool {
        set.runs.iter().all(|&(s, e)| s < e) && set.runs.windows(2).all(|w| w[0].1 < w[1].0)
    }

    proptest! {
        /// Insert and remove agree with a `BTreeSet` model and keep runs canonical.
        #[test]
        fn matches_a_set_of_regions(ops in proptest::collection::vec((any::<bool>(), 0u64..200, 1u64..20), 0..60)) {
            let mut set = RegionSet::new();
            let mut m = BTreeSet::new();
            for (add, first, len) in ops {
                if add {
                    set.insert_range(first, first + len);
                    m.extend(first..first + len);
                } else {
                    set.remove_range(first, first + len);
                    for r in first..first + len { m.remove(&r); }
                }
                prop_assert!(canonical(&set), "{set}");
                prop_assert_eq!(model(&set), m.clone());
            }
            for r in 0..230 {
                prop_assert_eq!(set.contains(r), m.contains(&r));
                prop_assert_eq!(set.contains_range(r, r + 3), (r..r + 3).all(|x| m.contains(&x)));
                prop_assert_eq!(set.disjoint_from(r, r + 3), (r..r + 3).all(|x| !m.contains(&x)));
            }
        }

        /// Coalescing bounds the run count and only adds regions; intersection is exact.
        #[test]
        fn coalesce_covers_and_intersection_is_exact(
            a in proptest::collection::vec((0u64..500, 1u64..8), 0..40),
            b in proptest::collection::vec((0u64..500, 1u64..8), 0..40),
            max in 1usize..10,
        ) {
            let sa = RegionSet::from_runs(a.iter().map(|&(f, c)| RegionRun { first: f, count: c }));
            let sb = RegionSet::from_runs(b.iter().map(|&(f, c)| RegionRun { first: f, count: c }));
            let inter = sa.intersection(&sb);
            prop_assert!(canonical(&inter));
            prop_assert_eq!(model(&inter), model(&sa).intersection(&model(&sb)).copied().collect::<BTreeSet<_>>());
            let mut c = sa.clone();
            let added = c.coalesce_to(max);
            prop_assert!(canonical(&c));
            prop_assert!(c.run_count() <= max.max(1));
            prop_assert!(c.covers(&sa));
            prop_assert_eq!(c.region_count(), sa.region_count() + added);
        }
    }
}
