//! `query-status`: the disk, its mode and overlay, and who may write to it.

use std::sync::Arc;

use control_api::{Mode, NoArgs, StatusReply};
use qmp_proto::CommandError;
use row_store::BLOCK_SIZE;

use super::Control;
use crate::ownership::Access;

/// The row store's mode as the control schema names it.
pub fn mode(m: row_store::Mode) -> Mode {
    match m {
        row_store::Mode::Direct => Mode::Direct,
        row_store::Mode::Row => Mode::Row,
        row_store::Mode::Merging => Mode::Merging,
    }
}

/// The outgoing migration's round in progress, while the migration is active.
fn migration_progress(m: &control_api::MigrationStatus) -> Option<control_api::Progress> {
    if !m.phase.is_active() || m.round_blocks == 0 || m.round_remaining_blocks == 0 {
        return None;
    }
    let total = m.round_blocks * BLOCK_SIZE;
    let done = (m.round_blocks - m.round_remaining_blocks.min(m.round_blocks)) * BLOCK_SIZE;
    Some(control_api::Progress::new(format!("migration round {}", m.round), done, total, m.rate))
}

pub async fn run(c: Arc<Control>, _: NoArgs) -> Result<StatusReply, CommandError> {
    let p = &c.proxy;
    let s = p.disk.status();
    let access = p.gate.access();
    let writes_refused = match (&access, p.disk.sync_failure()) {
        (_, Some(why)) => Some(format!("a sync failed ({why}); restart the server to recover from what is on disk")),
        (Access::Fenced(why) | Access::Broken(why), None) => Some(why.clone()),
        _ => None,
    };
    Ok(StatusReply {
        mode: mode(s.mode),
        export: p.export.clone(),
        image: p.disk.image_path().display().to_string(),
        image_size: p.disk.size(),
        read_only: p.disk.read_only(),
        reserved: (s.mode != row_store::Mode::Direct).then(|| p.disk.reserved_path().display().to_string()),
        reserved_bytes: s.reserved_bytes,
        reserved_allocated: s.reserved_allocated,
        block_size: BLOCK_SIZE,
        incoming: access == Access::Incoming,
        incoming_phase: c.incoming.as_ref().map(|i| i.phase()),
        writes_refused,
        fence: c.outgoing.fence(),
        progress: p.merger.progress().or_else(|| migration_progress(&c.outgoing.status())),
        postcopy: p.postcopy.status(),
        protection: p.protection.current().describe().to_string(),
    })
}
