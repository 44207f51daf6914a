//! Consistency groups with real processes (`docs/consistency-groups.md`): two volumes,
//! each protected by its own `tidemark protect` (FUSE + loop frontend) to its own
//! `tidemark receive` on loopback.
//!
//! - A workload makes dependent writes across the two volumes (a counter to volume A, and
//!   only once that write completed the same counter to volume B, in a loop) while group
//!   bookmarks are taken (from the command line with `--state` twice, from the
//!   configuration file's `[group.NAME]`, and periodically by `tidemark up GROUP`); both volumes
//!   recovered at each group bookmark are one state: B's counter is A's or one less, and
//!   each image is the source's volume with that counter.
//! - A hold whose coordinator hangs ends by its lease (the write waiting at the gate goes
//!   through, and the late bookmark is refused); one whose coordinator disconnects ends at
//!   once.
//! - With ext4 on both volumes and `--freeze` for each, both recover fsck-clean with the
//!   data written (not synced) before the bookmark.
//! - A group bookmark one member does not hold (its coordinator died between the members'
//!   bookmarks) is refused by `recover` and `promote`, naming that member.
//! - Failover of the group (`promote --group`): both replicas become the volumes of one
//!   group bookmark, named by id when a newer one has its name; a group promotion that
//!   stopped after the first member is finished by running it again, at the same group.
//!
//! Needs root, /dev/fuse and loop devices; without them it prints a SKIP line and returns.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;
use common::*;

const VOLUME: u64 = 16 << 20;
const PAIRS: [&str; 2] = ["9a0a0123456789abcdef0123456789ab", "9b0b0123456789abcdef0123456789ab"];

struct Member {
    image: PathBuf,
    state: PathBuf,
    rx: PathBuf,
    device: String,
    _procs: (Proc, Proc),
}

fn start_member(root: &Path, i: usize, cleanup: &mut Cleanup) -> (Member, Vec<String>) {
    let p = |rel: &str| root.join(rel).display().to_string();
    let (src, dst) =
        (format!("{}/keys/src.", root.display()), format!("{}/keys/dst.", root.display()));
    let image = root.join(format!("vol{i}.img"));
    let f = std::fs::File::create(&image).unwrap();
    f.set_len(VOLUME).unwrap();
    f.write_all_at(&pattern(40 + i as u64, 256 << 10), 1 << 20).unwrap();
    drop(f);
    let rx_dir = p(&format!("rx{i}"));
    let rx_args = [
        "receive".to_owned(),
        format!("--dir={rx_dir}"),
        "--listen=127.0.0.1:0".to_owned(),
        format!("--key={dst}key"),
        format!("--peer={src}pub"),
        format!("--pair={}", PAIRS[i]),
        format!("--size={VOLUME}"),
    ];
    let rx_refs: Vec<&str> = rx_args.iter().map(String::as_str).collect();
    let mut rx = Proc::spawn("receive", &rx_refs);
    let addr = rx.wait_line("listening:");
    let state = root.join(format!("state{i}"));
    let fuse = root.join(format!("fuse{i}"));
    let px_args = vec![
        "protect".to_owned(),
        format!("--image={}", image.display()),
        format!("--state={}", state.display()),
        format!("--target={addr}"),
        format!("--key={src}key"),
        format!("--peer={dst}pub"),
        format!("--pair={}", PAIRS[i]),
        format!("--mountpoint={}", fuse.display()),
    ];
    let px_refs: Vec<&str> = px_args.iter().map(String::as_str).collect();
    let mut px = Proc::spawn("protect", &px_refs);
    let device = px.wait_line("device:");
    cleanup.loops.push(device.clone());
    cleanup.mounts.push(fuse);
    let member = Member { image, state, rx: PathBuf::from(rx_dir), device, _procs: (rx, px) };
    (member, px_args)
}

/// A 4 KiB block for O_DIRECT: a slice of `buf` aligned to 4096 bytes.
fn aligned(buf: &mut [u8]) -> &mut [u8] {
    let off = (4096 - (buf.as_ptr() as usize) % 4096) % 4096;
    &mut buf[off..off + 4096]
}

fn open_direct(dev: &str) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(dev)
        .unwrap_or_else(|e| panic!("open {dev} with O_DIRECT: {e}"))
}

