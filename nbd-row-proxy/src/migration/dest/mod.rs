//! The destination side of a disk migration: `nbd-row-proxy receive`.
//!
//! Connections are served concurrently (a bounded number): each authenticates, then its first
//! message says what it is: a session's first round, a revoke (the source's switchover failed
//! and it wants its disk back), or the source's `Done`. `migration_session::DestSession`, under
//! one mutex, decides; each step is applied to a copy, its ownership record written, and only
//! then made current, so what is on disk is never behind what the proxy acts on.
//!
//! The NBD export exists from the start (QEMU opens its drive before the migration ends): until
//! the commit, writes are refused and reads wait; after it, the disk is served read-write and
//! its first write makes this host the owner.

mod frames;
mod pull;

pub use pull::{DestPull, CLAIM_WAIT};

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use control_api::{IncomingData, IncomingPhase, MigrationIncoming, Strategy};
use migration_session::{DestAction, DestRefusal, DestSession, SessionId};
use migration_stream::{Message, SessionParams};
use row_store::{BlockBackend, BLOCK_SIZE};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch, Semaphore};

use super::residual::Residual;
use super::transport::{accept, tune_accepted, Reader, Writer};
use super::{last_word, send, FrameReader, FIRST_MESSAGE_TIMEOUT};
use crate::ownership::Access;
use crate::proxy::Proxy;
use crate::sync;
use migration_session::BlockSet;

/// Connections still in their handshake; a new one beyond this drops the oldest.
const MAX_UNAUTHENTICATED: usize = 16;
/// Connections that have not authenticated yet, oldest first: an id and what evicts it.
type Unauthenticated = VecDeque<(u64, oneshot::Sender<()>)>;
/// How long a connection may take to authenticate (TLS and the session request).
const UNAUTHENTICATED_TIMEOUT: Duration = Duration::from_secs(5);
/// Authenticated connections served at once (a session, and revokes or `Done`s beside it).
const MAX_SESSIONS: usize = 4;
/// How often the abandonment watch is looked at (its wait is seconds long).
const ABANDON_CHECK_EVERY: Duration = Duration::from_secs(1);

/// The destination's state, shared by its connections, the NBD write gate and `query-status`.
pub struct Incoming {
    proxy: Arc<Proxy>,
    machine: Mutex<DestSession>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming").field("machine", &*self.lock()).finish()
    }
}

fn strategy_of(s: migration_stream::Strategy) -> Strategy {
    match s {
        migration_stream::Strategy::Row => Strategy::Row,
        migration_stream::Strategy::Bitmap => Strategy::Bitmap,
    }
}

impl Incoming {
    /// The destination state `machine` (new, or restored from the ownership record) for the disk
    /// of `proxy`; opens the disk if it is committed or owned.
    pub fn new(proxy: Arc<Proxy>, machine: DestSession) -> Arc<Self> {
        let serves = machine.phase();
        let session = machine.session();
        let postcopy = machine.postcopy();
        if session.is_some() && matches!(serves, IncomingPhase::Waiting | IncomingPhase::Receiving) {
            // A session began here and did not commit: the image is a partial copy.
            proxy.postcopy.link.mark_partial();
        }
        let me = Arc::new(Self { proxy, machine: Mutex::new(machine) });
        if !me.restore_residual(serves, session, postcopy) {
            return me;
        }
        match serves {
            IncomingPhase::Committed => me.open_committed(),
            IncomingPhase::Owner => me.proxy.gate.set(Access::Open),
            IncomingPhase::Waiting | IncomingPhase::Receiving => me.proxy.gate.set(Access::Incoming),
        }
        me
    }

