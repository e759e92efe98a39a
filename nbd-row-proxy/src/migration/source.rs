//! Source side of a disk migration.
//!
//! `migrate-start` connects and authenticates, then a background task runs the pre-copy rounds:
//! - `row` (the paper's method): ROW freezes the image; round 1 sends the frozen base, round 2
//!   the low-frequency (cold) updated blocks; the final round, run while the VM is paused,
//!   sends the high-frequency (hot) blocks and every block written again after it was sent.
//! - `bitmap` (the paper's baseline, QEMU's old block migration): writes go to the image and a
//!   dirty tracker marks them; round 1 sends the whole image, each later round the blocks
//!   dirtied during the previous one, and the final round the rest.
//!
//! `migrate-finish` (VM paused) refuses further writes, sends what is outstanding, and returns
//! once the destination reports the data durable. `migrate-cancel`, or any failure, tells the
//! destination to discard, gives the disk back to the source and, for `row`, merges the overlay
//! back, so the source ends as if no migration had happened.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use migration_stream::{Codec, Key, Message, RoundKind, SessionParams, Strategy};
use qmp_proto::Event;
use row_store::journal::block_runs;
use row_store::{Disk, Mode, BLOCK_SIZE};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc, oneshot};

use super::{parse_uri, send, FrameReader, RateLimit};

/// Blocks read, compressed and framed together (1 MiB).
const CHUNK_BLOCKS: u64 = 256;
/// How long the destination may take to make the data durable.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(120);

/// What `migrate-start` asks for.
#[derive(Debug, Clone)]
pub struct MigrateArgs {
    /// `tcp:HOST:PORT` of the destination's `receive --listen`.
    pub uri: String,
    /// Which method.
    pub strategy: Strategy,
    /// Pre-copy rounds before the final one, round 1 included (row: at least 2).
    pub rounds: u32,
    /// Blocks written at least this often are hot (row only).
    pub hot_threshold: u32,
    /// Cap on the stream, bytes/s.
    pub max_bandwidth: Option<u64>,
    /// lz4-compress data frames.
    pub compress: bool,
    /// Bitmap: dirty granularity in blocks (QEMU's old block migration: 1 MiB = 256 blocks).
    pub bitmap_granularity_blocks: u64,
    /// Row: what the final round may hold, in seconds of the measured link rate; while more is
    /// outstanding, blocks not written since the previous pass are sent in settle passes.
    pub final_budget: Option<Duration>,
}

/// Most settle passes before the row strategy declares pre-copy done.
const MAX_SETTLE_PASSES: u32 = 6;

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Connecting and authenticating.
    Setup,
    /// Pre-copy rounds running.
    Precopy,
    /// Pre-copy done: waiting for `migrate-finish` (VM paused).
    Ready,
    /// Final round running.
    Finishing,
    /// The destination holds the disk durably; the source refuses writes.
    Completed,
    /// Cancelled; the source owns the disk again.
    Cancelled,
    /// Failed and rolled back; the source owns the disk again.
    Failed,
}

impl Phase {
    fn is_over(self) -> bool {
        matches!(self, Phase::Cancelled | Phase::Failed)
    }
}

/// Counters of one round, the figures the paper reports.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RoundStats {
    /// Round number, from 1.
    pub round: u32,
    /// `base`, `update` or `final`.
    pub kind: &'static str,
    /// Blocks sent (data and zero).
    pub blocks: u64,
    /// Bytes of disk content covered.
    pub logical_bytes: u64,
    /// Of those, bytes sent as zero extents (no payload).
    pub zero_bytes: u64,
    /// Bytes on the wire, frames included.
    pub wire_bytes: u64,
    /// Duration.
    pub seconds: f64,
}

/// Status shown by `query-migrate`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Status {
    /// Phase.
    pub phase: Phase,
    /// `row` or `bitmap`.
    pub strategy: &'static str,
    /// Round in progress or last done.
    pub round: u32,
    /// Finished rounds.
    pub rounds: Vec<RoundStats>,
    /// Blocks of the round in progress still to send.
    pub round_remaining_blocks: u64,
    /// Current rate on the wire, bytes/s.
    pub rate: f64,
    /// Why it failed.
    pub error: Option<String>,
    /// Seconds since migrate-start.
    pub total_seconds: f64,
    #[serde(skip)]
    started: Option<Instant>,
}

