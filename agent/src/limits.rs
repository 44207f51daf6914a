//! The source's link limits, changeable while `protect` runs: the bandwidth limit (a token
//! bucket, `--rate-mib`), its daily schedule (`--rate-schedule`) and the cap on concurrent
//! resyncs (`--resync-slots`). `tidemark limits --state DIR [...]` reads or changes them
//! through the control socket's `limits` op (`docs/control-protocol.md`).
//!
//! Schedule syntax: comma-separated windows `HH:MM-HH:MM=RATE`, RATE in MiB/s, `0` to pause
//! the link, or `unlimited`; a window whose end is before its start runs over midnight.
//! Times are UTC unless the schedule ends with `@+HH:MM` or `@-HH:MM` (a fixed offset east
//! of UTC). Outside every window the base rate applies. Example:
//! `08:00-18:00=10,18:00-08:00=unlimited@+01:00`.

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tidemark_sync::shape::{BucketStatus, Rate, Schedule, TimeOfDay, TokenBucket, Window};

use crate::verify::ProtectSocket;

/// Bytes in a MiB.
const MIB: f64 = (1u64 << 20) as f64;

/// A rate as the command line and the control socket write it: MiB/s, or `unlimited`.
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("unlimited") {
        return Ok(Rate::Unlimited);
    }
    match t.parse::<f64>() {
        Ok(mib) if mib >= 0.0 && mib.is_finite() => Ok(Rate::BytesPerSec((mib * MIB) as u64)),
        _ => Err(format!("rate {s:?}: expected MiB per second (a number >= 0) or \"unlimited\"")),
    }
}

/// A rate for people and JSON: MiB/s, or `"unlimited"`.
pub fn rate_json(rate: Rate) -> Value {
    match rate {
        Rate::Unlimited => json!("unlimited"),
        Rate::BytesPerSec(b) => json!(b as f64 / MIB),
    }
}

fn parse_time(s: &str, what: &str) -> Result<TimeOfDay, String> {
    let bad = || format!("{what} {s:?}: expected HH:MM (00:00 to 23:59)");
    let (h, m) = s.trim().split_once(':').ok_or_else(bad)?;
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    TimeOfDay::hm(h, m).map_err(|_| bad())
}

/// Parses a schedule (see the module documentation).
pub fn parse_schedule(s: &str) -> Result<Schedule, String> {
    let (body, offset) = match s.rsplit_once('@') {
        Some((body, off)) => {
            let bad = || format!("schedule offset {off:?}: expected @+HH:MM or @-HH:MM");
            let (sign, rest) = match off.trim().as_bytes().first() {
                Some(b'+') => (1i32, &off.trim()[1..]),
                Some(b'-') => (-1i32, &off.trim()[1..]),
                _ => return Err(bad()),
            };
            let (h, m) = rest.split_once(':').ok_or_else(bad)?;
            let (h, m): (i32, i32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
            if !(0..24).contains(&h) || !(0..60).contains(&m) {
                return Err(bad());
            }
            (body, sign * (h * 3600 + m * 60))
        }
        None => (s, 0),
    };
    let mut windows = Vec::new();
    for (i, part) in body.split(',').enumerate() {
        let part = part.trim();
        let n = i + 1;
        let (span, rate) = part
            .split_once('=')
            .ok_or_else(|| format!("schedule window {n} {part:?}: expected HH:MM-HH:MM=RATE"))?;
        let (start, end) = span
            .split_once('-')
            .ok_or_else(|| format!("schedule window {n} {part:?}: expected HH:MM-HH:MM=RATE"))?;
        windows.push(Window {
            start: parse_time(start, &format!("schedule window {n} start"))?,
            end: parse_time(end, &format!("schedule window {n} end"))?,
            rate: parse_rate(rate).map_err(|e| format!("schedule window {n}: {e}"))?,
        });
    }
    Schedule::new(windows, offset).map_err(|e| format!("schedule {s:?}: {e}"))
}

/// The figures of the `limits` answer.
pub fn status_json(bucket: &BucketStatus, schedule: Option<&str>, slots: usize) -> Value {
    json!({
        "rate_mib": rate_json(bucket.base_rate),
        "rate_now_mib": rate_json(bucket.rate_now),
        "schedule": schedule,
        "resync_slots": slots,
        "bytes_taken": bucket.taken,
    })
}

/// Applies a `limits` request's changes (`rate_mib`, `schedule` — a string, or null to
/// clear it — and `resync_slots`), all checked before any is applied. Returns the new
/// schedule text when it changed (`Some(None)`: cleared).
#[allow(clippy::option_option)]
pub fn apply(
    req: &Value,
    bucket: &TokenBucket,
    slots: &tidemark_sync::shape::ResyncSlots,
) -> anyhow::Result<Option<Option<String>>> {
    let rate = match req.get("rate_mib") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(parse_rate(s).map_err(anyhow::Error::msg)?),
        Some(Value::Number(n)) => Some(parse_rate(&n.to_string()).map_err(anyhow::Error::msg)?),
        Some(other) => bail!("rate_mib {other}: expected a number of MiB/s or \"unlimited\""),
    };
    let schedule = match req.get("schedule") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(Value::String(s)) => {
            Some(Some((parse_schedule(s).map_err(anyhow::Error::msg)?, s.clone())))
        }
        Some(other) => bail!("schedule {other}: expected a schedule string, or null to clear it"),
    };
    let new_slots = match req.get("resync_slots") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=64).contains(&n) => Some(n as usize),
            _ => bail!("resync_slots {v}: expected a whole number from 1 to 64"),
        },
    };
    if let Some(rate) = rate {
        let burst = bucket.status().burst;
        bucket.set_rate(rate, burst).context("set the rate")?;
    }
    if let Some(n) = new_slots {
        slots.set_limit(n);
    }
    Ok(schedule.map(|s| {
        let text = s.as_ref().map(|(_, t)| t.clone());
        bucket.set_schedule(s.map(|(s, _)| s));
        text
    }))
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    protect: ProtectSocket,
    /// The new base rate: MiB per second, `0` to pause, or `unlimited`.
    #[arg(long, value_parser = parse_rate_arg)]
    rate_mib: Option<String>,
    /// The new daily schedule (`HH:MM-HH:MM=RATE,...[@+HH:MM]`, see `docs/control-protocol.md`).
    #[arg(long, value_parser = parse_schedule_arg, conflicts_with = "no_schedule")]
    schedule: Option<String>,
    /// Remove the daily schedule.
    #[arg(long)]
    no_schedule: bool,
    /// The new cap on concurrent resyncs (a verify takes a slot too).
    #[arg(long)]
    resync_slots: Option<u64>,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_rate_arg(s: &str) -> Result<String, String> {
    parse_rate(s).map(|_| s.to_owned())
}

