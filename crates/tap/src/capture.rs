//! The in-process capture API: a [`Tap`] in front of one protected device, for embedders (a
//! VMM, a storage target) that hand it writes, write-zeroes, discards, flushes and bookmarks.
//!
//! This module owns the capture order and the completion policy. For each write the tap:
//! 1. marks the regions it touches in the write-intent map, durably, before anything else,
//!    and takes the write's ordering ticket;
//! 2. passes the write through to the protected device (once no earlier overlapping
//!    mutation is unfinished);
//! 3. appends the capture event to the spool, which assigns its sequence number, and
//!    releases the ticket.
//!
//! **Two ways in.** The synchronous calls ([`Tap::write`], [`Tap::write_fua`],
//! [`Tap::write_zeroes`], [`Tap::discard`], [`Tap::flush`], [`Tap::bookmark`]) run all three
//! steps, the device I/O through [`BlockIo`]. A frontend that issues the device I/O itself
//! (the ublk frontend, with io_uring ops on the device's descriptor) uses the split calls
//! instead: [`Tap::begin_mutation`] (step 1; never waits for other writes), then the device
//! I/O once [`Tap::may_issue`] says so, then [`Tap::finish_write`] or [`Tap::finish_range`]
//! (step 3); for a flush [`Tap::begin_flush`] (the barrier), the device sync, then
//! [`Tap::wait_durable`] under the spooled policy. The synchronous calls are built on the
//! split ones, so both follow one path. A [`PendingMutation`] dropped unfinished (its device
//! I/O failed) leaves its regions out of sync in the intent map and releases its ticket.
//!
//! **Overlapping mutations.** Two writes (or discards, write-zeroes) in flight together
//! whose ranges overlap could reach the device in one order and the spool in the other.
//! Tickets prevent it: a mutation may be issued to the device only once every mutation begun
//! before it and overlapping it has finished (appended its event). Overlapping mutations thus
//! reach the device and the spool in the order they were begun; disjoint ones run
//! concurrently. (The block layer gives concurrent overlapping writes no order; any one
//! order, the same on both sides, is right.)
//!
//! **The order rule.** Events enter the spool in one total order, under one lock. A write is
//! appended after its backing write completed and before the frontend reports its
//! completion; a flush or a bookmark appends its barrier when it is issued, before it syncs
//! the device. Hence *a write that completed before a flush was issued is ordered before
//! that flush*. A write still in flight when the flush was issued may land on either side
//! of the barrier; either way the recovery point at the barrier is a state the device could
//! have been in after a power cut, since the flush promises nothing about writes that had
//! not completed. A FUA write is followed by a barrier (its data is durable when it
//! completes). Consecutive flushes with nothing between them give one barrier.
//!
//! **Completion policy.** [`CompletionPolicy::Backing`] (the default, asynchronous
//! replication) completes a call once the backing write is done and the event is appended;
//! [`CompletionPolicy::Spooled`] also waits until the spool holds it durably (group commit).
//! Under both, the intent map marks the region durably before the backing write, so a crash
//! never leaves an unacknowledged write uncovered.
//!
//! **Overflow.** When the spool refuses an event (full, or failing), the write is not lost:
//! its regions stay dirty in the intent map as out of sync, the tap enters the overflow
//! state ([`TapStatus::overflow`]) and stops spooling (later events would leave a gap in the
//! replica's history anyway), tracking every further write in the intent map only, until the
//! caller resyncs the regions [`Tap::resume_spooling`] returns.
//!
//! **Hot bound.** When the intent map refuses a mark because too many regions are hot,
//! [`HotFullPolicy`] decides: wait for acknowledgements (back-pressure), or mark the range out
//! of sync at once. The application's write is never failed for replication's sake.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tidemark_journal::{
    BlockIo, Bookmark, Event, JournalError, Seq, Spool, SpooledEvent, VolumeId,
};

use crate::error::{Result, TapError};
use crate::gate::{HoldStatus, WriteGate, WriteHold};
use crate::intent::{IntentMap, IntentStatus, WriteIntent};
use crate::regions::{RegionRun, RegionSet};

/// Default largest write event; larger writes are split into several events.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1 << 20;
/// Write-zeroes and discard events are split at this length so that it fits their `u32`.
const MAX_RANGE_EVENT: u64 = 1 << 30;
/// Size of the zero buffer written to the device for write-zeroes and discards.
const ZERO_CHUNK: u64 = 1 << 20;

/// When a call into the tap completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompletionPolicy {
    /// After the backing write (and the event's append to the spool, not yet durable).
    #[default]
    Backing,
    /// After the backing write and a durable spool append.
    Spooled,
}

/// What the tap does when the intent map's hot bound refuses a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HotFullPolicy {
    /// Mark the range out of sync at once (it will be resynced); never blocks.
    #[default]
    TrackOutOfSync,
    /// Block up to this long for acknowledgements to free regions, then mark out of sync.
    Wait(Duration),
}

/// Settings of a tap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapConfig {
    /// The volume's index in its consistency group.
    pub volume: VolumeId,
    /// When calls complete.
    pub completion: CompletionPolicy,
    /// What to do when the hot bound is reached.
    pub hot_full: HotFullPolicy,
    /// Largest write event (at most the journal's largest record payload).
    pub max_event_bytes: usize,
}

impl Default for TapConfig {
    fn default() -> Self {
        Self {
            volume: VolumeId(0),
            completion: CompletionPolicy::Backing,
            hot_full: HotFullPolicy::TrackOutOfSync,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
        }
    }
}

