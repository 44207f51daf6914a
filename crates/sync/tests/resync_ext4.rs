//! `Ext4InUse` against e2fsprogs: images built with `mkfs.ext4 -d` (no mount, no root) in
//! several layouts; every block of every file must be in use and read back unchanged, the
//! in-use count must equal the block count minus the free blocks `dumpe2fs -h` reports, and
//! free blocks must read as zeros. Unsupported layouts are refused by name. Random bytes as
//! superblock and descriptors never panic.
//!
//! Without e2fsprogs each image test prints a loud SKIPPED line and passes.

use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use proptest::prelude::*;
use tidemark_sync::resync::{
    BlockSource, Ext4InUse, FileSource, MemSource, MerkleTree, ResyncError, verify,
};
use tidemark_sync::wire::TreeShape;

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// True when the ext4 tools run here; otherwise a loud SKIPPED line.
fn have_e2fsprogs(test: &str) -> bool {
    let ok = ["mkfs.ext4", "debugfs", "dumpe2fs"].iter().all(|tool| {
        Command::new(tool)
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success() || !o.stderr.is_empty())
    });
    if !ok {
        let _ = writeln!(
            std::io::stderr(),
            "\n==============================================================\n\
             SKIPPED: mkfs.ext4/debugfs/dumpe2fs not installed ({test}); install e2fsprogs\n\
             =============================================================="
        );
    }
    ok
}

/// The files put in every image: (path inside the filesystem, content).
fn files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("a.bin", pattern(1, 300_000)),
        ("small.txt", b"tidemark\n".to_vec()),
        ("dir/big.bin", pattern(2, 3 << 20)),
        ("dir/sub/odd.bin", pattern(3, 12_345)),
        ("dir/sub/empty", Vec::new()),
    ]
}

