//! The Prometheus endpoint of `protect --metrics ADDR` and `receive --metrics ADDR`: the
//! figures of `status.json` in the Prometheus text exposition format (version 0.0.4),
//! every series labelled with its `pair`. The names are in `docs/metrics.md`.
//!
//! The responder is a small HTTP/1.1 server on one thread over a std `TcpListener`: a
//! scrape is one short `GET /metrics` at a time, so a whole HTTP crate would be more code
//! to trust than the forty lines it replaces. Each response closes its connection.
//!
//! Invariant: a scrape never waits on the replication path: it reads the last published
//! text (the driver publishes once a second, when it writes `status.json`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

use crate::status::PairFigures;

/// One metric family: its name, help text, type and samples (labels, value).
pub struct Family {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    samples: Vec<(Vec<(&'static str, String)>, f64)>,
}

impl Family {
    fn gauge(name: &'static str, help: &'static str) -> Self {
        Self { name, help, kind: "gauge", samples: Vec::new() }
    }

    fn counter(name: &'static str, help: &'static str) -> Self {
        Self { name, help, kind: "counter", samples: Vec::new() }
    }

    fn with(mut self, labels: Vec<(&'static str, String)>, value: f64) -> Self {
        self.samples.push((labels, value));
        self
    }
}

/// The exposition text of `families`.
pub fn render(families: &[Family]) -> String {
    let mut out = String::new();
    for f in families.iter().filter(|f| !f.samples.is_empty()) {
        out.push_str(&format!("# HELP {} {}\n# TYPE {} {}\n", f.name, f.help, f.name, f.kind));
        for (labels, value) in &f.samples {
            let labels: Vec<String> =
                labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
            out.push_str(&format!("{}{{{}}} {}\n", f.name, labels.join(","), number(*value)));
        }
    }
    out
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else {
        format!("{v}")
    }
}

/// The stages a source pair can be in (`tidemark_stage` has one series per stage, 1 for
/// the current one).
const STAGES: [&str; 6] =
    ["resync I", "resync II", "diff sync", "paused", "inconsistent", "stopped"];

/// The families of a source pair.
pub fn source(f: &PairFigures) -> Vec<Family> {
    let p = || vec![("pair", f.pair.clone())];
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    let mut stage =
        Family::gauge("tidemark_stage", "1 for the stage the pair is in, 0 for the others");
    for s in STAGES {
        stage =
            stage.with(vec![("pair", f.pair.clone()), ("stage", s.to_owned())], flag(f.stage == s));
    }
    let mut v = vec![
        Family::gauge(
            "tidemark_rpo_seconds",
            "Age of the oldest captured event the target has not acknowledged (0 when caught up)",
        )
        .with(p(), f.rpo_s),
        Family::gauge("tidemark_rpo_alarm", "1 while the RPO is above the pair's threshold")
            .with(p(), flag(f.alarm.active)),
        Family::counter(
            "tidemark_rpo_alarms_total",
            "Times the RPO alarm was raised since the agent started",
        )
        .with(p(), f.alarm.raised as f64),
        Family::gauge(
            "tidemark_backlog_bytes",
            "Bytes of events in the spool the target has not acknowledged",
        )
        .with(p(), f.backlog_bytes as f64),
        Family::gauge(
            "tidemark_backlog_events",
            "Events in the spool the target has not acknowledged",
        )
        .with(p(), f.backlog_events as f64),
        Family::gauge(
            "tidemark_throughput_bytes_per_second",
            "Frame bytes shipped per second over the last interval",
        )
        .with(p(), f.throughput_bps),
        Family::counter(
            "tidemark_shipped_wire_bytes_total",
            "Frame bytes shipped since the agent started",
        )
        .with(p(), f.wire_bytes as f64),
        Family::counter(
            "tidemark_shipped_raw_bytes_total",
            "Uncompressed batch bytes shipped since the agent started",
        )
        .with(p(), f.raw_bytes as f64),
        Family::gauge(
            "tidemark_compression_ratio",
            "Uncompressed over shipped bytes since the agent started",
        )
        .with(p(), f.compression_ratio),
        Family::gauge(
            "tidemark_intent_dirty_regions",
            "Regions of the write-intent map dirty (what a crash now would resync)",
        )
        .with(p(), f.intent_dirty_regions as f64),
        Family::gauge(
            "tidemark_out_of_sync_regions",
            "Regions tracked outside the spool, waiting for a resync",
        )
        .with(p(), f.out_of_sync_regions as f64),
        Family::gauge("tidemark_link_up", "1 while a session with the target is shipping")
            .with(p(), flag(f.link_up)),
        stage,
    ];
    if let Some(t) = f.alarm.threshold_s {
        v.push(
            Family::gauge("tidemark_rpo_alarm_threshold_seconds", "The pair's RPO threshold")
                .with(p(), t),
        );
    }
    if let Some((seq, _, _)) = &f.last_bookmark {
        v.push(
            Family::gauge(
                "tidemark_last_bookmark_seq",
                "Sequence number of the last bookmark spooled",
            )
            .with(p(), *seq as f64),
        );
    }
    v
}

/// The families of a target, from its `status.json` document (the fields it holds; those
/// missing give no series).
pub fn receiver(pair: &str, doc: &Value) -> Vec<Family> {
    let p = || vec![("pair", pair.to_owned())];
    let mut v = Vec::new();
    let mut put = |f: Family, ptr: &str| {
        let value = doc
            .pointer(ptr)
            .and_then(|x| x.as_f64().or_else(|| x.as_bool().map(|b| if b { 1.0 } else { 0.0 })));
        if let Some(x) = value {
            v.push(f.with(p(), x));
        }
    };
    put(
        Family::gauge("tidemark_receiver_received_seq", "Highest sequence number received"),
        "/received",
    );
    put(
        Family::gauge(
            "tidemark_receiver_durable_seq",
            "Highest sequence number durable in the retention log",
        ),
        "/durable",
    );
    put(
        Family::gauge(
            "tidemark_receiver_acked_seq",
            "Highest sequence number acknowledged to the source",
        ),
        "/acked",
    );
    put(
        Family::gauge("tidemark_receiver_connected", "1 while the source is connected"),
        "/connected",
    );
    put(
        Family::counter("tidemark_receiver_data_bytes_total", "Data bytes received"),
        "/data_bytes",
    );
    put(
        Family::gauge("tidemark_replica_consistent", "1 while the replica is crash-consistent"),
        "/replica/consistent",
    );
    put(
        Family::gauge(
            "tidemark_retention_window_seconds",
            "Time span of history really recoverable",
        ),
        "/retention/window_available_s",
    );
    put(
        Family::gauge(
            "tidemark_retention_window_configured_seconds",
            "Time span the retention policy asks for",
        ),
        "/retention/window_configured_s",
    );
    put(Family::gauge("tidemark_retention_points", "Recovery points offered"), "/retention/points");
    put(
        Family::gauge("tidemark_journal_bytes", "Bytes of the retention journal on disk"),
        "/retention/journal_bytes",
    );
    v
}

/// A running endpoint. Dropping it stops the thread.
pub struct Server {
    addr: SocketAddr,
    text: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Listens on `addr` (port 0: any free port; see [`Server::addr`]).
    pub fn start(addr: &str) -> anyhow::Result<Self> {
        let listener =
            TcpListener::bind(addr).with_context(|| format!("metrics: listen on {addr}"))?;
        let addr = listener.local_addr().context("metrics: local address")?;
        listener.set_nonblocking(true).context("metrics: non-blocking listener")?;
        let text = Arc::new(Mutex::new(String::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s) = (text.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("tidemark-metrics".into())
            .spawn(move || serve(&listener, &t, &s))
            .context("start the metrics thread")?;
        Ok(Self { addr, text, stop, thread: Some(thread) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces what the next scrapes read.
    pub fn publish(&self, families: &[Family]) {
        *self.text.lock().unwrap_or_else(|e| e.into_inner()) = render(families);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(listener: &TcpListener, text: &Mutex<String>, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = answer(stream, text) {
                    tracing::debug!(error = %e, "metrics: a request failed");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics: accept failed");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// Reads one request head (at most 16 KiB, 5 s) and answers it.
fn answer(mut stream: TcpStream, text: &Mutex<String>) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 << 10 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    let mut parts = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let path = target.split('?').next().unwrap_or_default();
    let (status, ctype, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            text.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        ),
        ("GET" | "HEAD", "/") => {
            ("200 OK", "text/plain; charset=utf-8", "tidemark: metrics at /metrics\n".into())
        }
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            format!("no {path} here: try /metrics\n"),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            format!("method {method:?}: only GET\n"),
        ),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        out.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&out)?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_has_help_type_and_escaped_labels() {
        let f = Family::gauge("tidemark_x", "An x").with(vec![("pair", "a\"b".into())], 1.5);
        let t = render(&[f, Family::counter("tidemark_empty", "none")]);
        assert_eq!(
            t,
            "# HELP tidemark_x An x\n# TYPE tidemark_x gauge\ntidemark_x{pair=\"a\\\"b\"} 1.5\n"
        );
    }

    #[test]
    fn the_endpoint_answers_get_metrics_and_refuses_others() {
        let server = Server::start("127.0.0.1:0").unwrap();
        server.publish(&[Family::gauge("tidemark_y", "A y").with(vec![("pair", "p".into())], 2.0)]);
        let ask = |req: &str| {
            let mut s = TcpStream::connect(server.addr()).unwrap();
            s.write_all(req.as_bytes()).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        };
        let ok = ask("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.ends_with("tidemark_y{pair=\"p\"} 2\n"), "{ok}");
        assert!(ask("GET /nope HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(ask("POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
    }
}
