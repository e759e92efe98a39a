//! The disk a server exports: the image, and while ROW is on, the [`Overlay`] over it.
//!
//! `Disk` owns the mode changes (ROW start, merge back, recovery after a restart) and routes
//! each request to the image or the overlay under a lock on its layers (overlay and ROW epoch): a mode change takes
//! it exclusively, so it happens between requests, never in the middle of one.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::backend::{BlockBackend, Caps, ZeroFlags};
use crate::image::Image;
use crate::journal::{DiskTag, Journal, Replayed};
use crate::merge::{self, MergeProgress};
use crate::overlay::Overlay;
use crate::reserved::{self, Found};
use crate::storage::{suffixed, Extent, Posix, Storage, SyncLatch};
use crate::table::{Table, WrittenRun};
use crate::tracking::DirtyTracker;
use crate::{Mode, StoreError, BLOCK_SIZE};

/// Where the overlay lives and how the disk is opened.
#[derive(Debug, Clone, Default)]
pub struct DiskOptions {
    /// Reserved file (a log of 4 KiB slots); default `IMAGE.row`. The journal is this path
    /// plus `.map`.
    pub reserved: Option<PathBuf>,
    /// Open the image read-only (ROW cannot start then).
    pub read_only: bool,
    /// Delete an overlay left by an earlier run instead of recovering it. A migration
    /// destination overwrites the whole image, so an old overlay is obsolete there.
    pub discard_overlay: bool,
    /// The disk an overlay belongs to, kept in its journal: an overlay of another disk (a
    /// `--reserved` typo) is refused, never adopted. Zero: not bound.
    pub disk_tag: DiskTag,
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
    /// The current write epoch: it advances each time a migration marks what it has read, so
    /// blocks written later can be told apart.
    pub generation: u64,
    /// Runs of blocks the overlay's mapping holds (its memory follows them).
    pub runs: u64,
    /// Heap bytes of the mapping.
    pub map_bytes: u64,
    /// Number of ROW sessions started since the process began (tells frozen bases apart).
    pub epoch: u64,
}

/// What a request is routed through: the overlay in use (none in direct mode) and the ROW
/// epoch; mode changes take it exclusively.
#[derive(Debug)]
struct Layers {
    overlay: Option<Arc<Overlay>>,
    epoch: u64,
}

impl Layers {
    fn mode(&self) -> Mode {
        match &self.overlay {
            None => Mode::Direct,
            Some(o) if o.is_merging() => Mode::Merging,
            Some(_) => Mode::Row,
        }
    }
}

/// A disk image with an optional redirect-on-write overlay.
#[derive(Debug)]
pub struct Disk {
    storage: Arc<dyn Storage>,
    image: Arc<Image>,
    reserved_path: PathBuf,
    journal_path: PathBuf,
    disk_tag: DiskTag,
    latch: Arc<SyncLatch>,
    layers: RwLock<Layers>,
    tracker: DirtyTracker,
}

/// Refuses a path that holds something not ours (nothing, an empty file and our own overlay
/// files pass).
fn refuse_unless_ours(path: &Path, found: Found) -> Result<(), StoreError> {
    if found != Found::Other {
        return Ok(());
    }
    Err(StoreError::Refused {
        path: path.to_owned(),
        why: "this file is not an overlay file of nbd-row-proxy (it has no header of ours): refusing to use, \
              truncate or delete it; choose another --reserved path, or move the file away"
            .into(),
    })
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { what, path: path.to_owned(), source }
}

impl Disk {
    /// Opens the image on the local file system; see [`Disk::open_on`].
    pub fn open(image_path: &Path, opts: DiskOptions) -> Result<Self, StoreError> {
        Self::open_on(Arc::new(Posix), image_path, opts)
    }

    /// Opens (and locks) the image and recovers any overlay left by an earlier run: ROW mode
    /// comes back as it was; a merge that was under way comes back as [`Mode::Merging`] and must
    /// be resumed with [`Disk::merge`].
    pub fn open_on(storage: Arc<dyn Storage>, image_path: &Path, opts: DiskOptions) -> Result<Self, StoreError> {
        let latch = SyncLatch::new();
        let image = Arc::new(
            Image::open(&*storage, image_path, opts.read_only, latch.clone())
                .map_err(io_err("opening image", image_path))?,
        );
        let reserved_path = opts.reserved.clone().unwrap_or_else(|| suffixed(image_path, ".row"));
        let journal_path = suffixed(&reserved_path, ".map");
        let inspect = |p: &Path| reserved::inspect(&*storage, p).map_err(io_err("looking at", p));
        if opts.discard_overlay && inspect(&journal_path)? != Found::Nothing {
            tracing::warn!(journal = %journal_path.display(), "discarding an old ROW overlay: this image is about to be overwritten");
            let found = [(&journal_path, inspect(&journal_path)?), (&reserved_path, inspect(&reserved_path)?)];
            for (path, found) in &found {
                refuse_unless_ours(path, *found)?;
            }
            for (path, found) in found {
                if found != Found::Nothing {
                    storage.remove(path).map_err(io_err("removing old overlay", path))?;
                }
            }
        }
        let recovered = if inspect(&journal_path)? != Found::Nothing {
            if opts.read_only {
                return Err(StoreError::Mode("the image has a ROW overlay; it cannot be opened read-only".into()));
            }
            Self::recover(&*storage, &image, &reserved_path, &journal_path, opts.disk_tag, &latch)?
        } else {
            None
        };
        let overlay = match recovered {
            Some(o) => Some(Arc::new(o)),
            None => {
                Self::clear_leftovers(&*storage, &reserved_path, &journal_path)?;
                None
            }
        };
        let epoch = u64::from(overlay.is_some());
        Ok(Self {
            storage,
            image,
            reserved_path,
            journal_path,
            disk_tag: opts.disk_tag,
            latch,
            layers: RwLock::new(Layers { overlay, epoch }),
            tracker: DirtyTracker::default(),
        })
    }

