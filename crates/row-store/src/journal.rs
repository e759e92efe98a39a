//! The mapping journal: an append-only file that makes the ROW mapping survive a crash.
//!
//! Layout: a 64-byte header (magic, version, block size, image size, header CRC), then
//! fixed-size records, each with its own CRC. A record is appended only after the data it
//! describes is durable, and the journal is synced before a FLUSH is acknowledged. A torn last
//! record (the process died while appending) fails its CRC and is cut off on replay.
//!
//! Version 3 records say which slots of the reserved file hold mapped blocks. Versions 1 and 2
//! (an identity-mapped reserved file: block *b* at offset *b* × 4 KiB) are still read, as slots
//! equal to the block numbers, so an overlay left by an older release comes back.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::storage::{BlockFile, LockMode, OpenMode, Storage, SyncLatch};
use crate::table::{Change, Held, Mapping, Table, MAX_SLOTS};
use crate::StoreError;

const MAGIC: &[u8; 8] = b"NBDROWJ1";
/// Version 2 added zeroed ranges, version 3 slots; older journals are still read.
const VERSION: u32 = 3;
const HEADER_LEN: u64 = 64;
/// A version 3 record: kind, start, count, slot, CRC.
const RECORD_LEN: usize = 21;
/// A version 1 or 2 record: kind, start, count, CRC.
const OLD_RECORD_LEN: usize = 17;

/// What a journal record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// Blocks `start..start + count` now live in the reserved file, in slots from `slot`.
    Map {
        /// First block.
        start: u64,
        /// Number of blocks.
        count: u32,
        /// The slot of the first block.
        slot: u32,
    },
    /// Blocks `start..start + count` were merged back into the image.
    Unmap {
        /// First block.
        start: u64,
        /// Number of blocks.
        count: u32,
    },
    /// The merge back into the image has begun: the store is leaving ROW mode.
    MergeBegin,
    /// Blocks `start..start + count` were zeroed: they read as zeroes and have no slot.
    Zero {
        /// First block.
        start: u64,
        /// Number of blocks.
        count: u32,
    },
}

impl Record {
    fn encode(&self) -> [u8; RECORD_LEN] {
        let (kind, start, count, slot) = match *self {
            Record::Map { start, count, slot } => (1u8, start, count, slot),
            Record::Unmap { start, count } => (2, start, count, 0),
            Record::MergeBegin => (3, 0, 0, 0),
            Record::Zero { start, count } => (4, start, count, 0),
        };
        let mut out = [0u8; RECORD_LEN];
        out[0] = kind;
        out[1..9].copy_from_slice(&start.to_le_bytes());
        out[9..13].copy_from_slice(&count.to_le_bytes());
        out[13..17].copy_from_slice(&slot.to_le_bytes());
        let crc = crc32fast::hash(&out[..17]);
        out[17..].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes a record of `version`'s length; `None` if its CRC or kind is wrong. An old
    /// record's data sits at its block number (identity-mapped reserved file).
    fn decode(buf: &[u8], version: u32) -> Option<Self> {
        let body = buf.len() - 4;
        if crc32fast::hash(&buf[..body]).to_le_bytes() != buf[body..] {
            return None;
        }
        let start = u64::from_le_bytes(buf[1..9].try_into().unwrap());
        let count = u32::from_le_bytes(buf[9..13].try_into().unwrap());
        let slot = if version >= 3 {
            u32::from_le_bytes(buf[13..17].try_into().unwrap())
        } else {
            u32::try_from(start).ok().filter(|s| u64::from(*s) + u64::from(count) <= MAX_SLOTS)?
        };
        match buf[0] {
            1 => Some(Record::Map { start, count, slot }),
            2 => Some(Record::Unmap { start, count }),
            3 => Some(Record::MergeBegin),
            4 => Some(Record::Zero { start, count }),
            _ => None,
        }
    }
}

/// What replaying a journal recovers.
#[derive(Debug, Default)]
pub struct Replayed {
    /// The blocks in the overlay: data (with their slots) or zeroed.
    pub mapped: Mapping,
    /// Whether a merge had begun.
    pub merging: bool,
    /// The journal's version: below 3, the reserved file is identity-mapped and has the
    /// image's size.
    pub version: u32,
}

/// An open journal.
#[derive(Debug)]
pub struct Journal {
    file: Box<dyn BlockFile>,
    path: PathBuf,
    len: u64,
    latch: Arc<SyncLatch>,
}

impl Journal {
    /// Creates a new journal (replacing any file at `path`) and makes it durable.
    pub fn create(
        storage: &dyn Storage,
        path: &Path,
        block_size: u32,
        image_size: u64,
        latch: Arc<SyncLatch>,
    ) -> Result<Self, StoreError> {
        let io = |e| StoreError::Io { what: "creating journal", path: path.to_owned(), source: e };
        let file = storage.open(path, OpenMode::Create).map_err(io)?;
        file.lock(LockMode::Writer).map_err(io)?;
        file.write_all_at(&header_bytes(block_size, image_size), 0).map_err(io)?;
        latch.sync(path, || file.sync_all()).map_err(io)?;
        storage.sync_parent(path).map_err(io)?;
        Ok(Self { file, path: path.to_owned(), len: HEADER_LEN, latch })
    }

