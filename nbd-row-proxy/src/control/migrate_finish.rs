//! `migrate-finish`: with the guest paused, refuses writes durably, sends the rest, and returns
//! once the destination has committed it.

use std::sync::Arc;

use control_api::{MigrationStatus, NoArgs};
use qmp_proto::CommandError;

use super::{failed, Control};

pub async fn run(c: Arc<Control>, _: NoArgs) -> Result<MigrationStatus, CommandError> {
    c.outgoing.finish().await.map_err(failed)
}
