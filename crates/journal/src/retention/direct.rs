//! The direct-I/O path of [`RetentionLog::materialize`], taken when the base and the output
//! both have a file descriptor that can be reopened with `O_DIRECT` (files on ext4 or xfs,
//! block devices).
//!
//! Three threads, [`BUFFERS`] chunk buffers between them: a reader fills a buffer with the
//! base's chunk (`O_DIRECT`, so the disk's DMA writes it and the page cache is left alone),
//! the calling thread lays the journal's blocks of that chunk over it and hashes it, and a
//! writer writes it (`O_DIRECT`) and hands it back to the reader. The disk reads the next
//! chunks while the previous ones are written, and no byte is copied by the CPU but the
//! journal's, where the buffered path copies every byte in and out of the page cache and
//! reads the image back to hash it.
//!
//! The bytes are those of the buffered path: the base is not written while `materialize`
//! runs (it holds `&RetentionLog`), an `O_DIRECT` read sees what the page cache holds (the
//! kernel writes dirty pages back first), and the hash is computed over exactly the buffer
//! written. A descriptor that refuses `O_DIRECT` at the first read or write (`EINVAL`: a
//! filesystem without it) makes that side go on through its buffered [`BlockIo`]; an
//! unaligned tail (a volume or base not a multiple of 4 KiB) always does.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::mpsc::sync_channel;

use super::{MaterializeReport, PointInfo, RetentionLog};
use crate::error::{JournalError, Result};
use crate::index::BlockKey;
use crate::io::BlockIo;
use crate::types::VolumeId;

/// Bytes per chunk (one read, one write).
const CHUNK: u64 = 8 << 20;

/// Chunk buffers in flight between the three threads.
const BUFFERS: usize = 4;

/// Alignment of `O_DIRECT` offsets, lengths and buffers (the largest logical block size).
const ALIGN: usize = 4096;

/// A zeroed buffer whose usable part starts at an [`ALIGN`]-byte boundary.
struct Aligned {
    raw: Vec<u8>,
    start: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let raw = vec![0u8; len + ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN);
        Aligned { raw, start }
    }

    fn get(&mut self, len: usize) -> &mut [u8] {
        &mut self.raw[self.start..self.start + len]
    }
}

/// `io` reopened with `O_DIRECT` (read-only, or write-only when `write`), through
/// `/proc/self/fd`: a new open file description, so `io`'s own descriptor is unchanged.
fn reopen_direct(io: &dyn BlockIo, write: bool) -> Option<File> {
    let fd = io.raw_fd()?;
    OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(format!("/proc/self/fd/{fd}"))
        .ok()
}

