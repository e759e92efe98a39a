//! The redirect-on-write overlay: the reserved file, the mapping table and its journal over a
//! frozen base image.
//!
//! Reads of mapped blocks come from the reserved file, the rest from the base. A write maps
//! its blocks; a block the write covers only partly is first copied up whole from the base
//! (under its stripe lock), so a mapped block always holds its full content. Zeroing records
//! the range as zeroed (one run however long) and punches it in the reserved file: it reads as
//! zeroes without touching a file, never falls through to stale base data, migrates as one zero
//! extent and merges back as one punch. A flush syncs the reserved file, then journals the
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
use crate::journal::{self, Journal, Record};
use crate::storage::{Extent, Storage, SyncLatch};
use crate::table::{Held, Table};
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
    table: Mutex<Table>,
    /// Also serialises flushes, so journal records go out in order.
    journal: Mutex<Journal>,
    stripes: Vec<Mutex<()>>,
    merging: AtomicBool,
}

impl Overlay {
    /// Starts a session: creates the reserved file, then the journal, which is the commit point
    /// (a restart with a journal comes back in ROW mode).
    pub fn create(
        storage: &dyn Storage,
        base: Arc<Image>,
        reserved: &Path,
        journal: &Path,
        latch: Arc<SyncLatch>,
    ) -> Result<Self, StoreError> {
        let size = base.size();
        let reserved = Image::create(storage, reserved, size, latch.clone()).map_err(|source| StoreError::Io {
            what: "creating reserved file",
            path: reserved.to_owned(),
            source,
        })?;
        let journal = Journal::create(storage, journal, BLOCK_SIZE as u32, size, latch)?;
        Ok(Self::assemble(base, reserved, Table::default(), journal, false))
    }

    /// An overlay recovered after a restart: the journal replayed, the reserved file reopened.
    /// Zeroed runs are punched again: writes into them that a crash cut short (never
    /// acknowledged, never journaled) may have left bytes there, and a later partial write into
    /// such a block must find zeroes around it.
    pub fn recovered(
        base: Arc<Image>,
        reserved: Image,
        table: Table,
        journal: Journal,
        merging: bool,
    ) -> io::Result<Self> {
        let size = base.size();
        for r in table.iter().filter(|r| r.zero) {
            let (from, to) = (r.start * BLOCK_SIZE, ((r.start + r.len) * BLOCK_SIZE).min(size));
            reserved.zero(from, to - from, true, false)?;
        }
        Ok(Self::assemble(base, reserved, table, journal, merging))
    }

