//! The source side of replication: the [`Shipper`] reads the spool in sequence order, ships
//! it to the target in `Batch` messages, and trims the spool as the target acknowledges.
//! One shipper is one logical replication session: it survives the loss of its connection
//! by reconnecting with backoff and resuming where the target says.
//!
//! ```text
//!             Arc<Mutex<Spool>>  (the tap appends and syncs; rings the Doorbell)
//!                  |  read_after(last queued)                    ^ ack(upto)
//!                  v                                             |
//!   encoder: build Batch (<= batch_bytes), compress   ack reader: Ack { upto } -> spool.ack,
//!            wait for room in the window                          release the window
//!                  |  bounded channel (queue_depth frames)       ^
//!                  v                                             |
//!   writer:  token bucket, seal and send; Ping when idle ---- TCP / pipe ----> target
//! ```
//!
//! The encoder sends all-zero writes as zero ranges, and the 4 KiB blocks of a write that
//! repeat a block of the connection's recent writes as references ([`crate::dedupe`]); a
//! reference the target cannot resolve ends the connection, and the next one resends those
//! batches as data. The zstd level follows [`crate::compress::AdaptiveCompression`] unless
//! fixed.
//!
//! Memory is bounded: at most `queue_depth` encoded frames wait for the writer, the encoder
//! holds one more, and at most `window_bytes` of frames are sent but unacknowledged (one
//! batch may exceed it when the window is empty, so a large write always moves).
//! Backpressure is explicit: a slow link fills the channel and blocks the encoder; a slow
//! target withholds acks, the window fills and blocks the encoder; either way the spool
//! grows (until it overflows and the tap falls back to dirty-region tracking).
//!
//! Invariants:
//! 1. Events are shipped in sequence order, without gaps: batch `k + 1` starts right after
//!    batch `k` ends, and the first batch of a connection starts right after the target's
//!    `Resume { last_acked }`. An event is never skipped.
//! 2. The spool is trimmed only up to a sequence number the target reported durable (`Ack`
//!    or `Resume`), so an unacknowledged event is never lost on the source.
//! 3. Acknowledged data is never re-sent: a connection starts from the target's resume
//!    point, which is at or above every ack received before.
//! 4. Acks only grow: an `Ack` below the previous one, or above what was sent, is a protocol
//!    violation that ends the connection; a `Resume` below the spool's trimmed point means
//!    the target lost acknowledged data, and stops the shipper ([`ShipError::TargetBehind`]).
//! 5. Errors that a reconnect cannot fix (a refused key or pair, a target ahead of or behind
//!    the spool, a batch the target rejects as out of range) stop the shipper in
//!    [`LinkState::Failed`]; every other error is followed by a reconnect after a backoff.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tidemark_journal::format::MAX_PAYLOAD;
use tidemark_journal::{Event, JournalError, Seq, Spool, SpooledEvent};

use crate::compress::AdaptiveCompression;
use crate::connection::{Connection, ConnectionError};
use crate::dedupe::{self, DedupeStats, DedupeWindow};
use crate::secure::{CloseCode, SecureChannel, SecureConfig, SecureError, Stream};
use crate::shape::TokenBucket;
use crate::watch::Watch;
use crate::wire::{
    Batch, BatchEntry, Codec, Compression, EntryBody, ErrorCode, FLAG_COMPRESSED, FRAME_HEADER_LEN,
    HashReply, HashRequest, Hello, LineageInfo, Message, MessageType, RefuseReason, RepairRequest,
    ReplicaKind, ReplicaState, WireError,
};

/// What went wrong on the source side of replication.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShipError {
    /// The shipper's configuration is unusable.
    #[error("shipper configuration: {field} is {found}, expected {expected}")]
    Config {
        /// The field.
        field: &'static str,
        /// The value found.
        found: String,
        /// What a valid value looks like.
        expected: String,
    },
    /// Connecting to the target failed.
    #[error("connecting to the target failed")]
    Connect {
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// The secure channel failed (handshake, refusal, a tampered or cut stream).
    #[error(transparent)]
    Secure(#[from] SecureError),
    /// Opening the session failed (refused, another protocol version, the target's error).
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    /// A frame could not be encoded, or one from the target could not be decoded.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The spool failed.
    #[error("spool: {op} failed")]
    Spool {
        /// What was being done (`reading events after seq 41`, `trimming up to seq 90`).
        op: String,
        /// The journal's error.
        #[source]
        source: JournalError,
    },
    /// The target resumes after a sequence number this source never assigned.
    #[error(
        "the target holds events up to seq {target} but this source's spool ends at seq {spool_last}: \
         another source's replica, or a source that lost its spool; resync needed"
    )]
    TargetAhead {
        /// The target's resume point.
        target: Seq,
        /// The spool's last sequence number.
        spool_last: Seq,
    },
    /// The target resumes below what it acknowledged before: the spool no longer holds
    /// the events it lacks.
    #[error(
        "the target resumes after seq {target} but it acknowledged up to seq {trimmed} before, \
         and the spool has trimmed those events: the target lost acknowledged data; resync needed"
    )]
    TargetBehind {
        /// The target's resume point.
        target: Seq,
        /// The spool's acknowledged (trimmed) point.
        trimmed: Seq,
    },
    /// The spool offered events that do not follow the last one shipped.
    #[error("spool: expected seq {expected} next, read seq {found}")]
    SpoolGap {
        /// The sequence number due.
        expected: Seq,
        /// The one read.
        found: Seq,
    },
    /// The target acknowledged less than it did before on this connection.
    #[error("the target acknowledged seq {got} after seq {previous}: acks must grow")]
    AckWentBack {
        /// The ack received.
        got: Seq,
        /// The ack before it.
        previous: Seq,
    },
    /// The target acknowledged events that were never sent to it.
    #[error("the target acknowledged seq {got} but only seq {sent} was sent")]
    AckAhead {
        /// The ack received.
        got: Seq,
        /// The last sequence number sent.
        sent: Seq,
    },
    /// The target reported an error and closed the connection.
    #[error("the target reported an error: {code}: {message}")]
    PeerError {
        /// What kind of error.
        code: ErrorCode,
        /// The target's sentence.
        message: String,
    },
    /// A well-formed message the protocol does not allow from a target here.
    #[error("expected Ack, HashReply or Pong from the target, received {found}")]
    UnexpectedMessage {
        /// The message type received.
        found: MessageType,
    },
    /// The target answered a hash request this source did not send (or twice).
    #[error("the target sent a HashReply with id {id}, which no request in flight has")]
    UnexpectedReply {
        /// The reply's id.
        id: u32,
    },
    /// A hash request could not be answered: the connection was lost, the shipper stopped,
    /// or no connection came up in time. The caller retries the comparison.
    #[error("hash request {id} for level {level} of volume {volume}: {why}")]
    HashRequestLost {
        /// The request's id (0 if it was never sent).
        id: u32,
        /// The volume.
        volume: u16,
        /// The tree level.
        level: u8,
        /// What happened.
        why: &'static str,
    },
    /// A `HashReply` that does not answer its request.
    #[error("HashReply {id} carries {found}, expected {expected}")]
    BadReply {
        /// The request id.
        id: u32,
        /// What the reply holds.
        found: String,
        /// What the request asked for.
        expected: String,
    },
    /// The target closed the connection normally although the shipper was not stopping.
    #[error("the target closed the connection")]
    PeerClosed,
    /// A pipeline thread could not be started or panicked.
    #[error("shipper thread {name}: {what}")]
    Thread {
        /// The thread.
        name: &'static str,
        /// What happened to it.
        what: String,
    },
}

