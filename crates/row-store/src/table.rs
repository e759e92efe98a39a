//! The in-memory mapping table and write statistics of the ROW overlay.
//!
//! One entry per updated block, so memory follows the data written, not the disk size:
//! a `BTreeMap<u64, BlockStat>` costs about 40 bytes per block in practice (24 bytes of entry
//! plus B-tree node slack), i.e. ~100 MiB for 10 GiB written in 4 KiB blocks on any disk size.
//! The ordered map gives range queries for reads and block status, and sorted iteration for
//! the migration rounds.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;

/// Per-block write statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlockStat {
    /// Write requests that touched the block since ROW started (saturating).
    pub writes: u32,
    /// Generation of the last write that touched it.
    pub generation: u64,
}

/// Mapping of blocks to the reserved file, with statistics and the changes not yet journaled.
#[derive(Debug, Default)]
pub struct Table {
    blocks: BTreeMap<u64, BlockStat>,
    generation: u64,
    pending_map: Vec<u64>,
    pending_unmap: Vec<u64>,
    /// A dirty tracker: nothing is journaled, so nothing is kept for it.
    untracked: bool,
}

impl Table {
    /// A table that only counts writes (dirty tracking in direct mode), with no journal.
    pub fn tracker() -> Self {
        Self { untracked: true, ..Self::default() }
    }

    /// A table recovered from the journal: statistics restart at one write, generation 0.
    pub fn recovered(mapped: impl IntoIterator<Item = u64>) -> Self {
        let blocks = mapped.into_iter().map(|b| (b, BlockStat { writes: 1, generation: 0 })).collect();
        Self { blocks, ..Self::default() }
    }

    /// Whether a block lives in the reserved file.
    pub fn is_mapped(&self, block: u64) -> bool {
        self.blocks.contains_key(&block)
    }

    /// Whether every block of the range is mapped.
    pub fn all_mapped(&self, range: RangeInclusive<u64>) -> bool {
        let n = range.end() - range.start() + 1;
        self.blocks.range(range).count() as u64 == n
    }

    /// Mapped blocks within a range, in order.
    pub fn mapped_in(&self, range: RangeInclusive<u64>) -> Vec<u64> {
        self.blocks.range(range).map(|(b, _)| *b).collect()
    }

    /// Records one write request over a range: maps new blocks, bumps counts and generation.
    pub fn record_write(&mut self, range: RangeInclusive<u64>) -> u64 {
        self.generation += 1;
        let generation = self.generation;
        for b in range {
            let stat = self.blocks.entry(b).or_insert_with(|| {
                if !self.untracked {
                    self.pending_map.push(b);
                }
                BlockStat::default()
            });
            stat.writes = stat.writes.saturating_add(1);
            stat.generation = generation;
        }
        generation
    }

    /// Removes merged blocks from the mapping.
    pub fn unmap(&mut self, blocks: &[u64]) {
        for b in blocks {
            if self.blocks.remove(b).is_some() {
                self.pending_unmap.push(*b);
            }
        }
    }

    /// Takes the mapping changes not yet journaled, sorted and deduplicated.
    pub fn take_pending(&mut self) -> (Vec<u64>, Vec<u64>) {
        let mut maps = std::mem::take(&mut self.pending_map);
        let mut unmaps = std::mem::take(&mut self.pending_unmap);
        maps.sort_unstable();
        maps.dedup();
        unmaps.sort_unstable();
        unmaps.dedup();
        (maps, unmaps)
    }

    /// Puts back changes whose journaling failed, so the next flush retries them.
    pub fn restore_pending(&mut self, maps: Vec<u64>, unmaps: Vec<u64>) {
        self.pending_map.extend(maps);
        self.pending_unmap.extend(unmaps);
    }

    /// Number of mapped blocks.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// The current write generation (0 before any write in ROW mode).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The first `limit` mapped blocks, in order.
    pub fn first_mapped(&self, limit: usize) -> Vec<u64> {
        self.blocks.keys().take(limit).copied().collect()
    }

    /// Every mapped block with its statistics, in block order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, BlockStat)> + '_ {
        self.blocks.iter().map(|(b, s)| (*b, *s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_map_count_and_order_generations() {
        let mut t = Table::default();
        assert_eq!(t.record_write(0..=2), 1);
        assert_eq!(t.record_write(2..=3), 2);
        assert!(t.all_mapped(0..=3) && !t.all_mapped(0..=4));
        assert_eq!(t.mapped_in(1..=10), vec![1, 2, 3]);
        let stats: Vec<_> = t.iter().collect();
        assert_eq!(stats[2], (2, BlockStat { writes: 2, generation: 2 }));
        assert_eq!(t.take_pending(), (vec![0, 1, 2, 3], vec![]));
        t.unmap(&[1, 9]);
        assert_eq!(t.take_pending(), (vec![], vec![1]));
        assert_eq!(t.len(), 3);
    }
}
