//! The redirect-on-write overlay: the reserved file, the mapping table and its journal over a
//! frozen base image.
//!
//! Reads of mapped blocks come from their slots in the reserved file, the rest from the base. A
//! write to blocks that hold no data yet gives them new slots, handed out in write order, so
//! scattered first writes reach the disk as sequential appends (a flush after 200,000 of them
//! costs what a sequential stream costs, not the allocation of 200,000 holes); a block the
//! write covers only partly is first copied up whole (from the base, or zeroes), so a slot
//! always holds its block's full content. A rewrite goes to the block's own slot. Zeroing
//! records the range as zeroed (one run however long): it reads as zeroes without touching a
//! file, never falls through to stale base data, migrates as one zero extent and merges back as
//! one punch; slots it frees are punched. A flush syncs the reserved file, then journals the
//! mapping changes since the last flush and syncs the journal; only then is it acknowledged.
//!
//! While *merging* (see [`crate::merge`]), writes to blocks still mapped go to the reserved
//! file and the rest to the image, under the stripe locks the merge takes.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::backend::{BlockBackend, Caps, ZeroFlags};
use crate::image::Image;
use crate::journal::{self, DiskTag, Header, Journal, Record};
use crate::reserved;
use crate::storage::{Extent, Storage, SyncLatch};
use crate::table::{Held, Piece, Table};
use crate::{StoreError, BLOCK_SIZE};

/// Striped locks that serialise copy-up and merge against writes to the same block.
const STRIPES: usize = 1024;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The overlay of one ROW session.
#[derive(Debug)]
pub struct Overlay {
    base: Arc<Image>,
    reserved: Image,
    /// Where slot 0 starts in the reserved file (after its header).
    data_start: u64,
    table: Mutex<Table>,
    /// Also serialises flushes, so journal records go out in order.
    journal: Mutex<Journal>,
    stripes: Vec<Mutex<()>>,
    merging: AtomicBool,
}

impl Overlay {
    /// Starts a session: creates the reserved file (with its header), then the journal, which is
    /// the commit point (a restart with a journal comes back in ROW mode). Nothing may be at
    /// either path: the caller cleared leftovers of its own and refused anything else.
    pub fn create(
        storage: &dyn Storage,
        base: Arc<Image>,
        reserved: &Path,
        journal: &Path,
        disk: DiskTag,
        latch: Arc<SyncLatch>,
    ) -> Result<Self, StoreError> {
        let size = base.size();
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(|e| StoreError::Io {
            what: "drawing an overlay id for",
            path: reserved.to_owned(),
            source: io::Error::other(e.to_string()),
        })?;
        let head = reserved::header(size, &id);
        let created = Image::create_new(storage, reserved, &head, latch.clone());
        let reserved_file = created.map_err(|source| StoreError::Io {
            what: "creating reserved file",
            path: reserved.to_owned(),
            source,
        })?;
        let header = Header {
            version: 0,
            block_size: BLOCK_SIZE as u32,
            image_size: size,
            id,
            data_start: reserved::HEADER_LEN,
            disk,
        };
        let journal = match Journal::create(storage, journal, header, latch) {
            Ok(j) => j,
            Err(e) => {
                // Ours, just made, holding nothing: do not leave it behind.
                let _ = storage.remove(reserved);
                return Err(e);
            }
        };
        Ok(Self::recovered(base, reserved_file, Table::default(), journal, false, reserved::HEADER_LEN))
    }

    /// An overlay over `base` from its parts (a new one, or one recovered after a restart: the
    /// journal replayed, the reserved file reopened); its slots start at `data_start`.
    pub fn recovered(
        base: Arc<Image>,
        reserved: Image,
        table: Table,
        journal: Journal,
        merging: bool,
        data_start: u64,
    ) -> Self {
        Self {
            base,
            reserved,
            data_start,
            table: Mutex::new(table),
            journal: Mutex::new(journal),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            merging: AtomicBool::new(merging),
        }
    }

    /// The frozen image below.
    pub fn base(&self) -> &Arc<Image> {
        &self.base
    }

    /// The reserved file.
    pub fn reserved(&self) -> &Image {
        &self.reserved
    }

