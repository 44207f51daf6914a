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

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tidemark_journal::{FileIo, RecoveryPoint, Seq, VolumeId};

use crate::{common, control, points, status};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The directory of `tidemark receive` (replica.img, journal/), with receive stopped.
    #[arg(long)]
    dir: PathBuf,
    /// The point to promote: latest, seq:N, time:T or bookmark:NAME.
    #[arg(long, default_value = "latest")]
    point: String,
    /// Planned failover: refuse unless the point covers every event up to this sequence
    /// number (the stopped source's last spooled seq).
    #[arg(long)]
    require_seq: Option<u64>,
    /// Block size of the journal's index (as given to `receive`).
    #[arg(long, default_value_t = 4096)]
    block_size: u32,
}

/// The marker of a promotion in progress.
pub const IN_PROGRESS: &str = "promote.json";
/// The record of a finished promotion.
pub const DONE: &str = "promoted.json";

pub fn run(args: Args) -> anyhow::Result<()> {
    let dir = &args.dir;
    let marker = dir.join(IN_PROGRESS);
    if dir.join(DONE).exists() && !marker.exists() {
        bail!(
            "{} was already promoted ({}): its replica.img is the live volume",
            dir.display(),
            std::fs::read_to_string(dir.join(DONE)).unwrap_or_default().trim()
        );
    }
    let socket = control::default_socket(dir);
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        bail!(
            "a receiver is running on {} (control socket {} answers): stop it before promoting",
            dir.display(),
            socket.display()
        );
    }
    let mut record = if marker.exists() {
        let text = std::fs::read_to_string(&marker)
            .with_context(|| format!("read {}", marker.display()))?;
        let v: Value = serde_json::from_str(&text).with_context(|| {
            format!("{} is not JSON: remove it only if replica.img is restored", marker.display())
        })?;
        let seq = v["seq"].as_u64().with_context(|| {
            format!("{}: expected a number at \"seq\", found {}", marker.display(), v["seq"])
        })?;
        println!("resuming the promotion of {} to seq {seq}", dir.display());
        v
    } else {
        let log = common::open_log(dir, args.block_size)?;
        let point = points::parse_point(&args.point)?;
        let info = points::resolve_or_explain(&log, &point)?;
        let st = log.status();
        if let Some(req) = args.require_seq {
            if info.seq.0 < req {
                bail!(
                    "planned failover: point {} is seq {}, but the source spooled up to seq {req}; \
                     the journal holds up to seq {} (newest consistent: {:?}): the drain did not finish",
                    args.point,
                    info.seq,
                    st.newest_seq,
                    st.last_consistent.as_ref().map(|p| p.seq.0)
                );
            }
        }
        let v = json!({
            "state": "folding",
            "seq": info.seq.0,
            "point": args.point,
            "kind": format!("{:?}", info.kind),
            "journal_newest_seq": st.newest_seq.0,
            "discarded_after_point": st.newest_seq.0.saturating_sub(info.seq.0),
            "planned_require_seq": args.require_seq,
            // The generation the promoted image starts (docs/failover.md, lineages).
            "generation": format!("{:016x}", crate::lineage::new_id()),
            "started_ms": status::now_ms(),
        });
        write_durable(dir, IN_PROGRESS, &v)?;
        v
    };
    let seq = record["seq"].as_u64().unwrap_or(0);
    let journal = dir.join("journal");
    let aside = dir.join(format!("journal.promoted-{seq}"));
    if journal.exists() {
        fold(dir, seq, args.block_size)?;
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
