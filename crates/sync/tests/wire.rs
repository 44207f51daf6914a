//! The wire codec: every message type round-trips (plain and compressed), the layout is
//! the documented one byte for byte, and malformed frames are refused with the typed error
//! that names them, before anything is allocated from an untrusted size.

use bytes::Bytes;
use proptest::prelude::*;
use tidemark_journal::{Bookmark, BookmarkKind, Event, Nanos, Seq, VolumeId};
use tidemark_sync::wire::codec::{ENTRY_HEADER_LEN, fuzz_frame, max_hashes_per_reply};
use tidemark_sync::wire::{
    Batch, BatchEntry, BlockRef, Codec, Compression, ContentHash, DEDUPE_BLOCK, DedupedWrite,
    EntryBody, ErrorCode, FRAME_HEADER_LEN, Generation, HashReply, HashRequest, Hello, LineageInfo,
    Message, MessageType, NodeHash, NodeRange, PairId, RefSource, RefSpan, Refuse, RefuseReason,
    RepairRange, RepairRequest, ReplicaKind, ReplicaState, Role, SUPPORTED_VERSIONS, TreeShape,
    VersionRange, VolumeInfo, Welcome, WireError,
};

fn encode(message: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    Codec::default().encode(message, &mut out).expect("encodes");
    out
}

fn decode(frame: &[u8]) -> Result<Message, WireError> {
    Codec::default().decode_slice(frame)
}

fn hello() -> Hello {
    Hello {
        versions: SUPPORTED_VERSIONS,
        role: Role::Source,
        node: "source-1".to_owned(),
        pair: PairId([9; 16]),
        volumes: vec![
            VolumeInfo { id: VolumeId(0), block_size: 4096, size: 1 << 30 },
            VolumeInfo { id: VolumeId(3), block_size: 512, size: 512 * 1000 },
        ],
    }
}

fn sample_batch() -> Batch {
    let at = |s: u64| Nanos(1_700_000_000_000_000_000 + s);
    Batch {
        first_seq: Seq(41),
        entries: vec![
            BatchEntry {
                time: at(1),
                body: EntryBody::Event(Event::Write {
                    volume: VolumeId(1),
                    offset: 8192,
                    data: Bytes::from(vec![7u8; 4096]),
                }),
            },
            BatchEntry {
                time: at(2),
                body: EntryBody::Event(Event::WriteZeroes {
                    volume: VolumeId(0),
                    offset: 0,
                    len: 1 << 20,
                }),
            },
            BatchEntry {
                time: at(3),
                body: EntryBody::Event(Event::Discard {
                    volume: VolumeId(0),
                    offset: 4096,
                    len: 512,
                }),
            },
            BatchEntry { time: at(4), body: EntryBody::Event(Event::Barrier) },
            BatchEntry {
                time: at(5),
                body: EntryBody::Event(Event::Bookmark(
                    Bookmark::new("nightly", BookmarkKind::Application, 7).unwrap(),
                )),
            },
            BatchEntry {
                time: at(6),
                body: EntryBody::Ref(BlockRef {
                    volume: VolumeId(1),
                    offset: 1 << 20,
                    len: 4096,
                    source: RefSource::Earlier { seq: Seq(41), at: 0 },
                }),
            },
            BatchEntry {
                time: at(7),
                body: EntryBody::Ref(BlockRef {
                    volume: VolumeId(1),
                    offset: 2 << 20,
                    len: 4096,
                    source: RefSource::Hash(ContentHash([0xab; 32])),
                }),
            },
        ],
    }
}

/// One of each message type.
fn every_message() -> Vec<Message> {
    vec![
        Message::Hello(hello()),
        Message::Welcome(Welcome { version: 1, node: "target-1".to_owned() }),
        Message::Refuse(Refuse {
            reason: RefuseReason::UNKNOWN_PAIR,
            supported: SUPPORTED_VERSIONS,
            message: "no such pair".to_owned(),
        }),
        Message::Resume { last_acked: Seq(40), replica: ReplicaState::consistent() },
        Message::Batch(sample_batch()),
        Message::Ack { upto: Seq(47) },
        Message::Error { code: ErrorCode::SEQUENCE_GAP, message: "expected seq 48".to_owned() },
        Message::Ping { nonce: 0xdead_beef },
        Message::Pong { nonce: 0xdead_beef },
        Message::HashRequest(HashRequest {
            id: 5,
            volume: VolumeId(0),
            shape: TreeShape::default(),
            level: 3,
            ranges: vec![NodeRange { first: 0, count: 16 }, NodeRange { first: 32, count: 4 }],
        }),
        Message::HashReply(HashReply {
            id: 5,
            volume: VolumeId(0),
            level: 3,
            hashes: (0..20u8).map(|i| NodeHash([i; 32])).collect(),
        }),
        Message::SourceLineage(sample_lineage()),
        Message::TargetLineage(LineageInfo::default()),
        Message::RepairRequest(RepairRequest {
            ids: vec![0x1234_5678_9abc_def0],
            ranges: vec![
                RepairRange { volume: VolumeId(0), offset: 8192, len: 8192 },
                RepairRange { volume: VolumeId(1), offset: 0, len: 1 << 30 },
            ],
        }),
        Message::DedupeHeld { from: Seq(31) },
    ]
}