fn parse_schedule_arg(s: &str) -> Result<String, String> {
    parse_schedule(s).map(|_| s.to_owned())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut client = args.protect.connect()?;
    let mut req = json!({"op": "limits"});
    if let Some(r) = &args.rate_mib {
        req["rate_mib"] = json!(r);
    }
    if let Some(s) = &args.schedule {
        req["schedule"] = json!(s);
    }
    if args.no_schedule {
        req["schedule"] = Value::Null;
    }
    if let Some(n) = args.resync_slots {
        req["resync_slots"] = json!(n);
    }
    let mut answer = client.request(req)?;
    if let Some(o) = answer.as_object_mut() {
        o.remove("v");
        o.remove("ok");
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        let show = |v: &Value| match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => format!("{n} MiB/s"),
            _ => "-".to_owned(),
        };
        println!("rate:         {}", show(&answer["rate_mib"]));
        println!("rate now:     {}", show(&answer["rate_now_mib"]));
        println!("schedule:     {}", answer["schedule"].as_str().unwrap_or("none"));
        println!("resync slots: {}", answer["resync_slots"]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_schedules_parse_and_bad_ones_say_why() {
        assert_eq!(parse_rate("unlimited"), Ok(Rate::Unlimited));
        assert_eq!(parse_rate("0"), Ok(Rate::BytesPerSec(0)));
        assert_eq!(parse_rate("1.5"), Ok(Rate::BytesPerSec(3 << 19)));
        assert!(parse_rate("-1").unwrap_err().contains("MiB per second"));
        let s = parse_schedule("08:00-18:00=10,18:00-08:00=unlimited@+01:30").unwrap();
        assert_eq!(s.windows().len(), 2);
        assert_eq!(s.windows()[0].rate, Rate::BytesPerSec(10 << 20));
        for (bad, why) in [
            ("08:00-18:00", "expected HH:MM-HH:MM=RATE"),
            ("8-18=1", "expected HH:MM"),
            ("24:00-01:00=1", "start \"24:00\""),
            ("08:00-18:00=fast", "window 1: rate"),
            ("08:00-18:00=1,12:00-13:00=2", "overlap"),
            ("08:00-18:00=1@+25:00", "offset"),
        ] {
            let e = parse_schedule(bad).unwrap_err();
            assert!(e.to_lowercase().contains(&why.to_lowercase()), "{bad}: {e}");
        }
    }
}
