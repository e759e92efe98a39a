//! Typed calls to an nbd-row-proxy's control socket, with the schema of `control_api`, and the
//! disk-migration sequence on two proxies (start, follow to ready, finish, complete) that
//! `row-migrate` and the tests share.

use std::time::Duration;

use control_api::{
    Command, Empty, MigrateCancel, MigrateComplete, MigrateFinish, MigrateFinishArgs, MigrateStart, MigrateStartArgs,
    MigrationStatus, NoArgs, Phase, QueryMigrate, QueryStatus, StatusReply,
};

use crate::{Qmp, QmpError};

/// How often the sequence polls `query-migrate` while following the pre-copy.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

impl Qmp {
    /// Runs control command `C` with the default timeout and decodes its reply.
    pub async fn call<C: Command>(&mut self, args: C::Args) -> Result<C::Reply, QmpError> {
        let timeout = self.timeout();
        self.call_within::<C>(args, timeout).await
    }

    /// Runs control command `C` with `timeout`.
    pub async fn call_within<C: Command>(&mut self, args: C::Args, timeout: Duration) -> Result<C::Reply, QmpError> {
        let arguments =
            serde_json::to_value(&args).map_err(|error| QmpError::Encode { command: C::NAME.to_owned(), error })?;
        let raw = self.execute_raw_with_timeout(C::NAME, arguments, timeout).await?;
        serde_json::from_value(raw)
            .map_err(|e| QmpError::UnexpectedReply { command: C::NAME.to_owned(), reason: e.to_string() })
    }
}

/// Why the disk migration sequence stopped.
#[derive(Debug, thiserror::Error)]
pub enum DiskMigrationError {
    /// A control command failed (or the proxy is gone).
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// The source proxy reports the migration failed or was cancelled.
    #[error("the disk migration {}: {}", status.phase, status.error.as_deref().unwrap_or("no reason given"))]
    Ended {
        /// The status it reported.
        status: Box<MigrationStatus>,
    },
}

/// One disk's migration, driven through its source proxy's control socket.
pub struct DiskMigration<'a> {
    /// The source proxy.
    pub source: &'a mut Qmp,
}

impl DiskMigration<'_> {
    /// `migrate-start`; returns the session id.
    pub async fn start(&mut self, args: MigrateStartArgs) -> Result<String, QmpError> {
        Ok(self.source.call::<MigrateStart>(args).await?.session)
    }

    /// Polls `query-migrate` until the pre-copy is done (phase `ready`), calling `progress` on
    /// each status.
    pub async fn wait_ready(
        &mut self,
        mut progress: impl FnMut(&MigrationStatus),
    ) -> Result<MigrationStatus, DiskMigrationError> {
        loop {
            let status = self.source.call::<QueryMigrate>(NoArgs {}).await?;
            match status.phase {
                Phase::Ready => return Ok(status),
                Phase::Failed | Phase::Cancelled | Phase::Idle => {
                    return Err(DiskMigrationError::Ended { status: Box::new(status) })
                }
                _ => progress(&status),
            }
            // The proxy announces each round and phase (MIGRATION_STATE when it is ready):
            // look again at once then, or after POLL_INTERVAL for the progress line.
            self.source.next_event(POLL_INTERVAL).await?;
        }
    }

    /// `query-migrate` once.
    pub async fn status(&mut self) -> Result<MigrationStatus, QmpError> {
        self.source.call::<QueryMigrate>(NoArgs {}).await
    }

    /// `migrate-finish` (the guest is paused): the final round and the destination's commit.
    pub async fn finish(&mut self, args: MigrateFinishArgs, timeout: Duration) -> Result<MigrationStatus, QmpError> {
        self.source.call_within::<MigrateFinish>(args, timeout).await
    }

    /// `migrate-complete`, after the switchover.
    pub async fn complete(&mut self) -> Result<Empty, QmpError> {
        self.source.call::<MigrateComplete>(NoArgs {}).await
    }

    /// `migrate-cancel`: gives the disk back to the source if that is safe.
    pub async fn cancel(&mut self, timeout: Duration) -> Result<Empty, QmpError> {
        self.source.call_within::<MigrateCancel>(NoArgs {}, timeout).await
    }
}

/// `query-status` of a proxy.
pub async fn status(proxy: &mut Qmp) -> Result<StatusReply, QmpError> {
    proxy.call::<QueryStatus>(NoArgs {}).await
}
