//! Shaping: how fast the replication path may use the link, and how many resyncs may run at
//! once. Both limits can be changed while replication runs.
//!
//! - [`TokenBucket`]: a byte-rate limit with a burst, applied to the bytes a shipper puts on
//!   the wire (one bucket may be shared by every shipper of a node, for a node-wide limit).
//!   Its rate can be changed at run time ([`TokenBucket::set_rate`]) and overridden by a
//!   daily [`Schedule`] of time-of-day windows.
//! - [`ResyncSlots`]: a counting semaphore that caps concurrent resyncs.
//!
//! The bucket reads time from a [`Clock`] (the journal's seam), so tests drive it with a
//! `ManualClock` and check exact token counts; nothing in here sleeps to synchronise.
//!
//! Invariants of the bucket:
//! 1. Token arithmetic is exact: tokens are kept in byte-nanoseconds-per-second units
//!    (`bytes * 1e9`, an `i128`), so `rate` bytes/s over `d` ns adds exactly `rate * d`.
//! 2. Tokens never exceed the burst. A take of `n` bytes needs `min(n, burst)` tokens and then
//!    removes `n`: a frame larger than the burst still passes (the bucket goes into debt),
//!    and the debt is repaid before the next take, so the long-run rate is the set rate.
//! 3. Refill is piecewise over schedule boundaries: each stretch of time refills at the rate
//!    in force during it. A clock that steps back counts as no time passing.
//! 4. A blocked [`TokenBucket::take`] wakes on a rate change, a schedule change, or
//!    [`TokenBucket::wake_all`] (how a shipper cancels a take when its link dies).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tidemark_journal::{Clock, Nanos};

const NANOS_PER_SEC: i128 = 1_000_000_000;
const NANOS_PER_DAY: i128 = 86_400 * NANOS_PER_SEC;

/// What went wrong configuring a limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShapeError {
    /// A time of day out of range.
    #[error(
        "time of day {hours:02}:{minutes:02}:{seconds:02} is out of range (00:00:00 to 23:59:59)"
    )]
    TimeOfDay {
        /// Hours given.
        hours: u32,
        /// Minutes given.
        minutes: u32,
        /// Seconds given.
        seconds: u32,
    },
    /// A schedule window that starts where it ends.
    #[error("schedule window {index} is empty: it starts and ends at {at}")]
    EmptyWindow {
        /// Index of the window in the list.
        index: usize,
        /// Its start and end.
        at: TimeOfDay,
    },
    /// Two schedule windows overlap.
    #[error("schedule windows {first} and {second} overlap")]
    OverlappingWindows {
        /// Index of the first window.
        first: usize,
        /// Index of the second window.
        second: usize,
    },
    /// A UTC offset beyond a day.
    #[error("UTC offset {seconds} s is out of range (-86399 to 86399)")]
    UtcOffset {
        /// The offset given.
        seconds: i32,
    },
    /// A burst of zero bytes.
    #[error("token bucket burst is 0 bytes, expected at least 1")]
    ZeroBurst,
}

/// A byte rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rate {
    /// No limit.
    Unlimited,
    /// At most this many bytes per second; 0 pauses the traffic.
    BytesPerSec(u64),
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rate::Unlimited => f.write_str("unlimited"),
            Rate::BytesPerSec(r) => write!(f, "{r} B/s"),
        }
    }
}

/// A time of day, in seconds after midnight (0 to 86399).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimeOfDay(u32);

impl TimeOfDay {
    /// Midnight.
    pub const MIDNIGHT: TimeOfDay = TimeOfDay(0);

    /// `hours:minutes:seconds`.
    pub fn new(hours: u32, minutes: u32, seconds: u32) -> Result<Self, ShapeError> {
        if hours > 23 || minutes > 59 || seconds > 59 {
            return Err(ShapeError::TimeOfDay { hours, minutes, seconds });
        }
        Ok(Self(hours * 3600 + minutes * 60 + seconds))
    }

    /// `hours:minutes`.
    pub fn hm(hours: u32, minutes: u32) -> Result<Self, ShapeError> {
        Self::new(hours, minutes, 0)
    }

    /// Seconds after midnight.
    pub fn seconds(self) -> u32 {
        self.0
    }

    fn nanos(self) -> i128 {
        i128::from(self.0) * NANOS_PER_SEC
    }
}

impl fmt::Display for TimeOfDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}:{:02}:{:02}", self.0 / 3600, self.0 / 60 % 60, self.0 % 60)
    }
}

/// A daily window with its own rate: from `start` (included) to `end` (excluded); a window
/// whose end is before its start runs over midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    /// When the window opens.
    pub start: TimeOfDay,
    /// When it closes.
    pub end: TimeOfDay,
    /// The rate inside it.
    pub rate: Rate,
}

