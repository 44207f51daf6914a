//! Replication end to end: a source spool fed by a workload (writes, zeroes, discards,
//! barriers, bookmarks), a `Shipper`, a `Receiver` with a retention log, over TCP loopback
//! and over in-memory pipes; with the link cut, drained, and tampered with repeatedly while
//! the workload runs; a source whose key the target does not know; the bandwidth limit on
//! the wire; a target ahead of or behind the source.
//!
//! Synchronisation is by status: `wait_for` on the shipper's or the receiver's status, with
//! a generous timeout that only ever fails a test.

mod common;

use std::io::Read;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::*;
use tidemark_journal::{Event, ManualClock, Nanos, Seq};
use tidemark_sync::apply::MAX_CONNECTIONS;
use tidemark_sync::secure::{AllowedPeers, Keypair};
use tidemark_sync::shape::{Rate, TokenBucket};
use tidemark_sync::ship::{
    Backoff, Connect, LinkState, ShipError, Shipper, ShipperConfig, TcpConnect,
};

/// Waits until the shipper has every event of the source acknowledged.
fn wait_caught_up(handle: &tidemark_sync::ShipperHandle, source: &Source) {
    let last = source.last_seq();
    let status = handle.wait_for(PATIENCE, |s| s.acked == last && s.backlog_events == 0);
    assert!(status.is_some(), "not caught up: {:?}, spool ends at {last}", handle.status());
}

fn check_spool_empty(source: &Source) {
    let spool = source.spool.lock().unwrap();
    assert_eq!(spool.acked(), spool.last_seq(), "every event acknowledged");
    assert_eq!(spool.backlog_events(), 0, "the spool ends empty");
}

