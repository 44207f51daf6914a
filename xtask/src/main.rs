//! Build and CI automation for the Tidemark workspace, run as `cargo xtask <command>`.
//!
//! This crate owns the project's single test command, `cargo xtask ci`, which CI runs on a
//! fresh Debian machine through `.ci/run`. It also owns the developer entry points for the
//! benchmarks (`cargo xtask bench`), the fuzz targets (`cargo xtask fuzz`), the deterministic
//! fault simulation (`cargo xtask sim`) and the kernel lab
//! (`cargo xtask lab`, in [`lab`]: the ublk, device-mapper and netem namespace tests in a
//! QEMU guest) and the reliability figures (`cargo xtask reliability`, in [`reliability`]).
//!
//! The CI pipeline is a fixed list of steps (see [`STEPS`]); each step prints a banner and its
//! elapsed time, the first failing step stops the run with a nonzero exit, and a summary table
//! is printed at the end either way. Everything is done by spawning `cargo`, `apt-get` and
//! friends with [`std::process::Command`]; this crate deliberately has no other dependencies.
//!
//! The fuzz targets live in the detached cargo-fuzz package `fuzz/`. cargo-fuzz needs nightly
//! compiler flags (`-Zsanitizer=...`) and only a stable toolchain is available, so every
//! `cargo fuzz` invocation runs with `RUSTC_BOOTSTRAP=1`. Fuzzing always runs on a temporary
//! copy of the committed seed corpus so that new inputs found by the fuzzer never dirty the
//! tree; a crash fails the run and leaves its reproducer in `fuzz/artifacts/<target>/`.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use std::{env, fs};

use anyhow::{Context, Result, bail, ensure};

mod lab;
mod reliability;

/// Seconds of fuzzing per target in the CI smoke step, unless `TIDEMARK_FUZZ_SECONDS` is set.
const CI_FUZZ_SECONDS: u64 = 20;
/// Seconds of fuzzing per target for `cargo xtask fuzz`, unless overridden.
const DEV_FUZZ_SECONDS: u64 = 60;
/// Environment variable overriding the seconds of fuzzing per target.
const FUZZ_SECONDS_ENV: &str = "TIDEMARK_FUZZ_SECONDS";
/// Memory limit handed to libFuzzer, in megabytes.
const FUZZ_RSS_LIMIT_MB: u64 = 2048;
/// Proptest case count for CI, used only when `PROPTEST_CASES` is not already set.
const CI_PROPTEST_CASES: &str = "64";

/// Debian packages the tests and benchmarks need, each with a command that proves it is
/// installed.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("fio", "fio"),
    ("rsync", "rsync"),
    ("zstd", "zstd"),
    ("e2fsprogs", "mkfs.ext4"),
    ("iproute2", "tc"),
    ("mount", "mount"),
    ("util-linux", "blkdiscard"),
    ("qemu-utils", "qemu-io"),
    ("xfsprogs", "mkfs.xfs"),
    ("prometheus", "prometheus"),
];