impl ShipError {
    /// True when reconnecting cannot help: the shipper stops in [`LinkState::Failed`].
    pub fn is_fatal(&self) -> bool {
        fn secure_fatal(e: &SecureError) -> bool {
            matches!(
                e,
                SecureError::PeerNotAllowed { .. }
                    | SecureError::RefusedByPeer { .. }
                    | SecureError::VersionMismatch { .. }
                    | SecureError::NotTidemark { .. }
                    | SecureError::InvalidConfig { .. }
                    | SecureError::BadKey { .. }
            )
        }
        fn code_fatal(code: ErrorCode) -> bool {
            matches!(
                code,
                ErrorCode::MALFORMED
                    | ErrorCode::UNEXPECTED_MESSAGE
                    | ErrorCode::SEQUENCE_GAP
                    | ErrorCode::OUT_OF_RANGE
            )
        }
        match self {
            Self::Config { .. }
            | Self::Spool { .. }
            | Self::TargetAhead { .. }
            | Self::TargetBehind { .. }
            | Self::SpoolGap { .. }
            | Self::AckWentBack { .. }
            | Self::AckAhead { .. }
            | Self::UnexpectedReply { .. } => true,
            Self::Secure(e) => secure_fatal(e),
            Self::PeerError { code, .. } => code_fatal(*code),
            Self::Connection(e) => match e {
                ConnectionError::Secure(e) => secure_fatal(e),
                ConnectionError::VersionMismatch { .. }
                | ConnectionError::LimitMismatch { .. }
                | ConnectionError::NoLineage { .. } => true,
                ConnectionError::Refused { reason, .. } => {
                    !matches!(*reason, RefuseReason::BUSY | RefuseReason::UNAVAILABLE)
                }
                ConnectionError::PeerError { code, .. } => code_fatal(*code),
                _ => false,
            },
            _ => false,
        }
    }
}

type Result<T, E = ShipError> = std::result::Result<T, E>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every structure behind these locks stays consistent between statements, so a panic
    // elsewhere does not make it unusable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Opens the byte stream to the target, once per connection attempt.
pub trait Connect<S: Stream>: Send {
    /// A fresh stream to the target.
    fn connect(&mut self) -> io::Result<S>;
}

impl<S: Stream, F: FnMut() -> io::Result<S> + Send> Connect<S> for F {
    fn connect(&mut self) -> io::Result<S> {
        self()
    }
}

/// Connects over TCP, with Nagle's algorithm off (an `Ack` must not wait).
#[derive(Debug, Clone)]
pub struct TcpConnect {
    /// The target's address.
    pub addr: SocketAddr,
    /// How long a connection attempt may take.
    pub timeout: Duration,
}

impl Connect<TcpStream> for TcpConnect {
    fn connect(&mut self) -> io::Result<TcpStream> {
        let stream = TcpStream::connect_timeout(&self.addr, self.timeout)?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// Reconnection delays: `initial`, then multiplied by `factor` after each failed attempt,
/// up to `max`. A connection that got as far as shipping resets the sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay.
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
    /// The growth factor (at least 1).
    pub factor: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { initial: Duration::from_millis(100), max: Duration::from_secs(30), factor: 2 }
    }
}

impl Backoff {
    /// The delay before reconnection attempt `attempt` (counted from 0).
    pub fn delay(&self, attempt: u32) -> Duration {
        let mut d = self.initial;
        for _ in 0..attempt {
            d = d.saturating_mul(self.factor.max(1));
            if d >= self.max {
                return self.max;
            }
        }
        d.min(self.max)
    }
}

/// What the encoder saw of the last batch: the input of an adaptive compression policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchStats {
    /// The compression used.
    pub compression: Compression,
    /// Uncompressed body bytes.
    pub raw_bytes: u64,
    /// Frame bytes put in the queue (compressed when that helped).
    pub frame_bytes: u64,
    /// Time spent encoding and compressing.
    pub encode_time: Duration,
    /// The writer's queue was full when the frame was ready: the link (or the bandwidth
    /// limit) is the bottleneck, so spending more CPU on compression would pay.
    pub link_bound: bool,
    /// The spool held more events behind the batch when it was read. Without
    /// `link_bound`, the encoder is the bottleneck, so a lower level would pay.
    pub backlogged: bool,
}

/// Chooses the compression of each batch. The hook for a level that adapts to the link: a
/// link-bound pipeline ([`BatchStats::link_bound`]) wants a higher level, a CPU-bound one
/// a lower level or none.
pub trait CompressionPolicy: Send + fmt::Debug {
    /// The compression for the next batch, knowing how the last one went (`None` for the
    /// first batch of a connection).
    fn next(&mut self, last: Option<&BatchStats>) -> Compression;
}

/// The same compression for every batch.
#[derive(Debug, Clone, Copy)]
pub struct FixedCompression(pub Compression);

impl CompressionPolicy for FixedCompression {
    fn next(&mut self, _: Option<&BatchStats>) -> Compression {
        self.0
    }
}

/// How a shipper runs.
#[derive(Debug, Clone)]
pub struct ShipperConfig {
    /// The opening message: this node, the pair, the volumes.
    pub hello: Hello,
    /// Keys and transport limits.
    pub secure: SecureConfig,
    /// The codec's maximum frame length; at least the journal's largest record plus 64 KiB,
    /// and at most `secure.max_message_len`.
    pub max_frame_len: u32,
    /// Spool bytes read into one batch (the first event always goes, whatever its size).
    pub batch_bytes: u64,
    /// Frame bytes sent and not yet acknowledged before the encoder waits.
    pub window_bytes: u64,
    /// Encoded frames waiting for the writer.
    pub queue_depth: usize,
    /// Compression of batches (until changed with [`ShipperHandle::set_compression`]):
    /// the starting level when `adaptive_compression` is on, `Off` for none.
    pub compression: Compression,
    /// Adapt the zstd level to the link and the CPU ([`AdaptiveCompression`], from
    /// `compression`'s level); off: `compression` for every batch.
    pub adaptive_compression: bool,
    /// Bytes of recent writes of a connection whose 4 KiB blocks are sent as references
    /// when they repeat (see [`crate::dedupe`]); 0 turns dedupe off. Keep it at most the
    /// target's window: a reference the target cannot resolve costs a reconnection, after
    /// which the shipper halves its window.
    pub dedupe_window_bytes: u64,
    /// Send a write whose data is all zeros as a write-zeroes range.
    pub zero_detect: bool,
    /// How often the encoder looks at the spool when nobody rings the doorbell.
    pub poll_interval: Duration,
    /// A `Ping` goes out after this long without a frame, so neither side's I/O timeout
    /// fires on an idle link. Keep it well below `secure.io_timeout`.
    pub keepalive: Duration,
    /// Delays between reconnection attempts.
    pub backoff: Backoff,
    /// On stop, how long to wait for the target's last ack and close.
    pub stop_timeout: Duration,
    /// This source's lineage (`crate::lineage`) and the operator's choices, sent in each
    /// opening exchange; `head` is filled in from the spool's last seq at each connection.
    /// By default a new root generation (a new protection).
    pub lineage: LineageInfo,
}

impl ShipperConfig {
    /// Default batch size (1 MiB).
    pub const DEFAULT_BATCH_BYTES: u64 = 1 << 20;
    /// Default window (64 MiB).
    pub const DEFAULT_WINDOW_BYTES: u64 = 64 << 20;

