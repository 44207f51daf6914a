//! The write gate of a [`crate::Tap`]: a *hold* stops the admission of new mutations for a
//! bounded time (its lease), so that a coordinator can cut one bookmark across the taps of
//! a consistency group (`docs/consistency-groups.md`).
//!
//! While a hold is in force, [`crate::Tap::begin_mutation`] (hence every write, write-zeroes
//! and discard of every frontend) waits at the gate before it does anything else; mutations
//! already begun finish as usual; reads, flushes, bookmarks and resync copies are not held.
//! A hold ends when it is released, or by itself when its lease runs out: a coordinator that
//! dies or hangs never freezes the volume for longer than the lease. Nothing runs a timer:
//! the waiting writers wake at the lease's end and let themselves through, and so does any
//! later one.
//!
//! Invariant: a bookmark appended through [`WriteGate::while_held`] is appended while the
//! hold it names is in force, with no mutation admitted between the start of that hold and
//! the append (the gate's lock is held across the check and the append, and an expired
//! lease is noticed only under that lock).
//!
//! Lock order: the gate's lock, then the tap's capture lock (and the spool's).

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The longest lease a hold may have.
pub const MAX_HOLD_LEASE: Duration = Duration::from_secs(60);

/// A hold in force, as [`crate::Tap::hold_writes`] granted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteHold {
    /// Names the hold in [`crate::Tap::release_writes`] and [`crate::Tap::bookmark_held`].
    pub token: u64,
    /// The lease it was granted.
    pub lease: Duration,
}

/// Why the gate refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldRefusal {
    /// Another hold is in force (one coordinator at a time).
    Busy {
        /// Its token.
        token: u64,
        /// What is left of its lease.
        left: Duration,
    },
    /// The named hold is not in force: its lease ran out, it was released, or it never was.
    NotHeld {
        /// The token asked for.
        token: u64,
        /// Whether that hold existed and ended by its lease.
        expired: bool,
    },
    /// A lease of zero or above [`MAX_HOLD_LEASE`].
    BadLease(Duration),
}

impl std::fmt::Display for HoldRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Busy { token, left } => write!(
                f,
                "writes are already held (hold {token}, {:.1} s of its lease left): one group \
                 bookmark at a time",
                left.as_secs_f64()
            ),
            Self::NotHeld { token, expired: true } => write!(
                f,
                "hold {token} is no longer in force: its lease ran out and writes resumed"
            ),
            Self::NotHeld { token, expired: false } => {
                write!(f, "hold {token} is not in force (released, or never granted)")
            }
            Self::BadLease(d) => write!(
                f,
                "hold lease {:.3} s: expected more than 0 and at most {} s",
                d.as_secs_f64(),
                MAX_HOLD_LEASE.as_secs()
            ),
        }
    }
}

impl std::error::Error for HoldRefusal {}

/// The gate's counters and its hold in force.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HoldStatus {
    /// The hold in force: its token and what is left of its lease.
    pub active: Option<(u64, Duration)>,
    /// Mutations waiting at the gate now.
    pub waiting: u64,
    /// Holds granted since the tap started.
    pub granted: u64,
    /// Holds that ended by their lease rather than a release.
    pub expired: u64,
    /// Mutations that waited at the gate, in total.
    pub waited: u64,
}

#[derive(Debug, Default)]
struct State {
    /// `(token, end of lease)` of the hold in force (possibly run out, not noticed yet).
    hold: Option<(u64, Instant)>,
    /// The last hold that ended by its lease.
    last_expired: Option<u64>,
    next_token: u64,
    waiting: u64,
    granted: u64,
    expired: u64,
    waited: u64,
}