/// A promoted side's lineage: a root and a child branched at seq 40.
fn sample_lineage() -> LineageInfo {
    let generations = tidemark_sync::lineage::chain(&[(0x1111, 0), (0x2222, 40)]);
    LineageInfo { generations, head: Seq(7), dirty: true, source_wins: true, full_resync: true }
}

#[test]
fn lineage_messages_are_laid_out_as_specified_and_bad_chains_refused() {
    let mut codec = Codec::default();
    let mut frame = Vec::new();
    codec.encode(&Message::SourceLineage(sample_lineage()), &mut frame).unwrap();
    assert_eq!(frame[6], 12);
    let body = &frame[12..];
    assert_eq!(body.len(), 16 + 2 * 24);
    assert_eq!(&body[0..8], &7u64.to_le_bytes());
    assert_eq!(body[8], 0b111, "dirty, source wins, full resync");
    assert_eq!(&body[9..12], &[0, 0, 0]);
    assert_eq!(&body[12..16], &2u32.to_le_bytes());
    assert_eq!(&body[40..48], &0x2222u64.to_le_bytes());
    assert_eq!(&body[48..56], &0x1111u64.to_le_bytes());
    assert_eq!(&body[56..64], &40u64.to_le_bytes());

    let mut refuse = |bytes: &[u8], field: &str| {
        let err = codec.decode_slice(bytes).unwrap_err();
        assert!(
            matches!(&err, WireError::InvalidField { field: f, .. } if *f == field),
            "{field}: {err}"
        );
    };
    // A child whose parent is not the generation before it.
    let mut bad = frame.clone();
    bad[12 + 40 + 8] ^= 1;
    refuse(&bad, "parent");
    // An unknown flag, a count beyond the bytes, an id of 0.
    let mut bad = frame.clone();
    bad[12 + 8] |= 0x80;
    refuse(&bad, "flags");
    let mut bad = frame.clone();
    bad[12 + 12] = 3;
    refuse(&bad, "generation_count");
    let mut bad = frame.clone();
    bad[12 + 16..12 + 24].fill(0);
    refuse(&bad, "generation id");
    // A source must name its generation; a blank target names none.
    let empty = LineageInfo::default();
    let mut out = Vec::new();
    assert!(codec.encode(&Message::SourceLineage(empty.clone()), &mut out).is_err());
    codec.encode(&Message::TargetLineage(empty.clone()), &mut out).unwrap();
    assert_eq!(codec.decode_slice(&out).unwrap(), Message::TargetLineage(empty));
}

#[test]
fn every_message_type_round_trips_plain_and_compressed() {
    let messages = every_message();
    let types: Vec<MessageType> = messages.iter().map(Message::message_type).collect();
    assert_eq!(types, MessageType::ALL, "the list covers every type once");
    for compression in [Compression::Off, Compression::Zstd { level: 3 }] {
        let mut codec = Codec::default();
        codec.set_compression(compression);
        for m in &messages {
            let mut frame = Vec::new();
            codec.encode(m, &mut frame).unwrap();
            assert_eq!(&codec.decode_slice(&frame).unwrap(), m, "{compression:?}");
        }
    }
}

#[test]
fn dedupe_held_frame_has_the_documented_layout_and_a_wrong_length_is_refused() {
    let frame = encode(&Message::DedupeHeld { from: Seq(0x0102_0304_0506_0708) });
    assert_eq!(
        frame,
        [
            b'T', b'D', b'M', b'W', // magic
            1, 0,  // version 1
            15, // type DedupeHeld
            0,  // flags
            8, 0, 0, 0, // body length
            8, 7, 6, 5, 4, 3, 2, 1, // from, little-endian
        ]
    );
    let mut long = frame.clone();
    long[8] = 9;
    long.push(0);
    assert!(Codec::default().decode_slice(&long).is_err(), "a 9-byte body decoded");
}

#[test]
fn ack_frame_has_the_documented_layout() {
    let frame = encode(&Message::Ack { upto: Seq(0x0102_0304_0506_0708) });
    assert_eq!(
        frame,
        [
            b'T', b'D', b'M', b'W', // magic
            1, 0, // version 1
            6, // type Ack
            0, // flags
            8, 0, 0, 0, // body length
            8, 7, 6, 5, 4, 3, 2, 1, // upto, little-endian
        ]
    );
}

