//! `--domain NAME --to URI`: moves a domain that libvirt runs, with its disks on nbd-row-proxy.
//!
//! libvirt owns the domain's QMP monitor, so the disks move by the hand-over that follows a
//! manager's own migration (`--arm-only`): row-migrate reads the domain's XML (`virsh dumpxml`),
//! finds the disks served by nbd-row-proxy (`<disk type='network'>`, `protocol='nbd'`, a Unix
//! socket `DIR/X.sock` with the control socket `DIR/X.ctl` beside it), arms each for its
//! destination proxy (`--dst-control-dir DIR/X.ctl`), has libvirt migrate the domain as on shared
//! storage (`virsh migrate --live --persistent --undefinesource NAME URI`), follows libvirt's job
//! (`virsh domjobinfo`), and waits until every disk's hand-over has completed (the destination's
//! first write claims a disk; the source pushes what is left and completes by itself).
//!
//! libvirt is reached through `virsh`, not its C library: no build dependency on libvirt-dev,
//! any libvirt version the host has, and the very commands an operator would run (the same
//! connection URIs, `LIBVIRT_DEFAULT_URI`, authentication and `~/.config/libvirt` aliases).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use control_api::{MigrateCancel, MigrationStatus, NoArgs, Phase, QueryMigrate};
use qmp_driver::{Peer, Qmp};
use serde_json::{json, Map, Value};

use crate::ctx::{Failure, CMD};
use crate::disks::{disk_specs, DiskSpec};
use crate::report::{progress_detail, progress_done, progress_line};
use crate::{arm, exit, Args};
pub use qmp_driver::domain_xml::{parse_disks, Source, XmlDisk};

/// A disk of the domain that moves: its target and the proxies' control sockets and stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    /// `<target dev=...>`.
    pub target: String,
    /// The NBD socket both hosts serve the disk on.
    pub socket: PathBuf,
    /// The control sockets and the stream address.
    pub spec: DiskSpec,
}

/// Which disks move and how: a writable NBD disk on `DIR/X.sock` with `DIR/X.ctl` beside it
/// (`is_proxy`) is the proxy's; its destination control socket is `dst_dir/X.ctl`, its stream
/// `uris` (`DEV=URI`) or, for a domain with one such disk, `single_uri`. Other writable disks
/// are refused unless `allow_unmoved`.
pub fn plan(
    disks: &[XmlDisk],
    is_proxy: impl Fn(&Path) -> bool,
    dst_dir: &Path,
    single_uri: Option<&str>,
    uris: &[(String, String)],
    allow_unmoved: bool,
    dst_remote: bool,
) -> Result<Vec<Moved>, String> {
    let (mut moved, unmoved) = ours(disks, is_proxy, dst_dir)?;
    if moved.is_empty() {
        return Err(format!(
            "no disk of the domain is served by nbd-row-proxy (a <disk type='network'> with protocol 'nbd' on a Unix \
             socket X.sock, with the proxy's control socket X.ctl beside it){}",
            if unmoved.is_empty() { String::new() } else { format!("; its writable disks: {}", unmoved.join(", ")) }
        ));
    }
    if !unmoved.is_empty() && !allow_unmoved {
        return Err(format!(
            "the domain has writable disks nbd-row-proxy does not serve: {}; the destination would run on a copy \
             nobody moved (--allow-unmoved-drives if they are on storage both hosts share)",
            unmoved.join(", ")
        ));
    }
    streams(&mut moved, single_uri, uris)?;
    for m in &moved {
        if !dst_remote && m.spec.src_proxy == m.spec.dst_proxy {
            return Err(format!(
                "disk {}: the destination's control socket {} is the source's; without --dst-ssh, give \
                 --dst-control-dir where this host sees the destination proxies' control sockets",
                m.target,
                m.spec.dst_proxy.display()
            ));
        }
    }
    Ok(moved)
}

