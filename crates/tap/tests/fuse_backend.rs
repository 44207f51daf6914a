//! The FUSE + loop frontend serving a `BlockBackend` other than the tap (an in-memory one):
//! block I/O at `/dev/loopN` reaches it (reads, writes, flushes, discards), and a read-only
//! backend gets a read-only loop device and volume file: writes are refused with `EROFS` and
//! never reach it.
//!
//! Needs root, `/dev/fuse` and loop devices; where they are missing each test prints a loud
//! SKIPPED line and returns.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
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
