//! `cargo xtask lab`: the kernel lab. Boots Debian's 6.12 cloud kernel (which has
//! `ublk_drv` and device-mapper as modules) under QEMU's software emulation, with the
//! guest tests in the initramfs and four virtio disks, and reads the results off the
//! serial console.
//!
//! Steps: install the host tools it needs (`qemu-system-x86`, `busybox-static`, `cpio`,
//! `xz-utils`, `e2fsprogs`, `dmsetup`) when missing; fetch the newest
//! `linux-image-6.12.*-cloud-amd64-unsigned` with `apt-get download` and unpack it with
//! `dpkg -x` under `target/lab/kernel/` (kept, so later runs reuse it); build the guest
//! test binary (`tidemark-tap`'s `ublk_lab` test, release); assemble an initramfs with
//! busybox, the decompressed modules in dependency order, the test binary,
//! `mkfs.ext4`/`e2fsck`/`dmsetup` and every shared library `ldd` names for them; boot;
//! stream the console; pass only on the guest's last line `TIDEMARK-LAB: PASS <n> tests`.
//!
//! Timings inside the guest mean nothing (TCG emulates the CPU); only correctness counts.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use std::{env, fs, thread};

use anyhow::{Context, Result, bail, ensure};

use crate::{command_exists, format_duration, is_root, run_command};

/// Host packages the lab needs, each with a command proving it is installed.
const LAB_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "qemu-system-x86_64"),
    ("busybox-static", "busybox"),
    ("cpio", "cpio"),
    ("xz-utils", "xz"),
    ("e2fsprogs", "e2fsck"),
    ("dmsetup", "dmsetup"),
];

/// The kernel package family (bookworm backports): has ublk_drv, dm-log-writes, virtio_blk.
const KERNEL_PATTERN: &str = r"^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64-unsigned$";

/// Modules loaded in the guest (their dependencies are added first).
const MODULES: &[&str] = &["virtio_blk", "dm-mod", "dm-bufio", "dm-log-writes", "ublk_drv"];

/// Programs copied into the guest's `/sbin` with their libraries.
const GUEST_TOOLS: &[&str] = &["mkfs.ext4", "e2fsck", "dmsetup"];

/// The guest's disks: name and size in MiB. vda sits behind the ublk device of tests 1-3,
/// vdb/vdc are dm-log-writes' data and log devices, vdd sits behind the recovery test's.
const DISKS: &[(&str, u64)] = &[("vda", 64), ("vdb", 32), ("vdc", 64), ("vdd", 32)];

/// Overall limit on the guest's run, unless `TIDEMARK_LAB_TIMEOUT` (seconds) says otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
const TIMEOUT_ENV: &str = "TIDEMARK_LAB_TIMEOUT";

/// What every result line of the guest starts with.
const MARK: &str = "TIDEMARK-LAB:";

/// `cargo xtask lab`: returns a one-line summary (the guest's verdict) on success.
pub fn lab(root: &Path) -> Result<String> {
    let start = Instant::now();
    let lab_dir = root.join("target").join("lab");
    fs::create_dir_all(&lab_dir).with_context(|| format!("creating {}", lab_dir.display()))?;

    install_tools()?;
    let kernel = kernel(&lab_dir)?;
    println!("lab: kernel {} ({})", kernel.release, kernel.vmlinuz.display());
    let test_bin = build_test_binary(root)?;
    println!("lab: guest test binary {}", test_bin.display());
    let initrd = initramfs(&lab_dir, &kernel, &test_bin)?;
    let disks = disks(&lab_dir)?;
    let timeout = timeout()?;
    println!("lab: host side ready in {}", format_duration(start.elapsed()));
    let verdict = boot(&kernel, &initrd, &disks, timeout)?;
    println!("==> lab: {verdict} (wall time {})", format_duration(start.elapsed()));
    Ok(verdict)
}

fn timeout() -> Result<Duration> {
    match env::var(TIMEOUT_ENV) {
        Ok(v) if !v.trim().is_empty() => {
            let secs: u64 =
                v.trim().parse().with_context(|| format!("{TIMEOUT_ENV}=`{v}` is not seconds"))?;
            ensure!(secs > 0, "{TIMEOUT_ENV} must be at least 1");
            Ok(Duration::from_secs(secs))
        }
        _ => Ok(DEFAULT_TIMEOUT),
    }
}

