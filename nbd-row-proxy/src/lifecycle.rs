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

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use migration_session::{DestStage, Ownership, SessionId, SourceStage};
use row_store::storage::{Posix, Storage};
use row_store::{Disk, DiskOptions, Mode};

use crate::ownership::RecordFile;
use crate::state::{Lookup, StateEntry, XATTR};

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

/// What `retire` works on.
#[derive(Debug, Clone)]
pub struct RetireRequest {
    /// The image.
    pub image: PathBuf,
    /// The state directory.
    pub state_dir: PathBuf,
    /// The operator's `--disk-id`.
    pub disk_id: Option<String>,
    /// The operator's `--reserved`, if the disk was served with one.
    pub reserved: Option<PathBuf>,
    /// Also delete the image file.
    pub delete_image: bool,
}

/// What `retire` did.
#[derive(Debug)]
pub struct Retired {
    /// The disk's id.
    pub id: String,
    /// Why it could go.
    pub why: Retirable,
    /// Blocks of the overlay merged into the image (so it holds the disk as it was handed over).
    pub merged_blocks: u64,
    /// Files removed, in order (the image last, if deleted).
    pub removed: Vec<PathBuf>,
    /// The state entry that is gone.
    pub entry: PathBuf,
}

/// The same attribute in the `trusted` namespace (see `state.rs`), for file systems without user
/// attributes.
const XATTR_TRUSTED: &str = "trusted.nbd-row-proxy.disk-id";
/// The files a state entry may hold (see `state.rs`, `ownership.rs`): anything else is not ours.
const ENTRY_FILES: &[&str] = &["disk", "ownership", "residual", "overlay", "overlay.map"];

