//! Failover and failback with the real binaries, as root (FUSE, loop devices, mkfs.ext4,
//! e2fsck; without them the test prints a SKIP line and returns).
//!
//! Site A protects an ext4 volume to site B. Planned failover: A's `protect` stops on SIGTERM
//! (drain: everything spooled acknowledged, checked in its final status.json, the last event
//! its `--final-bookmark`), B's receiver stops, `promote --point bookmark:NAME --require-seq`
//! folds B's journal into its image: fsck clean, identical to A's volume, every file written
//! before the drain with its checksum. B's image is then written to (loop mount). Failback:
//! A runs `receive --replica` over its old volume, B runs `protect` over the promoted image
//! (`--failback` implied for a new protection of it): a fast resync of the whole volume that
//! moves only what differs (ratio to the truly differing 4 KiB blocks reported), then diff
//! sync with more writes through B's FUSE frontend; then a planned failover back: A's volume
//! ends identical to B's and fsck clean.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

mod common;
use common::*;

const PAIR: &str = "fa11bac0123456789abcdef012345678";
const VOLUME: u64 = 64 << 20;

struct Sites {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Sites {
    fn new() -> Sites {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let keys = root.join("keys").display().to_string();
        tidemark(&["keygen", "--dir", &keys, "--name", "a"]);
        tidemark(&["keygen", "--dir", &keys, "--name", "b"]);
        let f = std::fs::File::create(root.join("a-volume.img")).unwrap();
        f.set_len(VOLUME).unwrap();
        Sites { _tmp: tmp, root }
    }

    fn p(&self, rel: &str) -> String {
        self.root.join(rel).display().to_string()
    }

    /// `receive` on `dir` with node `me`'s key (`extra`: more options).
    fn receive(&self, dir: &str, me: &str, peer: &str, extra: &[&str]) -> (Proc, String) {
        let size = VOLUME.to_string();
        let (d, k, pk) =
            (self.p(dir), self.p(&format!("keys/{me}.key")), self.p(&format!("keys/{peer}.pub")));
        let mut args = vec![
            "receive",
            "--dir",
            &d,
            "--listen",
            "127.0.0.1:0",
            "--key",
            &k,
            "--peer",
            &pk,
            "--pair",
            PAIR,
            "--size",
            &size,
        ];
        args.extend_from_slice(extra);
        let mut rx = Proc::spawn("receive", &args);
        let addr = rx.wait_line("listening:");
        (rx, addr)
    }

    /// `protect` of `image` with `state`, node `me`, to `addr`, with `more` options.
    fn spawn_protect(
        &self,
        (image, state, me, peer, addr): (&str, &str, &str, &str, &str),
        more: &[&str],
    ) -> Proc {
        let (i, s, k, pk) = (
            self.p(image),
            self.p(state),
            self.p(&format!("keys/{me}.key")),
            self.p(&format!("keys/{peer}.pub")),
        );
        let mut args = vec!["protect", "--image", &i, "--state", &s, "--target", addr, "--key", &k];
        args.extend(["--peer", &pk, "--pair", PAIR, "--name", me]);
        args.extend_from_slice(more);
        Proc::spawn("protect", &args)
    }

    fn protect(
        &self,
        image: &str,
        state: &str,
        me: &str,
        peer: &str,
        addr: &str,
        extra: &[&str],
    ) -> (Proc, String) {
        let mnt = self.p(&format!("{state}-fuse"));
        let mut more = vec!["--mountpoint", &mnt];
        more.extend_from_slice(extra);
        let mut px = self.spawn_protect((image, state, me, peer, addr), &more);
        let dev = px.wait_line("device:");
        assert!(dev.starts_with("/dev/loop"), "device line {dev:?}");
        (px, dev)
    }

