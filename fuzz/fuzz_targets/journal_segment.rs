//! Fuzz target: the journal segment parser must never panic, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tidemark_journal::format::fuzz_segment(data);
});
