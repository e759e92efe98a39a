//! `retire`: the file work of dropping a disk's state once the rules ([`super::may_retire`])
//! allow it.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use row_store::storage::{Posix, Storage};
use row_store::{Disk, DiskOptions, Mode};

use super::{may_retire, Retirable};
use crate::ownership::RecordFile;
use crate::state::{Lookup, StateEntry, XATTR, XATTR_TRUSTED};

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
    check_image(req)?;
    let state_dir = std::path::absolute(&req.state_dir).context("--state-dir")?;
    let entry = locate_entry(req, &state_dir)?;
    refuse_foreign_files(&entry)?;
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
    let mut removed = remove_entry(&entry, &state_dir)?;
    if req.delete_image {
        std::fs::remove_file(image).with_context(|| format!("deleting {}", image.display()))?;
        Posix.sync_parent(image).with_context(|| format!("syncing the directory of {}", image.display()))?;
        removed.push(image.clone());
    }
    drop(disk);
    Ok(Retired { id, why, merged_blocks, removed, entry: entry.dir().to_owned() })
}

/// The image is a file or a block device (not deleted if a device), and a file carries a disk
/// id unless the operator names one.
fn check_image(req: &RetireRequest) -> Result<()> {
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
    Ok(())
}

/// The disk's state entry; one that this lookup had to make holds nothing to retire (and is
/// taken back).
fn locate_entry(req: &RetireRequest, state_dir: &Path) -> Result<StateEntry> {
    let entry = StateEntry::locate(&Lookup {
        state_dir,
        image: &req.image,
        disk_id: req.disk_id.as_deref(),
        reserved: req.reserved.as_deref(),
        read_only: false,
    })?;
    if entry.is_new() && entry_files(entry.dir())?.iter().all(|f| f == "disk") {
        let _ = std::fs::remove_file(entry.dir().join("disk"));
        let _ = std::fs::remove_dir(entry.dir());
        bail!(
            "{} (disk {}) has no state in {}: nothing to retire",
            req.image.display(),
            entry.id(),
            state_dir.display()
        );
    }
    Ok(entry)
}

/// Refuses an entry that holds files that are not ours: nothing is removed then.
fn refuse_foreign_files(entry: &StateEntry) -> Result<()> {
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
    Ok(())
}

/// Removes the entry's files and the entry; returns what was removed. The record goes last: an
/// entry cut short by a crash still says the disk was handed over.
fn remove_entry(entry: &StateEntry, state_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
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
    Ok(removed)
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
    use crate::lifecycle::tests::{dest, source};
    use migration_session::{DestStage, SourceStage};
    use row_store::BlockBackend;

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