fn write_counter(f: &std::fs::File, n: u64) {
    let mut buf = vec![0u8; 8192];
    let b = aligned(&mut buf);
    b[..8].copy_from_slice(&n.to_le_bytes());
    b[8..16].copy_from_slice(b"counter!");
    f.write_all_at(b, 0).expect("O_DIRECT write");
}

fn counter_of(image: &Path) -> u64 {
    let mut b = [0u8; 16];
    std::fs::File::open(image).unwrap().read_exact_at(&mut b, 0).unwrap();
    assert_eq!(&b[8..16], b"counter!", "{} holds no counter block", image.display());
    u64::from_le_bytes(b[..8].try_into().unwrap())
}

/// `image` is the source volume `source` with counter `n` in its first block.
fn assert_source_state(image: &Path, source: &Path, n: u64) {
    let got = std::fs::read(image).unwrap();
    let mut want = std::fs::read(source).unwrap();
    want[..4096].fill(0);
    want[..8].copy_from_slice(&n.to_le_bytes());
    want[8..16].copy_from_slice(b"counter!");
    assert_eq!(got.len(), want.len());
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!("{} differs from the source with counter {n} at byte {i}", image.display());
    }
}

/// A raw control connection (a coordinator that can hang or die at will).
struct Raw {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Raw {
    fn connect(state: &Path) -> Raw {
        let s = UnixStream::connect(state.join("control.sock")).expect("control socket");
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        Raw { reader: BufReader::new(s.try_clone().unwrap()), writer: s }
    }

    fn ask(&mut self, mut req: Value) -> Value {
        req["v"] = json!(1);
        writeln!(self.writer, "{req}").unwrap();
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("answer {line:?}: {e}"))
    }
}

fn status(state: &Path) -> Value {
    let v = Raw::connect(state).ask(json!({"op": "status"}));
    assert_eq!(v["ok"], true, "{v}");
    v
}

