//! What the agent's end-to-end tests share: running `tidemark` as child processes whose
//! output lines are collected, polling `status.json`, cleaning up mounts and loop devices a
//! failed test leaves behind, and test data. Each test binary uses a part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The agent binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_tidemark");

/// How long any wait on a process or a status lasts before the test fails (generous: CI
/// runs on a loaded two-core machine).
pub const PATIENCE: Duration = Duration::from_secs(60);

pub fn missing_requirement() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("not root".into());
    }
    for dev in ["/dev/fuse", "/dev/loop-control"] {
        if !Path::new(dev).exists() {
            return Some(format!("{dev} missing"));
        }
    }
    for tool in ["mkfs.ext4", "e2fsck", "mount", "umount", "losetup"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("{tool} not found"));
        }
    }
    None
}

#[macro_export]
macro_rules! require_env {
    ($name:expr) => {
        if let Some(why) = missing_requirement() {
            // Straight to stderr: the harness captures `eprintln!` of passing tests.
            let _ = writeln!(
                std::io::stderr(),
                "SKIP {}: {why}: this end-to-end test needs root, FUSE and loop devices",
                $name
            );
            return;
        }
    };
}

/// A child process whose stdout lines are collected; killed (SIGKILL) on drop. Once it
/// has exited through `terminate`, `terminate_within` or `wait_exit`, `lines` holds all
/// it printed.
pub struct Proc {
    pub name: &'static str,
    pub child: Option<Child>,
    pub lines: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Proc {
    pub fn spawn(name: &'static str, args: &[&str]) -> Proc {
        let mut child = Command::new(BIN)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let out = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                eprintln!("[{name}] {line}");
                l.lock().unwrap().push(line);
            }
        });
        Proc { name, child: Some(child), lines, reader: Some(reader) }
    }

    /// After the exit: waits until every line the process printed is in `lines` (its
    /// stdout reached end of file; a process it left running with the pipe open is waited
    /// for up to PATIENCE, then the lines so far are what there is).
    fn collect_rest(&mut self) {
        let Some(reader) = self.reader.take() else { return };
        let until = Instant::now() + PATIENCE;
        while !reader.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        if reader.is_finished() {
            let _ = reader.join();
        }
    }

    pub fn pid(&self) -> u64 {
        u64::from(self.child.as_ref().unwrap().id())
    }

    /// Waits for a stdout line starting with `prefix`; returns the rest of it.
    pub fn wait_line(&mut self, prefix: &str) -> String {
        let until = Instant::now() + PATIENCE;
        loop {
            if let Some(l) = self.lines.lock().unwrap().iter().find(|l| l.starts_with(prefix)) {
                return l[prefix.len()..].trim().to_owned();
            }
            match self.child.as_mut() {
                Some(child) => {
                    if let Some(st) = child.try_wait().unwrap() {
                        self.collect_rest();
                        if let Some(l) =
                            self.lines.lock().unwrap().iter().find(|l| l.starts_with(prefix))
                        {
                            return l[prefix.len()..].trim().to_owned();
                        }
                        panic!("{} exited ({st}) before printing {prefix:?}", self.name);
                    }
                }
                // Exited already, and every line collected then.
                None => panic!("{} exited without printing {prefix:?}", self.name),
            }
            assert!(Instant::now() < until, "{} printed no {prefix:?} line", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn terminate(&mut self) {
        let mut child = self.child.take().unwrap();
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let until = Instant::now() + PATIENCE;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.collect_rest();
                assert!(st.success(), "{} exited with {st} after SIGTERM", self.name);
                return;
            }
            assert!(Instant::now() < until, "{} did not stop after SIGTERM", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits at most `deadline` for the process to exit (SIGKILL and a
    /// failure past it); returns its exit status and how long it took.
    pub fn terminate_within(&mut self, deadline: Duration) -> (std::process::ExitStatus, Duration) {
        let mut child = self.child.take().unwrap();
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let start = Instant::now();
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                let took = start.elapsed();
                self.collect_rest();
                return (st, took);
            }
            if start.elapsed() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{} did not exit within {deadline:?} of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let until = Instant::now() + PATIENCE;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.collect_rest();
                return st;
            }
            if Instant::now() >= until {
                let _ = child.kill();
                panic!("{} did not exit", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL (a crash).
    pub fn crash(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Undoes what a failed test may leave behind: the mounts listed, then any other mount
/// under `root` (a killed receiver's snapshot mounts), then the loop devices listed.
#[derive(Default)]
pub struct Cleanup {
    pub root: PathBuf,
    pub mounts: Vec<PathBuf>,
    pub loops: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(m).stderr(Stdio::null()).status();
        }
        if !self.root.as_os_str().is_empty() {
            if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
                let root = self.root.display().to_string();
                for point in info.lines().rev().filter_map(|l| l.split(' ').nth(4)) {
                    if point.starts_with(&root) {
                        let _ = Command::new("umount")
                            .arg("-l")
                            .arg(point)
                            .stderr(Stdio::null())
                            .status();
                    }
                }
            }
        }
        for l in &self.loops {
            let _ = Command::new("losetup").args(["-d", l]).stderr(Stdio::null()).status();
        }
    }
}

pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn tidemark(args: &[&str]) -> String {
    run(BIN, args)
}

/// Waits until `protect` (its `state` directory's status) is in diff sync with everything
/// it captured up to now acknowledged by the target.
pub fn wait_caught_up(state: &Path) -> Value {
    let after = now_ms();
    wait_status(state, "everything acknowledged in diff sync", |v| {
        v["updated_ms"].as_u64().is_some_and(|t| t > after)
            && v["stage"] == "diff sync"
            && v["shipper"]["backlog_bytes"] == 0
            && u(v, "/shipper/acked") >= u(v, "/tap/last_seq")
    })
}

/// Polls `dir/status.json` until `pred` holds; returns the document.
pub fn wait_status(dir: &Path, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let path = dir.join("status.json");
    let until = Instant::now() + PATIENCE;
    let mut last = Value::Null;
    loop {
        if let Ok(text) = std::fs::read_to_string(&path) {
            last = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not whole JSON: {e}", path.display()));
            if pred(&last) {
                return last;
            }
        }
        assert!(Instant::now() < until, "timed out waiting for {what}; last status: {last:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn u(v: &Value, ptr: &str) -> u64 {
    v.pointer(ptr).and_then(Value::as_u64).unwrap_or_else(|| panic!("no number at {ptr} in {v:#}"))
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Deterministic bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
