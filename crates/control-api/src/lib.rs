//! The control socket's schema: one type per command's arguments and reply, one per event.
//!
//! `nbd-row-proxy` serves these commands on its QMP-shaped control socket; `row-migrate`, the
//! tests and the benchmarks call them. All of them use the types here, so a renamed or retyped
//! field is a compile error (Rust) or a failed schema check (the generated Python module and
//! the README table, both checked by this crate's tests), never a silent `null`.
//!
//! - [`Command`]: a command's wire name, argument type and reply type. Argument types reject
//!   unknown members, so a typo in a client is an error rather than an ignored option.
//! - [`Event`]: an event's wire name and data type.
//! - [`catalog`]: every command and event with its JSON schema, for documentation.
//!
//! Names on the wire are kebab-case, as in QEMU's QMP.

pub mod catalog;
pub mod commands;
pub mod events;
pub mod types;

pub use catalog::{catalog, CommandInfo, EventInfo};
pub use commands::*;
pub use events::*;
pub use types::*;

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A control-socket command: its name and the types of its arguments and reply.
pub trait Command {
    /// The name clients send in `"execute"`.
    const NAME: &'static str;
    /// What it does, in a sentence or two (for `--help` and the README).
    const DOC: &'static str;
    /// The `"arguments"` object.
    type Args: Serialize + DeserializeOwned + JsonSchema + Send + 'static;
    /// The `"return"` value.
    type Reply: Serialize + DeserializeOwned + JsonSchema + Send + 'static;
}

/// An asynchronous event: its name and the type of its `"data"`.
pub trait Event {
    /// The name in `"event"`.
    const NAME: &'static str;
    /// When it is sent.
    const DOC: &'static str;
    /// The `"data"` object.
    type Data: Serialize + DeserializeOwned + JsonSchema + Send + 'static;
}

/// Arguments of a command that takes none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

/// The empty reply (`{}`) of a command that returns nothing but success.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize, JsonSchema)]
pub struct Empty {}

/// How the control socket's greeting names the server: its `package` starts with this (then a
/// space and the version), which tells it from QEMU's monitor.
pub const GREETING_PACKAGE: &str = "nbd-row-proxy";

/// The environment variable of [`pause_at`].
pub const PAUSE_VAR: &str = "NBD_ROW_PAUSE";

/// A test hook: with `NBD_ROW_PAUSE=point:millis[,point:millis...]` in its environment,
/// `nbd-row-proxy` and `row-migrate` wait that long at the named points of a migration
/// (`final-round`, `update-round`, `postcopy-push`, `before-continue`, `before-complete`), so a fault test can
/// act at an exact moment. Unset, as in production, nothing waits.
pub fn pause_at(point: &str) -> Option<std::time::Duration> {
    let spec = std::env::var(PAUSE_VAR).ok()?;
    spec.split(',')
        .find_map(|p| p.strip_prefix(point)?.strip_prefix(':')?.parse().ok())
        .map(std::time::Duration::from_millis)
}

#[cfg(test)]
mod tests {
    #[test]
    fn pause_points_are_read_from_the_environment() {
        assert_eq!(super::pause_at("nowhere"), None);
        std::env::set_var(super::PAUSE_VAR, "final-round:1500,before-complete:20");
        assert_eq!(super::pause_at("final-round"), Some(std::time::Duration::from_millis(1500)));
        assert_eq!(super::pause_at("before-complete"), Some(std::time::Duration::from_millis(20)));
        assert_eq!(super::pause_at("final"), None);
        std::env::remove_var(super::PAUSE_VAR);
    }
}
