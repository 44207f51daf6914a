//! The persistent write-intent map: which regions of a protected volume may differ from the
//! replica, kept on disk so that after an agent crash, a host crash or a spool overflow only
//! those regions need a resync (DRBD's activity log and dm-era's write-ahead bitmap are the
//! models).
//!
//! This module owns the map's rules and its file format (`docs/intent-map.md` is the spec).
//!
//! **Rules.**
//! - [`IntentMap::mark`] returns only once the on-disk map says every region the range
//!   touches is dirty; the caller issues the backing write after that. Marks that arrive
//!   while a map write is in flight are batched into the next one (group commit: one write
//!   and one fdatasync for all of them). A mark whose regions are already dirty on disk costs
//!   no I/O.
//! - A region with a write whose capture event is not yet acknowledged by the target is
//!   *hot*. The number of hot regions is bounded ([`IntentConfig::max_hot_regions`]); a mark
//!   that would exceed it is refused with [`TapError::HotRegionsFull`] (back-pressure), and
//!   the caller waits ([`IntentMap::wait_for_room`]) or marks the range *out of sync*
//!   instead ([`IntentMap::mark_out_of_sync`]). The bound implies the resync after a crash:
//!   at most `max_hot_regions * region_bytes`, plus the out-of-sync regions.
//! - Every mark yields a [`WriteIntent`]; the caller resolves it with the spool sequence
//!   number of the event ([`WriteIntent::record`]) or, when the event could not be spooled,
//!   with [`WriteIntent::out_of_sync`] (dropping it does the same). Out-of-sync regions stay
//!   dirty until [`IntentMap::resynced`].
//! - [`IntentMap::acknowledge`] records the target's acknowledged sequence number; a region
//!   whose writes are all acknowledged becomes clean in memory and is cleared on disk lazily:
//!   by the next map write, by [`IntentMap::clear_clean`], or at [`IntentMap::close`]. So a
//!   clean shutdown after the target acknowledged everything leaves nothing dirty.
//!
//! **Crash safety.** The file holds a header written once at creation and two slots; each map
//! write goes to the slot not holding the newest image, with a generation number one higher
//! and checksums over its header and its run list. A torn or lost slot write leaves the other
//! slot valid, and the older image marks a superset of what the caller was told is durable
//! (regions are only added before a mark returns; removals are lazy). In memory, while a
//! write is in flight, only regions in both the old and the new image count as durable.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tidemark_journal::{BlockIo, Seq};

use crate::error::{Result, TapError};
use crate::le::{le32, le64};
use crate::regions::{RegionRun, RegionSet};

/// Magic at the start of the map header.
pub const HEADER_MAGIC: [u8; 8] = *b"TDMKIMH\0";
/// Magic at the start of each slot.
pub const SLOT_MAGIC: [u8; 8] = *b"TDMKIMS\0";
/// The format version this build reads and writes.
pub const MAP_VERSION: u32 = 1;
/// Length of the header fields (the header block is [`MAP_BLOCK`] bytes).
pub const HEADER_LEN: usize = 64;
/// Length of a slot's header fields.
pub const SLOT_HEADER_LEN: usize = 64;
/// Bytes per run in a slot: `{le64 first_region, le64 region_count}`.
pub const RUN_LEN: usize = 16;
/// Alignment and size unit of the header block and of the slots.
pub const MAP_BLOCK: u64 = 4096;
/// Default region size (DRBD's activity-log extent).
pub const DEFAULT_REGION_BYTES: u64 = 4 << 20;
/// Default bound on hot regions (DRBD's default activity-log size: about 4.8 GiB to resync).
pub const DEFAULT_MAX_HOT_REGIONS: u32 = 1237;
/// Default capacity of a slot in runs.
pub const DEFAULT_MAX_RUNS: u32 = 8192;
/// Largest slot capacity accepted (a 16 MiB slot).
pub const MAX_RUNS_LIMIT: u32 = 1 << 20;
/// Smallest region size.
pub const MIN_REGION_BYTES: u64 = 4096;
/// Largest region size.
pub const MAX_REGION_BYTES: u64 = 1 << 40;

/// Settings of a write-intent map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntentConfig {
    /// Bytes per region: a power of two from 4 KiB to 1 TiB. Fixed at creation.
    pub region_bytes: u64,
    /// Most hot regions (regions with unacknowledged writes). Can change between opens.
    pub max_hot_regions: u32,
    /// Capacity of a slot in runs of consecutive dirty regions; a dirty set with more runs is
    /// coalesced across its smallest gaps (marking a few clean regions dirty, never the
    /// reverse). Fixed at creation.
    pub max_runs: u32,
}

impl Default for IntentConfig {
    fn default() -> Self {
        Self {
            region_bytes: DEFAULT_REGION_BYTES,
            max_hot_regions: DEFAULT_MAX_HOT_REGIONS,
            max_runs: DEFAULT_MAX_RUNS,
        }
    }
}

impl IntentConfig {
    /// The most a resync after a crash must copy because of hot regions, in bytes
    /// (out-of-sync regions come on top).
    pub fn resync_bound_bytes(&self) -> u64 {
        u64::from(self.max_hot_regions).saturating_mul(self.region_bytes)
    }

    fn validate(&self) -> Result<()> {
        if !self.region_bytes.is_power_of_two()
            || !(MIN_REGION_BYTES..=MAX_REGION_BYTES).contains(&self.region_bytes)
        {
            return Err(TapError::Config(format!(
                "write-intent region size {} is not a power of two from {MIN_REGION_BYTES} to {MAX_REGION_BYTES}",
                self.region_bytes
            )));
        }
        if self.max_hot_regions == 0 {
            return Err(TapError::Config("write-intent max_hot_regions must be at least 1".into()));
        }
        if self.max_runs == 0 || self.max_runs > MAX_RUNS_LIMIT {
            return Err(TapError::Config(format!(
                "write-intent max_runs {} is not from 1 to {MAX_RUNS_LIMIT}",
                self.max_runs
            )));
        }
        Ok(())
    }
}

