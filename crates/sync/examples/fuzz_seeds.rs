//! Writes the seed corpora of the sync fuzz targets: `fuzz/corpus/wire_frame` (a frame of
//! every message type, plain and compressed, plus truncated, bit-flipped and
//! foreign-version variants, and a lineage file, whole and torn) and `fuzz/corpus/handshake` (recorded handshakes and sessions
//! replayable by the harness, see `tidemark_sync::secure::fuzz_handshake_seeds`). Run with
//! `cargo run -p tidemark-sync --example fuzz_seeds`.

use std::path::Path;

use bytes::Bytes;
use tidemark_journal::{Bookmark, BookmarkKind, Event, Nanos, Seq, VolumeId};
use tidemark_sync::wire::{
    Batch, BatchEntry, BlockRef, Codec, Compression, ContentHash, DedupedWrite, EntryBody,
    ErrorCode, Generation, HashReply, HashRequest, Hello, LineageInfo, Message, NodeHash,
    NodeRange, PairId, RefSource, RefSpan, Refuse, RefuseReason, Role, SUPPORTED_VERSIONS,
    TreeShape, VersionRange, VolumeInfo, Welcome,
};

fn messages() -> Vec<Message> {
    let entry = |time: u64, body| BatchEntry { time: Nanos(time), body };
    vec![
        Message::Hello(Hello {
            versions: SUPPORTED_VERSIONS,
            role: Role::Source,
            node: "source-1".to_owned(),
            pair: PairId([0x5e; 16]),
            volumes: vec![
                VolumeInfo { id: VolumeId(0), block_size: 4096, size: 1 << 30 },
                VolumeInfo { id: VolumeId(1), block_size: 512, size: 1 << 20 },
            ],
        }),
        Message::Welcome(Welcome { version: 1, node: "target-1".to_owned() }),
        Message::Refuse(Refuse {
            reason: RefuseReason::VERSION_MISMATCH,
            supported: SUPPORTED_VERSIONS,
            message: "this node speaks protocol version 1".to_owned(),
        }),
        Message::Resume {
            last_acked: Seq(1000),
            replica: tidemark_sync::wire::ReplicaState {
                kind: tidemark_sync::wire::ReplicaKind::Inconsistent,
                open_resyncs: vec![77, 78],
            },
        },
        Message::Batch(Batch {
            first_seq: Seq(1001),
            entries: vec![
                entry(
                    1,
                    EntryBody::Event(Event::Write {
                        volume: VolumeId(0),
                        offset: 4096,
                        data: Bytes::from(vec![0x61; 4096]),
                    }),
                ),
                entry(
                    2,
                    EntryBody::Event(Event::WriteZeroes {
                        volume: VolumeId(0),
                        offset: 0,
                        len: 65536,
                    }),
                ),
                entry(
                    3,
                    EntryBody::Event(Event::Discard {
                        volume: VolumeId(1),
                        offset: 512,
                        len: 1024,
                    }),
                ),
                entry(4, EntryBody::Event(Event::Barrier)),
                entry(
                    5,
                    EntryBody::Event(Event::Bookmark(
                        Bookmark::new("before-upgrade", BookmarkKind::Filesystem, 3)
                            .expect("a valid name"),
                    )),
                ),
                entry(
                    6,
                    EntryBody::Ref(BlockRef {
                        volume: VolumeId(0),
                        offset: 1 << 20,
                        len: 4096,
                        source: RefSource::Earlier { seq: Seq(1001), at: 0 },
                    }),
                ),
                entry(
                    7,
                    EntryBody::Ref(BlockRef {
                        volume: VolumeId(0),
                        offset: 2 << 20,
                        len: 4096,
                        source: RefSource::Hash(ContentHash([0xc3; 32])),
                    }),
                ),
                entry(
                    8,
                    EntryBody::Deduped(DedupedWrite {
                        volume: VolumeId(0),
                        offset: 3 << 20,
                        len: 3 * 4096 + 100,
                        spans: vec![RefSpan { first_block: 1, blocks: 1, seq: Seq(1001), at: 0 }],
                        literal: Bytes::from(vec![0x62; 2 * 4096 + 100]),
                    }),
                ),
            ],
        }),
        Message::Ack { upto: Seq(1007) },
        Message::Error { code: ErrorCode::SEQUENCE_GAP, message: "expected seq 1008".to_owned() },
        Message::Ping { nonce: 42 },
        Message::Pong { nonce: 42 },
        Message::HashRequest(HashRequest {
            id: 9,
            volume: VolumeId(0),
            shape: TreeShape::default(),
            level: 1,
            ranges: vec![NodeRange { first: 0, count: 16 }, NodeRange { first: 48, count: 16 }],
        }),
        Message::HashReply(HashReply {
            id: 9,
            volume: VolumeId(0),
            level: 1,
            hashes: (0..32u8).map(|i| NodeHash([i; 32])).collect(),
        }),
        Message::SourceLineage(promoted_lineage()),
        Message::TargetLineage(LineageInfo {
            generations: promoted_lineage().generations[..1].to_vec(),
            head: Seq(1200),
            ..LineageInfo::default()
        }),
    ]
}

