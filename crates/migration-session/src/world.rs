//! Both hosts' session machines and the network between them, stepped one byte at a time: the
//! model behind the hand-over protocol's property test and fuzz target.
//!
//! Each side performs its machine's actions as the proxy does (persist the record, open or close
//! the disk, send a message); messages travel on a queue per direction that may lose them, and
//! a revoke (which travels on its own connection) may overtake the session's frames. Either
//! process may restart from its record at any step, and the source's operator may cancel,
//! complete or reclaim at any step. After every step [`World::check`] holds: never do both hosts
//! take writes; a restart never opens a disk that was closed; a destination that wrote to the disk
//! keeps it. A forced `reclaim` is the operator's word that the destination is gone for good: it
//! is taken down, and the rule no longer applies to it.
//!
//! Records can be damaged or deleted too: a host whose record is gone (or unreadable) refuses to
//! start, as the proxy does once its disk has a state entry, until the operator restores it.

use std::collections::VecDeque;

use crate::phase::{IncomingPhase, Phase, Strategy};

use crate::dest::{DestAction, DestSession};
use crate::durable::{Ownership, SessionId};
use crate::source::{RevokeAnswer, SourceAction, SourceSession};

/// Source → destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ToDest {
    Begin(SessionId),
    Commit(SessionId),
    Discard(SessionId),
    Done(SessionId),
    Revoke(SessionId),
}

/// Destination → source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ToSource {
    Accepted(SessionId),
    Committed(SessionId),
    Failed(SessionId),
    Revoked(SessionId),
    Owns(SessionId),
    /// The destination's guest writes before any commit: it asks for the disk.
    Claim(SessionId),
    /// The destination's QEMU left before any commit (the manager abandoned its migration).
    Abandoned(SessionId),
}

#[derive(Debug)]
struct Source {
    machine: SourceSession,
    record: Option<Ownership>,
    /// The record file is gone or damaged (the good copy is `record`, the operator's backup).
    record_lost: bool,
    /// The process refused to start (its record is lost) and is not running.
    down: bool,
    /// The session was started armed: the destination's claim hands the disk over.
    armed: bool,
    writable: bool,
    /// What the source waits for.
    connecting: bool,
    final_round: bool,
    commit_answer: bool,
    revoke_answer: bool,
}

#[derive(Debug)]
struct Dest {
    machine: DestSession,
    record: Option<Ownership>,
    record_lost: bool,
    down: bool,
    serving: bool,
    wrote: bool,
}

/// The two hosts and the network; see the module's documentation.
#[derive(Debug)]
pub struct World {
    src: Source,
    dst: Dest,
    to_dest: VecDeque<ToDest>,
    to_source: VecDeque<ToSource>,
    sessions: u64,
    /// The operator reclaimed the disk by force: the destination is gone.
    dest_gone: bool,
    /// Steps taken, for messages.
    steps: usize,
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

/// How many different steps a byte selects among.
pub const STEPS: u8 = 25;

impl World {
    /// A source owning its disk and an empty destination waiting.
    pub fn new() -> Self {
        Self {
            src: Source {
                machine: SourceSession::new(),
                record: None,
                record_lost: false,
                down: false,
                armed: false,
                writable: true,
                connecting: false,
                final_round: false,
                commit_answer: false,
                revoke_answer: false,
            },
            dst: Dest {
                machine: DestSession::new(),
                record: None,
                record_lost: false,
                down: false,
                serving: false,
                wrote: false,
            },
            to_dest: VecDeque::new(),
            to_source: VecDeque::new(),
            sessions: 0,
            dest_gone: false,
            steps: 0,
        }
    }

    /// Runs the steps `bytes` select, checking the rules after each; `Err` says which broke.
    pub fn run(bytes: &[u8]) -> Result<Self, String> {
        let mut w = Self::new();
        for &b in bytes {
            w.step(b);
            w.check()?;
        }
        Ok(w)
    }

    /// The source's phase.
    pub fn source_phase(&self) -> Phase {
        self.src.machine.phase()
    }

    /// The destination's phase.
    pub fn dest_phase(&self) -> IncomingPhase {
        self.dst.machine.phase()
    }

    /// Whether the source takes writes.
    pub fn source_writable(&self) -> bool {
        self.src.writable
    }

