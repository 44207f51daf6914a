//! The secure channel: a mutually authenticated, encrypted, message-oriented connection
//! over any [`Stream`] (TCP in production, [`crate::pipe`] in tests).
//!
//! - [`handshake`]: a clear 12-byte preamble each way (magic `TIDEMARK`, transport version
//!   range), then Noise `Noise_XX_25519_AESGCM_SHA256` with static keys on both sides; each
//!   side checks the other's static key against its [`AllowedPeers`]. The responder ends
//!   the handshake with a verdict record: accept, or a refusal the initiator can read.
//! - [`channel`]: the record layer (sealed records of at most 65535 bytes, numbered by their
//!   Noise nonce, messages chunked across them) and [`SecureChannel`], which can be split
//!   into a [`SecureReceiver`] and a [`SecureSender`] for two threads.
//! - [`keys`]: [`Keypair`] generation and files, [`PublicKey`] text form, [`Fingerprint`],
//!   [`AllowedPeers`].
//! - [`stream`]: the [`Stream`] trait and the deadline-bounded I/O.
//!
//! Why `XX` and not `IK`: both sides know each other's key ahead (the pairing), so `IK`
//! would save half a round trip on a connection that lives for hours. `XX` instead gives
//! every handshake payload forward secrecy, never lets a responder learn the initiator's
//! identity unless the initiator first accepted the responder's key, does not make the
//! initiator pick one responder key before connecting (a source may fail over between
//! targets), and needs no replay protection for a first message. The cost is one more
//! message.
//!
//! Timeouts (slow-loris protection): the whole handshake, verdict included, must finish
//! within [`SecureConfig::handshake_timeout`]: each read and write of the handshake is given
//! only the time left as its socket timeout. After it, [`SecureConfig::io_timeout`] bounds
//! each read and write (set with `set_read_timeout`/`set_write_timeout` on a `TcpStream`);
//! a connection that must stay quiet longer keeps itself alive with `Ping`s. Every handshake
//! message has a fixed length, checked before it is read, and a received message's
//! announced length is checked against [`SecureConfig::max_message_len`] before anything is
//! buffered.

pub mod channel;
mod error;
pub mod handshake;
pub mod keys;
pub mod stream;

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use channel::{SecureChannel, SecureReceiver, SecureSender};
pub use error::SecureError;
pub use keys::{AllowedPeer, AllowedPeers, Fingerprint, Keypair, PublicKey};
pub use stream::Stream;

use crate::wire::{DEFAULT_MAX_FRAME_LEN, MAX_FRAME_LEN_CEILING};
use handshake::HandshakeOptions;

/// Why a channel was closed, as its `CLOSE` record says. An open set, so that a newer
/// peer's codes still decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// A normal end: everything sent was meant to be sent.
    pub const NORMAL: Self = Self(0);
    /// The responder does not allow the initiator's static key.
    pub const PEER_NOT_ALLOWED: Self = Self(1);
    /// The peer broke the protocol above the channel.
    pub const PROTOCOL_VIOLATION: Self = Self(2);
    /// The node is shutting down.
    pub const SHUTTING_DOWN: Self = Self(3);

    /// The code's name, or `None` for a code this build does not know.
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            Self::NORMAL => "normal close",
            Self::PEER_NOT_ALLOWED => "peer not allowed",
            Self::PROTOCOL_VIOLATION => "protocol violation",
            Self::SHUTTING_DOWN => "shutting down",
            _ => return None,
        })
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name} ({})", self.0),
            None => write!(f, "close code {}", self.0),
        }
    }
}

/// How a node opens secure channels.
#[derive(Debug, Clone)]
pub struct SecureConfig {
    /// This node's static key pair.
    pub keypair: Keypair,
    /// The static keys this node talks to; anyone else is refused.
    pub allowed_peers: AllowedPeers,
    /// The longest message sent or accepted, in bytes (the wire's maximum frame length):
    /// 1 to 256 MiB.
    pub max_message_len: u32,
    /// The whole handshake must be over within this time.
    pub handshake_timeout: Duration,
    /// After the handshake, the longest a read or write may block (`None`: forever).
    pub io_timeout: Option<Duration>,
}