/// A promoted side's lineage: the root, and the child a promotion at seq 1000 started.
fn promoted_lineage() -> LineageInfo {
    LineageInfo {
        generations: vec![
            Generation { id: 0x0123_4567_89ab_cdef, parent: 0, branch_seq: Seq(0) },
            Generation {
                id: 0xfeed_f00d_0000_0001,
                parent: 0x0123_4567_89ab_cdef,
                branch_seq: Seq(1000),
            },
        ],
        head: Seq(17),
        dirty: true,
        source_wins: false,
        full_resync: true,
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    let wire_dir = root.join("wire_frame");
    let handshake_dir = root.join("handshake");
    std::fs::create_dir_all(&wire_dir)?;
    std::fs::create_dir_all(&handshake_dir)?;

    let mut codec = Codec::new(1 << 20)?;
    for message in messages() {
        let name = message.message_type().name().to_ascii_lowercase();
        let mut frame = Vec::new();
        codec.set_compression(Compression::Off);
        codec.encode(&message, &mut frame)?;
        std::fs::write(wire_dir.join(&name), &frame)?;
        std::fs::write(wire_dir.join(format!("{name}-torn")), &frame[..frame.len() * 2 / 3])?;
        let mut flipped = frame.clone();
        let at = 12 + (frame.len() - 12) / 2;
        flipped[at] ^= 0x10;
        std::fs::write(wire_dir.join(format!("{name}-flip")), &flipped)?;
        if matches!(message, Message::Batch(_)) {
            let mut packed = Vec::new();
            codec.set_compression(Compression::Zstd { level: 3 });
            codec.encode(&message, &mut packed)?;
            assert_eq!(packed[7], 1, "the sample batch compresses");
            std::fs::write(wire_dir.join(format!("{name}-zstd")), &packed)?;
        }
        if let Message::Hello(h) = &message {
            let future = Hello { versions: VersionRange { min: 2, max: 3 }, ..h.clone() };
            let mut frame = Vec::new();
            codec.set_compression(Compression::Off);
            codec.encode(&Message::Hello(future), &mut frame)?;
            frame[4..6].copy_from_slice(&2u16.to_le_bytes());
            std::fs::write(wire_dir.join("hello-version-2"), &frame)?;
        }
    }

    // The lineage file shares the target (`fuzz_frame` parses its input as both).
    let file = tidemark_sync::lineage::LineageFile {
        generations: promoted_lineage().generations,
        head: Seq(17),
        dirty: true,
        seal: Some([0x5a; 32]),
    };
    std::fs::write(wire_dir.join("lineage-file"), file.encode())?;
    let mut torn = file.encode();
    torn.truncate(torn.len() - 5);
    std::fs::write(wire_dir.join("lineage-file-torn"), torn)?;
    // A batch across a volume growth: a write, the resize (kind 10), a write in the new
    // range.
    let entry = |time: u64, body| BatchEntry { time: Nanos(time), body };
    let grown = Message::Batch(Batch {
        first_seq: Seq(2001),
        entries: vec![
            entry(
                1,
                EntryBody::Event(Event::Write {
                    volume: VolumeId(0),
                    offset: (1 << 20) - 4096,
                    data: Bytes::from(vec![0x71; 4096]),
                }),
            ),
            entry(
                2,
                EntryBody::Event(Event::Resize {
                    volume: VolumeId(0),
                    old_size: 1 << 20,
                    new_size: 3 << 20,
                }),
            ),
            entry(
                3,
                EntryBody::Event(Event::Write {
                    volume: VolumeId(0),
                    offset: 2 << 20,
                    data: Bytes::from(vec![0x72; 512]),
                }),
            ),
        ],
    });
    let mut frame = Vec::new();
    codec.set_compression(Compression::Off);
    codec.encode(&grown, &mut frame)?;
    std::fs::write(wire_dir.join("batch-resize"), &frame)?;
    std::fs::write(wire_dir.join("batch-resize-torn"), &frame[..frame.len() * 2 / 3])?;
    let mut shrink = frame.clone();
    // A new size of 0 (its third byte, the only nonzero one, cleared): below the old size,
    // refused by the codec. The last entry is 24 header bytes and 512 data bytes.
    let at = frame.len() - 512 - 24 - 8;
    shrink[at + 2] = 0;
    std::fs::write(wire_dir.join("batch-resize-shrink"), &shrink)?;

    for (name, bytes) in tidemark_sync::secure::fuzz_handshake_seeds() {
        std::fs::write(handshake_dir.join(name), bytes)?;
    }
    println!("wrote seeds to {} and {}", wire_dir.display(), handshake_dir.display());
    Ok(())
}
