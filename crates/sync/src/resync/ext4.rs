//! [`Ext4InUse`]: the logical view of a volume holding an ext4 filesystem, in which the
//! blocks the filesystem has not allocated read as zeros and are not data extents. This is
//! what a filesystem-aware sync moves: both `verify` and the resync hash this same view, so
//! free blocks (whatever stale bytes they hold) never count as differences.
//!
//! What is read: the superblock (byte 1024), the group descriptor table (the block after
//! the superblock's; 32-byte descriptors, or `s_desc_size` with `64bit`) and each group's
//! block bitmap. `flex_bg` needs nothing special: a descriptor names its bitmap wherever it
//! lies. A group flagged `BLOCK_UNINIT` (honoured, as the kernel does, only with `uninit_bg`
//! or `metadata_csum`) has no bitmap on disk; its in-use blocks are its superblock backup,
//! group descriptors and reserved GDT blocks, plus any group's bitmaps and inode table that
//! lie in it, which is the set the kernel computes when it first initialises that bitmap.
//! Blocks before `s_first_data_block` and bytes past the end of the filesystem (a device
//! larger than the filesystem) count as in use: they are copied verbatim.
//!
//! Refused, with [`ResyncError::Ext4Unsupported`] naming the feature, so that the caller
//! falls back to the plain source: block sizes other than 1, 2, 4 and 64 KiB, `bigalloc`,
//! `meta_bg`, compression, an external journal device, unknown incompatible or read-only
//! features, and `needs_recovery` (a journal not yet replayed: its transactions may
//! allocate blocks the on-disk bitmaps do not show; a frozen or unmounted filesystem has it
//! clear).
//!
//! Caveat: a mounted filesystem keeps recent allocations in memory. Its bitmaps describe the
//! disk only after `sync` and, for a live filesystem, `fsfreeze`; read them at that moment.
//!
//! Invariants: every on-disk field is validated before any arithmetic with it (no input can
//! overflow, index out of bounds, or make the reader allocate more than one bit per block of
//! a filesystem that fits the volume); the in-use set is a superset of the blocks any file
//! or metadata uses, as far as the on-disk bitmaps are right.

use std::io;
use std::ops::Range;

use super::{BlockSource, ResyncError};

const SUPERBLOCK_OFFSET: u64 = 1024;
const SUPERBLOCK_LEN: usize = 1024;
const EXT4_MAGIC: u16 = 0xEF53;

const COMPAT_SPARSE_SUPER2: u32 = 0x200;

const INCOMPAT_COMPRESSION: u32 = 0x1;
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_64BIT: u32 = 0x80;
/// filetype, extents, 64bit, mmp, flex_bg, ea_inode, dirdata, metadata_csum_seed,
/// large_dir, inline_data, encrypt, casefold: none changes where allocation is recorded.
const INCOMPAT_HANDLED: u32 = 0x2
    | 0x40
    | INCOMPAT_64BIT
    | 0x100
    | 0x200
    | 0x400
    | 0x1000
    | 0x2000
    | 0x4000
    | 0x8000
    | 0x10000
    | 0x20000;

const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_GDT_CSUM: u32 = 0x10;
const RO_COMPAT_SNAPSHOT: u32 = 0x80;
const RO_COMPAT_BIGALLOC: u32 = 0x200;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
const RO_COMPAT_REPLICA: u32 = 0x800;
/// sparse_super, large_file, btree_dir, huge_file, uninit_bg, dir_nlink, extra_isize,
/// quota, metadata_csum, readonly, project, shared_blocks, verity, orphan_present.
const RO_COMPAT_HANDLED: u32 = RO_COMPAT_SPARSE_SUPER
    | 0x2
    | 0x4
    | 0x8
    | RO_COMPAT_GDT_CSUM
    | 0x20
    | 0x40
    | 0x100
    | RO_COMPAT_METADATA_CSUM
    | 0x1000
    | 0x2000
    | 0x4000
    | 0x8000
    | 0x10000;

const BG_BLOCK_UNINIT: u16 = 0x2;

/// Little-endian fields of an on-disk structure already read whole.
struct Le<'a>(&'a [u8]);

impl Le<'_> {
    fn u16(&self, at: usize) -> u16 {
        u16::from_le_bytes(self.0[at..at + 2].try_into().expect("2 bytes"))
    }
    fn u32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.0[at..at + 4].try_into().expect("4 bytes"))
    }
}