impl Window {
    /// The window as one or two half-open ranges of nanoseconds within a day.
    fn spans(&self) -> Vec<(i128, i128)> {
        let (s, e) = (self.start.nanos(), self.end.nanos());
        if s < e { vec![(s, e)] } else { vec![(s, NANOS_PER_DAY), (0, e)] }
    }
}

/// Daily windows that override a bucket's rate. Times of day are in the zone `utc_offset`
/// seconds east of UTC (a fixed offset: Tidemark carries no time-zone database, so a zone
/// with daylight saving needs its offset updated twice a year).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    windows: Vec<Window>,
    utc_offset: i32,
    /// Every window start and end, in nanoseconds after midnight, sorted, deduplicated.
    boundaries: Vec<i128>,
}

impl Schedule {
    /// A schedule of non-overlapping windows.
    pub fn new(windows: Vec<Window>, utc_offset_seconds: i32) -> Result<Self, ShapeError> {
        if utc_offset_seconds.unsigned_abs() >= 86_400 {
            return Err(ShapeError::UtcOffset { seconds: utc_offset_seconds });
        }
        for (index, w) in windows.iter().enumerate() {
            if w.start == w.end {
                return Err(ShapeError::EmptyWindow { index, at: w.start });
            }
        }
        for (i, a) in windows.iter().enumerate() {
            for (j, b) in windows.iter().enumerate().skip(i + 1) {
                let overlap = a
                    .spans()
                    .iter()
                    .any(|&(s1, e1)| b.spans().iter().any(|&(s2, e2)| s1 < e2 && s2 < e1));
                if overlap {
                    return Err(ShapeError::OverlappingWindows { first: i, second: j });
                }
            }
        }
        let mut boundaries: Vec<i128> =
            windows.iter().flat_map(|w| [w.start.nanos(), w.end.nanos()]).collect();
        boundaries.sort_unstable();
        boundaries.dedup();
        Ok(Self { windows, utc_offset: utc_offset_seconds, boundaries })
    }

    /// The windows.
    pub fn windows(&self) -> &[Window] {
        &self.windows
    }

    /// Local time of day of `at`, in nanoseconds after midnight.
    fn time_of_day(&self, at: i128) -> i128 {
        (at + i128::from(self.utc_offset) * NANOS_PER_SEC).rem_euclid(NANOS_PER_DAY)
    }

    /// The window open at `at` (nanoseconds since the epoch), if any.
    fn window_at(&self, at: i128) -> Option<&Window> {
        let tod = self.time_of_day(at);
        self.windows.iter().find(|w| w.spans().iter().any(|&(s, e)| s <= tod && tod < e))
    }

    /// The rate a window sets at `at`, if one is open.
    pub fn rate_at(&self, at: Nanos) -> Option<Rate> {
        self.window_at(i128::from(at.0)).map(|w| w.rate)
    }

    /// The first window boundary strictly after `at`.
    fn next_boundary(&self, at: i128) -> Option<i128> {
        let tod = self.time_of_day(at);
        let day_start = at - tod;
        match self.boundaries.iter().find(|&&b| b > tod) {
            Some(&b) => Some(day_start + b),
            None => self.boundaries.first().map(|&b| day_start + NANOS_PER_DAY + b),
        }
    }
}

/// How long a take must wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// The tokens will be there after this long, if nothing changes.
    For(Duration),
    /// Not within a day at the rates now set (the rate is 0): wait for a change.
    UntilRateChanges,
}

/// The state of a bucket, for status output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketStatus {
    /// The rate set with [`TokenBucket::set_rate`].
    pub base_rate: Rate,
    /// The rate in force now (a schedule window's, or the base rate).
    pub rate_now: Rate,
    /// The burst.
    pub burst: u64,
    /// Whole tokens (bytes) available now; negative while a large take's debt is repaid.
    pub tokens: i64,
    /// Bytes taken so far.
    pub taken: u64,
}

#[derive(Debug)]
struct BucketState {
    base_rate: Rate,
    burst: u64,
    schedule: Option<Schedule>,
    /// Tokens in bytes * 1e9.
    tokens: i128,
    /// When the tokens were last brought up to date (ns since the epoch).
    last: i128,
}

impl BucketState {
    fn burst_scaled(&self) -> i128 {
        i128::from(self.burst) * NANOS_PER_SEC
    }

    fn rate_at(&self, at: i128) -> Rate {
        self.schedule.as_ref().and_then(|s| s.window_at(at)).map_or(self.base_rate, |w| w.rate)
    }

