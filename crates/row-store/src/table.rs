//! The ROW overlay's mapping and write statistics, kept as runs of blocks ([`runmap`]).
//!
//! A block is either in the base (unmapped), holds data in a *slot* of the reserved file, or
//! was zeroed (reads as zeroes, no slot). Slots are handed out in write order, so the first
//! writes of scattered blocks reach the disk as one sequential stream; a rewrite reuses its
//! block's slot. A run stores its slots as a *shift* (slot − block, modulo 2³²), so blocks
//! written together with consecutive slots stay one run and a run splits without renumbering.
//!
//! Each written run also carries a write count (saturating at [`MAX_WRITES`]) and the *epoch* of
//! its last write: the migration planner calls [`Table::mark`] before it reads blocks to send,
//! and a block written after that has a newer epoch. Memory follows the runs: about 17 bytes
//! per scattered block, a few bytes for a zeroed range of any length (see `runmap`).

use runmap::{Run, RunMap, RunValue};

/// Most slots one overlay hands out (slots are 32-bit: 16 TiB of updated data per session).
pub const MAX_SLOTS: u64 = 1 << 32;

/// A run's value besides its tag: the epoch of its last write and where its data lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Stamp {
    epoch: u32,
    /// Slot of the run's block *b* is `b + shift` (modulo 2³²); 0 for zeroed runs.
    shift: u32,
}

impl Stamp {
    fn slot_of(&self, block: u64) -> u64 {
        u64::from((block as u32).wrapping_add(self.shift))
    }

    fn shift_for(block: u64, slot: u64) -> u32 {
        (slot as u32).wrapping_sub(block as u32)
    }
}

/// The mapping as the journal replays it.
pub type Mapping = RunMap<Stamp>;

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

/// Blocks `start..end` of data in consecutive slots from `slot`, or a segment without slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// First block.
    pub start: u64,
    /// One past the last block.
    pub end: u64,
    /// What holds them.
    pub held: Held,
    /// The slot of `start` (data only).
    pub slot: u64,
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
    /// Now hold data in the reserved file, in consecutive slots from the third value.
    Data(u64, u64, u64),
    /// Now zeroed.
    Zero(u64, u64),
    /// Merged back into the image.
    Unmap(u64, u64),
}

/// The mapping, the statistics and the changes to journal.
#[derive(Debug, Default)]
pub struct Table {
    map: Mapping,
    epoch: u32,
    pending: Vec<Change>,
    /// A dirty tracker: nothing is journaled, so nothing is kept for it.
    untracked: bool,
    /// The next slot to hand out: slots are never reused within a session, so a slot freed by
    /// a change not yet journaled never receives another block's data.
    next_slot: u64,
}

fn written(r: Run<Stamp>) -> WrittenRun {
    WrittenRun {
        start: r.start,
        len: r.len,
        writes: u32::from(r.value.tag & !ZERO),
        epoch: u64::from(r.value.value.epoch),
        zero: r.value.tag & ZERO != 0,
    }
}

fn held(r: &Run<Stamp>) -> Held {
    if r.value.tag & ZERO != 0 {
        Held::Zero
    } else {
        Held::Data
    }
}

impl Table {
    /// A table that only counts writes (dirty tracking in direct mode), with no journal.
    pub fn tracker() -> Self {
        Self { untracked: true, ..Self::default() }
    }

    /// A table recovered from the journal's mapping: statistics restart at one write, epoch
    /// 0; new slots follow the last one in use.
    pub fn recovered(map: Mapping) -> Self {
        let next_slot = map
            .iter()
            .filter(|r| held(r) == Held::Data)
            .map(|r| r.value.value.slot_of(r.start) + r.len)
            .max()
            .unwrap_or(0);
        Self { map, next_slot, ..Self::default() }
    }

    /// Applies a journal record while replaying: data in slots from `slot`, zero, or unmapped.
    pub fn replay(map: &mut Mapping, start: u64, end: u64, held: Held, slot: u64) {
        let value = |tag, shift| Some(RunValue { tag, value: Stamp { epoch: 0, shift } });
        match held {
            Held::Base => map.update(start, end, |_| None),
            Held::Data => map.update(start, end, |_| value(1, Stamp::shift_for(start, slot))),
            Held::Zero => map.update(start, end, |_| value(1 | ZERO, 0)),
        }
    }