    /// Whether the destination serves the disk.
    pub fn dest_serving(&self) -> bool {
        self.dst.serving
    }

    /// One step, chosen by `b`.
    pub fn step(&mut self, b: u8) {
        self.steps += 1;
        let session = self.src.machine.session();
        let step = b % STEPS;
        // A host that is down does nothing of its own.
        let source_step = matches!(step, 0 | 4 | 5 | 6 | 9 | 11 | 12 | 13 | 14 | 18 | 22);
        if (self.src.down && source_step) || (self.dst.down && matches!(step, 10 | 15)) {
            return;
        }
        match step {
            0 | 22 => {
                // Real ids are 16 random bytes: never the same twice.
                self.sessions += 1;
                let mut id = SessionId([0; 16]);
                id.0[..8].copy_from_slice(&self.sessions.to_le_bytes());
                if let Ok(a) = self.src.machine.start(id, "tcp:192.0.2.2:10810", Strategy::Row) {
                    self.src.armed = step == 22;
                    self.source_actions(a);
                }
            }
            23 => {
                // The destination's guest writes while the disk is still arriving.
                if !self.dst.serving {
                    if let Some(id) = self.dst.machine.session() {
                        self.to_source.push_back(ToSource::Claim(id));
                    }
                }
            }
            24 => {
                // The destination's QEMU leaves while the disk is still arriving (in any order
                // with a claim: the source decides by its phase).
                if !self.dst.serving && !self.dst.down {
                    if let Some(id) = self.dst.machine.session() {
                        self.to_source.push_back(ToSource::Abandoned(id));
                    }
                }
            }
            1 => self.deliver_to_dest(false),
            2 => self.deliver_to_dest(true),
            3 => self.deliver_to_source(),
            4 => {
                if let Ok(a) = self.src.machine.precopy_done() {
                    self.source_actions(a);
                }
            }
            5 => {
                if let Ok(a) = self.src.machine.finish() {
                    self.source_actions(a);
                }
            }
            6 => {
                // The final round is sent; the commit follows it.
                if self.src.final_round {
                    self.src.final_round = false;
                    self.src.machine.commit_sent();
                    if let Some(id) = session {
                        self.to_dest.push_back(ToDest::Commit(id));
                    }
                    self.src.commit_answer = true;
                }
            }
            7 => {
                self.to_dest.pop_front();
            }
            8 => {
                self.to_source.pop_front();
            }
            9 => self.source_link_failed("the link broke"),
            10 => {
                if let Some(id) = self.dst.machine.session() {
                    let a = self.dst.machine.transport_failed(id);
                    self.dest_actions(a);
                }
            }
            11 => {
                if let Ok(a) = self.src.machine.cancel() {
                    self.source_actions(a);
                }
            }
            12 => {
                if let Ok(a) = self.src.machine.reclaim(false) {
                    self.source_actions(a);
                }
            }
            13 => {
                if let Ok(a) = self.src.machine.reclaim(true) {
                    self.dest_gone = true;
                    self.source_actions(a);
                }
            }
            14 => {
                if let Ok(a) = self.src.machine.complete() {
                    self.source_actions(a);
                }
            }
            15 => {
                if self.dst.serving && !self.dest_gone {
                    if let Ok(a) = self.dst.machine.local_write() {
                        self.dst.wrote = true;
                        self.dest_actions(a);
                    }
                }
            }
            16 => self.restart_source(),
            17 => self.restart_dest(),
            19 => self.src.record_lost = true,
            20 => self.dst.record_lost = true,
            21 => {
                // The operator restores the records from a backup.
                self.src.record_lost = false;
                self.dst.record_lost = false;
            }
            _ => {
                // A revoke that finds the link down.
                if self.src.revoke_answer {
                    self.src.revoke_answer = false;
                    if let Ok(a) = self.src.machine.revoke_answered(RevokeAnswer::Unreachable("unreachable".into())) {
                        self.source_actions(a);
                    }
                }
            }
        }
    }