/// The steps of `cargo xtask ci`, in the order they run: name and one-line description.
const STEPS: &[(&str, &str)] = &[
    ("deps", "install missing system packages (apt) and cargo-fuzz"),
    ("fmt", "cargo fmt --all -- --check"),
    ("clippy", "cargo clippy --workspace --all-targets -- -D warnings"),
    ("test", "cargo test --workspace --release"),
    ("lab", "cargo xtask lab: ublk, dm-log-writes and netem tests in a QEMU guest (6.12 kernel)"),
    ("fuzz", "cargo fuzz run <target> for every fuzz target (smoke)"),
    ("bench", "cargo run --release -p tidemark-benches -- --smoke all"),
    ("demo", "cargo run --release -p tidemark -- demo"),
];

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("\nxtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Dispatches on the subcommand.
fn run(args: &[String]) -> Result<()> {
    let Some((command, rest)) = args.split_first() else {
        print_help();
        bail!("no command given");
    };
    match command.as_str() {
        "ci" => ci(rest),
        "bench" => bench(rest),
        "fuzz" => fuzz_command(rest),
        "lab" => lab_command(rest),
        "reliability" => reliability::reliability(rest),
        "sim" => sim_command(rest),
        "help" | "--help" | "-h" => {
            print_help();
            Ok(())
        }
        other => {
            print_help();
            bail!("unknown command `{other}`")
        }
    }
}

fn print_help() {
    let steps: Vec<&str> = STEPS.iter().map(|(name, _)| *name).collect();
    let mut step_lines = String::new();
    for (name, description) in STEPS {
        step_lines.push_str(&format!("            {name:<8} {description}\n"));
    }
    println!(
        "\
cargo xtask: build and CI automation for Tidemark

USAGE:
    cargo xtask ci [--skip STEP[,STEP...]]
        The project's single test command (CI runs it through .ci/run). Runs these steps in
        order, stopping at the first failure with a nonzero exit:
{step_lines}
        --skip takes a comma-separated list of step names (it may be repeated), e.g.
            cargo xtask ci --skip fuzz,bench
        Skipping `fuzz` also skips installing cargo-fuzz in `deps`.

    cargo xtask bench <NAME|all> [EXTRA ARGS...]
        Runs a benchmark in full mode:
            cargo run --release -p tidemark-benches -- <NAME> [EXTRA ARGS...]

    cargo xtask fuzz [--seconds N] [TARGET]
        Fuzzes TARGET (default: every target of `cargo fuzz list`) for N seconds each
        (default {DEV_FUZZ_SECONDS}), on a temporary copy of fuzz/corpus/<TARGET>/. Needs cargo-fuzz
        (`cargo install cargo-fuzz --locked`). Crash inputs land in fuzz/artifacts/<TARGET>/.

    cargo xtask lab
        Boots Debian's 6.12 cloud kernel under QEMU (TCG) with the guest tests in the
        initramfs: the ublk frontend (device up, ext4 mkfs/mount/fsck, flush/FUA capture
        replayed, kill -9 + user recovery), dm-log-writes read back and replayed, and
        tidemark-sync's netem tests (replication between two network namespaces over a
        veth pair impaired by sch_netem; TIDEMARK_REQUIRE_NETNS=1, so a skip fails).
        Installs qemu-system-x86, busybox-static, cpio, xz-utils, e2fsprogs, dmsetup,
        iproute2 when missing (root); caches the kernel under target/lab/. Fails unless
        every suite ran to its end with every test passed.

    cargo xtask reliability
        Runs the reliability tests (cargo test -p tidemark-tests --release: the crash-
        consistency checks of every recovery point, the ext4 and xfs replays, the fuzz corpora;
        then cargo test -p tidemark --release --test faults: the real-process fault suite) and sums
        the RELIABILITY name=value lines they print into target/bench/reliability.json
        (scenarios run, recovery points checked, fsck runs, bad inputs tried, acknowledged
        writes lost, which must be 0). See docs/reliability.md.

    cargo xtask sim [--seeds N] [--first-seed F] [--seed S] [--trace]
        The deterministic fault simulation (tests/src/sim): N seeds from F (default: the CI
        budget of tests/tests/sim.rs), or replays seed S alone with its counters (and every
        step with --trace). A failure prints its seed and the command that replays it; the
        same seed always runs the same way (same trace hash). Runs
            cargo test --release -p tidemark-tests --test sim -- --nocapture sim_seed_budget

    cargo xtask help
        Prints this message.

ENVIRONMENT:
    {FUZZ_SECONDS_ENV}   seconds per fuzz target, for the ci fuzz step (default {CI_FUZZ_SECONDS})
                            and for `cargo xtask fuzz` without --seconds
    PROPTEST_CASES          proptest cases for the ci test step (default {CI_PROPTEST_CASES})
    TIDEMARK_LAB_TIMEOUT    seconds the lab guest may run before it is killed (default 300)

Step names: {steps}",
        steps = steps.join(", "),
    );
}

// ---------------------------------------------------------------------------------------
// cargo xtask ci
// ---------------------------------------------------------------------------------------

/// How a CI step ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// The step did its job.
    Passed,
    /// The step completed but could not do everything; the note says what is missing.
    Warned(String),
    /// The step did not run; the note says why.
    Skipped(String),
    /// The step failed; the run stops here.
    Failed,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Passed => write!(f, "ok"),
            Outcome::Warned(note) => write!(f, "WARNING: {note}"),
            Outcome::Skipped(note) => write!(f, "skipped ({note})"),
            Outcome::Failed => write!(f, "FAILED"),
        }
    }
}

