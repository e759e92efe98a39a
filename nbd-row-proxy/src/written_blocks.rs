//! Which blocks the guest wrote on a destination since its migration committed: what a
//! comparison with the source after the switchover must leave out, since the source never saw
//! those writes. One bit per 4 KiB block (32 KiB per GiB of disk, fixed), set before the write
//! runs, so a reader that finds a block's bit clear after reading it read the committed data.

use std::sync::atomic::{AtomicU64, Ordering};

use row_store::BLOCK_SIZE;

/// A bit per block of a disk, set by writes.
#[derive(Debug)]
pub struct WrittenBlocks {
    words: Vec<AtomicU64>,
    blocks: u64,
}

impl WrittenBlocks {
    /// None written, for a disk of `size` bytes (a short last block counts as one).
    pub fn new(size: u64) -> Self {
        let blocks = size.div_ceil(BLOCK_SIZE);
        Self { words: (0..blocks.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(), blocks }
    }

    /// Marks the blocks `[offset, offset+len)` touches; call before the write runs.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / BLOCK_SIZE;
        let end = (offset + len).div_ceil(BLOCK_SIZE).min(self.blocks);
        let mut b = first;
        while b < end {
            let (word, bit) = ((b / 64) as usize, b % 64);
            let n = (64 - bit).min(end - b);
            let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << bit };
            self.words[word].fetch_or(mask, Ordering::SeqCst);
            b += n;
        }
    }

    /// Whether block `b` was written.
    pub fn contains(&self, b: u64) -> bool {
        b < self.blocks && self.words[(b / 64) as usize].load(Ordering::SeqCst) & (1 << (b % 64)) != 0
    }

    /// The written blocks among `count` from `first`, as `(first, count)` runs in order.
    pub fn runs(&self, first: u64, count: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for b in first..(first + count).min(self.blocks) {
            if !self.contains(b) {
                continue;
            }
            match out.last_mut() {
                Some((start, n)) if *start + *n == b => *n += 1,
                _ => out.push((b, 1)),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_mark_every_block_they_touch_and_no_other() {
        let w = WrittenBlocks::new(1 << 20);
        w.mark(4096 * 3 + 100, 10);
        w.mark(4096 * 60, 4096 * 10);
        w.mark(4096 * 200, 0);
        assert_eq!(w.runs(0, 256), vec![(3, 1), (60, 10)]);
        assert_eq!(w.runs(62, 3), vec![(62, 3)]);
        assert!(!w.contains(200));
    }

    #[test]
    fn a_large_write_and_a_short_last_block() {
        let w = WrittenBlocks::new(4096 * 1000 + 512);
        w.mark(0, 4096 * 1000 + 512);
        assert_eq!(w.runs(0, 2000), vec![(0, 1001)]);
        w.mark(4096 * 5000, 4096);
        assert!(!w.contains(5000), "past the end is ignored");
    }
}
