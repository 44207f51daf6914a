//! Fuzz target: the dm-log-writes reader (super block, entries, events, replay) must never
//! panic, allocate without bound or write outside its replay target, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tidemark_tap::dmlog::fuzz_dmlog(data);
});
