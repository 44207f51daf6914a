//! Damaged records of the retention log: the ranges they covered are reported, the points
//! that depend on them are withdrawn until a repair resync ends, a crash in the middle of the
//! repair keeps them withdrawn, a scrub finds damage after open, and a retention pass never
//! rewrites or drops a damaged segment before its repair.

use std::sync::Arc;
use std::time::Duration;

use tidemark_journal::format::{self, RECORD_HEADER_LEN, RecordKind};
use tidemark_journal::{
    BlockIo, CrashMode, Dir, Event, FsDir, JournalDamage, ManualClock, MemDir, MemVolume, Nanos,
    PointKind, RecoveryPoint, RetentionConfig, RetentionLog, RetentionPolicy, Seq, VolumeId,
};

mod common;
use common::Feed;

const VOL: u64 = 256 << 10;
const BLOCKS: u64 = VOL / 4096;

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(Nanos(1_800_000_000 * Nanos::SECOND)))
}

fn open_in(dir: Arc<dyn Dir>, base: &Arc<MemVolume>, clock: &Arc<ManualClock>) -> RetentionLog {
    let cfg = RetentionConfig {
        segment_bytes: 64 << 10,
        policy: RetentionPolicy::default(),
        ..Default::default()
    };
    RetentionLog::open(dir, vec![base.clone() as Arc<dyn BlockIo>], cfg, clock.clone())
        .expect("open")
        .0
}

impl Feed {
    /// Writes 8 KiB records and barriers until the log has at least `segments` segments.
    fn fill(&mut self, segments: usize) {
        let mut i = 0u64;
        while self.log.status().bytes < segments as u64 * (64 << 10) {
            self.push(Event::Write {
                volume: VolumeId(0),
                offset: (i * 2 % BLOCKS) * 4096,
                data: vec![(i % 250) as u8 + 1; 8192].into(),
            });
            self.push(Event::Barrier);
            i += 1;
        }
        self.log.sync().expect("sync");
    }

    fn read_point(&self, p: &tidemark_journal::PointInfo) -> Vec<u8> {
        let mut got = vec![0u8; VOL as usize];
        self.log.read_at(p, VolumeId(0), 0, &mut got).expect("read");
        got
    }

    /// Every offered point reads back the model's state there.
    fn check_points(&self) -> usize {
        let points = self.log.points();
        for p in &points {
            assert_eq!(self.read_point(p), self.states[p.seq.0 as usize], "point {p:?}");
        }
        points.len()
    }

    /// The repair a source runs: the ranges as the model holds them now, in a window with
    /// the damage's repair id. Returns the `ResyncEnd`'s seq.
    fn repair(&mut self, d: &JournalDamage) -> Seq {
        self.push(Event::ResyncBegin { id: d.repair_id });
        for (v, off, len) in d.ranges.clone() {
            let data = self.cur[off as usize..(off + len) as usize].to_vec();
            self.push(Event::Write { volume: v, offset: off, data: data.into() });
        }
        self.push(Event::ResyncEnd { id: d.repair_id })
    }
}

/// A sealed segment from the middle of the log, and the offset of a `Write` record in it.
fn victim(bytes_of: impl Fn(&str) -> Vec<u8>, names: &[String]) -> (String, u64, u64) {
    let name = names[names.len() / 2].clone();
    let scan = format::scan_segment(&bytes_of(&name), &name).expect("scan");
    let r = scan
        .records
        .iter()
        .filter(|r| r.header.kind == RecordKind::Write)
        .nth(2)
        .expect("a write in the middle segment");
    (name, r.offset, r.header.seq.0)
}

fn flip(bytes: &mut [u8], at: u64) {
    bytes[at as usize] ^= 0x5a;
}

