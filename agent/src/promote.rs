//! `tidemark promote`: failover. With `receive` stopped, the replica of a `receive`
//! directory becomes a normal device image at a chosen recovery point: the journal is
//! folded into `DIR/replica.img` up to the point, then set aside whole as
//! `DIR/journal.promoted-SEQ` (the history after the point is kept there, not applied).
//! `DIR/promoted.json` records what was done; from then on the image is the live volume.
//!
//! Crash safety (the steps, each durable before the next):
//! 1. `DIR/promote.json` names the point's sequence number (state `folding`).
//! 2. The fold: every block the journal changed up to the point is written into the image
//!    (the state at the point, read from the journal and the image). Redoing it after a
//!    crash writes the same bytes: the journal is not touched by it, and a block's state at
//!    the point depends only on the journal's records up to the point and on the image's
//!    blocks the journal never changed, which the fold does not write.
//! 3. The image is synced, then `journal/` is renamed to `journal.promoted-SEQ`.
//! 4. `promoted.json` is written, then `promote.json` removed.
//!
//! A `promote` that finds `promote.json` resumes at the step the directory shows (journal
//! still there: fold again; set aside already: finish). `receive` and `promote` refuse a
//! directory holding `promote.json` (a half-folded image is never served or taken as
//! finished).
//!
//! Planned failover: `--require-seq N`, where N is the last sequence number the stopped
//! source spooled (`tap.last_seq` of its final status.json, which also shows it was
//! acknowledged: `shipper.acked`), refuses unless the point reaches N: no acknowledged or
//! spooled write is left behind.
//!
//! A consistency group (`--group G`, or `--dir` repeated) is promoted at one group
//! bookmark (`--point bookmark:NAME`): every member's point is resolved, and every check
//! (receivers stopped, the bookmark held by every member, `--require-seq` once per member)
//! passes before the first member is touched. The members are then promoted one by one,
//! each record naming the group id. A group promotion that stopped part way is finished by
//! running it again: members already promoted for that group are left as they are, one
//! interrupted is resumed, and the rest are resolved at the group id the others recorded,
//! never at a newer bookmark of the same name.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tidemark_journal::{FileIo, RecoveryPoint, Seq, VolumeId};

use crate::group;
use crate::source_control::{group_hex, parse_group_id};
use crate::{common, control, points, status};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The directory of `tidemark receive` (replica.img, journal/), with receive stopped.
    /// Given more than once: the members of a consistency group, all promoted at one
    /// group bookmark.
    #[arg(long, required_unless_present = "group")]
    dir: Vec<PathBuf>,
    /// Promote the receive pairs of this `[group.NAME]` of the configuration file, all at
    /// one group bookmark.
    #[arg(long, conflicts_with = "dir")]
    group: Option<String>,
    /// The configuration file (with --group).
    #[arg(long, default_value = crate::up::DEFAULT_CONFIG, requires = "group")]
    config: PathBuf,
    /// For a group: the group bookmark's id (16 hexadecimal digits, as `tidemark points`
    /// shows), when not the newest group bookmark of that name.
    #[arg(long)]
    group_id: Option<String>,
    /// The point to promote: latest, seq:N, time:T or bookmark:NAME (for a group, a group
    /// bookmark).
    #[arg(long, default_value = "latest")]
    point: String,
    /// Planned failover: refuse unless the point covers every event up to this sequence
    /// number (the stopped source's last spooled seq). For a group: once per member, in
    /// the members' order.
    #[arg(long)]
    require_seq: Vec<u64>,
    /// Block size of the journal's index (as given to `receive`).
    #[arg(long, default_value_t = 4096)]
    block_size: u32,
}

