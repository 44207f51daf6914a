//! Fuzz target: the wire frame decoder must never panic, whatever the bytes; whatever it
//! decodes must re-encode (plain and compressed) to a frame that decodes equal, and an
//! uncompressed frame must re-encode byte for byte.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tidemark_sync::wire::codec::fuzz_frame(data);
});
