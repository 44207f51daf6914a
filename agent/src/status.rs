//! The `status.json` of a `protect` state directory or a `receive` directory, and
//! `tidemark status` to show it.
//!
//! Invariant: the file is always whole: it is written to `status.json.tmp`, synced, and
//! renamed over `status.json`, so a reader never sees a torn document.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use tidemark_sync::pair::{PairStage, PairStatus};
use tidemark_sync::ship::{LinkState, ShipperStatus};
use tidemark_tap::TapStatus;

/// The status file's name inside its directory.
pub const FILE: &str = "status.json";

/// Writes `value` as `dir/status.json`, atomically (temporary file, then rename).
pub fn write(dir: &Path, value: &Value) -> anyhow::Result<()> {
    let tmp = dir.join(format!("{FILE}.tmp"));
    let path = dir.join(FILE);
    let mut text = serde_json::to_vec_pretty(value).context("encode the status")?;
    text.push(b'\n');
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    f.write_all(&text).with_context(|| format!("write {}", tmp.display()))?;
    f.sync_data().with_context(|| format!("sync {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, &path)
        .with_context(|| format!("rename {} to {}", tmp.display(), path.display()))
}

/// Unix time in milliseconds (the `updated_ms` field of every status document).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The state directory of `tidemark protect` or the directory of `tidemark receive`.
    #[arg(long)]
    state: PathBuf,
    /// Print the raw JSON document instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let path = args.state.join(FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    if args.json {
        print!("{text}");
        return Ok(());
    }
    let value: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a status document", path.display()))?;
    let mut rows = summary(&value);
    if !rows.is_empty() {
        rows.push((String::new(), String::new()));
    }
    flatten("", &value, &mut rows);
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rows {
        println!("{k:<width$}  {v}");
    }
    Ok(())
}

/// The rows an operator looks at first: for a source, the pair's stage, RPO and alarm,
/// backlog, throughput, compression, last bookmark, intent regions; for a target, what it
/// received, made durable and acknowledged, and the retention window.
fn summary(v: &Value) -> Vec<(String, String)> {
    let get = |p: &str| v.pointer(p).filter(|x| !x.is_null());
    let num = |p: &str| get(p).and_then(Value::as_f64);
    let mut rows = Vec::new();
    let mut row = |k: &str, text: Option<String>| {
        if let Some(t) = text {
            rows.push((k.to_owned(), t));
        }
    };
    match v.get("role").and_then(Value::as_str) {
        Some("protect") => {
            row("PAIR", get("/pair/id").map(plain));
            row("STAGE", get("/pair/stage").map(plain));
            row("VOLUME", num("/volume_bytes").map(|b| bytes(b as u64)));
            row("GROWTH", get("/grow/refused").and_then(Value::as_str).map(str::to_owned));
            row("RPO", num("/pair/rpo_s").map(|r| format!("{r:.1} s")));
            let alarm = match (num("/pair/rpo_alarm/threshold_s"), get("/pair/rpo_alarm/active")) {
                (Some(t), Some(Value::Bool(true))) => Some(format!("RAISED (threshold {t} s)")),
                (Some(t), _) => Some(format!("ok (threshold {t} s)")),
                (None, _) => Some("none configured".to_owned()),
            };
            row("RPO ALARM", alarm);
            row("BACKLOG", num("/pair/backlog_bytes").map(|b| bytes(b as u64)));
            row(
                "THROUGHPUT",
                num("/pair/throughput_bps").map(|b| format!("{}/s", bytes(b as u64))),
            );
            row("COMPRESSION", num("/pair/compression_ratio").map(|r| format!("{r:.2}x")));
            let mark = get("/pair/last_bookmark").map(|b| {
                let acked = b.get("acked").and_then(Value::as_bool).unwrap_or(false);
                format!(
                    "{} (seq {}, {})",
                    b.get("name").map(plain).unwrap_or_default(),
                    b.get("seq").map(plain).unwrap_or_default(),
                    if acked { "at the target" } else { "not yet at the target" }
                )
            });
            row("LAST BOOKMARK", mark.or(Some("-".to_owned())));
            let progress = get("/progress").map(|p| {
                let n = |k: &str| p.get(k).and_then(Value::as_f64);
                let mut text = format!(
                    "{} {} / {}",
                    p.get("phase").map(plain).unwrap_or_default(),
                    bytes(n("done").unwrap_or(0.0) as u64),
                    bytes(n("total").unwrap_or(0.0) as u64)
                );
                if let (Some(rate), Some(eta)) = (n("rate_bps"), n("eta_s")) {
                    text += &format!(" at {}/s, ETA {eta:.0} s", bytes(rate as u64));
                }
                text
            });
            row("RESYNC", progress);
            row(
                "INTENT DIRTY",
                get("/pair/intent_dirty_regions").map(|r| format!("{} regions", plain(r))),
            );
            row(
                "OUT OF SYNC",
                get("/pair/out_of_sync_regions").map(|r| format!("{} regions", plain(r))),
            );
        }
        Some("receive") => {
            row(
                "STATE",
                get("/connected").map(|c| {
                    if c.as_bool() == Some(true) { "connected".into() } else { "waiting".into() }
                }),
            );
            row("RECEIVED", get("/received").map(|s| format!("seq {}", plain(s))));
            row("DURABLE", get("/durable").map(|s| format!("seq {}", plain(s))));
            row("ACKED", get("/acked").map(|s| format!("seq {}", plain(s))));
            row(
                "REPLICA",
                get("/replica/consistent").map(|c| {
                    if c.as_bool() == Some(true) {
                        "consistent".into()
                    } else {
                        "inconsistent".into()
                    }
                }),
            );
            let window = num("/retention/window_available_s").map(|a| {
                match num("/retention/window_configured_s") {
                    Some(c) => format!("{a:.0} s of {c:.0} s configured"),
                    None => format!("{a:.0} s (no age limit configured)"),
                }
            });
            row("RETENTION", window);
            row("VOLUME", num("/replica/volume_bytes").map(|b| bytes(b as u64)));
            row("JOURNAL", num("/retention/journal_bytes").map(|b| bytes(b as u64)));
            row("POINTS", get("/retention/points").map(plain));
            row("REPAIR", journal_repair_summary(v));
        }
        _ => {}
    }
    rows
}

