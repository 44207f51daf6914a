//! The target side of replication: the [`Receiver`] accepts a source's connection, tells it
//! where to resume, applies its batches to the [`RetentionLog`] in sequence order with group
//! commit, and acknowledges what is durable.
//!
//! ```text
//!  source ---- TCP / pipe ----> net reader: open records, decode + decompress frames,
//!                                   answer Ping with Pong
//!                                       |  bounded channel (queue_depth batches)
//!                                       v
//!                               applier: check order, RetentionLog::append,
//!                                   group commit (sync) -> Ack { upto: durable } ----> source
//! ```
//!
//! One receiver serves one replication pair and holds its retention log. Connections come
//! and go; the log and the sequence stream continue across them. A new connection from the
//! pair (authenticated, with a valid `Hello`) replaces the live one: the old one is shut
//! down, its applier finishes the batch in hand and stops, and only then is the new one
//! told where to resume.
//!
//! Invariants:
//! 1. **Ack**: the receiver acknowledges seq N only with a value `RetentionLog::sync` returned,
//!    so every event up to N is durable in the retention log when the source hears of it
//!    (data-path invariant 3 in `ARCHITECTURE.md`). `Resume { last_acked }` is the same: it
//!    is the value of a `sync` run after the previous connection's applier stopped, so it
//!    covers everything ever appended. Acks on a connection only grow, starting from its
//!    `Resume`.
//! 2. **Order**: events are appended in sequence order with no gap: a batch must start at
//!    or below `last received + 1`. Entries at or below the last received seq are
//!    duplicates (legal after a reconnect, or from a source whose spool replays acknowledged
//!    events after a crash) and are dropped without being appended again; a batch starting
//!    beyond `last received + 1` is refused (`Error` code 3, sequence gap) and nothing of it
//!    is appended.
//! 3. **Validation before apply**: every new entry of a batch is checked (volume range, size,
//!    kind) and its dedupe references resolved ([`crate::dedupe`]) before the first is
//!    appended, so a refused batch changes nothing. A reference is resolved only from the
//!    write it names, within the dedupe window (kept across connections, `DedupeHeld`), or refused (`Error` code 5).
//! 4. **Barriers**: events keep their source order and barriers and bookmarks are appended
//!    as records in that order, so every recovery point the retention log offers is a
//!    prefix of the source's stream ending at a barrier or bookmark.
//! 5. **One applier**: at most one connection appends at a time; a replaced connection
//!    appends nothing after its replacement was told where to resume.
//! 6. After a storage error the receiver refuses every further session (the journal may
//!    be poisoned) until it is rebuilt over a reopened log.

use std::fmt;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tidemark_journal::format::MAX_PAYLOAD;
use tidemark_journal::{Event, JournalDamage, JournalError, RetentionLog, Seq, VolumeId};

use crate::connection::{Connection, ConnectionError};
use crate::dedupe::{self, AppliedWindow};
use crate::lineage::{self, LineageStore, Verdict};
use crate::resync::{BlockSource, MerkleTree, ResyncError, hash_nodes};
use crate::secure::{CloseCode, SecureChannel, SecureConfig, SecureError, SecureSender, Stream};
use crate::ship::error_chain;
use crate::watch::Watch;
use crate::wire::{
    Batch, Codec, EntryBody, ErrorCode, HashReply, HashRequest, Hello, LineageInfo,
    MAX_OPEN_RESYNCS, MAX_REPAIR_IDS, MAX_REPAIR_RANGES, MAX_TEXT, Message, MessageType, PairId,
    Refuse, RefuseReason, RepairRange, RepairRequest, ReplicaKind, ReplicaState,
    SUPPORTED_VERSIONS, TreeShape, WireError,
};

/// What went wrong on the target side of replication.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// The receiver's configuration is unusable.
    #[error("receiver configuration: {field} is {found}, expected {expected}")]
    Config {
        /// The field.
        field: &'static str,
        /// The value found.
        found: String,
        /// What a valid value looks like.
        expected: String,
    },
    /// An operation on the connection's byte stream failed.
    #[error("{op} failed")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// The secure channel failed (handshake, an unknown key, a tampered or cut stream).
    #[error(transparent)]
    Secure(#[from] SecureError),
    /// Opening the session failed, or this receiver refused it.
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    /// A frame from the source did not decode (the source is told, `Error` code 1).
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A batch does not continue from the last sequence number received.
    #[error(
        "Batch starting at seq {found}: sequence gap, expected a batch starting at or below seq {expected}"
    )]
    SequenceGap {
        /// The next sequence number due.
        expected: Seq,
        /// The batch's first sequence number.
        found: Seq,
    },
    /// A change falls outside its volume (or names a volume the pair does not have).
    #[error(
        "Batch entry seq {seq}: volume {volume} range {offset}+{len} lies outside the volume of {volume_len} bytes"
    )]
    OutOfRange {
        /// The entry's sequence number.
        seq: Seq,
        /// The volume named.
        volume: u16,
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
        /// The volume's size (0 for a volume the pair does not have).
        volume_len: u64,
    },
    /// A resize entry would shrink a volume: refused, nothing of the batch applied (the
    /// pair stays where it is until the source's volume is back to at least the size).
    #[error(
        "Batch entry seq {seq}: volume {volume} resize to {new_size} bytes refused: the replica holds {size} bytes and volumes only grow"
    )]
    Shrink {
        /// The entry's sequence number.
        seq: Seq,
        /// The volume named.
        volume: u16,
        /// The replica's size of it.
        size: u64,
        /// The size the entry asked for.
        new_size: u64,
    },
    /// A dedupe reference this receiver cannot resolve: the write it names left the
    /// connection's dedupe window, or the retention log no longer holds it.
    #[error("Batch entry seq {seq}: unknown dedupe reference ({why}); resend the write as data")]
    UnknownReference {
        /// The entry's sequence number.
        seq: Seq,
        /// Which reference, and what is missing.
        why: String,
    },
    /// A write larger than the journal's largest record.
    #[error(
        "Batch entry seq {seq}: write of {len} bytes exceeds the journal's maximum record of {max} bytes"
    )]
    EventTooLarge {
        /// The entry's sequence number.
        seq: Seq,
        /// The data length.
        len: u64,
        /// The journal's limit.
        max: u64,
    },
    /// A well-formed message the protocol does not allow from a source here.
    #[error("expected Batch or Ping from the source, received {found}")]
    UnexpectedMessage {
        /// The message type received.
        found: MessageType,
    },
    /// The source reported an error.
    #[error("the source reported an error: {code}: {message}")]
    PeerError {
        /// What kind of error.
        code: ErrorCode,
        /// The source's sentence.
        message: String,
    },
    /// A hash request named a volume the pair does not have.
    #[error("hash request {id} names volume {volume}, the pair has {volumes} volume(s)")]
    UnknownVolume {
        /// The request id.
        id: u32,
        /// The volume named.
        volume: u16,
        /// Volumes of the pair.
        volumes: usize,
    },
    /// Hashing the replica to answer a hash request failed.
    #[error("answering hash request {id} failed")]
    Hashing {
        /// The request id.
        id: u32,
        /// The cause.
        #[source]
        source: ResyncError,
    },
    /// The retention log failed; the receiver refuses further sessions.
    #[error("retention log: {op} failed")]
    Storage {
        /// What was being done (`appending seq 17`, `group commit`).
        op: String,
        /// The journal's error.
        #[source]
        source: JournalError,
    },
    /// A newer connection from the pair replaced this one.
    #[error("the connection was replaced by a newer connection from the same pair")]
    Replaced,
    /// The receiver is shutting down ([`Receiver::shutdown`]): what was received before is
    /// durable and acknowledged; the source is sent `Error` code 7 and retries later.
    #[error("the target is shutting down")]
    ShuttingDown,
    /// A pipeline thread could not be started or panicked.
    #[error("receiver thread: {what}")]
    Thread {
        /// What happened.
        what: String,
    },
}

