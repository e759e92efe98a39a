//! The disk a server exports: an image, and while ROW is on, the reserved file and its mapping.

use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};

use crate::image::{Extent, Image};
use crate::journal::{self, Journal, Record};
use crate::table::{BlockStat, Table};
use crate::StoreError;

/// Tracking granularity and the unit of copy-up (see the crate docs for why 4 KiB).
pub const BLOCK_SIZE: u64 = 4096;
/// Number of striped locks that serialise copy-up and merge against writes to the same block.
const STRIPES: usize = 1024;
/// Blocks merged per step; a checkpoint (sync + journal) follows every `MERGE_CHECKPOINT` bytes.
const MERGE_BATCH: usize = 256;
const MERGE_CHECKPOINT: u64 = 64 << 20;

/// Which way writes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Reads and writes go to the image.
    Direct,
    /// The image is frozen; writes land in the reserved file.
    Row,
    /// Leaving ROW: reserved blocks are being copied back into the image.
    Merging,
}

impl Mode {
    /// Lower-case name for logs and the control socket.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Row => "row",
            Mode::Merging => "merging",
        }
    }
}

/// Where the overlay lives and how the disk is opened.
#[derive(Debug, Clone, Default)]
pub struct DiskOptions {
    /// Reserved file; default `IMAGE.row`. The journal is this path plus `.map`.
    pub reserved: Option<PathBuf>,
    /// Open the image read-only (ROW cannot start then).
    pub read_only: bool,
    /// Delete an overlay left by an earlier run instead of recovering it. A migration
    /// destination overwrites the whole image, so an old overlay is obsolete there.
    pub discard_overlay: bool,
}

/// A snapshot of the overlay for `query-status` / `query-row`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowStatus {
    /// Current mode.
    pub mode: Mode,
    /// Blocks in the reserved file.
    pub blocks_updated: u64,
    /// Logical bytes in the reserved file (blocks × block size).
    pub reserved_bytes: u64,
    /// Bytes the reserved file occupies on disk.
    pub reserved_allocated: u64,
    /// Current write generation.
    pub generation: u64,
    /// Number of ROW sessions started since the process began (tells frozen bases apart).
    pub epoch: u64,
}

/// Merge progress reported to a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeProgress {
    /// Blocks copied back so far.
    pub merged_blocks: u64,
    /// Blocks still in the reserved file.
    pub remaining_blocks: u64,
}

#[derive(Debug)]
struct Overlay {
    mode: Mode,
    reserved: Option<Arc<Image>>,
    epoch: u64,
    /// Why writes are refused right now (the disk was handed to another host), if they are.
    writes_refused: Option<&'static str>,
    /// Direct-mode dirty tracking (the bitmap migration strategy) is on.
    tracking: bool,
}

fn refused(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, why)
}