    /// The defaults for `hello` and `secure`.
    pub fn new(hello: Hello, secure: SecureConfig) -> Self {
        Self {
            hello,
            max_frame_len: secure.max_message_len,
            secure,
            batch_bytes: Self::DEFAULT_BATCH_BYTES,
            window_bytes: Self::DEFAULT_WINDOW_BYTES,
            queue_depth: 4,
            compression: Compression::Zstd { level: 1 },
            adaptive_compression: true,
            dedupe_window_bytes: dedupe::DEFAULT_WINDOW_BYTES,
            zero_detect: true,
            poll_interval: Duration::from_millis(50),
            keepalive: Duration::from_secs(10),
            backoff: Backoff::default(),
            stop_timeout: Duration::from_secs(5),
            lineage: LineageInfo {
                generations: vec![crate::lineage::new_root()],
                ..LineageInfo::default()
            },
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |field, found: String, expected: String| {
            Err(ShipError::Config { field, found, expected })
        };
        let min_frame = MAX_PAYLOAD as u64 + (64 << 10);
        if u64::from(self.max_frame_len) < min_frame {
            return bad(
                "max_frame_len",
                self.max_frame_len.to_string(),
                format!("at least {min_frame} (the largest journal record and a batch header)"),
            );
        }
        if self.max_frame_len > self.secure.max_message_len {
            return bad(
                "max_frame_len",
                self.max_frame_len.to_string(),
                format!("at most secure.max_message_len ({})", self.secure.max_message_len),
            );
        }
        let max_batch = u64::from(self.max_frame_len) / 2;
        if self.batch_bytes == 0 || self.batch_bytes > max_batch {
            return bad("batch_bytes", self.batch_bytes.to_string(), format!("1 to {max_batch}"));
        }
        if self.window_bytes == 0 {
            return bad("window_bytes", "0".to_owned(), "at least 1".to_owned());
        }
        if self.queue_depth == 0 {
            return bad("queue_depth", "0".to_owned(), "at least 1".to_owned());
        }
        if self.poll_interval.is_zero() || self.keepalive.is_zero() {
            return bad("poll_interval or keepalive", "0".to_owned(), "more than zero".to_owned());
        }
        Ok(())
    }
}

/// Where a shipper's connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinkState {
    /// Opening a connection and a session.
    Connecting,
    /// A session is open; events flow as the spool fills.
    Shipping,
    /// The connection was lost (see [`ShipperStatus::last_error`]).
    Disconnected,
    /// Waiting out a backoff delay before the next attempt.
    Reconnecting,
    /// Stopped on request.
    Stopped,
    /// Stopped by an error a reconnect cannot fix (see [`ShipperStatus::last_error`]).
    Failed,
}

/// A snapshot of a shipper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShipperStatus {
    /// Where the connection stands.
    pub state: LinkState,
    /// Connection attempts made.
    pub attempts: u64,
    /// Sessions opened (connections that got as far as `Resume`).
    pub sessions: u64,
    /// The current reconnection attempt (0 while connected).
    pub reconnect_attempt: u32,
    /// The backoff delay in force while reconnecting.
    pub reconnect_delay: Duration,
    /// The target's node name, while connected.
    pub peer: Option<String>,
    /// The last sequence number put on the wire.
    pub last_sent: Seq,
    /// The highest sequence number the target reported durable (only grows).
    pub acked: Seq,
    /// Bytes of unacknowledged events in the spool.
    pub backlog_bytes: u64,
    /// Unacknowledged events in the spool.
    pub backlog_events: u64,
    /// Frame bytes sent and not yet acknowledged on this connection.
    pub in_flight_bytes: u64,
    /// Frame bytes sent (all connections).
    pub wire_bytes: u64,
    /// Uncompressed batch body bytes sent (all connections).
    pub raw_bytes: u64,
    /// Batches sent (all connections).
    pub batches: u64,
    /// Keepalive `Ping`s sent (all connections).
    pub pings: u64,
    /// The compression of the last batch encoded.
    pub compression: Compression,
    /// 4 KiB blocks sent as dedupe references (all connections).
    pub blocks_deduped: u64,
    /// Data bytes not sent thanks to dedupe references, less the references' own bytes.
    pub dedupe_bytes_saved: u64,
    /// Connections the target ended over a reference it could not resolve (the batches
    /// they had queued were resent as data on the next one).
    pub dedupe_resends: u64,
    /// The dedupe window in force (halved after each unresolved reference).
    pub dedupe_window_bytes: u64,
    /// The last error (the reason for the last disconnection, or for the failure).
    pub last_error: Option<String>,
    /// Why the last session that opened ended (kept across failed connection attempts,
    /// which overwrite [`ShipperStatus::last_error`]): for example the target's `Error`
    /// code 7 when it shut down.
    pub last_session_end: Option<String>,
    /// The replica's state as the target reported it when the current (or last) session
    /// opened, with the resync markers of the backlog applied ([`replica_after_backlog`]):
    /// what the replica will be once the events not yet acknowledged reach it. `None`
    /// before the first session.
    pub replica: Option<ReplicaState>,
    /// What the lineages decided when the current (or last) session opened: same
    /// generation, adopted by a blank target, or a resync that overwrites the target's
    /// state (a failback). `None` before the first session.
    pub lineage: Option<crate::lineage::Verdict>,
    /// `HashRequest`s sent (all connections).
    pub hash_requests: u64,
    /// Frame bytes of `HashRequest`s sent (all connections): the source's share of the
    /// hash-exchange overhead of a fast resync or verify.
    pub hash_request_bytes: u64,
    /// Frame bytes of `HashReply`s received (all connections): the target's share.
    pub hash_reply_bytes: u64,
    /// `RepairRequest`s received (all connections): the target's journal lost records.
    pub repair_requests: u64,
    /// The last `RepairRequest` received, for the pair controller to run.
    pub repair_request: Option<RepairRequest>,
}

/// A state transition or progress, as the shipper reports it to its observer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShipperEvent {
    /// A session opened; the target resumes after `resume`.
    Connected {
        /// The target's node name.
        peer: String,
        /// The target's `Resume { last_acked }`.
        resume: Seq,
        /// The replica's state in that `Resume`.
        replica: ReplicaState,
    },
    /// The target acknowledged every event up to `upto`.
    Acked {
        /// The ack.
        upto: Seq,
    },
    /// The connection was lost.
    Disconnected {
        /// Why.
        error: String,
    },
    /// Reconnecting after `delay`.
    Reconnecting {
        /// The attempt number (from 1).
        attempt: u32,
        /// The backoff delay.
        delay: Duration,
    },
    /// Stopped on request.
    Stopped,
    /// Stopped by an error a reconnect cannot fix.
    Failed {
        /// The error.
        error: String,
    },
}

/// A callback that sees every [`ShipperEvent`], on the shipper's threads (keep it short).
pub type Observer = Box<dyn Fn(&ShipperEvent) + Send + Sync>;

/// Wakes the shipper when the spool has new durable events. The tap rings it after each
/// group commit; without it the shipper looks every `poll_interval`.
#[derive(Debug, Clone, Default)]
pub struct Doorbell(Arc<(Mutex<u64>, Condvar)>);

impl Doorbell {
    /// Signals new events.
    pub fn ring(&self) {
        *lock(&self.0.0) += 1;
        self.0.1.notify_all();
    }

    fn generation(&self) -> u64 {
        *lock(&self.0.0)
    }

    /// Waits until rung after `seen`, or `timeout`.
    fn wait(&self, seen: u64, timeout: Duration) {
        let g = lock(&self.0.0);
        if *g == seen {
            let _ = self.0.1.wait_timeout(g, timeout);
        }
    }
}

