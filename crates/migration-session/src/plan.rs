//! Which blocks each round sends, from the write statistics, without I/O.
//!
//! - [`RowPlan`] (the paper's method): after round 1 (the frozen base), round 2 sends the cold
//!   updated blocks (written fewer than `hot-threshold` times); settle passes (our addition) then
//!   send blocks that stopped changing while the final round would still exceed its budget; the
//!   final round sends everything not sent yet or written again since it was sent.
//! - [`BitmapPlan`] (the baseline): each round sends the chunks dirtied since the previous round
//!   began, at the dirty granularity.

use runmap::{RunMap, RunValue};

/// A run of written blocks, as the plans read the write statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// First block.
    pub start: u64,
    /// Number of blocks.
    pub len: u64,
    /// Write requests that touched each block.
    pub writes: u32,
    /// Epoch of the last write (see [`WriteLog::mark`]).
    pub epoch: u64,
    /// Whether the run was zeroed: it is sent as one zero extent, without reading it.
    pub zero: bool,
}

/// Blocks to send: `count` from `first`, as data (read and sent) or as one zero extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// First block.
    pub first: u64,
    /// Number of blocks.
    pub count: u64,
    /// Send as a zero extent (the blocks were zeroed) rather than read them.
    pub zero: bool,
}

/// The write statistics a plan reads: the written runs in block order, and epochs.
pub trait WriteLog {
    /// Calls `f` for every written run, in block order.
    fn for_each_written(&self, f: &mut dyn FnMut(Written));
    /// Starts a new epoch and returns the last: runs written from now on have a greater one.
    fn mark(&self) -> u64;
}

/// The row strategy's bookkeeping: for every block sent, the epoch that was current when it
/// was read for sending (a run map: memory follows runs, not blocks).
#[derive(Debug, Clone, Default)]
pub struct RowPlan {
    sent: RunMap,
}

impl RowPlan {
    /// The parts of `w` still to send: never sent, or written after they were read.
    fn unsent(&self, w: Written, out: &mut Vec<Written>) {
        let mut at = w.start;
        let end = w.start + w.len;
        let emit = |s: u64, e: u64, out: &mut Vec<Written>| {
            if s < e {
                match out.last_mut() {
                    Some(l) if l.start + l.len == s && l.epoch == w.epoch && l.zero == w.zero => l.len += e - s,
                    _ => out.push(Written { start: s, len: e - s, ..w }),
                }
            }
        };
        self.sent.for_each_in(w.start, end, |r| {
            emit(at, r.start, out);
            if w.epoch > u64::from(r.value.value) {
                emit(r.start, r.end(), out);
            }
            at = r.end();
        });
        emit(at, end, out);
    }

    /// Every run still to send, in block order.
    pub fn outstanding(&self, log: &dyn WriteLog) -> Vec<Written> {
        let mut out = Vec::new();
        log.for_each_written(&mut |w| self.unsent(w, &mut out));
        out
    }

    /// Round 2: cold blocks (written fewer than `threshold` times) not sent yet.
    pub fn cold_unsent(&self, log: &dyn WriteLog, threshold: u32) -> Vec<Span> {
        spans(self.outstanding(log).into_iter().filter(|w| w.writes < threshold))
    }

    /// The final round: everything outstanding.
    pub fn final_spans(&self, log: &dyn WriteLog) -> Vec<Span> {
        spans(self.outstanding(log))
    }

    /// A settle pass: while more than `budget_blocks` of data are outstanding, the outstanding
    /// runs not written since epoch `pass_start` (the guest has finished with them). `None`:
    /// nothing worth a pass (within budget, or everything outstanding is still being written).
    /// Zeroed runs cost nothing to send and do not count.
    pub fn settle_pass(&self, log: &dyn WriteLog, pass_start: u64, budget_blocks: u64) -> Option<Vec<Span>> {
        let outstanding = self.outstanding(log);
        let data: u64 = outstanding.iter().filter(|w| !w.zero).map(|w| w.len).sum();
        if data <= budget_blocks {
            return None;
        }
        let settled = spans(outstanding.into_iter().filter(|w| w.epoch <= pass_start));
        (!settled.is_empty()).then_some(settled)
    }

