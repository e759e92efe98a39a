//! The task that owns a session: it takes the control commands in turn, performs what the
//! state machine decides, and watches the session's connection between rounds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use control_api::{ErrorData, MigrationFailed, MigrationState, MigrationStateData, Phase, Strategy};
use migration_session::{
    BitmapPlan, RevokeAnswer, RowPlan, SessionId, SourceAction, SourceRefusal, SourceSession, Span,
};
use migration_stream::Message;
use row_store::{BlockBackend, Mode, BLOCK_SIZE};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::conn::{dest_problem, Conn, DestAsk};
use super::precopy::Plan;
use super::{lock, BoxFuture, MigrateArgs, MigrationError, Request, Shared, KEEPALIVE_EVERY};
use crate::migration::rounds::{RoundFigures, Rounds};
use crate::migration::transport::connect;
use crate::migration::{send, session_params, REVOKE_TIMEOUT};
use crate::ownership::Access;
use crate::proxy::Proxy;

/// How long a cancelled pre-copy may take to stop before it is aborted.
const PRECOPY_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the session's connection is.
pub(super) enum Link {
    /// No connection.
    None,
    /// Connected, nothing running on it.
    Idle(Conn, Plan),
    /// The pre-copy rounds own it; they give it back when they end.
    Precopy { job: JoinHandle<(Conn, Plan, Result<()>)>, stop: watch::Sender<bool> },
    /// Post-copy: the push owns it (and reconnects), until the destination holds everything.
    Postcopy { job: JoinHandle<Result<()>>, stop: watch::Sender<bool> },
    /// Armed and ready: the update passes own it until a claim (true), a stop or a failure.
    Armed { job: JoinHandle<(Conn, Plan, Result<Option<DestAsk>>)>, stop: watch::Sender<bool> },
}

/// One migration's settings and connection.
pub(super) struct Migration {
    pub(super) args: MigrateArgs,
    pub(super) rounds: Arc<Rounds>,
    pub(super) link: Link,
    /// What a post-copy switchover left for the push.
    pub(super) residual: Vec<Span>,
}

pub(super) struct Actor {
    pub(super) proxy: Arc<Proxy>,
    pub(super) shared: Arc<Shared>,
    pub(super) requests: mpsc::Receiver<Request>,
    pub(super) session: Option<Migration>,
}

/// What the actor is woken by.
pub(super) enum Wake {
    Request(Option<Request>),
    PrecopyEnded(std::result::Result<(Conn, Plan, Result<()>), tokio::task::JoinError>),
    FromDest(Option<Result<Message>>),
    /// A fetch answer to send on an idle session.
    Urgent(Vec<u8>),
    /// The post-copy push ended: the destination holds everything (or it was stopped).
    PushEnded(std::result::Result<Result<()>, tokio::task::JoinError>),
    /// Nothing happened for [`KEEPALIVE_EVERY`] on an idle session.
    Quiet,
    /// The destination asks: its guest wants to write, or its QEMU left without writing.
    Ask(DestAsk),
    /// The armed update passes ended: on an ask of the destination, stopped, or failed.
    ArmedEnded(std::result::Result<(Conn, Plan, Result<Option<DestAsk>>), tokio::task::JoinError>),
}

impl Actor {
    pub(super) fn phase(&self) -> Phase {
        lock(&self.shared.machine).phase()
    }

