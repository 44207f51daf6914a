//! Fuzz target: the ext4 allocation reader behind the filesystem-aware initial sync
//! (superblock, group descriptors, block bitmaps) must never panic, and the extents it
//! reports must lie inside the volume, in order.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tidemark_sync::resync::ext4::fuzz_ext4_view(data);
});
