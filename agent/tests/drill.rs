//! A disaster-recovery drill while replication runs: `protect` and `receive` as two
//! processes (FUSE + loop frontend, ext4), a filesystem bookmark (`tidemark bookmark
//! --freeze`: FIFREEZE, bookmark, FITHAW) taken while a workload writes on the mounted
//! source, then, while the workload goes on, `tidemark recover --expose rw` of that
//! bookmark is fscked, mounted, written to, unmounted, fscked again and
//! thrown away; a read-only snapshot is mounted with `--mountpoint` and refuses writes.
//! Afterwards the point reads back exactly as before (same BLAKE3), the target acknowledged
//! more during the drill, and the replica equals the source. Needs root, /dev/fuse, loop
//! devices and e2fsprogs; without them it prints a SKIP line and returns.
//!
//! Synchronisation is on the processes' output lines and status.json, polled with a
//! generous deadline; nothing waits on timing.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;
use common::*;

const PAIR: &str = "d0111234567890abcdef0123456789ab";
const VOLUME: u64 = 128 << 20;

/// One request on the receiver's control socket.
fn control(socket: &Path, req: Value) -> Value {
    let mut s = UnixStream::connect(socket).expect("connect to the control socket");
    let mut line = req.to_string();
    line.push('\n');
    s.write_all(line.as_bytes()).unwrap();
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).expect("control answer is JSON")
}

