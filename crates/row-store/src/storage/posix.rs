//! Real files: `pread`/`pwrite`, `pwritev2(RWF_DSYNC)`, `fallocate`, `SEEK_DATA`/`SEEK_HOLE`,
//! `fdatasync`, and QEMU's byte-range image locks.
//!
//! # Locks
//! QEMU's raw driver (`block/file-posix.c`) takes open-file-description locks on single bytes:
//! byte `100 + i` (shared) for each permission *i* it uses, byte `200 + i` (shared) for each it
//! does not let others use, and before using a permission it checks that nobody holds the
//! matching byte of the other range. Permissions are CONSISTENT_READ (0), WRITE (1),
//! WRITE_UNCHANGED (2), RESIZE (3). Taking the same bytes makes `qemu-io`, `qemu-img`,
//! `qemu-nbd`, another QEMU and a second server refuse an image we serve ("Failed to get
//! "write" lock"), and makes us refuse one they hold.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{BlockFile, Extent, LockMode, OpenMode, Storage};

/// The local file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct Posix;

impl Storage for Posix {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn BlockFile>> {
        let mut o = OpenOptions::new();
        o.read(true).custom_flags(libc::O_CLOEXEC);
        match mode {
            OpenMode::ReadOnly => {}
            OpenMode::ReadWrite => {
                o.write(true);
            }
            OpenMode::Create => {
                o.write(true).create(true).truncate(true).mode(0o600);
            }
            OpenMode::CreateNew => {
                o.write(true).create_new(true).mode(0o600);
            }
        }
        let file = o.open(path)?;
        Ok(Box::new(PosixFile { file, path: path.to_owned() }))
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        match std::fs::symlink_metadata(path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn sync_parent(&self, path: &Path) -> io::Result<()> {
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        File::open(parent)?.sync_all()
    }
}

/// An open file.
#[derive(Debug)]
pub struct PosixFile {
    file: File,
    path: PathBuf,
}

impl PosixFile {
    fn fd(&self) -> libc::c_int {
        self.file.as_raw_fd()
    }
}

fn cvt(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn lseek(fd: libc::c_int, offset: u64, whence: libc::c_int) -> io::Result<u64> {
    // SAFETY: plain syscall on a valid fd.
    cvt(unsafe { libc::lseek(fd, offset as libc::off_t, whence) }).map(|r| r as u64)
}

fn fallocate(fd: libc::c_int, mode: libc::c_int, offset: u64, length: u64) -> io::Result<()> {
    loop {
        // SAFETY: plain syscall on a valid fd.
        let r = unsafe { libc::fallocate(fd, mode, offset as libc::off_t, length as libc::off_t) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `Unsupported` for the errnos that mean "this file system cannot do that".
fn map_unsupported(e: io::Error) -> io::Error {
    if super::unsupported(&e) {
        io::Error::new(io::ErrorKind::Unsupported, e)
    } else {
        e
    }
}

impl BlockFile for PosixFile {
    fn size(&self) -> io::Result<u64> {
        // `metadata().len()` is 0 for block devices; seeking to the end works for both.
        lseek(self.fd(), 0, libc::SEEK_END)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn read_append(&self, out: &mut Vec<u8>, len: usize, offset: u64) -> io::Result<()> {
        // Straight into the spare capacity: zero-filling first costs measurably at GB/s.
        out.reserve(len);
        let mut done = 0usize;
        while done < len {
            let spare = out.spare_capacity_mut();
            // SAFETY: the kernel writes at most `len - done` bytes into the spare capacity, which
            // `reserve` made at least that large; only the bytes it reports written are exposed.
            let n = unsafe {
                libc::pread(self.fd(), spare.as_mut_ptr().cast(), len - done, (offset + done as u64) as libc::off_t)
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

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn write_all_at_durable(&self, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
        // pwritev2(RWF_DSYNC): durable on return without flushing unrelated data; falls back to
        // write + fdatasync where the flag is unknown.
        while !buf.is_empty() {
            let iov = libc::iovec { iov_base: buf.as_ptr() as *mut _, iov_len: buf.len() };
            // SAFETY: `iov` points into `buf`, which outlives the call; the kernel only reads it.
            let r = unsafe { libc::pwritev2(self.fd(), &iov, 1, offset as libc::off_t, libc::RWF_DSYNC) };
            if r < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => {
                        self.file.write_all_at(buf, offset)?;
                        return self.file.sync_data();
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

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn sync_all(&self) -> io::Result<()> {
        self.file.sync_all()
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        fallocate(self.fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len)
            .map_err(map_unsupported)
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        fallocate(self.fd(), libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, offset, len)
            .map_err(map_unsupported)
    }

    fn extents(&self, offset: u64, length: u64, max: usize) -> io::Result<Vec<Extent>> {
        let end = offset.saturating_add(length).min(self.size()?);
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < max {
            let data = match lseek(self.fd(), pos, libc::SEEK_DATA) {
                Ok(d) => d,
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
                // No SEEK_DATA support (e.g. some block devices): everything is data.
                Err(e) if super::unsupported(&e) || e.raw_os_error() == Some(libc::EINVAL) => {
                    out.push(Extent { length: end - pos, hole: false });
                    break;
                }
                Err(e) => return Err(e),
            };
            let (next, hole) = if data > pos {
                (data.min(end), true)
            } else {
                let h = match lseek(self.fd(), pos, libc::SEEK_HOLE) {
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

    fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.blocks() * 512)
    }

    fn will_need(&self, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: plain syscall on a valid fd; no memory is passed.
        let rc = unsafe { libc::posix_fadvise(self.fd(), offset as i64, len as i64, libc::POSIX_FADV_WILLNEED) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(rc))
        }
    }

    fn drop_cache(&self) -> io::Result<()> {
        // SAFETY: plain syscall on a valid fd; no memory is passed.
        let rc = unsafe { libc::posix_fadvise(self.fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(rc))
        }
    }

    fn lock(&self, mode: LockMode) -> io::Result<()> {
        lock_like_qemu(self.fd(), &self.path, mode)
    }
}

/// QEMU's lock byte ranges (`RAW_LOCK_PERM_BASE`, `RAW_LOCK_SHARED_BASE`).
const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
/// QEMU's permission bits, by index: CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE.
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
const READ: u32 = 1 << 0;
const WRITE: u32 = 1 << 1;
const WRITE_UNCHANGED: u32 = 1 << 2;
const ALL: u32 = 0b1111;

fn ofd(fd: libc::c_int, cmd: libc::c_int, kind: libc::c_short, byte: i64) -> io::Result<libc::flock> {
    // SAFETY: an all-zero flock is valid; the fields that matter are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    // SAFETY: fcntl with a pointer to a live flock on a valid fd.
    if unsafe { libc::fcntl(fd, cmd, &mut fl) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl)
}

fn held_by_another(fd: libc::c_int, byte: i64) -> io::Result<bool> {
    Ok(ofd(fd, libc::F_OFD_GETLK, libc::F_WRLCK as libc::c_short, byte)?.l_type != libc::F_UNLCK as libc::c_short)
}

fn lock_like_qemu(fd: libc::c_int, path: &Path, mode: LockMode) -> io::Result<()> {
    let (perm, shared) = match mode {
        LockMode::Writer => (READ | WRITE | WRITE_UNCHANGED, READ | WRITE_UNCHANGED),
        LockMode::Reader => (READ, READ | WRITE_UNCHANGED),
    };
    let result = (|| {
        for i in 0..4 {
            if perm & (1 << i) != 0 {
                ofd(fd, libc::F_OFD_SETLK, libc::F_RDLCK as libc::c_short, PERM_BASE + i)?;
            }
            if (ALL & !shared) & (1 << i) != 0 {
                ofd(fd, libc::F_OFD_SETLK, libc::F_RDLCK as libc::c_short, SHARED_BASE + i)?;
            }
        }
        for i in 0..4 {
            if perm & (1 << i) != 0 && held_by_another(fd, SHARED_BASE + i)? {
                return Err(conflict(path, &format!("another process does not let others {}", PERM_NAMES[i as usize])));
            }
            if shared & (1 << i) == 0 && held_by_another(fd, PERM_BASE + i)? {
                return Err(conflict(
                    path,
                    &format!("another process holds the {:?} permission", PERM_NAMES[i as usize]),
                ));
            }
        }
        Ok(())
    })();
    match result {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOTSUP) | Some(libc::ENOLCK)) => {
            tracing::warn!(path = %path.display(), error = %e, "this file system cannot lock the image; nothing stops another program from using it");
            Ok(())
        }
        // A conflicting shared lock on a byte we set makes F_OFD_SETLK fail with EAGAIN.
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
            Err(conflict(path, "another process holds a conflicting lock"))
        }
        other => other,
    }
}

fn conflict(path: &Path, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::WouldBlock,
        format!("{} is in use: {why} (QEMU, qemu-img, qemu-nbd or another nbd-row-proxy has it open)", path.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(len: u64) -> (tempfile::TempDir, PathBuf, Box<dyn BlockFile>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        File::create(&path).unwrap().set_len(len).unwrap();
        let f = Posix.open(&path, OpenMode::ReadWrite).unwrap();
        (dir, path, f)
    }

    #[test]
    fn write_read_zero_punch_and_extents() {
        let (_d, _p, f) = file(1 << 20);
        assert_eq!(f.size().unwrap(), 1 << 20);
        assert_eq!(f.extents(0, 1 << 20, 64).unwrap(), vec![Extent { length: 1 << 20, hole: true }]);
        f.write_all_at(&[0xaa; 8192], 65536).unwrap();
        f.write_all_at_durable(&[0xbb; 4096], 131072).unwrap();
        let ext = f.extents(0, 1 << 20, 64).unwrap();
        assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), 1 << 20);
        assert_eq!(ext[0], Extent { length: 65536, hole: true });
        assert!(!ext[1].hole);
        let mut buf = Vec::new();
        f.read_append(&mut buf, 4096, 131072).unwrap();
        assert!(buf.iter().all(|&b| b == 0xbb));
        f.zero_range(65536, 4096).unwrap();
        f.punch_hole(131072, 4096).unwrap();
        let mut buf = vec![1u8; 4096];
        f.read_exact_at(&mut buf, 65536).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        f.read_exact_at(&mut buf, 131072).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        f.sync_data().unwrap();
        assert_eq!(f.extents(0, 1 << 20, 1).unwrap().len(), 1);
    }

    #[test]
    fn a_second_writer_or_reader_is_refused_but_readers_share() {
        let (_d, path, f) = file(1 << 20);
        f.lock(LockMode::Writer).unwrap();
        for mode in [LockMode::Writer, LockMode::Reader] {
            let g = Posix.open(&path, OpenMode::ReadWrite).unwrap();
            let e = g.lock(mode).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
            assert!(e.to_string().contains("in use"), "{e}");
        }
        drop(f);
        // Closing the writer's file releases its locks; readers then share.
        let r1 = Posix.open(&path, OpenMode::ReadOnly).unwrap();
        let r2 = Posix.open(&path, OpenMode::ReadOnly).unwrap();
        r1.lock(LockMode::Reader).unwrap();
        r2.lock(LockMode::Reader).unwrap();
        let w = Posix.open(&path, OpenMode::ReadWrite).unwrap();
        assert!(w.lock(LockMode::Writer).is_err());
    }

    #[test]
    fn replace_is_atomic_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        Posix.replace(&path, b"one").unwrap();
        Posix.replace(&path, b"two").unwrap();
        assert_eq!(Posix.read(&path).unwrap(), b"two");
        assert!(!super::super::suffixed(&path, ".tmp").exists());
    }
}