/// A disk image with an optional redirect-on-write overlay.
#[derive(Debug)]
pub struct Disk {
    image: Arc<Image>,
    reserved_path: PathBuf,
    journal_path: PathBuf,
    read_only: bool,
    gate: RwLock<Overlay>,
    table: Mutex<Table>,
    /// Also serialises flushes, so journal records go out in order.
    journal: Mutex<Option<Journal>>,
    stripes: Vec<Mutex<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn other(msg: &str) -> io::Error {
    io::Error::other(msg.to_string())
}

impl Disk {
    /// Opens the image and recovers any overlay left by an earlier run: ROW mode comes back as
    /// it was; a merge that was under way comes back as [`Mode::Merging`] and must be resumed
    /// with [`Disk::merge`].
    pub fn open(image_path: &Path, opts: DiskOptions) -> Result<Self, StoreError> {
        let image = Image::open(image_path, opts.read_only).map_err(|e| StoreError::Io {
            what: "opening image",
            path: image_path.to_owned(),
            source: e,
        })?;
        let reserved_path = opts.reserved.clone().unwrap_or_else(|| suffixed(image_path, ".row"));
        let journal_path = suffixed(&reserved_path, ".map");
        let size = image.size();
        if opts.discard_overlay && journal_path.exists() {
            tracing::warn!(journal = %journal_path.display(), "discarding an old ROW overlay: this image is about to be overwritten");
            for path in [&journal_path, &reserved_path] {
                match std::fs::remove_file(path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(StoreError::Io { what: "removing old overlay", path: path.clone(), source: e })
                    }
                    _ => {}
                }
            }
        }
        let (mode, reserved, table, journal) = if journal_path.exists() {
            let (journal, replayed) = Journal::open(&journal_path, BLOCK_SIZE as u32, size)?;
            if opts.read_only {
                return Err(StoreError::Mode("the image has a ROW overlay; it cannot be opened read-only".into()));
            }
            let reserved = if reserved_path.exists() || !replayed.mapped.is_empty() {
                Image::open(&reserved_path, false)
            } else {
                create_reserved(&reserved_path, size)
            }
            .map_err(|e| StoreError::Io { what: "opening reserved file", path: reserved_path.clone(), source: e })?;
            if reserved.size() != size {
                return Err(StoreError::BadJournal {
                    path: reserved_path,
                    why: format!("reserved file has {} bytes, the image {size}", reserved.size()),
                });
            }
            let mode = if replayed.merging { Mode::Merging } else { Mode::Row };
            tracing::info!(mode = mode.as_str(), blocks = replayed.mapped.len(), journal = %journal_path.display(), "recovered ROW overlay");
            (mode, Some(Arc::new(reserved)), Table::recovered(replayed.mapped), Some(journal))
        } else {
            if reserved_path.exists() {
                // No journal means no committed overlay: a leftover of an interrupted row-start.
                tracing::warn!(path = %reserved_path.display(), "removing reserved file without a journal");
                std::fs::remove_file(&reserved_path).map_err(|e| StoreError::Io {
                    what: "removing stale reserved file",
                    path: reserved_path.clone(),
                    source: e,
                })?;
            }
            (Mode::Direct, None, Table::default(), None)
        };
        Ok(Self {
            image: Arc::new(image),
            reserved_path,
            journal_path,
            read_only: opts.read_only,
            gate: RwLock::new(Overlay {
                mode,
                reserved,
                epoch: u64::from(mode != Mode::Direct),
                writes_refused: None,
                tracking: false,
            }),
            table: Mutex::new(table),
            journal: Mutex::new(journal),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.image.size()
    }

    /// The image path.
    pub fn image_path(&self) -> &Path {
        self.image.path()
    }

    /// The reserved file path (exists only while ROW is on).
    pub fn reserved_path(&self) -> &Path {
        &self.reserved_path
    }

    /// Whether the image was opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    fn gate(&self) -> RwLockReadGuard<'_, Overlay> {
        self.gate.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The gate for a write: refused (`EPERM`) while the disk belongs to another host.
    fn writable_gate(&self) -> io::Result<RwLockReadGuard<'_, Overlay>> {
        let g = self.gate();
        match g.writes_refused {
            Some(why) => Err(refused(why)),
            None => Ok(g),
        }
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.gate().mode
    }

    fn block_range(&self, offset: u64, len: u64) -> (u64, u64) {
        (offset / BLOCK_SIZE, (offset + len - 1) / BLOCK_SIZE)
    }

    fn block_end(&self, b: u64) -> u64 {
        ((b + 1) * BLOCK_SIZE).min(self.size())
    }

    /// Locks the stripes of blocks `fb..=lb` in ascending order (no deadlock between holders).
    fn lock_stripes(&self, fb: u64, lb: u64) -> Vec<MutexGuard<'_, ()>> {
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

    /// Reads `buf.len()` bytes at `offset` of the disk as the guest sees it.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let g = self.gate();
        match (&g.reserved, g.mode) {
            (Some(reserved), Mode::Row | Mode::Merging) if !buf.is_empty() => self.merged_read(reserved, buf, offset),
            _ => self.image.read_at(buf, offset),
        }
    }

    /// Appends `len` bytes of the disk at `offset` to `out` (no zero-fill; for reply buffers).
    pub fn read_append(&self, out: &mut Vec<u8>, len: usize, offset: u64) -> io::Result<()> {
        let g = self.gate();
        let reserved = match (&g.reserved, g.mode) {
            (Some(reserved), Mode::Row | Mode::Merging) if len > 0 => reserved,
            _ => return self.image.read_append(out, len, offset),
        };
        let (fb, lb) = self.block_range(offset, len as u64);
        let mapped = lock(&self.table).mapped_in(fb..=lb);
        if mapped.is_empty() {
            return self.image.read_append(out, len, offset);
        }
        self.for_segments(offset, len as u64, &mapped, |start, end, is_mapped| {
            let file = if is_mapped { &**reserved } else { &*self.image };
            file.read_append(out, (end - start) as usize, start)
        })
    }