impl Status {
    fn new(strategy: Strategy) -> Self {
        Self {
            phase: Phase::Setup,
            strategy: strategy.as_str(),
            round: 0,
            rounds: Vec::new(),
            round_remaining_blocks: 0,
            rate: 0.0,
            error: None,
            total_seconds: 0.0,
            started: Some(Instant::now()),
        }
    }

    /// The status with totals: update data (after round 1), total and final-round figures.
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(self).expect("status serialises");
        let after_first = self.rounds.iter().filter(|r| r.round > 1);
        let (ul, uw) = after_first.fold((0, 0), |(l, w), r| (l + r.logical_bytes, w + r.wire_bytes));
        let total_wire: u64 = self.rounds.iter().map(|r| r.wire_bytes).sum();
        let total_logical: u64 = self.rounds.iter().map(|r| r.logical_bytes).sum();
        let fin = self.rounds.iter().find(|r| r.kind == "final");
        v["update-logical-bytes"] = json!(ul);
        v["update-wire-bytes"] = json!(uw);
        v["total-logical-bytes"] = json!(total_logical);
        v["total-wire-bytes"] = json!(total_wire);
        v["final-wire-bytes"] = json!(fin.map_or(0, |r| r.wire_bytes));
        v["final-seconds"] = json!(fin.map_or(0.0, |r| r.seconds));
        v
    }
}

/// How a migration ended without failing.
enum Outcome {
    /// The destination owns the disk.
    Completed,
    /// Cancelled; reply to the canceller once the disk is given back.
    Cancelled(Option<oneshot::Sender<()>>),
}

enum Cmd {
    Finish(oneshot::Sender<Result<Value, String>>),
    Cancel(oneshot::Sender<()>),
    Complete(oneshot::Sender<()>),
}

/// A migration in progress (or over), as held by the control socket.
pub struct Migration {
    status: Mutex<Status>,
    cmds: mpsc::Sender<Cmd>,
    events: broadcast::Sender<Event>,
}

/// How the disk is given back when a migration is cancelled or fails.
pub type Rollback = Box<dyn Fn(Strategy) + Send + Sync>;

impl Migration {
    /// Connects, authenticates and starts the rounds in the background.
    pub async fn start(
        disk: Arc<Disk>,
        args: MigrateArgs,
        key: Arc<Key>,
        events: broadcast::Sender<Event>,
        rollback: Rollback,
    ) -> Result<Arc<Self>> {
        let (tx, rx) = mpsc::channel(4);
        let me = Arc::new(Self { status: Mutex::new(Status::new(args.strategy)), cmds: tx, events });
        let conn = me.connect(&disk, &args, &key).await?;
        let task = me.clone();
        tokio::spawn(async move { task.run(disk, args, conn, rx, rollback).await });
        Ok(me)
    }

