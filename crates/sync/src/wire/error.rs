//! The wire codec's error type.
//!
//! Every variant names the object it concerns (the frame header, a message, a batch entry, a
//! hash range) and, where a value was checked, what was found and what was expected. Decode
//! errors mean the peer sent something this build cannot accept; the connection layer
//! answers them with an `Error` or `Refuse` message and closes.

use std::io;

use super::VersionRange;

/// What went wrong encoding or decoding a wire frame.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The bytes end before a header or field that must be there.
    #[error("{object}: truncated: {needed} bytes needed, {found} present")]
    Truncated {
        /// The frame part being read (`frame header`, `Batch entry 3 (seq 17)`, ...).
        object: String,
        /// Bytes needed from the start of that object.
        needed: u64,
        /// Bytes present.
        found: u64,
    },
    /// The frame does not start with the wire magic: the peer is not speaking Tidemark's
    /// wire protocol (or the stream lost its framing).
    #[error("frame header: bad magic {found:02x?}, expected {expected:02x?}")]
    BadMagic {
        /// The bytes found.
        found: [u8; 4],
        /// The wire magic, `TDMW`.
        expected: [u8; 4],
    },
    /// The peer speaks a protocol version this build does not.
    #[error("protocol version mismatch: this node speaks {ours}, the peer speaks {theirs}")]
    VersionMismatch {
        /// The versions this build speaks.
        ours: VersionRange,
        /// The versions the peer announced (a single version when only a frame header was
        /// seen).
        theirs: VersionRange,
    },
    /// The frame header names a message type this version does not define.
    #[error("frame header: unknown message type {found}, expected {expected}")]
    UnknownMessageType {
        /// The type code found.
        found: u8,
        /// The valid range of type codes.
        expected: String,
    },
    /// A frame (or a decompressed body, or a message about to be encoded) is larger than
    /// the configured maximum frame length. Refused before anything is allocated for it.
    #[error("{object}: {len} bytes exceeds the maximum frame length of {max} bytes")]
    FrameTooLarge {
        /// The frame or message.
        object: String,
        /// Its length (declared or computed).
        len: u64,
        /// The configured maximum.
        max: u64,
    },
    /// A field holds a value outside its valid range, or breaks a rule that ties it to
    /// other fields (ordering, overflow, reserved bytes).
    #[error("{object}: field {field} is {found}, expected {expected}")]
    InvalidField {
        /// The frame part holding the field.
        object: String,
        /// The field name as in `docs/wire-protocol.md`.
        field: &'static str,
        /// The value found, printed.
        found: String,
        /// What a valid value looks like.
        expected: String,
    },
    /// Bytes follow the last field of a message.
    #[error("{object}: {count} unexpected bytes after the last field")]
    TrailingBytes {
        /// The message.
        object: String,
        /// How many bytes are left over.
        count: u64,
    },
    /// A compressed body could not be decompressed (corrupt zstd data, or more output than
    /// its declared uncompressed length).
    #[error("{object}: zstd decompression failed (declared uncompressed length {declared})")]
    Decompress {
        /// The message.
        object: String,
        /// The uncompressed length the frame declared.
        declared: u64,
        /// The zstd error.
        #[source]
        source: io::Error,
    },
    /// zstd refused to compress a body (an out-of-range level, or out of memory).
    #[error("{object}: zstd compression failed")]
    Compress {
        /// The message.
        object: String,
        /// The zstd error.
        #[source]
        source: io::Error,
    },
}
