//! The record layer and the channel: messages cut into AES-256-GCM-sealed records of at
//! most 65535 bytes, numbered, and put back together on the other side.
//!
//! A record on the stream is a 10-byte clear header (record number u64, ciphertext length
//! u16) and a Noise transport message. The record number is the Noise nonce: the receiver
//! expects exactly the next one, so a replayed record (a number already seen) and a
//! dropped or reordered one (a number ahead) are named as such before any decryption, and
//! a record altered in any other way fails its GCM tag. The clear number is authenticated
//! because it is the nonce: change it and the tag fails.
//!
//! A record's plaintext starts with its kind: `START` (u32 message length, then the first
//! chunk), `MORE` (the next chunk), `ACCEPT` (the responder's verdict), `CLOSE` (u16 code,
//! u16 reason length, reason). A message is one `START` and as many `MORE` as it needs;
//! its announced length is checked against the maximum before anything is buffered.
//!
//! Invariants:
//! 1. A nonce is used once per direction and key: the sender's counter only grows, and
//!    the channel refuses to send when it would wrap.
//! 2. After any failure (I/O, timeout, a bad record) the channel is poisoned: the stream
//!    is shut down in both directions and every later call, on either half of a split
//!    channel, fails with [`SecureError::Poisoned`] naming the first failure. Nothing
//!    received after a bad record is ever delivered.
//! 3. A clean end of stream is only the peer's `CLOSE` record with code `NORMAL`; a stream
//!    that simply stops is reported as truncated.

use std::net::Shutdown;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use snow::StatelessTransportState;

use super::handshake::{self, Established, HandshakeOptions};
use super::keys::PublicKey;
use super::stream::{Deadline, Phase, Stream, read_full, write_all};
use super::{CloseCode, SecureConfig, SecureError};

/// Largest Noise message, tag included.
pub const MAX_NOISE_MESSAGE: usize = 65535;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;
/// Length of a record's clear header.
pub const RECORD_HEADER_LEN: usize = 10;
/// Largest record plaintext.
pub const MAX_RECORD_PLAINTEXT: usize = MAX_NOISE_MESSAGE - TAG_LEN;
/// Longest reason in a `CLOSE` record.
pub const MAX_CLOSE_REASON: usize = 1024;

/// Record kinds (first plaintext byte).
pub(crate) const KIND_START: u8 = 1;
pub(crate) const KIND_MORE: u8 = 2;
pub(crate) const KIND_ACCEPT: u8 = 3;
pub(crate) const KIND_CLOSE: u8 = 4;
/// Plaintext bytes before the data in a `START` record.
const START_PREFIX: usize = 5;

type Result<T, E = SecureError> = std::result::Result<T, E>;

/// What both halves of a channel share: the keys and the poison.
struct Shared {
    transport: StatelessTransportState,
    failure: Mutex<Option<String>>,
    peer: PublicKey,
    max_message_len: u32,
    io_timeout: Option<Duration>,
}

impl Shared {
    fn check(&self) -> Result<()> {
        match &*self.failure.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(first) => Err(SecureError::Poisoned { first: first.clone() }),
            None => Ok(()),
        }
    }

    fn poison(&self, err: &SecureError) {
        let mut failure = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if failure.is_none() {
            *failure = Some(err.to_string());
        }
    }
}

