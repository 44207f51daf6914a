//! Dedupe on the replication stream: a block whose content the target already holds, in
//! the recent window of the pair's writes, is sent as a reference instead of bytes.
//!
//! Both sides keep a window of the writes of the current connection, bounded by the same
//! byte budget and evicted by the same rule, so that with equal budgets the target holds
//! every write the source may name:
//! - the source's [`DedupeWindow`] maps the BLAKE3 hash of each whole 4 KiB block
//!   ([`DEDUPE_BLOCK`], counted from the start of the write) of every write it shipped to
//!   the most recent `(seq, offset in that write)` holding it, and turns the next writes
//!   into [`EntryBody::Ref`] (all of the write is one earlier range) or
//!   [`EntryBody::Deduped`] (some blocks referenced, the rest as data);
//! - the target's [`AppliedWindow`] maps each applied write's seq to its
//!   `(volume, offset, len)`, and a reference is resolved by reading the retention log at
//!   the point right after that seq ([`resolve_batch`]).
//!
//! Invariants:
//! 1. **Same window on both sides.** A write enters the window when the source ships it
//!    (and when the target receives it) as a `write`, `ref` or deduplicated write entry,
//!    whatever its encoding; zero ranges, discards, barriers and bookmarks never do. After
//!    each insertion the oldest writes leave until the window's bytes (the sum of the
//!    writes' lengths) are within the budget. So the target's window, with a budget at
//!    least the source's, holds every write the source's window names.
//! 2. **Across connections.** The windows outlive a connection: at each new one the
//!    target tells, in `DedupeHeld`, the oldest write its window holds (it holds every
//!    write received from there to the resume point), and the source keeps of its window
//!    only the writes from there through the resume point ([`DedupeWindow::keep_range`]:
//!    later ones may never have arrived). The source's window is then part of the
//!    target's, and stays so as both take the same writes under the same budget. The
//!    target forgets its window after a connection on which it refused a batch, the
//!    source after an unresolved reference; both start empty with their process.
//! 3. **Never wrong bytes.** A reference the target cannot resolve (the write left its
//!    window, or the retention log no longer holds that point) fails the batch with
//!    [`Unresolved`] before anything of it is appended; the source then resends the
//!    batch as data on a new connection. The bytes a resolved reference reads are, by
//!    construction of the retention log, those of the named write.
//! 4. **Bounded memory.** The source's window costs about 100 bytes per 4 KiB block it
//!    holds (2.5 % of the budget); the target's about 50 bytes per write.

use std::collections::{HashMap, VecDeque};

use bytes::{Bytes, BytesMut};
use tidemark_journal::{Event, RetentionLog, Seq, VolumeId};

use crate::wire::{BlockRef, DEDUPE_BLOCK, DedupedWrite, EntryBody, RefSource, RefSpan};

/// Default dedupe window of both sides: the last 256 MiB of writes of the connection.
pub const DEFAULT_WINDOW_BYTES: u64 = 256 << 20;

const BLOCK: usize = DEDUPE_BLOCK as usize;

/// What dedupe did to one write or a run of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DedupeStats {
    /// Blocks sent as references.
    pub blocks_deduped: u64,
    /// Data bytes not sent because they went as references, less the bytes the references
    /// themselves took on the wire.
    pub bytes_saved: u64,
}

impl DedupeStats {
    /// Adds `other` in.
    pub fn add(&mut self, other: DedupeStats) {
        self.blocks_deduped += other.blocks_deduped;
        self.bytes_saved += other.bytes_saved;
    }
}

/// The writes of a window in shipping order, with the budget rule both sides share.
#[derive(Debug, Clone)]
struct Fifo {
    budget: u64,
    held: u64,
    /// (seq, len) of each write held, oldest first.
    writes: VecDeque<(Seq, u64)>,
}

impl Fifo {
    fn new(budget: u64) -> Self {
        Self { budget, held: 0, writes: VecDeque::new() }
    }

    /// Adds a write and returns those that left, oldest first.
    fn push(&mut self, seq: Seq, len: u64, mut evicted: impl FnMut(Seq)) {
        self.writes.push_back((seq, len));
        self.held += len;
        while self.held > self.budget {
            let Some((old, old_len)) = self.writes.pop_front() else { break };
            self.held -= old_len;
            evicted(old);
        }
    }

    fn clear(&mut self) {
        self.writes.clear();
        self.held = 0;
    }
}

