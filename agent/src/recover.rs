//! `tidemark recover`: a recovery point of a `receive` directory, exposed as a virtual
//! snapshot (a block device, read-only or read-write over a throw-away overlay) until
//! SIGINT/SIGTERM, or materialized into a file with a verified BLAKE3 hash.
//!
//! With a receiver running on the directory (its control socket answers) everything goes
//! through it, so replication and retention go on; otherwise the retention log is opened
//! here. The snapshot's block device is a ublk device or a loop device over FUSE
//! (`--frontend`, `auto` by default: ublk where usable). Output lines for scripts:
//! `point: ...`, `frontend: ublk|fuse`, `device: /dev/ublkbN|/dev/loopN`, `mounted: M`,
//! `removed: ...`, `blake3: HEX`, `verified: ...`.
//!
//! Invariant of `--materialize`: the hash printed is that of the image as written, computed
//! from the retention log's bytes while writing them (offline: `RetentionLog::read_at` of the
//! point; with a receiver: the bytes of a read-only snapshot of it), and it is checked
//! against a re-read of the output after it was synced and its cached pages dropped; a
//! mismatch fails the command. The output is a file (created or truncated to the volume's
//! size) or a block device at least that large (written from offset 0, the rest untouched).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tidemark_journal::VolumeId;

