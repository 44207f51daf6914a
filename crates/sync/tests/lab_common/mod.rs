//! What the harness-less guest suites of `cargo xtask lab` in this crate share
//! (`ublk_replication_lab`, `vsnap_ublk_lab`): the result type and its `ensure!`, command
//! and path helpers, a byte pattern, and the `TIDEMARK-LAB: PASS|FAIL` tally the lab reads.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::Instant;

pub type TestResult<T = ()> = Result<T, String>;

/// What every result line starts with.
pub const PREFIX: &str = "TIDEMARK-LAB:";

/// Returns `Err(format!(...))` from the enclosing function unless the condition holds.
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}
pub(crate) use ensure;

/// Maps an error to `what: error`.
pub fn e<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |err| format!("{what}: {err}")
}

/// Runs a command; fails with its output unless it exits 0. Returns its standard output.
pub fn run(program: &str, args: &[&str]) -> TestResult<String> {
    let out = Command::new(program).args(args).output().map_err(e(&format!("start {program}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "`{program} {}` exited with {}: {}{}",
        args.join(" "),
        out.status,
        stdout.trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(stdout)
}

pub fn path_str(path: &Path) -> TestResult<&str> {
    path.to_str().ok_or_else(|| format!("{} is not UTF-8", path.display()))
}

/// A reproducible byte pattern (xorshift), different for each seed.
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

/// Counts outcomes and prints a PASS or FAIL line for each.
#[derive(Default)]
pub struct Tally {
    passed: u32,
    total: u32,
}

impl Tally {
    /// Runs `f`, catching panics, and reports it; returns its value when it passed.
    pub fn report<T>(&mut self, name: &str, f: impl FnOnce() -> TestResult<T>) -> Option<T> {
        let start = Instant::now();
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
                let text = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "panic".into());
                Err(format!("panicked: {text}"))
            });
        let secs = start.elapsed().as_secs_f64();
        self.total += 1;
        match outcome {
            Ok(value) => {
                self.passed += 1;
                println!("{PREFIX} PASS {name} ({secs:.1}s)");
                Some(value)
            }
            Err(err) => {
                println!("{PREFIX} FAIL {name} ({secs:.1}s): {err}");
                None
            }
        }
    }

    /// The summary line; success when everything passed.
    pub fn finish(self) -> ExitCode {
        if self.passed == self.total {
            println!("{PREFIX} PASS {} tests", self.total);
            ExitCode::SUCCESS
        } else {
            println!("{PREFIX} FAIL {} of {} tests", self.total - self.passed, self.total);
            ExitCode::FAILURE
        }
    }
}