    fn assemble(base: Arc<Image>, reserved: Image, table: Table, journal: Journal, merging: bool) -> Self {
        Self {
            base,
            reserved,
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

    /// Calls `f(start, end, held)` for each maximal byte range within `[offset, offset + len)`
    /// held by the base, the reserved file, or nothing (zeroed).
    fn for_segments(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, u64, Held) -> io::Result<()>,
    ) -> io::Result<()> {
        let end = offset + len;
        let (fb, lb) = Self::block_range(offset, len);
        let segments = lock(&self.table).segments(fb, lb + 1);
        for s in segments {
            let (a, b) = ((s.start * BLOCK_SIZE).max(offset), (s.end * BLOCK_SIZE).min(end));
            if a < b {
                f(a, b, s.held)?;
            }
        }
        Ok(())
    }

    /// A write in ROW mode: maps its blocks, copying up partly covered ones first.
    fn row_write(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let len = buf.len() as u64;
        let end = offset + len;
        let (fb, lb) = Self::block_range(offset, len);
        if lock(&self.table).covers(fb, lb + 1) {
            // Every block already has its full content in the reserved file (zeroed ones as a
            // hole): write in place.
            self.reserved.write_at(buf, offset, false)?;
            lock(&self.table).record_write(fb, lb + 1, false);
            return Ok(());
        }
        let _stripes = self.lock_stripes(fb, lb);
        // Edge blocks the write covers only partly and that are not yet mapped are copied up:
        // base content, overlaid with the new bytes, written whole.
        let covers = |b: u64| offset <= b * BLOCK_SIZE && end >= self.block_end(b);
        let mut copied = Vec::new();
        {
            let edges: &[u64] = if fb == lb { &[fb] } else { &[fb, lb] };
            let unmapped: Vec<u64> = {
                let t = lock(&self.table);
                edges.iter().copied().filter(|&b| !covers(b) && !t.is_mapped(b)).collect()
            };
            for b in unmapped {
                let start = b * BLOCK_SIZE;
                let mut block = vec![0u8; (self.block_end(b) - start) as usize];
                self.base.read_at(&mut block, start)?;
                let (from, to) = (offset.max(start), end.min(self.block_end(b)));
                block[(from - start) as usize..(to - start) as usize]
                    .copy_from_slice(&buf[(from - offset) as usize..(to - offset) as usize]);
                self.reserved.write_at(&block, start, false)?;
                copied.push(b);
            }
        }
        let mid_start = if copied.contains(&fb) { self.block_end(fb).min(end) } else { offset };
        let mid_end = if copied.contains(&lb) { (lb * BLOCK_SIZE).max(offset) } else { end };
        if mid_start < mid_end {
            self.reserved.write_at(
                &buf[(mid_start - offset) as usize..(mid_end - offset) as usize],
                mid_start,
                false,
            )?;
        }
        lock(&self.table).record_write(fb, lb + 1, false);
        Ok(())
    }

    /// During a merge: parts of the range still mapped go to the reserved file, the rest to
    /// the image, under the stripe locks so the merge never copies a block mid-write.
    /// A data write into a zeroed range makes those blocks data (they merge by copying).
    fn merging_write(
        &self,
        offset: u64,
        len: u64,
        data: bool,
        mut op: impl FnMut(&Image, u64, u64) -> io::Result<()>,
    ) -> io::Result<()> {
        let (fb, lb) = Self::block_range(offset, len);
        let _stripes = self.lock_stripes(fb, lb);
        let mut was_zero = Vec::new();
        self.for_segments(offset, len, |start, end, held| {
            if data && held == Held::Zero {
                was_zero.push((start / BLOCK_SIZE, (end - 1) / BLOCK_SIZE + 1));
            }
            op(if held == Held::Base { &self.base } else { &self.reserved }, start, end)
        })?;
        let mut t = lock(&self.table);
        for (s, e) in was_zero {
            t.record_write(s, e, false);
        }
        Ok(())
    }

    /// Zeroes in ROW mode: whole blocks are zeroed (punched) in the reserved file and mapped,
    /// so they never fall through to stale base data; partial edge blocks take the write path.
    fn row_zero(&self, offset: u64, len: u64, fast_only: bool) -> io::Result<()> {
        let size = self.base.size();
        let end = offset + len;
        let first_full = offset.div_ceil(BLOCK_SIZE);
        let full_end_block = if end == size { end.div_ceil(BLOCK_SIZE) } else { end / BLOCK_SIZE };
        if first_full >= full_end_block {
            return self.row_write(&vec![0u8; len as usize], offset);
        }
        let (zs, ze) = (first_full * BLOCK_SIZE, (full_end_block * BLOCK_SIZE).min(size));
        if offset < zs {
            self.row_write(&vec![0u8; (zs - offset) as usize], offset)?;
        }
        {
            let _stripes = self.lock_stripes(first_full, full_end_block - 1);
            // Always a hole in the reserved file, whatever the guest asked for its own view: the
            // range is recorded as zeroed, and a later partial write must find zeroes around it.
            self.reserved.zero(zs, ze - zs, true, fast_only)?;
            lock(&self.table).record_write(first_full, full_end_block, true);
        }
        if ze < end {
            self.row_write(&vec![0u8; (end - ze) as usize], ze)?;
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
        self.for_segments(offset, len as u64, |start, end, held| match held {
            Held::Base => self.base.read_append(out, (end - start) as usize, start),
            Held::Data => self.reserved.read_append(out, (end - start) as usize, start),
            Held::Zero => {
                out.resize(out.len() + (end - start) as usize, 0);
                Ok(())
            }
        })
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
        if self.is_merging() {
            self.merging_write(offset, buf.len() as u64, true, |img, start, end| {
                img.write_at(&buf[(start - offset) as usize..(end - offset) as usize], start, false)
            })?;
        } else {
            self.row_write(buf, offset)?;
        }
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
            self.merging_write(offset, len, false, |img, s, e| img.zero(s, e - s, flags.may_punch, flags.fast_only))?;
        } else {
            self.row_zero(offset, len, flags.fast_only)?;
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
        self.reserved.cache(offset, len)?;
        self.base.cache(offset, len)
    }

    fn extents(&self, offset: u64, len: u64, max: usize) -> io::Result<Vec<Extent>> {
        let len = len.min(self.size().saturating_sub(offset));
        if len == 0 {
            return Ok(Vec::new());
        }
        let mut out: Vec<Extent> = Vec::new();
        let mut full = false;
        self.for_segments(offset, len, |start, end, held| {
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
