//! The source's session: `idle → setup → precopy → ready → finishing → handed-over →
//! completed`, or `cancelled` / `failed` before the hand-over.
//!
//! Each input is a method that returns the [`SourceAction`]s to perform, in order, or a
//! [`SourceRefusal`] that leaves the state as it was. The proxy performs the actions (write the
//! ownership record, refuse writes, send frames, merge the overlay back) and feeds the outcomes
//! back in. Nothing here does I/O, so every transition has a unit test.
//!
//! The rule it keeps: once the commit may have reached the destination, the source refuses
//! writes, persistently, until the destination says it has not taken the disk (a revoke it
//! accepts) or an operator forces a `reclaim`.

use crate::phase::{Fence, Phase, Strategy};

use crate::durable::{now_rfc3339, Ownership, SessionId, SourceStage};

/// What the proxy must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceAction {
    /// Write the ownership record durably (`None`: remove it, this host owns the disk).
    Persist(Option<Ownership>),
    /// Refuse writes from now on, once those in flight have finished.
    RefuseWrites(String),
    /// Accept writes again.
    AllowWrites,
    /// Give the disk back to the source's own use: merge the ROW overlay back, or stop the dirty
    /// tracking of the bitmap strategy.
    RollBack,
    /// Connect to the destination and authenticate; then call [`SourceSession::connected`] or
    /// [`SourceSession::transport_failed`].
    Connect,
    /// Run the pre-copy rounds; then [`SourceSession::precopy_done`].
    RunPrecopy,
    /// Send the final round and the commit ([`SourceSession::commit_sent`]), then wait for the
    /// destination's answer ([`SourceSession::committed`]).
    RunFinalRound,
    /// Tell the destination to throw the session away (best effort) and close the connection.
    SendDiscard(String),
    /// Tell the destination the session is over, then close the connection.
    SendDone,
    /// Ask the destination, over a new connection if need be, to give the disk back; then
    /// [`SourceSession::revoke_answered`].
    AskRevoke,
    /// Post-copy: push the blocks the destination does not hold yet and answer its fetches,
    /// reconnecting (`Resume`) whenever the link breaks, until it holds them all; then
    /// [`SourceSession::postcopy_done`].
    Push,
}

/// Why an input was refused; the state is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceRefusal {
    /// Nothing to act on.
    #[error("no migration has been started")]
    NoMigration,
    /// A migration is already running.
    #[error("a migration is already {0}")]
    Busy(Phase),
    /// `migrate-finish` before pre-copy is done.
    #[error("pre-copy is still running (phase {0}); migrate-finish waits for phase ready")]
    NotReady(Phase),
    /// The migration ended before the hand-over.
    #[error("the migration is over ({phase}){}", why.as_ref().map(|w| format!(": {w}")).unwrap_or_default())]
    Over {
        /// `cancelled` or `failed`.
        phase: Phase,
        /// The error, if it failed.
        why: Option<String>,
    },
    /// `migrate-complete` before the destination committed.
    #[error("migrate-complete needs the hand-over first (phase {0}): run migrate-finish")]
    NotHandedOver(Phase),
    /// A hand-over is being decided right now.
    #[error("the disk is being handed over right now; try again once migrate-finish has returned")]
    InProgress,
    /// The destination owns the disk.
    #[error(
        "the destination {peer} owns the disk ({why}); the source keeps refusing writes. If that host is \
         gone for good and its copy must not be used, `reclaim` with force: true"
    )]
    DestinationOwns {
        /// The destination.
        peer: String,
        /// What it said.
        why: String,
    },
    /// The destination could not be asked.
    #[error(
        "cannot ask the destination {peer} whether it has taken the disk ({why}); the source keeps refusing \
         writes. Retry when it is reachable, or if it is gone for good, `reclaim` with force: true"
    )]
    CannotAsk {
        /// The destination.
        peer: String,
        /// Why not.
        why: String,
    },
    /// The migration completed: nothing to cancel.
    #[error(
        "the migration to {0} completed: the destination owns the disk. If that host is gone for good, \
         `reclaim` with force: true"
    )]
    Completed(String),
    /// `reclaim` on a disk whose writes are not refused.
    #[error("writes are not refused: there is nothing to reclaim")]
    NothingToReclaim,
    /// Two revokes at once.
    #[error("the destination is already being asked to give the disk back")]
    Revoking,
    /// `migrate-complete` while the post-copy push runs.
    #[error("post-copy is still running: the destination does not hold every block yet (see query-migrate)")]
    PostcopyRunning,
    /// The disk belongs to another host as a migration destination that never completed.
    #[error("{0}")]
    Other(String),
}

