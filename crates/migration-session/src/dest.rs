//! The destination's session: `waiting → receiving → committed → owner`.
//!
//! - `waiting`: no session (or the last one ended without a commit). The image is not a disk
//!   yet: NBD writes are refused, reads wait.
//! - `receiving`: a session's rounds are arriving.
//! - `committed`: the source's commit made the image complete and durable here. It is served
//!   read-write. The source may still take it back (a *revoke*, when the switchover failed), but
//!   only until this host accepts its first write after the commit: that write makes it the
//!   owner, and from then on the disk never goes back. Transport errors, a `Discard` and new
//!   sessions are refused once committed.
//! - `owner`: this host owns the disk (its first write, or the source's `Done`).
//!
//! As for the source, inputs are methods returning the [`DestAction`]s to perform or a
//! [`DestRefusal`]; the state only changes when they succeed.

use crate::phase::IncomingPhase;

use crate::durable::{now_rfc3339, DestStage, Ownership, SessionId};

/// What the proxy must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestAction {
    /// Write the ownership record durably.
    Persist(Ownership),
    /// Throw the image's old content away before the first round.
    ResetImage,
    /// Make everything received durable (before answering the commit).
    SyncImage,
    /// Serve the disk: reads and writes (the first write calls [`DestSession::local_write`]).
    OpenAccess,
    /// Stop serving the disk: writes refused, reads wait.
    CloseAccess,
    /// Answer the commit.
    SendCommitted,
    /// Answer a revoke: the disk is given back (or was never held).
    SendRevoked,
}

/// Why an input was refused; the state is unchanged. The message goes back to the source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DestRefusal {
    /// A new session while this host holds a committed disk.
    #[error("this host holds the disk of session {session} ({phase}); a new migration to it is refused")]
    Holds {
        /// The session it holds.
        session: SessionId,
        /// `committed` or `owner`.
        phase: IncomingPhase,
    },
    /// The same session begun twice.
    #[error("session {0} is already arriving")]
    Busy(SessionId),
    /// A frame of a session that is not the current one, or in the wrong phase.
    #[error("unexpected {what} in phase {phase}")]
    Unexpected {
        /// What arrived.
        what: &'static str,
        /// Where we were.
        phase: IncomingPhase,
    },
    /// `Discard` after the commit.
    #[error("the disk of session {0} is committed here; a discard after the commit is refused")]
    DiscardAfterCommit(SessionId),
    /// A revoke once this host owns the disk.
    #[error("this host owns the disk since {since} (it has written to it); it cannot be given back")]
    Owner {
        /// When it became the owner.
        since: String,
    },
    /// `Done` for a session that did not commit.
    #[error("session {0} did not commit here")]
    NotCommitted(SessionId),
}

/// The destination's session state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestSession {
    phase: IncomingPhase,
    session: Option<SessionId>,
    since: String,
    /// The session committed by a post-copy (see [`Ownership::Destination`]).
    postcopy: bool,
}

type Step = Result<Vec<DestAction>, DestRefusal>;

impl DestSession {
    /// Waiting for a first session.
    pub fn new() -> Self {
        Self { phase: IncomingPhase::Waiting, session: None, since: now_rfc3339(), postcopy: false }
    }

    /// The state as the ownership record left it before a restart, and what to do about it.
    /// A committed or owned disk is served read-write at once.
    pub fn restore(record: &Ownership) -> (Self, Vec<DestAction>) {
        match record {
            Ownership::Destination { stage, session, since, postcopy } => {
                let phase = match stage {
                    DestStage::Incomplete => IncomingPhase::Waiting,
                    DestStage::Committed => IncomingPhase::Committed,
                    DestStage::Owner => IncomingPhase::Owner,
                };
                let s = Self { phase, session: Some(*session), since: since.clone(), postcopy: *postcopy };
                let actions = if phase == IncomingPhase::Waiting { vec![] } else { vec![DestAction::OpenAccess] };
                (s, actions)
            }
            // A source's image (handed over, or never migrated): about to be overwritten.
            Ownership::Source { .. } => (Self::new(), vec![]),
        }
    }

    /// The current phase.
    pub fn phase(&self) -> IncomingPhase {
        self.phase
    }