/// The source's dedupe window (see the module documentation).
#[derive(Debug, Clone)]
pub struct DedupeWindow {
    fifo: Fifo,
    /// (hash, seq, at) of each whole block of the writes held, oldest first; each write's
    /// blocks are contiguous, so eviction pops them from the front.
    blocks: VecDeque<([u8; 32], Seq, u32)>,
    /// Whole blocks of each write held, in `fifo` order.
    block_counts: VecDeque<usize>,
    /// Block hash -> its most recent shipment.
    map: HashMap<[u8; 32], (Seq, u32)>,
}

impl DedupeWindow {
    /// An empty window holding at most `budget` bytes of writes (0: dedupe off).
    pub fn new(budget: u64) -> Self {
        Self {
            fifo: Fifo::new(budget),
            blocks: VecDeque::new(),
            block_counts: VecDeque::new(),
            map: HashMap::new(),
        }
    }

    /// The byte budget.
    pub fn budget(&self) -> u64 {
        self.fifo.budget
    }

    /// Bytes of writes held.
    pub fn held_bytes(&self) -> u64 {
        self.fifo.held
    }

    /// Distinct block contents held.
    pub fn distinct_blocks(&self) -> usize {
        self.map.len()
    }

    /// Forgets everything (a new connection).
    pub fn clear(&mut self) {
        self.fifo.clear();
        self.blocks.clear();
        self.block_counts.clear();
        self.map.clear();
    }

    /// The entry that ships write `seq` (`data` at `offset` of `volume`), with references
    /// to the blocks the window holds when `use_refs`, and records the write in the window
    /// either way (the target records it too, however it travels).
    pub fn encode_write(
        &mut self,
        seq: Seq,
        volume: VolumeId,
        offset: u64,
        data: Bytes,
        use_refs: bool,
    ) -> (EntryBody, DedupeStats) {
        if self.fifo.budget == 0 {
            return (
                EntryBody::Event(Event::Write { volume, offset, data }),
                DedupeStats::default(),
            );
        }
        let hashes: Vec<[u8; 32]> =
            data.chunks_exact(BLOCK).map(|b| *blake3::hash(b).as_bytes()).collect();
        let mut spans: Vec<RefSpan> = Vec::new();
        if use_refs {
            for (i, h) in hashes.iter().enumerate() {
                let Some(&(seq, at)) = self.map.get(h) else { continue };
                // Fewer blocks than a u32 length holds.
                let i = i as u32;
                match spans.last_mut() {
                    Some(s)
                        if s.seq == seq
                            && s.first_block + s.blocks == i
                            && u64::from(s.at) + u64::from(s.blocks) * u64::from(DEDUPE_BLOCK)
                                == u64::from(at) =>
                    {
                        s.blocks += 1;
                    }
                    _ => spans.push(RefSpan { first_block: i, blocks: 1, seq, at }),
                }
            }
        }
        let len = data.len() as u32;
        let blocks: u64 = spans.iter().map(|s| u64::from(s.blocks)).sum();
        let body = if spans.is_empty() {
            EntryBody::Event(Event::Write { volume, offset, data: data.clone() })
        } else if spans.len() == 1 && u64::from(len) == blocks * u64::from(DEDUPE_BLOCK) {
            let s = spans[0];
            EntryBody::Ref(BlockRef {
                volume,
                offset,
                len,
                source: RefSource::Earlier { seq: s.seq, at: s.at },
            })
        } else {
            let mut literal = BytesMut::with_capacity(data.len() - blocks as usize * BLOCK);
            let mut pos = 0usize;
            for s in &spans {
                let start = s.first_block as usize * BLOCK;
                literal.extend_from_slice(&data[pos..start]);
                pos = start + s.blocks as usize * BLOCK;
            }
            literal.extend_from_slice(&data[pos..]);
            EntryBody::Deduped(DedupedWrite {
                volume,
                offset,
                len,
                spans,
                literal: literal.freeze(),
            })
        };
        let stats = match &body {
            EntryBody::Event(_) => DedupeStats::default(),
            EntryBody::Ref(_) => DedupeStats {
                blocks_deduped: blocks,
                // The tail of a `ref` entry from an earlier write.
                bytes_saved: u64::from(len).saturating_sub(16),
            },
            EntryBody::Deduped(d) => DedupeStats {
                blocks_deduped: blocks,
                bytes_saved: (blocks * u64::from(DEDUPE_BLOCK))
                    .saturating_sub(8 + 24 * d.spans.len() as u64),
            },
        };
        self.record(seq, data.len() as u64, &hashes);
        (body, stats)
    }

