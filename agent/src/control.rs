//! The local control sockets of the long-running commands: a Unix stream socket speaking
//! line-delimited JSON, version 1 (spec: `docs/control-protocol.md`). This module is the
//! transport both share ([`Listener`] over a [`Service`], and the [`Client`]) and the
//! receiver's service (`tidemark receive`, `DIR/control.sock`), whose clients are
//! `tidemark points` and `tidemark recover`. The source's service (`tidemark protect`) is
//! in `source_control.rs`.
//!
//! Invariants:
//! - A vsnap exposed over a connection lives until it is removed or that connection closes
//!   (the client died or was stopped): no vsnap outlives every client that wanted it.
//! - The receiver's service never blocks replication for longer than one retention-log
//!   call: it takes the receiver's log lock only inside a request, for a listing or a point
//!   resolution.
//! - Only the socket's owner can connect (mode 0600): a vsnap shows the volume's contents,
//!   and the source's socket can freeze a filesystem.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tidemark_sync::apply::Receiver;

use crate::points;
use crate::vsnaps::{Frontend, Mode, Registry};

/// The protocol version this build speaks.
pub const VERSION: u64 = 1;

/// The longest request line accepted, in bytes.
const MAX_LINE: usize = 64 << 10;

/// How long a client waits for an answer line (or a progress line of a long op).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a stopping server waits for a connection's thread (busy with a long op) to end
/// before leaving it behind.
const CONN_JOIN: Duration = Duration::from_secs(10);

/// `DIR/control.sock`.
pub fn default_socket(dir: &Path) -> PathBuf {
    dir.join("control.sock")
}

/// What a control socket serves: the ops beyond `hello` (which the transport answers).
pub trait Service: Send + Sync + 'static {
    /// What one connection owns (the receiver: the vsnaps it exposed), handed to
    /// [`Service::disconnected`] when it closes.
    type Conn: Default + Send;

    /// The `role` that `hello` answers (`receive`, `protect`).
    fn role(&self) -> &'static str;

    /// The ops it serves, for the message answering an unknown one.
    fn ops(&self) -> &'static str;

    /// Answers `op`; `None` when the op is unknown. A long op may send progress lines
    /// through `progress` before its answer.
    fn handle(
        &self,
        op: &str,
        req: &Value,
        conn: &mut Self::Conn,
        progress: &mut Progress<'_>,
    ) -> Option<anyhow::Result<Value>>;

    /// The connection that owned `conn` closed.
    fn disconnected(&self, conn: Self::Conn) {
        let _ = conn;
    }

    /// The server stops (every connection has ended).
    fn shutdown(&self) {}
}

/// Where a long op writes its progress lines (`{"v": 1, "progress": {...}}`).
pub struct Progress<'a> {
    writer: &'a mut UnixStream,
}

impl Progress<'_> {
    /// Sends one progress line; false when the client is gone (the op may stop early).
    pub fn send(&mut self, progress: Value) -> bool {
        let mut line = json!({"v": VERSION, "progress": progress}).to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).is_ok()
    }
}

/// A connection to a control socket (of `receive` or `protect`).
#[derive(Debug)]
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    role: String,
}

impl Client {
    /// Connects to the socket at `path`; `None` when nothing listens there (no socket, or
    /// a stale one left by a process that died).
    pub fn connect(path: &Path) -> anyhow::Result<Option<Client>> {
        match UnixStream::connect(path) {
            Ok(stream) => {
                // A server that accepts but never answers must not hang the client
                // forever (an expose mounts FUSE and attaches a loop device: seconds; a
                // verify sends a progress line every second).
                stream
                    .set_read_timeout(Some(ANSWER_TIMEOUT))
                    .context("set the control socket timeout")?;
                let reader = BufReader::new(
                    stream.try_clone().context("clone the control socket connection")?,
                );
                let mut client = Client { reader, writer: stream, role: "agent".to_owned() };
                let hello = client.request(json!({"op": "hello"}))?;
                tracing::debug!(%hello, "control socket");
                client.role = hello["role"].as_str().unwrap_or("agent").to_owned();
                Ok(Some(client))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e).with_context(|| format!("connect to {}", path.display())),
        }
    }