impl ApplyError {
    /// The `Error` code the source is sent before the connection closes, for errors this
    /// side detects in what the source sent or in its own storage.
    pub fn wire_code(&self) -> Option<ErrorCode> {
        Some(match self {
            Self::Wire(_) | Self::EventTooLarge { .. } => ErrorCode::MALFORMED,
            Self::UnexpectedMessage { .. } => ErrorCode::UNEXPECTED_MESSAGE,
            Self::SequenceGap { .. } => ErrorCode::SEQUENCE_GAP,
            Self::OutOfRange { .. } | Self::UnknownVolume { .. } | Self::Shrink { .. } => {
                ErrorCode::OUT_OF_RANGE
            }
            Self::Hashing { .. } => ErrorCode::STORAGE,
            Self::UnknownReference { .. } => ErrorCode::UNKNOWN_REFERENCE,
            Self::Storage { .. } => ErrorCode::STORAGE,
            Self::Thread { .. } => ErrorCode::INTERNAL,
            Self::ShuttingDown => ErrorCode::SHUTDOWN,
            _ => return None,
        })
    }
}

type Result<T, E = ApplyError> = std::result::Result<T, E>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every structure behind these locks stays consistent between statements.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How a receiver runs.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// This node's name, sent in `Welcome`.
    pub node: String,
    /// The replication pair this receiver serves; a `Hello` for another is refused.
    pub pair: PairId,
    /// Keys and transport limits.
    pub secure: SecureConfig,
    /// The codec's maximum frame length (at most `secure.max_message_len`).
    pub max_frame_len: u32,
    /// Group commit once this many event bytes were appended since the last one.
    pub sync_bytes: u64,
    /// Group commit once the oldest unsynced event is this old, even under a steady stream.
    /// (A commit also runs whenever the inbound queue is empty.)
    pub sync_interval: Duration,
    /// Decoded batches waiting for the applier.
    pub queue_depth: usize,
    /// After sending an `Error`, how long to keep reading (and dropping) what the source
    /// still sends, so that the `Error` reaches it before the connection is reset.
    pub linger: Duration,
    /// Bytes of recent writes of a connection that dedupe references may name (see
    /// [`crate::dedupe`]); at least the sources' window, or their references fail and
    /// are resent as data. 0 refuses every reference.
    pub dedupe_window_bytes: u64,
    /// This target's lineage (`crate::lineage`): compared with each source's in the opening
    /// exchange, adopted durably when the source's history replaces it. In memory and empty
    /// (a blank target) by default.
    pub lineage: Arc<LineageStore>,
    /// The operator chose the source as the winner of a lineage conflict (`receive
    /// --discard-local-changes`): a split brain resolves to a whole-volume resync that
    /// overwrites this replica's own writes.
    pub source_wins: bool,
}

impl ReceiverConfig {
    /// The defaults for `node`, `pair` and `secure`.
    pub fn new(node: impl Into<String>, pair: PairId, secure: SecureConfig) -> Self {
        Self {
            node: node.into(),
            pair,
            max_frame_len: secure.max_message_len,
            secure,
            sync_bytes: 8 << 20,
            sync_interval: Duration::from_millis(10),
            queue_depth: 4,
            linger: Duration::from_secs(2),
            dedupe_window_bytes: dedupe::DEFAULT_WINDOW_BYTES,
            lineage: Arc::new(LineageStore::memory()),
            source_wins: false,
        }
    }
}

/// A snapshot of a receiver.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReceiverStatus {
    /// A session is open.
    pub connected: bool,
    /// The source's node name, while connected.
    pub peer: Option<String>,
    /// Sessions opened.
    pub sessions: u64,
    /// Connections replaced by a newer one.
    pub replaced: u64,
    /// Connections cut in their handshake to make room for a newer one (the listener was
    /// full: a flood, or peers that never finish their handshake).
    pub handshakes_evicted: u64,
    /// The last sequence number appended.
    pub received: Seq,
    /// The last sequence number made durable.
    pub durable: Seq,
    /// The last sequence number acknowledged (or sent as a resume point).
    pub acked: Seq,
    /// Batches applied.
    pub batches: u64,
    /// Events appended.
    pub events: u64,
    /// Bytes of write data appended.
    pub data_bytes: u64,
    /// Entries received as dedupe references (whole or partial).
    pub deduped_entries: u64,
    /// Bytes of write data received by reference and read back from the retention log.
    pub deduped_bytes: u64,
    /// Events dropped as duplicates of events already appended.
    pub duplicates: u64,
    /// Group commits.
    pub syncs: u64,
    /// Hash requests answered (fast resync, verify).
    pub hash_requests: u64,
    /// The last error of a connection.
    pub last_error: Option<String>,
    /// Set after a storage failure: no further session is accepted.
    pub failed: Option<String>,
    /// `RepairRequest`s sent (the journal lost records; see [`Receiver::scrub`]).
    pub repair_requests: u64,
}

type Kill = Arc<dyn Fn(Shutdown) + Send + Sync>;

/// How long [`Receiver::shutdown`] waits for the live session to take its stop request
/// (and, after that and the linger, to end) before it cuts the connection.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Connections a [`Listener`] serves at once (handshakes included). One pair needs one,
/// plus one replacing it after a network failure. When full, a new connection cuts the
/// oldest one still in its handshake, so peers that never finish theirs cannot keep the
/// paired source out; when all are authenticated, the new one is closed at accept.
pub const MAX_CONNECTIONS: usize = 16;

struct Slots {
    next_id: u64,
    /// The newest admitted connection and how to shut its stream down.
    active: Option<(u64, Kill)>,
    /// The applying session's inbound queue, through which [`Receiver::shutdown`] asks it
    /// to stop.
    stopper: Option<(u64, SyncSender<Inbound>)>,
    /// The connection whose applier owns the log.
    applying: Option<u64>,
    failed: Option<String>,
    shutting_down: bool,
}

struct Inner {
    cfg: ReceiverConfig,
    log: Mutex<RetentionLog>,
    /// Volumes in the group (their sizes, which grow, are the log's).
    volume_count: usize,
    /// What the appliers changed in the replica since a hasher's tree was built (lock
    /// order: `log`, then this).
    changes: Mutex<Option<Changes>>,
    /// The dedupe window of the writes received (across connections: see
    /// [`crate::dedupe`]); locked by the applier for its session.
    window: Mutex<AppliedWindow>,
    slots: Mutex<Slots>,
    slots_changed: Condvar,
    status: Watch<ReceiverStatus>,
    /// How the live session sends a message (for `RepairRequest`s): its id and a sender.
    repair_out: Mutex<Option<(u64, RepairSender)>>,
    /// Counts the `ResyncBegin`s applied: the hasher's cached tree serves only requests of
    /// the generation it was built in.
    resync_generation: std::sync::atomic::AtomicU64,
}