/// The journal damage of a receiver and its repairs, in one line (`None` when none).
fn journal_repair_summary(v: &Value) -> Option<String> {
    let all = v.get("journal_repair")?.as_array().filter(|a| !a.is_empty())?;
    let pending = all.iter().filter(|d| d["repaired_at"].is_null()).count();
    let first = &all[0];
    let at = format!(
        "{} offset {}",
        first["segment"].as_str().unwrap_or("?"),
        first["offset"].as_u64().unwrap_or(0)
    );
    Some(if pending == 0 {
        format!("{} damaged stretch(es) repaired by the source (first at {at})", all.len())
    } else {
        format!(
            "{pending} of {} damaged stretch(es) waiting for the source's resend (first at {at}); points from seq {} on withheld",
            all.len(),
            first["lost_from"].as_u64().unwrap_or(0)
        )
    })
}

fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Bytes for a person (binary units).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}

/// Flattens nested objects into `a.b.c` keys; arrays and scalars are shown as JSON.
fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        Value::String(s) => out.push((prefix.to_owned(), s.clone())),
        Value::Null => out.push((prefix.to_owned(), "-".to_owned())),
        other => out.push((prefix.to_owned(), other.to_string())),
    }
}

/// The operator's figures of one protected pair (the source side), as `status.json`'s
/// `pair` object, `tidemark status` and the metrics endpoint show them.
#[derive(Debug, Clone, PartialEq)]
pub struct PairFigures {
    /// The pair id.
    pub pair: String,
    /// The stage in the operator's words ([`stage`]).
    pub stage: &'static str,
    /// The controller's own stage name (`connecting`, `initial sync`, `resync`, ...).
    pub controller_stage: &'static str,
    /// RPO now, in seconds: the age of the oldest captured event the target has not
    /// acknowledged (0 when caught up); see `docs/metrics.md`.
    pub rpo_s: f64,
    /// Bytes of unacknowledged events in the spool.
    pub backlog_bytes: u64,
    /// Unacknowledged events in the spool.
    pub backlog_events: u64,
    /// Frame bytes shipped per second over the last interval.
    pub throughput_bps: f64,
    /// Frame bytes shipped in all (this process).
    pub wire_bytes: u64,
    /// Uncompressed batch bytes shipped in all (this process).
    pub raw_bytes: u64,
    /// `raw_bytes / wire_bytes` (1 before anything is shipped).
    pub compression_ratio: f64,
    /// The last bookmark spooled: seq, name, and whether the target acknowledged it.
    pub last_bookmark: Option<(u64, String, bool)>,
    /// Regions of the write-intent map dirty (what a crash now would resync).
    pub intent_dirty_regions: u64,
    /// Regions out of sync (tracked outside the spool, waiting for a resync).
    pub out_of_sync_regions: u64,
    /// The link to the target is up (a session is shipping).
    pub link_up: bool,
    /// The RPO alarm.
    pub alarm: AlarmStatus,
}

