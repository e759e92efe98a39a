//! Exports: what a client can select by name during negotiation.
//!
//! Each served disk has a live export (`NAME`, and the empty name) and, while ROW is on, a
//! read-only export of the frozen base (`NAME@base`) for consistent backups with the VM running.
//! An export is a [`BlockBackend`] and a name; its transmission flags follow from what the
//! backend says it can do.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;

use nbd_proto::consts::*;
use nbd_proto::Command;
use row_store::{BlockBackend, Disk};

/// Smallest request granularity advertised (and enforced for clients that asked for it).
pub const MIN_BLOCK_SIZE: u32 = 512;
/// The block size that avoids read-modify-write in the layers below.
pub const PREFERRED_BLOCK_SIZE: u32 = row_store::BLOCK_SIZE as u32;
/// Largest READ or WRITE payload accepted.
pub const MAX_REQUEST_LEN: u32 = 32 << 20;
/// Suffix of the frozen-base export's name.
pub const BASE_SUFFIX: &str = "@base";

/// One named export.
#[derive(Debug)]
pub struct Export {
    /// Name clients select it by.
    pub name: String,
    /// Human-readable description sent as `NBD_INFO_DESCRIPTION`.
    pub description: String,
    /// What serves the requests.
    pub backend: Arc<dyn BlockBackend>,
    /// On a migration destination: what a request waits for before it runs (blocks that are
    /// still at the source).
    pub pull: Option<Arc<dyn Pull>>,
}

/// What a request must wait for before it runs: an answer from the migration source.
pub type PullFuture = Pin<Box<dyn Future<Output = io::Result<Option<Vec<u8>>>> + Send>>;

/// A disk whose blocks may still be at a migration source (a destination before the commit,
/// or during post-copy): some requests wait for the source first.
pub trait Pull: Send + Sync + std::fmt::Debug {
    /// `None`: run the request now. Otherwise a future to await first, whose `Ok(Some(data))`
    /// answers a READ with these bytes, `Ok(None)` lets the request run, and `Err` fails it.
    fn before(&self, command: Command, offset: u64, len: u64) -> Option<PullFuture>;

    /// A client entered its transmission phase on this export; the connection keeps what is
    /// returned until it ends.
    fn attach(&self) -> Option<Attachment> {
        None
    }
}

/// Kept by a connection for as long as its transmission phase lasts; dropping it says the
/// client left.
pub struct Attachment(Option<Box<dyn FnOnce() + Send>>);

impl Attachment {
    /// An attachment that runs `on_leave` when the client leaves.
    pub fn new(on_leave: impl FnOnce() + Send + 'static) -> Self {
        Self(Some(Box::new(on_leave)))
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        if let Some(on_leave) = self.0.take() {
            on_leave();
        }
    }
}

impl Export {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.backend.size()
    }

    /// Whether writes are refused for good (not just while a migration arrives).
    pub fn read_only(&self) -> bool {
        !self.backend.caps().write
    }

    /// Transmission flags advertised for this export, from the backend's capabilities.
    pub fn transmission_flags(&self) -> u16 {
        let caps = self.backend.caps();
        let mut flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_DF;
        for (cap, flag) in [
            (caps.flush, NBD_FLAG_SEND_FLUSH),
            (caps.multi_conn, NBD_FLAG_CAN_MULTI_CONN),
            (caps.cache, NBD_FLAG_SEND_CACHE),
            (!caps.write, NBD_FLAG_READ_ONLY),
            (caps.fua, NBD_FLAG_SEND_FUA),
            (caps.trim, NBD_FLAG_SEND_TRIM),
            (caps.zeroes, NBD_FLAG_SEND_WRITE_ZEROES),
            (caps.fast_zero, NBD_FLAG_SEND_FAST_ZERO),
        ] {
            if cap {
                flags |= flag;
            }
        }
        flags
    }

    /// Minimum block size: sector granularity unless the size is not a whole number of sectors.
    pub fn min_block_size(&self) -> u32 {
        if self.size().is_multiple_of(MIN_BLOCK_SIZE as u64) {
            MIN_BLOCK_SIZE
        } else {
            1
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
    /// A catalog for one disk exported as `name`, the live export served by `live`.
    pub fn new(name: String, disk: Arc<Disk>, live: Arc<dyn BlockBackend>, pull: Option<Arc<dyn Pull>>) -> Self {
        let live = Arc::new(Export {
            name: name.clone(),
            // The export's name, never the image's path: NBD clients may be remote.
            description: format!("nbd-row-proxy export {name:?} ({} bytes)", disk.size()),
            backend: live,
            pull,
        });
        Self { name, disk, live }
    }

    /// The frozen-base export, while ROW is on.
    fn base(&self) -> Option<Arc<Export>> {
        let base = self.disk.frozen_base()?;
        Some(Arc::new(Export {
            name: format!("{}{BASE_SUFFIX}", self.name),
            description: format!("frozen base of export {:?} (ROW session {})", self.name, base.epoch()),
            backend: Arc::new(base),
            pull: None,
        }))
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
