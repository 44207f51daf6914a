//! `tidemark receive`: the target of a pair. It keeps the replica's base image
//! (`DIR/replica.img`, sparse, created zero-filled on first run) and the CDP retention log
//! (`DIR/journal`), accepts the paired source on `--listen`, and serves until SIGINT or
//! SIGTERM. Every second it writes `DIR/status.json`; every few seconds it prints one
//! status line.
//!
//! It also serves the control socket (`DIR/control.sock` by default; `docs/control-protocol.md`):
//! recovery points, and virtual snapshots of them exposed as loop devices under
//! `DIR/vsnaps/` while replication goes on (`tidemark points`, `tidemark recover`).
//!
//! Invariant: on a signal the control socket stops first (every virtual snapshot is torn
//! down and its hold released), then the listener, then the live session ends, and the
//! retention log is synced before the process exits, so everything acknowledged is on
//! disk (it already was: acknowledgements follow the journal's sync).

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use tidemark_journal::{BlockIo, FileIo, FsDir, RetentionConfig, RetentionLog, SystemClock};
use tidemark_sync::apply::{Receiver, ReceiverConfig, ReceiverStatus};

use crate::{common, control, signals, status};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory of the replica (replica.img, journal/, status.json).
    #[arg(long)]
    dir: PathBuf,
    /// Address to listen on (port 0: any free port; the chosen one is printed as
    /// `listening: ADDR`).
    #[arg(long)]
    listen: String,
    /// This node's private key (from `tidemark keygen`).
    #[arg(long)]
    key: PathBuf,
    /// The source's public key.
    #[arg(long)]
    peer: PathBuf,
    /// The pair id (32 hexadecimal digits), the same on both sides.
    #[arg(long)]
    pair: String,
    /// Size of the protected volume in bytes.
    #[arg(long)]
    size: u64,
    /// Block size of the journal's index.
    #[arg(long, default_value_t = 4096)]
    block_size: u32,
    /// This node's name, as the source sees it.
    #[arg(long, default_value = "target")]
    name: String,
    /// The control socket (default: DIR/control.sock).
    #[arg(long)]
    control: Option<PathBuf>,
    /// Failback: an existing volume image to use as the replica's base (linked as
    /// DIR/replica.img) instead of a blank one; the source runs `protect --failback`.
    #[arg(long)]
    replica: Option<PathBuf>,
    /// With --replica: the state directory of the `protect` that ran on that image before
    /// the failover; refuses (split brain) when it holds writes the DR side never received.
    #[arg(long, requires = "replica")]
    old_state: Option<PathBuf>,
    /// With --old-state: the DR side wins a split brain; this site's later writes are
    /// overwritten by the failback resync.
    #[arg(long, requires = "old_state")]
    discard_local_changes: bool,
}

/// Seconds between two human status lines.
const LINE_EVERY: Duration = Duration::from_secs(5);