    /// The rules; `Err` names the one broken.
    pub fn check(&self) -> Result<(), String> {
        if self.dest_gone {
            return Ok(());
        }
        if self.src.writable && self.dst.serving {
            return Err(format!(
                "step {}: both hosts take writes (source {}, destination {})",
                self.steps,
                self.src.machine.phase(),
                self.dst.machine.phase()
            ));
        }
        if self.dst.wrote && self.src.writable {
            return Err(format!("step {}: the destination wrote to the disk and the source takes writes", self.steps));
        }
        if self.dst.wrote && self.dst.machine.phase() != IncomingPhase::Owner {
            return Err(format!("step {}: the destination wrote but is {}", self.steps, self.dst.machine.phase()));
        }
        if !self.dst.down && self.dst.serving != self.dst.machine.serves() {
            return Err(format!("step {}: the destination's access and phase disagree", self.steps));
        }
        Ok(())
    }

    fn source_actions(&mut self, actions: Vec<SourceAction>) {
        let session = self.src.machine.session();
        for a in actions {
            match a {
                SourceAction::Persist(r) => self.src.record = r,
                SourceAction::RefuseWrites(_) => self.src.writable = false,
                SourceAction::AllowWrites => self.src.writable = true,
                SourceAction::RollBack => {}
                SourceAction::Connect => {
                    self.src.connecting = true;
                    if let Some(id) = session {
                        self.to_dest.push_back(ToDest::Begin(id));
                    }
                }
                // This world's switchovers send everything (no post-copy): nothing to push.
                SourceAction::RunPrecopy | SourceAction::Push => {}
                SourceAction::RunFinalRound => self.src.final_round = true,
                SourceAction::SendDiscard(_) => {
                    self.src.connecting = false;
                    self.src.final_round = false;
                    self.src.commit_answer = false;
                    if let Some(id) = session {
                        self.to_dest.push_back(ToDest::Discard(id));
                    }
                }
                SourceAction::SendDone => {
                    if let Some(id) = session {
                        self.to_dest.push_back(ToDest::Done(id));
                    }
                }
                SourceAction::AskRevoke => {
                    self.src.commit_answer = false;
                    self.src.revoke_answer = true;
                    if let Some(id) = session {
                        self.to_dest.push_back(ToDest::Revoke(id));
                    }
                }
            }
        }
    }

    fn dest_actions(&mut self, actions: Vec<DestAction>) {
        for a in actions {
            match a {
                DestAction::Persist(r) => self.dst.record = Some(r),
                DestAction::ResetImage | DestAction::SyncImage => {}
                DestAction::OpenAccess => self.dst.serving = true,
                DestAction::CloseAccess => self.dst.serving = false,
                DestAction::SendCommitted => {
                    if let Some(id) = self.dst.machine.session() {
                        self.to_source.push_back(ToSource::Committed(id));
                    }
                }
                DestAction::SendRevoked => {}
            }
        }
    }

    /// The next message to the destination; `newest`: the last one sent, as a revoke on its own
    /// connection may arrive before the session's frames.
    fn deliver_to_dest(&mut self, newest: bool) {
        let msg = if newest { self.to_dest.pop_back() } else { self.to_dest.pop_front() };
        let Some(msg) = msg else { return };
        if self.dest_gone || self.dst.down {
            return;
        }
        let d = &mut self.dst.machine;
        let (result, answer_to) = match msg {
            ToDest::Begin(id) => (d.begin(id).map(|a| (a, Some(ToSource::Accepted(id)))), id),
            ToDest::Commit(id) => (d.commit(id, false).map(|a| (a, None)), id),
            ToDest::Discard(id) => (d.discard(id).map(|a| (a, None)), id),
            ToDest::Done(id) => (d.done(id).map(|a| (a, None)), id),
            ToDest::Revoke(id) => match d.revoke(id) {
                Ok(a) => (Ok((a, Some(ToSource::Revoked(id)))), id),
                Err(_) => {
                    self.to_source.push_back(ToSource::Owns(id));
                    return;
                }
            },
        };
        match result {
            Ok((actions, answer)) => {
                self.dest_actions(actions);
                if let Some(a) = answer {
                    self.to_source.push_back(a);
                }
            }
            Err(_) => self.to_source.push_back(ToSource::Failed(answer_to)),
        }
    }

