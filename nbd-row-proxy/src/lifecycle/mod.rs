//! A disk's life cycle on one host: which ownership records let `serve` and `receive` start, and
//! `retire`, which drops the state of a disk this host handed over for good.
//!
//! The rules ([`may_start`], [`may_retire`]) are pure functions of the ownership record (see
//! `migration_session::durable`); [`retire`] does the file work.
//!
//! A source's record goes `precopy → finishing → handed-over → completed`. Only `completed`
//! without a post-copy still running is final: the destination owns the disk and nothing here is
//! needed any more. `serve` refuses that disk (a VM started on it by mistake would boot and then
//! fail every write), except `--read-only` (to look at it) and `--fenced` (served fenced, as before,
//! e.g. to `reclaim` it by force). Every earlier stage must start: `finishing` and `handed-over`
//! are resolved through the running proxy (`row-migrate --recover`, `migrate-complete`,
//! `migrate-cancel`), and a post-copy's destination still reads blocks from it.

use std::path::Path;

use anyhow::Result;
use migration_session::{DestStage, Ownership, SessionId, SourceStage};

mod retire;

pub use retire::{retire, RetireRequest, Retired};

/// How the proxy is asked to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// `serve`, perhaps `--read-only`, perhaps `--fenced`.
    Serve {
        /// `--read-only`.
        read_only: bool,
        /// `--fenced`: start a disk that was migrated away, fenced.
        fenced: bool,
    },
    /// `receive`.
    Receive,
}

/// Where a disk that was handed over went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Away {
    /// The destination (`tcp:HOST:PORT`).
    pub peer: String,
    /// The migration session.
    pub session: SessionId,
    /// Since when writes are refused here (RFC 3339), if recorded.
    pub since: Option<String>,
}

impl Away {
    fn since(&self) -> String {
        self.since.as_deref().map(|s| format!(", handed over at {s}")).unwrap_or_default()
    }
}

/// The proxy may start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Go {
    /// As the record says (fenced, if it says so).
    Normal,
    /// On a disk that was migrated away for good: served fenced (`--read-only` or `--fenced`).
    MigratedAway(Away),
}

/// Why the proxy does not start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartRefusal {
    /// `serve` of a disk migrated to another host, which owns it now.
    MigratedAway(Away),
    /// `serve` of an image whose incoming migration did not commit.
    Incomplete {
        /// The session.
        session: SessionId,
        /// Since when.
        since: String,
    },
    /// `receive` over the source of a hand-over that is not over: this copy may still be needed.
    HandOverUnfinished {
        /// Where the disk is going.
        away: Away,
        /// How far the hand-over got.
        stage: SourceStage,
        /// The destination still reads blocks from here.
        postcopy: bool,
    },
}

/// A source stage as the record spells it.
pub fn stage_name(stage: SourceStage) -> &'static str {
    match stage {
        SourceStage::Precopy => "precopy",
        SourceStage::Finishing => "finishing",
        SourceStage::HandedOver => "handed-over",
        SourceStage::Completed => "completed",
    }
}

fn dest_stage_name(stage: DestStage) -> &'static str {
    match stage {
        DestStage::Incomplete => "incomplete",
        DestStage::Committed => "committed",
        DestStage::Owner => "owner",
    }
}

/// Whether `record` says the disk was handed over and the migration is over: the destination
/// owns it and holds every block (no post-copy left).
pub fn migrated_away(record: Option<&Ownership>) -> Option<Away> {
    match record? {
        Ownership::Source { stage: SourceStage::Completed, postcopy: false, session, peer, fenced_since, .. } => {
            Some(Away { peer: peer.clone(), session: *session, since: fenced_since.clone() })
        }
        _ => None,
    }
}

/// Whether `record` fences the disk as the source of a hand-over (from `finishing` on).
pub fn fenced_source(record: Option<&Ownership>) -> bool {
    matches!(record, Some(Ownership::Source { stage, .. }) if *stage != SourceStage::Precopy)
}