    /// A snapshot of the status.
    pub fn status(&self) -> Status {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner()).clone();
        s.total_seconds = s.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
        s
    }

    /// Whether the migration is over (cancelled or failed) and a new one may start.
    pub fn is_over(&self) -> bool {
        self.status().phase.is_over()
    }

    fn set<T>(&self, f: impl FnOnce(&mut Status) -> T) -> T {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn emit(&self, name: &str, data: Value) {
        let _ = self.events.send(Event::now(name, data));
    }

    fn set_phase(&self, phase: Phase) {
        self.set(|s| s.phase = phase);
        self.emit("MIGRATION_STATE", json!({ "phase": phase }));
        tracing::info!(?phase, "migration phase");
    }

    /// Sends what is outstanding and waits for the destination's durable commit.
    pub async fn finish(&self) -> Result<Value, String> {
        let (tx, rx) = oneshot::channel();
        self.cmds.send(Cmd::Finish(tx)).await.map_err(|_| "the migration is over".to_string())?;
        rx.await.map_err(|_| "the migration task ended".to_string())?
    }

    /// Cancels at any point; returns once the destination was told and the disk given back.
    pub async fn cancel(&self) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        if self.cmds.send(Cmd::Cancel(tx)).await.is_err() {
            return Ok(()); // already over
        }
        let _ = rx.await;
        Ok(())
    }

    /// Tells the destination the migration is complete and closes the session.
    pub async fn complete(&self) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.cmds.send(Cmd::Complete(tx)).await.map_err(|_| "the migration is over".to_string())?;
        let _ = rx.await;
        Ok(())
    }

    async fn connect(&self, disk: &Disk, args: &MigrateArgs, key: &Key) -> Result<Conn> {
        let addr = parse_uri(&args.uri)?;
        let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&addr))
            .await
            .map_err(|_| anyhow!("connecting to {addr} timed out"))?
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        super::set_dead_peer_timeouts(&stream);
        let (rd, mut wr) = stream.into_split();
        let mut reader = FrameReader::new(rd);
        let Message::ServerHello { nonce: server_nonce, .. } =
            reader.next_within(Duration::from_secs(10), "greeting").await?
        else {
            bail!("{addr} did not greet like a migration destination");
        };
        let mut session_id = [0u8; 16];
        session_id.copy_from_slice(&migration_stream::nonce()[..16]);
        let params = SessionParams { session_id, disk_size: disk.size(), block_size: BLOCK_SIZE as u32, strategy: args.strategy };
        let client_nonce = migration_stream::nonce();
        let mac = migration_stream::client_mac(key, &server_nonce, &client_nonce, &params);
        send(&mut wr, &Message::ClientHello { version: migration_stream::VERSION, params: params.clone(), nonce: client_nonce, mac }).await?;
        match reader.next_within(Duration::from_secs(10), "authentication reply").await? {
            Message::Accept { mac } => {
                let want = migration_stream::server_mac(key, &server_nonce, &client_nonce, &params);
                if !migration_stream::verify(&want, &mac) {
                    bail!("the destination failed authentication (different --auth-key-file?)");
                }
            }
            Message::Reject { reason } => bail!("the destination refused the session: {reason}"),
            other => bail!("unexpected reply to the session request: {other:?}"),
        }
        tracing::info!(%addr, strategy = args.strategy.as_str(), "migration session authenticated");
        Ok(Conn { reader, writer: wr, limit: RateLimit::new(args.max_bandwidth) })
    }

    async fn run(self: Arc<Self>, disk: Arc<Disk>, args: MigrateArgs, conn: Conn, mut cmds: mpsc::Receiver<Cmd>, rollback: Rollback) {
        let (dest_tx, mut dest_rx) = mpsc::channel::<Result<Message>>(16);
        let Conn { mut reader, writer, limit } = conn;
        let reader_task = tokio::spawn(async move {
            loop {
                let msg = reader.next().await;
                let end = !matches!(msg, Ok(Some(_)));
                let item = match msg {
                    Ok(Some(m)) => Ok(m),
                    Ok(None) => Err(anyhow!("the destination closed the connection")),
                    Err(e) => Err(e),
                };
                if dest_tx.send(item).await.is_err() || end {
                    return;
                }
            }
        });
        let mut out = Out { writer, limit };
        let outcome = self.drive(&disk, &args, &mut out, &mut cmds, &mut dest_rx).await;
        match outcome {
            Ok(Outcome::Completed) => {}
            Ok(Outcome::Cancelled(done)) => {
                self.give_back(&disk, args.strategy, &rollback);
                self.set_phase(Phase::Cancelled);
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
            Err(e) => {
                // A broken pipe often hides the destination's own reason, sent just before it
                // closed: prefer that.
                let mut msg = format!("{e:#}");
                if let Ok(Some(Ok(Message::Error { message }))) =
                    tokio::time::timeout(Duration::from_millis(500), dest_rx.recv()).await
                {
                    msg = format!("the destination failed: {message}");
                }
                tracing::error!("migration failed: {msg}");
                let _ = tokio::time::timeout(Duration::from_secs(2), send(&mut out.writer, &Message::Discard { reason: msg.clone() })).await;
                self.set(|s| s.error = Some(msg.clone()));
                self.give_back(&disk, args.strategy, &rollback);
                self.set_phase(Phase::Failed);
                self.emit("MIGRATION_FAILED", json!({ "error": msg }));
            }
        }
        reader_task.abort();
        // Answer commands that come after the end.
        while let Some(cmd) = cmds.recv().await {
            match cmd {
                Cmd::Finish(tx) => {
                    let why = self.status().error.unwrap_or_else(|| "the migration is over".into());
                    let _ = tx.send(Err(why));
                }
                Cmd::Cancel(tx) | Cmd::Complete(tx) => {
                    let _ = tx.send(());
                }
            }
        }
    }

    fn give_back(&self, disk: &Disk, strategy: Strategy, rollback: &Rollback) {
        disk.set_writes_refused(None);
        rollback(strategy);
    }

    async fn drive(
        &self,
        disk: &Arc<Disk>,
        args: &MigrateArgs,
        out: &mut Out,
        cmds: &mut mpsc::Receiver<Cmd>,
        dest: &mut mpsc::Receiver<Result<Message>>,
    ) -> Result<Outcome> {
        self.set_phase(Phase::Precopy);
        let mut plan = match args.strategy {
            Strategy::Row => Plan::Row { sent: HashMap::new(), epoch: self.prepare_row(disk).await? },
            Strategy::Bitmap => {
                disk.set_tracking(true)?;
                Plan::Bitmap { last_round_start: 0 }
            }
        };
        // Pre-copy rounds, interruptible by cancel and by a destination error.
        let precopy = async {
            self.round_base(disk, &mut plan, args, out).await?;
            let extra = match args.strategy {
                Strategy::Row => args.rounds.saturating_sub(1).max(1),
                Strategy::Bitmap => args.rounds.saturating_sub(1),
            };
            for _ in 0..extra {
                self.round_update(disk, &mut plan, args, out).await?;
            }
            if let (Plan::Row { .. }, Some(budget)) = (&plan, args.final_budget) {
                self.settle(disk, &mut plan, args, out, budget).await?;
            }
            anyhow::Ok(())
        };
        tokio::select! {
            r = precopy => r?,
            Some(cmd) = cmds.recv() => return self.early_command(cmd, out).await,
            Some(msg) = dest.recv() => bail!("{}", dest_problem(msg)),
        }
        self.set_phase(Phase::Ready);
        // Wait for the VM to pause (migrate-finish) or a cancel.
        let reply = loop {
            tokio::select! {
                Some(cmd) = cmds.recv() => match cmd {
                    Cmd::Finish(reply) => break reply,
                    other => return self.early_command(other, out).await,
                },
                Some(msg) = dest.recv() => bail!("{}", dest_problem(msg)),
            }
        };
        self.set_phase(Phase::Finishing);
        disk.set_writes_refused(Some("the disk has been migrated to another host"));
        let result = async {
            self.round_final(disk, &plan, args, out).await?;
            send(&mut out.writer, &Message::Commit).await?;
            let committed = tokio::time::timeout(COMMIT_TIMEOUT, dest.recv()).await;
            match committed {
                Ok(Some(Ok(Message::Committed))) => Ok(()),
                Ok(Some(msg)) => Err(anyhow!("{}", dest_problem(msg))),
                Ok(None) => Err(anyhow!("the destination closed the connection before committing")),
                Err(_) => Err(anyhow!("the destination did not commit within {COMMIT_TIMEOUT:?}")),
            }
        }
        .await;
        if let Err(e) = result {
            let _ = reply.send(Err(format!("{e:#}")));
            return Err(e);
        }
        self.set_phase(Phase::Completed);
        let _ = reply.send(Ok(self.status().to_json()));
        // The destination owns the disk now; a cancel still takes it back.
        let mut dest_open = true;
        loop {
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Cancel(done)) => {
                        if dest_open {
                            let _ = send(&mut out.writer, &Message::Discard { reason: "cancelled by the source".into() }).await;
                        }
                        return Ok(Outcome::Cancelled(Some(done)));
                    }
                    Some(Cmd::Complete(done)) => {
                        if dest_open {
                            let _ = send(&mut out.writer, &Message::Done).await;
                        }
                        let _ = done.send(());
                        tracing::info!("migration complete: the destination owns the disk");
                        return Ok(Outcome::Completed);
                    }
                    Some(Cmd::Finish(tx)) => { let _ = tx.send(Ok(self.status().to_json())); }
                    None => return Ok(Outcome::Completed),
                },
                msg = dest.recv(), if dest_open => {
                    // The destination went away after committing: the refusal stays; a cancel
                    // can still give the disk back.
                    tracing::info!("destination session ended after the commit: {}", msg.map_or("closed".into(), dest_problem));
                    dest_open = false;
                }
            }
        }
    }

    /// A cancel (or complete) before the commit.
    async fn early_command(&self, cmd: Cmd, out: &mut Out) -> Result<Outcome> {
        match cmd {
            Cmd::Cancel(done) => {
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    send(&mut out.writer, &Message::Discard { reason: "cancelled by the source".into() }),
                )
                .await;
                Ok(Outcome::Cancelled(Some(done)))
            }
            Cmd::Complete(done) => {
                let _ = done.send(());
                bail!("migrate-complete came before migrate-finish")
            }
            Cmd::Finish(_) => unreachable!("finish is handled by the caller"),
        }
    }

    async fn prepare_row(&self, disk: &Arc<Disk>) -> Result<u64> {
        let d = disk.clone();
        tokio::task::spawn_blocking(move || -> Result<u64> {
            match d.mode() {
                Mode::Direct => d.row_start()?,
                Mode::Row => {}
                Mode::Merging => bail!("a merge is still running; retry when it has finished"),
            }
            Ok(d.status().epoch)
        })
        .await?
    }

    fn begin_round(&self, kind: RoundKind, blocks: u64) -> u32 {
        let round = self.set(|s| {
            s.round += 1;
            s.round_remaining_blocks = blocks;
            s.round
        });
        self.emit("MIGRATION_ROUND_STARTED", json!({ "round": round, "kind": kind.as_str(), "blocks": blocks }));
        tracing::info!(round, kind = kind.as_str(), blocks, "round started");
        round
    }

    fn end_round(&self, stats: RoundStats) {
        tracing::info!(round = stats.round, blocks = stats.blocks, wire = stats.wire_bytes, seconds = stats.seconds, "round done");
        self.emit("MIGRATION_ROUND_COMPLETED", serde_json::to_value(&stats).unwrap_or_default());
        self.set(|s| {
            s.round_remaining_blocks = 0;
            s.rounds.push(stats);
        });
    }

    /// Round 1: every allocated range of the frozen base (row) or of the image (bitmap).
    async fn round_base(&self, disk: &Arc<Disk>, plan: &mut Plan, args: &MigrateArgs, out: &mut Out) -> Result<()> {
        let d = disk.clone();
        let view = match plan {
            Plan::Row { epoch, .. } => View::Base(*epoch),
            Plan::Bitmap { last_round_start } => {
                *last_round_start = disk.generation();
                View::Live
            }
        };
        let ranges = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<(u64, u64)>> {
            let extents = match view {
                View::Base(epoch) => d.base_extents(0, d.size(), usize::MAX, epoch)?,
                View::Live => d.extents(0, d.size(), usize::MAX)?,
            };
            let mut pos = 0;
            let mut out = Vec::new();
            for e in extents {
                if !e.hole {
                    let first = pos / BLOCK_SIZE;
                    let last = (pos + e.length - 1) / BLOCK_SIZE;
                    out.push((first, last - first + 1));
                }
                pos += e.length;
            }
            Ok(out)
        })
        .await??;
        self.send_round(disk, RoundKind::Base, view, ranges, args.compress, out, None).await
    }

    /// A later pre-copy round: row sends cold updated blocks not yet sent (or written again);
    /// bitmap sends the blocks dirtied since the previous round started.
    async fn round_update(&self, disk: &Arc<Disk>, plan: &mut Plan, args: &MigrateArgs, out: &mut Out) -> Result<()> {
        match plan {
            Plan::Row { sent, .. } => {
                let threshold = args.hot_threshold;
                let blocks: Vec<u64> = disk
                    .block_stats()
                    .into_iter()
                    .filter(|(b, s)| s.writes < threshold && sent.get(b).is_none_or(|g| s.generation > *g))
                    .map(|(b, _)| b)
                    .collect();
                self.send_round(disk, RoundKind::Update, View::Live, block_runs(&blocks), args.compress, out, Some(sent)).await
            }
            Plan::Bitmap { last_round_start } => {
                let since = *last_round_start;
                *last_round_start = disk.generation();
                let ranges = dirty_chunks(&disk.blocks_written_since(since), args.bitmap_granularity_blocks, disk.size());
                self.send_round(disk, RoundKind::Update, View::Live, ranges, args.compress, out, None).await
            }
        }
    }

    /// Row: blocks still outstanding for the final round (never sent, or written since).
    fn outstanding(disk: &Disk, sent: &HashMap<u64, u64>) -> Vec<(u64, u64)> {
        disk.block_stats()
            .into_iter()
            .filter(|(b, s)| sent.get(b).is_none_or(|g| s.generation > *g))
            .map(|(b, s)| (b, s.generation))
            .collect()
    }

    /// Row, our addition to the paper's three rounds: while the final round would hold more
    /// than `budget` worth of data at the rate round 1 achieved, send the outstanding blocks
    /// that were not written since the previous pass began. Blocks the guest keeps rewriting
    /// stay for the final round (sent once, as in the paper); blocks it has finished with (a
    /// sequential rewrite) go now instead of lengthening the pause.
    async fn settle(&self, disk: &Arc<Disk>, plan: &mut Plan, args: &MigrateArgs, out: &mut Out, budget: Duration) -> Result<()> {
        let Plan::Row { sent, .. } = plan else { return Ok(()) };
        let rate = {
            let st = self.status();
            let r1 = st.rounds.first();
            let measured = r1.filter(|r| r.seconds > 0.0).map(|r| r.wire_bytes as f64 / r.seconds);
            let cap = args.max_bandwidth.map(|b| b as f64);
            match (measured, cap) {
                (Some(m), Some(c)) => m.min(c),
                (Some(m), None) => m,
                (None, Some(c)) => c,
                (None, None) => return Ok(()),
            }
        };
        let budget_bytes = (rate * budget.as_secs_f64()) as u64;
        let mut pass_start = disk.generation();
        for _ in 0..MAX_SETTLE_PASSES {
            let outstanding = Self::outstanding(disk, sent);
            if outstanding.len() as u64 * BLOCK_SIZE <= budget_bytes {
                break;
            }
            let settled: Vec<u64> = outstanding.iter().filter(|(_, g)| *g <= pass_start).map(|(b, _)| *b).collect();
            if settled.is_empty() {
                break;
            }
            pass_start = disk.generation();
            self.send_round(disk, RoundKind::Update, View::Live, block_runs(&settled), args.compress, out, Some(sent)).await?;
        }
        Ok(())
    }

    /// The final round, VM paused: everything the destination does not have yet.
    async fn round_final(&self, disk: &Arc<Disk>, plan: &Plan, args: &MigrateArgs, out: &mut Out) -> Result<()> {
        let ranges = match plan {
            Plan::Row { sent, .. } => block_runs(&Self::outstanding(disk, sent).into_iter().map(|(b, _)| b).collect::<Vec<_>>()),
            Plan::Bitmap { last_round_start } => {
                dirty_chunks(&disk.blocks_written_since(*last_round_start), args.bitmap_granularity_blocks, disk.size())
            }
        };
        self.send_round(disk, RoundKind::Final, View::Live, ranges, args.compress, out, None).await
    }

    /// Reads, frames and sends block ranges; records each block's generation as of its read.
    async fn send_round(
        &self,
        disk: &Arc<Disk>,
        kind: RoundKind,
        view: View,
        ranges: Vec<(u64, u64)>,
        compress: bool,
        out: &mut Out,
        mut sent: Option<&mut HashMap<u64, u64>>,
    ) -> Result<()> {
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        let round = self.begin_round(kind, total);
        let started = Instant::now();
        let mut stats = RoundStats { round, kind: kind.as_str(), blocks: 0, logical_bytes: 0, zero_bytes: 0, wire_bytes: 0, seconds: 0.0 };
        stats.wire_bytes += send(&mut out.writer, &Message::RoundBegin { round, kind }).await? as u64;
        let (tx, mut rx) = mpsc::channel::<std::io::Result<Chunk>>(4);
        let d = disk.clone();
        let producer = tokio::task::spawn_blocking(move || produce(&d, view, ranges, compress, &tx));
        let mut window_start = Instant::now();
        let mut window_bytes = 0u64;
        while let Some(chunk) = rx.recv().await {
            let chunk = chunk.context("reading the disk")?;
            out.limit.take(chunk.frames.len()).await;
            out.writer_all(&chunk.frames).await?;
            stats.blocks += chunk.blocks;
            stats.logical_bytes += chunk.logical;
            stats.zero_bytes += chunk.zero;
            stats.wire_bytes += chunk.frames.len() as u64;
            window_bytes += chunk.frames.len() as u64;
            if let Some(sent) = sent.as_deref_mut() {
                for b in chunk.first..chunk.first + chunk.blocks {
                    sent.insert(b, chunk.generation);
                }
            }
            self.set(|s| {
                s.round_remaining_blocks = s.round_remaining_blocks.saturating_sub(chunk.blocks);
                if window_start.elapsed() >= Duration::from_millis(500) {
                    s.rate = window_bytes as f64 / window_start.elapsed().as_secs_f64();
                    window_start = Instant::now();
                    window_bytes = 0;
                }
            });
        }
        producer.await?;
        stats.wire_bytes += send(&mut out.writer, &Message::RoundEnd { round }).await? as u64;
        stats.seconds = started.elapsed().as_secs_f64();
        self.end_round(stats);
        Ok(())
    }
}