pub fn run(args: Args) -> anyhow::Result<()> {
    let pair = common::parse_pair(&args.pair)?;
    let secure = common::secure(&args.key, &args.peer)?;
    if args.size == 0 || args.size % u64::from(args.block_size) != 0 {
        bail!("volume size {} must be a positive multiple of {}", args.size, args.block_size);
    }
    std::fs::create_dir_all(&args.dir).with_context(|| format!("create {}", args.dir.display()))?;
    crate::promote::check_not_promoting(&args.dir)?;
    if let Some(existing) = &args.replica {
        if let Some(old) = &args.old_state {
            crate::failback::check_old_state(old, args.discard_local_changes)?;
        }
        crate::failback::link_replica(&args.dir, existing)?;
    }
    let image = args.dir.join("replica.img");
    let base = if image.exists() {
        let f = FileIo::open(&image).with_context(|| format!("open {}", image.display()))?;
        let len = f.len().with_context(|| format!("stat {}", image.display()))?;
        if len != args.size {
            bail!("{} holds {len} bytes, expected {} (--size)", image.display(), args.size);
        }
        f
    } else {
        FileIo::create(&image, args.size).with_context(|| format!("create {}", image.display()))?
    };
    let cfg = RetentionConfig { block_size: args.block_size, ..Default::default() };
    let (log, open) = RetentionLog::open(
        Arc::new(FsDir::new(args.dir.join("journal"))?),
        vec![Arc::new(base) as Arc<dyn BlockIo>],
        cfg,
        Arc::new(SystemClock),
    )
    .context("open the retention log")?;
    if !open.defects.is_empty() {
        eprintln!("journal: {} damaged stretches skipped: {:?}", open.defects.len(), open.defects);
    }
    let receiver = Receiver::new(log, ReceiverConfig::new(args.name.clone(), pair, secure))?;
    let listener = receiver.listen(
        TcpListener::bind(&args.listen).with_context(|| format!("listen on {}", args.listen))?,
    )?;
    let addr = listener.local_addr();
    signals::install()?;
    let socket = args.control.clone().unwrap_or_else(|| control::default_socket(&args.dir));
    let control = control::Server::start(&socket, receiver.clone(), &args.dir.join("vsnaps"))?;
    println!("control: {}", control.path().display());
    println!("listening: {addr}");
    println!("pair {pair}, replica {}, {} bytes", image.display(), args.size);

    let started = Instant::now();
    let mut last_line = Instant::now();
    let mut last_file = Instant::now() - Duration::from_secs(2);
    while !signals::stop_requested() {
        if last_file.elapsed() >= Duration::from_secs(1) {
            let doc = document(&receiver, &addr.to_string(), started.elapsed(), "serving");
            status::write(&args.dir, &doc)?;
            last_file = Instant::now();
        }
        if last_line.elapsed() >= LINE_EVERY {
            println!("{}", line(&receiver.status(), &receiver));
            last_line = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("signal: shutting down");
    control.stop();
    listener.stop();
    receiver.shutdown();
    receiver.with_log(|log| log.sync()).context("sync the retention log")?;
    let doc = document(&receiver, &addr.to_string(), started.elapsed(), "stopped");
    status::write(&args.dir, &doc)?;
    println!("{}", line(&receiver.status(), &receiver));
    Ok(())
}

fn line(s: &ReceiverStatus, receiver: &Receiver) -> String {
    let consistent = receiver.with_log(|log| log.status().inconsistent.is_none());
    format!(
        "{} received {} durable {} acked {} sessions {} batches {} replica {}{}",
        if s.connected { "connected" } else { "waiting" },
        s.received,
        s.durable,
        s.acked,
        s.sessions,
        s.batches,
        if consistent { "consistent" } else { "inconsistent" },
        s.last_error.as_deref().map(|e| format!(" (last error: {e})")).unwrap_or_default()
    )
}

fn document(receiver: &Receiver, addr: &str, uptime: Duration, state: &str) -> serde_json::Value {
    let s = receiver.status();
    let (r, held) = receiver.with_log(|log| (log.status(), log.held()));
    json!({
        "role": "receive",
        "state": state,
        "pid": std::process::id(),
        "updated_ms": status::now_ms(),
        "uptime_s": common::secs(uptime),
        "listen": addr,
        "connected": s.connected,
        "peer": s.peer,
        "sessions": s.sessions,
        "received": s.received.0,
        "durable": s.durable.0,
        "acked": s.acked.0,
        "batches": s.batches,
        "events": s.events,
        "data_bytes": s.data_bytes,
        "deduped_bytes": s.deduped_bytes,
        "hash_requests": s.hash_requests,
        "last_error": s.last_error,
        "failed": s.failed,
        "replica": {
            "consistent": r.inconsistent.is_none(),
            "open_resyncs": r.inconsistent.as_ref().map(|w| w.open_ids.clone()).unwrap_or_default(),
            "initial_sync": r.inconsistent.as_ref().is_some_and(|w| w.initial_sync),
            "last_consistent_seq": r.last_consistent.as_ref().map(|p| p.seq.0),
        },
        "retention": {
            "oldest_seq": r.oldest.seq.0,
            "newest_seq": r.newest_seq.0,
            "window_available_s": common::secs(r.window_available),
            "window_configured_s": r.window_configured.map(common::secs),
            "points": r.points,
            "journal_bytes": r.bytes,
            // Points held by virtual snapshots: retention keeps what they read.
            "held_seqs": held.iter().map(|s| s.0).collect::<Vec<_>>(),
        },
    })
}
