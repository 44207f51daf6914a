//! The source's control socket end to end: `tidemark verify` and `tidemark bookmark`
//! against a running `tidemark protect` replicating to a `tidemark receive` on loopback.
//!
//! - verify reports identical after catch-up, then the exact ranges after the source image
//!   is changed behind the tap's back (`--frontend none`) and after the target's base image
//!   is changed where its journal does not override it (receive stopped and restarted);
//! - bookmarks through a running protect with ext4 mounted on the FUSE device (`--freeze`),
//!   a failing pre hook, periodic bookmarks; each recovered on the target and checked;
//! - without an agent, and with bad names, the commands fail with clear messages.
//!
//! The replication tests need root (and FUSE, loop devices, mkfs.ext4, e2fsck for the
//! bookmark test); without them they print a SKIP line and return.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};

mod common;
use common::*;

const PAIR: &str = "c0ffee0123456789abcdef0123456789";
const VOLUME: u64 = 64 << 20;

fn tidemark_out(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap_or_else(|e| panic!("run tidemark {args:?}: {e}"))
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A pair on loopback: keys, the receiver's directory, the protected image, the state.
struct Pair {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Pair {
    fn new() -> Pair {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let keys = root.join("keys");
        for name in ["src", "dst"] {
            tidemark(&["keygen", "--dir", &keys.display().to_string(), "--name", name]);
        }
        let f = std::fs::File::create(root.join("volume.img")).unwrap();
        f.set_len(VOLUME).unwrap();
        f.write_all_at(&pattern(3, 256 << 10), 5 << 20).unwrap();
        f.sync_all().unwrap();
        Pair { _tmp: tmp, root }
    }

    fn path(&self, rel: &str) -> String {
        self.root.join(rel).display().to_string()
    }

    fn keys(&self, own: &str, peer: &str) -> Vec<String> {
        let (k, p) = (format!("keys/{own}.key"), format!("keys/{peer}.pub"));
        [
            "--key".into(),
            self.path(&k),
            "--peer".into(),
            self.path(&p),
            "--pair".into(),
            PAIR.into(),
        ]
        .to_vec()
    }

    fn start_receive(&self, listen: &str) -> (Proc, String) {
        let mut args: Vec<String> = ["receive", "--dir"].map(String::from).to_vec();
        args.push(self.path("rx"));
        args.extend(["--listen".into(), listen.into(), "--size".into(), VOLUME.to_string()]);
        args.extend(self.keys("dst", "src"));
        let mut rx = Proc::spawn("receive", &args.iter().map(String::as_str).collect::<Vec<_>>());
        let addr = rx.wait_line("listening:");
        (rx, addr)
    }

    /// `protect` with `extra` options; returns it and its `control:` socket.
    fn start_protect(&self, addr: &str, extra: &[&str]) -> (Proc, String) {
        let mut args: Vec<String> =
            vec!["protect".into(), "--image".into(), self.path("volume.img")];
        args.extend(["--state".into(), self.path("state"), "--target".into(), addr.into()]);
        args.extend(self.keys("src", "dst"));
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut px = Proc::spawn("protect", &args.iter().map(String::as_str).collect::<Vec<_>>());
        let socket = px.wait_line("control:");
        (px, socket)
    }

    fn state(&self) -> PathBuf {
        self.root.join("state")
    }

    /// Waits until protect is in diff sync with everything acknowledged, after `sessions`
    /// sessions.
    fn caught_up(&self, sessions: u64) {
        let after = now_ms();
        wait_status(&self.state(), "diff sync, everything acknowledged", |v| {
            v["updated_ms"].as_u64().is_some_and(|t| t > after)
                && v["stage"] == "diff sync"
                && u(v, "/shipper/sessions") >= sessions
                && u(v, "/shipper/acked") >= u(v, "/tap/last_seq")
        });
    }

    fn verify(&self, extra: &[&str]) -> (i32, Value) {
        let state = self.path("state");
        let mut args = vec!["verify", "--state", &state, "--json"];
        args.extend_from_slice(extra);
        let out = tidemark_out(&args);
        let code = out.status.code().expect("verify exited with a code");
        let doc = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("verify --json printed no JSON ({e}): {}", text(&out)));
        (code, doc)
    }
}

fn ranges(doc: &Value) -> Vec<(u64, u64)> {
    doc["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["start"].as_u64().unwrap(), r["end"].as_u64().unwrap()))
        .collect()
}

/// Whole leaves of `leaf` bytes covering `(offset, len)` pieces, coalesced.
fn leaves(pieces: &[(u64, u64)], leaf: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(off, len) in pieces {
        let (s, e) = (off / leaf * leaf, (off + len).div_ceil(leaf) * leaf);
        match out.last_mut() {
            Some(last) if last.1 >= s => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

fn root_or_skip(name: &str) -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    let _ =
        writeln!(std::io::stderr(), "SKIP {name}: not root: this test runs protect and receive");
    false
}

/// One request on a control socket, one answer.
fn ask(socket: &str, req: Value) -> Value {
    let mut s = UnixStream::connect(socket).unwrap();
    s.write_all(format!("{req}\n").as_bytes()).unwrap();
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).expect("control answer is JSON")
}

#[test]
fn without_an_agent_and_with_bad_names_the_commands_explain() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().display().to_string();
    let out = tidemark_out(&["verify", "--state", &state]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("no tidemark protect is running on"), "{}", text(&out));
    // A stale socket (its process died) is no agent either.
    drop(std::os::unix::net::UnixListener::bind(tmp.path().join("control.sock")).unwrap());
    let out = tidemark_out(&["bookmark", "nightly", "--state", &state]);
    assert!(!out.status.success());
    assert!(text(&out).contains("no tidemark protect is running on"), "{}", text(&out));
    let long = "x".repeat(256);
    for (name, why) in [
        ("", "must not be empty"),
        (long.as_str(), "longer than 255 bytes"),
        ("two\nlines", "control characters"),
        ("  ", "only whitespace"),
    ] {
        let out = tidemark_out(&["bookmark", name, "--state", &state]);
        assert!(!out.status.success(), "{name:?} accepted");
        let t = text(&out);
        assert!(t.contains("bad bookmark name") && t.contains(why), "{name:?}: {t}");
    }
    let out = tidemark_out(&["verify", "--state", &state, "--range", "9..3"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("START must be below END"), "{}", text(&out));
}

#[test]
fn verify_finds_identical_then_exactly_the_damaged_ranges() {
    if !root_or_skip("verify_finds_identical_then_exactly_the_damaged_ranges") {
        return;
    }
    let p = Pair::new();
    let (mut rx, addr) = p.start_receive("127.0.0.1:0");
    let (mut px, socket) = p.start_protect(&addr, &["--frontend", "none"]);
    p.caught_up(1);
    assert_eq!(ask(&socket, json!({"v": 1, "op": "hello"}))["role"], "protect");

    let (code, doc) = p.verify(&[]);
    assert_eq!(code, 0, "{doc:#}");
    assert_eq!(doc["identical"], true, "{doc:#}");
    assert_eq!(doc["compared_bytes"], VOLUME);
    let leaf = doc["leaf_bytes"].as_u64().unwrap();

    // The source diverges behind the tap's back (no frontend captures it).
    let pieces = [(1 << 20, 4096), (9 << 20, 100), ((30 << 20) + 4000, 300), (50 << 20, 3 * 4096)];
    let img = std::fs::OpenOptions::new().write(true).open(p.root.join("volume.img")).unwrap();
    for (i, &(off, len)) in pieces.iter().enumerate() {
        img.write_all_at(&pattern(40 + i as u64, len as usize), off).unwrap();
    }
    img.sync_all().unwrap();
    let (code, doc) = p.verify(&[]);
    assert_eq!(code, 1, "{doc:#}");
    let want = leaves(&pieces, leaf);
    assert_eq!(ranges(&doc), want, "{doc:#}");
    assert_eq!(doc["differing_bytes"], want.iter().map(|r| r.1 - r.0).sum::<u64>());
    // Limited to a range: only the differences inside it.
    let (code, doc) = p.verify(&["--range", "8M..40M"]);
    assert_eq!(code, 1, "{doc:#}");
    assert_eq!(ranges(&doc), want[1..3].to_vec(), "{doc:#}");
    // The human form: a count, the bytes, the ranges.
    let state = p.path("state");
    let out = tidemark_out(&["verify", "--state", &state, "--range", "0..2M"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("differ: 1 ranges") && t.contains(&format!("{}..{}", want[0].0, want[0].1)),
        "{t}"
    );

    // The target's state diverges: its base image changed where the journal holds
    // nothing (the initial sync left this zero stretch out), receive restarted. (Killed:
    // a receiver asked to stop waits for its connected source to hang up first.)
    rx.crash();
    let base = std::fs::OpenOptions::new().write(true).open(p.root.join("rx/replica.img")).unwrap();
    let damaged = (40 << 20) + 8192;
    base.write_all_at(&pattern(77, 4096), damaged).unwrap();
    base.sync_all().unwrap();
    drop(base);
    let listen = addr.clone();
    let (mut rx, _) = p.start_receive(&listen);
    p.caught_up(2);
    let (code, doc) = p.verify(&[]);
    assert_eq!(code, 1, "{doc:#}");
    let mut want_all = want.clone();
    want_all.extend(leaves(&[(damaged, 4096)], leaf));
    want_all.sort();
    assert_eq!(ranges(&doc), want_all, "{doc:#}");

    // Server-side name checks, through the socket itself.
    let refused = ask(&socket, json!({"v": 1, "op": "bookmark", "name": ""}));
    assert_eq!(refused["ok"], false);
    assert!(refused["error"].as_str().unwrap().contains("must not be empty"), "{refused}");
    let unknown = ask(&socket, json!({"v": 1, "op": "expose"}));
    assert!(
        unknown["error"]
            .as_str()
            .unwrap()
            .contains("status, verify, bookmark, limits, hold or release"),
        "{unknown}"
    );
    px.terminate();
    rx.terminate();
}

fn materialize(p: &Pair, point: &str, out: &Path) {
    let rx = p.path("rx");
    let text = tidemark(&[
        "recover",
        "--dir",
        &rx,
        "--point",
        point,
        "--materialize",
        &out.display().to_string(),
    ]);
    assert!(text.contains("verified:"), "{text}");
}

fn fsck_clean(image: &Path) {
    let fsck = Command::new("e2fsck").arg("-fn").arg(image).output().unwrap();
    assert!(fsck.status.success(), "e2fsck -fn {}: {}", image.display(), text(&fsck));
}

#[test]
fn bookmarks_through_protect_recover_on_the_target() {
    require_env!("bookmarks_through_protect_recover_on_the_target");
    let p = Pair::new();
    let mut cleanup = Cleanup::default();
    cleanup.root = p.root.clone();
    let (mut rx, addr) = p.start_receive("127.0.0.1:0");
    let fuse = p.path("fuse");
    // Periodic application bookmarks: hooks around each, and the ext4 mounted below frozen
    // (the ticks before it is mounted fail at the freeze: no bookmark, the post hook runs).
    let (hooks, mnt) = (p.root.join("hooks.log"), p.root.join("ext4"));
    let pre = format!("echo \"pre $TIDEMARK_BOOKMARK\" >> {}", hooks.display());
    let post = format!(
        "echo \"post $TIDEMARK_BOOKMARK $TIDEMARK_BOOKMARK_RESULT $TIDEMARK_BOOKMARK_SEQ\" >> {}",
        hooks.display()
    );
    let mnt_s = mnt.display().to_string();
    let (mut px, _) = p.start_protect(
        &addr,
        &[
            "--mountpoint",
            &fuse,
            "--bookmark-every",
            "2s",
            "--bookmark-prefix",
            "every",
            "--bookmark-pre",
            &pre,
            "--bookmark-post",
            &post,
            "--bookmark-freeze",
            &mnt_s,
        ],
    );
    let dev = px.wait_line("device:");
    cleanup.loops.push(dev.clone());
    cleanup.mounts.push(p.root.join("fuse"));
    p.caught_up(1);

    run("mkfs.ext4", &["-q", "-F", "-E", "nodiscard", "-b", "4096", &dev]);
    std::fs::create_dir_all(&mnt).unwrap();
    run("mount", &[&dev, &mnt_s]);
    cleanup.mounts.push(mnt.clone());
    // Written but not synced: the freeze must flush it before the bookmark.
    let before = pattern(500, (3 << 20) + 123);
    std::fs::write(mnt.join("before.bin"), &before).unwrap();

    let state = p.path("state");
    let out = tidemark_out(&[
        "bookmark", "frozen-1", "--state", &state, "--freeze", &mnt_s, "--wait", "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["kind"], "filesystem", "{doc:#}");
    assert!(doc["acked"].as_u64().unwrap() >= doc["seq"].as_u64().unwrap(), "{doc:#}");
    // The filesystem is thawed: writes go on.
    std::fs::write(mnt.join("after.bin"), pattern(501, 1 << 20)).unwrap();

    // A failing pre hook: no bookmark, a clear error, and the post hook still ran.
    let post_mark = p.root.join("post-ran");
    let post = format!("echo \"$TIDEMARK_BOOKMARK_RESULT\" > {}", post_mark.display());
    let out =
        tidemark_out(&["bookmark", "never", "--state", &state, "--pre", "exit 3", "--post", &post]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("pre hook") && text(&out).contains("no bookmark taken"),
        "{}",
        text(&out)
    );
    assert_eq!(std::fs::read_to_string(&post_mark).unwrap().trim(), "failed");
    // Freezing what is not a mount of a freezable filesystem is refused clearly.
    let out = tidemark_out(&["bookmark", "nofs", "--state", &state, "--freeze", "/proc"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("FIFREEZE /proc"), "{}", text(&out));

    // A periodic bookmark arrives while the filesystem is mounted (every 2 s), frozen and
    // between its hooks.
    let rx_dir = p.path("rx");
    let all_points = || -> Vec<Value> {
        let doc: Value =
            serde_json::from_str(&tidemark(&["points", "--dir", &rx_dir, "--json"])).unwrap();
        doc["points"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["bookmark"].is_string())
            .cloned()
            .collect()
    };
    let points = |filter: &dyn Fn(&str) -> bool| -> Vec<String> {
        all_points()
            .iter()
            .filter_map(|p| p["bookmark"].as_str().map(str::to_owned))
            .filter(|n| filter(n))
            .collect()
    };
    let until = std::time::Instant::now() + PATIENCE;
    let periodic = loop {
        if let Some(p) =
            all_points().into_iter().find(|p| p["bookmark"].as_str().unwrap().starts_with("every-"))
        {
            break p;
        }
        assert!(std::time::Instant::now() < until, "no periodic bookmark reached the target");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    run("umount", &[&mnt_s]);
    cleanup.mounts.pop();
    let (name, seq) = (periodic["bookmark"].as_str().unwrap(), u(&periodic, "/seq"));
    assert_eq!(periodic["bookmark_kind"], "application", "{periodic:#}");
    let log = std::fs::read_to_string(&hooks).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    let at =
        lines.iter().position(|l| *l == format!("pre {name}")).unwrap_or_else(|| panic!("{log}"));
    assert_eq!(lines.get(at + 1).copied(), Some(format!("post {name} ok {seq}").as_str()), "{log}");
    // Unmounted, the next tick cannot freeze (the directory is no mount's root, and what
    // holds it is never frozen instead): no bookmark, and the post hook says so.
    let until = std::time::Instant::now() + PATIENCE;
    loop {
        let log = std::fs::read_to_string(&hooks).unwrap();
        let failed = log
            .lines()
            .skip(at + 2)
            .find(|l| l.starts_with("post every-") && l.ends_with(" failed "));
        if let Some(l) = failed {
            let name = l.split(' ').nth(1).unwrap();
            assert!(!points(&|n: &str| n == name).contains(&name.to_owned()), "{name} was taken");
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "no periodic tick failed after the umount: {log}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let named = points(&|n: &str| !n.starts_with("every-"));
    assert_eq!(named, vec!["frozen-1".to_owned()], "the failed bookmarks must not exist");
    let human = tidemark(&["points", "--dir", &rx_dir]);
    assert!(human.contains("frozen-1"), "{human}");

    // The frozen bookmark recovers to a clean filesystem holding what was written before.
    let img = p.root.join("frozen-1.img");
    materialize(&p, "bookmark:frozen-1", &img);
    fsck_clean(&img);
    let check = p.root.join("check");
    std::fs::create_dir_all(&check).unwrap();
    let check_s = check.display().to_string();
    run("mount", &["-o", "loop,ro", &img.display().to_string(), &check_s]);
    cleanup.mounts.push(check.clone());
    let got = std::fs::read(check.join("before.bin")).unwrap();
    let after_exists = check.join("after.bin").exists();
    run("umount", &[&check_s]);
    cleanup.mounts.pop();
    assert!(got == before, "before.bin differs in the bookmark's recovery");
    assert!(!after_exists, "after.bin was written after the bookmark");

    px.terminate();
    cleanup.loops.clear();
    rx.terminate();
}

#[test]
fn link_limits_change_while_protect_runs() {
    // No receiver: protect keeps trying to connect; the limits live in the agent.
    let p = Pair::new();
    let (mut px, _) = p.start_protect(
        "127.0.0.1:9",
        &["--frontend", "none", "--rate-mib", "50", "--rate-schedule", "08:00-18:00=10"],
    );
    let state = p.path("state");
    let limits = |extra: &[&str]| {
        let mut args = vec!["limits", "--state", state.as_str(), "--json"];
        args.extend_from_slice(extra);
        let out = Command::new(BIN).args(&args).output().unwrap();
        (out.status.success(), text(&out))
    };
    let (ok, out) = limits(&[]);
    assert!(ok, "{out}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["rate_mib"], 50.0, "{doc:#}");
    assert_eq!(doc["schedule"], "08:00-18:00=10", "{doc:#}");
    assert_eq!(doc["resync_slots"], 1, "{doc:#}");

    let (ok, out) =
        limits(&["--rate-mib", "2.5", "--schedule", "22:00-06:00=0@+01:00", "--resync-slots", "3"]);
    assert!(ok, "{out}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["rate_mib"], 2.5, "{doc:#}");
    assert_eq!(doc["schedule"], "22:00-06:00=0@+01:00", "{doc:#}");
    assert_eq!(doc["resync_slots"], 3, "{doc:#}");

    let (ok, out) = limits(&["--rate-mib", "unlimited", "--no-schedule"]);
    assert!(ok, "{out}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["rate_mib"], "unlimited", "{doc:#}");
    assert_eq!(doc["rate_now_mib"], "unlimited", "{doc:#}");
    assert!(doc["schedule"].is_null(), "{doc:#}");

    // Refused, and nothing changed.
    let (ok, out) = limits(&["--schedule", "08:00-18:00=1,12:00-13:00=2"]);
    assert!(!ok && out.contains("overlap"), "{out}");
    let (ok, out) = limits(&["--resync-slots", "0"]);
    assert!(!ok && out.contains("resync_slots 0: expected a whole number from 1 to 64"), "{out}");
    let (ok, out) = limits(&[]);
    assert!(ok, "{out}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["resync_slots"], 3, "{doc:#}");
    assert!(doc["schedule"].is_null(), "{doc:#}");
    px.terminate();
}
