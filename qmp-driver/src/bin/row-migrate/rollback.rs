//! Undoing a failed migration before the switchover, in the order that never lets the guest
//! run on a disk another host may own: the disk is given back to the source first; only then is
//! QEMU's migration cancelled and the guest resumed. If the disk cannot be given back after its
//! hand-over began, the guest stays paused and the error says what to check.

use std::time::Duration;

use anyhow::{anyhow, Result};
use control_api::{NoArgs, QueryMigrate};
use qmp_driver::proxy::status;
use qmp_driver::DiskMigration;
use serde_json::{json, Value};

use crate::ctx::{each_disk, Ctx};
use crate::mirror::{remove_mirror, MIRROR_JOB, MIRROR_NODE};

/// How long the source proxy may take to give the disk back (it may ask the destination).
const DISK_CANCEL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the state queries for the report may take each.
const STATE_TIMEOUT: Duration = Duration::from_secs(5);
/// Tries, 100 ms apart, to get the source guest running again.
const RESUME_TRIES: u32 = 50;

/// Undoes whatever was started, leaving the guest running on the source when that is safe.
pub async fn rollback(ctx: &mut Ctx) -> Result<()> {
    eprintln!("row-migrate: rolling back");
    let mut errors = Vec::new();
    // qemu-mirror: the job and its target node go (the next run would otherwise find the node
    // name taken). Whether they were added is not known for sure when the failure interrupted
    // a command, so they are looked for.
    if ctx.mirror_started || !ctx.args.strategy.by_proxies() {
        match remove_mirror(&mut ctx.src).await {
            Ok(_) => ctx.mirror_started = false,
            Err(e) => tracing::warn!(
                "the mirror job {MIRROR_JOB} or its node {MIRROR_NODE} may be left on the source QEMU (the next \
                 row-migrate removes them): {e:#}"
            ),
        }
    }
    // The disks first. Before migrate-finish no destination got a commit, so the source may
    // run whatever its proxies say; after it, only once every proxy has its disk back.
    let mut disk_back = true;
    let finish_sent = ctx.finish_sent;
    let results = each_disk(&mut ctx.disks, |d| async move {
        if !d.started {
            return None;
        }
        let r = DiskMigration { source: &mut d.src_proxy }.cancel(DISK_CANCEL_TIMEOUT).await;
        r.err().map(|e| format!("migrate-cancel on the source proxy ({}): {e:#}", d.name))
    })
    .await;
    for e in results.into_iter().flatten() {
        errors.push(e);
        disk_back &= !finish_sent;
    }
    if !disk_back {
        errors.push(
            "the guest is left paused on the source, because a destination may own its disk. Check \
             `query-status` on each destination proxy named above: if its incoming phase is committed or owner, the destination \
             holds the disk; run `migrate-cancel` on the source proxy again once the destination is reachable, or, \
             if the destination is gone for good, `reclaim` with force: true on the source proxy, then `cont` on \
             the source QEMU"
                .to_string(),
        );
        return Err(anyhow!(errors.join("; ")));
    }
    if ctx.mem_started {
        if let Err(e) = ctx.src.migrate_cancel().await {
            errors.push(format!("migrate_cancel: {e:#}"));
        }
    }
    // The guest may be paused at pre-switchover, by a failed migration, or by an I/O error.
    for _ in 0..RESUME_TRIES {
        match ctx.src.query_status().await {
            Ok(s) if s.running => break,
            Ok(s) if s.status == "postmigrate" => {
                errors.push("the source QEMU finished the migration (postmigrate): it is not resumed".into());
                break;
            }
            Ok(s) if s.status == "finish-migrate" => tokio::time::sleep(Duration::from_millis(100)).await,
            Ok(_) => {
                if let Err(e) = ctx.src.cont().await {
                    tracing::debug!("cont: {e:#}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            Err(e) => {
                errors.push(format!("the source QEMU: {e:#}"));
                break;
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(anyhow!(errors.join("; ")))
    }
}

async fn within<T>(f: impl std::future::Future<Output = Result<T, qmp_driver::QmpError>>) -> Result<T, String> {
    match tokio::time::timeout(STATE_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {STATE_TIMEOUT:?}")),
    }
}

/// The state each component was left in, for the `--json` failure report.
pub async fn states(ctx: &mut Ctx) -> Value {
    let qemu = |r: Result<qmp_driver::VmStatus, String>| match r {
        Ok(s) => json!({ "status": s.status, "running": s.running }),
        Err(e) => json!({ "error": e }),
    };
    let src = qemu(within(ctx.src.query_status()).await);
    let dst = qemu(within(ctx.dst.query_status()).await);
    let mut disks = Vec::new();
    for d in &mut ctx.disks {
        let src_proxy =
            match (within(status(&mut d.src_proxy)).await, within(d.src_proxy.call::<QueryMigrate>(NoArgs {})).await) {
                (Ok(s), Ok(m)) => {
                    json!({ "phase": m.phase, "writes-refused": s.writes_refused, "fence": s.fence, "mode": s.mode })
                }
                (Err(e), _) | (_, Err(e)) => json!({ "error": e }),
            };
        let dst_proxy = match within(status(&mut d.dst_proxy)).await {
            Ok(s) => {
                json!({ "incoming": s.incoming, "incoming-phase": s.incoming_phase, "writes-refused": s.writes_refused })
            }
            Err(e) => json!({ "error": e }),
        };
        disks.push(json!({ "name": d.name, "source-proxy": src_proxy, "destination-proxy": dst_proxy }));
    }
    // One disk keeps the flat shape scripts already read; several are listed under "disks".
    let mut state = json!({ "source-qemu": src, "destination-qemu": dst });
    if let [one] = disks.as_slice() {
        state["source-proxy"] = one["source-proxy"].clone();
        state["destination-proxy"] = one["destination-proxy"].clone();
    } else {
        state["disks"] = Value::Array(disks);
    }
    state
}
