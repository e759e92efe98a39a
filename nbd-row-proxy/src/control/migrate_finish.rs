//! `migrate-finish`: with the guest paused, refuses writes durably, sends the rest (or, with
//! post-copy, leaves what does not fit the budget for after the switchover), and returns once
//! the destination has committed it.

use std::sync::Arc;

use control_api::{MigrateFinishArgs, MigrationStatus};
use qmp_proto::CommandError;

use super::{failed, refused, Control};

pub async fn run(c: Arc<Control>, args: MigrateFinishArgs) -> Result<MigrationStatus, CommandError> {
    args.check().map_err(failed)?;
    c.outgoing.finish(args).await.map_err(refused)
}
