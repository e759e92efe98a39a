//! A disk's identity ([`DiskId`]): `--disk-id`, a regular file's extended attribute, a
//! device-mapper uuid, a loop device's backing file, a block device's WWID or serial.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::{StateError, XATTR};

/// The same attribute in the `trusted` namespace (root only), for file systems without user
/// attributes (tmpfs before Linux 6.6).
pub const XATTR_TRUSTED: &str = "trusted.nbd-row-proxy.disk-id";
const MAX_ID_LEN: usize = 128;

/// A disk's identity: the name of its state entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskId(String);

impl DiskId {
    /// An operator's `--disk-id`: 1 to 128 of `A-Z a-z 0-9 . _ -`, not starting with a dot.
    pub fn parse(s: &str) -> Result<Self, StateError> {
        let ok = !s.is_empty()
            && s.len() <= MAX_ID_LEN
            && !s.starts_with('.')
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if ok {
            Ok(Self(s.to_string()))
        } else {
            Err(StateError::BadId(s.to_string()))
        }
    }

    /// A name made from a system's identifier (dm uuid, WWID): other bytes become `_`.
    pub(super) fn from_system(prefix: &str, raw: &str) -> Option<Self> {
        let raw = raw.trim();
        if raw.is_empty() {
            return None;
        }
        let clean: String =
            raw.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
        let mut name = format!("{prefix}{clean}");
        name.truncate(MAX_ID_LEN);
        Some(Self(name))
    }

    /// A new random id (for a file seen for the first time).
    fn random() -> Self {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).expect("the system's random source");
        Self(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Twelve bytes derived from the id, kept in the overlay journal's header so an overlay is
    /// never adopted by another disk (see `row_store::DiskOptions::disk_tag`).
    pub fn tag(&self) -> [u8; 12] {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(self.0.as_bytes());
        digest[..12].try_into().expect("12 bytes")
    }
}

impl std::fmt::Display for DiskId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The id of a disk given no `--disk-id`.
pub(super) fn identify(image: &Path, meta: &std::fs::Metadata) -> Result<DiskId, StateError> {
    if meta.file_type().is_block_device() {
        block_device_id(image, meta.rdev())
    } else {
        file_id(image)
    }
}

/// A regular file's id: its attribute, or a new one set now.
fn file_id(image: &Path) -> Result<DiskId, StateError> {
    for name in [XATTR, XATTR_TRUSTED] {
        if let Ok(Some(v)) = xattr::get_deref(image, name) {
            let text = String::from_utf8_lossy(&v).into_owned();
            return DiskId::parse(text.trim()).map_err(|_| StateError::Damaged {
                path: image.to_owned(),
                why: format!("its {name} attribute {text:?} is not a disk id"),
            });
        }
    }
    let id = DiskId::random();
    let set = |name| xattr::set_deref(image, name, id.as_str().as_bytes());
    match set(XATTR) {
        Ok(()) => Ok(id),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            set(XATTR_TRUSTED).map(|()| id).map_err(|_| StateError::Tag { image: image.to_owned(), source: e })
        }
        Err(e) => Err(StateError::Tag { image: image.to_owned(), source: e }),
    }
}

/// A block device's id from sysfs: dm uuid (LVM), a loop device's backing file, WWID, serial.
fn block_device_id(image: &Path, rdev: u64) -> Result<DiskId, StateError> {
    let sys = PathBuf::from(format!("/sys/dev/block/{}:{}", libc::major(rdev), libc::minor(rdev)));
    let read = |p: PathBuf| std::fs::read_to_string(p).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    if let Some(uuid) = read(sys.join("dm/uuid")) {
        return DiskId::from_system("dm-", &uuid).ok_or_else(|| unidentified(image, "empty dm uuid"));
    }
    if let Some(backing) = read(sys.join("loop/backing_file")) {
        let offset = read(sys.join("loop/offset")).unwrap_or_default();
        let limit = read(sys.join("loop/sizelimit")).unwrap_or_default();
        if offset != "0" || limit != "0" {
            return Err(unidentified(image, "a loop device with an offset or size limit"));
        }
        let backing = PathBuf::from(backing);
        if !backing.is_file() {
            return Err(unidentified(image, &format!("its backing file {} is gone", backing.display())));
        }
        // The same disk as its backing file, so both share one entry (and one fence).
        return file_id(&backing);
    }
    let (base, part) = match read(sys.join("partition")) {
        Some(n) => (sys.join(".."), format!("-part{n}")),
        None => (sys.clone(), String::new()),
    };
    for (prefix, file) in
        [("wwid-", "device/wwid"), ("wwid-", "wwid"), ("serial-", "serial"), ("serial-", "device/serial")]
    {
        if let Some(v) = read(base.join(file)) {
            return DiskId::from_system(prefix, &format!("{v}{part}")).ok_or_else(|| unidentified(image, "empty id"));
        }
    }
    Err(unidentified(image, "no dm uuid, loop backing file, WWID or serial in sysfs"))
}

fn unidentified(image: &Path, why: &str) -> StateError {
    StateError::Unidentified { image: image.to_owned(), why: why.to_string() }
}