    /// With no committed journal, files at the overlay's paths are leftovers of an interrupted
    /// ROW start, removed only if they are ours and hold no data; anything else is refused.
    fn clear_leftovers(storage: &dyn Storage, reserved_path: &Path, journal_path: &Path) -> Result<(), StoreError> {
        let found = [
            (reserved_path, reserved::inspect(storage, reserved_path).map_err(io_err("looking at", reserved_path))?),
            (journal_path, reserved::inspect(storage, journal_path).map_err(io_err("looking at", journal_path))?),
        ];
        for (path, found) in found {
            match found {
                Found::Reserved { holds_slots: true, .. } => {
                    return Err(StoreError::Refused {
                        path: path.to_owned(),
                        why: format!(
                            "this ROW overlay holds writes, but its journal {} is missing or empty, so which \
                             block each write belongs to is lost; nothing was changed (restore the journal, or \
                             remove both files by hand to give up those writes)",
                            journal_path.display()
                        ),
                    })
                }
                Found::Journal(_) if path == reserved_path => {
                    return Err(StoreError::Refused {
                        path: path.to_owned(),
                        why: "this is an overlay journal, not a reserved file: choose another --reserved path".into(),
                    })
                }
                other => refuse_unless_ours(path, other)?,
            }
        }
        for (path, found) in [(reserved_path, Found::Nothing), (journal_path, Found::Nothing)] {
            if reserved::inspect(storage, path).map_err(io_err("looking at", path))? != found {
                tracing::warn!(path = %path.display(), "removing a leftover of an interrupted ROW start");
                storage.remove(path).map_err(io_err("removing a leftover overlay file", path))?;
            }
        }
        Ok(())
    }

    fn recover(
        storage: &dyn Storage,
        image: &Arc<Image>,
        reserved_path: &Path,
        journal_path: &Path,
        disk: DiskTag,
        latch: &Arc<SyncLatch>,
    ) -> Result<Option<Overlay>, StoreError> {
        let size = image.size();
        let mark =
            reserved::read_mark(storage, reserved_path).map_err(io_err("reading the header of", reserved_path))?;
        let Some((journal, mut replayed)) =
            Journal::open(storage, journal_path, BLOCK_SIZE as u32, size, mark, latch.clone())?
        else {
            return Ok(None);
        };
        if replayed.disk != [0; 12] && disk != [0; 12] && replayed.disk != disk {
            return Err(StoreError::Refused {
                path: journal_path.to_owned(),
                why: format!(
                    "this overlay belongs to another disk than {} (its journal names another disk): refusing to \
                     adopt it; point --reserved at this disk's own overlay (nothing was changed)",
                    image.path().display()
                ),
            });
        }
        let table = Table::recovered(std::mem::take(&mut replayed.mapped));
        let reserved = Self::open_reserved(storage, reserved_path, journal_path, &replayed, &table, size, latch)?;
        tracing::info!(
            merging = replayed.merging,
            blocks = table.len(),
            runs = table.runs(),
            journal = %journal_path.display(),
            "recovered ROW overlay"
        );
        let overlay =
            Overlay::recovered(image.clone(), reserved, table, journal, replayed.merging, replayed.data_start);
        Ok(Some(overlay))
    }

