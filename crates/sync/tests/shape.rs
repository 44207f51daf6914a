//! The bandwidth limit and the resync cap, on a manual clock: exact token counts and waits,
//! rate changes at run time, daily schedule windows (over midnight, with a UTC offset,
//! refilled piecewise across their boundaries), and waiters woken by changes, never by time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Duration;

use tidemark_journal::{ManualClock, Nanos};
use tidemark_sync::shape::{
    Rate, ResyncSlots, Schedule, ShapeError, TimeOfDay, TokenBucket, Wait, Window,
};

const PATIENCE: Duration = Duration::from_secs(30);
/// Midnight UTC of some day.
const DAY: u64 = 1_700_006_400 * 1_000_000_000;
const HOUR: u64 = 3600 * 1_000_000_000;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn clock_at(nanos: u64) -> Arc<ManualClock> {
    Arc::new(ManualClock::new(Nanos(nanos)))
}

#[test]
fn tokens_refill_at_the_rate_up_to_the_burst_exactly() {
    let clock = clock_at(DAY);
    let bucket = TokenBucket::new(Rate::BytesPerSec(1000), 500, clock.clone()).unwrap();
    assert_eq!(bucket.status().tokens, 500, "a new bucket is full");
    assert_eq!(bucket.try_take(300), Ok(()));
    assert_eq!(bucket.try_take(300), Err(Wait::For(ms(100))), "100 bytes short at 1000 B/s");
    clock.advance(ms(99));
    assert_eq!(bucket.try_take(300), Err(Wait::For(ms(1))));
    clock.advance(ms(1));
    assert_eq!(bucket.try_take(300), Ok(()));
    assert_eq!(bucket.status().tokens, 0);
    clock.advance(Duration::from_secs(10));
    assert_eq!(bucket.status().tokens, 500, "never above the burst");

    // A take larger than the burst needs a full bucket, then leaves a debt.
    assert_eq!(bucket.try_take(2000), Ok(()));
    assert_eq!(bucket.status().tokens, -1500);
    assert_eq!(bucket.try_take(1), Err(Wait::For(ms(1501))));
    clock.advance(ms(1500));
    assert_eq!(bucket.try_take(1), Err(Wait::For(ms(1))));
    assert_eq!(bucket.status().taken, 2600);

    // Waits round up to the nanosecond: 1 byte at 3 B/s.
    let bucket = TokenBucket::new(Rate::BytesPerSec(3), 1, clock.clone()).unwrap();
    assert_eq!(bucket.try_take(1), Ok(()));
    assert_eq!(bucket.try_take(1), Err(Wait::For(Duration::from_nanos(333_333_334))));
    clock.advance(Duration::from_nanos(333_333_333));
    assert_eq!(bucket.try_take(1), Err(Wait::For(Duration::from_nanos(1))));
    clock.advance(Duration::from_nanos(1));
    assert_eq!(bucket.try_take(1), Ok(()));
    assert_eq!(TokenBucket::new(Rate::Unlimited, 0, clock).unwrap_err(), ShapeError::ZeroBurst);
}

