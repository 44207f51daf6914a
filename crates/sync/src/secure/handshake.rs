//! The opening of a secure channel: the preamble exchange (transport version
//! negotiation), then the Noise `XX` handshake, with each side checking the other's static
//! key against its allowed peers.
//!
//! ```text
//! initiator                                   responder
//!   preamble (12 bytes, clear)  ->        <-  preamble (12 bytes, clear)   (both at once)
//!   message 1: e                ->
//!                               <-  message 2: e, ee, s, es
//!   (checks the responder's key; closes without a word if not allowed)
//!   message 3: s, se            ->
//!                                   (checks the initiator's key)
//!                               <-  record 0: accept, or close "peer not allowed"
//! ```
//!
//! Both preambles go into the Noise prologue, so an attacker who alters one (to force an
//! older version, say) makes message 2 fail to authenticate. A version mismatch is seen by
//! both sides from the preambles alone, before any Noise message, and reported as
//! [`SecureError::VersionMismatch`].
//!
//! Invariants: the handshake finishes or fails within `handshake_timeout` whatever the peer
//! does; every handshake message has one valid length, checked before it is read; an
//! initiator never reveals its static key to a responder it does not allow.

use std::net::Shutdown;

use snow::StatelessTransportState;

use super::keys::{KEY_LEN, PublicKey};
use super::stream::{Deadline, Phase, Stream, read_full, read_some, write_all};
use super::{SecureConfig, SecureError};
use crate::wire::VersionRange;

/// The Noise protocol: XX pattern, X25519, AES-256-GCM, SHA-256.
pub const NOISE_PARAMS: &str = "Noise_XX_25519_AESGCM_SHA256";
/// Magic at the start of each preamble.
pub const PREAMBLE_MAGIC: [u8; 8] = *b"TIDEMARK";
/// Length of a preamble: magic, oldest and newest transport version (u16 each).
pub const PREAMBLE_LEN: usize = 12;
/// The transport version this build speaks.
pub const TRANSPORT_VERSION: u16 = 1;
/// The transport versions this build can negotiate.
pub const SUPPORTED_TRANSPORT: VersionRange = VersionRange::single(TRANSPORT_VERSION);
/// What the Noise prologue starts with; both preambles follow it.
pub const PROLOGUE_LABEL: &[u8] = b"Tidemark secure channel";
/// Lengths of the three Noise messages (empty payloads, X25519, 16-byte tags).
pub const MESSAGE_1_LEN: usize = KEY_LEN;
/// See [`MESSAGE_1_LEN`].
pub const MESSAGE_2_LEN: usize = KEY_LEN + (KEY_LEN + 16) + 16;
/// See [`MESSAGE_1_LEN`].
pub const MESSAGE_3_LEN: usize = (KEY_LEN + 16) + 16;

const STEP_PREAMBLE: &str = "the preamble";
const STEP_1: &str = "handshake message 1";
const STEP_2: &str = "handshake message 2";
const STEP_3: &str = "handshake message 3";

/// Options the production API never changes; the fuzz harness and tests do.
#[derive(Debug, Clone)]
pub(crate) struct HandshakeOptions {
    /// A fixed ephemeral key, so that a recorded transcript replays (fuzzing only).
    pub(crate) fixed_ephemeral: Option<[u8; KEY_LEN]>,
    /// The transport versions announced.
    pub(crate) versions: VersionRange,
}

impl Default for HandshakeOptions {
    fn default() -> Self {
        Self { fixed_ephemeral: None, versions: SUPPORTED_TRANSPORT }
    }
}

/// The outcome of the Noise part of the handshake.
pub(crate) struct Established {
    pub(crate) transport: StatelessTransportState,
    pub(crate) peer: PublicKey,
}

fn encode_preamble(versions: VersionRange) -> [u8; PREAMBLE_LEN] {
    let mut p = [0; PREAMBLE_LEN];
    p[0..8].copy_from_slice(&PREAMBLE_MAGIC);
    p[8..10].copy_from_slice(&versions.min.to_le_bytes());
    p[10..12].copy_from_slice(&versions.max.to_le_bytes());
    p
}

