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

/// The residual log's file format (see the module's doc).
///
/// A header (magic, version, block size, session, how many `missing` records follow and their
/// CRC, the header's own CRC) and the `missing` records, all written and synced once before the
/// commit: damage there means the destination cannot tell which blocks it lacks, and is refused.
/// Then groups of `held` records, each closed by a trailer with their count and CRC (appended
/// after the image data they vouch for was synced), and a final `complete` marker once every
/// block is here. A torn last group is dropped (its blocks are fetched again: safe, as it was
/// never acknowledged); a bad group with a whole group after it was durable once, so dropping it
/// could let the source overwrite what the guest wrote here: refused.
#[derive(Debug)]
pub struct ResidualLog;

/// What a residual log says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Residue {
    /// These blocks are still missing.
    Missing(BlockSet),
    /// The post-copy completed: every block is here.
    Complete,
}

/// A residual log that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadResidual {
    /// Not a residual log, or another version.
    #[error("not a residual log of this program (bad header)")]
    Header,
    /// The log of another session.
    #[error("the residual log belongs to session {0}, not to the session held")]
    Session(SessionId),
    /// Damaged where it must be whole: which blocks are here cannot be proven.
    #[error("the residual log is damaged ({0}): which blocks this host holds cannot be proven")]
    Damaged(String),
}

const MAGIC: &[u8; 8] = b"NBDROWRS";
const VERSION: u32 = 2;
/// Bytes of the header: magic, version, block size, session id, missing records, their CRC,
/// the header's CRC.
pub const HEADER_LEN: usize = 8 + 4 + 4 + 16 + 8 + 4 + 4;
/// Bytes of a record: kind, first block, count, CRC-32 of the rest.
pub const RECORD_LEN: usize = 1 + 8 + 8 + 4;
const KIND_MISSING: u8 = 1;
const KIND_HELD: u8 = 2;
/// Closes a group: `first` holds the group's CRC, `count` its records.
const KIND_GROUP_END: u8 = 3;
const KIND_COMPLETE: u8 = 4;

