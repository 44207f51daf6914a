//! `tidemark materialize`: writes a point of a `receive` directory's replica (by default
//! the latest consistent one) to a file. Run it while `receive` is stopped: it opens the
//! retention log itself.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tidemark_journal::{
    BlockIo, FileIo, FsDir, RecoveryPoint, RetentionConfig, RetentionLog, SystemClock, VolumeId,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The directory of `tidemark receive` (replica.img, journal/).
    #[arg(long)]
    dir: PathBuf,
    /// The file to write (created or overwritten, sized to the volume).
    #[arg(long)]
    out: PathBuf,
    /// Block size of the journal's index (as given to `receive`).
    #[arg(long, default_value_t = 4096)]
    block_size: u32,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let image = args.dir.join("replica.img");
    let base = FileIo::open(&image).with_context(|| format!("open {}", image.display()))?;
    let cfg = RetentionConfig { block_size: args.block_size, ..Default::default() };
    let (log, _) = RetentionLog::open(
        Arc::new(FsDir::new(args.dir.join("journal"))?),
        vec![Arc::new(base) as Arc<dyn BlockIo>],
        cfg,
        Arc::new(SystemClock),
    )
    .context("open the retention log")?;
    let point = log.resolve(&RecoveryPoint::Latest).context("resolve the latest point")?;
    let out =
        FileIo::create(&args.out, 0).with_context(|| format!("create {}", args.out.display()))?;
    let bar = crate::common::byte_bar("materialize", log.volume_len(VolumeId(0))?);
    let report = log.materialize(&point, VolumeId(0), &out, &mut |done, total| {
        if let Some(b) = &bar {
            b.set_length(total);
            b.set_position(done);
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    println!(
        "materialized seq {} to {}: {} bytes, {} blocks from the journal, blake3 {} ({})",
        point.seq,
        args.out.display(),
        report.bytes,
        report.journal_blocks,
        blake3::Hash::from(report.hash).to_hex(),
        if report.direct_io { "direct I/O" } else { "through the page cache" }
    );
    Ok(())
}