    /// The end of the stretch of constant rate that contains `at`, capped at `limit`.
    fn stretch_end(&self, at: i128, limit: i128) -> i128 {
        self.schedule.as_ref().and_then(|s| s.next_boundary(at)).map_or(limit, |b| b.min(limit))
    }

    fn refill(&mut self, now: i128) {
        if now <= self.last {
            // A clock that stepped back counts as no time passing.
            self.last = now;
            return;
        }
        // Beyond a day every stretch of the schedule has had its turn; older time adds
        // nothing a full bucket could hold, whatever the rates (bounds the loop).
        let mut t = self.last.max(now - NANOS_PER_DAY);
        let burst = self.burst_scaled();
        while t < now && self.tokens < burst {
            let end = self.stretch_end(t, now);
            match self.rate_at(t) {
                Rate::Unlimited => self.tokens = burst,
                Rate::BytesPerSec(r) => {
                    self.tokens = (self.tokens + (end - t) * i128::from(r)).min(burst);
                }
            }
            t = end;
        }
        self.last = now;
    }

    /// How long until `need` tokens are there, simulating the schedule forward.
    fn time_until(&self, now: i128, need: i128) -> Wait {
        /// Stretches simulated before giving up and asking the waiter to look again.
        const MAX_STRETCHES: usize = 10_000;
        let mut t = now;
        let mut tokens = self.tokens;
        // The last time some tokens accrued: a day without any means the rates are 0.
        let mut last_accrual = now;
        for _ in 0..MAX_STRETCHES {
            let end = self.stretch_end(t, i128::MAX);
            match self.rate_at(t) {
                Rate::Unlimited => return Wait::For(nanos_to_duration(t - now)),
                Rate::BytesPerSec(0) => {
                    if end == i128::MAX || end - last_accrual > NANOS_PER_DAY {
                        return Wait::UntilRateChanges;
                    }
                }
                Rate::BytesPerSec(r) => {
                    let r = i128::from(r);
                    let dt = (need - tokens + r - 1) / r;
                    if dt <= end - t {
                        return Wait::For(nanos_to_duration(t + dt - now));
                    }
                    tokens += (end - t) * r;
                    last_accrual = end;
                }
            }
            t = end;
        }
        Wait::For(nanos_to_duration(t - now))
    }
}

fn nanos_to_duration(n: i128) -> Duration {
    Duration::from_nanos(u64::try_from(n.max(0)).unwrap_or(u64::MAX))
}

/// A token bucket (see the module documentation). Share it as an `Arc`: every method takes
/// `&self`, and changes are seen by takes already waiting.
pub struct TokenBucket {
    clock: Arc<dyn Clock>,
    state: Mutex<BucketState>,
    changed: Condvar,
    taken: AtomicU64,
}

impl fmt::Debug for TokenBucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenBucket").field("status", &self.status()).finish_non_exhaustive()
    }
}

impl TokenBucket {
    /// A bucket at `rate` holding at most `burst` bytes, full at the start.
    pub fn new(rate: Rate, burst: u64, clock: Arc<dyn Clock>) -> Result<Self, ShapeError> {
        if burst == 0 {
            return Err(ShapeError::ZeroBurst);
        }
        let now = i128::from(clock.now().0);
        Ok(Self {
            clock,
            state: Mutex::new(BucketState {
                base_rate: rate,
                burst,
                schedule: None,
                tokens: i128::from(burst) * NANOS_PER_SEC,
                last: now,
            }),
            changed: Condvar::new(),
            taken: AtomicU64::new(0),
        })
    }

    /// A bucket that never limits (a handle to tighten later).
    pub fn unlimited(clock: Arc<dyn Clock>) -> Self {
        Self::new(Rate::Unlimited, 4 << 20, clock).expect("a non-zero burst")
    }

