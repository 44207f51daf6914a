//! `tidemark keygen`: makes a node's key pair and prints what a person compares when pairing
//! a source with a target.

use std::path::{Path, PathBuf};

use anyhow::Context;
use tidemark_sync::Keypair;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory for the key files (created if missing).
    #[arg(long, default_value = "/etc/tidemark")]
    dir: PathBuf,
    /// Name of this node; the files are NAME.key (private, 0600) and NAME.pub.
    #[arg(long, default_value = "node")]
    name: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir).with_context(|| format!("create {}", args.dir.display()))?;
    let private = args.dir.join(format!("{}.key", args.name));
    let public = args.dir.join(format!("{}.pub", args.name));
    let pair = Keypair::generate()?;
    pair.save(&private).with_context(|| format!("save private key {}", private.display()))?;
    pair.public()
        .save(&public, Some(&args.name))
        .with_context(|| format!("save public key {}", public.display()))?;
    print_pairing(&args.name, &private, &public, &pair);
    Ok(())
}

fn print_pairing(name: &str, private: &Path, public: &Path, pair: &Keypair) {
    println!("new key pair for node {name:?}");
    println!("  private key: {} (mode 0600; never copy it off this host)", private.display());
    println!("  public key:  {}", public.display());
    println!("  {}", pair.public());
    println!("  fingerprint: {}", pair.fingerprint());
    println!();
    println!("To pair: copy {} to the peer and add its line to the peer's", public.display());
    println!("allowed-peers file; do the same with the peer's public key here. Then read");
    println!("both fingerprints to each other over a channel you trust: they must match.");
}
