//! Who may write to the disk, enforced under every NBD write, and the ownership record that
//! makes it survive a restart.
//!
//! [`Gate`] holds the current [`Access`]: open; incoming (a destination waiting for its disk:
//! writes refused, reads wait); committed (a destination holding a committed disk: the first
//! write makes it the owner, durably, before it is done); or fenced (a source that handed its
//! disk over: writes refused, with the reason). Every write runs under the gate's shared lock,
//! so changing the access (exclusive) returns only once no write is in flight: a source that
//! fences its disk knows it no longer changes.
//!
//! [`Guarded`] is the live export's backend: the disk behind the gate.
//! [`RecordFile`] reads and writes `IMAGE.ownership` (see `migration_session::durable`).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use crate::sync;
use crate::written_blocks::WrittenBlocks;
use migration_session::{BadRecord, Ownership};
use row_store::{BlockBackend, Caps, Disk, Extent, Posix, Storage, ZeroFlags};
use tokio::sync::watch;

/// Who may use the disk now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Reads and writes.
    Open,
    /// The disk is still arriving by migration: the export's pull answers reads from the
    /// source and turns a write into a claim; the store below refuses both.
    Incoming,
    /// A committed migration's disk: reads and writes; the first write calls the hook.
    Committed,
    /// The disk was handed over to another host: writes refused for this reason.
    Fenced(String),
    /// Which blocks this host holds cannot be proven (a damaged post-copy record): reads and
    /// writes refused (EIO) for this reason, never stale data.
    Broken(String),
}

impl std::fmt::Display for Access {
    /// As logs show it: `open`, `incoming`, `committed`, `fenced: WHY`, `broken: WHY`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Open => f.write_str("open"),
            Self::Incoming => f.write_str("incoming"),
            Self::Committed => f.write_str("committed"),
            Self::Fenced(why) => write!(f, "fenced: {why}"),
            Self::Broken(why) => write!(f, "broken: {why}"),
        }
    }
}

/// Called (once) by the first write after a commit, before that write is done; an error
/// refuses the write.
pub type FirstWriteHook = Box<dyn Fn() -> io::Result<()> + Send + Sync>;

/// The write gate of one disk.
pub struct Gate {
    /// Shared by every write while it runs; exclusive to change the access.
    inflight: RwLock<()>,
    hook: Mutex<Option<FirstWriteHook>>,
    access: watch::Sender<Access>,
    /// On a destination, from its commit on: the blocks written since.
    since_commit: Mutex<Option<Arc<WrittenBlocks>>>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate").field("access", &*self.access.borrow()).finish()
    }
}

fn refused(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, why.into())
}

impl Gate {
    /// A gate starting with `access`.
    pub fn new(access: Access) -> Arc<Self> {
        Arc::new(Self {
            inflight: RwLock::new(()),
            hook: Mutex::new(None),
            access: watch::channel(access).0,
            since_commit: Mutex::new(None),
        })
    }

    /// The current access.
    pub fn access(&self) -> Access {
        self.access.borrow().clone()
    }

    /// The access as it changes.
    pub fn watch(&self) -> watch::Receiver<Access> {
        self.access.subscribe()
    }

    /// Changes the access once no write is in flight. Blocking: call it off the async runtime.
    pub fn set(&self, access: Access) {
        let _exclusive = sync::write(&self.inflight);
        self.access.send_replace(access);
    }

    /// Opens a committed disk of `size` bytes: writes are accepted, the first one runs `hook`
    /// first, and each is recorded in [`Gate::written_since_commit`].
    pub fn set_committed(&self, hook: FirstWriteHook, size: u64) {
        let _exclusive = sync::write(&self.inflight);
        *sync::lock(&self.since_commit) = Some(Arc::new(WrittenBlocks::new(size)));
        *sync::lock(&self.hook) = Some(hook);
        self.access.send_replace(Access::Committed);
    }

