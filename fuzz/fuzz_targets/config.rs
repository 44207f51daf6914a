//! Fuzz target: the configuration file parser (`tidemark::config`) fed arbitrary text must
//! never panic, and every error it reports must point inside the text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tidemark::config::fuzz_config(data);
});
