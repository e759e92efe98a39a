//! `--recover`: after `row-migrate` was killed, or stopped with exit status 4, finishes what is
//! consistent. If the guest runs on the destination, the source proxy is told the migration is
//! complete; otherwise the migration is undone the safe way round (the disk is given back to the
//! source before QEMU's migration is cancelled and the guest resumed). Components that are
//! gone are reported, never guessed at.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use control_api::{MigrateCancel, MigrateComplete, NoArgs, Phase, QueryMigrate};
use qmp_driver::{Peer, Qmp, QmpError};
use serde_json::{json, Value};

use crate::ctx::{Failure, CMD};
use crate::disks::proxy_flags;
use crate::disks::{disk_name, disk_specs};
use crate::report::{progress_done, progress_line};
use crate::{exit, Args};

/// How long a component may take to answer before it counts as gone.
const REACH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the source proxy may take to give the disk back (it may ask the destination).
const DISK_CANCEL_TIMEOUT: Duration = Duration::from_secs(60);
/// Tries, 100 ms apart, to get a guest running.
const RESUME_TRIES: u32 = 50;

/// The component at `path`, or `None` if it is gone. A socket that answers as something else
/// (an NBD socket, QEMU where a proxy was expected, or the reverse) is a usage error: refused
/// before anything changes.
async fn reach(path: &Path, flag: &str, peer: Peer) -> Result<Option<Qmp>, Failure> {
    let mut q = match tokio::time::timeout(REACH_TIMEOUT, Qmp::connect_to(path, REACH_TIMEOUT, peer)).await {
        Ok(Ok(q)) => q,
        Ok(Err(e @ (QmpError::NotQmp(_) | QmpError::WrongPeer { .. }))) => {
            let error = anyhow!(e).context(format!("{flag} {}", path.display())).context("nothing was changed");
            return Err(Failure { code: exit::REFUSED, error, state: Value::Null });
        }
        Ok(Err(_)) | Err(_) => return Ok(None),
    };
    q.set_timeout(CMD);
    Ok(Some(q))
}

async fn run_state(q: &mut Option<Qmp>) -> Option<String> {
    match q {
        Some(q) => q.query_status().await.ok().map(|s| s.status),
        None => None,
    }
}

