//! Fuzz target: a secure-channel responder (or initiator, by the first byte) fed arbitrary
//! bytes as its peer's preamble, handshake messages and records must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tidemark_sync::secure::fuzz_handshake(data);
});
