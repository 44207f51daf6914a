//! `cargo xtask reliability`: runs the reliability tests and writes the figures they counted
//! to `target/bench/reliability.json`.
//!
//! The figures are not typed in here: each test of `tidemark-tests` that proves something
//! prints what it counted as `RELIABILITY <name>=<value>` lines (`tidemark_tests::figures`),
//! this command runs `cargo test -p tidemark-tests --release` and the agent's fault suite
//! (`cargo test -p tidemark --release --test faults`), echoes their output, and sums
//! the values of each name over every line. Names it does not know (a new suite's, such as
//! the simulation's `sim.*` figures) are kept, with the unit `count`. The JSON is written
//! even when a test fails (with what was counted up to then), and the command then fails;
//! it also fails when a figure with a goal misses it, or when a figure every run must
//! produce is missing.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;
use std::{fs, thread};

use anyhow::{Context, Result, bail, ensure};

use crate::{banner, cargo_bin, format_duration, loud_warning, repo_root, show_command};

/// The marker that starts a figure in the tests' output.
const MARKER: &str = "RELIABILITY ";

/// A figure the tests are known to report: name, unit, what it counts, the value it must
/// have (if any), and whether every run must report it.
struct Known {
    name: &'static str,
    unit: &'static str,
    what: &'static str,
    goal_zero: bool,
    required: bool,
}

const KNOWN: &[Known] = &[
    Known {
        name: "scenarios_run",
        unit: "scenarios",
        what: "end-to-end scenarios run to their verdict",
        goal_zero: false,
        required: true,
    },
    Known {
        name: "scenarios_skipped",
        unit: "scenarios",
        what: "scenarios skipped for a missing privilege or tool (each printed a SKIPPED line)",
        goal_zero: false,
        required: false,
    },
    Known {
        name: "recovery_points_checked",
        unit: "points",
        what: "recovery points read back and checked with the crash-consistency checker",
        goal_zero: false,
        required: true,
    },
    Known {
        name: "fsck_runs",
        unit: "runs",
        what: "e2fsck -fn runs on materialized recovery points",
        goal_zero: false,
        required: false,
    },
    Known {
        name: "bad_inputs_tried",
        unit: "inputs",
        what: "fuzz corpus and regression inputs fed to the parsers",
        goal_zero: false,
        required: true,
    },
    Known {
        name: "acknowledged_writes_lost",
        unit: "writes",
        what: "writes acknowledged by the target and flushed, missing at a recovery point",
        goal_zero: true,
        required: true,
    },
    Known {
        name: "sim.seeds_simulated",
        unit: "seeds",
        what: "seeds of the deterministic simulation run",
        goal_zero: false,
        required: true,
    },
    Known {
        name: "sim.faults_injected",
        unit: "faults",
        what: "faults injected by the deterministic simulation",
        goal_zero: false,
        required: true,
    },
    Known {
        name: "faults.injected",
        unit: "faults",
        what: "faults injected into real processes (kill -9, full disk, corrupt segment, bad peers)",
        goal_zero: false,
        required: false,
    },
    Known {
        name: "faults.kill9",
        unit: "kills",
        what: "kill -9 of `tidemark receive` or `tidemark protect` in the fault suite",
        goal_zero: false,
        required: false,
    },
];

/// One summed figure.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    /// Its name, as the tests print it.
    pub name: String,
    /// The sum of every line's value.
    pub value: f64,
    /// How many lines reported it.
    pub lines: usize,
}

/// Sums the `RELIABILITY name=value` figures in `output`, in order of first appearance. A
/// malformed figure line is an error naming the line.
pub fn collect(output: &str) -> Result<Vec<Figure>> {
    let mut figures: Vec<Figure> = Vec::new();
    for (n, line) in output.lines().enumerate() {
        let Some(at) = line.find(MARKER) else { continue };
        let token = line[at + MARKER.len()..].split_whitespace().next().unwrap_or("");
        let (name, value) = token
            .split_once('=')
            .with_context(|| format!("output line {}: `{line}` has no name=value", n + 1))?;
        ensure!(
            !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.'),
            "output line {}: `{name}` is not a figure name",
            n + 1
        );
        let value: f64 = value
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite())
            .with_context(|| format!("output line {}: `{value}` is not a number", n + 1))?;
        match figures.iter_mut().find(|f| f.name == name) {
            Some(f) => {
                f.value += value;
                f.lines += 1;
            }
            None => figures.push(Figure { name: name.to_owned(), value, lines: 1 }),
        }
    }
    Ok(figures)
}

