//! `cargo xtask lab`: the kernel lab. Boots Debian's 6.12 cloud kernel (which has
//! `ublk_drv`, device-mapper, `veth` and `sch_netem` as modules) under QEMU's software
//! emulation, with the guest test suites in the initramfs and four virtio disks, and reads
//! the results off the serial console.
//!
//! Steps: install the host tools it needs (`qemu-system-x86`, `busybox-static`, `cpio`,
//! `xz-utils`, `e2fsprogs`, `dmsetup`, `iproute2`) when missing; fetch the newest
//! `linux-image-6.12.*-cloud-amd64-unsigned` with `apt-get download` and unpack it with
//! `dpkg -x` under `target/lab/kernel/` (kept, so later runs reuse it); build the guest
//! test binaries ([`SUITES`], release) and the `tidemark` binary (`vsnap_ublk` runs
//! `tidemark recover` in the guest); assemble an initramfs with busybox, the decompressed
//! modules in dependency order, those binaries (debug info stripped when `objcopy` is
//! there), `mkfs.ext4`/`e2fsck`/`debugfs`/`dmsetup`/`ip`/`tc` and every shared library `ldd` names
//! for them; boot; stream the console.
//!
//! The guest runs the suites one after the other, each between `TIDEMARK-LAB: begin
//! <suite>` and `TIDEMARK-LAB: end <suite> <exit status>`. `ublk_lab` (the ublk frontend,
//! queue depth > 1, kill -9 + user recovery, dm-log-writes) and `ublk_replication` (ext4
//! written through a ublk device, replicated to a retention log in the same process, every
//! bookmark materialized and fsck-checked; then kill -9 of a source agent process, user
//! recovery and the resync of its dirty regions over loopback TCP) and `vsnap_ublk` (a
//! recovery point's virtual snapshot served over ublk, read-only and as a read-write drill)
//! report in `TIDEMARK-LAB: PASS|FAIL` lines of their own; `netem` is a libtest binary run with
//! `TIDEMARK_REQUIRE_NETNS=1`, so a missing namespace or qdisc fails instead of skipping,
//! and its `test <name> ... ok` lines are read as they are. The lab passes only when every
//! suite ran, exited 0, reported a summary matching its per-test lines, and every test
//! passed ([`Console::verdict`]).
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

use anyhow::{Context, Result, anyhow, bail, ensure};

use crate::{command_exists, format_duration, is_root, run_command};

/// Host packages the lab needs, each with a command proving it is installed.
const LAB_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "qemu-system-x86_64"),
    ("busybox-static", "busybox"),
    ("cpio", "cpio"),
    ("xz-utils", "xz"),
    ("e2fsprogs", "e2fsck"),
    ("dmsetup", "dmsetup"),
    ("iproute2", "tc"),
];

/// The kernel package family (bookworm backports): has ublk_drv, dm-log-writes, virtio_blk.
const KERNEL_PATTERN: &str = r"^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64-unsigned$";

/// Modules loaded in the guest (their dependencies are added first).
const MODULES: &[&str] =
    &["virtio_blk", "dm-mod", "dm-bufio", "dm-log-writes", "ublk_drv", "veth", "sch_netem"];

/// Programs copied into the guest's `/sbin` with their libraries.
const GUEST_TOOLS: &[&str] = &["mkfs.ext4", "e2fsck", "debugfs", "dmsetup", "ip", "tc"];

/// How a suite reports on the console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// `TIDEMARK-LAB: PASS <test> ...` / `FAIL <test> ...` per test, then `PASS <n> tests`
    /// or `FAIL <k> of <n> tests`.
    Lab,
    /// libtest's own output: `test <name> ... ok|FAILED|ignored`, then `test result: ...`.
    Libtest,
}

/// A test binary the guest runs.
#[derive(Debug)]
struct Suite {
    /// Its name in the console markers and the report.
    name: &'static str,
    /// The cargo package and test target it is built from.
    package: &'static str,
    test: &'static str,
    /// Where it sits in the initramfs.
    guest_path: &'static str,
    /// The shell command line the guest's init runs it with.
    command: &'static str,
    format: Format,
}

