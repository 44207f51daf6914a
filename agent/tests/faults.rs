//! The real-process fault suite: `tidemark receive` and `tidemark protect` as two processes
//! on loopback, and faults a test can inject from outside: `kill -9` of either side during
//! the initial sync, a re-run of the sync after a killed agent, diff sync through the FUSE
//! frontend and retention thinning; a full target filesystem; a corrupt journal segment; bad
//! network peers (an oversized frame, slow-loris connections) next to the real source.
//!
//! Every scenario ends with a verify pass: the latest point of the replica, materialized
//! with `tidemark materialize`, equals the protected image byte for byte, and the test
//! fails on any difference. For the corrupt segment that means the repair worked: the
//! receiver reports the damage, withholds the points after it, asks the source to resend the
//! ranges the lost record covered, and `tidemark verify` then says identical. A monitor
//! thread samples both status.json files all along and checks that acknowledged sequence
//! numbers never go backwards: a source's `shipper.acked` only grows, and every receiver
//! document written after an acknowledgement was seen holds at least that sequence number
//! (`retention.newest_seq`), across kills, restarts and journal reopenings.
//!
//! The figures go out as `RELIABILITY name=value` lines for `cargo xtask reliability`. As
//! root with FUSE and loop devices (and `mount -t tmpfs` for the full-disk case); otherwise
//! each test prints a SKIPPED line and reports `scenarios_skipped`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tidemark_sync::secure::{AllowedPeers, Keypair, PublicKey, SecureChannel, SecureConfig};

mod common;
use common::*;

const PAIR: &str = "fa0175ee0123456789abcdef01234567";
const VOLUME: u64 = 64 << 20;

/// One `RELIABILITY name=value` line, straight to stdout (past the harness's capture).
fn figure(name: &str, value: u64) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(format!("RELIABILITY {name}={value}\n").as_bytes());
    let _ = out.flush();
}

macro_rules! require_root {
    ($name:expr) => {
        if let Some(why) = missing_requirement() {
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {}: {why}: the fault suite needs root, FUSE and loop devices",
                $name
            );
            figure("scenarios_skipped", 1);
            return;
        }
    };
}

fn read_status(dir: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(dir.join("status.json")).ok()?).ok()
}

/// Samples both status files every 20 ms and checks that acknowledgements never go back.
struct Monitor {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(u64, Vec<String>)>>,
}

