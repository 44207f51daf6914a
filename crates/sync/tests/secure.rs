//! The secure channel end to end: handshakes over TCP loopback and in-memory pipes, peers
//! refused by key on either side, and a network that tampers with, replays, reorders,
//! truncates or stalls the records, each refused with the error that names it; then the
//! wire protocol through the channel, version mismatches included, and a throughput smoke.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tidemark_journal::{Bookmark, BookmarkKind, Event, Nanos, Seq, VolumeId};
use tidemark_sync::connection::{Connection, ConnectionError, Session};
use tidemark_sync::lineage::Verdict;
use tidemark_sync::pipe::{PipeEnd, duplex};
use tidemark_sync::secure::channel::RECORD_HEADER_LEN;
use tidemark_sync::secure::handshake::{
    MESSAGE_1_LEN, MESSAGE_3_LEN, PREAMBLE_MAGIC, SUPPORTED_TRANSPORT,
};
use tidemark_sync::secure::{
    AllowedPeers, CloseCode, Keypair, SecureChannel, SecureConfig, SecureError, Stream, accept_tcp,
    connect_tcp,
};
use tidemark_sync::wire::{
    Batch, BatchEntry, BlockRef, Codec, Compression, ContentHash, EntryBody, ErrorCode, HashReply,
    HashRequest, Hello, LineageInfo, Message, NodeHash, NodeRange, PairId, RefSource, Refuse,
    RefuseReason, Role, SUPPORTED_VERSIONS, TreeShape, VersionRange, VolumeInfo,
};

/// Two configurations that allow each other.
fn paired() -> (SecureConfig, SecureConfig) {
    let a = Keypair::generate().unwrap();
    let b = Keypair::generate().unwrap();
    let ca = SecureConfig::new(a.clone(), AllowedPeers::from_keys([*b.public()]));
    let cb = SecureConfig::new(b, AllowedPeers::from_keys([*a.public()]));
    (ca, cb)
}

/// A handshake over an in-memory pipe; also returns a handle on the bytes in flight to
/// the responder (the network, as far as the test is concerned).
struct PipePair {
    initiator: SecureChannel<PipeEnd>,
    responder: SecureChannel<PipeEnd>,
    to_responder: PipeEnd,
}

fn pipe_pair(ci: &SecureConfig, cr: &SecureConfig) -> PipePair {
    let (a, b) = duplex(8 << 20);
    let to_responder = b.clone();
    let cr = cr.clone();
    let responder = thread::spawn(move || SecureChannel::accept(b, &cr));
    let initiator = SecureChannel::initiate(a, ci).expect("initiator handshake");
    let responder = responder.join().unwrap().expect("responder handshake");
    PipePair { initiator, responder, to_responder }
}

/// Splits raw bytes into records (header + ciphertext).
fn records(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let len = usize::from(u16::from_le_bytes([bytes[at + 8], bytes[at + 9]]));
        out.push(bytes[at..at + RECORD_HEADER_LEN + len].to_vec());
        at += RECORD_HEADER_LEN + len;
    }
    out
}

#[test]
fn handshake_over_tcp_loopback_both_ways() {
    let (ci, cr) = paired();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let expected_initiator = *ci.keypair.public();
    let server = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut channel = accept_tcp(stream, &cr).unwrap();
        assert_eq!(*channel.peer(), expected_initiator);
        let got = channel.recv().unwrap().unwrap();
        channel.send(&[got.as_slice(), b" back"].concat()).unwrap();
        assert_eq!(channel.recv().unwrap(), None, "a normal close ends the stream");
    });
    let mut channel = connect_tcp(addr, &ci).unwrap();
    assert_eq!(channel.peer(), cr_public(&ci));
    channel.send(b"hello").unwrap();
    assert_eq!(channel.recv().unwrap().unwrap(), b"hello back");
    channel.close().unwrap();
    server.join().unwrap();
    let err = channel.send(b"late").unwrap_err();
    assert!(matches!(err, SecureError::Closed), "{err}");
}

/// The responder's public key, which `ci` allows.
fn cr_public(ci: &SecureConfig) -> &tidemark_sync::PublicKey {
    &ci.allowed_peers.iter().next().unwrap().key
}

