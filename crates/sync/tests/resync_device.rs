//! `FileSource` over a block device: a loop device's unmapped space (the holes of its
//! backing file, including the ones a discard punches) is not data, and its reads equal
//! the backing file's. Needs root and loop devices; says SKIP loudly otherwise.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use tidemark_sync::resync::{BlockSource, FileSource, MerkleTree};
use tidemark_sync::wire::TreeShape;
use tidemark_tap::{LoopDevice, LoopOptions};

const MIB: u64 = 1 << 20;

/// `_IO(0x12, 119)`: discard a byte range of a block device.
const BLKDISCARD: libc::c_ulong = 0x1277;

fn skip(why: &str) {
    eprintln!("!!! SKIP loop_device_extents_come_from_the_backing_file: {why}");
}

#[test]
fn loop_device_extents_come_from_the_backing_file() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip("needs root (loop devices)");
    }
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let path = dir.path().join("backing.img");
    let file = std::fs::File::create(&path).expect("create");
    file.set_len(64 * MIB).expect("size");
    file.write_all_at(&[0xAB; 256 << 10], 3 * MIB).expect("write");
    file.write_all_at(&[0xCD; 64 << 10], 40 * MIB).expect("write");
    file.sync_all().expect("sync");
    let mut dev = match LoopDevice::attach(&path, LoopOptions::default()) {
        Ok(d) => d,
        Err(e) => return skip(&format!("no loop device: {e}")),
    };
    let source = FileSource::open(dev.path()).expect("open the loop device");
    assert!(source.is_device());
    assert!(source.extents_from_backing_file(), "a loop device's backing file was not found");
    assert_eq!(source.len(), 64 * MIB);
    let extents = source.data_extents(0..64 * MIB).expect("extents");
    let covered: u64 = extents.iter().map(|r| r.end - r.start).sum();
    assert!(extents.iter().any(|r| r.start <= 3 * MIB && r.end >= 3 * MIB + (256 << 10)));
    assert!(extents.iter().any(|r| r.start <= 40 * MIB && r.end >= 40 * MIB + (64 << 10)));
    assert!(covered < 4 * MIB, "the holes were reported as data: {extents:?}");

    // A discard on the device punches a hole in the backing file: no longer data.
    let fd = OpenOptions::new().write(true).open(dev.path()).expect("open rw");
    let range: [u64; 2] = [40 * MIB, 64 << 10];
    // SAFETY: BLKDISCARD reads two u64 through the pointer, which points at `range`.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), BLKDISCARD as _, range.as_ptr()) };
    if r != 0 {
        eprintln!("note: BLKDISCARD refused ({}); not checked", std::io::Error::last_os_error());
    } else {
        let after = FileSource::open(dev.path()).expect("reopen");
        let extents = after.data_extents(0..64 * MIB).expect("extents");
        assert!(
            !extents.iter().any(|r| r.start < 40 * MIB + (64 << 10) && r.end > 40 * MIB),
            "the discarded range is still data: {extents:?}"
        );
    }

    // The tree over the device (holes not read) equals the tree over the file.
    let shape = TreeShape::default();
    let on_device = MerkleTree::build(&source, shape, 2).expect("tree of the device");
    let on_file =
        MerkleTree::build(&FileSource::open(&path).expect("file"), shape, 2).expect("tree");
    assert_eq!(on_device.root(), on_file.root());
    dev.detach().expect("detach");
}
