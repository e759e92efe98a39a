//! Helpers for the commands the migration driver needs, checked against QEMU 7.2, and the
//! reply types they return.
//!
//! Each helper says whether it sends a typed `qapi` command or builds the JSON itself. Typed
//! is used where the 9.x types both encode what 7.2 accepts and (mostly) decode what it sends;
//! the helpers still read what they need from the raw reply, so a reply that does not decode
//! only loses the `typed` field. The reply types' `from_reply` constructors are pure, for
//! tests and for replies obtained elsewhere.

use std::path::Path;

use qapi::qmp;
use serde_json::{json, Value};

use crate::client::Qmp;
use crate::decoded::Decoded;
use crate::error::QmpError;

/// The VM's run state, from `query-status`.
#[derive(Debug, Clone)]
pub struct VmStatus {
    /// QEMU's `RunState` name: `running`, `paused`, `prelaunch`, `inmigrate`,
    /// `finish-migrate`, `postmigrate`, ... (kept as a string; a newer QEMU may add more).
    pub status: String,
    /// Whether the vCPUs run.
    pub running: bool,
    /// The typed reply, when it decoded (it does on 7.2, which also sends `singlestep`).
    pub typed: Option<qmp::StatusInfo>,
}

impl VmStatus {
    /// Reads a `query-status` return value.
    pub fn from_reply(raw: &Value) -> Result<Self, String> {
        Self::from_decoded(Decoded::decode("query-status", raw.clone()))
    }

    /// Reads a `query-status` reply already decoded leniently.
    pub fn from_decoded(reply: Decoded<qmp::StatusInfo>) -> Result<Self, String> {
        let raw = reply.raw();
        let status = raw.get("status").and_then(Value::as_str).ok_or("no string `status`")?.to_owned();
        let running = raw.get("running").and_then(Value::as_bool).ok_or("no boolean `running`")?;
        Ok(Self { status, running, typed: reply.into_typed() })
    }
}

/// Migration state and statistics, from `query-migrate` (on either side).
#[derive(Debug, Clone)]
pub struct MigrationInfo {
    /// QEMU's `MigrationStatus` name (`none` when QEMU reports nothing yet, as it does
    /// before the first migration): `setup`, `active`, `pre-switchover`, `device`,
    /// `completed`, `failed`, `cancelling`, `cancelled`, ...
    pub status: String,
    /// The reply as received: `ram` (`transferred`, `remaining`, `total`, `dirty-sync-count`,
    /// ...), `total-time`, `downtime`, `error-desc`, ...
    pub raw: Value,
    /// The typed reply, when it decoded (all 7.2 replies recorded so far do).
    pub typed: Option<qmp::MigrationInfo>,
}

impl MigrationInfo {
    /// Reads a `query-migrate` return value. Never fails: a missing `status` reads as `none`.
    pub fn from_reply(raw: Value) -> Self {
        Self::from_decoded(Decoded::decode("query-migrate", raw))
    }

    /// Reads a `query-migrate` reply already decoded leniently.
    pub fn from_decoded(reply: Decoded<qmp::MigrationInfo>) -> Self {
        let status = reply.raw().get("status").and_then(Value::as_str).unwrap_or("none").to_owned();
        match reply {
            Decoded::Typed { value, raw } => Self { status, raw, typed: Some(value) },
            Decoded::Raw { raw, .. } => Self { status, raw, typed: None },
        }
    }

    /// A number in the `ram` statistics, e.g. `transferred`, `remaining`, `total`,
    /// `dirty-sync-count`, `precopy-bytes`, `downtime-bytes`.
    pub fn ram(&self, key: &str) -> Option<u64> {
        self.raw.get("ram")?.get(key)?.as_u64()
    }

    /// RAM bytes sent so far.
    pub fn ram_transferred(&self) -> Option<u64> {
        self.ram("transferred")
    }

    /// RAM bytes still to send.
    pub fn ram_remaining(&self) -> Option<u64> {
        self.ram("remaining")
    }

    /// Guest RAM size in bytes.
    pub fn ram_total(&self) -> Option<u64> {
        self.ram("total")
    }

    /// A top-level number, e.g. `total-time`, `downtime`, `setup-time`, `expected-downtime`
    /// (all milliseconds).
    pub fn number(&self, key: &str) -> Option<u64> {
        self.raw.get(key)?.as_u64()
    }

    /// Milliseconds since the migration started.
    pub fn total_time_ms(&self) -> Option<u64> {
        self.number("total-time")
    }

    /// Actual downtime in milliseconds (once completed).
    pub fn downtime_ms(&self) -> Option<u64> {
        self.number("downtime")
    }

    /// QEMU's reason for a `failed` migration.
    pub fn error_desc(&self) -> Option<&str> {
        self.raw.get("error-desc")?.as_str()
    }

    /// True once the migration has ended: `completed`, `failed` or `cancelled`.
    pub fn is_finished(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "failed" | "cancelled")
    }
}

/// One migration capability and whether it is on, from `query-migrate-capabilities`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapabilityState {
    /// Capability name as QEMU spells it, e.g. `events`, `pause-before-switchover`, or 7.2's
    /// `block` and `compress` (which the 9.x types lack).
    pub name: String,
    /// Whether it is on.
    pub state: bool,
}

