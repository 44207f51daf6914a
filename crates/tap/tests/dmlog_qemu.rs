//! The dm-log-writes reader against real logs written by QEMU's `blklogwrites` driver through
//! `qemu-io` (Debian's qemu-utils): the layout the kernel-lab notes describe, replay onto a
//! fresh image identical to the image QEMU wrote, replay to the end of each `qemu-io` session
//! identical to the image after that session, and the sector unit with a 4 KiB log sector.
//!
//! Without `qemu-io` each test prints a loud "SKIPPED: qemu-io not installed" and passes; the
//! synthetic tests in `dmlog.rs` still run.

mod common;

use std::fs;
use std::path::Path;

use common::{have_qemu_io, qemu_io};
use rand::{Rng, SeedableRng};
use tidemark_journal::{BlockIo, Event, FileIo, VolumeId};
use tidemark_tap::dmlog::{DmLog, EntryFlags, ReplayPoint};

fn create(path: &Path, len: u64) {
    FileIo::create(path, len).expect("create image");
}

#[test]
fn qemu_log_layout_matches_the_kernel_lab_notes() {
    if !have_qemu_io("qemu_log_layout_matches_the_kernel_lab_notes") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (d, l) = (dir.path().join("d.img"), dir.path().join("l.img"));
    create(&d, 16 << 20);
    create(&l, 16 << 20);
    qemu_io(&d, &l, "", &["write -P 0xab 0 64k", "flush", "write -P 0xcd 1M 4k", "flush"]);

    let log_io = FileIo::open_read_only(&l).expect("open log");
    let log = DmLog::open(&log_io).expect("parse super");
    assert_eq!(log.super_block().sector_size, 512);
    let entries: Vec<_> = log.entries().collect::<Result<_, _>>().expect("entries");
    assert!(entries.len() >= 4, "{entries:?}");
    let summary: Vec<_> =
        entries[..4].iter().map(|e| (e.offset, e.sector, e.nr_sectors, e.flags.bits())).collect();
    assert_eq!(
        summary,
        vec![(0x200, 0, 128, 0), (0x10400, 0, 0, 1), (0x10600, 2048, 8, 0), (0x11800, 0, 0, 1)]
    );
    // Whatever follows is the flush qemu-io issues when it closes the drive.
    assert!(entries[4..].iter().all(|e| e.flags == EntryFlags::FLUSH && e.nr_sectors == 0));

    let got: Vec<_> = log.events(VolumeId(0)).collect::<Result<_, _>>().expect("events");
    assert!(
        matches!(&got[0], Event::Write { offset: 0, data, .. } if data.len() == 65536 && data.iter().all(|&b| b == 0xab))
    );
    assert_eq!(got[1], Event::Barrier);
    assert!(
        matches!(&got[2], Event::Write { offset: 0x100000, data, .. } if data.len() == 4096 && data.iter().all(|&b| b == 0xcd))
    );
    assert_eq!(got[3], Event::Barrier);

    let r = dir.path().join("r.img");
    create(&r, 16 << 20);
    let target = FileIo::open(&r).expect("open replay target");
    let report = log.replay_to(&ReplayPoint::End, &target).expect("replay");
    assert_eq!(report.bytes_written, (64 << 10) + (4 << 10));
    assert!(
        fs::read(&r).expect("read") == fs::read(&d).expect("read"),
        "replay differs from qemu's image"
    );
}

/// One `qemu-io` session of random commands (aligned writes with patterns, zero writes,
/// discards, FUA writes, flushes).
fn session(rng: &mut rand::rngs::StdRng, device: u64, n: usize) -> Vec<String> {
    let mut cmds = Vec::new();
    for _ in 0..n {
        let start = rng.gen_range(0..device / 4096) * 4096;
        let len = rng.gen_range(1..=((device - start) / 512).min(256)) * 512;
        let byte = rng.gen_range(1..=255u8);
        cmds.push(match rng.gen_range(0..10) {
            0..=4 => format!("write -P {byte:#x} {start} {len}"),
            5 => format!("write -z {start} {len}"),
            6 => format!("discard {start} {}", len.div_ceil(4096) * 4096),
            7 => format!("write -f -P {byte:#x} {start} {len}"),
            _ => "flush".to_owned(),
        });
    }
    cmds
}