/// Reads the peer's preamble, failing as soon as a byte departs from the magic (so a peer
/// speaking another protocol is told at once, not at the timeout).
fn read_preamble<S: Stream>(
    stream: &mut S,
    deadline: &Deadline,
) -> Result<[u8; PREAMBLE_LEN], SecureError> {
    let mut p = [0; PREAMBLE_LEN];
    let mut filled = 0;
    let op = || "reading the peer's preamble".to_owned();
    while filled < PREAMBLE_LEN {
        let n =
            read_some(stream, &mut p[filled..], Phase::Handshake(deadline, STEP_PREAMBLE), &op)?;
        if n == 0 {
            return Err(SecureError::HandshakeClosed {
                step: STEP_PREAMBLE,
                hint: " (the peer may not be a Tidemark node)",
            });
        }
        filled += n;
        let magic_seen = filled.min(PREAMBLE_MAGIC.len());
        if p[..magic_seen] != PREAMBLE_MAGIC[..magic_seen] {
            return Err(SecureError::NotTidemark {
                found: p[..filled].to_vec(),
                expected: PREAMBLE_MAGIC,
            });
        }
    }
    Ok(p)
}

/// The version both sides use, from the peer's preamble.
fn negotiate(ours: VersionRange, theirs: &[u8; PREAMBLE_LEN]) -> Result<u16, SecureError> {
    let theirs = VersionRange {
        min: u16::from_le_bytes([theirs[8], theirs[9]]),
        max: u16::from_le_bytes([theirs[10], theirs[11]]),
    };
    if theirs.min == 0 || theirs.min > theirs.max {
        return Err(SecureError::InvalidPreamble {
            field: "versions",
            found: format!("{}..={}", theirs.min, theirs.max),
            expected: "1 <= min <= max".to_owned(),
        });
    }
    ours.negotiate(theirs).map_err(|_| SecureError::VersionMismatch { ours, theirs })
}

fn write_message<S: Stream>(
    stream: &mut S,
    deadline: &Deadline,
    step: &'static str,
    message: &[u8],
) -> Result<(), SecureError> {
    let mut framed = Vec::with_capacity(2 + message.len());
    framed.extend_from_slice(&(message.len() as u16).to_le_bytes());
    framed.extend_from_slice(message);
    write_all(stream, &framed, Phase::Handshake(deadline, step), &|| format!("writing {step}"))
}

fn read_message<S: Stream>(
    stream: &mut S,
    deadline: &Deadline,
    step: &'static str,
    expected: usize,
    hint: &'static str,
) -> Result<Vec<u8>, SecureError> {
    let phase = Phase::Handshake(deadline, step);
    let op = || format!("reading {step}");
    let closed = || SecureError::HandshakeClosed { step, hint };
    let mut len = [0; 2];
    if read_full(stream, &mut len, phase, &op)? < 2 {
        return Err(closed());
    }
    let len = usize::from(u16::from_le_bytes(len));
    if len != expected {
        return Err(SecureError::HandshakeMessageLength { step, found: len, expected });
    }
    let mut message = vec![0; len];
    if read_full(stream, &mut message, phase, &op)? < len {
        return Err(closed());
    }
    Ok(message)
}

fn noise_err(step: &'static str) -> impl Fn(snow::Error) -> SecureError {
    move |source| SecureError::Handshake { step, source }
}

fn peer_key(hs: &snow::HandshakeState, step: &'static str) -> Result<PublicKey, SecureError> {
    let rs = hs
        .get_remote_static()
        .ok_or(SecureError::Handshake { step, source: snow::Error::Input })?;
    let mut key = [0; KEY_LEN];
    key.copy_from_slice(rs);
    Ok(PublicKey(key))
}