    fn deliver_to_source(&mut self) {
        let Some(msg) = self.to_source.pop_front() else { return };
        if self.src.down {
            return;
        }
        let current = self.src.machine.session();
        let m = &mut self.src.machine;
        let actions = match msg {
            // Answers about another session come on a connection that is gone.
            ToSource::Accepted(id) | ToSource::Committed(id) | ToSource::Failed(id) if Some(id) != current => return,
            ToSource::Revoked(id) | ToSource::Owns(id) | ToSource::Claim(id) | ToSource::Abandoned(id)
                if Some(id) != current =>
            {
                return
            }
            // An armed, ready source hands over as `migrate-finish` would; otherwise refused.
            ToSource::Claim(_) if self.src.armed && m.phase() == Phase::Ready => m.finish_claimed(),
            ToSource::Claim(_) => return,
            // An armed, ready source disarms as `migrate-cancel` would; otherwise ignored.
            ToSource::Abandoned(_) if self.src.armed && m.phase() == Phase::Ready => m.cancel(),
            ToSource::Abandoned(_) => return,
            ToSource::Accepted(_) if self.src.connecting => {
                self.src.connecting = false;
                m.connected()
            }
            ToSource::Committed(_) if self.src.commit_answer => {
                self.src.commit_answer = false;
                m.committed()
            }
            ToSource::Revoked(_) if self.src.revoke_answer => {
                self.src.revoke_answer = false;
                m.revoke_answered(RevokeAnswer::GaveBack)
            }
            ToSource::Owns(_) if self.src.revoke_answer => {
                self.src.revoke_answer = false;
                m.revoke_answered(RevokeAnswer::Owns("it wrote to the disk".into()))
            }
            // A failure, or a message nothing waits for: the session's link is done for.
            ToSource::Revoked(_) | ToSource::Owns(_) => return,
            _ => return self.source_link_failed("the destination failed"),
        };
        if let Ok(a) = actions {
            self.source_actions(a);
        }
    }

    fn source_link_failed(&mut self, why: &str) {
        self.src.connecting = false;
        self.src.final_round = false;
        self.src.commit_answer = false;
        if let Ok(a) = self.src.machine.transport_failed(why) {
            self.source_actions(a);
        }
    }

    fn restart_source(&mut self) {
        if self.src.record_lost {
            // Refuses to start: nothing says whether it may write.
            self.src.down = true;
            self.src.writable = false;
            self.to_source.clear();
            return;
        }
        let (machine, actions) = match &self.src.record {
            Some(r) => SourceSession::restore(r),
            None => (SourceSession::new(), Vec::new()),
        };
        self.src = Source {
            machine,
            record: self.src.record.clone(),
            record_lost: false,
            down: false,
            armed: false,
            // The proxy starts with the disk open unless the record's actions close it.
            writable: true,
            connecting: false,
            final_round: false,
            commit_answer: false,
            revoke_answer: false,
        };
        // Its connections are gone, and what the destination sent on them.
        self.to_source.clear();
        self.source_actions(actions);
    }

