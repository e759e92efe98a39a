//! A compact map from block ranges to small values: the ROW mapping, its statistics and the
//! zeroed ranges (row-store), the dirty tracker, and the migration's record of what was sent
//! (migration-session).
//!
//! Contiguous blocks with the same value are one *run*, so memory follows the number of runs, not
//! the blocks they cover: a 64 GiB zeroing is a handful of runs. A run is 12 bytes in leaves of
//! up to [`LEAF_MAX`] runs (a leaf stores run starts relative to its own first block), which
//! keeps even scattered single-block writes near 13 bytes per block.

use std::collections::BTreeMap;

/// Most runs in a leaf; a fuller leaf is split in two.
const LEAF_MAX: usize = 1024;
/// Spare room a leaf grows by, so that capacity stays close to length.
const LEAF_GROW: usize = 32;
/// Longest run one entry holds (a longer one is several entries).
const MAX_RUN: u64 = (1 << 24) - 1;
/// Farthest a leaf's runs may start from its first block.
const LEAF_SPAN: u64 = 1 << 32;

/// What a run of blocks maps to: an 8-bit tag and a small value (`u32` unless a map needs
/// more: the ROW table keeps an epoch and a slot shift).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RunValue<V = u32> {
    /// Small per-run attributes (the table: write count and the zero flag).
    pub tag: u8,
    /// The value (the table: the epoch of the last write and where the run's data lies).
    pub value: V,
}

/// A run: `len` blocks from `start`, all with `value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run<V = u32> {
    /// First block.
    pub start: u64,
    /// Number of blocks (≥ 1).
    pub len: u64,
    /// What they map to.
    pub value: RunValue<V>,
}

impl<V> Run<V> {
    /// One past the last block.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry<V> {
    /// Start, relative to the leaf's key.
    lo: u32,
    /// Length (24 bits) and tag (8 bits).
    len_tag: u32,
    value: V,
}

impl<V: Copy> Entry<V> {
    fn run(&self, base: u64) -> Run<V> {
        Run {
            start: base + u64::from(self.lo),
            len: u64::from(self.len_tag & 0x00ff_ffff),
            value: RunValue { tag: (self.len_tag >> 24) as u8, value: self.value },
        }
    }

    fn of(run: &Run<V>, base: u64) -> Self {
        debug_assert!(run.len >= 1 && run.len <= MAX_RUN && run.start - base < LEAF_SPAN);
        Self {
            lo: (run.start - base) as u32,
            len_tag: run.len as u32 | (u32::from(run.value.tag) << 24),
            value: run.value.value,
        }
    }
}

/// The map; see the module's documentation.
#[derive(Debug, Clone)]
pub struct RunMap<V = u32> {
    /// Leaves by their first run's start; a leaf is never empty.
    leaves: BTreeMap<u64, Vec<Entry<V>>>,
    runs: usize,
    blocks: u64,
}

impl<V> Default for RunMap<V> {
    fn default() -> Self {
        Self { leaves: BTreeMap::new(), runs: 0, blocks: 0 }
    }
}

impl<V: Copy + PartialEq> RunMap<V> {
    /// Number of runs.
    pub fn runs(&self) -> usize {
        self.runs
    }

