//! `tidemark inspect DIR`: what a journal directory holds, read without changing it.

use std::path::Path;

use anyhow::Context;
use tidemark_journal::format::{self, Manifest};

pub fn run(dir: &Path) -> anyhow::Result<()> {
    let mpath = dir.join("MANIFEST");
    let bytes = std::fs::read(&mpath).with_context(|| format!("read {}", mpath.display()))?;
    let m = Manifest::decode(&bytes, "MANIFEST")?;
    println!("journal {}", dir.display());
    println!(
        "  role {:?}, encrypted {}, block size {}, base seq {}, thin horizon {}, last seq {}",
        m.role, m.encrypted, m.block_size, m.base_seq, m.thin_horizon, m.last_seq
    );
    for id in &m.segments {
        let name = format::segment_file_name(*id);
        let b = std::fs::read(dir.join(&name)).with_context(|| format!("read segment {name}"))?;
        match format::scan_segment(&b, &name) {
            Ok(scan) => {
                let first = scan.records.first().map(|r| r.header.seq.0);
                let last = scan.records.last().map(|r| r.header.seq.0);
                println!(
                    "  {name}: {} bytes, {} records, seq {:?}..={:?}, {} damaged stretches",
                    b.len(),
                    scan.records.len(),
                    first,
                    last,
                    scan.defects.len()
                );
                for d in scan.defects {
                    println!("    damaged at offset {} ({} bytes): {}", d.offset, d.len, d.reason);
                }
            }
            Err(e) => println!("  {name}: unreadable: {e}"),
        }
    }
    Ok(())
}