struct Conn {
    reader: FrameReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
    limit: RateLimit,
}

struct Out {
    writer: tokio::net::tcp::OwnedWriteHalf,
    limit: RateLimit,
}

impl Out {
    async fn writer_all(&mut self, bytes: &[u8]) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        self.writer.write_all(bytes).await.context("sending to the destination")
    }
}

enum Plan {
    Row { sent: HashMap<u64, u64>, epoch: u64 },
    Bitmap { last_round_start: u64 },
}

#[derive(Clone, Copy)]
enum View {
    Live,
    Base(u64),
}

/// One read-and-framed piece of a round.
struct Chunk {
    first: u64,
    blocks: u64,
    logical: u64,
    zero: u64,
    generation: u64,
    frames: Vec<u8>,
}

fn dest_problem(msg: Result<Message>) -> String {
    match msg {
        Ok(Message::Error { message }) => format!("the destination failed: {message}"),
        Ok(other) => format!("unexpected message from the destination: {other:?}"),
        Err(e) => format!("{e:#}"),
    }
}

/// Dirty blocks widened to whole chunks of `granularity` blocks, as a coarse dirty bitmap
/// sends them, as (first, count) runs.
fn dirty_chunks(blocks: &[u64], granularity: u64, disk_size: u64) -> Vec<(u64, u64)> {
    let g = granularity.max(1);
    let total = disk_size.div_ceil(BLOCK_SIZE);
    let mut chunks: Vec<u64> = blocks.iter().map(|b| b / g).collect();
    chunks.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for c in chunks {
        let (first, count) = (c * g, g.min(total - c * g));
        match out.last_mut() {
            Some((f, n)) if *f + *n == first => *n += count,
            _ => out.push((first, count)),
        }
    }
    out
}