/// One line of the final summary table.
#[derive(Debug)]
struct StepReport {
    name: &'static str,
    outcome: Outcome,
    elapsed: Duration,
}

/// Parses the `ci` arguments into the set of steps to skip.
fn parse_ci_args(args: &[String]) -> Result<BTreeSet<String>> {
    let known: Vec<&str> = STEPS.iter().map(|(name, _)| *name).collect();
    let mut skip = BTreeSet::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let list = if arg == "--skip" {
            args.next().context("--skip needs a comma-separated list of step names")?
        } else if let Some(list) = arg.strip_prefix("--skip=") {
            list
        } else if arg == "--help" || arg == "-h" {
            print_help();
            std::process::exit(0);
        } else {
            bail!("unknown argument to `ci`: `{arg}` (see `cargo xtask help`)");
        };
        for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            ensure!(
                known.contains(&name),
                "unknown step `{name}` in --skip; steps are: {}",
                known.join(", ")
            );
            skip.insert(name.to_owned());
        }
    }
    Ok(skip)
}

/// `cargo xtask ci`: runs every step not skipped, fail-fast, and prints a summary.
fn ci(args: &[String]) -> Result<()> {
    let skip = parse_ci_args(args)?;
    let root = repo_root();
    let total = Instant::now();
    let mut reports = Vec::new();
    let mut failure = None;

    for &(name, description) in STEPS {
        if skip.contains(name) {
            banner(&format!("ci step `{name}`: skipped (--skip)"));
            reports.push(StepReport {
                name,
                outcome: Outcome::Skipped("--skip".into()),
                elapsed: Duration::ZERO,
            });
            continue;
        }
        banner(&format!("ci step `{name}`: {description}"));
        let start = Instant::now();
        let result = match name {
            "deps" => step_deps(!skip.contains("fuzz")),
            "fmt" => cargo(&root, ["fmt", "--all", "--", "--check"]).map(|()| Outcome::Passed),
            "clippy" => {
                cargo(&root, ["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])
                    .map(|()| Outcome::Passed)
            }
            "test" => step_test(&root),
            "lab" => lab::lab(&root).map(|_| Outcome::Passed),
            "fuzz" => step_fuzz(&root, None, fuzz_seconds(None, CI_FUZZ_SECONDS)?, false),
            "bench" => {
                cargo(&root, ["run", "--release", "-p", "tidemark-benches", "--", "--smoke", "all"])
                    .map(|()| Outcome::Passed)
            }
            "demo" => cargo(&root, ["run", "--release", "-p", "tidemark", "--", "demo"])
                .map(|()| Outcome::Passed),
            other => unreachable!("step `{other}` has no implementation"),
        };
        let elapsed = start.elapsed();
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(err) => {
                failure = Some(err.context(format!("ci step `{name}` failed")));
                Outcome::Failed
            }
        };
        println!("==> ci step `{name}`: {outcome} in {}", format_duration(elapsed));
        reports.push(StepReport { name, outcome, elapsed });
        if failure.is_some() {
            break;
        }
    }

    print_summary(&reports, total.elapsed());
    match failure {
        Some(err) => Err(err),
        None => Ok(()),
    }
}

/// Prints the table of steps that ran (or were skipped) with their durations.
fn print_summary(reports: &[StepReport], total: Duration) {
    banner("ci summary");
    println!("  {:<8} {:>10}  result", "step", "time");
    println!("  {:<8} {:>10}  ------", "----", "----");
    for report in reports {
        println!(
            "  {:<8} {:>10}  {}",
            report.name,
            format_duration(report.elapsed),
            report.outcome
        );
    }
    for &(name, _) in STEPS.iter().skip(reports.len()) {
        println!("  {name:<8} {:>10}  not run", "-");
    }
    println!("  {:<8} {:>10}", "total", format_duration(total));
    let failed = reports.iter().any(|r| r.outcome == Outcome::Failed);
    println!("\n==> ci {}", if failed { "FAILED" } else { "passed" });
}

/// Step `deps`: installs the apt packages and cargo-fuzz that a fresh machine lacks.
///
/// Missing apt packages when not root, or a failed cargo-fuzz install, are loud warnings
/// rather than failures; a failed apt install as root fails the step.
fn step_deps(want_cargo_fuzz: bool) -> Result<Outcome> {
    let mut warnings = Vec::new();

    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .filter(|(_, probe)| !command_exists(probe))
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        println!("apt packages present: {}", package_list());
    } else if !is_root() {
        loud_warning(&format!(
            "not root: cannot install missing apt packages: {}. Tests that need them may fail.",
            missing.join(" ")
        ));
        warnings.push(format!("missing apt packages: {}", missing.join(" ")));
    } else {
        println!("installing missing apt packages: {}", missing.join(" "));
        if !apt_install(&missing)? {
            println!("apt-get install failed; running apt-get update and retrying");
            run_command(
                Command::new("apt-get").arg("update").env("DEBIAN_FRONTEND", "noninteractive"),
            )?;
            ensure!(
                apt_install(&missing)?,
                "apt-get install {} failed after apt-get update",
                missing.join(" ")
            );
        }
    }

    if !want_cargo_fuzz {
        println!("fuzz step skipped: not checking for cargo-fuzz");
    } else if cargo_fuzz_available() {
        println!("cargo-fuzz present");
    } else {
        println!("cargo-fuzz missing: cargo install cargo-fuzz --locked (takes a few minutes)");
        let installed =
            run_command(Command::new(cargo_bin()).args(["install", "cargo-fuzz", "--locked"]));
        if let Err(err) = installed.and_then(|()| {
            ensure!(cargo_fuzz_available(), "cargo fuzz --version still fails");
            Ok(())
        }) {
            loud_warning(&format!(
                "could not install cargo-fuzz ({err:#}); the fuzz smoke step will be skipped. \
                 The fuzz corpora still run as plain tests (tests/tests/fuzz_corpus.rs)."
            ));
            warnings.push("cargo-fuzz unavailable".into());
        }
    }

    Ok(if warnings.is_empty() { Outcome::Passed } else { Outcome::Warned(warnings.join("; ")) })
}

