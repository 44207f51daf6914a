//! Damaged records of the retention log and their repair.
//!
//! A damaged stretch of a live segment (found on open, or by [`RetentionLog::scrub`]) lost
//! the records it held. Every state from the smallest sequence number they could have had
//! (`lost_from`) on depends on them, so from there no point is offered, no sequence number
//! resolves and `Latest` is the newest state before it, until a **repair** completes: a
//! resync of the volume ranges the lost records covered (the whole of every volume when the
//! damaged bytes do not say), run by the source on the target's `RepairRequest`, bracketed by
//! `ResyncBegin`/`ResyncEnd` with the damage's repair id ([`JournalDamage::repair_id`]). The
//! `ResyncEnd` that closes the span holding that id is a point again, and everything after it
//! is offered as usual; the points between stay hidden for good.
//!
//! Nothing new is written for this: the damaged bytes stay where they are (a segment with
//! damage is never rewritten by coalescing, nor dropped by a base advance before its repair),
//! and the repair id is derived from the journal's id, the segment id and the offset, so a
//! reopened log finds the same damage and recognises the same repair in the resync markers.

use crate::format::{Defect, RecordKind};
use crate::log::OpenReport;
use crate::types::{Seq, VolumeId};

use super::{PointInfo, PointKind, RetentionLog};

/// A damaged stretch of the retention journal and what depends on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalDamage {
    /// The segment file.
    pub segment: String,
    /// Where the bad bytes start in it.
    pub offset: u64,
    /// How many bytes were skipped.
    pub len: u64,
    /// The first check that failed.
    pub reason: String,
    /// The smallest sequence number a lost record can have: every state from it on depends
    /// on the lost records until the repair.
    pub lost_from: Seq,
    /// The volume ranges the lost records covered, `(volume, offset, len)`, aligned to the
    /// log's block size; the whole of every volume when `whole_volume`.
    pub ranges: Vec<(VolumeId, u64, u64)>,
    /// The damaged bytes do not say what the lost records covered (the record header was
    /// damaged, or a lost `ResyncBegin` leaves the copies after it unaccounted for).
    pub whole_volume: bool,
    /// The resync window id a repair of this damage opens (nonzero).
    pub repair_id: u64,
    /// The sequence number of the `ResyncEnd` that completed the repair.
    pub repaired_at: Option<Seq>,
    pub(super) slot: u32,
}

impl JournalDamage {
    /// The ranges it lost, as `volume V bytes O+L, ...`.
    pub fn describe_ranges(&self) -> String {
        describe_ranges(&self.ranges)
    }

    /// A sentence naming the damage and its state.
    pub fn describe(&self) -> String {
        let what = if self.whole_volume {
            "records of unknown ranges (the whole volume is suspect)".to_owned()
        } else {
            format!("the record of {}", describe_ranges(&self.ranges))
        };
        let state = match self.repaired_at {
            Some(e) => format!("repaired by the resync ending at seq {e}"),
            None => format!("repair pending (resync id {:#018x})", self.repair_id),
        };
        format!(
            "journal damage in {} at offset {} ({} bytes: {}), which lost {what} from seq {}; {state}",
            self.segment, self.offset, self.len, self.reason, self.lost_from
        )
    }
}

/// `volume:offset+len` for each range.
pub fn describe_ranges(ranges: &[(VolumeId, u64, u64)]) -> String {
    let parts: Vec<String> =
        ranges.iter().map(|(v, o, l)| format!("volume {v} bytes {o}+{l}")).collect();
    parts.join(", ")
}

/// The repair id of the damage at `offset` of segment `segment_id` of journal `log_id`:
/// stable across reopenings, never 0.
pub fn repair_id(log_id: &[u8; 16], segment_id: u64, offset: u64) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(b"tidemark repair id v1");
    h.update(log_id);
    h.update(&segment_id.to_le_bytes());
    h.update(&offset.to_le_bytes());
    let b = h.finalize();
    u64::from_le_bytes(b.as_bytes()[..8].try_into().expect("8 bytes")).max(1)
}

impl RetentionLog {
    /// The damage found when the log was opened (`report`), registered.
    pub(super) fn damage_on_open(&mut self, report: &OpenReport) {
        let tail = report.truncated_tail.clone();
        for (segment, d) in &report.defects {
            // A torn tail cut from the newest segment held nothing acknowledged (unless the
            // medium lost synced data, which the source's resume check reports).
            if tail.as_ref().is_some_and(|(name, cut, _)| name == segment && d.offset >= *cut) {
                continue;
            }
            let Some(slot) = self.slot_named(segment) else { continue };
            self.note_damage(slot, segment, d);
        }
        self.hide_damaged_points();
    }

    fn slot_named(&self, segment: &str) -> Option<u32> {
        self.log.segments().iter().map(|s| s.slot).find(|s| self.log.segment_name(*s) == segment)
    }

