//! Post-copy's residual: the blocks a destination serves but does not hold yet.
//!
//! When the final round would not fit the downtime budget, the source switches over with the
//! outstanding blocks unsent (`Missing` frames); the destination serves the guest at once,
//! fetches a missing block when it is read, and the source pushes the rest in the background.
//! [`BlockSet`] is the set of those blocks; [`ResidualLog`] is its durable form on the
//! destination (`IMAGE.residual`): the missing ranges recorded at the switchover, then records
//! of ranges that arrived or that the guest overwrote, appended only after the image data they
//! vouch for was synced. A restart therefore never trusts a block the image does not hold, and
//! never fetches over a block the guest wrote and flushed.

use std::collections::BTreeMap;

use crate::durable::SessionId;

/// A set of blocks, as disjoint, non-adjacent ranges `[start, end)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockSet {
    ranges: BTreeMap<u64, u64>,
    blocks: u64,
}

impl BlockSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Blocks in the set.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.blocks == 0
    }

    /// Ranges in the set.
    pub fn runs(&self) -> usize {
        self.ranges.len()
    }

    /// The ranges, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(&s, &e)| (s, e))
    }

    /// Adds `[start, end)`.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        // Merge with every range that overlaps or touches [s, e).
        let touching: Vec<(u64, u64)> =
            self.ranges.range(..=e).rev().take_while(|(_, &re)| re >= s).map(|(&a, &b)| (a, b)).collect();
        for (rs, re) in touching {
            self.ranges.remove(&rs);
            self.blocks -= re - rs;
            s = s.min(rs);
            e = e.max(re);
        }
        self.ranges.insert(s, e);
        self.blocks += e - s;
    }

    /// Removes `[start, end)`; returns how many blocks were in the set.
    pub fn remove(&mut self, start: u64, end: u64) -> u64 {
        if start >= end {
            return 0;
        }
        let hit: Vec<(u64, u64)> =
            self.ranges.range(..end).rev().take_while(|(_, &re)| re > start).map(|(&a, &b)| (a, b)).collect();
        let mut removed = 0;
        for (rs, re) in hit {
            self.ranges.remove(&rs);
            self.blocks -= re - rs;
            removed += re.min(end) - rs.max(start);
            if rs < start {
                self.ranges.insert(rs, start);
                self.blocks += start - rs;
            }
            if re > end {
                self.ranges.insert(end, re);
                self.blocks += re - end;
            }
        }
        removed
    }

    /// The parts of `[start, end)` in the set, in order.
    pub fn within(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = self
            .ranges
            .range(..end)
            .rev()
            .take_while(|(_, &re)| re > start)
            .map(|(&rs, &re)| (rs.max(start), re.min(end)))
            .collect();
        out.reverse();
        out
    }

    /// Whether any block of `[start, end)` is in the set.
    pub fn any_within(&self, start: u64, end: u64) -> bool {
        start < end && self.ranges.range(..end).next_back().is_some_and(|(_, &re)| re > start)
    }

    /// Whether `block` is in the set.
    pub fn contains(&self, block: u64) -> bool {
        self.any_within(block, block + 1)
    }
}

/// What a record of the residual log says about a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResidualRecord {
    /// The range is missing: the source holds it.
    Missing {
        /// First block.
        first: u64,
        /// Blocks.
        count: u64,
    },
    /// The range is held here (it arrived, or the guest overwrote it), durably.
    Held {
        /// First block.
        first: u64,
        /// Blocks.
        count: u64,
    },
}

/// The residual log's file format (see the module's doc).
#[derive(Debug)]
pub struct ResidualLog;

/// A residual log that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadResidual {
    /// Not a residual log, or another version.
    #[error("not a residual log of this program (bad header)")]
    Header,
    /// The log of another session.
    #[error("the residual log belongs to session {0}, not to the session held")]
    Session(SessionId),
}

const MAGIC: &[u8; 8] = b"NBDROWRS";
const VERSION: u32 = 1;
/// Bytes of the header: magic, version, block size, session id.
pub const HEADER_LEN: usize = 8 + 4 + 4 + 16;
/// Bytes of a record: kind, first block, count, CRC-32 of the rest.
pub const RECORD_LEN: usize = 1 + 8 + 8 + 4;
const KIND_MISSING: u8 = 1;
const KIND_HELD: u8 = 2;