/// The writable disks the proxies serve (their streams still to give), and the others named
/// for the messages.
pub(crate) fn ours(
    disks: &[XmlDisk],
    is_proxy: impl Fn(&Path) -> bool,
    dst_dir: &Path,
) -> Result<(Vec<Moved>, Vec<String>), String> {
    let mut moved = Vec::new();
    let mut unmoved = Vec::new();
    for d in disks.iter().filter(|d| d.writable) {
        let socket = match &d.source {
            Source::NbdUnix(socket) => socket,
            Source::Other(kind) => {
                unmoved.push(format!("{} ({kind})", d.target));
                continue;
            }
        };
        let ctl = socket.with_extension("ctl");
        if !is_proxy(&ctl) {
            unmoved.push(format!(
                "{} (NBD on {}, no nbd-row-proxy control socket beside it)",
                d.target,
                socket.display()
            ));
            continue;
        }
        let name = ctl.file_name().ok_or_else(|| format!("{}: no file name", ctl.display()))?;
        moved.push(Moved {
            target: d.target.clone(),
            socket: socket.clone(),
            spec: DiskSpec { src_proxy: ctl.clone(), dst_proxy: dst_dir.join(name), uri: String::new() },
        });
    }
    Ok((moved, unmoved))
}

/// Gives each moved disk its stream address: its `--target-uri DEV=URI`, or `--disk-uri` when
/// the domain has one proxy disk.
fn streams(moved: &mut [Moved], single_uri: Option<&str>, uris: &[(String, String)]) -> Result<(), String> {
    for (dev, _) in uris {
        if !moved.iter().any(|m| &m.target == dev) {
            let ours: Vec<&str> = moved.iter().map(|m| m.target.as_str()).collect();
            return Err(format!(
                "--target-uri {dev}=...: the domain has no proxy disk {dev} (it has {})",
                ours.join(", ")
            ));
        }
    }
    let count = moved.len();
    for m in moved.iter_mut() {
        let given = uris.iter().find(|(dev, _)| *dev == m.target).map(|(_, u)| u.clone());
        m.spec.uri = match (given, single_uri) {
            (Some(u), _) => u,
            (None, Some(u)) if count == 1 => u.to_string(),
            (None, Some(_)) => {
                return Err(format!(
                    "the domain has {count} proxy disks: give each its stream address with --target-uri \
                     DEV=tcp:HOST:PORT (--disk-uri names one disk's)"
                ))
            }
            (None, None) => {
                return Err(format!(
                    "no stream address for disk {}: give --disk-uri tcp:HOST:PORT (the destination proxy's `receive \
                     --listen`), or --target-uri {}=tcp:HOST:PORT",
                    m.target, m.target
                ))
            }
        };
    }
    Ok(())
}

/// Parses a `--target-uri` value: `DEV=URI`.
pub fn parse_target_uri(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((dev, uri)) if !dev.is_empty() && !uri.is_empty() && !dev.contains('/') => {
            Ok((dev.to_string(), uri.to_string()))
        }
        _ => Err(format!("{s:?}: expected DEV=URI, e.g. vda=tcp:host-b:10810")),
    }
}

/// The domain being moved.
#[derive(Debug, Clone)]
pub struct Domain {
    /// Its name.
    pub name: String,
    /// The source's libvirt URI (`virsh -c`), or libvirt's default.
    pub from: Option<String>,
    /// The destination's libvirt URI.
    pub to: String,
    /// The disks that move, in the order of `args.disks`.
    pub moved: Vec<Moved>,
}

