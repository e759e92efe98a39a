//! Every event: a marker type implementing [`Event`] and its data.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Event, IncomingPhase, Phase, RoundKind, RoundStats, Strategy};

macro_rules! event {
    ($ty:ident = $name:literal, $doc:literal, $data:ty) => {
        #[doc = $doc]
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub struct $ty;

        impl Event for $ty {
            const NAME: &'static str = $name;
            const DOC: &'static str = $doc;
            type Data = $data;
        }
    };
}

event!(RowStarted = "ROW_STARTED", "ROW mode began: the image is frozen.", RowStartedData);
event!(RowMergeStarted = "ROW_MERGE_STARTED", "A merge back into the image began.", RowMergeStartedData);
event!(RowMergeProgress = "ROW_MERGE_PROGRESS", "Merge progress, at most every 500 ms.", RowMergeProgressData);
event!(RowStopped = "ROW_STOPPED", "The merge finished: direct mode again.", RowStoppedData);
event!(
    RowMergeFailed = "ROW_MERGE_FAILED",
    "The merge failed; it resumes on the next `row-stop` or restart.",
    ErrorData
);
event!(MigrationState = "MIGRATION_STATE", "The outgoing migration changed phase.", MigrationStateData);
event!(MigrationRoundStarted = "MIGRATION_ROUND_STARTED", "A migration round began.", RoundStartedData);
event!(MigrationRoundCompleted = "MIGRATION_ROUND_COMPLETED", "A migration round was sent.", RoundStats);
event!(MigrationFailed = "MIGRATION_FAILED", "The outgoing migration failed (and was rolled back).", ErrorData);
event!(
    MigrationIncoming = "MIGRATION_INCOMING",
    "On a destination: the incoming migration changed phase or round.",
    IncomingData
);

/// Data of `ROW_STARTED`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct RowStartedData {
    /// ROW session number since the process started.
    pub epoch: u64,
    /// The read-only export of the frozen base.
    pub base_export: String,
}

/// Data of `ROW_MERGE_STARTED`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct RowMergeStartedData {
    /// Blocks to merge.
    pub blocks: u64,
}

/// Data of `ROW_MERGE_PROGRESS`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct RowMergeProgressData {
    /// Blocks merged so far.
    pub merged_blocks: u64,
    /// Blocks still in the overlay.
    pub remaining_blocks: u64,
}

/// Data of `ROW_STOPPED`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct RowStoppedData {
    /// Blocks merged.
    pub merged_blocks: u64,
    /// Seconds the merge took.
    pub seconds: f64,
}

/// Data of the failure events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct ErrorData {
    /// What went wrong.
    pub error: String,
}

/// Data of `MIGRATION_STATE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationStateData {
    /// The new phase.
    pub phase: Phase,
}

/// Data of `MIGRATION_ROUND_STARTED`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct RoundStartedData {
    /// Round number, from 1.
    pub round: u32,
    /// What it carries.
    pub kind: RoundKind,
    /// Blocks it will send.
    pub blocks: u64,
}

/// Data of `MIGRATION_INCOMING`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct IncomingData {
    /// The incoming migration's phase.
    pub phase: IncomingPhase,
    /// The session (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The method, once a session is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
    /// The round arriving, while receiving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<u32>,
    /// Why a session ended without a commit (discarded by the source, or failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}
