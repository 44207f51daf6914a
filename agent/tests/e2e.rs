//! End-to-end tests of `tidemark protect` and `tidemark receive` as two processes on
//! loopback, through the FUSE + loop frontend: replication of an ext4 file system, and a
//! `kill -9` of `protect` in the middle of writes followed by a restart that resyncs only the
//! dirty regions. They need root, /dev/fuse, loop devices, mkfs.ext4 and e2fsck; without
//! them each test prints a SKIP line and returns.
//!
//! Synchronisation is on the processes' output (`listening:`, `device:`) and on their
//! status.json documents, polled.

use std::io::{BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;

mod common;
use common::*;

const PAIR: &str = "5eed0123456789abcdef0123456789ab";
const VOLUME: u64 = 256 << 20;

fn assert_same_file(a: &Path, b: &Path) {
    let (fa, fb) = (std::fs::File::open(a).unwrap(), std::fs::File::open(b).unwrap());
    let (la, lb) = (fa.metadata().unwrap().len(), fb.metadata().unwrap().len());
    assert_eq!(la, lb, "{} and {} differ in length", a.display(), b.display());
    let (mut ra, mut rb) = (BufReader::new(fa), BufReader::new(fb));
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut pos = 0u64;
    while pos < la {
        let n = ((la - pos) as usize).min(ba.len());
        ra.read_exact(&mut ba[..n]).unwrap();
        rb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap();
            panic!("{} and {} differ at byte {}", a.display(), b.display(), pos + i as u64);
        }
        pos += n as u64;
    }
}

/// Keys, directories and the two processes' command lines.
struct Setup {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    image: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let keys = root.join("keys").display().to_string();
        tidemark(&["keygen", "--dir", &keys, "--name", "src"]);
        tidemark(&["keygen", "--dir", &keys, "--name", "dst"]);
        let image = root.join("volume.img");
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(VOLUME).unwrap();
        // Data present before the protection starts: the initial sync must carry it.
        f.write_all_at(&pattern(7, 1 << 20), 200 << 20).unwrap();
        f.write_all_at(&pattern(8, 64 << 10), 3 << 20).unwrap();
        f.sync_all().unwrap();
        Setup { _tmp: tmp, root, image }
    }

    fn p(&self, rel: &str) -> String {
        self.root.join(rel).display().to_string()
    }

    fn receive(&self) -> (Proc, String) {
        let size = VOLUME.to_string();
        let mut rx = Proc::spawn(
            "receive",
            &[
                "receive",
                "--dir",
                &self.p("rx"),
                "--listen",
                "127.0.0.1:0",
                "--key",
                &self.p("keys/dst.key"),
                "--peer",
                &self.p("keys/src.pub"),
                "--pair",
                PAIR,
                "--size",
                &size,
            ],
        );
        let addr = rx.wait_line("listening:");
        (rx, addr)
    }

    fn protect(&self, addr: &str) -> (Proc, String) {
        let mut px = Proc::spawn(
            "protect",
            &[
                "protect",
                "--image",
                &self.p("volume.img"),
                "--state",
                &self.p("state"),
                "--target",
                addr,
                "--key",
                &self.p("keys/src.key"),
                "--peer",
                &self.p("keys/dst.pub"),
                "--pair",
                PAIR,
                "--mountpoint",
                &self.p("fuse"),
                // 8 regions of 4 MiB: a crash costs at most 32 MiB of resync.
                "--max-hot-regions",
                "8",
            ],
        );
        let dev = px.wait_line("device:");
        assert!(dev.starts_with("/dev/loop"), "device line {dev:?}");
        (px, dev)
    }

    fn state(&self) -> PathBuf {
        self.root.join("state")
    }

    /// Stops nothing: materializes the latest point of the (stopped) receiver's replica
    /// and compares it with the protected image byte for byte.
    fn check_replica(&self) -> PathBuf {
        let out = self.root.join("replica-latest.img");
        tidemark(&["materialize", "--dir", &self.p("rx"), "--out", &out.display().to_string()]);
        assert_same_file(&out, &self.image);
        out
    }
}