/// Runs `virsh [-c URI] ARGS...` and returns its stdout; an error carries virsh's own words.
pub(crate) fn virsh(connect: Option<&str>, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("virsh");
    if let Some(uri) = connect {
        cmd.args(["-c", uri]);
    }
    // Its words are parsed (domjobinfo, domstate): untranslated.
    cmd.args(args).env("LC_ALL", "C").stdin(Stdio::null());
    let out = cmd.output().context("cannot run virsh (apt-get install libvirt-clients)")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let err = err.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
        bail!("virsh {} failed ({}): {}", args.join(" "), out.status, err);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn refused(error: anyhow::Error) -> Failure {
    Failure { code: exit::REFUSED, error: error.context("nothing was changed"), state: Value::Null }
}

/// Reads the domain from libvirt and turns its proxy disks into `args.disks` (before the ssh
/// tunnels, which then forward the destination's control sockets like any `--disk`'s).
pub fn prepare(args: &mut Args) -> Result<Domain, Failure> {
    let name = args.domain.clone().unwrap_or_default();
    let to = args.to.clone().unwrap_or_default();
    let from = args.from.clone();
    let what = || format!("--domain {name}");
    if to.is_empty() && !args.arm_only {
        return Err(refused(anyhow!(
            "{}: --to URI (the destination's libvirt, e.g. qemu+ssh://host-b/system) is needed",
            what()
        )));
    }
    let state = virsh(from.as_deref(), &["domstate", &name]).with_context(what).map_err(refused)?;
    let state = state.lines().next().unwrap_or_default().trim().to_string();
    if state != "running" {
        return Err(refused(anyhow!("{}: the domain is {state}, not running", what())));
    }
    let xml = virsh(from.as_deref(), &["dumpxml", &name]).with_context(what).map_err(refused)?;
    let disks = parse_disks(&xml).map_err(|e| refused(anyhow!("{}: {e}", what())))?;
    let single = args.disk_uri.take();
    let moved = plan(
        &disks,
        |ctl| ctl.exists(),
        &args.dst_control_dir,
        single.as_deref(),
        &args.target_uris,
        args.allow_unmoved_drives,
        args.dst_ssh.is_some(),
    )
    .map_err(|e| refused(anyhow!("{}: {e}", what())))?;
    args.disks = moved.iter().map(|m| m.spec.clone()).collect();
    disk_specs(args).map_err(|e| refused(anyhow!("{}: {e}", what())))?;
    Ok(Domain { name, from, to, moved })
}

/// What `virsh domjobinfo` says, as `key: value` pairs (`Total downtime` -> `total-downtime`,
/// numbers without their unit).
pub fn parse_jobinfo(text: &str) -> Map<String, Value> {
    let mut out = Map::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else { continue };
        let key = key.trim().to_lowercase().replace([' ', '/'], "-").replace("--", "-");
        let value = value.trim();
        let first = value.split_whitespace().next().unwrap_or_default();
        let v = match first.parse::<f64>() {
            Ok(n) if value.split_whitespace().count() <= 2 => {
                // Sizes and rates alike: MiB and MiB/s scale the same.
                let unit = value.split_whitespace().nth(1).unwrap_or_default().trim_end_matches("/s");
                let scale = match unit {
                    "KiB" => 1024.0,
                    "MiB" => 1024.0 * 1024.0,
                    "GiB" => 1024.0 * 1024.0 * 1024.0,
                    _ => 1.0,
                };
                let n = n * scale;
                // Bytes are whole (virsh prints 256.508 MiB).
                let n = if unit.ends_with('B') { n.round() } else { n };
                if n.fract() == 0.0 && n.abs() < 9e15 {
                    json!(n as i64)
                } else {
                    json!(n)
                }
            }
            _ => json!(value),
        };
        out.insert(key, v);
    }
    out
}

pub(crate) async fn reach(path: &Path) -> Result<Qmp> {
    let mut q = Qmp::connect_to(path, Duration::from_secs(5), Peer::Proxy)
        .await
        .with_context(|| format!("cannot reach the source proxy {}", path.display()))?;
    q.set_timeout(CMD);
    Ok(q)
}

pub(crate) async fn phase(path: &Path) -> Result<MigrationStatus> {
    let mut q = reach(path).await?;
    q.call::<QueryMigrate>(NoArgs {}).await.map_err(|e| anyhow!(e))
}

/// Arms the disks, has libvirt migrate the domain, and waits for every hand-over.
pub async fn migrate(args: Args, domain: Domain) -> Result<Value, Failure> {
    let t0 = Instant::now();
    let timeout = args.timeout;
    // --max-bandwidth caps libvirt's memory stream too (virsh takes MiB/s).
    let bandwidth = args.max_bandwidth.map(|b| (b >> 20).max(1).to_string());
    // The source control sockets as row-migrate reaches them (after --src-ssh, the local ends).
    let sources: Vec<PathBuf> =
        disk_specs(&args).map_err(|e| refused(anyhow!(e)))?.into_iter().map(|d| d.src_proxy).collect();
    let armed = arm::arm(args).await?;
    let armed_seconds = t0.elapsed().as_secs_f64();
    tracing::info!(domain = %domain.name, "armed; libvirt migrates");
    let started = Instant::now();
    if let Err(error) = virsh_migrate(&domain, bandwidth.as_deref()).await {
        return Err(after_failed_migration(&domain, &sources, error).await);
    }
    let libvirt_seconds = started.elapsed().as_secs_f64();
    // libvirt's figures (the destination keeps the completed job's statistics).
    let jobinfo = virsh(Some(&domain.to), &["domjobinfo", "--completed", "--keep-completed", &domain.name])
        .map(|t| Value::Object(parse_jobinfo(&t)))
        .unwrap_or_else(|e| json!({ "error": format!("{e:#}") }));
    let disks = wait_handovers(&domain, &sources, t0, timeout).await?;
    Ok(json!({
        "domain": domain.name,
        "from": domain.from,
        "to": domain.to,
        "armed": armed,
        "armed-seconds": armed_seconds,
        "libvirt-seconds": libvirt_seconds,
        "total-seconds": t0.elapsed().as_secs_f64(),
        "libvirt": jobinfo,
        "disks": disks,
    }))
}

