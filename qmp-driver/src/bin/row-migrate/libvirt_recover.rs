//! `--domain NAME --to URI --recover`: after a `row-migrate --domain` that was killed (or ended
//! with 4 or 5), brings the domain's disks to where libvirt left the domain.
//!
//! libvirt's own job may outlive row-migrate (virsh goes on without it), so `--recover` first
//! waits for that job to end. Then: if the domain runs on the destination, each disk's hand-over
//! completes by itself (the destination's first write claims it, the source pushes the rest):
//! `--recover` waits for that and resumes a destination guest paused on an I/O error. If the
//! domain runs on the source, every disk still armed is disarmed (`migrate-cancel`), so the
//! source's writes are plain again, and a paused source guest is resumed. Anything else is
//! reported with the states found, never guessed at (exit 4).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use control_api::{MigrateCancel, NoArgs, Phase};
use serde_json::{json, Value};

use crate::ctx::Failure;
use crate::libvirt::{parse_disks, parse_jobinfo, phase, reach, virsh};
use crate::report::{progress_done, progress_line};
use crate::{exit, Args};

/// Where a domain is after its migration job, from `virsh domstate --reason` on each host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// It runs (or is paused) on the source only.
    Source,
    /// It runs (or is paused) on the destination only.
    Destination,
    /// Neither, or both: nothing is changed.
    Unclear,
}

/// `virsh domstate --reason` says the domain is there and not shut off.
fn active(state: Option<&str>) -> bool {
    state.is_some_and(|s| ["running", "paused", "idle", "in shutdown", "pmsuspended"].iter().any(|a| s.starts_with(a)))
}

fn running(state: Option<&str>) -> bool {
    state.is_some_and(|s| s.starts_with("running"))
}

/// Where the domain is, once libvirt's job has ended. A destination domain still paused for
/// an incoming migration is libvirt's leftover, not a guest. A RAM post-copy state on either
/// side (the guest needs both hosts, or QEMU's own recovery) is never guessed at.
pub fn side(src: Option<&str>, dst: Option<&str>) -> Side {
    if [src, dst].into_iter().flatten().any(|s| s.contains("post-copy")) {
        return Side::Unclear;
    }
    let dst_incoming = dst.is_some_and(|s| s.starts_with("paused (migrating)") || s.starts_with("paused (migration"));
    let dst_active = active(dst) && !dst_incoming;
    match (active(src), dst_active) {
        (true, false) => Side::Source,
        (false, true) => Side::Destination,
        // A source paused after the switchover (post-migrate) beside a running destination.
        (true, true) if running(dst) && !running(src) && !src.is_some_and(|s| s.starts_with("paused")) => {
            Side::Destination
        }
        _ => Side::Unclear,
    }
}

fn failed(error: anyhow::Error, state: Value) -> Failure {
    Failure { code: exit::ROLLBACK_FAILED, error, state }
}

/// `virsh domstate --reason NAME` on `uri`, `None` if the host does not know the domain; an
/// error if that host cannot be asked (unreachable is not "not there").
fn domstate(uri: Option<&str>, name: &str) -> anyhow::Result<Option<String>> {
    match virsh(uri, &["domstate", "--reason", name]) {
        Ok(s) => Ok(Some(s.lines().next().unwrap_or_default().trim().to_string())),
        Err(e) if not_defined(&format!("{e:#}")) => Ok(None),
        Err(e) => Err(e),
    }
}

/// How long the domain's states may take to settle once libvirt's job has ended (libvirt tears
/// down an aborted incoming domain, or resumes the source, after it).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A state libvirt passes through, not one a domain stays in.
fn transitional(state: Option<&str>) -> bool {
    state.is_some_and(|s| {
        s.starts_with("in shutdown") || ["(migrating)", "(migration)", "(starting up)"].iter().any(|r| s.contains(r))
    })
}