/// Reads a `query-migrate-capabilities` return value by name (no `qapi` enum involved).
pub fn parse_capabilities(raw: &Value) -> Result<Vec<CapabilityState>, String> {
    let items = raw.as_array().ok_or("not an array")?;
    items
        .iter()
        .map(|item| {
            let name =
                item.get("capability").and_then(Value::as_str).ok_or_else(|| format!("no `capability` in {item}"))?;
            let state = item.get("state").and_then(Value::as_bool).ok_or_else(|| format!("no `state` in {item}"))?;
            Ok(CapabilityState { name: name.to_owned(), state })
        })
        .collect()
}

/// One block job, from `query-block-jobs`.
#[derive(Debug, Clone)]
pub struct BlockJob {
    /// The job id (`device` on the wire, named so for history).
    pub device: String,
    /// Job type, e.g. `mirror`, `commit`, `stream`, `backup`.
    pub job_type: String,
    /// Job status, e.g. `created`, `running`, `ready`, `concluded`.
    pub status: String,
    /// Estimated total work (bytes for mirror); it can grow while the job runs.
    pub len: u64,
    /// Work done so far, same unit as `len`.
    pub offset: u64,
    /// Whether a mirror has converged and can be completed.
    pub ready: bool,
    /// Whether the job is paused.
    pub paused: bool,
    /// Rate limit in bytes per second, `0` for none.
    pub speed: u64,
    /// The job's error message, if it failed.
    pub error: Option<String>,
    /// The element as received.
    pub raw: Value,
    /// The typed element when it decodes. QEMU 7.2's mirror jobs lack `actively-synced`,
    /// which the 9.x type requires, so mirror jobs from 7.2 stay `None`.
    pub typed: Option<qmp::BlockJobInfo>,
}

impl BlockJob {
    /// Reads one element of a `query-block-jobs` return value.
    pub fn from_reply(raw: Value) -> Result<Self, String> {
        let s = |key: &str| {
            raw.get(key).and_then(Value::as_str).map(str::to_owned).ok_or_else(|| format!("no string `{key}`"))
        };
        let n = |key: &str| raw.get(key).and_then(Value::as_u64).ok_or_else(|| format!("no number `{key}`"));
        let b = |key: &str| raw.get(key).and_then(Value::as_bool).unwrap_or(false);
        let job = Self {
            device: s("device")?,
            job_type: s("type")?,
            status: s("status")?,
            len: n("len")?,
            offset: n("offset")?,
            ready: b("ready"),
            paused: b("paused"),
            speed: n("speed").unwrap_or(0),
            error: s("error").ok(),
            typed: None,
            raw: Value::Null,
        };
        // Expected to fail for 7.2's mirror jobs, polled in loops: log quietly.
        let typed = Decoded::<qmp::BlockJobInfo>::decode_quiet("query-block-jobs", raw.clone()).into_typed();
        Ok(Self { typed, raw, ..job })
    }

    /// Reads a whole `query-block-jobs` return value.
    pub fn list_from_reply(raw: Value) -> Result<Vec<Self>, String> {
        match raw {
            Value::Array(items) => items.into_iter().map(Self::from_reply).collect(),
            other => Err(format!("not an array: {other}")),
        }
    }
}

fn unexpected(command: &str) -> impl FnOnce(String) -> QmpError + '_ {
    move |reason| QmpError::UnexpectedReply { command: command.to_owned(), reason }
}

impl Qmp {
    /// `query-status`, typed (`StatusInfo` decodes on 7.2); status read from the raw reply.
    pub async fn query_status(&mut self) -> Result<VmStatus, QmpError> {
        let reply = self.execute(qmp::query_status {}).await?;
        VmStatus::from_decoded(reply).map_err(unexpected("query-status"))
    }

    /// `query-migrate`, typed (`MigrationInfo` decodes on 7.2 in every state recorded);
    /// status and statistics read from the raw reply.
    pub async fn query_migrate(&mut self) -> Result<MigrationInfo, QmpError> {
        let reply = self.execute(qmp::query_migrate {}).await?;
        Ok(MigrationInfo::from_decoded(reply))
    }

    /// `query-migrate-capabilities`, raw: 7.2 lists `compress` and `block`, which the 9.x
    /// `MigrationCapability` enum rejects, so the typed reply never decodes there.
    pub async fn query_migrate_capabilities(&mut self) -> Result<Vec<CapabilityState>, QmpError> {
        let raw = self.execute_raw("query-migrate-capabilities", Value::Null).await?;
        parse_capabilities(&raw).map_err(unexpected("query-migrate-capabilities"))
    }

