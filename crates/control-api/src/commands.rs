//! Every command: a marker type implementing [`Command`], its arguments and its reply.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Command, Empty, Fence, IncomingPhase, MigrationStatus, Mode, NoArgs, PostcopyMode, Strategy};

macro_rules! command {
    ($ty:ident = $name:literal, $doc:literal, $args:ty => $reply:ty) => {
        #[doc = $doc]
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub struct $ty;

        impl Command for $ty {
            const NAME: &'static str = $name;
            const DOC: &'static str = $doc;
            type Args = $args;
            type Reply = $reply;
        }
    };
}

command!(
    QueryStatus = "query-status",
    "The disk, its mode and overlay, and who may write to it.",
    NoArgs => StatusReply
);
command!(
    RowStart = "row-start",
    "Freezes the image: from now on writes land in the reserved file (event `ROW_STARTED`).",
    NoArgs => Empty
);
command!(
    RowStop = "row-stop",
    "Merges the overlay back into the image while serving, then returns to direct mode (events \
     `ROW_MERGE_STARTED`, `ROW_MERGE_PROGRESS`, `ROW_STOPPED` or `ROW_MERGE_FAILED`).",
    RowStopArgs => RowStopReply
);
command!(
    QueryRow = "query-row",
    "The overlay's write statistics: updated, hot and cold blocks.",
    QueryRowArgs => RowReport
);
command!(
    MigrateStart = "migrate-start",
    "Starts migrating the disk to a `receive` proxy: pre-copy rounds in the background.",
    MigrateStartArgs => MigrateStartReply
);
command!(
    QueryMigrate = "query-migrate",
    "The outgoing migration's phase and per-round figures.",
    NoArgs => MigrationStatus
);
command!(
    MigrateFinish = "migrate-finish",
    "With the guest paused: refuses writes (persistently), sends what is outstanding, and returns once \
     the destination has committed it durably (phase `handed-over`). With post-copy (`postcopy`: \
     `always`, or `auto` when the final round would not fit `budget-ms`), blocks are left out, the \
     destination serves the disk at once and fetches them when read, and the source pushes them \
     until the destination holds all (`query-migrate`'s `postcopy`); `migrate-complete` waits for that.",
    MigrateFinishArgs => MigrationStatus
);
command!(
    MigrateCancel = "migrate-cancel",
    "Gives the disk back to the source: before the hand-over at any time; after it only if the \
     destination agrees that it has not written to the disk yet. Refused otherwise.",
    NoArgs => Empty
);
command!(
    MigrateComplete = "migrate-complete",
    "After the switchover: ends the session; the destination owns the disk (phase `completed`). The \
     source keeps refusing writes.",
    NoArgs => Empty
);
command!(
    Reclaim = "reclaim",
    "Takes back a disk whose writes are refused because it was handed over: without `force` only if the \
     destination confirms it has not written to it; with `force` unconditionally, for an operator who \
     knows the destination is gone.",
    ReclaimArgs => Empty
);
command!(
    ReloadProtection = "reload-protection",
    "Reads the migration streams' protection again: the TLS credentials directory and the key file, \
     at the paths given (absolute) or at the current ones (SIGHUP does the same). Every file is checked as \
     at start-up before the next connection uses it; on any error nothing changes. NBD clients are not \
     touched; a migration under way keeps its connection.",
    ReloadProtectionArgs => ProtectionReply
);
command!(
    QueryDigest = "query-digest",
    "SHA-256 of the disk as the guest sees it, to compare two hosts' copies.",
    NoArgs => DigestReply
);
command!(
    QueryDiskDigests = "query-disk-digests",
    "SHA-256 digests of a range of the disk as the guest sees it, one per unit, of the blocks not \
     left out: given ones, and on request (a destination) those the guest wrote here since the \
     migration committed. How `row-migrate --verify-disk` compares both hosts' copies after the \
     switchover, while the guest runs.",
    DiskDigestsArgs => DiskDigestsReply
);

