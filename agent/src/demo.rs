//! `tidemark demo`: the README's main command. It runs real replication on this machine: a
//! protected volume (a file) captured through the tap's library API (intent map, spool),
//! shipped over TCP loopback through a mutually authenticated Noise channel to a target
//! that keeps the replica's base image and the CDP retention log; a workload with barriers
//! and bookmarks runs on simulated time (the source's spool and the target's journal share a
//! clock), retention thins the history, and at the end every retained bookmark, the latest
//! point and the point one hour back are checked against the source's own hashes.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use rand::{Rng, SeedableRng};
use tidemark_journal::{
    BlockIo, Bookmark, BookmarkKind, Clock, FileIo, FsDir, Keep, ManualClock, Nanos, PointKind,
    RecoveryPoint, RetentionConfig, RetentionLog, RetentionPolicy, Spool, SpoolConfig, Tier,
    VolumeId,
};
use tidemark_sync::apply::{Receiver, ReceiverConfig};
use tidemark_sync::secure::{AllowedPeers, Keypair, SecureConfig};
use tidemark_sync::ship::{Shipper, ShipperConfig, ShipperEvent, TcpConnect};
use tidemark_sync::wire::{Hello, PairId, Role, SUPPORTED_VERSIONS, VolumeInfo};
use tidemark_tap::{IntentConfig, IntentMap, Tap, TapConfig};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Working directory (default: a fresh temporary directory, removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Size of the protected volume in MiB.
    #[arg(long, default_value_t = 64)]
    volume_mib: u64,
    /// Simulated hours of workload.
    #[arg(long, default_value_t = 3)]
    hours: u64,
    /// Workload seed (printed, so a run can be repeated).
    #[arg(long)]
    seed: Option<u64>,
}

const SECTOR: u64 = 512;
const PATIENCE: Duration = Duration::from_secs(120);

