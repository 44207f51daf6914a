//! Virtual snapshots served over ublk: the fourth guest suite of `cargo xtask lab` (a QEMU
//! guest running Debian's 6.12 kernel with `ublk_drv`), built as a test binary without the
//! libtest harness.
//!
//! The target side only, in one process: a retention log in tmpfs whose base image (the
//! replica) holds a freshly made ext4, and whose journal holds the blocks `debugfs` changed
//! when it wrote a file into it, then a bookmark, then later writes that scribble over the
//! file's blocks and the superblock (so the point differs from both the base and the
//! current image). A [`Vsnap`] of the bookmark is served by `UblkServer::start_backend` as
//! `/dev/ublkb<N>`:
//!
//! - read-only: the device's bytes are the point's (the image `debugfs` wrote, and the hash
//!   `RetentionLog::materialize` reports); opening it for writing fails (a read-only disk);
//!   the ext4 mounts read-only and the file reads back with its BLAKE3;
//! - read-write (a DR drill): raw writes to the device succeed, read back through the device
//!   and through the vsnap itself (so they reached the overlay); the ext4 mounts read-write,
//!   takes a new file and `e2fsck -fn` finds it clean; after the device is stopped and the
//!   vsnap dropped, the overlay file is gone and the base image, the journal's files, the
//!   point's bytes and the current image are all unchanged.
//!
//! - `tidemark recover --frontend auto` (the agent binary, `/bin/tidemark` in the guest) on
//!   the same directory, laid out as `receive` leaves it (`replica.img`, `journal/`): it
//!   chooses ublk (`frontend: ublk`, a `/dev/ublkb<N>` device) whose bytes are the point's,
//!   and SIGTERM removes it.
//!
//! - `vsnap_ublk_lab --lab`: the guest run; prints `TIDEMARK-LAB: PASS <test>` /
//!   `TIDEMARK-LAB: FAIL <test>: <why>` per test, then `TIDEMARK-LAB: PASS <n> tests` or
//!   `TIDEMARK-LAB: FAIL <k> of <n> tests`. A missing `/dev/ublk-control` is a failure.
//! - no argument (as `cargo test` runs it): without `/dev/ublk-control` it says loudly that
//!   it skipped; on a host with `ublk_drv`, root and e2fsprogs it runs the same tests in a
//!   temporary directory.

mod lab_common;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tidemark_journal::{
    BlockIo, Bookmark, BookmarkKind, Clock, Event, FileIo, FsDir, MemVolume, RecoveryPoint,
    RetentionConfig, RetentionLog, Seq, SystemClock, VolumeId,
};
use tidemark_sync::ship::error_chain as chain;
use tidemark_sync::vsnap::{OverlayStore, Vsnap, VsnapMode, with_log};
use tidemark_tap::{BlockBackend, UblkConfig, UblkServer, ublk};

use lab_common::{PREFIX, Tally, TestResult, e, ensure, path_str, pattern, run};

/// The volume's size.
const VOLUME: u64 = 32 << 20;
const BLOCK: u64 = 4096;
/// The file `debugfs` writes into the ext4 before the bookmark.
const FILE: &str = "payload.bin";
const FILE_LEN: usize = 300 << 10;
const BOOKMARK: &str = "lab";

/// BLAKE3 of the first `len` bytes of the file or device at `path`.
fn hash_path(path: &Path, len: u64) -> TestResult<blake3::Hash> {
    let f = File::open(path).map_err(e(&format!("open {}", path.display())))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], at)
            .map_err(e(&format!("read {} at {at}", path.display())))?;
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    Ok(hasher.finalize())
}

/// The journal's files and their sizes.
fn dir_listing(dir: &Path) -> TestResult<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(dir).map_err(e(&format!("list {}", dir.display())))? {
        let entry = entry.map_err(e("dir entry"))?;
        let len = entry.metadata().map_err(e("stat"))?.len();
        out.insert(entry.file_name().to_string_lossy().into_owned(), len);
    }
    Ok(out)
}

/// The target: a retention log over a base image, and what the tests compare against.
struct Rig {
    work: PathBuf,
    log: Arc<Mutex<RetentionLog>>,
    /// BLAKE3 of the point's image (as `debugfs` left it) and of the file in it.
    point_hash: blake3::Hash,
    file_hash: blake3::Hash,
    /// BLAKE3 of the base image and of the current image, and the journal's files, before
    /// any vsnap.
    base_hash: blake3::Hash,
    current_hash: blake3::Hash,
    journal: BTreeMap<String, u64>,
}