/// The source's session state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSession {
    phase: Phase,
    session: Option<SessionId>,
    peer: Option<String>,
    strategy: Option<Strategy>,
    fenced_since: Option<String>,
    /// The commit may have reached the destination.
    commit_sent: bool,
    error: Option<String>,
    /// Where to return if a revoke is refused.
    revoking_from: Option<Phase>,
    /// Handed over by post-copy: the destination does not hold every block yet.
    postcopy: bool,
    /// Handed over on the destination's claim: completes by itself.
    claimed: bool,
}

impl Default for SourceSession {
    fn default() -> Self {
        Self::new()
    }
}

type Step = Result<Vec<SourceAction>, SourceRefusal>;

/// What the destination answered to a revoke ([`SourceAction::AskRevoke`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevokeAnswer {
    /// It gave the disk back (or never had it).
    GaveBack,
    /// It owns the disk (its guest wrote): why.
    Owns(String),
    /// It could not be asked: why.
    Unreachable(String),
}

impl SourceSession {
    /// No migration.
    pub fn new() -> Self {
        Self {
            phase: Phase::Idle,
            session: None,
            peer: None,
            strategy: None,
            fenced_since: None,
            commit_sent: false,
            error: None,
            revoking_from: None,
            postcopy: false,
            claimed: false,
        }
    }