#[test]
fn handshake_over_in_memory_duplex_and_messages_of_every_size() {
    let (ci, cr) = paired();
    let mut p = pipe_pair(&ci, &cr);
    assert_eq!(p.initiator.peer(), cr.keypair.public());
    assert_eq!(p.responder.peer(), ci.keypair.public());
    for len in [0, 1, 65_514, 65_515, 65_516, 65_518, 65_519, 200_000, 1 << 20] {
        let message: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        p.initiator.send(&message).unwrap();
        assert_eq!(p.responder.recv().unwrap().unwrap(), message, "length {len}");
        p.responder.send(&message).unwrap();
        assert_eq!(p.initiator.recv().unwrap().unwrap(), message, "length {len}");
    }
}

#[test]
fn responder_refuses_an_unknown_initiator_and_tells_it() {
    let (ci, mut cr) = paired();
    cr.allowed_peers = AllowedPeers::from_keys([*Keypair::generate().unwrap().public()]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        accept_tcp(stream, &cr).unwrap_err()
    });
    let err = connect_tcp(addr, &ci).unwrap_err();
    let fingerprint = ci.keypair.fingerprint().to_string();
    match &err {
        SecureError::RefusedByPeer { code, reason } => {
            assert_eq!(*code, CloseCode::PEER_NOT_ALLOWED);
            assert!(reason.contains(&fingerprint), "{reason}");
        }
        other => panic!("expected a refusal, got {other}"),
    }
    assert!(err.to_string().contains("peer not allowed"), "{err}");
    let server_err = server.join().unwrap();
    assert!(
        matches!(&server_err, SecureError::PeerNotAllowed { fingerprint: f, .. } if f.to_string() == fingerprint),
        "{server_err}"
    );
    assert!(server_err.to_string().contains("is not in the allowed peers"));
}

#[test]
fn initiator_refuses_an_unknown_responder_without_revealing_itself() {
    let (mut ci, cr) = paired();
    ci.allowed_peers = AllowedPeers::from_keys([*Keypair::generate().unwrap().public()]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        accept_tcp(stream, &cr).unwrap_err()
    });
    let err = connect_tcp(addr, &ci).unwrap_err();
    assert!(matches!(err, SecureError::PeerNotAllowed { .. }), "{err}");
    let server_err = server.join().unwrap();
    match &server_err {
        SecureError::HandshakeClosed { step, hint } => {
            assert_eq!(*step, "handshake message 3", "the initiator never sent its key");
            assert!(hint.contains("allowed peers"), "{hint}");
        }
        other => panic!("expected the handshake to be cut at message 3, got {other}"),
    }
}

#[test]
fn a_tampered_record_is_named_and_closes_the_channel() {
    let (ci, cr) = paired();
    let mut p = pipe_pair(&ci, &cr);
    p.initiator.send(b"first").unwrap();
    assert_eq!(p.responder.recv().unwrap().unwrap(), b"first");
    p.initiator.send(b"second, to be altered").unwrap();
    let mut bytes = p.to_responder.take_incoming();
    bytes[RECORD_HEADER_LEN + 4] ^= 0x20;
    p.to_responder.inject_incoming(&bytes);
    let err = p.responder.recv().unwrap_err();
    assert!(matches!(err, SecureError::Tampered { record: 1 }), "{err}");
    assert_eq!(err.to_string(), "record 1 failed authentication: tampered in transit");
    // Nothing more is accepted, even a genuine record.
    p.initiator.send(b"third").unwrap_or(());
    let again = p.responder.recv().unwrap_err();
    assert!(
        matches!(&again, SecureError::Poisoned { first } if first.contains("record 1")),
        "{again}"
    );
    assert!(matches!(p.responder.send(b"x").unwrap_err(), SecureError::Poisoned { .. }));
    // And the stream was shut: the peer sees the connection end.
    assert!(p.initiator.recv().is_err());
}

#[test]
fn a_tampered_clear_header_is_named_too() {
    let (ci, cr) = paired();
    let mut p = pipe_pair(&ci, &cr);
    p.initiator.send(b"abc").unwrap();
    let mut bytes = p.to_responder.take_incoming();
    bytes[8] = bytes[8].wrapping_sub(1); // the ciphertext length
    p.to_responder.inject_incoming(&bytes);
    p.to_responder.end_incoming();
    let err = p.responder.recv().unwrap_err();
    assert!(matches!(err, SecureError::Tampered { record: 0 }), "{err}");
}

