//! `query-migrate`: the outgoing migration's phase and per-round figures.

use std::sync::Arc;

use control_api::{MigrationStatus, NoArgs};
use qmp_proto::CommandError;

use super::Control;

pub async fn run(c: Arc<Control>, _: NoArgs) -> Result<MigrationStatus, CommandError> {
    Ok(c.outgoing.status())
}