/// Resumes a guest that is paused for any reason but a finished migration.
async fn resume(qemu: &mut Qmp) -> Result<()> {
    for _ in 0..RESUME_TRIES {
        let s = qemu.query_status().await?;
        match s.status.as_str() {
            _ if s.running => return Ok(()),
            "postmigrate" | "inmigrate" => {
                return Err(anyhow!("the guest cannot be resumed there (status {})", s.status))
            }
            "finish-migrate" => tokio::time::sleep(Duration::from_millis(100)).await,
            _ => {
                if qemu.cont().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    Err(anyhow!("the guest did not resume"))
}

/// One disk's source proxy as `--recover` finds it.
struct Found {
    name: String,
    path: std::path::PathBuf,
    proxy: Option<Qmp>,
    phase: Option<Phase>,
}

/// Brings every component to one consistent state; the report says where the guest runs.
pub async fn recover(args: Args) -> Result<Value, Failure> {
    let fail = |e: anyhow::Error| Failure { code: exit::ROLLBACK_FAILED, error: e, state: Value::Null };
    let mut src = reach(args.src_qmp(), "--src-qmp", Peer::Qemu).await?;
    let mut dst = reach(args.dst_qmp(), "--dst-qmp", Peer::Qemu).await?;
    let mut found = find_disks(&args).await?;
    let src_state = run_state(&mut src).await;
    let dst_state = run_state(&mut dst).await;
    let mut actions: Vec<String> = Vec::new();
    if matches!(dst_state.as_deref(), Some("running" | "io-error")) {
        // The switchover happened: the destinations own the disks; the sources only confirm it.
        // A guest paused on a disk error (a read of a block the post-copy had not brought
        // while the link or the source was down) resumes once every block is there.
        complete_all(&mut found, &mut actions).await.map_err(fail)?;
        if let (Some(q), Some("io-error")) = (&mut dst, dst_state.as_deref()) {
            resume(q).await.context("resuming the guest on the destination").map_err(fail)?;
            actions.push("cont on the destination QEMU".into());
        }
        return Ok(json!({ "guest": "destination", "actions": actions }));
    }
    if src_state.as_deref() == Some("postmigrate") {
        // QEMU switched over, but the destination guest does not run.
        return match (&mut dst, dst_state.as_deref()) {
            (Some(q), Some(s)) if s != "inmigrate" => {
                resume(q).await.context("resuming the guest on the destination").map_err(fail)?;
                actions.push("cont on the destination QEMU".into());
                let _ = complete_all(&mut found, &mut actions).await;
                Ok(json!({ "guest": "destination", "actions": actions }))
            }
            _ => Err(fail(anyhow!(
                "the source QEMU finished the migration (postmigrate) but the destination QEMU is {}: the guest \
                 stopped; its disks are on the destination proxies: start the VM there from them",
                dst_state.as_deref().unwrap_or("gone")
            ))),
        };
    }
    undo(&args, &mut src, src_state.as_deref(), &mut found, &mut actions).await.map_err(fail)?;
    Ok(json!({ "guest": "source", "actions": actions }))
}

/// Every disk's source proxy, as far as it answers, and its phase.
async fn find_disks(args: &Args) -> Result<Vec<Found>, Failure> {
    let specs = disk_specs(args).map_err(|e| Failure { code: exit::REFUSED, error: anyhow!(e), state: Value::Null })?;
    let mut found = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let (flag, _) = proxy_flags(args, i);
        let mut proxy = reach(&spec.src_proxy, &flag, Peer::Proxy).await?;
        let phase = match &mut proxy {
            Some(p) => p.call::<QueryMigrate>(NoArgs {}).await.ok().map(|m| m.phase),
            None => None,
        };
        found.push(Found { name: disk_name(i, specs.len()), path: spec.src_proxy.clone(), proxy, phase });
    }
    Ok(found)
}

/// No switchover: the guest belongs on the source. Every disk goes back to its source proxy
/// first, then QEMU's migration is cancelled and the source guest resumed.
async fn undo(
    args: &Args,
    src: &mut Option<Qmp>,
    src_state: Option<&str>,
    found: &mut [Found],
    actions: &mut Vec<String>,
) -> Result<()> {
    for f in found.iter_mut() {
        match (&mut f.proxy, f.phase) {
            (Some(p), Some(phase)) if phase != Phase::Idle && phase != Phase::Completed => {
                p.call_within::<MigrateCancel>(NoArgs {}, DISK_CANCEL_TIMEOUT)
                    .await
                    .with_context(|| format!("giving the {} back to the source proxy (migrate-cancel)", f.name))?;
                actions.push(format!("migrate-cancel on the source proxy ({})", f.name));
            }
            (Some(_), _) => {}
            (None, _) => {
                return Err(anyhow!(
                    "the source proxy of the {} does not answer at {}: restart it (it keeps refusing writes if it \
                     handed the disk over), then run --recover again",
                    f.name,
                    f.path.display()
                ))
            }
        }
    }
    let Some(q) = src else {
        return Err(anyhow!(
            "the source QEMU does not answer at {}: the guest stopped; its disks are back on the source proxies: \
             start the VM there from them",
            args.src_qmp().display()
        ));
    };
    let migrating = q.query_migrate().await.map(|m| !m.is_finished() && m.status != "none").unwrap_or(false);
    if migrating || src_state != Some("running") {
        let _ = q.migrate_cancel().await;
        actions.push("migrate_cancel on the source QEMU".into());
    }
    resume(q).await.context("resuming the guest on the source")
}

/// After the switchover: `migrate-complete` on every source proxy that handed its disk over,
/// once its post-copy push (if one runs) has ended: the source is the only copy of what the
/// destination still misses until then, and refuses to complete.
async fn complete_all(found: &mut [Found], actions: &mut Vec<String>) -> Result<()> {
    for f in found {
        if let (Some(p), Some(Phase::HandedOver | Phase::Finishing)) = (&mut f.proxy, f.phase) {
            if wait_push(p, &f.name).await? {
                actions.push(format!("waited for the post-copy push to end ({})", f.name));
            }
            p.call::<MigrateComplete>(NoArgs {})
                .await
                .with_context(|| format!("migrate-complete on the source proxy ({})", f.name))?;
            actions.push(format!("migrate-complete on the source proxy ({})", f.name));
        }
    }
    Ok(())
}

/// Waits while the source proxy pushes a post-copy residual (no bound: nothing can be undone
/// after the switchover, and the push resumes by itself after a link failure); true if it waited.
async fn wait_push(proxy: &mut Qmp, name: &str) -> Result<bool> {
    let mut waited = false;
    loop {
        let s = proxy.call::<QueryMigrate>(NoArgs {}).await.with_context(|| format!("the source proxy ({name})"))?;
        let Some(p) = s.postcopy.filter(|p| !p.done) else {
            if waited {
                progress_done();
            }
            return Ok(waited);
        };
        waited = true;
        let what = match &p.stalled {
            Some(why) => format!("link down, reconnecting: {why}"),
            None => format!("{} of {} blocks left", p.remaining_blocks, p.blocks.max(p.remaining_blocks)),
        };
        progress_line(&format!("{name} post-copy"), &what);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
