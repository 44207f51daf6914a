//! `tidemark-bench`: benchmarks that compare Tidemark against references (fio, cp, an undo
//! journal emulation) measured in the same run on the same filesystem.
//!
//! ```text
//! tidemark-bench [--smoke] [--dir PATH] <journal|tap|sync|recover|all>...
//! ```
//!
//! Each benchmark prints a table and writes its figures to `target/bench/<name>.json`.

mod figure;
mod fio;
mod journal;
mod recover;
mod sync;
mod sys;
mod tap;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::figure::Figure;

/// Where benchmarks put their files unless `--dir` says otherwise: a disk-backed
/// directory (unlike `/tmp`, which may be tmpfs).
const DEFAULT_PARENT: &str = "/var/tmp";

/// What a benchmark gets to run with.
#[derive(Debug)]
pub struct Ctx {
    /// A fresh directory for its files, removed afterwards.
    pub dir: PathBuf,
    /// The filesystem type of `dir`.
    pub fs_type: String,
    /// Small sizes, for CI.
    pub smoke: bool,
}

type BenchFn = fn(&Ctx) -> Result<Vec<Figure>>;

/// Every benchmark, by name.
const BENCHES: &[(&str, BenchFn)] =
    &[("journal", journal::run), ("tap", tap::run), ("sync", sync::run), ("recover", recover::run)];

const USAGE: &str = "\
usage: tidemark-bench [--smoke] [--dir PATH] <BENCH|all>...

Benchmarks (each writes target/bench/<BENCH>.json):
  journal   spool append throughput and CPU, point-in-time reads, materialize, redo vs undo
  tap       fio through the FUSE + loop frontend vs a plain loop device (root), capture
            pipeline CPU per 4 KiB write; ublk overhead: the command that measures it
  sync      fast resync against rsync, initial sync of an ext4 image against dd,
            ship-and-apply throughput against cat and zstd, wire bytes per changed byte
            (needs rsync, zstd, e2fsprogs)
  recover   exposing a point an hour back as a virtual snapshot (two volume sizes), reading
            it against the replica directly, materializing it against cp (root for the
            snapshot figures)
  all       every benchmark

Options:
  --smoke       small sizes (CI); the figures are only a sanity check
  --dir PATH    put the benchmark files in a temporary directory under PATH
                (default /var/tmp; it must not be tmpfs for the figures to mean anything)";

#[derive(Debug, Default)]
struct Args {
    smoke: bool,
    dir: Option<PathBuf>,
    benches: Vec<&'static str>,
}

fn parse_args(args: &[String]) -> Result<Option<Args>> {
    let mut out = Args::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => return Ok(None),
            "--smoke" => out.smoke = true,
            "--dir" => {
                let d = it.next().context("--dir needs a path")?;
                out.dir = Some(PathBuf::from(d));
            }
            s if s.starts_with("--dir=") => out.dir = Some(PathBuf::from(&s["--dir=".len()..])),
            "all" => out.benches.extend(BENCHES.iter().map(|(n, _)| *n)),
            s => match BENCHES.iter().find(|(n, _)| *n == s) {
                Some((n, _)) => out.benches.push(n),
                None => bail!("unknown argument {s:?}\n\n{USAGE}"),
            },
        }
    }
    if out.benches.is_empty() {
        bail!("name a benchmark or `all`\n\n{USAGE}");
    }
    let mut seen = std::collections::HashSet::new();
    out.benches.retain(|b| seen.insert(*b));
    Ok(Some(out))
}

/// Where figures are written: `target/bench` of the workspace.
fn output_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("benches/ lives inside the workspace")
        .join("target")
        .join("bench")
}

fn run_bench(name: &str, f: BenchFn, args: &Args) -> Result<()> {
    let parent = args.dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_PARENT));
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!("tidemark-bench-{name}-"))
        .tempdir_in(&parent)
        .with_context(|| format!("creating a temporary directory in {}", parent.display()))?;
    let fs_type = sys::fs_type(tmp.path())?;
    let mode = if args.smoke { "smoke" } else { "full" };
    eprintln!("[{name}] {mode} run in {} (filesystem: {fs_type})", tmp.path().display());
    if sys::is_memory_fs(&fs_type) {
        eprintln!(
            "\n!!! WARNING: {} is on {fs_type}: I/O figures measured in memory mean nothing. \
             Use --dir on a disk-backed filesystem.\n",
            tmp.path().display()
        );
    }
    let ctx = Ctx { dir: tmp.path().to_path_buf(), fs_type: fs_type.clone(), smoke: args.smoke };
    let load_before = sys::load_average();
    let start = Instant::now();
    let figures = f(&ctx)?;
    let took = start.elapsed();
    tmp.close().context("removing the benchmark's temporary directory")?;

    figure::print_table(
        &format!(
            "{name} ({mode}, filesystem {fs_type}, {:.1} s, load average {load_before} before, {} after)",
            took.as_secs_f64(),
            sys::load_average()
        ),
        &figures,
    );
    let path = output_dir().join(format!("{name}.json"));
    figure::write_json(&path, &figures)?;
    println!("\nwrote {}", path.display());
    let missed: Vec<&str> =
        figures.iter().filter(|f| f.status() == Some("MISSED")).map(|f| f.name.as_str()).collect();
    if !missed.is_empty() {
        println!("goals missed: {}", missed.join(", "));
    }
    let skipped: Vec<&str> =
        figures.iter().filter(|f| f.status() == Some("SKIPPED")).map(|f| f.name.as_str()).collect();
    if !skipped.is_empty() {
        println!(
            "!!! SKIPPED (reference not measured, see its reference line): {}",
            skipped.join(", ")
        );
    }
    Ok(())
}

fn run() -> Result<()> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    if raw.first().map(String::as_str) == Some(journal::pitr::REOPEN_CHILD) {
        return journal::pitr::reopen_child(&raw[1..]);
    }
    let Some(args) = parse_args(&raw)? else {
        println!("{USAGE}");
        return Ok(());
    };
    for name in &args.benches {
        let (_, f) = BENCHES.iter().find(|(n, _)| n == name).expect("parsed names exist");
        run_bench(name, *f, &args).with_context(|| format!("benchmark {name}"))?;
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidemark-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<Args>> {
        parse_args(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn argument_orders() {
        let a = parse(&["--smoke", "all"]).unwrap().unwrap();
        assert!(a.smoke);
        assert_eq!(a.benches, ["journal", "tap", "sync", "recover"]);
        let a = parse(&["journal", "--smoke", "--dir", "/x"]).unwrap().unwrap();
        assert!(a.smoke);
        assert_eq!(a.dir.as_deref(), Some(Path::new("/x")));
        let a = parse(&["all", "journal", "--dir=/y"]).unwrap().unwrap();
        assert_eq!(a.benches, ["journal", "tap", "sync", "recover"]);
        assert_eq!(a.dir.as_deref(), Some(Path::new("/y")));
        let a = parse(&["sync", "--smoke"]).unwrap().unwrap();
        assert_eq!(a.benches, ["sync"]);
        assert!(parse(&["--smoke"]).is_err());
        assert!(parse(&["nope"]).is_err());
        assert!(parse(&["--help"]).unwrap().is_none());
    }
}
