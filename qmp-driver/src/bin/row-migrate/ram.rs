//! When QEMU's memory copy switches to RAM post-copy (`postcopy-ram`, `migrate-start-postcopy`):
//! the policy, pure and unit-tested; `sequence.rs` feeds it `query-migrate` samples.
//!
//! QEMU stops and copies the rest only once what is left fits its downtime limit at the rate it
//! measures. A guest that dirties memory about as fast as the link carries it never gets there
//! (measured: a TCG guest writing 1,000 4 KiB blocks/s behind a 20 Mbit/s link sent 341 MB of
//! a 256 MiB guest in 144 s and was still going). RAM post-copy bounds that: the guest moves
//! with its memory still on the source and the destination fetches pages as they are touched.
//! Its price is that a failure of either side during the post-copy loses the guest, so `auto`
//! switches only when pre-copy has shown it will not converge.

use std::time::Duration;

use crate::PostcopyArg;

/// A pass that leaves more than this share of what the pass two before left has not
/// converged.
const NOT_SHRINKING: f64 = 0.9;

/// What to do with the memory copy now.
#[derive(Debug, Clone, PartialEq)]
pub enum RamDecision {
    /// Let pre-copy go on.
    Wait,
    /// Switch to RAM post-copy, for this reason.
    StartPostcopy(String),
}

/// Watches the passes of QEMU's memory pre-copy.
#[derive(Debug)]
pub struct RamWatch {
    mode: PostcopyArg,
    /// The memory's share of the downtime budget (QEMU's downtime-limit).
    limit: Duration,
    /// `(pass, bytes left)` when each pass began, from the second on.
    passes: Vec<(u64, u64)>,
    decided: bool,
}

impl RamWatch {
    /// A watch for `mode` (`never` never switches) with memory's downtime share `limit`.
    pub fn new(mode: PostcopyArg, limit: Duration) -> Self {
        Self { mode, limit, passes: Vec::new(), decided: false }
    }

    /// Takes one sample: QEMU's `dirty-sync-count` (passes begun), the bytes left, and the
    /// rate the copy moves at (bytes/s). Says `StartPostcopy` at most once.
    pub fn sample(&mut self, syncs: u64, remaining: u64, rate: f64) -> RamDecision {
        if self.decided || self.mode == PostcopyArg::Never {
            return RamDecision::Wait;
        }
        if syncs >= 2 && self.passes.last().is_none_or(|&(pass, _)| syncs > pass) {
            self.passes.push((syncs, remaining));
        }
        let decision = match self.mode {
            // At the first sample: a first pass over a fast link converges before any second.
            PostcopyArg::Always => RamDecision::StartPostcopy("at once (--ram-postcopy always)".into()),
            _ => self.converges(rate),
        };
        self.decided = decision != RamDecision::Wait;
        decision
    }

    /// `auto`: post-copy once two more passes left about as much as before them and the rest
    /// would take longer than the limit to stop and copy.
    fn converges(&self, rate: f64) -> RamDecision {
        let n = self.passes.len();
        if n < 3 {
            return RamDecision::Wait;
        }
        let (before, now) = (self.passes[n - 3].1, self.passes[n - 1].1);
        let stop_and_copy = if rate > 0.0 { Duration::from_secs_f64(now as f64 / rate) } else { Duration::MAX };
        if (now as f64) < NOT_SHRINKING * before as f64 || stop_and_copy <= self.limit {
            return RamDecision::Wait;
        }
        RamDecision::StartPostcopy(format!(
            "memory does not converge: {:.1} MB left after {} passes ({:.1} MB two passes before), at {:.1} MB/s \
             about {} ms to stop and copy, over the {} ms budget",
            now as f64 / 1e6,
            self.passes[n - 1].0,
            before as f64 / 1e6,
            rate / 1e6,
            stop_and_copy.as_millis(),
            self.limit.as_millis()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_millis(150);

    #[test]
    fn auto_switches_only_when_passes_stop_shrinking_and_the_rest_would_not_fit() {
        let mut w = RamWatch::new(PostcopyArg::Auto, LIMIT);
        // The first pass, then passes that leave 40 MB each at 2.5 MB/s (16 s to stop and copy).
        assert_eq!(w.sample(1, 200_000_000, 2.5e6), RamDecision::Wait);
        for pass in 2..=3 {
            assert_eq!(w.sample(pass, 40_000_000, 2.5e6), RamDecision::Wait, "pass {pass}");
            assert_eq!(w.sample(pass, 39_000_000, 2.5e6), RamDecision::Wait, "samples within a pass");
        }
        let RamDecision::StartPostcopy(why) = w.sample(4, 41_000_000, 2.5e6) else { panic!("should switch") };
        assert!(why.contains("does not converge") && why.contains("16400 ms"), "{why}");
        assert_eq!(w.sample(5, 41_000_000, 2.5e6), RamDecision::Wait, "once only");
    }

    #[test]
    fn auto_waits_while_passes_shrink_or_the_rest_fits_the_budget() {
        let mut shrinking = RamWatch::new(PostcopyArg::Auto, LIMIT);
        for (pass, left) in [(2, 80_000_000), (3, 60_000_000), (4, 40_000_000), (5, 25_000_000)] {
            assert_eq!(shrinking.sample(pass, left, 2.5e6), RamDecision::Wait, "pass {pass}");
        }
        // Stuck, but what is left stops and copies within the budget: QEMU will complete.
        let mut small = RamWatch::new(PostcopyArg::Auto, LIMIT);
        for pass in 2..=6 {
            assert_eq!(small.sample(pass, 300_000, 2.5e6), RamDecision::Wait, "pass {pass}");
        }
    }

    #[test]
    fn always_switches_at_once_and_never_never_does() {
        let mut always = RamWatch::new(PostcopyArg::Always, LIMIT);
        assert!(matches!(always.sample(1, 1 << 28, 1e8), RamDecision::StartPostcopy(_)));
        assert_eq!(always.sample(2, 1 << 20, 1e8), RamDecision::Wait, "once only");
        let mut never = RamWatch::new(PostcopyArg::Never, LIMIT);
        for pass in 1..10 {
            assert_eq!(never.sample(pass, 1 << 30, 1.0), RamDecision::Wait);
        }
    }
}
