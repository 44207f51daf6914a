//! The crash-consistency checker: given a recorded source history and an image claimed to be
//! the source device's state at a point of that history, decides whether the device could
//! have held that image after a power cut at that point, and if not, says which sectors are
//! wrong, what they hold and which writes could have put what there.
//!
//! A [`History`] is the ordered list of capture events of one volume (writes, write-zeroes,
//! discards, barriers, bookmarks) with their sequence numbers, over an initial image (what
//! the device held before the first event). It can be built from the tap's spool
//! ([`History::from_spooled`]), from a dm-log-writes log ([`History::from_dmlog`]) or event by
//! event ([`History::push`]).
//!
//! # The rule checked at a point `P`
//!
//! Let `B` be the last barrier (a [`Event::Barrier`] or [`Event::Bookmark`]) with a sequence
//! number at or before `P`, or the start of the history when there is none. The device
//! promised, by completing the flush at `B`, that every write ordered before `B` was durable;
//! it promised nothing about the writes after `B`.
//! 1. **Durable sectors.** Every 512-byte sector that no write in `(B, P]` touches holds
//!    exactly what the writes before `B` left there, the last writer winning (or its initial
//!    content if none touched it).
//! 2. **Unflushed sectors.** A sector touched by a write in `(B, P]` holds either its content
//!    at `B` or the data one of those writes had for it. A write larger than a sector may be
//!    torn at any sector boundary (a device only promises sector atomicity), and unflushed
//!    writes may have reached the medium in any order, so any of them may be the one left.
//!    Content that none of these put there is wrong, in particular the data of a write issued
//!    after `P` (reordering across the point) or of a write that an older one overwrote
//!    before `B` (reordering across the barrier).
//!
//! A write-zeroes or a discard sets its range to zeros: the tap writes zeros to the protected
//! device for both and the replica stores both as zeros.
//!
//! # Invariants
//! - A history holds events in strictly increasing sequence order, every mutation sector
//!   aligned and inside the device; [`History::push`] refuses anything else, so the checker
//!   never does arithmetic on unchecked ranges.
//! - A [`Checker`] only moves forward: it checks points in increasing order, folding the
//!   writes before each barrier into its durable image once, so checking every point of a
//!   history costs one pass over the history plus one comparison of each image.
//! - A [`Verdict`] counts every wrong sector ([`Verdict::bad_sectors`]) and every write
//!   ordered before the barrier whose data is missing ([`Verdict::lost_writes`]); only the
//!   first [`MAX_DETAILED`] wrong sectors are explained in full, so that the report of a
//!   wholly wrong image stays readable.
//!
//! Resync markers are refused: the blocks a resync sends are not part of the source's ordered
//! write history, and the retention log offers no point inside a resync window anyway.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use tidemark_journal::{Event, Seq, SpooledEvent, VolumeId};
use tidemark_tap::dmlog::DmLog;

/// The unit of atomicity the checker assumes: a 512-byte sector.
pub const SECTOR: u64 = 512;
/// Wrong sectors explained in full in a [`Verdict`]; the rest are only counted.
pub const MAX_DETAILED: usize = 16;
/// Origins listed for the content found in a wrong sector (the rest are counted).
const MAX_FOUND: usize = 8;

const ZERO_SECTOR: [u8; SECTOR as usize] = [0; SECTOR as usize];

/// Why an event or an initial image cannot be part of a history.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HistoryError {
    /// Events must come in strictly increasing sequence order.
    #[error("event seq {seq} comes after seq {last}: a history is in increasing sequence order")]
    OutOfOrder {
        /// The event refused.
        seq: Seq,
        /// The last event accepted.
        last: Seq,
    },
    /// A mutation that does not cover whole sectors.
    #[error("{what} at seq {seq} covers bytes {offset}..{end}, not whole {SECTOR}-byte sectors")]
    Unaligned {
        /// The event.
        seq: Seq,
        /// Its kind.
        what: &'static str,
        /// First byte.
        offset: u64,
        /// End byte (exclusive).
        end: u64,
    },
    /// A mutation past the end of the device.
    #[error(
        "{what} at seq {seq} covers bytes {offset}..{end}, past the end of the {len}-byte device"
    )]
    OutOfRange {
        /// The event.
        seq: Seq,
        /// Its kind.
        what: &'static str,
        /// First byte.
        offset: u64,
        /// End byte (exclusive).
        end: u64,
        /// Device length.
        len: u64,
    },
    /// A resync marker, which has no place in a source's write history.
    #[error(
        "event seq {seq} is a resync marker: a source history holds only the application's \
         writes, flushes and bookmarks"
    )]
    Resync {
        /// The event.
        seq: Seq,
    },
    /// An initial image that is not whole sectors.
    #[error("the initial image holds {len} bytes, expected a multiple of {SECTOR}")]
    InitialImage {
        /// Its length.
        len: u64,
    },
    /// The dm-log-writes log could not be read to its end.
    #[error("cannot read event {index} of dm-log-writes log {log}")]
    DmLog {
        /// The log's name.
        log: String,
        /// Index of the event (from 0) that failed.
        index: u64,
        /// What the reader reported.
        #[source]
        source: Box<tidemark_tap::TapError>,
    },
}