/// Reply of `query-status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct StatusReply {
    /// Where writes go.
    pub mode: Mode,
    /// The export's name.
    pub export: String,
    /// The image path.
    pub image: String,
    /// Disk size in bytes.
    pub image_size: u64,
    /// Whether the export is read-only.
    pub read_only: bool,
    /// The reserved file, while ROW is on.
    pub reserved: Option<String>,
    /// Logical bytes in the reserved file.
    pub reserved_bytes: u64,
    /// Bytes the reserved file occupies on disk.
    pub reserved_allocated: u64,
    /// Tracking granularity in bytes.
    pub block_size: u64,
    /// Whether the disk is still arriving by migration (writes refused, reads wait).
    pub incoming: bool,
    /// On a `receive` proxy: the incoming migration's phase.
    pub incoming_phase: Option<IncomingPhase>,
    /// Why writes are refused, if they are.
    pub writes_refused: Option<String>,
    /// The persisted hand-over that makes this proxy refuse writes, if any.
    pub fence: Option<Fence>,
    /// The long task under way (a merge back, or an outgoing migration's round), for any client
    /// at any time; absent when there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// On a destination during (or after) a post-copy: the blocks still at the source and how
    /// long requests waited for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<IncomingPostcopy>,
    /// What protects the migration streams now (`reload-protection` and SIGHUP change it).
    #[serde(default)]
    pub protection: String,
}

/// A destination's post-copy as `query-status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct IncomingPostcopy {
    /// Blocks this host does not hold yet (0 once the post-copy is over).
    pub missing_blocks: u64,
    /// Whether a session connection to the source is up (fetches can be answered).
    pub link_up: bool,
    /// Guest requests that waited for blocks from the source.
    pub waits: u64,
    /// Their longest wait, ms.
    pub wait_max_ms: f64,
    /// Their mean wait, ms.
    pub wait_mean_ms: f64,
    /// Bytes that arrived from the source after the switchover.
    pub received_bytes: u64,
}

/// How far a long task is: done and total bytes, the recent rate and the estimated time left.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct Progress {
    /// What is under way: `merge-back`, or `migration round N (base|update|final)`.
    pub task: String,
    /// Bytes done.
    pub done_bytes: u64,
    /// Bytes in all.
    pub total_bytes: u64,
    /// Recent rate, bytes/s (0 before the first measurement).
    pub rate: f64,
    /// Estimated seconds left at that rate; absent while the rate is unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,
}

impl Progress {
    /// Progress of `total_bytes` with `done_bytes` done at `rate` bytes/s; the ETA follows.
    pub fn new(task: String, done_bytes: u64, total_bytes: u64, rate: f64) -> Self {
        let left = total_bytes.saturating_sub(done_bytes) as f64;
        let eta_seconds = (rate > 0.0).then(|| left / rate);
        Self { task, done_bytes, total_bytes, rate, eta_seconds }
    }
}

/// Arguments of `row-stop`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RowStopArgs {
    /// Wait for the merge to finish before replying.
    #[serde(default = "yes")]
    pub wait: bool,
}

impl Default for RowStopArgs {
    fn default() -> Self {
        Self { wait: true }
    }
}

/// Reply of `row-stop`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct RowStopReply {
    /// Blocks merged back (0 when not waiting).
    pub merged_blocks: u64,
    /// Seconds the merge took, when waited for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
}

/// Arguments of `query-row`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct QueryRowArgs {
    /// Writes that make a block hot (default: the server's `--hot-threshold`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hot_threshold: Option<u32>,
}

/// Reply of `query-row`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct RowReport {
    /// Where writes go.
    pub mode: Mode,
    /// Blocks in the overlay.
    pub blocks_updated: u64,
    /// Blocks written at least `hot-threshold` times.
    pub hot_blocks: u64,
    /// The other updated blocks.
    pub cold_blocks: u64,
    /// The threshold used.
    pub hot_threshold: u32,
    /// The write epoch (it advances each time a migration marks what it has read).
    pub generation: u64,
    /// Logical bytes in the reserved file.
    pub reserved_bytes: u64,
    /// Tracking granularity in bytes.
    pub block_size: u64,
    /// Runs of blocks the mapping holds: its memory follows them, not the blocks.
    #[serde(default)]
    pub map_runs: u64,
    /// Memory the mapping holds, in bytes.
    #[serde(default)]
    pub map_bytes: u64,
}

