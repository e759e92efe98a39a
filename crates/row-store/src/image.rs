//! A raw disk image file: positional I/O, holes, zeroing and durability.
//!
//! Every method is synchronous and position-independent (`pread`/`pwrite`), so one `Image` is
//! shared by every connection and thread; a flush through any of them covers all completed
//! writes, which is what lets the server advertise `NBD_FLAG_CAN_MULTI_CONN`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// One extent of the image: a run of data or of hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub length: u64,
    /// Whether the range is unallocated (and reads as zeroes).
    pub hole: bool,
}

/// An open raw image.
#[derive(Debug)]
pub struct Image {
    file: File,
    size: u64,
    path: PathBuf,
}

/// Chunk used when zeroes must be written as data.
const ZERO_CHUNK: usize = 1 << 20;

impl Image {
    /// Opens an image file or block device, read-write unless `read_only`.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        // `metadata().len()` is 0 for block devices; seeking to the end works for both.
        let size = lseek(&file, 0, libc::SEEK_END)?;
        Ok(Self { file, size, path: path.to_owned() })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Drops all content: the file becomes `size` bytes of hole. Not for block devices.
    pub fn reset(&self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.set_len(self.size)?;
        self.file.sync_all()
    }

    /// Bytes the file occupies on disk (less than its size when sparse).
    pub fn allocated_bytes(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file.metadata()?.blocks() * 512)
    }

    /// Fills `buf` from `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Appends `len` bytes read at `offset` to `out`, without zero-filling the new space first
    /// (a measurable cost at gigabytes per second).
    pub fn read_append(&self, out: &mut Vec<u8>, len: usize, offset: u64) -> io::Result<()> {
        out.reserve(len);
        let mut done = 0usize;
        while done < len {
            let spare = out.spare_capacity_mut();
            // SAFETY: the kernel writes at most `len - done` bytes into the spare capacity, which
            // `reserve` made at least that large; only the bytes it reports written are exposed.
            let n = unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    spare.as_mut_ptr().cast(),
                    len - done,
                    (offset + done as u64) as libc::off_t,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end of the file"));
            }
            // SAFETY: `n` bytes after the old length were just written by pread.
            unsafe { out.set_len(out.len() + n as usize) };
            done += n as usize;
        }
        Ok(())
    }

    /// Writes `buf` at `offset`; with `fua` the data is durable when this returns.
    pub fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        if fua {
            write_all_dsync(&self.file, buf, offset)
        } else {
            self.file.write_all_at(buf, offset)
        }
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Discards a range; advisory, so a file system that cannot punch holes is not an error.
    pub fn trim(&self, offset: u64, length: u64) -> io::Result<()> {
        match fallocate(&self.file, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, length) {
            Err(e) if unsupported(&e) => Ok(()),
            other => other,
        }
    }

    /// Makes a range read as zeroes.
    ///
    /// With `may_punch` the range may become a hole; otherwise it stays allocated. With
    /// `fast_only` the call fails with `ENOTSUP` instead of falling back to writing zeroes.
    pub fn write_zeroes(&self, offset: u64, length: u64, may_punch: bool, fast_only: bool) -> io::Result<()> {
        if may_punch {
            match fallocate(&self.file, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, length) {
                Err(e) if unsupported(&e) => {}
                other => return other,
            }
        }
        match fallocate(&self.file, libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, offset, length) {
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

    /// Hints the kernel to read a range into the page cache.
    pub fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        // SAFETY: plain syscall on a valid fd; no memory is passed.
        let rc = unsafe {
            libc::posix_fadvise(self.file.as_raw_fd(), offset as i64, length as i64, libc::POSIX_FADV_WILLNEED)
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(rc))
        }
    }

    /// Describes `[offset, offset + length)` as data and hole extents, at most `max` of them
    /// (the last one may then end before the range does).
    pub fn extents(&self, offset: u64, length: u64, max: usize) -> io::Result<Vec<Extent>> {
        let end = offset.saturating_add(length).min(self.size);
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < max {
            let data = match lseek(&self.file, pos, libc::SEEK_DATA) {
                Ok(d) => d,
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
                // No SEEK_DATA support (e.g. some block devices): everything is data.
                Err(e) if unsupported(&e) || e.raw_os_error() == Some(libc::EINVAL) => {
                    out.push(Extent { length: end - pos, hole: false });
                    break;
                }
                Err(e) => return Err(e),
            };
            let (next, hole) = if data > pos {
                (data.min(end), true)
            } else {
                let h = match lseek(&self.file, pos, libc::SEEK_HOLE) {
                    Ok(h) => h,
                    Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
                    Err(e) => return Err(e),
                };
                (h.min(end), false)
            };
            // The file may have changed between the two seeks; always make progress.
            let next = next.max(pos + 1);
            match out.last_mut() {
                Some(last) if last.hole == hole => last.length += next - pos,
                _ => out.push(Extent { length: next - pos, hole }),
            }
            pos = next;
        }
        Ok(out)
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::ENODEV))
}

fn lseek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<u64> {
    // SAFETY: plain syscall on a valid fd.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, length: u64) -> io::Result<()> {
    loop {
        // SAFETY: plain syscall on a valid fd.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as libc::off_t, length as libc::off_t) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `pwritev2(RWF_DSYNC)`: durable on return without flushing unrelated data; falls back to
/// write + fdatasync where the flag is unknown.
fn write_all_dsync(file: &File, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        let iov = libc::iovec { iov_base: buf.as_ptr() as *mut _, iov_len: buf.len() };
        // SAFETY: `iov` points into `buf`, which outlives the call; the kernel only reads it.
        let r = unsafe { libc::pwritev2(file.as_raw_fd(), &iov, 1, offset as libc::off_t, libc::RWF_DSYNC) };
        if r < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => {
                    file.write_all_at(buf, offset)?;
                    return file.sync_data();
                }
                _ => return Err(e),
            }
        }
        if r == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "pwritev2 wrote nothing"));
        }
        buf = &buf[r as usize..];
        offset += r as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(len: u64) -> (tempfile::TempDir, Image) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        File::create(&path).unwrap().set_len(len).unwrap();
        let img = Image::open(&path, false).unwrap();
        (dir, img)
    }

    #[test]
    fn write_read_zero_trim_and_extents() {
        let (_d, img) = image(1 << 20);
        assert_eq!(img.size(), 1 << 20);
        assert_eq!(img.extents(0, 1 << 20, 64).unwrap(), vec![Extent { length: 1 << 20, hole: true }]);
        img.write_at(&[0xaa; 8192], 65536, false).unwrap();
        img.write_at(&[0xbb; 4096], 131072, true).unwrap();
        let ext = img.extents(0, 1 << 20, 64).unwrap();
        assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), 1 << 20);
        assert_eq!(ext[0], Extent { length: 65536, hole: true });
        assert!(!ext[1].hole);
        let mut buf = vec![0; 4096];
        img.read_at(&mut buf, 131072).unwrap();
        assert!(buf.iter().all(|&b| b == 0xbb));
        img.write_zeroes(65536, 4096, false, false).unwrap();
        img.read_at(&mut buf, 65536).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        img.trim(131072, 4096).unwrap();
        img.read_at(&mut buf, 131072).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        img.flush().unwrap();
        // `max` caps the number of extents returned.
        assert_eq!(img.extents(0, 1 << 20, 1).unwrap().len(), 1);
    }
}
