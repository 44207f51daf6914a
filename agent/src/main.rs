//! `tidemark`: the agent binary. A driver only: argument parsing, wiring, printing. The
//! logic lives in the `tidemark-journal`, `tidemark-tap` and `tidemark-sync` crates.

mod bookmark;
mod common;
mod control;
mod demo;
mod failback;
mod group;
mod grow;
mod inspect;
mod keygen;
mod limits;
mod lineage;
mod materialize;
mod metrics;
mod points;
mod profile;
mod promote;
mod protect;
mod receive;
mod recover;
mod signals;
mod source_control;
mod status;
mod up;
mod verify;
mod vsnaps;

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
    /// Protect a volume: capture its writes (through a frontend) and replicate them to a
    /// `tidemark receive` target, with the initial sync, resyncs and diff sync.
    Protect(protect::Args),
    /// Be the target of a pair: keep the replica and its CDP retention log, serve the
    /// paired source.
    ///
    /// Runs until SIGINT or SIGTERM. Then it stops promptly: the control socket closes
    /// (virtual snapshots torn down), the live session appends and acknowledges what it had
    /// already received, the source is told `Error` code 7 (shutting down) and retries
    /// later, connections still in their handshake are cut, and the retention log is
    /// synced; status.json then says `"state": "stopped"` with `durable` equal to
    /// `received`. Exit status: 0 after such a stop; 1 when it could not start (bad
    /// options, keys, directory, port) or a step of the stop failed (the message says
    /// which).
    Receive(receive::Args),
    /// Show the status.json of a `protect` state directory or a `receive` directory.
    Status(status::Args),
    /// Write the latest consistent point of a `receive` directory's replica to a file
    /// (with `receive` stopped).
    Materialize(materialize::Args),
    /// List the recovery points of a `receive` directory (through the running receiver's
    /// control socket, or from the journal when none runs).
    Points(points::Args),
    /// Expose a recovery point as a virtual snapshot (read-only, or read-write over a
    /// throw-away overlay, for a DR drill) or materialize it into a verified file.
    Recover(recover::Args),
    /// Failover: make a stopped receiver's replica the live volume at a point (the journal
    /// folded into replica.img, the rest kept aside); restartable after a crash.
    Promote(promote::Args),
    /// Run a pair of the configuration file by name (`[pair.NAME]`): its `protect` or
    /// `receive`, with the options the file gives. The systemd unit `tidemark@NAME` runs this.
    Up(up::UpArgs),
    /// Work with the configuration file.
    #[command(subcommand)]
    Config(up::ConfigCommand),
    /// Capture a volume's writes without a target for a while: change rate, compressibility,
    /// the WAN bandwidth a desired RPO needs and the journal a retention window needs.
    Profile(profile::Args),
    /// Compare the protected volume with the target's replica through the running
    /// `protect` (Merkle hashes, nothing sent) and print the differing ranges; exit code 0
    /// identical, 1 different, 2 could not verify.
    Verify(verify::Args),
    /// Insert a named bookmark into the capture stream of the running `protect`
    /// (optionally with the filesystem frozen, or between pre/post hook scripts).
    Bookmark(bookmark::Args),
    /// Show or change a running `protect`'s link limits: the bandwidth limit, its daily
    /// schedule and the cap on concurrent resyncs (through its control socket).
    Limits(limits::Args),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TIDEMARK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    run(Cli::parse())
}

/// Runs a parsed command line (also the one `tidemark up` builds from the configuration).
fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Keygen(args) => keygen::run(args),
        Command::Inspect { dir } => inspect::run(&dir),
        Command::Protect(args) => protect::run(args),
        Command::Receive(args) => receive::run(args),
        Command::Status(args) => status::run(args),
        Command::Materialize(args) => materialize::run(args),
        Command::Points(args) => points::run(args),
        Command::Recover(args) => recover::run(args),
        Command::Promote(args) => promote::run(args),
        Command::Up(args) => up::up(args),
        Command::Config(command) => up::config(command),
        Command::Profile(args) => profile::run(args),
        Command::Verify(args) => std::process::exit(verify::run(args)),
        Command::Bookmark(args) => bookmark::run(args),
        Command::Limits(args) => limits::run(args),
    }
}
