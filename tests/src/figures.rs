//! Reliability figures: each test that proves something prints what it counted as one
//! `RELIABILITY <name>=<value>` line, and `cargo xtask reliability` adds up the lines of the
//! same name across the whole `cargo test -p tidemark-tests --release` output into
//! `target/bench/reliability.json` (see `docs/reliability.md`).
//!
//! The line goes straight to the process's stdout, past the test harness's output capture,
//! in one write, so that it shows in a plain `cargo test` run and is never split by another
//! test's output.

use std::io::Write;

/// Prints `RELIABILITY <name>=<value>`. `name` is a stable identifier (letters, digits, `_`
/// and `.`); figures of the same name from several tests are summed.
pub fn report(name: &str, value: u64) {
    debug_assert!(
        !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.'),
        "figure name {name:?}"
    );
    let line = format!("RELIABILITY {name}={value}\n");
    let mut out = std::io::stdout().lock();
    // A figure that cannot be printed is not worth failing a test over; xtask will find it
    // missing and say so.
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}