type RepairSender = Box<dyn Fn(&Message) -> Result<()> + Send + Sync>;

/// The target side of one replication pair (see the module documentation). Cheap to
/// clone: clones share the log and the sessions.
#[derive(Clone)]
pub struct Receiver {
    inner: Arc<Inner>,
}

impl fmt::Debug for Receiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receiver").field("status", &self.status()).finish_non_exhaustive()
    }
}

/// The messages the applier sends back: acks, pongs, the final error.
struct Outbound<S: Stream> {
    tx: SecureSender<S>,
    codec: Codec,
    buf: Vec<u8>,
}

impl<S: Stream> Outbound<S> {
    fn send(&mut self, message: &Message) -> Result<()> {
        self.buf.clear();
        self.codec.encode(message, &mut self.buf)?;
        self.tx.send(&self.buf)?;
        Ok(())
    }
}

enum Inbound {
    Batch(Batch),
    /// The source closed the channel normally.
    Closed,
    Failed(ApplyError),
    /// The receiver is shutting down: commit, acknowledge, tell the source, stop.
    Stop,
}

impl Receiver {
    /// A receiver applying to `log`.
    pub fn new(log: RetentionLog, cfg: ReceiverConfig) -> Result<Self> {
        Codec::new(cfg.max_frame_len)?;
        let bad = |field, found: String, expected: &str| {
            Err(ApplyError::Config { field, found, expected: expected.to_owned() })
        };
        if cfg.max_frame_len > cfg.secure.max_message_len {
            return bad(
                "max_frame_len",
                cfg.max_frame_len.to_string(),
                "at most secure.max_message_len",
            );
        }
        if cfg.sync_bytes == 0 {
            return bad("sync_bytes", "0".to_owned(), "at least 1");
        }
        if cfg.queue_depth == 0 {
            return bad("queue_depth", "0".to_owned(), "at least 1");
        }
        let volume_count = volume_lens_of(&log).len();
        let status = ReceiverStatus {
            received: log.last_seq(),
            durable: log.durable_seq(),
            acked: log.durable_seq(),
            ..Default::default()
        };
        let window = Mutex::new(AppliedWindow::new(cfg.dedupe_window_bytes));
        Ok(Self {
            inner: Arc::new(Inner {
                cfg,
                log: Mutex::new(log),
                volume_count,
                changes: Mutex::new(None),
                window,
                slots: Mutex::new(Slots {
                    next_id: 1,
                    active: None,
                    stopper: None,
                    applying: None,
                    failed: None,
                    shutting_down: false,
                }),
                slots_changed: Condvar::new(),
                status: Watch::new(status),
                repair_out: Mutex::new(None),
                resync_generation: std::sync::atomic::AtomicU64::new(0),
            }),
        })
    }

    /// A snapshot of the receiver's state.
    pub fn status(&self) -> ReceiverStatus {
        self.inner.status.get()
    }

