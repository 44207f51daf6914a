//! Everything that crosses the network, and every comparison of two devices: wire protocol,
//! transport, compression, encryption, dedupe, bandwidth shaping, apply on the target,
//! initial sync, fast resync and verify.
//!
//! The layers, bottom up (spec: `docs/wire-protocol.md`):
//! - a byte stream ([`secure::Stream`]: TCP in production, [`pipe`] in tests);
//! - [`secure`]: the Noise `XX` handshake with mutual authentication against an allowed-peer
//!   list, then AES-256-GCM-sealed records, each at most 65535 bytes, carrying messages of
//!   up to the maximum frame length in chunks;
//! - [`wire`]: one frame per message: the versioned, hand-written message codec;
//! - [`connection`]: the two together, plus the opening exchange (`Hello`, then `Welcome`
//!   or `Refuse`).
//!
//! Shipping, apply, dedupe, shaping and resync build on these and arrive with issue 3.

pub mod connection;
pub mod pipe;
pub mod secure;
pub mod wire;

pub use connection::{Connection, ConnectionError};
pub use secure::{
    AllowedPeers, Fingerprint, Keypair, PublicKey, SecureChannel, SecureConfig, SecureError,
};
pub use wire::{Codec, Message, WireError};