    /// The reserved file the replayed journal maps into: opened if it is the journal's pair (its
    /// header names the same ROW session; none in the identity layout of older releases),
    /// created if missing and nothing is mapped, refused otherwise (nothing is changed), and
    /// checked to hold every slot the journal maps.
    fn open_reserved(
        storage: &dyn Storage,
        reserved_path: &Path,
        journal_path: &Path,
        replayed: &Replayed,
        table: &Table,
        size: u64,
        latch: &Arc<SyncLatch>,
    ) -> Result<Image, StoreError> {
        let found = reserved::inspect(storage, reserved_path).map_err(io_err("looking at", reserved_path))?;
        let refuse = |why: String| Err(StoreError::Refused { path: reserved_path.to_owned(), why });
        let headed = replayed.data_start > 0;
        let reserved = match found {
            Found::Nothing if table.slots() > 0 => {
                return refuse(format!(
                    "the journal {} maps {} blocks into this reserved file, which is missing: restore it \
                     (nothing was changed)",
                    journal_path.display(),
                    table.len()
                ))
            }
            Found::Nothing if headed => {
                Image::create_new(storage, reserved_path, &reserved::header(size, &replayed.id), latch.clone())
            }
            Found::Nothing => Image::create_new(storage, reserved_path, &[], latch.clone()),
            Found::Reserved { id, .. } if headed && id != replayed.id => {
                return refuse(format!(
                    "this reserved file belongs to another ROW session than the journal {}: they are not a \
                     pair (nothing was changed)",
                    journal_path.display()
                ))
            }
            Found::Reserved { .. } if headed => Image::open(storage, reserved_path, false, latch.clone()),
            // The identity layout of older releases has no header.
            Found::Other | Found::Empty if !headed => Image::open(storage, reserved_path, false, latch.clone()),
            _ => {
                return refuse(format!(
                    "this is not the reserved file of the overlay journaled in {} (no header of ours): \
                     nothing was changed",
                    journal_path.display()
                ))
            }
        }
        .map_err(io_err("opening reserved file", reserved_path))?;
        // Every slot the journal maps must be in the file (the last may be a short block).
        let needed = replayed.data_start + table.slots().saturating_sub(1) * BLOCK_SIZE;
        if table.slots() > 0 && reserved.size() <= needed {
            return Err(StoreError::BadJournal {
                path: reserved_path.to_owned(),
                why: format!(
                    "reserved file has {} bytes, but the journal maps {} slots of {BLOCK_SIZE} bytes",
                    reserved.size(),
                    table.slots()
                ),
            });
        }
        Ok(reserved)
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
        self.image.read_only()
    }

    /// Why writes and flushes fail since a sync failed, if one did.
    pub fn sync_failure(&self) -> Option<&str> {
        self.latch.tripped()
    }