/// Where a call's event went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Captured {
    /// Appended to the spool with this sequence number (the last one when the call gave
    /// several events).
    Spooled(Seq),
    /// Not in the spool (overflow): the range is out of sync in the intent map, or for a
    /// barrier, the point is lost until a resync.
    OutOfSync,
    /// Nothing to capture (an empty range).
    Nothing,
}

/// The tap is not spooling: since when and what it tracked instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverflowState {
    /// The last sequence number in the spool when spooling stopped.
    pub last_spooled: Seq,
    /// Why the spool refused the event.
    pub cause: String,
    /// Writes, write-zeroes and discards tracked in the intent map instead.
    pub events_not_spooled: u64,
    /// Their bytes.
    pub bytes_not_spooled: u64,
    /// Flushes and bookmarks not recorded.
    pub points_not_spooled: u64,
}

/// Counters of a tap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapStatus {
    /// Set while the tap is not spooling.
    pub overflow: Option<OverflowState>,
    /// The write-intent map's counters and bounds.
    pub intent: IntentStatus,
    /// Highest sequence number appended.
    pub last_seq: Seq,
    /// Highest sequence number durable in the spool.
    pub durable_seq: Seq,
    /// Highest sequence number acknowledged by the target.
    pub acked: Seq,
    /// Bytes of unacknowledged events in the spool.
    pub backlog_bytes: u64,
    /// Writes, write-zeroes and discards passed through to the device.
    pub writes: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Writes whose range the hot bound sent out of sync.
    pub hot_full_events: u64,
    /// The last bookmark appended to the spool since the tap started: its seq and name.
    pub last_bookmark: Option<(Seq, String)>,
}

#[derive(Debug)]
struct Capture {
    /// Shared with the shipper, which reads and trims it. Lock order: the capture lock,
    /// then the spool's; the shipper takes only the spool's.
    spool: Arc<Mutex<Spool>>,
    overflow: Option<OverflowState>,
    last_was_barrier: bool,
    writes: u64,
    bytes: u64,
    hot_full_events: u64,
    last_bookmark: Option<(Seq, String)>,
}

/// The capture pipeline of one protected device (see the module documentation).
#[derive(Debug)]
pub struct Tap {
    device: Arc<dyn BlockIo>,
    device_name: String,
    /// The size the tap serves: the intent map's (it grows with [`Tap::grow`]).
    device_len: AtomicU64,
    intent: IntentMap,
    /// Regions a growth added that the pair has not taken yet ([`Tap::take_grown`]): the
    /// resize's seq and the runs.
    grown: Mutex<Vec<(Seq, RegionRun)>>,
    cfg: TapConfig,
    capture: Mutex<Capture>,
    order: Arc<ArrivalOrder>,
    /// Write holds for consistency-group bookmarks (`crate::gate`).
    gate: WriteGate,
}

impl Tap {
    /// A tap over `device`, appending to `spool` and marking `intent` (which must cover a
    /// volume of the device's length).
    pub fn new(
        device: Arc<dyn BlockIo>,
        spool: Spool,
        intent: IntentMap,
        cfg: TapConfig,
    ) -> Result<Tap> {
        Self::with_shared_spool(device, Arc::new(Mutex::new(spool)), intent, cfg)
    }

    /// As [`Tap::new`], with a spool shared with a shipper (which reads and trims it).
    pub fn with_shared_spool(
        device: Arc<dyn BlockIo>,
        spool: Arc<Mutex<Spool>>,
        intent: IntentMap,
        cfg: TapConfig,
    ) -> Result<Tap> {
        let device_name = device.name();
        let device_len =
            device.len().map_err(|e| TapError::io("length query", device_name.clone(), e))?;
        // A device larger than the map grew while nothing was protecting it: the tap serves
        // the map's size until [`Tap::grow`] tells the target.
        let volume_bytes = intent.header().volume_bytes;
        if volume_bytes > device_len {
            return Err(TapError::Config(format!(
                "write-intent map {} covers {volume_bytes} bytes, device {device_name} holds {device_len} (a protected volume does not shrink)",
                intent.name()
            )));
        }
        let device_len = volume_bytes;
        if cfg.max_event_bytes == 0 || cfg.max_event_bytes > tidemark_journal::format::MAX_PAYLOAD {
            return Err(TapError::Config(format!(
                "max_event_bytes {} is not from 1 to {}",
                cfg.max_event_bytes,
                tidemark_journal::format::MAX_PAYLOAD
            )));
        }
        let capture = Capture {
            spool,
            overflow: None,
            last_was_barrier: false,
            writes: 0,
            bytes: 0,
            hot_full_events: 0,
            last_bookmark: None,
        };
        Ok(Tap {
            device,
            device_name,
            device_len: AtomicU64::new(device_len),
            intent,
            grown: Mutex::new(Vec::new()),
            cfg,
            capture: Mutex::new(capture),
            order: Arc::new(ArrivalOrder::default()),
            gate: WriteGate::default(),
        })
    }

    /// The spool, shared: hand it to a shipper.
    pub fn shared_spool(&self) -> Arc<Mutex<Spool>> {
        self.lock().spool.clone()
    }