/// The figures as a JSON list, the known ones first in their table order: `name`, `value`,
/// `unit`, and `goal` (`"== 0"`) where there is one.
pub fn to_json(figures: &[Figure]) -> String {
    let items: Vec<String> = ordered(figures)
        .iter()
        .map(|f| {
            let known = KNOWN.iter().find(|k| k.name == f.name);
            let unit = known.map_or("count", |k| k.unit);
            let mut item = format!(
                "  {{\"name\": {}, \"value\": {}, \"unit\": {}",
                json_string(&f.name),
                json_number(f.value),
                json_string(unit)
            );
            if known.is_some_and(|k| k.goal_zero) {
                item.push_str(", \"goal\": \"== 0\"");
            }
            item.push('}');
            item
        })
        .collect();
    format!("[\n{}\n]\n", items.join(",\n"))
}

/// The known figures in their table order, then the others by name.
fn ordered(figures: &[Figure]) -> Vec<&Figure> {
    let mut ordered: Vec<&Figure> = Vec::new();
    for k in KNOWN {
        ordered.extend(figures.iter().filter(|f| f.name == k.name));
    }
    let mut unknown: Vec<&Figure> =
        figures.iter().filter(|f| !KNOWN.iter().any(|k| k.name == f.name)).collect();
    unknown.sort_by(|a, b| a.name.cmp(&b.name));
    ordered.extend(unknown);
    ordered
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json_number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 9.0e15 { format!("{}", v as i64) } else { format!("{v}") }
}

/// Problems with a set of figures: a goal missed or a required figure missing.
pub fn verdicts(figures: &[Figure]) -> Vec<String> {
    let mut problems = Vec::new();
    for k in KNOWN {
        match figures.iter().find(|f| f.name == k.name) {
            None if k.required => problems.push(format!(
                "no test reported `{}` ({}): a reliability test did not run",
                k.name, k.what
            )),
            Some(f) if k.goal_zero && f.value != 0.0 => problems.push(format!(
                "`{}` is {} (goal: 0): {}",
                k.name,
                json_number(f.value),
                k.what
            )),
            _ => {}
        }
    }
    problems
}

/// `cargo xtask reliability`.
pub fn reliability(args: &[String]) -> Result<()> {
    if let Some(arg) = args.first() {
        if arg == "--help" || arg == "-h" {
            crate::print_help();
            return Ok(());
        }
        bail!("`reliability` takes no arguments (got `{arg}`)");
    }
    let root = repo_root();
    let start = Instant::now();
    let mut output = String::new();
    let mut failed = Vec::new();
    for args in SUITES {
        let (status, out) = run_suite(&root, args)?;
        output.push_str(&out);
        if !status.success() {
            failed.push(format!("cargo {} ({status})", args.join(" ")));
        }
    }

    let figures = collect(&output)?;
    let path = root.join("target").join("bench").join("reliability.json");
    write_json(&path, &figures)?;
    print_table(&figures);
    println!("figures written to {} ({})", path.display(), format_duration(start.elapsed()));
    if figures.iter().any(|f| f.name == "scenarios_skipped" && f.value > 0.0) {
        loud_warning("some reliability scenarios were skipped (see the SKIPPED lines above)");
    }
    ensure!(
        failed.is_empty(),
        "the reliability tests failed: {}; figures so far are in the JSON",
        failed.join(", ")
    );
    let problems = verdicts(&figures);
    ensure!(problems.is_empty(), "reliability goals not met:\n  {}", problems.join("\n  "));
    Ok(())
}