    fn lock(&self) -> MutexGuard<'_, BucketState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> i128 {
        i128::from(self.clock.now().0)
    }

    /// Changes the base rate and the burst from now on; tokens already there stay (up to
    /// the new burst). Wakes waiting takes.
    pub fn set_rate(&self, rate: Rate, burst: u64) -> Result<(), ShapeError> {
        if burst == 0 {
            return Err(ShapeError::ZeroBurst);
        }
        let now = self.now();
        let mut s = self.lock();
        s.refill(now);
        s.base_rate = rate;
        s.burst = burst;
        s.tokens = s.tokens.min(s.burst_scaled());
        drop(s);
        self.changed.notify_all();
        Ok(())
    }

    /// Sets or clears the daily schedule. Wakes waiting takes.
    pub fn set_schedule(&self, schedule: Option<Schedule>) {
        let now = self.now();
        let mut s = self.lock();
        s.refill(now);
        s.schedule = schedule;
        drop(s);
        self.changed.notify_all();
    }

    /// The rate in force now.
    pub fn rate_now(&self) -> Rate {
        let now = self.now();
        self.lock().rate_at(now)
    }

    /// Takes `n` bytes' worth of tokens if they are there now; otherwise takes nothing and
    /// says how long to wait.
    pub fn try_take(&self, n: u64) -> Result<(), Wait> {
        let now = self.now();
        let mut s = self.lock();
        self.try_take_locked(&mut s, now, n)
    }

    fn try_take_locked(&self, s: &mut BucketState, now: i128, n: u64) -> Result<(), Wait> {
        s.refill(now);
        if s.rate_at(now) == Rate::Unlimited {
            self.taken.fetch_add(n, Ordering::Relaxed);
            return Ok(());
        }
        let need = i128::from(n.min(s.burst)) * NANOS_PER_SEC;
        if s.tokens >= need {
            s.tokens -= i128::from(n) * NANOS_PER_SEC;
            self.taken.fetch_add(n, Ordering::Relaxed);
            return Ok(());
        }
        Err(s.time_until(now, need))
    }

    /// Takes `n` bytes' worth of tokens, waiting as long as needed. Returns false without
    /// taking anything if `cancelled` becomes true; whoever makes it true must then call
    /// [`TokenBucket::wake_all`] (`cancelled` is checked under the bucket's lock, so that
    /// wake-up is never missed).
    pub fn take(&self, n: u64, cancelled: &dyn Fn() -> bool) -> bool {
        let mut s = self.lock();
        loop {
            if cancelled() {
                return false;
            }
            let now = self.now();
            match self.try_take_locked(&mut s, now, n) {
                Ok(()) => return true,
                Err(Wait::For(d)) => {
                    s = self.changed.wait_timeout(s, d).unwrap_or_else(|e| e.into_inner()).0;
                }
                Err(Wait::UntilRateChanges) => {
                    s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
                }
            }
        }
    }

    /// Wakes every waiting take so it re-checks its cancellation and the clock.
    pub fn wake_all(&self) {
        let _s = self.lock();
        self.changed.notify_all();
    }

    /// The bucket's state now.
    pub fn status(&self) -> BucketStatus {
        let now = self.now();
        let mut s = self.lock();
        s.refill(now);
        BucketStatus {
            base_rate: s.base_rate,
            rate_now: s.rate_at(now),
            burst: s.burst,
            tokens: i64::try_from(s.tokens.div_euclid(NANOS_PER_SEC)).unwrap_or(i64::MIN),
            taken: self.taken.load(Ordering::Relaxed),
        }
    }
}

/// A cap on concurrent resyncs: a counting semaphore whose limit can change at run time.
/// Lowering the limit revokes nothing: running resyncs finish, and new ones wait until
/// fewer than the new limit run.
#[derive(Debug)]
pub struct ResyncSlots {
    state: Mutex<(usize, usize)>,
    changed: Condvar,
}

/// A running resync's slot; released on drop.
#[derive(Debug)]
pub struct ResyncPermit {
    slots: Arc<ResyncSlots>,
}

impl Drop for ResyncPermit {
    fn drop(&mut self) {
        let mut s = self.slots.lock();
        s.1 -= 1;
        drop(s);
        self.slots.changed.notify_all();
    }
}

impl ResyncSlots {
    /// At most `limit` resyncs at once.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self { state: Mutex::new((limit, 0)), changed: Condvar::new() })
    }

    fn lock(&self) -> MutexGuard<'_, (usize, usize)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot if one is free now.
    pub fn try_acquire(self: &Arc<Self>) -> Option<ResyncPermit> {
        let mut s = self.lock();
        if s.1 < s.0 {
            s.1 += 1;
            Some(ResyncPermit { slots: self.clone() })
        } else {
            None
        }
    }

    /// A slot, waiting up to `timeout` for one (`None`: as long as it takes).
    pub fn acquire(self: &Arc<Self>, timeout: Option<Duration>) -> Option<ResyncPermit> {
        let until = timeout.map(|t| std::time::Instant::now() + t);
        let mut s = self.lock();
        while s.1 >= s.0 {
            s = match until {
                None => self.changed.wait(s).unwrap_or_else(|e| e.into_inner()),
                Some(at) => {
                    let left = at.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    self.changed.wait_timeout(s, left).unwrap_or_else(|e| e.into_inner()).0
                }
            };
        }
        s.1 += 1;
        Some(ResyncPermit { slots: self.clone() })
    }

    /// Changes the limit; wakes waiters if it grew.
    pub fn set_limit(&self, limit: usize) {
        self.lock().0 = limit;
        self.changed.notify_all();
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.lock().0
    }

    /// Slots in use.
    pub fn in_use(&self) -> usize {
        self.lock().1
    }
}
