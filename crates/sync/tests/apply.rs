//! The receiver at the protocol level, driven by a hand-written source over an in-memory
//! pipe: resume points, acks of durable data only, duplicates dropped, gaps and writes
//! outside the volume refused with the protocol's error codes and nothing applied, a newer
//! connection replacing the live one, refusals of the wrong pair or volumes, and a storage
//! failure that stops acks and refuses later sessions.

mod common;

use std::thread;

use bytes::Bytes;
use common::*;
use std::sync::Arc;
use tidemark_journal::{Event, Nanos, Seq, VolumeId};

use tidemark_sync::apply::{ApplyError, Receiver, ReceiverConfig};
use tidemark_sync::connection::{Connection, ConnectionError, Session};
use tidemark_sync::lineage::{LineageFile, LineageStore, Verdict};
use tidemark_sync::pipe::{PipeEnd, duplex};
use tidemark_sync::secure::{SecureChannel, SecureConfig};
use tidemark_sync::wire::{
    Batch, BatchEntry, BlockRef, Codec, ContentHash, EntryBody, ErrorCode, Generation, Hello,
    Message, PairId, RefSource, RefuseReason, VolumeInfo,
};

fn connect(target: &Target, cs: &SecureConfig) -> (Connection<PipeEnd>, Server) {
    let (a, b) = duplex(1 << 20);
    let r = target.receiver.clone();
    let server = thread::spawn(move || r.serve(b));
    let channel = SecureChannel::initiate(a, cs).unwrap();
    (Connection::new(channel, Codec::default()).unwrap(), server)
}

fn open(target: &Target, cs: &SecureConfig) -> (Connection<PipeEnd>, Session, Server) {
    let (mut conn, server) = connect(target, cs);
    let session = conn.open_session(&hello(), &lineage()).unwrap();
    // The receiver's dedupe window holds writes up to the resume point at most.
    let held = conn.recv_dedupe_held().unwrap();
    assert!(held.0 >= 1 && held <= session.last_acked.next(), "DedupeHeld from {held}");
    (conn, session, server)
}

fn write(seq: u64) -> BatchEntry {
    BatchEntry {
        time: Nanos(seq),
        body: EntryBody::Event(Event::Write {
            volume: VolumeId(0),
            offset: (seq % 64) * BLOCK,
            data: Bytes::from(vec![seq as u8; BLOCK as usize]),
        }),
    }
}

fn batch(first: u64, count: u64) -> Message {
    Message::Batch(Batch {
        first_seq: Seq(first),
        entries: (first..first + count).map(write).collect(),
    })
}

fn next(conn: &mut Connection<PipeEnd>) -> Message {
    conn.recv().unwrap().expect("a message")
}

#[test]
fn resume_acks_duplicates_and_gaps() {
    let (cs, ct) = paired();
    let target = Target::new(ct);
    let (mut conn, session, server) = open(&target, &cs);
    assert_eq!(session.last_acked, Seq(0));
    assert_eq!(session.peer_node, "target-1");

    conn.send(&batch(1, 5)).unwrap();
    assert_eq!(next(&mut conn), Message::Ack { upto: Seq(5) });
    // Overlapping the last batch: 3..=5 are dropped, 6..=8 applied.
    conn.send(&batch(3, 6)).unwrap();
    assert_eq!(next(&mut conn), Message::Ack { upto: Seq(8) });
    assert_eq!(target.receiver.status().duplicates, 3);
    // All duplicates: nothing to apply, nothing to ack, the connection lives on.
    conn.send(&batch(1, 3)).unwrap();
    conn.send(&Message::Ping { nonce: 9 }).unwrap();
    assert_eq!(next(&mut conn), Message::Pong { nonce: 9 });
    // The reader answers the ping; the applier may still be on the batch before it.
    assert!(target.receiver.wait_for(PATIENCE, |s| s.duplicates == 6).is_some());
    assert_eq!(target.receiver.status().received, Seq(8));
    assert_eq!(target.journal_seqs(), (1..=8).collect::<Vec<_>>());

    // A gap: refused with code 3, and nothing of it applied.
    conn.send(&batch(10, 2)).unwrap();
    match next(&mut conn) {
        Message::Error { code, message } => {
            assert_eq!(code, ErrorCode::SEQUENCE_GAP);
            assert!(message.contains("expected a batch starting at or below seq 9"), "{message}");
        }
        other => panic!("expected an error, got {other:?}"),
    }
    drop(conn);
    let err = server.join().unwrap().unwrap_err();
    assert!(matches!(err, ApplyError::SequenceGap { expected: Seq(9), found: Seq(10) }), "{err}");
    assert_eq!(target.journal_seqs(), (1..=8).collect::<Vec<_>>());

    // The next connection resumes after the last durable event.
    let (mut conn, session, server) = open(&target, &cs);
    assert_eq!(session.last_acked, Seq(8));
    conn.send(&batch(9, 1)).unwrap();
    assert_eq!(next(&mut conn), Message::Ack { upto: Seq(9) });
    conn.close().unwrap();
    assert_eq!(conn.recv().unwrap(), None, "the target closes after the source");
    server.join().unwrap().unwrap();
    assert_eq!(target.journal_seqs(), (1..=9).collect::<Vec<_>>());
}

