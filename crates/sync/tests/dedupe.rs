//! Dedupe and adaptive compression on the replication stream, end to end: repeated blocks
//! travel as references and the replica is still exact; a target whose window is smaller
//! than the source's refuses a reference and the source recovers by resending as data;
//! random repeated-content workloads against a byte model; the zstd level rising on a slow
//! link. Plus a measurement (ignored by default, prints only): bytes on the wire per
//! changed byte for an ext4 image built with `mkfs.ext4 -d`, with and without dedupe.
//!
//! Synchronisation is by status (`wait_for`), with a timeout that only ever fails a test.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{PATIENCE, PipeNet, Rng, paired, ship_config};
use proptest::prelude::*;
use tidemark_journal::{
    Event, MemDir, MemVolume, RecoveryPoint, RetentionConfig, RetentionLog, Seq, Spool,
    SpoolConfig, SystemClock, VolumeId,
};
use tidemark_sync::apply::{Receiver, ReceiverConfig};
use tidemark_sync::secure::SecureConfig;
use tidemark_sync::shape::{Rate, TokenBucket};
use tidemark_sync::ship::{Shipper, ShipperConfig, ShipperHandle, ShipperStatus};
use tidemark_sync::wire::Compression;

const BLOCK: usize = 4096;

/// A source spool and a byte model of its volume.
struct Source {
    spool: Arc<Mutex<Spool>>,
    model: Vec<u8>,
    /// Bytes of write data appended.
    written: u64,
}

impl Source {
    fn new(volume: u64) -> Self {
        let (spool, _) = Spool::open(
            Arc::new(MemDir::new()),
            SpoolConfig { capacity_bytes: 4 << 30, segment_bytes: 8 << 20, key: None },
            Arc::new(SystemClock),
        )
        .unwrap();
        Self { spool: Arc::new(Mutex::new(spool)), model: vec![0; volume as usize], written: 0 }
    }

    fn write(&mut self, offset: u64, data: Vec<u8>) {
        let o = offset as usize;
        self.model[o..o + data.len()].copy_from_slice(&data);
        self.written += data.len() as u64;
        let event = Event::Write { volume: VolumeId(0), offset, data: Bytes::from(data) };
        self.spool.lock().unwrap().append(&event).unwrap();
    }

    fn sync(&self) {
        self.spool.lock().unwrap().sync().unwrap();
    }

    fn last_seq(&self) -> Seq {
        self.spool.lock().unwrap().last_seq()
    }
}

/// A receiver over a retention log in memory, with a volume of `volume` bytes and a dedupe
/// window of `window` bytes.
fn target(secure: SecureConfig, volume: u64, window: u64) -> Receiver {
    let (log, _) = RetentionLog::open(
        Arc::new(MemDir::new()),
        vec![Arc::new(MemVolume::new(volume))],
        RetentionConfig { segment_bytes: 8 << 20, ..Default::default() },
        Arc::new(SystemClock),
    )
    .unwrap();
    let mut cfg = ReceiverConfig::new("target-1", common::PAIR, secure);
    cfg.sync_bytes = 1 << 20;
    cfg.dedupe_window_bytes = window;
    Receiver::new(log, cfg).unwrap()
}

fn config(
    secure: SecureConfig,
    volume: u64,
    window: u64,
    compression: Compression,
) -> ShipperConfig {
    let mut cfg = ship_config(secure);
    cfg.hello.volumes[0].size = volume;
    cfg.dedupe_window_bytes = window;
    cfg.compression = compression;
    cfg
}

fn wait_caught_up(handle: &ShipperHandle, last: Seq) -> ShipperStatus {
    handle
        .wait_for(PATIENCE, |s| s.acked == last && s.backlog_events == 0)
        .unwrap_or_else(|| panic!("not caught up to seq {last}: {:?}", handle.status()))
}

/// The replica's latest state equals the model, byte for byte, and holds every event.
fn check_replica(receiver: &Receiver, source: &Source) {
    receiver.with_log(|log| {
        let latest = log.resolve(&RecoveryPoint::Latest).unwrap();
        assert_eq!(latest.seq, source.last_seq(), "the replica has every event");
        let mut buf = vec![0u8; source.model.len()];
        log.read_at(&latest, VolumeId(0), 0, &mut buf).unwrap();
        if let Some(at) = buf.iter().zip(&source.model).position(|(a, b)| a != b) {
            panic!("the replica differs from the source at byte {at}");
        }
    });
}

