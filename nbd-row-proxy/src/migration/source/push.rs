//! Post-copy: the push of what the final round left, reconnecting until the destination holds
//! every block.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Result};
use control_api::{PostcopyStatus, RoundKind};
use migration_session::{SourceSession, Span};
use migration_stream::Message;
use row_store::{BlockBackend, Disk, BLOCK_SIZE};
use tokio::sync::watch;

use super::actor::Actor;
use super::actor::{Link, Migration};
use super::conn::{Conn, Fetcher, Heard};
use super::{lock, MigrateArgs};
use crate::migration::rounds::Rounds;
use crate::migration::transport::connect;
use crate::migration::{send, session_params, COMMIT_TIMEOUT};
use crate::protection::LiveProtection;

/// Post-copy: the longest pause between two attempts to reconnect to the destination.
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// Post-copy: how long the push waits for the destination's guest to run before it starts.
const PUSH_HOLD: Duration = Duration::from_secs(3);

impl Actor {
    /// Starts the post-copy push: on the session's connection, or after a restart over a new
    /// one (the destination says what it still misses).
    pub(super) fn run_push(&mut self) {
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
            self.session = Some(Migration { args, rounds, link: Link::None, residual: Vec::new() });
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

    /// The push ended: the destination holds every block (a claimed hand-over then completes,
    /// after a restart too), or it was stopped or failed.
    pub(super) async fn push_ended(&mut self, done: std::result::Result<Result<()>, tokio::task::JoinError>) {
        if let Some(s) = self.session.as_mut() {
            s.link = Link::None;
        }
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return tracing::warn!("the post-copy push stopped: {e:#}"),
            Err(e) => return tracing::error!("the post-copy push task failed: {e}"),
        }
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
        if lock(&self.shared.machine).claimed() {
            self.complete_claimed().await;
        }
    }
}

/// What the post-copy push needs.
pub(super) struct PushCtx {
    pub(super) disk: Arc<Disk>,
    pub(super) rounds: Arc<Rounds>,
    pub(super) protection: LiveProtection,
    pub(super) peer: String,
    pub(super) tls_hostname: Option<String>,
    pub(super) params: migration_stream::SessionParams,
    pub(super) max_bandwidth: Option<u64>,
    pub(super) fetcher: Fetcher,
    pub(super) status: Arc<Mutex<Option<PostcopyStatus>>>,
}

impl PushCtx {
    pub(super) fn status(&self, f: impl FnOnce(&mut PostcopyStatus)) {
        if let Some(p) = lock(&self.status).as_mut() {
            f(p);
        }
    }

    /// A new connection that resumes the post-copy: the ranges the destination still misses,
    /// or `None` if it holds everything.
    pub(super) async fn resume(&self) -> Result<Option<(Conn, Vec<Span>)>> {
        let (mut reader, mut writer) =
            connect(&self.peer, &self.protection.current(), &self.params, self.tls_hostname.as_deref()).await?;
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
    pub(super) async fn push_on(&self, conn: &mut Conn, todo: Vec<Span>, after_commit: bool) -> Result<()> {
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
                Heard::Silent | Heard::Frame(Message::Running) => {}
                other => bail!("{}", other.problem("start its guest")),
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
                Heard::Frame(Message::Holds) => return Ok(()),
                Heard::Frame(Message::Running) => {}
                other => bail!("{}", other.problem("confirm it holds every block")),
            }
        }
    }
}

/// The post-copy push: until the destination holds every block, reconnecting (`Resume`)
/// whenever the link breaks; ends early only when `stop` is set (the disk was given back).
pub(super) async fn push(
    ctx: PushCtx,
    mut conn: Option<Conn>,
    spans: Vec<Span>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
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
