//! The ROW overlay's mapping and write statistics, kept as runs of blocks ([`runmap`]).
//!
//! A block is either in the base (unmapped), holds data in the reserved file, or was zeroed
//! (its range is a hole in the reserved file and reads as zeroes). Each written run carries a
//! write count (saturating at [`MAX_WRITES`]) and the *epoch* of its last write: the migration
//! planner calls [`Table::mark`] before it reads blocks to send, and a block written after that
//! has a newer epoch. Memory follows the runs: about 13 bytes per scattered block, a few bytes
//! for a zeroed range of any length (see `runmap`).

use runmap::{Run, RunMap, RunValue};

/// The write count saturates here; a hot threshold above it cannot be told apart.
pub const MAX_WRITES: u32 = 127;
/// The tag bit that marks a zeroed run.
const ZERO: u8 = 0x80;

/// What holds a range of blocks, for reads and block status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// The base image (not written since ROW started).
    Base,
    /// The reserved file.
    Data,
    /// Nothing: the range was zeroed and reads as zeroes.
    Zero,
}

/// Blocks `start..end` and what holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First block.
    pub start: u64,
    /// One past the last block.
    pub end: u64,
    /// What holds them.
    pub held: Held,
}

/// A run of written blocks and their statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WrittenRun {
    /// First block.
    pub start: u64,
    /// Number of blocks.
    pub len: u64,
    /// Write requests that touched each block (saturating at [`MAX_WRITES`]).
    pub writes: u32,
    /// Epoch of the last write.
    pub epoch: u64,
    /// Whether the run was zeroed (rather than written with data).
    pub zero: bool,
}

/// A mapping change not journaled yet: blocks `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Now hold data in the reserved file.
    Data(u64, u64),
    /// Now zeroed.
    Zero(u64, u64),
    /// Merged back into the image.
    Unmap(u64, u64),
}

/// The mapping, the statistics and the changes to journal.
#[derive(Debug, Default)]
pub struct Table {
    map: RunMap,
    epoch: u32,
    pending: Vec<Change>,
    /// A dirty tracker: nothing is journaled, so nothing is kept for it.
    untracked: bool,
}

fn written(r: Run) -> WrittenRun {
    WrittenRun {
        start: r.start,
        len: r.len,
        writes: u32::from(r.value.tag & !ZERO),
        epoch: u64::from(r.value.value),
        zero: r.value.tag & ZERO != 0,
    }
}

impl Table {
    /// A table that only counts writes (dirty tracking in direct mode), with no journal.
    pub fn tracker() -> Self {
        Self { untracked: true, ..Self::default() }
    }

    /// A table recovered from the journal's runs (`(start, end, zero)`): statistics restart
    /// at one write, epoch 0.
    pub fn recovered(map: RunMap) -> Self {
        Self { map, ..Self::default() }
    }

    /// Applies a journal record while replaying: data, zero, or unmapped.
    pub fn replay(map: &mut RunMap, start: u64, end: u64, held: Held) {
        match held {
            Held::Base => map.update(start, end, |_| None),
            Held::Data => map.update(start, end, |_| Some(RunValue { tag: 1, value: 0 })),
            Held::Zero => map.update(start, end, |_| Some(RunValue { tag: 1 | ZERO, value: 0 })),
        }
    }

    /// Whether every block of `[start, end)` has its full content in the overlay (data or zero).
    pub fn covers(&self, start: u64, end: u64) -> bool {
        self.map.covers(start, end)
    }

    /// Whether a block is in the overlay.
    pub fn is_mapped(&self, block: u64) -> bool {
        self.map.get(block).is_some()
    }

    /// What holds each part of `[start, end)`, in order, gaps included.
    pub fn segments(&self, start: u64, end: u64) -> Vec<Segment> {
        let mut out: Vec<Segment> = Vec::new();
        let mut at = start;
        let mut push = |s: Segment| match out.last_mut() {
            Some(last) if last.end == s.start && last.held == s.held => last.end = s.end,
            _ => out.push(s),
        };
        self.map.for_each_in(start, end, |r| {
            if r.start > at {
                push(Segment { start: at, end: r.start, held: Held::Base });
            }
            let held = if r.value.tag & ZERO != 0 { Held::Zero } else { Held::Data };
            push(Segment { start: r.start, end: r.end(), held });
            at = r.end();
        });
        if at < end {
            push(Segment { start: at, end, held: Held::Base });
        }
        out
    }