    /// Runs `f` (a change to the disk) if the access allows writes, under the shared lock.
    pub fn write<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let _shared = sync::read(&self.inflight);
        let access = self.access.borrow().clone();
        match access {
            Access::Open => f(),
            Access::Committed => {
                {
                    // One first write runs the hook; the others wait for it here.
                    let mut hook = sync::lock(&self.hook);
                    if *self.access.borrow() == Access::Committed {
                        if let Some(h) = hook.as_ref() {
                            h().map_err(|e| match e.raw_os_error() {
                                // The errno is what the client gets (ENOSPC for a full disk).
                                Some(_) => e,
                                None => {
                                    io::Error::new(e.kind(), format!("recording this host as the disk's owner: {e}"))
                                }
                            })?;
                        }
                        *hook = None;
                        self.access.send_replace(Access::Open);
                    }
                }
                f()
            }
            Access::Incoming => Err(refused("the disk is still being migrated to this host")),
            Access::Fenced(why) => Err(refused(why)),
            Access::Broken(why) => Err(io::Error::other(why)),
        }
    }

    /// The blocks written since this process opened a committed disk (none before a commit).
    pub fn written_since_commit(&self) -> Option<Arc<WrittenBlocks>> {
        sync::lock(&self.since_commit).clone()
    }

    /// Runs `f` while no write is in flight and none can start (to decide an ownership change
    /// atomically with respect to writes). Blocking.
    pub fn exclusive<T>(&self, f: impl FnOnce(&Self) -> T) -> T {
        let _exclusive = sync::write(&self.inflight);
        f(self)
    }

    /// Sets the access; only inside [`Gate::exclusive`].
    pub fn set_locked(&self, access: Access) {
        *sync::lock(&self.hook) = None;
        self.access.send_replace(access);
    }
}

/// What the live export's writes tell whoever tracks them: a post-copy destination records
/// which of its missing blocks the guest's writes make held. The migration layer implements
/// it (its `Postcopy`), so the write path below knows nothing of migrations, as the read side
/// knows the source only through `nbd::export::Pull`.
pub trait WriteObserver: Send + Sync + std::fmt::Debug {
    /// Blocks a write over `[offset, offset+len)` makes held, taken before it runs.
    fn covering(&self, offset: u64, len: u64) -> Covered;
    /// The write ran: `covered` is held; a FUA write records it before it is done.
    fn written(&self, covered: Covered, fua: bool) -> io::Result<()>;
    /// A flush: `Some` when the observer makes the disk durable itself (syncing and recording
    /// what is held), `None` to flush the disk as usual.
    fn flush(&self) -> Option<io::Result<()>>;
    /// Whether some of the range is not here yet (it then reads as data in extents).
    fn any_missing(&self, offset: u64, len: u64) -> bool;
}

/// Whole blocks a write covers, as `(first, count)` runs; empty when nothing is tracked.
pub type Covered = Vec<(u64, u64)>;

/// The live export's backend: the disk, behind the write gate, and what its writes are told
/// to (a post-copy destination's record of held blocks).
#[derive(Debug)]
pub struct Guarded {
    disk: Arc<Disk>,
    gate: Arc<Gate>,
    observer: Arc<dyn WriteObserver>,
}

impl Guarded {
    /// The disk behind `gate`.
    pub fn new(disk: Arc<Disk>, gate: Arc<Gate>, observer: Arc<dyn WriteObserver>) -> Self {
        Self { disk, gate, observer }
    }

    /// Runs a write that covers `[offset, offset+len)`: the blocks it covers are taken before
    /// and reported after, under the gate.
    fn changing(&self, offset: u64, len: u64, fua: bool, f: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        self.gate.write(|| {
            if let Some(written) = self.gate.written_since_commit() {
                written.mark(offset, len);
            }
            let covered = self.observer.covering(offset, len);
            f()?;
            self.observer.written(covered, fua)
        })
    }
}

impl BlockBackend for Guarded {
    fn size(&self) -> u64 {
        self.disk.size()
    }

    fn caps(&self) -> Caps {
        self.disk.caps()
    }

