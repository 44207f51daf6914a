//! The control socket of `tidemark protect` (`STATE/control.sock` by default; spec:
//! `docs/control-protocol.md`, "The source's socket"), over the transport of
//! [`crate::control`]: `status`, `verify` (the Merkle comparison of a fast resync over the
//! live connection, sending nothing) and `bookmark` (a named point in the capture stream,
//! optionally with the filesystem frozen). Also the periodic bookmarks of
//! `protect --bookmark-every`. `tidemark verify` and `tidemark bookmark` are its clients.
//!
//! Invariants:
//! - A verify compares only after the target acknowledged everything spooled before it
//!   started, and never while a resync runs: it takes the pair's resync slot (the target
//!   keeps one hash tree per session, so two comparisons must not interleave).
//! - A filesystem this agent froze is thawed by this agent: after the bookmark, on any
//!   error or panic of the request (a guard), and by a timer at the freeze timeout whatever
//!   the request is doing. None of it depends on the client staying connected.

use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tidemark_journal::{Bookmark, BookmarkKind, Nanos, VolumeId};
use tidemark_sync::pair::{PairStage, PairWatch};
use tidemark_sync::resync::shape_for;
use tidemark_sync::shape::{ResyncSlots, TokenBucket};
use tidemark_sync::ship::HashClient;
use tidemark_sync::syncer::{Phase, Syncer, SyncerConfig};
use tidemark_tap::{Captured, Tap};

use crate::control::{self, Listener, Progress, Service};
use crate::points;

/// `protect`'s options for its control socket and periodic bookmarks.
#[derive(Debug, clap::Args)]
// No argument group: its default id (`Args`) is protect's own, and clap's debug builds
// refuse two groups of one id.
#[group(skip)]
pub struct Args {
    /// The control socket, for `tidemark verify` and `tidemark bookmark` (default:
    /// STATE/control.sock).
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Take a bookmark this often (`90s`, `15m`, `2h`, `1d`; whole seconds, at least one), named
    /// PREFIX-TIME (`auto-2026-12-01T21:45:00Z`).
    #[arg(long, value_parser = parse_duration)]
    pub bookmark_every: Option<Duration>,
    /// The name prefix of periodic bookmarks.
    #[arg(long, default_value = "auto")]
    pub bookmark_prefix: String,
    /// Periodic bookmarks: run this (with `sh -c`) before each; the bookmark is taken only
    /// if it exits 0 (an application bookmark: a database checkpoint).
    #[arg(long, value_name = "CMD", requires = "bookmark_every")]
    pub bookmark_pre: Option<String>,
    /// Periodic bookmarks: run this (with `sh -c`) after each, taken or not.
    #[arg(long, value_name = "CMD", requires = "bookmark_every")]
    pub bookmark_post: Option<String>,
    /// Periodic bookmarks: freeze the filesystem mounted here (an absolute path, on the
    /// protected device) around each (FIFREEZE, bookmark, FITHAW; thawed after 30 s
    /// whatever happens). A tick when it cannot be frozen takes no bookmark.
    #[arg(long, value_name = "MOUNTPOINT", requires = "bookmark_every")]
    pub bookmark_freeze: Option<PathBuf>,
}

/// How long a periodic bookmark keeps its filesystem frozen at most.
const PERIODIC_FREEZE: Duration = Duration::from_secs(30);

/// What the periodic bookmark thread does at each tick.
#[derive(Debug, Clone)]
struct Periodic {
    every: Duration,
    prefix: String,
    pre: Option<String>,
    post: Option<String>,
    freeze: Option<PathBuf>,
    state: PathBuf,
}

/// The longest freeze a client may ask for.
pub const MAX_FREEZE: Duration = Duration::from_secs(600);

/// How often a long op sends a progress line.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// Parses a bookmark period: a duration ([`crate::common::parse_duration`]) of a whole
/// number of seconds, at least one.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = crate::common::parse_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err(format!("{s:?}: the period must be at least one second"));
    }
    // Ticks then fall on whole seconds, so two never share a name (names are to the
    // second): each tick's name is its whole second, and the next tick is a later one.
    if d.subsec_nanos() != 0 {
        return Err(format!("{s:?}: the period must be a whole number of seconds"));
    }
    Ok(d)
}

/// The name of a periodic bookmark taken at `t`: `PREFIX-YYYY-MM-DDTHH:MM:SSZ`.
pub fn periodic_name(prefix: &str, t: Nanos) -> String {
    let whole = Nanos(t.0 / Nanos::SECOND * Nanos::SECOND);
    let stamp = points::rfc3339(whole).replace(".000Z", "Z");
    format!("{prefix}-{stamp}")
}

/// Checks a periodic bookmarks' name prefix: the names it makes must be good names.
pub fn check_prefix(prefix: &str) -> anyhow::Result<()> {
    check_name(&periodic_name(prefix, Nanos(0)))
        .with_context(|| format!("bookmark name prefix {prefix:?}"))
}

