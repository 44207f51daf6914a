//! `tidemark profile`: the capture without a target, to size a protection before it runs.
//! Writes reach the volume through the tap (the FUSE + loop frontend, or the library API
//! for `--frontend none` and the tests); a [`Profiler`] drains the spool as a shipper
//! would, and counts, per interval of capture time, the bytes written, what zstd at the
//! shipping level makes of them, and what the retention journal would store. The report
//! gives the change rate (average and peak), the compressibility, the WAN bandwidth a
//! desired RPO needs and the journal a desired retention window needs (formulas in
//! [`Profile::text`] and `docs/metrics.md`), as text, JSON and an SVG chart.
//!
//! Invariant: every event the profiler reads is acknowledged after it is counted, so the
//! spool stays empty and a profile never overflows into the intent map unless the volume
//! is written faster than the spool is drained.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use tidemark_journal::format::RECORD_HEADER_LEN;
use tidemark_journal::{Clock, Event, FileIo, FsDir, Nanos, Seq, Spool, SpoolConfig, SystemClock};
use tidemark_sync::ship::ShipperConfig;
use tidemark_tap::{FuseLoopConfig, FuseLoopFrontend, IntentConfig, IntentMap, Tap, TapConfig};

use crate::protect::Frontend;
use crate::{common, signals, status};

/// The zstd level the shipper starts at (`ShipperConfig`'s default compression).
pub const SHIPPING_LEVEL: i32 = 1;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The volume: an image file or a block device (written only through the frontend).
    #[arg(long)]
    image: PathBuf,
    /// State directory (spool/, intent.map); created; must not hold a spool already.
    #[arg(long)]
    state: PathBuf,
    /// How long to capture, in seconds (SIGINT/SIGTERM end it early).
    #[arg(long, value_name = "SECS")]
    duration: f64,
    /// The RPO to size the WAN link for, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    rpo: f64,
    /// The retention window to size the journal for (`90s`, `30m`, `24h`, `7d`, or seconds).
    #[arg(long, value_name = "DURATION", default_value = "24h")]
    retention: String,
    /// Length of one interval of the change-rate series, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    interval: f64,
    /// Write an SVG chart of the change rate here.
    #[arg(long)]
    chart: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// How applications reach the volume during the profile.
    #[arg(long, value_enum, default_value_t = Frontend::Fuse)]
    frontend: Frontend,
    /// Where the FUSE frontend mounts (default: STATE/mnt).
    #[arg(long)]
    mountpoint: Option<PathBuf>,
}

/// [`crate::common::parse_duration`], as an `anyhow` result.
pub fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    crate::common::parse_duration(text).map_err(anyhow::Error::msg)
}

/// What one interval of capture time held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Interval {
    /// Bytes of data written (write events).
    pub bytes: u64,
    /// Those bytes compressed with zstd at the shipping level, in batches of the shipper's
    /// size that do not straddle intervals.
    pub compressed_bytes: u64,
    /// Bytes zeroed or discarded (sent and journaled as ranges, without data).
    pub zeroed_bytes: u64,
    /// Bytes the retention journal would store: a record header per event plus the data.
    pub journal_bytes: u64,
    /// Events.
    pub events: u64,
}

/// Drains a tap's spool and counts what it captured (see the module documentation).
pub struct Profiler {
    tap: Arc<Tap>,
    start: Nanos,
    interval_ns: u64,
    after: Seq,
    intervals: Vec<Interval>,
    batch: Vec<u8>,
    batch_interval: usize,
}

impl Profiler {
    /// Counts events captured from `start` on, in intervals of `interval`.
    pub fn new(tap: Arc<Tap>, start: Nanos, interval: Duration) -> Self {
        let after = tap.status().acked;
        Self {
            tap,
            start,
            interval_ns: (interval.as_nanos() as u64).max(1),
            after,
            intervals: Vec::new(),
            batch: Vec::new(),
            batch_interval: 0,
        }
    }

    /// Makes the spool durable, counts every event in it, and acknowledges them.
    pub fn drain(&mut self) -> anyhow::Result<()> {
        self.tap.sync_spool().context("profile: sync the spool")?;
        loop {
            let events =
                self.tap.read_after(self.after, 16 << 20).context("profile: read the spool")?;
            let Some(last) = events.last().map(|e| e.seq) else { break };
            for e in &events {
                self.count(e.time, &e.event);
            }
            self.after = last;
            self.tap.acknowledge(last).context("profile: acknowledge the spool")?;
        }
        Ok(())
    }