/// The RPO alarm's state, as published.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AlarmStatus {
    /// The threshold in seconds (`protect --rpo-alarm`); `None`: no alarm configured.
    pub threshold_s: Option<f64>,
    /// The RPO is above the threshold now.
    pub active: bool,
    /// Times the alarm was raised (this process).
    pub raised: u64,
    /// Unix time (ms) the current alarm was raised.
    pub since_ms: Option<u64>,
}

/// The RPO threshold of a pair: raised when the RPO goes above it, cleared when it is back
/// at or under it. Each transition is one warn log line.
#[derive(Debug, Clone, Default)]
pub struct RpoAlarm {
    status: AlarmStatus,
}

/// A transition of [`RpoAlarm::observe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlarmChange {
    /// The RPO went above the threshold.
    Raised,
    /// It came back under.
    Cleared,
}

impl RpoAlarm {
    pub fn new(threshold: Option<Duration>) -> Self {
        Self {
            status: AlarmStatus {
                threshold_s: threshold.map(|d| d.as_secs_f64()),
                ..Default::default()
            },
        }
    }

    /// Looks at the RPO now; logs and returns a transition if there is one.
    pub fn observe(&mut self, pair: &str, rpo_s: f64, now_ms: u64) -> Option<AlarmChange> {
        let threshold = self.status.threshold_s?;
        let above = rpo_s > threshold;
        if above == self.status.active {
            return None;
        }
        self.status.active = above;
        if above {
            self.status.raised += 1;
            self.status.since_ms = Some(now_ms);
            tracing::warn!(
                pair,
                rpo_s,
                threshold_s = threshold,
                "RPO alarm raised: the RPO is above its threshold"
            );
            Some(AlarmChange::Raised)
        } else {
            let lasted_s = self.status.since_ms.map(|t| now_ms.saturating_sub(t) as f64 / 1000.0);
            self.status.since_ms = None;
            tracing::warn!(
                pair,
                rpo_s,
                threshold_s = threshold,
                lasted_s,
                "RPO alarm cleared: the RPO is back under its threshold"
            );
            Some(AlarmChange::Cleared)
        }
    }

    pub fn status(&self) -> AlarmStatus {
        self.status
    }
}

/// The stage of a pair in the operator's words:
/// - `resync I`: an initial sync's step I or a fast resync is comparing or copying;
/// - `resync II`: its copy is done (its `ResyncEnd` is in the spool) and the writes captured
///   meanwhile are shipping; the replica is consistent once the target acknowledges the end;
/// - `diff sync`: the captured writes stream; the replica is consistent;
/// - `paused`: no session with the target (connecting, link down); writes wait in the spool;
/// - `inconsistent`: the spool overflowed, or regions are out of sync waiting for a resync
///   (the replica lacks writes the spool does not hold);
/// - `stopped`.
pub fn stage(
    controller: &PairStage,
    end_spooled: bool,
    link_up: bool,
    pending_bytes: u64,
) -> &'static str {
    match controller {
        PairStage::InitialSync | PairStage::Resync if end_spooled => "resync II",
        PairStage::InitialSync | PairStage::Resync => "resync I",
        PairStage::Overflow => "inconsistent",
        PairStage::Stopped => "stopped",
        _ if !link_up => "paused",
        PairStage::Connecting => "paused",
        PairStage::DiffSync if pending_bytes > 0 => "inconsistent",
        PairStage::DiffSync => "diff sync",
    }
}

/// Keeps what the figures need between two samples: the last shipped-byte count (for the
/// throughput), the alarm, and since when writes have been outside the spool.
#[derive(Debug)]
pub struct PairTracker {
    pair: String,
    alarm: RpoAlarm,
    last: Option<(Instant, u64)>,
    /// When this process first saw writes it holds outside the spool (overflow, regions
    /// out of sync), until they are resynced: the RPO counts from then.
    outside_since: Option<u64>,
}

/// What [`PairTracker::sample`] reads from the running pair.
pub struct PairSample<'a> {
    pub pair: &'a PairStatus,
    pub ship: &'a ShipperStatus,
    pub tap: &'a TapStatus,
    /// [`tidemark_journal::Spool::oldest_unacked_time`], in Unix ms.
    pub oldest_unacked_ms: Option<u64>,
    /// A `ResyncEnd` is among the unacknowledged events.
    pub end_spooled: bool,
    pub now_ms: u64,
}

impl PairTracker {
    pub fn new(
        pair: String,
        alarm: Option<Duration>,
        started_ms: u64,
        dirty_at_open: bool,
    ) -> Self {
        Self {
            pair,
            alarm: RpoAlarm::new(alarm),
            last: None,
            outside_since: dirty_at_open.then_some(started_ms),
        }
    }

