//! The spool: the source's durable FIFO of captured events between the tap and the shipper.
//!
//! Appends take the next sequence number; the shipper reads from the oldest unacknowledged
//! event; an acknowledgement trims everything up to a sequence number, deleting whole
//! segments once every record in them is acknowledged. The acknowledged point is recorded
//! in the manifest when segments are dropped (and on [`Spool::close`]); after a crash a
//! few acknowledged events may be offered again, which the target recognises by sequence
//! number, but an unacknowledged event is never lost.
//!
//! Invariant: the spool never drops an unacknowledged event. When an append would exceed
//! the capacity it is refused with [`JournalError::SpoolOverflow`], and the caller tracks
//! the event's region as dirty instead.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::clock::Clock;
use crate::crypto::JournalKey;
use crate::error::{JournalError, Result};
use crate::format::{self, Role};
use crate::io::Dir;
use crate::log::{Loc, LogOptions, OpenReport, RecordSpec, SegmentLog, SyncTicket};
use crate::types::{Event, Nanos, Seq};

/// Settings of a spool.
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    /// Most bytes of unacknowledged records held (the seed design's default is 8 GiB).
    pub capacity_bytes: u64,
    /// Segment size.
    pub segment_bytes: u64,
    /// Encryption at rest.
    pub key: Option<JournalKey>,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self { capacity_bytes: 8 << 30, segment_bytes: 64 << 20, key: None }
    }
}

/// An event read back from the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpooledEvent {
    /// Its sequence number.
    pub seq: Seq,
    /// When it was captured.
    pub time: Nanos,
    /// The event.
    pub event: Event,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    seq: Seq,
    loc: Loc,
    bytes: u64,
    /// When it was captured (for [`Spool::oldest_unacked_time`]).
    time: Nanos,
    /// A resync window marker (`ResyncBegin` / `ResyncEnd`), for [`Spool::markers_after`].
    marker: bool,
}

/// The source-side spool (see the module documentation).
#[derive(Debug)]
pub struct Spool {
    log: SegmentLog,
    pending: VecDeque<Pending>,
    acked: Seq,
    used: u64,
    capacity: u64,
    clock: Arc<dyn Clock>,
}