    /// The session held or arriving.
    pub fn session(&self) -> Option<SessionId> {
        self.session
    }

    /// Whether the session held was committed by a post-copy (its residual log must exist).
    pub fn postcopy(&self) -> bool {
        self.postcopy
    }

    /// When the current phase began (RFC 3339).
    pub fn since(&self) -> &str {
        &self.since
    }

    /// Whether NBD clients may use the disk.
    pub fn serves(&self) -> bool {
        matches!(self.phase, IncomingPhase::Committed | IncomingPhase::Owner)
    }

    fn record(&self, stage: DestStage) -> Ownership {
        Ownership::Destination {
            stage,
            session: self.session.expect("a session is held"),
            since: self.since.clone(),
            postcopy: self.postcopy,
        }
    }

    fn enter(&mut self, phase: IncomingPhase) {
        self.phase = phase;
        self.since = now_rfc3339();
    }

    /// A source begins a new session (its first round is arriving). A new session replaces one
    /// still arriving (its source gave up on it, or restarted): nothing of that one was committed,
    /// and its frames are refused from now on.
    pub fn begin(&mut self, session: SessionId) -> Step {
        match self.phase {
            IncomingPhase::Waiting => {}
            IncomingPhase::Receiving if self.session == Some(session) => return Err(DestRefusal::Busy(session)),
            IncomingPhase::Receiving => {}
            p => return Err(DestRefusal::Holds { session: self.session.expect("held"), phase: p }),
        }
        self.session = Some(session);
        self.postcopy = false;
        self.enter(IncomingPhase::Receiving);
        Ok(vec![DestAction::Persist(self.record(DestStage::Incomplete)), DestAction::ResetImage])
    }

    /// A data frame of `session` may be written (it is the session arriving).
    pub fn accepts_data(&self, session: SessionId) -> Result<(), DestRefusal> {
        if self.phase == IncomingPhase::Receiving && self.session == Some(session) {
            Ok(())
        } else {
            Err(DestRefusal::Unexpected { what: "data", phase: self.phase })
        }
    }

    /// The source's commit: make the image durable, record it, serve it, answer.
    pub fn commit(&mut self, session: SessionId, postcopy: bool) -> Step {
        self.accepts_data(session).map_err(|_| DestRefusal::Unexpected { what: "commit", phase: self.phase })?;
        self.enter(IncomingPhase::Committed);
        self.postcopy = postcopy;
        Ok(vec![
            DestAction::SyncImage,
            DestAction::Persist(self.record(DestStage::Committed)),
            DestAction::OpenAccess,
            DestAction::SendCommitted,
        ])
    }

    /// The source threw the session away (before the commit).
    pub fn discard(&mut self, session: SessionId) -> Step {
        match self.phase {
            IncomingPhase::Receiving if self.session == Some(session) => {
                self.enter(IncomingPhase::Waiting);
                Ok(vec![DestAction::Persist(self.record(DestStage::Incomplete))])
            }
            IncomingPhase::Committed | IncomingPhase::Owner if self.session == Some(session) => {
                Err(DestRefusal::DiscardAfterCommit(session))
            }
            // Not the session arriving: nothing of it to throw away.
            _ => Ok(Vec::new()),
        }
    }

    /// The session's connection broke (or sent garbage). Before the commit the session is
    /// over; after it nothing changes.
    pub fn transport_failed(&mut self, session: SessionId) -> Vec<DestAction> {
        if self.phase == IncomingPhase::Receiving && self.session == Some(session) {
            self.enter(IncomingPhase::Waiting);
            vec![DestAction::Persist(self.record(DestStage::Incomplete))]
        } else {
            Vec::new()
        }
    }

    /// The source asks for the disk of `session` back (its switchover failed). Granted unless
    /// this host owns it.
    pub fn revoke(&mut self, session: SessionId) -> Step {
        if self.session != Some(session) {
            // We do not hold that session: nothing to give back.
            return Ok(vec![DestAction::SendRevoked]);
        }
        match self.phase {
            IncomingPhase::Owner => Err(DestRefusal::Owner { since: self.since.clone() }),
            IncomingPhase::Committed => {
                self.enter(IncomingPhase::Waiting);
                Ok(vec![
                    DestAction::Persist(self.record(DestStage::Incomplete)),
                    DestAction::CloseAccess,
                    DestAction::SendRevoked,
                ])
            }
            IncomingPhase::Receiving => {
                self.enter(IncomingPhase::Waiting);
                Ok(vec![DestAction::Persist(self.record(DestStage::Incomplete)), DestAction::SendRevoked])
            }
            IncomingPhase::Waiting => Ok(vec![DestAction::SendRevoked]),
        }
    }