impl Monitor {
    fn start(rx: PathBuf, px: PathBuf) -> Monitor {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut problems = Vec::new();
            let mut samples = 0u64;
            // Highest ack seen, and when (ms, read after the document was read).
            let (mut max_ack, mut max_at) = (0u64, 0u64);
            let mut last_px: Option<(u64, u64)> = None;
            while !s.load(Ordering::SeqCst) {
                if let Some(v) = read_status(&px) {
                    let (pid, acked) = (v["pid"].as_u64(), v.pointer("/shipper/acked"));
                    if let (Some(pid), Some(acked)) = (pid, acked.and_then(Value::as_u64)) {
                        samples += 1;
                        if let Some((p, a)) = last_px {
                            if p == pid && acked < a {
                                problems.push(format!(
                                    "protect pid {pid}: acked went back from {a} to {acked}"
                                ));
                            }
                        }
                        last_px = Some((pid, acked));
                        if acked > max_ack {
                            (max_ack, max_at) = (acked, now_ms());
                        }
                    }
                }
                if let Some(v) = read_status(&rx) {
                    let updated = v["updated_ms"].as_u64().unwrap_or(0);
                    if let Some(newest) = v.pointer("/retention/newest_seq").and_then(Value::as_u64)
                    {
                        samples += 1;
                        if updated > max_at && newest < max_ack {
                            problems.push(format!(
                                "receive pid {}: journal holds up to seq {newest} at {updated} ms, below seq {max_ack} acknowledged at {max_at} ms",
                                v["pid"]
                            ));
                        }
                        let acked = v["acked"].as_u64().unwrap_or(0);
                        if acked > max_ack {
                            (max_ack, max_at) = (acked, now_ms());
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (samples, problems)
        });
        Monitor { stop, thread: Some(thread) }
    }

    /// Stops sampling; fails the test on any acknowledgement that went back.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        let (samples, problems) = self.thread.take().unwrap().join().unwrap();
        assert!(problems.is_empty(), "acknowledgements went back:\n{}", problems.join("\n"));
        figure("faults.ack_samples_checked", samples);
        samples
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Keys, the protected image, a fixed port (a restarted receiver listens where the source
/// reconnects), and the two processes' command lines.
struct Pair {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    rx_dir: PathBuf,
    port: u16,
    rx_args: Vec<String>,
    px_args: Vec<String>,
    state: PathBuf,
}

impl Pair {
    /// `data`: (offset, length, seed) stretches written into the image before protection.
    fn new(data: &[(u64, usize, u64)]) -> Pair {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let keys = root.join("keys").display().to_string();
        tidemark(&["keygen", "--dir", &keys, "--name", "src"]);
        tidemark(&["keygen", "--dir", &keys, "--name", "dst"]);
        let f = std::fs::File::create(root.join("volume.img")).unwrap();
        f.set_len(VOLUME).unwrap();
        for &(off, len, seed) in data {
            f.write_all_at(&pattern(seed, len), off).unwrap();
        }
        f.sync_all().unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let rx_dir = root.join("rx");
        let state = root.join("state");
        Pair { _tmp: tmp, root, rx_dir, port, rx_args: Vec::new(), px_args: Vec::new(), state }
    }

    fn p(&self, rel: &str) -> String {
        self.root.join(rel).display().to_string()
    }

    fn image(&self) -> PathBuf {
        self.root.join("volume.img")
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn receive(&self) -> Proc {
        let mut args: Vec<String> = [
            "receive",
            "--dir",
            &self.rx_dir.display().to_string(),
            "--listen",
            &self.addr(),
            "--key",
            &self.p("keys/dst.key"),
            "--peer",
            &self.p("keys/src.pub"),
            "--pair",
            PAIR,
            "--size",
            &VOLUME.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(self.rx_args.iter().cloned());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut rx = Proc::spawn("receive", &refs);
        rx.wait_line("listening:");
        rx
    }

    /// Starts `protect` (FUSE frontend when `fuse`); returns it and its device.
    fn protect(&self, fuse: bool) -> (Proc, Option<String>) {
        let mut args: Vec<String> = [
            "protect",
            "--image",
            &self.p("volume.img"),
            "--state",
            &self.state.display().to_string(),
            "--target",
            &self.addr(),
            "--key",
            &self.p("keys/src.key"),
            "--peer",
            &self.p("keys/dst.pub"),
            "--pair",
            PAIR,
            "--max-hot-regions",
            "8",
            "--mountpoint",
            &self.p("fuse"),
            "--frontend",
            if fuse { "fuse" } else { "none" },
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(self.px_args.iter().cloned());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut px = Proc::spawn("protect", &refs);
        if !fuse {
            px.wait_line("protecting");
            return (px, None);
        }
        let dev = px.wait_line("device:");
        assert!(dev.starts_with("/dev/loop"), "device line {dev:?}");
        (px, Some(dev))
    }

    /// `receive`, then `protect` through the FUSE frontend, a monitor, and the cleanup of
    /// the frontend; returns once the initial sync is done and the pair in diff sync, with
    /// the protected device.
    fn start_through_fuse(&self) -> (Cleanup, Monitor, Proc, Proc, String) {
        let mut cleanup = Cleanup::default();
        cleanup.root = self.root.clone();
        let mon = self.monitor();
        let rx = self.receive();
        let (px, dev) = self.protect(true);
        let dev = dev.unwrap();
        cleanup.loops.push(dev.clone());
        cleanup.mounts.push(self.root.join("fuse"));
        wait_status(&self.state, "the initial sync", |v| {
            v["stage"] == "diff sync" && u(v, "/resyncs") >= 1
        });
        (cleanup, mon, rx, px, dev)
    }

    fn monitor(&self) -> Monitor {
        Monitor::start(self.rx_dir.clone(), self.state.clone())
    }

    /// The latest point of the (stopped) receiver's replica, materialized.
    fn materialize(&self) -> PathBuf {
        let out = self.root.join("replica-latest.img");
        let _ = std::fs::remove_file(&out);
        tidemark(&[
            "materialize",
            "--dir",
            &self.rx_dir.display().to_string(),
            "--out",
            &out.display().to_string(),
        ]);
        out
    }

    /// The verify pass: materialized latest point == protected image; returns the bytes
    /// compared.
    fn verify(&self) -> u64 {
        let out = self.materialize();
        let diff = differing_ranges(&out, &self.image());
        assert!(diff.is_empty(), "replica differs from the source at {diff:?}");
        figure("faults.bytes_verified", VOLUME);
        VOLUME
    }
}

/// The byte ranges where two equally long files differ (4 KiB granularity).
fn differing_ranges(a: &Path, b: &Path) -> Vec<(u64, u64)> {
    let (fa, fb) = (std::fs::File::open(a).unwrap(), std::fs::File::open(b).unwrap());
    let len = fa.metadata().unwrap().len();
    assert_eq!(
        len,
        fb.metadata().unwrap().len(),
        "{} and {} differ in length",
        a.display(),
        b.display()
    );
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0;
    while pos < len {
        let n = ((len - pos) as usize).min(ba.len());
        fa.read_exact_at(&mut ba[..n], pos).unwrap();
        fb.read_exact_at(&mut bb[..n], pos).unwrap();
        for (i, (ca, cb)) in ba[..n].chunks(4096).zip(bb[..n].chunks(4096)).enumerate() {
            if ca != cb {
                let at = pos + (i as u64) * 4096;
                match out.last_mut() {
                    Some(last) if last.1 == at => last.1 = at + ca.len() as u64,
                    _ => out.push((at, at + ca.len() as u64)),
                }
            }
        }
        pos += n as u64;
    }
    out
}

/// Waits until the receiver's status (written by process `pid`, if given) satisfies `pred`.
fn wait_rx(dir: &Path, what: &str, pid: Option<u64>, pred: impl Fn(&Value) -> bool) -> Value {
    wait_status(dir, what, |v| pid.is_none_or(|p| v["pid"] == p) && pred(v))
}

/// A writer on the protected device: 64 KiB writes, each followed by `fdatasync` (a
/// flush, hence a recovery point), over two 8 MiB stretches, until stopped or the device
/// fails under it (a killed agent).
struct Writer {
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(dev: &str, seed: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let (s, w, dev) = (stop.clone(), written.clone(), dev.to_owned());
        let thread = std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
            let mut i = 0u64;
            while !s.load(Ordering::SeqCst) {
                let off = if i % 2 == 0 { 8 << 20 } else { 40 << 20 } + (i * 7 * 65536) % (8 << 20);
                if f.write_all_at(&pattern(seed + i, 65536), off).is_err() || f.sync_data().is_err()
                {
                    break;
                }
                w.fetch_add(1, Ordering::SeqCst);
                i += 1;
            }
        });
        Writer { stop, written, thread: Some(thread) }
    }

    /// Waits until `n` more writes completed (the writer must still be running).
    fn wait_more(&self, n: u64) {
        let start = self.written.load(Ordering::SeqCst);
        let until = Instant::now() + PATIENCE;
        while self.written.load(Ordering::SeqCst) < start + n {
            assert!(!self.thread.as_ref().unwrap().is_finished(), "the writer stopped");
            assert!(Instant::now() < until, "the writer made no progress");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        self.written.load(Ordering::SeqCst)
    }
}

/// What a killed FUSE frontend leaves behind: a loop device and a dead mount.
fn clean_dead_frontend(dev: &str, mnt: &Path) {
    let _ = Command::new("losetup").args(["-d", dev]).stderr(Stdio::null()).status();
    let _ = Command::new("umount").arg("-l").arg(mnt).stderr(Stdio::null()).status();
}

fn report_scenario(kills: u64, other_faults: u64) {
    figure("scenarios_run", 1);
    figure("faults.kill9", kills);
    figure("faults.injected", kills + other_faults);
}

#[test]
fn kill_9_loops_during_initial_sync_and_its_rerun() {
    require_root!("kill_9_loops_during_initial_sync_and_its_rerun");
    let mut pair = Pair::new(&[(0, 6 << 20, 1), (16 << 20, 12 << 20, 2), (50 << 20, 6 << 20, 3)]);
    // 24 MiB at 2 MiB/s: about 12 s of initial sync to kill into (each step sees a status
    // written once a second, so a slow machine needs the room).
    // A small spool: step I runs only half a spool ahead of the acknowledgements, so a
    // killed agent has not read the whole volume yet and must run the sync again.
    pair.px_args = ["--rate-mib", "2", "--spool-mib", "8"].iter().map(|s| s.to_string()).collect();
    let mon = pair.monitor();
    let mut rx = pair.receive();
    let (mut px, _) = pair.protect(false);
    // `tidemark status --json` carries the running sync's progress, with a rate and an ETA.
    let until = Instant::now() + PATIENCE;
    let progress = loop {
        if !pair.state.join("status.json").exists() {
            assert!(Instant::now() < until, "protect wrote no status.json");
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let doc: Value = serde_json::from_str(&tidemark(&[
            "status",
            "--state",
            &pair.state.display().to_string(),
            "--json",
        ]))
        .expect("status --json is JSON");
        let p = &doc["progress"];
        if p["rate_bps"].as_f64().is_some_and(|r| r > 0.0) && p["eta_s"].is_number() {
            break p.clone();
        }
        assert!(Instant::now() < until, "no progress with a rate in {doc:#}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(u(&progress, "/done") <= u(&progress, "/total"), "{progress:#}");
    let rate = progress["rate_bps"].as_f64().unwrap();
    let eta = progress["eta_s"].as_f64().unwrap();
    let left = (u(&progress, "/total") - u(&progress, "/done")) as f64;
    assert!(
        (eta - left / rate).abs() <= 0.1 + left / rate * 0.01,
        "ETA {eta} s for {left} bytes at {rate} B/s"
    );
    let mut kills = 0;
    let syncing = |v: &Value| v["stage"] == "initial sync" || v["stage"] == "resync";
    // The receiver killed twice while step I runs, each time after its journal grew, and
    // both times with the replica still inside the initial sync's window.
    let in_sync = |v: &Value| v["replica"]["initial_sync"] == true;
    let mut floor = 0;
    for _ in 0..2 {
        let st = wait_rx(&pair.rx_dir, "initial sync data received", Some(rx.pid()), |v| {
            u(v, "/retention/journal_bytes") > floor && in_sync(v)
        });
        floor = u(&st, "/retention/journal_bytes");
        rx.crash();
        kills += 1;
        rx = pair.receive();
    }
    // The agent killed while less than half the data reached the target.
    wait_rx(&pair.rx_dir, "more of the sync received", Some(rx.pid()), |v| {
        u(v, "/retention/journal_bytes") > floor && in_sync(v)
    });
    px.crash();
    kills += 1;
    let (px2, _) = pair.protect(false);
    px = px2;
    let pid = px.pid();
    // The restarted agent runs the sync again; the receiver is killed during that re-run.
    let st = wait_status(&pair.state, "the sync re-run after the agent's crash", |v| {
        v["pid"] == pid && syncing(v) && u(v, "/shipper/sessions") >= 1
    });
    assert_eq!(st["fresh"], false);
    let rx_st = read_status(&pair.rx_dir).unwrap();
    assert_eq!(rx_st["replica"]["consistent"], false, "the kill must land in the sync: {rx_st:#}");
    rx.crash();
    kills += 1;
    rx = pair.receive();
    let st = wait_caught_up(&pair.state);
    assert!(u(&st, "/resyncs") >= 1, "{st:#}");
    px.terminate();
    rx.terminate();
    mon.finish();
    pair.verify();
    report_scenario(kills, 0);
}

#[test]
fn kill_9_loops_during_diff_sync_through_fuse() {
    require_root!("kill_9_loops_during_diff_sync_through_fuse");
    let pair = Pair::new(&[(4 << 20, 2 << 20, 11)]);
    let (mut cleanup, mon, mut rx, mut px, dev) = pair.start_through_fuse();
    let mut kills = 0;
    let writer = Writer::start(&dev, 5000);
    // The receiver killed three times under a running workload: the writer never notices.
    for _ in 0..3 {
        writer.wait_more(40);
        rx.crash();
        kills += 1;
        writer.wait_more(20);
        rx = pair.receive();
    }
    writer.wait_more(40);
    // The agent killed under the workload: the writer's device dies with it.
    px.crash();
    kills += 1;
    let written = writer.stop();
    clean_dead_frontend(&dev, &pair.root.join("fuse"));
    cleanup.loops.clear();
    let (px2, dev) = pair.protect(true);
    px = px2;
    cleanup.loops.push(dev.clone().unwrap());
    let pid = px.pid();
    // The receiver is killed again while the restarted agent resyncs its dirty regions
    // and ships its backlog.
    wait_status(&pair.state, "the restarted agent connected", |v| {
        v["pid"] == pid && u(v, "/shipper/sessions") >= 1
    });
    rx.crash();
    kills += 1;
    rx = pair.receive();
    let st = wait_status(&pair.state, "the resync after the crash", |v| {
        v["pid"] == pid && v["stage"] == "diff sync" && u(v, "/resyncs") >= 1
    });
    assert_eq!(st["fresh"], false);
    // More writes after the recovery, then catch up.
    let writer = Writer::start(dev.as_deref().unwrap(), 9000);
    writer.wait_more(30);
    let written = written + writer.stop();
    wait_caught_up(&pair.state);
    px.terminate();
    cleanup.loops.clear();
    rx.terminate();
    mon.finish();
    eprintln!("diff sync: {written} writes of 64 KiB, {kills} kill -9");
    pair.verify();
    report_scenario(kills, 0);
}

#[test]
fn kill_9_loops_during_retention_thinning() {
    require_root!("kill_9_loops_during_retention_thinning");
    let mut pair = Pair::new(&[(4 << 20, 1 << 20, 21)]);
    // A 4 s window, points older than 1 s thinned to one a second, a pass every 0.3 s,
    // 1 MiB segments so that base advances and coalescing rewrite files all the time.
    pair.rx_args =
        ["--retain", "4s", "--tier", "1s=1s", "--retention-every", "0.3", "--segment-mib", "1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let mut cleanup = Cleanup::default();
    cleanup.root = pair.root.clone();
    let mon = pair.monitor();
    let mut rx = pair.receive();
    let (mut px, dev) = pair.protect(true);
    let dev = dev.unwrap();
    cleanup.loops.push(dev.clone());
    cleanup.mounts.push(pair.root.join("fuse"));
    wait_status(&pair.state, "the initial sync", |v| {
        v["stage"] == "diff sync" && u(v, "/resyncs") >= 1
    });
    let writer = Writer::start(&dev, 7000);
    let mut kills = 0;
    let (mut dropped, mut advanced) = (0, 0);
    for _ in 0..4 {
        // Kill once this receiver has run passes that thinned and moved the base.
        let pid = rx.pid();
        let st = wait_rx(&pair.rx_dir, "a retention pass that thinned", Some(pid), |v| {
            u(v, "/retention/passes") >= 3
                && v.pointer("/retention/last_pass/dropped_points")
                    .and_then(Value::as_u64)
                    .unwrap_or(0)
                    > 0
        });
        dropped += u(&st, "/retention/last_pass/dropped_points");
        advanced += u64::from(
            st.pointer("/retention/last_pass/base_advanced_to").is_some_and(|b| !b.is_null()),
        );
        writer.wait_more(10);
        rx.crash();
        kills += 1;
        rx = pair.receive();
    }
    let pid = rx.pid();
    let st = wait_rx(&pair.rx_dir, "the base moved past history", Some(pid), |v| {
        u(v, "/retention/oldest_seq") > 0 && u(v, "/retention/passes") >= 2
    });
    assert_eq!(st["retention"]["window_configured_s"], 4.0, "{st:#}");
    writer.stop();
    wait_caught_up(&pair.state);
    px.terminate();
    cleanup.loops.clear();
    rx.terminate();
    mon.finish();
    eprintln!(
        "retention: {dropped} points dropped in the passes seen, {advanced} base advances seen"
    );
    assert!(dropped > 0);
    pair.verify();
    report_scenario(kills, 0);
}

#[test]
fn full_target_filesystem_stalls_then_resumes() {
    require_root!("full_target_filesystem_stalls_then_resumes");
    let mut pair = Pair::new(&[(0, 8 << 20, 31), (24 << 20, 16 << 20, 32)]);
    let fs = pair.root.join("rxfs");
    std::fs::create_dir_all(&fs).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=40m", "tidemark-faults", &fs.display().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED full_target_filesystem_stalls_then_resumes: cannot mount a tmpfs"
        );
        figure("scenarios_skipped", 1);
        return;
    }
    let mut cleanup = Cleanup::default();
    cleanup.root = pair.root.clone();
    cleanup.mounts.push(fs.clone());
    // 24 MiB to receive, 40 MiB of space of which a filler takes 28: the disk fills up.
    let filler = fs.join("filler");
    std::fs::write(&filler, pattern(33, 28 << 20)).unwrap();
    pair.rx_dir = fs.join("rx");
    let mon = pair.monitor();
    let mut rx = pair.receive();
    let (mut px, _) = pair.protect(false);
    // The status file may not be writable on a full disk: the receiver's output says it.
    let why = rx.wait_line("journal failed:");
    assert!(why.contains("No space left on device"), "the error must say the disk is full: {why}");
    // Stalled, not dead: the receiver keeps reopening, the source keeps its spool.
    let before = read_status(&pair.state).unwrap();
    assert_ne!(before["stage"], "diff sync", "the sync cannot have completed: {before:#}");
    assert!(rx.child.as_mut().unwrap().try_wait().unwrap().is_none(), "receive exited");
    std::fs::remove_file(&filler).unwrap();
    let st = wait_caught_up(&pair.state);
    assert!(u(&st, "/resyncs") >= 1);
    px.terminate();
    rx.terminate();
    mon.finish();
    pair.verify();
    drop(cleanup);
    report_scenario(0, 1);
}

#[test]
fn a_corrupt_segment_is_reported_repaired_by_the_source_and_verified_identical() {
    require_root!("a_corrupt_segment_is_reported_repaired_by_the_source_and_verified_identical");
    let mut pair = Pair::new(&[(0, 12 << 20, 41), (32 << 20, 4 << 20, 42)]);
    pair.rx_args = vec!["--segment-mib".into(), "2".into(), "--scrub-every".into(), "0.5".into()];
    let mon = pair.monitor();
    let mut rx = pair.receive();
    let (mut px, _) = pair.protect(false);
    wait_caught_up(&pair.state);
    px.terminate();
    rx.terminate();
    // A sealed segment in the middle of the journal: 64 bytes flipped halfway through.
    let journal = pair.rx_dir.join("journal");
    let mut segs: Vec<PathBuf> = std::fs::read_dir(&journal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| std::fs::metadata(p).unwrap().len() > (1 << 20))
        .collect();
    segs.sort();
    assert!(segs.len() >= 3, "expected several full segments in {}: {segs:?}", journal.display());
    let victim = segs[segs.len() / 2].clone();
    let name = victim.file_name().unwrap().to_string_lossy().into_owned();
    let at = flip_middle(&victim);

    // The receiver reopens: the damage is reported by segment and offset, with the volume
    // ranges the lost record covered, and the points after it are withheld.
    let mut rx = pair.receive();
    let line = rx.wait_line("journal damage:");
    eprintln!("restart reported: {line}");
    assert!(line.contains(&name), "the report must name segment {name}: {line}");
    let field = |key: &str| -> u64 {
        let rest =
            &line[line.find(key).unwrap_or_else(|| panic!("no {key} in {line}")) + key.len()..];
        rest.split_whitespace().next().unwrap().trim_end_matches(':').parse().unwrap()
    };
    let (off, len) = (field("offset "), field("length "));
    assert!(off <= at && at < off + len, "damage reported at {off}+{len}, bytes flipped at {at}");
    let need = rx.wait_line("journal repair needed:");
    eprintln!("repair needed: {need}");
    assert!(
        need.contains(&format!("segment {name} offset {off}")) && need.contains("volume 0 bytes"),
        "the repair line must name the segment, offset and ranges: {need}"
    );
    let st = wait_rx(&pair.rx_dir, "the damage in status.json", Some(rx.pid()), |v| {
        v["journal_repair"].as_array().is_some_and(|a| !a.is_empty())
    });
    let d = &st["journal_damage"][0];
    assert_eq!((d["segment"].as_str(), u(d, "/offset")), (Some(name.as_str()), off), "{st:#}");
    let r = &st["journal_repair"][0];
    assert!(r["repaired_at"].is_null(), "{st:#}");
    let lost_from = u(r, "/lost_from");
    assert!(
        // (None when the lost record was part of the initial sync: nothing before it.)
        st["replica"]["last_consistent_seq"].as_u64().is_none_or(|s| s < lost_from),
        "a point depending on the lost record is offered: {st:#}"
    );

    // The source reconnects; the receiver asks it to resend the ranges (RepairRequest); it
    // resyncs them and the replica is whole again.
    let (mut px, _) = pair.protect(false);
    let done = rx.wait_line("journal repaired:");
    eprintln!("repaired: {done}");
    assert!(done.contains(&name), "{done}");
    let st = wait_caught_up(&pair.state);
    assert!(u(&st, "/repairs") >= 1, "the source ran no repair: {st:#}");
    let rst = wait_rx(&pair.rx_dir, "the repair in status.json", Some(rx.pid()), |v| {
        v["journal_repair"][0]["repaired_at"].is_u64()
    });
    assert!(u(&rst, "/repair_requests") >= 1, "{rst:#}");
    // `tidemark verify` (exit 0 only when identical) against the running pair.
    let out = tidemark(&["verify", "--state", &pair.state.display().to_string()]);
    assert!(out.contains("identical"), "verify: {out}");

    // Bit rot under the running pair: another sealed segment damaged in place. The
    // receiver's scrub (every 0.5 s) finds it and the connected source repairs it.
    let live = segs[0].clone();
    let live_name = live.file_name().unwrap().to_string_lossy().into_owned();
    flip_middle(&live);
    let need = rx.wait_line(&format!("journal repair needed: segment {live_name}"));
    eprintln!("scrub found: {need}");
    rx.wait_line(&format!("journal repaired: segment {live_name}"));
    let st = wait_caught_up(&pair.state);
    assert!(u(&st, "/repairs") >= 2, "the connected source ran no second repair: {st:#}");
    let out = tidemark(&["verify", "--state", &pair.state.display().to_string()]);
    assert!(out.contains("identical"), "verify after the live repair: {out}");
    px.terminate();
    rx.terminate();
    mon.finish();
    // The verify pass: the latest point equals the source byte for byte; any difference
    // (a lost acknowledged write) fails the test.
    pair.verify();
    figure("faults.damaged_bytes_reported", len);
    figure("faults.damage_repaired", 2);
    figure("faults.bytes_lost_to_damage", 0);
    report_scenario(0, 2);
}

/// Flips 64 bytes halfway through `segment` in place (the same file, so a receiver that
/// has it open reads the damage); returns where.
fn flip_middle(segment: &Path) -> u64 {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(segment).unwrap();
    let at = f.metadata().unwrap().len() / 2;
    let mut b = [0u8; 64];
    f.read_exact_at(&mut b, at).unwrap();
    for x in &mut b {
        *x ^= 0x5a;
    }
    f.write_all_at(&b, at).unwrap();
    f.sync_all().unwrap();
    at
}

/// Bad peers next to the real source: connections that trickle or send nothing, an
/// oversized frame, another key. None may stop the source from connecting and replicating.
#[test]
fn bad_peers_do_not_block_the_real_source() {
    require_root!("bad_peers_do_not_block_the_real_source");
    let pair = Pair::new(&[(0, 1 << 20, 51)]);
    let mon = pair.monitor();
    let mut rx = pair.receive();
    let addr = pair.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut bad = Vec::new();
    // Twenty slow-loris peers, more than the listener's 16 connections: a byte of a valid
    // preamble a second, reconnecting when cut.
    for _ in 0..20 {
        let (stop, addr) = (stop.clone(), addr.clone());
        bad.push(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let Ok(mut s) = TcpStream::connect(&addr) else { continue };
                for b in b"TIDEMARK\x01\x00\x01\x00".iter().cycle() {
                    if stop.load(Ordering::SeqCst) || s.write_all(&[*b]).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }));
    }
    // Silent peers that connect and send nothing.
    let silent: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    // An oversized first handshake message: a valid preamble, then a length far beyond
    // the 32 bytes of Noise message 1. Refused at once, by length, before reading it.
    {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut msg = b"TIDEMARK\x01\x00\x01\x00".to_vec();
        msg.extend_from_slice(&0xffffu16.to_le_bytes());
        msg.extend_from_slice(&[7u8; 4096]);
        let t = Instant::now();
        let _ = s.write_all(&msg);
        let mut said = Vec::new();
        let _ = s.read_to_end(&mut said);
        refused.lock().unwrap().push(format!("oversized: closed after {:?}", t.elapsed()));
        assert!(
            t.elapsed() < Duration::from_secs(8),
            "the oversized message was not refused at once"
        );
    }
    // The real source connects and replicates meanwhile.
    let (mut px, _) = pair.protect(false);
    let st = wait_caught_up(&pair.state);
    assert!(u(&st, "/resyncs") >= 1, "{st:#}");
    let sessions = u(&read_status(&pair.rx_dir).unwrap(), "/sessions");
    // An authenticated peer (the source's own key) whose first message announces 17 MiB,
    // beyond the 16 MiB frame maximum: refused from the first record's announced length,
    // the connection closed, the live session untouched.
    {
        let mut cfg = SecureConfig::new(
            Keypair::load(&pair.root.join("keys/src.key")).unwrap(),
            AllowedPeers::from_keys([PublicKey::load(&pair.root.join("keys/dst.pub")).unwrap()]),
        );
        cfg.max_message_len = 256 << 20;
        let mut ch = SecureChannel::initiate(TcpStream::connect(&addr).unwrap(), &cfg).unwrap();
        let t = Instant::now();
        let _ = ch.send(&vec![9u8; 17 << 20]);
        let answer = ch.recv();
        assert!(!matches!(answer, Ok(Some(_))), "the oversized frame got an answer: {answer:?}");
        refused
            .lock()
            .unwrap()
            .push(format!("oversized frame: {answer:?} after {:?}", t.elapsed()));
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the oversized frame was not refused in time"
        );
    }
    // A peer with the wrong key (a fresh one), tried after: refused, the source unharmed.
    tidemark(&["keygen", "--dir", &pair.p("keys"), "--name", "intruder"]);
    let intruder_state = pair.p("intruder");
    let mut intruder = Proc::spawn(
        "intruder",
        &[
            "protect",
            "--image",
            &pair.p("volume.img"),
            "--state",
            &intruder_state,
            "--target",
            &addr,
            "--key",
            &pair.p("keys/intruder.key"),
            "--peer",
            &pair.p("keys/dst.pub"),
            "--pair",
            PAIR,
            "--frontend",
            "none",
        ],
    );
    wait_status(Path::new(&intruder_state), "the intruder refused", |v| {
        v["shipper"]["last_error"].as_str().is_some_and(|e| !e.is_empty())
    });
    intruder.crash();
    let rx_st = read_status(&pair.rx_dir).unwrap();
    eprintln!("handshakes cut to make room: {}", rx_st["handshakes_evicted"]);
    assert!(u(&rx_st, "/handshakes_evicted") > 0, "the flood never filled the listener: {rx_st:#}");
    assert_eq!(rx_st["connected"], true, "the real source lost its session: {rx_st:#}");
    assert_eq!(u(&rx_st, "/sessions"), sessions, "a bad peer was admitted or replaced the source");
    stop.store(true, Ordering::SeqCst);
    drop(silent);
    px.terminate();
    rx.terminate();
    for t in bad {
        t.join().unwrap();
    }
    mon.finish();
    pair.verify();
    eprintln!("{:?}", refused.lock().unwrap());
    // 20 slow-loris, 4 silent, 2 oversized, 1 wrong key.
    report_scenario(0, 27);
    figure("bad_inputs_tried", 27);
}

/// SIGTERM to `receive` while the source streams a workload to it (and a stray peer sits
/// in its handshake): it stops within 5 s with exit status 0, its status says stopped with everything received durable,
/// the source hears the documented "shutting down" error (not a cut stream), and a restarted
/// receiver resumes with nothing lost: the replica ends equal to the source.
#[test]
fn sigterm_stops_a_streaming_receiver_promptly_and_a_restart_resumes() {
    require_root!("sigterm_stops_a_streaming_receiver_promptly_and_a_restart_resumes");
    let pair = Pair::new(&[(4 << 20, 1 << 20, 31)]);
    let (mut cleanup, mon, mut rx, mut px, dev) = pair.start_through_fuse();
    let writer = Writer::start(&dev, 12000);
    // Streaming: the receiver, connected, acknowledges more and more of the workload.
    let pid = rx.pid();
    let first = wait_rx(&pair.rx_dir, "a connected receiver acknowledging", Some(pid), |v| {
        v["connected"] == true && u(v, "/acked") > 0
    });
    let acked_before = u(&first, "/acked");
    wait_rx(&pair.rx_dir, "the pair streaming", Some(pid), |v| {
        v["connected"] == true && u(v, "/acked") >= acked_before + 20
    });
    writer.wait_more(10);
    // A peer that connected and never starts its handshake (it held the stop up until the
    // 10 s handshake timeout before receive cut such connections).
    let _stuck = TcpStream::connect(pair.addr()).unwrap();
    // At most the shutdown grace and the linger (2 s each) plus the last sync and exit on
    // a busy disk; under the 10 s of the handshake timeout it must not wait for.
    let (status, took) = rx.terminate_within(Duration::from_secs(9));
    eprintln!("receive stopped {took:?} after SIGTERM with {status}");
    assert!(status.success(), "receive exited with {status} after SIGTERM");
    let stopped = read_status(&pair.rx_dir).expect("receive's status.json");
    assert_eq!(stopped["state"], "stopped", "{stopped:#}");
    assert_eq!(stopped["pid"], pid);
    assert_eq!(u(&stopped, "/durable"), u(&stopped, "/received"), "the log synced: {stopped:#}");
    assert!(u(&stopped, "/acked") <= u(&stopped, "/durable"));
    // The source was told, and goes on capturing while the target is away.
    wait_status(&pair.state, "the source hearing the target shut down", |v| {
        v.pointer("/shipper/last_session_end")
            .and_then(Value::as_str)
            .is_some_and(|e| e.contains("shutting down"))
    });
    writer.wait_more(20);
    rx = pair.receive();
    let pid = rx.pid();
    wait_rx(&pair.rx_dir, "the restarted receiver resuming", Some(pid), |v| {
        v["connected"] == true && u(v, "/received") > u(&stopped, "/received")
    });
    writer.wait_more(20);
    let written = writer.stop();
    wait_caught_up(&pair.state);
    px.terminate();
    cleanup.loops.clear();
    rx.terminate();
    mon.finish();
    eprintln!("sigterm: {written} writes of 64 KiB, receive stopped in {took:?}");
    pair.verify();
    report_scenario(0, 1);
}