#[test]
fn a_damaged_payload_reports_its_range_and_withdraws_the_points_after_it_until_repaired() {
    let (dir, base, clock) = (MemDir::new(), Arc::new(MemVolume::new(VOL)), clock());
    let mut feed = Feed::new(open_in(Arc::new(dir.clone()), &base, &clock), clock.clone());
    feed.fill(5);
    let mut names = dir.list_segments();
    names.sort();
    let (name, off, lost_seq) = victim(|n| dir.read_file(n).unwrap(), &names);
    let mut bytes = dir.read_file(&name).unwrap();
    flip(&mut bytes, off + RECORD_HEADER_LEN as u64 + 100);
    dir.write_file(&name, bytes);
    let all_before = feed.log.points().len();
    drop(std::mem::replace(&mut feed.log, open_in(Arc::new(dir.clone()), &base, &clock)));

    let damage = feed.log.damage().to_vec();
    assert_eq!(damage.len(), 1, "{damage:?}");
    let d = &damage[0];
    assert_eq!((d.segment.as_str(), d.offset), (name.as_str(), off));
    assert!(!d.whole_volume);
    assert_eq!(d.lost_from, Seq(lost_seq));
    // The record's range: 8 KiB of volume 0, as written at that seq.
    let i = (lost_seq - 1) / 2;
    assert_eq!(d.ranges, vec![(VolumeId(0), (i * 2 % BLOCKS) * 4096, 8192)]);
    assert_eq!(d.repaired_at, None);
    assert_eq!(feed.log.repairs_needed().len(), 1);
    assert!(feed.log.status().damage.len() == 1);
    // No offered point at or after the lost record; every one offered is exact.
    let points = feed.log.points();
    assert!(points.iter().all(|p| p.seq < d.lost_from), "{points:?}");
    assert!(points.len() < all_before);
    feed.check_points();
    let latest = feed.log.resolve(&RecoveryPoint::Latest).expect("latest");
    assert!(latest.seq < d.lost_from, "latest {latest:?} depends on the lost record");
    assert_eq!(feed.read_point(&latest), feed.states[latest.seq.0 as usize]);
    let err = feed.log.resolve(&RecoveryPoint::Seq(Seq(lost_seq + 1))).unwrap_err().to_string();
    assert!(err.contains(&name) && err.contains("damage"), "{err}");
    // A dedupe read of the lost range as of a later write is refused, not answered wrong.
    let (v, o, _) = d.ranges[0];
    let mut buf = vec![0u8; 4096];
    assert!(feed.log.read_as_of(Seq(lost_seq + 2), v, o, &mut buf).is_err());

    // The repair: a resync of the range with the damage's id.
    let end = feed.repair(d);
    let after = feed.push(Event::Barrier);
    feed.log.sync().unwrap();
    assert_eq!(feed.log.damage()[0].repaired_at, Some(end));
    assert!(feed.log.repairs_needed().is_empty());
    let points = feed.log.points();
    assert!(points.iter().any(|p| p.seq == end && matches!(p.kind, PointKind::ResyncEnd { .. })));
    assert!(points.iter().any(|p| p.seq == after));
    assert!(points.iter().all(|p| p.seq < d.lost_from || p.seq >= end), "{points:?}");
    feed.check_points();
    let latest = feed.log.resolve(&RecoveryPoint::Latest).unwrap();
    assert_eq!(latest.seq, after);
    assert_eq!(feed.read_point(&latest), feed.cur);

    // Reopened: the same damage, recognised as repaired by the same window.
    drop(std::mem::replace(&mut feed.log, open_in(Arc::new(dir.clone()), &base, &clock)));
    assert_eq!(feed.log.damage()[0].repaired_at, Some(end));
    assert_eq!(feed.log.points(), points);
    feed.check_points();
}

