//! Where a disk's durable state lives: one entry (a directory) per disk under the state
//! directory (`--state-dir`, default [`DEFAULT_STATE_DIR`]), found by the disk's identity, not
//! by its path.
//!
//! Why not beside the image: a block device's neighbours are in `/dev`, which is RAM (the fence
//! and the overlay were gone after a reboot); a path plus a suffix lets a symlink or hard link
//! bypass the fence, lets a new image at an old path inherit old state, and lets a typo point one
//! disk at another's files.
//!
//! The identity ([`DiskId`]): `--disk-id` when given; for a regular file a random id kept in the
//! file's extended attribute [`XATTR`] (it follows the inode through renames and links; a new
//! file at an old path has none); for a device-mapper volume (LVM) its dm uuid; for a loop device
//! its backing file's id; for other block devices their WWID or serial. The entry's record
//! ([`Binding`]) says what the id was bound to (inode or device, size), so a copy of an image
//! (which keeps the attribute) or a disk of another size is refused, never adopted.
//!
//! State beside an image from releases before the state directory (`IMAGE.row`,
//! `IMAGE.row.map`, `IMAGE.ownership`, `IMAGE.residual`) is moved into the entry once, with a log
//! line, while the image is locked.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use row_store::storage::{suffixed, LockMode, OpenMode, Posix, Storage};

mod identity;

use identity::identify;
pub use identity::{DiskId, XATTR_TRUSTED};

/// The state directory when `--state-dir` is not given (the systemd unit's `StateDirectory=`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/nbd-row-proxy";
/// The extended attribute that carries a regular file's disk id.
pub const XATTR: &str = "user.nbd-row-proxy.disk-id";
/// The entry's record of what its id is bound to.
const RECORD: &str = "disk";
const RECORD_MAGIC: &str = "nbd-row-proxy disk 1";

/// Why a disk's state cannot be found or used. Nothing is served then.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A `--disk-id` that cannot name an entry.
    #[error("--disk-id {0:?} is not a disk id: use 1 to 128 letters, digits, '.', '_' or '-', not starting with '.'")]
    BadId(String),
    /// A block device with no identifier that survives a reboot.
    #[error(
        "{}: cannot identify this block device across reboots ({why}); give it a --disk-id (e.g. the VM's \
         disk serial), so its state is found again",
        image.display()
    )]
    Unidentified {
        /// The device.
        image: PathBuf,
        /// What was missing.
        why: String,
    },
    /// A regular file that cannot carry its id.
    #[error(
        "cannot record a disk id on {} (extended attribute {XATTR}); give it a --disk-id instead",
        image.display()
    )]
    Tag {
        /// The image.
        image: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The id's entry belongs to another file or device.
    #[error(
        "{} is disk {id}, but the state of disk {id} ({}) was recorded for {recorded}: {hint}",
        image.display(),
        entry.display()
    )]
    Mismatch {
        /// The image.
        image: PathBuf,
        /// Its id.
        id: DiskId,
        /// The entry.
        entry: PathBuf,
        /// What the entry was bound to.
        recorded: String,
        /// What to do.
        hint: &'static str,
    },
    /// The entry's record cannot be read as one of ours.
    #[error("{} is damaged ({why}); nothing is served until it is restored or the entry moved away", path.display())]
    Damaged {
        /// The record.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Old state beside the image and state in the entry at once.
    #[error(
        "{} and {} both exist: the state of this disk is in two places; keep the one that belongs to it and move the \
         other away",
        old.display(),
        new.display()
    )]
    Twice {
        /// The file beside the image.
        old: PathBuf,
        /// The file in the entry.
        new: PathBuf,
    },
    /// A file system operation failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StateError + 'a {
    move |source| StateError::Io { what, path: path.to_owned(), source }
}

/// What an entry's id is bound to, as recorded in the entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The id.
    pub id: DiskId,
    /// `file` or `block`.
    pub kind: &'static str,
    /// A file's inode number (0 for block devices).
    pub inode: u64,
    /// The disk's size in bytes.
    pub size: u64,
    /// Where the disk was last seen.
    pub path: PathBuf,
}

