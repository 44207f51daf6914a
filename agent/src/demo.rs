//! `tidemark demo`: the README's main command. Until the replication path lands it runs
//! the target's journal end to end: a protected volume receives a workload with barriers and
//! bookmarks; every event goes to the CDP retention log; the retention policy runs on
//! simulated time; then every bookmark is read back without materializing, one is
//! materialized to a file, and each is checked against the source's own hash at that
//! bookmark.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::{Rng, SeedableRng};
use tidemark_journal::{
    BlockIo, Bookmark, BookmarkKind, Clock, Event, FileIo, FsDir, JournalKey, Keep, ManualClock,
    Nanos, PointKind, RecoveryPoint, RetentionConfig, RetentionLog, RetentionPolicy, Seq, Tier,
    VolumeId,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Working directory (default: a fresh temporary directory, removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Size of the protected volume in MiB.
    #[arg(long, default_value_t = 64)]
    volume_mib: u64,
    /// Simulated hours of workload.
    #[arg(long, default_value_t = 6)]
    hours: u64,
    /// Workload seed (printed, so a run can be repeated).
    #[arg(long)]
    seed: Option<u64>,
}

const SECTOR: u64 = 512;

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
        "tidemark demo: protected volume {} MiB, {} simulated hours, seed {seed}",
        args.volume_mib, args.hours
    );
    println!("  working in {}", work.display());

    let source =
        FileIo::create(work.join("source.img"), vol_len).context("create source volume")?;
    let replica_base =
        Arc::new(FileIo::create(work.join("replica-base.img"), vol_len).context("create replica")?);
    let clock = Arc::new(ManualClock::new(Nanos(1_767_225_600 * Nanos::SECOND)));
    let policy = RetentionPolicy {
        max_age: Some(Duration::from_secs(4 * 3600)),
        max_bytes: None,
        tiers: vec![Tier {
            older_than: Duration::from_secs(3600),
            keep: Keep::Every {
                interval: Duration::from_secs(900),
                bookmarks: vec![BookmarkKind::Application],
            },
        }],
    };
    let key = JournalKey::derive(format!("demo key {seed}").as_bytes());
    let cfg = RetentionConfig { segment_bytes: 8 << 20, block_size: 4096, key: Some(key), policy };
    let (mut log, _) = RetentionLog::open(
        Arc::new(FsDir::new(work.join("journal"))?),
        vec![replica_base.clone() as Arc<dyn BlockIo>],
        cfg.clone(),
        clock.clone(),
    )
    .context("open retention log")?;

    // The workload: hot and cold regions, mixed sizes, a barrier every simulated second,
    // an application bookmark every 20 minutes, a user bookmark every hour.
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut seq = Seq(0);
    let mut bookmarks: Vec<(String, [u8; 32])> = Vec::new();
    let mut bytes_written = 0u64;
    let mut buf = vec![0u8; 256 << 10];
    let total_secs = args.hours * 3600;
    for sec in 0..total_secs {
        // A quiet volume between bursts, as real servers are.
        let writes = if sec % 300 < 20 { rng.gen_range(2..8) } else { rng.gen_range(0..2) };
        for _ in 0..writes {
            let hot = rng.gen_bool(0.7);
            let span = if hot { vol_len / 16 } else { vol_len };
            let sectors = *[1u64, 8, 8, 8, 16, 64, 128].get(rng.gen_range(0..7)).unwrap_or(&8);
            let len = sectors * SECTOR;
            let off = rng.gen_range(0..(span - len) / SECTOR) * SECTOR;
            let data = &mut buf[..len as usize];
            fill(&mut rng, data);
            source.write_at(data, off)?;
            seq = seq.next();
            let ev = if rng.gen_bool(0.05) {
                source.write_at(&vec![0u8; len as usize], off)?;
                Event::WriteZeroes { volume: VolumeId(0), offset: off, len: len as u32 }
            } else {
                Event::Write { volume: VolumeId(0), offset: off, data: data.to_vec().into() }
            };
            log.append(seq, clock.now(), &ev)?;
            bytes_written += len;
        }
        seq = seq.next();
        let ev = if sec % 1200 == 1199 || sec % 3600 == 3599 {
            let (name, kind) = if sec % 3600 == 3599 {
                (format!("hourly-{}", sec / 3600 + 1), BookmarkKind::User)
            } else {
                (format!("app-checkpoint-{}", sec / 1200 + 1), BookmarkKind::Application)
            };
            bookmarks.push((name.clone(), hash_volume(&source, vol_len)?));
            Event::Bookmark(Bookmark::new(name, kind, 0)?)
        } else {
            Event::Barrier
        };
        log.append(seq, clock.now(), &ev)?;
        if sec % 60 == 59 {
            log.sync()?;
        }
        if sec % 1800 == 1799 {
            log.enforce()?;
        }
        clock.advance(Duration::from_secs(1));
    }
    log.sync()?;
    let report = log.enforce()?;
    println!(
        "  workload: {} events, {:.1} MiB written; retention pass dropped {} points, {} remain",
        seq.0,
        bytes_written as f64 / (1 << 20) as f64,
        report.dropped_points,
        report.retained_points
    );

    // Reopen from disk, as a recovery after a restart would.
    drop(log);
    let (log, open) = RetentionLog::open(
        Arc::new(FsDir::new(work.join("journal"))?),
        vec![replica_base.clone() as Arc<dyn BlockIo>],
        cfg,
        clock.clone(),
    )
    .context("reopen retention log")?;
    if !open.defects.is_empty() {
        bail!("journal damaged after a clean close: {:?}", open.defects);
    }
    let status = log.status();
    println!(
        "  journal: {:.1} MiB on disk, window {} min available (configured {} min), {} points",
        status.bytes as f64 / (1 << 20) as f64,
        status.window_available.as_secs() / 60,
        status.window_configured.map_or(0, |d| d.as_secs() / 60),
        status.points
    );

    // Every bookmark still retained reads back as the source had it.
    let mut checked = 0;
    for p in log.points() {
        let PointKind::Bookmark(b) = &p.kind else { continue };
        let Some((_, want)) = bookmarks.iter().find(|(n, _)| *n == b.name) else {
            bail!("the journal offers bookmark {:?} that the source never took", b.name);
        };
        let got = hash_point(&log, &p, vol_len)?;
        if got != *want {
            bail!("bookmark {:?} (seq {}) differs from the source", b.name, p.seq);
        }
        checked += 1;
    }
    if checked == 0 {
        bail!("no bookmark was retained to check");
    }
    println!(
        "  verified {checked} retained bookmarks against the source, block by block (point-in-time reads)"
    );

    // Materialize one hour ago to a file and check it.
    let hour_ago = clock.now().minus(Duration::from_secs(3600));
    let point = log.resolve(&RecoveryPoint::Time(hour_ago))?;
    let out = FileIo::create(work.join("recovered.img"), 0)?;
    let t = Instant::now();
    let m = log.materialize(&point, VolumeId(0), &out, &mut |_, _| {})?;
    println!(
        "  materialized the point one hour back (seq {}) in {:.2} s: {} blocks from the journal, blake3 {}",
        point.seq,
        t.elapsed().as_secs_f64(),
        m.journal_blocks,
        hex(&m.hash[..8])
    );
    if let PointKind::Bookmark(b) = &point.kind {
        let want = bookmarks.iter().find(|(n, _)| *n == b.name).map(|(_, h)| *h);
        if want != Some(m.hash) {
            bail!("materialized bookmark {:?} differs from the source", b.name);
        }
    }
    let latest = log.resolve(&RecoveryPoint::Latest)?;
    if hash_point(&log, &latest, vol_len)? != hash_volume(&source, vol_len)? {
        bail!("the latest point differs from the source volume");
    }
    println!("  latest point equals the source volume");
    println!("demo OK in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn fill(rng: &mut impl Rng, data: &mut [u8]) {
    // Half text-like, half random: roughly what a server writes.
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

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
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
