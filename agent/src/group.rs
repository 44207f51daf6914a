//! Consistency groups (`docs/consistency-groups.md`): one bookmark cut across the volumes of
//! several running `tidemark protect` pairs, and the recovery of the group's volumes at one
//! such bookmark.
//!
//! **The cut** (`tidemark bookmark NAME --group G` or `--state A --state B ...`), over the
//! members' control sockets: phase 1, `hold` on every member (its tap admits no new write
//! until released, or until the lease runs out by itself); phase 2, once every member is
//! held, a bookmark with the same name and the same random group id on every member, each
//! appended only while that member's hold is in force; then `release` on every member held,
//! whatever happened. If a member fails, the others are released and the error names it.
//!
//! Invariant: every bookmark of one group id was appended after every member's hold began
//! and while its own member's hold was in force. Hence a write that completed before a write
//! on another member was issued is on the same side of the cut as that write, or before it:
//! the members' states at the bookmark are one state the group could have had.
//!
//! **The recovery** (`tidemark recover --group G` or `--dir A --dir B ...`, with
//! `--point bookmark:NAME`): the newest group bookmark of that name among the members (or
//! the one `--group-id` names) is found on every member, or the recovery is refused naming
//! the member that lacks it. Never another point instead.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::control::{self, Client};
use crate::source_control::{group_hex, parse_group_id};
use crate::up;
pub use crate::up::GroupMember;

/// Where the members of a group are: from the configuration file's `[group.NAME]`, or
/// from directories given on the command line (named by their path).
pub fn members(
    group: Option<&str>,
    config: &std::path::Path,
    dirs: &[PathBuf],
    role: &str,
) -> anyhow::Result<Vec<GroupMember>> {
    let members = match group {
        Some(g) => {
            if !dirs.is_empty() {
                bail!("give the group's members either by --group or by directories, not both");
            }
            up::group_members(config, g, role)?
        }
        None => dirs
            .iter()
            .map(|d| GroupMember { name: d.display().to_string(), dir: d.clone(), control: None })
            .collect(),
    };
    for (i, m) in members.iter().enumerate() {
        if members[..i].iter().any(|o| o.dir == m.dir) {
            bail!("{} is named twice in the group", m.dir.display());
        }
    }
    Ok(members)
}