/// Whether the proxy may start as `start` on a disk whose ownership record is `record` (`None`:
/// free, this host owns it).
pub fn may_start(record: Option<&Ownership>, start: Start) -> Result<Go, StartRefusal> {
    let away = migrated_away(record);
    match (record, start) {
        (Some(Ownership::Destination { stage: DestStage::Incomplete, session, since, .. }), Start::Serve { .. }) => {
            Err(StartRefusal::Incomplete { session: *session, since: since.clone() })
        }
        (_, Start::Serve { read_only, fenced }) => match away {
            None => Ok(Go::Normal),
            Some(away) if read_only || fenced => Ok(Go::MigratedAway(away)),
            Some(away) => Err(StartRefusal::MigratedAway(away)),
        },
        // Over a completed source (its copy is obsolete) or any disk of this host's own: the
        // operator's choice. Over a hand-over in progress, it would destroy a copy that may be
        // the only one (finishing), that recovery needs (handed-over), or that the destination
        // still reads from (post-copy).
        (Some(Ownership::Source { stage, session, peer, fenced_since, postcopy, .. }), Start::Receive)
            if matches!(stage, SourceStage::Finishing | SourceStage::HandedOver)
                || (*stage == SourceStage::Completed && *postcopy) =>
        {
            Err(StartRefusal::HandOverUnfinished {
                away: Away { peer: peer.clone(), session: *session, since: fenced_since.clone() },
                stage: *stage,
                postcopy: *postcopy,
            })
        }
        (_, Start::Receive) => Ok(Go::Normal),
    }
}

impl StartRefusal {
    /// The one line that says what happened and what to do; `retire` is the command that
    /// retires this image (`nbd-row-proxy retire --image ...`).
    pub fn message(&self, image: &Path, retire: &str) -> String {
        let image = image.display();
        match self {
            Self::MigratedAway(away) => format!(
                "{image} was migrated to {peer} (session {session}{since}), which owns the disk now: this copy is \
                 out of date and is not served, so that a VM started here by mistake does not run on it. To look \
                 at it, serve it with --read-only; once it is no longer needed, `{retire}` drops its state (the \
                 image can then receive the disk back or be served as a new disk; --delete-image also deletes \
                 it); to take it back because {peer} is gone for good, serve it with --fenced and run the control \
                 command reclaim with {{\"force\": true}}",
                peer = away.peer,
                session = away.session,
                since = away.since(),
            ),
            Self::Incomplete { session, since } => format!(
                "{image} is incomplete: migration session {session} to it did not commit ({since}). Run \
                 `nbd-row-proxy receive` to migrate it again, or `{retire}` to drop that migration's state and \
                 serve the image as it is"
            ),
            Self::HandOverUnfinished { away, stage, postcopy } => format!(
                "{image} is the source of a hand-over to {peer} that is not over (session {session}, stage {stage}{pc}): \
                 receiving into it would overwrite a copy the migration may still need. Finish or undo that \
                 migration first (`row-migrate --recover`, or serve it and run migrate-complete or migrate-cancel \
                 on its control socket), then receive again",
                peer = away.peer,
                session = away.session,
                stage = stage_name(*stage),
                pc = if *postcopy { ", post-copy still pushing blocks to it" } else { "" },
            ),
        }
    }
}

/// What [`retire`] may remove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Retirable {
    /// The disk was migrated away and the migration completed.
    MigratedAway(Away),
    /// A migration into this image did not commit: the image is not a disk.
    Incomplete {
        /// The session.
        session: SessionId,
    },
}

/// Why [`retire`] refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RetireRefusal {
    /// This host owns the disk: nothing was handed over.
    #[error(
        "this host owns disk {id} (no migration handed it over{precopy}): there is nothing to retire; its state \
         stays with it"
    )]
    OwnsItself {
        /// The disk id.
        id: String,
        /// A note when a pre-copy was interrupted.
        precopy: &'static str,
    },
    /// This host received the disk and owns it.
    #[error(
        "this host received disk {id} by migration (session {session}, {stage}) and owns it: there is nothing to \
         retire (migrate it to another host first)"
    )]
    Received {
        /// The disk id.
        id: String,
        /// The session.
        session: SessionId,
        /// `committed` or `owner`.
        stage: &'static str,
    },
    /// A hand-over is not over.
    #[error(
        "the hand-over of disk {id} to {peer} is not over (session {session}, stage {stage}): finish or undo it \
         first (`row-migrate --recover`, or migrate-complete / migrate-cancel on the proxy's control socket)"
    )]
    HandOverUnfinished {
        /// The disk id.
        id: String,
        /// The destination.
        peer: String,
        /// The session.
        session: SessionId,
        /// The stage.
        stage: &'static str,
    },
    /// The destination still reads blocks from here.
    #[error(
        "disk {id} was handed over to {peer} by post-copy and the push is still running (session {session}): {peer} \
         still reads blocks from this copy. Keep it served until query-migrate shows the post-copy done, run \
         migrate-complete, then retire it"
    )]
    PostcopyRunning {
        /// The disk id.
        id: String,
        /// The destination.
        peer: String,
        /// The session.
        session: SessionId,
    },
}