    /// Records one write request over blocks `[start, end)`: with `zero`, the range was zeroed.
    pub fn record_write(&mut self, start: u64, end: u64, zero: bool) {
        let epoch = self.epoch;
        let flag = if zero { ZERO } else { 0 };
        self.map.update(start, end, |old| {
            let writes = old.map_or(0, |o| o.tag & !ZERO);
            let writes = (writes + 1).min(MAX_WRITES as u8);
            Some(RunValue { tag: writes | flag, value: epoch })
        });
        if !self.untracked {
            let change = if zero { Change::Zero(start, end) } else { Change::Data(start, end) };
            self.push_change(change);
        }
    }

    fn push_change(&mut self, c: Change) {
        // Consecutive writes of a sequential stream join into one change.
        match (self.pending.last_mut(), c) {
            (Some(Change::Data(_, e)), Change::Data(s, t)) if *e == s => *e = t,
            (Some(Change::Zero(_, e)), Change::Zero(s, t)) if *e == s => *e = t,
            (Some(Change::Unmap(_, e)), Change::Unmap(s, t)) if *e == s => *e = t,
            _ => self.pending.push(c),
        }
    }

    /// Removes merged blocks `[start, end)` from the mapping.
    pub fn unmap(&mut self, start: u64, end: u64) {
        self.map.update(start, end, |_| None);
        self.push_change(Change::Unmap(start, end));
    }

    /// Takes the mapping changes not yet journaled, in the order they happened.
    pub fn take_pending(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.pending)
    }

    /// Puts back changes whose journaling failed (before any taken later), so the next flush
    /// retries them in order.
    pub fn restore_pending(&mut self, mut changes: Vec<Change>) {
        changes.append(&mut self.pending);
        self.pending = changes;
    }

    /// Number of blocks in the overlay.
    pub fn len(&self) -> u64 {
        self.map.blocks()
    }

    /// Whether nothing is in the overlay.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Number of runs (what the memory follows).
    pub fn runs(&self) -> usize {
        self.map.runs()
    }

    /// Heap bytes the mapping holds.
    pub fn heap_bytes(&self) -> usize {
        self.map.heap_bytes()
    }

    /// The current epoch: writes from now on carry it.
    pub fn epoch(&self) -> u64 {
        u64::from(self.epoch)
    }

    /// Starts a new epoch and returns the last one: every block written from now on has an
    /// epoch greater than the value returned.
    pub fn mark(&mut self) -> u64 {
        let last = self.epoch;
        self.epoch = self.epoch.checked_add(1).expect("4 billion marks in one ROW session");
        u64::from(last)
    }

    /// The first runs, up to about `budget` blocks of data (a data run may be cut short);
    /// a zeroed run counts as one block, whatever its length, and comes whole.
    pub fn first_runs(&self, budget: u64) -> Vec<WrittenRun> {
        let mut out = Vec::new();
        let mut left = budget;
        for r in self.map.iter() {
            if left == 0 {
                break;
            }
            let mut w = written(r);
            if !w.zero {
                w.len = w.len.min(left);
            }
            left -= if w.zero { 1 } else { w.len };
            out.push(w);
        }
        out
    }

    /// Every written run with its statistics, in block order.
    pub fn iter(&self) -> impl Iterator<Item = WrittenRun> + '_ {
        self.map.iter().map(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_count_zero_and_order_epochs() {
        let mut t = Table::default();
        t.record_write(0, 3, false);
        assert_eq!(t.mark(), 0);
        t.record_write(2, 4, false);
        assert!(t.covers(0, 4) && !t.covers(0, 5));
        let runs: Vec<_> = t.iter().collect();
        assert_eq!(runs[0], WrittenRun { start: 0, len: 2, writes: 1, epoch: 0, zero: false });
        assert_eq!(runs[1], WrittenRun { start: 2, len: 1, writes: 2, epoch: 1, zero: false });
        assert_eq!(runs[2], WrittenRun { start: 3, len: 1, writes: 1, epoch: 1, zero: false });
        t.record_write(10, 1 << 24, true);
        assert_eq!(
            t.segments(3, 12),
            vec![
                Segment { start: 3, end: 4, held: Held::Data },
                Segment { start: 4, end: 10, held: Held::Base },
                Segment { start: 10, end: 12, held: Held::Zero },
            ]
        );
        assert_eq!(t.take_pending(), vec![Change::Data(0, 3), Change::Data(2, 4), Change::Zero(10, 1 << 24)]);
        t.unmap(0, 2);
        t.unmap(2, 4);
        assert_eq!(t.take_pending(), vec![Change::Unmap(0, 4)]);
        assert_eq!(t.len(), (1 << 24) - 10);
        assert!(t.runs() <= 2);
    }

    #[test]
    fn counts_saturate() {
        let mut t = Table::default();
        for _ in 0..300 {
            t.record_write(5, 6, false);
        }
        assert_eq!(t.iter().next().unwrap().writes, MAX_WRITES);
    }
}