#[test]
fn a_replayed_record_is_refused() {
    let (ci, cr) = paired();
    let mut p = pipe_pair(&ci, &cr);
    p.initiator.send(b"pay 10").unwrap();
    let bytes = p.to_responder.take_incoming();
    p.to_responder.inject_incoming(&bytes);
    assert_eq!(p.responder.recv().unwrap().unwrap(), b"pay 10");
    p.to_responder.inject_incoming(&bytes);
    let err = p.responder.recv().unwrap_err();
    assert!(matches!(err, SecureError::Replayed { record: 0, expected: 1 }), "{err}");
    assert!(err.to_string().contains("replayed"));
}

#[test]
fn reordered_and_dropped_records_are_refused() {
    let (ci, cr) = paired();
    let mut p = pipe_pair(&ci, &cr);
    p.initiator.send(b"one").unwrap();
    p.initiator.send(b"two").unwrap();
    let rs = records(&p.to_responder.take_incoming());
    assert_eq!(rs.len(), 2);
    p.to_responder.inject_incoming(&rs[1]);
    p.to_responder.inject_incoming(&rs[0]);
    let err = p.responder.recv().unwrap_err();
    assert!(matches!(err, SecureError::OutOfOrder { record: 1, expected: 0 }), "{err}");
    assert!(err.to_string().contains("dropped or reordered"));
}

#[test]
fn a_record_from_another_session_fails_authentication() {
    let (ci, cr) = paired();
    let mut one = pipe_pair(&ci, &cr);
    let mut two = pipe_pair(&ci, &cr);
    one.initiator.send(b"session one").unwrap();
    let bytes = one.to_responder.take_incoming();
    two.to_responder.inject_incoming(&bytes);
    let err = two.responder.recv().unwrap_err();
    assert!(matches!(err, SecureError::Tampered { record: 0 }), "{err}");
}

#[test]
fn truncated_streams_give_clean_errors() {
    let (ci, cr) = paired();
    // Cut inside a record.
    let mut p = pipe_pair(&ci, &cr);
    p.initiator.send(&[1; 500]).unwrap();
    let bytes = p.to_responder.take_incoming();
    p.to_responder.inject_incoming(&bytes[..300]);
    p.to_responder.end_incoming();
    let err = p.responder.recv().unwrap_err();
    assert!(
        matches!(&err, SecureError::Truncated { what, needed, found: 290 } if what == "record 0" && *needed == 5 + 500 + 16),
        "{err}"
    );

    // Cut between the records of a chunked message.
    let mut p = pipe_pair(&ci, &cr);
    p.initiator.send(&vec![2; 200_000]).unwrap();
    let rs = records(&p.to_responder.take_incoming());
    assert_eq!(rs.len(), 4);
    p.to_responder.inject_incoming(&rs[..2].concat());
    p.to_responder.end_incoming();
    let err = p.responder.recv().unwrap_err();
    assert!(
        matches!(&err, SecureError::Truncated { what, needed: 200_000, .. } if what.contains("message starting at record 0")),
        "{err}"
    );

    // Cut between messages, without the close notice.
    let mut p = pipe_pair(&ci, &cr);
    p.initiator.send(b"whole").unwrap();
    p.to_responder.end_incoming();
    assert_eq!(p.responder.recv().unwrap().unwrap(), b"whole");
    let err = p.responder.recv().unwrap_err();
    assert!(matches!(err, SecureError::UnexpectedEof { after: 1 }), "{err}");
    assert!(err.to_string().contains("without a close notice"));
}

#[test]
fn an_oversized_message_is_refused_before_it_is_read() {
    let (ci, mut cr) = paired();
    cr.max_message_len = 100_000;
    let mut p = pipe_pair(&ci, &cr);
    p.initiator.send(&vec![3; 1 << 20]).unwrap();
    let buffered = p.to_responder.incoming_len();
    let err = p.responder.recv().unwrap_err();
    assert!(
        matches!(err, SecureError::MessageTooLarge { direction: "received", len, max: 100_000 } if len == 1 << 20),
        "{err}"
    );
    // Only the first record was read: the verdict came from its announced length.
    assert_eq!(p.to_responder.incoming_len(), buffered - (RECORD_HEADER_LEN + 65_535));

    // The rest of that message cannot be skipped safely: the channel is closed.
    assert!(matches!(p.responder.send(b"x").unwrap_err(), SecureError::Poisoned { .. }));

    // Sending one is refused up front, and the channel stays usable.
    let mut q = pipe_pair(&cr, &ci);
    let err = q.initiator.send(&vec![0; 100_001]).unwrap_err();
    assert!(matches!(err, SecureError::MessageTooLarge { direction: "outgoing", .. }), "{err}");
    q.initiator.send(b"still fine").unwrap();
    assert_eq!(q.responder.recv().unwrap().unwrap(), b"still fine");
}

