//! Crash tests: every prefix of unsynced bytes a power cut could leave, torn sectors inside
//! records, and a real child process killed with SIGKILL while it appends with group commit.
//! After each, the journal reopens with every durable record and nothing invented.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use tidemark_journal::{
    CrashMode, Event, FsDir, JournalKey, ManualClock, MemDir, Nanos, Seq, Spool, SpoolConfig,
    VolumeId,
};

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(Nanos(1_700_000_000 * Nanos::SECOND)))
}

/// The event with sequence number `seq`: content is a function of `seq` alone, so a
/// reader can tell a genuine record from an invented one.
fn event_for(seq: u64) -> Event {
    match seq % 7 {
        3 => Event::Barrier,
        5 => Event::WriteZeroes { volume: VolumeId(0), offset: seq * 512, len: 4096 },
        _ => {
            let len = 512 * (1 + (seq % 9) as usize);
            let data: Vec<u8> = (0..len).map(|i| (seq as usize * 31 + i * 7) as u8).collect();
            Event::Write {
                volume: VolumeId((seq % 3) as u16),
                offset: seq * 4096,
                data: Bytes::from(data),
            }
        }
    }
}

fn cfg(key: Option<JournalKey>) -> SpoolConfig {
    SpoolConfig { capacity_bytes: 1 << 30, segment_bytes: 64 << 10, key }
}

fn check_spool(spool: &Spool, durable: u64, upper: u64) -> u64 {
    let got = spool.read_after(Seq(0), u64::MAX).expect("read spool");
    for (i, e) in got.iter().enumerate() {
        assert_eq!(e.seq, Seq(i as u64 + 1), "records are contiguous from 1");
        assert_eq!(e.event, event_for(e.seq.0), "record {} is genuine", e.seq);
    }
    let n = got.len() as u64;
    assert!(n >= durable, "durable record lost: have {n}, {durable} were durable");
    assert!(n <= upper, "invented records: have {n}, only {upper} were appended");
    n
}

#[test]
fn every_unsynced_prefix_recovers_exactly() {
    for key in [None, Some(JournalKey::from_bytes([9; 32]))] {
        let dir = MemDir::new();
        let (mut spool, _) =
            Spool::open(Arc::new(dir.clone()), cfg(key.clone()), clock()).expect("open");
        for s in 1..=60u64 {
            assert_eq!(spool.append(&event_for(s)).expect("append"), Seq(s));
        }
        assert_eq!(spool.sync().expect("sync").0, 60);
        for s in 61..=66u64 {
            spool.append(&event_for(s)).expect("append");
        }
        spool.flush().expect("flush");
        // A segment roll on the way syncs what came before it.
        let durable = spool.durable_seq().0;
        // The newest segment's unsynced bytes: every prefix of them is a possible crash.
        let newest = dir.list_segments().pop().expect("segment");
        let unsynced = dir.unsynced_bytes(&newest);
        assert!(unsynced > 0);
        let mut outcomes = std::collections::BTreeSet::new();
        for n in 0..=unsynced {
            let crashed = dir.crash(CrashMode::KeepUnsyncedPrefix(n));
            let (spool, report) = Spool::open(Arc::new(crashed), cfg(key.clone()), clock())
                .expect("reopen after crash");
            assert!(report.defects.is_empty(), "a torn tail is not damage: {:?}", report.defects);
            outcomes.insert(check_spool(&spool, durable, 66));
        }
        let expect: std::collections::BTreeSet<u64> = (durable..=66).collect();
        assert_eq!(outcomes, expect, "each unsynced record appears exactly at its own prefix");
    }
}