/// Why a point cannot be checked at all (as opposed to a check that finds it inconsistent).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckError {
    /// The image is not the device's length.
    #[error("the image claimed for seq {at} holds {got} bytes, expected the device's {expected}")]
    ImageLength {
        /// The point.
        at: Seq,
        /// Bytes given.
        got: u64,
        /// Device length.
        expected: u64,
    },
    /// A [`Checker`] only moves forward.
    #[error("seq {at} is before seq {previous}, already checked: check points in increasing order")]
    Backwards {
        /// The point asked for.
        at: Seq,
        /// The last point checked.
        previous: Seq,
    },
    /// The point is after the end of the recorded history.
    #[error(
        "seq {at} is after the last event recorded (seq {last}): the history cannot say what the source did there"
    )]
    PastHistory {
        /// The point asked for.
        at: Seq,
        /// The last event of the history.
        last: Seq,
    },
}

/// What put a sector's content there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Origin {
    /// The device's content before the history began.
    Initial,
    /// A write.
    Write(Seq),
    /// A write-zeroes.
    WriteZeroes(Seq),
    /// A discard (zeros).
    Discard(Seq),
}

impl Origin {
    /// The event's sequence number; `None` for the initial content.
    pub fn seq(self) -> Option<Seq> {
        match self {
            Origin::Initial => None,
            Origin::Write(s) | Origin::WriteZeroes(s) | Origin::Discard(s) => Some(s),
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Initial => f.write_str("the initial content"),
            Origin::Write(s) => write!(f, "write seq {s}"),
            Origin::WriteZeroes(s) => write!(f, "write-zeroes seq {s}"),
            Origin::Discard(s) => write!(f, "discard seq {s}"),
        }
    }
}

/// One wrong sector: what it could have held and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Sector index (byte offset / 512).
    pub sector: u64,
    /// False when the sector is durable (it had to hold exactly `allowed[0]`), true when an
    /// unflushed write touched it (any of `allowed` was possible).
    pub unflushed: bool,
    /// Every content the sector could have held, each named by what put it there: for an
    /// unflushed sector, its content at the barrier first, then the unflushed writes.
    pub allowed: Vec<Origin>,
    /// Every event of the whole history (before or after the point), and the initial
    /// content, whose data for this sector equals what the image holds; empty when no
    /// write ever put that content there (foreign content).
    pub found: Vec<Origin>,
    /// How many more origins matched than `found` lists.
    pub found_more: usize,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let start = self.sector * SECTOR;
        write!(f, "sector {} (bytes {}..{}): ", self.sector, start, start + SECTOR)?;
        let list = |o: &[Origin]| o.iter().map(Origin::to_string).collect::<Vec<_>>().join(", ");
        if self.unflushed {
            let (old, new) =
                self.allowed.split_first().map_or((None, &[][..]), |(a, b)| (Some(a), b));
            match old {
                Some(old) => write!(f, "may hold only its content at the barrier ({old})")?,
                None => f.write_str("may hold only")?,
            }
            write!(f, " or the data of an unflushed write ({})", list(new))?;
        } else {
            match self.allowed.first() {
                Some(o) => write!(f, "must hold the data of {o}")?,
                None => f.write_str("must hold nothing known")?,
            }
        }
        if self.found.is_empty() {
            f.write_str("; holds content that no event of the history put there")
        } else {
            write!(f, "; holds the data of {}", list(&self.found))?;
            if self.found_more > 0 {
                write!(f, " and {} more", self.found_more)?;
            }
            Ok(())
        }
    }
}