/// Whether the state of disk `id`, whose ownership record is `record`, may be retired.
pub fn may_retire(id: &str, record: Option<&Ownership>) -> Result<Retirable, RetireRefusal> {
    let id = id.to_string();
    match record {
        None => Err(RetireRefusal::OwnsItself { id, precopy: "" }),
        Some(Ownership::Source { stage: SourceStage::Precopy, .. }) => {
            Err(RetireRefusal::OwnsItself { id, precopy: "; an interrupted pre-copy is rolled back at its next start" })
        }
        Some(Ownership::Source { postcopy: true, session, peer, .. }) => {
            Err(RetireRefusal::PostcopyRunning { id, peer: peer.clone(), session: *session })
        }
        Some(Ownership::Source {
            stage: stage @ (SourceStage::Finishing | SourceStage::HandedOver),
            session,
            peer,
            ..
        }) => Err(RetireRefusal::HandOverUnfinished {
            id,
            peer: peer.clone(),
            session: *session,
            stage: stage_name(*stage),
        }),
        Some(Ownership::Source { stage: SourceStage::Completed, session, peer, fenced_since, .. }) => {
            Ok(Retirable::MigratedAway(Away { peer: peer.clone(), session: *session, since: fenced_since.clone() }))
        }
        Some(Ownership::Destination { stage: DestStage::Incomplete, session, .. }) => {
            Ok(Retirable::Incomplete { session: *session })
        }
        Some(Ownership::Destination { stage: stage @ (DestStage::Committed | DestStage::Owner), session, .. }) => {
            Err(RetireRefusal::Received { id, session: *session, stage: dest_stage_name(*stage) })
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use control_api::Strategy;

    const S: SessionId = SessionId([9; 16]);
    const PEER: &str = "tcp:192.0.2.2:10810";
    const SERVE: Start = Start::Serve { read_only: false, fenced: false };
    const READ_ONLY: Start = Start::Serve { read_only: true, fenced: false };
    const FENCED: Start = Start::Serve { read_only: false, fenced: true };

    pub(super) fn source(stage: SourceStage, postcopy: bool) -> Ownership {
        Ownership::Source {
            stage,
            session: S,
            peer: PEER.into(),
            strategy: Strategy::Row,
            fenced_since: (stage != SourceStage::Precopy).then(|| "2025-01-02T03:04:05Z".to_string()),
            postcopy,
            claimed: false,
        }
    }

    pub(super) fn dest(stage: DestStage) -> Ownership {
        Ownership::Destination { stage, session: S, since: "2025-01-02T03:04:05Z".into(), postcopy: false }
    }

    fn away() -> Away {
        Away { peer: PEER.into(), session: S, since: Some("2025-01-02T03:04:05Z".into()) }
    }

    #[test]
    fn serve_refuses_only_a_disk_migrated_away_for_good() {
        use SourceStage::*;
        // Every stage that needs the running proxy to be resolved starts, fenced by the record.
        for (stage, postcopy) in [(Precopy, false), (Finishing, false), (HandedOver, false), (HandedOver, true)] {
            assert_eq!(may_start(Some(&source(stage, postcopy)), SERVE), Ok(Go::Normal), "{stage:?} {postcopy}");
        }
        // A post-copy still pushing: the destination reads from here, even if it says completed.
        assert_eq!(may_start(Some(&source(Completed, true)), SERVE), Ok(Go::Normal));
        assert_eq!(may_start(Some(&source(Completed, false)), SERVE), Err(StartRefusal::MigratedAway(away())));
        assert_eq!(may_start(Some(&source(Completed, false)), READ_ONLY), Ok(Go::MigratedAway(away())));
        assert_eq!(may_start(Some(&source(Completed, false)), FENCED), Ok(Go::MigratedAway(away())));
        // A free disk, and a received one, are served.
        assert_eq!(may_start(None, SERVE), Ok(Go::Normal));
        assert_eq!(may_start(Some(&dest(DestStage::Committed)), SERVE), Ok(Go::Normal));
        assert_eq!(may_start(Some(&dest(DestStage::Owner)), SERVE), Ok(Go::Normal));
        // An image whose migration did not commit is not a disk, read-only or not.
        for start in [SERVE, READ_ONLY, FENCED] {
            assert!(matches!(
                may_start(Some(&dest(DestStage::Incomplete)), start),
                Err(StartRefusal::Incomplete { .. })
            ));
        }
    }

    #[test]
    fn receive_refuses_a_hand_over_that_is_not_over() {
        use SourceStage::*;
        for (stage, postcopy) in [(Finishing, false), (HandedOver, false), (HandedOver, true), (Completed, true)] {
            let r = may_start(Some(&source(stage, postcopy)), Start::Receive);
            assert!(matches!(r, Err(StartRefusal::HandOverUnfinished { .. })), "{stage:?} {postcopy}: {r:?}");
        }
        // Over a completed source (obsolete), an interrupted pre-copy, a free disk, or its own
        // earlier migration: as before.
        for record in [
            Some(source(Completed, false)),
            Some(source(Precopy, false)),
            None,
            Some(dest(DestStage::Incomplete)),
            Some(dest(DestStage::Owner)),
        ] {
            assert_eq!(may_start(record.as_ref(), Start::Receive), Ok(Go::Normal), "{record:?}");
        }
    }

    #[test]
    fn retire_takes_only_a_disk_migrated_away_or_an_incomplete_one() {
        use SourceStage::*;
        assert_eq!(may_retire("d", Some(&source(Completed, false))), Ok(Retirable::MigratedAway(away())));
        assert_eq!(may_retire("d", Some(&dest(DestStage::Incomplete))), Ok(Retirable::Incomplete { session: S }));
        let refused = |r: Option<Ownership>| may_retire("d", r.as_ref()).unwrap_err();
        assert!(matches!(refused(None), RetireRefusal::OwnsItself { .. }));
        assert!(matches!(refused(Some(source(Precopy, false))), RetireRefusal::OwnsItself { .. }));
        assert!(matches!(refused(Some(source(Finishing, false))), RetireRefusal::HandOverUnfinished { .. }));
        assert!(matches!(refused(Some(source(HandedOver, false))), RetireRefusal::HandOverUnfinished { .. }));
        assert!(matches!(refused(Some(source(HandedOver, true))), RetireRefusal::PostcopyRunning { .. }));
        assert!(matches!(refused(Some(source(Completed, true))), RetireRefusal::PostcopyRunning { .. }));
        assert!(matches!(refused(Some(dest(DestStage::Committed))), RetireRefusal::Received { .. }));
        assert!(matches!(refused(Some(dest(DestStage::Owner))), RetireRefusal::Received { .. }));
        for r in [None, Some(source(HandedOver, true)), Some(dest(DestStage::Owner))] {
            assert!(!refused(r).to_string().contains('\n'));
        }
    }

    #[test]
    fn the_refusals_are_one_line_that_says_where_the_disk_went_and_what_to_do() {
        let image = Path::new("/var/lib/vm1.raw");
        let retire = "nbd-row-proxy retire --image /var/lib/vm1.raw";
        let m = StartRefusal::MigratedAway(away()).message(image, retire);
        for want in [PEER, &S.to_string(), "2025-01-02T03:04:05Z", "--read-only", retire, "--fenced", "reclaim"] {
            assert!(m.contains(want), "{want:?} missing from {m}");
        }
        assert!(!m.contains('\n'), "{m}");
        let m = StartRefusal::HandOverUnfinished { away: away(), stage: SourceStage::HandedOver, postcopy: true }
            .message(image, retire);
        assert!(m.contains("handed-over") && m.contains("post-copy") && m.contains("--recover"), "{m}");
        let m = StartRefusal::Incomplete { session: S, since: "x".into() }.message(image, retire);
        assert!(m.contains(retire) && m.contains("receive"), "{m}");
    }
}