    /// Waits until `pred` holds for the status, or `timeout` passes; returns the status
    /// that satisfied it, or `None` on timeout.
    pub fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&ReceiverStatus) -> bool,
    ) -> Option<ReceiverStatus> {
        self.inner.status.wait_for(timeout, pred)
    }

    fn update(&self, f: impl FnOnce(&mut ReceiverStatus)) {
        self.inner.status.update(f);
    }

    /// Runs `f` on the retention log (point-in-time reads, retention passes). Appends wait
    /// meanwhile.
    pub fn with_log<R>(&self, f: impl FnOnce(&mut RetentionLog) -> R) -> R {
        f(&mut lock(&self.inner.log))
    }

    /// The retention log back, once every clone of the receiver and every session is gone.
    pub fn into_log(self) -> Result<RetentionLog, Self> {
        match Arc::try_unwrap(self.inner) {
            Ok(inner) => Ok(inner.log.into_inner().unwrap_or_else(|e| e.into_inner())),
            Err(inner) => Err(Self { inner }),
        }
    }

    /// Ends the live session and refuses new ones; returns once no applier runs.
    ///
    /// The live session stops cleanly: its applier appends the batches it had already
    /// decoded, makes them durable and acknowledges them, sends the source `Error` code 7
    /// (shutting down) and closes the channel with close code 3, then lingers as after any
    /// error (at most [`ReceiverConfig::linger`]). A session that does not stop within
    /// [`SHUTDOWN_GRACE`] plus the linger (a source that stopped reading) is cut.
    /// Connections still in their handshake are refused `Refuse` reason 6 (unavailable).
    pub fn shutdown(&self) {
        let (stopper, kill) = {
            let mut s = lock(&self.inner.slots);
            s.shutting_down = true;
            (s.stopper.clone(), s.active.as_ref().map(|(_, k)| k.clone()))
        };
        let asked = stopper.is_some_and(|(_, tx)| {
            // The queue may be full while the applier works through it: retry until it
            // takes the request, it ended, or the grace period is over.
            let until = Instant::now() + SHUTDOWN_GRACE;
            loop {
                match tx.try_send(Inbound::Stop) {
                    Ok(()) => return true,
                    Err(mpsc::TrySendError::Disconnected(_)) => return false,
                    Err(mpsc::TrySendError::Full(_)) if Instant::now() < until => {
                        thread::sleep(Duration::from_millis(2));
                    }
                    Err(mpsc::TrySendError::Full(_)) => return false,
                }
            }
        });
        if !asked {
            if let Some(kill) = &kill {
                kill(Shutdown::Both);
            }
        }
        let until = Instant::now() + SHUTDOWN_GRACE + self.inner.cfg.linger;
        let mut s = lock(&self.inner.slots);
        let mut cut = !asked;
        while s.applying.is_some() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() && !cut {
                // The session did not stop in time (a source that stopped reading): cut it.
                if let Some((_, kill)) = &s.active {
                    kill(Shutdown::Both);
                }
                cut = true;
            }
            let wait = if cut { Duration::from_millis(100) } else { left };
            s = self.inner.slots_changed.wait_timeout(s, wait).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Cuts the current session, if any, as a network failure would; the receiver goes on
    /// accepting (the source reconnects and resumes). Returns true if there was one.
    pub fn disconnect(&self) -> bool {
        let s = lock(&self.inner.slots);
        match &s.active {
            Some((_, kill)) => {
                kill(Shutdown::Both);
                true
            }
            None => false,
        }
    }

    /// Serves one connection from a source on this thread: handshake, opening exchange,
    /// then apply until the connection ends. Returns `Ok` when the source closed normally.
    pub fn serve<S: Stream + Send + 'static>(&self, stream: S) -> Result<()> {
        self.serve_tracked(stream, &AtomicBool::new(false))
    }

    /// [`Receiver::serve`], setting `authenticated` once the peer's key was accepted.
    fn serve_tracked<S: Stream + Send + 'static>(
        &self,
        stream: S,
        authenticated: &AtomicBool,
    ) -> Result<()> {
        let result = self.serve_inner(stream, authenticated);
        if let Err(e) = &result {
            let text = error_chain(e);
            self.update(|s| s.last_error = Some(text));
        }
        result
    }

    fn serve_inner<S: Stream + Send + 'static>(
        &self,
        stream: S,
        authenticated: &AtomicBool,
    ) -> Result<()> {
        let cfg = &self.inner.cfg;
        let control = stream
            .try_clone()
            .map_err(|source| ApplyError::Io { op: "cloning the stream", source })?;
        // In a mutex: the stream need not be `Sync` for the handle to be shared.
        let control = Mutex::new(control);
        let kill: Kill = Arc::new(move |how| {
            let _ = lock(&control).shutdown(how);
        });
        let channel = SecureChannel::accept(stream, &cfg.secure)?;
        authenticated.store(true, Ordering::SeqCst);
        let mut conn = Connection::new(channel, Codec::new(cfg.max_frame_len)?)?;
        let mut admitted = None;
        let ours = std::cell::RefCell::new(LineageInfo::default());
        let opened = conn.answer_session(
            &cfg.node,
            |hello| {
                self.check_hello(hello)?;
                let head = lock(&self.inner.log).last_seq();
                let mut info = cfg.lineage.info(head);
                info.source_wins = cfg.source_wins;
                *ours.borrow_mut() = info.clone();
                Ok(info)
            },
            |_hello, theirs| {
                let verdict = lineage::decide(theirs, &ours.borrow());
                if let Verdict::Conflict(c) = &verdict {
                    return Err(Refuse {
                        reason: c.reason(),
                        supported: SUPPORTED_VERSIONS,
                        message: truncate(c.to_string()),
                    });
                }
                let id = self.take_over(kill.clone())?;
                // Everything the previous connection appended becomes durable, and is where
                // this one resumes.
                let (synced, replica) = {
                    let mut log = lock(&self.inner.log);
                    (log.sync(), replica_state(&log))
                };
                let adopted = match (&synced, &verdict) {
                    (Ok(_), Verdict::Adopt | Verdict::Resync { .. }) => {
                        cfg.lineage.adopt(&theirs.generations).map_err(|e| e.to_string())
                    }
                    _ => Ok(()),
                };
                match (synced, adopted) {
                    (Ok(durable), Ok(())) => {
                        if let Verdict::Resync { why } = &verdict {
                            tracing::warn!(%why, "lineage: the source's resync overwrites this replica");
                        }
                        admitted = Some((id, durable));
                        Ok((durable, replica))
                    }
                    (Ok(_), Err(e)) => {
                        self.release(id);
                        Err(unavailable(&format!("the target could not record its lineage: {e}")))
                    }
                    (Err(source), _) => {
                        let e = ApplyError::Storage { op: "group commit".to_owned(), source };
                        self.mark_failed(&e);
                        self.release(id);
                        Err(unavailable(&format!("the target's retention log failed: {e}")))
                    }
                }
            },
        );
        let hello = match opened {
            Ok((hello, _version, _lineage)) => hello,
            Err(e) => {
                if let Some((id, _)) = admitted {
                    self.release(id);
                }
                return Err(e.into());
            }
        };
        let (id, resume) = admitted.expect("an accepted session was admitted");
        self.update(|s| {
            s.connected = true;
            s.sessions += 1;
            s.peer = Some(hello.node.clone());
            s.durable = resume;
            s.acked = resume;
            s.received = resume;
        });
        let result = self.run_session(id, conn, &kill, resume);
        self.release(id);
        result
    }

    fn check_hello(&self, hello: &Hello) -> Result<(), Refuse> {
        let cfg = &self.inner.cfg;
        if hello.pair != cfg.pair {
            return Err(Refuse {
                reason: RefuseReason::UNKNOWN_PAIR,
                supported: SUPPORTED_VERSIONS,
                message: format!("this target serves pair {}, not {}", cfg.pair, hello.pair),
            });
        }
        check_volumes(&hello.volumes, &volume_lens_of(&lock(&self.inner.log)))
    }

    /// Makes the connection `kill` belongs to the live one: shuts the previous one down
    /// and waits until its applier has stopped.
    fn take_over(&self, kill: Kill) -> Result<u64, Refuse> {
        let mut s = lock(&self.inner.slots);
        if s.shutting_down {
            return Err(unavailable("the target is shutting down"));
        }
        if let Some(f) = &s.failed {
            return Err(unavailable(&format!("the target's retention log failed: {f}")));
        }
        let id = s.next_id;
        s.next_id += 1;
        if let Some((_, old)) = s.active.replace((id, kill)) {
            old(Shutdown::Both);
            self.update(|st| st.replaced += 1);
        }
        loop {
            if s.shutting_down {
                return Err(unavailable("the target is shutting down"));
            }
            if s.active.as_ref().map(|a| a.0) != Some(id) {
                return Err(Refuse {
                    reason: RefuseReason::BUSY,
                    supported: SUPPORTED_VERSIONS,
                    message: "replaced by a newer connection from the same pair".to_owned(),
                });
            }
            if s.applying.is_none() {
                break;
            }
            s = self.inner.slots_changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.applying = Some(id);
        Ok(id)
    }

    fn release(&self, id: u64) {
        let mut s = lock(&self.inner.slots);
        if s.applying == Some(id) {
            s.applying = None;
        }
        if s.stopper.as_ref().is_some_and(|(i, _)| *i == id) {
            s.stopper = None;
        }
        let idle = match &s.active {
            Some((active, _)) if *active == id => {
                s.active = None;
                true
            }
            Some(_) => false,
            None => true,
        };
        drop(s);
        self.inner.slots_changed.notify_all();
        if idle {
            self.update(|st| {
                st.connected = false;
                st.peer = None;
            });
        }
    }

    fn is_replaced(&self, id: u64) -> bool {
        lock(&self.inner.slots).active.as_ref().map(|a| a.0) != Some(id)
    }

    /// Reads the retention log's sealed segments again ([`RetentionLog::scrub`]); damage
    /// not known before is asked to be repaired at once on the live session (and again at
    /// the start of every session until it is). Returns the new damage.
    pub fn scrub(&self) -> Result<Vec<JournalDamage>> {
        let found = lock(&self.inner.log)
            .scrub()
            .map_err(|source| ApplyError::Storage { op: "scrub".to_owned(), source })?;
        if !found.is_empty() {
            self.send_repairs();
        }
        Ok(found)
    }

    /// Registers the damaged records reads met since the last call
    /// ([`RetentionLog::note_read_damage`]: a read that fails on one refuses, never returns
    /// wrong bytes) and asks the live session's source to repair them. Cheap when none.
    pub fn check_read_damage(&self) -> Result<Vec<JournalDamage>> {
        let found = lock(&self.inner.log).note_read_damage().map_err(|source| {
            ApplyError::Storage { op: "registering damage".to_owned(), source }
        })?;
        if !found.is_empty() {
            self.send_repairs();
        }
        Ok(found)
    }

    /// Asks the live session's source to repair the journal damage that needs it, if any
    /// (damage a read met included).
    fn send_repairs(&self) {
        let needed = {
            let mut log = lock(&self.inner.log);
            if let Err(e) = log.note_read_damage() {
                tracing::warn!(error = %error_chain(&e), "registering damage a read met");
            }
            log.repairs_needed()
        };
        let Some(request) = repair_request(&needed) else { return };
        for d in &needed {
            tracing::warn!(segment = %d.segment, offset = d.offset, lost_from = %d.lost_from,
                ranges = %d.describe_ranges(), repair_id = d.repair_id,
                "journal damage: asking the source to resend the ranges it lost");
        }
        let sent = match &*lock(&self.inner.repair_out) {
            Some((_, send)) => send(&Message::RepairRequest(request)),
            None => return,
        };
        match sent {
            Ok(()) => self.update(|s| s.repair_requests += 1),
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "the repair request was not sent; the next session asks again")
            }
        }
    }

    fn mark_failed(&self, e: &ApplyError) {
        let text = error_chain(e);
        lock(&self.inner.slots).failed.get_or_insert_with(|| text.clone());
        self.update(|s| {
            s.failed.get_or_insert(text);
        });
    }

    fn run_session<S: Stream + Send + 'static>(
        &self,
        id: u64,
        conn: Connection<S>,
        kill: &Kill,
        resume: Seq,
    ) -> Result<()> {
        let cfg = &self.inner.cfg;
        // What the window holds: every write from its oldest up to the resume point.
        let held = lock(&self.inner.window).oldest().unwrap_or(resume.next());
        let mut conn = conn;
        conn.send(&Message::DedupeHeld { from: held })?;
        let (channel, codec) = conn.into_parts();
        let (rx_half, tx_half) = channel.split()?;
        let out = Arc::new(Mutex::new(Outbound {
            tx: tx_half,
            codec: Codec::new(cfg.max_frame_len)?,
            buf: Vec::new(),
        }));
        let (tx, rx) = mpsc::sync_channel::<Inbound>(cfg.queue_depth);
        {
            let mut s = lock(&self.inner.slots);
            if s.shutting_down {
                // The shutdown began before this session could be asked: it stops at once.
                let _ = tx.try_send(Inbound::Stop);
            }
            s.stopper = Some((id, tx.clone()));
        }
        let (hash_tx, hash_rx) = mpsc::sync_channel::<HashRequest>(HASH_QUEUE);
        let cancel = Arc::new(AtomicBool::new(false));
        let hasher = {
            let (out, inner, tx, cancel) =
                (out.clone(), self.inner.clone(), tx.clone(), cancel.clone());
            thread::Builder::new()
                .name("tidemark-recv-hash".to_owned())
                .spawn(move || {
                    if let Err(e) = run_hasher(&inner, id, &hash_rx, &out, &cancel) {
                        // The applier ends the session with it (and tells the source).
                        let _ = tx.send(Inbound::Failed(e));
                    }
                })
                .map_err(|e| ApplyError::Thread { what: format!("spawning the hasher: {e}") })?
        };
        let reader = {
            let out = out.clone();
            thread::Builder::new()
                .name("tidemark-recv-read".to_owned())
                .spawn(move || run_net_reader(rx_half, codec, &tx, &hash_tx, &out))
                .map_err(|e| ApplyError::Thread { what: format!("spawning the reader: {e}") })?
        };
        {
            let out = out.clone();
            let send: RepairSender = Box::new(move |m: &Message| lock(&out).send(m));
            *lock(&self.inner.repair_out) = Some((id, send));
        }
        self.send_repairs();
        let result = self.apply_loop(id, &rx, &out, resume);
        {
            let mut current = lock(&self.inner.repair_out);
            if current.as_ref().is_some_and(|(i, _)| *i == id) {
                *current = None;
            }
        }
        cancel.store(true, Ordering::SeqCst);
        if result
            .as_ref()
            .is_err_and(|e| e.wire_code().is_some() && !matches!(e, ApplyError::ShuttingDown))
        {
            // A refused batch may have left writes in the window that were never appended.
            lock(&self.inner.window).clear();
        }
        match &result {
            Ok(()) => {
                let _ = lock(&out).tx.close();
            }
            Err(e) => {
                if let Some(code) = e.wire_code() {
                    // Tell the source, stop writing, and keep reading (dropping) what it
                    // still sends until it hangs up or `linger` passes, so that the
                    // `Error` reaches it rather than a reset.
                    let message = truncate(error_chain(e));
                    let close = match e {
                        ApplyError::ShuttingDown => CloseCode::SHUTTING_DOWN,
                        _ => CloseCode::PROTOCOL_VIOLATION,
                    };
                    let mut o = lock(&out);
                    let _ = o.send(&Message::Error { code, message: message.clone() });
                    let _ = o.tx.close_with(close, &message);
                    drop(o);
                    kill(Shutdown::Write);
                    let until = Instant::now() + cfg.linger;
                    loop {
                        let left = until.saturating_duration_since(Instant::now());
                        match rx.recv_timeout(left) {
                            Ok(Inbound::Batch(_) | Inbound::Stop) => {}
                            Ok(_)
                            | Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                                break;
                            }
                        }
                    }
                }
            }
        }
        kill(Shutdown::Both);
        drop(rx);
        let reader_ok = reader.join().is_ok();
        // The reader held the hasher's queue: with it gone, the hasher ends.
        let hasher_ok = hasher.join().is_ok();
        if !(reader_ok && hasher_ok) && result.is_ok() {
            return Err(ApplyError::Thread {
                what: "the reader or the hasher panicked".to_owned(),
            });
        }
        result
    }

    fn apply_loop<S: Stream>(
        &self,
        id: u64,
        rx: &mpsc::Receiver<Inbound>,
        out: &Mutex<Outbound<S>>,
        resume: Seq,
    ) -> Result<()> {
        let cfg = &self.inner.cfg;
        let mut acked = resume;
        let mut window = lock(&self.inner.window);
        let mut pending_bytes = 0u64;
        let mut pending_since: Option<Instant> = None;
        let gone = || ApplyError::Thread { what: "the reader ended without a word".to_owned() };
        loop {
            let item = if pending_since.is_some() {
                match rx.try_recv() {
                    Ok(item) => item,
                    Err(TryRecvError::Empty) => {
                        // The queue ran dry: commit now rather than wait for more.
                        self.commit(out, &mut acked)?;
                        pending_bytes = 0;
                        pending_since = None;
                        continue;
                    }
                    Err(TryRecvError::Disconnected) => return Err(gone()),
                }
            } else {
                rx.recv().map_err(|_| gone())?
            };
            match item {
                Inbound::Batch(batch) => {
                    let (events, bytes) = self.apply_batch(id, &batch, &mut window)?;
                    if events > 0 {
                        pending_bytes += bytes + 24 * events;
                        let since = *pending_since.get_or_insert_with(Instant::now);
                        if pending_bytes >= cfg.sync_bytes || since.elapsed() >= cfg.sync_interval {
                            self.commit(out, &mut acked)?;
                            pending_bytes = 0;
                            pending_since = None;
                        }
                    }
                }
                Inbound::Closed => {
                    if pending_since.is_some() {
                        self.commit(out, &mut acked)?;
                    }
                    return Ok(());
                }
                Inbound::Failed(e) => return Err(e),
                Inbound::Stop => {
                    // Everything appended is made durable and acknowledged before the
                    // source hears that the target stops.
                    if pending_since.is_some() {
                        self.commit(out, &mut acked)?;
                    }
                    return Err(ApplyError::ShuttingDown);
                }
            }
        }
    }

    /// Group commit, then an ack of what it made durable.
    fn commit<S: Stream>(&self, out: &Mutex<Outbound<S>>, acked: &mut Seq) -> Result<()> {
        let synced = lock(&self.inner.log).sync();
        let durable = match synced {
            Ok(d) => d,
            Err(source) => {
                let e = ApplyError::Storage { op: "group commit".to_owned(), source };
                self.mark_failed(&e);
                return Err(e);
            }
        };
        self.update(|s| {
            s.durable = durable;
            s.syncs += 1;
        });
        if durable > *acked {
            lock(out).send(&Message::Ack { upto: durable })?;
            *acked = durable;
            self.update(|s| s.acked = durable);
        }
        Ok(())
    }

    /// Checks and appends one batch, resolving its dedupe references through `window`;
    /// returns the events appended and their data bytes.
    fn apply_batch(
        &self,
        id: u64,
        batch: &Batch,
        window: &mut AppliedWindow,
    ) -> Result<(u64, u64)> {
        if self.is_replaced(id) {
            return Err(ApplyError::Replaced);
        }
        let mut log = lock(&self.inner.log);
        let duplicates = admit_batch(log.last_seq(), batch.first_seq, batch.entries.len())?;
        let fresh = || batch.iter().skip(duplicates as usize);
        // Sizes as the batch goes: a resize entry grows its volume for the entries after it.
        let mut lens = volume_lens_of(&log);
        let mut data_bytes = 0;
        let (mut deduped_entries, mut deduped_bytes) = (0, 0);
        for (seq, entry) in fresh() {
            // The range and, for a write, its length, checked before a reference is
            // resolved so that no entry makes the receiver read or allocate past a volume
            // or the largest record.
            let (range, write_len) = match &entry.body {
                EntryBody::Event(e) => {
                    let len = match e {
                        Event::Write { data, .. } => Some(data.len() as u64),
                        _ => None,
                    };
                    (e.range(), len)
                }
                EntryBody::Ref(r) => {
                    deduped_entries += 1;
                    deduped_bytes += u64::from(r.len);
                    (Some((r.volume, r.offset, u64::from(r.len))), Some(u64::from(r.len)))
                }
                EntryBody::Deduped(d) => {
                    deduped_entries += 1;
                    deduped_bytes += d.referenced_bytes();
                    (Some((d.volume, d.offset, u64::from(d.len))), Some(u64::from(d.len)))
                }
            };
            if let EntryBody::Event(Event::Resize { volume, new_size, .. }) = &entry.body {
                let Some(size) = lens.get_mut(usize::from(volume.0)) else {
                    return Err(ApplyError::OutOfRange {
                        seq,
                        volume: volume.0,
                        offset: 0,
                        len: *new_size,
                        volume_len: 0,
                    });
                };
                if *new_size < *size {
                    return Err(ApplyError::Shrink {
                        seq,
                        volume: volume.0,
                        size: *size,
                        new_size: *new_size,
                    });
                }
                *size = *new_size;
            }
            if let Some((volume, offset, len)) = range {
                let volume_len = lens.get(usize::from(volume.0)).copied();
                if offset.checked_add(len).is_none_or(|end| end > volume_len.unwrap_or(0)) {
                    return Err(ApplyError::OutOfRange {
                        seq,
                        volume: volume.0,
                        offset,
                        len,
                        volume_len: volume_len.unwrap_or(0),
                    });
                }
            }
            if let Some(len) = write_len {
                if len > MAX_PAYLOAD as u64 {
                    return Err(ApplyError::EventTooLarge { seq, len, max: MAX_PAYLOAD as u64 });
                }
                data_bytes += len;
            }
        }
        let resolved = dedupe::resolve_batch(&log, window, fresh().map(|(s, e)| (s, &e.body)))
            .map_err(|u| ApplyError::UnknownReference { seq: u.entry, why: u.to_string() })?;
        let mut events = 0;
        for ((seq, entry), event) in fresh().zip(&resolved) {
            if let Err(source) = log.append(seq, entry.time, event) {
                let e = ApplyError::Storage { op: format!("appending seq {seq}"), source };
                drop(log);
                self.mark_failed(&e);
                return Err(e);
            }
            if matches!(event, Event::ResyncBegin { .. }) {
                // A new comparison starts once its window is in: trees built before it are
                // stale for it (see `run_hasher`).
                self.inner.resync_generation.fetch_add(1, Ordering::SeqCst);
            }
            events += 1;
        }
        if let Some(changes) = lock(&self.inner.changes).as_mut() {
            for ((seq, _), event) in fresh().zip(&resolved) {
                changes.record(seq, event);
            }
        }
        let received = log.last_seq();
        drop(log);
        self.update(|s| {
            s.received = received;
            s.batches += 1;
            s.events += events;
            s.data_bytes += data_bytes;
            s.deduped_entries += deduped_entries;
            s.deduped_bytes += deduped_bytes;
            s.duplicates += duplicates;
        });
        Ok((events, data_bytes))
    }

    /// Accepts connections on `listener` on a thread of its own, serving each on another.
    pub fn listen(&self, listener: TcpListener) -> io::Result<Listener> {
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let sessions: Arc<Mutex<Vec<Accepted>>> = Arc::default();
        let thread = {
            let (receiver, stop, sessions) = (self.clone(), stop.clone(), sessions.clone());
            thread::Builder::new().name("tidemark-recv-accept".to_owned()).spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let stream = match stream {
                        Ok(s) => s,
                        Err(e) => {
                            receiver.update(|s| s.last_error = Some(format!("accept: {e}")));
                            continue;
                        }
                    };
                    let mut list = lock(&sessions);
                    list.retain(|c| !c.thread.is_finished());
                    if list.len() >= MAX_CONNECTIONS {
                        // A flood of connections (each may sit in its handshake until the
                        // handshake timeout) must not pile up threads, nor keep the paired
                        // source out: the oldest connection still in its handshake makes
                        // room (an authenticated one is never cut for a newcomer).
                        match list.iter().position(|c| !c.authenticated.load(Ordering::SeqCst)) {
                            Some(i) => {
                                let old = list.remove(i);
                                let _ = old.stream.shutdown(Shutdown::Both);
                                receiver.update(|s| s.handshakes_evicted += 1);
                            }
                            None => {
                                drop(stream);
                                continue;
                            }
                        }
                    }
                    let _ = stream.set_nodelay(true);
                    let Ok(handle) = stream.try_clone() else { continue };
                    let authenticated = Arc::new(AtomicBool::new(false));
                    let (r, flag) = (receiver.clone(), authenticated.clone());
                    let spawned =
                        thread::Builder::new().name("tidemark-recv".to_owned()).spawn(move || {
                            let _ = r.serve_tracked(stream, &flag);
                        });
                    if let Ok(thread) = spawned {
                        list.push(Accepted { thread, stream: handle, authenticated });
                    }
                }
            })?
        };
        Ok(Listener { addr, stop, thread: Some(thread), sessions })
    }
}