/// The result of checking one image at one point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The point checked.
    pub at: Seq,
    /// The last barrier or bookmark at or before it ([`Seq::ZERO`]: none, the start).
    pub barrier: Seq,
    /// Sectors compared.
    pub sectors: u64,
    /// Sectors touched by writes after the barrier (any of several contents allowed).
    pub unflushed_sectors: u64,
    /// Writes, write-zeroes and discards after the barrier, up to the point.
    pub unflushed_writes: u64,
    /// Sectors that hold content the device could not have had.
    pub bad_sectors: u64,
    /// The first [`MAX_DETAILED`] wrong sectors, explained.
    pub violations: Vec<Violation>,
    /// Every write, write-zeroes or discard ordered before the barrier whose data is missing
    /// from a durable sector it should fill (acknowledged and flushed, yet not there).
    pub lost_writes: BTreeSet<Seq>,
    /// Durable sectors that should hold their initial content and do not.
    pub initial_content_lost: u64,
}

impl Verdict {
    /// True when the image is a state the device could have been in after a power cut.
    pub fn is_consistent(&self) -> bool {
        self.bad_sectors == 0
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let barrier = if self.barrier == Seq::ZERO {
            "no barrier yet (the initial image is durable)".to_owned()
        } else {
            format!("last barrier at seq {}", self.barrier)
        };
        if self.is_consistent() {
            return write!(
                f,
                "seq {}: consistent ({barrier}; {} sectors, {} touched by {} unflushed writes)",
                self.at, self.sectors, self.unflushed_sectors, self.unflushed_writes
            );
        }
        write!(
            f,
            "seq {}: NOT a state the source could have had after a power cut ({barrier}): \
             {} of {} sectors wrong",
            self.at, self.bad_sectors, self.sectors
        )?;
        if !self.lost_writes.is_empty() {
            let lost: Vec<String> =
                self.lost_writes.iter().take(32).map(|s| s.to_string()).collect();
            write!(
                f,
                "; {} write(s) ordered before the barrier are missing (seq {}{})",
                self.lost_writes.len(),
                lost.join(", "),
                if self.lost_writes.len() > 32 { ", ..." } else { "" }
            )?;
        }
        if self.initial_content_lost > 0 {
            write!(f, "; {} sector(s) lost their initial content", self.initial_content_lost)?;
        }
        for v in &self.violations {
            write!(f, "\n  {v}")?;
        }
        if self.bad_sectors > self.violations.len() as u64 {
            write!(
                f,
                "\n  ... and {} more wrong sectors",
                self.bad_sectors - self.violations.len() as u64
            )?;
        }
        Ok(())
    }
}

/// The recorded history of one volume: initial image and ordered events (see the module
/// documentation).
#[derive(Debug, Clone)]
pub struct History {
    volume: VolumeId,
    initial: Vec<u8>,
    events: Vec<(Seq, Event)>,
}

impl History {
    /// An empty history of `volume` over `initial`, the device's content before the first
    /// event (whole sectors).
    pub fn new(volume: VolumeId, initial: Vec<u8>) -> Result<History, HistoryError> {
        let len = initial.len() as u64;
        if !len.is_multiple_of(SECTOR) {
            return Err(HistoryError::InitialImage { len });
        }
        Ok(History { volume, initial, events: Vec::new() })
    }

    /// An empty history of `volume` over a zero-filled device of `len` bytes.
    pub fn zeroed(volume: VolumeId, len: u64) -> Result<History, HistoryError> {
        Self::new(volume, vec![0; usize::try_from(len).expect("device length fits memory")])
    }

    /// A history from spooled events (as [`tidemark_journal::Spool::read_after`] returns them).
    pub fn from_spooled(
        volume: VolumeId,
        initial: Vec<u8>,
        events: impl IntoIterator<Item = SpooledEvent>,
    ) -> Result<History, HistoryError> {
        let mut h = Self::new(volume, initial)?;
        for e in events {
            h.push(e.seq, e.event)?;
        }
        Ok(h)
    }