    pub fn sample(&mut self, s: &PairSample<'_>, now: Instant) -> PairFigures {
        let link_up = s.ship.state == LinkState::Shipping;
        let stage = stage(&s.pair.stage, s.end_spooled, link_up, s.pair.pending_bytes);
        let outside = s.tap.overflow.is_some()
            || s.pair.pending_bytes > 0
            || s.tap.intent.out_of_sync_regions > 0;
        if outside {
            self.outside_since.get_or_insert(s.now_ms);
        } else {
            self.outside_since = None;
        }
        let oldest = match (s.oldest_unacked_ms, self.outside_since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let rpo_s = oldest.map_or(0.0, |t| s.now_ms.saturating_sub(t) as f64 / 1000.0);
        let throughput_bps = match self.last {
            Some((at, bytes)) if now > at => {
                s.ship.wire_bytes.saturating_sub(bytes) as f64 / (now - at).as_secs_f64()
            }
            _ => 0.0,
        };
        self.last = Some((now, s.ship.wire_bytes));
        self.alarm.observe(&self.pair, rpo_s, s.now_ms);
        let ratio = if s.ship.wire_bytes == 0 {
            1.0
        } else {
            s.ship.raw_bytes as f64 / s.ship.wire_bytes as f64
        };
        PairFigures {
            pair: self.pair.clone(),
            stage,
            controller_stage: s.pair.stage.name(),
            rpo_s,
            backlog_bytes: s.tap.backlog_bytes,
            backlog_events: s.ship.backlog_events,
            throughput_bps,
            wire_bytes: s.ship.wire_bytes,
            raw_bytes: s.ship.raw_bytes,
            compression_ratio: ratio,
            last_bookmark: s
                .tap
                .last_bookmark
                .as_ref()
                .map(|(seq, name)| (seq.0, name.clone(), *seq <= s.tap.acked)),
            intent_dirty_regions: s.tap.intent.dirty_regions,
            out_of_sync_regions: s.tap.intent.out_of_sync_regions,
            link_up,
            alarm: self.alarm.status(),
        }
    }
}

impl PairFigures {
    /// The `pair` object of `status.json`.
    pub fn json(&self) -> Value {
        json!({
            "id": self.pair,
            "stage": self.stage,
            "controller_stage": self.controller_stage,
            "rpo_s": self.rpo_s,
            "rpo_alarm": {
                "threshold_s": self.alarm.threshold_s,
                "active": self.alarm.active,
                "raised": self.alarm.raised,
                "since_ms": self.alarm.since_ms,
            },
            "backlog_bytes": self.backlog_bytes,
            "backlog_events": self.backlog_events,
            "throughput_bps": self.throughput_bps,
            "wire_bytes": self.wire_bytes,
            "raw_bytes": self.raw_bytes,
            "compression_ratio": self.compression_ratio,
            "last_bookmark": self.last_bookmark.as_ref().map(|(seq, name, acked)| json!({
                "seq": seq, "name": name, "acked": acked,
            })),
            "intent_dirty_regions": self.intent_dirty_regions,
            "out_of_sync_regions": self.out_of_sync_regions,
            "link_up": self.link_up,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alarm_is_raised_once_and_cleared_once() {
        let mut a = RpoAlarm::new(Some(Duration::from_secs(5)));
        let seen: Vec<_> = [0.0, 4.9, 5.0, 5.1, 9.0, 7.0, 5.0, 0.0, 0.0, 6.0]
            .iter()
            .enumerate()
            .filter_map(|(i, r)| a.observe("p", *r, i as u64 * 1000))
            .collect();
        assert_eq!(seen, [AlarmChange::Raised, AlarmChange::Cleared, AlarmChange::Raised]);
        assert!(a.status().active);
        assert_eq!(a.status().raised, 2);
        assert_eq!(a.status().since_ms, Some(9000));
        let mut none = RpoAlarm::new(None);
        assert_eq!(none.observe("p", 1e9, 0), None, "no threshold, no alarm");
    }

    #[test]
    fn stages_in_the_operators_words() {
        assert_eq!(stage(&PairStage::InitialSync, false, true, 0), "resync I");
        assert_eq!(stage(&PairStage::Resync, true, true, 0), "resync II");
        assert_eq!(stage(&PairStage::DiffSync, false, true, 0), "diff sync");
        assert_eq!(stage(&PairStage::DiffSync, false, false, 0), "paused");
        assert_eq!(stage(&PairStage::Connecting, false, false, 0), "paused");
        assert_eq!(stage(&PairStage::DiffSync, false, true, 4096), "inconsistent");
        assert_eq!(stage(&PairStage::Overflow, false, true, 0), "inconsistent");
    }

    #[test]
    fn byte_counts_for_people() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
    }
}