/// Drops the state of a disk this host handed over for good (or whose incoming migration did not
/// commit): checks the record, merges the ROW overlay back into the image (unless the image is
/// deleted too) so the image holds the disk as it was handed over, removes the state entry, and
/// with `delete_image` the image file. Refuses a disk this host owns, a hand-over that is not
/// over, a post-copy still running, a disk served right now (its lock), a block device with
/// `delete_image`, and an entry holding files that are not ours. Blocking.
pub fn retire(req: &RetireRequest) -> Result<Retired> {
    let image = &req.image;
    let meta = std::fs::metadata(image).with_context(|| format!("--image {}", image.display()))?;
    let block = meta.file_type().is_block_device();
    if !(meta.is_file() || block) {
        bail!("--image {} is neither a file nor a block device", image.display());
    }
    if req.delete_image && block {
        bail!(
            "--image {} is a block device: --delete-image deletes image files only; retire it without \
             --delete-image, then remove the volume yourself (e.g. lvremove)",
            image.display()
        );
    }
    if let Some(id) = &req.disk_id {
        crate::state::DiskId::parse(id)?;
    } else if meta.is_file() && !has_disk_id(image) {
        bail!(
            "{} has no disk id (extended attribute {XATTR}): it was never served here, so it has no state to \
             retire",
            image.display()
        );
    }
    let state_dir = std::path::absolute(&req.state_dir).context("--state-dir")?;
    let entry = StateEntry::locate(&Lookup {
        state_dir: &state_dir,
        image,
        disk_id: req.disk_id.as_deref(),
        reserved: req.reserved.as_deref(),
        read_only: false,
    })?;
    if entry.is_new() && entry_files(entry.dir())?.iter().all(|f| f == "disk") {
        // Made by this lookup: take it back.
        let _ = std::fs::remove_file(entry.dir().join("disk"));
        let _ = std::fs::remove_dir(entry.dir());
        bail!("{} (disk {}) has no state in {}: nothing to retire", image.display(), entry.id(), state_dir.display());
    }
    let foreign: Vec<String> = entry_files(entry.dir())?
        .into_iter()
        .filter(|f| !ENTRY_FILES.contains(&f.as_str()) && !ENTRY_FILES.iter().any(|k| *f == format!("{k}.tmp")))
        .collect();
    if !foreign.is_empty() {
        bail!(
            "the state entry {} holds files that are not ours ({}): move them away, then retire again",
            entry.dir().display(),
            foreign.join(", ")
        );
    }
    let id = entry.id().to_string();
    let record_file = RecordFile::of_entry(&entry)
        .with_context(|| format!("reading the ownership record {}", entry.ownership().display()))?;
    may_retire(&id, record_file.load()?.as_ref())?;
    // The image's lock: no proxy serves it while its state goes (and none can start meanwhile).
    let disk = Disk::open(
        image,
        DiskOptions {
            reserved: Some(entry.reserved().to_owned()),
            read_only: false,
            discard_overlay: false,
            disk_tag: entry.id().tag(),
        },
    )
    .with_context(|| format!("opening disk {} (is it served right now? stop that proxy first)", image.display()))?;
    // Decided again under the lock: a proxy may have changed the record before it stopped.
    let why = may_retire(&id, record_file.load()?.as_ref())?;
    let mut merged_blocks = 0;
    if matches!(why, Retirable::MigratedAway(_))
        && !req.delete_image
        && matches!(disk.mode(), Mode::Row | Mode::Merging)
    {
        merged_blocks = disk.status().blocks_updated;
        disk.row_stop(|_| {}).with_context(|| format!("merging the overlay back into {}", image.display()))?;
    }
    let mut removed = Vec::new();
    // The record goes last: an entry cut short by a crash still says the disk was handed over.
    let files =
        [entry.reserved().to_owned(), entry.journal(), entry.residual(), entry.dir().join("disk"), entry.ownership()];
    for path in files.iter().flat_map(|p| [row_store::storage::suffixed(p, ".tmp"), p.clone()]) {
        match Posix.remove(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    std::fs::remove_dir(entry.dir()).with_context(|| format!("removing {}", entry.dir().display()))?;
    Posix.sync_parent(entry.dir()).with_context(|| format!("syncing {}", state_dir.display()))?;
    if req.delete_image {
        std::fs::remove_file(image).with_context(|| format!("deleting {}", image.display()))?;
        Posix.sync_parent(image).with_context(|| format!("syncing the directory of {}", image.display()))?;
        removed.push(image.clone());
    }
    drop(disk);
    Ok(Retired { id, why, merged_blocks, removed, entry: entry.dir().to_owned() })
}

/// Whether a regular file carries a disk id.
fn has_disk_id(image: &Path) -> bool {
    [XATTR, XATTR_TRUSTED].iter().any(|name| matches!(xattr::get_deref(image, name), Ok(Some(_))))
}

/// The names in a state entry.
fn entry_files(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        names.push(e.with_context(|| format!("reading {}", dir.display()))?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use control_api::Strategy;
    use row_store::BlockBackend;

    const S: SessionId = SessionId([9; 16]);
    const PEER: &str = "tcp:192.0.2.2:10810";
    const SERVE: Start = Start::Serve { read_only: false, fenced: false };
    const READ_ONLY: Start = Start::Serve { read_only: true, fenced: false };
    const FENCED: Start = Start::Serve { read_only: false, fenced: true };

    fn source(stage: SourceStage, postcopy: bool) -> Ownership {
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

    fn dest(stage: DestStage) -> Ownership {
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

    fn image(dir: &Path, size: u64) -> PathBuf {
        let p = dir.join("disk.raw");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(size).unwrap();
        p
    }

    fn request(dir: &Path, image: &Path) -> RetireRequest {
        RetireRequest {
            image: image.to_owned(),
            state_dir: dir.join("state"),
            disk_id: None,
            reserved: None,
            delete_image: false,
        }
    }

    fn entry(dir: &Path, image: &Path) -> StateEntry {
        StateEntry::locate(&Lookup {
            state_dir: &dir.join("state"),
            image,
            disk_id: None,
            reserved: None,
            read_only: false,
        })
        .unwrap()
    }

    #[test]
    fn retire_merges_the_overlay_and_removes_the_entry_of_a_disk_migrated_away() {
        let d = tempfile::tempdir().unwrap();
        let img = image(d.path(), 1 << 20);
        let e = entry(d.path(), &img);
        let records = RecordFile::of_entry(&e).unwrap();
        // A write that went to the overlay during the migration.
        {
            let disk = Disk::open(
                &img,
                DiskOptions { reserved: Some(e.reserved().to_owned()), disk_tag: e.id().tag(), ..Default::default() },
            )
            .unwrap();
            disk.row_start().unwrap();
            disk.write_at(&[7; 4096], 8192, true).unwrap();
        }
        // Not retired while this host owns it, nor while the hand-over is not over.
        let e1 = retire(&request(d.path(), &img)).unwrap_err();
        assert!(e1.to_string().contains("owns disk"), "{e1}");
        records.store(Some(&source(SourceStage::HandedOver, false))).unwrap();
        let e2 = retire(&request(d.path(), &img)).unwrap_err();
        assert!(e2.to_string().contains("not over"), "{e2}");
        assert!(e.dir().join("overlay").exists(), "nothing removed");
        records.store(Some(&source(SourceStage::Completed, false))).unwrap();
        let done = retire(&request(d.path(), &img)).unwrap();
        assert_eq!(done.merged_blocks, 1);
        assert!(!e.dir().exists(), "the entry is gone");
        assert!(done.removed.contains(&e.ownership()), "{:?}", done.removed);
        let bytes = std::fs::read(&img).unwrap();
        assert_eq!(&bytes[8192..12288], &[7; 4096], "the image holds the disk as handed over");
        // A new disk now: free, writable, with the same id.
        let again = entry(d.path(), &img);
        assert!(again.is_new());
        assert_eq!(again.id(), e.id());
        assert!(RecordFile::of_entry(&again).unwrap().load().unwrap().is_none());
        // Nothing left to retire, and a file never served has no state.
        let e3 = retire(&request(d.path(), &img)).unwrap_err();
        assert!(e3.to_string().contains("owns disk"), "{e3}");
        let other = d.path().join("other.raw");
        std::fs::File::create(&other).unwrap().set_len(1 << 20).unwrap();
        let e4 = retire(&request(d.path(), &other)).unwrap_err();
        assert!(e4.to_string().contains("never served"), "{e4}");
        assert!(xattr::get(&other, XATTR).unwrap().is_none(), "not tagged by a refused retire");
    }

    #[test]
    fn retire_deletes_the_image_only_when_asked_and_leaves_foreign_files_alone() {
        let d = tempfile::tempdir().unwrap();
        let img = image(d.path(), 1 << 20);
        let e = entry(d.path(), &img);
        RecordFile::of_entry(&e).unwrap().store(Some(&dest(DestStage::Incomplete))).unwrap();
        std::fs::write(e.dir().join("notes"), "mine").unwrap();
        let err = retire(&request(d.path(), &img)).unwrap_err();
        assert!(err.to_string().contains("notes"), "{err}");
        std::fs::remove_file(e.dir().join("notes")).unwrap();
        // Served right now: the lock refuses.
        let served = Disk::open(&img, DiskOptions::default()).unwrap();
        let err = retire(&request(d.path(), &img)).unwrap_err();
        assert!(format!("{err:#}").contains("served right now"), "{err:#}");
        drop(served);
        let done = retire(&RetireRequest { delete_image: true, ..request(d.path(), &img) }).unwrap();
        assert!(matches!(done.why, Retirable::Incomplete { .. }));
        assert!(!img.exists() && !e.dir().exists());
        assert_eq!(done.removed.last(), Some(&img));
    }

    #[test]
    fn a_new_entry_made_by_the_lookup_is_taken_back() {
        let d = tempfile::tempdir().unwrap();
        let img = image(d.path(), 1 << 20);
        let err = retire(&RetireRequest { disk_id: Some("vm1-root".into()), ..request(d.path(), &img) }).unwrap_err();
        assert!(err.to_string().contains("no state"), "{err}");
        assert!(!d.path().join("state").join("vm1-root").exists());
    }
}
