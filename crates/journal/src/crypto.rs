//! Encryption at rest of record payloads: AES-256-GCM under a per-segment key.
//!
//! The caller supplies one 32-byte [`JournalKey`]. Each segment carries a random 16-byte
//! salt; the segment key is `BLAKE3-keyed(key, "tidemark segment key v1" || salt)`, and a
//! record's nonce is its byte offset in the segment (8 bytes little-endian, then 4 zero
//! bytes), which is unique within a segment because segments are append-only and a segment
//! opened from disk is never appended to again (so a torn tail's offset is never reused).
//! The record header (bytes 0..40) is the associated data, binding the payload to its
//! sequence number, volume and offset. The manifest keeps a key check value so a wrong key
//! is refused before any record is read.

use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};

/// Bytes the GCM tag adds to an encrypted payload.
pub const TAG_LEN: usize = 16;

/// A 256-bit key for encryption at rest. Its bytes never appear in `Debug` output.
#[derive(Clone)]
pub struct JournalKey([u8; 32]);

impl fmt::Debug for JournalKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JournalKey(check {:02x?})", &self.check_value(&[0; 16])[..4])
    }
}

impl JournalKey {
    /// A key from its raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// A key derived from a passphrase-like secret with BLAKE3's key derivation.
    pub fn derive(context_secret: &[u8]) -> Self {
        Self(blake3::derive_key("tidemark journal key v1", context_secret))
    }

    /// The value stored in the manifest to recognise this key for the log `log_id`.
    pub fn check_value(&self, log_id: &[u8; 16]) -> [u8; 16] {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(b"tidemark journal key check v1");
        h.update(log_id);
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.finalize().as_bytes()[..16]);
        out
    }

    pub(crate) fn segment_cipher(&self, salt: &[u8; 16]) -> SegmentCipher {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(b"tidemark segment key v1");
        h.update(salt);
        let key = h.finalize();
        SegmentCipher(Aes256Gcm::new(key.as_bytes().into()))
    }
}

/// The cipher of one segment.
#[derive(Clone)]
pub(crate) struct SegmentCipher(Aes256Gcm);

impl fmt::Debug for SegmentCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SegmentCipher")
    }
}

fn nonce(offset: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&offset.to_le_bytes());
    n
}

impl SegmentCipher {
    /// Encrypts `plaintext` for the record at `offset`, appending ciphertext and tag to `out`.
    pub(crate) fn seal(&self, offset: u64, aad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) {
        let n = nonce(offset);
        let ct = self
            .0
            .encrypt(Nonce::from_slice(&n), Payload { msg: plaintext, aad })
            .expect("AES-GCM encryption cannot fail for payloads below 64 GiB");
        out.extend_from_slice(&ct);
    }

    /// Decrypts the payload of the record at `offset`; `None` when authentication fails.
    pub(crate) fn open(&self, offset: u64, aad: &[u8], ciphertext: &[u8]) -> Option<Vec<u8>> {
        let n = nonce(offset);
        self.0.decrypt(Nonce::from_slice(&n), Payload { msg: ciphertext, aad }).ok()
    }
}