/// An ext4 volume seen through its block bitmaps: blocks not in use read as zeros and are
/// left out of [`BlockSource::data_extents`].
#[derive(Debug)]
pub struct Ext4InUse<S> {
    inner: S,
    block_size: u64,
    first_data_block: u64,
    blocks: u64,
    /// Bit `b - first_data_block` (LSB first in each byte) is set when block `b` is in use.
    bitmap: Vec<u8>,
    used: u64,
}

/// The parsed, validated geometry, before the bitmaps are read.
struct Geometry {
    block_size: u64,
    first_data_block: u64,
    blocks: u64,
    blocks_per_group: u64,
    groups: u64,
    desc_size: usize,
    is_64bit: bool,
    gdt_blocks: u64,
    reserved_gdt_blocks: u64,
    inode_table_blocks: u64,
    uninit_valid: bool,
    sparse_super: bool,
    sparse_super2: Option<[u32; 2]>,
}

impl Geometry {
    /// True when group `g` holds a superblock backup (and descriptor copies).
    fn has_super(&self, g: u64) -> bool {
        if g == 0 {
            return true;
        }
        if let Some(backups) = self.sparse_super2 {
            return backups.iter().any(|&b| u64::from(b) == g);
        }
        if !self.sparse_super || g == 1 {
            return true;
        }
        [3u64, 5, 7].iter().any(|&base| {
            let mut p = base;
            while p < g {
                p *= base;
            }
            p == g
        })
    }

    /// First block of group `g` and its length in blocks.
    fn group(&self, g: u64) -> (u64, u64) {
        let start = self.first_data_block + g * self.blocks_per_group;
        (start, self.blocks_per_group.min(self.blocks - start))
    }
}

impl<S: BlockSource> Ext4InUse<S> {
    /// Reads the allocation of the ext4 filesystem on `inner`. Pass a reference or an `Arc`
    /// to keep the plain source for the fallback when this fails.
    pub fn open(inner: S) -> Result<Self, ResyncError> {
        let object = format!("ext4 on {}", inner.describe());
        let geo = read_geometry(&inner, &object)?;
        let invalid = |field: String, found: u64, expected: String| ResyncError::Ext4Invalid {
            object: object.clone(),
            field,
            found: found.to_string(),
            expected,
        };
        let bs = geo.block_size;
        let tracked = geo.blocks - geo.first_data_block;
        let bitmap_len = usize::try_from(tracked.div_ceil(8))
            .map_err(|_| ResyncError::TooLarge { what: "ext4 block bitmap", value: tracked })?;
        let mut this = Self {
            inner,
            block_size: bs,
            first_data_block: geo.first_data_block,
            blocks: geo.blocks,
            bitmap: vec![0; bitmap_len],
            used: 0,
        };

        // The descriptor table, right after the superblock's block.
        let gdt_offset = (geo.first_data_block + 1) * bs;
        let gdt_len = geo.groups * geo.desc_size as u64;
        let mut gdt = vec![0u8; gdt_len as usize];
        this.read(gdt_offset, &mut gdt, &object)?;

        let mut metadata: Vec<Range<u64>> = Vec::new();
        let mut bits = vec![0u8; (bs as usize).min(geo.blocks_per_group.div_ceil(8) as usize)];
        for g in 0..geo.groups {
            let d = Le(&gdt[(g as usize) * geo.desc_size..(g as usize + 1) * geo.desc_size]);
            let hi = |at: usize| if geo.is_64bit { u64::from(d.u32(at)) << 32 } else { 0 };
            let block_bitmap = u64::from(d.u32(0x0)) | hi(0x20);
            let inode_bitmap = u64::from(d.u32(0x4)) | hi(0x24);
            let inode_table = u64::from(d.u32(0x8)) | hi(0x28);
            let in_fs = geo.first_data_block..geo.blocks;
            for (name, block, len) in [
                ("block bitmap", block_bitmap, 1),
                ("inode bitmap", inode_bitmap, 1),
                ("inode table", inode_table, geo.inode_table_blocks),
            ] {
                if !in_fs.contains(&block) || block + len > geo.blocks {
                    return Err(invalid(
                        format!("group {g} {name} location"),
                        block,
                        format!(
                            "{len} blocks inside blocks {}..{}",
                            geo.first_data_block, geo.blocks
                        ),
                    ));
                }
                metadata.push(block..block + len);
            }
            let (start, len) = geo.group(g);
            let uninit = geo.uninit_valid && d.u16(0x12) & BG_BLOCK_UNINIT != 0;
            if uninit {
                if geo.has_super(g) {
                    let meta = (1 + geo.gdt_blocks + geo.reserved_gdt_blocks).min(len);
                    this.mark(start..start + meta);
                }
            } else {
                let n = len.div_ceil(8) as usize;
                this.read(block_bitmap * bs, &mut bits[..n], &object)?;
                // Groups start on a byte boundary of our bitmap: blocks_per_group is a
                // multiple of 8 and our bit 0 is the first data block.
                let at = ((start - geo.first_data_block) / 8) as usize;
                let dst = &mut this.bitmap[at..at + n];
                for (d, s) in dst.iter_mut().zip(&bits[..n]) {
                    *d |= s;
                }
                // Padding bits past the last block of a short last group are set on disk.
                if len % 8 != 0 {
                    dst[n - 1] &= (1u8 << (len % 8)) - 1;
                }
            }
        }
        for r in metadata {
            this.mark(r);
        }
        this.used = geo.first_data_block
            + this.bitmap.iter().map(|b| u64::from(b.count_ones())).sum::<u64>();
        Ok(this)
    }