#[test]
fn torn_sector_inside_a_record_is_reported_and_skipped() {
    let dir = MemDir::new();
    let (mut spool, _) = Spool::open(Arc::new(dir.clone()), cfg(None), clock()).expect("open");
    for s in 1..=300u64 {
        spool.append(&event_for(s)).expect("append");
    }
    spool.sync().expect("sync");
    drop(spool);
    let segs = dir.list_segments();
    assert!(segs.len() > 2);
    // A sector of garbage in the middle of the first segment.
    let victim = &segs[0];
    let mut bytes = dir.read_file(victim).expect("segment");
    let at = bytes.len() / 2 / 512 * 512;
    for b in &mut bytes[at..at + 512] {
        *b = 0xA5;
    }
    dir.write_file(victim, bytes);
    let (spool, report) = Spool::open(Arc::new(dir.clone()), cfg(None), clock()).expect("reopen");
    assert_eq!(report.defects.len(), 1, "one damaged stretch: {:?}", report.defects);
    let (seg, defect) = &report.defects[0];
    assert_eq!(seg, victim);
    assert!(defect.offset <= at as u64 && defect.offset + defect.len >= at as u64 + 512);
    assert!(report.truncated_tail.is_none());
    // Every other record is still there and genuine.
    let got = spool.read_after(Seq(0), u64::MAX).expect("read");
    let lost = 300 - got.len() as u64;
    assert!((1..=2).contains(&lost), "only the records the sector touched are lost: {lost}");
    for e in &got {
        assert_eq!(e.event, event_for(e.seq.0));
    }
    assert_eq!(got.last().expect("records").seq, Seq(300));
}

#[test]
fn torn_sector_in_the_newest_record_is_a_torn_tail() {
    let dir = MemDir::new();
    let (mut spool, _) = Spool::open(Arc::new(dir.clone()), cfg(None), clock()).expect("open");
    for s in 1..=20u64 {
        spool.append(&event_for(s)).expect("append");
    }
    spool.sync().expect("sync");
    drop(spool);
    let newest = dir.list_segments().pop().expect("segment");
    let mut bytes = dir.read_file(&newest).expect("segment");
    let n = bytes.len();
    bytes[n - 100] ^= 0xFF;
    dir.write_file(&newest, bytes);
    let (spool, report) = Spool::open(Arc::new(dir.clone()), cfg(None), clock()).expect("reopen");
    assert!(report.truncated_tail.is_some());
    assert_eq!(check_spool(&spool, 19, 19), 19);
}

const CHILD_ENV: &str = "TIDEMARK_CRASH_CHILD_DIR";

/// Child side: append forever with group commit, printing each durable point.
fn child_append(dir: &str) -> ! {
    let (mut spool, _) = Spool::open(Arc::new(FsDir::new(dir).expect("dir")), cfg(None), clock())
        .expect("child open");
    let mut next = spool.last_seq().0 + 1;
    let mut last_sync = Instant::now();
    loop {
        spool.append(&event_for(next)).expect("child append");
        next += 1;
        if last_sync.elapsed() >= Duration::from_millis(1) || next % 64 == 0 {
            let d = spool.sync().expect("child sync");
            println!("durable {}", d.0);
            last_sync = Instant::now();
        }
    }
}