    /// Opens an existing journal, checks it belongs to this image, and replays it. A torn tail
    /// is cut off so later appends follow the last whole record. `Ok(None)`: the file holds no
    /// header at all (empty or zeroes), i.e. the ROW start that was creating it never committed.
    pub fn open(
        storage: &dyn Storage,
        path: &Path,
        block_size: u32,
        image_size: u64,
        latch: Arc<SyncLatch>,
    ) -> Result<Option<(Self, Replayed)>, StoreError> {
        let io = |e| StoreError::Io { what: "reading journal", path: path.to_owned(), source: e };
        let file = storage.open(path, OpenMode::ReadWrite).map_err(io)?;
        file.lock(LockMode::Writer).map_err(io)?;
        // Records whose sync failed in an earlier run may still be cached; read the disk's.
        file.drop_cache().map_err(io)?;
        let file_len = file.size().map_err(io)?;
        let mut header = [0u8; HEADER_LEN as usize];
        let n = file_len.min(HEADER_LEN) as usize;
        file.read_exact_at(&mut header[..n], 0).map_err(io)?;
        if header.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        if file_len < HEADER_LEN {
            return Err(StoreError::BadJournal { path: path.to_owned(), why: "header is incomplete".into() });
        }
        let bad = |why: String| StoreError::BadJournal { path: path.to_owned(), why };
        if &header[..8] != MAGIC || crc32fast::hash(&header[..60]).to_le_bytes() != header[60..] {
            return Err(bad("not a journal of this program, or its header is corrupt".into()));
        }
        let version = u32::from_le_bytes(header[8..12].try_into().unwrap());
        let bs = u32::from_le_bytes(header[12..16].try_into().unwrap());
        let size = u64::from_le_bytes(header[16..24].try_into().unwrap());
        if !(1..=VERSION).contains(&version) {
            return Err(bad(format!("version {version}, this program reads 1 to {VERSION}")));
        }
        if bs != block_size || size != image_size {
            return Err(bad(format!(
                "written for a {size}-byte image with {bs}-byte blocks, but the image has {image_size} bytes and blocks of {block_size}"
            )));
        }
        let mut rest = Vec::new();
        file.read_append(&mut rest, (file_len - HEADER_LEN) as usize, HEADER_LEN).map_err(io)?;
        let mut replayed = Replayed { version, ..Replayed::default() };
        let record_len = if version >= 3 { RECORD_LEN } else { OLD_RECORD_LEN };
        let mut good = 0usize;
        for chunk in rest.chunks_exact(record_len) {
            let Some(record) = Record::decode(chunk, version) else { break };
            let m = &mut replayed.mapped;
            let end = |start: u64, count: u32| start + u64::from(count);
            match record {
                Record::Map { start, count, slot } => {
                    Table::replay(m, start, end(start, count), Held::Data, u64::from(slot))
                }
                Record::Zero { start, count } => Table::replay(m, start, end(start, count), Held::Zero, 0),
                Record::Unmap { start, count } => Table::replay(m, start, end(start, count), Held::Base, 0),
                Record::MergeBegin => replayed.merging = true,
            }
            good += record_len;
        }
        let len = HEADER_LEN + good as u64;
        if version < VERSION {
            // Appends carry slots from now on: rewrite the journal in this version, once.
            drop(file);
            let mut bytes = header_bytes(block_size, image_size).to_vec();
            let mut records = records(&Table::changes_of(&replayed.mapped));
            if replayed.merging {
                records.push(Record::MergeBegin);
            }
            records.iter().for_each(|r| bytes.extend_from_slice(&r.encode()));
            storage.replace(path, &bytes).map_err(|e| StoreError::Io {
                what: "upgrading journal",
                path: path.to_owned(),
                source: e,
            })?;
            tracing::info!(path = %path.display(), from = version, to = VERSION, "ROW journal upgraded");
            return Self::open(storage, path, block_size, image_size, latch)
                .map(|opened| opened.map(|(journal, new)| (journal, Replayed { version, ..new })));
        }
        if len != HEADER_LEN + rest.len() as u64 {
            tracing::warn!(path = %path.display(), dropped = rest.len() - good, "journal has a torn tail; cutting it off");
            file.set_len(len).map_err(io)?;
            latch.sync(path, || file.sync_all()).map_err(io)?;
        }
        Ok(Some((Self { file, path: path.to_owned(), len, latch }, replayed)))
    }

