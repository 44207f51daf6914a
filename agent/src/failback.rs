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
