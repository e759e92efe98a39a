//! The reserved file's header, and telling our overlay files from anything else at a path.
//!
//! Every file the overlay creates carries a header of ours: the journal its own (see
//! [`crate::journal`]), the reserved file one block before slot 0 with the overlay's id. So a
//! path that holds anything else (another VM's image, the served image itself, a typo) is
//! refused, never truncated or deleted, and a reserved file is only ever paired with the
//! journal of its own session.

use std::io;
use std::path::Path;

use crate::journal::{Header, OverlayId};
use crate::storage::{OpenMode, Storage};
use crate::BLOCK_SIZE;

const MAGIC: &[u8; 8] = b"NBDROWR1";
const VERSION: u32 = 1;
/// Bytes before slot 0: one block, so slots stay block-aligned.
pub const HEADER_LEN: u64 = BLOCK_SIZE;

/// The reserved file's header for overlay `id` over an image of `image_size` bytes.
pub fn header(image_size: u64, id: &OverlayId) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..20].copy_from_slice(&image_size.to_le_bytes());
    h[20..36].copy_from_slice(id);
    let crc = crc32fast::hash(&h[..36]);
    h[36..40].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The overlay id in a reserved file's header, if it is one of ours.
fn decode_id(h: &[u8]) -> Option<OverlayId> {
    (h.len() >= 40 && &h[..8] == MAGIC && crc32fast::hash(&h[..36]).to_le_bytes() == h[36..40])
        .then(|| h[20..36].try_into().expect("16 bytes"))
}

/// Where the journal's high-water mark lives in the header block: its own sector, so that
/// rewriting it at each flush never touches the identity header at offset 0.
pub const MARK_OFFSET: u64 = 512;
const MARK_MAGIC: &[u8; 8] = b"NBDROWH1";
/// The mark's bytes: magic, the journal's length, CRC.
pub const MARK_LEN: usize = 20;

/// The mark that says the journal held at least `journal_len` bytes when the reserved file
/// was last synced (written before each flush's sync, with the length before that flush's
/// batch, so the durable journal is never shorter than a durable mark).
pub fn mark(journal_len: u64) -> [u8; MARK_LEN] {
    let mut m = [0u8; MARK_LEN];
    m[..8].copy_from_slice(MARK_MAGIC);
    m[8..16].copy_from_slice(&journal_len.to_le_bytes());
    let crc = crc32fast::hash(&m[..16]);
    m[16..].copy_from_slice(&crc.to_le_bytes());
    m
}

/// The journal length a reserved file's mark records; `None` if it has none (a reserved file
/// of an older release, or a mark torn by a crash: nothing to compare with).
pub fn read_mark(storage: &dyn Storage, path: &Path) -> io::Result<Option<u64>> {
    if !storage.exists(path)? {
        return Ok(None);
    }
    let file = storage.open(path, OpenMode::ReadOnly)?;
    if file.size()? < MARK_OFFSET + MARK_LEN as u64 {
        return Ok(None);
    }
    let mut head = Vec::new();
    file.read_append(&mut head, HEADER_LEN as usize, 0)?;
    if decode_id(&head).is_none() {
        return Ok(None);
    }
    let m = &head[MARK_OFFSET as usize..MARK_OFFSET as usize + MARK_LEN];
    let valid = &m[..8] == MARK_MAGIC && crc32fast::hash(&m[..16]).to_le_bytes() == m[16..20];
    Ok(valid.then(|| u64::from_le_bytes(m[8..16].try_into().expect("8 bytes"))))
}

/// What is at a path where an overlay file may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// Nothing.
    Nothing,
    /// A file with no data: empty, or a first block of zeroes and nothing after it (a file
    /// whose creation was cut short). Removing it loses nothing.
    Empty,
    /// A journal of ours.
    Journal(Header),
    /// A reserved file of ours; `holds_slots`: it has data past its header.
    Reserved {
        /// Its overlay's id.
        id: OverlayId,
        /// Whether it holds any slot.
        holds_slots: bool,
    },
    /// Anything else: not ours to touch.
    Other,
}

/// Looks at `path` without changing it.
pub fn inspect(storage: &dyn Storage, path: &Path) -> io::Result<Found> {
    if !storage.exists(path)? {
        return Ok(Found::Nothing);
    }
    let file = storage.open(path, OpenMode::ReadOnly)?;
    let size = file.size()?;
    let mut head = Vec::new();
    file.read_append(&mut head, size.min(HEADER_LEN) as usize, 0)?;
    Ok(if let Some(id) = decode_id(&head) {
        Found::Reserved { id, holds_slots: size > HEADER_LEN }
    } else if let Some(h) = Header::decode(&head) {
        Found::Journal(h)
    } else if size <= HEADER_LEN && head.iter().all(|&b| b == 0) {
        Found::Empty
    } else {
        Found::Other
    })
}