    /// `protect --frontend none` (no FUSE, no loop device: needs no root).
    fn protect_bare(&self, who: (&str, &str, &str, &str, &str), extra: &[&str]) -> Proc {
        let mut more = vec!["--frontend", "none"];
        more.extend_from_slice(extra);
        self.spawn_protect(who, &more)
    }
}

/// Stops `protect` (SIGTERM: drain) and returns the last seq it spooled, checking in its
/// final status that the target acknowledged all of it.
fn drain(px: &mut Proc, state: &Path) -> u64 {
    px.terminate();
    let st: Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("status.json")).unwrap()).unwrap();
    assert_eq!(st["state"], "stopped", "{st:#}");
    let last = u(&st, "/tap/last_seq");
    assert!(u(&st, "/shipper/acked") >= last, "the drain left writes unacknowledged: {st:#}");
    last
}

/// Writes files into the ext4 file system on `dev`; returns (path in fs, blake3).
fn write_files(
    dev: &str,
    mnt: &Path,
    cleanup: &mut Cleanup,
    seed: u64,
    n: u64,
) -> Vec<(String, String)> {
    std::fs::create_dir_all(mnt).unwrap();
    run("mount", &[dev, &mnt.display().to_string()]);
    cleanup.mounts.push(mnt.to_path_buf());
    let mut sums = Vec::new();
    for i in 0..n {
        let rel = format!("d{seed}/f{i}");
        std::fs::create_dir_all(mnt.join(format!("d{seed}"))).unwrap();
        let data = pattern(seed * 100 + i, (512 << 10) + (i as usize) * 4096 + 13);
        let mut f = std::fs::File::create(mnt.join(&rel)).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        sums.push((rel, blake3::hash(&data).to_hex().to_string()));
    }
    run("sync", &[]);
    run("umount", &[&mnt.display().to_string()]);
    cleanup.mounts.pop();
    sums
}

