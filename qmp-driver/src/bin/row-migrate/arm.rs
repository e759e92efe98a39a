//! `--arm-only`: arms every disk for the hand-over that follows a VM manager's own live
//! migration, and returns once each is ready. The manager (libvirt, Nova, ...) then migrates
//! the guest as if its disk were on shared storage; the destination's first write takes each
//! disk (see `migrate-start`'s `arm`). Nothing here talks to QEMU.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use control_api::{IncomingPhase, MigrateCancel, MigrateStartArgs, NoArgs, Phase, QueryStatus};
use qmp_driver::{DiskMigration, Peer, Qmp};
use serde_json::{json, Value};

use crate::ctx::{Failure, CMD};
use crate::disks::proxy_flags;
use crate::disks::{disk_name, disk_specs};
use crate::report::{progress_detail, progress_done, progress_line};
use crate::{exit, Args, Strategy};

/// How long a proxy may take to answer the first time.
const REACH_TIMEOUT: Duration = Duration::from_secs(5);

fn refused(error: anyhow::Error) -> Failure {
    Failure { code: exit::REFUSED, error: error.context("nothing was changed"), state: Value::Null }
}

async fn reach(path: &Path, flag: &str) -> Result<Qmp> {
    let mut q = Qmp::connect_to(path, REACH_TIMEOUT, Peer::Proxy)
        .await
        .with_context(|| format!("{flag} {}: cannot reach the proxy", path.display()))?;
    q.set_timeout(CMD);
    Ok(q)
}

/// Arms every disk; on a failure the disks already started are disarmed (exit 3).
pub async fn arm(args: Args) -> Result<Value, Failure> {
    let strategy = match args.strategy {
        Strategy::Row => control_api::Strategy::Row,
        Strategy::Bitmap => control_api::Strategy::Bitmap,
        _ => return Err(refused(anyhow!("--arm-only moves disks with the row or bitmap strategy, not qemu-mirror"))),
    };
    let specs = disk_specs(&args).map_err(|e| refused(anyhow!(e)))?;
    // Every proxy is checked before any disk starts: the destinations must wait for a disk.
    let mut sources = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let (src_flag, dst_flag) = proxy_flags(&args, i);
        let src = reach(&spec.src_proxy, &src_flag).await.map_err(refused)?;
        let mut dst = reach(&spec.dst_proxy, &dst_flag).await.map_err(refused)?;
        let status = dst.call::<QueryStatus>(NoArgs {}).await.map_err(|e| refused(anyhow!(e)))?;
        if status.incoming_phase != Some(IncomingPhase::Waiting) {
            let phase = status.incoming_phase.map_or("not a receive proxy", |p| p.as_str());
            return Err(refused(anyhow!("{dst_flag} {}: not waiting for a disk ({phase})", spec.dst_proxy.display())));
        }
        sources.push((disk_name(i, specs.len()), spec.uri.clone(), src));
    }
    let share = args.max_bandwidth.map(|b| (b / specs.len() as u64).max(1));
    let mut started = Vec::new();
    let result = async {
        for (name, uri, src) in &mut sources {
            let mut start = MigrateStartArgs::new(uri.clone(), strategy);
            start.rounds = args.rounds;
            start.hot_threshold = args.hot_threshold;
            start.max_bandwidth = share;
            start.arm = true;
            let session = DiskMigration { source: src }
                .start(start)
                .await
                .with_context(|| format!("migrate-start on the source proxy ({name})"))?;
            started.push(name.clone());
            tracing::info!(disk = %name, %session, "arming");
        }
        let mut disks = Vec::new();
        for (name, _, src) in &mut sources {
            let ready = DiskMigration { source: src }
                .wait_ready(|m| {
                    let total = m.round_blocks.max(m.round_remaining_blocks) * 4096;
                    let done = total - m.round_remaining_blocks * 4096;
                    progress_line(&format!("{name} round {}", m.round), &progress_detail(done, total, m.rate));
                })
                .await
                .map_err(anyhow::Error::from)?;
            if ready.phase != Phase::Ready {
                bail!("{name}: the disk migration ended in phase {}", ready.phase);
            }
            disks.push(json!({"disk": name, "armed": true, "status": ready}));
        }
        progress_done();
        Ok::<_, anyhow::Error>(disks)
    }
    .await;
    match result {
        Ok(disks) => Ok(json!({"armed": true, "disk-count": disks.len(), "disks": disks})),
        Err(error) => {
            progress_done();
            let mut state = Vec::new();
            for (name, _, src) in &mut sources {
                if started.contains(name) {
                    let undone = src.call::<MigrateCancel>(NoArgs {}).await.is_ok();
                    state.push(json!({"disk": name, "disarmed": undone}));
                }
            }
            Err(Failure { code: exit::ROLLED_BACK, error: error.context("arming failed"), state: Value::Array(state) })
        }
    }
}

/// The text report of an armed run.
pub fn summary(report: &Value) -> String {
    let n = report["disk-count"].as_u64().unwrap_or_default();
    format!(
        "armed: {n} disk{} ready; the VM manager's live migration (as on shared storage) now moves {} on the \
         destination's first write. `migrate-cancel` on a source proxy disarms its disk.",
        if n == 1 { "" } else { "s" },
        if n == 1 { "it" } else { "each" }
    )
}
