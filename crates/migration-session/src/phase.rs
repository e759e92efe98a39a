//! The migration's states and choices, owned by the state machines that move between them:
//! the source's and destination's phases, the strategy, the post-copy mode and the fence a
//! hand-over leaves. The control API's schema shows them as they are (their serde and JSON
//! schema derives are its wire form).

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How the source finds what to send after round 1.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Redirect-on-write (the paper's method): base, cold updates, then the rest while paused.
    #[default]
    Row,
    /// Dirty bitmap (QEMU's old block migration): the whole disk, then what was dirtied.
    Bitmap,
}

impl Strategy {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Row => "row",
            Strategy::Bitmap => "bitmap",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Strategy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "row" => Ok(Strategy::Row),
            "bitmap" => Ok(Strategy::Bitmap),
            other => Err(format!("unknown strategy {other:?} (expected row or bitmap)")),
        }
    }
}

/// Where an outgoing migration is (the source's session state machine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// No migration has been started since the proxy started.
    Idle,
    /// Connecting to the destination and authenticating.
    Setup,
    /// Pre-copy rounds running while the guest runs.
    Precopy,
    /// Pre-copy done: waiting for `migrate-finish` (with the guest paused).
    Ready,
    /// Writes refused; the final round is on its way and the destination's commit awaited.
    Finishing,
    /// The destination committed the disk durably; the source refuses writes.
    HandedOver,
    /// `migrate-complete` ended the session: the destination owns the disk.
    Completed,
    /// Cancelled before the hand-over; the source owns the disk again.
    Cancelled,
    /// Failed before the hand-over and rolled back; the source owns the disk again.
    Failed,
}

impl Phase {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Setup => "setup",
            Phase::Precopy => "precopy",
            Phase::Ready => "ready",
            Phase::Finishing => "finishing",
            Phase::HandedOver => "handed-over",
            Phase::Completed => "completed",
            Phase::Cancelled => "cancelled",
            Phase::Failed => "failed",
        }
    }

    /// Whether a migration in this phase is still under way (a new one cannot start).
    pub fn is_active(self) -> bool {
        matches!(self, Phase::Setup | Phase::Precopy | Phase::Ready | Phase::Finishing)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an incoming migration is (the destination's session state machine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum IncomingPhase {
    /// No session, or the last one was discarded: writes refused, reads wait.
    Waiting,
    /// A session is sending rounds: writes refused, reads wait.
    Receiving,
    /// The disk is complete and durable here; served read-write. The source may still take it
    /// back (`migrate-cancel`) until this host's first write makes it the owner.
    Committed,
    /// This host owns the disk: it accepted a write after the commit, or the source completed.
    Owner,
}

impl IncomingPhase {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            IncomingPhase::Waiting => "waiting",
            IncomingPhase::Receiving => "receiving",
            IncomingPhase::Committed => "committed",
            IncomingPhase::Owner => "owner",
        }
    }
}

impl fmt::Display for IncomingPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why this proxy refuses writes to its disk, persisted so that a restart keeps refusing them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct Fence {
    /// The reason, for people.
    pub reason: String,
    /// When writes started to be refused (RFC 3339, UTC).
    pub since: String,
    /// The migration session the disk was handed over in (hex).
    pub session: String,
    /// The destination it went to (`tcp:HOST:PORT`).
    pub peer: String,
    /// The source's phase when the fence was last written.
    pub phase: Phase,
}

/// When `migrate-finish` may leave blocks for after the switchover.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum PostcopyMode {
    /// Never: the final round sends everything, however long it takes.
    Never,
    /// When the final round would not fit the budget at the measured rate.
    #[default]
    Auto,
    /// Always, when anything is left.
    Always,
}