struct Shared {
    spool: Arc<Mutex<Spool>>,
    cfg: ShipperConfig,
    bucket: Option<Arc<TokenBucket>>,
    doorbell: Doorbell,
    stopping: AtomicBool,
    status: Watch<ShipperStatus>,
    policy: Mutex<Box<dyn CompressionPolicy>>,
    observer: Option<Observer>,
    link: Mutex<Option<Arc<Link>>>,
    /// Batches up to this seq go without dedupe references: the target could not resolve
    /// one of them (see [`Link::fail`]).
    refs_off_through: AtomicU64,
    /// The dedupe window in force.
    dedupe_budget: AtomicU64,
    /// The dedupe window, kept across connections and cut at each to what the target
    /// says it holds (`DedupeHeld`).
    window: Mutex<DedupeWindow>,
    calls: Mutex<HashCalls>,
    calls_changed: Condvar,
    /// The volumes the next `Hello` announces (`cfg.hello`'s until a volume grew).
    volumes: Mutex<Vec<crate::wire::VolumeInfo>>,
}

/// The hash requests in flight, by id, with their replies once they arrive.
#[derive(Default)]
struct HashCalls {
    next_id: u32,
    waiting: std::collections::HashMap<u32, Option<HashReply>>,
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn update(&self, f: impl FnOnce(&mut ShipperStatus)) {
        self.status.update(f);
    }

    fn emit(&self, event: ShipperEvent) {
        if let Some(observer) = &self.observer {
            observer(&event);
        }
    }

    fn backlog(&self, spool: &Spool) {
        let (bytes, events) = (spool.backlog_bytes(), spool.backlog_events() as u64);
        self.update(|s| {
            s.backlog_bytes = bytes;
            s.backlog_events = events;
        });
    }
}

/// The state of one connection, shared by its three pipeline threads.
struct Link {
    state: Mutex<LinkInner>,
    changed: Condvar,
    kill: Box<dyn Fn() + Send + Sync>,
    /// The writer's queue, for frames other than batches (hash requests). Taken away when
    /// the encoder ends, so that the writer sees its queue disconnected then.
    control: Mutex<Option<SyncSender<Outgoing>>>,
}

struct LinkInner {
    error: Option<ShipError>,
    dead: bool,
    /// Batches queued or sent and not yet acknowledged: (last seq, frame bytes).
    in_flight: VecDeque<(Seq, u64)>,
    in_flight_bytes: u64,
    /// The last sequence number handed to the writer.
    queued: Seq,
    /// The last ack (or the resume point).
    acked: Seq,
    /// Pipeline threads that have ended.
    finished: usize,
}

impl Link {
    fn lock(&self) -> MutexGuard<'_, LinkInner> {
        lock(&self.state)
    }

    fn is_dead(&self) -> bool {
        self.lock().dead
    }

    /// Records the first error, shuts the stream down so every thread of the connection
    /// stops, and wakes whatever waits.
    fn fail(&self, error: ShipError, shared: &Shared) {
        let mut l = self.lock();
        let unresolved =
            matches!(&error, ShipError::PeerError { code: ErrorCode::UNKNOWN_REFERENCE, .. });
        if unresolved {
            // Every batch queued on this connection may hold the reference: the next
            // connection resends them as data.
            shared.refs_off_through.fetch_max(l.queued.0, Ordering::SeqCst);
        }
        if l.error.is_none() && !l.dead {
            l.error = Some(error);
        }
        l.dead = true;
        drop(l);
        if unresolved {
            // And with a window half the size, so that it converges to what the target
            // keeps.
            let halved = shared.dedupe_budget.load(Ordering::SeqCst) / 2;
            shared.dedupe_budget.store(halved, Ordering::SeqCst);
            *lock(&shared.window) = DedupeWindow::new(halved);
            shared.update(|s| {
                s.dedupe_resends += 1;
                s.dedupe_window_bytes = halved;
            });
        }
        (self.kill)();
        self.changed.notify_all();
        drop(lock(&shared.calls));
        shared.calls_changed.notify_all();
        shared.doorbell.ring();
        if let Some(b) = &shared.bucket {
            b.wake_all();
        }
    }
}

/// Counts a pipeline thread out when it ends, panicking included (a panic also fails the
/// link, so the others stop).
struct Finished<'a> {
    shared: &'a Shared,
    link: &'a Link,
    name: &'static str,
}

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            let what = "panicked".to_owned();
            self.link.fail(ShipError::Thread { name: self.name, what }, self.shared);
        }
        self.link.lock().finished += 1;
        self.link.changed.notify_all();
    }
}

/// Builds and starts a [`Shipper`].
pub struct Shipper {
    spool: Arc<Mutex<Spool>>,
    cfg: ShipperConfig,
    bucket: Option<Arc<TokenBucket>>,
    policy: Option<Box<dyn CompressionPolicy>>,
    observer: Option<Observer>,
    doorbell: Doorbell,
}

impl fmt::Debug for Shipper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shipper").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

impl Shipper {
    /// A shipper of `spool` (shared with the tap, which appends to it).
    pub fn new(spool: Arc<Mutex<Spool>>, cfg: ShipperConfig) -> Self {
        Self {
            spool,
            cfg,
            bucket: None,
            policy: None,
            observer: None,
            doorbell: Doorbell::default(),
        }
    }

    /// Limits the bytes put on the wire (the bucket may be shared with other shippers).
    pub fn bucket(mut self, bucket: Arc<TokenBucket>) -> Self {
        self.bucket = Some(bucket);
        self
    }

    /// Chooses the compression of each batch (instead of `cfg.compression`).
    pub fn compression_policy(mut self, policy: Box<dyn CompressionPolicy>) -> Self {
        self.policy = Some(policy);
        self
    }

    /// Sees every state transition and ack.
    pub fn observer(mut self, observer: Observer) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Uses `doorbell` (one the tap already holds) instead of a new one.
    pub fn doorbell(mut self, doorbell: Doorbell) -> Self {
        self.doorbell = doorbell;
        self
    }

    /// Starts shipping: connects with `connector`, and reconnects with it after every loss.
    pub fn start<S, C>(self, connector: C) -> Result<ShipperHandle>
    where
        S: Stream + Send + 'static,
        C: Connect<S> + 'static,
    {
        self.cfg.validate()?;
        let (acked, backlog_bytes, backlog_events) = {
            let spool = lock(&self.spool);
            (spool.acked(), spool.backlog_bytes(), spool.backlog_events() as u64)
        };
        let policy = self.policy.unwrap_or_else(|| match self.cfg.compression {
            Compression::Zstd { level } if self.cfg.adaptive_compression => {
                Box::new(AdaptiveCompression::new(level))
            }
            c => Box::new(FixedCompression(c)),
        });
        let shared = Arc::new(Shared {
            volumes: Mutex::new(self.cfg.hello.volumes.clone()),
            spool: self.spool,
            bucket: self.bucket,
            doorbell: self.doorbell,
            stopping: AtomicBool::new(false),
            status: Watch::new(ShipperStatus {
                state: LinkState::Connecting,
                attempts: 0,
                sessions: 0,
                reconnect_attempt: 0,
                reconnect_delay: Duration::ZERO,
                peer: None,
                last_sent: acked,
                acked,
                backlog_bytes,
                backlog_events,
                in_flight_bytes: 0,
                wire_bytes: 0,
                raw_bytes: 0,
                batches: 0,
                pings: 0,
                compression: self.cfg.compression,
                blocks_deduped: 0,
                dedupe_bytes_saved: 0,
                dedupe_resends: 0,
                dedupe_window_bytes: self.cfg.dedupe_window_bytes,
                last_error: None,
                last_session_end: None,
                replica: None,
                lineage: None,
                hash_requests: 0,
                hash_request_bytes: 0,
                hash_reply_bytes: 0,
                repair_requests: 0,
                repair_request: None,
            }),
            policy: Mutex::new(policy),
            observer: self.observer,
            link: Mutex::new(None),
            calls: Mutex::new(HashCalls::default()),
            calls_changed: Condvar::new(),
            refs_off_through: AtomicU64::new(0),
            dedupe_budget: AtomicU64::new(self.cfg.dedupe_window_bytes),
            window: Mutex::new(DedupeWindow::new(self.cfg.dedupe_window_bytes)),
            cfg: self.cfg,
        });
        let s = shared.clone();
        let supervisor = thread::Builder::new()
            .name("tidemark-ship".to_owned())
            .spawn(move || supervise(&s, connector))
            .map_err(|e| ShipError::Thread { name: "supervisor", what: e.to_string() })?;
        Ok(ShipperHandle { shared, supervisor: Some(supervisor) })
    }
}