#[test]
fn a_damaged_header_makes_the_whole_volume_suspect() {
    let (dir, base, clock) = (MemDir::new(), Arc::new(MemVolume::new(VOL)), clock());
    let mut feed = Feed::new(open_in(Arc::new(dir.clone()), &base, &clock), clock.clone());
    feed.fill(4);
    let mut names = dir.list_segments();
    names.sort();
    let (name, off, lost_seq) = victim(|n| dir.read_file(n).unwrap(), &names);
    let mut bytes = dir.read_file(&name).unwrap();
    flip(&mut bytes, off + 30); // the header's `offset` field: its checksum fails
    dir.write_file(&name, bytes);
    drop(std::mem::replace(&mut feed.log, open_in(Arc::new(dir.clone()), &base, &clock)));
    let d = feed.log.damage()[0].clone();
    assert!(d.whole_volume, "{d:?}");
    assert_eq!(d.ranges, vec![(VolumeId(0), 0, VOL)]);
    // The record before it was a barrier at lost_seq - 1: the loss starts right after it.
    assert_eq!(d.lost_from, Seq(lost_seq));
    assert!(feed.log.points().iter().all(|p| p.seq < d.lost_from));
    feed.check_points();
    let end = feed.repair(&d);
    assert_eq!(feed.log.damage()[0].repaired_at, Some(end));
    let latest = feed.log.resolve(&RecoveryPoint::Latest).unwrap();
    assert_eq!(feed.read_point(&latest), feed.cur);
}

#[test]
fn a_crash_in_the_middle_of_a_repair_keeps_the_points_withdrawn() {
    let (dir, base, clock) = (MemDir::new(), Arc::new(MemVolume::new(VOL)), clock());
    let mut feed = Feed::new(open_in(Arc::new(dir.clone()), &base, &clock), clock.clone());
    feed.fill(4);
    let mut names = dir.list_segments();
    names.sort();
    let (name, off, _) = victim(|n| dir.read_file(n).unwrap(), &names);
    let mut bytes = dir.read_file(&name).unwrap();
    flip(&mut bytes, off + RECORD_HEADER_LEN as u64);
    dir.write_file(&name, bytes);
    drop(std::mem::replace(&mut feed.log, open_in(Arc::new(dir.clone()), &base, &clock)));
    let d = feed.log.damage()[0].clone();
    let before = feed.log.points();
    // The repair starts, and its window and half its copy are durable; then a crash.
    feed.push(Event::ResyncBegin { id: d.repair_id });
    feed.write(d.ranges[0].1 / 4096, 0xEE);
    feed.log.sync().unwrap();
    feed.push(Event::Barrier);
    let crashed = dir.crash(CrashMode::LoseUnsynced);
    drop(std::mem::replace(&mut feed.log, open_in(Arc::new(crashed.clone()), &base, &clock)));
    let again = feed.log.damage()[0].clone();
    assert_eq!((again.repair_id, again.repaired_at), (d.repair_id, None));
    // The repair's window is open: not asked for again (the source's next resync closes it).
    assert!(feed.log.repairs_needed().is_empty());
    assert_eq!(feed.log.status().inconsistent.map(|w| w.open_ids), Some(vec![d.repair_id]));
    assert_eq!(feed.log.points(), before, "no point appears while the repair is open");
    let latest = feed.log.resolve(&RecoveryPoint::Latest).unwrap();
    assert!(latest.seq < d.lost_from);
    // The source's whole-volume resync after the crash closes the repair's window too.
    feed.seq = feed.log.last_seq().0;
    feed.states.truncate(feed.seq as usize + 1);
    feed.cur = feed.states[feed.seq as usize].clone();
    feed.push(Event::ResyncBegin { id: 77 });
    let data = feed.cur.clone();
    feed.push(Event::Write { volume: VolumeId(0), offset: 0, data: data.into() });
    feed.push(Event::ResyncEnd { id: 77 });
    let end = feed.push(Event::ResyncEnd { id: d.repair_id });
    assert_eq!(feed.log.damage()[0].repaired_at, Some(end));
    let latest = feed.log.resolve(&RecoveryPoint::Latest).unwrap();
    assert_eq!(feed.read_point(&latest), feed.cur);
}

