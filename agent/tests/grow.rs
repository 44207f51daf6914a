//! Disk growth end to end, as two processes on loopback through the FUSE + loop frontend:
//! the protected image is grown (data already in part of the new range, as a grown device
//! may hold, then `set_len`) while a writer keeps writing into the old range through the
//! loop device; `protect` follows it (resize in the stream, the loop device's capacity
//! re-read), the test writes into the new range through the loop device, and after
//! catch-up the replica equals the image byte for byte, a point from before the growth
//! still materializes at the old size with its old content, and the bytes the growth's
//! resync shipped are about the new range's non-zero content, not the whole volume or the
//! new range. Needs root, FUSE and loop devices; prints a SKIP line without them.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde_json::Value;

mod common;
use common::*;

const PAIR: &str = "6a0e0123456789abcdef0123456789cd";
const OLD: u64 = 64 << 20;
const NEW: u64 = 96 << 20;
/// Non-zero bytes the grown range holds before protect sees it.
const PRESENT: usize = 1 << 20;
const PRESENT_AT: u64 = OLD + (8 << 20);

fn p(root: &std::path::Path, rel: &str) -> String {
    root.join(rel).display().to_string()
}

fn device_size(dev: &str) -> u64 {
    run("blockdev", &["--getsize64", dev]).trim().parse().unwrap()
}

/// A receiver and a protect of a fresh `OLD`-byte image through FUSE + loop, past the
/// initial sync.
struct Pair {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    image: PathBuf,
    state: PathBuf,
    rx: Proc,
    px: Proc,
    dev: String,
    cleanup: Cleanup,
}

fn start_pair() -> Pair {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let mut cleanup = Cleanup::default();
    cleanup.root = root.clone();
    let keys = p(&root, "keys");
    tidemark(&["keygen", "--dir", &keys, "--name", "src"]);
    tidemark(&["keygen", "--dir", &keys, "--name", "dst"]);
    let image = root.join("volume.img");
    let f = std::fs::File::create(&image).unwrap();
    f.set_len(OLD).unwrap();
    f.write_all_at(&pattern(1, 256 << 10), 5 << 20).unwrap();
    f.sync_all().unwrap();
    let (rx_dir, size) = (p(&root, "rx"), OLD.to_string());
    let (dst_key, src_pub) = (p(&root, "keys/dst.key"), p(&root, "keys/src.pub"));
    let rx_args =
        ["--dir", &rx_dir, "--listen", "127.0.0.1:0", "--key", &dst_key, "--peer", &src_pub];
    let mut rx = Proc::spawn(
        "receive",
        &[&["receive"][..], &rx_args, &["--pair", PAIR, "--size", &size]].concat(),
    );
    let addr = rx.wait_line("listening:");
    let state = root.join("state");
    let (img, st, mnt) = (image.display().to_string(), p(&root, "state"), p(&root, "fuse"));
    let (src_key, dst_pub) = (p(&root, "keys/src.key"), p(&root, "keys/dst.pub"));
    let px_args = ["--image", &img, "--state", &st, "--target", &addr, "--mountpoint", &mnt];
    let mut px = Proc::spawn(
        "protect",
        &[&["protect"][..], &px_args, &["--key", &src_key, "--peer", &dst_pub, "--pair", PAIR]]
            .concat(),
    );
    let dev = px.wait_line("device:");
    cleanup.loops.push(dev.clone());
    cleanup.mounts.push(root.join("fuse"));
    assert_eq!(device_size(&dev), OLD);
    wait_status(&state, "the initial sync", |v| v["stage"] == "diff sync" && u(v, "/resyncs") >= 1);
    Pair { _tmp: tmp, root, image, state, rx, px, dev, cleanup }
}