fn random_block(rng: &mut Rng) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    rng.fill(&mut b);
    b
}

/// Runs a shipper over pipes until the source is replicated; returns its final status.
fn replicate(receiver: &Receiver, cfg: ShipperConfig, source: &Source) -> ShipperStatus {
    let net = PipeNet::new(receiver.clone());
    let handle = Shipper::new(source.spool.clone(), cfg).start(net.connector()).unwrap();
    handle.notify();
    wait_caught_up(&handle, source.last_seq());
    check_replica(receiver, source);
    let status = handle.stop();
    net.join_servers();
    status
}

#[test]
fn repeated_blocks_replicate_exactly_while_the_wire_carries_less_than_the_data() {
    const VOLUME: u64 = 8 << 20;
    let (cs, ct) = paired();
    let receiver = target(ct, VOLUME, 64 << 20);
    let mut source = Source::new(VOLUME);
    let mut rng = Rng::new(11);
    // Sixteen distinct random (incompressible) blocks make every write below.
    let pool: Vec<Vec<u8>> = (0..16).map(|_| random_block(&mut rng)).collect();
    let write = |source: &mut Source, offset: u64, blocks: &[usize]| {
        let data: Vec<u8> = blocks.iter().flat_map(|&i| pool[i].clone()).collect();
        source.write(offset, data);
    };
    // The same 64 KiB at several offsets (the first copy goes as data).
    let file: Vec<usize> = (0..16).collect();
    for copy in 0..6u64 {
        write(&mut source, copy * (1 << 20), &file);
    }
    // Rewritten later, partly shifted and mixed with a new block.
    write(&mut source, 7 << 20, &[3, 4, 5, 6]);
    let mut fresh = random_block(&mut rng);
    fresh.extend_from_slice(&pool[9]);
    source.write(6 << 20, fresh);
    write(&mut source, 0, &file);
    source.sync();
    let data_bytes = source.written;

    let cfg = config(cs, VOLUME, 16 << 20, Compression::Off);
    let status = replicate(&receiver, cfg, &source);
    assert!(
        status.wire_bytes * 4 < data_bytes,
        "the wire carried {} bytes for {data_bytes} bytes of data: {status:?}",
        status.wire_bytes
    );
    // Every block but the first 16 and the one new block went as a reference.
    let blocks = data_bytes / BLOCK as u64;
    assert_eq!(status.blocks_deduped, blocks - 17, "{status:?}");
    assert!(status.dedupe_bytes_saved > (blocks - 17) * 4000, "{status:?}");
    assert_eq!(status.dedupe_resends, 0);
    let r = receiver.status();
    assert_eq!(r.deduped_entries, 8, "every write after the first: {r:?}");
    assert_eq!(r.deduped_bytes, status.blocks_deduped * BLOCK as u64);
    assert_eq!(r.data_bytes, data_bytes, "the target applied every byte");
}