/// Runs `op`; on an error that leaves the stream in an unknown state, poisons the channel
/// and shuts the stream down.
fn guarded<S: Stream, T>(
    shared: &Shared,
    stream: &mut S,
    op: impl FnOnce(&mut S) -> Result<T>,
) -> Result<T> {
    shared.check()?;
    let result = op(stream);
    if let Err(e) = &result {
        let harmless = matches!(
            e,
            SecureError::Closed
                | SecureError::MessageTooLarge { direction: "outgoing", .. }
                | SecureError::Poisoned { .. }
        );
        if !harmless {
            shared.poison(e);
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
    result
}

/// The sending side's state.
struct Sender {
    next: u64,
    plain: Vec<u8>,
    record: Vec<u8>,
    closed: bool,
}

impl Sender {
    fn new() -> Self {
        Self {
            next: 0,
            plain: Vec::with_capacity(MAX_RECORD_PLAINTEXT),
            record: vec![0; RECORD_HEADER_LEN + MAX_NOISE_MESSAGE],
            closed: false,
        }
    }

    /// Seals `self.plain` as the next record and writes it.
    fn write_record<S: Stream>(
        &mut self,
        shared: &Shared,
        stream: &mut S,
        phase: Phase<'_>,
    ) -> Result<()> {
        if self.next == u64::MAX {
            return Err(SecureError::NonceExhausted);
        }
        let number = self.next;
        let n = shared
            .transport
            .write_message(number, &self.plain, &mut self.record[RECORD_HEADER_LEN..])
            .map_err(|_| SecureError::MalformedRecord {
                record: number,
                reason: format!("could not seal {} bytes", self.plain.len()),
            })?;
        self.record[0..8].copy_from_slice(&number.to_le_bytes());
        self.record[8..10].copy_from_slice(&(n as u16).to_le_bytes());
        self.next += 1;
        write_all(stream, &self.record[..RECORD_HEADER_LEN + n], phase, &|| {
            format!("writing record {number}")
        })
    }

    fn send_message<S: Stream>(
        &mut self,
        shared: &Shared,
        stream: &mut S,
        message: &[u8],
    ) -> Result<()> {
        if self.closed {
            return Err(SecureError::Closed);
        }
        if message.len() as u64 > u64::from(shared.max_message_len) {
            return Err(SecureError::MessageTooLarge {
                direction: "outgoing",
                len: message.len() as u64,
                max: u64::from(shared.max_message_len),
            });
        }
        let phase = Phase::Transport(shared.io_timeout);
        let first = message.len().min(MAX_RECORD_PLAINTEXT - START_PREFIX);
        self.plain.clear();
        self.plain.push(KIND_START);
        self.plain.extend_from_slice(&(message.len() as u32).to_le_bytes());
        self.plain.extend_from_slice(&message[..first]);
        self.write_record(shared, stream, phase)?;
        for chunk in message[first..].chunks(MAX_RECORD_PLAINTEXT - 1) {
            self.plain.clear();
            self.plain.push(KIND_MORE);
            self.plain.extend_from_slice(chunk);
            self.write_record(shared, stream, phase)?;
        }
        Ok(())
    }

    fn send_close<S: Stream>(
        &mut self,
        shared: &Shared,
        stream: &mut S,
        code: CloseCode,
        reason: &str,
        phase: Phase<'_>,
    ) -> Result<()> {
        if self.closed {
            return Err(SecureError::Closed);
        }
        let mut cut = reason.len().min(MAX_CLOSE_REASON);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        let reason: String =
            reason[..cut].chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
        self.plain.clear();
        self.plain.push(KIND_CLOSE);
        self.plain.extend_from_slice(&code.0.to_le_bytes());
        self.plain.extend_from_slice(&(reason.len() as u16).to_le_bytes());
        self.plain.extend_from_slice(reason.as_bytes());
        self.closed = true;
        self.write_record(shared, stream, phase)?;
        let _ = stream.shutdown(Shutdown::Write);
        Ok(())
    }
}

/// A record as received.
enum Record<'a> {
    Start { len: u32, data: &'a [u8] },
    More(&'a [u8]),
    Accept,
    Close { code: CloseCode, reason: String },
}

/// The receiving side's state.
struct Receiver {
    expected: u64,
    cipher: Vec<u8>,
    plain: Vec<u8>,
    closed: bool,
}

impl Receiver {
    fn new() -> Self {
        Self {
            expected: 0,
            cipher: vec![0; MAX_NOISE_MESSAGE],
            plain: vec![0; MAX_NOISE_MESSAGE],
            closed: false,
        }
    }

    /// Reads, checks and opens the next record; `None` at a clean end of stream.
    fn read_record<S: Stream>(
        &mut self,
        shared: &Shared,
        stream: &mut S,
        phase: Phase<'_>,
    ) -> Result<Option<Record<'_>>> {
        let number = self.expected;
        let mut header = [0; RECORD_HEADER_LEN];
        let got = read_full(stream, &mut header, phase, &|| format!("reading record {number}"))?;
        if got == 0 {
            return Ok(None);
        }
        if got < RECORD_HEADER_LEN {
            return Err(SecureError::Truncated {
                what: format!("record {number} header"),
                needed: RECORD_HEADER_LEN as u64,
                found: got as u64,
            });
        }
        let found = u64::from_le_bytes(header[0..8].try_into().expect("8 bytes"));
        if found < number {
            return Err(SecureError::Replayed { record: found, expected: number });
        }
        if found > number {
            return Err(SecureError::OutOfOrder { record: found, expected: number });
        }
        let len = usize::from(u16::from_le_bytes([header[8], header[9]]));
        if len <= TAG_LEN {
            return Err(SecureError::MalformedRecord {
                record: number,
                reason: format!("{len} bytes of ciphertext, at least {} needed", TAG_LEN + 1),
            });
        }
        let got = read_full(stream, &mut self.cipher[..len], phase, &|| {
            format!("reading record {number}")
        })?;
        if got < len {
            return Err(SecureError::Truncated {
                what: format!("record {number}"),
                needed: len as u64,
                found: got as u64,
            });
        }
        let n = shared
            .transport
            .read_message(number, &self.cipher[..len], &mut self.plain)
            .map_err(|_| SecureError::Tampered { record: number })?;
        self.expected += 1;
        parse_record(number, &self.plain[..n]).map(Some)
    }

    /// Receives the next message into `out`; false once the peer closed normally.
    fn recv_message<S: Stream>(
        &mut self,
        shared: &Shared,
        stream: &mut S,
        out: &mut Vec<u8>,
    ) -> Result<bool> {
        if self.closed {
            return Ok(false);
        }
        let phase = Phase::Transport(shared.io_timeout);
        let max = shared.max_message_len;
        let start = self.expected;
        let mut remaining: Option<usize> = None;
        loop {
            let number = self.expected;
            let Some(record) = self.read_record(shared, stream, phase)? else {
                return Err(match remaining {
                    Some(left) => SecureError::Truncated {
                        what: format!("the message starting at record {start}"),
                        needed: (out.len() + left) as u64,
                        found: out.len() as u64,
                    },
                    None => SecureError::UnexpectedEof { after: number },
                });
            };
            let malformed = |reason: &str| SecureError::MalformedRecord {
                record: number,
                reason: reason.to_owned(),
            };
            match (record, remaining) {
                (Record::Start { len, data }, None) => {
                    if len > max {
                        return Err(SecureError::MessageTooLarge {
                            direction: "received",
                            len: u64::from(len),
                            max: u64::from(max),
                        });
                    }
                    let len = len as usize;
                    if data.len() > len {
                        return Err(malformed("the first chunk is longer than its message"));
                    }
                    if data.is_empty() && len > 0 {
                        return Err(malformed("empty chunk"));
                    }
                    out.clear();
                    // Grow with what actually arrives, from at most 1 MiB up front.
                    out.reserve(len.min(1 << 20));
                    out.extend_from_slice(data);
                    if data.len() == len {
                        return Ok(true);
                    }
                    remaining = Some(len - data.len());
                }
                (Record::More(data), Some(left)) => {
                    if data.is_empty() {
                        return Err(malformed("empty chunk"));
                    }
                    if data.len() > left {
                        return Err(malformed("a chunk runs past the end of its message"));
                    }
                    out.extend_from_slice(data);
                    if data.len() == left {
                        return Ok(true);
                    }
                    remaining = Some(left - data.len());
                }
                (Record::Start { .. }, Some(_)) => {
                    return Err(malformed("a message starts before the previous one ended"));
                }
                (Record::More(_), None) => {
                    return Err(malformed("a continuation chunk outside any message"));
                }
                (Record::Close { .. }, Some(_)) => {
                    return Err(malformed("a close notice inside a message"));
                }
                (Record::Close { code, reason }, None) => {
                    self.closed = true;
                    if code == CloseCode::NORMAL {
                        return Ok(false);
                    }
                    return Err(SecureError::ClosedByPeer { code, reason });
                }
                (Record::Accept, _) => {
                    return Err(malformed("a handshake verdict after the handshake"));
                }
            }
        }
    }
}

fn parse_record(number: u64, plain: &[u8]) -> Result<Record<'_>> {
    let malformed = |reason: String| SecureError::MalformedRecord { record: number, reason };
    let Some((&kind, body)) = plain.split_first() else {
        return Err(malformed("empty plaintext".to_owned()));
    };
    match kind {
        KIND_START => {
            if body.len() < START_PREFIX - 1 {
                return Err(malformed(format!(
                    "a start record of {} bytes, at least {START_PREFIX} needed",
                    plain.len()
                )));
            }
            let len = u32::from_le_bytes(body[0..4].try_into().expect("4 bytes"));
            Ok(Record::Start { len, data: &body[4..] })
        }
        KIND_MORE => Ok(Record::More(body)),
        KIND_ACCEPT if body.is_empty() => Ok(Record::Accept),
        KIND_ACCEPT => Err(malformed(format!("{} bytes after an accept verdict", body.len()))),
        KIND_CLOSE => {
            if body.len() < 4 {
                return Err(malformed("a close record without its code and length".to_owned()));
            }
            let code = CloseCode(u16::from_le_bytes([body[0], body[1]]));
            let len = usize::from(u16::from_le_bytes([body[2], body[3]]));
            let text = &body[4..];
            if len != text.len() || len > MAX_CLOSE_REASON {
                return Err(malformed(format!(
                    "a close reason of {} bytes announced as {len} (at most {MAX_CLOSE_REASON})",
                    text.len()
                )));
            }
            let reason = std::str::from_utf8(text)
                .ok()
                .filter(|s| !s.chars().any(char::is_control))
                .ok_or_else(|| {
                    malformed("a close reason that is not printable UTF-8".to_owned())
                })?;
            Ok(Record::Close { code, reason: reason.to_owned() })
        }
        other => Err(malformed(format!(
            "unknown record kind {other} (expected {KIND_START} to {KIND_CLOSE})"
        ))),
    }
}

/// A mutually authenticated, encrypted, message-oriented channel over a byte stream.
pub struct SecureChannel<S: Stream> {
    stream: S,
    shared: Arc<Shared>,
    sender: Sender,
    receiver: Receiver,
}

impl<S: Stream> std::fmt::Debug for SecureChannel<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureChannel")
            .field("peer", &self.shared.peer)
            .field("records_sent", &self.sender.next)
            .field("records_received", &self.receiver.expected)
            .finish_non_exhaustive()
    }
}

