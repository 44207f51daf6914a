//! The in-process replication rig the crash-consistency tests share: a source spool (behind a
//! tap, or filled directly from a recording), a shipper, and a receiver over a retention log
//! whose base image is in memory, connected by in-memory pipes through the Noise channel.
//! And the pass that checks every recovery point the target offers against a recorded
//! history.

#![allow(dead_code)]

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tidemark_journal::{
    BlockIo, MemDir, MemVolume, PointInfo, PointKind, RecoveryPoint, RetentionConfig, RetentionLog,
    Seq, Spool, SpoolConfig, SystemClock, VolumeId,
};
use tidemark_sync::apply::{Receiver, ReceiverConfig};
use tidemark_sync::pipe::duplex;
use tidemark_sync::secure::{AllowedPeers, Keypair, SecureConfig};
use tidemark_sync::ship::{Backoff, Shipper, ShipperConfig, ShipperHandle};
use tidemark_sync::wire::{Hello, PairId, Role, SUPPORTED_VERSIONS, VolumeInfo};
use tidemark_tap::{IntentConfig, IntentMap, Tap, TapConfig};
use tidemark_tests::crashcheck::{History, Verdict};
use tidemark_tests::figures;

/// The retention log's block size.
pub const BLOCK: u64 = 4096;
/// How long any wait may take before the test fails (a safety net, never a delay).
pub const PATIENCE: Duration = Duration::from_secs(120);
const PAIR: PairId = PairId([0xC5; 16]);

/// A spool in memory, big enough never to overflow in these tests.
pub fn memory_spool() -> Spool {
    Spool::open(
        Arc::new(MemDir::new()),
        SpoolConfig { capacity_bytes: 1 << 30, segment_bytes: 1 << 20, key: None },
        Arc::new(SystemClock),
    )
    .expect("open spool in memory")
    .0
}

/// A tap over `device` appending to `spool`, its intent map in memory.
pub fn tap_over(device: Arc<dyn BlockIo>, spool: Arc<Mutex<Spool>>) -> Arc<Tap> {
    let size = device.len().expect("device length");
    let map_dir = MemDir::new();
    let region_bytes = 1 << 20;
    let (intent, _) = IntentMap::open(
        tidemark_journal::Dir::open(&map_dir, "intent.map", true).expect("intent map file"),
        size,
        IntentConfig {
            region_bytes,
            max_hot_regions: (size / region_bytes) as u32 + 1,
            max_runs: 1024,
        },
    )
    .expect("intent map");
    Arc::new(Tap::with_shared_spool(device, spool, intent, TapConfig::default()).expect("tap"))
}

/// A shipper of one spool and the receiver it ships to.
pub struct Replication {
    pub receiver: Receiver,
    shipper: Option<ShipperHandle>,
    link_up: Arc<AtomicBool>,
    size: u64,
}

impl Replication {
    /// Starts shipping `spool` (of a volume of `size` bytes) to a new retention log over a
    /// zeroed base image in memory.
    pub fn start(spool: Arc<Mutex<Spool>>, size: u64) -> Replication {
        Self::start_with_link(spool, size, true)
    }