    fn layers(&self) -> RwLockReadGuard<'_, Layers> {
        self.layers.read().unwrap_or_else(|e| e.into_inner())
    }

    fn layers_mut(&self) -> RwLockWriteGuard<'_, Layers> {
        self.layers.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.layers().mode()
    }

    /// Reads `buf.len()` bytes at `offset` of the disk as the guest sees it.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut out = Vec::with_capacity(buf.len());
        self.read_append(&mut out, buf.len(), offset)?;
        buf.copy_from_slice(&out);
        Ok(())
    }

    /// The read-only view of the base frozen by the current ROW session, if one is on.
    pub fn frozen_base(self: &Arc<Self>) -> Option<FrozenBase> {
        let g = self.layers();
        (g.mode() == Mode::Row).then(|| FrozenBase { disk: self.clone(), epoch: g.epoch })
    }

    /// Freezes the image: from now on writes land in the reserved file. Atomic with respect to
    /// requests: those that completed before are in the (synced) image, later ones in the overlay.
    pub fn row_start(&self) -> Result<(), StoreError> {
        if self.read_only() {
            return Err(StoreError::Mode("the image is read-only".into()));
        }
        let mut g = self.layers_mut();
        if g.mode() != Mode::Direct {
            return Err(StoreError::Mode(format!("ROW cannot start: the disk is in {} mode", g.mode().as_str())));
        }
        if self.tracker.is_on() {
            return Err(StoreError::Mode("ROW cannot start while a bitmap migration tracks writes".into()));
        }
        self.image.sync().map_err(io_err("syncing image", self.image.path()))?;
        let overlay = Overlay::create(
            &*self.storage,
            self.image.clone(),
            &self.reserved_path,
            &self.journal_path,
            self.disk_tag,
            self.latch.clone(),
        )?;
        g.overlay = Some(Arc::new(overlay));
        g.epoch += 1;
        tracing::info!(reserved = %self.reserved_path.display(), "ROW started: image frozen");
        Ok(())
    }

    /// Starts leaving ROW mode: records the decision durably and switches to [`Mode::Merging`].
    /// [`Disk::merge`] then does the copying.
    pub fn begin_merge(&self) -> Result<(), StoreError> {
        let g = self.layers_mut();
        match (&g.overlay, g.mode()) {
            (_, Mode::Merging) => Ok(()),
            (_, Mode::Direct) | (None, _) => Err(StoreError::Mode("ROW is not on".into())),
            (Some(o), Mode::Row) => {
                o.begin_merge()?;
                tracing::info!(blocks = o.table().len(), "merge back into the image begun");
                Ok(())
            }
        }
    }

    /// Copies reserved blocks back into the image while requests keep being served, then
    /// returns to direct mode and deletes the overlay files. With `limit`, stops after about that
    /// many blocks (tests use it to simulate a crash mid-merge) and returns `Ok(false)`.
    pub fn merge(&self, limit: Option<u64>, progress: impl FnMut(MergeProgress)) -> Result<bool, StoreError> {
        let overlay = {
            let g = self.layers();
            match &g.overlay {
                Some(o) if o.is_merging() => o.clone(),
                _ => return Err(StoreError::Mode(format!("no merge under way (mode {})", g.mode().as_str()))),
            }
        };
        if !merge::copy_back(&overlay, limit, progress)? {
            return Ok(false);
        }
        let merged_err = io_err("finishing the merge", &self.reserved_path);
        let mut g = self.layers_mut();
        // Writes that came in since the copy ended went to the image: sync it with the journal.
        overlay.sync_overlay().map_err(merged_err)?;
        debug_assert!(overlay.table().is_empty());
        drop(overlay);
        // Reserved file first, journal last: a crash in between leaves a journal with nothing
        // mapped, which the next open finishes at once.
        self.storage.remove(&self.reserved_path).map_err(io_err("removing reserved file", &self.reserved_path))?;
        self.storage.remove(&self.journal_path).map_err(io_err("removing journal", &self.journal_path))?;
        self.storage.sync_parent(&self.journal_path).map_err(io_err("syncing directory", &self.journal_path))?;
        // Closing the deleted reserved file frees its blocks, which takes seconds for a file
        // of scattered 4 KiB blocks: let a thread do it after we are back in direct mode.
        if let Some(old) = g.overlay.take() {
            std::thread::spawn(move || drop(old));
        }
        tracing::info!("merge finished: back to direct mode");
        Ok(true)
    }

    /// Leaves ROW mode: begins (or resumes) the merge and runs it to the end.
    pub fn row_stop(&self, progress: impl FnMut(MergeProgress)) -> Result<(), StoreError> {
        self.begin_merge()?;
        self.merge(None, progress).map(|_| ())
    }

    /// Turns direct-mode dirty tracking on (fresh statistics) or off. With it on, every write
    /// records its blocks' generation and count, as a dirty bitmap would; the bitmap migration
    /// strategy uses it.
    pub fn set_tracking(&self, on: bool) -> Result<(), StoreError> {
        let g = self.layers_mut();
        if on && g.mode() != Mode::Direct {
            return Err(StoreError::Mode(format!("dirty tracking needs direct mode, not {}", g.mode().as_str())));
        }
        self.tracker.set(on);
        Ok(())
    }

    /// Replaces the image's content: truncates it to `size` bytes of zeroes (a sparse file).
    /// Used by a migration destination before the first round; only in direct mode.
    pub fn reset_image(&self) -> Result<(), StoreError> {
        let g = self.layers_mut();
        if g.mode() != Mode::Direct {
            return Err(StoreError::Mode(format!("cannot reset an image in {} mode", g.mode().as_str())));
        }
        self.image.reset().map_err(io_err("resetting image", self.image.path()))
    }

    /// Mode and overlay counters.
    pub fn status(&self) -> RowStatus {
        let g = self.layers();
        let counts = |t: &Table| (t.len(), t.epoch(), t.runs() as u64, t.heap_bytes() as u64);
        let ((blocks, generation, runs, map_bytes), allocated) = match &g.overlay {
            Some(o) => (counts(&o.table()), o.reserved().allocated_bytes().unwrap_or(0)),
            None => (self.tracker.with(|t| counts(t)).unwrap_or_default(), 0),
        };
        RowStatus {
            mode: g.mode(),
            blocks_updated: blocks,
            reserved_bytes: blocks * BLOCK_SIZE,
            reserved_allocated: allocated,
            generation,
            runs,
            map_bytes,
            epoch: g.epoch,
        }
    }

    /// Runs `f` on the table that tracks writes now: the overlay's, or the dirty tracker's.
    fn with_table<T>(&self, f: impl FnOnce(&mut Table) -> T) -> Option<T> {
        let g = self.layers();
        match &g.overlay {
            Some(o) => Some(f(&mut o.table())),
            None => self.tracker.with(f),
        }
    }

    /// The current write epoch (cheaper than [`Disk::status`], which also stats the reserved
    /// file).
    pub fn epoch(&self) -> u64 {
        self.with_table(|t| t.epoch()).unwrap_or(0)
    }

    /// Starts a new write epoch and returns the last: blocks written from now on have a
    /// greater one. A migration marks before it reads blocks to send.
    pub fn mark(&self) -> u64 {
        self.with_table(|t| t.mark()).unwrap_or(0)
    }

    /// Starts a new write epoch (as [`Disk::mark`]) and, in the same step, says what holds
    /// blocks `[start, end)` now: a zeroed range found here stays zeroed until a write of a
    /// later epoch.
    pub fn mark_segments(&self, start: u64, end: u64) -> (u64, Vec<crate::table::Segment>) {
        self.with_table(|t| (t.mark(), t.segments(start, end)))
            .unwrap_or_else(|| (0, vec![crate::table::Segment { start, end, held: crate::table::Held::Base }]))
    }

    /// Every written run with its statistics, in block order (a copy, taken under the lock
    /// writes take: proportional to the number of runs, not blocks).
    pub fn written_runs(&self) -> Vec<WrittenRun> {
        self.with_table(|t| t.iter().collect()).unwrap_or_default()
    }

    /// Runs whose last write is of an epoch after `epoch`.
    pub fn written_since(&self, epoch: u64) -> Vec<WrittenRun> {
        self.with_table(|t| t.iter().filter(|r| r.epoch > epoch).collect()).unwrap_or_default()
    }

    /// The paper's partition: blocks written at least `threshold` times are hot (high
    /// frequency), the others cold. Returns the block counts `(hot, cold)`.
    pub fn hot_cold(&self, threshold: u32) -> (u64, u64) {
        self.with_table(|t| {
            t.iter().fold(
                (0, 0),
                |(hot, cold), r| if r.writes >= threshold { (hot + r.len, cold) } else { (hot, cold + r.len) },
            )
        })
        .unwrap_or_default()
    }
}

