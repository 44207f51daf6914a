//! Operations: the RPO alarm of `protect --rpo-alarm` and the Prometheus endpoints of
//! `protect --metrics` / `receive --metrics`, scraped by a real Prometheus server
//! (Debian's `prometheus`, which `cargo xtask ci` installs) and queried through its HTTP
//! API. Without the `prometheus` binary the test prints a SKIP line and returns. It needs
//! no root: `protect --frontend none` runs the initial sync only.
//!
//! The scenario: `protect` starts against a target that is not there yet, so the fresh
//! protection's first events wait in the spool and the RPO grows past a 1 s threshold (the
//! alarm is raised); then `receive` starts on that address, the pair syncs and catches
//! up, and the alarm clears. Both states are seen in status.json and in Prometheus.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::*;

const PAIR: &str = "0be5e55ed0123456789abcdef0123456";
const VOLUME: u64 = 16 << 20;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A plain HTTP GET on loopback; returns the body of a 200 answer, `None` otherwise.
fn http_get(addr: &str, target: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return Some(dechunk(body));
    }
    Some(body.to_owned())
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Queries Prometheus until `query` returns a series with the pair's label whose value
/// satisfies `pred`; returns the value.
fn wait_series(prom: &str, query: &str, what: &str, pred: impl Fn(f64) -> bool) -> f64 {
    let until = Instant::now() + Duration::from_secs(120);
    let mut last = String::new();
    loop {
        let target = format!("/api/v1/query?query={query}");
        if let Some(body) = http_get(prom, &target) {
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            let found = v.pointer("/data/result").and_then(Value::as_array).and_then(|r| {
                r.iter().find(|s| s.pointer("/metric/pair") == Some(&Value::from(PAIR))).cloned()
            });
            if let Some(series) = found {
                let value = series
                    .pointer("/value/1")
                    .and_then(Value::as_str)
                    .and_then(|x| x.parse::<f64>().ok())
                    .unwrap_or(f64::NAN);
                if pred(value) {
                    return value;
                }
            }
            last = body;
        }
        assert!(
            Instant::now() < until,
            "Prometheus never showed {what} ({query}); last answer: {last}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A Prometheus server scraping `targets` every second, with its storage in `dir`.
struct Prometheus {
    child: std::process::Child,
    addr: String,
}

impl Prometheus {
    fn start(bin: &Path, dir: &Path, targets: &[&str]) -> Prometheus {
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: tidemark\n    static_configs:\n      - targets: [{}]\n",
                list.join(", ")
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let p = Prometheus { child, addr };
        let until = Instant::now() + Duration::from_secs(60);
        while http_get(&p.addr, "/-/ready").is_none() {
            assert!(
                Instant::now() < until,
                "prometheus did not get ready; its log: {}",
                std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn prometheus_bin() -> Option<PathBuf> {
    let out = Command::new("sh").args(["-c", "command -v prometheus"]).output().ok()?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !path.is_empty()).then(|| PathBuf::from(path))
}

#[test]
fn rpo_alarm_raised_and_cleared_and_metrics_scraped_by_prometheus() {
    let Some(prom_bin) = prometheus_bin() else {
        let _ = writeln!(
            std::io::stderr(),
            "SKIP rpo_alarm_raised_and_cleared_and_metrics_scraped_by_prometheus: no prometheus \
             binary (Debian package prometheus; cargo xtask ci installs it)"
        );
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let p = |rel: &str| root.join(rel).display().to_string();
    tidemark(&["keygen", "--dir", &p("keys"), "--name", "src"]);
    tidemark(&["keygen", "--dir", &p("keys"), "--name", "dst"]);
    let image = root.join("volume.img");
    let f = std::fs::File::create(&image).unwrap();
    f.set_len(VOLUME).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &pattern(3, 1 << 20), 4 << 20).unwrap();
    drop(f);
    // The target's address, nobody listening yet.
    let target = format!("127.0.0.1:{}", free_port());
    let mut px = Proc::spawn(
        "protect",
        &[
            "protect",
            "--image",
            &p("volume.img"),
            "--state",
            &p("state"),
            "--target",
            &target,
            "--key",
            &p("keys/src.key"),
            "--peer",
            &p("keys/dst.pub"),
            "--pair",
            PAIR,
            "--frontend",
            "none",
            "--rpo-alarm",
            "1",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let px_metrics = px.wait_line("metrics:");
    let state = root.join("state");
    let raised = wait_status(&state, "the RPO alarm raised while the target is away", |v| {
        v.pointer("/pair/rpo_alarm/active") == Some(&Value::Bool(true))
    });
    assert!(
        raised["pair"]["rpo_s"].as_f64().unwrap() > 1.0,
        "alarm below its threshold: {raised:#}"
    );
    assert_eq!(raised["pair"]["stage"], "paused", "{raised:#}");
    assert!(u(&raised, "/pair/backlog_bytes") > 0, "{raised:#}");
    let table = tidemark(&["status", "--state", &p("state")]);
    assert!(table.contains("RAISED (threshold 1 s)"), "status table: {table}");

    // The endpoint itself: HELP/TYPE lines and the pair's series.
    let text = http_get(&px_metrics, "/metrics").expect("protect's /metrics");
    for name in ["tidemark_rpo_seconds", "tidemark_backlog_bytes", "tidemark_rpo_alarm"] {
        assert!(text.contains(&format!("# TYPE {name} gauge")), "{name} not typed in:\n{text}");
        assert!(text.contains(&format!("{name}{{pair=\"{PAIR}\"}}")), "no {name} in:\n{text}");
    }

    std::fs::create_dir_all(root.join("prom")).unwrap();
    let mut rx = Proc::spawn(
        "receive",
        &[
            "receive",
            "--dir",
            &p("rx"),
            "--listen",
            &target,
            "--key",
            &p("keys/dst.key"),
            "--peer",
            &p("keys/src.pub"),
            "--pair",
            PAIR,
            "--size",
            &VOLUME.to_string(),
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let rx_metrics = rx.wait_line("metrics:");
    let prom = Prometheus::start(&prom_bin, &root.join("prom"), &[&px_metrics, &rx_metrics]);
    // Prometheus may first scrape before or after the pair caught up: the alarm series is
    // there either way; its value is checked once status.json says the alarm cleared.
    wait_series(&prom.addr, "tidemark_rpo_alarm", "the alarm series", |x| x == 0.0 || x == 1.0);
    let cleared = wait_status(&state, "the RPO alarm cleared once caught up", |v| {
        v.pointer("/pair/rpo_alarm/active") == Some(&Value::Bool(false))
            && v.pointer("/pair/stage") == Some(&Value::from("diff sync"))
            && u(v, "/pair/backlog_bytes") == 0
    });
    assert_eq!(u(&cleared, "/pair/rpo_alarm/raised"), 1, "raised once: {cleared:#}");
    assert_eq!(cleared["pair"]["rpo_s"].as_f64(), Some(0.0), "caught up: {cleared:#}");
    // Random data: about 1 (framing adds a little); never the 0 or infinity of a bad sum.
    let ratio = cleared["pair"]["compression_ratio"].as_f64().unwrap();
    assert!((0.9..2.0).contains(&ratio), "compression ratio {ratio}: {cleared:#}");
    let table = tidemark(&["status", "--state", &p("state")]);
    assert!(
        table.contains("ok (threshold 1 s)") && table.contains("diff sync"),
        "status table: {table}"
    );
    let rx_doc = wait_status(&root.join("rx"), "the receiver's status", |v| v["acked"].is_u64());
    let rx_table = tidemark(&["status", "--state", &p("rx")]);
    assert!(
        rx_table.contains("RETENTION") && rx_table.contains("ACKED"),
        "receiver table: {rx_table}"
    );
    assert!(rx_doc["retention"].is_object(), "{rx_doc:#}");
    wait_series(&prom.addr, "tidemark_rpo_alarm", "the alarm cleared", |x| x == 0.0);
    wait_series(&prom.addr, "tidemark_rpo_alarms_total", "one alarm raised", |x| x == 1.0);
    wait_series(&prom.addr, "tidemark_backlog_bytes", "an empty backlog", |x| x == 0.0);
    wait_series(&prom.addr, "tidemark_rpo_seconds", "a zero RPO", |x| x == 0.0);
    let acked = u(&cleared, "/shipper/acked") as f64;
    wait_series(&prom.addr, "tidemark_receiver_acked_seq", "the receiver's ack", |x| x >= acked);
    wait_series(&prom.addr, "tidemark_replica_consistent", "a consistent replica", |x| x == 1.0);
    px.terminate();
    rx.terminate();
}

/// `tidemark profile` through the FUSE + loop frontend (root): N MiB of random data then
/// N MiB of zeros written to the device, then SIGTERM; the report counts what was written
/// and a compression ratio of about 2 (random data does not compress, zeros vanish).
#[test]
fn profile_through_fuse_reports_the_workload() {
    require_env!("profile_through_fuse_reports_the_workload");
    const N: u64 = 8;
    let mib = 1u64 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut cleanup = Cleanup::default();
    cleanup.root = root.to_path_buf();
    let image = root.join("volume.img");
    std::fs::File::create(&image).unwrap().set_len(64 * mib).unwrap();
    let p = |rel: &str| root.join(rel).display().to_string();
    let chart = root.join("rate.svg");
    let mut px = Proc::spawn(
        "profile",
        &[
            "profile",
            "--image",
            &p("volume.img"),
            "--state",
            &p("state"),
            "--duration",
            "600",
            "--rpo",
            "5",
            "--retention",
            "1h",
            "--chart",
            &chart.display().to_string(),
            "--json",
        ],
    );
    let dev = px.wait_line("device:");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
        for k in 0..N {
            f.write_all_at(&pattern(k + 11, mib as usize), k * mib).unwrap();
        }
        for k in 0..N {
            f.write_all_at(&vec![0u8; mib as usize], (32 + k) * mib).unwrap();
        }
        f.sync_all().unwrap();
    }
    px.terminate();
    let out = px.lines.lock().unwrap().join("\n");
    let json = &out[out.find('{').expect("a JSON report")..];
    let v: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("report: {e}\n{out}"));
    let written = v["bytes_written"].as_u64().unwrap();
    // What the kernel writes back through the loop device: exactly those blocks, plus at
    // most a little of its own (none expected on a raw device).
    assert!(
        written >= 2 * N * mib && written <= 2 * N * mib + mib,
        "bytes_written {written}: {v:#}"
    );
    let ratio = v["compression"]["ratio"].as_f64().unwrap();
    let (lo, hi) =
        (written as f64 / (N * mib + N * mib / 10 + mib) as f64, written as f64 / (N * mib) as f64);
    assert!(ratio >= lo && ratio <= hi, "ratio {ratio} outside [{lo}, {hi}]: {v:#}");
    let avg = v["change_rate"]["average_bps"].as_f64().unwrap();
    let peak = v["change_rate"]["peak_bps"].as_f64().unwrap();
    let duration = v["duration_s"].as_f64().unwrap();
    assert!(
        (avg * duration - written as f64).abs() < 1.0,
        "average x duration is what was written: {v:#}"
    );
    let shortest = v["interval_s"].as_f64().unwrap().min(duration);
    assert!(peak >= avg * 0.999 && peak <= written as f64 / shortest * 1.001, "{v:#}");
    assert!(v["wan"]["bandwidth_bps"].as_f64().unwrap() > 0.0, "{v:#}");
    assert!(v["journal"]["bytes_needed"].as_u64().unwrap() > 0, "{v:#}");
    let svg = std::fs::read_to_string(&chart).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "chart: {svg}");
}