/// The marker of a promotion in progress.
pub const IN_PROGRESS: &str = "promote.json";
/// The record of a finished promotion.
pub const DONE: &str = "promoted.json";

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.group.is_some() || args.dir.len() > 1 {
        return run_group(&args);
    }
    if args.group_id.is_some() {
        bail!("--group-id names a group bookmark: promote a group (--group, or --dir repeated)");
    }
    if args.require_seq.len() > 1 {
        bail!("--require-seq is given once per member of a group; one --dir is one member");
    }
    let dir = &args.dir[0];
    match state_of(dir, None)? {
        State::Done(record) => bail!(
            "{} was already promoted ({}): its replica.img is the live volume",
            dir.display(),
            record.to_string().trim()
        ),
        State::Interrupted(record) => {
            println!("resuming the promotion of {} to seq {}", dir.display(), record["seq"]);
            finish(dir, record, args.block_size)
        }
        State::Fresh => {
            let log = common::open_log(dir, args.block_size)?;
            let point = points::parse_point(&args.point)?;
            let marker = start(&log, &args.point, &point, args.require_seq.first().copied(), None)?;
            drop(log);
            write_durable(dir, IN_PROGRESS, &marker)?;
            finish(dir, marker, args.block_size)
        }
    }
}

/// Where a receive directory stands with promotion.
enum State {
    /// Never promoted.
    Fresh,
    /// `promote.json`: a promotion to resume (its marker).
    Interrupted(Value),
    /// `promoted.json` and no marker: the image is the live volume (its record).
    Done(Value),
}

/// Reads where `dir` stands; refuses a directory whose receiver is running (on `socket`,
/// default `DIR/control.sock`).
fn state_of(dir: &Path, socket: Option<&PathBuf>) -> anyhow::Result<State> {
    let socket = socket.cloned().unwrap_or_else(|| control::default_socket(dir));
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        bail!(
            "a receiver is running on {} (control socket {} answers): stop it before promoting",
            dir.display(),
            socket.display()
        );
    }
    let read = |name: &str| -> anyhow::Result<Value> {
        let path = dir.join(name);
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        let v: Value = serde_json::from_str(&text).with_context(|| {
            format!("{} is not JSON: remove it only if replica.img is restored", path.display())
        })?;
        v["seq"].as_u64().with_context(|| {
            format!("{}: expected a number at \"seq\", found {}", path.display(), v["seq"])
        })?;
        Ok(v)
    };
    Ok(if dir.join(IN_PROGRESS).exists() {
        State::Interrupted(read(IN_PROGRESS)?)
    } else if dir.join(DONE).exists() {
        State::Done(read(DONE)?)
    } else {
        State::Fresh
    })
}

/// Resolves `point` in `log`, checks `require_seq`, and makes the marker of step 1.
/// `group`: the group id and bookmark name of a group promotion.
fn start(
    log: &tidemark_journal::RetentionLog,
    spec: &str,
    point: &RecoveryPoint,
    require_seq: Option<u64>,
    group: Option<(u64, &str)>,
) -> anyhow::Result<Value> {
    let info = points::resolve_or_explain(log, point)?;
    let st = log.status();
    if let Some(req) = require_seq {
        if info.seq.0 < req {
            bail!(
                "planned failover: point {spec} is seq {}, but the source spooled up to seq {req}; \
                 the journal holds up to seq {} (newest consistent: {:?}): the drain did not finish",
                info.seq,
                st.newest_seq,
                st.last_consistent.as_ref().map(|p| p.seq.0)
            );
        }
    }
    let mut v = json!({
        "state": "folding",
        "seq": info.seq.0,
        "point": spec,
        "kind": format!("{:?}", info.kind),
        "journal_newest_seq": st.newest_seq.0,
        "discarded_after_point": st.newest_seq.0.saturating_sub(info.seq.0),
        "planned_require_seq": require_seq,
        // The generation the promoted image starts (docs/failover.md, lineages).
        "generation": format!("{:016x}", crate::lineage::new_id()),
        "started_ms": status::now_ms(),
    });
    if let Some((id, name)) = group {
        v["group"] = json!(group_hex(id));
        v["bookmark"] = json!(name);
    }
    Ok(v)
}

