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
    ErrorData, Fence, MigrationFailed, MigrationState, MigrationStateData, MigrationStatus, Phase, RoundKind, Strategy,
};
use migration_session::{
    BitmapPlan, Ownership, RowPlan, SessionId, SourceAction, SourceRefusal, SourceSession, Span, WriteLog, Written,
};
use migration_stream::Message;
use row_store::{BlockBackend, Disk, Mode, BLOCK_SIZE};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::rounds::{Out, Progress, Rounds, Sent};
use super::transport::{connect, Reader, Writer};
use super::{last_word, send, session_params, FrameReader, RateLimit, COMMIT_TIMEOUT, REVOKE_TIMEOUT};
use crate::ownership::Access;
use crate::proxy::Proxy;

/// Most settle passes before the row strategy declares pre-copy done.
const MAX_SETTLE_PASSES: u32 = 6;
/// How long a cancelled pre-copy may take to stop before it is aborted.
const PRECOPY_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an idle session tells the destination it is alive.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(5);
/// How long a failing session waits for the destination's reason.
const REASON_WAIT: Duration = Duration::from_millis(500);
/// Requests queued for the actor.
const REQUEST_QUEUE: usize = 8;

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
    Finish(Reply<MigrationStatus>),
    Cancel(Reply<()>),
    Complete(Reply<()>),
    Reclaim(bool, Reply<()>),
}

/// The state `query-migrate` and `query-status` read.
#[derive(Debug, Default)]
struct Shared {
    machine: Mutex<SourceSession>,
    progress: Arc<Mutex<Progress>>,
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
    pub async fn finish(&self) -> Result<MigrationStatus, MigrationError> {
        self.ask(Request::Finish).await
    }

    /// `migrate-cancel`.
    pub async fn cancel(&self) -> Result<(), MigrationError> {
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
    reader: JoinHandle<()>,
}

impl Conn {
    fn new(reader: FrameReader<Reader>, writer: Writer, max_bandwidth: Option<u64>) -> Self {
        let (tx, rx) = mpsc::channel(16);
        let reader = tokio::spawn(forward_frames(reader, tx));
        Self { out: Out { writer, limit: RateLimit::new(max_bandwidth) }, from_dest: rx, reader }
    }