    fn lock(&self) -> MutexGuard<'_, Capture> {
        // Every update of the capture state is complete before any call that can panic.
        self.capture.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads `buf.len()` bytes at byte `offset` from the protected device. Reads are not
    /// captured; a kernel frontend serves them here so that it needs no second handle on
    /// the device.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.device
            .read_at(buf, offset)
            .map_err(|e| TapError::io("read", self.device_name.clone(), e))
    }

    /// Hints that `len` bytes at `offset` of the protected device will be read soon (a
    /// resync hashing the device): a device on a disk starts reading them in the background.
    pub fn will_need(&self, offset: u64, len: u64) {
        let _ = self.device.will_need(offset, len);
    }

    /// Length of the protected volume in bytes (grows with [`Tap::grow`]).
    pub fn device_len(&self) -> u64 {
        self.device_len.load(Ordering::SeqCst)
    }

    /// The protected device's own length now (larger than [`Tap::device_len`] when it
    /// grew and [`Tap::grow`] has not followed yet).
    pub fn backing_len(&self) -> Result<u64> {
        self.device.len().map_err(|e| TapError::io("length query", self.device_name.clone(), e))
    }

    /// The protected volume grew to `new_len` (the device already holds that many bytes):
    /// in this order, a [`Event::Resize`] appended to the spool and made durable (ordered
    /// after every write completed before and before every write into the new range), the
    /// intent map grown with the new range out of sync (durable), then the new size served.
    /// The pair resyncs the new range ([`Tap::take_grown`]): only its differences from
    /// zeros move. A crash between the steps repeats the growth on the next start (the map
    /// still has the old size), and the target takes a repeated resize as a no-op.
    /// Refused: a smaller size ([`TapError::Shrink`], nothing changes), a device shorter
    /// than `new_len`, and growth while the tap is not spooling (retry after the overflow).
    /// Returns the resize's seq, or `None` when the size is already `new_len`.
    pub fn grow(&self, new_len: u64) -> Result<Option<Seq>> {
        // One growth at a time.
        let mut grown = self.grown.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.device_len();
        if new_len < old {
            return Err(TapError::Shrink {
                object: format!("protected device {}", self.device_name),
                size: old,
                new_size: new_len,
            });
        }
        if new_len == old && self.intent.volume_bytes() == old {
            return Ok(None);
        }
        let backing = self.backing_len()?;
        if backing < new_len {
            return Err(TapError::OutOfRange {
                object: format!("protected device {}", self.device_name),
                offset: 0,
                len: new_len,
                object_len: backing,
            });
        }
        let event = Event::Resize { volume: self.cfg.volume, old_size: old, new_size: new_len };
        let seq = {
            let mut c = self.lock();
            if let Some(ov) = &c.overflow {
                return Err(TapError::NotSpooling {
                    what: format!("a growth to {new_len} bytes"),
                    cause: ov.cause.clone(),
                });
            }
            let appended = lock_spool(&c.spool).append(&event);
            match appended {
                Ok(seq) => seq,
                Err(e) => {
                    Self::enter_overflow(&mut c, &e);
                    return Err(TapError::Spool { op: "append", source: e });
                }
            }
        };
        // Durable before the map says the new size: a map that covers a range the target
        // was never told about would leave it behind for good.
        while self.sync_spool()? < seq {}
        let run = self.intent.grow(new_len)?;
        self.device_len.store(new_len, Ordering::SeqCst);
        grown.extend(run.map(|run| (seq, run)));
        tracing::info!(device = %self.device_name, old, new = new_len, %seq, "protected volume grew");
        Ok(Some(seq))
    }

    /// The regions growths added since the last call, with the seq of each resize: the
    /// pair resyncs them once the target acknowledged the resize (before that the replica
    /// does not have the range to compare).
    pub fn take_grown(&self) -> Vec<(Seq, RegionRun)> {
        std::mem::take(&mut *self.grown.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Writes `data` at byte `offset`.
    pub fn write(&self, offset: u64, data: Bytes) -> Result<Captured> {
        self.write_inner(offset, data, false)
    }

    /// Writes `data` at byte `offset` with FUA: durable on the device when this returns, and
    /// followed by a barrier in the capture stream.
    pub fn write_fua(&self, offset: u64, data: Bytes) -> Result<Captured> {
        self.write_inner(offset, data, true)
    }

    fn write_inner(&self, offset: u64, data: Bytes, fua: bool) -> Result<Captured> {
        let len = data.len() as u64;
        self.check_range(offset, len)?;
        if len == 0 {
            return if fua { self.flush() } else { Ok(Captured::Nothing) };
        }
        let pending = self.begin_mutation(Mutation::Write { fua }, offset, len)?;
        self.wait_issue(&pending);
        self.device
            .write_at(&data, offset)
            .map_err(|e| TapError::io("write", self.device_name.clone(), e))?;
        if fua {
            self.sync_device()?;
        }
        let captured = self.finish_write(pending, data)?;
        self.wait_durable(captured)
    }

    /// Sets `len` bytes at `offset` to zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<Captured> {
        self.zero_range(offset, len, Mutation::WriteZeroes)
    }

    /// Discards `len` bytes at `offset`. The device has no discard through [`BlockIo`], so
    /// the range is written with zeros, which is also what the replica stores.
    pub fn discard(&self, offset: u64, len: u64) -> Result<Captured> {
        self.zero_range(offset, len, Mutation::Discard)
    }

    fn zero_range(&self, offset: u64, len: u64, kind: Mutation) -> Result<Captured> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(Captured::Nothing);
        }
        let pending = self.begin_mutation(kind, offset, len)?;
        self.wait_issue(&pending);
        let zeros = vec![0u8; len.min(ZERO_CHUNK) as usize];
        let mut done = 0;
        while done < len {
            let piece = (len - done).min(ZERO_CHUNK) as usize;
            self.device
                .write_at(&zeros[..piece], offset + done)
                .map_err(|e| TapError::io("write", self.device_name.clone(), e))?;
            done += piece as u64;
        }
        let captured = self.finish_range(pending)?;
        self.wait_durable(captured)
    }

    /// A flush: orders a barrier after every write completed so far, then makes the device
    /// durable.
    pub fn flush(&self) -> Result<Captured> {
        let captured = self.begin_flush();
        self.sync_device()?;
        self.wait_durable(captured)
    }

    /// A named consistency point: a barrier with a name, then a device flush.
    pub fn bookmark(&self, bookmark: Bookmark) -> Result<Captured> {
        let captured = self.begin_bookmark(bookmark);
        self.sync_device()?;
        self.wait_durable(captured)
    }

    /// Holds writes for a consistency-group bookmark (`crate::gate`): until
    /// [`Tap::release_writes`] or the end of `lease`, [`Tap::begin_mutation`] admits no new
    /// mutation (mutations already begun finish). One hold at a time.
    pub fn hold_writes(&self, lease: Duration) -> Result<WriteHold> {
        self.gate.hold(lease).map_err(TapError::Hold)
    }

    /// Ends the hold `token`; an error when it is not in force any more (its lease ran
    /// out: writes resumed already).
    pub fn release_writes(&self, token: u64) -> Result<()> {
        self.gate.release(token).map_err(TapError::Hold)
    }

    /// Appends `bookmark` while the hold `token` is in force, then syncs the device as
    /// [`Tap::bookmark`] does. Refused, with nothing appended, when the hold is not in force
    /// (its lease ran out: writes were admitted since it started).
    pub fn bookmark_held(&self, token: u64, bookmark: Bookmark) -> Result<Captured> {
        let captured = self
            .gate
            .while_held(token, || self.begin_bookmark(bookmark))
            .map_err(TapError::Hold)?;
        self.sync_device()?;
        self.wait_durable(captured)
    }

    /// The write gate's hold in force and counters.
    pub fn hold_status(&self) -> HoldStatus {
        self.gate.status()
    }

    /// Split API, step 1 of a mutation (see the module documentation): checks the range,
    /// marks its regions durably in the write-intent map (with the hot-bound policy applied;
    /// this may write and sync the map, and under [`HotFullPolicy::Wait`] wait for
    /// acknowledgements) and takes the mutation's ordering ticket. Never waits for other
    /// mutations. The caller issues the device I/O once [`Tap::may_issue`] is true, then
    /// calls [`Tap::finish_write`] or [`Tap::finish_range`].
    pub fn begin_mutation(&self, kind: Mutation, offset: u64, len: u64) -> Result<PendingMutation> {
        self.check_range(offset, len)?;
        // A write hold in force (a group bookmark being cut) admits nothing until it ends.
        self.gate.pass();
        let intent = self.intent_for(offset, len)?;
        let ticket = (len > 0).then(|| self.order.enter(offset, offset + len));
        Ok(PendingMutation {
            kind,
            offset,
            len,
            intent: Some(intent),
            ticket,
            order: self.order.clone(),
        })
    }

    /// Whether `pending`'s device I/O may be issued now: no mutation begun before it and
    /// overlapping it is unfinished.
    pub fn may_issue(&self, pending: &PendingMutation) -> bool {
        pending.ticket.is_none_or(|t| self.order.may_run(t))
    }

    /// Blocks until `pending`'s device I/O may be issued ([`Tap::may_issue`]).
    pub fn wait_issue(&self, pending: &PendingMutation) {
        if let Some(t) = pending.ticket {
            self.order.wait_turn(t);
        }
    }

    /// Split API, step 3 of a write: its device write of `data` completed (durably, for a
    /// FUA write). Appends its events (and a barrier after a FUA write) and releases its
    /// ticket. Does not wait for the spool's durability: see [`Tap::wait_durable`].
    pub fn finish_write(&self, mut pending: PendingMutation, data: Bytes) -> Result<Captured> {
        let Mutation::Write { fua } = pending.kind else {
            return Err(TapError::Config(format!(
                "finish_write of a {:?} mutation (use finish_range)",
                pending.kind
            )));
        };
        if data.len() as u64 != pending.len {
            return Err(TapError::Config(format!(
                "finish_write with {} bytes of data for a write of {} bytes at byte {}",
                data.len(),
                pending.len,
                pending.offset
            )));
        }
        let step = self.cfg.max_event_bytes;
        let mut events = Vec::with_capacity(data.len().div_ceil(step) + 1);
        let mut at = 0;
        while at < data.len() {
            let end = (at + step).min(data.len());
            events.push(Event::Write {
                volume: self.cfg.volume,
                offset: pending.offset + at as u64,
                data: data.slice(at..end),
            });
            at = end;
        }
        if fua {
            events.push(Event::Barrier);
        }
        Ok(self.finish(&mut pending, &events))
    }

    /// Split API, step 3 of a write-zeroes or discard: the range reads as zeros on the
    /// device. Appends its events and releases its ticket.
    pub fn finish_range(&self, mut pending: PendingMutation) -> Result<Captured> {
        let discard = match pending.kind {
            Mutation::Discard => true,
            Mutation::WriteZeroes => false,
            Mutation::Write { .. } => {
                return Err(TapError::Config(
                    "finish_range of a write (use finish_write)".to_owned(),
                ));
            }
        };
        let (offset, len) = (pending.offset, pending.len);
        let mut events = Vec::new();
        let mut done = 0;
        while done < len {
            let piece = (len - done).min(MAX_RANGE_EVENT);
            let (volume, at, piece32) = (self.cfg.volume, offset + done, piece as u32);
            events.push(if discard {
                Event::Discard { volume, offset: at, len: piece32 }
            } else {
                Event::WriteZeroes { volume, offset: at, len: piece32 }
            });
            done += piece;
        }
        Ok(self.finish(&mut pending, &events))
    }

    fn finish(&self, pending: &mut PendingMutation, events: &[Event]) -> Captured {
        let intent = pending.intent.take().expect("a pending mutation holds its intent");
        let captured = if events.is_empty() {
            // Only an empty range gives no event, and it marked no region.
            intent.record(Seq::ZERO);
            Captured::Nothing
        } else {
            self.append(events, pending.len, intent)
        };
        // The ticket is released only now, after the append: an overlapping mutation begun
        // later reaches the device after this one is in the spool.
        pending.release();
        captured
    }

    /// Split API for a flush: appends the barrier (a write that completed before this call
    /// is ordered before it). The caller then makes the device durable and, when that
    /// succeeded, reports completion after [`Tap::wait_durable`].
    pub fn begin_flush(&self) -> Captured {
        self.append_point(Event::Barrier)
    }

    /// As [`Tap::begin_flush`], for a named consistency point.
    pub fn begin_bookmark(&self, bookmark: Bookmark) -> Captured {
        self.append_point(Event::Bookmark(bookmark))
    }

    /// Whether a call must wait for the spool before completing `captured`: the policy is
    /// [`CompletionPolicy::Spooled`] and the spool does not yet hold it durably.
    pub fn needs_durable(&self, captured: Captured) -> bool {
        let Captured::Spooled(seq) = captured else { return false };
        self.cfg.completion == CompletionPolicy::Spooled
            && lock_spool(&self.lock().spool).durable_seq() < seq
    }

    /// Under [`CompletionPolicy::Spooled`], waits (group commit) until the spool holds
    /// `captured` durably; returns at once under [`CompletionPolicy::Backing`]. A failing
    /// spool sync sends the tap into overflow; the write stays covered by the intent map,
    /// which marked it before the backing write.
    pub fn wait_durable(&self, captured: Captured) -> Result<Captured> {
        self.complete(captured)
    }

    /// The tap's settings.
    pub fn config(&self) -> TapConfig {
        self.cfg
    }

    /// Resync (initial sync, fast resync, failback): appends the current content of `len`
    /// bytes at `offset` of the protected device to the capture stream, as write events, so
    /// that it reaches the replica in order with the application's writes.
    ///
    /// Each piece (at most `max_event_bytes`) is read from the device and appended under
    /// the capture lock, so no application write can be appended between the read and the
    /// append: a write appended before the piece had completed on the device before the
    /// read (the piece holds its data or newer), and one appended after follows it in the
    /// stream. Either way the replica ends with the device's content. All-zero 4 KiB blocks
    /// become write-zeroes ranges, or nothing with [`ZeroBlocks::Skip`] (for a replica
    /// known to be zero there). The intent map is not touched: the device does not change.
    pub fn resync_copy(&self, offset: u64, len: u64, zeros: ZeroBlocks) -> Result<ResyncCopied> {
        self.check_range(offset, len)?;
        let mut copied = ResyncCopied::default();
        let step = self.cfg.max_event_bytes as u64;
        let mut buf = vec![0u8; len.min(step) as usize];
        let mut done = 0;
        while done < len {
            let at = offset + done;
            let piece = (len - done).min(step) as usize;
            let buf = &mut buf[..piece];
            let mut c = self.lock();
            if let Some(ov) = &c.overflow {
                return Err(TapError::NotSpooling {
                    what: format!("resync copy of {piece} bytes at byte {at}"),
                    cause: ov.cause.clone(),
                });
            }
            self.device
                .read_at(buf, at)
                .map_err(|e| TapError::io("read", self.device_name.clone(), e))?;
            let mut spool = lock_spool(&c.spool);
            let mut run_start = 0;
            while run_start < piece {
                let run_zero = is_zero(&buf[run_start..(run_start + RESYNC_BLOCK).min(piece)]);
                let mut run_end = (run_start + RESYNC_BLOCK).min(piece);
                while run_end < piece
                    && is_zero(&buf[run_end..(run_end + RESYNC_BLOCK).min(piece)]) == run_zero
                {
                    run_end = (run_end + RESYNC_BLOCK).min(piece);
                }
                let (volume, ev_at) = (self.cfg.volume, at + run_start as u64);
                let n = (run_end - run_start) as u64;
                let event = if !run_zero {
                    copied.data_bytes += n;
                    Some(Event::Write {
                        volume,
                        offset: ev_at,
                        data: Bytes::copy_from_slice(&buf[run_start..run_end]),
                    })
                } else {
                    copied.zero_bytes += n;
                    // A piece is at most `MAX_PAYLOAD`, well under `u32::MAX`.
                    (zeros == ZeroBlocks::Send).then_some(Event::WriteZeroes {
                        volume,
                        offset: ev_at,
                        len: n as u32,
                    })
                };
                if let Some(event) = event {
                    match spool.append(&event) {
                        Ok(seq) => copied.last_seq = Some(seq),
                        Err(e) => {
                            drop(spool);
                            Self::enter_overflow(&mut c, &e);
                            return Err(TapError::Spool { op: "append", source: e });
                        }
                    }
                }
                run_start = run_end;
            }
            drop(spool);
            c.last_was_barrier = false;
            drop(c);
            done += piece as u64;
        }
        Ok(copied)
    }

    /// Appends a marker event that carries no data and is not a barrier (the resync
    /// window's begin and end), in order with the writes; returns its sequence number.
    pub fn append_marker(&self, event: Event) -> Result<Seq> {
        if event.range().is_some() || matches!(event, Event::Barrier | Event::Bookmark(_)) {
            return Err(TapError::Config(format!(
                "append_marker takes a marker event, not {event:?}"
            )));
        }
        let mut c = self.lock();
        if let Some(ov) = &c.overflow {
            return Err(TapError::NotSpooling {
                what: "a resync marker".to_owned(),
                cause: ov.cause.clone(),
            });
        }
        let appended = lock_spool(&c.spool).append(&event);
        match appended {
            Ok(seq) => {
                c.last_was_barrier = false;
                Ok(seq)
            }
            Err(e) => {
                Self::enter_overflow(&mut c, &e);
                Err(TapError::Spool { op: "append", source: e })
            }
        }
    }

    /// The target acknowledged every event up to `upto`: trims the spool and lets the intent
    /// map clear the regions whose writes are all acknowledged (lazily).
    pub fn acknowledge(&self, upto: Seq) -> Result<()> {
        lock_spool(&self.lock().spool)
            .ack(upto)
            .map_err(|source| TapError::Spool { op: "ack", source })?;
        self.intent.acknowledge(upto);
        Ok(())
    }

    /// Group commit of the spool: makes every event appended so far durable, and so offered
    /// by [`Tap::read_after`]; returns the durable sequence number. Under
    /// [`CompletionPolicy::Backing`] the shipper (or a timer) calls this; the disk wait runs
    /// without holding the tap's lock, so captures go on meanwhile.
    pub fn sync_spool(&self) -> Result<Seq> {
        let ticket = lock_spool(&self.lock().spool)
            .begin_sync()
            .map_err(|source| TapError::Spool { op: "sync", source })?;
        let outcome = ticket.wait();
        lock_spool(&self.lock().spool)
            .end_sync(outcome)
            .map_err(|source| TapError::Spool { op: "sync", source })
    }

    /// Durable, unacknowledged events after `after`, up to about `max_bytes` (for the
    /// shipper). Events not yet durable in the spool are not offered (see
    /// [`Tap::sync_spool`]).
    pub fn read_after(&self, after: Seq, max_bytes: u64) -> Result<Vec<SpooledEvent>> {
        lock_spool(&self.lock().spool)
            .read_after(after, max_bytes)
            .map_err(|source| TapError::Spool { op: "read", source })
    }

    /// Clears the intent map's clean regions on disk now.
    pub fn clear_clean(&self) -> Result<()> {
        self.intent.clear_clean()
    }

    /// Ends the overflow state: events are spooled again from now on. Returns the regions
    /// out of sync, which the caller must resync (and report with
    /// [`IntentMap::resynced`]) before recovery points after the gap can be trusted.
    pub fn resume_spooling(&self) -> RegionSet {
        let mut c = self.lock();
        c.overflow = None;
        c.last_was_barrier = false;
        drop(c);
        self.intent.out_of_sync()
    }

    /// Records that a resync copied `runs` ([`IntentMap::resynced`]), unless the tap is in
    /// overflow: then nothing is cleared and this returns false. A write tracked out of sync
    /// after the resync's copy (the tap overflowed while the resync awaited its
    /// acknowledgement) must not be cleared with the regions the resync copied; the check and
    /// the clearing run under the capture lock, and an overflow marks its regions only after
    /// setting the overflow state under that lock, so no such mark is lost.
    pub fn resynced(&self, runs: impl IntoIterator<Item = RegionRun>) -> bool {
        let c = self.lock();
        if c.overflow.is_some() {
            return false;
        }
        for run in runs {
            self.intent.resynced(run);
        }
        drop(c);
        true
    }

    /// The intent map.
    pub fn intent(&self) -> &IntentMap {
        &self.intent
    }

    /// Runs `f` on the spool (for a shipper that needs more than [`Tap::read_after`]).
    pub fn with_spool<R>(&self, f: impl FnOnce(&mut Spool) -> R) -> R {
        f(&mut lock_spool(&self.lock().spool))
    }

    /// Counters.
    pub fn status(&self) -> TapStatus {
        let intent = self.intent.status();
        let c = self.lock();
        let spool = lock_spool(&c.spool);
        let status = TapStatus {
            overflow: c.overflow.clone(),
            intent,
            last_seq: spool.last_seq(),
            durable_seq: spool.durable_seq(),
            acked: spool.acked(),
            backlog_bytes: spool.backlog_bytes(),
            writes: c.writes,
            bytes: c.bytes,
            hot_full_events: c.hot_full_events,
            last_bookmark: c.last_bookmark.clone(),
        };
        drop(spool);
        drop(c);
        status
    }

    /// Clean shutdown: syncs the device, closes the spool (recording the acknowledged point)
    /// and clears the intent map's clean regions. What stays dirty still needs a resync.
    pub fn close(self) -> Result<()> {
        self.sync_device()?;
        let capture = self.capture.into_inner().unwrap_or_else(|e| e.into_inner());
        lock_spool(&capture.spool)
            .checkpoint()
            .map_err(|source| TapError::Spool { op: "close", source })?;
        self.intent.close()
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let device_len = self.device_len();
        if offset.checked_add(len).is_none_or(|end| end > device_len) {
            return Err(TapError::OutOfRange {
                object: format!("protected device {}", self.device_name),
                offset,
                len,
                object_len: device_len,
            });
        }
        Ok(())
    }

    fn sync_device(&self) -> Result<()> {
        self.device.sync().map_err(|e| TapError::io("fdatasync", self.device_name.clone(), e))
    }

    /// Step 1: the durable intent mark, with the hot-bound policy applied.
    fn intent_for(&self, offset: u64, len: u64) -> Result<WriteIntent> {
        match self.intent.mark(offset, len) {
            Err(TapError::HotRegionsFull { .. }) => {}
            other => return other,
        }
        if let HotFullPolicy::Wait(timeout) = self.cfg.hot_full {
            if self.intent.wait_for_room(offset, len, timeout)? {
                match self.intent.mark(offset, len) {
                    Err(TapError::HotRegionsFull { .. }) => {}
                    other => return other,
                }
            }
        }
        self.lock().hot_full_events += 1;
        tracing::warn!(
            map = self.intent.name(),
            offset,
            len,
            "write-intent hot bound reached: range tracked out of sync"
        );
        self.intent.mark_out_of_sync(offset, len)
    }

    /// Step 3: appends a write's events in one go; on refusal the write's regions go out of
    /// sync and the tap stops spooling.
    fn append(&self, events: &[Event], bytes: u64, intent: WriteIntent) -> Captured {
        let mut c = self.lock();
        c.writes += 1;
        c.bytes += bytes;
        if let Some(ov) = c.overflow.as_mut() {
            ov.events_not_spooled += 1;
            ov.bytes_not_spooled += bytes;
            drop(c);
            intent.out_of_sync();
            return Captured::OutOfSync;
        }
        let mut last = None;
        for event in events {
            let appended = lock_spool(&c.spool).append(event);
            match appended {
                Ok(seq) => last = Some(seq),
                Err(e) => {
                    Self::enter_overflow(&mut c, &e);
                    if let Some(ov) = c.overflow.as_mut() {
                        ov.events_not_spooled += 1;
                        ov.bytes_not_spooled += bytes;
                    }
                    drop(c);
                    intent.out_of_sync();
                    return Captured::OutOfSync;
                }
            }
        }
        c.last_was_barrier = matches!(events.last(), Some(Event::Barrier));
        drop(c);
        match last {
            Some(seq) => {
                intent.record(seq);
                Captured::Spooled(seq)
            }
            None => Captured::Nothing,
        }
    }

    /// Appends a barrier or bookmark (a barrier right after a barrier is not repeated).
    fn append_point(&self, event: Event) -> Captured {
        let mut c = self.lock();
        if let Some(ov) = c.overflow.as_mut() {
            ov.points_not_spooled += 1;
            return Captured::OutOfSync;
        }
        if matches!(event, Event::Barrier) && c.last_was_barrier {
            return Captured::Spooled(lock_spool(&c.spool).last_seq());
        }
        let appended = lock_spool(&c.spool).append(&event);
        match appended {
            Ok(seq) => {
                c.last_was_barrier = matches!(event, Event::Barrier);
                if let Event::Bookmark(b) = &event {
                    c.last_bookmark = Some((seq, b.name.clone()));
                }
                Captured::Spooled(seq)
            }
            Err(e) => {
                Self::enter_overflow(&mut c, &e);
                if let Some(ov) = c.overflow.as_mut() {
                    ov.points_not_spooled += 1;
                }
                Captured::OutOfSync
            }
        }
    }

    fn enter_overflow(c: &mut Capture, e: &JournalError) {
        let mut cause = e.to_string();
        if let Some(source) = std::error::Error::source(e) {
            cause = format!("{cause}: {source}");
        }
        tracing::warn!(cause, "spool refused an event: tracking writes in the write-intent map");
        c.overflow = Some(OverflowState {
            last_spooled: lock_spool(&c.spool).last_seq(),
            cause,
            events_not_spooled: 0,
            bytes_not_spooled: 0,
            points_not_spooled: 0,
        });
    }

    /// Under [`CompletionPolicy::Spooled`], waits until the spool holds `captured` durably.
    /// A failing spool sync sends the tap into overflow; the write stays covered by the
    /// intent map, which marked it before the backing write.
    fn complete(&self, captured: Captured) -> Result<Captured> {
        let Captured::Spooled(seq) = captured else { return Ok(captured) };
        if self.cfg.completion != CompletionPolicy::Spooled {
            return Ok(captured);
        }
        let ticket = {
            let mut c = self.lock();
            if lock_spool(&c.spool).durable_seq() >= seq {
                return Ok(captured);
            }
            let begun = lock_spool(&c.spool).begin_sync();
            match begun {
                Ok(t) => t,
                Err(e) => {
                    Self::enter_overflow(&mut c, &e);
                    return Ok(captured);
                }
            }
        };
        let outcome = ticket.wait();
        let mut c = self.lock();
        let ended = lock_spool(&c.spool).end_sync(outcome);
        if let Err(e) = ended {
            Self::enter_overflow(&mut c, &e);
        }
        Ok(captured)
    }
}

