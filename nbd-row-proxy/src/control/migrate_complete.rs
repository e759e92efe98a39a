//! `migrate-complete`: after the switchover, ends the session; the destination owns the disk.

use std::sync::Arc;

use control_api::{Empty, NoArgs};
use qmp_proto::CommandError;

use super::{refused, Control};

pub async fn run(c: Arc<Control>, _: NoArgs) -> Result<Empty, CommandError> {
    c.outgoing.complete().await.map_err(refused)?;
    Ok(Empty {})
}