/// Arguments of `migrate-start`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MigrateStartArgs {
    /// The destination's `receive --listen` address, `tcp:HOST:PORT`.
    pub uri: String,
    /// The method.
    #[serde(default)]
    pub strategy: Strategy,
    /// Pre-copy rounds before the final one, round 1 included (row 2, bitmap 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rounds: Option<u32>,
    /// Writes that make a block hot (row; default: the server's `--hot-threshold`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hot_threshold: Option<u32>,
    /// Cap on the stream: bytes/s, or a string like `"100mbit"`, `"12MiB/s"` (unlimited by
    /// default).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "units::serde::opt_rate")]
    #[schemars(schema_with = "crate::types::number_or_unit_string")]
    pub max_bandwidth: Option<u64>,
    /// lz4-compress data frames.
    #[serde(default = "yes")]
    pub compress: bool,
    /// Bitmap: dirty granularity in bytes, or a string like `"64KiB"` (default 1 MiB, as QEMU's old
    /// block migration).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "units::serde::opt_size")]
    #[schemars(schema_with = "crate::types::number_or_unit_string")]
    pub bitmap_granularity: Option<u64>,
    /// Row: settle passes keep the final round under this many milliseconds, or a string like
    /// `"50ms"`, `"1s"`, at the link's rate (default 50; 0 = the paper's three rounds).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "units::serde::opt_millis")]
    #[schemars(schema_with = "crate::types::number_or_unit_string")]
    pub final_budget_ms: Option<u64>,
    /// With TLS: the name the destination's certificate must carry (default: the URI's host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_hostname: Option<String>,
    /// Armed for a hand-over that follows a VM manager's own live migration (such as `virsh
    /// migrate --live` over shared storage): once the pre-copy is ready, the destination's
    /// first write (its guest runs, so the source QEMU is inactive) takes the disk; this proxy
    /// then refuses writes, sends what is left by post-copy and completes by itself. Without
    /// it such a write is refused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub arm: bool,
}

/// `migrate-finish`'s arguments (all optional: `{}` sends everything, as before).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MigrateFinishArgs {
    /// Whether blocks may be left for after the switchover (default `never`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<PostcopyMode>,
    /// What the final round may take (with `postcopy: auto`), in ms or a string like `"200ms"`
    /// (default: the session's `final-budget-ms`).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "units::serde::opt_millis")]
    #[schemars(schema_with = "crate::types::number_or_unit_string")]
    pub budget_ms: Option<u64>,
}

/// Most pre-copy rounds `migrate-start` takes (`rounds`).
pub const MAX_ROUNDS: u32 = 100;
/// Largest dirty granularity `migrate-start` takes (`bitmap-granularity`).
pub const MAX_BITMAP_GRANULARITY: u64 = 1 << 30;
/// Longest final-round budget `migrate-start` and `migrate-finish` take (`final-budget-ms`,
/// `budget-ms`): a day.
pub const MAX_BUDGET_MS: u64 = 24 * 60 * 60 * 1000;

fn check_budget(name: &str, ms: Option<u64>) -> Result<(), String> {
    match ms {
        Some(ms) if ms > MAX_BUDGET_MS => {
            Err(format!("{name} {ms} is out of range: at most {MAX_BUDGET_MS} ms (a day)"))
        }
        _ => Ok(()),
    }
}

impl MigrateStartArgs {
    /// Checks every number, with a message that names the argument and its range: `rounds` 1 to
    /// [`MAX_ROUNDS`]; `max-bandwidth` at least 1 byte/s (a rate that rounds to 0, such as
    /// `"1bit"`, is an error, not "unlimited"); `bitmap-granularity` a power of two from
    /// `block_size` (the server's tracking block) to [`MAX_BITMAP_GRANULARITY`];
    /// `final-budget-ms` at most [`MAX_BUDGET_MS`]. (`hot-threshold` depends on the server's
    /// default: the server checks it.)
    pub fn check(&self, block_size: u64) -> Result<(), String> {
        if let Some(r) = self.rounds {
            if !(1..=MAX_ROUNDS).contains(&r) {
                return Err(format!(
                    "rounds {r} is out of range: 1 to {MAX_ROUNDS} (pre-copy rounds before the final one, round 1 \
                     included)"
                ));
            }
        }
        if self.max_bandwidth == Some(0) {
            return Err("max-bandwidth is 0 bytes/s (a rate under 1 byte/s, such as 1bit, rounds to 0), which would \
                        never send anything: give at least 1 byte/s, or leave it out for no limit"
                .into());
        }
        if let Some(g) = self.bitmap_granularity {
            if !g.is_power_of_two() || g < block_size || g > MAX_BITMAP_GRANULARITY {
                return Err(format!(
                    "bitmap-granularity {g} bytes is not a power of two from {} to {} (the disk is tracked in {} \
                     blocks)",
                    units::format_size(block_size),
                    units::format_size(MAX_BITMAP_GRANULARITY),
                    units::format_size(block_size)
                ));
            }
        }
        check_budget("final-budget-ms", self.final_budget_ms)
    }