/// Granularity of zero detection in [`Tap::resync_copy`].
const RESYNC_BLOCK: usize = 4096;

/// What [`Tap::resync_copy`] does with all-zero blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroBlocks {
    /// Sends them as write-zeroes ranges (the replica may hold anything there).
    Send,
    /// Leaves them out (the replica is known to hold zeros there: an initial sync).
    Skip,
}

/// What one [`Tap::resync_copy`] appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResyncCopied {
    /// Bytes appended as data.
    pub data_bytes: u64,
    /// Bytes found all-zero (sent as ranges, or skipped).
    pub zero_bytes: u64,
    /// The last sequence number appended (`None` if nothing was).
    pub last_seq: Option<Seq>,
}

/// The kind of a mutation handed to the tap in two steps ([`Tap::begin_mutation`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutation {
    /// A write of data (durable on the device before it is finished, with FUA).
    Write {
        /// Forced unit access: a barrier follows the write's events.
        fua: bool,
    },
    /// A write-zeroes.
    WriteZeroes,
    /// A discard (the device reads zeros there afterwards, as the replica will).
    Discard,
}

/// A mutation begun with [`Tap::begin_mutation`]: its regions are marked in the intent map
/// and it holds its ordering ticket. Finish it with [`Tap::finish_write`] or
/// [`Tap::finish_range`] once its device I/O completed. Dropped unfinished (the device I/O
/// failed), its regions stay out of sync in the intent map (resynced later) and its ticket
/// is released.
#[derive(Debug)]
#[must_use = "finish a pending mutation, or drop it when its device I/O failed"]
pub struct PendingMutation {
    kind: Mutation,
    offset: u64,
    len: u64,
    intent: Option<WriteIntent>,
    ticket: Option<u64>,
    order: Arc<ArrivalOrder>,
}