    /// Keeps only the writes from `from` through `through` (both included): after a
    /// reconnection, the target holds the writes from `from` (its `DedupeHeld`) up to the
    /// resume point `through`; writes shipped after it may never have arrived, and older
    /// ones left the target's window. A hash whose newest shipment goes is forgotten even
    /// if an older one stays (fewer references, never a wrong one).
    pub fn keep_range(&mut self, from: Seq, through: Seq) {
        let (blocks, counts, map) = (&mut self.blocks, &mut self.block_counts, &mut self.map);
        let mut forget = |(h, seq, at): ([u8; 32], Seq, u32)| {
            if map.get(&h) == Some(&(seq, at)) {
                map.remove(&h);
            }
        };
        while let Some(&(seq, len)) = self.fifo.writes.back() {
            if seq <= through {
                break;
            }
            self.fifo.writes.pop_back();
            self.fifo.held -= len;
            let n = counts.pop_back().unwrap_or(0);
            for _ in 0..n {
                if let Some(b) = blocks.pop_back() {
                    forget(b);
                }
            }
        }
        while let Some(&(seq, len)) = self.fifo.writes.front() {
            if seq >= from {
                break;
            }
            self.fifo.writes.pop_front();
            self.fifo.held -= len;
            let n = counts.pop_front().unwrap_or(0);
            for b in blocks.drain(..n) {
                forget(b);
            }
        }
    }

    fn record(&mut self, seq: Seq, len: u64, hashes: &[[u8; 32]]) {
        for (i, h) in hashes.iter().enumerate() {
            let at = (i * BLOCK) as u32;
            self.blocks.push_back((*h, seq, at));
            self.map.insert(*h, (seq, at));
        }
        self.block_counts.push_back(hashes.len());
        let (blocks, counts, map) = (&mut self.blocks, &mut self.block_counts, &mut self.map);
        self.fifo.push(seq, len, |_| {
            let n = counts.pop_front().unwrap_or(0);
            for (h, seq, at) in blocks.drain(..n) {
                // A newer shipment of the same content keeps its entry.
                if map.get(&h) == Some(&(seq, at)) {
                    map.remove(&h);
                }
            }
        });
    }
}

/// The target's dedupe window: the writes applied on this connection that a reference
/// may name (see the module documentation).
#[derive(Debug, Clone)]
pub struct AppliedWindow {
    fifo: Fifo,
    map: HashMap<Seq, (VolumeId, u64, u32)>,
}

impl AppliedWindow {
    /// An empty window holding at most `budget` bytes of writes (0: every reference is
    /// refused).
    pub fn new(budget: u64) -> Self {
        Self { fifo: Fifo::new(budget), map: HashMap::new() }
    }

    /// The byte budget.
    pub fn budget(&self) -> u64 {
        self.fifo.budget
    }

    /// Records write `seq` of `len` bytes at `offset` of `volume`.
    pub fn record(&mut self, seq: Seq, volume: VolumeId, offset: u64, len: u32) {
        self.map.insert(seq, (volume, offset, len));
        let map = &mut self.map;
        self.fifo.push(seq, u64::from(len), |old| {
            map.remove(&old);
        });
    }

    /// The range of write `seq`, if the window holds it.
    pub fn get(&self, seq: Seq) -> Option<(VolumeId, u64, u32)> {
        self.map.get(&seq).copied()
    }

    /// The oldest write held, if any: the window holds every write received from it on.
    pub fn oldest(&self) -> Option<Seq> {
        self.fifo.writes.front().map(|&(seq, _)| seq)
    }

    /// Forgets every write.
    pub fn clear(&mut self) {
        self.fifo.clear();
        self.map.clear();
    }
}

/// Why a reference could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("reference from seq {entry} to {len} bytes at {at} of the data of seq {seq}: {why}")]
pub struct Unresolved {
    /// The referring entry's sequence number.
    pub entry: Seq,
    /// The write referenced.
    pub seq: Seq,
    /// Offset into its data.
    pub at: u32,
    /// Bytes referenced.
    pub len: u32,
    /// What is missing.
    pub why: String,
}