/// Checks that an option repeated per member (`--freeze`, `--materialize`) was given
/// `given` times: none, or once per member.
pub fn one_per_member(
    option: &str,
    what: &str,
    given: usize,
    members: &[GroupMember],
) -> anyhow::Result<()> {
    if given != 0 && given != members.len() {
        bail!(
            "{option}: {given} {what} for {} members; give one per member, in the members' order ({})",
            members.len(),
            members.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

/// A new group id: random, never 0 (0 means "no group").
pub fn new_group_id() -> u64 {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return id;
        }
    }
}

/// One member's part of a group bookmark.
#[derive(Debug, Clone)]
pub struct MemberMark {
    pub member: String,
    pub seq: u64,
}

/// What a group bookmark did.
#[derive(Debug, Clone)]
pub struct GroupMark {
    pub group: u64,
    pub marks: Vec<MemberMark>,
    /// From the first hold granted to the last release answered.
    pub held: Duration,
}

/// Takes the group bookmark `name` (kind `kind`) across `members`, each hold with `lease`;
/// with `freeze` (empty, or one absolute mountpoint per member), each member's agent freezes
/// that filesystem before its hold and thaws it at its release (or at the lease).
pub fn bookmark(
    name: &str,
    kind: &str,
    members: &[GroupMember],
    freeze: &[PathBuf],
    lease: Duration,
) -> anyhow::Result<GroupMark> {
    if members.len() < 2 {
        bail!("a group bookmark needs at least two members, got {}", members.len());
    }
    let mut clients = Vec::with_capacity(members.len());
    for m in members {
        let c = crate::verify::connect(&m.dir, m.control.as_ref())
            .with_context(|| format!("member {}", m.name))?;
        clients.push(c);
    }
    let group = new_group_id();
    let mut tokens: Vec<Option<u64>> = vec![None; members.len()];
    let mut first_hold = None;
    let outcome = (|| -> anyhow::Result<Vec<MemberMark>> {
        // Phase 1: every member holds its writes.
        for (i, (m, c)) in members.iter().zip(clients.iter_mut()).enumerate() {
            let mut req = json!({"op": "hold", "lease_s": lease.as_secs_f64()});
            if let Some(f) = freeze.get(i) {
                req["freeze"] = json!(f.display().to_string());
            }
            let v =
                c.request(req).with_context(|| format!("member {}: hold its writes", m.name))?;
            first_hold.get_or_insert_with(Instant::now);
            tokens[i] = Some(v["token"].as_u64().context("hold answer without a token")?);
        }
        // Phase 2: the bookmark on every member, under its hold.
        let mut marks = Vec::with_capacity(members.len());
        for (i, (m, c)) in members.iter().zip(clients.iter_mut()).enumerate() {
            let v = c
                .request(json!({
                    "op": "bookmark", "name": name, "kind": kind,
                    "group": group_hex(group), "hold": tokens[i],
                }))
                .with_context(|| format!("member {}: group bookmark", m.name))?;
            let seq = v["seq"].as_u64().context("bookmark answer without a seq")?;
            marks.push(MemberMark { member: m.name.clone(), seq });
        }
        Ok(marks)
    })();
    // Always: release every member held (a member whose lease ran out answers false).
    let mut release_errors = Vec::new();
    for (i, c) in clients.iter_mut().enumerate() {
        if let Some(token) = tokens[i] {
            match c.request(json!({"op": "release", "token": token})) {
                Err(e) => {
                    release_errors.push(format!("member {}: release: {e:#}", members[i].name))
                }
                Ok(v) if v["thawed"] == false => release_errors.push(format!(
                    "member {}: its filesystem was thawed by the lease before the release",
                    members[i].name
                )),
                Ok(_) => {}
            }
        }
    }
    let held = first_hold.map(|t| t.elapsed()).unwrap_or_default();
    match outcome {
        Ok(marks) => {
            for e in &release_errors {
                // The bookmarks are all in place; a member not answering its release lets
                // itself go at the end of the lease, or when this connection closes.
                eprintln!("warning: {e}");
            }
            Ok(GroupMark { group, marks, held })
        }
        Err(e) => {
            let taken: Vec<String> = members
                .iter()
                .zip(&tokens)
                .filter(|(_, t)| t.is_some())
                .map(|(m, _)| m.name.clone())
                .collect();
            Err(e.context(format!(
                "group bookmark {name:?} (group {}) not taken: writes released on {}; a member \
                 bookmark already appended carries the group id, but `recover` refuses a group \
                 bookmark that not every member holds",
                group_hex(group),
                if taken.is_empty() { "no member".to_owned() } else { taken.join(", ") }
            )))
        }
    }
}

/// Waits until every member's target acknowledged its part of `mark`.
pub fn wait_acked(
    members: &[GroupMember],
    mark: &GroupMark,
    timeout: Duration,
) -> anyhow::Result<()> {
    let until = Instant::now() + timeout;
    for (m, mm) in members.iter().zip(&mark.marks) {
        let mut c = crate::verify::connect(&m.dir, m.control.as_ref())?;
        loop {
            let st = c.request(json!({"op": "status"}))?;
            let a = st["shipper"]["acked"].as_u64().unwrap_or(0);
            if a >= mm.seq {
                break;
            }
            if Instant::now() >= until {
                bail!(
                    "member {}: its bookmark is seq {}, but the target acknowledged only up to \
                     {a} within {} s (link {})",
                    m.name,
                    mm.seq,
                    timeout.as_secs(),
                    st["shipper"]["state"]
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

/// The points document (`points` op, or the journal opened here) of a receive member.
pub fn member_points(m: &GroupMember, block_size: u32) -> anyhow::Result<Value> {
    let socket = m.control.clone().unwrap_or_else(|| control::default_socket(&m.dir));
    match Client::connect(&socket)? {
        Some(mut client) => client.request(json!({"op": "points"})),
        None => {
            let log = crate::common::open_log(&m.dir, block_size)
                .with_context(|| format!("member {}", m.name))?;
            Ok(crate::points::points_doc(&log))
        }
    }
}

/// The group bookmarks named `name` in a points document: `(group id, point)`.
fn group_marks<'a>(doc: &'a Value, name: &str) -> Vec<(u64, &'a Value)> {
    doc["points"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter(|p| p["kind"] == "bookmark" && p["bookmark"] == name)
                .filter_map(|p| Some((parse_group_id(p["group"].as_str()?).ok()?, p)))
                .collect()
        })
        .unwrap_or_default()
}

/// The point of every member for the group bookmark `name` (the newest such group among
/// the members, or `group`): one `seq:N` each, in the members' order, and the group id.
/// Refused, naming the member, when a member does not hold that group bookmark.
pub fn resolve(
    members: &[GroupMember],
    docs: &[Value],
    name: &str,
    group: Option<u64>,
) -> anyhow::Result<(u64, Vec<Value>)> {
    let group = match group {
        Some(g) => g,
        None => {
            // The newest group bookmark of this name any member holds.
            let newest = docs
                .iter()
                .flat_map(|d| group_marks(d, name))
                .max_by_key(|(_, p)| p["time_ns"].as_u64().unwrap_or(0));
            match newest {
                Some((g, _)) => g,
                None => {
                    let plain = docs.iter().any(|d| {
                        d["points"].as_array().is_some_and(|ps| {
                            ps.iter().any(|p| p["kind"] == "bookmark" && p["bookmark"] == name)
                        })
                    });
                    bail!(
                        "no member holds a group bookmark named {name:?}{}",
                        if plain {
                            " (there are bookmarks of that name, but none was taken for a group: \
                             recover each volume on its own if that is what you want)"
                        } else {
                            ""
                        }
                    );
                }
            }
        }
    };
    let mut points = Vec::with_capacity(members.len());
    let mut missing = Vec::new();
    for (m, d) in members.iter().zip(docs) {
        match group_marks(d, name).into_iter().find(|(g, _)| *g == group) {
            Some((_, p)) => points.push(p.clone()),
            None => {
                let others: Vec<String> = group_marks(d, name)
                    .iter()
                    .map(|(g, p)| format!("group {} (seq {})", group_hex(*g), p["seq"]))
                    .collect();
                missing.push(format!(
                    "member {} does not hold it{}",
                    m.name,
                    if others.is_empty() {
                        " (never received, or thinned by its retention)".to_owned()
                    } else {
                        format!("; it holds {name:?} of {}", others.join(", "))
                    }
                ));
            }
        }
    }
    if !missing.is_empty() {
        let holders: Vec<&str> = members
            .iter()
            .zip(docs)
            .filter(|(_, d)| group_marks(d, name).iter().any(|(g, _)| *g == group))
            .map(|(m, _)| m.name.as_str())
            .collect();
        bail!(
            "group bookmark {name:?} (group {}) is not held by every member, so it is not a \
             point of the group: {}; held by: {}. No other point is chosen instead: name an \
             older group with --group-id, or recover the volumes one by one",
            group_hex(group),
            missing.join("; "),
            if holders.is_empty() { "none".to_owned() } else { holders.join(", ") }
        );
    }
    Ok((group, points))
}
