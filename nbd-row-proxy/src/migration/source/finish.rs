//! The hand-over: `migrate-finish` or the destination's claim, the post-copy decision, the
//! final round and the commit.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use control_api::{MigrateFinishArgs, MigrationStatus, Phase, PostcopyMode, PostcopyStatus, RoundKind};
use migration_session::{data_blocks, link, SourceAction, SourceSession, Span};
use migration_stream::Message;
use row_store::{BlockBackend, Disk, BLOCK_SIZE};

use super::actor::Actor;
use super::actor::Link;
use super::conn::{dest_problem, Conn, DestAsk, Fetcher, Heard};
use super::precopy::{DiskLog, Plan};
use super::{lock, status_of, MigrateArgs, MigrationError};
use crate::migration::rounds::Rounds;
use crate::migration::test_hooks::pause;
use crate::migration::{send, COMMIT_TIMEOUT};

impl Actor {
    /// `migrate-finish`, or (`claimed`) the destination's claim.
    pub(super) async fn finish(
        &mut self,
        args: MigrateFinishArgs,
        claimed: bool,
    ) -> Result<MigrationStatus, MigrationError> {
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

    /// Whether the session was started armed (`migrate-start` with `arm`): the destination's
    /// claim hands the disk over, its abandonment disarms.
    fn armed(&self) -> bool {
        self.session.as_ref().is_some_and(|s| s.args.arm)
    }

    /// What the destination asks of an armed source: a claim hands the disk over; an
    /// abandonment (its QEMU left before its guest wrote) disarms a ready, armed session as
    /// `migrate-cancel` does, and is ignored otherwise (a claim came first, or nothing is armed).
    pub(super) async fn asked(&mut self, ask: DestAsk) {
        let why = match ask {
            DestAsk::Claim => return self.claimed().await,
            DestAsk::Abandoned(why) => why,
        };
        let armed = self.armed();
        if !armed || self.phase() != Phase::Ready {
            tracing::info!(phase = %self.phase(), "the destination's QEMU left ({why}); nothing to disarm");
            return;
        }
        tracing::warn!("the VM manager abandoned the migration: {why}; disarming (the disk stays here)");
        if let Err(e) = self.cancel().await {
            tracing::error!("disarming after the destination's QEMU left: {e}");
        }
    }

    /// The destination asked for the disk: its guest runs there (a VM manager migrated it) and
    /// wants to write. An armed, ready session hands the disk over as `migrate-finish` with
    /// post-copy would (writes here are refused first), and completes by itself once the
    /// destination holds every block; otherwise the claim is refused.
    pub(super) async fn claimed(&mut self) {
        let armed = self.armed();
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
    pub(super) async fn complete_claimed(&mut self) {
        match self.step(SourceSession::complete) {
            Ok(actions) => match self.perform(actions).await {
                Ok(()) => tracing::info!("migration complete: the destination owns the disk"),
                Err(e) => tracing::error!("completing the claimed hand-over: {e}"),
            },
            Err(e) => tracing::error!("completing the claimed hand-over: {e}"),
        }
    }

    /// What answers the destination's fetches on this session's connections.
    pub(super) fn fetcher(&self, compress: bool) -> Fetcher {
        Fetcher { disk: self.proxy.disk.clone(), compress, postcopy: self.shared.postcopy.clone() }
    }

    /// Whether the final round leaves its data for after the switchover, and why (the rule is
    /// `migration_session::link::postcopy_reason`).
    fn decide_postcopy(
        &self,
        finish: &MigrateFinishArgs,
        args: &MigrateArgs,
        rounds: &Rounds,
        spans: &[Span],
    ) -> Option<PostcopyStatus> {
        let blocks = data_blocks(spans);
        let rate = link::planning_rate(rounds.first_round_rate(), args.max_bandwidth.map(|b| b as f64));
        let predicted_ms = link::transfer_ms(blocks * BLOCK_SIZE, rate);
        if predicted_ms.is_finite() {
            lock(&rounds.progress).predicted_final_ms = Some(predicted_ms);
        }
        let budget_ms = finish.budget_ms.or(args.final_budget.map(|b| b.as_millis() as u64));
        let mode = finish.postcopy.unwrap_or(PostcopyMode::Never);
        let reason = link::postcopy_reason(mode, blocks, predicted_ms, budget_ms)?;
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

    /// What the final round sends, and what it leaves to the post-copy push.
    fn plan_final(
        &self,
        plan: &mut Plan,
        finish: &MigrateFinishArgs,
        args: &MigrateArgs,
        rounds: &Rounds,
    ) -> FinalRound {
        let log = DiskLog(&self.proxy.disk);
        let ranges = match plan {
            Plan::Row(row) => row.final_spans(&log),
            Plan::Bitmap(bm) => bm.next_round(&log),
        };
        let Some(postcopy) = self.decide_postcopy(finish, args, rounds, &ranges) else {
            return FinalRound { send: ranges, postcopy: None, residual: Vec::new() };
        };
        tracing::info!(blocks = postcopy.blocks, reason = %postcopy.reason, "post-copy: the final round leaves its data for after the switchover");
        let (residual, zero): (Vec<Span>, Vec<Span>) = ranges.into_iter().partition(|s| !s.zero);
        FinalRound { send: zero, postcopy: Some(postcopy), residual }
    }

    /// Sends the final round and the commit, and waits for the destination's answer. With
    /// post-copy the final round holds only zeroed ranges; the data ranges are announced as
    /// missing and pushed after the commit.
    pub(super) async fn final_round(&mut self, finish: &MigrateFinishArgs) -> Result<(), MigrationError> {
        let session = self.session.as_mut().ok_or("no session connection: the migration restarted")?;
        let (rounds, args) = (session.rounds.clone(), session.args.clone());
        let Link::Idle(mut conn, mut plan) = std::mem::replace(&mut session.link, Link::None) else {
            return Err("the session's connection is gone".into());
        };
        let cancels_before = self.shared.cancels.count();
        pause("final-round").await;
        let round = self.plan_final(&mut plan, finish, &args, &rounds);
        let result = self.send_and_commit(&mut conn, &rounds, &round, cancels_before).await;
        match result {
            Ok(()) => {
                tracing::info!("the destination committed: the disk is handed over");
                let session = self.session.as_mut().expect("session");
                session.link = Link::Idle(conn, plan);
                let actions = if let Some(p) = round.postcopy {
                    session.residual = round.residual;
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

    /// The final round's frames, then the commit and its answer. Until the commit goes out
    /// nothing is promised to the destination: a `migrate-cancel` stops the round at once (a
    /// final round can take minutes on a slow link).
    async fn send_and_commit(
        &self,
        conn: &mut Conn,
        rounds: &Rounds,
        round: &FinalRound,
        cancels_before: u64,
    ) -> Result<()> {
        let started = Instant::now();
        tokio::select! {
            r = send_final(conn, rounds, &self.proxy.disk, round) => r?,
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
        let commit_took = commit(conn).await?;
        tracing::info!(
            commit_ms = commit_took.as_millis() as u64,
            round_ms = started.elapsed().as_millis() as u64,
            "the destination confirmed the commit"
        );
        // The round's time includes the destination's sync: that is what the paused VM waits for.
        if let Some(r) = lock(&rounds.progress).rounds.last_mut() {
            r.seconds = started.elapsed().as_secs_f64();
        }
        Ok(())
    }
}

/// The final round's ranges: what it sends before the commit, and what a post-copy leaves for
/// the push (with why).
struct FinalRound {
    send: Vec<Span>,
    postcopy: Option<PostcopyStatus>,
    residual: Vec<Span>,
}

/// Sends the final round's ranges; with post-copy, the missing list after them, and syncs the
/// disk: after the commit the source's disk is the only copy of the residual, and it must
/// survive a crash of this host (the guest's last writes may not have been flushed when it
/// paused).
async fn send_final(conn: &mut Conn, rounds: &Rounds, disk: &Arc<Disk>, round: &FinalRound) -> Result<()> {
    let started = Instant::now();
    let live: Arc<dyn BlockBackend> = disk.clone();
    rounds.send(&mut conn.out, RoundKind::Final, live, round.send.clone()).await?;
    if round.residual.is_empty() {
        return Ok(());
    }
    let sent_at = started.elapsed();
    let size = disk.size();
    let ranges: Vec<(u64, u64)> = round
        .residual
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
    let d = disk.clone();
    let synced = Instant::now();
    tokio::task::spawn_blocking(move || d.flush()).await?.context("syncing the disk before a post-copy")?;
    tracing::info!(
        round_ms = sent_at.as_millis() as u64,
        missing_ranges = round.residual.len(),
        missing_bytes = frames.len(),
        sync_ms = synced.elapsed().as_millis() as u64,
        "final round sent with the post-copy's missing list"
    );
    Ok(())
}

/// Sends the commit and waits for the destination to confirm it (answering its fetches
/// meanwhile); returns how long that took.
async fn commit(conn: &mut Conn) -> Result<std::time::Duration> {
    let commit_sent = Instant::now();
    send(&mut conn.out.writer, &Message::Commit).await?;
    match conn.next_answering(tokio::time::Instant::now() + COMMIT_TIMEOUT).await? {
        Heard::Frame(Message::Committed) => {}
        other => bail!("{}", other.problem("confirm the commit")),
    }
    Ok(commit_sent.elapsed())
}
