//! `reclaim`: takes back a disk whose writes are refused because it was handed over.

use std::sync::Arc;

use control_api::{Empty, ReclaimArgs};
use qmp_proto::CommandError;

use super::{refused, Control};

pub async fn run(c: Arc<Control>, args: ReclaimArgs) -> Result<Empty, CommandError> {
    c.outgoing.reclaim(args.force).await.map_err(refused)?;
    Ok(Empty {})
}