#[test]
fn a_close_with_a_reason_is_reported() {
    let (ci, cr) = paired();
    let mut p = pipe_pair(&ci, &cr);
    p.responder.close_with(CloseCode::SHUTTING_DOWN, "maintenance").unwrap();
    let err = p.initiator.recv().unwrap_err();
    assert!(
        matches!(&err, SecureError::ClosedByPeer { code: CloseCode::SHUTTING_DOWN, reason } if reason == "maintenance"),
        "{err}"
    );
}

/// Plays a peer that writes `preamble` and returns what the node under test said.
fn fake_peer_preamble(initiator_under_test: bool, preamble: &[u8]) -> (SecureError, Vec<u8>) {
    let (ci, cr) = paired();
    let (mine, mut theirs) = duplex(1 << 16);
    theirs.write_all(preamble).unwrap();
    let start = Instant::now();
    let err = if initiator_under_test {
        SecureChannel::initiate(mine, &ci).unwrap_err()
    } else {
        SecureChannel::accept(mine, &cr).unwrap_err()
    };
    assert!(start.elapsed() < Duration::from_secs(2), "answered at once, not at a timeout");
    let mut said = Vec::new();
    theirs.read_to_end(&mut said).unwrap();
    (err, said)
}

#[test]
fn a_transport_version_mismatch_is_clear_on_both_sides() {
    let mut future = PREAMBLE_MAGIC.to_vec();
    future.extend_from_slice(&2u16.to_le_bytes());
    future.extend_from_slice(&3u16.to_le_bytes());
    for initiator in [true, false] {
        let (err, said) = fake_peer_preamble(initiator, &future);
        match &err {
            SecureError::VersionMismatch { ours, theirs } => {
                assert_eq!(*ours, SUPPORTED_TRANSPORT);
                assert_eq!(*theirs, VersionRange { min: 2, max: 3 });
            }
            other => panic!("expected a version mismatch, got {other}"),
        }
        assert_eq!(
            err.to_string(),
            "transport version mismatch: this node speaks version 1, the peer speaks versions 2 to 3"
        );
        // The peer got our preamble, so it can report the mismatch too.
        assert_eq!(&said[..8], &PREAMBLE_MAGIC);
        assert_eq!(&said[8..12], &[1, 0, 1, 0]);
        assert_eq!(said.len(), 12, "and nothing else");
    }
}

#[test]
fn a_peer_speaking_another_protocol_is_told_at_once() {
    let (err, _) = fake_peer_preamble(false, b"GET / HTTP/1.1\r\n\r\n");
    assert!(
        matches!(&err, SecureError::NotTidemark { found, .. } if found.starts_with(b"G")),
        "{err}"
    );
    assert!(err.to_string().contains("not a Tidemark node"));
}

#[test]
fn a_slow_loris_cannot_stretch_the_handshake() {
    const DRIP: Duration = Duration::from_millis(100);
    let (_, mut cr) = paired();
    cr.handshake_timeout = Duration::from_millis(400);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // Everything an initiator sends, well-formed as far as lengths go: a valid preamble,
    // message 1 (a key) and message 3 (garbage the responder only rejects once it has all
    // of it). One byte per `DRIP`, each well within the handshake timeout, so only a
    // deadline over the whole handshake stops it before the script ends; then silence.
    let mut script = PREAMBLE_MAGIC.to_vec();
    script.extend_from_slice(&[1, 0, 1, 0]);
    for (len, fill) in [(MESSAGE_1_LEN, 9u8), (MESSAGE_3_LEN, 0x5a)] {
        script.extend_from_slice(&(len as u16).to_le_bytes());
        script.extend(std::iter::repeat_n(fill, len));
    }
    let unbounded = DRIP * script.len() as u32;
    assert!(unbounded > Duration::from_secs(10), "the script lasts {unbounded:?}");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loris = thread::spawn({
        let done = done.clone();
        move || {
            let mut s = TcpStream::connect(addr).unwrap();
            for b in script {
                if done.load(std::sync::atomic::Ordering::SeqCst) || s.write_all(&[b]).is_err() {
                    break;
                }
                thread::sleep(DRIP);
            }
            let _ = s.shutdown(Shutdown::Both);
        }
    });
    let (stream, _) = listener.accept().unwrap();
    let start = Instant::now();
    let err = accept_tcp(stream, &cr).unwrap_err();
    let took = start.elapsed();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(matches!(err, SecureError::HandshakeTimeout { .. }), "{err}");
    // Ten times the timeout, and still a third of the script's length.
    assert!(took < Duration::from_secs(4), "the deadline held: {took:?} of {unbounded:?}");
    assert!(err.to_string().contains("handshake timed out"), "{err}");
    loris.join().unwrap();
}