    /// Arguments with every option at its default.
    pub fn new(uri: impl Into<String>, strategy: Strategy) -> Self {
        Self {
            uri: uri.into(),
            strategy,
            rounds: None,
            hot_threshold: None,
            max_bandwidth: None,
            compress: true,
            bitmap_granularity: None,
            final_budget_ms: None,
            tls_hostname: None,
            arm: false,
        }
    }
}

impl MigrateFinishArgs {
    /// Checks every number: `budget-ms` at most [`MAX_BUDGET_MS`].
    pub fn check(&self) -> Result<(), String> {
        check_budget("budget-ms", self.budget_ms)
    }
}

/// Reply of `migrate-start`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct MigrateStartReply {
    /// The new session's id (hex).
    pub session: String,
}

/// Arguments of `reclaim`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ReclaimArgs {
    /// Take the disk back without asking the destination. Only for a destination known to be
    /// gone: if it runs the guest, both hosts would write to their copies.
    #[serde(default)]
    pub force: bool,
}

/// Arguments of `reload-protection`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ReloadProtectionArgs {
    /// A TLS credentials directory to use from now on (absolute path), in place of the current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_creds: Option<String>,
    /// A pre-shared key file to use from now on (absolute path, mode 0600), in place of the current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_key_file: Option<String>,
}

/// Reply of `reload-protection`: what is in force now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct ProtectionReply {
    /// In words.
    pub protection: String,
    /// The TLS credentials directory read.
    pub tls_creds: Option<String>,
    /// The key file read.
    pub auth_key_file: Option<String>,
}

/// Reply of `query-digest`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct DigestReply {
    /// SHA-256 of every byte of the disk, hex.
    pub sha256: String,
    /// Disk size in bytes.
    pub size: u64,
    /// Seconds the digest took.
    pub seconds: f64,
}

/// Most bytes one `query-disk-digests` covers (its skip runs stay under the line limit).
pub const DIGESTS_MAX_LENGTH: u64 = 128 << 20;
/// The blocks `query-disk-digests` leaves out are counted in this size (4 KiB).
pub const DIGESTS_BLOCK_SIZE: u64 = 4096;
/// Most skip runs one `query-disk-digests` takes.
pub const DIGESTS_MAX_SKIP_RUNS: usize = 16_384;

/// Arguments of `query-disk-digests`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DiskDigestsArgs {
    /// First byte of the range (a multiple of 4096).
    pub offset: u64,
    /// Bytes in the range (at most 128 MiB; it may end at the disk's end).
    pub length: u64,
    /// Bytes per digest (a multiple of 4096; the last unit may be shorter).
    pub unit: u64,
    /// 4 KiB blocks to leave out, as [first, count] runs in order (at most 16384).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skip: Vec<[u64; 2]>,
    /// Also leave out the blocks written on this host since its incoming migration committed
    /// (refused where this process has no such record).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skip_written_since_commit: bool,
}

/// Reply of `query-disk-digests`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct DiskDigestsReply {
    /// One hex SHA-256 per unit, in order, of the unit's blocks that were not left out.
    pub digests: Vec<String>,
    /// The blocks left out, as [first, count] runs in order: those asked for and those
    /// written since the commit.
    pub skipped: Vec<[u64; 2]>,
    /// Bytes read and hashed.
    pub hashed_bytes: u64,
    /// Seconds it took.
    pub seconds: f64,
}