/// Runs the preamble exchange and the Noise handshake. The initiator checks the
/// responder's key here; the responder's check, and its verdict, are the caller's (they
/// need the transport keys).
pub(crate) fn run<S: Stream>(
    stream: &mut S,
    config: &SecureConfig,
    initiator: bool,
    deadline: &Deadline,
    options: &HandshakeOptions,
) -> Result<Established, SecureError> {
    let ours = encode_preamble(options.versions);
    write_all(stream, &ours, Phase::Handshake(deadline, STEP_PREAMBLE), &|| {
        "writing the preamble".to_owned()
    })?;
    let theirs = read_preamble(stream, deadline)?;
    negotiate(options.versions, &theirs)?;

    let mut prologue = Vec::with_capacity(PROLOGUE_LABEL.len() + 2 * PREAMBLE_LEN);
    prologue.extend_from_slice(PROLOGUE_LABEL);
    let (first, second) = if initiator { (&ours, &theirs) } else { (&theirs, &ours) };
    prologue.extend_from_slice(first);
    prologue.extend_from_slice(second);

    let params = NOISE_PARAMS.parse().expect("the Noise parameters are valid");
    let mut builder = snow::Builder::new(params)
        .local_private_key(config.keypair.secret())
        .and_then(|b| b.prologue(&prologue))
        .map_err(noise_err("setup"))?;
    if let Some(e) = &options.fixed_ephemeral {
        builder = builder.fixed_ephemeral_key_for_testing_only(e);
    }
    let mut hs = if initiator { builder.build_initiator() } else { builder.build_responder() }
        .map_err(noise_err("setup"))?;

    let mut buf = [0u8; MESSAGE_2_LEN];
    let mut payload = [0u8; MESSAGE_2_LEN];
    let peer = if initiator {
        let n = hs.write_message(&[], &mut buf).map_err(noise_err(STEP_1))?;
        write_message(stream, deadline, STEP_1, &buf[..n])?;
        let m2 = read_message(stream, deadline, STEP_2, MESSAGE_2_LEN, "")?;
        let n = hs.read_message(&m2, &mut payload).map_err(noise_err(STEP_2))?;
        check_empty_payload(STEP_2, n)?;
        let peer = peer_key(&hs, STEP_2)?;
        if !config.allowed_peers.contains(&peer) {
            // Not a word more: the responder learns nothing of this node's identity.
            let _ = stream.shutdown(Shutdown::Both);
            return Err(SecureError::PeerNotAllowed { fingerprint: peer.fingerprint(), key: peer });
        }
        let n = hs.write_message(&[], &mut buf).map_err(noise_err(STEP_3))?;
        write_message(stream, deadline, STEP_3, &buf[..n])?;
        peer
    } else {
        let m1 = read_message(stream, deadline, STEP_1, MESSAGE_1_LEN, "")?;
        let n = hs.read_message(&m1, &mut payload).map_err(noise_err(STEP_1))?;
        check_empty_payload(STEP_1, n)?;
        let n = hs.write_message(&[], &mut buf).map_err(noise_err(STEP_2))?;
        write_message(stream, deadline, STEP_2, &buf[..n])?;
        let m3 = read_message(
            stream,
            deadline,
            STEP_3,
            MESSAGE_3_LEN,
            " (after seeing this node's key: the peer may not have it in its allowed peers)",
        )?;
        let n = hs.read_message(&m3, &mut payload).map_err(noise_err(STEP_3))?;
        check_empty_payload(STEP_3, n)?;
        peer_key(&hs, STEP_3)?
    };
    let transport = hs.into_stateless_transport_mode().map_err(noise_err("split"))?;
    Ok(Established { transport, peer })
}

fn check_empty_payload(step: &'static str, n: usize) -> Result<(), SecureError> {
    if n != 0 {
        // Unreachable with the exact lengths checked above; kept so a future change to the
        // lengths cannot let a payload through unread.
        return Err(SecureError::HandshakeMessageLength { step, found: n, expected: 0 });
    }
    Ok(())
}