    fn restart_dest(&mut self) {
        if self.dest_gone {
            return;
        }
        if self.dst.record_lost {
            self.dst.down = true;
            self.dst.serving = false;
            self.to_dest.clear();
            return;
        }
        self.dst.down = false;
        let (machine, actions) = match &self.dst.record {
            Some(r) => DestSession::restore(r),
            None => (DestSession::new(), Vec::new()),
        };
        self.dst.machine = machine;
        self.dst.serving = false;
        // What was in flight to it is lost with its connections.
        self.to_dest.clear();
        self.dest_actions(actions);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_clean_migration_hands_the_disk_over() {
        // start, Begin, Accepted, pre-copy done, finish, commit, deliver it, Committed,
        // complete, Done, a write on the destination.
        let w = World::run(&[0, 1, 3, 4, 5, 6, 1, 3, 14, 1, 15]).unwrap();
        assert_eq!(w.source_phase(), Phase::Completed);
        assert_eq!(w.dest_phase(), IncomingPhase::Owner);
        assert!(!w.source_writable() && w.dest_serving());
    }

    #[test]
    fn a_revoke_after_the_commit_gives_the_disk_back() {
        // ... the commit arrives, its answer is lost; cancel asks the destination to revoke.
        let w = World::run(&[0, 1, 3, 4, 5, 6, 1, 8, 9, 11, 1, 3]).unwrap();
        assert_eq!(w.source_phase(), Phase::Cancelled);
        assert!(w.source_writable() && !w.dest_serving());
    }

    #[test]
    fn a_destination_that_wrote_keeps_the_disk() {
        // The commit arrives, the destination writes, the source's revoke is refused.
        let w = World::run(&[0, 1, 3, 4, 5, 6, 1, 15, 8, 11, 1, 3]).unwrap();
        assert_eq!(w.dest_phase(), IncomingPhase::Owner);
        assert!(!w.source_writable());
    }

    /// Steps weighted so that random walks get through the whole protocol often.
    fn step() -> impl proptest::strategy::Strategy<Value = u8> {
        const WEIGHTS: [u32; STEPS as usize] =
            [2, 8, 1, 8, 3, 3, 3, 1, 1, 1, 1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 1, 1, 2, 2, 1];
        let choices: Vec<_> = (0..STEPS).map(|s| (WEIGHTS[s as usize], Just(s))).collect();
        prop::strategy::Union::new_weighted(choices)
    }

    #[test]
    fn an_armed_source_hands_over_on_the_destination_s_claim() {
        // Armed start, Begin, Accepted, pre-copy done; the destination's guest writes (claim),
        // the claim arrives: the source fences itself and sends the final round; the commit
        // arrives, Committed comes back; the destination writes and owns the disk.
        let w = World::run(&[22, 1, 3, 4, 23, 3, 6, 1, 3, 15]).unwrap();
        assert_eq!(w.dest_phase(), IncomingPhase::Owner);
        assert!(!w.source_writable() && w.dest_serving());
        // Not armed: the claim changes nothing.
        let w = World::run(&[0, 1, 3, 4, 23, 3]).unwrap();
        assert_eq!(w.source_phase(), Phase::Ready);
        assert!(w.source_writable() && !w.dest_serving());
    }

    #[test]
    fn an_armed_source_disarms_when_the_destination_s_qemu_left() {
        // Armed and ready; the destination's QEMU leaves: the source disarms (its guest goes on
        // with the disk) and the destination discards the session.
        let w = World::run(&[22, 1, 3, 4, 24, 3, 1]).unwrap();
        assert_eq!(w.source_phase(), Phase::Cancelled);
        assert!(w.source_writable() && !w.dest_serving());
        assert_eq!(w.dest_phase(), IncomingPhase::Waiting);
        // A claim that came first wins: the abandonment after it changes nothing.
        let w = World::run(&[22, 1, 3, 4, 23, 24, 3, 3, 6, 1, 3, 15]).unwrap();
        assert_eq!(w.dest_phase(), IncomingPhase::Owner);
        assert!(!w.source_writable());
        // The abandonment first: the claim after it is refused, and the source keeps the disk.
        let w = World::run(&[22, 1, 3, 4, 24, 23, 3, 3, 1]).unwrap();
        assert!(w.source_writable() && !w.dest_serving());
    }

    #[test]
    fn a_host_whose_record_is_lost_stays_down_until_it_is_restored() {
        // Handed over, the destination wrote; the source's record is deleted and it restarts:
        // it does not come back writable.
        let w = World::run(&[0, 1, 3, 4, 5, 6, 1, 3, 15, 19, 16]).unwrap();
        assert!(!w.source_writable());
        assert!(w.src.down);
        // Restored, it restarts fenced.
        let w = World::run(&[0, 1, 3, 4, 5, 6, 1, 3, 15, 19, 16, 21, 16]).unwrap();
        assert!(!w.source_writable() && !w.src.down);
        // A destination whose record is lost stops serving until it is restored.
        let w = World::run(&[0, 1, 3, 4, 5, 6, 1, 3, 15, 20, 17]).unwrap();
        assert!(!w.dest_serving());
        let w = World::run(&[0, 1, 3, 4, 5, 6, 1, 3, 15, 20, 17, 21, 17]).unwrap();
        assert!(w.dest_serving() && w.dest_phase() == IncomingPhase::Owner);
    }

    #[test]
    fn a_link_failure_after_the_commit_keeps_the_source_fenced() {
        let w = World::run(&[0, 1, 3, 4, 5, 6, 1, 9]).unwrap();
        assert!(!w.source_writable() && w.dest_serving());
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: std::env::var("WORLD_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(4_000),
            ..ProptestConfig::default()
        })]

        #[test]
        fn never_two_owners(steps in prop::collection::vec(step(), 0..60)) {
            if let Err(e) = World::run(&steps) {
                panic!("{e}");
            }
        }
    }
}
