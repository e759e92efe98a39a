//! The control socket: QMP-shaped commands, one module per command (the schema is
//! `control_api`); this module only dispatches.

mod migrate_cancel;
mod migrate_complete;
mod migrate_finish;
mod migrate_start;
mod query_digest;
mod query_disk_digests;
mod query_migrate;
mod query_row;
mod query_status;
mod reclaim;
mod reload_protection;
mod row_start;
mod row_stop;

use std::sync::Arc;

use control_api::{Command, *};
use qmp_proto::{parse_arguments, CommandError, Handler, HandlerFuture};
use serde_json::{Map, Value};

use crate::migration::dest::Incoming;
use crate::migration::source::Outgoing;
use crate::proxy::Proxy;

/// What the commands act on.
#[derive(Debug)]
pub struct Control {
    /// The disk and what guards it.
    pub proxy: Arc<Proxy>,
    /// Outgoing migrations.
    pub outgoing: Outgoing,
    /// The incoming migration, on a `receive` proxy (or a committed destination).
    pub incoming: Option<Arc<Incoming>>,
}

impl Control {
    /// What the live export's requests wait for on a destination (blocks still at the source).
    pub fn pull(&self) -> Option<Arc<dyn crate::nbd::export::Pull>> {
        self.incoming.as_ref().map(|_| Arc::new(crate::migration::dest::DestPull(self.proxy.clone())) as _)
    }
}

/// A failed command's error reply.
pub fn failed(e: impl std::fmt::Display) -> CommandError {
    CommandError::generic(e.to_string())
}

/// The error reply of a command that failed on `e`: its message and each of its causes once.
pub fn refused(e: impl Into<anyhow::Error>) -> CommandError {
    CommandError::generic(logging::error_line(e.into().as_ref()))
}

/// A hot threshold from a command's arguments, or the server's; write counts saturate at
/// [`row_store::MAX_WRITES`], so higher thresholds are refused.
pub fn hot_threshold(c: &Control, asked: Option<u32>) -> Result<u32, CommandError> {
    match asked.unwrap_or(c.proxy.hot_threshold) {
        t @ 1..=row_store::MAX_WRITES => Ok(t),
        t => Err(failed(format!(
            "hot-threshold {t} is out of range: 1 to {} (write counts saturate there)",
            row_store::MAX_WRITES
        ))),
    }
}

/// Parses the arguments of command `C`, runs `f`, and serialises its reply.
async fn call<C, F, Fut>(control: &Arc<Control>, arguments: Map<String, Value>, f: F) -> Result<Value, CommandError>
where
    C: Command,
    F: FnOnce(Arc<Control>, C::Args) -> Fut,
    Fut: std::future::Future<Output = Result<C::Reply, CommandError>>,
{
    let args: C::Args = parse_arguments(arguments)?;
    let reply = f(control.clone(), args).await?;
    Ok(serde_json::to_value(reply).expect("replies serialise"))
}

/// The control socket's handler.
#[derive(Debug, Clone)]
pub struct ControlHandler(pub Arc<Control>);

impl Handler for ControlHandler {
    fn handle<'a>(&'a self, command: &'a str, arguments: Map<String, Value>) -> HandlerFuture<'a> {
        let c = &self.0;
        Box::pin(async move {
            match command {
                _ if command == QueryStatus::NAME => call::<QueryStatus, _, _>(c, arguments, query_status::run).await,
                _ if command == RowStart::NAME => call::<RowStart, _, _>(c, arguments, row_start::run).await,
                _ if command == RowStop::NAME => call::<RowStop, _, _>(c, arguments, row_stop::run).await,
                _ if command == QueryRow::NAME => call::<QueryRow, _, _>(c, arguments, query_row::run).await,
                _ if command == MigrateStart::NAME => {
                    call::<MigrateStart, _, _>(c, arguments, migrate_start::run).await
                }
                _ if command == QueryMigrate::NAME => {
                    call::<QueryMigrate, _, _>(c, arguments, query_migrate::run).await
                }
                _ if command == MigrateFinish::NAME => {
                    call::<MigrateFinish, _, _>(c, arguments, migrate_finish::run).await
                }
                _ if command == MigrateCancel::NAME => {
                    call::<MigrateCancel, _, _>(c, arguments, migrate_cancel::run).await
                }
                _ if command == MigrateComplete::NAME => {
                    call::<MigrateComplete, _, _>(c, arguments, migrate_complete::run).await
                }
                _ if command == Reclaim::NAME => call::<Reclaim, _, _>(c, arguments, reclaim::run).await,
                _ if command == ReloadProtection::NAME => {
                    call::<ReloadProtection, _, _>(c, arguments, reload_protection::run).await
                }
                _ if command == QueryDigest::NAME => call::<QueryDigest, _, _>(c, arguments, query_digest::run).await,
                _ if command == QueryDiskDigests::NAME => {
                    call::<QueryDiskDigests, _, _>(c, arguments, query_disk_digests::run).await
                }
                other => Err(CommandError::command_not_found(other)),
            }
        })
    }
}
