//! Exports: what a client can select by name during negotiation.
//!
//! Each served disk has a live export (`NAME`, and the empty name) and, while ROW is on, a
//! read-only export of the frozen base (`NAME@base`) for consistent backups with the VM running.

use std::io;
use std::sync::Arc;

use nbd_proto::consts::*;
use row_store::{Disk, Extent, Mode};
use tokio::sync::watch;

/// Smallest request granularity advertised (and enforced for clients that asked for it).
pub const MIN_BLOCK_SIZE: u32 = 512;
/// The block size that avoids read-modify-write in the layers below.
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;
/// Largest READ or WRITE payload accepted.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Suffix of the frozen-base export's name.
pub const BASE_SUFFIX: &str = "@base";

/// Whether the disk may be used yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Ordinary service.
    Open,
    /// A migration to this host has not committed yet: reads wait, writes are refused.
    Incoming,
}

/// Which view of the disk an export shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// The disk as the guest sees it.
    Live,
    /// The image frozen by the ROW session with this epoch.
    Base {
        /// ROW session the export belongs to.
        epoch: u64,
    },
}

/// One named export.
#[derive(Debug)]
pub struct Export {
    /// Name clients select it by.
    pub name: String,
    /// Human-readable description sent as `NBD_INFO_DESCRIPTION`.
    pub description: String,
    /// The disk.
    pub disk: Arc<Disk>,
    /// Live disk or frozen base.
    pub view: View,
    /// Whether writes are refused.
    pub read_only: bool,
    /// Whether the disk may be used yet (see [`Access`]).
    pub access: watch::Receiver<Access>,
    /// How long a read waits for an incoming migration to commit before it fails.
    pub read_wait: std::time::Duration,
}

impl Export {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.disk.size()
    }

    /// Transmission flags advertised for this export.
    pub fn transmission_flags(&self) -> u16 {
        let mut flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_DF | NBD_FLAG_CAN_MULTI_CONN | NBD_FLAG_SEND_CACHE;
        if self.read_only {
            flags |= NBD_FLAG_READ_ONLY;
        } else {
            flags |= NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
        }
        flags
    }

    /// Minimum block size: sector granularity unless the size is not a whole number of sectors.
    pub fn min_block_size(&self) -> u32 {
        if self.size() % MIN_BLOCK_SIZE as u64 == 0 {
            MIN_BLOCK_SIZE
        } else {
            1
        }
    }

    /// Appends `len` bytes at `offset` to `out`.
    pub fn read_append(&self, out: &mut Vec<u8>, len: usize, offset: u64) -> io::Result<()> {
        match self.view {
            View::Live => self.disk.read_append(out, len, offset),
            View::Base { epoch } => self.disk.read_base_append(out, len, offset, epoch),
        }
    }

    /// Extents for block status and hole detection.
    pub fn extents(&self, offset: u64, len: u64, max: usize) -> io::Result<Vec<Extent>> {
        match self.view {
            View::Live => self.disk.extents(offset, len, max),
            View::Base { epoch } => self.disk.base_extents(offset, len, max, epoch),
        }
    }

    /// Whether looking for holes in a read is cheap enough to be worth it.
    pub fn holes_are_cheap(&self) -> bool {
        match self.view {
            View::Live => self.disk.holes_are_cheap(),
            View::Base { .. } => true,
        }
    }

    /// Writes at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.live()?.write_at(buf, offset, fua)
    }

    /// Zeroes a range.
    pub fn write_zeroes(&self, offset: u64, len: u64, may_punch: bool, fast_only: bool, fua: bool) -> io::Result<()> {
        self.live()?.write_zeroes(offset, len, may_punch, fast_only, fua)
    }

    /// Discards a range.
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.live()?.trim(offset, len, fua)
    }

    /// Makes completed writes durable.
    pub fn flush(&self) -> io::Result<()> {
        match self.view {
            View::Live => self.disk.flush(),
            View::Base { .. } => Ok(()),
        }
    }

    /// Prefetches a range.
    pub fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.disk.cache(offset, len)
    }

    fn live(&self) -> io::Result<&Disk> {
        match self.view {
            View::Live if !self.read_only => Ok(&self.disk),
            // The base view is read-only too (requests are refused before they get here).
            View::Live | View::Base { .. } => Err(io::Error::from_raw_os_error(libc::EPERM)),
        }
    }
}

/// The exports of one disk; the live one is the default (empty name).
#[derive(Debug, Clone)]
pub struct Catalog {
    name: String,
    disk: Arc<Disk>,
    live: Arc<Export>,
}

impl Catalog {
    /// A catalog for one disk exported as `name`.
    pub fn new(
        name: String,
        disk: Arc<Disk>,
        read_only: bool,
        access: watch::Receiver<Access>,
        read_wait: std::time::Duration,
    ) -> Self {
        let live = Arc::new(Export {
            name: name.clone(),
            description: format!("{} ({} bytes)", disk.image_path().display(), disk.size()),
            disk: disk.clone(),
            view: View::Live,
            read_only,
            access,
            read_wait,
        });
        Self { name, disk, live }
    }

    /// The live export.
    pub fn live(&self) -> &Arc<Export> {
        &self.live
    }

    /// The frozen-base export, while ROW is on.
    fn base(&self) -> Option<Arc<Export>> {
        let status = self.disk.status();
        (status.mode == Mode::Row).then(|| {
            Arc::new(Export {
                name: format!("{}{BASE_SUFFIX}", self.name),
                description: format!("frozen base of {} (ROW session {})", self.disk.image_path().display(), status.epoch),
                disk: self.disk.clone(),
                view: View::Base { epoch: status.epoch },
                read_only: true,
                access: self.live.access.clone(),
                read_wait: self.live.read_wait,
            })
        })
    }

    /// Looks an export up by name; the empty name selects the live export.
    pub fn find(&self, name: &str) -> Option<Arc<Export>> {
        if name.is_empty() || name == self.name {
            return Some(self.live.clone());
        }
        if name.strip_suffix(BASE_SUFFIX) == Some(self.name.as_str()) {
            return self.base();
        }
        None
    }

    /// Every export available now, live first.
    pub fn all(&self) -> Vec<Arc<Export>> {
        std::iter::once(self.live.clone()).chain(self.base()).collect()
    }
}
