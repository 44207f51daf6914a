//! The operating-system facts the benchmarks need: CPU time and peak memory of this process,
//! the filesystem under a path, evicting files from the page cache, and running commands.

use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// Resource usage of this process (all its threads).
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// User plus system CPU time.
    pub cpu: Duration,
    /// User CPU time alone.
    pub user: Duration,
    /// Peak resident set size, in bytes.
    pub max_rss: u64,
}

fn timeval(t: libc::timeval) -> Duration {
    Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
}

/// `getrusage(RUSAGE_SELF)`.
pub fn usage() -> Usage {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `ru` is a properly aligned, writable `struct rusage` that lives across the
    // call; getrusage only writes into it.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) };
    assert_eq!(rc, 0, "getrusage(RUSAGE_SELF) cannot fail: {}", std::io::Error::last_os_error());
    // SAFETY: zero bytes are a valid `struct rusage` (plain integers), and getrusage succeeded.
    let ru = unsafe { ru.assume_init() };
    Usage {
        cpu: timeval(ru.ru_utime) + timeval(ru.ru_stime),
        user: timeval(ru.ru_utime),
        // Linux reports kilobytes.
        max_rss: ru.ru_maxrss.max(0) as u64 * 1024,
    }
}

/// User plus system CPU time of this process so far.
pub fn cpu_time() -> Duration {
    usage().cpu
}

/// The filesystem type under `path`, by its statfs magic number (with the number for
/// types this table does not know).
pub fn fs_type(path: &Path) -> Result<String> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path and `st` a writable `struct statfs`, both alive
    // across the call; statfs only reads the path and writes the struct.
    let rc = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    // SAFETY: statfs succeeded, so it filled the struct (which was zeroed before anyway).
    let st = unsafe { st.assume_init() };
    let magic = st.f_type as u64 & 0xffff_ffff;
    let name = match magic {
        0xef53 => "ext2/3/4",
        0x5846_5342 => "xfs",
        0x9123_683e => "btrfs",
        0x2fc1_2fc1 => "zfs",
        0xf2f5_2010 => "f2fs",
        0x0102_1994 => "tmpfs",
        0x8584_58f6 => "ramfs",
        0x794c_7630 => "overlayfs",
        0x6969 => "nfs",
        0x6573_5546 => "fuse",
        _ => return Ok(format!("unknown (statfs magic {magic:#x})")),
    };
    Ok(name.to_owned())
}

/// True for filesystems that keep files in memory, where I/O figures mean nothing.
pub fn is_memory_fs(fs_type: &str) -> bool {
    matches!(fs_type, "tmpfs" | "ramfs")
}

/// Writes back and then drops the page-cache pages of one file, so the next reads of it
/// come from the disk (POSIX_FADV_DONTNEED only drops clean pages, hence the sync first).
pub fn evict_file(path: &Path) -> Result<()> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    f.sync_data().with_context(|| format!("fdatasync {}", path.display()))?;
    // SAFETY: posix_fadvise on a descriptor we own for the call's duration; it reads no
    // memory of ours.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc))
            .with_context(|| format!("posix_fadvise(DONTNEED) {}", path.display()));
    }
    Ok(())
}

/// [`evict_file`] for every regular file directly in `dir`.
pub fn evict_dir(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            evict_file(&entry.path())?;
        }
    }
    Ok(())
}

/// Lets the filesystem under `dir` settle before a measurement: `syncfs` writes back
/// everything dirty and waits for a journal commit, which also finishes the discards that a
/// `discard` mount issues for files deleted by the previous measurement (otherwise they land
/// in the next measurement's first fdatasync).
pub fn settle(dir: &Path) -> Result<()> {
    let d = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    // SAFETY: syncfs on a descriptor we own for the call's duration; it reads no memory of
    // ours.
    let rc = unsafe { libc::syncfs(d.as_raw_fd()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("syncfs {}", dir.display()));
    }
    Ok(())
}

/// Total bytes of the regular files directly in `dir`.
pub fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}

/// Runs a command to completion, failing with its stderr when it exits unsuccessfully.
pub fn run_command(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out)
}

/// The 1-, 5- and 15-minute load averages, as `/proc/loadavg` shows them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// True when `program --version` runs and succeeds.
pub fn program_available(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The first line `program --version` prints, for reference strings.
pub fn program_version(program: &str) -> Option<String> {
    let out = Command::new(program).arg("--version").stdin(Stdio::null()).output().ok()?;
    String::from_utf8_lossy(&out.stdout).lines().next().map(|l| l.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_moves_forward() {
        let a = usage();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(std::hint::black_box(i));
        }
        std::hint::black_box(x);
        let b = usage();
        assert!(b.cpu >= a.cpu);
        assert!(b.max_rss > 0);
    }

    #[test]
    fn fs_type_of_root() {
        assert!(!fs_type(Path::new("/")).unwrap().is_empty());
    }
}
