//! `tidemark points`: the recovery points of a `receive` directory, and what `points`,
//! `recover` and the control socket share about points: the `--point` syntax, their JSON
//! form, and the error that lists what exists when a point does not resolve.
//!
//! Point syntax: `latest`, `seq:N`, `time:T` (T in RFC 3339, `2026-11-22T07:30:00Z` or with
//! an offset and fractional seconds, or seconds since the Unix epoch, `1795000000.5`),
//! `bookmark:NAME`.

use std::path::PathBuf;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tidemark_journal::{
    Nanos, PointInfo, PointKind, RecoveryPoint, RetentionLog, Seq, types::validate_bookmark_name,
};

use tidemark_sync::ship::error_chain;

use crate::{common, control};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The directory of `tidemark receive` (replica.img, journal/, control.sock). Given
    /// more than once: the group bookmarks of those members (a consistency group).
    #[arg(long, required_unless_present = "group")]
    dir: Vec<PathBuf>,
    /// The group bookmarks of the receive pairs of this `[group.NAME]` of the
    /// configuration file: which are held by every member (points of the group).
    #[arg(long, conflicts_with_all = ["dir", "control"])]
    group: Option<String>,
    /// The configuration file (with --group).
    #[arg(long, default_value = crate::up::DEFAULT_CONFIG, requires = "group")]
    config: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// The receiver's control socket (default: DIR/control.sock).
    #[arg(long)]
    control: Option<PathBuf>,
    /// Block size of the journal's index (as given to `receive`), when the log is opened
    /// here because no receiver runs.
    #[arg(long, default_value_t = 4096)]
    block_size: u32,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.group.is_some() || args.dir.len() > 1 {
        return run_group(&args);
    }
    let dir = &args.dir[0];
    let socket = args.control.clone().unwrap_or_else(|| control::default_socket(dir));
    let (doc, via) = match control::Client::connect(&socket)? {
        Some(mut client) => (client.request(json!({"op": "points"}))?, "receiver"),
        None => {
            let log = common::open_log(dir, args.block_size)?;
            (points_doc(&log), "journal")
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    let points = doc["points"].as_array().cloned().unwrap_or_default();
    println!("{} recovery points in {} (read from the {via}):", points.len(), dir.display());
    println!(
        "{:>12}  {:<30}  {:<11}  {:<16}  {:>14}  BOOKMARK",
        "SEQ", "TIME (UTC)", "KIND", "GROUP", "BYTES"
    );
    for p in &points {
        println!(
            "{:>12}  {:<30}  {:<11}  {:<16}  {:>14}  {}",
            p["seq"],
            p["time"].as_str().unwrap_or("?"),
            p["kind"].as_str().unwrap_or("?"),
            p["group"].as_str().unwrap_or("-"),
            p["volume_bytes"],
            p["bookmark"].as_str().unwrap_or("")
        );
    }
    if let Some(note) = doc["latest_note"].as_str() {
        println!("latest: {note}");
    }
    Ok(())
}

/// A group's points: every group bookmark any member holds (by name and group id, oldest
/// first), with each member's seq, and whether every member holds it (only then is it a
/// point of the group, which `recover` and `promote` accept).
fn run_group(args: &Args) -> anyhow::Result<()> {
    if args.control.is_some() {
        bail!("--control names one receiver's socket; a group's members use DIR/control.sock");
    }
    let members = crate::group::members(args.group.as_deref(), &args.config, &args.dir, "receive")?;
    if members.len() < 2 {
        bail!("a group has at least two members, got {}", members.len());
    }
    let docs = members
        .iter()
        .map(|m| {
            crate::group::member_points(m, args.block_size)
                .with_context(|| format!("member {}", m.name))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let doc = group_doc(&members, &docs);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    let marks = doc["bookmarks"].as_array().cloned().unwrap_or_default();
    let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
    println!(
        "{} group bookmarks over {} members ({}); `complete` ones are points of the group:",
        marks.len(),
        members.len(),
        names.join(", ")
    );
    println!("{:<30}  {:<16}  {:<10}  {:<24}  BOOKMARK", "TIME (UTC)", "GROUP", "STATE", "SEQS");
    for b in &marks {
        let seqs: Vec<String> = b["seqs"]
            .as_array()
            .map(|a| {
                a.iter().map(|s| s.as_u64().map_or("-".to_owned(), |n| n.to_string())).collect()
            })
            .unwrap_or_default();
        println!(
            "{:<30}  {:<16}  {:<10}  {:<24}  {}",
            b["time"].as_str().unwrap_or("?"),
            b["group"].as_str().unwrap_or("?"),
            if b["complete"] == true { "complete" } else { "partial" },
            seqs.join(","),
            b["name"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// The document of `points --group`: `members` (names), `bookmarks` [{`name`, `group`,
/// `time` (the newest member's), `time_ns`, `seqs` (per member, null where missing),
/// `complete`}], oldest first.
pub fn group_doc(members: &[crate::group::GroupMember], docs: &[Value]) -> Value {
    let mut marks: Vec<(String, String, u64, Vec<Option<u64>>)> = Vec::new();
    for (i, d) in docs.iter().enumerate() {
        for p in d["points"].as_array().into_iter().flatten() {
            let (Some(name), Some(group)) = (p["bookmark"].as_str(), p["group"].as_str()) else {
                continue;
            };
            let (seq, t) = (p["seq"].as_u64(), p["time_ns"].as_u64().unwrap_or(0));
            match marks.iter_mut().find(|m| m.0 == name && m.1 == group) {
                Some(m) => {
                    m.2 = m.2.max(t);
                    m.3[i] = seq;
                }
                None => {
                    let mut seqs = vec![None; docs.len()];
                    seqs[i] = seq;
                    marks.push((name.to_owned(), group.to_owned(), t, seqs));
                }
            }
        }
    }
    marks.sort_by_key(|m| m.2);
    let bookmarks: Vec<Value> = marks
        .into_iter()
        .map(|(name, group, t, seqs)| {
            json!({
                "name": name,
                "group": group,
                "time_ns": t,
                "time": rfc3339(Nanos(t)),
                "complete": seqs.iter().all(Option::is_some),
                "seqs": seqs,
            })
        })
        .collect();
    json!({
        "members": members.iter().map(|m| m.name.clone()).collect::<Vec<_>>(),
        "bookmarks": bookmarks,
    })
}

/// The points a log offers, oldest first, then `latest` when it is not one of them, as the
/// JSON document of `points --json` and of the control socket's `points`.
pub fn points_doc(log: &RetentionLog) -> Value {
    // Each point with the volume's size in that state (it differs across a growth).
    let with_size = |p: &PointInfo| {
        let mut v = point_json(p);
        v["volume_bytes"] = json!(log.volume_len_at(tidemark_journal::VolumeId(0), p.seq).ok());
        v
    };
    let mut points: Vec<Value> = log.points().iter().map(with_size).collect();
    let mut note = None;
    match log.resolve(&RecoveryPoint::Latest) {
        Ok(latest) if log.points().last().is_none_or(|p| p.seq != latest.seq) => {
            points.push(with_size(&latest))
        }
        Ok(_) => {}
        Err(e) => note = Some(error_chain(&e)),
    }
    json!({ "points": points, "latest_note": note })
}

/// One point as JSON: seq, time (ns and RFC 3339), kind, bookmark name.
pub fn point_json(p: &PointInfo) -> Value {
    let (kind, bookmark) = match &p.kind {
        PointKind::Base => ("base", None),
        PointKind::Barrier => ("barrier", None),
        PointKind::Bookmark(b) => ("bookmark", Some(b)),
        PointKind::Latest => ("latest", None),
        PointKind::ResyncEnd { .. } => ("resync-end", None),
    };
    json!({
        "seq": p.seq.0,
        "time_ns": p.time.0,
        "time": rfc3339(p.time),
        "kind": kind,
        "bookmark": bookmark.map(|b| b.name.clone()),
        "bookmark_kind": bookmark.map(|b| crate::source_control::kind_name(b.kind)),
        // A consistency group's bookmark: its id, 16 hexadecimal digits.
        "group": bookmark
            .filter(|b| b.group != 0)
            .map(|b| crate::source_control::group_hex(b.group)),
    })
}

/// Parses `latest`, `seq:N`, `time:T` or `bookmark:NAME`.
pub fn parse_point(spec: &str) -> anyhow::Result<RecoveryPoint> {
    let spec = spec.trim();
    if spec == "latest" {
        return Ok(RecoveryPoint::Latest);
    }
    let Some((kind, value)) = spec.split_once(':') else {
        bail!(
            "point {spec:?}: expected latest, seq:N, time:RFC3339-or-unix-seconds or bookmark:NAME"
        );
    };
    match kind {
        "seq" => {
            let n: u64 = value
                .parse()
                .with_context(|| format!("point {spec:?}: {value:?} is not a sequence number"))?;
            Ok(RecoveryPoint::Seq(Seq(n)))
        }
        "time" => Ok(RecoveryPoint::Time(parse_time(value).with_context(|| {
            format!(
                "point {spec:?}: expected a time in RFC 3339 (2026-11-22T07:30:00Z) or seconds since the Unix epoch"
            )
        })?)),
        "bookmark" => {
            validate_bookmark_name(value)
                .with_context(|| format!("point {spec:?}: not a valid bookmark name"))?;
            Ok(RecoveryPoint::Bookmark(value.to_owned()))
        }
        other => bail!(
            "point {spec:?}: unknown kind {other:?}; expected latest, seq:N, time:T or bookmark:NAME"
        ),
    }
}

/// Resolves `point`, or explains why not and lists the retained points nearest to it (for a
/// bookmark: the bookmarks retained).
pub fn resolve_or_explain(log: &RetentionLog, point: &RecoveryPoint) -> anyhow::Result<PointInfo> {
    log.resolve(point).map_err(|e| anyhow::anyhow!("{}\n{}", error_chain(&e), nearest(log, point)))
}

/// What exists near `point`, for an error message.
pub fn nearest(log: &RetentionLog, point: &RecoveryPoint) -> String {
    let points = log.points();
    if points.is_empty() {
        return "the journal offers no recovery point yet (see `tidemark points`)".to_owned();
    }
    let describe = |p: &PointInfo| {
        let v = point_json(p);
        match v["bookmark"].as_str() {
            Some(name) => format!("bookmark:{name} (seq {}, {})", p.seq, rfc3339(p.time)),
            None => format!(
                "seq:{} ({}, {})",
                p.seq,
                v["kind"].as_str().unwrap_or("?"),
                rfc3339(p.time)
            ),
        }
    };
    let window = format!(
        "retained: {} points from seq {} ({}) to seq {} ({})",
        points.len(),
        points[0].seq,
        rfc3339(points[0].time),
        points[points.len() - 1].seq,
        rfc3339(points[points.len() - 1].time)
    );
    let list = |ps: &[&PointInfo]| {
        ps.iter().map(|p| format!("  {}", describe(p))).collect::<Vec<_>>().join("\n")
    };
    match point {
        RecoveryPoint::Bookmark(_) => {
            let marks: Vec<&PointInfo> =
                points.iter().filter(|p| matches!(p.kind, PointKind::Bookmark(_))).collect();
            if marks.is_empty() {
                format!("no bookmark is retained; {window}")
            } else {
                let newest = &marks[marks.len().saturating_sub(10)..];
                format!(
                    "retained bookmarks (newest {} of {}):\n{}",
                    newest.len(),
                    marks.len(),
                    list(newest)
                )
            }
        }
        RecoveryPoint::Seq(s) => around(&points, |p| p.seq <= *s, &window, list),
        RecoveryPoint::Time(t) => around(&points, |p| p.time <= *t, &window, list),
        RecoveryPoint::Latest => window,
    }
}

/// The two retained points on each side of where `at_or_before` stops holding.
fn around(
    points: &[PointInfo],
    at_or_before: impl Fn(&PointInfo) -> bool,
    window: &str,
    list: impl Fn(&[&PointInfo]) -> String,
) -> String {
    let i = points.partition_point(at_or_before);
    let near: Vec<&PointInfo> =
        points[i.saturating_sub(2)..(i + 2).min(points.len())].iter().collect();
    format!("{window}; nearest:\n{}", list(&near))
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `Nanos` since the epoch as RFC 3339 in UTC, to the millisecond.
pub fn rfc3339(t: Nanos) -> String {
    let secs = (t.0 / Nanos::SECOND) as i64;
    let ms = (t.0 % Nanos::SECOND) / 1_000_000;
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!("{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z", s / 3600, s / 60 % 60, s % 60)
}

/// Parses RFC 3339 (`YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`, `t` or a space accepted for
/// `T`) or decimal seconds since the epoch.
pub fn parse_time(s: &str) -> anyhow::Result<Nanos> {
    let s = s.trim();
    if s.bytes().all(|b| b.is_ascii_digit() || b == b'.') && !s.is_empty() {
        let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
        let secs: u64 = whole.parse().with_context(|| format!("{s:?}: bad seconds"))?;
        return Ok(Nanos(secs * Nanos::SECOND + frac_nanos(frac)?));
    }
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> anyhow::Result<u32> {
        let part = s.get(r.clone()).with_context(|| format!("{s:?} is too short"))?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            bail!("{s:?}: {part:?} is not a number");
        }
        Ok(part.parse()?)
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        bail!("{s:?} is not YYYY-MM-DDTHH:MM:SS followed by Z or an offset");
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let days_in = [
        31,
        if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&mo)
        || d == 0
        || d > days_in[(mo - 1) as usize]
        || h > 23
        || mi > 59
        || sec > 60
    {
        bail!("{s:?}: date or time out of range");
    }
    let mut rest = &s[19..];
    let mut nanos = 0;
    if let Some(r) = rest.strip_prefix('.') {
        let n = r.bytes().take_while(u8::is_ascii_digit).count();
        nanos = frac_nanos(&r[..n])?;
        rest = &r[n..];
    }
    let offset_secs: i64 = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && matches!(&rest[..1], "+" | "-") && &rest[3..4] == ":" => {
            let oh: i64 = rest[1..3].parse().with_context(|| format!("{s:?}: bad offset"))?;
            let om: i64 = rest[4..6].parse().with_context(|| format!("{s:?}: bad offset"))?;
            let v = oh * 3600 + om * 60;
            if &rest[..1] == "-" { -v } else { v }
        }
        _ => bail!("{s:?}: expected Z or an offset like +02:00 after the time"),
    };
    let secs = days_from_civil(i64::from(y), mo, d) * 86_400
        + i64::from(h) * 3600
        + i64::from(mi) * 60
        + i64::from(sec.min(59))
        - offset_secs;
    if secs < 0 {
        bail!("{s:?} is before 1970");
    }
    Ok(Nanos(secs as u64 * Nanos::SECOND + nanos))
}

fn frac_nanos(frac: &str) -> anyhow::Result<u64> {
    if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        bail!("fraction {frac:?}: at most 9 digits");
    }
    if frac.is_empty() {
        return Ok(0);
    }
    Ok(frac.parse::<u64>()? * 10u64.pow(9 - frac.len() as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_and_print() {
        let t = parse_time("2026-11-22T07:30:00Z").unwrap();
        assert_eq!(rfc3339(t), "2026-11-22T07:30:00.000Z");
        assert_eq!(parse_time("2026-11-22T09:30:00.250+02:00").unwrap().0, t.0 + 250_000_000);
        assert_eq!(parse_time("1970-01-01T00:00:01Z").unwrap(), Nanos(Nanos::SECOND));
        assert_eq!(parse_time("1795000000.5").unwrap(), Nanos(1_795_000_000_500_000_000));
        assert_eq!(rfc3339(Nanos(0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(parse_time("2024-02-29T23:59:59Z").unwrap()),
            "2024-02-29T23:59:59.000Z"
        );
        for bad in
            ["2026-02-30T00:00:00Z", "2026-11-22T07:30:00", "2026-11-22", "yesterday", "1.2.3"]
        {
            assert!(parse_time(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn point_specs() {
        assert_eq!(parse_point("latest").unwrap(), RecoveryPoint::Latest);
        assert_eq!(parse_point("seq:42").unwrap(), RecoveryPoint::Seq(Seq(42)));
        assert_eq!(
            parse_point("bookmark:nightly 1").unwrap(),
            RecoveryPoint::Bookmark("nightly 1".into())
        );
        assert!(matches!(parse_point("time:0").unwrap(), RecoveryPoint::Time(Nanos(0))));
        for bad in ["seq:x", "bookmark:", "when:1", "yesterday", "time:noon"] {
            let e = parse_point(bad).expect_err(bad);
            assert!(format!("{e:#}").contains(bad.split(':').next().unwrap()), "{e:#}");
        }
    }
}