    /// As [`Replication::start`], with the link up or down from the start.
    pub fn start_with_link(spool: Arc<Mutex<Spool>>, size: u64, up: bool) -> Replication {
        let base: Arc<dyn BlockIo> = Arc::new(MemVolume::new(size));
        let (log, _) = RetentionLog::open(
            Arc::new(MemDir::new()),
            vec![base],
            RetentionConfig { segment_bytes: 4 << 20, ..Default::default() },
            Arc::new(SystemClock),
        )
        .expect("open retention log");
        let s = Keypair::generate().expect("source key");
        let t = Keypair::generate().expect("target key");
        let cs = SecureConfig::new(s.clone(), AllowedPeers::from_keys([*t.public()]));
        let ct = SecureConfig::new(t, AllowedPeers::from_keys([*s.public()]));
        let mut rcfg = ReceiverConfig::new("target-crashcheck", PAIR, ct);
        rcfg.sync_bytes = 1 << 20;
        let receiver = Receiver::new(log, rcfg).expect("receiver");
        let hello = Hello {
            versions: SUPPORTED_VERSIONS,
            role: Role::Source,
            node: "source-crashcheck".to_owned(),
            pair: PAIR,
            volumes: vec![VolumeInfo { id: VolumeId(0), block_size: BLOCK as u32, size }],
        };
        let mut scfg = ShipperConfig::new(hello, cs);
        scfg.batch_bytes = 128 << 10;
        scfg.window_bytes = 1 << 20;
        scfg.poll_interval = Duration::from_millis(5);
        scfg.backoff = Backoff {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(20),
            factor: 2,
        };
        let link_up = Arc::new(AtomicBool::new(up));
        let (up, r) = (link_up.clone(), receiver.clone());
        let shipper = Shipper::new(spool, scfg)
            .start(move || {
                if !up.load(Ordering::SeqCst) {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        "link down (test)",
                    ));
                }
                let (a, b) = duplex(1 << 20);
                let r = r.clone();
                std::thread::spawn(move || {
                    let _ = r.serve(b);
                });
                Ok(a)
            })
            .expect("start shipper");
        Replication { receiver, shipper: Some(shipper), link_up, size }
    }

    /// Brings the link down (the current session is cut, reconnects are refused) or up.
    pub fn set_link(&self, up: bool) {
        self.link_up.store(up, Ordering::SeqCst);
        if !up {
            self.receiver.disconnect();
        }
        self.shipper().notify();
    }

    fn shipper(&self) -> &ShipperHandle {
        self.shipper.as_ref().expect("shipper running")
    }

    /// Waits until the target acknowledged `last`.
    pub fn wait_acked(&self, last: Seq) -> Seq {
        self.shipper().notify();
        let status = self.shipper().wait_for(PATIENCE, |s| s.acked >= last).unwrap_or_else(|| {
            panic!("target never acknowledged seq {last}: {:?}", self.shipper().status())
        });
        status.acked
    }

    /// Every point the target offers, then `Latest`, in sequence order.
    pub fn points(&self) -> Vec<PointInfo> {
        self.receiver.with_log(|log| {
            let mut points = log.points();
            let latest = log.resolve(&RecoveryPoint::Latest).expect("resolve latest");
            if points.last().is_none_or(|p| p.seq < latest.seq) {
                points.push(latest);
            }
            points
        })
    }

    /// The whole volume as of `point`.
    pub fn read_point(&self, point: &PointInfo) -> Vec<u8> {
        let mut image = vec![0u8; self.size as usize];
        self.receiver
            .with_log(|log| log.read_at(point, VolumeId(0), 0, &mut image))
            .unwrap_or_else(|e| panic!("read the volume at seq {}: {e}", point.seq));
        image
    }
}

impl Drop for Replication {
    fn drop(&mut self) {
        if let Some(shipper) = self.shipper.take() {
            shipper.stop();
        }
        self.receiver.shutdown();
    }
}

/// What [`check_every_point`] found.
#[derive(Debug, Default)]
pub struct PointsChecked {
    /// Points checked.
    pub points: u64,
    /// Of which bookmarks.
    pub bookmarks: u64,
    /// Writes acknowledged by the target and flushed on the source, missing at a point.
    pub acked_writes_lost: u64,
    /// The verdicts that found the image inconsistent.
    pub bad: Vec<(PointInfo, Verdict)>,
}

/// Reads every point the target offers (and `Latest`) and checks it against `history`.
/// `acked` is the highest sequence number the target acknowledged: a write at or below it
/// that a point lacks although it was flushed before that point is an acknowledged write
/// lost. Prints the RELIABILITY figures before the caller asserts on them.
pub fn check_every_point(history: &History, target: &Replication, acked: Seq) -> PointsChecked {
    let mut checker = history.checker();
    let mut out = PointsChecked::default();
    let mut lost = std::collections::BTreeSet::new();
    for point in target.points() {
        let image = target.read_point(&point);
        let verdict = checker
            .check(point.seq, &image)
            .unwrap_or_else(|e| panic!("cannot check the point at seq {}: {e}", point.seq));
        out.points += 1;
        if matches!(point.kind, PointKind::Bookmark(_)) {
            out.bookmarks += 1;
        }
        lost.extend(verdict.lost_writes.iter().copied().filter(|s| *s <= acked));
        if !verdict.is_consistent() {
            out.bad.push((point, verdict));
        }
    }
    out.acked_writes_lost = lost.len() as u64;
    figures::report("recovery_points_checked", out.points);
    figures::report("acknowledged_writes_lost", out.acked_writes_lost);
    out
}

/// Fails with every inconsistent point's report.
pub fn assert_all_consistent(checked: &PointsChecked) {
    if checked.bad.is_empty() {
        return;
    }
    let reports: Vec<String> = checked
        .bad
        .iter()
        .take(5)
        .map(|(p, v)| format!("point {:?} at seq {}: {v}", p.kind, p.seq))
        .collect();
    panic!(
        "{} of {} recovery points are not crash-consistent ({} acknowledged writes lost):\n{}",
        checked.bad.len(),
        checked.points,
        checked.acked_writes_lost,
        reports.join("\n")
    );
}
