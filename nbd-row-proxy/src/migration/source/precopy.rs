//! The pre-copy rounds, the settle passes and the armed update passes, and how the actor
//! starts and ends them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use control_api::{Phase, RoundKind};
use migration_session::{
    data_blocks, link, take_data_blocks, BitmapPlan, RowPlan, SourceSession, Span, WriteLog, Written,
};
use migration_stream::Message;
use row_store::{BlockBackend, Disk, BLOCK_SIZE};
use tokio::sync::watch;

use super::actor::Actor;
use super::actor::Link;
use super::conn::{dest_problem, Conn, DestAsk};
use super::{lock, MigrateArgs, KEEPALIVE_EVERY};
use crate::migration::rounds::{Out, Rounds, Sent};
use crate::migration::send;

/// Most settle passes before the row strategy declares pre-copy done.
const MAX_SETTLE_PASSES: u32 = 6;

/// An armed, ready session sends a settle pass this often (see [`armed_updates`]).
const ARMED_PASS_EVERY: Duration = Duration::from_secs(1);
/// What one armed pass may send, in time at the planning rate: a VM manager's switchover may
/// come at any moment, and a long pass in flight then competes with the last of the memory
/// migration (link and CPU); what it leaves goes in the next pass.
const ARMED_PASS_MAX: Duration = Duration::from_millis(100);
/// The pause after an armed pass that was cut short, before the next.
const ARMED_PASS_GAP: Duration = Duration::from_millis(50);
/// The smallest cap on an armed pass, in blocks (1 MiB), when the rate is low or unknown.
const ARMED_PASS_MIN_BLOCKS: u64 = 256;

/// The write statistics of the disk, for the round planners.
pub(super) struct DiskLog<'a>(pub(super) &'a Disk);

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
pub(super) enum Plan {
    Row(RowPlan),
    Bitmap(BitmapPlan),
}

impl Plan {
    pub(super) fn mark(&mut self, sent: &Sent) {
        if let Plan::Row(row) = self {
            for &(first, count, epoch) in sent {
                row.mark_sent(first, count, epoch);
            }
        }
    }
}

impl Actor {
    pub(super) fn run_precopy(&mut self) {
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

    pub(super) async fn precopy_ended(
        &mut self,
        done: std::result::Result<(Conn, Plan, Result<()>), tokio::task::JoinError>,
    ) {
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
    pub(super) fn run_armed_updates(&mut self) {
        let ready = self.phase() == Phase::Ready;
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

    /// Stops the armed update passes (after the pass in progress) and puts the connection back.
    pub(super) async fn stop_armed_updates(&mut self) {
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
    pub(super) async fn armed_ended(
        &mut self,
        done: std::result::Result<(Conn, Plan, Result<Option<DestAsk>>), tokio::task::JoinError>,
    ) {
        let Some(session) = self.session.as_mut() else { return };
        match done {
            Ok((conn, plan, Ok(ask))) => {
                session.link = Link::Idle(conn, plan);
                if let Some(ask) = ask {
                    self.asked(ask).await;
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
}

/// The pre-copy rounds, stopped early by a destination error or by `stop`.
pub(super) async fn precopy(
    disk: Arc<Disk>,
    rounds: Arc<Rounds>,
    args: MigrateArgs,
    mut conn: Conn,
    mut plan: Plan,
    mut stop: watch::Receiver<bool>,
) -> (Conn, Plan, Result<()>) {
    let result = {
        let Conn { out, from_dest, asks, urgent_tx, .. } = &mut conn;
        let work = precopy_rounds(&disk, &rounds, &args, out, &mut plan);
        tokio::pin!(work);
        loop {
            tokio::select! {
                r = &mut work => break r,
                msg = from_dest.recv() => break Err(anyhow!("{}", dest_problem(msg))),
                Some(ask) = asks.recv() => {
                    let DestAsk::Claim = ask else {
                        // Not armed yet: a destination QEMU that left changes nothing.
                        tracing::info!(?ask, "the destination's QEMU left during the pre-copy");
                        continue;
                    };
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
/// A pass sends at most [`ARMED_PASS_MAX`] worth of data; the rest goes in the next one,
/// [`ARMED_PASS_GAP`] later.
/// Returns on an ask of the destination (a claim, an abandonment), on `stop` (`None`, between
/// passes), or on a failure.
pub(super) async fn armed_updates(
    disk: Arc<Disk>,
    rounds: Arc<Rounds>,
    args: MigrateArgs,
    mut conn: Conn,
    mut plan: Plan,
    mut stop: watch::Receiver<bool>,
) -> (Conn, Plan, Result<Option<DestAsk>>) {
    let rate = link::planning_rate(rounds.first_round_rate(), args.max_bandwidth.map(|b| b as f64));
    let budget_ms = args.final_budget.map_or(0.0, |b| b.as_secs_f64() * 1000.0);
    let budget_blocks = link::bytes_within(budget_ms, rate) / BLOCK_SIZE;
    let pass_blocks =
        (link::bytes_within(ARMED_PASS_MAX.as_secs_f64() * 1000.0, rate) / BLOCK_SIZE).max(ARMED_PASS_MIN_BLOCKS);
    let mut pass_start = disk.mark();
    let mut last_sent = Instant::now();
    // After a pass cut short the next follows soon: short passes, not fewer blocks.
    let mut next_pass = ARMED_PASS_EVERY;
    let result = loop {
        let Conn { out, from_dest, asks, .. } = &mut conn;
        let tick = tokio::select! {
            Some(ask) = asks.recv() => break Ok(Some(ask)),
            msg = from_dest.recv() => break Err(anyhow!("{}", dest_problem(msg))),
            Some(frame) = out.urgent.recv() => {
                if let Err(e) = out.send_urgent(&frame).await {
                    break Err(e);
                }
                false
            }
            r = stop.changed() => {
                if r.is_err() || *stop.borrow() {
                    break Ok(None);
                }
                false
            }
            () = tokio::time::sleep(next_pass) => true,
        };
        if !tick {
            continue;
        }
        let Plan::Row(row) = &plan else { break Ok(None) };
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
        let whole = data_blocks(&settled);
        let settled = take_data_blocks(settled, pass_blocks);
        next_pass = if data_blocks(&settled) < whole { ARMED_PASS_GAP } else { ARMED_PASS_EVERY };
        match rounds.send(out, RoundKind::Update, disk.clone(), settled).await {
            Ok(sent) => plan.mark(&sent),
            Err(e) => break Err(e),
        }
        last_sent = Instant::now();
    };
    (conn, plan, result)
}

pub(super) async fn precopy_rounds(
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
pub(super) async fn settle(
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
        let blocks = data_blocks(&settled);
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
pub(super) async fn allocated_blocks(view: Arc<dyn BlockBackend>) -> Result<Vec<Span>> {
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