/// A running shipper: status, run-time controls, stop. Dropping it stops the shipper.
pub struct ShipperHandle {
    shared: Arc<Shared>,
    supervisor: Option<JoinHandle<()>>,
}

impl fmt::Debug for ShipperHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShipperHandle").field("status", &self.status()).finish_non_exhaustive()
    }
}

impl ShipperHandle {
    /// A snapshot of the shipper's state.
    pub fn status(&self) -> ShipperStatus {
        self.shared.status.get()
    }

    /// Waits until `pred` holds for the status, or `timeout` passes; returns the status
    /// that satisfied it, or `None` on timeout.
    pub fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&ShipperStatus) -> bool,
    ) -> Option<ShipperStatus> {
        self.shared.status.wait_for(timeout, pred)
    }

    /// The volumes announced from the next connection on (a volume grew: its resize is in
    /// the spool, and the target admits a source larger than its replica).
    pub fn set_volumes(&self, volumes: Vec<crate::wire::VolumeInfo>) {
        *lock(&self.shared.volumes) = volumes;
    }

    /// Tells the shipper the spool has new durable events.
    pub fn notify(&self) {
        self.shared.doorbell.ring();
    }

    /// The doorbell, for the tap to ring after each group commit.
    pub fn doorbell(&self) -> Doorbell {
        self.shared.doorbell.clone()
    }

    /// A client for the target's Merkle tree hashes (fast resync, verify), carried on this
    /// shipper's connection alongside the batches.
    pub fn hash_client(&self) -> HashClient {
        HashClient { shared: self.shared.clone() }
    }

    /// Uses `compression` for every batch from the next one on.
    pub fn set_compression(&self, compression: Compression) {
        *lock(&self.shared.policy) = Box::new(FixedCompression(compression));
    }

    /// Replaces the compression policy from the next batch on.
    pub fn set_compression_policy(&self, policy: Box<dyn CompressionPolicy>) {
        *lock(&self.shared.policy) = policy;
    }

    /// Stops shipping: no new batch is sent; the connection is closed normally and the
    /// target's last ack awaited (up to `stop_timeout`). Unacknowledged events stay in the
    /// spool for the next shipper. Returns the final status.
    pub fn stop(mut self) -> ShipperStatus {
        self.stop_inner();
        self.status()
    }

    fn stop_inner(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.update(|_| {});
        self.shared.doorbell.ring();
        if let Some(link) = lock(&self.shared.link).clone() {
            let _l = link.lock();
            link.changed.notify_all();
        }
        if let Some(b) = &self.shared.bucket {
            b.wake_all();
        }
        if let Some(t) = self.supervisor.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ShipperHandle {
    fn drop(&mut self) {
        if self.supervisor.is_some() {
            self.stop_inner();
        }
    }
}

/// The supervisor: one connection after another until stopped or failed.
fn supervise<S: Stream + Send + 'static, C: Connect<S>>(shared: &Arc<Shared>, mut connector: C) {
    let mut attempt: u32 = 0;
    loop {
        if shared.stopping() {
            break;
        }
        shared.update(|s| {
            s.state = LinkState::Connecting;
            s.attempts += 1;
        });
        let mut shipped = false;
        let outcome = run_connection(shared, &mut connector, &mut shipped);
        let ended = match &outcome {
            Ok(()) => "closed normally".to_owned(),
            Err(e) => error_chain(e),
        };
        shared.update(|s| {
            s.peer = None;
            s.in_flight_bytes = 0;
            if shipped {
                s.last_session_end = Some(ended);
            }
        });
        if shipped {
            attempt = 0;
        }
        match outcome {
            Ok(()) => break,
            Err(_) if shared.stopping() => break,
            Err(e) => {
                let text = error_chain(&e);
                let fatal = e.is_fatal();
                shared.update(|s| {
                    s.state = if fatal { LinkState::Failed } else { LinkState::Disconnected };
                    s.last_error = Some(text.clone());
                });
                shared.emit(ShipperEvent::Disconnected { error: text.clone() });
                if fatal {
                    shared.emit(ShipperEvent::Failed { error: text });
                    return;
                }
            }
        }
        let delay = shared.cfg.backoff.delay(attempt);
        attempt = attempt.saturating_add(1);
        shared.update(|s| {
            s.state = LinkState::Reconnecting;
            s.reconnect_attempt = attempt;
            s.reconnect_delay = delay;
        });
        shared.emit(ShipperEvent::Reconnecting { attempt, delay });
        // The backoff delay, cut short by a stop (which updates the status).
        shared.status.wait_for(delay, |_| shared.stopping());
    }
    shared.update(|s| {
        s.state = LinkState::Stopped;
        s.reconnect_attempt = 0;
    });
    shared.emit(ShipperEvent::Stopped);
}