    /// Registers one damaged stretch; returns it when it is new and matters (something
    /// above the base may have been lost).
    fn note_damage(&mut self, slot: u32, segment: &str, d: &Defect) -> Option<JournalDamage> {
        if self.damage.iter().any(|x| x.segment == segment && x.offset == d.offset) {
            return None;
        }
        let base = self.base.seq;
        let (ranges, whole_volume) = match &d.header {
            Some(h) if h.seq <= base => return None,
            Some(h) if h.kind.is_data() => {
                let start = h.offset / self.bs * self.bs;
                let end = (h.offset + u64::from(h.length)).div_ceil(self.bs) * self.bs;
                let vlen = self.volume_lens.get(usize::from(h.volume.0)).copied().unwrap_or(0);
                (vec![(h.volume, start, end.min(vlen).saturating_sub(start))], false)
            }
            // A lost begin: the copies after it look like ordinary writes.
            Some(h) if h.kind == RecordKind::ResyncBegin => (Vec::new(), true),
            // A lost barrier, bookmark or end loses a point, never data: nothing to repair
            // (a lost end leaves its window open, which the source's next resync closes).
            Some(h) => {
                tracing::warn!(%segment, offset = d.offset, kind = ?h.kind, seq = %h.seq,
                    "damaged journal record lost a marker, no data: nothing to repair");
                return None;
            }
            None => (Vec::new(), true),
        };
        let ranges = if whole_volume {
            self.volume_lens
                .iter()
                .enumerate()
                .map(|(i, len)| (VolumeId(i as u16), 0, *len))
                .collect()
        } else {
            ranges
        };
        let lost_from = d.lost_from().max(Seq(base.0 + 1));
        let seg_id = self.log.segments().iter().find(|s| s.slot == slot).map_or(0, |s| s.id);
        let id = repair_id(&self.log.manifest().log_id, seg_id, d.offset);
        let repaired_at = self
            .windows
            .spans
            .iter()
            .find(|sp| sp.begin_seq >= lost_from && sp.ids.contains(&id))
            .and_then(|sp| sp.end);
        let damage = JournalDamage {
            segment: segment.to_owned(),
            offset: d.offset,
            len: d.len,
            reason: d.reason.clone(),
            lost_from,
            ranges,
            whole_volume,
            repair_id: id,
            repaired_at,
            slot,
        };
        tracing::error!(%segment, offset = d.offset, len = d.len, lost_from = %lost_from,
            ranges = %describe_ranges(&damage.ranges), repair_id = id,
            "{}", damage.describe());
        // A record indexed before it was damaged (a scrub finds it) leaves the index, as it
        // would on open: reads see the older versions instead of failing on it.
        let (from, to) = (d.offset, d.offset + d.len);
        self.index.retain(|e| {
            let loc = e.loc();
            loc.slot != slot || !(from..to).contains(&u64::from(loc.offset))
        });
        self.cache.clear();
        self.damage.push(damage.clone());
        Some(damage)
    }

    /// Drops from the offered points every point that depends on lost records.
    fn hide_damaged_points(&mut self) {
        let hidden: Vec<Seq> = self
            .points
            .iter()
            .filter(|p| self.hidden_by_damage(p.seq).is_some())
            .map(|p| p.seq)
            .collect();
        if !hidden.is_empty() {
            tracing::warn!(
                points = hidden.len(),
                "recovery points withdrawn: they depend on damaged journal records"
            );
            self.points.retain(|p| !hidden.contains(&p.seq));
        }
    }

    /// The damage the state after `s` depends on, if any.
    pub(super) fn hidden_by_damage(&self, s: Seq) -> Option<&JournalDamage> {
        self.damage.iter().find(|d| d.lost_from <= s && d.repaired_at.is_none_or(|e| s < e))
    }

    /// The damage a read of `len` bytes at `offset` of `volume` as of `seq` could see.
    pub(super) fn damage_under(
        &self,
        seq: Seq,
        volume: VolumeId,
        offset: u64,
        len: u64,
    ) -> Option<&JournalDamage> {
        self.damage.iter().find(|d| {
            d.lost_from <= seq
                && d.repaired_at.is_none_or(|e| seq < e)
                && d.ranges
                    .iter()
                    .any(|(v, o, l)| *v == volume && *o < offset + len && offset < o + l)
        })
    }

    /// The oldest unrepaired damage.
    pub(super) fn unrepaired_damage(&self) -> Option<&JournalDamage> {
        self.damage.iter().filter(|d| d.repaired_at.is_none()).min_by_key(|d| d.lost_from)
    }

