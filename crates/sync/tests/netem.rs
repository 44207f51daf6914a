//! Replication over real TCP between two network namespaces joined by a veth pair, with the
//! link impaired by `tc netem` (loss, delay, jitter, reordering), cut by 100% loss, taken
//! down with `ip link set down`, and rate-limited by the shipper's token bucket over a
//! delayed link. The shipper's sockets are made inside namespace A, the receiver's listener
//! inside namespace B (see `common/netns.rs`).
//!
//! Every test checks, after catch-up: the replica equals the source byte for byte; every
//! bookmark recovers the source's state at that bookmark; the retention log holds exactly
//! seqs 1..=N once each, in order; the target saw no duplicate; the acknowledged sequence
//! numbers the source heard only grew.
//!
//! Synchronisation is on status (`wait_for`). The only sleeps are the outages themselves:
//! how long a link stays cut is the fault, not a sync point.
//!
//! These need root, `ip` and `tc` (Debian package iproute2), network namespaces, and for
//! all but the link-flap test the `sch_netem` qdisc. Where that is missing they print
//! `SKIP netem: <reason>` and pass, unless `TIDEMARK_REQUIRE_NETNS=1`: then they
//! fail.

mod common;

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::netns::{NetPair, Side, pair_or_skip};
use common::*;
use tidemark_journal::{Seq, SystemClock};
use tidemark_sync::ShipperHandle;
use tidemark_sync::apply::ReceiverStatus;
use tidemark_sync::secure::SecureConfig;
use tidemark_sync::shape::{Rate, TokenBucket};
use tidemark_sync::ship::{LinkState, Shipper, ShipperStatus};

/// How long a connection attempt from A may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Source and target configurations with `io_timeout` after the handshake and a short
/// handshake timeout (a handshake cut by a partition must not hold a slot for long).
fn configs(io_timeout: Duration) -> (SecureConfig, SecureConfig) {
    let (mut cs, mut ct) = paired();
    for c in [&mut cs, &mut ct] {
        c.io_timeout = Some(io_timeout);
        c.handshake_timeout = Duration::from_secs(2);
    }
    (cs, ct)
}

/// Waits until the shipper has every event of the source acknowledged.
fn wait_caught_up(handle: &ShipperHandle, source: &Source) {
    let last = source.last_seq();
    let status = handle.wait_for(PATIENCE, |s| s.acked == last && s.backlog_events == 0);
    assert!(status.is_some(), "not caught up: {:?}, spool ends at {last}", handle.status());
}

/// The checks every test ends with, once the source stopped writing. Returns both sides'
/// status for test-specific checks.
fn check_replica(
    target: &Target,
    source: &Source,
    handle: &ShipperHandle,
    acks: &Mutex<Vec<u64>>,
) -> (ShipperStatus, ReceiverStatus) {
    wait_caught_up(handle, source);
    target.check_against(source);
    let n = source.last_seq().0;
    assert_eq!(
        target.journal_seqs(),
        (1..=n).collect::<Vec<_>>(),
        "the retention log holds each event exactly once, in order"
    );
    assert!(!source.bookmarks.is_empty(), "the workload took bookmarks");
    let r = target.receiver.status();
    assert_eq!(r.duplicates, 0, "acknowledged data was never re-sent: {r:?}");
    let acks = acks.lock().unwrap().clone();
    assert_non_decreasing(&acks);
    assert_eq!(acks.last().copied(), Some(n), "the source heard the last ack");
    let spool = source.spool.lock().unwrap();
    assert_eq!(spool.acked(), spool.last_seq(), "the spool trimmed everything");
    assert_eq!(spool.backlog_events(), 0);
    (handle.status(), r)
}

