//! Repair of a damaged target journal end to end: a tap, a shipper, a receiver over a
//! retention log on disk and the pair controller. A record of a sealed segment is damaged
//! while the pair is connected; a scrub finds it, the receiver sends a `RepairRequest`, the
//! pair resyncs the ranges in a window with the damage's repair id, and the replica ends
//! identical to the device, with its latest point offered again.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{BLOCK, PATIENCE, Rng, data, paired, ship_config};
use tidemark_journal::format::{RECORD_HEADER_LEN, RecordKind, scan_segment};
use tidemark_journal::{
    BlockIo, Dir, FsDir, MemDir, MemVolume, RecoveryPoint, RetentionConfig, RetentionLog, Seq,
    Spool, SpoolConfig, SystemClock, VolumeId,
};
use tidemark_sync::apply::{Receiver, ReceiverConfig};
use tidemark_sync::pair::{PairStage, SourcePair, SourcePairConfig};
use tidemark_sync::ship::{Shipper, ShipperHandle};
use tidemark_sync::syncer::{Syncer, SyncerConfig};
use tidemark_sync::wire::{Hello, Role, SUPPORTED_VERSIONS, VolumeInfo};
use tidemark_tap::{IntentConfig, IntentMap, Tap, TapConfig};

const SIZE: u64 = 8 << 20;

struct Rig {
    _tmp: tempfile::TempDir,
    journal: std::path::PathBuf,
    tap: Arc<Tap>,
    device: Arc<MemVolume>,
    receiver: Receiver,
    shipper: Option<ShipperHandle>,
}

impl Rig {
    fn new() -> Rig {
        let tmp = tempfile::tempdir().unwrap();
        let journal = tmp.path().join("journal");
        std::fs::create_dir_all(&journal).unwrap();
        let device = Arc::new(MemVolume::new(SIZE));
        let (cs, ct) = paired();
        let (spool, _) = Spool::open(
            Arc::new(MemDir::new()),
            SpoolConfig { capacity_bytes: 1 << 30, segment_bytes: 1 << 20, key: None },
            Arc::new(SystemClock),
        )
        .unwrap();
        let map_dir = MemDir::new();
        let (intent, _) = IntentMap::open(
            Dir::open(&map_dir, "intent.map", true).unwrap(),
            SIZE,
            IntentConfig { region_bytes: 1 << 20, max_hot_regions: 64, max_runs: 256 },
        )
        .unwrap();
        let tap = Arc::new(
            Tap::new(device.clone() as Arc<dyn BlockIo>, spool, intent, TapConfig::default())
                .unwrap(),
        );
        let (log, _) = RetentionLog::open(
            Arc::new(FsDir::new(&journal).unwrap()),
            vec![Arc::new(MemVolume::new(SIZE)) as Arc<dyn BlockIo>],
            RetentionConfig { segment_bytes: 64 << 10, ..Default::default() },
            Arc::new(SystemClock),
        )
        .unwrap();
        let receiver =
            Receiver::new(log, ReceiverConfig::new("target-repair", common::PAIR, ct)).unwrap();
        let mut scfg = ship_config(cs);
        scfg.hello = Hello {
            versions: SUPPORTED_VERSIONS,
            role: Role::Source,
            node: "source-repair".to_owned(),
            pair: common::PAIR,
            volumes: vec![VolumeInfo { id: VolumeId(0), block_size: BLOCK as u32, size: SIZE }],
        };
        let r = receiver.clone();
        let shipper =
            Shipper::new(tap.shared_spool(), scfg).start(move || common::pipe_to(&r)).unwrap();
        Rig { _tmp: tmp, journal, tap, device, receiver, shipper: Some(shipper) }
    }

    fn shipper(&self) -> &ShipperHandle {
        self.shipper.as_ref().unwrap()
    }

    fn caught_up(&self) -> Seq {
        let last = self.tap.sync_spool().unwrap();
        self.shipper().notify();
        self.shipper().wait_for(PATIENCE, |s| s.acked >= last).expect("caught up");
        last
    }

    fn device_bytes(&self) -> Vec<u8> {
        let mut buf = vec![0u8; SIZE as usize];
        self.device.read_at(&mut buf, 0).unwrap();
        buf
    }

    /// The latest point the target offers, read whole.
    fn latest(&self) -> (Seq, Vec<u8>) {
        let mut buf = vec![0u8; SIZE as usize];
        let seq = self.receiver.with_log(|log| {
            let p = log.resolve(&RecoveryPoint::Latest).unwrap();
            log.read_at(&p, VolumeId(0), 0, &mut buf).unwrap();
            p.seq
        });
        (seq, buf)
    }

