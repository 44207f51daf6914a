//! What `protect` and `receive` share: the pairing (keys, pair id) and small helpers.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tidemark_journal::{BlockIo, FileIo, FsDir, RetentionConfig, RetentionLog, SystemClock};
use tidemark_sync::secure::{AllowedPeers, Keypair, PublicKey, SecureConfig};
use tidemark_sync::wire::PairId;

/// The secure channel's settings: this node's private key, the one peer it accepts.
pub fn secure(key: &Path, peer: &Path) -> anyhow::Result<SecureConfig> {
    let pair = Keypair::load(key).with_context(|| format!("load private key {}", key.display()))?;
    let peer_key = PublicKey::load(peer)
        .with_context(|| format!("load peer public key {}", peer.display()))?;
    Ok(SecureConfig::new(pair, AllowedPeers::from_keys([peer_key])))
}

/// Parses a pair id: 32 hexadecimal digits (16 bytes), as `tidemark` prints them.
pub fn parse_pair(hex: &str) -> anyhow::Result<PairId> {
    let hex = hex.trim();
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("pair id {hex:?}: expected 32 hexadecimal digits");
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).context("pair id digit")?;
    }
    Ok(PairId(id))
}

/// Opens the retention log of a `receive` directory here, in this process (no receiver
/// may be running on it).
pub fn open_log(dir: &Path, block_size: u32) -> anyhow::Result<RetentionLog> {
    let image = dir.join("replica.img");
    let base = FileIo::open(&image).with_context(|| format!("open {}", image.display()))?;
    let cfg = RetentionConfig { block_size, ..Default::default() };
    let (log, report) = RetentionLog::open(
        Arc::new(FsDir::new(dir.join("journal"))?),
        vec![Arc::new(base) as Arc<dyn BlockIo>],
        cfg,
        Arc::new(SystemClock),
    )
    .with_context(|| format!("open the retention log in {}", dir.display()))?;
    if !report.defects.is_empty() {
        eprintln!(
            "journal: {} damaged stretches skipped: {:?}",
            report.defects.len(),
            report.defects
        );
    }
    Ok(log)
}

/// Parses `90s`, `30m`, `24h`, `7d`, `250ms` or a bare number of seconds.
/// Opens a volume to capture (`protect`, `profile`): the image file or block device and its
/// length, which must be a positive multiple of 4096 (the tap's and the wire's block).
pub fn open_volume(image: &Path) -> anyhow::Result<(FileIo, u64)> {
    let device =
        FileIo::open(image).with_context(|| format!("open the volume {}", image.display()))?;
    let len = device.len().with_context(|| format!("size of {}", image.display()))?;
    if len == 0 || len % 4096 != 0 {
        bail!("{} holds {len} bytes: expected a positive multiple of 4096", image.display());
    }
    Ok((device, len))
}

/// The one duration syntax of every command line option (`--retain`, `--tier`,
/// `--bookmark-every`, `profile --retention`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 =
        num.parse().ok().filter(|n: &f64| n.is_finite() && *n >= 0.0).ok_or_else(|| {
            format!("duration {text:?}: expected a number and a unit (s, m, h, d)")
        })?;
    let scale = match unit {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        other => return Err(format!("duration {text:?}: unknown unit {other:?} (ms, s, m, h, d)")),
    };
    Ok(Duration::from_secs_f64(n * scale))
}

/// Seconds as a float with millisecond precision (for status documents).
pub fn secs(d: std::time::Duration) -> f64 {
    (d.as_millis() as f64) / 1000.0
}

/// A progress bar for a long operation over `total` bytes, with rate and ETA, on stderr
/// when stderr is a terminal (`None` otherwise: logs and pipes get no escape sequences).
pub fn byte_bar(label: &str, total: u64) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:40}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix(label.to_owned());
    Some(bar)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_ids_round_trip_and_bad_ones_are_refused() {
        let id = parse_pair("000102030405060708090a0b0c0d0eFF").unwrap();
        assert_eq!(id.to_string(), "000102030405060708090a0b0c0d0eff");
        assert!(parse_pair("0001").is_err());
        assert!(parse_pair("zz0102030405060708090a0b0c0d0e0f").is_err());
    }
}