// ---------------------------------------------------------------------------------------
// Host tools
// ---------------------------------------------------------------------------------------

fn install_tools() -> Result<()> {
    let missing: Vec<&str> = LAB_PACKAGES
        .iter()
        .filter(|(_, probe)| !command_exists(probe))
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    ensure!(
        is_root(),
        "the lab needs these packages and only root can install them: {}",
        missing.join(" ")
    );
    println!("lab: installing {}", missing.join(" "));
    if !apt(&["install", "-y", "--no-install-recommends"], &missing)? {
        ensure!(apt(&["update"], &[])?, "apt-get update failed");
        ensure!(
            apt(&["install", "-y", "--no-install-recommends"], &missing)?,
            "apt-get install {} failed",
            missing.join(" ")
        );
    }
    Ok(())
}

fn apt(args: &[&str], packages: &[&str]) -> Result<bool> {
    let status = Command::new("apt-get")
        .args(args)
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("could not start apt-get")?;
    Ok(status.success())
}

/// Finds a program the way the guest tools are found: `PATH` plus the sbin directories.
fn which(name: &str) -> Result<PathBuf> {
    let path = env::var("PATH").unwrap_or_default();
    let dirs = path.split(':').chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"]);
    for dir in dirs.filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("`{name}` not found on PATH or in the sbin directories")
}

// ---------------------------------------------------------------------------------------
// Kernel
// ---------------------------------------------------------------------------------------

/// An unpacked kernel package.
#[derive(Debug)]
struct Kernel {
    release: String,
    vmlinuz: PathBuf,
    modules: PathBuf,
}

/// The cached kernel under `target/lab/kernel/<package>/`, fetching the newest one first
/// when none is cached.
fn kernel(lab_dir: &Path) -> Result<Kernel> {
    let cache = lab_dir.join("kernel");
    if let Some(kernel) = cached_kernel(&cache)? {
        return Ok(kernel);
    }
    let mut package = newest_kernel_package()?;
    if package.is_none() {
        println!("lab: no 6.12 cloud kernel in the apt lists; running apt-get update");
        ensure!(apt(&["update"], &[])?, "apt-get update failed");
        package = newest_kernel_package()?;
    }
    let package = package.context("apt-cache lists no linux-image-6.12.*-cloud-amd64-unsigned")?;
    let download = lab_dir.join("download");
    let _ = fs::remove_dir_all(&download);
    fs::create_dir_all(&download)?;
    // apt drops privileges to `_apt` for downloads; let it write here.
    let _ = fs::set_permissions(&download, fs::Permissions::from_mode(0o777));
    run_command(Command::new("apt-get").current_dir(&download).args(["download", &package]))?;
    let deb = fs::read_dir(&download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")?;
    let unpacked = cache.join(&package);
    let partial = cache.join(format!("{package}.partial"));
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial)?;
    run_command(Command::new("dpkg").arg("-x").arg(&deb).arg(&partial))?;
    fs::rename(&partial, &unpacked)?;
    let _ = fs::remove_dir_all(&download);
    cached_kernel(&cache)?.context("the unpacked kernel package has no vmlinuz or modules")
}

fn cached_kernel(cache: &Path) -> Result<Option<Kernel>> {
    let Ok(entries) = fs::read_dir(cache) else { return Ok(None) };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && !p.to_string_lossy().ends_with(".partial"))
        .collect();
    dirs.sort_by(|a, b| version_cmp(&a.to_string_lossy(), &b.to_string_lossy()));
    for dir in dirs.iter().rev() {
        let Ok(boot) = fs::read_dir(dir.join("boot")) else { continue };
        let Some(vmlinuz) = boot
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        else {
            continue;
        };
        let release = vmlinuz
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
            .unwrap_or_default()
            .to_owned();
        let modules = dir.join("lib/modules").join(&release);
        if modules.is_dir() {
            return Ok(Some(Kernel { release, vmlinuz, modules }));
        }
    }
    Ok(None)
}

