//! qemu-mirror, the industry baseline: the source QEMU mirrors its drive onto the destination
//! proxy's NBD export (`blockdev-mirror`), as libvirt's `--copy-storage-all` does, and what it
//! adds to the source QEMU is removed again on every path.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use qmp_driver::Qmp;
use serde_json::{json, Value};

use crate::ctx::{Ctx, TLS_OBJECT};
use crate::report::{progress_done, progress_line};
use crate::MirrorMode;

/// How long the mirror job may take to end after `block-job-cancel`.
pub const MIRROR_CANCEL_TIMEOUT: Duration = Duration::from_secs(300);
/// Node and job names the mirror strategy creates on the source QEMU.
pub const MIRROR_NODE: &str = "rowmig-target";
pub const MIRROR_JOB: &str = "rowmig-mirror";

/// The copy mode the mirror starts with (`ready-then-write-blocking` switches at READY when
/// the QEMU can).
pub fn mirror_copy_mode(mode: MirrorMode) -> &'static str {
    match mode {
        MirrorMode::Background => "background",
        MirrorMode::WriteBlocking | MirrorMode::ReadyThenWriteBlocking => "write-blocking",
    }
}

/// qemu-mirror: `blockdev-mirror` onto the destination proxy until the job is READY.
pub async fn mirror_until_ready(ctx: &mut Ctx) -> Result<Value> {
    let (host, port, export) = parse_nbd_uri(&ctx.disks[0].spec.uri)?;
    // A run that failed before this fix, or was killed, may have left the job or the node.
    if remove_mirror(&mut ctx.src).await.context("removing the mirror an earlier run left")? {
        tracing::warn!("removed the mirror job or node ({MIRROR_JOB}, {MIRROR_NODE}) an earlier run left");
        ctx.src.take_events();
    }
    let blocks = ctx.src.execute_raw("query-block", json!({})).await?;
    let node = blocks
        .as_array()
        .and_then(|b| b.iter().find_map(|d| d["inserted"]["node-name"].as_str().map(str::to_string)))
        .ok_or_else(|| anyhow!("the source QEMU has no drive to mirror"))?;
    let mut target = json!({ "driver": "nbd", "node-name": MIRROR_NODE,
                             "server": { "type": "inet", "host": host, "port": port }, "export": export });
    if ctx.args.tls_creds.is_some() {
        target["tls-creds"] = json!(TLS_OBJECT);
    }
    ctx.src.execute_raw("blockdev-add", target).await.context("connecting the source QEMU to the destination proxy")?;
    ctx.mirror_started = true;
    let switch_at_ready = ctx.args.mirror_copy_mode == MirrorMode::ReadyThenWriteBlocking && ctx.block_job_change;
    let mode = if switch_at_ready { "background" } else { mirror_copy_mode(ctx.args.mirror_copy_mode) };
    let mut job =
        json!({ "job-id": MIRROR_JOB, "device": node, "target": MIRROR_NODE, "sync": "full", "copy-mode": mode });
    if let Some(b) = ctx.args.max_bandwidth {
        job["speed"] = json!(b);
    }
    ctx.src.execute_raw("blockdev-mirror", job).await.context("blockdev-mirror")?;
    loop {
        if let Some(e) = ctx.src.next_event(Duration::from_millis(250)).await? {
            match e.name.as_str() {
                "BLOCK_JOB_READY" => break,
                "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_ERROR" => {
                    // BLOCK_JOB_ERROR says which operation failed, BLOCK_JOB_COMPLETED why.
                    let why = e.data["error"].as_str().map(str::to_string).unwrap_or_else(|| {
                        let op = e.data["operation"].as_str().unwrap_or("an I/O");
                        format!("{op} error (is the destination proxy still there?)")
                    });
                    bail!("the mirror to {} failed before it was ready: {why}", ctx.disks[0].spec.uri)
                }
                _ => continue,
            }
        }
        let jobs = ctx.src.execute_raw("query-block-jobs", json!({})).await?;
        if let Some(j) = jobs.as_array().and_then(|j| j.first()) {
            let (off, len) = (j["offset"].as_u64().unwrap_or(0), j["len"].as_u64().unwrap_or(1).max(1));
            progress_line("mirror", &format!("{} / {} MiB", off >> 20, len >> 20));
        }
    }
    progress_done();
    if switch_at_ready {
        // From here every guest write waits until it is mirrored: what is left cannot grow.
        let change = json!({ "id": MIRROR_JOB, "type": "mirror", "copy-mode": "write-blocking" });
        ctx.src.execute_raw("block-job-change", change).await.context("block-job-change to write-blocking")?;
    }
    let mut stats = mirror_stats(ctx).await?;
    stats["copy-mode"] = json!(if switch_at_ready { "background, write-blocking at READY" } else { mode });
    Ok(stats)
}

pub async fn mirror_stats(ctx: &mut Ctx) -> Result<Value> {
    let jobs = ctx.src.execute_raw("query-block-jobs", json!({})).await?;
    let job = jobs.as_array().and_then(|j| j.first()).cloned().unwrap_or_default();
    Ok(json!({ "strategy": "qemu-mirror", "total-wire-bytes": job["offset"], "len": job["len"] }))
}