#[test]
fn a_scrub_finds_damage_after_open_and_retention_keeps_the_damaged_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let fs: Arc<dyn Dir> = Arc::new(FsDir::new(tmp.path()).unwrap());
    let (base, clock) = (Arc::new(MemVolume::new(VOL)), clock());
    let mut feed = Feed::new(open_in(fs.clone(), &base, &clock), clock.clone());
    feed.fill(5);
    let mut names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".seg"))
        .collect();
    names.sort();
    let read = |n: &str| std::fs::read(tmp.path().join(n)).unwrap();
    let (name, off, lost_seq) = victim(read, &names);
    assert!(feed.log.scrub().unwrap().is_empty(), "an intact log scrubs clean");
    let mut bytes = read(&name);
    flip(&mut bytes, off + RECORD_HEADER_LEN as u64 + 7);
    std::fs::write(tmp.path().join(&name), bytes).unwrap();
    // A point resolved before the scrub (a vsnap's) and depending on the lost record.
    let held = feed.log.resolve(&RecoveryPoint::Seq(Seq(lost_seq + 1))).unwrap();
    // A read that meets the damaged record fails (no wrong bytes) and leaves it for the
    // next scrub, which registers it first.
    let mut block = vec![0u8; 4096];
    let (_, lost_at) = {
        let scan = format::scan_segment(&read(&name), &name).unwrap();
        let d = scan.defects[0].header.unwrap();
        (d.seq, d.offset)
    };
    assert!(feed.log.read_as_of(Seq(lost_seq), VolumeId(0), lost_at, &mut block).is_err());
    let found = feed.log.note_read_damage().unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!((found[0].segment.as_str(), found[0].lost_from), (name.as_str(), Seq(lost_seq)));
    assert!(feed.log.scrub().unwrap().is_empty(), "known damage is not reported twice");
    // Damage no read met: found by the scrub.
    let other = names[1].clone();
    assert_ne!(other, name);
    let scan = format::scan_segment(&read(&other), &other).unwrap();
    let w = scan.records.iter().find(|r| r.header.kind == RecordKind::Write).unwrap().clone();
    let mut bytes = read(&other);
    flip(&mut bytes, w.offset + RECORD_HEADER_LEN as u64 + 9);
    std::fs::write(tmp.path().join(&other), bytes).unwrap();
    let found = feed.log.scrub().unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!((found[0].segment.as_str(), found[0].lost_from), (other.as_str(), w.header.seq));
    // The lost record left the index: the replica as it is reads (without it), as on open.
    let mut now = vec![0u8; VOL as usize];
    feed.log.read_current(VolumeId(0), 0, &mut now).expect("read past the lost record");
    // The point resolved before reads no wrong bytes: its read is refused.
    let err = feed.log.read_at(&held, VolumeId(0), 0, &mut now).unwrap_err().to_string();
    assert!(err.contains("damage"), "{err}");
    let first_lost = Seq(lost_seq.min(w.header.seq.0));
    assert!(feed.log.points().iter().all(|p| p.seq < first_lost));
    // Retention that would thin everything to one point per hour: the damaged segment is
    // neither rewritten nor dropped, and what stays offered reads back exactly.
    feed.log
        .set_policy(RetentionPolicy {
            tiers: vec![tidemark_journal::Tier {
                older_than: Duration::ZERO,
                keep: tidemark_journal::Keep::Every {
                    interval: Duration::from_secs(3600),
                    bookmarks: vec![],
                },
            }],
            ..Default::default()
        })
        .unwrap();
    feed.log.enforce().unwrap();
    assert!(tmp.path().join(&name).exists(), "the damaged segment went before its repair");
    assert_eq!(feed.log.scrub().unwrap().len(), 0);
    feed.check_points();
    drop(std::mem::replace(&mut feed.log, open_in(fs.clone(), &base, &clock)));
    assert_eq!(feed.log.damage().len(), 2, "the damage is found again on open");
    feed.check_points();
    for d in feed.log.damage().to_vec() {
        feed.repair(&d);
    }
    feed.push(Event::Barrier);
    feed.log.enforce().unwrap();
    feed.check_points();
    let latest = feed.log.resolve(&RecoveryPoint::Latest).unwrap();
    assert_eq!(feed.read_point(&latest), feed.cur);
}
