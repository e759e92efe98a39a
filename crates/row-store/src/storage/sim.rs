//! A file system in memory that can lose power.
//!
//! Every file has a *live* content (what reads see, like the page cache) and a *durable* one
//! (what the disk holds). Writes, hole punches, zeroing and size changes change the live content
//! and queue up; `sync_data`/`sync_all` applies the queue to the durable content. Directory
//! entries (create, rename, delete) are live until `sync_parent` makes those of the directory
//! durable.
//!
//! [`SimStorage::power_cut`] throws the live state away: each file keeps its durable content
//! plus a random subset of its queued changes (writes split at 4 KiB pages, so a page is either
//! written or not), and the directories keep their durable entries. [`SimStorage::fail_syncs`]
//! makes the next syncs fail with `EIO` and, as Linux does after a failed writeback, forget the
//! changes they covered: they stay visible (in the "page cache") but never reach the disk.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{BlockFile, Extent, OpenMode, Storage};

const PAGE: u64 = 4096;

#[derive(Debug, Clone)]
enum Change {
    Write { offset: u64, data: Vec<u8> },
    Punch { offset: u64, len: u64 },
    Zero { offset: u64, len: u64 },
    SetLen(u64),
}

impl Change {
    /// The pages whose content it changes.
    fn pages(&self) -> Vec<u64> {
        match self {
            Change::Write { offset, data } if !data.is_empty() => {
                (offset / PAGE..=(offset + data.len() as u64 - 1) / PAGE).collect()
            }
            Change::Punch { offset, len } | Change::Zero { offset, len } if *len > 0 => {
                (offset / PAGE..=(offset + len - 1) / PAGE).collect()
            }
            // A truncation zeroes what lies beyond; extending adds holes, which change no content.
            Change::SetLen(len) => vec![len / PAGE],
            _ => Vec::new(),
        }
    }