/// The error and its sources, one sentence each, as the top level prints them.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// One connection: open the session, reconcile with the spool, run the pipeline until the
/// connection fails or the shipper stops. `Ok` only when stopped.
fn run_connection<S: Stream + Send + 'static, C: Connect<S>>(
    shared: &Arc<Shared>,
    connector: &mut C,
    shipped: &mut bool,
) -> Result<()> {
    let cfg = &shared.cfg;
    let stream = connector.connect().map_err(|source| ShipError::Connect { source })?;
    let killer = stream.try_clone().map_err(|source| ShipError::Connect { source })?;
    let channel = SecureChannel::initiate(stream, &cfg.secure)?;
    let mut conn = Connection::new(channel, Codec::new(cfg.max_frame_len)?)?;
    let mut lineage = cfg.lineage.clone();
    lineage.head = lock(&shared.spool).last_seq();
    let hello = Hello { volumes: lock(&shared.volumes).clone(), ..cfg.hello.clone() };
    let session = conn.open_session(&hello, &lineage)?;
    if let crate::lineage::Verdict::Resync { why } = &session.verdict {
        tracing::warn!(%why, "lineage: the target takes this source's history; whole-volume resync");
    }
    let resume = session.last_acked;
    // The writes both windows still hold: from the target's oldest to the resume point
    // (later ones may never have arrived). References to them stay valid on this
    // connection.
    let held = conn.recv_dedupe_held()?;
    lock(&shared.window).keep_range(held, resume);
    let (tx, rx) = mpsc::sync_channel::<Outgoing>(cfg.queue_depth);
    let markers = match reconcile(shared, resume) {
        Ok(markers) => markers,
        Err(e) => {
            // Tell the target why this source hangs up (it reports the close reason).
            let (mut channel, _) = conn.into_parts();
            let _ = channel.close_with(CloseCode::PROTOCOL_VIOLATION, &error_chain(&e));
            return Err(e);
        }
    };
    let replica = replica_after_backlog(&session.replica, &markers);
    let link = Arc::new(Link {
        state: Mutex::new(LinkInner {
            error: None,
            dead: false,
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
            queued: resume,
            acked: resume,
            finished: 0,
        }),
        changed: Condvar::new(),
        kill: {
            // In a mutex: the stream need not be `Sync` for the link to be shared.
            let killer = Mutex::new(killer);
            Box::new(move || {
                let _ = lock(&killer).shutdown(Shutdown::Both);
            })
        },
        control: Mutex::new(Some(tx.clone())),
    });
    *lock(&shared.link) = Some(link.clone());
    if shared.stopping() {
        (link.kill)();
        *lock(&shared.link) = None;
        return Ok(());
    }
    *shipped = true;
    shared.update(|s| {
        s.state = LinkState::Shipping;
        s.sessions += 1;
        s.reconnect_attempt = 0;
        s.peer = Some(session.peer_node.clone());
        s.replica = Some(replica.clone());
        s.lineage = Some(session.verdict.clone());
        s.acked = s.acked.max(resume);
        s.last_sent = resume;
    });
    shared.emit(ShipperEvent::Connected { peer: session.peer_node.clone(), resume, replica });

    let (channel, codec) = conn.into_parts();
    let (rx_half, tx_half) = channel.split()?;

    let spawn = |name: &'static str, f: Box<dyn FnOnce() -> Result<()> + Send>| {
        let (shared, link) = (shared.clone(), link.clone());
        thread::Builder::new().name(format!("tidemark-ship-{name}")).spawn(move || {
            let _finished = Finished { shared: &shared, link: &link, name };
            if let Err(e) = f() {
                link.fail(e, &shared);
            }
        })
    };
    let threads = [
        spawn("encode", {
            let (shared, link) = (shared.clone(), link.clone());
            Box::new(move || {
                let result = run_encoder(&shared, &link, codec, tx, resume);
                lock(&link.control).take();
                result
            })
        }),
        spawn("write", {
            let (shared, link) = (shared.clone(), link.clone());
            Box::new(move || run_writer(&shared, &link, tx_half, rx))
        }),
        spawn("acks", {
            let (shared, link) = (shared.clone(), link.clone());
            Box::new(move || run_ack_reader(&shared, &link, rx_half))
        }),
    ];
    let mut handles = Vec::new();
    for (t, name) in threads.into_iter().zip(["encode", "write", "acks"]) {
        match t {
            Ok(h) => handles.push(h),
            Err(e) => link.fail(ShipError::Thread { name, what: e.to_string() }, shared),
        }
    }
    // The threads end by themselves once the link dies. On a stop they get `stop_timeout`
    // to finish (the ack reader waits for the target's last ack and close); then the
    // stream is shut down under them.
    {
        let mut deadline = None;
        let mut l = link.lock();
        while l.finished < handles.len() {
            if shared.stopping() {
                let until = *deadline.get_or_insert_with(|| Instant::now() + cfg.stop_timeout);
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                l = link.changed.wait_timeout(l, left).unwrap_or_else(|e| e.into_inner()).0;
            } else {
                l = link.changed.wait(l).unwrap_or_else(|e| e.into_inner());
            }
        }
    }
    (link.kill)();
    if let Some(b) = &shared.bucket {
        b.wake_all();
    }
    for h in handles {
        let _ = h.join();
    }
    *lock(&shared.link) = None;
    let error = link.lock().error.take();
    match error {
        Some(e) => Err(e),
        None if shared.stopping() => Ok(()),
        None => Err(ShipError::PeerClosed),
    }
}

/// Checks the target's resume point against the spool and trims up to it; returns the
/// resync markers of the backlog after it (for [`replica_after_backlog`]).
fn reconcile(shared: &Shared, resume: Seq) -> Result<Vec<(Seq, Event)>> {
    let mut spool = lock(&shared.spool);
    check_resume(resume, spool.last_seq(), spool.acked())?;
    spool.ack(resume).map_err(|source| ShipError::Spool {
        op: format!("trimming up to seq {resume} (the target's resume point)"),
        source,
    })?;
    shared.backlog(&spool);
    spool.markers_after(resume).map_err(|source| ShipError::Spool {
        op: format!("reading the resync markers after seq {resume}"),
        source,
    })
}

/// The replica's state once the backlog reaches it: the target's `Resume` state with the
/// resync markers (`ResyncBegin` / `ResyncEnd`, in stream order, as
/// [`Spool::markers_after`] gives them) of the events it has not acknowledged applied.
///
/// Without this, a controller deciding on the `Resume` alone closes a window again whose
/// `ResyncEnd` is still in the backlog (the target then refuses the second end and stops),
/// and never closes a window whose `ResyncBegin` is (after a source restart). A blank
/// replica becomes consistent when the backlog closes its last open window (the initial
/// sync completed); the open ids stay capped at [`crate::wire::MAX_OPEN_RESYNCS`]. Pure, so
/// that the deterministic simulation (`tests/src/sim`) decides on the same state.
pub fn replica_after_backlog(replica: &ReplicaState, markers: &[(Seq, Event)]) -> ReplicaState {
    let mut open = replica.open_resyncs.clone();
    // Blank until a `ResyncEnd` closes the last open window: the initial sync completed.
    let mut blank = replica.kind == ReplicaKind::Blank;
    for (_, event) in markers {
        match event {
            Event::ResyncBegin { id } if !open.contains(id) => open.push(*id),
            Event::ResyncEnd { id } => {
                let before = open.len();
                open.retain(|o| o != id);
                if before > 0 && open.is_empty() {
                    blank = false;
                }
            }
            _ => {}
        }
    }
    open.truncate(crate::wire::MAX_OPEN_RESYNCS);
    let kind = if blank {
        ReplicaKind::Blank
    } else if open.is_empty() {
        ReplicaKind::Consistent
    } else {
        ReplicaKind::Inconsistent
    };
    ReplicaState { kind, open_resyncs: open }
}

/// The shipper's resume reconciliation (invariants 2 to 4): a target's `Resume {
/// last_acked: resume }` is usable only between what the spool already trimmed
/// (`spool_acked`, acknowledged before) and the last sequence number it assigned
/// (`spool_last`). Above it is [`ShipError::TargetAhead`], below it
/// [`ShipError::TargetBehind`] (the target lost acknowledged data). Pure, so that the
/// deterministic simulation (`tests/src/sim`) reconciles by the same rule.
pub fn check_resume(resume: Seq, spool_last: Seq, spool_acked: Seq) -> Result<()> {
    if resume > spool_last {
        return Err(ShipError::TargetAhead { target: resume, spool_last });
    }
    if resume < spool_acked {
        return Err(ShipError::TargetBehind { target: resume, trimmed: spool_acked });
    }
    Ok(())
}

/// The shipper's check of an `Ack { upto }` (invariant 4) against the last ack (or resume
/// point) of the connection, `acked`, and the last sequence number queued to it, `queued`:
/// `Ok(true)` when it moves the acknowledged point, `Ok(false)` for a repeat, and
/// [`ShipError::AckWentBack`] or [`ShipError::AckAhead`] for a protocol violation. Pure, as
/// [`check_resume`].
pub fn check_ack(upto: Seq, acked: Seq, queued: Seq) -> Result<bool> {
    if upto < acked {
        return Err(ShipError::AckWentBack { got: upto, previous: acked });
    }
    if upto > queued {
        return Err(ShipError::AckAhead { got: upto, sent: queued });
    }
    Ok(upto > acked)
}