fn package_list() -> String {
    APT_PACKAGES.iter().map(|(package, _)| *package).collect::<Vec<_>>().join(" ")
}

/// Runs `apt-get install` for `packages`; returns whether it succeeded.
fn apt_install(packages: &[&str]) -> Result<bool> {
    let status = Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("could not start apt-get")?;
    Ok(status.success())
}

/// Step `test`: the whole workspace's tests, in release mode because the property tests and
/// crash tests are heavy.
fn step_test(root: &Path) -> Result<Outcome> {
    let mut command = Command::new(cargo_bin());
    command.current_dir(root).args(["test", "--workspace", "--release"]);
    if env::var_os("PROPTEST_CASES").is_none() {
        println!("PROPTEST_CASES not set: using {CI_PROPTEST_CASES}");
        command.env("PROPTEST_CASES", CI_PROPTEST_CASES);
    }
    run_command(&mut command)?;
    Ok(Outcome::Passed)
}

// ---------------------------------------------------------------------------------------
// Fuzzing
// ---------------------------------------------------------------------------------------

/// `cargo xtask fuzz [--seconds N] [TARGET]`.
fn fuzz_command(args: &[String]) -> Result<()> {
    let mut seconds = None;
    let mut target = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == "--seconds" {
            let value = args.next().context("--seconds needs a number")?;
            seconds = Some(parse_seconds(value, "--seconds")?);
        } else if let Some(value) = arg.strip_prefix("--seconds=") {
            seconds = Some(parse_seconds(value, "--seconds")?);
        } else if arg == "--help" || arg == "-h" {
            print_help();
            return Ok(());
        } else if arg.starts_with('-') {
            bail!("unknown option to `fuzz`: `{arg}` (see `cargo xtask help`)");
        } else if target.is_none() {
            target = Some(arg.as_str());
        } else {
            bail!("`fuzz` takes at most one target (got `{arg}` too)");
        }
    }
    let seconds = fuzz_seconds(seconds, DEV_FUZZ_SECONDS)?;
    let start = Instant::now();
    step_fuzz(&repo_root(), target, seconds, true)?;
    println!("==> fuzzing done in {}", format_duration(start.elapsed()));
    Ok(())
}

