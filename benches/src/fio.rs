//! The `fio` reference: sequential writes to a new file with a given fdatasync cadence, and
//! jobs against an existing file or block device, with fio's `--output-format=json` parsed.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::sys;

/// The options that make fio append to a new file the way a journal segment grows: the
/// job's `open()` creates the file (`create_on_open`), nothing is preallocated or laid out
/// beforehand (`fallocate=none`), and every write extends the file with plain `pwrite`
/// (`psync`); `end_fsync` makes the tail durable like our final group commit.
pub const APPEND_LIKE_OPTIONS: &[&str] =
    &["--ioengine=psync", "--rw=write", "--create_on_open=1", "--fallocate=none", "--end_fsync=1"];

/// True when fio can be run.
pub fn available() -> bool {
    sys::program_available("fio")
}

/// A sequential-write job.
#[derive(Debug, Clone, Copy)]
pub struct SeqWrite<'a> {
    /// The file to create (it must not exist; it is removed afterwards).
    pub file: &'a Path,
    /// Bytes per write.
    pub block_size: u64,
    /// Bytes written in all.
    pub total_bytes: u64,
    /// fdatasync after every this many writes.
    pub fdatasync_every: u64,
}

/// What fio measured.
#[derive(Debug, Clone, Copy)]
pub struct FioResult {
    /// Write bandwidth (fio's `bw_bytes`, whose runtime includes the final fsync).
    pub bytes_per_sec: f64,
    /// fdatasync calls fio made (not counting the final fsync).
    pub syncs: u64,
    /// Write operations per second (fio's `iops`).
    pub iops: f64,
}

/// Runs the job and removes its file.
pub fn seq_write(job: &SeqWrite<'_>) -> Result<FioResult> {
    if job.file.exists() {
        bail!("fio target {} already exists", job.file.display());
    }
    let mut cmd = Command::new("fio");
    cmd.arg("--name=append")
        .arg(format!("--filename={}", job.file.display()))
        .arg(format!("--bs={}", job.block_size))
        .arg(format!("--size={}", job.total_bytes))
        .arg(format!("--fdatasync={}", job.fdatasync_every))
        .args(APPEND_LIKE_OPTIONS)
        .arg("--output-format=json");
    let out = sys::run_command(&mut cmd);
    let _ = std::fs::remove_file(job.file);
    parse(&String::from_utf8_lossy(&out?.stdout))
}

/// Runs one fio job named `name` against an existing file or block device `target` with
/// the given job options (`--rw=`, `--bs=`, ...), and parses its write results.
pub fn device_job(name: &str, target: &Path, options: &[String]) -> Result<FioResult> {
    let mut cmd = Command::new("fio");
    cmd.arg(format!("--name={name}"))
        .arg(format!("--filename={}", target.display()))
        .args(options)
        .arg("--output-format=json");
    parse(&String::from_utf8_lossy(&sys::run_command(&mut cmd)?.stdout))
}

/// Reads the first job's write results from fio's JSON output (fio may print notes before
/// the JSON document).
fn parse(stdout: &str) -> Result<FioResult> {
    let start = stdout.find('{').ok_or_else(|| anyhow!("fio printed no JSON: {stdout:?}"))?;
    let doc: Value = serde_json::from_str(&stdout[start..]).context("parsing fio's JSON")?;
    let job = &doc["jobs"][0];
    if job.is_null() {
        bail!("fio's JSON has no jobs");
    }
    if let Some(err) = job["error"].as_i64().filter(|e| *e != 0) {
        bail!("fio job failed with error {err}");
    }
    let bytes_per_sec = job["write"]["bw_bytes"]
        .as_f64()
        .filter(|b| *b > 0.0)
        .ok_or_else(|| anyhow!("fio's JSON has no write bandwidth"))?;
    let syncs = job["sync"]["lat_ns"]["N"].as_u64().unwrap_or(0);
    let iops = job["write"]["iops"].as_f64().unwrap_or(0.0);
    Ok(FioResult { bytes_per_sec, syncs, iops })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fio_json_after_notes() {
        let out = r#"note: both iodepth >= 1 and synchronous I/O engine are selected
{
  "fio version" : "fio-3.33",
  "jobs" : [
    { "jobname" : "append", "error" : 0,
      "write" : { "io_bytes" : 67108864, "bw_bytes" : 233016888, "iops" : 222.2 },
      "sync" : { "total_ios" : 0, "lat_ns" : { "mean" : 3077227.1, "N" : 63 } } }
  ]
}"#;
        let r = parse(out).unwrap();
        assert_eq!(r.bytes_per_sec, 233016888.0);
        assert_eq!(r.syncs, 63);
        assert_eq!(r.iops, 222.2);
        assert!(parse("no json here").is_err());
        assert!(parse(r#"{"jobs": [{"error": 5}]}"#).is_err());
    }
}