/// libvirt's live migration, as on shared storage (`virsh migrate --live --persistent
/// --undefinesource`), its job followed with a progress line. Ctrl-C (or SIGINT to row-migrate
/// alone) aborts libvirt's job and waits for virsh to end, so the caller can disarm the disks:
/// leaving at once would leave them armed.
async fn virsh_migrate(domain: &Domain, bandwidth: Option<&str>) -> Result<()> {
    let from = domain.from.as_deref();
    let mut cmd = Command::new("virsh");
    if let Some(uri) = from {
        cmd.args(["-c", uri]);
    }
    cmd.args(["migrate", "--live", "--persistent", "--undefinesource"]);
    if let Some(mib) = bandwidth {
        cmd.args(["--bandwidth", mib]);
    }
    cmd.args([&domain.name, &domain.to]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().context("cannot run virsh migrate")?;
    let interrupt = crate::ssh::ctrl_c();
    tokio::pin!(interrupt);
    let mut interrupted = false;
    let mut last = Instant::now();
    let outcome = loop {
        match child.try_wait() {
            Ok(Some(_)) => break child.wait_with_output().map_err(anyhow::Error::from),
            Ok(None) => {}
            Err(e) => break Err(e.into()),
        }
        if last.elapsed() >= Duration::from_secs(1) {
            last = Instant::now();
            show_job(from, &domain.name);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = &mut interrupt, if !interrupted => {
                interrupted = true;
                tracing::warn!(domain = %domain.name, "interrupted: aborting libvirt's migration job");
                if let Err(e) = virsh(from, &["domjobabort", &domain.name]) {
                    tracing::warn!("virsh domjobabort: {e:#}");
                }
            }
        }
    };
    progress_done();
    let out = outcome?;
    if out.status.success() {
        return Ok(());
    }
    if interrupted {
        bail!("interrupted: libvirt's job was aborted");
    }
    let err = String::from_utf8_lossy(&out.stderr);
    bail!(
        "virsh migrate {} {} failed ({}): {}",
        domain.name,
        domain.to,
        out.status,
        err.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ")
    )
}

/// One progress line from `virsh domjobinfo` (nothing while libvirt reports no data yet).
fn show_job(from: Option<&str>, name: &str) {
    if let Ok(text) = virsh(from, &["domjobinfo", name]) {
        let info = parse_jobinfo(&text);
        let n = |k: &str| info.get(k).and_then(Value::as_u64).unwrap_or_default();
        let bw = info.get("memory-bandwidth").and_then(Value::as_f64).unwrap_or_default();
        if n("data-total") > 0 {
            progress_line("libvirt", &progress_detail(n("data-processed"), n("data-total"), bw));
        }
    }
}

/// After libvirt's migration: each disk is handed over on the destination's first write, then
/// completes by itself. Waits (within `timeout` from `t0`) until every source proxy says so.
async fn wait_handovers(
    domain: &Domain,
    sources: &[PathBuf],
    t0: Instant,
    timeout: Duration,
) -> Result<Vec<Value>, Failure> {
    let after = |error: anyhow::Error| Failure {
        code: exit::AFTER_SWITCHOVER,
        error,
        state: json!({"domain": domain.name, "runs-on": domain.to}),
    };
    let mut disks = Vec::new();
    for (m, src) in domain.moved.iter().zip(sources) {
        let status = loop {
            match phase(src).await {
                Ok(s) if s.phase == Phase::Completed => break s,
                Ok(s) if matches!(s.phase, Phase::Failed | Phase::Cancelled) => {
                    return Err(after(anyhow!(
                        "disk {}: the domain runs on {} but the source proxy's hand-over ended {}{}",
                        m.target,
                        domain.to,
                        s.phase.as_str(),
                        s.error.map(|e| format!(": {e}")).unwrap_or_default()
                    )))
                }
                Ok(s) => {
                    let what = if s.phase == Phase::Ready {
                        "waiting for the destination's first write"
                    } else {
                        "post-copy push"
                    };
                    progress_line(&format!("{} hand-over", m.target), &format!("{} ({what})", s.phase.as_str()));
                }
                Err(e) => tracing::warn!(disk = %m.target, "query-migrate: {e:#}"),
            }
            if t0.elapsed() > timeout {
                progress_done();
                return Err(after(anyhow!(
                    "disk {}: the domain runs on {} but its disk has not been handed over after {:?} (the guest \
                     has not written there yet?); the hand-over still happens on its first write",
                    m.target,
                    domain.to,
                    timeout
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        disks.push(json!({"target": m.target, "socket": m.socket, "status": status}));
    }
    progress_done();
    Ok(disks)
}

/// libvirt's migration failed: a disk that was not claimed is disarmed (the guest runs on the
/// source with it, exit 3); one that was claimed belongs to the destination now (exit 5).
async fn after_failed_migration(domain: &Domain, sources: &[PathBuf], error: anyhow::Error) -> Failure {
    let mut state = Vec::new();
    let mut claimed = false;
    for (m, src) in domain.moved.iter().zip(sources) {
        let entry = match phase(src).await {
            Ok(s) if s.phase == Phase::Ready => {
                let undone = match reach(src).await {
                    Ok(mut q) => q.call::<MigrateCancel>(NoArgs {}).await.is_ok(),
                    Err(_) => false,
                };
                json!({"target": m.target, "disarmed": undone})
            }
            Ok(s) => {
                claimed |= matches!(s.phase, Phase::Finishing | Phase::HandedOver | Phase::Completed);
                json!({"target": m.target, "phase": s.phase.as_str()})
            }
            Err(e) => json!({"target": m.target, "error": format!("{e:#}")}),
        };
        state.push(entry);
    }
    if claimed {
        Failure {
            code: exit::AFTER_SWITCHOVER,
            error: error.context("the destination had already taken a disk: nothing was undone"),
            state: Value::Array(state),
        }
    } else {
        Failure { code: exit::ROLLED_BACK, error: error.context("the disks were disarmed"), state: Value::Array(state) }
    }
}

/// The text report.
pub fn summary(r: &Value) -> String {
    let ms = |k: &str| r["libvirt"][k].as_u64().map_or("?".to_string(), |v| v.to_string());
    let mut out = format!(
        "migrated {} to {} in {:.1} s (disks armed in {:.1} s, libvirt's migration {:.1} s); libvirt's downtime {} ms",
        r["domain"].as_str().unwrap_or_default(),
        r["to"].as_str().unwrap_or_default(),
        r["total-seconds"].as_f64().unwrap_or_default(),
        r["armed-seconds"].as_f64().unwrap_or_default(),
        r["libvirt-seconds"].as_f64().unwrap_or_default(),
        ms("total-downtime"),
    );
    for d in r["disks"].as_array().into_iter().flatten() {
        let s = &d["status"];
        out.push_str(&format!(
            "\n  {}: handed over and completed, {:.1} MB on the wire",
            d["target"].as_str().unwrap_or_default(),
            s["total-wire-bytes"].as_f64().unwrap_or_default() / 1e6
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = r#"<domain type='qemu'><name>vm1</name><devices>
        <emulator>/usr/bin/qemu-system-x86_64</emulator>
        <disk type='network' device='disk'><driver name='qemu' type='raw' cache='none'/>
          <source protocol='nbd'><host transport='unix' socket='/run/nbd-row-proxy/vm1-root.sock'/></source>
          <target dev='vda' bus='virtio'/></disk>
        <disk type='network' device='disk'>
          <source protocol='nbd'><host transport='unix' socket='/run/nbd-row-proxy/vm1-data.sock'/></source>
          <target dev='vdb' bus='virtio'/></disk>
        <disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='sda'/><readonly/></disk>
        <disk type='network' device='disk'><source protocol='nbd' name='x'><host name='10.0.0.1' port='10809'/></source>
          <target dev='vdc'/><shareable/></disk>
      </devices></domain>"#;

    fn ours(p: &Path) -> bool {
        p.starts_with("/run/nbd-row-proxy")
    }

    #[test]
    fn the_proxy_disks_are_found_and_the_rest_is_named() {
        let disks = parse_disks(XML).unwrap();
        assert_eq!(disks.len(), 4);
        assert_eq!(disks[0].source, Source::NbdUnix("/run/nbd-row-proxy/vm1-root.sock".into()));
        assert!(disks[0].writable && disks[1].writable && !disks[2].writable && !disks[3].writable);
        assert_eq!(disks[3].source, Source::Other("network/nbd".into()));
        let uris = vec![("vda".to_string(), "tcp:b:10810".to_string()), ("vdb".to_string(), "tcp:b:10811".to_string())];
        let moved = plan(&disks, ours, Path::new("/b"), None, &uris, false, false).unwrap();
        assert_eq!(moved.len(), 2);
        assert_eq!(moved[0].spec.src_proxy, PathBuf::from("/run/nbd-row-proxy/vm1-root.ctl"));
        assert_eq!(moved[0].spec.dst_proxy, PathBuf::from("/b/vm1-root.ctl"));
        assert_eq!(moved[1].spec.uri, "tcp:b:10811");
        // Two disks need an address each; --disk-uri names one.
        let e = plan(&disks, ours, Path::new("/b"), Some("tcp:b:1"), &[], false, false).unwrap_err();
        assert!(e.contains("--target-uri DEV="), "{e}");
        let e =
            plan(&disks, ours, Path::new("/b"), None, &[("vdz".into(), "tcp:b:1".into())], false, false).unwrap_err();
        assert!(e.contains("no proxy disk vdz (it has vda, vdb)"), "{e}");
        // The same directory on both ends without ssh would be one socket for both.
        let e =
            plan(&disks[..1], ours, Path::new("/run/nbd-row-proxy"), Some("tcp:b:1"), &[], false, false).unwrap_err();
        assert!(e.contains("--dst-control-dir"), "{e}");
        // Through --dst-ssh the same path is the other host's socket.
        let moved =
            plan(&disks[..1], ours, Path::new("/run/nbd-row-proxy"), Some("tcp:b:1"), &[], false, true).unwrap();
        assert_eq!(moved[0].spec.dst_proxy, PathBuf::from("/run/nbd-row-proxy/vm1-root.ctl"));
    }

    #[test]
    fn an_unmoved_writable_disk_or_none_of_ours_is_refused() {
        let xml = XML.replace("<shareable/>", "");
        let disks = parse_disks(&xml).unwrap();
        let uris = vec![("vda".to_string(), "tcp:b:1".to_string()), ("vdb".to_string(), "tcp:b:2".to_string())];
        let e = plan(&disks, ours, Path::new("/b"), None, &uris, false, false).unwrap_err();
        assert!(e.contains("vdc (network/nbd)") && e.contains("--allow-unmoved-drives"), "{e}");
        assert_eq!(plan(&disks, ours, Path::new("/b"), None, &uris, true, false).unwrap().len(), 2);
        let e = plan(&disks, |_| false, Path::new("/b"), None, &[], false, false).unwrap_err();
        assert!(e.contains("no disk of the domain is served by nbd-row-proxy"), "{e}");
        assert!(e.contains("vda (NBD on /run/nbd-row-proxy/vm1-root.sock, no nbd-row-proxy control socket"), "{e}");
        assert!(parse_disks("<network/>").unwrap_err().contains("not a <domain>"));
        assert!(parse_disks("<domain").is_err());
    }

    #[test]
    fn jobinfo_and_target_uris_parse() {
        let info = parse_jobinfo(
            "Job type:         Completed\nTime elapsed:     1306         ms\nData total:       256.508 MiB\n\
             Memory bandwidth: 181.184 MiB/s\n\
             Total downtime:   73           ms\nDowntime w/o network: 71           ms\n",
        );
        assert_eq!(info["total-downtime"], 73);
        assert_eq!(info["time-elapsed"], 1306);
        assert_eq!(info["downtime-w-o-network"], 71);
        assert_eq!(info["job-type"], "Completed");
        assert!(info["data-total"].as_u64().unwrap() > 268_000_000);
        assert_eq!(info["memory-bandwidth"], 189_985_194);
        assert_eq!(parse_target_uri("vda=tcp:b:10810").unwrap(), ("vda".into(), "tcp:b:10810".into()));
        assert!(parse_target_uri("tcp:b:1").is_err());
    }
}
