//! The virtual snapshots one process exposes: each a [`Vsnap`] of the retention log served by
//! its own block device frontend ([`Frontend`]): a ublk device (`/dev/ublkbN`, served by a
//! [`UblkServer`] over the vsnap) where `ublk_drv` is usable, else FUSE + loop (the FUSE
//! mount point `mnt` under `DIR/vsnaps/<name>/`). A read-write one keeps its sparse overlay
//! file `overlay` in that directory whatever the frontend. Used by `receive` (through the
//! control socket, on the receiver's log while it keeps applying) and by `recover` when no
//! receiver runs (on a log it opened itself).
//!
//! Invariant: removing a vsnap tears its frontend down (ublk device deleted, or loop device
//! detached and FUSE unmounted) before the vsnap is dropped, and dropping it releases its
//! hold on the point and deletes its overlay; nothing of it reaches the replica or the
//! journal.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use serde_json::{Value, json};
use tidemark_journal::{PointInfo, RecoveryPoint, VolumeId};
use tidemark_sync::vsnap::{LogAccess, OverlayStore, Vsnap, VsnapMode, with_log};
use tidemark_tap::{BlockBackend, FuseLoopConfig, FuseLoopFrontend, UblkConfig, UblkServer, ublk};

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

/// Which block device frontend serves a vsnap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Frontend {
    /// ublk when the control device opens and the device starts, else FUSE + loop.
    #[default]
    Auto,
    /// A ublk device (`/dev/ublkbN`); fails where `ublk_drv` is not usable.
    Ublk,
    /// A loop device over a FUSE file.
    Fuse,
}

impl Frontend {
    pub fn as_str(self) -> &'static str {
        match self {
            Frontend::Auto => "auto",
            Frontend::Ublk => "ublk",
            Frontend::Fuse => "fuse",
        }
    }

    pub fn parse(s: &str) -> anyhow::Result<Frontend> {
        match s {
            "auto" => Ok(Frontend::Auto),
            "ublk" => Ok(Frontend::Ublk),
            "fuse" => Ok(Frontend::Fuse),
            other => anyhow::bail!("frontend {other:?}: expected \"auto\", \"ublk\" or \"fuse\""),
        }
    }
}

/// The frontend serving one vsnap.
#[derive(Debug)]
enum Served {
    Fuse(FuseLoopFrontend),
    Ublk(UblkServer),
}

impl Served {
    fn kind(&self) -> Frontend {
        match self {
            Served::Fuse(_) => Frontend::Fuse,
            Served::Ublk(_) => Frontend::Ublk,
        }
    }

    fn device(&self) -> Option<PathBuf> {
        match self {
            Served::Fuse(f) => f.device_path().map(Path::to_path_buf),
            Served::Ublk(u) => Some(u.block_path()),
        }
    }

    fn shutdown(self) -> anyhow::Result<()> {
        match self {
            Served::Fuse(f) => Ok(f.shutdown()?),
            Served::Ublk(u) => Ok(u.stop()?),
        }
    }
}

/// One exposed vsnap.
#[derive(Debug)]
struct Exposed {
    mode: Mode,
    vsnap: Arc<Vsnap>,
    frontend: Served,
    dir: PathBuf,
}

/// What an expose returns.
#[derive(Debug, Clone)]
pub struct ExposedInfo {
    pub id: u64,
    pub device: PathBuf,
    /// `ublk` or `fuse`: the frontend chosen.
    pub frontend: Frontend,
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
    /// The ublk control device probed for [`Frontend::Auto`] and used for ublk.
    ublk_control: PathBuf,
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
            ublk_control: PathBuf::from(ublk::sys::CONTROL_PATH),
        }
    }

    /// Exposes `point` as a new vsnap on the frontend [`Frontend::Auto`] picks.
    #[allow(dead_code)] // for callers with no frontend choice of their own
    pub fn expose(&mut self, point: &RecoveryPoint, mode: Mode) -> anyhow::Result<ExposedInfo> {
        self.expose_on(point, mode, Frontend::Auto)
    }

    /// Exposes `point` as a new vsnap served by `frontend`; an unknown point is refused with
    /// the nearest points, [`Frontend::Ublk`] where ublk is not usable with the reason
    /// (naming the control device).
    pub fn expose_on(
        &mut self,
        point: &RecoveryPoint,
        mode: Mode,
        frontend: Frontend,
    ) -> anyhow::Result<ExposedInfo> {
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
        let frontend = match self.serve(&vsnap, &dir, frontend) {
            Ok(served) => served,
            Err(e) => {
                drop(vsnap);
                let _ = std::fs::remove_dir(&dir);
                return Err(e.context(format!("serve virtual snapshot {name}")));
            }
        };
        let device = frontend.device().context("the frontend attached no block device")?;
        let info = ExposedInfo {
            id,
            device,
            frontend: frontend.kind(),
            point: vsnap.point().clone(),
            len: vsnap.size(),
        };
        tracing::info!(id, device = %info.device.display(), frontend = info.frontend.as_str(), seq = %info.point.seq, mode = mode.as_str(), "vsnap exposed");
        self.exposed.insert(id, Exposed { mode, vsnap, frontend, dir });
        Ok(info)
    }

    /// Starts the frontend `wanted` asks for over `vsnap` (see [`Frontend`]).
    fn serve(&self, vsnap: &Arc<Vsnap>, dir: &Path, wanted: Frontend) -> anyhow::Result<Served> {
        let fuse = || -> anyhow::Result<Served> {
            let mut cfg = FuseLoopConfig::new(dir.join("mnt"));
            cfg.file_name = "snapshot".into();
            cfg.threads = 4;
            Ok(Served::Fuse(FuseLoopFrontend::start_backend(vsnap.clone(), cfg)?))
        };
        let ublk = || -> anyhow::Result<Served> {
            let cfg = UblkConfig {
                depth: 32,
                control_path: self.ublk_control.clone(),
                ..UblkConfig::default()
            };
            UblkServer::start_backend(cfg, vsnap.clone()).map(Served::Ublk).with_context(|| {
                format!(
                    "ublk frontend over {} (load ublk_drv, or use the fuse frontend)",
                    self.ublk_control.display()
                )
            })
        };
        match wanted {
            Frontend::Fuse => fuse(),
            Frontend::Ublk => ublk(),
            Frontend::Auto => match ublk::probe(&self.ublk_control) {
                Err(e) => {
                    tracing::info!(reason = %e, "no ublk here: vsnap served by FUSE + loop");
                    fuse()
                }
                Ok(()) => ublk().or_else(|e| {
                    tracing::warn!(reason = %format!("{e:#}"), "ublk did not start: vsnap served by FUSE + loop");
                    fuse()
                }),
            },
        }
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
                    "frontend": e.frontend.kind().as_str(),
                    "device": e.frontend.device().map(|p| p.display().to_string()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontend_names_round_trip_and_unknown_ones_are_refused() {
        for f in [Frontend::Auto, Frontend::Ublk, Frontend::Fuse] {
            assert_eq!(Frontend::parse(f.as_str()).unwrap(), f);
        }
        let err = Frontend::parse("nbd").unwrap_err().to_string();
        assert!(err.contains("nbd") && err.contains("ublk") && err.contains("fuse"), "{err}");
    }
}