/// Both hosts' `domstate --reason` once neither is in a passing state (or after
/// [`SETTLE_TIMEOUT`], as they are then).
async fn settled_states(from: Option<&str>, to: &str, name: &str) -> Result<(Option<String>, Option<String>), Failure> {
    let asked = |uri: Option<&str>, host: &str| {
        domstate(uri, name)
            .map_err(|e| failed(e.context(format!("asking the {host}'s libvirt: nothing was changed")), Value::Null))
    };
    let t0 = Instant::now();
    loop {
        let src = asked(from, "source")?;
        let dst = asked(Some(to), "destination")?;
        if !(transitional(src.as_deref()) || transitional(dst.as_deref())) || t0.elapsed() > SETTLE_TIMEOUT {
            return Ok((src, dst));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// virsh's words (LC_ALL=C) for a domain the host does not know.
fn not_defined(error: &str) -> bool {
    error.contains("failed to get domain") || error.contains("Domain not found")
}

/// A guest paused by an I/O error (a read of a block the post-copy push had not brought yet):
/// the only pause `--recover` undoes; any other was someone's decision.
fn io_error_pause(state: Option<&str>) -> bool {
    state.is_some_and(|s| s.starts_with("paused (I/O error)"))
}

/// Waits while the source's libvirt runs a job on the domain (a migration virsh still drives).
async fn wait_for_job(from: Option<&str>, name: &str, timeout: Duration) -> Result<bool, Failure> {
    let t0 = Instant::now();
    let mut waited = false;
    loop {
        let Ok(text) = virsh(from, &["domjobinfo", name]) else { break };
        let info = parse_jobinfo(&text);
        let kind = info.get("job-type").and_then(Value::as_str).unwrap_or("None");
        if kind == "None" {
            break;
        }
        if t0.elapsed() > timeout {
            progress_done();
            return Err(failed(
                anyhow!(
                    "libvirt still runs a {kind} job on domain {name} after {timeout:?}: let it end (or virsh \
                     domjobabort {name}), then run --recover again"
                ),
                Value::Null,
            ));
        }
        waited = true;
        progress_line("libvirt's job", &format!("{kind}, waiting for it to end"));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    if waited {
        progress_done();
    }
    Ok(waited)
}

/// The source control sockets of the domain's proxy disks (`X.ctl` beside `X.sock`), from its
/// XML on whichever host still defines it (both serve a disk on the same path).
fn source_proxies(args: &Args, name: &str) -> Result<Vec<(String, PathBuf)>, Failure> {
    let xml = virsh(args.from.as_deref(), &["dumpxml", name])
        .or_else(|_| virsh(args.to.as_deref(), &["dumpxml", name]))
        .map_err(|e| failed(e.context(format!("--domain {name}: neither host defines it")), Value::Null))?;
    let disks = parse_disks(&xml).map_err(|e| failed(anyhow!("--domain {name}: {e}"), Value::Null))?;
    // The same classification as the migration's plan (the destination side is not needed here).
    let (ours, others) = crate::libvirt::ours(&disks, Path::exists, Path::new(""))
        .map_err(|e| failed(anyhow!("--domain {name}: {e}"), Value::Null))?;
    if !others.is_empty() && !args.allow_unmoved_drives {
        return Err(failed(
            anyhow!(
                "--domain {name}: writable disks without an nbd-row-proxy control socket beside them on this host: {}; \
                 nothing was changed (a proxy not running here: start it; on storage both hosts share: \
                 --allow-unmoved-drives)",
                others.join(", ")
            ),
            Value::Null,
        ));
    }
    Ok(ours.into_iter().map(|m| (m.target, m.spec.src_proxy)).collect())
}

/// Brings the domain's disks to where libvirt left the domain; the report says where it runs.
pub async fn recover(args: Args) -> Result<Value, Failure> {
    let name = args.domain.clone().unwrap_or_default();
    let from = args.from.clone();
    let Some(to) = args.to.clone() else {
        return Err(Failure {
            code: exit::REFUSED,
            error: anyhow!("--domain {name} --recover: --to URI (the destination's libvirt) is needed"),
            state: Value::Null,
        });
    };
    let mut actions: Vec<String> = Vec::new();
    if wait_for_job(from.as_deref(), &name, args.timeout).await? {
        actions.push("waited for libvirt's migration job to end".into());
    }
    let disks = source_proxies(&args, &name)?;
    let (src, dst) = settled_states(from.as_deref(), &to, &name).await?;
    let states = json!({"source": src, "destination": dst});
    match side(src.as_deref(), dst.as_deref()) {
        Side::Destination => {
            complete_all(&disks, args.timeout, &mut actions).await.map_err(|e| failed(e, states.clone()))?;
            if io_error_pause(dst.as_deref()) {
                virsh(Some(&to), &["resume", &name]).map_err(|e| failed(e, states.clone()))?;
                actions.push("resumed the domain on the destination".into());
            }
            Ok(json!({ "guest": "destination", "domain": name, "states": states, "actions": actions }))
        }
        Side::Source => {
            disarm_all(&disks, &mut actions).await.map_err(|e| failed(e, states.clone()))?;
            if io_error_pause(src.as_deref()) {
                virsh(from.as_deref(), &["resume", &name]).map_err(|e| failed(e, states.clone()))?;
                actions.push("resumed the domain on the source".into());
            }
            Ok(json!({ "guest": "source", "domain": name, "states": states, "actions": actions }))
        }
        Side::Unclear => Err(failed(
            anyhow!(
                "domain {name} is {} on the source and {} on the destination: nothing was changed; start it on \
                 the host whose proxies own its disks (query-status: incoming-phase owner, or a source not fenced)",
                src.as_deref().unwrap_or("unknown"),
                dst.as_deref().unwrap_or("unknown")
            ),
            states,
        )),
    }
}

/// The domain runs on the destination: every disk's hand-over ends completed (by itself).
async fn complete_all(disks: &[(String, PathBuf)], timeout: Duration, actions: &mut Vec<String>) -> anyhow::Result<()> {
    let t0 = Instant::now();
    for (target, ctl) in disks {
        let mut waited = false;
        loop {
            let s = phase(ctl).await?;
            match s.phase {
                Phase::Completed => break,
                Phase::Ready | Phase::Finishing | Phase::HandedOver => {}
                other => {
                    return Err(anyhow!(
                        "disk {target}: the domain runs on the destination but its source proxy is {other}{}: the \
                         destination may run on a copy that was not handed over; stop it and check both proxies",
                        s.error.map(|e| format!(" ({e})")).unwrap_or_default()
                    ))
                }
            }
            if t0.elapsed() > timeout {
                progress_done();
                return Err(anyhow!(
                    "disk {target}: not handed over after {timeout:?} (source proxy {}); it still will be, on the \
                     destination's first write: run --recover again",
                    s.phase
                ));
            }
            waited = true;
            progress_line(&format!("{target} hand-over"), s.phase.as_str());
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        if waited {
            progress_done();
            actions.push(format!("waited for the hand-over of {target} to complete"));
        }
    }
    Ok(())
}

/// The domain runs on the source: every armed disk is disarmed; one already handed over is an
/// error (its source refuses writes: the domain cannot go on there).
async fn disarm_all(disks: &[(String, PathBuf)], actions: &mut Vec<String>) -> anyhow::Result<()> {
    for (target, ctl) in disks {
        let s = phase(ctl).await?;
        match s.phase {
            Phase::Idle | Phase::Cancelled | Phase::Failed => {}
            Phase::Setup | Phase::Precopy | Phase::Ready => {
                let mut q = reach(ctl).await?;
                q.call::<MigrateCancel>(NoArgs {}).await.map_err(|e| anyhow!("disk {target}: migrate-cancel: {e}"))?;
                actions.push(format!("disarmed {target} (migrate-cancel on its source proxy)"));
            }
            Phase::Finishing | Phase::HandedOver | Phase::Completed => {
                return Err(anyhow!(
                    "disk {target}: the domain runs on the source, but its disk was handed over to the destination \
                     (source proxy {}): the source refuses its writes; stop the domain here and start it on the \
                     destination",
                    s.phase
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_side_is_where_libvirt_left_the_domain() {
        assert_eq!(side(Some("running (migration canceled)"), None), Side::Source);
        assert_eq!(side(Some("paused (user)"), Some("shut off (destroyed)")), Side::Source);
        assert_eq!(side(Some("running (unpaused)"), Some("paused (migrating)")), Side::Source);
        assert_eq!(side(None, Some("running (migrated)")), Side::Destination);
        assert_eq!(side(Some("shut off (migrated)"), Some("paused (I/O error)")), Side::Destination);
        assert_eq!(side(Some("paused (post-copy)"), Some("running (migrated)")), Side::Unclear);
        assert_eq!(side(Some("paused (post-copy failed)"), None), Side::Unclear);
        assert_eq!(side(Some("paused (migrating)"), Some("running (migrated)")), Side::Unclear);
        assert_eq!(side(Some("shut off (migrated)"), Some("running (migrated)")), Side::Destination);
        assert_eq!(side(Some("running (booted)"), Some("running (migrated)")), Side::Unclear);
        assert_eq!(side(None, None), Side::Unclear);
        assert_eq!(side(Some("shut off (destroyed)"), Some("shut off (crashed)")), Side::Unclear);
        assert!(io_error_pause(Some("paused (I/O error)")));
        assert!(transitional(Some("in shutdown (unknown)")) && transitional(Some("paused (migrating)")));
        assert!(!transitional(Some("running (booted)")) && !transitional(None));
        assert!(!io_error_pause(Some("paused (user)")) && !io_error_pause(Some("paused (post-copy failed)")));
        assert!(not_defined("virsh domstate --reason x failed (exit status: 1): error: failed to get domain 'x'"));
        assert!(!not_defined("error: failed to connect to the hypervisor"));
    }
}