    fn read(&self, offset: u64, buf: &mut [u8], object: &str) -> Result<(), ResyncError> {
        self.inner.read_at(offset, buf).map_err(|source| ResyncError::Read {
            object: object.to_owned(),
            offset,
            len: buf.len() as u64,
            source,
        })
    }

    /// Marks blocks `r` (inside the filesystem) in use.
    fn mark(&mut self, r: Range<u64>) {
        for b in r {
            let i = b - self.first_data_block;
            self.bitmap[(i / 8) as usize] |= 1 << (i % 8);
        }
    }

    /// The wrapped source.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The wrapped source, giving up the view.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The filesystem's block size.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Blocks in the filesystem (`s_blocks_count`).
    pub fn fs_blocks(&self) -> u64 {
        self.blocks
    }

    /// Blocks in use: the filesystem's blocks minus its free blocks, as far as the bitmaps
    /// say.
    pub fn used_blocks(&self) -> u64 {
        self.used
    }

    /// True when block `b` of the volume is in use (blocks past the filesystem count as in
    /// use).
    pub fn block_in_use(&self, b: u64) -> bool {
        if b < self.first_data_block || b >= self.blocks {
            return true;
        }
        let i = b - self.first_data_block;
        self.bitmap[(i / 8) as usize] & (1 << (i % 8)) != 0
    }

    /// The first block in `from..end` whose in-use state is `used`, or `end`.
    fn find(&self, from: u64, end: u64, used: bool) -> u64 {
        let mut b = from;
        while b < end {
            if b >= self.first_data_block && b < self.blocks {
                let i = b - self.first_data_block;
                if i % 8 == 0 {
                    let skip = if used { 0x00 } else { 0xFF };
                    if self.bitmap[(i / 8) as usize] == skip {
                        b += 8;
                        continue;
                    }
                }
            }
            if self.block_in_use(b) == used {
                return b;
            }
            b += 1;
        }
        end
    }

    /// The in-use parts of `range` (bytes, clamped to the volume), ascending and coalesced.
    pub fn in_use_extents(&self, range: Range<u64>) -> Vec<Range<u64>> {
        let len = self.inner.len();
        let (start, end) = (range.start.min(len), range.end.min(len));
        if start >= end {
            return Vec::new();
        }
        let bs = self.block_size;
        let (first, last) = (start / bs, end.div_ceil(bs));
        let mut out = Vec::new();
        let mut b = first;
        while b < last {
            let used = self.find(b, last, true);
            if used >= last {
                break;
            }
            let free = self.find(used, last, false).min(last);
            out.push((used * bs).max(start)..(free * bs).min(end));
            b = free;
        }
        out
    }
}