fn newest_kernel_package() -> Result<Option<String>> {
    let out = Command::new("apt-cache")
        .args(["search", "--names-only", KERNEL_PATTERN])
        .output()
        .context("could not run apt-cache")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut names: Vec<&str> = text.lines().filter_map(|l| l.split_whitespace().next()).collect();
    names.sort_by(|a, b| version_cmp(a, b));
    Ok(names.last().map(|s| (*s).to_owned()))
}

/// Compares strings with embedded numbers numerically (`6.12.9` < `6.12.113`).
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> Vec<Result<u64, String>> {
        let mut out = Vec::new();
        let mut chars = s.chars().peekable();
        while let Some(&c) = chars.peek() {
            let digit = c.is_ascii_digit();
            let mut run = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_ascii_digit() != digit {
                    break;
                }
                run.push(c);
                chars.next();
            }
            out.push(if digit { Ok(run.parse().unwrap_or(u64::MAX)) } else { Err(run) });
        }
        out
    }
    parts(a).cmp(&parts(b))
}

// ---------------------------------------------------------------------------------------
// Guest test binary
// ---------------------------------------------------------------------------------------

/// Builds `tidemark-tap`'s `ublk_lab` test (release) and returns its executable, found in
/// cargo's JSON messages.
fn build_test_binary(root: &Path) -> Result<PathBuf> {
    let mut command = Command::new(crate::cargo_bin());
    command.current_dir(root).args([
        "test",
        "--release",
        "-p",
        "tidemark-tap",
        "--test",
        "ublk_lab",
        "--no-run",
        "--message-format=json",
    ]);
    println!("$ {}", crate::show_command(&command));
    let out = command.stderr(Stdio::inherit()).output().context("could not run cargo test")?;
    ensure!(out.status.success(), "building the lab test binary failed with {}", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .filter(|l| l.contains("\"reason\":\"compiler-artifact\"") && l.contains("\"ublk_lab\""))
        .find_map(|l| json_string_field(l, "executable"))
        .map(PathBuf::from)
        .context("cargo reported no executable for the ublk_lab test")
}

/// The value of `"field":"..."` in one line of JSON (enough for cargo's paths, which have
/// no escaped characters on these machines).
fn json_string_field(line: &str, field: &str) -> Option<String> {
    let key = format!("\"{field}\":\"");
    let start = line.find(&key)? + key.len();
    let end = line[start..].find('"')? + start;
    Some(line[start..end].replace("\\\\", "\\"))
}

// ---------------------------------------------------------------------------------------
// Initramfs
// ---------------------------------------------------------------------------------------

/// Builds `target/lab/initrd.gz`.
fn initramfs(lab_dir: &Path, kernel: &Kernel, test_bin: &Path) -> Result<PathBuf> {
    let stage = lab_dir.join("initramfs");
    let _ = fs::remove_dir_all(&stage);
    for dir in ["bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "mnt", "modules"] {
        fs::create_dir_all(stage.join(dir))?;
    }
    let busybox = which("busybox")?;
    copy_exec(&busybox, &stage.join("bin/busybox"))?;

    let order = module_order(&kernel.modules, MODULES)?;
    for (name, path) in &order {
        let out = Command::new("xz")
            .arg("-dc")
            .arg(path)
            .output()
            .with_context(|| format!("xz -dc {}", path.display()))?;
        ensure!(out.status.success(), "decompressing {} failed", path.display());
        fs::write(stage.join("modules").join(format!("{name}.ko")), out.stdout)?;
    }
    let names: Vec<&str> = order.iter().map(|(n, _)| n.as_str()).collect();
    fs::write(stage.join("modules/order"), names.join("\n") + "\n")?;
    println!("lab: modules {}", names.join(" "));

    let mut libs = BTreeSet::new();
    copy_exec(test_bin, &stage.join("bin/ublk-lab"))?;
    libs.extend(shared_libs(test_bin)?);
    for tool in GUEST_TOOLS {
        let path = which(tool)?;
        copy_exec(&path, &stage.join("sbin").join(tool))?;
        libs.extend(shared_libs(&path)?);
    }
    for lib in &libs {
        let rel = lib.strip_prefix("/").unwrap_or(lib);
        let target = stage.join(rel);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)?;
        }
        // Copy the file's contents (ldd names symlinks, such as the loader's).
        fs::copy(lib, &target).with_context(|| format!("copying {}", lib.display()))?;
    }
    if Path::new("/etc/mke2fs.conf").is_file() {
        fs::copy("/etc/mke2fs.conf", stage.join("etc/mke2fs.conf"))?;
    }
    let init = stage.join("init");
    fs::write(&init, INIT_SCRIPT)?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;

    let initrd = lab_dir.join("initrd.gz");
    let packed = Command::new("sh")
        .current_dir(&stage)
        .args(["-c", "find . | cpio --quiet -o -H newc | gzip -1 > \"$1\"", "sh"])
        .arg(&initrd)
        .status()
        .context("could not run cpio")?;
    ensure!(packed.success(), "packing the initramfs failed with {packed}");
    let size = fs::metadata(&initrd)?.len();
    println!("lab: initramfs {} ({:.1} MiB)", initrd.display(), size as f64 / (1 << 20) as f64);
    Ok(initrd)
}

