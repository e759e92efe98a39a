//! The disk behind `nbd-row-proxy`: a raw image with a redirect-on-write (ROW) overlay.
//!
//! In *direct* mode reads and writes go to the image. `row_start` freezes the image: every
//! later write, TRIM and WRITE_ZEROES lands in a *reserved file* beside it and is recorded in a
//! mapping table with a write count and generation per block, so the frozen base and the
//! updates can be shipped separately (the paper's §2.3–2.5). `row_stop` merges the updates
//! back while serving, and deletes the overlay.
//!
//! # Layout: a log of slots
//! The reserved file is a sequence of 4 KiB *slots* handed out in write order; the mapping
//! table says which slot holds each updated block (see [`table`]). A block's first write takes
//! the next slot, a rewrite goes back to its own slot, a zeroed block has none.
//!
//! We started with the paper's identity-mapped sparse file (block *b* at offset *b* × 4 KiB)
//! and left it because of what a FLUSH costs: scattered first writes allocate scattered holes,
//! and on ext4 200,000 of them took 62 s to sync where the same writes appended took 0.7 s.
//! Slots keep the identity layout's good parts: a hot block is rewritten in place, so the file
//! grows with the distinct blocks written, not with every write, and needs no garbage
//! collection; a read of a mapped block is still one `pread`. Their price is 4 bytes more per
//! run in the table, and that a block zeroed and written again takes a new slot (the old one is
//! punched, and slots are never reused within a session, so a crash can never show one block's
//! data in another).
//!
//! Like the raw image itself, a block's content after a crash is one whole version of it (4 KiB
//! blocks match the page size, so a killed process never leaves a torn block). Journals of the
//! identity layout (versions 1 and 2) are read as slots equal to block numbers and rewritten in
//! the current version once.
//!
//! # Granularity: 4 KiB
//! Migration resends whole tracking blocks. Guests write 4 KiB pages; at 64 KiB (QEMU's dirty
//! granularity) every 4 KiB write costs 64 KiB on the wire, which is why QEMU's mirror fails to
//! converge under a 200 writes/s hot set on a 100 Mbit/s link (measured, see issue 6). The cost
//! of 4 KiB is metadata: one table entry per updated block (see [`table`]).
//! Writes smaller than a block are copied up: the rest of the block comes from the base.
//!
//! # Durability
//! The mapping lives in memory and in an append-only journal (`RESERVED.map`). A FLUSH (or
//! FUA) syncs the reserved file (mostly appended slots: a sequential sync), then journals the
//! blocks mapped since the last flush with their slots, then syncs the journal, and only then
//! is acknowledged. After a crash the journal is replayed:
//! every block mapped before the last completed flush comes back; blocks written after it fall
//! back to their earlier content, as unflushed writes may. Write counts restart at one.
//!
//! # Merge back
//! `begin_merge` journals the decision, then `merge` copies mapped blocks into the image in
//! batches, each under the stripe locks that writes take, so a write racing the copy is never
//! lost. Every 64 MiB the image is synced and the merged blocks are journaled as unmapped; a
//! killed merge resumes from there on the next open.

pub mod backend;
pub mod disk;
pub mod image;
pub mod journal;
pub mod merge;
pub mod overlay;
pub mod reserved;
pub mod storage;
pub mod table;
pub mod tracking;

use std::path::PathBuf;

pub use backend::{BlockBackend, Caps, MemDisk, ZeroFlags};
pub use disk::{Disk, DiskOptions, FrozenBase, RowStatus};
pub use image::Image;
pub use merge::MergeProgress;
pub use storage::{Extent, LockMode, Posix, SimStorage, Storage};
pub use table::{Held, Segment, WrittenRun, MAX_WRITES};

/// Tracking granularity and the unit of copy-up (see the crate docs for why 4 KiB). Every
/// layer above (NBD, migration) uses this one constant.
pub const BLOCK_SIZE: u64 = 4096;

/// Which way writes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Reads and writes go to the image.
    Direct,
    /// The image is frozen; writes land in the reserved file.
    Row,
    /// Leaving ROW: reserved blocks are being copied back into the image.
    Merging,
}

impl Mode {
    /// Lower-case name for logs and the control socket.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Row => "row",
            Mode::Merging => "merging",
        }
    }
}

/// Errors opening a disk or changing its mode.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The journal cannot be used.
    #[error("journal {} cannot be used: {why}", path.display())]
    BadJournal {
        /// The journal file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The operation does not fit the current mode.
    #[error("{0}")]
    Mode(String),
    /// A file at an overlay path is not what it must be there; nothing was changed.
    #[error("{}: {why}", path.display())]
    Refused {
        /// The file.
        path: PathBuf,
        /// What is wrong, and what the operator can do.
        why: String,
    },
}