/// The map header: the geometry, written once at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapHeader {
    /// Random identity of this map; every slot repeats it.
    pub map_id: u64,
    /// Bytes per region.
    pub region_bytes: u64,
    /// Bytes of the volume the map covers.
    pub volume_bytes: u64,
    /// Capacity of a slot in runs.
    pub max_runs: u32,
    /// Distance between the two slots (and size of each), a multiple of [`MAP_BLOCK`].
    pub slot_bytes: u64,
}

impl MapHeader {
    /// The slot size for a capacity of `max_runs` runs.
    pub fn slot_bytes_for(max_runs: u32) -> u64 {
        let raw = SLOT_HEADER_LEN as u64 + u64::from(max_runs) * RUN_LEN as u64;
        raw.div_ceil(MAP_BLOCK) * MAP_BLOCK
    }

    /// Number of regions covering the volume.
    pub fn region_count(&self) -> u64 {
        self.volume_bytes.div_ceil(self.region_bytes)
    }

    /// Byte offset of slot `index` (0 or 1).
    pub fn slot_offset(&self, index: u8) -> u64 {
        MAP_BLOCK + u64::from(index) * self.slot_bytes
    }

    /// Bytes of the whole map file.
    pub fn file_len(&self) -> u64 {
        MAP_BLOCK + 2 * self.slot_bytes
    }

    /// The header's bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&HEADER_MAGIC);
        b[8..12].copy_from_slice(&MAP_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.map_id.to_le_bytes());
        b[24..32].copy_from_slice(&self.region_bytes.to_le_bytes());
        b[32..40].copy_from_slice(&self.volume_bytes.to_le_bytes());
        b[40..44].copy_from_slice(&self.max_runs.to_le_bytes());
        b[48..56].copy_from_slice(&self.slot_bytes.to_le_bytes());
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and validates a header.
    pub fn decode(b: &[u8], object: &str) -> Result<MapHeader> {
        let invalid = |field: &'static str, found: u64, expected: String| TapError::InvalidField {
            object: object.to_owned(),
            field,
            found,
            expected,
        };
        if b.len() < HEADER_LEN {
            return Err(invalid("length", b.len() as u64, format!("{HEADER_LEN} bytes")));
        }
        if b[0..8] != HEADER_MAGIC {
            return Err(TapError::BadMagic {
                object: object.to_owned(),
                found: b[0..8].to_vec(),
                expected: HEADER_MAGIC.to_vec(),
            });
        }
        // The version first: a later version may lay the rest out differently, and should be
        // named as such rather than as a checksum mismatch.
        let version = le32(b, 8);
        if version != MAP_VERSION {
            return Err(TapError::UnsupportedVersion {
                object: object.to_owned(),
                found: u64::from(version),
                supported: u64::from(MAP_VERSION),
            });
        }
        let stored = le32(b, 60);
        let computed = crc32c::crc32c(&b[..60]);
        if stored != computed {
            return Err(TapError::ChecksumMismatch {
                object: object.to_owned(),
                what: "header",
                offset: 0,
                stored,
                computed,
            });
        }
        let header_len = le32(b, 12);
        if header_len as usize != HEADER_LEN {
            return Err(invalid("header_len", u64::from(header_len), HEADER_LEN.to_string()));
        }
        let h = MapHeader {
            map_id: le64(b, 16),
            region_bytes: le64(b, 24),
            volume_bytes: le64(b, 32),
            max_runs: le32(b, 40),
            slot_bytes: le64(b, 48),
        };
        if le32(b, 44) != 0 || le32(b, 56) != 0 {
            return Err(invalid("reserved", 1, "zero".into()));
        }
        if !h.region_bytes.is_power_of_two()
            || !(MIN_REGION_BYTES..=MAX_REGION_BYTES).contains(&h.region_bytes)
        {
            return Err(invalid(
                "region_bytes",
                h.region_bytes,
                format!("a power of two from {MIN_REGION_BYTES} to {MAX_REGION_BYTES}"),
            ));
        }
        if h.volume_bytes == 0 {
            return Err(invalid("volume_bytes", 0, "at least 1".into()));
        }
        if h.max_runs == 0 || h.max_runs > MAX_RUNS_LIMIT {
            return Err(invalid(
                "max_runs",
                u64::from(h.max_runs),
                format!("1 to {MAX_RUNS_LIMIT}"),
            ));
        }
        let slot_bytes = Self::slot_bytes_for(h.max_runs);
        if h.slot_bytes != slot_bytes {
            return Err(invalid("slot_bytes", h.slot_bytes, slot_bytes.to_string()));
        }
        Ok(h)
    }
}

/// The content of one slot: a generation of the dirty set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotImage {
    /// Generation number; the slot index is its low bit.
    pub generation: u64,
    /// The target's acknowledged sequence number when the slot was written (informational).
    pub acked: Seq,
    /// The dirty regions.
    pub regions: RegionSet,
    /// Bytes of the volume this image covers: the header's `volume_bytes` until the volume
    /// grew ([`IntentMap::grow`]), then the grown size (stored in the slot).
    pub volume_bytes: u64,
}