    /// Records that blocks `first..first + count` were read for sending in epoch `epoch`.
    pub fn mark_sent(&mut self, first: u64, count: u64, epoch: u64) {
        let value = RunValue { tag: 0, value: u32::try_from(epoch).unwrap_or(u32::MAX) };
        self.sent.update(first, first + count, |_| Some(value));
    }

    /// Memory the record of what was sent holds (it follows runs, not blocks).
    pub fn heap_bytes(&self) -> usize {
        self.sent.heap_bytes()
    }
}

/// Blocks of data in `spans` (zeroed spans are sent without data and do not count).
pub fn data_blocks(spans: &[Span]) -> u64 {
    spans.iter().filter(|s| !s.zero).map(|s| s.count).sum()
}

/// The first `max_data_blocks` blocks of data of `spans` (zeroed spans cost nothing to send and
/// all stay), in order: a pass that can be cut short so it never takes long.
pub fn take_data_blocks(spans: Vec<Span>, max_data_blocks: u64) -> Vec<Span> {
    let mut left = max_data_blocks;
    let mut out = Vec::with_capacity(spans.len());
    for s in spans {
        if s.zero {
            out.push(s);
        } else if left > 0 {
            let count = s.count.min(left);
            left -= count;
            out.push(Span { count, ..s });
        }
    }
    out
}

/// Runs as spans, adjacent ones of the same kind joined.
fn spans(runs: impl IntoIterator<Item = Written>) -> Vec<Span> {
    let mut out: Vec<Span> = Vec::new();
    for w in runs {
        match out.last_mut() {
            Some(s) if s.first + s.count == w.start && s.zero == w.zero => s.count += w.len,
            _ => out.push(Span { first: w.start, count: w.len, zero: w.zero }),
        }
    }
    out
}

/// The bitmap strategy's bookkeeping.
#[derive(Debug, Clone)]
pub struct BitmapPlan {
    last_round_start: u64,
    granularity_blocks: u64,
    total_blocks: u64,
}

impl BitmapPlan {
    /// A plan for a disk of `total_blocks` blocks, dirty at `granularity_blocks` (≥ 1).
    pub fn new(granularity_blocks: u64, total_blocks: u64) -> Self {
        Self { last_round_start: 0, granularity_blocks: granularity_blocks.max(1), total_blocks }
    }

    /// Round 1 begins: writes from now on are dirty.
    pub fn start(&mut self, log: &dyn WriteLog) {
        self.last_round_start = log.mark();
    }

    /// The next round: chunks dirtied since the previous round began, as spans (a dirty
    /// bitmap knows nothing of zeroes: everything is read and sent).
    pub fn next_round(&mut self, log: &dyn WriteLog) -> Vec<Span> {
        let since = self.last_round_start;
        self.last_round_start = log.mark();
        let mut dirty = Vec::new();
        log.for_each_written(&mut |w| {
            if w.epoch > since {
                dirty.push((w.start, w.len));
            }
        });
        dirty_chunks(&dirty, self.granularity_blocks, self.total_blocks)
            .into_iter()
            .map(|(first, count)| Span { first, count, zero: false })
            .collect()
    }
}

