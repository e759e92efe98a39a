//! The mapping journal: an append-only file that makes the ROW mapping survive a crash.
//!
//! Layout: a 64-byte header (magic, version, block size, image size, the overlay's id, where
//! slots start in the reserved file, header CRC), then fixed-size records, each with its own
//! CRC. A record is appended only after the data it describes is durable, and the journal is
//! synced before a FLUSH is acknowledged.
//!
//! Each append is a *batch* closed by a [`Record::BatchEnd`] that counts its records and holds
//! their CRC, so replay tells a torn last append (the process or the machine died while it
//! was written: cut off, as those changes were never acknowledged) from damage (a bad record
//! with a whole batch after it: that batch was appended only once the damaged one was durable,
//! so acknowledged changes are gone). Damage is refused; the proxy does not serve.
//!
//! Version 3 records say which slots of the reserved file hold mapped blocks. Versions 1 and 2
//! (an identity-mapped reserved file: block *b* at offset *b* × 4 KiB, no header, no batches)
//! are still read, as slots equal to the block numbers, and rewritten in version 3 once.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::storage::{BlockFile, LockMode, OpenMode, Storage, SyncLatch};
use crate::table::{Change, Held, Mapping, Table, MAX_SLOTS};
use crate::StoreError;

const MAGIC: &[u8; 8] = b"NBDROWJ1";
/// Version 2 added zeroed ranges, version 3 slots, batches and the overlay's id.
const VERSION: u32 = 3;
const HEADER_LEN: u64 = 64;
/// A version 3 record: kind, start, count, slot, CRC.
const RECORD_LEN: usize = 21;
/// A version 1 or 2 record: kind, start, count, CRC.
const OLD_RECORD_LEN: usize = 17;

/// Identifies one ROW session's overlay: its journal and reserved file carry the same id, so
/// files of two sessions are never taken for a pair.
pub type OverlayId = [u8; 16];
/// Which disk an overlay belongs to (derived from the disk's id by its user); all zero when
/// not bound (journals of older releases, or a user that does not say).
pub type DiskTag = [u8; 12];

/// What a journal's header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Format version.
    pub version: u32,
    /// Block size the mapping counts in.
    pub block_size: u32,
    /// Size of the image the overlay covers.
    pub image_size: u64,
    /// The overlay's id (zero for journals of versions 1 and 2).
    pub id: OverlayId,
    /// Where slot 0 starts in the reserved file (after its header; 0 for the identity layout).
    pub data_start: u64,
    /// The disk the overlay belongs to (zero: not bound).
    pub disk: DiskTag,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut h = [0u8; HEADER_LEN as usize];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&self.version.to_le_bytes());
        h[12..16].copy_from_slice(&self.block_size.to_le_bytes());
        h[16..24].copy_from_slice(&self.image_size.to_le_bytes());
        h[24..40].copy_from_slice(&self.id);
        h[40..48].copy_from_slice(&self.data_start.to_le_bytes());
        h[48..60].copy_from_slice(&self.disk);
        let crc = crc32fast::hash(&h[..60]);
        h[60..].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Decodes a header; `None` unless it has our magic and a valid CRC.
    pub fn decode(h: &[u8]) -> Option<Self> {
        if h.len() < HEADER_LEN as usize || &h[..8] != MAGIC || crc32fast::hash(&h[..60]).to_le_bytes() != h[60..64] {
            return None;
        }
        let version = u32::from_le_bytes(h[8..12].try_into().unwrap());
        let modern = version >= 3;
        Some(Self {
            version,
            block_size: u32::from_le_bytes(h[12..16].try_into().unwrap()),
            image_size: u64::from_le_bytes(h[16..24].try_into().unwrap()),
            id: if modern { h[24..40].try_into().unwrap() } else { [0; 16] },
            data_start: if modern { u64::from_le_bytes(h[40..48].try_into().unwrap()) } else { 0 },
            disk: if modern { h[48..60].try_into().unwrap() } else { [0; 12] },
        })
    }
}

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
    /// Closes a batch: the `count` records before it, whose bytes have the CRC `crc`.
    BatchEnd {
        /// Records in the batch.
        count: u32,
        /// CRC-32 of their bytes.
        crc: u32,
    },
}

