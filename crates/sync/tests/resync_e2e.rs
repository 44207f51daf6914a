//! Fast resync and initial sync end to end: a tap in front of a protected device, a shipper,
//! a receiver over a retention log, and the [`Syncer`] comparing the device with the
//! replica through `HashRequest`/`HashReply` on the shipper's connection.
//!
//! Checked: after a divergence of random scattered blocks the resync sends only those
//! blocks (wire bytes of batches within 5% of the changed bytes; hash overhead counted
//! separately and bounded) and the replica ends identical; application writes racing the
//! resync are not lost; the replica is marked inconsistent during the resync while the last
//! consistent point stays recoverable; step I of an initial sync sends the data extents of a
//! sparse image only; `verify` reports exactly the differing ranges and nothing after.

mod common;

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{PATIENCE, Rng, data, paired};
use tidemark_journal::{
    BlockIo, Bookmark, BookmarkKind, FileIo, MemDir, MemVolume, RecoveryPoint, RetentionConfig,
    RetentionLog, Seq, Spool, SpoolConfig, SystemClock, VolumeId,
};
use tidemark_sync::apply::{Receiver, ReceiverConfig};
use tidemark_sync::pair::{PairStage, SourcePair, SourcePairConfig};
use tidemark_sync::resync::FileSource;
use tidemark_sync::ship::{Shipper, ShipperConfig, ShipperHandle};
use tidemark_sync::syncer::{Syncer, SyncerConfig, TapSource};
use tidemark_sync::wire::{Compression, Hello, PairId, Role, SUPPORTED_VERSIONS, VolumeInfo};
use tidemark_tap::{IntentConfig, IntentMap, Tap, TapConfig};

const BLOCK: u64 = 4096;
const PAIR: PairId = PairId([9; 16]);

fn hello(size: u64) -> Hello {
    Hello {
        versions: SUPPORTED_VERSIONS,
        role: Role::Source,
        node: "source-r".to_owned(),
        pair: PAIR,
        volumes: vec![VolumeInfo { id: VolumeId(0), block_size: BLOCK as u32, size }],
    }
}

/// A source (tap over `device`, spool in memory) and a target (receiver over a retention
/// log whose base image is `base`), connected by in-memory pipes.
struct Rig {
    tap: Arc<Tap>,
    device: Arc<dyn BlockIo>,
    receiver: Receiver,
    shipper: Option<ShipperHandle>,
    size: u64,
    /// While false, the shipper's connection attempts fail (a link down).
    link_up: Arc<std::sync::atomic::AtomicBool>,
}

impl Rig {
    fn new(device: Arc<dyn BlockIo>, base: Arc<dyn BlockIo>, compression: Compression) -> Rig {
        Self::with_spool(device, base, compression, 1 << 30, None)
    }

