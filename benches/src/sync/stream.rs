//! Ship-and-apply throughput of a realistic write stream, and its bytes on the wire per
//! changed byte.
//!
//! The stream: the ext4 image's allocated blocks (its [`Ext4InUse`] data extents) in
//! offset order, cut into writes of up to 128 KiB, all-zero writes left out, a barrier
//! after every 8 MiB: what the kernel would write to fill a fresh device with that
//! filesystem. It is appended to a spool on disk first (and written to `stream.bin` for the
//! references), so the figure is the replication path alone: spool read, batch encode,
//! dedupe, zstd at a fixed level 1 (adaptive policy off, so the CLI reference runs the same
//! level), Noise/AES-256-GCM, TCP loopback, decryption, decompression, retention-log append
//! with group commit, ack. Timed from the shipper's start until the target acknowledged the
//! last event.
//!
//! References (warm page cache, like the spool just written): `cat stream.bin > /dev/null`
//! and `zstd -1 -T1 -c stream.bin > /dev/null` (one thread, as our encoder compresses a
//! batch on one thread), each after one untimed warm-up read.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use tidemark_journal::{Event, FileIo, VolumeId};
use tidemark_sync::resync::{BlockSource, Ext4InUse, FileSource};
use tidemark_sync::wire::Compression;

use super::ext4img::Image;
use super::rig::{Target, Wire, open_spool, paired_keys, start_shipper, wait_acked};
use super::{MIB, mib_per_s};
use crate::figure::{Figure, Goal};
use crate::journal::size;

/// Largest write of the stream.
const WRITE: u64 = 128 << 10;
/// A barrier after this many bytes of writes.
const BARRIER_EVERY: u64 = 8 * MIB;

/// Runs `cmd` with its output thrown away; its wall time.
fn timed_to_null(cmd: &mut Command) -> Result<Duration> {
    let start = Instant::now();
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("could not start {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(start.elapsed())
}

/// Appends the image's stream to the spool in `dir` and to `stream`; returns the spool
/// (synced) and the bytes of writes.
fn fill(dir: &Path, image: &Image, stream: &Path) -> Result<(tidemark_journal::Spool, u64)> {
    let view = Ext4InUse::open(FileSource::open(&image.path)?)?;
    let extents = view.data_extents(0..image.len)?;
    let img = File::open(&image.path)?;
    let mut out = File::create(stream).with_context(|| format!("creating {}", stream.display()))?;
    let mut spool = open_spool(dir)?;
    let (mut bytes, mut since_barrier) = (0u64, 0u64);
    let mut buf = vec![0u8; WRITE as usize];
    for r in extents {
        let mut at = r.start;
        while at < r.end {
            let n = (r.end - at).min(WRITE) as usize;
            let data = &mut buf[..n];
            img.read_exact_at(data, at).with_context(|| format!("reading {}", image.describe))?;
            if data.iter().any(|&b| b != 0) {
                out.write_all(data)?;
                let ev = Event::Write {
                    volume: VolumeId(0),
                    offset: at,
                    data: Bytes::copy_from_slice(data),
                };
                spool.append(&ev)?;
                bytes += n as u64;
                since_barrier += n as u64;
                if since_barrier >= BARRIER_EVERY {
                    spool.append(&Event::Barrier)?;
                    since_barrier = 0;
                }
            }
            at += n as u64;
        }
    }
    spool.append(&Event::Barrier)?;
    spool.sync()?;
    out.sync_all()?;
    Ok((spool, bytes))
}

/// Runs the measurement in `dir` on `image`.
pub fn run(dir: &Path, image: &Image) -> Result<Vec<Figure>> {
    let rig = dir.join("stream");
    std::fs::create_dir_all(&rig)?;
    let stream = rig.join("stream.bin");
    eprintln!("[sync] stream: filling the spool");
    let (spool, raw) = fill(&rig, image, &stream)?;
    let last = spool.last_seq();
    let spool = Arc::new(Mutex::new(spool));
    let base = rig.join("replica-base.img");
    FileIo::create(&base, image.len).with_context(|| format!("creating {}", base.display()))?;
    let (cs, ct) = paired_keys()?;
    let target = Target::start(&rig, &base, ct)?;
    let wire = Wire { compression: Compression::Zstd { level: 1 }, adaptive: false, dedupe: true };

    eprintln!("[sync] stream: shipping {}", size(raw));
    let start = Instant::now();
    let shipper = start_shipper(spool, image.len, cs, wire, &target)?;
    let status = wait_acked(&shipper, last);
    let took = start.elapsed();
    shipper.stop();
    let status = status?;
    let received = target.receiver.status();
    drop(target);

    eprintln!("[sync] stream: cat and zstd");
    let cat_cmd = || {
        let mut c = Command::new("cat");
        c.arg(&stream);
        c
    };
    timed_to_null(&mut cat_cmd())?;
    let cat = timed_to_null(&mut cat_cmd())?;
    let zstd = timed_to_null(Command::new("zstd").args(["-1", "-T1", "-q", "-c"]).arg(&stream))?;

    let ours = mib_per_s(raw, took);
    let (cat_rate, zstd_rate) = (mib_per_s(raw, cat), mib_per_s(raw, zstd));
    let per_changed = status.wire_bytes as f64 / raw as f64;
    let stream_note = format!(
        "{} of writes (the allocated blocks of an {}; writes of up to 128 KiB, all-zero ones \
         left out) spooled first, then spool -> shipper (zstd level 1 fixed, dedupe on) -> \
         Noise/AES-256-GCM -> TCP loopback -> receiver -> retention log on files; {:.2} s \
         until the last ack; {} batches, {} group commits on the target",
        size(raw),
        image.describe,
        took.as_secs_f64(),
        status.batches,
        received.syncs,
    );
    Ok(vec![
        Figure::new("ship and apply, zstd 1 + AES-GCM: throughput vs cat", ours, "MiB/s")
            .compared(
                format!("cat of the same bytes (one file) to /dev/null, warm cache: {cat_rate:.0} MiB/s"),
                Some(ours / cat_rate),
            )
            .note(stream_note),
        Figure::new("ship and apply, zstd 1 + AES-GCM: throughput vs zstd CLI", ours, "MiB/s")
            .compared(
                format!(
                    "zstd -1 -T1 -c of the same bytes to /dev/null, warm cache: {zstd_rate:.0} MiB/s"
                ),
                Some(ours / zstd_rate),
            ),
        Figure::new("bytes on the wire per changed byte (zstd 1, dedupe)", per_changed, "B/B")
            .compared(
                format!("{raw} changed bytes, {} bytes on the wire", status.wire_bytes),
                Some(per_changed),
            )
            .goal(Goal::AtMost(0.35))
            .note(format!(
                "the stream above; {} blocks sent as dedupe references ({} saved), \
                 {} deduped bytes applied by the target",
                status.blocks_deduped,
                size(status.dedupe_bytes_saved),
                size(received.deduped_bytes),
            )),
    ])
}