    /// `migrate-set-capabilities` by name, raw, so capabilities the `qapi` enum lacks (7.2's
    /// `block`, `compress`) or has but 7.2 lacks can be named; QEMU rejects unknown names
    /// with a `GenericError`. Must be sent before `migrate` / `migrate-incoming`, and on the
    /// destination too for its `MIGRATION` events.
    pub async fn migrate_set_capabilities(&mut self, capabilities: &[(&str, bool)]) -> Result<(), QmpError> {
        let caps: Vec<Value> =
            capabilities.iter().map(|(name, state)| json!({"capability": name, "state": state})).collect();
        self.execute_raw("migrate-set-capabilities", json!({ "capabilities": caps })).await?;
        Ok(())
    }

    /// `migrate-set-parameters`, raw: `parameters` is the arguments object as QEMU spells it
    /// (e.g. `{"max-bandwidth": 33554432, "downtime-limit": 300}`); 7.2 and the 9.x types
    /// differ in which parameters exist.
    pub async fn migrate_set_parameters(&mut self, parameters: Value) -> Result<(), QmpError> {
        self.execute_raw("migrate-set-parameters", parameters).await?;
        Ok(())
    }

    /// `query-migrate-parameters`, raw. The 9.x `MigrationParameters` has only optional
    /// members, so it does decode on 7.2, but it would drop 7.2-only ones such as
    /// `block-incremental` and `compress-*`.
    pub async fn query_migrate_parameters(&mut self) -> Result<Value, QmpError> {
        self.execute_raw("query-migrate-parameters", Value::Null).await
    }

    /// `migrate` to `uri` (e.g. `unix:/path`, `tcp:host:port`, `exec:cmd`), typed with only
    /// `uri` set, which is what 7.2 accepts (it has no `channels`). Returns once started;
    /// follow with [`query_migrate`](Self::query_migrate) or `MIGRATION` events.
    pub async fn migrate(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute(qmp::migrate { uri: Some(uri.to_owned()), channels: None, detach: None, resume: None }).await?;
        Ok(())
    }

    /// `migrate-incoming` on a QEMU started with `-incoming defer`, typed with only `uri`.
    pub async fn migrate_incoming(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute(qmp::migrate_incoming { uri: Some(uri.to_owned()), channels: None, exit_on_error: None }).await?;
        Ok(())
    }

    /// `migrate-continue` from a paused `state` (in practice `pre-switchover`, with the
    /// `pause-before-switchover` capability), raw with the state by name.
    pub async fn migrate_continue(&mut self, state: &str) -> Result<(), QmpError> {
        self.execute_raw("migrate-continue", json!({ "state": state })).await?;
        Ok(())
    }

    /// `migrate_cancel`, typed.
    pub async fn migrate_cancel(&mut self) -> Result<(), QmpError> {
        self.execute(qmp::migrate_cancel {}).await?;
        Ok(())
    }

    /// `cont`, typed: resumes the vCPUs (a `RESUME` event follows).
    pub async fn cont(&mut self) -> Result<(), QmpError> {
        self.execute(qmp::cont {}).await?;
        Ok(())
    }

    /// `stop`, typed: pauses the vCPUs (a `STOP` event follows).
    pub async fn stop(&mut self) -> Result<(), QmpError> {
        self.execute(qmp::stop {}).await?;
        Ok(())
    }

    /// `query-block`, typed and lenient: [`Decoded::Raw`] if the reply does not fit the 9.x
    /// `BlockInfo` (7.2's recorded replies do fit).
    pub async fn query_block(&mut self) -> Result<Decoded<Vec<qmp::BlockInfo>>, QmpError> {
        self.execute(qmp::query_block {}).await
    }

    /// `query-block-jobs`, raw, each job decoded typed where it fits (7.2's mirror jobs do
    /// not: they lack `actively-synced`).
    pub async fn query_block_jobs(&mut self) -> Result<Vec<BlockJob>, QmpError> {
        let raw = self.execute_raw("query-block-jobs", Value::Null).await?;
        BlockJob::list_from_reply(raw).map_err(unexpected("query-block-jobs"))
    }

    /// `nbd-server-start` on a Unix socket, raw, in the legacy `SocketAddressLegacy` form
    /// (`{"type": "unix", "data": {"path": ...}}`), the only one 7.2 accepts here.
    pub async fn nbd_server_start_unix(&mut self, path: impl AsRef<Path>) -> Result<(), QmpError> {
        let path = path.as_ref().to_str().ok_or_else(|| QmpError::Encode {
            command: "nbd-server-start".into(),
            error: serde::ser::Error::custom("socket path is not UTF-8"),
        })?;
        let addr = json!({"type": "unix", "data": {"path": path}});
        self.execute_raw("nbd-server-start", json!({ "addr": addr })).await?;
        Ok(())
    }

    /// `nbd-server-stop`, typed.
    pub async fn nbd_server_stop(&mut self) -> Result<(), QmpError> {
        self.execute(qmp::nbd_server_stop {}).await?;
        Ok(())
    }

    /// `quit`, typed. A connection that closes before or instead of the reply counts as
    /// success. Events that came first (QEMU sends `SHUTDOWN` before its reply) stay
    /// available from [`take_events`](Self::take_events); the process exits on its own.
    pub async fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute(qmp::quit {}).await {
            Ok(_) | Err(QmpError::Closed) => {}
            Err(QmpError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => return Err(e),
        }
        Ok(())
    }
}