#[test]
fn the_rate_changes_at_run_time() {
    let clock = clock_at(DAY);
    let bucket = TokenBucket::new(Rate::BytesPerSec(1000), 10_000, clock.clone()).unwrap();
    assert_eq!(bucket.try_take(10_000), Ok(()));
    clock.advance(Duration::from_secs(1));
    bucket.set_rate(Rate::BytesPerSec(100), 10_000).unwrap();
    assert_eq!(bucket.status().tokens, 1000, "the second before the change ran at 1000 B/s");
    clock.advance(Duration::from_secs(1));
    assert_eq!(bucket.status().tokens, 1100, "the second after it at 100 B/s");
    bucket.set_rate(Rate::BytesPerSec(100), 500).unwrap();
    assert_eq!(bucket.status().tokens, 500, "a smaller burst caps what is there");

    bucket.set_rate(Rate::Unlimited, 500).unwrap();
    assert_eq!(bucket.try_take(1 << 30), Ok(()), "unlimited takes anything");
    assert_eq!(bucket.rate_now(), Rate::Unlimited);

    bucket.set_rate(Rate::BytesPerSec(0), 500).unwrap();
    assert_eq!(bucket.try_take(600), Ok(()), "the tokens left still spend");
    assert_eq!(bucket.try_take(1), Err(Wait::UntilRateChanges), "rate 0 pauses");
    clock.advance(Duration::from_secs(3600));
    assert_eq!(bucket.try_take(1), Err(Wait::UntilRateChanges));
    let s = bucket.status();
    assert_eq!(
        (s.base_rate, s.rate_now, s.burst, s.tokens),
        (Rate::BytesPerSec(0), Rate::BytesPerSec(0), 500, -100)
    );
}

#[test]
fn a_blocked_take_wakes_on_a_rate_change_or_a_cancellation() {
    let clock = clock_at(DAY);
    let bucket = Arc::new(TokenBucket::new(Rate::BytesPerSec(0), 10, clock).unwrap());
    assert_eq!(bucket.try_take(10), Ok(()));

    let (tx, rx) = mpsc::channel();
    let b = bucket.clone();
    let waiter = thread::spawn(move || tx.send(b.take(5, &|| false)).unwrap());
    bucket.set_rate(Rate::Unlimited, 10).unwrap();
    assert_eq!(rx.recv_timeout(PATIENCE), Ok(true));
    waiter.join().unwrap();

    bucket.set_rate(Rate::BytesPerSec(0), 10).unwrap();
    let cancelled = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let (b, c) = (bucket.clone(), cancelled.clone());
    let waiter = thread::spawn(move || tx.send(b.take(5, &|| c.load(Ordering::SeqCst))).unwrap());
    cancelled.store(true, Ordering::SeqCst);
    bucket.wake_all();
    assert_eq!(rx.recv_timeout(PATIENCE), Ok(false), "a cancelled take takes nothing");
    waiter.join().unwrap();
    assert_eq!(bucket.status().taken, 15);
}

fn window(start: (u32, u32), end: (u32, u32), rate: Rate) -> Window {
    Window {
        start: TimeOfDay::hm(start.0, start.1).unwrap(),
        end: TimeOfDay::hm(end.0, end.1).unwrap(),
        rate,
    }
}

fn office_hours_and_a_night_pause(utc_offset: i32) -> Schedule {
    Schedule::new(
        vec![
            window((8, 0), (18, 0), Rate::BytesPerSec(100)),
            window((22, 0), (2, 0), Rate::BytesPerSec(0)),
        ],
        utc_offset,
    )
    .unwrap()
}

#[test]
fn schedule_windows_cover_their_hours_and_wrap_over_midnight() {
    let s = office_hours_and_a_night_pause(0);
    let at = |h: u64, m: u64, sec: u64| Nanos(DAY + h * HOUR + (m * 60 + sec) * 1_000_000_000);
    assert_eq!(s.rate_at(at(7, 59, 59)), None);
    assert_eq!(s.rate_at(at(8, 0, 0)), Some(Rate::BytesPerSec(100)));
    assert_eq!(s.rate_at(at(17, 59, 59)), Some(Rate::BytesPerSec(100)));
    assert_eq!(s.rate_at(at(18, 0, 0)), None);
    assert_eq!(s.rate_at(at(22, 0, 0)), Some(Rate::BytesPerSec(0)));
    assert_eq!(s.rate_at(at(1, 59, 59)), Some(Rate::BytesPerSec(0)));
    assert_eq!(s.rate_at(at(2, 0, 0)), None);
    // One hour east of UTC: 07:30 UTC is 08:30 there.
    let east = office_hours_and_a_night_pause(3600);
    assert_eq!(east.rate_at(at(7, 30, 0)), Some(Rate::BytesPerSec(100)));
    assert_eq!(east.rate_at(at(17, 30, 0)), None);

    let overlap = Schedule::new(
        vec![window((8, 0), (18, 0), Rate::Unlimited), window((17, 0), (19, 0), Rate::Unlimited)],
        0,
    );
    assert_eq!(overlap.unwrap_err(), ShapeError::OverlappingWindows { first: 0, second: 1 });
    let over_midnight = Schedule::new(
        vec![window((22, 0), (2, 0), Rate::Unlimited), window((1, 0), (3, 0), Rate::Unlimited)],
        0,
    );
    assert!(matches!(over_midnight, Err(ShapeError::OverlappingWindows { .. })));
    let empty = Schedule::new(vec![window((5, 0), (5, 0), Rate::Unlimited)], 0);
    assert!(matches!(empty, Err(ShapeError::EmptyWindow { index: 0, .. })));
    assert!(TimeOfDay::hm(24, 0).is_err());
    assert!(Schedule::new(vec![], 86_400).is_err());
}

