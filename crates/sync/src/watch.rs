//! A watched value: a status behind a mutex with a condition variable, so that a caller
//! can take a snapshot or wait until a predicate holds, and every update wakes the waiters.
//! The shipper, the receiver and the pair controller keep their status in one.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A value that can be read, updated and waited on.
#[derive(Debug, Default)]
pub struct Watch<T> {
    value: Mutex<T>,
    changed: Condvar,
}

impl<T: Clone> Watch<T> {
    /// A watch holding `value`.
    pub fn new(value: T) -> Self {
        Self { value: Mutex::new(value), changed: Condvar::new() }
    }

    /// The value, locked. Waiters are not woken by changes made through it: call
    /// [`Watch::notify`] after, or use [`Watch::update`].
    pub fn lock(&self) -> MutexGuard<'_, T> {
        // Every update is a complete assignment, so a panic elsewhere leaves it usable.
        self.value.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A snapshot.
    pub fn get(&self) -> T {
        self.lock().clone()
    }

    /// Changes the value and wakes every waiter.
    pub fn update<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        let r = f(&mut self.lock());
        self.changed.notify_all();
        r
    }

    /// Wakes every waiter (after a change made through [`Watch::lock`], or for a waiter
    /// whose predicate looks at something else too).
    pub fn notify(&self) {
        drop(self.lock());
        self.changed.notify_all();
    }

    /// Waits until `pred` holds for the value, or `timeout` passes; returns the value that
    /// satisfied it, or `None` on timeout.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&T) -> bool) -> Option<T> {
        let until = Instant::now() + timeout;
        let mut v = self.lock();
        loop {
            if pred(&v) {
                return Some(v.clone());
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            v = self.changed.wait_timeout(v, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_waiter_sees_the_update_that_satisfies_it_and_times_out_otherwise() {
        let w = Arc::new(Watch::new(0u64));
        let w2 = w.clone();
        let t = std::thread::spawn(move || w2.wait_for(Duration::from_secs(30), |v| *v >= 3));
        for _ in 0..3 {
            w.update(|v| *v += 1);
        }
        assert_eq!(t.join().unwrap(), Some(3));
        assert_eq!(w.wait_for(Duration::from_millis(10), |v| *v > 3), None);
        assert_eq!(w.get(), 3);
    }
}