use crate::control::{self, Client};
use crate::group;
use crate::source_control::{group_hex, parse_group_id};
use crate::vsnaps::{Frontend, Mode, Registry};
use crate::{common, points, signals};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The directory of `tidemark receive` (replica.img, journal/, control.sock). Given more
    /// than once: the volumes of a consistency group, all recovered at one group bookmark.
    #[arg(long, required_unless_present = "group")]
    dir: Vec<PathBuf>,
    /// Recover the receive pairs of this `[group.NAME]` of the configuration file, all at
    /// one group bookmark.
    #[arg(long, conflicts_with_all = ["dir", "control"])]
    group: Option<String>,
    /// The configuration file (with --group).
    #[arg(long, default_value = crate::up::DEFAULT_CONFIG, requires = "group")]
    config: PathBuf,
    /// For a group: the group bookmark's id (16 hexadecimal digits, as `tidemark points`
    /// shows), when not the newest group bookmark of that name.
    #[arg(long)]
    group_id: Option<String>,
    /// The point: latest, seq:N, time:RFC3339-or-unix-seconds, bookmark:NAME (list them with
    /// `tidemark points`).
    #[arg(long)]
    point: String,
    /// Expose the point as a virtual snapshot (a block device) until Ctrl-C / SIGTERM:
    /// read-only, or read-write with writes going to an overlay thrown away at the end.
    #[arg(
        long,
        value_enum,
        required_unless_present = "materialize",
        conflicts_with = "materialize"
    )]
    expose: Option<Mode>,
    /// With --expose: also mount the snapshot's filesystem here (read-only for ro: an ext4
    /// whose journal needs replaying is then mounted with `noload`, without its last
    /// transactions; use rw to see them replayed), and unmount it before the snapshot is
    /// removed.
    #[arg(long, requires = "expose")]
    mountpoint: Option<PathBuf>,
    /// Write the point to this file (created or overwritten) or block device (at least the
    /// volume's size), then verify it. For a group: once per member, in the members' order.
    #[arg(long)]
    materialize: Vec<PathBuf>,
    /// With --expose: the block device frontend. auto: a ublk device (/dev/ublkbN) when
    /// /dev/ublk-control opens and the device starts, else a loop device over FUSE; ublk:
    /// fail where ublk_drv is not usable; fuse: FUSE + loop. The choice is printed
    /// (`frontend: ...`).
    #[arg(long, value_enum, default_value_t = Frontend::Auto, requires = "expose")]
    frontend: Frontend,
    /// The receiver's control socket (default: DIR/control.sock).
    #[arg(long)]
    control: Option<PathBuf>,
    /// Block size of the journal's index (as given to `receive`), when the log is opened
    /// here because no receiver runs.
    #[arg(long, default_value_t = 4096)]
    block_size: u32,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.group.is_some() || args.dir.len() > 1 {
        return run_group(&args);
    }
    let Some(dir) = args.dir.first() else { bail!("--dir: expected a receive directory") };
    if args.group_id.is_some() {
        bail!("--group-id names a group bookmark: recover a group (--group, or --dir repeated)");
    }
    if args.materialize.len() > 1 {
        bail!("--materialize is given once per volume; one --dir is one volume");
    }
    let point = points::parse_point(&args.point)?;
    let socket = args.control.clone().unwrap_or_else(|| control::default_socket(dir));
    let client = Client::connect(&socket)?;
    if let Some(out) = args.materialize.first() {
        return match client {
            Some(client) => materialize_online(client, &args.point, out),
            None => materialize_offline(dir, args.block_size, &point, out),
        };
    }
    let mode = args.expose.context("--expose or --materialize is required")?;
    signals::install()?;
    let mut session =
        open_session(client, dir, &args.point, &point, mode, args.frontend, args.block_size)?;
    let device = session.device().to_path_buf();
    println!("device: {}", device.display());
    let mounted = match &args.mountpoint {
        Some(m) => match mount(&device, m, mode) {
            Ok(()) => {
                println!("mounted: {}", m.display());
                Some(m.clone())
            }
            Err(e) => {
                let _ = session.remove();
                return Err(e);
            }
        },
        None => None,
    };
    println!("ready: {} snapshot; Ctrl-C or SIGTERM removes it", mode.as_str());
    std::io::stdout().flush()?;
    while !signals::stop_requested() {
        if let Session::Remote { client, .. } = &mut session {
            if client.closed() {
                if let Some(m) = &mounted {
                    let _ = run_tool("umount", &["-l".as_ref(), m.as_os_str()]);
                }
                bail!("the receiver closed the control connection: the snapshot is gone");
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some(m) = &mounted {
        run_tool("umount", &[m.as_os_str()]).with_context(|| format!("unmount {}", m.display()))?;
    }
    let blocks = session.remove()?;
    println!(
        "removed: {} snapshot of {}, overlay of {blocks} blocks thrown away",
        mode.as_str(),
        args.point
    );
    Ok(())
}

/// Exposes `spec` (parsed: `point`) of the receive directory `dir`, through its receiver
/// when `client` is one, else from the journal opened here.
fn open_session(
    client: Option<Client>,
    dir: &Path,
    spec: &str,
    point: &tidemark_journal::RecoveryPoint,
    mode: Mode,
    frontend: Frontend,
    block_size: u32,
) -> anyhow::Result<Session> {
    Ok(match client {
        Some(mut client) => {
            let v = client.request(json!({
                "op": "expose",
                "point": spec,
                "mode": mode.as_str(),
                "frontend": frontend.as_str(),
            }))?;
            let id = v["id"].as_u64().context("expose answer without an id")?;
            let device =
                PathBuf::from(v["device"].as_str().context("expose answer without a device")?);
            print_point(&v["point"]);
            println!("frontend: {}", v["frontend"].as_str().unwrap_or("fuse"));
            Session::Remote { client, id, device }
        }
        None => {
            let log = common::open_log(dir, block_size)?;
            let access = Arc::new(Mutex::new(log));
            let prefix = format!("offline-{}-", std::process::id());
            let mut registry = Registry::new(access, &dir.join("vsnaps"), &prefix);
            let info = registry.expose_on(point, mode, frontend)?;
            print_point(&points::point_json(&info.point));
            println!("frontend: {}", info.frontend.as_str());
            Session::Local { registry, id: info.id, device: info.device }
        }
    })
}

/// A consistency group (`crate::group`): every member at the same group bookmark, or
/// nothing.
fn run_group(args: &Args) -> anyhow::Result<()> {
    let members = group::members(args.group.as_deref(), &args.config, &args.dir, "receive")?;
    if members.len() < 2 {
        bail!("a group has at least two members, got {}", members.len());
    }
    let tidemark_journal::RecoveryPoint::Bookmark(name) = points::parse_point(&args.point)? else {
        bail!(
            "point {:?}: a group is recovered at a group bookmark, --point bookmark:NAME \
             (other points are not one state across the volumes)",
            args.point
        );
    };
    if args.mountpoint.is_some() {
        bail!("--mountpoint mounts one volume; with a group, mount the devices printed");
    }
    group::one_per_member("--materialize", "outputs", args.materialize.len(), &members)?;
    let wanted = args.group_id.as_deref().map(parse_group_id).transpose()?;
    let docs = members
        .iter()
        .map(|m| group::member_points(m, args.block_size))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (id, pts) = group::resolve(&members, &docs, &name, wanted)?;
    println!("group: {} ({} members, bookmark {name:?})", group_hex(id), members.len());
    let specs: Vec<String> = pts.iter().map(|p| format!("seq:{}", p["seq"])).collect();
    let connect = |m: &group::GroupMember| {
        let socket = m.control.clone().unwrap_or_else(|| control::default_socket(&m.dir));
        Client::connect(&socket)
    };
    if !args.materialize.is_empty() {
        for ((m, spec), out) in members.iter().zip(&specs).zip(&args.materialize) {
            println!("member: {}", m.name);
            let point = points::parse_point(spec)?;
            match connect(m)? {
                Some(client) => materialize_online(client, spec, out),
                None => materialize_offline(&m.dir, args.block_size, &point, out),
            }
            .with_context(|| format!("member {}", m.name))?;
        }
        return Ok(());
    }
    let mode = args.expose.context("--expose or --materialize is required")?;
    signals::install()?;
    let mut sessions = Vec::new();
    let opened = (|| {
        for (m, spec) in members.iter().zip(&specs) {
            println!("member: {}", m.name);
            let point = points::parse_point(spec)?;
            let s = open_session(
                connect(m)?,
                &m.dir,
                spec,
                &point,
                mode,
                args.frontend,
                args.block_size,
            )
            .with_context(|| format!("member {}", m.name))?;
            println!("device: {}", s.device().display());
            sessions.push(s);
        }
        anyhow::Ok(())
    })();
    if let Err(e) = opened {
        for s in &mut sessions {
            let _ = s.remove();
        }
        return Err(e);
    }
    println!("ready: {} snapshots of the group; Ctrl-C or SIGTERM removes them", mode.as_str());
    std::io::stdout().flush()?;
    while !signals::stop_requested() {
        for s in &mut sessions {
            if let Session::Remote { client, .. } = s {
                if client.closed() {
                    bail!("a receiver closed its control connection: its snapshot is gone");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for s in &mut sessions {
        s.remove()?;
    }
    println!("removed: {} snapshots of group {}", mode.as_str(), group_hex(id));
    Ok(())
}

enum Session {
    Remote { client: Client, id: u64, device: PathBuf },
    Local { registry: Registry, id: u64, device: PathBuf },
}

impl Session {
    fn device(&self) -> &Path {
        match self {
            Session::Remote { device, .. } | Session::Local { device, .. } => device,
        }
    }

    fn remove(&mut self) -> anyhow::Result<u64> {
        match self {
            Session::Remote { client, id, .. } => {
                let v = client.request(json!({"op": "remove", "id": *id}))?;
                Ok(v["overlay_blocks"].as_u64().unwrap_or(0))
            }
            Session::Local { registry, id, .. } => registry.remove(*id),
        }
    }
}

fn print_point(p: &Value) {
    let name = p["bookmark"].as_str().map(|b| format!(" {b:?}")).unwrap_or_default();
    println!(
        "point: seq {} ({}{name}, {})",
        p["seq"],
        p["kind"].as_str().unwrap_or("?"),
        p["time"].as_str().unwrap_or("?")
    );
}

fn run_tool(tool: &str, args: &[&std::ffi::OsStr]) -> anyhow::Result<()> {
    let out = Command::new(tool).args(args).output().with_context(|| format!("run {tool}"))?;
    if !out.status.success() {
        bail!("{tool} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Mounts the snapshot's filesystem. A read-only ext4 whose journal needs replaying cannot
/// be mounted read-only on a read-only device unless the replay is skipped (`noload`).
fn mount(device: &Path, at: &Path, mode: Mode) -> anyhow::Result<()> {
    std::fs::create_dir_all(at).with_context(|| format!("create {}", at.display()))?;
    let (dev, at) = (device.as_os_str(), at.as_os_str());
    match mode {
        Mode::Rw => run_tool("mount", &[dev, at]),
        Mode::Ro => run_tool("mount", &["-o".as_ref(), "ro".as_ref(), dev, at]).or_else(|first| {
            run_tool("mount", &["-o".as_ref(), "ro,noload".as_ref(), dev, at]).map_err(|_| first)
        }),
    }
}

fn materialize_offline(
    dir: &Path,
    block_size: u32,
    point: &tidemark_journal::RecoveryPoint,
    out: &Path,
) -> anyhow::Result<()> {
    let log = common::open_log(dir, block_size)?;
    let info = points::resolve_or_explain(&log, point)?;
    print_point(&points::point_json(&info));
    let len = log.volume_len_at(VolumeId(0), info.seq)?;
    let hash = copy_out(len, out, &mut |pos, buf| {
        log.read_at(&info, VolumeId(0), pos, buf)
            .with_context(|| format!("read {} bytes at {pos} as of seq {}", buf.len(), info.seq))
    })?;
    println!("materialized: {len} bytes to {}", out.display());
    verify(out, len, hash)
}

fn materialize_online(mut client: Client, spec: &str, out: &Path) -> anyhow::Result<()> {
    let v = client.request(json!({"op": "expose", "point": spec, "mode": "ro"}))?;
    let id = v["id"].as_u64().context("expose answer without an id")?;
    print_point(&v["point"]);
    let copied = (|| {
        let device = v["device"].as_str().context("expose answer without a device")?;
        let len = v["len"].as_u64().context("expose answer without a length")?;
        let src = File::open(device).with_context(|| format!("open {device}"))?;
        let hash = copy_out(len, out, &mut |pos, buf| {
            src.read_exact_at(buf, pos).with_context(|| format!("read {device} at {pos}"))
        })?;
        anyhow::Ok((len, hash))
    })();
    // Removed whatever the copy did.
    let removed = client.request(json!({"op": "remove", "id": id}));
    let (len, hash) = copied?;
    removed?;
    println!(
        "materialized: {len} bytes to {} (through a read-only snapshot of the running receiver)",
        out.display()
    );
    verify(out, len, hash)
}

/// Opens the output: a block device as it is (it must hold `len` bytes), or a file created
/// or truncated to `len` bytes.
fn open_out(out: &Path, len: u64) -> anyhow::Result<File> {
    let is_device = std::fs::metadata(out).is_ok_and(|m| m.file_type().is_block_device());
    if !is_device {
        let f = File::create(out).with_context(|| format!("create {}", out.display()))?;
        f.set_len(len).with_context(|| format!("size {} to {len} bytes", out.display()))?;
        return Ok(f);
    }
    let mut f = OpenOptions::new()
        .write(true)
        .open(out)
        .with_context(|| format!("open device {}", out.display()))?;
    let size = f.seek(SeekFrom::End(0)).with_context(|| format!("size of {}", out.display()))?;
    if size < len {
        bail!("device {} holds {size} bytes; the volume needs {len}", out.display());
    }
    Ok(f)
}

/// Writes `len` bytes read by `read` (position, buffer) to `out`, hashing them as written,
/// with a progress bar on a terminal; syncs and returns the hash.
fn copy_out(
    len: u64,
    out: &Path,
    read: &mut dyn FnMut(u64, &mut [u8]) -> anyhow::Result<()>,
) -> anyhow::Result<[u8; 32]> {
    let dst = open_out(out, len)?;
    let mut buf = vec![0u8; 4 << 20];
    let mut hasher = blake3::Hasher::new();
    let bar = common::byte_bar("materialize", len);
    let mut pos = 0u64;
    while pos < len {
        let n = ((len - pos) as usize).min(buf.len());
        read(pos, &mut buf[..n])?;
        dst.write_all_at(&buf[..n], pos)
            .with_context(|| format!("write {} at {pos}", out.display()))?;
        hasher.update(&buf[..n]);
        pos += n as u64;
        if let Some(b) = &bar {
            b.set_position(pos);
        }
    }
    dst.sync_all().with_context(|| format!("fsync {}", out.display()))?;
    // So that the verification re-reads the medium, not the page cache.
    if let Err(e) = posix_fadvise(dst.as_raw_fd(), 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED) {
        tracing::warn!(out = %out.display(), error = %e, "could not drop the cached pages before verifying");
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(*hasher.finalize().as_bytes())
}

/// Re-reads the first `len` bytes of `out` and checks their BLAKE3 against `written`;
/// prints both lines.
fn verify(out: &Path, len: u64, written: [u8; 32]) -> anyhow::Result<()> {
    let f = File::open(out).with_context(|| format!("reopen {}", out.display()))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut pos = 0u64;
    while pos < len {
        let n = ((len - pos) as usize).min(buf.len());
        f.read_exact_at(&mut buf[..n], pos)
            .with_context(|| format!("re-read {} at {pos}", out.display()))?;
        hasher.update(&buf[..n]);
        pos += n as u64;
    }
    let reread = hasher.finalize();
    let written = blake3::Hash::from(written);
    println!("blake3: {}", written.to_hex());
    if reread != written {
        bail!(
            "verification failed: {} re-reads with blake3 {}, but {} was written",
            out.display(),
            reread.to_hex(),
            written.to_hex()
        );
    }
    println!("verified: the re-read of {} has the same hash", out.display());
    Ok(())
}
