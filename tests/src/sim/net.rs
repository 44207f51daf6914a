//! The simulated network: two queues of encoded frames (source to target, target to
//! source) per connection, with faults applied at delivery: a frame may be dropped,
//! delivered twice, or overtaken by the one behind it; the link may be partitioned (nothing
//! gets through, and the connection dies) until it heals.
//!
//! The frames are the real wire codec's output. The secure channel is left out: it would
//! turn a dropped, repeated or reordered record into a closed connection by name, so the
//! link here is the harsher case, a transport that delivers whatever it likes and leaves
//! the protocol's own checks (the receiver's order rule, the shipper's ack rule) to catch it.
//!
//! Invariant: a frame is delivered only on the connection that sent it; when a connection
//! ends, what it still had in flight is gone (as with TCP).

use std::collections::VecDeque;

use super::rng::SimRng;

/// Fault rates of a link, per mille of frames delivered.
#[derive(Debug, Clone, Copy)]
pub struct LinkFaults {
    /// Frames lost.
    pub drop: u32,
    /// Frames delivered twice.
    pub duplicate: u32,
    /// Frames overtaken by the next one.
    pub reorder: u32,
}

impl LinkFaults {
    /// A clean link.
    pub const NONE: LinkFaults = LinkFaults { drop: 0, duplicate: 0, reorder: 0 };
}

/// What happened to a frame at delivery (for the trace and the fault counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Delivered once, in order.
    Clean,
    /// Lost.
    Dropped,
    /// Delivered, and a copy left at the head of the queue.
    Duplicated,
    /// The frame behind it was delivered first.
    Reordered,
}

/// A direction of the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Source to target.
    Up,
    /// Target to source.
    Down,
}

/// The link between the two sides (see the module documentation).
#[derive(Debug, Default)]
pub struct Link {
    /// The live connection's id (0: none).
    conn: u64,
    up: VecDeque<Vec<u8>>,
    down: VecDeque<Vec<u8>>,
    /// Steps left until a partition heals (0: not partitioned).
    partition_steps: u32,
}

impl Link {
    /// A link with no connection.
    pub fn new() -> Self {
        Self::default()
    }

    /// The live connection, if any.
    pub fn connection(&self) -> Option<u64> {
        (self.conn != 0).then_some(self.conn)
    }

    /// True while a partition lasts.
    pub fn partitioned(&self) -> bool {
        self.partition_steps > 0
    }

    /// Opens connection `id`, replacing any live one (whose frames are lost).
    pub fn connect(&mut self, id: u64) {
        self.close();
        self.conn = id;
    }

    /// Ends the live connection; frames in flight are lost.
    pub fn close(&mut self) {
        self.conn = 0;
        self.up.clear();
        self.down.clear();
    }

    /// Cuts the link for `steps` steps: the connection dies.
    pub fn partition(&mut self, steps: u32) {
        self.close();
        self.partition_steps = steps;
    }

    /// One step of time: a partition heals a little.
    pub fn tick(&mut self) {
        self.partition_steps = self.partition_steps.saturating_sub(1);
    }

    /// Sends a frame on the live connection (silently lost when there is none).
    pub fn send(&mut self, dir: Dir, frame: Vec<u8>) {
        if self.conn == 0 {
            return;
        }
        self.queue(dir).push_back(frame);
    }

    /// Frames waiting in a direction.
    pub fn pending(&self, dir: Dir) -> usize {
        match dir {
            Dir::Up => self.up.len(),
            Dir::Down => self.down.len(),
        }
    }

    fn queue(&mut self, dir: Dir) -> &mut VecDeque<Vec<u8>> {
        match dir {
            Dir::Up => &mut self.up,
            Dir::Down => &mut self.down,
        }
    }

    /// Takes the next frame of a direction through the faults: `None` when nothing is
    /// waiting or the frame was lost.
    pub fn deliver(
        &mut self,
        dir: Dir,
        faults: LinkFaults,
        rng: &mut SimRng,
    ) -> Option<(Vec<u8>, Delivery)> {
        let q = self.queue(dir);
        let frame = q.pop_front()?;
        if rng.chance(faults.drop) {
            return Some((Vec::new(), Delivery::Dropped));
        }
        if !q.is_empty() && rng.chance(faults.reorder) {
            let next = q.pop_front().expect("checked");
            q.push_front(frame);
            return Some((next, Delivery::Reordered));
        }
        if rng.chance(faults.duplicate) {
            q.push_front(frame.clone());
            return Some((frame, Delivery::Duplicated));
        }
        Some((frame, Delivery::Clean))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_die_with_their_connection_and_faults_apply() {
        let mut rng = SimRng::new(3);
        let mut link = Link::new();
        link.send(Dir::Up, vec![1]);
        assert_eq!(link.pending(Dir::Up), 0, "no connection: the frame is lost");
        link.connect(1);
        link.send(Dir::Up, vec![1]);
        link.send(Dir::Up, vec![2]);
        let all = LinkFaults { drop: 0, duplicate: 0, reorder: 1000 };
        assert_eq!(link.deliver(Dir::Up, all, &mut rng), Some((vec![2], Delivery::Reordered)));
        let dup = LinkFaults { drop: 0, duplicate: 1000, reorder: 0 };
        assert_eq!(link.deliver(Dir::Up, dup, &mut rng), Some((vec![1], Delivery::Duplicated)));
        assert_eq!(link.pending(Dir::Up), 1);
        link.partition(2);
        assert!(link.partitioned() && link.connection().is_none());
        assert_eq!(link.pending(Dir::Up), 0);
        link.tick();
        link.tick();
        assert!(!link.partitioned());
    }
}