    /// The change as it affects one page, in that page's coordinates (0..PAGE).
    fn clip(&self, page: u64) -> Change {
        let (start, end) = (page * PAGE, (page + 1) * PAGE);
        let cut = |offset: u64, len: u64| {
            let (s, e) = (offset.max(start), (offset + len).min(end));
            (s - start, e.saturating_sub(s))
        };
        match self {
            Change::Write { offset, data } => {
                let (s, n) = cut(*offset, data.len() as u64);
                let from = (start + s - offset) as usize;
                Change::Write { offset: s, data: data[from..from + n as usize].to_vec() }
            }
            Change::Punch { offset, len } => {
                let (s, n) = cut(*offset, *len);
                Change::Punch { offset: s, len: n }
            }
            Change::Zero { offset, len } => {
                let (s, n) = cut(*offset, *len);
                Change::Zero { offset: s, len: n }
            }
            Change::SetLen(len) => Change::Zero { offset: len.saturating_sub(start).min(PAGE), len: PAGE },
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Content {
    bytes: Vec<u8>,
    /// Allocated pages (for extents and allocated bytes).
    pages: BTreeSet<u64>,
}

impl Content {
    /// One page of it (zero-padded past the end), as a content of its own.
    fn page(&self, page: u64) -> Content {
        let start = (page * PAGE) as usize;
        let mut bytes = vec![0u8; PAGE as usize];
        if start < self.bytes.len() {
            let n = (self.bytes.len() - start).min(PAGE as usize);
            bytes[..n].copy_from_slice(&self.bytes[start..start + n]);
        }
        let pages = if self.pages.contains(&page) { BTreeSet::from([0]) } else { BTreeSet::new() };
        Content { bytes, pages }
    }

    /// Puts a page's content back (what lies within `len`).
    fn set_page(&mut self, page: u64, content: &Content, len: u64) {
        let start = page * PAGE;
        if start >= len {
            return;
        }
        let n = (len - start).min(PAGE) as usize;
        self.bytes[start as usize..start as usize + n].copy_from_slice(&content.bytes[..n]);
        if content.pages.contains(&0) {
            self.pages.insert(page);
        } else {
            self.pages.remove(&page);
        }
    }

    fn apply(&mut self, change: &Change) {
        match change {
            Change::Write { offset, data } => {
                let end = *offset as usize + data.len();
                if self.bytes.len() < end {
                    self.bytes.resize(end, 0);
                }
                self.bytes[*offset as usize..end].copy_from_slice(data);
                if !data.is_empty() {
                    self.pages.extend(offset / PAGE..=(end as u64 - 1) / PAGE);
                }
            }
            Change::Punch { offset, len } | Change::Zero { offset, len } => {
                let end = (offset + len).min(self.bytes.len() as u64);
                if *offset < end {
                    self.bytes[*offset as usize..end as usize].fill(0);
                }
                if let Change::Punch { .. } = change {
                    // Only whole pages are deallocated, as file systems do.
                    for p in offset.div_ceil(PAGE)..(offset + len) / PAGE {
                        self.pages.remove(&p);
                    }
                } else if *len > 0 {
                    self.pages.extend(offset / PAGE..=(offset + len - 1) / PAGE);
                }
            }
            Change::SetLen(len) => {
                self.bytes.resize(*len as usize, 0);
                self.pages.retain(|p| p * PAGE < *len);
            }
        }
    }
}

#[derive(Debug, Default)]
struct Inode {
    live: Content,
    durable: Content,
    queued: Vec<Change>,
}

#[derive(Debug, Default)]
struct Fs {
    inodes: HashMap<u64, Inode>,
    names: BTreeMap<PathBuf, u64>,
    durable_names: BTreeMap<PathBuf, u64>,
    next_inode: u64,
    /// Bumped by every power cut: handles opened before one are dead.
    boot: u64,
    rng: u64,
    failing_syncs: u32,
    /// Syncs that succeed before the failing ones start.
    syncs_before_failing: u32,
    syncs: u64,
}

impl Fs {
    fn random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The simulated file system; clones share it.
#[derive(Debug, Clone, Default)]
pub struct SimStorage {
    fs: Arc<Mutex<Fs>>,
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{}: no such file", path.display()))
}

fn parent(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}

impl SimStorage {
    /// An empty file system whose power cuts are chosen by `seed`.
    pub fn new(seed: u64) -> Self {
        let s = Self::default();
        s.lock().rng = seed;
        s
    }

    fn lock(&self) -> MutexGuard<'_, Fs> {
        self.fs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates a file of `len` zero bytes (a hole), durable at once.
    pub fn create_durable(&self, path: &Path, len: u64) {
        let mut fs = self.lock();
        let ino = fs.next_inode;
        fs.next_inode += 1;
        let content = Content { bytes: vec![0; len as usize], pages: BTreeSet::new() };
        fs.inodes.insert(ino, Inode { live: content.clone(), durable: content, queued: Vec::new() });
        fs.names.insert(path.to_owned(), ino);
        fs.durable_names.insert(path.to_owned(), ino);
    }

    /// The live content of a file (what a reader sees now).
    pub fn contents(&self, path: &Path) -> io::Result<Vec<u8>> {
        let fs = self.lock();
        let ino = fs.names.get(path).ok_or_else(|| not_found(path))?;
        Ok(fs.inodes[ino].live.bytes.clone())
    }

    /// Loses power: every file keeps its durable content plus, page by page, the changes queued
    /// for that page up to a random point (a page is written back whole, with its content at
    /// some moment since the last sync); its size likewise. Directories keep their durable
    /// entries. Open files die.
    pub fn power_cut(&self) {
        let mut fs = self.lock();
        fs.boot += 1;
        fs.names = fs.durable_names.clone();
        let live: BTreeSet<u64> = fs.names.values().copied().collect();
        fs.inodes.retain(|ino, _| live.contains(ino));
        let inos: Vec<u64> = fs.inodes.keys().copied().collect();
        for ino in inos {
            let queued = std::mem::take(&mut fs.inodes.get_mut(&ino).expect("inode").queued);
            let old = fs.inodes[&ino].durable.clone();
            // The size after a random prefix of the changes.
            let mut lens = vec![old.bytes.len() as u64];
            let mut scratch = old.clone();
            for c in &queued {
                scratch.apply(c);
                lens.push(scratch.bytes.len() as u64);
            }
            let len = lens[(fs.random() % lens.len() as u64) as usize];
            // Each page: its content after a random prefix of the changes that touch it.
            let mut touching: BTreeMap<u64, Vec<&Change>> = BTreeMap::new();
            for c in &queued {
                for p in c.pages() {
                    touching.entry(p).or_default().push(c);
                }
            }
            let mut new = old.clone();
            new.bytes.resize(len as usize, 0);
            new.pages.retain(|p| p * PAGE < len);
            for (page, changes) in touching {
                let keep = (fs.random() % (changes.len() as u64 + 1)) as usize;
                let mut content = old.page(page);
                for c in &changes[..keep] {
                    content.apply(&c.clip(page));
                }
                new.set_page(page, &content, len);
            }
            let inode = fs.inodes.get_mut(&ino).expect("inode");
            inode.durable = new;
            inode.live = inode.durable.clone();
        }
    }

    /// Makes the next `n` syncs fail with `EIO`; the changes they covered never reach the disk.
    pub fn fail_syncs(&self, n: u32) {
        self.fail_syncs_after(0, n);
    }

    /// Lets `skip` syncs succeed, then makes `n` fail.
    pub fn fail_syncs_after(&self, skip: u32, n: u32) {
        let mut fs = self.lock();
        fs.syncs_before_failing = skip;
        fs.failing_syncs = n;
    }

    /// How many syncs have been attempted (for tests that fail "the k-th sync").
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }
}

impl Storage for SimStorage {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn BlockFile>> {
        let mut fs = self.lock();
        let ino = match (fs.names.get(path).copied(), mode) {
            (Some(ino), OpenMode::Create) => {
                let inode = fs.inodes.get_mut(&ino).expect("named inode exists");
                let c = Change::SetLen(0);
                inode.live.apply(&c);
                inode.queued.push(c);
                ino
            }
            (Some(_), OpenMode::CreateNew) => {
                return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} exists", path.display())))
            }
            (Some(ino), _) => ino,
            (None, OpenMode::Create | OpenMode::CreateNew) => {
                let ino = fs.next_inode;
                fs.next_inode += 1;
                fs.inodes.insert(ino, Inode::default());
                fs.names.insert(path.to_owned(), ino);
                ino
            }
            (None, _) => return Err(not_found(path)),
        };
        let boot = fs.boot;
        Ok(Box::new(SimFile {
            storage: self.clone(),
            ino,
            boot,
            writable: mode != OpenMode::ReadOnly,
            path: path.to_owned(),
        }))
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        Ok(self.lock().names.contains_key(path))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        self.lock().names.remove(path).map(|_| ()).ok_or_else(|| not_found(path))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut fs = self.lock();
        let ino = fs.names.remove(from).ok_or_else(|| not_found(from))?;
        fs.names.insert(to.to_owned(), ino);
        Ok(())
    }

    fn sync_parent(&self, path: &Path) -> io::Result<()> {
        let mut fs = self.lock();
        let dir = parent(path);
        fs.durable_names.retain(|p, _| parent(p) != dir);
        let entries: Vec<(PathBuf, u64)> =
            fs.names.iter().filter(|(p, _)| parent(p) == dir).map(|(p, i)| (p.clone(), *i)).collect();
        fs.durable_names.extend(entries);
        Ok(())
    }
}

/// An open simulated file.
#[derive(Debug)]
struct SimFile {
    storage: SimStorage,
    ino: u64,
    boot: u64,
    writable: bool,
    path: PathBuf,
}

impl SimFile {
    fn with<T>(&self, f: impl FnOnce(&mut Fs, u64) -> io::Result<T>) -> io::Result<T> {
        let mut fs = self.storage.lock();
        if fs.boot != self.boot || !fs.inodes.contains_key(&self.ino) {
            return Err(io::Error::other(format!("{}: the file died in a power cut", self.path.display())));
        }
        f(&mut fs, self.ino)
    }

    fn change(&self, change: Change) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        self.with(|fs, ino| {
            let inode = fs.inodes.get_mut(&ino).expect("checked");
            inode.live.apply(&change);
            inode.queued.push(change);
            Ok(())
        })
    }
}

impl BlockFile for SimFile {
    fn size(&self) -> io::Result<u64> {
        self.with(|fs, ino| Ok(fs.inodes[&ino].live.bytes.len() as u64))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.change(Change::SetLen(len))
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.with(|fs, ino| {
            let bytes = &fs.inodes[&ino].live.bytes;
            let end = offset as usize + buf.len();
            if end > bytes.len() {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end of the file"));
            }
            buf.copy_from_slice(&bytes[offset as usize..end]);
            Ok(())
        })
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.change(Change::Write { offset, data: buf.to_vec() })
    }