    /// The session as the ownership record left it before a restart, and what to do about it:
    /// a pre-copy interrupted by the restart is rolled back; a hand-over keeps writes refused.
    pub fn restore(record: &Ownership) -> (Self, Vec<SourceAction>) {
        let mut s = Self::new();
        let Ownership::Source { stage, session, peer, strategy, fenced_since, postcopy, claimed } = record else {
            return (s, Vec::new());
        };
        s.claimed = *claimed;
        s.session = Some(*session);
        s.peer = Some(peer.clone());
        s.strategy = Some(*strategy);
        s.fenced_since = fenced_since.clone();
        match stage {
            SourceStage::Precopy => {
                s.phase = Phase::Failed;
                s.error = Some("the source proxy restarted during pre-copy".into());
                (s, vec![SourceAction::RollBack, SourceAction::Persist(None)])
            }
            SourceStage::Finishing | SourceStage::HandedOver | SourceStage::Completed => {
                s.phase = match stage {
                    SourceStage::Finishing => Phase::Finishing,
                    SourceStage::HandedOver => Phase::HandedOver,
                    _ => Phase::Completed,
                };
                // Whether the commit got there is unknown after a restart: assume it did.
                s.commit_sent = true;
                if *stage == SourceStage::Finishing {
                    s.error = Some("the source proxy restarted while handing the disk over".into());
                }
                let reason = s.fence_reason();
                let mut actions = vec![SourceAction::RefuseWrites(reason)];
                if *postcopy && *stage != SourceStage::Finishing {
                    // The destination runs the guest and still reads blocks from here.
                    s.postcopy = true;
                    actions.push(SourceAction::Push);
                }
                (s, actions)
            }
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The session id, once one was started.
    pub fn session(&self) -> Option<SessionId> {
        self.session
    }

    /// The destination, once one was given.
    pub fn peer(&self) -> Option<&str> {
        self.peer.as_deref()
    }

    /// The method, once one was started.
    pub fn strategy(&self) -> Option<Strategy> {
        self.strategy
    }

    /// Why the migration failed or is in doubt.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// Whether writes are refused because of a hand-over.
    pub fn fenced(&self) -> bool {
        self.fenced_since.is_some()
    }

    /// The fence as `query-status` shows it.
    pub fn fence(&self) -> Option<Fence> {
        Some(Fence {
            reason: self.fence_reason(),
            since: self.fenced_since.clone()?,
            session: self.session?.to_string(),
            peer: self.peer.clone()?,
            phase: self.phase,
        })
    }

    fn fence_reason(&self) -> String {
        let peer = self.peer.as_deref().unwrap_or("?");
        match self.phase {
            Phase::Completed => format!("the disk was migrated to {peer}, which owns it now"),
            Phase::HandedOver => format!("the disk was handed over to {peer}"),
            _ => format!("the disk is being handed over to {peer}"),
        }
    }

    fn record(&self, stage: SourceStage) -> Option<Ownership> {
        Some(Ownership::Source {
            stage,
            session: self.session?,
            peer: self.peer.clone()?,
            strategy: self.strategy?,
            fenced_since: self.fenced_since.clone(),
            postcopy: self.postcopy,
            claimed: self.claimed,
        })
    }

    /// The destination's claim (its guest writes: a VM manager migrated it): hands over as
    /// [`SourceSession::finish`] does, recorded as claimed so the source completes by itself.
    pub fn finish_claimed(&mut self) -> Step {
        let before = self.claimed;
        self.claimed = self.phase == Phase::Ready || before;
        let step = self.finish();
        if step.is_err() {
            self.claimed = before;
        }
        step
    }

    /// Whether the hand-over was claimed by the destination.
    pub fn claimed(&self) -> bool {
        self.claimed
    }

    /// `migrate-start`: a new session to `peer`.
    pub fn start(&mut self, session: SessionId, peer: &str, strategy: Strategy) -> Step {
        match self.phase {
            Phase::Idle | Phase::Cancelled | Phase::Failed => {}
            Phase::Completed => return Err(SourceRefusal::Completed(self.peer.clone().unwrap_or_default())),
            p if self.fenced() => {
                return Err(SourceRefusal::Other(format!(
                    "the disk is handed over to {} ({p}); it cannot be migrated again from here",
                    self.peer.as_deref().unwrap_or("?")
                )))
            }
            p => return Err(SourceRefusal::Busy(p)),
        }
        *self = Self {
            phase: Phase::Setup,
            session: Some(session),
            peer: Some(peer.to_string()),
            strategy: Some(strategy),
            ..Self::new()
        };
        Ok(vec![SourceAction::Persist(self.record(SourceStage::Precopy)), SourceAction::Connect])
    }

    /// The destination accepted the session.
    pub fn connected(&mut self) -> Step {
        self.expect(Phase::Setup)?;
        self.phase = Phase::Precopy;
        Ok(vec![SourceAction::RunPrecopy])
    }

    /// The pre-copy rounds are done; the source waits for `migrate-finish`.
    pub fn precopy_done(&mut self) -> Step {
        self.expect(Phase::Precopy)?;
        self.phase = Phase::Ready;
        Ok(Vec::new())
    }

    fn expect(&self, phase: Phase) -> Result<(), SourceRefusal> {
        if self.phase == phase {
            Ok(())
        } else {
            Err(SourceRefusal::Other(format!("unexpected in phase {}", self.phase)))
        }
    }

    /// `migrate-finish` (the guest is paused): refuse writes durably, then send the rest.
    pub fn finish(&mut self) -> Step {
        match self.phase {
            Phase::Ready => {}
            // Already handed over: answering again is harmless.
            Phase::HandedOver | Phase::Completed => return Ok(Vec::new()),
            Phase::Idle => return Err(SourceRefusal::NoMigration),
            Phase::Setup | Phase::Precopy => return Err(SourceRefusal::NotReady(self.phase)),
            Phase::Finishing => return Err(SourceRefusal::InProgress),
            Phase::Cancelled | Phase::Failed => {
                return Err(SourceRefusal::Over { phase: self.phase, why: self.error.clone() })
            }
        }
        self.phase = Phase::Finishing;
        self.fenced_since = Some(now_rfc3339());
        Ok(vec![
            SourceAction::Persist(self.record(SourceStage::Finishing)),
            SourceAction::RefuseWrites(self.fence_reason()),
            SourceAction::RunFinalRound,
        ])
    }

    /// The commit is about to be sent: from here on the destination may own the disk.
    pub fn commit_sent(&mut self) {
        if self.phase == Phase::Finishing {
            self.commit_sent = true;
        }
    }

    /// The destination answered the commit: it holds the disk durably.
    pub fn committed(&mut self) -> Step {
        self.expect(Phase::Finishing)?;
        self.phase = Phase::HandedOver;
        self.error = None;
        // Writes stay refused; the reason says where the disk is now.
        Ok(vec![
            SourceAction::Persist(self.record(SourceStage::HandedOver)),
            SourceAction::RefuseWrites(self.fence_reason()),
        ])
    }

    /// The destination committed a post-copy switchover: it serves the disk and fetches what it
    /// does not hold yet from here, while the rest is pushed.
    pub fn committed_with_residual(&mut self) -> Step {
        self.expect(Phase::Finishing)?;
        self.postcopy = true;
        let mut actions = self.committed()?;
        actions.push(SourceAction::Push);
        Ok(actions)
    }

    /// Whether the destination still needs blocks from here (post-copy).
    pub fn postcopy(&self) -> bool {
        self.postcopy
    }

    /// The destination holds every block durably: the post-copy is over.
    pub fn postcopy_done(&mut self) -> Step {
        if !self.postcopy {
            return Ok(Vec::new());
        }
        self.postcopy = false;
        let stage = if self.phase == Phase::Completed { SourceStage::Completed } else { SourceStage::HandedOver };
        Ok(vec![SourceAction::Persist(self.record(stage))])
    }

    /// `migrate-complete`, after the switchover: the destination owns the disk. Also accepted
    /// while finishing once the commit may have arrived (a source restarted during the
    /// hand-over does not know): whoever says the switchover happened knows better, and the
    /// source only stays fenced for good.
    pub fn complete(&mut self) -> Step {
        if self.postcopy && self.phase == Phase::HandedOver {
            return Err(SourceRefusal::PostcopyRunning);
        }
        match self.phase {
            Phase::HandedOver | Phase::Finishing if self.commit_sent => {
                self.phase = Phase::Completed;
                Ok(vec![
                    SourceAction::Persist(self.record(SourceStage::Completed)),
                    SourceAction::RefuseWrites(self.fence_reason()),
                    SourceAction::SendDone,
                ])
            }
            Phase::Completed => Ok(Vec::new()),
            Phase::Idle => Err(SourceRefusal::NoMigration),
            Phase::Cancelled | Phase::Failed => Err(SourceRefusal::Over { phase: self.phase, why: self.error.clone() }),
            p => Err(SourceRefusal::NotHandedOver(p)),
        }
    }

    fn give_back(&mut self, phase: Phase) -> Vec<SourceAction> {
        self.phase = phase;
        self.fenced_since = None;
        self.commit_sent = false;
        self.revoking_from = None;
        self.postcopy = false;
        vec![SourceAction::AllowWrites, SourceAction::RollBack, SourceAction::Persist(None)]
    }

    /// `migrate-cancel`: give the disk back to the source if that is safe.
    pub fn cancel(&mut self) -> Step {
        match self.phase {
            Phase::Idle | Phase::Cancelled | Phase::Failed => Ok(Vec::new()),
            Phase::Setup | Phase::Precopy | Phase::Ready => {
                let mut actions = vec![SourceAction::SendDiscard("cancelled by the source".into())];
                actions.extend(self.give_back(Phase::Cancelled));
                Ok(actions)
            }
            Phase::Finishing if !self.commit_sent => {
                let mut actions = vec![SourceAction::SendDiscard("cancelled by the source".into())];
                actions.extend(self.give_back(Phase::Cancelled));
                Ok(actions)
            }
            Phase::Finishing | Phase::HandedOver => self.ask_revoke(),
            Phase::Completed => Err(SourceRefusal::Completed(self.peer.clone().unwrap_or_default())),
        }
    }

    fn ask_revoke(&mut self) -> Step {
        if self.revoking_from.is_some() {
            return Err(SourceRefusal::Revoking);
        }
        self.revoking_from = Some(self.phase);
        Ok(vec![SourceAction::AskRevoke])
    }

    /// The destination's answer to [`SourceAction::AskRevoke`].
    pub fn revoke_answered(&mut self, answer: RevokeAnswer) -> Step {
        let Some(from) = self.revoking_from.take() else {
            return Err(SourceRefusal::Other("no revoke was asked for".into()));
        };
        let peer = self.peer.clone().unwrap_or_default();
        match answer {
            RevokeAnswer::GaveBack => Ok(self.give_back(Phase::Cancelled)),
            RevokeAnswer::Owns(why) => {
                self.phase = from;
                Err(SourceRefusal::DestinationOwns { peer, why })
            }
            RevokeAnswer::Unreachable(why) => {
                self.phase = from;
                Err(SourceRefusal::CannotAsk { peer, why })
            }
        }
    }

    /// `reclaim`: take a handed-over disk back. With `force` no questions are asked.
    pub fn reclaim(&mut self, force: bool) -> Step {
        if !self.fenced() {
            return Err(SourceRefusal::NothingToReclaim);
        }
        if force {
            self.revoking_from = None;
            self.error = Some("reclaimed by force".into());
            return Ok(self.give_back(Phase::Cancelled));
        }
        match self.phase {
            Phase::Completed => Err(SourceRefusal::Completed(self.peer.clone().unwrap_or_default())),
            Phase::Finishing if !self.commit_sent => Err(SourceRefusal::InProgress),
            _ => self.ask_revoke(),
        }
    }

    /// The connection to the destination failed (or the destination reported an error).
    pub fn transport_failed(&mut self, why: &str) -> Step {
        match self.phase {
            Phase::Setup | Phase::Precopy | Phase::Ready => {
                self.error = Some(why.to_string());
                let mut actions = vec![SourceAction::SendDiscard(why.to_string())];
                actions.extend(self.give_back(Phase::Failed));
                Ok(actions)
            }
            Phase::Finishing if !self.commit_sent => {
                self.error = Some(why.to_string());
                let mut actions = vec![SourceAction::SendDiscard(why.to_string())];
                actions.extend(self.give_back(Phase::Failed));
                Ok(actions)
            }
            Phase::Finishing => {
                // The commit may have arrived: the destination may own the disk. Stay fenced.
                self.error = Some(format!(
                    "{why}; the commit was sent, so the destination may own the disk: writes stay refused \
                     (migrate-cancel asks the destination to give it back)"
                ));
                Ok(Vec::new())
            }
            // After the hand-over the session's connection is no longer needed.
            Phase::HandedOver | Phase::Completed | Phase::Idle | Phase::Cancelled | Phase::Failed => Ok(Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SourceAction::*;

    const ID: SessionId = SessionId([7; 16]);
    const PEER: &str = "tcp:192.0.2.2:10810";

    fn at(phase: Phase) -> SourceSession {
        let mut s = SourceSession::new();
        if phase == Phase::Idle {
            return s;
        }
        s.start(ID, PEER, Strategy::Row).unwrap();
        let path: &[fn(&mut SourceSession) -> Step] = match phase {
            Phase::Setup => &[],
            Phase::Precopy => &[SourceSession::connected],
            Phase::Ready => &[SourceSession::connected, SourceSession::precopy_done],
            Phase::Finishing => &[SourceSession::connected, SourceSession::precopy_done, SourceSession::finish],
            Phase::HandedOver => &[SourceSession::connected, SourceSession::precopy_done, SourceSession::finish, |s| {
                s.commit_sent();
                s.committed()
            }],
            Phase::Completed => &[
                SourceSession::connected,
                SourceSession::precopy_done,
                SourceSession::finish,
                |s| {
                    s.commit_sent();
                    s.committed()
                },
                SourceSession::complete,
            ],
            Phase::Cancelled => &[SourceSession::cancel],
            Phase::Failed => &[|s| s.transport_failed("link down")],
            Phase::Idle => unreachable!(),
        };
        for step in path {
            step(&mut s).unwrap();
        }
        assert_eq!(s.phase(), phase);
        s
    }

    const ALL: [Phase; 9] = [
        Phase::Idle,
        Phase::Setup,
        Phase::Precopy,
        Phase::Ready,
        Phase::Finishing,
        Phase::HandedOver,
        Phase::Completed,
        Phase::Cancelled,
        Phase::Failed,
    ];

    fn persisted_stage(actions: &[SourceAction]) -> Option<Option<SourceStage>> {
        actions.iter().find_map(|a| match a {
            Persist(Some(Ownership::Source { stage, .. })) => Some(Some(*stage)),
            Persist(None) => Some(None),
            _ => None,
        })
    }

    #[test]
    fn the_happy_path_persists_each_stage_before_acting_on_it() {
        let mut s = SourceSession::new();
        let a = s.start(ID, PEER, Strategy::Row).unwrap();
        assert_eq!(persisted_stage(&a), Some(Some(SourceStage::Precopy)));
        assert_eq!(a.last(), Some(&Connect));
        assert_eq!(s.connected().unwrap(), vec![RunPrecopy]);
        assert!(s.precopy_done().unwrap().is_empty());
        assert!(!s.fenced());
        let a = s.finish().unwrap();
        assert!(matches!(&a[..], [Persist(Some(_)), RefuseWrites(_), RunFinalRound]), "{a:?}");
        assert_eq!(persisted_stage(&a), Some(Some(SourceStage::Finishing)));
        assert!(s.fenced() && s.fence().unwrap().peer == PEER);
        s.commit_sent();
        assert_eq!(persisted_stage(&s.committed().unwrap()), Some(Some(SourceStage::HandedOver)));
        let a = s.complete().unwrap();
        assert_eq!(persisted_stage(&a), Some(Some(SourceStage::Completed)));
        assert_eq!(a.last(), Some(&SendDone));
        assert!(s.fenced(), "a completed source keeps refusing writes");
    }

    #[test]
    fn start_is_refused_while_busy_or_handed_over() {
        for p in ALL {
            let mut s = at(p);
            let before = s.clone();
            let r = s.start(SessionId([9; 16]), PEER, Strategy::Bitmap);
            match p {
                Phase::Idle | Phase::Cancelled | Phase::Failed => assert!(r.is_ok(), "{p}"),
                Phase::Completed => assert!(matches!(r, Err(SourceRefusal::Completed(_)))),
                Phase::Finishing | Phase::HandedOver => {
                    assert!(matches!(r, Err(SourceRefusal::Other(_))), "{p}: {r:?}");
                    assert_eq!(s, before);
                }
                _ => {
                    assert_eq!(r, Err(SourceRefusal::Busy(p)));
                    assert_eq!(s, before);
                }
            }
        }
    }

    #[test]
    fn finish_is_accepted_only_when_ready() {
        for p in ALL {
            let mut s = at(p);
            let before = s.clone();
            let r = s.finish();
            match p {
                Phase::Ready => assert_eq!(s.phase(), Phase::Finishing),
                Phase::HandedOver | Phase::Completed => assert_eq!(r, Ok(vec![])),
                Phase::Idle => assert_eq!(r, Err(SourceRefusal::NoMigration)),
                Phase::Setup | Phase::Precopy => assert_eq!(r, Err(SourceRefusal::NotReady(p))),
                Phase::Finishing => assert_eq!(r, Err(SourceRefusal::InProgress)),
                Phase::Cancelled => assert_eq!(r, Err(SourceRefusal::Over { phase: p, why: None })),
                Phase::Failed => assert!(matches!(r, Err(SourceRefusal::Over { phase: Phase::Failed, why: Some(_) }))),
            }
            if p != Phase::Ready {
                assert_eq!(s, before, "{p}");
            }
        }
    }

    #[test]
    fn complete_is_accepted_only_after_the_hand_over() {
        for p in ALL {
            let mut s = at(p);
            let before = s.clone();
            let r = s.complete();
            match p {
                Phase::HandedOver => assert_eq!(s.phase(), Phase::Completed),
                Phase::Completed => assert_eq!(r, Ok(vec![])),
                // Finishing here has not sent the commit yet: the destination cannot own the disk.
                Phase::Idle => assert_eq!(r, Err(SourceRefusal::NoMigration)),
                Phase::Cancelled | Phase::Failed => assert!(matches!(r, Err(SourceRefusal::Over { .. }))),
                _ => assert_eq!(r, Err(SourceRefusal::NotHandedOver(p))),
            }
            if p != Phase::HandedOver {
                assert_eq!(s, before, "{p}");
            }
        }
        // Once the commit may have arrived (a restarted source does not know), complete is taken.
        let mut s = at(Phase::Finishing);
        s.commit_sent();
        assert!(s.complete().is_ok());
        assert_eq!(s.phase(), Phase::Completed);
        assert!(s.fenced());
    }

    #[test]
    fn cancel_gives_back_before_the_commit_and_asks_after_it() {
        for p in ALL {
            let mut s = at(p);
            let r = s.cancel();
            match p {
                Phase::Idle | Phase::Cancelled | Phase::Failed => assert_eq!(r, Ok(vec![])),
                Phase::Setup | Phase::Precopy | Phase::Ready | Phase::Finishing => {
                    // Finishing here has not sent the commit yet.
                    let a = r.unwrap();
                    assert!(matches!(a[0], SendDiscard(_)));
                    assert!(a.contains(&AllowWrites) && a.contains(&RollBack));
                    assert_eq!(persisted_stage(&a), Some(None));
                    assert_eq!(s.phase(), Phase::Cancelled);
                    assert!(!s.fenced());
                }
                Phase::HandedOver => {
                    assert_eq!(r, Ok(vec![AskRevoke]));
                    assert_eq!(s.cancel(), Err(SourceRefusal::Revoking), "one revoke at a time");
                }
                Phase::Completed => assert!(matches!(r, Err(SourceRefusal::Completed(_)))),
            }
        }
    }

    #[test]
    fn a_revoke_the_destination_refuses_leaves_the_fence() {
        let mut s = at(Phase::HandedOver);
        s.cancel().unwrap();
        let r = s.revoke_answered(RevokeAnswer::Owns("it has written since 12:00".into()));
        assert!(matches!(r, Err(SourceRefusal::DestinationOwns { .. })));
        assert_eq!(s.phase(), Phase::HandedOver);
        assert!(s.fenced());
        s.cancel().unwrap();
        assert!(matches!(
            s.revoke_answered(RevokeAnswer::Unreachable("no route".into())),
            Err(SourceRefusal::CannotAsk { .. })
        ));
        assert!(s.fenced());
        s.cancel().unwrap();
        let a = s.revoke_answered(RevokeAnswer::GaveBack).unwrap();
        assert!(a.contains(&AllowWrites) && a.contains(&RollBack));
        assert_eq!(s.phase(), Phase::Cancelled);
        assert!(!s.fenced());
        assert!(s.revoke_answered(RevokeAnswer::GaveBack).is_err(), "an answer nobody asked for");
    }

    #[test]
    fn after_the_commit_is_sent_a_broken_link_keeps_the_fence() {
        let mut s = at(Phase::Finishing);
        s.commit_sent();
        assert_eq!(s.transport_failed("reset by peer"), Ok(vec![]));
        assert_eq!(s.phase(), Phase::Finishing);
        assert!(s.fenced() && s.error().unwrap().contains("may own"));
        // Cancelling now has to ask.
        assert_eq!(s.cancel(), Ok(vec![AskRevoke]));
        // Before the commit is sent, the same failure rolls back.
        let mut s = at(Phase::Finishing);
        let a = s.transport_failed("reset by peer").unwrap();
        assert_eq!(s.phase(), Phase::Failed);
        assert!(a.contains(&AllowWrites) && !s.fenced());
    }

    #[test]
    fn transport_failures_before_finishing_roll_back_and_after_the_hand_over_change_nothing() {
        for p in ALL {
            let mut s = at(p);
            let before = s.clone();
            let a = s.transport_failed("gone").unwrap();
            match p {
                Phase::Setup | Phase::Precopy | Phase::Ready | Phase::Finishing => {
                    assert_eq!(s.phase(), Phase::Failed);
                    assert!(a.contains(&RollBack));
                }
                _ => {
                    assert!(a.is_empty());
                    assert_eq!(s, before);
                }
            }
        }
    }

    #[test]
    fn reclaim_needs_a_fence_and_force_skips_the_question() {
        for p in ALL {
            let mut s = at(p);
            let fenced = s.fenced();
            let r = s.reclaim(false);
            match p {
                _ if !fenced => assert_eq!(r, Err(SourceRefusal::NothingToReclaim)),
                Phase::Finishing => assert_eq!(r, Err(SourceRefusal::InProgress)),
                Phase::HandedOver => assert_eq!(r, Ok(vec![AskRevoke])),
                Phase::Completed => assert!(matches!(r, Err(SourceRefusal::Completed(_)))),
                _ => unreachable!("{p} fenced"),
            }
            let mut s = at(p);
            let r = s.reclaim(true);
            if fenced {
                assert!(r.unwrap().contains(&AllowWrites));
                assert!(!s.fenced());
                assert_eq!(s.phase(), Phase::Cancelled);
            } else {
                assert_eq!(r, Err(SourceRefusal::NothingToReclaim));
            }
        }
    }

    #[test]
    fn a_claimed_hand_over_is_recorded_and_survives_a_restart() {
        let mut s = SourceSession::new();
        s.start(ID, PEER, Strategy::Row).unwrap();
        s.connected().unwrap();
        assert!(s.finish_claimed().is_err(), "not ready: refused, and not recorded as claimed");
        assert!(!s.claimed());
        s.precopy_done().unwrap();
        let a = s.finish_claimed().unwrap();
        assert!(s.claimed());
        let Some(SourceAction::Persist(Some(record))) = a.first() else { panic!("{a:?}") };
        assert!(matches!(record, Ownership::Source { claimed: true, .. }), "{record:?}");
        let (restored, _) = SourceSession::restore(record);
        assert!(restored.claimed());
    }

    #[test]
    fn a_restart_rolls_back_pre_copy_and_keeps_a_hand_over_fenced() {
        let record = |stage| Ownership::Source {
            stage,
            session: ID,
            peer: PEER.into(),
            strategy: Strategy::Row,
            fenced_since: (stage != SourceStage::Precopy).then(now_rfc3339),
            postcopy: false,
            claimed: false,
        };
        let (s, a) = SourceSession::restore(&record(SourceStage::Precopy));
        assert_eq!(s.phase(), Phase::Failed);
        assert_eq!(a, vec![RollBack, Persist(None)]);
        for (stage, phase) in [
            (SourceStage::Finishing, Phase::Finishing),
            (SourceStage::HandedOver, Phase::HandedOver),
            (SourceStage::Completed, Phase::Completed),
        ] {
            let (mut s, a) = SourceSession::restore(&record(stage));
            assert_eq!(s.phase(), phase);
            assert!(matches!(&a[..], [RefuseWrites(_)]));
            assert!(s.fenced());
            // A restarted finishing source does not know whether the commit arrived: it asks.
            if phase == Phase::Finishing {
                assert_eq!(s.cancel(), Ok(vec![AskRevoke]));
            }
        }
        let (s, a) = SourceSession::restore(&Ownership::Destination {
            stage: crate::durable::DestStage::Owner,
            session: ID,
            since: now_rfc3339(),
            postcopy: false,
        });
        assert_eq!((s.phase(), a), (Phase::Idle, vec![]));
    }

    #[test]
    fn post_copy_keeps_the_source_until_the_destination_holds_everything() {
        let mut s = at(Phase::Finishing);
        s.commit_sent();
        let a = s.committed_with_residual().unwrap();
        assert_eq!(s.phase(), Phase::HandedOver);
        assert!(matches!(a.last(), Some(Push)));
        let Some(Persist(Some(Ownership::Source { stage: SourceStage::HandedOver, postcopy: true, .. }))) = a.first()
        else {
            panic!("the hand-over is persisted with its post-copy first: {a:?}")
        };
        // Completing now would let the source forget blocks the destination still reads.
        assert_eq!(s.complete(), Err(SourceRefusal::PostcopyRunning));
        // A restart resumes the push and keeps the fence.
        let Some(Persist(Some(record))) = a.first() else { unreachable!() };
        let (mut restored, actions) = SourceSession::restore(record);
        assert!(matches!(&actions[..], [RefuseWrites(_), Push]));
        assert!(restored.postcopy() && restored.fenced());
        assert_eq!(restored.complete(), Err(SourceRefusal::PostcopyRunning));
        let done = s.postcopy_done().unwrap();
        assert!(matches!(&done[..], [Persist(Some(Ownership::Source { postcopy: false, .. }))]));
        assert_eq!(s.postcopy_done(), Ok(vec![]));
        assert!(s.complete().unwrap().contains(&SendDone));
        // A revoke granted before the guest wrote on the destination ends the post-copy too.
        assert!(restored.cancel().is_ok());
        let back = restored.revoke_answered(RevokeAnswer::GaveBack).unwrap();
        assert!(back.contains(&RollBack) && !restored.postcopy());
    }
}
