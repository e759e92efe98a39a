//! A running migration's connections and what it has changed so far (so a rollback undoes
//! exactly that), and how per-disk work runs side by side.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use qmp_driver::Qmp;
use serde_json::Value;

use crate::disks::DiskSpec;
use crate::{Args, PostcopyArg};

/// Short command timeout; long ones get their own.
pub const CMD: Duration = Duration::from_secs(30);

/// The id of the TLS credentials object row-migrate adds to both QEMUs.
pub const TLS_OBJECT: &str = "rowmig-tls";

/// A failed run: the exit code, what failed, and the state each component was left in.
pub struct Failure {
    /// One of [`exit`].
    pub code: u8,
    /// What failed.
    pub error: anyhow::Error,
    /// The components' states, for `--json`.
    pub state: Value,
}

/// One disk's two proxies and how far its migration got.
pub struct DiskPair {
    /// What the command line said about it.
    pub spec: DiskSpec,
    /// Its source proxy's control connection.
    pub src_proxy: Qmp,
    /// Its destination proxy's control connection.
    pub dst_proxy: Qmp,
    /// `migrate-start` was sent to its source proxy.
    pub started: bool,
    /// The proxies' block size (from `query-status`), for progress in bytes.
    pub block_size: u64,
    /// Its name in messages: `disk` with one disk, `disk 2` with several.
    pub name: String,
}

/// The connections and what has been changed so far, so a rollback undoes exactly that.
pub struct Ctx {
    pub args: Args,
    pub src: Qmp,
    pub dst: Qmp,
    /// Every disk of the VM, in command-line order.
    pub disks: Vec<DiskPair>,
    pub started: Instant,
    pub mem_started: bool,
    pub mirror_started: bool,
    /// `migrate-finish` has been (or is being) sent: a destination may commit its disk.
    pub finish_sent: bool,
    /// `migrate-continue` has been (or is being) sent: from here on nothing is undone.
    pub continue_sent: bool,
    /// When memory may switch to post-copy (`never` if a QEMU lacks `postcopy-ram`).
    pub ram_postcopy: PostcopyArg,
    /// Why QEMU's memory copy was switched to post-copy, with the bytes left then.
    pub ram_switched: Option<(String, u64)>,
    /// The source QEMU can change a running mirror's copy mode (`block-job-change`, 8.2+).
    pub block_job_change: bool,
}

/// Runs `f` on every disk at once and returns the results in disk order.
pub async fn each_disk<'a, T, F, Fut>(disks: &'a mut [DiskPair], f: F) -> Vec<T>
where
    F: FnMut(&'a mut DiskPair) -> Fut,
    Fut: std::future::Future<Output = T> + 'a,
{
    futures::future::join_all(disks.iter_mut().map(f)).await
}

/// The first error of per-disk results, with every failing disk named; the values otherwise.
pub fn all_ok<T>(results: Vec<(String, Result<T>)>) -> Result<Vec<T>> {
    let failed: Vec<String> =
        results.iter().filter_map(|(name, r)| r.as_ref().err().map(|e| format!("{name}: {e:#}"))).collect();
    if !failed.is_empty() {
        bail!("{}", failed.join("; "));
    }
    Ok(results.into_iter().filter_map(|(_, r)| r.ok()).collect())
}

/// One disk's value as it is, several as an array (the report's shape for one disk is kept).
pub fn disks_value(mut values: Vec<Value>) -> Value {
    if values.len() == 1 {
        values.pop().unwrap_or_default()
    } else {
        Value::Array(values)
    }
}