/// Runs `tidemark ARGS`, expecting failure; its stderr.
fn tidemark_fails(args: &[&str]) -> String {
    let out = std::process::Command::new(BIN).args(args).output().unwrap();
    assert!(
        !out.status.success(),
        "tidemark {args:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Recovers both receive directories at group bookmark `name` (through the running
/// receivers, `extra` naming the members); checks the cut and returns the two counters.
fn recover_and_check(members: &[Member], root: &Path, name: &str, extra: &[&str]) -> (u64, u64) {
    let outs = [root.join(format!("{name}-a.img")), root.join(format!("{name}-b.img"))];
    let (oa, ob) = (outs[0].display().to_string(), outs[1].display().to_string());
    let point = format!("bookmark:{name}");
    let mut args = vec![
        "recover",
        "--point",
        point.as_str(),
        "--materialize",
        oa.as_str(),
        "--materialize",
        ob.as_str(),
    ];
    args.extend_from_slice(extra);
    let out = tidemark(&args);
    assert!(out.contains("group: "), "{out}");
    assert_eq!(out.matches("verified:").count(), 2, "{out}");
    let (a, b) = (counter_of(&outs[0]), counter_of(&outs[1]));
    assert!(b <= a && a - b <= 1, "group bookmark {name}: A's counter {a}, B's {b}: not one cut");
    assert_source_state(&outs[0], &members[0].image, a);
    assert_source_state(&outs[1], &members[1].image, b);
    (a, b)
}

#[test]
fn group_bookmarks_recover_both_volumes_to_one_cut() {
    require_env!("group_bookmarks_recover_both_volumes_to_one_cut");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let keys = root.join("keys").display().to_string();
    tidemark(&["keygen", "--dir", &keys, "--name", "src"]);
    tidemark(&["keygen", "--dir", &keys, "--name", "dst"]);
    let mut cleanup = Cleanup::default();
    cleanup.root = root.clone();
    let (a, a_args) = start_member(&root, 0, &mut cleanup);
    let (b, b_args) = start_member(&root, 1, &mut cleanup);
    let members = [a, b];
    for m in &members {
        wait_caught_up(&m.state);
    }
    let (sa, sb) = (members[0].state.display().to_string(), members[1].state.display().to_string());

    // The configuration file naming both protect pairs and both receive pairs as groups.
    let mut conf = String::from("version = 1\n");
    for (i, args) in [&a_args, &b_args].iter().enumerate() {
        conf.push_str(&format!("\n[pair.src{i}]\nrole = \"protect\"\n"));
        for arg in &args[1..] {
            let (k, v) = arg.trim_start_matches("--").split_once('=').unwrap();
            conf.push_str(&format!("{k} = {v:?}\n"));
        }
        conf.push_str(&format!(
            "\n[pair.dst{i}]\nrole = \"receive\"\nlisten = \"127.0.0.1:0\"\ndir = {:?}\nkey = \"{keys}/dst.key\"\npeer = \"{keys}/src.pub\"\nid = {:?}\nsize = {VOLUME}\n",
            members[i].rx.display().to_string(),
            PAIRS[i]
        ));
    }
    conf.push_str("\n[group.shop]\npairs = [\"src0\", \"src1\"]\nbookmark_every = \"1s\"\n\n[group.shop-dr]\npairs = [\"dst0\", \"dst1\"]\n");
    let config = root.join("tidemark.toml");
    std::fs::write(&config, &conf).unwrap();
    let config_s = config.display().to_string();
    let checked = tidemark(&["config", "check", &config_s]);
    assert!(checked.contains("group shop (protect): src0, src1"), "{checked}");

    // The workload: dependent writes across the two volumes.
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let writer = {
        let (da, db) = (open_direct(&members[0].device), open_direct(&members[1].device));
        let (stop, count) = (stop.clone(), count.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                write_counter(&da, n);
                write_counter(&db, n);
                count.store(n, Ordering::Relaxed);
            }
        })
    };
    let wait_count = |beyond: u64| {
        let until = Instant::now() + PATIENCE;
        while count.load(Ordering::Relaxed) < beyond {
            assert!(
                Instant::now() < until,
                "the workload stalled at {}",
                count.load(Ordering::Relaxed)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_count(20);
    let taken: Value = serde_json::from_str(&tidemark(&[
        "bookmark", "cut-1", "--state", &sa, "--state", &sb, "--json",
    ]))
    .unwrap();
    let group1 = taken["group"].as_str().expect("group id").to_owned();
    assert_eq!(taken["members"].as_array().unwrap().len(), 2, "{taken}");
    let c = count.load(Ordering::Relaxed);
    wait_count(c + 20);
    let by_config = tidemark(&["bookmark", "cut-2", "--group", "shop", "--config", &config_s]);
    assert!(by_config.contains("2 members"), "{by_config}");
    let c = count.load(Ordering::Relaxed);
    wait_count(c + 20);
    // Periodic group bookmarks, while the workload goes on (`bookmark_every` of the group,
    // run as the systemd unit runs it).
    let mut periodic = Proc::spawn("up shop", &["up", "shop", "--config", &config_s]);
    periodic.wait_line("taking bookmark \"auto-TIME\" every 1 s");
    let until = Instant::now() + PATIENCE;
    let auto_names = loop {
        let names: Vec<String> = periodic
            .lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| {
                l.strip_prefix("group bookmark \"")?.split('"').next().map(str::to_owned)
            })
            .collect();
        if names.len() >= 2 {
            break names;
        }
        assert!(Instant::now() < until, "periodic group bookmarks: {names:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    periodic.terminate();
    let stopped = periodic.wait_line("stopped:");
    assert!(stopped.ends_with("bookmarks taken, 0 failed"), "{stopped}");
    assert!(auto_names[0] < auto_names[1], "{auto_names:?}");
    assert!(
        auto_names.iter().all(|n| n.starts_with("auto-20") && n.ends_with('Z')),
        "{auto_names:?}"
    );
    let c = count.load(Ordering::Relaxed);
    wait_count(c + 20);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let last = count.load(Ordering::Relaxed);
    for m in &members {
        wait_caught_up(&m.state);
    }

    // `points` shows the group bookmark with its id, on both members.
    for m in &members {
        let doc: Value = serde_json::from_str(&tidemark(&[
            "points",
            "--dir",
            &m.rx.display().to_string(),
            "--json",
        ]))
        .unwrap();
        let p =
            doc["points"].as_array().unwrap().iter().find(|p| p["bookmark"] == "cut-1").cloned();
        assert_eq!(p.as_ref().map(|p| p["group"].clone()), Some(json!(group1)), "{doc:#}");
    }

    let (ra, rb) = (members[0].rx.display().to_string(), members[1].rx.display().to_string());
    let (a1, _) = recover_and_check(&members, &root, "cut-1", &["--dir", &ra, "--dir", &rb]);
    let (a2, _) =
        recover_and_check(&members, &root, "cut-2", &["--group", "shop-dr", "--config", &config_s]);
    let (a3, _) = recover_and_check(&members, &root, &auto_names[1], &["--dir", &ra, "--dir", &rb]);
    assert!(0 < a1 && a1 < a2 && a2 < a3 && a3 < last, "cuts at {a1}, {a2}, {a3} of {last} writes");
    println!("group cuts: A at {a1}, {a2} and {a3} (periodic) of {last} dependent writes");
    // A newer group bookmark of the same name, which the promotion below must not take for
    // the one it names by id.
    let group2 = by_config.split("group ").nth(2).and_then(|t| t.split(',').next()).unwrap();
    assert_eq!(group2.len(), 16, "{by_config}");
    tidemark(&["bookmark", "cut-2", "--state", &sa, "--state", &sb, "--wait"]);

    // Exposed rather than copied: both read-only snapshots show the same cut.
    let mut exposed = Proc::spawn(
        "recover",
        &["recover", "--dir", &ra, "--dir", &rb, "--point", "bookmark:cut-1", "--expose", "ro"],
    );
    exposed.wait_line("ready:");
    let devices: Vec<String> = exposed
        .lines
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| l.strip_prefix("device: ").map(str::to_owned))
        .collect();
    assert_eq!(devices.len(), 2, "{devices:?}");
    let seen: Vec<u64> = devices.iter().map(|d| counter_of(Path::new(d))).collect();
    assert_eq!(seen[0], a1, "the exposed A differs from the materialized A");
    assert!(seen[1] <= seen[0] && seen[0] - seen[1] <= 1, "exposed cut {seen:?}");
    exposed.terminate();

    // A coordinator that hangs: its hold ends by its lease, the waiting write goes
    // through, and its late bookmark is refused.
    let mut hung = Raw::connect(&members[0].state);
    let waited_before = status(&members[0].state)["hold"]["waited"].as_u64().unwrap();
    let held_at = Instant::now();
    let h = hung.ask(json!({"op": "hold", "lease_s": 2.0}));
    assert_eq!(h["ok"], true, "{h}");
    let token = h["token"].as_u64().unwrap();
    let blocked = {
        let dev = members[0].device.clone();
        std::thread::spawn(move || {
            write_counter(&open_direct(&dev), last + 1);
            Instant::now()
        })
    };
    let done = blocked.join().unwrap();
    assert!(
        done - held_at >= Duration::from_secs(2),
        "the write passed the hold after {:?}",
        done - held_at
    );
    let st = status(&members[0].state);
    assert!(
        st["hold"]["waited"].as_u64().unwrap() > waited_before,
        "the write never waited at the hold: {st}"
    );
    assert_eq!(
        (st["hold"]["token"].clone(), st["hold"]["expired"].clone()),
        (Value::Null, json!(1)),
        "{st}"
    );
    let late = hung
        .ask(json!({"op": "bookmark", "name": "late", "group": "00000000000000aa", "hold": token}));
    assert_eq!(late["ok"], false, "{late}");
    assert!(late["error"].as_str().unwrap().contains("lease ran out"), "{late}");
    drop(hung);

    // A coordinator that disconnects: its hold ends at once, long before the lease.
    let mut gone = Raw::connect(&members[1].state);
    assert_eq!(gone.ask(json!({"op": "hold", "lease_s": 50.0}))["ok"], true);
    let dropped_at = Instant::now();
    drop(gone);
    write_counter(&open_direct(&members[1].device), last + 1);
    assert!(
        dropped_at.elapsed() < Duration::from_secs(20),
        "the write waited {:?}",
        dropped_at.elapsed()
    );
    assert_eq!(status(&members[1].state)["hold"]["token"], Value::Null);

    // A coordinator that died between the members' bookmarks: only A holds group "cut-3".
    let (mut ca, mut cb) = (Raw::connect(&members[0].state), Raw::connect(&members[1].state));
    let ta = ca.ask(json!({"op": "hold"}))["token"].as_u64().unwrap();
    let _tb = cb.ask(json!({"op": "hold"}))["token"].as_u64().unwrap();
    let part =
        ca.ask(json!({"op": "bookmark", "name": "cut-3", "group": "00000000000000c3", "hold": ta}));
    assert_eq!(part["ok"], true, "{part}");
    drop((ca, cb));
    for m in &members {
        wait_caught_up(&m.state);
    }
    let recover_fails = |point: &str| {
        let o = root.join("partial.img").display().to_string();
        let args = ["recover", "--dir", &ra, "--dir", &rb, "--point", point];
        tidemark_fails(&[&args[..], &["--materialize", &o, "--materialize", &o]].concat())
    };
    let e = recover_fails("bookmark:cut-3");
    assert!(e.contains(&format!("member {rb} does not hold it")), "{e}");
    assert!(e.contains("not held by every member"), "{e}");
    // A group point is a group bookmark: other points are refused for a group.
    let e = recover_fails("latest");
    assert!(e.contains("group bookmark"), "{e}");
    // `points` of the group tells the points of the group from the partial ones.
    let doc: Value =
        serde_json::from_str(&tidemark(&["points", "--dir", &ra, "--dir", &rb, "--json"])).unwrap();
    let mark = |name: &str| {
        doc["bookmarks"].as_array().unwrap().iter().find(|b| b["name"] == name).cloned()
    };
    let (c1, c3) = (mark("cut-1").expect("cut-1 listed"), mark("cut-3").expect("cut-3 listed"));
    assert_eq!(
        (c1["complete"].clone(), c1["group"].clone()),
        (json!(true), json!(group1)),
        "{doc:#}"
    );
    assert!(c1["seqs"].as_array().unwrap().iter().all(Value::is_u64), "{doc:#}");
    assert_eq!(c3["complete"], false, "{doc:#}");
    assert!(c3["seqs"][0].is_u64() && c3["seqs"][1].is_null(), "{doc:#}");
    let table = tidemark(&["points", "--group", "shop-dr", "--config", &config_s]);
    let row = |name: &str| table.lines().find(|l| l.ends_with(name)).unwrap_or("").to_owned();
    assert!(row("cut-1").contains("complete") && row("cut-3").contains("partial"), "{table}");

    // Bad invocations are refused before anything is held.
    let granted = status(&members[0].state)["hold"]["granted"].clone();
    let e = tidemark_fails(&["bookmark", "x", "--state", &sa, "--state", &sb, "--freeze", "/"]);
    assert!(e.contains("1 mountpoints for 2 members"), "{e}");
    let e = tidemark_fails(&["bookmark", "x", "--group", "nope", "--config", &config_s]);
    assert!(e.contains("no group named \"nope\"") && e.contains("shop, shop-dr"), "{e}");
    let e = tidemark_fails(&["bookmark", "x", "--group", "shop-dr", "--config", &config_s]);
    assert!(e.contains("group `shop-dr` is a group of receive pairs"), "{e}");
    assert_eq!(status(&members[0].state)["hold"]["granted"], granted, "a refused call held writes");

    // With ext4 on both volumes, frozen by their agents around the cut: both recover
    // fsck-clean with the data written (not synced) before the bookmark.
    let mut mounts = Vec::new();
    for (i, m) in members.iter().enumerate() {
        run("mkfs.ext4", &["-q", "-F", "-E", "nodiscard", "-b", "4096", &m.device]);
        let mnt = root.join(format!("ext4-{i}"));
        std::fs::create_dir_all(&mnt).unwrap();
        let mnt_s = mnt.display().to_string();
        run("mount", &[&m.device, &mnt_s]);
        cleanup.mounts.push(mnt.clone());
        std::fs::write(mnt.join("before.bin"), pattern(600 + i as u64, (1 << 20) + 77)).unwrap();
        mounts.push(mnt_s);
    }
    let doc: Value = serde_json::from_str(&tidemark(&[
        "bookmark", "fs-cut", "--state", &sa, "--state", &sb, "--freeze", &mounts[0], "--freeze",
        &mounts[1], "--wait", "--json",
    ]))
    .unwrap();
    assert_eq!(
        (doc["kind"].clone(), doc["acked"].clone()),
        (json!("filesystem"), json!(true)),
        "{doc:#}"
    );
    // Thawed: writes go on.
    for mnt in &mounts {
        std::fs::write(Path::new(mnt).join("after.bin"), pattern(700, 1 << 20)).unwrap();
    }
    assert_eq!(status(&members[0].state)["hold"]["token"], Value::Null);
    let outs = [root.join("fs-a.img"), root.join("fs-b.img")];
    let (oa, ob) = (outs[0].display().to_string(), outs[1].display().to_string());
    tidemark(&[
        "recover",
        "--dir",
        &ra,
        "--dir",
        &rb,
        "--point",
        "bookmark:fs-cut",
        "--materialize",
        &oa,
        "--materialize",
        &ob,
    ]);
    for (i, out) in outs.iter().enumerate() {
        let o = out.display().to_string();
        run("e2fsck", &["-fn", &o]);
        let got = root.join(format!("before-{i}.bin"));
        run("debugfs", &["-R", &format!("dump /before.bin {}", got.display()), &o]);
        assert!(
            std::fs::read(&got).unwrap() == pattern(600 + i as u64, (1 << 20) + 77),
            "{o}: before.bin differs from what was written before the group bookmark"
        );
    }
    for mnt in mounts.iter().rev() {
        run("umount", &[mnt]);
        cleanup.mounts.pop();
    }

    for m in members {
        let Member { _procs: (mut rx, mut px), .. } = m;
        px.terminate();
        rx.terminate();
    }

    // Failover of the group at the (older) cut-2: both replicas become the volumes of that
    // cut. First, a bookmark not every member holds is refused with nothing touched.
    let touched =
        |d: &str| ["promote.json", "promoted.json"].iter().any(|f| Path::new(d).join(f).exists());
    let e = tidemark_fails(&["promote", "--dir", &ra, "--dir", &rb, "--point", "bookmark:cut-3"]);
    assert!(e.contains("not held by every member"), "{e}");
    let e = tidemark_fails(&["promote", "--dir", &ra, "--dir", &rb, "--point", "latest"]);
    assert!(e.contains("group bookmark"), "{e}");
    let e = tidemark_fails(&[
        "promote",
        "--dir",
        &ra,
        "--dir",
        &rb,
        "--point",
        "bookmark:cut-2",
        "--require-seq",
        "1",
    ]);
    assert!(e.contains("1 sequence numbers for 2 members"), "{e}");
    assert!(!touched(&ra) && !touched(&rb), "a refused group promotion touched a member");
    // B as it is before the promotion, to play a promotion that stopped after A.
    let rb_before = root.join("rx1-before").display().to_string();
    run("cp", &["-a", &rb, &rb_before]);
    let out = tidemark(&[
        "promote",
        "--group",
        "shop-dr",
        "--config",
        &config_s,
        "--point",
        "bookmark:cut-2",
        "--group-id",
        group2,
    ]);
    assert!(out.contains(&format!("promoted: group {group2}")), "{out}");
    let image = |d: &str| std::fs::read(Path::new(d).join("replica.img")).unwrap();
    let cut2 = |x: &str| std::fs::read(root.join(format!("cut-2-{x}.img"))).unwrap();
    assert!(image(&ra) == cut2("a"), "A's promoted image is not A at cut-2");
    assert!(image(&rb) == cut2("b"), "B's promoted image is not B at cut-2");
    let promoted_b = image(&rb);
    std::fs::remove_dir_all(&rb).unwrap();
    std::fs::rename(&rb_before, &rb).unwrap();
    assert!(image(&rb) != promoted_b, "B's replica was already at cut-2 before its promotion");
    // Run again (without the id): A is left as it is, and B is promoted at A's group, not
    // at the newer cut-2.
    let out = tidemark(&["promote", "--dir", &ra, "--dir", &rb, "--point", "bookmark:cut-2"]);
    assert!(out.contains("already promoted") && out.contains(group2), "{out}");
    assert!(image(&rb) == promoted_b, "the finished group promotion gave B another image");
    let e = tidemark_fails(&["promote", "--dir", &ra, "--dir", &rb, "--point", "bookmark:cut-2"]);
    assert!(e.contains("every member was already promoted"), "{e}");
}
