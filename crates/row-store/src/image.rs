//! A raw disk image: positional I/O, holes, zeroing and durability over one [`BlockFile`].
//!
//! Every method is synchronous and position-independent, so one `Image` is shared by every
//! connection and thread; a flush through any of them covers all completed writes, which is what
//! lets the server advertise `NBD_FLAG_CAN_MULTI_CONN`. Syncs go through the store's
//! [`SyncLatch`]: after one fails, writes and flushes fail until a restart.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::{BlockBackend, Caps, ZeroFlags};
use crate::storage::{unsupported, BlockFile, Extent, LockMode, OpenMode, Storage, SyncLatch};

/// Chunk used when zeroes must be written as data.
const ZERO_CHUNK: usize = 1 << 20;

/// An open raw image (or the reserved file, which is one too).
#[derive(Debug)]
pub struct Image {
    file: Box<dyn BlockFile>,
    size: u64,
    path: PathBuf,
    read_only: bool,
    latch: Arc<SyncLatch>,
}

impl Image {
    /// Opens an existing image file or block device (read-write unless `read_only`) and locks it
    /// the way QEMU does, so no other program writes to it while we serve it.
    pub fn open(storage: &dyn Storage, path: &Path, read_only: bool, latch: Arc<SyncLatch>) -> io::Result<Self> {
        let file = storage.open(path, if read_only { OpenMode::ReadOnly } else { OpenMode::ReadWrite })?;
        file.lock(if read_only { LockMode::Reader } else { LockMode::Writer })?;
        file.drop_cache()?;
        let size = file.size()?;
        Ok(Self { file, size, path: path.to_owned(), read_only, latch })
    }

    /// Creates (or replaces) a sparse file of `size` bytes, durably, and locks it.
    pub fn create(storage: &dyn Storage, path: &Path, size: u64, latch: Arc<SyncLatch>) -> io::Result<Self> {
        let file = storage.open(path, OpenMode::Create)?;
        file.lock(LockMode::Writer)?;
        file.set_len(size)?;
        latch.sync(path, || file.sync_all())?;
        storage.sync_parent(path)?;
        Ok(Self { file, size, path: path.to_owned(), read_only: false, latch })
    }

    /// Creates a file that must not exist yet, holding `head`, durably, and locks it.
    pub fn create_new(storage: &dyn Storage, path: &Path, head: &[u8], latch: Arc<SyncLatch>) -> io::Result<Self> {
        let file = storage.open(path, OpenMode::CreateNew)?;
        file.lock(LockMode::Writer)?;
        file.write_all_at(head, 0)?;
        latch.sync(path, || file.sync_all())?;
        storage.sync_parent(path)?;
        Ok(Self { file, size: head.len() as u64, path: path.to_owned(), read_only: false, latch })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether it was opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Drops all content: the file becomes `size` bytes of hole. Not for block devices.
    pub fn reset(&self) -> io::Result<()> {
        self.latch.check()?;
        self.file.set_len(0)?;
        self.file.set_len(self.size)?;
        self.latch.sync(&self.path, || self.file.sync_all())
    }

    /// Fails as writes do once a sync has failed: for changes that touch no file (a range
    /// recorded as zeroed) but must not be acknowledged after that.
    pub fn check_writable(&self) -> io::Result<()> {
        self.latch.check()
    }

    /// Bytes the file occupies on disk (less than its size when sparse).
    pub fn allocated_bytes(&self) -> io::Result<u64> {
        self.file.allocated_bytes()
    }

    /// Fills `buf` from `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Writes `buf` at `offset`; with `fua` the data is durable when this returns.
    pub fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.latch.check()?;
        if fua {
            self.latch.sync(&self.path, || self.file.write_all_at_durable(buf, offset))
        } else {
            self.file.write_all_at(buf, offset)
        }
    }

    /// Makes every completed write durable.
    pub fn sync(&self) -> io::Result<()> {
        self.latch.sync(&self.path, || self.file.sync_data())
    }

    /// Discards a range; advisory, so a file system that cannot punch holes is not an error.
    pub fn discard(&self, offset: u64, length: u64) -> io::Result<()> {
        self.latch.check()?;
        match self.file.punch_hole(offset, length) {
            Err(e) if unsupported(&e) => Ok(()),
            other => other,
        }
    }

    /// Makes a range read as zeroes: a hole when `may_punch`, else allocated zeroes; with
    /// `fast_only`, `ENOTSUP` instead of writing zeroes as data.
    pub fn zero(&self, offset: u64, length: u64, may_punch: bool, fast_only: bool) -> io::Result<()> {
        self.latch.check()?;
        if may_punch {
            match self.file.punch_hole(offset, length) {
                Err(e) if unsupported(&e) => {}
                other => return other,
            }
        }
        match self.file.zero_range(offset, length) {
            Err(e) if unsupported(&e) => {}
            other => return other,
        }
        if fast_only {
            return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
        }
        let zeroes = vec![0u8; ZERO_CHUNK.min(length as usize)];
        let mut done = 0u64;
        while done < length {
            let n = (length - done).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Data and hole extents of the file, at most `max`.
    pub fn file_extents(&self, offset: u64, length: u64, max: usize) -> io::Result<Vec<Extent>> {
        self.file.extents(offset, length, max)
    }
}

/// The image on its own is a backend: direct mode, and the frozen base's data.
impl BlockBackend for Image {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        Caps::for_file(!self.read_only, true)
    }

    fn read_append(&self, out: &mut Vec<u8>, len: usize, offset: u64) -> io::Result<()> {
        self.file.read_append(out, len, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        Image::write_at(self, buf, offset, fua)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        self.zero(offset, len, flags.may_punch, flags.fast_only)?;
        if flags.fua {
            self.sync()?;
        }
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.discard(offset, len)?;
        if fua {
            self.sync()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.sync()
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.file.will_need(offset, len)
    }

    fn extents(&self, offset: u64, len: u64, max: usize) -> io::Result<Vec<Extent>> {
        self.file.extents(offset, len, max)
    }
}