/// At `pre-switchover`: cancel the READY mirror, which leaves the target consistent.
pub async fn mirror_complete(ctx: &mut Ctx) -> Result<Value> {
    let stats = mirror_stats(ctx).await?;
    ctx.src.execute_raw("block-job-cancel", json!({ "device": MIRROR_JOB })).await.context("block-job-cancel")?;
    ctx.src
        .wait_event(MIRROR_CANCEL_TIMEOUT, |e| e.name == "BLOCK_JOB_COMPLETED" || e.name == "BLOCK_JOB_CANCELLED")
        .await
        .context("the mirror did not complete")?;
    remove_mirror(&mut ctx.src).await.context("removing the mirror's target node")?;
    ctx.mirror_started = false;
    Ok(stats)
}

/// How long the mirror's job and node may take to go.
pub const MIRROR_REMOVE_TIMEOUT: Duration = Duration::from_secs(60);

/// Removes what qemu-mirror adds to the source QEMU, if it is there: cancels the job
/// ([`MIRROR_JOB`]) and waits until it is gone (dismissing it if it concluded), then deletes
/// the target node ([`MIRROR_NODE`]), which the job holds until it is gone. Returns whether
/// there was anything to remove.
pub async fn remove_mirror(qemu: &mut Qmp) -> Result<bool> {
    let deadline = Instant::now() + MIRROR_REMOVE_TIMEOUT;
    let mut found = false;
    let mut cancelled = false;
    loop {
        let jobs = qemu.execute_raw("query-jobs", json!({})).await.context("query-jobs")?;
        let Some(job) = jobs.as_array().and_then(|j| j.iter().find(|j| j["id"] == MIRROR_JOB)).cloned() else {
            break;
        };
        found = true;
        let status = job["status"].as_str().unwrap_or_default();
        match status {
            "concluded" => {
                let _ = qemu.execute_raw("job-dismiss", json!({ "id": MIRROR_JOB })).await;
            }
            "pending" => {
                let _ = qemu.execute_raw("job-finalize", json!({ "id": MIRROR_JOB })).await;
            }
            "aborting" | "waiting" | "null" => {}
            _ if !cancelled => {
                let _ = qemu.execute_raw("block-job-cancel", json!({ "device": MIRROR_JOB, "force": true })).await;
                cancelled = true;
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            bail!("the mirror job {MIRROR_JOB} is still there (status {status}) after {MIRROR_REMOVE_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    loop {
        let nodes = qemu.execute_raw("query-named-block-nodes", json!({})).await.context("query-named-block-nodes")?;
        if !nodes.as_array().is_some_and(|n| n.iter().any(|n| n["node-name"] == MIRROR_NODE)) {
            return Ok(found);
        }
        found = true;
        match qemu.execute_raw("blockdev-del", json!({ "node-name": MIRROR_NODE })).await {
            Ok(_) => return Ok(found),
            Err(e) if Instant::now() >= deadline => {
                return Err(anyhow!(e).context(format!("blockdev-del {MIRROR_NODE} on the source QEMU")))
            }
            Err(e) => tracing::debug!("blockdev-del {MIRROR_NODE}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Parses `--disk-uri` for qemu-mirror: `nbd://HOST[:PORT]/EXPORT`.
pub fn parse_nbd_uri(uri: &str) -> Result<(String, String, String)> {
    let bad = || anyhow!("{uri:?}: --disk-uri for qemu-mirror must be nbd://HOST:PORT/EXPORT");
    let rest = uri.strip_prefix("nbd://").ok_or_else(bad)?;
    let (hostport, export) = rest.split_once('/').unwrap_or((rest, ""));
    // An IPv6 address goes in brackets; the port defaults to NBD's.
    let (host, port) = match hostport.strip_prefix('[') {
        Some(v6) => {
            let (host, after) = v6.split_once(']').ok_or_else(bad)?;
            (host, if after.is_empty() { "10809" } else { after.strip_prefix(':').ok_or_else(bad)? })
        }
        None => hostport.split_once(':').unwrap_or((hostport, "10809")),
    };
    if host.is_empty() || port.parse::<u16>().ok().filter(|p| *p != 0).is_none() {
        return Err(bad());
    }
    Ok((host.to_string(), port.to_string(), export.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_uris_are_checked() {
        assert_eq!(parse_nbd_uri("nbd://h:10809/vm1").unwrap(), ("h".into(), "10809".into(), "vm1".into()));
        assert_eq!(parse_nbd_uri("nbd://h/vm1").unwrap(), ("h".into(), "10809".into(), "vm1".into()));
        assert_eq!(parse_nbd_uri("nbd://[::1]:7/x").unwrap(), ("::1".into(), "7".into(), "x".into()));
        for bad in ["tcp:h:1", "nbd://:1/x", "nbd://h:port/x", "nbd://[::1/x"] {
            assert!(parse_nbd_uri(bad).is_err(), "{bad}");
        }
    }
}
