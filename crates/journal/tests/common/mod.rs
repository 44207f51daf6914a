//! Helpers shared by the journal's integration tests.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use tidemark_journal::{Clock, Event, ManualClock, RetentionLog, Seq, VolumeId};

/// A stream being fed to a log and to a byte model of volume 0 at once: `states[s]` is the
/// volume after seq `s`. Each test file adds the methods of its own.
pub struct Feed {
    pub log: RetentionLog,
    pub clock: Arc<ManualClock>,
    pub seq: u64,
    pub cur: Vec<u8>,
    pub states: Vec<Vec<u8>>,
}

impl Feed {
    /// A feed of an empty log whose volume 0 is all zeros.
    pub fn new(log: RetentionLog, clock: Arc<ManualClock>) -> Self {
        let vol = log.volume_len(VolumeId(0)).expect("volume 0") as usize;
        Self { log, clock, seq: 0, cur: vec![0; vol], states: vec![vec![0; vol]] }
    }

    /// Appends `e` at the next seq, one simulated second later, and models it.
    pub fn push(&mut self, e: Event) -> Seq {
        self.seq += 1;
        self.clock.advance(Duration::from_secs(1));
        self.log.append(Seq(self.seq), self.clock.now(), &e).expect("append");
        if let Event::Write { offset, data, .. } = &e {
            self.cur[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
        }
        self.states.push(self.cur.clone());
        Seq(self.seq)
    }

    /// Writes 4 KiB block `block` of volume 0 full of `fill`.
    pub fn write(&mut self, block: u64, fill: u8) -> Seq {
        self.push(Event::Write {
            volume: VolumeId(0),
            offset: block * 4096,
            data: vec![fill; 4096].into(),
        })
    }
}
