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
//! With `--retain`, `--tier` or `--journal-max-mib` it runs a retention pass
//! (`RetentionLog::enforce`, which keeps what virtual snapshots hold) every
//! `--retention-every` seconds; status.json carries the window configured and available,
//! the space used and the last pass's report. When the journal fails (a full disk, an I/O
//! error: it then refuses writes until reopened) the receiver stops serving, reopens the
//! journal every 2 s until that works, and serves again on the same port; nothing
//! acknowledged is lost, since acknowledgements follow the journal's sync.
//!
//! Invariant: on a signal the control socket stops first (every virtual snapshot is torn
//! down and its hold released), then the live session ends cleanly (`Receiver::shutdown`:
//! what it had received is appended, synced and acknowledged, the source gets `Error` code
//! 7, shutting down, and reconnects later), then the listener (connections still in their
//! handshake are cut), and the retention log is synced before the process exits (exit
//! status 0), so everything acknowledged is on disk (it already was: acknowledgements
//! follow the journal's sync). The whole stop takes at most a few seconds
//! (`SHUTDOWN_GRACE` plus the session's linger when a source stops reading).

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use tidemark_journal::{
    BlockIo, BookmarkKind, FileIo, FsDir, Keep, RetentionConfig, RetentionLog, RetentionPolicy,
    RetentionReport, SystemClock, Tier, VolumeId,
};
use tidemark_sync::apply::{Receiver, ReceiverConfig, ReceiverStatus};
use tidemark_sync::secure::SecureConfig;
use tidemark_sync::wire::PairId;

use crate::common::parse_duration;
use crate::{common, control, metrics, signals, status};

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
    /// Serve Prometheus metrics on this address (`GET /metrics`; printed as `metrics: ADDR`).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// The retention window: recovery points older than this are dropped and the replica's
    /// base moves forward (`90s`, `30m`, `24h`, `7d`; a bare number is seconds). Default:
    /// keep everything (until `--journal-max-mib`).
    #[arg(long, value_parser = parse_duration)]
    retain: Option<Duration>,
    /// A sparse tier, `AGE=EVERY` (e.g. `1h=10m`): of the points older than AGE, keep the
    /// last of every EVERY interval and every bookmark. Repeatable.
    #[arg(long, value_parser = parse_tier)]
    tier: Vec<Tier>,
    /// The journal's space limit in MiB: beyond it the oldest history goes first (never the
    /// newest point, never a write). At least four segments.
    #[arg(long)]
    journal_max_mib: Option<u64>,
    /// Size of a journal segment in MiB (the unit in which space is reclaimed).
    #[arg(long, default_value_t = 64)]
    segment_mib: u64,
    /// Seconds between two retention passes.
    #[arg(long, default_value_t = 10.0)]
    retention_every: f64,
    /// Seconds between two scrubs of the journal (every sealed segment read again; damage
    /// found is reported and the source asked to resend what it lost); 0: never (damage is
    /// then found when the journal is opened).
    #[arg(long, default_value_t = 0.0)]
    scrub_every: f64,
    /// Failback: an existing volume image to use as the replica's base (linked as
    /// DIR/replica.img) instead of a blank one; the source runs `protect --failback`.
    #[arg(long)]
    replica: Option<PathBuf>,
    /// With --replica: the state directory of the `protect` that ran on that image before
    /// the failover; refuses (split brain) when it holds writes the DR side never received,
    /// and gives the replica that protection's lineage (checked against the source's).
    #[arg(long, requires = "replica")]
    old_state: Option<PathBuf>,
    /// The source wins a split brain (or any lineage conflict): this replica's own later
    /// writes are overwritten by the source's failback resync.
    #[arg(long)]
    discard_local_changes: bool,
}

/// Seconds between two human status lines.
const LINE_EVERY: Duration = Duration::from_secs(5);
/// Wait before reopening a journal that failed (a full disk, an I/O error).
const REOPEN_AFTER: Duration = Duration::from_secs(2);

