//! Test helpers shared by the tap's integration tests: a synthetic dm-log-writes writer that
//! produces logs the way the kernel target does (marks, discards, FUA, FLUSH with data), and a
//! byte-level model of a device to compare replays against.
//!
//! The writer is written from the format description, not from the reader, so that the two
//! check each other.

#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
use std::process::Command;

/// dm-log-writes flag bits.
pub const FLUSH: u64 = 1 << 0;
pub const FUA: u64 = 1 << 1;
pub const DISCARD: u64 = 1 << 2;
pub const MARK: u64 = 1 << 3;
pub const METADATA: u64 = 1 << 4;

/// Builds a dm-log-writes log in memory.
#[derive(Debug, Clone)]
pub struct LogWriter {
    pub sector_size: u32,
    buf: Vec<u8>,
    entries: u64,
    /// Byte offset of each entry header.
    pub offsets: Vec<u64>,
}

impl LogWriter {
    pub fn new(sector_size: u32) -> Self {
        Self { sector_size, buf: vec![0; sector_size as usize], entries: 0, offsets: Vec::new() }
    }

    /// Appends an entry with full control over its fields. `inline` goes into the header
    /// sector after the 32-byte header; `payload` follows the header sector.
    pub fn raw(
        &mut self,
        sector: u64,
        nr_sectors: u64,
        flags: u64,
        data_len: u64,
        inline: &[u8],
        payload: &[u8],
    ) {
        let ss = self.sector_size as usize;
        let at = self.buf.len();
        self.offsets.push(at as u64);
        let mut head = vec![0u8; ss];
        head[0..8].copy_from_slice(&sector.to_le_bytes());
        head[8..16].copy_from_slice(&nr_sectors.to_le_bytes());
        head[16..24].copy_from_slice(&flags.to_le_bytes());
        head[24..32].copy_from_slice(&data_len.to_le_bytes());
        head[32..32 + inline.len()].copy_from_slice(inline);
        self.buf.extend_from_slice(&head);
        self.buf.extend_from_slice(payload);
        self.entries += 1;
    }

    fn sectors(&self, bytes: u64) -> u64 {
        assert_eq!(bytes % u64::from(self.sector_size), 0, "unaligned test input");
        bytes / u64::from(self.sector_size)
    }

    /// A write of `data` at byte `offset` with extra flags (FLUSH, FUA, METADATA).
    pub fn write_flags(&mut self, offset: u64, data: &[u8], flags: u64) {
        let sector = self.sectors(offset);
        let nr = self.sectors(data.len() as u64);
        self.raw(sector, nr, flags, 0, &[], data);
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        self.write_flags(offset, data, 0);
    }

    /// An empty flush (the kernel logs one after the writes it flushed).
    pub fn flush(&mut self) {
        self.raw(0, 0, FLUSH, 0, &[], &[]);
    }

    pub fn discard(&mut self, offset: u64, len: u64) {
        let sector = self.sectors(offset);
        let nr = self.sectors(len);
        self.raw(sector, nr, DISCARD, 0, &[], &[]);
    }

    /// A mark: its text in the header sector, `data_len` its length, no sectors.
    pub fn mark(&mut self, text: &str) {
        self.raw(0, 0, MARK, text.len() as u64, text.as_bytes(), &[]);
    }

    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// The log with a super block counting every entry.
    pub fn finish(&self) -> Vec<u8> {
        self.finish_with(self.entries)
    }

    /// The log with a super block counting `nr_entries`.
    pub fn finish_with(&self, nr_entries: u64) -> Vec<u8> {
        let mut out = self.buf.clone();
        out[0..8].copy_from_slice(&0x006a_7366_7773_6872u64.to_le_bytes());
        out[8..16].copy_from_slice(&1u64.to_le_bytes());
        out[16..24].copy_from_slice(&nr_entries.to_le_bytes());
        out[24..28].copy_from_slice(&self.sector_size.to_le_bytes());
        out
    }
}

/// A pattern that differs per byte and per seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_mul(131).wrapping_add(i as u64 * 7 + i as u64 / 512)) as u8)
        .collect()
}

/// True when `qemu-io` runs here; otherwise prints a loud SKIPPED line.
pub fn have_qemu_io(test: &str) -> bool {
    match Command::new("qemu-io").arg("--version").output() {
        Ok(out) if out.status.success() => true,
        _ => {
            // Straight to the stderr handle: the test harness captures `eprintln!`, and a
            // skip must be seen in a plain `cargo test` run.
            let _ = writeln!(
                std::io::stderr(),
                "\n==============================================================\n\
                 SKIPPED: qemu-io not installed ({test}); install Debian's qemu-utils\n\
                 =============================================================="
            );
            false
        }
    }
}

/// Runs qemu-io over a blklogwrites drive writing `data` and logging to `log`, with extra
/// driver options (e.g. `log-sector-size=4096`), running `cmds`.
pub fn qemu_io(data: &Path, log: &Path, extra_opts: &str, cmds: &[&str]) {
    let mut opts = format!(
        "driver=blklogwrites,file.driver=file,file.filename={},log.driver=file,log.filename={}",
        data.display(),
        log.display()
    );
    if !extra_opts.is_empty() {
        opts.push(',');
        opts.push_str(extra_opts);
    }
    let mut cmd = Command::new("qemu-io");
    cmd.arg("--image-opts").arg(&opts);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    let out = cmd.output().expect("run qemu-io");
    assert!(
        out.status.success(),
        "qemu-io failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