impl Binding {
    /// The record's bytes: readable lines, the last one a CRC-32 of the others.
    fn encode(&self) -> Vec<u8> {
        let body = format!(
            "{RECORD_MAGIC}\nid={}\nkind={}\ninode={}\nsize={}\npath={}\n",
            self.id,
            self.kind,
            self.inode,
            self.size,
            self.path.display()
        );
        let crc = crc32fast::hash(body.as_bytes());
        format!("{body}crc32={crc:08x}\n").into_bytes()
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "not text".to_string())?;
        let (body, crc_line) = text.trim_end_matches('\n').rsplit_once('\n').ok_or_else(|| "too short".to_string())?;
        let body = format!("{body}\n");
        let crc = crc_line.strip_prefix("crc32=").ok_or("no checksum line")?;
        if u32::from_str_radix(crc, 16).ok() != Some(crc32fast::hash(body.as_bytes())) {
            return Err("checksum mismatch".into());
        }
        let mut lines = body.lines();
        if lines.next() != Some(RECORD_MAGIC) {
            return Err("not a disk record of nbd-row-proxy".into());
        }
        let mut field = |name: &str| {
            lines
                .next()
                .and_then(|l| l.strip_prefix(name)?.strip_prefix('='))
                .map(str::to_string)
                .ok_or_else(|| format!("no {name} line"))
        };
        let id = DiskId::parse(&field("id")?).map_err(|e| e.to_string())?;
        let kind = match field("kind")?.as_str() {
            "file" => "file",
            "block" => "block",
            other => return Err(format!("unknown kind {other:?}")),
        };
        let inode = field("inode")?.parse().map_err(|_| "bad inode")?;
        let size = field("size")?.parse().map_err(|_| "bad size")?;
        let path = PathBuf::from(field("path")?);
        Ok(Self { id, kind, inode, size, path })
    }

    /// What it was bound to, for messages.
    fn describe(&self) -> String {
        match self.kind {
            "file" => format!(
                "another file (inode {}, {} bytes, last seen at {})",
                self.inode,
                self.size,
                self.path.display()
            ),
            _ => format!("a block device of {} bytes (last seen at {})", self.size, self.path.display()),
        }
    }
}

/// What to look for.
#[derive(Debug, Clone)]
pub struct Lookup<'a> {
    /// The state directory.
    pub state_dir: &'a Path,
    /// The image (file or block device).
    pub image: &'a Path,
    /// The operator's `--disk-id`.
    pub disk_id: Option<&'a str>,
    /// The operator's `--reserved` (the overlay then stays there, its journal beside it).
    pub reserved: Option<&'a Path>,
    /// The disk is served read-only.
    pub read_only: bool,
}

/// A disk's state entry: where its overlay, journal, ownership record and post-copy residual
/// are kept.
#[derive(Debug, Clone)]
pub struct StateEntry {
    dir: PathBuf,
    id: DiskId,
    reserved: PathBuf,
    new: bool,
}