pub fn run(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let tmp;
    let work = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempdir()?;
            tmp.0.clone()
        }
    };
    let seed = args.seed.unwrap_or_else(rand::random);
    let vol_len = args.volume_mib << 20;
    println!(
        "tidemark demo: protected volume {} MiB replicated over TCP loopback, {} simulated hours, seed {seed}",
        args.volume_mib, args.hours
    );
    println!("  working in {}", work.display());
    let clock = Arc::new(ManualClock::new(Nanos(1_767_225_600 * Nanos::SECOND)));

    // Keys: each side knows the other's public key (what `tidemark keygen` and the pairing
    // flow set up between two hosts).
    let source_key = Keypair::generate()?;
    let target_key = Keypair::generate()?;
    println!("  source key {} / target key {}", source_key.fingerprint(), target_key.fingerprint());
    let source_secure =
        SecureConfig::new(source_key.clone(), AllowedPeers::from_keys([*target_key.public()]));
    let target_secure =
        SecureConfig::new(target_key, AllowedPeers::from_keys([*source_key.public()]));
    let pair = PairId(
        *blake3::hash(format!("demo pair {seed}").as_bytes())
            .as_bytes()
            .first_chunk()
            .expect("32 bytes"),
    );

    // The target: base image + encrypted retention log, behind a receiver on loopback.
    let target_dir = work.join("target");
    std::fs::create_dir_all(&target_dir)?;
    let base = Arc::new(FileIo::create(target_dir.join("replica-base.img"), vol_len)?);
    let policy = RetentionPolicy {
        max_age: Some(Duration::from_secs(2 * 3600)),
        max_bytes: None,
        tiers: vec![Tier {
            older_than: Duration::from_secs(1800),
            keep: Keep::Every {
                interval: Duration::from_secs(600),
                bookmarks: vec![BookmarkKind::Application],
            },
        }],
    };
    let journal_cfg = RetentionConfig {
        segment_bytes: 8 << 20,
        block_size: 4096,
        key: Some(tidemark_journal::JournalKey::derive(
            format!("demo at-rest key {seed}").as_bytes(),
        )),
        policy,
    };
    let (log, _) = RetentionLog::open(
        Arc::new(FsDir::new(target_dir.join("journal"))?),
        vec![base.clone() as Arc<dyn BlockIo>],
        journal_cfg.clone(),
        clock.clone(),
    )
    .context("open the target's retention log")?;
    let receiver = Receiver::new(log, ReceiverConfig::new("demo-target", pair, target_secure))?;
    let listener = receiver.listen(TcpListener::bind("127.0.0.1:0")?)?;
    let addr = listener.local_addr();
    println!("  target listening on {addr}");

    // The source: protected volume, write-intent map, spool, tap, shipper.
    let source_dir = work.join("source");
    std::fs::create_dir_all(&source_dir)?;
    let device = Arc::new(FileIo::create(source_dir.join("protected.img"), vol_len)?);
    let (spool, _) = Spool::open(
        Arc::new(FsDir::new(source_dir.join("spool"))?),
        SpoolConfig { capacity_bytes: 1 << 30, segment_bytes: 16 << 20, key: None },
        clock.clone(),
    )?;
    let intent_file = Arc::new(FileIo::create(source_dir.join("intent.map"), 0)?);
    let (intent, _) = IntentMap::open(intent_file, vol_len, IntentConfig::default())?;
    let tap = Arc::new(Tap::new(device.clone(), spool, intent, TapConfig::default())?);
    let hello = Hello {
        versions: SUPPORTED_VERSIONS,
        role: Role::Source,
        node: "demo-source".to_owned(),
        pair,
        volumes: vec![VolumeInfo { id: VolumeId(0), block_size: 4096, size: vol_len }],
    };
    let tap_for_acks = tap.clone();
    let shipper = Shipper::new(tap.shared_spool(), ShipperConfig::new(hello, source_secure))
        .observer(Box::new(move |e| {
            if let ShipperEvent::Acked { upto } = e {
                // The intent map may clear regions whose writes are all acknowledged.
                tap_for_acks.intent().acknowledge(*upto);
            }
        }))
        .start(TcpConnect { addr, timeout: Duration::from_secs(5) })?;

    // The workload: hot and cold regions, mixed sizes and content, a barrier every
    // simulated second, an application bookmark every 20 minutes, a user bookmark hourly.
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut bookmarks: Vec<(String, [u8; 32])> = Vec::new();
    let mut bytes_written = 0u64;
    let mut buf = vec![0u8; 256 << 10];
    for sec in 0..args.hours * 3600 {
        let writes = if sec % 300 < 20 { rng.gen_range(2..8) } else { rng.gen_range(0..2) };
        for _ in 0..writes {
            let span = if rng.gen_bool(0.7) { vol_len / 16 } else { vol_len };
            let sectors = [1u64, 8, 8, 8, 16, 64, 128][rng.gen_range(0..7)];
            let len = sectors * SECTOR;
            let off = rng.gen_range(0..(span - len) / SECTOR) * SECTOR;
            if rng.gen_bool(0.05) {
                tap.write_zeroes(off, len)?;
            } else {
                let data = &mut buf[..len as usize];
                fill(&mut rng, data);
                tap.write(off, Bytes::copy_from_slice(data))?;
            }
            bytes_written += len;
        }
        if sec % 1200 == 1199 || sec % 3600 == 3599 {
            let (name, kind) = if sec % 3600 == 3599 {
                (format!("hourly-{}", sec / 3600 + 1), BookmarkKind::User)
            } else {
                (format!("app-checkpoint-{}", sec / 1200 + 1), BookmarkKind::Application)
            };
            bookmarks.push((name.clone(), hash_volume(device.as_ref(), vol_len)?));
            tap.bookmark(Bookmark::new(name, kind, 0)?)?;
        } else {
            tap.flush()?;
        }
        if sec % 10 == 9 {
            tap.sync_spool()?;
            shipper.notify();
        }
        if sec % 1800 == 1799 {
            receiver.with_log(|log| log.enforce())?;
        }
        clock.advance(Duration::from_secs(1));
    }
    let last = tap.sync_spool()?;
    shipper.notify();
    let status = shipper
        .wait_for(PATIENCE, |s| s.acked >= last || s.last_error.is_some() && s.state_failed())
        .context("the target did not acknowledge the whole stream in time")?;
    if status.acked < last {
        bail!("shipping failed: {:?}", status.last_error);
    }
    let ratio = status.wire_bytes as f64 / status.raw_bytes.max(1) as f64;
    println!(
        "  workload: {} events, {:.1} MiB written; shipped in {} batches, {:.1} MiB on the wire ({:.2} of raw), all acknowledged",
        last.0,
        bytes_written as f64 / (1 << 20) as f64,
        status.batches,
        status.wire_bytes as f64 / (1 << 20) as f64,
        ratio
    );
    let final_status = shipper.stop();
    tap.acknowledge(final_status.acked)?;
    let report = receiver.with_log(|log| log.enforce())?;
    println!(
        "  retention: {} points retained, {} dropped in the last pass",
        report.retained_points, report.dropped_points
    );
    listener.stop();
    receiver.shutdown();

    // Recovery checks on the target, after a reopen from disk as after a restart.
    let log = match receiver.into_log() {
        Ok(log) => log,
        Err(_) => bail!("the receiver still holds the retention log"),
    };
    drop(log);
    let (log, open) = RetentionLog::open(
        Arc::new(FsDir::new(target_dir.join("journal"))?),
        vec![base.clone() as Arc<dyn BlockIo>],
        journal_cfg,
        clock.clone(),
    )
    .context("reopen the target's retention log")?;
    if !open.defects.is_empty() {
        bail!("journal damaged after a clean close: {:?}", open.defects);
    }
    let st = log.status();
    println!(
        "  target journal: {:.1} MiB, window {} min available (configured {} min), {} points",
        st.bytes as f64 / (1 << 20) as f64,
        st.window_available.as_secs() / 60,
        st.window_configured.map_or(0, |d| d.as_secs() / 60),
        st.points
    );
    let mut checked = 0;
    for p in log.points() {
        let PointKind::Bookmark(b) = &p.kind else { continue };
        let Some((_, want)) = bookmarks.iter().find(|(n, _)| *n == b.name) else {
            bail!("the target offers bookmark {:?} that the source never took", b.name);
        };
        if hash_point(&log, &p, vol_len)? != *want {
            bail!("bookmark {:?} (seq {}) differs from the source", b.name, p.seq);
        }
        checked += 1;
    }
    if checked == 0 {
        bail!("no bookmark was retained to check");
    }
    println!("  verified {checked} retained bookmarks against the source (point-in-time reads)");
    let hour_ago =
        log.resolve(&RecoveryPoint::Time(clock.now().minus(Duration::from_secs(3600))))?;
    let out = FileIo::create(work.join("recovered.img"), 0)?;
    let t = Instant::now();
    let m = log.materialize(&hour_ago, VolumeId(0), &out, &mut |_, _| {})?;
    println!(
        "  materialized the point one hour back (seq {}, {:?}) in {:.2} s: {} blocks from the journal",
        hour_ago.seq,
        kind_name(&hour_ago.kind),
        t.elapsed().as_secs_f64(),
        m.journal_blocks
    );
    if let PointKind::Bookmark(b) = &hour_ago.kind {
        if bookmarks.iter().find(|(n, _)| *n == b.name).map(|(_, h)| *h) != Some(m.hash) {
            bail!("materialized bookmark {:?} differs from the source", b.name);
        }
    }
    let latest = log.resolve(&RecoveryPoint::Latest)?;
    if hash_point(&log, &latest, vol_len)? != hash_volume(device.as_ref(), vol_len)? {
        bail!("the latest point on the target differs from the source volume");
    }
    println!("  latest point on the target equals the source volume");
    match Arc::try_unwrap(tap) {
        Ok(tap) => tap.close()?,
        Err(_) => bail!("the tap is still shared"),
    }
    println!("demo OK in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

trait FailedState {
    fn state_failed(&self) -> bool;
}

impl FailedState for tidemark_sync::ship::ShipperStatus {
    fn state_failed(&self) -> bool {
        matches!(self.state, tidemark_sync::ship::LinkState::Failed)
    }
}

fn kind_name(k: &PointKind) -> &'static str {
    match k {
        PointKind::Base => "base",
        PointKind::Barrier => "barrier",
        PointKind::Bookmark(_) => "bookmark",
        PointKind::Latest => "latest",
        PointKind::ResyncEnd { .. } => "resync end",
    }
}

