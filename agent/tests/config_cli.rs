//! The configuration file through the binary: `tidemark config check` on good and bad files
//! (every error names file, line and column), `tidemark up NAME` running a pair from it (or
//! a group's periodic bookmarks), and the systemd unit's command lines
//! (`dist/systemd/tidemark@.service`) accepted as written.
//! No root needed.

mod common;

use std::path::Path;
use std::process::Command;

use common::{BIN, Proc};

const PAIR: &str = "5eed0123456789abcdef0123456789ab";

/// Runs the binary; returns (success, stdout, stderr).
fn tidemark(args: &[&str]) -> (bool, String, String) {
    let out =
        Command::new(BIN).args(args).env("RUST_BACKTRACE", "0").output().expect("run tidemark");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A configuration with a receive pair and a protect pair, keys made by `tidemark keygen`.
fn write_config(dir: &Path, listen: &str) -> String {
    for name in ["src", "dst"] {
        let (ok, _, err) = tidemark(&["keygen", "--dir", dir.to_str().unwrap(), "--name", name]);
        assert!(ok, "keygen: {err}");
    }
    let d = dir.display();
    format!(
        r#"# a node that is the target of one pair and the source of another
version = 1

[defaults]
key = "{d}/dst.key"
peer = "{d}/src.pub"

[pair.dr]
role = "receive"
id = "{PAIR}"
dir = "{d}/dr"
listen = "{listen}"
size = 1048576
block_size = 4096

[pair.web]
role = "protect"
id = "{PAIR}"
image = "{d}/web.img"
state = "{d}/web-state"
target = "127.0.0.1:7800"
spool-mib = 64
"#
    )
}

#[test]
fn config_check_accepts_a_good_file_and_prints_each_pairs_command() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tidemark.toml");
    std::fs::write(&file, write_config(dir.path(), "127.0.0.1:0")).unwrap();
    let (ok, out, err) = tidemark(&["config", "check", file.to_str().unwrap()]);
    assert!(ok, "config check refused a good file: {err}");
    assert!(out.contains("2 pair(s), all valid"), "{out}");
    let d = dir.path().display();
    assert!(
        out.contains(&format!(
            "pair dr: tidemark receive --block-size=4096 --dir={d}/dr --key={d}/dst.key --listen=127.0.0.1:0 --pair={PAIR} --peer={d}/src.pub --size=1048576"
        )),
        "{out}"
    );
    assert!(out.contains("pair web: tidemark protect "), "{out}");
    assert!(out.contains("--spool-mib=64"), "{out}");
}

#[test]
fn config_errors_name_the_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tidemark.toml");
    let good = write_config(dir.path(), "127.0.0.1:0");
    let name = file.display().to_string();
    // (what, edit of the good file, expected "FILE:LINE:COL", words of the message)
    let cases: &[(&str, &str, &str, &str, &str)] = &[
        (
            "a value the command refuses",
            "size = 1048576",
            "size = \"lots\"",
            "13:8",
            "invalid value 'lots' for '--size",
        ),
        ("a negative size", "size = 1048576", "size = -1", "13:8", "invalid value '-1'"),
        ("bare words", "size = 1048576", "size = lots", "13:8", "not valid TOML"),
        (
            "an option of the other role",
            "spool-mib = 64",
            "size = 64",
            "22:1",
            "`size` is not an option of `tidemark protect`",
        ),
        (
            "a missing required key",
            "target = \"127.0.0.1:7800\"\n",
            "",
            "16:1",
            "lacks required key: target",
        ),
        ("a typo in a default", "peer = ", "pear = ", "6:1", "unknown key `pear` in [defaults]"),
        ("a syntax error", "[pair.web]", "[pair.web", "16:", "not valid TOML"),
        (
            "a bad role",
            "role = \"protect\"",
            "role = \"source\"",
            "17:8",
            "expected one of \"protect\", \"receive\"",
        ),
    ];
    for &(what, from, to, at, words) in cases {
        assert!(good.contains(from), "{what}: the good file has no {from:?}");
        std::fs::write(&file, good.replacen(from, to, 1)).unwrap();
        let (ok, _, err) = tidemark(&["config", "check", &name]);
        assert!(!ok, "{what}: config check accepted the file");
        let located = format!("{name}:{at}");
        assert!(err.contains(&located), "{what}: expected {located:?} in: {err}");
        assert!(err.contains(words), "{what}: expected {words:?} in: {err}");
    }
    std::fs::write(&file, &good).unwrap();
    let (ok, _, err) = tidemark(&["up", "nope", "--config", &name, "--dry-run"]);
    assert!(!ok);
    assert!(err.contains("no pair named \"nope\""), "{err}");
    let (ok, _, err) =
        tidemark(&["config", "check", dir.path().join("absent.toml").to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("read the configuration file") && err.contains("absent.toml"), "{err}");
}