    /// The changes that rebuild `map` from nothing, in block order (rewriting a journal).
    pub fn changes_of(map: &Mapping) -> Vec<Change> {
        map.iter()
            .map(|r| match held(&r) {
                Held::Data => Change::Data(r.start, r.end(), r.value.value.slot_of(r.start)),
                _ => Change::Zero(r.start, r.end()),
            })
            .collect()
    }

    /// Hands out `n` consecutive new slots; `None` past [`MAX_SLOTS`].
    pub fn allocate(&mut self, n: u64) -> Option<u64> {
        let first = self.next_slot;
        (first + n <= MAX_SLOTS).then(|| {
            self.next_slot += n;
            first
        })
    }

    /// Slots handed out so far (the reserved file's length in blocks).
    pub fn slots(&self) -> u64 {
        self.next_slot
    }

    /// Whether a block is in the overlay.
    pub fn is_mapped(&self, block: u64) -> bool {
        self.map.get(block).is_some()
    }

    /// What holds each part of `[start, end)`, in order, gaps included, with the slots of data:
    /// a piece of data is a run of blocks in consecutive slots.
    pub fn pieces(&self, start: u64, end: u64) -> Vec<Piece> {
        let mut out: Vec<Piece> = Vec::new();
        let mut at = start;
        let mut push = |p: Piece| match out.last_mut() {
            Some(last)
                if last.end == p.start
                    && last.held == p.held
                    && (p.held != Held::Data || last.slot + (last.end - last.start) == p.slot) =>
            {
                last.end = p.end
            }
            _ => out.push(p),
        };
        self.map.for_each_in(start, end, |r| {
            if r.start > at {
                push(Piece { start: at, end: r.start, held: Held::Base, slot: 0 });
            }
            let held = held(&r);
            let slot = if held == Held::Data { r.value.value.slot_of(r.start) } else { 0 };
            push(Piece { start: r.start, end: r.end(), held, slot });
            at = r.end();
        });
        if at < end {
            push(Piece { start: at, end, held: Held::Base, slot: 0 });
        }
        out
    }

    /// What holds each part of `[start, end)`, in order, gaps included: the pieces, joined
    /// whatever their slots.
    pub fn segments(&self, start: u64, end: u64) -> Vec<Segment> {
        let mut out: Vec<Segment> = Vec::new();
        for p in self.pieces(start, end) {
            match out.last_mut() {
                Some(last) if last.end == p.start && last.held == p.held => last.end = p.end,
                _ => out.push(Segment { start: p.start, end: p.end, held: p.held }),
            }
        }
        out
    }

    /// Records one write request over blocks `[start, end)`: with `zero`, the range was zeroed;
    /// without, its blocks count as data in slots equal to their numbers (a dirty tracker has
    /// no slots; an overlay records its data with [`Table::record_placed`]).
    pub fn record_write(&mut self, start: u64, end: u64, zero: bool) {
        let (flag, change) = if zero { (ZERO, Change::Zero(start, end)) } else { (0, Change::Data(start, end, start)) };
        self.stamp(start, end, flag, |_| Stamp::shift_for(start, start));
        if !self.untracked {
            self.push_change(change);
        }
    }

    /// Records a write of data over blocks `[start, end)` into new slots from `slot`.
    pub fn record_placed(&mut self, start: u64, end: u64, slot: u64) {
        self.stamp(start, end, 0, |_| Stamp::shift_for(start, slot));
        self.push_change(Change::Data(start, end, slot));
    }

    /// Records a write over blocks `[start, end)` that all hold data, in their slots: the
    /// mapping is unchanged, so there is nothing to journal.
    pub fn record_rewrite(&mut self, start: u64, end: u64) {
        self.stamp(start, end, 0, |old| old.map_or(0, |o| o.value.shift));
    }

    /// Counts a write over `[start, end)` with the zero `flag` and the slot shift `shift` gives.
    fn stamp(&mut self, start: u64, end: u64, flag: u8, shift: impl Fn(Option<RunValue<Stamp>>) -> u32) {
        let epoch = self.epoch;
        self.map.update(start, end, |old| {
            let writes = old.map_or(0, |o| o.tag & !ZERO);
            let writes = (writes + 1).min(MAX_WRITES as u8);
            let shift = if flag == ZERO { 0 } else { shift(old) };
            Some(RunValue { tag: writes | flag, value: Stamp { epoch, shift } })
        });
    }