impl ResidualLog {
    /// The header of a new log for `session`.
    pub fn header(session: SessionId, block_size: u32) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&block_size.to_le_bytes());
        out.extend_from_slice(&session.0);
        out
    }

    /// Appends a record's bytes.
    pub fn record(r: ResidualRecord, out: &mut Vec<u8>) {
        let (kind, first, count) = match r {
            ResidualRecord::Missing { first, count } => (KIND_MISSING, first, count),
            ResidualRecord::Held { first, count } => (KIND_HELD, first, count),
        };
        let start = out.len();
        out.push(kind);
        out.extend_from_slice(&first.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        let crc = crc32fast::hash(&out[start..]);
        out.extend_from_slice(&crc.to_le_bytes());
    }

    /// The blocks still missing by the log `bytes` of `session`. A torn or corrupt tail (a
    /// record cut by a power loss) ends the log: it was never synced, so nothing relied on it.
    pub fn replay(bytes: &[u8], session: SessionId, block_size: u32) -> Result<BlockSet, BadResidual> {
        let header = bytes.get(..HEADER_LEN).ok_or(BadResidual::Header)?;
        if &header[..8] != MAGIC || header[8..12] != VERSION.to_le_bytes() || header[12..16] != block_size.to_le_bytes()
        {
            return Err(BadResidual::Header);
        }
        let theirs = SessionId(header[16..32].try_into().expect("16 bytes"));
        if theirs != session {
            return Err(BadResidual::Session(theirs));
        }
        let mut set = BlockSet::new();
        for rec in bytes[HEADER_LEN..].chunks_exact(RECORD_LEN) {
            let (body, crc) = rec.split_at(RECORD_LEN - 4);
            if crc32fast::hash(body).to_le_bytes() != crc {
                break;
            }
            let first = u64::from_le_bytes(body[1..9].try_into().expect("8 bytes"));
            let count = u64::from_le_bytes(body[9..17].try_into().expect("8 bytes"));
            let Some(end) = first.checked_add(count) else { break };
            match body[0] {
                KIND_MISSING => set.insert(first, end),
                KIND_HELD => {
                    set.remove(first, end);
                }
                _ => break,
            }
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn ranges_merge_split_and_count() {
        let mut s = BlockSet::new();
        s.insert(10, 20);
        s.insert(20, 30);
        s.insert(5, 8);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(5, 8), (10, 30)]);
        assert_eq!(s.blocks(), 23);
        assert_eq!(s.remove(12, 14), 2);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(5, 8), (10, 12), (14, 30)]);
        assert_eq!(s.within(0, 11), vec![(5, 8), (10, 11)]);
        assert!(s.any_within(29, 40) && !s.any_within(30, 40) && !s.any_within(12, 14));
        assert_eq!(s.remove(0, 100), 21);
        assert!(s.is_empty());
    }

    #[test]
    fn the_log_replays_and_ignores_a_torn_tail() {
        let id = SessionId([7; 16]);
        let mut log = ResidualLog::header(id, 4096);
        ResidualLog::record(ResidualRecord::Missing { first: 100, count: 50 }, &mut log);
        ResidualLog::record(ResidualRecord::Held { first: 110, count: 10 }, &mut log);
        let whole = log.len();
        ResidualLog::record(ResidualRecord::Held { first: 100, count: 10 }, &mut log);
        let set = ResidualLog::replay(&log, id, 4096).unwrap();
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![(120, 150)]);
        // Cut inside the last record: as if it had never been written.
        let torn = ResidualLog::replay(&log[..whole + 7], id, 4096).unwrap();
        assert_eq!(torn.iter().collect::<Vec<_>>(), vec![(100, 110), (120, 150)]);
        let mut flipped = log.clone();
        flipped[whole + 3] ^= 1;
        assert_eq!(ResidualLog::replay(&flipped, id, 4096).unwrap(), torn);
        assert_eq!(ResidualLog::replay(&log, SessionId([8; 16]), 4096), Err(BadResidual::Session(id)));
        assert_eq!(ResidualLog::replay(&log, id, 512), Err(BadResidual::Header));
        assert_eq!(ResidualLog::replay(b"short", id, 4096), Err(BadResidual::Header));
    }

    proptest! {
        #[test]
        fn the_set_behaves_like_a_set_of_blocks(ops in proptest::collection::vec((any::<bool>(), 0u64..200, 0u64..40), 1..60)) {
            let mut s = BlockSet::new();
            let mut model = BTreeSet::new();
            for (add, start, len) in ops {
                let end = start + len;
                if add {
                    s.insert(start, end);
                    model.extend(start..end);
                } else {
                    let before = model.len() as u64;
                    model.retain(|b| *b < start || *b >= end);
                    prop_assert_eq!(s.remove(start, end), before - model.len() as u64);
                }
                prop_assert_eq!(s.blocks(), model.len() as u64);
                let listed: Vec<u64> = s.iter().flat_map(|(a, b)| a..b).collect();
                prop_assert_eq!(&listed, &model.iter().copied().collect::<Vec<_>>());
                // Disjoint and non-adjacent.
                for ((_, e1), (s2, _)) in s.iter().zip(s.iter().skip(1)) {
                    prop_assert!(e1 < s2);
                }
                let inside: Vec<u64> = s.within(50, 120).into_iter().flat_map(|(a, b)| a..b).collect();
                prop_assert_eq!(inside, model.range(50..120).copied().collect::<Vec<_>>());
                prop_assert_eq!(s.any_within(50, 120), model.range(50..120).next().is_some());
            }
        }
    }
}
