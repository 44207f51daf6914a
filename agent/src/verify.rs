//! `tidemark verify`: asks the running `tidemark protect` (through its control socket) to
//! compare the protected volume with the target's replica, the Merkle comparison of a fast
//! resync sending nothing, and prints the differing ranges.
//!
//! Exit codes: 0 identical, 1 differences found, 2 the verify could not run (no agent, a
//! pair not in diff sync, a lost link, a bad argument).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use crate::control;

/// The exit code when source and replica differ.
pub const EXIT_DIFFER: i32 = 1;
/// The exit code when the verify did not run.
pub const EXIT_ERROR: i32 = 2;

/// Which running `tidemark protect` a command talks to (`verify`, `limits`).
#[derive(Debug, clap::Args)]
pub struct ProtectSocket {
    /// The state directory of the running `tidemark protect`.
    #[arg(long)]
    state: PathBuf,
    /// Its control socket (default: STATE/control.sock).
    #[arg(long)]
    control: Option<PathBuf>,
}

impl ProtectSocket {
    /// Connects to it ([`connect`]).
    pub fn connect(&self) -> anyhow::Result<control::Client> {
        connect(&self.state, self.control.as_ref())
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    protect: ProtectSocket,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Report only differences inside START..END (bytes; suffixes K, M, G for KiB, MiB,
    /// GiB).
    #[arg(long)]
    range: Option<String>,
    /// Give up when the target has not acknowledged the backlog (or a running resync has
    /// not ended) within this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

/// Runs the command; the process's exit code.
pub fn run(args: Args) -> i32 {
    match verify(&args) {
        Ok(answer) => {
            print(&answer, args.json);
            if answer["identical"] == json!(true) { 0 } else { EXIT_DIFFER }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            EXIT_ERROR
        }
    }
}

fn parse_size(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (digits, mult) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1 << 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = digits.parse().with_context(|| format!("{s:?}: expected a byte count"))?;
    n.checked_mul(mult).with_context(|| format!("{s:?}: too large"))
}

/// Parses `START..END`.
pub fn parse_range(s: &str) -> anyhow::Result<(u64, u64)> {
    let (a, b) = s
        .split_once("..")
        .with_context(|| format!("range {s:?}: expected START..END (bytes, e.g. 0..64M)"))?;
    let (start, end) = (parse_size(a)?, parse_size(b)?);
    if start >= end {
        anyhow::bail!("range {s:?}: START must be below END");
    }
    Ok((start, end))
}

fn verify(args: &Args) -> anyhow::Result<Value> {
    let range = args.range.as_deref().map(parse_range).transpose()?;
    let mut client = args.protect.connect()?;
    let mut req = json!({"op": "verify", "timeout_s": args.timeout});
    if let Some((start, end)) = range {
        req["range"] = json!([start, end]);
    }
    let mut view = View::new(std::io::stderr().is_terminal() && !args.json);
    let answer = client.request_with_progress(req, |p| view.show(p));
    view.finish();
    answer
}

/// Connects to the control socket of the `protect` running on `state`.
pub fn connect(
    state: &std::path::Path,
    socket: Option<&PathBuf>,
) -> anyhow::Result<control::Client> {
    let path = socket.cloned().unwrap_or_else(|| control::default_socket(state));
    let Some(client) = control::Client::connect(&path)? else {
        anyhow::bail!(
            "no tidemark protect is running on {}: nothing listens on {} (start `tidemark \
             protect --state {}`, or give its --control socket)",
            state.display(),
            path.display(),
            state.display()
        );
    };
    if client.role() != "protect" {
        anyhow::bail!(
            "{} is the control socket of a `tidemark {}`, not of a `tidemark protect`",
            path.display(),
            client.role()
        );
    }
    Ok(client)
}

fn print(answer: &Value, as_json: bool) {
    if as_json {
        let doc = json!({
            "identical": answer["identical"],
            "ranges": answer["ranges"],
            "differing_bytes": answer["differing_bytes"],
            "compared_bytes": answer["compared_bytes"],
            "range": answer["range"],
            "leaf_bytes": answer["leaf_bytes"],
            "acked_seq": answer["acked_seq"],
            "events_during": answer["events_during"],
            "elapsed_s": answer["elapsed_s"],
        });
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        return;
    }
    let ranges = answer["ranges"].as_array().cloned().unwrap_or_default();
    let compared = answer["compared_bytes"].as_u64().unwrap_or(0);
    if ranges.is_empty() {
        println!(
            "identical: {compared} bytes compared with the replica as of seq {} ({} s)",
            answer["acked_seq"], answer["elapsed_s"]
        );
    } else {
        println!(
            "differ: {} ranges, {} bytes of {compared} compared (replica as of seq {}, {} s)",
            ranges.len(),
            answer["differing_bytes"],
            answer["acked_seq"],
            answer["elapsed_s"]
        );
        for r in &ranges {
            let (s, e) = (r["start"].as_u64().unwrap_or(0), r["end"].as_u64().unwrap_or(0));
            println!("  {s}..{e} ({} bytes)", e - s);
        }
    }
    let during = answer["events_during"].as_u64().unwrap_or(0);
    if during > 0 {
        println!(
            "note: {during} events were captured while comparing; a difference where they \
             wrote may be a write still in flight (run verify again to tell)"
        );
    }
}

/// Progress for a person: an indicatif bar on a terminal, a line every few seconds
/// otherwise.
struct View {
    terminal: bool,
    bar: Option<(String, ProgressBar)>,
    last_line: Instant,
    last_step: String,
}

impl View {
    fn new(terminal: bool) -> Self {
        Self {
            terminal,
            bar: None,
            last_line: Instant::now() - Duration::from_secs(10),
            last_step: String::new(),
        }
    }

    fn show(&mut self, p: &Value) {
        let step = p["step"].as_str().unwrap_or("working").to_owned();
        let (done, total) = (p["done"].as_u64(), p["total"].as_u64());
        if self.terminal {
            if let (Some(done), Some(total)) = (done, total) {
                if self.bar.as_ref().is_none_or(|(s, _)| *s != step) {
                    self.finish();
                    let bar = ProgressBar::new(total);
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{prefix:>9} [{bar:40}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                    bar.set_prefix(step.clone());
                    self.bar = Some((step.clone(), bar));
                }
                if let Some((_, bar)) = &self.bar {
                    bar.set_length(total);
                    bar.set_position(done);
                }
                return;
            }
        }
        if step != self.last_step || self.last_line.elapsed() >= Duration::from_secs(2) {
            match (done, total) {
                (Some(d), Some(t)) => eprintln!("verify {step}: {d} / {t} bytes"),
                _ => eprintln!("verify: {step}"),
            }
            self.last_line = Instant::now();
            self.last_step = step;
        }
    }

    fn finish(&mut self) {
        if let Some((_, bar)) = self.bar.take() {
            bar.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_with_suffixes_and_refuse_nonsense() {
        assert_eq!(parse_range("0..64M").unwrap(), (0, 64 << 20));
        assert_eq!(parse_range("4096..8192").unwrap(), (4096, 8192));
        assert_eq!(parse_range("1G..2g").unwrap(), (1 << 30, 2 << 30));
        assert!(parse_range("5..5").is_err());
        assert!(parse_range("10").is_err());
        assert!(parse_range("a..b").is_err());
    }
}