/// Resolves the references of the fresh entries of a batch, in order, into plain events,
/// and records every write in `window`. Writes of the same batch are read from the
/// entries before them (they are not appended yet); earlier ones from `log`. On error
/// nothing is appended, and `window` may hold writes of the failed batch: the caller ends
/// the connection, and the window with it.
pub fn resolve_batch<'a>(
    log: &RetentionLog,
    window: &mut AppliedWindow,
    entries: impl Iterator<Item = (Seq, &'a EntryBody)>,
) -> Result<Vec<Event>, Unresolved> {
    let mut batch: HashMap<Seq, Bytes> = HashMap::new();
    let mut out = Vec::new();
    for (seq, body) in entries {
        let event = match body {
            EntryBody::Event(e) => e.clone(),
            EntryBody::Ref(r) => {
                let RefSource::Earlier { seq: from, at } = r.source else {
                    return Err(Unresolved {
                        entry: seq,
                        seq: Seq(0),
                        at: 0,
                        len: r.len,
                        why: "content-hash references are not served on the replication \
                              stream"
                            .to_owned(),
                    });
                };
                let mut data = vec![0u8; r.len as usize];
                read_ref(log, window, &batch, seq, from, at, &mut data)?;
                Event::Write { volume: r.volume, offset: r.offset, data: Bytes::from(data) }
            }
            EntryBody::Deduped(d) => {
                let mut data = vec![0u8; d.len as usize];
                let mut lit = 0usize;
                let mut pos = 0usize;
                for s in &d.spans {
                    let start = s.first_block as usize * BLOCK;
                    let n = start - pos;
                    data[pos..start].copy_from_slice(&d.literal[lit..lit + n]);
                    lit += n;
                    pos = start + s.blocks as usize * BLOCK;
                    read_ref(log, window, &batch, seq, s.seq, s.at, &mut data[start..pos])?;
                }
                data[pos..].copy_from_slice(&d.literal[lit..]);
                Event::Write { volume: d.volume, offset: d.offset, data: Bytes::from(data) }
            }
        };
        if let Event::Write { volume, offset, data } = &event {
            // The codec bounds every length by u32.
            window.record(seq, *volume, *offset, data.len() as u32);
            if window.get(seq).is_some() {
                batch.insert(seq, data.clone());
            }
        }
        out.push(event);
    }
    Ok(out)
}