/// The net reader: records -> frames -> batches for the applier; `Ping` answered here.
fn run_net_reader<S: Stream>(
    mut rx_half: crate::secure::SecureReceiver<S>,
    mut codec: Codec,
    tx: &SyncSender<Inbound>,
    hash_tx: &SyncSender<HashRequest>,
    out: &Mutex<Outbound<S>>,
) {
    let mut buf = Vec::new();
    loop {
        let item = match rx_half.recv_into(&mut buf) {
            Ok(false) => Inbound::Closed,
            Err(e) => Inbound::Failed(e.into()),
            Ok(true) => match codec.decode(Bytes::from(std::mem::take(&mut buf))) {
                Ok(Message::Batch(b)) => Inbound::Batch(b),
                Ok(Message::Ping { nonce }) => match lock(out).send(&Message::Pong { nonce }) {
                    Ok(()) => continue,
                    Err(e) => Inbound::Failed(e),
                },
                Ok(Message::Pong { .. }) => continue,
                Ok(Message::HashRequest(request)) => match hash_tx.send(request) {
                    Ok(()) => continue,
                    Err(_) => {
                        Inbound::Failed(ApplyError::Thread { what: "the hasher ended".to_owned() })
                    }
                },
                Ok(Message::Error { code, message }) => {
                    Inbound::Failed(ApplyError::PeerError { code, message })
                }
                Ok(other) => {
                    Inbound::Failed(ApplyError::UnexpectedMessage { found: other.message_type() })
                }
                Err(e) => Inbound::Failed(e.into()),
            },
        };
        let last = !matches!(item, Inbound::Batch(_));
        if tx.send(item).is_err() || last {
            return;
        }
    }
}