#[test]
fn an_idle_peer_after_the_handshake_hits_the_io_timeout() {
    let (ci, mut cr) = paired();
    cr.io_timeout = Some(Duration::from_millis(100));
    let mut p = pipe_pair(&ci, &cr);
    let err = p.responder.recv().unwrap_err();
    assert!(
        matches!(&err, SecureError::Timeout { after, .. } if *after == Duration::from_millis(100)),
        "{err}"
    );
}

#[test]
fn split_halves_work_from_two_threads_and_share_the_poison() {
    let (ci, cr) = paired();
    let p = pipe_pair(&ci, &cr);
    let (mut rx, mut tx) = p.responder.split().unwrap();
    let (mut peer_rx, mut peer_tx) = p.initiator.split().unwrap();
    let echo = thread::spawn(move || {
        while let Some(m) = rx.recv().unwrap() {
            tx.send(&m).unwrap();
        }
        tx.close().unwrap();
    });
    let reader = thread::spawn(move || {
        let mut n = 0;
        while let Some(m) = peer_rx.recv().unwrap() {
            assert_eq!(m.len(), 1000 + n);
            n += 1;
        }
        n
    });
    for i in 0..200 {
        peer_tx.send(&vec![i as u8; 1000 + i]).unwrap();
    }
    peer_tx.close().unwrap();
    echo.join().unwrap();
    assert_eq!(reader.join().unwrap(), 200);

    // A failure on the receiving half poisons the sending half.
    let mut p = pipe_pair(&ci, &cr);
    p.initiator.send(b"x").unwrap();
    let mut bytes = p.to_responder.take_incoming();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    p.to_responder.inject_incoming(&bytes);
    let (mut rx, mut tx) = p.responder.split().unwrap();
    assert!(matches!(rx.recv().unwrap_err(), SecureError::Tampered { .. }));
    let err = tx.send(b"after").unwrap_err();
    assert!(matches!(&err, SecureError::Poisoned { first } if first.contains("tampered")), "{err}");
}

// ---- The wire protocol through the channel ----

fn hello() -> Hello {
    Hello {
        versions: SUPPORTED_VERSIONS,
        role: Role::Source,
        node: "source-1".to_owned(),
        pair: PairId([1; 16]),
        volumes: vec![VolumeInfo { id: VolumeId(0), block_size: 4096, size: 64 << 20 }],
    }
}

/// A source in generation 2, branched from generation 1 at seq 40.
fn source_lineage() -> LineageInfo {
    let generations = tidemark_sync::lineage::chain(&[(1, 0), (2, 40)]);
    LineageInfo { generations, head: Seq(50), dirty: true, full_resync: true, ..Default::default() }
}

/// A target in the source's generation.
fn target_lineage() -> LineageInfo {
    LineageInfo { head: Seq(41), dirty: false, full_resync: false, ..source_lineage() }
}

fn connections(ci: &SecureConfig, cr: &SecureConfig) -> (Connection<PipeEnd>, Connection<PipeEnd>) {
    let p = pipe_pair(ci, cr);
    (
        Connection::new(p.initiator, Codec::default()).unwrap(),
        Connection::new(p.responder, Codec::default()).unwrap(),
    )
}