/// Parses a tier `AGE=EVERY`.
pub fn parse_tier(text: &str) -> Result<Tier, String> {
    let (age, every) = text
        .split_once('=')
        .ok_or_else(|| format!("tier {text:?}: expected AGE=EVERY, e.g. 1h=10m"))?;
    let interval = parse_duration(every)?;
    if interval.is_zero() {
        return Err(format!("tier {text:?}: the interval must not be zero"));
    }
    Ok(Tier {
        older_than: parse_duration(age)?,
        keep: Keep::Every { interval, bookmarks: BookmarkKind::ALL.to_vec() },
    })
}

/// What `run` keeps across reopenings of the journal.
struct Setup {
    args: Args,
    pair: PairId,
    secure: SecureConfig,
    image: PathBuf,
    cfg: RetentionConfig,
    /// The replica's lineage, shared by every session (and journal reopening).
    lineage: Arc<tidemark_sync::lineage::LineageStore>,
}

/// The last retention pass, for status.json.
#[derive(Default)]
struct Passes {
    /// Damaged stretches the last opening of the journal skipped: (segment, offset, length,
    /// reason).
    damage: Vec<(String, u64, u64, String)>,
    count: u64,
    last: Option<(u64, Duration, Result<RetentionReport, String>)>,
    /// Journal damage already announced: (segment, offset, repaired).
    repairs_reported: Vec<(String, u64, bool)>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let pair = common::parse_pair(&args.pair)?;
    let secure = common::secure(&args.key, &args.peer)?;
    if args.size == 0 || args.size % u64::from(args.block_size) != 0 {
        bail!("volume size {} must be a positive multiple of {}", args.size, args.block_size);
    }
    if !(args.scrub_every >= 0.0 && args.scrub_every.is_finite()) {
        bail!("--scrub-every {}: expected a number of seconds (0: never)", args.scrub_every);
    }
    if !(args.retention_every > 0.0 && args.retention_every.is_finite()) {
        bail!("--retention-every {}: expected a positive number of seconds", args.retention_every);
    }
    let policy = RetentionPolicy {
        max_age: args.retain,
        max_bytes: args.journal_max_mib.map(|m| m << 20),
        tiers: args.tier.clone(),
    };
    let cfg = RetentionConfig {
        block_size: args.block_size,
        segment_bytes: args.segment_mib << 20,
        policy,
        ..Default::default()
    };
    std::fs::create_dir_all(&args.dir).with_context(|| format!("create {}", args.dir.display()))?;
    crate::promote::check_not_promoting(&args.dir)?;
    if let Some(existing) = &args.replica {
        let old = match &args.old_state {
            Some(state) => {
                Some((state, crate::failback::check_old_state(state, args.discard_local_changes)?))
            }
            None => None,
        };
        crate::failback::link_replica(&args.dir, existing)?;
        if let Some((state, old)) = old {
            crate::lineage::for_failback_target(&args.dir, state, existing, old.last_seq)?;
        }
    }
    let lineage = Arc::new(
        tidemark_sync::lineage::LineageStore::open(crate::lineage::path(&args.dir))
            .context("open the replica's lineage")?,
    );
    let image = args.dir.join("replica.img");
    let setup = Setup { args, pair, secure, image, cfg, lineage };
    let mut passes = Passes::default();
    let mut log = open_log(&setup, &mut passes)?;
    signals::install()?;
    let mut listen: Option<SocketAddr> = None;
    let started = Instant::now();
    // Outlives journal reopens: a scrape during one sees the last published figures.
    let metrics = setup.args.metrics.as_deref().map(metrics::Server::start).transpose()?;
    if let Some(m) = &metrics {
        println!("metrics: {}", m.addr());
    }
    loop {
        let (receiver, failed) =
            serve(&setup, log, &mut listen, &mut passes, started, metrics.as_ref())?;
        let Some(why) = failed else { return Ok(()) };
        // The journal refuses writes after an I/O error until it is reopened (a full
        // disk, a failed sync): reopen it, once every session let go of it. Nothing
        // acknowledged is lost: acks follow the journal's sync.
        println!("journal failed: {why}; reopening in {}s", REOPEN_AFTER.as_secs());
        drop(release(receiver));
        log = loop {
            std::thread::sleep(REOPEN_AFTER);
            if signals::stop_requested() {
                println!("signal: shutting down");
                return Ok(());
            }
            match open_log(&setup, &mut passes) {
                Ok(log) => break log,
                Err(e) => println!("journal reopen failed: {e:#}; retrying"),
            }
        };
        println!("journal reopened");
    }
}