    /// The source says the migration is complete: this host owns the disk.
    pub fn done(&mut self, session: SessionId) -> Step {
        match self.phase {
            IncomingPhase::Committed if self.session == Some(session) => {
                self.enter(IncomingPhase::Owner);
                Ok(vec![DestAction::Persist(self.record(DestStage::Owner))])
            }
            IncomingPhase::Owner if self.session == Some(session) => Ok(Vec::new()),
            _ => Err(DestRefusal::NotCommitted(session)),
        }
    }

    /// An NBD client is about to write. The first write after the commit makes this host the
    /// owner, durably, before the write is done. `Err`: writes are not accepted now.
    pub fn local_write(&mut self) -> Result<Vec<DestAction>, IncomingPhase> {
        match self.phase {
            IncomingPhase::Owner => Ok(Vec::new()),
            IncomingPhase::Committed => {
                self.enter(IncomingPhase::Owner);
                Ok(vec![DestAction::Persist(self.record(DestStage::Owner))])
            }
            p => Err(p),
        }
    }
}

impl Default for DestSession {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DestAction::*;

    const S: SessionId = SessionId([1; 16]);
    const OTHER: SessionId = SessionId([2; 16]);

    fn at(phase: IncomingPhase) -> DestSession {
        let mut d = DestSession::new();
        if phase != IncomingPhase::Waiting {
            d.begin(S).unwrap();
        }
        if matches!(phase, IncomingPhase::Committed | IncomingPhase::Owner) {
            d.commit(S, false).unwrap();
        }
        if phase == IncomingPhase::Owner {
            d.local_write().unwrap();
        }
        assert_eq!(d.phase(), phase);
        d
    }

    const ALL: [IncomingPhase; 4] =
        [IncomingPhase::Waiting, IncomingPhase::Receiving, IncomingPhase::Committed, IncomingPhase::Owner];

    fn stage(a: &[DestAction]) -> Option<DestStage> {
        a.iter().find_map(|a| match a {
            Persist(Ownership::Destination { stage, .. }) => Some(*stage),
            _ => None,
        })
    }

    #[test]
    fn a_session_is_recorded_as_incomplete_before_the_image_is_touched_and_committed_before_it_is_served() {
        let mut d = DestSession::new();
        let a = d.begin(S).unwrap();
        assert_eq!(a[1], ResetImage);
        assert_eq!(stage(&a), Some(DestStage::Incomplete));
        assert!(d.accepts_data(S).is_ok() && d.accepts_data(OTHER).is_err());
        assert!(!d.serves());
        let a = d.commit(S, false).unwrap();
        assert_eq!(a[0], SyncImage);
        assert_eq!(stage(&a), Some(DestStage::Committed));
        assert_eq!(&a[2..], &[OpenAccess, SendCommitted]);
        assert!(d.serves());
        assert!(d.accepts_data(S).is_err(), "no data after the commit");
    }

    #[test]
    fn a_new_session_is_refused_unless_waiting() {
        for p in ALL {
            let mut d = at(p);
            let before = d.clone();
            let r = d.begin(OTHER);
            match p {
                IncomingPhase::Waiting => assert!(r.is_ok()),
                IncomingPhase::Receiving => {
                    // The new session replaces the one that was arriving.
                    assert!(r.is_ok());
                    assert!(d.accepts_data(S).is_err() && d.accepts_data(OTHER).is_ok());
                    assert_eq!(d.begin(OTHER), Err(DestRefusal::Busy(OTHER)));
                }
                _ => {
                    assert_eq!(r, Err(DestRefusal::Holds { session: S, phase: p }));
                    assert_eq!(d, before);
                }
            }
        }
    }

