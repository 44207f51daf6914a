//! Shared pieces of the replication tests: paired keys, a source (spool + a byte model of
//! the volume + a workload generator), a target (retention log over a `MemVolume` in a
//! `MemDir`), and the checks that compare them.

#![allow(dead_code)]

pub mod netns;

use std::io;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use bytes::Bytes;
use tidemark_journal::format::scan_segment;
use tidemark_journal::{
    Bookmark, BookmarkKind, Event, MemDir, MemVolume, RecoveryPoint, RetentionConfig, RetentionLog,
    Seq, Spool, SpoolConfig, SystemClock, VolumeId,
};
use tidemark_sync::apply::{ApplyError, Receiver, ReceiverConfig};
use tidemark_sync::pipe::{PipeEnd, duplex};
use tidemark_sync::secure::{AllowedPeers, Keypair, SecureConfig};
use tidemark_sync::ship::{Backoff, ShipperConfig, ShipperEvent};
use tidemark_sync::wire::{Hello, PairId, Role, SUPPORTED_VERSIONS, VolumeInfo};

/// The replicated volume's size.
pub const VOLUME: u64 = 4 << 20;
/// Its block size.
pub const BLOCK: u64 = 4096;
/// The pair id both sides use.
pub const PAIR: PairId = PairId([7; 16]);
/// How long any wait may take before the test fails (never a synchronisation delay).
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Source and target configurations that allow each other. The I/O timeout is short so a
/// stalled link ends quickly, but it is only a safety net: the tests never rely on it.
pub fn paired() -> (SecureConfig, SecureConfig) {
    let s = Keypair::generate().unwrap();
    let t = Keypair::generate().unwrap();
    let mut cs = SecureConfig::new(s.clone(), AllowedPeers::from_keys([*t.public()]));
    let mut ct = SecureConfig::new(t, AllowedPeers::from_keys([*s.public()]));
    cs.io_timeout = Some(Duration::from_secs(5));
    ct.io_timeout = Some(Duration::from_secs(5));
    (cs, ct)
}

pub fn hello() -> Hello {
    Hello {
        versions: SUPPORTED_VERSIONS,
        role: Role::Source,
        node: "source-1".to_owned(),
        pair: PAIR,
        volumes: vec![VolumeInfo { id: VolumeId(0), block_size: BLOCK as u32, size: VOLUME }],
    }
}

/// The lineage of the hand-written sources of the protocol tests: one root generation.
pub fn lineage() -> tidemark_sync::wire::LineageInfo {
    tidemark_sync::wire::LineageInfo {
        generations: vec![tidemark_sync::wire::Generation {
            id: 0x7e57,
            parent: 0,
            branch_seq: Seq(0),
        }],
        ..Default::default()
    }
}

/// A connection for `Shipper::start`: an in-memory duplex whose far end `receiver` serves
/// on a thread of its own.
pub fn pipe_to(receiver: &Receiver) -> io::Result<PipeEnd> {
    let (a, b) = duplex(1 << 20);
    let r = receiver.clone();
    thread::spawn(move || {
        let _ = r.serve(b);
    });
    Ok(a)
}

/// A shipper configuration for tests: small batches and window (so a workload spans many
/// of them), tiny reconnect delays.
pub fn ship_config(secure: SecureConfig) -> ShipperConfig {
    let mut cfg = ShipperConfig::new(hello(), secure);
    cfg.batch_bytes = 128 << 10;
    cfg.window_bytes = 1 << 20;
    cfg.poll_interval = Duration::from_millis(5);
    cfg.keepalive = Duration::from_millis(500);
    cfg.backoff =
        Backoff { initial: Duration::from_millis(1), max: Duration::from_millis(20), factor: 2 };
    cfg.stop_timeout = Duration::from_secs(5);
    cfg
}

/// A target: a receiver over a retention log in memory.
pub struct Target {
    pub receiver: Receiver,
    pub dir: MemDir,
    pub base: Arc<MemVolume>,
}

