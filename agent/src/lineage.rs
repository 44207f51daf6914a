//! The agent's side of lineages (`tidemark_sync::lineage`, `docs/failover.md` "Lineages"):
//! where each command keeps its side's lineage file and when it changes it.
//!
//! - `protect` keeps `STATE/lineage`. A new state directory takes the lineage of the image
//!   when the image is a promoted replica (`promoted.json` and `lineage` beside it), else
//!   starts a new root generation. While it runs the file is unsealed; a clean stop seals
//!   it with the last seq spooled and the image's fingerprint.
//! - `promote` appends a child generation branching at the promoted seq (`DIR/lineage`),
//!   marked dirty: the image is used live from then on, around any tap.
//! - `receive` keeps `DIR/lineage` (adopted from its sources); a failback target
//!   (`--replica --old-state`) starts from the old state's lineage, with the old spool's last
//!   seq as its head, dirty unless the old `protect` stopped cleanly and the image still has
//!   the fingerprint it sealed.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{Value, json};
use tidemark_journal::Seq;
use tidemark_sync::lineage::{self, FILE_NAME, GenId, LineageFile, image_fingerprint};
use tidemark_sync::wire::LineageInfo;

/// `DIR/lineage`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// Where `protect`'s lineage came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// STATE's own file: a protection resumed.
    Resumed,
    /// The promoted image's directory: a new protection of a promoted replica (a failback,
    /// or a new target for it).
    Promoted,
    /// A new root generation.
    New,
}

/// The lineage `protect` runs with: STATE's file, or the promoted image's, or a new root;
/// stored (unsealed: `protect` is running) before it returns. The flag says whether the
/// image may hold writes past the file's head (no clean stop sealed it, or it changed since).
pub fn for_protect(state: &Path, image: &Path) -> anyhow::Result<(LineageFile, bool, Origin)> {
    let own = path(state);
    let (mut file, dirty, origin) = match LineageFile::load(&own)? {
        Some(f) => {
            let changed = f.seal.is_none_or(|s| image_fingerprint(image) != Some(s));
            let dirty = f.dirty || changed;
            (f, dirty, Origin::Resumed)
        }
        None => match promoted_lineage(image)? {
            Some(f) => (f, true, Origin::Promoted),
            None => (LineageFile::new_root(), false, Origin::New),
        },
    };
    let from = match origin {
        Origin::Resumed => "resumed",
        Origin::Promoted => "taken from the promoted image's directory",
        Origin::New => "new",
    };
    file.seal = None;
    file.dirty = dirty;
    file.store(&own)?;
    println!(
        "lineage: generation {} ({from}; {} in the chain)",
        current(&file),
        file.generations.len()
    );
    Ok((file, dirty, origin))
}

/// The lineage of `image` when it is the `replica.img` of a promoted `receive` directory.
fn promoted_lineage(image: &Path) -> anyhow::Result<Option<LineageFile>> {
    let Some(dir) = image.parent() else { return Ok(None) };
    if !dir.join(crate::promote::DONE).exists() {
        return Ok(None);
    }
    Ok(LineageFile::load(&path(dir))?)
}

/// What `protect` sends in each opening exchange.
pub fn wire(file: &LineageFile, dirty: bool, source_wins: bool, full_resync: bool) -> LineageInfo {
    LineageInfo { source_wins, full_resync, ..file.info(Seq::ZERO, dirty) }
}

/// A clean stop of `protect`: the image holds its generation up to `last_seq` and nothing
/// else; the seal records its fingerprint so a later write around the tap is seen.
pub fn seal(
    state: &Path,
    image: &Path,
    mut file: LineageFile,
    last_seq: Seq,
) -> anyhow::Result<()> {
    file.head = last_seq;
    file.dirty = false;
    file.seal = image_fingerprint(image);
    file.store(&path(state))?;
    Ok(())
}

/// `promote`: the promoted image starts generation `id`, a child of the journal's,
/// branching at `seq`. Idempotent (a resumed promotion finds it done).
pub fn branch(dir: &Path, id: u64, seq: Seq) -> anyhow::Result<()> {
    let p = path(dir);
    let mut file = match LineageFile::load(&p)? {
        Some(f) => f,
        None => {
            // A receive directory from before lineages: its history's root is unknown, so
            // no old source will match it (a conflict asks the operator).
            println!("lineage: {} had none; starting one", dir.display());
            LineageFile::new_root()
        }
    };
    if file.generations.last().map(|g| g.id) != Some(id) {
        file.branch(id, seq);
    }
    file.head = Seq::ZERO;
    file.dirty = true;
    file.seal = None;
    file.store(&p)?;
    println!("lineage: generation {} branched at seq {seq}", GenId(id));
    Ok(())
}

/// A new generation id for a promotion, as promote.json keeps it.
pub fn new_id() -> u64 {
    lineage::new_generation_id()
}

/// `receive --replica IMAGE --old-state STATE`: on the first run, the target's lineage is
/// the old `protect`'s, with its head at least `old_last_seq` (its spool's last seq), dirty
/// unless that `protect` stopped cleanly and IMAGE is as it sealed it.
pub fn for_failback_target(
    dir: &Path,
    state: &Path,
    image: &Path,
    old_last_seq: u64,
) -> anyhow::Result<()> {
    let own = path(dir);
    if own.exists() {
        return Ok(());
    }
    let Some(old) = LineageFile::load(&path(state))? else {
        println!(
            "lineage: --old-state {} has none (a protect from before lineages): only its spool is checked",
            state.display()
        );
        return Ok(());
    };
    let fingerprint = image_fingerprint(image);
    let unchanged = old.seal.is_some() && old.seal == fingerprint;
    let file = LineageFile {
        head: old.head.max(Seq(old_last_seq)),
        dirty: old.dirty || !unchanged,
        seal: None,
        generations: old.generations,
    };
    file.store(&own)
        .with_context(|| format!("record the failback target's lineage in {}", own.display()))?;
    println!(
        "lineage: generation {} up to seq {}{}",
        current(&file),
        file.head,
        if file.dirty {
            " (the image may hold writes no seq counts: no clean stop sealed it, or it changed since)"
        } else {
            ""
        }
    );
    Ok(())
}

fn current(file: &LineageFile) -> GenId {
    GenId(file.generations.last().map_or(0, |g| g.id))
}

/// The lineage of a directory for status.json: the chain (hex ids, branch seqs), or null.
pub fn status_json(dir: &Path) -> Value {
    match LineageFile::load(&path(dir)) {
        Ok(Some(f)) => json!({
            "generation": current(&f).to_string(),
            "chain": f.generations.iter().map(|g| json!({
                "id": GenId(g.id).to_string(),
                "parent": GenId(g.parent).to_string(),
                "branch_seq": g.branch_seq.0,
            })).collect::<Vec<_>>(),
            "head": f.head.0,
            "dirty": f.dirty,
            "sealed": f.seal.is_some(),
        }),
        Ok(None) => Value::Null,
        Err(e) => json!({ "error": e.to_string() }),
    }
}