/// The guest's suites, in the order they run. The namespace tests run with
/// `TIDEMARK_REQUIRE_NETNS=1`: in the lab a skip is a failure.
const SUITES: &[Suite] = &[
    Suite {
        name: "ublk_lab",
        package: "tidemark-tap",
        test: "ublk_lab",
        guest_path: "bin/ublk-lab",
        command: "/bin/ublk-lab --lab",
        format: Format::Lab,
    },
    Suite {
        name: "netem",
        package: "tidemark-sync",
        test: "netem",
        guest_path: "bin/netem",
        command: "TIDEMARK_REQUIRE_NETNS=1 /bin/netem --test-threads=1",
        format: Format::Libtest,
    },
    Suite {
        name: "ublk_replication",
        package: "tidemark-sync",
        test: "ublk_replication_lab",
        guest_path: "bin/ublk-replication-lab",
        command: "/bin/ublk-replication-lab --lab",
        format: Format::Lab,
    },
    Suite {
        name: "vsnap_ublk",
        package: "tidemark-sync",
        test: "vsnap_ublk_lab",
        guest_path: "bin/vsnap-ublk-lab",
        command: "/bin/vsnap-ublk-lab --lab",
        format: Format::Lab,
    },
];

/// The guest's disks: name and size in MiB. vda sits behind the ublk device of tests 1-3,
/// vdb/vdc are dm-log-writes' data and log devices, vdd sits behind the recovery test's.
const DISKS: &[(&str, u64)] = &[("vda", 64), ("vdb", 32), ("vdc", 64), ("vdd", 32)];

/// Overall limit on the guest's run, unless `TIDEMARK_LAB_TIMEOUT` (seconds) says otherwise.
/// (The four suites take about two minutes of guest time on an idle machine.)
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
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
    let mut test_bins = Vec::new();
    for suite in SUITES {
        let bin = build_test_binary(root, suite)?;
        println!("lab: guest suite {} from {}", suite.name, bin.display());
        test_bins.push(bin);
    }
    let agent = build_agent_binary(root)?;
    println!("lab: guest /{AGENT_GUEST_PATH} from {}", agent.display());
    test_bins.push(agent);
    let initrd = initramfs(&lab_dir, &kernel, &test_bins)?;
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