    /// Appends records and syncs them.
    pub fn append(&mut self, records: &[Record]) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(records.len() * RECORD_LEN);
        for r in records {
            buf.extend_from_slice(&r.encode());
        }
        self.latch.check()?;
        self.file.write_all_at(&buf, self.len)?;
        self.latch.sync(&self.path, || self.file.sync_data())?;
        self.len += buf.len() as u64;
        Ok(())
    }

    /// The journal's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes in the journal.
    pub fn size(&self) -> u64 {
        self.len
    }
}

/// A journal header of this version.
fn header_bytes(block_size: u32, image_size: u64) -> [u8; HEADER_LEN as usize] {
    let mut header = [0u8; HEADER_LEN as usize];
    header[..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&VERSION.to_le_bytes());
    header[12..16].copy_from_slice(&block_size.to_le_bytes());
    header[16..24].copy_from_slice(&image_size.to_le_bytes());
    let crc = crc32fast::hash(&header[..60]);
    header[60..].copy_from_slice(&crc.to_le_bytes());
    header
}

/// The records of mapping changes, in order (a record counts at most `u32::MAX` blocks).
pub fn records(changes: &[Change]) -> Vec<Record> {
    let mut out = Vec::new();
    for c in changes {
        let (first, end, slot) = match *c {
            Change::Data(s, e, slot) => (s, e, slot),
            Change::Zero(s, e) | Change::Unmap(s, e) => (s, e, 0),
        };
        let mut start = first;
        while start < end {
            let count = (end - start).min(u64::from(u32::MAX)) as u32;
            out.push(match c {
                // Slots are below 2³² (see `Table::allocate`).
                Change::Data(..) => Record::Map { start, count, slot: (slot + (start - first)) as u32 },
                Change::Zero(..) => Record::Zero { start, count },
                Change::Unmap(..) => Record::Unmap { start, count },
            });
            start += u64::from(count);
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::storage::Posix;
    use std::fs::OpenOptions;
    use std::os::unix::fs::FileExt;

    #[test]
    fn replay_applies_records_in_order_and_cuts_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut j = Journal::create(&Posix, &path, 4096, 1 << 20, SyncLatch::new()).unwrap();
        j.append(&records(&[Change::Data(1, 4, 0), Change::Data(7, 8, 3), Change::Zero(9, 11), Change::Zero(20, 30)]))
            .unwrap();
        j.append(&[
            Record::MergeBegin,
            Record::Unmap { start: 2, count: 2 },
            Record::Map { start: 25, count: 1, slot: 4 },
        ])
        .unwrap();
        let good_len = j.size();
        drop(j);
        // A torn record: half of one appended.
        let f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all_at(&Record::Unmap { start: 9, count: 1 }.encode()[..9], good_len).unwrap();
        let (j, r) = Journal::open(&Posix, &path, 4096, 1 << 20, SyncLatch::new()).unwrap().unwrap();
        let t = Table::recovered(r.mapped);
        let seg = |s, e, held| crate::table::Segment { start: s, end: e, held };
        assert_eq!(
            t.segments(0, 31),
            vec![
                seg(0, 1, Held::Base),
                seg(1, 2, Held::Data),
                seg(2, 7, Held::Base),
                seg(7, 8, Held::Data),
                seg(8, 9, Held::Base),
                seg(9, 11, Held::Zero),
                seg(11, 20, Held::Base),
                seg(20, 25, Held::Zero),
                seg(25, 26, Held::Data),
                seg(26, 30, Held::Zero),
                seg(30, 31, Held::Base),
            ]
        );
        assert!(r.merging);
        assert_eq!(j.size(), good_len);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good_len);
    }

    /// A version 2 journal (identity-mapped reserved file) with `records` of `(kind, start, count)`.
    pub(crate) fn version_2_journal(image_size: u64, records: &[(u8, u64, u32)]) -> Vec<u8> {
        let mut bytes = vec![0u8; HEADER_LEN as usize];
        bytes[..8].copy_from_slice(MAGIC);
        bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
        bytes[12..16].copy_from_slice(&4096u32.to_le_bytes());
        bytes[16..24].copy_from_slice(&image_size.to_le_bytes());
        let crc = crc32fast::hash(&bytes[..60]);
        bytes[60..64].copy_from_slice(&crc.to_le_bytes());
        for &(kind, start, count) in records {
            let mut r = [0u8; OLD_RECORD_LEN];
            r[0] = kind;
            r[1..9].copy_from_slice(&start.to_le_bytes());
            r[9..13].copy_from_slice(&count.to_le_bytes());
            let crc = crc32fast::hash(&r[..13]);
            r[13..].copy_from_slice(&crc.to_le_bytes());
            bytes.extend_from_slice(&r);
        }
        bytes
    }

    #[test]
    fn a_version_2_journal_maps_blocks_to_their_own_slots_and_is_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        std::fs::write(&path, version_2_journal(1 << 20, &[(1, 5, 3), (4, 10, 2)])).unwrap();
        let (j, r) = Journal::open(&Posix, &path, 4096, 1 << 20, SyncLatch::new()).unwrap().unwrap();
        assert_eq!(r.version, 2);
        let t = Table::recovered(r.mapped);
        let pieces = t.pieces(5, 12);
        assert_eq!(pieces[0], crate::table::Piece { start: 5, end: 8, held: Held::Data, slot: 5 });
        assert_eq!(pieces[2].held, Held::Zero);
        assert_eq!(t.slots(), 8);
        // Rewritten in this version: the same mapping comes back from it.
        drop(j);
        let (_, again) = Journal::open(&Posix, &path, 4096, 1 << 20, SyncLatch::new()).unwrap().unwrap();
        assert_eq!(again.version, VERSION);
        assert_eq!(Table::recovered(again.mapped).pieces(5, 12), pieces);
    }

    #[test]
    fn journal_of_another_image_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        drop(Journal::create(&Posix, &path, 4096, 1 << 20, SyncLatch::new()).unwrap());
        let open = |size| Journal::open(&Posix, &path, 4096, size, SyncLatch::new());
        assert!(matches!(open(2 << 20), Err(StoreError::BadJournal { .. })));
        std::fs::write(&path, b"garbage").unwrap();
        assert!(matches!(open(1 << 20), Err(StoreError::BadJournal { .. })));
        // An empty or zeroed file is a journal whose creation never committed.
        std::fs::write(&path, b"").unwrap();
        assert!(open(1 << 20).unwrap().is_none());
        std::fs::write(&path, [0u8; 30]).unwrap();
        assert!(open(1 << 20).unwrap().is_none());
    }

    #[test]
    fn huge_changes_split_into_records() {
        let r = records(&[Change::Zero(0, 1 << 33)]);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0], Record::Zero { start: 0, count: u32::MAX });
        assert!(records(&[]).is_empty());
    }
}
