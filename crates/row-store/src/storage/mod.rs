//! The storage the store runs on: files with positional I/O, holes and syncs, and the directory
//! operations that create, rename and delete them.
//!
//! [`Posix`] is the real thing (`pread`, `pwritev2`, `fallocate`, `fdatasync`, `SEEK_DATA`,
//! QEMU-compatible byte-range locks). [`sim::SimStorage`] keeps everything in memory and, at a
//! simulated power cut, keeps only what was synced (and any subset of what was not): the model
//! test runs the store over it, so a missing sync is a failing test rather than a lost disk.
//!
//! Every sync goes through a [`SyncLatch`]: after one fails, the data it covered may be gone
//! from the page cache for good (Linux marks the pages clean), so a later sync that succeeds
//! proves nothing. The store then refuses writes and fails every flush until it is restarted
//! and recovers from what is durable, as PostgreSQL does since "fsyncgate".

pub mod posix;
pub mod sim;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

pub use posix::Posix;
pub use sim::SimStorage;

/// A run of data or of hole in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub length: u64,
    /// Whether the range is unallocated (and reads as zeroes).
    pub hole: bool,
}

/// How a file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Existing file, reads only.
    ReadOnly,
    /// Existing file, reads and writes.
    ReadWrite,
    /// Created, or truncated to empty if it exists; reads and writes.
    Create,
    /// Created; fails with `AlreadyExists` if anything is at the path. Reads and writes.
    CreateNew,
}

/// What a lock on an image claims, in QEMU's terms: the permissions we use and those we let
/// others use at the same time (`CONSISTENT_READ`, `WRITE`, `RESIZE`...). See [`posix`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// We read and write; others may read but not write or resize (QEMU's default for a
    /// writable drive).
    Writer,
    /// We read; others may read, but nobody may write (QEMU's read-only drive).
    Reader,
}

/// A file of the store.
pub trait BlockFile: Send + Sync + fmt::Debug {
    /// Its size in bytes (also for block devices).
    fn size(&self) -> io::Result<u64>;
    /// Truncates or extends (with a hole).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Fills `buf` from `offset`; reading past the end is an error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Appends `len` bytes read at `offset` to `out`.
    fn read_append(&self, out: &mut Vec<u8>, len: usize, offset: u64) -> io::Result<()> {
        let start = out.len();
        out.resize(start + len, 0);
        self.read_exact_at(&mut out[start..], offset)
    }
    /// Writes all of `buf` at `offset` (into the page cache; not durable yet).
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset` and makes that data durable before returning.
    fn write_all_at_durable(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(buf, offset)?;
        self.sync_data()
    }
    /// Makes every completed write durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
    /// Makes data and metadata durable (`fsync`).
    fn sync_all(&self) -> io::Result<()> {
        self.sync_data()
    }
    /// Deallocates a range so it reads as zeroes; `Unsupported` where it cannot.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes a range read as zeroes but stay allocated; `Unsupported` where it cannot.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Data and hole extents of `[offset, offset + len)`, at most `max` (the last one may end
    /// early then); all data where holes cannot be found.
    fn extents(&self, offset: u64, len: u64, max: usize) -> io::Result<Vec<Extent>>;
    /// Bytes the file occupies on disk.
    fn allocated_bytes(&self) -> io::Result<u64>;
    /// Hints that a range will be read soon.
    fn will_need(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// Evicts the file's clean cached pages, so later reads come from the disk. Called when a
    /// file is opened: after a failed sync in an earlier run, the page cache can hold data that
    /// never reached the disk (Linux marks such pages clean), which a later successful sync would
    /// then silently leave out.
    fn drop_cache(&self) -> io::Result<()> {
        Ok(())
    }
    /// Takes the lock other users of the file (QEMU, qemu-img, another server) respect, or
    /// fails with `WouldBlock` and a message naming the conflict.
    fn lock(&self, _mode: LockMode) -> io::Result<()> {
        Ok(())
    }
}

/// A file system: opens files, and creates, renames and deletes directory entries.
pub trait Storage: Send + Sync + fmt::Debug {
    /// Opens `path`.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn BlockFile>>;
    /// Whether `path` exists.
    fn exists(&self, path: &Path) -> io::Result<bool>;
    /// Deletes `path` (`NotFound` if there is nothing).
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Renames `from` to `to`, replacing `to`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes the directory entries of `path`'s directory durable (after a create, rename or
    /// delete).
    fn sync_parent(&self, path: &Path) -> io::Result<()>;
    /// Reads a small whole file (a state file such as `IMAGE.ownership`). Anything else at the
    /// path, a directory or a device, or a file over 64 MiB, is refused with `InvalidData` and a
    /// message that says what is there, rather than read (a directory reports a size of
    /// exabytes on some file systems).
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        /// Larger than any state file the store writes, by far.
        const MAX_SMALL_FILE: u64 = 64 << 20;
        let refuse = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
        // The kind of file, where the path is a real one (a simulated store's are not).
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.is_dir() {
                return Err(refuse("is a directory, not a file".into()));
            }
            if !meta.is_file() {
                return Err(refuse("is not a regular file".into()));
            }
        }
        let f = self.open(path, OpenMode::ReadOnly)?;
        let size = f.size()?;
        if size > MAX_SMALL_FILE {
            return Err(refuse(format!("is {size} bytes, not a small state file (at most {MAX_SMALL_FILE})")));
        }
        let mut out = Vec::new();
        f.read_append(&mut out, size as usize, 0)?;
        Ok(out)
    }
    /// Replaces a small file atomically and durably: writes a temporary file, syncs it, renames
    /// it over `path` and syncs the directory.
    fn replace(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let tmp = suffixed(path, ".tmp");
        let written = self.open(&tmp, OpenMode::Create).and_then(|f| {
            f.write_all_at(bytes, 0)?;
            f.sync_all()
        });
        if let Err(e) = written.and_then(|()| self.rename(&tmp, path)) {
            // A full disk must not leave a half-written temporary file behind.
            let _ = self.remove(&tmp);
            return Err(e);
        }
        self.sync_parent(path)
    }
}

/// `path` with `suffix` appended to its file name.
pub fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The first failed sync of a store, after which nothing it reports durable can be trusted
/// until a restart (see the module docs).
#[derive(Debug, Default)]
pub struct SyncLatch {
    failed: OnceLock<String>,
}

impl SyncLatch {
    /// A new, untripped latch.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// `Err(EIO)` once a sync has failed.
    pub fn check(&self) -> io::Result<()> {
        match self.failed.get() {
            None => Ok(()),
            Some(why) => Err(io::Error::other(LatchedError(format!(
                "an earlier sync failed ({why}); writes and flushes are refused until the server \
                     is restarted and recovers from what is on disk"
            )))),
        }
    }

    /// Runs a sync (or durable write) of `what`; a failure trips the latch.
    pub fn sync(&self, what: &Path, f: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        self.check()?;
        f().inspect_err(|e| {
            if self.failed.set(format!("{}: {e}", what.display())).is_ok() {
                tracing::error!(file = %what.display(), error = %e, "sync failed: refusing writes and flushes until restart");
            }
        })
    }

    /// Why the latch tripped, if it did.
    pub fn tripped(&self) -> Option<&str> {
        self.failed.get().map(String::as_str)
    }
}

/// The error a tripped latch returns; it maps to `EIO`.
#[derive(Debug)]
pub struct LatchedError(pub String);

impl fmt::Display for LatchedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LatchedError {}

/// Whether an error says the operation is not supported here (rather than that it failed).
pub fn unsupported(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Unsupported
        || matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::ENODEV))
}