/// Checks a bookmark name against the journal's and the wire's rule (1 to 255 bytes of
/// UTF-8, no control characters, not only whitespace: `docs/journal-format.md` 5.4).
pub fn check_name(name: &str) -> anyhow::Result<()> {
    Bookmark::new(name, BookmarkKind::User, 0).map(|_| ()).map_err(anyhow::Error::from)
}

/// The running control socket and periodic bookmark thread of a `protect`.
pub struct SourceControl {
    listener: Listener<SourceService>,
    periodic: Option<(Arc<StopFlag>, JoinHandle<()>)>,
}

/// A stop flag a sleeping thread is woken by.
type StopFlag = (Mutex<bool>, Condvar);

impl std::fmt::Debug for SourceControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceControl").field("path", &self.listener.path()).finish()
    }
}

impl SourceControl {
    /// Serves the socket of `args` (default `STATE/control.sock`) over `tap`, the
    /// shipper's `client`, the pair's status `pair` and its resync `slots` (the same
    /// [`ResyncSlots`] the pair controller was started with), and starts the periodic
    /// bookmarks when asked.
    pub fn start(
        args: &Args,
        state: &Path,
        tap: Arc<Tap>,
        client: HashClient,
        pair: PairWatch,
        slots: Arc<ResyncSlots>,
        (bucket, schedule): (Arc<TokenBucket>, Option<String>),
    ) -> anyhow::Result<SourceControl> {
        if args.bookmark_every.is_some() {
            check_prefix(&args.bookmark_prefix).context("--bookmark-prefix")?;
        }
        if let Some(m) = &args.bookmark_freeze {
            if !m.is_absolute() {
                bail!("--bookmark-freeze {}: expected an absolute path", m.display());
            }
        }
        let path = args.control.clone().unwrap_or_else(|| control::default_socket(state));
        let last_bookmark = Arc::new(Mutex::new(None));
        let service = SourceService {
            tap: tap.clone(),
            client: client.clone(),
            pair,
            slots,
            bucket,
            schedule: Mutex::new(schedule),
            last_bookmark: last_bookmark.clone(),
            verifying: Mutex::new(None),
        };
        let listener = Listener::start(&path, service)?;
        let periodic = match args.bookmark_every {
            Some(every) => {
                let stop = Arc::new((Mutex::new(false), Condvar::new()));
                let cfg = Periodic {
                    every,
                    prefix: args.bookmark_prefix.clone(),
                    pre: args.bookmark_pre.clone(),
                    post: args.bookmark_post.clone(),
                    freeze: args.bookmark_freeze.clone(),
                    state: state.to_path_buf(),
                };
                let s = stop.clone();
                let thread = std::thread::Builder::new()
                    .name("tidemark-bookmarks".into())
                    .spawn(move || periodic(&tap, &client, &cfg, &s, &last_bookmark))
                    .context("start the periodic bookmark thread")?;
                Some((stop, thread))
            }
            None => None,
        };
        Ok(SourceControl { listener, periodic })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        self.listener.path()
    }

    /// Stops the periodic bookmarks and the socket (a running verify is waited for up to
    /// a few seconds; a frozen filesystem is thawed before its request ends).
    pub fn stop(self) {
        if let Some((stop, thread)) = self.periodic {
            *stop.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
            stop.1.notify_all();
            let _ = thread.join();
        }
        self.listener.stop();
    }
}

fn periodic(
    tap: &Tap,
    client: &HashClient,
    cfg: &Periodic,
    stop: &StopFlag,
    last: &Mutex<Option<Value>>,
) {
    // Ticks on the UTC clock's multiples of the period, as `tidemark bookmark --every`.
    let period = (cfg.every.as_nanos() as u64).max(1);
    let mut next = crate::bookmark::next_tick(now().0, period);
    loop {
        {
            let mut stopped = stop.0.lock().unwrap_or_else(|e| e.into_inner());
            while !*stopped {
                let left = Duration::from_nanos(next.saturating_sub(now().0));
                if left.is_zero() {
                    break;
                }
                stopped = stop.1.wait_timeout(stopped, left).unwrap_or_else(|e| e.into_inner()).0;
            }
            if *stopped {
                return;
            }
        }
        let t = now().0;
        next = crate::bookmark::next_tick(t, period);
        let name = periodic_name(&cfg.prefix, Nanos(t));
        match periodic_one(tap, client, cfg, &name, last) {
            Ok(seq) => tracing::info!(name, seq, "periodic bookmark"),
            Err(e) => eprintln!("periodic bookmark {name:?}: {e:#}"),
        }
    }
}

