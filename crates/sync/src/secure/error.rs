//! The secure channel's error type, key files included.
//!
//! Every variant names what it concerns: the handshake step, the record number (the Noise
//! nonce, counted from 0 in each direction), the key file. A failure after the handshake
//! poisons the channel: the first error is returned once, and every later call returns
//! [`SecureError::Poisoned`] quoting it.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use super::CloseCode;
use super::keys::{Fingerprint, PublicKey};
use crate::wire::VersionRange;

/// What went wrong in the secure channel or with a key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecureError {
    /// Reading from or writing to the byte stream failed.
    #[error("{op} failed")]
    Io {
        /// What was being done (`reading handshake message 2`, `writing record 7`, ...).
        op: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The peer's first bytes are not a Tidemark preamble: it speaks another protocol.
    #[error(
        "the peer is not a Tidemark node: its first bytes are {found:02x?}, expected the magic {expected:02x?}"
    )]
    NotTidemark {
        /// The bytes found where the magic should be.
        found: Vec<u8>,
        /// The preamble magic, `TIDEMARK`.
        expected: [u8; 8],
    },
    /// The two nodes have no transport version in common.
    #[error("transport version mismatch: this node speaks {ours}, the peer speaks {theirs}")]
    VersionMismatch {
        /// The transport versions this build speaks.
        ours: VersionRange,
        /// The transport versions the peer announced.
        theirs: VersionRange,
    },
    /// A field of the peer's preamble is invalid (in a version this build speaks).
    #[error("preamble: field {field} is {found}, expected {expected}")]
    InvalidPreamble {
        /// The field name as in the spec.
        field: &'static str,
        /// The value found.
        found: String,
        /// What a valid value looks like.
        expected: String,
    },
    /// The handshake did not finish within the configured time (a slow or stalled peer).
    #[error("handshake timed out at {step} (limit {limit:?})")]
    HandshakeTimeout {
        /// The step waited on.
        step: &'static str,
        /// The configured handshake timeout.
        limit: Duration,
    },
    /// The peer closed the connection during the handshake.
    #[error("the peer closed the connection during the handshake, at {step}{hint}")]
    HandshakeClosed {
        /// The step waited on.
        step: &'static str,
        /// What that usually means, with a leading separator, or empty.
        hint: &'static str,
    },
    /// A handshake message has the wrong length (refused before reading it).
    #[error("{step}: length {found}, expected {expected}")]
    HandshakeMessageLength {
        /// The handshake message.
        step: &'static str,
        /// The length announced.
        found: usize,
        /// The only valid length in this transport version.
        expected: usize,
    },
    /// The Noise handshake itself failed: a message did not authenticate (altered in
    /// transit, a tampered preamble, or a peer with another Noise configuration).
    #[error("Noise handshake failed at {step}: {source}")]
    Handshake {
        /// The handshake message being processed.
        step: &'static str,
        /// The Noise error.
        #[source]
        source: snow::Error,
    },
    /// The peer's static key is not in this node's allowed peers. Nothing was sent to it
    /// but a refusal (by a responder) or nothing at all (by an initiator).
    #[error("peer key {fingerprint} ({key}) is not in the allowed peers")]
    PeerNotAllowed {
        /// The peer key's fingerprint, for comparison with `tidemark keygen` output.
        fingerprint: Fingerprint,
        /// The peer's public key.
        key: PublicKey,
    },
    /// The peer refused this node at the end of the handshake.
    #[error("the peer refused the connection: {code}: {reason}")]
    RefusedByPeer {
        /// Why, as a code.
        code: CloseCode,
        /// Why, in the peer's words.
        reason: String,
    },
    /// The peer closed the channel with an error code.
    #[error("the peer closed the channel: {code}: {reason}")]
    ClosedByPeer {
        /// Why, as a code.
        code: CloseCode,
        /// Why, in the peer's words.
        reason: String,
    },
    /// A record arrived with a number already received: a replay.
    #[error("record {record} replayed: the next record expected is {expected}")]
    Replayed {
        /// The record number found.
        record: u64,
        /// The record number expected.
        expected: u64,
    },
    /// A record arrived with a number ahead of the next expected one: records were
    /// dropped or reordered.
    #[error(
        "record {record} out of order: the next record expected is {expected} (records dropped or reordered)"
    )]
    OutOfOrder {
        /// The record number found.
        record: u64,
        /// The record number expected.
        expected: u64,
    },
    /// A record failed AES-GCM authentication: it was altered in transit (or belongs to
    /// another session).
    #[error("record {record} failed authentication: tampered in transit")]
    Tampered {
        /// The record number.
        record: u64,
    },
    /// The stream ended inside a record or a chunked message.
    #[error("stream truncated in {what}: {needed} bytes needed, {found} received")]
    Truncated {
        /// Where (`record 5`, `record 5 header`, `message starting at record 3`).
        what: String,
        /// Bytes needed.
        needed: u64,
        /// Bytes received.
        found: u64,
    },
    /// The stream ended between records without the peer's close notice: it was cut.
    #[error("stream ended after record {after} without a close notice (truncated)")]
    UnexpectedEof {
        /// The number of records received so far.
        after: u64,
    },
    /// A record decrypted but does not follow the record layout or the chunking rules.
    #[error("record {record} is malformed: {reason}")]
    MalformedRecord {
        /// The record number.
        record: u64,
        /// What rule it breaks.
        reason: String,
    },
    /// A message is longer than the configured maximum; refused before any of it is
    /// buffered (received) or sent.
    #[error("{direction} message of {len} bytes exceeds the maximum message length of {max} bytes")]
    MessageTooLarge {
        /// `received` or `outgoing`.
        direction: &'static str,
        /// Its length.
        len: u64,
        /// The configured maximum.
        max: u64,
    },
    /// A read or write after the handshake blocked longer than the I/O timeout.
    #[error("{op} timed out after {after:?}")]
    Timeout {
        /// What was being done.
        op: String,
        /// The configured I/O timeout.
        after: Duration,
    },
    /// The channel failed earlier and refuses further work.
    #[error("the channel is closed after an earlier failure: {first}")]
    Poisoned {
        /// The first failure, printed.
        first: String,
    },
    /// The channel was closed by this node.
    #[error("the channel is closed")]
    Closed,
    /// 2^64 - 1 records were sent in one direction; Noise forbids reusing a nonce.
    #[error("record numbers exhausted: reconnect to start a new session")]
    NonceExhausted,
    /// A configuration value is out of range.
    #[error("configuration: {field} is {found}, expected {expected}")]
    InvalidConfig {
        /// The field.
        field: &'static str,
        /// The value found.
        found: String,
        /// What a valid value looks like.
        expected: String,
    },
    /// A key or key file is malformed.
    #[error("{object}: {reason}")]
    BadKey {
        /// The key file, or `public key text`.
        object: String,
        /// What is wrong.
        reason: String,
    },
    /// A key file could not be read or written.
    #[error("{op} key file {path}")]
    KeyFileIo {
        /// `reading`, `creating`, `writing`.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A private key file can be read by other users.
    #[error(
        "private key file {path} has mode {mode:04o}: it must not be readable by group or others (chmod 600)"
    )]
    KeyFilePermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The operating system's random generator failed while generating a key.
    #[error("could not generate a key pair")]
    KeyGeneration {
        /// The Noise library's error.
        #[source]
        source: snow::Error,
    },
}