#[test]
fn up_runs_the_pair_as_its_command_would() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tidemark.toml");
    std::fs::write(&file, write_config(dir.path(), "127.0.0.1:0")).unwrap();
    let mut receiver = Proc::spawn("up dr", &["up", "dr", "--config", file.to_str().unwrap()]);
    let addr = receiver.wait_line("listening:");
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    assert!(dir.path().join("dr/replica.img").exists(), "the receive pair made no replica");
    assert_eq!(std::fs::metadata(dir.path().join("dr/replica.img")).unwrap().len(), 1048576);
    receiver.terminate();
}

#[test]
fn the_systemd_units_commands_are_accepted() {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/systemd/tidemark@.service"),
    )
    .expect("dist/systemd/tidemark@.service");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tidemark.toml");
    std::fs::write(&file, write_config(dir.path(), "127.0.0.1:0")).unwrap();
    let mut seen = 0;
    for line in unit.lines() {
        let Some(command) =
            line.strip_prefix("ExecStartPre=").or_else(|| line.strip_prefix("ExecStart="))
        else {
            continue;
        };
        seen += 1;
        let words: Vec<String> = command
            .split_whitespace()
            .map(|w| {
                w.replace("%i", "web")
                    .replace("/etc/tidemark/tidemark.toml", file.to_str().unwrap())
            })
            .collect();
        assert_eq!(words[0], "/usr/local/bin/tidemark", "the unit runs the installed binary");
        let mut args: Vec<&str> = words[1..].iter().map(String::as_str).collect();
        if !args.contains(&"--dry-run") {
            args.push("--dry-run");
        }
        let (ok, out, err) = tidemark(&args);
        assert!(ok, "{command}: {err}");
        assert!(out.starts_with("pair web: tidemark protect "), "{out}");
    }
    assert_eq!(seen, 2, "the unit should have ExecStartPre= and ExecStart=");
}

/// `base` (of `write_config`) plus a second protect pair and a group of the two;
/// `group` is the group's table body.
fn with_group(base: &str, dir: &Path, group: &str) -> String {
    let d = dir.display();
    format!(
        "{base}\n[pair.web2]\nrole = \"protect\"\nid = \"{PAIR}\"\nimage = \"{d}/web2.img\"\nstate = \"{d}/web2-state\"\ntarget = \"127.0.0.1:7801\"\n\n[group.shop]\n{group}"
    )
}

