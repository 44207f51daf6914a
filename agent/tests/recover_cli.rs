//! `tidemark points` and `tidemark recover --materialize` on a `receive` directory with no
//! receiver running (the log is opened by the command): listings, a materialized bookmark
//! checked against the bytes written, and the error messages for unknown points and bad
//! point syntax. No root needed.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use serde_json::Value;
use tidemark_journal::{
    BlockIo, Bookmark, BookmarkKind, Event, FileIo, FsDir, Nanos, RetentionConfig, RetentionLog,
    Seq, SystemClock, VolumeId,
};

const BIN: &str = env!("CARGO_BIN_EXE_tidemark");
const VOL: u64 = 1 << 20;

/// A receive directory whose journal holds two bookmarks and a barrier; returns the volume
/// as of bookmark "before-upgrade" and as of the end.
fn receive_dir(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let base = FileIo::create(dir.join("replica.img"), VOL).expect("replica");
    let (mut log, _) = RetentionLog::open(
        Arc::new(FsDir::new(dir.join("journal")).expect("journal dir")),
        vec![Arc::new(base) as Arc<dyn BlockIo>],
        RetentionConfig::default(),
        Arc::new(SystemClock),
    )
    .expect("open");
    let mut model = vec![0u8; VOL as usize];
    let mut seq = 0u64;
    let mut time = 1_795_000_000 * Nanos::SECOND;
    let mut push = |log: &mut RetentionLog, e: Event, model: &mut Vec<u8>| {
        seq += 1;
        time += Nanos::SECOND;
        if let Event::Write { offset, data, .. } = &e {
            model[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
        }
        log.append(Seq(seq), Nanos(time), &e).expect("append");
    };
    let write = |off: u64, fill: u8| Event::Write {
        volume: VolumeId(0),
        offset: off,
        data: vec![fill; 8192].into(),
    };
    let mark =
        |name: &str| Event::Bookmark(Bookmark::new(name, BookmarkKind::User, 0).expect("name"));
    push(&mut log, write(0, 1), &mut model);
    push(&mut log, mark("nightly"), &mut model);
    push(&mut log, write(65536, 2), &mut model);
    push(&mut log, write(0, 3), &mut model);
    push(&mut log, mark("before-upgrade"), &mut model);
    let at_mark = model.clone();
    push(&mut log, write(4096, 4), &mut model);
    push(&mut log, Event::Barrier, &mut model);
    log.sync().expect("sync");
    (at_mark, model)
}

fn tidemark(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).output().expect("run tidemark");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn points_lists_bookmarks_and_recover_materializes_one_with_a_verified_hash() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("rx");
    std::fs::create_dir_all(&dir).unwrap();
    let (at_mark, latest) = receive_dir(&dir);
    let d = dir.display().to_string();

    let (ok, out, err) = tidemark(&["points", "--dir", &d]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("before-upgrade") && out.contains("nightly"), "{out}");
    assert!(out.contains("read from the journal"), "{out}");

    let (ok, out, err) = tidemark(&["points", "--dir", &d, "--json"]);
    assert!(ok, "{out}{err}");
    let doc: Value = serde_json::from_str(&out).expect("points --json is JSON");
    let points = doc["points"].as_array().expect("points array");
    let kinds: Vec<&str> = points.iter().map(|p| p["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["base", "bookmark", "bookmark", "barrier"], "{doc:#}");
    assert_eq!(points[2]["bookmark"], "before-upgrade");
    assert_eq!(points[2]["seq"], 5);
    let time = points[2]["time"].as_str().expect("time");
    assert!(time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T', "{time}");

    for (spec, want) in [("bookmark:before-upgrade", &at_mark), ("latest", &latest)] {
        let out_file = tmp.path().join("out.img");
        let (ok, out, err) = tidemark(&[
            "recover",
            "--dir",
            &d,
            "--point",
            spec,
            "--materialize",
            &out_file.display().to_string(),
        ]);
        assert!(ok, "{spec}: {out}{err}");
        let hash = blake3::hash(want).to_hex().to_string();
        assert!(out.contains(&format!("blake3: {hash}")), "{spec}: {out}");
        assert!(out.contains("verified:"), "{out}");
        assert_eq!(&std::fs::read(&out_file).unwrap(), want, "{spec}");
    }
    // Nothing was changed by the commands: the bookmark still reads the same.
    let out_file = tmp.path().join("again.img");
    let (ok, _, err) = tidemark(&[
        "recover",
        "--dir",
        &d,
        "--point",
        "seq:5",
        "--materialize",
        &out_file.display().to_string(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(&out_file).unwrap(), at_mark);
}

#[test]
fn unknown_points_and_bad_syntax_are_explained() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("rx");
    std::fs::create_dir_all(&dir).unwrap();
    receive_dir(&dir);
    let d = dir.display().to_string();
    let out = tmp.path().join("x.img").display().to_string();
    let recover = |spec: &str| {
        let (ok, stdout, stderr) =
            tidemark(&["recover", "--dir", &d, "--point", spec, "--materialize", &out]);
        assert!(!ok, "{spec} was accepted: {stdout}");
        stderr
    };

    // An unknown bookmark: the retained ones are listed.
    let e = recover("bookmark:after-upgrade");
    assert!(e.contains("after-upgrade") && e.contains("no retained bookmark"), "{e}");
    assert!(e.contains("bookmark:before-upgrade (seq 5") && e.contains("bookmark:nightly"), "{e}");
    // A sequence number not received yet: the nearest points.
    let e = recover("seq:999");
    assert!(e.contains("not received yet"), "{e}");
    assert!(e.contains("nearest") && e.contains("seq:7 (barrier"), "{e}");
    // A time before the window.
    let e = recover("time:2020-01-01T00:00:00Z");
    assert!(e.contains("before the retention window") && e.contains("seq:0 (base"), "{e}");
    // Bad syntax.
    let e = recover("yesterday");
    assert!(e.contains("expected latest, seq:N"), "{e}");
    let e = recover("time:noon");
    assert!(e.contains("RFC 3339"), "{e}");
    let e = recover("bookmark:");
    assert!(e.contains("not a valid bookmark name"), "{e}");
    // Neither --expose nor --materialize.
    let (ok, _, e) = tidemark(&["recover", "--dir", &d, "--point", "latest"]);
    assert!(!ok && e.contains("--expose"), "{e}");
}

/// Runs `tidemark ARGS` under a pseudo-terminal of 120 x 40 (python3's pty module); returns
/// whether it succeeded and everything it wrote to the terminal, or `None` without python3.
fn tidemark_on_a_terminal(args: &[&str]) -> Option<(bool, String)> {
    const DRIVER: &str = r#"
import fcntl, os, pty, struct, sys, termios
pid, fd = pty.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
out = b""
while True:
    try:
        chunk = os.read(fd, 65536)
    except OSError:
        break
    if not chunk:
        break
    out += chunk
_, status = os.waitpid(pid, 0)
sys.stdout.buffer.write(out)
sys.exit(0 if os.waitstatus_to_exitcode(status) == 0 else 3)
"#;
    let out = Command::new("python3").arg("-c").arg(DRIVER).arg(BIN).args(args).output().ok()?;
    Some((out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// A drawn bar frame: `LABEL [bar] DONE/TOTAL RATE/s ETA N` with numbers in each field.
fn has_bar_with_rate_and_eta(screen: &str, label: &str) -> bool {
    screen.split(['\r', '\n']).any(|frame| {
        let Some(rest) = frame.split_once(&format!("{label} [")).map(|(_, r)| r) else {
            return false;
        };
        let Some((_, after)) = rest.split_once("] ") else { return false };
        let fields: Vec<&str> = after.split_whitespace().collect();
        // e.g. ["128.00", "MiB/256.00", "MiB", "1.21", "GiB/s", "ETA", "0s"]
        let number = |s: &str| s.parse::<f64>().is_ok();
        let rate = fields.iter().position(|f| f.ends_with("B/s"));
        let eta = fields.iter().position(|f| *f == "ETA");
        match (rate, eta) {
            (Some(r), Some(e)) if r >= 1 && e == r + 1 && e + 1 < fields.len() => {
                number(fields[r - 1])
                    && fields[e + 1]
                        .trim_end_matches(|c: char| c.is_ascii_alphabetic())
                        .parse::<u64>()
                        .is_ok()
            }
            _ => false,
        }
    })
}

#[test]
fn materialize_draws_a_progress_bar_with_rate_and_eta_on_a_terminal() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("rx");
    std::fs::create_dir_all(&dir).unwrap();
    receive_dir(&dir);
    // A volume large enough for the bar to be redrawn while it runs (sparse: cheap here).
    let big = 256u64 << 20;
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("replica.img"))
        .unwrap()
        .set_len(big)
        .unwrap();
    let out = tmp.path().join("latest.img");
    let args = ["materialize", "--dir", dir.to_str().unwrap(), "--out", out.to_str().unwrap()];
    // Without a terminal: no bar, no escape sequences.
    let (ok, stdout, stderr) = tidemark(&args);
    assert!(ok, "materialize failed: {stdout}{stderr}");
    assert!(!stderr.contains("materialize ["), "a bar drawn into a pipe: {stderr:?}");
    std::fs::remove_file(&out).unwrap();
    let Some((ok, screen)) = tidemark_on_a_terminal(&args) else {
        let _ = writeln!(std::io::stderr(), "SKIP materialize bar: python3 not found");
        return;
    };
    assert!(ok, "materialize on a terminal failed: {screen}");
    assert!(
        has_bar_with_rate_and_eta(&screen, "materialize"),
        "no bar with a rate and an ETA on the terminal: {screen:?}"
    );
    assert_eq!(std::fs::metadata(&out).unwrap().len(), big);
}

#[test]
fn the_ublk_frontend_is_refused_naming_the_control_device_where_ublk_is_missing() {
    if Path::new("/dev/ublk-control").exists() {
        eprintln!(
            "\n!!! SKIPPED the_ublk_frontend_is_refused...: /dev/ublk-control exists here \
             (the ublk frontend itself is tested by the vsnap_ublk suite of cargo xtask lab)\n"
        );
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("rx");
    std::fs::create_dir_all(&dir).unwrap();
    receive_dir(&dir);
    let d = dir.display().to_string();
    let (ok, stdout, e) = tidemark(&[
        "recover",
        "--dir",
        &d,
        "--point",
        "bookmark:nightly",
        "--expose",
        "ro",
        "--frontend",
        "ublk",
    ]);
    assert!(!ok, "--frontend ublk was served without ublk_drv: {stdout}");
    assert!(e.contains("/dev/ublk-control") && e.contains("ublk_drv"), "{e}");
    assert!(!stdout.contains("device:"), "{stdout}");
    // Nothing of the refused snapshot is left behind.
    let left: Vec<_> = std::fs::read_dir(dir.join("vsnaps"))
        .map(|r| r.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in vsnaps/: {left:?}");
    // A frontend name that does not exist.
    let (ok, _, e) = tidemark(&[
        "recover",
        "--dir",
        &d,
        "--point",
        "latest",
        "--expose",
        "ro",
        "--frontend",
        "nbd",
    ]);
    assert!(!ok && e.contains("nbd") && e.contains("ublk"), "{e}");
}