    fn count(&mut self, time: Nanos, event: &Event) {
        let i = (time.0.saturating_sub(self.start.0) / self.interval_ns) as usize;
        if self.intervals.len() <= i {
            self.intervals.resize(i + 1, Interval::default());
        }
        let header = RECORD_HEADER_LEN as u64;
        match event {
            Event::Write { data, .. } => {
                if i != self.batch_interval
                    || self.batch.len() + data.len() > ShipperConfig::DEFAULT_BATCH_BYTES as usize
                {
                    self.compress_batch();
                    self.batch_interval = i;
                }
                self.batch.extend_from_slice(data);
                let iv = &mut self.intervals[i];
                iv.bytes += data.len() as u64;
                iv.journal_bytes += header + data.len() as u64;
            }
            Event::WriteZeroes { len, .. } | Event::Discard { len, .. } => {
                self.intervals[i].zeroed_bytes += u64::from(*len);
                self.intervals[i].journal_bytes += header;
            }
            _ => self.intervals[i].journal_bytes += header,
        }
        self.intervals[i].events += 1;
    }

    fn compress_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        // zstd cannot fail on memory input at a valid level; were it to, count it raw.
        let n =
            zstd::bulk::compress(&self.batch, SHIPPING_LEVEL).map_or(self.batch.len(), |c| c.len());
        self.intervals[self.batch_interval].compressed_bytes += n as u64;
        self.batch.clear();
    }

    /// The report of a capture that lasted `duration`, for an RPO and a retention window.
    pub fn finish(mut self, duration: Duration, rpo: Duration, retention: Duration) -> Profile {
        self.compress_batch();
        let interval_s = self.interval_ns as f64 / 1e9;
        let n = ((duration.as_secs_f64() / interval_s).ceil() as usize).max(1);
        if self.intervals.len() < n {
            self.intervals.resize(n, Interval::default());
        }
        Profile {
            interval_s,
            duration_s: duration
                .as_secs_f64()
                .max(interval_s * self.intervals.len() as f64 - interval_s)
                .max(1e-9),
            intervals: self.intervals,
            rpo_s: rpo.as_secs_f64(),
            retention_s: retention.as_secs_f64(),
        }
    }
}

/// A profile's figures.
#[derive(Debug, Clone)]
pub struct Profile {
    pub interval_s: f64,
    pub duration_s: f64,
    pub intervals: Vec<Interval>,
    pub rpo_s: f64,
    pub retention_s: f64,
}

impl Profile {
    /// The length of interval `i` in seconds: the last one may be cut short by the end
    /// of the capture.
    fn length(&self, i: usize) -> f64 {
        (self.duration_s - i as f64 * self.interval_s).clamp(1e-3, self.interval_s)
    }

    fn sum(&self, f: impl Fn(&Interval) -> u64) -> u64 {
        self.intervals.iter().map(f).sum()
    }

    pub fn total_bytes(&self) -> u64 {
        self.sum(|i| i.bytes)
    }

    pub fn total_compressed(&self) -> u64 {
        self.sum(|i| i.compressed_bytes)
    }

    /// Average change rate: data bytes written over the capture's length.
    pub fn average_bps(&self) -> f64 {
        self.total_bytes() as f64 / self.duration_s
    }

    /// Peak change rate: the busiest interval's bytes over its length; and its start.
    pub fn peak_bps(&self) -> (f64, f64) {
        let (i, bytes) = self
            .intervals
            .iter()
            .enumerate()
            .map(|(i, iv)| (i, iv.bytes as f64 / self.length(i)))
            .fold((0, 0.0), |best, x| if x.1 > best.1 { x } else { best });
        (bytes, i as f64 * self.interval_s)
    }

    /// Uncompressed over compressed bytes (1 when nothing was written).
    pub fn compression_ratio(&self) -> f64 {
        match self.total_compressed() {
            0 => 1.0,
            c => self.total_bytes() as f64 / c as f64,
        }
    }