/// Fills `buf` with bytes `at ..` of write `from`, for the entry `entry`.
fn read_ref(
    log: &RetentionLog,
    window: &AppliedWindow,
    batch: &HashMap<Seq, Bytes>,
    entry: Seq,
    from: Seq,
    at: u32,
    buf: &mut [u8],
) -> Result<(), Unresolved> {
    let len = buf.len() as u32;
    let fail = |why: String| Unresolved { entry, seq: from, at, len, why };
    let Some((volume, offset, wlen)) = window.get(from) else {
        return Err(fail(format!("not in the target's dedupe window ({} bytes)", window.budget())));
    };
    if u64::from(at) + u64::from(len) > u64::from(wlen) {
        return Err(fail(format!("beyond the end of that write ({wlen} bytes)")));
    }
    if let Some(data) = batch.get(&from) {
        buf.copy_from_slice(&data[at as usize..at as usize + buf.len()]);
        return Ok(());
    }
    // The state right after that write, which holds its bytes: a recovery point or not
    // (a write inside a resync window is not one).
    log.read_as_of(from, volume, offset + u64::from(at), buf)
        .map_err(|e| fail(format!("reading it from the retention log failed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(fill: u8) -> Vec<u8> {
        vec![fill; BLOCK]
    }

    fn write(blocks: &[u8]) -> Bytes {
        Bytes::from(blocks.iter().flat_map(|&b| block(b)).collect::<Vec<_>>())
    }

    #[test]
    fn keep_range_leaves_only_the_writes_the_target_holds() {
        let mut w = DedupeWindow::new(1 << 20);
        let v = VolumeId(0);
        for seq in 1..=5u8 {
            w.encode_write(Seq(u64::from(seq)), v, 0, write(&[seq]), true);
        }
        w.keep_range(Seq(2), Seq(4));
        assert_eq!(w.held_bytes(), 3 * BLOCK as u64);
        for (fill, held) in [(1u8, false), (2, true), (3, true), (4, true), (5, false)] {
            let mut probe = w.clone();
            let (body, _) = probe.encode_write(Seq(9), v, 0, write(&[fill]), true);
            match body {
                EntryBody::Ref(r) => {
                    assert!(held, "block {fill} referenced after it left");
                    assert_eq!(r.source, RefSource::Earlier { seq: Seq(u64::from(fill)), at: 0 });
                }
                _ => assert!(!held, "block {fill} not referenced though held"),
            }
        }
        // The writes kept still leave in order under the budget.
        w.keep_range(Seq(0), Seq(3));
        assert_eq!(w.held_bytes(), 2 * BLOCK as u64);
        assert_eq!(w.distinct_blocks(), 2);
    }

    #[test]
    fn a_repeated_write_goes_as_one_ref_and_a_partial_repeat_as_spans() {
        let mut w = DedupeWindow::new(1 << 20);
        let v = VolumeId(0);
        let (first, stats) = w.encode_write(Seq(1), v, 0, write(&[1, 2, 3]), true);
        assert!(matches!(first, EntryBody::Event(Event::Write { .. })));
        assert_eq!(stats, DedupeStats::default());

        let (again, stats) = w.encode_write(Seq(2), v, 1 << 20, write(&[1, 2, 3]), true);
        let EntryBody::Ref(r) = again else { panic!("expected a ref, got {again:?}") };
        assert_eq!(r.source, RefSource::Earlier { seq: Seq(1), at: 0 });
        assert_eq!((r.len, stats.blocks_deduped), (3 * DEDUPE_BLOCK, 3));

        // Block 2 and 3 of write 1 (contiguous), a new block, then block 1 again, which
        // write 2 shipped most recently.
        let (mixed, stats) = w.encode_write(Seq(3), v, 0, write(&[2, 3, 9, 1]), true);
        let EntryBody::Deduped(d) = mixed else { panic!("expected a deduped write") };
        assert_eq!(
            d.spans,
            vec![
                RefSpan { first_block: 0, blocks: 2, seq: Seq(2), at: DEDUPE_BLOCK },
                RefSpan { first_block: 3, blocks: 1, seq: Seq(2), at: 0 },
            ]
        );
        assert_eq!(&d.literal[..], &block(9)[..]);
        assert_eq!(stats.blocks_deduped, 3);
        assert_eq!(stats.bytes_saved, 3 * 4096 - 8 - 48);
    }

    #[test]
    fn without_refs_writes_go_as_data_but_are_still_recorded() {
        let mut w = DedupeWindow::new(1 << 20);
        let v = VolumeId(0);
        w.encode_write(Seq(1), v, 0, write(&[1]), true);
        let (body, _) = w.encode_write(Seq(2), v, 0, write(&[1]), false);
        assert!(matches!(body, EntryBody::Event(Event::Write { .. })));
        let (body, _) = w.encode_write(Seq(3), v, 0, write(&[1]), true);
        assert!(
            matches!(
                body,
                EntryBody::Ref(BlockRef { source: RefSource::Earlier { seq: Seq(2), at: 0 }, .. })
            ),
            "the most recent shipment is named: {body:?}"
        );
    }

    #[test]
    fn both_windows_evict_the_same_writes_under_the_same_budget() {
        let budget = 3 * BLOCK as u64;
        let mut source = DedupeWindow::new(budget);
        let mut target = AppliedWindow::new(budget);
        let v = VolumeId(0);
        for (seq, fill) in [(1u64, 1u8), (2, 2), (3, 3), (4, 4)] {
            source.encode_write(Seq(seq), v, 0, write(&[fill]), true);
            target.record(Seq(seq), v, 0, DEDUPE_BLOCK);
        }
        assert_eq!(source.held_bytes(), budget);
        assert_eq!(source.distinct_blocks(), 3);
        assert!(target.get(Seq(1)).is_none(), "write 1 left the target's window");
        let (body, _) = source.encode_write(Seq(5), v, 0, write(&[1]), true);
        assert!(
            matches!(body, EntryBody::Event(_)),
            "write 1 left the source's window too: {body:?}"
        );
        let (body, _) = source.encode_write(Seq(6), v, 0, write(&[3]), true);
        let EntryBody::Ref(r) = body else { panic!("write 3 is held") };
        assert!(
            target
                .get(match r.source {
                    RefSource::Earlier { seq, .. } => seq,
                    RefSource::Hash(_) => unreachable!(),
                })
                .is_some()
        );
    }

    #[test]
    fn a_partial_tail_block_is_never_referenced() {
        let mut w = DedupeWindow::new(1 << 20);
        let v = VolumeId(0);
        let mut data = write(&[5, 5]).to_vec();
        data.extend_from_slice(&[5; 100]);
        w.encode_write(Seq(1), v, 0, Bytes::from(data.clone()), true);
        let (body, _) = w.encode_write(Seq(2), v, 0, Bytes::from(data), true);
        let EntryBody::Deduped(d) = body else { panic!("expected a deduped write") };
        // Both whole blocks have the same content: each names its most recent shipment.
        assert_eq!(d.referenced_bytes(), 2 * 4096);
        assert_eq!(d.literal.len(), 100);
    }

    #[test]
    fn a_zero_budget_turns_dedupe_off() {
        let mut w = DedupeWindow::new(0);
        let v = VolumeId(0);
        w.encode_write(Seq(1), v, 0, write(&[1]), true);
        let (body, _) = w.encode_write(Seq(2), v, 0, write(&[1]), true);
        assert!(matches!(body, EntryBody::Event(_)));
        assert_eq!(w.held_bytes(), 0);
    }
}