    /// A broken pipe often hides the destination's own reason, sent just before it closed: the
    /// `Error` it sent, if one arrives within [`REASON_WAIT`].
    async fn destination_reason(&mut self) -> Option<String> {
        match tokio::time::timeout(REASON_WAIT, self.from_dest.recv()).await {
            Ok(Some(Ok(Message::Error { message }))) => Some(format!("the destination failed: {message}")),
            _ => None,
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
    }
}

/// Forwards the destination's frames; the last item is the error or end that stopped it.
async fn forward_frames(mut reader: FrameReader<Reader>, tx: mpsc::Sender<Result<Message>>) {
    loop {
        let item = match reader.next().await {
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
}

/// One migration's settings and connection.
struct Session {
    args: MigrateArgs,
    rounds: Arc<Rounds>,
    link: Link,
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
    /// Nothing happened for [`KEEPALIVE_EVERY`] on an idle session.
    Quiet,
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
                    Some(Link::Idle(conn, _)) => tokio::select! {
                        r = requests.recv() => Wake::Request(r),
                        m = conn.from_dest.recv() => Wake::FromDest(m),
                        _ = tokio::time::sleep(KEEPALIVE_EVERY) => Wake::Quiet,
                    },
                    _ => Wake::Request(requests.recv().await),
                }
            };
            match wake {
                Wake::Request(None) => return,
                Wake::Request(Some(req)) => self.handle(req).await,
                Wake::PrecopyEnded(done) => self.precopy_ended(done).await,
                Wake::Quiet => {
                    if let Some(Link::Idle(conn, _)) = self.session.as_mut().map(|s| &mut s.link) {
                        if let Err(e) = send(&mut conn.out.writer, &Message::Keepalive).await {
                            let why = format!("{e:#}");
                            self.session.as_mut().expect("idle").link = Link::None;
                            self.fail(&why).await;
                        }
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
        match req {
            Request::Start(args, reply) => {
                let _ = reply.send(self.start(args).await);
            }
            Request::Finish(reply) => {
                let _ = reply.send(self.finish().await);
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
                SourceAction::RunFinalRound => return self.final_round().await,
                SourceAction::AskRevoke => return self.revoke().await,
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
        self.session = Some(Session { args, rounds, link: Link::None });
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
                let conn = Conn::new(reader, writer, args.max_bandwidth);
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
            }
            Ok((mut conn, plan, Err(e))) => {
                let why = conn.destination_reason().await.unwrap_or_else(|| format!("{e:#}"));
                session.link = Link::Idle(conn, plan);
                self.fail(&why).await;
            }
            Err(e) => self.fail(&format!("the pre-copy task failed: {e}")).await,
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

    async fn finish(&mut self) -> Result<MigrationStatus, MigrationError> {
        let actions = self.step(SourceSession::finish)?;
        if let Err(e) = self.perform(actions).await {
            // Nothing was committed unless the commit went out: the machine decides whether to
            // roll back or to keep refusing writes.
            if self.phase() == Phase::Finishing {
                self.fail(&e.to_string()).await;
            }
            return Err(lock(&self.shared.machine).error().map_or(e, MigrationError::from));
        }
        Ok(status_of(&self.shared))
    }

    /// Sends the final round and the commit, and waits for the destination's answer.
    async fn final_round(&mut self) -> Result<(), MigrationError> {
        let session = self.session.as_mut().ok_or("no session connection: the migration restarted")?;
        let Link::Idle(mut conn, mut plan) = std::mem::replace(&mut session.link, Link::None) else {
            return Err("the session's connection is gone".into());
        };
        let rounds = session.rounds.clone();
        let disk = self.proxy.disk.clone();
        let result: Result<()> = async {
            pause("final-round").await;
            let log = DiskLog(&disk);
            let ranges = match &mut plan {
                Plan::Row(row) => row.final_spans(&log),
                Plan::Bitmap(bm) => bm.next_round(&log),
            };
            let live: Arc<dyn BlockBackend> = disk.clone();
            let started = Instant::now();
            rounds.send(&mut conn.out, RoundKind::Final, live, ranges).await?;
            lock(&self.shared.machine).commit_sent();
            send(&mut conn.out.writer, &Message::Commit).await?;
            let answer = tokio::time::timeout(COMMIT_TIMEOUT, conn.from_dest.recv())
                .await
                .map_err(|_| anyhow!("the destination did not confirm the commit within {COMMIT_TIMEOUT:?}"))?;
            match answer {
                Some(Ok(Message::Committed)) => {}
                other => bail!("{}", dest_problem(other)),
            }
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
                self.session.as_mut().expect("session").link = Link::Idle(conn, plan);
                let actions = self.step(SourceSession::committed)?;
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
        let Conn { out, from_dest, .. } = &mut conn;
        let work = precopy_rounds(&disk, &rounds, &args, out, &mut plan);
        tokio::pin!(work);
        tokio::select! {
            r = &mut work => r,
            msg = from_dest.recv() => Err(anyhow!("{}", dest_problem(msg))),
            _ = stop.wait_for(|s| *s) => Err(anyhow!("cancelled")),
        }
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
    let rate = match (rounds.first_round_rate(), args.max_bandwidth.map(|b| b as f64)) {
        (Some(m), Some(c)) => m.min(c),
        (Some(m), None) => m,
        (None, Some(c)) => c,
        (None, None) => return Ok(()),
    };
    let budget_blocks = (rate * budget.as_secs_f64()) as u64 / BLOCK_SIZE;
    let mut pass_start = disk.mark();
    for _ in 0..MAX_SETTLE_PASSES {
        let Plan::Row(row) = plan else { return Ok(()) };
        let Some(settled) = row.settle_pass(&DiskLog(disk), pass_start, budget_blocks) else {
            break;
        };
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