#[test]
fn batch_entry_layout_is_24_bytes_then_the_data() {
    let batch = Batch {
        first_seq: Seq(1),
        entries: vec![BatchEntry {
            time: Nanos(2),
            body: EntryBody::Event(Event::Write {
                volume: VolumeId(3),
                offset: 4,
                data: Bytes::from_static(b"xyz"),
            }),
        }],
    };
    let frame = encode(&Message::Batch(batch));
    let body = &frame[FRAME_HEADER_LEN..];
    assert_eq!(body.len(), 16 + ENTRY_HEADER_LEN + 3);
    assert_eq!(&body[0..8], &1u64.to_le_bytes(), "first_seq");
    assert_eq!(&body[8..12], &1u32.to_le_bytes(), "entry count");
    let e = &body[16..];
    assert_eq!(e[0], 1, "kind write");
    assert_eq!(&e[2..4], &3u16.to_le_bytes(), "volume");
    assert_eq!(&e[4..8], &3u32.to_le_bytes(), "length");
    assert_eq!(&e[8..16], &2u64.to_le_bytes(), "time");
    assert_eq!(&e[16..24], &4u64.to_le_bytes(), "offset");
    assert_eq!(&e[24..], b"xyz");
}

#[test]
fn a_resize_entry_has_the_documented_layout_and_a_shrink_is_refused() {
    let resize = |old_size, new_size| {
        Message::Batch(Batch {
            first_seq: Seq(9),
            entries: vec![BatchEntry {
                time: Nanos(5),
                body: EntryBody::Event(Event::Resize { volume: VolumeId(2), old_size, new_size }),
            }],
        })
    };
    let m = resize(1 << 20, 3 << 20);
    let frame = encode(&m);
    let e = &frame[FRAME_HEADER_LEN + 16..];
    assert_eq!(e.len(), ENTRY_HEADER_LEN + 16);
    assert_eq!(e[0], 10, "kind resize");
    assert_eq!(&e[2..4], &2u16.to_le_bytes(), "volume");
    assert_eq!(&e[4..8], &0u32.to_le_bytes(), "length");
    assert_eq!(&e[16..24], &0u64.to_le_bytes(), "offset");
    assert_eq!(&e[24..32], &(1u64 << 20).to_le_bytes(), "old size");
    assert_eq!(&e[32..40], &(3u64 << 20).to_le_bytes(), "new size");
    assert_eq!(decode(&frame).unwrap(), m);
    // A repeat (equal sizes) is valid; a shrink is refused, naming the field.
    assert_eq!(decode(&encode(&resize(7 << 12, 7 << 12))).unwrap(), resize(7 << 12, 7 << 12));
    let mut bad = frame.clone();
    let n = bad.len();
    bad[n - 8..].copy_from_slice(&(1u64 << 19).to_le_bytes());
    let err = decode(&bad).unwrap_err().to_string();
    assert!(err.contains("new_size") && err.contains("only grow"), "{err}");
    // An offset on a resize entry is refused too.
    let mut bad = frame;
    bad[FRAME_HEADER_LEN + 16 + 16] = 1;
    assert!(decode(&bad).unwrap_err().to_string().contains("resize"));
}