#[test]
fn a_grown_volume_is_followed_without_a_full_copy() {
    require_env!("a_grown_volume_is_followed_without_a_full_copy");
    let Pair { _tmp, root, image, state, mut rx, mut px, dev, mut cleanup } = start_pair();

    // A point before the growth, with content of its own.
    let disk = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
    disk.write_all_at(&pattern(2, 64 << 10), 1 << 20).unwrap();
    disk.sync_all().unwrap();
    let st = wait_caught_up(&state);
    let before_seq = u(&st, "/tap/last_seq");
    let before_resyncs = u(&st, "/resyncs");
    assert_eq!(st["grow"]["grows"], 0);
    let before_wire = u(&st, "/shipper/raw_bytes");

    // A writer in the old range all along.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, written, dev) = (stop.clone(), written.clone(), dev.clone());
        std::thread::spawn(move || {
            let d = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let buf = pattern(100 + i, 16 << 10);
                d.write_all_at(&buf, (20 << 20) + (i % 64) * (16 << 10)).unwrap();
                d.sync_data().unwrap();
                written.fetch_add(buf.len() as u64, Ordering::SeqCst);
                i += 1;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        })
    };

    // The grown range already holds data (a device grown over used space), then the
    // image reaches its new size.
    let f = std::fs::OpenOptions::new().write(true).open(&image).unwrap();
    f.write_all_at(&pattern(3, PRESENT), PRESENT_AT).unwrap();
    f.set_len(NEW).unwrap();
    f.sync_all().unwrap();
    let st = wait_status(&state, "the growth followed", |v| {
        v["volume_bytes"] == NEW && v["grow"]["last"]["to_bytes"] == NEW
    });
    assert_eq!(st["grow"]["last"]["frontend_bytes"], NEW, "{st:#}");
    assert_eq!(device_size(&dev), NEW, "the loop device shows the new size");
    // Written through the loop device into the new range: captured like any write.
    disk.write_all_at(&pattern(4, 128 << 10), NEW - (128 << 10)).unwrap();
    disk.sync_all().unwrap();
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();

    // The resync of the grown range ran after the (last) resize, then everything is
    // acknowledged. (protect polls the size once a second: it may have seen the image
    // between the write into the new range and the final size, and grown twice.)
    let resize_seq = u(&st, "/grow/last/seq");
    wait_status(&state, "the resync of the grown range", |v| {
        u(v, "/resyncs") > before_resyncs
            && v["last_resync"]["end_seq"].as_u64().is_some_and(|e| e > resize_seq)
    });
    let st = wait_caught_up(&state);
    let copied = u(&st, "/last_resync/data_bytes");
    assert!(
        copied <= PRESENT as u64 + (1 << 20),
        "the growth's resync copied {copied} bytes for {PRESENT} non-zero bytes of new range: {st:#}"
    );
    if u(&st, "/grow/grows") == 1 {
        assert!(copied >= PRESENT as u64, "the grown range's data was not copied: {st:#}");
    }
    let shipped = u(&st, "/shipper/raw_bytes") - before_wire;
    let workload = written.load(Ordering::SeqCst) + (128 << 10);
    println!(
        "growth: {shipped} bytes shipped for {workload} bytes of writes and {PRESENT} bytes of grown content; the new range is {} bytes",
        NEW - OLD
    );
    assert!(shipped >= PRESENT as u64, "shipped {shipped} bytes: less than the grown content");
    assert!(
        shipped <= workload + PRESENT as u64 + (2 << 20),
        "shipped {shipped} bytes for {workload} bytes of writes and {PRESENT} of grown content"
    );
    assert!(shipped < (NEW - OLD) / 4, "shipped {shipped} bytes: that is a copy of the new range");

    drop(disk);
    px.terminate();
    cleanup.loops.clear();
    rx.terminate();
    // The replica equals the image byte for byte, at the new size.
    let latest = root.join("latest.img");
    tidemark(&["materialize", "--dir", &p(&root, "rx"), "--out", &latest.display().to_string()]);
    let (a, b) = (std::fs::read(&latest).unwrap(), std::fs::read(&image).unwrap());
    assert_eq!(a.len() as u64, NEW);
    assert!(
        a == b,
        "the replica differs from the image at byte {:?}",
        a.iter().zip(&b).position(|(x, y)| x != y)
    );
    // The point before the growth: the old size, the old content.
    let points: Value =
        serde_json::from_str(&tidemark(&["points", "--dir", &p(&root, "rx"), "--json"])).unwrap();
    let old_point = points["points"]
        .as_array()
        .unwrap()
        .iter()
        .rfind(|pt| pt["seq"].as_u64().unwrap() <= before_seq)
        .cloned()
        .expect("a point before the growth");
    assert_eq!(old_point["volume_bytes"], OLD, "{old_point:#}");
    let old_img: PathBuf = root.join("old.img");
    tidemark(&[
        "recover",
        "--dir",
        &p(&root, "rx"),
        "--point",
        &format!("seq:{}", old_point["seq"]),
        "--materialize",
        &old_img.display().to_string(),
    ]);
    let old = std::fs::read(&old_img).unwrap();
    assert_eq!(old.len() as u64, OLD, "the old point keeps its size");
    assert_eq!(&old[1 << 20..(1 << 20) + (64 << 10)], &pattern(2, 64 << 10)[..]);
    assert_eq!(&old[5 << 20..(5 << 20) + (256 << 10)], &pattern(1, 256 << 10)[..]);
}

#[test]
fn a_shrunken_volume_is_refused_by_name_and_nothing_is_resized() {
    require_env!("a_shrunken_volume_is_refused_by_name_and_nothing_is_resized");
    let Pair { _tmp, root: _, image, state, mut rx, mut px, dev, mut cleanup } = start_pair();
    let before = wait_caught_up(&state);
    let small = OLD - (4 << 20);
    let f = std::fs::OpenOptions::new().write(true).open(&image).unwrap();
    f.set_len(small).unwrap();
    let st = wait_status(&state, "the shrink refused", |v| v["grow"]["refused"].is_string());
    let text = st["grow"]["refused"].as_str().unwrap();
    assert!(
        text.contains(&image.display().to_string())
            && text.contains(&OLD.to_string())
            && text.contains(&small.to_string()),
        "the refusal names the volume and both sizes: {text}"
    );
    assert_eq!(st["volume_bytes"], OLD, "the protected size is kept");
    assert_eq!(u(&st, "/tap/last_seq"), u(&before, "/tap/last_seq"), "nothing was appended");
    assert_eq!(device_size(&dev), OLD, "the loop device keeps its size");
    let rx_status: Value =
        serde_json::from_str(&std::fs::read_to_string(p(_tmp.path(), "rx/status.json")).unwrap())
            .unwrap();
    assert_eq!(rx_status["replica"]["volume_bytes"], OLD, "{rx_status:#}");
    // Back to its size: the refusal clears and the pair goes on.
    f.set_len(OLD).unwrap();
    wait_status(&state, "the refusal cleared", |v| v["grow"]["refused"].is_null());
    let st = wait_caught_up(&state);
    assert_eq!(st["grow"]["grows"], 0);
    px.terminate();
    cleanup.loops.clear();
    rx.terminate();
}