impl<S: Stream> SecureChannel<S> {
    /// Opens the channel as the side that connected (the Noise initiator). Fails with
    /// [`SecureError::PeerNotAllowed`] if the responder's key is not allowed (having told
    /// it nothing), or [`SecureError::RefusedByPeer`] if the responder does not allow ours.
    pub fn initiate(stream: S, config: &SecureConfig) -> Result<Self> {
        Self::open(stream, config, true, &HandshakeOptions::default())
    }

    /// Opens the channel as the side that accepted the connection (the Noise responder).
    /// An initiator whose key is not allowed is sent a refusal it can read, and the
    /// stream is closed; this returns [`SecureError::PeerNotAllowed`].
    pub fn accept(stream: S, config: &SecureConfig) -> Result<Self> {
        Self::open(stream, config, false, &HandshakeOptions::default())
    }

    pub(crate) fn open(
        mut stream: S,
        config: &SecureConfig,
        initiator: bool,
        options: &HandshakeOptions,
    ) -> Result<Self> {
        config.validate()?;
        let deadline = Deadline::after(config.handshake_timeout);
        let established = handshake::run(&mut stream, config, initiator, &deadline, options)
            .inspect_err(|_| {
                let _ = stream.shutdown(Shutdown::Both);
            })?;
        let Established { transport, peer } = established;
        let shared = Arc::new(Shared {
            transport,
            failure: Mutex::new(None),
            peer,
            max_message_len: config.max_message_len,
            io_timeout: config.io_timeout,
        });
        let mut channel = Self { stream, shared, sender: Sender::new(), receiver: Receiver::new() };
        let phase = Phase::Handshake(&deadline, "the verdict");
        let verdict = if initiator {
            channel.read_verdict(phase)
        } else if config.allowed_peers.contains(&peer) {
            channel.sender.plain.clear();
            channel.sender.plain.push(KIND_ACCEPT);
            channel.sender.write_record(&channel.shared, &mut channel.stream, phase)
        } else {
            let reason = format!(
                "this node does not allow the key with fingerprint {}; \
                 add its public key to the allowed peers",
                peer.fingerprint()
            );
            let _ = channel.sender.send_close(
                &channel.shared,
                &mut channel.stream,
                CloseCode::PEER_NOT_ALLOWED,
                &reason,
                phase,
            );
            Err(SecureError::PeerNotAllowed { fingerprint: peer.fingerprint(), key: peer })
        };
        if let Err(e) = verdict {
            channel.shared.poison(&e);
            let _ = channel.stream.shutdown(Shutdown::Both);
            return Err(e);
        }
        let timeouts = channel
            .stream
            .set_read_timeout(config.io_timeout)
            .and_then(|()| channel.stream.set_write_timeout(config.io_timeout));
        if let Err(source) = timeouts {
            let _ = channel.stream.shutdown(Shutdown::Both);
            return Err(SecureError::Io { op: "setting the I/O timeouts".to_owned(), source });
        }
        Ok(channel)
    }

