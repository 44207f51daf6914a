//! The replication rig the sync figures run on: a source (spool on disk, optionally a tap
//! over a protected image file) and a target (a receiver over a retention log on disk whose
//! base is a file), connected over TCP loopback with the Noise/AES-256-GCM transport.
//!
//! Invariants: both sides allow exactly each other's freshly generated static key; every
//! journal and image lives under the directory the caller gives; [`Target::stop`] and
//! [`ShipperHandle::stop`] are called on every path that started them (by `Drop`).

use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tidemark_journal::{
    BlockIo, Dir, FileIo, FsDir, RetentionConfig, RetentionLog, Seq, Spool, SpoolConfig,
    SystemClock, VolumeId,
};
use tidemark_sync::apply::{Listener, Receiver, ReceiverConfig};
use tidemark_sync::secure::{AllowedPeers, Keypair, SecureConfig};
use tidemark_sync::ship::{
    LinkState, Shipper, ShipperConfig, ShipperHandle, ShipperStatus, TcpConnect,
};
use tidemark_sync::syncer::{Syncer, SyncerConfig};
use tidemark_sync::wire::{Compression, Hello, PairId, Role, SUPPORTED_VERSIONS, VolumeInfo};
use tidemark_tap::{IntentConfig, IntentMap, Tap, TapConfig};

/// The replication pair every rig uses.
const PAIR: PairId = PairId([0x5b; 16]);

/// The longest any wait for the target may take before the benchmark fails.
pub const PATIENCE: Duration = Duration::from_secs(1800);

/// Source and target transport configurations that allow each other.
pub fn paired_keys() -> Result<(SecureConfig, SecureConfig)> {
    let s = Keypair::generate().context("generating the source's key")?;
    let t = Keypair::generate().context("generating the target's key")?;
    let cs = SecureConfig::new(s.clone(), AllowedPeers::from_keys([*t.public()]));
    let ct = SecureConfig::new(t, AllowedPeers::from_keys([*s.public()]));
    Ok((cs, ct))
}

/// How the shipper compresses and deduplicates.
#[derive(Debug, Clone, Copy)]
pub struct Wire {
    /// The starting (or fixed) compression.
    pub compression: Compression,
    /// Adapt the level to the link and the CPU (the default policy).
    pub adaptive: bool,
    /// Send repeated 4 KiB blocks as references (the default window).
    pub dedupe: bool,
}

impl Wire {
    /// The shipper's defaults: zstd from level 1, adaptive, dedupe on.
    pub fn defaults() -> Self {
        Self { compression: Compression::Zstd { level: 1 }, adaptive: true, dedupe: true }
    }
}

/// A receiver over a retention log in `dir/retention` whose base image is `base`,
/// listening on a loopback port.
pub struct Target {
    /// The receiver (its log is reachable with [`Receiver::with_log`]).
    pub receiver: Receiver,
    listener: Option<Listener>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target").field("listener", &self.listener).finish_non_exhaustive()
    }
}

impl Target {
    /// Opens the log (creating it) and starts listening.
    pub fn start(dir: &Path, base: &Path, secure: SecureConfig) -> Result<Self> {
        let log_dir = dir.join("retention");
        std::fs::create_dir_all(&log_dir)
            .with_context(|| format!("creating {}", log_dir.display()))?;
        let base: Arc<dyn BlockIo> = Arc::new(
            FileIo::open(base).with_context(|| format!("opening the base {}", base.display()))?,
        );
        let (log, _) = RetentionLog::open(
            Arc::new(FsDir::new(&log_dir)?),
            vec![base],
            RetentionConfig::default(),
            Arc::new(SystemClock),
        )
        .with_context(|| format!("opening the retention log in {}", log_dir.display()))?;
        let receiver = Receiver::new(log, ReceiverConfig::new("bench-target", PAIR, secure))
            .context("starting the receiver")?;
        let listener = receiver
            .listen(TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?)
            .context("listening")?;
        Ok(Self { receiver, listener: Some(listener) })
    }

    /// Where the source connects.
    pub fn connect(&self) -> TcpConnect {
        let addr = self.listener.as_ref().expect("listening until dropped").local_addr();
        TcpConnect { addr, timeout: Duration::from_secs(10) }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.receiver.shutdown();
        if let Some(l) = self.listener.take() {
            l.stop();
        }
    }
}