    /// Number of blocks mapped.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Whether nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.runs == 0
    }

    /// Heap bytes held (leaves' capacity and the tree's nodes, estimated).
    pub fn heap_bytes(&self) -> usize {
        let entries: usize = self.leaves.values().map(|l| l.capacity() * std::mem::size_of::<Entry<V>>()).sum();
        // A B-tree node per ~8 leaves of key, pointer and bookkeeping.
        entries + self.leaves.len() * 48
    }

    /// The runs overlapping `[start, end)`, clipped to it, in order.
    pub fn overlapping(&self, start: u64, end: u64) -> Vec<Run<V>> {
        let mut out = Vec::new();
        self.for_each_in(start, end, |r| out.push(r));
        out
    }

    /// Calls `f` for each run overlapping `[start, end)`, clipped to it, in order.
    pub fn for_each_in(&self, start: u64, end: u64, mut f: impl FnMut(Run<V>)) {
        if start >= end {
            return;
        }
        let first_key = self.leaves.range(..=start).next_back().map_or(start, |(k, _)| *k);
        for (&base, leaf) in self.leaves.range(first_key..end) {
            let from = leaf.partition_point(|e| e.run(base).end() <= start);
            for e in &leaf[from..] {
                let r = e.run(base);
                if r.start >= end {
                    return;
                }
                let (s, t) = (r.start.max(start), r.end().min(end));
                f(Run { start: s, len: t - s, value: r.value });
            }
        }
    }

    /// Every run, in order.
    pub fn iter(&self) -> impl Iterator<Item = Run<V>> + '_ {
        self.leaves.iter().flat_map(|(&base, leaf)| leaf.iter().map(move |e| e.run(base)))
    }

    /// The value of one block.
    pub fn get(&self, block: u64) -> Option<RunValue<V>> {
        let mut v = None;
        self.for_each_in(block, block + 1, |r| v = Some(r.value));
        v
    }

    /// Whether every block of `[start, end)` is mapped.
    pub fn covers(&self, start: u64, end: u64) -> bool {
        let mut at = start;
        self.for_each_in(start, end, |r| {
            if r.start == at {
                at = r.end();
            }
        });
        at >= end
    }

    /// Sets every block of `[start, end)` to `f(its value)`: `None` unmaps it. Neighbouring runs
    /// with equal values are joined.
    pub fn update(&mut self, start: u64, end: u64, mut f: impl FnMut(Option<RunValue<V>>) -> Option<RunValue<V>>) {
        if start >= end {
            return;
        }
        // Take the runs touching the range (and its neighbours, to join them), rebuild, put back.
        let taken = self.take(start.saturating_sub(1), end.saturating_add(1));
        let mut out: Vec<Run<V>> = Vec::with_capacity(taken.len() + 2);
        let push = |out: &mut Vec<Run<V>>, r: Run<V>| {
            if r.len == 0 {
                return;
            }
            match out.last_mut() {
                Some(last) if last.end() == r.start && last.value == r.value => last.len += r.len,
                _ => out.push(r),
            }
        };
        let mut at = start;
        for r in taken {
            // The part before the range, unchanged.
            if r.start < start {
                push(&mut out, Run { start: r.start, len: r.end().min(start) - r.start, value: r.value });
            }
            // A gap inside the range before this run.
            if r.start > at && at < end {
                let gap_end = r.start.min(end);
                if let Some(value) = f(None) {
                    push(&mut out, Run { start: at, len: gap_end - at, value });
                }
                at = gap_end;
            }
            // The part inside the range.
            let (s, t) = (r.start.max(start), r.end().min(end));
            if s < t {
                if let Some(value) = f(Some(r.value)) {
                    push(&mut out, Run { start: s, len: t - s, value });
                }
                at = t;
            }
            // The part after the range, unchanged.
            if r.end() > end {
                let s = r.start.max(end);
                push(&mut out, Run { start: s, len: r.end() - s, value: r.value });
            }
        }
        if at < end {
            if let Some(value) = f(None) {
                push(&mut out, Run { start: at, len: end - at, value });
            }
        }
        // Runs are pushed in order except that a gap may follow the part of a run before the
        // range: `push` keeps them sorted because every piece starts where the last ended or later.
        for r in out {
            self.insert(r);
        }
    }

    /// Removes and returns (whole) the runs overlapping `[start, end)`, in order.
    fn take(&mut self, start: u64, end: u64) -> Vec<Run<V>> {
        let mut out = Vec::new();
        if start >= end {
            return out;
        }
        let first_key = self.leaves.range(..=start).next_back().map_or(start, |(k, _)| *k);
        let keys: Vec<u64> = self.leaves.range(first_key..end).map(|(k, _)| *k).collect();
        for base in keys {
            let mut leaf = self.leaves.remove(&base).expect("listed");
            let from = leaf.partition_point(|e| e.run(base).end() <= start);
            let to = leaf.partition_point(|e| e.run(base).start < end);
            for e in leaf.drain(from..to) {
                let r = e.run(base);
                self.runs -= 1;
                self.blocks -= r.len;
                out.push(r);
            }
            self.put_leaf(base, leaf);
        }
        out
    }

    /// Puts a leaf back under the right key (its first run's start), rebasing it if that moved.
    fn put_leaf(&mut self, base: u64, mut leaf: Vec<Entry<V>>) {
        let Some(first) = leaf.first() else { return };
        let new_base = base + u64::from(first.lo);
        if new_base != base {
            let shift = (new_base - base) as u32;
            for e in &mut leaf {
                e.lo -= shift;
            }
        }
        if leaf.capacity() > leaf.len() + 2 * LEAF_GROW {
            leaf.shrink_to(leaf.len() + LEAF_GROW);
        }
        self.leaves.insert(new_base, leaf);
    }

    /// Inserts a run into a gap (no run overlaps it), splitting runs longer than an entry holds.
    fn insert(&mut self, run: Run<V>) {
        let mut r = run;
        while r.len > MAX_RUN {
            self.insert_one(Run { start: r.start, len: MAX_RUN, value: r.value });
            r = Run { start: r.start + MAX_RUN, len: r.len - MAX_RUN, value: r.value };
        }
        self.insert_one(r);
    }

    fn insert_one(&mut self, run: Run<V>) {
        self.runs += 1;
        self.blocks += run.len;
        // The leaf whose key is the greatest ≤ the run's start; if none, or it spans too far,
        // the run starts a leaf of its own (or joins the next leaf at its front).
        let target = self.leaves.range(..=run.start).next_back().map(|(k, _)| *k);
        let base = match target {
            Some(base) if run.start - base < LEAF_SPAN => base,
            _ => {
                let next = self.leaves.range(run.start..).next().map(|(k, _)| *k);
                let fits = |next: u64, leaf: &Vec<Entry<V>>| {
                    leaf.last().is_some_and(|e| next + u64::from(e.lo) - run.start < LEAF_SPAN)
                };
                match next {
                    Some(next) if fits(next, &self.leaves[&next]) => {
                        // Prepend to the next leaf: rebase it on this run's start.
                        let mut leaf = self.leaves.remove(&next).expect("found");
                        let shift = (next - run.start) as u32;
                        for e in &mut leaf {
                            e.lo += shift;
                        }
                        leaf.insert(0, Entry::of(&run, run.start));
                        self.store(run.start, leaf);
                    }
                    _ => self.store(run.start, vec![Entry::of(&run, run.start)]),
                }
                return;
            }
        };
        let mut leaf = self.leaves.remove(&base).expect("found");
        let at = leaf.partition_point(|e| e.run(base).start < run.start);
        if leaf.len() == leaf.capacity() {
            leaf.reserve_exact(LEAF_GROW);
        }
        leaf.insert(at, Entry::of(&run, base));
        self.store(base, leaf);
    }

    /// Stores a leaf, splitting it in two when it is full.
    fn store(&mut self, base: u64, mut leaf: Vec<Entry<V>>) {
        if leaf.len() > LEAF_MAX {
            let mut right = Vec::with_capacity(leaf.len() / 2 + LEAF_GROW);
            right.extend(leaf.drain(leaf.len() / 2..));
            // Still relative to `base`: `put_leaf` rebases it on its own first run.
            self.put_leaf(base, right);
        }
        self.put_leaf(base, leaf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap as Model;

    fn v(tag: u8, value: u32) -> RunValue {
        RunValue { tag, value }
    }

    fn model_runs(m: &Model<u64, RunValue>) -> Vec<Run> {
        let mut out: Vec<Run> = Vec::new();
        for (&b, &val) in m {
            match out.last_mut() {
                Some(r) if r.end() == b && r.value == val => r.len += 1,
                _ => out.push(Run { start: b, len: 1, value: val }),
            }
        }
        out
    }

    #[test]
    fn writes_join_and_split_runs() {
        let mut m = RunMap::default();
        m.update(10, 20, |_| Some(v(1, 5)));
        m.update(20, 30, |_| Some(v(1, 5)));
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![Run { start: 10, len: 20, value: v(1, 5) }]);
        m.update(15, 16, |old| old.map(|o| v(o.tag + 1, 6)));
        assert_eq!(m.runs(), 3);
        assert_eq!(m.get(15), Some(v(2, 6)));
        assert!(m.covers(10, 30) && !m.covers(9, 30));
        m.update(0, 1 << 40, |_| None);
        assert!(m.is_empty() && m.blocks() == 0);
    }

    #[test]
    fn a_huge_range_is_a_few_runs() {
        let mut m = RunMap::default();
        let tib = (1u64 << 40) / 4096;
        m.update(0, tib, |_| Some(v(0x80, 1)));
        assert_eq!(m.blocks(), tib);
        assert!(m.runs() <= 17, "{} runs", m.runs());
        assert!(m.heap_bytes() < 4096);
    }

    #[test]
    fn scattered_blocks_cost_about_thirteen_bytes_each() {
        let mut m = RunMap::default();
        let mut model = Model::new();
        let mut x = 1u64;
        for i in 0..200_000u32 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let b = (x >> 20) % (1 << 28);
            // Distinct values, so that nothing joins and leaves fill, split and re-key.
            m.update(b, b + 1, |_| Some(v(1, i)));
            model.insert(b, v(1, i));
        }
        let per = m.heap_bytes() as f64 / m.blocks() as f64;
        assert!(per <= 16.0, "{per:.1} bytes per block");
        assert_eq!(m.iter().collect::<Vec<_>>(), model_runs(&model));
        // Unmapping every other one leaves the rest intact.
        for (i, b) in model.keys().copied().collect::<Vec<_>>().into_iter().enumerate() {
            if i % 2 == 0 {
                m.update(b, b + 1, |_| None);
                model.remove(&b);
            }
        }
        assert_eq!(m.iter().collect::<Vec<_>>(), model_runs(&model));
        assert_eq!(
            m.overlapping(1 << 20, 1 << 26),
            model_runs(&model.range(1 << 20..1 << 26).map(|(a, b)| (*a, *b)).collect())
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Set(u64, u64, u8),
        Bump(u64, u64),
        Unmap(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Mostly small ranges in a small space (many joins and splits), some wide, some far.
        let pos = prop_oneof![8 => 0u64..3000, 1 => 0u64..(1 << 33), 1 => (1u64 << 32) - 50..(1u64 << 32) + 50];
        let len = prop_oneof![8 => 1u64..40, 2 => 1u64..3000];
        (pos, len, 0u8..4, 0u8..3).prop_map(|(p, l, tag, kind)| match kind {
            0 => Op::Set(p, p + l, tag),
            1 => Op::Bump(p, p + l),
            _ => Op::Unmap(p, p + l),
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// Against a block-by-block model: the same content, runs maximal, counts right.
        #[test]
        fn matches_a_block_model(ops in prop::collection::vec(op(), 1..120)) {
            let mut m = RunMap::default();
            let mut model: Model<u64, RunValue> = Model::new();
            for (i, o) in ops.iter().enumerate() {
                let epoch = i as u32;
                let (s, e) = match *o { Op::Set(s, e, _) | Op::Bump(s, e) | Op::Unmap(s, e) => (s, e) };
                if e - s > 5000 { continue; }
                match *o {
                    Op::Set(s, e, tag) => {
                        m.update(s, e, |_| Some(v(tag, epoch)));
                        for b in s..e { model.insert(b, v(tag, epoch)); }
                    }
                    Op::Bump(s, e) => {
                        let f = |old: Option<RunValue>| Some(v(old.map_or(1, |o| o.tag.saturating_add(1)), epoch));
                        m.update(s, e, f);
                        for b in s..e { let old = model.get(&b).copied(); model.insert(b, f(old).unwrap()); }
                    }
                    Op::Unmap(s, e) => {
                        m.update(s, e, |_| None);
                        for b in s..e { model.remove(&b); }
                    }
                }
                prop_assert_eq!(m.iter().collect::<Vec<_>>(), model_runs(&model));
                prop_assert_eq!(m.blocks(), model.len() as u64);
                prop_assert_eq!(m.runs(), model_runs(&model).len());
            }
            for (s, e) in [(0u64, 100u64), (50, 2500), ((1 << 32) - 10, (1 << 32) + 10)] {
                let want: Vec<Run> = model_runs(&model.range(s..e).map(|(a, b)| (*a, *b)).collect());
                prop_assert_eq!(m.overlapping(s, e), want);
            }
        }
    }
}