/// The order rule (invariant 2) for a batch of `entries` events starting at `first_seq`,
/// against the last sequence number the log holds (`last_received`): how many leading
/// entries are duplicates to drop, or [`ApplyError::SequenceGap`] when the batch does not
/// continue the stream (nothing of it may be appended). Pure, so that the deterministic
/// simulation (`tests/src/sim`) admits batches by the same rule.
pub fn admit_batch(last_received: Seq, first_seq: Seq, entries: usize) -> Result<u64> {
    if first_seq > last_received.next() {
        return Err(ApplyError::SequenceGap { expected: last_received.next(), found: first_seq });
    }
    // `first_seq <= last_received + 1`, so this does not underflow.
    Ok((last_received.0 + 1 - first_seq.0).min(entries as u64))
}

/// The current size of every volume of `log`, index = volume id.
fn volume_lens_of(log: &RetentionLog) -> Vec<u64> {
    let mut lens = Vec::new();
    while let Ok(len) = log.volume_len(VolumeId(lens.len() as u16)) {
        lens.push(len);
        if lens.len() == usize::from(u16::MAX) {
            break;
        }
    }
    lens
}

/// Checks the volumes a source announced in its `Hello` against the replica's volume sizes
/// (`lens`, index = volume id): same count, same ids in order, and each announced size at
/// least the replica's. A larger source volume is one that grew and whose resize entry is
/// still on its way in the stream (it is applied in order; a write past the replica's size
/// before it is refused as out of range). A source volume smaller than the replica, or any
/// other difference, is refused with [`RefuseReason::VOLUME_MISMATCH`] naming both lists.
pub fn check_volumes(announced: &[crate::wire::VolumeInfo], lens: &[u64]) -> Result<(), Refuse> {
    let matches = announced.len() == lens.len()
        && announced.iter().enumerate().all(|(i, v)| usize::from(v.id.0) == i && v.size >= lens[i]);
    if matches {
        return Ok(());
    }
    let theirs: Vec<String> = announced.iter().map(|v| format!("{}:{}", v.id, v.size)).collect();
    let ours: Vec<String> = lens.iter().enumerate().map(|(i, l)| format!("{i}:{l}")).collect();
    Err(Refuse {
        reason: RefuseReason::VOLUME_MISMATCH,
        supported: SUPPORTED_VERSIONS,
        message: truncate(format!(
            "the replica's volumes (id:bytes) are {}, the source announced {}",
            ours.join(" "),
            theirs.join(" ")
        )),
    })
}

