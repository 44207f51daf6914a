//! The virtual snapshots one process exposes: each a [`Vsnap`] of the retention log served by
//! its own FUSE + loop frontend, under `DIR/vsnaps/<name>/` (the FUSE mount point `mnt`, and
//! for a read-write one the sparse overlay file `overlay`). Used by `receive` (through the
//! control socket, on the receiver's log while it keeps applying) and by `recover` when no
//! receiver runs (on a log it opened itself).
//!
//! Invariant: removing a vsnap tears its frontend down (loop device detached, FUSE
//! unmounted) before the vsnap is dropped, and dropping it releases its hold on the point
//! and deletes its overlay; nothing of it reaches the replica or the journal.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use serde_json::{Value, json};
use tidemark_journal::{PointInfo, RecoveryPoint, VolumeId};
use tidemark_sync::vsnap::{LogAccess, OverlayStore, Vsnap, VsnapMode, with_log};
use tidemark_tap::{BlockBackend, FuseLoopConfig, FuseLoopFrontend};

use crate::points;

/// Read-only or read-write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Writes refused; mountable read-only.
    Ro,
    /// Writes go to a throw-away overlay.
    Rw,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Ro => "ro",
            Mode::Rw => "rw",
        }
    }

    pub fn parse(s: &str) -> anyhow::Result<Mode> {
        match s {
            "ro" => Ok(Mode::Ro),
            "rw" => Ok(Mode::Rw),
            other => anyhow::bail!("mode {other:?}: expected \"ro\" or \"rw\""),
        }
    }
}

/// One exposed vsnap.
#[derive(Debug)]
struct Exposed {
    mode: Mode,
    vsnap: Arc<Vsnap>,
    frontend: FuseLoopFrontend,
    dir: PathBuf,
}

/// What an expose returns.
#[derive(Debug, Clone)]
pub struct ExposedInfo {
    pub id: u64,
    pub device: PathBuf,
    pub point: PointInfo,
    pub len: u64,
}

/// The vsnaps of this process (see the module documentation).
#[derive(Debug)]
pub struct Registry {
    log: Arc<dyn LogAccess>,
    root: PathBuf,
    prefix: String,
    next: u64,
    exposed: BTreeMap<u64, Exposed>,
}

impl Registry {
    /// Vsnaps of the log behind `log`, under `root` (created when needed), their directory
    /// names starting with `prefix`.
    pub fn new(log: Arc<dyn LogAccess>, root: &Path, prefix: &str) -> Registry {
        Registry {
            log,
            root: root.to_path_buf(),
            prefix: prefix.to_owned(),
            next: 1,
            exposed: BTreeMap::new(),
        }
    }

    /// Exposes `point` as a new vsnap; an unknown point is refused with the nearest points.
    pub fn expose(&mut self, point: &RecoveryPoint, mode: Mode) -> anyhow::Result<ExposedInfo> {
        with_log(&*self.log, |l| points::resolve_or_explain(l, point))?;
        let id = self.next;
        self.next += 1;
        let name = format!("{}{id}", self.prefix);
        let dir = self.root.join(&name);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let overlay = dir.join("overlay");
        // Left by a crashed run: ours, thrown away.
        if overlay.exists() {
            std::fs::remove_file(&overlay)
                .with_context(|| format!("remove stale overlay {}", overlay.display()))?;
        }
        let vmode = match mode {
            Mode::Ro => VsnapMode::ReadOnly,
            Mode::Rw => VsnapMode::ReadWrite(OverlayStore::File(overlay)),
        };
        let vsnap = Arc::new(
            Vsnap::open(self.log.clone(), point, VolumeId(0), vmode, name.clone())
                .with_context(|| format!("open virtual snapshot {name} of {point}"))?,
        );
        let mut cfg = FuseLoopConfig::new(dir.join("mnt"));
        cfg.file_name = "snapshot".into();
        cfg.threads = 4;
        let frontend = FuseLoopFrontend::start_backend(vsnap.clone(), cfg)
            .with_context(|| format!("serve virtual snapshot {name}"))?;
        let device =
            frontend.device_path().context("the frontend attached no loop device")?.to_path_buf();
        let info = ExposedInfo { id, device, point: vsnap.point().clone(), len: vsnap.size() };
        tracing::info!(id, device = %info.device.display(), seq = %info.point.seq, mode = mode.as_str(), "vsnap exposed");
        self.exposed.insert(id, Exposed { mode, vsnap, frontend, dir });
        Ok(info)
    }

    /// Tears vsnap `id` down and throws its overlay away; returns how many overlay blocks it
    /// had.
    pub fn remove(&mut self, id: u64) -> anyhow::Result<u64> {
        let known: Vec<u64> = self.exposed.keys().copied().collect();
        let e = self
            .exposed
            .remove(&id)
            .with_context(|| format!("no virtual snapshot {id} (exposed: {known:?})"))?;
        let blocks = e.vsnap.overlay_blocks();
        let result =
            e.frontend.shutdown().with_context(|| format!("tear down virtual snapshot {id}"));
        // The frontend's threads are gone: this is the last reference, so the hold and the
        // overlay go now.
        drop(e.vsnap);
        let _ = std::fs::remove_dir(e.dir.join("mnt"));
        let _ = std::fs::remove_dir(&e.dir);
        result.map(|()| blocks)
    }

    /// Removes every vsnap (shutdown).
    pub fn remove_all(&mut self) {
        let ids: Vec<u64> = self.exposed.keys().copied().collect();
        for id in ids {
            if let Err(e) = self.remove(id) {
                eprintln!("vsnap {id}: {e:#}");
            }
        }
    }

    /// The vsnaps as JSON.
    pub fn list(&self) -> Vec<Value> {
        self.exposed
            .iter()
            .map(|(id, e)| {
                json!({
                    "id": id,
                    "mode": e.mode.as_str(),
                    "device": e.frontend.device_path().map(|p| p.display().to_string()),
                    "point": points::point_json(e.vsnap.point()),
                    "overlay_blocks": e.vsnap.overlay_blocks(),
                })
            })
            .collect()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.remove_all();
    }
}
