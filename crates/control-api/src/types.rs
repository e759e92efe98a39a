//! Values shared by several commands and events: modes, phases, strategies, round statistics.

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where the guest's writes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Reads and writes go to the image.
    Direct,
    /// Redirect-on-write: the image is frozen, writes land in the reserved file.
    Row,
    /// Leaving ROW: the reserved file is being merged back into the image.
    Merging,
}

impl Mode {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Row => "row",
            Mode::Merging => "merging",
        }
    }
}

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

/// What a round carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RoundKind {
    /// Round 1: the frozen base (row) or the whole image (bitmap).
    Base,
    /// A pre-copy round after the first, while the guest runs.
    Update,
    /// The last round, with the guest paused.
    Final,
    /// After a post-copy switchover: what the final round left, pushed while the guest runs on
    /// the destination.
    Postcopy,
}

impl RoundKind {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            RoundKind::Base => "base",
            RoundKind::Update => "update",
            RoundKind::Final => "final",
            RoundKind::Postcopy => "postcopy",
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

/// Counters of one migration round: the figures the paper reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct RoundStats {
    /// Round number, from 1.
    pub round: u32,
    /// What it carried.
    pub kind: RoundKind,
    /// Blocks sent (data and zero).
    pub blocks: u64,
    /// Bytes of disk content covered.
    pub logical_bytes: u64,
    /// Of those, bytes sent as zero extents (no payload).
    pub zero_bytes: u64,
    /// Bytes on the wire, frames included.
    pub wire_bytes: u64,
    /// Duration in seconds.
    pub seconds: f64,
}

/// The state of the outgoing migration (`query-migrate`, `migrate-finish`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationStatus {
    /// Where the migration is.
    pub phase: Phase,
    /// The method, once one was started.
    pub strategy: Option<Strategy>,
    /// Session id (hex), once one was started.
    pub session: Option<String>,
    /// Round in progress or last done.
    pub round: u32,
    /// Finished rounds.
    pub rounds: Vec<RoundStats>,
    /// Blocks of the round in progress still to send.
    pub round_remaining_blocks: u64,
    /// Blocks of the round in progress (or last done), for done/total progress.
    #[serde(default)]
    pub round_blocks: u64,
    /// Recent rate on the wire, bytes/s.
    pub rate: f64,
    /// Why it failed.
    pub error: Option<String>,
    /// Seconds since `migrate-start`.
    pub total_seconds: f64,
    /// Logical bytes sent after round 1 (the paper's "update data").
    pub update_logical_bytes: u64,
    /// Wire bytes sent after round 1.
    pub update_wire_bytes: u64,
    /// Logical bytes of all rounds.
    pub total_logical_bytes: u64,
    /// Wire bytes of all rounds.
    pub total_wire_bytes: u64,
    /// Wire bytes of the final round.
    pub final_wire_bytes: u64,
    /// Seconds the final round took (delivered and synced on the destination).
    pub final_seconds: f64,
    /// What `migrate-finish` predicted the final round would take at the measured rate, in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_final_ms: Option<f64>,
    /// A post-copy switchover, once `migrate-finish` decided on one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<PostcopyStatus>,
}

/// How a post-copy goes (`query-migrate` on the source).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct PostcopyStatus {
    /// Why the final round left blocks for after the switchover (`always`, or the prediction).
    pub reason: String,
    /// What the final round would have taken, predicted from the measured rate, in ms.
    pub predicted_final_ms: f64,
    /// Blocks left for after the switchover.
    pub blocks: u64,
    /// Blocks not pushed yet (0 once the destination holds everything).
    pub remaining_blocks: u64,
    /// The destination's fetches answered (reads of blocks not pushed yet).
    pub fetches: u64,
    /// Times the source reconnected to resume the push.
    pub reconnects: u64,
    /// Whether the destination holds every block, durably: the post-copy is over.
    pub done: bool,
    /// Why the push is not moving right now (link down), if it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalled: Option<String>,
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