    fn read_append(&self, out: &mut Vec<u8>, len: usize, offset: u64) -> io::Result<()> {
        // The NBD layer waits for the commit before reading an incoming disk.
        match &*self.gate.access.borrow() {
            Access::Incoming => return Err(io::Error::other("the disk has not been migrated here yet")),
            Access::Broken(why) => return Err(io::Error::other(why.clone())),
            _ => {}
        }
        self.disk.read_append(out, len, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.changing(offset, buf.len() as u64, fua, || self.disk.write_at(buf, offset, fua))
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        self.changing(offset, len, flags.fua, || self.disk.write_zeroes(offset, len, flags))
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.changing(offset, len, fua, || self.disk.trim(offset, len, fua))
    }

    fn flush(&self) -> io::Result<()> {
        // QEMU flushes the drives of an incoming VM before any migration has arrived: let it.
        // During a post-copy the blocks the guest wrote are recorded as held after the sync.
        self.observer.flush().unwrap_or_else(|| self.disk.flush())
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.disk.cache(offset, len)
    }

    fn extents(&self, offset: u64, len: u64, max: usize) -> io::Result<Vec<Extent>> {
        // Blocks still at the source are data, whatever the image holds there now.
        if self.observer.any_missing(offset, len) {
            return Ok(vec![Extent { length: len, hole: false }]);
        }
        self.disk.extents(offset, len, max)
    }
}

/// `IMAGE.ownership`: the persisted ownership record of one image.
#[derive(Debug, Clone)]
pub struct RecordFile {
    path: PathBuf,
    /// A missing file is damage (see [`RecordFile::of_entry`]).
    expected: bool,
}

/// Why the record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The file could not be read or replaced.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The record file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The disk's state entry had a record and it is gone.
    #[error(
        "{} is missing: this disk's state entry had an ownership record, and without it nothing says whether \
         this host may write to the disk (it may have been handed over). Restore the file, or, if this host \
         certainly owns the disk, remove the whole entry {} (its overlay and fence go with it)",
        path.display(),
        path.parent().unwrap_or(Path::new("/")).display()
    )]
    Missing {
        /// The record file.
        path: PathBuf,
    },
    /// The file is not a record this program wrote.
    #[error("{} cannot be used", path.display())]
    Bad {
        /// The record file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: BadRecord,
    },
}

/// The file of a disk that has no claim on it: once a state entry exists its record always
/// exists, so a missing one is damage, never "no migration ever happened".
const FREE: &[u8] = b"{\n  \"version\": 1,\n  \"role\": \"free\"\n}\n";

impl RecordFile {
    /// The record at `path`, which may be missing (no claim).
    pub fn at(path: PathBuf) -> Self {
        Self { path, expected: false }
    }