    fn read_verdict(&mut self, phase: Phase<'_>) -> Result<()> {
        match self.receiver.read_record(&self.shared, &mut self.stream, phase)? {
            Some(Record::Accept) => Ok(()),
            Some(Record::Close { code, reason }) => {
                Err(SecureError::RefusedByPeer { code, reason })
            }
            Some(_) => Err(SecureError::MalformedRecord {
                record: 0,
                reason: "expected the responder's verdict (accept or close)".to_owned(),
            }),
            None => Err(SecureError::HandshakeClosed { step: "the verdict", hint: "" }),
        }
    }

    /// The peer's static public key (allowed, by construction).
    pub fn peer(&self) -> &PublicKey {
        &self.shared.peer
    }

    /// The maximum message length, both ways.
    pub fn max_message_len(&self) -> u32 {
        self.shared.max_message_len
    }

    /// Records sent so far (the next record's number).
    pub fn records_sent(&self) -> u64 {
        self.sender.next
    }

    /// Records received so far (the next expected record's number).
    pub fn records_received(&self) -> u64 {
        self.receiver.expected
    }

    /// Sends one message (at most the maximum message length).
    pub fn send(&mut self, message: &[u8]) -> Result<()> {
        let Self { stream, shared, sender, .. } = self;
        guarded(shared, stream, |s| sender.send_message(shared, s, message))
    }

