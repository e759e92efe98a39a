//! Merging the overlay back into the image while requests keep being served.
//!
//! Blocks are copied in batches, each run under the stripe locks that writes take, so a write
//! racing the copy is never lost: it either lands in the reserved file before the copy (and is
//! copied) or in the image after the block is unmapped. Every [`CHECKPOINT`] bytes the image is
//! synced and the merged blocks are journaled as unmapped, so a killed merge resumes from there.

use crate::overlay::Overlay;
use crate::table::Held;
use crate::{StoreError, BLOCK_SIZE};

/// Blocks merged per step (zeroed runs count one block each: they merge as one punch).
const BATCH: u64 = 256;
/// Bytes merged between two checkpoints (sync + journal).
pub const CHECKPOINT: u64 = 64 << 20;

/// Merge progress reported to a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeProgress {
    /// Blocks copied back so far.
    pub merged_blocks: u64,
    /// Blocks still in the reserved file.
    pub remaining_blocks: u64,
}

/// Copies mapped blocks back into the base image until none is left (`Ok(true)`), or until
/// about `limit` blocks were copied (`Ok(false)`; tests use it to simulate a crash mid-merge).
/// The overlay must be merging ([`Overlay::begin_merge`]).
pub fn copy_back(
    overlay: &Overlay,
    limit: Option<u64>,
    mut progress: impl FnMut(MergeProgress),
) -> Result<bool, StoreError> {
    let err = |source| StoreError::Io { what: "merging", path: overlay.reserved().path().to_owned(), source };
    let image = overlay.base();
    let mut merged = 0u64;
    let mut since_checkpoint = 0u64;
    let mut buf = Vec::new();
    loop {
        if limit.is_some_and(|l| merged >= l) {
            return Ok(false);
        }
        let batch = overlay.table().first_runs(BATCH);
        if batch.is_empty() {
            break;
        }
        for run in batch {
            let (start, end) = (run.start, run.start + run.len);
            let _stripes = overlay.lock_stripes(start, end - 1);
            let (from, to) = (start * BLOCK_SIZE, overlay.block_end(end - 1));
            // Under the stripe locks a write may have turned part of a zeroed run into data:
            // what the table says now decides.
            let pieces = overlay.table().pieces(start, end);
            for p in pieces {
                let (a, b) = (p.start * BLOCK_SIZE, overlay.block_end(p.end - 1));
                match p.held {
                    Held::Base => {}
                    Held::Zero => image.zero(a, b - a, true, false).map_err(err)?,
                    Held::Data => {
                        buf.clear();
                        overlay.read_slots(&mut buf, &p).map_err(err)?;
                        image.write_at(&buf, a, false).map_err(err)?;
                    }
                }
            }
            overlay.table().unmap(start, end);
            merged += run.len;
            since_checkpoint += if run.zero { BLOCK_SIZE } else { to - from };
        }
        if since_checkpoint >= CHECKPOINT {
            overlay.sync_overlay().map_err(err)?;
            since_checkpoint = 0;
        }
        progress(MergeProgress { merged_blocks: merged, remaining_blocks: overlay.table().len() });
    }
    overlay.sync_overlay().map_err(err)?;
    Ok(true)
}