    /// The newest consistent state at or below `s`: `s` itself when it names an exact state,
    /// else the newest offered point below it, else the base.
    pub(super) fn newest_state_at_or_below(&self, s: Seq) -> Option<PointInfo> {
        if s < self.base.seq {
            return None;
        }
        if s == self.base.seq {
            return self.initial_sync().is_none().then(|| self.base.clone());
        }
        if let Some(p) = self.points.iter().find(|p| p.seq == s) {
            return Some(p.clone());
        }
        let exact = s > self.log.manifest().thin_horizon
            && self.windows.containing(s).is_none()
            && self.hidden_by_damage(s).is_none()
            && self.initial_sync().is_none_or(|sp| s >= sp.begin_seq);
        if exact {
            return Some(PointInfo { seq: s, time: self.time_of(s), kind: PointKind::Latest });
        }
        let i = self.points.partition_point(|p| p.seq <= s);
        if i > 0 {
            return Some(self.points[i - 1].clone());
        }
        self.initial_sync().is_none().then(|| self.base.clone())
    }

    /// A `ResyncEnd` at `seq` closed the last open window: the damage whose repair id the
    /// span holds is repaired there.
    pub(super) fn close_repairs(&mut self, seq: Seq) {
        let Some(sp) = self.windows.spans.last() else { return };
        let ids = sp.ids.clone();
        let begin = sp.begin_seq;
        for d in &mut self.damage {
            if d.repaired_at.is_none() && ids.contains(&d.repair_id) && begin >= d.lost_from {
                d.repaired_at = Some(seq);
                tracing::info!(segment = %d.segment, offset = d.offset, ranges = %describe_ranges(&d.ranges),
                    seq = %seq, "journal damage repaired: the source resent the ranges it lost");
            }
        }
    }

    /// Keeps, while a segment holds damage, every point from its first record on and the
    /// newest point before it, so no coalescing rewrites it (the damage, the points it
    /// hides and its repair are recognised from its bytes on every open).
    pub(super) fn keep_for_damage(&self, keep: &mut [bool]) {
        let segs = self.log.segments();
        let Some(first) = self
            .damage
            .iter()
            .filter_map(|d| segs.iter().find(|s| s.slot == d.slot))
            .map(|s| s.first_seq.unwrap_or(Seq::ZERO))
            .min()
        else {
            return;
        };
        let i = self.points.partition_point(|p| p.seq < first);
        for k in keep.iter_mut().skip(i.saturating_sub(1)) {
            *k = true;
        }
    }

    /// Every damaged stretch above the base, repaired or not.
    pub fn damage(&self) -> &[JournalDamage] {
        &self.damage
    }

    /// The damage a repair must still be asked for: not repaired, and no resync window
    /// with its repair id open now (an interrupted repair, which the source's next resync
    /// closes).
    pub fn repairs_needed(&self) -> Vec<JournalDamage> {
        let open: Vec<u64> = self.windows.open().map(|sp| sp.ids.clone()).unwrap_or_default();
        self.damage
            .iter()
            .filter(|d| d.repaired_at.is_none() && !open.contains(&d.repair_id))
            .cloned()
            .collect()
    }

    /// Registers the records reads found damaged since the last call (see
    /// [`RetentionLog::scrub`], which calls it first); returns the new damage. Cheap when
    /// there is none.
    pub fn note_read_damage(&mut self) -> crate::Result<Vec<JournalDamage>> {
        let locs = std::mem::take(&mut *self.read_damage.lock().unwrap_or_else(|e| e.into_inner()));
        let mut found = Vec::new();
        for loc in locs {
            if !self.log.segments().iter().any(|s| s.slot == loc.slot && !s.active) {
                continue;
            }
            let name = self.log.segment_name(loc.slot);
            let scan = self.log.scan_sealed(loc.slot)?;
            let offset = u64::from(loc.offset);
            // The scanner may see the damage itself (a checksum); else the record is valid
            // to the scanner and only its payload failed (decryption): exactly it was lost.
            let defect = scan
                .defects
                .iter()
                .find(|d| d.offset <= offset && offset < d.offset + d.len)
                .cloned()
                .or_else(|| {
                    scan.records.iter().find(|r| r.offset == offset).map(|r| Defect {
                        offset,
                        len: r.header.total_len(),
                        reason:
                            "the record failed to read (its payload does not decrypt or decode)"
                                .to_owned(),
                        header: Some(r.header),
                        min_seq: r.header.seq,
                        prev_kind: None,
                    })
                });
            if let Some(new) = defect.and_then(|d| self.note_damage(loc.slot, &name, &d)) {
                found.push(new);
            }
        }
        if !found.is_empty() {
            self.hide_damaged_points();
        }
        Ok(found)
    }

    /// Reads every sealed segment again and registers damage not known yet (bit rot since
    /// the log was opened); returns the new damage. The points that depend on it are no
    /// longer offered.
    pub fn scrub(&mut self) -> crate::Result<Vec<JournalDamage>> {
        let mut found = self.note_read_damage()?;
        for seg in self.log.segments() {
            if seg.active {
                continue;
            }
            let scan = self.log.scan_sealed(seg.slot)?;
            let name = self.log.segment_name(seg.slot);
            for d in &scan.defects {
                if let Some(new) = self.note_damage(seg.slot, &name, d) {
                    found.push(new);
                }
            }
        }
        if !found.is_empty() {
            self.hide_damaged_points();
        }
        Ok(found)
    }
}
