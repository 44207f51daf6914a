//! Workspace-level integration tests live in `tests/`; this library holds what they share:
//! the deterministic fault simulation ([`sim`]), run by `tests/tests/sim.rs` and
//! `cargo xtask sim`.

pub mod sim;
