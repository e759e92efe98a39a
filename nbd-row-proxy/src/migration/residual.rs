//! The destination's side of post-copy: the blocks it serves but does not hold yet, how a
//! request waits for them, and how they arrive (see `migration_session::residual`).
//!
//! - A block arrives (pushed, or fetched for a read) and is written only if it is still
//!   missing: a block the guest has written here is never overwritten by the source.
//! - A guest write that covers whole missing blocks makes them held (no fetch); one that covers
//!   part of a missing block waits for that block first, like a read.
//! - `IMAGE.residual` records what is missing; `held` records are appended only after a sync
//!   of the image (at the guest's flushes and FUA writes, and every few megabytes of pushed
//!   data), so after a crash a block is either fetched again or holds synced data.

use std::fs::File;
use std::io::{self, Write as _};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use migration_session::{BlockSet, ResidualLog, Residue, SessionId};
use migration_stream::Message;

use row_store::{BlockBackend, Disk, Posix, Storage, ZeroFlags, BLOCK_SIZE};
use tokio::sync::Notify;

use crate::ownership::{Covered, WriteObserver};

pub use super::fetch_link::FetchLink;
use crate::sync;

/// Bytes received between two checkpoints of the residual log.
const CHECKPOINT_BYTES: u64 = 64 << 20;

/// A destination's post-copy, shared by its NBD export, its migration connections and
/// `query-status`: the residual while one runs, and the link to ask the source for blocks.
#[derive(Debug, Default)]
pub struct Postcopy {
    residual: RwLock<Option<Arc<Residual>>>,
    last: Mutex<Option<PullStats>>,
    /// The current session connection, for fetches.
    pub link: FetchLink,
}

/// The write path's view of a post-copy: writes over missing blocks make them held.
impl WriteObserver for Postcopy {
    fn covering(&self, offset: u64, len: u64) -> Covered {
        self.residual().map(|r| r.cover(offset, len)).unwrap_or_default()
    }

    fn written(&self, covered: Covered, fua: bool) -> io::Result<()> {
        let Some(r) = self.residual() else { return Ok(()) };
        let some = !covered.is_empty();
        r.written(covered);
        if fua && some {
            r.checkpoint()?;
        }
        Ok(())
    }

    fn flush(&self) -> Option<io::Result<()>> {
        self.residual().map(|r| r.checkpoint())
    }

    fn any_missing(&self, offset: u64, len: u64) -> bool {
        self.residual().is_some_and(|r| r.any_missing(offset, len))
    }
}

impl Postcopy {
    /// The residual, while a post-copy runs.
    pub fn residual(&self) -> Option<Arc<Residual>> {
        sync::read(&self.residual).clone()
    }

    /// Starts (`Some`) or ends (`None`) a post-copy; the figures of the last one are kept.
    pub fn set(&self, residual: Option<Arc<Residual>>) {
        let mut slot = sync::write(&self.residual);
        if let Some(old) = slot.as_ref() {
            *sync::lock(&self.last) = Some(old.stats());
        }
        *slot = residual;
    }

    /// For `query-status`: the post-copy running, or the last one's figures.
    pub fn status(&self) -> Option<control_api::IncomingPostcopy> {
        let (missing, stats) = match self.residual() {
            Some(r) => (r.missing_blocks(), r.stats()),
            None => (0, (*sync::lock(&self.last))?),
        };
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        Some(control_api::IncomingPostcopy {
            missing_blocks: missing,
            link_up: self.link.connected(),
            waits: stats.waits,
            wait_max_ms: ms(stats.max),
            wait_mean_ms: if stats.waits == 0 { 0.0 } else { ms(stats.total) / stats.waits as f64 },
            received_bytes: stats.received_bytes,
        })
    }
}

/// The first and end block of a byte range.
pub fn blocks_of(offset: u64, len: u64) -> (u64, u64) {
    (offset / BLOCK_SIZE, (offset + len).div_ceil(BLOCK_SIZE))
}

/// The figures of the post-copy reads that had to wait, for `query-status`.
#[derive(Debug, Default, Clone, Copy)]
pub struct PullStats {
    /// Requests that waited for blocks from the source.
    pub waits: u64,
    /// Their longest wait.
    pub max: Duration,
    /// Their total wait.
    pub total: Duration,
    /// Bytes that arrived from the source after the switchover.
    pub received_bytes: u64,
}