/// A spool in `dir/spool`, large enough for anything a benchmark appends.
pub fn open_spool(dir: &Path) -> Result<Spool> {
    let d = dir.join("spool");
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    let cfg = SpoolConfig { capacity_bytes: 64 << 30, segment_bytes: 64 << 20, key: None };
    let (spool, _) = Spool::open(Arc::new(FsDir::new(&d)?), cfg, Arc::new(SystemClock))
        .with_context(|| format!("opening the spool in {}", d.display()))?;
    Ok(spool)
}

/// Starts a shipper of `spool` for one volume of `volume_len` bytes towards `target`.
pub fn start_shipper(
    spool: Arc<Mutex<Spool>>,
    volume_len: u64,
    secure: SecureConfig,
    wire: Wire,
    target: &Target,
) -> Result<ShipperHandle> {
    let hello = Hello {
        versions: SUPPORTED_VERSIONS,
        role: Role::Source,
        node: "bench-source".to_owned(),
        pair: PAIR,
        volumes: vec![VolumeInfo { id: VolumeId(0), block_size: 4096, size: volume_len }],
    };
    let mut cfg = ShipperConfig::new(hello, secure);
    cfg.compression = wire.compression;
    cfg.adaptive_compression = wire.adaptive;
    if !wire.dedupe {
        cfg.dedupe_window_bytes = 0;
    }
    Shipper::new(spool, cfg).start(target.connect()).context("starting the shipper")
}

/// Waits until the target acknowledged everything up to `last`.
pub fn wait_acked(shipper: &ShipperHandle, last: Seq) -> Result<ShipperStatus> {
    shipper.notify();
    match shipper.wait_for(PATIENCE, |s| s.acked >= last) {
        Some(s) => Ok(s),
        None => bail!("the target did not acknowledge seq {last} in time: {:?}", shipper.status()),
    }
}

/// Waits until the shipper has a session open with the target.
pub fn wait_connected(shipper: &ShipperHandle) -> Result<()> {
    match shipper.wait_for(PATIENCE, |s| s.state == LinkState::Shipping) {
        Some(_) => Ok(()),
        None => bail!("the shipper did not connect: {:?}", shipper.status()),
    }
}

/// A protected image behind a tap, its spool shipped to a [`Target`].
pub struct Source {
    /// The tap over the image.
    pub tap: Arc<Tap>,
    /// The shipper of the tap's spool.
    pub shipper: Option<ShipperHandle>,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source").field("tap", &self.tap).finish_non_exhaustive()
    }
}

impl Source {
    /// A tap over `image` (spool and write-intent map in `dir`), shipping to `target`.
    pub fn start(
        dir: &Path,
        image: &Path,
        secure: SecureConfig,
        wire: Wire,
        target: &Target,
    ) -> Result<Self> {
        let device = FileIo::open(image).with_context(|| format!("opening {}", image.display()))?;
        let len = device.len().with_context(|| format!("measuring {}", image.display()))?;
        let spool = open_spool(dir)?;
        let map = FsDir::new(dir)?.open("intent.map", true).context("the write-intent map")?;
        let icfg = IntentConfig::default();
        let icfg = IntentConfig {
            max_hot_regions: (len / icfg.region_bytes) as u32 + 1,
            ..IntentConfig::default()
        };
        let (intent, _) = IntentMap::open(map, len, icfg).context("opening the intent map")?;
        let tap = Arc::new(
            Tap::new(Arc::new(device), spool, intent, TapConfig::default())
                .with_context(|| format!("a tap over {}", image.display()))?,
        );
        let shipper = start_shipper(tap.shared_spool(), len, secure, wire, target)?;
        Ok(Self { tap, shipper: Some(shipper) })
    }

    /// The running shipper.
    pub fn shipper(&self) -> &ShipperHandle {
        self.shipper.as_ref().expect("running until dropped")
    }

    /// A resync driver for the tap's volume over the shipper's connection.
    pub fn syncer(&self) -> Syncer {
        Syncer::new(self.tap.clone(), self.shipper().hash_client(), SyncerConfig::new(VolumeId(0)))
    }

    /// Waits until the shipper has a session open with the target.
    pub fn connected(&self) -> Result<()> {
        wait_connected(self.shipper())
    }

    /// Makes the spool durable and waits until the target acknowledged all of it.
    pub fn caught_up(&self) -> Result<ShipperStatus> {
        let last = self.tap.sync_spool().context("syncing the spool")?;
        wait_acked(self.shipper(), last)
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        if let Some(s) = self.shipper.take() {
            s.stop();
        }
    }
}