    /// A history from every capture event of a dm-log-writes log, numbered from seq 1 in log
    /// order (the numbers a fresh spool would give them).
    pub fn from_dmlog(
        log: &DmLog<'_>,
        volume: VolumeId,
        initial: Vec<u8>,
    ) -> Result<History, HistoryError> {
        let mut h = Self::new(volume, initial)?;
        for (index, event) in log.events(volume).enumerate() {
            let event = event.map_err(|source| HistoryError::DmLog {
                log: log.name().to_owned(),
                index: index as u64,
                source: Box::new(source),
            })?;
            h.push(Seq(index as u64 + 1), event)?;
        }
        Ok(h)
    }

    /// Appends one event. Events of other volumes are ignored (a consistency group's stream
    /// holds several); their sequence numbers must still grow.
    pub fn push(&mut self, seq: Seq, event: Event) -> Result<(), HistoryError> {
        let last = self.last_seq();
        if seq <= last {
            return Err(HistoryError::OutOfOrder { seq, last });
        }
        if matches!(event, Event::ResyncBegin { .. } | Event::ResyncEnd { .. }) {
            return Err(HistoryError::Resync { seq });
        }
        if let Some((volume, offset, len)) = event.range() {
            if volume != self.volume {
                return Ok(());
            }
            let what = kind_name(&event);
            let end = offset.checked_add(len).ok_or(HistoryError::OutOfRange {
                seq,
                what,
                offset,
                end: u64::MAX,
                len: self.len(),
            })?;
            if !offset.is_multiple_of(SECTOR) || !len.is_multiple_of(SECTOR) {
                return Err(HistoryError::Unaligned { seq, what, offset, end });
            }
            if end > self.len() {
                return Err(HistoryError::OutOfRange { seq, what, offset, end, len: self.len() });
            }
        }
        self.events.push((seq, event));
        Ok(())
    }

    /// The device length in bytes.
    pub fn len(&self) -> u64 {
        self.initial.len() as u64
    }

    /// True when the device has no sectors.
    pub fn is_empty(&self) -> bool {
        self.initial.is_empty()
    }

    /// The sequence number of the last event ([`Seq::ZERO`] when there is none).
    pub fn last_seq(&self) -> Seq {
        self.events.last().map_or(Seq::ZERO, |(s, _)| *s)
    }

    /// The events, in sequence order.
    pub fn events(&self) -> &[(Seq, Event)] {
        &self.events
    }

    /// The sequence numbers of every barrier and bookmark: the flush points of the history.
    pub fn flush_points(&self) -> Vec<Seq> {
        self.events.iter().filter(|(_, e)| is_barrier(e)).map(|(s, _)| *s).collect()
    }

    /// The device's content with every event up to `at` applied in order: the state the
    /// source had right after `at` with nothing lost.
    pub fn state_at(&self, at: Seq) -> Vec<u8> {
        let mut image = self.initial.clone();
        for (seq, event) in &self.events {
            if *seq > at {
                break;
            }
            apply(&mut image, event);
        }
        image
    }

    /// A checker positioned at the start of the history.
    pub fn checker(&self) -> Checker<'_> {
        Checker {
            history: self,
            next: 0,
            durable: self.initial.clone(),
            origin: vec![Seq::ZERO; (self.len() / SECTOR) as usize],
            barrier: Seq::ZERO,
            pending: Vec::new(),
            previous: Seq::ZERO,
        }
    }

    /// Checks one image at one point (a fresh [`Checker`]; use one checker for many points).
    pub fn check(&self, at: Seq, image: &[u8]) -> Result<Verdict, CheckError> {
        self.checker().check(at, image)
    }

    /// The event with this sequence number.
    fn event(&self, seq: Seq) -> Option<&Event> {
        self.events.binary_search_by_key(&seq, |(s, _)| *s).ok().map(|i| &self.events[i].1)
    }

    /// What put the durable content of a sector there, from the seq of its last writer.
    fn origin_of(&self, seq: Seq) -> Origin {
        if seq == Seq::ZERO {
            return Origin::Initial;
        }
        match self.event(seq) {
            Some(e) => origin(seq, e),
            None => Origin::Initial,
        }
    }

    /// Every origin in the whole history whose data for `sector` equals `content`.
    fn matching_origins(&self, sector: u64, content: &[u8]) -> (Vec<Origin>, usize) {
        let mut found = Vec::new();
        let mut more = 0;
        let mut note = |o: Origin| {
            if found.len() < MAX_FOUND {
                found.push(o);
            } else {
                more += 1;
            }
        };
        let s = (sector * SECTOR) as usize;
        if self.initial[s..s + SECTOR as usize] == *content {
            note(Origin::Initial);
        }
        for (seq, event) in &self.events {
            if self.sector_data(event, sector) == Some(content) {
                note(origin(*seq, event));
            }
        }
        (found, more)
    }

    /// The data `event` has for `sector`, if it touches it (on this history's volume).
    fn sector_data<'e>(&self, event: &'e Event, sector: u64) -> Option<&'e [u8]> {
        let (volume, offset, len) = event.range()?;
        let at = sector * SECTOR;
        if volume != self.volume || at < offset || at >= offset + len {
            return None;
        }
        Some(match event {
            Event::Write { data, .. } => {
                let i = (at - offset) as usize;
                &data[i..i + SECTOR as usize]
            }
            _ => &ZERO_SECTOR[..],
        })
    }
}