/// Builds `suite`'s test target (release) and returns its executable, found in cargo's
/// JSON messages. One cargo run per suite, so each package's features resolve as they do
/// in `cargo test -p <package>` and the artifacts are shared with it.
fn build_test_binary(root: &Path, suite: &Suite) -> Result<PathBuf> {
    let mut command = Command::new(crate::cargo_bin());
    command.current_dir(root).args(["test", "--release", "-p", suite.package, "--test"]).args([
        suite.test,
        "--no-run",
        "--message-format=json",
    ]);
    println!("$ {}", crate::show_command(&command));
    let out = command.stderr(Stdio::inherit()).output().context("could not run cargo test")?;
    ensure!(
        out.status.success(),
        "building the lab test binary {} ({}) failed with {}",
        suite.test,
        suite.package,
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let target = format!("\"name\":\"{}\"", suite.test);
    stdout
        .lines()
        .filter(|l| l.contains("\"reason\":\"compiler-artifact\"") && l.contains(&target))
        .find_map(|l| json_string_field(l, "executable"))
        .map(PathBuf::from)
        .with_context(|| format!("cargo reported no executable for the {} test", suite.test))
}

/// Where the `tidemark` binary sits in the initramfs (the `vsnap_ublk` suite runs
/// `tidemark recover` with it).
const AGENT_GUEST_PATH: &str = "bin/tidemark";

/// Builds the `tidemark` binary (release) and returns its path, from cargo's JSON messages.
fn build_agent_binary(root: &Path) -> Result<PathBuf> {
    let mut command = Command::new(crate::cargo_bin());
    command.current_dir(root).args([
        "build",
        "--release",
        "-p",
        "tidemark",
        "--bin",
        "tidemark",
        "--message-format=json",
    ]);
    println!("$ {}", crate::show_command(&command));
    let out = command.stderr(Stdio::inherit()).output().context("could not run cargo build")?;
    ensure!(out.status.success(), "building the tidemark binary failed with {}", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .filter(|l| {
            l.contains("\"reason\":\"compiler-artifact\"") && l.contains("\"name\":\"tidemark\"")
        })
        .find_map(|l| json_string_field(l, "executable"))
        .map(PathBuf::from)
        .context("cargo reported no executable for the tidemark binary")
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

/// Builds `target/lab/initrd.gz`; `test_bins` are the executables of [`SUITES`], in order,
/// then the `tidemark` binary (put at [`AGENT_GUEST_PATH`]).
fn initramfs(lab_dir: &Path, kernel: &Kernel, test_bins: &[PathBuf]) -> Result<PathBuf> {
    let stage = lab_dir.join("initramfs");
    let _ = fs::remove_dir_all(&stage);
    for dir in ["bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "mnt", "run", "var", "modules"] {
        fs::create_dir_all(stage.join(dir))?;
    }
    // iproute2 may look under /var/run as well as /run.
    std::os::unix::fs::symlink("../run", stage.join("var/run"))?;
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
    let strip = command_exists("objcopy");
    let guest_paths = SUITES.iter().map(|s| s.guest_path).chain([AGENT_GUEST_PATH]);
    ensure!(test_bins.len() == SUITES.len() + 1, "one binary per suite, then tidemark");
    for (guest_path, bin) in guest_paths.zip(test_bins) {
        let target = stage.join(guest_path);
        if strip {
            copy_stripped(bin, &target)?;
        } else {
            copy_exec(bin, &target)?;
        }
        libs.extend(shared_libs(bin)?);
    }
    if !strip {
        println!("lab: no objcopy (binutils); the test binaries keep their debug info");
    }
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
    fs::write(&init, init_script(SUITES))?;
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

/// The guest's init up to the suites: mounts, modules, what `ip netns` needs (a writable
/// `/run` with `/run/netns`; `/var/run` links to it), loopback up.
const INIT_PRELUDE: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o size=600m tmp /tmp
mount -t tmpfs -o mode=0755,size=16m run /run
mkdir -p /run/netns
echo "TIDEMARK-LAB: booted $(uname -r)"
for m in $(cat /modules/order); do
    insmod /modules/$m.ko || echo "TIDEMARK-LAB: insmod $m failed"
done
ip link set lo up || echo "TIDEMARK-LAB: setup of lo failed"
"#;

/// The guest's init: [`INIT_PRELUDE`], then each suite between its `begin` and `end`
/// markers (every suite runs, whatever the previous ones did), then power-off.
fn init_script(suites: &[Suite]) -> String {
    let mut script = INIT_PRELUDE.to_owned();
    for suite in suites {
        script.push_str(&format!(
            "echo \"{MARK} begin {name}\"\n{command}\necho \"{MARK} end {name} $?\"\n",
            name = suite.name,
            command = suite.command,
        ));
    }
    script.push_str("sync\npoweroff -f\n");
    script
}

/// Copies an executable without its debug sections (the symbols stay, for backtraces):
/// the release test binaries carry tens of MiB of DWARF the guest would only unpack.
fn copy_stripped(from: &Path, to: &Path) -> Result<()> {
    let status = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(from)
        .arg(to)
        .status()
        .context("could not run objcopy")?;
    ensure!(status.success(), "objcopy --strip-debug {} failed with {status}", from.display());
    fs::set_permissions(to, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

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

/// Boots the guest and streams its console; returns the verdict ([`Console::verdict`]) on
/// PASS.
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
    let mut console = Console::new(SUITES);
    let timed_out = loop {
        let left = timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            break true;
        }
        match rx.recv_timeout(left.min(Duration::from_secs(1))) {
            Ok(line) => {
                println!("  | {line}");
                console.feed(&line);
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
    console.print_report();
    if timed_out {
        bail!(
            "the guest did not finish within {} (killed after {elapsed})",
            format_duration(timeout)
        );
    }
    console.verdict().map_err(|problems| {
        anyhow!("guest tests failed (qemu {status}, after {elapsed}): {problems}")
    })
}

// ---------------------------------------------------------------------------------------
// Reading the console
// ---------------------------------------------------------------------------------------

/// What became of one test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Failed,
    /// Not run (`#[ignore]`): a failure in the lab, where every test must run.
    Ignored,
}

impl Outcome {
    fn word(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Failed => "FAILED",
            Self::Ignored => "ignored",
        }
    }
}

/// One test's outcome as the guest reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TestOutcome {
    name: String,
    outcome: Outcome,
}

/// What the console said about one suite.
#[derive(Debug, Default)]
struct SuiteReport {
    tests: Vec<TestOutcome>,
    /// The suite's own count: (passed, total, ignored ones included).
    summary: Option<(u32, u32)>,
    /// The exit status the init script printed after it.
    exit: Option<i32>,
    /// A libtest line `test <name> ... ` whose outcome has not arrived yet (something
    /// wrote to stderr in between).
    pending: Option<String>,
}

/// The guest's console, read line by line: which suite is running, each test's outcome,
/// each suite's summary and exit status, and anything else that went wrong.
#[derive(Debug)]
struct Console {
    suites: Vec<(&'static str, Format, SuiteReport)>,
    /// Index into `suites` of the one between its `begin` and `end` markers.
    current: Option<usize>,
    /// Failures outside any test's own outcome (a module that did not load, a skip).
    problems: Vec<String>,
}

impl Console {
    fn new(suites: &[Suite]) -> Self {
        Self {
            suites: suites.iter().map(|s| (s.name, s.format, SuiteReport::default())).collect(),
            current: None,
            problems: Vec::new(),
        }
    }

    fn feed(&mut self, line: &str) {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix(MARK) {
            self.marked(rest.trim());
            return;
        }
        let Some(i) = self.current else { return };
        let (name, format, report) = &mut self.suites[i];
        if *format != Format::Libtest {
            return;
        }
        if line.starts_with("SKIP") || line.contains("... SKIP") {
            // The suites run with everything they need required: a skip is a failure.
            self.problems.push(format!("{name}: {line}"));
        }
        if let Some(counts) = line.strip_prefix("test result: ") {
            match libtest_counts(counts) {
                Some((passed, failed, ignored)) => {
                    report.summary = Some((passed, passed + failed + ignored));
                }
                None => self.problems.push(format!("{name}: unreadable `{line}`")),
            }
        } else if let Some((test, outcome)) =
            line.strip_prefix("test ").and_then(|t| t.split_once(" ..."))
        {
            report.pending = None;
            match libtest_outcome(outcome) {
                Some(outcome) => {
                    report.tests.push(TestOutcome { name: test.to_owned(), outcome });
                }
                None => report.pending = Some(test.to_owned()),
            }
        } else if let Some(outcome) = report.pending.as_ref().and_then(|_| libtest_outcome(line)) {
            let test = report.pending.take().unwrap_or_default();
            report.tests.push(TestOutcome { name: test, outcome });
        }
    }

    /// A `TIDEMARK-LAB:` line, without the mark.
    fn marked(&mut self, rest: &str) {
        let words: Vec<&str> = rest.split_whitespace().collect();
        match words.as_slice() {
            ["begin", suite] => {
                self.current = self.suites.iter().position(|(n, ..)| n == suite);
                if self.current.is_none() {
                    self.problems.push(format!("unknown suite {suite} began"));
                }
                return;
            }
            ["end", suite, status] => {
                match self.suites.iter_mut().find(|(n, ..)| n == suite) {
                    Some((.., report)) => report.exit = status.parse().ok().or(Some(-1)),
                    None => self.problems.push(format!("unknown suite {suite} ended")),
                }
                self.current = None;
                return;
            }
            _ => {}
        }
        let lab_suite = self.current.filter(|&i| self.suites[i].1 == Format::Lab);
        if let Some(i) = lab_suite {
            let report = &mut self.suites[i].2;
            if let Some(counts) = lab_summary(rest) {
                report.summary = Some(counts);
                return;
            }
            match words.as_slice() {
                ["PASS", test, ..] => {
                    let name = test.trim_end_matches(':').to_owned();
                    report.tests.push(TestOutcome { name, outcome: Outcome::Ok });
                    return;
                }
                ["FAIL", test, ..] => {
                    let name = test.trim_end_matches(':').to_owned();
                    report.tests.push(TestOutcome { name, outcome: Outcome::Failed });
                    return;
                }
                _ => {}
            }
        }
        if rest.starts_with("FAIL") || rest.contains("failed") {
            self.problems.push(rest.to_owned());
        }
    }

    /// `PASS <n> tests (<suite> <n>, ...)`, or every reason the run failed.
    fn verdict(&self) -> Result<String, String> {
        let mut problems = self.problems.clone();
        let mut counts = Vec::new();
        let mut total = 0;
        for (name, _, report) in &self.suites {
            for t in report.tests.iter().filter(|t| t.outcome != Outcome::Ok) {
                problems.push(format!("{name}: {} {}", t.name, t.outcome.word()));
            }
            match report.summary {
                None => problems.push(format!("{name}: no summary line (did it run to the end?)")),
                Some((passed, n)) => {
                    if passed != n {
                        problems.push(format!("{name}: {passed} of {n} tests passed"));
                    }
                    if n == 0 {
                        problems.push(format!("{name}: ran no tests"));
                    }
                    if report.tests.len() != n as usize {
                        problems.push(format!(
                            "{name}: {} test outcomes read for a summary of {n}",
                            report.tests.len()
                        ));
                    }
                    total += n;
                    counts.push(format!("{name} {n}"));
                }
            }
            match report.exit {
                Some(0) => {}
                Some(status) => problems.push(format!("{name}: exited with status {status}")),
                None => problems.push(format!("{name}: never ended")),
            }
        }
        if problems.is_empty() {
            Ok(format!("PASS {total} tests ({})", counts.join(", ")))
        } else {
            Err(problems.join("; "))
        }
    }

    /// Every test's outcome, suite by suite.
    fn print_report(&self) {
        println!("lab: results");
        for (name, _, report) in &self.suites {
            if report.tests.is_empty() {
                println!("  {name}: no test outcomes");
            }
            for t in &report.tests {
                println!("  {name}::{} ... {}", t.name, t.outcome.word());
            }
        }
    }
}

/// `ok` / `FAILED` / `ignored` at the end of a libtest line.
fn libtest_outcome(text: &str) -> Option<Outcome> {
    match text.split_whitespace().last()? {
        "ok" => Some(Outcome::Ok),
        "FAILED" => Some(Outcome::Failed),
        "ignored" => Some(Outcome::Ignored),
        _ => None,
    }
}

/// (passed, failed, ignored) from libtest's `ok. 4 passed; 0 failed; 0 ignored; ...`.
fn libtest_counts(text: &str) -> Option<(u32, u32, u32)> {
    let (_, counts) = text.split_once(". ")?;
    let mut found = [None; 3];
    for part in counts.split(';') {
        let mut words = part.split_whitespace();
        let (Some(n), Some(what)) = (words.next(), words.next()) else { continue };
        let slot = match what {
            "passed" => 0,
            "failed" => 1,
            "ignored" => 2,
            _ => continue,
        };
        found[slot] = Some(n.parse().ok()?);
    }
    Some((found[0]?, found[1]?, found[2]?))
}

/// (passed, total) from `PASS 5 tests` or `FAIL 1 of 5 tests`.
fn lab_summary(rest: &str) -> Option<(u32, u32)> {
    let words: Vec<&str> = rest.split_whitespace().collect();
    match words.as_slice() {
        ["PASS", n, "tests"] => n.parse().ok().map(|n| (n, n)),
        ["FAIL", k, "of", n, "tests"] => {
            let (k, n): (u32, u32) = (k.parse().ok()?, n.parse().ok()?);
            Some((n.saturating_sub(k), n))
        }
        _ => None,
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
        assert_eq!(lab_summary("PASS 5 tests"), Some((5, 5)));
        assert_eq!(lab_summary("FAIL 1 of 5 tests"), Some((4, 5)));
        assert_eq!(lab_summary("PASS ublk_device_up (1.2s)"), None);
        assert_eq!(lab_summary("FAIL ublk_ext4: mkfs failed"), None);
        assert_eq!(
            libtest_counts("ok. 4 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out"),
            Some((4, 0, 0))
        );
        assert_eq!(
            libtest_counts("FAILED. 3 passed; 1 failed; 0 ignored; 0 measured"),
            Some((3, 1, 0))
        );
        assert_eq!(libtest_counts("ok. 4 passed"), None);
    }

    /// A console as the guest prints it, `netem` lines given by the caller.
    fn console(netem: &[&str], netem_exit: i32) -> Console {
        let mut c = Console::new(SUITES);
        let mut lines = vec![
            "TIDEMARK-LAB: booted 6.12.117+deb12-cloud-amd64",
            "TIDEMARK-LAB: begin ublk_lab",
            "TIDEMARK-LAB: PASS ublk_device_up (1.3s)",
            "TIDEMARK-LAB: info capture: 61 events (38 writes, 10 barriers)",
            "TIDEMARK-LAB: PASS dm_log_writes_replay (3.0s)",
            "TIDEMARK-LAB: PASS 2 tests",
            "TIDEMARK-LAB: end ublk_lab 0",
            "TIDEMARK-LAB: begin netem",
            "",
            "running 2 tests",
        ];
        lines.extend_from_slice(netem);
        let end = format!("TIDEMARK-LAB: end netem {netem_exit}");
        lines.push(&end);
        lines.extend_from_slice(&[
            "TIDEMARK-LAB: begin ublk_replication",
            "TIDEMARK-LAB: PASS repl_protect_initial_sync (21.0s)",
            "TIDEMARK-LAB: info initial sync: 4194304 data bytes, 0 zero bytes left out",
            "TIDEMARK-LAB: PASS repl_bookmark_round-1_fsck_clean_files_match (4.2s)",
            "TIDEMARK-LAB: PASS 2 tests",
            "TIDEMARK-LAB: end ublk_replication 0",
            "TIDEMARK-LAB: begin vsnap_ublk",
            "TIDEMARK-LAB: PASS vsnap_ublk_setup (2.0s)",
            "TIDEMARK-LAB: PASS vsnap_ublk_read_only_reads_the_point_and_mounts (3.1s)",
            "TIDEMARK-LAB: info read-only vsnap: /dev/ublkb0: 40 reads",
            "TIDEMARK-LAB: PASS 2 tests",
            "TIDEMARK-LAB: end vsnap_ublk 0",
        ]);
        for line in lines {
            c.feed(line);
        }
        c
    }

    #[test]
    fn a_clean_run_passes_with_every_suite_counted() {
        let c = console(
            &[
                "test netns_a ... ok",
                // Something wrote to stderr between the name and the outcome.
                "test netns_b ... note from the test",
                "ok",
                "test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; \
                 finished in 41.20s",
            ],
            0,
        );
        assert_eq!(
            c.verdict(),
            Ok("PASS 8 tests (ublk_lab 2, netem 2, ublk_replication 2, vsnap_ublk 2)".to_owned())
        );
        let netem = &c.suites[1].2.tests;
        assert_eq!(
            netem.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            ["netns_a", "netns_b"]
        );
    }

    #[test]
    fn a_failed_skipped_or_missing_netem_test_fails_the_lab() {
        let failed = console(
            &[
                "test netns_a ... ok",
                "test netns_b ... FAILED",
                "test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out",
            ],
            101,
        );
        let why = failed.verdict().unwrap_err();
        assert!(why.contains("netns_b FAILED") && why.contains("status 101"), "{why}");

        let skipped = console(
            &[
                "test netns_a ... ok",
                "test netns_b ... SKIP netem: netns_b: sch_netem is not available",
                "ok",
                "test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out",
            ],
            0,
        );
        let why = skipped.verdict().unwrap_err();
        assert!(why.contains("SKIP netem"), "{why}");

        // The binary died before its summary (a kernel oops, a crash).
        let cut = console(&["test netns_a ... ok"], 139);
        let why = cut.verdict().unwrap_err();
        assert!(why.contains("netem: no summary line"), "{why}");

        let ignored = console(
            &[
                "test netns_a ... ok",
                "test netns_b ... ignored",
                "test result: ok. 1 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out",
            ],
            0,
        );
        let why = ignored.verdict().unwrap_err();
        assert!(why.contains("netns_b ignored") && why.contains("1 of 2 tests passed"), "{why}");
    }

    #[test]
    fn a_failed_module_or_missing_suite_fails_the_lab() {
        let mut c = Console::new(SUITES);
        for line in [
            "TIDEMARK-LAB: insmod sch_netem failed",
            "TIDEMARK-LAB: begin ublk_lab",
            "TIDEMARK-LAB: FAIL ublk_device_up (0.1s): no /dev/ublk-control",
            "TIDEMARK-LAB: FAIL 1 of 1 tests",
            "TIDEMARK-LAB: end ublk_lab 1",
        ] {
            c.feed(line);
        }
        let why = c.verdict().unwrap_err();
        for part in [
            "insmod sch_netem failed",
            "ublk_device_up FAILED",
            "0 of 1 tests passed",
            "netem: no summary line",
            "netem: never ended",
            "ublk_replication: never ended",
            "vsnap_ublk: never ended",
        ] {
            assert!(why.contains(part), "`{part}` missing from: {why}");
        }
    }

    #[test]
    fn a_failed_bookmark_check_fails_the_lab() {
        let mut c = Console::new(SUITES);
        for line in [
            "TIDEMARK-LAB: begin ublk_lab",
            "TIDEMARK-LAB: PASS ublk_device_up (1.3s)",
            "TIDEMARK-LAB: PASS 1 tests",
            "TIDEMARK-LAB: end ublk_lab 0",
            "TIDEMARK-LAB: begin netem",
            "test netns_a ... ok",
            "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out",
            "TIDEMARK-LAB: end netem 0",
            "TIDEMARK-LAB: begin ublk_replication",
            "TIDEMARK-LAB: PASS repl_protect_initial_sync (21.0s)",
            "TIDEMARK-LAB: FAIL repl_bookmark_round-2_fsck_clean_files_match (3.1s): \
             `e2fsck -fn /tmp/replication-lab/point.img` exited with exit status: 4",
            "TIDEMARK-LAB: FAIL 1 of 2 tests",
            "TIDEMARK-LAB: end ublk_replication 1",
        ] {
            c.feed(line);
        }
        let why = c.verdict().unwrap_err();
        for part in [
            "repl_bookmark_round-2_fsck_clean_files_match FAILED",
            "ublk_replication: 1 of 2 tests passed",
            "ublk_replication: exited with status 1",
        ] {
            assert!(why.contains(part), "`{part}` missing from: {why}");
        }
        assert!(!why.contains("ublk_lab") && !why.contains("netem"), "{why}");
    }

    #[test]
    fn the_init_script_brackets_every_suite() {
        let script = init_script(SUITES);
        let begin = script.find("TIDEMARK-LAB: begin netem").unwrap();
        let run = script.find("TIDEMARK_REQUIRE_NETNS=1 /bin/netem").unwrap();
        let end = script.find("TIDEMARK-LAB: end netem $?").unwrap();
        assert!(begin < run && run < end);
        assert!(script.find("end ublk_lab").unwrap() < begin);
        let replication = script.find("/bin/ublk-replication-lab --lab").unwrap();
        let replication_end = script.find("end ublk_replication $?").unwrap();
        assert!(end < replication && replication < replication_end);
        let vsnap = script.find("/bin/vsnap-ublk-lab --lab").unwrap();
        assert!(replication_end < vsnap && vsnap < script.find("end vsnap_ublk $?").unwrap());
        assert!(script.trim_end().ends_with("poweroff -f"));
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
