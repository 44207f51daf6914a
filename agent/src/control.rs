//! The control socket of `tidemark receive` (`DIR/control.sock` by default): a Unix stream
//! socket speaking line-delimited JSON, version 1 (spec: `docs/control-protocol.md`).
//! `tidemark points` and `tidemark recover` are its clients.
//!
//! Invariants:
//! - A vsnap exposed over a connection lives until it is removed or that connection closes
//!   (the client died or was stopped): no vsnap outlives every client that wanted it.
//! - The server never blocks replication for longer than one retention-log call: it takes the
//!   receiver's log lock only inside a request, for a listing or a point resolution.
//! - Only the socket's owner can connect (mode 0600): a vsnap shows the volume's contents.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tidemark_sync::apply::Receiver;

use crate::points;
use crate::vsnaps::{Mode, Registry};

/// The protocol version this build speaks.
pub const VERSION: u64 = 1;

/// The longest request line accepted, in bytes.
const MAX_LINE: usize = 64 << 10;

/// How long a client waits for an answer.
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// `DIR/control.sock`.
pub fn default_socket(dir: &Path) -> PathBuf {
    dir.join("control.sock")
}

/// A connection to a receiver's control socket.
#[derive(Debug)]
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Connects to the socket at `path`; `None` when no receiver listens there (no socket,
    /// or a stale one left by a receiver that died).
    pub fn connect(path: &Path) -> anyhow::Result<Option<Client>> {
        match UnixStream::connect(path) {
            Ok(stream) => {
                // A receiver that accepts but never answers must not hang the client
                // forever (an expose mounts FUSE and attaches a loop device: seconds).
                stream
                    .set_read_timeout(Some(ANSWER_TIMEOUT))
                    .context("set the control socket timeout")?;
                let reader = BufReader::new(
                    stream.try_clone().context("clone the control socket connection")?,
                );
                let mut client = Client { reader, writer: stream };
                let hello = client.request(json!({"op": "hello"}))?;
                tracing::debug!(%hello, "control socket");
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

    /// Sends one request (its `v` is set here) and returns the answer; an answer with
    /// `"ok": false` becomes an error carrying the receiver's message.
    pub fn request(&mut self, mut req: Value) -> anyhow::Result<Value> {
        req["v"] = json!(VERSION);
        let op = req["op"].as_str().unwrap_or("?").to_owned();
        let mut line = serde_json::to_string(&req)?;
        line.push('\n');
        self.writer.write_all(line.as_bytes()).with_context(|| format!("send {op} request"))?;
        let mut answer = String::new();
        let n = self.reader.read_line(&mut answer).with_context(|| format!("read {op} answer"))?;
        if n == 0 {
            bail!("the receiver closed the control connection before answering {op}");
        }
        let v: Value = serde_json::from_str(&answer)
            .with_context(|| format!("the {op} answer is not JSON: {answer:?}"))?;
        if v["ok"] != json!(true) {
            bail!("{}", v["error"].as_str().unwrap_or("the receiver refused the request"));
        }
        Ok(v)
    }

    /// Whether the receiver closed the connection (it stopped or died): then the vsnaps
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

/// The control socket server of a running receiver.
#[derive(Debug)]
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    receiver: Receiver,
    registry: Mutex<Registry>,
    /// Live connections (to end them at shutdown) and their threads.
    conns: Mutex<Vec<(UnixStream, JoinHandle<()>)>>,
}

impl Shared {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        // Registry updates are complete before a call that can panic.
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Server {
    /// Binds `path` (a stale socket of a dead receiver is replaced; a live one is refused)
    /// and serves requests on `receiver`'s log, with vsnaps under `vsnap_root`.
    pub fn start(path: &Path, receiver: Receiver, vsnap_root: &Path) -> anyhow::Result<Server> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                bail!(
                    "control socket {} is live: another receiver serves this directory",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("remove stale control socket {}", path.display()))?;
        }
        let listener =
            UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod 0600 {}", path.display()))?;
        let registry = Registry::new(Arc::new(receiver.clone()), vsnap_root, "");
        let shared = Arc::new(Shared {
            receiver,
            registry: Mutex::new(registry),
            conns: Mutex::new(Vec::new()),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let (shared, stop) = (shared.clone(), stop.clone());
            std::thread::Builder::new()
                .name("control-accept".into())
                .spawn(move || accept_loop(listener, shared, stop))
                .context("spawn the control socket thread")?
        };
        Ok(Server { path: path.to_path_buf(), stop, accept: Some(accept), shared })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, ends every connection, removes every vsnap and the socket file.
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
        for (stream, thread) in conns {
            let _ = stream.shutdown(std::net::Shutdown::Both);
            let _ = thread.join();
        }
        self.shared.registry().remove_all();
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(listener: UnixListener, shared: Arc<Shared>, stop: Arc<AtomicBool>) {
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
            .spawn(move || serve(stream, &s))
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

/// Serves one connection until it closes; then removes the vsnaps it exposed.
fn serve(stream: UnixStream, shared: &Shared) {
    let mut owned: Vec<u64> = Vec::new();
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
                Ok(req) => handle(&req, shared, &mut owned),
                Err(e) => error(format!("request is not JSON: {e}")),
            }
        };
        let mut out = answer.to_string();
        out.push('\n');
        if writer.write_all(out.as_bytes()).is_err() || line.len() > MAX_LINE {
            break;
        }
    }
    let mut registry = shared.registry();
    for id in owned {
        match registry.remove(id) {
            Ok(blocks) => {
                tracing::info!(id, overlay_blocks = blocks, "vsnap removed: its client went away")
            }
            Err(e) => {
                tracing::warn!(id, error = %format!("{e:#}"), "vsnap removal after disconnect")
            }
        }
    }
}

fn error(message: String) -> Value {
    json!({"v": VERSION, "ok": false, "error": message})
}

fn ok(mut v: Value) -> Value {
    v["v"] = json!(VERSION);
    v["ok"] = json!(true);
    v
}

fn handle(req: &Value, shared: &Shared, owned: &mut Vec<u64>) -> Value {
    match req["v"].as_u64() {
        Some(VERSION) => {}
        other => {
            let mut e = error(format!(
                "protocol version {} is not supported; this receiver speaks version {VERSION}",
                other.map_or("(missing)".to_owned(), |v| v.to_string())
            ));
            e["versions"] = json!([VERSION]);
            return e;
        }
    }
    let op = req["op"].as_str().unwrap_or("");
    let result = match op {
        "hello" => Ok(json!({"role": "receive", "versions": [VERSION], "pid": std::process::id()})),
        "status" => {
            let s = shared.receiver.status();
            Ok(json!({
                "connected": s.connected,
                "received": s.received.0,
                "durable": s.durable.0,
                "acked": s.acked.0,
                "held": shared.receiver.with_log(|l| l.held().iter().map(|s| s.0).collect::<Vec<_>>()),
                "vsnaps": shared.registry().list(),
            }))
        }
        "points" => Ok(shared.receiver.with_log(|l| points::points_doc(l))),
        "vsnaps" => Ok(json!({"vsnaps": shared.registry().list()})),
        "expose" => expose(req, shared, owned),
        "remove" => match req["id"].as_u64() {
            Some(id) => shared.registry().remove(id).map(|blocks| {
                owned.retain(|o| *o != id);
                json!({"removed": id, "overlay_blocks": blocks})
            }),
            None => Err(anyhow::anyhow!("remove needs a numeric \"id\"")),
        },
        other => Err(anyhow::anyhow!(
            "unknown op {other:?}; expected hello, status, points, vsnaps, expose or remove"
        )),
    };
    match result {
        Ok(v) => ok(v),
        Err(e) => error(format!("{e:#}")),
    }
}

fn expose(req: &Value, shared: &Shared, owned: &mut Vec<u64>) -> anyhow::Result<Value> {
    let spec = req["point"]
        .as_str()
        .context("expose needs a \"point\" (latest, seq:N, time:T, bookmark:NAME)")?;
    let point = points::parse_point(spec)?;
    let mode = Mode::parse(req["mode"].as_str().unwrap_or("ro"))?;
    let info = shared.registry().expose(&point, mode)?;
    owned.push(info.id);
    Ok(json!({
        "id": info.id,
        "device": info.device.display().to_string(),
        "mode": mode.as_str(),
        "len": info.len,
        "point": points::point_json(&info.point),
    }))
}