/// The guest's init: mounts, loads the modules, runs the tests, powers off.
const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o size=600m tmp /tmp
echo "TIDEMARK-LAB: booted $(uname -r)"
for m in $(cat /modules/order); do
    insmod /modules/$m.ko || echo "TIDEMARK-LAB: insmod $m failed"
done
/bin/ublk-lab --lab
rc=$?
[ $rc -eq 0 ] || echo "TIDEMARK-LAB: guest tests exited with status $rc"
sync
poweroff -f
"#;

fn copy_exec(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// The shared libraries (and loader) `ldd` lists for `binary`; none for a static one.
fn shared_libs(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(binary).output().context("could not run ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// `wanted` modules with their dependencies, dependencies first, as (name, path of the
/// compressed `.ko`). Dependencies come from each module's `depends=` modinfo string.
fn module_order(modules_dir: &Path, wanted: &[&str]) -> Result<Vec<(String, PathBuf)>> {
    let mut index = std::collections::BTreeMap::new();
    let mut stack = vec![modules_dir.join("kernel")];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(stem) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".ko.xz").or_else(|| n.strip_suffix(".ko")))
            {
                index.insert(normalize(stem), path.clone());
            }
        }
    }
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for name in wanted {
        visit(&index, &normalize(name), &mut seen, &mut order, 0)?;
    }
    Ok(order)
}

fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

fn visit(
    index: &std::collections::BTreeMap<String, PathBuf>,
    name: &str,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<(String, PathBuf)>,
    depth: usize,
) -> Result<()> {
    ensure!(depth < 32, "module dependency chain too deep at {name}");
    if !seen.insert(name.to_owned()) {
        return Ok(());
    }
    let path =
        index.get(name).with_context(|| format!("module {name} not in the kernel package"))?;
    for dep in module_depends(path)? {
        visit(index, &normalize(&dep), seen, order, depth + 1)?;
    }
    order.push((name.to_owned(), path.clone()));
    Ok(())
}