    fn sync_data(&self) -> io::Result<()> {
        self.with(|fs, ino| {
            fs.syncs += 1;
            let queued = std::mem::take(&mut fs.inodes.get_mut(&ino).expect("checked").queued);
            if fs.failing_syncs > 0 && fs.syncs_before_failing > 0 {
                fs.syncs_before_failing -= 1;
            } else if fs.failing_syncs > 0 {
                fs.failing_syncs -= 1;
                // Like Linux after a writeback error: the pages count as clean, their data is
                // never written.
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            let inode = fs.inodes.get_mut(&ino).expect("checked");
            for c in &queued {
                inode.durable.apply(c);
            }
            Ok(())
        })
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.change(Change::Punch { offset, len })
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.change(Change::Zero { offset, len })
    }

    fn extents(&self, offset: u64, len: u64, max: usize) -> io::Result<Vec<Extent>> {
        self.with(|fs, ino| {
            let content = &fs.inodes[&ino].live;
            let end = offset.saturating_add(len).min(content.bytes.len() as u64);
            let mut out: Vec<Extent> = Vec::new();
            let mut pos = offset;
            while pos < end && out.len() < max {
                let hole = !content.pages.contains(&(pos / PAGE));
                let next = ((pos / PAGE + 1) * PAGE).min(end);
                match out.last_mut() {
                    Some(last) if last.hole == hole => last.length += next - pos,
                    _ => out.push(Extent { length: next - pos, hole }),
                }
                pos = next;
            }
            Ok(out)
        })
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        self.with(|fs, ino| Ok(fs.inodes[&ino].live.pages.len() as u64 * PAGE))
    }

    fn drop_cache(&self) -> io::Result<()> {
        // What reads see becomes the disk's content plus the changes still queued for it:
        // changes a failed sync covered are gone for good.
        self.with(|fs, ino| {
            let inode = fs.inodes.get_mut(&ino).expect("checked");
            let mut live = inode.durable.clone();
            for c in &inode.queued {
                live.apply(c);
            }
            inode.live = live;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synced_data_survives_and_unsynced_data_may_not() {
        let s = SimStorage::new(7);
        let p = Path::new("/d/f");
        let f = s.open(p, OpenMode::Create).unwrap();
        s.sync_parent(p).unwrap();
        f.write_all_at(&[1; 4096], 0).unwrap();
        f.sync_data().unwrap();
        f.write_all_at(&[2; 8192], 0).unwrap();
        drop(f);
        s.power_cut();
        let c = s.contents(p).unwrap();
        // Each page is either the synced 1s or the unsynced 2s, never a mix within the page.
        assert!(c[..4096].iter().all(|&b| b == 1) || c[..4096].iter().all(|&b| b == 2));
        assert!(c.len() == 4096 || c.len() == 8192);
    }

    #[test]
    fn an_entry_needs_its_directory_synced() {
        let s = SimStorage::new(1);
        let f = s.open(Path::new("/d/a"), OpenMode::Create).unwrap();
        f.write_all_at(b"x", 0).unwrap();
        f.sync_all().unwrap();
        drop(f);
        s.power_cut();
        assert!(!s.exists(Path::new("/d/a")).unwrap());
        let f = s.open(Path::new("/d/a"), OpenMode::Create).unwrap();
        f.sync_all().unwrap();
        s.sync_parent(Path::new("/d/a")).unwrap();
        s.rename(Path::new("/d/a"), Path::new("/d/b")).unwrap();
        s.power_cut();
        assert!(s.exists(Path::new("/d/a")).unwrap() && !s.exists(Path::new("/d/b")).unwrap());
    }

    #[test]
    fn a_failed_sync_loses_what_it_covered_even_if_a_later_one_succeeds() {
        let s = SimStorage::new(3);
        let p = Path::new("/f");
        s.create_durable(p, 4096);
        let f = s.open(p, OpenMode::ReadWrite).unwrap();
        f.write_all_at(&[9; 4096], 0).unwrap();
        s.fail_syncs(1);
        assert_eq!(f.sync_data().unwrap_err().raw_os_error(), Some(libc::EIO));
        f.sync_data().unwrap();
        let mut buf = [0u8; 4096];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf[0], 9, "still in the page cache");
        drop(f);
        s.power_cut();
        assert_eq!(s.contents(p).unwrap(), vec![0; 4096], "but never on the disk");
    }

    #[test]
    fn dropping_the_cache_forgets_what_a_failed_sync_lost() {
        let s = SimStorage::new(3);
        let p = Path::new("/f");
        s.create_durable(p, 8192);
        let f = s.open(p, OpenMode::ReadWrite).unwrap();
        f.write_all_at(&[9; 4096], 0).unwrap();
        s.fail_syncs(1);
        f.sync_data().unwrap_err();
        f.write_all_at(&[7; 4096], 4096).unwrap();
        f.drop_cache().unwrap();
        let mut buf = [0u8; 8192];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!((buf[0], buf[4096]), (0, 7), "the lost write is gone, the queued one stays");
    }

    #[test]
    fn holes_and_extents() {
        let s = SimStorage::new(0);
        let p = Path::new("/f");
        s.create_durable(p, 5 * PAGE);
        let f = s.open(p, OpenMode::ReadWrite).unwrap();
        f.write_all_at(&[1; 8192], PAGE).unwrap();
        assert_eq!(
            f.extents(0, 5 * PAGE, 10).unwrap(),
            vec![
                Extent { length: PAGE, hole: true },
                Extent { length: 2 * PAGE, hole: false },
                Extent { length: 2 * PAGE, hole: true }
            ]
        );
        f.punch_hole(PAGE, PAGE).unwrap();
        assert_eq!(f.allocated_bytes().unwrap(), PAGE);
        let mut b = [1u8; 4];
        f.read_exact_at(&mut b, PAGE).unwrap();
        assert_eq!(b, [0; 4]);
    }
}