#[test]
fn a_batch_with_a_write_outside_the_volume_is_refused_whole() {
    let (cs, ct) = paired();
    let target = Target::new(ct);
    let (mut conn, _, server) = open(&target, &cs);
    let outside = BatchEntry {
        time: Nanos(2),
        body: EntryBody::Event(Event::Write {
            volume: VolumeId(0),
            offset: VOLUME - 100,
            data: Bytes::from(vec![1; 200]),
        }),
    };
    conn.send(&Message::Batch(Batch { first_seq: Seq(1), entries: vec![write(1), outside] }))
        .unwrap();
    match next(&mut conn) {
        Message::Error { code, message } => {
            assert_eq!(code, ErrorCode::OUT_OF_RANGE);
            assert!(
                message.contains("seq 2") && message.contains("outside the volume"),
                "{message}"
            );
        }
        other => panic!("expected an error, got {other:?}"),
    }
    drop(conn);
    let err = server.join().unwrap().unwrap_err();
    assert!(matches!(err, ApplyError::OutOfRange { seq: Seq(2), .. }), "{err}");
    assert_eq!(target.receiver.status().events, 0, "the valid entry before it was not applied");
    assert_eq!(target.receiver.with_log(|l| l.last_seq()), Seq(0));

    // A volume the pair does not have, and a dedupe reference: refused the same way.
    let (mut conn, session, server) = open(&target, &cs);
    assert_eq!(session.last_acked, Seq(0));
    let other_volume = BatchEntry {
        time: Nanos(1),
        body: EntryBody::Event(Event::Discard { volume: VolumeId(1), offset: 0, len: 4096 }),
    };
    conn.send(&Message::Batch(Batch { first_seq: Seq(1), entries: vec![other_volume] })).unwrap();
    assert!(matches!(next(&mut conn), Message::Error { code: ErrorCode::OUT_OF_RANGE, .. }));
    drop(conn);
    assert!(server.join().unwrap().is_err());
    let (mut conn, _, server) = open(&target, &cs);
    let reference = BatchEntry {
        time: Nanos(1),
        body: EntryBody::Ref(BlockRef {
            volume: VolumeId(0),
            offset: 0,
            len: 4096,
            source: RefSource::Hash(ContentHash([3; 32])),
        }),
    };
    conn.send(&Message::Batch(Batch { first_seq: Seq(1), entries: vec![reference] })).unwrap();
    assert!(matches!(next(&mut conn), Message::Error { code: ErrorCode::UNKNOWN_REFERENCE, .. }));
    drop(conn);
    assert!(matches!(
        server.join().unwrap(),
        Err(ApplyError::UnknownReference { seq: Seq(1), .. })
    ));
    assert!(target.journal_seqs().is_empty(), "nothing reached the journal");
}

#[test]
fn the_wrong_pair_or_volumes_are_refused() {
    let (cs, ct) = paired();
    let target = Target::new(ct);
    let (mut conn, server) = connect(&target, &cs);
    let err =
        conn.open_session(&Hello { pair: PairId([9; 16]), ..hello() }, &lineage()).unwrap_err();
    match &err {
        ConnectionError::Refused { reason, message } => {
            assert_eq!(*reason, RefuseReason::UNKNOWN_PAIR);
            assert!(message.contains("09090909"), "{message}");
        }
        other => panic!("expected a refusal, got {other}"),
    }
    assert!(server.join().unwrap().is_err());

    let (mut conn, server) = connect(&target, &cs);
    // A source volume smaller than the replica (a larger one may be a growth on its way).
    let smaller = Hello {
        volumes: vec![VolumeInfo { id: VolumeId(0), block_size: 4096, size: VOLUME / 2 }],
        ..hello()
    };
    let err = conn.open_session(&smaller, &lineage()).unwrap_err();
    assert!(
        matches!(&err, ConnectionError::Refused { reason: RefuseReason::VOLUME_MISMATCH, message }
            if message.contains(&format!("0:{VOLUME}"))),
        "{err}"
    );
    assert!(server.join().unwrap().is_err());
    assert_eq!(target.receiver.status().sessions, 0);
}

