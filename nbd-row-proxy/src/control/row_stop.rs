//! `row-stop`: merges the overlay back into the image while serving.

use std::sync::Arc;
use std::time::Instant;

use control_api::{RowStopArgs, RowStopReply};
use qmp_proto::CommandError;

use super::{failed, refused, Control};
use crate::proxy::Proxy;

pub async fn run(c: Arc<Control>, args: RowStopArgs) -> Result<RowStopReply, CommandError> {
    let phase = c.outgoing.phase();
    if phase.is_active() || c.outgoing.fence().is_some() {
        return Err(failed(format!(
            "a migration uses the overlay (phase {phase}); migrate-cancel it first, or let it complete"
        )));
    }
    let blocks = c.proxy.disk.status().blocks_updated;
    let proxy = c.proxy.clone();
    let rx = tokio::task::spawn_blocking(move || proxy.start_merge()).await.map_err(refused)?.map_err(refused)?;
    if args.wait {
        let started = Instant::now();
        Proxy::merge_finished(rx).await.map_err(refused)?;
        return Ok(RowStopReply { merged_blocks: blocks, seconds: Some(started.elapsed().as_secs_f64()) });
    }
    Ok(RowStopReply { merged_blocks: 0, seconds: None })
}
