//! `query-row`: the overlay's write statistics.

use std::sync::Arc;

use control_api::{QueryRowArgs, RowReport};
use qmp_proto::CommandError;
use row_store::BLOCK_SIZE;

use super::query_status::mode;
use super::Control;

pub async fn run(c: Arc<Control>, args: QueryRowArgs) -> Result<RowReport, CommandError> {
    let threshold = super::hot_threshold(&c, args.hot_threshold)?;
    let s = c.proxy.disk.status();
    let (hot, cold) = c.proxy.disk.hot_cold(threshold);
    Ok(RowReport {
        mode: mode(s.mode),
        blocks_updated: s.blocks_updated,
        hot_blocks: hot,
        cold_blocks: cold,
        hot_threshold: threshold,
        generation: s.generation,
        reserved_bytes: s.reserved_bytes,
        block_size: BLOCK_SIZE,
        map_runs: s.runs,
        map_bytes: s.map_bytes,
    })
}