    /// Receives the next message into `out` (its previous content is replaced). False
    /// once the peer has closed the channel normally.
    pub fn recv_into(&mut self, out: &mut Vec<u8>) -> Result<bool> {
        let Self { stream, shared, receiver, .. } = self;
        guarded(shared, stream, |s| receiver.recv_message(shared, s, out))
    }

    /// Receives the next message; `None` once the peer has closed the channel normally.
    pub fn recv(&mut self) -> Result<Option<Vec<u8>>> {
        let mut out = Vec::new();
        Ok(self.recv_into(&mut out)?.then_some(out))
    }

    /// Closes the channel normally: the peer's next receive returns "closed" once it has
    /// read everything sent before.
    pub fn close(&mut self) -> Result<()> {
        self.close_with(CloseCode::NORMAL, "")
    }

    /// Closes the channel with a code and a reason the peer will report.
    pub fn close_with(&mut self, code: CloseCode, reason: &str) -> Result<()> {
        let Self { stream, shared, sender, .. } = self;
        let phase = Phase::Transport(shared.io_timeout);
        guarded(shared, stream, |s| sender.send_close(shared, s, code, reason, phase))
    }

    /// Splits the channel into a receiving and a sending half, usable from two threads.
    /// A failure on either half poisons both.
    pub fn split(self) -> Result<(SecureReceiver<S>, SecureSender<S>)> {
        let other = self
            .stream
            .try_clone()
            .map_err(|source| SecureError::Io { op: "cloning the stream".to_owned(), source })?;
        Ok((
            SecureReceiver {
                stream: self.stream,
                shared: self.shared.clone(),
                receiver: self.receiver,
            },
            SecureSender { stream: other, shared: self.shared, sender: self.sender },
        ))
    }
}