impl PendingMutation {
    /// What it is.
    pub fn kind(&self) -> Mutation {
        self.kind
    }

    /// Its first byte on the device.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it covers no byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn release(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.order.leave(ticket);
        }
    }
}

impl Drop for PendingMutation {
    fn drop(&mut self) {
        // The intent, if still held, resolves as out of sync when dropped with `self`.
        self.release();
    }
}

/// Mutations begun and not finished, by ticket (see the module documentation).
#[derive(Debug, Default)]
struct ArrivalOrder {
    state: Mutex<OrderState>,
    finished: Condvar,
}

#[derive(Debug, Default)]
struct OrderState {
    next: u64,
    /// `(ticket, start, end)` of each unfinished mutation, in ticket order.
    pending: Vec<(u64, u64, u64)>,
}

impl ArrivalOrder {
    fn lock(&self) -> MutexGuard<'_, OrderState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a mutation of `[start, end)` after every one registered so far; returns its
    /// ticket. Never blocks.
    fn enter(&self, start: u64, end: u64) -> u64 {
        let mut state = self.lock();
        let ticket = state.next;
        state.next += 1;
        state.pending.push((ticket, start, end));
        ticket
    }

    /// Whether no earlier unfinished mutation overlaps `ticket`'s range.
    fn may_run_locked(state: &OrderState, ticket: u64) -> bool {
        let Some(&(_, start, end)) = state.pending.iter().find(|p| p.0 == ticket) else {
            return true;
        };
        !state.pending.iter().take_while(|p| p.0 < ticket).any(|&(_, s, e)| s < end && start < e)
    }