/// Runs on the blocking pool: reads ranges in chunks, splits zero blocks from data, compresses
/// and frames them.
fn produce(disk: &Disk, view: View, ranges: Vec<(u64, u64)>, compress: bool, tx: &mpsc::Sender<std::io::Result<Chunk>>) {
    let size = disk.size();
    let mut buf = Vec::with_capacity((CHUNK_BLOCKS * BLOCK_SIZE) as usize);
    for (first, count) in ranges {
        let mut b = first;
        while b < first + count {
            let n = (first + count - b).min(CHUNK_BLOCKS);
            let start = b * BLOCK_SIZE;
            let end = ((b + n) * BLOCK_SIZE).min(size);
            let generation = disk.generation();
            buf.clear();
            let read = match view {
                View::Live => disk.read_append(&mut buf, (end - start) as usize, start),
                View::Base(epoch) => disk.read_base_append(&mut buf, (end - start) as usize, start, epoch),
            };
            if let Err(e) = read {
                let _ = tx.blocking_send(Err(e));
                return;
            }
            let mut chunk = Chunk { first: b, blocks: n, logical: end - start, zero: 0, generation, frames: Vec::new() };
            frame_range(&buf, start, compress, &mut chunk);
            if tx.blocking_send(Ok(chunk)).is_err() {
                return;
            }
            b += n;
        }
    }
}

/// Frames `data` (at byte `start`) as zero extents for all-zero blocks and data extents
/// (one per run of non-zero blocks) for the rest.
fn frame_range(data: &[u8], start: u64, compress: bool, chunk: &mut Chunk) {
    let bs = BLOCK_SIZE as usize;
    let mut i = 0;
    while i < data.len() {
        let zero = migration_stream::is_zero(&data[i..(i + bs).min(data.len())]);
        let mut j = i;
        while j < data.len() && migration_stream::is_zero(&data[j..(j + bs).min(data.len())]) == zero {
            j = (j + bs).min(data.len());
        }
        let offset = start + i as u64;
        if zero {
            Message::Zero { offset, len: (j - i) as u64 }.encode(&mut chunk.frames);
            chunk.zero += (j - i) as u64;
        } else {
            let (codec, payload): (Codec, Vec<u8>) = migration_stream::encode_block(&data[i..j], compress);
            Message::Data { offset, codec, logical_len: (j - i) as u32, payload }.encode(&mut chunk.frames);
        }
        i = j;
    }
}
