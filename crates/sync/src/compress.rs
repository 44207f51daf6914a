//! Adaptive compression of batches: the zstd level follows whatever limits the pipeline.
//!
//! The encoder reports, for each batch, whether the writer's queue was full when the frame
//! was ready ([`BatchStats::link_bound`]: the link or the bandwidth limit is the
//! bottleneck, so more CPU spent on compression buys throughput) and whether the spool
//! still held events behind the batch ([`BatchStats::backlogged`]). A backlog without a
//! full queue means the encoder itself is the bottleneck: a lower level buys throughput.
//! Neither means the pipeline keeps up, and the level stays.
//!
//! [`AdaptiveCompression`] moves one level at a time, and only after `hysteresis`
//! consecutive batches agree, so that a burst does not make it oscillate:
//! - link-bound: up, to at most `max_level`; from off, back on at `min_level`;
//! - encoder-bound: down, to `min_level`, then off;
//! - compression that does not pay (frames at least `poor_ratio` of the raw bytes, as on
//!   encrypted or already compressed data) for `hysteresis` batches: off, and a probe at
//!   `min_level` every `probe_interval` batches to notice when the data changes.
//!
//! Invariants: the level is always `Off` or `Zstd { level }` with
//! `min_level <= level <= max_level`; it changes by one step at most per batch.

use crate::ship::{BatchStats, CompressionPolicy};
use crate::wire::Compression;

/// A zstd level that adapts to the link and the CPU (see the module documentation).
#[derive(Debug, Clone)]
pub struct AdaptiveCompression {
    min_level: i32,
    max_level: i32,
    hysteresis: u32,
    poor_ratio: f64,
    probe_interval: u32,
    /// The current level; `None` is off.
    level: Option<i32>,
    link_streak: u32,
    cpu_streak: u32,
    poor_streak: u32,
    /// Off because compression did not pay: batches left before the next probe.
    probe_in: Option<u32>,
}

impl Default for AdaptiveCompression {
    fn default() -> Self {
        Self::new(1)
    }
}

impl AdaptiveCompression {
    /// Lowest level used before turning compression off.
    pub const MIN_LEVEL: i32 = 1;
    /// Default highest level: beyond 9 zstd costs several times the CPU for a few percent.
    pub const MAX_LEVEL: i32 = 9;
    /// Default number of consecutive batches that must agree before the level moves.
    pub const HYSTERESIS: u32 = 4;
    /// Default ratio (frame bytes / raw bytes) at or above which compression does not pay.
    pub const POOR_RATIO: f64 = 0.97;
    /// Default batches between two probes while off because compression did not pay.
    pub const PROBE_INTERVAL: u32 = 64;

    /// A policy starting at `start` (clamped to 1..=9; 0 or less starts off).
    pub fn new(start: i32) -> Self {
        Self {
            min_level: Self::MIN_LEVEL,
            max_level: Self::MAX_LEVEL,
            hysteresis: Self::HYSTERESIS,
            poor_ratio: Self::POOR_RATIO,
            probe_interval: Self::PROBE_INTERVAL,
            level: (start > 0).then(|| start.clamp(Self::MIN_LEVEL, Self::MAX_LEVEL)),
            link_streak: 0,
            cpu_streak: 0,
            poor_streak: 0,
            probe_in: None,
        }
    }

    /// Sets the highest level (at least 1; the current level is lowered to it).
    pub fn max_level(mut self, max: i32) -> Self {
        self.max_level = max.max(self.min_level);
        self.level = self.level.map(|l| l.min(self.max_level));
        self
    }

    /// Sets how many consecutive batches must agree before the level moves (at least 1).
    pub fn hysteresis(mut self, batches: u32) -> Self {
        self.hysteresis = batches.max(1);
        self
    }

    /// Sets the number of batches between probes while compression does not pay (at
    /// least 1).
    pub fn probe_interval(mut self, batches: u32) -> Self {
        self.probe_interval = batches.max(1);
        self
    }

    /// The compression the next batch gets, as things stand.
    pub fn current(&self) -> Compression {
        match self.level {
            Some(level) => Compression::Zstd { level },
            None => Compression::Off,
        }
    }

    fn observe(&mut self, s: &BatchStats) {
        // Did compression pay? Only a compressed attempt on a body worth it tells.
        if matches!(s.compression, Compression::Zstd { .. }) && s.raw_bytes >= 4096 {
            let ratio = s.frame_bytes as f64 / s.raw_bytes as f64;
            if ratio >= self.poor_ratio {
                self.poor_streak += 1;
            } else {
                self.poor_streak = 0;
            }
            if self.poor_streak >= self.hysteresis {
                self.level = None;
                self.probe_in = Some(self.probe_interval);
                self.reset_streaks();
                return;
            }
        }
        if let Some(left) = self.probe_in {
            // Off because compression did not pay: the pipeline's pressure is beside the
            // point until the probe.
            if left <= 1 {
                self.probe_in = None;
                self.poor_streak = self.hysteresis.saturating_sub(1);
                self.level = Some(self.min_level);
            } else {
                self.probe_in = Some(left - 1);
            }
            return;
        }
        if s.link_bound {
            self.cpu_streak = 0;
            self.link_streak += 1;
            if self.link_streak >= self.hysteresis {
                self.link_streak = 0;
                self.level = Some(match self.level {
                    None => self.min_level,
                    Some(l) => (l + 1).min(self.max_level),
                });
            }
        } else if s.backlogged {
            self.link_streak = 0;
            self.cpu_streak += 1;
            if self.cpu_streak >= self.hysteresis {
                self.cpu_streak = 0;
                self.level = match self.level {
                    Some(l) if l > self.min_level => Some(l - 1),
                    _ => None,
                };
            }
        } else {
            self.reset_streaks();
        }
    }