/// Loss, delay with jitter, and reordering on both directions while a workload of random
/// writes, barriers and bookmarks ships.
#[test]
fn netns_lossy_reordering_link_loses_nothing_and_duplicates_nothing() {
    let test = "netns_lossy_reordering_link_loses_nothing_and_duplicates_nothing";
    let Some(net) = pair_or_skip(test, true) else { return };
    net.netem("loss 5% delay 20ms 10ms reorder 25% 50%").unwrap();
    // TCP recovers the losses; a stall long enough to trip this timeout only means a
    // reconnect, which must be as lossless as the rest.
    let (cs, ct) = configs(Duration::from_secs(5));
    let target = Target::new(ct);
    let listener = net.listen(&target.receiver).unwrap();
    let source = Source::new(21);
    let (acks, observer) = ack_recorder();
    let connector = net.connector(listener.local_addr(), CONNECT_TIMEOUT);
    let handle = Shipper::new(source.spool.clone(), ship_config(cs))
        .observer(observer)
        .start(connector)
        .unwrap();
    let bell = handle.doorbell();
    let started = Instant::now();
    let workload = thread::spawn(move || {
        let mut source = source;
        source.run(LOSSY_EVENTS, &|| bell.ring());
        source
    });
    let source = workload.join().unwrap();
    let (status, r) = check_replica(&target, &source, &handle, &acks);
    println!(
        "lossy link: {} events, {} wire bytes ({} raw) in {:?}, {} sessions; target {r:?}",
        source.last_seq().0,
        status.wire_bytes,
        status.raw_bytes,
        started.elapsed(),
        status.sessions
    );
    assert!(status.raw_bytes >= 2 << 20, "a workload of a few MiB: {status:?}");
    for side in [Side::A, Side::B] {
        let drops = net.qdisc_drops(side).unwrap();
        assert!(drops.is_some_and(|d| d > 0), "netem dropped packets leaving {side:?}: {drops:?}");
    }
    assert_eq!(handle.stop().state, LinkState::Stopped);
    listener.stop();
}

/// Events in the lossy-link workload (about 19 KB of writes each on average).
const LOSSY_EVENTS: usize = 200;

/// One way of cutting the link.
#[derive(Debug, Clone, Copy)]
enum Outage {
    /// netem drops every packet both ways; the sockets see nothing.
    Partition,
    /// A's veth end goes down: no route, connects fail at once, open sessions stall.
    LinkDown,
}

/// The I/O timeout of the outage tests. Each outage lasts twice as long, so it ends the
/// session on both sides whatever the timing.
const OUTAGE_IO_TIMEOUT: Duration = Duration::from_millis(750);
const OUTAGE: Duration = Duration::from_millis(1500);
/// Events written before each outage; half as many more are written during it.
const OUTAGE_CHUNK: usize = 120;

/// Ships a workload through `outages`, each cut mid-stream (a session that has moved the
/// stream on, events written during the cut), with netem `baseline` on the link when set.
fn through_outages(net: &NetPair, baseline: Option<&str>, outages: &[Outage], seed: u64) {
    if let Some(spec) = baseline {
        net.netem(spec).unwrap();
    }
    let (cs, ct) = configs(OUTAGE_IO_TIMEOUT);
    let target = Target::new(ct);
    let listener = net.listen(&target.receiver).unwrap();
    let mut source = Source::new(seed);
    let (acks, observer) = ack_recorder();
    let mut cfg = ship_config(cs);
    cfg.keepalive = Duration::from_millis(150);
    let connector = net.connector(listener.local_addr(), CONNECT_TIMEOUT);
    let handle =
        Shipper::new(source.spool.clone(), cfg).observer(observer).start(connector).unwrap();
    let bell = handle.doorbell();
    let ring = || bell.ring();
    let (mut mark, mut sessions) = (Seq(0), 0);
    for (i, outage) in outages.iter().enumerate() {
        source.run(OUTAGE_CHUNK, &ring);
        // A new session (after the previous outage) has moved the stream on.
        let ahead = 10 + 20 * (i as u64 % 4);
        let st = target.receiver.wait_for(PATIENCE, |s| {
            s.connected && s.sessions > sessions && s.received.0 >= mark.0 + ahead
        });
        let st = st.unwrap_or_else(|| {
            panic!(
                "no new session moving the stream after {i} outages: target {:?}, source {:?}",
                target.receiver.status(),
                handle.status()
            )
        });
        (mark, sessions) = (st.received, st.sessions);
        let cut = Instant::now();
        match outage {
            Outage::Partition => net.netem("loss 100%").unwrap(),
            Outage::LinkDown => net.set_link(false).unwrap(),
        }
        // The source goes on writing while the link is out.
        source.run(OUTAGE_CHUNK / 2, &ring);
        // The outage itself, not a synchronisation point.
        thread::sleep(OUTAGE.saturating_sub(cut.elapsed()));
        match outage {
            Outage::Partition => net.netem(baseline.unwrap_or("delay 0ms")).unwrap(),
            Outage::LinkDown => net.set_link(true).unwrap(),
        }
    }
    source.run(OUTAGE_CHUNK, &ring);
    let (status, r) = check_replica(&target, &source, &handle, &acks);
    println!(
        "{} outages, {} events: source {status:?}\ntarget {r:?}",
        outages.len(),
        source.last_seq().0
    );
    let cuts = outages.len() as u64;
    assert!(status.sessions > cuts, "the shipper reconnected after every outage: {status:?}");
    assert!(r.sessions > cuts, "every outage ended a session on the target: {r:?}");
    let resumes = acks.lock().unwrap().len();
    assert!(resumes > cuts as usize, "acks and resume points were heard");
    assert_eq!(handle.stop().state, LinkState::Stopped);
    listener.stop();
}