/// Encodes a slot: header and runs, padded to a whole number of [`MAP_BLOCK`]s. The caller
/// keeps `img.regions` within `h.max_runs` runs.
pub fn encode_slot(h: &MapHeader, img: &SlotImage) -> Vec<u8> {
    let runs = img.regions.run_count();
    let len = SLOT_HEADER_LEN + runs * RUN_LEN;
    let mut b = vec![0u8; (len as u64).div_ceil(MAP_BLOCK) as usize * MAP_BLOCK as usize];
    for (i, r) in img.regions.runs().enumerate() {
        let at = SLOT_HEADER_LEN + i * RUN_LEN;
        b[at..at + 8].copy_from_slice(&r.first.to_le_bytes());
        b[at + 8..at + 16].copy_from_slice(&r.count.to_le_bytes());
    }
    b[0..8].copy_from_slice(&SLOT_MAGIC);
    b[8..16].copy_from_slice(&h.map_id.to_le_bytes());
    b[16..24].copy_from_slice(&img.generation.to_le_bytes());
    b[24..32].copy_from_slice(&img.acked.0.to_le_bytes());
    b[32..36].copy_from_slice(&(runs as u32).to_le_bytes());
    let runs_crc = crc32c::crc32c(&b[SLOT_HEADER_LEN..len]);
    b[36..40].copy_from_slice(&runs_crc.to_le_bytes());
    b[40..48].copy_from_slice(&img.regions.region_count().to_le_bytes());
    // 0 means "the header's size", so a map that never grew keeps its version 1 bytes.
    let grown = if img.volume_bytes == h.volume_bytes { 0 } else { img.volume_bytes };
    b[48..56].copy_from_slice(&grown.to_le_bytes());
    let crc = crc32c::crc32c(&b[..60]);
    b[60..64].copy_from_slice(&crc.to_le_bytes());
    b
}

/// The run count a slot header declares, after checking the header alone (magic, checksum,
/// map identity, generation parity, capacity). `b` holds at least the slot header.
pub fn decode_slot_header(h: &MapHeader, index: u8, b: &[u8], object: &str) -> Result<u32> {
    let invalid = |field: &'static str, found: u64, expected: String| TapError::InvalidField {
        object: object.to_owned(),
        field,
        found,
        expected,
    };
    if b.len() < SLOT_HEADER_LEN {
        return Err(invalid("length", b.len() as u64, format!("at least {SLOT_HEADER_LEN} bytes")));
    }
    if b[0..8] != SLOT_MAGIC {
        return Err(TapError::BadMagic {
            object: object.to_owned(),
            found: b[0..8].to_vec(),
            expected: SLOT_MAGIC.to_vec(),
        });
    }
    let stored = le32(b, 60);
    let computed = crc32c::crc32c(&b[..60]);
    if stored != computed {
        return Err(TapError::ChecksumMismatch {
            object: object.to_owned(),
            what: "slot header",
            offset: h.slot_offset(index),
            stored,
            computed,
        });
    }
    let map_id = le64(b, 8);
    if map_id != h.map_id {
        return Err(invalid("map_id", map_id, format!("{:#x} (the header's)", h.map_id)));
    }
    let generation = le64(b, 16);
    if generation & 1 != u64::from(index) {
        return Err(invalid(
            "generation",
            generation,
            format!("a generation whose low bit is the slot index {index}"),
        ));
    }
    let run_count = le32(b, 32);
    if run_count > h.max_runs {
        return Err(invalid("run_count", u64::from(run_count), format!("at most {}", h.max_runs)));
    }
    let grown = le64(b, 48);
    if grown != 0 && grown <= h.volume_bytes {
        return Err(invalid(
            "volume_bytes",
            grown,
            format!("0 or more than the header's {} bytes (a map only grows)", h.volume_bytes),
        ));
    }
    if b[56..60].iter().any(|&x| x != 0) {
        return Err(invalid("reserved", 1, "zero".into()));
    }
    Ok(run_count)
}

/// The volume size a slot image covers: its `volume_bytes` field, or the header's when 0.
fn slot_volume_bytes(h: &MapHeader, b: &[u8]) -> u64 {
    match le64(b, 48) {
        0 => h.volume_bytes,
        grown => grown,
    }
}

/// Decodes and validates slot `index` from `b` (the slot's bytes from its start; at least its
/// header and runs).
pub fn decode_slot(h: &MapHeader, index: u8, b: &[u8], object: &str) -> Result<SlotImage> {
    let run_count = decode_slot_header(h, index, b, object)? as usize;
    let invalid = |field: &'static str, found: u64, expected: String| TapError::InvalidField {
        object: object.to_owned(),
        field,
        found,
        expected,
    };
    let end = SLOT_HEADER_LEN + run_count * RUN_LEN;
    if b.len() < end {
        return Err(invalid("length", b.len() as u64, format!("{end} bytes for {run_count} runs")));
    }
    let stored = le32(b, 36);
    let computed = crc32c::crc32c(&b[SLOT_HEADER_LEN..end]);
    if stored != computed {
        return Err(TapError::ChecksumMismatch {
            object: object.to_owned(),
            what: "runs",
            offset: h.slot_offset(index) + SLOT_HEADER_LEN as u64,
            stored,
            computed,
        });
    }
    let volume_bytes = slot_volume_bytes(h, b);
    let region_count = volume_bytes.div_ceil(h.region_bytes);
    let mut regions = RegionSet::new();
    let mut prev_end: Option<u64> = None;
    let mut total: u64 = 0;
    for i in 0..run_count {
        let at = SLOT_HEADER_LEN + i * RUN_LEN;
        let first = le64(b, at);
        let count = le64(b, at + 8);
        let run_end = first.checked_add(count);
        if count == 0 || run_end.is_none_or(|e| e > region_count) {
            return Err(invalid(
                "run",
                first,
                format!(
                    "a non-empty run inside the {region_count} regions (run {i}: {first}+{count})"
                ),
            ));
        }
        if prev_end.is_some_and(|p| first <= p) {
            return Err(invalid(
                "run",
                first,
                format!(
                    "runs sorted with a gap between them (run {i} starts at or before the previous end)"
                ),
            ));
        }
        let run_end = first + count;
        prev_end = Some(run_end);
        total += count;
        regions.insert_range(first, run_end);
    }
    let declared = le64(b, 40);
    if declared != total {
        return Err(invalid("region_total", declared, format!("{total} (the sum of the runs)")));
    }
    Ok(SlotImage { generation: le64(b, 16), acked: Seq(le64(b, 24)), regions, volume_bytes })
}