    fn with_spool(
        device: Arc<dyn BlockIo>,
        base: Arc<dyn BlockIo>,
        compression: Compression,
        spool_bytes: u64,
        intent_dir: Option<MemDir>,
    ) -> Rig {
        let size = device.len().unwrap();
        let (cs, ct) = paired();
        let (spool, _) = Spool::open(
            Arc::new(MemDir::new()),
            SpoolConfig { capacity_bytes: spool_bytes, segment_bytes: 1 << 20, key: None },
            Arc::new(SystemClock),
        )
        .unwrap();
        let map_dir = intent_dir.unwrap_or_default();
        let (intent, _) = IntentMap::open(
            tidemark_journal::Dir::open(&map_dir, "intent.map", true).unwrap(),
            size,
            IntentConfig { region_bytes: 1 << 20, max_hot_regions: 64, max_runs: 256 },
        )
        .unwrap();
        let tap = Arc::new(Tap::new(device.clone(), spool, intent, TapConfig::default()).unwrap());
        let (log, _) = RetentionLog::open(
            Arc::new(MemDir::new()),
            vec![base],
            RetentionConfig { segment_bytes: 4 << 20, ..Default::default() },
            Arc::new(SystemClock),
        )
        .unwrap();
        let mut rcfg = ReceiverConfig::new("target-r", PAIR, ct);
        rcfg.sync_bytes = 1 << 20;
        let receiver = Receiver::new(log, rcfg).unwrap();
        let mut scfg = ShipperConfig::new(hello(size), cs);
        scfg.poll_interval = Duration::from_millis(5);
        scfg.backoff = tidemark_sync::ship::Backoff {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(20),
            factor: 2,
        };
        scfg.compression = compression;
        let shipper = Shipper::new(tap.shared_spool(), scfg)
            .compression_policy(Box::new(tidemark_sync::ship::FixedCompression(compression)));
        let r = receiver.clone();
        let link_up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let up = link_up.clone();
        let shipper = shipper
            .start(move || {
                if !up.load(std::sync::atomic::Ordering::SeqCst) {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionRefused,
                        "link down (test)",
                    ));
                }
                common::pipe_to(&r)
            })
            .unwrap();
        Rig { tap, device, receiver, shipper: Some(shipper), size, link_up }
    }

    fn shipper(&self) -> &ShipperHandle {
        self.shipper.as_ref().unwrap()
    }

    fn syncer(&self) -> Syncer {
        Syncer::new(self.tap.clone(), self.shipper().hash_client(), SyncerConfig::new(VolumeId(0)))
    }

    /// Waits until the target acknowledged everything the tap spooled.
    fn caught_up(&self) -> Seq {
        let last = self.tap.sync_spool().unwrap();
        self.shipper().notify();
        self.shipper().wait_for(PATIENCE, |s| s.acked >= last).unwrap_or_else(|| {
            panic!("not caught up to seq {last}: {:?}", self.shipper().status())
        });
        last
    }

    fn device_bytes(&self) -> Vec<u8> {
        let mut buf = vec![0u8; self.size as usize];
        self.device.read_at(&mut buf, 0).unwrap();
        buf
    }

    fn replica_current(&self) -> Vec<u8> {
        let mut buf = vec![0u8; self.size as usize];
        self.receiver.with_log(|log| log.read_current(VolumeId(0), 0, &mut buf)).unwrap();
        buf
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

fn random_image(rng: &mut Rng, size: u64) -> Vec<u8> {
    let mut v = vec![0u8; size as usize];
    for block in v.chunks_mut(BLOCK as usize) {
        if rng.below(10) != 0 {
            block.copy_from_slice(&data(rng, BLOCK as usize));
        }
    }
    v
}

fn volume_from(bytes: &[u8]) -> Arc<MemVolume> {
    let v = Arc::new(MemVolume::new(bytes.len() as u64));
    v.write_at(bytes, 0).unwrap();
    v
}

/// Changes `count` distinct random blocks of `device` behind the tap's back (a divergence:
/// writes lost in a crash, a promoted replica written during failover); returns them.
fn diverge(device: &dyn BlockIo, rng: &mut Rng, size: u64, count: usize) -> Vec<u64> {
    let mut blocks = std::collections::BTreeSet::new();
    while blocks.len() < count {
        blocks.insert(rng.below(size / BLOCK));
    }
    for &b in &blocks {
        let mut bytes = vec![0u8; BLOCK as usize];
        for x in bytes.iter_mut() {
            *x = rng.below(256) as u8;
        }
        device.write_at(&bytes, b * BLOCK).unwrap();
    }
    blocks.into_iter().collect()
}

fn ranges_of(blocks: &[u64]) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for &b in blocks {
        let r = b * BLOCK..(b + 1) * BLOCK;
        match out.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => out.push(r),
        }
    }
    out
}