/// Steps 2 to 4 from the marker `record` (durable in `dir`).
fn finish(dir: &Path, mut record: Value, block_size: u32) -> anyhow::Result<()> {
    let marker = dir.join(IN_PROGRESS);
    let seq = record["seq"].as_u64().unwrap_or(0);
    if record["state"] != "folding" {
        bail!("{}: expected the state \"folding\", found {}", marker.display(), record["state"]);
    }
    let journal = dir.join("journal");
    let aside = dir.join(format!("journal.promoted-{seq}"));
    if journal.exists() {
        fold(dir, seq, block_size)?;
        std::fs::rename(&journal, &aside)
            .with_context(|| format!("rename {} to {}", journal.display(), aside.display()))?;
        sync_dir(dir)?;
    } else if !aside.exists() {
        bail!(
            "{}: promotion to seq {seq} in progress, but neither {} nor {} exists",
            dir.display(),
            journal.display(),
            aside.display()
        );
    }
    // A marker from before lineages has no generation: make one now.
    let generation = match record["generation"].as_str().map(|h| u64::from_str_radix(h, 16)) {
        Some(Ok(id)) if id != 0 => id,
        _ => crate::lineage::new_id(),
    };
    record["generation"] = json!(format!("{generation:016x}"));
    crate::lineage::branch(dir, generation, Seq(seq))?;
    record["state"] = json!("promoted");
    record["journal_set_aside"] = json!(aside.display().to_string());
    record["finished_ms"] = json!(status::now_ms());
    write_durable(dir, DONE, &record)?;
    std::fs::remove_file(&marker).with_context(|| format!("remove {}", marker.display()))?;
    sync_dir(dir)?;
    println!(
        "promoted: {} is the volume at seq {seq}; history after it kept in {}",
        dir.join("replica.img").display(),
        aside.display()
    );
    Ok(())
}

