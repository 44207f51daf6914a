//! Little-endian field readers shared by the tap's format parsers (dm-log-writes, intent
//! map). Callers check bounds before reading; these panic on a short slice.

/// The `u64` at byte `at` of `b`.
pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The `u32` at byte `at` of `b`.
pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