#[test]
fn a_fast_resync_sends_only_the_differing_blocks_and_ends_identical() {
    let size = 64 << 20;
    let mut rng = Rng::new(41);
    let image = random_image(&mut rng, size);
    let device = volume_from(&image);
    let rig = Rig::new(device.clone(), volume_from(&image), Compression::Off);
    // A consistent point before the divergence.
    rig.tap.bookmark(Bookmark::new("before", BookmarkKind::User, 0).unwrap()).unwrap();
    rig.caught_up();

    let changed = diverge(&*device, &mut rng, size, (size / BLOCK / 100) as usize);
    let changed_bytes = changed.len() as u64 * BLOCK;
    let syncer = rig.syncer();
    let before = syncer.verify(None).unwrap();
    assert_eq!(before.ranges, ranges_of(&changed), "verify reports exactly the changed blocks");

    let wire_before = rig.shipper().status();
    let report = syncer.fast_resync(None, &[]).unwrap();
    rig.caught_up();
    let wire_after = rig.shipper().status();
    assert_eq!(report.differing_bytes, changed_bytes);
    assert_eq!(report.data_bytes, changed_bytes);

    let batch_bytes = (wire_after.wire_bytes - wire_before.wire_bytes)
        - (wire_after.hash_request_bytes - wire_before.hash_request_bytes);
    let hash_bytes = (wire_after.hash_request_bytes - wire_before.hash_request_bytes)
        + (wire_after.hash_reply_bytes - wire_before.hash_reply_bytes);
    println!(
        "fast resync of {} MiB with {} changed blocks: {batch_bytes} batch bytes for {changed_bytes} changed bytes ({:.4}), {hash_bytes} hash bytes ({} requests, {} hashes)",
        size >> 20,
        changed.len(),
        batch_bytes as f64 / changed_bytes as f64,
        report.compare.hash_requests,
        report.compare.hashes_exchanged,
    );
    assert!(
        batch_bytes as f64 <= changed_bytes as f64 * 1.05,
        "{batch_bytes} bytes of batches for {changed_bytes} changed bytes"
    );
    assert!(batch_bytes >= changed_bytes, "the changed bytes went uncompressed");
    // Hash overhead: at most one fan-out of hashes per level per differing leaf (the
    // bound of docs/resync.md) plus the root, at 32 bytes each, plus framing.
    let levels = 1 + u64::from(tidemark_sync::resync::shape_for(size).root_level(size));
    let bound = (changed.len() as u64 * 16 * levels + 16) * 32 * 11 / 10 + 64 * 1024;
    assert!(hash_bytes <= bound, "{hash_bytes} hash bytes, bound {bound}");

    assert!(rig.replica_current() == rig.device_bytes(), "replica differs after the resync");
    let after = syncer.verify(None).unwrap();
    assert!(after.is_empty(), "verify after the resync: {:?}", after.ranges);
    rig.receiver.with_log(|log| {
        let latest = log.resolve(&RecoveryPoint::Latest).unwrap();
        assert_eq!(latest.seq, report.end_seq, "the resync's end is the latest point");
        assert!(log.status().inconsistent.is_none());
        // The point before the resync still reads the pre-divergence image.
        let p = log.resolve(&RecoveryPoint::Bookmark("before".into())).unwrap();
        let mut buf = vec![0u8; size as usize];
        log.read_at(&p, VolumeId(0), 0, &mut buf).unwrap();
        assert!(buf == image, "the bookmark before the resync changed");
    });
}