/// The test runs whose `RELIABILITY` lines are collected: the workspace-level proofs, then
/// the agent's real-process fault suite (`agent/tests/faults.rs`).
const SUITES: &[&[&str]] = &[
    &["test", "-p", "tidemark-tests", "--release"],
    &["test", "-p", "tidemark", "--release", "--test", "faults"],
];

/// Runs one `cargo` test command, echoing its output as it comes (the tests take a while);
/// returns its exit status and its stdout.
fn run_suite(root: &Path, args: &[&str]) -> Result<(std::process::ExitStatus, String)> {
    banner(&format!("reliability: cargo {}", args.join(" ")));
    let mut command = Command::new(cargo_bin());
    command.current_dir(root).args(args).stdout(Stdio::piped());
    println!("$ {}", show_command(&command));
    let mut child = command.spawn().context("could not start cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let reader = thread::spawn(move || {
        let mut kept = String::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            println!("{line}");
            kept.push_str(&line);
            kept.push('\n');
        }
        kept
    });
    let status = child.wait().context("waiting for cargo test")?;
    let output = reader.join().map_err(|_| anyhow::anyhow!("the output reader panicked"))?;
    Ok((status, output))
}

fn write_json(path: &Path, figures: &[Figure]) -> Result<()> {
    let dir = path.parent().context("figure path has a directory")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::write(path, to_json(figures)).with_context(|| format!("writing {}", path.display()))
}

fn print_table(figures: &[Figure]) {
    println!("\n{:<28} {:>12}  {:<10} {:>6}  what", "figure", "value", "unit", "lines");
    for f in ordered(figures) {
        let known = KNOWN.iter().find(|k| k.name == f.name);
        println!(
            "{:<28} {:>12}  {:<10} {:>6}  {}",
            f.name,
            json_number(f.value),
            known.map_or("count", |k| k.unit),
            f.lines,
            known.map_or("(reported by a test this table does not know)", |k| k.what)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_summed_by_name_wherever_the_marker_is() {
        let out = "test a ... RELIABILITY recovery_points_checked=10\n\
                   noise\n\
                   RELIABILITY recovery_points_checked=5\n\
                   RELIABILITY sim.seeds_simulated=3\n\
                   RELIABILITY acknowledged_writes_lost=0\n";
        let figures = collect(out).unwrap();
        assert_eq!(figures.len(), 3);
        assert_eq!(figures[0].name, "recovery_points_checked");
        assert_eq!(figures[0].value, 15.0);
        assert_eq!(figures[0].lines, 2);
        assert!(collect("RELIABILITY nothing\n").is_err());
        assert!(collect("RELIABILITY x=abc\n").is_err());
        assert!(collect("RELIABILITY bad name=1\n").is_err());
    }

    #[test]
    fn json_lists_known_figures_first_with_units_and_goals() {
        let figures = collect(
            "RELIABILITY zzz=2\nRELIABILITY acknowledged_writes_lost=0\nRELIABILITY scenarios_run=3\n",
        )
        .unwrap();
        assert_eq!(
            to_json(&figures),
            "[\n  {\"name\": \"scenarios_run\", \"value\": 3, \"unit\": \"scenarios\"},\n  \
             {\"name\": \"acknowledged_writes_lost\", \"value\": 0, \"unit\": \"writes\", \
             \"goal\": \"== 0\"},\n  {\"name\": \"zzz\", \"value\": 2, \"unit\": \"count\"}\n]\n"
        );
    }

    #[test]
    fn a_lost_write_or_a_missing_figure_is_a_problem() {
        let ok = collect(
            "RELIABILITY scenarios_run=1\nRELIABILITY recovery_points_checked=1\n\
             RELIABILITY bad_inputs_tried=1\nRELIABILITY sim.seeds_simulated=1\n\
             RELIABILITY sim.faults_injected=1\nRELIABILITY acknowledged_writes_lost=0\n",
        )
        .unwrap();
        assert!(verdicts(&ok).is_empty());
        let mut lost = ok.clone();
        lost[5].value = 2.0;
        assert_eq!(verdicts(&lost).len(), 1);
        assert_eq!(verdicts(&ok[..5]).len(), 1);
    }
}