    fn push_change(&mut self, c: Change) {
        // Consecutive writes of a sequential stream join into one change.
        match (self.pending.last_mut(), c) {
            (Some(Change::Data(a, e, slot)), Change::Data(s, t, next)) if *e == s && *slot + (*e - *a) == next => {
                *e = t
            }
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
        let slot = t.allocate(3).unwrap();
        t.record_placed(0, 3, slot);
        assert_eq!(t.mark(), 0);
        t.record_rewrite(2, 3);
        let slot = t.allocate(1).unwrap();
        t.record_placed(3, 4, slot);
        assert_eq!(
            t.segments(0, 5)[..2],
            [Segment { start: 0, end: 4, held: Held::Data }, Segment { start: 4, end: 5, held: Held::Base }]
        );
        let runs: Vec<_> = t.iter().collect();
        assert_eq!(runs[0], WrittenRun { start: 0, len: 2, writes: 1, epoch: 0, zero: false });
        assert_eq!(runs[1], WrittenRun { start: 2, len: 1, writes: 2, epoch: 1, zero: false });
        assert_eq!(runs[2], WrittenRun { start: 3, len: 1, writes: 1, epoch: 1, zero: false });
        assert_eq!(t.pieces(0, 4), vec![Piece { start: 0, end: 4, held: Held::Data, slot: 0 }]);
        t.record_write(10, 1 << 24, true);
        assert!(t.pieces(3, 11).iter().any(|p| p.held != Held::Data), "not all data");
        assert_eq!(
            t.segments(3, 12),
            vec![
                Segment { start: 3, end: 4, held: Held::Data },
                Segment { start: 4, end: 10, held: Held::Base },
                Segment { start: 10, end: 12, held: Held::Zero },
            ]
        );
        // The rewrite changed no mapping; the two placements in consecutive slots join.
        assert_eq!(t.take_pending(), vec![Change::Data(0, 4, 0), Change::Zero(10, 1 << 24)]);
        t.unmap(0, 2);
        t.unmap(2, 4);
        assert_eq!(t.take_pending(), vec![Change::Unmap(0, 4)]);
        assert_eq!(t.len(), (1 << 24) - 10);
        assert!(t.runs() <= 2);
    }

    #[test]
    fn slots_follow_write_order_and_survive_a_replay() {
        let mut t = Table::default();
        // Scattered first writes get consecutive slots, in the order they came.
        for b in [900u64, 7, 500, 8] {
            let slot = t.allocate(1).unwrap();
            t.record_placed(b, b + 1, slot);
        }
        let slot_of = |t: &Table, b: u64| t.pieces(b, b + 1)[0].slot;
        assert_eq!([900, 7, 500, 8].map(|b| slot_of(&t, b)), [0, 1, 2, 3]);
        // 7 and 8 are neighbours with consecutive slots: one piece, two runs apart in slots 1 and 3.
        assert_eq!(t.pieces(7, 9).len(), 2);
        // A zeroed block loses its slot; written again it gets a new one.
        t.record_write(500, 501, true);
        let slot = t.allocate(1).unwrap();
        t.record_placed(500, 501, slot);
        assert_eq!(slot_of(&t, 500), 4);
        let mut replayed = Mapping::default();
        for c in records_of(&t.take_pending()) {
            c(&mut replayed);
        }
        let r = Table::recovered(replayed);
        assert_eq!([900, 7, 500, 8].map(|b| slot_of(&r, b)), [0, 1, 4, 3]);
        assert_eq!(r.slots(), 5);
        // Slots past 2³² are refused, not wrapped.
        let mut t = Table::default();
        assert!(t.allocate(MAX_SLOTS).is_some() && t.allocate(1).is_none());
    }

    /// Replays changes the way the journal does.
    fn records_of(changes: &[Change]) -> Vec<impl Fn(&mut Mapping)> {
        changes
            .iter()
            .map(|&c| {
                move |m: &mut Mapping| match c {
                    Change::Data(s, e, slot) => Table::replay(m, s, e, Held::Data, slot),
                    Change::Zero(s, e) => Table::replay(m, s, e, Held::Zero, 0),
                    Change::Unmap(s, e) => Table::replay(m, s, e, Held::Base, 0),
                }
            })
            .collect()
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