#[test]
fn application_writes_racing_a_resync_are_kept_and_the_replica_is_inconsistent_meanwhile() {
    let size = 32 << 20;
    let half = size / 2;
    let mut rng = Rng::new(5);
    let image = random_image(&mut rng, size);
    let device = volume_from(&image);
    let rig = Rig::new(device.clone(), volume_from(&image), Compression::Zstd { level: 1 });
    rig.tap.bookmark(Bookmark::new("consistent", BookmarkKind::User, 0).unwrap()).unwrap();
    let consistent = rig.caught_up();
    // The divergence is in the first half and the application writes only the second: a
    // racing write never overwrites (heals) a diverged block, so all 300 must be found.
    diverge(&*device, &mut rng, half, 300);

    // Inside the window on the source's side (its `ResyncBegin` acknowledged, its
    // `ResyncEnd` not yet appended) the replica must be marked inconsistent and offer
    // nothing newer than the point before the window. Checked at every copy step, whatever
    // the racing writer is doing: (steps checked, violations).
    let window_checks: Arc<Mutex<(u64, Vec<String>)>> = Arc::default();
    let progress: tidemark_sync::syncer::ProgressFn = {
        let (receiver, checks) = (rig.receiver.clone(), window_checks.clone());
        Arc::new(move |p: tidemark_sync::syncer::Progress| {
            if p.phase != tidemark_sync::syncer::Phase::Copying {
                return;
            }
            let seen = receiver.with_log(|log| match log.status().inconsistent {
                None => Err(format!("not inconsistent at copy step {}/{}", p.done, p.total)),
                Some(w) => {
                    let latest = log.resolve(&RecoveryPoint::Latest).unwrap();
                    if latest.seq >= w.begin_seq || latest.seq < consistent {
                        Err(format!("latest {} offered inside the window {w:?}", latest.seq))
                    } else {
                        Ok(())
                    }
                }
            });
            let mut checks = checks.lock().unwrap();
            checks.0 += 1;
            if let Err(e) = seen {
                checks.1.push(e);
            }
        })
    };

    let stop = std::sync::atomic::AtomicBool::new(false);
    let report = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut rng = Rng::new(77);
            let mut writes = 0u64;
            // Until the resync is over (at least 200 writes, at most 4000: the writer must
            // not outrun everything else on a busy machine).
            while (!stop.load(std::sync::atomic::Ordering::SeqCst) || writes < 200) && writes < 4000
            {
                let n = 1 + rng.below(8);
                let offset = half + rng.below((size - half) / BLOCK - n) * BLOCK;
                rig.tap.write(offset, Bytes::from(data(&mut rng, (n * BLOCK) as usize))).unwrap();
                writes += 1;
                if writes % 16 != 0 {
                    continue;
                }
                rig.tap.flush().unwrap();
                rig.tap.sync_spool().unwrap();
                rig.shipper().notify();
                // Whenever the target is inconsistent, it offers nothing newer than the
                // point before the resync (sampled while writes are being applied).
                rig.receiver.with_log(|log| {
                    if let Some(w) = log.status().inconsistent {
                        let latest = log.resolve(&RecoveryPoint::Latest).unwrap();
                        assert!(latest.seq < w.begin_seq, "a point inside the resync window");
                        assert!(latest.seq >= consistent);
                    }
                });
            }
            writes
        });
        let report = rig.syncer().progress(progress).fast_resync(None, &[]);
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let report = report.unwrap_or_else(|e| {
            panic!(
                "{}; shipper {:?}; receiver {:?}",
                tidemark_sync::ship::error_chain(&e),
                rig.shipper().status(),
                rig.receiver.status()
            )
        });
        let writes = writer.join().unwrap();
        println!("{writes} application writes raced the resync");
        assert!(writes >= 200);
        report
    });
    rig.tap.flush().unwrap();
    rig.caught_up();
    assert!(report.differing_bytes >= 300 * BLOCK, "{} differing bytes", report.differing_bytes);
    let (steps, violations) = window_checks.lock().unwrap().clone();
    assert!(steps > 0, "no copy step was checked");
    assert!(violations.is_empty(), "during the resync: {violations:?}");
    assert!(rig.replica_current() == rig.device_bytes(), "replica differs after the resync");
    rig.receiver.with_log(|log| {
        assert!(log.status().inconsistent.is_none());
        // The window stays on record: the event just before its end is no recovery point.
        let inside = log.resolve(&RecoveryPoint::Seq(Seq(report.end_seq.0 - 1)));
        assert!(
            inside.as_ref().is_err_and(|e| e.to_string().contains("inconsistent")),
            "seq {} inside the window: {inside:?}",
            report.end_seq.0 - 1
        );
        let latest = log.resolve(&RecoveryPoint::Latest).unwrap();
        let mut buf = vec![0u8; size as usize];
        log.read_at(&latest, VolumeId(0), 0, &mut buf).unwrap();
        assert!(buf == rig.device_bytes(), "the latest point is the device's state");
    });
}

#[test]
fn a_resync_limited_to_dirty_regions_compares_only_those() {
    let size = 32 << 20;
    let mut rng = Rng::new(11);
    let image = random_image(&mut rng, size);
    let device = volume_from(&image);
    let rig = Rig::new(device.clone(), volume_from(&image), Compression::Off);
    rig.caught_up();
    // Changes inside two regions, and one outside that the limit must not find.
    let inside = [3 * BLOCK, 5 * BLOCK, (8 << 20) + 7 * BLOCK];
    let outside = 20 << 20;
    for &at in inside.iter().chain([outside].iter()) {
        device.write_at(&[0xEE; BLOCK as usize], at).unwrap();
    }
    let limit = [0..1 << 20, 8 << 20..9 << 20];
    let report = rig.syncer().fast_resync(Some(&limit), &[]).unwrap();
    rig.caught_up();
    assert_eq!(report.differing_bytes, 3 * BLOCK);
    assert_eq!(report.compare.leaves_compared, 2 * (1 << 20) / BLOCK);
    let left = rig.syncer().verify(None).unwrap();
    assert_eq!(left.ranges, vec![outside..outside + BLOCK], "only the change outside is left");
}