/// Waits (bounded) until `receiver` is the last handle on its log, so the journal is
/// closed before it is reopened.
fn release(mut receiver: Receiver) -> Option<RetentionLog> {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        match receiver.into_log() {
            Ok(log) => return Some(log),
            Err(r) if Instant::now() < until => {
                receiver = r;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(_) => return None,
        }
    }
}

/// One line per journal damage that needs a repair (naming the segment, offset and ranges)
/// and one when the source's repair completed; `reported` remembers what was said.
fn report_repairs(log: &RetentionLog, reported: &mut Vec<(String, u64, bool)>) {
    for d in log.damage() {
        let ranges = d.describe_ranges();
        let done = d.repaired_at.is_some();
        let key = (d.segment.clone(), d.offset, done);
        if reported.contains(&key) {
            continue;
        }
        reported.push(key);
        match d.repaired_at {
            None => println!(
                "journal repair needed: segment {} offset {}: lost records from seq {} covering {}{}; points from there withheld until the source resends them (repair id {:#018x})",
                d.segment,
                d.offset,
                d.lost_from,
                ranges,
                if d.whole_volume { " (unknown ranges: the whole volume)" } else { "" },
                d.repair_id
            ),
            Some(end) => println!(
                "journal repaired: segment {} offset {}: the source resent {} (resync ending at seq {end})",
                d.segment, d.offset, ranges
            ),
        }
    }
}

fn open_log(s: &Setup, passes: &mut Passes) -> anyhow::Result<RetentionLog> {
    let (image, size) = (&s.image, s.args.size);
    let base = if image.exists() {
        let f = FileIo::open(image).with_context(|| format!("open {}", image.display()))?;
        let len = f.len().with_context(|| format!("stat {}", image.display()))?;
        // Larger once retention folded a growth of the volume into it (the journal knows
        // the size of every state); never smaller.
        if len < size {
            bail!(
                "{} holds {len} bytes, expected at least {size} (--size; a replica only grows)",
                image.display()
            );
        }
        f
    } else {
        FileIo::create(image, size).with_context(|| format!("create {}", image.display()))?
    };
    let (log, open) = RetentionLog::open(
        Arc::new(FsDir::new(s.args.dir.join("journal"))?),
        vec![Arc::new(base) as Arc<dyn BlockIo>],
        s.cfg.clone(),
        Arc::new(SystemClock),
    )
    .context("open the retention log")?;
    for (segment, d) in &open.defects {
        // One line per damaged stretch, naming where it is: the records after it are kept.
        println!(
            "journal damage: segment {segment} offset {} length {}: {} (skipped)",
            d.offset, d.len, d.reason
        );
    }
    if !open.defects.is_empty() {
        eprintln!("journal: {} damaged stretches skipped: {:?}", open.defects.len(), open.defects);
    }
    passes.damage = open
        .defects
        .iter()
        .map(|(seg, d)| (seg.to_string(), d.offset, d.len, d.reason.clone()))
        .collect();
    report_repairs(&log, &mut passes.repairs_reported);
    Ok(log)
}