    /// The record of the disk whose state entry is `entry`: written (as "free") when the entry
    /// is new, and from then on refused if missing. Blocking.
    pub fn of_entry(entry: &crate::state::StateEntry) -> io::Result<Self> {
        let path = entry.ownership();
        if entry.is_new() && !path.exists() {
            Posix.replace(&path, FREE)?;
        }
        Ok(Self { path, expected: true })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The record, if there is one.
    pub fn load(&self) -> Result<Option<Ownership>, RecordError> {
        match Posix.read(&self.path) {
            Ok(bytes) if bytes == FREE => Ok(None),
            Ok(bytes) => Ownership::decode(&bytes)
                .map(Some)
                .map_err(|source| RecordError::Bad { path: self.path.clone(), source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound && self.expected => {
                Err(RecordError::Missing { path: self.path.clone() })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(RecordError::Io { what: "reading", path: self.path.clone(), source }),
        }
    }

    /// Replaces the record durably (`None`: no claim; in a state entry a "free" record, else
    /// the file is removed, durably).
    pub fn store(&self, record: Option<&Ownership>) -> io::Result<()> {
        match record {
            Some(r) => Posix.replace(&self.path, &r.encode()),
            None if self.expected => Posix.replace(&self.path, FREE),
            None => match Posix.remove(&self.path) {
                Ok(()) => Posix.sync_parent(&self.path),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn the_access_decides_writes() {
        let gate = Gate::new(Access::Open);
        assert_eq!(gate.write(|| Ok(1)).unwrap(), 1);
        gate.set(Access::Fenced("handed over to B".into()));
        let e = gate.write(|| Ok(())).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(e.to_string().contains("handed over to B"));
        gate.set(Access::Incoming);
        assert!(gate.write(|| Ok(())).is_err());
    }

    #[test]
    fn the_first_write_after_a_commit_runs_the_hook_once_and_a_failing_hook_refuses_it() {
        let gate = Gate::new(Access::Incoming);
        assert!(gate.written_since_commit().is_none(), "nothing is recorded before a commit");
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        gate.set_committed(
            Box::new(
                move || {
                    if c.fetch_add(1, Ordering::SeqCst) == 0 {
                        Err(io::Error::other("disk full"))
                    } else {
                        Ok(())
                    }
                },
            ),
            1 << 20,
        );
        assert!(gate.write(|| Ok(())).unwrap_err().to_string().contains("owner"));
        assert_eq!(gate.access(), Access::Committed, "still committed after a failed hook");
        gate.write(|| Ok(())).unwrap();
        gate.write(|| Ok(())).unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(gate.access(), Access::Open);
    }

    #[test]
    fn changing_the_access_waits_for_writes_in_flight() {
        let gate = Gate::new(Access::Open);
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let g = gate.clone();
        let writer = std::thread::spawn(move || {
            g.write(|| {
                started_tx.send(()).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(200));
                Ok(std::time::Instant::now())
            })
            .unwrap()
        });
        started_rx.recv().unwrap();
        gate.set(Access::Fenced("x".into()));
        let fenced_at = std::time::Instant::now();
        assert!(writer.join().unwrap() <= fenced_at, "the fence came before the write in flight ended");
    }

    #[test]
    fn records_are_stored_replaced_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let f = RecordFile::at(dir.path().join("disk.raw.ownership"));
        assert!(f.load().unwrap().is_none());
        let r = Ownership::Destination {
            stage: migration_session::DestStage::Committed,
            session: migration_session::SessionId([3; 16]),
            since: migration_session::now_rfc3339(),
            postcopy: true,
        };
        f.store(Some(&r)).unwrap();
        assert_eq!(f.load().unwrap(), Some(r));
        f.store(None).unwrap();
        f.store(None).unwrap();
        assert!(f.load().unwrap().is_none());
        std::fs::write(f.path(), "{").unwrap();
        assert!(matches!(f.load(), Err(RecordError::Bad { .. })));
    }

    #[test]
    fn an_entry_s_record_always_exists_and_a_missing_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        std::fs::File::create(&image).unwrap().set_len(1 << 20).unwrap();
        let lookup = crate::state::Lookup {
            state_dir: &dir.path().join("state"),
            image: &image,
            disk_id: None,
            reserved: None,
            read_only: false,
        };
        let entry = crate::state::StateEntry::locate(&lookup).unwrap();
        let f = RecordFile::of_entry(&entry).unwrap();
        assert!(f.load().unwrap().is_none(), "a new disk: free");
        assert!(f.path().exists());
        let r = Ownership::Source {
            stage: migration_session::SourceStage::HandedOver,
            session: migration_session::SessionId([4; 16]),
            peer: "tcp:192.0.2.2:10810".into(),
            strategy: control_api::Strategy::Row,
            fenced_since: None,
            postcopy: false,
            claimed: false,
        };
        f.store(Some(&r)).unwrap();
        f.store(None).unwrap();
        assert!(f.path().exists(), "no claim is a record too");
        f.store(Some(&r)).unwrap();
        // Deleted behind our back: the next start refuses, never serves the disk unfenced.
        std::fs::remove_file(f.path()).unwrap();
        let again = crate::state::StateEntry::locate(&lookup).unwrap();
        assert!(!again.is_new());
        let f = RecordFile::of_entry(&again).unwrap();
        let e = f.load().unwrap_err();
        assert!(matches!(e, RecordError::Missing { .. }), "{e}");
        assert!(e.to_string().contains("Restore the file"), "{e}");
    }
}