#[test]
fn sigkill_during_group_commit_loses_no_durable_record() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child_append(&dir);
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let seed: u64 = rand::random();
    eprintln!("sigkill test seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut durable_max = 0u64;
    for round in 0..6 {
        let mut child = Command::new(std::env::current_exe().expect("exe"))
            .args([
                "sigkill_during_group_commit_loses_no_durable_record",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, tmp.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        // Wait until the child reports progress, then kill it at a random moment.
        let want = rng.gen_range(5..200);
        let mut seen = 0;
        for line in lines.by_ref() {
            let line = line.expect("line");
            if let Some(d) = line.strip_prefix("durable ") {
                durable_max = durable_max.max(d.parse().expect("number"));
                seen += 1;
                if seen >= want {
                    break;
                }
            }
        }
        child.kill().expect("SIGKILL child");
        // Durable points printed before the kill landed count too.
        for line in lines {
            if let Some(d) = line.expect("line").strip_prefix("durable ") {
                durable_max = durable_max.max(d.parse().expect("number"));
            }
        }
        child.wait().expect("reap");
        let (spool, report) =
            Spool::open(Arc::new(FsDir::new(tmp.path()).expect("dir")), cfg(None), clock())
                .expect("reopen");
        assert!(report.defects.is_empty(), "round {round}: {:?}", report.defects);
        let n = check_spool(&spool, durable_max, u64::MAX);
        eprintln!("round {round}: {n} records after SIGKILL, {durable_max} reported durable");
    }
    assert!(durable_max > 0, "the child made progress");
}

#[test]
fn concurrent_group_commit_keeps_every_reported_durable_record() {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let dir = MemDir::new();
    let (spool, _) = Spool::open(Arc::new(dir.clone()), cfg(None), clock()).expect("open");
    let spool = Arc::new(Mutex::new(spool));
    let stop = Arc::new(AtomicBool::new(false));
    let reported = Arc::new(AtomicU64::new(0));
    let committer = {
        let (spool, stop, reported) = (spool.clone(), stop.clone(), reported.clone());
        std::thread::spawn(move || {
            let mut commits = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let ticket = spool.lock().unwrap().begin_sync().expect("begin");
                // The disk wait happens without the lock: appends go on meanwhile.
                let outcome = ticket.wait();
                let d = spool.lock().unwrap().end_sync(outcome).expect("end");
                reported.fetch_max(d.0, Ordering::SeqCst);
                commits += 1;
            }
            commits
        })
    };
    for s in 1..=3000u64 {
        let event = event_for(s);
        assert_eq!(spool.lock().unwrap().append(&event).expect("append"), Seq(s));
        if s % 500 == 0 {
            // Let the committer catch up now and then, so that several commits run
            // whatever the scheduler does (each covers what was appended before it).
            let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while reported.load(Ordering::SeqCst) < s {
                assert!(std::time::Instant::now() < until, "no group commit reached seq {s}");
                std::thread::yield_now();
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    let commits = committer.join().expect("committer");
    assert!(commits >= 6, "several group commits ran: {commits}");
    let durable = reported.load(Ordering::SeqCst);
    let crashed = dir.crash(CrashMode::LoseUnsynced);
    let (spool, _) = Spool::open(Arc::new(crashed), cfg(None), clock()).expect("reopen");
    check_spool(&spool, durable, 3000);
}

#[test]
fn out_of_order_unsynced_writes_never_leave_a_gap() {
    // A power cut may persist a later unsynced record while losing an earlier one: the
    // journal must come back as a gap-free prefix, and say it dropped the later record.
    let dir = MemDir::new();
    let (mut spool, _) = Spool::open(Arc::new(dir.clone()), cfg(None), clock()).expect("open");
    for s in 1..=10u64 {
        spool.append(&event_for(s)).expect("append");
    }
    spool.sync().expect("sync");
    for s in 11..=14u64 {
        spool.append(&event_for(s)).expect("append");
    }
    spool.flush().expect("flush");
    let newest = dir.list_segments().pop().expect("segment");
    let unsynced = dir.unsynced_bytes(&newest);
    let crashed = dir.crash(CrashMode::KeepAll);
    // Wipe the middle of the unsynced stretch (record 12 or so), keep what follows.
    let mut bytes = crashed.read_file(&newest).expect("segment");
    let start = bytes.len() - unsynced as usize;
    let mid = start + unsynced as usize / 3;
    bytes[mid..mid + 600].fill(0);
    crashed.write_file(&newest, bytes);
    let (spool, report) = Spool::open(Arc::new(crashed), cfg(None), clock()).expect("reopen");
    let n = check_spool(&spool, 10, 13);
    assert!(n < 14, "records after the lost one are dropped");
    assert_eq!(report.defects.len(), 1, "{:?}", report.defects);
    assert!(report.defects[0].1.reason.contains("discarded so the sequence has no gap"));
}
