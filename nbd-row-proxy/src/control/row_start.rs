//! `row-start`: freezes the image; writes land in the reserved file from now on.

use std::sync::Arc;

use control_api::{Empty, NoArgs, RowStarted, RowStartedData};
use qmp_proto::CommandError;

use super::{failed, refused, Control};
use crate::ownership::Access;

pub async fn run(c: Arc<Control>, _: NoArgs) -> Result<Empty, CommandError> {
    if c.proxy.gate.access() == Access::Incoming {
        return Err(failed("the disk is still arriving by migration"));
    }
    let disk = c.proxy.disk.clone();
    tokio::task::spawn_blocking(move || disk.row_start()).await.map_err(refused)?.map_err(refused)?;
    let epoch = c.proxy.disk.status().epoch;
    c.proxy.events.emit::<RowStarted>(RowStartedData { epoch, base_export: format!("{}@base", c.proxy.export) });
    Ok(Empty {})
}