/// Seconds per target: `explicit` if given, else `TIDEMARK_FUZZ_SECONDS`, else `default`.
fn fuzz_seconds(explicit: Option<u64>, default: u64) -> Result<u64> {
    if let Some(seconds) = explicit {
        return Ok(seconds);
    }
    match env::var(FUZZ_SECONDS_ENV) {
        Ok(value) if !value.trim().is_empty() => parse_seconds(&value, FUZZ_SECONDS_ENV),
        _ => Ok(default),
    }
}

fn parse_seconds(value: &str, origin: &str) -> Result<u64> {
    let seconds: u64 = value
        .trim()
        .parse()
        .with_context(|| format!("{origin}: `{value}` is not a whole number of seconds"))?;
    ensure!(seconds > 0, "{origin}: must be at least 1 second");
    Ok(seconds)
}

/// Fuzzes `target` (or every target) for `seconds` each.
///
/// Without cargo-fuzz this is an error when `required`, and otherwise a loud skip.
fn step_fuzz(root: &Path, target: Option<&str>, seconds: u64, required: bool) -> Result<Outcome> {
    if !cargo_fuzz_available() {
        ensure!(!required, "cargo-fuzz is not installed; run `cargo install cargo-fuzz --locked`");
        loud_warning("SKIPPED fuzz smoke: cargo-fuzz unavailable");
        return Ok(Outcome::Skipped("cargo-fuzz unavailable".into()));
    }
    let fuzz_dir = root.join("fuzz");
    let all_targets = fuzz_targets(&fuzz_dir)?;
    ensure!(!all_targets.is_empty(), "`cargo fuzz list` found no fuzz targets");
    let targets = match target {
        Some(target) => {
            ensure!(
                all_targets.iter().any(|t| t == target),
                "no fuzz target `{target}`; targets are: {}",
                all_targets.join(", ")
            );
            vec![target.to_owned()]
        }
        None => all_targets,
    };

    println!("fuzzing {} for {seconds} s each (RUSTC_BOOTSTRAP=1)", targets.join(", "));
    // Build everything first so that compile time is reported apart from fuzzing time.
    let build = Instant::now();
    let mut command = cargo_fuzz(&fuzz_dir);
    command.arg("build");
    if let [only] = targets.as_slice() {
        command.arg(only);
    }
    run_command(&mut command)?;
    println!("fuzz targets built in {}", format_duration(build.elapsed()));

    for target in &targets {
        fuzz_one(&fuzz_dir, target, seconds)?;
    }
    Ok(Outcome::Passed)
}

/// Runs one fuzz target on a scratch copy of its committed seed corpus.
fn fuzz_one(fuzz_dir: &Path, target: &str, seconds: u64) -> Result<()> {
    let start = Instant::now();
    let seeds = fuzz_dir.join("corpus").join(target);
    let scratch = ScratchDir::new(&format!("tidemark-fuzz-{target}"))?;
    let copied = copy_files(&seeds, scratch.path())?;
    println!(
        "--> fuzz `{target}`: {copied} seed input(s) from {}, scratch corpus {}",
        seeds.display(),
        scratch.path().display()
    );
    if copied == 0 {
        loud_warning(&format!("fuzz target `{target}` has no seed corpus in {}", seeds.display()));
    }

    let mut command = cargo_fuzz(fuzz_dir);
    // libFuzzer writes new inputs to the first corpus directory only: the scratch copy. The
    // regression inputs, if any, are read but never written.
    command.args(["run", target]).arg(scratch.path());
    let regressions = fuzz_dir.join("regressions").join(target);
    if regressions.is_dir() {
        command.arg(&regressions);
    }
    command
        .arg("--")
        .args([format!("-max_total_time={seconds}"), format!("-rss_limit_mb={FUZZ_RSS_LIMIT_MB}")]);
    run_command(&mut command).with_context(|| {
        format!(
            "fuzz target `{target}` found a failing input; the reproducer is in {}",
            fuzz_dir.join("artifacts").join(target).display()
        )
    })?;
    println!(
        "--> fuzz `{target}`: no crash in {} ({} corpus entries afterwards)",
        format_duration(start.elapsed()),
        fs::read_dir(scratch.path()).map_or(0, Iterator::count)
    );
    Ok(())
}