    /// The `role` the server gave in `hello`.
    pub fn role(&self) -> &str {
        &self.role
    }

    /// Sends one request (its `v` is set here) and returns the answer; an answer with
    /// `"ok": false` becomes an error carrying the server's message.
    pub fn request(&mut self, req: Value) -> anyhow::Result<Value> {
        self.request_with_progress(req, |_| {})
    }

    /// As [`Client::request`], handing each progress line of a long op to `progress`.
    pub fn request_with_progress(
        &mut self,
        mut req: Value,
        mut progress: impl FnMut(&Value),
    ) -> anyhow::Result<Value> {
        req["v"] = json!(VERSION);
        let op = req["op"].as_str().unwrap_or("?").to_owned();
        let mut line = serde_json::to_string(&req)?;
        line.push('\n');
        self.writer.write_all(line.as_bytes()).with_context(|| format!("send {op} request"))?;
        loop {
            let mut answer = String::new();
            let n =
                self.reader.read_line(&mut answer).with_context(|| format!("read {op} answer"))?;
            if n == 0 {
                bail!("the {} closed the control connection before answering {op}", self.role);
            }
            let v: Value = serde_json::from_str(&answer)
                .with_context(|| format!("the {op} answer is not JSON: {answer:?}"))?;
            if v.get("ok").is_none() && v.get("progress").is_some() {
                progress(&v["progress"]);
                continue;
            }
            if v["ok"] != json!(true) {
                bail!(
                    "{}",
                    v["error"]
                        .as_str()
                        .unwrap_or(&format!("the {} refused the request", self.role))
                );
            }
            return Ok(v);
        }
    }

    /// Whether the server closed the connection (it stopped or died): then the vsnaps
    /// this client exposed are gone.
    pub fn closed(&mut self) -> bool {
        if !self.reader.buffer().is_empty() || self.reader.get_ref().set_nonblocking(true).is_err()
        {
            return false;
        }
        // Nothing is consumed: bytes read stay in the buffer for the next answer.
        let closed = matches!(self.reader.fill_buf(), Ok(b) if b.is_empty());
        let _ = self.reader.get_ref().set_nonblocking(false);
        closed
    }
}

/// A control socket serving `S`: binds, accepts, and runs one thread per connection.
pub struct Listener<S: Service> {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    shared: Arc<Shared<S>>,
}

impl<S: Service> std::fmt::Debug for Listener<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener").field("path", &self.path).finish_non_exhaustive()
    }
}

struct Shared<S> {
    service: S,
    /// Live connections (to end them at shutdown) and their threads.
    conns: Mutex<Vec<(UnixStream, JoinHandle<()>)>>,
}