#[test]
fn ext4_replicated_through_fuse_frontend() {
    require_env!("ext4_replicated_through_fuse_frontend");
    let s = Setup::new();
    let mut cleanup = Cleanup::default();
    let (mut rx, addr) = s.receive();
    let (mut px, dev) = s.protect(&addr);
    cleanup.loops.push(dev.clone());
    cleanup.mounts.push(s.root.join("fuse"));

    // The initial sync carried the data already in the image.
    let st = wait_status(&s.state(), "the initial sync", |v| {
        v["stage"] == "diff sync" && u(v, "/resyncs") >= 1
    });
    assert_eq!(st["fresh"], true);
    assert!(
        u(&st, "/last_resync/data_bytes") >= (1 << 20) + (64 << 10),
        "step I copied less than the pre-existing data: {st:#}"
    );

    run("mkfs.ext4", &["-q", "-F", "-E", "nodiscard", "-b", "4096", &dev]);
    let mnt = s.root.join("ext4");
    std::fs::create_dir_all(&mnt).unwrap();
    run("mount", &[&dev, &mnt.display().to_string()]);
    cleanup.mounts.push(mnt.clone());
    for i in 0..6u64 {
        let dir = mnt.join(format!("dir{}", i % 2));
        std::fs::create_dir_all(&dir).unwrap();
        let mut f = std::fs::File::create(dir.join(format!("file{i}"))).unwrap();
        f.write_all(&pattern(100 + i, (1 << 20) + (i as usize) * 4096 + 17)).unwrap();
        f.sync_all().unwrap();
    }
    std::fs::write(mnt.join("notes.txt"), b"tidemark end-to-end\n").unwrap();
    run("sync", &[]);
    run("umount", &[&mnt.display().to_string()]);
    cleanup.mounts.pop();

    let st = wait_caught_up(&s.state());
    assert!(u(&st, "/tap/writes") > 0, "no write reached the tap: {st:#}");
    px.terminate();
    cleanup.loops.clear();
    rx.terminate();
    let rx_status: Value =
        serde_json::from_str(&std::fs::read_to_string(s.root.join("rx/status.json")).unwrap())
            .unwrap();
    assert_eq!(rx_status["replica"]["consistent"], true, "{rx_status:#}");
    assert_eq!(rx_status["state"], "stopped");

    let replica = s.check_replica();
    let fsck = Command::new("e2fsck").args(["-fn"]).arg(&replica).output().unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck -fn on the replica: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
}

#[test]
fn kill_9_during_writes_resyncs_only_dirty_regions() {
    require_env!("kill_9_during_writes_resyncs_only_dirty_regions");
    let s = Setup::new();
    let mut cleanup = Cleanup::default();
    let (mut rx, addr) = s.receive();
    let (mut px, dev) = s.protect(&addr);
    cleanup.loops.push(dev.clone());
    cleanup.mounts.push(s.root.join("fuse"));
    wait_status(&s.state(), "the initial sync", |v| {
        v["stage"] == "diff sync" && u(v, "/resyncs") >= 1
    });

    // A writer on the loop device over two 8 MiB stretches, until protect dies under it.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, written, dev) = (stop.clone(), written.clone(), dev.clone());
        std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let off = if i % 2 == 0 { 40 << 20 } else { 150 << 20 } + (i * 65536) % (8 << 20);
                if f.write_all_at(&pattern(1000 + i, 65536), off).is_err() || f.sync_data().is_err()
                {
                    break;
                }
                written.fetch_add(1, Ordering::SeqCst);
                i += 1;
            }
        })
    };
    // Kill once the tap has seen writes and the writer is still going.
    wait_status(&s.state(), "writes captured", |v| u(v, "/tap/writes") >= 32);
    let before = written.load(Ordering::SeqCst);
    while written.load(Ordering::SeqCst) < before + 8 {
        assert!(!writer.is_finished(), "the writer stopped before the crash");
        std::thread::sleep(Duration::from_millis(5));
    }
    px.crash();
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    // What the dead frontend leaves: a loop device over a file on a dead FUSE mount (the
    // loop device may already be gone: it autoclears once its last opener closed it).
    let _ = Command::new("losetup").args(["-d", &dev]).stderr(Stdio::null()).status();
    cleanup.loops.clear();
    let _ = Command::new("umount").arg("-l").arg(s.root.join("fuse")).status();

    // Restart on the same state: the intent map's dirty regions are resynced, not the
    // whole volume.
    let (mut px, dev) = s.protect(&addr);
    cleanup.loops.push(dev);
    // (The killed process's last status.json is still there until the new one writes.)
    let pid = px.pid();
    let st = wait_status(&s.state(), "the resync after the crash", |v| {
        v["pid"] == pid && v["stage"] == "diff sync" && u(v, "/resyncs") >= 1
    });
    assert_eq!(st["fresh"], false, "{st:#}");
    let compared = u(&st, "/last_resync/compared_bytes");
    let bound = u(&st, "/tap/resync_bound_bytes");
    let dirty = u(&st, "/tap/dirty_bytes_at_open");
    assert!(dirty > 0, "the crash left no dirty region: {st:#}");
    assert!(compared > 0, "no resync ran: {st:#}");
    assert!(compared <= bound, "resync compared {compared} bytes, above the bound {bound}");
    assert!(compared < VOLUME, "resync compared the whole volume: {st:#}");
    assert!(compared >= dirty, "resync compared {compared} bytes, less than the dirty {dirty}");
    eprintln!(
        "resync after kill -9: {compared} bytes compared of {VOLUME} (dirty at open {dirty}, bound {bound}), {} differing",
        u(&st, "/last_resync/differing_bytes")
    );
    wait_caught_up(&s.state());
    px.terminate();
    cleanup.loops.clear();
    rx.terminate();
    s.check_replica();
}
