//! The oracle: the source's capture stream as the simulation saw the spool accept it, and
//! the volume image after every prefix of it that ends at a point (barrier, bookmark,
//! resync end), kept as a BLAKE3 hash.
//!
//! A recovery point the target offers at seq `P` is correct when the target's image at `P`
//! hashes to the model's image after event `P`: a prefix of the source stream ending at a
//! point, replayed. The model follows the spool through source crashes: events the spool
//! lost (never synced, hence never shipped) are cut, and their numbers are given again.
//!
//! Invariants kept: the stream holds consecutive sequence numbers from 1; `image` is the
//! replay of the whole stream over a zero volume; `point_hashes` holds the hash of the replay
//! up to every point event still in the stream, and of the zero volume at seq 0.

use std::collections::BTreeMap;

use tidemark_journal::{Event, Seq};

/// The model of the source stream (see the module documentation).
#[derive(Debug)]
pub struct StreamModel {
    volume_len: usize,
    events: Vec<Event>,
    image: Vec<u8>,
    point_hashes: BTreeMap<Seq, blake3::Hash>,
}

impl StreamModel {
    /// An empty stream over a zero volume of `volume_len` bytes.
    pub fn new(volume_len: u64) -> Self {
        let image = vec![0; volume_len as usize];
        let mut point_hashes = BTreeMap::new();
        point_hashes.insert(Seq::ZERO, blake3::hash(&image));
        Self { volume_len: volume_len as usize, events: Vec::new(), image, point_hashes }
    }

    /// The last sequence number in the stream.
    pub fn last_seq(&self) -> Seq {
        Seq(self.events.len() as u64)
    }

    /// The event with sequence number `seq`.
    pub fn event(&self, seq: Seq) -> Option<&Event> {
        self.events.get((seq.0 as usize).checked_sub(1)?)
    }

    /// Records that the spool accepted `event` as `seq`; an error names a sequence number
    /// that does not follow the stream.
    pub fn push(&mut self, seq: Seq, event: Event) -> Result<(), String> {
        if seq != self.last_seq().next() {
            return Err(format!(
                "the spool assigned seq {seq} but the stream's next is {}",
                self.last_seq().next()
            ));
        }
        apply(&mut self.image, &event);
        if event.is_point() {
            self.point_hashes.insert(seq, blake3::hash(&self.image));
        }
        self.events.push(event);
        Ok(())
    }

    /// Cuts the stream after `last` (a spool that lost unsynced events in a crash).
    pub fn truncate(&mut self, last: Seq) {
        if last >= self.last_seq() {
            return;
        }
        self.events.truncate(last.0 as usize);
        self.point_hashes.retain(|s, _| *s <= last);
        self.image = vec![0; self.volume_len];
        for e in &self.events {
            apply(&mut self.image, e);
        }
    }

    /// The hash of the volume after event `seq`, when `seq` is a point (or 0).
    pub fn point_hash(&self, seq: Seq) -> Option<blake3::Hash> {
        self.point_hashes.get(&seq).copied()
    }

    /// The volume after the whole stream.
    pub fn image(&self) -> &[u8] {
        &self.image
    }
}

/// Applies one event to a volume image.
pub fn apply(image: &mut Vec<u8>, event: &Event) {
    match event {
        Event::Write { offset, data, .. } => {
            let at = *offset as usize;
            image[at..at + data.len()].copy_from_slice(data);
        }
        Event::WriteZeroes { offset, len, .. } | Event::Discard { offset, len, .. } => {
            let at = *offset as usize;
            image[at..at + *len as usize].fill(0);
        }
        // A growth: the new range reads as zeros.
        Event::Resize { new_size, .. } => {
            if image.len() < *new_size as usize {
                image.resize(*new_size as usize, 0);
            }
        }
        Event::Barrier
        | Event::Bookmark(_)
        | Event::ResyncBegin { .. }
        | Event::ResyncEnd { .. } => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tidemark_journal::VolumeId;

    fn write(offset: u64, byte: u8) -> Event {
        Event::Write { volume: VolumeId(0), offset, data: Bytes::from(vec![byte; 4]) }
    }

    #[test]
    fn points_hash_the_replayed_prefix_and_truncate_rebuilds() {
        let mut m = StreamModel::new(16);
        m.push(Seq(1), write(0, 1)).unwrap();
        m.push(Seq(2), Event::Barrier).unwrap();
        m.push(Seq(3), write(4, 2)).unwrap();
        assert!(m.push(Seq(5), Event::Barrier).is_err(), "a gap is refused");
        let mut after_1 = vec![0u8; 16];
        after_1[..4].fill(1);
        assert_eq!(m.point_hash(Seq(2)), Some(blake3::hash(&after_1)));
        assert_eq!(m.point_hash(Seq(3)), None, "a write is not a point");
        m.truncate(Seq(2));
        assert_eq!(m.image(), &after_1[..]);
        assert_eq!(m.last_seq(), Seq(2));
    }
}