    /// The WAN bandwidth (bytes/s) that keeps the RPO at or under `rpo_s` through this
    /// capture: max over every stretch [i, j] of intervals of
    /// compressed(i..=j) / (length of the stretch + RPO). A link of rate B drains what a
    /// stretch brought within the stretch plus the RPO exactly when B is at least that, and
    /// a FIFO's oldest byte waits longest after the stretch that brought most per second.
    pub fn wan_bps(&self, rpo_s: f64) -> f64 {
        let c: Vec<u64> = self.intervals.iter().map(|i| i.compressed_bytes).collect();
        let mut prefix = vec![0u64; c.len() + 1];
        for (k, x) in c.iter().enumerate() {
            prefix[k + 1] = prefix[k] + x;
        }
        let mut best = 0.0f64;
        for i in 0..c.len() {
            for j in i..c.len() {
                let bytes = (prefix[j + 1] - prefix[i]) as f64;
                let span = (i..=j).map(|k| self.length(k)).sum::<f64>() + rpo_s;
                if span > 0.0 {
                    best = best.max(bytes / span);
                }
            }
        }
        best
    }

    /// The journal (bytes) a retention window of `retention_s` needs at this change rate:
    /// journal bytes per second (record headers plus data, as the retention log stores
    /// them) times the window, the field's "daily change rate x retention window".
    pub fn journal_bytes_needed(&self, retention_s: f64) -> u64 {
        (self.sum(|i| i.journal_bytes) as f64 / self.duration_s * retention_s).ceil() as u64
    }

    pub fn json(&self) -> serde_json::Value {
        let (peak, peak_at) = self.peak_bps();
        json!({
            "duration_s": self.duration_s,
            "interval_s": self.interval_s,
            "bytes_written": self.total_bytes(),
            "bytes_zeroed": self.sum(|i| i.zeroed_bytes),
            "events": self.sum(|i| i.events),
            "change_rate": {
                "average_bps": self.average_bps(),
                "peak_bps": peak,
                "peak_at_s": peak_at,
                "per_interval_bps": self.intervals.iter().enumerate().map(|(k, i)| i.bytes as f64 / self.length(k)).collect::<Vec<_>>(),
                "compressed_per_interval_bps": self.intervals.iter().enumerate().map(|(k, i)| i.compressed_bytes as f64 / self.length(k)).collect::<Vec<_>>(),
            },
            "compression": {
                "zstd_level": SHIPPING_LEVEL,
                "compressed_bytes": self.total_compressed(),
                "ratio": self.compression_ratio(),
            },
            "wan": { "rpo_s": self.rpo_s, "bandwidth_bps": self.wan_bps(self.rpo_s) },
            "journal": {
                "retention_s": self.retention_s,
                "journal_bps": self.sum(|i| i.journal_bytes) as f64 / self.duration_s,
                "bytes_needed": self.journal_bytes_needed(self.retention_s),
            },
        })
    }

    pub fn text(&self) -> String {
        let (peak, peak_at) = self.peak_bps();
        let rate = |b: f64| format!("{}/s", status::bytes(b as u64));
        let mut t = String::new();
        t += &format!(
            "captured {:.1} s in {} intervals of {} s: {} written ({} zeroed or discarded), {} events\n",
            self.duration_s,
            self.intervals.len(),
            self.interval_s,
            status::bytes(self.total_bytes()),
            status::bytes(self.sum(|i| i.zeroed_bytes)),
            self.sum(|i| i.events)
        );
        t += &format!(
            "change rate: average {} (bytes written / {:.1} s), peak {} (the interval at {:.0} s)\n",
            rate(self.average_bps()),
            self.duration_s,
            rate(peak),
            peak_at
        );
        t += &format!(
            "compressibility: zstd level {SHIPPING_LEVEL} in 1 MiB batches (the shipper's) makes {} of {}: ratio {:.2}\n",
            status::bytes(self.total_compressed()),
            status::bytes(self.total_bytes()),
            self.compression_ratio()
        );
        t += &format!(
            "WAN bandwidth for an RPO of {} s: {} ({} bit/s)\n  = max over every stretch of intervals of its compressed bytes / (its length + the RPO):\n  \
             a link that fast ships what any stretch brought within that stretch plus the RPO\n",
            self.rpo_s,
            rate(self.wan_bps(self.rpo_s)),
            (self.wan_bps(self.rpo_s) * 8.0).round()
        );
        t += &format!(
            "journal for a retention window of {} s: {}\n  = journal bytes per second ({}: a {}-byte record header per event plus the data) x the window\n",
            self.retention_s,
            status::bytes(self.journal_bytes_needed(self.retention_s)),
            rate(self.sum(|i| i.journal_bytes) as f64 / self.duration_s),
            RECORD_HEADER_LEN
        );
        if self.retention_s > self.duration_s {
            t += &format!(
                "  (extrapolated from {:.1} s of capture: profile through a busy day for a daily figure)\n",
                self.duration_s
            );
        }
        t
    }