/// Walks a [`History`] forward, checking images at increasing points (see the module
/// documentation).
#[derive(Debug, Clone)]
pub struct Checker<'h> {
    history: &'h History,
    /// Index of the first event not yet taken in.
    next: usize,
    /// The content every event before `barrier` left, last writer winning.
    durable: Vec<u8>,
    /// Per sector: the seq of the event that left its durable content (ZERO: initial).
    origin: Vec<Seq>,
    /// The last barrier taken in.
    barrier: Seq,
    /// Indexes of the mutations taken in after `barrier`, in order.
    pending: Vec<usize>,
    /// The last point checked.
    previous: Seq,
}

impl Checker<'_> {
    /// The state the device is known to hold durably at the last barrier taken in.
    pub fn durable(&self) -> &[u8] {
        &self.durable
    }

    /// Checks `image`, claimed to be the device's state at `at`. Points must come in
    /// increasing order (the same point twice is allowed).
    pub fn check(&mut self, at: Seq, image: &[u8]) -> Result<Verdict, CheckError> {
        let h = self.history;
        if at < self.previous {
            return Err(CheckError::Backwards { at, previous: self.previous });
        }
        if at > h.last_seq() {
            return Err(CheckError::PastHistory { at, last: h.last_seq() });
        }
        if image.len() as u64 != h.len() {
            return Err(CheckError::ImageLength { at, got: image.len() as u64, expected: h.len() });
        }
        self.previous = at;
        self.advance(at);

        // Sector -> the unflushed mutations touching it, in order.
        let mut unflushed: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for &i in &self.pending {
            if let Some((_, offset, len)) = h.events[i].1.range() {
                for sector in offset / SECTOR..(offset + len) / SECTOR {
                    unflushed.entry(sector).or_default().push(i);
                }
            }
        }

        let mut verdict = Verdict {
            at,
            barrier: self.barrier,
            sectors: h.len() / SECTOR,
            unflushed_sectors: unflushed.len() as u64,
            unflushed_writes: self.pending.len() as u64,
            bad_sectors: 0,
            violations: Vec::new(),
            lost_writes: BTreeSet::new(),
            initial_content_lost: 0,
        };
        let sz = SECTOR as usize;
        for (sector, (got, want)) in
            image.chunks_exact(sz).zip(self.durable.chunks_exact(sz)).enumerate()
        {
            let sector = sector as u64;
            let candidates = unflushed.get(&sector);
            let ok = got == want
                || candidates.is_some_and(|c| {
                    c.iter().any(|&i| h.sector_data(&h.events[i].1, sector) == Some(got))
                });
            if ok {
                continue;
            }
            verdict.bad_sectors += 1;
            let durable_origin = h.origin_of(self.origin[sector as usize]);
            if candidates.is_none() {
                match durable_origin.seq() {
                    Some(seq) => {
                        verdict.lost_writes.insert(seq);
                    }
                    None => verdict.initial_content_lost += 1,
                }
            }
            if verdict.violations.len() < MAX_DETAILED {
                let mut allowed = vec![durable_origin];
                if let Some(c) = candidates {
                    allowed.extend(c.iter().map(|&i| origin(h.events[i].0, &h.events[i].1)));
                }
                let (found, found_more) = h.matching_origins(sector, got);
                verdict.violations.push(Violation {
                    sector,
                    unflushed: candidates.is_some(),
                    allowed,
                    found,
                    found_more,
                });
            }
        }
        Ok(verdict)
    }

    /// Takes in every event up to `at`: a barrier folds the pending mutations into the
    /// durable image, in order.
    fn advance(&mut self, at: Seq) {
        let h = self.history;
        while let Some((seq, event)) = h.events.get(self.next) {
            if *seq > at {
                break;
            }
            if is_barrier(event) {
                for i in std::mem::take(&mut self.pending) {
                    let (seq, event) = &h.events[i];
                    apply(&mut self.durable, event);
                    if let Some((_, offset, len)) = event.range() {
                        self.origin[(offset / SECTOR) as usize..((offset + len) / SECTOR) as usize]
                            .fill(*seq);
                    }
                }
                self.barrier = *seq;
            } else if event.range().is_some_and(|(v, _, _)| v == h.volume) {
                self.pending.push(self.next);
            }
            self.next += 1;
        }
    }
}