#[test]
fn up_of_a_group_runs_its_periodic_bookmarks_and_bad_ones_are_refused_at_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tidemark.toml");
    let name = file.display().to_string();
    let base = write_config(dir.path(), "127.0.0.1:0");
    let good = with_group(
        &base,
        dir.path(),
        "pairs = [\"web\", \"web2\"]\nbookmark_every = \"15m\"\nbookmark_prefix = \"shop\"\n",
    );
    std::fs::write(&file, &good).unwrap();
    let command = format!("tidemark bookmark shop --group shop --config {name} --every 15m");
    let (ok, out, err) = tidemark(&["config", "check", &name]);
    assert!(ok, "{err}");
    assert!(out.contains(&format!("    bookmarks: {command}")), "{out}");
    let (ok, out, err) = tidemark(&["up", "shop", "--config", &name, "--dry-run"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), format!("group shop: {command}"));
    // The group's table starts at this line; its keys follow.
    let header = good.lines().position(|l| l == "[group.shop]").unwrap() + 1;
    let (every, prefix) = (header + 2, header + 3);
    let cases: &[(&str, &str, &str, String, &str)] = &[
        (
            "a period the command refuses",
            "bookmark_every = \"15m\"",
            "bookmark_every = \"soon\"",
            format!("{every}:18"),
            "invalid value 'soon' for '--every",
        ),
        (
            "a period under a second",
            "bookmark_every = \"15m\"",
            "bookmark_every = \"10ms\"",
            format!("{every}:18"),
            "at least one second",
        ),
        (
            "a number for a period",
            "bookmark_every = \"15m\"",
            "bookmark_every = 15",
            format!("{every}:18"),
            "`bookmark_every` must be a string",
        ),
        (
            "a prefix alone",
            "bookmark_every = \"15m\"\n",
            "",
            format!("{every}:19"),
            "`bookmark_prefix` without `bookmark_every`",
        ),
        (
            "a bad prefix",
            "bookmark_prefix = \"shop\"",
            "bookmark_prefix = \"a\\tb\"",
            format!("{header}:1"),
            "bookmark_prefix \"a\\tb\"",
        ),
        (
            "a typo",
            "bookmark_prefix",
            "bookmark_prefx",
            format!("{prefix}:1"),
            "unknown key `bookmark_prefx`",
        ),
    ];
    for (what, from, to, at, words) in cases {
        assert!(good.contains(from), "{what}: the good file has no {from:?}");
        std::fs::write(&file, good.replacen(from, to, 1)).unwrap();
        let (ok, _, err) = tidemark(&["up", "shop", "--config", &name, "--dry-run"]);
        assert!(!ok, "{what}: up accepted the file");
        let located = format!("{name}:{at}");
        assert!(err.contains(&located), "{what}: expected {located:?} in: {err}");
        assert!(err.contains(words), "{what}: expected {words:?} in: {err}");
    }
    // Hooks and freezes of the group's bookmarks become the command's options.
    let hooked = good.replace(
        "bookmark_prefix = \"shop\"\n",
        "bookmark_prefix = \"shop\"\nbookmark_pre = \"sync\"\nbookmark_post = \"true\"\nbookmark_freeze = [\"/srv/a\", \"/srv/b\"]\n",
    );
    std::fs::write(&file, &hooked).unwrap();
    let (ok, out, err) = tidemark(&["up", "shop", "--config", &name, "--dry-run"]);
    assert!(ok, "{err}");
    assert_eq!(
        out.trim(),
        format!("group shop: {command} --pre sync --post true --freeze /srv/a --freeze /srv/b")
    );
    let freeze_line = header + 6;
    for (what, from, to, at, words) in [
        (
            "one mountpoint for two pairs",
            "[\"/srv/a\", \"/srv/b\"]",
            "[\"/srv/a\"]",
            format!("{freeze_line}:19"),
            "names 1 mountpoints for 2 pairs",
        ),
        (
            "a mountpoint that is not a list",
            "[\"/srv/a\", \"/srv/b\"]",
            "\"/srv/a\"",
            format!("{freeze_line}:19"),
            "must be a list of mountpoints",
        ),
        (
            "a hook without a period",
            "bookmark_every = \"15m\"\n",
            "",
            format!("{}:16", header + 2),
            "`bookmark_pre` without `bookmark_every`",
        ),
    ] {
        let text = hooked.replacen(from, to, 1);
        let text = if what == "a hook without a period" {
            text.replace("bookmark_prefix = \"shop\"\n", "")
        } else {
            text
        };
        std::fs::write(&file, text).unwrap();
        let (ok, _, err) = tidemark(&["config", "check", &name]);
        assert!(!ok, "{what}: accepted");
        let located = format!("{name}:{at}");
        assert!(
            err.contains(&located) && err.contains(words),
            "{what}: expected {located:?}, {words:?} in: {err}"
        );
    }
    // Periodic bookmarks are taken on the sources.
    let dr = &good[good.find("[pair.dr]").unwrap()..good.find("[pair.web]").unwrap()];
    let on_receive = good
        .replace("[pair.web]", &format!("{}[pair.web]", dr.replace("[pair.dr]", "[pair.dr2]")))
        .replace("pairs = [\"web\", \"web2\"]", "pairs = [\"dr\", \"dr2\"]");
    std::fs::write(&file, &on_receive).unwrap();
    let (ok, _, err) = tidemark(&["config", "check", &name]);
    assert!(!ok && err.contains("periodic bookmarks are taken on the sources"), "{err}");
    // A group without bookmarks has nothing for `up` to run; a name both a pair and a
    // group have is refused rather than guessed.
    std::fs::write(&file, with_group(&base, dir.path(), "pairs = [\"web\", \"web2\"]\n")).unwrap();
    let (ok, _, err) = tidemark(&["up", "shop", "--config", &name, "--dry-run"]);
    assert!(!ok && err.contains("group `shop` has nothing to run"), "{err}");
    std::fs::write(&file, good.replace("[group.shop]", "[group.web]")).unwrap();
    let (ok, _, err) = tidemark(&["up", "web", "--config", &name, "--dry-run"]);
    assert!(!ok && err.contains("both a pair and a group are named \"web\""), "{err}");
}
