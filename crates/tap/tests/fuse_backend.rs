//! The FUSE + loop frontend serving a `BlockBackend` other than the tap (an in-memory one):
//! block I/O at `/dev/loopN` reaches it (reads, writes, flushes, discards), and a read-only
//! backend gets a read-only loop device and volume file: writes are refused with `EROFS` and
//! never reach it.
//!
//! Needs root, `/dev/fuse` and loop devices; where they are missing each test prints a loud
//! SKIPPED line and returns.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tidemark_tap::{BlockBackend, FuseLoopConfig, FuseLoopFrontend, TapError};

const SIZE: u64 = 8 << 20;

fn privileged(test: &str) -> bool {
    let root = fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
    let fuse = Path::new("/dev/fuse").exists();
    let loop_ctl = Path::new("/dev/loop-control").exists();
    if root && fuse && loop_ctl {
        return true;
    }
    let _ = writeln!(
        std::io::stderr(),
        "\n==============================================================\n\
         SKIPPED: needs root and /dev/fuse ({test}): root={root} /dev/fuse={fuse} \
         /dev/loop-control={loop_ctl}\n\
         =============================================================="
    );
    false
}

/// A volume in memory that counts what it was asked.
#[derive(Debug)]
struct MemBackend {
    data: Mutex<Vec<u8>>,
    read_only: bool,
    mutations: AtomicU64,
    flushes: AtomicU64,
}

impl MemBackend {
    fn new(read_only: bool) -> Self {
        let data = (0..SIZE).map(|i| (i / 4096) as u8 ^ (i as u8)).collect();
        Self {
            data: Mutex::new(data),
            read_only,
            mutations: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        }
    }