    /// The mapping table and statistics.
    pub fn table(&self) -> MutexGuard<'_, Table> {
        lock(&self.table)
    }

    /// Whether the merge back has begun.
    pub fn is_merging(&self) -> bool {
        self.merging.load(Ordering::Acquire)
    }

    /// Records the decision to merge durably and switches writes to merge mode. The caller holds
    /// the disk's gate exclusively, so no request is in flight.
    pub fn begin_merge(&self) -> Result<(), StoreError> {
        let journal_path = lock(&self.journal).path().to_owned();
        let jerr = |source| StoreError::Io { what: "beginning the merge", path: journal_path.clone(), source };
        self.sync_overlay().map_err(jerr)?;
        let appended = lock(&self.journal).append(&[Record::MergeBegin]);
        appended.map_err(jerr)?;
        self.merging.store(true, Ordering::Release);
        Ok(())
    }

    fn block_range(offset: u64, len: u64) -> (u64, u64) {
        (offset / BLOCK_SIZE, (offset + len - 1) / BLOCK_SIZE)
    }

    pub(crate) fn block_end(&self, b: u64) -> u64 {
        ((b + 1) * BLOCK_SIZE).min(self.base.size())
    }

    /// Locks the stripes of blocks `fb..=lb` in ascending order (no deadlock between holders).
    pub(crate) fn lock_stripes(&self, fb: u64, lb: u64) -> Vec<MutexGuard<'_, ()>> {
        let n = lb - fb + 1;
        let mut idx: Vec<usize> = if n >= STRIPES as u64 {
            (0..STRIPES).collect()
        } else {
            (fb..=lb).map(|b| (b % STRIPES as u64) as usize).collect()
        };
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter().map(|i| lock(&self.stripes[i])).collect()
    }

    /// Calls `f(start, end, piece)` for each maximal byte range within `[offset, offset + len)`
    /// held by the base, consecutive slots of the reserved file, or nothing (zeroed).
    fn for_pieces(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, u64, Piece) -> io::Result<()>,
    ) -> io::Result<()> {
        let end = offset + len;
        let (fb, lb) = Self::block_range(offset, len);
        let pieces = lock(&self.table).pieces(fb, lb + 1);
        for p in pieces {
            let (a, b) = ((p.start * BLOCK_SIZE).max(offset), (p.end * BLOCK_SIZE).min(end));
            if a < b {
                f(a, b, p)?;
            }
        }
        Ok(())
    }

    /// Where byte `at` of a data piece lies in the reserved file.
    fn slot_offset(&self, p: &Piece, at: u64) -> u64 {
        self.data_start + p.slot * BLOCK_SIZE + (at - p.start * BLOCK_SIZE)
    }

    /// Hands out `n` new slots.
    fn allocate(&self, n: u64) -> io::Result<u64> {
        lock(&self.table)
            .allocate(n)
            .ok_or_else(|| io::Error::new(io::ErrorKind::StorageFull, "the ROW overlay has no slot left (16 TiB)"))
    }

    /// A write of data while ROW is on (`to_base` false) or merging (`to_base`: blocks not
    /// mapped go to the image). Blocks that hold data are rewritten in their slots; the others
    /// get new slots, consecutive for the whole request, with partly covered blocks copied up
    /// whole (from the base, or zeroes for a zeroed block). Under the stripe locks, so copy-up,
    /// zeroing and the merge never interleave with it.
    fn write_data(&self, buf: &[u8], offset: u64, to_base: bool) -> io::Result<()> {
        let len = buf.len() as u64;
        let (fb, lb) = Self::block_range(offset, len);
        let _stripes = self.lock_stripes(fb, lb);
        let pieces = lock(&self.table).pieces(fb, lb + 1);
        let slotless = |p: &Piece| p.held == Held::Zero || (p.held == Held::Base && !to_base);
        let wanted: u64 = pieces.iter().filter(|p| slotless(p)).map(|p| p.end - p.start).sum();
        let mut next = if wanted > 0 { self.allocate(wanted)? } else { 0 };
        let part = |a: u64, b: u64| &buf[(a - offset) as usize..(b - offset) as usize];
        let mut placed = Vec::new();
        for p in &pieces {
            let (a, b) = ((p.start * BLOCK_SIZE).max(offset), self.block_end(p.end - 1).min(offset + len));
            match p.held {
                Held::Data => self.reserved.write_at(part(a, b), self.slot_offset(p, a), false)?,
                Held::Base if to_base => self.base.write_at(part(a, b), a, false)?,
                _ => {
                    let (from, to) = (p.start * BLOCK_SIZE, self.block_end(p.end - 1));
                    let at = self.data_start + next * BLOCK_SIZE;
                    if (from, to) == (a, b) {
                        self.reserved.write_at(part(a, b), at, false)?;
                    } else {
                        // Copy-up: the blocks' old content around the new bytes, written whole.
                        let mut whole = vec![0u8; (to - from) as usize];
                        if p.held == Held::Base {
                            let last = (p.end - 1) * BLOCK_SIZE;
                            if a > from {
                                self.base.read_at(&mut whole[..(self.block_end(p.start) - from) as usize], from)?;
                            }
                            if b < to {
                                self.base.read_at(&mut whole[(last - from) as usize..], last)?;
                            }
                        }
                        whole[(a - from) as usize..(b - from) as usize].copy_from_slice(part(a, b));
                        self.reserved.write_at(&whole, at, false)?;
                    }
                    placed.push((p.start, p.end, next));
                    next += p.end - p.start;
                }
            }
        }
        let mut t = lock(&self.table);
        for p in pieces.iter().filter(|p| p.held == Held::Data) {
            t.record_rewrite(p.start, p.end);
        }
        for (start, end, slot) in placed {
            t.record_placed(start, end, slot);
        }
        Ok(())
    }

    /// Zeroes whole blocks `[fb, end_block)` of the overlay: recorded as zeroed, their slots
    /// punched to give the space back (a block freed before the change is journaled reads as
    /// zeroes after a crash: the newer, unflushed content, whole).
    fn zero_blocks(&self, fb: u64, end_block: u64) -> io::Result<()> {
        self.reserved.check_writable()?;
        let _stripes = self.lock_stripes(fb, end_block - 1);
        let pieces = lock(&self.table).pieces(fb, end_block);
        for p in pieces.iter().filter(|p| p.held == Held::Data) {
            self.reserved.discard(self.slot_offset(p, p.start * BLOCK_SIZE), (p.end - p.start) * BLOCK_SIZE)?;
        }
        lock(&self.table).record_write(fb, end_block, true);
        Ok(())
    }

    /// During a merge: zeroes `[offset, offset + len)`, in the image where blocks are no longer
    /// mapped and in their slots where they are (zeroed blocks already read as zeroes).
    fn merging_zero(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        let (fb, lb) = Self::block_range(offset, len);
        let _stripes = self.lock_stripes(fb, lb);
        self.for_pieces(offset, len, |a, b, p| match p.held {
            Held::Base => self.base.zero(a, b - a, flags.may_punch, flags.fast_only),
            Held::Data => self.reserved.zero(self.slot_offset(&p, a), b - a, flags.may_punch, flags.fast_only),
            Held::Zero => Ok(()),
        })
    }

    /// Zeroes in ROW mode: whole blocks are recorded as zeroed, so they never fall through to
    /// stale base data; partial edge blocks take the write path.
    fn row_zero(&self, offset: u64, len: u64) -> io::Result<()> {
        let size = self.base.size();
        let end = offset + len;
        let first_full = offset.div_ceil(BLOCK_SIZE);
        let full_end_block = if end == size { end.div_ceil(BLOCK_SIZE) } else { end / BLOCK_SIZE };
        if first_full >= full_end_block {
            return self.write_data(&vec![0u8; len as usize], offset, false);
        }
        let (zs, ze) = (first_full * BLOCK_SIZE, (full_end_block * BLOCK_SIZE).min(size));
        if offset < zs {
            self.write_data(&vec![0u8; (zs - offset) as usize], offset, false)?;
        }
        self.zero_blocks(first_full, full_end_block)?;
        if ze < end {
            self.write_data(&vec![0u8; (end - ze) as usize], ze, false)?;
        }
        Ok(())
    }

    /// Syncs overlay data, then journals the mapping changes whose data that sync covered.
    pub fn sync_overlay(&self) -> io::Result<()> {
        let mut journal = lock(&self.journal);
        // Take the pending changes first: their data writes completed before this point, so
        // the syncs below cover them. Changes made later wait for the next flush.
        let changes = lock(&self.table).take_pending();
        let result = (|| {
            // The journal's length before this batch goes out with the data: a journal later
            // found shorter than that lost acknowledged batches (see `reserved::mark`).
            if self.data_start >= reserved::HEADER_LEN && !changes.is_empty() {
                self.reserved.write_at(&reserved::mark(journal.size()), reserved::MARK_OFFSET, false)?;
            }
            self.reserved.sync()?;
            if self.is_merging() {
                self.base.sync()?;
            }
            journal.append(&journal::records(&changes))
        })();
        if result.is_err() {
            lock(&self.table).restore_pending(changes);
        }
        result
    }

    /// Reads `len` bytes at `offset` of the disk as the guest sees it.
    fn merged_read(&self, out: &mut Vec<u8>, len: usize, offset: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.for_pieces(offset, len as u64, |start, end, p| match p.held {
            Held::Base => self.base.read_append(out, (end - start) as usize, start),
            Held::Data => self.reserved.read_append(out, (end - start) as usize, self.slot_offset(&p, start)),
            Held::Zero => {
                out.resize(out.len() + (end - start) as usize, 0);
                Ok(())
            }
        })
    }

    /// Reads a block range's data from its slots into `out` (the merge copies it back).
    pub(crate) fn read_slots(&self, out: &mut Vec<u8>, p: &Piece) -> io::Result<()> {
        let (from, to) = (p.start * BLOCK_SIZE, self.block_end(p.end - 1));
        self.reserved.read_append(out, (to - from) as usize, self.slot_offset(p, from))
    }
}

