//! The source side of a disk migration.
//!
//! One task (an actor) owns the session's connection and performs what
//! `migration_session::SourceSession` decides; the control commands send it requests and wait
//! for its answer, so they are handled one at a time and in order. `query-migrate` reads the
//! state without it.
//!
//! - `row` (the paper's method): ROW freezes the image; round 1 sends the frozen base, round 2
//!   the low-frequency (cold) updated blocks, settle passes what stopped changing; the final
//!   round, with the VM paused, the rest.
//! - `bitmap` (the baseline): writes go to the image and a dirty tracker marks them; round 1
//!   sends the whole image, each later round what was dirtied during the previous one.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use control_api::{
    ErrorData, Fence, MigrateFinishArgs, MigrationFailed, MigrationState, MigrationStateData, MigrationStatus, Phase,
    PostcopyMode, PostcopyStatus, RoundKind, Strategy,
};
use migration_session::{
    link, BitmapPlan, Ownership, RowPlan, SessionId, SourceAction, SourceRefusal, SourceSession, Span, WriteLog,
    Written,
};
use migration_stream::Message;
use row_store::{BlockBackend, Disk, Mode, BLOCK_SIZE};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::rounds::{Out, Progress, Rounds, Sent};
use super::transport::{connect, Protection, Reader, Writer};
use super::{last_word, send, session_params, FrameReader, RateLimit, COMMIT_TIMEOUT, REVOKE_TIMEOUT};
use crate::ownership::Access;
use crate::proxy::Proxy;

/// Most settle passes before the row strategy declares pre-copy done.
const MAX_SETTLE_PASSES: u32 = 6;
/// How long a cancelled pre-copy may take to stop before it is aborted.
const PRECOPY_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an idle session tells the destination it is alive.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(5);
/// An armed, ready session sends a settle pass this often (see [`armed_updates`]).
const ARMED_PASS_EVERY: Duration = Duration::from_secs(1);
/// How long a failing session waits for the destination's reason.
const REASON_WAIT: Duration = Duration::from_millis(500);
/// Requests queued for the actor.
const REQUEST_QUEUE: usize = 8;
/// Fetches from the destination waiting to be read, and answers waiting to be sent.
const FETCH_QUEUE: usize = 64;
/// Post-copy: how long the push waits for the destination's guest to run before it starts.
const PUSH_HOLD: Duration = Duration::from_secs(3);
/// Post-copy: the longest pause between two attempts to reconnect to the destination.
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// What `migrate-start` asks for, with defaults applied.
#[derive(Debug, Clone)]
pub struct MigrateArgs {
    /// `tcp:HOST:PORT` of the destination's `receive --listen`.
    pub uri: String,
    /// Which method.
    pub strategy: Strategy,
    /// Pre-copy rounds before the final one, round 1 included.
    pub rounds: u32,
    /// Blocks written at least this often are hot (row only).
    pub hot_threshold: u32,
    /// Cap on the stream, bytes/s.
    pub max_bandwidth: Option<u64>,
    /// lz4-compress data frames.
    pub compress: bool,
    /// Bitmap: dirty granularity in blocks.
    pub bitmap_granularity_blocks: u64,
    /// Row: what the final round may hold, in time at the measured link rate; while more is
    /// outstanding, blocks not written since the previous pass are sent in settle passes.
    pub final_budget: Option<Duration>,
    /// The name the destination's TLS certificate must carry (default: the URI's host).
    pub tls_hostname: Option<String>,
    /// Armed: the destination's first write takes the disk (a VM manager migrated the guest).
    pub arm: bool,
}

/// Why an outgoing-migration request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The session's state refuses it; nothing changed.
    #[error(transparent)]
    Refused(#[from] SourceRefusal),
    /// It was tried and failed; the phase says what was left.
    #[error("{0}")]
    Failed(String),
    /// The migration task is gone (the proxy is stopping).
    #[error("the migration task has stopped")]
    Stopped,
}

impl From<String> for MigrationError {
    fn from(why: String) -> Self {
        Self::Failed(why)
    }
}

impl From<&str> for MigrationError {
    fn from(why: &str) -> Self {
        Self::Failed(why.to_string())
    }
}

type Reply<T> = oneshot::Sender<Result<T, MigrationError>>;
type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

enum Request {
    Start(MigrateArgs, Reply<String>),
    Finish(MigrateFinishArgs, Reply<MigrationStatus>),
    Cancel(Reply<()>),
    Complete(Reply<()>),
    Reclaim(bool, Reply<()>),
}

/// The state `query-migrate` and `query-status` read.
#[derive(Debug, Default)]
struct Shared {
    machine: Mutex<SourceSession>,
    progress: Arc<Mutex<Progress>>,
    postcopy: Arc<Mutex<Option<PostcopyStatus>>>,
    /// `migrate-cancel`s asked, counted as they arrive (before the actor takes them in turn).
    cancels: Cancels,
}

/// A count of `migrate-cancel`s, readable while the actor is busy with another request.
#[derive(Debug, Default)]
struct Cancels(std::sync::atomic::AtomicU64);

impl Cancels {
    fn count(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }

