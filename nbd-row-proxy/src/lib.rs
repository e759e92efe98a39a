//! The proxy's parts, as a library so that the fuzz targets and property tests drive the same
//! NBD server, migration endpoints and control handlers the binary runs.

pub mod cli;
pub mod control;
pub mod harness;
pub mod lifecycle;
pub mod migration;
pub mod nbd;
pub mod notify;
pub mod ownership;
pub mod protection;
pub mod proxy;
pub mod server;
pub mod state;
pub mod sync;
pub mod tls;
pub mod written_blocks;