/// Reads and validates the superblock.
fn read_geometry<S: BlockSource>(inner: &S, object: &str) -> Result<Geometry, ResyncError> {
    let invalid = |field: &str, found: String, expected: String| ResyncError::Ext4Invalid {
        object: object.to_owned(),
        field: field.to_owned(),
        found,
        expected,
    };
    let unsupported =
        |feature: String| ResyncError::Ext4Unsupported { object: object.to_owned(), feature };
    let len = inner.len();
    if len < SUPERBLOCK_OFFSET + SUPERBLOCK_LEN as u64 {
        return Err(invalid("volume length", len.to_string(), "at least 2048 bytes".into()));
    }
    let mut sb = vec![0u8; SUPERBLOCK_LEN];
    inner.read_at(SUPERBLOCK_OFFSET, &mut sb).map_err(|source| ResyncError::Read {
        object: object.to_owned(),
        offset: SUPERBLOCK_OFFSET,
        len: SUPERBLOCK_LEN as u64,
        source,
    })?;
    let sb = Le(&sb);
    let magic = sb.u16(0x38);
    if magic != EXT4_MAGIC {
        return Err(invalid(
            "superblock magic",
            format!("{magic:#06x}"),
            format!("{EXT4_MAGIC:#06x}"),
        ));
    }
    let rev = sb.u32(0x4C);
    let (compat, incompat, ro_compat) =
        if rev == 0 { (0, 0, 0) } else { (sb.u32(0x5C), sb.u32(0x60), sb.u32(0x64)) };

    for (bit, name) in [
        (INCOMPAT_COMPRESSION, "compression"),
        (INCOMPAT_RECOVER, "needs_recovery (journal not replayed; unmount or freeze first)"),
        (INCOMPAT_JOURNAL_DEV, "journal_dev"),
        (INCOMPAT_META_BG, "meta_bg"),
    ] {
        if incompat & bit != 0 {
            return Err(unsupported(name.to_owned()));
        }
    }
    let unknown = incompat & !(INCOMPAT_HANDLED);
    if unknown != 0 {
        return Err(unsupported(format!("unknown incompatible feature bits {unknown:#x}")));
    }
    for (bit, name) in [
        (RO_COMPAT_BIGALLOC, "bigalloc"),
        (RO_COMPAT_SNAPSHOT, "has_snapshot"),
        (RO_COMPAT_REPLICA, "replica"),
    ] {
        if ro_compat & bit != 0 {
            return Err(unsupported(name.to_owned()));
        }
    }
    let unknown = ro_compat & !RO_COMPAT_HANDLED;
    if unknown != 0 {
        return Err(unsupported(format!("unknown read-only feature bits {unknown:#x}")));
    }

    let log_block = sb.u32(0x18);
    let block_size: u64 = match log_block {
        0 | 1 | 2 | 6 => 1024 << log_block,
        3..=5 => return Err(unsupported(format!("block size {}", 1024u64 << log_block))),
        _ => {
            return Err(invalid(
                "s_log_block_size",
                log_block.to_string(),
                "0 to 6 (1 KiB to 64 KiB blocks)".into(),
            ));
        }
    };
    let is_64bit = incompat & INCOMPAT_64BIT != 0;
    let blocks = u64::from(sb.u32(0x4)) | if is_64bit { u64::from(sb.u32(0x150)) << 32 } else { 0 };
    let fs_bytes = blocks.checked_mul(block_size).filter(|&b| b <= len && blocks > 0);
    if fs_bytes.is_none() {
        return Err(invalid(
            "block count",
            format!("{blocks} blocks of {block_size} bytes"),
            format!("1 or more, fitting the volume's {len} bytes"),
        ));
    }
    let first_data_block = u64::from(sb.u32(0x14));
    let expected_first = u64::from(block_size == 1024);
    if first_data_block != expected_first || first_data_block >= blocks {
        return Err(invalid(
            "s_first_data_block",
            first_data_block.to_string(),
            format!("{expected_first} for {block_size}-byte blocks, below {blocks}"),
        ));
    }
    let blocks_per_group = u64::from(sb.u32(0x20));
    if blocks_per_group < 8 || blocks_per_group > 8 * block_size || blocks_per_group % 8 != 0 {
        return Err(invalid(
            "s_blocks_per_group",
            blocks_per_group.to_string(),
            format!("a multiple of 8 from 8 to {}", 8 * block_size),
        ));
    }
    let groups = (blocks - first_data_block).div_ceil(blocks_per_group);
    let desc_size = if is_64bit {
        let d = u64::from(sb.u16(0xFE));
        if !(64..=1024).contains(&d) || !d.is_power_of_two() || d > block_size {
            return Err(invalid(
                "s_desc_size",
                d.to_string(),
                "a power of two from 64 to 1024 with 64bit".into(),
            ));
        }
        d as usize
    } else {
        32
    };
    // Fits: groups <= blocks and desc_size <= block_size, and blocks * block_size <= len.
    let gdt_bytes = groups * desc_size as u64;
    let gdt_blocks = gdt_bytes.div_ceil(block_size);
    let reserved_gdt_blocks = u64::from(sb.u16(0xCE));
    if (first_data_block + 1 + gdt_blocks) > blocks
        || 1 + gdt_blocks + reserved_gdt_blocks > blocks_per_group
    {
        return Err(invalid(
            "group descriptor table",
            format!("{gdt_blocks} blocks + {reserved_gdt_blocks} reserved"),
            format!("fitting a group of {blocks_per_group} blocks and the filesystem"),
        ));
    }
    let inodes_per_group = u64::from(sb.u32(0x28));
    let inode_size = if rev == 0 { 128 } else { u64::from(sb.u16(0x58)) };
    if !(128..=block_size).contains(&inode_size) || !inode_size.is_power_of_two() {
        return Err(invalid(
            "s_inode_size",
            inode_size.to_string(),
            format!("a power of two from 128 to {block_size}"),
        ));
    }
    if inodes_per_group == 0 || inodes_per_group > 8 * block_size {
        return Err(invalid(
            "s_inodes_per_group",
            inodes_per_group.to_string(),
            format!("1 to {}", 8 * block_size),
        ));
    }
    let sparse_super2 =
        (compat & COMPAT_SPARSE_SUPER2 != 0).then(|| [sb.u32(0x24C), sb.u32(0x250)]);
    Ok(Geometry {
        block_size,
        first_data_block,
        blocks,
        blocks_per_group,
        groups,
        desc_size,
        is_64bit,
        gdt_blocks,
        reserved_gdt_blocks,
        inode_table_blocks: (inodes_per_group * inode_size).div_ceil(block_size),
        uninit_valid: ro_compat & (RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM) != 0,
        sparse_super: ro_compat & RO_COMPAT_SPARSE_SUPER != 0,
        sparse_super2,
    })
}

