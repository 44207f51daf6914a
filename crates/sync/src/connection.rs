//! A connection: a [`SecureChannel`] carrying wire frames, one frame per sealed message,
//! and the opening exchange that starts every replication session.
//!
//! ```text
//! source                              target
//!   Hello (versions, role, node, pair, volumes)  ->
//!                                  <-  Welcome (version, node), TargetLineage
//!                               or <-  Refuse (reason, supported versions, message)
//!   SourceLineage                                ->
//!                                  <-  Resume (last_acked, replica)
//!                               or <-  Refuse (split brain, lineage conflict, ...)
//! ```
//!
//! The target speaks its lineage first and the source answers, so that a peer built
//! before lineages fails at once on the message it cannot read instead of both waiting
//! ([`ConnectionError::NoLineage`]).
//!
//! Invariants: a peer that speaks another protocol version is answered with a `Refuse`
//! naming the versions this node speaks, and both sides end with
//! [`ConnectionError::VersionMismatch`], never a hang; a frame that fails to decode is
//! answered with an `Error` message (best effort) and ends the connection on this side.

use bytes::Bytes;
use tidemark_journal::Seq;

use crate::lineage::Verdict;
use crate::secure::{SecureChannel, SecureError, Stream};
use crate::wire::{
    Codec, ErrorCode, Hello, LineageInfo, MAX_TEXT, Message, MessageType, Refuse, RefuseReason,
    ReplicaState, Role, SUPPORTED_VERSIONS, VersionRange, Welcome, WireError,
};

/// What went wrong on a connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectionError {
    /// The secure channel failed (I/O, authentication, a tampered or replayed record).
    #[error(transparent)]
    Secure(#[from] SecureError),
    /// A frame could not be encoded, or one from the peer could not be decoded.
    #[error(transparent)]
    Wire(WireError),
    /// The two nodes have no protocol version in common.
    #[error("protocol version mismatch: this node speaks {ours}, the peer speaks {theirs}")]
    VersionMismatch {
        /// The versions this node speaks.
        ours: VersionRange,
        /// The versions the peer speaks.
        theirs: VersionRange,
    },
    /// The peer refused the session.
    #[error("the peer refused the session: {reason}: {message}")]
    Refused {
        /// Why, as a code.
        reason: RefuseReason,
        /// Why, in the peer's words.
        message: String,
    },
    /// This node refused the peer's session (and told it so).
    #[error("refused the peer's session: {reason}: {message}")]
    RefusedPeer {
        /// Why, as a code.
        reason: RefuseReason,
        /// What the peer was told.
        message: String,
    },
    /// The peer sent an `Error` message.
    #[error("the peer reported an error: {code}: {message}")]
    PeerError {
        /// What kind of error.
        code: ErrorCode,
        /// The peer's sentence.
        message: String,
    },
    /// A well-formed message arrived where the protocol does not allow it.
    #[error("expected {expected}, received {found}")]
    UnexpectedMessage {
        /// What the protocol allows here.
        expected: &'static str,
        /// The message type received.
        found: MessageType,
    },
    /// The peer closed the channel normally where a message was expected.
    #[error("the peer closed the connection while this node was waiting for {waiting_for}")]
    PeerClosed {
        /// The message expected.
        waiting_for: &'static str,
    },
    /// The peer does not exchange lineages (messages 12 and 13): it was built before them.
    #[error(
        "the {peer} did not send its lineage ({what}): it was built before lineages were \
         exchanged (docs/wire-protocol.md section 10); run a build with them on both ends"
    )]
    NoLineage {
        /// "source" or "target".
        peer: &'static str,
        /// What came instead.
        what: String,
    },
    /// The codec's maximum frame length is larger than the channel's maximum message.
    #[error(
        "configuration: the codec's maximum frame length {codec} exceeds the channel's maximum message length {channel}"
    )]
    LimitMismatch {
        /// The codec's maximum frame length.
        codec: u32,
        /// The channel's maximum message length.
        channel: u32,
    },
}

impl From<WireError> for ConnectionError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::VersionMismatch { ours, theirs } => Self::VersionMismatch { ours, theirs },
            other => Self::Wire(other),
        }
    }
}

type Result<T, E = ConnectionError> = std::result::Result<T, E>;

/// What the source learns when the target accepts its `Hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The protocol version both sides now speak.
    pub version: u16,
    /// The target's node name.
    pub peer_node: String,
    /// Everything up to here is durable on the target; ship from the next one.
    pub last_acked: Seq,
    /// What the replica is (blank, consistent, inside resync windows).
    pub replica: ReplicaState,
    /// The target's lineage, as it sent it.
    pub target_lineage: LineageInfo,
    /// What the lineages decided ([`crate::lineage::decide`]): same, adopt or resync (a
    /// conflict ends in a `Refuse` instead).
    pub verdict: Verdict,
}

