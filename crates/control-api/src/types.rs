//! Values shared by several commands and events: modes, phases, strategies, round statistics.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

// The migration's own states and choices live with its state machines; the schema names them.
pub use migration_session::phase::{Fence, IncomingPhase, Phase, PostcopyMode, Strategy};

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