impl<S: Service> Listener<S> {
    /// Binds `path` (a stale socket of a dead process is replaced; a live one is refused)
    /// and serves `service` on it.
    pub fn start(path: &Path, service: S) -> anyhow::Result<Listener<S>> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                bail!(
                    "control socket {} is live: another {} serves this directory",
                    path.display(),
                    service.role()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("remove stale control socket {}", path.display()))?;
        }
        let listener =
            UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod 0600 {}", path.display()))?;
        let shared = Arc::new(Shared { service, conns: Mutex::new(Vec::new()) });
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let (shared, stop) = (shared.clone(), stop.clone());
            std::thread::Builder::new()
                .name("control-accept".into())
                .spawn(move || accept_loop(listener, shared, stop))
                .context("spawn the control socket thread")?
        };
        Ok(Listener { path: path.to_path_buf(), stop, accept: Some(accept), shared })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, ends every connection, stops the service, removes the socket file.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(accept) = self.accept.take() else { return };
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept call; if the socket file is gone nothing can, so the thread is
        // left behind (it ends with the process) rather than joined forever.
        match UnixStream::connect(&self.path) {
            Ok(_) => {
                let _ = accept.join();
            }
            Err(e) => tracing::warn!(
                socket = %self.path.display(),
                error = %e,
                "control socket: cannot wake the accept thread; leaving it"
            ),
        }
        let conns =
            std::mem::take(&mut *self.shared.conns.lock().unwrap_or_else(|e| e.into_inner()));
        let until = Instant::now() + CONN_JOIN;
        for (stream, thread) in conns {
            let _ = stream.shutdown(std::net::Shutdown::Both);
            // A connection busy with a long op (a verify hashing the volume) notices at its
            // next progress line; one that does not end in time is left behind.
            while !thread.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                tracing::warn!(
                    "control socket: a connection is still busy at shutdown; leaving it"
                );
            }
        }
        self.shared.service.shutdown();
        let _ = std::fs::remove_file(&self.path);
    }
}

impl<S: Service> Drop for Listener<S> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop<S: Service>(listener: UnixListener, shared: Arc<Shared<S>>, stop: Arc<AtomicBool>) {
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "control socket: accept failed");
                continue;
            }
        };
        let Ok(keep) = stream.try_clone() else { continue };
        let s = shared.clone();
        match std::thread::Builder::new()
            .name("control-conn".into())
            .spawn(move || serve(stream, &s.service))
        {
            Ok(thread) => {
                let mut conns = shared.conns.lock().unwrap_or_else(|e| e.into_inner());
                conns.retain(|(_, t)| !t.is_finished());
                conns.push((keep, thread));
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket: cannot spawn a connection thread")
            }
        }
    }
}

/// Serves one connection until it closes; then hands what it owned back to the service.
fn serve<S: Service>(stream: UnixStream, service: &S) {
    let mut conn = S::Conn::default();
    let Ok(mut writer) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        match (&mut reader).take(MAX_LINE as u64 + 1).read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let answer = if line.len() > MAX_LINE {
            error(format!("request longer than {MAX_LINE} bytes"))
        } else {
            match serde_json::from_str::<Value>(&line) {
                Ok(req) => handle(&req, service, &mut conn, &mut writer),
                Err(e) => error(format!("request is not JSON: {e}")),
            }
        };
        let mut out = answer.to_string();
        out.push('\n');
        if writer.write_all(out.as_bytes()).is_err() || line.len() > MAX_LINE {
            break;
        }
    }
    service.disconnected(conn);
}

fn error(message: String) -> Value {
    json!({"v": VERSION, "ok": false, "error": message})
}

fn ok(mut v: Value) -> Value {
    v["v"] = json!(VERSION);
    v["ok"] = json!(true);
    v
}

fn handle<S: Service>(
    req: &Value,
    service: &S,
    conn: &mut S::Conn,
    writer: &mut UnixStream,
) -> Value {
    match req["v"].as_u64() {
        Some(VERSION) => {}
        other => {
            let mut e = error(format!(
                "protocol version {} is not supported; this {} speaks version {VERSION}",
                other.map_or("(missing)".to_owned(), |v| v.to_string()),
                service.role()
            ));
            e["versions"] = json!([VERSION]);
            return e;
        }
    }
    let op = req["op"].as_str().unwrap_or("");
    let result = if op == "hello" {
        Ok(json!({"role": service.role(), "versions": [VERSION], "pid": std::process::id()}))
    } else {
        match service.handle(op, req, conn, &mut Progress { writer }) {
            Some(r) => r,
            None => Err(anyhow::anyhow!("unknown op {op:?}; expected hello, {}", service.ops())),
        }
    };
    match result {
        Ok(v) => ok(v),
        Err(e) => error(format!("{e:#}")),
    }
}

