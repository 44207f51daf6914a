//! What `protect` and `receive` share: the pairing (keys, pair id) and small helpers.

use std::path::Path;

use anyhow::{Context, bail};
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

/// Seconds as a float with millisecond precision (for status documents).
pub fn secs(d: std::time::Duration) -> f64 {
    (d.as_millis() as f64) / 1000.0
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
