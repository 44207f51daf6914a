//! `tidemark`: the agent binary. A driver only: argument parsing, wiring, printing. The
//! logic lives in the `tidemark-journal`, `tidemark-tap` and `tidemark-sync` crates.

mod demo;
mod inspect;
mod keygen;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "tidemark",
    version,
    about = "Block-level disaster-recovery replication with continuous data protection"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the end-to-end demonstration on this machine: a protected volume, a workload
    /// with bookmarks, the CDP retention log, and every bookmark recovered and verified.
    Demo(demo::Args),
    /// Make this node's key pair (for mutual authentication with its peers) and print the
    /// fingerprint to compare when pairing.
    Keygen(keygen::Args),
    /// Show what a journal directory holds: manifest, segments, records, damage.
    Inspect {
        /// The journal directory.
        dir: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TIDEMARK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Keygen(args) => keygen::run(args),
        Command::Inspect { dir } => inspect::run(&dir),
    }
}