impl StateEntry {
    /// Finds (or creates) the entry of the disk at `lookup.image`, binding it on first use and
    /// moving any state left beside the image by older releases into it. Blocking.
    pub fn locate(lookup: &Lookup<'_>) -> Result<Self, StateError> {
        let image = lookup.image;
        let meta = std::fs::metadata(image).map_err(io_err("looking at", image))?;
        let id = match lookup.disk_id {
            Some(s) => DiskId::parse(s)?,
            None => identify(image, &meta)?,
        };
        let size = disk_size(image, &meta)?;
        let kind = if meta.file_type().is_block_device() { "block" } else { "file" };
        let binding = Binding {
            id: id.clone(),
            kind,
            inode: if kind == "file" { meta.ino() } else { 0 },
            size,
            path: image.to_owned(),
        };
        let dir = lookup.state_dir.join(id.as_str());
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err("creating the state entry", &dir))?;
        let reserved = lookup.reserved.map(Path::to_owned).unwrap_or_else(|| dir.join("overlay"));
        let mut entry = Self { dir, id, reserved, new: false };
        entry.new = entry.bind(&binding)?;
        // Older state is moved only while the image is ours: a proxy of an older release still
        // serving it holds the lock (and its files open).
        let lock = Posix
            .open(image, if lookup.read_only { OpenMode::ReadOnly } else { OpenMode::ReadWrite })
            .and_then(|f| f.lock(if lookup.read_only { LockMode::Reader } else { LockMode::Writer }).map(|()| f));
        if lock.is_ok() {
            entry.adopt_old_state(image, lookup.reserved.is_some())?;
        }
        Ok(entry)
    }

    /// Checks the entry's record against `now` (writing it on first use, updating the path
    /// when the disk is seen under another one); true on first use.
    fn bind(&self, now: &Binding) -> Result<bool, StateError> {
        let path = self.dir.join(RECORD);
        let recorded = match std::fs::read(&path) {
            Ok(bytes) => Some(Binding::decode(&bytes).map_err(|why| StateError::Damaged { path: path.clone(), why })?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(StateError::Io { what: "reading", path, source: e }),
        };
        let mismatch = |hint| StateError::Mismatch {
            image: now.path.clone(),
            id: now.id.clone(),
            entry: self.dir.clone(),
            recorded: recorded.as_ref().map(Binding::describe).unwrap_or_default(),
            hint,
        };
        match &recorded {
            Some(r) if r.id != now.id => {
                return Err(StateError::Damaged { path, why: format!("it names disk {}, not {}", r.id, now.id) })
            }
            Some(r) if r.kind != now.kind || (r.kind == "file" && r.inode != now.inode) => {
                return Err(mismatch(
                    "a copy of an image keeps its disk id (remove the attribute with `setfattr -x \
                     user.nbd-row-proxy.disk-id IMAGE` to make it a new disk), and a --disk-id must name this disk's \
                     own state",
                ))
            }
            Some(r) if r.size != now.size => {
                return Err(mismatch(
                    "the disk changed size; the state of a disk is only valid for the disk it was recorded for",
                ))
            }
            Some(r) if r.path == now.path => return Ok(false),
            Some(r) => {
                tracing::info!(disk = %now.id, from = %r.path.display(), to = %now.path.display(), "disk seen under another path")
            }
            None => tracing::info!(disk = %now.id, entry = %self.dir.display(), "new state entry"),
        }
        Posix.replace(&path, &now.encode()).map_err(io_err("writing", &path))?;
        Ok(recorded.is_none())
    }

    /// Moves state files left beside `image` by older releases into the entry.
    fn adopt_old_state(&self, image: &Path, explicit_reserved: bool) -> Result<(), StateError> {
        let mut moves =
            vec![(suffixed(image, ".ownership"), self.ownership()), (suffixed(image, ".residual"), self.residual())];
        if !explicit_reserved {
            let old = suffixed(image, ".row");
            moves.push((suffixed(&old, ".map"), self.journal()));
            moves.push((old, self.reserved.clone()));
        }
        for (old, new) in moves {
            if !old.exists() {
                continue;
            }
            if !looks_like_ours(&old) {
                tracing::warn!(path = %old.display(), "a file beside the image has one of our old names but is not ours: left alone");
                continue;
            }
            if new.exists() {
                return Err(StateError::Twice { old, new });
            }
            move_file(&old, &new)?;
            tracing::info!(from = %old.display(), to = %new.display(), "moved state from beside the image into the state directory");
        }
        Ok(())
    }

    /// Whether the entry was made by this lookup (the disk's first use here).
    pub fn is_new(&self) -> bool {
        self.new
    }

    /// The entry's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The disk's id.
    pub fn id(&self) -> &DiskId {
        &self.id
    }

    /// The overlay's reserved file (its journal is [`Self::journal`]).
    pub fn reserved(&self) -> &Path {
        &self.reserved
    }

    /// The overlay's journal: the reserved file's path plus `.map` (row-store's rule).
    pub fn journal(&self) -> PathBuf {
        suffixed(&self.reserved, ".map")
    }

    /// The ownership record.
    pub fn ownership(&self) -> PathBuf {
        self.dir.join("ownership")
    }

    /// The post-copy residual log.
    pub fn residual(&self) -> PathBuf {
        self.dir.join("residual")
    }
}