/// Mounts `image` through a loop device, checks every file's checksum.
fn check_files(image: &Path, mnt: &Path, cleanup: &mut Cleanup, sums: &[(String, String)]) {
    let dev = run("losetup", &["-f", "--show", &image.display().to_string()]).trim().to_owned();
    cleanup.loops.push(dev.clone());
    std::fs::create_dir_all(mnt).unwrap();
    run("mount", &["-o", "ro", &dev, &mnt.display().to_string()]);
    cleanup.mounts.push(mnt.to_path_buf());
    for (rel, sum) in sums {
        let data = std::fs::read(mnt.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert_eq!(&blake3::hash(&data).to_hex().to_string(), sum, "{rel} has other contents");
    }
    run("umount", &[&mnt.display().to_string()]);
    cleanup.mounts.pop();
    run("losetup", &["-d", &dev]);
    cleanup.loops.pop();
}

fn fsck_clean(image: &Path) {
    let out = Command::new("e2fsck").args(["-fn"]).arg(image).output().unwrap();
    assert!(
        out.status.success(),
        "e2fsck of {}: {}{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn read_all(p: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    std::fs::File::open(p).unwrap().read_to_end(&mut v).unwrap();
    v
}

/// Bytes of the 4 KiB blocks that differ between two images.
fn differing_bytes(a: &Path, b: &Path) -> u64 {
    let (a, b) = (read_all(a), read_all(b));
    assert_eq!(a.len(), b.len());
    a.chunks(4096).zip(b.chunks(4096)).filter(|(x, y)| x != y).count() as u64 * 4096
}

#[test]
fn planned_failover_then_failback_with_fast_resync() {
    require_env!("planned_failover_then_failback_with_fast_resync");
    let s = Sites::new();
    let mut cleanup = Cleanup::default();
    cleanup.root = s.root.clone();
    let a_image = s.root.join("a-volume.img");
    let b_image = s.root.join("b/replica.img");

    // A protects its volume to B.
    let (mut rx_b, addr) = s.receive("b", "b", "a", &[]);
    let (mut px_a, dev) =
        s.protect("a-volume.img", "a-state", "a", "b", &addr, &["--final-bookmark", "failover"]);
    cleanup.loops.push(dev.clone());
    cleanup.mounts.push(s.root.join("a-state-fuse"));
    wait_status(&s.root.join("a-state"), "the initial sync", |v| {
        v["stage"] == "diff sync" && u(v, "/resyncs") >= 1
    });
    run("mkfs.ext4", &["-q", "-F", "-E", "nodiscard", "-b", "4096", &dev]);
    let mut sums = write_files(&dev, &s.root.join("mnt"), &mut cleanup, 1, 8);
    wait_caught_up(&s.root.join("a-state"));

    // Planned failover to B: the drain ends with the final bookmark, the last event.
    let last = drain(&mut px_a, &s.root.join("a-state"));
    let final_line =
        px_a.lines.lock().unwrap().iter().find(|l| l.starts_with("final bookmark")).cloned();
    assert_eq!(final_line, Some(format!("final bookmark \"failover\": seq {last}")));
    cleanup.loops.clear();
    cleanup.mounts.clear();
    rx_b.terminate();
    let out = tidemark(&[
        "promote",
        "--dir",
        &s.p("b"),
        "--point",
        "bookmark:failover",
        "--require-seq",
        &last.to_string(),
    ]);
    assert!(out.contains("promoted:"), "{out}");
    let record: Value =
        serde_json::from_str(&std::fs::read_to_string(s.root.join("b/promoted.json")).unwrap())
            .unwrap();
    assert_eq!(u(&record, "/seq"), last, "{record:#}");
    assert!(record["kind"].as_str().unwrap().contains("failover"), "{record:#}");
    assert!(!s.root.join("b/promote.json").exists());
    // A second promotion is refused.
    let again = Command::new(BIN).args(["promote", "--dir", &s.p("b")]).output().unwrap();
    assert!(!again.status.success(), "a promoted directory was promoted again");
    fsck_clean(&b_image);
    assert_eq!(read_all(&a_image), read_all(&b_image), "planned failover lost writes");
    check_files(&b_image, &s.root.join("mnt"), &mut cleanup, &sums);

    // B is live: written to through a loop device.
    let dev_b = run("losetup", &["-f", "--show", &b_image.display().to_string()]).trim().to_owned();
    cleanup.loops.push(dev_b.clone());
    sums.extend(write_files(&dev_b, &s.root.join("mnt"), &mut cleanup, 2, 3));
    run("losetup", &["-d", &dev_b]);
    cleanup.loops.pop();
    let differ = differing_bytes(&a_image, &b_image);
    assert!(differ > 0, "B's writes changed nothing");

    // Failback: A receives over its old volume, B protects in reverse with a fast resync
    // (implied: B's image is a promoted replica and its protection is new).
    let a_vol = a_image.display().to_string();
    let (mut rx_a, addr) =
        s.receive("a-rx", "a", "b", &["--replica", &a_vol, "--old-state", &s.p("a-state")]);
    let (mut px_b, dev) = s.protect("b/replica.img", "b-state", "b", "a", &addr, &[]);
    assert!(
        px_b.lines.lock().unwrap().iter().any(|l| l.starts_with("failback: ")),
        "a new protection of the promoted image did not start as a failback"
    );
    cleanup.loops.push(dev.clone());
    cleanup.mounts.push(s.root.join("b-state-fuse"));
    let st = wait_status(&s.root.join("b-state"), "the failback resync", |v| {
        v["stage"] == "diff sync" && u(v, "/resyncs") >= 1
    });
    let moved = u(&st, "/last_resync/data_bytes") + u(&st, "/last_resync/zero_bytes");
    let ratio = moved as f64 / differ as f64;
    eprintln!(
        "FIGURE failback_bytes_moved {moved} bytes for {differ} differing bytes (4 KiB blocks): ratio {ratio:.3} (goal <= 1.1)"
    );
    assert!(moved >= differ, "the fast resync moved less than what differs: {st:#}");
    assert!(moved < VOLUME / 4, "the failback moved {moved} of {VOLUME} bytes: not a fast resync");
    // Diff sync in reverse: more writes at B through its FUSE frontend.
    sums.extend(write_files(&dev, &s.root.join("mnt"), &mut cleanup, 3, 3));
    wait_caught_up(&s.root.join("b-state"));

    // Planned failover back to A.
    let last = drain(&mut px_b, &s.root.join("b-state"));
    cleanup.loops.clear();
    cleanup.mounts.clear();
    rx_a.terminate();
    tidemark(&["promote", "--dir", &s.p("a-rx"), "--require-seq", &last.to_string()]);
    assert_eq!(read_all(&a_image), read_all(&b_image), "A differs from B after failback");
    fsck_clean(&a_image);
    check_files(&a_image, &s.root.join("mnt"), &mut cleanup, &sums);
}

/// After an unplanned failover (the DR receiver and then site A crash, A having written
/// what B never received), both sides took writes: A's receiver refuses the failback until
/// the operator says the DR side wins, then the two converge.
#[test]
fn split_brain_refused_until_a_side_wins() {
    require_env!("split_brain_refused_until_a_side_wins");
    let s = Sites::new();
    let mut cleanup = Cleanup::default();
    cleanup.root = s.root.clone();
    let a_image = s.root.join("a-volume.img");
    let b_image = s.root.join("b/replica.img");

    let (mut rx_b, addr) = s.receive("b", "b", "a", &[]);
    let (mut px_a, dev) = s.protect("a-volume.img", "a-state", "a", "b", &addr, &[]);
    cleanup.loops.push(dev.clone());
    cleanup.mounts.push(s.root.join("a-state-fuse"));
    wait_status(&s.root.join("a-state"), "the initial sync", |v| {
        v["stage"] == "diff sync" && u(v, "/resyncs") >= 1
    });
    run("mkfs.ext4", &["-q", "-F", "-E", "nodiscard", "-b", "4096", &dev]);
    let mut sums = write_files(&dev, &s.root.join("mnt"), &mut cleanup, 1, 4);
    wait_caught_up(&s.root.join("a-state"));

    // The DR receiver dies; A goes on writing (spooled, never acknowledged), then dies too.
    rx_b.crash();
    write_files(&dev, &s.root.join("mnt"), &mut cleanup, 9, 3);
    wait_status(&s.root.join("a-state"), "writes B never acknowledged", |v| {
        u(v, "/tap/durable_seq") > u(v, "/shipper/acked")
    });
    px_a.crash();
    let _ = Command::new("umount").arg("-l").arg(s.root.join("a-state-fuse")).status();
    let _ = Command::new("losetup").args(["-d", &dev]).status();
    cleanup.loops.clear();
    cleanup.mounts.clear();

    // Unplanned failover: B promotes what arrived, and takes writes.
    tidemark(&["promote", "--dir", &s.p("b")]);
    fsck_clean(&b_image);
    check_files(&b_image, &s.root.join("mnt"), &mut cleanup, &sums);
    let dev_b = run("losetup", &["-f", "--show", &b_image.display().to_string()]).trim().to_owned();
    cleanup.loops.push(dev_b.clone());
    sums.extend(write_files(&dev_b, &s.root.join("mnt"), &mut cleanup, 2, 2));
    run("losetup", &["-d", &dev_b]);
    cleanup.loops.pop();

    // Failback is refused: A holds writes B never received.
    let a_vol = a_image.display().to_string();
    let size = VOLUME.to_string();
    let (k, pk) = (s.p("keys/a.key"), s.p("keys/b.pub"));
    let refused = Command::new(BIN)
        .args(["receive", "--dir", &s.p("a-rx"), "--listen", "127.0.0.1:0", "--key", &k])
        .args(["--peer", &pk, "--pair", PAIR, "--size", &size, "--replica", &a_vol])
        .args(["--old-state", &s.p("a-state")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "a split brain was not refused");
    assert!(err.contains("split brain") && err.contains("--discard-local-changes"), "{err}");
    assert!(!s.root.join("a-rx/replica.img").exists(), "the refused receiver linked the image");

    // The operator chooses B: A's later writes are discarded, the sides converge.
    let (mut rx_a, addr) = s.receive(
        "a-rx",
        "a",
        "b",
        &["--replica", &a_vol, "--old-state", &s.p("a-state"), "--discard-local-changes"],
    );
    let (mut px_b, dev) = s.protect("b/replica.img", "b-state", "b", "a", &addr, &["--failback"]);
    cleanup.loops.push(dev.clone());
    cleanup.mounts.push(s.root.join("b-state-fuse"));
    wait_status(&s.root.join("b-state"), "the failback resync", |v| {
        v["stage"] == "diff sync" && u(v, "/resyncs") >= 1
    });
    wait_caught_up(&s.root.join("b-state"));
    let last = drain(&mut px_b, &s.root.join("b-state"));
    cleanup.loops.clear();
    cleanup.mounts.clear();
    rx_a.terminate();
    tidemark(&["promote", "--dir", &s.p("a-rx"), "--require-seq", &last.to_string()]);
    assert_eq!(read_all(&a_image), read_all(&b_image), "the sides did not converge");
    fsck_clean(&a_image);
    check_files(&a_image, &s.root.join("mnt"), &mut cleanup, &sums);
}

/// A promotion interrupted in the middle of its fold (simulated: the directory put back as
/// step 1 leaves it, with half the image already folded) is refused by `receive` and
/// finished by the next `promote`, giving the same image as an uninterrupted one. Needs no
/// root: the journal is filled by an initial sync (`--frontend none`).
#[test]
fn interrupted_promotion_resumes_to_the_same_image() {
    let s = Sites::new();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(s.root.join("a-volume.img")).unwrap();
        f.write_all_at(&pattern(5, 3 << 20), 1 << 20).unwrap();
        f.write_all_at(&pattern(6, 1 << 20), 40 << 20).unwrap();
    }
    let (mut rx, addr) = s.receive("b", "b", "a", &[]);
    let mut px = s.protect_bare(("a-volume.img", "a-state", "a", "b", &addr), &[]);
    wait_status(&s.root.join("a-state"), "the initial sync", |v| {
        v["stage"] == "diff sync" && u(v, "/resyncs") >= 1
    });
    let last = drain(&mut px, &s.root.join("a-state"));
    rx.terminate();

    let b = s.root.join("b");
    let blank = read_all(&b.join("replica.img"));
    tidemark(&["promote", "--dir", &s.p("b"), "--require-seq", &last.to_string()]);
    let folded = read_all(&b.join("replica.img"));
    assert_eq!(folded, read_all(&s.root.join("a-volume.img")), "the fold is not the source");
    let record: Value =
        serde_json::from_str(&std::fs::read_to_string(b.join("promoted.json")).unwrap()).unwrap();
    let seq = u(&record, "/seq");

    // Back to step 2 of a crashed promotion: marker written, journal in place, the first
    // half of the image folded, the rest not.
    std::fs::rename(b.join(format!("journal.promoted-{seq}")), b.join("journal")).unwrap();
    std::fs::remove_file(b.join("promoted.json")).unwrap();
    let mut marker = record.clone();
    marker["state"] = "folding".into();
    std::fs::write(b.join("promote.json"), marker.to_string()).unwrap();
    let half = folded.len() / 2;
    let mut partial = folded[..half].to_vec();
    partial.extend_from_slice(&blank[half..]);
    assert_ne!(partial, folded, "the test data does not reach the second half");
    std::fs::write(b.join("replica.img"), &partial).unwrap();

    let size = VOLUME.to_string();
    let (k, pk) = (s.p("keys/b.key"), s.p("keys/a.pub"));
    let refused = Command::new(BIN)
        .args(["receive", "--dir", &s.p("b"), "--listen", "127.0.0.1:0", "--key", &k])
        .args(["--peer", &pk, "--pair", PAIR, "--size", &size])
        .output()
        .unwrap();
    assert!(!refused.status.success(), "receive served a half-folded image");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("promote.json"), "{err}");

    let out = tidemark(&["promote", "--dir", &s.p("b")]);
    assert!(out.contains(&format!("resuming the promotion of {} to seq {seq}", s.p("b"))), "{out}");
    assert_eq!(read_all(&b.join("replica.img")), folded, "the resumed fold differs");
    assert!(b.join("promoted.json").exists() && !b.join("promote.json").exists());
}

fn write_at(path: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

fn lineage_of(dir: &Path) -> Value {
    let st: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("status.json")).unwrap()).unwrap();
    st["lineage"].clone()
}