/// A secure channel that carries wire messages.
#[derive(Debug)]
pub struct Connection<S: Stream> {
    channel: SecureChannel<S>,
    codec: Codec,
    outbound: Vec<u8>,
}

/// Cuts `text` to what a wire text field may hold.
fn wire_text(text: &str) -> String {
    let mut cut = text.len().min(MAX_TEXT);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text[..cut].chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

impl<S: Stream> Connection<S> {
    /// A connection over `channel`, framing with `codec`.
    pub fn new(channel: SecureChannel<S>, codec: Codec) -> Result<Self> {
        if codec.max_frame_len() > channel.max_message_len() {
            return Err(ConnectionError::LimitMismatch {
                codec: codec.max_frame_len(),
                channel: channel.max_message_len(),
            });
        }
        Ok(Self { channel, codec, outbound: Vec::new() })
    }

    /// The channel underneath.
    pub fn channel(&self) -> &SecureChannel<S> {
        &self.channel
    }

    /// The codec (to change the compression, say).
    pub fn codec_mut(&mut self) -> &mut Codec {
        &mut self.codec
    }

    /// Takes the connection apart.
    pub fn into_parts(self) -> (SecureChannel<S>, Codec) {
        (self.channel, self.codec)
    }

    /// Sends one message.
    pub fn send(&mut self, message: &Message) -> Result<()> {
        self.outbound.clear();
        self.codec.encode(message, &mut self.outbound)?;
        self.channel.send(&self.outbound)?;
        Ok(())
    }

    /// Receives the next message; `None` once the peer has closed normally. A frame that
    /// does not decode is answered with an `Error` message (except a version mismatch,
    /// which the opening exchange answers with `Refuse`).
    pub fn recv(&mut self) -> Result<Option<Message>> {
        let mut frame = Vec::new();
        if !self.channel.recv_into(&mut frame)? {
            return Ok(None);
        }
        match self.codec.decode(Bytes::from(frame)) {
            Ok(message) => Ok(Some(message)),
            Err(e) => {
                if !matches!(e, WireError::VersionMismatch { .. }) {
                    let report = Message::Error {
                        code: ErrorCode::MALFORMED,
                        message: wire_text(&e.to_string()),
                    };
                    let _ = self.send(&report);
                }
                Err(e.into())
            }
        }
    }

    /// Closes the connection normally.
    pub fn close(&mut self) -> Result<()> {
        self.channel.close()?;
        Ok(())
    }

    /// The source's opening: sends `hello`, waits for `Welcome` and the target's lineage,
    /// answers with `lineage` (this source's), and waits for `Resume`.
    pub fn open_session(&mut self, hello: &Hello, lineage: &LineageInfo) -> Result<Session> {
        self.send(&Message::Hello(hello.clone()))?;
        let welcome = match self.recv()? {
            Some(Message::Welcome(w)) => w,
            Some(Message::Refuse(r)) => return Err(refused(hello, r)),
            other => return Err(self.unexpected(other, "Welcome or Refuse")),
        };
        if !hello.versions.contains(welcome.version) {
            return Err(ConnectionError::VersionMismatch {
                ours: hello.versions,
                theirs: VersionRange::single(welcome.version),
            });
        }
        let target_lineage = match self.recv()? {
            Some(Message::TargetLineage(l)) => l,
            Some(Message::Resume { .. }) => {
                return Err(ConnectionError::NoLineage {
                    peer: "target",
                    what: "it sent Resume right after Welcome".to_owned(),
                });
            }
            other => return Err(self.unexpected(other, "TargetLineage")),
        };
        self.send(&Message::SourceLineage(lineage.clone()))?;
        match self.recv()? {
            Some(Message::Resume { last_acked, replica }) => Ok(Session {
                version: welcome.version,
                peer_node: welcome.node,
                last_acked,
                replica,
                verdict: crate::lineage::decide(lineage, &target_lineage),
                target_lineage,
            }),
            Some(Message::Refuse(r)) => Err(refused(hello, r)),
            other => Err(self.unexpected(other, "Resume or Refuse")),
        }
    }

    /// The source's step after [`Connection::open_session`]: the target's `DedupeHeld`,
    /// the oldest write its dedupe window holds.
    pub fn recv_dedupe_held(&mut self) -> Result<Seq> {
        match self.recv()? {
            Some(Message::DedupeHeld { from }) => Ok(from),
            other => Err(self.unexpected(other, "DedupeHeld")),
        }
    }

    /// The target's opening: waits for a `Hello`, negotiates the version, asks `admit`
    /// whether to accept it (it returns this target's lineage, or the refusal), answers
    /// `Welcome` and its lineage, waits for the source's lineage, asks `resume` (given the
    /// `Hello` and the source's lineage) for the last sequence number durable here and the
    /// replica's state, or a refusal (a split brain, say), and answers `Resume` or `Refuse`.
    /// Returns the `Hello`, the version agreed and the source's lineage.
    pub fn answer_session(
        &mut self,
        node: &str,
        admit: impl FnOnce(&Hello) -> Result<LineageInfo, Refuse>,
        resume: impl FnOnce(&Hello, &LineageInfo) -> Result<(Seq, ReplicaState), Refuse>,
    ) -> Result<(Hello, u16, LineageInfo)> {
        let hello = match self.recv() {
            Ok(Some(Message::Hello(h))) => h,
            Err(ConnectionError::VersionMismatch { ours, theirs }) => {
                return Err(self.refuse_version(ours, theirs));
            }
            Ok(other) => return Err(self.unexpected(other, "Hello")),
            Err(e) => return Err(e),
        };
        let version = match SUPPORTED_VERSIONS.negotiate(hello.versions) {
            Ok(v) => v,
            Err(_) => return Err(self.refuse_version(SUPPORTED_VERSIONS, hello.versions)),
        };
        let admitted = if hello.role == Role::Target {
            Err(Refuse {
                reason: RefuseReason::ROLE_CONFLICT,
                supported: SUPPORTED_VERSIONS,
                message: "both nodes are targets: connect from the source".to_owned(),
            })
        } else {
            admit(&hello)
        };
        let ours = match admitted {
            Ok(l) => l,
            Err(refuse) => return Err(self.refuse(refuse)),
        };
        self.send(&Message::Welcome(Welcome { version, node: node.to_owned() }))?;
        self.send(&Message::TargetLineage(ours))?;
        let theirs = match self.recv()? {
            Some(Message::SourceLineage(l)) => l,
            // A source built before lineages cannot read message 13 and says so.
            Some(Message::Error { code: ErrorCode::MALFORMED, message }) => {
                return Err(ConnectionError::NoLineage {
                    peer: "source",
                    what: format!("it could not read TargetLineage: {message}"),
                });
            }
            other => return Err(self.unexpected(other, "SourceLineage")),
        };
        match resume(&hello, &theirs) {
            Ok((last_acked, replica)) => {
                self.send(&Message::Resume { last_acked, replica })?;
                Ok((hello, version, theirs))
            }
            Err(refuse) => Err(self.refuse(refuse)),
        }
    }

    /// Sends `refuse`, closes, and returns the error this side reports.
    fn refuse(&mut self, refuse: Refuse) -> ConnectionError {
        let err =
            ConnectionError::RefusedPeer { reason: refuse.reason, message: refuse.message.clone() };
        let refuse = Refuse { message: wire_text(&refuse.message), ..refuse };
        let _ = self.send(&Message::Refuse(refuse));
        let _ = self.close();
        err
    }

    fn refuse_version(&mut self, ours: VersionRange, theirs: VersionRange) -> ConnectionError {
        let refuse = Refuse {
            reason: RefuseReason::VERSION_MISMATCH,
            supported: ours,
            message: wire_text(&format!("this node speaks protocol {ours}, not {theirs}")),
        };
        let _ = self.send(&Message::Refuse(refuse));
        let _ = self.close();
        ConnectionError::VersionMismatch { ours, theirs }
    }

    /// The error for `found` where `expected` was due; tells the peer too.
    fn unexpected(&mut self, found: Option<Message>, expected: &'static str) -> ConnectionError {
        match found {
            None => ConnectionError::PeerClosed { waiting_for: expected },
            Some(Message::Error { code, message }) => ConnectionError::PeerError { code, message },
            Some(m) => {
                let found = m.message_type();
                let report = Message::Error {
                    code: ErrorCode::UNEXPECTED_MESSAGE,
                    message: format!("expected {expected}, received {found}"),
                };
                let _ = self.send(&report);
                ConnectionError::UnexpectedMessage { expected, found }
            }
        }
    }
}

/// The source's error for a target's `Refuse`.
fn refused(hello: &Hello, r: Refuse) -> ConnectionError {
    if r.reason == RefuseReason::VERSION_MISMATCH {
        ConnectionError::VersionMismatch { ours: hello.versions, theirs: r.supported }
    } else {
        ConnectionError::Refused { reason: r.reason, message: r.message }
    }
}