impl MigrationStatus {
    /// The status before any migration.
    pub fn idle() -> Self {
        Self::new(Phase::Idle, None)
    }

    /// A fresh status in `phase`.
    pub fn new(phase: Phase, strategy: Option<Strategy>) -> Self {
        Self {
            phase,
            strategy,
            session: None,
            round: 0,
            rounds: Vec::new(),
            round_remaining_blocks: 0,
            round_blocks: 0,
            rate: 0.0,
            error: None,
            total_seconds: 0.0,
            update_logical_bytes: 0,
            update_wire_bytes: 0,
            total_logical_bytes: 0,
            total_wire_bytes: 0,
            final_wire_bytes: 0,
            final_seconds: 0.0,
            predicted_final_ms: None,
            postcopy: None,
        }
    }

    /// Recomputes the totals from `rounds`.
    pub fn update_totals(&mut self) {
        let after_first = self.rounds.iter().filter(|r| r.round > 1);
        self.update_logical_bytes = after_first.clone().map(|r| r.logical_bytes).sum();
        self.update_wire_bytes = after_first.map(|r| r.wire_bytes).sum();
        self.total_logical_bytes = self.rounds.iter().map(|r| r.logical_bytes).sum();
        self.total_wire_bytes = self.rounds.iter().map(|r| r.wire_bytes).sum();
        let fin = self.rounds.iter().find(|r| r.kind == RoundKind::Final);
        self.final_wire_bytes = fin.map_or(0, |r| r.wire_bytes);
        self.final_seconds = fin.map_or(0.0, |r| r.seconds);
    }
}

/// Schema of an optional argument that takes a plain number or a string with a unit (`"100MiB"`,
/// `"100mbit"`, `"2s"`; see the `units` crate), as `units::serde`'s helpers read it.
pub(crate) fn number_or_unit_string(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "anyOf": [
            { "type": "integer", "minimum": 0 },
            { "type": "string", "description": "a number with a unit, e.g. \"100MiB\", \"100mbit\", \"2s\"" },
            { "type": "null" }
        ]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_serde() {
        for p in [
            Phase::Idle,
            Phase::Setup,
            Phase::Precopy,
            Phase::Ready,
            Phase::Finishing,
            Phase::HandedOver,
            Phase::Completed,
            Phase::Cancelled,
            Phase::Failed,
        ] {
            assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
        }
        for p in [IncomingPhase::Waiting, IncomingPhase::Receiving, IncomingPhase::Committed, IncomingPhase::Owner] {
            assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
        }
        for m in [Mode::Direct, Mode::Row, Mode::Merging] {
            assert_eq!(serde_json::to_value(m).unwrap(), m.as_str());
        }
        for k in [RoundKind::Base, RoundKind::Update, RoundKind::Final, RoundKind::Postcopy] {
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
        for s in [Strategy::Row, Strategy::Bitmap] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
            assert_eq!(s.as_str().parse::<Strategy>().unwrap(), s);
        }
    }

    #[test]
    fn totals_follow_rounds() {
        let mut s = MigrationStatus::new(Phase::HandedOver, Some(Strategy::Row));
        let round = |round, kind, wire| RoundStats {
            round,
            kind,
            blocks: 1,
            logical_bytes: 4096,
            zero_bytes: 0,
            wire_bytes: wire,
            seconds: 0.5,
        };
        s.rounds = vec![round(1, RoundKind::Base, 100), round(2, RoundKind::Update, 10), round(3, RoundKind::Final, 1)];
        s.update_totals();
        assert_eq!((s.update_wire_bytes, s.total_wire_bytes, s.final_wire_bytes), (11, 111, 1));
        assert_eq!((s.update_logical_bytes, s.total_logical_bytes), (8192, 12288));
        assert_eq!(s.final_seconds, 0.5);
    }
}