impl BlockBackend for Overlay {
    fn size(&self) -> u64 {
        self.base.size()
    }

    fn caps(&self) -> Caps {
        // Holes are not looked for on reads: it would cost a mapping walk and seeks in two files.
        Caps::for_file(true, false)
    }

    fn read_append(&self, out: &mut Vec<u8>, len: usize, offset: u64) -> io::Result<()> {
        self.merged_read(out, len, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.write_data(buf, offset, self.is_merging())?;
        if fua {
            self.sync_overlay()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if self.is_merging() {
            self.merging_zero(offset, len, flags)?;
        } else {
            self.row_zero(offset, len)?;
        }
        if flags.fua {
            self.sync_overlay()?;
        }
        Ok(())
    }

    /// Over an overlay a discarded range must read as zeroes (never as stale base data).
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.write_zeroes(offset, len, ZeroFlags { may_punch: true, fast_only: false, fua })
    }

    fn flush(&self) -> io::Result<()> {
        self.sync_overlay()
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.for_pieces(offset, len.min(self.size().saturating_sub(offset)), |a, b, p| match p.held {
            Held::Base => self.base.cache(a, b - a),
            Held::Data => self.reserved.cache(self.slot_offset(&p, a), b - a),
            Held::Zero => Ok(()),
        })
    }

    fn extents(&self, offset: u64, len: u64, max: usize) -> io::Result<Vec<Extent>> {
        let len = len.min(self.size().saturating_sub(offset));
        if len == 0 {
            return Ok(Vec::new());
        }
        let mut out: Vec<Extent> = Vec::new();
        let mut full = false;
        self.for_pieces(offset, len, |start, end, Piece { held, .. }| {
            if full {
                return Ok(());
            }
            // Updated blocks count as data (asking the reserved file would cost two seeks per
            // run of them); zeroed ranges as holes.
            let pieces = match held {
                Held::Data => vec![Extent { length: end - start, hole: false }],
                Held::Zero => vec![Extent { length: end - start, hole: true }],
                Held::Base => self.base.extents(start, end - start, max)?,
            };
            for e in pieces {
                if let Some(last) = out.last_mut().filter(|last| last.hole == e.hole) {
                    last.length += e.length;
                } else if out.len() == max {
                    full = true;
                    break;
                } else {
                    out.push(e);
                }
            }
            Ok(())
        })?;
        Ok(out)
    }
}