/// One periodic bookmark: the pre hook, the bookmark (frozen when asked), the post hook.
fn periodic_one(
    tap: &Tap,
    client: &HashClient,
    cfg: &Periodic,
    name: &str,
    last: &Mutex<Option<Value>>,
) -> anyhow::Result<u64> {
    let state = cfg.state.display().to_string();
    let env = [("TIDEMARK_BOOKMARK", name), ("TIDEMARK_STATE", state.as_str())];
    let kind = bookmark_kind(cfg.pre.is_some() || cfg.post.is_some(), cfg.freeze.is_some());
    let taken = (|| {
        if let Some(pre) = &cfg.pre {
            crate::bookmark::run_hook("pre", pre, &env, None)?;
        }
        match &cfg.freeze {
            Some(m) => bookmark_frozen(tap, client, last, name, kind, m, PERIODIC_FREEZE)
                .map(|(seq, _)| seq),
            None => take_bookmark(tap, client, name, kind, last),
        }
    })();
    let post = match &cfg.post {
        Some(post) => {
            crate::bookmark::run_hook("post", post, &env, Some(taken.as_ref().ok().copied()))
        }
        None => Ok(()),
    };
    let seq = taken?;
    post?;
    Ok(seq)
}

/// The wall clock.
pub fn now() -> Nanos {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    Nanos(d.as_nanos() as u64)
}

/// Appends the bookmark to the capture stream; its sequence number.
fn take_bookmark(
    tap: &Tap,
    client: &HashClient,
    name: &str,
    kind: BookmarkKind,
    last: &Mutex<Option<Value>>,
) -> anyhow::Result<u64> {
    let seq = append_bookmark(tap, name, kind)?;
    client.ring();
    *last.lock().unwrap_or_else(|e| e.into_inner()) = Some(
        json!({"name": name, "seq": seq, "kind": kind_name(kind), "time": points::rfc3339(now())}),
    );
    Ok(seq)
}

/// Appends a bookmark to the capture stream and makes it durable; its sequence number.
/// (`protect --final-bookmark` calls it once the frontend has stopped.)
pub fn append_bookmark(tap: &Tap, name: &str, kind: BookmarkKind) -> anyhow::Result<u64> {
    let bookmark = Bookmark::new(name, kind, 0)?;
    let captured = tap.bookmark(bookmark).with_context(|| format!("bookmark {name:?}"))?;
    let seq = spooled_seq(captured, name)?;
    tap.sync_spool().context("sync the spool after the bookmark")?;
    Ok(seq)
}

/// The sequence number of a bookmark the tap appended; an error in overflow.
fn spooled_seq(captured: Captured, name: &str) -> anyhow::Result<u64> {
    match captured {
        Captured::Spooled(seq) => Ok(seq.0),
        Captured::OutOfSync | Captured::Nothing => bail!(
            "bookmark {name:?}: the spool is in overflow (writes are tracked as dirty regions \
             until a resync), so no point can be marked now"
        ),
    }
}

/// The kind of a bookmark taken between hooks (`hooks`) or with a filesystem frozen.
pub fn bookmark_kind(hooks: bool, frozen: bool) -> BookmarkKind {
    if hooks {
        BookmarkKind::Application
    } else if frozen {
        BookmarkKind::Filesystem
    } else {
        BookmarkKind::User
    }
}

/// A bookmark kind as the agent's documents name it.
pub fn kind_name(kind: BookmarkKind) -> &'static str {
    match kind {
        BookmarkKind::Filesystem => "filesystem",
        BookmarkKind::Application => "application",
        _ => "user",
    }
}

fn parse_kind(s: &str) -> anyhow::Result<BookmarkKind> {
    Ok(match s {
        "user" => BookmarkKind::User,
        "filesystem" => BookmarkKind::Filesystem,
        "application" => BookmarkKind::Application,
        other => bail!("bookmark kind {other:?}: expected user, filesystem or application"),
    })
}

struct SourceService {
    tap: Arc<Tap>,
    client: HashClient,
    pair: PairWatch,
    slots: Arc<ResyncSlots>,
    /// The shipper's token bucket (`limits`).
    bucket: Arc<TokenBucket>,
    /// The daily schedule in force, as written (`limits`).
    schedule: Mutex<Option<String>>,
    last_bookmark: Arc<Mutex<Option<Value>>>,
    /// The running verify's progress, for `status`.
    verifying: Mutex<Option<Value>>,
}

impl Service for SourceService {
    type Conn = GroupConn;

    fn role(&self) -> &'static str {
        "protect"
    }

    fn ops(&self) -> &'static str {
        "status, verify, bookmark, limits, hold or release"
    }

    fn handle(
        &self,
        op: &str,
        req: &Value,
        conn: &mut GroupConn,
        progress: &mut Progress<'_>,
    ) -> Option<anyhow::Result<Value>> {
        Some(match op {
            "status" => Ok(self.status()),
            "verify" => self.verify(req, progress),
            "bookmark" if !req["hold"].is_null() || !req["group"].is_null() => {
                self.group_bookmark(req)
            }
            "bookmark" => self.bookmark(req),
            "limits" => self.limits(req),
            "hold" => self.hold(req, conn),
            "release" => self.release(req, conn),
            _ => return None,
        })
    }

    fn disconnected(&self, conn: GroupConn) {
        // A coordinator that went away leaves no hold behind (the lease covers one that
        // hangs while connected).
        if let Some(token) = conn.hold {
            if self.tap.release_writes(token).is_ok() {
                tracing::warn!(token, "write hold released: its coordinator disconnected");
            }
        }
        if let Some(f) = conn.frozen {
            let _ = f.thaw();
        }
    }
}