    fn reset_streaks(&mut self) {
        self.link_streak = 0;
        self.cpu_streak = 0;
    }
}

impl CompressionPolicy for AdaptiveCompression {
    fn next(&mut self, last: Option<&BatchStats>) -> Compression {
        if let Some(s) = last {
            self.observe(s);
        }
        self.current()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn stats(
        compression: Compression,
        link_bound: bool,
        backlogged: bool,
        ratio: f64,
    ) -> BatchStats {
        let raw_bytes = 1 << 20;
        BatchStats {
            compression,
            raw_bytes,
            frame_bytes: (raw_bytes as f64 * ratio) as u64,
            encode_time: Duration::from_millis(3),
            link_bound,
            backlogged,
        }
    }

    /// Feeds `n` batches shaped by `f` (given the compression chosen for each) and returns
    /// the levels chosen.
    fn run(
        p: &mut AdaptiveCompression,
        n: usize,
        f: impl Fn(Compression) -> BatchStats,
    ) -> Vec<Compression> {
        let mut c = p.current();
        let mut out = Vec::new();
        for _ in 0..n {
            c = p.next(Some(&f(c)));
            out.push(c);
        }
        out
    }

    fn level(c: Compression) -> i32 {
        match c {
            Compression::Off => 0,
            Compression::Zstd { level } => level,
        }
    }

    #[test]
    fn a_link_bound_pipeline_raises_the_level_step_by_step_to_the_cap() {
        let mut p = AdaptiveCompression::new(1);
        let levels = run(&mut p, 100, |c| stats(c, true, true, 0.4));
        let levels: Vec<i32> = levels.into_iter().map(level).collect();
        assert!(levels.windows(2).all(|w| w[1] == w[0] || w[1] == w[0] + 1), "{levels:?}");
        assert_eq!(levels[2], 1, "hysteresis: three batches do not move it");
        assert_eq!(levels[3], 2, "the fourth does");
        assert_eq!(*levels.last().unwrap(), AdaptiveCompression::MAX_LEVEL);
    }

    #[test]
    fn an_encoder_bound_pipeline_lowers_the_level_then_turns_it_off() {
        let mut p = AdaptiveCompression::new(6);
        let levels: Vec<i32> =
            run(&mut p, 40, |c| stats(c, false, true, 0.4)).into_iter().map(level).collect();
        assert!(levels.windows(2).all(|w| w[1] == w[0] || w[1] + 1 == w[0]), "{levels:?}");
        assert_eq!(levels[3], 5);
        assert_eq!(*levels.last().unwrap(), 0, "below level 1 compression goes off");
        // And back on once the link becomes the bottleneck.
        let levels = run(&mut p, 4, |c| stats(c, true, true, 0.4));
        assert_eq!(
            levels,
            vec![
                Compression::Off,
                Compression::Off,
                Compression::Off,
                Compression::Zstd { level: 1 }
            ]
        );
    }

    #[test]
    fn an_idle_pipeline_keeps_its_level_and_bursts_do_not_move_it() {
        let mut p = AdaptiveCompression::new(4);
        // Alternating link-bound and idle batches never make four in a row.
        let mut c = p.current();
        for i in 0..50 {
            c = p.next(Some(&stats(c, i % 2 == 0, false, 0.4)));
            assert_eq!(c, Compression::Zstd { level: 4 });
        }
        let levels = run(&mut p, 20, |c| stats(c, false, false, 0.4));
        assert!(levels.iter().all(|&c| c == Compression::Zstd { level: 4 }));
    }

    #[test]
    fn incompressible_data_turns_compression_off_and_a_probe_turns_it_back_on() {
        let mut p = AdaptiveCompression::new(3).probe_interval(10);
        // Link-bound, but the data does not compress (ratio 1.0 after the frame header).
        let levels = run(&mut p, 4, |c| stats(c, true, true, 1.0));
        assert_eq!(levels[3], Compression::Off, "{levels:?}");
        let off = run(&mut p, 9, |c| stats(c, true, true, 1.0));
        assert!(off.iter().all(|&c| c == Compression::Off), "no flapping before the probe");
        let probe = run(&mut p, 1, |c| stats(c, true, true, 1.0));
        assert_eq!(probe, vec![Compression::Zstd { level: 1 }], "the probe");
        // The probe finds the data still incompressible: off again at once.
        let again = run(&mut p, 1, |c| stats(c, true, true, 1.0));
        assert_eq!(again, vec![Compression::Off]);
        // Now the data compresses: the next probe keeps it on, and the level climbs.
        run(&mut p, 10, |c| stats(c, true, true, if c == Compression::Off { 1.0 } else { 0.3 }));
        let levels = run(&mut p, 12, |c| stats(c, true, true, 0.3));
        assert!(level(*levels.last().unwrap()) >= 2, "{levels:?}");
    }

    #[test]
    fn the_start_and_the_cap_are_clamped() {
        assert_eq!(AdaptiveCompression::new(22).current(), Compression::Zstd { level: 9 });
        assert_eq!(AdaptiveCompression::new(0).current(), Compression::Off);
        let p = AdaptiveCompression::new(5).max_level(3);
        assert_eq!(p.current(), Compression::Zstd { level: 3 });
        let mut p = AdaptiveCompression::new(1).max_level(3).hysteresis(1);
        let levels = run(&mut p, 10, |c| stats(c, true, true, 0.5));
        assert_eq!(*levels.last().unwrap(), Compression::Zstd { level: 3 });
    }
}
