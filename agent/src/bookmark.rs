//! `tidemark bookmark NAME`: inserts a named bookmark into the capture stream of the
//! running `tidemark protect` (through its control socket). `--freeze MOUNTPOINT` has the
//! agent freeze the filesystem around it (FIFREEZE, bookmark, FITHAW; the agent thaws at
//! the timeout whatever happens to this client); `--pre`/`--post` run hook scripts here
//! for an application-consistent bookmark (a database checkpoint): a failing pre hook
//! means no bookmark, and the post hook always runs. `--wait` waits until the target
//! acknowledged the bookmark.
//!
//! `--every PERIOD` takes such a bookmark (or group bookmark, hooks and freezes included)
//! once a period, at the period's multiples on the UTC clock, until SIGINT or SIGTERM, each
//! named `NAME-YYYY-MM-DDTHH:MM:SSZ`; one that fails is reported and the next is still
//! taken.
//!
//! Hooks run with `sh -c`, with `TIDEMARK_BOOKMARK` (the name) and `TIDEMARK_STATE` in
//! their environment; the post hook also gets `TIDEMARK_BOOKMARK_RESULT` (`ok` or
//! `failed`) and, when taken, `TIDEMARK_BOOKMARK_SEQ`.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tidemark_journal::Nanos;

use crate::signals;
use crate::source_control::{
    MAX_FREEZE, bookmark_kind, check_name, check_prefix, kind_name, now, periodic_name,
};
use crate::verify::connect;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The bookmark's name: 1 to 255 bytes of UTF-8, no control characters. With
    /// `--every`, the prefix of the names.
    name: String,
    /// Take a bookmark this often (`90s`, `15m`, `2h`, `1d`; whole seconds, at least one) until
    /// SIGINT or SIGTERM, each named NAME-TIME (`nightly-2026-12-01T21:45:00Z`), at the
    /// multiples of the period on the UTC clock (`15m`: at :00, :15, :30 and :45; `1d`: at
    /// 00:00 UTC).
    #[arg(long, value_parser = crate::source_control::parse_duration)]
    every: Option<Duration>,
    /// The state directory of the running `tidemark protect`. Given more than once: a
    /// group bookmark across those pairs (one cut across their volumes).
    #[arg(long, required_unless_present = "group")]
    state: Vec<PathBuf>,
    /// Its control socket (default: STATE/control.sock; with one --state only).
    #[arg(long)]
    control: Option<PathBuf>,
    /// A group bookmark across the protect pairs of this `[group.NAME]` of the
    /// configuration file.
    #[arg(long, conflicts_with_all = ["state", "control"])]
    group: Option<String>,
    /// The configuration file (with --group).
    #[arg(long, default_value = crate::up::DEFAULT_CONFIG, requires = "group")]
    config: PathBuf,
    /// Group bookmarks: how long each member holds its writes at most, in seconds (a
    /// member lets itself go then, whatever happens to this client).
    #[arg(long, default_value_t = 10.0)]
    hold_lease: f64,
    /// Freeze the filesystem mounted here (on the protected device) around the bookmark.
    /// For a group: once per member, in the members' order.
    #[arg(long)]
    freeze: Vec<PathBuf>,
    /// Longest time the filesystem stays frozen; the agent thaws it then in any case.
    #[arg(long, default_value_t = 30.0)]
    freeze_timeout: f64,
    /// Run this (with `sh -c`) before; the bookmark is taken only if it exits 0.
    #[arg(long)]
    pre: Option<String>,
    /// Run this (with `sh -c`) after, whether or not the bookmark was taken.
    #[arg(long)]
    post: Option<String>,
    /// Wait until the target acknowledged the bookmark.
    #[arg(long)]
    wait: bool,
    /// How long `--wait` waits, in seconds.
    #[arg(long, default_value_t = 600)]
    wait_timeout: u64,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let Some(every) = args.every else {
        check_name(&args.name).context("bad bookmark name")?;
        return once(&args, &args.name);
    };
    check_prefix(&args.name).context("bad bookmark name")?;
    check(&args)?;
    signals::install()?;
    println!(
        "taking bookmark \"{}-TIME\" every {} s until SIGINT or SIGTERM",
        args.name,
        every.as_secs()
    );
    std::io::stdout().flush()?;
    let (mut taken, mut failed) = (0u64, 0u64);
    // Ticks on the UTC clock's multiples of the period: every 15m at :00, :15, :30, :45.
    let period = (every.as_nanos() as u64).max(1);
    let mut next = next_tick(now().0, period);
    println!("first at {}", crate::points::rfc3339(Nanos(next)));
    loop {
        while !signals::stop_requested() && now().0 < next {
            std::thread::sleep(Duration::from_nanos(next.saturating_sub(now().0)).min(POLL));
        }
        if signals::stop_requested() {
            break;
        }
        // A period missed (a slow member, a long hook) is skipped, not made up for.
        let t = now().0;
        next = next_tick(t, period);
        // Periods are whole seconds, so each tick has a second, and a name, of its own.
        let name = periodic_name(&args.name, Nanos(t));
        match once(&args, &name) {
            Ok(()) => taken += 1,
            Err(e) => {
                failed += 1;
                eprintln!("error: periodic bookmark {name:?}: {e:#}");
            }
        }
        std::io::stdout().flush()?;
    }
    println!("stopped: {taken} bookmarks taken, {failed} failed");
    Ok(())
}