/// What [`IntentMap::open`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntentOpenReport {
    /// The map file was created (it was empty or never finished its creation).
    pub created: bool,
    /// Generation of the image in use.
    pub generation: u64,
    /// Slot it was read from.
    pub slot: u8,
    /// Why the other slot was not used, when it did not hold a valid image (a torn or lost
    /// write, or never written).
    pub other_slot: Option<String>,
    /// The regions the map marks dirty: what a resync must copy.
    pub dirty: RegionSet,
    /// The acknowledged sequence number recorded with that image (informational: the open
    /// map starts with nothing acknowledged, so a spool that restarts its numbering can never
    /// make a new write look acknowledged).
    pub acked_at_write: Seq,
    /// Those regions in bytes (capped at the volume's end).
    pub dirty_bytes: u64,
}

/// Counters and bounds of a map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntentStatus {
    /// Bytes per region.
    pub region_bytes: u64,
    /// Hot regions: with writes not yet acknowledged, outside the out-of-sync set.
    pub hot_regions: u64,
    /// The bound on hot regions.
    pub max_hot_regions: u64,
    /// Regions out of sync (to be resynced whatever happens).
    pub out_of_sync_regions: u64,
    /// Regions the on-disk map marks dirty now.
    pub dirty_regions: u64,
    /// What a crash now could cost at most: the hot bound plus the out-of-sync regions,
    /// in bytes.
    pub resync_bound_bytes: u64,
    /// Generation of the newest durable image.
    pub generation: u64,
    /// Map writes (each one write and one fdatasync) since open.
    pub slot_writes: u64,
    /// Marks that needed no map write (regions already dirty on disk).
    pub marks_without_io: u64,
    /// Clean regions marked dirty on disk because a dirty set had more runs than a slot holds.
    pub coalesced_regions: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Hot {
    /// Marks not yet resolved.
    inflight: u32,
    /// Highest sequence number recorded for a write into the region.
    last_seq: Seq,
}

#[derive(Debug)]
struct State {
    /// Regions with unresolved marks, unacknowledged writes, or kept dirty on disk although
    /// clean (cleared lazily).
    hot: BTreeMap<u64, Hot>,
    /// Regions to resync whatever happens.
    oos: RegionSet,
    /// Regions dirty in every image that may be on disk.
    durable: RegionSet,
    generation: u64,
    acked: Seq,
    epoch_started: u64,
    epoch_done: u64,
    writing: bool,
    poisoned: Option<String>,
    slot_writes: u64,
    marks_without_io: u64,
    coalesced_regions: u64,
}

impl State {
    fn needed(&self, h: &Hot) -> bool {
        h.inflight > 0 || h.last_seq > self.acked
    }

    fn is_hot(&self, region: u64) -> bool {
        self.hot.get(&region).is_some_and(|h| self.needed(h)) && !self.oos.contains(region)
    }

    fn hot_in_use(&self) -> u64 {
        self.hot.iter().filter(|(r, h)| self.needed(h) && !self.oos.contains(**r)).count() as u64
    }

    fn register(&mut self, first: u64, end: u64) {
        for r in first..end {
            self.hot.entry(r).or_default().inflight += 1;
        }
    }

    /// The next image: hot regions (with the clean ones kept only while they fit under the
    /// bound) and out-of-sync regions, coalesced to the slot's capacity.
    fn next_image(&mut self, max_hot: u64, max_runs: u32) -> RegionSet {
        if self.hot.len() as u64 > max_hot {
            let acked = self.acked;
            self.hot.retain(|_, h| h.inflight > 0 || h.last_seq > acked);
        }
        let mut set = self.oos.clone();
        for &r in self.hot.keys() {
            set.insert(r);
        }
        self.coalesced_regions += set.coalesce_to(max_runs as usize);
        set
    }
}