/// A frame for the writer: a batch (with its last sequence number and uncompressed body
/// length) or a hash request (`last_seq` is `None`).
struct Outgoing {
    frame: Vec<u8>,
    last_seq: Option<Seq>,
    raw_bytes: u64,
    deduped: DedupeStats,
}

/// The encoder: spool -> batches -> frames, in order, within the window.
fn run_encoder(
    shared: &Shared,
    link: &Link,
    mut codec: Codec,
    tx: SyncSender<Outgoing>,
    resume: Seq,
) -> Result<()> {
    let cfg = &shared.cfg;
    let mut after = resume;
    let mut last_stats: Option<BatchStats> = None;
    loop {
        if shared.stopping() || link.is_dead() {
            return Ok(());
        }
        let seen = shared.doorbell.generation();
        let (events, spool_last) = {
            let spool = lock(&shared.spool);
            let events = spool.read_after(after, cfg.batch_bytes).map_err(|source| {
                ShipError::Spool { op: format!("reading events after seq {after}"), source }
            })?;
            shared.backlog(&spool);
            (events, spool.last_seq())
        };
        if events.is_empty() {
            shared.doorbell.wait(seen, cfg.poll_interval);
            continue;
        }
        let refs_off_through = Seq(shared.refs_off_through.load(Ordering::SeqCst));
        let (batch, deduped) = build_batch(
            after,
            events,
            cfg.zero_detect,
            &mut lock(&shared.window),
            refs_off_through,
        )?;
        let last_seq = batch.last_seq();
        let backlogged = spool_last > last_seq;
        let compression = lock(&shared.policy).next(last_stats.as_ref());
        codec.set_compression(compression);
        let started = Instant::now();
        let mut frame = Vec::new();
        codec.encode(&Message::Batch(batch), &mut frame)?;
        let encode_time = started.elapsed();
        let raw_bytes = if frame[7] & FLAG_COMPRESSED != 0 {
            u64::from(u32::from_le_bytes(frame[12..16].try_into().expect("4 bytes")))
        } else {
            (frame.len() - FRAME_HEADER_LEN) as u64
        };
        let frame_bytes = frame.len() as u64;
        // Wait for room in the window (an empty window takes any one batch).
        {
            let mut l = link.lock();
            while !l.dead
                && !shared.stopping()
                && l.in_flight_bytes > 0
                && l.in_flight_bytes + frame_bytes > cfg.window_bytes
            {
                l = link.changed.wait(l).unwrap_or_else(|e| e.into_inner());
            }
            if l.dead || shared.stopping() {
                return Ok(());
            }
            l.in_flight.push_back((last_seq, frame_bytes));
            l.in_flight_bytes += frame_bytes;
            l.queued = last_seq;
            let in_flight = l.in_flight_bytes;
            drop(l);
            shared.update(|s| s.in_flight_bytes = in_flight);
        }
        shared.update(|s| s.compression = compression);
        let out = Outgoing { frame, last_seq: Some(last_seq), raw_bytes, deduped };
        let link_bound = match tx.try_send(out) {
            Ok(()) => false,
            Err(TrySendError::Full(out)) => {
                if tx.send(out).is_err() {
                    return Ok(());
                }
                true
            }
            Err(TrySendError::Disconnected(_)) => return Ok(()),
        };
        last_stats = Some(BatchStats {
            compression,
            raw_bytes,
            frame_bytes,
            encode_time,
            link_bound,
            backlogged,
        });
        after = last_seq;
    }
}

/// Consecutive spooled events after `after` as one batch: all-zero writes as zero ranges
/// (with `zero_detect`), and repeated 4 KiB blocks as references to the window's writes,
/// except for the events up to `refs_off_through` (a batch the target could not resolve,
/// resent as data).
pub fn build_batch(
    after: Seq,
    events: Vec<SpooledEvent>,
    zero_detect: bool,
    window: &mut DedupeWindow,
    refs_off_through: Seq,
) -> Result<(Batch, DedupeStats)> {
    let first_seq = after.next();
    let mut entries = Vec::with_capacity(events.len());
    let mut stats = DedupeStats::default();
    for (i, e) in events.into_iter().enumerate() {
        let expected = Seq(first_seq.0 + i as u64);
        if e.seq != expected {
            return Err(ShipError::SpoolGap { expected, found: e.seq });
        }
        let event = match e.event {
            Event::Write { volume, offset, data } if zero_detect && is_zero(&data) => {
                // A write's data fits the journal's largest payload, well under 4 GiB.
                Event::WriteZeroes { volume, offset, len: data.len() as u32 }
            }
            other => other,
        };
        let body = match event {
            Event::Write { volume, offset, data } => {
                let (body, s) =
                    window.encode_write(e.seq, volume, offset, data, e.seq > refs_off_through);
                stats.add(s);
                body
            }
            other => EntryBody::Event(other),
        };
        entries.push(BatchEntry { time: e.time, body });
    }
    Ok((Batch { first_seq, entries }, stats))
}