/// The first multiple of `period` (ns) on the UTC clock after `t` (ns since the epoch).
pub fn next_tick(t: u64, period: u64) -> u64 {
    (t / period + 1) * period
}

/// How often the wait between periodic bookmarks looks at the stop flag.
const POLL: Duration = Duration::from_millis(100);

/// Refuses options that would fail every bookmark, before the first one.
fn check(args: &Args) -> anyhow::Result<()> {
    if args.group.is_some() || args.state.len() > 1 {
        check_group(args).map(|_| ())
    } else {
        check_single(args)
    }
}

/// One bookmark (or group bookmark) named `name`.
fn once(args: &Args, name: &str) -> anyhow::Result<()> {
    if args.group.is_some() || args.state.len() > 1 {
        return run_group(args, name);
    }
    check_single(args)?;
    let mut client = connect(&args.state[0], args.control.as_ref())?;
    let kind = kind_name(bookmark_kind(
        args.pre.is_some() || args.post.is_some(),
        !args.freeze.is_empty(),
    ));
    let taken = (|| -> anyhow::Result<Value> {
        if let Some(pre) = &args.pre {
            hook("pre", pre, args, name, None)?;
        }
        let mut req = json!({"op": "bookmark", "name": name, "kind": kind});
        if let Some(m) = args.freeze.first() {
            let m =
                std::fs::canonicalize(m).with_context(|| format!("--freeze {}", m.display()))?;
            req["freeze"] = json!(m.display().to_string());
            req["freeze_timeout_s"] = json!(args.freeze_timeout);
        }
        client.request(req)
    })();
    let post = match &args.post {
        Some(post) => hook("post", post, args, name, Some(taken.as_ref().ok())),
        None => Ok(()),
    };
    let answer = taken?;
    post?;
    let seq = answer["seq"].as_u64().context("the bookmark answer has no seq")?;
    let mut acked = None;
    if args.wait {
        let until = Instant::now() + Duration::from_secs(args.wait_timeout);
        loop {
            let st = client.request(json!({"op": "status"}))?;
            let a = st["shipper"]["acked"].as_u64().unwrap_or(0);
            if a >= seq {
                acked = Some(a);
                break;
            }
            if Instant::now() >= until {
                bail!(
                    "bookmark {name:?} is seq {seq}, but the target acknowledged only up to {a} \
                     within {} s (link {})",
                    args.wait_timeout,
                    st["shipper"]["state"]
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    if args.json {
        let mut doc = answer.clone();
        if let Some(o) = doc.as_object_mut() {
            o.remove("v");
            o.remove("ok");
        }
        doc["acked"] = json!(acked);
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!(
            "bookmark {name:?} ({}): seq {seq}{}{}",
            answer["kind"].as_str().unwrap_or(kind),
            answer["frozen_ms"]
                .as_u64()
                .map(|ms| format!(", filesystem frozen {ms} ms"))
                .unwrap_or_default(),
            if acked.is_some() { ", acknowledged by the target" } else { "" }
        );
    }
    Ok(())
}

/// The checks of a single pair's bookmark.
fn check_single(args: &Args) -> anyhow::Result<()> {
    if args.state.len() != 1 {
        bail!("--state: expected the state directory of a running `tidemark protect`");
    }
    if args.freeze.len() > 1 {
        bail!("--freeze is given once per member of a group; one --state is one member");
    }
    if !(args.freeze_timeout > 0.0 && args.freeze_timeout <= MAX_FREEZE.as_secs_f64()) {
        bail!(
            "--freeze-timeout {}: expected more than 0 and at most {} seconds",
            args.freeze_timeout,
            MAX_FREEZE.as_secs()
        );
    }
    Ok(())
}

/// The checks of a group bookmark; its members and the canonical mountpoints to freeze.
fn check_group(args: &Args) -> anyhow::Result<(Vec<crate::group::GroupMember>, Vec<PathBuf>)> {
    if args.control.is_some() {
        bail!("--control names one pair's socket; a group's members use STATE/control.sock");
    }
    if !(args.hold_lease > 0.0 && args.hold_lease <= tidemark_tap::MAX_HOLD_LEASE.as_secs_f64()) {
        bail!(
            "--hold-lease {}: expected more than 0 and at most {} seconds",
            args.hold_lease,
            tidemark_tap::MAX_HOLD_LEASE.as_secs()
        );
    }
    let members =
        crate::group::members(args.group.as_deref(), &args.config, &args.state, "protect")?;
    crate::group::one_per_member("--freeze", "mountpoints", args.freeze.len(), &members)?;
    let freeze = args
        .freeze
        .iter()
        .map(|m| std::fs::canonicalize(m).with_context(|| format!("--freeze {}", m.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((members, freeze))
}

/// A group bookmark (`crate::group`) named `name`: hooks once around the whole cut, here.
fn run_group(args: &Args, name: &str) -> anyhow::Result<()> {
    let (members, freeze) = check_group(args)?;
    let kind =
        kind_name(bookmark_kind(args.pre.is_some() || args.post.is_some(), !freeze.is_empty()));
    let taken = (|| {
        if let Some(pre) = &args.pre {
            hook("pre", pre, args, name, None)?;
        }
        crate::group::bookmark(
            name,
            kind,
            &members,
            &freeze,
            Duration::from_secs_f64(args.hold_lease),
        )
    })();
    let post = match &args.post {
        Some(post) => {
            let answer =
                taken.as_ref().ok().map(|m| json!({"seq": m.marks.first().map(|x| x.seq)}));
            hook("post", post, args, name, Some(answer.as_ref()))
        }
        None => Ok(()),
    };
    let mark = taken?;
    post?;
    if args.wait {
        crate::group::wait_acked(&members, &mark, Duration::from_secs(args.wait_timeout))?;
    }
    let group = crate::source_control::group_hex(mark.group);
    if args.json {
        let doc = json!({
            "name": name,
            "kind": kind,
            "group": group,
            "held_ms": mark.held.as_millis() as u64,
            "members": mark.marks.iter().zip(&members).map(|(m, g)| json!({
                "member": m.member, "state": g.dir.display().to_string(), "seq": m.seq,
            })).collect::<Vec<_>>(),
            "acked": args.wait,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!(
            "group bookmark {name:?} ({kind}): group {group}, {} members, writes held {} ms{}",
            mark.marks.len(),
            mark.held.as_millis(),
            if args.wait { ", acknowledged by every target" } else { "" }
        );
        for m in &mark.marks {
            println!("  {}: seq {}", m.member, m.seq);
        }
    }
    Ok(())
}

/// Runs a hook; an error when it cannot start or exits non-zero. `result`: for the post
/// hook, the bookmark's answer (`None` inside when it failed).
fn hook(
    which: &str,
    cmd: &str,
    args: &Args,
    name: &str,
    result: Option<Option<&Value>>,
) -> anyhow::Result<()> {
    let states: Vec<String> = args.state.iter().map(|s| s.display().to_string()).collect();
    let states = states.join(":");
    let mut env = vec![("TIDEMARK_BOOKMARK", name), ("TIDEMARK_STATE", states.as_str())];
    if let Some(g) = &args.group {
        env.push(("TIDEMARK_GROUP", g));
    }
    run_hook(which, cmd, &env, result.map(|r| r.and_then(|v| v["seq"].as_u64())))
}

/// Runs a bookmark hook with `sh -c CMD` and `env`; for the post hook, `result` is the
/// bookmark's seq when taken (`TIDEMARK_BOOKMARK_RESULT` `ok` and `TIDEMARK_BOOKMARK_SEQ`)
/// or `None` (`failed`). An error when it cannot start or exits non-zero.
pub fn run_hook(
    which: &str,
    cmd: &str,
    env: &[(&str, &str)],
    result: Option<Option<u64>>,
) -> anyhow::Result<()> {
    let mut c = Command::new("sh");
    c.arg("-c").arg(cmd).envs(env.iter().copied());
    if let Some(r) = result {
        c.env("TIDEMARK_BOOKMARK_RESULT", if r.is_some() { "ok" } else { "failed" });
        if let Some(seq) = r {
            c.env("TIDEMARK_BOOKMARK_SEQ", seq.to_string());
        }
    }
    let status = c.status().with_context(|| format!("run the {which} hook {cmd:?}"))?;
    if !status.success() {
        if which == "pre" {
            bail!("the pre hook {cmd:?} failed ({status}): no bookmark taken");
        }
        bail!("the post hook {cmd:?} failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_fall_on_the_periods_multiples_of_the_utc_clock() {
        let at = |h: u64, m: u64, s: u64| ((h * 60 + m) * 60 + s) * Nanos::SECOND;
        let quarter = 15 * 60 * Nanos::SECOND;
        assert_eq!(next_tick(at(16, 7, 31), quarter), at(16, 15, 0));
        // A tick is after `t`, never at it: the one just taken is not taken again.
        assert_eq!(next_tick(at(16, 15, 0), quarter), at(16, 30, 0));
        // Late by more than a period: the missed ones are skipped.
        assert_eq!(next_tick(at(16, 47, 2), quarter), at(17, 0, 0));
        let day = 24 * 3600 * Nanos::SECOND;
        assert_eq!(next_tick(at(30 * 24 + 5, 0, 0), day), at(31 * 24, 0, 0));
    }
}
