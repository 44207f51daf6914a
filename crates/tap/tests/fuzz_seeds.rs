//! Writes the seed corpora of the `dmlog` and `intent_map` fuzz targets into
//! `fuzz/corpus/<target>/`. Ignored by default; regenerate with
//! `cargo test -p tidemark-tap --release --test fuzz_seeds -- --ignored`.
//!
//! The dm-log-writes seeds include small logs written by QEMU's blklogwrites driver through
//! `qemu-io` (kept when `qemu-io` is missing), synthetic kernel-style logs with marks,
//! discards and FUA, and damaged variants; the intent-map seeds are real map files after
//! marks, clears and a torn slot write, and damaged variants.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::{FLUSH, FUA, LogWriter, METADATA, have_qemu_io, pattern, qemu_io};
use tidemark_journal::{CrashMode, Dir, FileIo, MemDir, Seq};
use tidemark_tap::{IntentConfig, IntentMap};

fn corpus(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target);
    fs::create_dir_all(&dir).expect("corpus dir");
    dir
}

fn put(dir: &Path, name: &str, bytes: &[u8]) {
    fs::write(dir.join(name), bytes).expect("write seed");
}

#[test]
#[ignore = "writes the fuzz seed corpora into the repository"]
fn write_dmlog_seeds() {
    let dir = corpus("dmlog");

    if have_qemu_io("write_dmlog_seeds") {
        let tmp = tempfile::tempdir().expect("tempdir");
        let runs: [(&str, &str, &[&str]); 2] = [
            (
                "qemu-512",
                "",
                &[
                    "write -P 0xab 0 4k",
                    "flush",
                    "write -P 0xcd 8k 1k",
                    "write -z 16k 2k",
                    "discard 32k 4k",
                    "write -P 0xef -f 64k 512",
                ],
            ),
            ("qemu-4096", "log-sector-size=4096", &["write -P 0x11 8k 4k", "discard 64k 8k"]),
        ];
        for (name, opts, cmds) in runs {
            let (d, l) =
                (tmp.path().join(format!("{name}.d")), tmp.path().join(format!("{name}.l")));
            FileIo::create(&d, 1 << 20).expect("data image");
            fs::write(&l, b"").expect("log");
            qemu_io(&d, &l, opts, cmds);
            let log = fs::read(&l).expect("read log");
            assert!(log.len() < 32 << 10, "{name} seed stays small: {} bytes", log.len());
            put(&dir, name, &log);
            put(&dir, &format!("{name}-cut"), &log[..log.len() * 2 / 3]);
        }
    }

    let mut w = LogWriter::new(512);
    w.write(0, &pattern(1, 1024));
    w.write_flags(4096, &pattern(2, 512), METADATA);
    w.flush();
    w.write_flags(8192, &pattern(3, 512), FUA);
    w.write_flags(12288, &pattern(4, 512), FLUSH);
    w.discard(65536, 1 << 20);
    w.mark("fsync-done");
    w.raw(0, 0, FLUSH | FUA, 0, &[], &[]);
    let kernel = w.finish();
    put(&dir, "kernel-512", &kernel);
    put(&dir, "kernel-512-overcount", &w.finish_with(20));
    let mut bad_flags = kernel.clone();
    bad_flags[w.offsets[3] as usize + 16] = 0x40;
    put(&dir, "kernel-512-bad-flags", &bad_flags);
    let mut huge = kernel.clone();
    huge[w.offsets[0] as usize + 8..w.offsets[0] as usize + 16]
        .copy_from_slice(&(1u64 << 60).to_le_bytes());
    put(&dir, "kernel-512-huge-write", &huge);

    let mut w = LogWriter::new(512);
    w.discard(0, 1 << 62);
    w.mark("after-a-huge-discard");
    put(&dir, "kernel-512-huge-discard", &w.finish());

    let mut w = LogWriter::new(4096);
    w.write(1 << 20, &pattern(5, 4096));
    w.mark("dm-log-writes-end");
    w.raw(0, 0, 8, 5, &[b'a', 0x1f, b'b', 0xff, b'c'], &[]);
    put(&dir, "kernel-4096-marks", &w.finish());
}

#[test]
#[ignore = "writes the fuzz seed corpora into the repository"]
fn write_intent_map_seeds() {
    let dir = corpus("intent_map");
    const MAP: &str = "intent.map";
    let cfg = IntentConfig { region_bytes: 1 << 20, max_hot_regions: 8, max_runs: 16 };
    let volume = 256u64 << 20;
    let mem = MemDir::new();
    let (map, _) =
        IntentMap::open(mem.open(MAP, true).expect("file"), volume, cfg).expect("create");
    put(&dir, "fresh", &mem.read_file(MAP).expect("file"));

    map.mark(0, 3 << 20).expect("mark").record(Seq(1));
    map.mark(100 << 20, 1).expect("mark").record(Seq(2));
    let _ = map.mark_out_of_sync(200 << 20, 10 << 20).expect("mark");
    let before = mem.read_file(MAP).expect("file");
    put(&dir, "marked", &before);
    for r in 0..20u64 {
        let _ = map.mark_out_of_sync((r * 12) << 20, 1).expect("mark");
    }
    let after = mem.read_file(MAP).expect("file");
    put(&dir, "coalesced", &after);

    // A torn write: the first 100 bytes of the newest slot write landed, the rest did not.
    let slot = map.header().slot_offset((map.status().generation & 1) as u8) as usize;
    let mut torn = before.clone();
    torn[slot..slot + 100].copy_from_slice(&after[slot..slot + 100]);
    put(&dir, "torn-slot", &torn);

    let mut both = after.clone();
    both[map.header().slot_offset(0) as usize + 70] ^= 1;
    both[map.header().slot_offset(1) as usize + 20] ^= 1;
    put(&dir, "both-slots-damaged", &both);

    map.acknowledge(Seq(2));
    map.clear_clean().expect("clear");
    let crashed = mem.crash(CrashMode::LoseUnsynced);
    put(&dir, "cleared", &crashed.read_file(MAP).expect("file"));
    put(&dir, "header-only", &after[..4096]);
}

#[test]
#[ignore = "writes the fuzz seed corpora into the repository"]
fn write_grown_intent_map_seeds() {
    let dir = corpus("intent_map");
    const MAP: &str = "intent.map";
    let cfg = IntentConfig { region_bytes: 1 << 20, max_hot_regions: 8, max_runs: 16 };
    let mem = MemDir::new();
    let (map, _) =
        IntentMap::open(mem.open(MAP, true).expect("file"), 64 << 20, cfg).expect("create");
    map.mark(3 << 20, 4096).expect("mark").record(Seq(1));
    let before = mem.read_file(MAP).expect("file");
    // Grown by 40 MiB and a half region: the slot says the new size, the added regions
    // are out of sync.
    map.grow((104 << 20) + (512 << 10)).expect("grow");
    let after = mem.read_file(MAP).expect("file");
    put(&dir, "grown", &after);
    // The growth's slot write torn: the older slot (the old size) is what remains.
    let slot = map.header().slot_offset((map.status().generation & 1) as u8) as usize;
    let mut torn = before;
    torn[slot..slot + 50].copy_from_slice(&after[slot..slot + 50]);
    put(&dir, "grown-torn", &torn);
}
