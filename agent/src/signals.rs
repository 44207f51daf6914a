//! SIGINT / SIGTERM as a flag: the long-running commands (`protect`, `receive`) poll
//! [`stop_requested`] in their main loop and shut down cleanly when it is set.
//!
//! Invariant: the handler only stores to an atomic (async-signal-safe); everything else
//! happens on the main thread.

use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: nix::libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Installs the handler for SIGINT and SIGTERM.
pub fn install() -> anyhow::Result<()> {
    let action =
        SigAction::new(SigHandler::Handler(on_signal), SaFlags::SA_RESTART, SigSet::empty());
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to a static atomic, which is async-signal-safe,
        // and replaces no handler that another part of the program relies on.
        unsafe { sigaction(sig, &action) }
            .map_err(|e| anyhow::anyhow!("install the {sig} handler: {e}"))?;
    }
    Ok(())
}

/// Whether SIGINT or SIGTERM arrived.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}