/// Dirty runs (sorted `(first, count)`) widened to whole chunks of `granularity` blocks, as a
/// coarse dirty bitmap sends them, as `(first, count)` runs.
pub fn dirty_chunks(runs: &[(u64, u64)], granularity: u64, total_blocks: u64) -> Vec<(u64, u64)> {
    let g = granularity.max(1);
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(first, count) in runs {
        let (c0, c1) = (first / g, (first + count - 1) / g);
        let (s, e) = (c0 * g, ((c1 + 1) * g).min(total_blocks));
        match out.last_mut() {
            Some((f, n)) if *f + *n >= s => *n = (*n).max(e - *f),
            _ => out.push((s, e - s)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_is_cut_at_a_number_of_data_blocks_keeping_the_zeroed_spans() {
        let sp = |first, count, zero| Span { first, count, zero };
        let spans = vec![sp(0, 10, false), sp(20, 100, true), sp(200, 10, false), sp(300, 5, false)];
        assert_eq!(take_data_blocks(spans.clone(), 15), vec![sp(0, 10, false), sp(20, 100, true), sp(200, 5, false)]);
        assert_eq!(take_data_blocks(spans.clone(), 100), spans);
        assert_eq!(take_data_blocks(spans, 0), vec![sp(20, 100, true)]);
    }
    use std::cell::Cell;

    /// A log of `(first block, count, writes, epoch, zero)` runs and an epoch counter.
    struct Log(Vec<(u64, u64, u32, u64, bool)>, Cell<u64>);

    fn log(runs: &[(u64, u64, u32, u64, bool)]) -> Log {
        Log(runs.to_vec(), Cell::new(runs.iter().map(|r| r.3).max().unwrap_or(0)))
    }

    impl WriteLog for Log {
        fn for_each_written(&self, f: &mut dyn FnMut(Written)) {
            for &(start, len, writes, epoch, zero) in &self.0 {
                f(Written { start, len, writes, epoch, zero });
            }
        }
        fn mark(&self) -> u64 {
            let e = self.1.get();
            self.1.set(e + 1);
            e
        }
    }

    fn data(first: u64, count: u64) -> Span {
        Span { first, count, zero: false }
    }

    #[test]
    fn row_sends_cold_blocks_then_what_is_left_or_rewritten() {
        let l = log(&[(1, 1, 1, 1, false), (2, 1, 5, 6, false), (3, 1, 1, 3, false)]);
        let mut plan = RowPlan::default();
        assert_eq!(plan.cold_unsent(&l, 2), vec![data(1, 1), data(3, 1)]);
        plan.mark_sent(1, 1, 1);
        plan.mark_sent(3, 1, 3);
        assert_eq!(plan.final_spans(&l), vec![data(2, 1)]);
        // Block 1 is written again after it was sent: it is outstanding again.
        let l = log(&[(1, 1, 2, 9, false), (2, 1, 5, 6, false), (3, 1, 1, 3, false)]);
        assert_eq!(plan.final_spans(&l), vec![data(1, 2)]);
        assert_eq!(plan.cold_unsent(&l, 3), vec![data(1, 1)]);
    }

    #[test]
    fn zeroed_runs_go_as_one_zero_span_and_part_of_a_run_may_be_sent() {
        let l = log(&[(0, 1 << 24, 1, 2, true), (1 << 24, 10, 1, 2, false)]);
        let mut plan = RowPlan::default();
        plan.mark_sent(5, 3, 2);
        assert_eq!(
            plan.final_spans(&l),
            vec![
                Span { first: 0, count: 5, zero: true },
                Span { first: 8, count: (1 << 24) - 8, zero: true },
                data(1 << 24, 10)
            ]
        );
        assert!(plan.heap_bytes() < 1024);
    }

    #[test]
    fn settle_passes_send_blocks_that_stopped_changing_while_over_budget() {
        let l = log(&[(1, 1, 3, 2, false), (2, 1, 3, 8, false), (3, 1, 3, 4, false), (9, 100, 1, 1, true)]);
        let plan = RowPlan::default();
        assert_eq!(plan.settle_pass(&l, 5, 3), None, "within budget: zeroed runs cost nothing");
        assert_eq!(
            plan.settle_pass(&l, 5, 1),
            Some(vec![data(1, 1), data(3, 1), Span { first: 9, count: 100, zero: true }])
        );
        assert_eq!(plan.settle_pass(&l, 0, 1), None, "everything still changing");
    }

    #[test]
    fn bitmap_rounds_send_whole_dirty_chunks_since_the_previous_round() {
        let l = log(&[]);
        let mut plan = BitmapPlan::new(4, 10);
        plan.start(&l);
        let l = Log(vec![(0, 1, 1, 1, false), (5, 1, 1, 1, false), (9, 1, 1, 1, false)], Cell::new(1));
        assert_eq!(plan.next_round(&l), vec![data(0, 10)]);
        let l = Log(vec![(0, 1, 1, 1, false), (5, 1, 2, 2, false), (9, 1, 1, 1, false)], Cell::new(2));
        assert_eq!(plan.next_round(&l), vec![data(4, 4)]);
        assert!(plan.next_round(&l).is_empty());
    }

    #[test]
    fn dirty_chunks_merge_and_clip_at_the_end() {
        assert_eq!(dirty_chunks(&[(0, 2), (300, 1)], 256, 400), vec![(0, 400)]);
        assert_eq!(dirty_chunks(&[(0, 1), (600, 1)], 256, 1000), vec![(0, 256), (512, 256)]);
        assert_eq!(dirty_chunks(&[(10, 600)], 256, 1000), vec![(0, 768)]);
        assert!(dirty_chunks(&[], 256, 10).is_empty());
    }
}