impl Rig {
    fn base_path(&self) -> PathBuf {
        self.work.join("replica.img")
    }

    fn current_hash(&self) -> TestResult<blake3::Hash> {
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < VOLUME {
            with_log(&*self.log, |l| l.read_current(VolumeId(0), at, &mut buf))
                .map_err(|err| format!("read_current at {at}: {}", chain(&err)))?;
            hasher.update(&buf);
            at += buf.len() as u64;
        }
        Ok(hasher.finalize())
    }

    fn point_materialized_hash(&self) -> TestResult<blake3::Hash> {
        let out = MemVolume::new(0);
        let report = with_log(&*self.log, |l| {
            let p = l.resolve(&RecoveryPoint::Bookmark(BOOKMARK.into()))?;
            l.materialize(&p, VolumeId(0), &out, &mut |_, _| {})
        })
        .map_err(|err| format!("materialize the point: {}", chain(&err)))?;
        Ok(blake3::Hash::from(report.hash))
    }

    /// Checks that nothing a vsnap did reached the log, its base image or its journal.
    fn unchanged(&self) -> TestResult {
        ensure!(
            hash_path(&self.base_path(), VOLUME)? == self.base_hash,
            "the base image (replica) changed"
        );
        ensure!(
            dir_listing(&self.work.join("journal"))? == self.journal,
            "the journal's files changed"
        );
        ensure!(self.point_materialized_hash()? == self.point_hash, "the point's bytes changed");
        ensure!(self.current_hash()? == self.current_hash, "the current image changed");
        Ok(())
    }
}

/// Builds the log (see the module documentation).
fn setup(work: &Path) -> TestResult<Rig> {
    fs::create_dir_all(work.join("journal")).map_err(e("mkdir work"))?;
    let image = work.join("fs.img");
    // The layout of a `tidemark receive` directory, for the `tidemark recover` test.
    let base_path = work.join("replica.img");
    File::create(&image)
        .and_then(|f| f.set_len(VOLUME))
        .map_err(e(&format!("create {}", image.display())))?;
    let image_s = path_str(&image)?;
    run("mkfs.ext4", &["-F", "-q", "-b", "4096", "-E", "nodiscard", image_s])?;
    fs::copy(&image, &base_path).map_err(e("copy the image to the base"))?;
    let payload = pattern(7, FILE_LEN);
    let payload_path = work.join("payload");
    fs::write(&payload_path, &payload).map_err(e("write the payload"))?;
    run("debugfs", &["-w", "-R", &format!("write {} {FILE}", path_str(&payload_path)?), image_s])?;
    let point = fs::read(&image).map_err(e("read the image"))?;
    let base = fs::read(&base_path).map_err(e("read the base"))?;
    ensure!(point.len() as u64 == VOLUME, "the image holds {} bytes", point.len());

    let base_io: Arc<dyn BlockIo> = Arc::new(FileIo::open(&base_path).map_err(e("open base"))?);
    let journal_dir = Arc::new(FsDir::new(work.join("journal")).map_err(e("journal dir"))?);
    let (mut log, _) = RetentionLog::open(
        journal_dir,
        vec![base_io],
        RetentionConfig { segment_bytes: 8 << 20, ..Default::default() },
        Arc::new(SystemClock),
    )
    .map_err(|err| format!("open the retention log: {}", chain(&err)))?;
    let clock = SystemClock;
    let mut seq = 0u64;
    let mut append = |log: &mut RetentionLog, event: Event| -> TestResult {
        seq += 1;
        log.append(Seq(seq), clock.now(), &event)
            .map_err(|err| format!("append seq {seq}: {}", chain(&err)))
    };
    // The blocks debugfs changed, as the journal would hold them.
    let mut changed = Vec::new();
    for b in 0..VOLUME / BLOCK {
        let r = (b * BLOCK) as usize..((b + 1) * BLOCK) as usize;
        if point[r.clone()] != base[r.clone()] {
            changed.push(b);
            let data = point[r].to_vec();
            append(
                &mut log,
                Event::Write { volume: VolumeId(0), offset: b * BLOCK, data: data.into() },
            )?;
        }
    }
    ensure!(changed.len() > 4, "debugfs changed only {} blocks", changed.len());
    let mark = Bookmark::new(BOOKMARK, BookmarkKind::User, 0).map_err(|err| chain(&err))?;
    append(&mut log, Event::Bookmark(mark))?;
    // After the point: scribble over every block it changed and over block 0.
    for (i, &b) in changed.iter().chain([0u64].iter()).enumerate() {
        let data = pattern(1000 + i as u64, BLOCK as usize);
        append(
            &mut log,
            Event::Write { volume: VolumeId(0), offset: b * BLOCK, data: data.into() },
        )?;
    }
    append(&mut log, Event::Barrier)?;
    log.sync().map_err(|err| format!("sync the log: {}", chain(&err)))?;

    let mut rig = Rig {
        work: work.to_path_buf(),
        log: Arc::new(Mutex::new(log)),
        point_hash: blake3::hash(&point),
        file_hash: blake3::hash(&payload),
        base_hash: blake3::hash(&base),
        current_hash: blake3::hash(&[]),
        journal: dir_listing(&work.join("journal"))?,
    };
    rig.current_hash = rig.current_hash()?;
    ensure!(rig.current_hash != rig.point_hash, "the later writes left the point's image");
    ensure!(rig.base_hash != rig.point_hash, "the base already is the point");
    ensure!(
        rig.point_materialized_hash()? == rig.point_hash,
        "materialize of the point differs from the image debugfs wrote"
    );
    Ok(rig)
}