/// Serves until a signal (returns the receiver and `None`) or until the journal fails
/// (the receiver, stopped, and why).
fn serve(
    s: &Setup,
    log: RetentionLog,
    listen: &mut Option<SocketAddr>,
    passes: &mut Passes,
    started: Instant,
    metrics: Option<&metrics::Server>,
) -> anyhow::Result<(Receiver, Option<String>)> {
    let args = &s.args;
    let mut rcfg = ReceiverConfig::new(args.name.clone(), s.pair, s.secure.clone());
    rcfg.lineage = s.lineage.clone();
    rcfg.source_wins = args.discard_local_changes;
    let receiver = Receiver::new(log, rcfg)?;
    let socket = match listen {
        // The same port again after a reopen.
        Some(addr) => TcpListener::bind(*addr).with_context(|| format!("listen on {addr}"))?,
        None => {
            TcpListener::bind(&args.listen).with_context(|| format!("listen on {}", args.listen))?
        }
    };
    let listener = receiver.listen(socket)?;
    let addr = listener.local_addr();
    let first = listen.is_none();
    *listen = Some(addr);
    let sock = args.control.clone().unwrap_or_else(|| control::default_socket(&args.dir));
    let control = control::Server::start(&sock, receiver.clone(), &args.dir.join("vsnaps"))?;
    if first {
        println!("control: {}", control.path().display());
        println!("listening: {addr}");
        println!("pair {}, replica {}, {} bytes", s.pair, s.image.display(), args.size);
    }
    let enforcing = s.cfg.policy != RetentionPolicy::default();
    let every = Duration::from_secs_f64(args.retention_every);
    let mut last_pass = Instant::now();
    let mut last_scrub = Instant::now();
    let mut last_line = Instant::now();
    let mut last_file = Instant::now() - Duration::from_secs(2);
    let mut failed = None;
    let mut status_failing = false;
    while !signals::stop_requested() {
        if enforcing && last_pass.elapsed() >= every {
            let t = Instant::now();
            let result = receiver.with_log(|log| log.enforce()).map_err(|e| e.to_string());
            last_pass = Instant::now();
            passes.count += 1;
            if let Err(e) = &result {
                failed = Some(format!("retention pass: {e}"));
            }
            passes.last = Some((status::now_ms(), t.elapsed(), result));
        }
        if failed.is_none() {
            failed = receiver.status().failed;
        }
        if args.scrub_every > 0.0 && last_scrub.elapsed().as_secs_f64() >= args.scrub_every {
            last_scrub = Instant::now();
            if let Err(e) = receiver.scrub() {
                println!("scrub: {e}");
            }
        } else if let Err(e) = receiver.check_read_damage() {
            println!("journal damage a read met: {e}");
        }
        receiver.with_log(|log| report_repairs(log, &mut passes.repairs_reported));
        if last_file.elapsed() >= Duration::from_secs(1) || failed.is_some() {
            let state = if failed.is_some() { "reopening" } else { "serving" };
            let doc = document(&receiver, &addr.to_string(), started.elapsed(), state, s, passes);
            if let Some(m) = metrics {
                m.publish(&metrics::receiver(&s.pair.to_string(), &doc));
            }
            // A full disk must not stop the receiver: the status is best effort.
            match status::write(&args.dir, &doc) {
                Ok(()) => status_failing = false,
                Err(e) if !status_failing => {
                    println!("status: {e:#}");
                    status_failing = true;
                }
                Err(_) => {}
            }
            last_file = Instant::now();
        }
        if failed.is_some() {
            break;
        }
        if last_line.elapsed() >= LINE_EVERY {
            println!("{}", line(&receiver.status(), &receiver));
            last_line = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if failed.is_none() {
        println!("signal: shutting down");
    }
    control.stop();
    receiver.shutdown();
    listener.stop();
    if failed.is_some() {
        return Ok((receiver, failed));
    }
    let durable = receiver.with_log(|log| log.sync()).context("sync the retention log")?;
    let mut doc = document(&receiver, &addr.to_string(), started.elapsed(), "stopped", s, passes);
    // What the last sync made durable (the session's own commits may be older).
    doc["durable"] = json!(durable.0);
    status::write(&args.dir, &doc)?;
    println!("{}", line(&receiver.status(), &receiver));
    Ok((receiver, None))
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

fn document(
    receiver: &Receiver,
    addr: &str,
    uptime: Duration,
    state: &str,
    setup: &Setup,
    passes: &Passes,
) -> serde_json::Value {
    // Stamped before anything is read: the document shows the state as of this time or
    // later, never a state older than its stamp.
    let updated_ms = status::now_ms();
    let s = receiver.status();
    let policy = &setup.cfg.policy;
    let last_pass = passes.last.as_ref().map(|(at, took, r)| match r {
        Ok(r) => json!({
            "at_ms": at,
            "took_s": common::secs(*took),
            "dropped_points": r.dropped_points,
            "retained_points": r.retained_points,
            "base_advanced_to": r.base_advanced_to.map(|s| s.0),
            "intervals_coalesced": r.intervals_coalesced,
            "bytes_before": r.bytes_before,
            "bytes_after": r.bytes_after,
            "thinned_for_space": r.thinned_for_space,
            "space_held_by_resync": r.space_held_by_resync,
            "space_held_by_holds": r.space_held_by_holds,
            "kept_for_holds": r.kept_for_holds,
        }),
        Err(e) => json!({ "at_ms": at, "took_s": common::secs(*took), "error": e }),
    });
    let (r, held, size) =
        receiver.with_log(|log| (log.status(), log.held(), log.volume_len(VolumeId(0)).ok()));
    json!({
        "role": "receive",
        "state": state,
        "lineage": crate::lineage::status_json(&setup.args.dir),
        "pid": std::process::id(),
        "updated_ms": updated_ms,
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
        "handshakes_evicted": s.handshakes_evicted,
        "last_error": s.last_error,
        "failed": s.failed,
        "repair_requests": s.repair_requests,
        // Damage above the base (found on open or by a scrub): what it lost, the points it
        // withholds, and the source's repair.
        "journal_repair": r.damage.iter().map(|d| json!({
            "segment": d.segment,
            "offset": d.offset,
            "length": d.len,
            "lost_from": d.lost_from.0,
            "whole_volume": d.whole_volume,
            "ranges": d.ranges.iter().map(|(v, o, l)| json!({
                "volume": v.0, "offset": o, "length": l,
            })).collect::<Vec<_>>(),
            "repair_id": d.repair_id,
            "repaired_at": d.repaired_at.map(|s| s.0),
        })).collect::<Vec<_>>(),
        // What the journal's last opening found damaged and skipped.
        "journal_damage": passes.damage.iter().map(|(segment, offset, len, reason)| json!({
            "segment": segment, "offset": offset, "length": len, "reason": reason,
        })).collect::<Vec<_>>(),
        "replica": {
            // The volume's size now (it grows with the source's).
            "volume_bytes": size,
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
            "journal_max_bytes": r.max_bytes,
            "segment_bytes": setup.cfg.segment_bytes,
            "tiers": policy.tiers.iter().map(|t| match &t.keep {
                Keep::Every { interval, .. } => json!({
                    "older_than_s": common::secs(t.older_than),
                    "every_s": common::secs(*interval),
                }),
                other => json!({ "older_than_s": common::secs(t.older_than), "keep": format!("{other:?}") }),
            }).collect::<Vec<_>>(),
            "thinned_for_space": r.thinned_for_space,
            "space_note": r.space_note,
            "space_held_by_resync": r.space_held_by_resync,
            "passes": passes.count,
            "last_pass": last_pass,
            // Points held by virtual snapshots: retention keeps what they read.
            "held_seqs": held.iter().map(|s| s.0).collect::<Vec<_>>(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_tiers_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(7 * 86400));
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("10y").is_err());
        assert!(parse_duration("-1s").is_err());
        let t = parse_tier("1h=10m").unwrap();
        assert_eq!(t.older_than, Duration::from_secs(3600));
        assert_eq!(
            t.keep,
            Keep::Every {
                interval: Duration::from_secs(600),
                bookmarks: BookmarkKind::ALL.to_vec()
            }
        );
        assert!(parse_tier("1h").is_err());
        assert!(parse_tier("1h=0s").is_err());
    }
}