#[test]
fn qemu_sessions_replay_identical_at_every_session_end() {
    if !have_qemu_io("qemu_sessions_replay_identical_at_every_session_end") {
        return;
    }
    let device = 4u64 << 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let (d, l) = (dir.path().join("d.img"), dir.path().join("l.img"));
    create(&d, device);
    fs::write(&l, b"").expect("empty log");
    let mut rng = rand::rngs::StdRng::seed_from_u64(455);

    // Each session appends to the log; after each, remember the image and the entry count.
    let mut checkpoints = Vec::new();
    for s in 0..5 {
        let cmds = session(&mut rng, device, 30);
        let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io(&d, &l, if s == 0 { "" } else { "log-append=on" }, &refs);
        let log_io = FileIo::open_read_only(&l).expect("open log");
        let nr = DmLog::open(&log_io).expect("parse").super_block().nr_entries;
        checkpoints.push((nr, fs::read(&d).expect("read image")));
    }

    let log_io = FileIo::open_read_only(&l).expect("open log");
    let log = DmLog::open(&log_io).expect("parse");
    let entries: Vec<_> = log.entries().collect::<Result<_, _>>().expect("entries");
    assert_eq!(entries.len() as u64, checkpoints.last().expect("sessions").0);
    assert!(entries.iter().any(|e| e.flags.contains(EntryFlags::DISCARD)), "the log has discards");
    assert!(
        entries.iter().all(|e| !e.flags.contains(EntryFlags::FUA)),
        "QEMU emulates FUA with a flush entry"
    );

    for (i, (nr, image)) in checkpoints.iter().enumerate() {
        // By entry count (xfstests --limit) ...
        let r = dir.path().join(format!("r{i}.img"));
        create(&r, device);
        let target = FileIo::open(&r).expect("open target");
        log.replay_to(&ReplayPoint::Entries(*nr), &target).expect("replay");
        assert!(fs::read(&r).expect("read") == *image, "session {i}: replay by entries differs");

        // ... and by flush point: each session ends with the flush of qemu-io's close.
        let flushes = entries[..*nr as usize].iter().filter(|e| e.is_flush_point()).count() as u64;
        assert!(entries[*nr as usize - 1].is_flush_point(), "session {i} ends with a flush");
        let r = dir.path().join(format!("f{i}.img"));
        create(&r, device);
        let target = FileIo::open(&r).expect("open target");
        let report = log.replay_to(&ReplayPoint::Flush(flushes), &target).expect("replay");
        assert_eq!(report.entries, *nr);
        assert!(fs::read(&r).expect("read") == *image, "session {i}: replay to flush differs");
    }

    // The capture events, applied to a byte model, give the same image.
    let mut model = vec![0u8; device as usize];
    for event in log.events(VolumeId(0)) {
        match event.expect("event") {
            Event::Write { offset, data, .. } => {
                model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            }
            Event::Discard { offset, len, .. } | Event::WriteZeroes { offset, len, .. } => {
                model[offset as usize..(offset + u64::from(len)) as usize].fill(0);
            }
            Event::Barrier
            | Event::Bookmark(_)
            | Event::ResyncBegin { .. }
            | Event::ResyncEnd { .. }
            | Event::Resize { .. } => {}
        }
    }
    assert!(model == checkpoints.last().expect("sessions").1, "events differ from qemu's image");
}

#[test]
fn qemu_log_sector_size_4096_counts_sectors_in_that_unit() {
    if !have_qemu_io("qemu_log_sector_size_4096_counts_sectors_in_that_unit") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (d, l) = (dir.path().join("d.img"), dir.path().join("l.img"));
    create(&d, 4 << 20);
    fs::write(&l, b"").expect("empty log");
    qemu_io(&d, &l, "log-sector-size=4096", &["write -P 0x11 1M 8k", "discard 2M 16k", "flush"]);
    let log_io = FileIo::open_read_only(&l).expect("open log");
    let log = DmLog::open(&log_io).expect("parse");
    assert_eq!(log.super_block().sector_size, 4096);
    let entries: Vec<_> = log.entries().collect::<Result<_, _>>().expect("entries");
    // 1 MiB / 4096 = 256 and 8 KiB / 4096 = 2: both fields count 4 KiB sectors, not 512.
    assert_eq!((entries[0].offset, entries[0].sector, entries[0].nr_sectors), (4096, 256, 2));
    assert_eq!(entries[0].device_offset(), 1 << 20);
    assert_eq!((entries[1].offset, entries[1].sector, entries[1].nr_sectors), (16384, 512, 4));
    assert_eq!(entries[1].flags, EntryFlags::DISCARD);
    assert_eq!(entries[2].offset, 16384 + 4096, "a discard has no data in the log");

    let r = dir.path().join("r.img");
    create(&r, 4 << 20);
    let target = FileIo::open(&r).expect("open target");
    log.replay_to(&ReplayPoint::End, &target).expect("replay");
    assert!(fs::read(&r).expect("read") == fs::read(&d).expect("read"));
    assert_eq!(target.len().expect("len"), 4 << 20);
}
