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
//!   or `Refuse`), with the exchange of the two sides' lineages ([`lineage`]: split-brain
//!   detection).
//!
//! On top of them, the replication stream:
//! - [`ship`]: the source's [`Shipper`]: spool -> batches -> wire, acks -> spool trim,
//!   reconnect with backoff and resume;
//! - [`apply`]: the target's [`Receiver`]: wire -> retention log with group commit, acks of
//!   durable data only, resume point for each new connection;
//! - [`shape`]: the bandwidth limit ([`TokenBucket`], daily [`shape::Schedule`]) and the cap
//!   on concurrent resyncs ([`shape::ResyncSlots`]);
//! - [`dedupe`]: the windows of recent writes on both sides, so that a block the target
//!   already holds travels as a reference;
//! - [`compress`]: the adaptive zstd level of batches.
//!
//! And the comparison of two devices (`docs/resync.md`):
//! - [`resync`]: block sources and their data extents (holes, ext4 allocation), the
//!   parallel Merkle tree, the top-down comparison, verify;
//! - [`syncer`]: the [`syncer::Syncer`]: initial sync step I, fast resync and verify of one
//!   volume, copying through the tap into the capture stream;
//! - [`pair`]: the [`pair::SourcePair`], which decides which of them a volume needs.
//!
//! And recovery on the target:
//! - [`vsnap`]: virtual snapshots, a recovery point served as a block device (read-only, or
//!   read-write over a throw-away overlay) straight from the retention log, while the
//!   [`Receiver`] keeps applying.

pub mod apply;
pub mod compress;
pub mod connection;
pub mod dedupe;
pub mod lineage;
pub mod pair;
pub mod pipe;
pub mod resync;
pub mod secure;
pub mod shape;
pub mod ship;
pub mod syncer;
pub mod vsnap;
pub mod watch;
pub mod wire;

pub use apply::{ApplyError, Receiver, ReceiverConfig, ReceiverStatus};
pub use resync::{BlockSource, Diff, HashOracle, MerkleTree, ResyncError};
pub use shape::{Rate, TokenBucket};
pub use ship::{LinkState, ShipError, Shipper, ShipperConfig, ShipperHandle, ShipperStatus};

pub use connection::{Connection, ConnectionError};
pub use secure::{
    AllowedPeers, Fingerprint, Keypair, PublicKey, SecureChannel, SecureConfig, SecureError,
};
pub use wire::{Codec, Message, WireError};