/// The live disk: the image in direct mode (recording writes while tracking is on), the
/// overlay in ROW and merging modes.
impl BlockBackend for Disk {
    fn size(&self) -> u64 {
        self.image.size()
    }

    fn caps(&self) -> Caps {
        // What the export advertises must hold in every mode; finding holes is cheap only in
        // direct mode, which `cheap_extents` reflects at the time of asking.
        Caps { cheap_extents: self.mode() == Mode::Direct, ..self.image.caps() }
    }

    fn read_append(&self, out: &mut Vec<u8>, len: usize, offset: u64) -> io::Result<()> {
        match &self.layers().overlay {
            Some(o) => o.read_append(out, len, offset),
            None => self.image.read_append(out, len, offset),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        match &self.layers().overlay {
            Some(o) => o.write_at(buf, offset, fua),
            None => {
                self.image.write_at(buf, offset, fua)?;
                self.tracker.record(offset, buf.len() as u64);
                Ok(())
            }
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        match &self.layers().overlay {
            Some(o) => o.write_zeroes(offset, len, flags),
            None => {
                self.image.write_zeroes(offset, len, flags)?;
                self.tracker.record(offset, len);
                Ok(())
            }
        }
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        match &self.layers().overlay {
            Some(o) => o.trim(offset, len, fua),
            None => {
                self.image.trim(offset, len, fua)?;
                self.tracker.record(offset, len);
                Ok(())
            }
        }
    }

    fn flush(&self) -> io::Result<()> {
        match &self.layers().overlay {
            Some(o) => o.flush(),
            None => self.image.flush(),
        }
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        match &self.layers().overlay {
            Some(o) => o.cache(offset, len),
            None => self.image.cache(offset, len),
        }
    }

    fn extents(&self, offset: u64, len: u64, max: usize) -> io::Result<Vec<Extent>> {
        match &self.layers().overlay {
            Some(o) => o.extents(offset, len, max),
            None => self.image.extents(offset, len, max),
        }
    }
}

/// The image as frozen by one ROW session, read-only: a consistent backup source while the
/// guest runs, and round 1 of a migration. It fails once that session ends.
#[derive(Debug, Clone)]
pub struct FrozenBase {
    disk: Arc<Disk>,
    epoch: u64,
}

impl FrozenBase {
    /// The ROW session it belongs to.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The disk's layers, provided the base frozen by this session is still frozen: a reader of
    /// the base never mixes two different freezes, nor a freeze with a merge.
    fn check(&self) -> io::Result<RwLockReadGuard<'_, Layers>> {
        let g = self.disk.layers();
        if g.mode() != Mode::Row || g.epoch != self.epoch {
            return Err(io::Error::other("the frozen base is gone: ROW mode ended"));
        }
        Ok(g)
    }
}

impl BlockBackend for FrozenBase {
    fn size(&self) -> u64 {
        self.disk.size()
    }

    fn caps(&self) -> Caps {
        self.disk.image.caps().read_only()
    }

    fn read_append(&self, out: &mut Vec<u8>, len: usize, offset: u64) -> io::Result<()> {
        let _g = self.check()?;
        self.disk.image.read_append(out, len, offset)
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.disk.image.cache(offset, len)
    }

