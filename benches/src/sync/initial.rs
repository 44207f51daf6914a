//! Initial sync (step I) of an ext4 image into a blank replica, against a full copy.
//!
//! Ours: a tap over the image, [`Syncer::initial_sync`] with the
//! [`Ext4InUse`] view over a [`FileSource`] of the image (only the blocks the filesystem
//! allocated, all-zero blocks left out), shipped over TCP loopback with Noise/AES-256-GCM
//! and the shipper's defaults (zstd adaptive from level 1, dedupe on) into a retention log
//! over a blank (sparse) base; timed from the call until the target acknowledged
//! `ResyncEnd`. Reference: `dd bs=4M conv=fsync` of the whole image to a new file, which
//! moves every byte. The image's page cache is dropped before each.
//!
//! Then the replica is checked: materialized as of its latest point, its ext4 logical view
//! must equal the image's (Merkle comparison of the two views) and `e2fsck -fn` must find
//! it clean. A failed check fails the benchmark.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use tidemark_journal::{FileIo, RecoveryPoint, VolumeId};
use tidemark_sync::resync::{Ext4InUse, FileSource, MerkleTree, shape_for, verify_source};
use tidemark_sync::syncer::Syncer;

use super::ext4img::Image;
use super::rig::{Source, Target, Wire, paired_keys};
use super::{evict, timed};
use crate::figure::{Figure, Goal};
use crate::journal::size;
use crate::sys;

/// The ext4 logical view of an image file.
fn ext4_view(path: &Path) -> Result<Ext4InUse<FileSource>> {
    let src = FileSource::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ext4InUse::open(src).with_context(|| format!("reading the ext4 bitmaps of {}", path.display()))
}

/// Materializes the replica's latest state to `out`, then checks it against `image`.
fn check_replica(target: &Target, image: &Image, out: &Path) -> Result<()> {
    let file = FileIo::create(out, 0).with_context(|| format!("creating {}", out.display()))?;
    target.receiver.with_log(|log| -> Result<()> {
        ensure!(log.status().inconsistent.is_none(), "the replica is still inside a resync");
        let latest = log.resolve(&RecoveryPoint::Latest)?;
        log.materialize(&latest, VolumeId(0), &file, &mut |_, _| {})?;
        Ok(())
    })?;
    drop(file);
    let ours = MerkleTree::build(&ext4_view(&image.path)?, shape_for(image.len), 0)?;
    let diff = verify_source(&ours, &ext4_view(out)?, 0)?;
    ensure!(
        diff.is_empty(),
        "the replica's ext4 view differs from the image's in {} bytes, first {:?}",
        diff.differing_bytes(),
        diff.ranges.first()
    );
    sys::run_command(Command::new("e2fsck").arg("-fn").arg(out))
        .context("e2fsck -fn on the materialized replica")?;
    Ok(())
}

/// Runs the comparison in `dir` on `image`.
pub fn run(dir: &Path, image: &Image) -> Result<Vec<Figure>> {
    let rig = dir.join("initial");
    std::fs::create_dir_all(&rig)?;
    let base = rig.join("replica-base.img");
    FileIo::create(&base, image.len).with_context(|| format!("creating {}", base.display()))?;
    let (cs, ct) = paired_keys()?;
    let target = Target::start(&rig, &base, ct)?;
    let source = Source::start(&rig, &image.path, cs, Wire::defaults(), &target)?;
    source.connected()?;
    let view = ext4_view(&image.path)?;
    let used = view.used_blocks() * view.block_size();

    eprintln!("[sync] initial sync: ours");
    evict(&[&image.path])?;
    let before = source.shipper().status();
    let start = Instant::now();
    let syncer: Syncer = source.syncer();
    let report = syncer.initial_sync(&view, &[]).context("initial_sync")?;
    let after = source.caught_up()?;
    let took = start.elapsed();
    let wire = after.wire_bytes - before.wire_bytes;

    eprintln!("[sync] initial sync: dd");
    let copy = rig.join("dd-copy.img");
    evict(&[&image.path])?;
    let (dd, _) = timed(
        Command::new("dd")
            .arg(format!("if={}", image.path.display()))
            .arg(format!("of={}", copy.display()))
            .args(["bs=4M", "conv=fsync", "status=none"]),
    )?;
    std::fs::remove_file(&copy)?;

    eprintln!("[sync] initial sync: checking the replica (materialize, ext4 view, e2fsck)");
    check_replica(&target, image, &rig.join("materialized.img"))?;
    drop(source);
    drop(target);

    let note = format!(
        "{}; {} ({:.1}% of the image) in use by the filesystem, {} in the view's data extents, {} sent as data, \
         {} all-zero left out; Syncer::initial_sync over TCP loopback, Noise/AES-256-GCM, \
         zstd adaptive from 1, dedupe on, until the target acked ResyncEnd; image's page \
         cache dropped before each; replica verified after (ext4 view equal, e2fsck -fn clean)",
        image.describe,
        size(used),
        used as f64 * 100.0 / image.len as f64,
        size(report.differing_bytes),
        size(report.data_bytes),
        size(report.zero_bytes),
    );
    Ok(vec![
        Figure::new("initial sync of ext4 (20% full): bytes on the wire", wire as f64, "B")
            .compared(
                format!("a full copy: {} bytes", image.len),
                Some(wire as f64 / image.len as f64),
            )
            .goal(Goal::AtMost(0.3))
            .note(note),
        Figure::new("initial sync of ext4 (20% full): wall time", took.as_secs_f64(), "s")
            .compared(
                format!(
                    "dd bs=4M conv=fsync of the whole image to a new file: {:.2} s",
                    dd.as_secs_f64()
                ),
                Some(took.as_secs_f64() / dd.as_secs_f64()),
            ),
    ])
}