impl State {
    /// Ends the hold in force if its lease ran out; true when one is still in force.
    fn check(&mut self, now: Instant) -> bool {
        match self.hold {
            Some((token, until)) if now >= until => {
                self.hold = None;
                self.expired += 1;
                self.last_expired = Some(token);
                tracing::warn!(token, "write hold lease ran out: writes resume");
                false
            }
            Some(_) => true,
            None => false,
        }
    }
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct WriteGate {
    state: Mutex<State>,
    changed: Condvar,
}

impl WriteGate {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits while a hold is in force (at most until its lease runs out).
    pub(crate) fn pass(&self) {
        let mut s = self.lock();
        let mut counted = false;
        loop {
            let now = Instant::now();
            if !s.check(now) {
                break;
            }
            let until = s.hold.map(|h| h.1).unwrap_or(now);
            if !counted {
                counted = true;
                s.waiting += 1;
                s.waited += 1;
            }
            s = self.changed.wait_timeout(s, until - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        if counted {
            s.waiting -= 1;
        }
    }

    /// Starts a hold of `lease`; refused while another is in force.
    pub(crate) fn hold(&self, lease: Duration) -> Result<WriteHold, HoldRefusal> {
        if lease.is_zero() || lease > MAX_HOLD_LEASE {
            return Err(HoldRefusal::BadLease(lease));
        }
        let mut s = self.lock();
        let now = Instant::now();
        if s.check(now) {
            let (token, until) = s.hold.expect("checked");
            return Err(HoldRefusal::Busy { token, left: until - now });
        }
        s.next_token += 1;
        let token = s.next_token;
        s.hold = Some((token, now + lease));
        s.granted += 1;
        tracing::info!(token, lease_ms = lease.as_millis() as u64, "writes held");
        Ok(WriteHold { token, lease })
    }

    /// Ends hold `token`; refused when it is not in force (its lease ran out, or it was
    /// released already).
    pub(crate) fn release(&self, token: u64) -> Result<(), HoldRefusal> {
        let mut s = self.lock();
        let in_force = s.check(Instant::now());
        match s.hold {
            Some((t, _)) if in_force && t == token => {
                s.hold = None;
                drop(s);
                self.changed.notify_all();
                tracing::info!(token, "writes released");
                Ok(())
            }
            _ => Err(HoldRefusal::NotHeld { token, expired: s.last_expired == Some(token) }),
        }
    }

    /// Runs `f` while hold `token` is in force, with the gate locked (no mutation can be
    /// admitted, and the lease cannot be found run out, until `f` returns).
    pub(crate) fn while_held<R>(
        &self,
        token: u64,
        f: impl FnOnce() -> R,
    ) -> Result<R, HoldRefusal> {
        let mut s = self.lock();
        let in_force = s.check(Instant::now());
        match s.hold {
            Some((t, _)) if in_force && t == token => Ok(f()),
            _ => Err(HoldRefusal::NotHeld { token, expired: s.last_expired == Some(token) }),
        }
    }

    /// The hold in force and the counters.
    pub(crate) fn status(&self) -> HoldStatus {
        let mut s = self.lock();
        let now = Instant::now();
        s.check(now);
        HoldStatus {
            active: s.hold.map(|(t, until)| (t, until.saturating_duration_since(now))),
            waiting: s.waiting,
            granted: s.granted,
            expired: s.expired,
            waited: s.waited,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn a_hold_blocks_until_released_and_one_at_a_time() {
        let gate = Arc::new(WriteGate::default());
        let h = gate.hold(Duration::from_secs(30)).unwrap();
        assert!(matches!(gate.hold(Duration::from_secs(1)), Err(HoldRefusal::Busy { .. })));
        let passed = Arc::new(AtomicBool::new(false));
        let t = {
            let (gate, passed) = (gate.clone(), passed.clone());
            std::thread::spawn(move || {
                gate.pass();
                passed.store(true, Ordering::SeqCst);
            })
        };
        let until = Instant::now() + Duration::from_secs(10);
        while gate.status().waiting == 0 {
            assert!(Instant::now() < until, "the writer never reached the gate");
            std::thread::yield_now();
        }
        assert!(!passed.load(Ordering::SeqCst), "a writer passed a hold in force");
        assert_eq!(gate.while_held(h.token, || 7), Ok(7));
        gate.release(h.token).unwrap();
        t.join().unwrap();
        assert!(passed.load(Ordering::SeqCst));
        let st = gate.status();
        assert_eq!((st.active, st.granted, st.expired, st.waited), (None, 1, 0, 1));
        assert_eq!(
            gate.release(h.token),
            Err(HoldRefusal::NotHeld { token: h.token, expired: false })
        );
    }

    #[test]
    fn a_lease_ends_the_hold_by_itself() {
        let gate = Arc::new(WriteGate::default());
        let lease = Duration::from_millis(200);
        let started = Instant::now();
        let h = gate.hold(lease).unwrap();
        gate.pass(); // waits for the lease, then lets itself through
        assert!(started.elapsed() >= lease, "passed after {:?}", started.elapsed());
        assert_eq!(
            gate.while_held(h.token, || ()),
            Err(HoldRefusal::NotHeld { token: h.token, expired: true })
        );
        assert_eq!(gate.status().expired, 1);
        // A new hold may start now.
        gate.hold(lease).unwrap();
        assert!(matches!(gate.hold(Duration::ZERO), Err(HoldRefusal::BadLease(_))));
        assert!(matches!(gate.hold(MAX_HOLD_LEASE * 2), Err(HoldRefusal::BadLease(_))));
    }
}