#[test]
fn step_one_of_an_initial_sync_sends_only_the_data_of_a_sparse_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("protected.img");
    let size: u64 = 64 << 20;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    file.set_len(size).unwrap();
    let mut rng = Rng::new(3);
    // Data in a few places, a zero-filled written block, the rest holes.
    let mut written = 0;
    for i in 0..40u64 {
        let at = (i * 1_597 * BLOCK) % (size - 16 * BLOCK);
        let len = (1 + i % 4) * BLOCK;
        std::os::unix::fs::FileExt::write_at(&file, &data(&mut rng, len as usize), at).unwrap();
        written += len;
    }
    std::os::unix::fs::FileExt::write_at(&file, &vec![0u8; 1 << 20], 40 << 20).unwrap();
    file.sync_all().unwrap();
    drop(file);
    let device: Arc<dyn BlockIo> = Arc::new(FileIo::open(&path).unwrap());
    let base = Arc::new(MemVolume::new(size));
    let rig = Rig::new(device, base, Compression::Off);
    let view = FileSource::open(&path).unwrap();
    let report = rig.syncer().initial_sync(&view, &[]).unwrap();
    rig.caught_up();
    assert!(rig.replica_current() == rig.device_bytes(), "replica differs after step I");
    let sent = rig.shipper().status().wire_bytes;
    println!(
        "step I of {} MiB with {written} data bytes: {} bytes in extents, {sent} bytes on the wire",
        size >> 20,
        report.differing_bytes
    );
    assert!(report.data_bytes <= written, "{} data bytes for {written} written", report.data_bytes);
    assert!(
        sent < written * 11 / 10 + (64 << 10),
        "{sent} bytes on the wire for {written} written"
    );
    let _ = TapSource(rig.tap.clone());
}

impl Rig {
    fn pair(&self) -> SourcePair {
        self.pair_with(false)
    }

    fn pair_with(&self, fresh: bool) -> SourcePair {
        let mut cfg = SourcePairConfig::new(SyncerConfig::new(VolumeId(0)));
        cfg.tick = Duration::from_millis(20);
        cfg.fresh = fresh;
        SourcePair::start(self.tap.clone(), self.shipper().hash_client(), cfg).unwrap()
    }
}

fn wait_stage(pair: &SourcePair, rig: &Rig, resyncs: u64) {
    pair.wait_for(PATIENCE, |s| s.stage == PairStage::DiffSync && s.resyncs >= resyncs)
        .unwrap_or_else(|| {
            panic!(
                "pair not in diff sync after {resyncs} resyncs: {:?} {:?} RECEIVER {:?}",
                pair.status(),
                rig.shipper().status(),
                rig.receiver.status()
            )
        });
}