fn is_barrier(event: &Event) -> bool {
    matches!(event, Event::Barrier | Event::Bookmark(_))
}

fn kind_name(event: &Event) -> &'static str {
    match event {
        Event::Write { .. } => "write",
        Event::WriteZeroes { .. } => "write-zeroes",
        Event::Discard { .. } => "discard",
        Event::Barrier => "barrier",
        Event::Bookmark(_) => "bookmark",
        Event::ResyncBegin { .. } => "resync begin",
        Event::ResyncEnd { .. } => "resync end",
        Event::Resize { .. } => "resize",
    }
}

fn origin(seq: Seq, event: &Event) -> Origin {
    match event {
        Event::WriteZeroes { .. } => Origin::WriteZeroes(seq),
        Event::Discard { .. } => Origin::Discard(seq),
        _ => Origin::Write(seq),
    }
}

/// Applies a mutation (already checked to be in range) to `image`.
fn apply(image: &mut [u8], event: &Event) {
    match event {
        Event::Write { offset, data, .. } => {
            image[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
        }
        Event::WriteZeroes { offset, len, .. } | Event::Discard { offset, len, .. } => {
            image[*offset as usize..(*offset + u64::from(*len)) as usize].fill(0);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use tidemark_journal::{Bookmark, BookmarkKind};

    use super::*;

    const V: VolumeId = VolumeId(0);
    /// Eight sectors.
    const LEN: u64 = 8 * SECTOR;

    fn fill(byte: u8, sectors: u64) -> Bytes {
        Bytes::from(vec![byte; (sectors * SECTOR) as usize])
    }

    fn write(offset_sectors: u64, byte: u8, sectors: u64) -> Event {
        Event::Write { volume: V, offset: offset_sectors * SECTOR, data: fill(byte, sectors) }
    }

    fn bookmark(name: &str) -> Event {
        Event::Bookmark(Bookmark::new(name, BookmarkKind::User, 0).unwrap())
    }

    fn history(events: Vec<Event>) -> History {
        let mut h = History::zeroed(V, LEN).unwrap();
        for (i, e) in events.into_iter().enumerate() {
            h.push(Seq(i as u64 + 1), e).unwrap();
        }
        h
    }

    /// Sets sector `sector` of `image` to `byte`.
    fn set(image: &mut [u8], sector: u64, byte: u8) {
        image[(sector * SECTOR) as usize..((sector + 1) * SECTOR) as usize].fill(byte);
    }

    /// Seq 1: A over sectors 0..4; 2: barrier; 3: B over 2..6; 4: C over sector 5;
    /// 5: bookmark; 6: D over 0..2; 7: zeroes over 4..6.
    fn sample() -> History {
        history(vec![
            write(0, 0xA, 4),
            Event::Barrier,
            write(2, 0xB, 4),
            write(5, 0xC, 1),
            bookmark("b1"),
            write(0, 0xD, 2),
            Event::WriteZeroes { volume: V, offset: 4 * SECTOR, len: 2 * SECTOR as u32 },
        ])
    }

    #[test]
    fn accepts_the_exact_state_at_every_point() {
        let h = sample();
        let mut checker = h.checker();
        for at in 0..=h.last_seq().0 {
            let v = checker.check(Seq(at), &h.state_at(Seq(at))).unwrap();
            assert!(v.is_consistent(), "{v}");
        }
    }

    #[test]
    fn accepts_any_mix_of_old_and_new_sectors_after_the_barrier() {
        let h = sample();
        // At seq 4 (barrier at 2): sectors 2..6 were touched by B (seq 3) and sector 5 by C.
        let mut image = h.state_at(Seq(2));
        set(&mut image, 3, 0xB); // torn: only one sector of B reached the medium
        set(&mut image, 5, 0xB); // B persisted after C on sector 5: no order without a flush
        let v = h.check(Seq(4), &image).unwrap();
        assert!(v.is_consistent(), "{v}");
        assert_eq!(v.barrier, Seq(2));
        assert_eq!(v.unflushed_writes, 2);
        assert_eq!(v.unflushed_sectors, 4);
        // The untouched state at the barrier is a valid crash state too.
        assert!(h.check(Seq(4), &h.state_at(Seq(2))).unwrap().is_consistent());
    }

    #[test]
    fn rejects_a_lost_write_ordered_before_the_barrier() {
        let h = sample();
        let mut image = h.state_at(Seq(5));
        set(&mut image, 5, 0xB); // C (seq 4) completed before the bookmark at seq 5: lost
        let v = h.check(Seq(5), &image).unwrap();
        assert!(!v.is_consistent());
        assert_eq!(v.bad_sectors, 1);
        assert_eq!(v.lost_writes.iter().copied().collect::<Vec<_>>(), [Seq(4)]);
        let bad = &v.violations[0];
        assert_eq!(bad.sector, 5);
        assert!(!bad.unflushed);
        assert_eq!(bad.allowed, [Origin::Write(Seq(4))]);
        assert_eq!(bad.found, [Origin::Write(Seq(3))]);
        let report = v.to_string();
        assert!(report.contains("sector 5 (bytes 2560..3072)"), "{report}");
        assert!(report.contains("must hold the data of write seq 4"), "{report}");
        assert!(report.contains("holds the data of write seq 3"), "{report}");
    }

    #[test]
    fn rejects_foreign_content_in_an_unflushed_sector() {
        let h = sample();
        let mut image = h.state_at(Seq(4));
        image[3 * SECTOR as usize + 17] ^= 0x55; // a sector B touched, holding neither A nor B
        let v = h.check(Seq(4), &image).unwrap();
        assert_eq!(v.bad_sectors, 1, "{v}");
        assert!(v.lost_writes.is_empty(), "an unflushed sector loses no acknowledged write");
        let bad = &v.violations[0];
        assert!(bad.unflushed);
        assert_eq!(bad.allowed, [Origin::Write(Seq(1)), Origin::Write(Seq(3))]);
        assert!(bad.found.is_empty());
        assert!(v.to_string().contains("no event of the history put there"), "{v}");
    }

    #[test]
    fn rejects_foreign_content_in_a_durable_sector() {
        let h = sample();
        let mut image = h.state_at(Seq(5));
        set(&mut image, 7, 0xEE);
        let v = h.check(Seq(5), &image).unwrap();
        assert_eq!(v.bad_sectors, 1);
        assert_eq!(v.initial_content_lost, 1);
        assert_eq!(v.violations[0].allowed, [Origin::Initial]);
        assert!(v.violations[0].found.is_empty());
    }

    #[test]
    fn rejects_a_write_reordered_before_the_barrier_it_follows() {
        let h = sample();
        // At the barrier (seq 2), sector 2 shows B (seq 3), issued after the barrier.
        let mut image = h.state_at(Seq(2));
        set(&mut image, 2, 0xB);
        let v = h.check(Seq(2), &image).unwrap();
        assert_eq!(v.bad_sectors, 1, "{v}");
        assert_eq!(v.violations[0].allowed, [Origin::Write(Seq(1))]);
        assert_eq!(v.violations[0].found, [Origin::Write(Seq(3))]);
        assert_eq!(v.lost_writes.iter().copied().collect::<Vec<_>>(), [Seq(1)]);
    }

    #[test]
    fn rejects_an_older_write_persisted_over_a_newer_one_across_a_barrier() {
        // A (seq 1) then barrier then D over the same sectors (seq 6) then more: at the end
        // sector 0 must hold D; A there means D was lost or reordered before A.
        let mut h = sample();
        h.push(Seq(8), Event::Barrier).unwrap();
        let mut image = h.state_at(Seq(8));
        set(&mut image, 0, 0xA);
        let v = h.check(Seq(8), &image).unwrap();
        assert_eq!(v.bad_sectors, 1);
        assert_eq!(v.violations[0].allowed, [Origin::Write(Seq(6))]);
        assert_eq!(v.violations[0].found, [Origin::Write(Seq(1))]);
        assert_eq!(v.lost_writes.iter().copied().collect::<Vec<_>>(), [Seq(6)]);
    }

    #[test]
    fn rejects_data_from_after_the_point() {
        let h = sample();
        // At seq 6 (bookmark at 5, D unflushed), sectors 4..6 show the zeroes of seq 7.
        let mut image = h.state_at(Seq(6));
        set(&mut image, 4, 0);
        let v = h.check(Seq(6), &image).unwrap();
        assert_eq!(v.bad_sectors, 1, "{v}");
        let bad = &v.violations[0];
        assert!(!bad.unflushed);
        assert_eq!(bad.allowed, [Origin::Write(Seq(3))]);
        assert!(bad.found.contains(&Origin::WriteZeroes(Seq(7))), "{v}");
        assert!(bad.found.contains(&Origin::Initial), "{v}");
    }

    #[test]
    fn discards_and_write_zeroes_leave_zeros() {
        let mut h = sample();
        h.push(Seq(8), Event::Discard { volume: V, offset: 0, len: SECTOR as u32 }).unwrap();
        h.push(Seq(9), Event::Barrier).unwrap();
        let image = h.state_at(Seq(9));
        assert!(image[..SECTOR as usize].iter().all(|&b| b == 0));
        assert!(h.check(Seq(9), &image).unwrap().is_consistent());
        let mut stale = image.clone();
        set(&mut stale, 0, 0xD);
        let v = h.check(Seq(9), &stale).unwrap();
        assert_eq!(v.lost_writes.iter().copied().collect::<Vec<_>>(), [Seq(8)]);
        assert!(v.to_string().contains("must hold the data of discard seq 8"), "{v}");
    }

    #[test]
    fn many_wrong_sectors_are_counted_and_the_first_explained() {
        let mut h = History::zeroed(V, 64 * SECTOR).unwrap();
        h.push(Seq(1), write(0, 1, 64)).unwrap();
        h.push(Seq(2), Event::Barrier).unwrap();
        let v = h.check(Seq(2), &vec![0u8; (64 * SECTOR) as usize]).unwrap();
        assert_eq!(v.bad_sectors, 64);
        assert_eq!(v.violations.len(), MAX_DETAILED);
        assert_eq!(v.lost_writes.len(), 1);
        assert!(v.to_string().contains("and 48 more wrong sectors"), "{v}");
    }

    #[test]
    fn histories_refuse_what_the_checker_cannot_reason_about() {
        let mut h = History::zeroed(V, LEN).unwrap();
        h.push(Seq(2), Event::Barrier).unwrap();
        assert!(matches!(h.push(Seq(2), Event::Barrier), Err(HistoryError::OutOfOrder { .. })));
        let unaligned = Event::Write { volume: V, offset: 100, data: fill(1, 1) };
        assert!(matches!(h.push(Seq(3), unaligned), Err(HistoryError::Unaligned { .. })));
        assert!(matches!(h.push(Seq(3), write(7, 1, 2)), Err(HistoryError::OutOfRange { .. })));
        let resync = Event::ResyncBegin { id: 1 };
        assert!(matches!(h.push(Seq(3), resync), Err(HistoryError::Resync { .. })));
        // Another volume's write is not this history's business.
        let other = Event::Write { volume: VolumeId(1), offset: 100, data: fill(1, 1) };
        h.push(Seq(3), other).unwrap();
        assert_eq!(h.events().len(), 1);
        assert!(matches!(History::zeroed(V, 1000), Err(HistoryError::InitialImage { len: 1000 })));
    }

    #[test]
    fn checker_moves_forward_only_and_within_the_history() {
        let h = sample();
        let mut c = h.checker();
        c.check(Seq(5), &h.state_at(Seq(5))).unwrap();
        assert!(matches!(c.check(Seq(4), &h.state_at(Seq(4))), Err(CheckError::Backwards { .. })));
        assert!(matches!(
            c.check(Seq(9), &h.state_at(Seq(7))),
            Err(CheckError::PastHistory { .. })
        ));
        assert!(matches!(c.check(Seq(7), &[0u8; 512]), Err(CheckError::ImageLength { .. })));
        assert_eq!(h.flush_points(), [Seq(2), Seq(5)]);
    }
}