    /// Applies an input to the state machine, announcing a phase change.
    pub(super) fn step(
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

    pub(super) async fn run(mut self) {
        loop {
            match self.next_wake().await {
                Wake::Request(None) => return,
                Wake::Request(Some(req)) => self.handle(req).await,
                Wake::PrecopyEnded(done) => self.precopy_ended(done).await,
                Wake::Ask(ask) => self.asked(ask).await,
                Wake::ArmedEnded(done) => self.armed_ended(done).await,
                Wake::Quiet => {
                    let mut frame = Vec::new();
                    Message::Keepalive.encode(&mut frame);
                    self.send_idle(&frame).await;
                }
                Wake::Urgent(frame) => self.send_idle(&frame).await,
                Wake::PushEnded(done) => self.push_ended(done).await,
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

    /// Waits for what comes next: a request, or what the session's link brings.
    async fn next_wake(&mut self) -> Wake {
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
                Some(ask) = conn.asks.recv() => Wake::Ask(ask),
                m = conn.from_dest.recv() => Wake::FromDest(m),
                _ = tokio::time::sleep(KEEPALIVE_EVERY) => Wake::Quiet,
            },
            Some(Link::Postcopy { job, .. }) => tokio::select! {
                r = requests.recv() => Wake::Request(r),
                done = job => Wake::PushEnded(done),
            },
            _ => Wake::Request(requests.recv().await),
        }
    }

    /// Sends a frame (a keepalive, a fetch answer) on an idle session; a failure fails it.
    async fn send_idle(&mut self, frame: &[u8]) {
        let Some(Link::Idle(conn, _)) = self.session.as_mut().map(|s| &mut s.link) else { return };
        if let Err(e) = conn.out.send_urgent(frame).await {
            let why = format!("{e:#}");
            self.session.as_mut().expect("idle").link = Link::None;
            self.fail(&why).await;
        }
    }

    pub(super) async fn handle(&mut self, req: Request) {
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
    pub(super) fn perform(&mut self, actions: Vec<SourceAction>) -> BoxFuture<'_, Result<(), MigrationError>> {
        Box::pin(self.perform_all(actions))
    }

    pub(super) async fn perform_all(&mut self, actions: Vec<SourceAction>) -> Result<(), MigrationError> {
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

    pub(super) async fn set_access(&self, access: Access) {
        let gate = self.proxy.gate.clone();
        let _ = tokio::task::spawn_blocking(move || gate.set(access)).await;
    }

    /// Gives the disk back to the source's own use.
    pub(super) async fn roll_back(&self) {
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
    pub(super) async fn take_conn(&mut self) -> Option<Conn> {
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

    pub(super) async fn start(&mut self, args: MigrateArgs) -> Result<String, MigrationError> {
        self.proxy.protection.current().usable().map_err(|e| e.to_string())?;
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
        *lock(&self.shared.progress) = RoundFigures { started: Some(Instant::now()), ..RoundFigures::default() };
        let rounds = Arc::new(Rounds {
            disk: self.proxy.disk.clone(),
            progress: self.shared.progress.clone(),
            events: self.proxy.events.clone(),
            compress: args.compress,
        });
        *lock(&self.shared.postcopy) = None;
        self.session = Some(Migration { args, rounds, link: Link::None, residual: Vec::new() });
        self.perform(actions).await?;
        Ok(id.to_string())
    }

    /// Connects, authenticates and prepares the disk for the rounds.
    pub(super) async fn connect(&mut self) -> Result<(), MigrationError> {
        let session = self.session.as_ref().expect("a session is starting");
        let args = session.args.clone();
        let id = lock(&self.shared.machine).session().expect("started");
        let params = session_params(id, self.proxy.disk.size(), args.strategy);
        let protection = &self.proxy.protection.current();
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
    pub(super) async fn prepare(&self, args: &MigrateArgs) -> Result<Plan> {
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

    /// The session failed: the state machine decides whether to roll back.
    pub(super) async fn fail(&mut self, why: &str) {
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

    pub(super) async fn cancel(&mut self) -> Result<(), MigrationError> {
        let actions = self.step(SourceSession::cancel)?;
        self.perform(actions).await
    }

    /// Asks the destination to give the disk back, over a new connection.
    pub(super) async fn revoke(&mut self) -> Result<(), MigrationError> {
        if let Some(conn) = self.take_conn().await {
            drop(conn);
        }
        let (id, peer, strategy) = {
            let m = lock(&self.shared.machine);
            (m.session(), m.peer().map(str::to_string), m.strategy())
        };
        let (Some(id), Some(peer), Some(strategy)) = (id, peer, strategy) else {
            let actions = self.step(|m| m.revoke_answered(RevokeAnswer::Unreachable("no session to revoke".into())));
            return actions.map(|_| ());
        };
        let params = session_params(id, self.proxy.disk.size(), strategy);
        let asked = async {
            let (mut reader, mut writer) = connect(&peer, &self.proxy.protection.current(), &params, None).await?;
            send(&mut writer, &Message::Revoke).await?;
            reader.next_within(REVOKE_TIMEOUT, "answer to the revoke").await
        }
        .await;
        let answer = match asked {
            Ok(Message::Revoked) => RevokeAnswer::GaveBack,
            Ok(Message::Error { message }) => RevokeAnswer::Owns(message),
            Ok(other) => RevokeAnswer::Unreachable(format!("unexpected {} in answer to the revoke", other.name())),
            Err(e) => RevokeAnswer::Unreachable(format!("{e:#}")),
        };
        if answer == RevokeAnswer::GaveBack {
            tracing::info!(%peer, "the destination gave the disk back");
        }
        let actions = self.step(|m| m.revoke_answered(answer))?;
        self.perform(actions).await
    }
}