impl Target {
    pub fn new(secure: SecureConfig) -> Self {
        let dir = MemDir::new();
        let base = Arc::new(MemVolume::new(VOLUME));
        let (log, _) = RetentionLog::open(
            Arc::new(dir.clone()),
            vec![base.clone()],
            RetentionConfig { segment_bytes: 1 << 20, ..Default::default() },
            Arc::new(SystemClock),
        )
        .unwrap();
        let mut cfg = ReceiverConfig::new("target-1", PAIR, secure);
        cfg.sync_bytes = 256 << 10;
        cfg.linger = Duration::from_secs(2);
        Self { receiver: Receiver::new(log, cfg).unwrap(), dir, base }
    }

    /// Every record's sequence number in the journal's segments, in file order.
    pub fn journal_seqs(&self) -> Vec<u64> {
        let mut seqs = Vec::new();
        for name in self.dir.list_segments() {
            let bytes = self.dir.read_file(&name).unwrap();
            let scan = scan_segment(&bytes, &name).unwrap();
            assert!(scan.defects.is_empty(), "{name}: {:?}", scan.defects);
            seqs.extend(scan.records.iter().map(|r| r.header.seq.0));
        }
        seqs
    }

    /// The replica's latest state equals the source's, byte for byte, and every bookmark
    /// reads back exactly the source's state at that bookmark.
    pub fn check_against(&self, source: &Source) {
        self.receiver.with_log(|log| {
            let latest = log.resolve(&RecoveryPoint::Latest).unwrap();
            assert_eq!(latest.seq, source.last_seq(), "the replica has every event");
            let mut buf = vec![0u8; VOLUME as usize];
            log.read_at(&latest, VolumeId(0), 0, &mut buf).unwrap();
            if let Some(at) = buf.iter().zip(&source.model).position(|(a, b)| a != b) {
                panic!("the replica differs from the source at byte {at}");
            }
            for (name, hash) in &source.bookmarks {
                let p = log.resolve(&RecoveryPoint::Bookmark(name.clone())).unwrap();
                log.read_at(&p, VolumeId(0), 0, &mut buf).unwrap();
                assert_eq!(
                    blake3::hash(&buf),
                    *hash,
                    "bookmark {name} (seq {}) recovers the source's state",
                    p.seq
                );
            }
        });
    }
}

/// A small deterministic generator (SplitMix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

const WORDS: [&str; 12] = [
    "tidemark ",
    "replica ",
    "journal ",
    "barrier ",
    "block ",
    "sequence ",
    "the ",
    "of ",
    "write ",
    "durable ",
    "source ",
    "target ",
];

/// Data of one of several kinds: random (incompressible), text-like, one repeated byte, all
/// zeros.
pub fn data(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    match rng.below(6) {
        0 | 1 => rng.fill(&mut v),
        2 | 3 => {
            let mut at = 0;
            while at < len {
                let w = WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes();
                let n = w.len().min(len - at);
                v[at..at + n].copy_from_slice(&w[..n]);
                at += n;
            }
        }
        4 => v.fill(rng.below(256) as u8),
        _ => {}
    }
    v
}

/// The source: a spool the workload appends to, and a model of the volume it protects.
pub struct Source {
    pub spool: Arc<Mutex<Spool>>,
    pub dir: MemDir,
    pub model: Vec<u8>,
    /// Bookmark name -> BLAKE3 of the volume at that bookmark.
    pub bookmarks: Vec<(String, blake3::Hash)>,
    pub rng: Rng,
}

impl Source {
    pub fn new(seed: u64) -> Self {
        let dir = MemDir::new();
        let (spool, _) = Spool::open(
            Arc::new(dir.clone()),
            SpoolConfig { capacity_bytes: 1 << 30, segment_bytes: 1 << 20, key: None },
            Arc::new(SystemClock),
        )
        .unwrap();
        Self {
            spool: Arc::new(Mutex::new(spool)),
            dir,
            model: vec![0; VOLUME as usize],
            bookmarks: Vec::new(),
            rng: Rng::new(seed),
        }
    }

    pub fn last_seq(&self) -> Seq {
        self.spool.lock().unwrap().last_seq()
    }