#[test]
fn the_pair_runs_an_initial_sync_into_a_blank_replica_then_streams() {
    let size = 32 << 20;
    let mut rng = Rng::new(21);
    // Data on the device before protection began: none of it is in the capture stream.
    let image = random_image(&mut rng, size);
    let rig = Rig::new(volume_from(&image), Arc::new(MemVolume::new(size)), Compression::Off);
    let pair = rig.pair_with(true);
    // Writes captured before step I runs (the window the fresh pair opened covers them).
    rig.tap.write(8 << 20, Bytes::from(vec![7u8; 65536])).unwrap();
    rig.tap.flush().unwrap();
    wait_stage(&pair, &rig, 1);
    let status = pair.status();
    let report = status.last_resync.unwrap();
    assert_eq!(
        rig.shipper().status().replica.unwrap().kind,
        tidemark_sync::wire::ReplicaKind::Blank
    );
    assert!(report.compare.hash_requests == 0, "step I does not compare");
    // The write above races step I's copy: each of its blocks was read either before it
    // (a zero block of the image, counted as zero) or after (all 7s, data). Its blocks are
    // never all-zero, so a block counted as zero was zero in the image and a block zero now
    // was zero throughout: the count lies between the zero blocks of the device now and
    // those of the image.
    let zero_blocks = |bytes: &[u8]| {
        bytes.chunks(BLOCK as usize).filter(|b| b.iter().all(|&x| x == 0)).count() as u64
    };
    let (now, before) = (zero_blocks(&rig.device_bytes()), zero_blocks(&image));
    assert!(now > 0, "the image has zero blocks");
    assert!(
        now * BLOCK <= report.zero_bytes && report.zero_bytes <= before * BLOCK,
        "zero blocks left out: {} zero bytes, {now} zero blocks on the device now, {before} in the image",
        report.zero_bytes
    );
    // Then writes stream as usual.
    rig.tap.write(4096, Bytes::from(vec![1u8; 8192])).unwrap();
    rig.tap.flush().unwrap();
    rig.caught_up();
    assert!(rig.replica_current() == rig.device_bytes());
    rig.receiver.with_log(|log| {
        let latest = log.resolve(&RecoveryPoint::Latest).unwrap();
        let mut buf = vec![0u8; size as usize];
        log.read_at(&latest, VolumeId(0), 0, &mut buf).unwrap();
        assert!(buf == rig.device_bytes(), "the latest point is the device");
    });
    assert_eq!(pair.stop().resyncs, 1);
}

#[test]
fn a_spool_overflow_while_the_link_is_down_is_resynced_from_the_dirty_regions() {
    let size = 32 << 20;
    let mut rng = Rng::new(23);
    let image = random_image(&mut rng, size);
    // A blank replica and a 2 MiB spool: the initial sync must pace itself to the spool,
    // and a few writes fill it while the link is down.
    let blank = Arc::new(MemVolume::new(size));
    let rig = Rig::with_spool(volume_from(&image), blank, Compression::Off, 2 << 20, None);
    let pair = rig.pair_with(true);
    wait_stage(&pair, &rig, 1);
    assert!(rig.replica_current() == rig.device_bytes(), "replica differs after step I");
    rig.link_up.store(false, std::sync::atomic::Ordering::SeqCst);
    rig.receiver.disconnect();
    rig.shipper()
        .wait_for(PATIENCE, |s| s.state != tidemark_sync::LinkState::Shipping)
        .expect("the link went down");
    // Writes into two 1 MiB regions until the spool refuses one.
    let mut i = 0u64;
    while rig.tap.status().overflow.is_none() {
        let region = if i % 2 == 0 { 3 } else { 17 };
        let offset = (region << 20) + (i % 64) * 16384;
        rig.tap.write(offset, Bytes::from(data(&mut rng, 16384))).unwrap();
        i += 1;
    }
    // More writes while overflowing, tracked only in the intent map.
    for k in 0..20u64 {
        rig.tap.write((17 << 20) + k * 4096, Bytes::from(data(&mut rng, 4096))).unwrap();
    }
    pair.wait_for(PATIENCE, |s| s.stage == PairStage::Overflow).expect("overflow stage");
    rig.link_up.store(true, std::sync::atomic::Ordering::SeqCst);
    wait_stage(&pair, &rig, 2);
    rig.tap.flush().unwrap();
    rig.caught_up();
    let report = pair.status().last_resync.unwrap();
    // Only the out-of-sync regions were compared: far less than the volume.
    assert!(
        report.compare.leaves_compared <= 2 * (1 << 20) / BLOCK,
        "{} leaves compared",
        report.compare.leaves_compared
    );
    assert!(
        rig.replica_current() == rig.device_bytes(),
        "replica differs after the overflow resync"
    );
    assert!(rig.tap.intent().out_of_sync().is_empty());
    pair.stop();
}

