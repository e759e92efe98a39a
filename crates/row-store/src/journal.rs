//! The mapping journal: an append-only file that makes the ROW mapping survive a crash.
//!
//! Layout: a 64-byte header (magic, version, block size, image size, header CRC), then
//! fixed-size records, each with its own CRC. A record is appended only after the data it
//! describes is durable, and the journal is synced before a FLUSH is acknowledged. A torn last
//! record (the process died while appending) fails its CRC and is cut off on replay.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use runmap::RunMap;

use crate::storage::{BlockFile, LockMode, OpenMode, Storage, SyncLatch};
use crate::table::{Change, Held, Table};
use crate::StoreError;

const MAGIC: &[u8; 8] = b"NBDROWJ1";
/// Version 2 added zeroed ranges; version 1 journals (without them) are still read.
const VERSION: u32 = 2;
const HEADER_LEN: u64 = 64;
const RECORD_LEN: usize = 17;

/// What a journal record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// Blocks `start..start + count` now live in the reserved file.
    Map {
        /// First block.
        start: u64,
        /// Number of blocks.
        count: u32,
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
    /// Blocks `start..start + count` were zeroed: they read as zeroes (a hole in the reserved
    /// file).
    Zero {
        /// First block.
        start: u64,
        /// Number of blocks.
        count: u32,
    },
}

impl Record {
    fn encode(&self) -> [u8; RECORD_LEN] {
        let (kind, start, count) = match *self {
            Record::Map { start, count } => (1u8, start, count),
            Record::Unmap { start, count } => (2, start, count),
            Record::MergeBegin => (3, 0, 0),
            Record::Zero { start, count } => (4, start, count),
        };
        let mut out = [0u8; RECORD_LEN];
        out[0] = kind;
        out[1..9].copy_from_slice(&start.to_le_bytes());
        out[9..13].copy_from_slice(&count.to_le_bytes());
        let crc = crc32fast::hash(&out[..13]);
        out[13..].copy_from_slice(&crc.to_le_bytes());
        out
    }

    fn decode(buf: &[u8; RECORD_LEN]) -> Option<Self> {
        if crc32fast::hash(&buf[..13]).to_le_bytes() != buf[13..] {
            return None;
        }
        let start = u64::from_le_bytes(buf[1..9].try_into().unwrap());
        let count = u32::from_le_bytes(buf[9..13].try_into().unwrap());
        match buf[0] {
            1 => Some(Record::Map { start, count }),
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
    /// The blocks in the overlay: data or zeroed.
    pub mapped: RunMap,
    /// Whether a merge had begun.
    pub merging: bool,
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
        let mut header = [0u8; HEADER_LEN as usize];
        header[..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&block_size.to_le_bytes());
        header[16..24].copy_from_slice(&image_size.to_le_bytes());
        let crc = crc32fast::hash(&header[..60]);
        header[60..].copy_from_slice(&crc.to_le_bytes());
        file.write_all_at(&header, 0).map_err(io)?;
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
        if version != VERSION && version != 1 {
            return Err(bad(format!("version {version}, this program reads 1 and {VERSION}")));
        }
        if bs != block_size || size != image_size {
            return Err(bad(format!(
                "written for a {size}-byte image with {bs}-byte blocks, but the image has {image_size} bytes and blocks of {block_size}"
            )));
        }
        let mut rest = Vec::new();
        file.read_append(&mut rest, (file_len - HEADER_LEN) as usize, HEADER_LEN).map_err(io)?;
        let mut replayed = Replayed::default();
        let mut good = 0usize;
        for chunk in rest.chunks_exact(RECORD_LEN) {
            let Some(record) = Record::decode(chunk.try_into().unwrap()) else { break };
            let m = &mut replayed.mapped;
            match record {
                Record::Map { start, count } => Table::replay(m, start, start + u64::from(count), Held::Data),
                Record::Zero { start, count } => Table::replay(m, start, start + u64::from(count), Held::Zero),
                Record::Unmap { start, count } => Table::replay(m, start, start + u64::from(count), Held::Base),
                Record::MergeBegin => replayed.merging = true,
            }
            good += RECORD_LEN;
        }
        let len = HEADER_LEN + good as u64;
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

/// The records of mapping changes, in order (a record counts at most `u32::MAX` blocks).
pub fn records(changes: &[Change]) -> Vec<Record> {
    let mut out = Vec::new();
    for c in changes {
        let (mut start, end, make): (u64, u64, fn(u64, u32) -> Record) = match *c {
            Change::Data(s, e) => (s, e, |start, count| Record::Map { start, count }),
            Change::Zero(s, e) => (s, e, |start, count| Record::Zero { start, count }),
            Change::Unmap(s, e) => (s, e, |start, count| Record::Unmap { start, count }),
        };
        while start < end {
            let n = (end - start).min(u64::from(u32::MAX));
            out.push(make(start, n as u32));
            start += n;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Posix;
    use std::fs::OpenOptions;
    use std::os::unix::fs::FileExt;

    #[test]
    fn replay_applies_records_in_order_and_cuts_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut j = Journal::create(&Posix, &path, 4096, 1 << 20, SyncLatch::new()).unwrap();
        j.append(&records(&[Change::Data(1, 4), Change::Data(7, 8), Change::Zero(9, 11), Change::Zero(20, 30)]))
            .unwrap();
        j.append(&[Record::MergeBegin, Record::Unmap { start: 2, count: 2 }, Record::Map { start: 25, count: 1 }])
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
