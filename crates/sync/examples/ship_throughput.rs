//! Measures ship-and-apply throughput end to end over TCP loopback: a spool on disk holding
//! a mixed workload, a `Shipper` (zstd, Noise/AES-256-GCM), a `Receiver` applying to a
//! retention log on disk with group commit. Prints one line per run.
//!
//! ```text
//! cargo run --release -p tidemark-sync --example ship_throughput -- [MIB] [LEVEL|off ...]
//! ```
//!
//! The spool is filled first, so the figure is the replication path alone: spool read,
//! batch encode, compression, encryption, TCP, decryption, decompression, retention-log
//! append and fdatasync, ack, spool trim. Both journals live in one temporary directory.

use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tidemark_journal::{
    Event, FsDir, MemVolume, RetentionConfig, RetentionLog, Spool, SpoolConfig, SystemClock,
    VolumeId,
};
use tidemark_sync::apply::{Receiver, ReceiverConfig};
use tidemark_sync::secure::{AllowedPeers, Keypair, SecureConfig};
use tidemark_sync::ship::{Shipper, ShipperConfig, TcpConnect};
use tidemark_sync::wire::{Compression, Hello, PairId, Role, SUPPORTED_VERSIONS, VolumeInfo};

const VOLUME: u64 = 1 << 30;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Mixed data: a third random, a third text-like, a sixth one repeated byte, a sixth zeros.
fn data(rng: &mut Rng, len: usize) -> Vec<u8> {
    const WORDS: [&[u8]; 8] =
        [b"tidemark ", b"replica ", b"journal ", b"block ", b"the ", b"of ", b"write ", b"42 "];
    let mut v = vec![0u8; len];
    match rng.next() % 6 {
        0 | 1 => {
            for c in v.chunks_mut(8) {
                c.copy_from_slice(&rng.next().to_le_bytes()[..c.len()]);
            }
        }
        2 | 3 => {
            let mut at = 0;
            while at < len {
                let w = WORDS[(rng.next() % 8) as usize];
                let n = w.len().min(len - at);
                v[at..at + n].copy_from_slice(&w[..n]);
                at += n;
            }
        }
        4 => v.fill(rng.next() as u8),
        _ => {}
    }
    v
}

fn run(mib: u64, compression: Compression) {
    let tmp = tempfile::tempdir().unwrap();
    let spool_dir = tmp.path().join("spool");
    let log_dir = tmp.path().join("retention");
    std::fs::create_dir_all(&spool_dir).unwrap();
    std::fs::create_dir_all(&log_dir).unwrap();
    let (spool, _) = Spool::open(
        Arc::new(FsDir::new(&spool_dir).unwrap()),
        SpoolConfig { capacity_bytes: 4 * (mib << 20), segment_bytes: 64 << 20, key: None },
        Arc::new(SystemClock),
    )
    .unwrap();
    let spool = Arc::new(Mutex::new(spool));
    let mut rng = Rng(42);
    let mut raw = 0u64;
    {
        let mut s = spool.lock().unwrap();
        while raw < mib << 20 {
            let blocks = 1 + rng.next() % 64;
            let len = (blocks * 4096) as usize;
            let offset = (rng.next() % (VOLUME / 4096 - blocks)) * 4096;
            let bytes = data(&mut rng, len);
            raw += len as u64;
            s.append(&Event::Write { volume: VolumeId(0), offset, data: Bytes::from(bytes) })
                .unwrap();
            if rng.next() % 16 == 0 {
                s.append(&Event::Barrier).unwrap();
            }
        }
        s.sync().unwrap();
    }
    let last = spool.lock().unwrap().last_seq();

    let source_key = Keypair::generate().unwrap();
    let target_key = Keypair::generate().unwrap();
    let cs = SecureConfig::new(source_key.clone(), AllowedPeers::from_keys([*target_key.public()]));
    let ct = SecureConfig::new(target_key, AllowedPeers::from_keys([*source_key.public()]));
    let (log, _) = RetentionLog::open(
        Arc::new(FsDir::new(&log_dir).unwrap()),
        vec![Arc::new(MemVolume::new(VOLUME))],
        RetentionConfig::default(),
        Arc::new(SystemClock),
    )
    .unwrap();
    let pair = PairId([1; 16]);
    let receiver = Receiver::new(log, ReceiverConfig::new("target", pair, ct)).unwrap();
    let listener = receiver.listen(TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
    let hello = Hello {
        versions: SUPPORTED_VERSIONS,
        role: Role::Source,
        node: "source".to_owned(),
        pair,
        volumes: vec![VolumeInfo { id: VolumeId(0), block_size: 4096, size: VOLUME }],
    };
    let mut cfg = ShipperConfig::new(hello, cs);
    cfg.compression = compression;
    let started = Instant::now();
    let handle = Shipper::new(spool.clone(), cfg)
        .start(TcpConnect { addr: listener.local_addr(), timeout: Duration::from_secs(5) })
        .unwrap();
    let done = handle.wait_for(Duration::from_secs(600), |s| s.acked == last);
    let took = started.elapsed();
    let status = handle.stop();
    assert!(done.is_some(), "did not catch up: {status:?}");
    receiver.shutdown();
    listener.stop();
    let mib_s = raw as f64 / (1 << 20) as f64 / took.as_secs_f64();
    println!(
        "{:>12}: {} MiB of writes ({} events) shipped and applied in {:.2?} = {:.0} MiB/s; \
         wire/raw {:.3}, {} batches, {} syncs on the target",
        match compression {
            Compression::Off => "off".to_owned(),
            Compression::Zstd { level } => format!("zstd {level}"),
        },
        raw >> 20,
        last.0,
        took,
        mib_s,
        status.wire_bytes as f64 / status.raw_bytes as f64,
        status.batches,
        receiver.status().syncs,
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mib = args.next().and_then(|a| a.parse().ok()).unwrap_or(256);
    let mut levels: Vec<Compression> = args
        .map(|a| match a.as_str() {
            "off" => Compression::Off,
            l => Compression::Zstd { level: l.parse().expect("a zstd level or off") },
        })
        .collect();
    if levels.is_empty() {
        levels =
            vec![Compression::Zstd { level: 1 }, Compression::Zstd { level: 3 }, Compression::Off];
    }
    for c in levels {
        run(mib, c);
    }
}
