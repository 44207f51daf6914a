//! Failback: protection in reverse, from the promoted DR side back to the original site,
//! whose volume image still holds what it had when it failed over.
//!
//! - At the original site, `tidemark receive --replica PATH` takes the existing image as the
//!   replica's base instead of a blank `DIR/replica.img` (a symlink `DIR/replica.img` ->
//!   PATH is made, so `points`, `materialize` and `promote` find it).
//! - At the DR side, `tidemark protect --image DIR/replica.img --failback` marks the whole
//!   volume out of sync before the pair controller starts, so the first job is a fast resync
//!   (Merkle comparison of the whole volume, `docs/resync.md`) that moves only the blocks
//!   that differ, never a step I copy of every data extent (which assumes a blank replica
//!   and would be wrong over an existing image: it leaves zero blocks out).
//!
//! Then diff sync; the way back is a planned failover (`protect` stopped, `promote
//! --require-seq` at the original site).

use std::path::Path;

use anyhow::{Context, bail};
use tidemark_tap::Tap;

/// `protect --failback`: the whole volume out of sync, durably in the intent map.
pub fn mark_whole_volume(tap: &Tap, vol_len: u64) -> anyhow::Result<()> {
    let intent = tap
        .intent()
        .mark_out_of_sync(0, vol_len)
        .context("failback: mark the whole volume out of sync in the write-intent map")?;
    // Dropped unresolved: the regions stay out of sync until a resync copies them.
    drop(intent);
    Ok(())
}

/// `receive --replica PATH`: links `DIR/replica.img` to the existing image PATH (or checks
/// that it already does).
pub fn link_replica(dir: &Path, existing: &Path) -> anyhow::Result<()> {
    let link = dir.join("replica.img");
    let target = std::fs::canonicalize(existing)
        .with_context(|| format!("--replica {}: not found", existing.display()))?;
    match std::fs::read_link(&link) {
        Ok(t) if std::fs::canonicalize(&t).ok().as_deref() == Some(target.as_path()) => Ok(()),
        Ok(t) => bail!(
            "{} links to {}, not to --replica {}",
            link.display(),
            t.display(),
            existing.display()
        ),
        Err(_) if link.exists() => bail!(
            "{} exists and is not a link to --replica {}: use another --dir",
            link.display(),
            existing.display()
        ),
        Err(_) => std::os::unix::fs::symlink(&target, &link)
            .with_context(|| format!("link {} to {}", link.display(), target.display())),
    }
}

/// What the original site's old protection state says it had when it failed over: the
/// sequence numbers its spool holds that the DR side never acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OldState {
    /// Every event up to it was acknowledged by the DR side.
    pub acked: u64,
    /// The last event captured here.
    pub last_seq: u64,
}

/// `receive --replica PATH --old-state STATE`: opens the old `protect` state directory's
/// spool (that `protect` must be stopped) and refuses a failback over writes the DR side
/// never received (split brain: both sides took writes after the branch) unless the
/// operator chose the DR side (`--discard-local-changes`). Never merges.
pub fn check_old_state(state: &Path, discard_local: bool) -> anyhow::Result<OldState> {
    use std::sync::Arc;
    use tidemark_journal::{FsDir, Spool, SpoolConfig, SystemClock};
    let spool_dir = state.join("spool");
    if !spool_dir.is_dir() {
        bail!(
            "--old-state {}: no spool/ there; expected the state directory of the `protect` \
             that ran on this volume before the failover",
            state.display()
        );
    }
    let (spool, _) = Spool::open(
        Arc::new(FsDir::new(&spool_dir)?),
        SpoolConfig { capacity_bytes: u64::MAX, segment_bytes: 16 << 20, key: None },
        Arc::new(SystemClock),
    )
    .with_context(|| format!("open the old spool in {}", spool_dir.display()))?;
    let old = OldState { acked: spool.acked().0, last_seq: spool.last_seq().0 };
    drop(spool);
    if old.last_seq > old.acked && !discard_local {
        bail!(
            "split brain: this site captured events up to seq {} after the DR side last \
             acknowledged seq {} ({} events it never received), and the DR side took writes \
             since its promotion. Refusing to merge. Choose the winner: the DR side \
             (restart with --discard-local-changes: a fast resync overwrites this site's \
             later writes), or this site (stop, and protect this volume to the DR side \
             instead: `protect --failback` here, `receive --replica` there)",
            old.last_seq,
            old.acked,
            old.last_seq - old.acked
        );
    }
    if old.last_seq > old.acked {
        println!(
            "split brain resolved for the DR side: events {}..={} of this site are discarded",
            old.acked + 1,
            old.last_seq
        );
    }
    Ok(old)
}