#[test]
fn an_interrupted_resync_is_redone_over_the_whole_volume_on_the_next_session() {
    let size = 16 << 20;
    let mut rng = Rng::new(29);
    let image = random_image(&mut rng, size);
    let device = volume_from(&image);
    let rig = Rig::new(device.clone(), volume_from(&image), Compression::Off);
    rig.tap.flush().unwrap();
    rig.caught_up();
    // A resync began (its end never came: the source died), and the device diverged.
    rig.tap.append_marker(tidemark_journal::Event::ResyncBegin { id: 99 }).unwrap();
    rig.caught_up();
    let changed = diverge(&*device, &mut rng, size, 40);
    assert!(rig.receiver.with_log(|log| log.status().inconsistent.is_some()));
    // A new session reports the open window.
    rig.receiver.disconnect();
    rig.shipper()
        .wait_for(PATIENCE, |s| s.sessions >= 2 && s.state == tidemark_sync::LinkState::Shipping)
        .expect("a second session");
    let replica = rig.shipper().status().replica.unwrap();
    assert_eq!(replica.open_resyncs, vec![99]);
    let pair = rig.pair();
    wait_stage(&pair, &rig, 1);
    rig.caught_up();
    assert_eq!(pair.status().last_resync.unwrap().differing_bytes, changed.len() as u64 * BLOCK);
    assert!(rig.replica_current() == rig.device_bytes());
    rig.receiver.with_log(|log| assert!(log.status().inconsistent.is_none(), "window 99 closed"));
    pair.stop();
}

#[test]
fn a_resync_waits_for_a_slot_under_the_node_cap_changed_at_run_time() {
    let size = 8 << 20;
    let mut rng = Rng::new(31);
    let image = random_image(&mut rng, size);
    let rig = Rig::new(volume_from(&image), Arc::new(MemVolume::new(size)), Compression::Off);
    let slots = tidemark_sync::shape::ResyncSlots::new(0);
    let mut cfg = SourcePairConfig::new(SyncerConfig::new(VolumeId(0)));
    cfg.tick = Duration::from_millis(20);
    cfg.fresh = true;
    cfg.slots = Some(slots.clone());
    let pair = SourcePair::start(rig.tap.clone(), rig.shipper().hash_client(), cfg).unwrap();
    pair.wait_for(PATIENCE, |s| s.waiting_for_slot).expect("waits for a slot");
    assert_eq!(pair.status().resyncs, 0);
    slots.set_limit(1);
    wait_stage(&pair, &rig, 1);
    assert!(!pair.status().waiting_for_slot);
    rig.caught_up();
    assert!(rig.replica_current() == rig.device_bytes());
    assert_eq!(slots.in_use(), 0, "the permit was given back");
    pair.stop();
}

/// The target answers every comparison from its replica as it is now: a tree it hashed for
/// an earlier comparison of the session must not answer for blocks changed since. Here a
/// block is written (shipped and applied) after a whole-volume comparison built the target's
/// tree, then rewritten on the device behind the tap's back to its value at that time; a
/// resync limited to that block must still find it different and copy it.
#[test]
fn a_later_comparison_sees_blocks_the_target_changed_since_the_last_one() {
    let size = 8 << 20;
    let mut rng = Rng::new(43);
    let image = random_image(&mut rng, size);
    let device = volume_from(&image);
    let rig = Rig::new(device.clone(), volume_from(&image), Compression::Off);
    rig.caught_up();
    let syncer = rig.syncer();
    // A whole comparison: the target hashes its whole replica.
    assert!(syncer.verify(None).unwrap().is_empty());
    let block = 37 * BLOCK;
    let old = image[block as usize..(block + BLOCK) as usize].to_vec();
    let new = data(&mut rng, BLOCK as usize);
    assert_ne!(old, new);
    rig.tap.write(block, Bytes::from(new)).unwrap();
    rig.tap.flush().unwrap();
    rig.caught_up();
    // Back to the old value on the device only (a write lost to a crash, a failback).
    device.write_at(&old, block).unwrap();
    let rewritten = block..block + BLOCK;
    let limit = std::slice::from_ref(&rewritten);
    let found = syncer.verify(Some(limit)).unwrap();
    assert_eq!(found.ranges, limit, "verify of the rewritten block");
    let report = syncer.fast_resync(Some(limit), &[]).unwrap();
    rig.caught_up();
    assert_eq!(report.differing_bytes, BLOCK, "the rewritten block was found different");
    assert!(rig.replica_current() == rig.device_bytes(), "replica differs after the resync");
    // And a whole comparison afterwards agrees.
    assert!(syncer.verify(None).unwrap().is_empty());
}