#[derive(Debug)]
struct Shared {
    io: Arc<dyn BlockIo>,
    name: String,
    /// The header as written at creation (its `volume_bytes` is the first size).
    header: MapHeader,
    /// The size covered now (grows with [`IntentMap::grow`]).
    volume_bytes: AtomicU64,
    max_hot: u64,
    state: Mutex<State>,
    cond: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is plain data and every update leaves it consistent before any call that
        // can panic, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self, st: &State) -> Result<()> {
        match &st.poisoned {
            Some(cause) => Err(TapError::Poisoned {
                object: format!("write-intent map {}", self.name),
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Waits until an image written after this call started is durable (leading the write
    /// when no other thread is), then releases the lock.
    fn commit<'a>(&'a self, mut st: MutexGuard<'a, State>) -> Result<()> {
        let target = st.epoch_started + 1;
        loop {
            self.check(&st)?;
            if st.epoch_done >= target {
                return Ok(());
            }
            if st.writing {
                st = self.cond.wait(st).unwrap_or_else(|e| e.into_inner());
            } else {
                st = self.write_image(st)?;
            }
        }
    }

    fn write_image<'a>(&'a self, mut st: MutexGuard<'a, State>) -> Result<MutexGuard<'a, State>> {
        st.writing = true;
        st.epoch_started += 1;
        let epoch = st.epoch_started;
        let set = st.next_image(self.max_hot, self.header.max_runs);
        if set == st.durable {
            st.writing = false;
            st.epoch_done = epoch;
            self.cond.notify_all();
            return Ok(st);
        }
        // Until the write is known durable, either image may be what the disk holds.
        st.durable = st.durable.intersection(&set);
        let generation = st.generation + 1;
        let volume_bytes = self.volume_bytes.load(Ordering::SeqCst);
        let image = encode_slot(
            &self.header,
            &SlotImage { generation, acked: st.acked, regions: set.clone(), volume_bytes },
        );
        let offset = self.header.slot_offset((generation & 1) as u8);
        drop(st);
        let result = self
            .io
            .write_at(&image, offset)
            .map_err(|e| TapError::io("write", self.name.clone(), e))
            .and_then(|()| {
                self.io.sync().map_err(|e| TapError::io("fdatasync", self.name.clone(), e))
            });
        let mut st = self.lock();
        st.writing = false;
        st.epoch_done = epoch;
        match &result {
            Ok(()) => {
                st.durable = set;
                st.generation = generation;
                st.slot_writes += 1;
            }
            Err(e) => {
                let detail = std::error::Error::source(e).map(|s| format!(": {s}"));
                st.poisoned = Some(format!("{e}{}", detail.unwrap_or_default()));
            }
        }
        self.cond.notify_all();
        result.map(|()| st)
    }
}

/// The write-intent map of one volume (see the module documentation). Cloning gives another
/// handle to the same map.
#[derive(Debug, Clone)]
pub struct IntentMap {
    shared: Arc<Shared>,
}

impl IntentMap {
    /// Opens the map in `io`, creating it when the file is empty (or its creation never
    /// finished), for a volume of `volume_bytes` (the size the map covers, grown or not).
    pub fn open(
        io: Arc<dyn BlockIo>,
        volume_bytes: u64,
        cfg: IntentConfig,
    ) -> Result<(IntentMap, IntentOpenReport)> {
        Self::open_inner(io, volume_bytes, cfg, false)
    }

    /// As [`IntentMap::open`] for a volume that may have grown since the map last covered
    /// it: a map covering less than `volume_bytes` opens at its own size (see
    /// [`IntentMap::volume_bytes`]), and the caller grows it ([`IntentMap::grow`]) when it
    /// tells the target. A map covering more (a volume that shrank) is refused.
    pub fn open_grown(
        io: Arc<dyn BlockIo>,
        volume_bytes: u64,
        cfg: IntentConfig,
    ) -> Result<(IntentMap, IntentOpenReport)> {
        Self::open_inner(io, volume_bytes, cfg, true)
    }

    fn open_inner(
        io: Arc<dyn BlockIo>,
        volume_bytes: u64,
        cfg: IntentConfig,
        allow_smaller: bool,
    ) -> Result<(IntentMap, IntentOpenReport)> {
        cfg.validate()?;
        if volume_bytes == 0 {
            return Err(TapError::Config("write-intent map over an empty volume".into()));
        }
        let name = io.name();
        let len = io.len().map_err(|e| TapError::io("length query", name.clone(), e))?;
        let mut hb = [0u8; HEADER_LEN];
        if len >= HEADER_LEN as u64 {
            io.read_at(&mut hb, 0).map_err(|e| TapError::io("read", name.clone(), e))?;
        }
        let (header, image, slot, other_slot, created) = if hb.iter().all(|&b| b == 0) {
            let header = MapHeader {
                map_id: rand::random::<u64>() | 1,
                region_bytes: cfg.region_bytes,
                volume_bytes,
                max_runs: cfg.max_runs,
                slot_bytes: MapHeader::slot_bytes_for(cfg.max_runs),
            };
            let image = create(&*io, &name, &header)?;
            (header, image, 0, None, true)
        } else {
            let header = MapHeader::decode(&hb, &format!("write-intent map {name} header"))?;
            let mismatch = |field, found, expected| TapError::MapMismatch {
                map: name.clone(),
                field,
                found,
                expected,
            };
            if header.region_bytes != cfg.region_bytes {
                return Err(mismatch("region_bytes", header.region_bytes, cfg.region_bytes));
            }
            if header.max_runs != cfg.max_runs {
                return Err(mismatch(
                    "max_runs",
                    u64::from(header.max_runs),
                    u64::from(cfg.max_runs),
                ));
            }
            let slots = [read_slot(&*io, &name, &header, 0), read_slot(&*io, &name, &header, 1)];
            match slots {
                [Ok(a), Ok(b)] => {
                    if a.generation > b.generation {
                        (header, a, 0, None, false)
                    } else {
                        (header, b, 1, None, false)
                    }
                }
                [Ok(a), Err(e)] => (header, a, 0, Some(e.to_string()), false),
                [Err(e), Ok(b)] => (header, b, 1, Some(e.to_string()), false),
                [Err(a), Err(b)] => {
                    return Err(TapError::NoValidSlot {
                        map: name,
                        slot0: a.to_string(),
                        slot1: b.to_string(),
                    });
                }
            }
        };
        let map_bytes = image.volume_bytes;
        if map_bytes != volume_bytes && !(allow_smaller && map_bytes < volume_bytes) {
            return Err(TapError::MapMismatch {
                map: name,
                field: "volume_bytes",
                found: map_bytes,
                expected: volume_bytes,
            });
        }
        let volume_bytes = map_bytes;
        let dirty = image.regions.clone();
        let dirty_bytes = (dirty.region_count().saturating_mul(header.region_bytes)).min(
            // The last region may extend past the volume's end.
            volume_bytes,
        );
        let report = IntentOpenReport {
            created,
            generation: image.generation,
            slot,
            other_slot,
            dirty: dirty.clone(),
            acked_at_write: image.acked,
            dirty_bytes,
        };
        let state = State {
            hot: BTreeMap::new(),
            oos: dirty.clone(),
            durable: dirty,
            generation: image.generation,
            acked: Seq::ZERO,
            epoch_started: 0,
            epoch_done: 0,
            writing: false,
            poisoned: None,
            slot_writes: 0,
            marks_without_io: 0,
            coalesced_regions: 0,
        };
        let shared = Shared {
            io,
            name,
            header,
            volume_bytes: AtomicU64::new(volume_bytes),
            max_hot: u64::from(cfg.max_hot_regions),
            state: Mutex::new(state),
            cond: Condvar::new(),
        };
        Ok((IntentMap { shared: Arc::new(shared) }, report))
    }

    /// The map file's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The geometry, with the size covered now (the header's as created, grown since).
    pub fn header(&self) -> MapHeader {
        MapHeader { volume_bytes: self.volume_bytes(), ..self.shared.header }
    }

    /// Bytes of the volume the map covers now.
    pub fn volume_bytes(&self) -> u64 {
        self.shared.volume_bytes.load(Ordering::SeqCst)
    }

    /// The volume grew to `new_bytes`: the map covers it from now on, and the regions of
    /// the added range (from the region holding the old end) are out of sync, so that
    /// whatever the grown range holds is resynced. Durable when it returns: one map write
    /// with the new size (a crash before it leaves the old size and image, a crash after it
    /// the new ones). A smaller size is refused ([`TapError::Shrink`]); the same size does
    /// nothing.
    pub fn grow(&self, new_bytes: u64) -> Result<Option<RegionRun>> {
        let sh = &self.shared;
        let mut st = sh.lock();
        sh.check(&st)?;
        let old = sh.volume_bytes.load(Ordering::SeqCst);
        if new_bytes < old {
            return Err(TapError::Shrink {
                object: format!("write-intent map {}", sh.name),
                size: old,
                new_size: new_bytes,
            });
        }
        if new_bytes == old {
            return Ok(None);
        }
        let rb = sh.header.region_bytes;
        let run = RegionRun { first: old / rb, count: new_bytes.div_ceil(rb) - old / rb };
        sh.volume_bytes.store(new_bytes, Ordering::SeqCst);
        st.oos.insert_range(run.first, run.end());
        // An image with the new size is written even if the regions were dirty already.
        st.durable = RegionSet::new();
        sh.commit(st)?;
        Ok(Some(run))
    }

    /// Bytes per region.
    pub fn region_bytes(&self) -> u64 {
        self.shared.header.region_bytes
    }

    /// The regions a byte range touches, or `None` for an empty range; an error when the
    /// range leaves the volume.
    pub fn regions_of(&self, offset: u64, len: u64) -> Result<Option<RegionRun>> {
        let h = &self.header();
        let end = offset.checked_add(len);
        if end.is_none_or(|e| e > h.volume_bytes) {
            return Err(TapError::OutOfRange {
                object: format!("volume of write-intent map {}", self.shared.name),
                offset,
                len,
                object_len: h.volume_bytes,
            });
        }
        if len == 0 {
            return Ok(None);
        }
        let first = offset / h.region_bytes;
        let last = (offset + len - 1) / h.region_bytes;
        Ok(Some(RegionRun { first, count: last - first + 1 }))
    }

    /// The byte range of a run of regions, clipped to the volume: `(offset, len)`.
    pub fn byte_range(&self, run: RegionRun) -> (u64, u64) {
        let h = &self.header();
        let start = run.first.saturating_mul(h.region_bytes).min(h.volume_bytes);
        let end = run.end().saturating_mul(h.region_bytes).min(h.volume_bytes);
        (start, end - start)
    }

    /// Marks the regions of a byte range dirty on disk, as hot regions; returns once the
    /// on-disk map says so. The caller issues its backing write after this returns, and
    /// resolves the returned intent when the write's event is spooled (or not).
    ///
    /// Refused with [`TapError::HotRegionsFull`] when the range would make more regions hot
    /// than the bound allows (nothing is marked then).
    pub fn mark(&self, offset: u64, len: u64) -> Result<WriteIntent> {
        let Some(run) = self.regions_of(offset, len)? else {
            return Ok(WriteIntent::empty());
        };
        let (first, end) = (run.first, run.end());
        let sh = &self.shared;
        let mut st = sh.lock();
        sh.check(&st)?;
        if st.durable.contains_range(first, end) {
            st.register(first, end);
            st.marks_without_io += 1;
            return Ok(WriteIntent::hot(sh.clone(), first, end));
        }
        self.admit(&st, first, end)?;
        st.register(first, end);
        let intent = WriteIntent::hot(sh.clone(), first, end);
        sh.commit(st)?;
        Ok(intent)
    }

    /// Marks several byte ranges in one map write (when any needs one). All or none are
    /// admitted under the hot bound.
    pub fn mark_many(&self, ranges: &[(u64, u64)]) -> Result<Vec<WriteIntent>> {
        let mut runs = Vec::with_capacity(ranges.len());
        for &(offset, len) in ranges {
            runs.push(self.regions_of(offset, len)?);
        }
        let sh = &self.shared;
        let mut st = sh.lock();
        sh.check(&st)?;
        let mut wanted = RegionSet::new();
        for r in runs.iter().flatten() {
            wanted.insert_range(r.first, r.end());
        }
        let all_durable = st.durable.covers(&wanted);
        if !all_durable {
            let new: u64 = self.new_hot(&st, &wanted);
            let in_use = st.hot_in_use();
            if in_use + new > sh.max_hot {
                return Err(self.full(in_use, new));
            }
        }
        let mut intents = Vec::with_capacity(runs.len());
        for r in &runs {
            intents.push(match r {
                Some(r) => {
                    st.register(r.first, r.end());
                    WriteIntent::hot(sh.clone(), r.first, r.end())
                }
                None => WriteIntent::empty(),
            });
        }
        if all_durable {
            st.marks_without_io += 1;
            return Ok(intents);
        }
        sh.commit(st)?;
        Ok(intents)
    }

    /// Marks the regions of a byte range dirty on disk as out of sync (to be resynced), outside
    /// the hot bound; returns once the on-disk map says so. For writes that cannot be
    /// captured (spool overflow, hot bound exhausted, ranges larger than the bound).
    pub fn mark_out_of_sync(&self, offset: u64, len: u64) -> Result<WriteIntent> {
        let Some(run) = self.regions_of(offset, len)? else {
            return Ok(WriteIntent::empty());
        };
        let sh = &self.shared;
        let mut st = sh.lock();
        sh.check(&st)?;
        st.oos.insert_range(run.first, run.end());
        sh.cond.notify_all();
        if st.durable.contains_range(run.first, run.end()) {
            st.marks_without_io += 1;
            return Ok(WriteIntent::empty());
        }
        sh.commit(st)?;
        Ok(WriteIntent::empty())
    }

    /// Blocks until a mark of this byte range would be admitted under the hot bound, or until
    /// `timeout`; returns whether there is room. Room is freed by acknowledgements.
    pub fn wait_for_room(&self, offset: u64, len: u64, timeout: Duration) -> Result<bool> {
        let Some(run) = self.regions_of(offset, len)? else {
            return Ok(true);
        };
        let sh = &self.shared;
        let deadline = Instant::now() + timeout;
        let mut st = sh.lock();
        loop {
            sh.check(&st)?;
            if self.admit(&st, run.first, run.end()).is_ok() {
                return Ok(true);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            st = sh.cond.wait_timeout(st, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    fn new_hot(&self, st: &State, wanted: &RegionSet) -> u64 {
        wanted.iter().filter(|&r| !st.is_hot(r) && !st.oos.contains(r)).count() as u64
    }

    fn admit(&self, st: &State, first: u64, end: u64) -> Result<()> {
        let limit = self.shared.max_hot;
        let in_use = st.hot_in_use();
        if end - first > limit {
            return Err(self.full(in_use, end - first));
        }
        let new = (first..end).filter(|&r| !st.is_hot(r) && !st.oos.contains(r)).count() as u64;
        if in_use + new > limit {
            return Err(self.full(in_use, new));
        }
        Ok(())
    }

    fn full(&self, hot: u64, needed: u64) -> TapError {
        let sh = &self.shared;
        TapError::HotRegionsFull {
            map: sh.name.clone(),
            hot,
            needed,
            limit: sh.max_hot,
            resync_bound_bytes: sh.max_hot.saturating_mul(sh.header.region_bytes),
        }
    }

    /// Records that the target acknowledged every event up to `upto`: regions whose writes
    /// are all at or below it become clean (cleared on disk lazily).
    pub fn acknowledge(&self, upto: Seq) {
        let mut st = self.shared.lock();
        if upto > st.acked {
            st.acked = upto;
        }
        self.shared.cond.notify_all();
    }

    /// Records that a resync copied these regions: they leave the out-of-sync set (cleared on
    /// disk lazily, and only if no unacknowledged write is in them).
    pub fn resynced(&self, run: RegionRun) {
        let mut st = self.shared.lock();
        st.oos.remove_range(run.first, run.end());
        self.shared.cond.notify_all();
    }

    /// Writes an image without the clean regions (when it differs from the one on disk).
    pub fn clear_clean(&self) -> Result<()> {
        let sh = &self.shared;
        let mut st = sh.lock();
        sh.check(&st)?;
        let acked = st.acked;
        st.hot.retain(|_, h| h.inflight > 0 || h.last_seq > acked);
        sh.commit(st)
    }

    /// Clean shutdown: clears the clean regions on disk. What stays dirty is what still needs
    /// a resync (unacknowledged or out-of-sync writes).
    pub fn close(self) -> Result<()> {
        self.clear_clean()
    }

    /// The regions the on-disk map marks dirty (what a resync after a crash now would copy).
    pub fn dirty_regions(&self) -> RegionSet {
        self.shared.lock().durable.clone()
    }

    /// The regions out of sync (to be resynced whatever happens; after open, every region
    /// the map marked dirty).
    pub fn out_of_sync(&self) -> RegionSet {
        self.shared.lock().oos.clone()
    }

    /// The highest acknowledged sequence number known to the map.
    pub fn acked(&self) -> Seq {
        self.shared.lock().acked
    }

    /// Counters and bounds.
    pub fn status(&self) -> IntentStatus {
        let sh = &self.shared;
        let st = sh.lock();
        let oos = st.oos.region_count();
        IntentStatus {
            region_bytes: sh.header.region_bytes,
            hot_regions: st.hot_in_use(),
            max_hot_regions: sh.max_hot,
            out_of_sync_regions: oos,
            dirty_regions: st.durable.region_count(),
            resync_bound_bytes: sh
                .max_hot
                .saturating_add(oos)
                .saturating_mul(sh.header.region_bytes)
                .min(sh.volume_bytes.load(Ordering::SeqCst)),
            generation: st.generation,
            slot_writes: st.slot_writes,
            marks_without_io: st.marks_without_io,
            coalesced_regions: st.coalesced_regions,
        }
    }
}

fn create(io: &dyn BlockIo, name: &str, header: &MapHeader) -> Result<SlotImage> {
    let err = |op, e| TapError::io(op, name, e);
    // Slots first, header last: a file whose header is still zero was never in use and is
    // created again on the next open.
    io.set_len(0).map_err(|e| err("truncate", e))?;
    io.set_len(header.file_len()).map_err(|e| err("truncate", e))?;
    let image = SlotImage {
        generation: 0,
        acked: Seq::ZERO,
        regions: RegionSet::new(),
        volume_bytes: header.volume_bytes,
    };
    io.write_at(&encode_slot(header, &image), header.slot_offset(0))
        .map_err(|e| err("write", e))?;
    io.sync().map_err(|e| err("fdatasync", e))?;
    io.write_at(&header.encode(), 0).map_err(|e| err("write", e))?;
    io.sync().map_err(|e| err("fdatasync", e))?;
    Ok(image)
}

fn read_slot(io: &dyn BlockIo, name: &str, h: &MapHeader, index: u8) -> Result<SlotImage> {
    let object = format!("write-intent map {name} slot {index}");
    let offset = h.slot_offset(index);
    let len = io.len().map_err(|e| TapError::io("length query", name, e))?;
    let available = len.saturating_sub(offset);
    if available < SLOT_HEADER_LEN as u64 {
        return Err(TapError::InvalidField {
            object,
            field: "length",
            found: available,
            expected: format!("at least {SLOT_HEADER_LEN} bytes (the file is cut short)"),
        });
    }
    let mut head = [0u8; SLOT_HEADER_LEN];
    io.read_at(&mut head, offset).map_err(|e| TapError::io("read", name, e))?;
    if head.iter().all(|&b| b == 0) {
        return Err(TapError::InvalidField {
            object,
            field: "magic",
            found: 0,
            expected: "a slot header (this slot was never written)".into(),
        });
    }
    let run_count = decode_slot_header(h, index, &head, &object)? as usize;
    let total = SLOT_HEADER_LEN + run_count * RUN_LEN;
    if available < total as u64 {
        return Err(TapError::InvalidField {
            object,
            field: "length",
            found: available,
            expected: format!("{total} bytes for {run_count} runs (the file is cut short)"),
        });
    }
    let mut b = vec![0u8; total];
    io.read_at(&mut b, offset).map_err(|e| TapError::io("read", name, e))?;
    decode_slot(h, index, &b, &object)
}

/// A mark to resolve: the regions of one write, kept dirty until its event is acknowledged.
///
/// Resolve it with [`WriteIntent::record`] once the write's event is in the spool, or with
/// [`WriteIntent::out_of_sync`] when it could not be spooled. Dropping it unresolved (for
/// example when the backing write failed) counts as out of sync: the regions stay dirty until
/// a resync, never silently clean.
#[derive(Debug)]
#[must_use = "resolve a write intent with record() or out_of_sync()"]
pub struct WriteIntent {
    shared: Option<Arc<Shared>>,
    first: u64,
    end: u64,
}

impl WriteIntent {
    fn empty() -> Self {
        Self { shared: None, first: 0, end: 0 }
    }

    fn hot(shared: Arc<Shared>, first: u64, end: u64) -> Self {
        Self { shared: Some(shared), first, end }
    }

    /// The regions (none for an empty range or an out-of-sync mark).
    pub fn regions(&self) -> Option<RegionRun> {
        self.shared.as_ref().map(|_| RegionRun { first: self.first, count: self.end - self.first })
    }

    /// The write's event is in the spool as `seq`: its regions become clean once the target
    /// acknowledges `seq`.
    pub fn record(mut self, seq: Seq) {
        if let Some(sh) = self.shared.take() {
            let mut st = sh.lock();
            for r in self.first..self.end {
                if let Some(h) = st.hot.get_mut(&r) {
                    h.inflight = h.inflight.saturating_sub(1);
                    h.last_seq = h.last_seq.max(seq);
                }
            }
        }
    }

    /// The write's event could not be spooled: its regions stay dirty until resynced.
    pub fn out_of_sync(mut self) {
        self.resolve_out_of_sync();
    }

    fn resolve_out_of_sync(&mut self) {
        if let Some(sh) = self.shared.take() {
            let mut st = sh.lock();
            for r in self.first..self.end {
                if let Some(h) = st.hot.get_mut(&r) {
                    h.inflight = h.inflight.saturating_sub(1);
                }
            }
            st.oos.insert_range(self.first, self.end);
            sh.cond.notify_all();
        }
    }
}

impl Drop for WriteIntent {
    fn drop(&mut self) {
        self.resolve_out_of_sync();
    }
}

/// Fuzz entry point: decodes arbitrary bytes as a map file (header, both slots, and the open
/// path over an in-memory file). Never panics; every image decoded re-encodes to itself.
pub fn fuzz_intent_map(data: &[u8]) {
    if data.len() < HEADER_LEN {
        return;
    }
    let Ok(h) = MapHeader::decode(&data[..HEADER_LEN], "fuzz header") else { return };
    assert_eq!(MapHeader::decode(&h.encode(), "fuzz header").ok(), Some(h), "header round trip");
    for index in 0..2u8 {
        let offset = h.slot_offset(index);
        let Some(slot) = usize::try_from(offset).ok().and_then(|o| data.get(o..)) else {
            continue;
        };
        if let Ok(img) = decode_slot(&h, index, slot, "fuzz slot") {
            let regions = img.volume_bytes.div_ceil(h.region_bytes);
            assert!(img.volume_bytes >= h.volume_bytes, "a map only grows");
            assert!(img.regions.runs().all(|r| r.end() <= regions), "runs in range");
            let again = decode_slot(&h, index, &encode_slot(&h, &img), "fuzz slot");
            assert_eq!(again.ok(), Some(img), "slot round trip");
        }
    }
    let io = tidemark_journal::MemVolume::new(0);
    if io.write_at(data, 0).is_err() {
        return;
    }
    let cfg =
        IntentConfig { region_bytes: h.region_bytes, max_hot_regions: 8, max_runs: h.max_runs };
    if let Ok((map, report)) = IntentMap::open_grown(Arc::new(io), u64::MAX, cfg) {
        assert!(!report.created, "a valid header is never recreated");
        assert_eq!(map.dirty_regions(), report.dirty);
    }
}
