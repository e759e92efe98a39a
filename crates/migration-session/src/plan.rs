//! Which blocks each round sends, from the write statistics, without I/O.
//!
//! - [`RowPlan`] (the paper's method): after round 1 (the frozen base), round 2 sends the cold
//!   updated blocks (written fewer than `hot-threshold` times); settle passes (our addition) then
//!   send blocks that stopped changing while the final round would still exceed its budget; the
//!   final round sends everything not sent yet or written again since it was sent.
//! - [`BitmapPlan`] (the baseline): each round sends the chunks dirtied since the previous round
//!   began, at the dirty granularity.

use std::collections::HashMap;

/// The write statistics a plan reads: every written block in block order, with its write count
/// and the generation of its last write, and the current generation.
pub trait WriteLog {
    /// Calls `f(block, writes, generation)` for every written block, in block order.
    fn for_each_written(&self, f: &mut dyn FnMut(u64, u32, u64));
    /// The current write generation (one per write request).
    fn generation(&self) -> u64;
}

/// The row strategy's bookkeeping: the generation each block had when it was read for sending.
#[derive(Debug, Clone, Default)]
pub struct RowPlan {
    sent: HashMap<u64, u64>,
}

impl RowPlan {
    /// Whether `block`, last written at `generation`, still has to be sent.
    fn unsent(&self, block: u64, generation: u64) -> bool {
        self.sent.get(&block).is_none_or(|g| generation > *g)
    }

    /// Round 2: cold blocks (written fewer than `threshold` times) not sent yet.
    pub fn cold_unsent(&self, log: &dyn WriteLog, threshold: u32) -> Vec<u64> {
        let mut out = Vec::new();
        log.for_each_written(&mut |b, writes, generation| {
            if writes < threshold && self.unsent(b, generation) {
                out.push(b);
            }
        });
        out
    }

    /// Blocks never sent or written since they were, with their last write's generation.
    pub fn outstanding(&self, log: &dyn WriteLog) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        log.for_each_written(&mut |b, _, generation| {
            if self.unsent(b, generation) {
                out.push((b, generation));
            }
        });
        out
    }

    /// The final round: every outstanding block.
    pub fn final_blocks(&self, log: &dyn WriteLog) -> Vec<u64> {
        self.outstanding(log).into_iter().map(|(b, _)| b).collect()
    }

    /// A settle pass: while more than `budget_blocks` are outstanding, the outstanding blocks
    /// not written since generation `pass_start` (the guest has finished with them). `None`:
    /// nothing worth a pass (within budget, or every outstanding block is still being written).
    pub fn settle_pass(&self, log: &dyn WriteLog, pass_start: u64, budget_blocks: u64) -> Option<Vec<u64>> {
        let outstanding = self.outstanding(log);
        if outstanding.len() as u64 <= budget_blocks {
            return None;
        }
        let settled: Vec<u64> = outstanding.into_iter().filter(|(_, g)| *g <= pass_start).map(|(b, _)| b).collect();
        (!settled.is_empty()).then_some(settled)
    }

    /// Records that blocks `first..first + count` were read for sending at `generation`.
    pub fn mark_sent(&mut self, first: u64, count: u64, generation: u64) {
        for b in first..first + count {
            self.sent.insert(b, generation);
        }
    }
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
        self.last_round_start = log.generation();
    }

    /// The next round: chunks dirtied since the previous round began, as `(first, count)` runs.
    pub fn next_round(&mut self, log: &dyn WriteLog) -> Vec<(u64, u64)> {
        let since = self.last_round_start;
        self.last_round_start = log.generation();
        let mut dirty = Vec::new();
        log.for_each_written(&mut |b, _, generation| {
            if generation > since {
                dirty.push(b);
            }
        });
        dirty_chunks(&dirty, self.granularity_blocks, self.total_blocks)
    }
}

/// Dirty blocks (sorted) widened to whole chunks of `granularity` blocks, as a coarse dirty
/// bitmap sends them, as `(first, count)` runs.
pub fn dirty_chunks(blocks: &[u64], granularity: u64, total_blocks: u64) -> Vec<(u64, u64)> {
    let g = granularity.max(1);
    let mut chunks: Vec<u64> = blocks.iter().map(|b| b / g).collect();
    chunks.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for c in chunks {
        let (first, count) = (c * g, g.min(total_blocks.saturating_sub(c * g)));
        match out.last_mut() {
            Some((f, n)) if *f + *n == first => *n += count,
            _ => out.push((first, count)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log from `(block, writes, generation)` triples.
    struct Log(Vec<(u64, u32, u64)>);

    impl WriteLog for Log {
        fn for_each_written(&self, f: &mut dyn FnMut(u64, u32, u64)) {
            for &(b, w, g) in &self.0 {
                f(b, w, g);
            }
        }
        fn generation(&self) -> u64 {
            self.0.iter().map(|e| e.2).max().unwrap_or(0)
        }
    }

    #[test]
    fn row_sends_cold_blocks_then_what_is_left_or_rewritten() {
        let log = Log(vec![(1, 1, 1), (2, 5, 6), (3, 1, 3)]);
        let mut plan = RowPlan::default();
        assert_eq!(plan.cold_unsent(&log, 2), vec![1, 3]);
        plan.mark_sent(1, 1, 1);
        plan.mark_sent(3, 1, 3);
        assert_eq!(plan.final_blocks(&log), vec![2]);
        // Block 1 is written again after it was sent: it is outstanding again.
        let log = Log(vec![(1, 2, 9), (2, 5, 6), (3, 1, 3)]);
        assert_eq!(plan.final_blocks(&log), vec![1, 2]);
        assert_eq!(plan.cold_unsent(&log, 3), vec![1]);
    }

    #[test]
    fn settle_passes_send_blocks_that_stopped_changing_while_over_budget() {
        let log = Log(vec![(1, 3, 2), (2, 3, 8), (3, 3, 4)]);
        let plan = RowPlan::default();
        assert_eq!(plan.settle_pass(&log, 5, 3), None, "within budget");
        assert_eq!(plan.settle_pass(&log, 5, 1), Some(vec![1, 3]));
        assert_eq!(plan.settle_pass(&log, 1, 1), None, "everything still changing");
    }

    #[test]
    fn bitmap_rounds_send_whole_dirty_chunks_since_the_previous_round() {
        let mut plan = BitmapPlan::new(4, 10);
        plan.start(&Log(vec![]));
        let log = Log(vec![(0, 1, 1), (5, 1, 2), (9, 1, 3)]);
        assert_eq!(plan.next_round(&log), vec![(0, 10)]);
        let log = Log(vec![(0, 1, 1), (5, 2, 4), (9, 1, 3)]);
        assert_eq!(plan.next_round(&log), vec![(4, 4)]);
        assert!(plan.next_round(&log).is_empty());
    }

    #[test]
    fn dirty_chunks_merge_and_clip_at_the_end() {
        assert_eq!(dirty_chunks(&[0, 1, 300], 256, 400), vec![(0, 400)]);
        assert_eq!(dirty_chunks(&[0, 600], 256, 1000), vec![(0, 256), (512, 256)]);
        assert!(dirty_chunks(&[], 256, 10).is_empty());
    }
}