/// True for the error of a descriptor that does not take `O_DIRECT` I/O.
fn refused(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

/// Reads `have` bytes at `offset` (aligned) into `buf`, zeros after them: the aligned part
/// through `direct` while it works, the rest through `io`.
fn read_part(
    direct: &mut Option<File>,
    io: &dyn BlockIo,
    buf: &mut [u8],
    offset: u64,
    have: usize,
) -> io::Result<()> {
    let mut done = 0;
    if let Some(f) = direct {
        let aligned = have / ALIGN * ALIGN;
        match f.read_exact_at(&mut buf[..aligned], offset) {
            Ok(()) => done = aligned,
            Err(e) if refused(&e) => {
                tracing::debug!(file = %io.name(), "O_DIRECT reads refused: buffered reads");
                *direct = None;
            }
            Err(e) => return Err(e),
        }
    }
    if done < have {
        io.read_at(&mut buf[done..have], offset + done as u64)?;
    }
    buf[have..].fill(0);
    Ok(())
}

/// Writes `buf` at `offset` (aligned): the aligned part through `direct` while it works, the
/// rest through `io`.
fn write_part(
    direct: &mut Option<File>,
    io: &dyn BlockIo,
    buf: &[u8],
    offset: u64,
) -> io::Result<()> {
    let mut done = 0;
    if let Some(f) = direct {
        let aligned = buf.len() / ALIGN * ALIGN;
        match f.write_all_at(&buf[..aligned], offset) {
            Ok(()) => done = aligned,
            Err(e) if refused(&e) => {
                tracing::debug!(file = %io.name(), "O_DIRECT writes refused: buffered writes");
                *direct = None;
            }
            Err(e) => return Err(e),
        }
    }
    if done < buf.len() {
        io.write_at(&buf[done..], offset + done as u64)?;
    }
    Ok(())
}

impl RetentionLog {
    /// [`RetentionLog::materialize`] through direct I/O (see the module documentation), once
    /// its checks are done and `out` is `vlen` long; `None` when the pair cannot be opened
    /// for it, for the buffered path to do the work.
    pub(super) fn materialize_direct(
        &self,
        at: &PointInfo,
        volume: VolumeId,
        out: &dyn BlockIo,
        keys: &[BlockKey],
        vlen: u64,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Option<MaterializeReport>> {
        let vi = usize::from(volume.0);
        let base = self.volumes[vi].as_ref();
        // A block never spans two chunks (block sizes are powers of two up to 1 MiB).
        if CHUNK % self.bs != 0 {
            return Ok(None);
        }
        let (Some(base_direct), Some(out_direct)) =
            (reopen_direct(base, false), reopen_direct(out, true))
        else {
            return Ok(None);
        };
        let base_len = self.base_file_lens[vi];
        let (free_tx, free_rx) = sync_channel::<Aligned>(BUFFERS);
        for _ in 0..BUFFERS {
            free_tx.send(Aligned::new(CHUNK as usize)).expect("the receiver is here");
        }
        let (full_tx, full_rx) = sync_channel::<(u64, usize, Aligned)>(BUFFERS);
        let (write_tx, write_rx) = sync_channel::<(u64, usize, Aligned)>(BUFFERS);
        std::thread::scope(|scope| {
            let reader = scope.spawn(move || -> Result<()> {
                let mut direct = Some(base_direct);
                let mut pos = 0;
                while pos < vlen {
                    // No buffer comes back once the writer has stopped (on its error).
                    let Ok(mut buf) = free_rx.recv() else { return Ok(()) };
                    let n = (vlen - pos).min(CHUNK) as usize;
                    let have = base_len.saturating_sub(pos).min(n as u64) as usize;
                    read_part(&mut direct, base, buf.get(n), pos, have)
                        .map_err(|e| JournalError::io("read", base.name(), e))?;
                    if full_tx.send((pos, n, buf)).is_err() {
                        return Ok(()); // the patcher stopped on its error
                    }
                    pos += n as u64;
                }
                Ok(())
            });
            let writer = scope.spawn(move || -> Result<u64> {
                let mut direct = Some(out_direct);
                let mut written = 0;
                for (pos, n, mut buf) in write_rx {
                    write_part(&mut direct, out, buf.get(n), pos)
                        .map_err(|e| JournalError::io("write", out.name(), e))?;
                    written += n as u64;
                    // The reader may be done: then the buffer is dropped here.
                    let _ = free_tx.send(buf);
                }
                Ok(written)
            });
            // A move closure: it owns `write_tx` and `full_rx`, so whatever way it returns,
            // the writer sees the end of its work and the reader the end of its consumer.
            let patched = (move || -> Result<(u64, [u8; 32])> {
                let mut hasher = blake3::Hasher::new();
                let (mut ki, mut hinted_ki, mut journal_blocks) = (0usize, 0usize, 0u64);
                // The journal records of the next two chunks are hinted (the base is read by
                // the reader, not through the page cache): they are random reads.
                self.hint_chunk(None, keys, &mut hinted_ki, at.seq, 0, (2 * CHUNK).min(vlen))
                    .issue();
                for (pos, n, mut buf) in full_rx {
                    let end = pos + n as u64;
                    let ahead = end + CHUNK;
                    if ahead < vlen {
                        let len = CHUNK.min(vlen - ahead);
                        self.hint_chunk(None, keys, &mut hinted_ki, at.seq, ahead, len).issue();
                    }
                    let data = buf.get(n);
                    while ki < keys.len() && keys[ki].block() * self.bs < end {
                        let k = keys[ki];
                        let s = (k.block() * self.bs - pos) as usize;
                        let blen = self.block_len(k).min(n - s);
                        if self.block_over(k, at.seq, &mut data[s..s + blen], true)? {
                            journal_blocks += 1;
                        }
                        ki += 1;
                    }
                    hasher.update(data);
                    if write_tx.send((pos, n, buf)).is_err() {
                        break; // the writer stopped on its error, which its join reports
                    }
                    progress(end, vlen);
                }
                Ok((journal_blocks, *hasher.finalize().as_bytes()))
            })();
            // Every thread ends once the others have let go of their channel ends.
            let read = reader.join().expect("the reader does not panic");
            let written = writer.join().expect("the writer does not panic");
            let (journal_blocks, hash) = patched?;
            read?;
            let written = written?;
            if written != vlen {
                return Err(JournalError::Config(format!(
                    "materialize wrote {written} bytes of the {vlen} of volume {volume} to {}",
                    out.name()
                )));
            }
            out.sync().map_err(|e| JournalError::io("fdatasync", out.name(), e))?;
            Ok(Some(MaterializeReport { bytes: vlen, journal_blocks, hash, direct_io: true }))
        })
    }
}