fn start(vsnap: &Arc<Vsnap>) -> TestResult<UblkServer> {
    let cfg = UblkConfig { depth: 16, ..UblkConfig::default() };
    UblkServer::start_backend(cfg, vsnap.clone())
        .map_err(|err| format!("start the ublk device: {}", chain(&err)))
}

fn open_vsnap(rig: &Rig, mode: VsnapMode, name: &str) -> TestResult<Arc<Vsnap>> {
    let point = RecoveryPoint::Bookmark(BOOKMARK.into());
    Vsnap::open(rig.log.clone(), &point, VolumeId(0), mode, name)
        .map(Arc::new)
        .map_err(|err| format!("open the vsnap: {}", chain(&err)))
}

fn mount(dev: &Path, mnt: &Path, options: &str) -> TestResult {
    fs::create_dir_all(mnt).map_err(e("mkdir mnt"))?;
    run("mount", &["-t", "ext4", "-o", options, path_str(dev)?, path_str(mnt)?]).map(|_| ())
}

/// Read-only: the device reads as the point, refuses writes, mounts read-only.
fn test_read_only(rig: &Rig) -> TestResult<String> {
    let vsnap = open_vsnap(rig, VsnapMode::ReadOnly, "lab-ro")?;
    let server = start(&vsnap)?;
    let dev = server.block_path();
    let checked = (|| -> TestResult<String> {
        let read = hash_path(&dev, VOLUME)?;
        ensure!(
            read == rig.point_hash,
            "{} reads with blake3 {read}, the point is {}",
            dev.display(),
            rig.point_hash
        );
        match OpenOptions::new().write(true).open(&dev) {
            Err(_) => {}
            Ok(f) => {
                let wrote = f.write_all_at(&[0xaa; 4096], 0).and_then(|()| f.sync_all());
                ensure!(wrote.is_err(), "a write to the read-only {} succeeded", dev.display());
            }
        }
        let mnt = rig.work.join("mnt-ro");
        mount(&dev, &mnt, "ro")?;
        let file = fs::read(mnt.join(FILE)).map_err(e("read the file on the snapshot"));
        let unmounted = run("umount", &[path_str(&mnt)?]);
        let file = file?;
        unmounted?;
        ensure!(blake3::hash(&file) == rig.file_hash, "{FILE} on the snapshot has other bytes");
        let stats = server.stats();
        ensure!(stats.reads > 0 && stats.writes == 0, "unexpected counters {stats:?}");
        Ok(format!(
            "{}: {} reads, {} bytes; the point's blake3 {}",
            dev.display(),
            stats.reads,
            stats.bytes_read,
            rig.point_hash
        ))
    })();
    let stopped = server.stop().map_err(|err| format!("stop the device: {}", chain(&err)));
    let info = checked?;
    stopped?;
    drop(vsnap);
    rig.unchanged()?;
    Ok(info)
}