#[test]
fn a_split_brain_is_refused_with_nothing_applied_until_the_source_is_chosen() {
    let (cs, ct) = paired();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lineage");
    let plain = Target::new(ct.clone());
    let mut cfg = ReceiverConfig::new("target-1", PAIR, ct);
    cfg.lineage = Arc::new(LineageStore::open(path.clone()).unwrap());
    let log = plain.receiver.into_log().unwrap_or_else(|_| panic!("the log is shared"));
    let target = Target { receiver: Receiver::new(log, cfg).unwrap(), ..plain };

    // The old source's generation: the blank target adopts it (durably) and takes 10 events.
    let (mut conn, session, server) = open(&target, &cs);
    assert_eq!(session.verdict, Verdict::Adopt);
    assert_eq!(LineageFile::load(&path).unwrap().unwrap().generations, lineage().generations);
    conn.send(&batch(1, 10)).unwrap();
    assert_eq!(next(&mut conn), Message::Ack { upto: Seq(10) });
    conn.close().unwrap();
    assert_eq!(conn.recv().unwrap(), None);
    server.join().unwrap().unwrap();

    // A promoted copy of seq 5 of that generation: the target went on past it. Refused.
    let mut promoted = lineage();
    promoted.generations.push(Generation { id: 0xb0b, parent: 0x7e57, branch_seq: Seq(5) });
    promoted.full_resync = true;
    let (mut conn, server) = connect(&target, &cs);
    let err = conn.open_session(&hello(), &promoted).unwrap_err();
    let ConnectionError::Refused { reason, message } = &err else { panic!("{err}") };
    assert_eq!(*reason, RefuseReason::SPLIT_BRAIN);
    assert!(message.contains("0000000000000b0b") && message.contains("seq 5"), "{message}");
    assert!(message.contains("target at seq 10"), "{message}");
    assert!(server.join().unwrap().is_err());
    assert_eq!(target.journal_seqs(), (1..=10).collect::<Vec<_>>(), "nothing applied");
    assert_eq!(LineageFile::load(&path).unwrap().unwrap().generations, lineage().generations);
    assert!(target.receiver.status().last_error.unwrap().contains("split brain"));

    // The operator chooses the source: a resync; the target takes its lineage.
    promoted.source_wins = true;
    let (mut conn, server) = connect(&target, &cs);
    let session = conn.open_session(&hello(), &promoted).unwrap();
    conn.recv_dedupe_held().unwrap();
    assert!(matches!(session.verdict, Verdict::Resync { .. }), "{:?}", session.verdict);
    assert_eq!(LineageFile::load(&path).unwrap().unwrap().generations, promoted.generations);
    conn.close().unwrap();
    assert_eq!(conn.recv().unwrap(), None);
    server.join().unwrap().unwrap();
}

#[test]
fn a_newer_connection_replaces_the_live_one() {
    let (cs, ct) = paired();
    let target = Target::new(ct);
    let (mut first, _, first_server) = open(&target, &cs);
    first.send(&batch(1, 3)).unwrap();
    assert_eq!(next(&mut first), Message::Ack { upto: Seq(3) });

    let (mut second, session, second_server) = open(&target, &cs);
    assert_eq!(session.last_acked, Seq(3));
    assert!(first.recv().is_err(), "the replaced connection is shut down");
    assert!(first_server.join().unwrap().is_err());
    assert_eq!(target.receiver.status().replaced, 1);

    second.send(&batch(4, 2)).unwrap();
    assert_eq!(next(&mut second), Message::Ack { upto: Seq(5) });
    second.close().unwrap();
    assert_eq!(second.recv().unwrap(), None);
    second_server.join().unwrap().unwrap();
    assert_eq!(target.journal_seqs(), (1..=5).collect::<Vec<_>>());
}

#[test]
fn a_failed_sync_is_never_acknowledged_and_later_sessions_are_refused() {
    let (cs, ct) = paired();
    let target = Target::new(ct);
    let (mut conn, _, server) = open(&target, &cs);
    conn.send(&batch(1, 2)).unwrap();
    assert_eq!(next(&mut conn), Message::Ack { upto: Seq(2) });

    target.dir.set_syncs_left(Some(0));
    conn.send(&batch(3, 2)).unwrap();
    match next(&mut conn) {
        Message::Error { code, message } => {
            assert_eq!(code, ErrorCode::STORAGE, "{message}");
            assert!(message.contains("group commit"), "{message}");
        }
        other => panic!("no ack for data that is not durable; got {other:?}"),
    }
    drop(conn);
    assert!(matches!(server.join().unwrap(), Err(ApplyError::Storage { .. })));
    let status = target.receiver.status();
    assert_eq!(status.acked, Seq(2));
    assert!(status.failed.is_some());

    target.dir.set_syncs_left(None);
    let (mut conn, server) = connect(&target, &cs);
    let err = conn.open_session(&hello(), &lineage()).unwrap_err();
    assert!(
        matches!(&err, ConnectionError::Refused { reason: RefuseReason::UNAVAILABLE, .. }),
        "{err}"
    );
    assert!(server.join().unwrap().is_err());
}
