//! The library half of the `tidemark` package: what the agent binary shares with the fuzz
//! targets and the workspace tests. The commands themselves live in the binary
//! (`src/main.rs`); only code that must be reachable from outside it is here.

pub mod config;