#[test]
fn replicates_over_tcp_loopback_and_every_bookmark_recovers() {
    let (cs, ct) = paired();
    let target = Target::new(ct);
    let listener = target.receiver.listen(TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
    let mut source = Source::new(1);
    let (acks, observer) = ack_recorder();
    let connector = TcpConnect { addr: listener.local_addr(), timeout: Duration::from_secs(5) };
    let handle = Shipper::new(source.spool.clone(), ship_config(cs))
        .observer(observer)
        .start(connector)
        .unwrap();
    let bell = handle.doorbell();
    source.run(2500, &|| bell.ring());
    wait_caught_up(&handle, &source);

    target.check_against(&source);
    let n = source.last_seq().0;
    assert_eq!(target.journal_seqs(), (1..=n).collect::<Vec<_>>(), "each event once, in order");
    assert!(source.bookmarks.len() >= 3, "the workload took bookmarks");
    let status = handle.stop();
    assert_eq!(status.state, LinkState::Stopped);
    assert_eq!(status.sessions, 1);
    assert!(status.wire_bytes < status.raw_bytes, "compression helped: {status:?}");
    check_spool_empty(&source);
    assert_non_decreasing(&acks.lock().unwrap());
    let r = target.receiver.wait_for(PATIENCE, |s| !s.connected).expect("the session ends");
    assert_eq!(r.duplicates, 0);
    assert_eq!(r.acked, Seq(n));
    target.receiver.shutdown();
    listener.stop();
}

#[test]
fn replicates_over_in_memory_pipes_without_compression() {
    let (cs, ct) = paired();
    let target = Target::new(ct);
    let net = PipeNet::new(target.receiver.clone());
    let mut source = Source::new(2);
    let mut cfg = ship_config(cs);
    cfg.compression = tidemark_sync::wire::Compression::Off;
    let handle = Shipper::new(source.spool.clone(), cfg).start(net.connector()).unwrap();
    let bell = handle.doorbell();
    source.run(1500, &|| bell.ring());
    wait_caught_up(&handle, &source);
    target.check_against(&source);
    let n = source.last_seq().0;
    assert_eq!(target.journal_seqs(), (1..=n).collect::<Vec<_>>());
    let status = handle.stop();
    assert!(status.wire_bytes >= status.raw_bytes, "no compression: {status:?}");
    assert_eq!(net.join_servers().len(), 1);
    check_spool_empty(&source);
}

/// One way of breaking a pipe connection mid-stream.
fn cut(net: &PipeNet, how: usize) {
    let (src, tgt) = net.newest();
    match how % 4 {
        // The source's socket goes away.
        0 => src.shutdown(Shutdown::Both),
        // Bytes in flight to the target are lost and the link goes down.
        1 => {
            tgt.take_incoming();
            tgt.end_incoming();
        }
        // Acks in flight to the source are lost and the link goes down.
        2 => {
            src.take_incoming();
            src.end_incoming();
        }
        // A bit flips in flight: the target refuses the record and closes.
        _ => {
            let mut bytes = tgt.take_incoming();
            if let Some(last) = bytes.last_mut() {
                *last ^= 0x40;
                tgt.inject_incoming(&bytes);
            } else {
                tgt.shutdown(Shutdown::Both);
            }
        }
    }
}

#[test]
fn link_faults_over_pipes_lose_nothing_and_duplicate_nothing() {
    let (cs, ct) = paired();
    let target = Target::new(ct);
    let net = PipeNet::new(target.receiver.clone());
    let source = Source::new(3);
    let spool = source.spool.clone();
    let (acks, observer) = ack_recorder();
    let handle =
        Shipper::new(spool, ship_config(cs)).observer(observer).start(net.connector()).unwrap();
    let bell = handle.doorbell();
    let workload = thread::spawn(move || {
        let mut source = source;
        source.run(4000, &|| bell.ring());
        source
    });
    const FAULTS: usize = 12;
    let (mut mark, mut sessions) = (Seq(0), 0);
    for i in 0..FAULTS {
        // Cut a fresh session once it has moved the stream on by a few events (a different
        // number each time, so the cuts land at different points of a session).
        let ahead = 20 + 10 * (i as u64 % 5);
        let progressed = target.receiver.wait_for(PATIENCE, |s| {
            s.connected && s.sessions > sessions && s.received.0 >= mark.0 + ahead
        });
        let st = progressed.unwrap_or_else(|| {
            panic!(
                "no progress after {i} faults: {:?} {:?}",
                target.receiver.status(),
                handle.status()
            )
        });
        (mark, sessions) = (st.received, st.sessions);
        cut(&net, i);
    }
    let source = workload.join().unwrap();
    wait_caught_up(&handle, &source);

    target.check_against(&source);
    let n = source.last_seq().0;
    assert_eq!(
        target.journal_seqs(),
        (1..=n).collect::<Vec<_>>(),
        "the replica holds each event exactly once"
    );
    let r = target.receiver.status();
    println!("pipes, {n} events, {FAULTS} faults: target {r:?}\nsource {:?}", handle.status());
    assert_eq!(r.duplicates, 0, "acknowledged data was never re-sent");
    assert!(r.sessions > FAULTS as u64, "every fault ended a session: {r:?}");
    let acks = acks.lock().unwrap().clone();
    assert_non_decreasing(&acks);
    assert_eq!(acks.last().copied(), Some(n));
    let status = handle.stop();
    assert_eq!(status.state, LinkState::Stopped);
    check_spool_empty(&source);
    target.receiver.shutdown();
    net.join_servers();
}

#[test]
fn link_faults_over_tcp_lose_nothing_and_duplicate_nothing() {
    let (cs, ct) = paired();
    let target = Target::new(ct);
    let listener = target.receiver.listen(TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
    let sockets: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let connector = {
        let sockets = sockets.clone();
        let mut tcp = TcpConnect { addr: listener.local_addr(), timeout: Duration::from_secs(5) };
        move || {
            let s = tcp.connect()?;
            sockets.lock().unwrap().push(s.try_clone()?);
            Ok(s)
        }
    };
    let source = Source::new(4);
    let (acks, observer) = ack_recorder();
    let handle = Shipper::new(source.spool.clone(), ship_config(cs))
        .observer(observer)
        .start(connector)
        .unwrap();
    let bell = handle.doorbell();
    let workload = thread::spawn(move || {
        let mut source = source;
        source.run(3000, &|| bell.ring());
        source
    });
    const CUTS: u64 = 8;
    let (mut mark, mut sessions) = (Seq(0), 0);
    for i in 0..CUTS {
        let ahead = 20 + 15 * (i % 4);
        let st = target.receiver.wait_for(PATIENCE, |s| {
            s.connected && s.sessions > sessions && s.received.0 >= mark.0 + ahead
        });
        let st = st.unwrap_or_else(|| panic!("no progress after {i} cuts"));
        (mark, sessions) = (st.received, st.sessions);
        // Cut the newest socket, from the source's side (both directions).
        let s = sockets.lock().unwrap().last().unwrap().try_clone().unwrap();
        let _ = s.shutdown(Shutdown::Both);
    }
    let source = workload.join().unwrap();
    wait_caught_up(&handle, &source);
    target.check_against(&source);
    let n = source.last_seq().0;
    assert_eq!(target.journal_seqs(), (1..=n).collect::<Vec<_>>());
    let r = target.receiver.status();
    assert_eq!(r.duplicates, 0, "acknowledged data was never re-sent");
    assert!(r.sessions > CUTS, "every cut ended a session: {r:?}");
    assert_non_decreasing(&acks.lock().unwrap());
    handle.stop();
    check_spool_empty(&source);
    target.receiver.shutdown();
    listener.stop();
}

#[test]
fn keepalives_hold_an_idle_session_open_past_the_io_timeout() {
    // A 2 s I/O timeout and a ping every 100 ms: a stall of a second or more on a loaded
    // machine still leaves the session well within its timeout.
    const IO_TIMEOUT: Duration = Duration::from_secs(2);
    const KEEPALIVE: Duration = Duration::from_millis(100);
    let (mut cs, mut ct) = paired();
    cs.io_timeout = Some(IO_TIMEOUT);
    ct.io_timeout = Some(IO_TIMEOUT);
    let target = Target::new(ct);
    let net = PipeNet::new(target.receiver.clone());
    let mut source = Source::new(9);
    let mut cfg = ship_config(cs);
    cfg.keepalive = KEEPALIVE;
    let handle = Shipper::new(source.spool.clone(), cfg).start(net.connector()).unwrap();
    source.run(100, &|| handle.notify());
    wait_caught_up(&handle, &source);
    // Idle for more than three times the I/O timeout: an idle writer pings only after a
    // whole keepalive interval without a frame, so `pings` pings after `before` span at
    // least `pings - 1` intervals. Without the pings either side's reads would time out.
    let pings = (3 * IO_TIMEOUT.as_millis() / KEEPALIVE.as_millis()) as u64 + 2;
    let (sessions, target_sessions) = (handle.status().sessions, target.receiver.status().sessions);
    let before = handle.status().pings;
    let started = std::time::Instant::now();
    let idle = handle.wait_for(PATIENCE, |s| s.pings >= before + pings).expect("pings go out");
    assert!(started.elapsed() > 3 * IO_TIMEOUT, "idle for {:?} only", started.elapsed());
    assert_eq!(idle.sessions, sessions, "the idle session stayed open: {idle:?}");
    assert_eq!(idle.state, LinkState::Shipping);
    assert_eq!(target.receiver.status().sessions, target_sessions);
    assert!(target.receiver.status().connected);
    source.run(100, &|| handle.notify());
    wait_caught_up(&handle, &source);
    target.check_against(&source);
    handle.stop();
    net.join_servers();
}

#[test]
fn the_listener_caps_connections_and_a_handshake_flood_does_not_keep_the_source_out() {
    let (cs, ct) = paired();
    let target = Target::new(ct);
    let listener = target.receiver.listen(TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
    let addr = listener.local_addr();
    // Connections that never finish their handshake; each is answered with the preamble.
    let connect = || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut preamble = [0u8; 12];
        s.read_exact(&mut preamble).unwrap();
        assert_eq!(&preamble[..8], b"TIDEMARK");
        s
    };
    let mut idle: Vec<TcpStream> = (0..MAX_CONNECTIONS).map(|_| connect()).collect();
    // One more is served, and the oldest handshake is cut to make room for it.
    idle.push(connect());
    assert_eq!(idle[0].read(&mut [0u8; 12]).unwrap(), 0, "the oldest handshake is cut");
    assert_eq!(target.receiver.status().handshakes_evicted, 1);
    // With the listener still full of idle handshakes, a real source gets through.
    let mut source = Source::new(10);
    source.run(20, &|| {});
    let connector = TcpConnect { addr, timeout: Duration::from_secs(5) };
    let handle = Shipper::new(source.spool.clone(), ship_config(cs)).start(connector).unwrap();
    wait_caught_up(&handle, &source);
    // An authenticated session is never cut for a newcomer: a new flood evicts only
    // handshakes, and the session goes on.
    let sessions = target.receiver.status().sessions;
    for _ in 0..MAX_CONNECTIONS {
        idle.push(connect());
    }
    source.run(20, &|| handle.notify());
    wait_caught_up(&handle, &source);
    assert_eq!(target.receiver.status().sessions, sessions, "the session was not cut");
    assert_eq!(handle.status().sessions, 1);
    drop(idle);
    handle.stop();
    target.receiver.shutdown();
    listener.stop();
}

#[test]
fn a_source_with_an_unknown_key_is_refused_and_the_replica_is_untouched() {
    let (mut cs, ct) = paired();
    let target_key = cs.allowed_peers.iter().next().unwrap().key;
    // A stranger that knows the target's key, but whose own key the target does not allow.
    cs.keypair = Keypair::generate().unwrap();
    cs.allowed_peers = AllowedPeers::from_keys([target_key]);
    let stranger = cs.keypair.fingerprint().to_string();
    let target = Target::new(ct);
    let files_before = target.dir.total_bytes();
    let listener = target.receiver.listen(TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
    let mut source = Source::new(5);
    source.run(50, &|| {});
    let connector = TcpConnect { addr: listener.local_addr(), timeout: Duration::from_secs(5) };
    let handle = Shipper::new(source.spool.clone(), ship_config(cs)).start(connector).unwrap();
    let failed = handle.wait_for(PATIENCE, |s| s.state == LinkState::Failed).expect("refused");
    let error = failed.last_error.unwrap();
    assert!(error.contains("peer not allowed") && error.contains(&stranger), "{error}");
    assert_eq!(failed.sessions, 0);
    assert_eq!(failed.acked, Seq(0));
    let r = target
        .receiver
        .wait_for(PATIENCE, |s| s.last_error.is_some())
        .expect("the target reports the refusal");
    assert!(r.last_error.unwrap().contains("is not in the allowed peers"));
    assert_eq!((r.sessions, r.received, r.events), (0, Seq(0), 0));
    assert_eq!(target.dir.total_bytes(), files_before, "the journal is untouched");
    assert!(target.base.snapshot().iter().all(|&b| b == 0), "the base image is untouched");
    assert_eq!(target.receiver.with_log(|l| l.last_seq()), Seq(0));
    assert_eq!(source.spool.lock().unwrap().backlog_events(), 50, "the source keeps it all");
    handle.stop();
    listener.stop();
}

#[test]
fn the_bandwidth_limit_holds_batches_until_the_rate_allows_them() {
    let (cs, ct) = paired();
    let target = Target::new(ct);
    let net = PipeNet::new(target.receiver.clone());
    let clock = Arc::new(ManualClock::new(Nanos(1_000_000_000)));
    let bucket = Arc::new(TokenBucket::new(Rate::BytesPerSec(0), 1 << 20, clock).unwrap());
    // A full bucket lets the first megabyte through; empty it first.
    assert!(bucket.try_take(1 << 20).is_ok());
    let mut source = Source::new(6);
    let handle = Shipper::new(source.spool.clone(), ship_config(cs))
        .bucket(bucket.clone())
        .start(net.connector())
        .unwrap();
    source.run(300, &|| handle.notify());
    // The encoder has queued batches; the writer is blocked on the bucket.
    let queued = handle.wait_for(PATIENCE, |s| s.in_flight_bytes > 0).expect("batches queued");
    assert_eq!(queued.batches, 0, "nothing went on the wire at rate 0");
    assert_eq!(target.receiver.status().received, Seq(0));
    bucket.set_rate(Rate::Unlimited, 1 << 20).unwrap();
    wait_caught_up(&handle, &source);
    target.check_against(&source);
    let status = handle.stop();
    assert_eq!(bucket.status().taken, (1 << 20) + status.wire_bytes, "every batch byte paid");
    net.join_servers();
}

#[test]
fn a_target_ahead_of_the_source_stops_the_shipper() {
    let (cs, ct) = paired();
    let target = Target::new(ct);
    target.receiver.with_log(|log| {
        for s in 1..=5 {
            log.append(Seq(s), Nanos(s), &Event::Barrier).unwrap();
        }
        log.sync().unwrap();
    });
    let net = PipeNet::new(target.receiver.clone());
    let mut source = Source::new(7);
    source.run(3, &|| {});
    let handle =
        Shipper::new(source.spool.clone(), ship_config(cs)).start(net.connector()).unwrap();
    let failed = handle.wait_for(PATIENCE, |s| s.state == LinkState::Failed).expect("fails");
    let error = failed.last_error.unwrap();
    assert!(error.contains("holds events up to seq 5") && error.contains("resync"), "{error}");
    assert_eq!(source.spool.lock().unwrap().backlog_events(), 3, "nothing trimmed");
    handle.stop();
    // The target hears why the source hung up.
    let reason = net.join_servers().pop().unwrap().unwrap_err().to_string();
    assert!(reason.contains("protocol violation") && reason.contains("seq 5"), "{reason}");
}

#[test]
fn a_target_behind_the_trimmed_spool_stops_the_shipper() {
    let (cs, ct) = paired();
    let target = Target::new(ct);
    let net = PipeNet::new(target.receiver.clone());
    let mut source = Source::new(8);
    source.run(10, &|| {});
    // An earlier target acknowledged everything; this one is empty.
    source.spool.lock().unwrap().ack(Seq(10)).unwrap();
    let handle =
        Shipper::new(source.spool.clone(), ship_config(cs)).start(net.connector()).unwrap();
    let failed = handle.wait_for(PATIENCE, |s| s.state == LinkState::Failed).expect("fails");
    let error = failed.last_error.unwrap();
    assert!(error.contains("lost acknowledged data"), "{error}");
    assert!(ShipError::TargetBehind { target: Seq(0), trimmed: Seq(10) }.is_fatal());
    handle.stop();
}

#[test]
fn backoff_grows_to_its_cap_and_bad_configurations_are_refused() {
    let b = Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(1), factor: 2 };
    let delays: Vec<u64> = (0..6).map(|a| b.delay(a).as_millis() as u64).collect();
    assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
    assert_eq!(b.delay(u32::MAX), Duration::from_secs(1));

    let (cs, _) = paired();
    let source = Source::new(11);
    let never = || -> std::io::Result<TcpStream> { unreachable!("not started") };
    for (field, cfg) in [
        ("batch_bytes", ShipperConfig { batch_bytes: 0, ..ship_config(cs.clone()) }),
        ("max_frame_len", ShipperConfig { max_frame_len: 1 << 20, ..ship_config(cs.clone()) }),
        ("queue_depth", ShipperConfig { queue_depth: 0, ..ship_config(cs.clone()) }),
    ] {
        let err = Shipper::new(source.spool.clone(), cfg).start(never).unwrap_err();
        assert!(
            matches!(&err, ShipError::Config { field: f, .. } if *f == field) && err.is_fatal(),
            "{err}"
        );
    }
}

#[test]
fn a_receiver_shutting_down_acknowledges_what_it_received_and_tells_the_source() {
    let (cs, ct) = paired();
    // The stuck peer below would hold the stop up until the target's handshake timeout.
    let handshake_timeout = ct.handshake_timeout;
    let target = Target::new(ct);
    let listener = target.receiver.listen(TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
    let addr = listener.local_addr();
    let mut source = Source::new(6);
    let connector = TcpConnect { addr, timeout: Duration::from_secs(5) };
    let handle = Shipper::new(source.spool.clone(), ship_config(cs)).start(connector).unwrap();
    let bell = handle.doorbell();
    source.run(400, &|| bell.ring());
    target.receiver.wait_for(PATIENCE, |s| s.connected && s.received.0 >= 100).expect("streaming");
    // A peer that never finishes its handshake must not hold the stop up (it would until
    // the 10 s handshake timeout).
    let _stuck = TcpStream::connect(addr).unwrap();
    let started = std::time::Instant::now();
    target.receiver.shutdown();
    listener.stop();
    let took = started.elapsed();
    // The designed worst case is about 4 s (`SHUTDOWN_GRACE` plus the linger, then the
    // listener's stop); 9 s leaves room for a loaded machine and is still below the 10 s
    // the stuck handshake would take.
    let bound = Duration::from_secs(9);
    assert!(bound < handshake_timeout, "the bound must tell a wait for the handshake apart");
    assert!(took < bound, "the receiver took {took:?} to stop");
    let r = target.receiver.status();
    assert!(!r.connected);
    assert_eq!(r.durable, r.received, "everything received was made durable: {r:?}");
    assert_eq!(r.acked, r.durable, "and acknowledged: {r:?}");
    let s = handle
        .wait_for(PATIENCE, |s| {
            s.last_session_end.as_deref().is_some_and(|e| e.contains("shutting down"))
        })
        .unwrap_or_else(|| panic!("the source was not told: {:?}", handle.status()));
    assert_eq!(s.acked, r.acked, "the source heard the last acknowledgement");
    println!("the source's session ended with: {}", s.last_session_end.unwrap());
    handle.stop();
}