    /// A sealed segment in the middle of the journal, and the offset of a `Write` in it.
    fn victim(&self) -> (std::path::PathBuf, u64, Seq) {
        let mut segs: Vec<_> = std::fs::read_dir(&self.journal)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "seg"))
            .collect();
        segs.sort();
        assert!(segs.len() >= 4, "too few segments: {segs:?}");
        let path = segs[segs.len() / 2].clone();
        let scan = scan_segment(&std::fs::read(&path).unwrap(), "victim").unwrap();
        let r = scan.records.iter().find(|r| r.header.kind == RecordKind::Write).unwrap();
        (path, r.offset, r.header.seq)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(shipper) = self.shipper.take() {
            shipper.stop();
        }
        self.receiver.shutdown();
    }
}

#[test]
fn a_segment_damaged_while_connected_is_repaired_by_the_source_and_the_replica_is_identical() {
    let rig = Rig::new();
    let mut cfg = SourcePairConfig::new(SyncerConfig::new(VolumeId(0)));
    cfg.tick = Duration::from_millis(20);
    cfg.fresh = true;
    let pair = SourcePair::start(rig.tap.clone(), rig.shipper().hash_client(), cfg).unwrap();
    pair.wait_for(PATIENCE, |s| s.stage == PairStage::DiffSync && s.resyncs >= 1)
        .expect("initial sync");
    // Writes and flushes: many 64 KiB segments, each with several points.
    let mut rng = Rng::new(61);
    for i in 0..96u64 {
        let off = (rng.below(SIZE / BLOCK - 4)) * BLOCK;
        rig.tap.write(off, Bytes::from(data(&mut rng, 4 * BLOCK as usize))).unwrap();
        if i % 3 == 2 {
            rig.tap.flush().unwrap();
        }
    }
    rig.tap.flush().unwrap();
    rig.caught_up();
    assert_eq!(rig.latest().1, rig.device_bytes(), "identical before the damage");
    // A verify first: the target builds (and caches) its whole tree in this session. The
    // repair's leaf requests later must not be answered from that stale tree.
    let syncer =
        Syncer::new(rig.tap.clone(), rig.shipper().hash_client(), SyncerConfig::new(VolumeId(0)));
    assert!(syncer.verify(None).unwrap().ranges.is_empty());

    // Bit rot in a sealed segment, under the running receiver.
    let (path, off, lost) = rig.victim();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[off as usize + RECORD_HEADER_LEN + 33] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let found = rig.receiver.scrub().unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].lost_from, lost);
    assert!(!found[0].whole_volume);
    let (latest, _) = rig.latest();
    assert!(latest < lost, "latest (seq {latest}) still offered past the lost record {lost}");

    // The request reaches the source, whose pair resyncs the range; the target offers a
    // point again once the repair's end arrives, and it equals the device.
    pair.wait_for(PATIENCE, |s| s.repairs >= 1 && s.stage == PairStage::DiffSync)
        .unwrap_or_else(|| panic!("no repair: {:?} {:?}", pair.status(), rig.shipper().status()));
    assert!(rig.receiver.status().repair_requests >= 1);
    assert_eq!(rig.shipper().status().repair_request.unwrap().ids, vec![found[0].repair_id]);
    let report = pair.status().last_repair.unwrap();
    assert_eq!(report.id, found[0].repair_id);
    assert!(report.differing_bytes > 0, "the lost write must differ: {report:?}");
    assert!(report.volume_bytes <= 4 * BLOCK, "only the lost range is compared: {report:?}");
    rig.caught_up();
    let damage = rig.receiver.with_log(|log| log.damage().to_vec());
    assert!(damage[0].repaired_at.is_some_and(|e| e >= report.end_seq), "{damage:?}");
    let (latest, bytes) = rig.latest();
    assert!(latest >= report.end_seq);
    assert_eq!(bytes, rig.device_bytes(), "the repaired replica equals the device");
    // And the verify pass agrees: nothing differs.
    let diff = syncer.verify(None).unwrap();
    assert!(diff.ranges.is_empty(), "verify found {:?}", diff.ranges);
    // No second repair is asked for.
    assert!(rig.receiver.with_log(|log| log.repairs_needed()).is_empty());
    pair.stop();
}