/// Builds an image of `size` with `mkfs.ext4 -q -F -d <files> <extra options>`.
fn make_image(dir: &Path, size: &str, options: &[&str]) -> std::path::PathBuf {
    let root = dir.join("root");
    for (path, content) in files() {
        let p = root.join(path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, content).unwrap();
    }
    let img = dir.join("fs.img");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .args(options)
        .arg(&img)
        .arg(size)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mkfs.ext4 {options:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    img
}

/// `dumpe2fs -h` field `name` as a number.
fn dumpe2fs_field(img: &Path, name: &str) -> u64 {
    let out = Command::new("dumpe2fs").arg("-h").arg(img).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in dumpe2fs -h"));
    line.split(':').nth(1).unwrap().trim().parse().unwrap()
}

/// The blocks of `path` in the image, in file order, from `debugfs -R "blocks /path"`.
fn file_blocks(img: &Path, path: &str) -> Vec<u64> {
    let out =
        Command::new("debugfs").arg("-R").arg(format!("blocks /{path}")).arg(img).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().map(|b| b.parse().unwrap()).collect()
}

/// The checks every supported layout must pass.
fn check_image(options: &[&str], size: &str, test: &str) {
    if !have_e2fsprogs(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path(), size, options);
    let plain = FileSource::open(&img).unwrap();
    let view = Ext4InUse::open(&plain).unwrap();
    let bs = view.block_size();
    assert_eq!(bs, dumpe2fs_field(&img, "Block size"), "{options:?}");
    let total = dumpe2fs_field(&img, "Block count");
    let free = dumpe2fs_field(&img, "Free blocks");
    assert_eq!(view.fs_blocks(), total);
    assert_eq!(view.used_blocks(), total - free, "{options:?}: in-use count against dumpe2fs");

    for (path, content) in files() {
        let blocks = file_blocks(&img, path);
        assert_eq!(blocks.len() as u64, (content.len() as u64).div_ceil(bs), "{path}");
        for (i, &b) in blocks.iter().enumerate() {
            assert!(view.block_in_use(b), "{options:?}: block {b} of {path} not in use");
            let mut buf = vec![0; bs as usize];
            view.read_at(b * bs, &mut buf).unwrap();
            let part = &content[i * bs as usize..content.len().min((i + 1) * bs as usize)];
            assert_eq!(&buf[..part.len()], part, "{options:?}: block {i} of {path}");
            let extents = view.data_extents(b * bs..(b + 1) * bs).unwrap();
            assert_eq!(extents, one(b * bs..(b + 1) * bs));
        }
    }

    // The in-use extents cover exactly the in-use blocks; the data extents are the part of
    // them the image file really holds (mkfs leaves zero inode tables and journal as holes).
    let in_use = view.in_use_extents(0..view.len());
    let bytes: u64 = in_use.iter().map(|e| e.end - e.start).sum();
    assert_eq!(bytes, view.used_blocks() * bs, "{options:?}");
    let data = view.data_extents(0..view.len()).unwrap();
    for e in &data {
        assert!(in_use.iter().any(|u| u.start <= e.start && e.end <= u.end), "{e:?}");
    }
    let plain_data: u64 =
        plain.data_extents(0..plain.len()).unwrap().iter().map(|e| e.end - e.start).sum();
    let data_bytes: u64 = data.iter().map(|e| e.end - e.start).sum();
    assert!(data_bytes <= plain_data && data_bytes <= bytes, "{options:?}");

    // Garbage in a free block: invisible through the view, so verify sees no difference.
    let free_block = (0..total).rev().find(|&b| !view.block_in_use(b)).expect("a free block");
    let tree_before = MerkleTree::build(&view, TreeShape::default(), 2).unwrap();
    let plain_before = MerkleTree::build(&plain, TreeShape::default(), 2).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .write_all_at(&vec![0xAA; bs as usize], free_block * bs)
        .unwrap();
    let plain = FileSource::open(&img).unwrap();
    let view = Ext4InUse::open(&plain).unwrap();
    let mut buf = vec![1; bs as usize];
    view.read_at(free_block * bs, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "a free block reads as zeros");
    let tree_after = MerkleTree::build(&view, TreeShape::default(), 2).unwrap();
    assert!(verify(&tree_before, &tree_after).unwrap().is_empty(), "{options:?}");
    let plain_after = MerkleTree::build(&plain, TreeShape::default(), 2).unwrap();
    let diff = verify(&plain_before, &plain_after).unwrap();
    assert_eq!(diff.differing_bytes(), 4096, "the plain view does see it");
}

#[test]
fn ext4_default_features_64bit_flex_bg() {
    check_image(&["-b", "4096", "-g", "2048"], "128M", "ext4_default_features_64bit_flex_bg");
}

#[test]
fn ext4_without_64bit() {
    check_image(&["-b", "4096", "-g", "2048", "-O", "^64bit"], "128M", "ext4_without_64bit");
}

#[test]
fn ext4_without_flex_bg() {
    check_image(&["-b", "4096", "-g", "2048", "-O", "^flex_bg"], "128M", "ext4_without_flex_bg");
}

#[test]
fn ext4_1k_blocks_without_64bit_or_flex_bg() {
    check_image(
        &["-b", "1024", "-O", "^64bit,^flex_bg"],
        "48M",
        "ext4_1k_blocks_without_64bit_or_flex_bg",
    );
}

#[test]
fn ext4_2k_blocks_uninit_bg_without_metadata_csum() {
    check_image(
        &["-b", "2048", "-O", "^metadata_csum,uninit_bg"],
        "64M",
        "ext4_2k_blocks_uninit_bg_without_metadata_csum",
    );
}

#[test]
fn ext4_without_sparse_super_or_checksums() {
    check_image(
        &["-b", "4096", "-g", "4096", "-O", "^metadata_csum,^sparse_super,^resize_inode"],
        "96M",
        "ext4_without_sparse_super_or_checksums",
    );
}

#[test]
fn ext4_device_larger_than_the_filesystem() {
    let test = "ext4_device_larger_than_the_filesystem";
    if !have_e2fsprogs(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path(), "32M", &["-b", "4096"]);
    let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(40 << 20).unwrap();
    f.write_all_at(b"tail", (36 << 20) + 7).unwrap();
    let plain = FileSource::open(&img).unwrap();
    let view = Ext4InUse::open(&plain).unwrap();
    let mut buf = [0u8; 4];
    view.read_at((36 << 20) + 7, &mut buf).unwrap();
    assert_eq!(&buf, b"tail", "bytes past the filesystem are copied verbatim");
    assert!(view.block_in_use(view.fs_blocks()));
}

/// Layouts that must be refused, naming the feature.
#[test]
fn ext4_unsupported_features_are_named() {
    let test = "ext4_unsupported_features_are_named";
    if !have_e2fsprogs(test) {
        return;
    }
    for (options, feature) in [
        (&["-b", "4096", "-O", "bigalloc", "-C", "16384"][..], "bigalloc"),
        (&["-b", "4096", "-O", "meta_bg,^resize_inode"][..], "meta_bg"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let img = make_image(dir.path(), "64M", options);
        let plain = FileSource::open(&img).unwrap();
        match Ext4InUse::open(&plain) {
            Err(ResyncError::Ext4Unsupported { feature: f, .. }) => assert_eq!(f, feature),
            other => panic!("{options:?}: {other:?}"),
        }
        // The fallback: the plain source still works.
        assert!(MerkleTree::build(&plain, TreeShape::default(), 1).is_ok());
    }
}

#[test]
fn not_ext4_is_refused() {
    let err = Ext4InUse::open(MemSource::new(vec![0; 8192])).unwrap_err();
    assert!(err.to_string().contains("superblock magic"), "{err}");
    let err = Ext4InUse::open(MemSource::new(vec![0; 100])).unwrap_err();
    assert!(err.to_string().contains("volume length"), "{err}");
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_superblocks_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..70_000)) {
        let _ = Ext4InUse::open(MemSource::new(bytes.clone()));
        if bytes.len() >= 2048 {
            bytes[1024 + 0x38..1024 + 0x3A].copy_from_slice(&0xEF53u16.to_le_bytes());
            let _ = Ext4InUse::open(MemSource::new(bytes));
        }
    }

    /// A plausible superblock (magic, small geometry, random features) over random
    /// descriptors and bitmaps: whatever happens, no panic, and a view that opens reads
    /// and lists extents within bounds.
    #[test]
    fn plausible_superblocks_never_panic(
        seed: u64,
        len in 4096usize..300_000,
        log_block in 0u32..3,
        blocks in 1u32..400,
        bpg in 0u32..80,
        incompat in prop_oneof![Just(0u32), Just(0x80u32), any::<u32>()],
        ro_compat in prop_oneof![Just(0x10u32), Just(0x400u32), any::<u32>()],
        desc_size in prop_oneof![Just(64u16), any::<u16>()],
        ipg in 0u32..64,
        inode_size in prop_oneof![Just(128u16), Just(256u16), any::<u16>()],
    ) {
        let mut b = pattern(seed, len);
        let sb = 1024;
        b[sb + 0x38..sb + 0x3A].copy_from_slice(&0xEF53u16.to_le_bytes());
        put32(&mut b, sb + 0x4C, 1);
        put32(&mut b, sb + 0x18, log_block);
        put32(&mut b, sb + 0x4, blocks);
        put32(&mut b, sb + 0x150, 0);
        put32(&mut b, sb + 0x14, u32::from(log_block == 0));
        put32(&mut b, sb + 0x20, bpg * 8);
        put32(&mut b, sb + 0x60, incompat & !0x1d);
        put32(&mut b, sb + 0x64, ro_compat & !0xa80);
        put32(&mut b, sb + 0x28, ipg);
        b[sb + 0xFE..sb + 0x100].copy_from_slice(&desc_size.to_le_bytes());
        b[sb + 0x58..sb + 0x5A].copy_from_slice(&inode_size.to_le_bytes());
        b[sb + 0xCE..sb + 0xD0].copy_from_slice(&0u16.to_le_bytes());
        if let Ok(view) = Ext4InUse::open(MemSource::new(b)) {
            let extents = view.data_extents(0..view.len()).unwrap();
            prop_assert!(extents.iter().all(|e| e.start < e.end && e.end <= view.len()));
            let mut buf = vec![0; view.len() as usize];
            view.read_at(0, &mut buf).unwrap();
        }
    }
}

/// A one-range list (clippy reads `vec![a..b]` as a likely mistake).
fn one(r: std::ops::Range<u64>) -> Vec<std::ops::Range<u64>> {
    std::iter::once(r).collect()
}