/// The `RepairRequest` for the journal damage `needed` ([`RetentionLog::repairs_needed`]):
/// every repair id and range, the first [`MAX_REPAIR_IDS`] damages (the rest go in a later
/// request, once these are repaired). `None` when nothing needs repair. Pure, for tests.
pub fn repair_request(needed: &[JournalDamage]) -> Option<RepairRequest> {
    let mut ids = Vec::new();
    let mut ranges: Vec<RepairRange> = Vec::new();
    for d in needed.iter().take(MAX_REPAIR_IDS) {
        ids.push(d.repair_id);
        for &(volume, offset, len) in &d.ranges {
            let r = RepairRange { volume, offset, len };
            if len > 0 && !ranges.contains(&r) && ranges.len() < MAX_REPAIR_RANGES {
                ranges.push(r);
            }
        }
    }
    (!ids.is_empty() && !ranges.is_empty()).then_some(RepairRequest { ids, ranges })
}

/// What the replica is, for `Resume`: blank when nothing was ever received or an initial
/// sync is under way (naming its open windows), inconsistent while another resync window
/// is open (naming its open ids, the first [`MAX_OPEN_RESYNCS`]),
/// consistent otherwise.
pub fn replica_state(log: &RetentionLog) -> ReplicaState {
    let status = log.status();
    match status.inconsistent {
        // No consistent point before the window: an initial sync that has not completed.
        Some(w) if w.initial_sync => ReplicaState {
            kind: ReplicaKind::Blank,
            open_resyncs: w.open_ids.into_iter().take(MAX_OPEN_RESYNCS).collect(),
        },
        Some(w) => ReplicaState {
            kind: ReplicaKind::Inconsistent,
            open_resyncs: w.open_ids.into_iter().take(MAX_OPEN_RESYNCS).collect(),
        },
        None if log.last_seq() == Seq::ZERO => {
            ReplicaState { kind: ReplicaKind::Blank, open_resyncs: Vec::new() }
        }
        None => ReplicaState::consistent(),
    }
}

/// Hash requests decoded and waiting for the hasher.
const HASH_QUEUE: usize = 4;

/// The replica's current state of one volume, read through the retention log (consistent
/// or not: a comparison must see what the resync has already written), as a
/// [`BlockSource`]. Each read holds the log's lock for that read only, so batches keep
/// being applied while a comparison hashes.
struct ReplicaSource<'a> {
    inner: &'a Inner,
    volume: VolumeId,
    len: u64,
    cancel: &'a AtomicBool,
}

impl BlockSource for ReplicaSource<'_> {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if self.cancel.load(Ordering::SeqCst) {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "the session ended"));
        }
        lock(&self.inner.log).read_current(self.volume, offset, buf).map_err(io::Error::other)
    }

    fn will_need(&self, range: std::ops::Range<u64>) {
        let len = range.end.min(self.len).saturating_sub(range.start);
        if len > 0 {
            lock(&self.inner.log).will_need_current(self.volume, range.start, len);
        }
    }

    fn describe(&self) -> String {
        format!("replica volume {}", self.volume)
    }
}

/// Most changed ranges a [`Changes`] keeps before it gives up (the hasher then drops its
/// tree and hashes what each request asks from the replica).
const MAX_TRACKED_CHANGES: usize = 1 << 16;

/// The ranges of one volume the appliers changed since a hasher's tree was built, and the
/// last sequence number they account for: the tree plus these ranges hashed again is the
/// tree of the replica as it is, provided the log holds nothing newer than `seen`.
struct Changes {
    /// The session whose hasher keeps the tree.
    session: u64,
    volume: VolumeId,
    /// The log's last sequence number once every change up to it was recorded here.
    seen: Seq,
    /// Changed byte ranges, in arrival order (not coalesced).
    ranges: Vec<std::ops::Range<u64>>,
    /// More than [`MAX_TRACKED_CHANGES`] ranges: the tree can no longer be brought up to
    /// date.
    overflowed: bool,
}