/// Read-write: writes land in the overlay only and are thrown away with it.
fn test_read_write(rig: &Rig) -> TestResult<String> {
    let overlay = rig.work.join("overlay");
    let vsnap =
        open_vsnap(rig, VsnapMode::ReadWrite(OverlayStore::File(overlay.clone())), "lab-rw")?;
    let server = start(&vsnap)?;
    let dev = server.block_path();
    let checked = (|| -> TestResult<String> {
        ensure!(
            hash_path(&dev, VOLUME)? == rig.point_hash,
            "the drill device does not start at the point"
        );
        // Raw writes near the end of the volume (outside the ext4's metadata written so far),
        // one at an odd 512-byte offset.
        let f = OpenOptions::new().read(true).write(true).open(&dev).map_err(e("open rw"))?;
        let writes =
            [(VOLUME - (1 << 20), pattern(51, 64 << 10)), (VOLUME - 8192 + 512, pattern(52, 2048))];
        for (at, data) in &writes {
            f.write_all_at(data, *at).map_err(e(&format!("write at {at}")))?;
        }
        f.sync_all().map_err(e("fsync the device"))?;
        for (at, data) in &writes {
            let mut back = vec![0u8; data.len()];
            f.read_exact_at(&mut back, *at).map_err(e("read back"))?;
            ensure!(&back == data, "the device reads other bytes back at {at}");
            back.fill(0);
            vsnap.read(*at, &mut back).map_err(|err| chain(&err))?;
            ensure!(&back == data, "the vsnap's overlay holds other bytes at {at}");
        }
        drop(f);
        let mnt = rig.work.join("mnt-rw");
        mount(&dev, &mnt, "rw")?;
        let drill = pattern(53, 100 << 10);
        let wrote = (|| -> TestResult {
            let old = fs::read(mnt.join(FILE)).map_err(e("read the file"))?;
            ensure!(
                blake3::hash(&old) == rig.file_hash,
                "{FILE} on the drill device has other bytes"
            );
            fs::write(mnt.join("drill.bin"), &drill).map_err(e("write drill.bin"))?;
            run("sync", &[]).map(|_| ())
        })();
        let unmounted = run("umount", &[path_str(&mnt)?]);
        wrote?;
        unmounted?;
        run("e2fsck", &["-fn", path_str(&dev)?])?;
        let stats = server.stats();
        ensure!(stats.writes > 0 && stats.errors == 0, "unexpected counters {stats:?}");
        Ok(format!("{} writes, {} flushes", stats.writes, stats.flushes))
    })();
    let stopped = server.stop().map_err(|err| format!("stop the device: {}", chain(&err)));
    let info = checked?;
    stopped?;
    let blocks = vsnap.overlay_blocks();
    ensure!(blocks > 0, "the overlay holds no block after the drill's writes");
    ensure!(Arc::strong_count(&vsnap) == 1, "the stopped server still holds the vsnap");
    drop(vsnap);
    ensure!(!overlay.exists(), "the overlay file outlived the vsnap");
    rig.unchanged()?;
    Ok(format!("{info}; overlay of {blocks} blocks thrown away; replica and journal unchanged"))
}