#[test]
fn a_session_opens_and_every_message_type_crosses_the_channel() {
    let (ci, cr) = paired();
    let (mut source, mut target) = connections(&ci, &cr);
    let target_side = thread::spawn(move || {
        let (hello, version, theirs) = target
            .answer_session(
                "target-1",
                |_| Ok(target_lineage()),
                |_, _| Ok((Seq(41), tidemark_sync::wire::ReplicaState::consistent())),
            )
            .unwrap();
        assert_eq!(hello.node, "source-1");
        assert_eq!(version, 1);
        assert_eq!(theirs, source_lineage());
        let mut got = Vec::new();
        while let Some(m) = target.recv().unwrap() {
            target.send(&m).unwrap();
            got.push(m);
        }
        got
    });
    let session = source.open_session(&hello(), &source_lineage()).unwrap();
    assert_eq!(
        session,
        Session {
            version: 1,
            peer_node: "target-1".to_owned(),
            last_acked: Seq(41),
            replica: tidemark_sync::wire::ReplicaState::consistent(),
            target_lineage: target_lineage(),
            verdict: Verdict::Same,
        }
    );
    source.codec_mut().set_compression(Compression::Zstd { level: 3 });

    let big: Vec<BatchEntry> = (0..300u64)
        .map(|i| BatchEntry {
            time: Nanos(i),
            body: EntryBody::Event(Event::Write {
                volume: VolumeId(0),
                offset: i * 4096,
                data: Bytes::from(vec![(i % 7) as u8; 4096]),
            }),
        })
        .collect();
    let messages = vec![
        Message::Batch(Batch {
            first_seq: Seq(42),
            entries: vec![
                BatchEntry {
                    time: Nanos(1),
                    body: EntryBody::Event(Event::WriteZeroes {
                        volume: VolumeId(0),
                        offset: 0,
                        len: 1 << 20,
                    }),
                },
                BatchEntry {
                    time: Nanos(2),
                    body: EntryBody::Event(Event::Discard {
                        volume: VolumeId(0),
                        offset: 1 << 20,
                        len: 4096,
                    }),
                },
                BatchEntry { time: Nanos(3), body: EntryBody::Event(Event::Barrier) },
                BatchEntry {
                    time: Nanos(4),
                    body: EntryBody::Event(Event::Bookmark(
                        Bookmark::new("b1", BookmarkKind::User, 0).unwrap(),
                    )),
                },
                BatchEntry {
                    time: Nanos(5),
                    body: EntryBody::Ref(BlockRef {
                        volume: VolumeId(0),
                        offset: 0,
                        len: 4096,
                        source: RefSource::Hash(ContentHash([2; 32])),
                    }),
                },
            ],
        }),
        Message::Batch(Batch { first_seq: Seq(47), entries: big }),
        Message::Ack { upto: Seq(346) },
        Message::Ping { nonce: 7 },
        Message::Pong { nonce: 7 },
        Message::HashRequest(HashRequest {
            id: 1,
            volume: VolumeId(0),
            shape: TreeShape::default(),
            level: 2,
            ranges: vec![NodeRange { first: 0, count: 16 }],
        }),
        Message::HashReply(HashReply {
            id: 1,
            volume: VolumeId(0),
            level: 2,
            hashes: vec![NodeHash([9; 32]); 16],
        }),
        Message::Resume {
            last_acked: Seq(3),
            replica: tidemark_sync::wire::ReplicaState::consistent(),
        },
        Message::Welcome(tidemark_sync::wire::Welcome { version: 1, node: "x".to_owned() }),
        Message::Refuse(Refuse {
            reason: RefuseReason::BUSY,
            supported: SUPPORTED_VERSIONS,
            message: "busy".to_owned(),
        }),
        Message::Hello(hello()),
        Message::Error { code: ErrorCode::SHUTDOWN, message: "bye".to_owned() },
        Message::SourceLineage(source_lineage()),
        Message::TargetLineage(LineageInfo::default()),
    ];
    for m in &messages {
        source.send(m).unwrap();
        assert_eq!(&source.recv().unwrap().unwrap(), m);
    }
    source.close().unwrap();
    assert_eq!(target_side.join().unwrap(), messages);
}