    fn may_run(&self, ticket: u64) -> bool {
        Self::may_run_locked(&self.lock(), ticket)
    }

    /// Waits until `ticket` may start. Deadlock-free as long as every holder of an earlier
    /// ticket finishes or drops it without waiting for a later one.
    fn wait_turn(&self, ticket: u64) {
        let mut state = self.lock();
        while !Self::may_run_locked(&state, ticket) {
            state = self.finished.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Marks `ticket` finished, letting the mutations that waited for it start.
    fn leave(&self, ticket: u64) {
        let mut state = self.lock();
        if let Some(i) = state.pending.iter().position(|p| p.0 == ticket) {
            state.pending.remove(i);
        }
        drop(state);
        self.finished.notify_all();
    }
}

fn is_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(8);
    words.by_ref().all(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

fn lock_spool(spool: &Mutex<Spool>) -> MutexGuard<'_, Spool> {
    // The spool's state is consistent between its calls; a panic elsewhere leaves it usable.
    spool.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    #[test]
    fn a_mutation_waits_only_for_earlier_overlapping_ones() {
        let order = ArrivalOrder::default();
        let a = order.enter(0, 8192);
        let b = order.enter(4096, 12288); // overlaps a
        let c = order.enter(16384, 20480); // disjoint
        let d = order.enter(8192, 16384); // overlaps b only (ends are exclusive)
        assert!(order.may_run(a));
        assert!(!order.may_run(b));
        assert!(order.may_run(c));
        assert!(!order.may_run(d));
        order.leave(a);
        assert!(order.may_run(b));
        assert!(!order.may_run(d));
        order.leave(b);
        assert!(order.may_run(d));
        // A later mutation does not hold back an earlier one.
        let e = order.enter(0, 1 << 20);
        assert!(order.may_run(c) && order.may_run(d) && !order.may_run(e));
        order.leave(c);
        order.leave(d);
        assert!(order.may_run(e));
    }

    /// Many threads take overlapping tickets, then wait for their turn in the reverse
    /// order; each records its ticket when it runs. Whatever the scheduling, tickets that
    /// overlap ran in ticket order.
    #[test]
    fn overlapping_mutations_run_in_ticket_order_under_any_scheduling() {
        let order = Arc::new(ArrivalOrder::default());
        let ran = Arc::new(Mutex::new(Vec::new()));
        // Ranges on a 4-slot line, each covering one or two slots.
        let ranges: Vec<(u64, u64)> =
            (0..64u64).map(|i| (i % 4, i % 4 + 1 + (i % 3) / 2)).collect();
        let tickets: Vec<u64> = ranges.iter().map(|&(s, e)| order.enter(s, e)).collect();
        // Threads start in reverse ticket order: the latest would run first without the wait.
        let handles: Vec<_> = tickets
            .iter()
            .rev()
            .map(|&t| {
                let (order, ran) = (order.clone(), ran.clone());
                thread::spawn(move || {
                    order.wait_turn(t);
                    ran.lock().unwrap().push(t);
                    order.leave(t);
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let ran = ran.lock().unwrap().clone();
        assert_eq!(ran.len(), ranges.len());
        let position = |t: u64| ran.iter().position(|&r| r == t).unwrap();
        for (i, &(s1, e1)) in ranges.iter().enumerate() {
            for (j, &(s2, e2)) in ranges.iter().enumerate().skip(i + 1) {
                if s1 < e2 && s2 < e1 {
                    assert!(
                        position(tickets[i]) < position(tickets[j]),
                        "ticket {} ran after overlapping later ticket {}",
                        tickets[i],
                        tickets[j]
                    );
                }
            }
        }
    }
}