/// Repeated partitions (100% loss both ways) and one link down/up, mid-stream: the shipper
/// reconnects each time and resumes where the target left off.
#[test]
fn netns_partitions_and_a_link_flap_resume_where_the_target_left_off() {
    let test = "netns_partitions_and_a_link_flap_resume_where_the_target_left_off";
    let Some(net) = pair_or_skip(test, true) else { return };
    use Outage::*;
    through_outages(&net, Some("delay 5ms 2ms"), &[Partition, Partition, LinkDown, Partition], 22);
}

/// Link down/up outages only: needs network namespaces but not `sch_netem`, so the
/// namespace plumbing and the reconnect path run wherever namespaces do.
#[test]
fn netns_link_flaps_lose_nothing_and_duplicate_nothing() {
    let Some(net) = pair_or_skip("netns_link_flaps_lose_nothing_and_duplicate_nothing", false)
    else {
        return;
    };
    use Outage::*;
    through_outages(&net, None, &[LinkDown, LinkDown, LinkDown], 23);
}

/// The shipper's bandwidth limit over a link with 25 ms (+-5 ms) of delay each way: the
/// replica catches up in one session, no faster than the limit allows.
#[test]
fn netns_rate_limit_over_a_delayed_link_converges() {
    let test = "netns_rate_limit_over_a_delayed_link_converges";
    let Some(net) = pair_or_skip(test, true) else { return };
    net.netem("delay 25ms 5ms").unwrap();
    const RATE: u64 = 1 << 20;
    const BURST: u64 = 128 << 10;
    let bucket =
        Arc::new(TokenBucket::new(Rate::BytesPerSec(RATE), BURST, Arc::new(SystemClock)).unwrap());
    let (cs, ct) = configs(Duration::from_secs(2));
    let target = Target::new(ct);
    let listener = net.listen(&target.receiver).unwrap();
    let mut source = Source::new(24);
    source.run(RATE_EVENTS, &|| {});
    let (acks, observer) = ack_recorder();
    let connector = net.connector(listener.local_addr(), CONNECT_TIMEOUT);
    let started = Instant::now();
    let handle = Shipper::new(source.spool.clone(), ship_config(cs))
        .bucket(bucket.clone())
        .observer(observer)
        .start(connector)
        .unwrap();
    let (status, r) = check_replica(&target, &source, &handle, &acks);
    let elapsed = started.elapsed();
    let floor = Duration::from_nanos((status.wire_bytes - BURST) * 1_000_000_000 / RATE);
    println!(
        "rate {RATE} B/s over 25 ms delay: {} wire bytes in {elapsed:?} ({:.0} B/s), floor \
         {floor:?}",
        status.wire_bytes,
        status.wire_bytes as f64 / elapsed.as_secs_f64()
    );
    assert!(status.wire_bytes > 2 * BURST, "the workload outlasts the burst: {status:?}");
    assert!(elapsed >= floor, "the limit held: {elapsed:?} < {floor:?} for {status:?}");
    assert_eq!(status.sessions, 1, "the limit never starved a session into a timeout");
    assert_eq!(r.sessions, 1);
    let stopped = handle.stop();
    assert_eq!(bucket.status().taken, stopped.wire_bytes, "every frame byte paid");
    listener.stop();
}

/// Events in the rate-limit workload (a few seconds at the limit).
const RATE_EVENTS: usize = 250;