#[test]
fn the_bucket_follows_the_schedule_piecewise() {
    // 07:59:50: ten seconds at the base rate, then ten inside the 100 B/s window.
    let clock = clock_at(DAY + 8 * HOUR - 10_000_000_000);
    let bucket = TokenBucket::new(Rate::BytesPerSec(1000), 1_000_000, clock.clone()).unwrap();
    assert_eq!(bucket.try_take(1_000_000), Ok(()));
    bucket.set_schedule(Some(office_hours_and_a_night_pause(0)));
    assert_eq!(bucket.rate_now(), Rate::BytesPerSec(1000));
    clock.advance(Duration::from_secs(20));
    assert_eq!(bucket.status().tokens, 10 * 1000 + 10 * 100);
    assert_eq!(bucket.rate_now(), Rate::BytesPerSec(100));

    // 21:59:59 with an empty bucket: one second at 1000 B/s, the pause until 02:00, and
    // one more second at 1000 B/s.
    clock.set(Nanos(DAY + 22 * HOUR - 1_000_000_000));
    let tokens = bucket.status().tokens as u64;
    assert_eq!(bucket.try_take(tokens), Ok(()));
    assert_eq!(bucket.try_take(2000), Err(Wait::For(Duration::from_secs(4 * 3600 + 2))));
    clock.advance(Duration::from_secs(4 * 3600 + 2));
    assert_eq!(bucket.try_take(2000), Ok(()));

    // Off again: the base rate applies at all hours.
    bucket.set_schedule(None);
    clock.set(Nanos(DAY + 23 * HOUR));
    assert_eq!(bucket.rate_now(), Rate::BytesPerSec(1000));
}

#[test]
fn resync_slots_cap_concurrent_resyncs_and_the_cap_changes_at_run_time() {
    let slots = ResyncSlots::new(2);
    let a = slots.try_acquire().expect("slot 1");
    let b = slots.try_acquire().expect("slot 2");
    assert!(slots.try_acquire().is_none(), "the cap holds");
    assert!(slots.acquire(Some(Duration::ZERO)).is_none());
    slots.set_limit(3);
    let c = slots.try_acquire().expect("a raised cap frees a slot");
    assert_eq!(slots.in_use(), 3);
    drop(a);
    slots.set_limit(1);
    assert_eq!(slots.in_use(), 2, "a lowered cap revokes nothing");
    assert!(slots.try_acquire().is_none());

    let (tx, rx) = mpsc::channel();
    let s = slots.clone();
    let waiter = thread::spawn(move || {
        let permit = s.acquire(None).expect("waits as long as it takes");
        tx.send(()).unwrap();
        drop(permit);
    });
    drop(b);
    drop(c);
    rx.recv_timeout(PATIENCE).expect("woken when the running resyncs end");
    waiter.join().unwrap();
    assert_eq!((slots.in_use(), slots.limit()), (0, 1));
}
