//! Fuzz target: the write-intent map decoder (header, slots, open) must never panic, and every
//! image it accepts must re-encode to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tidemark_tap::intent::fuzz_intent_map(data);
});