#[test]
fn compression_shrinks_a_compressible_batch_and_skips_an_incompressible_one() {
    let mut codec = Codec::default();
    codec.set_compression(Compression::Zstd { level: 3 });
    let batch = |data: Vec<u8>| {
        Message::Batch(Batch {
            first_seq: Seq(1),
            entries: vec![BatchEntry {
                time: Nanos(1),
                body: EntryBody::Event(Event::Write {
                    volume: VolumeId(0),
                    offset: 0,
                    data: data.into(),
                }),
            }],
        })
    };
    let mut frame = Vec::new();
    codec.encode(&batch(vec![0x41; 1 << 20]), &mut frame).unwrap();
    assert_eq!(frame[7], 1, "compressed flag set");
    assert!(frame.len() < 10_000, "1 MiB of one byte compresses ({} bytes)", frame.len());

    let mut noise = vec![0u8; 64 << 10];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for b in &mut noise {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let mut frame = Vec::new();
    codec.encode(&batch(noise.clone()), &mut frame).unwrap();
    assert_eq!(frame[7], 0, "random data goes uncompressed");
    assert_eq!(codec.decode_slice(&frame).unwrap(), batch(noise));
}

#[test]
fn truncated_frames_name_what_is_missing() {
    let frame = encode(&Message::Hello(hello()));
    for cut in [0, 5, 11, 12, 40, frame.len() - 1] {
        let err = decode(&frame[..cut]).unwrap_err();
        assert!(matches!(err, WireError::Truncated { .. }), "cut {cut}: {err}");
        assert!(err.to_string().contains("truncated"), "{err}");
    }
    let mut longer = frame.clone();
    longer.push(0);
    assert!(matches!(decode(&longer).unwrap_err(), WireError::TrailingBytes { count: 1, .. }));
}

#[test]
fn bad_magic_and_unknown_type_are_named() {
    let mut frame = encode(&Message::Ping { nonce: 1 });
    frame[0] = b'X';
    let err = decode(&frame).unwrap_err();
    assert!(matches!(err, WireError::BadMagic { found, .. } if found == *b"XDMW"), "{err}");
    let mut frame = encode(&Message::Ping { nonce: 1 });
    frame[6] = 200;
    let err = decode(&frame).unwrap_err();
    assert!(matches!(err, WireError::UnknownMessageType { found: 200, .. }), "{err}");
}

#[test]
fn a_hello_from_another_version_reports_its_whole_range() {
    let mut frame =
        encode(&Message::Hello(Hello { versions: VersionRange { min: 2, max: 4 }, ..hello() }));
    frame[4..6].copy_from_slice(&3u16.to_le_bytes());
    let err = decode(&frame).unwrap_err();
    match err {
        WireError::VersionMismatch { ours, theirs } => {
            assert_eq!(ours, SUPPORTED_VERSIONS);
            assert_eq!(theirs, VersionRange { min: 2, max: 4 });
        }
        other => panic!("expected a version mismatch, got {other}"),
    }
    // Any other type in a foreign version is refused too, naming the version seen.
    let mut frame = encode(&Message::Ack { upto: Seq(1) });
    frame[4..6].copy_from_slice(&9u16.to_le_bytes());
    let err = decode(&frame).unwrap_err();
    assert!(err.to_string().contains("the peer speaks version 9"), "{err}");
    // A refusal stays readable whatever its version: it is how a mismatch is explained.
    let refuse = Message::Refuse(Refuse {
        reason: RefuseReason::VERSION_MISMATCH,
        supported: VersionRange { min: 5, max: 6 },
        message: "speak 5 or 6".to_owned(),
    });
    let mut frame = encode(&refuse);
    frame[4..6].copy_from_slice(&6u16.to_le_bytes());
    assert_eq!(decode(&frame).unwrap(), refuse);
}

#[test]
fn oversized_frames_are_refused_from_the_header_alone() {
    let mut codec = Codec::new(1 << 20).unwrap();
    let mut header = encode(&Message::Ping { nonce: 1 });
    header.truncate(FRAME_HEADER_LEN);
    header[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    // Only the 12 header bytes are there: the verdict comes from the length field.
    let err = codec.decode_slice(&header).unwrap_err();
    assert!(
        matches!(err, WireError::FrameTooLarge { len, max, .. } if len == u64::from(u32::MAX) + 12 && max == 1 << 20),
        "{err}"
    );
    // A sender refuses to build one either.
    let big = Message::Batch(Batch {
        first_seq: Seq(1),
        entries: vec![BatchEntry {
            time: Nanos(0),
            body: EntryBody::Event(Event::Write {
                volume: VolumeId(0),
                offset: 0,
                data: vec![0; 2 << 20].into(),
            }),
        }],
    });
    let mut out = vec![1, 2, 3];
    let err = codec.encode(&big, &mut out).unwrap_err();
    assert!(matches!(err, WireError::FrameTooLarge { .. }), "{err}");
    assert_eq!(out, [1, 2, 3], "a refused encode leaves the buffer as it was");
}

#[test]
fn a_compressed_body_is_bounded_by_its_declared_length_and_the_maximum() {
    let mut codec = Codec::new(1 << 20).unwrap();
    let bomb = zstd::bulk::compress(&vec![0u8; 8 << 20], 3).unwrap();
    let frame = |declared: u32, data: &[u8]| {
        let mut f = b"TDMW".to_vec();
        f.extend_from_slice(&1u16.to_le_bytes());
        f.push(MessageType::Batch as u8);
        f.push(1);
        f.extend_from_slice(&((4 + data.len()) as u32).to_le_bytes());
        f.extend_from_slice(&declared.to_le_bytes());
        f.extend_from_slice(data);
        f
    };
    // Declares more than the maximum: refused before decompressing.
    let err = codec.decode_slice(&frame(8 << 20, &bomb)).unwrap_err();
    assert!(matches!(err, WireError::FrameTooLarge { .. }), "{err}");
    // Declares little, holds a lot: zstd stops at the declared length.
    let err = codec.decode_slice(&frame(1000, &bomb)).unwrap_err();
    assert!(matches!(err, WireError::Decompress { declared: 1000, .. }), "{err}");
    // Compression on a type that has none.
    let mut ping = encode(&Message::Ping { nonce: 1 });
    ping[7] = 1;
    let err = codec.decode_slice(&ping).unwrap_err();
    assert!(matches!(err, WireError::InvalidField { field: "flags", .. }), "{err}");
}

#[test]
fn counts_are_checked_against_the_bytes_present_before_allocating() {
    let mut frame = encode(&Message::Batch(sample_batch()));
    let count_at = FRAME_HEADER_LEN + 8;
    frame[count_at..count_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    let err = decode(&frame).unwrap_err();
    assert!(matches!(err, WireError::InvalidField { field: "entry_count", .. }), "{err}");

    let mut frame = encode(&every_message()[10]);
    let count_at = FRAME_HEADER_LEN + 8;
    frame[count_at..count_at + 4].copy_from_slice(&(u32::MAX / 2).to_le_bytes());
    let err = decode(&frame).unwrap_err();
    assert!(matches!(err, WireError::InvalidField { field: "hash_count", .. }), "{err}");
}

#[test]
fn field_rules_are_enforced_both_ways() {
    let mut codec = Codec::default();
    let mut out = Vec::new();
    let bad_ref = Message::Batch(Batch {
        first_seq: Seq(10),
        entries: vec![BatchEntry {
            time: Nanos(0),
            body: EntryBody::Ref(BlockRef {
                volume: VolumeId(0),
                offset: 0,
                len: 4096,
                source: RefSource::Earlier { seq: Seq(10), at: 0 },
            }),
        }],
    });
    let err = codec.encode(&bad_ref, &mut out).unwrap_err();
    assert!(err.to_string().contains("Batch entry 0 (seq 10): field ref_seq is 10"), "{err}");

    // Deduplicated writes: spans inside the whole blocks, ascending, with the literal the
    // spans leave.
    let deduped = |len: u32, spans: Vec<RefSpan>, literal: usize| {
        Message::Batch(Batch {
            first_seq: Seq(10),
            entries: vec![BatchEntry {
                time: Nanos(0),
                body: EntryBody::Deduped(DedupedWrite {
                    volume: VolumeId(0),
                    offset: 0,
                    len,
                    spans,
                    literal: vec![7; literal].into(),
                }),
            }],
        })
    };
    let span = |first_block, blocks| RefSpan { first_block, blocks, seq: Seq(3), at: 0 };
    let good = deduped(3 * 4096 + 10, vec![span(0, 1), span(2, 1)], 4096 + 10);
    let mut out = Vec::new();
    codec.encode(&good, &mut out).unwrap();
    assert_eq!(Codec::default().decode_slice(&out).unwrap(), good);
    for (bad, field) in [
        (deduped(3 * 4096 + 10, vec![span(2, 2)], 10), "ref_span"),
        (deduped(3 * 4096, vec![span(1, 1), span(0, 1)], 4096), "ref_span"),
        (deduped(3 * 4096, vec![span(1, 1), span(1, 1)], 4096), "ref_span"),
        (deduped(3 * 4096, vec![span(0, 0)], 3 * 4096), "ref_span"),
        (deduped(3 * 4096, vec![], 3 * 4096), "span_count"),
        (deduped(3 * 4096, vec![span(0, 1)], 4096), "literal"),
        (
            deduped(
                3 * 4096,
                vec![RefSpan { first_block: 0, blocks: 1, seq: Seq(10), at: 0 }],
                8192,
            ),
            "ref_seq",
        ),
        (
            deduped(
                3 * 4096,
                vec![RefSpan { first_block: 0, blocks: 1, seq: Seq(1), at: u32::MAX - 10 }],
                8192,
            ),
            "ref_at",
        ),
    ] {
        let err = codec.encode(&bad, &mut Vec::new()).unwrap_err();
        assert!(
            matches!(&err, WireError::InvalidField { field: f, .. } if *f == field),
            "{field}: {err}"
        );
    }
    // A decoder meets spans claiming more than the write: refused before the literal is
    // read.
    let mut frame = out.clone();
    let blocks_at = FRAME_HEADER_LEN + 16 + 24 + 8 + 4;
    frame[blocks_at..blocks_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    let err = Codec::default().decode_slice(&frame).unwrap_err();
    assert!(matches!(err, WireError::InvalidField { field: "ref_span", .. }), "{err}");

    let overflow = Message::Batch(Batch {
        first_seq: Seq(1),
        entries: vec![BatchEntry {
            time: Nanos(0),
            body: EntryBody::Event(Event::Discard {
                volume: VolumeId(0),
                offset: u64::MAX,
                len: 2,
            }),
        }],
    });
    assert!(codec.encode(&overflow, &mut out).is_err());

    let unsorted = Hello { volumes: hello().volumes.into_iter().rev().collect(), ..hello() };
    let err = codec.encode(&Message::Hello(unsorted), &mut out).unwrap_err();
    assert!(err.to_string().contains("Hello volume 1: field id"), "{err}");

    let overlapping = HashRequest {
        id: 1,
        volume: VolumeId(0),
        shape: TreeShape::default(),
        level: 0,
        ranges: vec![NodeRange { first: 10, count: 5 }, NodeRange { first: 12, count: 1 }],
    };
    let err = codec.encode(&Message::HashRequest(overlapping), &mut out).unwrap_err();
    assert!(err.to_string().contains("HashRequest range 1: field first is 12"), "{err}");

    let too_many = HashRequest {
        id: 1,
        volume: VolumeId(0),
        shape: TreeShape::default(),
        level: 0,
        ranges: vec![NodeRange { first: 0, count: u32::MAX }],
    };
    let err = codec.encode(&Message::HashRequest(too_many), &mut out).unwrap_err();
    assert!(err.to_string().contains("node_count"), "{err}");
    assert!(max_hashes_per_reply(codec.max_frame_len()) > 500_000);

    // A reserved byte set on the wire.
    let mut frame = encode(&Message::Welcome(Welcome { version: 1, node: "t".to_owned() }));
    frame[FRAME_HEADER_LEN + 5] = 1;
    let err = decode(&frame).unwrap_err();
    assert!(err.to_string().contains("Welcome body: field reserved"), "{err}");

    // Text fields: UTF-8 without control characters.
    let mut frame = encode(&Message::Error { code: ErrorCode::INTERNAL, message: "ab".to_owned() });
    let last = frame.len() - 1;
    frame[last] = 0xff;
    let err = decode(&frame).unwrap_err();
    assert!(err.to_string().contains("invalid UTF-8"), "{err}");
    let err = codec
        .encode(
            &Message::Error { code: ErrorCode::INTERNAL, message: "a\u{1b}[31m".to_owned() },
            &mut out,
        )
        .unwrap_err();
    assert!(err.to_string().contains("control characters"), "{err}");
}

// ---- Properties ----

fn arb_event() -> impl Strategy<Value = Event> {
    let volume = any::<u16>().prop_map(VolumeId);
    prop_oneof![
        (volume.clone(), 0..u64::MAX / 2, prop::collection::vec(any::<u8>(), 1..600))
            .prop_map(|(volume, offset, data)| Event::Write { volume, offset, data: data.into() }),
        (volume.clone(), 0..u64::MAX / 2, 1..=u32::MAX)
            .prop_map(|(volume, offset, len)| Event::WriteZeroes { volume, offset, len }),
        (volume, 0..u64::MAX / 2, 1..=u32::MAX).prop_map(|(volume, offset, len)| Event::Discard {
            volume,
            offset,
            len
        }),
        Just(Event::Barrier),
        (1..=u64::MAX).prop_map(|id| Event::ResyncBegin { id }),
        (1..=u64::MAX).prop_map(|id| Event::ResyncEnd { id }),
        ("[a-zA-Z0-9_.-][a-zA-Z0-9 _.-]{0,40}", 0..3usize, any::<u64>()).prop_map(
            |(name, k, group)| {
                Event::Bookmark(Bookmark::new(name, BookmarkKind::ALL[k], group).unwrap())
            }
        ),
    ]
}

fn arb_body() -> impl Strategy<Value = EntryBody> {
    prop_oneof![
        4 => arb_event().prop_map(EntryBody::Event),
        1 => (any::<u16>(), 0..u64::MAX / 2, 1..1u32 << 20, any::<u64>(), any::<u16>(), any::<[u8; 32]>(), any::<bool>())
            .prop_map(|(v, offset, len, seq, at, hash, by_hash)| {
                let source = if by_hash {
                    RefSource::Hash(ContentHash(hash))
                } else {
                    // Fixed up to an earlier entry once the entry's own seq is known.
                    RefSource::Earlier { seq: Seq(seq), at: u32::from(at) }
                };
                EntryBody::Ref(BlockRef { volume: VolumeId(v), offset, len, source })
            }),
        1 => (any::<u16>(), 0..u64::MAX / 2, prop::collection::vec(prop::option::of((any::<u64>(), any::<u16>())), 1..6), 0..4096u32, any::<u8>())
            .prop_map(|(v, offset, blocks, tail, fill)| {
                // Whole blocks, then a partial one of `tail` bytes; each referenced block
                // its own span (seqs fixed up like a ref's).
                let spans: Vec<RefSpan> = blocks
                    .iter()
                    .enumerate()
                    .filter_map(|(i, b)| {
                        b.map(|(seq, at)| RefSpan { first_block: i as u32, blocks: 1, seq: Seq(seq), at: u32::from(at) })
                    })
                    .collect();
                let len = blocks.len() as u32 * DEDUPE_BLOCK + tail;
                let literal = vec![fill; (len - spans.len() as u32 * DEDUPE_BLOCK) as usize];
                if spans.is_empty() {
                    return EntryBody::Event(Event::Write { volume: VolumeId(v), offset, data: literal.into() });
                }
                EntryBody::Deduped(DedupedWrite { volume: VolumeId(v), offset, len, spans, literal: literal.into() })
            }),
    ]
}

fn arb_batch() -> impl Strategy<Value = Batch> {
    (1..1u64 << 40, prop::collection::vec((any::<u64>(), arb_body()), 1..12)).prop_map(
        |(first, raw)| {
            let entries = raw
                .into_iter()
                .enumerate()
                .map(|(i, (time, mut body))| {
                    let own = first + i as u64;
                    if let EntryBody::Ref(r) = &mut body {
                        if let RefSource::Earlier { seq, .. } = &mut r.source {
                            if own == 1 {
                                r.source = RefSource::Hash(ContentHash([1; 32]));
                            } else {
                                *seq = Seq(1 + seq.0 % (own - 1));
                            }
                        }
                    }
                    if let EntryBody::Deduped(d) = &mut body {
                        if own == 1 {
                            // No earlier entry to name: the same bytes as a plain write.
                            let data = vec![0u8; d.len as usize];
                            body = EntryBody::Event(Event::Write {
                                volume: d.volume,
                                offset: d.offset,
                                data: data.into(),
                            });
                        } else {
                            for span in &mut d.spans {
                                span.seq = Seq(1 + span.seq.0 % (own - 1));
                            }
                        }
                    }
                    BatchEntry { time: Nanos(time), body }
                })
                .collect();
            Batch { first_seq: Seq(first), entries }
        },
    )
}

fn arb_text(max: usize) -> impl Strategy<Value = String> {
    prop::string::string_regex(&format!("[ -~é€]{{0,{max}}}")).unwrap()
}

fn arb_versions() -> impl Strategy<Value = VersionRange> {
    (1..10u16, 0..5u16).prop_map(|(min, d)| VersionRange { min, max: min + d })
}

fn arb_hello() -> impl Strategy<Value = Hello> {
    (
        arb_versions(),
        any::<bool>(),
        "[a-z][a-z0-9.-]{0,40}",
        any::<[u8; 16]>(),
        prop::collection::btree_map(any::<u16>(), (9..=20u32, 0..1u64 << 30), 1..6),
    )
        .prop_map(|(versions, source, node, pair, vols)| Hello {
            versions,
            role: if source { Role::Source } else { Role::Target },
            node,
            pair: PairId(pair),
            volumes: vols
                .into_iter()
                .map(|(id, (log2, blocks))| VolumeInfo {
                    id: VolumeId(id),
                    block_size: 1 << log2,
                    size: blocks << log2,
                })
                .collect(),
        })
}

fn arb_hash_request() -> impl Strategy<Value = HashRequest> {
    (
        any::<u32>(),
        any::<u16>(),
        12..=24u8,
        1..=8u8,
        0..=63u8,
        prop::collection::vec((0..1000u64, 1..5000u32), 1..10),
    )
        .prop_map(|(id, volume, leaf, fan, level, raw)| {
            let mut next = 0u64;
            let ranges = raw
                .into_iter()
                .map(|(gap, count)| {
                    let first = next + gap;
                    next = first + u64::from(count);
                    NodeRange { first, count }
                })
                .collect();
            HashRequest {
                id,
                volume: VolumeId(volume),
                shape: TreeShape::new(leaf, fan).unwrap(),
                level,
                ranges,
            }
        })
}

fn arb_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        arb_hello().prop_map(Message::Hello),
        "[a-z][a-z0-9-]{0,20}".prop_map(|node| Message::Welcome(Welcome { version: 1, node })),
        (any::<u16>(), arb_versions(), arb_text(100)).prop_map(|(r, supported, message)| {
            Message::Refuse(Refuse { reason: RefuseReason(r), supported, message })
        }),
        (any::<u64>(), 1..=3u8, prop::collection::vec(1..u64::MAX, 1..5)).prop_map(
            |(s, kind, ids)| {
                let replica = match kind {
                    1 => ReplicaState { kind: ReplicaKind::Blank, open_resyncs: vec![] },
                    2 => ReplicaState::consistent(),
                    _ => ReplicaState { kind: ReplicaKind::Inconsistent, open_resyncs: ids },
                };
                Message::Resume { last_acked: Seq(s), replica }
            }
        ),
        arb_batch().prop_map(Message::Batch),
        any::<u64>().prop_map(|s| Message::Ack { upto: Seq(s) }),
        (any::<u16>(), arb_text(200))
            .prop_map(|(c, message)| Message::Error { code: ErrorCode(c), message }),
        any::<u64>().prop_map(|nonce| Message::Ping { nonce }),
        any::<u64>().prop_map(|nonce| Message::Pong { nonce }),
        any::<u64>().prop_map(|s| Message::DedupeHeld { from: Seq(s) }),
        arb_hash_request().prop_map(Message::HashRequest),
        (
            prop::collection::vec((1..u64::MAX, any::<u64>()), 0..6),
            any::<u64>(),
            0..8u8,
            any::<bool>()
        )
            .prop_map(|(chain, head, flags, source)| {
                let mut generations: Vec<Generation> = Vec::new();
                for (i, (id, branch)) in chain.into_iter().enumerate() {
                    let parent = generations.last().map_or(0, |g| g.id);
                    let branch_seq = Seq(if i == 0 { 0 } else { branch });
                    generations.push(Generation { id, parent, branch_seq });
                }
                let l = LineageInfo {
                    generations,
                    head: Seq(head),
                    dirty: flags & 1 != 0,
                    source_wins: flags & 2 != 0,
                    full_resync: flags & 4 != 0,
                };
                if source && !l.generations.is_empty() {
                    Message::SourceLineage(l)
                } else {
                    Message::TargetLineage(l)
                }
            }),
        (any::<u32>(), any::<u16>(), 0..=63u8, prop::collection::vec(any::<[u8; 32]>(), 1..40))
            .prop_map(|(id, v, level, hashes)| Message::HashReply(HashReply {
                id,
                volume: VolumeId(v),
                level,
                hashes: hashes.into_iter().map(NodeHash).collect(),
            })),
        (
            prop::collection::vec(1..u64::MAX, 1..8),
            prop::collection::vec((any::<u16>(), 0..u64::MAX / 2, 1..u64::MAX / 2), 1..20)
        )
            .prop_map(|(ids, ranges)| Message::RepairRequest(RepairRequest {
                ids,
                ranges: ranges
                    .into_iter()
                    .map(|(v, offset, len)| RepairRange { volume: VolumeId(v), offset, len })
                    .collect(),
            })),
    ]
}

proptest! {
    #[test]
    fn any_valid_message_round_trips(message in arb_message(), level in 1..5i32) {
        let mut codec = Codec::default();
        let mut plain = Vec::new();
        codec.encode(&message, &mut plain).unwrap();
        prop_assert_eq!(&codec.decode_slice(&plain).unwrap(), &message);
        // Canonical: decoding then encoding gives the same bytes.
        let mut again = Vec::new();
        let decoded = codec.decode_slice(&plain).unwrap();
        codec.encode(&decoded, &mut again).unwrap();
        prop_assert_eq!(&again, &plain);

        codec.set_compression(Compression::Zstd { level });
        let mut packed = Vec::new();
        codec.encode(&message, &mut packed).unwrap();
        prop_assert_eq!(&codec.decode_slice(&packed).unwrap(), &message);
    }

    #[test]
    fn damaged_frames_never_panic_and_what_decodes_round_trips(
        message in arb_message(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut frame = encode(&message);
        for (at, x) in flips {
            let i = at.index(frame.len());
            frame[i] ^= x;
        }
        if truncate {
            frame.truncate(cut.index(frame.len() + 1));
        }
        fuzz_frame(&frame);
    }
}

#[test]
fn the_wire_frame_fuzz_seeds_decode_and_round_trip() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/wire_frame");
    let mut plain = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(&path).unwrap();
        // Every seed goes through the fuzz target's checks without a panic.
        fuzz_frame(&bytes);
        if name.starts_with('.') {
            continue;
        }
        if !name.contains('-') || name.ends_with("-zstd") {
            Codec::new(1 << 20)
                .unwrap()
                .decode_slice(&bytes)
                .unwrap_or_else(|e| panic!("seed {name} does not decode: {e}"));
            plain += 1;
        }
    }
    assert!(plain >= 12, "a seed of every message type: {plain}");
}

#[test]
fn a_repair_request_is_refused_when_its_ids_ranges_or_counts_are_wrong() {
    let mut codec = Codec::default();
    let good = RepairRequest {
        ids: vec![7],
        ranges: vec![RepairRange { volume: VolumeId(0), offset: 4096, len: 4096 }],
    };
    let bad = [
        RepairRequest { ids: vec![], ..good.clone() },
        RepairRequest { ids: vec![0], ..good.clone() },
        RepairRequest { ranges: vec![], ..good.clone() },
        RepairRequest {
            ranges: vec![RepairRange { volume: VolumeId(0), offset: 1, len: 0 }],
            ..good.clone()
        },
        RepairRequest {
            ranges: vec![RepairRange { volume: VolumeId(0), offset: u64::MAX, len: 2 }],
            ..good.clone()
        },
        RepairRequest { ids: vec![1; 65], ..good.clone() },
    ];
    for r in bad {
        let mut out = Vec::new();
        let err = codec.encode(&Message::RepairRequest(r.clone()), &mut out).unwrap_err();
        assert!(err.to_string().contains("RepairRequest body"), "{r:?}: {err}");
    }
    let mut frame = Vec::new();
    codec.encode(&Message::RepairRequest(good), &mut frame).unwrap();
    // Type 14, body 8 + 8 + 24 bytes.
    assert_eq!((frame[6], frame.len()), (14, FRAME_HEADER_LEN + 40));
    // A count that does not fill the body, and nonzero reserved bytes, are refused.
    let mut short = frame.clone();
    short[12] = 2;
    assert!(codec.decode_slice(&short).unwrap_err().to_string().contains("counts"));
    let mut reserved = frame.clone();
    reserved[FRAME_HEADER_LEN + 16 + 3] = 1;
    assert!(codec.decode_slice(&reserved).is_err());
}
