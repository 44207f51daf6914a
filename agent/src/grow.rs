//! Disk growth on the source: `tidemark protect` follows a protected image or device that
//! grew (checked once a second, from its main loop). In order: [`Tap::grow`] (a resize
//! event in the spool, durable, then the intent map grown with the new range out of sync,
//! then the new size served), the next `Hello` announces the new size, and the frontend
//! shows it (the FUSE file's attributes dropped from the kernel's cache, the loop device's
//! capacity re-read). The pair controller then resyncs the new range once the target
//! acknowledged the resize: only what differs from zeros moves.
//!
//! A volume only grows: a backing device that became smaller is refused (reported once,
//! naming both sizes, and kept in status.json) and nothing is resized; writes past its end
//! fail at the device and the replica keeps its size, so nothing is corrupted, until the
//! device is back to at least the protected size.

use std::path::Path;

use serde_json::{Value, json};
use tidemark_journal::VolumeId;
use tidemark_sync::ShipperHandle;
use tidemark_sync::wire::VolumeInfo;
use tidemark_tap::{FuseLoopFrontend, Tap};

/// Growth is followed in whole blocks of this many bytes (the `Hello`'s block size).
pub const GROW_UNIT: u64 = 4096;

/// What the follower saw, for status.json.
#[derive(Debug, Default)]
pub struct Follower {
    grows: u64,
    last: Option<Value>,
    refused: Option<String>,
}

impl Follower {
    /// Checks the backing size of `tap` and follows a growth (see the module
    /// documentation). Errors are reported and kept; the next check tries again.
    pub fn check(
        &mut self,
        image: &Path,
        tap: &Tap,
        shipper: &ShipperHandle,
        frontend: Option<&FuseLoopFrontend>,
    ) {
        let backing = match tap.backing_len() {
            Ok(len) => len,
            Err(e) => {
                self.refuse(format!("size of {}: {e}", image.display()));
                return;
            }
        };
        let served = tap.device_len();
        if backing < served {
            self.refuse(format!(
                "volume {} shrank from {served} to {backing} bytes: refused (a protected volume only grows); \
                 the replica keeps {served} bytes and writes past {backing} fail until the device is back to at least {served} bytes",
                image.display()
            ));
            return;
        }
        let new_len = backing / GROW_UNIT * GROW_UNIT;
        if new_len <= served {
            self.refused = None;
            return;
        }
        match tap.grow(new_len) {
            Ok(seq) => {
                shipper.set_volumes(vec![VolumeInfo {
                    id: VolumeId(0),
                    block_size: GROW_UNIT as u32,
                    size: new_len,
                }]);
                let shown = frontend.map(|f| f.refresh_size());
                let frontend_bytes = match shown {
                    Some(Ok(n)) => Some(n),
                    Some(Err(e)) => {
                        eprintln!(
                            "grew to {new_len} bytes, but the frontend still shows the old size: {e}"
                        );
                        None
                    }
                    None => None,
                };
                println!(
                    "grew: {} from {served} to {new_len} bytes (resize at seq {})",
                    image.display(),
                    seq.map_or("-".to_owned(), |s| s.to_string())
                );
                self.grows += 1;
                self.refused = None;
                self.last = Some(json!({
                    "from_bytes": served,
                    "to_bytes": new_len,
                    "seq": seq.map(|s| s.0),
                    "frontend_bytes": frontend_bytes,
                }));
            }
            Err(e) => self.refuse(format!("growing {} to {new_len} bytes: {e}", image.display())),
        }
    }

    fn refuse(&mut self, text: String) {
        if self.refused.as_ref() != Some(&text) {
            eprintln!("{text}");
            tracing::error!("{text}");
        }
        self.refused = Some(text);
    }

    /// The `grow` object of status.json.
    pub fn json(&self) -> Value {
        json!({ "grows": self.grows, "last": self.last, "refused": self.refused })
    }
}
