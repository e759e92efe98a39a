//! What an NBD export needs from a disk, as one trait: the image, the ROW overlay, the frozen
//! base and the live disk (which switches between the first two) each implement it, and the
//! server asks [`BlockBackend::caps`] which transmission flags to advertise, as nbdkit asks its
//! backends (`can_write`, `can_trim`, ...).

use std::fmt;
use std::io;

pub use crate::storage::Extent;

/// What a backend can do; the NBD transmission flags follow from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Accepts writes (else the export is read-only).
    pub write: bool,
    /// Accepts TRIM.
    pub trim: bool,
    /// Accepts WRITE_ZEROES.
    pub zeroes: bool,
    /// Can tell, without writing, whether zeroing is fast (NBD's FAST_ZERO).
    pub fast_zero: bool,
    /// Honours FUA.
    pub fua: bool,
    /// Honours FLUSH.
    pub flush: bool,
    /// Honours CACHE (prefetch).
    pub cache: bool,
    /// A flush through any connection covers writes made through every other.
    pub multi_conn: bool,
    /// Finding holes is cheap enough to do on every large read.
    pub cheap_extents: bool,
}

impl Caps {
    /// A file: everything when writable, reads, cache and extents otherwise.
    pub fn for_file(writable: bool, cheap_extents: bool) -> Self {
        Self {
            write: writable,
            trim: writable,
            zeroes: writable,
            fast_zero: writable,
            fua: writable,
            flush: true,
            cache: true,
            multi_conn: true,
            cheap_extents,
        }
    }

    /// The same capabilities without any that change the disk.
    pub fn read_only(self) -> Self {
        Self { write: false, trim: false, zeroes: false, fast_zero: false, fua: false, ..self }
    }
}

/// How a WRITE_ZEROES is to be done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range may become a hole (NBD: no `NO_HOLE`).
    pub may_punch: bool,
    /// Fail with `ENOTSUP` rather than write zeroes slowly (NBD: `FAST_ZERO`).
    pub fast_only: bool,
    /// Durable on return (NBD: `FUA`).
    pub fua: bool,
}

/// The error a backend returns for a write it does not accept.
pub fn read_only_error() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}

/// A disk an NBD export serves. Methods are synchronous (they run on a blocking thread or
/// inline for small requests) and may be called from many threads at once.
pub trait BlockBackend: Send + Sync + fmt::Debug {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// What it can do.
    fn caps(&self) -> Caps;

    /// Appends `len` bytes at `offset` to `out`.
    fn read_append(&self, out: &mut Vec<u8>, len: usize, offset: u64) -> io::Result<()>;

    /// Writes `buf` at `offset`; with `fua`, durable on return.
    fn write_at(&self, _buf: &[u8], _offset: u64, _fua: bool) -> io::Result<()> {
        Err(read_only_error())
    }

    /// Makes a range read as zeroes.
    fn write_zeroes(&self, _offset: u64, _len: u64, _flags: ZeroFlags) -> io::Result<()> {
        Err(read_only_error())
    }

    /// Discards a range (advisory: it may keep reading as before, or as zeroes).
    fn trim(&self, _offset: u64, _len: u64, _fua: bool) -> io::Result<()> {
        Err(read_only_error())
    }

    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    /// Hints that a range will be read soon.
    fn cache(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    /// Data and hole extents of `[offset, offset + len)`, at most `max`; the last may end early.
    fn extents(&self, offset: u64, len: u64, _max: usize) -> io::Result<Vec<Extent>> {
        let len = len.min(self.size().saturating_sub(offset));
        Ok(if len == 0 { Vec::new() } else { vec![Extent { length: len, hole: false }] })
    }
}

impl<T: BlockBackend + ?Sized> BlockBackend for std::sync::Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn caps(&self) -> Caps {
        (**self).caps()
    }
    fn read_append(&self, out: &mut Vec<u8>, len: usize, offset: u64) -> io::Result<()> {
        (**self).read_append(out, len, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        (**self).write_at(buf, offset, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        (**self).write_zeroes(offset, len, flags)
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        (**self).trim(offset, len, fua)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).cache(offset, len)
    }
    fn extents(&self, offset: u64, len: u64, max: usize) -> io::Result<Vec<Extent>> {
        (**self).extents(offset, len, max)
    }
}

/// A disk in memory: a real backend for unit tests and fuzzing of the layers above (no file,
/// no holes).
#[derive(Debug)]
pub struct MemDisk {
    bytes: std::sync::RwLock<Vec<u8>>,
    writable: bool,
}

impl MemDisk {
    /// `size` zero bytes.
    pub fn new(size: usize, writable: bool) -> Self {
        Self { bytes: std::sync::RwLock::new(vec![0; size]), writable }
    }

    /// A copy of the content.
    pub fn contents(&self) -> Vec<u8> {
        self.bytes.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn range(&self, offset: u64, len: u64) -> io::Result<std::ops::Range<usize>> {
        let end = offset.checked_add(len).filter(|&e| e <= self.size());
        match end {
            Some(end) => Ok(offset as usize..end as usize),
            None => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    fn write(&self, offset: u64, len: u64, f: impl FnOnce(&mut [u8])) -> io::Result<()> {
        if !self.writable {
            return Err(read_only_error());
        }
        let r = self.range(offset, len)?;
        f(&mut self.bytes.write().unwrap_or_else(|e| e.into_inner())[r]);
        Ok(())
    }
}

impl BlockBackend for MemDisk {
    fn size(&self) -> u64 {
        self.bytes.read().unwrap_or_else(|e| e.into_inner()).len() as u64
    }

    fn caps(&self) -> Caps {
        Caps { fast_zero: false, cheap_extents: false, ..Caps::for_file(self.writable, false) }
    }

    fn read_append(&self, out: &mut Vec<u8>, len: usize, offset: u64) -> io::Result<()> {
        let r = self.range(offset, len as u64)?;
        out.extend_from_slice(&self.bytes.read().unwrap_or_else(|e| e.into_inner())[r]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, _fua: bool) -> io::Result<()> {
        self.write(offset, buf.len() as u64, |dst| dst.copy_from_slice(buf))
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        if flags.fast_only {
            return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
        }
        self.write(offset, len, |dst| dst.fill(0))
    }

    fn trim(&self, offset: u64, len: u64, _fua: bool) -> io::Result<()> {
        self.write(offset, len, |dst| dst.fill(0))
    }
}