/// The `depends=` entry of a module's `.modinfo` strings.
fn module_depends(path: &Path) -> Result<Vec<String>> {
    let bytes = if path.extension().is_some_and(|x| x == "xz") {
        let out = Command::new("xz").arg("-dc").arg(path).output().context("could not run xz")?;
        ensure!(out.status.success(), "xz -dc {} failed", path.display());
        out.stdout
    } else {
        fs::read(path)?
    };
    let key = b"depends=";
    let Some(at) = bytes.windows(key.len()).position(|w| w == key) else { return Ok(Vec::new()) };
    let rest = &bytes[at + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    let list = String::from_utf8_lossy(&rest[..end]);
    Ok(list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect())
}

// ---------------------------------------------------------------------------------------
// Disks and boot
// ---------------------------------------------------------------------------------------

/// Fresh zeroed disk images.
fn disks(lab_dir: &Path) -> Result<Vec<PathBuf>> {
    let dir = lab_dir.join("disks");
    fs::create_dir_all(&dir)?;
    let mut out = Vec::new();
    for (name, mib) in DISKS {
        let path = dir.join(format!("{name}.img"));
        let file = fs::File::create(&path)?;
        file.set_len(mib << 20)?;
        out.push(path);
    }
    Ok(out)
}

/// Boots the guest and streams its console; returns the verdict line on PASS.
fn boot(kernel: &Kernel, initrd: &Path, disks: &[PathBuf], timeout: Duration) -> Result<String> {
    let qemu = which("qemu-system-x86_64")?;
    let mut command = Command::new(qemu);
    command
        .args(["-accel", "tcg", "-cpu", "qemu64", "-smp", "1", "-m", "1024"])
        .args(["-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"]);
    for disk in disks {
        command.arg("-drive").arg(format!("file={},if=virtio,format=raw", disk.display()));
    }
    println!("$ {}", crate::show_command(&command));
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("could not start qemu-system-x86_64")?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let (tx, rx) = mpsc::channel::<String>();
    let reader = thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).trim_end_matches('\r').to_owned();
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let started = Instant::now();
    let mut verdict: Option<String> = None;
    let mut failures = Vec::new();
    let timed_out = loop {
        let left = timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            break true;
        }
        match rx.recv_timeout(left.min(Duration::from_secs(1))) {
            Ok(line) => {
                println!("  | {line}");
                if let Some(rest) = line.trim().strip_prefix(MARK) {
                    let rest = rest.trim();
                    if rest.starts_with("FAIL")
                        || rest.contains("failed")
                        || rest.contains("exited")
                    {
                        failures.push(rest.to_owned());
                    }
                    if is_summary(rest) {
                        verdict = Some(rest.to_owned());
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if child.try_wait()?.is_some() && reader.is_finished() {
                    break false;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break false,
        }
    };
    if timed_out {
        let _ = child.kill();
    }
    let status = child.wait()?;
    let _ = reader.join();
    let elapsed = format_duration(started.elapsed());
    if timed_out {
        bail!(
            "the guest did not finish within {} (killed after {elapsed})",
            format_duration(timeout)
        );
    }
    match verdict {
        Some(v) if v.starts_with("PASS") && failures.is_empty() => Ok(v),
        Some(v) => bail!("guest tests failed ({v}): {}", failures.join("; ")),
        None => bail!(
            "the guest ended ({status}, after {elapsed}) without a `{MARK} PASS <n> tests` line{}",
            if failures.is_empty() { String::new() } else { format!(": {}", failures.join("; ")) }
        ),
    }
}

/// `PASS 5 tests` or `FAIL 1 of 5 tests`.
fn is_summary(rest: &str) -> bool {
    let words: Vec<&str> = rest.split_whitespace().collect();
    match words.as_slice() {
        ["PASS", n, "tests"] => n.parse::<u32>().is_ok(),
        ["FAIL", k, "of", n, "tests"] => k.parse::<u32>().is_ok() && n.parse::<u32>().is_ok(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        let mut v = [
            "linux-image-6.12.9+deb12-cloud-amd64-unsigned",
            "linux-image-6.12.113+deb12-cloud-amd64-unsigned",
            "linux-image-6.12.41+deb12-cloud-amd64-unsigned",
        ];
        v.sort_by(|a, b| version_cmp(a, b));
        assert_eq!(v[2], "linux-image-6.12.113+deb12-cloud-amd64-unsigned");
    }

    #[test]
    fn summary_lines_are_recognised() {
        assert!(is_summary("PASS 5 tests"));
        assert!(is_summary("FAIL 1 of 5 tests"));
        assert!(!is_summary("PASS ublk_device_up (1.2s)"));
        assert!(!is_summary("FAIL ublk_ext4: mkfs failed"));
    }

    #[test]
    fn cargo_json_executable_is_found() {
        let line = r#"{"reason":"compiler-artifact","target":{"name":"ublk_lab"},"executable":"/w/target/release/deps/ublk_lab-1234"}"#;
        assert_eq!(
            json_string_field(line, "executable").as_deref(),
            Some("/w/target/release/deps/ublk_lab-1234")
        );
    }
}