/// A file's or block device's size.
fn disk_size(image: &Path, meta: &std::fs::Metadata) -> Result<u64, StateError> {
    if meta.is_file() {
        return Ok(meta.len());
    }
    Posix.open(image, OpenMode::ReadOnly).and_then(|f| f.size()).map_err(io_err("sizing", image))
}

/// Whether a file with one of our old state names carries one of our headers.
fn looks_like_ours(path: &Path) -> bool {
    use row_store::reserved::{inspect, Found};
    if matches!(inspect(&Posix, path), Ok(Found::Journal(_) | Found::Reserved { .. } | Found::Empty)) {
        return true;
    }
    // The first 64 bytes only: a file at one of those names may be a large overlay of another's.
    let mut head = Vec::with_capacity(64);
    let regular = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file());
    if let Some(f) = regular.then(|| std::fs::File::open(path).ok()).flatten() {
        use std::io::Read as _;
        let _ = f.take(64).read_to_end(&mut head);
    }
    head.starts_with(b"NBDROWRS") || (head.starts_with(b"{") && String::from_utf8_lossy(&head).contains("\"version\""))
}

/// Moves a file durably: a rename, or across file systems a synced copy renamed into place
/// before the original is removed.
fn move_file(from: &Path, to: &Path) -> Result<(), StateError> {
    match std::fs::rename(from, to) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let tmp = suffixed(to, ".tmp");
            std::fs::copy(from, &tmp).map_err(io_err("copying into", &tmp))?;
            std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io_err("syncing", &tmp))?;
            std::fs::rename(&tmp, to).map_err(io_err("renaming into", to))?;
            Posix.sync_parent(to).map_err(io_err("syncing the directory of", to))?;
            std::fs::remove_file(from).map_err(io_err("removing", from))?;
        }
        Err(e) => return Err(StateError::Io { what: "moving", path: from.to_owned(), source: e }),
    }
    Posix.sync_parent(to).map_err(io_err("syncing the directory of", to))?;
    Posix.sync_parent(from).map_err(io_err("syncing the directory of", from))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup<'a>(state: &'a Path, image: &'a Path) -> Lookup<'a> {
        Lookup { state_dir: state, image, disk_id: None, reserved: None, read_only: false }
    }

    fn image(dir: &Path, name: &str, size: u64) -> PathBuf {
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().set_len(size).unwrap();
        p
    }

    #[test]
    fn a_file_keeps_its_entry_through_links_and_renames() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        let img = image(d.path(), "disk.raw", 1 << 20);
        let first = StateEntry::locate(&lookup(&state, &img)).unwrap();
        std::fs::hard_link(&img, d.path().join("hard.raw")).unwrap();
        std::os::unix::fs::symlink(&img, d.path().join("sym.raw")).unwrap();
        for other in ["hard.raw", "sym.raw"] {
            let e = StateEntry::locate(&lookup(&state, &d.path().join(other))).unwrap();
            assert_eq!(e.id(), first.id(), "{other}");
        }
        std::fs::rename(&img, d.path().join("moved.raw")).unwrap();
        let e = StateEntry::locate(&lookup(&state, &d.path().join("moved.raw"))).unwrap();
        assert_eq!(e.dir(), first.dir());
        assert_eq!(e.reserved(), first.dir().join("overlay"));
        assert_eq!(e.journal(), first.dir().join("overlay.map"));
    }

    #[test]
    fn a_new_file_at_an_old_path_is_a_new_disk() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        let img = image(d.path(), "disk.raw", 1 << 20);
        let old = StateEntry::locate(&lookup(&state, &img)).unwrap();
        std::fs::remove_file(&img).unwrap();
        let img = image(d.path(), "disk.raw", 1 << 20);
        let new = StateEntry::locate(&lookup(&state, &img)).unwrap();
        assert_ne!(old.id(), new.id());
    }

    #[test]
    fn a_copy_that_keeps_the_attribute_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        let img = image(d.path(), "disk.raw", 1 << 20);
        let e = StateEntry::locate(&lookup(&state, &img)).unwrap();
        let copy = image(d.path(), "copy.raw", 1 << 20);
        xattr::set(&copy, XATTR, e.id().as_str().as_bytes()).unwrap();
        let err = StateEntry::locate(&lookup(&state, &copy)).unwrap_err();
        assert!(matches!(err, StateError::Mismatch { .. }), "{err}");
        assert!(err.to_string().contains("setfattr -x"), "{err}");
    }

    #[test]
    fn a_disk_id_typo_naming_another_disk_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        let (a, b) = (image(d.path(), "a.raw", 1 << 20), image(d.path(), "b.raw", 1 << 20));
        StateEntry::locate(&Lookup { disk_id: Some("vm1-root"), ..lookup(&state, &a) }).unwrap();
        let err = StateEntry::locate(&Lookup { disk_id: Some("vm1-root"), ..lookup(&state, &b) }).unwrap_err();
        assert!(matches!(err, StateError::Mismatch { .. }), "{err}");
        for bad in ["", ".hidden", "a/b", "../x", &"x".repeat(129)] {
            assert!(matches!(DiskId::parse(bad), Err(StateError::BadId(_))), "{bad:?}");
        }
    }

    #[test]
    fn a_disk_of_another_size_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        let img = image(d.path(), "disk.raw", 1 << 20);
        StateEntry::locate(&lookup(&state, &img)).unwrap();
        std::fs::OpenOptions::new().write(true).open(&img).unwrap().set_len(2 << 20).unwrap();
        let err = StateEntry::locate(&lookup(&state, &img)).unwrap_err();
        assert!(err.to_string().contains("changed size"), "{err}");
    }

    #[test]
    fn a_damaged_record_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        let img = image(d.path(), "disk.raw", 1 << 20);
        let e = StateEntry::locate(&lookup(&state, &img)).unwrap();
        let record = e.dir().join(RECORD);
        let mut bytes = std::fs::read(&record).unwrap();
        let at = bytes.iter().position(|&b| b == b'=').unwrap() + 1;
        bytes[at] ^= 1;
        std::fs::write(&record, &bytes).unwrap();
        let err = StateEntry::locate(&lookup(&state, &img)).unwrap_err();
        assert!(matches!(err, StateError::Damaged { .. }), "{err}");
        std::fs::write(&record, b"").unwrap();
        assert!(matches!(StateEntry::locate(&lookup(&state, &img)), Err(StateError::Damaged { .. })));
    }

    #[test]
    fn old_state_beside_the_image_moves_in_once() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        let img = image(d.path(), "disk.raw", 1 << 20);
        let ownership = suffixed(&img, ".ownership");
        std::fs::write(&ownership, b"{\n  \"version\": 1,\n  \"role\": \"source\"\n}\n").unwrap();
        let foreign = suffixed(&img, ".residual");
        std::fs::write(&foreign, b"someone else's file").unwrap();
        let e = StateEntry::locate(&lookup(&state, &img)).unwrap();
        assert!(!ownership.exists());
        assert!(std::fs::read(e.ownership()).unwrap().starts_with(b"{"));
        assert_eq!(std::fs::read(&foreign).unwrap(), b"someone else's file", "not ours: left alone");
        assert!(!e.residual().exists());
        std::fs::write(&ownership, b"{\n  \"version\": 1\n}\n").unwrap();
        let err = StateEntry::locate(&lookup(&state, &img)).unwrap_err();
        assert!(matches!(err, StateError::Twice { .. }), "{err}");
    }

    #[test]
    fn records_round_trip() {
        let b =
            Binding { id: DiskId::parse("abc").unwrap(), kind: "file", inode: 7, size: 4096, path: "/x/y z".into() };
        assert_eq!(Binding::decode(&b.encode()).unwrap(), b);
        assert_eq!(DiskId::from_system("dm-", "LVM-a b/c").unwrap().as_str(), "dm-LVM-a_b_c");
    }
}