    fn ask(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Resolves once a cancel was asked after the count was `before`.
    async fn asked_since(&self, before: u64) {
        while self.count() == before {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The control socket's handle on outgoing migrations.
#[derive(Debug, Clone)]
pub struct Outgoing {
    requests: mpsc::Sender<Request>,
    shared: Arc<Shared>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Outgoing {
    /// Starts the actor. `record` is the ownership record found at start-up: a source's
    /// hand-over keeps writes refused, an interrupted pre-copy is rolled back.
    pub async fn spawn(proxy: Arc<Proxy>, record: Option<&Ownership>) -> Self {
        let (machine, actions) = match record {
            Some(r @ Ownership::Source { .. }) => SourceSession::restore(r),
            _ => (SourceSession::new(), Vec::new()),
        };
        let shared = Arc::new(Shared { machine: Mutex::new(machine), ..Shared::default() });
        let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
        let mut actor = Actor { proxy, shared: shared.clone(), requests: rx, session: None };
        if !actions.is_empty() {
            tracing::info!(phase = %actor.phase(), "restoring the migration state recorded before the restart");
            if let Err(e) = actor.perform(actions).await {
                tracing::error!("restoring the migration state: {e}");
            }
        }
        tokio::spawn(actor.run());
        Self { requests: tx, shared }
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, MigrationError> {
        let (tx, rx) = oneshot::channel();
        self.requests.send(make(tx)).await.map_err(|_| MigrationError::Stopped)?;
        rx.await.map_err(|_| MigrationError::Stopped)?
    }

    /// `migrate-start`; returns the session id.
    pub async fn start(&self, args: MigrateArgs) -> Result<String, MigrationError> {
        self.ask(|r| Request::Start(args, r)).await
    }

    /// `migrate-finish`.
    pub async fn finish(&self, args: MigrateFinishArgs) -> Result<MigrationStatus, MigrationError> {
        self.ask(|r| Request::Finish(args, r)).await
    }

    /// `migrate-cancel`. Counted at once, so that a final round under way (which holds the
    /// actor) stops before its commit.
    pub async fn cancel(&self) -> Result<(), MigrationError> {
        self.shared.cancels.ask();
        self.ask(Request::Cancel).await
    }

    /// `migrate-complete`.
    pub async fn complete(&self) -> Result<(), MigrationError> {
        self.ask(Request::Complete).await
    }

    /// `reclaim`.
    pub async fn reclaim(&self, force: bool) -> Result<(), MigrationError> {
        self.ask(|r| Request::Reclaim(force, r)).await
    }

    /// The status for `query-migrate`.
    pub fn status(&self) -> MigrationStatus {
        status_of(&self.shared)
    }

    /// The persisted hand-over, if writes are refused because of one.
    pub fn fence(&self) -> Option<Fence> {
        lock(&self.shared.machine).fence()
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        lock(&self.shared.machine).phase()
    }
}

fn status_of(shared: &Shared) -> MigrationStatus {
    let m = lock(&shared.machine);
    let p = lock(&shared.progress);
    let mut s = MigrationStatus::new(m.phase(), m.strategy());
    s.session = m.session().map(|id| id.to_string());
    s.error = m.error().map(str::to_string);
    s.round = p.round;
    s.rounds = p.rounds.clone();
    s.round_remaining_blocks = p.remaining_blocks;
    s.round_blocks = p.round_blocks;
    s.rate = p.rate;
    s.total_seconds = p.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
    s.update_totals();
    s.predicted_final_ms = p.predicted_final_ms;
    s.postcopy = lock(&shared.postcopy).clone();
    if let Some(pc) = s.postcopy.as_mut().filter(|pc| !pc.done) {
        // While the push runs, what it still has to send.
        if p.sending == Some(RoundKind::Postcopy) {
            pc.remaining_blocks = p.remaining_blocks;
        }
    }
    s
}

/// The write statistics of the disk, for the round planners.
struct DiskLog<'a>(&'a Disk);

impl WriteLog for DiskLog<'_> {
    fn for_each_written(&self, f: &mut dyn FnMut(Written)) {
        for r in self.0.written_runs() {
            f(Written { start: r.start, len: r.len, writes: r.writes, epoch: r.epoch, zero: r.zero });
        }
    }

    fn mark(&self) -> u64 {
        self.0.mark()
    }
}

/// What the session's rounds are planned with.
enum Plan {
    Row(RowPlan),
    Bitmap(BitmapPlan),
}

impl Plan {
    fn mark(&mut self, sent: &Sent) {
        if let Plan::Row(row) = self {
            for &(first, count, epoch) in sent {
                row.mark_sent(first, count, epoch);
            }
        }
    }
}

/// The connection of a session: paced writes, and the destination's frames as they come.
struct Conn {
    out: Out,
    from_dest: mpsc::Receiver<Result<Message>>,
    /// The destination's `Claim`s (its guest wants to write), apart from its answers.
    claims: mpsc::Receiver<()>,
    /// Frames that go ahead of the rounds (fetch answers, claim refusals).
    urgent_tx: mpsc::Sender<Vec<u8>>,
    reader: JoinHandle<()>,
    fetcher: JoinHandle<()>,
}

impl Conn {
    /// The connection's halves; the destination's fetches are answered from `disk`.
    fn new(reader: FrameReader<Reader>, writer: Writer, max_bandwidth: Option<u64>, fetch: Fetcher) -> Self {
        let (tx, rx) = mpsc::channel(16);
        let (fetch_tx, fetch_rx) = mpsc::channel(FETCH_QUEUE);
        let (urgent_tx, urgent) = mpsc::channel(FETCH_QUEUE);
        let (claim_tx, claims) = mpsc::channel(1);
        let reader = tokio::spawn(forward_frames(reader, tx, fetch_tx, claim_tx));
        let fetcher = tokio::spawn(fetch.serve(fetch_rx, urgent_tx.clone()));
        Self {
            out: Out { writer, limit: RateLimit::new(max_bandwidth), urgent },
            from_dest: rx,
            claims,
            urgent_tx,
            reader,
            fetcher,
        }
    }

    /// Tells the destination its claim is refused, ahead of the rounds' frames.
    async fn refuse_claim(&self, why: &str) {
        tracing::warn!("the destination asked for the disk (its guest writes): refused: {why}");
        let mut frame = Vec::new();
        Message::ClaimRefused { reason: why.to_string() }.encode(&mut frame);
        let _ = self.urgent_tx.send(frame).await;
    }

    /// A broken pipe often hides the destination's own reason, sent just before it closed: the
    /// `Error` it sent, if one arrives within [`REASON_WAIT`].
    async fn destination_reason(&mut self) -> Option<String> {
        match tokio::time::timeout(REASON_WAIT, self.from_dest.recv()).await {
            Ok(Some(Ok(Message::Error { message }))) => Some(format!("the destination failed: {message}")),
            _ => None,
        }
    }

    /// The destination's next frame (or what ended its stream), answering its fetches while
    /// waiting; `None` once `deadline` passes.
    async fn next_answering(&mut self, deadline: tokio::time::Instant) -> Result<Option<Option<Result<Message>>>> {
        loop {
            let next = tokio::time::timeout_at(deadline, async {
                tokio::select! {
                    biased;
                    Some(f) = self.out.urgent.recv() => Err(f),
                    m = self.from_dest.recv() => Ok(m),
                }
            })
            .await;
            match next {
                Err(_) => return Ok(None),
                Ok(Err(frame)) => self.out.send_urgent(&frame).await?,
                Ok(Ok(m)) => return Ok(Some(m)),
            }
        }
    }

    /// Best-effort last message, then close.
    async fn close_with(mut self, msg: &Message) {
        last_word(&mut self.out.writer, msg).await;
        self.reader.abort();
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
        self.fetcher.abort();
    }
}

/// Answers the destination's fetches: reads the disk as it is now and frames the data.
#[derive(Clone)]
struct Fetcher {
    disk: Arc<Disk>,
    compress: bool,
    /// Fetches answered, for `query-migrate`.
    postcopy: Arc<Mutex<Option<PostcopyStatus>>>,
}

impl Fetcher {
    async fn serve(self, mut fetches: mpsc::Receiver<(u64, u64, u32)>, urgent: mpsc::Sender<Vec<u8>>) {
        while let Some((id, offset, len)) = fetches.recv().await {
            let (disk, compress) = (self.disk.clone(), self.compress);
            let frame = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
                if offset.checked_add(len as u64).is_none_or(|end| end > disk.size()) {
                    return Err(std::io::Error::other(format!("fetch at {offset}+{len} lies outside the disk")));
                }
                let mut buf = Vec::with_capacity(len as usize);
                disk.read_append(&mut buf, len as usize, offset)?;
                let mut frame = Vec::new();
                Message::fetched(id, offset, &buf, compress).encode(&mut frame);
                Ok(frame)
            })
            .await;
            match frame {
                Ok(Ok(frame)) => {
                    if let Some(p) = lock(&self.postcopy).as_mut() {
                        p.fetches += 1;
                    }
                    if urgent.send(frame).await.is_err() {
                        return;
                    }
                }
                Ok(Err(e)) => tracing::warn!("answering a fetch of the destination: {e}"),
                Err(e) => tracing::warn!("answering a fetch of the destination: {e}"),
            }
        }
    }
}

/// Forwards the destination's frames (its fetches to the fetcher); the last item is the error
/// or end that stopped it.
async fn forward_frames(
    mut reader: FrameReader<Reader>,
    tx: mpsc::Sender<Result<Message>>,
    fetches: mpsc::Sender<(u64, u64, u32)>,
    claims: mpsc::Sender<()>,
) {
    loop {
        let item = match reader.next().await {
            Ok(Some(Message::Fetch { id, offset, len })) => {
                if fetches.send((id, offset, len)).await.is_err() {
                    return;
                }
                continue;
            }
            Ok(Some(Message::Claim)) => {
                // One pending claim is enough; the session's phase decides what it gets.
                let _ = claims.try_send(());
                continue;
            }
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err(anyhow!("the destination closed the connection")),
            Err(e) => Err(e),
        };
        let end = item.is_err();
        if tx.send(item).await.is_err() || end {
            return;
        }
    }
}

/// What a frame from the destination means when none was expected.
fn dest_problem(msg: Option<Result<Message>>) -> String {
    match msg {
        Some(Ok(Message::Error { message })) => format!("the destination failed: {message}"),
        Some(Ok(other)) => format!("unexpected {} from the destination", other.name()),
        Some(Err(e)) => format!("{e:#}"),
        None => "the destination closed the connection".into(),
    }
}

/// Where the session's connection is.
enum Link {
    /// No connection.
    None,
    /// Connected, nothing running on it.
    Idle(Conn, Plan),
    /// The pre-copy rounds own it; they give it back when they end.
    Precopy { job: JoinHandle<(Conn, Plan, Result<()>)>, stop: watch::Sender<bool> },
    /// Post-copy: the push owns it (and reconnects), until the destination holds everything.
    Postcopy { job: JoinHandle<Result<()>>, stop: watch::Sender<bool> },
    /// Armed and ready: the update passes own it until a claim (true), a stop or a failure.
    Armed { job: JoinHandle<(Conn, Plan, Result<bool>)>, stop: watch::Sender<bool> },
}

/// One migration's settings and connection.
struct Session {
    args: MigrateArgs,
    rounds: Arc<Rounds>,
    link: Link,
    /// What a post-copy switchover left for the push.
    residual: Vec<Span>,
}

struct Actor {
    proxy: Arc<Proxy>,
    shared: Arc<Shared>,
    requests: mpsc::Receiver<Request>,
    session: Option<Session>,
}

/// What the actor is woken by.
enum Wake {
    Request(Option<Request>),
    PrecopyEnded(std::result::Result<(Conn, Plan, Result<()>), tokio::task::JoinError>),
    FromDest(Option<Result<Message>>),
    /// A fetch answer to send on an idle session.
    Urgent(Vec<u8>),
    /// The post-copy push ended: the destination holds everything (or it was stopped).
    PushEnded(std::result::Result<Result<()>, tokio::task::JoinError>),
    /// Nothing happened for [`KEEPALIVE_EVERY`] on an idle session.
    Quiet,
    /// The destination's guest wants to write: it asks for the disk.
    Claim,
    /// The armed update passes ended: claimed (true), stopped, or failed.
    ArmedEnded(std::result::Result<(Conn, Plan, Result<bool>), tokio::task::JoinError>),
}

impl Actor {
    fn phase(&self) -> Phase {
        lock(&self.shared.machine).phase()
    }

    /// Applies an input to the state machine, announcing a phase change.
    fn step(
        &self,
        f: impl FnOnce(&mut SourceSession) -> Result<Vec<SourceAction>, SourceRefusal>,
    ) -> Result<Vec<SourceAction>, MigrationError> {
        let (before, after, result) = {
            let mut m = lock(&self.shared.machine);
            let before = m.phase();
            let result = f(&mut m);
            (before, m.phase(), result)
        };
        if before != after {
            tracing::info!(from = %before, to = %after, "migration phase");
            self.proxy.events.emit::<MigrationState>(MigrationStateData { phase: after });
        }
        result.map_err(MigrationError::Refused)
    }

    async fn run(mut self) {
        loop {
            let wake = {
                let (requests, session) = (&mut self.requests, &mut self.session);
                match session.as_mut().map(|s| &mut s.link) {
                    Some(Link::Precopy { job, .. }) => tokio::select! {
                        r = requests.recv() => Wake::Request(r),
                        done = job => Wake::PrecopyEnded(done),
                    },
                    Some(Link::Armed { job, .. }) => tokio::select! {
                        r = requests.recv() => Wake::Request(r),
                        done = job => Wake::ArmedEnded(done),
                    },
                    Some(Link::Idle(conn, _)) => tokio::select! {
                        r = requests.recv() => Wake::Request(r),
                        Some(f) = conn.out.urgent.recv() => Wake::Urgent(f),
                        Some(()) = conn.claims.recv() => Wake::Claim,
                        m = conn.from_dest.recv() => Wake::FromDest(m),
                        _ = tokio::time::sleep(KEEPALIVE_EVERY) => Wake::Quiet,
                    },
                    Some(Link::Postcopy { job, .. }) => tokio::select! {
                        r = requests.recv() => Wake::Request(r),
                        done = job => Wake::PushEnded(done),
                    },
                    _ => Wake::Request(requests.recv().await),
                }
            };
            match wake {
                Wake::Request(None) => return,
                Wake::Request(Some(req)) => self.handle(req).await,
                Wake::PrecopyEnded(done) => self.precopy_ended(done).await,
                Wake::Claim => self.claimed().await,
                Wake::ArmedEnded(done) => self.armed_ended(done).await,
                Wake::Quiet => {
                    if let Some(Link::Idle(conn, _)) = self.session.as_mut().map(|s| &mut s.link) {
                        if let Err(e) = send(&mut conn.out.writer, &Message::Keepalive).await {
                            let why = format!("{e:#}");
                            self.session.as_mut().expect("idle").link = Link::None;
                            self.fail(&why).await;
                        }
                    }
                }
                Wake::Urgent(frame) => {
                    if let Some(Link::Idle(conn, _)) = self.session.as_mut().map(|s| &mut s.link) {
                        if let Err(e) = conn.out.send_urgent(&frame).await {
                            let why = format!("{e:#}");
                            self.session.as_mut().expect("idle").link = Link::None;
                            self.fail(&why).await;
                        }
                    }
                }
                Wake::PushEnded(done) => {
                    if let Some(s) = self.session.as_mut() {
                        s.link = Link::None;
                    }
                    match done {
                        Ok(Ok(())) => {
                            tracing::info!("post-copy complete: the destination holds every block");
                            if let Some(p) = lock(&self.shared.postcopy).as_mut() {
                                p.done = true;
                                p.remaining_blocks = 0;
                                p.stalled = None;
                            }
                            match self.step(SourceSession::postcopy_done) {
                                Ok(actions) => {
                                    if let Err(e) = self.perform(actions).await {
                                        tracing::error!("recording the end of the post-copy: {e}");
                                    }
                                }
                                Err(e) => tracing::error!("the end of the post-copy: {e}"),
                            }
                            // A claimed hand-over completes here, after a restart too.
                            if lock(&self.shared.machine).claimed() {
                                self.complete_claimed().await;
                            }
                        }
                        Ok(Err(e)) => tracing::warn!("the post-copy push stopped: {e:#}"),
                        Err(e) => tracing::error!("the post-copy push task failed: {e}"),
                    }
                }
                Wake::FromDest(msg) => {
                    // Between rounds nothing is expected: the destination failed or went away.
                    let why = dest_problem(msg);
                    if let Some(s) = self.session.as_mut() {
                        s.link = Link::None;
                    }
                    self.fail(&why).await;
                }
            }
        }
    }

    async fn handle(&mut self, req: Request) {
        // Whatever is asked of an armed session, its update passes stop first (at a frame
        // boundary), so the request finds the connection idle.
        self.stop_armed_updates().await;
        match req {
            Request::Start(args, reply) => {
                let _ = reply.send(self.start(args).await);
            }
            Request::Finish(args, reply) => {
                let _ = reply.send(self.finish(args, false).await);
            }
            Request::Cancel(reply) => {
                let _ = reply.send(self.cancel().await);
            }
            Request::Complete(reply) => {
                let r = self.step(SourceSession::complete);
                let r = match r {
                    Ok(actions) => self.perform(actions).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Request::Reclaim(force, reply) => {
                let r = match self.step(|m| m.reclaim(force)) {
                    Ok(actions) => self.perform(actions).await,
                    Err(e) => Err(e),
                };
                if force && r.is_ok() {
                    tracing::warn!(
                        "the disk was reclaimed by force: if the destination runs the guest, both hosts now write"
                    );
                }
                let _ = reply.send(r);
            }
        }
        // A request that left the session armed and ready (a refused one) resumes the passes.
        self.run_armed_updates();
    }

    /// Performs actions in order: the quick ones here, the long ones by their own methods (which
    /// perform the actions of the inputs they feed back, hence the boxed future).
    fn perform(&mut self, actions: Vec<SourceAction>) -> BoxFuture<'_, Result<(), MigrationError>> {
        Box::pin(self.perform_all(actions))
    }

    async fn perform_all(&mut self, actions: Vec<SourceAction>) -> Result<(), MigrationError> {
        for action in actions {
            match action {
                SourceAction::Persist(record) => {
                    let file = self.proxy.record.clone();
                    tokio::task::spawn_blocking(move || file.store(record.as_ref()))
                        .await
                        .map_err(|e| e.to_string())?
                        .map_err(|e| {
                            format!("writing the ownership record {}: {e}", self.proxy.record.path().display())
                        })?;
                }
                SourceAction::RefuseWrites(reason) => self.set_access(Access::Fenced(reason)).await,
                SourceAction::AllowWrites => self.set_access(Access::Open).await,
                SourceAction::RollBack => self.roll_back().await,
                SourceAction::SendDiscard(reason) => {
                    if let Some(conn) = self.take_conn().await {
                        conn.close_with(&Message::Discard { reason }).await;
                    }
                }
                SourceAction::SendDone => {
                    if let Some(conn) = self.take_conn().await {
                        conn.close_with(&Message::Done).await;
                    }
                }
                SourceAction::Connect => self.connect().await?,
                SourceAction::RunPrecopy => self.run_precopy(),
                SourceAction::RunFinalRound => return Err("the final round needs migrate-finish's arguments".into()),
                SourceAction::AskRevoke => return self.revoke().await,
                SourceAction::Push => self.run_push(),
            }
        }
        Ok(())
    }

    async fn set_access(&self, access: Access) {
        let gate = self.proxy.gate.clone();
        let _ = tokio::task::spawn_blocking(move || gate.set(access)).await;
    }

    /// Gives the disk back to the source's own use.
    async fn roll_back(&self) {
        let strategy = lock(&self.shared.machine).strategy().unwrap_or_default();
        let proxy = self.proxy.clone();
        let r = tokio::task::spawn_blocking(move || -> Result<()> {
            match strategy {
                Strategy::Row if matches!(proxy.disk.mode(), Mode::Row | Mode::Merging) => {
                    proxy.start_merge()?;
                }
                Strategy::Row => {}
                Strategy::Bitmap => proxy.disk.set_tracking(false)?,
            }
            Ok(())
        })
        .await;
        if let Ok(Err(e)) | Err(e) = r.map_err(anyhow::Error::from) {
            tracing::error!("giving the disk back: {e:#}");
        }
    }

    /// Takes the session's connection, stopping the pre-copy rounds if they hold it.
    async fn take_conn(&mut self) -> Option<Conn> {
        let session = self.session.as_mut()?;
        match std::mem::replace(&mut session.link, Link::None) {
            Link::None => None,
            Link::Idle(conn, plan) => {
                drop(plan);
                Some(conn)
            }
            Link::Postcopy { mut job, stop } => {
                let _ = stop.send(true);
                if tokio::time::timeout(PRECOPY_STOP_TIMEOUT, &mut job).await.is_err() {
                    job.abort();
                }
                None
            }
            Link::Armed { job, stop } => {
                let _ = stop.send(true);
                job.await.ok().map(|(conn, _, _)| conn)
            }
            Link::Precopy { mut job, stop } => {
                let _ = stop.send(true);
                match tokio::time::timeout(PRECOPY_STOP_TIMEOUT, &mut job).await {
                    Ok(Ok((conn, _, _))) => Some(conn),
                    Ok(Err(_)) => None,
                    Err(_) => {
                        job.abort();
                        None
                    }
                }
            }
        }
    }

    async fn start(&mut self, args: MigrateArgs) -> Result<String, MigrationError> {
        self.proxy.protection.usable().map_err(|e| e.to_string())?;
        if self.proxy.gate.access() == Access::Incoming {
            return Err("this disk is still arriving by migration".into());
        }
        if lock(&self.shared.machine).phase().is_active() {
            return Err(SourceRefusal::Busy(self.phase()).into());
        }
        // A merge left by a cancelled or failed migration must end first.
        if self.proxy.disk.mode() == Mode::Merging {
            self.proxy.merge().await.map_err(|e| MigrationError::Failed(e.to_string()))?;
        }
        if args.strategy == Strategy::Bitmap && self.proxy.disk.mode() != Mode::Direct {
            return Err("the bitmap strategy needs the disk in direct mode (ROW is on)".into());
        }
        let id = SessionId(migration_stream::nonce()[..16].try_into().expect("16 bytes"));
        let actions = self.step(|m| m.start(id, &args.uri, args.strategy))?;
        *lock(&self.shared.progress) = Progress { started: Some(Instant::now()), ..Progress::default() };
        let rounds = Arc::new(Rounds {
            disk: self.proxy.disk.clone(),
            progress: self.shared.progress.clone(),
            events: self.proxy.events.clone(),
            compress: args.compress,
        });
        *lock(&self.shared.postcopy) = None;
        self.session = Some(Session { args, rounds, link: Link::None, residual: Vec::new() });
        self.perform(actions).await?;
        Ok(id.to_string())
    }

    /// Connects, authenticates and prepares the disk for the rounds.
    async fn connect(&mut self) -> Result<(), MigrationError> {
        let session = self.session.as_ref().expect("a session is starting");
        let args = session.args.clone();
        let id = lock(&self.shared.machine).session().expect("started");
        let params = session_params(id, self.proxy.disk.size(), args.strategy);
        let protection = &self.proxy.protection;
        let connected = async {
            let (reader, writer) = connect(&args.uri, protection, &params, args.tls_hostname.as_deref()).await?;
            let plan = self.prepare(&args).await?;
            Ok::<_, anyhow::Error>((reader, writer, plan))
        }
        .await;
        match connected {
            Ok((reader, writer, plan)) => {
                tracing::info!(uri = %args.uri, strategy = %args.strategy, session = %id, protection = protection.describe(), "migration session authenticated");
                let conn = Conn::new(reader, writer, args.max_bandwidth, self.fetcher(args.compress));
                self.session.as_mut().expect("starting").link = Link::Idle(conn, plan);
                let actions = self.step(SourceSession::connected)?;
                self.perform(actions).await
            }
            Err(e) => {
                let why = format!("{e:#}");
                self.fail(&why).await;
                Err(why.into())
            }
        }
    }

    /// Puts the disk in the mode the strategy reads: ROW (the frozen base), or dirty tracking.
    async fn prepare(&self, args: &MigrateArgs) -> Result<Plan> {
        let disk = self.proxy.disk.clone();
        let (strategy, granularity) = (args.strategy, args.bitmap_granularity_blocks);
        tokio::task::spawn_blocking(move || -> Result<Plan> {
            Ok(match strategy {
                Strategy::Row => {
                    match disk.mode() {
                        Mode::Direct => disk.row_start()?,
                        Mode::Row => {}
                        Mode::Merging => bail!("a merge is still running; retry when it has finished"),
                    }
                    Plan::Row(RowPlan::default())
                }
                Strategy::Bitmap => {
                    disk.set_tracking(true)?;
                    Plan::Bitmap(BitmapPlan::new(granularity, disk.size().div_ceil(BLOCK_SIZE)))
                }
            })
        })
        .await?
    }

    fn run_precopy(&mut self) {
        let session = self.session.as_mut().expect("connected");
        let Link::Idle(conn, plan) = std::mem::replace(&mut session.link, Link::None) else {
            return;
        };
        let (stop, stopped) = watch::channel(false);
        let job = tokio::spawn(precopy(
            self.proxy.disk.clone(),
            session.rounds.clone(),
            session.args.clone(),
            conn,
            plan,
            stopped,
        ));
        session.link = Link::Precopy { job, stop };
    }

    async fn precopy_ended(&mut self, done: std::result::Result<(Conn, Plan, Result<()>), tokio::task::JoinError>) {
        let session = self.session.as_mut().expect("pre-copy ran");
        session.link = Link::None;
        match done {
            Ok((conn, plan, Ok(()))) => {
                session.link = Link::Idle(conn, plan);
                let _ = self.step(SourceSession::precopy_done);
                self.run_armed_updates();
            }
            Ok((mut conn, plan, Err(e))) => {
                let why = conn.destination_reason().await.unwrap_or_else(|| format!("{e:#}"));
                session.link = Link::Idle(conn, plan);
                self.fail(&why).await;
            }
            Err(e) => self.fail(&format!("the pre-copy task failed: {e}")).await,
        }
    }

    /// An armed, ready row session keeps sending what the guest has finished with (see
    /// [`armed_updates`]) until the destination claims the disk or a request comes.
    fn run_armed_updates(&mut self) {
        let ready = self.shared_phase() == Phase::Ready;
        let Some(session) = self.session.as_mut() else { return };
        if !session.args.arm || !ready {
            return;
        }
        let link = std::mem::replace(&mut session.link, Link::None);
        let Link::Idle(conn, plan) = link else {
            session.link = link;
            return;
        };
        if !matches!(plan, Plan::Row(_)) {
            session.link = Link::Idle(conn, plan);
            return;
        }
        let (stop, stopped) = watch::channel(false);
        let job = tokio::spawn(armed_updates(
            self.proxy.disk.clone(),
            session.rounds.clone(),
            session.args.clone(),
            conn,
            plan,
            stopped,
        ));
        session.link = Link::Armed { job, stop };
    }

    fn shared_phase(&self) -> Phase {
        lock(&self.shared.machine).phase()
    }

    /// Stops the armed update passes (after the pass in progress) and puts the connection back.
    async fn stop_armed_updates(&mut self) {
        let Some(session) = self.session.as_mut() else { return };
        let link = std::mem::replace(&mut session.link, Link::None);
        let Link::Armed { job, stop } = link else {
            session.link = link;
            return;
        };
        let _ = stop.send(true);
        let done = job.await;
        self.armed_ended(done).await;
    }

    /// The armed update passes ended: a claim hands the disk over, a stop leaves the session
    /// idle (and ready), a failure fails it.
    async fn armed_ended(&mut self, done: std::result::Result<(Conn, Plan, Result<bool>), tokio::task::JoinError>) {
        let Some(session) = self.session.as_mut() else { return };
        match done {
            Ok((conn, plan, Ok(claimed))) => {
                session.link = Link::Idle(conn, plan);
                if claimed {
                    self.claimed().await;
                }
            }
            Ok((mut conn, plan, Err(e))) => {
                let why = conn.destination_reason().await.unwrap_or_else(|| format!("{e:#}"));
                session.link = Link::Idle(conn, plan);
                self.fail(&why).await;
            }
            Err(e) => {
                session.link = Link::None;
                self.fail(&format!("the armed update task failed: {e}")).await;
            }
        }
    }

    /// The session failed: the state machine decides whether to roll back.
    async fn fail(&mut self, why: &str) {
        let before = self.phase();
        match self.step(|m| m.transport_failed(why)) {
            Ok(actions) => {
                if self.phase() == Phase::Failed && before != Phase::Failed {
                    tracing::error!("migration failed: {why}");
                    self.proxy.events.emit::<MigrationFailed>(ErrorData { error: why.to_string() });
                } else {
                    tracing::warn!(phase = %self.phase(), "migration link lost: {why}");
                }
                if let Err(e) = self.perform(actions).await {
                    tracing::error!("rolling back: {e}");
                }
            }
            Err(e) => tracing::error!("migration failure not handled: {e}"),
        }
    }

    /// `migrate-finish`, or (`claimed`) the destination's claim.
    async fn finish(&mut self, args: MigrateFinishArgs, claimed: bool) -> Result<MigrationStatus, MigrationError> {
        let actions = self.step(|m| if claimed { m.finish_claimed() } else { m.finish() })?;
        let run_final = actions.contains(&SourceAction::RunFinalRound);
        let rest: Vec<SourceAction> = actions.into_iter().filter(|a| *a != SourceAction::RunFinalRound).collect();
        let mut result = self.perform(rest).await;
        if result.is_ok() && run_final {
            result = self.final_round(&args).await;
        }
        if let Err(e) = result {
            // Nothing was committed unless the commit went out: the machine decides whether to
            // roll back or to keep refusing writes.
            if self.phase() == Phase::Finishing {
                self.fail(&e.to_string()).await;
            }
            return Err(lock(&self.shared.machine).error().map_or(e, MigrationError::from));
        }
        Ok(status_of(&self.shared))
    }

    /// The destination asked for the disk: its guest runs there (a VM manager migrated it) and
    /// wants to write. An armed, ready session hands the disk over as `migrate-finish` with
    /// post-copy would (writes here are refused first), and completes by itself once the
    /// destination holds every block; otherwise the claim is refused.
    async fn claimed(&mut self) {
        let armed = self.session.as_ref().is_some_and(|s| s.args.arm);
        let refusal = match self.phase() {
            // A hand-over is under way or done: the destination's write waits for its commit.
            Phase::Finishing | Phase::HandedOver | Phase::Completed => return,
            _ if !armed => {
                Some("this migration is not armed for a hand-over by the destination's writes (migrate-start arm)")
            }
            Phase::Ready => None,
            _ => Some("the migration is not ready for a hand-over"),
        };
        if let Some(why) = refusal {
            if let Some(Link::Idle(conn, _)) = self.session.as_ref().map(|s| &s.link) {
                conn.refuse_claim(why).await;
            }
            return;
        }
        tracing::info!("the destination's guest writes: handing the disk over (a VM manager migrated it)");
        let finish = MigrateFinishArgs { postcopy: Some(PostcopyMode::Always), budget_ms: None };
        match self.finish(finish, true).await {
            Ok(_) if lock(&self.shared.postcopy).is_none() => self.complete_claimed().await,
            Ok(_) => {}
            Err(e) => tracing::error!("the hand-over the destination asked for failed: {e}"),
        }
    }

    /// The end of a hand-over the destination claimed: nobody else will say it is complete.
    async fn complete_claimed(&mut self) {
        match self.step(SourceSession::complete) {
            Ok(actions) => match self.perform(actions).await {
                Ok(()) => tracing::info!("migration complete: the destination owns the disk"),
                Err(e) => tracing::error!("completing the claimed hand-over: {e}"),
            },
            Err(e) => tracing::error!("completing the claimed hand-over: {e}"),
        }
    }

    /// What answers the destination's fetches on this session's connections.
    fn fetcher(&self, compress: bool) -> Fetcher {
        Fetcher { disk: self.proxy.disk.clone(), compress, postcopy: self.shared.postcopy.clone() }
    }

    /// Whether the final round leaves its data for after the switchover, and why.
    fn decide_postcopy(
        &self,
        finish: &MigrateFinishArgs,
        args: &MigrateArgs,
        rounds: &Rounds,
        spans: &[Span],
    ) -> Option<PostcopyStatus> {
        let blocks: u64 = spans.iter().filter(|s| !s.zero).map(|s| s.count).sum();
        let rate = link::planning_rate(rounds.first_round_rate(), args.max_bandwidth.map(|b| b as f64));
        let predicted_ms = link::transfer_ms(blocks * BLOCK_SIZE, rate);
        if predicted_ms.is_finite() {
            lock(&rounds.progress).predicted_final_ms = Some(predicted_ms);
        }
        let budget_ms = finish.budget_ms.or(args.final_budget.map(|b| b.as_millis() as u64));
        let reason = match finish.postcopy.unwrap_or(PostcopyMode::Never) {
            _ if blocks == 0 => return None,
            PostcopyMode::Never => return None,
            PostcopyMode::Always => "postcopy: always".to_string(),
            PostcopyMode::Auto => {
                match budget_ms {
                    Some(b) if predicted_ms > b as f64 => {
                        format!("the final round would take {predicted_ms:.0} ms at the measured rate, over the {b} ms budget")
                    }
                    _ => return None,
                }
            }
        };
        Some(PostcopyStatus {
            reason,
            predicted_final_ms: if predicted_ms.is_finite() { predicted_ms } else { 0.0 },
            blocks,
            remaining_blocks: blocks,
            fetches: 0,
            reconnects: 0,
            done: false,
            stalled: None,
        })
    }

    /// Sends the final round and the commit, and waits for the destination's answer. With
    /// post-copy the final round holds only zeroed ranges; the data ranges are announced as
    /// missing and pushed after the commit.
    async fn final_round(&mut self, finish: &MigrateFinishArgs) -> Result<(), MigrationError> {
        let session = self.session.as_ref().ok_or("no session connection: the migration restarted")?;
        let (rounds, args) = (session.rounds.clone(), session.args.clone());
        let session = self.session.as_mut().expect("checked");
        let Link::Idle(mut conn, mut plan) = std::mem::replace(&mut session.link, Link::None) else {
            return Err("the session's connection is gone".into());
        };
        let disk = self.proxy.disk.clone();
        let mut postcopy = None;
        let mut residual = Vec::new();
        let cancels_before = self.shared.cancels.count();
        let result: Result<()> = async {
            pause("final-round").await;
            let log = DiskLog(&disk);
            let ranges = match &mut plan {
                Plan::Row(row) => row.final_spans(&log),
                Plan::Bitmap(bm) => bm.next_round(&log),
            };
            postcopy = self.decide_postcopy(finish, &args, &rounds, &ranges);
            let ranges = if let Some(p) = &postcopy {
                tracing::info!(blocks = p.blocks, reason = %p.reason, "post-copy: the final round leaves its data for after the switchover");
                let (data, zero): (Vec<Span>, Vec<Span>) = ranges.into_iter().partition(|s| !s.zero);
                residual = data;
                zero
            } else {
                ranges
            };
            let live: Arc<dyn BlockBackend> = disk.clone();
            let started = Instant::now();
            let sent = async {
                rounds.send(&mut conn.out, RoundKind::Final, live, ranges).await?;
                let sent_at = started.elapsed();
                if !residual.is_empty() {
                    let size = disk.size();
                    let ranges: Vec<(u64, u64)> = residual
                        .iter()
                        .map(|s| {
                            let offset = s.first * BLOCK_SIZE;
                            (offset, ((s.first + s.count) * BLOCK_SIZE).min(size) - offset)
                        })
                        .collect();
                    let mut frames = Vec::new();
                    for m in migration_stream::missing_frames(&ranges) {
                        m.encode(&mut frames);
                    }
                    conn.out.send_urgent(&frames).await?;
                    // After this commit the source's disk is the only copy of the residual: it
                    // must survive a crash of this host (the guest's last writes may not have
                    // been flushed when it paused).
                    let d = disk.clone();
                    let synced = Instant::now();
                    tokio::task::spawn_blocking(move || d.flush())
                        .await?
                        .context("syncing the disk before a post-copy")?;
                    tracing::info!(
                        round_ms = sent_at.as_millis() as u64,
                        missing_ranges = residual.len(),
                        missing_bytes = frames.len(),
                        sync_ms = synced.elapsed().as_millis() as u64,
                        "final round sent with the post-copy's missing list"
                    );
                }
                Ok::<(), anyhow::Error>(())
            };
            // Until the commit goes out nothing is promised to the destination: a migrate-cancel
            // stops the round at once (a final round can take minutes on a slow link).
            tokio::select! {
                r = sent => r?,
                _ = self.shared.cancels.asked_since(cancels_before) => {
                    bail!("migrate-cancel during the final round: nothing was committed")
                }
            }
            // Between rounds the destination says nothing: a frame already here (an early
            // `Committed` among them) answers no commit of ours and must not be taken for one.
            if let Ok(early) = conn.from_dest.try_recv() {
                bail!("{} before the commit", dest_problem(Some(early)));
            }
            lock(&self.shared.machine).commit_sent();
            let commit_sent = Instant::now();
            send(&mut conn.out.writer, &Message::Commit).await?;
            let answer = conn
                .next_answering(tokio::time::Instant::now() + COMMIT_TIMEOUT)
                .await?
                .ok_or_else(|| anyhow!("the destination did not confirm the commit within {COMMIT_TIMEOUT:?}"))?;
            match answer {
                Some(Ok(Message::Committed)) => {}
                other => bail!("{}", dest_problem(other)),
            }
            tracing::info!(
                commit_ms = commit_sent.elapsed().as_millis() as u64,
                round_ms = started.elapsed().as_millis() as u64,
                "the destination confirmed the commit"
            );
            // The round's time includes the destination's sync: that is what the paused VM waits for.
            if let Some(r) = lock(&rounds.progress).rounds.last_mut() {
                r.seconds = started.elapsed().as_secs_f64();
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                tracing::info!("the destination committed: the disk is handed over");
                let session = self.session.as_mut().expect("session");
                session.link = Link::Idle(conn, plan);
                let actions = if let Some(p) = postcopy {
                    session.residual = residual;
                    *lock(&self.shared.postcopy) = Some(p);
                    self.step(SourceSession::committed_with_residual)?
                } else {
                    self.step(SourceSession::committed)?
                };
                self.perform(actions).await
            }
            Err(e) => {
                let why = conn.destination_reason().await.unwrap_or_else(|| format!("{e:#}"));
                // Put the connection back so a discard can still be sent on it.
                self.session.as_mut().expect("session").link = Link::Idle(conn, plan);
                Err(format!("the final disk round failed: {why}").into())
            }
        }
    }

    /// Starts the post-copy push: on the session's connection, or after a restart over a new
    /// one (the destination says what it still misses).
    fn run_push(&mut self) {
        if self.session.is_none() {
            // Restored after a restart: the session's settings come from the record.
            let (peer, strategy) = {
                let m = lock(&self.shared.machine);
                (m.peer().map(str::to_string), m.strategy())
            };
            let Some(peer) = peer else { return };
            let args = MigrateArgs {
                uri: peer,
                strategy: strategy.unwrap_or_default(),
                rounds: 0,
                hot_threshold: self.proxy.hot_threshold,
                max_bandwidth: None,
                compress: true,
                bitmap_granularity_blocks: 1,
                final_budget: None,
                tls_hostname: None,
                arm: false,
            };
            let rounds = Arc::new(Rounds {
                disk: self.proxy.disk.clone(),
                progress: self.shared.progress.clone(),
                events: self.proxy.events.clone(),
                compress: true,
            });
            self.session = Some(Session { args, rounds, link: Link::None, residual: Vec::new() });
            *lock(&self.shared.postcopy) = Some(PostcopyStatus {
                reason: "resumed after the source proxy restarted".into(),
                predicted_final_ms: 0.0,
                blocks: 0,
                remaining_blocks: 0,
                fetches: 0,
                reconnects: 0,
                done: false,
                stalled: None,
            });
        }
        let Some(id) = lock(&self.shared.machine).session() else { return };
        let fetcher = self.fetcher(self.session.as_ref().expect("set").args.compress);
        let session = self.session.as_mut().expect("set");
        let conn = match std::mem::replace(&mut session.link, Link::None) {
            Link::Idle(conn, _) => Some(conn),
            _ => None,
        };
        let ctx = PushCtx {
            disk: self.proxy.disk.clone(),
            rounds: session.rounds.clone(),
            protection: self.proxy.protection.clone(),
            peer: session.args.uri.clone(),
            tls_hostname: session.args.tls_hostname.clone(),
            params: session_params(id, self.proxy.disk.size(), session.args.strategy),
            max_bandwidth: session.args.max_bandwidth,
            fetcher,
            status: self.shared.postcopy.clone(),
        };
        let spans = std::mem::take(&mut session.residual);
        let (stop, stopped) = watch::channel(false);
        let job = tokio::spawn(push(ctx, conn, spans, stopped));
        session.link = Link::Postcopy { job, stop };
    }

    async fn cancel(&mut self) -> Result<(), MigrationError> {
        let actions = self.step(SourceSession::cancel)?;
        self.perform(actions).await
    }

    /// Asks the destination to give the disk back, over a new connection.
    async fn revoke(&mut self) -> Result<(), MigrationError> {
        if let Some(conn) = self.take_conn().await {
            drop(conn);
        }
        let (id, peer, strategy) = {
            let m = lock(&self.shared.machine);
            (m.session(), m.peer().map(str::to_string), m.strategy())
        };
        let (Some(id), Some(peer), Some(strategy)) = (id, peer, strategy) else {
            let actions = self.step(|m| m.revoke_answered(Err(Err("no session to revoke".into()))));
            return actions.map(|_| ());
        };
        let params = session_params(id, self.proxy.disk.size(), strategy);
        let asked = async {
            let (mut reader, mut writer) = connect(&peer, &self.proxy.protection, &params, None).await?;
            send(&mut writer, &Message::Revoke).await?;
            reader.next_within(REVOKE_TIMEOUT, "answer to the revoke").await
        }
        .await;
        let answer = match asked {
            Ok(Message::Revoked) => Ok(()),
            Ok(Message::Error { message }) => Err(Ok(message)),
            Ok(other) => Err(Err(format!("unexpected {} in answer to the revoke", other.name()))),
            Err(e) => Err(Err(format!("{e:#}"))),
        };
        if answer.is_ok() {
            tracing::info!(%peer, "the destination gave the disk back");
        }
        let actions = self.step(|m| m.revoke_answered(answer))?;
        self.perform(actions).await
    }
}

/// What the post-copy push needs.
struct PushCtx {
    disk: Arc<Disk>,
    rounds: Arc<Rounds>,
    protection: Protection,
    peer: String,
    tls_hostname: Option<String>,
    params: migration_stream::SessionParams,
    max_bandwidth: Option<u64>,
    fetcher: Fetcher,
    status: Arc<Mutex<Option<PostcopyStatus>>>,
}

impl PushCtx {
    fn status(&self, f: impl FnOnce(&mut PostcopyStatus)) {
        if let Some(p) = lock(&self.status).as_mut() {
            f(p);
        }
    }

    /// A new connection that resumes the post-copy: the ranges the destination still misses,
    /// or `None` if it holds everything.
    async fn resume(&self) -> Result<Option<(Conn, Vec<Span>)>> {
        let (mut reader, mut writer) =
            connect(&self.peer, &self.protection, &self.params, self.tls_hostname.as_deref()).await?;
        send(&mut writer, &Message::Resume).await?;
        let size = self.disk.size();
        let mut todo = Vec::new();
        loop {
            match reader.next_within(COMMIT_TIMEOUT, "the destination's missing ranges").await? {
                Message::Missing { runs } => {
                    for (offset, len) in runs {
                        if !offset.is_multiple_of(BLOCK_SIZE) || offset.checked_add(len).is_none_or(|e| e > size) {
                            bail!("the destination misses {offset}+{len}, which is not a range of blocks of this disk");
                        }
                        let first = offset / BLOCK_SIZE;
                        todo.push(Span { first, count: (offset + len).div_ceil(BLOCK_SIZE) - first, zero: false });
                    }
                }
                Message::Resumed => break,
                Message::Holds => return Ok(None),
                Message::Error { message } => bail!("the destination refused to resume: {message}"),
                other => bail!("unexpected {} in answer to Resume", other.name()),
            }
        }
        Ok(Some((Conn::new(reader, writer, self.max_bandwidth, self.fetcher.clone()), todo)))
    }

    /// Pushes `todo` on `conn` (answering fetches first), then waits for the destination to
    /// hold everything.
    async fn push_on(&self, conn: &mut Conn, todo: Vec<Span>, after_commit: bool) -> Result<()> {
        let blocks: u64 = todo.iter().map(|s| s.count).sum();
        self.status(|p| {
            p.remaining_blocks = blocks;
            p.stalled = None;
        });
        if after_commit {
            // QEMU still sends the guest's last memory pages and device state on the same link:
            // the push starts once the destination's guest runs (its first request), answering
            // fetches meanwhile, or after PUSH_HOLD at the latest.
            let until = tokio::time::Instant::now() + PUSH_HOLD;
            match conn.next_answering(until).await? {
                None | Some(Some(Ok(Message::Running))) => {}
                Some(other) => bail!("{}", dest_problem(other)),
            }
        }
        if let Some(d) = control_api::pause_at("postcopy-push") {
            // The test hook holds the push back, not the fetches.
            tracing::warn!(?d, "holding the post-copy push back ({})", control_api::PAUSE_VAR);
            let until = tokio::time::Instant::now() + d;
            while let Ok(Some(frame)) = tokio::time::timeout_at(until, conn.out.urgent.recv()).await {
                conn.out.send_urgent(&frame).await?;
            }
        }
        let live: Arc<dyn BlockBackend> = self.disk.clone();
        self.rounds.send(&mut conn.out, RoundKind::Postcopy, live, todo).await?;
        self.status(|p| p.remaining_blocks = 0);
        send(&mut conn.out.writer, &Message::PushDone).await?;
        let until = tokio::time::Instant::now() + COMMIT_TIMEOUT;
        loop {
            match conn.next_answering(until).await? {
                None => bail!("the destination did not confirm it holds every block within {COMMIT_TIMEOUT:?}"),
                Some(Some(Ok(Message::Holds))) => return Ok(()),
                Some(Some(Ok(Message::Running))) => {}
                Some(other) => bail!("{}", dest_problem(other)),
            }
        }
    }
}

/// The post-copy push: until the destination holds every block, reconnecting (`Resume`)
/// whenever the link breaks; ends early only when `stop` is set (the disk was given back).
async fn push(ctx: PushCtx, mut conn: Option<Conn>, spans: Vec<Span>, mut stop: watch::Receiver<bool>) -> Result<()> {
    let mut spans = Some(spans);
    let mut backoff = Duration::from_millis(200);
    loop {
        let attempt = async {
            let (mut c, todo, after_commit) = match conn.take() {
                Some(c) => (c, spans.take().unwrap_or_default(), true),
                None => match ctx.resume().await? {
                    None => return Ok(()),
                    Some((c, todo)) => (c, todo, false),
                },
            };
            ctx.push_on(&mut c, todo, after_commit).await?;
            c.close_with(&Message::Keepalive).await;
            Ok::<_, anyhow::Error>(())
        };
        let r = tokio::select! {
            r = attempt => r,
            _ = stop.wait_for(|s| *s) => bail!("stopped"),
        };
        match r {
            Ok(()) => return Ok(()),
            Err(e) => {
                let why = format!("{e:#}");
                tracing::warn!("post-copy push interrupted ({why}); reconnecting in {backoff:?}");
                ctx.status(|p| {
                    p.reconnects += 1;
                    p.stalled = Some(why);
                });
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|s| *s) => bail!("stopped"),
                }
                backoff = (backoff * 2).min(RECONNECT_MAX);
            }
        }
    }
}

/// Waits at a named point when the `NBD_ROW_PAUSE` test hook asks for it.
pub async fn pause(point: &str) {
    if let Some(d) = control_api::pause_at(point) {
        tracing::warn!(point, ?d, "pausing ({})", control_api::PAUSE_VAR);
        tokio::time::sleep(d).await;
    }
}

/// The pre-copy rounds, stopped early by a destination error or by `stop`.
async fn precopy(
    disk: Arc<Disk>,
    rounds: Arc<Rounds>,
    args: MigrateArgs,
    mut conn: Conn,
    mut plan: Plan,
    mut stop: watch::Receiver<bool>,
) -> (Conn, Plan, Result<()>) {
    let result = {
        let Conn { out, from_dest, claims, urgent_tx, .. } = &mut conn;
        let work = precopy_rounds(&disk, &rounds, &args, out, &mut plan);
        tokio::pin!(work);
        loop {
            tokio::select! {
                r = &mut work => break r,
                msg = from_dest.recv() => break Err(anyhow!("{}", dest_problem(msg))),
                Some(()) = claims.recv() => {
                    // The round in progress is not cut short: the destination's write fails and
                    // its next one asks again once the disk is ready.
                    let why = "the pre-copy is still running; the disk is armed once it is ready";
                    tracing::warn!("the destination asked for the disk (its guest writes): refused: {why}");
                    let mut frame = Vec::new();
                    Message::ClaimRefused { reason: why.into() }.encode(&mut frame);
                    let _ = urgent_tx.send(frame).await;
                }
                () = async { drop(stop.wait_for(|s| *s).await) } => break Err(anyhow!("cancelled")),
            }
        }
    };
    (conn, plan, result)
}

/// While armed and ready, every [`ARMED_PASS_EVERY`]: a settle pass (the outstanding blocks
/// the guest has not written since the previous pass, while more than the final-round budget is
/// outstanding), so what a claim leaves to post-copy stays near what the guest keeps rewriting.
/// Returns on a claim (true), on `stop` (false, between passes), or on a failure.
async fn armed_updates(
    disk: Arc<Disk>,
    rounds: Arc<Rounds>,
    args: MigrateArgs,
    mut conn: Conn,
    mut plan: Plan,
    mut stop: watch::Receiver<bool>,
) -> (Conn, Plan, Result<bool>) {
    let rate = link::planning_rate(rounds.first_round_rate(), args.max_bandwidth.map(|b| b as f64));
    let budget_ms = args.final_budget.map_or(0.0, |b| b.as_secs_f64() * 1000.0);
    let budget_blocks = link::bytes_within(budget_ms, rate) / BLOCK_SIZE;
    let mut pass_start = disk.mark();
    let mut last_sent = Instant::now();
    let result = loop {
        let Conn { out, from_dest, claims, .. } = &mut conn;
        let tick = tokio::select! {
            Some(()) = claims.recv() => break Ok(true),
            msg = from_dest.recv() => break Err(anyhow!("{}", dest_problem(msg))),
            Some(frame) = out.urgent.recv() => {
                if let Err(e) = out.send_urgent(&frame).await {
                    break Err(e);
                }
                false
            }
            r = stop.changed() => {
                if r.is_err() || *stop.borrow() {
                    break Ok(false);
                }
                false
            }
            () = tokio::time::sleep(ARMED_PASS_EVERY) => true,
        };
        if !tick {
            continue;
        }
        let Plan::Row(row) = &plan else { break Ok(false) };
        // Each pass sends what was not written since the previous one began.
        let settled = row.settle_pass(&DiskLog(&disk), pass_start, budget_blocks);
        pass_start = disk.mark();
        let Some(settled) = settled else {
            // Nothing to send: the destination still hears from the session.
            if last_sent.elapsed() >= KEEPALIVE_EVERY {
                if let Err(e) = send(&mut out.writer, &Message::Keepalive).await {
                    break Err(e);
                }
                last_sent = Instant::now();
            }
            continue;
        };
        match rounds.send(out, RoundKind::Update, disk.clone(), settled).await {
            Ok(sent) => plan.mark(&sent),
            Err(e) => break Err(e),
        }
        last_sent = Instant::now();
    };
    (conn, plan, result)
}

async fn precopy_rounds(
    disk: &Arc<Disk>,
    rounds: &Rounds,
    args: &MigrateArgs,
    out: &mut Out,
    plan: &mut Plan,
) -> Result<()> {
    let live: Arc<dyn BlockBackend> = disk.clone();
    let base: Arc<dyn BlockBackend> = match plan {
        Plan::Row(_) => Arc::new(disk.frozen_base().context("ROW mode ended before round 1")?),
        Plan::Bitmap(bm) => {
            bm.start(&DiskLog(disk));
            live.clone()
        }
    };
    let ranges = allocated_blocks(base.clone()).await?;
    rounds.send(out, RoundKind::Base, base, ranges).await?;
    for _ in 1..args.rounds {
        let ranges = match plan {
            Plan::Row(row) => row.cold_unsent(&DiskLog(disk), args.hot_threshold),
            Plan::Bitmap(bm) => bm.next_round(&DiskLog(disk)),
        };
        let sent = rounds.send(out, RoundKind::Update, live.clone(), ranges).await?;
        plan.mark(&sent);
    }
    if let (Plan::Row(_), Some(budget)) = (&plan, args.final_budget) {
        settle(disk, rounds, args, out, plan, budget).await?;
    }
    Ok(())
}

/// Row, our addition to the paper's three rounds: while the final round would hold more than
/// `budget` worth of data at the rate round 1 achieved, send the outstanding blocks that were
/// not written since the previous pass began. Blocks the guest keeps rewriting stay for the
/// final round (sent once, as in the paper); blocks it has finished with (a sequential
/// rewrite) go now instead of lengthening the pause.
async fn settle(
    disk: &Arc<Disk>,
    rounds: &Rounds,
    args: &MigrateArgs,
    out: &mut Out,
    plan: &mut Plan,
    budget: Duration,
) -> Result<()> {
    let Some(rate) = link::planning_rate(rounds.first_round_rate(), args.max_bandwidth.map(|b| b as f64)) else {
        return Ok(());
    };
    let budget_blocks = link::bytes_within(budget.as_secs_f64() * 1000.0, Some(rate)) / BLOCK_SIZE;
    let mut pass_start = disk.mark();
    // What the previous round or pass sent: a pass that would send more is not converging (the
    // guest writes new data faster than the link carries it); more passes would only lengthen
    // the migration, and post-copy (or a long final round) takes what is left.
    let mut previous = lock(&rounds.progress).rounds.last().map_or(u64::MAX, |r| r.blocks);
    for _ in 0..MAX_SETTLE_PASSES {
        let Plan::Row(row) = plan else { return Ok(()) };
        let Some(settled) = row.settle_pass(&DiskLog(disk), pass_start, budget_blocks) else {
            break;
        };
        let blocks: u64 = settled.iter().filter(|s| !s.zero).map(|s| s.count).sum();
        if blocks >= previous {
            tracing::info!(blocks, previous, "pre-copy is not converging: no more settle passes");
            break;
        }
        previous = blocks;
        pass_start = disk.mark();
        let sent = rounds.send(out, RoundKind::Update, disk.clone(), settled).await?;
        plan.mark(&sent);
    }
    Ok(())
}

/// The allocated ranges of `view`, as spans of data.
async fn allocated_blocks(view: Arc<dyn BlockBackend>) -> Result<Vec<Span>> {
    tokio::task::spawn_blocking(move || -> std::io::Result<Vec<Span>> {
        let mut pos = 0;
        let mut out: Vec<Span> = Vec::new();
        for e in view.extents(0, view.size(), usize::MAX)? {
            if !e.hole {
                let first = pos / BLOCK_SIZE;
                let last = (pos + e.length - 1) / BLOCK_SIZE;
                match out.last_mut() {
                    Some(s) if s.first + s.count > first => s.count = last + 1 - s.first,
                    _ => out.push(Span { first, count: last - first + 1, zero: false }),
                }
            }
            pos += e.length;
        }
        Ok(out)
    })
    .await?
    .context("listing the allocated ranges")
}