/// Split brain that the old spool cannot show: after a planned failover (everything A
/// spooled was acknowledged, so `--old-state` finds nothing unreceived), B takes writes
/// and A's image is written directly, around the tap, while its `protect` is stopped. The
/// failback is refused in the opening exchange (Refuse reason 7) with a message naming both
/// generations and the branch seq, and nothing reaches A's replica; once the operator says
/// B wins (`protect --discard-target-changes`), the failback resync converges A to B byte for
/// byte and both sides hold the same lineage. On the way, A's old `protect` restarted against
/// B's promoted directory is refused as a stale source. Needs no root: `--frontend none`.
#[test]
fn split_brain_around_the_tap_is_refused_by_lineage_until_a_side_wins() {
    let s = Sites::new();
    let (a_image, b_image) = (s.root.join("a-volume.img"), s.root.join("b/replica.img"));
    write_at(&a_image, 1 << 20, &pattern(1, 2 << 20));
    let (mut rx_b, addr) = s.receive("b", "b", "a", &[]);
    let mut px_a = s.protect_bare(("a-volume.img", "a-state", "a", "b", &addr), &[]);
    wait_status(&s.root.join("a-state"), "the initial sync", |v| {
        v["stage"] == "diff sync" && u(v, "/resyncs") >= 1
    });
    let last = drain(&mut px_a, &s.root.join("a-state"));
    let a_generation =
        lineage_of(&s.root.join("a-state"))["generation"].as_str().unwrap().to_owned();
    rx_b.terminate();
    tidemark(&["promote", "--dir", &s.p("b"), "--require-seq", &last.to_string()]);
    let promoted: Value =
        serde_json::from_str(&std::fs::read_to_string(s.root.join("b/promoted.json")).unwrap())
            .unwrap();
    let (branch, b_generation) =
        (u(&promoted, "/seq"), promoted["generation"].as_str().unwrap().to_owned());
    assert_ne!(a_generation, b_generation);

    // B is live; A's old protect, restarted by mistake against a receiver on B's promoted
    // directory, is refused as stale (B's generation is newer) and B's volume is untouched.
    write_at(&b_image, 8 << 20, &pattern(2, 1 << 20));
    let b_before = read_all(&b_image);
    let (mut rx_b, addr) = s.receive("b", "b", "a", &[]);
    let mut px_a = s.protect_bare(("a-volume.img", "a-state", "a", "b", &addr), &[]);
    let st = wait_status(&s.root.join("a-state"), "the stale-source refusal", |v| {
        v["shipper"]["state"] == "Failed"
    });
    let err = st["shipper"]["last_error"].as_str().unwrap();
    assert!(err.contains("lineage conflict (8)") && err.contains("stale source"), "{err}");
    assert!(err.contains(&a_generation) && err.contains(&b_generation), "{err}");
    px_a.terminate();
    rx_b.terminate();
    assert_eq!(read_all(&b_image), b_before, "the stale source changed B's volume");

    // Both sides written: B as the live volume, A around the tap (protect stopped).
    write_at(&a_image, 20 << 20, &pattern(3, 1 << 20));
    let a_before = read_all(&a_image);

    // Failback: A's old spool shows nothing unreceived, so the receiver starts; the
    // lineages meet in the opening and the session is refused.
    let a_vol = a_image.display().to_string();
    let a_rx = ["--replica", a_vol.as_str(), "--old-state", &s.p("a-state")];
    let (mut rx_a, addr) = s.receive("a-rx", "a", "b", &a_rx);
    let mut px_b = s.protect_bare(("b/replica.img", "b-state", "b", "a", &addr), &["--failback"]);
    let st = wait_status(&s.root.join("b-state"), "the split-brain refusal", |v| {
        v["shipper"]["last_error"].as_str().is_some_and(|e| e.contains("split brain"))
    });
    let err = st["shipper"]["last_error"].as_str().unwrap();
    assert_eq!(st["shipper"]["state"], "Failed", "a refusal is not retried: {st:#}");
    assert!(err.contains(&a_generation) && err.contains(&b_generation), "{err}");
    assert!(
        err.contains(&format!("seq {branch}")) && err.contains("--discard-target-changes"),
        "{err}"
    );
    let rx_st = wait_status(&s.root.join("a-rx"), "the refusal on A", |v| {
        v["last_error"].as_str().is_some_and(|e| e.contains("split brain"))
    });
    assert_eq!(rx_st["received"], 0, "{rx_st:#}");
    assert_eq!(rx_st["lineage"]["generation"], a_generation.as_str(), "{rx_st:#}");
    assert_eq!(rx_st["lineage"]["dirty"], true, "the write around the tap was not seen: {rx_st:#}");
    px_b.terminate();
    rx_a.terminate();
    assert_eq!(read_all(&a_image), a_before, "the refused failback changed A's volume");

    // The operator chooses B: its failback resync overwrites A's writes; the sides converge.
    let (mut rx_a, addr) = s.receive("a-rx", "a", "b", &a_rx);
    let mut px_b = s.protect_bare(
        ("b/replica.img", "b-state", "b", "a", &addr),
        &["--failback", "--discard-target-changes"],
    );
    let st = wait_status(&s.root.join("b-state"), "the failback resync", |v| {
        v["stage"] == "diff sync" && u(v, "/resyncs") >= 1
    });
    assert_eq!(st["shipper"]["lineage_verdict"], "resync", "{st:#}");
    wait_caught_up(&s.root.join("b-state"));
    let last = drain(&mut px_b, &s.root.join("b-state"));
    rx_a.terminate();
    let (a_lineage, b_lineage) =
        (lineage_of(&s.root.join("a-rx")), lineage_of(&s.root.join("b-state")));
    assert_eq!(a_lineage["chain"], b_lineage["chain"], "the lineages differ after converging");
    assert_eq!(a_lineage["generation"], b_generation.as_str());
    tidemark(&["promote", "--dir", &s.p("a-rx"), "--require-seq", &last.to_string()]);
    assert_eq!(read_all(&a_image), read_all(&b_image), "A did not converge to B");
}