/// The receiving half of a split [`SecureChannel`].
pub struct SecureReceiver<S: Stream> {
    stream: S,
    shared: Arc<Shared>,
    receiver: Receiver,
}

impl<S: Stream> std::fmt::Debug for SecureReceiver<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureReceiver")
            .field("peer", &self.shared.peer)
            .field("records_received", &self.receiver.expected)
            .finish_non_exhaustive()
    }
}

impl<S: Stream> SecureReceiver<S> {
    /// See [`SecureChannel::recv_into`].
    pub fn recv_into(&mut self, out: &mut Vec<u8>) -> Result<bool> {
        let Self { stream, shared, receiver } = self;
        guarded(shared, stream, |s| receiver.recv_message(shared, s, out))
    }

    /// See [`SecureChannel::recv`].
    pub fn recv(&mut self) -> Result<Option<Vec<u8>>> {
        let mut out = Vec::new();
        Ok(self.recv_into(&mut out)?.then_some(out))
    }

    /// The peer's static public key.
    pub fn peer(&self) -> &PublicKey {
        &self.shared.peer
    }
}

/// The sending half of a split [`SecureChannel`].
pub struct SecureSender<S: Stream> {
    stream: S,
    shared: Arc<Shared>,
    sender: Sender,
}

impl<S: Stream> std::fmt::Debug for SecureSender<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureSender")
            .field("peer", &self.shared.peer)
            .field("records_sent", &self.sender.next)
            .finish_non_exhaustive()
    }
}

impl<S: Stream> SecureSender<S> {
    /// See [`SecureChannel::send`].
    pub fn send(&mut self, message: &[u8]) -> Result<()> {
        let Self { stream, shared, sender } = self;
        guarded(shared, stream, |s| sender.send_message(shared, s, message))
    }

    /// See [`SecureChannel::close`].
    pub fn close(&mut self) -> Result<()> {
        self.close_with(CloseCode::NORMAL, "")
    }

    /// See [`SecureChannel::close_with`].
    pub fn close_with(&mut self, code: CloseCode, reason: &str) -> Result<()> {
        let Self { stream, shared, sender } = self;
        let phase = Phase::Transport(shared.io_timeout);
        guarded(shared, stream, |s| sender.send_close(shared, s, code, reason, phase))
    }
}