    fn merged_read(&self, reserved: &Image, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let (fb, lb) = self.block_range(offset, buf.len() as u64);
        let mapped = lock(&self.table).mapped_in(fb..=lb);
        if mapped.is_empty() {
            return self.image.read_at(buf, offset);
        }
        self.for_segments(offset, buf.len() as u64, &mapped, |start, end, is_mapped| {
            let dst = &mut buf[(start - offset) as usize..(end - offset) as usize];
            if is_mapped {
                reserved.read_at(dst, start)
            } else {
                self.image.read_at(dst, start)
            }
        })
    }

    /// Calls `f(start, end, mapped)` for each maximal run of mapped or unmapped blocks within
    /// `[offset, offset + len)`, given the sorted mapped blocks of that range.
    fn for_segments(
        &self,
        offset: u64,
        len: u64,
        mapped: &[u64],
        mut f: impl FnMut(u64, u64, bool) -> io::Result<()>,
    ) -> io::Result<()> {
        let end = offset + len;
        let mut pos = offset;
        let mut i = 0;
        while pos < end {
            let block = pos / BLOCK_SIZE;
            let seg_end = if i < mapped.len() && mapped[i] == block {
                // A run of consecutive mapped blocks.
                let mut last = block;
                while i + 1 < mapped.len() && mapped[i + 1] == last + 1 {
                    i += 1;
                    last += 1;
                }
                i += 1;
                let e = self.block_end(last).min(end);
                f(pos, e, true)?;
                e
            } else {
                let next_mapped = mapped.get(i).map_or(end, |b| (b * BLOCK_SIZE).min(end));
                f(pos, next_mapped, false)?;
                next_mapped
            };
            pos = seg_end;
        }
        Ok(())
    }

