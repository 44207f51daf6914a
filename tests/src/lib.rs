//! Workspace-level test support. The integration tests themselves live in `tests/`; this
//! library holds what they share:
//! - [`crashcheck`]: the crash-consistency checker (is an image a state the source device
//!   could have had after a power cut at a point of a recorded history?);
//! - [`figures`]: the `RELIABILITY name=value` lines `cargo xtask reliability` collects;
//! - [`sim`]: the deterministic fault simulation, run by `tests/tests/sim.rs` and
//!   `cargo xtask sim`.

pub mod crashcheck;
pub mod figures;
pub mod sim;
