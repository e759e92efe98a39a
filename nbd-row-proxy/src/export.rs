//! Exports: what a client can select by name during negotiation.

use std::sync::Arc;

use nbd_proto::consts::*;

use crate::image::Image;

/// Smallest request granularity advertised (and enforced for clients that asked for it).
pub const MIN_BLOCK_SIZE: u32 = 512;
/// The block size that avoids read-modify-write in the layers below.
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;
/// Largest READ or WRITE payload accepted.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// One named export over an image.
#[derive(Debug)]
pub struct Export {
    /// Name clients select it by.
    pub name: String,
    /// Human-readable description sent as `NBD_INFO_DESCRIPTION`.
    pub description: String,
    /// The backing image.
    pub image: Arc<Image>,
    /// Whether writes are refused.
    pub read_only: bool,
}

impl Export {
    /// Transmission flags advertised for this export.
    pub fn transmission_flags(&self) -> u16 {
        let mut flags = NBD_FLAG_HAS_FLAGS
            | NBD_FLAG_SEND_FLUSH
            | NBD_FLAG_SEND_DF
            | NBD_FLAG_CAN_MULTI_CONN
            | NBD_FLAG_SEND_CACHE;
        if self.read_only {
            flags |= NBD_FLAG_READ_ONLY;
        } else {
            flags |= NBD_FLAG_SEND_FUA
                | NBD_FLAG_SEND_TRIM
                | NBD_FLAG_SEND_WRITE_ZEROES
                | NBD_FLAG_SEND_FAST_ZERO;
        }
        flags
    }

    /// Minimum block size: sector granularity unless the size is not a whole number of sectors.
    pub fn min_block_size(&self) -> u32 {
        if self.image.size() % MIN_BLOCK_SIZE as u64 == 0 {
            MIN_BLOCK_SIZE
        } else {
            1
        }
    }
}

/// Every export a server offers; the first is the default (empty name).
#[derive(Debug, Clone)]
pub struct Catalog {
    exports: Vec<Arc<Export>>,
}

impl Catalog {
    /// A catalog; `exports` must not be empty.
    pub fn new(exports: Vec<Arc<Export>>) -> Self {
        assert!(!exports.is_empty(), "a catalog needs at least one export");
        Self { exports }
    }

    /// Looks an export up by name; the empty name selects the default export.
    pub fn find(&self, name: &str) -> Option<&Arc<Export>> {
        if name.is_empty() {
            return self.exports.first();
        }
        self.exports.iter().find(|e| e.name == name)
    }

    /// All exports, default first.
    pub fn all(&self) -> &[Arc<Export>] {
        &self.exports
    }
}