    /// Writes `buf` at `offset`; with `fua` it is durable (data and mapping) on return.
    pub fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let g = self.writable_gate()?;
        match (&g.reserved, g.mode) {
            (Some(reserved), Mode::Row) => {
                self.row_write(reserved, buf, offset)?;
                if fua {
                    self.flush_overlay(&g)?;
                }
                Ok(())
            }
            (Some(reserved), Mode::Merging) => {
                self.merging_write(reserved, offset, buf.len() as u64, |img, start, end| {
                    img.write_at(&buf[(start - offset) as usize..(end - offset) as usize], start, false)
                })?;
                if fua {
                    self.flush_overlay(&g)?;
                }
                Ok(())
            }
            _ => {
                self.image.write_at(buf, offset, fua)?;
                self.track(&g, offset, buf.len() as u64);
                Ok(())
            }
        }
    }

    /// Records a direct-mode write for dirty tracking.
    fn track(&self, g: &Overlay, offset: u64, len: u64) {
        if g.tracking && len > 0 {
            let (fb, lb) = self.block_range(offset, len);
            lock(&self.table).record_write(fb..=lb);
        }
    }

    fn row_write(&self, reserved: &Image, buf: &[u8], offset: u64) -> io::Result<()> {
        let len = buf.len() as u64;
        let end = offset + len;
        let (fb, lb) = self.block_range(offset, len);
        if lock(&self.table).all_mapped(fb..=lb) {
            // Every block already has its full content in the reserved file: write in place.
            reserved.write_at(buf, offset, false)?;
            lock(&self.table).record_write(fb..=lb);
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
                self.image.read_at(&mut block, start)?;
                let (from, to) = (offset.max(start), end.min(self.block_end(b)));
                block[(from - start) as usize..(to - start) as usize]
                    .copy_from_slice(&buf[(from - offset) as usize..(to - offset) as usize]);
                reserved.write_at(&block, start, false)?;
                copied.push(b);
            }
        }
        let mid_start = if copied.contains(&fb) { self.block_end(fb).min(end) } else { offset };
        let mid_end = if copied.contains(&lb) { (lb * BLOCK_SIZE).max(offset) } else { end };
        if mid_start < mid_end {
            reserved.write_at(&buf[(mid_start - offset) as usize..(mid_end - offset) as usize], mid_start, false)?;
        }
        lock(&self.table).record_write(fb..=lb);
        Ok(())
    }

    /// During a merge: parts of the range still mapped go to the reserved file, the rest to
    /// the image, under the stripe locks so the merge never copies a block mid-write.
    fn merging_write(
        &self,
        reserved: &Image,
        offset: u64,
        len: u64,
        mut op: impl FnMut(&Image, u64, u64) -> io::Result<()>,
    ) -> io::Result<()> {
        let (fb, lb) = self.block_range(offset, len);
        let _stripes = self.lock_stripes(fb, lb);
        let mapped = lock(&self.table).mapped_in(fb..=lb);
        self.for_segments(offset, len, &mapped, |start, end, is_mapped| {
            op(if is_mapped { reserved } else { &self.image }, start, end)
        })
    }

    /// Makes a range read as zeroes (see [`Image::write_zeroes`] for the flags).
    pub fn write_zeroes(&self, offset: u64, len: u64, may_punch: bool, fast_only: bool, fua: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let g = self.writable_gate()?;
        match (&g.reserved, g.mode) {
            (Some(reserved), Mode::Row) => {
                self.row_zero(reserved, offset, len, may_punch, fast_only)?;
                if fua {
                    self.flush_overlay(&g)?;
                }
                Ok(())
            }
            (Some(reserved), Mode::Merging) => {
                self.merging_write(reserved, offset, len, |img, s, e| img.write_zeroes(s, e - s, may_punch, fast_only))?;
                if fua {
                    self.flush_overlay(&g)?;
                }
                Ok(())
            }
            _ => {
                self.image.write_zeroes(offset, len, may_punch, fast_only)?;
                self.track(&g, offset, len);
                if fua {
                    self.image.flush()?;
                }
                Ok(())
            }
        }
    }

    /// Zeroes in ROW mode: whole blocks are zeroed (punched) in the reserved file and mapped,
    /// so they never fall through to stale base data; partial edge blocks take the write path.
    fn row_zero(&self, reserved: &Image, offset: u64, len: u64, may_punch: bool, fast_only: bool) -> io::Result<()> {
        let end = offset + len;
        let first_full = offset.div_ceil(BLOCK_SIZE);
        let full_end_block = if end == self.size() { end.div_ceil(BLOCK_SIZE) } else { end / BLOCK_SIZE };
        if first_full >= full_end_block {
            return self.row_write(reserved, &vec![0u8; len as usize], offset);
        }
        let (zs, ze) = (first_full * BLOCK_SIZE, (full_end_block * BLOCK_SIZE).min(self.size()));
        if offset < zs {
            self.row_write(reserved, &vec![0u8; (zs - offset) as usize], offset)?;
        }
        {
            let _stripes = self.lock_stripes(first_full, full_end_block - 1);
            reserved.write_zeroes(zs, ze - zs, may_punch, fast_only)?;
            lock(&self.table).record_write(first_full..=full_end_block - 1);
        }
        if ze < end {
            self.row_write(reserved, &vec![0u8; (end - ze) as usize], ze)?;
        }
        Ok(())
    }

    /// Discards a range. In ROW mode it must read back as zeroes, so it zeroes.
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let g = self.writable_gate()?;
        match (&g.reserved, g.mode) {
            (Some(_), Mode::Row | Mode::Merging) => {
                drop(g);
                self.write_zeroes(offset, len, true, false, fua)
            }
            _ => {
                self.image.trim(offset, len)?;
                self.track(&g, offset, len);
                if fua {
                    self.image.flush()?;
                }
                Ok(())
            }
        }
    }

    /// Makes every completed write durable, including the overlay's mapping.
    pub fn flush(&self) -> io::Result<()> {
        let g = self.gate();
        match g.mode {
            Mode::Direct => self.image.flush(),
            Mode::Row | Mode::Merging => self.flush_overlay(&g),
        }
    }

    /// Syncs overlay data, then journals the mapping changes whose data that sync covered.
    fn flush_overlay(&self, g: &Overlay) -> io::Result<()> {
        let mut journal = lock(&self.journal);
        // Take the pending changes first: their data writes completed before this point, so
        // the syncs below cover them. Changes made later wait for the next flush.
        let (maps, unmaps) = lock(&self.table).take_pending();
        let result = (|| {
            if let Some(reserved) = &g.reserved {
                reserved.flush()?;
            }
            if g.mode == Mode::Merging {
                self.image.flush()?;
            }
            let journal = journal.as_mut().ok_or_else(|| other("overlay has no journal"))?;
            let mut records = journal::runs(&maps, |start, count| Record::Map { start, count });
            records.extend(journal::runs(&unmaps, |start, count| Record::Unmap { start, count }));
            journal.append(&records)
        })();
        if result.is_err() {
            lock(&self.table).restore_pending(maps, unmaps);
        }
        result
    }

    /// Whether finding holes is cheap (one image to ask, no overlay to merge).
    pub fn holes_are_cheap(&self) -> bool {
        self.gate().mode == Mode::Direct
    }

    /// Hints the kernel to read a range.
    pub fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        let g = self.gate();
        if let Some(reserved) = &g.reserved {
            reserved.cache(offset, len)?;
        }
        self.image.cache(offset, len)
    }

    /// Data and hole extents of the disk as the guest sees it, at most `max`.
    pub fn extents(&self, offset: u64, len: u64, max: usize) -> io::Result<Vec<Extent>> {
        let g = self.gate();
        if g.reserved.is_none() || g.mode == Mode::Direct {
            return self.image.extents(offset, len, max);
        }
        let len = len.min(self.size().saturating_sub(offset));
        if len == 0 {
            return Ok(Vec::new());
        }
        let (fb, lb) = self.block_range(offset, len);
        let mapped = lock(&self.table).mapped_in(fb..=lb);
        let mut out: Vec<Extent> = Vec::new();
        let mut full = false;
        self.for_segments(offset, len, &mapped, |start, end, is_mapped| {
            if full {
                return Ok(());
            }
            // Updated blocks count as data: asking the reserved file would cost two seeks per
            // run of them, and a punched one there is still "allocated" from the guest's side.
            let pieces = if is_mapped {
                vec![Extent { length: end - start, hole: false }]
            } else {
                self.image.extents(start, end - start, max)?
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

    /// The gate, provided the base frozen by ROW session `epoch` is still frozen: a reader of
    /// the base never mixes two different freezes, nor a freeze with a merge.
    fn frozen_base(&self, epoch: u64) -> io::Result<RwLockReadGuard<'_, Overlay>> {
        let g = self.gate();
        if g.mode != Mode::Row || g.epoch != epoch {
            return Err(io::Error::other("the frozen base is gone: ROW mode ended"));
        }
        Ok(g)
    }

    /// Appends `len` bytes of the frozen base at `offset` to `out`, like [`Disk::read_append`].
    pub fn read_base_append(&self, out: &mut Vec<u8>, len: usize, offset: u64, epoch: u64) -> io::Result<()> {
        let _g = self.frozen_base(epoch)?;
        self.image.read_append(out, len, offset)
    }

    /// Extents of the frozen base while ROW is on.
    pub fn base_extents(&self, offset: u64, len: u64, max: usize, epoch: u64) -> io::Result<Vec<Extent>> {
        let _g = self.frozen_base(epoch)?;
        self.image.extents(offset, len, max)
    }

    /// Freezes the image: from now on writes land in the reserved file. Atomic with respect to
    /// requests: those that completed before are in the (synced) image, later ones in the overlay.
    pub fn row_start(&self) -> Result<(), StoreError> {
        if self.read_only {
            return Err(StoreError::Mode("the image is read-only".into()));
        }
        let mut g = self.gate.write().unwrap_or_else(|e| e.into_inner());
        if g.mode != Mode::Direct {
            return Err(StoreError::Mode(format!("ROW cannot start: the disk is in {} mode", g.mode.as_str())));
        }
        self.image.flush().map_err(io("syncing image", self.image.path()))?;
        let reserved = create_reserved(&self.reserved_path, self.size())
            .map_err(io("creating reserved file", &self.reserved_path))?;
        // The journal is the commit point: once it exists, a restart comes back in ROW mode.
        let journal = Journal::create(&self.journal_path, BLOCK_SIZE as u32, self.size())?;
        *lock(&self.table) = Table::default();
        *lock(&self.journal) = Some(journal);
        g.reserved = Some(Arc::new(reserved));
        g.mode = Mode::Row;
        g.epoch += 1;
        tracing::info!(reserved = %self.reserved_path.display(), "ROW started: image frozen");
        Ok(())
    }

    /// Starts leaving ROW mode: records the decision durably and switches to [`Mode::Merging`].
    /// [`Disk::merge`] then does the copying.
    pub fn begin_merge(&self) -> Result<(), StoreError> {
        let mut g = self.gate.write().unwrap_or_else(|e| e.into_inner());
        match g.mode {
            Mode::Row => {}
            Mode::Merging => return Ok(()),
            Mode::Direct => return Err(StoreError::Mode("ROW is not on".into())),
        }
        self.flush_overlay(&g).map_err(|e| StoreError::Io { what: "syncing overlay", path: self.journal_path.clone(), source: e })?;
        lock(&self.journal)
            .as_mut()
            .expect("ROW mode has a journal")
            .append(&[Record::MergeBegin])
            .map_err(|e| StoreError::Io { what: "writing journal", path: self.journal_path.clone(), source: e })?;
        g.mode = Mode::Merging;
        tracing::info!(blocks = lock(&self.table).len(), "merge back into the image begun");
        Ok(())
    }

    /// Copies reserved blocks back into the image while requests keep being served, then
    /// returns to direct mode and deletes the overlay files. With `limit`, stops after about that
    /// many blocks (tests use it to simulate a crash mid-merge) and returns `Ok(false)`.
    pub fn merge(&self, limit: Option<u64>, mut progress: impl FnMut(MergeProgress)) -> Result<bool, StoreError> {
        let jerr = |e| StoreError::Io { what: "merging", path: self.reserved_path.clone(), source: e };
        let reserved = {
            let g = self.gate();
            if g.mode != Mode::Merging {
                return Err(StoreError::Mode(format!("no merge under way (mode {})", g.mode.as_str())));
            }
            g.reserved.clone().expect("merging has a reserved file")
        };
        let mut merged = 0u64;
        let mut since_checkpoint = 0u64;
        loop {
            if limit.is_some_and(|l| merged >= l) {
                return Ok(false);
            }
            let batch = lock(&self.table).first_mapped(MERGE_BATCH);
            if batch.is_empty() {
                break;
            }
            for (start, count) in journal::block_runs(&batch) {
                let last = start + count - 1;
                let _stripes = self.lock_stripes(start, last);
                let (from, to) = (start * BLOCK_SIZE, self.block_end(last));
                let mut buf = Vec::new();
                for e in reserved.extents(from, to - from, usize::MAX).map_err(jerr)?.into_iter().scan(from, |pos, e| {
                    let s = *pos;
                    *pos += e.length;
                    Some((s, e))
                }) {
                    let (s, e) = e;
                    if e.hole {
                        self.image.write_zeroes(s, e.length, true, false).map_err(jerr)?;
                    } else {
                        buf.resize(e.length as usize, 0);
                        reserved.read_at(&mut buf, s).map_err(jerr)?;
                        self.image.write_at(&buf, s, false).map_err(jerr)?;
                    }
                }
                let blocks: Vec<u64> = (start..=last).collect();
                lock(&self.table).unmap(&blocks);
                merged += count;
                since_checkpoint += to - from;
            }
            if since_checkpoint >= MERGE_CHECKPOINT {
                self.flush().map_err(jerr)?;
                since_checkpoint = 0;
            }
            progress(MergeProgress { merged_blocks: merged, remaining_blocks: lock(&self.table).len() as u64 });
        }
        let mut g = self.gate.write().unwrap_or_else(|e| e.into_inner());
        self.flush_overlay(&g).map_err(jerr)?;
        debug_assert!(lock(&self.table).is_empty());
        // Reserved file first, journal last: a crash in between leaves a journal with nothing
        // mapped, which the next open finishes at once.
        std::fs::remove_file(&self.reserved_path).map_err(io("removing reserved file", &self.reserved_path))?;
        *lock(&self.journal) = None;
        std::fs::remove_file(&self.journal_path).map_err(io("removing journal", &self.journal_path))?;
        journal::sync_parent(&self.journal_path).map_err(io("syncing directory", &self.journal_path))?;
        // Closing the deleted reserved file frees its blocks, which takes seconds for a file
        // of scattered 4 KiB blocks: let a thread do it after we are back in direct mode.
        if let Some(old) = g.reserved.take() {
            std::thread::spawn(move || drop(old));
        }
        g.mode = Mode::Direct;
        *lock(&self.table) = Table::default();
        tracing::info!(merged_blocks = merged, "merge finished: back to direct mode");
        Ok(true)
    }

    /// Leaves ROW mode: begins (or resumes) the merge and runs it to the end.
    pub fn row_stop(&self, progress: impl FnMut(MergeProgress)) -> Result<(), StoreError> {
        self.begin_merge()?;
        self.merge(None, progress).map(|_| ())
    }

    /// Refuses (with `EPERM` and the reason) or allows writes. Returns once no write is in
    /// flight, so a caller that refuses writes knows the disk no longer changes.
    pub fn set_writes_refused(&self, why: Option<&'static str>) {
        self.gate.write().unwrap_or_else(|e| e.into_inner()).writes_refused = why;
    }

    /// Why writes are refused, if they are.
    pub fn writes_refused(&self) -> Option<&'static str> {
        self.gate().writes_refused
    }

    /// Turns direct-mode dirty tracking on (fresh statistics) or off. With it on, every write
    /// records its blocks' generation and count, as a dirty bitmap would; the bitmap migration
    /// strategy uses it.
    pub fn set_tracking(&self, on: bool) -> Result<(), StoreError> {
        let mut g = self.gate.write().unwrap_or_else(|e| e.into_inner());
        if on && g.mode != Mode::Direct {
            return Err(StoreError::Mode(format!("dirty tracking needs direct mode, not {}", g.mode.as_str())));
        }
        if g.mode == Mode::Direct {
            *lock(&self.table) = if on { Table::tracker() } else { Table::default() };
        }
        g.tracking = on;
        Ok(())
    }

    /// Replaces the image's content: truncates it to `size` bytes of zeroes (a sparse file).
    /// Used by a migration destination before the first round; only in direct mode.
    pub fn reset_image(&self) -> Result<(), StoreError> {
        let g = self.gate.write().unwrap_or_else(|e| e.into_inner());
        if g.mode != Mode::Direct {
            return Err(StoreError::Mode(format!("cannot reset an image in {} mode", g.mode.as_str())));
        }
        self.image.reset().map_err(io("resetting image", self.image.path()))
    }

    /// Mode and overlay counters.
    pub fn status(&self) -> RowStatus {
        let g = self.gate();
        let t = lock(&self.table);
        let reserved_allocated = g.reserved.as_ref().map_or(0, |r| r.allocated_bytes().unwrap_or(0));
        RowStatus {
            mode: g.mode,
            blocks_updated: t.len() as u64,
            reserved_bytes: t.len() as u64 * BLOCK_SIZE,
            reserved_allocated,
            generation: t.generation(),
            epoch: g.epoch,
        }
    }

    /// The current write generation (cheaper than [`Disk::status`], which also stats the
    /// reserved file).
    pub fn generation(&self) -> u64 {
        lock(&self.table).generation()
    }

    /// Every updated block with its statistics, in block order.
    pub fn block_stats(&self) -> Vec<(u64, BlockStat)> {
        lock(&self.table).iter().collect()
    }

    /// Blocks written by a request of generation greater than `generation`.
    pub fn blocks_written_since(&self, generation: u64) -> Vec<u64> {
        lock(&self.table).iter().filter(|(_, s)| s.generation > generation).map(|(b, _)| b).collect()
    }

    /// The paper's partition: blocks written at least `threshold` times are hot (high
    /// frequency), the others cold. Returns `(hot, cold)`.
    pub fn hot_cold(&self, threshold: u32) -> (Vec<u64>, Vec<u64>) {
        lock(&self.table).iter().map(|(b, s)| (b, s.writes >= threshold)).fold(
            (Vec::new(), Vec::new()),
            |(mut hot, mut cold), (b, is_hot)| {
                if is_hot {
                    hot.push(b)
                } else {
                    cold.push(b)
                }
                (hot, cold)
            },
        )
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { what, path: path.to_owned(), source }
}

fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn create_reserved(path: &Path, size: u64) -> io::Result<Image> {
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
    file.set_len(size)?;
    file.sync_all()?;
    drop(file);
    journal::sync_parent(path)?;
    Image::open(path, false)
}
