//! Everything that crosses the network, and every comparison of two devices: wire protocol,
//! transport, compression, encryption, dedupe, bandwidth shaping, apply on the target,
//! initial sync, fast resync and verify.
//!
//! This crate is a placeholder in the first landing; the replication path arrives with its
//! own issue. Nothing here is called by the agent yet.
