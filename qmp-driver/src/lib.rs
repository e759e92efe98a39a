//! Async QMP client for QEMU and for our proxies' control sockets.
//!
//! [`Qmp`] wraps [`qmp_proto::Client`] (greeting, `qmp_capabilities`, one command at a time
//! with a timeout, events kept in order) and adds:
//!
//! - typed commands from the [`qapi`] crate ([`Qmp::execute`]), whose replies are decoded
//!   leniently into [`Decoded`]: typed when they fit, raw JSON plus the decode error when
//!   not; and raw commands by name ([`Qmp::execute_raw`]);
//! - events as [`QemuEvent`]: name, timestamp and raw data always, the typed
//!   [`qapi::qmp::Event`] when it decodes; [`Qmp::wait_event`] keeps the events it passes
//!   over;
//! - helpers for what a migration driver needs ([`Qmp::query_status`], [`Qmp::migrate`],
//!   [`Qmp::query_migrate`], ...), each checked against QEMU 7.2 and documented as typed or
//!   raw;
//! - [`Features`] ([`Qmp::features`]): what the QEMU in front of us offers, read from its
//!   QMP schema (`block-job-change`, migration capabilities and parameters, `migrate`'s
//!   arguments, `nbd-server-start`'s address form), so callers decide by what a QEMU accepts
//!   and not by its version number.
//!
//! The `qapi` types follow QEMU 9.x, while the QEMU here is 7.2: it sends enum values they
//! lack (`query-migrate-capabilities` lists `block` and `compress`), omits fields they require
//! (`query-block-jobs` lacks `actively-synced` for mirror jobs), and any QEMU may send events
//! they do not know. None of that is an error here: what does not decode is kept as raw
//! JSON, logged (`tracing` `warn` for a known shape that did not fit, `debug` for an unknown
//! event), and the connection goes on.
//!
//! ```no_run
//! # async fn demo() -> Result<(), qmp_driver::QmpError> {
//! use std::time::Duration;
//! use qmp_driver::{qapi::qmp, Qmp};
//!
//! let mut qmp = Qmp::connect("/tmp/src.qmp", Duration::from_secs(5)).await?;
//! qmp.set_timeout(Duration::from_secs(10));
//! qmp.migrate_set_capabilities(&[("events", true), ("pause-before-switchover", true)]).await?;
//! qmp.migrate("unix:/tmp/mig.sock").await?;
//! let pre = qmp.wait_migration_event(Duration::from_secs(60), &["pre-switchover", "failed"]).await?;
//! println!("{:?} at {:?}", pre.migration_status(), pre.timestamp);
//! qmp.migrate_continue("pre-switchover").await?;
//! let version = qmp.execute(qmp::query_version {}).await?; // Decoded::Typed or ::Raw
//! println!("{}", version.raw());
//! # Ok(()) }
//! ```

pub mod client;
pub mod commands;
pub mod decoded;
pub mod domain_xml;
pub mod error;
pub mod event;
pub mod features;
pub mod proxy;

pub use client::{Peer, Qmp, DEFAULT_COMMAND_TIMEOUT};
pub use commands::{parse_capabilities, BlockJob, CapabilityState, MigrationInfo, VmStatus};
pub use decoded::Decoded;
pub use error::QmpError;
pub use event::QemuEvent;
pub use features::{AddrForm, Features, Support};
pub use proxy::{DiskMigration, DiskMigrationError};
pub use qapi;
pub use qmp_proto::{CommandError, ErrorClass, Greeting, Timestamp, Version};