    /// A post-copy interrupted by a restart goes on (the source resumes it); a log left by a
    /// session that did not commit is thrown away.
    /// Returns false if the residual cannot be used: the disk is then refused (`Broken`).
    fn restore_residual(&self, phase: IncomingPhase, session: Option<SessionId>, postcopy: bool) -> bool {
        let disk = self.proxy.disk.clone();
        match (phase, session) {
            (IncomingPhase::Committed | IncomingPhase::Owner, Some(id)) => {
                match Residual::open(disk, &self.proxy.state.residual(), id, postcopy) {
                    Ok(r) => self.proxy.postcopy.set(r.map(Arc::new)),
                    Err(e) => {
                        // Which blocks are here cannot be proven: serve none of them.
                        tracing::error!("the post-copy residual cannot be used: {e:#}; refusing every request");
                        self.proxy.gate.set(Access::Broken(format!("{e:#}")));
                        return false;
                    }
                }
            }
            _ => {
                if let Err(e) = Residual::discard(&self.proxy.state.residual()) {
                    tracing::warn!("removing a stale residual log: {e}");
                }
            }
        }
        true
    }

    fn lock(&self) -> MutexGuard<'_, DestSession> {
        sync::lock(&self.machine)
    }

    /// The current phase.
    pub fn phase(&self) -> IncomingPhase {
        self.lock().phase()
    }

    /// Applies an input: on a copy of the state, whose ownership record is written first; the
    /// copy becomes current only if that worked. Returns the other actions, in order. Blocking.
    fn apply(
        &self,
        f: impl FnOnce(&mut DestSession) -> Result<Vec<DestAction>, DestRefusal>,
    ) -> Result<Vec<DestAction>> {
        let mut current = self.lock();
        let mut next = current.clone();
        let actions = f(&mut next)?;
        let mut rest = Vec::new();
        for a in actions {
            match a {
                DestAction::Persist(record) => {
                    self.proxy.record.store(Some(&record)).with_context(|| {
                        format!("writing the ownership record {}", self.proxy.record.path().display())
                    })?
                }
                other => rest.push(other),
            }
        }
        *current = next;
        Ok(rest)
    }

    /// Serves a committed disk: reads and writes; the first write makes this host the owner.
    fn open_committed(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        self.proxy.gate.set_committed(
            Box::new(move || {
                let me = me.upgrade().ok_or_else(|| std::io::Error::other("shutting down"))?;
                let r = me.apply(|m| m.local_write().map_err(|phase| DestRefusal::Unexpected { what: "write", phase }));
                match r {
                    Ok(_) => {
                        tracing::info!("first write after the commit: this host owns the disk");
                        me.emit(IncomingData { phase: IncomingPhase::Owner, ..me.data() });
                        Ok(())
                    }
                    Err(e) => {
                        if let Some(suppressed) = OWNER_RECORD_FAILED.hit() {
                            tracing::warn!(
                                suppressed,
                                "a write is refused: recording this host as the disk's owner failed: {e:#}"
                            );
                        }
                        // A full disk is ENOSPC to the guest (it pauses on it, and goes on once there
                        // is room), not a permission problem.
                        let io =
                            e.chain().find_map(|c| c.downcast_ref::<std::io::Error>()).and_then(|io| io.raw_os_error());
                        Err(match io {
                            Some(errno) => std::io::Error::from_raw_os_error(errno),
                            None => std::io::Error::new(std::io::ErrorKind::PermissionDenied, format!("{e:#}")),
                        })
                    }
                }
            }),
            self.proxy.disk.size(),
        );
    }

    fn data(&self) -> IncomingData {
        let m = self.lock();
        IncomingData {
            phase: m.phase(),
            session: m.session().map(|s| s.to_string()),
            strategy: None,
            round: None,
            reason: None,
        }
    }

    fn emit(&self, data: IncomingData) {
        self.proxy.events.emit::<MigrationIncoming>(data);
    }

    /// Tells an armed source when the VM manager abandoned its migration (the destination's
    /// QEMU left before its guest wrote; see `AbandonWatch`), checked every second while the
    /// disk is still arriving. The source disarms and discards the session.
    async fn watch_abandonment(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = stopped(&mut shutdown) => return,
                () = tokio::time::sleep(ABANDON_CHECK_EVERY) => {}
            }
            if self.proxy.gate.access() != Access::Incoming {
                continue;
            }
            if let Some(why) = self.proxy.postcopy.link.tell_if_abandoned(Instant::now()) {
                tracing::warn!("{why}: the migration was abandoned; the source is told (an armed one disarms)");
                self.emit(IncomingData { reason: Some(format!("abandoned: {why}")), ..self.data() });
            }
        }
    }

    /// Accepts migration connections until `shutdown`.
    pub async fn listen(self: Arc<Self>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
        tokio::spawn(self.clone().watch_abandonment(shutdown.clone()));
        let sessions = Arc::new(Semaphore::new(MAX_SESSIONS));
        let waiting: Arc<Mutex<Unauthenticated>> = Arc::default();
        let mut next_id = 0u64;
        loop {
            let (stream, peer) = tokio::select! {
                _ = stopped(&mut shutdown) => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        if let Some(suppressed) = MIGRATION_ACCEPT_FAILED.hit() {
                            tracing::warn!(error = %e, suppressed, "accepting a migration connection failed");
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            tune_accepted(&stream);
            // Connections that have not authenticated yet are many and short-lived; when there
            // are too many, the oldest goes, so strangers can never keep the real source out.
            next_id += 1;
            let id = next_id;
            let (evict, evicted) = oneshot::channel();
            {
                let mut w = sync::lock(&waiting);
                if w.len() >= MAX_UNAUTHENTICATED {
                    if let Some((old, tx)) = w.pop_front() {
                        if let Some(suppressed) = EVICTED.hit() {
                            tracing::warn!(
                                connection = old,
                                suppressed,
                                "too many unauthenticated migration connections: dropping the oldest (more \
                                 within {MIGRATION_WARN_INTERVAL:?} are counted, not logged)"
                            );
                        }
                        let _ = tx.send(());
                    }
                }
                w.push_back((id, evict));
            }
            let (me, sessions, waiting) = (self.clone(), sessions.clone(), waiting.clone());
            let mut stop = shutdown.clone();
            tokio::spawn(async move {
                let authenticated = tokio::select! {
                    _ = stopped(&mut stop) => None,
                    _ = evicted => None,
                    r = me.handshake(stream) => match r {
                        Ok(a) => Some(a),
                        Err(e) => {
                            if let Some(suppressed) = UNAUTHENTICATED.hit() {
                                tracing::warn!(
                                    %peer,
                                    suppressed,
                                    "migration connection: {e:#} (more such within {MIGRATION_WARN_INTERVAL:?} are \
                                     counted, not logged)"
                                );
                            }
                            None
                        }
                    },
                };
                sync::lock(&waiting).retain(|(i, _)| *i != id);
                let Some((params, reader, mut wr)) = authenticated else { return };
                let Ok(_slot) = sessions.try_acquire_owned() else {
                    let message = "too many migration sessions at once".to_string();
                    last_word(&mut wr, &Message::Error { message }).await;
                    return;
                };
                tokio::select! {
                    _ = stopped(&mut stop) => {}
                    r = me.connection(params, reader, wr) => if let Err(e) = r {
                        tracing::warn!(%peer, "migration connection: {e:#}");
                    }
                }
            });
        }
    }

    /// TLS and the session handshake, within [`UNAUTHENTICATED_TIMEOUT`].
    pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static>(
        &self,
        stream: S,
    ) -> Result<(SessionParams, FrameReader<Reader>, Writer)> {
        let size = self.proxy.disk.size();
        let check = |params: &SessionParams| {
            if params.disk_size != size {
                Some(format!("disk size differs: the source has {} bytes, this image {size}", params.disk_size))
            } else if params.block_size as u64 != BLOCK_SIZE {
                Some(format!("block size {} is not supported", params.block_size))
            } else {
                None
            }
        };
        tokio::time::timeout(UNAUTHENTICATED_TIMEOUT, accept(stream, &self.proxy.protection.current(), check))
            .await
            .map_err(|_| anyhow!("no authenticated session request within {UNAUTHENTICATED_TIMEOUT:?}"))?
    }

    /// An authenticated connection: what its first message asks for.
    pub async fn connection(
        self: &Arc<Self>,
        params: SessionParams,
        mut reader: FrameReader<Reader>,
        mut wr: Writer,
    ) -> Result<()> {
        let session = SessionId(params.session_id);
        let first = match reader.next_within(FIRST_MESSAGE_TIMEOUT, "the session's first message").await {
            Ok(m) => m,
            Err(e) => {
                last_word(&mut wr, &Message::Error { message: format!("{e:#}") }).await;
                return Err(e);
            }
        };
        match first {
            Message::RoundBegin { round, .. } => {
                self.receive(session, strategy_of(params.strategy), round, reader, wr).await
            }
            Message::Revoke => self.revoke(session, &mut wr).await,
            Message::Resume => self.resume(session, reader, wr).await,
            Message::Done if self.proxy.postcopy.residual().is_some() => {
                let e = anyhow!("post-copy is still running: this host does not hold every block yet");
                last_word(&mut wr, &Message::Error { message: e.to_string() }).await;
                Err(e)
            }
            Message::Done | Message::Discard { .. } => {
                let done = matches!(first, Message::Done);
                let r = self
                    .blocking(move |me| me.apply(|m| if done { m.done(session) } else { m.discard(session) }))
                    .await;
                if let Err(e) = &r {
                    last_word(&mut wr, &Message::Error { message: format!("{e:#}") }).await;
                }
                r.map(|_| ())
            }
            other => {
                let e = anyhow!("unexpected {} to begin a session", other.name());
                last_word(&mut wr, &Message::Error { message: e.to_string() }).await;
                Err(e)
            }
        }
    }

    async fn blocking<T: Send + 'static>(self: &Arc<Self>, f: impl FnOnce(&Arc<Self>) -> T + Send + 'static) -> T {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me)).await.expect("blocking task panicked")
    }

    /// A revoke: give the disk back unless this host has written to it. Decided while no write
    /// is in flight, so it cannot race the first write after the commit.
    async fn revoke(self: &Arc<Self>, session: SessionId, wr: &mut Writer) -> Result<()> {
        let r = self
            .blocking(move |me| {
                me.proxy.gate.exclusive(|gate| -> Result<bool> {
                    let actions = me.apply(|m| m.revoke(session))?;
                    let mut answered = false;
                    if me.proxy.postcopy.residual().is_some() {
                        me.proxy.postcopy.set(None);
                        Residual::discard(&me.proxy.state.residual()).context("removing the residual log")?;
                    }
                    for a in actions {
                        match a {
                            DestAction::CloseAccess => gate.set_locked(Access::Incoming),
                            DestAction::SendRevoked => answered = true,
                            _ => {}
                        }
                    }
                    Ok(answered)
                })
            })
            .await;
        match r {
            Ok(_) => {
                tracing::warn!(%session, "the source took the disk back: waiting for a new migration");
                self.emit(IncomingData { reason: Some("revoked by the source".into()), ..self.data() });
                send(wr, &Message::Revoked).await?;
                Ok(())
            }
            Err(e) => {
                tracing::warn!(%session, "revoke refused: {e:#}");
                last_word(wr, &Message::Error { message: format!("{e:#}") }).await;
                Ok(())
            }
        }
    }

    /// A session's rounds, until its commit and beyond (its `Done`).
    async fn receive(
        self: &Arc<Self>,
        session: SessionId,
        strategy: Strategy,
        first_round: u32,
        mut reader: FrameReader<Reader>,
        mut wr: Writer,
    ) -> Result<()> {
        let begun = self
            .blocking(move |me| -> Result<()> {
                for a in me.apply(|m| m.begin(session))? {
                    if a == DestAction::ResetImage {
                        me.proxy.gate.set(Access::Incoming);
                        me.proxy.disk.reset_image()?;
                    }
                }
                Ok(())
            })
            .await;
        if let Err(e) = begun {
            last_word(&mut wr, &Message::Error { message: format!("{e:#}") }).await;
            return Err(e);
        }
        tracing::info!(%session, %strategy, "migration session accepted");
        self.proxy.postcopy.link.new_session();
        self.emit(IncomingData { strategy: Some(strategy), round: Some(first_round), ..self.data() });
        let result = self.frames(session, &mut reader, &mut wr).await;
        if let Err(e) = &result {
            // Before the commit the session is over; after it nothing changes.
            let _ = self.blocking(move |me| me.apply(|m| Ok(m.transport_failed(session)))).await;
            let phase = self.phase();
            if phase != IncomingPhase::Committed && phase != IncomingPhase::Owner {
                tracing::warn!(%session, "incoming migration failed: {e:#}");
                self.emit(IncomingData { reason: Some(format!("{e:#}")), ..self.data() });
                last_word(&mut wr, &Message::Error { message: format!("{e:#}") }).await;
            }
        }
        result
    }

    /// The source reconnected during a post-copy: tell it what is still missing, then take
    /// the rest of the push on this connection.
    async fn resume(
        self: &Arc<Self>,
        session: SessionId,
        mut reader: FrameReader<Reader>,
        mut wr: Writer,
    ) -> Result<()> {
        let holds = {
            let m = self.lock();
            m.session() == Some(session) && m.serves()
        };
        if !holds {
            let e = anyhow!("session {session} is not held here: nothing to resume");
            last_word(&mut wr, &Message::Error { message: e.to_string() }).await;
            return Err(e);
        }
        if let Access::Broken(why) = self.proxy.gate.access() {
            // Never "nothing missing" when that cannot be proven: the source keeps its copy.
            let e = anyhow!("this host cannot prove which blocks it holds: {why}");
            last_word(&mut wr, &Message::Error { message: e.to_string() }).await;
            return Err(e);
        }
        let Some(residual) = self.proxy.postcopy.residual() else {
            tracing::info!(%session, "the source resumed a post-copy that is already complete");
            send(&mut wr, &Message::Holds).await?;
            return Ok(());
        };
        let ranges = residual.missing_ranges();
        tracing::warn!(%session, ranges = ranges.len(), blocks = residual.missing_blocks(), "the source resumed the post-copy");
        for m in migration_stream::missing_frames(&ranges) {
            send(&mut wr, &m).await?;
        }
        send(&mut wr, &Message::Resumed).await?;
        self.frames(session, &mut reader, &mut wr).await
    }

    /// The commit: sync everything received, record it, then serve the disk.
    async fn commit(self: &Arc<Self>, session: SessionId, missing: BlockSet) -> Result<()> {
        let postcopy = !missing.is_empty();
        self.blocking(move |me| -> Result<()> {
            let started = Instant::now();
            // The sync comes first: the record must never say committed for data not on disk.
            me.proxy.disk.flush().context("syncing the image")?;
            let synced = started.elapsed();
            // So does the residual: a committed disk is never served without knowing what it
            // does not hold yet.
            if !missing.is_empty() {
                let r = Residual::create(me.proxy.disk.clone(), &me.proxy.state.residual(), session, missing)
                    .context("recording the post-copy residual")?;
                me.proxy.postcopy.set(Some(Arc::new(r)));
            }
            let residual_recorded = started.elapsed();
            for a in me.apply(|m| m.commit(session, postcopy))? {
                if a == DestAction::OpenAccess {
                    me.open_committed();
                }
            }
            tracing::info!(
                sync_ms = synced.as_millis() as u64,
                residual_ms = (residual_recorded - synced).as_millis() as u64,
                record_ms = (started.elapsed() - residual_recorded).as_millis() as u64,
                "commit recorded"
            );
            Ok(())
        })
        .await
    }
}

/// At most one warning of each kind per interval about migration connections that never got
/// a session (strangers, floods): the first, then a count.
const MIGRATION_WARN_INTERVAL: Duration = Duration::from_secs(10);
static UNAUTHENTICATED: logging::RateLimit = logging::RateLimit::new(MIGRATION_WARN_INTERVAL);
static OWNER_RECORD_FAILED: logging::RateLimit = logging::RateLimit::new(MIGRATION_WARN_INTERVAL);
static EVICTED: logging::RateLimit = logging::RateLimit::new(MIGRATION_WARN_INTERVAL);
static MIGRATION_ACCEPT_FAILED: logging::RateLimit = logging::RateLimit::new(MIGRATION_WARN_INTERVAL);

/// Resolves once `shutdown` says stop (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}