    /// An SVG bar chart of the change rate per interval, written and compressed.
    pub fn svg(&self) -> String {
        let (w, h, left, bottom, top, right) = (900.0, 360.0, 80.0, 50.0, 40.0, 20.0);
        let plot_w = w - left - right;
        let plot_h = h - top - bottom;
        let mib = |i: usize, b: u64| b as f64 / self.length(i) / f64::from(1u32 << 20);
        let peak =
            self.intervals.iter().enumerate().map(|(k, i)| mib(k, i.bytes)).fold(0.0, f64::max);
        let ymax = nice_ceiling(peak.max(1e-3));
        let n = self.intervals.len().max(1) as f64;
        let bar = plot_w / n;
        let y = |v: f64| top + plot_h - v / ymax * plot_h;
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n"
        );
        s += &format!("<rect x=\"0\" y=\"0\" width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n");
        s += &format!(
            "<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">Change rate per {} s interval (average {:.2} MiB/s, compression ratio {:.2})</text>\n",
            w / 2.0,
            self.interval_s,
            self.average_bps() / f64::from(1u32 << 20),
            self.compression_ratio()
        );
        for k in 0..=4 {
            let v = ymax * f64::from(k) / 4.0;
            s += &format!(
                "<line x1=\"{left}\" y1=\"{0:.1}\" x2=\"{1}\" y2=\"{0:.1}\" stroke=\"#ddd\"/>\n<text x=\"{2}\" y=\"{3:.1}\" text-anchor=\"end\">{v:.2}</text>\n",
                y(v),
                w - right,
                left - 6.0,
                y(v) + 4.0
            );
        }
        for (i, iv) in self.intervals.iter().enumerate() {
            let x = left + i as f64 * bar;
            let (raw, comp) = (mib(i, iv.bytes), mib(i, iv.compressed_bytes));
            s += &format!(
                "<rect class=\"written\" x=\"{x:.2}\" y=\"{:.2}\" width=\"{:.2}\" height=\"{:.2}\" fill=\"#4a7fb5\"><title>{:.0} s: {raw:.3} MiB/s written</title></rect>\n",
                y(raw),
                (bar * 0.9).max(0.5),
                top + plot_h - y(raw),
                i as f64 * self.interval_s
            );
            s += &format!(
                "<rect class=\"compressed\" x=\"{x:.2}\" y=\"{:.2}\" width=\"{:.2}\" height=\"{:.2}\" fill=\"#e39b3b\"><title>{:.0} s: {comp:.3} MiB/s compressed</title></rect>\n",
                y(comp),
                (bar * 0.45).max(0.25),
                top + plot_h - y(comp),
                i as f64 * self.interval_s
            );
        }
        s += &format!(
            "<line x1=\"{left}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"black\"/>\n<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{0}\" stroke=\"black\"/>\n",
            top + plot_h,
            w - right
        );
        s += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">time (s), {:.0} s in all</text>\n",
            left + plot_w / 2.0,
            h - 12.0,
            self.duration_s
        );
        s += &format!(
            "<text x=\"18\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 18 {})\">MiB/s</text>\n",
            top + plot_h / 2.0,
            top + plot_h / 2.0
        );
        s += &format!(
            "<rect x=\"{0}\" y=\"30\" width=\"10\" height=\"10\" fill=\"#4a7fb5\"/><text x=\"{1}\" y=\"39\">written</text>\n<rect x=\"{2}\" y=\"30\" width=\"10\" height=\"10\" fill=\"#e39b3b\"/><text x=\"{3}\" y=\"39\">compressed (zstd {SHIPPING_LEVEL})</text>\n",
            w - 260.0,
            w - 246.0,
            w - 180.0,
            w - 166.0
        );
        s += "</svg>\n";
        s
    }
}