fn is_zero(data: &[u8]) -> bool {
    // Eight bytes at a time: this runs over every byte shipped.
    let mut words = data.chunks_exact(8);
    words.by_ref().all(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

/// The writer: frames -> token bucket -> secure channel; pings when idle.
fn run_writer<S: Stream>(
    shared: &Shared,
    link: &Link,
    mut tx_half: crate::secure::SecureSender<S>,
    rx: mpsc::Receiver<Outgoing>,
) -> Result<()> {
    let cfg = &shared.cfg;
    let mut codec = Codec::new(cfg.max_frame_len)?;
    let mut ping = Vec::new();
    let mut nonce = 0u64;
    let cancelled = || shared.stopping() || link.is_dead();
    loop {
        match rx.recv_timeout(cfg.keepalive) {
            Ok(out) => {
                if let Some(bucket) = &shared.bucket {
                    if !bucket.take(out.frame.len() as u64, &cancelled) {
                        break;
                    }
                }
                if cancelled() {
                    break;
                }
                // Counted before the send: the target may acknowledge the frame before
                // `send` returns here, and whoever sees the ack must see its bytes counted
                // too. A send that fails takes them back (the frame goes again later).
                let len = out.frame.len() as u64;
                let count = |s: &mut ShipperStatus, sign: i64| {
                    let add = |v: &mut u64, d: u64| {
                        *v = if sign > 0 { *v + d } else { v.saturating_sub(d) };
                    };
                    add(&mut s.wire_bytes, len);
                    match out.last_seq {
                        Some(last_seq) => {
                            if sign > 0 {
                                // Reset to the resume point at the next connection.
                                s.last_sent = last_seq;
                            }
                            add(&mut s.raw_bytes, out.raw_bytes);
                            add(&mut s.blocks_deduped, out.deduped.blocks_deduped);
                            add(&mut s.dedupe_bytes_saved, out.deduped.bytes_saved);
                            add(&mut s.batches, 1);
                        }
                        None => {
                            add(&mut s.hash_requests, 1);
                            add(&mut s.hash_request_bytes, len);
                        }
                    }
                };
                shared.update(|s| count(s, 1));
                if let Err(e) = tx_half.send(&out.frame) {
                    shared.update(|s| count(s, -1));
                    return Err(e.into());
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                if cancelled() {
                    break;
                }
                nonce += 1;
                ping.clear();
                codec.encode(&Message::Ping { nonce }, &mut ping)?;
                tx_half.send(&ping)?;
                shared.update(|s| s.pings += 1);
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    if shared.stopping() && !link.is_dead() {
        // Best effort: the target then syncs, sends its last ack and closes.
        let _ = tx_half.close_with(CloseCode::NORMAL, "");
    }
    Ok(())
}

/// The ack reader: `Ack` -> window and spool trim; `Error` -> the connection ends.
fn run_ack_reader<S: Stream>(
    shared: &Shared,
    link: &Link,
    mut rx_half: crate::secure::SecureReceiver<S>,
) -> Result<()> {
    let mut codec = Codec::new(shared.cfg.max_frame_len)?;
    let mut buf = Vec::new();
    loop {
        let more = match rx_half.recv_into(&mut buf) {
            Ok(more) => more,
            // An error caused by this side shutting the stream down is not news.
            Err(_) if link.is_dead() || shared.stopping() => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if !more {
            return if shared.stopping() { Ok(()) } else { Err(ShipError::PeerClosed) };
        }
        let frame_len = buf.len() as u64;
        match codec.decode(Bytes::from(std::mem::take(&mut buf)))? {
            Message::Ack { upto } => on_ack(shared, link, upto)?,
            Message::HashReply(reply) => on_hash_reply(shared, reply, frame_len)?,
            Message::RepairRequest(request) => on_repair_request(shared, request),
            Message::Pong { .. } | Message::Ping { .. } => {}
            Message::Error { code, message } => return Err(ShipError::PeerError { code, message }),
            other => return Err(ShipError::UnexpectedMessage { found: other.message_type() }),
        }
    }
}

/// The target lost journal records: the request waits in the status for the pair
/// controller ([`crate::pair`]), which resyncs its ranges.
fn on_repair_request(shared: &Shared, request: RepairRequest) {
    tracing::warn!(ids = ?request.ids, ranges = request.ranges.len(),
        "the target asks for a repair of its journal: resending the ranges it lost");
    shared.update(|s| {
        s.repair_requests += 1;
        s.repair_request = Some(request);
    });
}

fn on_hash_reply(shared: &Shared, reply: HashReply, frame_len: u64) -> Result<()> {
    let mut calls = lock(&shared.calls);
    match calls.waiting.get_mut(&reply.id) {
        Some(slot @ None) => *slot = Some(reply),
        _ => return Err(ShipError::UnexpectedReply { id: reply.id }),
    }
    drop(calls);
    shared.calls_changed.notify_all();
    shared.update(|s| s.hash_reply_bytes += frame_len);
    Ok(())
}

fn on_ack(shared: &Shared, link: &Link, upto: Seq) -> Result<()> {
    let mut l = link.lock();
    if !check_ack(upto, l.acked, l.queued)? {
        return Ok(());
    }
    while l.in_flight.front().is_some_and(|&(seq, _)| seq <= upto) {
        let (_, bytes) = l.in_flight.pop_front().expect("checked");
        l.in_flight_bytes -= bytes;
    }
    l.acked = upto;
    let in_flight = l.in_flight_bytes;
    drop(l);
    link.changed.notify_all();
    {
        let mut spool = lock(&shared.spool);
        spool.ack(upto).map_err(|source| ShipError::Spool {
            op: format!("trimming up to seq {upto}"),
            source,
        })?;
        shared.backlog(&spool);
    }
    shared.update(|s| {
        s.acked = s.acked.max(upto);
        s.in_flight_bytes = in_flight;
    });
    shared.emit(ShipperEvent::Acked { upto });
    Ok(())
}

/// Asks the target for Merkle tree hashes over the shipper's connection (see
/// [`ShipperHandle::hash_client`]). Requests wait for a connection; a request whose
/// connection is lost fails with [`ShipError::HashRequestLost`] and is not retried here
/// (the comparison restarts, since the target's tree may be from another session).
#[derive(Clone)]
pub struct HashClient {
    shared: Arc<Shared>,
}

impl fmt::Debug for HashClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HashClient").finish_non_exhaustive()
    }
}

impl HashClient {
    /// A snapshot of the shipper's state.
    pub fn status(&self) -> ShipperStatus {
        self.shared.status.get()
    }

    /// As [`ShipperHandle::wait_for`].
    pub fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&ShipperStatus) -> bool,
    ) -> Option<ShipperStatus> {
        self.shared.status.wait_for(timeout, pred)
    }

    /// Tells the shipper the spool has new durable events.
    pub fn ring(&self) {
        self.shared.doorbell.ring();
    }

    /// Sends `request` (its `id` is replaced by a fresh one) and waits for the reply, up to
    /// `timeout` in all (connecting included). The reply is checked to answer the request:
    /// same volume and level, one hash per node asked.
    pub fn request(&self, mut request: HashRequest, timeout: Duration) -> Result<HashReply> {
        let shared = &self.shared;
        let until = Instant::now() + timeout;
        let lost = |id: u32, why: &'static str, r: &HashRequest| ShipError::HashRequestLost {
            id,
            volume: r.volume.0,
            level: r.level,
            why,
        };
        // A live connection.
        let link = loop {
            if shared.stopping() {
                return Err(lost(0, "the shipper is stopping", &request));
            }
            if let Some(link) = lock(&shared.link).clone() {
                if !link.is_dead() {
                    break link;
                }
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(lost(0, "no connection to the target came up in time", &request));
            }
            shared.status.wait_for(left.min(Duration::from_millis(100)), |s| {
                s.state == LinkState::Shipping || shared.stopping()
            });
        };
        let id = {
            let mut calls = lock(&shared.calls);
            calls.next_id = calls.next_id.wrapping_add(1).max(1);
            let id = calls.next_id;
            calls.waiting.insert(id, None);
            id
        };
        request.id = id;
        let forget = || {
            lock(&shared.calls).waiting.remove(&id);
        };
        let mut frame = Vec::new();
        let encoded = Codec::new(shared.cfg.max_frame_len)
            .and_then(|mut c| c.encode(&Message::HashRequest(request.clone()), &mut frame));
        if let Err(e) = encoded {
            forget();
            return Err(e.into());
        }
        let control = lock(&link.control).clone();
        let sent = control.is_some_and(|c| {
            c.send(Outgoing {
                frame,
                last_seq: None,
                raw_bytes: 0,
                deduped: DedupeStats::default(),
            })
            .is_ok()
        });
        if !sent {
            forget();
            return Err(lost(id, "the connection was lost before it was sent", &request));
        }
        let mut calls = lock(&shared.calls);
        let reply = loop {
            if let Some(Some(_)) = calls.waiting.get(&id) {
                break calls.waiting.remove(&id).flatten().expect("checked");
            }
            if link.is_dead() || shared.stopping() {
                calls.waiting.remove(&id);
                return Err(lost(id, "the connection was lost before the reply", &request));
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                calls.waiting.remove(&id);
                return Err(lost(id, "no reply in time", &request));
            }
            calls =
                shared.calls_changed.wait_timeout(calls, left).unwrap_or_else(|e| e.into_inner()).0;
        };
        drop(calls);
        if reply.volume != request.volume
            || reply.level != request.level
            || reply.hashes.len() as u64 != request.node_count()
        {
            return Err(ShipError::BadReply {
                id,
                found: format!(
                    "volume {}, level {}, {} hashes",
                    reply.volume,
                    reply.level,
                    reply.hashes.len()
                ),
                expected: format!(
                    "volume {}, level {}, {} hashes",
                    request.volume,
                    request.level,
                    request.node_count()
                ),
            });
        }
        Ok(reply)
    }
}