/// A consistency group: every member promoted at one group bookmark, every check made
/// before the first member is touched.
fn run_group(args: &Args) -> anyhow::Result<()> {
    let members = group::members(args.group.as_deref(), &args.config, &args.dir, "receive")?;
    if members.len() < 2 {
        bail!("a group has at least two members, got {}", members.len());
    }
    let RecoveryPoint::Bookmark(name) = points::parse_point(&args.point)? else {
        bail!(
            "point {:?}: a group is promoted at a group bookmark, --point bookmark:NAME \
             (other points are not one state across the volumes)",
            args.point
        );
    };
    group::one_per_member("--require-seq", "sequence numbers", args.require_seq.len(), &members)?;
    let states = members
        .iter()
        .map(|m| state_of(&m.dir, m.control.as_ref()).with_context(|| format!("member {}", m.name)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // A member promoted (or being promoted) before: for this group, at this bookmark.
    let mut wanted = args.group_id.as_deref().map(parse_group_id).transpose()?;
    for (m, st) in members.iter().zip(&states) {
        let (State::Done(r) | State::Interrupted(r)) = st else { continue };
        let Some(id) = r["group"].as_str().and_then(|g| parse_group_id(g).ok()) else {
            bail!(
                "member {} was promoted on its own (to seq {}, {}), not as a member of a group: \
                 promote the others one by one, or restore it",
                m.name,
                r["seq"],
                r["point"]
            );
        };
        if r["bookmark"] != name.as_str() || wanted.is_some_and(|w| w != id) {
            bail!(
                "member {} was promoted for group bookmark {} (group {}), not for {name:?}{}: \
                 a group promotion that stopped part way is finished at the same bookmark",
                m.name,
                r["bookmark"],
                group_hex(id),
                wanted.map(|w| format!(" (group {})", group_hex(w))).unwrap_or_default()
            );
        }
        wanted = Some(id);
    }
    let fresh: Vec<usize> =
        (0..members.len()).filter(|&i| matches!(states[i], State::Fresh)).collect();
    let logs = fresh
        .iter()
        .map(|&i| {
            common::open_log(&members[i].dir, args.block_size)
                .with_context(|| format!("member {}", members[i].name))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let docs: Vec<Value> = logs.iter().map(points::points_doc).collect();
    let fresh_members: Vec<group::GroupMember> =
        fresh.iter().map(|&i| members[i].clone()).collect();
    let (id, pts) = match wanted {
        Some(id) if fresh.is_empty() => (id, Vec::new()),
        _ => group::resolve(&fresh_members, &docs, &name, wanted)?,
    };
    println!("group: {} ({} members, bookmark {name:?})", group_hex(id), members.len());
    if states.iter().all(|s| matches!(s, State::Done(_))) {
        bail!(
            "every member was already promoted for group bookmark {name:?} (group {}): their \
             replica.img files are the live volumes",
            group_hex(id)
        );
    }
    // Every check before the first member is touched.
    let mut markers = Vec::with_capacity(fresh.len());
    for ((&i, log), p) in fresh.iter().zip(&logs).zip(&pts) {
        let seq = p["seq"].as_u64().context("a group point without a seq")?;
        let spec = format!("seq:{seq}");
        let marker = start(
            log,
            &spec,
            &RecoveryPoint::Seq(Seq(seq)),
            args.require_seq.get(i).copied(),
            Some((id, &name)),
        )
        .with_context(|| format!("member {}", members[i].name))?;
        markers.push(marker);
    }
    drop(logs);
    let mut markers = markers.into_iter();
    for (m, st) in members.iter().zip(states) {
        println!("member: {}", m.name);
        let done = match st {
            State::Done(r) => {
                println!("already promoted: seq {}", r["seq"]);
                Ok(())
            }
            State::Interrupted(r) => {
                println!("resuming the promotion of {} to seq {}", m.dir.display(), r["seq"]);
                finish(&m.dir, r, args.block_size)
            }
            State::Fresh => {
                let marker = markers.next().expect("one marker per fresh member");
                write_durable(&m.dir, IN_PROGRESS, &marker)
                    .and_then(|()| finish(&m.dir, marker, args.block_size))
            }
        };
        done.with_context(|| {
            format!(
                "member {}: the group promotion stopped here; run the same `tidemark promote` \
                 again to finish it",
                m.name
            )
        })?;
    }
    println!("promoted: group {} at bookmark {name:?}, {} members", group_hex(id), members.len());
    Ok(())
}

/// Writes the state at `seq` of every block into `DIR/replica.img`, then syncs it.
fn fold(dir: &Path, seq: u64, block_size: u32) -> anyhow::Result<()> {
    let log = common::open_log(dir, block_size)?;
    let info = points::resolve_or_explain(&log, &RecoveryPoint::Seq(Seq(seq)))
        .with_context(|| format!("the point of the promotion in {}", dir.display()))?;
    let image = dir.join("replica.img");
    let out = FileIo::open(&image).with_context(|| format!("open {}", image.display()))?;
    let bar = common::byte_bar("fold", log.volume_len(VolumeId(0))?);
    let report = log
        .materialize(&info, VolumeId(0), &out, &mut |done, total| {
            if let Some(b) = &bar {
                b.set_length(total);
                b.set_position(done);
            }
        })
        .with_context(|| format!("fold the journal into {}", image.display()))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    tidemark_journal::BlockIo::sync(&out).with_context(|| format!("sync {}", image.display()))?;
    println!(
        "folded seq {seq}: {} blocks from the journal, blake3 {}",
        report.journal_blocks,
        blake3::Hash::from(report.hash).to_hex()
    );
    Ok(())
}

/// Refuses a directory whose promotion has not finished (for `receive`).
pub fn check_not_promoting(dir: &Path) -> anyhow::Result<()> {
    if dir.join(IN_PROGRESS).exists() {
        bail!(
            "{} holds {}: a promotion was interrupted and replica.img may be half folded; \
             run `tidemark promote --dir {}` to finish it",
            dir.display(),
            IN_PROGRESS,
            dir.display()
        );
    }
    Ok(())
}

fn write_durable(dir: &Path, name: &str, v: &Value) -> anyhow::Result<()> {
    use std::io::Write as _;
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    f.write_all(serde_json::to_string_pretty(v)?.as_bytes())?;
    f.sync_all().with_context(|| format!("sync {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("rename to {}", path.display()))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("sync the directory {}", dir.display()))
}