fn fill(rng: &mut impl Rng, data: &mut [u8]) {
    // Half random, half text-like: roughly what a server writes.
    if rng.gen_bool(0.5) {
        rng.fill(data);
    } else {
        let words: &[&[u8]] = &[b"tidemark ", b"journal ", b"block ", b"0042 ", b"\n"];
        let mut i = 0;
        while i < data.len() {
            let w = words[rng.gen_range(0..words.len())];
            let n = w.len().min(data.len() - i);
            data[i..i + n].copy_from_slice(&w[..n]);
            i += n;
        }
    }
}

fn hash_volume(v: &dyn BlockIo, len: u64) -> anyhow::Result<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(buf.len() as u64) as usize;
        v.read_at(&mut buf[..n], pos)?;
        h.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(*h.finalize().as_bytes())
}

fn hash_point(
    log: &RetentionLog,
    p: &tidemark_journal::PointInfo,
    len: u64,
) -> anyhow::Result<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(buf.len() as u64) as usize;
        log.read_at(p, VolumeId(0), pos, &mut buf[..n])?;
        h.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(*h.finalize().as_bytes())
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

fn tempdir() -> anyhow::Result<TempDir> {
    let p = std::env::temp_dir().join(format!(
        "tidemark-demo-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&p)?;
    Ok(TempDir(p))
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