impl Spool {
    /// Opens or creates the spool in `dir`.
    pub fn open(
        dir: Arc<dyn Dir>,
        cfg: SpoolConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<(Self, OpenReport)> {
        let opts = LogOptions {
            role: Role::Spool,
            segment_bytes: cfg.segment_bytes,
            key: cfg.key.clone(),
            block_size: 4096,
            create: true,
        };
        let mut all = Vec::new();
        let (log, report) = SegmentLog::open(dir, opts, clock.clone(), &mut |v| {
            all.push(Pending {
                seq: v.header.seq,
                loc: v.loc,
                bytes: v.header.total_len(),
                time: v.header.time,
                marker: is_marker(v.header.kind),
            });
        })?;
        let acked = log.manifest().base_seq;
        let pending: VecDeque<Pending> = all.into_iter().filter(|p| p.seq > acked).collect();
        let used = pending.iter().map(|p| p.bytes).sum();
        Ok((Self { log, pending, acked, used, capacity: cfg.capacity_bytes, clock }, report))
    }

    /// Appends an event, assigning it the next sequence number. Not durable until
    /// [`Spool::sync`]. Refused with [`JournalError::SpoolOverflow`] when full.
    pub fn append(&mut self, event: &Event) -> Result<Seq> {
        let (kind, volume, offset, length, payload) = format::event_to_record(event);
        let needed = self.log.stored_len(payload.len());
        if self.used + needed > self.capacity {
            return Err(JournalError::SpoolOverflow {
                capacity: self.capacity,
                used: self.used,
                needed,
            });
        }
        let seq = self.log.last_seq().next();
        let time = self.clock.now();
        let spec = RecordSpec { kind, volume, seq, time, offset, length };
        let loc = self.log.append(spec, &payload)?;
        self.used += needed;
        self.pending.push_back(Pending { seq, loc, bytes: needed, time, marker: is_marker(kind) });
        Ok(seq)
    }

    /// Group commit: makes every appended event durable; returns the durable sequence number.
    pub fn sync(&mut self) -> Result<Seq> {
        self.log.sync()
    }

    /// Group commit without holding the spool during the disk wait: see
    /// [`SegmentLog::begin_sync`]. Typical use with the spool behind a mutex: take the lock,
    /// `begin_sync`, drop the lock, `ticket.wait()`, take the lock, `end_sync`.
    pub fn begin_sync(&mut self) -> Result<SyncTicket> {
        self.log.begin_sync()
    }

    /// Records the outcome of a ticket's wait; returns the durable sequence number.
    pub fn end_sync(&mut self, outcome: Result<Seq>) -> Result<Seq> {
        self.log.end_sync(outcome)
    }

    /// Writes buffered events to the file without waiting for the disk.
    pub fn flush(&mut self) -> Result<()> {
        self.log.flush()
    }

    /// Up to `max_bytes` of durable, unacknowledged events with sequence numbers above
    /// `after` (at least one event when any is there).
    ///
    /// Only durable events are offered: a sequence number is final once durable, but an
    /// event lost in a crash before its sync has its number given to the next event, so a
    /// target that had seen the lost one would mistake the new one for a duplicate.
    pub fn read_after(&self, after: Seq, max_bytes: u64) -> Result<Vec<SpooledEvent>> {
        let start = self.pending.partition_point(|p| p.seq <= after);
        let durable = self.log.durable_seq();
        let mut out = Vec::new();
        let mut bytes = 0;
        for p in self.pending.iter().skip(start).take_while(|p| p.seq <= durable) {
            if !out.is_empty() && bytes + p.bytes > max_bytes {
                break;
            }
            let (h, payload) = self.log.read(p.loc)?;
            let seg = self.log.segment_name(p.loc.slot);
            let event = format::record_to_event(&h, payload).map_err(|reason| {
                JournalError::CorruptRecord {
                    segment: seg,
                    offset: u64::from(p.loc.offset),
                    reason,
                }
            })?;
            out.push(SpooledEvent { seq: h.seq, time: h.time, event });
            bytes += p.bytes;
        }
        Ok(out)
    }

    /// The resync window markers (`ResyncBegin`, `ResyncEnd`) among the unacknowledged
    /// events after `after`, durable or not, in order: what the target will learn about its
    /// windows once the backlog reaches it. Reads only the marker records.
    pub fn markers_after(&self, after: Seq) -> Result<Vec<(Seq, Event)>> {
        let start = self.pending.partition_point(|p| p.seq <= after);
        let mut out = Vec::new();
        for p in self.pending.iter().skip(start).filter(|p| p.marker) {
            let (h, payload) = self.log.read(p.loc)?;
            let event = format::record_to_event(&h, payload).map_err(|reason| {
                JournalError::CorruptRecord {
                    segment: self.log.segment_name(p.loc.slot),
                    offset: u64::from(p.loc.offset),
                    reason,
                }
            })?;
            out.push((h.seq, event));
        }
        Ok(out)
    }

    /// Acknowledges every event up to `upto`: they may be discarded. Whole segments whose
    /// records are all acknowledged are deleted.
    pub fn ack(&mut self, upto: Seq) -> Result<()> {
        if upto <= self.acked {
            return Ok(());
        }
        let upto = upto.min(self.log.last_seq());
        while let Some(p) = self.pending.front() {
            if p.seq > upto {
                break;
            }
            self.used -= p.bytes;
            self.pending.pop_front();
        }
        self.acked = upto;
        let done: Vec<u32> = self
            .log
            .segments()
            .iter()
            .filter(|s| !s.active && s.last_seq.is_none_or(|l| l <= upto))
            .map(|s| s.slot)
            .collect();
        if !done.is_empty() {
            self.log.replace_segments(&done, &[], |m| m.base_seq = upto)?;
        }
        Ok(())
    }

    /// Syncs and records the acknowledged point durably, without closing.
    pub fn checkpoint(&mut self) -> Result<()> {
        self.log.sync()?;
        let acked = self.acked;
        self.log.update_manifest(|m| m.base_seq = acked)
    }

    /// Records the acknowledged point durably (call on clean shutdown).
    pub fn close(mut self) -> Result<()> {
        self.checkpoint()
    }

    /// The highest acknowledged sequence number.
    pub fn acked(&self) -> Seq {
        self.acked
    }

    /// The highest sequence number appended.
    pub fn last_seq(&self) -> Seq {
        self.log.last_seq()
    }

    /// The highest sequence number known durable.
    pub fn durable_seq(&self) -> Seq {
        self.log.durable_seq()
    }

    /// The capacity: bytes of unacknowledged records beyond which appends are refused.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity
    }

    /// Bytes of unacknowledged records (what the capacity limits).
    pub fn backlog_bytes(&self) -> u64 {
        self.used
    }

    /// Number of unacknowledged events.
    pub fn backlog_events(&self) -> usize {
        self.pending.len()
    }

    /// The capture time of the oldest unacknowledged event (durable or not), `None` when
    /// every event is acknowledged: how far behind the target is (the pair's RPO).
    pub fn oldest_unacked_time(&self) -> Option<Nanos> {
        self.pending.front().map(|p| p.time)
    }

    /// Bytes the spool's files take on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.log.bytes()
    }
}

fn is_marker(kind: format::RecordKind) -> bool {
    kind.is_resync()
}