/// What one control connection owns: the write hold it took and the filesystem it froze
/// with it, released and thawed when it closes.
#[derive(Default)]
pub struct GroupConn {
    hold: Option<u64>,
    frozen: Option<HeldFreeze>,
}

/// A filesystem frozen for a hold: thawed at `release`, when the connection closes, or by
/// its timer at the hold's lease.
struct HeldFreeze {
    frozen: Arc<Frozen>,
    done: mpsc::Sender<()>,
    timer: JoinHandle<()>,
    since: Instant,
}

impl HeldFreeze {
    /// Freezes `mountpoint`; its timer thaws it after `lease` unless thawed before.
    fn start(mountpoint: &Path, lease: Duration) -> anyhow::Result<HeldFreeze> {
        let since = Instant::now();
        let frozen = Frozen::freeze(mountpoint)?;
        let (done, done_rx) = mpsc::channel::<()>();
        let f = frozen.clone();
        let timer = std::thread::Builder::new()
            .name("tidemark-thaw".into())
            .spawn(move || {
                if let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(lease) {
                    let _ = f.thaw(true);
                }
            })
            .map_err(|e| {
                let _ = frozen.thaw(false);
                anyhow::Error::from(e).context("start the thaw timer")
            })?;
        Ok(HeldFreeze { frozen, done, timer, since })
    }

    /// Thaws (if the timer has not); `(thawed here, frozen for)`.
    fn thaw(self) -> (std::io::Result<bool>, Duration) {
        let thawed = self.frozen.thaw(false);
        drop(self.done);
        let _ = self.timer.join();
        (thawed, self.since.elapsed())
    }
}

/// The default lease of a write hold.
pub const DEFAULT_HOLD_LEASE: Duration = Duration::from_secs(10);

/// Parses a group id as the control protocol writes it: 16 hexadecimal digits, not all zero.
pub fn parse_group_id(s: &str) -> anyhow::Result<u64> {
    if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("group id {s:?}: expected 16 hexadecimal digits");
    }
    let id = u64::from_str_radix(s, 16).context("group id")?;
    if id == 0 {
        bail!("group id {s:?}: 0 means \"no group\"");
    }
    Ok(id)
}

/// A group id as the control protocol writes it.
pub fn group_hex(id: u64) -> String {
    format!("{id:016x}")
}

impl SourceService {
    /// `hold`: no new write is admitted until `release`, the connection closes or the
    /// lease (`lease_s`) runs out (`docs/consistency-groups.md`).
    fn hold(&self, req: &Value, conn: &mut GroupConn) -> anyhow::Result<Value> {
        let lease = match &req["lease_s"] {
            Value::Null => DEFAULT_HOLD_LEASE,
            v => {
                let s = v.as_f64().context("hold \"lease_s\" must be a number of seconds")?;
                if !(s > 0.0 && s <= tidemark_tap::MAX_HOLD_LEASE.as_secs_f64()) {
                    bail!(
                        "hold lease {s} s: expected more than 0 and at most {} s",
                        tidemark_tap::MAX_HOLD_LEASE.as_secs()
                    );
                }
                Duration::from_secs_f64(s)
            }
        };
        let ps = self.pair.status();
        if matches!(ps.stage, PairStage::InitialSync | PairStage::Resync) {
            bail!(
                "the pair is in stage {:?}: the replica offers no point inside a resync, so a \
                 group bookmark taken now could not be recovered here; try again once it is in \
                 diff sync",
                ps.stage.name()
            );
        }
        if let Some(ov) = self.tap.status().overflow {
            bail!(
                "the spool is in overflow ({}): no bookmark can be marked until the resync, so \
                 writes are not held",
                ov.cause
            );
        }
        // A filesystem is frozen before the writes are held: freezing writes its dirty data
        // back through the tap, which a hold would stop.
        let frozen = match req["freeze"].as_str() {
            Some(m) => Some(HeldFreeze::start(Path::new(m), lease)?),
            None => None,
        };
        let hold = match self.tap.hold_writes(lease) {
            Ok(h) => h,
            Err(e) => {
                if let Some(f) = frozen {
                    let _ = f.thaw();
                }
                return Err(e.into());
            }
        };
        conn.hold = Some(hold.token);
        let froze = frozen.is_some();
        if let Some(old) = std::mem::replace(&mut conn.frozen, frozen) {
            let _ = old.thaw();
        }
        Ok(json!({
            "token": hold.token,
            "lease_s": lease.as_secs_f64(),
            "last_seq": self.tap.status().last_seq.0,
            "stage": ps.stage.name(),
            "frozen": froze,
        }))
    }