impl<S: BlockSource> BlockSource for Ext4InUse<S> {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    /// Hints only the in-use blocks of `range`, the only ones [`BlockSource::read_at`] reads.
    fn will_need(&self, range: Range<u64>) {
        for e in self.in_use_extents(range) {
            self.inner.will_need(e);
        }
    }

    /// The inner bytes of in-use blocks, zeros for the others.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        super::source::check_bounds(offset, buf.len(), self.len())?;
        let end = offset + buf.len() as u64;
        let used = self.in_use_extents(offset..end);
        let (Some(first), Some(last)) = (used.first(), used.last()) else {
            buf.fill(0);
            return Ok(());
        };
        // One read over the in-use span, then zero the gaps.
        let (a, b) = ((first.start - offset) as usize, (last.end - offset) as usize);
        self.inner.read_at(first.start, &mut buf[a..b])?;
        buf[..a].fill(0);
        buf[b..].fill(0);
        for pair in used.windows(2) {
            buf[(pair[0].end - offset) as usize..(pair[1].start - offset) as usize].fill(0);
        }
        Ok(())
    }

    fn data_extents(&self, range: Range<u64>) -> io::Result<Vec<Range<u64>>> {
        let mut out = Vec::new();
        for e in self.inner.data_extents(range)? {
            out.extend(self.in_use_extents(e));
        }
        Ok(out)
    }

    fn describe(&self) -> String {
        format!("ext4 in-use view of {}", self.inner.describe())
    }
}

/// Fuzz entry point (`fuzz/fuzz_targets/ext4_view.rs`): reads `data` as a volume holding an
/// ext4 filesystem. Never panics on any input; when the view opens, its extents lie inside
/// the volume, in order, and blocks outside them read as zeros.
pub fn fuzz_ext4_view(data: &[u8]) {
    use super::MemSource;
    let source = MemSource::new(data.to_vec());
    let len = source.len();
    let Ok(view) = Ext4InUse::open(source) else {
        return;
    };
    let extents = view.in_use_extents(0..len);
    let mut last = 0;
    for r in &extents {
        assert!(r.start >= last && r.start < r.end && r.end <= len, "extent {r:?} of {len}");
        last = r.end;
    }
    let mut buf = vec![0u8; 4096.min(len as usize)];
    if view.read_at(0, &mut buf).is_ok()
        && extents.first().is_none_or(|r| r.start >= buf.len() as u64)
    {
        assert!(buf.iter().all(|&b| b == 0), "bytes outside the in-use extents read as data");
    }
}