    fn refuse(&self) -> Result<(), TapError> {
        if self.read_only {
            return Err(TapError::ReadOnly {
                object: "test backend".into(),
                op: "mutation".into(),
            });
        }
        self.mutations.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl BlockBackend for MemBackend {
    fn size(&self) -> u64 {
        SIZE
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), TapError> {
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), TapError> {
        self.refuse()?;
        self.data.lock().unwrap()[offset as usize..offset as usize + data.len()]
            .copy_from_slice(data);
        Ok(())
    }

    fn flush(&self) -> Result<(), TapError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), TapError> {
        self.write_zeroes(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), TapError> {
        self.refuse()?;
        self.data.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

#[test]
fn a_read_write_backend_gets_the_loop_devices_io() {
    if !privileged("a_read_write_backend_gets_the_loop_devices_io") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let backend = Arc::new(MemBackend::new(false));
    let frontend =
        FuseLoopFrontend::start_backend(backend.clone(), FuseLoopConfig::new(tmp.path().join("m")))
            .expect("start");
    let dev = frontend.device_path().expect("loop device").to_path_buf();
    let f = OpenOptions::new().read(true).write(true).open(&dev).unwrap();
    let mut got = vec![0u8; SIZE as usize];
    f.read_exact_at(&mut got, 0).unwrap();
    assert_eq!(got, *backend.data.lock().unwrap(), "reads through the loop device differ");
    f.write_all_at(&[0xa5; 65536], 1 << 20).unwrap();
    f.sync_all().unwrap();
    assert!(backend.mutations.load(Ordering::SeqCst) > 0);
    assert!(backend.flushes.load(Ordering::SeqCst) > 0, "no flush reached the backend");
    assert!(backend.data.lock().unwrap()[1 << 20..(1 << 20) + 65536].iter().all(|b| *b == 0xa5));
    drop(f);
    frontend.shutdown().expect("teardown");
}

#[test]
fn a_read_only_backend_is_exposed_read_only() {
    if !privileged("a_read_only_backend_is_exposed_read_only") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let backend = Arc::new(MemBackend::new(true));
    let frontend =
        FuseLoopFrontend::start_backend(backend.clone(), FuseLoopConfig::new(tmp.path().join("m")))
            .expect("start");
    let dev = frontend.device_path().expect("loop device").to_path_buf();
    let name = dev.file_name().unwrap().to_str().unwrap().to_owned();
    assert_eq!(fs::read_to_string(format!("/sys/block/{name}/ro")).unwrap().trim(), "1");
    let before = backend.data.lock().unwrap().clone();
    let got = fs::read(&dev).unwrap();
    assert_eq!(got, before);
    // The volume file itself: mode 0400, an open for writing refused with EROFS.
    let volume = frontend.volume_path().to_path_buf();
    assert_eq!(fs::metadata(&volume).unwrap().mode() & 0o777, 0o400);
    let e = OpenOptions::new().write(true).open(&volume).expect_err("open for writing");
    assert_eq!(e.raw_os_error(), Some(nix::errno::Errno::EROFS as i32), "{e}");
    // The loop device refuses writes.
    let w = OpenOptions::new()
        .write(true)
        .open(&dev)
        .and_then(|f| f.write_all_at(&[1; 4096], 0).and_then(|()| f.sync_all()));
    assert!(w.is_err(), "a write to the read-only device succeeded");
    assert_eq!(backend.mutations.load(Ordering::SeqCst), 0);
    assert_eq!(*backend.data.lock().unwrap(), before);
    frontend.shutdown().expect("teardown");
}

/// A large read-only volume whose every read is one copy from a 1 MiB block in memory:
/// what the frontend alone costs, without any disk behind it.
#[derive(Debug)]
struct PatternBackend {
    len: u64,
    block: Vec<u8>,
    requests: Mutex<Vec<u64>>,
}

impl BlockBackend for PatternBackend {
    fn size(&self) -> u64 {
        self.len
    }

    fn read_only(&self) -> bool {
        true
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), TapError> {
        self.requests.lock().unwrap().push(buf.len() as u64);
        let mut done = 0;
        while done < buf.len() {
            let at = ((offset + done as u64) % self.block.len() as u64) as usize;
            let n = (self.block.len() - at).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&self.block[at..at + n]);
            done += n;
        }
        Ok(())
    }

    fn write(&self, _: u64, _: &[u8]) -> Result<(), TapError> {
        unreachable!("read-only")
    }

    fn flush(&self) -> Result<(), TapError> {
        Ok(())
    }

    fn discard(&self, _: u64, _: u64) -> Result<(), TapError> {
        unreachable!("read-only")
    }

    fn write_zeroes(&self, _: u64, _: u64) -> Result<(), TapError> {
        unreachable!("read-only")
    }
}

/// The frontend's read ceiling: sequential 1 MiB O_DIRECT reads of a read-only backend's
/// loop device, one at a time, as the recover benchmark reads a vsnap; prints MB/s and the
/// FUSE requests' sizes (`FUSE_THREADS=N` sets the serving threads, 4 by default). Run with
/// `cargo test --release -p tidemark-tap --test fuse_backend -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement: prints the frontend's sequential O_DIRECT read throughput"]
fn throughput_sequential_direct_reads_of_a_read_only_backend() {
    if !privileged("throughput_sequential_direct_reads_of_a_read_only_backend") {
        return;
    }
    const LEN: u64 = 2 << 30;
    const READ: usize = 1 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let block = (0..READ).map(|i| (i * 7 + i / 4096) as u8).collect();
    let backend = Arc::new(PatternBackend { len: LEN, block, requests: Mutex::new(Vec::new()) });
    let mut cfg = FuseLoopConfig::new(tmp.path().join("m"));
    if let Some(t) = std::env::var("FUSE_THREADS").ok().and_then(|t| t.parse().ok()) {
        cfg.threads = t;
    }
    let frontend = FuseLoopFrontend::start_backend(backend.clone(), cfg).expect("start");
    let dev = frontend.device_path().expect("loop device").to_path_buf();
    let name = dev.file_name().unwrap().to_str().unwrap().to_owned();
    let sysfs = |f: &str| fs::read_to_string(format!("/sys/block/{name}/{f}")).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&dev)
        .expect("open O_DIRECT");
    let mut raw = vec![0u8; READ + 4096];
    let off = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[off..off + READ];
    let start = std::time::Instant::now();
    let mut pos = 0;
    while pos < LEN {
        f.read_exact_at(buf, pos).unwrap();
        pos += READ as u64;
    }
    let took = start.elapsed();
    assert_eq!(buf[..4096], backend.block[..4096], "the last read's bytes differ");
    let requests = backend.requests.lock().unwrap().clone();
    let largest = requests.iter().max().copied().unwrap_or(0);
    println!(
        "{}: loop dio={} max_sectors_kb={} max_segments={}; {} MiB in {:.3} s: {:.0} MB/s; \
         {} FUSE reads, mean {} KiB, largest {} KiB",
        dev.display(),
        sysfs("loop/dio").trim(),
        sysfs("queue/max_sectors_kb").trim(),
        sysfs("queue/max_segments").trim(),
        LEN >> 20,
        took.as_secs_f64(),
        LEN as f64 / took.as_secs_f64() / 1e6,
        requests.len(),
        (LEN / requests.len().max(1) as u64) >> 10,
        largest >> 10,
    );
    drop(f);
    frontend.shutdown().expect("teardown");
}
