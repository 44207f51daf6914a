//! The write tap: capture of every write to a protected block device, in order, with its
//! flush/FUA barriers.
//!
//! This crate is a placeholder in the first landing: the kernel frontends (ublk, FUSE +
//! loop), the dm-log-writes reader, the library capture API and the write-intent map arrive
//! with their own issue. Nothing here is called by the agent yet.