/// `tidemark recover --expose ro --frontend auto` on the rig's directory: ublk is chosen
/// and serves the point; SIGTERM removes it.
fn test_recover_cli(rig: &Rig, tidemark: &Path) -> TestResult<String> {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::sync::mpsc;

    let mut child = Command::new(tidemark)
        .args([
            "recover",
            "--dir",
            path_str(&rig.work)?,
            "--point",
            &format!("bookmark:{BOOKMARK}"),
        ])
        .args(["--expose", "ro", "--frontend", "auto"])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(e(&format!("start {}", tidemark.display())))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, lines) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let patience = std::time::Duration::from_secs(120);
    let mut seen = Vec::new();
    let checked = (|| -> TestResult<String> {
        let deadline = Instant::now() + patience;
        while !seen.iter().any(|l: &String| l.starts_with("ready:")) {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => seen.push(line),
                Err(_) => return Err(format!("recover printed no ready line: {seen:?}")),
            }
        }
        let field =
            |key: &str| seen.iter().find_map(|l| l.strip_prefix(key)).map(|v| v.trim().to_owned());
        let frontend = field("frontend:").ok_or_else(|| format!("no frontend line: {seen:?}"))?;
        ensure!(frontend == "ublk", "auto chose {frontend} with ublk_drv loaded");
        let dev = field("device:").ok_or_else(|| format!("no device line: {seen:?}"))?;
        ensure!(dev.starts_with("/dev/ublkb"), "the ublk frontend gave device {dev}");
        let read = hash_path(Path::new(&dev), VOLUME)?;
        ensure!(read == rig.point_hash, "{dev} reads with blake3 {read}, not the point's");
        Ok(dev)
    })();
    let pid = libc::pid_t::try_from(child.id()).map_err(e("pid"))?;
    // SAFETY: kill has no memory effects; the pid is our child's, not yet reaped.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + patience;
    let status = loop {
        if let Some(st) = child.try_wait().map_err(e("wait for recover"))? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err("recover did not stop after SIGTERM".into());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let _ = reader.join();
    seen.extend(lines.try_iter());
    let dev = checked?;
    ensure!(status.success(), "recover exited with {status} after SIGTERM: {seen:?}");
    ensure!(seen.iter().any(|l| l.starts_with("removed:")), "no removed line: {seen:?}");
    ensure!(!Path::new(&dev).exists(), "{dev} outlived recover");
    Ok(format!("recover served {dev} over ublk and removed it"))
}

/// Every test, in `work`; a test whose setup failed is reported failed.
fn run_all(work: &Path, tidemark: Option<&Path>) -> ExitCode {
    let mut tally = Tally::default();
    let rig = tally.report("vsnap_ublk_setup", || {
        ublk::probe(Path::new(ublk::sys::CONTROL_PATH)).map_err(|err| chain(&err))?;
        setup(work)
    });
    let ro = tally.report("vsnap_ublk_read_only_reads_the_point_and_mounts", || match &rig {
        Some(rig) => test_read_only(rig),
        None => Err("needs vsnap_ublk_setup".into()),
    });
    if let Some(info) = ro {
        println!("{PREFIX} info read-only vsnap: {info}");
    }
    let rw =
        tally.report("vsnap_ublk_read_write_drill_leaves_replica_and_journal", || match &rig {
            Some(rig) => test_read_write(rig),
            None => Err("needs vsnap_ublk_setup".into()),
        });
    if let Some(info) = rw {
        println!("{PREFIX} info drill vsnap: {info}");
    }
    // Last: `recover` opens the journal itself (the tests above compare its files).
    let cli = tally.report("vsnap_ublk_recover_cli_auto_picks_ublk", || match (&rig, tidemark) {
        (Some(rig), Some(bin)) => test_recover_cli(rig, bin),
        (None, _) => Err("needs vsnap_ublk_setup".into()),
        (_, None) => {
            Err("no tidemark binary (/bin/tidemark in the guest, TIDEMARK_BIN on a host)".into())
        }
    });
    if let Some(info) = cli {
        println!("{PREFIX} info {info}");
    }
    tally.finish()
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("--lab") {
        let work = PathBuf::from("/tmp/vsnap-ublk-lab");
        let _ = fs::remove_dir_all(&work);
        return run_all(&work, Some(Path::new("/bin/tidemark")));
    }
    if let Err(err) = ublk::probe(Path::new(ublk::sys::CONTROL_PATH)) {
        let rule = "!".repeat(78);
        eprintln!(
            "\n{rule}\n!!! SKIPPED: no ublk_drv on this kernel (run cargo xtask lab)\n!!! ({})\n{rule}\n",
            chain(&err)
        );
        println!("vsnap_ublk_lab: SKIPPED (no ublk_drv on this kernel; run cargo xtask lab)");
        return ExitCode::SUCCESS;
    }
    match tempfile::tempdir() {
        Ok(dir) => {
            let bin = std::env::var_os("TIDEMARK_BIN").map(PathBuf::from);
            run_all(dir.path(), bin.as_deref())
        }
        Err(err) => {
            eprintln!("vsnap_ublk_lab: tempdir: {err}");
            ExitCode::FAILURE
        }
    }
}