impl Record {
    fn encode(&self) -> [u8; RECORD_LEN] {
        let (kind, start, count, slot) = match *self {
            Record::Map { start, count, slot } => (1u8, start, count, slot),
            Record::Unmap { start, count } => (2, start, count, 0),
            Record::MergeBegin => (3, 0, 0, 0),
            Record::Zero { start, count } => (4, start, count, 0),
            Record::BatchEnd { count, crc } => (5, 0, count, crc),
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
            5 if version >= 3 => Some(Record::BatchEnd { count, crc: slot }),
            _ => None,
        }
    }

    fn apply(&self, replayed: &mut Replayed) {
        let m = &mut replayed.mapped;
        let end = |start: u64, count: u32| start + u64::from(count);
        match *self {
            Record::Map { start, count, slot } => {
                Table::replay(m, start, end(start, count), Held::Data, u64::from(slot))
            }
            Record::Zero { start, count } => Table::replay(m, start, end(start, count), Held::Zero, 0),
            Record::Unmap { start, count } => Table::replay(m, start, end(start, count), Held::Base, 0),
            Record::MergeBegin => replayed.merging = true,
            Record::BatchEnd { .. } => {}
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
    /// The journal's version as found (below 3: upgraded from the identity layout).
    pub version: u32,
    /// The overlay's id (zero for an overlay of the identity layout).
    pub id: OverlayId,
    /// The disk it belongs to (zero: not bound).
    pub disk: DiskTag,
    /// Where slot 0 starts in the reserved file.
    pub data_start: u64,
}

/// How far replay got through a journal's records.
enum Replay {
    /// Every record applied.
    Whole,
    /// The last append is torn from this byte of the records on: cut it off.
    TornAt(usize),
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
    /// Creates a new journal for the overlay `id` (nothing may be at `path`) and makes it
    /// durable.
    pub fn create(
        storage: &dyn Storage,
        path: &Path,
        header: Header,
        latch: Arc<SyncLatch>,
    ) -> Result<Self, StoreError> {
        let io = |e| StoreError::Io { what: "creating journal", path: path.to_owned(), source: e };
        let file = storage.open(path, OpenMode::CreateNew).map_err(io)?;
        file.lock(LockMode::Writer).map_err(io)?;
        file.write_all_at(&Header { version: VERSION, ..header }.encode(), 0).map_err(io)?;
        latch.sync(path, || file.sync_all()).map_err(io)?;
        storage.sync_parent(path).map_err(io)?;
        Ok(Self { file, path: path.to_owned(), len: HEADER_LEN, latch })
    }

    /// Opens an existing journal, checks it belongs to this image, and replays it. A torn tail
    /// is cut off so later appends follow the last whole batch; damage before an intact batch
    /// is refused, and so is a journal whose whole batches end before `mark` (the length the
    /// reserved file recorded at its last sync: batches acknowledged since are missing, say a
    /// journal cut at a batch boundary). `Ok(None)`: the file holds no header at all (empty or
    /// zeroes), i.e. the ROW start that was creating it never committed.
    pub fn open(
        storage: &dyn Storage,
        path: &Path,
        block_size: u32,
        image_size: u64,
        mark: Option<u64>,
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
        let bad = |why: String| StoreError::BadJournal { path: path.to_owned(), why };
        if file_len < HEADER_LEN {
            return Err(bad("header is incomplete".into()));
        }
        let h = Header::decode(&header)
            .ok_or_else(|| bad("not a journal of this program, or its header is corrupt".into()))?;
        if !(1..=VERSION).contains(&h.version) {
            return Err(bad(format!("version {}, this program reads 1 to {VERSION}", h.version)));
        }
        if h.block_size != block_size || h.image_size != image_size {
            return Err(bad(format!(
                "written for a {}-byte image with {}-byte blocks, but the image has {image_size} bytes and blocks of {block_size}",
                h.image_size, h.block_size
            )));
        }
        let mut rest = Vec::new();
        file.read_append(&mut rest, (file_len - HEADER_LEN) as usize, HEADER_LEN).map_err(io)?;
        let mut replayed =
            Replayed { version: h.version, id: h.id, disk: h.disk, data_start: h.data_start, ..Replayed::default() };
        let replay = if h.version >= 3 {
            replay_batches(&rest, &mut replayed)
        } else {
            replay_old(&rest, &mut replayed, h.version)
        };
        let good = match replay.map_err(bad)? {
            Replay::Whole => rest.len(),
            Replay::TornAt(at) => at,
        };
        if let Some(m) = mark.filter(|m| *m > HEADER_LEN + good as u64) {
            return Err(bad(format!(
                "its whole records end at byte {}, but it held {m} bytes when the overlay last synced: changes \
                 acknowledged to the guest are missing (the journal was cut or replaced by an older copy), so \
                 the overlay is not used (restore the journal, or remove the overlay files to drop its writes)",
                HEADER_LEN + good as u64
            )));
        }
        if h.version < VERSION {
            drop(file);
            Self::upgrade(storage, path, h, &replayed)?;
            return Self::open(storage, path, block_size, image_size, mark, latch)
                .map(|opened| opened.map(|(journal, new)| (journal, Replayed { version: h.version, ..new })));
        }
        let len = HEADER_LEN + good as u64;
        if good != rest.len() {
            tracing::warn!(path = %path.display(), dropped = rest.len() - good, "journal has a torn last append; cutting it off");
            file.set_len(len).map_err(io)?;
            latch.sync(path, || file.sync_all()).map_err(io)?;
        }
        Ok(Some((Self { file, path: path.to_owned(), len, latch }, replayed)))
    }

    /// Rewrites a journal of the identity layout in this version, once: appends carry slots
    /// and batches from now on. Slots keep the block numbers (`data_start` 0, no id).
    fn upgrade(storage: &dyn Storage, path: &Path, old: Header, replayed: &Replayed) -> Result<(), StoreError> {
        let mut bytes = Header { version: VERSION, id: [0; 16], data_start: 0, disk: [0; 12], ..old }.encode().to_vec();
        let mut records = records(&Table::changes_of(&replayed.mapped));
        if replayed.merging {
            records.push(Record::MergeBegin);
        }
        bytes.extend_from_slice(&batch(&records));
        storage.replace(path, &bytes).map_err(|e| StoreError::Io {
            what: "upgrading journal",
            path: path.to_owned(),
            source: e,
        })?;
        tracing::info!(path = %path.display(), from = old.version, to = VERSION, "ROW journal upgraded");
        Ok(())
    }

    /// Appends records as one batch and syncs them.
    pub fn append(&mut self, records: &[Record]) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let buf = batch(records);
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

/// The bytes of `records` closed by their [`Record::BatchEnd`] (several if a batch would
/// count more than `u32::MAX` records).
fn batch(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::with_capacity((records.len() + 1) * RECORD_LEN);
    for chunk in records.chunks(u32::MAX as usize) {
        let from = out.len();
        chunk.iter().for_each(|r| out.extend_from_slice(&r.encode()));
        let end = Record::BatchEnd { count: chunk.len() as u32, crc: crc32fast::hash(&out[from..]) };
        out.extend_from_slice(&end.encode());
    }
    out
}

/// The records of a whole batch starting at record `first`, if one is there.
fn whole_batch(rest: &[u8], first: usize) -> Option<(Vec<Record>, usize)> {
    let mut records = Vec::new();
    let mut at = first;
    while at + RECORD_LEN <= rest.len() {
        match Record::decode(&rest[at..at + RECORD_LEN], VERSION)? {
            Record::BatchEnd { count, crc } => {
                let ok = count as usize == records.len() && crc32fast::hash(&rest[first..at]) == crc;
                return ok.then_some((records, at + RECORD_LEN));
            }
            r => records.push(r),
        }
        at += RECORD_LEN;
    }
    None
}

/// Applies every whole batch; a bad one must be the last thing in the file (a torn append).
fn replay_batches(rest: &[u8], replayed: &mut Replayed) -> Result<Replay, String> {
    let mut at = 0;
    while at < rest.len() {
        let Some((records, next)) = whole_batch(rest, at) else {
            // Torn, unless a whole batch follows somewhere: then this one was durable once.
            let later = (at + RECORD_LEN..rest.len()).step_by(RECORD_LEN).find(|&s| whole_batch(rest, s).is_some());
            return match later {
                None => Ok(Replay::TornAt(at)),
                Some(s) => Err(format!(
                    "damaged at byte {} though intact records follow at byte {}: changes acknowledged to the \
                     guest would be lost, so the overlay is not used (restore the journal from a backup, or \
                     remove the overlay files to drop its writes)",
                    HEADER_LEN + at as u64,
                    HEADER_LEN + s as u64
                )),
            };
        };
        records.iter().for_each(|r| r.apply(replayed));
        at = next;
    }
    Ok(Replay::Whole)
}

/// Versions 1 and 2: records one by one, the first bad one and all after it cut off.
fn replay_old(rest: &[u8], replayed: &mut Replayed, version: u32) -> Result<Replay, String> {
    for (i, chunk) in rest.chunks(OLD_RECORD_LEN).enumerate() {
        match (chunk.len() == OLD_RECORD_LEN).then(|| Record::decode(chunk, version)).flatten() {
            Some(r) => r.apply(replayed),
            None => return Ok(Replay::TornAt(i * OLD_RECORD_LEN)),
        }
    }
    Ok(Replay::Whole)
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
        let mut j = Journal::create(&Posix, &path, header(1 << 20), SyncLatch::new()).unwrap();
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
        let (j, r) = Journal::open(&Posix, &path, 4096, 1 << 20, None, SyncLatch::new()).unwrap().unwrap();
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
        let (j, r) = Journal::open(&Posix, &path, 4096, 1 << 20, None, SyncLatch::new()).unwrap().unwrap();
        assert_eq!(r.version, 2);
        let t = Table::recovered(r.mapped);
        let pieces = t.pieces(5, 12);
        assert_eq!(pieces[0], crate::table::Piece { start: 5, end: 8, held: Held::Data, slot: 5 });
        assert_eq!(pieces[2].held, Held::Zero);
        assert_eq!(t.slots(), 8);
        // Rewritten in this version: the same mapping comes back from it.
        drop(j);
        let (_, again) = Journal::open(&Posix, &path, 4096, 1 << 20, None, SyncLatch::new()).unwrap().unwrap();
        assert_eq!(again.version, VERSION);
        assert_eq!(Table::recovered(again.mapped).pieces(5, 12), pieces);
    }

    #[test]
    fn journal_of_another_image_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        drop(Journal::create(&Posix, &path, header(1 << 20), SyncLatch::new()).unwrap());
        let open = |size| Journal::open(&Posix, &path, 4096, size, None, SyncLatch::new());
        assert!(matches!(open(2 << 20), Err(StoreError::BadJournal { .. })));
        std::fs::write(&path, b"garbage").unwrap();
        assert!(matches!(open(1 << 20), Err(StoreError::BadJournal { .. })));
        // An empty or zeroed file is a journal whose creation never committed.
        std::fs::write(&path, b"").unwrap();
        assert!(open(1 << 20).unwrap().is_none());
        std::fs::write(&path, [0u8; 30]).unwrap();
        assert!(open(1 << 20).unwrap().is_none());
    }

    fn header(image_size: u64) -> Header {
        Header { version: VERSION, block_size: 4096, image_size, id: [7; 16], data_start: 4096, disk: [3; 12] }
    }

    /// A journal of two appends (a batch of two records, then one of one) and its length.
    fn two_batches(path: &Path) -> u64 {
        let mut j = Journal::create(&Posix, path, header(1 << 20), SyncLatch::new()).unwrap();
        j.append(&records(&[Change::Data(1, 2, 0), Change::Data(5, 6, 1)])).unwrap();
        j.append(&records(&[Change::Zero(7, 9)])).unwrap();
        j.size()
    }

    fn flip(path: &Path, at: u64) {
        let mut bytes = std::fs::read(path).unwrap();
        bytes[at as usize] ^= 0x40;
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn damage_before_an_intact_append_is_refused_not_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        two_batches(&path);
        // One byte of the first record: the second append, synced after it, proves it was whole.
        flip(&path, HEADER_LEN + 3);
        let err = Journal::open(&Posix, &path, 4096, 1 << 20, None, SyncLatch::new()).unwrap_err();
        assert!(err.to_string().contains("intact records follow"), "{err}");
        // The file is left as it was for the operator.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), HEADER_LEN + 5 * RECORD_LEN as u64);
    }

    #[test]
    fn a_torn_last_append_is_cut_even_if_its_end_survived() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let len = two_batches(&path);
        // The last append lost its first record's page but kept its BatchEnd.
        flip(&path, len - 2 * RECORD_LEN as u64 + 1);
        let (j, r) = Journal::open(&Posix, &path, 4096, 1 << 20, None, SyncLatch::new()).unwrap().unwrap();
        assert_eq!(j.size(), HEADER_LEN + 3 * RECORD_LEN as u64);
        assert_eq!(r.mapped.blocks(), 2, "the first append's two blocks, not the torn zeroing");
        assert_eq!((r.id, r.data_start), ([7; 16], 4096));
    }

    #[test]
    fn huge_changes_split_into_records() {
        let r = records(&[Change::Zero(0, 1 << 33)]);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0], Record::Zero { start: 0, count: u32::MAX });
        assert!(records(&[]).is_empty());
    }
}