    /// `release`: ends the hold `token`; `released` false when its lease had run out.
    fn release(&self, req: &Value, conn: &mut GroupConn) -> anyhow::Result<Value> {
        let token = req["token"].as_u64().context("release needs the hold's \"token\"")?;
        if conn.hold == Some(token) {
            conn.hold = None;
        }
        let released = match self.tap.release_writes(token) {
            Ok(()) => true,
            Err(tidemark_tap::TapError::Hold(tidemark_tap::HoldRefusal::NotHeld { .. })) => false,
            Err(e) => return Err(e.into()),
        };
        let mut answer = json!({"token": token, "released": released});
        if let Some(f) = conn.frozen.take() {
            let mountpoint = f.frozen.mountpoint.display().to_string();
            let (thawed, frozen_for) = f.thaw();
            answer["frozen_ms"] = json!(frozen_for.as_millis() as u64);
            // false: the timer had thawed it at the lease, before this release.
            answer["thawed"] = json!(thawed.with_context(|| format!("FITHAW {mountpoint}"))?);
        }
        Ok(answer)
    }

    /// `bookmark` with `group` and `hold`: the member's part of a group bookmark, appended
    /// only while the hold is in force.
    fn group_bookmark(&self, req: &Value) -> anyhow::Result<Value> {
        let name = req["name"].as_str().context("bookmark needs a \"name\"")?;
        check_name(name)?;
        let kind = parse_kind(req["kind"].as_str().unwrap_or("user"))?;
        let group = parse_group_id(
            req["group"].as_str().context("a group bookmark needs its \"group\" id")?,
        )?;
        let token = req["hold"].as_u64().context(
            "a group bookmark needs the \"hold\" token: it is taken while writes are held",
        )?;
        if !req["freeze"].is_null() {
            bail!("a group bookmark does not freeze filesystems (not supported yet)");
        }
        let bookmark = Bookmark::new(name, kind, group)?;
        let captured = self
            .tap
            .bookmark_held(token, bookmark)
            .with_context(|| format!("group bookmark {name:?}"))?;
        let seq = spooled_seq(captured, name)?;
        self.tap.sync_spool().context("sync the spool after the bookmark")?;
        self.client.ring();
        *self.last_bookmark.lock().unwrap_or_else(|e| e.into_inner()) = Some(json!({
            "name": name, "seq": seq, "kind": kind_name(kind), "group": group_hex(group),
            "time": points::rfc3339(now()),
        }));
        Ok(json!({"name": name, "seq": seq, "kind": kind_name(kind), "group": group_hex(group)}))
    }
}

impl SourceService {
    /// `limits`: changes what the request sets (all checked first), answers what is in force.
    fn limits(&self, req: &Value) -> anyhow::Result<Value> {
        let mut schedule = self.schedule.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(changed) = crate::limits::apply(req, &self.bucket, &self.slots)? {
            *schedule = changed;
        }
        tracing::info!(rate = %self.bucket.status().base_rate, schedule = ?*schedule, slots = self.slots.limit(), "link limits");
        Ok(crate::limits::status_json(
            &self.bucket.status(),
            schedule.as_deref(),
            self.slots.limit(),
        ))
    }

    fn status(&self) -> Value {
        let ps = self.pair.status();
        let s = self.client.status();
        let t = self.tap.status();
        json!({
            "stage": ps.stage.name(),
            "resyncs": ps.resyncs,
            "pending_resync_bytes": ps.pending_bytes,
            "last_error": ps.last_error,
            "volume_bytes": self.tap.device_len(),
            "tap": {
                "last_seq": t.last_seq.0,
                "durable_seq": t.durable_seq.0,
                "overflow": t.overflow.as_ref().map(|o| o.cause.clone()),
            },
            "shipper": {
                "state": format!("{:?}", s.state),
                "acked": s.acked.0,
                "backlog_bytes": s.backlog_bytes,
            },
            "last_bookmark": self.last_bookmark.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            "verify": self.verifying.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            "hold": hold_json(&self.tap.hold_status()),
        })
    }

    fn set_verifying(&self, v: Option<Value>) {
        *self.verifying.lock().unwrap_or_else(|e| e.into_inner()) = v;
    }

    fn verify(&self, req: &Value, progress: &mut Progress<'_>) -> anyhow::Result<Value> {
        let len = self.tap.device_len();
        let range = match &req["range"] {
            Value::Null => None,
            Value::Array(a) if a.len() == 2 => {
                let (Some(start), Some(end)) = (a[0].as_u64(), a[1].as_u64()) else {
                    bail!("verify \"range\" must be [start, end] in bytes");
                };
                if start >= end || end > len {
                    bail!(
                        "verify range {start}..{end}: expected start < end <= {len} (the volume's size)"
                    );
                }
                Some(start..end)
            }
            _ => bail!("verify \"range\" must be [start, end] in bytes"),
        };
        let timeout = Duration::from_secs(req["timeout_s"].as_u64().unwrap_or(600));
        let started = Instant::now();
        let result = self.verify_inner(range, timeout, progress);
        self.set_verifying(None);
        let mut v = result?;
        v["elapsed_s"] = json!(crate::common::secs(started.elapsed()));
        Ok(v)
    }