/// The fuzz targets of the cargo-fuzz package in `fuzz_dir`, from `cargo fuzz list`.
fn fuzz_targets(fuzz_dir: &Path) -> Result<Vec<String>> {
    let output = cargo_fuzz(fuzz_dir)
        .arg("list")
        .stderr(Stdio::inherit())
        .output()
        .context("could not run `cargo fuzz list`")?;
    ensure!(output.status.success(), "`cargo fuzz list` failed with {}", output.status);
    let stdout = String::from_utf8(output.stdout).context("`cargo fuzz list` output")?;
    Ok(stdout.lines().map(str::trim).filter(|line| !line.is_empty()).map(str::to_owned).collect())
}

/// A `cargo fuzz` command in `fuzz_dir`, with the stable toolchain allowed nightly flags.
fn cargo_fuzz(fuzz_dir: &Path) -> Command {
    let mut command = Command::new(cargo_bin());
    command.current_dir(fuzz_dir).arg("fuzz").env("RUSTC_BOOTSTRAP", "1");
    command
}

fn cargo_fuzz_available() -> bool {
    Command::new(cargo_bin())
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Copies the regular files of `from` (if it exists) into `to`; returns how many were copied,
/// not counting `.gitkeep`.
fn copy_files(from: &Path, to: &Path) -> Result<usize> {
    if !from.is_dir() {
        return Ok(0);
    }
    let mut copied = 0;
    for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        if name == OsStr::new(".gitkeep") || !entry.file_type()?.is_file() {
            continue;
        }
        fs::copy(entry.path(), to.join(&name))
            .with_context(|| format!("copying {}", entry.path().display()))?;
        copied += 1;
    }
    Ok(copied)
}

/// A directory under the system temp dir, removed with its contents on drop.
#[derive(Debug)]
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(prefix: &str) -> Result<Self> {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let path = env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `cargo xtask lab`.
fn lab_command(args: &[String]) -> Result<()> {
    if let Some(arg) = args.first() {
        if arg == "--help" || arg == "-h" {
            print_help();
            return Ok(());
        }
        bail!("`lab` takes no arguments (got `{arg}`)");
    }
    lab::lab(&repo_root()).map(drop)
}

// ---------------------------------------------------------------------------------------
// cargo xtask bench
// ---------------------------------------------------------------------------------------

/// `cargo xtask bench <NAME|all> [EXTRA ARGS...]`: one benchmark (or all) in full mode.
/// `cargo xtask sim`: runs the simulation test with the seeds chosen through its
/// environment variables (`TIDEMARK_SIM_SEEDS`, `TIDEMARK_SIM_FIRST_SEED`, `TIDEMARK_SIM_SEED`,
/// `TIDEMARK_SIM_TRACE`).
fn sim_command(args: &[String]) -> Result<()> {
    let mut command = Command::new(cargo_bin());
    command.current_dir(repo_root());
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| -> Result<u64> {
            let v = it.next().with_context(|| format!("`{name}` needs a number"))?;
            v.parse().with_context(|| format!("`{name} {v}`: not a number"))
        };
        match arg.as_str() {
            "--seeds" => {
                let n = value("--seeds")?;
                ensure!(n > 0, "`--seeds 0` runs nothing");
                command.env("TIDEMARK_SIM_SEEDS", n.to_string());
            }
            "--first-seed" => {
                command.env("TIDEMARK_SIM_FIRST_SEED", value("--first-seed")?.to_string());
            }
            "--seed" => {
                command.env("TIDEMARK_SIM_SEED", value("--seed")?.to_string());
            }
            "--trace" => {
                command.env("TIDEMARK_SIM_TRACE", "1");
            }
            "--help" | "-h" => {
                print_help();
                return Ok(());
            }
            other => {
                print_help();
                bail!("`sim` does not take `{other}`");
            }
        }
    }
    let start = Instant::now();
    command.args([
        "test",
        "--release",
        "-p",
        "tidemark-tests",
        "--test",
        "sim",
        "--",
        "--nocapture",
        "--exact",
        "sim_seed_budget",
    ]);
    run_command(&mut command)?;
    println!("xtask sim: done in {:.1?}", start.elapsed());
    Ok(())
}