#[test]
fn a_protocol_version_mismatch_is_clear_on_both_sides() {
    let (ci, cr) = paired();
    // A future source: its Hello frame is in version 3 and speaks 2 to 3.
    let (source, mut target) = connections(&ci, &cr);
    let target_side = thread::spawn(move || {
        target
            .answer_session(
                "target-1",
                |_| Ok(target_lineage()),
                |_, _| Ok((Seq(0), tidemark_sync::wire::ReplicaState::consistent())),
            )
            .unwrap_err()
    });
    let mut frame = Vec::new();
    let future = Hello { versions: VersionRange { min: 2, max: 3 }, ..hello() };
    Codec::default().encode(&Message::Hello(future), &mut frame).unwrap();
    frame[4..6].copy_from_slice(&3u16.to_le_bytes());
    let (mut channel, mut codec) = source.into_parts();
    channel.send(&frame).unwrap();
    let reply = codec.decode(Bytes::from(channel.recv().unwrap().unwrap())).unwrap();
    match reply {
        Message::Refuse(r) => {
            assert_eq!(r.reason, RefuseReason::VERSION_MISMATCH);
            assert_eq!(r.supported, SUPPORTED_VERSIONS);
            assert!(r.message.contains("versions 2 to 3"), "{}", r.message);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let err = target_side.join().unwrap();
    assert!(
        matches!(
            err,
            ConnectionError::VersionMismatch { theirs: VersionRange { min: 2, max: 3 }, .. }
        ),
        "{err}"
    );

    // This version's source meeting a target that only speaks a future version.
    let (mut source, mut target) = connections(&ci, &cr);
    let target_side = thread::spawn(move || {
        let _ = target.recv();
        target
            .send(&Message::Refuse(Refuse {
                reason: RefuseReason::VERSION_MISMATCH,
                supported: VersionRange { min: 4, max: 5 },
                message: "upgrade".to_owned(),
            }))
            .unwrap();
    });
    let err = source.open_session(&hello(), &source_lineage()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "protocol version mismatch: this node speaks version 1, the peer speaks versions 4 to 5"
    );
    target_side.join().unwrap();
}

#[test]
fn a_refused_session_and_a_malformed_frame_are_reported() {
    let (ci, cr) = paired();
    let (mut source, mut target) = connections(&ci, &cr);
    let target_side = thread::spawn(move || {
        target
            .answer_session(
                "t",
                |h| {
                    Err(Refuse {
                        reason: RefuseReason::UNKNOWN_PAIR,
                        supported: SUPPORTED_VERSIONS,
                        message: format!("no pair {}", h.pair),
                    })
                },
                |_, _| unreachable!("a refused Hello goes no further"),
            )
            .unwrap_err()
    });
    let err = source.open_session(&hello(), &source_lineage()).unwrap_err();
    assert!(
        matches!(&err, ConnectionError::Refused { reason: RefuseReason::UNKNOWN_PAIR, message } if message.starts_with("no pair 0101")),
        "{err}"
    );
    assert!(matches!(target_side.join().unwrap(), ConnectionError::RefusedPeer { .. }));

    let (source, mut target) = connections(&ci, &cr);
    let (mut channel, _) = source.into_parts();
    channel.send(b"TDMW\x01\x00\x06\x00\x08\x00\x00\x00short").unwrap();
    let err = target.recv().unwrap_err();
    assert_eq!(err.to_string(), "Ack frame: truncated: 20 bytes needed, 17 present");
    // The sender is told why.
    let report = Codec::default().decode(Bytes::from(channel.recv().unwrap().unwrap())).unwrap();
    assert!(
        matches!(&report, Message::Error { code: ErrorCode::MALFORMED, message } if message.contains("Ack frame")),
        "{report:?}"
    );
}

/// The target's side of an opening whose lineage decision is `decide`'s, as a receiver
/// makes it.
fn answer_with_lineage(
    target: &mut Connection<PipeEnd>,
    ours: LineageInfo,
) -> Result<(Hello, u16, LineageInfo), ConnectionError> {
    let sent = ours.clone();
    target.answer_session(
        "target-1",
        move |_| Ok(sent),
        move |_, theirs| match tidemark_sync::lineage::decide(theirs, &ours) {
            Verdict::Conflict(c) => Err(Refuse {
                reason: c.reason(),
                supported: SUPPORTED_VERSIONS,
                message: c.to_string(),
            }),
            _ => Ok((Seq(0), tidemark_sync::wire::ReplicaState::consistent())),
        },
    )
}

#[test]
fn a_split_brain_is_refused_in_the_opening_and_the_operator_choice_resolves_it() {
    let (ci, cr) = paired();
    // The target is the old source: still in generation 1, with writes up to seq 45, past
    // the source's branch at 40.
    let old = LineageInfo {
        generations: tidemark_sync::lineage::chain(&[(1, 0)]),
        head: Seq(45),
        ..LineageInfo::default()
    };
    let (mut source, mut target) = connections(&ci, &cr);
    let t = old.clone();
    let target_side = thread::spawn(move || answer_with_lineage(&mut target, t).unwrap_err());
    let err = source.open_session(&hello(), &source_lineage()).unwrap_err();
    let ConnectionError::Refused { reason, message } = &err else { panic!("{err}") };
    assert_eq!(*reason, RefuseReason::SPLIT_BRAIN);
    assert!(message.contains("split brain"), "{message}");
    assert!(
        message.contains("0000000000000002") && message.contains("0000000000000001"),
        "{message}"
    );
    assert!(message.contains("seq 40") && message.contains("--discard-local-changes"), "{message}");
    assert!(matches!(
        target_side.join().unwrap(),
        ConnectionError::RefusedPeer { reason: RefuseReason::SPLIT_BRAIN, .. }
    ));

    // The source's operator chooses it: a resync that overwrites the target.
    let (mut source, mut target) = connections(&ci, &cr);
    let t = old.clone();
    let target_side = thread::spawn(move || answer_with_lineage(&mut target, t).unwrap());
    let wins = LineageInfo { source_wins: true, ..source_lineage() };
    let session = source.open_session(&hello(), &wins).unwrap();
    assert!(matches!(session.verdict, Verdict::Resync { .. }), "{:?}", session.verdict);
    assert_eq!(session.target_lineage, old);
    assert_eq!(target_side.join().unwrap().2, wins);
}

#[test]
fn a_peer_without_lineages_gets_a_clear_error_not_a_hang() {
    let (ci, cr) = paired();
    // A source built before lineages: it reads Welcome, fails on message 13 and says so.
    let (source, mut target) = connections(&ci, &cr);
    let target_side = thread::spawn(move || answer_with_lineage(&mut target, target_lineage()));
    let (mut channel, mut codec) = source.into_parts();
    let mut frame = Vec::new();
    codec.encode(&Message::Hello(hello()), &mut frame).unwrap();
    channel.send(&frame).unwrap();
    let welcome = codec.decode(Bytes::from(channel.recv().unwrap().unwrap())).unwrap();
    assert!(matches!(welcome, Message::Welcome(_)), "{welcome:?}");
    let lineage = channel.recv().unwrap().unwrap();
    assert_eq!(lineage[6], 13, "the target's lineage follows Welcome");
    frame.clear();
    let old_error = Message::Error {
        code: ErrorCode::MALFORMED,
        message: "frame header: unknown message type 13, expected 1 to 11".to_owned(),
    };
    codec.encode(&old_error, &mut frame).unwrap();
    channel.send(&frame).unwrap();
    let err = target_side.join().unwrap().unwrap_err();
    assert!(matches!(err, ConnectionError::NoLineage { peer: "source", .. }), "{err}");
    assert!(err.to_string().contains("built before lineages"), "{err}");

    // A target built before lineages: Welcome, then Resume.
    let (mut source, target) = connections(&ci, &cr);
    let target_side = thread::spawn(move || {
        let (mut channel, mut codec) = target.into_parts();
        let _hello = channel.recv().unwrap();
        for m in [
            Message::Welcome(tidemark_sync::wire::Welcome { version: 1, node: "old".to_owned() }),
            Message::Resume {
                last_acked: Seq(0),
                replica: tidemark_sync::wire::ReplicaState::consistent(),
            },
        ] {
            let mut frame = Vec::new();
            codec.encode(&m, &mut frame).unwrap();
            channel.send(&frame).unwrap();
        }
        channel
    });
    let err = source.open_session(&hello(), &source_lineage()).unwrap_err();
    assert!(matches!(err, ConnectionError::NoLineage { peer: "target", .. }), "{err}");
    drop(target_side.join().unwrap());
}

#[test]
fn throughput_smoke_over_tcp() {
    // Not a timing assertion: prints what one core pair moves through the whole stack.
    let (ci, cr) = paired();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    const MESSAGES: usize = 64;
    const LEN: usize = 1 << 20;
    let server = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut channel = accept_tcp(stream, &cr).unwrap();
        let mut buf = Vec::new();
        let mut total = 0;
        while channel.recv_into(&mut buf).unwrap() {
            total += buf.len();
        }
        total
    });
    let mut channel = connect_tcp(addr, &ci).unwrap();
    let message = vec![0x5au8; LEN];
    let start = Instant::now();
    for _ in 0..MESSAGES {
        channel.send(&message).unwrap();
    }
    channel.close().unwrap();
    let total = server.join().unwrap();
    let took = start.elapsed();
    assert_eq!(total, MESSAGES * LEN);
    println!(
        "secure channel over TCP loopback: {} MiB in {:?} = {:.0} MiB/s",
        total >> 20,
        took,
        total as f64 / (1 << 20) as f64 / took.as_secs_f64()
    );
}

#[test]
fn stream_trait_is_implemented_for_the_transports() {
    fn is_stream<S: Stream>() {}
    is_stream::<TcpStream>();
    is_stream::<std::os::unix::net::UnixStream>();
    is_stream::<PipeEnd>();
}
