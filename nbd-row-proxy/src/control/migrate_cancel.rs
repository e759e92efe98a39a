//! `migrate-cancel`: gives the disk back to the source, if that is safe.

use std::sync::Arc;

use control_api::{Empty, NoArgs};
use qmp_proto::CommandError;

use super::{refused, Control};

pub async fn run(c: Arc<Control>, _: NoArgs) -> Result<Empty, CommandError> {
    c.outgoing.cancel().await.map_err(refused)?;
    Ok(Empty {})
}