/// The other gap of the old spool check: an unplanned promotion at a point older than what
/// the original site had acknowledged. A's spool holds nothing unreceived and its image is
/// untouched since its clean stop, yet it is past B's branch: the failback is a split brain.
/// Needs no root: `--frontend none`, a bookmark for a second point.
#[test]
fn a_promotion_older_than_the_sources_acknowledged_point_is_a_split_brain() {
    let s = Sites::new();
    write_at(&s.root.join("a-volume.img"), 3 << 20, &pattern(4, 1 << 20));
    let (mut rx_b, addr) = s.receive("b", "b", "a", &[]);
    let mut px_a = s.protect_bare(("a-volume.img", "a-state", "a", "b", &addr), &[]);
    let st = wait_status(&s.root.join("a-state"), "the initial sync", |v| {
        v["stage"] == "diff sync" && u(v, "/resyncs") >= 1
    });
    let end = u(&st, "/last_resync/end_seq");
    tidemark(&["bookmark", "later", "--state", &s.p("a-state")]);
    wait_caught_up(&s.root.join("a-state"));
    let last = drain(&mut px_a, &s.root.join("a-state"));
    assert!(last > end, "the bookmark made no later point: {last} <= {end}");
    rx_b.terminate();
    tidemark(&["promote", "--dir", &s.p("b"), "--point", &format!("seq:{end}")]);

    let a_vol = s.p("a-volume.img");
    let a_rx = ["--replica", a_vol.as_str(), "--old-state", &s.p("a-state")];
    let (mut rx_a, addr) = s.receive("a-rx", "a", "b", &a_rx);
    let mut px_b = s.protect_bare(("b/replica.img", "b-state", "b", "a", &addr), &["--failback"]);
    let st =
        wait_status(&s.root.join("b-state"), "the refusal", |v| v["shipper"]["state"] == "Failed");
    let err = st["shipper"]["last_error"].as_str().unwrap();
    assert!(err.contains("split brain (7)"), "{err}");
    assert!(err.contains(&format!("source at seq {end}")), "{err}");
    assert!(err.contains(&format!("target at seq {last})")), "not dirty, past the branch: {err}");
    let rx_st = wait_status(&s.root.join("a-rx"), "the refusal on A", |v| {
        v["last_error"].as_str().is_some_and(|e| e.contains("split brain"))
    });
    assert_eq!(rx_st["lineage"]["dirty"], false, "A was sealed and untouched: {rx_st:#}");
    px_b.terminate();
    rx_a.terminate();
}