    fn extents(&self, offset: u64, len: u64, max: usize) -> io::Result<Vec<Extent>> {
        let _g = self.check()?;
        self.disk.image.extents(offset, len, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::SimStorage;

    const SIZE: u64 = 64 * BLOCK_SIZE;

    fn disk() -> (SimStorage, Arc<Disk>) {
        let s = SimStorage::new(1);
        let path = Path::new("/vm/d.raw");
        s.create_durable(path, SIZE);
        let d = Disk::open_on(Arc::new(s.clone()), path, DiskOptions::default()).unwrap();
        (s, Arc::new(d))
    }

    #[test]
    fn mode_changes_go_direct_row_merging_direct_and_refuse_the_rest() {
        let (s, d) = disk();
        assert_eq!(d.mode(), Mode::Direct);
        assert!(matches!(d.begin_merge(), Err(StoreError::Mode(_))), "nothing to merge in direct mode");
        assert!(matches!(d.merge(None, |_| {}), Err(StoreError::Mode(_))));
        assert!(d.frozen_base().is_none());
        d.row_start().unwrap();
        assert_eq!(d.mode(), Mode::Row);
        assert!(s.exists(d.reserved_path()).unwrap());
        assert!(matches!(d.row_start(), Err(StoreError::Mode(_))), "ROW twice");
        assert!(matches!(d.set_tracking(true), Err(StoreError::Mode(_))), "tracking needs direct mode");
        assert!(matches!(d.reset_image(), Err(StoreError::Mode(_))), "reset needs direct mode");
        let base = d.frozen_base().unwrap();
        d.begin_merge().unwrap();
        assert_eq!(d.mode(), Mode::Merging);
        d.begin_merge().unwrap();
        assert!(d.frozen_base().is_none());
        let mut out = Vec::new();
        assert!(base.read_append(&mut out, 512, 0).is_err(), "the frozen base ends with ROW");
        assert!(d.merge(None, |_| {}).unwrap());
        assert_eq!(d.mode(), Mode::Direct);
        assert!(!s.exists(d.reserved_path()).unwrap());
    }

    #[test]
    fn row_cannot_start_while_tracking_nor_on_a_read_only_image() {
        let (_s, d) = disk();
        d.set_tracking(true).unwrap();
        assert!(matches!(d.row_start(), Err(StoreError::Mode(_))));
        d.write_at(&[1; 4096], 8192, false).unwrap();
        assert_eq!(d.written_runs().iter().map(|r| (r.start, r.len)).collect::<Vec<_>>(), vec![(2, 1)]);
        d.set_tracking(false).unwrap();
        d.row_start().unwrap();

        let s = SimStorage::new(2);
        let path = Path::new("/vm/ro.raw");
        s.create_durable(path, SIZE);
        let ro = Disk::open_on(Arc::new(s), path, DiskOptions { read_only: true, ..DiskOptions::default() }).unwrap();
        assert!(matches!(ro.row_start(), Err(StoreError::Mode(_))));
        assert!(!ro.caps().write);
    }

    #[test]
    fn statistics_follow_the_overlay() {
        let (_s, d) = disk();
        d.row_start().unwrap();
        d.write_at(&[1; 4096], 0, false).unwrap();
        d.write_at(&[2; 4096], 0, false).unwrap();
        assert_eq!(d.mark(), 0);
        d.write_at(&[3; 8192], 4096 * 10, false).unwrap();
        let st = d.status();
        assert_eq!((st.blocks_updated, st.generation, st.epoch, st.runs), (3, 1, 1, 2));
        assert_eq!(d.hot_cold(2), (1, 2));
        assert_eq!(d.written_since(0).iter().map(|r| (r.start, r.len)).collect::<Vec<_>>(), vec![(10, 2)]);
    }

    #[test]
    fn scattered_first_writes_are_appended_in_write_order() {
        let (s, d) = disk();
        d.row_start().unwrap();
        for (b, v) in [(50u64, 1u8), (3, 2), (40, 3)] {
            d.write_at(&[v; 4096], b * BLOCK_SIZE, false).unwrap();
        }
        d.write_at(&[4; 4096], 3 * BLOCK_SIZE, false).unwrap();
        // A partial write into a zeroed block copies up zeroes into a new slot.
        d.write_zeroes(50 * BLOCK_SIZE, BLOCK_SIZE, ZeroFlags::default()).unwrap();
        d.write_at(&[5; 512], 50 * BLOCK_SIZE + 512, false).unwrap();
        d.flush().unwrap();
        let reserved = s.contents(d.reserved_path()).unwrap();
        let slots: Vec<u8> = reserved[4096..].chunks(4096).map(|c| *c.iter().max().unwrap()).collect();
        assert_eq!(slots, vec![0, 4, 3, 5], "slot 0 punched, block 3 rewritten in place, block 50 moved");
        let expect = |d: &Disk| {
            let mut b50 = vec![0u8; 4096];
            b50[512..1024].fill(5);
            for (b, want) in [(50u64, b50), (3, vec![4; 4096]), (40, vec![3; 4096]), (41, vec![0; 4096])] {
                let mut got = vec![0u8; 4096];
                d.read_at(&mut got, b * BLOCK_SIZE).unwrap();
                assert_eq!(got, want, "block {b}");
            }
        };
        expect(&d);
        s.power_cut();
        drop(d);
        let d = Disk::open_on(Arc::new(s), Path::new("/vm/d.raw"), DiskOptions::default()).unwrap();
        expect(&d);
        d.row_stop(|_| {}).unwrap();
        expect(&d);
    }

    #[test]
    fn an_identity_mapped_overlay_of_an_older_release_comes_back() {
        use crate::storage::OpenMode;
        let (s, path) = (SimStorage::new(3), Path::new("/vm/old.raw"));
        s.create_durable(path, SIZE);
        // Block 5 updated and block 9 zeroed under the identity layout (journal version 2).
        let reserved = s.open(Path::new("/vm/old.raw.row"), OpenMode::Create).unwrap();
        reserved.set_len(SIZE).unwrap();
        reserved.write_all_at(&[7; 4096], 5 * BLOCK_SIZE).unwrap();
        reserved.sync_all().unwrap();
        let journal = s.open(Path::new("/vm/old.raw.row.map"), OpenMode::Create).unwrap();
        journal.write_all_at(&crate::journal::tests::version_2_journal(SIZE, &[(1, 5, 1), (4, 9, 1)]), 0).unwrap();
        journal.sync_all().unwrap();
        drop((reserved, journal));
        let d = Disk::open_on(Arc::new(s.clone()), path, DiskOptions::default()).unwrap();
        assert_eq!(d.mode(), Mode::Row);
        d.write_at(&[8; 4096], 6 * BLOCK_SIZE, false).unwrap();
        d.row_stop(|_| {}).unwrap();
        let image = s.contents(path).unwrap();
        let block = |b: u64| image[(b * BLOCK_SIZE) as usize..((b + 1) * BLOCK_SIZE) as usize].to_vec();
        assert_eq!((block(5), block(6), block(9)), (vec![7; 4096], vec![8; 4096], vec![0; 4096]));
    }

    fn open(s: &SimStorage, reserved: Option<&str>) -> Result<Disk, StoreError> {
        let opts = DiskOptions { reserved: reserved.map(PathBuf::from), ..DiskOptions::default() };
        Disk::open_on(Arc::new(s.clone()), Path::new("/vm/d.raw"), opts)
    }

    fn put(s: &SimStorage, path: &str, bytes: &[u8]) {
        use crate::storage::OpenMode;
        let f = s.open(Path::new(path), OpenMode::Create).unwrap();
        f.write_all_at(bytes, 0).unwrap();
        f.sync_all().unwrap();
    }

    #[test]
    fn an_overlay_of_another_disk_is_refused_and_left_alone() {
        let s = SimStorage::new(3);
        let tagged = |image: &str, tag: u8| {
            let opts =
                DiskOptions { reserved: Some("/state/overlay".into()), disk_tag: [tag; 12], ..DiskOptions::default() };
            Disk::open_on(Arc::new(s.clone()), Path::new(image), opts)
        };
        for image in ["/vm/a.raw", "/vm/b.raw"] {
            put(&s, image, &[0; 8192]);
        }
        let a = tagged("/vm/a.raw", 1).unwrap();
        a.row_start().unwrap();
        a.write_at(&[0xaa; 4096], 0, false).unwrap();
        a.flush().unwrap();
        drop(a);
        let journal = s.contents(Path::new("/state/overlay.map")).unwrap();
        // Disk b pointed at a's overlay (a --reserved typo): refused, nothing changed.
        let Err(err) = tagged("/vm/b.raw", 2) else { panic!("adopted another disk's overlay") };
        assert!(err.to_string().contains("another disk"), "{err}");
        assert_eq!(s.contents(Path::new("/state/overlay.map")).unwrap(), journal);
        // Its own disk adopts it; an unbound opener (an older caller) too.
        assert_eq!(tagged("/vm/a.raw", 1).unwrap().mode(), Mode::Row);
        assert_eq!(tagged("/vm/a.raw", 0).unwrap().mode(), Mode::Row);
    }

    #[test]
    fn a_path_that_holds_anything_else_is_refused_and_left_alone() {
        let (s, d) = disk();
        drop(d);
        // Another VM's image, the served image itself, a journal: never truncated or deleted.
        put(&s, "/vm/other.raw", &[9; 8192]);
        for path in ["/vm/other.raw", "/vm/d.raw"] {
            let before = s.contents(Path::new(path)).unwrap();
            assert!(matches!(open(&s, Some(path)), Err(StoreError::Refused { .. })), "{path}");
            assert_eq!(s.contents(Path::new(path)).unwrap(), before, "{path} untouched");
        }
        // A leftover of our own interrupted ROW start (header, no data, no journal) is cleared.
        let d = open(&s, None).unwrap();
        d.row_start().unwrap();
        drop(d);
        s.remove(Path::new("/vm/d.raw.row.map")).unwrap();
        let d = open(&s, None).unwrap();
        assert_eq!(d.mode(), Mode::Direct);
        assert!(!s.exists(Path::new("/vm/d.raw.row")).unwrap());
        d.row_start().unwrap();
    }

    #[test]
    fn writes_without_their_journal_or_with_another_session_s_are_refused() {
        let (s, d) = disk();
        d.row_start().unwrap();
        d.write_at(&[5; 4096], 0, false).unwrap();
        d.flush().unwrap();
        drop(d);
        let (reserved, journal) = (Path::new("/vm/d.raw.row"), Path::new("/vm/d.raw.row.map"));
        let saved = s.contents(journal).unwrap();
        // The journal zeroed or deleted: the reserved file holds the only copy of the write.
        for damage in [Some(vec![0u8; saved.len()]), None] {
            match &damage {
                Some(bytes) => put(&s, "/vm/d.raw.row.map", bytes),
                None => s.remove(journal).unwrap(),
            }
            assert!(matches!(open(&s, None), Err(StoreError::Refused { .. })));
            assert!(s.exists(reserved).unwrap(), "the writes are still there");
        }
        put(&s, "/vm/d.raw.row.map", &saved);
        // Another session's reserved file beside this journal.
        let other = s.contents(reserved).unwrap();
        let d = open(&s, None).unwrap();
        d.row_stop(|_| {}).unwrap();
        d.row_start().unwrap();
        d.flush().unwrap();
        drop(d);
        put(&s, "/vm/d.raw.row", &other);
        assert!(matches!(open(&s, None), Err(StoreError::Refused { .. })));
    }

    #[test]
    fn a_reserved_file_missing_or_cut_short_is_refused() {
        let (s, d) = disk();
        d.row_start().unwrap();
        d.write_at(&[5; 8192], 0, false).unwrap();
        d.flush().unwrap();
        drop(d);
        let reserved = Path::new("/vm/d.raw.row");
        let whole = s.contents(reserved).unwrap();
        // Cut short: the journal maps two slots, the file holds one.
        put(&s, "/vm/d.raw.row", &whole[..whole.len() - 4096]);
        assert!(matches!(open(&s, None), Err(StoreError::BadJournal { .. })));
        // Gone: the journal still maps its blocks; it is refused, not replaced by an empty one.
        s.remove(reserved).unwrap();
        assert!(matches!(open(&s, None), Err(StoreError::Refused { .. })));
        assert!(!s.exists(reserved).unwrap());
        put(&s, "/vm/d.raw.row", &whole);
        let d = open(&s, None).unwrap();
        let mut got = vec![0u8; 8192];
        d.read_at(&mut got, 0).unwrap();
        assert_eq!(got, vec![5; 8192]);
        // Another overlay's journal given as the reserved file.
        drop(d);
        let journal = s.contents(Path::new("/vm/d.raw.row.map")).unwrap();
        put(&s, "/vm/other.map", &journal);
        assert!(matches!(open(&s, Some("/vm/other.map")), Err(StoreError::Refused { .. })));
        assert_eq!(s.contents(Path::new("/vm/other.map")).unwrap(), journal);
    }

    #[test]
    fn a_journal_cut_at_a_batch_boundary_is_refused_a_torn_tail_is_not() {
        let (s, d) = disk();
        d.row_start().unwrap();
        let journal = Path::new("/vm/d.raw.row.map");
        let mut lengths = Vec::new();
        for i in 0..4u8 {
            d.write_at(&[i + 1; 4096], u64::from(i) * 8192, false).unwrap();
            d.flush().unwrap();
            lengths.push(s.contents(journal).unwrap().len());
        }
        drop(d);
        let whole = s.contents(journal).unwrap();
        // Cut after the second of four acknowledged batches: whole batches, nothing torn, so
        // only the reserved file's mark can tell. Refused, and the file is left as it is.
        put(&s, "/vm/d.raw.row.map", &whole[..lengths[1]]);
        match open(&s, None) {
            Err(StoreError::BadJournal { why, .. }) => assert!(why.contains("acknowledged"), "{why}"),
            other => panic!("a journal cut at a batch boundary was accepted: {:?}", other.map(|_| ())),
        }
        assert_eq!(s.contents(journal).unwrap().len(), lengths[1]);
        // A torn last append (part of a batch after the whole ones) is a crash, not damage.
        let mut torn = whole;
        torn.extend_from_slice(&[0xee; 30]);
        put(&s, "/vm/d.raw.row.map", &torn);
        let d = open(&s, None).unwrap();
        for i in 0..4u8 {
            let mut got = vec![0u8; 4096];
            d.read_at(&mut got, u64::from(i) * 8192).unwrap();
            assert_eq!(got, vec![i + 1; 4096], "block {i}");
        }
    }
}