fn push_record(kind: u8, first: u64, count: u64, out: &mut Vec<u8>) {
    let start = out.len();
    out.push(kind);
    out.extend_from_slice(&first.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// A record's kind, first and count, if its CRC holds.
fn read_record(rec: &[u8]) -> Option<(u8, u64, u64)> {
    let (body, crc) = rec.split_at(RECORD_LEN - 4);
    (crc32fast::hash(body).to_le_bytes() == crc).then(|| {
        let first = u64::from_le_bytes(body[1..9].try_into().expect("8 bytes"));
        (body[0], first, u64::from_le_bytes(body[9..17].try_into().expect("8 bytes")))
    })
}

impl ResidualLog {
    /// A new log for `session`: the header and the `missing` ranges.
    pub fn create(session: SessionId, block_size: u32, missing: &BlockSet) -> Vec<u8> {
        let mut body = Vec::with_capacity(missing.runs() * RECORD_LEN);
        for (first, end) in missing.iter() {
            push_record(KIND_MISSING, first, end - first, &mut body);
        }
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&block_size.to_le_bytes());
        out.extend_from_slice(&session.0);
        out.extend_from_slice(&(missing.runs() as u64).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Appends a group of `held` ranges `(first, end)` with its trailer.
    pub fn held(ranges: &[(u64, u64)], out: &mut Vec<u8>) {
        let start = out.len();
        for &(first, end) in ranges {
            push_record(KIND_HELD, first, end - first, out);
        }
        let crc = crc32fast::hash(&out[start..]);
        push_record(KIND_GROUP_END, u64::from(crc), ranges.len() as u64, out);
    }

    /// Appends the marker of a completed post-copy.
    pub fn complete(out: &mut Vec<u8>) {
        Self::held(&[], out);
        let at = out.len() - RECORD_LEN;
        out.truncate(at);
        push_record(KIND_COMPLETE, 0, 0, out);
    }

    /// What the log `bytes` of `session` says (see [`ResidualLog`] for what is refused).
    pub fn replay(bytes: &[u8], session: SessionId, block_size: u32) -> Result<Residue, BadResidual> {
        let header = bytes.get(..HEADER_LEN).ok_or(BadResidual::Header)?;
        if &header[..8] != MAGIC || header[8..12] != VERSION.to_le_bytes() || header[12..16] != block_size.to_le_bytes()
        {
            return Err(BadResidual::Header);
        }
        if crc32fast::hash(&header[..HEADER_LEN - 4]).to_le_bytes() != header[HEADER_LEN - 4..] {
            return Err(BadResidual::Damaged("its header fails its checksum".into()));
        }
        let theirs = SessionId(header[16..32].try_into().expect("16 bytes"));
        if theirs != session {
            return Err(BadResidual::Session(theirs));
        }
        let n = u64::from_le_bytes(header[32..40].try_into().expect("8 bytes"));
        let missing_len = usize::try_from(n).ok().and_then(|n| n.checked_mul(RECORD_LEN));
        let missing_bytes = missing_len.and_then(|l| bytes.get(HEADER_LEN..HEADER_LEN + l));
        let Some(missing_bytes) = missing_bytes.filter(|m| crc32fast::hash(m).to_le_bytes() == header[40..44]) else {
            return Err(BadResidual::Damaged("the missing ranges recorded at the commit are not whole".into()));
        };
        let mut set = BlockSet::new();
        for rec in missing_bytes.chunks_exact(RECORD_LEN) {
            match read_record(rec) {
                Some((KIND_MISSING, first, count)) if first.checked_add(count).is_some() => {
                    set.insert(first, first + count)
                }
                _ => return Err(BadResidual::Damaged("a missing range is malformed".into())),
            }
        }
        Self::replay_groups(&bytes[HEADER_LEN + missing_bytes.len()..], set)
    }

    /// Applies the whole groups after the missing ranges.
    fn replay_groups(rest: &[u8], mut set: BlockSet) -> Result<Residue, BadResidual> {
        let mut at = 0;
        while at < rest.len() {
            match Self::group(rest, at) {
                Some(Group::Held(ranges, next)) => {
                    for (first, end) in ranges {
                        set.remove(first, end);
                    }
                    at = next;
                }
                Some(Group::Complete) => return Ok(Residue::Complete),
                None => {
                    let later =
                        (at + RECORD_LEN..rest.len()).step_by(RECORD_LEN).find(|&s| Self::group(rest, s).is_some());
                    if let Some(s) = later {
                        return Err(BadResidual::Damaged(format!(
                            "a record at byte {} is bad, but whole records follow at byte {}",
                            HEADER_LEN + at,
                            HEADER_LEN + s
                        )));
                    }
                    break;
                }
            }
        }
        Ok(Residue::Missing(set))
    }

    /// The whole group (or completion marker) starting at `at`, if one is there.
    fn group(rest: &[u8], at: usize) -> Option<Group> {
        let mut ranges = Vec::new();
        let mut pos = at;
        while pos + RECORD_LEN <= rest.len() {
            match read_record(&rest[pos..pos + RECORD_LEN])? {
                (KIND_COMPLETE, ..) if pos == at => return Some(Group::Complete),
                (KIND_HELD, first, count) => ranges.push((first, first.checked_add(count)?)),
                (KIND_GROUP_END, crc, count) => {
                    let whole = count == ranges.len() as u64 && u64::from(crc32fast::hash(&rest[at..pos])) == crc;
                    return whole.then_some(Group::Held(ranges, pos + RECORD_LEN));
                }
                _ => return None,
            }
            pos += RECORD_LEN;
        }
        None
    }
}

/// A group of the log.
enum Group {
    /// `held` ranges, and where the next group starts.
    Held(Vec<(u64, u64)>, usize),
    /// The completion marker.
    Complete,
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

    fn log_of(id: SessionId) -> (Vec<u8>, usize) {
        let mut missing = BlockSet::new();
        missing.insert(100, 150);
        missing.insert(200, 210);
        let mut log = ResidualLog::create(id, 4096, &missing);
        ResidualLog::held(&[(110, 120)], &mut log);
        let whole = log.len();
        ResidualLog::held(&[(100, 105), (105, 110)], &mut log);
        (log, whole)
    }

    fn missing(r: Result<Residue, BadResidual>) -> Vec<(u64, u64)> {
        match r {
            Ok(Residue::Missing(set)) => set.iter().collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_log_replays_and_drops_only_a_torn_last_group() {
        let id = SessionId([7; 16]);
        let (log, whole) = log_of(id);
        assert_eq!(missing(ResidualLog::replay(&log, id, 4096)), vec![(120, 150), (200, 210)]);
        // Cut inside the last group, or its first record lost with its trailer kept: as if it
        // had never been written (its blocks are fetched again).
        let torn = vec![(100, 110), (120, 150), (200, 210)];
        assert_eq!(missing(ResidualLog::replay(&log[..whole + 7], id, 4096)), torn);
        let mut flipped = log.clone();
        flipped[whole + 3] ^= 1;
        assert_eq!(missing(ResidualLog::replay(&flipped, id, 4096)), torn);
        assert_eq!(ResidualLog::replay(&log, SessionId([8; 16]), 4096), Err(BadResidual::Session(id)));
        assert_eq!(ResidualLog::replay(&log, id, 512), Err(BadResidual::Header));
        assert_eq!(ResidualLog::replay(b"short", id, 4096), Err(BadResidual::Header));
        let mut done = log;
        ResidualLog::complete(&mut done);
        assert_eq!(ResidualLog::replay(&done, id, 4096), Ok(Residue::Complete));
    }

    #[test]
    fn damage_the_log_cannot_explain_is_refused() {
        let id = SessionId([7; 16]);
        let (log, whole) = log_of(id);
        let damaged = |at: usize| {
            let mut bytes = log.clone();
            bytes[at] ^= 0x10;
            ResidualLog::replay(&bytes, id, 4096)
        };
        // The header, a missing range, and the first group with a whole group after it.
        for at in [20, HEADER_LEN + 3, HEADER_LEN + 2 * RECORD_LEN + 3, whole - RECORD_LEN - 5] {
            assert!(matches!(damaged(at), Err(BadResidual::Damaged(_))), "byte {at}: {:?}", damaged(at));
        }
        // Missing ranges cut short.
        let cut = ResidualLog::replay(&log[..HEADER_LEN + RECORD_LEN], id, 4096);
        assert!(matches!(cut, Err(BadResidual::Damaged(_))), "{cut:?}");
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