    /// One random event, applied to the model.
    pub fn next_event(&mut self) -> Event {
        let r = self.rng.below(100);
        let blocks = VOLUME / BLOCK;
        let volume = VolumeId(0);
        match r {
            0..=54 => {
                let n = 1 + self.rng.below(16);
                let b = self.rng.below(blocks - n + 1);
                let bytes = data(&mut self.rng, (n * BLOCK) as usize);
                let offset = b * BLOCK;
                self.model[offset as usize..(offset + n * BLOCK) as usize].copy_from_slice(&bytes);
                Event::Write { volume, offset, data: Bytes::from(bytes) }
            }
            55..=64 => {
                let len = 1 + self.rng.below(6000);
                let offset = self.rng.below(VOLUME - len + 1);
                let bytes = data(&mut self.rng, len as usize);
                self.model[offset as usize..(offset + len) as usize].copy_from_slice(&bytes);
                Event::Write { volume, offset, data: Bytes::from(bytes) }
            }
            65..=79 => {
                let n = 1 + self.rng.below(64);
                let b = self.rng.below(blocks - n + 1);
                let (offset, len) = (b * BLOCK, n * BLOCK);
                self.model[offset as usize..(offset + len) as usize].fill(0);
                if r <= 72 {
                    Event::WriteZeroes { volume, offset, len: len as u32 }
                } else {
                    Event::Discard { volume, offset, len: len as u32 }
                }
            }
            80..=96 => Event::Barrier,
            _ => {
                let name = format!("bm-{}-{}", self.bookmarks.len(), self.rng.below(1000));
                self.bookmarks.push((name.clone(), blake3::hash(&self.model)));
                Event::Bookmark(Bookmark::new(name, BookmarkKind::User, 0).unwrap())
            }
        }
    }

    /// Appends `count` events, syncing every few and ringing `ring` after each sync.
    pub fn run(&mut self, count: usize, ring: &dyn Fn()) {
        let mut since_sync = 0;
        for _ in 0..count {
            let event = self.next_event();
            let mut spool = self.spool.lock().unwrap();
            spool.append(&event).unwrap();
            since_sync += 1;
            if since_sync > self.rng.below(8) as usize {
                spool.sync().unwrap();
                drop(spool);
                since_sync = 0;
                ring();
            }
        }
        self.spool.lock().unwrap().sync().unwrap();
        ring();
    }
}

/// Records every ack value the source hears (resume points and acks), in order.
pub fn ack_recorder() -> (Arc<Mutex<Vec<u64>>>, tidemark_sync::ship::Observer) {
    let acks = Arc::new(Mutex::new(Vec::new()));
    let a = acks.clone();
    let observer = Box::new(move |e: &ShipperEvent| match e {
        ShipperEvent::Connected { resume, .. } => a.lock().unwrap().push(resume.0),
        ShipperEvent::Acked { upto } => a.lock().unwrap().push(upto.0),
        _ => {}
    });
    (acks, observer)
}

pub fn assert_non_decreasing(values: &[u64]) {
    for w in values.windows(2) {
        assert!(w[0] <= w[1], "acknowledged sequence numbers went back: {} then {}", w[0], w[1]);
    }
}

/// A thread serving one connection.
pub type Server = JoinHandle<Result<(), ApplyError>>;

/// A connector over in-memory pipes: each connection is served by `receiver` on a thread
/// of its own. The ends of every connection are kept for the test to cut.
pub struct PipeNet {
    pub receiver: Receiver,
    /// (source end, target end) of each connection, oldest first.
    pub links: Arc<Mutex<Vec<(PipeEnd, PipeEnd)>>>,
    pub servers: Arc<Mutex<Vec<Server>>>,
}

impl PipeNet {
    pub fn new(receiver: Receiver) -> Self {
        Self { receiver, links: Arc::default(), servers: Arc::default() }
    }

    pub fn connector(&self) -> impl FnMut() -> io::Result<PipeEnd> + Send + 'static {
        let (receiver, links, servers) =
            (self.receiver.clone(), self.links.clone(), self.servers.clone());
        move || {
            let (a, b) = duplex(256 << 10);
            links.lock().unwrap().push((a.clone(), b.clone()));
            let r = receiver.clone();
            servers.lock().unwrap().push(thread::spawn(move || r.serve(b)));
            Ok(a)
        }
    }

    /// The newest connection's ends.
    pub fn newest(&self) -> (PipeEnd, PipeEnd) {
        self.links.lock().unwrap().last().cloned().expect("a connection was made")
    }

    pub fn join_servers(&self) -> Vec<Result<(), ApplyError>> {
        let servers = std::mem::take(&mut *self.servers.lock().unwrap());
        servers.into_iter().map(|h| h.join().unwrap()).collect()
    }
}