/// Content shipped again goes as a reference, within one session and after a reconnection
/// (both windows outlive the connection: the target says which writes it still holds, the
/// source keeps those): on the wire a few dozen bytes instead of 64 KiB.
#[test]
fn content_shipped_again_after_a_reconnect_or_within_a_session_goes_as_a_reference() {
    const VOLUME: u64 = 8 << 20;
    const LEN: usize = 64 << 10;
    let (cs, ct) = paired();
    let receiver = target(ct, VOLUME, 64 << 20);
    let mut source = Source::new(VOLUME);
    let mut rng = Rng::new(17);
    let content: Vec<u8> = (0..LEN / BLOCK).flat_map(|_| random_block(&mut rng)).collect();
    let net = PipeNet::new(receiver.clone());
    let cfg = config(cs, VOLUME, 64 << 20, Compression::Off);
    let handle = Shipper::new(source.spool.clone(), cfg).start(net.connector()).unwrap();
    let ship = |source: &mut Source, offset: u64| {
        let (before, rx_before) = (handle.status(), receiver.status());
        source.write(offset, content.clone());
        source.sync();
        handle.notify();
        let after = wait_caught_up(&handle, source.last_seq());
        let rx_after = receiver.status();
        (
            after.blocks_deduped - before.blocks_deduped,
            after.wire_bytes - before.wire_bytes,
            rx_after.deduped_bytes - rx_before.deduped_bytes,
        )
    };
    let (deduped, wire, _) = ship(&mut source, 0);
    assert_eq!(deduped, 0, "the first shipment is data");
    assert!(wire >= LEN as u64, "{wire} bytes on the wire for {LEN} new bytes");
    // Again in the same session.
    let (deduped, wire, received) = ship(&mut source, 1 << 20);
    assert_eq!(
        deduped,
        (LEN / BLOCK) as u64,
        "every block a reference within the session: {:?} {:?}",
        handle.status(),
        receiver.status()
    );
    assert!(wire < 1024, "{wire} bytes on the wire for a repeat within the session");
    assert_eq!(received, LEN as u64, "the target resolved it by reference");
    // Again after the connection was lost and a new one opened.
    for n in 2..4 {
        let sessions = handle.status().sessions;
        assert!(receiver.disconnect(), "a session to cut");
        handle
            .wait_for(PATIENCE, |s| {
                s.sessions > sessions && s.state == tidemark_sync::LinkState::Shipping
            })
            .unwrap_or_else(|| panic!("no session after {sessions}: {:?}", handle.status()));
        let (deduped, wire, received) = ship(&mut source, n << 20);
        assert_eq!(
            deduped,
            (LEN / BLOCK) as u64,
            "a reference after reconnection {n}: {:?} {:?}",
            handle.status(),
            receiver.status()
        );
        assert!(wire < 1024, "{wire} bytes on the wire for a repeat after reconnection {n}");
        assert_eq!(received, LEN as u64);
    }
    assert_eq!(handle.status().dedupe_resends, 0, "no reference was refused");
    check_replica(&receiver, &source);
    handle.stop();
    net.join_servers();
}

#[test]
fn a_target_window_smaller_than_the_source_s_is_recovered_by_resending_as_data() {
    const VOLUME: u64 = 8 << 20;
    let (cs, ct) = paired();
    // The target keeps 64 KiB of writes, the source 4 MiB.
    let receiver = target(ct, VOLUME, 64 << 10);
    let mut source = Source::new(VOLUME);
    let mut rng = Rng::new(12);
    let old = random_block(&mut rng);
    source.write(0, old.clone());
    // 256 KiB of distinct writes push the first out of the target's window only.
    for i in 1..=64u64 {
        source.write(i * BLOCK as u64, random_block(&mut rng));
    }
    // A repeat of the first write: the source names it, the target cannot resolve it.
    source.write(2 << 20, old.clone());
    source.write((2 << 20) + 8192, old);
    for i in 0..16u64 {
        source.write((3 << 20) + i * BLOCK as u64, random_block(&mut rng));
    }
    source.sync();

    let cfg = config(cs, VOLUME, 4 << 20, Compression::Off);
    let status = replicate(&receiver, cfg, &source);
    assert!(status.dedupe_resends >= 1, "the target refused a reference: {status:?}");
    assert!(status.sessions >= 2, "and the source reconnected: {status:?}");
    assert!(status.dedupe_window_bytes < 4 << 20, "the window shrank: {status:?}");
    let r = receiver.status();
    assert_eq!(r.duplicates, 0, "nothing was applied twice: {r:?}");
    assert_eq!(r.events, source.last_seq().0, "every event applied once");
}

/// One write of the property test: `blocks` from the pool (each possibly cut short at the
/// end of the write), at a block-aligned or unaligned offset.
#[derive(Debug, Clone)]
struct PropWrite {
    offset: u64,
    blocks: Vec<usize>,
    tail: usize,
}