/// `recover --materialize` of `point`; returns the printed hash.
fn materialize(rx: &str, point: &str, out: &Path) -> String {
    let text = run(
        BIN,
        &["recover", "--dir", rx, "--point", point, "--materialize", &out.display().to_string()],
    );
    assert!(text.contains("verified:"), "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix("blake3: "))
        .unwrap_or_else(|| panic!("no blake3 line: {text}"))
        .to_owned()
}

fn file_hash(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().to_hex().to_string()
}

#[test]
fn dr_drill_on_a_read_write_snapshot_while_replication_runs() {
    if let Some(why) = missing_requirement() {
        let _ = writeln!(
            std::io::stderr(),
            "SKIP dr_drill_on_a_read_write_snapshot_while_replication_runs: {why}: this end-to-end test needs root, FUSE, loop devices and e2fsprogs"
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let p = |rel: &str| root.join(rel).display().to_string();
    let mut cleanup = Cleanup { root: root.clone(), mounts: Vec::new(), loops: Vec::new() };
    run(BIN, &["keygen", "--dir", &p("keys"), "--name", "src"]);
    run(BIN, &["keygen", "--dir", &p("keys"), "--name", "dst"]);
    let image = root.join("volume.img");
    std::fs::File::create(&image).unwrap().set_len(VOLUME).unwrap();
    let size = VOLUME.to_string();
    let rx_dir = p("rx");
    let mut rx = Proc::spawn(
        "receive",
        &[
            "receive",
            "--dir",
            &rx_dir,
            "--listen",
            "127.0.0.1:0",
            "--key",
            &p("keys/dst.key"),
            "--peer",
            &p("keys/src.pub"),
            "--pair",
            PAIR,
            "--size",
            &size,
        ],
    );
    let socket = PathBuf::from(rx.wait_line("control:"));
    let addr = rx.wait_line("listening:");
    let mut px = Proc::spawn(
        "protect",
        &[
            "protect",
            "--image",
            &p("volume.img"),
            "--state",
            &p("state"),
            "--target",
            &addr,
            "--key",
            &p("keys/src.key"),
            "--peer",
            &p("keys/dst.pub"),
            "--pair",
            PAIR,
            "--mountpoint",
            &p("fuse"),
        ],
    );
    let dev = px.wait_line("device:");
    cleanup.mounts.push(root.join("fuse"));
    let state = root.join("state");
    wait_status(&state, "the initial sync", |v| v["stage"] == "diff sync" && u(v, "/resyncs") >= 1);

    // An ext4 with known files, mounted on the source.
    run("mkfs.ext4", &["-q", "-F", "-E", "nodiscard", "-b", "4096", &dev]);
    let src_mnt = root.join("src-mnt");
    std::fs::create_dir_all(&src_mnt).unwrap();
    let src_m = src_mnt.display().to_string();
    run("mount", &[&dev, &src_m]);
    cleanup.mounts.push(src_mnt.clone());
    for i in 0..4u64 {
        std::fs::write(src_mnt.join(format!("file{i}")), pattern(10 + i, 300_000)).unwrap();
    }
    run("sync", &[]);

    // The workload: files written and fsynced on the source until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, rounds, dir) = (stop.clone(), rounds.clone(), src_mnt.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let f = std::fs::File::create(dir.join(format!("load{}", i % 16))).unwrap();
                f.write_all_at(&pattern(1000 + i, 256 << 10), 0).unwrap();
                f.sync_all().unwrap();
                rounds.fetch_add(1, Ordering::SeqCst);
                i += 1;
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while rounds.load(Ordering::SeqCst) < 3 {
        assert!(Instant::now() < deadline, "the workload made no progress");
        std::thread::sleep(Duration::from_millis(10));
    }

    // The point: a filesystem bookmark taken while the workload writes (FIFREEZE, bookmark,
    // FITHAW), so the ext4 at it is consistent though it was mounted and busy.
    let state_s = state.display().to_string();
    let mark = run(
        BIN,
        &["bookmark", "drill-point", "--state", &state_s, "--freeze", &src_m, "--wait", "--json"],
    );
    let mark: Value = serde_json::from_str(&mark).expect("bookmark --json");
    assert_eq!(mark["kind"], "filesystem", "{mark:#}");
    let seq = u(&mark, "/seq");
    let points: Value = serde_json::from_str(&run(BIN, &["points", "--dir", &rx_dir, "--json"]))
        .expect("points --json");
    assert!(
        points["points"].as_array().unwrap().iter().any(|p| p["kind"] == "bookmark"
            && p["bookmark"] == "drill-point"
            && u(p, "/seq") == seq),
        "the bookmark is not a point of the target: {points:#}"
    );
    let point = "bookmark:drill-point".to_owned();
    let before = materialize(&rx_dir, &point, &root.join("before.img"));
    let acked_at_start =
        u(&wait_status(&root.join("rx"), "an ack", |v| v["acked"].is_u64()), "/acked");

    // The drill: a read-write snapshot, fsck, mount, write, unmount, fsck, thrown away.
    let mut drill = Proc::spawn(
        "recover-rw",
        &["recover", "--dir", &rx_dir, "--point", &point, "--expose", "rw"],
    );
    let snap = drill.wait_line("device:");
    drill.wait_line("ready:");
    // --frontend auto: FUSE + loop on a kernel without ublk_drv.
    let chosen = drill.wait_line("frontend:");
    if !Path::new("/dev/ublk-control").exists() {
        assert_eq!(chosen, "fuse", "auto chose {chosen} with no /dev/ublk-control");
        assert!(snap.starts_with("/dev/loop"), "{snap}");
    }
    let fsck = |what: &str| {
        let out = Command::new("e2fsck").args(["-fn", &snap]).output().unwrap();
        assert!(
            out.status.success(),
            "e2fsck -fn of the snapshot {what}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    fsck("as exposed");
    let snap_mnt = root.join("snap-mnt");
    std::fs::create_dir_all(&snap_mnt).unwrap();
    let snap_m = snap_mnt.display().to_string();
    run("mount", &[&snap, &snap_m]);
    cleanup.mounts.push(snap_mnt.clone());
    for i in 0..4u64 {
        assert_eq!(
            std::fs::read(snap_mnt.join(format!("file{i}"))).unwrap(),
            pattern(10 + i, 300_000)
        );
    }
    for i in 0..3u64 {
        std::fs::write(snap_mnt.join(format!("drill{i}")), pattern(500 + i, 1 << 20)).unwrap();
    }
    std::fs::remove_file(snap_mnt.join("file0")).unwrap();
    run("sync", &[]);
    run("umount", &[&snap_m]);
    cleanup.mounts.pop();
    fsck("after the drill's writes");
    let status = control(&socket, json!({"v": 1, "op": "status"}));
    assert_eq!(status["ok"], true, "{status:#}");
    assert_eq!(status["vsnaps"].as_array().map(Vec::len), Some(1), "{status:#}");
    assert!(u(&status["vsnaps"][0], "/overlay_blocks") > 0, "{status:#}");
    assert_eq!(status["vsnaps"][0]["frontend"], json!(chosen), "{status:#}");
    assert_eq!(status["vsnaps"][0]["device"], json!(snap), "{status:#}");
    assert_eq!(status["held"], json!([seq]), "{status:#}");
    // Replication went on during the drill, with the point held.
    wait_status(&root.join("rx"), "acks during the drill", |v| {
        v["acked"].as_u64().is_some_and(|a| a > acked_at_start)
            && v["retention"]["held_seqs"] == json!([seq])
    });
    drill.terminate();
    assert!(drill.lines.lock().unwrap().iter().any(|l| l.starts_with("removed:")));

    // A read-only snapshot mounted by recover itself: the drill left no trace, and it refuses
    // writes.
    let ro_mnt = root.join("ro-mnt");
    let mut ro = Proc::spawn(
        "recover-ro",
        &[
            "recover",
            "--dir",
            &rx_dir,
            "--point",
            &point,
            "--expose",
            "ro",
            "--mountpoint",
            &ro_mnt.display().to_string(),
        ],
    );
    let ro_dev = ro.wait_line("device:");
    ro.wait_line("mounted:");
    cleanup.mounts.push(ro_mnt.clone());
    assert_eq!(std::fs::read(ro_mnt.join("file0")).unwrap(), pattern(10, 300_000));
    assert!(!ro_mnt.join("drill0").exists(), "the drill's writes reached the point");
    let e = std::fs::write(ro_mnt.join("new"), b"x").expect_err("a write on a read-only snapshot");
    assert_eq!(e.raw_os_error(), Some(libc_erofs()), "{e}");
    // The loop device is read-only: the kernel refuses writes to it.
    let name = ro_dev.trim_start_matches("/dev/");
    assert_eq!(std::fs::read_to_string(format!("/sys/block/{name}/ro")).unwrap().trim(), "1");
    let w = std::fs::OpenOptions::new()
        .write(true)
        .open(&ro_dev)
        .and_then(|f| f.write_all_at(&[0u8; 4096], 0).and_then(|()| f.sync_all()));
    assert!(w.is_err(), "a write to the read-only snapshot device succeeded");
    ro.terminate();
    cleanup.mounts.pop();
    assert!(ro.lines.lock().unwrap().iter().any(|l| l.starts_with("removed:")));
    let status = control(&socket, json!({"v": 1, "op": "status"}));
    assert_eq!(status["vsnaps"], json!([]), "{status:#}");
    assert_eq!(status["held"], json!([]), "{status:#}");
    // An unknown point through the running receiver: its reason and what exists.
    let out = Command::new(BIN)
        .args(["recover", "--dir", &rx_dir, "--point", "bookmark:nope", "--expose", "ro"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an unknown bookmark was exposed");
    assert!(
        err.contains("\"nope\": no retained bookmark") && err.contains("bookmark:drill-point"),
        "{err}"
    );
    let out = Command::new(BIN)
        .args(["recover", "--dir", &rx_dir, "--point", "seq:99999999", "--expose", "ro"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not received yet") && err.contains("nearest"),
        "{err}"
    );
    // A request in another protocol version is refused by name.
    let refused = control(&socket, json!({"v": 2, "op": "points"}));
    assert_eq!(refused["ok"], false);
    assert_eq!(refused["versions"], json!([1]), "{refused:#}");

    // The point reads exactly as before the drill.
    let after = materialize(&rx_dir, &point, &root.join("after.img"));
    assert_eq!(before, after, "the drill changed the recovery point");

    // Wind down: the replica equals the source, which kept its own files.
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    assert!(rounds.load(Ordering::SeqCst) > 0);
    run("umount", &[&src_m]);
    cleanup.mounts.pop();
    wait_caught_up(&state);
    // A snapshot still exposed when the receiver stops: removed first, and its client
    // notices and fails.
    let mut orphan = Proc::spawn(
        "recover-orphan",
        &["recover", "--dir", &rx_dir, "--point", "latest", "--expose", "ro"],
    );
    orphan.wait_line("ready:");
    px.terminate();
    rx.terminate();
    let st = orphan.wait_exit();
    assert!(!st.success(), "recover kept going after the receiver stopped: {st}");
    assert!(!socket.exists(), "the control socket outlived the receiver");
    let latest = root.join("latest.img");
    let offline = materialize(&rx_dir, "latest", &latest);
    assert_eq!(offline, file_hash(&image), "the replica differs from the source");
    // Offline (log opened by recover, no vsnap) the point still hashes the same.
    assert_eq!(materialize(&rx_dir, &point, &root.join("offline.img")), before);
    // Onto a block device larger than the volume: written from 0, verified, the rest kept.
    let target = root.join("target.img");
    std::fs::File::create(&target).unwrap().set_len(VOLUME + (1 << 20)).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&target)
        .unwrap()
        .write_all_at(&[7u8; 4096], VOLUME)
        .unwrap();
    let loop_dev =
        run("losetup", &["-f", "--show", &target.display().to_string()]).trim().to_owned();
    let on_device = materialize(&rx_dir, &point, Path::new(&loop_dev));
    run("losetup", &["-d", &loop_dev]);
    assert_eq!(on_device, before);
    let bytes = std::fs::read(&target).unwrap();
    assert_eq!(blake3::hash(&bytes[..VOLUME as usize]).to_hex().to_string(), before);
    assert_eq!(&bytes[VOLUME as usize..VOLUME as usize + 4096], &[7u8; 4096][..]);
    // And an offline read-only snapshot (log opened by recover) reads the same bytes.
    let mut off = Proc::spawn(
        "recover-offline",
        &["recover", "--dir", &rx_dir, "--point", &point, "--expose", "ro"],
    );
    let off_dev = off.wait_line("device:");
    off.wait_line("ready:");
    assert_eq!(file_hash(Path::new(&off_dev)), before, "the offline snapshot reads differently");
    off.terminate();
    assert!(off.lines.lock().unwrap().iter().any(|l| l.starts_with("removed:")));
}

fn libc_erofs() -> i32 {
    nix::errno::Errno::EROFS as i32
}