impl SecureConfig {
    /// Default handshake timeout.
    pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    /// Default I/O timeout after the handshake.
    pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(60);

    /// A configuration with the default limits.
    pub fn new(keypair: Keypair, allowed_peers: AllowedPeers) -> Self {
        Self {
            keypair,
            allowed_peers,
            max_message_len: DEFAULT_MAX_FRAME_LEN,
            handshake_timeout: Self::DEFAULT_HANDSHAKE_TIMEOUT,
            io_timeout: Some(Self::DEFAULT_IO_TIMEOUT),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), SecureError> {
        if !(1..=MAX_FRAME_LEN_CEILING).contains(&self.max_message_len) {
            return Err(SecureError::InvalidConfig {
                field: "max_message_len",
                found: self.max_message_len.to_string(),
                expected: format!("1 to {MAX_FRAME_LEN_CEILING}"),
            });
        }
        if self.handshake_timeout.is_zero() {
            return Err(SecureError::InvalidConfig {
                field: "handshake_timeout",
                found: "0".to_owned(),
                expected: "more than zero".to_owned(),
            });
        }
        if self.io_timeout.is_some_and(|t| t.is_zero()) {
            return Err(SecureError::InvalidConfig {
                field: "io_timeout",
                found: "0".to_owned(),
                expected: "more than zero, or none".to_owned(),
            });
        }
        Ok(())
    }
}

/// Connects to `addr` (within the handshake timeout), turns Nagle's algorithm off (records
/// are written whole; an `Ack` must not wait), and opens a channel as the initiator.
pub fn connect_tcp(
    addr: impl ToSocketAddrs,
    config: &SecureConfig,
) -> Result<SecureChannel<TcpStream>, SecureError> {
    let io_err = |op: &str| {
        let op = op.to_owned();
        move |source| SecureError::Io { op, source }
    };
    let mut last = None;
    for a in addr.to_socket_addrs().map_err(io_err("resolving the peer address"))? {
        match TcpStream::connect_timeout(&a, config.handshake_timeout) {
            Ok(stream) => {
                stream.set_nodelay(true).map_err(io_err("setting TCP_NODELAY"))?;
                return SecureChannel::initiate(stream, config);
            }
            Err(e) => last = Some((a, e)),
        }
    }
    Err(match last {
        Some((a, source)) => SecureError::Io { op: format!("connecting to {a}"), source },
        None => SecureError::Io {
            op: "resolving the peer address".to_owned(),
            source: io::Error::new(io::ErrorKind::NotFound, "no address"),
        },
    })
}

/// Turns Nagle's algorithm off on an accepted connection and opens a channel on it as the
/// responder.
pub fn accept_tcp(
    stream: TcpStream,
    config: &SecureConfig,
) -> Result<SecureChannel<TcpStream>, SecureError> {
    stream
        .set_nodelay(true)
        .map_err(|source| SecureError::Io { op: "setting TCP_NODELAY".to_owned(), source })?;
    SecureChannel::accept(stream, config)
}

// ---- Fuzzing ----

/// Static and ephemeral keys of the fuzz harness: fixed, so recorded transcripts replay.
const FUZZ_INITIATOR_SECRET: [u8; 32] = [0x11; 32];
const FUZZ_RESPONDER_SECRET: [u8; 32] = [0x22; 32];
const FUZZ_STRANGER_SECRET: [u8; 32] = [0x33; 32];
const FUZZ_INITIATOR_EPHEMERAL: [u8; 32] = [0x44; 32];
const FUZZ_RESPONDER_EPHEMERAL: [u8; 32] = [0x55; 32];

fn fuzz_config(me: [u8; 32], peer: [u8; 32]) -> SecureConfig {
    let peer = *Keypair::from_secret(peer).public();
    SecureConfig {
        keypair: Keypair::from_secret(me),
        allowed_peers: AllowedPeers::from_keys([peer]),
        max_message_len: 256 << 10,
        handshake_timeout: Duration::from_secs(5),
        io_timeout: None,
    }
}

/// Fuzz entry point (`fuzz/fuzz_targets/handshake.rs`). The first byte picks the side
/// played by this node (even: responder, odd: initiator); the rest is everything the peer
/// sends: preamble, handshake messages, then records. A transcript recorded with the
/// harness's fixed keys (see [`fuzz_handshake_seeds`]) completes the handshake, so mutations
/// of it reach the record layer. Never panics.
pub fn fuzz_handshake(data: &[u8]) {
    let Some((&mode, input)) = data.split_first() else {
        return;
    };
    let initiator = mode & 1 == 1;
    let (config, ephemeral) = if initiator {
        (fuzz_config(FUZZ_INITIATOR_SECRET, FUZZ_RESPONDER_SECRET), FUZZ_INITIATOR_EPHEMERAL)
    } else {
        (fuzz_config(FUZZ_RESPONDER_SECRET, FUZZ_INITIATOR_SECRET), FUZZ_RESPONDER_EPHEMERAL)
    };
    let options = HandshakeOptions { fixed_ephemeral: Some(ephemeral), ..Default::default() };
    let stream = stream::ScriptedStream::new(input);
    let Ok(mut channel) = SecureChannel::open(stream, &config, initiator, &options) else {
        return;
    };
    let mut message = Vec::new();
    for _ in 0..64 {
        match channel.recv_into(&mut message) {
            Ok(true) => {}
            Ok(false) | Err(_) => break,
        }
    }
    let _ = channel.send(b"fuzz reply");
}

/// A stream that records what it writes (for the seed transcripts).
struct Recorder<S> {
    inner: S,
    written: Arc<Mutex<Vec<u8>>>,
}

impl<S: Read> Read for Recorder<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl<S: Write> Write for Recorder<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<S: Stream> Stream for Recorder<S> {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.inner.set_read_timeout(t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.inner.set_write_timeout(t)
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.inner.shutdown(how)
    }
    fn try_clone(&self) -> io::Result<Self> {
        Ok(Self { inner: self.inner.try_clone()?, written: self.written.clone() })
    }
}

/// Records a session between the harness's two keys: returns what the initiator sent and
/// what the responder sent. `initiator_secret` other than the harness's makes a stranger
/// the responder refuses.
fn record_session(initiator_secret: [u8; 32], messages: &[Vec<u8>]) -> (Vec<u8>, Vec<u8>) {
    let (a, b) = crate::pipe::duplex(1 << 20);
    let sent_by_initiator = Arc::new(Mutex::new(Vec::new()));
    let sent_by_responder = Arc::new(Mutex::new(Vec::new()));
    let a = Recorder { inner: a, written: sent_by_initiator.clone() };
    let b = Recorder { inner: b, written: sent_by_responder.clone() };
    let replies: Vec<Vec<u8>> =
        messages.iter().map(|m| m.iter().rev().copied().collect()).collect();
    let responder = std::thread::spawn(move || {
        let config = fuzz_config(FUZZ_RESPONDER_SECRET, FUZZ_INITIATOR_SECRET);
        let options = HandshakeOptions {
            fixed_ephemeral: Some(FUZZ_RESPONDER_EPHEMERAL),
            ..Default::default()
        };
        let Ok(mut channel) = SecureChannel::open(b, &config, false, &options) else {
            return;
        };
        for reply in &replies {
            let _ = channel.recv();
            let _ = channel.send(reply);
        }
        let _ = channel.close();
        // Wait for the initiator's close, so that it is written before this end goes away.
        let _ = channel.recv();
    });
    let mut config = fuzz_config(initiator_secret, FUZZ_RESPONDER_SECRET);
    config.keypair = Keypair::from_secret(initiator_secret);
    let options =
        HandshakeOptions { fixed_ephemeral: Some(FUZZ_INITIATOR_EPHEMERAL), ..Default::default() };
    if let Ok(mut channel) = SecureChannel::open(a, &config, true, &options) {
        for m in messages {
            let _ = channel.send(m);
            let _ = channel.recv();
        }
        let _ = channel.recv();
        let _ = channel.close();
    }
    responder.join().expect("the recording responder does not panic");
    let i = sent_by_initiator.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let r = sent_by_responder.lock().unwrap_or_else(|e| e.into_inner()).clone();
    (i, r)
}

/// Seed inputs for the `handshake` fuzz target: recorded sessions from both sides, a
/// refused stranger, a version mismatch, another protocol's bytes, and truncated and
/// altered variants. Each is `(name, bytes)`.
pub fn fuzz_handshake_seeds() -> Vec<(String, Vec<u8>)> {
    let small = vec![b"hello".to_vec(), vec![0x5a; 300]];
    let chunked = vec![(0..70_000u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>()];
    let mut seeds = Vec::new();
    let with_mode = |mode: u8, bytes: &[u8]| {
        let mut v = vec![mode];
        v.extend_from_slice(bytes);
        v
    };
    for (name, messages) in [("small", &small), ("chunked", &chunked)] {
        let (i2r, r2i) = record_session(FUZZ_INITIATOR_SECRET, messages);
        seeds.push((format!("responder-{name}"), with_mode(0, &i2r)));
        seeds.push((format!("initiator-{name}"), with_mode(1, &r2i)));
        if name == "small" {
            for (side, mode, bytes) in [("responder", 0, &i2r), ("initiator", 1, &r2i)] {
                for cut in [5, 12, 20, 60, bytes.len() - 30] {
                    seeds.push((format!("{side}-cut-{cut}"), with_mode(mode, &bytes[..cut])));
                }
                let mut flipped = bytes.clone();
                let at = flipped.len() - 40;
                flipped[at] ^= 0x01;
                seeds.push((format!("{side}-flipped"), with_mode(mode, &flipped)));
            }
        }
    }
    let (stranger, _) = record_session(FUZZ_STRANGER_SECRET, &small);
    seeds.push(("responder-stranger".to_owned(), with_mode(0, &stranger)));
    let mut future = handshake::PREAMBLE_MAGIC.to_vec();
    future.extend_from_slice(&[2, 0, 3, 0]);
    seeds.push(("initiator-version-mismatch".to_owned(), with_mode(1, &future)));
    seeds.push(("responder-http".to_owned(), with_mode(0, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")));
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_transcripts_complete_the_handshake_in_the_harness() {
        // The seeds only reach the record layer if the harness can replay them.
        for (name, seed) in fuzz_handshake_seeds() {
            fuzz_handshake(&seed);
            if name == "responder-small" || name == "initiator-chunked" {
                let initiator = seed[0] & 1 == 1;
                let (config, ephemeral) = if initiator {
                    (
                        fuzz_config(FUZZ_INITIATOR_SECRET, FUZZ_RESPONDER_SECRET),
                        FUZZ_INITIATOR_EPHEMERAL,
                    )
                } else {
                    (
                        fuzz_config(FUZZ_RESPONDER_SECRET, FUZZ_INITIATOR_SECRET),
                        FUZZ_RESPONDER_EPHEMERAL,
                    )
                };
                let options =
                    HandshakeOptions { fixed_ephemeral: Some(ephemeral), ..Default::default() };
                let stream = stream::ScriptedStream::new(&seed[1..]);
                let mut channel = SecureChannel::open(stream, &config, initiator, &options)
                    .unwrap_or_else(|e| panic!("seed {name}: {e}"));
                let mut got = 0;
                while channel.recv().unwrap_or_else(|e| panic!("seed {name}: {e}")).is_some() {
                    got += 1;
                }
                assert!(got >= 1, "seed {name} carries messages");
            }
        }
    }
}
