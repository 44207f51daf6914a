//! The `status.json` of a `protect` state directory or a `receive` directory, and
//! `tidemark status` to show it.
//!
//! Invariant: the file is always whole: it is written to `status.json.tmp`, synced, and
//! renamed over `status.json`, so a reader never sees a torn document.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::Value;

/// The status file's name inside its directory.
pub const FILE: &str = "status.json";

/// Writes `value` as `dir/status.json`, atomically (temporary file, then rename).
pub fn write(dir: &Path, value: &Value) -> anyhow::Result<()> {
    let tmp = dir.join(format!("{FILE}.tmp"));
    let path = dir.join(FILE);
    let mut text = serde_json::to_vec_pretty(value).context("encode the status")?;
    text.push(b'\n');
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    f.write_all(&text).with_context(|| format!("write {}", tmp.display()))?;
    f.sync_data().with_context(|| format!("sync {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, &path)
        .with_context(|| format!("rename {} to {}", tmp.display(), path.display()))
}

/// Unix time in milliseconds (the `updated_ms` field of every status document).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The state directory of `tidemark protect` or the directory of `tidemark receive`.
    #[arg(long)]
    state: PathBuf,
    /// Print the raw JSON document instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let path = args.state.join(FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    if args.json {
        print!("{text}");
        return Ok(());
    }
    let value: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a status document", path.display()))?;
    let mut rows = Vec::new();
    flatten("", &value, &mut rows);
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rows {
        println!("{k:<width$}  {v}");
    }
    Ok(())
}

/// Flattens nested objects into `a.b.c` keys; arrays and scalars are shown as JSON.
fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        Value::String(s) => out.push((prefix.to_owned(), s.clone())),
        Value::Null => out.push((prefix.to_owned(), "-".to_owned())),
        other => out.push((prefix.to_owned(), other.to_string())),
    }
}
