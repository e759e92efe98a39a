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

mod actor;
mod conn;
mod finish;
mod precopy;
mod push;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use control_api::{Fence, MigrateFinishArgs, MigrationStatus, Phase, PostcopyStatus, RoundKind, Strategy};
use migration_session::{Ownership, SourceRefusal, SourceSession};
use tokio::sync::{mpsc, oneshot};

use super::rounds::RoundFigures;
use crate::proxy::Proxy;
use crate::sync::lock;

use actor::Actor;

/// How often an idle session tells the destination it is alive.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(5);
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
    progress: Arc<Mutex<RoundFigures>>,
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