fn bench(args: &[String]) -> Result<()> {
    let Some(name) = args.first() else {
        print_help();
        bail!("`bench` needs a benchmark name or `all`");
    };
    if name == "--help" || name == "-h" {
        print_help();
        return Ok(());
    }
    let start = Instant::now();
    run_command(
        Command::new(cargo_bin())
            .current_dir(repo_root())
            .args(["run", "--release", "-p", "tidemark-benches", "--"])
            .args(args),
    )?;
    println!("==> bench done in {}", format_duration(start.elapsed()));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// The workspace root: the parent of this crate's directory.
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// The cargo that launched us (`cargo xtask` sets `CARGO`), else `cargo` from `PATH`.
fn cargo_bin() -> PathBuf {
    env::var_os("CARGO").map_or_else(|| PathBuf::from("cargo"), PathBuf::from)
}

/// Runs `cargo <args>` in `dir`, failing on a nonzero exit.
fn cargo<I, S>(dir: &Path, args: I) -> Result<()>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_command(Command::new(cargo_bin()).current_dir(dir).args(args))
}

/// Echoes and runs `command` with inherited stdio, failing unless it exits successfully.
fn run_command(command: &mut Command) -> Result<()> {
    let shown = show_command(command);
    println!("$ {shown}");
    let status = command.status().with_context(|| format!("could not start `{shown}`"))?;
    ensure!(status.success(), "`{shown}` failed with {status}");
    Ok(())
}

fn show_command(command: &Command) -> String {
    let mut parts: Vec<String> = command
        .get_envs()
        .filter_map(|(key, value)| {
            value.map(|v| format!("{}={}", key.to_string_lossy(), v.to_string_lossy()))
        })
        .collect();
    parts.push(command.get_program().to_string_lossy().into_owned());
    parts.extend(command.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Whether `name` is a command on `PATH` (plus the sbin directories, where e.g. `mkfs.ext4`
/// lives but which a non-root `PATH` may lack), checked with the shell's `command -v`.
fn command_exists(name: &str) -> bool {
    let path = env::var("PATH").unwrap_or_default();
    Command::new("sh")
        .args(["-c", "command -v \"$1\"", "sh", name])
        .env("PATH", format!("{path}:/usr/local/sbin:/usr/sbin:/sbin"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "0")
}

fn banner(title: &str) {
    let rule = "=".repeat(78);
    println!("\n{rule}\n==> {title}\n{rule}");
}

fn loud_warning(message: &str) {
    let rule = "!".repeat(78);
    eprintln!("\n{rule}\n!!! WARNING: {message}\n{rule}\n");
}

fn format_duration(duration: Duration) -> String {
    let secs = duration.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        let whole = duration.as_secs();
        format!("{}m{:02}s", whole / 60, whole % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn skip_accepts_comma_lists_in_both_spellings() {
        let skip = parse_ci_args(&strings(&["--skip", "fuzz,bench", "--skip=demo"])).unwrap();
        assert_eq!(skip.into_iter().collect::<Vec<_>>(), ["bench", "demo", "fuzz"]);
    }

    #[test]
    fn skip_rejects_unknown_steps_and_arguments() {
        assert!(parse_ci_args(&strings(&["--skip", "fuzz,nope"])).is_err());
        assert!(parse_ci_args(&strings(&["--skip"])).is_err());
        assert!(parse_ci_args(&strings(&["--fast"])).is_err());
    }

    #[test]
    fn seconds_must_be_positive_integers() {
        assert_eq!(parse_seconds(" 15 ", "x").unwrap(), 15);
        assert!(parse_seconds("0", "x").is_err());
        assert!(parse_seconds("1.5", "x").is_err());
        assert_eq!(fuzz_seconds(Some(7), 60).unwrap(), 7);
    }

    #[test]
    fn durations_are_short_and_readable() {
        assert_eq!(format_duration(Duration::from_millis(2_340)), "2.3s");
        assert_eq!(format_duration(Duration::from_secs(125)), "2m05s");
    }
}