#[derive(Debug)]
struct State {
    missing: BlockSet,
    /// Missing blocks asked for on the current link.
    requested: BlockSet,
    /// Held (arrived, or written whole by the guest) but not yet recorded in the log.
    unlogged: Vec<(u64, u64)>,
    log: Option<File>,
    since_checkpoint: u64,
    stats: PullStats,
}

/// The blocks a destination serves but does not hold yet.
#[derive(Debug)]
pub struct Residual {
    disk: Arc<Disk>,
    state: Mutex<State>,
    arrived: Notify,
    /// The guest's first request came (the source was told to start pushing).
    running: std::sync::atomic::AtomicBool,
}

impl Residual {
    fn lock(&self) -> MutexGuard<'_, State> {
        sync::lock(&self.state)
    }

    fn with(disk: Arc<Disk>, missing: BlockSet, log: File) -> Self {
        let state = State {
            missing,
            requested: BlockSet::new(),
            unlogged: Vec::new(),
            log: Some(log),
            since_checkpoint: 0,
            stats: PullStats::default(),
        };
        Self { disk, state: Mutex::new(state), arrived: Notify::new(), running: Default::default() }
    }

    /// Records `missing` durably as the residual of `session` (at a post-copy commit, before
    /// the commit itself is recorded). Blocking.
    pub fn create(disk: Arc<Disk>, path: &Path, session: SessionId, missing: BlockSet) -> io::Result<Self> {
        let bytes = ResidualLog::create(session, BLOCK_SIZE as u32, &missing);
        Posix.replace(path, &bytes)?;
        let log = std::fs::OpenOptions::new().append(true).open(path)?;
        Ok(Self::with(disk, missing, log))
    }

    /// The residual of `session` left by a restart, if a post-copy was running. `expected`: the
    /// ownership record says the session was committed by a post-copy, so a missing log is
    /// damage, not a post-copy that ended. A log that cannot prove which blocks are here is an
    /// error: the disk must not be served as if it held them. Blocking.
    pub fn open(disk: Arc<Disk>, path: &Path, session: SessionId, expected: bool) -> anyhow::Result<Option<Self>> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !expected => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => anyhow::bail!(
                "{} is missing, but session {session} was committed by a post-copy: which blocks this host \
                 holds cannot be proven (restore the file, or give the disk back to the source)",
                path.display()
            ),
            Err(e) => return Err(anyhow::Error::new(e).context(format!("reading {}", path.display()))),
        };
        let replayed = ResidualLog::replay(&bytes, session, BLOCK_SIZE as u32)
            .map_err(|e| anyhow::Error::new(e).context(format!("{} cannot be used", path.display())))?;
        let Residue::Missing(missing) = replayed else { return Ok(None) };
        let log = std::fs::OpenOptions::new().append(true).open(path)?;
        tracing::warn!(
            blocks = missing.blocks(),
            "a post-copy was running before the restart: waiting for the source to resume it"
        );
        Ok(Some(Self::with(disk, missing, log)))
    }

    /// Throws the residual away (the disk was given back to the source). Blocking.
    pub fn discard(path: &Path) -> io::Result<()> {
        match Posix.remove(path) {
            Ok(()) => Posix.sync_parent(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The guest's first request: tells the source (once) that the guest runs here, so it
    /// starts the push (until then the link carries the memory migration's last bytes).
    pub fn guest_request(&self, link: &FetchLink) {
        if !self.running.swap(true, std::sync::atomic::Ordering::Relaxed) && !link.send(Message::Running) {
            // No link now: the source resumes the push when it reconnects.
            self.running.store(false, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Blocks still missing.
    pub fn missing_blocks(&self) -> u64 {
        self.lock().missing.blocks()
    }

    /// The missing ranges, in bytes (for a `Resume`).
    pub fn missing_ranges(&self) -> Vec<(u64, u64)> {
        let size = self.disk.size();
        self.lock().missing.iter().map(|(s, e)| (s * BLOCK_SIZE, (e * BLOCK_SIZE).min(size) - s * BLOCK_SIZE)).collect()
    }

    /// The wait figures.
    pub fn stats(&self) -> PullStats {
        self.lock().stats
    }

    /// Whether `[offset, offset+len)` reads anything not held here (for block status).
    pub fn any_missing(&self, offset: u64, len: u64) -> bool {
        let (s, e) = blocks_of(offset, len);
        self.lock().missing.any_within(s, e)
    }

    /// Data of the source for `offset` arrived: the blocks still missing are written. Blocking.
    pub fn receive(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.arrive(offset, data.len() as u64, |at, len| {
            let from = (at - offset) as usize;
            self.disk.write_at(&data[from..from + len as usize], at, false)
        })
    }

    /// A zeroed range of the source arrived. Blocking.
    pub fn receive_zero(&self, offset: u64, len: u64) -> io::Result<()> {
        let flags = ZeroFlags { may_punch: true, ..ZeroFlags::default() };
        self.arrive(offset, len, |at, n| self.disk.write_zeroes(at, n, flags))
    }

    fn arrive(&self, offset: u64, len: u64, mut write: impl FnMut(u64, u64) -> io::Result<()>) -> io::Result<()> {
        let end = offset + len;
        if !offset.is_multiple_of(BLOCK_SIZE) || (!end.is_multiple_of(BLOCK_SIZE) && end != self.disk.size()) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "post-copy data is not block-aligned"));
        }
        let (first, last) = blocks_of(offset, len);
        let mut st = self.lock();
        for (s, e) in st.missing.within(first, last) {
            let at = s * BLOCK_SIZE;
            write(at, (e * BLOCK_SIZE).min(end) - at)?;
            st.missing.remove(s, e);
            st.requested.remove(s, e);
            st.unlogged.push((s, e));
        }
        st.stats.received_bytes += len;
        st.since_checkpoint += len;
        let checkpoint = st.since_checkpoint >= CHECKPOINT_BYTES;
        drop(st);
        self.arrived.notify_waiters();
        if checkpoint {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// A guest write is about to cover `[offset, offset+len)`: the whole missing blocks in it
    /// stop being missing (nothing arriving may overwrite them). Returns them, for
    /// [`Residual::written`] once the write is done.
    pub fn cover(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let first = offset.div_ceil(BLOCK_SIZE);
        let end = offset + len;
        let last = if end == self.disk.size() { end.div_ceil(BLOCK_SIZE) } else { end / BLOCK_SIZE };
        if first >= last {
            return Vec::new();
        }
        let mut st = self.lock();
        let covered = st.missing.within(first, last);
        for &(s, e) in &covered {
            st.missing.remove(s, e);
            st.requested.remove(s, e);
        }
        drop(st);
        if !covered.is_empty() {
            self.arrived.notify_waiters();
        }
        covered
    }

    /// The write over `covered` is done: they are held, to be logged at the next checkpoint.
    pub fn written(&self, covered: Vec<(u64, u64)>) {
        if !covered.is_empty() {
            self.lock().unlogged.extend(covered);
        }
    }

    /// Makes what arrived durable and records it: sync the image, then append the `held`
    /// records and sync the log. Blocking.
    pub fn checkpoint(&self) -> io::Result<()> {
        let held = {
            let mut st = self.lock();
            st.since_checkpoint = 0;
            std::mem::take(&mut st.unlogged)
        };
        self.disk.flush()?;
        if held.is_empty() {
            return Ok(());
        }
        let mut bytes = Vec::with_capacity((held.len() + 1) * migration_session::residual::RECORD_LEN);
        ResidualLog::held(&held, &mut bytes);
        let mut st = self.lock();
        let r = match st.log.as_mut() {
            Some(f) => f.write_all(&bytes).and_then(|_| f.sync_data()),
            None => Ok(()),
        };
        if r.is_err() {
            // Not recorded: keep them for the next try (a restart would fetch them again).
            st.unlogged.extend(held);
        }
        r
    }

    /// Every block is here: sync the image and mark the log complete (it stays, so that a log
    /// gone missing is never taken for a post-copy that ended; the next session removes it).
    /// Blocking.
    pub fn finish(&self) -> anyhow::Result<()> {
        let left = self.missing_blocks();
        if left > 0 {
            anyhow::bail!("the source says it pushed everything, but {left} blocks are still missing");
        }
        self.disk.flush()?;
        let mut bytes = Vec::new();
        ResidualLog::complete(&mut bytes);
        if let Some(mut f) = self.lock().log.take() {
            f.write_all(&bytes)?;
            f.sync_data()?;
        }
        Ok(())
    }

    /// Waits until no block of `[first, last)` is missing, asking the source for them over
    /// `link`; fails after `wait` without progress from the source.
    pub async fn wait_held(&self, link: &FetchLink, first: u64, last: u64, wait: Duration) -> io::Result<()> {
        let started = Instant::now();
        let mut deadline = tokio::time::Instant::now() + wait;
        let mut before = u64::MAX;
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let ask = {
                let mut st = self.lock();
                let missing = st.missing.within(first, last);
                if missing.is_empty() {
                    if before != u64::MAX {
                        let waited = started.elapsed();
                        st.stats.waits += 1;
                        st.stats.total += waited;
                        st.stats.max = st.stats.max.max(waited);
                    }
                    return Ok(());
                }
                let left: u64 = missing.iter().map(|(s, e)| e - s).sum();
                if left < before {
                    // Progress: the source is there; the wait starts again.
                    if before != u64::MAX {
                        deadline = tokio::time::Instant::now() + wait;
                    }
                    before = left;
                }
                let mut ask = Vec::new();
                for (s, e) in missing {
                    for (a, b) in unrequested(&st.requested, s, e) {
                        ask.push((a, b));
                    }
                }
                if link.connected() {
                    for &(a, b) in &ask {
                        st.requested.insert(a, b);
                    }
                }
                ask
            };
            let size = self.disk.size();
            for (a, b) in ask {
                link.request_blocks(a, b, size);
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("blocks {first}..{last} are still at the source, which has not sent them for {wait:?}"),
                ));
            }
        }
    }

    /// The link to the source changed: what was asked on the old one is asked again.
    pub fn link_changed(&self) {
        self.lock().requested = BlockSet::new();
        self.arrived.notify_waiters();
    }
}

/// The parts of `[s, e)` not in `requested`.
fn unrequested(requested: &BlockSet, s: u64, e: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = s;
    for (a, b) in requested.within(s, e) {
        if a > at {
            out.push((at, a));
        }
        at = b;
    }
    if at < e {
        out.push((at, e));
    }
    out
}

/// The bytes of `[offset, offset+len)` as the image holds them now. Blocking.
pub fn read_local(disk: &Disk, offset: u64, len: u64) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(len as usize);
    disk.read_append(&mut out, len as usize, offset)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use row_store::DiskOptions;

    use super::*;

    const ID: SessionId = SessionId([9; 16]);

    /// A 64-block disk of zeroes in a temporary directory.
    fn disk() -> (tempfile::TempDir, Arc<Disk>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        std::fs::write(&path, vec![0u8; 64 * BLOCK_SIZE as usize]).unwrap();
        (dir, Arc::new(Disk::open(&path, DiskOptions::default()).unwrap()))
    }

    /// The residual log of the test's disk.
    fn log(disk: &Disk) -> std::path::PathBuf {
        row_store::storage::suffixed(disk.image_path(), ".residual")
    }

    fn block(byte: u8) -> Vec<u8> {
        vec![byte; BLOCK_SIZE as usize]
    }

    fn read(disk: &Disk, b: u64) -> Vec<u8> {
        read_local(disk, b * BLOCK_SIZE, BLOCK_SIZE).unwrap()
    }

    #[test]
    fn arrivals_never_overwrite_what_the_guest_wrote() {
        let (_dir, disk) = disk();
        let mut missing = BlockSet::new();
        missing.insert(10, 20);
        let r = Residual::create(disk.clone(), &log(&disk), ID, missing).unwrap();
        // The guest writes block 12 whole: it is held at once.
        let covered = r.cover(12 * BLOCK_SIZE, BLOCK_SIZE);
        assert_eq!(covered, vec![(12, 13)]);
        disk.write_at(&block(0xaa), 12 * BLOCK_SIZE, false).unwrap();
        r.written(covered);
        // A write covering only part of block 14 makes nothing held (it must fetch first).
        assert!(r.cover(14 * BLOCK_SIZE + 512, 512).is_empty());
        // The source's blocks 10..20 arrive: block 12 keeps the guest's data.
        let data: Vec<u8> = (10..20).flat_map(|b| block(b as u8)).collect();
        r.receive(10 * BLOCK_SIZE, &data).unwrap();
        assert_eq!(read(&disk, 12), block(0xaa));
        assert_eq!(read(&disk, 13), block(13));
        assert_eq!(r.missing_blocks(), 0);
        assert!(!r.any_missing(0, 64 * BLOCK_SIZE));
        // Arriving data must be whole blocks.
        assert!(r.receive(BLOCK_SIZE + 1, &block(1)).is_err());
    }

    #[test]
    fn after_a_crash_only_synced_arrivals_count_as_held() {
        let (_dir, disk) = disk();
        let mut missing = BlockSet::new();
        missing.insert(0, 8);
        let r = Residual::create(disk.clone(), &log(&disk), ID, missing).unwrap();
        r.receive(0, &block(1)).unwrap();
        r.checkpoint().unwrap();
        // Block 1 arrives but no checkpoint follows: a restart must fetch it again.
        r.receive(BLOCK_SIZE, &block(2)).unwrap();
        let covered = r.cover(2 * BLOCK_SIZE, BLOCK_SIZE);
        disk.write_at(&block(3), 2 * BLOCK_SIZE, false).unwrap();
        r.written(covered);
        drop(r);
        let again = Residual::open(disk.clone(), &log(&disk), ID, true).unwrap().expect("the log survives");
        assert_eq!(again.missing_ranges(), vec![(BLOCK_SIZE, 7 * BLOCK_SIZE)]);
        // A flush of the guest's writes (the checkpoint) records them.
        let covered = again.cover(2 * BLOCK_SIZE, BLOCK_SIZE);
        again.written(covered);
        again.checkpoint().unwrap();
        drop(again);
        let third = Residual::open(disk.clone(), &log(&disk), ID, true).unwrap().unwrap();
        assert_eq!(third.missing_ranges(), vec![(BLOCK_SIZE, BLOCK_SIZE), (3 * BLOCK_SIZE, 5 * BLOCK_SIZE)]);
        // The log of another session is refused, not trusted.
        assert!(Residual::open(disk.clone(), &log(&disk), SessionId([1; 16]), true).is_err());
        // Finishing with blocks still missing is refused; once all arrived the log says so.
        assert!(third.finish().is_err());
        let rest: Vec<u8> = (0..8).flat_map(|b| block(b as u8)).collect();
        third.receive(0, &rest).unwrap();
        third.finish().unwrap();
        drop(third);
        assert!(Residual::open(disk.clone(), &log(&disk), ID, true).unwrap().is_none());
        // Gone while the record says a post-copy committed: nothing proves what is here.
        std::fs::remove_file(log(&disk)).unwrap();
        assert!(Residual::open(disk.clone(), &log(&disk), ID, true).is_err());
        assert!(
            Residual::open(disk.clone(), &log(&disk), ID, false).unwrap().is_none(),
            "a record of an older release"
        );
    }

    #[tokio::test]
    async fn a_wait_fails_without_a_source_and_ends_when_blocks_arrive() {
        let (_dir, disk) = disk();
        let mut missing = BlockSet::new();
        missing.insert(4, 6);
        let r = Arc::new(Residual::create(disk.clone(), &log(&disk), ID, missing).unwrap());
        let link = Arc::new(FetchLink::default());
        let e = r.wait_held(&link, 4, 5, Duration::from_millis(100)).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        // With a link, the wait asks for the block; its arrival ends the wait.
        let (_generation, mut asked) = link.attach();
        let (r2, link2) = (r.clone(), link.clone());
        let waiter = tokio::spawn(async move { r2.wait_held(&link2, 4, 6, Duration::from_secs(10)).await });
        let Some(Message::Fetch { offset, len, .. }) = asked.recv().await else { panic!("no fetch") };
        assert_eq!((offset, len), (4 * BLOCK_SIZE, 2 * BLOCK_SIZE as u32));
        let data = [block(4), block(5)].concat();
        let r3 = r.clone();
        tokio::task::spawn_blocking(move || r3.receive(4 * BLOCK_SIZE, &data)).await.unwrap().unwrap();
        waiter.await.unwrap().unwrap();
        assert_eq!(r.stats().waits, 1);
    }

    #[test]
    fn unrequested_parts() {
        let mut r = BlockSet::new();
        r.insert(10, 20);
        r.insert(30, 35);
        assert_eq!(unrequested(&r, 0, 40), vec![(0, 10), (20, 30), (35, 40)]);
        assert_eq!(unrequested(&r, 12, 18), vec![]);
        assert_eq!(unrequested(&r, 15, 32), vec![(20, 30)]);
    }
}
