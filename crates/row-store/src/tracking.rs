//! Write tracking in direct mode: the dirty bitmap of the bitmap migration strategy.
//!
//! While it is on, every write request records its blocks with a generation and a count, as a
//! dirty bitmap would; nothing is journaled (a restart ends the migration that wanted it).

use std::sync::Mutex;

use crate::overlay::lock;
use crate::table::{Table, WrittenRun};
use crate::BLOCK_SIZE;

/// Dirty tracking, on or off.
#[derive(Debug, Default)]
pub struct DirtyTracker {
    table: Mutex<Option<Table>>,
}

impl DirtyTracker {
    /// Turns tracking on with fresh statistics, or off.
    pub fn set(&self, on: bool) {
        *lock(&self.table) = on.then(Table::tracker);
    }

    /// Whether tracking is on.
    pub fn is_on(&self) -> bool {
        lock(&self.table).is_some()
    }

    /// Records a write request over `[offset, offset + len)`.
    pub fn record(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        if let Some(t) = lock(&self.table).as_mut() {
            t.record_write(offset / BLOCK_SIZE, (offset + len - 1) / BLOCK_SIZE + 1, false);
        }
    }

    /// Runs `f` on the statistics, if tracking is on.
    pub fn with<T>(&self, f: impl FnOnce(&mut Table) -> T) -> Option<T> {
        lock(&self.table).as_mut().map(f)
    }

    /// Every dirtied run with its statistics (empty when off).
    pub fn stats(&self) -> Vec<WrittenRun> {
        self.with(|t| t.iter().collect()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_while_on() {
        let t = DirtyTracker::default();
        t.record(0, 4096);
        assert!(!t.is_on() && t.stats().is_empty());
        t.set(true);
        t.record(4096, 8192);
        assert_eq!(t.with(|t| t.mark()), Some(0));
        t.record(4096 * 5, 1);
        let runs: Vec<(u64, u64, u64)> = t.stats().iter().map(|r| (r.start, r.len, r.epoch)).collect();
        assert_eq!(runs, vec![(1, 2, 0), (5, 1, 1)]);
        t.set(false);
        assert!(t.stats().is_empty());
    }
}