/// The control socket server of a running receiver.
#[derive(Debug)]
pub struct Server {
    listener: Listener<ReceiverService>,
}

impl Server {
    /// Binds `path` (a stale socket of a dead receiver is replaced; a live one is refused)
    /// and serves requests on `receiver`'s log, with vsnaps under `vsnap_root`.
    pub fn start(path: &Path, receiver: Receiver, vsnap_root: &Path) -> anyhow::Result<Server> {
        let registry = Registry::new(Arc::new(receiver.clone()), vsnap_root, "");
        let service = ReceiverService { receiver, registry: Mutex::new(registry) };
        Ok(Server { listener: Listener::start(path, service)? })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        self.listener.path()
    }

    /// Stops accepting, ends every connection, removes every vsnap and the socket file.
    pub fn stop(self) {
        self.listener.stop();
    }
}

/// The receiver's ops: points, vsnaps.
struct ReceiverService {
    receiver: Receiver,
    registry: Mutex<Registry>,
}

impl ReceiverService {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        // Registry updates are complete before a call that can panic.
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Service for ReceiverService {
    /// The ids of the vsnaps the connection exposed.
    type Conn = Vec<u64>;

    fn role(&self) -> &'static str {
        "receive"
    }

    fn ops(&self) -> &'static str {
        "status, points, vsnaps, expose or remove"
    }

    fn handle(
        &self,
        op: &str,
        req: &Value,
        owned: &mut Vec<u64>,
        _: &mut Progress<'_>,
    ) -> Option<anyhow::Result<Value>> {
        Some(match op {
            "status" => {
                let s = self.receiver.status();
                Ok(json!({
                    "connected": s.connected,
                    "received": s.received.0,
                    "durable": s.durable.0,
                    "acked": s.acked.0,
                    "held": self.receiver.with_log(|l| l.held().iter().map(|s| s.0).collect::<Vec<_>>()),
                    "vsnaps": self.registry().list(),
                }))
            }
            "points" => Ok(self.receiver.with_log(|l| points::points_doc(l))),
            "vsnaps" => Ok(json!({"vsnaps": self.registry().list()})),
            "expose" => expose(req, self, owned),
            "remove" => match req["id"].as_u64() {
                Some(id) => self.registry().remove(id).map(|blocks| {
                    owned.retain(|o| *o != id);
                    json!({"removed": id, "overlay_blocks": blocks})
                }),
                None => Err(anyhow::anyhow!("remove needs a numeric \"id\"")),
            },
            _ => return None,
        })
    }

    fn disconnected(&self, owned: Vec<u64>) {
        let mut registry = self.registry();
        for id in owned {
            match registry.remove(id) {
                Ok(blocks) => {
                    tracing::info!(
                        id,
                        overlay_blocks = blocks,
                        "vsnap removed: its client went away"
                    )
                }
                Err(e) => {
                    tracing::warn!(id, error = %format!("{e:#}"), "vsnap removal after disconnect")
                }
            }
        }
    }

    fn shutdown(&self) {
        self.registry().remove_all();
    }
}

fn expose(req: &Value, shared: &ReceiverService, owned: &mut Vec<u64>) -> anyhow::Result<Value> {
    let spec = req["point"]
        .as_str()
        .context("expose needs a \"point\" (latest, seq:N, time:T, bookmark:NAME)")?;
    let point = points::parse_point(spec)?;
    let mode = Mode::parse(req["mode"].as_str().unwrap_or("ro"))?;
    let frontend = Frontend::parse(req["frontend"].as_str().unwrap_or("auto"))?;
    let info = shared.registry().expose_on(&point, mode, frontend)?;
    owned.push(info.id);
    Ok(json!({
        "id": info.id,
        "device": info.device.display().to_string(),
        "frontend": info.frontend.as_str(),
        "mode": mode.as_str(),
        "len": info.len,
        "point": points::point_json(&info.point),
    }))
}