    #[test]
    fn commit_only_for_the_session_arriving() {
        for p in ALL {
            let mut d = at(p);
            let before = d.clone();
            let r = d.commit(S, false);
            if p == IncomingPhase::Receiving {
                assert!(r.is_ok());
            } else {
                assert!(matches!(r, Err(DestRefusal::Unexpected { what: "commit", .. })), "{p}");
                assert_eq!(d, before);
            }
        }
        let mut d = at(IncomingPhase::Receiving);
        assert!(d.commit(OTHER, false).is_err());
    }

    #[test]
    fn nothing_takes_a_committed_disk_away_but_a_revoke_before_any_write() {
        for p in [IncomingPhase::Committed, IncomingPhase::Owner] {
            let mut d = at(p);
            assert_eq!(d.discard(S), Err(DestRefusal::DiscardAfterCommit(S)));
            assert!(d.transport_failed(S).is_empty());
            assert!(d.begin(OTHER).is_err());
            assert_eq!(d.phase(), p);
        }
        let mut d = at(IncomingPhase::Committed);
        assert_eq!(d.revoke(S).unwrap()[1..], [CloseAccess, SendRevoked]);
        assert_eq!(d.phase(), IncomingPhase::Waiting);
        assert!(!d.serves());
        let mut d = at(IncomingPhase::Owner);
        assert!(matches!(d.revoke(S), Err(DestRefusal::Owner { .. })));
        assert_eq!(d.phase(), IncomingPhase::Owner);
    }

    #[test]
    fn the_first_write_after_the_commit_makes_the_owner_durably() {
        let mut d = at(IncomingPhase::Committed);
        let a = d.local_write().unwrap();
        assert_eq!(stage(&a), Some(DestStage::Owner));
        assert!(d.local_write().unwrap().is_empty(), "once is enough");
        assert_eq!(at(IncomingPhase::Waiting).local_write(), Err(IncomingPhase::Waiting));
        assert_eq!(at(IncomingPhase::Receiving).local_write(), Err(IncomingPhase::Receiving));
    }

    #[test]
    fn before_the_commit_discard_and_broken_links_end_the_session() {
        let mut d = at(IncomingPhase::Receiving);
        assert_eq!(stage(&d.discard(S).unwrap()), Some(DestStage::Incomplete));
        assert_eq!(d.phase(), IncomingPhase::Waiting);
        let mut d = at(IncomingPhase::Receiving);
        assert!(d.discard(OTHER).unwrap().is_empty(), "another session's discard changes nothing");
        assert_eq!(d.phase(), IncomingPhase::Receiving);
        assert_eq!(stage(&d.transport_failed(S)), Some(DestStage::Incomplete));
        assert_eq!(d.phase(), IncomingPhase::Waiting);
        let mut d = at(IncomingPhase::Receiving);
        assert_eq!(d.revoke(S).unwrap().last(), Some(&SendRevoked));
        assert_eq!(d.phase(), IncomingPhase::Waiting);
    }

    #[test]
    fn revoking_a_session_not_held_is_granted_and_changes_nothing() {
        for p in ALL {
            let mut d = at(p);
            let before = d.clone();
            assert_eq!(d.revoke(OTHER), Ok(vec![SendRevoked]));
            assert_eq!(d, before);
        }
    }

    #[test]
    fn done_makes_the_owner_only_after_a_commit() {
        for p in ALL {
            let mut d = at(p);
            let r = d.done(S);
            match p {
                IncomingPhase::Committed => assert_eq!(stage(&r.unwrap()), Some(DestStage::Owner)),
                IncomingPhase::Owner => assert_eq!(r, Ok(vec![])),
                _ => assert_eq!(r, Err(DestRefusal::NotCommitted(S))),
            }
        }
    }

    #[test]
    fn a_restart_serves_a_committed_or_owned_disk_and_waits_otherwise() {
        for (stage, phase, serves) in [
            (DestStage::Incomplete, IncomingPhase::Waiting, false),
            (DestStage::Committed, IncomingPhase::Committed, true),
            (DestStage::Owner, IncomingPhase::Owner, true),
        ] {
            let (d, a) = DestSession::restore(&Ownership::Destination {
                stage,
                session: S,
                since: now_rfc3339(),
                postcopy: false,
            });
            assert_eq!(d.phase(), phase);
            assert_eq!(d.serves(), serves);
            assert_eq!(a.contains(&OpenAccess), serves);
        }
    }
}