/// The smallest 1, 2 or 5 times a power of ten at or above `v`.
fn nice_ceiling(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * p).find(|c| *c >= v).unwrap_or(10.0 * p)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let duration = Duration::try_from_secs_f64(args.duration).context("--duration")?;
    let rpo = Duration::try_from_secs_f64(args.rpo).context("--rpo")?;
    let retention = parse_duration(&args.retention).context("--retention")?;
    let interval = Duration::try_from_secs_f64(args.interval).context("--interval")?;
    if interval.is_zero() {
        bail!("--interval {}: expected more than 0 seconds", args.interval);
    }
    std::fs::create_dir_all(&args.state)
        .with_context(|| format!("create {}", args.state.display()))?;
    let spool_dir = args.state.join("spool");
    if spool_dir.exists() {
        bail!(
            "{} holds a spool already: give profile a state directory of its own",
            args.state.display()
        );
    }
    let (device, vol_len) = common::open_volume(&args.image)?;
    let (spool, _) = Spool::open(
        Arc::new(FsDir::new(&spool_dir)?),
        SpoolConfig { capacity_bytes: 1 << 30, segment_bytes: 16 << 20, key: None },
        Arc::new(SystemClock),
    )
    .context("open the profile's spool")?;
    let intent_path = args.state.join("intent.map");
    let intent_file = FileIo::create(&intent_path, 0)
        .with_context(|| format!("create {}", intent_path.display()))?;
    let (intent, _) = IntentMap::open(Arc::new(intent_file), vol_len, IntentConfig::default())
        .context("open the write-intent map")?;
    let tap = Arc::new(Tap::new(Arc::new(device), spool, intent, TapConfig::default())?);
    let start = SystemClock.now();
    let mut profiler = Profiler::new(tap.clone(), start, interval);
    signals::install()?;
    let frontend =
        match args.frontend {
            Frontend::Fuse => {
                let mnt = args.mountpoint.clone().unwrap_or_else(|| args.state.join("mnt"));
                Some(FuseLoopFrontend::start(tap.clone(), FuseLoopConfig::new(&mnt)).with_context(
                    || format!("start the FUSE + loop frontend at {}", mnt.display()),
                )?)
            }
            Frontend::None => None,
        };
    if let Some(p) = frontend.as_ref().and_then(|f| f.device_path()) {
        println!("device: {}", p.display());
    }
    println!("profiling {} for {} s", args.image.display(), args.duration);
    use std::io::Write as _;
    std::io::stdout().flush()?;
    let began = Instant::now();
    let mut last_drain = Instant::now();
    while began.elapsed() < duration && !signals::stop_requested() {
        // The group commit a shipper's agent would run, so writes complete promptly.
        tap.sync_spool().context("profile: sync the spool")?;
        if last_drain.elapsed() >= Duration::from_millis(100) {
            profiler.drain()?;
            last_drain = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let elapsed = began.elapsed();
    if let Some(f) = frontend {
        f.shutdown().context("stop the frontend")?;
    }
    profiler.drain()?;
    let profile = profiler.finish(elapsed, rpo, retention);
    drop(tap);
    if let Some(path) = &args.chart {
        std::fs::write(path, profile.svg())
            .with_context(|| format!("write the chart {}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&profile.json())?);
    } else {
        print!("{}", profile.text());
        if let Some(path) = &args.chart {
            println!("chart: {}", path.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use tidemark_journal::{ManualClock, MemDir, MemVolume};

    use super::*;

    /// A tap over memory whose spool runs on `clock`.
    fn tap(clock: Arc<ManualClock>, len: u64) -> Arc<Tap> {
        let (spool, _) =
            Spool::open(Arc::new(MemDir::new()), SpoolConfig::default(), clock).unwrap();
        let intent_io = Arc::new(MemVolume::new(0));
        let (intent, _) = IntentMap::open(intent_io, len, IntentConfig::default()).unwrap();
        Arc::new(
            Tap::new(Arc::new(MemVolume::new(len)), spool, intent, TapConfig::default()).unwrap(),
        )
    }

    fn random(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// N MiB of random data in the first second, N MiB of zeros and N MiB of repeated text
    /// in the third, nothing in the rest of a 5 s capture: the figures follow from that.
    #[test]
    fn a_known_workload_gives_its_change_rate_compressibility_and_sizes() {
        const N: u64 = 4;
        let mib = 1u64 << 20;
        let clock = Arc::new(ManualClock::new(Nanos(1_000 * Nanos::SECOND)));
        let tap = tap(clock.clone(), 64 * mib);
        let start = clock.now();
        let mut p = Profiler::new(tap.clone(), start, Duration::from_secs(1));
        for k in 0..N {
            tap.write(k * mib, Bytes::from(random(k + 1, mib as usize))).unwrap();
        }
        p.drain().unwrap();
        clock.advance(Duration::from_secs(2));
        let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog. "
            .iter()
            .copied()
            .cycle()
            .take(mib as usize)
            .collect();
        for k in 0..N {
            tap.write((16 + k) * mib, Bytes::from(vec![0u8; mib as usize])).unwrap();
            tap.write((32 + k) * mib, Bytes::from(text.clone())).unwrap();
        }
        p.drain().unwrap();
        assert_eq!(tap.status().backlog_bytes, 0, "the profiler acknowledges what it counted");
        let prof =
            p.finish(Duration::from_secs(5), Duration::from_secs(10), Duration::from_secs(3600));

        let written = 3 * N * mib;
        assert_eq!(prof.total_bytes(), written, "every byte written is counted");
        assert_eq!(prof.intervals.len(), 5);
        assert_eq!(prof.intervals[0].bytes, N * mib);
        assert_eq!(prof.intervals[2].bytes, 2 * N * mib);
        assert_eq!(prof.intervals[1].bytes + prof.intervals[3].bytes + prof.intervals[4].bytes, 0);
        assert!(
            (prof.average_bps() - written as f64 / 5.0).abs() < 1.0,
            "average {}",
            prof.average_bps()
        );
        assert_eq!(prof.peak_bps(), ((2 * N * mib) as f64, 2.0));

        // Random data does not compress (zstd frames add a little); zeros and text almost
        // vanish (under 5% of their size).
        let random_part = prof.intervals[0].compressed_bytes;
        assert!(
            random_part >= N * mib && random_part <= N * mib + N * mib / 100,
            "random compressed to {random_part}"
        );
        let rest = prof.intervals[2].compressed_bytes;
        assert!(rest < 2 * N * mib / 20, "zeros and text compressed to {rest}");
        let ratio = prof.compression_ratio();
        let (lo, hi) = (
            written as f64 / (N * mib + N * mib / 100 + 2 * N * mib / 20) as f64,
            written as f64 / (N * mib) as f64,
        );
        assert!(ratio >= lo && ratio <= hi, "ratio {ratio} outside [{lo}, {hi}]");

        // WAN: with RPO 0 the busiest interval's compressed rate; with a long RPO it tends
        // to everything over (capture + RPO); never below the average compressed rate over
        // capture + RPO, and it falls as the RPO grows.
        let busiest = prof.intervals.iter().map(|i| i.compressed_bytes).max().unwrap() as f64;
        assert_eq!(prof.wan_bps(0.0), busiest);
        let total_c = prof.total_compressed() as f64;
        for rpo in [1.0, 10.0, 100.0] {
            let b = prof.wan_bps(rpo);
            assert!(b >= total_c / (5.0 + rpo) - 1e-6 && b <= busiest, "rpo {rpo}: {b}");
        }
        assert!(prof.wan_bps(1.0) > prof.wan_bps(10.0) && prof.wan_bps(10.0) > prof.wan_bps(100.0));
        // One interval at RPO 10: the first second's random data dominates stretch [0, 0]:
        // N MiB / 11 s, against [0, 2] (all) / 13 s.
        let expect = (random_part as f64 / 11.0).max(total_c / 13.0).max(rest as f64 / 11.0);
        assert!((prof.wan_bps(10.0) - expect).abs() < 1e-6);

        // Journal: headers plus data, per second, times the window.
        let events = 3 * N;
        let per_s = (written + events * RECORD_HEADER_LEN as u64) as f64 / 5.0;
        assert_eq!(prof.journal_bytes_needed(3600.0), (per_s * 3600.0).ceil() as u64);

        let svg = prof.svg();
        assert_well_formed(&svg);
        assert_eq!(svg.matches("class=\"written\"").count(), 5, "one bar per interval");
        let v = prof.json();
        assert_eq!(v["bytes_written"], written);
        assert!(prof.text().contains("WAN bandwidth for an RPO of 10 s"));
    }

    /// Tags balance and nest (a small check: no XML parser in the workspace).
    fn assert_well_formed(svg: &str) {
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        let mut stack = Vec::new();
        let mut rest = svg;
        while let Some(open) = rest.find('<') {
            let close = rest[open..].find('>').expect("unclosed tag") + open;
            let tag = &rest[open + 1..close];
            assert!(!tag.contains('<'), "'<' inside a tag: {tag}");
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(stack.pop(), Some(name.to_owned()), "mismatched </{name}>");
            } else if !tag.ends_with('/') {
                stack.push(tag.split_whitespace().next().unwrap().to_owned());
            }
            rest = &rest[close + 1..];
        }
        assert!(stack.is_empty(), "unclosed: {stack:?}");
    }

    #[test]
    fn durations_with_units() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604_800));
        assert!(parse_duration("3x").is_err());
        assert!(parse_duration("h").is_err());
    }
}