fn prop_write(volume: u64) -> impl Strategy<Value = PropWrite> {
    (prop::collection::vec(0..6usize, 1..12), 0..BLOCK, any::<bool>(), any::<u64>()).prop_map(
        move |(blocks, tail, aligned, at)| {
            let len = (blocks.len() * BLOCK - tail) as u64;
            let mut offset = at % (volume - len);
            if aligned {
                offset -= offset % BLOCK as u64;
            }
            PropWrite { offset, blocks, tail }
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn random_repeated_content_writes_replicate_to_the_model(
        writes in prop::collection::vec(prop_write(1 << 20), 1..80),
        zeroes in prop::collection::vec((0..248u64, 1..8u64), 0..6),
        source_window in prop_oneof![Just(0u64), Just(64u64 << 10), Just(4u64 << 20)],
        target_window in prop_oneof![Just(32u64 << 10), Just(4u64 << 20)],
        seed in any::<u64>(),
    ) {
        const VOLUME: u64 = 1 << 20;
        let (cs, ct) = paired();
        let receiver = target(ct, VOLUME, target_window);
        let mut source = Source::new(VOLUME);
        let mut rng = Rng::new(seed);
        let mut pool: Vec<Vec<u8>> = (0..5).map(|_| random_block(&mut rng)).collect();
        pool.push(vec![0; BLOCK]);
        for (i, w) in writes.iter().enumerate() {
            let mut data: Vec<u8> = w.blocks.iter().flat_map(|&b| pool[b].clone()).collect();
            data.truncate(data.len() - w.tail);
            source.write(w.offset, data);
            if let Some(&(block, n)) = zeroes.get(i) {
                let (offset, len) = (block * BLOCK as u64, n * BLOCK as u64);
                source.model[offset as usize..(offset + len) as usize].fill(0);
                let event = Event::WriteZeroes { volume: VolumeId(0), offset, len: len as u32 };
                source.spool.lock().unwrap().append(&event).unwrap();
            }
        }
        source.sync();
        let cfg = config(cs, VOLUME, source_window, Compression::Zstd { level: 1 });
        let status = replicate(&receiver, cfg, &source);
        if source_window == 0 {
            prop_assert_eq!(status.blocks_deduped, 0);
        }
        if source_window <= target_window {
            prop_assert_eq!(status.dedupe_resends, 0);
        }
        prop_assert_eq!(receiver.status().events, source.last_seq().0);
    }
}

#[test]
fn the_zstd_level_rises_when_the_link_is_slow() {
    const VOLUME: u64 = 64 << 20;
    let (cs, ct) = paired();
    let receiver = target(ct, VOLUME, 64 << 20);
    let mut source = Source::new(VOLUME);
    let words = ["tidemark ", "replica ", "journal ", "barrier ", "the ", "of ", "durable "];
    let mut rng = Rng::new(13);
    // 24 MiB of text-like writes (compressible, no repeated 4 KiB blocks), all waiting.
    for i in 0..(24u64 << 20) / (64 << 10) {
        let mut data = Vec::with_capacity(64 << 10);
        while data.len() < 64 << 10 {
            data.extend_from_slice(words[rng.below(words.len() as u64) as usize].as_bytes());
        }
        data.truncate(64 << 10);
        source.write(i * (64 << 10), data);
    }
    source.sync();
    // 512 KiB/s: far below what the encoder produces, so the writer's queue stays full. The
    // level needs 12 link-bound batches in a row to reach 4; a batch the writer's queue
    // takes at once breaks the streak, which takes an encoder stall long enough for the
    // writer to drain its queue (`queue_depth` frames of some 30 KiB each, over 200 ms at
    // this rate). The 24 MiB last well over 10 s at this rate: room for many streaks.
    let bucket = Arc::new(
        TokenBucket::new(Rate::BytesPerSec(512 << 10), 64 << 10, Arc::new(SystemClock)).unwrap(),
    );
    let net = PipeNet::new(receiver.clone());
    let cfg = config(cs, VOLUME, 64 << 20, Compression::Zstd { level: 1 });
    assert!(cfg.adaptive_compression, "adaptive compression is the default");
    let handle = Shipper::new(source.spool.clone(), cfg)
        .bucket(bucket.clone())
        .start(net.connector())
        .unwrap();
    handle.notify();
    let risen = handle
        .wait_for(PATIENCE, |s| matches!(s.compression, Compression::Zstd { level } if level >= 4));
    let risen = risen
        .unwrap_or_else(|| panic!("the level did not rise on a slow link: {:?}", handle.status()));
    println!(
        "level {:?} after {} batches, {} wire bytes for {} raw bytes",
        risen.compression, risen.batches, risen.wire_bytes, risen.raw_bytes
    );
    bucket.set_rate(Rate::Unlimited, 1 << 20).unwrap();
    wait_caught_up(&handle, source.last_seq());
    check_replica(&receiver, &source);
    let status = handle.stop();
    // Unlimited, the in-memory link outruns the encoder: the level may since have come
    // down again, so only the total is checked here.
    assert!(status.wire_bytes < status.raw_bytes, "text compresses: {status:?}");
    net.join_servers();
}

// ---- Measurement ----

/// The writes of an ext4 image as the kernel would issue them to a fresh device: every
/// 128 KiB chunk of the image holding any non-zero byte, in offset order.
fn image_writes(image: &[u8]) -> Vec<(u64, Vec<u8>)> {
    const CHUNK: usize = 128 << 10;
    image
        .chunks(CHUNK)
        .enumerate()
        .filter(|(_, c)| c.iter().any(|&b| b != 0))
        .map(|(i, c)| ((i * CHUNK) as u64, c.to_vec()))
        .collect()
}

fn measure_once(image: &[u8], window: u64, compression: Compression) -> (u64, u64, Duration) {
    let volume = image.len() as u64;
    let (cs, ct) = paired();
    let receiver = target(ct, volume, 256 << 20);
    let mut source = Source::new(volume);
    let mut changed = 0u64;
    for (offset, data) in image_writes(image) {
        changed += data.len() as u64;
        source.write(offset, data);
    }
    source.sync();
    let mut cfg = config(cs, volume, window, compression);
    cfg.batch_bytes = 1 << 20;
    cfg.window_bytes = 64 << 20;
    cfg.adaptive_compression = false;
    let started = Instant::now();
    let status = replicate(&receiver, cfg, &source);
    (changed, status.wire_bytes, started.elapsed())
}

/// Prints bytes on the wire per changed byte for an ext4 image of a directory tree, with
/// and without dedupe, with and without compression. Run with
/// `cargo test --release -p tidemark-sync --test dedupe -- --ignored --nocapture`
/// (`TIDEMARK_MEASURE_DIR` picks the tree; default `/usr/share/doc`).
#[test]
#[ignore = "measurement: builds a file system image and prints figures"]
fn measure_wire_bytes_per_changed_byte_on_an_ext4_image() {
    let dir = std::env::var("TIDEMARK_MEASURE_DIR").unwrap_or_else(|_| "/usr/share/doc".into());
    let Some(mkfs) =
        ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"].into_iter().find(|p| Path::new(p).exists())
    else {
        eprintln!("SKIP measure_wire_bytes_per_changed_byte_on_an_ext4_image: no mkfs.ext4");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let image_path = tmp.path().join("fs.img");
    let ok = Command::new(mkfs)
        .args(["-q", "-F", "-b", "4096", "-d", &dir])
        .arg(&image_path)
        .arg("256M")
        .status()
        .unwrap();
    if !ok.success() {
        eprintln!("SKIP measure: mkfs.ext4 -d {dir} failed ({ok})");
        return;
    }
    let image = std::fs::read(&image_path).unwrap();
    println!("ext4 image of {dir}: {} MiB", image.len() >> 20);
    for (name, window, compression) in [
        ("no dedupe, no compression", 0, Compression::Off),
        ("dedupe,    no compression", 256 << 20, Compression::Off),
        ("no dedupe, zstd 1", 0, Compression::Zstd { level: 1 }),
        ("dedupe,    zstd 1", 256 << 20, Compression::Zstd { level: 1 }),
        ("no dedupe, zstd 3", 0, Compression::Zstd { level: 3 }),
        ("dedupe,    zstd 3", 256 << 20, Compression::Zstd { level: 3 }),
    ] {
        let (changed, wire, took) = measure_once(&image, window, compression);
        println!(
            "{name}: {changed} changed bytes, {wire} wire bytes, {:.4} wire bytes per changed byte, {:.2} s",
            wire as f64 / changed as f64,
            took.as_secs_f64()
        );
    }
}