    fn verify_inner(
        &self,
        range: Option<Range<u64>>,
        timeout: Duration,
        progress: &mut Progress<'_>,
    ) -> anyhow::Result<Value> {
        let until = Instant::now() + timeout;
        let mut report = |what: &str, p: Value| {
            let mut p = p;
            p["step"] = json!(what);
            self.set_verifying(Some(p.clone()));
            progress.send(p)
        };
        // 1. No resync may run meanwhile: take the pair's slot.
        let _permit = loop {
            if let Some(permit) = self.slots.acquire(Some(Duration::from_secs(1))) {
                break permit;
            }
            if !report("waiting for the running resync", json!({})) {
                bail!("the client went away");
            }
            if Instant::now() >= until {
                bail!("a resync kept running for {timeout:?}: verify did not start");
            }
        };
        let ps = self.pair.status();
        if ps.stage != PairStage::DiffSync || ps.pending_bytes > 0 {
            bail!(
                "the pair is in stage {:?}{}: verify compares the replica only in diff sync, \
                 once the initial sync and every resync have completed",
                ps.stage.name(),
                if ps.pending_bytes > 0 {
                    format!(" with {} bytes waiting for a resync", ps.pending_bytes)
                } else {
                    String::new()
                }
            );
        }
        // 2. The target holds everything spooled before the verify started.
        let before = self.tap.sync_spool().context("sync the spool")?;
        self.client.ring();
        loop {
            let s = self.client.status();
            if s.acked >= before {
                break;
            }
            if !report(
                "waiting for the target to acknowledge",
                json!({"seq": before.0, "acked": s.acked.0}),
            ) {
                bail!("the client went away");
            }
            if Instant::now() >= until {
                bail!(
                    "the target did not acknowledge seq {before} within {timeout:?} (acknowledged: \
                     {}, link {:?}): verify did not compare",
                    s.acked,
                    s.state
                );
            }
            self.client.wait_for(Duration::from_secs(1), |s| s.acked >= before);
        }
        // 3. The comparison. A limited comparison would be answered by the target from the
        // tree of the session's last whole comparison when one is cached (stale by now), so
        // the whole volume is compared and the result cut to the range.
        let latest = Arc::new(Mutex::new(None));
        let l = latest.clone();
        let mut cfg = SyncerConfig::new(VolumeId(0));
        cfg.request_timeout = timeout;
        let syncer = Syncer::new(self.tap.clone(), self.client.clone(), cfg)
            .progress(Arc::new(move |p| *l.lock().unwrap_or_else(|e| e.into_inner()) = Some(p)));
        let diff = std::thread::scope(|s| {
            let job = s.spawn(|| syncer.verify(None));
            let mut client_gone = false;
            let mut last_sent = Instant::now();
            while !job.is_finished() {
                let p = *latest.lock().unwrap_or_else(|e| e.into_inner());
                // Checked every 50 ms (a short verify answers at once), sent every 500 ms.
                let due = last_sent.elapsed() >= PROGRESS_EVERY;
                if let Some(p) = p.filter(|_| due) {
                    last_sent = Instant::now();
                    let phase = match p.phase {
                        Phase::Hashing => "hashing",
                        Phase::Comparing => "comparing",
                        Phase::Copying => "copying",
                    };
                    if !client_gone && !report(phase, json!({"done": p.done, "total": p.total})) {
                        // The comparison cannot be cancelled: it ends, unseen.
                        client_gone = true;
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            job.join().map_err(|_| anyhow::anyhow!("the verify thread panicked"))
        })?
        .context("verify")?;
        let after = self.tap.status().last_seq;
        let ranges: Vec<Range<u64>> = match &range {
            None => diff.ranges.clone(),
            Some(r) => diff
                .ranges
                .iter()
                .filter_map(|d| {
                    let (start, end) = (d.start.max(r.start), d.end.min(r.end));
                    (start < end).then_some(start..end)
                })
                .collect(),
        };
        let differing: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        let compared = range.as_ref().map_or(self.tap.device_len(), |r| r.end - r.start);
        Ok(json!({
            "identical": ranges.is_empty(),
            "ranges": ranges.iter().map(|r| json!({"start": r.start, "end": r.end})).collect::<Vec<_>>(),
            "differing_bytes": differing,
            "compared_bytes": compared,
            "range": range.as_ref().map(|r| json!([r.start, r.end])),
            "volume_bytes": self.tap.device_len(),
            "leaf_bytes": shape_for(self.tap.device_len()).leaf_size(),
            "acked_seq": before.0,
            // Events captured while the comparison ran: a difference inside their ranges
            // may be a write in flight rather than damage.
            "events_during": after.0.saturating_sub(before.0),
            "hash_requests": diff.stats.hash_requests,
            "hashes_exchanged": diff.stats.hashes_exchanged,
        }))
    }

    fn bookmark(&self, req: &Value) -> anyhow::Result<Value> {
        let name = req["name"].as_str().context("bookmark needs a \"name\"")?;
        check_name(name)?;
        let kind = parse_kind(req["kind"].as_str().unwrap_or("user"))?;
        let Some(mountpoint) = req["freeze"].as_str() else {
            let seq = take_bookmark(&self.tap, &self.client, name, kind, &self.last_bookmark)?;
            return Ok(json!({"name": name, "seq": seq, "kind": kind_name(kind)}));
        };
        let timeout = Duration::from_secs_f64(req["freeze_timeout_s"].as_f64().unwrap_or(30.0));
        if timeout.is_zero() || timeout > MAX_FREEZE {
            bail!("freeze timeout {timeout:?}: expected more than 0 and at most {MAX_FREEZE:?}");
        }
        let kind = if kind == BookmarkKind::User { BookmarkKind::Filesystem } else { kind };
        let (seq, frozen_ms) = bookmark_frozen(
            &self.tap,
            &self.client,
            &self.last_bookmark,
            name,
            kind,
            Path::new(mountpoint),
            timeout,
        )?;
        Ok(json!({"name": name, "seq": seq, "kind": kind_name(kind), "frozen_ms": frozen_ms}))
    }
}

/// A bookmark with the filesystem at `mountpoint` frozen around it (thawed at `timeout`
/// whatever happens, and on every way out); its seq and how long it stayed frozen (ms).
fn bookmark_frozen(
    tap: &Tap,
    client: &HashClient,
    last: &Mutex<Option<Value>>,
    name: &str,
    kind: BookmarkKind,
    mountpoint: &Path,
    timeout: Duration,
) -> anyhow::Result<(u64, u64)> {
    // One frozen bookmark at a time in this agent: a periodic one and one asked for on the
    // socket would otherwise race for the same filesystem, and the second FIFREEZE fails
    // (EBUSY). The next waits the few milliseconds of the first.
    static FREEZING: Mutex<()> = Mutex::new(());
    let _one = FREEZING.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let frozen = Frozen::freeze(mountpoint)?;
    let guard = ThawOnDrop(frozen.clone());
    let (done, done_rx) = mpsc::channel::<()>();
    let timer = {
        let f = frozen.clone();
        std::thread::Builder::new()
            .name("tidemark-thaw".into())
            .spawn(move || {
                if let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(timeout) {
                    let _ = f.thaw(true);
                }
            })
            .context("start the thaw timer")
    };
    // On an error the guard thaws.
    let timer = timer?;
    let taken = take_bookmark(tap, client, name, kind, last);
    let thawed_by_us = frozen.thaw(false);
    drop(guard);
    drop(done);
    let _ = timer.join();
    let frozen_ms = started.elapsed().as_millis() as u64;
    let seq = taken?;
    let m = mountpoint.display();
    match thawed_by_us {
        Ok(true) => {}
        Ok(false) => bail!(
            "bookmark {name:?} (seq {seq}) was taken after the freeze timeout ({timeout:?}) \
             had thawed {m}: it is only crash-consistent"
        ),
        Err(e) => {
            bail!("bookmark {name:?} (seq {seq}) taken, but thawing {m} failed: {e:#}")
        }
    }
    Ok((seq, frozen_ms))
}

fn hold_json(h: &tidemark_tap::HoldStatus) -> Value {
    json!({
        "token": h.active.map(|a| a.0),
        "left_ms": h.active.map(|a| a.1.as_millis() as u64),
        "waiting": h.waiting,
        "granted": h.granted,
        "expired": h.expired,
        "waited": h.waited,
    })
}

/// `FIFREEZE` and `FITHAW` (`<linux/fs.h>`: `_IOWR('X', 119, int)`, `_IOWR('X', 120, int)`).
const FIFREEZE: nix::sys::ioctl::ioctl_num_type =
    nix::request_code_readwrite!(b'X', 119, std::mem::size_of::<nix::libc::c_int>())
        as nix::sys::ioctl::ioctl_num_type;
const FITHAW: nix::sys::ioctl::ioctl_num_type =
    nix::request_code_readwrite!(b'X', 120, std::mem::size_of::<nix::libc::c_int>())
        as nix::sys::ioctl::ioctl_num_type;

/// A filesystem this process froze; thawed exactly once, by whoever comes first.
struct Frozen {
    mountpoint: PathBuf,
    /// The open mountpoint while frozen; `None` once thawed.
    dir: Mutex<Option<File>>,
}

impl Frozen {
    fn freeze(mountpoint: &Path) -> anyhow::Result<Arc<Frozen>> {
        // FIFREEZE freezes the filesystem holding whatever file it is given: a directory
        // that is not a mount's root would freeze the filesystem above it (`/`, say).
        if !is_mount_root(mountpoint)? {
            bail!(
                "FIFREEZE {}: not the root of a mounted filesystem (no mount there now); \
                 freezing it would freeze the filesystem that holds it",
                mountpoint.display()
            );
        }
        let dir = File::open(mountpoint)
            .with_context(|| format!("open the mountpoint {}", mountpoint.display()))?;
        // SAFETY: FIFREEZE takes an int argument by value (ignored) on a valid open fd; no
        // memory is passed to the kernel.
        let r = unsafe { nix::libc::ioctl(dir.as_raw_fd(), FIFREEZE as _, 0) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            let hint = match e.raw_os_error() {
                Some(nix::libc::EBUSY) => " (it is already frozen)",
                Some(nix::libc::EOPNOTSUPP) => " (this filesystem cannot be frozen)",
                Some(nix::libc::ENOTTY) | Some(nix::libc::EINVAL) => {
                    " (is it the root of a mounted filesystem?)"
                }
                _ => "",
            };
            return Err(e).with_context(|| format!("FIFREEZE {}{hint}", mountpoint.display()));
        }
        tracing::info!(mountpoint = %mountpoint.display(), "filesystem frozen for a bookmark");
        Ok(Arc::new(Frozen { mountpoint: mountpoint.to_path_buf(), dir: Mutex::new(Some(dir)) }))
    }

    /// Thaws if still frozen. `Ok(true)`: this call thawed it; `Ok(false)`: it already was
    /// (by the timer, or an earlier call).
    fn thaw(&self, timer: bool) -> std::io::Result<bool> {
        let Some(dir) = self.dir.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return Ok(false);
        };
        if timer {
            eprintln!(
                "freeze timeout: thawing {} before the bookmark was taken",
                self.mountpoint.display()
            );
        }
        // SAFETY: as for FIFREEZE: an int by value on a valid open fd.
        let r = unsafe { nix::libc::ioctl(dir.as_raw_fd(), FITHAW as _, 0) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            tracing::warn!(mountpoint = %self.mountpoint.display(), error = %e, "FITHAW");
            return Err(e);
        }
        tracing::info!(mountpoint = %self.mountpoint.display(), timer, "filesystem thawed");
        Ok(true)
    }
}

/// Whether `path` is where a filesystem is mounted (a mount point of this process's mount
/// namespace, `/proc/self/mountinfo` field 5, octal escapes undone).
fn is_mount_root(path: &Path) -> anyhow::Result<bool> {
    let path = std::fs::canonicalize(path)
        .with_context(|| format!("the mountpoint {}", path.display()))?;
    let info =
        std::fs::read_to_string("/proc/self/mountinfo").context("read /proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| Path::new(&unescape_mount(m)) == path))
}

/// `\040` (space), `\011` (tab), `\012` (newline), `\134` (backslash) as mountinfo writes them.
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        let value = octal.map(|d| d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0')));
        match (b[i], value) {
            (b'\\', Some(v)) if v <= 0xff => {
                out.push(v as u8);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Thaws on every way out of a bookmark request, a panic included.
struct ThawOnDrop(Arc<Frozen>);

impl Drop for ThawOnDrop {
    fn drop(&mut self) {
        let _ = self.0.thaw(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_mounts_root_is_frozen() {
        assert_eq!(unescape_mount(r"/mnt/my\040disk\134x"), "/mnt/my disk\\x");
        assert_eq!(unescape_mount(r"/a\9\777b"), r"/a\9\777b", "not an escape: kept");
        assert!(is_mount_root(Path::new("/")).unwrap());
        assert!(is_mount_root(Path::new("/proc")).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::create_dir(&plain).unwrap();
        assert!(!is_mount_root(&plain).unwrap(), "a plain directory is no mount");
        let e = Frozen::freeze(&plain).err().expect("refused").to_string();
        assert!(e.contains("not the root of a mounted filesystem"), "{e}");
    }

    #[test]
    fn durations_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert!(parse_duration("0m").is_err());
        assert!(parse_duration("1.5s").is_err(), "names are to the second");
        assert!(parse_duration("5w").is_err());
        assert!(parse_duration("m").is_err());
    }

    #[test]
    fn periodic_names_are_valid_bookmarks_with_second_precision() {
        let t = Nanos(1_796_161_500 * Nanos::SECOND + 123_000_000);
        let name = periodic_name("auto", t);
        assert_eq!(name, "auto-2026-12-01T21:45:00Z");
        check_name(&name).unwrap();
    }

    #[test]
    fn bad_names_are_refused_with_the_reason() {
        for (name, reason) in
            [("", "empty"), (&"x".repeat(256), "255"), ("a\nb", "control"), ("   ", "whitespace")]
        {
            let e = format!("{:#}", check_name(name).unwrap_err());
            assert!(e.contains(reason), "{name:?}: {e}");
        }
        check_name(&"x".repeat(255)).unwrap();
    }
}
