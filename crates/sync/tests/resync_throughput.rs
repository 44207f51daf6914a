//! Throughput of `MerkleTree::build`: prints MB/s, asserts nothing about speed. Ignored by
//! default (it writes a 4 GiB file); run with
//! `cargo test --release -p tidemark-sync --test resync_throughput -- --ignored --nocapture`,
//! `TIDEMARK_RESYNC_BENCH_MIB` to change the size.

use std::io::Write;
use std::time::Instant;

use tidemark_sync::resync::{FileSource, MemSource, MerkleTree};
use tidemark_sync::wire::TreeShape;

fn size() -> u64 {
    std::env::var("TIDEMARK_RESYNC_BENCH_MIB").ok().and_then(|s| s.parse().ok()).unwrap_or(4096)
        << 20
}

/// CPU seconds this process has used (user + system), from /proc/self/stat (100 Hz ticks).
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    (f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()) as f64 / 100.0
}

fn report(what: &str, threads: usize, bytes: u64, t: Instant, cpu0: f64) {
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_secs() - cpu0;
    let line = format!(
        "resync build {what}: {threads} thread(s), {} MiB in {secs:.2} s = {:.0} MB/s wall, \
         {cpu:.2} CPU s = {:.0} MB per CPU-second",
        bytes >> 20,
        bytes as f64 / secs / 1e6,
        bytes as f64 / cpu / 1e6
    );
    let _ = writeln!(std::io::stderr(), "{line}");
}

#[test]
#[ignore = "writes a 4 GiB file; a measurement, run by hand"]
fn build_throughput_4_gib_file() {
    let len = size();
    let dir =
        tempfile::tempdir_in(std::env::var("TIDEMARK_BENCH_DIR").unwrap_or("/tmp".into())).unwrap();
    let path = dir.path().join("volume.img");
    {
        let mut f =
            std::io::BufWriter::with_capacity(4 << 20, std::fs::File::create(&path).unwrap());
        let mut chunk: Vec<u8> =
            (0..4u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        for i in 0..len >> 22 {
            chunk[..8].copy_from_slice(&i.to_le_bytes());
            f.write_all(&chunk).unwrap();
        }
        f.flush().unwrap();
    }
    let source = FileSource::open(&path).unwrap();
    let shape = TreeShape::default();
    let mut roots = Vec::new();
    for threads in [1, 2, 4] {
        let (t, cpu0) = (Instant::now(), cpu_secs());
        let tree = MerkleTree::build(&source, shape, threads).unwrap();
        report("file (page cache)", threads, len, t, cpu0);
        roots.push(tree.root());
    }
    assert!(roots.windows(2).all(|w| w[0] == w[1]));

    let mem = MemSource::new(std::fs::read(&path).unwrap());
    for threads in [1, 2] {
        let (t, cpu0) = (Instant::now(), cpu_secs());
        let tree = MerkleTree::build(&mem, shape, threads).unwrap();
        report("memory", threads, len, t, cpu0);
        assert_eq!(tree.root(), roots[0]);
    }
}
