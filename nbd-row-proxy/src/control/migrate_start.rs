//! `migrate-start`: connects to the destination and runs the pre-copy rounds in the background.

use std::sync::Arc;
use std::time::Duration;

use control_api::{MigrateStartArgs, MigrateStartReply, Strategy};
use qmp_proto::CommandError;
use row_store::BLOCK_SIZE;

use super::{failed, refused, Control};
use crate::migration::source::MigrateArgs;

/// Dirty granularity of the bitmap strategy by default: 1 MiB, as QEMU's old block migration.
const DEFAULT_BITMAP_GRANULARITY: u64 = 1 << 20;
/// The row strategy's final-round budget by default.
const DEFAULT_FINAL_BUDGET: Duration = Duration::from_millis(50);

pub async fn run(c: Arc<Control>, args: MigrateStartArgs) -> Result<MigrateStartReply, CommandError> {
    args.check(BLOCK_SIZE).map_err(failed)?;
    crate::migration::parse_uri(&args.uri).map_err(refused)?;
    // Pre-copy rounds before the final one: the paper's ROW does two (base, cold updates); its
    // block-bitmap baseline three (the whole disk, then twice what was dirtied).
    let default_rounds = match args.strategy {
        Strategy::Row => 2,
        Strategy::Bitmap => 3,
    };
    let margs = MigrateArgs {
        uri: args.uri,
        strategy: args.strategy,
        rounds: args.rounds.unwrap_or(default_rounds),
        hot_threshold: super::hot_threshold(&c, args.hot_threshold)?,
        max_bandwidth: args.max_bandwidth,
        compress: args.compress,
        bitmap_granularity_blocks: args.bitmap_granularity.unwrap_or(DEFAULT_BITMAP_GRANULARITY) / BLOCK_SIZE,
        tls_hostname: args.tls_hostname,
        arm: args.arm,
        final_budget: match args.final_budget_ms.map(Duration::from_millis).unwrap_or(DEFAULT_FINAL_BUDGET) {
            d if d.is_zero() => None,
            d => Some(d),
        },
    };
    let session = c.outgoing.start(margs).await.map_err(refused)?;
    Ok(MigrateStartReply { session })
}