fn yes() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_reject_unknown_members_and_fill_defaults() {
        let a: MigrateStartArgs = serde_json::from_str(r#"{"uri": "tcp:h:1"}"#).unwrap();
        assert_eq!(a, MigrateStartArgs::new("tcp:h:1", Strategy::Row));
        assert!(serde_json::from_str::<MigrateStartArgs>(r#"{"uri": "tcp:h:1", "rounds_": 2}"#).is_err());
        assert!(serde_json::from_str::<NoArgs>(r#"{"x": 1}"#).is_err());
        let r: RowStopArgs = serde_json::from_str("{}").unwrap();
        assert!(r.wait);
        // Optional members left out when serialised, so an older server accepts them.
        assert_eq!(serde_json::to_value(MigrateStartArgs::new("u", Strategy::Bitmap)).unwrap()["strategy"], "bitmap");
        assert!(serde_json::to_value(QueryRowArgs::default()).unwrap().as_object().unwrap().is_empty());
    }

    #[test]
    fn numbers_out_of_range_are_refused_with_the_argument_named() {
        let args = |json: &str| serde_json::from_str::<MigrateStartArgs>(json).unwrap();
        assert_eq!(args(r#"{"uri": "u"}"#).check(4096), Ok(()));
        let ok = r#"{"uri": "u", "rounds": 1, "max-bandwidth": 1, "bitmap-granularity": "4KiB", "final-budget-ms": 0}"#;
        assert_eq!(args(ok).check(4096), Ok(()));
        assert_eq!(args(r#"{"uri": "u", "rounds": 100, "bitmap-granularity": "1GiB"}"#).check(4096), Ok(()));
        for (json, says) in [
            (r#"{"uri": "u", "rounds": 0}"#, "rounds 0 is out of range: 1 to 100"),
            (r#"{"uri": "u", "rounds": 101}"#, "rounds 101 is out of range"),
            (r#"{"uri": "u", "max-bandwidth": "1bit"}"#, "max-bandwidth is 0 bytes/s"),
            (r#"{"uri": "u", "max-bandwidth": 0}"#, "leave it out for no limit"),
            (r#"{"uri": "u", "bitmap-granularity": 0}"#, "bitmap-granularity 0 bytes is not a power of two from 4 KiB"),
            (r#"{"uri": "u", "bitmap-granularity": 3}"#, "bitmap-granularity 3 bytes"),
            (r#"{"uri": "u", "bitmap-granularity": 2048}"#, "bitmap-granularity 2048 bytes"),
            (r#"{"uri": "u", "bitmap-granularity": 12288}"#, "bitmap-granularity 12288 bytes"),
            (r#"{"uri": "u", "bitmap-granularity": "2GiB"}"#, "to 1 GiB"),
            (r#"{"uri": "u", "final-budget-ms": "2d"}"#, "final-budget-ms 172800000 is out of range"),
        ] {
            let e = args(json).check(4096).unwrap_err();
            assert!(e.contains(says), "{json}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
        let finish = |json: &str| serde_json::from_str::<MigrateFinishArgs>(json).unwrap().check();
        assert_eq!(finish(r#"{"budget-ms": 0}"#), Ok(()));
        assert!(finish(r#"{"budget-ms": "25h"}"#).unwrap_err().contains("budget-ms 90000000 is out of range"));
    }

    #[test]
    fn sizes_rates_and_durations_take_numbers_or_strings_with_units() {
        let plain: MigrateStartArgs = serde_json::from_str(
            r#"{"uri": "tcp:h:1", "max-bandwidth": 1000, "bitmap-granularity": 65536, "final-budget-ms": 50}"#,
        )
        .unwrap();
        assert_eq!(
            (plain.max_bandwidth, plain.bitmap_granularity, plain.final_budget_ms),
            (Some(1000), Some(65536), Some(50))
        );
        let units: MigrateStartArgs = serde_json::from_str(
            r#"{"uri": "tcp:h:1", "max-bandwidth": "100MiB", "bitmap-granularity": "64KiB", "final-budget-ms": "2s"}"#,
        )
        .unwrap();
        assert_eq!(
            (units.max_bandwidth, units.bitmap_granularity, units.final_budget_ms),
            (Some(100 << 20), Some(64 << 10), Some(2000))
        );
        let bits: MigrateStartArgs = serde_json::from_str(r#"{"uri": "u", "max-bandwidth": "100mbit"}"#).unwrap();
        assert_eq!(bits.max_bandwidth, Some(12_500_000));
        // Sent as plain numbers, which every server reads.
        assert_eq!(serde_json::to_value(&units).unwrap()["max-bandwidth"], 100 << 20);
        let e = serde_json::from_str::<MigrateStartArgs>(r#"{"uri": "u", "max-bandwidth": "10 parsecs"}"#).unwrap_err();
        assert!(e.to_string().contains("expected a rate like 100mbit, 12MiB/s or bytes per second"), "{e}");
    }
}