impl Changes {
    /// Notes event `seq`, just appended.
    fn record(&mut self, seq: Seq, event: &Event) {
        self.seen = seq;
        let Some((volume, offset, len)) = event.range() else { return };
        if volume != self.volume || len == 0 || self.overflowed {
            return;
        }
        let r = offset..offset.saturating_add(len);
        if let Some(last) = self.ranges.last_mut().filter(|l| l.end == r.start) {
            last.end = r.end;
        } else if self.ranges.len() >= MAX_TRACKED_CHANGES {
            self.overflowed = true;
            self.ranges = Vec::new();
        } else {
            self.ranges.push(r);
        }
    }
}

/// The tree a hasher keeps between the requests of a comparison.
struct CachedTree {
    volume: VolumeId,
    shape: TreeShape,
    tree: MerkleTree,
    /// `Inner::resync_generation` when it was built.
    generation: u64,
}

/// Starts recording the changes to `volume` for `session`'s hasher, from the log's state
/// now (a tree built after this call and brought up to date with the changes is current).
fn track_changes(inner: &Inner, session: u64, volume: VolumeId) {
    let log = lock(&inner.log);
    *lock(&inner.changes) = Some(Changes {
        session,
        volume,
        seen: log.last_seq(),
        ranges: Vec::new(),
        overflowed: false,
    });
}

/// The ranges of `volume` changed since `session`'s hasher started tracking (and resets
/// them), or `None` when its tree cannot be brought up to date: tracking stopped, belongs
/// to another session or volume, overflowed, or the log holds events it did not record.
fn take_changes(
    inner: &Inner,
    session: u64,
    volume: VolumeId,
) -> Option<Vec<std::ops::Range<u64>>> {
    let log = lock(&inner.log);
    let mut guard = lock(&inner.changes);
    let changes = guard.as_mut()?;
    let valid = changes.session == session
        && changes.volume == volume
        && !changes.overflowed
        && changes.seen == log.last_seq();
    if !valid {
        return None;
    }
    Some(std::mem::take(&mut changes.ranges))
}

/// Stops `session`'s change tracking, if it is the one tracking.
fn untrack_changes(inner: &Inner, session: u64) {
    let mut guard = lock(&inner.changes);
    if guard.as_ref().is_some_and(|c| c.session == session) {
        *guard = None;
    }
}

/// Answers the session's hash requests in order, on a thread of its own, always from the
/// replica as it is when the request is answered. A request for the root level (the start
/// of a comparison) hashes the whole replica and keeps the tree for the requests that
/// follow; the appliers record every range they change meanwhile ([`Changes`]), and before
/// the tree answers again those ranges are hashed again. When the changes cannot be
/// accounted for (too many, or appended by someone else), the tree is dropped and each
/// request hashes the nodes it asks from the replica, as does a request for a lower level
/// without a tree (a comparison limited to dirty regions).
fn run_hasher<S: Stream>(
    inner: &Inner,
    session: u64,
    requests: &mpsc::Receiver<HashRequest>,
    out: &Mutex<Outbound<S>>,
    cancel: &AtomicBool,
) -> Result<()> {
    /// Stops the session's change tracking however the hasher ends.
    struct Untrack<'a>(&'a Inner, u64);
    impl Drop for Untrack<'_> {
        fn drop(&mut self) {
            untrack_changes(self.0, self.1);
        }
    }
    let _untrack = Untrack(inner, session);
    let mut cache: Option<CachedTree> = None;
    for request in requests {
        let generation = inner.resync_generation.load(Ordering::SeqCst);
        let (id, volume) = (request.id, request.volume);
        let len = match lock(&inner.log).volume_len(volume) {
            Ok(len) => len,
            Err(_) => {
                return Err(ApplyError::UnknownVolume {
                    id,
                    volume: volume.0,
                    volumes: inner.volume_count,
                });
            }
        };
        let source = ReplicaSource { inner, volume, len, cancel };
        let failed = |source| ApplyError::Hashing { id, source };
        if request.level >= request.shape.root_level(len) {
            // A new comparison: start tracking before hashing, so that what is applied
            // while the tree is built is hashed again below.
            track_changes(inner, session, volume);
            let tree = MerkleTree::build(&source, request.shape, 0).map_err(failed)?;
            cache = Some(CachedTree { volume, shape: request.shape, tree, generation });
        }
        // A tree serves only the comparison it was built for: a later one (a limited resync
        // or a repair asks for leaves only, after its own `ResyncBegin`) hashes afresh.
        let current = match cache.as_mut() {
            Some(c)
                if c.volume == volume && c.shape == request.shape && c.generation == generation =>
            {
                match take_changes(inner, session, volume) {
                    Some(changed) => {
                        c.tree.rehash(&source, &changed, 0).map_err(failed)?;
                        true
                    }
                    None => false,
                }
            }
            _ => false,
        };
        let reply = match cache.as_ref() {
            Some(c) if current => c.tree.answer(volume, &request).map_err(failed)?,
            _ => {
                if cache.take().is_some() {
                    untrack_changes(inner, session);
                }
                HashReply {
                    id,
                    volume,
                    level: request.level,
                    hashes: hash_nodes(&source, request.shape, request.level, &request.ranges, 0)
                        .map_err(failed)?,
                }
            }
        };
        lock(out).send(&Message::HashReply(reply))?;
        inner.status.update(|s| s.hash_requests += 1);
    }
    Ok(())
}

fn unavailable(message: &str) -> Refuse {
    Refuse {
        reason: RefuseReason::UNAVAILABLE,
        supported: SUPPORTED_VERSIONS,
        message: truncate(message.to_owned()),
    }
}

/// Cuts `text` to what a wire text field holds, without control characters.
fn truncate(text: String) -> String {
    let mut cut = text.len().min(MAX_TEXT);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text[..cut].chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// A receiver's TCP accept loop. Stopping it stops accepting; sessions already open go on
/// until [`Receiver::shutdown`] or their end.
#[derive(Debug)]
pub struct Listener {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    sessions: Arc<Mutex<Vec<Accepted>>>,
}

/// A connection the listener accepted: its thread, a handle to cut it, and whether its
/// peer got through the handshake.
#[derive(Debug)]
struct Accepted {
    thread: JoinHandle<()>,
    stream: TcpStream,
    authenticated: Arc<AtomicBool>,
}

impl Listener {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, cuts the connections still in their handshake (a peer that never
    /// finishes one would otherwise hold this up until the handshake timeout), and waits
    /// for the accept thread and every session thread (call [`Receiver::shutdown`] first,
    /// or this waits for the authenticated sources to hang up).
    pub fn stop(mut self) {
        self.stop_inner();
        let sessions = std::mem::take(&mut *lock(&self.sessions));
        for c in &sessions {
            if !c.authenticated.load(Ordering::SeqCst) {
                let _ = c.stream.shutdown(Shutdown::Both);
            }
        }
        for c in sessions {
            let _ = c.thread.join();
        }
    }

    fn stop_inner(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            // Wake the blocking accept with a connection of our own.
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
            let _ = t.join();
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop_inner();
    }
}
