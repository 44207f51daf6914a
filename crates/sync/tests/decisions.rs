//! The pure decision functions the threaded `Receiver`, `Shipper` and `SourcePair` share
//! with the deterministic simulation (`tests/src/sim`): batch admission, the resume and ack
//! rules, the replica state after the backlog, and the controller's job preparation.

use tidemark_journal::VolumeId;
use tidemark_journal::{Event, Seq};
use tidemark_sync::ApplyError;
use tidemark_sync::apply::{admit_batch, check_volumes};
use tidemark_sync::pair::{Job, decide, prepare_job, retry_of, windows_left_open};
use tidemark_sync::ship::{ShipError, check_ack, check_resume, replica_after_backlog};
use tidemark_sync::wire::{RefuseReason, ReplicaKind, ReplicaState, VolumeInfo};
use tidemark_tap::RegionSet;

#[test]
fn batch_admission_drops_duplicates_and_refuses_gaps() {
    assert_eq!(admit_batch(Seq(10), Seq(11), 5).unwrap(), 0);
    assert_eq!(admit_batch(Seq(10), Seq(8), 5).unwrap(), 3);
    assert_eq!(admit_batch(Seq(10), Seq(2), 5).unwrap(), 5, "an old batch is all duplicates");
    match admit_batch(Seq(10), Seq(12), 5) {
        Err(ApplyError::SequenceGap { expected, found }) => {
            assert_eq!((expected, found), (Seq(11), Seq(12)));
        }
        other => panic!("a gap was admitted: {other:?}"),
    }
}

#[test]
fn a_shrunken_volume_is_refused_by_name_and_a_grown_one_admitted() {
    let v = |size| [VolumeInfo { id: VolumeId(0), block_size: 4096, size }];
    assert!(check_volumes(&v(1 << 20), &[1 << 20]).is_ok());
    // A source that grew: its resize entry follows in the stream.
    assert!(check_volumes(&v(2 << 20), &[1 << 20]).is_ok());
    let r = check_volumes(&v(1 << 20), &[2 << 20]).unwrap_err();
    assert_eq!(r.reason, RefuseReason::VOLUME_MISMATCH);
    assert!(r.message.contains("0:1048576") && r.message.contains("0:2097152"), "{}", r.message);
    let r = check_volumes(&[], &[1 << 20]).unwrap_err();
    assert_eq!(r.reason, RefuseReason::VOLUME_MISMATCH);
}

#[test]
fn resume_and_ack_rules() {
    assert!(check_resume(Seq(5), Seq(9), Seq(3)).is_ok());
    assert!(matches!(check_resume(Seq(10), Seq(9), Seq(3)), Err(ShipError::TargetAhead { .. })));
    assert!(matches!(check_resume(Seq(2), Seq(9), Seq(3)), Err(ShipError::TargetBehind { .. })));
    assert!(check_ack(Seq(6), Seq(5), Seq(9)).unwrap());
    assert!(!check_ack(Seq(5), Seq(5), Seq(9)).unwrap(), "a repeated ack changes nothing");
    assert!(matches!(check_ack(Seq(4), Seq(5), Seq(9)), Err(ShipError::AckWentBack { .. })));
    assert!(matches!(check_ack(Seq(10), Seq(5), Seq(9)), Err(ShipError::AckAhead { .. })));
}

#[test]
fn the_backlog_markers_update_the_replica_state() {
    let blank = ReplicaState { kind: ReplicaKind::Blank, open_resyncs: vec![7] };
    // The initial sync's end is still in the backlog: the replica will be consistent, and
    // closing window 7 again would make the target refuse the second end.
    let after = replica_after_backlog(&blank, &[(Seq(20), Event::ResyncEnd { id: 7 })]);
    assert_eq!(after, ReplicaState::consistent());
    // A window opened in the backlog (before a source restart) must be closed by the next
    // resync: it is reported open.
    let begun = replica_after_backlog(
        &ReplicaState::consistent(),
        &[(Seq(3), Event::ResyncBegin { id: 9 })],
    );
    assert_eq!(begun, ReplicaState { kind: ReplicaKind::Inconsistent, open_resyncs: vec![9] });
    // A blank replica stays blank until its last window closes, then a new window makes it
    // inconsistent, not blank.
    let two = replica_after_backlog(
        &blank,
        &[
            (Seq(1), Event::ResyncBegin { id: 8 }),
            (Seq(2), Event::ResyncEnd { id: 8 }),
            (Seq(3), Event::ResyncEnd { id: 7 }),
            (Seq(4), Event::ResyncBegin { id: 10 }),
        ],
    );
    assert_eq!(two, ReplicaState { kind: ReplicaKind::Inconsistent, open_resyncs: vec![10] });
    let still_blank = replica_after_backlog(&blank, &[(Seq(1), Event::ResyncBegin { id: 8 })]);
    assert_eq!(still_blank.kind, ReplicaKind::Blank);
}

#[test]
fn jobs_close_leftover_windows_and_step_one_needs_no_regions_out_of_sync() {
    let mut pending = RegionSet::new();
    let blank = ReplicaState { kind: ReplicaKind::Blank, open_resyncs: vec![1] };
    assert_eq!(decide(Some(&blank), false, &pending, None), Some(Job::Initial { close: vec![1] }));
    pending.insert(3);
    // Regions out of sync may hold zeros over data the replica received: compare them.
    assert_eq!(decide(Some(&blank), false, &pending, None), Some(Job::Full { close: vec![1] }));
    assert_eq!(
        prepare_job(Job::Initial { close: vec![1] }, &pending, &[5, 1]),
        Job::Full { close: vec![1, 5] }
    );
    assert_eq!(
        prepare_job(Job::Initial { close: vec![] }, &RegionSet::new(), &[5]),
        Job::Initial { close: vec![5] }
    );
    // A failed run: what it was to close and did not, plus its own window.
    assert_eq!(windows_left_open(&[1, 5], &[1], &[42]), vec![5, 42]);
    assert!(windows_left_open(&[1, 5], &[1, 5, 42], &[]).is_empty());
    assert_eq!(retry_of(&Job::Full { close: vec![1] }), Some(Job::Full { close: vec![] }));
    assert_eq!(retry_of(&Job::Regions(pending)), None);
}
